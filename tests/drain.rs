//! Draining a stage while a session is live (`Pipeline::replace_stage`, what
//! `sollol cluster drain` runs): real node processes, a greedy generation of
//! 64 tokens over the f32 wire, the stage moved to a spare node at a token
//! mid-way. The tokens must equal a single-node run's, and the nodes'
//! position counters must prove that nothing was recomputed: the old and the
//! new node together computed exactly the prompt plus one position per decode
//! step.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::NodeProc;
use sollol::head::client::NodeClient;
use sollol::head::generation::generate;
use sollol::head::pipeline::{Pipeline, PipelineEngine, Replaced};
use sollol::net::auth::ClusterKey;
use sollol::net::resolve_addr;
use sollol::net::tensor::WireDType;
use sollol::net::tls;

const KEY: &str = "drain-test-key";

/// The rebalancing test compares the compute time of two stages: the other
/// tests here, each saturating the two cores with node processes, would
/// skew it, so the tests of this file take turns.
static TURN: Mutex<()> = Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

fn positions(rt: &tokio::runtime::Runtime, client: &NodeClient) -> u64 {
    rt.block_on(client.ping(Duration::from_secs(5))).unwrap().tokens
}

/// Moves stage `stage` of a 2-stage chain to a spare node after `at` pieces.
fn drain(stage: usize, at: usize) {
    let common::Reference { path, file, tokenizer, result: reference } = common::single_node_reference();
    let digest = file.digest().unwrap();
    let context = file.config().unwrap().context_length;

    // Cores of their own, as the head sees it: decode goes round a ring,
    // which the drain halts.
    let nodes: Vec<NodeProc> = (0..3).map(|i| NodeProc::spawn(Some(KEY), &["--compute-id", &format!("drain {i}")])).collect();
    let key = ClusterKey::new(Some(KEY));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let chain = [nodes[0].addr.clone(), nodes[1].addr.clone()];
    let pipeline = rt.block_on(async {
        let mut p = Pipeline::connect(&chain, &key).await.unwrap();
        p.load(&path.display().to_string(), Some(digest), &[0..15, 15..30], WireDType::F32).await.unwrap();
        Arc::new(p)
    });
    let spare = rt.block_on(async {
        let endpoint = tls::client_endpoint(resolve_addr(&nodes[2].addr).await.unwrap()).unwrap();
        NodeClient::connect(&endpoint, &nodes[2].addr, &key).await.unwrap()
    });
    let old = pipeline.clients()[stage].clone();
    let mut engine = PipelineEngine::shared(rt.handle().clone(), pipeline.clone(), context);
    let moved: Mutex<Option<Replaced>> = Mutex::new(None);
    let mut pieces = 0;
    let result = generate(&mut engine, &tokenizer, 9, &common::greedy_request(), &mut |_| {
        pieces += 1;
        if pieces == at {
            let replaced = rt.block_on(pipeline.replace_stage(stage, spare.clone())).unwrap();
            *moved.lock().unwrap() = Some(replaced);
        }
        true
    })
    .unwrap();
    let replaced = moved.into_inner().unwrap().expect("the drain ran");
    assert!(pipeline.ring_steps() > 32, "decode went round a ring before and after the drain");
    let old_positions = positions(&rt, &old);
    eprintln!("stage {stage} drained at piece {at}: {replaced:?}");
    assert_eq!(result.tokens, reference.tokens, "tokens differ after the drain");
    assert_eq!(result.tokens.len(), 64, "the reply ran its full length");
    assert_eq!(replaced.sessions_moved, 1);
    assert!(replaced.kv_bytes > 0);
    assert_eq!(pipeline.addrs()[stage], nodes[2].addr);
    // Every position is computed once by this stage: each token the session
    // holds (the prompt, then one per decode step). The drain halted the
    // session's ring and waited for what it had in flight, whose results
    // the generation read.
    let expected = result.fed.len() as u64;
    let new_positions = positions(&rt, &spare);
    assert_eq!(old_positions + new_positions, expected, "old {old_positions} + new {new_positions}: something was recomputed");
    let prompt = common::greedy_request().prompt.len() as u64;
    assert!(new_positions < expected - prompt, "the new node replayed the prompt");
    // The old node is out of the chain and unloaded.
    let caps = rt.block_on(old.refresh_capabilities()).unwrap();
    assert!(caps.loaded.is_none(), "the drained node still holds its slice");
}

#[test]
fn first_stage_drained_mid_generation_without_recompute() {
    let _turn = turn();
    drain(0, 17);
}

#[test]
fn last_stage_drained_mid_generation_without_recompute() {
    let _turn = turn();
    drain(1, 33);
}

/// `sollol cluster drain` against a serving head in registry mode: the model
/// runs on one registered node; while a streamed generation is under way the
/// node is drained to an idle one, and the stream ends with the same text as
/// an undisturbed request.
#[test]
fn cluster_drain_moves_a_live_served_session() {
    let _turn = turn();
    common::smollm2();
    let nodes: Vec<NodeProc> = (0..3).map(|_| NodeProc::spawn(Some(KEY), &[])).collect();
    let registry = std::env::temp_dir().join(format!("sollol-serve-test-{}.toml", std::process::id()));
    let _ = std::fs::remove_file(&registry);
    for (i, n) in nodes.iter().enumerate() {
        let out = std::process::Command::new(common::sollol_bin())
            .args(["nodes", "add", &n.addr, "--name", &format!("n{i}")])
            .env("SOLLOL_REGISTRY", &registry)
            .env("SOLLOL_CLUSTER_KEY", KEY)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let serve = common::ServeProc::spawn(&["--cluster-key", KEY]);
    // A prompt whose greedy continuation runs long: the drain, a CLI process
    // started after the first tokens, takes ~0.6 s, and a reply that ends
    // sooner can finish before it lands (the capital-of-France prompt stops
    // at an early EOS after ~40 tokens; 96 tokens took ~1.2 s on AVX2 but
    // under 0.6 s with the VNNI kernels, so 256).
    let body = r#"{"model":"smollm2","prompt":"Once upon a time, in a small village by the sea, there lived","raw":true,"stream":false,"options":{"temperature":0,"num_predict":256}}"#;
    let reference = common::http::post(&serve.addr, "/api/generate", body).json();
    let on = reference["_cluster"]["nodes"][0]["name"].as_str().unwrap().to_string();

    let streaming = body.replace(r#""stream":false"#, r#""stream":true"#);
    let mut text = String::new();
    let mut drained = None;
    for line in common::http::stream(&serve.addr, "/api/generate", &streaming) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        text.push_str(v["response"].as_str().unwrap_or_default());
        if drained.is_none() && !text.is_empty() && text.len() > 20 {
            let out = std::process::Command::new(common::sollol_bin())
                .args(["cluster", "drain", &on, "--head", &serve.addr])
                .env("SOLLOL_REGISTRY", &registry)
                .output()
                .unwrap();
            assert!(out.status.success(), "drain failed: {}", String::from_utf8_lossy(&out.stderr));
            drained = Some(String::from_utf8_lossy(&out.stdout).to_string());
        }
        if v["done"] == true {
            break;
        }
    }
    let drained = drained.expect("the drain ran mid-stream");
    eprintln!("{drained}");
    assert!(drained.contains("1 live sessions moved"), "{drained}");
    assert_eq!(text, reference["response"].as_str().unwrap(), "the drained stream's text differs");
    // The head now routes to the new node, and a node nobody uses is refused.
    let status = common::http::get(&serve.addr, "/api/sollol/status").json();
    assert_ne!(status["models"][0]["route"]["nodes"][0]["name"].as_str(), Some(on.as_str()), "{status}");
    let out = std::process::Command::new(common::sollol_bin())
        .args(["cluster", "drain", &on, "--head", &serve.addr])
        .env("SOLLOL_REGISTRY", &registry)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no loaded model runs on"));
    let _ = std::fs::remove_file(&registry);
}

/// Dynamic rebalancing: a 2-stage chain over a 1-thread node holding 26
/// blocks and a 2-thread node holding 4 (and the LM head). The measured
/// stage times of a first generation make `partition::rebalance` (10 %
/// threshold here; the decision itself is unit-tested) move blocks off the
/// slow node; the move happens in
/// the middle of a second generation, whose tokens must not change, and each
/// node still computes every position exactly once (the move halts the
/// generation's ring and waits for what it had in flight).
#[test]
fn rebalancing_moves_blocks_off_a_slow_stage_mid_generation() {
    use sollol::cluster::partition;
    let _turn = turn();
    let common::Reference { path, file, tokenizer, result: reference } = common::single_node_reference();
    let digest = file.digest().unwrap();
    let context = file.config().unwrap().context_length;

    // Cores of their own, as the head sees it: the move halts a ring.
    let slow = NodeProc::spawn_with("127.0.0.1:0", 1, Some(KEY), &["--compute-id", "slow"]);
    let fast = NodeProc::spawn_with("127.0.0.1:0", 2, Some(KEY), &["--compute-id", "fast"]);
    let key = ClusterKey::new(Some(KEY));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let pipeline = rt.block_on(async {
        let mut p = Pipeline::connect(&[slow.addr.clone(), fast.addr.clone()], &key).await.unwrap();
        p.load(&path.display().to_string(), Some(digest), &[0..26, 26..30], WireDType::F32).await.unwrap();
        Arc::new(p)
    });
    let mut engine = PipelineEngine::shared(rt.handle().clone(), pipeline.clone(), context);
    let first = generate(&mut engine, &tokenizer, 3, &common::greedy_request(), &mut |_| true).unwrap();
    let ranges: Vec<_> = pipeline.loaded().iter().map(|l| l.start as usize..l.end as usize).collect();
    eprintln!("measured {:?} over {ranges:?}", first.stats.stage_times);
    let plan = partition::rebalance(&first.stats.stage_times, &ranges, 0.1).expect("the 1-thread stage is the bottleneck");
    eprintln!("stage times {:?} over {ranges:?}: {plan:?}", first.stats.stage_times);
    assert_eq!((plan.from, plan.to), (0, 1));

    let clients = pipeline.clients();
    let before: Vec<u64> = clients.iter().map(|c| positions(&rt, c)).collect();
    let mut pieces = 0;
    let second = generate(&mut engine, &tokenizer, 4, &common::greedy_request(), &mut |_| {
        pieces += 1;
        if pieces == 21 {
            let paused = rt.block_on(pipeline.move_blocks(plan.from, plan.to, plan.blocks)).unwrap();
            eprintln!("moved {} blocks, steps paused {paused:?}", plan.blocks);
        }
        true
    })
    .unwrap();
    assert_eq!(second.tokens, reference.tokens, "tokens differ after the move");
    assert!(pipeline.ring_steps() > 100, "decode went round a ring through both generations");
    let after: Vec<u64> = clients.iter().map(|c| positions(&rt, c)).collect();
    let expected = second.fed.len() as u64;
    for (i, (a, b)) in after.iter().zip(&before).enumerate() {
        assert_eq!(a - b, expected, "stage {i} computed {} positions for {expected}: something was recomputed", a - b);
    }
    let moved: Vec<_> = pipeline.loaded().iter().map(|l| l.start..l.end).collect();
    assert_eq!(moved[0].end as usize, 26 - plan.blocks, "{moved:?}");
    let third = generate(&mut engine, &tokenizer, 5, &common::greedy_request(), &mut |_| true).unwrap();
    eprintln!("stage times after: {:?} over {moved:?}", third.stats.stage_times);
    assert_eq!(third.tokens, reference.tokens);
}
