//! sollol's slice forward against candle-transformers' `quantized_llama` on the
//! default model, same process, same threads, interleaved: prefill of a
//! 128-token prompt and greedy-style decode steps. A summary with tok/s and
//! the ratio is printed at the end, plus the peak RSS of loading a third of
//! the blocks against the whole model (measured in child processes).
//!
//! Run: `cargo bench --bench engine` (RAYON_NUM_THREADS sets the threads).

use std::fs::File;
use std::io::BufReader;
use std::time::{Duration, Instant};

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use criterion::{criterion_group, Criterion};
use sollol::model::{ModelFile, ModelSlice};

const PROMPT: usize = 128;
const DECODE: usize = 32;

fn prompt_ids() -> Vec<u32> {
    (0..PROMPT as u32).map(|i| (i * 7919 + 13) % 49152).collect()
}

struct Sides {
    reference: ModelWeights,
    ours: ModelSlice,
}

fn load() -> Sides {
    let path = sollol::model::source::resolve("smollm2").expect("default model").path;
    let mut reader = BufReader::new(File::open(&path).unwrap());
    let content = gguf_file::Content::read(&mut reader).unwrap();
    let reference = ModelWeights::from_gguf(content, &mut reader, &Device::Cpu).unwrap();
    let mut file = ModelFile::open(&path).unwrap();
    let n = file.config().unwrap().n_layers;
    let ours = ModelSlice::load(&mut file, 0..n, &Device::Cpu).unwrap();
    Sides { reference, ours }
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
    g.bench_function("candle_quantized_llama", |b| {
        b.iter_custom(|n| (0..n).map(|_| reference_prefill(&mut sides.reference)).sum())
    });
    g.finish();
    let mut g = c.benchmark_group("decode_32");
    g.sample_size(10);
    g.bench_function("sollol", |b| b.iter_custom(|n| (0..n).map(|_| sollol_decode(&sides.ours)).sum()));
    g.bench_function("candle_quantized_llama", |b| {
        b.iter_custom(|n| (0..n).map(|_| reference_decode(&mut sides.reference)).sum())
    });
    g.finish();
    summary(&mut sides);
}

/// Interleaved A/B rounds, best of each, so machine noise hits both sides alike.
fn summary(sides: &mut Sides) {
    let rounds = 5;
    let best = |v: Vec<Duration>| v.into_iter().min().unwrap().as_secs_f64();
    let (mut sp, mut rp, mut sd, mut rd) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        sp.push(sollol_prefill(&sides.ours));
        rp.push(reference_prefill(&mut sides.reference));
        sd.push(sollol_decode(&sides.ours));
        rd.push(reference_decode(&mut sides.reference));
    }
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| sollol::sys::cpu_cores().to_string());
    let (sp, rp) = (PROMPT as f64 / best(sp), PROMPT as f64 / best(rp));
    let (sd, rd) = (DECODE as f64 / best(sd), DECODE as f64 / best(rd));
    println!("\nSUMMARY smollm2 Q4_1, {threads} threads, best of {rounds} interleaved rounds");
    println!("prefill {PROMPT} tok: sollol {sp:.1} tok/s, quantized_llama {rp:.1} tok/s, ratio {:.2}", sp / rp);
    println!("decode {DECODE} tok:  sollol {sd:.1} tok/s, quantized_llama {rd:.1} tok/s, ratio {:.2}", sd / rd);
    rss_summary();
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
    benches();
    Criterion::default().configure_from_args().final_summary();
}
