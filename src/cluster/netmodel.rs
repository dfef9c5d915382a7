//! An analytical model of a pipeline's decode: per-token latency and
//! throughput of a plan from what each stage computes, what each hop
//! carries, and the links between them.
//!
//! A decode step is memory-bound: a stage's compute is its weight bytes
//! times the seconds per byte the machine reads them in, for one row or,
//! batched, for `B` rows (measured in process; linear in between). A token
//! crosses `S + 1` hops (head → stage 1 → … → stage S → head), each costing
//! half its link's round trip, its bytes over the link's rate, and the
//! software's fixed cost of a hop. The hops between stages carry hidden
//! states; the first and the last a token id in a frame. `C` sessions are
//! spread over `G` micro-batches of `C / G` rows (`node::batch`): each
//! micro-batch goes round the chain, one step through every stage and hop,
//! while the others are at other stages, so `C` tokens take the longer of
//! one micro-batch's trip and the busiest stage's `G` steps. One
//! micro-batch is lockstep (stages sharing a machine's cores, where fewer
//! and larger steps are faster); more assume each stage has cores of its own.

use std::ops::Range;

use serde::Serialize;

use crate::model::LayerBytes;

/// One link of the chain.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Link {
    /// Bits per second each way; infinite when uncapped.
    pub bits_per_sec: f64,
    pub rtt_secs: f64,
    /// The software's own cost of a hop (framing, queues, wake-ups).
    pub hop_overhead_secs: f64,
}

/// What the machine computes: seconds per weight byte for a step of one
/// row, and for a step of `rows` rows.
#[derive(Debug, Clone, Copy)]
pub struct Compute {
    pub secs_per_byte: f64,
    pub batch: (usize, f64),
}

impl Compute {
    /// From in-process measurements of a model of `bytes` weight bytes:
    /// decode tok/s of one session, and aggregate tok/s of `rows` sessions batched.
    pub fn measured(bytes: u64, one_tok_s: f64, rows: usize, batched_tok_s: f64) -> Self {
        let step = |tok_s: f64, rows: usize| rows as f64 / tok_s / bytes as f64;
        Self { secs_per_byte: step(one_tok_s, 1), batch: (rows.max(1), step(batched_tok_s, rows.max(1))) }
    }

    /// Seconds per byte of a `rows`-row step.
    fn per_byte(&self, rows: usize) -> f64 {
        let (b, at_b) = self.batch;
        if b <= 1 {
            return self.secs_per_byte * rows as f64;
        }
        self.secs_per_byte + (at_b - self.secs_per_byte) * (rows.max(1) - 1) as f64 / (b - 1) as f64
    }
}

/// What the model predicts for a plan.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    /// Each stage's compute for one row, and for one micro-batch of the
    /// clients' rows (seconds).
    pub stage_secs: Vec<f64>,
    pub stage_secs_batched: Vec<f64>,
    pub micro_batches: usize,
    /// Rows of each micro-batch.
    pub rows: usize,
    /// Each hop's time for one row (seconds), and the bytes a hop between
    /// stages carries per row.
    pub hop_secs: Vec<f64>,
    pub hop_bytes: u64,
    /// One session: seconds per token and tokens per second.
    pub token_secs: f64,
    pub decode_tok_s: f64,
    /// `clients` sessions at once: tokens per second together.
    pub clients: usize,
    pub batched_tok_s: f64,
}

/// The frame around what a hop carries; all the first and last hops carry
/// (a token id each way).
const FRAME: u64 = 64;

/// Bytes a hop between stages carries per row: a stage's hidden state at
/// `wire_bytes` per value and the frame around it.
pub fn hop_bytes(hidden: usize, wire_bytes: usize) -> u64 {
    (hidden * wire_bytes) as u64 + FRAME
}

/// The bytes a decode step of the stage holding `blocks` reads: its blocks'
/// weights, and the LM head on the last stage. (The embedding table is only
/// looked up, a row per token; a mixture's experts count in full, an upper
/// bound.)
pub fn step_bytes(model: &LayerBytes, blocks: &Range<usize>) -> u64 {
    let head = if blocks.end == model.blocks.len() { model.head } else { 0 };
    model.blocks[blocks.clone()].iter().sum::<u64>() + head
}

/// Predicts decode over a chain whose stages read `stage_bytes` per step,
/// over `links` (one per hop: head → stage 1, …, stage S → head; or one for
/// every hop), `clients` sessions at once spread over `micro_batches`.
pub fn predict(stage_bytes: &[u64], compute: &Compute, links: &[Link], hop_bytes: u64, clients: usize, micro_batches: usize) -> Prediction {
    let clients = clients.max(1);
    let micro_batches = micro_batches.clamp(1, clients);
    let rows = clients.div_ceil(micro_batches);
    let stage = |rows: usize| -> Vec<f64> { stage_bytes.iter().map(|&b| b as f64 * compute.per_byte(rows)).collect() };
    let hops = stage_bytes.len() + 1;
    let hop = |i: usize, rows: usize| -> f64 {
        let link =
            links.get(i).or(links.last()).copied().unwrap_or(Link { bits_per_sec: f64::INFINITY, rtt_secs: 0.0, hop_overhead_secs: 0.0 });
        let bytes = if i == 0 || i == hops - 1 { FRAME } else { hop_bytes };
        link.rtt_secs / 2.0 + link.hop_overhead_secs + (bytes * rows as u64 * 8) as f64 / link.bits_per_sec
    };
    let all_hops = |rows: usize| (0..hops).map(|i| hop(i, rows)).sum::<f64>();
    let (one, batched) = (stage(1), stage(rows));
    let token_secs = one.iter().sum::<f64>() + all_hops(1);
    let trip = batched.iter().sum::<f64>() + all_hops(rows);
    let busiest = micro_batches as f64 * batched.iter().copied().fold(0.0, f64::max);
    Prediction {
        stage_secs: one,
        stage_secs_batched: batched,
        micro_batches,
        rows,
        hop_secs: (0..hops).map(|i| hop(i, 1)).collect(),
        hop_bytes,
        token_secs,
        decode_tok_s: 1.0 / token_secs,
        clients,
        batched_tok_s: clients as f64 / trip.max(busiest),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_adds_compute_and_hops() {
        // 100 MB at 1 ns/byte: 0.1 s per token in process.
        let compute = Compute::measured(100_000_000, 10.0, 8, 40.0);
        let free = Link { bits_per_sec: f64::INFINITY, rtt_secs: 0.0, hop_overhead_secs: 0.0 };
        let one = predict(&[100_000_000], &compute, &[free], 1000, 8, 1);
        assert!((one.decode_tok_s - 10.0).abs() < 1e-9, "{one:?}");
        assert!((one.batched_tok_s - 40.0).abs() < 1e-9, "the batch measured is the batch predicted: {one:?}");
        // Split in four over free links: the same; over 10 ms links: five half round trips more per token.
        let four = predict(&[25_000_000; 4], &compute, &[free], 1000, 8, 1);
        assert!((four.token_secs - 0.1).abs() < 1e-9);
        let slow = Link { bits_per_sec: 8e6, rtt_secs: 0.010, hop_overhead_secs: 0.0 };
        let far = predict(&[25_000_000; 4], &compute, &[slow], 1000, 8, 1);
        // Each hop between stages: 5 ms + 1000 B at 1 MB/s = 6 ms, three of
        // them; into the first stage and out of the last, 5 ms + 64 B.
        assert!((far.token_secs - (0.1 + 3.0 * 0.006 + 2.0 * 0.005064)).abs() < 1e-9, "{far:?}");
        // The batch's hops carry eight rows.
        let cycle = 0.2 + 3.0 * (0.005 + 0.008) + 2.0 * (0.005 + 0.000512);
        assert!((far.batched_tok_s - 8.0 / cycle).abs() < 1e-6, "{far:?}");
    }

    #[test]
    fn micro_batches_overlap_the_stages() {
        // 1 ns/byte for one row, 0.25 ns/byte a row batched by 8 (linear between).
        let compute = Compute::measured(100_000_000, 10.0, 8, 40.0);
        let free = Link { bits_per_sec: f64::INFINITY, rtt_secs: 0.0, hop_overhead_secs: 0.0 };
        // Four stages, four micro-batches of two rows: a 2-row step of a
        // quarter is 25 MB × (1 + 1/7) ns/byte ≈ 28.6 ms; each stage runs
        // four of them while the others run theirs.
        let p = predict(&[25_000_000; 4], &compute, &[free], 1000, 8, 4);
        assert_eq!((p.micro_batches, p.rows), (4, 2));
        let step = 0.025 * (1.0 + 1.0 / 7.0);
        assert!((p.batched_tok_s - 8.0 / (4.0 * step)).abs() < 1e-6, "{p:?}");
        // Against lockstep: one 8-row step per stage, one after another.
        let lockstep = predict(&[25_000_000; 4], &compute, &[free], 1000, 8, 1);
        assert!((lockstep.batched_tok_s - 40.0).abs() < 1e-6);
        assert!(p.batched_tok_s > lockstep.batched_tok_s);
        // Over 40 ms links a micro-batch's trip is the longer: the stages wait.
        let slow = Link { bits_per_sec: f64::INFINITY, rtt_secs: 0.040, hop_overhead_secs: 0.0 };
        let far = predict(&[25_000_000; 4], &compute, &[slow], 1000, 8, 4);
        assert!((far.batched_tok_s - 8.0 / (4.0 * step + 5.0 * 0.020)).abs() < 1e-6, "{far:?}");
        // No more micro-batches than sessions.
        assert_eq!(predict(&[1; 4], &compute, &[free], 1000, 2, 4).micro_batches, 2);
    }

    #[test]
    fn each_hop_costs_what_its_own_link_does() {
        let compute = Compute::measured(100_000_000, 10.0, 8, 40.0);
        let lan = Link { bits_per_sec: 1e9, rtt_secs: 0.001, hop_overhead_secs: 0.0 };
        // Two sites: the head and stages 1–2 on one LAN, stages 3–4 on
        // another, 40 ms and 8 Mbit/s between them.
        let wan = Link { bits_per_sec: 8e6, rtt_secs: 0.040, hop_overhead_secs: 0.0 };
        let links = [lan, lan, wan, lan, wan];
        let p = predict(&[25_000_000; 4], &compute, &links, 1000, 1, 1);
        let expect = [0.0005 + 64.0 * 8.0 / 1e9, 0.0005 + 8e3 / 1e9, 0.020 + 1e-3, 0.0005 + 8e3 / 1e9, 0.020 + 64.0 * 8.0 / 8e6];
        for (got, want) in p.hop_secs.iter().zip(expect) {
            assert!((got - want).abs() < 1e-12, "{:?} against {expect:?}", p.hop_secs);
        }
        assert!((p.token_secs - (0.1 + expect.iter().sum::<f64>())).abs() < 1e-12);
        // One link for every hop is the same as five alike.
        let uniform = predict(&[25_000_000; 4], &compute, &[wan], 1000, 8, 4);
        let five = predict(&[25_000_000; 4], &compute, &[wan; 5], 1000, 8, 4);
        assert_eq!((uniform.token_secs, uniform.batched_tok_s), (five.token_secs, five.batched_tok_s));
    }
}
