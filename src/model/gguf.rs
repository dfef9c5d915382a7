//! GGUF files: the header, the tensor table, and reading one tensor at a time.
//!
//! Only the header and tensor table are read up front; a slice then reads the
//! tensors it owns and nothing else, so a node holding layers 10..20 never
//! touches the bytes of the other blocks.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::Device;
use sha2::{Digest, Sha256};

use super::arch;
use super::config::Config;
use super::weights::RawWeight;
use crate::error::{first_line, Error, Result};
use crate::kernels::QMatrix;

pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: BufReader<File>,
}

/// The GGUF name of tensor `name` (`attn_q.weight`) of block `layer`, or a
/// model-level one (`token_embd.weight`) with no layer.
fn tensor_name(name: &str, layer: Option<usize>) -> String {
    match layer {
        Some(i) => format!("blk.{i}.{name}"),
        None => name.to_string(),
    }
}

/// ggml's names of the tensor types candle cannot read, for error messages.
fn ggml_type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        4 | 5 => "Q4_2/Q4_3 (removed from ggml)",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return None,
    })
}

/// Bytes a tensor occupies in the file (and in memory, since it stays
/// quantized); [`GgufFile::open`] checked that this fits the file.
pub fn tensor_bytes(info: &TensorInfo) -> u64 {
    let dtype = info.ggml_dtype;
    (info.shape.elem_count() / dtype.block_size() * dtype.type_size()) as u64
}

impl GgufFile {
    /// Reads and checks the header: every tensor must lie inside the file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
        let file_len = file.metadata().map_err(|e| Error::io(format!("cannot stat {}", path.display()), e))?.len();
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| {
            let msg = first_line(&e);
            let reason = if let Some(id) = msg.strip_prefix("unknown dtype for tensor ") {
                let name = id.trim().parse().ok().and_then(ggml_type_name).unwrap_or("unknown");
                format!(
                    "tensor type {} ({name}) is not supported; supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q8_K",
                    id.trim()
                )
            } else if msg.contains("magic") {
                format!("not a GGUF file ({msg})")
            } else if msg.contains("failed to fill whole buffer") || msg.contains("UnexpectedEof") {
                "truncated GGUF: the file ends inside its header".to_string()
            } else {
                msg
            };
            Error::bad_model(path, reason)
        })?;
        for (name, info) in content.tensor_infos.iter() {
            let block = info.ggml_dtype.block_size();
            // Dimensions come from the file: their product must not wrap
            // before it is compared with the file's length.
            let elements = info.shape.dims().iter().try_fold(1usize, |n, &d| n.checked_mul(d));
            let bytes = elements.and_then(|n| (n / block).checked_mul(info.ggml_dtype.type_size()));
            let end = bytes.and_then(|b| content.tensor_data_offset.checked_add(info.offset)?.checked_add(b as u64));
            let Some(end) = end else {
                return Err(Error::bad_model(path, format!("tensor '{name}' of shape {:?} is larger than any file", info.shape.dims())));
            };
            if info.shape.elem_count() % block != 0 {
                return Err(Error::bad_model(
                    path,
                    format!(
                        "tensor '{name}' has {} elements, not a multiple of its {:?} block size {block}",
                        info.shape.elem_count(),
                        info.ggml_dtype
                    ),
                ));
            }
            if end > file_len {
                return Err(Error::bad_model(
                    path,
                    format!("truncated GGUF: tensor '{name}' ends at byte {end} but the file has {file_len} bytes"),
                ));
            }
        }
        Ok(Self { path: path.to_path_buf(), content, reader })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    pub fn tensor_infos(&self) -> &HashMap<String, TensorInfo> {
        &self.content.tensor_infos
    }

    pub fn config(&self) -> Result<Config> {
        let bad = |reason: String| Error::bad_model(&self.path, reason);
        let arch_name = self.metadata_str("general.architecture").ok_or_else(|| bad("missing general.architecture".into()))?;
        let arch = arch::by_gguf_name(arch_name)?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let required = |k: &str| -> Result<usize> {
            self.metadata_u64(&key(k)).map(|v| v as usize).ok_or_else(|| bad(format!("missing metadata {}", key(k))))
        };
        let n_heads = required("attention.head_count")?;
        let hidden_size = required("embedding_length")?;
        let n_kv_heads = self.metadata_u64(&key("attention.head_count_kv")).map_or(n_heads, |v| v as usize);
        let head_dim = self.metadata_u64(&key("attention.key_length")).map_or(hidden_size / n_heads.max(1), |v| v as usize);
        let embed = self.content.tensor_infos.get(super::EMBED).ok_or_else(|| bad("missing tensor token_embd.weight".into()))?;
        let vocab_size = embed.shape.dims()[0];
        let rope_dim = self.metadata_u64(&key("rope.dimension_count")).map_or(head_dim, |v| v as usize);
        let context_length = self.metadata_u64(&key("context_length")).map_or(2048, |v| v as usize);
        let has = |name: &str| self.content.tensor_infos.contains_key(name);
        let rope_freq_factors = match () {
            _ if has("rope_freqs.weight") => Some(self.read_dense_f32("rope_freqs.weight")?),
            // Phi-3 long-context files carry two sets: the long ones serve a
            // context past the trained one, which sollol's always is when the
            // file declares it (llama.cpp chooses the same way by its context).
            _ if has("rope_factors_long.weight") => {
                let trained = self.metadata_u64(&key("rope.scaling.original_context_length")).map_or(context_length, |v| v as usize);
                Some(self.read_dense_f32(if context_length > trained {
                    "rope_factors_long.weight"
                } else {
                    "rope_factors_short.weight"
                })?)
            }
            // Linear scaling divides every frequency by the factor (gemma3 4B+).
            _ if self.metadata_str(&key("rope.scaling.type")) == Some("linear") => {
                self.metadata_f64(&key("rope.scaling.factor")).filter(|f| *f > 0.0).map(|f| vec![f as f32; rope_dim / 2])
            }
            _ => None,
        };
        let cfg = Config {
            arch,
            n_layers: required("block_count")?,
            hidden_size,
            intermediate_size: required("feed_forward_length")?,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab_size,
            // LayerNorm models (phi2) name their epsilon without "rms".
            rms_norm_eps: self
                .metadata_f64(&key("attention.layer_norm_rms_epsilon"))
                .or_else(|| self.metadata_f64(&key("attention.layer_norm_epsilon")))
                .unwrap_or(1e-5),
            rope_theta: self.metadata_f64(&key("rope.freq_base")).unwrap_or(10_000.0) as f32,
            rope_dim,
            rope_style: arch.gguf_rope,
            rope_freq_factors,
            rope_attn_factor: self.metadata_f64(&key("rope.scaling.attn_factor")).unwrap_or(1.0) as f32,
            context_length,
            pooling: self.metadata_u64(&key("pooling_type")).map_or_else(Default::default, super::Pooling::from_gguf),
        };
        cfg.validate().map_err(bad)?;
        Ok(cfg)
    }

    pub fn has(&self, name: &str, layer: Option<usize>) -> bool {
        self.content.tensor_infos.contains_key(&tensor_name(name, layer))
    }

    /// Metadata `{architecture}.{key}` as a number.
    pub fn param(&self, key: &str) -> Option<f64> {
        let arch = self.metadata_str("general.architecture")?;
        self.metadata_f64(&format!("{arch}.{key}"))
    }

    /// Reads one tensor, kept in its stored (possibly quantized) type.
    pub fn read(&mut self, name: &str, layer: Option<usize>, device: &Device) -> Result<RawWeight> {
        let name = tensor_name(name, layer);
        if !self.content.tensor_infos.contains_key(&name) {
            return Err(Error::bad_model(&self.path, format!("missing tensor '{name}'")));
        }
        let q = self
            .content
            .tensor(&mut self.reader, &name, device)
            .map_err(|e| Error::bad_model(&self.path, format!("cannot read tensor '{name}': {}", first_line(&e))))?;
        Ok(RawWeight::Quantized(Arc::new(q)))
    }

    /// Reads a 2-D tensor straight into a [`QMatrix`] for the CPU path (no
    /// candle tensor in between, so the weight is in memory once); `None`
    /// for a type our kernels do not take.
    pub fn read_matrix(&mut self, name: &str, layer: Option<usize>) -> Result<Option<QMatrix>> {
        let name = tensor_name(name, layer);
        let info = self.content.tensor_infos.get(&name).ok_or_else(|| Error::bad_model(&self.path, format!("missing tensor '{name}'")))?;
        // A 3-D stack of matrices (experts) is read as their rows one after the other.
        let (rows, cols) = match *info.shape.dims() {
            [rows, cols] => (rows, cols),
            [n, rows, cols] => (n * rows, cols),
            _ => return Ok(None),
        };
        let (dtype, at) = (info.ggml_dtype, self.content.tensor_data_offset + info.offset);
        let read = |r: &mut BufReader<File>| -> std::io::Result<Option<QMatrix>> {
            r.seek(SeekFrom::Start(at))?;
            QMatrix::read_from(dtype, rows, cols, r)
        };
        read(&mut self.reader).map_err(|e| Error::bad_model(&self.path, format!("cannot read tensor '{name}': {e}")))
    }

    fn read_dense_f32(&self, name: &str) -> Result<Vec<f32>> {
        let mut reader = BufReader::new(File::open(&self.path).map_err(|e| Error::io(format!("cannot open {}", self.path.display()), e))?);
        let q = self
            .content
            .tensor(&mut reader, name, &Device::Cpu)
            .map_err(|e| Error::bad_model(&self.path, format!("cannot read tensor '{name}': {}", first_line(&e))))?;
        Ok(q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
    }

    /// Bytes of each block's tensors, in block order, plus the embedding and the
    /// output head (norm + LM head; an untied head is counted on its own).
    pub fn layer_bytes(&self, n_layers: usize) -> LayerBytes {
        let mut blocks = vec![0u64; n_layers];
        let (mut embed, mut head, mut experts) = (0u64, 0u64, 0u64);
        for (name, info) in self.content.tensor_infos.iter() {
            let bytes = tensor_bytes(info);
            if let Some(rest) = name.strip_prefix("blk.") {
                if let Some(i) = rest.split('.').next().and_then(|i| i.parse::<usize>().ok()) {
                    if i < n_layers {
                        blocks[i] = blocks[i].saturating_add(bytes);
                        experts = if is_expert_tensor(rest) { experts.saturating_add(bytes) } else { experts };
                    }
                }
            } else if name == "token_embd.weight" {
                embed = bytes;
            } else if name.starts_with("output") {
                head = head.saturating_add(bytes);
            }
        }
        let tied = !self.content.tensor_infos.contains_key("output.weight");
        if tied {
            // Tied embeddings: the last stage holds the table again as its LM head.
            head += embed;
        }
        let routed = match (self.param("expert_used_count"), self.param("expert_count")) {
            (Some(k), Some(n)) if experts > 0 && k >= 1.0 && n >= k => Some((k as u32, n as u32)),
            _ => None,
        };
        LayerBytes { blocks, embed, head, tied, expert_bytes: experts, routed }
    }

    /// A digest of the header and tensor table: two nodes that report the same
    /// digest loaded the same model (the tensor data is covered by the offsets
    /// and shapes, and by the file's own checksum where the source has one).
    pub fn header_digest(&self) -> Result<String> {
        let mut f = File::open(&self.path).map_err(|e| Error::io(format!("cannot open {}", self.path.display()), e))?;
        f.seek(SeekFrom::Start(0)).map_err(|e| Error::io("seek", e))?;
        let mut header = vec![0u8; self.content.tensor_data_offset as usize];
        f.read_exact(&mut header).map_err(|e| Error::io("cannot read GGUF header", e))?;
        Ok(format!("{:x}", Sha256::digest(&header)))
    }

    pub fn metadata_str(&self, key: &str) -> Option<&str> {
        match self.content.metadata.get(key) {
            Some(Value::String(s)) => Some(s.as_str()),
            _ => None,
        }
    }

    pub fn metadata_u64(&self, key: &str) -> Option<u64> {
        self.content.metadata.get(key).and_then(value_u64)
    }

    pub fn metadata_f64(&self, key: &str) -> Option<f64> {
        match self.content.metadata.get(key)? {
            Value::F32(v) => Some(*v as f64),
            Value::F64(v) => Some(*v),
            v => value_u64(v).map(|v| v as f64),
        }
    }

    pub fn metadata_bool(&self, key: &str) -> Option<bool> {
        match self.content.metadata.get(key)? {
            Value::Bool(b) => Some(*b),
            v => value_u64(v).map(|v| v != 0),
        }
    }
}

/// Whether block tensor `name` (after `blk.N.`) is one of a mixture's
/// experts: `ffn_gate_exps.weight` or, in older files, `ffn_gate.3.weight`.
fn is_expert_tensor(name: &str) -> bool {
    let mut parts = name.split('.').skip(1);
    match (parts.next(), parts.next()) {
        (Some(base), Some(second)) => base.ends_with("_exps") || (base.starts_with("ffn_") && second.parse::<usize>().is_ok()),
        _ => false,
    }
}

/// Integer metadata of any width (files in the wild use u32, i32 and u64 for the same keys).
pub fn value_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x as u64),
        Value::U16(x) => Some(x as u64),
        Value::U32(x) => Some(x as u64),
        Value::U64(x) => Some(x),
        Value::I8(x) if x >= 0 => Some(x as u64),
        Value::I16(x) if x >= 0 => Some(x as u64),
        Value::I32(x) if x >= 0 => Some(x as u64),
        Value::I64(x) if x >= 0 => Some(x as u64),
        _ => None,
    }
}

/// Exact byte counts of a model's parts, the input of every partitioning strategy.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LayerBytes {
    pub blocks: Vec<u64>,
    pub embed: u64,
    /// Norm + LM head; with tied embeddings this includes the table.
    pub head: u64,
    /// The LM head is the embedding table: a stage holding both holds it once.
    pub tied: bool,
    /// Bytes of the blocks' experts (counted in `blocks` too: a stage holds them all).
    pub expert_bytes: u64,
    /// Experts a token runs, of how many (a mixture reads only those).
    pub routed: Option<(u32, u32)>,
}

impl LayerBytes {
    /// Blocks of these sizes and a head, no experts.
    pub fn dense(blocks: Vec<u64>, embed: u64, head: u64, tied: bool) -> Self {
        Self { blocks, embed, head, tied, expert_bytes: 0, routed: None }
    }

    /// Bytes of a stage holding blocks `r`, with the embedding on the first
    /// and the head on the last.
    pub fn stage(&self, r: &std::ops::Range<usize>) -> u64 {
        let n = self.blocks.len();
        let mut b: u64 = self.blocks[r.start.min(n)..r.end.min(n)].iter().sum();
        if r.start == 0 {
            b += self.embed;
        }
        if r.end == n {
            b += self.head;
            if self.tied && r.start == 0 {
                // One stage holds the tied table once.
                b -= self.embed;
            }
        }
        b
    }

    /// Bytes of the whole model on one node.
    pub fn total(&self) -> u64 {
        self.stage(&(0..self.blocks.len()))
    }

    /// Bytes one decode step reads: every block and the LM head (of the
    /// embedding table only the token's row; of a mixture only the experts
    /// a token runs, `k / n` of them on average).
    pub fn per_token(&self) -> u64 {
        let all = self.blocks.iter().sum::<u64>() + self.head;
        match self.routed {
            Some((k, n)) => all - self.expert_bytes + self.expert_bytes * u64::from(k) / u64::from(n),
            None => all,
        }
    }
}

/// The weight types a user can name (`q4_0`, `q5_k`, `f16`…), as llama.cpp spells them.
pub const WEIGHT_TYPE_NAMES: &str = "q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k, f16, f32";

/// The GGML type named `name` (any case), one of [`WEIGHT_TYPE_NAMES`].
pub fn weight_type_by_name(name: &str) -> Option<candle_core::quantized::GgmlDType> {
    use candle_core::quantized::GgmlDType as T;
    Some(match name.to_ascii_lowercase().as_str() {
        "q4_0" => T::Q4_0,
        "q4_1" => T::Q4_1,
        "q5_0" => T::Q5_0,
        "q5_1" => T::Q5_1,
        "q8_0" => T::Q8_0,
        "q2_k" => T::Q2K,
        "q3_k" => T::Q3K,
        "q4_k" => T::Q4K,
        "q5_k" => T::Q5K,
        "q6_k" => T::Q6K,
        "f16" => T::F16,
        "f32" => T::F32,
        _ => return None,
    })
}

/// What `sollol quantize` writes: one type for every matrix (`--pure`), or
/// llama.cpp's mixture for a target (`q4_0`, `q4_k_m`, …): the LM head (or
/// the tied embedding table) in Q6_K, and for the `_M` K-quant mixes the
/// value projections and FFN down projections of the first and last
/// eighths of the blocks and every third between them one step up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantTarget {
    pub base: candle_core::quantized::GgmlDType,
    /// `_M`: more bits where they count most.
    pub medium: bool,
    pub pure: bool,
}

impl QuantTarget {
    /// A target by llama.cpp's name (`q4_0`, `q4_k`, `q4_k_m`, `q5_k_m`, …).
    pub fn parse(name: &str, pure: bool) -> Option<Self> {
        let name = name.to_ascii_lowercase();
        let (base, medium) = match name.strip_suffix("_m") {
            Some(k) if k.ends_with("_k") => (k, true),
            _ => (name.as_str(), false),
        };
        Some(Self { base: weight_type_by_name(base)?, medium, pure })
    }

    /// The type of tensor `name` (`[.., cols]`), `None` to keep it as it is:
    /// 1-D tensors (norms, biases), a mixture's router.
    pub fn type_of(
        &self,
        name: &str,
        dims: &[usize],
        n_layers: usize,
        n_experts: usize,
        tied: bool,
    ) -> Option<candle_core::quantized::GgmlDType> {
        use candle_core::quantized::GgmlDType as T;
        if dims.len() < 2 || name.ends_with("ffn_gate_inp.weight") || !name.ends_with(".weight") {
            return None;
        }
        let mut t = self.base;
        if !self.pure {
            let layer = name.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|i| i.parse::<usize>().ok());
            // llama.cpp's use_more_bits: the first and last eighth, and every third block between.
            let more_bits =
                |i: usize| i < n_layers / 8 || i >= 7 * n_layers / 8 || (i as isize - (n_layers / 8) as isize).rem_euclid(3) == 2;
            let is_head = name == "output.weight" || (tied && name == "token_embd.weight");
            if is_head && t != T::Q8_0 && !matches!(t, T::F16 | T::F32) {
                t = T::Q6K;
            } else if name.ends_with("attn_v.weight") && n_experts == 8 {
                t = T::Q8_0;
            } else if let (Some(i), true) = (layer, self.medium) {
                if (name.ends_with("attn_v.weight") || name.contains("ffn_down")) && more_bits(i) {
                    t = T::Q6K;
                } else if name.ends_with("attn_qkv.weight") {
                    t = if t == T::Q4K { T::Q5K } else { T::Q6K };
                }
            }
        }
        // A row that the type's blocks do not divide falls back as llama.cpp's does.
        let cols = *dims.last()?;
        let fallback = |t: T| match t {
            T::Q2K | T::Q3K | T::Q4K => T::Q5_0,
            T::Q5K => T::Q5_1,
            T::Q6K => T::Q8_0,
            other => other,
        };
        let t = if cols % t.block_size() != 0 { fallback(t) } else { t };
        Some(if cols % t.block_size() != 0 { T::F16 } else { t })
    }
}

/// Writes `src` to `dst` with every weight matrix converted (through f32)
/// to the type `target` gives it; norms, biases and routers are copied as
/// they are. Returns (converted, kept) tensor counts.
pub fn requantize(src: &Path, dst: &Path, target: QuantTarget) -> Result<(usize, usize)> {
    use candle_core::quantized::{gguf_file, QTensor};
    let io = |what: &str, p: &Path| {
        let what = format!("{what} {}", p.display());
        move |source| Error::Io { context: what, source }
    };
    let opened = GgufFile::open(src)?;
    let n_layers = opened.config()?.n_layers;
    let n_experts = opened.param("expert_count").unwrap_or(0.0) as usize;
    let tied = !opened.has(super::OUTPUT, None);
    let mut reader = BufReader::new(File::open(src).map_err(io("opening", src))?);
    let content = Content::read(&mut reader).map_err(|e| Error::bad_model(src, first_line(&e)))?;
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(content.tensor_infos.len());
    let (mut converted, mut kept) = (0, 0);
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort_by_key(|n| content.tensor_infos[*n].offset);
    for name in names {
        let q = content.tensor(&mut reader, name, &Device::Cpu).map_err(|e| Error::bad_model(src, first_line(&e)))?;
        match target.type_of(name, q.shape().dims(), n_layers, n_experts, tied).filter(|t| *t != q.dtype()) {
            Some(t) => {
                let f = q.dequantize(&Device::Cpu)?;
                tensors.push((name.clone(), quantize(&f, t)?));
                converted += 1;
            }
            None => {
                tensors.push((name.clone(), q));
                kept += 1;
            }
        }
    }
    let mut out = std::io::BufWriter::new(File::create(dst).map_err(io("creating", dst))?);
    let metadata: Vec<(&str, &Value)> = content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    gguf_file::write(&mut out, &metadata, &refs)?;
    std::io::Write::flush(&mut out).map_err(io("writing", dst))?;
    Ok((converted, kept))
}

/// `f` in type `t`: Q4_K, Q5_K and Q6_K by llama.cpp's reference search
/// ([`super::kquants`]), the rest by candle's quantizers (which match
/// llama.cpp's for those types).
fn quantize(f: &candle_core::Tensor, t: candle_core::quantized::GgmlDType) -> Result<candle_core::quantized::QTensor> {
    use candle_core::quantized::{GgmlDType, QStorage, QTensor};
    let blocks = match t {
        GgmlDType::Q4K => super::kquants::quantize_q4k,
        GgmlDType::Q5K => super::kquants::quantize_q5k,
        GgmlDType::Q6K => super::kquants::quantize_q6k,
        _ => return Ok(QTensor::quantize(f, t)?),
    };
    let bytes = blocks(&f.flatten_all()?.to_vec1::<f32>()?);
    Ok(QTensor::new(QStorage::from_data(std::borrow::Cow::Owned(bytes), &Device::Cpu, t)?, f.shape())?)
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::GgmlDType as T;

    use super::QuantTarget;

    #[test]
    fn mixtures_follow_llama_quantize() {
        let m = QuantTarget::parse("q4_k_m", false).unwrap();
        let ty = |name: &str, cols: usize| m.type_of(name, &[64, cols], 30, 0, false);
        // 30 blocks: the first 3 and last 4, and every third between (5, 8, …), get more bits.
        assert_eq!(ty("blk.0.attn_v.weight", 1024), Some(T::Q6K));
        assert_eq!(ty("blk.4.attn_v.weight", 1024), Some(T::Q4K));
        assert_eq!(ty("blk.5.ffn_down.weight", 1024), Some(T::Q6K));
        assert_eq!(ty("blk.27.ffn_down.weight", 1024), Some(T::Q6K));
        assert_eq!(ty("blk.4.attn_q.weight", 1024), Some(T::Q4K));
        assert_eq!(ty("output.weight", 1024), Some(T::Q6K));
        // Rows that 256 does not divide (SmolLM2's 576) fall back as llama.cpp's do.
        assert_eq!(ty("blk.4.attn_q.weight", 576), Some(T::Q5_0));
        assert_eq!(ty("output.weight", 576), Some(T::Q8_0));
        // Norms, biases and a router stay as they are.
        assert_eq!(m.type_of("blk.0.attn_norm.weight", &[1024], 30, 0, false), None);
        assert_eq!(m.type_of("blk.0.ffn_gate_inp.weight", &[8, 1024], 30, 8, false), None);
        // A tied table is the LM head; eight experts' value projections go to Q8_0.
        let q4_0 = QuantTarget::parse("q4_0", false).unwrap();
        assert_eq!(q4_0.type_of("token_embd.weight", &[64, 1024], 30, 0, true), Some(T::Q6K));
        assert_eq!(q4_0.type_of("token_embd.weight", &[64, 1024], 30, 0, false), Some(T::Q4_0));
        assert_eq!(q4_0.type_of("blk.3.attn_v.weight", &[64, 1024], 30, 8, false), Some(T::Q8_0));
        // --pure: one type for every matrix.
        let pure = QuantTarget::parse("q4_0", true).unwrap();
        assert_eq!(pure.type_of("output.weight", &[64, 1024], 30, 0, false), Some(T::Q4_0));
        assert!(QuantTarget::parse("q9_9", false).is_none());
    }
}
