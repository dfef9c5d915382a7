//! Llama 2 / 3.x, Mistral, TinyLlama, SmolLM/SmolLM2.
//!
//! Paper: <https://arxiv.org/abs/2302.13971>. Reference: llama.cpp `LLM_ARCH_LLAMA`.
//! llama.cpp's converter permutes q/k rows so GGUF files rotate interleaved pairs.

use super::ArchSpec;
use crate::model::config::RopeStyle;

pub const SPEC: ArchSpec = ArchSpec {
    name: "llama",
    gguf_names: &["llama", "mistral"],
    hf_model_types: &["llama", "mistral"],
    qkv_bias: false,
    gguf_rope: RopeStyle::Interleaved,
};
