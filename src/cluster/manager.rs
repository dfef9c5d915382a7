//! The cluster manager: the registry plus live connections and health, and
//! the operations of the design doc — create a cluster, check its health,
//! and route a model to a single node or a cluster.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde::Serialize;

use super::health::{HealthPolicy, NodeHealth};
use super::models::{model_info, ModelInfo};
use super::partition::{self, Assignment, NodeSpec, Strategy};
use super::registry::{ClusterEntry, NodeEntry, Registry};
use crate::error::{Error, Result};
use crate::head::client::NodeClient;
use crate::net::auth::ClusterKey;
use crate::net::frame::Frame;
use crate::net::message::{LoadRequest, Message};
use crate::net::probe::{LinkTiming, PEER_PROBE_REPLY_WAIT};
use crate::net::{tls, NetError};

/// How long a link probe may take in all (16 MiB at 5 Mbit/s is 27 s).
const PROBE_WAIT: Duration = Duration::from_secs(30);

pub struct ClusterManager {
    registry: Mutex<Registry>,
    key: ClusterKey,
    endpoint: quinn::Endpoint,
    clients: Mutex<HashMap<String, Arc<NodeClient>>>,
    health: Mutex<HashMap<String, NodeHealth>>,
    policy: HealthPolicy,
}

/// The routing facts every generation carries (the design doc's `_cluster`).
#[derive(Debug, Clone, Serialize)]
pub struct RouteInfo {
    /// The cluster's name, or the node's for a single-node route.
    pub cluster: String,
    pub single_node: bool,
    pub model: String,
    pub nodes: Vec<RouteStage>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RouteStage {
    pub name: String,
    pub addr: String,
    /// First and last block, inclusive (the doc's notation).
    pub layers: [usize; 2],
}

/// A cluster's health: healthy only when every node is up and still holds its slice.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterHealth {
    pub name: String,
    pub healthy: bool,
    pub down: Vec<String>,
    pub nodes: Vec<NodeHealth>,
}

impl ClusterManager {
    pub fn new(registry: Registry, key: ClusterKey, policy: HealthPolicy) -> Result<Arc<Self>> {
        let endpoint = tls::client_endpoint("0.0.0.0:0".parse().expect("address"))?;
        Ok(Arc::new(Self {
            registry: Mutex::new(registry),
            key,
            endpoint,
            clients: Mutex::new(HashMap::new()),
            health: Mutex::new(HashMap::new()),
            policy,
        }))
    }

    pub fn registry(&self) -> Registry {
        self.registry.lock().expect("registry lock").clone()
    }

    /// Changes the registry and saves it.
    /// The cluster key it talks to nodes with.
    pub fn key(&self) -> &ClusterKey {
        &self.key
    }

    pub fn update_registry<T>(&self, f: impl FnOnce(&mut Registry) -> Result<T>) -> Result<T> {
        let mut reg = self.registry.lock().expect("registry lock");
        let out = f(&mut reg)?;
        reg.save()?;
        Ok(out)
    }

    fn entry(&self, name: &str) -> Result<NodeEntry> {
        self.registry
            .lock()
            .expect("registry lock")
            .node(name)
            .cloned()
            .ok_or_else(|| Error::InvalidRequest(format!("no node named '{name}' in the registry")))
    }

    /// The live connection to a node, (re)connecting when there is none.
    pub async fn client(&self, name: &str) -> Result<Arc<NodeClient>> {
        let entry = self.entry(name)?;
        if let Some(c) = self.clients.lock().expect("clients lock").get(&entry.name) {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        // Not under the lock: a dead node's connect must not hold up the others.
        let c = NodeClient::connect(&self.endpoint, &entry.addr, &self.key).await?;
        self.clients.lock().expect("clients lock").insert(entry.name.clone(), c.clone());
        Ok(c)
    }

    /// Pings one node and updates its health; times its link too when the
    /// policy says it is due.
    pub async fn check(&self, name: &str) -> NodeHealth {
        let addr = self.entry(name).map(|e| e.addr).unwrap_or_default();
        let probe_due = self.policy.probe_every.is_some_and(|every| {
            let health = self.health.lock().expect("health lock");
            health.get(name).and_then(|h| h.probed_at).is_none_or(|at| at.elapsed() >= every)
        });
        let result: Result<_> = async {
            let c = tokio::time::timeout(self.policy.timeout * 3, self.client(name))
                .await
                .map_err(|_| NetError::Timeout(self.policy.timeout * 3, format!("a connection to {name}")))??;
            let ping = c.ping(self.policy.timeout).await?;
            let caps = c.refresh_capabilities().await?;
            // Only while the node holds no sessions: a probe's megabytes
            // would share the link with their steps.
            let link = if probe_due && ping.sessions == 0 { Some(c.probe(ping.rtt, PROBE_WAIT).await) } else { None };
            Ok((ping, caps, link))
        }
        .await;
        let mut health = self.health.lock().expect("health lock");
        let h = health.entry(name.to_string()).or_insert_with(|| NodeHealth::unknown(name, &addr));
        match result {
            Ok((ping, caps, link)) => {
                h.answered(&ping, caps);
                if let Some(link) = link {
                    // A failed probe waits for the next turn too.
                    h.probed_at = Some(Instant::now());
                    match link {
                        Ok(bits) => h.link_bits_per_sec = Some(bits),
                        Err(e) => tracing::warn!(node = name, "could not time the link: {e}"),
                    }
                }
            }
            Err(e) => h.missed(&self.policy, e.to_string()),
        }
        h.clone()
    }

    /// Pings every registered node, concurrently.
    pub async fn check_all(&self) -> Vec<NodeHealth> {
        let names: Vec<String> = self.registry().nodes.iter().map(|n| n.name.clone()).collect();
        join_all(names.iter().map(|n| self.check(n))).await
    }

    /// Pings every node every `policy.interval`, for as long as the manager lives.
    pub fn spawn_monitor(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        let interval = self.policy.interval;
        tokio::spawn(async move {
            while let Some(m) = weak.upgrade() {
                m.check_all().await;
                drop(m);
                tokio::time::sleep(interval).await;
            }
        })
    }

    /// The last known health of every registered node.
    pub fn health(&self) -> Vec<NodeHealth> {
        let health = self.health.lock().expect("health lock");
        self.registry()
            .nodes
            .iter()
            .map(|n| health.get(&n.name).cloned().unwrap_or_else(|| NodeHealth::unknown(&n.name, &n.addr)))
            .collect()
    }

    /// The design doc's `get_healthy_nodes`.
    pub fn healthy_nodes(&self) -> Vec<NodeEntry> {
        let healthy: Vec<String> = self.health().into_iter().filter(|h| h.healthy).map(|h| h.name).collect();
        self.registry().nodes.into_iter().filter(|n| healthy.contains(&n.name)).collect()
    }

    /// Feeds a generation's decode speed into the node's score.
    pub fn record_speed(&self, node: &str, tok_s: f64) {
        if let Some(h) = self.health.lock().expect("health lock").get_mut(node) {
            h.tok_s = Some(h.tok_s.map_or(tok_s, |old| 0.7 * old + 0.3 * tok_s));
            h.score = super::health::score(h);
        }
    }

    /// What planning knows of each node: memory it offers (what it holds now
    /// is freed by a new load), speed, round trip.
    fn node_specs(&self, names: &[String]) -> Result<Vec<NodeSpec>> {
        let health = self.health.lock().expect("health lock");
        names
            .iter()
            .map(|name| {
                let h =
                    health.get(name).filter(|h| h.healthy).ok_or_else(|| Error::InvalidRequest(format!("node {name} is not healthy")))?;
                let caps = h.capabilities.as_ref().ok_or_else(|| Error::InvalidRequest(format!("node {name} has not reported")))?;
                let held = caps.loaded.as_ref().map_or(0, |l| l.weight_bytes);
                Ok(NodeSpec {
                    name: name.clone(),
                    memory: caps.free_memory + held,
                    bytes_per_sec: h.tok_s.zip(caps.loaded.as_ref()).map_or(0.0, |(t, l)| t * l.weight_bytes as f64),
                    rtt_secs: h.rtt_ms.unwrap_or(0.0) / 1e3,
                    peer_rtt_secs: Default::default(),
                })
            })
            .collect()
    }

    /// The links of a chain through the registered nodes `names`, in the
    /// order a decode token crosses them round the ring: each node → the
    /// next, and the last → the first (each timed by the node it leaves: the
    /// head cannot see those links). None for one node, which feeds itself.
    /// Throughput too when `rate`: a second or so of traffic on each link.
    pub async fn time_chain(&self, names: &[String], rate: bool) -> Result<Vec<LinkTiming>> {
        let mut links = Vec::new();
        if names.len() < 2 {
            return Ok(links);
        }
        // Each node to the next, and the last back to the first: the ring.
        for (from, to) in names.iter().zip(names.iter().cycle().skip(1)) {
            let to = self.entry(to)?.addr;
            links.push(self.client(from).await?.probe_peer(&to, rate, PEER_PROBE_REPLY_WAIT).await?);
        }
        Ok(links)
    }

    /// Each node's round trips to the others, as it times them: the links
    /// between stages are not the head's. A pair that cannot be timed is
    /// left out, and the other's round trip from the head stands in.
    async fn time_peers(&self, specs: &mut [NodeSpec]) {
        let addrs: Vec<(String, String)> = specs.iter().filter_map(|s| self.entry(&s.name).ok().map(|e| (e.name, e.addr))).collect();
        let timed = join_all(specs.iter().map(|s| async {
            let mut rtts = BTreeMap::new();
            let c = match self.client(&s.name).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(node = %s.name, "could not time its links: {e}");
                    return rtts;
                }
            };
            for (name, addr) in addrs.iter().filter(|(n, _)| *n != s.name) {
                match c.probe_peer(addr, false, PEER_PROBE_REPLY_WAIT).await {
                    Ok(t) => {
                        rtts.insert(name.clone(), t.rtt.as_secs_f64());
                    }
                    Err(e) => tracing::warn!(from = %s.name, to = %name, "could not time the link: {e}"),
                }
            }
            rtts
        }))
        .await;
        for (s, rtts) in specs.iter_mut().zip(timed) {
            s.peer_rtt_secs = rtts;
        }
    }

    /// A dry run: the plan for `model` over registered nodes, checked against their health.
    pub async fn plan(&self, model: &str, nodes: &[String], strategy: Strategy) -> Result<(ModelInfo, Vec<Assignment>)> {
        let m = model.to_string();
        let info = tokio::task::spawn_blocking(move || model_info(&m)).await.map_err(|e| Error::InvalidRequest(e.to_string()))??;
        for n in nodes {
            self.check(n).await;
        }
        let mut specs = self.node_specs(nodes)?;
        if strategy == Strategy::LatencyAware && specs.len() > 1 {
            self.time_peers(&mut specs).await;
        }
        let plan = partition::plan(strategy, &info.layer_bytes, &specs)?;
        Ok((info, plan))
    }

    /// The design doc's `create_cluster`: plans, loads every slice, links the
    /// chain and keeps the cluster in the registry.
    pub async fn create_cluster(&self, name: &str, nodes: &[String], model: &str, strategy: Strategy) -> Result<ClusterEntry> {
        let (info, plan) = self.plan(model, nodes, strategy).await?;
        let entry = ClusterEntry {
            name: name.to_string(),
            model: info.spec.clone(),
            digest: info.digest.clone().unwrap_or_default(),
            strategy,
            stages: plan,
        };
        self.load(&entry, &info).await?;
        self.update_registry(|r| {
            r.put_cluster(entry.clone());
            Ok(())
        })?;
        Ok(entry)
    }

    /// Loads every stage of `entry` (all at once) and links the chain.
    async fn load(&self, entry: &ClusterEntry, info: &ModelInfo) -> Result<()> {
        let loads = entry.stages.iter().map(|s| async move {
            let c = self.client(&s.node).await?;
            let req = LoadRequest { model: info.spec.clone(), start: s.start as u32, end: s.end as u32, digest: info.digest.clone() };
            c.request(Frame::new(Message::Load(req)), Duration::from_secs(600)).await?;
            c.refresh_capabilities().await?;
            Ok::<_, Error>(())
        });
        for r in join_all(loads).await {
            r?;
        }
        Ok(())
    }

    /// The design doc's `cluster.health_check()`: healthy only when every node
    /// answers and still holds the slice the cluster gave it.
    pub async fn cluster_health(&self, name: &str) -> Result<ClusterHealth> {
        let entry = self.registry().cluster(name).cloned().ok_or_else(|| Error::InvalidRequest(format!("no cluster named '{name}'")))?;
        let nodes = join_all(entry.stages.iter().map(|s| self.check(&s.node))).await;
        let down: Vec<String> =
            entry.stages.iter().zip(&nodes).filter(|(s, h)| !h.healthy || !holds(h, &entry, s)).map(|(s, _)| s.node.clone()).collect();
        Ok(ClusterHealth { name: name.to_string(), healthy: down.is_empty(), down, nodes })
    }

    /// The design doc's `get_worker_for_model`: a single node when one healthy
    /// node can hold the model (best score; one already holding it first),
    /// else a healthy registered cluster for the model, else a cluster created
    /// on demand from healthy nodes not serving another cluster.
    pub async fn route(&self, model: &str) -> Result<ClusterEntry> {
        let mut entries = self.route_replicas(model, 1).await?;
        Ok(entries.remove(0))
    }

    /// Up to `want` places that each serve `model` whole, for the head to
    /// spread requests over (replicas), best first: the node [`route`]
    /// picks, then other healthy nodes that hold the model or hold nothing
    /// and have room (an extra replica never evicts another model). A model
    /// that fits no single node gets its one cluster. Each place is loaded.
    pub async fn route_replicas(&self, model: &str, want: usize) -> Result<Vec<ClusterEntry>> {
        let m = model.to_string();
        let info = tokio::task::spawn_blocking(move || model_info(&m)).await.map_err(|e| Error::InvalidRequest(e.to_string()))??;
        let health = self.check_all().await;
        let registry = self.registry();
        let n = info.n_layers();
        let need = info.total_bytes();
        let in_other_clusters: Vec<String> =
            registry.clusters.iter().filter(|c| c.model != info.spec).flat_map(|c| c.stages.iter().map(|s| s.node.clone())).collect();
        let single = |h: &&NodeHealth| -> Option<bool> {
            let caps = h.capabilities.as_ref()?;
            let held = caps.loaded.as_ref();
            let has_it = held.is_some_and(|l| l.start == 0 && l.end as usize == n && info.digest.as_deref().is_none_or(|d| d == l.digest));
            let room = caps.free_memory + held.map_or(0, |l| l.weight_bytes) >= need;
            (has_it || room).then_some(has_it)
        };
        let mut singles: Vec<(&NodeHealth, bool)> = health
            .iter()
            .filter(|h| h.healthy && !in_other_clusters.contains(&h.name))
            .filter_map(|h| single(&h).map(|has| (h, has)))
            .collect();
        let holds_nothing = |h: &NodeHealth| h.capabilities.as_ref().is_some_and(|c| c.loaded.is_none());
        // Holding the model first, then holding nothing, then by score.
        singles.sort_by(|a, b| b.1.cmp(&a.1).then(holds_nothing(b.0).cmp(&holds_nothing(a.0))).then(b.0.score.total_cmp(&a.0.score)));
        if !singles.is_empty() {
            let mut entries = Vec::new();
            for (i, (h, has_it)) in singles.iter().enumerate() {
                if entries.len() >= want.max(1) {
                    break;
                }
                if i > 0 && !has_it && !holds_nothing(h) {
                    continue;
                }
                let entry = ClusterEntry {
                    name: h.name.clone(),
                    model: info.spec.clone(),
                    digest: info.digest.clone().unwrap_or_default(),
                    strategy: Strategy::Even,
                    stages: vec![Assignment { node: h.name.clone(), start: 0, end: n, bytes: need }],
                };
                if !has_it {
                    match self.load(&entry, &info).await {
                        Ok(()) => {}
                        Err(e) if i == 0 => return Err(e),
                        // An extra replica that cannot load is left out.
                        Err(e) => {
                            tracing::warn!(node = %h.name, "a replica of {} did not load: {e}", info.name);
                            continue;
                        }
                    }
                }
                entries.push(entry);
            }
            return Ok(entries);
        }
        let by_name: HashMap<&str, &NodeHealth> = health.iter().map(|h| (h.name.as_str(), h)).collect();
        let mut existing: Vec<&ClusterEntry> = registry
            .clusters
            .iter()
            .filter(|c| c.model == info.spec)
            .filter(|c| c.stages.iter().all(|s| by_name.get(s.node.as_str()).is_some_and(|h| h.healthy && holds(h, c, s))))
            .collect();
        existing.sort_by(|a, b| {
            let score = |c: &ClusterEntry| c.stages.iter().map(|s| by_name[s.node.as_str()].score).sum::<f64>();
            score(b).total_cmp(&score(a))
        });
        if let Some(c) = existing.first() {
            return Ok(vec![(*c).clone()]);
        }
        let mut free: Vec<&NodeHealth> = health.iter().filter(|h| h.healthy && !in_other_clusters.contains(&h.name)).collect();
        free.sort_by(|a, b| b.score.total_cmp(&a.score));
        if free.is_empty() {
            return Err(Error::InvalidRequest(format!("no healthy node can serve {}", info.name)));
        }
        let names: Vec<String> = free.iter().map(|h| h.name.clone()).collect();
        let auto = format!("auto-{}", info.name.replace([':', '/'], "-"));
        Ok(vec![self.create_cluster(&auto, &names, model, Strategy::MemoryAware).await?])
    }

    /// The routing facts of `entry`.
    pub fn route_info(&self, entry: &ClusterEntry) -> RouteInfo {
        let registry = self.registry();
        RouteInfo {
            cluster: entry.name.clone(),
            single_node: entry.stages.len() == 1 && registry.cluster(&entry.name).is_none(),
            model: entry.model.clone(),
            nodes: entry
                .stages
                .iter()
                .map(|s| RouteStage {
                    name: s.node.clone(),
                    addr: registry.node(&s.node).map(|n| n.addr.clone()).unwrap_or_default(),
                    layers: [s.start, s.end - 1],
                })
                .collect(),
        }
    }
}

/// Whether a node still holds the slice a cluster gave it (a restarted node is up but empty).
fn holds(h: &NodeHealth, c: &ClusterEntry, s: &Assignment) -> bool {
    h.capabilities
        .as_ref()
        .and_then(|caps| caps.loaded.as_ref())
        .is_some_and(|l| l.start as usize == s.start && l.end as usize == s.end && (c.digest.is_empty() || l.digest == c.digest))
}

/// The design doc's printout of a new cluster.
pub fn describe(entry: &ClusterEntry) -> String {
    let mut out = format!("Created cluster '{}' with {} nodes for {}\n", entry.name, entry.stages.len(), entry.model);
    for (i, s) in entry.stages.iter().enumerate() {
        out += &format!(
            "   Node {}: layers {}-{} ({} layers, {}) on {}\n",
            i + 1,
            s.start,
            s.end - 1,
            s.end - s.start,
            crate::sys::human_bytes(s.bytes),
            s.node
        );
    }
    out
}
