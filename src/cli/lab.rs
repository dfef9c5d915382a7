//! `sollol lab`: hosts in network namespaces on one machine, with capped,
//! delayed links, each running a node; and the relay that delays a link.

use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use sollol::lab::{Lab, LinkSpec};

#[derive(Args, Clone)]
pub struct LinkArgs {
    /// Each host link's bandwidth, each direction (`tc` rates: 100mbit, 1gbit); uncapped if absent.
    #[arg(long)]
    rate: Option<String>,
    /// The round trip (ms) each path into a host adds.
    #[arg(long, default_value_t = 0.0)]
    rtt_ms: f64,
    /// Each direction's delay varies by up to this (ms).
    #[arg(long, default_value_t = 0.0)]
    jitter_ms: f64,
    /// Each datagram is lost with this probability, each direction.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
}

impl LinkArgs {
    fn spec(&self) -> Result<LinkSpec> {
        anyhow::ensure!((0.0..1.0).contains(&self.loss), "--loss is a probability below 1");
        anyhow::ensure!(self.rtt_ms >= 0.0 && self.jitter_ms >= 0.0 && self.rtt_ms < 10_000.0, "--rtt-ms and --jitter-ms: 0 to 10 s");
        Ok(LinkSpec {
            rate: self.rate.clone(),
            rtt: Duration::from_secs_f64(self.rtt_ms / 1e3),
            jitter: Duration::from_secs_f64(self.jitter_ms / 1e3),
            loss: self.loss,
        })
    }
}

#[derive(Subcommand)]
pub enum LabCommand {
    /// Builds the lab, starts a node on every host, prints how to reach
    /// them, and tears it all down on Ctrl-C or after --ttl-secs.
    Up {
        #[arg(long, default_value_t = 4)]
        hosts: usize,
        #[command(flatten)]
        link: LinkArgs,
        /// Cores each host's processes may use (cgroup quota), e.g. 0.6.
        #[arg(long)]
        cpu: Option<f64>,
        /// Host 1 runs no node: it is the head's (run a head there with `ip netns exec`).
        #[arg(long)]
        head: bool,
        /// The nodes' cluster key (default: a fresh one, printed).
        #[arg(long, env = "SOLLOL_CLUSTER_KEY", hide_env_values = true)]
        cluster_key: Option<String>,
        /// More arguments for every host's `sollol node`.
        #[arg(long, allow_hyphen_values = true, num_args = 0..)]
        node_args: Vec<String>,
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
    },
    /// Removes what labs whose process died left behind (namespaces, cgroups).
    Clean,
    /// The relay in front of a host's node (started by the lab).
    #[command(hide = true)]
    Relay {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        to: std::net::SocketAddr,
        #[arg(long, default_value_t = 0)]
        rtt_us: u64,
        #[arg(long, default_value_t = 0)]
        jitter_us: u64,
        #[arg(long, default_value_t = 0.0)]
        loss: f64,
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
    },
}

pub fn run(cmd: LabCommand) -> Result<()> {
    match cmd {
        LabCommand::Up { hosts, link, cpu, head, cluster_key, node_args, ttl_secs } => {
            if let Some(why) = sollol::lab::unavailable() {
                anyhow::bail!("no lab here: {why}");
            }
            // Stop signals are heard from here on: one during the setup
            // tears the lab down once it is up, instead of killing this
            // process and leaving its namespaces behind.
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let stop = {
                let _in_rt = rt.enter();
                sollol::sys::stop_signal()?
            };
            let exe = std::env::current_exe().context("the sollol binary")?;
            let lab = Lab::up(hosts, link.spec()?, cpu, &exe)?;
            let key = cluster_key.unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()));
            println!("cluster key: {key}");
            let mut args: Vec<&str> = vec!["--cluster-key", &key];
            args.extend(node_args.iter().map(String::as_str));
            for (i, h) in lab.hosts.iter().enumerate() {
                if head && i == 0 {
                    println!("host 1 ({}): the head's; run there with: ip netns exec {} CMD", h.addr, h.netns);
                    continue;
                }
                let (_, addr) = lab.node(i, &args)?;
                lab.wait_node(i, Duration::from_secs(10))?;
                println!("host {} ({}): node at {addr}; run there with: ip netns exec {} CMD", i + 1, h.addr, h.netns);
            }
            println!("lab {} up for {ttl_secs} s; Ctrl-C tears it down", lab.id());
            rt.block_on(async {
                tokio::select! {
                    _ = stop => {}
                    _ = tokio::time::sleep(Duration::from_secs(ttl_secs)) => {}
                }
            });
            drop(lab);
            Ok(())
        }
        LabCommand::Clean => {
            let removed = sollol::lab::clean();
            println!("removed {removed} namespaces and cgroups of labs no longer running");
            Ok(())
        }
        LabCommand::Relay { listen, to, rtt_us, jitter_us, loss, ttl_secs } => {
            let link = LinkSpec { rate: None, rtt: Duration::from_micros(rtt_us), jitter: Duration::from_micros(jitter_us), loss };
            sollol::lab::relay(listen, to, link, Duration::from_secs(ttl_secs))?;
            Ok(())
        }
    }
}
