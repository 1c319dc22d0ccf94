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
