//! Modules talk MQTT without an SDK: pod annotations map a container's stdout lines to a topic and
//! subscriptions to its stdin ([`MqttBridge`], [`PodBridge`]).
//!
//! This module owns one pod's wiring ([`PodBridge::attach`]: the stdout pump, the stdin feed, the
//! guest port) and the drop log; the parts live in submodules: [`annotations`] (pod annotations to
//! settings), [`framing`] (stdio lines), [`bucket`] (the rate limit), [`hub`] (routing and
//! counters) and [`guest`] (`lichen:mqtt`). The connection itself is [`super::mqtt`]'s.
//!
//! # Annotations
//! - `lichen.dev/mqtt-publish: "sensors/{node}/{pod}/temp"`: every app container's stdout lines
//!   are published there. Placeholders: `{node}`, `{namespace}`, `{pod}`, `{container}`.
//! - `lichen.dev/mqtt-qos: "0" | "1"` (default `1`; QoS 1 goes through the durable spool).
//! - `lichen.dev/mqtt-retain: "true" | "false"` (default `false`).
//! - `lichen.dev/mqtt-subscribe: "commands/{node}/#, config/{pod}"`: comma-separated filters whose
//!   messages are written to every app container's stdin.
//!
//! # Framing (see the README's MQTT section, which is the contract)
//! - stdout: one message per line (`\n`; a `\r` before it is removed). A line starting with
//!   `base64:` carries a binary payload as standard base64 (padded). Empty lines are not published.
//! - stdin: one line per message, `<topic> <payload>\n`. In the topic `%`, space, CR and LF are
//!   written as `%25`, `%20`, `%0D`, `%0A`. The payload is written as is when it is UTF-8 without
//!   control characters (TAB aside) and does not start with `base64:`; otherwise as `base64:` and
//!   its standard base64.
//!
//! # Back-pressure
//! A container's stdout reaches the bridge through a channel of [`STDOUT_CHUNKS`] chunks of at most
//! [`crate::runtime::logs::MAX_TAP_CHUNK`] bytes; when it is full, the module's writes wait (it is
//! slowed, nothing is lost). Past that, each pod has a token bucket (`pod_rate_limit`,
//! `pod_burst`): QoS 1 lines beyond it wait for it, so the module is slowed to the limit and loses
//! nothing (counted as throttled); QoS 0 lines beyond it are dropped, counted and logged. Lines
//! longer than `max_payload`
//! are dropped, counted and logged, as are malformed `base64:` lines. Incoming messages wait in a
//! queue of `stdin_queue` messages per container; when it is full they are dropped and counted.

pub mod annotations;
pub mod bucket;
pub mod framing;
mod guest;
pub mod hub;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::runtime::StdinFeed;
use crate::runtime::mqtt_api::GuestMqtt;
use crate::telemetry::spool::{Origin, SpoolMessage};
use crate::topic::TopicFilter;

pub use annotations::{
    PUBLISH_ANNOTATION, PodMqtt, QOS_ANNOTATION, RETAIN_ANNOTATION, SUBSCRIBE_ANNOTATION, TemplateError,
    TopicVars, expand, parse_annotations,
};
pub use bucket::TokenBucket;
use framing::BASE64_PREFIX;
pub use framing::{LineFault, LineSplitter, decode_line, encode_incoming};
use guest::GuestPort;
pub use guest::MAX_GUEST_SUBSCRIPTIONS;
pub use hub::{Arrival, BridgeSnapshot, GatewaySent, GatewaySink, MqttBridge};
use hub::{Sink, Subscriber};

/// Chunks of stdout waiting for the bridge per container before the module's writes wait.
pub const STDOUT_CHUNKS: usize = 16;
/// How long a module's QoS 0 line waits for room in the connection's queue before it is dropped.
pub const QOS0_WAIT: Duration = Duration::from_millis(500);
/// Drops are logged at most this often per pod (with the counts since the last log).
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Default)]
struct DropLog {
    last: Option<Instant>,
    rate: u64,
    oversized: u64,
    malformed: u64,
}

/// One pod's MQTT: its binding, its rate limit, its drop log.
pub struct PodBridge {
    bridge: Arc<MqttBridge>,
    binding: PodMqtt,
    namespace: String,
    pod: String,
    bucket: Mutex<TokenBucket>,
    drops: Mutex<DropLog>,
}

/// What a container run gets from the bridge.
#[derive(Default)]
pub struct ContainerMqtt {
    /// Where a copy of stdout goes (for the runtime's log sink).
    pub stdout: Option<mpsc::Sender<Vec<u8>>>,
    /// Its stdin.
    pub stdin: Option<StdinFeed>,
    /// Its `lichen:mqtt` connection, for a module that imports it.
    pub guest: Option<GuestMqtt>,
}

/// Removes a container's subscriptions when its run ends (its stdin is dropped).
struct SubscriptionGuard {
    bridge: Arc<MqttBridge>,
    id: u64,
}

impl Drop for SubscriptionGuard {
    fn drop(&mut self) {
        self.bridge.unsubscribe(self.id);
    }
}

impl PodBridge {
    /// Wires one run of `container`: a stdout pump task publishing its lines, and either a stdin
    /// fed by its subscriptions or, for a module importing `lichen:mqtt` (`guest`), a
    /// [`GuestMqtt`] whose subscriptions the module makes itself within the annotation's filters.
    /// Call inside the tokio runtime.
    pub fn attach(self: &Arc<Self>, container: &str, guest: bool) -> ContainerMqtt {
        let b = &self.bridge;
        let vars = TopicVars { node: &b.node, namespace: &self.namespace, pod: &self.pod, container };
        let mut io = ContainerMqtt::default();
        let publish_root = self.binding.publish.as_deref().and_then(|t| expand(t, &vars).ok());
        if let Some(topic) = publish_root.clone() {
            let (tx, rx) = mpsc::channel(STDOUT_CHUNKS);
            b.pumps.spawn(self.clone().pump(rx, topic));
            io.stdout = Some(tx);
        }
        // Admission checked the templates with every placeholder filled; names fill them with
        // nothing a filter forbids.
        let filters: Vec<TopicFilter> = self
            .binding
            .subscribe
            .iter()
            .filter_map(|f| expand(f, &vars).ok().and_then(|t| TopicFilter::parse(t).ok()))
            .collect();
        if guest {
            let (inbox, rx) = mpsc::channel(b.stdin_queue.max(1));
            let port = GuestPort {
                pod: self.clone(),
                publish_root,
                allowed: filters,
                id: b.next_id.fetch_add(1, Ordering::Relaxed),
                inbox,
                subscribed: Mutex::new(Vec::new()),
            };
            io.guest = Some(GuestMqtt::new(Arc::new(port), rx));
        } else if !filters.is_empty() {
            let (tx, rx) = mpsc::channel(b.stdin_queue.max(1));
            let id = b.next_id.fetch_add(1, Ordering::Relaxed);
            b.subscribers.lock().unwrap_or_else(|p| p.into_inner()).push(Subscriber {
                id,
                filters,
                sink: Sink::Stdin(tx),
            });
            b.subscriptions_changed.notify_one();
            io.stdin = Some(StdinFeed::new(rx, Box::new(SubscriptionGuard { bridge: b.clone(), id })));
        }
        io
    }

    async fn pump(self: Arc<Self>, mut rx: mpsc::Receiver<Vec<u8>>, topic: String) {
        let max = self.bridge.max_payload;
        // A base64 line may be a third longer than the payload it carries.
        let mut splitter = LineSplitter::new(max / 3 * 4 + 4 + BASE64_PREFIX.len() + 1);
        // The lines of one chunk (at most 64 KiB of them), handled after splitting so a QoS 0
        // line can wait for the connection's queue.
        let mut lines: Vec<Result<Option<Vec<u8>>, LineFault>> = Vec::new();
        loop {
            let more = match rx.recv().await {
                Some(chunk) => {
                    splitter.push(&chunk, &mut |l| lines.push(l.and_then(|l| decode_line(l, max))));
                    true
                }
                None => {
                    splitter.finish(&mut |l| lines.push(l.and_then(|l| decode_line(l, max))));
                    false
                }
            };
            for line in lines.drain(..) {
                self.line(&topic, line, !more).await;
            }
            if !more {
                return;
            }
        }
    }

    /// Whether a line may go past the pod's rate limit. QoS 1 promises delivery, so its lines wait
    /// for a token (the pump stops reading, the stdout channel fills, and the module's writes wait
    /// as on a full pipe); only QoS 0 lines are dropped. Once the module has ended (`closing`) the
    /// lines still queued go through unthrottled: they are bounded by the channel
    /// ([`STDOUT_CHUNKS`] chunks), and shutdown must not wait out the rate limit for them.
    async fn admit(&self, closing: bool) -> bool {
        let mut waited = false;
        loop {
            let verdict = self.bucket.lock().unwrap_or_else(|p| p.into_inner()).take_or_wait(Instant::now());
            match verdict {
                Ok(()) => return true,
                Err(_) if self.binding.qos == 0 => return false,
                Err(_) if closing => return true,
                Err(wait) => {
                    if !waited {
                        waited = true;
                        self.bridge.stats.throttled.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::time::sleep(wait.min(Duration::from_secs(1))).await;
                }
            }
        }
    }

    async fn line(&self, topic: &str, line: Result<Option<Vec<u8>>, LineFault>, closing: bool) {
        let stats = &self.bridge.stats;
        let payload = match line {
            Ok(None) => return,
            Ok(Some(p)) => p,
            Err(fault) => {
                let counter = match fault {
                    LineFault::Oversized => &stats.dropped_oversized,
                    LineFault::Malformed => &stats.dropped_malformed,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                self.dropped(|d| match fault {
                    LineFault::Oversized => d.oversized += 1,
                    LineFault::Malformed => d.malformed += 1,
                });
                return;
            }
        };
        if self.bridge.rate != 0 && !self.admit(closing).await {
            stats.dropped_rate.fetch_add(1, Ordering::Relaxed);
            self.dropped(|d| d.rate += 1);
            return;
        }
        let message = SpoolMessage {
            topic: topic.to_owned(),
            qos: self.binding.qos,
            retain: self.binding.retain,
            origin: Origin::Node,
            payload,
        };
        if message.qos == 0 {
            self.bridge.publish_waiting(message).await;
        } else {
            self.bridge.publish(message);
        }
    }

    /// Counts a dropped line and logs the counts at most every [`DROP_LOG_INTERVAL`].
    fn dropped(&self, count: impl FnOnce(&mut DropLog)) {
        let mut d = self.drops.lock().unwrap_or_else(|p| p.into_inner());
        count(&mut d);
        if d.last.is_none_or(|t| t.elapsed() >= DROP_LOG_INTERVAL) {
            tracing::warn!(
                pod = %format!("{}/{}", self.namespace, self.pod),
                rate_limited = d.rate,
                oversized = d.oversized,
                malformed = d.malformed,
                rate_limit = self.bridge.rate,
                max_payload = self.bridge.max_payload,
                "MQTT lines dropped (counts since the last report); see mqtt.pod_rate_limit and mqtt.max_payload"
            );
            *d = DropLog { last: Some(Instant::now()), ..DropLog::default() };
        }
    }
}
