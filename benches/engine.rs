//! sollol's slice forward against candle-transformers' `quantized_llama` on the
//! default model (SmolLM2, the llama architecture), same process, same
//! threads, interleaved: prefill of a 128-token prompt and greedy-style
//! decode steps. The summary at the end repeats the comparison on the model
//! re-quantized to Q4_0 and Q8_0 throughout (`sollol quantize --pure`, into
//! a temporary directory), measures batched
//! decoding (8 sessions per step against 1), and the peak RSS of loading a
//! third of the blocks against the whole model (in child processes). It
//! then covers two more shapes: Gemma-3-270M Q4_K_M (`--model gemma3`,
//! fetched like the default) against candle-transformers' `quantized_gemma3`
//! (which gates with SiLU where Gemma's GELU is, and slides no window when
//! decoding: the same products, so its speed is still the reference's), and
//! the synthetic Mixtral-shaped `moe-1b` in Q4_0 on our kernels against our
//! candle path (`quantized_llama`'s MoE op for op; candle-transformers'
//! reader takes only older per-expert files).
//!
//! Run: `cargo bench --bench engine`; both sides use every core, or
//! `RAYON_NUM_THREADS` threads each (candle's pool reads it; ours is set
//! from it).

use std::fs::File;
use std::io::BufReader;
use std::time::{Duration, Instant};

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::{quantized_gemma3, quantized_llama};
use criterion::{criterion_group, Criterion};
use std::path::Path;

use candle_core::quantized::GgmlDType;
use sollol::model::{Backend, BatchItem, HostInput, ModelFile, ModelSlice};

const PROMPT: usize = 128;
const DECODE: usize = 32;

fn prompt_ids(vocab: u32) -> Vec<u32> {
    (0..PROMPT as u32).map(|i| (i * 7919 + 13) % vocab).collect()
}

/// What sollol's slice is timed against.
enum Reference {
    Llama(quantized_llama::ModelWeights),
    Gemma(quantized_gemma3::ModelWeights),
    /// Our own slice on the candle backend, and its cache (boxed: a slice
    /// and a cache outweigh candle's models many times over).
    Candle(Box<(ModelSlice, Option<sollol::model::KvCache>)>),
}

impl Reference {
    fn name(&self) -> &'static str {
        match self {
            Reference::Llama(_) => "quantized_llama",
            Reference::Gemma(_) => "quantized_gemma3",
            Reference::Candle(..) => "candle path",
        }
    }

    /// One forward at `pos`; position 0 starts a new sequence.
    fn forward(&mut self, tokens: &[u32], pos: usize) {
        match self {
            Reference::Llama(m) => {
                if pos == 0 {
                    m.clear_kv_cache();
                }
                m.forward(&ids(tokens), pos).unwrap();
            }
            // Its cache starts over at position 0.
            Reference::Gemma(m) => drop(m.forward(&ids(tokens), pos).unwrap()),
            Reference::Candle(c) => {
                let (s, cache) = &mut **c;
                if pos == 0 {
                    *cache = Some(s.new_cache(PROMPT + DECODE + 1).unwrap());
                }
                s.forward(&ids(tokens), cache.as_mut().unwrap()).unwrap();
            }
        }
    }
}

struct Sides {
    reference: Reference,
    ours: ModelSlice,
    bytes_per_token: u64,
    /// Token ids of the prompts and steps stay below it.
    vocab: u32,
}

fn default_model() -> std::path::PathBuf {
    sollol::model::source::resolve("smollm2").expect("default model").path
}

fn load() -> Sides {
    load_from(&default_model())
}

/// `path` on our kernels against candle-transformers' implementation of its architecture.
fn load_from(path: &Path) -> Sides {
    let mut reader = BufReader::new(File::open(path).unwrap());
    let content = gguf_file::Content::read(&mut reader).unwrap();
    let file = ModelFile::open(path).unwrap();
    let config = file.config().unwrap();
    let reference = match config.arch.name {
        "gemma3" => Reference::Gemma(quantized_gemma3::ModelWeights::from_gguf(content, &mut reader, &Device::Cpu).unwrap()),
        _ => Reference::Llama(quantized_llama::ModelWeights::from_gguf(content, &mut reader, &Device::Cpu).unwrap()),
    };
    sides(file, reference)
}

fn sides(mut file: ModelFile, reference: Reference) -> Sides {
    let config = file.config().unwrap();
    let ours = ModelSlice::load(&mut file, 0..config.n_layers, &Device::Cpu).unwrap();
    Sides { reference, ours, bytes_per_token: file.layer_bytes().unwrap().per_token(), vocab: config.vocab_size as u32 }
}

/// A synthetic shape on our kernels against the same weights on our candle path.
fn load_synthetic(spec: &str) -> Sides {
    let mut file = ModelFile::open(Path::new(spec)).unwrap();
    let n = file.config().unwrap().n_layers;
    let candle = ModelSlice::load_with(&mut file, 0..n, &Device::Cpu, Backend::Candle).unwrap();
    sides(file, Reference::Candle(Box::new((candle, None))))
}

fn ids(t: &[u32]) -> Tensor {
    Tensor::new(t, &Device::Cpu).unwrap().unsqueeze(0).unwrap()
}

fn sollol_prefill(s: &Sides) -> Duration {
    let mut cache = s.ours.new_cache(PROMPT + DECODE + 1).unwrap();
    let t = Instant::now();
    s.ours.forward(&ids(&prompt_ids(s.vocab)), &mut cache).unwrap();
    t.elapsed()
}

fn reference_prefill(s: &mut Sides) -> Duration {
    let prompt = prompt_ids(s.vocab);
    let t = Instant::now();
    s.reference.forward(&prompt, 0);
    t.elapsed()
}

/// Time of `DECODE` single-token steps after a 16-token prompt.
fn sollol_decode(s: &Sides) -> Duration {
    let mut cache = s.ours.new_cache(PROMPT + DECODE + 1).unwrap();
    s.ours.forward(&ids(&prompt_ids(s.vocab)[..16]), &mut cache).unwrap();
    let t = Instant::now();
    for i in 0..DECODE as u32 {
        s.ours.forward(&ids(&[i * 31 + 7]), &mut cache).unwrap();
    }
    t.elapsed()
}

fn reference_decode(s: &mut Sides) -> Duration {
    s.reference.forward(&prompt_ids(s.vocab)[..16], 0);
    let t = Instant::now();
    for i in 0..DECODE as u32 {
        s.reference.forward(&[i * 31 + 7], 16 + i as usize);
    }
    t.elapsed()
}

fn bench(c: &mut Criterion) {
    let mut sides = load();
    let mut g = c.benchmark_group("prefill_128");
    g.sample_size(10);
    g.bench_function("sollol", |b| b.iter_custom(|n| (0..n).map(|_| sollol_prefill(&sides)).sum()));
    g.bench_function("candle_quantized_llama", |b| b.iter_custom(|n| (0..n).map(|_| reference_prefill(&mut sides)).sum()));
    g.finish();
    let mut g = c.benchmark_group("decode_32");
    g.sample_size(10);
    g.bench_function("sollol", |b| b.iter_custom(|n| (0..n).map(|_| sollol_decode(&sides)).sum()));
    g.bench_function("candle_quantized_llama", |b| b.iter_custom(|n| (0..n).map(|_| reference_decode(&mut sides)).sum()));
    g.finish();
    summary(&mut sides);
}

/// Aggregate decode tok/s of `sessions` sessions stepped together, one batch per step.
fn sollol_batched_decode(s: &ModelSlice, sessions: usize) -> f64 {
    let mut caches: Vec<_> = (0..sessions).map(|_| s.new_cache(PROMPT + DECODE + 1).unwrap()).collect();
    for c in caches.iter_mut() {
        s.forward(&ids(&prompt_ids(49152)[..16]), c).unwrap();
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
    compare("smollm2 Q4_1 (as shipped)", sides);
    let dir = tempfile::tempdir().unwrap();
    for (name, dtype) in [("Q4_0", GgmlDType::Q4_0), ("Q8_0", GgmlDType::Q8_0)] {
        let path = dir.path().join(format!("smollm2-{name}.gguf"));
        // Pure: the comparison is of the kernels of one type.
        let target = sollol::model::gguf::QuantTarget { base: dtype, medium: false, pure: true };
        sollol::model::gguf::requantize(&default_model(), &path, target).unwrap();
        compare(&format!("smollm2 {name} (re-quantized)"), &mut load_from(&path));
    }
    let (mut one, mut eight) = (0f64, 0f64);
    for _ in 0..5 {
        one = one.max(sollol_batched_decode(&sides.ours, 1));
        eight = eight.max(sollol_batched_decode(&sides.ours, 8));
    }
    println!("batched decode (Q4_1): 1 session {one:.1} tok/s, 8 sessions {eight:.1} tok/s aggregate, ratio {:.2}", eight / one);
    rss_summary();
    let gemma = sollol::model::source::resolve("gemma3").expect("Gemma-3-270M").path;
    compare("gemma-3-270m Q4_K_M", &mut load_from(&gemma));
    compare("synthetic moe-1b Q4_0", &mut load_synthetic("synthetic:moe-1b:q4_0"));
}

fn compare(label: &str, sides: &mut Sides) {
    let rounds = 5;
    let best = |v: Vec<Duration>| v.into_iter().min().unwrap().as_secs_f64();
    let (mut sp, mut rp, mut sd, mut rd) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        sp.push(sollol_prefill(sides));
        rp.push(reference_prefill(sides));
        sd.push(sollol_decode(sides));
        rd.push(reference_decode(sides));
    }
    let (sp, rp) = (PROMPT as f64 / best(sp), PROMPT as f64 / best(rp));
    let (sd, rd) = (DECODE as f64 / best(sd), DECODE as f64 / best(rd));
    let name = sides.reference.name();
    println!("{label}:");
    println!("  prefill {PROMPT} tok: sollol {sp:.1} tok/s, {name} {rp:.1} tok/s, ratio {:.2}", sp / rp);
    println!("  decode {DECODE} tok:  sollol {sd:.1} tok/s, {name} {rd:.1} tok/s, ratio {:.2}", sd / rd);
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
