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

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use tokio::sync::{mpsc, oneshot};

use crate::model::sampling::sample;
use crate::model::{BatchItem, HostInput, KvCache, KvState, ModelSlice, SliceOutput};
use crate::net::frame::Frame;
use crate::net::message::{ForwardHeader, ForwardInput, KvStateHeader, LoadedSlice, Message, RemoteError, StepResult};
use crate::net::tensor::{self, TensorHeader, WireDType};

/// Sessions untouched this long are freed (a head that vanished mid-request).
pub const SESSION_TTL: Duration = Duration::from_secs(600);

/// Rows (tokens) one batch may hold: a prefill chunk plus many decode steps.
pub const MAX_BATCH_ROWS: usize = 512;

pub struct LoadedModel {
    pub slice: ModelSlice,
    pub info: LoadedSlice,
}

pub enum Work {
    Forward {
        header: ForwardHeader,
        payload: Vec<u8>,
    },
    Close {
        session: u64,
    },
    /// Replace the loaded slice (None unloads); every session is dropped.
    Install {
        model: Option<Box<LoadedModel>>,
        done: oneshot::Sender<()>,
    },
    ExportKv {
        session: u64,
        dtype: WireDType,
        reply: oneshot::Sender<Result<Frame, String>>,
    },
    ImportKv {
        header: KvStateHeader,
        payload: Vec<u8>,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// Where the worker's output goes, shared with the network side.
pub struct Outputs {
    /// This node's name in error messages (its listen address).
    pub node: String,
    /// Frames for the next stage's data stream (set by Link).
    pub next: Mutex<Option<mpsc::UnboundedSender<Frame>>>,
    /// Event streams of connected heads: results and errors go to all of them;
    /// session ids are random, each head keeps its own.
    pub heads: Mutex<Vec<mpsc::UnboundedSender<Frame>>>,
    pub wire: Mutex<WireDType>,
    pub sessions: AtomicU32,
    pub busy_nanos: AtomicU64,
    /// Forward steps run, the positions they computed, and the batches they
    /// ran in (steps / batches = mean batch size).
    pub steps: AtomicU64,
    pub tokens: AtomicU64,
    pub batches: AtomicU64,
}

impl Outputs {
    pub fn new(node: String) -> Self {
        Self {
            node,
            next: Mutex::new(None),
            heads: Mutex::new(Vec::new()),
            wire: Mutex::new(WireDType::F16),
            sessions: AtomicU32::new(0),
            busy_nanos: AtomicU64::new(0),
            steps: AtomicU64::new(0),
            tokens: AtomicU64::new(0),
            batches: AtomicU64::new(0),
        }
    }

    pub fn to_heads(&self, frame: Frame) {
        let mut heads = self.heads.lock().expect("heads lock");
        heads.retain(|h| h.send(frame.clone()).is_ok());
    }

    pub fn error(&self, session: Option<u64>, step: Option<u64>, message: String) {
        tracing::warn!(node = %self.node, ?session, "{message}");
        let e = RemoteError { session, step, node: self.node.clone(), message };
        self.to_heads(Frame::new(Message::Error(e)));
    }

    fn to_next(&self, frame: Frame) -> Result<(), String> {
        let next = self.next.lock().expect("next lock");
        match next.as_ref() {
            Some(tx) => tx.send(frame).map_err(|_| "the link to the next stage is down".to_string()),
            None => Err("no next stage is linked to this one".to_string()),
        }
    }
}

pub fn spawn_worker(outputs: Arc<Outputs>, compute_lock: Option<std::fs::File>) -> Sender<Work> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("sollol-stage".into())
        .spawn(move || Worker { model: None, sessions: HashMap::new(), out: outputs, compute_lock }.run(rx))
        .expect("spawn the stage worker");
    tx
}

struct Worker {
    model: Option<Box<LoadedModel>>,
    sessions: HashMap<u64, (KvCache, Instant)>,
    out: Arc<Outputs>,
    compute_lock: Option<std::fs::File>,
}

/// A step's input, decoded.
enum StepInput {
    Tokens(Vec<u32>),
    Hidden(Tensor),
}

impl StepInput {
    fn rows(&self) -> usize {
        match self {
            StepInput::Tokens(ids) => ids.len(),
            StepInput::Hidden(t) => t.dims().get(1).copied().unwrap_or(0),
        }
    }
}

/// Takes the longest run of forward steps at the front of the queue with
/// distinct sessions and at most `MAX_BATCH_ROWS` rows (always at least one).
fn take_batch(queue: &mut VecDeque<Work>) -> Vec<(ForwardHeader, Vec<u8>)> {
    let mut batch = Vec::new();
    let mut sessions = HashSet::new();
    let mut rows = 0;
    while let Some(Work::Forward { header, .. }) = queue.front() {
        let n = match &header.input {
            ForwardInput::Tokens(ids) => ids.len(),
            ForwardInput::Hidden(th) => th.shape.get(1).copied().unwrap_or(1) as usize,
        };
        if !batch.is_empty() && (rows + n > MAX_BATCH_ROWS || sessions.contains(&header.session)) {
            break;
        }
        sessions.insert(header.session);
        rows += n;
        let Some(Work::Forward { header, payload }) = queue.pop_front() else { unreachable!("matched above") };
        batch.push((header, payload));
    }
    batch
}

/// The host path over several sessions at once; the caches leave the map for
/// the call and always come back.
fn run_batch(
    slice: &ModelSlice,
    sessions: &mut HashMap<u64, (KvCache, Instant)>,
    steps: &[(ForwardHeader, StepInput)],
) -> crate::error::Result<Vec<SliceOutput>> {
    let mut taken: Vec<(u64, KvCache, Instant)> = Vec::with_capacity(steps.len());
    for (h, _) in steps {
        match sessions.remove(&h.session) {
            Some((cache, used)) => taken.push((h.session, cache, used)),
            None => break,
        }
    }
    let result = if taken.len() == steps.len() {
        let hidden: Vec<Option<Vec<f32>>> = steps
            .iter()
            .map(|(_, input)| match input {
                StepInput::Hidden(t) => t.flatten_all().and_then(|t| t.to_vec1::<f32>()).ok(),
                StepInput::Tokens(_) => None,
            })
            .collect();
        let mut items: Vec<BatchItem<'_>> = Vec::with_capacity(steps.len());
        let mut complete = true;
        for (((_, input), x), (_, cache, _)) in steps.iter().zip(&hidden).zip(taken.iter_mut()) {
            let input = match (input, x) {
                (StepInput::Tokens(ids), _) => HostInput::Tokens(ids),
                (StepInput::Hidden(_), Some(x)) => HostInput::Hidden(x),
                (StepInput::Hidden(_), None) => {
                    complete = false;
                    break;
                }
            };
            items.push(BatchItem { input, cache });
        }
        if complete {
            slice.forward_batch(&mut items)
        } else {
            Err(crate::error::Error::InvalidRequest("an input could not be read".into()))
        }
    } else {
        Err(crate::error::Error::InvalidRequest("a session is missing".into()))
    };
    for (id, cache, used) in taken {
        sessions.insert(id, (cache, used));
    }
    result
}

impl Worker {
    fn run(mut self, rx: Receiver<Work>) {
        let mut queue: VecDeque<Work> = VecDeque::new();
        loop {
            if queue.is_empty() {
                match rx.recv_timeout(Duration::from_secs(5)) {
                    Ok(work) => queue.push_back(work),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            queue.extend(rx.try_iter());
            let batch = take_batch(&mut queue);
            if !batch.is_empty() {
                self.forward_batch(batch);
            } else if let Some(work) = queue.pop_front() {
                self.handle(work);
            }
            let before = self.sessions.len();
            self.sessions.retain(|_, (_, used)| used.elapsed() < SESSION_TTL);
            if self.sessions.len() != before {
                tracing::info!("freed {} idle sessions", before - self.sessions.len());
            }
            self.out.sessions.store(self.sessions.len() as u32, Ordering::Relaxed);
        }
    }

    fn handle(&mut self, work: Work) {
        match work {
            Work::Forward { header, payload } => self.forward_batch(vec![(header, payload)]),
            Work::Close { session } => {
                self.sessions.remove(&session);
                // Later stages hold the session too; pass the close on (the last stage has no next).
                let _ = self.out.to_next(Frame::new(Message::Close { session }));
            }
            Work::Install { model, done } => {
                self.sessions.clear();
                self.model = model;
                let _ = done.send(());
            }
            Work::ExportKv { session, dtype, reply } => {
                let _ = reply.send(self.export(session, dtype));
            }
            Work::ImportKv { header, payload, reply } => {
                let _ = reply.send(self.import(header, &payload));
            }
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
        for (h, payload) in batch {
            match self.prepare(&h, &payload) {
                Ok(input) => ready.push((h, input)),
                Err(e) => self.emit(h, Err(e), 0),
            }
        }
        let results = self.compute(&ready);
        let nanos = started.elapsed().as_nanos() as u64;
        if let Some(lock) = &self.compute_lock {
            let _ = lock.unlock();
        }
        self.out.busy_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.out.steps.fetch_add(ready.len() as u64, Ordering::Relaxed);
        let computed: usize = ready.iter().zip(&results).filter(|(_, r)| r.is_ok()).map(|((_, input), _)| input.rows()).sum();
        self.out.tokens.fetch_add(computed as u64, Ordering::Relaxed);
        self.out.batches.fetch_add(u64::from(!ready.is_empty()), Ordering::Relaxed);
        for ((h, _), result) in ready.into_iter().zip(results) {
            self.emit(h, result, nanos);
        }
    }

    /// Opens or finds the step's session and decodes its input.
    fn prepare(&mut self, h: &ForwardHeader, payload: &[u8]) -> Result<StepInput, String> {
        let model = self.model.as_ref().ok_or("this node has no model loaded")?;
        let slice = &model.slice;
        if let Some(capacity) = h.open {
            let cache = slice.new_cache(capacity as usize).map_err(|e| e.to_string())?;
            self.sessions.insert(h.session, (cache, Instant::now()));
        }
        let (cache, used) = self
            .sessions
            .get_mut(&h.session)
            .ok_or_else(|| format!("unknown session {} (expired, closed, or opened on another node)", h.session))?;
        *used = Instant::now();
        if let Some(keep) = h.truncate {
            cache.truncate(keep as usize);
        }
        match &h.input {
            ForwardInput::Tokens(ids) => {
                if !slice.is_first() {
                    return Err(format!("token ids sent to a stage holding blocks {:?}; only the first stage embeds", slice.layers()));
                }
                Ok(StepInput::Tokens(ids.clone()))
            }
            ForwardInput::Hidden(th) => {
                let t = tensor::decode(th, payload, slice.device()).map_err(|e| e.to_string())?;
                Ok(StepInput::Hidden(t))
            }
        }
    }

    /// One result per step, in order.
    fn compute(&mut self, steps: &[(ForwardHeader, StepInput)]) -> Vec<Result<SliceOutput, String>> {
        let Some(model) = self.model.as_ref() else {
            return steps.iter().map(|_| Err("this node has no model loaded".to_string())).collect();
        };
        let slice = &model.slice;
        if steps.len() > 1 && slice.backend() == crate::model::Backend::Host {
            if let Ok(outputs) = run_batch(slice, &mut self.sessions, steps) {
                return outputs.into_iter().map(Ok).collect();
            }
        }
        steps
            .iter()
            .map(|(h, input)| {
                let (cache, _) = self.sessions.get_mut(&h.session).ok_or("session closed")?;
                let x = match input {
                    StepInput::Tokens(ids) => {
                        Tensor::new(ids.as_slice(), slice.device()).and_then(|t| t.unsqueeze(0)).map_err(|e| e.to_string())?
                    }
                    StepInput::Hidden(t) => t.clone(),
                };
                slice.forward(&x, cache).map_err(|e| e.to_string())
            })
            .collect()
    }

    /// Sends a step's output on: hidden states to the next stage, a sampled
    /// token to the heads; an error closes the session down the chain.
    fn emit(&mut self, mut h: ForwardHeader, result: Result<SliceOutput, String>, nanos: u64) {
        h.stage_nanos.push(nanos);
        let sent = match result {
            Ok(SliceOutput::Hidden(hidden)) => {
                let wire = *self.out.wire.lock().expect("wire lock");
                match tensor::encode(&hidden, wire) {
                    Ok((th, bytes, overflow)) => {
                        h.f16_fallbacks += u32::from(overflow);
                        h.hop_bytes.push(bytes.len() as u64);
                        h.input = ForwardInput::Hidden(th);
                        self.out.to_next(Frame::with_payload(Message::Forward(h.clone()), bytes))
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
            Ok(SliceOutput::Logits(logits)) => match logits.squeeze(0).and_then(|l| l.to_vec1::<f32>()) {
                Ok(logits) => {
                    let token = h.sample.as_ref().map(|s| sample(&logits, &s.params, &s.recent, s.draw));
                    let result = StepResult {
                        session: h.session,
                        step: h.step,
                        token,
                        logits: h.want_logits.then_some(logits),
                        logits_len: None,
                        stage_nanos: h.stage_nanos.clone(),
                        f16_fallbacks: h.f16_fallbacks,
                        hop_bytes: h.hop_bytes.clone(),
                    };
                    self.out.to_heads(result.into_frame());
                    Ok(())
                }
                Err(e) => Err(crate::error::first_line(&e)),
            },
            Err(e) => Err(e),
        };
        if let Err(message) = sent {
            self.sessions.remove(&h.session);
            self.out.error(Some(h.session), Some(h.step), message);
            let _ = self.out.to_next(Frame::new(Message::Close { session: h.session }));
        }
    }

    fn export(&self, session: u64, dtype: WireDType) -> Result<Frame, String> {
        let model = self.model.as_ref().ok_or("no model loaded")?;
        let (cache, _) = self.sessions.get(&session).ok_or_else(|| format!("unknown session {session}"))?;
        let state = cache.export().map_err(|e| e.to_string())?;
        let cfg = model.slice.config();
        let mut payload = Vec::new();
        for (k, v) in &state.layers {
            for t in [k, v] {
                let (_, bytes, _) = tensor::encode(t, dtype).map_err(|e| e.to_string())?;
                payload.extend_from_slice(&bytes);
            }
        }
        let header = KvStateHeader {
            session,
            len: state.len as u32,
            capacity: cache.capacity() as u32,
            n_layers: state.layers.len() as u32,
            n_kv_heads: cfg.n_kv_heads as u32,
            head_dim: cfg.head_dim as u32,
            dtype,
        };
        Ok(Frame::with_payload(Message::KvState(header), payload))
    }

    fn import(&mut self, h: KvStateHeader, payload: &[u8]) -> Result<(), String> {
        let model = self.model.as_ref().ok_or("no model loaded")?;
        let shape = vec![1, h.n_kv_heads, h.len, h.head_dim];
        let per = shape.iter().map(|&d| d as usize).product::<usize>() * h.dtype.size();
        if payload.len() != per * 2 * h.n_layers as usize {
            return Err(format!("KV payload has {} bytes, the header implies {}", payload.len(), per * 2 * h.n_layers as usize));
        }
        let th = TensorHeader { dtype: h.dtype, shape };
        let mut layers = Vec::with_capacity(h.n_layers as usize);
        for chunk in payload.chunks(per * 2) {
            let k = tensor::decode(&th, &chunk[..per], model.slice.device()).map_err(|e| e.to_string())?;
            let v = tensor::decode(&th, &chunk[per..], model.slice.device()).map_err(|e| e.to_string())?;
            layers.push((k, v));
        }
        let state = KvState { len: h.len as usize, layers };
        let mut cache = model.slice.new_cache(h.capacity as usize).map_err(|e| e.to_string())?;
        cache.import(&state).map_err(|e| e.to_string())?;
        self.sessions.insert(h.session, (cache, Instant::now()));
        Ok(())
    }
}
