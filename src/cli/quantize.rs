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
    /// Target type: q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k, f16, f32.
    #[arg(long)]
    to: String,
    /// Where to write the new GGUF file.
    output: PathBuf,
}

pub fn run(args: QuantizeArgs) -> Result<()> {
    let dtype = sollol::model::gguf::weight_type_by_name(&args.to)
        .ok_or_else(|| anyhow::anyhow!("unknown weight type '{}' ({})", args.to, sollol::model::gguf::WEIGHT_TYPE_NAMES))?;
    let opened = open_model(&args.model.model)?;
    if !matches!(opened.file, sollol::model::ModelFile::Gguf(_)) {
        bail!("quantize reads GGUF files; {} is a safetensors directory", opened.resolved.path.display());
    }
    let (converted, kept) = sollol::model::gguf::requantize(&opened.resolved.path, &args.output, dtype)?;
    eprintln!("{}: {converted} tensors as {dtype:?}, {kept} kept as they were", args.output.display());
    Ok(())
}
