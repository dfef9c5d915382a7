//! A contiguous range of blocks `[start, end)` of a model, the unit a node
//! loads and runs. It owns the token embedding only when `start == 0` and the
//! final norm + LM head only when `end == n_layers`; the whole model is the
//! slice `[0, n_layers)`.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};

use super::block::{causal_mask, Block};
use super::config::Config;
use super::host::{BatchItem, HostInput, Scratch};
use super::kv_cache::KvCache;
use super::rope::Rope;
use super::weights::{Backend, Embedding, Linear, RmsNorm, Role};
use super::ModelFile;
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct ModelSlice {
    config: Config,
    layers: Range<usize>,
    embed: Option<Embedding>,
    blocks: Vec<Block>,
    head: Option<(RmsNorm, Linear)>,
    rope: Rope,
    device: Device,
    weight_bytes: usize,
    backend: Backend,
    /// The host path's buffers (shared by clones, which then take turns).
    scratch: Arc<Mutex<Scratch>>,
}

/// What a slice hands on: hidden states for the next stage, or the last
/// position's logits from the final stage.
#[derive(Debug)]
pub enum SliceOutput {
    /// `[b, seq, hidden]` f32
    Hidden(Tensor),
    /// `[b, vocab]` f32
    Logits(Tensor),
}

impl ModelSlice {
    /// Loads on `device` with the backend it calls for (ours on the CPU).
    pub fn load(file: &mut ModelFile, layers: Range<usize>, device: &Device) -> Result<Self> {
        Self::load_with(file, layers, device, Backend::for_device(device))
    }

    /// Loads with an explicit backend. A host slice whose file has a weight
    /// type our kernels lack is loaded for candle instead.
    pub fn load_with(file: &mut ModelFile, layers: Range<usize>, device: &Device, backend: Backend) -> Result<Self> {
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
        // The table is also the LM head of a tied model.
        let tied_head_here = is_last && !file.has(Role::Output, None);
        let (host_table, embed_table) = match backend {
            _ if !is_first && !tied_head_here => (None, None),
            // On the host path the table is one matrix, shared by the
            // embedding and a tied LM head; laid out for products only when
            // it is that head here (a lookup reads either layout).
            Backend::Host => match file.read_matrix(Role::Embed, None)? {
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
                let table = file.read(Role::Embed, None, device)?;
                weight_bytes += table.size_in_bytes();
                (None, Some(table))
            }
        };
        let embed = match (&host_table, &embed_table) {
            _ if !is_first => None,
            (Some(m), _) => Some(Embedding::Host(m.clone())),
            (None, t) => t.clone().map(Embedding::Candle),
        };
        let mut blocks = Vec::with_capacity(layers.len());
        for layer in layers.clone() {
            blocks.push(Block::load(file, &config, layer, device, backend)?);
            progress.inc(1);
        }
        if backend == Backend::Host && !blocks.iter().all(Block::is_host) {
            progress.finish_and_clear();
            return Self::load_with(file, layers, device, Backend::Candle);
        }
        weight_bytes += file.bytes_of_blocks(layers.clone());
        let head = if is_last {
            let norm = file.read(Role::OutputNorm, None, device)?;
            let output = if file.has(Role::Output, None) {
                match backend {
                    Backend::Host => match file.read_matrix(Role::Output, None)? {
                        Some(m) => {
                            weight_bytes += m.size_in_bytes();
                            Linear::from_matrix(Arc::new(m.interleaved()))
                        }
                        None => return Self::load_with(file, layers, device, Backend::Candle),
                    },
                    Backend::Candle => {
                        let w = file.read(Role::Output, None, device)?;
                        weight_bytes += w.size_in_bytes();
                        Linear::new(w, None, backend)?
                    }
                }
            } else if let Some(m) = &host_table {
                Linear::from_matrix(m.clone())
            } else {
                // Tied embeddings: the LM head is the embedding table.
                let table = embed_table.clone().ok_or_else(|| Error::bad_model(file.path(), "no LM head and no embedding table"))?;
                Linear::new(table, None, backend)?
            };
            if backend == Backend::Host && output.host().is_none() {
                progress.finish_and_clear();
                return Self::load_with(file, layers, device, Backend::Candle);
            }
            Some((RmsNorm::new(&norm, config.rms_norm_eps)?, output))
        } else {
            None
        };
        progress.inc(1);
        progress.finish_and_clear();
        let rope = Rope::new(&config, device)?;
        let scratch = Arc::new(Mutex::new(Scratch::default()));
        Ok(Self { config, layers, embed, blocks, head, rope, device: device.clone(), weight_bytes, backend, scratch })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub(super) fn embed(&self) -> Option<&Embedding> {
        self.embed.as_ref()
    }

    pub(super) fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    pub(super) fn n_blocks(&self) -> usize {
        self.blocks.len()
    }

    pub(super) fn head(&self) -> Option<&(RmsNorm, Linear)> {
        self.head.as_ref()
    }

    pub(super) fn rope(&self) -> &Rope {
        &self.rope
    }

    pub(super) fn scratch(&self) -> &Mutex<Scratch> {
        &self.scratch
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

    /// A KV cache for one session of this slice, room for `capacity` positions.
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        let cfg = &self.config;
        let capacity = capacity.min(cfg.context_length);
        match self.backend {
            Backend::Host => Ok(KvCache::new_host(self.blocks.len(), cfg.n_kv_heads, cfg.head_dim, capacity)),
            Backend::Candle => KvCache::new(self.blocks.len(), 1, cfg.n_kv_heads, cfg.head_dim, capacity, &self.device),
        }
    }

    /// Runs the slice on `x` — token ids `[b, seq]` (u32) on the first slice,
    /// hidden states `[b, seq, hidden]` (f32) otherwise — at the cache's position.
    pub fn forward(&self, x: &Tensor, cache: &mut KvCache) -> Result<SliceOutput> {
        let seq = x.dim(1)?;
        if seq == 0 {
            return Err(Error::InvalidRequest("empty input".into()));
        }
        if cache.n_layers() != self.blocks.len() || cache.is_host() != (self.backend == Backend::Host) {
            return Err(Error::InvalidRequest("KV cache belongs to a different slice".into()));
        }
        self.check_input(x)?;
        if self.backend == Backend::Host {
            return self.forward_host_tensor(x, cache);
        }
        cache.reserve(seq)?;
        let pos = cache.len();
        let mut h = match &self.embed {
            Some(embed) => embed.forward(x)?,
            None => x.clone(),
        };
        let mask = if seq > 1 { Some(causal_mask(seq, pos, &self.device)?) } else { None };
        for (i, block) in self.blocks.iter().enumerate() {
            h = block.forward(&h, mask.as_ref(), &self.rope, cache, i)?;
        }
        cache.advance(seq);
        match &self.head {
            Some((norm, output)) => {
                let last = h.narrow(1, seq - 1, 1)?.squeeze(1)?;
                Ok(SliceOutput::Logits(output.forward(&norm.forward(&last)?)?))
            }
            None => Ok(SliceOutput::Hidden(h)),
        }
    }
}

impl ModelSlice {
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

    /// [`ModelSlice::forward`] on the host path (input already checked): a batch of one.
    fn forward_host_tensor(&self, x: &Tensor, cache: &mut KvCache) -> Result<SliceOutput> {
        if x.dim(0)? != 1 {
            return Err(Error::InvalidRequest("the host path runs one sequence per batch item".into()));
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
    pub fn into_tensor(self) -> Tensor {
        match self {
            SliceOutput::Hidden(t) | SliceOutput::Logits(t) => t,
        }
    }
}
