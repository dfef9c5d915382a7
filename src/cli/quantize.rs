//! `sollol quantize`: a GGUF model re-quantized to another weight type (for
//! comparing kernels on the same model, or shrinking a model).

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use super::{open_model, ModelArgs};

#[derive(Args)]
pub struct QuantizeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Target: q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k,
    /// f16, f32, or the mixtures q4_k_m, q5_k_m. The LM head goes to Q6_K and
    /// (`_m`) some value and FFN down projections one step up, as
    /// llama-quantize does.
    #[arg(long)]
    to: String,
    /// Every matrix in the target type, the LM head included.
    #[arg(long)]
    pure: bool,
    /// Where to write the new GGUF file.
    output: PathBuf,
}

pub fn run(args: QuantizeArgs) -> Result<()> {
    let target = sollol::model::gguf::QuantTarget::parse(&args.to, args.pure).ok_or_else(|| {
        anyhow::anyhow!("unknown weight type '{}' ({}, or q4_k_m, q5_k_m)", args.to, sollol::model::gguf::WEIGHT_TYPE_NAMES)
    })?;
    let opened = open_model(&args.model.model)?;
    if !matches!(opened.file, sollol::model::ModelFile::Gguf(_)) {
        bail!("quantize reads GGUF files; {} is a safetensors directory", opened.resolved.path.display());
    }
    let (converted, kept) = sollol::model::gguf::requantize(&opened.resolved.path, &args.output, target)?;
    eprintln!("{}: {converted} tensors converted for {}, {kept} kept as they were", args.output.display(), args.to);
    Ok(())
}
