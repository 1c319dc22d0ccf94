//! Lichen: an edge node agent that runs Kubernetes pods as WASI modules in Wasmtime.
//!
//! Module map, in the order data flows:
//! - [`config`]: the one configuration struct (file, environment, flags).
//! - [`static_pods`]: reads Pod manifests from a directory and reports the desired set.
//! - [`pod`]: turns pods into plans ([`pod::spec`]), decides phases ([`pod::state`]), runs each pod
//!   ([`pod::worker`]) and keeps the running set equal to the desired set ([`pod::manager`]).
//! - [`modules`]: image references, registry pulls, the module cache with precompiled artifacts.
//! - [`store`]: the durable record of pods and modules (sled).
//! - [`runtime`]: Wasmtime: one engine, a store per container run, WASI preview 1, logs.
//! - [`app`]: wires the parts together and shuts them down in order.
//! - [`cli`], [`check`]: the command line and `lichen check`.
//! - [`control`]: the agent's local control socket (`lichen status`, `lichen modules` while it runs).
//! - [`report`]: what `lichen status` shows.
//! - [`quantity`]: Kubernetes resource quantities.
//! - [`topic`], [`broker`]: the MQTT topic grammar and broker URLs (leaves config and telemetry share).
//! - [`bootstrap`]: bootstrap-token join and node certificate rotation.
//! - [`telemetry`]: MQTT: module stdio on topics, node telemetry, the durable spool.

pub mod app;
pub mod bootstrap;
pub mod broker;
pub mod check;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod control;
pub mod kubelet;
pub mod logging;
pub mod metrics;
pub mod modules;
pub mod node;
pub mod notify;
pub mod pod;
pub mod quantity;
pub mod report;
pub mod retry;
pub mod runtime;
pub mod static_pods;
pub mod store;
pub mod telemetry;
pub mod topic;
