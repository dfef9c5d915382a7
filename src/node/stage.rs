//! The stage worker: one OS thread that owns the loaded slice and every
//! session's KV cache, and runs forward passes in arrival order.
//!
//! Compute is blocking and uses the whole thread pool, so one worker per
//! node; sessions interleave at step granularity, and different stages of a
//! chain work on different sessions at once. Owning the caches on this one
//! thread means no lock is taken on the data path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use tokio::sync::{mpsc, oneshot};

use crate::model::sampling::sample;
use crate::model::{KvCache, KvState, ModelSlice, SliceOutput};
use crate::net::frame::Frame;
use crate::net::message::{ForwardHeader, ForwardInput, KvStateHeader, LoadedSlice, Message, RemoteError, StepResult};
use crate::net::tensor::{self, TensorHeader, WireDType};

/// Sessions untouched this long are freed (a head that vanished mid-request).
pub const SESSION_TTL: Duration = Duration::from_secs(600);

pub struct LoadedModel {
    pub slice: ModelSlice,
    pub info: LoadedSlice,
}

pub enum Work {
    Forward { header: ForwardHeader, payload: Vec<u8> },
    Close { session: u64 },
    /// Replace the loaded slice (None unloads); every session is dropped.
    Install { model: Option<Box<LoadedModel>>, done: oneshot::Sender<()> },
    ExportKv { session: u64, dtype: WireDType, reply: oneshot::Sender<Result<Frame, String>> },
    ImportKv { header: KvStateHeader, payload: Vec<u8>, reply: oneshot::Sender<Result<(), String>> },
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

impl Worker {
    fn run(mut self, rx: Receiver<Work>) {
        loop {
            match rx.recv_timeout(Duration::from_secs(5)) {
                Ok(work) => self.handle(work),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
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
            Work::Forward { header, payload } => self.forward(header, payload),
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

    fn forward(&mut self, mut h: ForwardHeader, payload: Vec<u8>) {
        if let Some(lock) = &self.compute_lock {
            // A failed lock only costs speed: compute anyway.
            let _ = lock.lock();
        }
        let started = Instant::now();
        let result = self.compute(&h, &payload);
        let nanos = started.elapsed().as_nanos() as u64;
        if let Some(lock) = &self.compute_lock {
            let _ = lock.unlock();
        }
        self.out.busy_nanos.fetch_add(nanos, Ordering::Relaxed);
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
                        stage_nanos: h.stage_nanos.clone(),
                        f16_fallbacks: h.f16_fallbacks,
                        hop_bytes: h.hop_bytes.clone(),
                    };
                    self.out.to_heads(Frame::new(Message::Result(result)));
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

    fn compute(&mut self, h: &ForwardHeader, payload: &[u8]) -> Result<SliceOutput, String> {
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
        let input = match &h.input {
            ForwardInput::Tokens(ids) => {
                if !slice.is_first() {
                    return Err(format!("token ids sent to a stage holding blocks {:?}; only the first stage embeds", slice.layers()));
                }
                Tensor::new(ids.as_slice(), &Device::Cpu).and_then(|t| t.unsqueeze(0)).map_err(|e| e.to_string())?
            }
            ForwardInput::Hidden(th) => tensor::decode(th, payload, slice.device()).map_err(|e| e.to_string())?,
        };
        slice.forward(&input, cache).map_err(|e| e.to_string())
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
            let k = tensor::decode(&th, &chunk[..per], &Device::Cpu).map_err(|e| e.to_string())?;
            let v = tensor::decode(&th, &chunk[per..], &Device::Cpu).map_err(|e| e.to_string())?;
            layers.push((k, v));
        }
        let state = KvState { len: h.len as usize, layers };
        let mut cache = model.slice.new_cache(h.capacity as usize).map_err(|e| e.to_string())?;
        cache.import(&state).map_err(|e| e.to_string())?;
        self.sessions.insert(h.session, (cache, Instant::now()));
        Ok(())
    }
}
