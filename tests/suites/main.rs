//! The integration suites, one module each, in one test binary: Wasmtime, kube and the agent are
//! linked once instead of once per suite. A suite is selected by its module path
//! (`cargo test -p lichen-tests --test suites -- mqtt::`); every test's name starts with its
//! suite's. Shared helpers live in the `lichen_tests` library (`tests/src/`), not here.
//!
//! The suites share one process, so none may change process-wide state (environment variables,
//! the working directory, signal dispositions, the umask): each gives its children what they need
//! through `Command`. The real-cluster tier (`e2e.rs`) is a binary of its own.

mod agent;
mod agent_image;
mod cross;
mod fake_cluster;
mod hostile;
mod link;
mod main_loop;
mod mqtt;
mod operate;
mod packaging;
mod registry;
mod runtime;
mod systemd;
mod upgrade;
mod workers;
