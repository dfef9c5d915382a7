//! The operations an architecture's block is written in.
//!
//! An architecture (`arch/*.rs`) writes its block forward once, as calls on
//! [`Ops`]; two backends implement them: [`super::host`] (our CPU kernels,
//! a batch of sessions per call) and [`super::candle`] (candle's tensor ops,
//! any device). The block never sees a buffer or a tensor, only [`Act`]
//! handles to activations the backend holds: `[rows, width]` for the rows
//! of every item in the step.
//!
//! The ops are coarse where a backend gains by fusing: `attention` takes the
//! raw projections and does per-head norms, rotary positions, the cache write
//! and the attention itself; the host backend runs a `norm`, `glu` or `gelu`
//! inside the quantization pass of the product that consumes it.

use std::sync::Arc;

use super::rope::Rope;
use super::weights::{Linear, Norm, Projections};
use crate::error::Result;

/// An activation a backend holds for the block being run. Handles live for
/// one block: the backend frees everything but the block's output after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Act(pub(super) usize);

/// The gate function of a gated MLP (`f(gate) · up`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// SwiGLU (llama, qwen, mistral, phi3).
    Silu,
    /// GeGLU with GELU's tanh approximation (gemma).
    GeluTanh,
}

/// One layer's attention: shapes, positions and masking.
#[derive(Debug, Clone)]
pub struct Attention {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Rotary tables and pairing (shared by the layers that use one base).
    pub rope: Arc<Rope>,
    /// RMSNorm over each query / key head before rotation (qwen3, gemma3).
    pub q_norm: Option<Norm>,
    pub k_norm: Option<Norm>,
    /// Scores are divided by √`score_dim` (the head size, or gemma's
    /// `query_pre_attn_scalar`).
    pub score_dim: usize,
    /// A query sees only the `window` positions up to and including its own
    /// (sliding-window layers); `None` sees the whole context.
    pub window: Option<usize>,
}

impl Attention {
    /// The config's heads over `rope`: no head norms, scores scaled by the
    /// head size, the whole context seen (architectures change what differs).
    pub fn new(c: &super::Config, rope: Arc<Rope>) -> Self {
        Self {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            rope,
            q_norm: None,
            k_norm: None,
            score_dim: c.head_dim,
            window: None,
        }
    }
}

/// One expert of a mixture: a gated MLP.
#[derive(Debug)]
pub struct Expert {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

/// A mixture of experts (Mixtral, Qwen3-MoE): a router scores every expert
/// per row, the `top_k` best run on the row, their outputs summed with the
/// router's softmax weights (renormalized over the chosen when `norm_top_k`).
#[derive(Debug)]
pub struct Experts {
    /// `[n_experts, hidden]`.
    pub router: Linear,
    pub experts: Vec<Expert>,
    pub top_k: usize,
    pub norm_top_k: bool,
    pub gate: Gate,
}

impl Experts {
    /// For each expert, the rows routed to it and their weights, from the
    /// router's softmax `probs` (`[rows, n_experts]`). The best `top_k` of a
    /// row, ties to the lower index (a stable sort by descending weight, as
    /// candle-transformers' and HF's `topk` pick).
    pub fn route(&self, probs: &[f32]) -> Vec<Vec<(usize, f32)>> {
        let n = self.experts.len();
        let mut routed = vec![Vec::new(); n];
        let mut order: Vec<usize> = Vec::with_capacity(n);
        for (row, p) in probs.chunks_exact(n).enumerate() {
            order.clear();
            order.extend(0..n);
            order.sort_by(|&i, &j| p[j].total_cmp(&p[i]));
            let chosen = &order[..self.top_k.min(n)];
            let sum: f32 = chosen.iter().map(|&e| p[e]).sum();
            for &e in chosen {
                routed[e].push((row, if self.norm_top_k { p[e] / sum } else { p[e] }));
            }
        }
        routed
    }
}

/// What a block forward is written in. Object-safe: a slice holds its
/// blocks as `dyn Block` and runs them on either backend.
pub trait Ops {
    /// `x · Wᵀ (+ b)`.
    fn linear(&mut self, x: Act, w: &Linear) -> Result<Act>;
    /// Several products of one input (Q, K, V; gate and up), in order.
    fn project(&mut self, x: Act, p: &Projections) -> Result<Vec<Act>>;
    fn norm(&mut self, x: Act, norm: &Norm) -> Result<Act>;
    /// `f(gate) · up`, element-wise.
    fn glu(&mut self, gate: Act, up: Act, f: Gate) -> Result<Act>;
    /// GELU (tanh approximation), element-wise: an ungated MLP's (phi2).
    fn gelu(&mut self, x: Act) -> Result<Act>;
    fn add(&mut self, a: Act, b: Act) -> Result<Act>;
    /// `x · s`, element-wise.
    fn scale(&mut self, x: Act, s: f32) -> Result<Act>;
    /// Causal self-attention of block `layer` of the slice over the step's
    /// rows and each item's KV cache: per-head norms, rotary positions, the
    /// cache write, then `softmax(q·Kᵀ/√d) V`. Returns `[rows, n_heads · head_dim]`.
    fn attention(&mut self, q: Act, k: Act, v: Act, layer: usize, attn: &Attention) -> Result<Act>;
    /// A mixture of experts over `x` `[rows, hidden]` → `[rows, hidden]`:
    /// each expert's weights are read once per step, for the rows routed to it.
    fn moe(&mut self, x: Act, experts: &Experts) -> Result<Act>;
}

/// One transformer block of some architecture.
pub trait Block: Send + Sync + std::fmt::Debug {
    /// `x` `[rows, hidden]` → `[rows, hidden]`; `layer` is the block's index in its slice.
    fn forward(&self, ops: &mut dyn Ops, x: Act, layer: usize) -> Result<Act>;
}
