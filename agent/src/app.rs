//! Wires the agent together: opens the store, creates the runtime, feeds the static pod source into
//! the pod manager, and shuts everything down in order when the root cancellation token fires.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::AgentConfig;
use crate::node::NodeRegistrar;
use crate::pod::manager::{DesiredPod, ManagerConfig, PodManager};
use crate::pod::state::Backoff;
use crate::pod::worker::WorkerDeps;
use crate::runtime::{RuntimeError, WasmRuntime};
use crate::static_pods::StaticPodSource;
use crate::store::{SledStore, StateStore, StoreError};

/// Why the agent could not start or stopped in error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The state store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The Wasm engine could not be created.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// A task the agent depends on failed.
    #[error("internal task failed: {0}")]
    Task(String),
}

/// Paths under `state_dir`.
pub struct StateLayout {
    /// The sled database.
    pub store: PathBuf,
    /// Per-pod directories (emptyDir volumes).
    pub pods: PathBuf,
    /// Container logs.
    pub logs: PathBuf,
}

impl StateLayout {
    /// The layout of `config.state_dir`.
    pub fn of(config: &AgentConfig) -> Self {
        let d = &config.state_dir;
        StateLayout { store: d.join("store"), pods: d.join("pods"), logs: d.join("logs") }
    }
}

/// Opens the store on a blocking thread (sled recovers its log on open).
pub async fn open_store(path: PathBuf) -> Result<Arc<SledStore>, StoreError> {
    let p = path.clone();
    tokio::task::spawn_blocking(move || SledStore::open(&p))
        .await
        .map_err(|e| StoreError::Io { path, source: std::io::Error::other(e) })?
        .map(Arc::new)
}

/// Runs the agent until `cancel` fires, then stops pods and flushes the store.
pub async fn run(config: AgentConfig, cancel: CancellationToken) -> Result<(), AppError> {
    let layout = StateLayout::of(&config);
    let store = open_store(layout.store.clone()).await?;
    tracing::info!(store = %layout.store.display(), schema = store.schema_version(), "state store open");
    let runtime = WasmRuntime::new()?;
    let deps = Arc::new(WorkerDeps {
        runtime,
        store: store.clone(),
        logs_dir: layout.logs.clone(),
        log_config: config.container_logs.clone(),
        host_ip: node_ip(&config).map(|ip| ip.to_string()),
        backoff: Backoff::default(),
    });
    let tracker = TaskTracker::new();
    let pods_cancel = cancel.child_token();
    let mut manager = PodManager::new(
        ManagerConfig {
            node_name: config.node_name.clone(),
            pods_dir: layout.pods.clone(),
            max_pods: config.max_pods,
            runtime: config.runtime.clone(),
            stop_grace: Duration::from_secs(config.shutdown_timeout_secs),
        },
        deps,
        tracker.clone(),
        pods_cancel.clone(),
    );

    let (desired_tx, mut desired_rx) = watch::channel(Vec::<DesiredPod>::new());
    match config.static_pods() {
        Some(dir) => {
            tracing::info!(dir = %dir.display(), "watching static pod manifests");
            let source = StaticPodSource::new(dir.to_owned(), config.node_name.clone());
            tracker.spawn(source.run(desired_tx, cancel.child_token()));
        }
        None => tracing::info!("static pods are off (static_pod_dir is empty)"),
    }
    match config.cluster() {
        Some(kubeconfig) => {
            tracing::info!(kubeconfig = %kubeconfig.display(), "joining the cluster");
            tracker.spawn(NodeRegistrar::new(&config).run(cancel.child_token()));
        }
        None => tracing::info!("standalone: no kubeconfig, static pods only"),
    }
    if config.static_pods().is_some() {
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = desired_rx.changed() => {}
        }
    }
    tracing::info!(node = %config.node_name, version = env!("CARGO_PKG_VERSION"), "lichen running");
    let mut first = true;
    loop {
        let desired = desired_rx.borrow_and_update().clone();
        manager.sync(&desired).await;
        if first && !cancel.is_cancelled() {
            first = false;
            manager.forget_absent(&desired, "file:").await;
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            changed = desired_rx.changed() => if changed.is_err() {
                // Without a source nothing changes; wait for shutdown.
                cancel.cancelled().await;
                break;
            },
        }
    }

    tracing::info!("shutting down: stopping pods");
    pods_cancel.cancel();
    let bound = Duration::from_secs(config.shutdown_timeout_secs);
    if tokio::time::timeout(bound, manager.shutdown()).await.is_err() {
        tracing::warn!("pods did not stop within {}s", bound.as_secs());
    }
    tracker.close();
    if tokio::time::timeout(bound, tracker.wait()).await.is_err() {
        tracing::warn!("background tasks did not finish within {}s", bound.as_secs());
    }
    let s = store.clone();
    tokio::task::spawn_blocking(move || s.flush()).await.map_err(|e| AppError::Task(e.to_string()))??;
    tracing::info!("stopped");
    Ok(())
}

/// The node's address: configured, or that of the default-route interface.
fn node_ip(config: &AgentConfig) -> Option<std::net::IpAddr> {
    crate::node::facts::HostFacts::read(&config.state_dir, config.node_ip.parse().ok()).ip
}
