//! `sollol bench`: load memory, prefill and decode speed of one slice or the
//! whole model, on a real model file.

use std::time::Instant;

use anyhow::Result;
use candle_core::Tensor;
use clap::Args;
use sollol::sys::{human_bytes, peak_rss_bytes};

use super::{load_slice, open_model, parse_layers, ModelArgs};

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Only these blocks (`a..b`, end excluded); default: the whole model.
    #[arg(long)]
    layers: Option<String>,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens for the decode measurement.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// Load, report memory, and stop.
    #[arg(long)]
    load_only: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let mut opened = open_model(&args.model.model)?;
    let layers = args.layers.as_deref().map(parse_layers).transpose()?;
    let start = Instant::now();
    let slice = load_slice(&mut opened.file, layers)?;
    let load_s = start.elapsed().as_secs_f64();
    let peak_after_load = peak_rss_bytes().unwrap_or(0);
    let mut report = serde_json::json!({
        "model": opened.resolved.name,
        "layers": format!("{}..{}", slice.layers().start, slice.layers().end),
        "weight_bytes": slice.weight_bytes(),
        "load_s": load_s,
        "peak_rss_bytes": peak_after_load,
    });
    if !args.load_only {
        let cfg = slice.config().clone();
        let vocab = cfg.vocab_size as u32;
        let ids: Vec<u32> = (0..args.prompt_tokens as u32).map(|i| (i * 7919 + 13) % vocab).collect();
        let input = |ids: &[u32]| -> Result<Tensor> {
            Ok(if slice.is_first() {
                Tensor::new(ids, slice.device())?.unsqueeze(0)?
            } else {
                Tensor::ones((1, ids.len(), cfg.hidden_size), candle_core::DType::F32, slice.device())?
            })
        };
        let mut cache = slice.new_cache(args.prompt_tokens + args.tokens + 1)?;
        let t = Instant::now();
        slice.forward(&input(&ids)?, &mut cache)?;
        let prefill = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for i in 0..args.tokens {
            slice.forward(&input(&[(i as u32 * 31) % vocab])?, &mut cache)?;
        }
        let decode = t.elapsed().as_secs_f64();
        report["prefill_tok_s"] = serde_json::json!(args.prompt_tokens as f64 / prefill);
        report["decode_tok_s"] = serde_json::json!(args.tokens as f64 / decode);
        report["peak_rss_bytes"] = serde_json::json!(peak_rss_bytes().unwrap_or(0));
    }
    if args.json {
        println!("{report}");
    } else {
        println!("model        {}", report["model"].as_str().unwrap_or(""));
        println!("layers       {}", report["layers"].as_str().unwrap_or(""));
        println!("weights      {}", human_bytes(slice.weight_bytes() as u64));
        println!("load         {load_s:.2} s");
        println!("peak RSS     {} after load", human_bytes(peak_after_load));
        if let (Some(p), Some(d)) = (report["prefill_tok_s"].as_f64(), report["decode_tok_s"].as_f64()) {
            println!("prefill      {p:.1} tok/s ({} tokens)", args.prompt_tokens);
            println!("decode       {d:.1} tok/s ({} tokens)", args.tokens);
        }
    }
    Ok(())
}
