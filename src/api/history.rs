//! The last minutes of the head, sampled every few seconds for the
//! dashboard's charts: tokens per second, each node's busy share and round
//! trip, and each model's hop latency.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cluster::health::NodeHealth;

/// How often a sample is taken, and how many are kept (ten minutes).
pub const INTERVAL: Duration = Duration::from_secs(2);
const KEPT: usize = 300;

#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the head started.
    pub t: f64,
    pub tok_s: f64,
    /// Per node: the share of the interval it spent computing (0–1).
    pub busy: BTreeMap<String, f64>,
    /// Per node: its last measured round trip (ms).
    pub rtt_ms: BTreeMap<String, f64>,
    /// Per model: the median hop latency of the generations that ended in the interval (ms).
    pub hop_ms: BTreeMap<String, f64>,
}

#[derive(Default)]
pub struct History {
    samples: Mutex<VecDeque<Sample>>,
    /// Each node's compute time at the last sample.
    busy_at: Mutex<HashMap<String, (Instant, f64)>>,
    /// Hop latencies of generations since the last sample, per model (ms).
    hops: Mutex<HashMap<String, Vec<f64>>>,
}

impl History {
    /// Notes a finished generation's hop latencies.
    pub fn generation(&self, model: &str, hops: &[Duration]) {
        if !hops.is_empty() {
            self.hops.lock().expect("hops lock").entry(model.to_string()).or_default().extend(hops.iter().map(|h| h.as_secs_f64() * 1e3));
        }
    }

    /// Takes a sample from the nodes' health (their compute time and round
    /// trips) and the head's recent tokens per second.
    pub fn sample(&self, t: f64, tok_s: f64, nodes: &[NodeHealth]) {
        let now = Instant::now();
        let mut busy = BTreeMap::new();
        {
            let mut at = self.busy_at.lock().expect("busy lock");
            for n in nodes {
                if let Some((then, ms)) = at.insert(n.name.clone(), (now, n.busy_ms)) {
                    let wall = now.duration_since(then).as_secs_f64() * 1e3;
                    if wall > 0.0 && n.busy_ms >= ms {
                        busy.insert(n.name.clone(), ((n.busy_ms - ms) / wall).min(1.0));
                    }
                }
            }
        }
        let rtt_ms = nodes.iter().filter_map(|n| n.rtt_ms.map(|r| (n.name.clone(), r))).collect();
        let hop_ms = std::mem::take(&mut *self.hops.lock().expect("hops lock"))
            .into_iter()
            .map(|(model, mut v)| {
                v.sort_by(f64::total_cmp);
                (model, v[v.len() / 2])
            })
            .collect();
        let mut samples = self.samples.lock().expect("samples lock");
        samples.push_back(Sample { t, tok_s, busy, rtt_ms, hop_ms });
        while samples.len() > KEPT {
            samples.pop_front();
        }
    }

    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().expect("samples lock").iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_share_is_compute_time_over_wall_time_and_hops_are_medians() {
        let h = History::default();
        let mut node = NodeHealth::unknown("n1", "127.0.0.1:1");
        node.busy_ms = 1000.0;
        h.sample(0.0, 0.0, std::slice::from_ref(&node));
        std::thread::sleep(Duration::from_millis(100));
        node.busy_ms = 1050.0;
        h.generation("m", &[Duration::from_millis(1), Duration::from_millis(3), Duration::from_millis(2)]);
        h.sample(0.1, 5.0, std::slice::from_ref(&node));
        let s = h.samples();
        assert!(s[0].busy.is_empty(), "the first sample has no interval yet");
        let share = s[1].busy["n1"];
        assert!(share > 0.3 && share <= 0.5, "50 ms of compute in ~100 ms: {share}");
        assert_eq!(s[1].hop_ms["m"], 2.0);
        assert!(h.samples().len() == 2 && h.hops.lock().unwrap().is_empty());
    }
}
