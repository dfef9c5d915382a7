//! Llama 2 / 3.x, Mistral, TinyLlama, SmolLM/SmolLM2: pre-norm attention with
//! grouped-query heads and rotary positions, then a pre-norm SwiGLU MLP.
//!
//! Paper: <https://arxiv.org/abs/2302.13971>. Reference: llama.cpp
//! `LLM_ARCH_LLAMA`, candle-transformers' `quantized_llama`, whose operation
//! order this follows exactly (the golden test demands identical bits).
//! llama.cpp's converter permutes q/k rows so GGUF files rotate interleaved pairs.
//! With a router (`ffn_gate_inp`) the MLP is a mixture of experts: Mixtral
//! (<https://arxiv.org/abs/2401.04088>), softmax over the experts, the top
//! `expert_used_count` renormalized.

use std::sync::Arc;

use super::{unscaled, Architecture};
use crate::error::Result;
use crate::model::loader::Loader;
use crate::model::ops::{Act, Attention, Block, Experts, Gate, Ops};
use crate::model::rope::RopeStyle;
use crate::model::weights::{Linear, Norm, Projections};

pub const ARCH: Architecture = Architecture {
    name: "llama",
    gguf_names: &["llama", "mistral"],
    hf_model_types: &["llama", "mistral", "mixtral"],
    gguf_rope: RopeStyle::Interleaved,
    // Mixtral's checkpoints hold each expert's SwiGLU as w1 (gate), w3 (up), w2 (down).
    hf_names: &[
        ("ffn_gate_inp.weight", "block_sparse_moe.gate.weight"),
        ("ffn_gate.{e}.weight", "block_sparse_moe.experts.{e}.w1.weight"),
        ("ffn_up.{e}.weight", "block_sparse_moe.experts.{e}.w3.weight"),
        ("ffn_down.{e}.weight", "block_sparse_moe.experts.{e}.w2.weight"),
    ],
    hf_norm_offset: 0.0,
    embedding_scale: unscaled,
    chat_template: None,
    load_block: |l| load_with(l, HeadNorms::None),
};

/// Whether the block normalizes each query and key head (qwen3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum HeadNorms {
    None,
    Required,
}

#[derive(Debug)]
pub(super) struct LlamaBlock {
    pub(super) attn_norm: Norm,
    /// Q, K, V (with biases where the file has them: qwen2).
    pub(super) qkv: Projections,
    pub(super) attn: Attention,
    pub(super) o: Linear,
    pub(super) ffn_norm: Norm,
    pub(super) ffn: Ffn,
}

/// The MLP of a llama-family block.
#[derive(Debug)]
pub(super) enum Ffn {
    /// SwiGLU; gate and up are one projection.
    Dense { gate_up: Projections, down: Linear },
    /// A mixture of SwiGLU experts.
    Experts(Experts),
}

impl Ffn {
    /// A mixture where the block has a router, else the dense MLP.
    pub(super) fn load(l: &mut Loader) -> Result<Self> {
        let c = l.config().clone();
        let (h, ffn) = (c.hidden_size, c.intermediate_size);
        // Mixtral and Qwen3-MoE both renormalize the chosen experts' weights.
        let norm_top_k = l.param_usize("expert_weights_norm", "norm_topk_prob").is_none_or(|v| v != 0);
        Ok(match l.experts(h, Gate::Silu, norm_top_k)? {
            Some(e) => Ffn::Experts(e),
            None => {
                Ffn::Dense { gate_up: l.projections(&[("ffn_gate", ffn), ("ffn_up", ffn)], h)?, down: l.linear("ffn_down.weight", h, ffn)? }
            }
        })
    }

    pub(super) fn forward(&self, op: &mut dyn Ops, x: Act) -> Result<Act> {
        match self {
            Ffn::Dense { gate_up, down } => {
                let [g, u] = two(op.project(x, gate_up)?);
                let m = op.glu(g, u, Gate::Silu)?;
                op.linear(m, down)
            }
            Ffn::Experts(e) => op.moe(x, e),
        }
    }
}

pub(super) fn load_with(l: &mut Loader, head_norms: HeadNorms) -> Result<Arc<dyn Block>> {
    let c = l.config().clone();
    let (h, q_dim, kv_dim) = (c.hidden_size, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
    Ok(Arc::new(LlamaBlock {
        attn_norm: l.rms_norm("attn_norm.weight", h)?,
        qkv: l.projections(&[("attn_q", q_dim), ("attn_k", kv_dim), ("attn_v", kv_dim)], h)?,
        attn: Attention {
            q_norm: (head_norms == HeadNorms::Required).then(|| l.rms_norm("attn_q_norm.weight", c.head_dim)).transpose()?,
            k_norm: (head_norms == HeadNorms::Required).then(|| l.rms_norm("attn_k_norm.weight", c.head_dim)).transpose()?,
            ..Attention::new(&c, l.model_rope()?)
        },
        o: l.linear("attn_output.weight", h, q_dim)?,
        ffn_norm: l.rms_norm("ffn_norm.weight", h)?,
        ffn: Ffn::load(l)?,
    }))
}

impl Block for LlamaBlock {
    fn forward(&self, op: &mut dyn Ops, x: Act, layer: usize) -> Result<Act> {
        let h = op.norm(x, &self.attn_norm)?;
        let [q, k, v] = three(op.project(h, &self.qkv)?);
        let a = op.attention(q, k, v, layer, &self.attn)?;
        let a = op.linear(a, &self.o)?;
        let x = op.add(a, x)?;
        let h = op.norm(x, &self.ffn_norm)?;
        let m = self.ffn.forward(op, h)?;
        op.add(m, x)
    }
}

/// The outputs of a three-part projection (Q, K, V).
pub(super) fn three(v: Vec<Act>) -> [Act; 3] {
    v.try_into().expect("three projections give three outputs")
}

/// The outputs of a two-part projection (gate, up).
pub(super) fn two(v: Vec<Act>) -> [Act; 2] {
    v.try_into().expect("two projections give two outputs")
}
