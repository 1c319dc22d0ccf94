//! The operator's commands (top floor): the command line ([`args`]), `lichen check`, `status`,
//! `pods`, `logs`, `modules`, `compile`, `push`, `sign`, `fleet upgrade` (a client of the API server
//! with the operator's kubeconfig), and the control socket's client.
//!
//! Nothing imports this layer. It reaches a running agent through the control socket
//! ([`crate::control`]) and, when none runs, reads the state directory itself, through the same
//! ground-floor types the agent uses ([`crate::layout`], [`crate::store`]).

pub mod args;
pub mod check;
pub mod client;
pub mod fleet;
pub mod logs;
pub mod modules;
pub mod publish;
pub mod status;

use std::path::PathBuf;

pub use args::{
    Cli, Command, FleetAction, FleetUpgradeArgs, JoinArgs, LogsArgs, ModulesAction, PodsFormat, RegistryLogin,
};

/// Why an operator command failed: what `lichen` prints after `lichen: ` before exiting 1.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The control socket failed.
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    /// The store could not be opened or read.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// Another process holds the store and no agent answers on the socket.
    #[error("{source}; and nothing answers on its control socket {} after {waited_secs}s", socket.display())]
    SilentAgent {
        /// The lock error.
        #[source]
        source: crate::store::StoreError,
        /// The socket that stayed silent.
        socket: PathBuf,
        /// How long it was waited for.
        waited_secs: u64,
    },
    /// Neither an agent nor a store to read.
    #[error("no agent is running and there is no store at {}", .0.display())]
    NoAgentNoStore(PathBuf),
    /// The running agent refused the request; its message.
    #[error("{0}")]
    Agent(String),
    /// A log could not be found or read.
    #[error(transparent)]
    Logs(#[from] crate::logfmt::LogError),
    /// Standard output closed with an error other than a closed pipe.
    #[error("cannot write the log: {0}")]
    WriteLog(#[source] std::io::Error),
    /// A module command failed; the module cache's own message.
    #[error(transparent)]
    Modules(#[from] crate::modules::ModuleCommandError),
    /// The module settings cannot be used (an unreadable CA file).
    #[error(transparent)]
    Fetcher(#[from] crate::modules::FetcherError),
    /// Pushing or pulling failed.
    #[error(transparent)]
    Pull(#[from] crate::modules::PullError),
    /// The Wasm engine could not be created.
    #[error(transparent)]
    Runtime(#[from] crate::runtime::RuntimeError),
    /// The engine for validation could not be configured.
    #[error("cannot create the WebAssembly engine: {0:#}")]
    Engine(#[source] wasmtime::Error),
    /// Precompiling failed.
    #[error(transparent)]
    Compile(#[from] crate::runtime::CompileError),
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `lichen push` was given something that is not a binary module.
    #[error(
        "{} is not a binary WebAssembly module (it must start with \\0asm; convert .wat text with wasm-tools parse)",
        .0.display()
    )]
    NotWasm(PathBuf),
    /// The module does not validate.
    #[error("{} is not a valid module: {source:#}", path.display())]
    InvalidModule {
        /// The file.
        path: PathBuf,
        /// What Wasmtime found.
        #[source]
        source: wasmtime::Error,
    },
    /// `lichen push` was given a reference that is not an OCI one.
    #[error("{0:?} is not an OCI reference (registry/repository:tag)")]
    NotOci(String),
    /// Publishing, signing or fetching an agent image failed.
    #[error(transparent)]
    AgentImage(#[from] crate::upgrade::registry::UpgradeFetchError),
    /// `lichen fleet` could not run.
    #[error(transparent)]
    Fleet(#[from] fleet::FleetError),
    /// The command line asks for something that does not fit together.
    #[error("{0}")]
    Usage(&'static str),
    /// The registry login flags do not fit together.
    #[error("{0}")]
    Login(&'static str),
    /// The password could not be read from standard input.
    #[error("cannot read the password from stdin: {0}")]
    ReadPassword(#[source] std::io::Error),
    /// A blocking task failed.
    #[error("internal task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
    /// The pods could not be written as YAML.
    #[error("cannot print the pods as YAML: {0}")]
    Yaml(#[source] serde_saphyr::SerializeError),
    /// The async runtime could not start.
    #[error("cannot start the async runtime: {0}")]
    AsyncRuntime(#[source] std::io::Error),
}

/// Runs `f` to completion on a small runtime of its own: the operator's commands are short, and
/// two worker threads are plenty on a board.
pub fn block_on<T>(f: impl std::future::Future<Output = Result<T, CliError>>) -> Result<T, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(CliError::AsyncRuntime)?
        .block_on(f)
}
