//! Activations on the wire: raw little-endian numbers with a dtype tag and a
//! shape, never through a generic serializer.

use candle_core::{DType, Device, Storage, Tensor};
use serde::{Deserialize, Serialize};

use super::NetError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireDType {
    F32,
    F16,
    BF16,
}

impl WireDType {
    pub fn size(self) -> usize {
        match self {
            WireDType::F32 => 4,
            WireDType::F16 | WireDType::BF16 => 2,
        }
    }
}

impl std::str::FromStr for WireDType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(WireDType::F32),
            "f16" => Ok(WireDType::F16),
            "bf16" => Ok(WireDType::BF16),
            other => Err(format!("wire dtype must be f16, bf16 or f32, not '{other}'")),
        }
    }
}

impl std::fmt::Display for WireDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WireDType::F32 => "f32",
            WireDType::F16 => "f16",
            WireDType::BF16 => "bf16",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorHeader {
    pub dtype: WireDType,
    pub shape: Vec<u32>,
}

impl TensorHeader {
    /// The bytes its values take on the wire; `None` past any payload.
    pub fn payload_bytes(&self) -> Option<u64> {
        let elems = self.shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
        elems.and_then(|e| e.checked_mul(self.dtype.size() as u64))
    }
}

/// The largest finite f16.
const F16_MAX: f32 = 65504.0;

/// Encodes `t` as `wire` (see [`encode_f32`]); a contiguous f32 tensor in
/// host memory is read in place.
pub fn encode(t: &Tensor, wire: WireDType) -> Result<(TensorHeader, Vec<u8>, bool), NetError> {
    let t = t.to_dtype(DType::F32)?.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    if let Storage::Cpu(cpu) = &*storage {
        let values = &cpu.as_slice::<f32>()?[layout.start_offset()..][..t.elem_count()];
        return encode_f32(values, t.dims(), wire);
    }
    drop(storage);
    encode_f32(&t.flatten_all()?.to_vec1::<f32>()?, t.dims(), wire)
}

/// Encodes f32 values of `shape` as `wire`, in one pass from the numbers to
/// the payload's bytes. Values beyond f16's range would become inf, so an
/// f16 request for such values is sent as f32; the flag says it happened.
pub fn encode_f32(values: &[f32], shape: &[usize], wire: WireDType) -> Result<(TensorHeader, Vec<u8>, bool), NetError> {
    let shape = shape
        .iter()
        .map(|&d| u32::try_from(d).map_err(|_| NetError::Decode(format!("a dimension of {d} does not fit the wire"))))
        .collect::<Result<Vec<u32>, _>>()?;
    let overflow = wire == WireDType::F16 && values.iter().any(|v| v.abs() > F16_MAX);
    let dtype = if overflow { WireDType::F32 } else { wire };
    let mut bytes = Vec::with_capacity(values.len() * dtype.size());
    match dtype {
        WireDType::F32 => values.iter().for_each(|v| bytes.extend_from_slice(&v.to_le_bytes())),
        WireDType::F16 => values.iter().for_each(|v| bytes.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
        WireDType::BF16 => values.iter().for_each(|v| bytes.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
    }
    Ok((TensorHeader { dtype, shape }, bytes, overflow))
}

/// Decodes a payload into f32 values, checking its size first: one pass
/// from the wire's bytes to the numbers a stage computes with.
pub fn decode_f32(h: &TensorHeader, bytes: &[u8]) -> Result<Vec<f32>, NetError> {
    match h.payload_bytes() {
        Some(n) if n == bytes.len() as u64 => {}
        Some(n) => {
            return Err(NetError::Decode(format!(
                "a tensor of shape {:?} {} needs {n} bytes, the payload has {}",
                h.shape,
                h.dtype,
                bytes.len()
            )))
        }
        None => return Err(NetError::Decode(format!("a tensor of shape {:?} is larger than any payload", h.shape))),
    }
    Ok(match h.dtype {
        WireDType::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        WireDType::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        WireDType::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
    })
}

/// Decodes a payload into an f32 tensor on `device`, checking its size first.
pub fn decode(h: &TensorHeader, bytes: &[u8], device: &Device) -> Result<Tensor, NetError> {
    let values = decode_f32(h, bytes)?;
    let shape: Vec<usize> = h.shape.iter().map(|&d| d as usize).collect();
    Ok(Tensor::from_vec(values, shape, device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_round_trips_exactly_and_f16_within_rounding() {
        let t = Tensor::new(&[[1.5f32, -2.25, 1e-3, 300.0]], &Device::Cpu).unwrap();
        for wire in [WireDType::F32, WireDType::F16, WireDType::BF16] {
            let (h, bytes, overflow) = encode(&t, wire).unwrap();
            assert!(!overflow);
            assert_eq!(bytes.len(), 4 * wire.size());
            let back = decode(&h, &bytes, &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            if wire == WireDType::F32 {
                assert_eq!(back, vec![1.5, -2.25, 1e-3, 300.0]);
            } else {
                assert!((back[2] - 1e-3).abs() < 1e-5 && back[3] == 300.0);
            }
        }
    }

    #[test]
    fn f16_overflow_falls_back_to_f32() {
        let t = Tensor::new(&[25_000f32, -70_000.0], &Device::Cpu).unwrap();
        let (h, _, overflow) = encode(&t, WireDType::F16).unwrap();
        assert!(overflow);
        assert_eq!(h.dtype, WireDType::F32);
    }

    #[test]
    fn size_mismatch_is_refused() {
        let h = TensorHeader { dtype: WireDType::F32, shape: vec![1, 2, u32::MAX] };
        assert!(decode(&h, &[0u8; 8], &Device::Cpu).is_err());
    }
}
