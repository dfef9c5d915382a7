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

use super::engine::{Engine, SampleSpec, StepOutput};
use crate::net::auth::{client_handshake, ClusterKey};
use crate::net::connection::{split, FrameReader, FrameWriter};
use crate::net::frame::Frame;
use crate::net::message::{
    Capabilities, ForwardHeader, ForwardInput, KvStateHeader, LoadRequest, LoadedSlice, Message, PeerRole, SampleRequest,
    StepResult, StreamPurpose,
};
use crate::net::tensor::WireDType;
use crate::net::{timeout, tls, NetError};
use crate::node::server::resolve_addr;

/// How long a step may take before the head gives up on it. Dead peers are
/// noticed sooner, by QUIC's idle timeout; this bounds a stage that is alive
/// but stuck.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(300);

struct Stage {
    addr: String,
    conn: quinn::Connection,
    control: tokio::sync::Mutex<(FrameReader, FrameWriter)>,
    caps: Capabilities,
}

type Pending = Arc<Mutex<HashMap<u64, (u64, oneshot::Sender<Result<StepResult, NetError>>)>>>;

pub struct Pipeline {
    _endpoint: quinn::Endpoint,
    stages: Vec<Stage>,
    data: tokio::sync::Mutex<FrameWriter>,
    pending: Pending,
    next_step: AtomicU64,
    loaded: Vec<LoadedSlice>,
}

/// Fails the waiting steps: the one named, else all of a session, else all.
fn fail(pending: &Pending, session: Option<u64>, step: Option<u64>, message: &str) {
    let mut p = pending.lock().expect("pending lock");
    let steps: Vec<u64> = match (step, session) {
        (Some(s), _) => vec![s],
        (None, Some(sess)) => p.iter().filter(|(_, (s, _))| *s == sess).map(|(k, _)| *k).collect(),
        (None, None) => p.keys().copied().collect(),
    };
    for s in steps {
        if let Some((_, tx)) = p.remove(&s) {
            let _ = tx.send(Err(NetError::Remote(message.to_string())));
        }
    }
}

fn dispatch(pending: &Pending, frame: Frame) {
    match frame.message {
        Message::Result(r) => {
            if let Some((_, tx)) = pending.lock().expect("pending lock").remove(&r.step) {
                let _ = tx.send(Ok(r));
            }
        }
        Message::Error(e) => fail(pending, e.session, e.step, &format!("node {}: {}", e.node, e.message)),
        _ => {}
    }
}

impl Pipeline {
    /// Connects and authenticates to every stage, in chain order.
    pub async fn connect(addrs: &[String], key: &ClusterKey) -> Result<Self, NetError> {
        if addrs.is_empty() {
            return Err(NetError::Connection("no nodes given".into()));
        }
        let first = resolve_addr(&addrs[0]).await?;
        let endpoint = tls::client_endpoint(first)?;
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let mut stages = Vec::new();
        for (i, addr) in addrs.iter().enumerate() {
            let sock = resolve_addr(addr).await?;
            let conn = timeout(Duration::from_secs(10), &format!("a connection to {addr}"), async {
                endpoint
                    .connect(sock, tls::SERVER_NAME)
                    .map_err(|e| NetError::Connection(format!("{addr}: {e}")))?
                    .await
                    .map_err(|e| NetError::Connection(format!("cannot reach {addr}: {e}")))
            })
            .await?;
            let (reader, writer, caps) = client_handshake(&conn, key, PeerRole::Head)
                .await
                .map_err(|e| NetError::Connection(format!("{addr}: {e}")))?;
            let (mut events, mut attach) = split(conn.open_bi().await?);
            attach.write(&Frame::new(Message::Attach { purpose: StreamPurpose::Events })).await?;
            let (p, name) = (pending.clone(), addr.clone());
            tokio::spawn(async move {
                let _keep_open = attach;
                loop {
                    match events.read().await {
                        Ok(Some(frame)) => dispatch(&p, frame),
                        Ok(None) => {
                            fail(&p, None, None, &format!("stage {} ({name}) closed its event stream", i + 1));
                            break;
                        }
                        Err(e) => {
                            fail(&p, None, None, &format!("stage {} ({name}) disconnected: {e}", i + 1));
                            break;
                        }
                    }
                }
            });
            stages.push(Stage { addr: addr.clone(), conn, control: tokio::sync::Mutex::new((reader, writer)), caps });
        }
        let (mut back, mut data) = split(stages[0].conn.open_bi().await?);
        data.write(&Frame::new(Message::Attach { purpose: StreamPurpose::Data })).await?;
        let p = pending.clone();
        tokio::spawn(async move {
            // Stage 1 writes here only to refuse a frame.
            while let Ok(Some(frame)) = back.read().await {
                dispatch(&p, frame);
            }
        });
        Ok(Self { _endpoint: endpoint, stages, data: tokio::sync::Mutex::new(data), pending, next_step: AtomicU64::new(1), loaded: Vec::new() })
    }

    pub fn capabilities(&self) -> Vec<(String, Capabilities)> {
        self.stages.iter().map(|s| (s.addr.clone(), s.caps.clone())).collect()
    }

    pub fn loaded(&self) -> &[LoadedSlice] {
        &self.loaded
    }

    pub fn addrs(&self) -> Vec<String> {
        self.stages.iter().map(|s| s.addr.clone()).collect()
    }

    /// One control request to stage `i`; a node's error becomes `Remote`.
    pub async fn request(&self, i: usize, frame: Frame, wait: Duration) -> Result<Frame, NetError> {
        let stage = &self.stages[i];
        let mut control = stage.control.lock().await;
        let (reader, writer) = &mut *control;
        timeout(wait, &format!("{} from {}", frame.message.kind(), stage.addr), async {
            writer.write(&frame).await?;
            let reply = reader.expect().await?;
            match reply.message {
                Message::Error(e) => Err(NetError::Remote(format!("node {}: {}", stage.addr, e.message))),
                _ => Ok(reply),
            }
        })
        .await
    }

    /// Loads `plan[i]` of `model` on stage `i` (all at once), then links the chain.
    pub async fn load(&mut self, model: &str, digest: Option<String>, plan: &[Range<usize>], wire: WireDType) -> Result<(), NetError> {
        if plan.len() != self.stages.len() {
            return Err(NetError::Remote(format!("a plan of {} slices for {} stages", plan.len(), self.stages.len())));
        }
        let loads = plan.iter().enumerate().map(|(i, r)| {
            let req = LoadRequest { model: model.to_string(), start: r.start as u32, end: r.end as u32, digest: digest.clone() };
            self.request(i, Frame::new(Message::Load(req)), Duration::from_secs(600))
        });
        let mut loaded = Vec::new();
        for reply in join_all(loads).await {
            match reply?.message {
                Message::Loaded(info) => loaded.push(info),
                other => return Err(NetError::Unexpected { got: other.kind(), expected: "Loaded" }),
            }
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
        let step = self.next_step.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("pending lock").insert(step, (session, tx));
        let header = ForwardHeader {
            session,
            step,
            open,
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

/// The pipeline as a synchronous [`Engine`] for the generation loop.
pub struct PipelineEngine {
    rt: tokio::runtime::Runtime,
    pipeline: Pipeline,
    context_length: usize,
    /// Capacity to send with each open session's first step.
    opening: HashMap<u64, u32>,
}

impl PipelineEngine {
    pub fn new(rt: tokio::runtime::Runtime, pipeline: Pipeline, context_length: usize) -> Self {
        Self { rt, pipeline, context_length, opening: HashMap::new() }
    }

    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    pub fn block_on<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.rt.block_on(f)
    }
}

impl Engine for PipelineEngine {
    fn open(&mut self, session: u64, capacity: usize) -> crate::Result<()> {
        self.opening.insert(session, capacity as u32);
        Ok(())
    }

    fn step(&mut self, session: u64, tokens: &[u32], spec: Option<SampleSpec<'_>>, want_logits: bool) -> crate::Result<StepOutput> {
        let open = self.opening.remove(&session);
        let sample = spec.map(|s| {
            let recent = if s.params.repeat_penalty != 1.0 {
                s.history[s.history.len().saturating_sub(s.params.repeat_last_n)..].to_vec()
            } else {
                Vec::new()
            };
            SampleRequest { params: s.params.clone(), recent, draw: s.step }
        });
        let t = Instant::now();
        let r = self.rt.block_on(self.pipeline.step(session, tokens, open, sample, want_logits))?;
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

    fn close(&mut self, session: u64) {
        self.opening.remove(&session);
        self.rt.block_on(self.pipeline.close(session));
    }

    fn context_length(&self) -> usize {
        self.context_length
    }
}
