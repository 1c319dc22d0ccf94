//! The Kubernetes side of pods: which pods are bound to this node ([`pods`]), and what they are
//! doing, written back to the API server ([`status`]). The node itself is [`crate::node`].

pub mod client;
pub mod events;
pub mod inputs;
pub mod lean;
pub mod pods;
pub mod status;

use std::path::Path;
use std::time::Duration;

use kube::Client;
use tokio_util::sync::CancellationToken;

use crate::retry::RetryBackoff;

/// The kube client every cluster task uses. It is swapped in place when the node's certificate is
/// renewed: tasks take [`ClusterClient::current`] for each request, and long-running watches start
/// again on [`ClusterClient::changed`], so new connections carry the new certificate and the old
/// client's connections close once nothing uses it. Pods are never restarted for it.
#[derive(Clone)]
pub struct ClusterClient(tokio::sync::watch::Receiver<Client>);

impl ClusterClient {
    /// A client handle and the sender that replaces the client (kept by the certificate rotation).
    pub fn new(client: Client) -> (Self, tokio::sync::watch::Sender<Client>) {
        let (tx, rx) = tokio::sync::watch::channel(client);
        (ClusterClient(rx), tx)
    }

    /// The client to use now.
    pub fn current(&self) -> Client {
        self.0.borrow().clone()
    }

    /// Waits until the client is replaced (forever if it never will be).
    pub async fn changed(&mut self) {
        if self.0.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Connects with `kubeconfig`, retrying with back-off until it works or `cancel` fires. A broken
/// kubeconfig is logged, never fatal: static pods keep running meanwhile.
pub async fn connect_with_retry(kubeconfig: &Path, cancel: &CancellationToken) -> Option<Client> {
    let mut backoff = RetryBackoff::new(Duration::from_secs(1), Duration::from_secs(300));
    loop {
        match client::connect(kubeconfig).await {
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
///
/// How long the node has been without contact is measured on the monotonic clock, never by
/// comparing wall-clock timestamps: a board without a real-time clock boots with a stale time and
/// jumps by days when NTP answers, and that must not look like days offline. Offline time from
/// before an agent restart is carried over in `<state_dir>/offline-seconds` (time the board was off
/// does not count: nothing ran then).
#[derive(Debug)]
pub struct ApiContact {
    state: std::sync::Mutex<ContactState>,
    clock: std::sync::Mutex<OfflineClock>,
    /// Woken when contact comes back, so every part retries at once rather than at the end of
    /// its own back-off.
    restored: tokio::sync::Notify,
}

#[derive(Debug)]
struct OfflineClock {
    /// When the current offline stretch began in this process (`None`: connected).
    since: Option<std::time::Instant>,
    /// Offline time carried over from before this process started.
    carried: std::time::Duration,
    /// Where the carried time is kept across restarts.
    file: Option<std::path::PathBuf>,
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
    /// Seconds without contact, on the monotonic clock and across agent restarts (0 when connected).
    #[serde(default)]
    pub offline_secs: u64,
}

impl Default for ApiContact {
    fn default() -> Self {
        ApiContact::new(false, None)
    }
}

impl ApiContact {
    /// A tracker for an agent that has (or has not) a cluster configured, carrying offline time in
    /// `file` (if given). Until the first contact the node counts as offline.
    pub fn new(configured: bool, file: Option<std::path::PathBuf>) -> Self {
        let carried = file
            .as_deref()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .and_then(|t| t.trim().parse::<u64>().ok())
            .map(std::time::Duration::from_secs)
            .unwrap_or_default();
        ApiContact {
            state: std::sync::Mutex::new(ContactState { configured, ..Default::default() }),
            clock: std::sync::Mutex::new(OfflineClock {
                since: configured.then(std::time::Instant::now),
                carried,
                file,
            }),
            restored: tokio::sync::Notify::new(),
        }
    }

    /// Waits until contact is restored after a failure (returns at the next `ok()` that ends an
    /// offline stretch).
    pub async fn restored(&self) {
        self.restored.notified().await;
    }

    /// Records a successful exchange.
    pub fn ok(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.last_ok = Some(jiff::Timestamp::now());
            s.last_error = None;
            s.down_since = None;
        }
        let mut was_offline = false;
        if let Ok(mut c) = self.clock.lock() {
            was_offline = c.since.take().is_some() || !c.carried.is_zero();
            c.carried = std::time::Duration::ZERO;
            if was_offline && let Some(f) = &c.file {
                let _ = std::fs::remove_file(f);
            }
        }
        if was_offline {
            self.restored.notify_waiters();
        }
    }

    /// Records a failed exchange.
    pub fn failed(&self, error: &str) {
        if let Ok(mut s) = self.state.lock() {
            s.last_error = Some(error.to_owned());
            s.down_since.get_or_insert_with(jiff::Timestamp::now);
        }
        if let Ok(mut c) = self.clock.lock() {
            c.since.get_or_insert_with(std::time::Instant::now);
        }
    }

    /// How long the node has been without contact (across restarts), or `None` while connected.
    pub fn offline_for(&self) -> Option<std::time::Duration> {
        let c = self.clock.lock().ok()?;
        c.since.map(|s| c.carried + s.elapsed())
    }

    /// Writes the offline time so far, so a restart does not reset it. Called periodically.
    pub fn persist(&self) {
        let Some(offline) = self.offline_for() else { return };
        if let Ok(c) = self.clock.lock()
            && let Some(f) = &c.file
            && let Err(e) = std::fs::write(f, offline.as_secs().to_string())
        {
            tracing::warn!(file = %f.display(), error = %e, "cannot record the offline time");
        }
    }

    /// The current state.
    pub fn snapshot(&self) -> ContactState {
        let mut s = self.state.lock().map(|s| s.clone()).unwrap_or_default();
        s.offline_secs = self.offline_for().map(|d| d.as_secs()).unwrap_or(0);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offline_time_is_monotonic_and_carried_over_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("offline-seconds");
        std::fs::write(&file, "3600").expect("write");
        let c = ApiContact::new(true, Some(file.clone()));
        let offline = c.offline_for().expect("offline until the first contact");
        assert!(offline >= std::time::Duration::from_secs(3600), "{offline:?}");
        c.persist();
        assert!(std::fs::read_to_string(&file).expect("read").trim().parse::<u64>().expect("secs") >= 3600);
        c.ok();
        assert_eq!(c.offline_for(), None);
        assert!(!file.exists(), "contact clears the carried time");
        c.failed("connection refused");
        assert!(c.offline_for().expect("offline again") < std::time::Duration::from_secs(5));
        assert!(c.snapshot().down_since.is_some());
        assert_eq!(ApiContact::new(false, None).offline_for(), None, "standalone is never offline");
    }
}
