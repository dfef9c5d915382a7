//! The head's connection to one node: the authenticated QUIC connection, its
//! control stream (request/response), and its event stream (results and
//! errors), which completes whatever pipeline the node currently serves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::net::auth::{client_handshake, ClusterKey};
use crate::net::connection::{split, Control, FrameWriter};
use crate::net::frame::{split_results, Frame};
use crate::net::message::{Capabilities, Message, PeerRole, StepResult, StreamPurpose};
use crate::net::probe::{self, LinkTiming};
use crate::net::resolve_addr;
use crate::net::{timeout, tls, NetError};

/// Steps waiting for their result, by step id, with their session.
pub type Pending = Arc<Mutex<HashMap<u64, (u64, oneshot::Sender<Result<StepResult, NetError>>)>>>;

/// Fails waiting steps: the one named, else all of a session, else all.
pub fn fail(pending: &Pending, session: Option<u64>, step: Option<u64>, error: &NetError) {
    let mut p = pending.lock().expect("pending lock");
    let steps: Vec<u64> = match (step, session) {
        (Some(s), _) => vec![s],
        (None, Some(sess)) => p.iter().filter(|(_, (s, _))| *s == sess).map(|(k, _)| *k).collect(),
        (None, None) => p.keys().copied().collect(),
    };
    for s in steps {
        if let Some((_, tx)) = p.remove(&s) {
            let _ = tx.send(Err(error.clone()));
        }
    }
}

fn dispatch(pending: &Pending, frame: Frame) {
    match frame.message {
        Message::Result(r) => {
            if let Some((_, tx)) = pending.lock().expect("pending lock").remove(&r.step) {
                let _ = tx.send(r.with_payload(&frame.payload));
            }
        }
        Message::Results(results) => {
            let steps: Vec<u64> = results.iter().map(|r| r.step).collect();
            let mut p = pending.lock().expect("pending lock");
            match split_results(results, &frame.payload) {
                Ok(results) => {
                    for r in results {
                        if let Some((_, tx)) = p.remove(&r.step) {
                            let _ = tx.send(Ok(r));
                        }
                    }
                }
                // A frame that does not add up fails the steps it names.
                Err(e) => {
                    for step in steps {
                        if let Some((_, tx)) = p.remove(&step) {
                            let _ = tx.send(Err(e.clone()));
                        }
                    }
                }
            }
        }
        // An error tied to no session (a stranger's bad frame on its own
        // stream) is not about our steps: failing them all would let anyone
        // who can reach a node break every head's generations.
        Message::Error(e) if e.session.is_none() && e.step.is_none() => {
            tracing::warn!(node = %e.node, "{}", e.message);
        }
        Message::Error(e) => fail(pending, e.session, e.step, &NetError::Remote(e.clone())),
        _ => {}
    }
}

/// Where a node's events go: the pipeline it serves, and its place in the chain.
#[derive(Default)]
struct Sink {
    pending: Option<Pending>,
    stage: usize,
}

pub struct NodeClient {
    pub addr: String,
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    control: tokio::sync::Mutex<Control>,
    caps: Mutex<Capabilities>,
    sink: Arc<Mutex<Sink>>,
}

impl NodeClient {
    /// Connects, authenticates, and subscribes to the node's events.
    pub async fn connect(endpoint: &quinn::Endpoint, addr: &str, key: &ClusterKey) -> Result<Arc<Self>, NetError> {
        let sock = resolve_addr(addr).await?;
        let conn = timeout(Duration::from_secs(10), &format!("a connection to {addr}"), async {
            endpoint
                .connect(sock, tls::SERVER_NAME)
                .map_err(|e| NetError::Connection(format!("{addr}: {e}")))?
                .await
                .map_err(|e| NetError::Connection(format!("cannot reach {addr}: {e}")))
        })
        .await?;
        let (reader, writer, caps) =
            client_handshake(&conn, key, PeerRole::Head).await.map_err(|e| NetError::Connection(format!("{addr}: {e}")))?;
        let (mut events, mut attach) = split(conn.open_bi().await?);
        attach.write(&Frame::new(Message::Attach { purpose: StreamPurpose::Events })).await?;
        let sink: Arc<Mutex<Sink>> = Arc::default();
        let (events_sink, name) = (sink.clone(), addr.to_string());
        tokio::spawn(async move {
            let _keep_open = attach;
            let reason = loop {
                match events.read().await {
                    Ok(Some(frame)) => {
                        let pending = events_sink.lock().expect("sink lock").pending.clone();
                        if let Some(p) = pending {
                            dispatch(&p, frame);
                        }
                    }
                    Ok(None) => break "closed its event stream".to_string(),
                    Err(e) => break format!("disconnected: {e}"),
                }
            };
            let sink = events_sink.lock().expect("sink lock");
            if let Some(p) = &sink.pending {
                fail(p, None, None, &NetError::Connection(format!("stage {} ({name}) {reason}", sink.stage)));
            }
        });
        Ok(Arc::new(Self {
            addr: addr.to_string(),
            _endpoint: endpoint.clone(),
            conn,
            control: tokio::sync::Mutex::new(Control::new(reader, writer, addr)),
            caps: Mutex::new(caps),
            sink,
        }))
    }

    /// Routes this node's events to `pending`; `stage` names it in errors.
    pub fn attach(&self, pending: Pending, stage: usize) {
        *self.sink.lock().expect("sink lock") = Sink { pending: Some(pending), stage };
    }

    /// A data stream into this node; its back direction carries refusals,
    /// which fail the attached pipeline's steps.
    pub async fn open_data_stream(&self) -> Result<FrameWriter, NetError> {
        let (mut back, mut data) = split(self.conn.open_bi().await?);
        data.write(&Frame::new(Message::Attach { purpose: StreamPurpose::Data })).await?;
        let sink = self.sink.clone();
        tokio::spawn(async move {
            while let Ok(Some(frame)) = back.read().await {
                let pending = sink.lock().expect("sink lock").pending.clone();
                if let Some(p) = pending {
                    dispatch(&p, frame);
                }
            }
        });
        Ok(data)
    }

    /// One control request; a node's error becomes `Remote`.
    pub async fn request(&self, frame: Frame, wait: Duration) -> Result<Frame, NetError> {
        self.control.lock().await.request(frame, wait).await
    }

    /// The capabilities from the handshake or the last refresh.
    pub fn capabilities(&self) -> Capabilities {
        self.caps.lock().expect("caps lock").clone()
    }

    pub async fn refresh_capabilities(&self) -> Result<Capabilities, NetError> {
        match self.request(Frame::new(Message::GetCapabilities), Duration::from_secs(5)).await?.message {
            Message::Capabilities(c) => {
                *self.caps.lock().expect("caps lock") = c.clone();
                Ok(c)
            }
            other => Err(NetError::Unexpected { got: other.kind(), expected: "Capabilities" }),
        }
    }

    /// Round trip of a Ping on the control stream, and the node's load.
    pub async fn ping(&self, wait: Duration) -> Result<Ping, NetError> {
        let t = Instant::now();
        match self.request(Frame::new(Message::Ping { nonce: 1 }), wait).await?.message {
            Message::Pong { sessions, busy_nanos, tokens, batches, .. } => {
                Ok(Ping { rtt: t.elapsed(), sessions, busy: Duration::from_nanos(busy_nanos), tokens, batches })
            }
            other => Err(NetError::Unexpected { got: other.kind(), expected: "Pong" }),
        }
    }

    /// The link's throughput towards the node, in bits per second
    /// ([`probe::rate`]), `rtt` being its round trip.
    pub async fn probe(&self, rtt: Duration, wait: Duration) -> Result<f64, NetError> {
        probe::rate(&mut *self.control.lock().await, rtt, wait).await
    }

    /// The link towards the node: round trip, and throughput when `rate`.
    pub async fn time_link(&self, rate: bool, wait: Duration) -> Result<LinkTiming, NetError> {
        probe::time_link(&mut *self.control.lock().await, rate, wait).await
    }

    /// The node's link to the node at `addr` (round trip, and throughput
    /// when `rate`), as the node measures it.
    pub async fn probe_peer(&self, addr: &str, rate: bool, wait: Duration) -> Result<LinkTiming, NetError> {
        match self.request(Frame::new(Message::ProbePeer { addr: addr.to_string(), rate }), wait).await?.message {
            Message::PeerProbed(t) => Ok(t),
            other => Err(NetError::Unexpected { got: other.kind(), expected: "PeerProbed" }),
        }
    }

    pub fn is_closed(&self) -> bool {
        self.conn.close_reason().is_some()
    }
}

impl Drop for NodeClient {
    /// The event reader's task holds the connection open; a client that is
    /// gone closes it, so the node frees its side now, not at the idle timeout.
    fn drop(&mut self) {
        // Detached first: its steps belong to a pipeline that replaced it,
        // which must not hear of this connection's end.
        *self.sink.lock().expect("sink lock") = Sink::default();
        self.conn.close(0u32.into(), b"client closed");
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Ping {
    pub rtt: Duration,
    pub sessions: u32,
    /// Total compute time of the node so far.
    pub busy: Duration,
    /// Positions computed so far, and the batches they ran in.
    pub tokens: u64,
    pub batches: u64,
}
