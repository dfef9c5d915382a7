//! `sollol serve` as clients see it: every Ollama and OpenAI endpoint,
//! streaming and not, over a 2-stage local pipeline on the default model;
//! bad input; overload; cancellation; metrics and the dashboard.

mod common;

use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

use common::http::{get, post, request};
use common::ServeProc;

/// Two local stages with the f32 wire: their output is the single node's
/// whatever the split, which the memory the nodes report at load and the
/// rebalancing of a loaded machine may move (with the f16 wire a moved
/// split rounds other activations, enough to flip a 135M model's near
/// ties, as in a tool call sampled at temperature 0).
fn server() -> ServeProc {
    let model = common::smollm2();
    let dir = model.parent().unwrap().display().to_string();
    ServeProc::spawn(&["--local-nodes", "2", "--wire", "f32", "--models-dir", &dir])
}

fn ndjson(body: &str) -> Vec<serde_json::Value> {
    body.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn sse(body: &str) -> (Vec<serde_json::Value>, bool) {
    let data: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    let done = data.last() == Some(&"[DONE]");
    (data.iter().filter(|d| **d != "[DONE]").map(|d| serde_json::from_str(d).unwrap()).collect(), done)
}

#[test]
fn every_endpoint_streaming_and_not() {
    let s = server();
    let a = s.addr.as_str();
    assert_eq!(get(a, "/").body, "Ollama is running");
    assert!(get(a, "/api/version").json()["version"].is_string());

    // /api/generate, not streaming: the full response and Ollama's counters.
    let r = post(
        a,
        "/api/generate",
        r#"{"model":"smollm2","prompt":"The capital of France is","raw":true,"stream":false,"options":{"temperature":0,"num_predict":6}}"#,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert!(v["response"].as_str().unwrap().contains("Paris"), "{v}");
    assert_eq!(v["done"], true);
    assert_eq!(v["prompt_eval_count"], 5);
    assert_eq!(v["eval_count"], 6);
    assert_eq!(v["done_reason"], "length");
    for k in ["total_duration", "load_duration", "prompt_eval_duration", "eval_duration"] {
        assert!(v[k].as_u64().is_some(), "{k} in {v}");
    }
    assert_eq!(v["context"].as_array().unwrap().len(), 11);
    assert_eq!(v["_cluster"]["nodes"].as_array().unwrap().len(), 2, "routing facts: {v}");
    assert!(r.header("x-request-id").is_some());

    // /api/generate, streaming by default: NDJSON, the last line done.
    let lines = ndjson(&post(a, "/api/generate", r#"{"model":"smollm2","prompt":"Hi","options":{"num_predict":4,"seed":2}}"#).body);
    assert!(lines.len() >= 2 && lines.last().unwrap()["done"] == true && lines[0]["done"] == false, "{lines:?}");

    // /api/chat both ways.
    let v = post(
        a,
        "/api/chat",
        r#"{"model":"smollm2","messages":[{"role":"user","content":"Hello"}],"stream":false,"options":{"num_predict":5}}"#,
    )
    .json();
    assert_eq!(v["message"]["role"], "assistant");
    assert!(!v["message"]["content"].as_str().unwrap().is_empty(), "{v}");
    let lines = ndjson(
        &post(a, "/api/chat", r#"{"model":"smollm2","messages":[{"role":"user","content":"Hello"}],"options":{"num_predict":4}}"#).body,
    );
    assert!(lines.last().unwrap()["done"] == true && lines[0]["message"]["content"].is_string(), "{lines:?}");

    assert_eq!(get(a, "/api/tags").json()["models"][0]["name"], "smollm2");
    assert_eq!(get(a, "/api/ps").json()["models"][0]["name"], "smollm2");
    let show = post(a, "/api/show", r#"{"model":"smollm2"}"#).json();
    assert_eq!(show["model_info"]["llama.block_count"], 30, "{show}");

    // OpenAI chat both ways.
    let v = post(a, "/v1/chat/completions", r#"{"model":"smollm2","messages":[{"role":"user","content":"Hi"}],"max_tokens":5}"#).json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["usage"]["total_tokens"], v["usage"]["prompt_tokens"].as_u64().unwrap() + 5);
    let (chunks, done) = sse(&post(
        a,
        "/v1/chat/completions",
        r#"{"model":"smollm2","messages":[{"role":"user","content":"Hi"}],"max_tokens":4,"stream":true}"#,
    )
    .body);
    assert!(done, "ends with data: [DONE]");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "length");

    // OpenAI completions both ways.
    let v = post(a, "/v1/completions", r#"{"model":"smollm2","prompt":"The capital of France is","max_tokens":3,"temperature":0}"#).json();
    assert!(v["choices"][0]["text"].as_str().unwrap().contains("Paris"), "{v}");
    let (chunks, done) = sse(&post(a, "/v1/completions", r#"{"model":"smollm2","prompt":"1, 2,","max_tokens":3,"stream":true}"#).body);
    assert!(done && chunks.iter().all(|c| c["object"] == "text_completion"));
    assert_eq!(get(a, "/v1/models").json()["data"][0]["id"], "smollm2");

    let metrics = get(a, "/metrics").body;
    assert!(metrics.contains("sollol_requests_total{route=\"/api/generate\",status=\"200\"}"), "{metrics}");
    assert!(metrics.contains("sollol_time_to_first_token_seconds_count"), "{metrics}");
    assert!(metrics.contains("sollol_hop_latency_seconds_count"), "{metrics}");
    assert!(metrics.contains("sollol_node_healthy{node=\"local-1\"} 1"), "{metrics}");
    assert!(get(a, "/dashboard").body.contains("<title>sollol dashboard</title>"));
    let status = get(a, "/api/sollol/status").json();
    assert_eq!(status["models"][0]["route"]["nodes"].as_array().unwrap().len(), 2);
    // Two local nodes share this machine's cores, one session at a time: lockstep.
    assert_eq!(status["models"][0]["replicas"][0]["micro_batches"], 1, "{status}");
    // Local nodes on the head's own cores: the head takes each decode step itself.
    assert_eq!(status["models"][0]["replicas"][0]["ring"], false, "{status}");
}

#[test]
fn bad_input_gets_proper_status_codes_and_messages() {
    let s = server();
    let a = s.addr.as_str();
    let r = post(a, "/api/generate", "{not json");
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].as_str().unwrap().contains("invalid request body"));
    let r = post(a, "/v1/chat/completions", "{\"model\": 3}");
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error", "OpenAI's error shape");

    let r = post(a, "/api/generate", r#"{"model":"no-such-model","prompt":"x"}"#);
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(r.json()["error"].as_str().unwrap().contains("not found"));
    let r = post(a, "/v1/chat/completions", r#"{"model":"no-such-model","messages":[{"role":"user","content":"x"}]}"#);
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["type"], "not_found_error");

    for (path, body, needle) in [
        ("/api/generate", r#"{"model":"smollm2","prompt":"x","options":{"top_k":-1}}"#, "top_k"),
        ("/api/generate", r#"{"model":"smollm2","prompt":"x","options":{"temperature":-3}}"#, "temperature"),
        ("/api/generate", r#"{"model":"smollm2","prompt":"x","options":{"num_ctx":0}}"#, "num_ctx"),
        ("/api/chat", r#"{"model":"smollm2","messages":[{"role":"wizard","content":"x"}]}"#, "role"),
        ("/api/generate", r#"{"model":"smollm2","prompt":"x","format":"xml"}"#, "format must be"),
        (
            "/api/generate",
            r##"{"model":"smollm2","prompt":"x","format":{"type":"object","properties":{"a":{"$ref":"#/nowhere"}}}}"##,
            "structured output",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"smollm2","messages":[{"role":"user","content":"x"}],"response_format":{"type":"yaml"}}"#,
            "response_format",
        ),
        // Once a stack overflow that aborted the server (found by the fuzzer).
        ("/api/generate", r#"{"model":"smollm2","prompt":"x","format":{"enum":[-9223372036854775808]}}"#, "outside"),
        ("/v1/chat/completions", r#"{"model":"smollm2","messages":[{"role":"user","content":"x"}],"temperature":9}"#, "temperature"),
        ("/v1/chat/completions", r#"{"model":"smollm2","messages":[{"role":"user","content":"x"}],"max_tokens":-5}"#, "max_tokens"),
        ("/v1/chat/completions", r#"{"model":"smollm2","messages":[{"role":"user","content":"x"}],"n":3}"#, "n = 1"),
    ] {
        let r = post(a, path, body);
        assert_eq!(r.status, 400, "{path} {body}: {}", r.body);
        assert!(r.body.contains(needle), "{path} {body}: {}", r.body);
    }

    // A 1 MB prompt is read, tokenized, and refused for the context.
    let big = format!(r#"{{"model":"smollm2","prompt":"{}","raw":true}}"#, "word ".repeat(200_000));
    let t = Instant::now();
    let r = post(a, "/api/generate", &big);
    assert_eq!(r.status, 400, "{}", &r.body[..r.body.len().min(300)]);
    assert!(r.body.contains("does not fit the context of 8192 tokens"), "{}", r.body);
    assert!(t.elapsed() < Duration::from_secs(60));
    // Beyond the body limit: refused before the body is read. The answer
    // comes while the client still sends (and the server then closes), so
    // it is read off a raw socket: clients that write the whole body first
    // see only the reset.
    let huge = "x".repeat(9 << 20);
    let mut s = std::net::TcpStream::connect(a).unwrap();
    let head = format!("POST /api/generate HTTP/1.1\r\nHost: {a}\r\nContent-Length: {}\r\n\r\n", huge.len());
    let _ = s.write_all(head.as_bytes()).and_then(|_| s.write_all(huge.as_bytes()));
    let mut status = String::new();
    std::io::BufReader::new(s).read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 413"), "{status}");

    // num_predict -1 (until the context is full) and -2 (fill it) run to the context.
    for n in [-1, -2] {
        let body = format!(
            r#"{{"model":"smollm2","prompt":"Hi","raw":true,"stream":false,"options":{{"num_predict":{n},"num_ctx":12,"seed":5}}}}"#
        );
        let r = post(a, "/api/generate", &body);
        assert_eq!(r.status, 200, "num_predict {n}: {}", r.body);
        let v = r.json();
        let used = v["prompt_eval_count"].as_u64().unwrap() + v["eval_count"].as_u64().unwrap();
        // Sampled at Ollama's default temperature, the model may also end
        // its reply first: what matters is that nothing but the context
        // (or the reply's own end) stops it.
        assert!(v["done_reason"] == "stop" || (11..=12).contains(&used), "num_predict {n} stopped at {used} of 12 positions: {v}");
    }

    // A path is not a way into the head's files: outside --models-dir an
    // existing file and a missing one get the same 404, and nothing loads.
    let answers: Vec<(u16, String)> = ["/etc/hostname", "/no/such/file.gguf", "../../etc/hostname", "Cargo.toml", "/proc/self/environ"]
        .iter()
        .map(|path| {
            let r = post(a, "/api/generate", &format!(r#"{{"model":"{path}","prompt":"x","stream":false}}"#));
            (r.status, r.json()["error"].as_str().unwrap_or_default().replace(path, "PATH"))
        })
        .collect();
    for (status, message) in &answers {
        assert_eq!(*status, 404, "{message}");
        assert_eq!(message, &answers[0].1, "the same answer whether the file exists or not");
    }
    // A file inside --models-dir may be named by its path.
    let model = common::smollm2();
    let r = post(
        a,
        "/api/generate",
        &format!(r#"{{"model":"{}","prompt":"Hi","stream":false,"options":{{"num_predict":2}}}}"#, model.display()),
    );
    assert_eq!(r.status, 200, "{}", r.body);

    // The server still serves.
    assert_eq!(post(a, "/api/generate", r#"{"model":"smollm2","prompt":"Hi","stream":false,"options":{"num_predict":2}}"#).status, 200);
}

#[test]
fn keep_alive_keeps_a_model_loaded_for_as_long_as_asked_and_zero_unloads_it() {
    let s = server();
    let a = s.addr.as_str();
    let ps = || get(a, "/api/ps").json()["models"].as_array().unwrap().clone();
    let r = post(a, "/api/generate", r#"{"model":"smollm2","prompt":"Hi","stream":false,"keep_alive":"1h","options":{"num_predict":2}}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    let expires = ps()[0]["expires_at"].as_str().unwrap().to_string();
    let soon = |mins: u64| sollol::api::rfc3339(std::time::SystemTime::now() + Duration::from_secs(mins * 60));
    assert!(expires > soon(55) && expires < soon(65), "{expires}");
    // An empty prompt with keep_alive 0 unloads at once (Ollama's way).
    let r = post(a, "/api/generate", r#"{"model":"smollm2","keep_alive":0}"#).json();
    assert_eq!(r["done_reason"], "unload", "{r}");
    assert!(ps().is_empty());
    // A request with keep_alive 0 loads, answers, and unloads after it.
    let r = post(a, "/api/generate", r#"{"model":"smollm2","prompt":"Hi","stream":false,"keep_alive":"0s","options":{"num_predict":2}}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    let t = Instant::now();
    while !ps().is_empty() {
        assert!(t.elapsed() < Duration::from_secs(10), "still loaded: {:?}", ps());
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = post(a, "/api/generate", r#"{"model":"smollm2","prompt":"Hi","stream":false,"keep_alive":"5 parsecs"}"#);
    assert_eq!(r.status, 400, "{}", r.body);
    let r =
        post(a, "/api/generate", r#"{"model":"smollm2","prompt":"Hi","stream":false,"keep_alive":-1,"options":{"num_predict":2}}"#).json();
    assert!(r["load_duration"].as_u64().unwrap() > 0, "loaded again: {r}");
    assert!(ps()[0]["expires_at"].as_str().unwrap() > soon(60 * 24 * 365).as_str(), "never expires");
}

#[test]
fn pull_streams_progress_and_delete_removes_the_cached_file() {
    // A cache of its own holding the default model's file, not yet verified.
    let cache = tempfile::tempdir().unwrap();
    let models = cache.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    let file = models.join(common::smollm2().file_name().unwrap());
    std::fs::copy(common::smollm2(), &file).unwrap();
    let s = ServeProc::spawn_env(&["--local-nodes", "1"], &[("SOLLOL_CACHE", cache.path())]);
    let a = s.addr.as_str();
    let lines = ndjson(&post(a, "/api/pull", r#"{"model":"smollm2"}"#).body);
    let statuses: Vec<&str> = lines.iter().filter_map(|l| l["status"].as_str()).collect();
    assert_eq!(statuses.first(), Some(&"pulling manifest"), "{lines:?}");
    assert!(statuses.contains(&"verifying sha256 digest") && statuses.last() == Some(&"success"), "{lines:?}");
    // Progress (the first comes at once) counts up to the file's size.
    let progress: Vec<_> = lines.iter().filter(|l| l["completed"].is_u64()).collect();
    assert!(!progress.is_empty(), "{lines:?}");
    let size = std::fs::metadata(&file).unwrap().len();
    assert!(progress.iter().all(|l| l["total"] == size && l["completed"].as_u64().unwrap() <= size), "{lines:?}");
    assert_eq!(post(a, "/api/pull", r#"{"name":"smollm2:135m","stream":false}"#).json()["status"], "success");
    assert_eq!(post(a, "/api/pull", r#"{"model":"no-such-model"}"#).status, 404);
    let delete = |body: &str| request(a, "DELETE", "/api/delete", Some(body), &[]);
    assert_eq!(delete(r#"{"model":"smollm2"}"#).status, 200);
    assert!(!file.exists(), "the file left the cache");
    assert_eq!(delete(r#"{"model":"smollm2"}"#).status, 404, "gone already");
}

fn node_sessions(addr: &str) -> u64 {
    get(addr, "/api/sollol/status").json()["nodes"].as_array().unwrap().iter().map(|n| n["sessions"].as_u64().unwrap_or(0)).sum()
}

#[test]
fn overload_is_refused_and_no_session_leaks() {
    common::smollm2();
    let s = ServeProc::spawn(&["--local-nodes", "2", "--parallel", "2", "--max-queue", "64"]);
    let a = s.addr.clone();
    // Load the model first so all 200 requests meet the queue, not the loader.
    assert_eq!(post(&a, "/api/generate", r#"{"model":"smollm2","prompt":"Hi","stream":false,"options":{"num_predict":1}}"#).status, 200);
    let handles: Vec<_> = (0..200)
        .map(|i| {
            let a = a.clone();
            std::thread::spawn(move || {
                let body = format!(r#"{{"model":"smollm2","prompt":"{i}","raw":true,"stream":false,"options":{{"num_predict":1}}}}"#);
                post(&a, "/api/generate", &body).status
            })
        })
        .collect();
    let statuses: Vec<u16> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let busy = statuses.iter().filter(|s| **s == 503).count();
    assert_eq!(ok + busy, 200, "only 200 and 503: {statuses:?}");
    assert!(ok >= 66, "at least the slots and the queue were served: {ok}");
    assert!(busy > 0, "200 at once must overflow a queue of 64");
    let metrics = get(&a, "/metrics").body;
    assert!(common::http::request(&a, "GET", "/metrics", None, &[]).status == 200);
    assert!(metrics.contains(&format!("sollol_queue_rejected_total {busy}")), "{metrics}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while node_sessions(&a) != 0 {
        // Which stage holds what, should this ever fail.
        let nodes = || get(&a, "/api/sollol/status").json()["nodes"].to_string();
        assert!(Instant::now() < deadline, "every session freed on every stage: {}", nodes());
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_client_that_disconnects_cancels_its_generation() {
    use std::io::BufReader;
    let s = server();
    let a = s.addr.as_str();
    let mut conn = std::net::TcpStream::connect(a).unwrap();
    let body = r#"{"model":"smollm2","prompt":"Tell me a long story","options":{"num_predict":500}}"#;
    write!(
        conn,
        "POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    // Read until the first generated token arrives, then hang up.
    while !line.contains("\"done\":false") {
        line.clear();
        reader.read_line(&mut line).unwrap();
    }
    drop(reader);
    conn.shutdown(std::net::Shutdown::Both).unwrap();
    drop(conn);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = get(a, "/metrics").body;
        if m.contains("sollol_cancelled_total 1") && node_sessions(a) == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "not cancelled: {m}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // A priority header is accepted.
    let r = request(
        a,
        "POST",
        "/api/generate",
        Some(r#"{"model":"smollm2","prompt":"Hi","stream":false,"options":{"num_predict":1}}"#),
        &[("x-priority", "5")],
    );
    assert_eq!(r.status, 200);
}

/// The official Python clients, unmodified, against the server (tests/clients.py).
#[test]
fn official_ollama_and_openai_python_clients_work() {
    let s = server();
    let pp = common::python_path(&["ollama", "openai", "jsonschema"]);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(format!("http://{}", s.addr))
        .env("PYTHONPATH", pp)
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("22 passed, 0 failed"), "{stdout}");
}

/// A chat's second turn reuses the KV state of the first on every stage:
/// only the new tokens are evaluated. With no KV budget nothing is kept and
/// the second turn recomputes (eviction is always safe).
#[test]
fn a_second_chat_turn_evaluates_only_its_new_tokens() {
    common::smollm2();
    for (budget, reuse) in [("256", true), ("0", false)] {
        let s = ServeProc::spawn(&["--local-nodes", "2", "--kv-cache-mb", budget]);
        let a = s.addr.as_str();
        let q1 = r#"{"role":"user","content":"What is the capital of France?"}"#;
        let t1 =
            post(a, "/v1/chat/completions", &format!(r#"{{"model":"smollm2","messages":[{q1}],"max_tokens":8,"temperature":0}}"#)).json();
        let p1 = t1["usage"]["prompt_tokens"].as_u64().unwrap();
        assert_eq!(t1["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
        let answer = serde_json::to_string(&t1["choices"][0]["message"]["content"]).unwrap();
        let messages = format!(r#"[{q1},{{"role":"assistant","content":{answer}}},{{"role":"user","content":"And of Germany?"}}]"#);
        let t2 = post(a, "/v1/chat/completions", &format!(r#"{{"model":"smollm2","messages":{messages},"max_tokens":8,"temperature":0}}"#))
            .json();
        let total = t2["usage"]["prompt_tokens"].as_u64().unwrap();
        let cached = t2["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
        assert!(!t2["choices"][0]["message"]["content"].as_str().unwrap().is_empty(), "{t2}");
        if reuse {
            assert!(cached >= p1 && cached < total, "turn 2 reused {cached} of {total} tokens; turn 1's prompt was {p1}");
            // Ollama's counter says the same: only the new tokens were evaluated.
            let o2 = post(
                a,
                "/api/chat",
                &format!(r#"{{"model":"smollm2","messages":{messages},"stream":false,"options":{{"num_predict":4,"temperature":0}}}}"#),
            )
            .json();
            assert!(o2["prompt_eval_count"].as_u64().unwrap() < total - p1 + 1, "{o2}");
        } else {
            assert_eq!(cached, 0, "no budget, no reuse");
        }
    }
}
