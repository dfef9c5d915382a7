//! HF model directories: `config.json` plus one or more `*.safetensors` files
//! (sharded ones listed in `model.safetensors.index.json`).
//!
//! Files are memory-mapped; a slice copies out only the tensors it owns, so the
//! other blocks' pages are never read.

use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use serde::Deserialize;

use super::arch;
use super::arch::Architecture;
use super::config::Config;
use super::rope::RopeStyle;
use super::weights::RawWeight;
use crate::error::{first_line, Error, Result};

/// The subset of HF `config.json` that llama-family models use.
#[derive(Debug, Deserialize)]
pub struct HfConfig {
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    /// phi's LayerNorm names its epsilon `layer_norm_eps`.
    #[serde(default = "default_eps", alias = "layer_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f32,
    #[serde(default = "default_ctx")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub rope_scaling: Option<RopeScaling>,
    /// The context the model was trained for before long-context scaling (Phi-3 128k).
    pub original_max_position_embeddings: Option<usize>,
    /// The share of each head that rotates (phi's partial rotary embeddings).
    pub partial_rotary_factor: Option<f64>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f32 {
    10_000.0
}
fn default_ctx() -> usize {
    2048
}

/// Rotary scaling: Llama 3.1's frequency-dependent one, linear, Phi-3's LongRoPE.
#[derive(Debug, Deserialize)]
pub struct RopeScaling {
    pub rope_type: Option<String>,
    /// Older files name the kind `type` (Phi-3: `"su"`, later `"longrope"`).
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub factor: Option<f32>,
    pub low_freq_factor: Option<f32>,
    pub high_freq_factor: Option<f32>,
    pub original_max_position_embeddings: Option<usize>,
    pub long_factor: Option<Vec<f32>>,
    pub short_factor: Option<Vec<f32>>,
    pub attention_factor: Option<f32>,
}

/// Rotary scaling as per-pair divisors of the inverse frequency (the form
/// GGUF files store in `rope_freqs.weight` / `rope_factors_*`) and the
/// factor on cos/sin.
fn rope_scaling(hf: &HfConfig, rot_dim: usize) -> std::result::Result<(Option<Vec<f32>>, f32), String> {
    let Some(s) = &hf.rope_scaling else { return Ok((None, 1.0)) };
    Ok(match s.rope_type.as_deref().or(s.kind.as_deref()) {
        Some("linear") => (s.factor.map(|f| vec![f; rot_dim / 2]), 1.0),
        Some("llama3") => (llama3_factors(s, rot_dim, hf.rope_theta), 1.0),
        Some("longrope" | "su") => {
            // HF switches to the long factors once a sequence passes the
            // trained context; sollol sizes every session by the declared
            // context, so it uses them where that is longer (as llama.cpp
            // does by its context size, whose converter writes the factor
            // below into the GGUF file).
            let trained = s.original_max_position_embeddings.or(hf.original_max_position_embeddings).unwrap_or(hf.max_position_embeddings);
            let scale = hf.max_position_embeddings as f64 / trained as f64;
            let long = hf.max_position_embeddings > trained;
            let attn = s.attention_factor.map(f64::from).unwrap_or_else(|| {
                if scale > 1.0 {
                    (1.0 + scale.ln() / (trained as f64).ln()).sqrt()
                } else {
                    1.0
                }
            });
            let factors = if long { s.long_factor.clone() } else { s.short_factor.clone() };
            (Some(factors.ok_or_else(|| "rope_scaling longrope needs long_factor and short_factor".to_string())?), attn as f32)
        }
        other => {
            // Within the trained context these change nothing; past it the
            // output drifts, so say so rather than refuse the model.
            tracing::warn!("rope_scaling {other:?} is not applied: contexts past the trained one will degrade");
            (None, 1.0)
        }
    })
}

/// Llama 3.1's scaling: frequencies below the trained context's divided by
/// `factor`, high ones kept, a smooth blend between.
fn llama3_factors(s: &RopeScaling, head_dim: usize, theta: f32) -> Option<Vec<f32>> {
    let factor = s.factor?;
    let low = s.low_freq_factor.unwrap_or(1.0);
    let high = s.high_freq_factor.unwrap_or(4.0);
    let old_ctx = s.original_max_position_embeddings.unwrap_or(8192) as f32;
    let low_wavelen = old_ctx / low;
    let high_wavelen = old_ctx / high;
    let factors = (0..head_dim)
        .step_by(2)
        .map(|i| {
            let freq = 1.0 / theta.powf(i as f32 / head_dim as f32);
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (old_ctx / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect();
    Some(factors)
}

pub struct SafetensorsDir {
    path: PathBuf,
    arch: &'static Architecture,
    hf: HfConfig,
    hf_raw: serde_json::Value,
    tensors: MmapedSafetensors,
}

/// The llama family's HF names of GGUF tensors (architectures name their
/// differences in `Architecture::hf_names`).
const HF_NAMES: &[(&str, &str)] = &[
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("attn_q.bias", "self_attn.q_proj.bias"),
    ("attn_k.bias", "self_attn.k_proj.bias"),
    ("attn_v.bias", "self_attn.v_proj.bias"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
];

/// The HF name of GGUF tensor `name` of block `layer` (or a model-level one).
/// An expert's tensor (`ffn_gate.3.weight`) is found under its pattern
/// (`ffn_gate.{e}.weight`) with the index put back.
fn tensor_name(arch: &Architecture, name: &str, layer: Option<usize>) -> String {
    let expert = name.split('.').find(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    let key = match expert {
        Some(e) => name.replacen(&format!(".{e}."), ".{e}.", 1),
        None => name.to_string(),
    };
    let hf = match arch.hf_names.iter().chain(HF_NAMES).find(|(g, _)| *g == key) {
        Some((_, h)) => expert.map_or_else(|| h.to_string(), |e| h.replacen("{e}", e, 1)),
        None => name.to_string(),
    };
    match layer {
        Some(i) => format!("model.layers.{i}.{hf}"),
        None => hf,
    }
}

impl SafetensorsDir {
    pub fn open(dir: &Path) -> Result<Self> {
        let bad = |reason: String| Error::bad_model(dir, reason);
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(format!("cannot read {}", cfg_path.display()), e))?;
        let hf: HfConfig = serde_json::from_str(&text).map_err(|e| bad(format!("config.json: {e}")))?;
        let hf_raw: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(format!("cannot read {}", index.display()), e))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("model.safetensors.index.json: {e}")))?;
            let map = v["weight_map"].as_object().ok_or_else(|| bad("model.safetensors.index.json has no weight_map".into()))?;
            let mut files: Vec<PathBuf> = map.values().filter_map(|f| f.as_str()).map(|f| dir.join(f)).collect();
            files.sort();
            files.dedup();
            files
        } else {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| Error::io(format!("cannot list {}", dir.display()), e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            files.sort();
            files
        };
        if files.is_empty() {
            return Err(bad("no *.safetensors files".into()));
        }
        if let Some(missing) = files.iter().find(|f| !f.exists()) {
            return Err(bad(format!("missing shard {}", missing.display())));
        }
        // SAFETY: the files are mapped read-only; like every mmap-based loader we
        // rely on nobody truncating them while the model is being loaded.
        let tensors = unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| bad(format!("safetensors: {}", first_line(&e))))?;
        let arch = arch::by_hf_model_type(&hf.model_type)?;
        Ok(Self { path: dir.to_path_buf(), arch, hf, hf_raw, tensors })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn config(&self) -> Result<Config> {
        let hf = &self.hf;
        let arch = self.arch;
        let head_dim = hf.head_dim.unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1));
        let rope_dim = hf.partial_rotary_factor.map_or(head_dim, |f| (head_dim as f64 * f) as usize);
        let (rope_freq_factors, rope_attn_factor) =
            rope_scaling(hf, rope_dim).map_err(|r| Error::bad_model(&self.path, format!("config.json: {r}")))?;
        let cfg = Config {
            arch,
            n_layers: hf.num_hidden_layers,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            n_heads: hf.num_attention_heads,
            n_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            head_dim,
            vocab_size: hf.vocab_size,
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta: hf.rope_theta,
            rope_dim,
            rope_style: RopeStyle::Half,
            rope_freq_factors,
            rope_attn_factor,
            context_length: hf.max_position_embeddings,
            pooling: Default::default(),
        };
        cfg.validate().map_err(|r| Error::bad_model(&self.path, format!("config.json: {r}")))?;
        Ok(cfg)
    }

    pub fn tied_embeddings(&self) -> bool {
        self.hf.tie_word_embeddings
    }

    pub fn has(&self, name: &str, layer: Option<usize>) -> bool {
        self.tensors.get(&tensor_name(self.arch, name, layer)).is_ok()
    }

    /// `config.json`'s `key` as a number (a flag as 0 or 1: `norm_topk_prob`).
    pub fn param(&self, key: &str) -> Option<f64> {
        match self.hf_raw.get(key)? {
            serde_json::Value::Bool(b) => Some(f64::from(u8::from(*b))),
            v => v.as_f64(),
        }
    }

    pub fn read(&self, name: &str, layer: Option<usize>, device: &Device) -> Result<RawWeight> {
        let name = tensor_name(self.arch, name, layer);
        let t = self.tensors.load(&name, device).map_err(|_| Error::bad_model(&self.path, format!("missing tensor '{name}'")))?;
        let t = match t.dtype() {
            DType::F32 | DType::F16 | DType::BF16 => t,
            other => {
                return Err(Error::bad_model(&self.path, format!("tensor '{name}' has dtype {other:?}; f32, f16 and bf16 are supported")))
            }
        };
        Ok(RawWeight::Dense(t))
    }

    pub fn header_digest(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(serde_json::to_vec(&self.hf_raw).unwrap_or_default());
        let mut names: Vec<(String, Vec<usize>, String)> =
            self.tensors.tensors().into_iter().map(|(n, v)| (n, v.shape().to_vec(), format!("{:?}", v.dtype()))).collect();
        names.sort();
        for (n, shape, dtype) in names {
            h.update(format!("{n}:{shape:?}:{dtype};").as_bytes());
        }
        Ok(format!("{:x}", h.finalize()))
    }

    /// Bytes per block (and of their experts), embedding and head, from the
    /// safetensors headers.
    pub fn layer_bytes(&self, n_layers: usize) -> super::gguf::LayerBytes {
        let mut blocks = vec![0u64; n_layers];
        let (mut embed, mut head, mut experts) = (0u64, 0u64, 0u64);
        for (name, view) in self.tensors.tensors() {
            let bytes = view.data().len() as u64;
            if let Some(rest) = name.strip_prefix("model.layers.") {
                if let Some(i) = rest.split('.').next().and_then(|i| i.parse::<usize>().ok()) {
                    if i < n_layers {
                        blocks[i] = blocks[i].saturating_add(bytes);
                        experts = if rest.contains(".experts.") { experts.saturating_add(bytes) } else { experts };
                    }
                }
            } else if name == "model.embed_tokens.weight" {
                embed += bytes;
            } else {
                // The final norm (with phi's bias) and the LM head (and its bias).
                head = head.saturating_add(bytes);
            }
        }
        let tied = self.hf.tie_word_embeddings || self.tensors.get("lm_head.weight").is_err();
        if tied {
            head += embed;
        }
        let count = |k: &str| self.param(k).filter(|v| *v >= 1.0 && *v <= u32::MAX as f64).map(|v| v as u32);
        let routed = match (count("num_experts_per_tok"), count("num_experts").or_else(|| count("num_local_experts"))) {
            (Some(k), Some(n)) if experts > 0 && n >= k => Some((k, n)),
            _ => None,
        };
        super::gguf::LayerBytes { blocks, embed, head, tied, expert_bytes: experts, routed }
    }
}
