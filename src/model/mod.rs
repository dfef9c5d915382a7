//! Weights, layer slices and KV caches: everything that runs on a node's device.
//!
//! Architecture invariant: `model` does no network I/O and knows nothing of
//! sessions or requests; it maps (input, cache) to output.

pub mod arch;
pub mod candle;
pub mod catalog;
pub mod config;
pub mod device;
pub mod eval;
pub mod gguf;
mod gpu;
pub mod host;
pub mod kquants;
pub mod kv_cache;
pub mod loader;
pub mod ops;
pub mod rope;
pub mod safetensors;
pub mod sampling;
pub mod slice;
pub mod source;
pub mod synthetic;
pub mod weights;

use std::ops::Range;
use std::path::Path;

use candle_core::Device;

pub use config::Config;
pub use config::Pooling;
pub use gguf::LayerBytes;
pub use host::{BatchItem, HostInput};
pub use kv_cache::{KvCache, KvState};
pub use ops::{Act, Attention, Block, Gate, Ops};
pub use slice::{ModelSlice, SliceOutput};
pub use weights::Backend;
use weights::RawWeight;

/// Model-level tensors, by their GGUF names (each format maps them).
pub const EMBED: &str = "token_embd.weight";
pub const OUTPUT_NORM: &str = "output_norm.weight";
pub const OUTPUT: &str = "output.weight";
pub const OUTPUT_BIAS: &str = "output.bias";
pub const OUTPUT_NORM_BIAS: &str = "output_norm.bias";

use crate::error::Result;
use crate::kernels::QMatrix;

/// An opened model in either supported format.
pub enum ModelFile {
    Gguf(gguf::GgufFile),
    Safetensors(Box<safetensors::SafetensorsDir>),
    /// Random weights of a named shape (`synthetic:llama-8b:q4_0`).
    Synthetic(synthetic::SyntheticModel),
}

impl ModelFile {
    /// A directory is read as an HF safetensors model, a file as GGUF.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(spec) = path.to_str().filter(|p| synthetic::is_synthetic(p)) {
            return Ok(ModelFile::Synthetic(synthetic::SyntheticModel::parse(spec)?));
        }
        if path.is_dir() {
            Ok(ModelFile::Safetensors(Box::new(safetensors::SafetensorsDir::open(path)?)))
        } else {
            Ok(ModelFile::Gguf(gguf::GgufFile::open(path)?))
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            ModelFile::Gguf(f) => f.path(),
            ModelFile::Safetensors(d) => d.path(),
            ModelFile::Synthetic(m) => m.path(),
        }
    }

    pub fn config(&self) -> Result<Config> {
        match self {
            ModelFile::Gguf(f) => f.config(),
            ModelFile::Safetensors(d) => d.config(),
            ModelFile::Synthetic(m) => Ok(m.config()),
        }
    }

    /// Whether the file has tensor `name` (GGUF's name) of block `layer`, or a model-level one.
    pub fn has(&self, name: &str, layer: Option<usize>) -> bool {
        match self {
            ModelFile::Gguf(f) => f.has(name, layer),
            // A tied HF model may still ship lm_head; config.json decides.
            ModelFile::Safetensors(d) => !(name == OUTPUT && d.tied_embeddings()) && d.has(name, layer),
            ModelFile::Synthetic(m) => m.has(name, layer),
        }
    }

    pub fn read(&mut self, name: &str, layer: Option<usize>, device: &Device) -> Result<RawWeight> {
        match self {
            ModelFile::Gguf(f) => f.read(name, layer, device),
            ModelFile::Safetensors(d) => d.read(name, layer, device),
            ModelFile::Synthetic(m) => m.read(name, layer, device),
        }
    }

    /// An architecture's hyper-parameter: metadata `{arch}.{gguf_key}`, or `hf_key` of `config.json`.
    pub fn param(&self, gguf_key: &str, hf_key: &str) -> Option<f64> {
        match self {
            ModelFile::Gguf(f) => f.param(gguf_key),
            ModelFile::Safetensors(d) => d.param(hf_key),
            ModelFile::Synthetic(m) => m.param(gguf_key),
        }
    }

    /// A 2-D weight as a [`QMatrix`] for the CPU path; `None` where our
    /// kernels do not take its type. A GGUF tensor is read straight into the
    /// matrix; other formats go through their tensors.
    pub fn read_matrix(&mut self, name: &str, layer: Option<usize>) -> Result<Option<QMatrix>> {
        match self {
            ModelFile::Gguf(f) => f.read_matrix(name, layer),
            other => Ok(weights::host_matrix(other.read(name, layer, &Device::Cpu)?)?.ok()),
        }
    }

    pub fn layer_bytes(&self) -> Result<LayerBytes> {
        let n = self.config()?.n_layers;
        Ok(match self {
            ModelFile::Gguf(f) => f.layer_bytes(n),
            ModelFile::Safetensors(d) => d.layer_bytes(n),
            ModelFile::Synthetic(m) => m.layer_bytes(),
        })
    }

    /// Bytes a slice of `layers` holds: its blocks, plus the embedding on the
    /// first slice and the norm + LM head on the last.
    pub fn slice_bytes(&self, layers: Range<usize>) -> Result<u64> {
        Ok(self.layer_bytes()?.stage(&layers))
    }

    /// Identifies the model: SHA-256 of the GGUF header and tensor table, or of
    /// `config.json` and the safetensors headers.
    /// "Q4_1" etc.: the most common weight type of the blocks' down
    /// projections (what Ollama reports as a model's quantization).
    pub fn quantization(&self) -> String {
        match self {
            ModelFile::Gguf(g) => {
                let mut counts: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
                for (name, info) in g.tensor_infos() {
                    if name.ends_with("ffn_down.weight") {
                        *counts.entry(format!("{:?}", info.ggml_dtype)).or_default() += 1;
                    }
                }
                counts.into_iter().max_by_key(|(_, n)| *n).map(|(k, _)| k.to_uppercase()).unwrap_or_default()
            }
            ModelFile::Safetensors(_) => "F16".into(),
            ModelFile::Synthetic(m) => m.name().rsplit(':').next().unwrap_or_default().to_uppercase(),
        }
    }

    pub fn digest(&self) -> Result<String> {
        match self {
            ModelFile::Gguf(f) => f.header_digest(),
            ModelFile::Safetensors(d) => d.header_digest(),
            ModelFile::Synthetic(m) => Ok(m.digest()),
        }
    }

    /// Bytes of the blocks in `layers`, as stored.
    pub fn bytes_of_blocks(&self, layers: Range<usize>) -> usize {
        self.layer_bytes().map_or(0, |b| b.blocks[layers].iter().sum::<u64>() as usize)
    }
}
