//! Rotary position embeddings: cos/sin tables for every position of the context.

use candle_core::{DType, Device, Tensor};

use super::config::{Config, RopeStyle};
use crate::error::Result;

#[derive(Debug, Clone)]
pub struct Rope {
    /// `[context, head_dim / 2]`
    cos: Tensor,
    sin: Tensor,
    /// The same tables as plain vectors for the host path.
    cos_host: Vec<f32>,
    sin_host: Vec<f32>,
    style: RopeStyle,
}

impl Rope {
    pub fn new(cfg: &Config, device: &Device) -> Result<Self> {
        let d = cfg.head_dim;
        // Same expression as llama.cpp and candle's quantized_llama, so tables
        // (and thus logits) agree bit for bit.
        let inv_freq: Vec<f32> = (0..d)
            .step_by(2)
            .enumerate()
            .map(|(j, i)| {
                let f = 1f32 / cfg.rope_theta.powf(i as f32 / d as f32);
                match &cfg.rope_freq_factors {
                    Some(factors) => f / factors[j],
                    None => f,
                }
            })
            .collect();
        let n = cfg.context_length;
        let inv_freq = Tensor::new(inv_freq.as_slice(), device)?;
        let positions = Tensor::arange(0, n as u32, device)?.to_dtype(DType::F32)?.reshape((n, 1))?;
        let angles = positions.matmul(&inv_freq.reshape((1, d / 2))?)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        let (cos_host, sin_host) = (cos.flatten_all()?.to_vec1()?, sin.flatten_all()?.to_vec1()?);
        Ok(Self { cos, sin, cos_host, sin_host, style: cfg.rope_style })
    }

    /// Rotates rows `[seq, heads, head_dim]` in place for positions `pos..pos+seq`.
    pub fn apply_host(&self, x: &mut [f32], heads: usize, head_dim: usize, pos: usize) {
        let interleaved = self.style == RopeStyle::Interleaved;
        crate::kernels::rope(x, heads, head_dim, pos, &self.cos_host, &self.sin_host, interleaved)
    }

    /// Rotates `x` `[b, heads, seq, head_dim]` for positions `pos..pos+seq`.
    pub fn apply(&self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let seq = x.dim(2)?;
        let cos = self.cos.narrow(0, pos, seq)?;
        let sin = self.sin.narrow(0, pos, seq)?;
        let x = x.contiguous()?;
        Ok(match self.style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?,
            RopeStyle::Half => candle_nn::rotary_emb::rope(&x, &cos, &sin)?,
        })
    }
}
