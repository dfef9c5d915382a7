//! Weight types shared by every format: a linear layer that is either
//! quantized (kept in its GGUF type) or dense (f32/f16/bf16 from safetensors),
//! the token embedding, and RMSNorm.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Module, Tensor};

use crate::error::Result;

/// A tensor as a format hands it over: quantized GGUF blocks or a dense tensor.
#[derive(Debug, Clone)]
pub enum RawWeight {
    Quantized(Arc<QTensor>),
    Dense(Tensor),
}

impl RawWeight {
    /// Bytes this weight occupies in memory.
    pub fn size_in_bytes(&self) -> usize {
        match self {
            RawWeight::Quantized(q) => q.storage_size_in_bytes(),
            RawWeight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
        }
    }

    /// A small 1-D weight (norm scale, bias) as f32.
    pub fn to_f32(&self) -> Result<Tensor> {
        Ok(match self {
            RawWeight::Quantized(q) => q.dequantize(&q.device())?,
            RawWeight::Dense(t) => t.to_dtype(DType::F32)?,
        })
    }
}

/// The role a tensor plays; each format maps roles to its own tensor names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Embed,
    AttnNorm,
    Q,
    K,
    V,
    O,
    QBias,
    KBias,
    VBias,
    FfnNorm,
    Gate,
    Up,
    Down,
    OutputNorm,
    Output,
}

/// `y = x Wᵀ (+ b)`, x is f32 `[.., in]`, y is f32 `[.., out]`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
}

#[derive(Debug, Clone)]
enum LinearWeight {
    /// GGUF weights stay in their quantized type; candle quantizes the
    /// activations once per row and runs the integer dot products.
    Quantized(QMatMul),
    /// Dense weights keep their stored dtype; activations are cast to it.
    Dense(Tensor),
}

impl Linear {
    pub fn new(weight: RawWeight, bias: Option<Tensor>) -> Result<Self> {
        let weight = match weight {
            RawWeight::Quantized(q) => LinearWeight::Quantized(QMatMul::from_arc(q)?),
            RawWeight::Dense(t) => LinearWeight::Dense(t),
        };
        Ok(Self { weight, bias })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            LinearWeight::Quantized(q) => q.forward(x)?,
            LinearWeight::Dense(w) => {
                let y = x.to_dtype(w.dtype())?.broadcast_matmul(&w.t()?)?;
                y.to_dtype(DType::F32)?
            }
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Token embedding; quantized tables stay quantized and only the rows looked
/// up are dequantized.
#[derive(Debug, Clone)]
pub struct Embedding {
    table: RawWeight,
}

impl Embedding {
    pub fn new(table: RawWeight) -> Self {
        Self { table }
    }

    /// ids `[b, seq]` u32 → `[b, seq, hidden]` f32.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match &self.table {
            RawWeight::Quantized(q) => q.embedding(ids)?,
            RawWeight::Dense(t) => {
                let (b, seq) = ids.dims2()?;
                let rows = t.index_select(&ids.flatten_all()?, 0)?;
                rows.to_dtype(DType::F32)?.reshape((b, seq, t.dim(1)?))?
            }
        })
    }
}

#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn new(weight: &RawWeight, eps: f64) -> Result<Self> {
        Ok(Self { weight: weight.to_f32()?, eps: eps as f32 })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps)?)
    }
}
