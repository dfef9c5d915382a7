//! The stage worker: one OS thread that owns the loaded slice and every
//! session's KV cache, and runs forward passes in arrival order.
//!
//! Compute is blocking and uses the whole thread pool, so one worker per
//! node; different stages of a chain work on different sessions at once.
//! Owning the caches on this one thread means no lock is taken on the data
//! path.
//!
//! Continuous batching: the forward steps waiting in the queue when the
//! worker looks (decode tokens of some sessions, a prefill chunk of another)
//! run as one batch, so the weights are read once for all of them; sessions
//! join and leave between steps. A batch holds one step per session (a
//! session's next chunk waits for its previous one) and at most
//! `MAX_BATCH_ROWS` rows, and steps keep their arrival order, so neither
//! prefill nor decode starves the other.

use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};

use super::batch::{self, Arrivals};
use crate::model::sampling::sample_constrained;
use crate::model::{BatchItem, HostInput, KvCache, ModelSlice, SliceOutput};
use crate::net::frame::{results_frames, Frame};
use crate::net::message::{
    forwards_frame, ErrorCode, ForwardHeader, ForwardInput, KvStateHeader, LoadedSlice, Message, RemoteError, StageStep, StepResult,
};
use crate::net::tensor::{self, WireDType};
use crate::net::{kv, NetError};

/// Rows (tokens) one batch may hold: a prefill chunk plus many decode steps.
pub const MAX_BATCH_ROWS: usize = 512;

/// Work items waiting for the worker; a full queue stops the data stream's
/// reader, so QUIC's flow control holds the sender back.
pub const WORK_QUEUE: usize = 256;

/// Frames waiting for the link to the next stage.
pub const NEXT_QUEUE: usize = 64;

/// How long the last stage may hold a ring's results while it has other
/// work queued, to send them in one frame: the head then wakes once per
/// frame instead of once per token (on a one-stage chain, whose stage feeds
/// itself, every token), and streams tokens at least every 10 ms.
const RESULTS_HOLD: Duration = Duration::from_millis(10);

/// Events waiting for one head; a head that reads none of 1,024 is dropped
/// (its event stream ends, and it fails its steps) rather than holding the
/// node's memory.
pub const HEAD_QUEUE: usize = 1024;

/// What the node admits: sessions, the KV memory they may hold, and how
/// long an untouched one lives.
#[derive(Debug, Clone, Copy)]
pub struct Admission {
    pub max_sessions: usize,
    pub kv_bytes: u64,
    /// Sessions untouched this long are freed (a head that vanished mid-request).
    pub idle: Duration,
    /// Fault injection for tests: a step of this session panics inside the
    /// worker, as a bug would (`sollol node --panic-on-session`, hidden).
    pub panic_on_session: Option<u64>,
}

impl Default for Admission {
    fn default() -> Self {
        Self { max_sessions: 256, kv_bytes: u64::MAX, idle: Duration::from_secs(600), panic_on_session: None }
    }
}

pub struct LoadedModel {
    pub slice: ModelSlice,
    pub info: LoadedSlice,
}

/// Why a step or request failed, as the wire reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub code: ErrorCode,
    pub message: String,
}

impl Fault {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    fn no_model() -> Self {
        Fault::new(ErrorCode::NoModel, "this node has no model loaded")
    }
}

impl From<crate::Error> for Fault {
    fn from(e: crate::Error) -> Self {
        use crate::Error as E;
        let code = match &e {
            E::ContextOverflow { .. } | E::InvalidRequest(_) => ErrorCode::Invalid,
            E::Net(n) => return net_fault(n),
            _ => ErrorCode::Failed,
        };
        Fault::new(code, e.to_string())
    }
}

impl From<NetError> for Fault {
    fn from(e: NetError) -> Self {
        net_fault(&e)
    }
}

fn net_fault(e: &NetError) -> Fault {
    let code = match e {
        NetError::Remote(r) => r.code,
        NetError::Decode(_) | NetError::TooLarge { .. } | NetError::Truncated | NetError::Version { .. } => ErrorCode::Malformed,
        _ => ErrorCode::Failed,
    };
    Fault::new(code, e.to_string())
}

// Forward steps are nearly all the queue holds: boxing them would allocate
// per step for the sake of the rare other kinds.
#[allow(clippy::large_enum_variant)]
pub enum Work {
    Forward {
        header: ForwardHeader,
        payload: Vec<u8>,
        /// When the node read it (what `batch::Arrivals` learns trips from).
        arrived: Instant,
    },
    Close {
        session: u64,
    },
    /// Take no more of the session's fed-back steps (`Message::Halt`).
    Halt {
        session: u64,
    },
    /// Replace the loaded slice (None unloads) and the KV memory sessions
    /// may hold; every session is dropped.
    Install {
        model: Option<Box<LoadedModel>>,
        kv_bytes: u64,
        done: oneshot::Sender<()>,
    },
    ExportKv {
        session: u64,
        dtype: WireDType,
        reply: oneshot::Sender<Result<Frame, Fault>>,
    },
    ImportKv {
        header: KvStateHeader,
        payload: Vec<u8>,
        reply: oneshot::Sender<Result<(), Fault>>,
    },
    /// Frees idle sessions (sent by a timer, so an idle worker sweeps too).
    Sweep,
}

/// Where the worker's output goes, shared with the network side.
pub struct Outputs {
    /// This node's name in error messages (its listen address).
    pub node: String,
    /// Frames for the next stage's data stream (set by Link).
    pub next: Mutex<Option<mpsc::Sender<Frame>>>,
    /// Where a ring's steps go back in (set by Link, on the last stage).
    pub ring: Mutex<Option<RingOut>>,
    /// Event streams of connected heads: results and errors go to all of them;
    /// session ids are random, each head keeps its own.
    pub heads: Mutex<Vec<mpsc::Sender<Frame>>>,
    pub wire: Mutex<WireDType>,
    pub sessions: AtomicU32,
    /// KV memory the sessions hold.
    pub kv_bytes: AtomicU64,
    pub busy_nanos: AtomicU64,
    /// Positions computed and the batches they ran in.
    pub tokens: AtomicU64,
    pub batches: AtomicU64,
    /// False once the worker thread has stopped: the node then answers
    /// pings with an error, so health checks fail and failover starts.
    pub worker_alive: AtomicBool,
}

impl Outputs {
    pub fn new(node: String) -> Self {
        Self {
            node,
            next: Mutex::new(None),
            ring: Mutex::new(None),
            heads: Mutex::new(Vec::new()),
            wire: Mutex::new(WireDType::F16),
            sessions: AtomicU32::new(0),
            kv_bytes: AtomicU64::new(0),
            busy_nanos: AtomicU64::new(0),
            tokens: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            worker_alive: AtomicBool::new(true),
        }
    }

    /// A new head's event queue.
    pub fn subscribe(&self) -> mpsc::Receiver<Frame> {
        let (tx, rx) = mpsc::channel(HEAD_QUEUE);
        self.heads.lock().expect("heads lock").push(tx);
        rx
    }

    pub fn to_heads(&self, frame: Frame) {
        let mut heads = self.heads.lock().expect("heads lock");
        heads.retain(|h| match h.try_send(frame.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                tracing::warn!(node = %self.node, "dropped a head that reads none of its {HEAD_QUEUE} waiting events");
                false
            }
            Err(TrySendError::Closed(_)) => false,
        });
    }

    pub fn error(&self, session: Option<u64>, step: Option<u64>, fault: Fault) {
        tracing::warn!(node = %self.node, ?session, code = ?fault.code, "{}", fault.message);
        let e = RemoteError { session, step, node: self.node.clone(), code: fault.code, message: fault.message };
        self.to_heads(Frame::new(Message::Error(e)));
    }

    /// Sends a frame down the chain, waiting while the link's queue is full
    /// (backpressure from a slower next stage). Called from the worker thread.
    fn to_next(&self, frame: Frame) -> Result<(), Fault> {
        let next = self.next.lock().expect("next lock").clone();
        match next {
            Some(tx) => tx.blocking_send(frame).map_err(|_| Fault::new(ErrorCode::Failed, "the link to the next stage is down")),
            None => Err(Fault::new(ErrorCode::Failed, "no next stage is linked to this one")),
        }
    }
}

/// Where the last stage sends the steps a ring feeds back.
pub enum RingOut {
    /// The first stage's data stream.
    Link(mpsc::Sender<Frame>),
    /// This worker's own queue: the chain has one stage.
    Itself,
}

pub fn spawn_worker(
    outputs: Arc<Outputs>,
    compute_lock: Option<std::fs::File>,
    admission: Admission,
) -> std::io::Result<mpsc::Sender<Work>> {
    let (tx, rx) = mpsc::channel(WORK_QUEUE);
    std::thread::Builder::new().name("sollol-stage".into()).spawn(move || {
        let (looped, held) = (Vec::new(), Vec::new());
        Worker { model: None, sessions: HashMap::new(), out: outputs, compute_lock, admission, looped, held, held_since: None }.run(rx)
    })?;
    Ok(tx)
}

struct Session {
    cache: KvCache,
    used: Instant,
    /// On the first stage: the ring whose fed-back steps it takes (the one
    /// the head's latest step began), if any.
    ring: Option<u64>,
}

struct Worker {
    model: Option<Box<LoadedModel>>,
    sessions: HashMap<u64, Session>,
    out: Arc<Outputs>,
    compute_lock: Option<std::fs::File>,
    admission: Admission,
    /// Steps a ring fed back to this same stage (a chain of one), for the queue.
    looped: Vec<ForwardHeader>,
    /// Results of rings that go on, held (`RESULTS_HOLD`), and since when.
    held: Vec<StepResult>,
    held_since: Option<Instant>,
}

/// Marks the worker stopped however its thread ends.
struct AliveGuard(Arc<Outputs>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.worker_alive.store(false, Ordering::Release);
    }
}

/// A step's input, decoded.
enum StepInput {
    Tokens(Vec<u32>),
    /// Hidden states for the candle backend.
    Hidden(Tensor),
    /// Hidden states for the host backend: `rows` rows, decoded from the
    /// payload straight into the f32 values the kernels read.
    Rows {
        values: Vec<f32>,
        rows: usize,
    },
}

impl StepInput {
    fn rows(&self) -> usize {
        match self {
            StepInput::Tokens(ids) => ids.len(),
            StepInput::Hidden(t) => t.dims().get(1).copied().unwrap_or(0),
            StepInput::Rows { rows, .. } => *rows,
        }
    }
}

/// The host path over several sessions at once; the caches leave the map for
/// the call and always come back.
fn run_batch(
    slice: &ModelSlice,
    sessions: &mut HashMap<u64, Session>,
    steps: &[&(ForwardHeader, StepInput)],
) -> crate::Result<Vec<SliceOutput>> {
    let mut taken: Vec<(u64, Session)> = Vec::with_capacity(steps.len());
    for (h, _) in steps.iter().copied() {
        match sessions.remove(&h.session) {
            Some(s) => taken.push((h.session, s)),
            None => break,
        }
    }
    let result = if taken.len() == steps.len() {
        let items: Option<Vec<BatchItem<'_>>> = steps
            .iter()
            .zip(taken.iter_mut())
            .map(|((_, input), (_, session))| {
                let input = match input {
                    StepInput::Tokens(ids) => HostInput::Tokens(ids),
                    StepInput::Rows { values, .. } => HostInput::Hidden(values),
                    StepInput::Hidden(_) => return None,
                };
                Some(BatchItem { input, cache: &mut session.cache })
            })
            .collect();
        match items {
            Some(mut items) => slice.forward_batch(&mut items),
            None => Err(crate::Error::InvalidRequest("a candle input given to the host backend".into())),
        }
    } else {
        Err(crate::Error::InvalidRequest("a session is missing".into()))
    };
    for (id, session) in taken {
        sessions.insert(id, session);
    }
    result
}

/// Queues `work`, noting when a step arrived.
fn enqueue(arrivals: &mut Arrivals, queue: &mut VecDeque<Work>, work: Work) {
    if let Work::Forward { header, arrived, .. } = &work {
        arrivals.arrived(header, *arrived);
    }
    queue.push_back(work);
}

/// A panic's message, for the error frame that reports it.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let what = panic.downcast_ref::<&str>().copied().or_else(|| panic.downcast_ref::<String>().map(String::as_str));
    format!("the stage failed this step (a bug: {}); the node goes on", what.unwrap_or("a panic"))
}

impl Worker {
    fn run(mut self, mut rx: mpsc::Receiver<Work>) {
        let _alive = AliveGuard(self.out.clone());
        let mut queue: VecDeque<Work> = VecDeque::new();
        let mut arrivals = Arrivals::default();
        loop {
            if queue.is_empty() {
                let work = match rx.try_recv() {
                    Ok(work) => work,
                    Err(_) => {
                        // Nothing to do until a frame arrives, a hop away at
                        // least: the results go out, and the compute threads
                        // give their cores back now.
                        self.send_held();
                        crate::kernels::pool::rest();
                        match rx.blocking_recv() {
                            Some(work) => work,
                            None => return,
                        }
                    }
                };
                enqueue(&mut arrivals, &mut queue, work);
            }
            // Bounded like the channel: what does not fit waits there, and
            // the data streams' readers wait behind it.
            while queue.len() < WORK_QUEUE {
                let Ok(work) = rx.try_recv() else { break };
                enqueue(&mut arrivals, &mut queue, work);
            }
            if self.held_since.is_some_and(|t| t.elapsed() >= RESULTS_HOLD) {
                self.send_held();
            }
            let batch = match self.gather(&mut rx, &mut queue, &mut arrivals) {
                Some(micro_batch) => batch::take_batch(&mut queue, micro_batch),
                None => Vec::new(),
            };
            if !batch.is_empty() {
                // Steps a panic interrupts fail with an error frame; their
                // sessions are dropped (their caches may be half written).
                let steps: Vec<(u64, u64)> = batch.iter().map(|(h, _)| (h.session, h.step)).collect();
                if let Err(panic) = catch_unwind(AssertUnwindSafe(|| self.forward_batch(batch))) {
                    let message = panic_message(&*panic);
                    for (session, step) in steps {
                        self.fail(session, step, Fault::new(ErrorCode::Internal, message.clone()));
                    }
                }
                let arrived = Instant::now();
                for header in self.looped.drain(..) {
                    enqueue(&mut arrivals, &mut queue, Work::Forward { header, payload: Vec::new(), arrived });
                }
            } else if let Some(work) = queue.pop_front() {
                // A panicking request drops its reply channel: the control
                // stream answers with an error.
                if let Err(panic) = catch_unwind(AssertUnwindSafe(|| self.handle(work))) {
                    tracing::error!(node = %self.out.node, "{}", panic_message(&*panic));
                }
            }
            self.sweep();
            arrivals.retain(|s| self.sessions.contains_key(&s));
        }
    }

    /// The micro-batch to step next (`batch::next_micro_batch`): one whose
    /// due sessions are all here, or the front step's once its wait is
    /// over, queueing whatever arrives meanwhile. `None` when no step is at
    /// the front of the queue.
    fn gather(&self, rx: &mut mpsc::Receiver<Work>, queue: &mut VecDeque<Work>, arrivals: &mut Arrivals) -> Option<u8> {
        let mut deadline = None;
        loop {
            let now = Instant::now();
            let (micro_batch, until) = batch::next_micro_batch(arrivals, queue, now, |s| self.sessions.contains_key(&s))?;
            let Some(until) = until else { return Some(micro_batch) };
            // The wait is set when it starts: sessions that fall due later do not stretch it.
            if now >= *deadline.get_or_insert(until) || queue.len() >= WORK_QUEUE {
                return Some(micro_batch);
            }
            match rx.try_recv() {
                Ok(work) => enqueue(arrivals, queue, work),
                Err(mpsc::error::TryRecvError::Empty) => std::thread::sleep(Duration::from_micros(20)),
                Err(mpsc::error::TryRecvError::Disconnected) => return Some(micro_batch),
            }
        }
    }

    /// Frees idle sessions and publishes the counts.
    fn sweep(&mut self) {
        let before = self.sessions.len();
        let idle = self.admission.idle;
        self.sessions.retain(|_, s| s.used.elapsed() < idle);
        if self.sessions.len() != before {
            tracing::info!("freed {} idle sessions", before - self.sessions.len());
        }
        self.out.sessions.store(self.sessions.len() as u32, Ordering::Relaxed);
        self.out.kv_bytes.store(self.kv_bytes(), Ordering::Relaxed);
    }

    fn kv_bytes(&self) -> u64 {
        self.sessions.values().map(|s| s.cache.bytes()).sum()
    }

    fn handle(&mut self, work: Work) {
        match work {
            Work::Forward { header, payload, .. } => self.forward_batch(vec![(header, payload)]),
            Work::Close { session } => {
                self.sessions.remove(&session);
                // Later stages hold the session too; pass the close on (the last stage has no next).
                let _ = self.out.to_next(Frame::new(Message::Close { session }));
            }
            Work::Halt { session } => {
                // What the ring computed before its halt goes out before the answer.
                self.send_held();
                let first = self.model.as_ref().is_some_and(|m| m.slice.is_first());
                if let Some(s) = self.sessions.get_mut(&session).filter(|_| first) {
                    s.ring = None;
                }
                // Behind the ring's steps down the chain, then back to the heads.
                if self.model.as_ref().is_some_and(|m| m.slice.is_last()) {
                    self.out.to_heads(Frame::new(Message::Halted { session }));
                } else {
                    let _ = self.out.to_next(Frame::new(Message::Halt { session }));
                }
            }
            Work::Install { model, kv_bytes, done } => {
                self.sessions.clear();
                self.model = model;
                self.admission.kv_bytes = kv_bytes;
                let _ = done.send(());
            }
            Work::ExportKv { session, dtype, reply } => {
                let _ = reply.send(self.export(session, dtype));
            }
            Work::ImportKv { header, payload, reply } => {
                let _ = reply.send(self.import(header, &payload));
            }
            Work::Sweep => {}
        }
    }

    /// Runs forward steps of distinct sessions as one batch (each alone on
    /// the candle backend, or when the batch as a whole is refused, so one
    /// bad step fails only its own session) and sends each result on.
    fn forward_batch(&mut self, batch: Vec<(ForwardHeader, Vec<u8>)>) {
        if let Some(lock) = &self.compute_lock {
            // A failed lock only costs speed: compute anyway.
            let _ = lock.lock();
        }
        let started = Instant::now();
        let mut ready = Vec::with_capacity(batch.len());
        let last = self.model.as_ref().is_some_and(|m| m.slice.is_last());
        for (h, payload) in batch {
            if h.fed_back() && !self.takes_fed_back(&h) {
                // A ring the head has left (its next step, a halt, a close)
                // or a session gone: nobody waits for this step.
                tracing::debug!(session = h.session, step = h.step, "dropped a step of a ring that ended");
                continue;
            }
            match self.prepare(&h, &payload) {
                // An embedding step ends here, pooled, on its own.
                Ok(input) if last && h.pool.is_some() => {
                    let pooled = self.pool(&h, &input);
                    self.emit_pooled(h, pooled);
                }
                Ok(input) => ready.push((h, input)),
                Err(fault) => self.fail(h.session, h.step, fault),
            }
        }
        let results = self.compute(&ready);
        let nanos = started.elapsed().as_nanos() as u64;
        if let Some(lock) = &self.compute_lock {
            let _ = lock.unlock();
        }
        self.out.busy_nanos.fetch_add(nanos, Ordering::Relaxed);
        let computed: usize = ready.iter().zip(&results).filter(|(_, r)| r.is_ok()).map(|((_, input), _)| input.rows()).sum();
        self.out.tokens.fetch_add(computed as u64, Ordering::Relaxed);
        self.out.batches.fetch_add(u64::from(!ready.is_empty()), Ordering::Relaxed);
        let batch = StageStep { nanos, rows: ready.iter().map(|(_, input)| input.rows() as u32).sum() };
        let mut sampled = Vec::new();
        let onward: Vec<_> =
            ready.into_iter().zip(results).filter_map(|((h, _), result)| self.emit(h, result, batch, &mut sampled)).collect();
        self.send_on(onward);
        // The ring's next steps first: they are on the tokens' path, the
        // results only on the head's.
        // A result whose ring goes on may wait for others; any other sends
        // them all.
        let mut fed = Vec::new();
        let mut ended = false;
        for (result, next) in sampled {
            match next {
                Some(next) => fed.push(next),
                None => ended = true,
            }
            self.held.push(result);
        }
        self.feed_back(fed);
        if ended {
            self.send_held();
        } else if !self.held.is_empty() {
            self.held_since.get_or_insert_with(Instant::now);
        }
    }

    /// Sends the held results to the heads, in as few frames as fit.
    fn send_held(&mut self) {
        self.held_since = None;
        if self.held.is_empty() {
            return;
        }
        for frame in results_frames(std::mem::take(&mut self.held)) {
            self.out.to_heads(frame);
        }
    }

    /// Whether a stage takes a step a ring fed back: not for a session it
    /// no longer holds (closed, or moving with a stage replacement: nobody
    /// waits for the step, and failing it would close the session), and
    /// on the first stage only while that ring is the one the head's latest
    /// step began.
    fn takes_fed_back(&self, h: &ForwardHeader) -> bool {
        let first = self.model.as_ref().is_some_and(|m| m.slice.is_first());
        self.sessions.get(&h.session).is_some_and(|s| !first || (s.ring.is_some() && s.ring == h.ring.as_ref().map(|r| r.id)))
    }

    /// Sends the steps a ring feeds back to the first stage, in one frame;
    /// if there is no way there, each fails (its session's head hears).
    fn feed_back(&mut self, fed: Vec<ForwardHeader>) {
        if fed.is_empty() {
            return;
        }
        let ring = self.out.ring.lock().expect("ring lock").as_ref().map(|r| match r {
            RingOut::Link(tx) => Some(tx.clone()),
            RingOut::Itself => None,
        });
        let sent = match ring {
            Some(None) => {
                self.looped.extend(fed);
                return;
            }
            Some(Some(tx)) => {
                let ids: Vec<(u64, u64)> = fed.iter().map(|h| (h.session, h.step)).collect();
                let frame = forwards_frame(fed.into_iter().map(|h| (h, Vec::new())).collect());
                tx.blocking_send(frame).map_err(|_| (ids, "the link to the first stage is down"))
            }
            None => Err((fed.iter().map(|h| (h.session, h.step)).collect(), "no first stage is linked to this one for a ring")),
        };
        if let Err((ids, why)) = sent {
            for (session, step) in ids {
                self.fail(session, step, Fault::new(ErrorCode::Failed, why));
            }
        }
    }

    /// Refuses a step when the node is at a limit: a new session past the
    /// count, or KV memory the step (`rows` positions of `session`, opened
    /// with room for `open`) would grow past the budget.
    fn admit(&self, session: u64, open: Option<u32>, rows: usize, slice: &ModelSlice) -> Result<(), Fault> {
        let held = self.kv_bytes();
        let existing = self.sessions.get(&session);
        let (grows, frees) = match (existing, open) {
            (Some(s), None) => (s.cache.bytes_after(rows).saturating_sub(s.cache.bytes()), 0),
            // A session reopened under the same id frees what it held.
            (_, Some(capacity)) => (slice.new_cache_bytes(capacity as usize, rows), existing.map_or(0, |s| s.cache.bytes())),
            (None, None) => return Ok(()),
        };
        if existing.is_none() && self.sessions.len() >= self.admission.max_sessions {
            return Err(Fault::new(
                ErrorCode::Capacity,
                format!("this node holds its limit of {} sessions; try again later", self.admission.max_sessions),
            ));
        }
        if held.saturating_sub(frees).saturating_add(grows) > self.admission.kv_bytes {
            return Err(Fault::new(
                ErrorCode::Capacity,
                format!(
                    "the KV memory of this node is full ({} of {} held); try again later",
                    crate::sys::human_bytes(held),
                    crate::sys::human_bytes(self.admission.kv_bytes)
                ),
            ));
        }
        Ok(())
    }

    /// Opens or finds the step's session and decodes its input.
    fn prepare(&mut self, h: &ForwardHeader, payload: &[u8]) -> Result<StepInput, Fault> {
        if self.admission.panic_on_session == Some(h.session) {
            panic!("injected fault for session {}", h.session);
        }
        let model = self.model.as_ref().ok_or_else(Fault::no_model)?;
        let slice = &model.slice;
        let input = match &h.input {
            ForwardInput::Tokens(ids) => {
                if !slice.is_first() {
                    return Err(Fault::new(
                        ErrorCode::Invalid,
                        format!("token ids sent to a stage holding blocks {:?}; only the first stage embeds", slice.layers()),
                    ));
                }
                StepInput::Tokens(ids.clone())
            }
            ForwardInput::Hidden(th) if slice.backend().batches() => {
                let values = tensor::decode_f32(th, payload)?;
                let hidden = slice.config().hidden_size;
                if values.len() % hidden != 0 {
                    return Err(Fault::new(ErrorCode::Invalid, format!("hidden states of shape {:?} are not rows of {hidden}", th.shape)));
                }
                StepInput::Rows { rows: values.len() / hidden, values }
            }
            ForwardInput::Hidden(th) => StepInput::Hidden(tensor::decode(th, payload, slice.device())?),
        };
        self.admit(h.session, h.open, input.rows(), slice)?;
        if let Some(capacity) = h.open {
            let cache = slice.new_cache(capacity as usize)?;
            self.sessions.insert(h.session, Session { cache, used: Instant::now(), ring: None });
        }
        let session = self.sessions.get_mut(&h.session).ok_or_else(|| {
            Fault::new(ErrorCode::UnknownSession, format!("unknown session {} (expired, closed, or opened on another node)", h.session))
        })?;
        session.used = Instant::now();
        if !h.fed_back() {
            // The head's own step: the ring it begins, if any, is the only
            // one whose steps this session takes from now on.
            session.ring = h.ring.as_ref().map(|r| r.id);
        }
        if let Some(keep) = h.truncate {
            session.cache.truncate(keep as usize);
        }
        Ok(input)
    }

    /// One result per step, in order.
    fn compute(&mut self, steps: &[(ForwardHeader, StepInput)]) -> Vec<Result<SliceOutput, Fault>> {
        let Some(model) = self.model.as_ref() else {
            return steps.iter().map(|_| Err(Fault::no_model())).collect();
        };
        let slice = &model.slice;
        if steps.is_empty() {
            return Vec::new();
        }
        if slice.backend().batches() {
            // All together; when the batch as a whole is refused, each step
            // alone, so a bad one fails only its own session.
            let all: Vec<_> = steps.iter().collect();
            if let Ok(outputs) = run_batch(slice, &mut self.sessions, &all) {
                return outputs.into_iter().map(Ok).collect();
            }
            return steps
                .iter()
                .map(|step| {
                    let output = run_batch(slice, &mut self.sessions, &[step])?.pop();
                    output.ok_or_else(|| Fault::new(ErrorCode::Internal, "the slice gave no output for a step"))
                })
                .collect();
        }
        steps
            .iter()
            .map(|(h, input)| {
                let session = self.sessions.get_mut(&h.session).ok_or_else(|| Fault::new(ErrorCode::UnknownSession, "session closed"))?;
                let x = match input {
                    StepInput::Tokens(ids) => {
                        Tensor::new(ids.as_slice(), slice.device()).and_then(|t| t.unsqueeze(0)).map_err(crate::Error::from)?
                    }
                    StepInput::Hidden(t) => t.clone(),
                    StepInput::Rows { .. } => return Err(Fault::new(ErrorCode::Internal, "host rows given to the candle backend")),
                };
                Ok(slice.forward(&x, &mut session.cache)?)
            })
            .collect()
    }

    /// An embedding step on the last slice: its input's final hidden
    /// states, normed and pooled.
    fn pool(&mut self, h: &ForwardHeader, input: &StepInput) -> Result<Vec<f32>, Fault> {
        let model = self.model.as_ref().ok_or_else(Fault::no_model)?;
        let pooling = h.pool.ok_or_else(|| Fault::new(ErrorCode::Internal, "a step without pooling pooled"))?;
        let session = self.sessions.get_mut(&h.session).ok_or_else(|| Fault::new(ErrorCode::UnknownSession, "session closed"))?;
        let input = match input {
            StepInput::Tokens(ids) => HostInput::Tokens(ids),
            StepInput::Rows { values, .. } => HostInput::Hidden(values),
            StepInput::Hidden(_) => return Err(Fault::new(ErrorCode::Invalid, "embeddings run on the CPU backend only")),
        };
        let mut pooled = model.slice.pool_batch(&mut [BatchItem { input, cache: &mut session.cache }], pooling)?;
        pooled.pop().ok_or_else(|| Fault::new(ErrorCode::Internal, "the slice pooled nothing"))
    }

    fn emit_pooled(&mut self, h: ForwardHeader, pooled: Result<Vec<f32>, Fault>) {
        match pooled {
            Ok(v) => {
                let result = StepResult {
                    session: h.session,
                    step: h.step,
                    token: None,
                    logprobs: None,
                    logits: None,
                    logits_len: None,
                    pooled: Some(v),
                    stage_steps: h.stage_steps.clone(),
                    f16_fallbacks: h.f16_fallbacks,
                    hop_bytes: h.hop_bytes.clone(),
                };
                self.out.to_heads(result.into_frame());
            }
            Err(fault) => self.fail(h.session, h.step, fault),
        }
    }

    /// A step's output: hidden states for the next stage (returned) or a
    /// sampled token for the heads (added to `sampled`, with the step its
    /// ring feeds back, if any), each to go with the batch's others in one
    /// frame; an error closes the session down the chain.
    fn emit(
        &mut self,
        mut h: ForwardHeader,
        result: Result<SliceOutput, Fault>,
        batch: StageStep,
        sampled: &mut Vec<(StepResult, Option<ForwardHeader>)>,
    ) -> Option<(ForwardHeader, Vec<u8>)> {
        h.stage_steps.push(batch);
        let fault = match result {
            Ok(SliceOutput::Hidden(hidden)) => {
                let wire = *self.out.wire.lock().expect("wire lock");
                match tensor::encode(&hidden, wire) {
                    Ok((th, bytes, overflow)) => {
                        h.f16_fallbacks += u32::from(overflow);
                        h.hop_bytes.push(bytes.len() as u64);
                        h.input = ForwardInput::Hidden(th);
                        return Some((h, bytes));
                    }
                    Err(e) => e.into(),
                }
            }
            Ok(SliceOutput::Logits(logits)) => {
                let token = h
                    .sample
                    .as_ref()
                    .map(|s| sample_constrained(&logits, &s.params, &s.recent, s.draw, s.logprobs.map(usize::from), s.allowed.as_deref()));
                let next = h.ring.as_ref().zip(token.as_ref()).and_then(|(ring, t)| ring.next_step(&h, t.0));
                let result = StepResult {
                    session: h.session,
                    step: h.step,
                    token: token.as_ref().map(|s| s.0),
                    logprobs: token.and_then(|s| s.1),
                    logits: h.want_logits.then_some(logits),
                    logits_len: None,
                    pooled: None,
                    stage_steps: h.stage_steps,
                    f16_fallbacks: h.f16_fallbacks,
                    hop_bytes: h.hop_bytes,
                };
                sampled.push((result, next));
                return None;
            }
            Err(fault) => fault,
        };
        self.fail(h.session, h.step, fault);
        None
    }

    /// Sends a batch's hidden states to the next stage in one frame; if the
    /// link is down, each of those steps fails.
    fn send_on(&mut self, steps: Vec<(ForwardHeader, Vec<u8>)>) {
        if steps.is_empty() {
            return;
        }
        let ids: Vec<(u64, u64)> = steps.iter().map(|(h, _)| (h.session, h.step)).collect();
        if let Err(fault) = self.out.to_next(forwards_frame(steps)) {
            for (session, step) in ids {
                self.fail(session, step, fault.clone());
            }
        }
    }

    /// Fails a step: its session is dropped here and down the chain, and
    /// the heads hear why.
    fn fail(&mut self, session: u64, step: u64, fault: Fault) {
        // Results held before it go first: the head reads a session's in order.
        self.send_held();
        self.sessions.remove(&session);
        self.out.error(Some(session), Some(step), fault);
        let _ = self.out.to_next(Frame::new(Message::Close { session }));
    }

    fn export(&self, session: u64, dtype: WireDType) -> Result<Frame, Fault> {
        self.model.as_ref().ok_or_else(Fault::no_model)?;
        let s = self.sessions.get(&session).ok_or_else(|| Fault::new(ErrorCode::UnknownSession, format!("unknown session {session}")))?;
        let state = s.cache.export()?;
        let (header, payload) = kv::encode(session, s.cache.capacity(), &state, dtype)?;
        Ok(Frame::with_payload(Message::KvState(header), payload))
    }

    fn import(&mut self, h: KvStateHeader, payload: &[u8]) -> Result<(), Fault> {
        let model = self.model.as_ref().ok_or_else(Fault::no_model)?;
        let cfg = model.slice.config();
        let expect = (model.slice.layers().len(), cfg.n_kv_heads, cfg.head_dim);
        if (h.n_layers as usize, h.n_kv_heads as usize, h.head_dim as usize) != expect {
            return Err(Fault::new(
                ErrorCode::Invalid,
                format!(
                    "a KV state of {} blocks × {} heads × {} does not fit this slice's {} × {} × {}",
                    h.n_layers, h.n_kv_heads, h.head_dim, expect.0, expect.1, expect.2
                ),
            ));
        }
        let state = kv::decode(&h, payload, model.slice.device())?;
        self.admit(h.session, Some(h.capacity), state.len, &model.slice)?;
        let mut cache = model.slice.new_cache(h.capacity as usize)?;
        cache.import(&state)?;
        self.sessions.insert(h.session, Session { cache, used: Instant::now(), ring: None });
        Ok(())
    }
}
