//! `sollol perplexity`: perplexity over a text file, and the KL divergence
//! of the model's next-token distributions from the same weights run in
//! exact f32 math (llama.cpp's `llama-perplexity --kl-divergence`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use sollol::model::eval::{chunks, score_chunk, Base, BaseWriter, Perplexity, SavedBase};
use sollol::model::ModelSlice;

use super::{open_model, ModelArgs};

#[derive(Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The text to score (a saved base brings its own tokens).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Tokens per chunk; the second half of each is scored.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Score at most this many chunks (all by default).
    #[arg(long)]
    chunks: Option<usize>,
    /// The distribution to compare with: `exact`, the same weights
    /// dequantized to f32 and run in f32 throughout (f32 KV cache, no
    /// activation quantization); another model of the same vocabulary run
    /// that way (the f32 file a quantized one was made from); or a base run
    /// saved by `llama-perplexity --kl-divergence-base FILE` (its tokens,
    /// chunks and context are used).
    #[arg(long)]
    kl_base: Option<String>,
    /// Write the base's log probabilities (`--kl-base exact` or a model)
    /// to this file as `llama-perplexity --kl-divergence-base` does, so
    /// that llama.cpp scores its runs against the same base.
    #[arg(long)]
    save_base: Option<PathBuf>,
}

pub fn run(args: PerplexityArgs) -> Result<()> {
    if args.ctx < 4 {
        bail!("--ctx {} is too short: a chunk scores its second half", args.ctx);
    }
    let mut opened = open_model(&args.model.model)?;
    let tokenizer = opened.tokenizer()?;
    let bos = tokenizer.bos_id().filter(|_| tokenizer.adds_bos());
    let saved = match args.kl_base.as_deref() {
        Some(path) if SavedBase::is_one(path.as_ref()) => Some(SavedBase::read(path.as_ref())?),
        _ => None,
    };
    // Before any model is loaded: a mistaken command costs nothing.
    if args.save_base.is_some() && (saved.is_some() || args.kl_base.is_none()) {
        bail!("--save-base writes the base a model computes: give --kl-base exact or a model");
    }
    let (mut chunks, ctx) = match (&saved, &args.file) {
        // As llama.cpp's KL run: the saved tokens, BOS first where the model wants it.
        (Some(s), _) => (s.chunks.iter().map(|c| chunks(c, s.ctx, bos).remove(0)).collect::<Vec<_>>(), s.ctx),
        (None, Some(file)) => {
            let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
            (chunks(&tokenizer.encode(&text)?, args.ctx, bos), args.ctx)
        }
        (None, None) => bail!("--file TEXT is needed (or a saved llama.cpp base with --kl-base)"),
    };
    if ctx < 4 {
        bail!("a context of {ctx} is too short: a chunk scores its second half");
    }
    chunks.truncate(args.chunks.unwrap_or(usize::MAX));
    if chunks.is_empty() {
        bail!("fewer tokens than one chunk of {ctx}");
    }
    let n_layers = opened.file.config()?.n_layers;
    let device = sollol::model::device::parse(&args.model.device)?;
    let model = ModelSlice::load(&mut opened.file, 0..n_layers, &device)?;
    if let Some(s) = &saved {
        if s.vocab != model.config().vocab_size {
            bail!("the saved base has a vocabulary of {}, the model {}", s.vocab, model.config().vocab_size);
        }
    }
    let base_model = match args.kl_base.as_deref() {
        _ if saved.is_some() => None,
        None => None,
        Some("exact") => Some(ModelSlice::load_exact(&mut opened.file, 0..n_layers)?),
        Some(other) => {
            let mut base = open_model(other)?;
            let layers = base.file.config()?.n_layers;
            Some(ModelSlice::load_exact(&mut base.file, 0..layers)?)
        }
    };
    let progress = ProgressBar::new(chunks.len() as u64).with_message("scoring chunks");
    progress.set_style(
        ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} [{elapsed}<{eta}]").unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut acc = Perplexity::default();
    let mut writer = args.save_base.as_deref().map(|p| BaseWriter::create(p, ctx, model.config().vocab_size, &chunks)).transpose()?;
    for (n, chunk) in chunks.iter().enumerate() {
        let base = match (&saved, &base_model) {
            (Some(s), _) => Base::Saved(s, n),
            (None, Some(b)) => Base::Model(b),
            (None, None) => Base::None,
        };
        score_chunk(&model, base, chunk, &mut acc, writer.as_mut())?;
        progress.inc(1);
    }
    progress.finish_and_clear();
    if let (Some(w), Some(path)) = (writer, &args.save_base) {
        w.finish()?;
        println!("base saved to {}", path.display());
    }
    println!(
        "model {} ({:?} path), {} chunks of {} tokens, {} tokens scored",
        opened.resolved.name,
        model.backend(),
        chunks.len(),
        ctx,
        acc.n
    );
    println!("perplexity {:.4}", acc.perplexity());
    if let (Some(base_ppl), Some((kl, kl_err)), Some(same)) = (acc.base_perplexity(), acc.kl_divergence(), acc.same_top()) {
        let what = if saved.is_some() { "a saved base" } else { "exact f32" };
        println!("base perplexity {base_ppl:.4} ({}, {what})", args.kl_base.as_deref().unwrap_or_default());
        println!("mean KLD {kl:.6} ± {kl_err:.6}");
        println!("same top token {:.2}%", 100.0 * same);
    }
    Ok(())
}
