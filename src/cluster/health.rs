//! Node health: periodic pings over the existing QUIC connections, a score
//! for routing, unhealthy after missed pings, healthy again on an answer.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::head::client::Ping;
use crate::net::message::Capabilities;

#[derive(Debug, Clone)]
pub struct HealthPolicy {
    /// Time between pings of one node.
    pub interval: Duration,
    /// A ping not answered within this counts as missed.
    pub timeout: Duration,
    /// Consecutive missed pings before a node is unhealthy.
    pub unhealthy_after: u32,
    /// How often a check also times the link's throughput (`NodeClient::probe`),
    /// when the node holds no sessions; `None` never does.
    pub probe_every: Option<Duration>,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        Self { interval: Duration::from_secs(2), timeout: Duration::from_secs(1), unhealthy_after: 2, probe_every: None }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeHealth {
    pub name: String,
    pub addr: String,
    pub healthy: bool,
    /// Consecutive pings without an answer.
    pub missed: u32,
    pub rtt_ms: Option<f64>,
    /// The link's throughput from the head, as last timed.
    pub link_bits_per_sec: Option<f64>,
    #[serde(skip)]
    pub probed_at: Option<Instant>,
    /// Sessions the node holds now.
    pub sessions: u32,
    /// Recent decode speed of generations through this node, when known.
    pub tok_s: Option<f64>,
    pub score: f64,
    pub capabilities: Option<Capabilities>,
    pub last_error: Option<String>,
    /// The node's counters since it started: compute time, positions
    /// computed, and the batches they ran in (a caller's two readings give
    /// utilisation and mean batch size over an interval).
    pub busy_ms: f64,
    pub positions: u64,
    pub batches: u64,
}

impl NodeHealth {
    pub fn unknown(name: &str, addr: &str) -> Self {
        Self {
            name: name.to_string(),
            addr: addr.to_string(),
            healthy: false,
            missed: 0,
            rtt_ms: None,
            link_bits_per_sec: None,
            probed_at: None,
            sessions: 0,
            tok_s: None,
            score: 0.0,
            capabilities: None,
            last_error: Some("not checked yet".into()),
            busy_ms: 0.0,
            positions: 0,
            batches: 0,
        }
    }

    /// A ping came back.
    pub fn answered(&mut self, ping: &Ping, caps: Capabilities) {
        self.healthy = true;
        self.missed = 0;
        self.rtt_ms = Some(ping.rtt.as_secs_f64() * 1e3);
        self.sessions = ping.sessions;
        self.busy_ms = ping.busy.as_secs_f64() * 1e3;
        self.positions = ping.tokens;
        self.batches = ping.batches;
        self.capabilities = Some(caps);
        self.last_error = None;
        self.score = score(self);
    }

    /// A ping failed or timed out.
    pub fn missed(&mut self, policy: &HealthPolicy, error: String) {
        self.missed += 1;
        if self.missed >= policy.unhealthy_after {
            self.healthy = false;
        }
        self.last_error = Some(error);
        self.score = score(self);
    }
}

/// 0 for an unhealthy node, else up to 100: the product of a latency factor
/// (halved at 50 ms round trip), a load factor (halved per session in
/// flight) and a speed factor (tok/s / (tok/s + 10); 0.5 until measured).
pub fn score(h: &NodeHealth) -> f64 {
    if !h.healthy {
        return 0.0;
    }
    let latency = 1.0 / (1.0 + h.rtt_ms.unwrap_or(50.0) / 50.0);
    let load = 1.0 / (1.0 + h.sessions as f64);
    let speed = h.tok_s.map_or(0.5, |t| t / (t + 10.0));
    100.0 * latency * load * speed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ping(rtt_ms: u64, sessions: u32) -> Ping {
        Ping { rtt: Duration::from_millis(rtt_ms), sessions, busy: Duration::ZERO, tokens: 0, batches: 0 }
    }

    fn caps() -> Capabilities {
        Capabilities {
            protocol: 1,
            build: "t".into(),
            device: "cpu".into(),
            cores: 2,
            threads: 2,
            total_memory: 1,
            free_memory: 1,
            memory_limit: None,
            loaded: None,
            sessions: 0,
            link: None,
            compute: String::new(),
        }
    }

    #[test]
    fn unhealthy_after_missed_pings_and_back_on_an_answer() {
        let policy = HealthPolicy::default();
        let mut h = NodeHealth::unknown("a", "127.0.0.1:1");
        h.answered(&ping(1, 0), caps());
        assert!(h.healthy && h.score > 0.0);
        h.missed(&policy, "timeout".into());
        assert!(h.healthy, "one missed ping is not enough");
        h.missed(&policy, "timeout".into());
        assert!(!h.healthy);
        assert_eq!(h.score, 0.0);
        h.answered(&ping(1, 0), caps());
        assert!(h.healthy);
    }

    #[test]
    fn score_prefers_near_idle_fast_nodes() {
        let mut a = NodeHealth::unknown("a", "x");
        a.answered(&ping(1, 0), caps());
        let mut far = a.clone();
        far.answered(&ping(100, 0), caps());
        let mut busy = a.clone();
        busy.answered(&ping(1, 3), caps());
        let mut fast = a.clone();
        fast.tok_s = Some(100.0);
        fast.score = score(&fast);
        assert!(a.score > far.score && a.score > busy.score && fast.score > a.score);
    }
}
