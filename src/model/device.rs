//! Which device a slice runs on: `cpu`, `cuda[:N]` (cargo feature `cuda`) or
//! `metal` (feature `metal`, macOS; untested), and what memory it offers.

use candle_core::Device;

use crate::error::{Error, Result};

/// Parses `cpu`, `cuda`, `cuda:N` or `metal`; a device this build lacks is a
/// clear error naming the feature to build with.
pub fn parse(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    let (kind, ordinal) = match spec.split_once(':') {
        Some((k, n)) => (k.to_string(), n.parse::<usize>().map_err(|_| Error::InvalidRequest(format!("bad device ordinal in '{spec}'")))?),
        None => (spec.clone(), 0),
    };
    match kind.as_str() {
        "cpu" => Ok(Device::Cpu),
        "cuda" if cfg!(feature = "cuda") => Ok(Device::new_cuda(ordinal)?),
        "metal" if cfg!(feature = "metal") => Ok(Device::new_metal(ordinal)?),
        "cuda" | "metal" => Err(Error::InvalidRequest(format!(
            "this sollol was built without the '{kind}' feature (cargo build --release --features {kind}{})",
            if kind == "cuda" { ", see scripts/build-cuda.sh" } else { "" }
        ))),
        other => Err(Error::InvalidRequest(format!("unknown device '{other}' (cpu, cuda[:N], metal)"))),
    }
}

/// `cpu`, `cuda:0`, `metal`: what capability reports and logs show.
pub fn name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// (total, free) bytes of device memory, for GPUs; `None` on the CPU (the
/// node reports system memory instead) or when the driver cannot say.
pub fn memory(device: &Device) -> Option<(u64, u64)> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => {
            use candle_core::cuda_backend::cudarc::driver::result;
            dev.cuda_stream().context().bind_to_thread().ok()?;
            let (free, total) = result::mem_get_info().ok()?;
            Some((total as u64, free as u64))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_or_name_what_is_missing() {
        assert!(parse("cpu").unwrap().is_cpu());
        assert_eq!(name(&parse("CPU").unwrap()), "cpu");
        assert!(parse("tpu").unwrap_err().to_string().contains("unknown device"));
        assert!(parse("cuda:x").unwrap_err().to_string().contains("ordinal"));
        if !cfg!(feature = "cuda") {
            assert!(parse("cuda:0").unwrap_err().to_string().contains("--features cuda"));
        }
        assert_eq!(memory(&Device::Cpu), None);
    }
}
