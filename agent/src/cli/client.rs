//! The control socket's client: asks the running agent, or, when none runs, opens the store for
//! this process (a stopped agent's store is the node's truth).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::CliError;
use crate::control::{ControlError, ControlRequest, ControlResponse};
use crate::store::{SledStore, StoreError};

/// How long a command waits for a starting agent's socket when the store is already locked.
const STARTING_AGENT_WAIT: Duration = Duration::from_secs(10);

/// Sends `request` to the agent listening at `path`; `Ok(None)` if no agent is listening.
pub async fn request(path: &Path, request: &ControlRequest) -> Result<Option<ControlResponse>, ControlError> {
    let exchange = |source| ControlError::Exchange { path: path.to_owned(), source };
    let mut stream = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e)
            if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(exchange(e)),
    };
    // A path that is not UTF-8 (`lichen modules import`) cannot be put in JSON.
    let mut line = serde_json::to_vec(request).map_err(ControlError::Encode)?;
    line.push(b'\n');
    stream.write_all(&line).await.map_err(exchange)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).await.map_err(exchange)?;
    serde_json::from_str(&answer)
        .map(Some)
        .map_err(|e| ControlError::Decode { path: path.to_owned(), source: e })
}

/// What a command reached: the running agent (its answer), or the store of a stopped one.
pub enum Reached {
    /// The agent answered on its socket.
    Agent(ControlResponse),
    /// No agent runs; the store is open for this process.
    Store(Arc<SledStore>),
}

/// Asks the running agent, or opens the store when none runs. An agent that has opened the store
/// but is not listening yet (it is starting) is waited for, rather than reported as "another
/// process holds the store".
pub async fn ask_agent_or_open_store(
    socket: &Path,
    request: &ControlRequest,
    store: &Path,
) -> Result<Reached, CliError> {
    let deadline = tokio::time::Instant::now() + STARTING_AGENT_WAIT;
    loop {
        if let Some(answer) = self::request(socket, request).await? {
            return Ok(Reached::Agent(answer));
        }
        match crate::store::open_off_reactor(store.to_owned()).await {
            Ok(s) => return Ok(Reached::Store(s)),
            Err(StoreError::Locked { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(source @ StoreError::Locked { .. }) => {
                return Err(CliError::SilentAgent {
                    source,
                    socket: socket.to_owned(),
                    waited_secs: STARTING_AGENT_WAIT.as_secs(),
                });
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The agent's answer to a request, or the error it answered with.
pub fn expect_answer(
    socket: &Path,
    asked: &ControlRequest,
    answer: ControlResponse,
) -> Result<ControlResponse, CliError> {
    match answer {
        ControlResponse::Error(message) => Err(CliError::Agent(message)),
        a if a.name() == asked.name() => Ok(a),
        a => {
            Err(ControlError::Unexpected { path: socket.to_owned(), asked: asked.name(), what: a.name() }
                .into())
        }
    }
}
