//! Pod events as workers see them (`Started`, `BackOff`, `OutOfFuel`, …), queued for whoever
//! reports them. The queue is bounded and never blocks a worker: events are a courtesy to the
//! person running `kubectl describe`, so when the queue is full, as when the API server has been
//! away for long, the newest are dropped and counted rather than holding up a pod.

use crate::store::PodSource;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use jiff::Timestamp;
use tokio::sync::mpsc;

/// How many events wait for the writer at most.
pub const QUEUE: usize = 1024;

/// `Normal` or `Warning`, as the Events API spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    /// Routine progress.
    Normal,
    /// Something the user should look at.
    Warning,
}

impl EventType {
    /// The API's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// One thing that happened to a pod or one of its containers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEvent {
    /// `namespace/name`.
    pub key: String,
    /// The pod's UID.
    pub uid: String,
    /// `spec.containers{name}` or `spec.initContainers{name}`, for container events.
    pub field_path: Option<String>,
    /// Normal or Warning.
    pub kind: EventType,
    /// `Pulled`, `Created`, `Started`, `Killing`, `BackOff`, `Failed`, `OutOfFuel`, …
    pub reason: &'static str,
    /// For `kubectl describe`.
    pub message: String,
    /// When it happened.
    pub at: Timestamp,
}

/// The sending side, cloned into every worker. Events of pods that have no API object (static
/// pods) are not queued: there is nothing to attach them to.
#[derive(Clone, Default)]
pub struct EventRecorder {
    tx: Option<mpsc::Sender<PodEvent>>,
    dropped: Arc<AtomicU64>,
}

impl EventRecorder {
    /// A recorder and the queue it feeds.
    pub fn new() -> (Self, mpsc::Receiver<PodEvent>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (EventRecorder { tx: Some(tx), dropped: Arc::default() }, rx)
    }

    /// A recorder that drops everything (no cluster).
    pub fn disabled() -> Self {
        EventRecorder::default()
    }

    /// Queues an event for a pod from `source`; only API pods have events.
    pub fn emit(&self, source: &PodSource, event: PodEvent) {
        let Some(tx) = &self.tx else { return };
        if !source.is_api() {
            return;
        }
        if tx.try_send(event).is_err() {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            // One line per thousand, not one per event, while the queue is stuck.
            if n % 1000 == 1 {
                tracing::warn!(dropped = n, "event queue full; dropping pod events");
            }
        }
    }

    /// Events dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}
