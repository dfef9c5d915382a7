//! A contiguous range of blocks `[start, end)` of a model, the unit a node
//! loads and runs. It owns the token embedding only when `start == 0` and the
//! final norm + LM head only when `end == n_layers`; the whole model is the
//! slice `[0, n_layers)`.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};

use super::candle::CandleOps;
use super::config::{Config, Pooling};
use super::gpu::{self, OnDevice, Step, StepOut};
use super::host::{BatchItem, HostInput, HostOps, Scratch, Seg};
use super::kv_cache::KvCache;
use super::loader::Loader;
use super::ops::{Block, Ops};
use super::weights::RawWeight;
use super::weights::{device_matrix, Backend, Embedding, Linear, Norm};
use super::{ModelFile, EMBED, OUTPUT, OUTPUT_BIAS, OUTPUT_NORM, OUTPUT_NORM_BIAS};
use crate::error::{Error, Result};
use crate::kernels::device::kernel_device;

#[derive(Debug, Clone)]
pub struct ModelSlice {
    config: Config,
    layers: Range<usize>,
    embed: Option<Embedding>,
    /// The architecture's scale of embedding rows (gemma: √hidden).
    embed_scale: Option<f32>,
    blocks: Vec<Arc<dyn Block>>,
    head: Option<(Norm, Linear)>,
    device: Device,
    weight_bytes: usize,
    backend: Backend,
    /// The host path's buffers (shared by clones, which then take turns).
    scratch: Arc<Mutex<Scratch>>,
    /// The device the device kernels run on, and their buffers (`Backend::Device`).
    kernels: Option<Arc<OnDevice>>,
}

/// What a slice hands on: hidden states for the next stage, or the last
/// position's logits from the final stage.
#[derive(Debug)]
pub enum SliceOutput {
    /// `[b, seq, hidden]` f32
    Hidden(Tensor),
    /// The last position's logits (one sequence), read where they are
    /// sampled without another copy.
    Logits(Vec<f32>),
}

impl ModelSlice {
    /// Loads on `device` with the backend it calls for (ours on the CPU).
    pub fn load(file: &mut ModelFile, layers: Range<usize>, device: &Device) -> Result<Self> {
        let slice = Self::load_with(file, layers, device, Backend::for_device(device));
        crate::sys::release_freed_memory();
        slice
    }

    /// Loads with an explicit backend. A host slice whose file has a weight
    /// type our kernels lack is loaded for candle instead.
    pub fn load_with(file: &mut ModelFile, layers: Range<usize>, device: &Device, backend: Backend) -> Result<Self> {
        let slice = Self::load_inner(file, layers, device, backend, false)?;
        if backend == Backend::Device && slice.backend != backend {
            tracing::warn!("the device kernels lack a weight type or an operation of this model: its slice runs on candle's ops");
        }
        Ok(slice)
    }

    /// The same weights dequantized to f32 and run in f32 throughout (candle's
    /// ops on the CPU: no activation quantization, an f32 KV cache): the
    /// exact math a quantized model approximates, `sollol perplexity`'s base.
    pub fn load_exact(file: &mut ModelFile, layers: Range<usize>) -> Result<Self> {
        Self::load_inner(file, layers, &Device::Cpu, Backend::Candle, true)
    }

    fn load_inner(file: &mut ModelFile, layers: Range<usize>, device: &Device, backend: Backend, exact: bool) -> Result<Self> {
        let config = file.config()?;
        if layers.start >= layers.end || layers.end > config.n_layers {
            return Err(Error::InvalidRequest(format!(
                "layers {}..{} are not a non-empty range inside the model's {} blocks",
                layers.start, layers.end, config.n_layers
            )));
        }
        let is_first = layers.start == 0;
        let is_last = layers.end == config.n_layers;
        let progress = ProgressBar::new(layers.len() as u64 + 1).with_message(format!(
            "loading blocks {}..{} of {}",
            layers.start,
            layers.end,
            file.path().display()
        ));
        progress.set_style(
            ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} [{elapsed}]").unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let mut weight_bytes = 0;
        // Heads the attention kernel does not take: the slice runs on candle.
        if backend == Backend::Device && !crate::kernels::device::takes_heads(config.head_dim) {
            progress.finish_and_clear();
            return Self::load_with(file, layers, device, Backend::Candle);
        }
        let kernels = if backend == Backend::Device { Some(kernel_device(device)?) } else { None };
        // What the device kernels' slice reads on the host before uploading it.
        let read_on = if backend == Backend::Device { &Device::Cpu } else { device };
        // The table is also the LM head of a tied model.
        let tied_head_here = is_last && !file.has(OUTPUT, None);
        let mut device_table = None;
        let (host_table, embed_table) = match backend {
            _ if !is_first && !tied_head_here => (None, None),
            Backend::Device => {
                let kd = kernels.as_deref().expect("made above for Backend::Device");
                match device_matrix(&file.read(EMBED, None, &Device::Cpu)?, kd)? {
                    Some(m) if m.cols != config.hidden_size => {
                        return Err(Error::bad_model(
                            file.path(),
                            format!("the embedding table has rows of {}, the config says {}", m.cols, config.hidden_size),
                        ))
                    }
                    Some(m) => {
                        weight_bytes += m.buf.len();
                        device_table = Some(Arc::new(m));
                        (None, None)
                    }
                    None => return Self::load_with(file, layers, device, Backend::Candle),
                }
            }
            // On the host path the table is one matrix, shared by the
            // embedding and a tied LM head; laid out for products only when
            // it is that head here (a lookup reads either layout).
            Backend::Host => match file.read_matrix(EMBED, None)? {
                Some(m) if m.cols() != config.hidden_size => {
                    return Err(Error::bad_model(
                        file.path(),
                        format!("the embedding table has rows of {}, the config says {}", m.cols(), config.hidden_size),
                    ))
                }
                Some(m) => {
                    weight_bytes += m.size_in_bytes();
                    (Some(Arc::new(if tied_head_here { m.interleaved() } else { m })), None)
                }
                None => return Self::load_with(file, layers, device, Backend::Candle),
            },
            Backend::Candle => {
                let table = file.read(EMBED, None, device)?.dequantized_if(exact)?;
                weight_bytes += table.size_in_bytes();
                (None, Some(table))
            }
        };
        let embed = match (&host_table, &embed_table, &device_table) {
            _ if !is_first => None,
            (Some(m), _, _) => Some(Embedding::Host(m.clone())),
            (_, _, Some(m)) => Some(Embedding::Device(m.clone())),
            (None, t, None) => t.clone().map(Embedding::Candle),
        };
        let mut blocks = Vec::with_capacity(layers.len());
        let mut ropes = Vec::new();
        for layer in layers.clone() {
            let mut loader = Loader {
                file,
                config: &config,
                device,
                backend,
                exact,
                layer,
                ropes: &mut ropes,
                kernels: kernels.clone(),
                all_kernels: true,
            };
            blocks.push((config.arch.load_block)(&mut loader)?);
            if !loader.all_kernels {
                progress.finish_and_clear();
                return Self::load_with(file, layers, device, Backend::Candle);
            }
            progress.inc(1);
        }
        weight_bytes += file.bytes_of_blocks(layers.clone());
        let head = if is_last {
            let norm = file.read(OUTPUT_NORM, None, read_on)?;
            let output = if file.has(OUTPUT, None) {
                match backend {
                    Backend::Device => {
                        let w = file.read(OUTPUT, None, &Device::Cpu)?;
                        weight_bytes += w.size_in_bytes();
                        let kd = kernels.as_deref().expect("made above for Backend::Device");
                        match Linear::on_device(&w, None, kd)? {
                            Some(l) => l,
                            None => return Self::load_with(file, layers, device, Backend::Candle),
                        }
                    }
                    Backend::Host => match file.read_matrix(OUTPUT, None)? {
                        Some(m) => {
                            weight_bytes += m.size_in_bytes();
                            Linear::from_matrix(Arc::new(m.interleaved()))
                        }
                        None => return Self::load_with(file, layers, device, Backend::Candle),
                    },
                    Backend::Candle => {
                        let w = file.read(OUTPUT, None, device)?.dequantized_if(exact)?;
                        weight_bytes += w.size_in_bytes();
                        Linear::new(w, None, backend)?
                    }
                }
            } else if let Some(m) = &host_table {
                Linear::from_matrix(m.clone())
            } else if let Some(m) = &device_table {
                Linear::from_device(m.clone())
            } else {
                // Tied embeddings: the LM head is the embedding table.
                let table = embed_table.clone().ok_or_else(|| Error::bad_model(file.path(), "no LM head and no embedding table"))?;
                Linear::new(table, None, backend)?
            };
            if backend == Backend::Host && output.host().is_none() {
                progress.finish_and_clear();
                return Self::load_with(file, layers, device, Backend::Candle);
            }
            // phi2's head is a LayerNorm and an LM head with a bias.
            let bias = |name: &str, file: &mut ModelFile| -> Result<Option<RawWeight>> {
                file.has(name, None).then(|| file.read(name, None, read_on)).transpose()
            };
            // The device kernels have neither LayerNorm nor a biased head.
            if backend == Backend::Device && (file.has(OUTPUT_BIAS, None) || file.has(OUTPUT_NORM_BIAS, None)) {
                progress.finish_and_clear();
                return Self::load_with(file, layers, device, Backend::Candle);
            }
            let output = output.with_bias(bias(OUTPUT_BIAS, file)?.map(|b| b.to_f32()).transpose()?)?;
            let norm = match bias(OUTPUT_NORM_BIAS, file)? {
                Some(b) => Norm::layer(&norm, &b, config.rms_norm_eps)?,
                None => {
                    let offset = if matches!(file, ModelFile::Safetensors(_)) { config.arch.hf_norm_offset } else { 0.0 };
                    Norm::rms(&norm, offset, config.rms_norm_eps)?
                }
            };
            Some((norm, output))
        } else {
            None
        };
        progress.inc(1);
        progress.finish_and_clear();
        let scratch = Arc::new(Mutex::new(Scratch::default()));
        let embed_scale = (config.arch.embedding_scale)(config.hidden_size);
        let kernels = kernels.map(|kd| Arc::new(OnDevice::new(kd)));
        Ok(Self { config, layers, embed, embed_scale, blocks, head, device: device.clone(), weight_bytes, backend, scratch, kernels })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn layers(&self) -> Range<usize> {
        self.layers.clone()
    }

    pub fn is_first(&self) -> bool {
        self.embed.is_some()
    }

    pub fn is_last(&self) -> bool {
        self.head.is_some()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes of weights this slice holds.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// The bytes a new session's cache of `capacity` positions holds once
    /// it has room for its first `rows` (what admission checks before
    /// opening one).
    pub fn new_cache_bytes(&self, capacity: usize, rows: usize) -> u64 {
        let cfg = &self.config;
        let capacity = capacity.min(cfg.context_length);
        match self.backend {
            Backend::Host => KvCache::new_host(self.blocks.len(), cfg.n_kv_heads, cfg.head_dim, capacity).bytes_after(rows),
            Backend::Candle => (self.blocks.len() * 2 * cfg.n_kv_heads * capacity * cfg.head_dim * 4) as u64,
            Backend::Device => (self.blocks.len() * 2 * cfg.n_kv_heads * capacity * cfg.head_dim * 2) as u64,
        }
    }

    /// A KV cache for one session of this slice, room for `capacity` positions.
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        let cfg = &self.config;
        let capacity = capacity.min(cfg.context_length);
        match self.backend {
            Backend::Host => Ok(KvCache::new_host(self.blocks.len(), cfg.n_kv_heads, cfg.head_dim, capacity)),
            Backend::Candle => KvCache::new(self.blocks.len(), 1, cfg.n_kv_heads, cfg.head_dim, capacity, &self.device),
            Backend::Device => {
                let on = self.kernels.as_ref().expect("a device slice has its device");
                KvCache::new_kernels(self.blocks.len(), cfg.n_kv_heads, cfg.head_dim, capacity, on.kd.clone())
            }
        }
    }

    /// Turns replaying decode steps as graphs on or off (device slices).
    #[cfg(test)]
    pub(crate) fn set_device_graphs(&self, on: bool) {
        if let Some(d) = &self.kernels {
            d.state.lock().unwrap_or_else(|e| e.into_inner()).set_graphs(on);
        }
    }

    /// Decode steps replayed as graphs so far (device slices).
    #[cfg(test)]
    pub(crate) fn device_replays(&self) -> u64 {
        self.kernels.as_ref().map_or(0, |d| d.state.lock().unwrap_or_else(|e| e.into_inner()).replays)
    }

    /// Whether `cache` is of the kind this slice's backend keeps.
    fn holds(&self, cache: &KvCache) -> bool {
        cache.n_layers() == self.blocks.len()
            && match self.backend {
                Backend::Host => cache.is_host(),
                Backend::Device => cache.is_kernels(),
                Backend::Candle => !cache.is_host() && !cache.is_kernels(),
            }
    }

    /// Runs the slice on `x` — token ids `[b, seq]` (u32) on the first slice,
    /// hidden states `[b, seq, hidden]` (f32) otherwise — at the cache's position.
    pub fn forward(&self, x: &Tensor, cache: &mut KvCache) -> Result<SliceOutput> {
        let seq = x.dim(1)?;
        if seq == 0 {
            return Err(Error::InvalidRequest("empty input".into()));
        }
        if !self.holds(cache) {
            return Err(Error::InvalidRequest("KV cache belongs to a different slice".into()));
        }
        self.check_input(x)?;
        if self.backend.batches() {
            return self.forward_one(x, cache);
        }
        let h = self.blocks_candle(x, cache)?;
        match &self.head {
            Some((norm, output)) => {
                let last = h.narrow(1, seq - 1, 1)?.squeeze(1)?;
                Ok(SliceOutput::Logits(output.forward(&norm.forward(&last)?)?.flatten_all()?.to_vec1::<f32>()?))
            }
            None => Ok(SliceOutput::Hidden(h)),
        }
    }
}

impl ModelSlice {
    /// The candle backend's blocks over `x` (input checked), advancing the
    /// cache: the last block's output `[b, seq, hidden]`.
    fn blocks_candle(&self, x: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let seq = x.dim(1)?;
        cache.reserve(seq)?;
        let h = match &self.embed {
            Some(embed) => embed.forward(x)?,
            None => x.clone(),
        };
        let (mut ops, mut h) = CandleOps::new(cache, h)?;
        if let (Some(s), true) = (self.embed_scale, self.is_first()) {
            h = ops.scale(h, s)?;
        }
        for (i, block) in self.blocks.iter().enumerate() {
            let out = block.forward(&mut ops, h, i)?;
            h = ops.end_block(out);
        }
        let h = ops.get(h).clone();
        drop(ops);
        cache.advance(seq);
        Ok(h)
    }

    /// [`ModelSlice::pool_batch`] for one item on the candle backend.
    fn pool_candle(&self, item: &mut BatchItem<'_>, norm: &Norm, pooling: Pooling) -> Result<Vec<f32>> {
        let hidden = self.config.hidden_size;
        let x = match item.input {
            HostInput::Tokens(t) => Tensor::from_slice(t, (1, t.len()), &self.device)?,
            HostInput::Hidden(h) if h.len() % hidden == 0 => Tensor::from_slice(h, (1, h.len() / hidden, hidden), &self.device)?,
            HostInput::Hidden(_) => return Err(Error::InvalidRequest(format!("hidden states must be rows of {hidden}"))),
        };
        if x.dim(1)? == 0 {
            return Err(Error::InvalidRequest("empty input".into()));
        }
        if !self.holds(item.cache) {
            return Err(Error::InvalidRequest("KV cache belongs to a different slice".into()));
        }
        self.check_input(&x)?;
        let h = self.blocks_candle(&x, item.cache)?;
        let seq = h.dim(1)?;
        let picked = match pooling {
            Pooling::Mean => h,
            Pooling::First => h.narrow(1, 0, 1)?,
            Pooling::Last => h.narrow(1, seq - 1, 1)?,
        };
        Ok(norm.forward(&picked.to_dtype(DType::F32)?)?.sum(1)?.squeeze(0)?.to_device(&Device::Cpu)?.to_vec1::<f32>()?)
    }

    /// Token ids `[b, seq]` u32 on the first slice, hidden states
    /// `[b, seq, hidden]` f32 on the others.
    fn check_input(&self, x: &Tensor) -> Result<()> {
        if self.is_first() {
            if x.dtype() != DType::U32 || x.rank() != 2 {
                return Err(Error::InvalidRequest("the first slice takes token ids [batch, seq] u32".into()));
            }
        } else if x.dtype() != DType::F32 || x.rank() != 3 || x.dim(2)? != self.config.hidden_size {
            return Err(Error::InvalidRequest(format!(
                "slice {}..{} takes hidden states [batch, seq, {}] f32, got {:?} {:?}",
                self.layers.start,
                self.layers.end,
                self.config.hidden_size,
                x.dims(),
                x.dtype()
            )));
        }
        Ok(())
    }

    /// [`ModelSlice::forward`] on a batching backend (input already checked): a batch of one.
    fn forward_one(&self, x: &Tensor, cache: &mut KvCache) -> Result<SliceOutput> {
        if x.dim(0)? != 1 {
            return Err(Error::InvalidRequest("a batching backend runs one sequence per batch item".into()));
        }
        let (tokens, hidden);
        let input = if self.is_first() {
            tokens = x.flatten_all()?.to_vec1::<u32>()?;
            HostInput::Tokens(&tokens)
        } else {
            hidden = x.flatten_all()?.to_vec1::<f32>()?;
            HostInput::Hidden(&hidden)
        };
        let mut out = self.forward_batch(&mut [BatchItem { input, cache }])?;
        Ok(out.pop().expect("one output per item"))
    }
}

impl SliceOutput {
    /// The values, hidden states flattened.
    pub fn into_values(self) -> Result<Vec<f32>> {
        match self {
            SliceOutput::Hidden(t) => Ok(t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?),
            SliceOutput::Logits(l) => Ok(l),
        }
    }
}

impl ModelSlice {
    /// Runs several sessions' inputs as one batch on the host backend; one
    /// output per item, in order. Every item is checked before any runs, so
    /// a bad one leaves all caches untouched.
    pub fn forward_batch(&self, items: &mut [BatchItem<'_>]) -> Result<Vec<SliceOutput>> {
        let hidden = self.config.hidden_size;
        let cpu = &Device::Cpu;
        let hidden_of = |rows: &[f32], segs: &[Seg]| -> Result<Vec<SliceOutput>> {
            segs.iter()
                .map(|g| {
                    let rows = &rows[g.start * hidden..(g.start + g.len) * hidden];
                    Ok(SliceOutput::Hidden(Tensor::from_slice(rows, (1, g.len, hidden), cpu)?))
                })
                .collect()
        };
        let logits_of = |logits: &[f32], items: usize| -> Result<Vec<SliceOutput>> {
            let vocab = logits.len() / items.max(1);
            Ok(logits.chunks_exact(vocab).map(|l| SliceOutput::Logits(l.to_vec())).collect())
        };
        if self.backend == Backend::Device {
            return match self.run_device_batch(items, true)? {
                (StepOut::Logits(l), segs) => logits_of(&l, segs.len()),
                (StepOut::Rows(r), segs) => hidden_of(&r, &segs),
            };
        }
        self.run_host_batch(items, |ops, h, segs| match &self.head {
            Some((norm, output)) => {
                // Only each item's last position is sampled.
                let last: Vec<usize> = segs.iter().map(|g| g.start + g.len - 1).collect();
                logits_of(ops.head(h, &last, norm, output)?, last.len())
            }
            None => hidden_of(ops.rows(h)?, segs),
        })
    }

    /// The last slice's final-normed hidden states of each item, pooled
    /// (an embedding): the sum of the rows (a mean over inputs of several
    /// steps is the caller's to finish), or the first or last row. The
    /// caches are filled as by a forward step.
    pub fn pool_batch(&self, items: &mut [BatchItem<'_>], pooling: Pooling) -> Result<Vec<Vec<f32>>> {
        let Some((norm, _)) = &self.head else {
            return Err(Error::InvalidRequest("only the last slice pools its hidden states".into()));
        };
        let hidden = self.config.hidden_size;
        let pool = |all: &[f32], segs: &[Seg]| -> Vec<Vec<f32>> {
            let mut normed = vec![0f32; hidden];
            segs.iter()
                .map(|g| {
                    let mut pooled = vec![0f32; hidden];
                    let picked = match pooling {
                        Pooling::Mean => g.start..g.start + g.len,
                        Pooling::First => g.start..g.start + 1,
                        Pooling::Last => g.start + g.len - 1..g.start + g.len,
                    };
                    for r in picked {
                        norm.forward_host(&all[r * hidden..(r + 1) * hidden], &mut normed);
                        pooled.iter_mut().zip(&normed).for_each(|(p, x)| *p += x);
                    }
                    pooled
                })
                .collect()
        };
        match self.backend {
            Backend::Candle => items.iter_mut().map(|item| self.pool_candle(item, norm, pooling)).collect(),
            Backend::Device => match self.run_device_batch(items, false)? {
                (StepOut::Rows(all), segs) => Ok(pool(&all, &segs)),
                (StepOut::Logits(_), _) => unreachable!("a step without the head hands rows on"),
            },
            Backend::Host => self.run_host_batch(items, |ops, h, segs| Ok(pool(ops.rows(h)?, segs))),
        }
    }

    /// Checks every item of a batch (an input of the slice's kind, a cache
    /// of its backend) and reserves the room its rows need: where each
    /// item's rows sit in the stacked batch.
    fn place(&self, items: &mut [BatchItem<'_>]) -> Result<Vec<Seg>> {
        let hidden = self.config.hidden_size;
        let mut segs = Vec::with_capacity(items.len());
        let mut rows = 0;
        for (n, item) in items.iter_mut().enumerate() {
            let len = match (item.input, &self.embed) {
                (HostInput::Tokens(t), Some(_)) => t.len(),
                (HostInput::Hidden(h), None) if h.len() % hidden == 0 => h.len() / hidden,
                (HostInput::Tokens(_), None) | (HostInput::Hidden(_), _) => {
                    return Err(Error::InvalidRequest(format!(
                        "batch item {n}: slice {}..{} takes {}",
                        self.layers.start,
                        self.layers.end,
                        if self.is_first() { "token ids".to_string() } else { format!("hidden states of width {hidden}") }
                    )))
                }
            };
            if len == 0 {
                return Err(Error::InvalidRequest(format!("batch item {n}: empty input")));
            }
            if !self.holds(item.cache) {
                return Err(Error::InvalidRequest(format!("batch item {n}: KV cache belongs to a different slice")));
            }
            item.cache.reserve(len)?;
            if let (HostInput::Tokens(t), Some(e)) = (item.input, &self.embed) {
                if let Some(bad) = t.iter().find(|&&id| id as usize >= e.vocab_size()) {
                    return Err(Error::InvalidRequest(format!("token id {bad} is outside the vocabulary of {}", e.vocab_size())));
                }
            }
            segs.push(Seg { start: rows, len, pos: item.cache.len() });
            rows += len;
        }
        Ok(segs)
    }

    /// A batch on the device kernels: each item's logits (`head`, on the
    /// last slice) or the last block's rows, and where each item's rows sit.
    fn run_device_batch(&self, items: &mut [BatchItem<'_>], head: bool) -> Result<(StepOut, Vec<Seg>)> {
        if items.is_empty() {
            return Ok((StepOut::Rows(Vec::new()), Vec::new()));
        }
        let segs = self.place(items)?;
        let on = self.kernels.as_ref().expect("a device slice has its device");
        let mut state = on.state.lock().unwrap_or_else(|e| e.into_inner());
        let inputs: Vec<HostInput> = items.iter().map(|i| i.input).collect();
        let mut caches: Vec<&mut KvCache> = items.iter_mut().map(|i| &mut *i.cache).collect();
        let step = Step {
            blocks: &self.blocks,
            embed: self.embed.as_ref().map(|e| (e, self.embed_scale)),
            head: self.head.as_ref().filter(|_| head).map(|(n, o)| (n, o)),
            hidden: self.config.hidden_size,
        };
        let out = gpu::run(&*on.kd, &mut state, &step, &gpu::Items { inputs: &inputs, segs: &segs, caches: &caches })?;
        for (c, g) in caches.iter_mut().zip(&segs) {
            c.advance(g.len);
        }
        Ok((out, segs))
    }

    /// The host batch's common part: checks every item, runs the blocks over
    /// the stacked rows, hands the last block's output to `finish`, and
    /// advances the caches.
    fn run_host_batch<T>(
        &self,
        items: &mut [BatchItem<'_>],
        finish: impl FnOnce(&mut HostOps<'_, '_>, super::ops::Act, &[Seg]) -> Result<Vec<T>>,
    ) -> Result<Vec<T>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        if self.backend != Backend::Host {
            return Err(Error::InvalidRequest("this step runs on the host backend".into()));
        }
        let hidden = self.config.hidden_size;
        let segs = self.place(items)?;
        let mut guard = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let inputs: Vec<HostInput> = items.iter().map(|i| i.input).collect();
        let mut caches: Vec<&mut KvCache> = items.iter_mut().map(|i| &mut *i.cache).collect();
        let mut ops = HostOps::new(&mut guard, &segs, &mut caches);
        let (mut h, input) = ops.input(hidden);
        for (item_input, g) in inputs.iter().zip(&segs) {
            let dst = &mut input[g.start * hidden..(g.start + g.len) * hidden];
            match item_input {
                HostInput::Tokens(t) => self.embed.as_ref().expect("checked above").lookup_host(t, dst)?,
                HostInput::Hidden(x) => dst.copy_from_slice(x),
            }
        }
        if let (Some(s), true) = (self.embed_scale, self.is_first()) {
            h = ops.scale(h, s)?;
        }
        for (layer, block) in self.blocks.iter().enumerate() {
            let out = block.forward(&mut ops, h, layer)?;
            h = ops.end_block(out)?;
        }
        let outputs = finish(&mut ops, h, &segs);
        drop(ops);
        for (c, g) in caches.iter_mut().zip(&segs) {
            c.advance(g.len);
        }
        outputs
    }
}
