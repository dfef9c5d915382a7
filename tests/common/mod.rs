//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The default model (SmolLM2-135M-Instruct Q4_1), fetched into the cache on
/// first use; `.ci/run` fetches it before the tests start.
pub fn smollm2() -> PathBuf {
    sollol::model::source::resolve("smollm2").expect("fetch the default model (sollol pull)").path
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
        use std::io::BufRead;
        let state = std::env::temp_dir().join("sollol-test-node");
        let mut cmd = std::process::Command::new(sollol_bin());
        cmd.args(["--threads", "1", "node", "--listen", listen, "--state-dir"])
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
