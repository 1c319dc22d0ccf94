//! The durable outbox for QoS 1 messages ([`TelemetrySpool`]): every message is appended to a sled
//! tree (through the [`StateStore`] seam) before it is sent, and removed only when the broker's
//! PUBACK names it. The session reads it in sequence order, so a reconnect drains it in order.
//!
//! # Group commit
//! Flushing sled after every message costs an fsync each, which an SD card cannot do thousands of
//! times a second. Appends only write to sled's buffers; [`TelemetrySpool::run_committer`] flushes
//! `spool_flush_ms` after the first unflushed append, or at once when `spool_flush_messages` are
//! waiting, whichever comes first. One flush makes every earlier append and removal durable.
//!
//! # What is lost, and what is not
//! - Committed messages survive `kill -9` and power loss, and are sent (again) until acknowledged.
//! - A `kill -9` or power cut loses at most the messages accepted since the last commit (one window).
//! - An acknowledgement whose removal was not committed yet makes the message be sent again after a
//!   restart: delivery is at least once, never at most once.
//! - When the spool holds `spool_max_bytes`, the oldest messages are dropped to make room, counted
//!   in [`SpoolStats::dropped_full`] and logged.
//!
//! The spool never looks at topics or pods. Gateway mode appends messages from the local broker
//! with their own origin byte (see [`SpoolMessage::origin`]), and keeps a second spool in a tree of
//! its own ([`SpoolTree::Local`]) for messages from upstream to the local broker, with the same
//! guarantees.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::store::{SpoolTree, StateStore, StoreError};

/// The version byte that starts every encoded entry.
const FORMAT_V1: u8 = 1;
/// Warnings about dropped messages are logged at most this often.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Where a spooled message came from: a pod's stdout or the node itself, or in gateway mode one of
/// the brokers (which is how the gateway keeps from forwarding a message back where it came from).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Origin {
    /// A module's output line or the node's own telemetry.
    Node = 0,
    /// A message received from a local (gateway) broker.
    LocalBroker = 1,
    /// Gateway mode: a message received from the upstream broker, for the local one.
    Upstream = 2,
}

/// One message as the spool keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolMessage {
    /// The topic it is published on.
    pub topic: String,
    /// 0, 1 (2 is not used yet; the format has room).
    pub qos: u8,
    /// The MQTT retain flag.
    pub retain: bool,
    /// Where it came from.
    pub origin: Origin,
    /// The bytes.
    pub payload: Vec<u8>,
}

/// Why a stored entry could not be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than its header says.
    #[error("spool entry is truncated")]
    Truncated,
    /// Written by a newer Lichen (or damaged).
    #[error("spool entry has unknown format version {0}")]
    Version(u8),
    /// The topic is not UTF-8.
    #[error("spool entry topic is not UTF-8")]
    Topic,
}

impl SpoolMessage {
    /// `[version][qos][flags: bit 0 retain][origin][topic length u16 BE][topic][payload]`.
    pub fn encode(&self) -> Vec<u8> {
        let topic = self.topic.as_bytes();
        let len = topic.len().min(u16::MAX as usize);
        let mut out = Vec::with_capacity(6 + len + self.payload.len());
        out.extend_from_slice(&[FORMAT_V1, self.qos, u8::from(self.retain), self.origin as u8]);
        out.extend_from_slice(&(len as u16).to_be_bytes());
        out.extend_from_slice(&topic[..len]);
        out.extend_from_slice(&self.payload);
        out
    }

    /// Reads an entry written by [`SpoolMessage::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let header = bytes.get(..6).ok_or(DecodeError::Truncated)?;
        if header[0] != FORMAT_V1 {
            return Err(DecodeError::Version(header[0]));
        }
        let len = u16::from_be_bytes([header[4], header[5]]) as usize;
        let topic = bytes.get(6..6 + len).ok_or(DecodeError::Truncated)?;
        let topic = std::str::from_utf8(topic).map_err(|_| DecodeError::Topic)?.to_owned();
        Ok(SpoolMessage {
            topic,
            qos: header[1],
            retain: header[2] & 1 == 1,
            origin: match header[3] {
                1 => Origin::LocalBroker,
                2 => Origin::Upstream,
                _ => Origin::Node,
            },
            payload: bytes[6 + len..].to_vec(),
        })
    }
}

/// The spool's byte budget, as plain arithmetic: what an append must evict first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolAccounting {
    /// `spool_max_bytes`.
    pub budget: u64,
    /// Entries held.
    pub entries: u64,
    /// Their bytes.
    pub bytes: u64,
}

impl SpoolAccounting {
    /// Whether the oldest entry must go before `incoming` more bytes fit. An empty spool always
    /// takes the message (the config keeps payloads far below the budget).
    pub fn must_evict(&self, incoming: u64) -> bool {
        self.entries > 0 && self.bytes + incoming > self.budget
    }

    /// Counts an entry in.
    pub fn added(&mut self, size: u64) {
        self.entries += 1;
        self.bytes += size;
    }

    /// Counts an entry out.
    pub fn removed(&mut self, size: u64) {
        self.entries = self.entries.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(size);
    }
}

/// Counters for logs, `lichen/<node>/telemetry` and tests. Never reset while the agent runs.
#[derive(Debug, Default)]
pub struct SpoolStats {
    accepted: AtomicU64,
    acked: AtomicU64,
    dropped_full: AtomicU64,
    dropped_corrupt: AtomicU64,
    commits: AtomicU64,
    write_errors: AtomicU64,
}

/// A snapshot of the spool's state and counters.
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct SpoolSnapshot {
    /// Messages waiting for an acknowledgement.
    pub entries: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Messages appended since the agent started.
    pub accepted: u64,
    /// Messages the broker acknowledged.
    pub acked: u64,
    /// Oldest messages dropped because the spool was full.
    pub dropped_full: u64,
    /// Entries that could not be read back (damaged) and were removed.
    pub dropped_corrupt: u64,
    /// Group commits (flushes) done.
    pub commits: u64,
    /// Appends, removals or flushes the disk refused.
    pub write_errors: u64,
}

/// Errors the spool reports to its callers.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The store refused the write; the message was not spooled.
    #[error("cannot spool the message: {0}")]
    Store(#[from] StoreError),
}

struct SpoolState {
    accounting: SpoolAccounting,
    next_seq: u64,
    /// Appends and removals not yet flushed, and when the first of them happened.
    dirty: u64,
    dirty_since: Option<Instant>,
    last_drop_log: Option<Instant>,
    drops_since_log: u64,
}

/// The durable outbox. Cheap to share (`Arc`); appends come from any task.
pub struct TelemetrySpool {
    store: Arc<dyn StateStore>,
    tree: SpoolTree,
    state: Mutex<SpoolState>,
    flush_after: Duration,
    flush_messages: u64,
    /// Wakes the session: there is something new to send.
    appended: Notify,
    /// Wakes the committer: something waits to be flushed (or a batch is full).
    dirty: Notify,
    /// The number of group commits done, for those who wait for one ([`TelemetrySpool::committed`]).
    commits: tokio::sync::watch::Sender<u64>,
    stats: SpoolStats,
}

impl TelemetrySpool {
    /// Opens the spool in `store`, counting what an earlier run left in it.
    pub fn open(
        store: Arc<dyn StateStore>,
        budget: u64,
        flush_after: Duration,
        flush_messages: u32,
    ) -> Result<Arc<Self>, SpoolError> {
        Self::open_tree(store, SpoolTree::Upstream, budget, flush_after, flush_messages)
    }

    /// [`TelemetrySpool::open`] for either tree; gateway mode's spool towards the local broker is
    /// [`SpoolTree::Local`].
    pub fn open_tree(
        store: Arc<dyn StateStore>,
        tree: SpoolTree,
        budget: u64,
        flush_after: Duration,
        flush_messages: u32,
    ) -> Result<Arc<Self>, SpoolError> {
        let summary = store.spool_summary(tree)?;
        if summary.entries > 0 {
            tracing::info!(
                messages = summary.entries,
                bytes = summary.bytes,
                spool = tree.name(),
                "MQTT spool holds messages from before the restart; they are sent first"
            );
        }
        Ok(Arc::new(TelemetrySpool {
            store,
            tree,
            state: Mutex::new(SpoolState {
                accounting: SpoolAccounting { budget, entries: summary.entries, bytes: summary.bytes },
                next_seq: summary.last_seq.map_or(0, |s| s.saturating_add(1)),
                dirty: 0,
                dirty_since: None,
                last_drop_log: None,
                drops_since_log: 0,
            }),
            flush_after,
            flush_messages: u64::from(flush_messages.max(1)),
            appended: Notify::new(),
            dirty: Notify::new(),
            commits: tokio::sync::watch::channel(0).0,
            stats: SpoolStats::default(),
        }))
    }

    /// Appends a message, dropping the oldest ones first if the budget is reached. The message is
    /// durable after the next group commit. Returns its sequence number.
    pub fn append(&self, message: &SpoolMessage) -> Result<u64, SpoolError> {
        let entry = message.encode();
        let size = entry.len() as u64;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut evicted = 0u64;
        while st.accounting.must_evict(size) {
            let Some((seq, _)) = self.store.spool_range(self.tree, None, 1)?.into_iter().next() else {
                // The tree is empty although the count says otherwise: trust the tree.
                st.accounting.entries = 0;
                st.accounting.bytes = 0;
                break;
            };
            if let Some(old) = self.store.spool_remove(self.tree, seq)? {
                st.accounting.removed(old as u64);
            }
            evicted += 1;
        }
        let seq = st.next_seq;
        if let Err(e) = self.store.spool_put(self.tree, seq, &entry) {
            self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
            return Err(e.into());
        }
        st.next_seq += 1;
        st.accounting.added(size);
        self.mark_dirty(&mut st, 1 + evicted);
        if evicted > 0 {
            self.stats.dropped_full.fetch_add(evicted, Ordering::Relaxed);
            st.drops_since_log += evicted;
            let due = st.last_drop_log.is_none_or(|t| t.elapsed() >= DROP_LOG_INTERVAL);
            if due {
                tracing::warn!(
                    dropped = st.drops_since_log,
                    dropped_total = self.stats.dropped_full.load(Ordering::Relaxed),
                    budget = st.accounting.budget,
                    spool = self.tree.name(),
                    "MQTT spool is full (the broker has been away): dropping the oldest messages"
                );
                st.last_drop_log = Some(Instant::now());
                st.drops_since_log = 0;
            }
        }
        drop(st);
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        self.appended.notify_one();
        Ok(seq)
    }

    fn mark_dirty(&self, st: &mut SpoolState, n: u64) {
        st.dirty += n;
        if st.dirty_since.is_none() {
            st.dirty_since = Some(Instant::now());
            self.dirty.notify_one();
        } else if st.dirty >= self.flush_messages {
            self.dirty.notify_one();
        }
    }

    /// Removes a message the broker acknowledged (made durable by the next commit).
    pub fn ack(&self, seq: u64) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match self.store.spool_remove(self.tree, seq) {
            Ok(Some(size)) => {
                st.accounting.removed(size as u64);
                self.mark_dirty(&mut st, 1);
                self.stats.acked.fetch_add(1, Ordering::Relaxed);
            }
            // Dropped as the oldest while it was in flight: nothing left to remove.
            Ok(None) => {}
            Err(e) => {
                self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, seq, "cannot remove an acknowledged message from the MQTT spool; it may be sent again");
            }
        }
    }

    /// Up to `limit` messages after `after` (from the oldest if `None`), in order. Entries that
    /// cannot be decoded are removed and counted, not sent.
    pub fn next_batch(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, SpoolMessage)>, SpoolError> {
        let entries = self.store.spool_range(self.tree, after, limit)?;
        let mut out = Vec::with_capacity(entries.len());
        for (seq, bytes) in entries {
            match SpoolMessage::decode(&bytes) {
                Ok(m) => out.push((seq, m)),
                Err(e) => {
                    tracing::warn!(seq, error = %e, "dropping an unreadable MQTT spool entry");
                    self.stats.dropped_corrupt.fetch_add(1, Ordering::Relaxed);
                    let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                    if let Ok(Some(size)) = self.store.spool_remove(self.tree, seq) {
                        st.accounting.removed(size as u64);
                        self.mark_dirty(&mut st, 1);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Which tree it is.
    pub fn tree(&self) -> SpoolTree {
        self.tree
    }

    /// Waits until something is appended after this call (or an append since the last wake).
    pub async fn appended(&self) {
        self.appended.notified().await;
    }

    /// The counters and current size.
    pub fn snapshot(&self) -> SpoolSnapshot {
        let acc = self.state.lock().map(|s| s.accounting).unwrap_or_else(|p| p.into_inner().accounting);
        let s = &self.stats;
        SpoolSnapshot {
            entries: acc.entries,
            bytes: acc.bytes,
            accepted: s.accepted.load(Ordering::Relaxed),
            acked: s.acked.load(Ordering::Relaxed),
            dropped_full: s.dropped_full.load(Ordering::Relaxed),
            dropped_corrupt: s.dropped_corrupt.load(Ordering::Relaxed),
            commits: s.commits.load(Ordering::Relaxed),
            write_errors: s.write_errors.load(Ordering::Relaxed),
        }
    }

    /// Flushes now if anything is unflushed. Blocking (an fsync): call from a blocking thread.
    pub fn commit(&self) {
        let dirty = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.dirty_since = None;
            std::mem::take(&mut st.dirty)
        };
        if dirty == 0 {
            return;
        }
        match self.store.flush() {
            Ok(()) => {
                let n = self.stats.commits.fetch_add(1, Ordering::Relaxed) + 1;
                self.commits.send_replace(n);
            }
            Err(e) => {
                self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "cannot flush the MQTT spool; messages since the last commit are not yet durable");
                // Try again with the next window.
                let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                st.dirty += dirty;
                st.dirty_since.get_or_insert_with(Instant::now);
            }
        }
    }

    /// Waits until at least `n` group commits are done (what is appended before a commit starts is
    /// durable once it ends).
    pub async fn committed(&self, n: u64) {
        let mut rx = self.commits.subscribe();
        // The sender lives as long as `self`, so the wait cannot fail.
        let _ = rx.wait_for(|c| *c >= n).await;
    }

    /// The group committer: flushes a window after the first unflushed write, or when a batch is
    /// full; flushes once more when `cancel` fires, so a clean shutdown loses nothing.
    pub async fn run_committer(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            let wait = {
                let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                match st.dirty_since {
                    None => None,
                    Some(_) if st.dirty >= self.flush_messages => Some(Duration::ZERO),
                    Some(t) => Some(self.flush_after.saturating_sub(t.elapsed())),
                }
            };
            let cancelled = match wait {
                None => tokio::select! {
                    _ = cancel.cancelled() => true,
                    _ = self.dirty.notified() => false,
                },
                Some(d) if d.is_zero() => cancel.is_cancelled(),
                Some(d) => tokio::select! {
                    _ = cancel.cancelled() => true,
                    _ = tokio::time::sleep(d) => false,
                    // A full batch cuts the window short.
                    _ = self.dirty.notified() => false,
                },
            };
            let due = {
                let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                st.dirty_since
                    .is_some_and(|t| t.elapsed() >= self.flush_after || st.dirty >= self.flush_messages)
            };
            if due || cancelled {
                let me = self.clone();
                let _ = tokio::task::spawn_blocking(move || me.commit()).await;
            }
            if cancelled {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;

    fn msg(topic: &str, payload: &[u8]) -> SpoolMessage {
        SpoolMessage {
            topic: topic.into(),
            qos: 1,
            retain: false,
            origin: Origin::Node,
            payload: payload.to_vec(),
        }
    }

    #[test]
    fn entries_round_trip_and_damage_is_named() {
        let m = SpoolMessage { retain: true, origin: Origin::LocalBroker, ..msg("a/b", b"\0\xffbinary") };
        assert_eq!(SpoolMessage::decode(&m.encode()), Ok(m.clone()));
        let bytes = m.encode();
        assert_eq!(SpoolMessage::decode(&bytes[..4]), Err(DecodeError::Truncated));
        assert_eq!(SpoolMessage::decode(&bytes[..7]), Err(DecodeError::Truncated));
        let mut newer = bytes.clone();
        newer[0] = 9;
        assert_eq!(SpoolMessage::decode(&newer), Err(DecodeError::Version(9)));
    }

    #[test]
    fn accounting_evicts_only_what_the_budget_needs() {
        let mut a = SpoolAccounting { budget: 100, entries: 0, bytes: 0 };
        assert!(!a.must_evict(500), "an empty spool always takes the message");
        a.added(60);
        assert!(!a.must_evict(40));
        assert!(a.must_evict(41));
        a.added(40);
        a.removed(60);
        assert_eq!((a.entries, a.bytes), (1, 40));
        a.removed(1000);
        a.removed(1);
        assert_eq!((a.entries, a.bytes), (0, 0), "never below zero");
    }

    #[test]
    fn a_full_spool_drops_the_oldest_counts_it_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn StateStore> = Arc::new(SledStore::open(dir.path()).expect("store"));
        let one = msg("t", &[7u8; 90]).encode().len() as u64;
        let spool =
            TelemetrySpool::open(store.clone(), one * 10, Duration::from_millis(5), 8).expect("spool");
        for i in 0..25u8 {
            spool.append(&msg("t", &[i; 90])).expect("append");
        }
        let snap = spool.snapshot();
        assert_eq!((snap.entries, snap.accepted, snap.dropped_full), (10, 25, 15));
        assert_eq!(snap.bytes, one * 10);
        let batch = spool.next_batch(None, 100).expect("batch");
        assert_eq!(batch.first().map(|(s, m)| (*s, m.payload[0])), Some((15, 15)), "the newest ten are kept");
        spool.ack(15);
        spool.ack(15);
        spool.ack(16);
        assert_eq!(spool.snapshot().acked, 2, "a second ack of the same message counts nothing");
        spool.commit();
        assert_eq!(spool.snapshot().commits, 1);
        let seqs: Vec<u64> =
            spool.next_batch(Some(20), 100).expect("batch").into_iter().map(|(s, _)| s).collect();
        assert_eq!(seqs, vec![21, 22, 23, 24]);
        drop(spool);

        let reopened = TelemetrySpool::open(store, one * 10, Duration::from_millis(5), 8).expect("reopen");
        let snap = reopened.snapshot();
        assert_eq!((snap.entries, snap.bytes), (8, one * 8));
        assert_eq!(reopened.append(&msg("t", b"x")).expect("append"), 25, "sequence numbers go on");
    }

    #[test]
    fn unreadable_entries_are_removed_and_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn StateStore> = Arc::new(SledStore::open(dir.path()).expect("store"));
        store.spool_put(SpoolTree::Upstream, 0, b"\x09garbage").expect("put");
        store.spool_put(SpoolTree::Upstream, 1, &msg("ok", b"1").encode()).expect("put");
        let spool = TelemetrySpool::open(store, 1 << 20, Duration::from_millis(5), 8).expect("spool");
        let batch = spool.next_batch(None, 10).expect("batch");
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].1.topic, "ok");
        let snap = spool.snapshot();
        assert_eq!((snap.dropped_corrupt, snap.entries), (1, 1));
    }

    #[tokio::test]
    async fn the_committer_flushes_within_the_window_and_on_shutdown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn StateStore> = Arc::new(SledStore::open(dir.path()).expect("store"));
        let spool = TelemetrySpool::open(store, 1 << 20, Duration::from_millis(20), 1000).expect("spool");
        let cancel = CancellationToken::new();
        let task = tokio::spawn(spool.clone().run_committer(cancel.clone()));
        for i in 0..100u8 {
            spool.append(&msg("t", &[i])).expect("append");
        }
        tokio::time::timeout(Duration::from_secs(5), spool.committed(1))
            .await
            .expect("no commit within the window");
        assert_eq!(spool.snapshot().commits, 1, "one flush for the whole window");
        spool.append(&msg("t", b"last")).expect("append");
        cancel.cancel();
        task.await.expect("committer");
        assert_eq!(spool.snapshot().commits, 2, "the last window is flushed on shutdown");
    }
}
