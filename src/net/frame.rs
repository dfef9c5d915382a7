//! The frame: a bincode-encoded control header plus an optional raw payload
//! (activations, KV state) — data with no I/O, so it is unit-testable.
//!
//! Layout, all little-endian:
//!
//! ```text
//! u8 version | u8 reserved | u32 header_len | u32 payload_len | header | payload
//! ```
//!
//! The fixed prefix is checked before anything is allocated: a wrong version
//! or a length over the limit is refused with only 10 bytes read.

use super::message::{split_joined, Message, StepResult};
use super::NetError;

pub const PROTOCOL_VERSION: u8 = 10;
pub const PREFIX_LEN: usize = 10;
/// Control headers are small; anything larger is an attack or a bug.
pub const MAX_HEADER: usize = 1 << 20;
/// Default bound on a payload: a 4096-token prefill chunk of an 8192-wide f32
/// hidden state is 128 MiB.
pub const DEFAULT_MAX_PAYLOAD: usize = 256 << 20;

/// What a reader accepts before it allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub header: usize,
    pub payload: usize,
}

impl Limits {
    /// An authenticated peer.
    pub const DEFAULT: Limits = Limits { header: MAX_HEADER, payload: DEFAULT_MAX_PAYLOAD };
    /// Before the cluster key is proved: a Hello is under 200 bytes, and a
    /// stranger must not make the node hold more than a few KiB.
    pub const PRE_AUTH: Limits = Limits { header: 4 << 10, payload: 0 };
}

#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub message: Message,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new(message: Message) -> Self {
        Self { message, payload: Vec::new() }
    }

    pub fn with_payload(message: Message, payload: Vec<u8>) -> Self {
        Self { message, payload }
    }
}

/// Lengths announced by a frame's prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    pub header_len: usize,
    pub payload_len: usize,
}

fn bincode_config() -> impl bincode::config::Config {
    // The limit stops a crafted length inside the header from allocating more
    // than the header itself could hold.
    bincode::config::standard().with_limit::<MAX_HEADER>()
}

pub fn encode(frame: &Frame) -> Result<Vec<u8>, NetError> {
    let mut out = encode_head(frame)?;
    out.extend_from_slice(&frame.payload);
    Ok(out)
}

/// The prefix and header: what precedes the payload, which a writer sends
/// as it is (activations are not copied into one buffer with the header).
pub fn encode_head(frame: &Frame) -> Result<Vec<u8>, NetError> {
    let header = bincode::serde::encode_to_vec(&frame.message, bincode_config())
        .map_err(|e| NetError::Decode(format!("cannot encode {}: {e}", frame.message.kind())))?;
    if header.len() > MAX_HEADER {
        return Err(NetError::TooLarge { what: "header", len: header.len() as u64, max: MAX_HEADER as u64 });
    }
    let payload_len = u32::try_from(frame.payload.len()).map_err(|_| NetError::TooLarge {
        what: "payload",
        len: frame.payload.len() as u64,
        max: u32::MAX as u64,
    })?;
    let mut out = Vec::with_capacity(PREFIX_LEN + header.len());
    out.push(PROTOCOL_VERSION);
    out.push(0);
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&payload_len.to_le_bytes());
    out.extend_from_slice(&header);
    Ok(out)
}

/// Phase one: validates the prefix.
pub fn check_prefix(prefix: &[u8; PREFIX_LEN], limits: Limits) -> Result<Prefix, NetError> {
    if prefix[0] != PROTOCOL_VERSION {
        return Err(NetError::Version { got: prefix[0], want: PROTOCOL_VERSION });
    }
    let header_len = u32::from_le_bytes([prefix[2], prefix[3], prefix[4], prefix[5]]) as usize;
    let payload_len = u32::from_le_bytes([prefix[6], prefix[7], prefix[8], prefix[9]]) as usize;
    if header_len > limits.header {
        return Err(NetError::TooLarge { what: "header", len: header_len as u64, max: limits.header as u64 });
    }
    if payload_len > limits.payload {
        return Err(NetError::TooLarge { what: "payload", len: payload_len as u64, max: limits.payload as u64 });
    }
    Ok(Prefix { header_len, payload_len })
}

/// Phase two: decodes the header bytes.
pub fn parse_header(header: &[u8]) -> Result<Message, NetError> {
    let (message, used) = bincode::serde::decode_from_slice::<Message, _>(header, bincode_config())
        .map_err(|e| NetError::Decode(format!("malformed header: {e}")))?;
    if used != header.len() {
        return Err(NetError::Decode(format!("header has {} trailing bytes", header.len() - used)));
    }
    Ok(message)
}

/// Decodes one whole frame from a buffer: `Ok(None)` when more bytes are needed.
pub fn decode(buf: &[u8], limits: Limits) -> Result<Option<(Frame, usize)>, NetError> {
    let Some(prefix) = buf.first_chunk::<PREFIX_LEN>() else {
        return Ok(None);
    };
    let prefix = check_prefix(prefix, limits)?;
    let total = PREFIX_LEN + prefix.header_len + prefix.payload_len;
    if buf.len() < total {
        return Ok(None);
    }
    let message = parse_header(&buf[PREFIX_LEN..PREFIX_LEN + prefix.header_len])?;
    let payload = buf[PREFIX_LEN + prefix.header_len..total].to_vec();
    Ok(Some((Frame { message, payload }, total)))
}

// A result's logits travel in its frame's payload; this is where a result
// meets its frame.
impl StepResult {
    /// The frame that carries this result, its logits (if any) as raw
    /// little-endian f32 in the payload.
    pub fn into_frame(mut self) -> Frame {
        let mut payload = Vec::new();
        self.logits_into(&mut payload);
        Frame::with_payload(Message::Result(self), payload)
    }

    /// The payload bytes its logits take, as its header says.
    fn logits_bytes(&self) -> u64 {
        self.logits_len.map_or(0, |n| u64::from(n) * 4)
    }

    /// Moves its logits (if any) to the end of `payload`, noting their count.
    fn logits_into(&mut self, payload: &mut Vec<u8>) {
        if let Some(logits) = self.logits.take() {
            self.logits_len = Some(logits.len() as u32);
            payload.extend(logits.iter().flat_map(|v| v.to_le_bytes()));
        }
    }

    /// The result with its logits read back from the frame's payload.
    pub fn with_payload(mut self, payload: &[u8]) -> Result<Self, NetError> {
        if payload.len() as u64 != self.logits_bytes() {
            return Err(NetError::Decode(format!("a result of {:?} logits came with {} payload bytes", self.logits_len, payload.len())));
        }
        self.logits = self.logits_len.map(|_| payload.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect());
        Ok(self)
    }
}

/// The most logits bytes one `Results` frame carries: a quarter of what a
/// peer accepts, so a batch of many sessions that asked for a large
/// vocabulary's logits (262,144 of them are 1 MiB) never makes a frame the
/// head refuses.
const RESULTS_PAYLOAD: usize = DEFAULT_MAX_PAYLOAD / 4;

/// The frames for the results of one batch: a `Result` for one, else
/// `Results` with their logits joined in order, as few as keep each
/// frame's logits within `RESULTS_PAYLOAD`. The head hears a batch in one read and one
/// wake-up instead of one per session.
pub fn results_frames(results: Vec<StepResult>) -> Vec<Frame> {
    results_frames_within(results, RESULTS_PAYLOAD)
}

fn results_frames_within(results: Vec<StepResult>, budget: usize) -> Vec<Frame> {
    let mut groups: Vec<Vec<StepResult>> = Vec::new();
    let mut held = 0;
    for r in results {
        let bytes = r.logits.as_ref().map_or(0, |l| l.len() * 4);
        match groups.last_mut() {
            Some(group) if held + bytes <= budget => group.push(r),
            _ => {
                held = 0;
                groups.push(vec![r]);
            }
        }
        held += bytes;
    }
    groups
        .into_iter()
        .map(|mut group| {
            if group.len() == 1 {
                return group.pop().expect("one result").into_frame();
            }
            let mut payload = Vec::new();
            for r in &mut group {
                r.logits_into(&mut payload);
            }
            Frame::with_payload(Message::Results(group), payload)
        })
        .collect()
}

/// Splits a `Results` frame's payload among its results; refused unless
/// their logits take the payload exactly.
pub fn split_results(results: Vec<StepResult>, payload: &[u8]) -> Result<Vec<StepResult>, NetError> {
    split_joined(results, payload, "Results", |r| Some(r.logits_bytes()))?.into_iter().map(|(r, p)| r.with_payload(p)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::message::StageStep;

    fn check(frame: Frame) {
        let bytes = encode(&frame).unwrap();
        for cut in [0, 5, PREFIX_LEN, bytes.len() - 1] {
            assert!(decode(&bytes[..cut], Limits::DEFAULT).unwrap().is_none(), "cut at {cut}");
        }
        let (back, used) = decode(&bytes, Limits::DEFAULT).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(back, frame);
    }

    #[test]
    fn frames_round_trip() {
        check(Frame::new(Message::Ping { nonce: 7 }));
        check(Frame::with_payload(Message::Close { session: 3 }, vec![1, 2, 3, 4]));
    }

    #[test]
    fn wrong_version_is_refused_from_the_prefix() {
        let mut bytes = encode(&Frame::new(Message::Ping { nonce: 1 })).unwrap();
        bytes[0] = 99;
        assert!(matches!(decode(&bytes, Limits::DEFAULT), Err(NetError::Version { got: 99, .. })));
    }

    #[test]
    fn oversized_lengths_are_refused_before_allocation() {
        let mut prefix = [PROTOCOL_VERSION, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        prefix[6..10].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            check_prefix(&prefix, Limits { header: MAX_HEADER, payload: 1024 }),
            Err(NetError::TooLarge { what: "payload", .. })
        ));
        let mut prefix = [PROTOCOL_VERSION, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        prefix[2..6].copy_from_slice(&(MAX_HEADER as u32 + 1).to_le_bytes());
        assert!(matches!(
            check_prefix(&prefix, Limits { header: MAX_HEADER, payload: 1024 }),
            Err(NetError::TooLarge { what: "header", .. })
        ));
    }

    #[test]
    fn garbage_header_is_a_decode_error() {
        let mut bytes = vec![PROTOCOL_VERSION, 0];
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&[0xff, 0xff, 0xff]);
        assert!(matches!(decode(&bytes, Limits::DEFAULT), Err(NetError::Decode(_))));
    }

    #[test]
    fn a_result_carries_a_large_vocabulary_of_logits_in_its_payload() {
        // Gemma 3's 262,144 logits are over the header's 1 MiB limit.
        let logits: Vec<f32> = (0..262_144).map(|i| i as f32 * 0.5 - 7.0).collect();
        let r = StepResult {
            session: 1,
            step: 2,
            token: Some(3),
            logprobs: None,
            logits: Some(logits.clone()),
            logits_len: None,
            pooled: None,
            stage_steps: vec![],
            f16_fallbacks: 0,
            hop_bytes: vec![],
        };
        let bytes = encode(&r.into_frame()).unwrap();
        let (frame, _) = decode(&bytes, Limits::DEFAULT).unwrap().unwrap();
        let Message::Result(back) = frame.message else { panic!("a result") };
        assert_eq!(back.clone().with_payload(&frame.payload).unwrap().logits, Some(logits));
        // A payload that does not hold what the header says is refused.
        assert!(back.with_payload(&frame.payload[4..]).is_err());
    }

    #[test]
    fn a_batch_of_results_travels_in_one_frame_and_a_bad_split_is_refused() {
        let result = |step: u64, logits: Option<Vec<f32>>| StepResult {
            session: step * 10,
            step,
            token: Some(step as u32),
            logprobs: None,
            logits,
            logits_len: None,
            pooled: None,
            stage_steps: vec![StageStep { nanos: step, rows: 1 }],
            f16_fallbacks: 0,
            hop_bytes: vec![],
        };
        let results = vec![result(1, Some(vec![1.0, -2.5])), result(2, None), result(3, Some(vec![0.5; 5]))];
        let frames = results_frames(results.clone());
        assert_eq!(frames.len(), 1);
        let bytes = encode(&frames[0]).unwrap();
        let (frame, _) = decode(&bytes, Limits::DEFAULT).unwrap().unwrap();
        let Message::Results(headers) = frame.message else { panic!("several results make a Results frame") };
        assert_eq!(frame.payload.len(), 7 * 4);
        let back = split_results(headers.clone(), &frame.payload).unwrap();
        assert_eq!(back.iter().map(|r| r.logits.clone()).collect::<Vec<_>>(), results.iter().map(|r| r.logits.clone()).collect::<Vec<_>>());
        assert_eq!(
            back.iter().map(|r| (r.session, r.step, r.token)).collect::<Vec<_>>(),
            [(10, 1, Some(1)), (20, 2, Some(2)), (30, 3, Some(3))]
        );
        assert!(split_results(headers.clone(), &frame.payload[4..]).is_err(), "short");
        assert!(split_results(headers.clone(), &[frame.payload.clone(), vec![0; 4]].concat()).is_err(), "bytes left over");
        assert!(split_results(Vec::new(), &[]).is_err(), "no results");
        let mut huge = headers;
        huge[0].logits_len = Some(u32::MAX);
        assert!(split_results(huge, &frame.payload).is_err(), "logits past any payload");
        // One result is a plain Result frame.
        assert!(matches!(results_frames(vec![result(4, None)])[..], [Frame { message: Message::Result(_), .. }]));
        // Logits past the budget go in more frames, each within it, the
        // results in order.
        let frames = results_frames_within(results.clone(), 5 * 4);
        let steps: Vec<Vec<u64>> = frames
            .iter()
            .map(|f| match &f.message {
                Message::Results(rs) => rs.iter().map(|r| r.step).collect(),
                Message::Result(r) => vec![r.step],
                _ => panic!("results"),
            })
            .collect();
        assert_eq!(steps, [vec![1, 2], vec![3]]);
        assert!(frames.iter().all(|f| f.payload.len() <= 5 * 4));
    }
}
