//! The Kubernetes side of pods: which pods are bound to this node ([`pods`]), and what they are
//! doing, written back to the API server ([`status`]). The node itself is [`crate::node`].

pub mod events;
pub mod inputs;
pub mod pods;
pub mod status;

use std::path::Path;
use std::time::Duration;

use kube::Client;
use tokio_util::sync::CancellationToken;

use crate::retry::RetryBackoff;

/// Connects with `kubeconfig`, retrying with back-off until it works or `cancel` fires. A broken
/// kubeconfig is logged, never fatal: static pods keep running meanwhile.
pub async fn connect_with_retry(kubeconfig: &Path, cancel: &CancellationToken) -> Option<Client> {
    let mut backoff = RetryBackoff::new(Duration::from_secs(1), Duration::from_secs(300));
    loop {
        match crate::node::connect(kubeconfig).await {
            Ok(c) => return Some(c),
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::error!(error = %e, retry_in_secs = delay.as_secs(), "cannot use the kubeconfig; static pods keep running");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = cancel.cancelled() => return None,
                }
            }
        }
    }
}

/// What the agent knows about its link to the API server, for `lichen status` and the offline
/// policy. Updated by the heartbeat (every 10 s while connected) and the status writer.
#[derive(Debug, Default)]
pub struct ApiContact {
    state: std::sync::Mutex<ContactState>,
}

/// A snapshot of [`ApiContact`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ContactState {
    /// Whether a cluster is configured at all.
    pub configured: bool,
    /// The last successful exchange with the API server.
    pub last_ok: Option<jiff::Timestamp>,
    /// The last failure, if it came after the last success.
    pub last_error: Option<String>,
    /// When the current run of failures began (the link went down), if it is down.
    pub down_since: Option<jiff::Timestamp>,
}

impl ApiContact {
    /// A tracker for an agent that has (or has not) a cluster configured.
    pub fn new(configured: bool) -> Self {
        ApiContact { state: std::sync::Mutex::new(ContactState { configured, ..Default::default() }) }
    }

    /// Records a successful exchange.
    pub fn ok(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.last_ok = Some(jiff::Timestamp::now());
            s.last_error = None;
            s.down_since = None;
        }
    }

    /// Records a failed exchange.
    pub fn failed(&self, error: &str) {
        if let Ok(mut s) = self.state.lock() {
            s.last_error = Some(error.to_owned());
            s.down_since.get_or_insert_with(jiff::Timestamp::now);
        }
    }

    /// The current state.
    pub fn snapshot(&self) -> ContactState {
        self.state.lock().map(|s| s.clone()).unwrap_or_default()
    }
}
