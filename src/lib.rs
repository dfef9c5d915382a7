//! sollol: a native LLM inference engine with built-in layer sharding.
//!
//! The module tree follows the data path: [`model`] (weights, layer slices,
//! KV caches) → [`node`] (the stage server) → [`net`] (wire protocol, QUIC)
//! → [`head`] (tokenizer, sampling, generation, the pipeline client) → [`cluster`]
//! (registry, partitioning, health, routing) → [`api`] (Ollama and OpenAI
//! HTTP APIs, metrics, dashboard); [`lab`] builds hosts in network namespaces
//! to run all of it across real links. See
//! `ARCHITECTURE.md` for the map and the invariants.

pub mod api;
pub mod cluster;
pub mod error;
pub mod head;
pub mod kernels;
pub mod lab;
pub mod model;
pub mod net;
pub mod node;
pub mod paths;
pub mod sys;

pub use error::{Error, Result};
