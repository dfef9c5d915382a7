//! sollol's slice forward against candle-transformers' `quantized_llama` on the
//! default model (SmolLM2, the llama architecture), same process, same
//! threads, interleaved: prefill of a 128-token prompt and greedy-style
//! decode steps. The summary at the end repeats the comparison on the model
//! re-quantized to Q4_0 and Q8_0 throughout (`sollol quantize --pure`, into
//! a temporary directory), measures batched
//! decoding (8 sessions per step against 1), and the peak RSS of loading a
//! third of the blocks against the whole model (in child processes).
//!
//! Run: `cargo bench --bench engine`; both sides use every core, or
//! `RAYON_NUM_THREADS` threads each (candle's pool reads it; ours is set
//! from it).

use std::fs::File;
use std::io::BufReader;
use std::time::{Duration, Instant};

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use criterion::{criterion_group, Criterion};
use std::path::Path;

use candle_core::quantized::GgmlDType;
use sollol::model::{BatchItem, HostInput, ModelFile, ModelSlice};

const PROMPT: usize = 128;
const DECODE: usize = 32;

fn prompt_ids() -> Vec<u32> {
    (0..PROMPT as u32).map(|i| (i * 7919 + 13) % 49152).collect()
}

struct Sides {
    reference: ModelWeights,
    ours: ModelSlice,
    bytes_per_token: u64,
}

fn default_model() -> std::path::PathBuf {
    sollol::model::source::resolve("smollm2").expect("default model").path
}

fn load() -> Sides {
    load_from(&default_model())
}

fn load_from(path: &Path) -> Sides {
    let mut reader = BufReader::new(File::open(path).unwrap());
    let content = gguf_file::Content::read(&mut reader).unwrap();
    let reference = ModelWeights::from_gguf(content, &mut reader, &Device::Cpu).unwrap();
    let mut file = ModelFile::open(path).unwrap();
    let n = file.config().unwrap().n_layers;
    let ours = ModelSlice::load(&mut file, 0..n, &Device::Cpu).unwrap();
    Sides { reference, ours, bytes_per_token: file.layer_bytes().unwrap().per_token() }
}

fn ids(t: &[u32]) -> Tensor {
    Tensor::new(t, &Device::Cpu).unwrap().unsqueeze(0).unwrap()
}

fn sollol_prefill(s: &ModelSlice) -> Duration {
    let mut cache = s.new_cache(PROMPT + DECODE + 1).unwrap();
    let t = Instant::now();
    s.forward(&ids(&prompt_ids()), &mut cache).unwrap();
    t.elapsed()
}

fn reference_prefill(m: &mut ModelWeights) -> Duration {
    m.clear_kv_cache();
    let t = Instant::now();
    m.forward(&ids(&prompt_ids()), 0).unwrap();
    t.elapsed()
}

/// Time of `DECODE` single-token steps after a 16-token prompt.
fn sollol_decode(s: &ModelSlice) -> Duration {
    let mut cache = s.new_cache(PROMPT + DECODE + 1).unwrap();
    s.forward(&ids(&prompt_ids()[..16]), &mut cache).unwrap();
    let t = Instant::now();
    for i in 0..DECODE as u32 {
        s.forward(&ids(&[i * 31 + 7]), &mut cache).unwrap();
    }
    t.elapsed()
}

fn reference_decode(m: &mut ModelWeights) -> Duration {
    m.clear_kv_cache();
    m.forward(&ids(&prompt_ids()[..16]), 0).unwrap();
    let t = Instant::now();
    for i in 0..DECODE as u32 {
        m.forward(&ids(&[i * 31 + 7]), 16 + i as usize).unwrap();
    }
    t.elapsed()
}

fn bench(c: &mut Criterion) {
    let mut sides = load();
    let mut g = c.benchmark_group("prefill_128");
    g.sample_size(10);
    g.bench_function("sollol", |b| b.iter_custom(|n| (0..n).map(|_| sollol_prefill(&sides.ours)).sum()));
    g.bench_function("candle_quantized_llama", |b| b.iter_custom(|n| (0..n).map(|_| reference_prefill(&mut sides.reference)).sum()));
    g.finish();
    let mut g = c.benchmark_group("decode_32");
    g.sample_size(10);
    g.bench_function("sollol", |b| b.iter_custom(|n| (0..n).map(|_| sollol_decode(&sides.ours)).sum()));
    g.bench_function("candle_quantized_llama", |b| b.iter_custom(|n| (0..n).map(|_| reference_decode(&mut sides.reference)).sum()));
    g.finish();
    summary(&mut sides);
}

/// Aggregate decode tok/s of `sessions` sessions stepped together, one batch per step.
fn sollol_batched_decode(s: &ModelSlice, sessions: usize) -> f64 {
    let mut caches: Vec<_> = (0..sessions).map(|_| s.new_cache(PROMPT + DECODE + 1).unwrap()).collect();
    for c in caches.iter_mut() {
        s.forward(&ids(&prompt_ids()[..16]), c).unwrap();
    }
    let t = Instant::now();
    for i in 0..DECODE as u32 {
        let tokens: Vec<[u32; 1]> = (0..sessions as u32).map(|j| [(i * 31 + j * 101 + 7) % 49152]).collect();
        let mut items: Vec<BatchItem> =
            tokens.iter().zip(caches.iter_mut()).map(|(t, cache)| BatchItem { input: HostInput::Tokens(t), cache }).collect();
        s.forward_batch(&mut items).unwrap();
    }
    (sessions * DECODE) as f64 / t.elapsed().as_secs_f64()
}

/// Interleaved A/B rounds, best of each, so machine noise hits both sides alike.
fn summary(sides: &mut Sides) {
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| sollol::sys::cpu_cores().to_string());
    println!("\nSUMMARY {threads} threads, best of 5 interleaved rounds");
    // Decode of one session streams the weights: this is its ceiling per byte.
    println!("memory read bandwidth {:.1} GB/s", sollol::sys::read_bandwidth() / 1e9);
    compare("Q4_1 (as shipped)", sides);
    let dir = tempfile::tempdir().unwrap();
    for (name, dtype) in [("Q4_0", GgmlDType::Q4_0), ("Q8_0", GgmlDType::Q8_0)] {
        let path = dir.path().join(format!("smollm2-{name}.gguf"));
        // Pure: the comparison is of the kernels of one type.
        let target = sollol::model::gguf::QuantTarget { base: dtype, medium: false, pure: true };
        sollol::model::gguf::requantize(&default_model(), &path, target).unwrap();
        compare(&format!("{name} (re-quantized)"), &mut load_from(&path));
    }
    let (mut one, mut eight) = (0f64, 0f64);
    for _ in 0..5 {
        one = one.max(sollol_batched_decode(&sides.ours, 1));
        eight = eight.max(sollol_batched_decode(&sides.ours, 8));
    }
    println!("batched decode (Q4_1): 1 session {one:.1} tok/s, 8 sessions {eight:.1} tok/s aggregate, ratio {:.2}", eight / one);
    rss_summary();
}

fn compare(label: &str, sides: &mut Sides) {
    let rounds = 5;
    let best = |v: Vec<Duration>| v.into_iter().min().unwrap().as_secs_f64();
    let (mut sp, mut rp, mut sd, mut rd) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        sp.push(sollol_prefill(&sides.ours));
        rp.push(reference_prefill(&mut sides.reference));
        sd.push(sollol_decode(&sides.ours));
        rd.push(reference_decode(&mut sides.reference));
    }
    let (sp, rp) = (PROMPT as f64 / best(sp), PROMPT as f64 / best(rp));
    let (sd, rd) = (DECODE as f64 / best(sd), DECODE as f64 / best(rd));
    println!("smollm2 {label}:");
    println!("  prefill {PROMPT} tok: sollol {sp:.1} tok/s, quantized_llama {rp:.1} tok/s, ratio {:.2}", sp / rp);
    println!("  decode {DECODE} tok:  sollol {sd:.1} tok/s, quantized_llama {rd:.1} tok/s, ratio {:.2}", sd / rd);
    let bytes = sides.bytes_per_token;
    println!("  decode reads {:.1} MiB per token: {:.1} GB/s", bytes as f64 / 1048576.0, bytes as f64 * sd / 1e9);
}

/// Peak RSS of `sollol bench --load-only` for the whole model and blocks 10..20.
fn rss_summary() {
    let bin = env!("CARGO_BIN_EXE_sollol");
    let peak = |layers: Option<&str>| -> u64 {
        let mut cmd = std::process::Command::new(bin);
        cmd.args(["bench", "--load-only", "--json"]);
        if let Some(l) = layers {
            cmd.args(["--layers", l]);
        }
        let out = cmd.output().expect("run sollol bench");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bench json");
        v["peak_rss_bytes"].as_u64().unwrap_or(0)
    };
    let whole = peak(None);
    let third = peak(Some("10..20"));
    println!(
        "peak RSS after load: whole model {:.1} MiB, blocks 10..20 {:.1} MiB, ratio {:.2}",
        whole as f64 / 1048576.0,
        third as f64 / 1048576.0,
        third as f64 / whole as f64
    );
}

criterion_group!(benches, bench);

fn main() {
    if let Some(n) = std::env::var("RAYON_NUM_THREADS").ok().and_then(|n| n.parse().ok()) {
        sollol::sys::set_threads(n);
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
