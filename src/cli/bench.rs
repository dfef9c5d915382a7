//! `sollol bench`: load memory of a slice, or prefill/decode speed of the
//! single-node engine against 2- and 3-stage loopback pipelines, measured in
//! one run with the same total threads, rounds interleaved.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use sollol::head::constraint::Format;
use sollol::head::engine::{Engine, SampleSpec};
use sollol::head::generation::PREFILL_CHUNK;
use sollol::head::tokenizer::Tokenizer;
use sollol::model::sampling::SamplingParams;
use sollol::net::tensor::WireDType;
use sollol::sys::{human_bytes, peak_rss_bytes};

use super::generate::{start_engine, PipelineArgs, Running};
use super::{load_slice, parse_layers, ModelArgs, Opened};

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Load only these blocks (`a..b`, end excluded) and report memory.
    #[arg(long)]
    layers: Option<String>,
    /// Load, report memory, and stop.
    #[arg(long)]
    load_only: bool,
    /// Pipeline lengths to compare: 0 is the in-process engine, N ≥ 1 is N
    /// local node processes sharing the threads.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    stages: Vec<usize>,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens for the decode measurement.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// Interleaved rounds; the best of each configuration is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Activation dtype between stages.
    #[arg(long, default_value = "f16")]
    wire: WireDType,
    /// Local nodes split the cores instead of sharing them in time.
    #[arg(long)]
    local_split_cores: bool,
    /// Measure a running server at this URL instead (requests/s, TTFT).
    #[arg(long)]
    url: Option<String>,
    /// Concurrent clients to measure the server with.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    clients: Vec<usize>,
    /// Requests per client count (spread over the clients).
    #[arg(long, default_value_t = 16)]
    requests: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Measure a synthetic model of this shape instead (random weights made in
    /// memory: tiny, smollm2-135m, llama-1b, llama-8b, llama-70b); same as
    /// `--model synthetic:SHAPE:QUANT`.
    #[arg(long)]
    synthetic: Option<String>,
    /// Weight type of the synthetic model.
    #[arg(long, default_value = "q4_0")]
    quant: String,
    /// Write the synthetic model to this GGUF file (with the default
    /// model's tokenizer, for shapes of its vocabulary) and stop: a file
    /// other engines load, for measuring them side by side.
    #[arg(long, requires = "synthetic")]
    save: Option<std::path::PathBuf>,
    /// Also measure aggregate decode of this many sessions stepped together
    /// (one batch per step, in process), e.g. `1,8`: on the CPU, or on the
    /// device kernels.
    #[arg(long, value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Check the device's numbers instead: run the same prompt and decode
    /// steps on `--device` and on this device (e.g. `--device cuda
    /// --check-against cpu`) and report how far the logits differ.
    #[arg(long, conflicts_with_all = ["url", "layers", "load_only", "concurrency"])]
    check_against: Option<String>,
    /// Also measure structured outputs: the grammar's cost per token (`json`
    /// for any object, or a JSON schema file) against a decode step.
    #[arg(long)]
    format: Option<String>,
}

#[derive(Default, Clone)]
struct Measure {
    prefill_tok_s: f64,
    decode_tok_s: f64,
    ttft: Duration,
    hop_latencies: Vec<Duration>,
    hop_bytes: Vec<u64>,
    stage_busy: Vec<Duration>,
    decode_wall: Duration,
    /// The greedy tokens decoded (the same prompt in every round).
    tokens: Vec<u32>,
}

pub fn run(mut args: BenchArgs, threads: usize) -> Result<()> {
    if let Some(shape) = &args.synthetic {
        args.model.model = format!("{}{shape}:{}", sollol::model::synthetic::PREFIX, args.quant.to_ascii_lowercase());
    }
    if let Some(path) = &args.save {
        let mut model = sollol::model::synthetic::SyntheticModel::parse(&args.model.model)?;
        let tokenizer = sollol::model::gguf::GgufFile::open(&sollol::model::source::resolve("smollm2")?.path)?;
        model.write_gguf(path, &tokenizer)?;
        eprintln!("wrote {} to {}", args.model.model, path.display());
        return Ok(());
    }
    if let Some(url) = &args.url {
        return http(url, &args.model.model, &args.clients, args.requests, args.tokens, args.json);
    }
    if args.load_only || args.layers.is_some() {
        return load_report(&args);
    }
    let mut opened = args.model.open()?;
    let vocab = opened.file.config()?.vocab_size as u32;
    let prompt: Vec<u32> = (0..args.prompt_tokens as u32).map(|i| (i * 7919 + 13) % vocab).collect();
    if let Some(other) = &args.check_against {
        return check_against(&args, &mut opened, other, &prompt);
    }
    let mut engines: Vec<(usize, Running)> = Vec::new();
    for &n in &args.stages {
        let pipeline = PipelineArgs {
            nodes: vec![],
            local_nodes: n,
            cluster_key: None,
            wire: args.wire,
            local_split_cores: args.local_split_cores,
            cluster: None,
            route: false,
            standby: vec![],
        };
        engines.push((n, start_engine(&mut opened, &pipeline, threads)?));
    }
    // The in-process engine's weights, loaded by now (stages are processes of their own).
    let huge = sollol::sys::huge_page_bytes();
    let mut best: Vec<Measure> = vec![Measure::default(); engines.len()];
    for round in 0..args.rounds {
        for (i, (_, running)) in engines.iter_mut().enumerate() {
            let m = measure(running.engine.as_mut(), &prompt, args.tokens, round as u64)?;
            if round == 0 {
                best[i].tokens = m.tokens.clone();
            }
            if m.decode_tok_s > best[i].decode_tok_s {
                best[i].decode_tok_s = m.decode_tok_s;
                best[i].hop_latencies = m.hop_latencies.clone();
                best[i].hop_bytes = m.hop_bytes.clone();
                best[i].stage_busy = m.stage_busy.clone();
                best[i].decode_wall = m.decode_wall;
            }
            if m.prefill_tok_s > best[i].prefill_tok_s {
                best[i].prefill_tok_s = m.prefill_tok_s;
                best[i].ttft = m.ttft;
            }
        }
    }
    // Where a pipeline's greedy tokens part from the first row's, how close
    // the first row's top two logits were at that step (a near-tie or not).
    let mut gaps = vec![None; engines.len()];
    if let Some((_, first)) = engines.first_mut() {
        for (gap, m) in gaps.iter_mut().zip(&best).skip(1) {
            if let Some(step) = first_mismatch(&best[0].tokens, &m.tokens) {
                *gap = Some(top2_gap(first.engine.as_mut(), &prompt, &best[0].tokens, step)?);
            }
        }
    }
    report(&args, threads, &opened, &engines, &best, &gaps)?;
    if let (Some(f), Some((_, first))) = (&args.format, engines.first_mut()) {
        let format = match f.as_str() {
            "json" => Format::Json,
            file => Format::Schema(serde_json::from_str(&std::fs::read_to_string(file).with_context(|| format!("cannot read {file}"))?)?),
        };
        let tokenizer = opened.tokenizer()?;
        let (grammar, step) = measure_constraint(first.engine.as_mut(), &tokenizer, &format, &prompt, args.tokens)?;
        let line = format!(
            "structured output ({f}): grammar {:.3} ms/token, {:.1}% of a constrained decode step ({:.3} ms)",
            grammar.as_secs_f64() * 1e3,
            100.0 * grammar.as_secs_f64() / step.as_secs_f64(),
            step.as_secs_f64() * 1e3
        );
        if args.json {
            println!("{}", serde_json::json!({"format": f, "grammar_s_per_token": grammar.as_secs_f64(), "step_s": step.as_secs_f64()}));
        } else {
            println!("{line}");
        }
    }
    drop(engines);
    if !args.concurrency.is_empty() {
        let slice = load_slice(&mut opened.file, None, &opened.device)?;
        if !slice.backend().batches() {
            anyhow::bail!(
                "--concurrency measures batched steps, which the {:?} backend on {} does not take (the CPU kernels and the device kernels, SOLLOL_DEVICE_KERNELS=1, do)",
                slice.backend(),
                args.model.device
            );
        }
        // Rounds interleave the session counts, so a slow spell of a shared
        // machine hits every count alike instead of one ratio's side.
        let mut rows: Vec<(usize, f64)> = args.concurrency.iter().map(|&n| (n, 0.0)).collect();
        for _ in 0..args.rounds.max(1) {
            for (n, best) in rows.iter_mut() {
                *best = best.max(batched_decode(&slice, &prompt, args.tokens, *n)?);
            }
        }
        let base = rows.first().map_or(1.0, |r| r.1);
        for (n, tok_s) in &rows {
            if args.json {
                let backend = format!("{:?}", slice.backend());
                println!(
                    "{}",
                    serde_json::json!({"sessions": n, "aggregate_decode_tok_s": tok_s, "ratio": tok_s / base, "backend": backend})
                );
            } else {
                println!("{n:>3} sessions batched in process: {tok_s:>8.1} tok/s aggregate decode, ratio {:.2}", tok_s / base);
            }
        }
    }
    if !args.json {
        let huge = huge.map_or(String::new(), |b| format!(" ({} in huge pages once loaded)", human_bytes(b)));
        println!("peak RSS {}{huge}", human_bytes(peak_rss_bytes().unwrap_or(0)));
    }
    Ok(())
}

/// Aggregate decode tok/s of `n` sessions after a prefill each, all sessions
/// stepped in one batch per step (what a node's worker does with waiting steps).
pub fn batched_decode(slice: &sollol::model::ModelSlice, prompt: &[u32], tokens: usize, n: usize) -> Result<f64> {
    use candle_core::{Device, Tensor};
    use sollol::model::{BatchItem, HostInput};
    let vocab = slice.config().vocab_size as u32;
    let mut caches = (0..n).map(|_| slice.new_cache(prompt.len() + tokens + 1)).collect::<sollol::Result<Vec<_>>>()?;
    for cache in caches.iter_mut() {
        slice.forward(&Tensor::new(prompt, &Device::Cpu)?.unsqueeze(0)?, cache)?;
    }
    let t = Instant::now();
    for step in 0..tokens as u32 {
        let ids: Vec<[u32; 1]> = (0..n as u32).map(|j| [(step * 7919 + j * 104_729 + 1) % vocab]).collect();
        let mut items: Vec<BatchItem> =
            ids.iter().zip(caches.iter_mut()).map(|(x, cache)| BatchItem { input: HostInput::Tokens(x), cache }).collect();
        slice.forward_batch(&mut items)?;
    }
    Ok((n * tokens) as f64 / t.elapsed().as_secs_f64())
}

/// Greedy decode steps under a grammar (a fresh one each time the output
/// completes): the mean time per token of computing the allowed tokens and
/// advancing the grammar, and the mean whole step (grammar included).
fn measure_constraint(
    engine: &mut dyn Engine,
    tokenizer: &Tokenizer,
    format: &Format,
    prompt: &[u32],
    tokens: usize,
) -> Result<(Duration, Duration)> {
    let grammars = tokenizer.grammars()?;
    let session = 0xbe7c_f000;
    let params = SamplingParams { temperature: 0.0, ..Default::default() };
    engine.open(session, prompt.len() + tokens + 1)?;
    let mut constraint = grammars.constraint(format)?;
    let chunks: Vec<&[u32]> = prompt.chunks(PREFILL_CHUNK).collect();
    let mut token = 0;
    for (i, chunk) in chunks.iter().enumerate() {
        let last = i + 1 == chunks.len();
        let allowed = if last { Some(constraint.allowed()?) } else { None };
        let spec = last.then_some(SampleSpec {
            params: &params,
            history: prompt,
            step: 0,
            logprobs: None,
            allowed: allowed.as_deref(),
            ahead: 0,
            stop: &[],
        });
        token = engine.step(session, chunk, spec, false)?.token.unwrap_or(0);
    }
    let (mut grammar, started) = (Duration::ZERO, Instant::now());
    for step in 0..tokens {
        let t = Instant::now();
        if constraint.is_done() || tokenizer.is_eos(token) {
            constraint = grammars.constraint(format)?;
        } else {
            constraint.commit(token)?;
        }
        let allowed = if constraint.is_done() { None } else { Some(constraint.allowed()?) };
        grammar += t.elapsed();
        let spec = SampleSpec {
            params: &params,
            history: &[],
            step: step as u64 + 1,
            logprobs: None,
            allowed: allowed.as_deref(),
            ahead: 0,
            stop: &[],
        };
        token = engine.step(session, &[token], Some(spec), false)?.token.unwrap_or(0);
    }
    let wall = started.elapsed();
    engine.close(session);
    let n = tokens.max(1) as u32;
    Ok((grammar / n, wall / n))
}

/// Prefill of `prompt`, then `tokens` greedy decode steps (EOS ignored).
fn measure(engine: &mut dyn Engine, prompt: &[u32], tokens: usize, round: u64) -> Result<Measure> {
    let session = 0xbe7c_0000 + round;
    let params = SamplingParams { temperature: 0.0, ..Default::default() };
    engine.open(session, prompt.len() + tokens + 1)?;
    let mut m = Measure::default();
    let t = Instant::now();
    let chunks: Vec<&[u32]> = prompt.chunks(PREFILL_CHUNK).collect();
    let mut token = 0;
    for (i, chunk) in chunks.iter().enumerate() {
        // Every decode step below feeds the token sampled before: a ring.
        let spec = (i + 1 == chunks.len()).then_some(SampleSpec {
            params: &params,
            history: prompt,
            step: 0,
            logprobs: None,
            allowed: None,
            ahead: tokens,
            stop: &[],
        });
        token = engine.step(session, chunk, spec, false)?.token.unwrap_or(0);
    }
    m.ttft = t.elapsed();
    m.prefill_tok_s = prompt.len() as f64 / m.ttft.as_secs_f64();
    let t = Instant::now();
    for step in 0..tokens {
        let out = engine.step(
            session,
            &[token],
            Some(SampleSpec {
                params: &params,
                history: &[],
                step: step as u64 + 1,
                logprobs: None,
                allowed: None,
                ahead: tokens - step - 1,
                stop: &[],
            }),
            false,
        )?;
        token = out.token.unwrap_or(0);
        m.tokens.push(token);
        m.hop_latencies.extend(out.hop_latency);
        m.hop_bytes = out.hop_bytes;
        if m.stage_busy.len() < out.stage_times.len() {
            m.stage_busy.resize(out.stage_times.len(), Duration::ZERO);
        }
        m.stage_busy.iter_mut().zip(&out.stage_times).for_each(|(a, b)| *a += *b);
    }
    m.decode_wall = t.elapsed();
    m.decode_tok_s = tokens as f64 / m.decode_wall.as_secs_f64();
    engine.close(session);
    Ok(m)
}

/// The top-1 minus top-2 logit at decode step `step` (0: the prompt's last
/// position), the engine fed the prompt and then `tokens` (teacher-forced).
fn top2_gap(engine: &mut dyn Engine, prompt: &[u32], tokens: &[u32], step: usize) -> Result<f32> {
    let session = 0xbe7c_9a90;
    engine.open(session, prompt.len() + step + 1)?;
    let chunks: Vec<&[u32]> = prompt.chunks(PREFILL_CHUNK).collect();
    let mut logits = None;
    for (i, chunk) in chunks.iter().enumerate() {
        logits = engine.step(session, chunk, None, step == 0 && i + 1 == chunks.len())?.logits;
    }
    for (j, &t) in tokens[..step].iter().enumerate() {
        logits = engine.step(session, &[t], None, j + 1 == step)?.logits;
    }
    engine.close(session);
    let logits = logits.ok_or_else(|| anyhow::anyhow!("the engine returned no logits"))?;
    let (mut top, mut second) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for v in logits {
        if v > top {
            (top, second) = (v, top);
        } else if v > second {
            second = v;
        }
    }
    Ok(top - second)
}

fn percentile(v: &[Duration], p: f64) -> Duration {
    let mut v = v.to_vec();
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[(((p / 100.0) * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)]
}

fn report(
    args: &BenchArgs,
    threads: usize,
    opened: &Opened,
    engines: &[(usize, Running)],
    best: &[Measure],
    gaps: &[Option<f32>],
) -> Result<()> {
    let base = best.first().map_or(1.0, |m| m.decode_tok_s);
    let weight_bytes_per_token = opened.file.layer_bytes()?.per_token();
    // On a CPU, batch-of-one decode streams those bytes and little else: the
    // machine's read bandwidth over them is the speed it cannot pass.
    let bandwidth = opened.device.is_cpu().then(sollol::sys::read_bandwidth);
    let bound = bandwidth.map(|b| b / weight_bytes_per_token as f64);
    let base_tokens = best.first().map(|m| m.tokens.as_slice()).unwrap_or_default();
    let base_prefill = best.first().map_or(1.0, |m| m.prefill_tok_s);
    let rows: Vec<serde_json::Value> = engines
        .iter()
        .zip(best)
        .zip(gaps)
        .map(|(((n, _), m), gap)| {
            let util: Vec<f64> = m.stage_busy.iter().map(|b| b.as_secs_f64() / m.decode_wall.as_secs_f64()).collect();
            serde_json::json!({
                "stages": n,
                "prefill_tok_s": m.prefill_tok_s,
                "decode_tok_s": m.decode_tok_s,
                "decode_ratio": m.decode_tok_s / base,
                "prefill_ratio": m.prefill_tok_s / base_prefill,
                "ttft_ms": m.ttft.as_secs_f64() * 1e3,
                "hop_latency_p50_ms": percentile(&m.hop_latencies, 50.0).as_secs_f64() * 1e3,
                "hop_latency_p99_ms": percentile(&m.hop_latencies, 99.0).as_secs_f64() * 1e3,
                "bytes_per_token_per_hop": m.hop_bytes.first().copied().unwrap_or(0),
                "stage_utilization": util,
                "first_token_mismatch": first_mismatch(base_tokens, &m.tokens),
                "first_mismatch_top2_gap": gap,
            })
        })
        .collect();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "model": opened.resolved.name, "device": args.model.device, "threads": threads, "wire": args.wire.to_string(),
                "weight_bytes_per_token": weight_bytes_per_token, "read_bandwidth_bytes_s": bandwidth,
                "decode_bound_tok_s": bound, "results": rows,
            })
        );
        return Ok(());
    }
    let threads = if threads == 0 { sollol::sys::cpu_cores() } else { threads };
    println!(
        "model {} on {}, {threads} threads in all, {} CPU kernels, prompt {} tok, decode {} tok, wire {}, best of {} interleaved rounds",
        opened.resolved.name,
        args.model.device,
        sollol::kernels::isa(),
        args.prompt_tokens,
        args.tokens,
        args.wire,
        args.rounds
    );
    println!(
        "{:<10} {:>12} {:>8} {:>12} {:>8} {:>9} {:>14} {:>10} {:>8}  stage busy",
        "stages", "prefill t/s", "ratio", "decode t/s", "ratio", "ttft ms", "hop p50/p99 ms", "B/tok/hop", "tokens"
    );
    for r in rows {
        let stages = match r["stages"].as_u64().unwrap_or(0) {
            0 => "in-process".to_string(),
            n => n.to_string(),
        };
        let util: Vec<String> = r["stage_utilization"]
            .as_array()
            .map_or(vec![], |a| a.iter().map(|u| format!("{:.0}%", u.as_f64().unwrap_or(0.0) * 100.0)).collect());
        let tokens = match r["first_token_mismatch"].as_u64() {
            None => "same".to_string(),
            Some(step) => match r["first_mismatch_top2_gap"].as_f64() {
                Some(gap) => format!("differ@{step} (top-2 gap {gap:.3})"),
                None => format!("differ@{step}"),
            },
        };
        println!(
            "{:<10} {:>12.1} {:>8.2} {:>12.1} {:>8.2} {:>9.0} {:>14} {:>10} {:>8}  {}",
            stages,
            r["prefill_tok_s"].as_f64().unwrap_or(0.0),
            r["prefill_ratio"].as_f64().unwrap_or(0.0),
            r["decode_tok_s"].as_f64().unwrap_or(0.0),
            r["decode_ratio"].as_f64().unwrap_or(0.0),
            r["ttft_ms"].as_f64().unwrap_or(0.0),
            format!("{:.3}/{:.3}", r["hop_latency_p50_ms"].as_f64().unwrap_or(0.0), r["hop_latency_p99_ms"].as_f64().unwrap_or(0.0)),
            r["bytes_per_token_per_hop"],
            tokens,
            util.join(" "),
        );
    }
    let ceiling = match (bandwidth, bound) {
        (Some(b), Some(bound)) => format!(
            "; this machine reads {:.1} GB/s with {threads} threads, so one session decodes at most {bound:.1} tok/s (the first row: {:.0}% of that)",
            b / 1e9,
            100.0 * base / bound
        ),
        _ => String::new(),
    };
    println!("weights read per decoded token {}{ceiling}; tokens: greedy tokens vs the first row", human_bytes(weight_bytes_per_token));
    Ok(())
}

/// The first decode step whose greedy token differs from the reference run's.
fn first_mismatch(reference: &[u32], tokens: &[u32]) -> Option<usize> {
    (0..reference.len().max(tokens.len())).find(|&i| reference.get(i) != tokens.get(i))
}

/// `--check-against`: the whole model on `--device` and on `other`, fed the
/// same tokens (the prompt, then the reference device's greedy tokens, so a
/// near-tie cannot make the runs drift apart); reports per step the largest
/// logit difference relative to the largest logit, and whether the top token
/// agrees.
fn check_against(args: &BenchArgs, opened: &mut Opened, other: &str, prompt: &[u32]) -> Result<()> {
    use candle_core::Tensor;
    let other_device = sollol::model::device::parse(other)?;
    let slices = [load_slice(&mut opened.file, None, &opened.device)?, load_slice(&mut opened.file, None, &other_device)?];
    let capacity = prompt.len() + args.tokens + 1;
    let mut caches = slices.iter().map(|s| s.new_cache(capacity)).collect::<sollol::Result<Vec<_>>>()?;
    let (mut worst_rel, mut worst_abs, mut agree, mut steps) = (0f64, 0f64, 0usize, 0usize);
    // Where the top tokens differ: the reference's own margin between them.
    let mut worst_tie = 0f64;
    let mut input = prompt.to_vec();
    for step in 0..=args.tokens {
        let mut logits = Vec::new();
        for (slice, cache) in slices.iter().zip(caches.iter_mut()) {
            let x = Tensor::new(input.as_slice(), slice.device())?.unsqueeze(0)?;
            logits.push(slice.forward(&x, cache)?.into_values()?);
        }
        let (a, b) = (&logits[0], &logits[1]);
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        let abs = a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs() as f64));
        let rel = abs / scale.max(f64::MIN_POSITIVE);
        let (ta, tb) = (sollol::model::sampling::argmax(a), sollol::model::sampling::argmax(b));
        agree += usize::from(ta == tb);
        if ta != tb {
            worst_tie = worst_tie.max((b[tb as usize] - b[ta as usize]) as f64);
        }
        steps += 1;
        worst_rel = worst_rel.max(rel);
        worst_abs = worst_abs.max(abs);
        if args.json {
            println!("{}", serde_json::json!({"step": step, "max_abs_err": abs, "max_rel_err": rel, "top_agrees": ta == tb}));
        }
        input = vec![tb];
    }
    let summary = serde_json::json!({
        "model": opened.resolved.name, "device": args.model.device, "against": other, "prompt_tokens": prompt.len(),
        "backends": [format!("{:?}", slices[0].backend()), format!("{:?}", slices[1].backend())],
        "steps": steps, "top_token_agreement": agree, "max_abs_err": worst_abs, "max_rel_err": worst_rel,
        "max_disagreement_margin": worst_tie,
    });
    if args.json {
        println!("{summary}");
    } else {
        println!(
            "{} on {} vs {other}: prompt {} tok then {} decode steps; largest logit difference {worst_abs:.3e} = {worst_rel:.3e} of the largest logit; top token agrees in {agree}/{steps} steps{}",
            opened.resolved.name,
            args.model.device,
            prompt.len(),
            args.tokens,
            if agree < steps { format!(" (where not, {other}'s top two logits were within {worst_tie:.3e})") } else { String::new() }
        );
    }
    Ok(())
}

fn load_report(args: &BenchArgs) -> Result<()> {
    let mut opened = args.model.open()?;
    let layers = args.layers.as_deref().map(parse_layers).transpose()?;
    let start = Instant::now();
    let slice = load_slice(&mut opened.file, layers, &opened.device)?;
    let load_s = start.elapsed().as_secs_f64();
    let peak = peak_rss_bytes().unwrap_or(0);
    let layers = format!("{}..{}", slice.layers().start, slice.layers().end);
    if args.json {
        let v = serde_json::json!({
            "model": opened.resolved.name, "layers": layers, "weight_bytes": slice.weight_bytes(),
            "load_s": load_s, "peak_rss_bytes": peak,
        });
        println!("{v}");
    } else {
        println!("model        {}", opened.resolved.name);
        println!("layers       {layers}");
        println!("weights      {}", human_bytes(slice.weight_bytes() as u64));
        println!("load         {load_s:.2} s");
        println!("peak RSS     {}", human_bytes(peak));
    }
    Ok(())
}

/// `sollol bench --url`: requests/s and time to first token of a running
/// server at several numbers of concurrent clients (streaming /api/generate).
pub fn http(url: &str, model: &str, clients: &[usize], requests: usize, tokens: usize, json: bool) -> Result<()> {
    use std::io::{BufRead, BufReader};
    let base = format!("http://{}", url.trim_start_matches("http://").trim_end_matches('/'));
    let generate = format!("{base}/api/generate");
    let body = format!(
        r#"{{"model":"{model}","prompt":"The capital of France is","raw":true,"options":{{"temperature":0,"num_predict":{tokens}}}}}"#
    );
    // Warm up: load the model.
    ureq::post(&generate)
        .send_string(&body.replace(r#""raw":true"#, r#""raw":true,"stream":false"#))
        .with_context(|| format!("the server at {base} did not load {model}"))?;
    // Node counters (compute time, positions, batches) from the server's status.
    let counters = || -> Vec<(f64, u64, u64)> {
        let v: serde_json::Value =
            ureq::get(&format!("{base}/api/sollol/status")).call().ok().and_then(|r| r.into_json().ok()).unwrap_or_default();
        v["nodes"]
            .as_array()
            .map(|nodes| {
                nodes
                    .iter()
                    .map(|n| {
                        (n["busy_ms"].as_f64().unwrap_or(0.0), n["positions"].as_u64().unwrap_or(0), n["batches"].as_u64().unwrap_or(0))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut rows = Vec::new();
    for &c in clients {
        let per_client = requests.div_ceil(c);
        let before = counters();
        let start = Instant::now();
        let handles: Vec<_> = (0..c)
            .map(|_| {
                let (generate, body) = (generate.clone(), body.clone());
                std::thread::spawn(move || {
                    let mut ttfts = Vec::new();
                    for _ in 0..per_client {
                        let t = Instant::now();
                        let mut first = None;
                        let mut generated = 0;
                        // A refused request, or a stream that ends without its
                        // final line (an error mid-stream), failed.
                        let Ok(reply) = ureq::post(&generate).send_string(&body) else {
                            ttfts.push(None);
                            continue;
                        };
                        let mut finished = false;
                        for line in BufReader::new(reply.into_reader()).lines().map_while(|l| l.ok()) {
                            if first.is_none() && line.contains("\"done\":false") {
                                first = Some(t.elapsed());
                            }
                            if line.contains("\"done\":true") {
                                let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                                generated = v["eval_count"].as_u64().unwrap_or(0);
                                finished = true;
                                break;
                            }
                        }
                        ttfts.push(finished.then(|| (first.unwrap_or_else(|| t.elapsed()), generated)));
                    }
                    ttfts
                })
            })
            .collect();
        let all: Vec<Option<(Duration, u64)>> = handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect();
        let wall = start.elapsed().as_secs_f64();
        let done: Vec<(Duration, u64)> = all.iter().flatten().copied().collect();
        let failed = all.len() - done.len();
        let ttfts: Vec<Duration> = done.iter().map(|d| d.0).collect();
        let generated: u64 = done.iter().map(|d| d.1).sum();
        let after = counters();
        // Per node: share of the wall time spent computing, and positions
        // per batch; none for a node whose counters went back (it restarted).
        let (busy, batch): (Vec<Option<f64>>, Vec<Option<f64>>) = before
            .iter()
            .zip(&after)
            .map(|(b, a)| match (a.0 >= b.0, a.1.checked_sub(b.1), a.2.checked_sub(b.2)) {
                (true, Some(positions), Some(batches)) => {
                    (Some((a.0 - b.0) / (wall * 1e3)), Some(positions as f64 / batches.max(1) as f64))
                }
                _ => (None, None),
            })
            .unzip();
        rows.push(serde_json::json!({
            "node_busy": busy,
            "rows_per_batch": batch,
            "clients": c,
            "requests": ttfts.len(),
            "failed": failed,
            "requests_per_s": ttfts.len() as f64 / wall,
            "tokens_per_s": generated as f64 / wall,
            "ttft_p50_ms": percentile(&ttfts, 50.0).as_secs_f64() * 1e3,
            "ttft_p99_ms": percentile(&ttfts, 99.0).as_secs_f64() * 1e3,
        }));
    }
    if json {
        println!("{}", serde_json::json!({"url": url, "model": model, "tokens": tokens, "results": rows}));
    } else {
        println!("{url}, model {model}, {tokens} tokens per request, streaming /api/generate");
        println!(
            "{:>8} {:>9} {:>7} {:>12} {:>12} {:>14} {:>14}  node busy / rows per batch",
            "clients", "requests", "failed", "requests/s", "tokens/s", "ttft p50 ms", "ttft p99 ms"
        );
        for r in rows {
            let nodes: Vec<String> = r["node_busy"]
                .as_array()
                .into_iter()
                .flatten()
                .zip(r["rows_per_batch"].as_array().into_iter().flatten())
                .map(|(u, b)| match (u.as_f64(), b.as_f64()) {
                    (Some(u), Some(b)) => format!("{:.0}%/{b:.1}", u * 100.0),
                    _ => "restarted".into(),
                })
                .collect();
            println!(
                "{:>8} {:>9} {:>7} {:>12.2} {:>12.1} {:>14.0} {:>14.0}  {}",
                r["clients"].as_u64().unwrap_or(0),
                r["requests"].as_u64().unwrap_or(0),
                r["failed"].as_u64().unwrap_or(0),
                r["requests_per_s"].as_f64().unwrap_or(0.0),
                r["tokens_per_s"].as_f64().unwrap_or(0.0),
                r["ttft_p50_ms"].as_f64().unwrap_or(0.0),
                r["ttft_p99_ms"].as_f64().unwrap_or(0.0),
                nodes.join(" ")
            );
        }
    }
    Ok(())
}
