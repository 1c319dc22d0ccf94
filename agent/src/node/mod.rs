//! The Node: what this board tells the cluster about itself (labels, taints, capacity, addresses,
//! conditions), its registration, and its heartbeats through a Lease, as the kubelet does.
//!
//! [`crate::host`] reads the board; [`object`] turns facts and config into the `v1.Node` (pure); the
//! [`NodeRegistrar`] talks to the API server. Nothing here touches pods.

pub mod object;
mod registrar;

pub use registrar::{NodeError, NodeRegistrar};
