//! Gateway mode's counters: what `lichen status`, node telemetry and the metrics endpoint show of
//! it. The gateway counts; the bridge holds a handle so that those readers, which know the
//! bridge, find the counters without knowing the gateway task.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::telemetry::spool::TelemetrySpool;

/// The counts, kept by the gateway's two directions and read by [`GatewayCounters::snapshot`].
#[derive(Debug, Default)]
pub(super) struct GatewayStats {
    pub(super) connected: AtomicBool,
    pub(super) forwarded_up: AtomicU64,
    pub(super) forwarded_down: AtomicU64,
    pub(super) dropped_down: AtomicU64,
    pub(super) loops_suppressed: AtomicU64,
}

/// What `lichen status` shows of gateway mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewaySnapshot {
    /// Whether the local broker connection is up.
    pub connected: bool,
    /// Local messages handed upstream (spooled, or sent for QoS 0).
    pub forwarded_up: u64,
    /// Upstream messages the local broker accepted (published; QoS 1 acknowledged).
    pub forwarded_down: u64,
    /// Upstream messages waiting in the spool for the local broker.
    pub spooled_down: u64,
    /// Upstream messages dropped: the oldest when the down spool was full, or ones the disk refused.
    pub dropped_down: u64,
    /// Messages recognised as the gateway's own coming back, and not forwarded again.
    pub loops_suppressed: u64,
}

/// A handle on the gateway's counters, for status reports.
#[derive(Clone)]
pub struct GatewayCounters(pub(super) Arc<GatewayStats>, pub(super) Arc<TelemetrySpool>);

impl GatewayCounters {
    /// The counters now.
    pub fn snapshot(&self) -> GatewaySnapshot {
        let s = &self.0;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let spool = self.1.snapshot();
        GatewaySnapshot {
            connected: s.connected.load(Ordering::Relaxed),
            forwarded_up: l(&s.forwarded_up),
            forwarded_down: l(&s.forwarded_down),
            spooled_down: spool.entries,
            dropped_down: l(&s.dropped_down) + spool.dropped_full + spool.dropped_corrupt,
            loops_suppressed: l(&s.loops_suppressed),
        }
    }
}
