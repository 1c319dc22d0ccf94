//! The agent's control socket, `<state_dir>/lichen.sock`: how `lichen status` and `lichen modules …`
//! reach a running agent, whose store (sled) no second process may open.
//!
//! One JSON request per line, one JSON response per line, then the connection closes. The socket is
//! created mode 0600 inside the state directory: only the agent's user (and root) may use it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::cluster::ApiContact;
use crate::modules::ModuleCache;
use crate::modules::commands::ModuleCommand;
use crate::pod::board::StatusBoard;
use crate::report::NodeReport;
use crate::store::StateStore;

/// The socket's file name under `state_dir`.
pub const SOCKET_NAME: &str = "lichen.sock";
/// The largest request accepted (a module command is a few hundred bytes).
const MAX_REQUEST: u64 = 64 << 10;
/// How long a command may take (a pull is bounded by its own timeout well below this).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(900);

/// The socket path for a state directory.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

/// A request to the agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ControlRequest {
    /// A `lichen modules` command.
    Modules(ModuleCommand),
    /// `lichen status`: the answer's output is the [`NodeReport`] as JSON.
    Status,
}

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
    pub async fn report(&self) -> Result<NodeReport, String> {
        let store = self.store.clone();
        let board = self.board.clone();
        let pods = tokio::task::spawn_blocking(move || {
            let pending: std::collections::HashSet<String> =
                board.pending(crate::cluster::pods::SOURCE).into_iter().map(|(k, _)| k).collect();
            crate::report::pod_lines(store.as_ref(), |k| pending.contains(k))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        Ok(NodeReport {
            node: self.node_name.clone(),
            agent_running: true,
            contact: Some(self.contact.snapshot()),
            outbox: Some(self.board.pending_count(crate::cluster::pods::SOURCE)),
            pods,
            status_changes: self.board.changes(),
            store_pod_writes: self.store.pod_writes(),
            mqtt: self.mqtt.as_ref().map(|b| crate::report::MqttReport {
                bridge: b.snapshot(),
                spool: b.spool().snapshot(),
                gateway: b.gateway_snapshot(),
            }),
        })
    }
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlResponse {
    /// Whether the command succeeded.
    pub ok: bool,
    /// What to show the operator (the error if not `ok`).
    pub output: String,
}

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket could not be created.
    #[error("cannot listen on the control socket {path}: {source}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Talking to the agent failed half-way.
    #[error("the agent at {path} did not answer properly: {message}")]
    Exchange {
        /// The socket path.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// Serves requests until `cancel`; removes the socket file when it stops.
pub async fn serve(
    path: PathBuf,
    control: Arc<Control>,
    cancel: CancellationToken,
) -> Result<(), ControlError> {
    let listen_err = |source| ControlError::Listen { path: path.clone(), source };
    // A socket file left by a killed agent refuses connections; only then is it ours to replace.
    if path.exists() && UnixStream::connect(&path).await.is_err() {
        let _ = std::fs::remove_file(&path);
    }
    let listener = UnixListener::bind(&path).map_err(listen_err)?;
    set_private(&path).map_err(listen_err)?;
    tracing::debug!(socket = %path.display(), "control socket listening");
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
    let _ = std::fs::remove_file(&path);
    Ok(())
}

async fn handle(stream: UnixStream, control: Arc<Control>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST));
    let response = match reader.read_line(&mut line).await {
        Err(e) => ControlResponse { ok: false, output: format!("cannot read the request: {e}") },
        Ok(_) => match serde_json::from_str::<ControlRequest>(&line) {
            Err(e) => ControlResponse { ok: false, output: format!("malformed request: {e}") },
            Ok(ControlRequest::Status) => match control.report().await {
                Ok(r) => ControlResponse { ok: true, output: serde_json::to_string(&r).unwrap_or_default() },
                Err(e) => ControlResponse { ok: false, output: e },
            },
            Ok(ControlRequest::Modules(cmd)) => {
                tracing::info!(command = ?redacted(&cmd), "control request");
                match tokio::time::timeout(COMMAND_TIMEOUT, control.modules.command(cmd)).await {
                    Ok(Ok(output)) => ControlResponse { ok: true, output },
                    Ok(Err(output)) => ControlResponse { ok: false, output },
                    Err(_) => ControlResponse { ok: false, output: "the command timed out".into() },
                }
            }
        },
    };
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

/// Sends `request` to the agent listening at `path`; `Ok(None)` if no agent is listening.
pub async fn request(path: &Path, request: &ControlRequest) -> Result<Option<ControlResponse>, ControlError> {
    let exchange = |message: String| ControlError::Exchange { path: path.to_owned(), message };
    let mut stream = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e)
            if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(exchange(e.to_string())),
    };
    let mut line = serde_json::to_vec(request).map_err(|e| exchange(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line).await.map_err(|e| exchange(e.to_string()))?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).await.map_err(|e| exchange(e.to_string()))?;
    serde_json::from_str(&answer).map(Some).map_err(|e| exchange(format!("{e} in {answer:?}")))
}

/// What a command reached: the running agent (its answer), or the store of a stopped one.
pub enum Reached {
    /// The agent answered on its socket.
    Agent(ControlResponse),
    /// No agent runs; the store is open for this process.
    Store(Arc<crate::store::SledStore>),
}

/// How long a command waits for a starting agent's socket when the store is already locked.
const STARTING_AGENT_WAIT: Duration = Duration::from_secs(10);

/// Asks the running agent, or opens the store when none runs. An agent that has opened the store
/// but is not listening yet (it is starting) is waited for, rather than reported as "another
/// process holds the store".
pub async fn ask_agent_or_open_store(
    socket: &Path,
    request: &ControlRequest,
    store: &Path,
) -> Result<Reached, String> {
    let deadline = tokio::time::Instant::now() + STARTING_AGENT_WAIT;
    loop {
        if let Some(answer) = self::request(socket, request).await.map_err(|e| e.to_string())? {
            return Ok(Reached::Agent(answer));
        }
        match crate::app::open_store(store.to_owned()).await {
            Ok(s) => return Ok(Reached::Store(s)),
            Err(crate::store::StoreError::Locked { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e @ crate::store::StoreError::Locked { .. }) => {
                return Err(format!(
                    "{e}; and nothing answers on its control socket {} after {}s",
                    socket.display(),
                    STARTING_AGENT_WAIT.as_secs()
                ));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn set_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}
