//! Perplexity over a text and the KL divergence of a model's next-token
//! distributions from a base's (the same weights in exact f32 math), as
//! llama.cpp's `llama-perplexity --kl-divergence` measures them: the text
//! in chunks of `ctx` tokens, each starting with BOS where the model wants
//! one, and only the second half of each chunk scored (every scored token
//! has at least `ctx / 2` tokens of context).

use candle_core::{Device, Tensor};

use super::slice::{ModelSlice, SliceOutput};
use crate::error::{Error, Result};

/// Running sums of one evaluation.
#[derive(Debug, Default, Clone)]
pub struct Perplexity {
    /// Tokens scored.
    pub n: usize,
    /// Σ −log p(token) under the model, and under the base.
    nll: f64,
    base_nll: f64,
    /// Σ KL(base ‖ model) and Σ of its square, per scored token.
    kl: f64,
    kl_sq: f64,
    /// Tokens where model and base rank the same token first.
    same_top: usize,
    has_base: bool,
}

/// `log softmax(logits)` in f64.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    let log_z = max + sum.ln();
    logits.iter().map(|&v| v as f64 - log_z).collect()
}

fn argmax(x: &[f64]) -> usize {
    x.iter().enumerate().fold(0, |best, (i, &v)| if v > x[best] { i } else { best })
}

impl Perplexity {
    /// Scores `target` against the model's `logits` (and the base's).
    pub fn add(&mut self, logits: &[f32], base: Option<&[f32]>, target: u32) -> Result<()> {
        let lp = log_softmax(logits);
        let t = target as usize;
        let p = lp.get(t).ok_or_else(|| Error::InvalidRequest(format!("token {t} is outside the vocabulary of {}", lp.len())))?;
        self.n += 1;
        self.nll -= p;
        if let Some(base) = base {
            let bp = log_softmax(base);
            if bp.len() != lp.len() {
                return Err(Error::InvalidRequest(format!("the base has {} logits, the model {}", bp.len(), lp.len())));
            }
            let kl: f64 = bp.iter().zip(&lp).map(|(&b, &m)| b.exp() * (b - m)).sum();
            self.has_base = true;
            self.base_nll -= bp[t];
            self.kl += kl;
            self.kl_sq += kl * kl;
            self.same_top += usize::from(argmax(&bp) == argmax(&lp));
        }
        Ok(())
    }

    pub fn perplexity(&self) -> f64 {
        (self.nll / self.n.max(1) as f64).exp()
    }

    /// The base's perplexity, where there is a base.
    pub fn base_perplexity(&self) -> Option<f64> {
        self.has_base.then(|| (self.base_nll / self.n.max(1) as f64).exp())
    }

    /// Mean KL(base ‖ model) per token and its standard error.
    pub fn kl_divergence(&self) -> Option<(f64, f64)> {
        self.has_base.then(|| {
            let n = self.n.max(1) as f64;
            let mean = self.kl / n;
            let var = (self.kl_sq / n - mean * mean).max(0.0);
            (mean, (var / (n - 1.0).max(1.0)).sqrt())
        })
    }

    /// The share of scored tokens where model and base agree on the top token.
    pub fn same_top(&self) -> Option<f64> {
        self.has_base.then(|| self.same_top as f64 / self.n.max(1) as f64)
    }
}

/// The text's tokens cut into chunks of `ctx`, each starting with `bos`
/// where given (llama.cpp's way: the chunk's first token is replaced).
pub fn chunks(tokens: &[u32], ctx: usize, bos: Option<u32>) -> Vec<Vec<u32>> {
    tokens
        .chunks_exact(ctx)
        .map(|c| {
            let mut c = c.to_vec();
            if let Some(b) = bos {
                c[0] = b;
            }
            c
        })
        .collect()
}

/// Scores one chunk: the first half and one more token as a prefill, then
/// one decode step per token, each step's logits scoring the next token.
pub fn score_chunk(model: &ModelSlice, base: Option<&ModelSlice>, chunk: &[u32], acc: &mut Perplexity) -> Result<()> {
    if chunk.len() < 4 {
        return Err(Error::InvalidRequest(format!("a chunk of {} tokens is too short to score", chunk.len())));
    }
    let first = chunk.len() / 2;
    let mut cache = model.new_cache(chunk.len())?;
    let mut base_cache = base.map(|b| b.new_cache(chunk.len())).transpose()?;
    let step = |slice: &ModelSlice, cache: &mut super::KvCache, input: &[u32]| -> Result<Vec<f32>> {
        let x = Tensor::new(input, &Device::Cpu)?.unsqueeze(0)?;
        match slice.forward(&x, cache)? {
            SliceOutput::Logits(l) => Ok(l.flatten_all()?.to_vec1::<f32>()?),
            SliceOutput::Hidden(_) => Err(Error::InvalidRequest("perplexity needs the whole model in one slice".into())),
        }
    };
    for j in first..chunk.len() - 1 {
        let input = if j == first { &chunk[..=first] } else { &chunk[j..=j] };
        let logits = step(model, &mut cache, input)?;
        let base_logits = match (base, base_cache.as_mut()) {
            (Some(b), Some(c)) => Some(step(b, c, input)?),
            _ => None,
        };
        acc.add(&logits, base_logits.as_deref(), chunk[j + 1])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_is_its_own_base_and_a_uniform_model_has_the_vocabulary_as_perplexity() {
        let mut p = Perplexity::default();
        let logits = [1.0f32, 2.0, 3.0, -1.0];
        p.add(&logits, Some(&logits), 2).unwrap();
        p.add(&logits, Some(&logits), 0).unwrap();
        assert_eq!(p.kl_divergence().unwrap().0, 0.0);
        assert_eq!(p.same_top(), Some(1.0));
        assert!((p.perplexity() - p.base_perplexity().unwrap()).abs() < 1e-12);
        let mut u = Perplexity::default();
        u.add(&[0.5; 8], None, 3).unwrap();
        assert!((u.perplexity() - 8.0).abs() < 1e-9);
        assert!(u.kl_divergence().is_none());
        // KL(base ‖ model) of two known distributions: base (1/2, 1/2), model (1/4, 3/4).
        let mut k = Perplexity::default();
        k.add(&[0.0, 3f32.ln()], Some(&[0.0, 0.0]), 1).unwrap();
        let want = 0.5 * (0.5f64 / 0.25).ln() + 0.5 * (0.5f64 / 0.75).ln();
        assert!((k.kl_divergence().unwrap().0 - want).abs() < 1e-7);
        assert!(k.add(&[0.0; 2], None, 5).is_err(), "a token outside the vocabulary");
    }

    #[test]
    fn chunks_start_with_bos_and_drop_the_rest() {
        let t: Vec<u32> = (10..21).collect();
        assert_eq!(chunks(&t, 4, Some(1)), vec![vec![1, 11, 12, 13], vec![1, 15, 16, 17]]);
        assert_eq!(chunks(&t, 4, None)[1], vec![14, 15, 16, 17]);
    }
}
