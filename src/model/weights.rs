//! Weight types shared by every format: a linear layer that is either
//! quantized (kept in its GGUF type) or dense (f32/f16/bf16 from safetensors),
//! the token embedding, and RMSNorm.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use crate::error::{Error, Result};
use crate::kernels::device::{DeviceMatrix, DeviceType, KernelDevice};
use crate::kernels::{self, QActs, QMatrix};

/// Which code runs a slice: our kernels on the CPU (`Host`), candle's
/// tensor ops (`Candle`: any device, and the bit-exact twin of candle's
/// reference llama used by the golden tests), or our device kernels
/// (`Device`: `kernels/cuda`, weights in device memory as GGUF stores them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Host,
    Candle,
    Device,
}

impl Backend {
    /// Our kernels on the CPU; on a GPU candle, or our device kernels where
    /// they are asked for (`SOLLOL_DEVICE_KERNELS=1`: off by default until
    /// a GPU has run them, see ARCHITECTURE.md).
    pub fn for_device(device: &Device) -> Self {
        if device.is_cpu() {
            Backend::Host
        } else if device.is_cuda() && kernels::device::enabled() {
            Backend::Device
        } else {
            Backend::Candle
        }
    }

    /// Whether a step runs many sessions' rows at once (`forward_batch`).
    pub fn batches(self) -> bool {
        self != Backend::Candle
    }
}

/// A 2-D weight as a [`QMatrix`] for our kernels: quantized blocks as stored,
/// dense f32/f16 rows as they are (bf16 widened to f32). The weight comes
/// back unchanged where the kernels do not know its type.
pub fn host_matrix(w: RawWeight) -> Result<std::result::Result<QMatrix, RawWeight>> {
    match w {
        RawWeight::Host(m) => Ok(Ok(m)),
        RawWeight::Quantized(q) => Ok(QMatrix::from_qtensor(&q)?.ok_or(RawWeight::Quantized(q))),
        RawWeight::Dense(t) => {
            let (rows, cols) = t.dims2()?;
            let (dtype, dense) = match t.dtype() {
                DType::F16 => (GgmlDType::F16, t.clone()),
                _ => (GgmlDType::F32, t.to_dtype(DType::F32)?),
            };
            let bytes: Vec<u8> = match dtype {
                GgmlDType::F16 => dense.flatten_all()?.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
                _ => dense.flatten_all()?.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
            };
            Ok(QMatrix::from_bytes(dtype, rows, cols, &bytes, true).ok_or(RawWeight::Dense(t)))
        }
    }
}

/// The dtype of a GGUF float type.
fn float_dtype(t: GgmlDType) -> Option<DType> {
    match t {
        GgmlDType::F32 => Some(DType::F32),
        GgmlDType::F16 => Some(DType::F16),
        GgmlDType::BF16 => Some(DType::BF16),
        _ => None,
    }
}

/// A float-typed GGUF tensor (of `dtype`) as a plain tensor on its device, bytes as stored.
fn dense_on_device(q: &QTensor, dtype: DType) -> Result<Tensor> {
    let bytes = q.data()?;
    let len = q.shape().elem_count() * dtype.size_in_bytes();
    Ok(Tensor::from_raw_buffer(&bytes[..len], dtype, q.shape().dims(), &q.device())?)
}

/// A tensor as a format hands it over: quantized GGUF blocks or a dense tensor.
#[derive(Debug, Clone)]
pub enum RawWeight {
    Quantized(Arc<QTensor>),
    Dense(Tensor),
    /// A GGUF matrix read for the CPU path straight into our kernels'
    /// buffer ([`ModelFile::read_matrix`](super::ModelFile::read_matrix)):
    /// in memory once, interleaved in place.
    Host(QMatrix),
}

impl RawWeight {
    /// Bytes this weight occupies in memory.
    pub fn size_in_bytes(&self) -> usize {
        match self {
            RawWeight::Quantized(q) => q.storage_size_in_bytes(),
            RawWeight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            RawWeight::Host(m) => m.size_in_bytes(),
        }
    }

    pub fn dims(&self) -> Vec<usize> {
        match self {
            RawWeight::Quantized(q) => q.shape().dims().to_vec(),
            RawWeight::Dense(t) => t.dims().to_vec(),
            RawWeight::Host(m) => vec![m.rows(), m.cols()],
        }
    }

    /// Rows `start..start + len` of a weight seen as 2-D (its last
    /// dimension the columns: a 3-D stack of experts' matrices is their rows
    /// one after the other), in the same form: one part of a fused tensor,
    /// one expert of a stack.
    pub fn rows(&self, start: usize, len: usize) -> Result<RawWeight> {
        let dims = self.dims();
        let bad = || Error::InvalidRequest(format!("rows {start}..{} of a weight of shape {dims:?}", start + len));
        let (Some(&cols), true) = (dims.last(), dims.len() >= 2) else { return Err(bad()) };
        let rows = dims.iter().product::<usize>() / cols.max(1);
        if start + len > rows {
            return Err(bad());
        }
        Ok(match self {
            RawWeight::Quantized(q) => {
                let t = q.dtype();
                let row_bytes = cols / t.block_size() * t.type_size();
                let bytes = &q.data()?[start * row_bytes..(start + len) * row_bytes];
                RawWeight::Quantized(Arc::new(candle_core::quantized::ggml_file::qtensor_from_ggml(
                    t,
                    bytes,
                    vec![len, cols],
                    &q.device(),
                )?))
            }
            RawWeight::Dense(d) => RawWeight::Dense(d.reshape((rows, cols))?.narrow(0, start, len)?.contiguous()?),
            RawWeight::Host(m) => RawWeight::Host(m.rows_range(start, len).ok_or_else(bad)?),
        })
    }

    /// A quantized weight as dense f32 when `exact`; anything else as it is.
    pub fn dequantized_if(self, exact: bool) -> Result<RawWeight> {
        Ok(match self {
            RawWeight::Quantized(q) if exact => RawWeight::Dense(q.dequantize(&q.device())?),
            w => w,
        })
    }

    /// A small 1-D weight (norm scale, bias) as f32.
    pub fn to_f32(&self) -> Result<Tensor> {
        Ok(match self {
            RawWeight::Quantized(q) => q.dequantize(&q.device())?,
            RawWeight::Dense(t) => t.to_dtype(DType::F32)?,
            RawWeight::Host(m) => {
                let mut rows = vec![0f32; m.rows() * m.cols()];
                for (r, row) in rows.chunks_exact_mut(m.cols()).enumerate() {
                    m.dequantize_row(r, row);
                }
                Tensor::from_vec(rows, (m.rows(), m.cols()), &Device::Cpu)?
            }
        })
    }
}

/// `y = x Wᵀ (+ b)`, x is f32 `[.., in]`, y is f32 `[.., out]`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    /// The bias as a plain vector, for the host path.
    bias_host: Option<Vec<f32>>,
}

#[derive(Debug, Clone)]
enum LinearWeight {
    /// GGUF weights stay in their quantized type; candle quantizes the
    /// activations once per row and runs the integer dot products.
    Quantized(QMatMul),
    /// Dense weights keep their stored dtype; activations are cast to it.
    Dense(Tensor),
    /// Our kernels (shared: a tied LM head is the embedding's matrix).
    Host(Arc<QMatrix>),
    /// Our device kernels (shared likewise).
    Device(Arc<DeviceMatrix>),
}

impl Linear {
    pub fn new(weight: RawWeight, bias: Option<Tensor>, backend: Backend) -> Result<Self> {
        let weight = match (backend, weight) {
            (Backend::Host, w) => match host_matrix(w)? {
                Ok(m) => LinearWeight::Host(Arc::new(m.interleaved())),
                Err(w) => return Self::new(w, bias, Backend::Candle),
            },
            (Backend::Candle, RawWeight::Host(m)) => {
                return Err(Error::InvalidRequest(format!("a {:?} matrix read for the CPU kernels given to candle", m.dtype())))
            }
            // candle would widen f16 weights to f32 (twice the bytes read per
            // token) and cannot do it on a GPU: there the stored dtype is kept
            // and the product runs in it.
            (Backend::Candle, RawWeight::Quantized(q)) => match float_dtype(q.dtype()).filter(|_| !q.device().is_cpu()) {
                Some(dtype) => LinearWeight::Dense(dense_on_device(&q, dtype)?),
                None => LinearWeight::Quantized(QMatMul::from_arc(q)?),
            },
            (Backend::Candle, RawWeight::Dense(t)) => LinearWeight::Dense(t),
            (Backend::Device, _) => return Err(Error::InvalidRequest("layers of the device kernels are made by Linear::on_device".into())),
        };
        let bias_host = bias.as_ref().map(|b| b.to_vec1::<f32>()).transpose()?;
        Ok(Self { weight, bias, bias_host })
    }

    /// A layer for the device kernels, its weight uploaded to `kd`; None
    /// where they cannot run it (a bias, or a type they lack).
    pub fn on_device(weight: &RawWeight, bias: Option<&Tensor>, kd: &dyn KernelDevice) -> Result<Option<Self>> {
        if bias.is_some() {
            return Ok(None);
        }
        Ok(device_matrix(weight, kd)?.map(|m| Self::from_device(Arc::new(m))))
    }

    pub fn from_device(m: Arc<DeviceMatrix>) -> Self {
        Self { weight: LinearWeight::Device(m), bias: None, bias_host: None }
    }

    /// The weight in device memory, when this layer runs on the device kernels.
    pub fn device(&self) -> Option<&DeviceMatrix> {
        match &self.weight {
            LinearWeight::Device(m) => Some(m),
            _ => None,
        }
    }

    pub fn from_matrix(m: Arc<QMatrix>) -> Self {
        Self { weight: LinearWeight::Host(m), bias: None, bias_host: None }
    }

    /// The same layer with `bias` added to its output (where there is one).
    pub fn with_bias(self, bias: Option<Tensor>) -> Result<Self> {
        match bias {
            Some(b) => Ok(Self { bias_host: Some(b.to_vec1::<f32>()?), bias: Some(b), ..self }),
            None => Ok(self),
        }
    }

    /// The weight as our kernels' matrix, when this layer runs on them.
    pub fn host(&self) -> Option<&QMatrix> {
        match &self.weight {
            LinearWeight::Host(m) => Some(m),
            _ => None,
        }
    }

    pub fn bias_host(&self) -> Option<&[f32]> {
        self.bias_host.as_deref()
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            LinearWeight::Host(m) => {
                let dims = x.dims().to_vec();
                let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let mut acts = QActs::new();
                acts.quantize_for(m, &xs);
                let mut y = vec![0f32; acts.rows() * m.rows()];
                kernels::matmul(&[m], &acts, &mut [&mut y]);
                let mut shape = dims;
                *shape.last_mut().expect("a linear input has a feature dimension") = m.rows();
                Tensor::from_vec(y, shape, x.device())?
            }
            LinearWeight::Quantized(q) => q.forward(x)?,
            LinearWeight::Device(_) => return Err(Error::InvalidRequest("a layer of the device kernels run on candle's path".into())),
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

/// Projections of one input (Q, K, V; gate and up). On candle's path their
/// weights are stacked into one matrix when they share a type, so a step
/// runs one product (one quantization of the input, one kernel launch on a
/// GPU) instead of several; each output row is the same dot product either
/// way. Our kernels take them separately (they run up to four matrices over
/// one quantized input already).
#[derive(Debug, Clone)]
pub enum Projections {
    Stacked { linear: Linear, sizes: Vec<usize> },
    Separate(Vec<Linear>),
}

impl Projections {
    pub fn new(parts: Vec<Part>, backend: Backend) -> Result<Self> {
        if backend == Backend::Candle && parts.len() > 1 {
            if let Some(((weight, bias), sizes)) = stack(&parts)? {
                return Ok(Projections::Stacked { linear: Linear::new(weight, bias, backend)?, sizes });
            }
        }
        Ok(Projections::Separate(parts.into_iter().map(|(w, b)| Linear::new(w, b, backend)).collect::<Result<_>>()?))
    }

    /// One output per projection, `[.., out_i]` each.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Projections::Separate(parts) => parts.iter().map(|l| l.forward(x)).collect(),
            Projections::Stacked { linear, sizes } => {
                let y = linear.forward(x)?;
                let last = y.rank() - 1;
                let mut at = 0;
                sizes
                    .iter()
                    .map(|&n| {
                        at += n;
                        Ok(y.narrow(last, at - n, n)?)
                    })
                    .collect()
            }
        }
    }

    /// The separate layers (none when stacked).
    pub fn separate(&self) -> &[Linear] {
        match self {
            Projections::Separate(parts) => parts,
            Projections::Stacked { .. } => &[],
        }
    }
}

/// One projection's weight and bias.
pub type Part = (RawWeight, Option<Tensor>);

/// The weights (and biases) one under the other, with each part's output
/// size, when they have one type and one input width; `None` when they
/// cannot be stacked.
fn stack(parts: &[Part]) -> Result<Option<(Part, Vec<usize>)>> {
    let bias = match parts.iter().map(|(_, b)| b.clone()).collect::<Option<Vec<Tensor>>>() {
        Some(b) => Some(Tensor::cat(&b, 0)?),
        None if parts.iter().all(|(_, b)| b.is_none()) => None,
        None => return Ok(None),
    };
    let (weight, sizes) = match &parts[0].0 {
        RawWeight::Quantized(first) => {
            let (dtype, cols) = (first.dtype(), first.shape().dims()[1]);
            let mut bytes = Vec::new();
            let mut sizes = Vec::new();
            for (w, _) in parts {
                let RawWeight::Quantized(q) = w else { return Ok(None) };
                let (rows, c) = q.shape().dims2()?;
                if q.dtype() != dtype || c != cols {
                    return Ok(None);
                }
                // Device storage may be padded: take the rows' bytes only.
                let len = rows * cols / dtype.block_size() * dtype.type_size();
                bytes.extend_from_slice(&q.data()?[..len]);
                sizes.push(rows);
            }
            let rows = sizes.iter().sum();
            let q = candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, &bytes, vec![rows, cols], &first.device())?;
            (RawWeight::Quantized(Arc::new(q)), sizes)
        }
        RawWeight::Host(_) => return Ok(None),
        RawWeight::Dense(first) => {
            let mut tensors = Vec::new();
            for (w, _) in parts {
                match w {
                    RawWeight::Dense(t) if t.dtype() == first.dtype() && t.dim(1)? == first.dim(1)? => tensors.push(t),
                    _ => return Ok(None),
                }
            }
            let sizes = tensors.iter().map(|t| t.dim(0)).collect::<candle_core::Result<Vec<_>>>()?;
            (RawWeight::Dense(Tensor::cat(&tensors, 0)?), sizes)
        }
    };
    Ok(Some(((weight, bias), sizes)))
}

/// Token embedding; quantized tables stay quantized and only the rows looked
/// up are dequantized.
#[derive(Debug, Clone)]
pub enum Embedding {
    Candle(RawWeight),
    Host(Arc<QMatrix>),
    Device(Arc<DeviceMatrix>),
}

/// A 2-D weight uploaded for the device kernels as it is stored (quantized
/// blocks, f16 or f32); None for the types they lack.
pub fn device_matrix(w: &RawWeight, kd: &dyn KernelDevice) -> Result<Option<DeviceMatrix>> {
    let (ty, bytes, rows, cols) = match w {
        RawWeight::Quantized(q) => {
            let Some(ty) = DeviceType::from_ggml(q.dtype()) else { return Ok(None) };
            let (rows, cols) = q.shape().dims2()?;
            (ty, q.data()?.into_owned(), rows, cols)
        }
        RawWeight::Dense(t) if t.dtype() == DType::F16 => {
            let (rows, cols) = t.dims2()?;
            let values = t.flatten_all()?.to_vec1::<half::f16>()?;
            (DeviceType::F16, values.iter().flat_map(|v| v.to_le_bytes()).collect(), rows, cols)
        }
        RawWeight::Dense(t) if t.dtype() == DType::F32 => {
            let (rows, cols) = t.dims2()?;
            let values = t.flatten_all()?.to_vec1::<f32>()?;
            (DeviceType::F32, values.iter().flat_map(|v| v.to_le_bytes()).collect(), rows, cols)
        }
        _ => return Ok(None),
    };
    // Storage may be padded past the last row.
    let len = rows * ty.row_bytes(cols);
    if bytes.len() < len {
        return Err(Error::InvalidRequest(format!("a [{rows}, {cols}] {ty:?} weight of {} bytes", bytes.len())));
    }
    DeviceMatrix::upload(kd, ty, rows, cols, &bytes[..len])
}

/// Rows `ids` of `m` into `out` (`[ids.len(), m.cols()]`).
fn lookup(m: &QMatrix, ids: &[u32], out: &mut [f32]) -> Result<()> {
    for (&id, row) in ids.iter().zip(out.chunks_exact_mut(m.cols())) {
        if id as usize >= m.rows() {
            return Err(Error::InvalidRequest(format!("token id {id} is outside the vocabulary of {}", m.rows())));
        }
        m.dequantize_row(id as usize, row);
    }
    Ok(())
}

impl Embedding {
    fn hidden_size(&self) -> usize {
        match self {
            Embedding::Candle(RawWeight::Quantized(q)) => q.shape().dims()[1],
            Embedding::Candle(RawWeight::Dense(t)) => t.dims()[1],
            Embedding::Candle(RawWeight::Host(m)) => m.cols(),
            Embedding::Host(m) => m.cols(),
            Embedding::Device(m) => m.cols,
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Embedding::Candle(RawWeight::Quantized(q)) => q.shape().dims()[0],
            Embedding::Candle(RawWeight::Dense(t)) => t.dims()[0],
            Embedding::Candle(RawWeight::Host(m)) => m.rows(),
            Embedding::Host(m) => m.rows(),
            Embedding::Device(m) => m.rows,
        }
    }

    /// Rows of `ids` into `out` (`[ids.len(), hidden]`).
    pub fn lookup_host(&self, ids: &[u32], out: &mut [f32]) -> Result<()> {
        match self {
            Embedding::Host(m) => lookup(m, ids, out),
            Embedding::Candle(RawWeight::Host(m)) => lookup(m, ids, out),
            Embedding::Candle(_) | Embedding::Device(_) => Err(Error::InvalidRequest("this embedding is not on the host".into())),
        }
    }

    /// ids `[b, seq]` u32 → `[b, seq, hidden]` f32.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, seq) = ids.dims2()?;
        let vocab = self.vocab_size() as u32;
        if let Some(bad) = ids.flatten_all()?.to_vec1::<u32>()?.into_iter().find(|&id| id >= vocab) {
            return Err(Error::InvalidRequest(format!("token id {bad} is outside the vocabulary of {vocab}")));
        }
        Ok(match self {
            Embedding::Device(_) => return Err(Error::InvalidRequest("an embedding of the device kernels run on candle's path".into())),
            Embedding::Host(_) | Embedding::Candle(RawWeight::Host(_)) => {
                let ids_v = ids.flatten_all()?.to_vec1::<u32>()?;
                let hidden = self.hidden_size();
                let mut out = vec![0f32; ids_v.len() * hidden];
                self.lookup_host(&ids_v, &mut out)?;
                Tensor::from_vec(out, (b, seq, hidden), ids.device())?
            }
            // f16/bf16 tables give rows in their own dtype.
            Embedding::Candle(RawWeight::Quantized(q)) => q.embedding(ids)?.to_dtype(DType::F32)?,
            Embedding::Candle(RawWeight::Dense(t)) => {
                let rows = t.index_select(&ids.flatten_all()?, 0)?;
                rows.to_dtype(DType::F32)?.reshape((b, seq, t.dim(1)?))?
            }
        })
    }
}

/// A normalization of each row: RMSNorm (`x / rms(x) · w`) or LayerNorm
/// (`(x - mean) / std · w + b`).
#[derive(Debug, Clone)]
pub struct Norm {
    weight: Tensor,
    /// LayerNorm's bias; `None` for RMSNorm.
    bias: Option<Tensor>,
    /// The same as plain vectors for the host path (shared by clones).
    weight_host: Arc<[f32]>,
    bias_host: Option<Arc<[f32]>>,
    eps: f32,
}

impl Norm {
    /// RMSNorm; `offset` is added to every weight (gemma's HF checkpoints store `w - 1`).
    pub fn rms(weight: &RawWeight, offset: f32, eps: f64) -> Result<Self> {
        let weight = weight.to_f32()?;
        let weight = if offset != 0.0 { (weight + offset as f64)? } else { weight };
        let weight_host = weight.to_vec1::<f32>()?.into();
        Ok(Self { weight, bias: None, weight_host, bias_host: None, eps: eps as f32 })
    }

    /// LayerNorm with a bias (phi2).
    pub fn layer(weight: &RawWeight, bias: &RawWeight, eps: f64) -> Result<Self> {
        let (weight, bias) = (weight.to_f32()?, bias.to_f32()?);
        let (weight_host, bias_host) = (weight.to_vec1::<f32>()?.into(), Some(bias.to_vec1::<f32>()?.into()));
        Ok(Self { weight, bias: Some(bias), weight_host, bias_host, eps: eps as f32 })
    }

    /// RMSNorm's weights and epsilon (None for a LayerNorm).
    pub fn rms_weights(&self) -> Option<(&Arc<[f32]>, f32)> {
        self.bias_host.is_none().then_some((&self.weight_host, self.eps))
    }

    /// Every row of `x` into `out`, on the host.
    pub fn forward_host(&self, x: &[f32], out: &mut [f32]) {
        match &self.bias_host {
            None => kernels::rms_norm(x, &self.weight_host, self.eps, out),
            Some(b) => kernels::layer_norm(x, &self.weight_host, b, self.eps, out),
        }
    }

    /// Every row of `x` in place, on the host (per-head RMSNorms).
    pub fn forward_host_in_place(&self, x: &mut [f32]) {
        kernels::ops::rms_norm_in_place(x, &self.weight_host, self.eps)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match &self.bias {
            None => candle_nn::ops::rms_norm(x, &self.weight, self.eps)?,
            // candle_nn's module, as candle-transformers' phi runs it.
            Some(b) => candle_nn::Module::forward(&candle_nn::LayerNorm::new(self.weight.clone(), b.clone(), self.eps as f64), x)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    fn quantized(rng: &mut impl Rng, t: GgmlDType, rows: usize, cols: usize) -> RawWeight {
        let x: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
        let x = Tensor::from_vec(x, (rows, cols), &Device::Cpu).unwrap();
        RawWeight::Quantized(Arc::new(QTensor::quantize(&x, t).unwrap()))
    }

    #[test]
    fn stacked_projections_give_each_part_bit_for_bit() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let x: Vec<f32> = (0..3 * 64).map(|_| rng.random_range(-2.0..2.0)).collect();
        let x = Tensor::from_vec(x, (1, 3, 64), &Device::Cpu).unwrap();
        let parts: Vec<Part> = [32, 16, 16]
            .iter()
            .map(|&rows| {
                let bias = Tensor::from_vec((0..rows).map(|i| i as f32 * 0.1).collect(), rows, &Device::Cpu).unwrap();
                (quantized(&mut rng, GgmlDType::Q4_0, rows, 64), Some(bias))
            })
            .collect();
        let alone: Vec<Vec<f32>> = parts
            .iter()
            .map(|(w, b)| {
                let y = Linear::new(w.clone(), b.clone(), Backend::Candle).unwrap().forward(&x).unwrap();
                y.flatten_all().unwrap().to_vec1().unwrap()
            })
            .collect();
        let stacked = Projections::new(parts, Backend::Candle).unwrap();
        assert!(matches!(stacked, Projections::Stacked { .. }));
        for (y, want) in stacked.forward(&x).unwrap().iter().zip(&alone) {
            assert_eq!(&y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
        }
    }

    #[test]
    fn projections_of_different_types_or_backends_stay_separate() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        // Q4_K_M files keep V in Q6_K while Q and K are Q4_K.
        let mixed = vec![(quantized(&mut rng, GgmlDType::Q4_0, 32, 64), None), (quantized(&mut rng, GgmlDType::Q8_0, 16, 64), None)];
        assert_eq!(Projections::new(mixed, Backend::Candle).unwrap().separate().len(), 2);
        // Our kernels take the matrices one by one.
        let same = vec![(quantized(&mut rng, GgmlDType::Q4_0, 32, 64), None), (quantized(&mut rng, GgmlDType::Q4_0, 16, 64), None)];
        assert_eq!(Projections::new(same, Backend::Host).unwrap().separate().len(), 2);
    }
}
