//! Renews the node's client certificate before it expires, at a jittered point between 70% and
//! 90% of its lifetime, and hands the new client to every cluster task through the
//! [`ClusterClient`](crate::cluster::ClusterClient) sender: pods keep running, and new connections
//! carry the new certificate.
//!
//! A certificate that expired while the board was offline cannot renew itself (the API server no
//! longer accepts it). Then the bootstrap token is used again when one is configured; otherwise
//! the log says exactly what the operator must do.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use kube::Client;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{BootstrapError, JoinRequest, NodePki};
use crate::config::AgentConfig;
use crate::retry::RetryBackoff;

/// The longest single sleep while waiting for the renewal point: the wall clock of a board
/// without a real-time clock jumps when NTP answers, and the deadline is on that clock.
const RECHECK: Duration = Duration::from_secs(60);

/// Renews Lichen's own node certificate.
pub struct CertificateRotation {
    config: AgentConfig,
    pki: NodePki,
}

impl CertificateRotation {
    /// Rotation of `<state_dir>/node.kubeconfig` for the config's node.
    pub fn new(config: &AgentConfig) -> Self {
        CertificateRotation { config: config.clone(), pki: NodePki::new(&config.layout()) }
    }

    /// Runs until `cancel`, replacing the client in `tx` after every renewal.
    pub async fn run(self, tx: watch::Sender<Client>, cancel: CancellationToken) {
        let mut backoff = RetryBackoff::new(Duration::from_secs(10), Duration::from_secs(600));
        loop {
            let validity = match super::client_certificate_validity(&self.pki.kubeconfig) {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!(kubeconfig = %self.pki.kubeconfig.display(), error = %e, "cannot read the node certificate; rotation waits");
                    if sleep_or_cancel(RECHECK, &cancel).await {
                        return;
                    }
                    continue;
                }
            };
            let at = validity.renew_at(fastrand::f64());
            tracing::info!(not_after = %validity.not_after, renew_at = %at, "node certificate rotation scheduled");
            loop {
                let now = jiff::Timestamp::now();
                if now >= at {
                    break;
                }
                let left = Duration::from_millis((at.as_millisecond() - now.as_millisecond()).max(0) as u64);
                if sleep_or_cancel(left.min(RECHECK), &cancel).await {
                    return;
                }
            }
            match self.renew(&tx, validity.expired(jiff::Timestamp::now()), &cancel).await {
                Ok(()) => backoff.reset(),
                Err(BootstrapError::Cancelled) => return,
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::error!(error = %e, retry_in_secs = delay.as_secs(), "cannot renew the node certificate");
                    if sleep_or_cancel(delay, &cancel).await {
                        return;
                    }
                }
            }
        }
    }

    async fn renew(
        &self,
        tx: &watch::Sender<Client>,
        expired: bool,
        cancel: &CancellationToken,
    ) -> Result<(), BootstrapError> {
        let timeout = Duration::from_secs(self.config.join.approval_timeout_secs);
        let kubeconfig = if expired {
            // The API server no longer accepts the certificate: only the bootstrap token can help.
            let join = &self.config.join;
            let (token, token_source) = match super::find_token(join.token(), &join.token_file) {
                Ok(t) if join.enabled() => t,
                Ok(_) | Err(BootstrapError::NoToken { .. }) => {
                    return Err(BootstrapError::ExpiredOffline {
                        path: self.pki.kubeconfig.clone(),
                        token_file: join.token_file.clone(),
                    });
                }
                Err(e) => return Err(e),
            };
            tracing::warn!("the node certificate expired; joining again with the bootstrap token");
            let req = JoinRequest {
                node_name: self.config.node_name.clone(),
                server: join.server.clone(),
                ca_cert: join.ca_cert.clone(),
                token,
                token_source,
                approval_timeout: timeout,
                state_dir: self.config.state_dir.clone(),
            };
            super::join(&req, cancel).await?
        } else {
            let (server, ca_pem) = cluster_of(&self.pki.kubeconfig)?;
            let client = tx.borrow().clone();
            let (key, cert) =
                super::request_certificate(&client, &self.config.node_name, timeout, cancel).await?;
            self.pki.install(&self.config.node_name, &server, &ca_pem, &key, &cert)?
        };
        let client = crate::cluster::client::connect(&kubeconfig)
            .await
            .map_err(|source| BootstrapError::Connect { path: kubeconfig.clone(), source })?;
        tx.send_replace(client);
        tracing::info!("switched to the renewed node certificate; pods were not touched");
        Ok(())
    }
}

/// The server and CA (PEM) of the node kubeconfig.
fn cluster_of(kubeconfig: &PathBuf) -> Result<(String, Vec<u8>), BootstrapError> {
    let path = || kubeconfig.clone();
    let missing = |missing| BootstrapError::KubeconfigIncomplete { path: path(), missing };
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)
        .map_err(|source| BootstrapError::Kubeconfig { path: path(), source })?;
    let cluster =
        kc.clusters.first().and_then(|c| c.cluster.as_ref()).ok_or_else(|| missing("no cluster"))?;
    let server = cluster.server.clone().ok_or_else(|| missing("no server"))?;
    let ca = cluster
        .certificate_authority_data
        .as_deref()
        .ok_or_else(|| missing("no certificate-authority-data"))?;
    let ca = base64::engine::general_purpose::STANDARD.decode(ca.trim()).map_err(|source| {
        BootstrapError::Base64 { path: path(), field: "certificate-authority-data", source }
    })?;
    Ok((server, ca))
}

/// Sleeps; returns whether `cancel` fired instead.
async fn sleep_or_cancel(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}
