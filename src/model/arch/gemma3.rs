//! Gemma 3 (text): attention and MLP each wrapped in a norm before and a
//! norm after, RMSNorm over each query and key head, GeGLU (GELU, tanh
//! approximation), the embedding scaled by √hidden, and sliding-window
//! layers (local rotary base) interleaved with global ones (global base and
//! its scaling): every `pattern`-th block is global.
//!
//! Paper: <https://arxiv.org/abs/2503.19786>. Reference: HF
//! `modeling_gemma3.py` (`Gemma3DecoderLayer`, `Gemma3RMSNorm`: `x · (1 + w)`,
//! which llama.cpp's converter stores as `1 + w`); llama.cpp `LLM_ARCH_GEMMA3`.

use std::sync::Arc;

use super::llama::{three, two};
use super::Architecture;
use crate::error::Result;
use crate::model::loader::Loader;
use crate::model::ops::{Act, Attention, Block, Gate, Ops};
use crate::model::rope::RopeSpec;
use crate::model::rope::RopeStyle;
use crate::model::weights::{Linear, Norm, Projections};

pub const ARCH: Architecture = Architecture {
    name: "gemma3",
    gguf_names: &["gemma3"],
    hf_model_types: &["gemma3_text"],
    gguf_rope: RopeStyle::Half,
    hf_names: &[
        ("attn_q_norm.weight", "self_attn.q_norm.weight"),
        ("attn_k_norm.weight", "self_attn.k_norm.weight"),
        ("post_attention_norm.weight", "post_attention_layernorm.weight"),
        ("ffn_norm.weight", "pre_feedforward_layernorm.weight"),
        ("post_ffw_norm.weight", "post_feedforward_layernorm.weight"),
    ],
    hf_norm_offset: 1.0,
    embedding_scale: |hidden| Some((hidden as f32).sqrt()),
    chat_template: Some(CHAT_TEMPLATE),
    load_block: load,
};

/// Gemma 3's template (HF `tokenizer_config.json`, text turns only): a
/// system message is prefixed to the first user turn; the assistant is
/// `model`; turns end with `<end_of_turn>`.
const CHAT_TEMPLATE: &str = "{{ bos_token }}\
{%- if messages[0]['role'] == 'system' -%}\
{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}\
{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}\
{%- for message in loop_messages -%}\
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}\
{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}";

/// Every sixth block attends globally (not in the GGUF metadata; llama.cpp
/// and HF's `sliding_window_pattern` both say 6).
const PATTERN: usize = 6;
/// The local layers' rotary base (HF `rope_local_base_freq`).
const LOCAL_THETA: f32 = 10_000.0;

#[derive(Debug)]
struct Gemma3Block {
    attn_norm: Norm,
    qkv: Projections,
    /// Per-head q/k norms, the layer's window and rotary base.
    attn: Attention,
    o: Linear,
    post_attn_norm: Norm,
    ffn_norm: Norm,
    gate_up: Projections,
    down: Linear,
    post_ffn_norm: Norm,
}

fn load(l: &mut Loader) -> Result<Arc<dyn Block>> {
    let c = l.config().clone();
    let (h, hd, ffn) = (c.hidden_size, c.head_dim, c.intermediate_size);
    let (q_dim, kv_dim) = (c.n_heads * hd, c.n_kv_heads * hd);
    let pattern = l.param_usize("attention.sliding_window_pattern", "sliding_window_pattern").unwrap_or(PATTERN).max(1);
    let local = !(l.layer() + 1).is_multiple_of(pattern);
    let window = match l.param_usize("attention.sliding_window", "sliding_window") {
        Some(0) | None if local => return Err(l.bad("gemma3 without attention.sliding_window")),
        w => w.filter(|_| local),
    };
    let rope = if local {
        let theta = l.param_f32("rope.local_freq_base", "rope_local_base_freq").unwrap_or(LOCAL_THETA);
        l.rope(RopeSpec {
            head_dim: hd,
            rot_dim: hd,
            theta,
            freq_factors: None,
            attn_factor: 1.0,
            style: c.rope_style,
            context: c.context_length,
        })?
    } else {
        l.model_rope()?
    };
    // Scores are scaled by query_pre_attn_scalar^-½: the head size, but
    // hidden / heads for the 27B model (llama.cpp's rule; GGUF has no key).
    let score_dim = l.param_usize("attention.query_pre_attn_scalar", "query_pre_attn_scalar").unwrap_or(if c.n_layers == 62 {
        h / c.n_heads
    } else {
        hd
    });
    Ok(Arc::new(Gemma3Block {
        attn_norm: l.rms_norm("attn_norm.weight", h)?,
        qkv: l.projections(&[("attn_q", q_dim), ("attn_k", kv_dim), ("attn_v", kv_dim)], h)?,
        attn: Attention {
            q_norm: Some(l.rms_norm("attn_q_norm.weight", hd)?),
            k_norm: Some(l.rms_norm("attn_k_norm.weight", hd)?),
            score_dim,
            window,
            ..Attention::new(&c, rope)
        },
        o: l.linear("attn_output.weight", h, q_dim)?,
        post_attn_norm: l.rms_norm("post_attention_norm.weight", h)?,
        ffn_norm: l.rms_norm("ffn_norm.weight", h)?,
        gate_up: l.projections(&[("ffn_gate", ffn), ("ffn_up", ffn)], h)?,
        down: l.linear("ffn_down.weight", h, ffn)?,
        post_ffn_norm: l.rms_norm("post_ffw_norm.weight", h)?,
    }))
}

impl Block for Gemma3Block {
    fn forward(&self, op: &mut dyn Ops, x: Act, layer: usize) -> Result<Act> {
        let h = op.norm(x, &self.attn_norm)?;
        let [q, k, v] = three(op.project(h, &self.qkv)?);
        let a = op.attention(q, k, v, layer, &self.attn)?;
        let a = op.linear(a, &self.o)?;
        let a = op.norm(a, &self.post_attn_norm)?;
        let x = op.add(a, x)?;
        let h = op.norm(x, &self.ffn_norm)?;
        let [g, u] = two(op.project(h, &self.gate_up)?);
        let m = op.glu(g, u, Gate::GeluTanh)?;
        let m = op.linear(m, &self.down)?;
        let m = op.norm(m, &self.post_ffn_norm)?;
        op.add(m, x)
    }
}
