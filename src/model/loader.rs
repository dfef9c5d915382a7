//! What an architecture's block loader reads through: its tensors by GGUF
//! name (each format maps them), checked against the shapes the config
//! implies, in the form the slice's backend runs; its own hyper-parameters;
//! rotary tables shared by the blocks that use the same ones.

use std::sync::Arc;

use candle_core::Device;

use super::config::Config;
use super::ops::{Expert, Experts, Gate};
use super::rope::{Rope, RopeSpec};
use super::weights::{Backend, Linear, Norm, Part, Projections, RawWeight};
use super::ModelFile;
use crate::error::{Error, Result};
use crate::kernels::device::KernelDevice;

pub struct Loader<'a> {
    pub(super) file: &'a mut ModelFile,
    pub(super) config: &'a Config,
    pub(super) device: &'a Device,
    pub(super) backend: Backend,
    /// Weights dequantized to f32 ([`ModelSlice::load_exact`](super::ModelSlice::load_exact)).
    pub(super) exact: bool,
    pub(super) layer: usize,
    pub(super) ropes: &'a mut Vec<Arc<Rope>>,
    /// The device the device kernels run on (`Backend::Device`).
    pub(super) kernels: Option<Arc<dyn KernelDevice>>,
    /// Cleared when a weight has a type (or the block an operation) the
    /// backend's own kernels lack: a host or device slice is then loaded
    /// for candle instead.
    pub(super) all_kernels: bool,
}

impl Loader<'_> {
    pub fn config(&self) -> &Config {
        self.config
    }

    /// The block's index in the whole model.
    pub fn layer(&self) -> usize {
        self.layer
    }

    /// A one-line error naming the model file.
    pub fn bad(&self, reason: impl Into<String>) -> Error {
        Error::bad_model(self.file.path(), reason.into())
    }

    /// Whether the block has tensor `name` (`attn_q.bias`).
    pub fn has(&self, name: &str) -> bool {
        self.file.has(name, Some(self.layer))
    }

    /// An integer hyper-parameter: `{arch}.{gguf_key}` in GGUF metadata, `hf_key` in `config.json`.
    pub fn param_usize(&self, gguf_key: &str, hf_key: &str) -> Option<usize> {
        self.file.param(gguf_key, hf_key).filter(|v| *v >= 0.0 && v.fract() == 0.0).map(|v| v as usize)
    }

    pub fn param_f32(&self, gguf_key: &str, hf_key: &str) -> Option<f32> {
        self.file.param(gguf_key, hf_key).map(|v| v as f32)
    }

    fn weight(&mut self, name: &str, shape: &[usize]) -> Result<RawWeight> {
        let layer = Some(self.layer);
        let w = match self.backend {
            // A matrix for our kernels goes straight into their buffer.
            Backend::Host if shape.len() == 2 => match self.file.read_matrix(name, layer)? {
                Some(m) => RawWeight::Host(m),
                None => {
                    self.all_kernels = false;
                    self.file.read(name, layer, self.device)?
                }
            },
            // Read to the host, from where the device kernels' copy is made.
            Backend::Device => self.file.read(name, layer, &Device::Cpu)?,
            _ => self.file.read(name, layer, self.device)?.dequantized_if(self.exact)?,
        };
        let dims = w.dims();
        if dims != shape {
            return Err(Error::bad_model(
                self.file.path(),
                format!("block {} tensor {name} has shape {dims:?}, the config implies {shape:?}", self.layer),
            ));
        }
        Ok(w)
    }

    /// `[rows, cols]` weight `name` as a linear layer without bias.
    pub fn linear(&mut self, name: &str, rows: usize, cols: usize) -> Result<Linear> {
        let w = self.weight(name, &[rows, cols])?;
        self.linear_of(w, None)
    }

    /// `[rows, cols]` weight `{base}.weight`, with the bias `{base}.bias` where the file has one.
    pub fn linear_biased(&mut self, base: &str, rows: usize, cols: usize) -> Result<Linear> {
        let w = self.weight(&format!("{base}.weight"), &[rows, cols])?;
        let bias = format!("{base}.bias");
        let b = if self.has(&bias) { Some(self.weight(&bias, &[rows])?.to_f32()?) } else { None };
        self.linear_of(w, b)
    }

    /// LayerNorm `{base}.weight` and `{base}.bias` of `len` values.
    pub fn layer_norm(&mut self, base: &str, len: usize) -> Result<Norm> {
        let (w, b) = (self.weight(&format!("{base}.weight"), &[len])?, self.weight(&format!("{base}.bias"), &[len])?);
        // The device kernels have RMSNorm only.
        self.all_kernels &= self.backend != Backend::Device;
        Norm::layer(&w, &b, self.config.rms_norm_eps)
    }

    fn linear_of(&mut self, w: RawWeight, bias: Option<candle_core::Tensor>) -> Result<Linear> {
        if let Some(kd) = &self.kernels {
            if let Some(l) = Linear::on_device(&w, bias.as_ref(), &**kd)? {
                return Ok(l);
            }
            self.all_kernels = false;
            return Linear::new(w, bias, Backend::Candle);
        }
        let l = Linear::new(w, bias, self.backend)?;
        self.all_kernels &= self.backend != Backend::Host || l.host().is_some();
        Ok(l)
    }

    /// Projections of one input: separate layers on the device kernels (each
    /// product reads the input prepared once), as the backend stacks them otherwise.
    fn projections_of(&mut self, loaded: Vec<Part>) -> Result<Projections> {
        if self.backend == Backend::Device {
            return Ok(Projections::Separate(loaded.into_iter().map(|(w, b)| self.linear_of(w, b)).collect::<Result<_>>()?));
        }
        let p = Projections::new(loaded, self.backend)?;
        self.all_kernels &= self.backend != Backend::Host || p.separate().iter().all(|l| l.host().is_some());
        Ok(p)
    }

    /// Products of one input of width `cols`: `(weight name, rows)` each,
    /// with the bias `{name}.bias` where the file has one. Stacked into one
    /// product where the backend gains by it.
    pub fn projections(&mut self, parts: &[(&str, usize)], cols: usize) -> Result<Projections> {
        let mut loaded: Vec<Part> = Vec::with_capacity(parts.len());
        for &(name, rows) in parts {
            let w = self.weight(&format!("{name}.weight"), &[rows, cols])?;
            let bias = format!("{name}.bias");
            let b = if self.has(&bias) { Some(self.weight(&bias, &[rows])?.to_f32()?) } else { None };
            loaded.push((w, b));
        }
        self.projections_of(loaded)
    }

    /// Products of one input of width `cols` whose weights are one fused
    /// tensor `{name}.weight` (phi's `attn_qkv`, phi3's `ffn_up` holding gate
    /// and up), and its bias where the file has one: split by rows into
    /// `parts` (rows each), which then run as [`Self::projections`]' do.
    pub fn fused(&mut self, name: &str, parts: &[usize], cols: usize) -> Result<Projections> {
        let total = parts.iter().sum();
        let w = self.weight(&format!("{name}.weight"), &[total, cols])?;
        let bias = format!("{name}.bias");
        let b = if self.has(&bias) { Some(self.weight(&bias, &[total])?.to_f32()?) } else { None };
        let mut start = 0;
        let mut loaded: Vec<Part> = Vec::with_capacity(parts.len());
        for &rows in parts {
            loaded.push((w.rows(start, rows)?, b.as_ref().map(|b| b.narrow(0, start, rows)).transpose()?));
            start += rows;
        }
        self.projections_of(loaded)
    }

    /// The mixture of experts of the block, where it has one (a router
    /// `ffn_gate_inp`): `n` experts of `ffn` rows each, stored as 3-D
    /// tensors `ffn_{gate,up,down}_exps` (one matrix per expert, one after
    /// the other) or, in older files, as `ffn_{gate,up,down}.{i}`.
    pub fn experts(&mut self, hidden: usize, gate: Gate, norm_top_k: bool) -> Result<Option<Experts>> {
        if !self.has("ffn_gate_inp.weight") {
            return Ok(None);
        }
        // Mixtral's config.json counts them as num_local_experts.
        let n = self.param_usize("expert_count", "num_experts").or_else(|| self.param_usize("expert_count", "num_local_experts"));
        let n = n.filter(|&n| n > 0).ok_or_else(|| self.bad("experts without expert_count"))?;
        let top_k = self.param_usize("expert_used_count", "num_experts_per_tok").filter(|&k| (1..=n).contains(&k));
        let top_k = top_k.ok_or_else(|| self.bad(format!("expert_used_count must be 1..={n}")))?;
        let ffn = self.param_usize("expert_feed_forward_length", "moe_intermediate_size").unwrap_or(self.config.intermediate_size);
        let router = self.linear("ffn_gate_inp.weight", n, hidden)?;
        let merged = self.has("ffn_gate_exps.weight");
        let part = |l: &mut Self, base: &str, rows: usize, cols: usize| -> Result<Vec<Linear>> {
            if !merged {
                return (0..n).map(|i| l.linear(&format!("{base}.{i}.weight"), rows, cols)).collect();
            }
            let name = format!("{base}_exps.weight");
            let w = match l.backend {
                Backend::Host => match l.file.read_matrix(&name, Some(l.layer))? {
                    Some(m) => RawWeight::Host(m),
                    None => {
                        l.all_kernels = false;
                        l.file.read(&name, Some(l.layer), l.device)?
                    }
                },
                Backend::Device => l.file.read(&name, Some(l.layer), &Device::Cpu)?,
                Backend::Candle => l.file.read(&name, Some(l.layer), l.device)?.dequantized_if(l.exact)?,
            };
            let (dims, flat) = (w.dims(), [n * rows, cols]);
            if dims != [n, rows, cols] && dims != flat {
                return Err(l.bad(format!("block {} tensor {name} has shape {dims:?}, the config implies {:?}", l.layer, [n, rows, cols])));
            }
            (0..n).map(|i| l.linear_of(w.rows(i * rows, rows)?, None)).collect()
        };
        let gates = part(self, "ffn_gate", ffn, hidden)?;
        let ups = part(self, "ffn_up", ffn, hidden)?;
        let downs = part(self, "ffn_down", hidden, ffn)?;
        let experts = gates.into_iter().zip(ups).zip(downs).map(|((gate, up), down)| Expert { gate, up, down }).collect();
        Ok(Some(Experts { router, experts, top_k, norm_top_k, gate }))
    }

    /// RMSNorm weight `name` of `len` values, with the architecture's offset
    /// for HF checkpoints (gemma stores `w - 1`; its GGUF files store `w`).
    pub fn rms_norm(&mut self, name: &str, len: usize) -> Result<Norm> {
        let w = self.weight(name, &[len])?;
        let offset = if matches!(self.file, ModelFile::Safetensors(_)) { self.config.arch.hf_norm_offset } else { 0.0 };
        Norm::rms(&w, offset, self.config.rms_norm_eps)
    }

    /// Rotary tables for `spec`, built once per slice.
    pub fn rope(&mut self, spec: RopeSpec) -> Result<Arc<Rope>> {
        if let Some(r) = self.ropes.iter().find(|r| *r.spec() == spec) {
            return Ok(r.clone());
        }
        let r = Arc::new(Rope::new(spec, self.backend, self.device)?);
        self.ropes.push(r.clone());
        Ok(r)
    }

    /// The model's own rotary tables (its base, scaling and pairing).
    pub fn model_rope(&mut self) -> Result<Arc<Rope>> {
        let c = self.config;
        self.rope(RopeSpec {
            head_dim: c.head_dim,
            rot_dim: c.rope_dim,
            theta: c.rope_theta,
            freq_factors: c.rope_freq_factors.clone(),
            attn_factor: c.rope_attn_factor,
            style: c.rope_style,
            context: c.context_length,
        })
    }
}
