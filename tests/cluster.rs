//! Cluster management on real node processes over loopback: the registry,
//! a memory-aware cluster, generation through it, health after a node dies,
//! routing, and discovery.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::NodeProc;

const KEY: &str = "cluster-test-key";

fn sollol(args: &[&str], config: &Path) -> Output {
    eprintln!("$ sollol {}", args.join(" "));
    Command::new(common::sollol_bin())
        .args(args)
        .env("SOLLOL_REGISTRY", config.join("registry.toml"))
        .env("SOLLOL_CLUSTER_KEY", KEY)
        .env("SOLLOL_NO_HUB", "1")
        .output()
        .expect("run sollol")
}

fn ok(out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {}", String::from_utf8_lossy(&out.stderr));
    stdout
}

#[test]
fn memory_aware_cluster_generates_reports_a_dead_node_and_routing_moves_on() {
    common::smollm2();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path();
    // SmolLM2 holds 92 MiB of weights: no node below can take it whole.
    let a = NodeProc::spawn(Some(KEY), &["--memory-limit", "70MB"]);
    let b = NodeProc::spawn(Some(KEY), &["--memory-limit", "50MB"]);
    let mut c = NodeProc::spawn(Some(KEY), &["--memory-limit", "50MB"]);
    for (name, n) in [("a", &a), ("b", &b), ("c", &c)] {
        let out = ok(sollol(&["nodes", "add", &n.addr, "--name", name], cfg));
        assert!(out.contains(&format!("added node {name}")), "{out}");
    }
    let list = ok(sollol(&["nodes", "list"], cfg));
    assert_eq!(list.matches("healthy").count(), 3, "{list}");
    assert!(list.contains("66.8 MiB"), "a's advertised memory: {list}");

    let created = ok(sollol(&["cluster", "create", "smol", "--model", "smollm2", "--nodes", "a,b,c", "--strategy", "memory_aware"], cfg));
    assert!(created.contains("Created cluster 'smol' with 3 nodes for smollm2"), "{created}");
    assert!(created.contains("Node 1: layers 0-9 (10 layers"), "{created}");
    assert!(ok(sollol(&["cluster", "list"], cfg)).contains("smol"));

    let out = sollol(&["generate", "--cluster", "smol", "-n", "6", "The capital of France is"], cfg);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("Paris"), "{stdout}");
    assert!(stderr.contains(r#""cluster":"smol""#) && stderr.contains(r#""layers":[0,9]"#), "the routing facts: {stderr}");

    assert!(ok(sollol(&["cluster", "health", "smol"], cfg)).contains("cluster 'smol' is healthy"));
    // Each node reports the architecture of the slice it holds.
    let list = ok(sollol(&["nodes", "list"], cfg));
    assert!(list.contains("llama 0..10"), "{list}");
    let route = ok(sollol(&["route", "--model", "smollm2"], cfg));
    assert!(route.contains(r#""cluster": "smol""#), "{route}");

    c.kill();
    let health = ok(sollol(&["cluster", "health", "smol"], cfg));
    assert!(health.contains("cluster 'smol' is unhealthy - nodes down: c"), "{health}");
    // a and b alone cannot hold the model: routing says so instead of picking smol.
    let out = sollol(&["route", "--model", "smollm2"], cfg);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("missing"), "a cluster with a dead node must not be picked: {stderr}");

    // A node that holds the whole model takes it alone.
    let d = NodeProc::spawn(Some(KEY), &["--memory-limit", "300MB"]);
    ok(sollol(&["nodes", "add", &d.addr, "--name", "d"], cfg));
    let route = ok(sollol(&["route", "--model", "smollm2"], cfg));
    assert!(route.contains(r#""single_node": true"#) && route.contains(r#""cluster": "d""#), "{route}");
    let out = sollol(&["generate", "--route", "-n", "4", "The capital of France is"], cfg);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Paris"), "{}", String::from_utf8_lossy(&out.stderr));

    ok(sollol(&["nodes", "rm", "c"], cfg));
    assert!(!ok(sollol(&["cluster", "list"], cfg)).contains("smol"), "removing a node removes its clusters");
}

/// A port that is free on 127.0.0.2 and 127.0.0.3 right now.
fn free_port() -> u16 {
    loop {
        let s = std::net::UdpSocket::bind("127.0.0.2:0").unwrap();
        let port = s.local_addr().unwrap().port();
        drop(s);
        if std::net::UdpSocket::bind(("127.0.0.3", port)).is_ok() {
            return port;
        }
    }
}

#[test]
fn probing_a_loopback_range_finds_exactly_the_nodes_started() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _n2 = NodeProc::spawn_on(&format!("127.0.0.2:{port}"), Some(KEY), &[]);
    let _n3 = NodeProc::spawn_on(&format!("127.0.0.3:{port}"), Some(KEY), &[]);
    let out = ok(sollol(&["discover", "--cidr", "127.0.0.0/29", "--port", &port.to_string(), "--add"], dir.path()));
    assert!(out.contains(&format!("127.0.0.2:{port}")) && out.contains(&format!("127.0.0.3:{port}")), "{out}");
    assert!(out.contains("2 node(s) found"), "{out}");
    let list = ok(sollol(&["nodes", "list"], dir.path()));
    assert_eq!(list.matches("healthy").count(), 2, "{list}");
    // With another key the nodes are still found, as nodes that refuse it.
    let out = Command::new(common::sollol_bin())
        .args(["discover", "--cidr", "127.0.0.0/29", "--port", &port.to_string()])
        .env("SOLLOL_CLUSTER_KEY", "another-key")
        .env("SOLLOL_REGISTRY", dir.path().join("other.toml"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("2 node(s) found") && out.contains("refused this cluster key"), "{out}");
}

/// The nodes behind a DNS name (a Kubernetes headless Service's way): the
/// CLI finds them, and a head started with nothing but the name finds them,
/// registers them and serves through them.
#[test]
fn nodes_behind_a_dns_name_are_found_and_served_through() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _node = NodeProc::spawn_on(&format!("127.0.0.1:{port}"), Some(KEY), &[]);
    let out = ok(sollol(&["discover", "--dns", "localhost", "--port", &port.to_string()], dir.path()));
    assert!(out.contains(&format!("127.0.0.1:{port}")) && out.contains("1 node(s) found"), "{out}");
    common::smollm2();
    let serve = common::ServeProc::spawn_env(
        &["--cluster-key", KEY, "--discover-dns", &format!("localhost:{port}")],
        &[("SOLLOL_REGISTRY", &dir.path().join("head.toml"))],
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while common::http::get(&serve.addr, "/api/sollol/status").json()["nodes"].as_array().is_none_or(|n| n.is_empty()) {
        assert!(std::time::Instant::now() < deadline, "the head found no node through DNS");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let body =
        r#"{"model":"smollm2","prompt":"The capital of France is","raw":true,"stream":false,"options":{"temperature":0,"num_predict":4}}"#;
    let r = common::http::post(&serve.addr, "/api/generate", body).json();
    assert_eq!(r["_cluster"]["nodes"][0]["addr"], format!("127.0.0.1:{port}"), "{r}");
    assert!(r["response"].as_str().unwrap().contains("Paris"), "{r}");
}

#[test]
fn multicast_announcements_on_loopback_are_heard() {
    let dir = tempfile::tempdir().unwrap();
    let group = format!("239.255.70.70:{}", free_port());
    let node = NodeProc::spawn(Some(KEY), &["--announce", "--announce-group", &group]);
    let out = ok(sollol(&["discover", "--multicast", "--group", &group, "--interface", "127.0.0.1", "--seconds", "3"], dir.path()));
    assert!(out.contains(&node.addr), "{out}");
}

/// A node that dies and comes back on its address is healthy again and
/// serves new plans; nothing on the head side is restarted (each command
/// here is a fresh head).
#[test]
fn a_restarted_node_is_healthy_again_and_used() {
    common::smollm2();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path();
    let mut n = NodeProc::spawn(Some(KEY), &["--memory-limit", "300MB"]);
    let addr = n.addr.clone();
    ok(sollol(&["nodes", "add", &addr, "--name", "n"], cfg));
    let healthy = |cfg: &Path| -> bool {
        let list: serde_json::Value = serde_json::from_str(&ok(sollol(&["nodes", "list", "--json"], cfg))).unwrap();
        list.as_array().unwrap()[0]["healthy"].as_bool().unwrap()
    };
    assert!(healthy(cfg));
    n.kill();
    assert!(!healthy(cfg), "a dead node is reported down");
    let out = sollol(&["generate", "--route", "-n", "4", "The capital of France is"], cfg);
    assert!(!out.status.success(), "nothing can serve the model while the only node is down");

    let _back = NodeProc::spawn_on(&addr, Some(KEY), &["--memory-limit", "300MB"]);
    assert!(healthy(cfg), "the restarted node is healthy again");
    let out = sollol(&["generate", "--route", "-n", "4", "The capital of France is"], cfg);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Paris"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `plan --explain` over registered nodes times each link of the chain's
/// ring: a → b by node a and b → a by node b (the head cannot see those
/// links). A node asked to time its link to a node of
/// another cluster key refuses with the reason, and the refusal costs its
/// connection nothing.
#[test]
fn plan_explain_times_each_link_of_the_chain_and_a_node_times_its_own() {
    let model = common::smollm2();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path();
    let (a, b) = (NodeProc::spawn(Some(KEY), &[]), NodeProc::spawn(Some(KEY), &[]));
    ok(sollol(&["nodes", "add", &a.addr, "--name", "a"], cfg));
    ok(sollol(&["nodes", "add", &b.addr, "--name", "b"], cfg));
    let model = model.display().to_string();
    let plan = ["plan", "--model", &model, "--nodes", "a,b", "--explain", "--decode-tok-s", "200", "--batched-tok-s", "700"];
    let v: serde_json::Value = serde_json::from_str(&ok(sollol(&[&plan[..], &["--json"]].concat(), cfg))).unwrap();
    let e = &v["explain"];
    assert_eq!(e["timed"], true, "{v}");
    let links = e["links"].as_array().unwrap();
    assert_eq!(links.len(), 2, "one link per hop of the ring: {v}");
    for l in links {
        let (rtt, bits) = (l["rtt_secs"].as_f64().unwrap(), l["bits_per_sec"].as_f64().unwrap_or(0.0));
        assert!(rtt > 0.0 && rtt < 0.05, "a loopback round trip of {rtt} s: {v}");
        assert!(bits > 100e6, "loopback timed at {:.1} Mbit/s: {v}", bits / 1e6);
    }
    assert_eq!(e["prediction"]["hop_secs"].as_array().unwrap().len(), 2, "{v}");
    // The same, for a person.
    let text = ok(sollol(&plan, cfg));
    for hop in ["hop a → b:", "hop b → a:"] {
        assert!(text.contains(hop) && text.contains("timed now"), "{hop} missing: {text}");
    }

    // A latency-aware plan has the nodes time their round trips to each
    // other first; on loopback every order is alike, and the plan holds.
    let v: serde_json::Value =
        serde_json::from_str(&ok(sollol(&["plan", "--model", &model, "--nodes", "a,b", "--strategy", "latency_aware", "--json"], cfg)))
            .unwrap();
    assert!(!v["stages"].as_array().unwrap().is_empty(), "{v}");

    use sollol::head::client::NodeClient;
    use sollol::net::auth::ClusterKey;
    use sollol::net::{resolve_addr, tls};
    let stranger = NodeProc::spawn(Some("another-key"), &[]);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    rt.block_on(async {
        let endpoint = tls::client_endpoint(resolve_addr(&a.addr).await.unwrap()).unwrap();
        let c = NodeClient::connect(&endpoint, &a.addr, &ClusterKey::new(Some(KEY))).await.unwrap();
        let wait = std::time::Duration::from_secs(60);
        let t = c.probe_peer(&b.addr, false, wait).await.unwrap();
        assert!(t.bits_per_sec.is_none() && t.rtt < std::time::Duration::from_millis(50), "{t:?}");
        let err = c.probe_peer(&stranger.addr, true, wait).await.unwrap_err().to_string();
        assert!(err.contains(&format!("cannot time the link to {}", stranger.addr)) && err.contains("key"), "{err}");
        let err = c.probe_peer("no-such-host.invalid:7070", true, wait).await.unwrap_err().to_string();
        assert!(err.contains("cannot time the link to no-such-host.invalid:7070"), "{err}");
        // The connection still serves.
        assert!(c.probe_peer(&b.addr, true, wait).await.unwrap().bits_per_sec.unwrap() > 100e6);
    });
}
