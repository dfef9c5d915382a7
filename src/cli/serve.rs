//! `sollol serve`: the head's HTTP server (Ollama and OpenAI APIs).

use std::net::SocketAddr;

use anyhow::Result;
use clap::Args;
use sollol::api::service::ServeConfig;
use sollol::net::tensor::WireDType;

#[derive(Args)]
pub struct ServeArgs {
    #[arg(long, default_value = "127.0.0.1:11434")]
    listen: SocketAddr,
    /// Node processes to start on loopback when the registry lists no nodes.
    #[arg(long, default_value_t = 1)]
    local_nodes: usize,
    /// Activation dtype between stages.
    #[arg(long, default_value = "f16")]
    wire: WireDType,
    /// Generations running at once.
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// Requests that may wait for a slot; more are refused (503 / 429).
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Shared secret of the registered nodes' cluster.
    #[arg(long, env = "SOLLOL_CLUSTER_KEY", hide_env_values = true)]
    cluster_key: Option<String>,
    /// The model a fresh install serves.
    #[arg(long, default_value = "smollm2")]
    model: String,
    /// KV memory idle conversations may keep for their next turn (MiB, all stages).
    #[arg(long, default_value_t = 256)]
    kv_cache_mb: usize,
    /// Move blocks off a pipeline stage whose measured compute exceeds the
    /// mean by this fraction (live sessions keep their KV state); 0 turns
    /// dynamic rebalancing off.
    #[arg(long, default_value_t = 0.25)]
    rebalance_threshold: f64,
    /// A directory whose model files clients may name by path (repeatable);
    /// other paths are unknown to clients.
    #[arg(long = "models-dir")]
    models_dirs: Vec<std::path::PathBuf>,
    /// Copies of each model to spread requests over (each on nodes of its
    /// own: registered nodes that can hold the model whole, or groups of the
    /// local nodes); a copy's death moves its sessions to another.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Find nodes as the addresses this DNS name resolves to (a Kubernetes
    /// headless Service), again every 30 s; new ones join the registry.
    #[arg(long)]
    discover_dns: Option<String>,
    /// Micro-batches each chain spreads its sessions over, so that its
    /// stages work on different sessions at once; default: one per stage
    /// on cores of its own (stages sharing a machine's cores get one).
    #[arg(long)]
    micro_batches: Option<usize>,
}

pub fn run(args: ServeArgs, threads: usize) -> Result<()> {
    let cfg = ServeConfig {
        listen: args.listen,
        local_nodes: args.local_nodes,
        threads,
        wire: args.wire,
        parallel: args.parallel,
        max_queue: args.max_queue,
        key: args.cluster_key,
        default_model: args.model,
        kv_cache_mb: args.kv_cache_mb,
        rebalance_threshold: args.rebalance_threshold,
        model_dirs: args.models_dirs,
        replicas: args.replicas,
        discover_dns: args.discover_dns,
        micro_batches: args.micro_batches,
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).max_blocking_threads(256).enable_all().build()?;
    rt.block_on(sollol::api::serve(cfg))?;
    Ok(())
}
