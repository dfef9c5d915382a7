//! `sollol node`: the process every machine runs. It starts empty, proves
//! and checks the cluster key, reports its capabilities, loads the layer slice
//! a head asks for, and runs it for any number of sessions.

mod batch;
pub mod server;
pub mod stage;

pub use server::{run, NodeConfig};
