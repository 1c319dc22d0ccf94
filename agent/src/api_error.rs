//! API server errors as one readable line: `verb resource: Reason (code): message` for an answer
//! the API server gave, `verb resource: cause` when none came. Every place in the agent that logs
//! or reports a `kube::Error` formats it here, because kube's own `Display` of an API error ends
//! with a `Debug` dump of the whole `Status` (`ApiError: … (Status { status: Some(Failure), … })`).
//!
//! Also the one classification the agent retries differently: the Node authorizer's refusal of a
//! read it will allow moments later ([`is_node_graph_lag`]). Nothing here does I/O or logs.

use std::fmt;

/// `Reason (code): message` for an API answer, else the error and its causes, on one line.
pub struct Brief<'a>(pub &'a kube::Error);

impl fmt::Display for Brief<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            kube::Error::Api(s) => {
                let reason = if s.reason.is_empty() { "Failure" } else { s.reason.as_str() };
                if s.message.is_empty() {
                    write!(f, "{reason} ({})", s.code)
                } else {
                    write!(f, "{reason} ({}): {}", s.code, one_line(&s.message))
                }
            }
            other => {
                // The chain of causes, each once: hyper and rustls errors often repeat their
                // source's text in their own.
                let mut text = one_line(&other.to_string());
                let mut source = std::error::Error::source(other);
                while let Some(cause) = source {
                    let part = one_line(&cause.to_string());
                    if !part.is_empty() && !text.contains(&part) {
                        text.push_str(": ");
                        text.push_str(&part);
                    }
                    source = cause.source();
                }
                f.write_str(&text)
            }
        }
    }
}

/// `e` as [`Brief`] shows it.
pub fn brief(e: &kube::Error) -> Brief<'_> {
    Brief(e)
}

/// A failed request, as one line: `verb resource: Reason (code): message`.
pub struct Failed<'a> {
    /// What was asked: `get`, `list`, `watch`, `create`, `patch`, `delete`, …
    pub verb: &'a str,
    /// What it was asked of: `secrets default/db`, `pods/status default/web`, `leases pi-7`.
    pub resource: &'a str,
    /// What came back.
    pub error: &'a kube::Error,
}

impl fmt::Display for Failed<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.verb, self.resource, Brief(self.error))
    }
}

/// `verb resource: Reason (code): message`, for a log line's `error` field.
pub fn failed<'a>(verb: &'a str, resource: &'a str, error: &'a kube::Error) -> Failed<'a> {
    Failed { verb, resource, error }
}

/// A watch of `resource` that failed or broke, as one line: `list pods: …`, `watch pods: …`.
pub fn watch_failed(resource: &str, e: &kube::runtime::watcher::Error) -> String {
    use kube::runtime::watcher::Error as W;
    match e {
        W::InitialListFailed(e) => failed("list", resource, e).to_string(),
        W::WatchStartFailed(e) | W::WatchFailed(e) => failed("watch", resource, e).to_string(),
        W::WatchError(s) => failed("watch", resource, &kube::Error::Api(s.clone())).to_string(),
        W::NoResourceVersion => format!("watch {resource}: {e}"),
    }
}

/// Whether `e` is the Node authorizer refusing a read because its graph does not yet hold the pod
/// that names the object: it answers `403` with `no relationship found between node '<n>' and
/// this object` for a few moments after a pod is bound, then allows the same request. The kubelet
/// retries such reads at once and quietly; so does the agent.
pub fn is_node_graph_lag(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 403 && s.message.contains("no relationship found between node"))
}

/// Newlines folded, so a multi-line message stays one log line.
fn one_line(text: &str) -> String {
    if text.contains('\n') { text.split_whitespace().collect::<Vec<_>>().join(" ") } else { text.to_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16, reason: &str, message: &str) -> kube::Error {
        kube::Error::Api(Box::new(kube::core::Status {
            code,
            reason: reason.into(),
            message: message.into(),
            ..Default::default()
        }))
    }

    #[test]
    fn an_api_answer_is_one_line_without_the_status_dump() {
        let e = api(
            403,
            "Forbidden",
            "secrets \"db\" is forbidden: no relationship found between node 'pi' and this object",
        );
        let line = failed("get", "secrets default/db", &e).to_string();
        assert_eq!(
            line,
            "get secrets default/db: Forbidden (403): secrets \"db\" is forbidden: no relationship found between node 'pi' and this object"
        );
        assert!(!line.contains("Status {"), "{line}");
        assert!(is_node_graph_lag(&e));
        assert!(!is_node_graph_lag(&api(403, "Forbidden", "secrets \"db\" is forbidden: User cannot get")));
        assert!(!is_node_graph_lag(&api(404, "NotFound", "no relationship found between node")));
        assert_eq!(brief(&api(500, "", "")).to_string(), "Failure (500)");
        assert_eq!(brief(&api(409, "Conflict", "one\ntwo")).to_string(), "Conflict (409): one two");
    }

    #[test]
    fn an_error_without_an_answer_shows_its_causes_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let e = kube::Error::ReadEvents(io);
        assert_eq!(brief(&e).to_string(), "Error reading events stream: connection refused");
    }
}
