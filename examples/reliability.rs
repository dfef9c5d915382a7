//! The reliability figures of BENCHMARKS.md, against real `sollol node` and
//! `sollol serve` processes on loopback:
//!
//! - `sessions`: 2,000 sessions opened on one node (1-token prompts that may
//!   grow to 8,192 positions), the node's peak RSS, how many were admitted
//!   and how many refused (and with which code);
//! - `preauth`: 64 unauthenticated peers each holding a connection with a
//!   Hello that claims a large header, the node's RSS before and after;
//! - `soak`: 64 clients streaming `/api/generate` from `sollol serve` for
//!   `--minutes` (2 local nodes), every request completed, refused (429/503)
//!   or lost, and the RSS of the server and its nodes sampled as it runs.
//!
//! `cargo build --release --bins --examples`, then
//! `target/release/examples/reliability sessions|preauth|soak [--minutes N]`.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sollol::head::pipeline::Pipeline;
use sollol::model::sampling::SamplingParams;
use sollol::net::auth::ClusterKey;
use sollol::net::message::{ErrorCode, SampleRequest};
use sollol::net::tensor::WireDType;

const KEY: &str = "reliability-key";

fn sollol_bin() -> PathBuf {
    // target/release/examples/reliability → target/release/sollol
    let exe = std::env::current_exe().expect("this executable");
    exe.parent().and_then(|p| p.parent()).expect("target/release").join("sollol")
}

/// A node process; killed on drop.
struct Node {
    child: std::process::Child,
    addr: String,
}

impl Node {
    fn spawn(extra: &[&str]) -> Self {
        let state = std::env::temp_dir().join("sollol-reliability-node");
        let mut child = std::process::Command::new(sollol_bin())
            .args(["--threads", "2", "node", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(&state)
            .args(extra)
            .env("SOLLOL_CLUSTER_KEY", KEY)
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start sollol node (build it: cargo build --release --bins)");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let line = lines.next().expect("a line").expect("a line");
        std::thread::spawn(move || for _ in lines {});
        let addr = line.strip_prefix("sollol node listening on ").expect("the listen line").to_string();
        Self { child, addr }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// (RSS, peak RSS) of a process, bytes.
fn rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn mib(b: u64) -> String {
    format!("{:.0} MiB", b as f64 / (1 << 20) as f64)
}

fn model() -> String {
    sollol::model::source::resolve("smollm2").expect("the default model (sollol pull smollm2)").path.display().to_string()
}

fn sessions(rt: &tokio::runtime::Runtime) {
    let node = Node::spawn(&[]);
    let (before, _) = rss(node.child.id());
    rt.block_on(async {
        let key = ClusterKey::new(Some(KEY));
        let mut p = Pipeline::connect(std::slice::from_ref(&node.addr), &key).await.expect("connect");
        p.load(&model(), None, std::slice::from_ref(&(0..30)), WireDType::F16).await.expect("load");
        let (loaded, _) = rss(node.child.id());
        let greedy = SampleRequest { params: SamplingParams { temperature: 0.0, ..Default::default() }, recent: vec![], draw: 0, logprobs: None, allowed: None };
        let (mut admitted, mut capacity, mut other) = (0, 0, 0);
        let t = Instant::now();
        for s in 0..2000u64 {
            match p.step(s, &[504], Some(8192), Some(greedy.clone()), false).await {
                Ok(_) => admitted += 1,
                Err(e) if e.code() == Some(ErrorCode::Capacity) => capacity += 1,
                Err(e) => {
                    other += 1;
                    eprintln!("session {s}: {e}");
                }
            }
        }
        let (now, peak) = rss(node.child.id());
        println!(
            "sessions: 2000 opened in {:.1} s: {admitted} admitted, {capacity} refused (Capacity), {other} other errors; node RSS {} idle, {} loaded, {} after, peak {}",
            t.elapsed().as_secs_f64(),
            mib(before),
            mib(loaded),
            mib(now),
            mib(peak)
        );
    });
}

fn preauth(rt: &tokio::runtime::Runtime) {
    let node = Node::spawn(&[]);
    std::thread::sleep(Duration::from_millis(300));
    let (before, _) = rss(node.child.id());
    let refused = rt.block_on(async {
        let sock: std::net::SocketAddr = node.addr.parse().expect("an address");
        let mut held = Vec::new();
        let mut refused = 0;
        for _ in 0..64 {
            let ep = sollol::net::tls::client_endpoint(sock).expect("an endpoint");
            let conn = ep.connect(sock, sollol::net::tls::SERVER_NAME).expect("connect").await.expect("a connection");
            let (mut reader, mut writer) = sollol::net::connection::split(conn.open_bi().await.expect("a stream"));
            // A Hello prefix claiming a 64 MiB header, then nothing.
            let mut prefix = [0u8; sollol::net::frame::PREFIX_LEN];
            prefix[0] = sollol::net::PROTOCOL_VERSION;
            prefix[2..6].copy_from_slice(&(64u32 << 20).to_le_bytes());
            writer.write_raw(&prefix).await.expect("write");
            if let Ok(Ok(f)) = tokio::time::timeout(Duration::from_secs(2), reader.expect()).await {
                refused += u32::from(matches!(f.message, sollol::net::message::Message::Error(_)));
            }
            held.push((ep, conn, reader, writer));
        }
        let (during, _) = rss(node.child.id());
        (refused, during)
    });
    let (after, peak) = rss(node.child.id());
    println!(
        "preauth: 64 peers claiming 64 MiB headers: {} refused from their prefix; node RSS {} before, {} with them connected, {} after, peak {}",
        refused.0,
        mib(before),
        mib(refused.1),
        mib(after),
        mib(peak)
    );
}

fn soak(minutes: u64) {
    let mut serve = std::process::Command::new(sollol_bin())
        .args(["--threads", "2", "serve", "--listen", "127.0.0.1:0", "--local-nodes", "2", "--parallel", "4", "--max-queue", "48"])
        .env("RUST_LOG", "error")
        // Local nodes, whatever registry this machine has.
        .env("SOLLOL_REGISTRY", std::env::temp_dir().join("sollol-reliability-registry.toml"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start sollol serve");
    let mut lines = BufReader::new(serve.stdout.take().expect("stdout")).lines();
    let addr = loop {
        let line = lines.next().expect("serve's output").expect("a line");
        if let Some(a) = line.strip_prefix("sollol serving on http://") {
            break a.trim().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let body = r#"{"model":"smollm2","prompt":"Tell me about the sea.","options":{"num_predict":32}}"#;
    let warm = ureq::post(&format!("http://{addr}/api/generate"))
        .send_string(r#"{"model":"smollm2","prompt":"Hi","stream":false,"options":{"num_predict":2}}"#);
    assert!(warm.is_ok(), "{warm:?}");
    let nodes: Vec<u32> = children_of(serve.id());
    let counts: Arc<[AtomicU64; 4]> = Arc::new(Default::default()); // completed, refused, lost, tokens
    let deadline = Instant::now() + Duration::from_secs(minutes * 60);
    let clients: Vec<_> = (0..64)
        .map(|_| {
            let (addr, counts) = (addr.clone(), counts.clone());
            std::thread::spawn(move || {
                while Instant::now() < deadline {
                    match stream_one(&addr, body) {
                        Outcome::Done(tokens) => {
                            counts[0].fetch_add(1, Ordering::Relaxed);
                            counts[3].fetch_add(tokens, Ordering::Relaxed);
                        }
                        Outcome::Refused => {
                            counts[1].fetch_add(1, Ordering::Relaxed);
                            std::thread::sleep(Duration::from_millis(200));
                        }
                        Outcome::Lost(why) => {
                            counts[2].fetch_add(1, Ordering::Relaxed);
                            eprintln!("lost: {why}");
                        }
                    }
                }
            })
        })
        .collect();
    let mut samples = Vec::new();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(30));
        let serve_rss = rss(serve.id()).0;
        let node_rss: Vec<u64> = nodes.iter().map(|p| rss(*p).0).collect();
        println!(
            "  {:>4} s  serve {}  nodes {}",
            samples.len() * 30 + 30,
            mib(serve_rss),
            node_rss.iter().map(|r| mib(*r)).collect::<Vec<_>>().join(", ")
        );
        let _ = std::io::stdout().flush();
        samples.push((serve_rss, node_rss));
    }
    for c in clients {
        let _ = c.join();
    }
    let peaks: Vec<String> = std::iter::once(serve.id()).chain(nodes.iter().copied()).map(|p| mib(rss(p).1)).collect();
    let first = samples.first().cloned().unwrap_or_default();
    let last = samples.last().cloned().unwrap_or_default();
    println!(
        "soak: 64 streaming clients for {minutes} min: {} completed ({} tokens), {} refused (429/503), {} lost; RSS serve {} → {}, nodes {:?} → {:?}; peaks (serve, nodes) {}",
        counts[0].load(Ordering::Relaxed),
        counts[3].load(Ordering::Relaxed),
        counts[1].load(Ordering::Relaxed),
        counts[2].load(Ordering::Relaxed),
        mib(first.0),
        mib(last.0),
        first.1.iter().map(|r| mib(*r)).collect::<Vec<_>>(),
        last.1.iter().map(|r| mib(*r)).collect::<Vec<_>>(),
        peaks.join(", ")
    );
    // SIGTERM lets the server stop its local nodes.
    let _ = std::process::Command::new("kill").args(["-TERM", &serve.id().to_string()]).status();
    let _ = serve.wait();
}

/// The node processes `sollol serve` started.
fn children_of(pid: u32) -> Vec<u32> {
    // Any of its threads may have started one.
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.filter_map(|e| e.ok()).collect::<Vec<_>>()).unwrap_or_default();
    let mut children: Vec<u32> = tasks
        .iter()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|text| text.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<u32>>())
        .collect();
    children.sort_unstable();
    children.dedup();
    children
}

enum Outcome {
    Done(u64),
    Refused,
    Lost(String),
}

/// One streamed request: done (its final line arrived), refused with
/// 429/503, or lost (anything else: an error mid-stream, a cut stream).
fn stream_one(addr: &str, body: &str) -> Outcome {
    let reply = match ureq::post(&format!("http://{addr}/api/generate")).timeout(Duration::from_secs(600)).send_string(body) {
        Ok(r) => r,
        Err(ureq::Error::Status(503 | 429, _)) => return Outcome::Refused,
        Err(e) => return Outcome::Lost(e.to_string()),
    };
    for line in BufReader::new(reply.into_reader()).lines().map_while(Result::ok) {
        if line.contains("\"error\"") {
            return Outcome::Lost(line);
        }
        if line.contains("\"done\":true") {
            let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap_or_default();
            return Outcome::Done(v["eval_count"].as_u64().unwrap_or(0));
        }
    }
    Outcome::Lost("the stream ended without its final line".into())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let minutes = args.iter().position(|a| a == "--minutes").and_then(|i| args.get(i + 1)).and_then(|m| m.parse().ok()).unwrap_or(10);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a runtime");
    match args.first().map(String::as_str) {
        Some("sessions") => sessions(&rt),
        Some("preauth") => preauth(&rt),
        Some("soak") => soak(minutes),
        _ => eprintln!("usage: reliability sessions|preauth|soak [--minutes N]"),
    }
}
