//! Cluster management from the design doc: the node registry, discovery,
//! partitioning strategies, health, routing, and local nodes.

pub mod discovery;
pub mod failover;
pub mod health;
pub mod local;
pub mod manager;
pub mod models;
pub mod netmodel;
pub mod partition;
pub mod registry;
