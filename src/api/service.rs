//! The head server's core: admission (a queue slot, then the model's
//! worker: its tokenizer here, its chain on the nodes) and one generation as
//! a stream of events — shared by the Ollama and OpenAI front ends, whose
//! `*_request` functions check a body before it gets here. Chains (failover,
//! drain, rebalancing) are `cluster::failover::SharedChain`'s; conversations
//! kept between turns are `head::conversations`'.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::http::StatusCode;
use tokio::sync::mpsc;

use super::error::ApiError;
use super::metrics::Metrics;
use crate::cluster::failover::{ChainSpec, FailoverEngine, SharedChain};
use crate::cluster::health::{HealthPolicy, NodeHealth};
use crate::cluster::local::LocalNodes;
use crate::cluster::manager::{ClusterManager, RouteInfo, RouteStage};
use crate::cluster::partition::{self, Strategy};
use crate::cluster::registry::Registry;
use crate::head::chat::Prompt;
use crate::head::client::NodeClient;
use crate::head::conversations::{Conversation, Conversations};
use crate::head::engine::Engine;
use crate::head::generation::{generate, GenerateRequest, GenerateResult, Piece};
use crate::head::pipeline::Pipeline;
use crate::head::queue::Queue;
use crate::head::tokenizer::Tokenizer;
use crate::head::tools::{self, ToolCall, ToolChoice, ToolStream};
use crate::model::catalog::Catalog;
use crate::model::sampling::SamplingParams;
use crate::model::{source, Config, ModelFile};
use crate::net::auth::ClusterKey;
use crate::net::tensor::WireDType;

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: std::net::SocketAddr,
    /// Node processes to start on loopback when the registry has no nodes.
    pub local_nodes: usize,
    pub threads: usize,
    pub wire: WireDType,
    /// Generations running at once.
    pub parallel: usize,
    /// Requests that may wait for a slot before new ones are refused.
    pub max_queue: usize,
    pub key: Option<String>,
    pub default_model: String,
    /// KV memory (all stages together) that idle conversations may keep for
    /// reuse by their next turn; the least recently used go first.
    pub kv_cache_mb: usize,
    /// Dynamic rebalancing threshold (0: off), see `partition::rebalance`.
    pub rebalance_threshold: f64,
    /// Directories whose model files clients may name by path; other paths
    /// are "not found", whether they exist or not.
    pub model_dirs: Vec<std::path::PathBuf>,
    /// Copies of each model to spread requests over.
    pub replicas: usize,
    /// A DNS name whose addresses are nodes (resolved again every 30 s).
    pub discover_dns: Option<String>,
    /// Micro-batches per chain (`ChainSpec::micro_batches`).
    pub micro_batches: Option<usize>,
}

/// A model ready to serve: its tokenizer here, its slices on the nodes.
pub struct Worker {
    pub name: String,
    pub digest: String,
    pub size: u64,
    pub config: Config,
    pub tokenizer: Tokenizer,
    /// The model's copies on the nodes (at least one); requests go to the
    /// healthy one with the least running, and a copy's dead node is
    /// replaced by another copy's (its sessions replayed there).
    replicas: Vec<Replica>,
    /// Generations running on it.
    active: std::sync::atomic::AtomicUsize,
    /// How long it stays loaded after its last request (Ollama's
    /// `keep_alive`, the last request's), and when that runs out (None: never).
    keep_alive: Mutex<KeepAlive>,
    expires: Mutex<Option<Instant>>,
    pub loaded_at: SystemTime,
    pub load_duration: Duration,
    pub quantization: String,
}

pub struct GenRequest {
    pub model: String,
    pub prompt: Prompt,
    /// Token ids to put before the prompt (Ollama's `context`).
    pub context: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub num_ctx: usize,
    pub priority: i32,
    /// A conversation turn: keep the session for the next turn to reuse.
    pub keep: bool,
    /// Report each token's log-probability and this many alternatives'.
    pub logprobs: Option<usize>,
    /// How long the model stays loaded afterwards (None: as before).
    pub keep_alive: Option<KeepAlive>,
    /// The output must be JSON (of a schema).
    pub format: Option<crate::head::constraint::Format>,
    /// Whether the model must call one of the prompt's tools.
    pub tool_choice: ToolChoice,
}

pub enum Event {
    /// A piece of the answer, and the log-probabilities of its tokens (when asked for).
    Text(String, Vec<TokenLogprob>),
    Done(Box<Finished>),
    Failed(ApiError),
}

/// What an embedding request got back.
pub struct Embedded {
    pub embeddings: Vec<Vec<f32>>,
    pub prompt_tokens: usize,
    pub load: Duration,
    pub total: Duration,
}

pub struct Finished {
    pub result: GenerateResult,
    /// The calls the model made (its text then holds only the rest).
    pub tool_calls: Vec<ToolCall>,
    /// Each generated token's log-probabilities with its text, when asked for.
    pub logprobs: Vec<TokenLogprob>,
    pub prompt_ids: Vec<u32>,
    pub total: Duration,
    pub load: Duration,
    pub route: RouteInfo,
}

/// A generated token's log-probability and the most likely alternatives',
/// each with its text.
#[derive(Debug, Clone)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

impl TokenLogprob {
    fn of(tokenizer: &Tokenizer, token: u32, l: &crate::model::sampling::Logprobs) -> Self {
        let text = |id: u32| tokenizer.decode(&[id]).unwrap_or_default();
        Self { token: text(token), logprob: l.logprob, top: l.top.iter().map(|&(id, lp)| (text(id), lp)).collect() }
    }
}

/// Waits for the whole generation: its text and final stats, or its error.
pub async fn collect(mut rx: mpsc::Receiver<Event>) -> Result<(String, Box<Finished>), ApiError> {
    let mut text = String::new();
    while let Some(event) = rx.recv().await {
        match event {
            Event::Text(t, _) => text.push_str(&t),
            Event::Done(f) => return Ok((text, f)),
            Event::Failed(e) => return Err(e),
        }
    }
    Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the generation ended without a result"))
}

/// A streaming HTTP body from a generation's events, one `render`ed chunk per
/// event; the stream ends after the final event.
pub fn event_body(rx: mpsc::Receiver<Event>, render: impl Fn(Event) -> Vec<String> + Send + Sync + 'static) -> axum::body::Body {
    let render = Arc::new(render);
    let chunks = futures_util::stream::unfold((rx, false), move |(mut rx, done)| {
        let render = render.clone();
        async move {
            if done {
                return None;
            }
            let event = rx.recv().await?;
            let last = !matches!(event, Event::Text(..));
            Some((Ok::<_, std::convert::Infallible>(render(event).concat()), (rx, last)))
        }
    });
    axum::body::Body::from_stream(chunks)
}

pub struct Service {
    pub cfg: ServeConfig,
    pub metrics: Metrics,
    pub queue: Queue,
    pub started: SystemTime,
    workers: tokio::sync::Mutex<HashMap<String, Arc<Worker>>>,
    manager: Option<Arc<ClusterManager>>,
    local: Option<LocalNodes>,
    /// (when, tokens generated so far): the dashboard's live tok/s.
    samples: Mutex<VecDeque<(Instant, u64)>>,
    /// The last minutes, for the dashboard's charts.
    pub history: super::history::History,
    conversations: Conversations,
    /// The catalog, read once at start.
    catalog: Catalog,
    handle: tokio::runtime::Handle,
}

/// One copy of a model on its nodes.
pub struct Replica {
    /// Its chain, shared by its generations and rebuilt when a node dies.
    chain: Arc<SharedChain>,
    /// Where it runs (node names; addresses and blocks come from the chain).
    route: Mutex<RouteInfo>,
    /// Generations running on it now: its queue depth.
    active: std::sync::atomic::AtomicUsize,
    /// Requests it has taken.
    served: std::sync::atomic::AtomicU64,
}

impl Replica {
    fn new(chain: Arc<SharedChain>, route: RouteInfo) -> Self {
        Self { chain, route: Mutex::new(route), active: Default::default(), served: Default::default() }
    }

    /// The pipeline now (a recovery, a drain or a rebalance may have changed it).
    pub fn pipeline(&self) -> Arc<Pipeline> {
        self.chain.current().1
    }

    /// Generations running on it now, and requests it has taken.
    pub fn load(&self) -> (usize, u64) {
        (self.active.load(std::sync::atomic::Ordering::Acquire), self.served.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Where it runs now: the chain's addresses and blocks, named as
    /// when it was routed (a node that joined later goes by its address).
    pub fn route(&self) -> RouteInfo {
        let mut route = self.route.lock().expect("route lock").clone();
        let p = self.pipeline();
        route.nodes = p
            .addrs()
            .into_iter()
            .zip(p.loaded())
            .map(|(addr, l)| {
                let name = route.nodes.iter().find(|s| s.addr == addr).map_or_else(|| addr.clone(), |s| s.name.clone());
                RouteStage { name, addr, layers: [l.start as usize, l.end as usize - 1] }
            })
            .collect();
        route.single_node = route.nodes.len() == 1;
        route
    }
}

/// Counts a generation as running on a replica until dropped.
struct OnReplica<'a>(&'a Replica);

impl<'a> OnReplica<'a> {
    fn new(replica: &'a Replica) -> Self {
        replica.active.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        replica.served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(replica)
    }
}

impl Drop for OnReplica<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Worker {
    pub fn replicas(&self) -> &[Replica] {
        &self.replicas
    }

    /// Where the model runs: its first copy.
    pub fn route(&self) -> RouteInfo {
        self.replicas[0].route()
    }

    /// Blocks moved between this model's stages by dynamic rebalancing so far.
    pub fn rebalances(&self) -> u64 {
        self.replicas.iter().map(|r| r.chain.rebalances()).sum()
    }

    /// The copy a new request goes to: among those whose nodes are all
    /// healthy (all, if none is), the one running the fewest generations,
    /// then the best summed health score, then the one that took the fewest.
    fn pick(&self, health: &[NodeHealth]) -> usize {
        let node = |addr: &str| health.iter().find(|h| h.addr == addr);
        let routes: Vec<RouteInfo> = self.replicas.iter().map(Replica::route).collect();
        let rank = |i: usize| {
            let route = &routes[i];
            let healthy = route.nodes.iter().all(|s| node(&s.addr).is_none_or(|h| h.healthy));
            let score: f64 = route.nodes.iter().filter_map(|s| node(&s.addr)).map(|h| h.score).sum();
            // What runs on its nodes: a copy whose node died shares another's.
            let shares = |j: usize| routes[j].nodes.iter().any(|s| route.nodes.iter().any(|t| t.addr == s.addr));
            let active: usize = (0..routes.len()).filter(|&j| shares(j)).map(|j| self.replicas[j].load().0).sum();
            (!healthy, active, -score, self.replicas[i].load().1)
        };
        (0..self.replicas.len())
            .map(|i| (i, rank(i)))
            .min_by(|a, b| a.1 .0.cmp(&b.1 .0).then(a.1 .1.cmp(&b.1 .1)).then(a.1 .2.total_cmp(&b.1 .2)).then(a.1 .3.cmp(&b.1 .3)))
            .map_or(0, |(i, _)| i)
    }
}

/// How long a model stays loaded after its last request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    For(Duration),
    Forever,
}

impl Default for KeepAlive {
    /// Ollama's default: five minutes.
    fn default() -> Self {
        KeepAlive::For(Duration::from_secs(300))
    }
}

impl Worker {
    /// When it unloads unless used again (None: never). While requests run
    /// on it the clock has not started: the earliest is a keep-alive from now.
    /// (A non-streamed reply can reach its client a moment before its
    /// request's guard drops and starts the clock.)
    pub fn expires_at(&self) -> Option<SystemTime> {
        if self.active.load(std::sync::atomic::Ordering::Acquire) > 0 {
            return match *self.keep_alive.lock().expect("keep_alive lock") {
                KeepAlive::For(d) => Some(SystemTime::now() + d),
                KeepAlive::Forever => None,
            };
        }
        let at = (*self.expires.lock().expect("expires lock"))?;
        Some(SystemTime::now() + at.saturating_duration_since(Instant::now()))
    }

    /// Sets how long it stays loaded after its last request, and starts the
    /// clock now if nothing runs on it (a load request).
    pub fn keep_alive_for(&self, keep_alive: Option<KeepAlive>) {
        self.set_keep_alive(keep_alive);
        if self.active.load(std::sync::atomic::Ordering::Acquire) == 0 {
            self.start_clock();
        }
    }

    fn set_keep_alive(&self, keep_alive: Option<KeepAlive>) {
        if let Some(k) = keep_alive {
            *self.keep_alive.lock().expect("keep_alive lock") = k;
        }
    }

    /// It unloads its keep-alive from now, unless used again.
    fn start_clock(&self) {
        let expires = match *self.keep_alive.lock().expect("keep_alive lock") {
            KeepAlive::For(d) => Some(Instant::now() + d),
            KeepAlive::Forever => None,
        };
        *self.expires.lock().expect("expires lock") = expires;
    }
}

/// Counts a request as running on its worker until dropped; the last one
/// out starts the keep-alive clock.
struct Running(Arc<Worker>);

impl Running {
    fn new(worker: &Arc<Worker>, keep_alive: Option<KeepAlive>) -> Self {
        worker.active.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        worker.set_keep_alive(keep_alive);
        Self(worker.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.start_clock();
        self.0.active.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The model a client names: a name (catalog, cache, Ollama store,
/// synthetic), the operator's `--model`, or a file inside `--models-dir`.
/// Any other path is "unknown", with the same answer whether it exists or
/// not, so a client learns nothing of the head's files.
/// How often the nodes behind a DNS name are looked up again.
const DNS_DISCOVERY_INTERVAL: Duration = Duration::from_secs(30);

/// Adds the nodes `name` resolves to (those that pass the handshake) to the
/// registry, now and every [`DNS_DISCOVERY_INTERVAL`]: pods of a headless
/// Service come and go. Nodes that leave are the health monitor's to mark.
fn spawn_dns_discovery(manager: &Arc<ClusterManager>, name: String) {
    let weak = Arc::downgrade(manager);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(DNS_DISCOVERY_INTERVAL);
        loop {
            tick.tick().await;
            let Some(m) = weak.upgrade() else { return };
            let found = crate::cluster::discovery::probe_dns(&name, 7070, m.key(), 64, Duration::from_secs(2)).await;
            match found {
                Ok(found) => {
                    for f in found.iter().filter(|f| f.capabilities.is_some()) {
                        let added = m.update_registry(|r| match r.node(&f.addr) {
                            Some(_) => Ok(false),
                            None => r.add_node(&f.addr, &f.addr).map(|_| true),
                        });
                        if let Ok(true) = added {
                            tracing::info!(node = %f.addr, "found through {name}");
                        }
                    }
                }
                Err(e) => tracing::warn!("discovering nodes through {name}: {e}"),
            }
        }
    });
}

/// The local nodes as `replicas` copies of a model (at least one): each copy
/// an even plan over a group of the nodes, in order. Returns the copies'
/// routes and how many nodes they use.
fn local_routes(addrs: &[String], model: &str, n_layers: usize, replicas: usize) -> crate::Result<(Vec<RouteInfo>, usize)> {
    let copies = replicas.clamp(1, addrs.len().max(1));
    let per = (addrs.len() / copies).clamp(1, n_layers);
    let routes = (0..copies)
        .map(|c| {
            let group = &addrs[c * per..(c + 1) * per];
            let plan = partition::even(n_layers, group.len())?;
            Ok(RouteInfo {
                cluster: if copies == 1 { "local".into() } else { format!("local-replica-{}", c + 1) },
                single_node: group.len() == 1,
                model: model.to_string(),
                nodes: group
                    .iter()
                    .zip(plan)
                    .enumerate()
                    .map(|(i, (a, r))| RouteStage {
                        name: format!("local-{}", c * per + i + 1),
                        addr: a.clone(),
                        layers: [r.start, r.end - 1],
                    })
                    .collect(),
            })
        })
        .collect::<crate::Result<Vec<_>>>()?;
    Ok((routes, copies * per))
}

/// What a request's tools ask of a generation: the constraint (one call,
/// when the choice requires it; a request's own `format` otherwise), and the
/// dialect to read calls in (None: no tools offered).
fn tool_use(
    tokenizer: &Tokenizer,
    prompt: &Prompt,
    choice: &ToolChoice,
    format: Option<crate::head::constraint::Format>,
) -> Result<(Option<crate::head::constraint::Format>, Option<tools::Dialect>), ApiError> {
    let tools = match prompt {
        Prompt::Chat { tools, .. } if !tools.is_empty() => tools,
        _ => return Ok((format, None)),
    };
    let dialect = tokenizer.tool_dialect();
    match (tools::call_grammar(dialect, tools, choice), format) {
        (Some(_), Some(_)) => Err(ApiError::bad_request("a required tool call and a response format cannot both shape the output")),
        (Some(call), None) => Ok((Some(call), Some(dialect))),
        (None, format) => Ok((format, Some(dialect))),
    }
}

fn resolve_for_client(spec: &str, trusted: bool, dirs: &[std::path::PathBuf]) -> crate::Result<source::ResolvedModel> {
    if trusted {
        return source::resolve(spec);
    }
    let is_path = source::looks_like_path(spec) || spec.contains('/') && std::path::Path::new(spec).exists();
    if !is_path {
        return source::resolve_name(spec);
    }
    let inside = std::fs::canonicalize(spec)
        .ok()
        .filter(|p| p.is_file() && dirs.iter().filter_map(|d| std::fs::canonicalize(d).ok()).any(|d| p.starts_with(d)));
    match inside {
        Some(path) => Ok(source::ResolvedModel { name: spec.to_string(), path }),
        None => Err(crate::Error::UnknownModel(spec.to_string())),
    }
}

/// One stage moved by a drain.
#[derive(Debug, Clone)]
pub struct Drained {
    pub model: String,
    /// 1-based stage number.
    pub stage: usize,
    pub to: String,
    pub replaced: crate::head::pipeline::Replaced,
}

impl Service {
    /// Registry mode when the registry lists nodes, else local nodes on loopback.
    pub async fn start(cfg: ServeConfig) -> crate::Result<Arc<Self>> {
        let registry = Registry::load_default()?;
        let key = ClusterKey::new(cfg.key.as_deref());
        let (manager, local) = if registry.nodes.is_empty() && cfg.discover_dns.is_none() {
            let bin = std::env::current_exe().map_err(|e| crate::Error::io("cannot find this executable", e))?;
            let threads = if cfg.threads == 0 { crate::sys::cpu_cores() } else { cfg.threads };
            let n = cfg.local_nodes.max(1);
            let local = tokio::task::spawn_blocking(move || LocalNodes::spawn(&bin, n, threads, false))
                .await
                .map_err(|e| crate::Error::InvalidRequest(e.to_string()))??;
            (None, Some(local))
        } else {
            // Links are timed when a node is first seen idle, then every five minutes.
            let policy = HealthPolicy { probe_every: Some(std::time::Duration::from_secs(300)), ..HealthPolicy::default() };
            let m = ClusterManager::new(registry, key, policy)?;
            m.spawn_monitor();
            if let Some(name) = &cfg.discover_dns {
                spawn_dns_discovery(&m, name.clone());
            }
            (Some(m), None)
        };
        let parallel = cfg.parallel;
        let max_queue = cfg.max_queue;
        let kv_cache_bytes = cfg.kv_cache_mb << 20;
        let catalog = Catalog::load()?;
        let svc = Arc::new(Self {
            cfg,
            metrics: Metrics::default(),
            queue: Queue::new(parallel, max_queue),
            started: SystemTime::now(),
            workers: tokio::sync::Mutex::new(HashMap::new()),
            manager,
            local,
            samples: Mutex::new(VecDeque::new()),
            history: Default::default(),
            conversations: Conversations::new(kv_cache_bytes),
            catalog,
            handle: tokio::runtime::Handle::current(),
        });
        svc.spawn_expiry();
        svc.spawn_sampler();
        Ok(svc)
    }

    /// The catalog's name for an alias (`smollm2:135m` → `smollm2`), else the name as given.
    pub fn canonical(&self, name: &str) -> String {
        let name = name.trim();
        self.catalog.find(name).map_or_else(|| name.to_string(), |e| e.name.clone())
    }

    /// The catalog's entry for `name` (or an alias of it).
    pub fn catalog_entry(&self, name: &str) -> Option<crate::model::catalog::CatalogEntry> {
        self.catalog.find(name.trim()).cloned()
    }

    pub async fn loaded(&self) -> Vec<Arc<Worker>> {
        self.workers.lock().await.values().cloned().collect()
    }

    /// The worker for `model`, loading it (on the local nodes, or wherever
    /// routing sends it) when it is not loaded yet.
    pub async fn worker(&self, model: &str) -> Result<Arc<Worker>, ApiError> {
        if model.trim().is_empty() {
            return Err(ApiError::bad_request("model is required"));
        }
        let name = self.canonical(model);
        let mut workers = self.workers.lock().await;
        if let Some(w) = workers.get(&name) {
            return Ok(w.clone());
        }
        if self.local.is_some() {
            // Local nodes hold one model at a time: another replaces it only
            // when none of its generations would be cut off.
            if let Some(busy) = workers.values().find(|w| w.active.load(std::sync::atomic::Ordering::Acquire) > 0) {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the local nodes are serving '{}'; '{name}' can load once its generations finish", busy.name),
                ));
            }
        }
        let started = Instant::now();
        let spec = name.clone();
        let trusted = self.canonical(&self.cfg.default_model) == name;
        let dirs = self.cfg.model_dirs.clone();
        let opened = tokio::task::spawn_blocking(move || -> crate::Result<_> {
            let resolved = resolve_for_client(&spec, trusted, &dirs)?;
            let file = ModelFile::open(&resolved.path)?;
            let tokenizer = Tokenizer::for_model(&file)?;
            let config = file.config()?;
            let digest = file.digest()?;
            let layer_bytes = file.layer_bytes()?;
            let size = std::fs::metadata(&resolved.path).map(|m| m.len()).unwrap_or(0);
            let quantization = file.quantization();
            Ok((resolved, tokenizer, config, digest, layer_bytes, size, quantization))
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| match e {
            crate::Error::UnknownModel(_) | crate::Error::Fetch { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, format!("model '{model}' not found: {e}"))
            }
            e => ApiError::from(e),
        })?;
        let (resolved, tokenizer, config, digest, layer_bytes, size, quantization) = opened;
        let spec = if source::looks_like_path(&name) { resolved.path.display().to_string() } else { name.clone() };
        // Each copy's route, the key, and the nodes no copy uses.
        let (routes, key, spare): (Vec<RouteInfo>, _, Vec<String>) = match (&self.manager, &self.local) {
            (Some(m), _) => {
                let routes: Vec<RouteInfo> = m.route_replicas(&spec, self.cfg.replicas).await?.iter().map(|e| m.route_info(e)).collect();
                let spare = m
                    .registry()
                    .nodes
                    .iter()
                    .map(|n| n.addr.clone())
                    .filter(|a| !routes.iter().any(|r| r.nodes.iter().any(|s| &s.addr == a)))
                    .collect();
                (routes, ClusterKey::new(self.cfg.key.as_deref()), spare)
            }
            (None, Some(local)) => {
                // Local nodes hold one model at a time: a new model replaces the old.
                workers.clear();
                let (routes, used) = local_routes(&local.addrs, &name, config.n_layers, self.cfg.replicas)?;
                (routes, ClusterKey::new(Some(&local.key)), local.addrs[used..].to_vec())
            }
            (None, None) => unreachable!("the service starts with a registry or local nodes"),
        };
        let spec = ChainSpec {
            model: spec.clone(),
            digest: Some(digest.clone()),
            layer_bytes,
            context_length: config.context_length,
            key,
            wire: self.cfg.wire,
            strategy: Strategy::MemoryAware,
            micro_batches: self.cfg.micro_batches,
        };
        // The copies build at once. A copy's dead node is replaced first by
        // another copy's (which holds the model already), then by a spare.
        let builds = routes.iter().enumerate().map(|(i, route)| {
            let chain: Vec<_> = route.nodes.iter().map(|s| (s.addr.clone(), s.layers[0]..s.layers[1] + 1)).collect();
            let others = routes.iter().enumerate().filter(|(j, _)| *j != i).flat_map(|(_, r)| r.nodes.iter().map(|s| s.addr.clone()));
            let standby: Vec<String> = others.chain(spare.iter().cloned()).collect();
            let (handle, spec) = (self.handle.clone(), spec.clone());
            tokio::task::spawn_blocking(move || SharedChain::build(handle, spec, chain, standby))
        });
        let mut replicas = Vec::new();
        for (built, route) in futures_util::future::join_all(builds).await.into_iter().zip(routes) {
            let chain = built.map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
            chain.rebalance_above(self.cfg.rebalance_threshold);
            replicas.push(Replica::new(chain, route));
        }
        let worker = Arc::new(Worker {
            name: name.clone(),
            digest,
            size,
            config,
            tokenizer,
            replicas,
            active: std::sync::atomic::AtomicUsize::new(0),
            keep_alive: Mutex::new(KeepAlive::default()),
            expires: Mutex::new(None),
            loaded_at: SystemTime::now(),
            load_duration: started.elapsed(),
            quantization,
        });
        tracing::info!(model = %name, path = %resolved.path.display(), "loaded in {:?}", started.elapsed());
        workers.insert(name, worker.clone());
        Ok(worker)
    }

    /// Starts a generation: loads the model if needed, checks the prompt,
    /// waits for a slot, and streams events until `Done` or `Failed`. A
    /// receiver that is dropped cancels the generation, which frees the
    /// session on every stage.
    pub async fn generate(self: &Arc<Self>, req: GenRequest) -> Result<mpsc::Receiver<Event>, ApiError> {
        let started = Instant::now();
        req.params.validate()?;
        // Admission first: a full queue refuses before anything is loaded.
        let permit = match self.queue.acquire(req.priority).await {
            Ok(p) => p,
            Err(e) => {
                self.metrics.rejected();
                return Err(e.into());
            }
        };
        let had = self.workers.lock().await.contains_key(&self.canonical(&req.model));
        let worker = self.worker(&req.model).await?;
        let load = if had { Duration::ZERO } else { worker.load_duration };
        let (format, calls) = tool_use(&worker.tokenizer, &req.prompt, &req.tool_choice, req.format)?;
        if let Some(format) = &format {
            // A schema that does not compile is the client's to fix: refuse it
            // now, not inside a stream that has already answered 200.
            worker.tokenizer.grammars()?.constraint(format)?;
        }
        let mut prompt_ids = req.context.clone();
        prompt_ids.extend(worker.tokenizer.prompt_ids(&req.prompt)?);
        let context = if req.num_ctx == 0 { worker.config.context_length } else { req.num_ctx.min(worker.config.context_length) };
        if prompt_ids.len() >= context {
            return Err(crate::Error::ContextOverflow { prompt: prompt_ids.len(), context }.into());
        }
        let (running, waiting) = self.queue.depth();
        self.metrics.queue(running, waiting);
        let (tx, rx) = mpsc::channel(64);
        let service = self.clone();
        let reused = if req.keep { self.conversations.take(&worker.name, &prompt_ids) } else { None };
        // A conversation's next turn goes where its KV state is; others to the least busy copy.
        let kept_on = reused.as_ref().and_then(|(_, _, p)| worker.replicas.iter().position(|r| Arc::ptr_eq(&r.pipeline(), p)));
        let reused = if kept_on.is_some() { reused.map(|(s, r, _)| (s, r)) } else { None };
        let replica = match kept_on {
            Some(i) => i,
            None => worker.pick(&self.node_health_now()),
        };
        let mut gen = GenerateRequest {
            prompt: prompt_ids.clone(),
            params: req.params,
            max_tokens: req.max_tokens,
            stop: req.stop,
            context,
            resume: reused.as_ref().map(|(_, r)| *r),
            keep_session: req.keep,
            logprobs: req.logprobs,
            format,
        };
        let running = Running::new(&worker, req.keep_alive);
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let replica = &worker.replicas[replica];
            let _on_replica = OnReplica::new(replica);
            let mut engine = FailoverEngine::over(replica.chain.clone());
            let mut session = reused.as_ref().map_or_else(rand::random::<u64>, |(s, _)| *s);
            let (cancelled, sent_any) = (std::cell::Cell::new(false), std::cell::Cell::new(false));
            let mut calls = calls.map(ToolStream::new);
            // Log-probabilities of tokens whose text is held back go with the next piece shown.
            let mut pending: Vec<TokenLogprob> = Vec::new();
            let mut on_text = |piece: Piece<'_>| {
                // Text that may be a tool call waits for the end to decide.
                let shown = match calls.as_mut() {
                    Some(c) => c.push(piece.text),
                    None => piece.text.to_string(),
                };
                pending.extend(piece.tokens.iter().zip(piece.logprobs).map(|(&t, l)| TokenLogprob::of(&worker.tokenizer, t, l)));
                let sent = if shown.is_empty() {
                    !tx.is_closed()
                } else {
                    tx.blocking_send(Event::Text(shown, std::mem::take(&mut pending))).is_ok()
                };
                cancelled.set(cancelled.get() || !sent);
                sent_any.set(true);
                sent
            };
            let mut result = generate(&mut engine as &mut dyn Engine, &worker.tokenizer, session, &gen, &mut on_text);
            if result.is_err() && gen.resume.is_some() && !sent_any.get() {
                // The cached state is gone (node restarted, evicted): recompute.
                session = rand::random();
                gen.resume = None;
                result = generate(&mut engine as &mut dyn Engine, &worker.tokenizer, session, &gen, &mut on_text);
            }
            if let (Ok(r), true) = (&result, gen.keep_session) {
                let capacity = gen.resume.map_or(gen.context, |r| r.capacity);
                let c = &worker.config;
                // K and V in f32 as a GPU stage keeps them; a CPU stage keeps
                // f16, half of it, so the budget bounds what stages hold from above.
                let bytes_per_token = 2 * c.n_layers * c.n_kv_heads * c.head_dim * 4;
                let turn = Conversation {
                    model: worker.name.clone(),
                    session,
                    fed: r.fed.clone(),
                    capacity,
                    pipeline: replica.pipeline(),
                    bytes_per_token,
                };
                for (pipeline, session) in service.conversations.keep(turn) {
                    service.handle.block_on(pipeline.close(session));
                }
            }
            if cancelled.get() {
                service.metrics.cancelled();
            }
            let (held, tool_calls) = calls.map(ToolStream::finish).unwrap_or_default();
            if !held.is_empty() && result.is_ok() {
                let _ = tx.blocking_send(Event::Text(held, pending));
            }
            let event = match result {
                Ok(result) => {
                    let route = replica.route();
                    let stage_names: Vec<String> = route.nodes.iter().map(|n| n.name.clone()).collect();
                    service.metrics.generation(&result.stats, &stage_names);
                    if let (Some(m), true) = (&service.manager, result.stats.generated_tokens > 1) {
                        // Measured speed feeds the health score and latency-aware plans.
                        for n in &route.nodes {
                            m.record_speed(&n.name, result.stats.decode_tok_s());
                        }
                    }
                    service.sample_tokens();
                    service.history.generation(&worker.name, &result.stats.hop_latencies);
                    replica.chain.measured(&result.stats.stage_times, result.stats.prompt_tokens + result.stats.generated_tokens);
                    let logprobs =
                        result.tokens.iter().zip(&result.logprobs).map(|(&t, l)| TokenLogprob::of(&worker.tokenizer, t, l)).collect();
                    Event::Done(Box::new(Finished {
                        result,
                        tool_calls,
                        logprobs,
                        prompt_ids,
                        total: started.elapsed(),
                        load,
                        route: replica.route(),
                    }))
                }
                Err(e) => Event::Failed(e.into()),
            };
            // Done before the client hears the end, so that what it asks
            // next (an unload, `/api/ps`) sees this request finished.
            drop(_on_replica);
            drop(running);
            drop(_permit);
            let _ = tx.blocking_send(event);
            let (running, waiting) = service.queue.depth();
            service.metrics.queue(running, waiting);
        });
        Ok(rx)
    }

    /// Embeds each input: admitted like a generation (a queue slot, then the
    /// model's worker), tokenized, cut to the model's context when
    /// `truncate` (else refused when longer), and pooled by the chain's last
    /// stage (mean of the final hidden states, L2-normalised).
    pub async fn embed(
        self: &Arc<Self>,
        model: &str,
        inputs: Vec<String>,
        truncate: bool,
        keep_alive: Option<KeepAlive>,
    ) -> Result<Embedded, ApiError> {
        let started = Instant::now();
        if inputs.is_empty() {
            return Err(ApiError::bad_request("input must not be empty"));
        }
        let _permit = match self.queue.acquire(0).await {
            Ok(p) => p,
            Err(e) => {
                self.metrics.rejected();
                return Err(e.into());
            }
        };
        let had = self.workers.lock().await.contains_key(&self.canonical(model));
        let worker = self.worker(model).await?;
        let context = worker.config.context_length;
        let mut ids = Vec::with_capacity(inputs.len());
        for text in &inputs {
            let mut t = worker.tokenizer.encode(text)?;
            if t.len() > context {
                if !truncate {
                    return Err(crate::Error::ContextOverflow { prompt: t.len(), context }.into());
                }
                t.truncate(context);
            }
            if t.is_empty() {
                return Err(ApiError::bad_request("an input has no tokens"));
            }
            ids.push(t);
        }
        let prompt_tokens = ids.iter().map(Vec::len).sum();
        let _running = Running::new(&worker, keep_alive);
        let replica = worker.pick(&self.node_health_now());
        let (chain, pooling) = (worker.replicas[replica].chain.clone(), worker.config.pooling);
        let embeddings = tokio::task::spawn_blocking(move || -> crate::Result<Vec<Vec<f32>>> {
            let mut engine = FailoverEngine::over(chain);
            ids.iter().map(|t| crate::head::generation::embed(&mut engine, rand::random(), t, pooling)).collect()
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
        let load = if had { Duration::ZERO } else { worker.load_duration };
        Ok(Embedded { embeddings, prompt_tokens, load, total: started.elapsed() })
    }

    /// Unloads `model` now if it is loaded and idle: its slices leave the
    /// nodes. False when it was not loaded.
    pub async fn unload(&self, model: &str) -> Result<bool, ApiError> {
        let name = self.canonical(model);
        let worker = {
            let mut workers = self.workers.lock().await;
            match workers.get(&name) {
                None => return Ok(false),
                Some(w) if w.active.load(std::sync::atomic::Ordering::Acquire) > 0 => {
                    return Err(ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("'{name}' is serving requests; it unloads when they finish"),
                    ))
                }
                Some(_) => workers.remove(&name).expect("just found"),
            }
        };
        Self::unload_chain(&worker).await;
        Ok(true)
    }

    async fn unload_chain(worker: &Worker) {
        for pipeline in worker.replicas.iter().map(Replica::pipeline) {
            for i in 0..pipeline.n_stages() {
                let unload = crate::net::frame::Frame::new(crate::net::message::Message::Unload);
                if let Err(e) = pipeline.request(i, unload, Duration::from_secs(15)).await {
                    tracing::warn!(model = %worker.name, stage = i + 1, "unloading: {e}");
                }
            }
        }
        tracing::info!(model = %worker.name, "unloaded (keep_alive ran out)");
    }

    /// Unloads the models whose keep-alive ran out, once a second.
    fn spawn_expiry(self: &Arc<Self>) {
        let svc = Arc::downgrade(self);
        self.handle.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let Some(svc) = svc.upgrade() else { return };
                let expired: Vec<Arc<Worker>> = {
                    let mut workers = svc.workers.lock().await;
                    let due: Vec<String> = workers
                        .iter()
                        .filter(|(_, w)| {
                            w.active.load(std::sync::atomic::Ordering::Acquire) == 0
                                && w.expires.lock().expect("expires lock").is_some_and(|t| t <= Instant::now())
                        })
                        .map(|(n, _)| n.clone())
                        .collect();
                    due.iter().filter_map(|n| workers.remove(n)).collect()
                };
                for w in expired {
                    Self::unload_chain(&w).await;
                }
            }
        });
    }

    /// Samples the history every [`super::history::INTERVAL`].
    fn spawn_sampler(self: &Arc<Self>) {
        let svc = Arc::downgrade(self);
        self.handle.spawn(async move {
            let mut tick = tokio::time::interval(super::history::INTERVAL);
            loop {
                tick.tick().await;
                let Some(svc) = svc.upgrade() else { return };
                let nodes = svc.node_health().await;
                let t = svc.started.elapsed().map_or(0.0, |d| d.as_secs_f64());
                svc.history.sample(t, svc.recent_tok_s(), &nodes);
            }
        });
    }

    /// Conversations held for their next turn (shown on the dashboard).
    pub fn conversations(&self) -> usize {
        self.conversations.len()
    }

    fn sample_tokens(&self) {
        let mut s = self.samples.lock().expect("samples lock");
        s.push_back((Instant::now(), self.metrics.tokens_generated()));
        while s.len() > 2 && s.front().is_some_and(|(t, _)| t.elapsed() > Duration::from_secs(30)) {
            s.pop_front();
        }
    }

    /// Tokens per second over the last 30 s of finished generations.
    pub fn recent_tok_s(&self) -> f64 {
        let s = self.samples.lock().expect("samples lock");
        match (s.front(), s.back()) {
            (Some((t0, n0)), Some((_, n1))) if t0.elapsed() > Duration::from_millis(100) => (n1 - n0) as f64 / t0.elapsed().as_secs_f64(),
            _ => 0.0,
        }
    }

    /// Moves every loaded model's stage on `node` (a registered name or an
    /// address) to `to`, or, with a registry, to the healthy registered node
    /// with the most free memory outside that chain that can hold the slice;
    /// live sessions keep their KV state (see `Pipeline::replace_stage`).
    pub async fn drain(&self, node: &str, to: Option<&str>) -> crate::Result<Vec<Drained>> {
        let addr_of = |name: &str| -> String {
            self.manager.as_ref().and_then(|m| m.registry().node(name).map(|e| e.addr.clone())).unwrap_or_else(|| name.to_string())
        };
        let node_addr = addr_of(node);
        let mut out = Vec::new();
        for worker in self.loaded().await {
            for replica in &worker.replicas {
                let addrs = replica.pipeline().addrs();
                let Some(stage) = addrs.iter().position(|a| *a == node_addr) else {
                    continue;
                };
                let target = match to {
                    Some(t) => t.to_string(),
                    None => self.spare_for(replica, &addrs, stage).await?,
                };
                let client = self.node_client(&target).await?;
                let replaced = replica.pipeline().replace_stage(stage, client).await?;
                {
                    let mut route = replica.route.lock().expect("route lock");
                    if let Some(s) = route.nodes.get_mut(stage) {
                        s.name = target.clone();
                        s.addr = replaced.new.clone();
                    }
                }
                out.push(Drained { model: worker.name.clone(), stage: stage + 1, to: target, replaced });
            }
        }
        if out.is_empty() {
            return Err(crate::Error::InvalidRequest(format!("no loaded model runs on {node}")));
        }
        Ok(out)
    }

    /// The registered node that can best take stage `stage` of `replica`.
    async fn spare_for(&self, replica: &Replica, chain: &[String], stage: usize) -> crate::Result<String> {
        let Some(m) = &self.manager else {
            return Err(crate::Error::InvalidRequest("without a registry, name the node to move to ('to')".into()));
        };
        let need = replica.pipeline().loaded().get(stage).map_or(0, |l| l.weight_bytes);
        let mut best: Option<(u64, String)> = None;
        for entry in m.registry().nodes.iter().filter(|e| !chain.contains(&e.addr)) {
            let Ok(client) = m.client(&entry.name).await else {
                continue;
            };
            let Ok(caps) = client.refresh_capabilities().await else {
                continue;
            };
            if caps.loaded.is_none() && caps.free_memory >= need && best.as_ref().is_none_or(|(free, _)| caps.free_memory > *free) {
                best = Some((caps.free_memory, entry.name.clone()));
            }
        }
        best.map(|(_, name)| name).ok_or_else(|| {
            crate::Error::InvalidRequest(format!(
                "no healthy idle registered node outside the chain has {} free for the slice",
                crate::sys::human_bytes(need)
            ))
        })
    }

    async fn node_client(&self, name_or_addr: &str) -> crate::Result<Arc<NodeClient>> {
        if let Some(m) = &self.manager {
            if m.registry().node(name_or_addr).is_some() {
                return m.client(name_or_addr).await;
            }
        }
        let key = match &self.local {
            Some(local) => ClusterKey::new(Some(&local.key)),
            None => ClusterKey::new(self.cfg.key.as_deref()),
        };
        let endpoint = crate::net::tls::client_endpoint(crate::net::resolve_addr(name_or_addr).await?)?;
        Ok(NodeClient::connect(&endpoint, name_or_addr, &key).await?)
    }

    /// The registry's nodes' health as last checked (none with local nodes).
    fn node_health_now(&self) -> Vec<NodeHealth> {
        self.manager.as_ref().map(|m| m.health()).unwrap_or_default()
    }

    /// Health of every node serving this head.
    pub async fn node_health(&self) -> Vec<NodeHealth> {
        let health = match (&self.manager, &self.local) {
            (Some(m), _) => m.health(),
            (None, Some(local)) => {
                let clients: Vec<_> = self
                    .workers
                    .lock()
                    .await
                    .values()
                    .flat_map(|w| w.replicas.iter().flat_map(|r| r.pipeline().clients().to_vec()).collect::<Vec<_>>())
                    .collect();
                let mut out = Vec::new();
                for (i, addr) in local.addrs.iter().enumerate() {
                    let mut h = NodeHealth::unknown(&format!("local-{}", i + 1), addr);
                    match clients.iter().find(|c| &c.addr == addr) {
                        Some(c) => match c.ping(Duration::from_secs(1)).await {
                            Ok(p) => h.answered(&p, c.refresh_capabilities().await.unwrap_or_else(|_| c.capabilities())),
                            Err(e) => h.missed(&HealthPolicy::default(), e.to_string()),
                        },
                        None => {
                            h.healthy = true;
                            h.last_error = Some("idle: no model loaded".into());
                        }
                    }
                    out.push(h);
                }
                out
            }
            (None, None) => Vec::new(),
        };
        for h in &health {
            self.metrics.node_health(&h.name, h.healthy);
        }
        health
    }
}
