//! `sollol nodes add|list|rm` and `sollol discover`: the node registry.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Subcommand};
use sollol::cluster::discovery;
use sollol::cluster::health::{HealthPolicy, NodeHealth};
use sollol::cluster::manager::ClusterManager;
use sollol::cluster::registry::Registry;
use sollol::net::auth::ClusterKey;
use sollol::sys::{human_bytes, human_rate};

#[derive(Args, Clone)]
pub struct KeyArgs {
    /// Shared secret of the cluster.
    #[arg(long, env = "SOLLOL_CLUSTER_KEY", hide_env_values = true)]
    pub cluster_key: Option<String>,
}

#[derive(Subcommand)]
pub enum NodesCommand {
    /// Register a node by address.
    Add {
        addr: String,
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Show every registered node with its health and capabilities.
    List {
        #[arg(long)]
        json: bool,
        /// Also time each idle node's link from here (up to 16 MiB each).
        #[arg(long)]
        probe: bool,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Forget a node (and the clusters that used it).
    Rm { name: String },
}

#[derive(Args)]
pub struct DiscoverArgs {
    /// Probe every address of this IPv4 block (e.g. 192.168.1.0/24).
    #[arg(long, conflicts_with_all = ["multicast", "dns"])]
    cidr: Option<String>,
    /// Probe every address this DNS name resolves to (a Kubernetes headless
    /// Service: `sollol-nodes.NAMESPACE.svc.cluster.local`).
    #[arg(long, conflicts_with = "multicast")]
    dns: Option<String>,
    /// Port to probe.
    #[arg(long, default_value_t = 7070)]
    port: u16,
    /// Probes in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// How long each address has to answer.
    #[arg(long, default_value_t = 500)]
    timeout_ms: u64,
    /// Listen for nodes started with `--announce` instead of probing.
    #[arg(long)]
    multicast: bool,
    #[arg(long, default_value = discovery::DEFAULT_GROUP)]
    group: SocketAddrV4,
    /// Interface address to listen on for announcements.
    #[arg(long, default_value = "0.0.0.0")]
    interface: Ipv4Addr,
    /// How long to listen for announcements.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Add what was found to the registry.
    #[arg(long)]
    add: bool,
    #[command(flatten)]
    key: KeyArgs,
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

pub fn manager(key: &KeyArgs) -> Result<Arc<ClusterManager>> {
    manager_with(key, HealthPolicy::default())
}

fn manager_with(key: &KeyArgs, policy: HealthPolicy) -> Result<Arc<ClusterManager>> {
    Ok(ClusterManager::new(Registry::load_default()?, ClusterKey::new(key.cluster_key.as_deref()), policy)?)
}

pub fn run(cmd: NodesCommand) -> Result<()> {
    let rt = runtime()?;
    let _guard = rt.enter();
    match cmd {
        NodesCommand::Add { addr, name, key } => {
            let name = name.unwrap_or_else(|| addr.clone());
            let m = manager(&key)?;
            m.update_registry(|r| r.add_node(&name, &addr))?;
            let h = rt.block_on(m.check(&name));
            println!("added node {name} at {addr}");
            print_nodes(&[h]);
        }
        NodesCommand::List { json, probe, key } => {
            let probe_every = probe.then_some(std::time::Duration::ZERO);
            let m = manager_with(&key, HealthPolicy { probe_every, ..HealthPolicy::default() })?;
            let health = rt.block_on(m.check_all());
            if json {
                println!("{}", serde_json::to_string_pretty(&health)?);
            } else if health.is_empty() {
                println!("no nodes registered (sollol nodes add ADDR --name NAME)");
            } else {
                print_nodes(&health);
            }
        }
        NodesCommand::Rm { name } => {
            let mut reg = Registry::load_default()?;
            let node = reg.remove_node(&name)?;
            reg.save()?;
            println!("removed node {} ({})", node.name, node.addr);
        }
    }
    Ok(())
}

pub fn print_nodes(health: &[NodeHealth]) {
    println!(
        "{:<14} {:<22} {:<9} {:>8} {:>10} {:<7} {:>5} {:>7} {:>10} {:>10} {:<14} {:>6}",
        "NAME", "ADDRESS", "STATUS", "RTT ms", "LINK", "DEVICE", "CORES", "THREADS", "MEMORY", "FREE", "LOADED", "SCORE"
    );
    for h in health {
        let c = h.capabilities.as_ref();
        let loaded = c.and_then(|c| c.loaded.as_ref()).map_or("-".to_string(), |l| format!("{} {}..{}", l.architecture, l.start, l.end));
        println!(
            "{:<14} {:<22} {:<9} {:>8} {:>10} {:<7} {:>5} {:>7} {:>10} {:>10} {:<14} {:>6.1}",
            h.name,
            h.addr,
            if h.healthy { "healthy" } else { "DOWN" },
            h.rtt_ms.map_or("-".into(), |r| format!("{r:.2}")),
            h.link_bits_per_sec.map_or("-".to_string(), human_rate),
            c.map_or("-", |c| c.device.as_str()),
            c.map_or(0, |c| c.cores),
            c.map_or(0, |c| c.threads),
            c.map_or("-".into(), |c| human_bytes(c.total_memory)),
            c.map_or("-".into(), |c| human_bytes(c.free_memory)),
            loaded,
            h.score,
        );
        if let (false, Some(e)) = (h.healthy, &h.last_error) {
            println!("  {e}");
        }
    }
}

pub fn discover(args: DiscoverArgs) -> Result<()> {
    let rt = runtime()?;
    let _guard = rt.enter();
    let key = ClusterKey::new(args.key.cluster_key.as_deref());
    let found: Vec<(String, String)> = if args.multicast {
        let heard = rt.block_on(discovery::listen(args.group, args.interface, Duration::from_secs(args.seconds)))?;
        heard.into_iter().map(|a| (a.addr, format!("announced (build {})", a.build))).collect()
    } else {
        let wait = Duration::from_millis(args.timeout_ms);
        let found = match (&args.cidr, &args.dns) {
            (Some(cidr), _) => rt.block_on(discovery::probe(cidr, args.port, &key, args.concurrency, wait))?,
            (None, Some(name)) => rt.block_on(discovery::probe_dns(name, args.port, &key, args.concurrency, wait))?,
            (None, None) => anyhow::bail!("give --cidr BLOCK, --dns NAME or --multicast"),
        };
        found
            .into_iter()
            .map(|f| {
                let what = match (&f.capabilities, f.key_refused) {
                    (Some(c), _) => format!("{} cores, {} free, {}", c.cores, human_bytes(c.free_memory), c.device),
                    (None, _) => "a sollol node that refused this cluster key".to_string(),
                };
                (f.addr, what)
            })
            .collect()
    };
    for (addr, what) in &found {
        println!("{addr}  {what}");
    }
    println!("{} node(s) found", found.len());
    if args.add {
        let mut reg = Registry::load_default()?;
        for (addr, _) in &found {
            if reg.node(addr).is_none() {
                reg.add_node(addr, addr)?;
                println!("added {addr}");
            }
        }
        reg.save()?;
    }
    Ok(())
}
