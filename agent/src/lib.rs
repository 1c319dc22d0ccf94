//! Lichen: an edge node agent that runs Kubernetes pods as WASI modules in Wasmtime.
//!
//! The crate is a house of four floors; a module imports only from its own floor or below, and no
//! two modules need each other (`agent/tests/layers.rs` checks both on every test run):
//!
//! - **top**: [`app`] wires the agent (store, runtime, sources, servers, one cancellation tree);
//!   [`cli`] holds the operator's commands and the control socket's client. Nothing imports them.
//! - **edges**: the servers, each `run(listener, deps, cancel)`: [`kubelet`] (the kubelet API),
//!   [`control`] (the control socket), [`metrics_server`] (`/healthz`, `/metrics`).
//! - **domain**: [`pod`] (plan, phases, workers, the manager), [`static_pods`], [`cluster`] (the API
//!   server's side of pods, the kube client), [`node`] (the Node and its Lease), [`bootstrap`]
//!   (join, certificate rotation), [`runtime`] (Wasmtime), [`modules`] (references, pulls, the
//!   cache), [`telemetry`] (MQTT), [`upgrade`] (the agent's own upgrades: fetch, verify, switch,
//!   health gate, rollback).
//! - **ground**: [`layout`] (every path under the state directory), [`store`] (sled), [`config`],
//!   [`board`] (newest pod statuses), [`host`] (facts about the board), [`metrics`] (counters),
//!   [`logfmt`] (the container log format: names, records, writer, reader), [`quantity`],
//!   [`topic`] and [`broker`] (MQTT topic grammar, broker URLs), [`token`], [`retry`], [`notify`] (sd_notify), [`logging`],
//!   [`api_error`] (API server errors as one readable line),
//!   [`heap`] (freed memory given back to the system), [`version`] (the agent's version and build id).

pub mod api_error;
pub mod app;
pub mod board;
pub mod bootstrap;
pub mod broker;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod control;
pub mod heap;
pub mod host;
pub mod kubelet;
pub mod layout;
pub mod logfmt;
pub mod logging;
pub mod metrics;
pub mod metrics_server;
pub mod modules;
pub mod names;
pub mod node;
pub mod notify;
pub mod pod;
pub mod quantity;
pub mod retry;
pub mod runtime;
pub mod static_pods;
pub mod store;
pub mod telemetry;
pub mod token;
pub mod topic;
pub mod upgrade;
pub mod version;
