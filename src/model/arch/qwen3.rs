//! Qwen3 (dense): the llama block with an RMSNorm over each query and key
//! head before the rotation, NEOX rotary pairing, no q/k/v biases.
//!
//! Reference: HF `modeling_qwen3.py` (`Qwen3Attention`: `q_norm`, `k_norm`
//! over `head_dim`); llama.cpp `LLM_ARCH_QWEN3`.

use super::{llama, unscaled, Architecture};
use crate::model::rope::RopeStyle;

pub const ARCH: Architecture = Architecture {
    name: "qwen3",
    gguf_names: &["qwen3"],
    hf_model_types: &["qwen3"],
    gguf_rope: RopeStyle::Half,
    hf_names: &[("attn_q_norm.weight", "self_attn.q_norm.weight"), ("attn_k_norm.weight", "self_attn.k_norm.weight")],
    hf_norm_offset: 0.0,
    embedding_scale: unscaled,
    chat_template: None,
    load_block: |l| llama::load_with(l, llama::HeadNorms::Required),
};
