//! The head's connection to one node: the authenticated QUIC connection, its
//! control stream (request/response), and its event stream (results and
//! errors), which completes whatever pipeline the node currently serves.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::net::auth::{client_handshake, ClusterKey};
use crate::net::connection::{split, Control, FrameWriter};
use crate::net::frame::{split_results, Frame};
use crate::net::message::{Capabilities, Message, PeerRole, StepResult, StreamPurpose};
use crate::net::probe::{self, LinkTiming};
use crate::net::resolve_addr;
use crate::net::{timeout, tls, NetError};

/// What waits for the chain's results: steps by id, each with its
/// session; and rings by session, whose results stream to the engine
/// reading them as they come.
#[derive(Default)]
pub struct Waiting {
    steps: HashMap<u64, (u64, oneshot::Sender<Result<StepResult, NetError>>)>,
    rings: HashMap<u64, RingWait>,
    /// Halts sent, by session, until the last stage answers.
    halts: HashMap<u64, oneshot::Sender<()>>,
}

/// What a ring's engine hears.
pub enum RingEvent {
    /// A step's outcome, and when it arrived.
    Result(Instant, Result<StepResult, NetError>),
    /// The ring is over for a stage replacement: every result it
    /// computed came before.
    Halted,
}

pub type RingResults = mpsc::Receiver<RingEvent>;

struct RingWait {
    steps: Range<u64>,
    tx: mpsc::Sender<RingEvent>,
}

pub type Pending = Arc<Mutex<Waiting>>;

impl Waiting {
    /// Waits for step `step` of `session`.
    pub fn step(&mut self, step: u64, session: u64) -> oneshot::Receiver<Result<StepResult, NetError>> {
        let (tx, rx) = oneshot::channel();
        self.steps.insert(step, (session, tx));
        rx
    }

    pub fn forget_step(&mut self, step: u64) {
        self.steps.remove(&step);
    }

    /// Streams the results of `session`'s ring, which feeds back the steps
    /// `steps`: room for as many as the ring may take and its halt, so the
    /// queue never refuses one.
    pub fn ring(&mut self, session: u64, steps: Range<u64>) -> RingResults {
        let n = (steps.end - steps.start + 1) as usize;
        let (tx, rx) = mpsc::channel(n);
        self.rings.insert(session, RingWait { steps, tx });
        rx
    }

    /// Stops queueing the results of `session`'s ring whose first step is
    /// `first` (not a later ring of the session's).
    pub fn forget_ring(&mut self, session: u64, first: u64) {
        if self.rings.get(&session).is_some_and(|r| r.steps.start == first) {
            self.rings.remove(&session);
        }
    }

    /// Hands step `step`'s outcome to whoever waits for it, if anyone.
    fn complete(&mut self, step: u64, session: Option<u64>, outcome: Result<StepResult, NetError>) {
        if let Some((_, tx)) = self.steps.remove(&step) {
            let _ = tx.send(outcome);
            return;
        }
        let Some(session) = session else { return };
        if let Some(ring) = self.rings.get(&session).filter(|r| r.steps.contains(&step)) {
            if ring.tx.try_send(RingEvent::Result(Instant::now(), outcome)).is_err() {
                // The engine left the ring: nobody reads its results.
                self.rings.remove(&session);
            }
        }
    }

    /// Fails a session's waiting steps and ring (all sessions' when `None`).
    fn fail_session(&mut self, session: Option<u64>, error: &NetError) {
        let steps: Vec<u64> = self.steps.iter().filter(|(_, (s, _))| session.is_none_or(|x| *s == x)).map(|(k, _)| *k).collect();
        for step in steps {
            self.complete(step, None, Err(error.clone()));
        }
        let rings: Vec<u64> = self.rings.keys().copied().filter(|s| session.is_none_or(|x| *s == x)).collect();
        for s in rings {
            self.end_ring(s, RingEvent::Result(Instant::now(), Err(error.clone())));
        }
    }

    /// Waits for the last stage's answer to a `Halt` of `session`.
    pub fn halt(&mut self, session: u64) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.halts.insert(session, tx);
        rx
    }

    /// The sessions whose rings the head reads now.
    pub fn rings_open(&self) -> Vec<u64> {
        self.rings.keys().copied().collect()
    }

    /// Stops reading `session`'s ring, telling its engine.
    pub fn halt_ring(&mut self, session: u64) {
        self.end_ring(session, RingEvent::Halted);
    }

    /// Stops reading `session`'s ring, with `last` the engine's last word of it.
    fn end_ring(&mut self, session: u64, last: RingEvent) {
        if let Some(ring) = self.rings.remove(&session) {
            let _ = ring.tx.try_send(last);
        }
    }

    /// The last stage answered a `Halt` of `session`: every result of its
    /// ring came before. If a replacement waits for the answer, the ring's
    /// engine stops reading it now (a `Halt` of the engine's own is not
    /// waited for, and the engine left that ring already).
    fn halted(&mut self, session: u64) {
        if let Some(tx) = self.halts.remove(&session) {
            let _ = tx.send(());
            self.halt_ring(session);
        }
    }
}

/// Fails waiting steps: the one named, else all of a session (its ring's
/// too), else all.
pub fn fail(pending: &Pending, session: Option<u64>, step: Option<u64>, error: &NetError) {
    let mut p = pending.lock().expect("pending lock");
    match step {
        Some(step) => p.complete(step, session, Err(error.clone())),
        None => p.fail_session(session, error),
    }
}

fn dispatch(pending: &Pending, frame: Frame) {
    match frame.message {
        Message::Result(r) => {
            let (step, session) = (r.step, r.session);
            pending.lock().expect("pending lock").complete(step, Some(session), r.with_payload(&frame.payload));
        }
        Message::Results(results) => {
            let steps: Vec<(u64, u64)> = results.iter().map(|r| (r.step, r.session)).collect();
            let mut p = pending.lock().expect("pending lock");
            match split_results(results, &frame.payload) {
                Ok(results) => {
                    for r in results {
                        let (step, session) = (r.step, r.session);
                        p.complete(step, Some(session), Ok(r));
                    }
                }
                // A frame that does not add up fails the steps it names.
                Err(e) => {
                    for (step, session) in steps {
                        p.complete(step, Some(session), Err(e.clone()));
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
        Message::Halted { session } => pending.lock().expect("pending lock").halted(session),
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
