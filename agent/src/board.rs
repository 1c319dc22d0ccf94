//! The status board (ground floor): the latest status of every pod, written by the pod workers and
//! read by whoever reports it elsewhere (the API status writer, `lichen status`, /metrics, node
//! telemetry). It imports nothing from the crate, so every room can share it.
//!
//! Coalescing by design: each pod keeps only its newest status and a version number, so a writer that
//! fell behind (or was offline) sends one patch per pod, never a backlog.

use std::collections::HashMap;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::PodStatus;
use tokio::sync::Notify;

use crate::store::{PodSource, SourceKind};

/// One pod's newest status.
#[derive(Debug, Clone, PartialEq)]
pub struct BoardEntry {
    /// The pod's UID (the write must not land on a newer pod of the same name).
    pub uid: String,
    /// Where the pod came from.
    pub source: PodSource,
    /// The status.
    pub status: PodStatus,
    /// Bumped on every change.
    pub version: u64,
}

/// Shared by the pod workers (writers) and the reporters (readers).
#[derive(Default)]
pub struct StatusBoard {
    entries: Mutex<HashMap<String, BoardEntry>>,
    /// The version of each pod's status the API server has acknowledged.
    acked: Mutex<HashMap<String, u64>>,
    changed: Notify,
    next_version: std::sync::atomic::AtomicU64,
}

impl StatusBoard {
    /// Records `status` as the newest for `key`.
    pub fn set(&self, key: &str, uid: &str, source: &PodSource, status: PodStatus) {
        let version = self.next_version.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        if let Ok(mut e) = self.entries.lock() {
            e.insert(
                key.to_owned(),
                BoardEntry { uid: uid.to_owned(), source: source.clone(), status, version },
            );
        }
        self.changed.notify_one();
    }

    /// Forgets a pod (it was removed).
    pub fn remove(&self, key: &str, uid: &str) {
        if let Ok(mut e) = self.entries.lock()
            && e.get(key).is_some_and(|x| x.uid == uid)
        {
            e.remove(key);
            if let Ok(mut a) = self.acked.lock() {
                a.remove(key);
            }
        }
    }

    /// Entries not acknowledged yet, for pods from sources of `kind`: the outbox.
    pub fn pending(&self, kind: SourceKind) -> Vec<(String, BoardEntry)> {
        let Ok(e) = self.entries.lock() else { return Vec::new() };
        let acked = self.acked.lock().map(|a| a.clone()).unwrap_or_default();
        e.iter()
            .filter(|(k, v)| v.source.kind() == kind && acked.get(*k).is_none_or(|s| *s < v.version))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// How many pods (from sources of `kind`) have a status the API server has not acknowledged.
    pub fn pending_count(&self, kind: SourceKind) -> usize {
        self.pending(kind).len()
    }

    /// Records that `version` of `key`'s status was delivered (or has nowhere to go).
    pub fn ack(&self, key: &str, version: u64) {
        if let Ok(mut a) = self.acked.lock() {
            let v = a.entry(key.to_owned()).or_default();
            *v = (*v).max(version);
        }
    }

    /// Status changes recorded since start (every pod, static ones included).
    pub fn changes(&self) -> u64 {
        self.next_version.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The newest status of one pod (`namespace/name`), if it has one.
    pub fn get(&self, key: &str) -> Option<BoardEntry> {
        self.entries.lock().ok()?.get(key).cloned()
    }

    /// The newest status of every pod, for `lichen status`.
    pub fn all(&self) -> Vec<(String, BoardEntry)> {
        let Ok(e) = self.entries.lock() else { return Vec::new() };
        let mut out: Vec<_> = e.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Waits for the next change.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_newest_status_per_pod_is_pending() {
        let b = StatusBoard::default();
        let s = |phase: &str| PodStatus { phase: Some(phase.into()), ..Default::default() };
        b.set("ns/a", "u1", &PodSource::Api, s("Pending"));
        b.set("ns/a", "u1", &PodSource::Api, s("Running"));
        b.set("ns/f", "u2", &PodSource::File("/x".into()), s("Running"));
        let pending = b.pending(SourceKind::Api);
        assert_eq!(pending.len(), 1, "coalesced, and file pods are not for the API");
        assert_eq!(pending[0].1.status.phase.as_deref(), Some("Running"));
        b.ack("ns/a", pending[0].1.version);
        assert_eq!(b.pending_count(SourceKind::Api), 0);
        b.remove("ns/a", "other-uid");
        b.set("ns/a", "u1", &PodSource::Api, s("Succeeded"));
        assert_eq!(b.pending_count(SourceKind::Api), 1);
    }
}
