//! Qwen3-MoE: qwen3's attention (per-head q/k norms) with a mixture of
//! SwiGLU experts for its MLP: softmax over the experts, the top
//! `expert_used_count` renormalized (`norm_topk_prob`), no shared expert.
//!
//! Reference: HF `modeling_qwen3_moe.py` (`Qwen3MoeSparseMoeBlock`);
//! llama.cpp `LLM_ARCH_QWEN3MOE`.

use super::{llama, unscaled, Architecture};
use crate::model::rope::RopeStyle;

pub const ARCH: Architecture = Architecture {
    name: "qwen3moe",
    gguf_names: &["qwen3moe"],
    hf_model_types: &["qwen3_moe"],
    gguf_rope: RopeStyle::Half,
    hf_names: &[
        ("attn_q_norm.weight", "self_attn.q_norm.weight"),
        ("attn_k_norm.weight", "self_attn.k_norm.weight"),
        ("ffn_gate_inp.weight", "mlp.gate.weight"),
        ("ffn_gate.{e}.weight", "mlp.experts.{e}.gate_proj.weight"),
        ("ffn_up.{e}.weight", "mlp.experts.{e}.up_proj.weight"),
        ("ffn_down.{e}.weight", "mlp.experts.{e}.down_proj.weight"),
    ],
    hf_norm_offset: 0.0,
    embedding_scale: unscaled,
    chat_template: None,
    load_block: |l| llama::load_with(l, llama::HeadNorms::Required),
};
