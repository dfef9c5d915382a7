//! The candle backend: [`Ops`] as candle tensor ops, on any device.
//!
//! Activations are `[b, seq, width]` tensors. The order of operations is
//! candle-transformers' `quantized_llama`'s, which is what lets the golden
//! test demand bit-identical logits on the llama family.

use candle_core::{Device, Tensor};

use super::kv_cache::KvCache;
use super::ops::{Act, Attention, Experts, Gate, Ops};
use super::weights::{Linear, Norm, Projections};
use crate::error::Result;

/// [`Ops`] on candle for one step of one session.
pub(super) struct CandleOps<'a> {
    cache: &'a mut KvCache,
    device: Device,
    /// Rows of this step and positions already cached.
    seq: usize,
    pos: usize,
    /// Attention masks of this step by window (`None`: causal only), `[seq, pos + seq]`, 1 = hidden.
    masks: Vec<(Option<usize>, Tensor)>,
    vals: Vec<Tensor>,
}

impl<'a> CandleOps<'a> {
    /// `x` is `[b, seq, width]`.
    pub(super) fn new(cache: &'a mut KvCache, x: Tensor) -> Result<(Self, Act)> {
        let (seq, pos, device) = (x.dim(1)?, cache.len(), x.device().clone());
        Ok((Self { cache, device, seq, pos, masks: Vec::new(), vals: vec![x] }, Act(0)))
    }

    fn put(&mut self, t: Tensor) -> Act {
        self.vals.push(t);
        Act(self.vals.len() - 1)
    }

    pub(super) fn get(&self, x: Act) -> &Tensor {
        &self.vals[x.0]
    }

    /// Frees every value but `keep` (a block's output), which becomes the only handle.
    pub(super) fn end_block(&mut self, keep: Act) -> Act {
        let t = self.vals.swap_remove(keep.0);
        self.vals.clear();
        self.put(t)
    }

    /// The mask of this step for `window`: 1 where query row i (at position
    /// pos + i) may not see cache row j. None where nothing is hidden.
    fn mask(&mut self, window: Option<usize>) -> Result<Option<Tensor>> {
        let (seq, pos) = (self.seq, self.pos);
        let kv = pos + seq;
        let hidden = |i: usize, j: usize| j > pos + i || window.is_some_and(|w| pos + i - j >= w);
        if seq == 1 && !(0..kv).any(|j| hidden(0, j)) {
            return Ok(None);
        }
        if let Some((_, m)) = self.masks.iter().find(|(w, _)| *w == window) {
            return Ok(Some(m.clone()));
        }
        let mask: Vec<u8> = (0..seq).flat_map(|i| (0..kv).map(move |j| u8::from(hidden(i, j)))).collect();
        let mask = Tensor::from_slice(&mask, (seq, kv), &self.device)?;
        self.masks.push((window, mask.clone()));
        Ok(Some(mask))
    }
}

/// `f(gate) · up`.
fn gated(f: Gate, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let g = match f {
        Gate::Silu => candle_nn::ops::silu(gate)?,
        // candle's `gelu` is the tanh approximation (`gelu_erf` the exact one).
        Gate::GeluTanh => gate.gelu()?,
    };
    Ok((g * up)?)
}

impl Ops for CandleOps<'_> {
    fn linear(&mut self, x: Act, w: &Linear) -> Result<Act> {
        let y = w.forward(self.get(x))?;
        Ok(self.put(y))
    }

    fn project(&mut self, x: Act, p: &Projections) -> Result<Vec<Act>> {
        let ys = p.forward(self.get(x))?;
        Ok(ys.into_iter().map(|y| self.put(y)).collect())
    }

    fn norm(&mut self, x: Act, norm: &Norm) -> Result<Act> {
        let y = norm.forward(self.get(x))?;
        Ok(self.put(y))
    }

    fn glu(&mut self, gate: Act, up: Act, f: Gate) -> Result<Act> {
        let y = gated(f, self.get(gate), self.get(up))?;
        Ok(self.put(y))
    }

    fn gelu(&mut self, x: Act) -> Result<Act> {
        let y = self.get(x).gelu()?;
        Ok(self.put(y))
    }

    fn add(&mut self, a: Act, b: Act) -> Result<Act> {
        let y = (self.get(a) + self.get(b))?;
        Ok(self.put(y))
    }

    fn scale(&mut self, x: Act, s: f32) -> Result<Act> {
        let y = (self.get(x) * s as f64)?;
        Ok(self.put(y))
    }

    fn attention(&mut self, q: Act, k: Act, v: Act, layer: usize, attn: &Attention) -> Result<Act> {
        let (b, seq, _) = self.get(q).dims3()?;
        let (nh, nkv, hd) = (attn.n_heads, attn.n_kv_heads, attn.head_dim);
        let pos = self.pos;
        let heads = |x: &Tensor, n: usize| x.reshape((b, seq, n, hd));
        let (mut q, mut k) = (heads(self.get(q), nh)?, heads(self.get(k), nkv)?);
        if let (Some(qn), Some(kn)) = (&attn.q_norm, &attn.k_norm) {
            q = qn.forward(&q.contiguous()?)?;
            k = kn.forward(&k.contiguous()?)?;
        }
        let q = q.transpose(1, 2)?;
        let k = k.transpose(1, 2)?;
        // contiguous: the cache write needs it.
        let v = heads(self.get(v), nkv)?.transpose(1, 2)?.contiguous()?;
        let q = attn.rope.apply(&q, pos)?;
        // contiguous: the cache write needs it (a partial rotation's concatenation is not).
        let k = attn.rope.apply(&k, pos)?.contiguous()?;
        // k, v: [b, n_kv, pos + seq, hd], views into the cache.
        let (k, v) = self.cache.append(layer, &k, &v)?;
        // Heads kv * n_rep .. (kv + 1) * n_rep share K/V head kv: their queries
        // are the rows of one product with it, so K and V are never copied.
        let n_rep = nh / nkv;
        let q = q.contiguous()?.reshape((b, nkv, n_rep * seq, hd))?;
        // att: [b, n_kv, n_rep * seq, pos + seq]
        let att = (q.matmul(&k.t()?)? / (attn.score_dim as f64).sqrt())?;
        let att = match self.mask(attn.window)? {
            Some(mask) => {
                let grouped = att.reshape((b, nkv, n_rep, seq, pos + seq))?;
                let neg_inf = Tensor::new(f32::NEG_INFINITY, att.device())?.broadcast_as(grouped.shape())?;
                mask.broadcast_as(grouped.shape())?.where_cond(&neg_inf, &grouped)?.reshape(att.shape())?
            }
            None => att,
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        // y: [b, n_kv, n_rep * seq, hd] = [b, heads, seq, hd]
        let y = att.matmul(&v)?.reshape((b, nh, seq, hd))?;
        let y = y.transpose(1, 2)?.reshape((b, seq, nh * hd))?;
        Ok(self.put(y))
    }

    /// candle-transformers' `quantized_llama` MoE, op for op: the router's
    /// softmax read back to the host to route, each expert's rows gathered
    /// with `index_select` and added back with `index_add`.
    fn moe(&mut self, x: Act, e: &Experts) -> Result<Act> {
        let xs = self.get(x);
        let (b, seq, hidden) = xs.dims3()?;
        let xs = xs.reshape(((), hidden))?;
        let probs = candle_nn::ops::softmax_last_dim(&e.router.forward(&xs)?)?;
        let routed = e.route(&probs.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        let mut ys = xs.zeros_like()?;
        for (expert, rows) in e.experts.iter().zip(&routed).filter(|(_, r)| !r.is_empty()) {
            let index: Vec<u32> = rows.iter().map(|&(r, _)| r as u32).collect();
            let index = Tensor::new(index.as_slice(), xs.device())?;
            let weights: Vec<f32> = rows.iter().map(|&(_, w)| w).collect();
            let weights = Tensor::new(weights.as_slice(), xs.device())?.reshape(((), 1))?;
            let input = xs.index_select(&index, 0)?.reshape(((), hidden))?;
            let g = gated(e.gate, &expert.gate.forward(&input)?, &expert.up.forward(&input)?)?;
            let h = expert.down.forward(&g)?;
            ys = ys.index_add(&index, &h.broadcast_mul(&weights)?, 0)?;
        }
        let y = ys.reshape((b, seq, hidden))?;
        Ok(self.put(y))
    }
}
