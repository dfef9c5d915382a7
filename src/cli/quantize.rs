//! `sollol quantize`: a GGUF model re-quantized to another weight type (for
//! comparing kernels on the same model, or shrinking a model).

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::quantized::GgmlDType;
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

fn parse_type(s: &str) -> Result<GgmlDType> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "q4_0" => GgmlDType::Q4_0,
        "q4_1" => GgmlDType::Q4_1,
        "q5_0" => GgmlDType::Q5_0,
        "q5_1" => GgmlDType::Q5_1,
        "q8_0" => GgmlDType::Q8_0,
        "q2_k" => GgmlDType::Q2K,
        "q3_k" => GgmlDType::Q3K,
        "q4_k" => GgmlDType::Q4K,
        "q5_k" => GgmlDType::Q5K,
        "q6_k" => GgmlDType::Q6K,
        "f16" => GgmlDType::F16,
        "f32" => GgmlDType::F32,
        other => bail!("unknown weight type '{other}' (q4_0, q4_1, q5_0, q5_1, q8_0, q2_k..q6_k, f16, f32)"),
    })
}

pub fn run(args: QuantizeArgs) -> Result<()> {
    let dtype = parse_type(&args.to)?;
    let opened = open_model(&args.model.model)?;
    if !matches!(opened.file, sollol::model::ModelFile::Gguf(_)) {
        bail!("quantize reads GGUF files; {} is a safetensors directory", opened.resolved.path.display());
    }
    let (converted, kept) = sollol::model::gguf::requantize(&opened.resolved.path, &args.output, dtype)?;
    eprintln!("{}: {converted} tensors as {dtype:?}, {kept} kept as they were", args.output.display());
    Ok(())
}
