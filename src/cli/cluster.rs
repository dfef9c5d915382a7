//! `sollol cluster create|list|health|rm|drain`, `sollol plan` and `sollol route`.

use std::collections::HashMap;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde::Serialize;
use sollol::cluster::manager::describe;
use sollol::cluster::models::model_info;
use sollol::cluster::netmodel::{self, Compute, Link, Prediction};
use sollol::cluster::partition::{self, NodeSpec, Strategy};
use sollol::cluster::registry::Registry;
use sollol::net::probe::LinkTiming;
use sollol::sys::human_bytes;

use super::nodes::{manager, print_nodes, runtime, KeyArgs};

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Plan, load the slices on the nodes, and register the cluster.
    Create {
        name: String,
        #[arg(long)]
        model: String,
        /// Registered node names (or addresses), in chain order.
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<String>,
        #[arg(long, default_value = "even")]
        strategy: Strategy,
        #[command(flatten)]
        key: KeyArgs,
    },
    List,
    /// Healthy only when every node answers and still holds its slice.
    Health {
        name: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        key: KeyArgs,
    },
    Rm {
        name: String,
    },
    /// Move a node's layers, and the KV state of every live session on it, to
    /// another node while generation goes on (asks the serving head).
    Drain {
        /// The node to empty: registered name or address.
        node: String,
        /// Where its layers go (default: the best idle registered node).
        #[arg(long)]
        to: Option<String>,
        /// The `sollol serve` head whose sessions use the node.
        #[arg(long, default_value = "127.0.0.1:11434", env = "SOLLOL_HEAD")]
        head: String,
    },
}

#[derive(Args)]
pub struct PlanArgs {
    #[arg(long)]
    model: String,
    /// Registered nodes (names or addresses), asked for their free memory.
    #[arg(long, value_delimiter = ',', conflicts_with = "node")]
    nodes: Vec<String>,
    /// A hypothetical node: NAME=MEMORY (e.g. a=48GB); repeat for each.
    #[arg(long)]
    node: Vec<String>,
    #[arg(long, default_value = "even")]
    strategy: Strategy,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    key: KeyArgs,
    /// Also predict the plan's decode (sollol::cluster::netmodel) from this
    /// machine's in-process speed: over links of --rate and --rtt-ms, or,
    /// over registered --nodes without them, over each link of the chain's
    /// ring as timed now (node → next node, last node → first).
    #[arg(long)]
    explain: bool,
    #[command(flatten)]
    network: NetworkArgs,
}

/// The links and the load `plan --explain` predicts for.
#[derive(Args)]
pub struct NetworkArgs {
    /// Each link's rate (`tc` units: 100mbit, 1gbit); uncapped if absent.
    #[arg(long)]
    rate: Option<String>,
    /// Each link's round trip (ms; 0 if absent).
    #[arg(long)]
    rtt_ms: Option<f64>,
    /// The software's own cost of a hop (ms; measured on loopback: `sollol bench --stages 0,2`).
    #[arg(long, default_value_t = 0.2)]
    hop_overhead_ms: f64,
    /// Sessions at once for the throughput prediction.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Micro-batches the sessions are spread over (default: the count the
    /// model predicts fastest, as a serving head picks it).
    #[arg(long)]
    micro_batches: Option<usize>,
    /// The nodes share one machine's cores (the network lab's hosts without
    /// a CPU cap): their stages take turns instead of computing at once.
    #[arg(long)]
    shared_cores: bool,
    /// Activation dtype on the wire (bytes per value: f16/bf16 2, f32 4).
    #[arg(long, default_value = "f16")]
    wire: sollol::net::tensor::WireDType,
    /// In-process decode tok/s of one session and of --clients batched
    /// (measured now when absent).
    #[arg(long)]
    decode_tok_s: Option<f64>,
    #[arg(long)]
    batched_tok_s: Option<f64>,
}

#[derive(Args)]
pub struct RouteArgs {
    #[arg(long, default_value = "smollm2")]
    model: String,
    #[command(flatten)]
    key: KeyArgs,
}

pub fn run(cmd: ClusterCommand) -> Result<()> {
    let rt = runtime()?;
    let _guard = rt.enter();
    match cmd {
        ClusterCommand::Create { name, model, nodes, strategy, key } => {
            let m = manager(&key)?;
            let names: Vec<String> = nodes
                .iter()
                .map(|n| {
                    m.registry().node(n).map(|e| e.name.clone()).with_context(|| format!("node '{n}' is not registered (sollol nodes add)"))
                })
                .collect::<Result<_>>()?;
            let entry = rt.block_on(m.create_cluster(&name, &names, &model, strategy))?;
            print!("{}", describe(&entry));
        }
        ClusterCommand::List => {
            let reg = Registry::load_default()?;
            if reg.clusters.is_empty() {
                println!("no clusters (sollol cluster create NAME --model M --nodes a,b)");
            }
            for c in &reg.clusters {
                let stages: Vec<String> = c.stages.iter().map(|s| format!("{} {}-{}", s.node, s.start, s.end - 1)).collect();
                println!("{}  {}  {}  [{}]", c.name, c.model, c.strategy, stages.join(", "));
            }
        }
        ClusterCommand::Health { name, json, key } => {
            let m = manager(&key)?;
            let h = rt.block_on(m.cluster_health(&name))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&h)?);
            } else {
                if h.healthy {
                    println!("cluster '{name}' is healthy");
                } else {
                    println!("cluster '{name}' is unhealthy - nodes down: {}", h.down.join(", "));
                }
                print_nodes(&h.nodes);
            }
        }
        ClusterCommand::Drain { node, to, head } => {
            let head = head.trim_start_matches("http://").trim_end_matches('/').to_string();
            let v: serde_json::Value =
                match ureq::post(&format!("http://{head}/api/sollol/drain")).send_json(serde_json::json!({ "node": node, "to": to })) {
                    Ok(reply) => reply.into_json().context("the head's answer to a drain")?,
                    Err(ureq::Error::Status(status, reply)) => {
                        let v: serde_json::Value = reply.into_json().unwrap_or_default();
                        let msg = v["error"].as_str().map(str::to_string).unwrap_or_else(|| format!("the head answered {status}"));
                        anyhow::bail!("drain {node}: {msg}");
                    }
                    Err(e) => return Err(e).with_context(|| format!("cannot reach the head at {head} (--head)")),
                };
            for m in v["moved"].as_array().into_iter().flatten() {
                println!(
                    "{} stage {}: {} -> {} ({}), {} live sessions moved with {} of KV state, steps paused {:.1} ms",
                    m["model"].as_str().unwrap_or_default(),
                    m["stage"],
                    m["from"].as_str().unwrap_or_default(),
                    m["to"].as_str().unwrap_or_default(),
                    m["to_addr"].as_str().unwrap_or_default(),
                    m["sessions_moved"],
                    human_bytes(m["kv_bytes"].as_u64().unwrap_or(0)),
                    m["paused_ms"].as_f64().unwrap_or(0.0)
                );
            }
        }
        ClusterCommand::Rm { name } => {
            let mut reg = Registry::load_default()?;
            reg.remove_cluster(&name)?;
            reg.save()?;
            println!("removed cluster {name}");
        }
    }
    Ok(())
}

/// A dry run: the plan only, nothing is loaded.
pub fn plan(args: PlanArgs) -> Result<()> {
    // The chain's links as timed now, when the prediction is to use them.
    let mut timed = Vec::new();
    let (info, plan) = if args.nodes.is_empty() {
        let specs: Vec<NodeSpec> = args
            .node
            .iter()
            .map(|n| {
                let (name, mem) = n.split_once('=').with_context(|| format!("--node takes NAME=MEMORY, got '{n}'"))?;
                let memory = sollol::sys::parse_size(mem).map_err(anyhow::Error::msg)?;
                Ok(NodeSpec { name: name.to_string(), memory, ..Default::default() })
            })
            .collect::<Result<_>>()?;
        anyhow::ensure!(!specs.is_empty(), "give --nodes a,b (registered) or --node a=48GB --node b=24GB (hypothetical)");
        let info = model_info(&args.model)?;
        let plan = partition::plan(args.strategy, &info.layer_bytes, &specs)?;
        (info, plan)
    } else {
        let rt = runtime()?;
        let _guard = rt.enter();
        let m = manager(&args.key)?;
        let names: Vec<String> = args
            .nodes
            .iter()
            .map(|n| m.registry().node(n).map(|e| e.name.clone()).with_context(|| format!("node '{n}' is not registered")))
            .collect::<Result<_>>()?;
        let (info, plan) = rt.block_on(m.plan(&args.model, &names, args.strategy))?;
        if args.explain && args.network.rate.is_none() && args.network.rtt_ms.is_none() {
            eprintln!("timing the chain's links…");
            let chain: Vec<String> = plan.iter().map(|a| a.node.clone()).collect();
            timed = rt.block_on(m.time_chain(&chain, true))?;
        }
        (info, plan)
    };
    let explained = if args.explain { Some(explain(&args.model, &plan, &args.network, &timed)?) } else { None };
    if args.json {
        println!(
            "{}",
            serde_json::json!({"model": info.name, "from": info.from, "strategy": args.strategy.to_string(), "stages": plan, "explain": explained})
        );
        return Ok(());
    }
    println!(
        "Plan for {} ({} layers, {} of weights, from the {}) with strategy {}:",
        info.name,
        info.n_layers(),
        human_bytes(info.total_bytes()),
        info.from,
        args.strategy
    );
    for (i, s) in plan.iter().enumerate() {
        println!(
            "   Node {}: layers {}-{} ({} layers, {}) on {}",
            i + 1,
            s.start,
            s.end - 1,
            s.end - s.start,
            human_bytes(s.bytes),
            s.node
        );
    }
    let used: HashMap<&str, ()> = plan.iter().map(|s| (s.node.as_str(), ())).collect();
    let unused: Vec<&String> =
        args.nodes.iter().chain(args.node.iter()).filter(|n| !used.contains_key(n.split('=').next().unwrap_or(n))).collect();
    if !unused.is_empty() {
        println!("   (not used: {})", unused.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "));
    }
    if let Some(e) = explained {
        print_explained(&e, &plan);
    }
    Ok(())
}

/// `plan --explain`: the network model's prediction for `plan`, over the
/// links `timed` (one per hop) or, when none were, links as `net` says.
fn explain(model: &str, plan: &[partition::Assignment], net: &NetworkArgs, timed: &[LinkTiming]) -> Result<Explained> {
    let mut file = sollol::model::ModelFile::open(&sollol::model::source::resolve(model)?.path)?;
    let config = file.config()?;
    let layers = file.layer_bytes()?;
    let stage_bytes: Vec<u64> = plan.iter().map(|a| netmodel::step_bytes(&layers, &(a.start..a.end))).collect();
    let bytes = netmodel::step_bytes(&layers, &(0..config.n_layers));
    let (one, batched) = match (net.decode_tok_s, net.batched_tok_s) {
        (Some(a), Some(b)) => (a, b),
        _ => {
            eprintln!("measuring this machine's in-process decode (1 and {} sessions)…", net.clients);
            let slice = sollol::model::ModelSlice::load(&mut file, 0..config.n_layers, &candle_core::Device::Cpu)?;
            let prompt: Vec<u32> = (0..32).map(|i| (i * 7 + 11) % config.vocab_size as u32).collect();
            let best = |n: usize| -> Result<f64> {
                let mut best = 0f64;
                for _ in 0..3 {
                    best = best.max(super::bench::batched_decode(&slice, &prompt, 32, n)?);
                }
                Ok(best)
            };
            (best(1)?, best(net.clients)?)
        }
    };
    let hop_overhead_secs = net.hop_overhead_ms / 1e3;
    let links: Vec<Link> = if timed.is_empty() {
        let bits_per_sec = match &net.rate {
            Some(r) => sollol::lab::rate_bits_per_sec(r).context("--rate like 100mbit")?,
            None => f64::INFINITY,
        };
        vec![Link { bits_per_sec, rtt_secs: net.rtt_ms.unwrap_or(0.0) / 1e3, hop_overhead_secs }]
    } else {
        timed
            .iter()
            .map(|t| Link { bits_per_sec: t.bits_per_sec.unwrap_or(f64::INFINITY), rtt_secs: t.rtt.as_secs_f64(), hop_overhead_secs })
            .collect()
    };
    let wire_bytes = if net.wire == sollol::net::tensor::WireDType::F32 { 4 } else { 2 };
    let compute = Compute::measured(bytes, one, net.clients, batched);
    let hop_bytes = netmodel::hop_bytes(config.hidden_size, wire_bytes);
    let cores: Vec<usize> = if net.shared_cores { vec![0; plan.len()] } else { Vec::new() };
    let predict = |g: usize| netmodel::predict(&stage_bytes, &compute, &links, hop_bytes, net.clients, g, &cores);
    let g = net.micro_batches.unwrap_or_else(|| netmodel::best_micro_batches(net.clients, 1, |g| 1.0 / predict(g).batched_tok_s));
    let p = predict(g);
    let lockstep_tok_s = (p.micro_batches > 1).then(|| predict(1).batched_tok_s);
    Ok(Explained { decode_tok_s: one, batched_tok_s: batched, links, timed: !timed.is_empty(), prediction: p, lockstep_tok_s })
}

/// What `plan --explain` predicts, and from what.
#[derive(Serialize)]
struct Explained {
    /// In process here: one session, and `--clients` batched.
    decode_tok_s: f64,
    batched_tok_s: f64,
    /// One per hop of the ring (stage 1 → stage 2, …, stage S → stage 1), or one for all.
    links: Vec<Link>,
    /// Whether the links were timed now, or are what the flags say.
    timed: bool,
    prediction: Prediction,
    /// The clients' tok/s in one micro-batch, where the prediction is for more.
    lockstep_tok_s: Option<f64>,
}

fn print_explained(e: &Explained, plan: &[partition::Assignment]) {
    let p = &e.prediction;
    println!(
        "Predicted decode (in process here: {:.1} tok/s one session, {:.1} tok/s {} batched):",
        e.decode_tok_s, e.batched_tok_s, p.clients
    );
    for (i, (a, b)) in p.stage_secs.iter().zip(&p.stage_secs_batched).enumerate() {
        println!("   stage {}: {:.2} ms per token, {:.2} ms per {}-row step", i + 1, a * 1e3, b * 1e3, p.rows);
    }
    // Round the ring: each stage to the next, the last back to the first.
    let ends: Vec<&str> = plan.iter().chain(plan.first()).map(|a| a.node.as_str()).collect();
    for (i, secs) in p.hop_secs.iter().enumerate() {
        let link = e.links.get(i).unwrap_or(&e.links[0]);
        let rate = if link.bits_per_sec.is_finite() { format!("{:.1} Mbit/s", link.bits_per_sec / 1e6) } else { "uncapped".into() };
        let timed = if e.timed { ", timed now" } else { "" };
        println!("   hop {} → {}: {:.3} ms per row ({rate}, {:.2} ms RTT{timed})", ends[i], ends[i + 1], secs * 1e3, link.rtt_secs * 1e3);
    }
    println!("   a hop between stages carries {} B per row", p.hop_bytes);
    println!("   one session: {:.2} ms per token, {:.1} tok/s", p.token_secs * 1e3, p.decode_tok_s);
    println!("   {} sessions in {} micro-batches: {:.1} tok/s together", p.clients, p.micro_batches, p.batched_tok_s);
    if let Some(tok_s) = e.lockstep_tok_s {
        // Overlapping stages on shared cores also contend, which only a running chain measures.
        println!("   {} sessions in 1 micro-batch: {tok_s:.1} tok/s together", p.clients);
    }
}

/// `get_worker_for_model`: prints where a model would run (loading it there if needed).
pub fn route(args: RouteArgs) -> Result<()> {
    let rt = runtime()?;
    let _guard = rt.enter();
    let m = manager(&args.key)?;
    let entry = rt.block_on(m.route(&args.model))?;
    println!("{}", serde_json::to_string_pretty(&m.route_info(&entry))?);
    Ok(())
}
