//! Prometheus metrics, kept by hand: counters, gauges and fixed-bucket
//! histograms in text exposition format 0.0.4.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Seconds; spans a loopback hop (sub-millisecond) to a slow prefill.
const BUCKETS: [f64; 14] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        for (i, b) in BUCKETS.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }
}

#[derive(Default)]
struct Inner {
    requests: BTreeMap<(String, u16), u64>,
    tokens_generated: u64,
    prompt_tokens: u64,
    f16_fallbacks: u64,
    ttft: Histogram,
    inter_token: Histogram,
    hop_latency: Histogram,
    stage_seconds: BTreeMap<String, f64>,
    node_healthy: BTreeMap<String, bool>,
    queue_running: usize,
    queue_waiting: usize,
    queue_rejected: u64,
    cancelled: u64,
}

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    pub fn request(&self, route: &str, status: u16) {
        *self.inner.lock().expect("metrics").requests.entry((route.to_string(), status)).or_default() += 1;
    }

    pub fn rejected(&self) {
        self.inner.lock().expect("metrics").queue_rejected += 1;
    }

    pub fn cancelled(&self) {
        self.inner.lock().expect("metrics").cancelled += 1;
    }

    pub fn queue(&self, running: usize, waiting: usize) {
        let mut m = self.inner.lock().expect("metrics");
        m.queue_running = running;
        m.queue_waiting = waiting;
    }

    /// A finished generation: its counts and latencies, by stage and hop.
    pub fn generation(&self, g: &crate::head::generation::Stats, stage_names: &[String]) {
        let mut m = self.inner.lock().expect("metrics");
        m.tokens_generated += g.generated_tokens as u64;
        m.prompt_tokens += g.prompt_tokens as u64;
        m.f16_fallbacks += g.f16_fallbacks;
        m.ttft.observe(g.time_to_first_token.as_secs_f64());
        if g.generated_tokens > 1 {
            let per = g.decode.as_secs_f64() / (g.generated_tokens - 1) as f64;
            for _ in 1..g.generated_tokens {
                m.inter_token.observe(per);
            }
        }
        for h in &g.hop_latencies {
            m.hop_latency.observe(h.as_secs_f64());
        }
        for (i, t) in g.stage_times.iter().enumerate() {
            let name = stage_names.get(i).cloned().unwrap_or_else(|| format!("stage{}", i + 1));
            *m.stage_seconds.entry(name).or_default() += t.as_secs_f64();
        }
    }

    pub fn node_health(&self, name: &str, healthy: bool) {
        self.inner.lock().expect("metrics").node_healthy.insert(name.to_string(), healthy);
    }

    pub fn tokens_generated(&self) -> u64 {
        self.inner.lock().expect("metrics").tokens_generated
    }

    pub fn render(&self) -> String {
        let m = self.inner.lock().expect("metrics");
        let mut out = String::new();
        let header = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        header(&mut out, "sollol_requests_total", "counter", "HTTP requests by route and status.");
        for ((route, status), n) in &m.requests {
            let _ = writeln!(out, "sollol_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}");
        }
        header(&mut out, "sollol_queue_running", "gauge", "Generations running now.");
        let _ = writeln!(out, "sollol_queue_running {}", m.queue_running);
        header(&mut out, "sollol_queue_depth", "gauge", "Requests waiting for a generation slot.");
        let _ = writeln!(out, "sollol_queue_depth {}", m.queue_waiting);
        header(&mut out, "sollol_queue_rejected_total", "counter", "Requests refused because the queue was full.");
        let _ = writeln!(out, "sollol_queue_rejected_total {}", m.queue_rejected);
        header(&mut out, "sollol_cancelled_total", "counter", "Generations stopped because the client went away.");
        let _ = writeln!(out, "sollol_cancelled_total {}", m.cancelled);
        header(&mut out, "sollol_tokens_generated_total", "counter", "Tokens generated.");
        let _ = writeln!(out, "sollol_tokens_generated_total {}", m.tokens_generated);
        header(&mut out, "sollol_prompt_tokens_total", "counter", "Prompt tokens evaluated.");
        let _ = writeln!(out, "sollol_prompt_tokens_total {}", m.prompt_tokens);
        header(&mut out, "sollol_f16_overflow_fallbacks_total", "counter", "Hops sent as f32 because f16 would overflow.");
        let _ = writeln!(out, "sollol_f16_overflow_fallbacks_total {}", m.f16_fallbacks);
        for (name, help, h) in [
            ("sollol_time_to_first_token_seconds", "Time to first token.", &m.ttft),
            ("sollol_inter_token_latency_seconds", "Time between generated tokens.", &m.inter_token),
            ("sollol_hop_latency_seconds", "One-way latency of a pipeline hop.", &m.hop_latency),
        ] {
            header(&mut out, name, "histogram", help);
            for (b, c) in BUCKETS.iter().zip(h.counts.iter()) {
                let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
            }
            let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}", h.count, h.sum, h.count);
        }
        header(&mut out, "sollol_stage_compute_seconds_total", "counter", "Compute time per pipeline stage.");
        for (node, s) in &m.stage_seconds {
            let _ = writeln!(out, "sollol_stage_compute_seconds_total{{node=\"{node}\"}} {s}");
        }
        header(&mut out, "sollol_node_healthy", "gauge", "1 when the node answers its health checks.");
        for (node, h) in &m.node_healthy {
            let _ = writeln!(out, "sollol_node_healthy{{node=\"{node}\"}} {}", u8::from(*h));
        }
        out
    }
}

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
        assert!(text.contains("sollol_time_to_first_token_seconds_bucket{le=\"0.05\"} 1"));
        assert!(text.contains("sollol_inter_token_latency_seconds_count 2"));
    }
}
