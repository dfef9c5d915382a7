//! The NEON kernels (`src/kernels/neon.rs`) checked on an emulated aarch64
//! CPU, so that they are tested on every machine and not only on ARM ones.
//! The kernel file and the block layouts are built alone for aarch64
//! (`tests/neon/`: rustup's aarch64 standard library, no C toolchain),
//! linked statically by rustc's own lld, and run under unicorn by
//! `tests/neon.py` against the scalar reference and an f64 product. On an
//! aarch64 machine the unit tests in `src/kernels/tests.rs` check the same
//! kernels natively.

mod common;

use std::path::Path;
use std::process::Command;

const TARGET: &str = "aarch64-unknown-linux-gnu";

fn rustc(args: &[&str]) -> String {
    let out = Command::new("rustc").args(args).output().expect("running rustc");
    assert!(out.status.success(), "rustc {args:?} failed");
    String::from_utf8(out.stdout).expect("rustc prints UTF-8")
}

/// Runs `cmd` to success; its stdout and stderr.
fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

#[test]
fn neon_kernels_match_the_scalar_reference_on_an_emulated_cpu() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sysroot = rustc(&["--print", "sysroot"]).trim().to_string();
    let rustlib = Path::new(&sysroot).join("lib/rustlib");
    if !rustlib.join(TARGET).exists() {
        // One download through rustup, kept with the toolchain. Like the AVX2
        // tests on a CPU without AVX2, the check cannot run without it: say so.
        let added = Command::new("rustup").args(["target", "add", TARGET]).status().is_ok_and(|s| s.success());
        if !added {
            eprintln!("SKIPPED: the aarch64 standard library is not installed and `rustup target add {TARGET}` failed");
            return;
        }
    }
    let target_dir = root.join("target/neon");
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--quiet", "--release", "--target", TARGET, "--manifest-path"])
            .arg(root.join("tests/neon/Cargo.toml"))
            .arg("--target-dir")
            .arg(&target_dir)
            // Flags meant for this machine's CPU do not apply to aarch64.
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS"),
        "building tests/neon for aarch64",
    );
    let host = rustc(&["-vV"]).lines().find_map(|l| l.strip_prefix("host: ")).expect("rustc -vV names the host").to_string();
    let elf = target_dir.join("neon.elf");
    run(
        Command::new(rustlib.join(&host).join("bin/rust-lld"))
            .args(["-flavor", "gnu", "-static", "--gc-sections", "--unresolved-symbols=ignore-all"])
            // The entry points; what they cannot reach is dropped. What is
            // left unresolved (libc, called on std's panic path) points at 0,
            // so a panic would stop the emulator with an error, not pass.
            .args(["-e", "sollol_neon_gemm", "-u", "sollol_quantize_q8", "-u", "sollol_scalar_dot", "-o"])
            .arg(&elf)
            .arg(target_dir.join(TARGET).join("release/libsollol_neon_harness.a")),
        "linking the harness",
    );
    let text = run(
        Command::new("python3").arg(root.join("tests/neon.py")).arg(&elf).env("PYTHONPATH", common::python_path(&["numpy", "unicorn"])),
        "the emulated NEON kernels' check (tests/neon.py)",
    );
    println!("{text}");
    assert!(text.contains("neon kernels ok"), "tests/neon.py did not finish its checks:\n{text}");
}
