//! The supported architectures.
//!
//! Llama-family decoders differ in a handful of facts (names in each format,
//! biases on q/k/v, the rotary pairing in GGUF files); each architecture is one
//! file declaring those facts as an [`ArchSpec`], and the shared block code in
//! `model::block` reads them. Adding an architecture of this family is one new
//! file and one line in [`ARCHITECTURES`].

mod llama;
mod qwen2;

use super::config::RopeStyle;
use crate::error::{Error, Result};

#[derive(Debug)]
pub struct ArchSpec {
    /// The name sollol reports.
    pub name: &'static str,
    /// `general.architecture` values in GGUF files (also the metadata key prefix).
    pub gguf_names: &'static [&'static str],
    /// `model_type` values in HF `config.json`.
    pub hf_model_types: &'static [&'static str],
    /// Whether q, k and v projections carry a bias.
    pub qkv_bias: bool,
    /// Rotary pairing of GGUF files of this architecture (HF files always use [`RopeStyle::Half`]).
    pub gguf_rope: RopeStyle,
}

pub const ARCHITECTURES: &[&ArchSpec] = &[&llama::SPEC, &qwen2::SPEC];

pub fn by_gguf_name(name: &str) -> Result<&'static ArchSpec> {
    ARCHITECTURES.iter().find(|a| a.gguf_names.contains(&name)).copied().ok_or_else(|| Error::UnsupportedArchitecture(name.to_string()))
}

pub fn by_hf_model_type(model_type: &str) -> Result<&'static ArchSpec> {
    ARCHITECTURES
        .iter()
        .find(|a| a.hf_model_types.contains(&model_type))
        .copied()
        .ok_or_else(|| Error::UnsupportedArchitecture(model_type.to_string()))
}
