//! The f32 operations of a block, fused where it saves a pass over memory:
//! RMSNorm, rotary embeddings, SiLU-gated product, and attention over a KV
//! cache that is read in place (grouped-query heads are indexed, never
//! repeated). Loops are written lane-wise (8 independent accumulators) so the
//! compiler vectorizes them on any target; the hot ones are `#[inline(always)]`
//! so that `kernels` can compile them again for AVX2 (`vectorized!`).

use std::cell::RefCell;

use half::f16;

const LANES: usize = 8;

/// Σ a·b with 8 lane accumulators (vectorizable; a fixed summation order),
/// `b` in f32 or f16.
#[inline(always)]
pub fn dot<T: Copy + Into<f32>>(a: &[f32], b: &[T]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(&x, &y)| x * y.into()).sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l].into();
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `out = (x - mean(x)) / √(var(x) + eps) · w + b` for every row of `w.len()` values.
#[inline(always)]
pub fn layer_norm(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let mean = xr.iter().sum::<f32>() / n as f32;
        for (o, &v) in or.iter_mut().zip(xr) {
            *o = v - mean;
        }
        let scale = 1.0 / (dot(or, or) / n as f32 + eps).sqrt();
        for ((o, &g), &b) in or.iter_mut().zip(w).zip(b) {
            *o = *o * scale * g + b;
        }
    }
}

/// `out = x / rms(x) * w` for every row of `w.len()` values.
#[inline(always)]
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let scale = 1.0 / (dot(xr, xr) / n as f32 + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * scale * g;
        }
    }
}

/// `x += y`.
pub fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Adds `b` to every row of `x`.
pub fn add_rows(x: &mut [f32], b: &[f32]) {
    for row in x.chunks_exact_mut(b.len()) {
        add(row, b);
    }
}

/// e^x: Cody-Waite range reduction and a degree-6 polynomial (relative
/// error below 3e-7 on the range softmax and SiLU use), in plain arithmetic
/// the compiler vectorizes, where `f32::exp` is a call per element.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Keeps 2ⁿ a normal float; e^-87 ≈ 2e-38 is as good as 0 for softmax.
    let x = x.clamp(-87.0, 88.0);
    // Round to nearest by the 1.5·2²³ trick (no SSE4.1 round instruction needed).
    const MAGIC: f32 = 12_582_912.0;
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (0.166_666_67 + r * (0.041_666_668 + r * (0.008_333_452 + r * 0.001_388_523_4)))));
    // t's ulp is 1, so its low bits hold n: 2ⁿ by integer operations alone,
    // which vectorize where a (saturating) float-to-int cast does not.
    f32::from_bits(t.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127) << 23) * p
}

/// `x = softmax(x)` in place.
#[inline(always)]
pub fn softmax(x: &mut [f32]) {
    let mut ml = [0f32; 2];
    exp_shifted(x, &mut ml);
    let inv = 1.0 / ml[1];
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `x = exp(x - max)` in place and `ml = [max, Σ exp(x - max)]`: softmax
/// before its division, for parts of a row to be combined. Maximum and sum
/// run in 8 lanes (a chain of dependent adds would cost a float latency per
/// element).
#[inline(always)]
pub fn exp_shifted(x: &mut [f32], ml: &mut [f32]) {
    let lanes = |x: &[f32], init: f32, f: fn(f32, f32) -> f32| {
        let mut acc = [init; LANES];
        let chunks = x.chunks_exact(LANES);
        let tail = chunks.remainder().iter().fold(init, |a, &v| f(a, v));
        for c in chunks {
            for l in 0..LANES {
                acc[l] = f(acc[l], c[l]);
            }
        }
        acc.iter().fold(tail, |a, &v| f(a, v))
    };
    let max = lanes(x, f32::NEG_INFINITY, f32::max);
    for v in x.iter_mut() {
        *v = exp(*v - max);
    }
    ml[0] = max;
    ml[1] = lanes(x, 0.0, |a, b| a + b);
}

/// `g = silu(g) * u`, the SwiGLU gate.
#[inline(always)]
pub fn silu_mul(g: &mut [f32], u: &[f32]) {
    for (a, &b) in g.iter_mut().zip(u) {
        *a = *a / (1.0 + exp(-*a)) * b;
    }
}

/// GELU's tanh approximation: `x/2 · (1 + tanh(√(2/π)(x + 0.044715x³)))`,
/// where `(1 + tanh(y))/2 = 1 / (1 + e^(-2y))`.
#[inline(always)]
fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let y = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
    x / (1.0 + exp(-2.0 * y))
}

/// `g = gelu(g) * u`, the GeGLU gate (gemma).
#[inline(always)]
pub fn gelu_mul(g: &mut [f32], u: &[f32]) {
    for (a, &b) in g.iter_mut().zip(u) {
        *a = gelu_tanh(*a) * b;
    }
}

/// `x = gelu(x)` (phi2's MLP).
#[inline(always)]
pub fn gelu(x: &mut [f32]) {
    for a in x.iter_mut() {
        *a = gelu_tanh(*a);
    }
}

/// Every `w.len()`-value row of `x` normalized in place (per-head q/k norms).
pub fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let n = w.len();
    for xr in x.chunks_exact_mut(n) {
        let scale = 1.0 / (dot(xr, xr) / n as f32 + eps).sqrt();
        for (v, &g) in xr.iter_mut().zip(w) {
            *v = *v * scale * g;
        }
    }
}

/// Rotary tables and how a head uses them.
#[derive(Debug, Clone, Copy)]
pub struct Rotation<'a> {
    /// `[context, rot_dim / 2]`.
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    /// The leading values of each head that rotate.
    pub rot_dim: usize,
    /// Pairs (2i, 2i+1); otherwise (i, i + rot_dim/2).
    pub interleaved: bool,
}

/// Rotates the first `r.rot_dim` values of each head of rows
/// `[seq, heads, head_dim]` in place for positions `pos..pos+seq` (all of
/// them but for partial rotary embeddings, phi2's). Each pairing has its
/// own loop without a branch, so both vectorize.
#[inline(always)]
pub fn rope(x: &mut [f32], heads: usize, head_dim: usize, pos: usize, r: Rotation) {
    let Rotation { cos, sin, rot_dim, interleaved } = r;
    let half = rot_dim / 2;
    for (i, row) in x.chunks_exact_mut(heads * head_dim).enumerate() {
        let (c, s) = (&cos[(pos + i) * half..][..half], &sin[(pos + i) * half..][..half]);
        for h in row.chunks_exact_mut(head_dim) {
            let h = &mut h[..rot_dim];
            if interleaved {
                for ((p, &c), &s) in h.chunks_exact_mut(2).zip(c).zip(s) {
                    let (x0, x1) = (p[0], p[1]);
                    p[0] = x0 * c - x1 * s;
                    p[1] = x0 * s + x1 * c;
                }
            } else {
                let (a, b) = h.split_at_mut(half);
                for (((a, b), &c), &s) in a.iter_mut().zip(b.iter_mut()).zip(c).zip(s) {
                    let (x0, x1) = (*a, *b);
                    *a = x0 * c - x1 * s;
                    *b = x0 * s + x1 * c;
                }
            }
        }
    }
}

thread_local! {
    /// Attention scores of one group of query heads; grows to the longest context seen.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Rows per head in the cache buffers (`[n_kv_heads, capacity, head_dim]`).
    pub capacity: usize,
    /// Scores are `q·k · scale`.
    pub scale: f32,
    /// A query at position p sees cache rows `p + 1 - window ..= p` (all when
    /// the window is at least the context).
    pub window: usize,
}

impl AttnShape {
    /// Query heads per K/V head.
    pub fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// The cache rows a query at `pos` sees.
    fn visible(&self, pos: usize) -> std::ops::Range<usize> {
        (pos + 1).saturating_sub(self.window)..pos + 1
    }

    /// The spans a query at `pos` is attended in: 1 where it sees at most [`SPAN`] rows.
    pub fn spans(&self, pos: usize) -> usize {
        self.visible(pos).len().div_ceil(SPAN)
    }
}

/// Cache rows one attention task reads at most. A query row that sees more
/// is attended in spans of this many rows, one task each, then combined
/// ([`attend_span`], [`combine_spans`]; flash-decoding's split): a decode
/// step's few K/V heads would otherwise leave threads idle while one reads
/// a long context. The split depends only on the row's position, so a row's
/// result does not depend on the threads or on its batch.
pub const SPAN: usize = 1024;

/// Causal attention of one query row (at absolute position `pos`) for the
/// query heads that share K/V head `kv` (`q` and `out` are `[group, head_dim]`):
/// `out_i = softmax(q_i·Kᵀ · scale) V` over the cache rows the window leaves
/// visible up to `pos` (f16 cache, f32 arithmetic). The heads go through the
/// kernels together, so each cache row is read once for all of them.
pub fn attend(shape: AttnShape, q: &[f32], k: &[f16], v: &[f16], pos: usize, kv: usize, out: &mut [f32]) {
    scores_then_values(shape, q, k, v, shape.visible(pos), kv, out, super::softmax);
}

/// Span `span` of [`attend`]'s rows for a query at `pos`, before the
/// softmax's division: `out_i = Σ_p exp(s_ip - m_i) V_p` and `ml[2i..2i + 2]
/// = [m_i, Σ_p exp(s_ip - m_i)]`, `m_i` the span's largest score of head `i`.
#[allow(clippy::too_many_arguments)] // the shape, the inputs, the span, the two outputs
pub fn attend_span(shape: AttnShape, q: &[f32], k: &[f16], v: &[f16], pos: usize, kv: usize, span: usize, out: &mut [f32], ml: &mut [f32]) {
    let visible = shape.visible(pos);
    let start = visible.start + span * SPAN;
    let rows = start..(start + SPAN).min(visible.end);
    let mut head = 0;
    scores_then_values(shape, q, k, v, rows, kv, out, |scores| {
        super::exp_shifted(scores, &mut ml[2 * head..2 * head + 2]);
        head += 1;
    });
}

/// [`attend`]'s result from its spans' ([`attend_span`]): `parts` holds
/// each span's `[group, head_dim]` outputs followed by its `[group, 2]`
/// maxima and sums, span after span. Each head's spans are rescaled to the
/// largest maximum, in span order.
pub fn combine_spans(group: usize, head_dim: usize, parts: &[f32], out: &mut [f32]) {
    let part_len = group * (head_dim + 2);
    let spans = parts.chunks_exact(part_len);
    for (i, out) in out.chunks_exact_mut(head_dim).enumerate().take(group) {
        let ml = |p: &[f32]| (p[group * head_dim + 2 * i], p[group * head_dim + 2 * i + 1]);
        let m = spans.clone().map(|p| ml(p).0).fold(f32::NEG_INFINITY, f32::max);
        out.fill(0.0);
        let mut sum = 0.0;
        for p in spans.clone() {
            let (max, s) = ml(p);
            let w = exp(max - m);
            sum += w * s;
            for (o, &x) in out.iter_mut().zip(&p[i * head_dim..(i + 1) * head_dim]) {
                *o += w * x;
            }
        }
        let inv = 1.0 / sum;
        out.iter_mut().for_each(|o| *o *= inv);
    }
}

/// The scores of `q`'s heads against cache `rows` of K/V head `kv`, each
/// head's row of scores passed through `weigh` in head order, then their
/// weighted sum of the V rows into `out`.
#[allow(clippy::too_many_arguments)] // the shape, the inputs, the rows, the output and the weighing
fn scores_then_values(
    shape: AttnShape,
    q: &[f32],
    k: &[f16],
    v: &[f16],
    rows: std::ops::Range<usize>,
    kv: usize,
    out: &mut [f32],
    mut weigh: impl FnMut(&mut [f32]),
) {
    let (d, n) = (shape.head_dim, rows.len());
    let base = (kv * shape.capacity + rows.start) * d;
    let (k, v) = (&k[base..base + n * d], &v[base..base + n * d]);
    SCORES.with_borrow_mut(|scores| {
        scores.resize(shape.group() * n, 0.0);
        super::attention_scores(q, d, k, shape.scale, scores);
        scores.chunks_exact_mut(n).for_each(&mut weigh);
        super::weighted_sum(scores, d, v, out);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_within_its_stated_error() {
        let mut worst = 0f32;
        let mut x = -80.0f32;
        while x < 80.0 {
            let (got, want) = (exp(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert!(exp(-1000.0) < 1e-37 && exp(1000.0).is_finite());
    }
}
