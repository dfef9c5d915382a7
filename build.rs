//! Embeds the model catalog (`models/*.toml`) into the binary, so a fresh
//! install knows the built-in models without any file beside it.

use std::fmt::Write;
use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("models");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(&dir).map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == "toml"));
    files.sort();
    let mut out = String::from("pub const BUILTIN: &[(&str, &str)] = &[\n");
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
        let name = f.file_name().unwrap().to_string_lossy();
        writeln!(out, "    ({name:?}, include_str!({:?})),", f.display().to_string()).unwrap();
    }
    out.push_str("];\n");
    let dest = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("catalog.rs");
    std::fs::write(dest, out).unwrap();
    device_kernels();
}

/// The device kernels (`kernels/cuda`): for the host emulator the unit tests
/// run them on (every unix build; nothing links it but the tests), and as PTX
/// for the `cuda` feature, built with the nvcc that scripts/build-cuda.sh
/// installs (`CUDA_COMPUTE_CAP`, default 90).
fn device_kernels() {
    println!("cargo:rerun-if-changed=kernels");
    if std::env::var("CARGO_CFG_UNIX").is_ok() {
        cc::Build::new()
            .cpp(true)
            .std("c++17")
            .file("kernels/emu/emu.cpp")
            .flag_if_supported("-Wno-unknown-pragmas")
            .opt_level(2)
            .compile("sollol_device_emu");
    }
    if std::env::var("CARGO_FEATURE_CUDA").is_ok() {
        println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
        let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
        let ptx = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("decode.ptx");
        let status = std::process::Command::new("nvcc")
            .args(["--ptx", "-O3", &format!("-arch=sm_{cap}"), "-o"])
            .arg(&ptx)
            .arg("kernels/cuda/decode.cu")
            .status()
            .expect("the cuda feature needs nvcc on PATH (scripts/build-cuda.sh sets it up)");
        assert!(status.success(), "nvcc failed on kernels/cuda/decode.cu");
    }
}
