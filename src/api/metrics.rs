//! Prometheus metrics on `prometheus-client` (OpenMetrics text):
//! counters, gauges and fixed-bucket histograms, each registered once.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Seconds; spans a loopback hop (sub-millisecond) to a slow prefill.
const BUCKETS: [f64; 14] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node: String,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    tokens_generated: Counter,
    prompt_tokens: Counter,
    f16_fallbacks: Counter,
    ttft: Histogram,
    inter_token: Histogram,
    hop_latency: Histogram,
    stage_seconds: Family<NodeLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    node_healthy: Family<NodeLabels, Gauge>,
    queue_running: Gauge,
    queue_waiting: Gauge,
    queue_rejected: Counter,
    cancelled: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sollol");
        let histogram = || Histogram::new(BUCKETS);
        let m = Self {
            requests: Family::default(),
            tokens_generated: Counter::default(),
            prompt_tokens: Counter::default(),
            f16_fallbacks: Counter::default(),
            ttft: histogram(),
            inter_token: histogram(),
            hop_latency: histogram(),
            stage_seconds: Family::default(),
            node_healthy: Family::default(),
            queue_running: Gauge::default(),
            queue_waiting: Gauge::default(),
            queue_rejected: Counter::default(),
            cancelled: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("requests", "HTTP requests by route and status", m.requests.clone());
        registry.register("queue_running", "Generations running now", m.queue_running.clone());
        registry.register("queue_depth", "Requests waiting for a generation slot", m.queue_waiting.clone());
        registry.register("queue_rejected", "Requests refused because the queue was full", m.queue_rejected.clone());
        registry.register("cancelled", "Generations stopped because the client went away", m.cancelled.clone());
        registry.register("tokens_generated", "Tokens generated", m.tokens_generated.clone());
        registry.register("prompt_tokens", "Prompt tokens evaluated", m.prompt_tokens.clone());
        registry.register("f16_overflow_fallbacks", "Hops sent as f32 because f16 would overflow", m.f16_fallbacks.clone());
        registry.register("time_to_first_token_seconds", "Time to first token", m.ttft.clone());
        registry.register("inter_token_latency_seconds", "Time between generated tokens", m.inter_token.clone());
        registry.register("hop_latency_seconds", "One-way latency of a pipeline hop", m.hop_latency.clone());
        registry.register("stage_compute_seconds", "Compute time per pipeline stage", m.stage_seconds.clone());
        registry.register("node_healthy", "1 when the node answers its health checks", m.node_healthy.clone());
        Self { registry, ..m }
    }
}

impl Metrics {
    pub fn request(&self, route: &str, status: u16) {
        self.requests.get_or_create(&RequestLabels { route: route.to_string(), status }).inc();
    }

    pub fn rejected(&self) {
        self.queue_rejected.inc();
    }

    pub fn cancelled(&self) {
        self.cancelled.inc();
    }

    pub fn queue(&self, running: usize, waiting: usize) {
        self.queue_running.set(running as i64);
        self.queue_waiting.set(waiting as i64);
    }

    /// A finished generation: its counts and latencies, by stage and hop.
    pub fn generation(&self, g: &crate::head::generation::Stats, stage_names: &[String]) {
        self.tokens_generated.inc_by(g.generated_tokens as u64);
        self.prompt_tokens.inc_by(g.prompt_tokens as u64);
        self.f16_fallbacks.inc_by(g.f16_fallbacks);
        self.ttft.observe(g.time_to_first_token.as_secs_f64());
        if g.generated_tokens > 1 {
            let per = g.decode.as_secs_f64() / (g.generated_tokens - 1) as f64;
            for _ in 1..g.generated_tokens {
                self.inter_token.observe(per);
            }
        }
        for h in &g.hop_latencies {
            self.hop_latency.observe(h.as_secs_f64());
        }
        for (i, t) in g.stage_times.iter().enumerate() {
            let node = stage_names.get(i).cloned().unwrap_or_else(|| format!("stage{}", i + 1));
            self.stage_seconds.get_or_create(&NodeLabels { node }).inc_by(t.as_secs_f64());
        }
    }

    pub fn node_health(&self, name: &str, healthy: bool) {
        self.node_healthy.get_or_create(&NodeLabels { node: name.to_string() }).set(i64::from(healthy));
    }

    pub fn tokens_generated(&self) -> u64 {
        self.tokens_generated.get()
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// For tests: the value of an unlabelled sample in a rendered exposition.
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::default();
        m.request("/api/generate", 200);
        m.request("/api/generate", 200);
        m.queue(1, 3);
        let stats = crate::head::generation::Stats {
            prompt_tokens: 5,
            generated_tokens: 3,
            time_to_first_token: Duration::from_millis(30),
            decode: Duration::from_millis(20),
            ..Default::default()
        };
        m.generation(&stats, &[]);
        let text = m.render();
        assert!(text.contains("sollol_requests_total{route=\"/api/generate\",status=\"200\"} 2"));
        assert_eq!(sample(&text, "sollol_queue_depth"), Some(3.0));
        assert_eq!(sample(&text, "sollol_tokens_generated_total"), Some(3.0));
        assert!(text.contains("sollol_time_to_first_token_seconds_bucket{le=\"0.05\"} 1"), "{text}");
        assert!(text.contains("sollol_inter_token_latency_seconds_count 2"));
    }
}
