//! One transformer block of the llama family: pre-norm attention with
//! grouped-query heads and rotary positions, then a pre-norm SwiGLU MLP.
//!
//! The operation order follows llama.cpp / candle's `quantized_llama` exactly,
//! which is what lets the golden test demand bit-identical logits.

use candle_core::{Device, Tensor};

use super::config::Config;
use super::kv_cache::KvCache;
use super::rope::Rope;
use super::weights::{Backend, Linear, Projections, RawWeight, RmsNorm, Role};
use super::ModelFile;
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct Block {
    pub(super) attn_norm: RmsNorm,
    /// Q, K, V.
    pub(super) qkv: Projections,
    pub(super) o: Linear,
    pub(super) ffn_norm: RmsNorm,
    /// Gate, up.
    pub(super) gate_up: Projections,
    pub(super) down: Linear,
    pub(super) n_heads: usize,
    pub(super) n_kv_heads: usize,
    pub(super) head_dim: usize,
}

impl Block {
    pub fn load(file: &mut ModelFile, cfg: &Config, layer: usize, device: &Device, backend: Backend) -> Result<Self> {
        let h = cfg.hidden_size;
        let q_dim = cfg.n_heads * cfg.head_dim;
        let kv_dim = cfg.n_kv_heads * cfg.head_dim;
        let ffn = cfg.intermediate_size;
        let mut weight = |role: Role, shape: &[usize]| -> Result<RawWeight> {
            let w = match backend {
                // A matrix for our kernels goes straight into their buffer.
                Backend::Host if shape.len() == 2 => match file.read_matrix(role, Some(layer))? {
                    Some(m) => RawWeight::Host(m),
                    None => file.read(role, Some(layer), device)?,
                },
                _ => file.read(role, Some(layer), device)?,
            };
            check_shape(file, role, layer, &w, shape)?;
            Ok(w)
        };
        let attn_norm = weight(Role::AttnNorm, &[h])?;
        let (wq, wk, wv, wo) =
            (weight(Role::Q, &[q_dim, h])?, weight(Role::K, &[kv_dim, h])?, weight(Role::V, &[kv_dim, h])?, weight(Role::O, &[h, q_dim])?);
        let ffn_norm = weight(Role::FfnNorm, &[h])?;
        let (gate, up, down) = (weight(Role::Gate, &[ffn, h])?, weight(Role::Up, &[ffn, h])?, weight(Role::Down, &[h, ffn])?);
        let (bq, bk, bv) = if cfg.arch.qkv_bias {
            (
                Some(weight(Role::QBias, &[q_dim])?.to_f32()?),
                Some(weight(Role::KBias, &[kv_dim])?.to_f32()?),
                Some(weight(Role::VBias, &[kv_dim])?.to_f32()?),
            )
        } else {
            (None, None, None)
        };
        Ok(Self {
            attn_norm: RmsNorm::new(&attn_norm, cfg.rms_norm_eps)?,
            qkv: Projections::new(vec![(wq, bq), (wk, bk), (wv, bv)], backend)?,
            o: Linear::new(wo, None, backend)?,
            ffn_norm: RmsNorm::new(&ffn_norm, cfg.rms_norm_eps)?,
            gate_up: Projections::new(vec![(gate, None), (up, None)], backend)?,
            down: Linear::new(down, None, backend)?,
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
        })
    }

    /// x `[b, seq, hidden]` → `[b, seq, hidden]`; `mask` `[seq, pos + seq]` (1 = hidden) when seq > 1.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>, rope: &Rope, cache: &mut KvCache, layer: usize) -> Result<Tensor> {
        let residual = x;
        let x = self.attn_norm.forward(x)?;
        let x = (self.attention(&x, mask, rope, cache, layer)? + residual)?;
        let residual = &x;
        let h = self.ffn_norm.forward(&x)?;
        let gate_up = self.gate_up.forward(&h)?;
        let h = (candle_nn::ops::silu(&gate_up[0])? * &gate_up[1])?;
        Ok((self.down.forward(&h)? + residual)?)
    }

    fn attention(&self, x: &Tensor, mask: Option<&Tensor>, rope: &Rope, cache: &mut KvCache, layer: usize) -> Result<Tensor> {
        let (b, seq, _hidden) = x.dims3()?;
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let pos = cache.len();
        let qkv = self.qkv.forward(x)?;
        let q = qkv[0].reshape((b, seq, nh, hd))?.transpose(1, 2)?;
        let k = qkv[1].reshape((b, seq, nkv, hd))?.transpose(1, 2)?;
        // contiguous: the cache write needs it.
        let v = qkv[2].reshape((b, seq, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let q = rope.apply(&q, pos)?;
        let k = rope.apply(&k, pos)?;
        // k, v: [b, n_kv, pos + seq, hd], views into the cache.
        let (k, v) = cache.append(layer, &k, &v)?;
        // Heads kv * n_rep .. (kv + 1) * n_rep share K/V head kv: their queries
        // are the rows of one product with it, so K and V are never copied.
        let n_rep = nh / nkv;
        let q = q.contiguous()?.reshape((b, nkv, n_rep * seq, hd))?;
        // att: [b, n_kv, n_rep * seq, pos + seq]
        let att = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
        let att = match mask {
            Some(mask) => {
                let grouped = att.reshape((b, nkv, n_rep, seq, pos + seq))?;
                let neg_inf = Tensor::new(f32::NEG_INFINITY, att.device())?.broadcast_as(grouped.shape())?;
                mask.broadcast_as(grouped.shape())?.where_cond(&neg_inf, &grouped)?.reshape(att.shape())?
            }
            None => att,
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        // y: [b, n_kv, n_rep * seq, hd] = [b, heads, seq, hd]
        let y = att.matmul(&v)?.reshape((b, nh, seq, hd))?;
        let y = y.transpose(1, 2)?.reshape((b, seq, nh * hd))?;
        self.o.forward(&y)
    }
}

/// The causal mask for `seq` new positions after `pos` cached ones: `[seq, pos + seq]`, 1 = hidden.
pub fn causal_mask(seq: usize, pos: usize, device: &Device) -> Result<Tensor> {
    let kv = pos + seq;
    let mask: Vec<u8> = (0..seq).flat_map(|i| (0..kv).map(move |j| u8::from(j > pos + i))).collect();
    Ok(Tensor::from_slice(&mask, (seq, kv), device)?)
}

fn check_shape(file: &ModelFile, role: Role, layer: usize, w: &RawWeight, expected: &[usize]) -> Result<()> {
    let dims = match w {
        RawWeight::Quantized(q) => q.shape().dims().to_vec(),
        RawWeight::Dense(t) => t.dims().to_vec(),
        RawWeight::Host(m) => vec![m.rows(), m.cols()],
    };
    if dims != expected {
        return Err(Error::bad_model(
            file.path(),
            format!("block {layer} {role:?} weight has shape {dims:?}, the config implies {expected:?}"),
        ));
    }
    Ok(())
}
