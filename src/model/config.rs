//! The hyper-parameters every block needs, defaults filled in.
//!
//! Each format (GGUF metadata, HF `config.json`) is parsed into this one
//! plain struct and checked against bounds, so compute code never handles a
//! missing or absurd value (the one `Option`, the rotary frequency factors,
//! is absent by design for most models).

use super::arch::Architecture;
use super::rope::RopeStyle;

#[derive(Debug, Clone)]
pub struct Config {
    pub arch: &'static Architecture,
    pub n_layers: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    /// The leading values of each head that rotate (`head_dim` but for
    /// partial rotary embeddings).
    pub rope_dim: usize,
    pub rope_style: RopeStyle,
    /// Per-frequency divisors, one per rotated pair: Llama 3.1+ "llama3"
    /// scaling, linear scaling, or Phi-3's long-context factors (its long
    /// ones where the context is past the one it was trained for, as
    /// llama.cpp chooses by its context size).
    pub rope_freq_factors: Option<Vec<f32>>,
    /// Multiplies the rotary cos/sin (Phi-3's long-context attention factor; 1 elsewhere).
    pub rope_attn_factor: f32,
    /// The longest sequence the model was trained for.
    pub context_length: usize,
    /// How its embeddings pool the final hidden states (GGUF `pooling_type`).
    pub pooling: Pooling,
}

/// How an embedding pools the final hidden states of its input.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Pooling {
    /// The mean of every position (llama.cpp's `mean`; what a model that
    /// names no pooling gets, as Ollama does).
    #[default]
    Mean,
    /// The last position (llama.cpp's `last`).
    Last,
    /// The first position (llama.cpp's `cls`).
    First,
}

impl Pooling {
    /// llama.cpp's `pooling_type` values: 1 mean, 2 cls, 3 last (0, none,
    /// and others: mean).
    pub fn from_gguf(v: u64) -> Self {
        match v {
            2 => Self::First,
            3 => Self::Last,
            _ => Self::Mean,
        }
    }
}

/// The longest context sollol serves. A file may declare more (its RoPE
/// tables and KV caches are sized by it): such a file is refused, not
/// believed.
pub const MAX_CONTEXT: usize = 1 << 20;

impl Config {
    /// Query heads that share one key/value head (grouped-query attention).
    pub fn n_rep(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("n_layers", self.n_layers),
            ("hidden_size", self.hidden_size),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("intermediate_size", self.intermediate_size),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be positive"));
        }
        // Bounds far past any real model: each of these sizes an allocation
        // or a loop before a tensor is read.
        let bounded = [
            ("n_layers", self.n_layers, 4096),
            ("hidden_size", self.hidden_size, 1 << 18),
            ("n_heads", self.n_heads, 1 << 12),
            ("head_dim", self.head_dim, 1 << 12),
            ("vocab_size", self.vocab_size, 1 << 24),
            ("intermediate_size", self.intermediate_size, 1 << 20),
            ("context_length", self.context_length, MAX_CONTEXT),
        ];
        if let Some((name, v, max)) = bounded.iter().find(|(_, v, max)| v > max) {
            return Err(format!("{name} = {v} is past the largest this build serves ({max})"));
        }
        if self.context_length == 0 {
            return Err("context_length must be positive".into());
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(format!("{} attention heads cannot be grouped over {} key/value heads", self.n_heads, self.n_kv_heads));
        }
        if self.rope_dim == 0 || !self.rope_dim.is_multiple_of(2) || self.rope_dim > self.head_dim {
            return Err(format!("{} rotary dimensions of heads of {}: they must be pairs, within the head", self.rope_dim, self.head_dim));
        }
        if let Some(f) = &self.rope_freq_factors {
            if f.len() != self.rope_dim / 2 {
                return Err(format!("rope frequency factors have {} entries, expected {}", f.len(), self.rope_dim / 2));
            }
            // Each divides a frequency: zero, negative or NaN would fill the tables with garbage.
            if let Some(bad) = f.iter().find(|v| !(v.is_finite() && **v > 0.0)) {
                return Err(format!("rope frequency factor {bad} is not a positive number"));
            }
        }
        if !(self.rope_attn_factor.is_finite() && self.rope_attn_factor > 0.0) {
            return Err(format!("rope attention factor {} is not a positive number", self.rope_attn_factor));
        }
        Ok(())
    }
}
