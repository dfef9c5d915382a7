//! The supported architectures, one file each.
//!
//! A file holds everything its architecture is: the names it goes by in
//! each format, its block's weights (loaded through [`Loader`]) and its
//! block forward written once in [`Ops`](super::ops::Ops), which both
//! backends run. Adding an architecture whose ops exist is one new file and
//! one line in [`ARCHITECTURES`].

mod gemma3;
mod llama;
mod phi2;
mod phi3;
mod qwen2;
mod qwen3;
mod qwen3moe;

use std::sync::Arc;

use super::loader::Loader;
use super::ops::Block;
use super::rope::RopeStyle;
use crate::error::{Error, Result};

pub struct Architecture {
    /// The name sollol reports.
    pub name: &'static str,
    /// `general.architecture` values in GGUF files (also the metadata key prefix).
    pub gguf_names: &'static [&'static str],
    /// `model_type` values in HF `config.json`.
    pub hf_model_types: &'static [&'static str],
    /// Rotary pairing of GGUF files of this architecture (HF files always use [`RopeStyle::Half`]).
    pub gguf_rope: RopeStyle,
    /// HF names of the block tensors whose name differs from the llama
    /// family's (GGUF base name → HF name under `model.layers.{i}.`).
    pub hf_names: &'static [(&'static str, &'static str)],
    /// Added to RMSNorm weights read from HF checkpoints (gemma stores `w - 1`).
    pub hf_norm_offset: f32,
    /// The embedding rows are multiplied by this, given the hidden size
    /// (gemma: √hidden).
    pub embedding_scale: fn(usize) -> Option<f32>,
    /// The chat template of models whose files ship none (HF's, minijinja-compatible).
    pub chat_template: Option<&'static str>,
    /// Loads one block of this architecture.
    pub load_block: fn(&mut Loader) -> Result<Arc<dyn Block>>,
}

impl std::fmt::Debug for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

pub const ARCHITECTURES: &[&Architecture] =
    &[&llama::ARCH, &qwen2::ARCH, &qwen3::ARCH, &qwen3moe::ARCH, &gemma3::ARCH, &phi3::ARCH, &phi2::ARCH];

fn unsupported(name: &str) -> Error {
    Error::UnsupportedArchitecture { name: name.to_string(), supported: supported() }
}

pub fn by_gguf_name(name: &str) -> Result<&'static Architecture> {
    ARCHITECTURES.iter().find(|a| a.gguf_names.contains(&name)).copied().ok_or_else(|| unsupported(name))
}

pub fn by_hf_model_type(model_type: &str) -> Result<&'static Architecture> {
    ARCHITECTURES.iter().find(|a| a.hf_model_types.contains(&model_type)).copied().ok_or_else(|| unsupported(model_type))
}

/// No embedding scale (most architectures).
fn unscaled(_: usize) -> Option<f32> {
    None
}

/// The architecture names sollol runs, as GGUF files spell them.
pub fn supported() -> String {
    ARCHITECTURES.iter().flat_map(|a| a.gguf_names.iter().copied()).collect::<Vec<_>>().join(", ")
}
