//! Command-line interface: argument definitions and one module per command.

mod bench;
mod chat;
mod cluster;
mod generate;
mod lab;
mod node;
mod nodes;
mod perplexity;
mod quantize;
mod serve;

use std::ops::Range;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use sollol::head::tokenizer::Tokenizer;
use sollol::model::sampling::SamplingParams;
use sollol::model::source::{self, ResolvedModel};
use sollol::model::{ModelFile, ModelSlice};

#[derive(Parser)]
#[command(name = "sollol", version, about = "LLM inference with built-in layer sharding")]
pub struct Cli {
    /// CPU threads for tensor work (default: all cores).
    #[arg(long, global = true, default_value_t = 0)]
    threads: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt; only the generated text goes to stdout.
    Generate(generate::GenerateArgs),
    /// Interactive chat using the model's chat template.
    Chat(chat::ChatArgs),
    /// Fetch a model into the local cache and print its path.
    Pull {
        /// Model: .gguf path, HF directory, Ollama tag, hub repo id, or catalog name.
        #[arg(default_value = "smollm2")]
        model: String,
    },
    /// Measure load memory, prefill and decode speed.
    Bench(bench::BenchArgs),
    /// Serve layer slices to heads over QUIC (run one on every machine).
    Node(node::NodeArgs),
    /// The node registry.
    #[command(subcommand)]
    Nodes(nodes::NodesCommand),
    /// Find nodes by probing an address range or listening for announcements.
    Discover(nodes::DiscoverArgs),
    /// Clusters: create (plan + load), list, health, rm.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// A network lab: hosts in network namespaces with capped, delayed links, a node on each.
    #[command(subcommand)]
    Lab(lab::LabCommand),
    /// Print the partition plan of a model over nodes (a dry run).
    Plan(cluster::PlanArgs),
    /// Where a model would run: a single node or a cluster (get_worker_for_model).
    Route(cluster::RouteArgs),
    /// The head's HTTP server: Ollama's and OpenAI's APIs, /metrics, /dashboard.
    Serve(serve::ServeArgs),
    /// Write a GGUF model with its weights in another quantized type.
    Quantize(quantize::QuantizeArgs),
    /// Perplexity over a text, and the KL divergence from the exact f32 math.
    Perplexity(perplexity::PerplexityArgs),
}

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Model: .gguf path, HF directory, Ollama tag, hub repo id, or catalog name.
    #[arg(short, long, default_value = "smollm2", env = "SOLLOL_MODEL")]
    model: String,
    /// Where in-process slices run: cpu, cuda[:N] (built with --features
    /// cuda), metal. Local nodes started by this command inherit it.
    #[arg(long, default_value = "cpu", env = "SOLLOL_DEVICE")]
    device: String,
}

impl ModelArgs {
    /// Opens the model and the device (checked now, before any work).
    pub fn open(&self) -> Result<Opened> {
        let device = sollol::model::device::parse(&self.device)?;
        // Node processes this command starts read it from the environment.
        std::env::set_var("SOLLOL_DEVICE", &self.device);
        let mut opened = open_model(&self.model)?;
        opened.device = device;
        Ok(opened)
    }
}

#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// 0 is greedy.
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Seed of the random draws (default: random).
    #[arg(long)]
    seed: Option<u64>,
    /// Maximum tokens to generate.
    #[arg(short = 'n', long = "max-tokens", default_value_t = 128)]
    max_tokens: usize,
    /// Stop when the text contains this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Context length to reserve (default: prompt + max tokens, within the model's).
    #[arg(long, default_value_t = 0)]
    ctx: usize,
}

impl SamplingArgs {
    fn params(&self, default_temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature.unwrap_or(default_temperature),
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: 64,
            seed: self
                .seed
                .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)),
        }
    }
}

pub fn run(cli: Cli) -> Result<()> {
    sollol::sys::set_threads(cli.threads);
    match cli.command {
        Command::Generate(args) => generate::run(args, cli.threads),
        Command::Chat(args) => chat::run(args, cli.threads),
        Command::Node(args) => node::run(args, cli.threads),
        Command::Nodes(cmd) => nodes::run(cmd),
        Command::Discover(args) => nodes::discover(args),
        Command::Cluster(cmd) => cluster::run(cmd),
        Command::Lab(cmd) => lab::run(cmd),
        Command::Plan(args) => cluster::plan(args),
        Command::Route(args) => cluster::route(args),
        Command::Serve(args) => serve::run(args, cli.threads),
        Command::Pull { model } => {
            let resolved = source::resolve(&model)?;
            println!("{}", resolved.path.display());
            Ok(())
        }
        Command::Bench(args) => bench::run(args, cli.threads),
        Command::Quantize(args) => quantize::run(args),
        Command::Perplexity(args) => perplexity::run(args),
    }
}

/// A model opened, before any layer is loaded.
pub struct Opened {
    pub device: candle_core::Device,
    pub resolved: ResolvedModel,
    pub file: ModelFile,
}

impl Opened {
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        Ok(Tokenizer::for_model(&self.file)?)
    }
}

pub fn open_model(spec: &str) -> Result<Opened> {
    let resolved = source::resolve(spec)?;
    let file = ModelFile::open(&resolved.path)?;
    Ok(Opened { device: candle_core::Device::Cpu, resolved, file })
}

pub fn load_slice(file: &mut ModelFile, layers: Option<Range<usize>>, device: &candle_core::Device) -> Result<ModelSlice> {
    let n = file.config()?.n_layers;
    let layers = layers.unwrap_or(0..n);
    Ok(ModelSlice::load(file, layers, device)?)
}

/// `a..b` or `a-b` (inclusive end, the design doc's notation).
pub fn parse_layers(s: &str) -> Result<Range<usize>> {
    let parse = |v: &str| v.trim().parse::<usize>().with_context(|| format!("bad layer number '{v}'"));
    if let Some((a, b)) = s.split_once("..") {
        Ok(parse(a)?..parse(b)?)
    } else if let Some((a, b)) = s.split_once('-') {
        Ok(parse(a)?..parse(b)? + 1)
    } else {
        anyhow::bail!("layers must be written a..b (end excluded) or a-b (end included), got '{s}'")
    }
}
