//! `--local-nodes N`: node processes of this same binary on loopback.
//!
//! Co-located stages must not fight over the cores: candle's thread pool
//! collapses when processes oversubscribe the machine (2 threads on a busy
//! 2-core machine ran 6× slower than 1). Two ways to share:
//! - time (default): every node gets all the threads, and a machine-wide
//!   compute lock (a file lock) lets one forward pass run at a time. A single
//!   session's stages run one after another anyway, so each runs at full
//!   speed; concurrent sessions take turns instead of thrashing.
//! - space (`split_cores`): each node gets threads / N and runs unlocked.
//!   Measured on 2 cores, one session: 0.60× the single-node decode speed for 2
//!   stages, against 1.04× when sharing time (BENCHMARKS.md).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::error::{Error, Result};

pub struct LocalNodes {
    children: Vec<Child>,
    pub addrs: Vec<String>,
    pub key: String,
    pub threads_each: usize,
    /// The lock file and its directory, removed with the nodes.
    _lock_dir: Option<tempfile::TempDir>,
}

impl LocalNodes {
    /// Starts `n` nodes of the binary `bin` on 127.0.0.1 with free ports and
    /// a fresh cluster key, sharing `threads` in time (default) or space.
    pub fn spawn(bin: &Path, n: usize, threads: usize, split_cores: bool) -> Result<Self> {
        let key = crate::net::auth::ClusterKey::random_hex();
        let threads_each = if split_cores { (threads / n.max(1)).max(1) } else { threads.max(1) };
        let lock_dir = if split_cores {
            None
        } else {
            Some(tempfile::Builder::new().prefix("sollol-local").tempdir().map_err(|e| Error::io("cannot create a lock file", e))?)
        };
        let mut nodes = Self { children: Vec::new(), addrs: Vec::new(), key, threads_each, _lock_dir: None };
        for _ in 0..n {
            let mut cmd = Command::new(bin);
            // --exit-with-stdin: the node goes when this process goes, even killed.
            cmd.args([
                "--threads",
                &threads_each.to_string(),
                "node",
                "--listen",
                "127.0.0.1:0",
                "--exit-with-stdin",
                "--link",
                "loopback",
            ]);
            if let Some(dir) = &lock_dir {
                cmd.arg("--compute-lock").arg(dir.path().join("compute.lock"));
            }
            let mut child = cmd
                .env("SOLLOL_CLUSTER_KEY", &nodes.key)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(|e| Error::io(format!("cannot start {}", bin.display()), e))?;
            let stdout = child.stdout.take().expect("piped stdout");
            nodes.children.push(child);
            nodes.addrs.push(read_listen_line(stdout)?);
        }
        nodes._lock_dir = lock_dir;
        Ok(nodes)
    }
}

/// The node prints `sollol node listening on ADDR` once bound.
fn read_listen_line(stdout: std::process::ChildStdout) -> Result<String> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next();
        let _ = tx.send(first);
        // Keep draining so the child never blocks on a full pipe.
        for _ in lines {}
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Some(Ok(line))) => line
            .strip_prefix("sollol node listening on ")
            .map(str::to_string)
            .ok_or_else(|| Error::InvalidRequest(format!("unexpected output from a local node: {line}"))),
        _ => Err(Error::InvalidRequest("a local node did not start within 30 s".into())),
    }
}

impl Drop for LocalNodes {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
