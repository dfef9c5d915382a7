//! Qwen2 / Qwen2.5: the llama block with biases on q, k and v (which the
//! llama loader takes wherever the file has them).
//!
//! Reference: HF `modeling_qwen2.py`; llama.cpp `LLM_ARCH_QWEN2` (NEOX rotary
//! pairing, the q/k rows are not permuted in GGUF files).

use super::{llama, unscaled, Architecture};
use crate::model::rope::RopeStyle;

pub const ARCH: Architecture = Architecture {
    name: "qwen2",
    gguf_names: &["qwen2"],
    hf_model_types: &["qwen2"],
    gguf_rope: RopeStyle::Half,
    hf_names: &[],
    hf_norm_offset: 0.0,
    embedding_scale: unscaled,
    chat_template: None,
    load_block: |l| llama::load_with(l, llama::HeadNorms::None),
};
