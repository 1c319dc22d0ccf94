//! The control socket's protocol: what a `lichen` command asks the running agent and what it
//! answers, as typed messages, one JSON object per line each way.
//!
//! Both ends are the same binary, so the messages are plain serde types; there is no string inside
//! a string to decode a second time.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::report::NodeReport;
use crate::modules::commands::ModuleCommand;

/// The largest request the agent reads (a module command is a few hundred bytes). Answers are not
/// bounded: they come from the agent itself.
pub const MAX_REQUEST: u64 = 64 << 10;

/// A request to the agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ControlRequest {
    /// A `lichen modules` command.
    Modules(ModuleCommand),
    /// `lichen status`, `lichen pods`, `lichen logs`: the node as the agent sees it.
    Status,
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ControlResponse {
    /// The node report, for [`ControlRequest::Status`].
    Status(Box<NodeReport>),
    /// What a module command printed, for [`ControlRequest::Modules`].
    Modules(String),
    /// The request failed; what to show the operator.
    Error(String),
}

/// Errors of the control socket, on either end.
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
    #[error("the agent at {path} did not answer properly: {source}")]
    Exchange {
        /// The socket path.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// The request could not be encoded (a path that is not UTF-8).
    #[error("cannot send the request to the agent: {0}")]
    Encode(#[source] serde_json::Error),
    /// The agent's answer could not be decoded.
    #[error("the agent at {path} answered something unreadable: {source}")]
    Decode {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The agent answered a different kind of message than was asked for.
    #[error("the agent at {path} answered {what} to a {asked} request")]
    Unexpected {
        /// The socket path.
        path: PathBuf,
        /// The request.
        asked: &'static str,
        /// What came back.
        what: &'static str,
    },
}

impl ControlRequest {
    /// The request's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            ControlRequest::Modules(_) => "modules",
            ControlRequest::Status => "status",
        }
    }
}

impl ControlResponse {
    /// The answer's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            ControlResponse::Status(_) => "status",
            ControlResponse::Modules(_) => "modules",
            ControlResponse::Error(_) => "error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_as_one_line_each() {
        let report = NodeReport {
            node: "pi-07".into(),
            agent_running: true,
            contact: None,
            outbox: Some(2),
            pods: Vec::new(),
            status_changes: 3,
            agent_version: Some("0.1.0".into()),
            upgrade: None,
            store_pod_writes: 4,
            mqtt: None,
        };
        for answer in [
            ControlResponse::Status(Box::new(report)),
            ControlResponse::Modules("pulled\n".into()),
            ControlResponse::Error("no such module\nsecond line".into()),
        ] {
            let line = serde_json::to_string(&answer).expect("encode");
            assert!(!line.contains('\n'), "{line}");
            assert_eq!(serde_json::from_str::<ControlResponse>(&line).expect("decode"), answer);
        }
        let line = serde_json::to_string(&ControlRequest::Status).expect("encode");
        assert_eq!(line, r#""status""#);
    }
}
