//! Qwen3-MoE: qwen3's attention (per-head q/k norms) with a mixture of
//! SwiGLU experts for its MLP: softmax over the experts, the top
//! `expert_used_count` renormalized (`norm_topk_prob`), no shared expert.
//!
//! Reference: HF `modeling_qwen3_moe.py` (`Qwen3MoeSparseMoeBlock`);
//! llama.cpp `LLM_ARCH_QWEN3MOE`.

use super::{llama, qwen3, unscaled, Architecture};
use crate::model::rope::RopeStyle;

pub const ARCH: Architecture = Architecture {
    name: "qwen3moe",
    gguf_names: &["qwen3moe"],
    hf_model_types: &["qwen3_moe"],
    gguf_rope: RopeStyle::Half,
    hf_names: qwen3::HF_NAMES,
    hf_norm_offset: 0.0,
    embedding_scale: unscaled,
    chat_template: None,
    load_block: |l| llama::load_with(l, llama::HeadNorms::Required),
};
