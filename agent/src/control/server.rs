//! The control socket's server, `<state_dir>/lichen.sock`: how `lichen status` and `lichen
//! modules …` reach a running agent, whose store (sled) no second process may open.
//!
//! One request per connection: a JSON line in, a JSON line out ([`super::protocol`]), then the
//! connection closes. The socket is created mode 0600 inside the state directory: only the
//! agent's user (and root) may use it. It serves; it never decides anything about pods.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use super::protocol::{ControlError, ControlRequest, ControlResponse, MAX_REQUEST};
use super::report::{MqttReport, NodeReport, pod_lines};
use crate::board::StatusBoard;
use crate::cluster::ApiContact;
use crate::modules::ModuleCache;
use crate::modules::commands::ModuleCommand;
use crate::store::StateStore;

/// How long a command may take (a pull is bounded by its own timeout well below this).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(900);

/// What the socket serves from.
pub struct Control {
    /// The module cache.
    pub modules: Arc<ModuleCache>,
    /// The store (pods and their last status).
    pub store: Arc<dyn StateStore>,
    /// Newest statuses and what the API server has acknowledged.
    pub board: Arc<StatusBoard>,
    /// The link to the API server.
    pub contact: Arc<ApiContact>,
    /// This node's name.
    pub node_name: String,
    /// The MQTT bridge, when MQTT is on.
    pub mqtt: Option<Arc<crate::telemetry::bridge::MqttBridge>>,
}

impl Control {
    /// The node report of the running agent.
    pub async fn report(&self) -> Result<NodeReport, ReportError> {
        let store = self.store.clone();
        let board = self.board.clone();
        let pods = tokio::task::spawn_blocking(move || {
            let pending: std::collections::HashSet<String> =
                board.pending(crate::store::SourceKind::Api).into_iter().map(|(k, _)| k).collect();
            pod_lines(store.as_ref(), |k| pending.contains(k))
        })
        .await
        .map_err(ReportError::Task)??;
        Ok(NodeReport {
            node: self.node_name.clone(),
            agent_running: true,
            contact: Some(self.contact.snapshot()),
            outbox: Some(self.board.pending_count(crate::store::SourceKind::Api)),
            pods,
            status_changes: self.board.changes(),
            agent_version: Some(crate::version::version()),
            upgrade: None,
            store_pod_writes: self.store.pod_writes(),
            mqtt: self.mqtt.as_ref().map(|b| MqttReport {
                bridge: b.snapshot(),
                spool: b.spool().snapshot(),
                gateway: b.gateway_snapshot(),
            }),
        })
    }
}

/// Binds the socket at `path`, mode 0600. A socket file left by a killed agent (nothing answers
/// on it) is replaced; one a live agent answers on is not.
pub async fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let listen_err = |source| ControlError::Listen { path: path.to_owned(), source };
    if path.exists() && UnixStream::connect(path).await.is_err() {
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(listen_err)?;
    set_private(path).map_err(listen_err)?;
    tracing::debug!(socket = %path.display(), "control socket listening");
    Ok(listener)
}

/// Serves requests on `listener` until `cancel`; then removes the socket file.
pub async fn run(listener: UnixListener, control: Arc<Control>, cancel: CancellationToken) {
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        let conn = tokio::select! {
            _ = cancel.cancelled() => break,
            c = listener.accept() => c,
        };
        match conn {
            Ok((stream, _)) => {
                let control = control.clone();
                let cancel = cancel.clone();
                tasks.spawn(async move {
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        _ = handle(stream, control) => {}
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    tasks.close();
    tasks.wait().await;
    if let Ok(addr) = listener.local_addr()
        && let Some(path) = addr.as_pathname()
    {
        let _ = std::fs::remove_file(path);
    }
}

async fn handle(stream: UnixStream, control: Arc<Control>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST));
    let response = match reader.read_line(&mut line).await {
        Err(e) => ControlResponse::Error(format!("cannot read the request: {e}")),
        Ok(_) => match serde_json::from_str::<ControlRequest>(&line) {
            Err(e) => ControlResponse::Error(format!("malformed request: {e}")),
            Ok(ControlRequest::Status) => match control.report().await {
                Ok(r) => ControlResponse::Status(Box::new(r)),
                Err(e) => ControlResponse::Error(e.to_string()),
            },
            Ok(ControlRequest::Modules(cmd)) => {
                tracing::info!(command = ?redacted(&cmd), "control request");
                match tokio::time::timeout(COMMAND_TIMEOUT, control.modules.command(cmd)).await {
                    Ok(Ok(output)) => ControlResponse::Modules(output),
                    Ok(Err(e)) => ControlResponse::Error(e.to_string()),
                    Err(_) => ControlResponse::Error("the command timed out".into()),
                }
            }
        },
    };
    // Serializing these types cannot fail (no maps with non-string keys, no foreign Serialize).
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    let _ = write.write_all(&out).await;
    let _ = write.shutdown().await;
}

/// The command without its password, for the log.
fn redacted(cmd: &ModuleCommand) -> ModuleCommand {
    let mut cmd = cmd.clone();
    if let ModuleCommand::Pull { password, .. } = &mut cmd
        && password.is_some()
    {
        *password = Some("<hidden>".into());
    }
    cmd
}

fn set_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

/// Why the running agent could not build its report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The blocking task reading it failed.
    #[error("reading the store failed: {0}")]
    Task(#[source] tokio::task::JoinError),
}
