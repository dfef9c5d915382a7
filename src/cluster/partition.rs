//! Partitioning strategies: which contiguous blocks each node holds.
//!
//! Inputs are exact byte counts read from the model's header
//! ([`LayerBytes`]: every block, the embedding — held by the first stage —
//! and the norm + LM head — held by the last), and each node's offered
//! memory. Outputs are contiguous, non-empty ranges covering every block once,
//! in chain order. Memory counts weights only; KV caches grow per session and
//! are bounded by the node's session limits, not by the plan.

use std::collections::BTreeMap;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::LayerBytes;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Equal block counts (the design doc's default).
    #[default]
    Even,
    /// Blocks in proportion to each node's free memory, never beyond it.
    MemoryAware,
    /// The lowest per-token latency: fastest nodes first, fewest hops.
    LatencyAware,
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.replace('-', "_").as_str() {
            "even" => Ok(Strategy::Even),
            "memory_aware" | "memory" => Ok(Strategy::MemoryAware),
            "latency_aware" | "latency" => Ok(Strategy::LatencyAware),
            other => Err(format!("unknown strategy '{other}' (even, memory_aware, latency_aware)")),
        }
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Strategy::Even => "even",
            Strategy::MemoryAware => "memory_aware",
            Strategy::LatencyAware => "latency_aware",
        })
    }
}

/// What a strategy knows of a node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeSpec {
    pub name: String,
    /// Bytes the node offers for weights.
    pub memory: u64,
    /// Measured decode speed: weight bytes the node streams through its
    /// kernels per second (0 when unknown).
    pub bytes_per_sec: f64,
    /// Round trip from the head to the node.
    pub rtt_secs: f64,
    /// Round trips from this node to others (by name), as it timed them;
    /// where one is missing, the other's round trip from the head stands in.
    pub peer_rtt_secs: BTreeMap<String, f64>,
}

impl NodeSpec {
    /// The round trip of the hop from this node into `next`.
    fn rtt_to(&self, next: &NodeSpec) -> f64 {
        self.peer_rtt_secs.get(&next.name).copied().unwrap_or(next.rtt_secs)
    }
}

/// One stage of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub node: String,
    pub start: usize,
    pub end: usize,
    /// Weight bytes the stage holds (blocks + embedding/head where it has them).
    pub bytes: u64,
}

impl Assignment {
    pub fn layers(&self) -> Range<usize> {
        self.start..self.end
    }
}

fn assignments(model: &LayerBytes, nodes: &[&NodeSpec], ranges: Vec<Range<usize>>) -> Vec<Assignment> {
    nodes.iter().zip(ranges).map(|(n, r)| Assignment { node: n.name.clone(), bytes: model.stage(&r), start: r.start, end: r.end }).collect()
}

/// Fails with the memory a plan misses, naming the stage.
fn check_fits(plan: &[Assignment], nodes: &[&NodeSpec]) -> Result<()> {
    for (a, n) in plan.iter().zip(nodes) {
        if a.bytes > n.memory {
            return Err(Error::InvalidRequest(format!(
                "node {} would hold blocks {}..{} ({}) but offers {}: {} missing",
                n.name,
                a.start,
                a.end,
                crate::sys::human_bytes(a.bytes),
                crate::sys::human_bytes(n.memory),
                crate::sys::human_bytes(a.bytes - n.memory)
            )));
        }
    }
    Ok(())
}

fn not_enough(model: &LayerBytes, nodes: &[&NodeSpec]) -> Error {
    let need = model.total();
    let have: u64 = nodes.iter().map(|n| n.memory).sum();
    Error::InvalidRequest(format!(
        "the model needs {} of weights but the {} nodes offer {} in all: {} missing",
        crate::sys::human_bytes(need),
        nodes.len(),
        crate::sys::human_bytes(have),
        crate::sys::human_bytes(need.saturating_sub(have))
    ))
}

pub fn plan(strategy: Strategy, model: &LayerBytes, nodes: &[NodeSpec]) -> Result<Vec<Assignment>> {
    let n_layers = model.blocks.len();
    if nodes.is_empty() {
        return Err(Error::InvalidRequest("a plan needs at least one node".into()));
    }
    let refs: Vec<&NodeSpec> = nodes.iter().collect();
    if model.total() > nodes.iter().map(|n| n.memory).sum() {
        return Err(not_enough(model, &refs));
    }
    match strategy {
        Strategy::Even => {
            let plan = assignments(model, &refs, even(n_layers, nodes.len())?);
            check_fits(&plan, &refs)?;
            Ok(plan)
        }
        Strategy::MemoryAware => memory_aware(model, &refs),
        Strategy::LatencyAware => latency_aware(model, nodes),
    }
}

/// The design doc's `even` strategy: blocks split as evenly as possible, the
/// first nodes taking one more when it does not divide (80 over 3 nodes:
/// 0-26, 27-53, 54-79).
pub fn even(n_layers: usize, n_nodes: usize) -> Result<Vec<Range<usize>>> {
    if n_nodes == 0 {
        return Err(Error::InvalidRequest("a plan needs at least one node".into()));
    }
    if n_nodes > n_layers {
        return Err(Error::InvalidRequest(format!("{n_nodes} nodes cannot share {n_layers} blocks: each needs at least one")));
    }
    let (base, extra) = (n_layers / n_nodes, n_layers % n_nodes);
    let mut start = 0;
    Ok((0..n_nodes)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .collect())
}

/// Blocks in proportion to free memory: the k-th boundary sits where the
/// model's cumulative bytes come nearest to the nodes' cumulative share of the
/// total; then boundaries move until every stage fits its node. With uniform
/// blocks this is the doc's example: 80 blocks over 48 GB + 24 GB → 53 + 27.
fn memory_aware(model: &LayerBytes, nodes: &[&NodeSpec]) -> Result<Vec<Assignment>> {
    let n_layers = model.blocks.len();
    let k = nodes.len();
    if k > n_layers {
        return Err(Error::InvalidRequest(format!("{k} nodes cannot share {n_layers} blocks: each needs at least one")));
    }
    let total_mem: f64 = nodes.iter().map(|n| n.memory as f64).sum();
    // Cumulative bytes after block i (embedding counted before block 0).
    let mut cum = vec![model.embed as f64];
    for b in &model.blocks {
        cum.push(cum.last().unwrap() + *b as f64);
    }
    // Over several stages a tied table is held twice (embedding and head).
    let total = cum[n_layers] + model.head as f64;
    let mut bounds = vec![0usize];
    let mut share = 0.0;
    for (i, n) in nodes.iter().enumerate().take(k - 1) {
        share += n.memory as f64 / total_mem;
        let target = share * total;
        let lo = bounds[i] + 1;
        let hi = n_layers - (k - 1 - i);
        let best = (lo..=hi).min_by(|&a, &b| (cum[a] - target).abs().total_cmp(&(cum[b] - target).abs()).then(b.cmp(&a))).unwrap_or(lo);
        bounds.push(best);
    }
    bounds.push(n_layers);
    // Repair: move a boundary while a stage exceeds its node and its neighbour has room.
    for _ in 0..n_layers * k {
        let ranges: Vec<Range<usize>> = bounds.windows(2).map(|w| w[0]..w[1]).collect();
        let plan = assignments(model, nodes, ranges);
        let Some(i) = plan.iter().zip(nodes).position(|(a, n)| a.bytes > n.memory) else {
            return Ok(plan);
        };
        let moved = if i + 1 < k && bounds[i + 1] - bounds[i] > 1 && plan[i + 1].bytes < nodes[i + 1].memory {
            bounds[i + 1] -= 1;
            true
        } else if i > 0 && bounds[i + 1] - bounds[i] > 1 && plan[i - 1].bytes < nodes[i - 1].memory {
            bounds[i] += 1;
            true
        } else {
            false
        };
        if !moved {
            check_fits(&plan, nodes)?;
        }
    }
    let plan = assignments(model, nodes, bounds.windows(2).map(|w| w[0]..w[1]).collect());
    check_fits(&plan, nodes)?;
    Ok(plan)
}

/// Minimises the latency of one token, which for a chain is the sum of every
/// stage's compute plus half a round trip per hop (into each stage, and back
/// to the head): `Σ_stages (bytes_s / speed_s) + Σ_hops rtt_h / 2`. Compute
/// is sequential, so spreading a model over more nodes never shortens a
/// token: the best plan puts as many blocks as fit on the fastest node, then
/// the next fastest, and stops as soon as the model is placed — slow or far
/// nodes are left out (the usual complaint about exo is that adding devices
/// makes it slower). Nodes with no measured speed count as the slowest; ties
/// go to the lower round trip.
fn latency_aware(model: &LayerBytes, nodes: &[NodeSpec]) -> Result<Vec<Assignment>> {
    // Candidates: the blocks filled into the nodes in a few orders (fastest
    // first, nearest first, by each node's time for the whole model with
    // its round trip, and each next node the nearest to the one before);
    // the plan kept is the one the network model says answers soonest.
    let whole = model.blocks.iter().sum::<u64>() as f64;
    let alone = |n: &NodeSpec| if n.bytes_per_sec > 0.0 { whole / n.bytes_per_sec + n.rtt_secs } else { f64::INFINITY };
    type Order<'a> = &'a dyn Fn(&NodeSpec, &NodeSpec) -> std::cmp::Ordering;
    let orders: [Order; 3] = [
        &|a, b| b.bytes_per_sec.total_cmp(&a.bytes_per_sec).then(a.rtt_secs.total_cmp(&b.rtt_secs)),
        &|a, b| a.rtt_secs.total_cmp(&b.rtt_secs).then(b.bytes_per_sec.total_cmp(&a.bytes_per_sec)),
        &|a, b| alone(a).total_cmp(&alone(b)),
    ];
    let mut candidates: Vec<Vec<&NodeSpec>> = orders
        .iter()
        .map(|order| {
            let mut sorted: Vec<&NodeSpec> = nodes.iter().collect();
            sorted.sort_by(|a, b| order(a, b));
            sorted
        })
        .collect();
    candidates.push(nearest_next(&candidates[1]));
    let mut best: Option<(f64, Vec<Assignment>)> = None;
    let mut last_err = None;
    for order in candidates {
        match fill(model, &order) {
            Ok(plan) => {
                let t = token_latency(&plan, nodes);
                if best.as_ref().is_none_or(|(b, _)| t < *b) {
                    best = Some((t, plan));
                }
            }
            Err(e) => last_err = Some(e),
        }
    }
    match (best, last_err) {
        (Some((_, plan)), _) => Ok(plan),
        (None, Some(e)) => Err(e),
        (None, None) => Err(Error::InvalidRequest("no nodes to plan over".into())),
    }
}

/// A chain that starts at `by_head[0]` (the nearest to the head) and goes
/// on each time to the node nearest the last (ties to the faster): nodes of
/// one site stay together even when the head is at another.
fn nearest_next<'a>(by_head: &[&'a NodeSpec]) -> Vec<&'a NodeSpec> {
    let mut left: Vec<&NodeSpec> = by_head.to_vec();
    let mut chain = Vec::with_capacity(left.len());
    if left.is_empty() {
        return chain;
    }
    chain.push(left.remove(0));
    while !left.is_empty() {
        let last = chain[chain.len() - 1];
        let (i, _) = left
            .iter()
            .enumerate()
            .min_by(|(_, a), (_, b)| last.rtt_to(a).total_cmp(&last.rtt_to(b)).then(b.bytes_per_sec.total_cmp(&a.bytes_per_sec)))
            .expect("nodes left");
        chain.push(left.remove(i));
    }
    chain
}

/// The longest run of blocks that fits each node in turn, in `order`.
fn fill(model: &LayerBytes, order: &[&NodeSpec]) -> Result<Vec<Assignment>> {
    let n_layers = model.blocks.len();
    let mut plan = Vec::new();
    let mut start = 0;
    for node in order {
        if start == n_layers {
            break;
        }
        // The longest run of blocks from `start` that fits this node.
        let mut end = start;
        while end < n_layers && model.stage(&(start..end + 1)) <= node.memory {
            end += 1;
        }
        if end == start {
            continue;
        }
        plan.push(Assignment { node: node.name.clone(), start, end, bytes: model.stage(&(start..end)) });
        start = end;
    }
    if start < n_layers {
        return Err(not_enough(model, order));
    }
    Ok(plan)
}

/// Seconds per token of a plan (the latency-aware objective), as
/// `netmodel` counts them: each stage's bytes at its node's speed, and a
/// hop into each stage and one back to the head, each half a round trip:
/// from the head into the first, from each node into the next (as that
/// node timed it, else the next one's from the head), from the last back.
pub fn token_latency(plan: &[Assignment], nodes: &[NodeSpec]) -> f64 {
    let node = |a: &Assignment| nodes.iter().find(|n| n.name == a.node);
    let compute: f64 = plan
        .iter()
        .map(|a| match node(a).map(|n| n.bytes_per_sec) {
            Some(speed) if speed > 0.0 => a.bytes as f64 / speed,
            _ => f64::INFINITY,
        })
        .sum();
    let stages: Vec<&NodeSpec> = plan.iter().filter_map(node).collect();
    let into_first = stages.first().map_or(0.0, |n| n.rtt_secs);
    let between: f64 = stages.windows(2).map(|w| w[0].rtt_to(w[1])).sum();
    let back = stages.last().map_or(0.0, |n| n.rtt_secs);
    compute + (into_first + between + back) / 2.0
}

/// A move of blocks between adjacent stages that evens out measured compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rebalance {
    pub from: usize,
    pub to: usize,
    pub blocks: usize,
}

/// Dynamic rebalancing: given each stage's measured compute time (over the
/// same tokens) and its blocks, when the slowest stage exceeds the mean by
/// more than `threshold` (0.25 = 25 %), move blocks from it to its faster
/// neighbour so that both take about the same time at their measured
/// per-block cost. `None` when balanced enough or nothing can move.
pub fn rebalance(times: &[std::time::Duration], layers: &[Range<usize>], threshold: f64) -> Option<Rebalance> {
    if times.len() != layers.len() || times.len() < 2 {
        return None;
    }
    let t: Vec<f64> = times.iter().map(|d| d.as_secs_f64()).collect();
    let mean = t.iter().sum::<f64>() / t.len() as f64;
    let slow = (0..t.len()).max_by(|&a, &b| t[a].total_cmp(&t[b]))?;
    if mean <= 0.0 || t[slow] <= mean * (1.0 + threshold) {
        return None;
    }
    let neighbour =
        [slow.checked_sub(1), Some(slow + 1).filter(|&j| j < t.len())].into_iter().flatten().min_by(|&a, &b| t[a].total_cmp(&t[b]))?;
    let (ns, nj) = (layers[slow].len() as f64, layers[neighbour].len() as f64);
    let (cs, cj) = (t[slow] / ns, t[neighbour] / nj);
    // Both stages equal: n_s' c_s = (n_s + n_j - n_s') c_j.
    let keep = ((ns + nj) * cj / (cs + cj)).round().max(1.0);
    let blocks = (ns - keep) as isize;
    (blocks >= 1).then_some(Rebalance { from: slow, to: neighbour, blocks: blocks as usize })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: u64 = 1_000_000_000;

    fn uniform(n: usize, per_layer: u64) -> LayerBytes {
        LayerBytes::dense(vec![per_layer; n], 0, 0, false)
    }

    fn node(name: &str, memory: u64) -> NodeSpec {
        NodeSpec { name: name.into(), memory, ..Default::default() }
    }

    fn ranges(plan: &[Assignment]) -> Vec<Range<usize>> {
        plan.iter().map(Assignment::layers).collect()
    }

    #[test]
    fn even_matches_the_design_doc() {
        assert_eq!(even(80, 2).unwrap(), vec![0..40, 40..80]);
        assert_eq!(even(80, 3).unwrap(), vec![0..27, 27..54, 54..80]);
        assert_eq!(even(30, 1).unwrap(), vec![0..30]);
        let llama70b = uniform(80, 450_000_000);
        let plan = plan_of(Strategy::Even, &llama70b, &[node("a", 24 * GB), node("b", 24 * GB)]);
        assert_eq!(ranges(&plan), vec![0..40, 40..80]);
    }

    fn plan_of(s: Strategy, m: &LayerBytes, nodes: &[NodeSpec]) -> Vec<Assignment> {
        plan(s, m, nodes).unwrap()
    }

    #[test]
    fn memory_aware_matches_the_design_doc() {
        // 80 layers of ~450 MB on 48 GB + 24 GB → 53 + 27 (0-52, 53-79).
        let llama70b = uniform(80, 450_000_000);
        let plan = plan_of(Strategy::MemoryAware, &llama70b, &[node("big", 48 * GB), node("small", 24 * GB)]);
        assert_eq!(ranges(&plan), vec![0..53, 53..80]);
    }

    #[test]
    fn memory_aware_never_exceeds_a_node() {
        // Proportional shares would put 50 blocks on a node that holds 40.
        let m = uniform(80, GB);
        let plan = plan_of(Strategy::MemoryAware, &m, &[node("a", 40 * GB), node("b", 100 * GB)]);
        assert!(plan[0].bytes <= 40 * GB, "{plan:?}");
        assert_eq!(plan.iter().map(|a| a.end - a.start).sum::<usize>(), 80);
    }

    #[test]
    fn a_plan_that_cannot_fit_says_how_much_is_missing() {
        let m = uniform(80, GB);
        let err = plan(Strategy::MemoryAware, &m, &[node("a", 30 * GB), node("b", 30 * GB)]).unwrap_err().to_string();
        assert!(err.contains("needs 74.5 GiB") && err.contains("18.6 GiB missing"), "{err}");
        // Even fails per node when the total would fit but a half does not.
        let err = plan(Strategy::Even, &m, &[node("a", 20 * GB), node("b", 70 * GB)]).unwrap_err().to_string();
        assert!(err.contains("node a would hold blocks 0..40"), "{err}");
    }

    #[test]
    fn embedding_and_head_count_on_the_end_stages() {
        let m = LayerBytes::dense(vec![10; 4], 100, 50, false);
        let plan = plan_of(Strategy::Even, &m, &[node("a", 1000), node("b", 1000)]);
        assert_eq!(plan[0].bytes, 120);
        assert_eq!(plan[1].bytes, 70);
    }

    /// A fast node far away loses to a slightly slower one nearby when the
    /// round trip outweighs the compute it saves.
    #[test]
    fn latency_aware_weighs_round_trips_against_speed() {
        // 1 MB: 1 s on the fast node, 1.25 s on the near one.
        let m = uniform(10, 100_000);
        let far = NodeSpec { name: "far".into(), memory: 2_000_000, bytes_per_sec: 1e6, rtt_secs: 0.5, ..Default::default() };
        let near = NodeSpec { name: "near".into(), memory: 2_000_000, bytes_per_sec: 0.8e6, rtt_secs: 1e-3, ..Default::default() };
        let nodes = vec![far.clone(), near.clone()];
        let plan = plan_of(Strategy::LatencyAware, &m, &nodes);
        assert_eq!(plan.iter().map(|a| a.node.as_str()).collect::<Vec<_>>(), ["near"]);
        assert!(token_latency(&plan, &nodes) < token_latency(&plan_of(Strategy::Even, &m, &nodes), &nodes));
        // Close enough, the faster one wins again.
        let far = NodeSpec { rtt_secs: 0.01, ..far };
        let plan = plan_of(Strategy::LatencyAware, &m, &[far, near]);
        assert_eq!(plan[0].node, "far");
    }

    #[test]
    fn latency_aware_prefers_one_fast_node_and_leaves_slow_ones_out() {
        let m = uniform(10, 100);
        let fast = NodeSpec { name: "fast".into(), memory: 2000, bytes_per_sec: 1e6, rtt_secs: 1e-3, ..Default::default() };
        let slow = NodeSpec { name: "slow".into(), memory: 2000, bytes_per_sec: 1e5, rtt_secs: 1e-3, ..Default::default() };
        let nodes = vec![slow.clone(), fast.clone()];
        let plan = plan_of(Strategy::LatencyAware, &m, &nodes);
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].node, "fast");
        // It beats the even split on its own objective.
        let even_plan = plan_of(Strategy::Even, &m, &nodes);
        assert!(token_latency(&plan, &nodes) < token_latency(&even_plan, &nodes));
        // When the fast node cannot hold it all, the rest goes to the next fastest.
        let small_fast = NodeSpec { memory: 600, ..fast };
        let plan = plan_of(Strategy::LatencyAware, &m, &[slow, small_fast]);
        assert_eq!(ranges(&plan), vec![0..6, 6..10]);
        assert_eq!(plan[0].node, "fast");
    }

    /// Two sites 40 ms apart and a head at a third, about 20 ms from both:
    /// by the head's round trips the nodes interleave the sites, three 40 ms
    /// hops; the round trips the nodes timed between themselves keep each
    /// site's nodes together, one.
    #[test]
    fn latency_aware_keeps_a_sites_nodes_together_by_their_own_round_trips() {
        let m = uniform(8, 100);
        let site = |name: &str| if name.starts_with('a') { 'a' } else { 'b' };
        let names = ["a1", "b1", "a2", "b2"];
        let nodes: Vec<NodeSpec> = names
            .iter()
            .enumerate()
            .map(|(i, &name)| NodeSpec {
                name: name.into(),
                memory: 200,
                bytes_per_sec: 1e6,
                rtt_secs: 0.020 + i as f64 * 1e-3,
                peer_rtt_secs: names
                    .iter()
                    .filter(|&&o| o != name)
                    .map(|&o| (o.to_string(), if site(o) == site(name) { 1e-3 } else { 0.040 }))
                    .collect(),
            })
            .collect();
        let plan = plan_of(Strategy::LatencyAware, &m, &nodes);
        assert_eq!(plan.iter().map(|a| a.node.as_str()).collect::<Vec<_>>(), ["a1", "a2", "b1", "b2"]);
        // 4 × 200 µs of compute, 20 + 1 + 40 + 1 + 23 ms of round trips, halved.
        assert!((token_latency(&plan, &nodes) - (0.0008 + 0.085 / 2.0)).abs() < 1e-9, "{}", token_latency(&plan, &nodes));
        // Not knowing them, it can only follow the head's round trips.
        let blind: Vec<NodeSpec> = nodes.iter().map(|n| NodeSpec { peer_rtt_secs: BTreeMap::new(), ..n.clone() }).collect();
        let plan = plan_of(Strategy::LatencyAware, &m, &blind);
        assert_eq!(plan.iter().map(|a| a.node.as_str()).collect::<Vec<_>>(), ["a1", "b1", "a2", "b2"]);
        assert!((token_latency(&plan, &nodes) - (0.0008 + (0.020 + 3.0 * 0.040 + 0.023) / 2.0)).abs() < 1e-9);
    }

    /// Deterministic pseudo-random cases: every strategy assigns every block
    /// exactly once, contiguously, in order, within each node's memory.
    #[test]
    fn property_every_block_once_contiguous_within_memory() {
        let mut seed = 0x1234_5678_u64;
        let mut next = |m: u64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) % m
        };
        for _ in 0..500 {
            let n_layers = 1 + next(60) as usize;
            let blocks: Vec<u64> = (0..n_layers).map(|_| 1 + next(1000)).collect();
            let embed = next(500);
            let tied = next(2) == 0;
            let m = LayerBytes::dense(blocks, embed, next(500) + if tied { embed } else { 0 }, tied);
            let k = 1 + next(5) as usize;
            let nodes: Vec<NodeSpec> = (0..k)
                .map(|i| NodeSpec {
                    name: format!("n{i}"),
                    memory: 1 + next(40_000),
                    bytes_per_sec: next(100) as f64,
                    rtt_secs: next(10) as f64 * 1e-3,
                    ..Default::default()
                })
                .collect();
            for s in [Strategy::Even, Strategy::MemoryAware, Strategy::LatencyAware] {
                let Ok(plan) = plan(s, &m, &nodes) else {
                    continue;
                };
                assert!(!plan.is_empty());
                assert_eq!(plan[0].start, 0, "{s}");
                assert_eq!(plan.last().unwrap().end, n_layers, "{s}");
                for w in plan.windows(2) {
                    assert_eq!(w[0].end, w[1].start, "{s}: not contiguous");
                }
                for a in &plan {
                    assert!(a.start < a.end, "{s}: empty stage");
                    let node = nodes.iter().find(|n| n.name == a.node).unwrap();
                    assert!(a.bytes <= node.memory, "{s}: {} over {}", a.bytes, node.memory);
                    assert_eq!(a.bytes, m.stage(&a.layers()));
                }
                let names: std::collections::HashSet<_> = plan.iter().map(|a| &a.node).collect();
                assert_eq!(names.len(), plan.len(), "{s}: a node used twice");
            }
        }
    }

    #[test]
    fn rebalance_moves_blocks_off_the_slow_stage_only_past_the_threshold() {
        use std::time::Duration;
        let ms = Duration::from_millis;
        let layers = [0..15, 15..30];
        // Stage 1 takes twice as long per block: 15 blocks at cost 2 vs 15 at cost 1 → keep 10.
        assert_eq!(rebalance(&[ms(300), ms(150)], &layers, 0.25), Some(Rebalance { from: 0, to: 1, blocks: 5 }));
        // Within the threshold: nothing moves.
        assert_eq!(rebalance(&[ms(110), ms(100)], &layers, 0.25), None);
        // The middle stage gives to its faster neighbour.
        let three = [0..10, 10..20, 20..30];
        assert_eq!(rebalance(&[ms(100), ms(300), ms(50)], &three, 0.25).map(|r| (r.from, r.to)), Some((1, 2)));
        // A one-block stage cannot give its last block.
        assert_eq!(rebalance(&[ms(100), ms(10)], &[0..1, 1..30], 0.25), None);
    }
}
