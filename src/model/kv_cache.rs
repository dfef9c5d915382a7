//! Per-session key/value cache of one slice's blocks.
//!
//! Preallocated to the session's context so a decode step writes its row in
//! place (`slice_set`) instead of concatenating the whole history each token.
//! The state can be exported and imported, which is how a session moves
//! between nodes without recomputing its prompt.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Keys and values of one block: `[batch, n_kv_heads, capacity, head_dim]`,
/// rows `0..len` valid.
#[derive(Debug)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
}

#[derive(Debug)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    len: usize,
    capacity: usize,
}

/// A copy of a cache's valid rows, detached from any preallocated buffer.
/// Each entry is `(k, v)` with shape `[batch, n_kv_heads, len, head_dim]`.
#[derive(Debug, Clone)]
pub struct KvState {
    pub len: usize,
    pub layers: Vec<(Tensor, Tensor)>,
}

impl KvCache {
    pub fn new(
        n_layers: usize,
        batch: usize,
        n_kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        device: &Device,
    ) -> Result<Self> {
        let layers = (0..n_layers)
            .map(|_| {
                let shape = (batch, n_kv_heads, capacity, head_dim);
                Ok(LayerKv { k: Tensor::zeros(shape, DType::F32, device)?, v: Tensor::zeros(shape, DType::F32, device)? })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers, len: 0, capacity })
    }

    /// Positions already cached (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Fails before any block runs if `seq` more positions do not fit.
    pub fn reserve(&self, seq: usize) -> Result<()> {
        if self.len + seq > self.capacity {
            return Err(Error::ContextOverflow { prompt: self.len + seq, context: self.capacity });
        }
        Ok(())
    }

    /// Writes `k`, `v` (`[b, n_kv, seq, hd]`, contiguous) of block `layer` at
    /// the current position and returns all valid rows including them.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let seq = k.dim(2)?;
        let entry = &self.layers[layer];
        entry.k.slice_set(k, 2, self.len)?;
        entry.v.slice_set(v, 2, self.len)?;
        let total = self.len + seq;
        Ok((entry.k.narrow(2, 0, total)?, entry.v.narrow(2, 0, total)?))
    }

    /// Marks `seq` positions written by every block.
    pub fn advance(&mut self, seq: usize) {
        self.len += seq;
    }

    /// Forgets positions from `len` on (the rows stay allocated).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    pub fn reset(&mut self) {
        self.len = 0;
    }

    pub fn export(&self) -> Result<KvState> {
        let layers = self
            .layers
            .iter()
            .map(|l| Ok((l.k.narrow(2, 0, self.len)?.contiguous()?, l.v.narrow(2, 0, self.len)?.contiguous()?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(KvState { len: self.len, layers })
    }

    /// Replaces the cache content with `state`, which must match this cache's
    /// block count and head shape and fit its capacity.
    pub fn import(&mut self, state: &KvState) -> Result<()> {
        if state.layers.len() != self.layers.len() {
            return Err(Error::InvalidRequest(format!(
                "KV state has {} blocks, this cache holds {}",
                state.layers.len(),
                self.layers.len()
            )));
        }
        if state.len > self.capacity {
            return Err(Error::ContextOverflow { prompt: state.len, context: self.capacity });
        }
        for (entry, (k, v)) in self.layers.iter().zip(state.layers.iter()) {
            let (b, h, _, d) = entry.k.dims4()?;
            let expected = [b, h, state.len, d];
            if k.dims() != expected || v.dims() != expected {
                return Err(Error::InvalidRequest(format!(
                    "KV state shape {:?} does not match this cache {:?}",
                    k.dims(),
                    expected
                )));
            }
            entry.k.slice_set(&k.to_dtype(DType::F32)?.contiguous()?, 2, 0)?;
            entry.v.slice_set(&v.to_dtype(DType::F32)?.contiguous()?, 2, 0)?;
        }
        self.len = state.len;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_writes_in_place_and_export_round_trips() -> Result<()> {
        let dev = Device::Cpu;
        let mut cache = KvCache::new(2, 1, 2, 4, 8, &dev)?;
        let k = Tensor::arange(0f32, 16., &dev)?.reshape((1, 2, 2, 4))?;
        let v = (&k * 2.0)?;
        for layer in 0..2 {
            let (ka, va) = cache.append(layer, &k, &v)?;
            assert_eq!(ka.dims(), [1, 2, 2, 4]);
            assert_eq!(va.flatten_all()?.to_vec1::<f32>()?, v.flatten_all()?.to_vec1::<f32>()?);
        }
        cache.advance(2);
        let state = cache.export()?;
        assert_eq!(state.len, 2);
        let mut other = KvCache::new(2, 1, 2, 4, 8, &dev)?;
        other.import(&state)?;
        assert_eq!(other.len(), 2);
        let again = other.export()?;
        assert_eq!(again.layers[1].0.flatten_all()?.to_vec1::<f32>()?, k.flatten_all()?.to_vec1::<f32>()?);
        assert!(cache.reserve(6).is_ok());
        assert!(matches!(cache.reserve(7), Err(Error::ContextOverflow { .. })));
        Ok(())
    }

    #[test]
    fn import_rejects_mismatched_state() -> Result<()> {
        let dev = Device::Cpu;
        let mut a = KvCache::new(2, 1, 2, 4, 8, &dev)?;
        let b = KvCache::new(3, 1, 2, 4, 8, &dev)?;
        assert!(a.import(&b.export()?).is_err());
        Ok(())
    }
}
