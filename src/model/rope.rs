//! Rotary position embeddings: cos/sin tables for every position of the
//! context, kept where the backend reads them (plain vectors for our kernels,
//! tensors on the device for candle) and never both.

use candle_core::{DType, Device, Tensor};

use super::weights::Backend;
use crate::error::Result;

/// How rotary embeddings pair the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs (2i, 2i+1): GGUF llama files, whose q/k rows llama.cpp's converter permuted.
    Interleaved,
    /// Pairs (i, i + d/2): HF checkpoints (`rotate_half`) and GGUF qwen2.
    Half,
}

/// What makes one set of tables: a slice builds each distinct one once and
/// shares it between the blocks that use it (gemma3 has two bases).
#[derive(Debug, Clone, PartialEq)]
pub struct RopeSpec {
    pub head_dim: usize,
    /// The leading values of each head that rotate (all of them but for
    /// partial rotary embeddings: phi2 rotates 32 of 80).
    pub rot_dim: usize,
    pub theta: f32,
    /// Per-pair divisors of the frequency (Llama 3.1 scaling, linear
    /// scaling, Phi-3's long or short factors).
    pub freq_factors: Option<Vec<f32>>,
    /// Multiplies cos and sin (Phi-3's long-context "attention factor":
    /// scaling q and k each by it scales the scores by its square).
    pub attn_factor: f32,
    pub style: RopeStyle,
    pub context: usize,
}

#[derive(Debug)]
pub struct Rope {
    spec: RopeSpec,
    tables: Tables,
}

#[derive(Debug)]
enum Tables {
    /// `[context, head_dim / 2]` row-major.
    Host {
        cos: Vec<f32>,
        sin: Vec<f32>,
    },
    Device {
        cos: Tensor,
        sin: Tensor,
    },
}

impl Rope {
    pub fn new(spec: RopeSpec, backend: Backend, device: &Device) -> Result<Self> {
        let d = spec.rot_dim;
        // Same expression as llama.cpp and candle's quantized_llama, so tables
        // (and thus logits) agree bit for bit.
        let inv_freq: Vec<f32> = (0..d)
            .step_by(2)
            .enumerate()
            .map(|(j, i)| {
                let f = 1f32 / spec.theta.powf(i as f32 / d as f32);
                match &spec.freq_factors {
                    Some(factors) => f / factors[j],
                    None => f,
                }
            })
            .collect();
        let n = spec.context;
        let on = if backend == Backend::Candle { device } else { &Device::Cpu };
        let inv_freq = Tensor::new(inv_freq.as_slice(), on)?;
        let positions = Tensor::arange(0, n as u32, on)?.to_dtype(DType::F32)?.reshape((n, 1))?;
        let angles = positions.matmul(&inv_freq.reshape((1, d / 2))?)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        // Only where a model asks for it, so that other tables keep the bits
        // llama.cpp and quantized_llama compute.
        let (cos, sin) = match spec.attn_factor {
            1.0 => (cos, sin),
            f => ((cos * f as f64)?, (sin * f as f64)?),
        };
        let tables = match backend {
            // The device kernels' copy is made by their backend, from these.
            Backend::Host | Backend::Device => Tables::Host { cos: cos.flatten_all()?.to_vec1()?, sin: sin.flatten_all()?.to_vec1()? },
            Backend::Candle => Tables::Device { cos, sin },
        };
        Ok(Self { spec, tables })
    }

    pub fn spec(&self) -> &RopeSpec {
        &self.spec
    }

    /// The host tables `[context, rot_dim / 2]` (cos, sin), where this rope has them.
    pub fn host_tables(&self) -> Option<(&[f32], &[f32])> {
        match &self.tables {
            Tables::Host { cos, sin } => Some((cos, sin)),
            Tables::Device { .. } => None,
        }
    }

    /// Rotates rows `[seq, heads, head_dim]` in place for positions `pos..pos+seq` (host tables).
    pub fn apply_host(&self, x: &mut [f32], heads: usize, pos: usize) {
        let Tables::Host { cos, sin } = &self.tables else { unreachable!("host tables are built for host slices") };
        let interleaved = self.spec.style == RopeStyle::Interleaved;
        let r = crate::kernels::ops::Rotation { cos, sin, rot_dim: self.spec.rot_dim, interleaved };
        crate::kernels::rope(x, heads, self.spec.head_dim, pos, r)
    }

    /// Rotates `x` `[b, heads, seq, head_dim]` for positions `pos..pos+seq` (device tables).
    pub fn apply(&self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let Tables::Device { cos, sin } = &self.tables else { unreachable!("device tables are built for candle slices") };
        let seq = x.dim(2)?;
        let cos = cos.narrow(0, pos, seq)?;
        let sin = sin.narrow(0, pos, seq)?;
        let rotate = |x: &Tensor| -> Result<Tensor> {
            let x = x.contiguous()?;
            Ok(match self.spec.style {
                RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?,
                RopeStyle::Half => candle_nn::rotary_emb::rope(&x, &cos, &sin)?,
            })
        };
        let (rot, d) = (self.spec.rot_dim, self.spec.head_dim);
        if rot == d {
            return rotate(x);
        }
        // Partial: the rotated values, then the rest as they are (candle-transformers' phi, op for op).
        Ok(Tensor::cat(&[&rotate(&x.narrow(3, 0, rot)?)?, &x.narrow(3, rot, d - rot)?], 3)?)
    }
}
