//! `--local-nodes N`: node processes of this same binary on loopback, each
//! given a share of the cores so they do not fight over them (candle's thread
//! pool collapses when processes oversubscribe the machine).

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
}

impl LocalNodes {
    /// Starts `n` nodes of the binary `bin` on 127.0.0.1 with free ports and
    /// a fresh cluster key, splitting `threads` between them.
    pub fn spawn(bin: &Path, n: usize, threads: usize) -> Result<Self> {
        let key = crate::net::auth::ClusterKey::random_hex();
        let threads_each = (threads / n.max(1)).max(1);
        let mut nodes = Self { children: Vec::new(), addrs: Vec::new(), key, threads_each };
        for _ in 0..n {
            let mut child = Command::new(bin)
                .args(["--threads", &threads_each.to_string(), "node", "--listen", "127.0.0.1:0"])
                .env("SOLLOL_CLUSTER_KEY", &nodes.key)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(|e| Error::io(format!("cannot start {}", bin.display()), e))?;
            let stdout = child.stdout.take().expect("piped stdout");
            nodes.children.push(child);
            nodes.addrs.push(read_listen_line(stdout)?);
        }
        Ok(nodes)
    }
}

/// The node prints `sollol node listening on ADDR` once bound.
fn read_listen_line(stdout: std::process::ChildStdout) -> Result<String> {
    let (tx, rx) = std::sync::mpsc::channel();
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
