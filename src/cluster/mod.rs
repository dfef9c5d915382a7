//! Cluster management: partitioning layers over nodes, starting local nodes.

pub mod local;
pub mod partition;
