//! Phi-3 and Phi-4 mini: the llama block with Q, K and V in one
//! fused tensor and gate and up in another, NEOX rotary pairing, and a
//! sliding window where the model declares one. The long-context files
//! (128k) scale their rotary frequencies ("LongRoPE": per-pair long or short
//! factors, and cos/sin scaled by an attention factor), which the model's
//! config carries to its rotary tables.
//!
//! Reference: HF `modeling_phi3.py` (`qkv_proj`, `gate_up_proj` split with
//! `chunk(2)`: gate first; `Phi3LongRoPEScaledRotaryEmbedding`); llama.cpp
//! `LLM_ARCH_PHI3`. Paper: <https://arxiv.org/abs/2402.13753>.

use std::sync::Arc;

use super::llama::{Ffn, LlamaBlock};
use super::{unscaled, Architecture};
use crate::error::Result;
use crate::model::loader::Loader;
use crate::model::ops::{Attention, Block};
use crate::model::rope::RopeStyle;

pub const ARCH: Architecture = Architecture {
    name: "phi3",
    gguf_names: &["phi3"],
    hf_model_types: &["phi3"],
    gguf_rope: RopeStyle::Half,
    hf_names: &[("attn_qkv.weight", "self_attn.qkv_proj.weight"), ("ffn_up.weight", "mlp.gate_up_proj.weight")],
    hf_norm_offset: 0.0,
    embedding_scale: unscaled,
    chat_template: None,
    load_block: load,
};

fn load(l: &mut Loader) -> Result<Arc<dyn Block>> {
    let c = l.config().clone();
    let (h, hd, ffn) = (c.hidden_size, c.head_dim, c.intermediate_size);
    let (q_dim, kv_dim) = (c.n_heads * hd, c.n_kv_heads * hd);
    // The llama block, its fused tensors split by rows at load.
    Ok(Arc::new(LlamaBlock {
        attn_norm: l.rms_norm("attn_norm.weight", h)?,
        qkv: l.fused("attn_qkv", &[q_dim, kv_dim, kv_dim], h)?,
        attn: Attention {
            window: l.param_usize("attention.sliding_window", "sliding_window").filter(|&w| w > 0),
            ..Attention::new(&c, l.model_rope()?)
        },
        o: l.linear("attn_output.weight", h, q_dim)?,
        ffn_norm: l.rms_norm("ffn_norm.weight", h)?,
        ffn: Ffn::Dense { gate_up: l.fused("ffn_up", &[ffn, ffn], h)?, down: l.linear("ffn_down.weight", h, ffn)? },
    }))
}
