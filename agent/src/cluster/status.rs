//! Writes pod status to the API server: the newest status of each API pod from the
//! [`StatusBoard`], as a PATCH to `pods/status` carrying the UID as a precondition (a pod recreated
//! under the same name is a different pod and must never receive this one's status).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::board::StatusBoard;
use crate::retry::RetryBackoff;
use crate::store::SourceKind;

/// Drains the board until `cancel`.
pub async fn run(
    client: super::ClusterClient,
    board: std::sync::Arc<StatusBoard>,
    contact: std::sync::Arc<super::ApiContact>,
    cancel: CancellationToken,
) {
    let mut backoff = RetryBackoff::new(Duration::from_millis(500), Duration::from_secs(60));
    loop {
        let pending = board.pending(SourceKind::Api);
        let mut failed = false;
        for (key, entry) in pending {
            let Some((ns, name)) = key.split_once('/') else { continue };
            let patch = serde_json::json!({ "metadata": { "uid": entry.uid }, "status": entry.status });
            // The Pod the server answers with is not read (super::lean).
            let path = format!("/api/v1/namespaces/{ns}/pods/{name}/status");
            match super::lean::merge_patch(&client.current(), &path, &patch).await {
                Ok(_) => {
                    contact.ok();
                    board.ack(&key, entry.version);
                }
                // Gone, or a different pod now: this status has nowhere to go.
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {
                    contact.ok();
                    board.ack(&key, entry.version);
                }
                Err(e) => {
                    let line =
                        crate::api_error::failed("patch", &format!("pods/status {key}"), &e).to_string();
                    contact.failed(&line);
                    tracing::warn!(error = %line, "cannot write pod status; will retry");
                    failed = true;
                }
            }
        }
        let wait = if failed {
            Some(backoff.next_delay())
        } else {
            backoff.reset();
            None
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = board.changed() => {}
            _ = async { match wait { Some(d) => tokio::time::sleep(d).await, None => std::future::pending().await } } => {}
        }
    }
}
