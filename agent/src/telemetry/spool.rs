//! The durable outbox for QoS 1 messages ([`TelemetrySpool`]): every message is appended to a sled
//! tree (through the [`StateStore`] seam) before it is sent, and removed only when the broker's
//! PUBACK names it. The session reads it in sequence order, so a reconnect drains it in order.
//!
//! # Group commit
//! Flushing sled after every message costs an fsync each, which an SD card cannot do thousands of
//! times a second. [`TelemetrySpool::run_committer`] commits `spool_flush_ms` after the first
//! uncommitted append, or at once when `spool_flush_messages` are waiting, whichever comes first.
//! One commit makes every earlier append and removal durable.
//!
//! # Write-behind, in commit groups
//! Until its commit an appended message is kept in memory only: sled's own buffers would not
//! survive a `kill -9` either, so this loses nothing the group commit promised. A commit writes
//! the messages still unacknowledged into the tree as one value, a commit group keyed by its first
//! sequence number, and flushes; the group is removed once the broker has acknowledged all of it.
//! A message acknowledged before its commit (on a LAN, most of them) never touches the disk, and
//! the others cost a share of one insert and one removal. Per message, sled's insert and removal
//! were half of the agent's CPU time; the SD card is spared the writes too.
//! [`SpoolSnapshot::written`] counts what reached the disk.
//!
//! Every message in the tree has a lower sequence number than every one in memory (a commit moves
//! all of them), so reading the tree and then memory reads the spool in order. The spool indexes
//! the groups (first and last sequence number, what is still unacknowledged) when it opens, and
//! keeps the entries of recent groups in a small read cache: a group committed before the session
//! could send it, or one read back after a restart, is decoded from the disk once.
//!
//! # What is lost, and what is not
//! - Committed messages survive `kill -9` and power loss, and are sent (again) until acknowledged.
//! - A `kill -9` or power cut loses at most the messages accepted since the last commit (one window).
//! - An acknowledgement whose removal was not committed yet makes the message be sent again after a
//!   restart: delivery is at least once, never at most once.
//! - Acknowledgements of part of a commit group are not kept across a restart: those messages are
//!   sent again.
//! - When the spool holds `spool_max_bytes`, the oldest messages are dropped to make room (a commit
//!   group as a whole), counted in [`SpoolStats::dropped_full`] and logged.
//!
//! The spool never looks at topics or pods. Gateway mode appends messages from the local broker
//! with their own origin byte (see [`SpoolMessage::origin`]), and keeps a second spool in a tree of
//! its own ([`SpoolTree::Local`]) for messages from upstream to the local broker, with the same
//! guarantees.

use std::collections::{BTreeMap, HashSet};
use std::ops::Bound;
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
    /// A commit group's messages are out of order, or it holds none or more than it says.
    #[error("spool commit group is damaged")]
    Group,
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
    written: AtomicU64,
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
    /// Group commits done.
    pub commits: u64,
    /// Messages written to the disk: those still unacknowledged at their commit (see the module's
    /// "Write-behind").
    #[serde(default)]
    pub written: u64,
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

/// A commit group's entries (sequence number, encoded message), shared with the read cache.
type Entries = Arc<[(u64, Vec<u8>)]>;

/// One commit group in the tree, as the spool keeps track of it (its messages stay on the disk).
struct Group {
    /// Its highest sequence number (its key is its lowest).
    last: u64,
    /// Messages in it not yet acknowledged.
    live: u64,
    /// Its entries' bytes (what the budget counts), until the whole group is removed.
    bytes: u64,
    /// Those acknowledged since the agent started (lost with a restart, which then sends them
    /// again: at least once).
    acked: HashSet<u64>,
}

/// A commit writes groups of at most this many bytes of entries (a larger message goes alone), so
/// neither a write nor a read of one group, nor a full spool's drop of its oldest, is large.
const GROUP_BYTES: u64 = 256 << 10;

/// Bytes of committed entries kept in memory for reading (a group committed before the session
/// could send it, or read back after a restart, is then read from the disk once).
const READ_CACHE_BYTES: u64 = 256 << 10;

struct SpoolState {
    accounting: SpoolAccounting,
    next_seq: u64,
    /// The tree's commit groups by their first sequence number.
    groups: BTreeMap<u64, Group>,
    /// The read cache ([`READ_CACHE_BYTES`]): entries of groups by key, and their bytes.
    cached: BTreeMap<u64, Entries>,
    cached_bytes: u64,
    /// Appended since the last commit and not yet acknowledged, encoded: every sequence number
    /// from `pending_from` on lives here, not in the tree.
    pending: BTreeMap<u64, Vec<u8>>,
    pending_from: u64,
    /// Appends and removals not yet committed, and when the first of them happened.
    dirty: u64,
    dirty_since: Option<Instant>,
    /// Whether the tree changed since the last flush (a commit that only drops acknowledged
    /// messages from memory needs no fsync).
    tree_changed: bool,
    last_drop_log: Option<Instant>,
    drops_since_log: u64,
}

impl SpoolState {
    /// Puts a group's entries in the read cache, making room by dropping the cache of older
    /// groups first (a reader goes through the spool in order).
    /// A group's bytes are its entries' bytes ([`Group::bytes`]), which is what the cache counts.
    fn cache(&mut self, key: u64, entries: Entries) {
        let Some(size) = self.groups.get(&key).map(|g| g.bytes) else { return };
        if size > READ_CACHE_BYTES {
            return;
        }
        self.uncache(key);
        while self.cached_bytes + size > READ_CACHE_BYTES {
            let Some(old) = self.cached.keys().next().copied() else { break };
            self.uncache(old);
        }
        self.cached.insert(key, entries);
        self.cached_bytes += size;
    }

    /// Drops a group's entries from the read cache.
    fn uncache(&mut self, key: u64) {
        if self.cached.remove(&key).is_some()
            && let Some(g) = self.groups.get(&key)
        {
            self.cached_bytes -= g.bytes;
        }
    }

    /// Forgets a group removed from the tree.
    fn forget(&mut self, key: u64) -> Option<Group> {
        self.uncache(key);
        let g = self.groups.remove(&key)?;
        self.accounting.entries = self.accounting.entries.saturating_sub(g.live);
        self.accounting.bytes = self.accounting.bytes.saturating_sub(g.bytes);
        self.tree_changed = true;
        Some(g)
    }
}

/// The version byte of a commit group: `[2][count u32 BE]`, then per message `[seq u64 BE][length
/// u32 BE]` and the entry as [`SpoolMessage::encode`] writes it. A value starting with
/// [`FORMAT_V1`] is one message whose sequence number is its key (written before commit groups).
const FORMAT_GROUP: u8 = 2;

fn encode_group(entries: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let size: usize = entries.iter().map(|(_, e)| 12 + e.len()).sum();
    let mut out = Vec::with_capacity(5 + size);
    out.push(FORMAT_GROUP);
    out.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    for (seq, e) in entries {
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&(e.len() as u32).to_be_bytes());
        out.extend_from_slice(e);
    }
    out
}

/// Walks one tree value under `key`: each message's sequence number and entry, in order. An error
/// may come after some messages were walked: the value as a whole is damaged.
fn walk_group<'a>(key: u64, value: &'a [u8], mut f: impl FnMut(u64, &'a [u8])) -> Result<(), DecodeError> {
    match value.first() {
        Some(&FORMAT_V1) => {
            f(key, value);
            return Ok(());
        }
        Some(&FORMAT_GROUP) => {}
        Some(&v) => return Err(DecodeError::Version(v)),
        None => return Err(DecodeError::Truncated),
    }
    let count = value.get(1..5).ok_or(DecodeError::Truncated)?;
    let count = u32::from_be_bytes([count[0], count[1], count[2], count[3]]);
    let mut rest = &value[5..];
    let mut prev = None;
    for _ in 0..count {
        let (seq, len) = match rest.get(..12) {
            Some(&[a, b, c, d, e, f, g, h, l0, l1, l2, l3]) => {
                (u64::from_be_bytes([a, b, c, d, e, f, g, h]), u32::from_be_bytes([l0, l1, l2, l3]) as usize)
            }
            _ => return Err(DecodeError::Truncated),
        };
        let entry = rest.get(12..12 + len).ok_or(DecodeError::Truncated)?;
        // In order, from the key on: anything else is damage.
        if seq < key || prev.is_some_and(|p| seq <= p) {
            return Err(DecodeError::Group);
        }
        prev = Some(seq);
        f(seq, entry);
        rest = &rest[12 + len..];
    }
    if prev.is_none() || !rest.is_empty() {
        return Err(DecodeError::Group);
    }
    Ok(())
}

/// The messages of one tree value under `key`, in order.
fn decode_group(key: u64, value: &[u8]) -> Result<Vec<(u64, Vec<u8>)>, DecodeError> {
    let mut out = Vec::new();
    walk_group(key, value, |seq, entry| out.push((seq, entry.to_vec())))?;
    Ok(out)
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

/// Tree values read at a time when the spool opens (at most 2 MiB of commit groups).
const OPEN_PAGE: usize = 8;

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
    /// [`SpoolTree::Local`]. Reads the tree once, a page at a time, to index its commit groups;
    /// values that cannot be read are removed and counted.
    pub fn open_tree(
        store: Arc<dyn StateStore>,
        tree: SpoolTree,
        budget: u64,
        flush_after: Duration,
        flush_messages: u32,
    ) -> Result<Arc<Self>, SpoolError> {
        let mut groups = BTreeMap::new();
        let mut accounting = SpoolAccounting { budget, entries: 0, bytes: 0 };
        let mut damaged = Vec::new();
        let mut after = None;
        loop {
            let page = store.spool_range(tree, after, OPEN_PAGE)?;
            if page.is_empty() {
                break;
            }
            for (key, value) in page {
                after = Some(key);
                let (mut last, mut live, mut bytes) = (key, 0u64, 0u64);
                let walked = walk_group(key, &value, |seq, entry| {
                    last = seq;
                    live += 1;
                    bytes += entry.len() as u64;
                });
                match walked {
                    Ok(()) => {
                        accounting.entries += live;
                        accounting.bytes += bytes;
                        groups.insert(key, Group { last, live, bytes, acked: HashSet::new() });
                    }
                    Err(e) => damaged.push((key, e)),
                }
            }
        }
        let stats = SpoolStats::default();
        for (key, e) in &damaged {
            tracing::warn!(key, error = %e, spool = tree.name(), "dropping an unreadable MQTT spool entry");
            store.spool_remove(tree, *key)?;
            stats.dropped_corrupt.fetch_add(1, Ordering::Relaxed);
        }
        if accounting.entries > 0 {
            tracing::info!(
                messages = accounting.entries,
                bytes = accounting.bytes,
                spool = tree.name(),
                "MQTT spool holds messages from before the restart; they are sent first"
            );
        }
        // Above every key, and above every message of the last group.
        let next_seq = groups.last_key_value().map_or(0, |(_, g)| g.last.saturating_add(1));
        let spool = TelemetrySpool {
            store,
            tree,
            state: Mutex::new(SpoolState {
                accounting,
                next_seq,
                groups,
                cached: BTreeMap::new(),
                cached_bytes: 0,
                pending: BTreeMap::new(),
                pending_from: next_seq,
                dirty: 0,
                dirty_since: None,
                tree_changed: false,
                last_drop_log: None,
                drops_since_log: 0,
            }),
            flush_after,
            flush_messages: u64::from(flush_messages.max(1)),
            appended: Notify::new(),
            dirty: Notify::new(),
            commits: tokio::sync::watch::channel(0).0,
            stats,
        };
        if !damaged.is_empty() {
            let mut st = spool.state.lock().unwrap_or_else(|p| p.into_inner());
            st.tree_changed = true;
            spool.mark_dirty(&mut st, damaged.len() as u64);
        }
        Ok(Arc::new(spool))
    }

    /// Appends a message, dropping the oldest ones first if the budget is reached. The message is
    /// durable after the next group commit. Returns its sequence number.
    pub fn append(&self, message: &SpoolMessage) -> Result<u64, SpoolError> {
        let entry = message.encode();
        let size = entry.len() as u64;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut evicted = 0u64;
        while st.accounting.must_evict(size) {
            // The oldest is in the tree if the tree holds any (all of it is older than memory); a
            // commit group goes as a whole.
            if let Some(key) = st.groups.first_key_value().map(|(k, _)| *k) {
                self.store.spool_remove(self.tree, key)?;
                if let Some(g) = st.forget(key) {
                    evicted += g.live;
                }
            } else if let Some((_, old)) = st.pending.pop_first() {
                st.accounting.removed(old.len() as u64);
                evicted += 1;
            } else {
                // Nothing is held although the count says otherwise: trust the contents.
                st.accounting.entries = 0;
                st.accounting.bytes = 0;
                break;
            }
        }
        let seq = st.next_seq;
        st.pending.insert(seq, entry);
        st.next_seq += 1;
        st.accounting.added(size);
        self.mark_dirty(&mut st, 1 + u64::from(evicted > 0));
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

    /// Removes a message the broker acknowledged (made durable by the next commit): from memory if
    /// it is not committed yet, else its commit group once all of the group is acknowledged.
    pub fn ack(&self, seq: u64) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if self.ack_locked(&mut st, seq) {
            self.stats.acked.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// [`TelemetrySpool::ack`] under the lock; whether `seq` was held.
    fn ack_locked(&self, st: &mut SpoolState, seq: u64) -> bool {
        if seq >= st.pending_from {
            // Not committed yet: it never reaches the disk. (Absent: dropped as the oldest while
            // it was in flight.)
            let Some(entry) = st.pending.remove(&seq) else { return false };
            st.accounting.removed(entry.len() as u64);
            return true;
        }
        let Some((&key, g)) = st.groups.range_mut(..=seq).next_back() else { return false };
        // Beyond the group: its own group was dropped as the oldest while it was in flight.
        if seq > g.last || g.live == 0 || !g.acked.insert(seq) {
            return false;
        }
        g.live -= 1;
        let done = g.live == 0;
        st.accounting.entries = st.accounting.entries.saturating_sub(1);
        if done {
            match self.store.spool_remove(self.tree, key) {
                Ok(_) => {
                    st.forget(key);
                    self.mark_dirty(st, 1);
                }
                Err(e) => {
                    self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, key, "cannot remove acknowledged messages from the MQTT spool; they may be sent again");
                }
            }
        }
        true
    }

    /// A group's entries: from the read cache, or from the tree (then cached). `None` if it is gone
    /// or unreadable (then removed and counted).
    fn group_entries(&self, st: &mut SpoolState, key: u64) -> Result<Option<Entries>, SpoolError> {
        if let Some(c) = st.cached.get(&key).cloned() {
            return Ok(Some(c));
        }
        let value = match self.store.spool_range(self.tree, key.checked_sub(1), 1)?.into_iter().next() {
            Some((k, v)) if k == key => v,
            _ => {
                st.forget(key);
                return Ok(None);
            }
        };
        match decode_group(key, &value) {
            Ok(entries) => {
                let entries: Entries = entries.into();
                st.cache(key, entries.clone());
                Ok(Some(entries))
            }
            Err(e) => {
                tracing::warn!(key, error = %e, spool = self.tree.name(), "dropping an unreadable MQTT spool entry");
                self.store.spool_remove(self.tree, key)?;
                if let Some(g) = st.forget(key) {
                    self.stats.dropped_corrupt.fetch_add(g.live.max(1), Ordering::Relaxed);
                }
                self.mark_dirty(st, 1);
                Ok(None)
            }
        }
    }

    /// Up to `limit` messages after `after` (from the oldest if `None`), in order, leaving out
    /// those acknowledged. Entries that cannot be decoded are removed and counted, not sent.
    pub fn next_batch(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, SpoolMessage)>, SpoolError> {
        let start = match after {
            Some(seq) => match seq.checked_add(1) {
                Some(s) => s,
                None => return Ok(Vec::new()),
            },
            None => 0,
        };
        // Under the lock, so a commit cannot move entries from memory to the tree between the two
        // reads.
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        if start < st.pending_from {
            // The group holding `start`, then the ones after it.
            let mut next =
                st.groups.range(..=start).next_back().filter(|(_, g)| g.last >= start).map(|(k, _)| *k);
            next = next.or_else(|| st.groups.range(start..).next().map(|(k, _)| *k));
            while let Some(key) = next {
                if out.len() >= limit {
                    break;
                }
                next = st.groups.range((Bound::Excluded(key), Bound::Unbounded)).next().map(|(k, _)| *k);
                let Some(entries) = self.group_entries(&mut st, key)? else { continue };
                for (seq, bytes) in entries.iter().filter(|(s, _)| *s >= start) {
                    if out.len() >= limit {
                        break;
                    }
                    if st.groups.get(&key).is_some_and(|g| g.acked.contains(seq)) {
                        continue;
                    }
                    match SpoolMessage::decode(bytes) {
                        Ok(m) => out.push((*seq, m)),
                        Err(e) => {
                            tracing::warn!(seq, error = %e, "dropping an unreadable MQTT spool entry");
                            self.stats.dropped_corrupt.fetch_add(1, Ordering::Relaxed);
                            // Counted out of its group as if acknowledged; `dropped_corrupt`
                            // counts it, the `acked` counter does not.
                            self.ack_locked(&mut st, *seq);
                        }
                    }
                }
            }
        }
        let room = limit.saturating_sub(out.len());
        // Entries in memory were encoded here and decode (an unreadable one would be a bug).
        out.extend(
            st.pending
                .range(start.max(st.pending_from)..)
                .take(room)
                .filter_map(|(seq, bytes)| SpoolMessage::decode(bytes).ok().map(|m| (*seq, m))),
        );
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
            written: s.written.load(Ordering::Relaxed),
            write_errors: s.write_errors.load(Ordering::Relaxed),
        }
    }

    /// Commits now if anything is uncommitted: writes the messages still in memory into the tree as
    /// commit groups and flushes it. Blocking (an fsync): call from a blocking thread.
    pub fn commit(&self) {
        let (dirty, flush) = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.dirty_since = None;
            let dirty = std::mem::take(&mut st.dirty);
            // Written under the lock, so the tree never lacks an entry memory has let go; in groups
            // of at most GROUP_BYTES, in order.
            let mut written = 0u64;
            let mut rest = std::mem::take(&mut st.pending).into_iter().peekable();
            while rest.peek().is_some() {
                let mut entries = Vec::new();
                let mut bytes = 0u64;
                while let Some((seq, e)) =
                    rest.next_if(|(_, e)| entries.is_empty() || bytes + e.len() as u64 <= GROUP_BYTES)
                {
                    bytes += e.len() as u64;
                    entries.push((seq, e));
                }
                let (key, last) = match (entries.first(), entries.last()) {
                    (Some((k, _)), Some((l, _))) => (*k, *l),
                    _ => break,
                };
                if let Err(e) = self.store.spool_put(self.tree, key, &encode_group(&entries)) {
                    self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "cannot write the MQTT spool; its newest messages stay in memory until the next commit");
                    // The tree holds everything before `key`; memory keeps the rest.
                    st.pending = entries.into_iter().chain(rest).collect();
                    st.pending_from = key;
                    st.dirty += st.pending.len() as u64;
                    st.dirty_since.get_or_insert_with(Instant::now);
                    break;
                }
                written += entries.len() as u64;
                let live = entries.len() as u64;
                // The accounting already holds these bytes (counted when appended).
                st.groups.insert(key, Group { last, live, bytes, acked: HashSet::new() });
                // Most likely read next (committed before the session could send it).
                st.cache(key, entries.into());
                st.pending_from = last + 1;
                st.tree_changed = true;
            }
            self.stats.written.fetch_add(written, Ordering::Relaxed);
            (dirty, std::mem::take(&mut st.tree_changed))
        };
        if dirty == 0 && !flush {
            return;
        }
        if flush && let Err(e) = self.store.flush() {
            self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "cannot flush the MQTT spool; messages since the last commit are not yet durable");
            // Try again with the next window.
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.dirty += dirty.max(1);
            st.tree_changed = true;
            st.dirty_since.get_or_insert_with(Instant::now);
            return;
        }
        let n = self.stats.commits.fetch_add(1, Ordering::Relaxed) + 1;
        self.commits.send_replace(n);
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

    /// The values in the upstream tree (commit groups, or single messages).
    fn values(store: &Arc<dyn StateStore>) -> usize {
        store.spool_range(SpoolTree::Upstream, None, usize::MAX).expect("range").len()
    }

    fn seqs(batch: Vec<(u64, SpoolMessage)>) -> Vec<u64> {
        batch.into_iter().map(|(s, _)| s).collect()
    }

    #[test]
    fn a_message_acknowledged_before_its_commit_never_reaches_the_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn StateStore> = Arc::new(SledStore::open(dir.path()).expect("store"));
        let spool = TelemetrySpool::open(store.clone(), 1 << 20, Duration::from_millis(5), 8).expect("spool");
        for i in 0..10u8 {
            spool.append(&msg("t", &[i])).expect("append");
        }
        for seq in [0, 1, 2, 5, 7, 9] {
            spool.ack(seq);
        }
        spool.commit();
        let snap = spool.snapshot();
        assert_eq!((snap.entries, snap.acked, snap.written, snap.commits), (4, 6, 4, 1));
        assert_eq!(values(&store), 1, "one commit group");
        drop(spool);
        let reopened = TelemetrySpool::open(store, 1 << 20, Duration::from_millis(5), 8).expect("reopen");
        let batch = reopened.next_batch(None, 100).expect("batch");
        assert_eq!(
            batch.iter().map(|(s, m)| (*s, m.payload[0])).collect::<Vec<_>>(),
            vec![(3, 3), (4, 4), (6, 6), (8, 8)],
            "the unacknowledged ones, in order"
        );
    }

    #[test]
    fn a_commit_group_leaves_the_disk_when_all_of_it_is_acknowledged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn StateStore> = Arc::new(SledStore::open(dir.path()).expect("store"));
        // A message an older Lichen wrote, one per key, before commit groups.
        store.spool_put(SpoolTree::Upstream, 3, &msg("old", b"3").encode()).expect("put");
        let spool = TelemetrySpool::open(store.clone(), 1 << 20, Duration::from_millis(5), 8).expect("spool");
        for i in 4..10u8 {
            spool.append(&msg("t", &[i])).expect("append");
        }
        spool.commit();
        let batch = spool.next_batch(None, 100).expect("batch");
        assert_eq!(batch.first().map(|(s, m)| (*s, m.topic.as_str())), Some((3, "old")));
        assert_eq!(seqs(batch), (3..10).collect::<Vec<_>>());
        for seq in 3..7 {
            spool.ack(seq);
        }
        drop(spool);
        // Acknowledgements of part of a group do not survive a restart: those are sent again.
        let spool =
            TelemetrySpool::open(store.clone(), 1 << 20, Duration::from_millis(5), 8).expect("reopen");
        assert_eq!(seqs(spool.next_batch(None, 100).expect("batch")), (4..10).collect::<Vec<_>>());
        for seq in 4..10 {
            spool.ack(seq);
        }
        spool.commit();
        assert_eq!(values(&store), 0, "gone from the disk");
        let snap = spool.snapshot();
        assert_eq!((snap.entries, snap.bytes, snap.acked), (0, 0, 6));
        assert_eq!(spool.append(&msg("t", b"x")).expect("append"), 10, "sequence numbers go on");
    }

    #[test]
    fn a_commit_writes_groups_of_bounded_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn StateStore> = Arc::new(SledStore::open(dir.path()).expect("store"));
        let spool =
            TelemetrySpool::open(store.clone(), 16 << 20, Duration::from_millis(5), 8).expect("spool");
        for i in 0..5u8 {
            spool.append(&msg("t", &vec![i; 100 << 10])).expect("append");
        }
        spool.commit();
        assert_eq!(values(&store), 3, "2 + 2 + 1");
        drop(spool);
        let spool = TelemetrySpool::open(store, 16 << 20, Duration::from_millis(5), 8).expect("reopen");
        let batch = spool.next_batch(Some(0), 100).expect("batch");
        assert_eq!(
            batch.iter().map(|(s, m)| (*s, m.payload[0])).collect::<Vec<_>>(),
            vec![(1, 1), (2, 2), (3, 3), (4, 4)]
        );
    }

    #[test]
    fn a_damaged_commit_group_is_dropped_and_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn StateStore> = Arc::new(SledStore::open(dir.path()).expect("store"));
        let good = encode_group(&[(0, msg("t", b"a").encode()), (1, msg("t", b"b").encode())]);
        store.spool_put(SpoolTree::Upstream, 0, &good).expect("put");
        store.spool_put(SpoolTree::Upstream, 2, &good[..good.len() - 3]).expect("put");
        let backwards = encode_group(&[(7, msg("t", b"a").encode()), (6, msg("t", b"b").encode())]);
        store.spool_put(SpoolTree::Upstream, 6, &backwards).expect("put");
        let spool = TelemetrySpool::open(store, 1 << 20, Duration::from_millis(5), 8).expect("spool");
        assert_eq!(seqs(spool.next_batch(None, 100).expect("batch")), vec![0, 1]);
        let snap = spool.snapshot();
        assert_eq!((snap.entries, snap.dropped_corrupt), (2, 2));
        assert_eq!(decode_group(6, &backwards), Err(DecodeError::Group));
        assert_eq!(decode_group(0, &good[..good.len() - 3]), Err(DecodeError::Truncated));
        assert_eq!(decode_group(2, &good), Err(DecodeError::Group), "below its key");
    }

    #[test]
    fn the_tree_and_memory_read_as_one_spool_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn StateStore> = Arc::new(SledStore::open(dir.path()).expect("store"));
        let one = msg("t", &[0]).encode().len() as u64;
        let spool = TelemetrySpool::open(store, one * 8, Duration::from_millis(5), 8).expect("spool");
        for i in 0..5u8 {
            spool.append(&msg("t", &[i])).expect("append");
        }
        spool.commit();
        for i in 5..8u8 {
            spool.append(&msg("t", &[i])).expect("append");
        }
        assert_eq!(seqs(spool.next_batch(None, 100).expect("batch")), (0..8).collect::<Vec<_>>());
        assert_eq!(seqs(spool.next_batch(Some(2), 4).expect("batch")), vec![3, 4, 5, 6], "across the two");
        assert_eq!(seqs(spool.next_batch(Some(5), 100).expect("batch")), vec![6, 7]);
        spool.ack(1);
        spool.ack(6);
        spool.ack(1);
        assert_eq!(seqs(spool.next_batch(None, 100).expect("batch")), vec![0, 2, 3, 4, 5, 7]);
        let snap = spool.snapshot();
        assert_eq!((snap.entries, snap.acked), (6, 2), "a second ack counts nothing");
        // The acknowledged 1 keeps its group's room until the whole group goes: 5 + 2 held of 8.
        spool.append(&msg("t", &[8])).expect("append");
        assert_eq!(spool.snapshot().dropped_full, 0);
        // Full: the oldest go, the tree's commit group as a whole (0, 2, 3 and 4), then memory's.
        spool.append(&msg("t", &[9])).expect("append");
        assert_eq!(seqs(spool.next_batch(None, 100).expect("batch")), vec![5, 7, 8, 9]);
        for i in 10..16u8 {
            spool.append(&msg("t", &[i])).expect("append");
        }
        assert_eq!(
            seqs(spool.next_batch(None, 100).expect("batch")),
            vec![8, 9, 10, 11, 12, 13, 14, 15],
            "and then from memory"
        );
        let snap = spool.snapshot();
        assert_eq!((snap.entries, snap.dropped_full, snap.written), (8, 6, 5));
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
