//! `sollol node`: serve layer slices to heads over QUIC.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use sollol::net::auth::ClusterKey;
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
    };
    if args.exit_with_stdin {
        std::thread::spawn(|| {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            std::process::exit(0);
        });
    }
    // Networking needs little: the compute runs on the stage worker's thread pool.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        tokio::select! {
            r = run_node(cfg) => r.map_err(anyhow::Error::from),
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    })
}
