//! The head's side of the QUIC pipeline: connections to every stage, the
//! data stream into the first one, and event streams out of all of them.
//!
//! Token ids go to stage 1; hidden states flow stage to stage; the last stage
//! samples and sends only the token back. Results are matched to waiting
//! steps by step id, so many sessions can be in flight at once.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tokio::sync::oneshot;

use super::client::{NodeClient, Pending};
use super::engine::{Engine, SampleSpec, StepOutput};
use crate::net::auth::ClusterKey;
use crate::net::connection::FrameWriter;
use crate::net::frame::Frame;
use crate::net::message::{Capabilities, ForwardHeader, ForwardInput, KvStateHeader, LoadRequest, LoadedSlice, Message, SampleRequest, StepResult};
use crate::net::tensor::WireDType;
use crate::net::{tls, NetError};
use crate::node::server::resolve_addr;

/// How long a step may take before the head gives up on it. Dead peers are
/// noticed sooner, by QUIC's idle timeout; this bounds a stage that is alive
/// but stuck.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(300);

pub struct Pipeline {
    stages: Vec<Arc<NodeClient>>,
    data: tokio::sync::Mutex<FrameWriter>,
    pending: Pending,
    next_step: AtomicU64,
    loaded: Vec<LoadedSlice>,
}

impl Pipeline {
    /// Connects and authenticates to every stage, in chain order.
    pub async fn connect(addrs: &[String], key: &ClusterKey) -> Result<Self, NetError> {
        if addrs.is_empty() {
            return Err(NetError::Connection("no nodes given".into()));
        }
        let endpoint = tls::client_endpoint(resolve_addr(&addrs[0]).await?)?;
        let mut clients = Vec::new();
        for addr in addrs {
            clients.push(NodeClient::connect(&endpoint, addr, key).await?);
        }
        Self::from_clients(clients).await
    }

    /// A pipeline over connected nodes: their events now complete this
    /// pipeline's steps, and a data stream into the first one is opened.
    pub async fn from_clients(stages: Vec<Arc<NodeClient>>) -> Result<Self, NetError> {
        let first = stages.first().ok_or_else(|| NetError::Connection("no nodes given".into()))?;
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        for (i, s) in stages.iter().enumerate() {
            s.attach(pending.clone(), i + 1);
        }
        let data = first.open_data_stream().await?;
        let loaded: Vec<LoadedSlice> = stages.iter().filter_map(|s| s.capabilities().loaded).collect();
        let loaded = if loaded.len() == stages.len() { loaded } else { Vec::new() };
        Ok(Self { stages, data: tokio::sync::Mutex::new(data), pending, next_step: AtomicU64::new(1), loaded })
    }

    pub fn capabilities(&self) -> Vec<(String, Capabilities)> {
        self.stages.iter().map(|s| (s.addr.clone(), s.capabilities())).collect()
    }

    pub fn clients(&self) -> &[Arc<NodeClient>] {
        &self.stages
    }

    pub fn loaded(&self) -> &[LoadedSlice] {
        &self.loaded
    }

    pub fn addrs(&self) -> Vec<String> {
        self.stages.iter().map(|s| s.addr.clone()).collect()
    }

    /// One control request to stage `i`; a node's error becomes `Remote`.
    pub async fn request(&self, i: usize, frame: Frame, wait: Duration) -> Result<Frame, NetError> {
        self.stages[i].request(frame, wait).await
    }

    /// Loads `plan[i]` of `model` on stage `i` (all at once), then links the
    /// chain. A stage already holding exactly that slice of that model keeps it
    /// (and its sessions).
    pub async fn load(&mut self, model: &str, digest: Option<String>, plan: &[Range<usize>], wire: WireDType) -> Result<(), NetError> {
        if plan.len() != self.stages.len() {
            return Err(NetError::Remote(format!("a plan of {} slices for {} stages", plan.len(), self.stages.len())));
        }
        let this = &*self;
        let loads = plan.iter().enumerate().map(|(i, r)| {
            let held = this.stages[i].capabilities().loaded.filter(|l| {
                l.start as usize == r.start && l.end as usize == r.end && digest.as_ref().is_some_and(|d| *d == l.digest)
            });
            let req = LoadRequest { model: model.to_string(), start: r.start as u32, end: r.end as u32, digest: digest.clone() };
            async move {
                match held {
                    Some(info) => Ok(info),
                    None => match this.request(i, Frame::new(Message::Load(req)), Duration::from_secs(600)).await?.message {
                        Message::Loaded(info) => Ok(info),
                        other => Err(NetError::Unexpected { got: other.kind(), expected: "Loaded" }),
                    },
                }
            }
        });
        let mut loaded = Vec::new();
        for info in join_all(loads).await {
            loaded.push(info?);
        }
        self.loaded = loaded;
        self.link(wire).await
    }

    /// Tells each stage where its output goes: the next stage, or nowhere (the last).
    pub async fn link(&self, wire: WireDType) -> Result<(), NetError> {
        for i in (0..self.stages.len()).rev() {
            let next = self.stages.get(i + 1).map(|s| s.addr.clone());
            self.request(i, Frame::new(Message::Link { next, wire }), Duration::from_secs(15)).await?;
        }
        Ok(())
    }

    pub fn n_stages(&self) -> usize {
        self.stages.len()
    }

    /// Runs one step through the chain and waits for the last stage's result.
    pub async fn step(
        &self,
        session: u64,
        tokens: &[u32],
        open: Option<u32>,
        sample: Option<SampleRequest>,
        want_logits: bool,
    ) -> Result<StepResult, NetError> {
        self.step_with(session, tokens, open, None, sample, want_logits).await
    }

    /// A step that first rewinds the session to `truncate` positions on every stage.
    pub async fn step_with(
        &self,
        session: u64,
        tokens: &[u32],
        open: Option<u32>,
        truncate: Option<u32>,
        sample: Option<SampleRequest>,
        want_logits: bool,
    ) -> Result<StepResult, NetError> {
        let step = self.next_step.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("pending lock").insert(step, (session, tx));
        let header = ForwardHeader {
            session,
            step,
            open,
            truncate,
            input: ForwardInput::Tokens(tokens.to_vec()),
            sample,
            want_logits,
            stage_nanos: Vec::new(),
            f16_fallbacks: 0,
            hop_bytes: Vec::new(),
        };
        let sent = self.data.lock().await.write(&Frame::new(Message::Forward(header))).await;
        if let Err(e) = sent {
            self.pending.lock().expect("pending lock").remove(&step);
            return Err(NetError::Connection(format!("cannot send to stage 1 ({}): {e}", self.stages[0].addr)));
        }
        match tokio::time::timeout(STEP_TIMEOUT, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(NetError::Remote("the pipeline dropped the step".into())),
            Err(_) => {
                self.pending.lock().expect("pending lock").remove(&step);
                Err(NetError::Timeout(STEP_TIMEOUT, format!("step {step} of session {session}")))
            }
        }
    }

    /// Frees the session on every stage (the close travels down the chain).
    pub async fn close(&self, session: u64) {
        let _ = self.data.lock().await.write(&Frame::new(Message::Close { session })).await;
    }

    /// The KV state stage `i` holds for `session`.
    pub async fn export_kv(&self, i: usize, session: u64, dtype: WireDType) -> Result<(KvStateHeader, Vec<u8>), NetError> {
        let reply = self.request(i, Frame::new(Message::ExportKv { session, dtype }), Duration::from_secs(60)).await?;
        match reply.message {
            Message::KvState(h) => Ok((h, reply.payload)),
            other => Err(NetError::Unexpected { got: other.kind(), expected: "KvState" }),
        }
    }

    pub async fn import_kv(&self, i: usize, header: KvStateHeader, payload: Vec<u8>) -> Result<(), NetError> {
        self.request(i, Frame::with_payload(Message::ImportKv(header), payload), Duration::from_secs(60)).await?;
        Ok(())
    }

    /// Round trip of a Ping to stage `i`.
    pub async fn ping(&self, i: usize) -> Result<Duration, NetError> {
        let t = Instant::now();
        self.request(i, Frame::new(Message::Ping { nonce: 1 }), Duration::from_secs(5)).await?;
        Ok(t.elapsed())
    }
}

/// The pipeline as a synchronous [`Engine`] for the generation loop. Steps
/// block on the runtime through `handle`, so the loop runs on a plain or a
/// blocking thread; many engines may share one pipeline.
pub struct PipelineEngine {
    handle: tokio::runtime::Handle,
    pipeline: Arc<Pipeline>,
    context_length: usize,
    /// Capacity to send with each open session's first step.
    opening: HashMap<u64, u32>,
    /// Rewinds to send with a session's next step.
    rewinding: HashMap<u64, u32>,
    /// The runtime, when this engine owns it (the CLI).
    _rt: Option<tokio::runtime::Runtime>,
}

impl PipelineEngine {
    /// An engine owning its runtime.
    pub fn new(rt: tokio::runtime::Runtime, pipeline: Pipeline, context_length: usize) -> Self {
        Self { handle: rt.handle().clone(), pipeline: Arc::new(pipeline), context_length, opening: HashMap::new(), rewinding: HashMap::new(), _rt: Some(rt) }
    }

    /// An engine over a shared pipeline, for one request on a blocking thread.
    pub fn shared(handle: tokio::runtime::Handle, pipeline: Arc<Pipeline>, context_length: usize) -> Self {
        Self { handle, pipeline, context_length, opening: HashMap::new(), rewinding: HashMap::new(), _rt: None }
    }

    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }
}

impl Engine for PipelineEngine {
    fn open(&mut self, session: u64, capacity: usize) -> crate::Result<()> {
        self.opening.insert(session, capacity as u32);
        Ok(())
    }

    fn step(&mut self, session: u64, tokens: &[u32], spec: Option<SampleSpec<'_>>, want_logits: bool) -> crate::Result<StepOutput> {
        let open = self.opening.remove(&session);
        let truncate = self.rewinding.remove(&session);
        let sample = spec.map(|s| {
            let recent = if s.params.repeat_penalty != 1.0 {
                s.history[s.history.len().saturating_sub(s.params.repeat_last_n)..].to_vec()
            } else {
                Vec::new()
            };
            SampleRequest { params: s.params.clone(), recent, draw: s.step }
        });
        let t = Instant::now();
        let r = self.handle.block_on(self.pipeline.step_with(session, tokens, open, truncate, sample, want_logits))?;
        let wall = t.elapsed();
        let stage_times: Vec<Duration> = r.stage_nanos.iter().map(|&n| Duration::from_nanos(n)).collect();
        let compute: Duration = stage_times.iter().sum();
        // Hops: head → stage 1 → … → stage N → head.
        let hops = stage_times.len() as u32 + 1;
        Ok(StepOutput {
            token: r.token,
            logits: r.logits,
            stage_times,
            hop_latency: Some(wall.saturating_sub(compute) / hops),
            hop_bytes: r.hop_bytes,
            f16_fallbacks: r.f16_fallbacks,
        })
    }

    fn rewind(&mut self, session: u64, keep: usize) -> crate::Result<()> {
        self.rewinding.insert(session, keep as u32);
        Ok(())
    }

    fn close(&mut self, session: u64) {
        self.opening.remove(&session);
        self.rewinding.remove(&session);
        self.handle.block_on(self.pipeline.close(session));
    }

    fn context_length(&self) -> usize {
        self.context_length
    }
}
