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
}

struct Session {
    capacity: usize,
    /// Every token fed so far, in order: what a replay feeds again.
    fed: Vec<u32>,
}

pub struct FailoverEngine {
    rt: tokio::runtime::Runtime,
    spec: ChainSpec,
    /// The chain, in order: (address, blocks).
    chain: Vec<(String, Range<usize>)>,
    standby: Vec<String>,
    dead: HashSet<String>,
    inner: PipelineEngine,
    sessions: HashMap<u64, Session>,
    /// How long each recovery took, from the failed step to the retried one.
    pub recoveries: Vec<Duration>,
}

impl FailoverEngine {
    /// Connects to `nodes`, loads an even plan over them and links the chain.
    pub fn start(rt: tokio::runtime::Runtime, spec: ChainSpec, nodes: Vec<String>, standby: Vec<String>) -> Result<Self> {
        let n_layers = spec.layer_bytes.blocks.len();
        let plan = partition::even(n_layers, nodes.len())?;
        let chain: Vec<(String, Range<usize>)> = nodes.into_iter().zip(plan).collect();
        let pipeline = rt.block_on(build(&spec, &chain))?;
        let inner = PipelineEngine::shared(rt.handle().clone(), std::sync::Arc::new(pipeline), spec.context_length);
        Ok(Self { rt, spec, chain, standby, dead: HashSet::new(), inner, sessions: HashMap::new(), recoveries: Vec::new() })
    }

    pub fn chain(&self) -> &[(String, Range<usize>)] {
        &self.chain
    }

    pub fn pipeline(&self) -> &Pipeline {
        self.inner.pipeline()
    }

    /// Finds the stages that no longer answer; none means the failure was not a node's.
    fn find_dead(&mut self) -> Vec<String> {
        let clients = self.inner.pipeline().clients().to_vec();
        let dead: Vec<String> = self.rt.block_on(async {
            let mut dead = Vec::new();
            for c in clients {
                if c.is_closed() || c.ping(Duration::from_millis(1500)).await.is_err() {
                    dead.push(c.addr.clone());
                }
            }
            dead
        });
        self.dead.extend(dead.iter().cloned());
        dead
    }

    /// A new chain without the dead nodes: a standby takes a dead node's
    /// blocks; without one, the blocks are planned again over the survivors.
    fn recover(&mut self, dead: &[String]) -> Result<()> {
        let mut chain = self.chain.clone();
        for (addr, _) in chain.iter_mut().filter(|(a, _)| dead.contains(a)) {
            if let Some(s) = self.standby.iter().position(|s| !self.dead.contains(s)).map(|i| self.standby.remove(i)) {
                tracing::warn!("stage {addr} is down; standby {s} takes its blocks");
                *addr = s;
            }
        }
        if chain.iter().any(|(a, _)| self.dead.contains(a)) {
            let alive: Vec<String> = chain.iter().map(|(a, _)| a.clone()).filter(|a| !self.dead.contains(a)).collect();
            if alive.is_empty() {
                return Err(Error::InvalidRequest("every node of the pipeline is down".into()));
            }
            let specs = self.rt.block_on(node_specs(&self.spec.key, &alive))?;
            let plan = partition::plan(self.spec.strategy, &self.spec.layer_bytes, &specs)?;
            chain = plan.into_iter().map(|a| (a.node.clone(), a.start..a.end)).collect();
            tracing::warn!("replanned over {} surviving nodes", chain.len());
        }
        let pipeline = self.rt.block_on(build(&self.spec, &chain))?;
        self.chain = chain;
        self.inner = PipelineEngine::shared(self.rt.handle().clone(), std::sync::Arc::new(pipeline), self.spec.context_length);
        // Rebuild every live session's caches from its tokens.
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
    Ok(pipeline)
}

/// Free memory of each node (what it holds now is freed by a new load).
async fn node_specs(key: &ClusterKey, addrs: &[String]) -> Result<Vec<NodeSpec>> {
    let probe = Pipeline::connect(addrs, key).await?;
    Ok(probe
        .capabilities()
        .into_iter()
        .map(|(addr, c)| NodeSpec {
            name: addr,
            memory: c.free_memory + c.loaded.map_or(0, |l| l.weight_bytes),
            bytes_per_sec: 0.0,
            rtt_secs: 0.0,
        })
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
                    let dead = self.find_dead();
                    if dead.is_empty() || attempts > 3 {
                        return Err(e);
                    }
                    tracing::warn!("step failed ({e}); nodes down: {}", dead.join(", "));
                    self.recover(&dead)?;
                    self.recoveries.push(started.elapsed());
                }
            }
        }
    }

    fn rewind(&mut self, session: u64, keep: usize) -> Result<()> {
        if let Some(s) = self.sessions.get_mut(&session) {
            s.fed.truncate(keep);
        }
        self.inner.rewind(session, keep)
    }

    fn close(&mut self, session: u64) {
        self.sessions.remove(&session);
        self.inner.close(session);
    }

    fn context_length(&self) -> usize {
        self.spec.context_length
    }
}
