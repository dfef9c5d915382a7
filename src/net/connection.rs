//! Frames over one QUIC stream: a reader and a writer, each owning its half.

use quinn::{ReadExactError, RecvStream, SendStream};

use super::frame::{check_prefix, encode_head, parse_header, Frame, Limits, PREFIX_LEN};
use super::NetError;

pub struct FrameReader {
    recv: RecvStream,
    limits: Limits,
}

fn read_err(e: ReadExactError, at_frame_start: bool) -> Option<NetError> {
    match e {
        // EOF between frames is a clean close.
        ReadExactError::FinishedEarly(0) if at_frame_start => None,
        ReadExactError::FinishedEarly(_) => Some(NetError::Truncated),
        ReadExactError::ReadError(e) => Some(NetError::Connection(e.to_string())),
    }
}

impl FrameReader {
    pub fn new(recv: RecvStream) -> Self {
        Self { recv, limits: Limits::DEFAULT }
    }

    /// What the next frames may size (the handshake reads under
    /// [`Limits::PRE_AUTH`], then restores [`Limits::DEFAULT`]).
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// The next frame; `Ok(None)` when the peer finished the stream cleanly.
    pub async fn read(&mut self) -> Result<Option<Frame>, NetError> {
        let mut prefix = [0u8; PREFIX_LEN];
        if let Err(e) = self.recv.read_exact(&mut prefix).await {
            return match read_err(e, true) {
                None => Ok(None),
                Some(e) => Err(e),
            };
        }
        let p = check_prefix(&prefix, self.limits)?;
        let mut header = vec![0u8; p.header_len];
        self.recv.read_exact(&mut header).await.map_err(|e| read_err(e, false).unwrap_or(NetError::Truncated))?;
        let message = parse_header(&header)?;
        let mut payload = vec![0u8; p.payload_len];
        self.recv.read_exact(&mut payload).await.map_err(|e| read_err(e, false).unwrap_or(NetError::Truncated))?;
        Ok(Some(Frame { message, payload }))
    }

    /// The next frame, treating a clean end of stream as an error.
    pub async fn expect(&mut self) -> Result<Frame, NetError> {
        self.read().await?.ok_or_else(|| NetError::Connection("the peer closed the stream".into()))
    }
}

pub struct FrameWriter {
    send: SendStream,
}

impl FrameWriter {
    pub fn new(send: SendStream) -> Self {
        Self { send }
    }

    pub async fn write(&mut self, frame: &Frame) -> Result<(), NetError> {
        self.send.write_all(&encode_head(frame)?).await?;
        if !frame.payload.is_empty() {
            self.send.write_all(&frame.payload).await?;
        }
        Ok(())
    }

    /// Raw bytes, for tests that play a misbehaving peer.
    pub async fn write_raw(&mut self, bytes: &[u8]) -> Result<(), NetError> {
        self.send.write_all(bytes).await?;
        Ok(())
    }

    /// Ends the stream after what was written.
    pub fn finish(&mut self) {
        let _ = self.send.finish();
    }

    /// Ends the stream and waits (briefly) until the peer has the bytes, so a
    /// last error frame survives the connection being closed right after.
    pub async fn finish_and_flush(&mut self) {
        let _ = self.send.finish();
        let _ = tokio::time::timeout(std::time::Duration::from_millis(500), self.send.stopped()).await;
    }
}

/// A bidirectional stream as a (reader, writer) pair.
pub fn split((send, recv): (SendStream, RecvStream)) -> (FrameReader, FrameWriter) {
    (FrameReader::new(recv), FrameWriter::new(send))
}

/// A control stream: one request, then its reply. An error the peer reports
/// becomes [`NetError::Remote`], named after the peer when it did not say.
pub struct Control {
    reader: FrameReader,
    writer: FrameWriter,
    peer: String,
}

impl Control {
    pub fn new(reader: FrameReader, writer: FrameWriter, peer: &str) -> Self {
        Self { reader, writer, peer: peer.to_string() }
    }

    pub async fn request(&mut self, frame: Frame, wait: std::time::Duration) -> Result<Frame, NetError> {
        let what = format!("{} from {}", frame.message.kind(), self.peer);
        super::timeout(wait, &what, async {
            self.writer.write(&frame).await?;
            match self.reader.expect().await? {
                Frame { message: super::message::Message::Error(mut e), .. } => {
                    if e.node.is_empty() {
                        e.node = self.peer.clone();
                    }
                    Err(NetError::Remote(e))
                }
                reply => Ok(reply),
            }
        })
        .await
    }
}
