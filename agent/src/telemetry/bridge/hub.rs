//! The hub ([`MqttBridge`]): the node's side of MQTT that pods, node telemetry and the gateway
//! use. It takes publishes (QoS 1 into the spool, QoS 0 to the connection's direct channel),
//! routes incoming messages to every subscriber whose filters match (a container's stdin, a
//! module's `lichen:mqtt` inbox, the gateway), keeps the bridge's counters, and tells the
//! connection which filters are wanted. It holds no connection itself.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use tokio::sync::{Notify, mpsc};

use super::framing::encode_incoming;
use super::{DropLog, PodBridge, PodMqtt, QOS0_WAIT, TokenBucket};
use crate::config::MqttConfig;
use crate::runtime::mqtt_api::GuestMessage;
use crate::telemetry::gateway::counters::{GatewayCounters, GatewaySnapshot};
use crate::telemetry::spool::{SpoolMessage, TelemetrySpool};
use crate::topic::TopicFilter;

/// Counters of the bridge, for logs and node telemetry.
#[derive(Debug, Default)]
pub(super) struct BridgeStats {
    pub(super) published: AtomicU64,
    pub(super) dropped_rate: AtomicU64,
    pub(super) throttled: AtomicU64,
    pub(super) dropped_oversized: AtomicU64,
    pub(super) dropped_malformed: AtomicU64,
    pub(super) dropped_offline: AtomicU64,
    pub(super) dropped_spool_error: AtomicU64,
    pub(super) delivered_stdin: AtomicU64,
    pub(super) dropped_stdin: AtomicU64,
}

/// A snapshot of the bridge's counters.
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct BridgeSnapshot {
    /// Whether the broker connection is up.
    pub connected: bool,
    /// Messages accepted for publishing (spooled, or handed to the connection for QoS 0).
    pub published: u64,
    /// Lines dropped by a pod's rate limit (QoS 0 only).
    pub dropped_rate: u64,
    /// QoS 1 lines that waited for a pod's rate limit (their module was slowed, nothing lost).
    #[serde(default)]
    pub throttled: u64,
    /// Lines longer than `max_payload`.
    pub dropped_oversized: u64,
    /// `base64:` lines that were not base64.
    pub dropped_malformed: u64,
    /// QoS 0 messages dropped because the broker was away or the connection could not take them.
    pub dropped_offline: u64,
    /// Messages the spool could not store (disk errors).
    pub dropped_spool_error: u64,
    /// Incoming messages written to a container's stdin queue.
    pub delivered_stdin: u64,
    /// Incoming messages dropped because a stdin queue was full.
    pub dropped_stdin: u64,
}

/// One container's (or the gateway's) subscriptions.
pub(super) struct Subscriber {
    pub(super) id: u64,
    pub(super) filters: Vec<TopicFilter>,
    pub(super) sink: Sink,
}

/// Where a subscriber's messages go.
pub(super) enum Sink {
    /// A container's stdin, as framed lines.
    Stdin(mpsc::Sender<Vec<u8>>),
    /// A module's `lichen:mqtt` inbox.
    Guest(mpsc::Sender<GuestMessage>),
    /// Gateway mode's downstream direction; it queues and counts itself.
    Gateway(GatewaySink),
}

/// A message from the upstream broker, as the gateway sees it.
#[derive(Clone, Copy)]
pub struct Arrival<'a> {
    /// Its topic on the upstream broker.
    pub topic: &'a str,
    /// Its payload, as published.
    pub payload: &'a [u8],
    /// The retain flag it came with.
    pub retain: bool,
    /// The broker's flag on a resend.
    pub dup: bool,
    /// Which connection to the broker it came on: a number that grows with each one.
    pub connection: u64,
}

/// The gateway's hook for messages from the upstream broker. When it returns, a message it
/// forwards is in its spool.
pub type GatewaySink = Arc<dyn Fn(&Arrival) + Send + Sync>;
/// The gateway's hook for its own messages as the upstream connection sends them.
pub type GatewaySent = Arc<dyn Fn(&str, &[u8]) + Send + Sync>;

/// The node's side of MQTT that pods and node telemetry use; the connection itself is
/// [`crate::telemetry::mqtt::MqttClient`].
pub struct MqttBridge {
    pub(super) node: String,
    pub(super) max_payload: usize,
    pub(super) rate: u32,
    pub(super) burst: u32,
    pub(super) stdin_queue: usize,
    pub(super) spool: Arc<TelemetrySpool>,
    pub(super) direct: mpsc::Sender<SpoolMessage>,
    pub(super) subscribers: Mutex<Vec<Subscriber>>,
    pub(super) next_id: AtomicU64,
    pub(super) subscriptions_changed: Notify,
    pub(super) connected: AtomicBool,
    /// Connections made so far (see [`Arrival::connection`]).
    pub(super) connections: AtomicU64,
    pub(super) stats: BridgeStats,
    pub(super) gateway: std::sync::OnceLock<(GatewayCounters, GatewaySent)>,
    /// The containers' stdout pumps: each ends when its container's run ends, after handing its
    /// last lines over; shutdown waits for them ([`MqttBridge::pumps_drained`]).
    pub(super) pumps: tokio_util::task::TaskTracker,
}

impl MqttBridge {
    /// The bridge, and the receiver of QoS 0 messages the connection sends unspooled.
    pub fn new(
        config: &MqttConfig,
        node: &str,
        spool: Arc<TelemetrySpool>,
    ) -> (Arc<Self>, mpsc::Receiver<SpoolMessage>) {
        // QoS 0 messages wait only briefly for the connection; they are not worth memory.
        let (direct, rx) = mpsc::channel(256);
        let bridge = MqttBridge {
            node: node.to_owned(),
            max_payload: config.max_payload.0 as usize,
            rate: config.pod_rate_limit,
            burst: config.pod_burst,
            stdin_queue: config.stdin_queue as usize,
            spool,
            direct,
            subscribers: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
            subscriptions_changed: Notify::new(),
            connected: AtomicBool::new(false),
            connections: AtomicU64::new(0),
            stats: BridgeStats::default(),
            gateway: std::sync::OnceLock::new(),
            pumps: tokio_util::task::TaskTracker::new(),
        };
        (Arc::new(bridge), rx)
    }

    /// Waits until every stdout pump has handed over its container's last lines. Called at
    /// shutdown once the pods have stopped (their pumps end with them).
    pub async fn pumps_drained(&self) {
        self.pumps.close();
        self.pumps.wait().await;
    }

    /// The node's name, for topics.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Publishes: QoS 1 through the spool, QoS 0 straight to the connection (dropped if it is away).
    /// Returns whether the message was taken.
    pub fn publish(&self, message: SpoolMessage) -> bool {
        if message.qos >= 1 {
            match self.spool.append(&message) {
                Ok(_) => {
                    self.stats.published.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Err(e) => {
                    self.stats.dropped_spool_error.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, topic = %message.topic, "message dropped");
                    false
                }
            }
        } else if self.connected.load(Ordering::Relaxed) && self.direct.try_send(message).is_ok() {
            self.stats.published.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            self.stats.dropped_offline.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    /// Publishes a module's QoS 0 line: while the connection is up and its queue is full, waits
    /// (up to [`QOS0_WAIT`]) for room, so a fast module is slowed as its QoS 1 lines are, instead
    /// of losing lines the connection could have sent a moment later.
    pub async fn publish_waiting(&self, message: SpoolMessage) -> bool {
        if !self.connected.load(Ordering::Relaxed) {
            self.stats.dropped_offline.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        match tokio::time::timeout(QOS0_WAIT, self.direct.send(message)).await {
            Ok(Ok(())) => {
                self.stats.published.fetch_add(1, Ordering::Relaxed);
                true
            }
            _ => {
                self.stats.dropped_offline.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Counts a QoS 0 message the connection could not take.
    pub fn dropped_offline(&self) {
        self.stats.dropped_offline.fetch_add(1, Ordering::Relaxed);
    }

    /// Called by the connection.
    pub fn set_connected(&self, up: bool) {
        if up {
            self.connections.fetch_add(1, Ordering::Relaxed);
        }
        self.connected.store(up, Ordering::Relaxed);
    }

    /// Every filter some container subscribes.
    pub fn filters(&self) -> BTreeSet<TopicFilter> {
        let subs = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        subs.iter().flat_map(|s| s.filters.iter().cloned()).collect()
    }

    /// Resolves when a container subscribed or went away.
    pub async fn subscriptions_changed(&self) {
        self.subscriptions_changed.notified().await;
    }

    /// Hands an incoming message to every container (and the gateway) whose filters match it;
    /// `dup` is the broker's flag on a resend. When it returns, the message is wherever it goes
    /// (a container's queue, the gateway's spool) or dropped and counted: the caller may
    /// acknowledge it.
    pub fn deliver(&self, topic: &str, payload: &[u8], retain: bool, dup: bool) {
        let subs = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        let mut line = None;
        for s in subs.iter().filter(|s| s.filters.iter().any(|f| f.matches(topic))) {
            let sent = match &s.sink {
                // The gateway forwards whole messages; the broker's packet limit bounds them.
                Sink::Gateway(hook) => {
                    let connection = self.connections.load(Ordering::Relaxed);
                    hook(&Arrival { topic, payload, retain, dup, connection });
                    continue;
                }
                _ if payload.len() > self.max_payload => {
                    self.stats.dropped_oversized.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%topic, bytes = payload.len(), max = self.max_payload, "incoming message larger than mqtt.max_payload dropped");
                    continue;
                }
                Sink::Stdin(tx) => {
                    tx.try_send(line.get_or_insert_with(|| encode_incoming(topic, payload)).clone()).is_ok()
                }
                Sink::Guest(tx) => {
                    tx.try_send(GuestMessage { topic: topic.to_owned(), payload: payload.to_vec() }).is_ok()
                }
            };
            let counter = if sent { &self.stats.delivered_stdin } else { &self.stats.dropped_stdin };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Attaches gateway mode: its counters (for status) and the hook told of each of its messages
    /// sent upstream (for loop prevention).
    pub fn set_gateway(&self, counters: GatewayCounters, sent: GatewaySent) {
        let _ = self.gateway.set((counters, sent));
    }

    /// Called by the upstream connection for every message it sends that came from the local
    /// broker ([`crate::telemetry::spool::Origin::LocalBroker`]).
    pub fn gateway_sent(&self, topic: &str, payload: &[u8]) {
        if let Some((_, sent)) = self.gateway.get() {
            sent(topic, payload);
        }
    }

    /// Gateway mode's counters, when it is on.
    pub fn gateway_snapshot(&self) -> Option<GatewaySnapshot> {
        self.gateway.get().map(|(c, _)| c.snapshot())
    }

    /// Registers the gateway's upstream filters; their messages go to `sink`.
    pub fn subscribe_gateway(&self, filters: Vec<TopicFilter>, sink: GatewaySink) {
        if filters.is_empty() {
            return;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.subscribers.lock().unwrap_or_else(|p| p.into_inner()).push(Subscriber {
            id,
            filters,
            sink: Sink::Gateway(sink),
        });
        self.subscriptions_changed.notify_one();
    }

    /// The bridge of one pod, holding its rate limit; `namespace`/`pod` fill the templates.
    pub fn pod(self: &Arc<Self>, binding: PodMqtt, namespace: &str, pod: &str) -> Arc<PodBridge> {
        Arc::new(PodBridge {
            bridge: self.clone(),
            binding,
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            bucket: Mutex::new(TokenBucket::new(self.rate, self.burst, Instant::now())),
            drops: Mutex::new(DropLog::default()),
        })
    }

    /// The counters.
    pub fn snapshot(&self) -> BridgeSnapshot {
        let s = &self.stats;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BridgeSnapshot {
            connected: self.connected.load(Ordering::Relaxed),
            published: l(&s.published),
            dropped_rate: l(&s.dropped_rate),
            throttled: l(&s.throttled),
            dropped_oversized: l(&s.dropped_oversized),
            dropped_malformed: l(&s.dropped_malformed),
            dropped_offline: l(&s.dropped_offline),
            dropped_spool_error: l(&s.dropped_spool_error),
            delivered_stdin: l(&s.delivered_stdin),
            dropped_stdin: l(&s.dropped_stdin),
        }
    }

    /// The spool's counters.
    pub fn spool(&self) -> &Arc<TelemetrySpool> {
        &self.spool
    }

    pub(super) fn unsubscribe(&self, id: u64) {
        self.subscribers.lock().unwrap_or_else(|p| p.into_inner()).retain(|s| s.id != id);
        self.subscriptions_changed.notify_one();
    }
}
