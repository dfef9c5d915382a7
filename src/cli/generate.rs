//! `sollol generate`: one prompt in, generated text streamed to stdout, a
//! one-line summary on stderr — on this process, or through a pipeline of
//! nodes (`--nodes`, or `--local-nodes N` started here on loopback).

use std::io::Write;

use anyhow::{Context, Result};
use clap::Args;
use sollol::cluster::failover::{ChainSpec, FailoverEngine, SharedChain};
use sollol::cluster::health::HealthPolicy;
use sollol::cluster::local::LocalNodes;
use sollol::cluster::manager::ClusterManager;
use sollol::cluster::partition::Strategy;
use sollol::cluster::registry::Registry;
use sollol::head::chat::{Message, Prompt};
use sollol::head::constraint::Format;
use sollol::head::engine::{Engine, LocalEngine};
use sollol::head::generation::{generate, GenerateRequest, GenerateResult};
use sollol::net::auth::ClusterKey;
use sollol::net::tensor::WireDType;
use sollol::sys::human_bytes;

use super::{load_slice, ModelArgs, Opened, SamplingArgs};

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    /// Constrain the output to JSON: `json` for any object, or a file
    /// holding a JSON schema.
    #[arg(long)]
    format: Option<String>,
    /// The prompt.
    prompt: String,
}

#[derive(Args, Clone)]
pub struct PipelineArgs {
    /// Nodes of the pipeline in chain order: HOST:PORT,HOST:PORT,...
    #[arg(long, value_delimiter = ',')]
    pub nodes: Vec<String>,
    /// Start N node processes on loopback and run the pipeline over them.
    #[arg(long, default_value_t = 0)]
    pub local_nodes: usize,
    /// Shared secret of the cluster.
    #[arg(long, env = "SOLLOL_CLUSTER_KEY", hide_env_values = true)]
    pub cluster_key: Option<String>,
    /// Activation dtype between stages: f16 (default), bf16, or f32 (exact).
    #[arg(long, default_value = "f16")]
    pub wire: WireDType,
    /// Give each local node threads / N instead of all threads plus a shared
    /// compute lock (see ARCHITECTURE.md).
    #[arg(long)]
    pub local_split_cores: bool,
    /// Run on a registered cluster (sollol cluster create).
    #[arg(long, conflicts_with_all = ["nodes", "local_nodes"])]
    pub cluster: Option<String>,
    /// Nodes that take over the blocks of a stage that dies mid-generation.
    #[arg(long, value_delimiter = ',')]
    pub standby: Vec<String>,
    /// Route through the registry: a single node when one can hold the model,
    /// else a cluster (created on demand).
    #[arg(long, conflicts_with_all = ["nodes", "local_nodes", "cluster"])]
    pub route: bool,
}

/// The engine a command runs on, and what keeps local nodes alive while it does.
pub struct Running {
    pub engine: Box<dyn Engine>,
    _local: Option<LocalNodes>,
}

/// Builds the local engine, or connects, plans, loads and links a pipeline
/// (printing the plan to stderr).
pub fn start_engine(opened: &mut Opened, args: &PipelineArgs, threads: usize) -> Result<Running> {
    if args.cluster.is_some() || args.route {
        return start_routed(opened, args);
    }
    if args.nodes.is_empty() && args.local_nodes == 0 {
        let slice = load_slice(&mut opened.file, None, &opened.device)?;
        return Ok(Running { engine: Box::new(LocalEngine::new(slice)?), _local: None });
    }
    let (addrs, key, local) = if args.local_nodes > 0 {
        let bin = std::env::current_exe().context("cannot find this executable")?;
        let total = if threads == 0 { sollol::sys::cpu_cores() } else { threads };
        let local = LocalNodes::spawn(&bin, args.local_nodes, total, args.local_split_cores)?;
        eprintln!("started {} local nodes, {} threads each", local.addrs.len(), local.threads_each);
        (local.addrs.clone(), ClusterKey::new(Some(&local.key)), Some(local))
    } else {
        (args.nodes.clone(), ClusterKey::new(args.cluster_key.as_deref()), None)
    };
    let cfg = opened.file.config()?;
    let digest = opened.file.digest()?;
    // Nodes resolve the model themselves: a local path must be absolute for them.
    let spec = match std::fs::canonicalize(&opened.resolved.name) {
        Ok(p) => p.display().to_string(),
        Err(_) => opened.resolved.name.clone(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let chain = ChainSpec {
        model: spec,
        digest: Some(digest),
        layer_bytes: opened.file.layer_bytes()?,
        context_length: cfg.context_length,
        key,
        wire: args.wire,
        strategy: Strategy::Even,
        micro_batches: None,
    };
    let engine = FailoverEngine::start(rt, chain, addrs, args.standby.clone())?;
    let pipeline = engine.pipeline();
    eprintln!("plan: {} over {} stages, wire {}", opened.resolved.name, pipeline.n_stages(), args.wire);
    for (i, (addr, l)) in pipeline.addrs().iter().zip(pipeline.loaded()).enumerate() {
        eprintln!(
            "  stage {}  {addr}  blocks {}..{}  ({} blocks, {})",
            i + 1,
            l.start,
            l.end,
            l.end - l.start,
            human_bytes(l.weight_bytes)
        );
    }
    if !args.standby.is_empty() {
        eprintln!("  standby {}", args.standby.join(", "));
    }
    Ok(Running { engine: Box::new(engine), _local: local })
}

/// A registered cluster, or the registry's routing decision.
fn start_routed(opened: &mut Opened, args: &PipelineArgs) -> Result<Running> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let guard = rt.enter();
    let key = ClusterKey::new(args.cluster_key.as_deref());
    let manager = ClusterManager::new(Registry::load_default()?, key, HealthPolicy::default())?;
    let entry = match &args.cluster {
        Some(name) => {
            let entry = manager.registry().cluster(name).cloned().with_context(|| format!("no cluster named '{name}'"))?;
            let digest = opened.file.digest()?;
            anyhow::ensure!(
                entry.digest.is_empty() || entry.digest == digest,
                "cluster '{name}' serves {}, not {}",
                entry.model,
                opened.resolved.name
            );
            let health = rt.block_on(manager.cluster_health(name))?;
            anyhow::ensure!(health.healthy, "cluster '{name}' is unhealthy - nodes down: {}", health.down.join(", "));
            entry
        }
        None => rt.block_on(manager.route(&opened.resolved.name))?,
    };
    let info = manager.route_info(&entry);
    eprintln!("route: {}", serde_json::to_string(&info)?);
    let chain: Vec<_> = info.nodes.iter().map(|s| (s.addr.clone(), s.layers[0]..s.layers[1] + 1)).collect();
    // Any other registered node can take a dead node's blocks.
    let standby = manager.registry().nodes.iter().map(|n| n.addr.clone()).filter(|a| !chain.iter().any(|(c, _)| c == a)).collect();
    let spec = ChainSpec {
        model: entry.model.clone(),
        digest: Some(opened.file.digest()?),
        layer_bytes: opened.file.layer_bytes()?,
        context_length: opened.file.config()?.context_length,
        key: ClusterKey::new(args.cluster_key.as_deref()),
        wire: args.wire,
        strategy: entry.strategy,
        micro_batches: None,
    };
    drop(guard);
    let chain = SharedChain::build(rt.handle().clone(), spec, chain, standby)?;
    Ok(Running { engine: Box::new(FailoverEngine::owning(rt, chain)), _local: None })
}

/// The stderr lines after a generation.
pub fn print_summary(result: &GenerateResult) {
    let s = &result.stats;
    eprintln!("{}", s.summary());
    if s.stage_times.len() > 1 {
        let stages: Vec<String> = s.stage_times.iter().enumerate().map(|(i, t)| format!("{}: {:.2} s", i + 1, t.as_secs_f64())).collect();
        let mut line = format!("stages compute {}", stages.join(", "));
        if let (Some(p50), Some(p99)) = (s.hop_latency_percentile(50.0), s.hop_latency_percentile(99.0)) {
            line += &format!("; hop latency p50 {:.3} ms, p99 {:.3} ms", p50.as_secs_f64() * 1e3, p99.as_secs_f64() * 1e3);
        }
        if let Some(b) = s.hop_bytes_per_token.first() {
            line += &format!("; {b} B/token/hop");
        }
        line += &format!("; f16 overflow fallbacks {}", s.f16_fallbacks);
        eprintln!("{line}");
    }
}

pub fn run(args: GenerateArgs, threads: usize) -> Result<()> {
    let mut opened = args.model.open()?;
    let tokenizer = opened.tokenizer()?;
    let prompt = if args.chat { Prompt::chat(vec![Message::new("user", &args.prompt)]) } else { Prompt::Raw(args.prompt.clone()) };
    let prompt = tokenizer.prompt_ids(&prompt)?;
    let mut running = start_engine(&mut opened, &args.pipeline, threads)?;
    let req = GenerateRequest {
        prompt,
        params: args.sampling.params(0.0),
        max_tokens: args.sampling.max_tokens,
        stop: args.sampling.stop.clone(),
        context: args.sampling.ctx,
        resume: None,
        keep_session: false,
        logprobs: None,
        format: match args.format.as_deref() {
            None => None,
            Some("json") => Some(Format::Json),
            Some(file) => {
                let text = std::fs::read_to_string(file).with_context(|| format!("cannot read the schema {file}"))?;
                Some(Format::Schema(serde_json::from_str(&text).with_context(|| format!("{file} is not JSON"))?))
            }
        },
    };
    let session = rand::random::<u64>();
    let mut stdout = std::io::stdout().lock();
    let result = generate(running.engine.as_mut(), &tokenizer, session, &req, &mut |piece| {
        // A closed pipe (`| head`) cancels the generation instead of failing it.
        stdout.write_all(piece.text.as_bytes()).and_then(|_| stdout.flush()).is_ok()
    })?;
    let _ = writeln!(stdout);
    print_summary(&result);
    Ok(())
}
