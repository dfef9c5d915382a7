//! sollol: a native LLM inference engine with built-in layer sharding.
//!
//! The module tree follows the data path: [`model`] (weights, layer slices,
//! KV caches) → [`head`] (tokenizer, sampling, generation). See
//! `ARCHITECTURE.md` for the map and the invariants.

pub mod error;
pub mod head;
pub mod model;
pub mod paths;
pub mod sys;

pub use error::{Error, Result};
