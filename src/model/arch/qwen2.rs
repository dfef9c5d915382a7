//! Qwen2 / Qwen2.5: the llama block with biases on q, k and v.
//!
//! Reference: HF `modeling_qwen2.py`; llama.cpp `LLM_ARCH_QWEN2` (NEOX rotary
//! pairing, the q/k rows are not permuted in GGUF files).

use super::ArchSpec;
use crate::model::config::RopeStyle;

pub const SPEC: ArchSpec =
    ArchSpec { name: "qwen2", gguf_names: &["qwen2"], hf_model_types: &["qwen2"], qkv_bias: true, gguf_rope: RopeStyle::Half };
