//! Generation that survives a node's death.
//!
//! The engine keeps every token it has fed to each session. When a step fails
//! and a stage no longer answers, it marks the dead nodes, plans the model
//! again over the nodes still alive plus any standby (a standby simply takes
//! the dead node's blocks), loads and links the new chain, replays each
//! session's tokens as a chunked prefill to rebuild the KV caches, and retries
//! the step. Sampling is keyed by (seed, step) and the head holds the history,
//! so the retried step draws exactly the token the lost one would have: the
//! user's stream sees no duplicate and no gap.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::head::engine::{Engine, SampleSpec, StepOutput};
use crate::head::generation::PREFILL_CHUNK;
use crate::head::pipeline::{Pipeline, PipelineEngine};
use crate::model::LayerBytes;
use crate::net::auth::ClusterKey;
use crate::net::tensor::WireDType;

use super::partition::{self, NodeSpec, Strategy};

/// What the engine needs to rebuild a chain.
#[derive(Clone)]
pub struct ChainSpec {
    /// The model source nodes load, and its digest.
    pub model: String,
    pub digest: Option<String>,
    pub layer_bytes: LayerBytes,
    pub context_length: usize,
    pub key: ClusterKey,
    pub wire: WireDType,
    pub strategy: Strategy,
    /// Micro-batches the chain's sessions are spread over; `None`: one per
    /// stage on cores of its own (`Pipeline::micro_batches`).
    pub micro_batches: Option<usize>,
}

struct Session {
    capacity: usize,
    /// Every token fed so far, in order: what a replay feeds again.
    fed: Vec<u32>,
}

/// A chain that many generations share (a server's model): the current
/// pipeline, and its recovery. When a step fails, the first engine to ask
/// rebuilds the chain; the others see the new epoch and only replay their
/// own sessions on it.
pub struct SharedChain {
    spec: ChainSpec,
    handle: tokio::runtime::Handle,
    /// The pipeline now, and its epoch (bumped by every rebuild): read by
    /// every step and by tasks on the runtime (the dashboard's sampler), so
    /// held only to read or swap it, never through a rebuild.
    now: std::sync::RwLock<(u64, Arc<Pipeline>)>,
    /// Held through a rebuild, with the nodes it may use: engines that fail
    /// meanwhile wait for it. Taken only outside the runtime.
    rebuild: std::sync::Mutex<Spares>,
    balance: std::sync::Mutex<Balance>,
}

/// Decode tokens of measurements a rebalancing decision needs, and the least
/// time between two moves of one chain (a move pauses its steps).
const REBALANCE_TOKENS: usize = 128;
const REBALANCE_COOLDOWN: Duration = Duration::from_secs(60);

/// Per-stage compute measured since the last rebalancing decision.
#[derive(Debug, Default)]
struct Balance {
    /// Move blocks off a stage whose compute exceeds the mean by this
    /// fraction (0: never), see `partition::rebalance`.
    threshold: f64,
    stage_times: Vec<Duration>,
    tokens: usize,
    last_move: Option<Instant>,
    moves: u64,
}

/// Nodes that may take a dead node's blocks, and the nodes known dead.
struct Spares {
    standby: Vec<String>,
    dead: HashSet<String>,
}

impl SharedChain {
    /// Connects to `nodes`, loads an even plan over them and links the chain
    /// (a node that fails meanwhile is handled as in [`SharedChain::build`]).
    pub fn start(handle: tokio::runtime::Handle, spec: ChainSpec, nodes: Vec<String>, standby: Vec<String>) -> Result<Arc<Self>> {
        let n_layers = spec.layer_bytes.blocks.len();
        let plan = partition::even(n_layers, nodes.len().min(n_layers))?;
        let chain: Vec<(String, Range<usize>)> = nodes.into_iter().zip(plan).collect();
        Self::build(handle, spec, chain, standby)
    }

    /// Connects to each node of `chain`, loads its blocks and links them.
    /// Setup is covered like generation: a node that is down, or dies while
    /// the chain connects, loads or links, is replaced by a standby, or its
    /// blocks are planned again over the nodes still alive, and setup starts
    /// over (at most three times). Must not be called from inside the runtime.
    pub fn build(
        handle: tokio::runtime::Handle,
        spec: ChainSpec,
        chain: Vec<(String, Range<usize>)>,
        standby: Vec<String>,
    ) -> Result<Arc<Self>> {
        let mut nodes = Spares { standby, dead: HashSet::new() };
        let pipeline = Arc::new(handle.block_on(build_resilient(&spec, chain, &mut nodes))?);
        Ok(Arc::new(Self::with(handle, spec, pipeline, nodes)))
    }

    /// Shares a chain that is already loaded and linked.
    pub fn over(handle: tokio::runtime::Handle, spec: ChainSpec, pipeline: Arc<Pipeline>, standby: Vec<String>) -> Arc<Self> {
        Arc::new(Self::with(handle, spec, pipeline, Spares { standby, dead: HashSet::new() }))
    }

    fn with(handle: tokio::runtime::Handle, spec: ChainSpec, pipeline: Arc<Pipeline>, nodes: Spares) -> Self {
        Self {
            spec,
            handle,
            now: std::sync::RwLock::new((0, pipeline)),
            rebuild: std::sync::Mutex::new(nodes),
            balance: Default::default(),
        }
    }

    pub fn spec(&self) -> &ChainSpec {
        &self.spec
    }

    /// The pipeline now, and its epoch.
    pub fn current(&self) -> (u64, Arc<Pipeline>) {
        let now = self.now.read().expect("chain lock");
        (now.0, now.1.clone())
    }

    /// The chain now, in order: (address, blocks).
    pub fn chain(&self) -> Vec<(String, Range<usize>)> {
        let p = self.current().1;
        p.addrs().into_iter().zip(p.loaded().iter().map(|l| l.start as usize..l.end as usize)).collect()
    }

    /// Turns dynamic rebalancing on: blocks move off a stage whose measured
    /// compute exceeds the mean by `threshold` (0 turns it off).
    pub fn rebalance_above(&self, threshold: f64) {
        self.balance.lock().expect("balance lock").threshold = threshold;
    }

    /// Blocks moved between this chain's stages by rebalancing so far.
    pub fn rebalances(&self) -> u64 {
        self.balance.lock().expect("balance lock").moves
    }

    /// Adds a generation's per-stage compute (over `tokens` positions) to
    /// the measurements and, once enough are measured, moves blocks off a
    /// bottleneck stage in the background (the move pauses the chain's
    /// steps briefly; live sessions keep their KV state).
    pub fn measured(self: &Arc<Self>, stage_times: &[Duration], tokens: usize) {
        let plan = {
            let mut b = self.balance.lock().expect("balance lock");
            if b.threshold <= 0.0 || stage_times.len() < 2 {
                return;
            }
            if b.stage_times.len() != stage_times.len() {
                b.stage_times = vec![Duration::ZERO; stage_times.len()];
            }
            b.stage_times.iter_mut().zip(stage_times).for_each(|(a, t)| *a += *t);
            b.tokens += tokens;
            if b.tokens < REBALANCE_TOKENS || b.last_move.is_some_and(|t| t.elapsed() < REBALANCE_COOLDOWN) {
                return;
            }
            let ranges: Vec<_> = self.current().1.loaded().iter().map(|l| l.start as usize..l.end as usize).collect();
            let plan = partition::rebalance(&b.stage_times, &ranges, b.threshold);
            b.stage_times.clear();
            b.tokens = 0;
            if plan.is_some() {
                b.last_move = Some(Instant::now());
            }
            plan
        };
        let Some(plan) = plan else { return };
        let chain = self.clone();
        self.handle.spawn(async move {
            match chain.current().1.move_blocks(plan.from, plan.to, plan.blocks).await {
                Ok(paused) => {
                    chain.balance.lock().expect("balance lock").moves += 1;
                    tracing::info!(model = %chain.spec.model, ?plan, ?paused, "rebalanced");
                }
                Err(e) => tracing::warn!(model = %chain.spec.model, ?plan, "rebalancing failed: {e}"),
            }
        });
    }

    /// After a failed step on `failed` epoch's pipeline: a chain without the
    /// dead nodes (a standby takes a dead node's blocks; without one, the
    /// blocks are planned again over the survivors), or with the blocks it
    /// had before a block move failed halfway, unless another engine already
    /// rebuilt it. `None` when neither happened (not a node's failure).
    /// Must not be called from inside the runtime.
    fn recover(&self, failed: u64) -> Result<Option<(u64, Arc<Pipeline>)>> {
        // Held through the rebuild: engines that fail meanwhile wait for it.
        let mut nodes = self.rebuild.lock().expect("rebuild lock");
        let (epoch, pipeline) = self.current();
        if epoch != failed {
            return Ok(Some((epoch, pipeline)));
        }
        let chain: Vec<(String, Range<usize>)> =
            pipeline.addrs().into_iter().zip(pipeline.loaded().iter().map(|l| l.start as usize..l.end as usize)).collect();
        let dead = self.handle.block_on(dead_nodes(&pipeline));
        if dead.is_empty() && !pipeline.is_broken() {
            return Ok(None);
        }
        if dead.is_empty() {
            tracing::warn!("a failed block move left the chain half moved; loading it again as it was");
        } else {
            tracing::warn!("nodes down: {}", dead.join(", "));
        }
        nodes.dead.extend(dead);
        let nodes = &mut *nodes;
        let rebuilt = Arc::new(self.handle.block_on(async {
            let chain = replan(&self.spec, chain, nodes).await?;
            build_resilient(&self.spec, chain, nodes).await
        })?);
        let mut now = self.now.write().expect("chain lock");
        *now = (epoch + 1, rebuilt.clone());
        Ok(Some((epoch + 1, rebuilt)))
    }
}

/// The nodes of `pipeline` that no longer answer.
async fn dead_nodes(pipeline: &Pipeline) -> Vec<String> {
    let mut dead = Vec::new();
    for c in pipeline.clients() {
        if c.is_closed() || c.ping(Duration::from_millis(1500)).await.is_err() {
            dead.push(c.addr.clone());
        }
    }
    dead
}

/// Of `addrs`, those that cannot be connected to (and pinged) now.
async fn unreachable(key: &ClusterKey, addrs: &[String]) -> Vec<String> {
    let mut down = Vec::new();
    for addr in addrs {
        let alive = async {
            let p = Pipeline::connect(std::slice::from_ref(addr), key).await?;
            p.ping(0).await
        };
        if tokio::time::timeout(Duration::from_secs(3), alive).await.map_or(true, |r| r.is_err()) {
            down.push(addr.clone());
        }
    }
    down
}

/// `chain` without its dead nodes: a standby takes a dead node's blocks;
/// without one, the model is planned again over the survivors.
async fn replan(spec: &ChainSpec, mut chain: Vec<(String, Range<usize>)>, s: &mut Spares) -> Result<Vec<(String, Range<usize>)>> {
    let Spares { standby, dead } = &mut *s;
    for (addr, _) in chain.iter_mut().filter(|(a, _)| dead.contains(a)) {
        if let Some(spare) = standby.iter().position(|a| !dead.contains(a)).map(|i| standby.remove(i)) {
            tracing::warn!("stage {addr} is down; standby {spare} takes its blocks");
            *addr = spare;
        }
    }
    if chain.iter().any(|(a, _)| s.dead.contains(a)) {
        let alive: Vec<String> = chain.iter().map(|(a, _)| a.clone()).filter(|a| !s.dead.contains(a)).collect();
        if alive.is_empty() {
            let all: Vec<String> = s.dead.iter().cloned().collect();
            return Err(Error::InvalidRequest(format!("every node of the pipeline is down ({})", all.join(", "))));
        }
        let specs = node_specs(&spec.key, &alive).await?;
        let plan = partition::plan(spec.strategy, &spec.layer_bytes, &specs)?;
        chain = plan.into_iter().map(|a| (a.node.clone(), a.start..a.end)).collect();
        tracing::warn!("replanned over {} surviving nodes", chain.len());
    }
    Ok(chain)
}

/// [`build`], with the nodes that fail during it replaced (see
/// [`SharedChain::build`]).
async fn build_resilient(spec: &ChainSpec, mut chain: Vec<(String, Range<usize>)>, s: &mut Spares) -> Result<Pipeline> {
    let mut attempts = 0;
    loop {
        let e = match build(spec, &chain).await {
            Ok(pipeline) => return Ok(pipeline),
            Err(e) => e,
        };
        let addrs: Vec<String> = chain.iter().map(|(a, _)| a.clone()).collect();
        let down = unreachable(&spec.key, &addrs).await;
        attempts += 1;
        if down.is_empty() || attempts > 3 {
            return Err(e);
        }
        tracing::warn!("setting up the chain failed ({e}); nodes down: {}", down.join(", "));
        s.dead.extend(down);
        chain = replan(spec, chain, s).await?;
    }
}

/// An [`Engine`] over a [`SharedChain`] that keeps its sessions' tokens and
/// replays them when the chain is rebuilt.
pub struct FailoverEngine {
    chain: Arc<SharedChain>,
    epoch: u64,
    inner: PipelineEngine,
    sessions: HashMap<u64, Session>,
    /// How long each recovery took, from the failed step to the retried one.
    pub recoveries: Vec<Duration>,
    /// The runtime, when this engine owns it (the CLI); a server shares its own.
    _rt: Option<tokio::runtime::Runtime>,
}

impl FailoverEngine {
    /// Connects to `nodes`, loads an even plan over them and links the chain.
    pub fn start(rt: tokio::runtime::Runtime, spec: ChainSpec, nodes: Vec<String>, standby: Vec<String>) -> Result<Self> {
        let chain = SharedChain::start(rt.handle().clone(), spec, nodes, standby)?;
        Ok(Self::owning(rt, chain))
    }

    /// An engine that owns the runtime its chain runs on (the CLI's).
    pub fn owning(rt: tokio::runtime::Runtime, chain: Arc<SharedChain>) -> Self {
        let mut engine = Self::over(chain);
        engine._rt = Some(rt);
        engine
    }

    /// An engine on a shared chain (one per generation in a server).
    pub fn over(chain: Arc<SharedChain>) -> Self {
        let (epoch, pipeline) = chain.current();
        let inner = PipelineEngine::shared(chain.handle.clone(), pipeline, chain.spec.context_length);
        Self { chain, epoch, inner, sessions: HashMap::new(), recoveries: Vec::new(), _rt: None }
    }

    pub fn chain(&self) -> Vec<(String, Range<usize>)> {
        self.chain.chain()
    }

    pub fn pipeline(&self) -> &Pipeline {
        self.inner.pipeline()
    }

    /// Moves to the rebuilt chain and rebuilds every session's caches from its tokens.
    fn replay(&mut self, epoch: u64, pipeline: Arc<Pipeline>) -> Result<()> {
        self.epoch = epoch;
        self.inner = PipelineEngine::shared(self.chain.handle.clone(), pipeline, self.chain.spec.context_length);
        let sessions: Vec<(u64, usize, Vec<u32>)> = self.sessions.iter().map(|(id, s)| (*id, s.capacity, s.fed.clone())).collect();
        for (id, capacity, fed) in sessions {
            self.inner.open(id, capacity)?;
            for chunk in fed.chunks(PREFILL_CHUNK) {
                self.inner.step(id, chunk, None, false)?;
            }
        }
        Ok(())
    }
}

/// Connects to `chain`'s nodes, loads each its blocks (the ones already
/// holding them keep them), and links them.
async fn build(spec: &ChainSpec, chain: &[(String, Range<usize>)]) -> Result<Pipeline> {
    let addrs: Vec<String> = chain.iter().map(|(a, _)| a.clone()).collect();
    let mut pipeline = Pipeline::connect(&addrs, &spec.key).await?;
    let plan: Vec<Range<usize>> = chain.iter().map(|(_, r)| r.clone()).collect();
    pipeline.load(&spec.model, spec.digest.clone(), &plan, spec.wire).await?;
    pipeline.set_micro_batches(spec.micro_batches);
    Ok(pipeline)
}

/// Free memory of each node (what it holds now is freed by a new load).
async fn node_specs(key: &ClusterKey, addrs: &[String]) -> Result<Vec<NodeSpec>> {
    let probe = Pipeline::connect(addrs, key).await?;
    Ok(probe
        .capabilities()
        .into_iter()
        .map(|(addr, c)| NodeSpec { name: addr, memory: c.free_memory + c.loaded.map_or(0, |l| l.weight_bytes), ..Default::default() })
        .collect())
}

impl Engine for FailoverEngine {
    fn open(&mut self, session: u64, capacity: usize) -> Result<()> {
        self.sessions.insert(session, Session { capacity, fed: Vec::new() });
        self.inner.open(session, capacity)
    }

    fn step(&mut self, session: u64, tokens: &[u32], spec: Option<SampleSpec<'_>>, want_logits: bool) -> Result<StepOutput> {
        let mut attempts = 0;
        loop {
            let started = Instant::now();
            match self.inner.step(session, tokens, spec.clone(), want_logits) {
                Ok(out) => {
                    if let Some(s) = self.sessions.get_mut(&session) {
                        s.fed.extend_from_slice(tokens);
                    }
                    return Ok(out);
                }
                Err(e) => {
                    attempts += 1;
                    if attempts > 3 {
                        return Err(e);
                    }
                    tracing::warn!("step failed: {e}");
                    let Some((epoch, pipeline)) = self.chain.recover(self.epoch)? else {
                        return Err(e);
                    };
                    self.replay(epoch, pipeline)?;
                    self.recoveries.push(started.elapsed());
                }
            }
        }
    }

    fn pool(&mut self, session: u64, tokens: &[u32], pooling: crate::model::Pooling) -> Result<Vec<f32>> {
        // An embedding is short and holds nothing afterwards: a failed one
        // is the caller's to retry, not replayed.
        self.inner.pool(session, tokens, pooling)
    }

    fn rewind(&mut self, session: u64, keep: usize) -> Result<()> {
        if let Some(s) = self.sessions.get_mut(&session) {
            s.fed.truncate(keep);
        }
        self.inner.rewind(session, keep)
    }

    fn settle(&mut self, session: u64) {
        self.inner.settle(session);
    }

    fn close(&mut self, session: u64) {
        self.sessions.remove(&session);
        self.inner.close(session);
    }

    fn prefill_chunk(&self, session: u64) -> usize {
        self.inner.prefill_chunk(session)
    }

    fn context_length(&self) -> usize {
        self.chain.spec.context_length
    }
}
