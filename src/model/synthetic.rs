//! Synthetic models: random weights of a named shape, made in memory, so
//! speed can be measured where no model file can be fetched or carried (a
//! lent GPU machine, CI). Named `synthetic:SHAPE:TYPE`, e.g.
//! `synthetic:llama-8b:q4_0` (shapes: tiny, smollm2-135m, llama-1b, llama-8b,
//! llama-70b); every node generates the same weights for its
//! own slice from the name, so pipelines work too.
//!
//! The weights are random, so the text is noise: these models measure speed
//! and memory, never quality.

use std::path::{Path, PathBuf};

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

use super::arch;
use super::config::Config;
use super::gguf::LayerBytes;
use super::rope::RopeStyle;
use super::weights::RawWeight;
use crate::error::{Error, Result};

pub const PREFIX: &str = "synthetic:";

/// A block's attention tensors and its norms.
const ATTENTION_TENSORS: &[&str] =
    &["attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight", "ffn_norm.weight"];

/// A dense block's MLP.
const MLP_TENSORS: &[&str] = &["ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"];

/// A mixture block's MLP (Mixtral's layout): the router and three stacks
/// of experts' matrices.
const MOE_TENSORS: &[&str] = &["ffn_gate_inp.weight", "ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight"];

/// The model-level tensors.
const TOP_TENSORS: &[&str] = &["token_embd.weight", "output_norm.weight", "output.weight"];

/// A named model shape (the published configs of these models).
struct Shape {
    name: &'static str,
    hidden: usize,
    ffn: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    vocab: usize,
    context: usize,
    rope_theta: f32,
    /// A mixture of `experts` MLPs of `ffn` rows, `top_k` per token (0: dense).
    experts: usize,
    top_k: usize,
}

// A Mixtral-style mixture (8 experts, 2 per token) small enough for this
// machine, on SmolLM2's vocabulary so a saved file carries its tokenizer.
const MOE_1B: Shape = Shape {
    name: "moe-1b",
    hidden: 1024,
    ffn: 1408,
    layers: 12,
    heads: 16,
    kv_heads: 4,
    vocab: 49152,
    context: 4096,
    rope_theta: 10_000.0,
    experts: 8,
    top_k: 2,
};

const SHAPES: &[Shape] = &[
    MOE_1B,
    // Many small experts, eight per token (Qwen3-MoE's way: 128 experts of
    // 768 rows, 8 per token), scaled to this machine.
    Shape { name: "moe-64x8", ffn: 256, experts: 64, top_k: 8, ..MOE_1B },
    // Small enough to be random through and through: device checks compare
    // its logits, where repeated rows would hide a wrong row index.
    Shape {
        name: "tiny",
        hidden: 256,
        ffn: 768,
        layers: 4,
        heads: 8,
        kv_heads: 4,
        vocab: 4096,
        context: 2048,
        rope_theta: 10_000.0,
        experts: 0,
        top_k: 0,
    },
    Shape {
        name: "smollm2-135m",
        hidden: 576,
        ffn: 1536,
        layers: 30,
        heads: 9,
        kv_heads: 3,
        vocab: 49152,
        context: 8192,
        rope_theta: 100_000.0,
        experts: 0,
        top_k: 0,
    },
    Shape {
        name: "llama-1b",
        hidden: 2048,
        ffn: 8192,
        layers: 16,
        heads: 32,
        kv_heads: 8,
        vocab: 128_256,
        context: 8192,
        rope_theta: 500_000.0,
        experts: 0,
        top_k: 0,
    },
    Shape {
        name: "llama-8b",
        hidden: 4096,
        ffn: 14336,
        layers: 32,
        heads: 32,
        kv_heads: 8,
        vocab: 128_256,
        context: 8192,
        rope_theta: 500_000.0,
        experts: 0,
        top_k: 0,
    },
    Shape {
        name: "llama-70b",
        hidden: 8192,
        ffn: 28672,
        layers: 80,
        heads: 64,
        kv_heads: 8,
        vocab: 128_256,
        context: 8192,
        rope_theta: 500_000.0,
        experts: 0,
        top_k: 0,
    },
];

/// Weights of more values than this are made of a tile of random rows
/// quantized once and then repeated: generating every weight would cost
/// minutes for an 8B model, and speed does not depend on the rows differing.
const TILE_ABOVE: usize = 4 << 20;
const TILE_ROWS: usize = 64;

#[derive(Debug, Clone)]
pub struct SyntheticModel {
    name: String,
    config: Config,
    dtype: GgmlDType,
    experts: usize,
    top_k: usize,
}

pub fn is_synthetic(spec: &str) -> bool {
    spec.starts_with(PREFIX)
}

impl SyntheticModel {
    /// `synthetic:SHAPE:TYPE` (TYPE defaults to q4_0).
    pub fn parse(spec: &str) -> Result<Self> {
        let rest = spec.strip_prefix(PREFIX).ok_or_else(|| Error::UnknownModel(spec.to_string()))?;
        let (shape, quant) = rest.split_once(':').unwrap_or((rest, "q4_0"));
        let names: Vec<&str> = SHAPES.iter().map(|s| s.name).collect();
        let s = SHAPES
            .iter()
            .find(|s| s.name == shape)
            .ok_or_else(|| Error::InvalidRequest(format!("unknown synthetic shape '{shape}' (known: {})", names.join(", "))))?;
        let dtype = super::gguf::weight_type_by_name(quant).ok_or_else(|| {
            Error::InvalidRequest(format!("unknown synthetic weight type '{quant}' ({})", super::gguf::WEIGHT_TYPE_NAMES))
        })?;
        let config = Config {
            arch: arch::by_gguf_name("llama")?,
            n_layers: s.layers,
            hidden_size: s.hidden,
            intermediate_size: s.ffn,
            n_heads: s.heads,
            n_kv_heads: s.kv_heads,
            head_dim: s.hidden / s.heads,
            vocab_size: s.vocab,
            rms_norm_eps: 1e-5,
            rope_theta: s.rope_theta,
            rope_dim: s.hidden / s.heads,
            rope_style: RopeStyle::Interleaved,
            rope_freq_factors: None,
            rope_attn_factor: 1.0,
            context_length: s.context,
            pooling: Default::default(),
        };
        Ok(Self { name: format!("{PREFIX}{shape}:{quant}"), config, dtype, experts: s.experts, top_k: s.top_k })
    }

    pub fn path(&self) -> &Path {
        Path::new(&self.name)
    }

    pub fn config(&self) -> Config {
        self.config.clone()
    }

    /// Untied LM head, no biases: the llama 3 layout.
    pub fn has(&self, name: &str, _layer: Option<usize>) -> bool {
        self.shape(name).is_some()
    }

    /// The shape of tensor `name` in the llama layout, or Mixtral's with
    /// experts (none for what it lacks).
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let c = &self.config;
        let (h, q, kv, f, e) = (c.hidden_size, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.intermediate_size, self.experts);
        Some(match name {
            "token_embd.weight" | "output.weight" => vec![c.vocab_size, h],
            "attn_q.weight" => vec![q, h],
            "attn_k.weight" | "attn_v.weight" => vec![kv, h],
            "attn_output.weight" => vec![h, q],
            "ffn_gate.weight" | "ffn_up.weight" if e == 0 => vec![f, h],
            "ffn_down.weight" if e == 0 => vec![h, f],
            "ffn_gate_inp.weight" if e > 0 => vec![e, h],
            "ffn_gate_exps.weight" | "ffn_up_exps.weight" if e > 0 => vec![e, f, h],
            "ffn_down_exps.weight" if e > 0 => vec![e, h, f],
            "attn_norm.weight" | "ffn_norm.weight" | "output_norm.weight" => vec![h],
            _ => return None,
        })
    }

    /// The mixture's expert counts (`expert_count`, `expert_used_count`).
    pub fn param(&self, key: &str) -> Option<f64> {
        match key {
            "expert_count" if self.experts > 0 => Some(self.experts as f64),
            "expert_used_count" if self.experts > 0 => Some(self.top_k as f64),
            _ => None,
        }
    }

    /// A block's tensors, by name.
    fn block_tensors(&self) -> impl Iterator<Item = &'static str> {
        let mlp = if self.experts > 0 { MOE_TENSORS } else { MLP_TENSORS };
        ATTENTION_TENSORS.iter().chain(mlp).copied()
    }

    pub fn read(&mut self, name: &str, layer: Option<usize>, device: &Device) -> Result<RawWeight> {
        let shape = self.shape(name).ok_or_else(|| Error::bad_model(self.path(), format!("a synthetic llama has no tensor '{name}'")))?;
        if shape.len() == 1 {
            return Ok(RawWeight::Dense(Tensor::ones(shape[0], candle_core::DType::F32, device)?));
        }
        // A stack of experts' matrices is made as their rows one after the other.
        let (rows, cols) = (shape[..shape.len() - 1].iter().product::<usize>(), shape[shape.len() - 1]);
        // Tiles are seeded by role and shape only: layers share a tile, but each gets its own copy in memory.
        let tiled = rows * cols > TILE_ABOVE;
        let layer_seed = if tiled { u64::from(layer.is_some()) } else { layer.map_or(0, |l| l as u64 + 1) << 8 };
        let name_seed = name.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
        let seed = name_seed << 32 ^ (rows * 31 + cols) as u64 ^ layer_seed;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let tile_rows = if tiled { rows.min(TILE_ROWS) } else { rows };
        let scale = 1.0 / (cols as f32).sqrt();
        let values: Vec<f32> = (0..tile_rows * cols).map(|_| rng.random_range(-scale..scale)).collect();
        let tile = QTensor::quantize(&Tensor::from_vec(values, (tile_rows, cols), &Device::Cpu)?, self.dtype)?;
        let tile = tile.data()?;
        let mut bytes = Vec::with_capacity(tile.len() * rows.div_ceil(tile_rows));
        while bytes.len() < tile.len() / tile_rows * rows {
            let need = tile.len() / tile_rows * rows - bytes.len();
            bytes.extend_from_slice(&tile[..need.min(tile.len())]);
        }
        Ok(RawWeight::Quantized(std::sync::Arc::new(qtensor_from_ggml(self.dtype, &bytes, shape, device)?)))
    }

    fn bytes_of(&self, name: &str) -> u64 {
        let shape = self.shape(name).unwrap_or_default();
        if shape.len() == 1 {
            return shape[0] as u64 * 4;
        }
        (shape.iter().product::<usize>() / self.dtype.block_size() * self.dtype.type_size()) as u64
    }

    pub fn layer_bytes(&self) -> LayerBytes {
        let block: u64 = self.block_tensors().map(|n| self.bytes_of(n)).sum();
        let experts: u64 = self.block_tensors().filter(|n| n.ends_with("_exps.weight")).map(|n| self.bytes_of(n)).sum();
        let mut bytes = LayerBytes::dense(
            vec![block; self.config.n_layers],
            self.bytes_of("token_embd.weight"),
            self.bytes_of("output_norm.weight") + self.bytes_of("output.weight"),
            false,
        );
        if self.experts > 0 {
            bytes.expert_bytes = experts * self.config.n_layers as u64;
            bytes.routed = Some((self.top_k as u32, self.experts as u32));
        }
        bytes
    }

    /// Writes the model as a GGUF file other engines load (llama.cpp
    /// included): its tensors, the llama (or Mixtral) metadata, and the
    /// `tokenizer.*` metadata of `tokenizer_from` (a model of the same
    /// vocabulary size).
    pub fn write_gguf(&mut self, path: &Path, tokenizer_from: &super::gguf::GgufFile) -> Result<()> {
        use candle_core::quantized::gguf_file::{self, Value};
        let tokens = match tokenizer_from.metadata().get("tokenizer.ggml.tokens") {
            Some(Value::Array(a)) => a.len(),
            _ => 0,
        };
        if tokens != self.config.vocab_size {
            return Err(Error::InvalidRequest(format!(
                "{} has a vocabulary of {tokens}, the shape {}",
                tokenizer_from.path().display(),
                self.config.vocab_size
            )));
        }
        let c = self.config.clone();
        let u = |v: usize| Value::U32(v as u32);
        let mut md: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String("llama".into())),
            ("general.name".into(), Value::String(self.name.clone())),
            ("llama.block_count".into(), u(c.n_layers)),
            ("llama.context_length".into(), u(c.context_length)),
            ("llama.embedding_length".into(), u(c.hidden_size)),
            ("llama.feed_forward_length".into(), u(c.intermediate_size)),
            ("llama.attention.head_count".into(), u(c.n_heads)),
            ("llama.attention.head_count_kv".into(), u(c.n_kv_heads)),
            ("llama.rope.dimension_count".into(), u(c.head_dim)),
            ("llama.rope.freq_base".into(), Value::F32(c.rope_theta)),
            ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(c.rms_norm_eps as f32)),
        ];
        if self.experts > 0 {
            md.push(("llama.expert_count".into(), u(self.experts)));
            md.push(("llama.expert_used_count".into(), u(self.top_k)));
        }
        md.extend(tokenizer_from.metadata().iter().filter(|(k, _)| k.starts_with("tokenizer.")).map(|(k, v)| (k.clone(), v.clone())));
        let mut tensors = Vec::new();
        for name in TOP_TENSORS {
            tensors.push((name.to_string(), self.read(name, None, &Device::Cpu)?));
        }
        for layer in 0..c.n_layers {
            for name in self.block_tensors().collect::<Vec<_>>() {
                tensors.push((format!("blk.{layer}.{name}"), self.read(name, Some(layer), &Device::Cpu)?));
            }
        }
        let qtensors = tensors
            .into_iter()
            .map(|(n, w)| match w {
                RawWeight::Quantized(q) => Ok((n, q)),
                RawWeight::Dense(t) => Ok((n, std::sync::Arc::new(QTensor::quantize(&t, GgmlDType::F32)?))),
                RawWeight::Host(_) => Err(Error::InvalidRequest("a synthetic weight read for the CPU kernels".into())),
            })
            .collect::<Result<Vec<_>>>()?;
        let mut out =
            std::io::BufWriter::new(std::fs::File::create(path).map_err(|e| Error::io(format!("cannot create {}", path.display()), e))?);
        let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = qtensors.iter().map(|(n, t)| (n.as_str(), t.as_ref())).collect();
        gguf_file::write(&mut out, &md_refs, &t_refs)?;
        std::io::Write::flush(&mut out).map_err(|e| Error::io(format!("cannot write {}", path.display()), e))?;
        Ok(())
    }

    pub fn digest(&self) -> String {
        format!("{:x}", Sha256::digest(self.name.as_bytes()))
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The path a resolved synthetic model carries (its name).
pub fn path_of(spec: &str) -> Result<PathBuf> {
    Ok(PathBuf::from(SyntheticModel::parse(spec)?.name))
}
