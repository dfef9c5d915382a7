//! Choosing the next token from logits.
//!
//! Sampling is a pure function of (logits, parameters, the tokens so far, the
//! step number): the random draw comes from a counter-based generator keyed by
//! `(seed, step)`, so there is no RNG state to carry. Whoever holds the token
//! history can replay a session exactly — on another node, after a failover.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p; 1.0 keeps all.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the most likely one; 0 keeps all.
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of recent tokens; 1.0 is off.
    pub repeat_penalty: f32,
    /// How many recent tokens the repeat penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 40, top_p: 0.95, min_p: 0.05, repeat_penalty: 1.0, repeat_last_n: 64, seed: 0 }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::InvalidRequest(m.to_string()));
        if !self.temperature.is_finite() || self.temperature < 0.0 || self.temperature > 100.0 {
            return bad("temperature must be between 0 and 100");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p must be in [0, 1]");
        }
        if !self.repeat_penalty.is_finite() || self.repeat_penalty <= 0.0 || self.repeat_penalty > 100.0 {
            return bad("repeat_penalty must be in (0, 100]");
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

/// splitmix64: a full-period mixer; `(seed, step)` → a uniform draw in [0, 1).
fn uniform(seed: u64, step: u64) -> f64 {
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// Index of the largest value; the lowest index wins a tie (NaNs are
/// passed over, unless the first value is one: then 0).
///
/// Eight running maxima and then the first index holding the maximum: two
/// passes the compiler vectorises, several times faster over a 50k-262k
/// vocabulary than one pass with a branch per value (this runs once per
/// token, on the critical path of every decode step).
pub fn argmax(logits: &[f32]) -> u32 {
    const LANES: usize = 8;
    let Some(&first) = logits.first() else { return 0 };
    let mut lanes = [first; LANES];
    let chunks = logits.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            *m = if v > *m { v } else { *m };
        }
    }
    let max = lanes.iter().chain(tail).fold(first, |m, &v| if v > m { v } else { m });
    logits.iter().position(|&v| v == max).unwrap_or(0) as u32
}

/// `f32::total_cmp`'s order as integers, which compare in vector registers.
fn order_key(x: f32) -> i32 {
    let bits = x.to_bits() as i32;
    bits ^ (((bits >> 31) as u32) >> 1) as i32
}

/// The log-probabilities of a sampled token and of the most likely
/// alternatives, in the distribution it was drawn from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Logprobs {
    pub logprob: f32,
    /// At most the number asked for, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// The most alternatives a step reports (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// The next token for `logits`, given the tokens so far (`history`) and the
/// number of tokens sampled before in this session (`step`).
pub fn sample(logits: &[f32], params: &SamplingParams, history: &[u32], step: u64) -> u32 {
    sample_with_logprobs(logits, params, history, step, None).0
}

/// [`sample`], and with `top = Some(n)` the log-probabilities of the chosen
/// token and the `n` (at most [`MAX_TOP_LOGPROBS`]) most likely ones, in the
/// distribution actually sampled from: after the repeat penalty, at the
/// temperature, over the tokens top-k, top-p and min-p kept (renormalised).
/// Greedy decoding draws from nothing; its distribution is the model's
/// after the repeat penalty (temperature 1, nothing cut).
pub fn sample_with_logprobs(
    logits: &[f32],
    params: &SamplingParams,
    history: &[u32],
    step: u64,
    top: Option<usize>,
) -> (u32, Option<Logprobs>) {
    sample_constrained(logits, params, history, step, top, None)
}

/// [`sample_with_logprobs`] among the tokens `allowed` lets through (bit
/// `t % 32` of word `t / 32`; tokens past its end are not allowed), as a
/// grammar asks: the others are dropped before anything else, so the
/// distribution and its log-probabilities are over the allowed ones.
pub fn sample_constrained(
    logits: &[f32],
    params: &SamplingParams,
    history: &[u32],
    step: u64,
    top: Option<usize>,
    allowed: Option<&[u32]>,
) -> (u32, Option<Logprobs>) {
    // The greedy answer of an unconstrained step reads the logits in place.
    // A penalty of 1 or more only lowers the recent tokens' logits, so the
    // best token stands unless it is one of them (Ollama's default, 1.1).
    let recent = &history[history.len().saturating_sub(params.repeat_last_n)..];
    if params.is_greedy() && top.is_none() && allowed.is_none() && params.repeat_penalty >= 1.0 {
        let token = argmax(logits);
        if params.repeat_penalty == 1.0 || !recent.contains(&token) {
            return (token, None);
        }
    }
    // Copied only where a mask or the penalty changes them.
    let mut logits = std::borrow::Cow::Borrowed(logits);
    if let Some(bits) = allowed {
        for (t, l) in logits.to_mut().iter_mut().enumerate() {
            if bits.get(t / 32).is_none_or(|w| w & (1 << (t % 32)) == 0) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
    if params.repeat_penalty != 1.0 {
        let mut seen = recent.to_vec();
        seen.sort_unstable();
        seen.dedup();
        for &t in &seen {
            if let Some(l) = logits.to_mut().get_mut(t as usize) {
                *l = if *l >= 0.0 { *l / params.repeat_penalty } else { *l * params.repeat_penalty };
            }
        }
    }
    if params.is_greedy() {
        let token = argmax(&logits);
        let logprobs = top.map(|n| {
            let max = logits[token as usize];
            let log_total = logits.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>().ln();
            let lp = |l: f32| ((l - max) as f64 - log_total) as f32;
            let best = best_n(&logits, n.min(MAX_TOP_LOGPROBS));
            Logprobs { logprob: lp(max), top: best.into_iter().filter(|(_, l)| l.is_finite()).map(|(t, l)| (t, lp(l))).collect() }
        });
        return (token, logprobs);
    }
    let u = uniform(params.seed, step);
    let cuts = params.top_p < 1.0 || params.min_p > 0.0;
    let top_k = params.top_k > 0 && params.top_k < logits.len();

    // Each candidate's weight exp((l - max) / T), and their sum: a top-k
    // set's few in f64, summed best first; with top-k off the whole
    // vocabulary's in vectorised f32 (f64 exponentials of 262,144 logits
    // took longer than a decode step), summed in id order.
    let vocab = (!top_k).then(|| {
        let mut w: Vec<f32> = logits.iter().map(|&l| l / params.temperature).collect();
        crate::kernels::ops::exp_shifted(&mut w, &mut [0f32; 2]);
        // Summed in f64, as the draw subtracts them: a total even slightly
        // above their sum would let a draw near 1 run past the last token.
        let mut lanes = [0f64; 8];
        let chunks = w.chunks_exact(8);
        let tail: f64 = chunks.remainder().iter().map(|&x| f64::from(x)).sum();
        for c in chunks {
            lanes.iter_mut().zip(c).for_each(|(s, &x)| *s += f64::from(x));
        }
        let sum = lanes.iter().sum::<f64>() + tail;
        (w, sum)
    });
    if let Some((w, sum)) = vocab.as_ref().filter(|_| !cuts) {
        // Nothing is cut: the draw walks the vocabulary in id order.
        let chosen = draw(w.iter().map(|&x| f64::from(x)), *sum, u);
        let logprobs = top.map(|n| {
            let lp = |t: usize| (f64::from(w[t]) / sum).ln() as f32;
            let top = best_n(&logits, n.min(MAX_TOP_LOGPROBS))
                .iter()
                .filter(|&&(t, _)| w[t as usize] > 0.0)
                .map(|&(t, _)| (t, lp(t as usize)))
                .collect();
            Logprobs { logprob: lp(chosen), top }
        });
        return (chosen as u32, logprobs);
    }
    // Candidates best first: selecting the top k and sorting only them gives
    // what sorting the whole vocabulary would, for a fraction of the time (a
    // full sort of Gemma 3's 262,144 logits took longer than its decode step).
    let mut cand = if top_k { best_n(&logits, params.top_k) } else { logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect() };
    let Some(&(_, max)) = cand.first() else { return (0, None) };
    let weight = |&(t, l): &(u32, f32)| match &vocab {
        Some((w, _)) => f64::from(w[t as usize]),
        None => (((l - max) / params.temperature) as f64).exp(),
    };
    let total: f64 = match &vocab {
        Some((_, sum)) => *sum,
        None => cand.iter().map(weight).sum(),
    };
    // Top-p and min-p cut the candidates best first, so they are sorted as
    // far as the cuts need: a top-k set whole (it is small); with top-k off,
    // a best-first prefix grown until a cut falls inside it.
    let mut sorted = if top_k { cand.len() } else { 0 };
    let (probs, keep) = loop {
        if sorted < cand.len() {
            sorted = (sorted * 8).max(256).min(cand.len());
            if sorted < cand.len() {
                cand.select_nth_unstable_by(sorted - 1, best_first);
            }
            cand[..sorted].sort_unstable_by(best_first);
        }
        let probs: Vec<f64> = cand[..sorted].iter().map(|c| weight(c) / total).collect();
        let mut keep = probs.len();
        if params.top_p < 1.0 {
            let mut acc = 0.0;
            if let Some(i) = probs.iter().position(|p| {
                acc += p;
                acc >= params.top_p as f64
            }) {
                keep = i + 1;
            }
        }
        if params.min_p > 0.0 {
            let floor = probs[0] * params.min_p as f64;
            keep = keep.min(probs.iter().take_while(|&&p| p >= floor).count().max(1));
        }
        if keep < sorted || sorted == cand.len() {
            break (probs, keep);
        }
    };
    let probs = &probs[..keep];
    let total: f64 = probs.iter().sum();
    let chosen = draw(probs.iter().copied(), total, u);
    let logprobs = top.map(|n| {
        let lp = |p: f64| (p / total).ln() as f32;
        let n = n.min(MAX_TOP_LOGPROBS).min(keep);
        Logprobs { logprob: lp(probs[chosen]), top: (0..n).filter(|&i| probs[i] > 0.0).map(|i| (cand[i].0, lp(probs[i]))).collect() }
    });
    (cand[chosen].0, logprobs)
}

/// Candidates by logit, best first, ties to the lower id: a total order, so
/// any selection and sort by it agrees with a stable sort of the whole
/// vocabulary.
fn best_first(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The `n` best of `logits` (`best_first`), in that order.
fn best_n(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    if n == 0 || logits.is_empty() {
        return Vec::new();
    }
    // The maxima of n disjoint stretches are n values at least their least:
    // the n best are all at or above it, which leaves a few hundred
    // candidates of a vocabulary to select from.
    let stretch = logits.len().div_ceil(n);
    let floor = logits.chunks(stretch).map(|c| c.iter().map(|&l| order_key(l)).max().unwrap_or(i32::MIN)).min().unwrap_or(i32::MIN);
    let mut best: Vec<(u32, f32)> =
        logits.iter().enumerate().filter(|(_, &l)| order_key(l) >= floor).map(|(i, &l)| (i as u32, l)).collect();
    let n = n.min(best.len());
    if n > 0 && n < best.len() {
        best.select_nth_unstable_by(n - 1, best_first);
    }
    best.truncate(n);
    best.sort_unstable_by(best_first);
    best
}

/// The index a draw `u` in [0, 1) lands on among `weights` (summing to
/// `total`), taken in their order; the last where rounding leaves it past
/// the end.
fn draw(weights: impl Iterator<Item = f64>, total: f64, u: f64) -> usize {
    let mut r = u * total;
    let mut last = 0;
    for (i, p) in weights.enumerate() {
        if r < p {
            return i;
        }
        r -= p;
        last = i;
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_is_the_first_largest_value() {
        // The plain definition: a later value wins only if strictly larger.
        let reference = |x: &[f32]| {
            let mut best = 0;
            for (i, &v) in x.iter().enumerate() {
                if v > x[best] {
                    best = i;
                }
            }
            best as u32
        };
        let mut cases: Vec<Vec<f32>> = vec![
            vec![],
            vec![1.0],
            vec![f32::NAN, 5.0, 1.0],
            vec![1.0, f32::NAN, 5.0, 5.0],
            vec![-0.0, 0.0, -1.0],
            vec![0.0, -0.0],
            vec![f32::NEG_INFINITY; 19],
            vec![2.0, f32::INFINITY, 3.0, f32::INFINITY],
        ];
        // Random lengths around the lane count, small integer values (many ties), a NaN now and then.
        let mut z = 0x1234_5678u64;
        let mut next = || {
            z ^= z << 13;
            z ^= z >> 7;
            z ^= z << 17;
            z
        };
        for _ in 0..2000 {
            let len = (next() % 70) as usize;
            cases.push((0..len).map(|_| if next() % 50 == 0 { f32::NAN } else { (next() % 9) as f32 - 4.0 }).collect());
        }
        for x in &cases {
            assert_eq!(argmax(x), reference(x), "{x:?}");
        }
    }

    #[test]
    fn logprobs_are_those_of_the_distribution_sampled_from() {
        let logits = [2.0f32, 1.0, 0.5, -1.0, 3.0];
        // Greedy: the model's softmax.
        let (t, lp) = sample_with_logprobs(&logits, &params(0.0), &[], 0, Some(3));
        let lp = lp.unwrap();
        assert_eq!(t, 4);
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        assert!((lp.logprob as f64 - (3.0 - z.ln())).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|x| x.0).collect::<Vec<_>>(), vec![4, 0, 1]);
        // Sampled at a temperature over the two tokens top-k keeps: they renormalise.
        let p = SamplingParams { temperature: 0.5, top_k: 2, top_p: 1.0, min_p: 0.0, seed: 9, ..Default::default() };
        for step in 0..20 {
            let (t, lp) = sample_with_logprobs(&logits, &p, &[], step, Some(5));
            let lp = lp.unwrap();
            assert_eq!(t, sample(&logits, &p, &[], step), "the same token with or without logprobs");
            assert_eq!(lp.top.len(), 2, "only what top-k kept");
            let sum: f64 = lp.top.iter().map(|x| (x.1 as f64).exp()).sum();
            assert!((sum - 1.0).abs() < 1e-6);
            let (a, b) = (3.0f64 / 0.5, 2.0f64 / 0.5);
            let expect_best = a - (a.exp() + b.exp()).ln();
            assert!((lp.top[0].1 as f64 - expect_best).abs() < 1e-6);
            assert!(lp.top.iter().any(|x| x.0 == t && x.1 == lp.logprob) && lp.logprob <= 0.0);
        }
    }

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams { temperature, top_k: 0, top_p: 1.0, min_p: 0.0, ..Default::default() }
    }

    #[test]
    fn greedy_takes_the_lowest_index_of_the_max() {
        assert_eq!(sample(&[0.0, 3.0, 3.0, 1.0], &params(0.0), &[], 0), 1);
    }

    #[test]
    fn repeat_penalty_changes_the_greedy_choice() {
        let p = SamplingParams { repeat_penalty: 2.0, ..params(0.0) };
        assert_eq!(sample(&[0.0, 3.0, 2.0], &p, &[1], 0), 2);
        assert_eq!(sample(&[0.0, 3.0, 2.0], &p, &[], 0), 1);
    }

    /// Greedy with a penalty reads the logits in place unless the best
    /// token is a recent one; either way it is the argmax of the penalized
    /// logits, ties (and negative logits, made more negative) included.
    #[test]
    fn greedy_with_a_penalty_is_the_argmax_of_the_penalized_logits() {
        let mut rng = 0x9e3779b97f4a7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for case in 0..400 {
            // Few distinct values, so ties are common.
            let logits: Vec<f32> = (0..64).map(|_| (next() % 9) as f32 - 6.0).collect();
            let history: Vec<u32> = (0..next() % 80).map(|_| (next() % 64) as u32).collect();
            let p = SamplingParams { repeat_penalty: [1.1, 2.0, 1.0][case % 3], repeat_last_n: 1 + case % 70, ..params(0.0) };
            let mut window = history[history.len().saturating_sub(p.repeat_last_n)..].to_vec();
            window.sort_unstable();
            window.dedup();
            let mut penalized = logits.clone();
            for t in window {
                let l = &mut penalized[t as usize];
                *l = if *l >= 0.0 { *l / p.repeat_penalty } else { *l * p.repeat_penalty };
            }
            assert_eq!(sample(&logits, &p, &history, 0), argmax(&penalized), "case {case}");
        }
    }

    #[test]
    fn same_seed_and_step_give_the_same_token() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let p = SamplingParams { seed: 42, ..params(1.0) };
        let a: Vec<u32> = (0..50).map(|s| sample(&logits, &p, &[], s)).collect();
        let b: Vec<u32> = (0..50).map(|s| sample(&logits, &p, &[], s)).collect();
        assert_eq!(a, b);
        assert!(a.iter().collect::<std::collections::HashSet<_>>().len() > 5, "draws should vary across steps");
    }

    #[test]
    fn top_k_one_is_greedy() {
        let p = SamplingParams { top_k: 1, seed: 7, ..params(1.0) };
        for step in 0..20 {
            assert_eq!(sample(&[0.1, 0.5, 0.4], &p, &[], step), 1);
        }
    }

    #[test]
    fn top_k_candidates_are_those_of_a_full_stable_sort() {
        // Logits of few distinct values, so most of the top k tie: the
        // candidates (seen through the top log-probabilities) must come in
        // the order of a stable sort of the whole vocabulary, ties to the
        // lower id, as the sampled distribution depends on it.
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(5);
        let logits: Vec<f32> = (0..5000).map(|_| (rand::Rng::random_range(&mut rng, 0..40u32) as f32) / 4.0).collect();
        let mut sorted: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
        sorted.sort_by(|a, b| b.1.total_cmp(&a.1));
        // With top-k off, a top-p or min-p cut sorts only a prefix, grown
        // past 256 and 2,048 candidates here (the distribution is flat).
        for (top_k, top_p, min_p) in [(20, 1.0, 0.0), (40, 1.0, 0.0), (0, 1.0, 0.0), (0, 0.9, 0.0), (0, 1.0, 0.01), (0, 0.3, 0.2)] {
            let p = SamplingParams { top_k, top_p, min_p, seed: 9, ..params(1.0) };
            let (token, lp) = sample_with_logprobs(&logits, &p, &[], 0, Some(MAX_TOP_LOGPROBS));
            let ids: Vec<u32> = lp.unwrap().top.iter().map(|&(t, _)| t).collect();
            let n = ids.len();
            assert_eq!(n, MAX_TOP_LOGPROBS.min(if top_k == 0 { logits.len() } else { top_k }));
            assert_eq!(ids, sorted[..n].iter().map(|&(t, _)| t).collect::<Vec<_>>(), "top_k {top_k}, top_p {top_p}, min_p {min_p}");
            // The token drawn is one the cuts keep: of the top p of the mass, at least min_p of the best.
            let w = |t: u32| f64::from(logits[t as usize] - sorted[0].1).exp();
            let total: f64 = logits.iter().map(|&l| f64::from(l - sorted[0].1).exp()).sum();
            let before: f64 = sorted.iter().take_while(|&&(t, _)| t != token).map(|&(t, _)| w(t)).sum();
            assert!(before / total < f64::from(top_p) + 1e-9 && w(token) >= f64::from(min_p) - 1e-9, "token {token} is cut");
        }
    }

    #[test]
    fn order_keys_order_as_total_cmp_does() {
        let v =
            [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 1.5, -1.5, f32::MIN_POSITIVE, -f32::MIN_POSITIVE, f32::MAX];
        for a in v {
            for b in v {
                assert_eq!(order_key(a).cmp(&order_key(b)), a.total_cmp(&b), "{a} against {b}");
            }
        }
    }

    #[test]
    fn min_p_and_top_p_cut_the_tail() {
        // Token 2 has probability ~1e-4 of token 0's: min_p 0.01 must never pick it.
        let logits = [5.0, 4.9, -4.3];
        let p = SamplingParams { min_p: 0.01, seed: 3, ..params(1.0) };
        assert!((0..500).all(|s| sample(&logits, &p, &[], s) != 2));
        let p = SamplingParams { top_p: 0.5, seed: 3, ..params(1.0) };
        assert!((0..500).all(|s| sample(&logits, &p, &[], s) == 0));
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // p = softmax([0, ln 3]) = [0.25, 0.75]
        let logits = [0.0, 3f32.ln()];
        let p = SamplingParams { seed: 11, ..params(1.0) };
        let ones = (0..4000).filter(|&s| sample(&logits, &p, &[], s) == 1).count();
        assert!((2850..3150).contains(&ones), "got {ones} of 4000");
    }

    #[test]
    fn invalid_params_are_refused() {
        assert!(SamplingParams { temperature: -1.0, ..Default::default() }.validate().is_err());
        assert!(SamplingParams { top_p: 0.0, ..Default::default() }.validate().is_err());
        assert!(SamplingParams { repeat_penalty: f32::NAN, ..Default::default() }.validate().is_err());
        assert!(SamplingParams::default().validate().is_ok());
    }
}
