//! Structure-aware fuzzing, on stable Rust, of every decoder that reads
//! what a peer, a file or a client wrote: frames and the messages in them,
//! activation and KV payloads, GGUF headers, the HTTP request bodies.
//!
//! Each input is built from a seed: a valid value of the target's type with
//! interesting numbers in its fields (0, 1, powers of two, the type's
//! maximum), encoded, then mutated a few bytes at a time (or a JSON value at
//! a time). The real decoders run on it in-process; a panic is caught and
//! counted with its seed, and a counting allocator records the largest
//! single allocation, which must stay under a bound no input of this size
//! justifies exceeding.
//!
//! `cargo run --release --example fuzz -- --iterations 1000000` runs a
//! million inputs per target; `tests/fuzz.rs` runs a share of that in CI.

use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::http::HeaderMap;
use candle_core::quantized::GgmlDType;
use candle_core::Device;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sollol::api::{ollama, openai};
use sollol::head::chat::{ChatTemplate, CHATML};
use sollol::model::sampling::SamplingParams;
use sollol::model::{KvCache, ModelFile};
use sollol::net::frame::{self, Frame, Limits};
use sollol::net::kv;
use sollol::net::message::*;
use sollol::net::tensor::{self, TensorHeader, WireDType};

#[path = "../tests/common/tiny.rs"]
#[allow(dead_code)]
mod tiny;

/// The largest single allocation any input here may cause: inputs are at
/// most a few hundred KiB, so anything near this was sized by a count
/// inside an input.
pub const ALLOCATION_BOUND: usize = 64 << 20;

/// Records the largest allocation asked for.
struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; only a
// size is recorded on the side.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's layout contract is forwarded as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, that is from `System`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

pub const TARGETS: [&str; 6] = ["frame", "kv", "tensor", "gguf", "http", "schema"];

/// What one target's run found.
#[derive(Debug)]
pub struct Outcome {
    pub target: &'static str,
    pub inputs: u64,
    /// Inputs the decoders accepted (the rest were refused with an error).
    pub accepted: u64,
    pub panics: u64,
    /// The seed and message of the first panic.
    pub first_panic: Option<(u64, String)>,
    pub largest_allocation: usize,
}

/// Runs `iterations` inputs of `target` from `seed`.
pub fn run(target: &'static str, iterations: u64, seed: u64) -> Outcome {
    let mut fuzz = Fuzz::new(target);
    // Panics are the finding, counted below; their default report would
    // drown the summary.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    LARGEST.store(0, Ordering::Relaxed);
    let mut out = Outcome { target, inputs: 0, accepted: 0, panics: 0, first_panic: None, largest_allocation: 0 };
    for i in 0..iterations {
        let input_seed = seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut rng = StdRng::seed_from_u64(input_seed);
        out.inputs += 1;
        match catch_unwind(AssertUnwindSafe(|| fuzz.one(&mut rng))) {
            Ok(true) => out.accepted += 1,
            Ok(false) => {}
            Err(panic) => {
                out.panics += 1;
                if out.first_panic.is_none() {
                    let what = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned());
                    out.first_panic = Some((input_seed, what.unwrap_or_default()));
                }
            }
        }
    }
    std::panic::set_hook(hook);
    out.largest_allocation = LARGEST.load(Ordering::Relaxed);
    out
}

/// Per-target state built once: seed files, templates.
struct Fuzz {
    target: &'static str,
    gguf_seed: Vec<u8>,
    scratch: PathBuf,
    _dir: Option<tempfile::TempDir>,
    template: Option<ChatTemplate>,
    /// The default model's grammar compiler (the `schema` target).
    grammars: Option<std::sync::Arc<sollol::head::constraint::Grammars>>,
}

impl Fuzz {
    fn new(target: &'static str) -> Self {
        let (gguf_seed, dir) = if target == "gguf" {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let path = dir.path().join("seed.gguf");
            let spec = tiny::TinySpec { layers: 2, hidden: 32, heads: 2, kv_heads: 1, ffn: 64, vocab: 96, ..Default::default() };
            tiny::write_gguf(&path, &spec, "llama", GgmlDType::Q8_0, &[]);
            (std::fs::read(&path).expect("the seed file"), Some(dir))
        } else {
            (Vec::new(), None)
        };
        let scratch = dir.as_ref().map_or_else(PathBuf::new, |d| d.path().join("input.gguf"));
        let template = (target == "http").then(|| ChatTemplate::new(CHATML, "", "").expect("ChatML parses"));
        let grammars = (target == "schema").then(|| {
            let path = sollol::model::source::resolve("smollm2").expect("the default model (sollol pull smollm2)").path;
            let file = ModelFile::open(&path).expect("the default model opens");
            sollol::head::tokenizer::Tokenizer::for_model(&file).expect("its tokenizer").grammars().expect("its grammar compiler")
        });
        Self { target, gguf_seed, scratch, _dir: dir, template, grammars }
    }

    /// One input; true when the decoders accepted it.
    fn one(&mut self, rng: &mut StdRng) -> bool {
        match self.target {
            "frame" => frame_input(rng),
            "kv" => kv_input(rng),
            "tensor" => tensor_input(rng),
            "gguf" => self.gguf_input(rng),
            "http" => self.http_input(rng),
            "schema" => self.schema_input(rng),
            other => panic!("no fuzz target {other}"),
        }
    }

    fn gguf_input(&self, rng: &mut StdRng) -> bool {
        let mut bytes = self.gguf_seed.clone();
        // Most of the header is metadata and the tensor table, near the start.
        let header = bytes.len().min(8192);
        for _ in 0..rng.random_range(1..=4) {
            mutate_bytes(rng, &mut bytes, header);
        }
        write_file(&self.scratch, &bytes);
        let Ok(mut file) = ModelFile::open(&self.scratch) else { return false };
        let Ok(cfg) = file.config() else { return false };
        let _ = file.layer_bytes();
        let _ = sollol::head::tokenizer::Tokenizer::for_model(&file);
        // Loading reads the tensors the header points at.
        sollol::model::ModelSlice::load(&mut file, 0..cfg.n_layers, &Device::Cpu).is_ok()
    }

    /// A JSON schema built from random parts (and mutated), compiled against
    /// the default model's tokenizer as a request's `format` is, then a few
    /// allowed tokens taken through it.
    fn schema_input(&self, rng: &mut StdRng) -> bool {
        let Some(grammars) = &self.grammars else { return false };
        let mut schema = schema_of(rng, 0);
        for _ in 0..rng.random_range(0..=2) {
            mutate_json(rng, &mut schema);
        }
        let format =
            if rng.random_bool(0.1) { sollol::head::constraint::Format::Json } else { sollol::head::constraint::Format::Schema(schema) };
        let Ok(mut c) = grammars.constraint(&format) else { return false };
        for _ in 0..rng.random_range(0..8) {
            let Ok(bits) = c.allowed() else { return true };
            let allowed: Vec<u32> = bits
                .iter()
                .enumerate()
                .flat_map(|(w, &b)| (0..32).filter(move |i| b & (1 << i) != 0).map(move |i| (w * 32 + i) as u32))
                .collect();
            let Some(&t) = allowed.get(rng.random_range(0..allowed.len().max(1))) else { return true };
            if c.commit(t).is_err() || c.is_done() {
                return true;
            }
        }
        true
    }

    fn http_input(&self, rng: &mut StdRng) -> bool {
        let (which, mut body) = http_seed(rng);
        for _ in 0..rng.random_range(0..=3) {
            mutate_json(rng, &mut body);
        }
        let mut text = serde_json::to_vec(&body).expect("a JSON value serializes");
        if rng.random_bool(0.1) {
            let n = text.len();
            mutate_bytes(rng, &mut text, n);
        }
        let headers = HeaderMap::new();
        let gen = match which {
            0 => match ollama::generate_request(&text, &headers) {
                Ok(ollama::Ask::Generate { gen, .. }) => *gen,
                Ok(ollama::Ask::Load(..)) => return true,
                Err(_) => return false,
            },
            1 => match ollama::chat_request(&text, &headers) {
                Ok(ollama::Ask::Generate { gen, .. }) => *gen,
                Ok(ollama::Ask::Load(..)) => return true,
                Err(_) => return false,
            },
            2 => match openai::chat_request(&text, &headers) {
                Ok(a) => a.gen,
                Err(_) => return false,
            },
            _ => match openai::completion_request(&text, &headers) {
                Ok(a) => a.gen,
                Err(_) => return false,
            },
        };
        // What the service does next with a checked request: the prompt
        // through the chat template.
        if let (sollol::head::chat::Prompt::Chat { messages, tools }, Some(t)) = (&gen.prompt, &self.template) {
            let _ = t.render(messages, tools, true);
        }
        true
    }
}

fn write_file(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).expect("write the input file");
}

const U32S: [u32; 12] = [0, 1, 2, 3, 7, 255, 256, 65_535, 65_536, 1 << 31, u32::MAX - 1, u32::MAX];
const U64S: [u64; 8] = [0, 1, 2, 1 << 32, 1 << 53, 1 << 63, u64::MAX - 1, u64::MAX];

fn u32_of(rng: &mut StdRng) -> u32 {
    if rng.random_bool(0.7) {
        U32S[rng.random_range(0..U32S.len())]
    } else {
        rng.random()
    }
}

fn u64_of(rng: &mut StdRng) -> u64 {
    if rng.random_bool(0.7) {
        U64S[rng.random_range(0..U64S.len())]
    } else {
        rng.random()
    }
}

fn small(rng: &mut StdRng) -> u32 {
    rng.random_range(0..8)
}

fn f32_of(rng: &mut StdRng) -> f32 {
    [0.0, -1.0, 1.0, 0.5, 2.0, f32::MAX, f32::MIN, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e-30][rng.random_range(0..11)]
}

fn string_of(rng: &mut StdRng) -> String {
    match rng.random_range(0..5) {
        0 => String::new(),
        1 => "x".repeat(rng.random_range(0..5000)),
        2 => "\u{0}\u{ffff}💥\u{202e}".into(),
        3 => "{{ raise('x') }}{% for %}".into(),
        _ => format!("node-{}", rng.random::<u16>()),
    }
}

fn vec_of<T>(rng: &mut StdRng, f: impl Fn(&mut StdRng) -> T) -> Vec<T> {
    let n = if rng.random_bool(0.9) { rng.random_range(0..6) } else { rng.random_range(0..3000) };
    (0..n).map(|_| f(rng)).collect()
}

fn dtype_of(rng: &mut StdRng) -> WireDType {
    [WireDType::F32, WireDType::F16, WireDType::BF16][rng.random_range(0..3)]
}

fn tensor_header(rng: &mut StdRng) -> TensorHeader {
    let rank = rng.random_range(0..6);
    let shape = (0..rank).map(|_| if rng.random_bool(0.6) { small(rng) } else { u32_of(rng) }).collect();
    TensorHeader { dtype: dtype_of(rng), shape }
}

fn kv_header(rng: &mut StdRng) -> KvStateHeader {
    let pick = |rng: &mut StdRng| if rng.random_bool(0.6) { small(rng) } else { u32_of(rng) };
    KvStateHeader {
        session: u64_of(rng),
        len: pick(rng),
        capacity: pick(rng),
        n_layers: pick(rng),
        n_kv_heads: pick(rng),
        head_dim: pick(rng),
        dtype: dtype_of(rng),
    }
}

/// A payload the header implies when that is small, else a random length.
fn payload_for(rng: &mut StdRng, implied: Option<u64>) -> Vec<u8> {
    let n = match implied {
        Some(n) if n <= 1 << 16 && rng.random_bool(0.7) => n as usize,
        _ => rng.random_range(0..512),
    };
    (0..n).map(|_| rng.random()).collect()
}

fn tensor_bytes(h: &TensorHeader) -> Option<u64> {
    h.shape.iter().try_fold(h.dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64))
}

fn kv_bytes(h: &KvStateHeader) -> Option<u64> {
    [h.n_kv_heads, h.len, h.head_dim, h.n_layers, 2].iter().try_fold(h.dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64))
}

fn sampling(rng: &mut StdRng) -> SamplingParams {
    SamplingParams {
        temperature: f32_of(rng),
        top_k: u64_of(rng) as usize,
        top_p: f32_of(rng),
        min_p: f32_of(rng),
        repeat_penalty: f32_of(rng),
        repeat_last_n: u64_of(rng) as usize,
        seed: u64_of(rng),
    }
}

fn capabilities(rng: &mut StdRng) -> Capabilities {
    Capabilities {
        protocol: rng.random(),
        build: string_of(rng),
        device: string_of(rng),
        cores: u32_of(rng),
        threads: u32_of(rng),
        total_memory: u64_of(rng),
        free_memory: u64_of(rng),
        memory_limit: rng.random_bool(0.5).then(|| u64_of(rng)),
        loaded: rng.random_bool(0.5).then(|| loaded_slice(rng)),
        sessions: u32_of(rng),
        link: rng.random_bool(0.5).then(|| string_of(rng)),
        compute: string_of(rng),
    }
}

fn loaded_slice(rng: &mut StdRng) -> LoadedSlice {
    LoadedSlice {
        model: string_of(rng),
        architecture: string_of(rng),
        digest: string_of(rng),
        start: u32_of(rng),
        end: u32_of(rng),
        n_layers: u32_of(rng),
        hidden: u32_of(rng),
        weight_bytes: u64_of(rng),
    }
}

fn code_of(rng: &mut StdRng) -> ErrorCode {
    use ErrorCode::*;
    [Malformed, Refused, UnknownSession, NoModel, Capacity, Invalid, Failed, Internal][rng.random_range(0..8)]
}

/// A forward step's header, and the payload bytes its input implies.
fn forward_header(rng: &mut StdRng) -> (ForwardHeader, Option<u64>) {
    let opt_u32 = |rng: &mut StdRng| rng.random_bool(0.5).then(|| u32_of(rng));
    let (input, implied) = if rng.random() {
        (ForwardInput::Tokens(vec_of(rng, u32_of)), None)
    } else {
        let th = tensor_header(rng);
        let implied = tensor_bytes(&th);
        (ForwardInput::Hidden(th), implied)
    };
    let sample = rng.random_bool(0.5).then(|| SampleRequest {
        params: sampling(rng),
        recent: vec_of(rng, u32_of),
        draw: u64_of(rng),
        logprobs: rng.random_bool(0.5).then(|| rng.random()),
        allowed: rng.random_bool(0.3).then(|| vec_of(rng, u32_of)),
    });
    let h = ForwardHeader {
        session: u64_of(rng),
        step: u64_of(rng),
        open: opt_u32(rng),
        truncate: opt_u32(rng),
        input,
        sample,
        want_logits: rng.random(),
        pool: [None, Some(sollol::model::Pooling::Mean), Some(sollol::model::Pooling::Last)][rng.random_range(0..3)],
        stage_steps: vec_of(rng, |r| StageStep { nanos: u64_of(r), rows: u32_of(r) }),
        f16_fallbacks: u32_of(rng),
        hop_bytes: vec_of(rng, u64_of),
        micro_batch: rng.random(),
        ring: rng.random_bool(0.3).then(|| Ring { id: u64_of(rng), left: u32_of(rng), stop: vec_of(rng, u32_of) }),
    };
    (h, implied)
}

/// A frame of any message, with a payload that fits it or not.
/// A step's result, and the payload bytes its logits take.
fn step_result(rng: &mut StdRng) -> (StepResult, Option<u64>) {
    let logits_len = rng.random_bool(0.5).then(|| u32_of(rng));
    let logprobs = rng
        .random_bool(0.3)
        .then(|| sollol::model::sampling::Logprobs { logprob: f32_of(rng), top: vec_of(rng, |r| (u32_of(r), f32_of(r))) });
    let r = StepResult {
        session: u64_of(rng),
        step: u64_of(rng),
        token: rng.random_bool(0.5).then(|| u32_of(rng)),
        logprobs,
        logits: None,
        logits_len,
        pooled: rng.random_bool(0.2).then(|| vec_of(rng, f32_of)),
        stage_steps: vec_of(rng, |r| StageStep { nanos: u64_of(r), rows: u32_of(r) }),
        f16_fallbacks: u32_of(rng),
        hop_bytes: vec_of(rng, u64_of),
    };
    (r, logits_len.map(|n| n as u64 * 4))
}

fn frame_of(rng: &mut StdRng) -> Frame {
    let (message, implied) = match rng.random_range(0..24) {
        0 => (
            Message::Hello { protocol: rng.random(), build: string_of(rng), role: PeerRole::Head, proof: vec_of(rng, |r| r.random()) },
            None,
        ),
        1 => (Message::Welcome { capabilities: capabilities(rng), proof: vec_of(rng, |r| r.random()) }, None),
        2 => (Message::Attach { purpose: if rng.random() { StreamPurpose::Data } else { StreamPurpose::Events } }, None),
        3 => (Message::GetCapabilities, None),
        4 => (Message::Capabilities(capabilities(rng)), None),
        5 => {
            let req = LoadRequest {
                model: string_of(rng),
                start: u32_of(rng),
                end: u32_of(rng),
                digest: rng.random_bool(0.5).then(|| string_of(rng)),
            };
            (Message::Load(req), None)
        }
        6 => (Message::Loaded(loaded_slice(rng)), None),
        7 => {
            let ring = [None, Some(RingLink::Itself), Some(RingLink::First(string_of(rng)))][rng.random_range(0..3)].clone();
            (Message::Link { next: rng.random_bool(0.5).then(|| string_of(rng)), wire: dtype_of(rng), ring }, None)
        }
        8 => (Message::ExportKv { session: u64_of(rng), dtype: dtype_of(rng) }, None),
        9 | 10 => {
            let h = kv_header(rng);
            let implied = kv_bytes(&h);
            (if rng.random() { Message::KvState(h) } else { Message::ImportKv(h) }, implied)
        }
        11 => (Message::Ping { nonce: u64_of(rng) }, None),
        12 => {
            let m = Message::Pong {
                nonce: u64_of(rng),
                sessions: u32_of(rng),
                busy_nanos: u64_of(rng),
                tokens: u64_of(rng),
                batches: u64_of(rng),
            };
            (m, None)
        }
        13 => (Message::Ok, None),
        14 => {
            let (h, implied) = forward_header(rng);
            (Message::Forward(h), implied)
        }
        15 => {
            // Several steps in one frame: the payload fits their sum or not.
            let headers: Vec<ForwardHeader> = (0..rng.random_range(1..5)).map(|_| forward_header(rng).0).collect();
            let bytes = |h: &ForwardHeader| match &h.input {
                ForwardInput::Tokens(_) => Some(0),
                ForwardInput::Hidden(th) => tensor_bytes(th),
            };
            let total = headers.iter().try_fold(0u64, |sum, h| bytes(h).and_then(|b| sum.checked_add(b)));
            (Message::Forwards(headers), total)
        }
        16 => (Message::Close { session: u64_of(rng) }, None),
        17 => {
            let (r, implied) = step_result(rng);
            (Message::Result(r), implied)
        }
        20 => {
            // A batch's results in one frame: the payload fits their logits or not.
            let results: Vec<(StepResult, Option<u64>)> = (0..rng.random_range(1..5)).map(|_| step_result(rng)).collect();
            let total = results.iter().try_fold(0u64, |sum, (_, b)| sum.checked_add(b.unwrap_or(0)));
            (Message::Results(results.into_iter().map(|(r, _)| r).collect()), total)
        }
        18 => (Message::ProbePeer { addr: string_of(rng), rate: rng.random() }, None),
        21 => (Message::Halt { session: u64_of(rng) }, None),
        22 => (Message::Halted { session: u64_of(rng) }, None),
        19 => {
            let t = sollol::net::probe::LinkTiming {
                rtt: std::time::Duration::from_nanos(u64_of(rng)),
                bits_per_sec: rng.random_bool(0.5).then(|| f32_of(rng) as f64),
            };
            (Message::PeerProbed(t), None)
        }
        _ => {
            let e = RemoteError {
                session: rng.random_bool(0.5).then(|| u64_of(rng)),
                step: rng.random_bool(0.5).then(|| u64_of(rng)),
                node: string_of(rng),
                code: code_of(rng),
                message: string_of(rng),
            };
            (Message::Error(e), None)
        }
    };
    Frame::with_payload(message, payload_for(rng, implied))
}

/// A few bytes changed: flipped, set to an interesting value, a
/// little-endian length overwritten, a run inserted or removed, the end cut.
fn mutate_bytes(rng: &mut StdRng, bytes: &mut Vec<u8>, within: usize) {
    if bytes.is_empty() {
        bytes.push(rng.random());
        return;
    }
    let at = rng.random_range(0..within.clamp(1, bytes.len()));
    match rng.random_range(0..6) {
        0 => bytes[at] ^= 1 << rng.random_range(0..8),
        1 => bytes[at] = [0, 1, 0x7f, 0x80, 0xff][rng.random_range(0..5)],
        2 => {
            let v = if rng.random() { u32_of(rng).to_le_bytes().to_vec() } else { u64_of(rng).to_le_bytes().to_vec() };
            for (i, b) in v.into_iter().enumerate() {
                if let Some(x) = bytes.get_mut(at + i) {
                    *x = b;
                }
            }
        }
        3 => {
            let run: Vec<u8> = (0..rng.random_range(1..16)).map(|_| rng.random()).collect();
            bytes.splice(at..at, run);
        }
        4 => {
            let end = (at + rng.random_range(1..16)).min(bytes.len());
            bytes.drain(at..end);
        }
        _ => bytes.truncate(at),
    }
}

/// Frames: built, encoded, mutated (or not), decoded under both limits,
/// their payloads decoded as the node decodes them.
fn frame_input(rng: &mut StdRng) -> bool {
    let frame = frame_of(rng);
    let mut bytes = frame::encode(&frame).expect("a frame this size encodes");
    if rng.random_bool(0.8) {
        for _ in 0..rng.random_range(1..=4) {
            let n = bytes.len();
            mutate_bytes(rng, &mut bytes, n);
        }
    } else {
        // Unmutated: the decoder gives back what was encoded (compared as
        // bytes: a NaN in the sampling parameters is not equal to itself).
        let (back, used) = frame::decode(&bytes, Limits::DEFAULT).expect("a valid frame decodes").expect("whole");
        assert_eq!(used, bytes.len());
        assert_eq!(frame::encode(&back).expect("it encodes again"), bytes, "a frame round trips");
    }
    let mut accepted = false;
    for limits in [Limits::DEFAULT, Limits::PRE_AUTH] {
        if let Ok(Some((f, _))) = frame::decode(&bytes, limits) {
            accepted = true;
            consume(f);
        }
    }
    accepted
}

/// What a node or head does with a decoded frame's payload.
fn consume(f: Frame) {
    match f.message {
        Message::Forward(ForwardHeader { input: ForwardInput::Hidden(th), .. }) => {
            if let Ok(t) = tensor::decode(&th, &f.payload, &Device::Cpu) {
                let _ = tensor::encode(&t, WireDType::F16);
            }
        }
        Message::Forwards(headers) => {
            for (h, payload) in split_forwards(headers, &f.payload).unwrap_or_default() {
                consume(Frame::with_payload(Message::Forward(h), payload));
            }
        }
        Message::KvState(h) | Message::ImportKv(h) => {
            let _ = kv::decode(&h, &f.payload, &Device::Cpu);
        }
        Message::Result(r) => {
            let _ = r.with_payload(&f.payload);
        }
        Message::Results(results) => {
            let _ = frame::split_results(results, &f.payload);
        }
        _ => {}
    }
}

/// KV payloads: decoded, split by block, joined again, imported into a
/// host cache as a node would.
fn kv_input(rng: &mut StdRng) -> bool {
    let h = kv_header(rng);
    let payload = payload_for(rng, kv_bytes(&h));
    let Ok(state) = kv::decode(&h, &payload, &Device::Cpu) else { return false };
    let blocks = kv::blocks(&h, &payload).expect("a state that decoded splits");
    let (joined, bytes) = kv::join(&h, &blocks).expect("its blocks join");
    assert_eq!((joined, bytes.as_slice()), (h.clone(), payload.as_slice()));
    let mut cache = KvCache::new_host(state.layers.len(), h.n_kv_heads as usize, h.head_dim as usize, h.capacity as usize);
    cache.import(&state).is_ok()
}

/// Activation payloads: decoded to a tensor and encoded back.
fn tensor_input(rng: &mut StdRng) -> bool {
    let h = tensor_header(rng);
    let payload = payload_for(rng, tensor_bytes(&h));
    let Ok(t) = tensor::decode(&h, &payload, &Device::Cpu) else { return false };
    let (back, bytes, _) = tensor::encode(&t, h.dtype).expect("a decoded tensor encodes");
    assert_eq!(back.shape, h.shape, "the shape round trips");
    if h.dtype == WireDType::F32 {
        assert_eq!(bytes, payload, "f32 values round trip bit for bit");
    }
    true
}

/// A valid body of one of the four generation endpoints.
fn http_seed(rng: &mut StdRng) -> (u8, Value) {
    static TOOL: std::sync::LazyLock<Value> = std::sync::LazyLock::new(|| {
        json!({"type": "function", "function": {"name": "f", "description": "adds one",
            "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}})
    });
    let which = rng.random_range(0..4);
    let body = match which {
        0 => json!({"model": "smollm2", "prompt": "Why is the sky blue?", "system": "Be brief.", "raw": false, "stream": false,
            "options": {"temperature": 0.7, "top_k": 40, "top_p": 0.9, "num_predict": 16, "num_ctx": 512, "seed": 3, "stop": ["\n"]},
            "context": [1, 2, 3]}),
        1 => json!({"model": "smollm2", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": null, "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}]},
            {"role": "tool", "content": "2", "tool_name": "f"}],
            "options": {"repeat_penalty": 1.1, "repeat_last_n": 64, "min_p": 0.05}, "stream": true, "tools": [TOOL.clone()]}),
        2 => json!({"model": "smollm2", "messages": [{"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "abc", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
            {"role": "tool", "content": "2", "tool_call_id": "abc"}], "max_tokens": 16, "temperature": 1.0, "top_p": 1.0,
            "stop": ["a", "b"], "n": 1, "seed": 7, "stream": false, "tools": [TOOL.clone()], "tool_choice": "required"}),
        _ => json!({"model": "smollm2", "prompt": ["Once upon a time"], "max_completion_tokens": 8, "stream": true}),
    };
    (which, body)
}

/// A schema of random parts: types, properties, bounds, enums, patterns,
/// references that may point nowhere, nested a few levels.
fn schema_of(rng: &mut StdRng, depth: u32) -> Value {
    let leaf = depth >= 3 || rng.random_bool(0.4);
    match rng.random_range(0..if leaf { 6 } else { 9 }) {
        0 => json!({"type": "string", "maxLength": u32_of(rng) % 64, "minLength": small(rng)}),
        1 => json!({"type": "integer", "minimum": -(small(rng) as i64), "maximum": u32_of(rng)}),
        2 => json!({"type": "number"}),
        3 => json!({"type": "boolean"}),
        4 => json!({"enum": [string_of(rng), 1, null, true]}),
        5 => {
            let pattern = ["^[a-z]+$", "(a|b)*c", "[", "\\d{2,4}", ".*"][rng.random_range(0..5)];
            json!({"type": "string", "pattern": pattern})
        }
        6 => {
            let n = rng.random_range(0..5);
            let props: serde_json::Map<String, Value> = (0..n).map(|i| (format!("p{i}"), schema_of(rng, depth + 1))).collect();
            let required: Vec<String> = props.keys().filter(|_| rng.random_bool(0.5)).cloned().collect();
            json!({"type": "object", "properties": props, "required": required, "additionalProperties": rng.random_bool(0.5)})
        }
        7 => json!({"type": "array", "items": schema_of(rng, depth + 1), "minItems": small(rng), "maxItems": small(rng) + 2}),
        _ => {
            let target = ["#/nowhere", "#", "#/properties/p0"][rng.random_range(0..3)];
            json!({"anyOf": [schema_of(rng, depth + 1), {"$ref": target}]})
        }
    }
}

fn json_of(rng: &mut StdRng) -> Value {
    match rng.random_range(0..10) {
        0 => Value::Null,
        1 => json!(rng.random::<bool>()),
        2 => json!([i64::MIN, -2, -1, 0, 1, 2, i64::MAX][rng.random_range(0..7)]),
        3 => json!(u64::MAX),
        4 => json!([1e308, -1e308, 0.5, -0.0, 1e-308][rng.random_range(0..5)]),
        5 => json!(string_of(rng)),
        6 => json!(["user", "system", "assistant", "tool", "wizard", "developer"][rng.random_range(0..6)]),
        7 => Value::Array(vec_of(rng, |r| json!(u32_of(r)))),
        8 => json!([{"role": "user", "content": string_of(rng)}]),
        _ => json!({"type": "image_url", "text": 3}),
    }
}

/// One value somewhere in the body replaced, removed, or a key added.
fn mutate_json(rng: &mut StdRng, v: &mut Value) {
    match v {
        Value::Object(map) if !map.is_empty() => {
            let keys: Vec<String> = map.keys().cloned().collect();
            let key = keys[rng.random_range(0..keys.len())].clone();
            match rng.random_range(0..4) {
                0 => {
                    map.remove(&key);
                }
                1 => {
                    map.insert(key, json_of(rng));
                }
                2 => {
                    map.insert(string_of(rng), json_of(rng));
                }
                _ => mutate_json(rng, map.get_mut(&key).expect("a key just listed")),
            }
        }
        Value::Array(items) if !items.is_empty() && rng.random_bool(0.7) => {
            let i = rng.random_range(0..items.len());
            mutate_json(rng, &mut items[i]);
        }
        other => *other = json_of(rng),
    }
}

#[allow(dead_code)]
fn main() {
    let mut iterations = 100_000u64;
    let mut seed = 1u64;
    let mut only: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--iterations" => iterations = args.next().and_then(|v| v.parse().ok()).expect("--iterations N"),
            "--seed" => seed = args.next().and_then(|v| v.parse().ok()).expect("--seed N"),
            "--target" => only = args.next(),
            other => panic!("unknown argument {other} (--iterations N, --seed N, --target {})", TARGETS.join("|")),
        }
    }
    let mut failed = false;
    for target in TARGETS.iter().filter(|t| only.as_deref().is_none_or(|o| o == **t)) {
        let t = std::time::Instant::now();
        let o = run(target, iterations, seed);
        let secs = t.elapsed().as_secs_f64();
        println!(
            "{:7} {:>9} inputs  {:>9} accepted  {} panics  largest allocation {:.1} MiB  {:.0} inputs/s",
            o.target,
            o.inputs,
            o.accepted,
            o.panics,
            o.largest_allocation as f64 / (1 << 20) as f64,
            o.inputs as f64 / secs
        );
        if let Some((s, m)) = &o.first_panic {
            println!("        first panic: seed {s}: {m}");
        }
        failed |= o.panics > 0 || o.largest_allocation > ALLOCATION_BOUND;
    }
    if failed {
        std::process::exit(1);
    }
}
