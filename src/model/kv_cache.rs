//! Per-session key/value cache of one slice's blocks.
//!
//! Preallocated to the session's context so a decode step writes its row in
//! place (`slice_set`) instead of concatenating the whole history each token.
//! The state can be exported and imported, which is how a session moves
//! between nodes without recomputing its prompt.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::error::{Error, Result};
use crate::kernels::device::{DevBuf, KernelDevice};

/// Keys and values of one block: `[batch, n_kv_heads, capacity, head_dim]`,
/// rows `0..len` valid.
#[derive(Debug)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
}

/// The same for the host path, batch 1, as plain vectors our attention
/// reads in place: `[n_kv_heads, rows, head_dim]`, in f16 as llama.cpp
/// keeps it by default. Batched decode reads every session's cache each
/// step; halving those bytes is what lets a step of many sessions run near
/// the speed of reading the weights once. Rows are rounded to nearest once,
/// as written; the attention arithmetic stays f32.
///
/// `rows` (the stride between heads) grows with the session in chunks of
/// [`HOST_CHUNK`] positions up to its capacity, so a session holds memory
/// for what it uses, not for the context it may grow to.
#[derive(Debug)]
pub struct HostKv {
    pub k: Vec<f16>,
    pub v: Vec<f16>,
    pub rows: usize,
}

/// Positions a host cache grows by (at least; a long session grows by a
/// quarter of what it holds, so copies stay a small share of the work).
pub const HOST_CHUNK: usize = 64;

#[derive(Debug)]
enum Store {
    Device(Vec<LayerKv>),
    Host {
        layers: Vec<HostKv>,
        n_kv_heads: usize,
        head_dim: usize,
    },
    /// The device kernels' cache: per block, K and V in device memory as
    /// f16 `[capacity, n_kv_heads, head_dim]`, allocated whole. Position-major,
    /// so a row's address does not depend on the capacity and one step's
    /// rows of many sessions are written by one launch.
    Kernels {
        layers: Vec<(DevBuf, DevBuf)>,
        n_kv_heads: usize,
        head_dim: usize,
        kd: Arc<dyn KernelDevice>,
    },
}

#[derive(Debug)]
pub struct KvCache {
    store: Store,
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
    pub fn new(n_layers: usize, batch: usize, n_kv_heads: usize, head_dim: usize, capacity: usize, device: &Device) -> Result<Self> {
        let layers = (0..n_layers)
            .map(|_| {
                let shape = (batch, n_kv_heads, capacity, head_dim);
                Ok(LayerKv { k: Tensor::zeros(shape, DType::F32, device)?, v: Tensor::zeros(shape, DType::F32, device)? })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { store: Store::Device(layers), len: 0, capacity })
    }

    /// A cache for the host path (batch 1); it holds no rows until
    /// [`KvCache::reserve`] asks for them.
    pub fn new_host(n_layers: usize, n_kv_heads: usize, head_dim: usize, capacity: usize) -> Self {
        let layers = (0..n_layers).map(|_| HostKv { k: Vec::new(), v: Vec::new(), rows: 0 }).collect();
        Self { store: Store::Host { layers, n_kv_heads, head_dim }, len: 0, capacity }
    }

    /// A cache for the device kernels, room for `capacity` positions.
    pub fn new_kernels(n_layers: usize, n_kv_heads: usize, head_dim: usize, capacity: usize, kd: Arc<dyn KernelDevice>) -> Result<Self> {
        let bytes = capacity * n_kv_heads * head_dim * std::mem::size_of::<f16>();
        let layers = (0..n_layers).map(|_| Ok((kd.alloc(bytes)?, kd.alloc(bytes)?))).collect::<Result<Vec<_>>>()?;
        Ok(Self { store: Store::Kernels { layers, n_kv_heads, head_dim, kd }, len: 0, capacity })
    }

    /// Block `layer`'s K and V addresses, for the device kernels (None for other caches).
    pub fn kernel_layer(&self, layer: usize) -> Option<(u64, u64)> {
        match &self.store {
            Store::Kernels { layers, .. } => layers.get(layer).map(|(k, v)| (k.addr(), v.addr())),
            _ => None,
        }
    }

    pub fn is_kernels(&self) -> bool {
        matches!(self.store, Store::Kernels { .. })
    }

    pub fn is_host(&self) -> bool {
        matches!(self.store, Store::Host { .. })
    }

    /// Block `layer`'s host buffers, to write (None for a device cache).
    pub fn host_layer_mut(&mut self, layer: usize) -> Option<&mut HostKv> {
        match &mut self.store {
            Store::Host { layers, .. } => layers.get_mut(layer),
            Store::Device(_) | Store::Kernels { .. } => None,
        }
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
        match &self.store {
            Store::Device(l) => l.len(),
            Store::Host { layers, .. } => layers.len(),
            Store::Kernels { layers, .. } => layers.len(),
        }
    }

    /// Makes room for `seq` more positions before any block runs; fails if
    /// they do not fit the capacity.
    pub fn reserve(&mut self, seq: usize) -> Result<()> {
        let needed = self.len.checked_add(seq).filter(|&n| n <= self.capacity);
        let needed = needed.ok_or(Error::ContextOverflow { prompt: self.len.saturating_add(seq), context: self.capacity })?;
        let rows = self.rows_for(needed);
        if let Store::Host { layers, n_kv_heads, head_dim } = &mut self.store {
            for l in layers.iter_mut().filter(|l| l.rows < rows) {
                for buf in [&mut l.k, &mut l.v] {
                    let mut grown = vec![f16::ZERO; *n_kv_heads * rows * *head_dim];
                    for j in 0..*n_kv_heads {
                        let valid = self.len * *head_dim;
                        grown[j * rows * *head_dim..][..valid].copy_from_slice(&buf[j * l.rows * *head_dim..][..valid]);
                    }
                    *buf = grown;
                }
                l.rows = rows;
            }
        }
        Ok(())
    }

    /// Rows per head a host cache holds once it has room for `needed` positions.
    fn rows_for(&self, needed: usize) -> usize {
        let held = match &self.store {
            Store::Host { layers, .. } => layers.first().map_or(0, |l| l.rows),
            Store::Device(_) | Store::Kernels { .. } => return self.capacity,
        };
        if needed <= held {
            return held;
        }
        let grown = needed.max(held + held / 4).div_ceil(HOST_CHUNK) * HOST_CHUNK;
        grown.min(self.capacity)
    }

    /// Bytes this cache holds now.
    pub fn bytes(&self) -> u64 {
        self.bytes_with(None)
    }

    /// Bytes it would hold after reserving `seq` more positions (what
    /// admission checks before a step).
    pub fn bytes_after(&self, seq: usize) -> u64 {
        self.bytes_with(Some(self.len.saturating_add(seq).min(self.capacity)))
    }

    fn bytes_with(&self, needed: Option<usize>) -> u64 {
        match &self.store {
            Store::Device(layers) => layers.iter().map(|l| 2 * (l.k.elem_count() * l.k.dtype().size_in_bytes()) as u64).sum(),
            Store::Host { layers, n_kv_heads, head_dim } => {
                let rows = needed.map_or_else(|| layers.first().map_or(0, |l| l.rows), |n| self.rows_for(n));
                (layers.len() * 2 * n_kv_heads * rows * head_dim * std::mem::size_of::<f16>()) as u64
            }
            Store::Kernels { layers, .. } => layers.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum(),
        }
    }

    /// Writes `k`, `v` (`[b, n_kv, seq, hd]`, contiguous) of block `layer` at
    /// the current position and returns all valid rows including them.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let seq = k.dim(2)?;
        let Store::Device(layers) = &self.store else {
            return Err(Error::InvalidRequest("a KV cache of another backend used by the candle path".into()));
        };
        let entry = &layers[layer];
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

    pub fn export(&self) -> Result<KvState> {
        let len = self.len;
        let layers = match &self.store {
            Store::Device(layers) => layers
                .iter()
                .map(|l| Ok((l.k.narrow(2, 0, len)?.contiguous()?, l.v.narrow(2, 0, len)?.contiguous()?)))
                .collect::<Result<Vec<_>>>()?,
            Store::Host { layers, n_kv_heads, head_dim } => {
                let (h, d) = (*n_kv_heads, *head_dim);
                let valid = |buf: &[f16], stride: usize| -> Result<Tensor> {
                    let rows: Vec<f32> = (0..h).flat_map(|j| buf[j * stride * d..][..len * d].iter().map(|x| x.to_f32())).collect();
                    Ok(Tensor::from_vec(rows, (1, h, len, d), &Device::Cpu)?)
                };
                layers.iter().map(|l| Ok((valid(&l.k, l.rows)?, valid(&l.v, l.rows)?))).collect::<Result<Vec<_>>>()?
            }
            Store::Kernels { layers, n_kv_heads, head_dim, kd } => {
                let (h, d) = (*n_kv_heads, *head_dim);
                // Position-major on the device, head-major in the state.
                let valid = |buf: &DevBuf| -> Result<Tensor> {
                    let mut bytes = vec![0u8; len * h * d * 2];
                    kd.read(buf, 0, &mut bytes)?;
                    let rows: Vec<f16> = bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]])).collect();
                    let heads: Vec<f32> = (0..h)
                        .flat_map(|j| (0..len).flat_map(move |p| (0..d).map(move |i| (p, j, i))))
                        .map(|(p, j, i)| rows[(p * h + j) * d + i].to_f32())
                        .collect();
                    Ok(Tensor::from_vec(heads, (1, h, len, d), &Device::Cpu)?)
                };
                layers.iter().map(|(k, v)| Ok((valid(k)?, valid(v)?))).collect::<Result<Vec<_>>>()?
            }
        };
        Ok(KvState { len, layers })
    }

    /// The shape of each of a state's tensors that this cache takes, for
    /// `len` positions: `[batch, n_kv_heads, len, head_dim]`.
    fn state_shape(&self, len: usize) -> Result<[usize; 4]> {
        match &self.store {
            Store::Device(layers) => match layers.first() {
                Some(l) => {
                    let (b, h, _, d) = l.k.dims4()?;
                    Ok([b, h, len, d])
                }
                None => Ok([0, 0, len, 0]),
            },
            Store::Host { n_kv_heads, head_dim, .. } | Store::Kernels { n_kv_heads, head_dim, .. } => Ok([1, *n_kv_heads, len, *head_dim]),
        }
    }

    /// Replaces the cache content with `state`, which must match this cache's
    /// block count and head shape and fit its capacity.
    pub fn import(&mut self, state: &KvState) -> Result<()> {
        if state.layers.len() != self.n_layers() {
            return Err(Error::InvalidRequest(format!("KV state has {} blocks, this cache holds {}", state.layers.len(), self.n_layers())));
        }
        if state.len > self.capacity {
            return Err(Error::ContextOverflow { prompt: state.len, context: self.capacity });
        }
        // Every shape checked before any write: a bad state leaves the cache as it was.
        let expected = self.state_shape(state.len)?;
        if let Some(t) = state.layers.iter().flat_map(|(k, v)| [k, v]).find(|t| t.dims() != expected) {
            return Err(Error::InvalidRequest(format!("KV state shape {:?} does not match this cache {expected:?}", t.dims())));
        }
        if self.is_host() {
            self.len = 0;
            self.reserve(state.len)?;
        }
        let layers = match &mut self.store {
            Store::Device(layers) => layers,
            Store::Host { layers, n_kv_heads, head_dim } => {
                let (h, d, len) = (*n_kv_heads, *head_dim, state.len);
                for (entry, (k, v)) in layers.iter_mut().zip(state.layers.iter()) {
                    let stride = entry.rows;
                    for (buf, t) in [(&mut entry.k, k), (&mut entry.v, v)] {
                        let rows = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                        for j in 0..h {
                            buf[j * stride * d..][..len * d].convert_from_f32_slice(&rows[j * len * d..(j + 1) * len * d]);
                        }
                    }
                }
                self.len = state.len;
                return Ok(());
            }
            Store::Kernels { layers, n_kv_heads, head_dim, kd } => {
                let (h, d, len) = (*n_kv_heads, *head_dim, state.len);
                for ((kb, vb), (k, v)) in layers.iter().zip(state.layers.iter()) {
                    for (buf, t) in [(kb, k), (vb, v)] {
                        let heads = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                        let bytes: Vec<u8> = (0..len)
                            .flat_map(|p| (0..h).flat_map(move |j| (0..d).map(move |i| (j * len + p) * d + i)))
                            .flat_map(|at| f16::from_f32(heads[at]).to_le_bytes())
                            .collect();
                        kd.write(buf, 0, &bytes)?;
                    }
                }
                self.len = state.len;
                return Ok(());
            }
        };
        for (entry, (k, v)) in layers.iter().zip(state.layers.iter()) {
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
    fn host_and_device_caches_exchange_state() -> Result<()> {
        let dev = Device::Cpu;
        let mut host = KvCache::new_host(2, 2, 4, 8);
        host.reserve(3)?;
        assert_eq!(host.host_layer_mut(0).unwrap().rows, 8, "a chunk, up to the capacity");
        for layer in 0..2 {
            let l = host.host_layer_mut(layer).unwrap();
            // Small integers: exact in f16, so the round trip compares exactly.
            for (i, x) in l.k.iter_mut().enumerate() {
                *x = f16::from_f32((i + layer) as f32);
            }
            for (i, x) in l.v.iter_mut().enumerate() {
                *x = f16::from_f32(-(i as f32));
            }
        }
        host.advance(3);
        let state = host.export()?;
        assert_eq!(state.layers[0].0.dims(), [1, 2, 3, 4]);
        // Head 1 starts at row `rows` of the host buffer.
        assert_eq!(state.layers[0].0.get(0)?.get(1)?.get(0)?.to_vec1::<f32>()?, vec![32., 33., 34., 35.]);
        let mut device = KvCache::new(2, 1, 2, 4, 8, &dev)?;
        device.import(&state)?;
        let mut back = KvCache::new_host(2, 2, 4, 8);
        back.import(&device.export()?)?;
        assert_eq!(back.export()?.layers[1].1.flatten_all()?.to_vec1::<f32>()?, state.layers[1].1.flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    }

    #[test]
    fn a_host_cache_holds_what_it_uses_and_keeps_its_rows_as_it_grows() -> Result<()> {
        let mut cache = KvCache::new_host(1, 2, 4, 1000);
        assert_eq!(cache.bytes(), 0, "a session that has run nothing holds nothing");
        cache.reserve(3)?;
        let first = cache.bytes();
        assert_eq!(first, (2 * 2 * HOST_CHUNK * 4 * 2) as u64);
        let l = cache.host_layer_mut(0).unwrap();
        for j in 0..2 {
            for p in 0..3 {
                for (x, y) in l.k[(j * l.rows + p) * 4..][..4].iter_mut().zip(&mut l.v[(j * l.rows + p) * 4..][..4]) {
                    *x = f16::from_f32((j * 10 + p) as f32);
                    *y = f16::from_f32(-((j * 10 + p) as f32));
                }
            }
        }
        cache.advance(3);
        let before = cache.export()?;
        assert_eq!(cache.bytes_after(HOST_CHUNK - 3), first, "room left in the first chunk");
        assert_eq!(cache.bytes_after(HOST_CHUNK - 2), 2 * first, "the next chunk, not the capacity");
        cache.reserve(HOST_CHUNK - 2)?;
        assert_eq!(cache.bytes(), 2 * first);
        let after = cache.export()?;
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(values(&after.layers[0].0), values(&before.layers[0].0));
        assert_eq!(values(&after.layers[0].1), values(&before.layers[0].1));
        assert!(cache.reserve(998).is_err(), "past the capacity");
        Ok(())
    }

    /// A state whose last block has the wrong shape is refused before any
    /// block is written: the session keeps what it had.
    #[test]
    fn a_refused_import_leaves_the_cache_as_it_was() -> Result<()> {
        let dev = Device::Cpu;
        let values = |s: &KvState| -> Vec<Vec<f32>> {
            s.layers.iter().flat_map(|(k, v)| [k, v]).map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
        };
        let mut host = KvCache::new_host(2, 2, 4, 8);
        let mut device = KvCache::new(2, 1, 2, 4, 8, &dev)?;
        let k = Tensor::arange(0f32, 24., &dev)?.reshape((1, 2, 3, 4))?;
        let good = KvState { len: 3, layers: vec![(k.clone(), (&k * 2.0)?), (k.clone(), (&k * 3.0)?)] };
        for cache in [&mut host, &mut device] {
            cache.import(&good)?;
            let before = cache.export()?;
            let mut bad = KvState { len: 2, layers: vec![(k.narrow(2, 0, 2)?, k.narrow(2, 0, 2)?); 2] };
            bad.layers[1].1 = k.narrow(2, 0, 2)?.narrow(3, 0, 2)?.contiguous()?;
            assert!(cache.import(&bad).is_err());
            assert_eq!(cache.len(), 3);
            assert_eq!(values(&cache.export()?), values(&before));
        }
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
