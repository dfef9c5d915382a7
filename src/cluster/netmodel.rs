//! An analytical model of a pipeline's decode: per-token latency and
//! throughput of a plan from what each stage computes, what each hop
//! carries, and the links between them.
//!
//! A decode step is memory-bound: a stage's compute is its weight bytes
//! times the seconds per byte the machine reads them in, for one row or,
//! batched, for `B` rows (measured in process; linear in between). A decode
//! token goes round the chain's ring (`net::message::Ring`): `S` hops,
//! stage 1 → … → stage S → stage 1 (none when one stage feeds itself; the
//! head reads the results off the token's path), each costing half its
//! link's round trip, its bytes over the link's rate, and the software's
//! fixed cost of a hop. The hops between stages carry hidden states; the
//! one back to stage 1 a token id in a frame. `C` sessions are
//! spread over `G` micro-batches of `C / G` rows (`node::batch`): each
//! micro-batch goes round the chain, one step through every stage and hop,
//! while the others are at other stages, so `C` tokens take the longer of
//! one micro-batch's trip and the busiest cores' `G` steps (stages that
//! share a machine's cores take turns on them, so their steps add up).
//!
//! The same model picks a running chain's micro-batch count
//! ([`best_micro_batches`]) from what the head measures ([`Observed`]): each
//! stage's batch time against its rows, and what a step spends outside the
//! stages. On shared cores and short links one micro-batch (lockstep) is
//! fastest: fewer, larger steps read the weights fewer times. Behind slow
//! links the cores would idle while a batch is on the wire, and more
//! micro-batches fill that time; with cores of their own, about one per stage.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;

use serde::Serialize;

use crate::model::LayerBytes;
use crate::net::message::StageStep;

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

/// The frame around what a hop carries; all the hop back to the first
/// stage carries (a token id).
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
/// over `links` (one per hop of the ring: stage 1 → stage 2, …, stage S →
/// stage 1; or one for every hop), `clients` sessions at once spread over
/// `micro_batches`; `cores[i]` names the cores stage `i` computes on
/// (empty: each its own).
pub fn predict(
    stage_bytes: &[u64],
    compute: &Compute,
    links: &[Link],
    hop_bytes: u64,
    clients: usize,
    micro_batches: usize,
    cores: &[usize],
) -> Prediction {
    let clients = clients.max(1);
    let micro_batches = micro_batches.clamp(1, clients);
    let rows = clients.div_ceil(micro_batches);
    let step = |s: usize, rows: usize| stage_bytes[s] as f64 * compute.per_byte(rows);
    let hops = ring_hops(stage_bytes.len());
    let hop = |i: usize, rows: usize| -> f64 {
        let link =
            links.get(i).or(links.last()).copied().unwrap_or(Link { bits_per_sec: f64::INFINITY, rtt_secs: 0.0, hop_overhead_secs: 0.0 });
        let bytes = if i + 1 == hops { FRAME } else { hop_bytes };
        link.rtt_secs / 2.0 + link.hop_overhead_secs + (bytes * rows as u64 * 8) as f64 / link.bits_per_sec
    };
    let all_hops = |rows: usize| (0..hops).map(|i| hop(i, rows)).sum::<f64>();
    let stages = |rows: usize| (0..stage_bytes.len()).map(|s| step(s, rows)).collect::<Vec<f64>>();
    let one = stages(1);
    let token_secs = one.iter().sum::<f64>() + all_hops(1);
    let round = round_secs(&step, stage_bytes.len(), cores, &all_hops, clients, micro_batches);
    Prediction {
        stage_secs: one,
        stage_secs_batched: stages(rows),
        micro_batches,
        rows,
        hop_secs: (0..hops).map(|i| hop(i, 1)).collect(),
        hop_bytes,
        token_secs,
        decode_tok_s: 1.0 / token_secs,
        clients,
        batched_tok_s: clients as f64 / round,
    }
}

/// The hops of a ring over `stages` stages: one out of each, none when a
/// single stage feeds itself.
pub fn ring_hops(stages: usize) -> usize {
    if stages > 1 {
        stages
    } else {
        0
    }
}

/// Seconds `clients` tokens take in `g` micro-batches, given a stage's
/// step time for some rows (`step(stage, rows)`) and a trip's hops for some
/// rows: the longer of one micro-batch's trip round the chain and the
/// busiest cores' `g` steps.
fn round_secs(
    step: &dyn Fn(usize, usize) -> f64,
    stages: usize,
    cores: &[usize],
    hops: &dyn Fn(usize) -> f64,
    clients: usize,
    g: usize,
) -> f64 {
    let rows = clients.max(1).div_ceil(g.max(1));
    let mut trip = hops(rows);
    let mut busy: HashMap<usize, f64> = HashMap::new();
    for s in 0..stages {
        let secs = step(s, rows);
        trip += secs;
        // A stage whose cores are not named has its own.
        *busy.entry(cores.get(s).copied().unwrap_or(usize::MAX - s)).or_default() += secs;
    }
    let busiest = busy.values().copied().fold(0.0, f64::max);
    trip.max(g as f64 * busiest)
}

/// The micro-batch count (1 to `most`) under which a round of the
/// clients' tokens takes least (`round(g)`, seconds), unless it is less
/// than 3% faster than the `current` count: a gain has to stand above the
/// noise of the measurements, or the count would swing between near
/// equals as sessions come and go.
pub fn best_micro_batches(most: usize, current: usize, round: impl Fn(usize) -> f64) -> usize {
    let most = most.clamp(1, MAX_MICRO_BATCHES);
    let current = current.clamp(1, most);
    let (best, secs) = (1..=most).map(|g| (g, round(g))).fold((current, f64::INFINITY), |a, b| if b.1 < a.1 { b } else { a });
    if secs * 1.03 < round(current) {
        best
    } else {
        current
    }
}

/// The most micro-batches a chain is split into.
pub const MAX_MICRO_BATCHES: usize = 256;

/// Steps whose hop time the head remembers ([`Observed`]).
const HOP_WINDOW: usize = 64;

/// What the head has measured of a chain's decode steps: each stage's
/// batch time against the batch's rows while its sessions stepped in one
/// micro-batch (a line fitted with fading weights); how much longer stages
/// took while micro-batches overlapped than those lines say (on shared
/// cores, overlapping stages' threads contend; with cores of their own,
/// about 1); and the least time one of the last steps spent outside the
/// stages' compute (the hops, with their wake-ups; the least, because a
/// step may also have waited at a stage for its batch).
#[derive(Debug, Default)]
pub struct Observed {
    alone: Vec<LineFit>,
    /// Measured over predicted-alone compute of overlapped steps (fading sums).
    overlap: (f64, f64),
    hops: VecDeque<f64>,
}

impl Observed {
    /// One decode step: what each stage reported, how long the step took
    /// from send to result, and whether the chain's sessions were in more
    /// than one micro-batch then.
    pub fn record(&mut self, steps: &[StageStep], wall_secs: f64, overlapped: bool) {
        if steps.len() != self.alone.len() {
            *self = Self { alone: vec![LineFit::default(); steps.len()], ..Self::default() };
        }
        let secs = |s: &StageStep| s.nanos as f64 / 1e9;
        let rows = |s: &StageStep| f64::from(s.rows.max(1));
        let compute: f64 = steps.iter().map(secs).sum();
        if overlapped {
            let alone: Option<f64> = self.alone.iter().zip(steps).map(|(f, s)| f.line().map(|_| f.at(rows(s)))).sum();
            if let Some(alone) = alone.filter(|&a| a > 0.0) {
                let f = LineFit::FADE;
                self.overlap = (self.overlap.0 * f + compute, self.overlap.1 * f + alone);
            }
        } else {
            for (fit, s) in self.alone.iter_mut().zip(steps) {
                fit.add(rows(s), secs(s));
            }
        }
        if self.hops.len() == HOP_WINDOW {
            self.hops.pop_front();
        }
        self.hops.push_back((wall_secs - compute).max(0.0));
    }

    /// How much longer overlapped stages compute than alone: 1 until measured.
    fn overlap_factor(&self) -> f64 {
        if self.overlap.1 > 0.0 {
            self.overlap.0 / self.overlap.1
        } else {
            1.0
        }
    }

    /// The micro-batch count for `clients` sessions on stages computing on
    /// `cores` (as in [`predict`]), in place of `current`, or `None` until
    /// every stage has been measured alone at more than one batch size.
    /// Until overlapped steps have been measured, overlap is taken to cost
    /// nothing, so a count above one gets tried and measured; the count
    /// grows by one at a time, each measured before the next (a trial
    /// costs while it lasts), and falls at once.
    pub fn best_micro_batches(&self, cores: &[usize], clients: usize, current: usize) -> Option<usize> {
        let hops = self.hops.iter().copied().reduce(f64::min)?;
        if self.alone.is_empty() || self.alone.iter().any(|f| f.line().is_none()) {
            return None;
        }
        let overlap = self.overlap_factor();
        let hops = |_rows: usize| hops;
        Some(best_micro_batches(clients.min(current + 1), current, |g| {
            let factor = if g > 1 { overlap } else { 1.0 };
            let step = |s: usize, rows: usize| self.alone[s].at(rows as f64) * factor;
            round_secs(&step, self.alone.len(), cores, &hops, clients, g)
        }))
    }
}

/// A least-squares line `secs = a + b·rows` over fading points: each new
/// one multiplies the weight of those before by `FADE`, so the line follows
/// about the last `1 / (1 - FADE)` (50) points.
#[derive(Debug, Clone, Copy, Default)]
struct LineFit {
    w: f64,
    x: f64,
    xx: f64,
    y: f64,
    xy: f64,
}

impl LineFit {
    const FADE: f64 = 0.98;

    fn add(&mut self, x: f64, y: f64) {
        let f = Self::FADE;
        *self = Self { w: self.w * f + 1.0, x: self.x * f + x, xx: self.xx * f + x * x, y: self.y * f + y, xy: self.xy * f + x * y };
    }

    /// `(a, b)`, once the rows seen vary enough to tell a slope (a spread
    /// of at least half a row); a step never costs less with more rows.
    fn line(&self) -> Option<(f64, f64)> {
        if self.w <= 0.0 {
            return None;
        }
        let var = self.xx / self.w - (self.x / self.w).powi(2);
        if var < 0.25 {
            return None;
        }
        let b = ((self.xy / self.w - self.x * self.y / (self.w * self.w)) / var).max(0.0);
        Some(((self.y - b * self.x) / self.w, b))
    }

    fn at(&self, x: f64) -> f64 {
        self.line().map_or(0.0, |(a, b)| (a + b * x).max(0.0))
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
        let one = predict(&[100_000_000], &compute, &[free], 1000, 8, 1, &[]);
        assert!((one.decode_tok_s - 10.0).abs() < 1e-9, "{one:?}");
        assert!((one.batched_tok_s - 40.0).abs() < 1e-9, "the batch measured is the batch predicted: {one:?}");
        // Split in four over free links: the same; over 10 ms links: four half round trips more per token.
        let four = predict(&[25_000_000; 4], &compute, &[free], 1000, 8, 1, &[]);
        assert!((four.token_secs - 0.1).abs() < 1e-9);
        let slow = Link { bits_per_sec: 8e6, rtt_secs: 0.010, hop_overhead_secs: 0.0 };
        let far = predict(&[25_000_000; 4], &compute, &[slow], 1000, 8, 1, &[]);
        // Each hop between stages: 5 ms + 1000 B at 1 MB/s = 6 ms, three of
        // them; back from the last to the first, 5 ms + 64 B.
        assert!((far.token_secs - (0.1 + 3.0 * 0.006 + 0.005064)).abs() < 1e-9, "{far:?}");
        // The batch's hops carry eight rows.
        let cycle = 0.2 + 3.0 * (0.005 + 0.008) + (0.005 + 0.000512);
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
        let p = predict(&[25_000_000; 4], &compute, &[free], 1000, 8, 4, &[]);
        assert_eq!((p.micro_batches, p.rows), (4, 2));
        let step = 0.025 * (1.0 + 1.0 / 7.0);
        assert!((p.batched_tok_s - 8.0 / (4.0 * step)).abs() < 1e-6, "{p:?}");
        // Against lockstep: one 8-row step per stage, one after another.
        let lockstep = predict(&[25_000_000; 4], &compute, &[free], 1000, 8, 1, &[]);
        assert!((lockstep.batched_tok_s - 40.0).abs() < 1e-6);
        assert!(p.batched_tok_s > lockstep.batched_tok_s);
        // Over 40 ms links a micro-batch's trip is the longer: the stages wait.
        let slow = Link { bits_per_sec: f64::INFINITY, rtt_secs: 0.040, hop_overhead_secs: 0.0 };
        let far = predict(&[25_000_000; 4], &compute, &[slow], 1000, 8, 4, &[]);
        assert!((far.batched_tok_s - 8.0 / (4.0 * step + 4.0 * 0.020)).abs() < 1e-6, "{far:?}");
        // No more micro-batches than sessions.
        assert_eq!(predict(&[1; 4], &compute, &[free], 1000, 2, 4, &[]).micro_batches, 2);
    }

    #[test]
    fn each_hop_costs_what_its_own_link_does() {
        let compute = Compute::measured(100_000_000, 10.0, 8, 40.0);
        let lan = Link { bits_per_sec: 1e9, rtt_secs: 0.001, hop_overhead_secs: 0.0 };
        // Two sites: stages 1–2 on one LAN, stages 3–4 on another, 40 ms
        // and 8 Mbit/s between them (crossed twice round the ring).
        let wan = Link { bits_per_sec: 8e6, rtt_secs: 0.040, hop_overhead_secs: 0.0 };
        let links = [lan, wan, lan, wan];
        let p = predict(&[25_000_000; 4], &compute, &links, 1000, 1, 1, &[]);
        let expect = [0.0005 + 8e3 / 1e9, 0.020 + 1e-3, 0.0005 + 8e3 / 1e9, 0.020 + 64.0 * 8.0 / 8e6];
        for (got, want) in p.hop_secs.iter().zip(expect) {
            assert!((got - want).abs() < 1e-12, "{:?} against {expect:?}", p.hop_secs);
        }
        assert!((p.token_secs - (0.1 + expect.iter().sum::<f64>())).abs() < 1e-12);
        assert_eq!(p.hop_secs.len(), 4);
        // One link for every hop is the same as four alike.
        let uniform = predict(&[25_000_000; 4], &compute, &[wan], 1000, 8, 4, &[]);
        let four = predict(&[25_000_000; 4], &compute, &[wan; 4], 1000, 8, 4, &[]);
        assert_eq!((uniform.token_secs, uniform.batched_tok_s), (four.token_secs, four.batched_tok_s));
        // One stage feeds itself: no hop at all.
        assert!(predict(&[100_000_000], &compute, &[wan], 1000, 1, 1, &[]).hop_secs.is_empty());
    }

    #[test]
    fn stages_on_shared_cores_take_turns() {
        let compute = Compute::measured(100_000_000, 10.0, 8, 40.0);
        let free = Link { bits_per_sec: f64::INFINITY, rtt_secs: 0.0, hop_overhead_secs: 0.0 };
        // Four micro-batches of two rows over four stages on one machine:
        // each round, the machine runs all sixteen 2-row steps.
        let step = 0.025 * (1.0 + 1.0 / 7.0);
        let shared = predict(&[25_000_000; 4], &compute, &[free], 1000, 8, 4, &[0; 4]);
        assert!((shared.batched_tok_s - 8.0 / (16.0 * step)).abs() < 1e-6, "{shared:?}");
        // Two machines of two stages each: eight steps on the busier.
        let pairs = predict(&[25_000_000; 4], &compute, &[free], 1000, 8, 4, &[0, 0, 1, 1]);
        assert!((pairs.batched_tok_s - 8.0 / (8.0 * step)).abs() < 1e-6, "{pairs:?}");
    }

    /// The count `best_micro_batches` picks from `predict`'s model.
    fn best(cores: &[usize], link: Link) -> usize {
        let compute = Compute::measured(100_000_000, 10.0, 8, 40.0);
        best_micro_batches(8, 1, |g| 8.0 / predict(&[25_000_000; 4], &compute, &[link], 1000, 8, g, cores).batched_tok_s)
    }

    #[test]
    fn the_micro_batches_follow_the_cores_and_the_links() {
        let free = Link { bits_per_sec: f64::INFINITY, rtt_secs: 0.0, hop_overhead_secs: 0.0 };
        // Shared cores, free links: lockstep. Cores of their own: one per stage.
        assert_eq!(best(&[0; 4], free), 1);
        assert_eq!(best(&[], free), 4);
        // Shared cores behind links as slow as the whole model's 8-row step
        // (0.2 s): the cores would idle half of each trip in lockstep.
        let slow = Link { bits_per_sec: f64::INFINITY, rtt_secs: 0.08, hop_overhead_secs: 0.0 };
        let g = best(&[0; 4], slow);
        assert!(g > 1, "{g}");
        let compute = Compute::measured(100_000_000, 10.0, 8, 40.0);
        let tok_s = |g| predict(&[25_000_000; 4], &compute, &[slow], 1000, 8, g, &[0; 4]).batched_tok_s;
        assert!((2..=8).all(|other| tok_s(other) <= tok_s(g) * 1.03), "{g}: {:?}", (1..=8).map(tok_s).collect::<Vec<_>>());
    }

    #[test]
    fn the_head_learns_a_stages_cost_per_row_from_its_batches() {
        let mut seen = Observed::default();
        // Two stages on one machine: 2 ms + 0.5 ms a row each, and 3 ms of
        // hops; some steps also waited 4 ms at a stage for their batch.
        let at = |rows: u32| StageStep { nanos: 2_000_000 + 500_000 * u64::from(rows), rows };
        let wall = |rows: u32, waited: f64| 2.0 * (0.002 + 0.0005 * f64::from(rows)) + 0.003 + waited;
        seen.record(&[at(4), at(4)], wall(4, 0.0), false);
        assert_eq!(seen.best_micro_batches(&[0, 0], 8, 1), None, "one batch size tells no slope");
        for (i, rows) in [1, 8, 4, 2, 8, 6, 3, 8].into_iter().cycle().take(200).enumerate() {
            seen.record(&[at(rows), at(rows)], wall(rows, if i % 3 == 0 { 0.004 } else { 0.0 }), false);
        }
        let (a, b) = seen.alone[0].line().unwrap();
        assert!((a - 0.002).abs() < 1e-9 && (b - 0.0005).abs() < 1e-9, "{a} {b}");
        assert!((seen.hops.iter().copied().reduce(f64::min).unwrap() - 0.003).abs() < 1e-9);
        // What it picks is what the model says for those costs.
        let step = |_s: usize, rows: usize| 0.002 + 0.0005 * rows as f64;
        for (cores, clients) in [(&[0, 0][..], 8), (&[0, 1][..], 8), (&[0, 0][..], 2)] {
            // From one micro-batch, the next count up is the furthest it goes.
            let want = best_micro_batches(2, 1, |g| round_secs(&step, 2, cores, &|_| 0.003, clients, g));
            assert_eq!(seen.best_micro_batches(cores, clients, 1), Some(want), "{cores:?} {clients}");
        }
        // Lockstep on one machine here (3 ms of hops against 12 ms of 8-row
        // steps); with a machine per stage, both stages at once.
        assert_eq!(seen.best_micro_batches(&[0, 0], 8, 1), Some(1));
        assert_eq!(seen.best_micro_batches(&[0, 1], 8, 1), Some(2));
        // Up one at a time to the model's best (3 here), and no further.
        let round = |g| round_secs(&step, 2, &[0, 1], &|_| 0.003, 8, g);
        let best = best_micro_batches(8, 1, round);
        assert_eq!(best, 3, "{:?}", (1..=8).map(round).collect::<Vec<_>>());
        assert_eq!(seen.best_micro_batches(&[0, 1], 8, 2), Some(3));
        assert_eq!(seen.best_micro_batches(&[0, 1], 8, 3), Some(3));
        // A count within 3% of the best it can reach stays; one further off does not.
        for g in 1..=8 {
            let reach = (1..=(g + 1).min(8)).map(round).fold(f64::INFINITY, f64::min);
            let kept = seen.best_micro_batches(&[0, 1], 8, g) == Some(g);
            assert_eq!(kept, round(g) <= reach * 1.03, "{g}: {:?}", (1..=8).map(round).collect::<Vec<_>>());
        }
    }

    #[test]
    fn overlap_measured_slow_sends_the_chain_back_to_lockstep() {
        let mut seen = Observed::default();
        // One machine, two stages of 1 ms + 0.25 ms a row, 10 ms of hops:
        // the cores idle most of a lockstep trip, so more micro-batches.
        let at = |rows: u32, factor: f64| StageStep { nanos: ((0.001 + 0.00025 * f64::from(rows)) * factor * 1e9) as u64, rows };
        for rows in [8, 6, 7, 8, 5].into_iter().cycle().take(100) {
            seen.record(&[at(rows, 1.0), at(rows, 1.0)], 0.010 + 2.0 * (0.001 + 0.00025 * f64::from(rows)), false);
        }
        let tried = seen.best_micro_batches(&[0, 0], 8, 1).unwrap();
        assert_eq!(tried, 2);
        // Overlapped, the stages took three times as long as alone: no gain left.
        for rows in [2, 3, 2].into_iter().cycle().take(100) {
            seen.record(&[at(rows, 3.0), at(rows, 3.0)], 0.010 + 6.0 * (0.001 + 0.00025 * f64::from(rows)), true);
        }
        assert!((seen.overlap_factor() - 3.0).abs() < 0.01, "{}", seen.overlap_factor());
        assert_eq!(seen.best_micro_batches(&[0, 0], 8, tried), Some(1));
        // Overlap that costs little keeps the count, or grows it.
        let mut cheap = Observed::default();
        for rows in [8, 6, 7, 8, 5].into_iter().cycle().take(100) {
            cheap.record(&[at(rows, 1.0), at(rows, 1.0)], 0.010 + 2.0 * (0.001 + 0.00025 * f64::from(rows)), false);
        }
        for rows in [2, 3, 2].into_iter().cycle().take(100) {
            cheap.record(&[at(rows, 1.05), at(rows, 1.05)], 0.010 + 2.1 * (0.001 + 0.00025 * f64::from(rows)), true);
        }
        assert!(cheap.best_micro_batches(&[0, 0], 8, tried) >= Some(tried));
    }
}
