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

/// A base run saved by llama.cpp (`llama-perplexity --kl-divergence-base
/// FILE`): the chunks' tokens, and for each scored position the base's log
/// probabilities, 16 bits each over the 16 nats below the largest.
#[derive(Debug)]
pub struct SavedBase {
    pub ctx: usize,
    pub vocab: usize,
    pub chunks: Vec<Vec<u32>>,
    /// One record per scored position, chunk after chunk: `[scale f32,
    /// min f32, vocab u16 (padded to even)]` as u16s.
    records: Vec<u16>,
    record_len: usize,
}

impl SavedBase {
    /// Whether `path` is a file that starts with `_logits_` (its first
    /// bytes only: a base of a large vocabulary is gigabytes).
    pub fn is_one(path: &std::path::Path) -> bool {
        let mut magic = [0u8; 8];
        std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic)).is_ok() && &magic == b"_logits_"
    }

    /// Reads a file that starts with `_logits_`.
    pub fn read(path: &std::path::Path) -> Result<Self> {
        let bad = |reason: String| Error::bad_model(path, reason);
        let bytes = std::fs::read(path).map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
        let int = |at: usize| -> Result<usize> {
            let b = bytes.get(at..at + 4).ok_or_else(|| bad("truncated logits file".into()))?;
            usize::try_from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])).map_err(|_| bad("a negative size".into()))
        };
        if !bytes.starts_with(b"_logits_") {
            return Err(bad("not a llama.cpp logits file (no _logits_ magic)".into()));
        }
        let (ctx, vocab, n_chunks) = (int(8)?, int(12)?, int(16)?);
        if ctx < 4 || vocab == 0 {
            return Err(bad(format!("a context of {ctx} and a vocabulary of {vocab}")));
        }
        let record_len = 2 * vocab.div_ceil(2) + 4;
        let scored = ctx - 1 - ctx / 2;
        // The header's counts are checked against the file's length before
        // they size anything (a product of them can overflow).
        let sizes = (|| {
            let tokens_end = n_chunks.checked_mul(ctx)?.checked_mul(4)?.checked_add(20)?;
            Some((tokens_end, n_chunks.checked_mul(scored)?.checked_mul(record_len)?.checked_mul(2)?.checked_add(tokens_end)?))
        })();
        let tokens_end = match sizes {
            Some((tokens_end, expected)) if expected == bytes.len() => tokens_end,
            _ => return Err(bad(format!("{n_chunks} chunks of {ctx} over {vocab} tokens do not fill the file's {} bytes", bytes.len()))),
        };
        let chunks = bytes[20..tokens_end]
            .chunks_exact(ctx * 4)
            .map(|c| c.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
            .collect();
        let records = bytes[tokens_end..].chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
        Ok(Self { ctx, vocab, chunks, records, record_len })
    }

    /// The record of scored position `i` of chunk `chunk` (`i` from 0).
    fn record(&self, chunk: usize, i: usize) -> &[u16] {
        let scored = self.ctx - 1 - self.ctx / 2;
        let at = (chunk * scored + i) * self.record_len;
        &self.records[at..at + self.record_len]
    }
}

/// Writes a file as `llama-perplexity --kl-divergence-base` does: the
/// chunks' tokens, then the base's record ([`base_record`]) of each scored
/// position, chunk after chunk, so that llama.cpp can score its own runs
/// against a base sollol computed (the exact math). Streamed: a base of a
/// large vocabulary is gigabytes.
pub struct BaseWriter {
    out: std::io::BufWriter<std::fs::File>,
    path: std::path::PathBuf,
}

impl BaseWriter {
    pub fn create(path: &std::path::Path, ctx: usize, vocab: usize, chunks: &[Vec<u32>]) -> Result<Self> {
        let int = |v: usize| -> Result<[u8; 4]> {
            Ok(i32::try_from(v).map_err(|_| Error::InvalidRequest(format!("{v} does not fit llama.cpp's 32-bit header")))?.to_le_bytes())
        };
        let file = std::fs::File::create(path).map_err(|e| Error::io(format!("cannot create {}", path.display()), e))?;
        let mut w = Self { out: std::io::BufWriter::new(file), path: path.to_path_buf() };
        w.write(b"_logits_")?;
        for v in [ctx, vocab, chunks.len()] {
            w.write(&int(v)?)?;
        }
        for t in chunks.iter().flatten() {
            w.write(&t.to_le_bytes())?;
        }
        Ok(w)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        std::io::Write::write_all(&mut self.out, bytes).map_err(|e| Error::io(format!("cannot write {}", self.path.display()), e))
    }

    /// Appends the record of one scored position.
    pub fn push(&mut self, logits: &[f32]) -> Result<()> {
        // Through the buffered writer as they come: no second copy of a
        // vocabulary-sized record.
        base_record(logits).iter().try_for_each(|r| self.write(&r.to_le_bytes()))
    }

    pub fn finish(mut self) -> Result<()> {
        std::io::Write::flush(&mut self.out).map_err(|e| Error::io(format!("cannot write {}", self.path.display()), e))
    }
}

/// llama.cpp's record of one position's log probabilities: `[scale f32,
/// min f32]` as four u16s, then each log probability within 16 nats of the
/// largest as 16 bits above the smallest kept (0 below it), padded to an
/// even count.
pub fn base_record(logits: &[f32]) -> Vec<u16> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let min = logits.iter().fold(f32::INFINITY, |m, &v| m.min(v)).max(max - 16.0);
    let sum_exp: f64 = logits.iter().map(|&v| f64::from((v - max).exp())).sum();
    let log_sum_exp = sum_exp.ln() as f32;
    let scale = (max - min) / 65535.0;
    let min_log_prob = min - max - log_sum_exp;
    let mut r = Vec::with_capacity(4 + 2 * logits.len().div_ceil(2));
    for f in [scale, min_log_prob] {
        let bits = f.to_bits();
        r.extend([bits as u16, (bits >> 16) as u16]);
    }
    let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
    // llama.cpp rounds with its nearest_int (half to even), as round_ties_even does.
    r.extend(logits.iter().map(|&v| if v > min { (inv * (v - min)).round_ties_even() as u16 } else { 0 }));
    r.resize(4 + 2 * logits.len().div_ceil(2), 0);
    r
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

    /// Scores `target` against the model's `logits` and a saved base
    /// record, as llama.cpp's KL divergence does (base log probabilities
    /// below −16 count as zero).
    pub fn add_saved(&mut self, logits: &[f32], record: &[u16], target: u32) -> Result<()> {
        let lp = log_softmax(logits);
        let t = target as usize;
        if t >= lp.len() || record.len() < lp.len() + 4 {
            return Err(Error::InvalidRequest(format!("token {t} or a record of {} for a vocabulary of {}", record.len(), lp.len())));
        }
        let f = |i: usize| f32::from_bits(u32::from(record[2 * i]) | u32::from(record[2 * i + 1]) << 16);
        let (scale, min) = (f(0) as f64, f(1) as f64);
        let base = |i: usize| scale * f64::from(record[4 + i]) + min;
        let (mut kl, mut best) = (0.0, 0);
        for (i, &m) in lp.iter().enumerate() {
            let b = base(i);
            if b > base(best) {
                best = i;
            }
            if b > -16.0 {
                kl += b.exp() * (b - m);
            }
        }
        self.n += 1;
        self.nll -= lp[t];
        self.has_base = true;
        self.base_nll -= base(t);
        self.kl += kl;
        self.kl_sq += kl * kl;
        self.same_top += usize::from(best == argmax(&lp));
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

/// What the model is compared with.
pub enum Base<'a> {
    None,
    /// Another slice run alongside (the exact f32 math).
    Model(&'a ModelSlice),
    /// Chunk `n` of a saved run.
    Saved(&'a SavedBase, usize),
}

/// Scores one chunk: the first half and one more token as a prefill, then
/// one decode step per token, each step's logits scoring the next token.
/// With `save`, a base model's records are written to it.
pub fn score_chunk(model: &ModelSlice, base: Base, chunk: &[u32], acc: &mut Perplexity, mut save: Option<&mut BaseWriter>) -> Result<()> {
    if chunk.len() < 4 {
        return Err(Error::InvalidRequest(format!("a chunk of {} tokens is too short to score", chunk.len())));
    }
    let first = chunk.len() / 2;
    let mut cache = model.new_cache(chunk.len())?;
    let mut base_cache = match base {
        Base::Model(b) => Some(b.new_cache(chunk.len())?),
        _ => None,
    };
    let step = |slice: &ModelSlice, cache: &mut super::KvCache, input: &[u32]| -> Result<Vec<f32>> {
        let x = Tensor::new(input, &Device::Cpu)?.unsqueeze(0)?;
        match slice.forward(&x, cache)? {
            SliceOutput::Logits(l) => Ok(l),
            SliceOutput::Hidden(_) => Err(Error::InvalidRequest("perplexity needs the whole model in one slice".into())),
        }
    };
    for j in first..chunk.len() - 1 {
        let input = if j == first { &chunk[..=first] } else { &chunk[j..=j] };
        let logits = step(model, &mut cache, input)?;
        match (&base, base_cache.as_mut()) {
            (Base::Model(b), Some(c)) => {
                let base = step(b, c, input)?;
                if let Some(w) = save.as_deref_mut() {
                    w.push(&base)?;
                }
                acc.add(&logits, Some(&base), chunk[j + 1])?
            }
            (Base::Saved(saved, n), _) => acc.add_saved(&logits, saved.record(*n, j - first), chunk[j + 1])?,
            _ => acc.add(&logits, None, chunk[j + 1])?,
        }
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

    /// A file as llama-perplexity writes it: one chunk of 4 tokens over a
    /// vocabulary of 3, one scored position whose base is (1/2, 1/4, 1/4).
    #[test]
    fn a_saved_llama_cpp_base_is_read_and_scored_as_llama_cpp_does() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("base.kld");
        let lp: [f32; 3] = [0.5f32.ln(), 0.25f32.ln(), 0.25f32.ln()];
        let (max, min) = (lp[0], lp[1]);
        let scale = (max - min) / 65535.0;
        let mut b = b"_logits_".to_vec();
        for v in [4i32, 3, 1, 9, 1, 2, 0] {
            b.extend(v.to_le_bytes()); // ctx, vocab, chunks, then the 4 tokens
        }
        b.extend(scale.to_le_bytes());
        b.extend(min.to_le_bytes());
        for v in lp.iter().map(|&l| ((l - min) / scale).round() as u16).chain([0]) {
            b.extend(v.to_le_bytes());
        }
        std::fs::write(&path, &b).unwrap();
        let saved = SavedBase::read(&path).unwrap();
        assert_eq!((saved.ctx, saved.vocab, saved.chunks.clone()), (4, 3, vec![vec![9, 1, 2, 0]]));
        let mut p = Perplexity::default();
        // The model says (1/4, 1/2, 1/4).
        p.add_saved(&[0.0, 2f32.ln(), 0.0], saved.record(0, 0), 0).unwrap();
        let want = 0.5 * (0.5f64 / 0.25).ln() + 0.25 * (0.25f64 / 0.5).ln();
        assert!((p.kl_divergence().unwrap().0 - want).abs() < 1e-4, "{:?}", p.kl_divergence());
        assert_eq!(p.same_top(), Some(0.0));
        std::fs::write(&path, &b[..b.len() - 2]).unwrap();
        assert!(SavedBase::read(&path).is_err(), "a truncated file is refused");
        // Counts whose product wraps a 64-bit size: refused, not trusted.
        let mut huge = b.clone();
        for at in [8, 12, 16] {
            huge[at..at + 4].copy_from_slice(&i32::MAX.to_le_bytes());
        }
        std::fs::write(&path, &huge).unwrap();
        assert!(SavedBase::read(&path).is_err(), "counts beyond the file are refused");
    }

    /// A base written as llama.cpp writes one reads back, and scores a
    /// model as the base's own logits do (within its 16-bit rounding).
    #[test]
    fn a_written_base_reads_back_and_scores_as_the_logits_it_holds() {
        let base: [[f32; 5]; 2] = [[1.0, 2.0, 3.0, -1.0, -30.0], [0.5, 0.5, 4.0, 2.0, 1.0]];
        let model: [[f32; 5]; 2] = [[1.5, 2.0, 2.5, -1.0, 0.0], [0.0, 1.0, 3.0, 2.5, 1.0]];
        assert_eq!(base_record(&base[0]).len(), 4 + 6);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("base.kld");
        // A chunk of 6 tokens scores positions 3 and 4.
        let mut w = BaseWriter::create(&path, 6, 5, &[vec![0, 1, 2, 3, 4, 0]]).unwrap();
        base.iter().for_each(|b| w.push(b).unwrap());
        w.finish().unwrap();
        let saved = SavedBase::read(&path).unwrap();
        assert_eq!((saved.ctx, saved.vocab, saved.chunks.clone()), (6, 5, vec![vec![0, 1, 2, 3, 4, 0]]));
        let (mut direct, mut read) = (Perplexity::default(), Perplexity::default());
        for (i, (b, m)) in base.iter().zip(&model).enumerate() {
            direct.add(m, Some(b), 2).unwrap();
            read.add_saved(m, saved.record(0, i), 2).unwrap();
        }
        let (d, r) = (direct.kl_divergence().unwrap().0, read.kl_divergence().unwrap().0);
        assert!((d - r).abs() < 1e-3 * d, "KLD {d} from the logits, {r} from the file");
        assert!((direct.base_perplexity().unwrap() - read.base_perplexity().unwrap()).abs() < 1e-3);
    }

    #[test]
    fn chunks_start_with_bos_and_drop_the_rest() {
        let t: Vec<u32> = (10..21).collect();
        assert_eq!(chunks(&t, 4, Some(1)), vec![vec![1, 11, 12, 13], vec![1, 15, 16, 17]]);
        assert_eq!(chunks(&t, 4, None)[1], vec![14, 15, 16, 17]);
    }
}
