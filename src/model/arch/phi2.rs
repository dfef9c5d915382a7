//! Phi-2 (the design doc's `phi`): attention and MLP side by side on one
//! LayerNorm of the input, both added to it; LayerNorm with a bias; Q, K, V
//! in one fused tensor with biases; rotary positions on the first
//! `rope.dimension_count` values of each head only (32 of 80); an MLP of
//! one GELU (tanh) between two biased products; an LM head with a bias.
//!
//! Reference: HF `modeling_phi.py` (`PhiDecoderLayer`:
//! `attn_outputs + feed_forward_hidden_states + residual`,
//! `partial_rotary_factor`); llama.cpp `LLM_ARCH_PHI2`; candle-transformers'
//! `quantized_phi`, whose operation order this follows (the test demands
//! identical bits).

use std::sync::Arc;

use super::llama::three;
use super::{unscaled, Architecture};
use crate::error::Result;
use crate::model::loader::Loader;
use crate::model::ops::{Act, Attention, Block, Ops};
use crate::model::rope::RopeStyle;
use crate::model::weights::{Linear, Norm, Projections};

pub const ARCH: Architecture = Architecture {
    name: "phi2",
    gguf_names: &["phi2"],
    hf_model_types: &["phi"],
    gguf_rope: RopeStyle::Half,
    // HF's phi keeps Q, K and V apart (llama.cpp's converter fuses them).
    hf_names: &[
        ("attn_norm.bias", "input_layernorm.bias"),
        ("attn_output.weight", "self_attn.dense.weight"),
        ("attn_output.bias", "self_attn.dense.bias"),
        ("ffn_up.weight", "mlp.fc1.weight"),
        ("ffn_up.bias", "mlp.fc1.bias"),
        ("ffn_down.weight", "mlp.fc2.weight"),
        ("ffn_down.bias", "mlp.fc2.bias"),
        ("output_norm.weight", "model.final_layernorm.weight"),
        ("output_norm.bias", "model.final_layernorm.bias"),
        ("output.bias", "lm_head.bias"),
    ],
    hf_norm_offset: 0.0,
    embedding_scale: unscaled,
    chat_template: None,
    load_block: load,
};

#[derive(Debug)]
struct Phi2Block {
    norm: Norm,
    /// Q, K, V with their biases (in GGUF the rows of one fused tensor).
    qkv: Projections,
    attn: Attention,
    o: Linear,
    up: Linear,
    down: Linear,
}

fn load(l: &mut Loader) -> Result<Arc<dyn Block>> {
    let c = l.config().clone();
    let (h, hd, ffn) = (c.hidden_size, c.head_dim, c.intermediate_size);
    let (q_dim, kv_dim) = (c.n_heads * hd, c.n_kv_heads * hd);
    Ok(Arc::new(Phi2Block {
        norm: l.layer_norm("attn_norm", h)?,
        qkv: match l.has("attn_qkv.weight") {
            true => l.fused("attn_qkv", &[q_dim, kv_dim, kv_dim], h)?,
            false => l.projections(&[("attn_q", q_dim), ("attn_k", kv_dim), ("attn_v", kv_dim)], h)?,
        },
        attn: Attention::new(&c, l.model_rope()?),
        o: l.linear_biased("attn_output", h, q_dim)?,
        up: l.linear_biased("ffn_up", ffn, h)?,
        down: l.linear_biased("ffn_down", h, ffn)?,
    }))
}

impl Block for Phi2Block {
    fn forward(&self, op: &mut dyn Ops, x: Act, layer: usize) -> Result<Act> {
        let h = op.norm(x, &self.norm)?;
        let [q, k, v] = three(op.project(h, &self.qkv)?);
        let a = op.attention(q, k, v, layer, &self.attn)?;
        let a = op.linear(a, &self.o)?;
        let m = op.linear(h, &self.up)?;
        let m = op.gelu(m)?;
        let m = op.linear(m, &self.down)?;
        let y = op.add(a, m)?;
        op.add(y, x)
    }
}
