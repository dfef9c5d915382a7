//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The default model (SmolLM2-135M-Instruct Q4_1), fetched into the cache on
/// first use; `.ci/run` fetches it before the tests start.
pub fn smollm2() -> PathBuf {
    sollol::model::source::resolve("smollm2").expect("fetch the default model (sollol pull)").path
}

pub fn sollol_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sollol"))
}

pub mod tiny;
