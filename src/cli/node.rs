//! `sollol node`: serve layer slices to heads over QUIC.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use sollol::net::auth::ClusterKey;
use sollol::node::stage::Admission;
use sollol::node::{run as run_node, NodeConfig};

#[derive(Args)]
pub struct NodeArgs {
    /// Address to listen on (UDP); port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Shared secret of the cluster; required to listen beyond loopback.
    #[arg(long, env = "SOLLOL_CLUSTER_KEY", hide_env_values = true)]
    cluster_key: Option<String>,
    /// Memory this node offers for weights and KV caches (e.g. 200MB, 24GB).
    #[arg(long, value_parser = sollol::sys::parse_size)]
    memory_limit: Option<u64>,
    /// Where the node keeps its certificate (default: ~/.config/sollol/node).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// A file that co-located nodes lock around each forward pass, so their
    /// passes take turns on the cores (set by --local-nodes).
    #[arg(long)]
    compute_lock: Option<PathBuf>,
    /// Exit when standard input closes (set by a parent that started this node).
    #[arg(long, hide = true)]
    exit_with_stdin: bool,
    /// Announce this node by multicast for `sollol discover --multicast`.
    #[arg(long)]
    announce: bool,
    /// The multicast group of announcements.
    #[arg(long, default_value = sollol::cluster::discovery::DEFAULT_GROUP)]
    announce_group: std::net::SocketAddrV4,
    /// Where slices run: cpu, cuda[:N] (built with --features cuda), metal.
    #[arg(long, default_value = "cpu", env = "SOLLOL_DEVICE")]
    device: String,
    /// Sessions held at once; a step opening one more is refused (the
    /// head answers 503 / 429).
    #[arg(long, default_value_t = 256)]
    max_sessions: usize,
    /// KV memory sessions may hold (e.g. 2GB; default: what the memory
    /// offered leaves after the weights).
    #[arg(long, value_parser = sollol::sys::parse_size)]
    kv_memory: Option<u64>,
    /// Seconds an untouched session is kept (a head that vanished).
    #[arg(long, default_value_t = 600)]
    session_idle_secs: u64,
    /// Connections served at once; more are refused before their handshake.
    #[arg(long, default_value_t = 256)]
    max_connections: usize,
    /// How this host is linked (e.g. "10 Gbit/s"), shown on the head's
    /// dashboard beside the round trip it measures.
    #[arg(long, value_parser = link_text)]
    link: Option<String>,
    /// Which cores this node computes on, as heads compare it: nodes that
    /// report the same name share cores, so a chain does not spread its
    /// sessions to run them at once (default: this machine, the cgroup whose
    /// CPU quota holds the process, its CPU set; or machine and GPU).
    #[arg(long, value_parser = link_text)]
    compute_id: Option<String>,
    /// Fault injection for tests: steps of this session panic in the worker.
    #[arg(long, hide = true)]
    panic_on_session: Option<u64>,
}

/// A `--link` description or a `--compute-id`: one short line (it travels
/// in every capability report).
fn link_text(s: &str) -> std::result::Result<String, String> {
    match s.len() {
        1..=120 if !s.contains(['\n', '\r']) => Ok(s.to_string()),
        _ => Err("a link is described in one line of 1 to 120 bytes".into()),
    }
}

pub fn run(args: NodeArgs, threads: usize) -> Result<()> {
    let state_dir = match args.state_dir {
        Some(d) => d,
        None => sollol::paths::config_dir().context("no config directory (set HOME)")?.join("node"),
    };
    let cfg = NodeConfig {
        listen: args.listen,
        key: ClusterKey::new(args.cluster_key.as_deref()),
        memory_limit: args.memory_limit,
        state_dir,
        threads,
        compute_lock: args.compute_lock,
        announce: args.announce.then_some(args.announce_group),
        device: sollol::model::device::parse(&args.device)?,
        admission: Admission {
            max_sessions: args.max_sessions,
            idle: std::time::Duration::from_secs(args.session_idle_secs),
            panic_on_session: args.panic_on_session,
            ..Admission::default()
        },
        kv_memory: args.kv_memory,
        max_connections: args.max_connections,
        link: args.link,
        compute_id: args.compute_id,
    };
    if args.exit_with_stdin {
        std::thread::spawn(|| {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            std::process::exit(0);
        });
    }
    // Networking needs little: the compute runs on the stage worker's thread pool.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    // The node finishes what it queued and closes on SIGINT or SIGTERM.
    rt.block_on(async {
        let stop = sollol::sys::stop_signal()?;
        run_node(cfg, stop).await.map_err(anyhow::Error::from)
    })
}
