//! A session's KV state on the wire: a [`KvStateHeader`] and, for each block
//! in order, K then V, each `[1, n_kv_heads, len, head_dim]` as raw
//! little-endian numbers of the header's dtype.
//!
//! Every count in a header comes from a peer: [`KvStateHeader::layout`]
//! checks each against a bound and the payload's length with checked
//! arithmetic before anything is sized by it.

use candle_core::{Device, Tensor};

use super::message::KvStateHeader;
use super::tensor::{self, TensorHeader, WireDType};
use super::NetError;
use crate::model::KvState;

/// More blocks than any model has (the largest have ~128).
pub const MAX_LAYERS: u32 = 4096;
/// More positions than any context a node serves.
pub const MAX_POSITIONS: u32 = 1 << 22;
/// Wider than any K/V head layout (heads × head_dim).
pub const MAX_KV_WIDTH: u32 = 1 << 16;

/// The checked shape of a KV payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    /// Bytes of one block's K (or V).
    pub tensor_bytes: usize,
    pub n_layers: usize,
}

impl KvLayout {
    /// Bytes of one block's K and V together.
    pub fn block_bytes(&self) -> usize {
        2 * self.tensor_bytes
    }

    /// The payload cut into its blocks (empty ones for a state of no
    /// positions: still one per block).
    fn blocks<'a>(&self, payload: &'a [u8]) -> impl Iterator<Item = &'a [u8]> {
        let size = self.block_bytes();
        (0..self.n_layers).map(move |i| &payload[i * size..(i + 1) * size])
    }
}

fn malformed(message: String) -> NetError {
    NetError::Decode(format!("KV state: {message}"))
}

impl KvStateHeader {
    /// Checks every count against its bound and the payload's length against
    /// what the counts imply.
    pub fn layout(&self, payload_len: usize) -> Result<KvLayout, NetError> {
        let bound = |what: &str, v: u32, lo: u32, hi: u32| {
            if v < lo || v > hi {
                Err(malformed(format!("{what} = {v} is outside {lo}..={hi}")))
            } else {
                Ok(v as usize)
            }
        };
        let n_layers = bound("n_layers", self.n_layers, 1, MAX_LAYERS)?;
        let heads = bound("n_kv_heads", self.n_kv_heads, 1, MAX_KV_WIDTH)?;
        let dim = bound("head_dim", self.head_dim, 1, MAX_KV_WIDTH)?;
        bound("capacity", self.capacity, 1, MAX_POSITIONS)?;
        let len = bound("len", self.len, 0, self.capacity)?;
        let tensor_bytes = heads
            .checked_mul(dim)
            .and_then(|w| w.checked_mul(len))
            .and_then(|e| e.checked_mul(self.dtype.size()))
            .ok_or_else(|| malformed("the header's sizes overflow".into()))?;
        let total = tensor_bytes.checked_mul(2 * n_layers).ok_or_else(|| malformed("the header's sizes overflow".into()))?;
        if total != payload_len {
            return Err(malformed(format!("the payload has {payload_len} bytes, the header implies {total}")));
        }
        Ok(KvLayout { tensor_bytes, n_layers })
    }

    fn tensor_header(&self) -> TensorHeader {
        TensorHeader { dtype: self.dtype, shape: vec![1, self.n_kv_heads, self.len, self.head_dim] }
    }
}

/// A cache's state as a header and payload.
pub fn encode(session: u64, capacity: usize, state: &KvState, dtype: WireDType) -> Result<(KvStateHeader, Vec<u8>), NetError> {
    let (n_kv_heads, head_dim) = match state.layers.first() {
        Some((k, _)) => (k.dim(1)?, k.dim(3)?),
        None => return Err(malformed("a cache of no blocks".into())),
    };
    let count = |v: usize, what: &str| u32::try_from(v).map_err(|_| malformed(format!("{what} {v} does not fit the header")));
    let header = KvStateHeader {
        session,
        len: count(state.len, "length")?,
        capacity: count(capacity, "capacity")?,
        n_layers: count(state.layers.len(), "block count")?,
        n_kv_heads: count(n_kv_heads, "head count")?,
        head_dim: count(head_dim, "head width")?,
        dtype,
    };
    let mut payload = Vec::new();
    for (k, v) in &state.layers {
        for t in [k, v] {
            let (_, bytes, _) = tensor::encode(t, dtype)?;
            payload.extend_from_slice(&bytes);
        }
    }
    header.layout(payload.len())?;
    Ok((header, payload))
}

/// The state a header and payload describe, its tensors on `device`.
pub fn decode(header: &KvStateHeader, payload: &[u8], device: &Device) -> Result<KvState, NetError> {
    let layout = header.layout(payload.len())?;
    let th = header.tensor_header();
    let mut layers = Vec::with_capacity(layout.n_layers);
    for block in layout.blocks(payload) {
        let (k, v) = block.split_at(layout.tensor_bytes);
        let k: Tensor = tensor::decode(&th, k, device)?;
        layers.push((k, tensor::decode(&th, v, device)?));
    }
    Ok(KvState { len: header.len as usize, layers })
}

/// Each block's bytes (K then V), in order.
pub fn blocks<'a>(header: &KvStateHeader, payload: &'a [u8]) -> Result<Vec<&'a [u8]>, NetError> {
    Ok(header.layout(payload.len())?.blocks(payload).collect())
}

/// A state of the given blocks (each as [`blocks`] cut them) under a header
/// like `like` (same session, length and head shape).
pub fn join(like: &KvStateHeader, parts: &[&[u8]]) -> Result<(KvStateHeader, Vec<u8>), NetError> {
    let header = KvStateHeader { n_layers: u32::try_from(parts.len()).map_err(|_| malformed("too many blocks".into()))?, ..like.clone() };
    let payload = parts.concat();
    header.layout(payload.len())?;
    Ok((header, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(n_layers: u32, n_kv_heads: u32, len: u32, head_dim: u32) -> KvStateHeader {
        KvStateHeader { session: 1, len, capacity: 16, n_layers, n_kv_heads, head_dim, dtype: WireDType::F32 }
    }

    #[test]
    fn state_round_trips_and_splits_by_block() {
        let t = |base: f32| Tensor::arange(base, base + 24.0, &Device::Cpu).unwrap().reshape((1, 2, 3, 4)).unwrap();
        let state = KvState { len: 3, layers: vec![(t(0.0), t(100.0)), (t(200.0), t(300.0))] };
        let (h, payload) = encode(9, 16, &state, WireDType::F32).unwrap();
        assert_eq!((h.n_layers, h.n_kv_heads, h.len, h.head_dim, h.capacity), (2, 2, 3, 4, 16));
        let back = decode(&h, &payload, &Device::Cpu).unwrap();
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(values(&back.layers[1].1), values(&state.layers[1].1));
        let parts = blocks(&h, &payload).unwrap();
        let (one, bytes) = join(&h, &parts[1..]).unwrap();
        assert_eq!(one.n_layers, 1);
        assert_eq!(values(&decode(&one, &bytes, &Device::Cpu).unwrap().layers[0].0), values(&state.layers[1].0));
    }

    #[test]
    fn hostile_headers_are_refused_before_they_size_anything() {
        // Zero counts (once a division by zero), a count past any model, and
        // sizes whose product wraps: each is an error, none allocates.
        for h in [
            header(0, 2, 3, 4),
            header(2, 0, 3, 4),
            header(2, 2, 3, 0),
            header(u32::MAX, 2, 3, 4),
            header(2, 2, 17, 4),
            KvStateHeader { capacity: u32::MAX, len: u32::MAX, ..header(4000, 60000, 0, 60000) },
        ] {
            assert!(h.layout(0).is_err(), "{h:?}");
            assert!(decode(&h, &[0; 64], &Device::Cpu).is_err());
        }
        assert!(header(2, 2, 3, 4).layout(2 * 2 * 24 * 4 - 1).is_err());
        let empty = header(2, 2, 0, 4);
        assert_eq!(decode(&empty, &[], &Device::Cpu).unwrap().layers.len(), 2, "an empty session is a state too");
        assert_eq!(blocks(&empty, &[]).unwrap().len(), 2);
    }
}
