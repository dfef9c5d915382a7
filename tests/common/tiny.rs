//! Tiny random models written by the tests themselves: GGUF (llama or qwen2,
//! any quantization candle can write) and HF safetensors directories.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

#[derive(Clone, Copy)]
pub struct TinySpec {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub context: usize,
    pub seed: u64,
    /// A mixture of `experts` MLPs (0: one dense MLP), `top_k` per token.
    pub experts: usize,
    pub top_k: usize,
    /// Experts as 3-D `ffn_*_exps` tensors (llama.cpp's layout since 2024),
    /// else as `ffn_*.{i}` matrices (older Mixtral files, candle-transformers' reader).
    pub merged_experts: bool,
    /// The sliding window of gemma3's local blocks and phi3's.
    pub window: usize,
    /// phi3 with LongRoPE factors, trained for this context (0: none). A
    /// `context` past it selects the long factors, else the short ones.
    pub trained_context: usize,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            layers: 3,
            hidden: 64,
            heads: 4,
            kv_heads: 2,
            ffn: 128,
            vocab: 96,
            context: 64,
            seed: 1,
            experts: 0,
            top_k: 0,
            merged_experts: true,
            window: TINY_WINDOW,
            trained_context: 0,
        }
    }
}

/// A deterministic generator, so a failing case can be reproduced from its seed.
pub struct Lcg(u64);

impl Lcg {
    pub fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    pub fn tensor(&mut self, shape: &[usize], scale: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.next_f32() * scale).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }
}

/// The tensors of a tiny `arch` model by GGUF name, f32: llama and qwen2
/// (q/k/v biases), qwen3 (per-head q/k norms), gemma3 (per-head norms, norms
/// after attention and MLP, tied embeddings), phi3 (fused qkv and gate-up),
/// phi2 (LayerNorms and products with biases). Norm weights are the factors
/// applied (what GGUF stores; gemma's HF files store them minus one).
pub fn random_weights(spec: &TinySpec, arch: &str) -> Vec<(String, Tensor)> {
    let mut rng = Lcg(spec.seed);
    let hd = spec.hidden / spec.heads;
    let (h, q, kv, f) = (spec.hidden, spec.heads * hd, spec.kv_heads * hd, spec.ffn);
    let mut out = vec![("token_embd.weight".to_string(), rng.tensor(&[spec.vocab, h], 1.0))];
    let norm = |rng: &mut Lcg, n: usize| (rng.tensor(&[n], 0.2) + 1.0).unwrap();
    let bias = |rng: &mut Lcg, n: usize| rng.tensor(&[n], 0.2);
    if arch == "phi2" {
        // LayerNorms with biases, biased products, parallel attention and MLP.
        for i in 0..spec.layers {
            let p = format!("blk.{i}.");
            out.push((format!("{p}attn_norm.weight"), norm(&mut rng, h)));
            out.push((format!("{p}attn_norm.bias"), bias(&mut rng, h)));
            out.push((format!("{p}attn_qkv.weight"), rng.tensor(&[q + 2 * kv, h], 0.3)));
            out.push((format!("{p}attn_qkv.bias"), bias(&mut rng, q + 2 * kv)));
            out.push((format!("{p}attn_output.weight"), rng.tensor(&[h, q], 0.2)));
            out.push((format!("{p}attn_output.bias"), bias(&mut rng, h)));
            out.push((format!("{p}ffn_up.weight"), rng.tensor(&[f, h], 0.3)));
            out.push((format!("{p}ffn_up.bias"), bias(&mut rng, f)));
            out.push((format!("{p}ffn_down.weight"), rng.tensor(&[h, f], 0.2)));
            out.push((format!("{p}ffn_down.bias"), bias(&mut rng, h)));
        }
        out.push(("output_norm.weight".to_string(), norm(&mut rng, h)));
        out.push(("output_norm.bias".to_string(), bias(&mut rng, h)));
        out.push(("output.weight".to_string(), rng.tensor(&[spec.vocab, h], 0.5)));
        out.push(("output.bias".to_string(), bias(&mut rng, spec.vocab)));
        return out;
    }
    for i in 0..spec.layers {
        let p = format!("blk.{i}.");
        out.push((format!("{p}attn_norm.weight"), norm(&mut rng, h)));
        if arch == "phi3" {
            out.push((format!("{p}attn_qkv.weight"), rng.tensor(&[q + 2 * kv, h], 0.3)));
        } else {
            out.push((format!("{p}attn_q.weight"), rng.tensor(&[q, h], 0.3)));
            out.push((format!("{p}attn_k.weight"), rng.tensor(&[kv, h], 0.3)));
            out.push((format!("{p}attn_v.weight"), rng.tensor(&[kv, h], 0.3)));
        }
        if arch == "qwen2" {
            out.push((format!("{p}attn_q.bias"), rng.tensor(&[q], 0.5)));
            out.push((format!("{p}attn_k.bias"), rng.tensor(&[kv], 0.5)));
            out.push((format!("{p}attn_v.bias"), rng.tensor(&[kv], 0.5)));
        }
        if arch == "qwen3" || arch == "qwen3moe" || arch == "gemma3" {
            out.push((format!("{p}attn_q_norm.weight"), norm(&mut rng, hd)));
            out.push((format!("{p}attn_k_norm.weight"), norm(&mut rng, hd)));
        }
        out.push((format!("{p}attn_output.weight"), rng.tensor(&[h, q], 0.2)));
        if arch == "gemma3" {
            out.push((format!("{p}post_attention_norm.weight"), norm(&mut rng, h)));
            out.push((format!("{p}post_ffw_norm.weight"), norm(&mut rng, h)));
        }
        out.push((format!("{p}ffn_norm.weight"), norm(&mut rng, h)));
        if arch == "phi3" {
            // Gate and up in one tensor, gate first.
            out.push((format!("{p}ffn_up.weight"), rng.tensor(&[2 * f, h], 0.3)));
        } else if spec.experts > 0 {
            let e = spec.experts;
            out.push((format!("{p}ffn_gate_inp.weight"), rng.tensor(&[e, h], 1.0)));
            for (base, rows, cols, scale) in [("ffn_gate", f, h, 0.3), ("ffn_up", f, h, 0.3), ("ffn_down", h, f, 0.2)] {
                if spec.merged_experts {
                    out.push((format!("{p}{base}_exps.weight"), rng.tensor(&[e, rows, cols], scale)));
                } else {
                    (0..e).for_each(|i| out.push((format!("{p}{base}.{i}.weight"), rng.tensor(&[rows, cols], scale))));
                }
            }
            continue;
        } else {
            out.push((format!("{p}ffn_gate.weight"), rng.tensor(&[f, h], 0.3)));
            out.push((format!("{p}ffn_up.weight"), rng.tensor(&[f, h], 0.3)));
        }
        out.push((format!("{p}ffn_down.weight"), rng.tensor(&[h, f], 0.2)));
    }
    out.push(("output_norm.weight".to_string(), norm(&mut rng, h)));
    if arch != "gemma3" {
        out.push(("output.weight".to_string(), rng.tensor(&[spec.vocab, h], 0.5)));
    }
    out
}

/// LongRoPE's long and short per-pair factors of a tiny phi3 (far apart,
/// so that using the wrong set shows), and the attention factor llama.cpp's
/// converter writes for them.
pub fn longrope(spec: &TinySpec) -> (Vec<f32>, Vec<f32>, f32) {
    let pairs = spec.hidden / spec.heads / 2;
    let long = (0..pairs).map(|i| 1.0 + 0.75 * i as f32).collect();
    let short = (0..pairs).map(|i| 1.0 + 0.1 * i as f32).collect();
    let (ctx, trained) = (spec.context as f64, spec.trained_context as f64);
    let attn = if ctx > trained { (1.0 + (ctx / trained).ln() / trained.ln()).sqrt() } else { 1.0 };
    (long, short, attn as f32)
}

/// The HF tensors of GGUF tensor `gguf` of model type `model_type`: renamed,
/// and where HF keeps apart what GGUF stacks (phi's Q/K/V, the experts of
/// Mixtral and Qwen3-MoE), split.
fn hf_tensors(gguf: &str, t: Tensor, model_type: &str, spec: &TinySpec) -> Vec<(String, Tensor)> {
    let phi = model_type == "phi";
    let top = [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", if phi { "model.final_layernorm.weight" } else { "model.norm.weight" }),
        ("output_norm.bias", "model.final_layernorm.bias"),
        ("output.weight", "lm_head.weight"),
        ("output.bias", "lm_head.bias"),
    ];
    if let Some((_, h)) = top.iter().find(|(g, _)| *g == gguf) {
        return vec![(h.to_string(), t)];
    }
    let rest = gguf.strip_prefix("blk.").unwrap();
    let (i, role) = rest.split_once('.').unwrap();
    let (base, suffix) = role.rsplit_once('.').unwrap();
    let layer = |name: &str| format!("model.layers.{i}.{name}.{suffix}");
    let hd = spec.hidden / spec.heads;
    match (base, model_type) {
        ("attn_qkv", "phi") => {
            let (q, kv) = (spec.heads * hd, spec.kv_heads * hd);
            let part = |start, len| t.narrow(0, start, len).unwrap();
            return vec![
                (layer("self_attn.q_proj"), part(0, q)),
                (layer("self_attn.k_proj"), part(q, kv)),
                (layer("self_attn.v_proj"), part(q + kv, kv)),
            ];
        }
        ("ffn_gate_inp", "mixtral") => return vec![(layer("block_sparse_moe.gate"), t)],
        ("ffn_gate_inp", _) => return vec![(layer("mlp.gate"), t)],
        (exps, _) if exps.ends_with("_exps") => {
            let names: [&str; 3] = if model_type == "mixtral" { ["w1", "w3", "w2"] } else { ["gate_proj", "up_proj", "down_proj"] };
            let prefix = if model_type == "mixtral" { "block_sparse_moe.experts" } else { "mlp.experts" };
            let part = ["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"].iter().position(|b| *b == exps).unwrap();
            return (0..t.dim(0).unwrap()).map(|e| (layer(&format!("{prefix}.{e}.{}", names[part])), t.get(e).unwrap())).collect();
        }
        _ => {}
    }
    let hf = match (base, gguf_arch(model_type)) {
        ("attn_output", "phi2") => "self_attn.dense",
        ("ffn_up", "phi2") => "mlp.fc1",
        ("ffn_down", "phi2") => "mlp.fc2",
        ("ffn_norm", "gemma3") => "pre_feedforward_layernorm",
        ("post_attention_norm", _) => "post_attention_layernorm",
        ("post_ffw_norm", _) => "post_feedforward_layernorm",
        ("attn_norm", _) => "input_layernorm",
        ("attn_qkv", _) => "self_attn.qkv_proj",
        ("ffn_up", "phi3") => "mlp.gate_up_proj",
        ("attn_q", _) => "self_attn.q_proj",
        ("attn_k", _) => "self_attn.k_proj",
        ("attn_v", _) => "self_attn.v_proj",
        ("attn_output", _) => "self_attn.o_proj",
        ("attn_q_norm", _) => "self_attn.q_norm",
        ("attn_k_norm", _) => "self_attn.k_norm",
        ("ffn_norm", _) => "post_attention_layernorm",
        ("ffn_gate", _) => "mlp.gate_proj",
        ("ffn_up", _) => "mlp.up_proj",
        ("ffn_down", _) => "mlp.down_proj",
        (other, _) => panic!("no HF name for {other}"),
    };
    vec![(layer(hf), t)]
}

/// Sliding window of the tiny gemma3 models: shorter than the test sequences, so it matters.
pub const TINY_WINDOW: usize = 3;

/// A byte-level vocabulary of the printable ASCII characters, so prompts in
/// plain English tokenize (one token per character).
pub fn tiny_vocab(vocab: usize) -> Vec<String> {
    let mut tokens = vec!["<|endoftext|>".to_string(), "\u{120}".to_string()]; // "Ġ" is the byte-level space
    tokens.extend((b'!'..=b'~').map(|c| (c as char).to_string()));
    tokens.resize_with(vocab, || "<unused>".to_string());
    for (i, t) in tokens.iter_mut().enumerate().skip(96) {
        *t = format!("<unused{i}>");
    }
    tokens
}

/// Writes a GGUF file; `dtype` applies to the 2-D weights, norms and biases stay f32.
/// `skip` leaves tensors out (to test missing-tensor errors).
pub fn write_gguf(path: &Path, spec: &TinySpec, arch: &str, dtype: GgmlDType, skip: &[&str]) {
    let weights = random_weights(spec, arch);
    let mut qtensors: Vec<(String, QTensor)> = Vec::new();
    for (g, t) in weights {
        if skip.contains(&g.as_str()) {
            continue;
        }
        // Matrices (and stacks of experts') in `dtype`; norms, biases and the
        // router in f32, as llama.cpp's quantizer leaves them.
        let dt = if t.rank() >= 2 && !g.ends_with("ffn_gate_inp.weight") { dtype } else { GgmlDType::F32 };
        qtensors.push((g, QTensor::quantize(&t, dt).unwrap()));
    }
    let tokens = tiny_vocab(spec.vocab);
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (format!("{arch}.block_count"), Value::U32(spec.layers as u32)),
        (format!("{arch}.embedding_length"), Value::U32(spec.hidden as u32)),
        (format!("{arch}.feed_forward_length"), Value::U32(spec.ffn as u32)),
        (format!("{arch}.attention.head_count"), Value::U32(spec.heads as u32)),
        (format!("{arch}.attention.head_count_kv"), Value::U32(spec.kv_heads as u32)),
        (format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        (format!("{arch}.rope.freq_base"), Value::F32(10000.0)),
        (format!("{arch}.context_length"), Value::U32(spec.context as u32)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("default".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens.into_iter().map(Value::String).collect())),
        ("tokenizer.ggml.merges".into(), Value::Array(vec![])),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(0)),
        (format!("{arch}.attention.key_length"), Value::U32((spec.hidden / spec.heads) as u32)),
        // phi2 rotates half of each head.
        (format!("{arch}.rope.dimension_count"), Value::U32((spec.hidden / spec.heads / if arch == "phi2" { 2 } else { 1 }) as u32)),
    ];
    if arch == "phi2" {
        md.push((format!("{arch}.attention.layer_norm_epsilon"), Value::F32(1e-5)));
    }
    if spec.experts > 0 {
        md.push((format!("{arch}.expert_count"), Value::U32(spec.experts as u32)));
        md.push((format!("{arch}.expert_used_count"), Value::U32(spec.top_k as u32)));
    }
    // llama.cpp writes Qwen3-MoE's expert width apart from the dense one.
    if arch == "qwen3moe" {
        md.push((format!("{arch}.expert_feed_forward_length"), Value::U32(spec.ffn as u32)));
    }
    if arch == "gemma3" || arch == "phi3" {
        md.push((format!("{arch}.attention.sliding_window"), Value::U32(spec.window as u32)));
    }
    if arch == "gemma3" {
        md.push((format!("{arch}.attention.value_length"), Value::U32((spec.hidden / spec.heads) as u32)));
    }
    if spec.trained_context > 0 {
        let (long, short, attn) = longrope(spec);
        let n = long.len();
        for (name, v) in [("rope_factors_long.weight", long), ("rope_factors_short.weight", short)] {
            qtensors.push((name.into(), QTensor::quantize(&Tensor::from_vec(v, n, &Device::Cpu).unwrap(), GgmlDType::F32).unwrap()));
        }
        md.push((format!("{arch}.rope.scaling.original_context_length"), Value::U32(spec.trained_context as u32)));
        md.push((format!("{arch}.rope.scaling.attn_factor"), Value::F32(attn)));
    }
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}

/// The GGUF architecture of HF model type `model_type`.
pub fn gguf_arch(model_type: &str) -> &str {
    match model_type {
        "gemma3_text" => "gemma3",
        "phi" => "phi2",
        "qwen3_moe" => "qwen3moe",
        "mixtral" => "llama",
        other => other,
    }
}

/// Writes an HF directory (config.json + model.safetensors) of `dtype` weights.
pub fn write_hf_dir(dir: &Path, spec: &TinySpec, model_type: &str, dtype: DType) {
    std::fs::create_dir_all(dir).unwrap();
    let arch = gguf_arch(model_type);
    let weights: HashMap<String, Tensor> = random_weights(spec, arch)
        .into_iter()
        .flat_map(|(k, v)| {
            // Gemma3RMSNorm multiplies by 1 + w: its checkpoints store w.
            let v = if arch == "gemma3" && k.ends_with("norm.weight") { (v - 1.0).unwrap() } else { v };
            hf_tensors(&k, v, model_type, spec)
        })
        .map(|(k, v)| (k, v.to_dtype(dtype).unwrap()))
        .collect();
    candle_core::safetensors::save(&weights, dir.join("model.safetensors")).unwrap();
    let mut config = serde_json::json!({
        "model_type": model_type,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.ffn,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "vocab_size": spec.vocab,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": spec.context,
        "tie_word_embeddings": arch == "gemma3",
        "head_dim": spec.hidden / spec.heads,
        "sliding_window": spec.window,
    });
    let c = config.as_object_mut().unwrap();
    if spec.experts > 0 {
        c.insert((if model_type == "mixtral" { "num_local_experts" } else { "num_experts" }).into(), spec.experts.into());
        c.insert("num_experts_per_tok".into(), spec.top_k.into());
        c.insert("moe_intermediate_size".into(), spec.ffn.into());
        c.insert("norm_topk_prob".into(), true.into());
    }
    if arch == "phi2" {
        // phi: LayerNorm's epsilon, half of each head rotating, no grouped heads.
        c.remove("rms_norm_eps");
        c.insert("layer_norm_eps".into(), 1e-5.into());
        c.insert("partial_rotary_factor".into(), 0.5.into());
    }
    if spec.trained_context > 0 {
        let (long, short, _) = longrope(spec);
        c.insert("original_max_position_embeddings".into(), spec.trained_context.into());
        c.insert("rope_scaling".into(), serde_json::json!({"type": "longrope", "long_factor": long, "short_factor": short}));
    }
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();
}
