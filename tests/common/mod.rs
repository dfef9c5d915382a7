//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The default model (SmolLM2-135M-Instruct Q4_1), fetched into the cache on
/// first use; `.ci/run` fetches it before the tests start.
pub fn smollm2() -> PathBuf {
    sollol::model::source::resolve("smollm2").expect("fetch the default model (sollol pull)").path
}

/// The second real model (Gemma-3-270M Q4_K_M, the gemma3 architecture),
/// fetched like the default one.
pub fn gemma3() -> PathBuf {
    sollol::model::source::resolve("gemma3").expect("fetch Gemma-3-270M (sollol pull gemma3)").path
}

pub fn sollol_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sollol"))
}

pub mod tiny;

/// A `sollol node` process on 127.0.0.1 with a free port; killed on drop.
pub struct NodeProc {
    pub child: std::process::Child,
    pub addr: String,
}

impl NodeProc {
    pub fn spawn(key: Option<&str>, extra: &[&str]) -> Self {
        Self::spawn_on("127.0.0.1:0", key, extra)
    }

    pub fn spawn_on(listen: &str, key: Option<&str>, extra: &[&str]) -> Self {
        Self::spawn_with(listen, 1, key, extra)
    }

    /// A node with its own thread count (the others get 1).
    pub fn spawn_with(listen: &str, threads: usize, key: Option<&str>, extra: &[&str]) -> Self {
        use std::io::BufRead;
        let state = std::env::temp_dir().join("sollol-test-node");
        let mut cmd = std::process::Command::new(sollol_bin());
        cmd.args(["--threads", &threads.to_string(), "node", "--listen", listen, "--state-dir"])
            .arg(&state)
            .args(extra)
            .env_remove("SOLLOL_CLUSTER_KEY")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit());
        if let Some(k) = key {
            cmd.env("SOLLOL_CLUSTER_KEY", k);
        }
        let mut child = cmd.spawn().expect("spawn sollol node");
        let stdout = child.stdout.take().unwrap();
        let mut lines = std::io::BufReader::new(stdout).lines();
        let line = lines.next().expect("node output").expect("node line");
        std::thread::spawn(move || for _ in lines {});
        let addr = line.strip_prefix("sollol node listening on ").expect("listen line").to_string();
        Self { child, addr }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// HTTP for the tests, on ureq: every reply is a `Reply`, whatever its status.
#[allow(dead_code)]
pub mod http {
    use std::io::{BufRead, Read};

    pub struct Reply {
        pub status: u16,
        pub headers: Vec<(String, String)>,
        pub body: String,
    }

    impl Reply {
        pub fn json(&self) -> serde_json::Value {
            serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
        }

        pub fn header(&self, name: &str) -> Option<&str> {
            self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
        }
    }

    fn send(addr: &str, method: &str, path: &str, body: Option<&str>, extra: &[(&str, &str)]) -> ureq::Response {
        let mut req = ureq::request(method, &format!("http://{addr}{path}")).set("content-type", "application/json");
        for (k, v) in extra {
            req = req.set(k, v);
        }
        let sent = match body {
            Some(b) => req.send_string(b),
            None => req.call(),
        };
        match sent {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        }
    }

    /// Sends a request and reads the whole reply.
    pub fn request(addr: &str, method: &str, path: &str, body: Option<&str>, extra: &[(&str, &str)]) -> Reply {
        let r = send(addr, method, path, body, extra);
        let headers =
            r.headers_names().into_iter().map(|k| (r.header(&k).unwrap_or_default().to_string(), k)).map(|(v, k)| (k, v)).collect();
        let status = r.status();
        let mut body = String::new();
        r.into_reader().read_to_string(&mut body).expect("the reply's body");
        Reply { status, headers, body }
    }

    pub fn get(addr: &str, path: &str) -> Reply {
        request(addr, "GET", path, None, &[])
    }

    pub fn post(addr: &str, path: &str, body: &str) -> Reply {
        request(addr, "POST", path, Some(body), &[])
    }

    /// A streamed reply's lines as they arrive.
    pub fn stream(addr: &str, path: &str, body: &str) -> impl Iterator<Item = String> {
        std::io::BufReader::new(send(addr, "POST", path, Some(body), &[]).into_reader()).lines().map_while(Result::ok)
    }
}

/// A `sollol serve` process on a free port; killed (with its nodes) on drop.
pub struct ServeProc {
    pub child: std::process::Child,
    pub addr: String,
}

impl ServeProc {
    pub fn spawn(args: &[&str]) -> Self {
        Self::spawn_env(args, &[])
    }

    /// A server with extra environment variables (e.g. its own cache).
    pub fn spawn_env(args: &[&str], env: &[(&str, &std::path::Path)]) -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(sollol_bin())
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .env("SOLLOL_REGISTRY", std::env::temp_dir().join(format!("sollol-serve-test-{}.toml", std::process::id())))
            .env("SOLLOL_NO_HUB", "1")
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("spawn sollol serve");
        let stdout = child.stdout.take().unwrap();
        let mut lines = std::io::BufReader::new(stdout).lines();
        let line = lines.next().expect("serve output").expect("serve line");
        std::thread::spawn(move || for _ in lines {});
        let addr = line.strip_prefix("sollol serving on http://").expect("serving line").to_string();
        Self { child, addr }
    }
}

impl Drop for ServeProc {
    fn drop(&mut self) {
        // SIGTERM lets the server stop its local nodes.
        unsafe_kill_term(self.child.id());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unsafe_kill_term(pid: u32) {
    let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
}

/// A PYTHONPATH under which `modules` import: the system's, or a private
/// directory in the sollol cache that pip fills the first time (a fresh
/// machine has none of them).
pub fn python_path(modules: &[&str]) -> String {
    use std::process::Command;
    let imports = |pp: &str| {
        let code = modules.iter().map(|m| format!("import {m}")).collect::<Vec<_>>().join("; ");
        Command::new("python3").args(["-c", &code]).env("PYTHONPATH", pp).status().is_ok_and(|s| s.success())
    };
    let system = std::env::var("PYTHONPATH").unwrap_or_default();
    if imports(&system) {
        return system;
    }
    let private = sollol::paths::cache_dir().expect("a cache dir").join("python").to_string_lossy().to_string();
    if !imports(&private) {
        let ok = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target", &private])
            .args(modules)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "{modules:?} missing and pip could not install them into {private}");
    }
    private
}

/// "Once upon a time, in a small village by the sea, there lived" in
/// SmolLM2's tokens: its greedy reply runs past 64 tokens, so a test that
/// acts at a given piece (a kill, a drain, up to piece 57) always reaches it.
/// (The README's France prompt ends at EOS after ~20 tokens, near a tie.)
pub const STORY_PROMPT: [u32; 15] = [6403, 1980, 253, 655, 28, 281, 253, 1165, 6560, 411, 260, 3426, 28, 665, 4161];

/// A greedy sample request for a pipeline's last stage.
pub fn greedy() -> sollol::net::message::SampleRequest {
    sollol::net::message::SampleRequest {
        params: sollol::model::sampling::SamplingParams { temperature: 0.0, ..Default::default() },
        recent: vec![],
        draw: 0,
        logprobs: None,
        allowed: None,
    }
}

/// Greedy generation of 64 tokens from `STORY_PROMPT` (EOS would still end it).
pub fn greedy_request() -> sollol::head::generation::GenerateRequest {
    sollol::head::generation::GenerateRequest {
        prompt: STORY_PROMPT.to_vec(),
        params: sollol::model::sampling::SamplingParams { temperature: 0.0, ..Default::default() },
        max_tokens: 64,
        stop: vec![],
        context: 0,
        resume: None,
        keep_session: false,
        logprobs: None,
        format: None,
    }
}

/// The default model opened, and `greedy_request` run on one in-process slice:
/// what every pipeline run of the same request must reproduce.
pub struct Reference {
    pub path: PathBuf,
    pub file: sollol::model::ModelFile,
    pub tokenizer: sollol::head::tokenizer::Tokenizer,
    pub result: sollol::head::generation::GenerateResult,
}

pub fn single_node_reference() -> Reference {
    use sollol::model::{ModelFile, ModelSlice};
    let path = smollm2();
    let mut file = ModelFile::open(&path).expect("open the default model");
    let tokenizer = sollol::head::tokenizer::Tokenizer::for_model(&file).expect("tokenizer");
    let slice = ModelSlice::load(&mut file, 0..30, &candle_core::Device::Cpu).expect("load");
    let mut local = sollol::head::engine::LocalEngine::new(slice).expect("engine");
    let result = sollol::head::generation::generate(&mut local, &tokenizer, 1, &greedy_request(), &mut |_| true).expect("generate");
    Reference { path, file, tokenizer, result }
}
