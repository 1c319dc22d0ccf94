//! Modules talk MQTT without an SDK: pod annotations map a container's stdout lines to a topic and
//! subscriptions to its stdin ([`MqttBridge`], [`PodBridge`]).
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
//! `pod_burst`): lines beyond it are dropped, counted and logged. Lines longer than `max_payload`
//! are dropped, counted and logged, as are malformed `base64:` lines. Incoming messages wait in a
//! queue of `stdin_queue` messages per container; when it is full they are dropped and counted.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Serialize;
use tokio::sync::{Notify, mpsc};

use super::mqtt::valid_publish_topic;
use super::spool::{Origin, SpoolMessage, TelemetrySpool};
use crate::config::MqttConfig;
use crate::runtime::StdinFeed;
use crate::runtime::mqtt_api::{Errno, GuestMessage, GuestMqtt, GuestMqttPort};

/// Topic a pod's stdout lines are published on.
pub const PUBLISH_ANNOTATION: &str = "lichen.dev/mqtt-publish";
/// QoS of those messages.
pub const QOS_ANNOTATION: &str = "lichen.dev/mqtt-qos";
/// Retain flag of those messages.
pub const RETAIN_ANNOTATION: &str = "lichen.dev/mqtt-retain";
/// Filters whose messages go to the pod's stdin.
pub const SUBSCRIBE_ANNOTATION: &str = "lichen.dev/mqtt-subscribe";
/// Chunks of stdout waiting for the bridge per container before the module's writes wait.
pub const STDOUT_CHUNKS: usize = 16;
/// How long a module's QoS 0 line waits for room in the connection's queue before it is dropped.
pub const QOS0_WAIT: Duration = Duration::from_millis(500);
/// Drops are logged at most this often per pod (with the counts since the last log).
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(10);
const BASE64_PREFIX: &[u8] = b"base64:";

/// What a pod asked of MQTT in its annotations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodMqtt {
    /// The publish topic template.
    pub publish: Option<String>,
    /// 0 or 1.
    pub qos: u8,
    /// Retain flag.
    pub retain: bool,
    /// Subscription filter templates.
    pub subscribe: Vec<String>,
}

/// Values for a topic template's placeholders.
#[derive(Debug, Clone, Copy)]
pub struct TopicVars<'a> {
    /// `{node}`.
    pub node: &'a str,
    /// `{namespace}`.
    pub namespace: &'a str,
    /// `{pod}`.
    pub pod: &'a str,
    /// `{container}`.
    pub container: &'a str,
}

/// Fills in a template's placeholders, or names the one it does not know.
pub fn expand(template: &str, vars: &TopicVars<'_>) -> Result<String, String> {
    let mut out = String::with_capacity(template.len() + 16);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after.find('}').ok_or_else(|| format!("{template:?}: unclosed '{{'"))?;
        out.push_str(match &after[..close] {
            "node" => vars.node,
            "namespace" => vars.namespace,
            "pod" => vars.pod,
            "container" => vars.container,
            other => {
                return Err(format!(
                    "{template:?}: unknown placeholder {{{other}}}; use {{node}}, {{namespace}}, {{pod}} or {{container}}"
                ));
            }
        });
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Whether `filter` is a valid subscription filter: `+` and `#` only as whole levels, `#` last.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.len() > 65_535 || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, l)| match *l {
        "#" => i == levels.len() - 1,
        "+" => true,
        l => !l.contains(['+', '#']),
    })
}

/// MQTT topic matching: `+` is one level, `#` the rest (and the parent); wildcards at the first
/// level do not match topics starting with `$`.
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Reads the MQTT annotations of a pod; `None` if it has none. Errors are `(field, message)`.
pub fn parse_annotations(
    annotations: &BTreeMap<String, String>,
) -> Result<Option<PodMqtt>, Vec<(String, String)>> {
    let field = |a: &str| format!("metadata.annotations[{a}]");
    let mut errs = Vec::new();
    let publish = annotations.get(PUBLISH_ANNOTATION).map(|s| s.trim().to_owned());
    let subscribe: Vec<String> = annotations
        .get(SUBSCRIBE_ANNOTATION)
        .map(|s| s.split(',').map(str::trim).filter(|f| !f.is_empty()).map(str::to_owned).collect())
        .unwrap_or_default();
    let qos = match annotations.get(QOS_ANNOTATION).map(|s| s.trim()) {
        None | Some("1") => 1,
        Some("0") => 0,
        Some(v) => {
            errs.push((field(QOS_ANNOTATION), format!("{v:?} is not 0 or 1 (QoS 2 is not supported)")));
            1
        }
    };
    let retain = match annotations.get(RETAIN_ANNOTATION).map(|s| s.trim()) {
        None | Some("false") => false,
        Some("true") => true,
        Some(v) => {
            errs.push((field(RETAIN_ANNOTATION), format!("{v:?} is not \"true\" or \"false\"")));
            false
        }
    };
    if publish.is_none() && subscribe.is_empty() {
        if annotations.contains_key(QOS_ANNOTATION) || annotations.contains_key(RETAIN_ANNOTATION) {
            errs.push((field(PUBLISH_ANNOTATION), "is required when mqtt-qos or mqtt-retain is set".into()));
            return Err(errs);
        }
        return Ok(None);
    }
    // Check templates with every placeholder filled, as they will be.
    let sample = TopicVars { node: "node", namespace: "ns", pod: "pod", container: "c" };
    if let Some(p) = &publish {
        match expand(p, &sample) {
            Ok(t) if valid_publish_topic(&t) => {}
            Ok(_) => errs.push((
                field(PUBLISH_ANNOTATION),
                format!("{p:?} is not a topic one can publish to (no + or #, not empty)"),
            )),
            Err(e) => errs.push((field(PUBLISH_ANNOTATION), e)),
        }
    }
    for f in &subscribe {
        match expand(f, &sample) {
            Ok(t) if valid_filter(&t) => {}
            Ok(_) => errs.push((
                field(SUBSCRIBE_ANNOTATION),
                format!("{f:?} is not a valid filter (+ and # stand for whole levels, # only last)"),
            )),
            Err(e) => errs.push((field(SUBSCRIBE_ANNOTATION), e)),
        }
    }
    if errs.is_empty() { Ok(Some(PodMqtt { publish, qos, retain, subscribe })) } else { Err(errs) }
}

/// Why a stdout line was not published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineFault {
    /// Longer than `max_payload` (before or after base64 decoding).
    Oversized,
    /// A `base64:` line that is not base64.
    Malformed,
}

/// The payload a stdout line stands for: `None` for an empty line.
pub fn decode_line(line: &[u8], max_payload: usize) -> Result<Option<Vec<u8>>, LineFault> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.is_empty() {
        return Ok(None);
    }
    let payload = match line.strip_prefix(BASE64_PREFIX) {
        Some(b64) => {
            base64::engine::general_purpose::STANDARD.decode(b64).map_err(|_| LineFault::Malformed)?
        }
        None => line.to_vec(),
    };
    if payload.len() > max_payload {
        return Err(LineFault::Oversized);
    }
    Ok(Some(payload))
}

/// The stdin line for an incoming message (see the module docs).
pub fn encode_incoming(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(topic.len() + payload.len() + 16);
    for b in topic.bytes() {
        match b {
            b'%' => out.extend_from_slice(b"%25"),
            b' ' => out.extend_from_slice(b"%20"),
            b'\r' => out.extend_from_slice(b"%0D"),
            b'\n' => out.extend_from_slice(b"%0A"),
            b => out.push(b),
        }
    }
    out.push(b' ');
    // Control characters (NUL, ESC, ...) would reach a module's line reader as text; only TAB passes.
    let text = std::str::from_utf8(payload).is_ok()
        && !payload.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f)
        && !payload.starts_with(BASE64_PREFIX);
    if text {
        out.extend_from_slice(payload);
    } else {
        out.extend_from_slice(BASE64_PREFIX);
        out.extend_from_slice(base64::engine::general_purpose::STANDARD.encode(payload).as_bytes());
    }
    out.push(b'\n');
    out
}

/// Splits a byte stream into lines of at most `limit` bytes; longer lines are reported once as
/// [`LineFault::Oversized`] and skipped to their end, so memory stays bounded by `limit`.
#[derive(Debug)]
pub struct LineSplitter {
    buf: Vec<u8>,
    limit: usize,
    overflow: bool,
}

impl LineSplitter {
    /// A splitter keeping at most `limit` bytes of a line.
    pub fn new(limit: usize) -> Self {
        LineSplitter { buf: Vec::new(), limit, overflow: false }
    }

    /// Feeds bytes; calls `out` with each complete line, or the fault of an overlong one.
    pub fn push(&mut self, mut bytes: &[u8], out: &mut impl FnMut(Result<&[u8], LineFault>)) {
        while !bytes.is_empty() {
            let (part, done) = match bytes.iter().position(|&b| b == b'\n') {
                Some(i) => (&bytes[..i], Some(i + 1)),
                None => (bytes, None),
            };
            if !self.overflow {
                if self.buf.len() + part.len() > self.limit {
                    self.overflow = true;
                    self.buf = Vec::new();
                    out(Err(LineFault::Oversized));
                } else {
                    self.buf.extend_from_slice(part);
                }
            }
            match done {
                Some(n) => {
                    if !self.overflow {
                        out(Ok(&self.buf));
                    }
                    self.buf.clear();
                    self.overflow = false;
                    bytes = &bytes[n..];
                }
                None => bytes = &[],
            }
        }
    }

    /// The last line, if the stream ended without a newline.
    pub fn finish(&mut self, out: &mut impl FnMut(Result<&[u8], LineFault>)) {
        if !self.overflow && !self.buf.is_empty() {
            out(Ok(&self.buf));
        }
        self.buf.clear();
        self.overflow = false;
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        TokenBucket { rate: f64::from(rate), burst, tokens: burst, last: now }
    }

    /// Takes a token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Counters of the bridge, for logs and node telemetry.
#[derive(Debug, Default)]
struct BridgeStats {
    published: AtomicU64,
    dropped_rate: AtomicU64,
    dropped_oversized: AtomicU64,
    dropped_malformed: AtomicU64,
    dropped_offline: AtomicU64,
    dropped_spool_error: AtomicU64,
    delivered_stdin: AtomicU64,
    dropped_stdin: AtomicU64,
}

/// A snapshot of the bridge's counters.
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct BridgeSnapshot {
    /// Whether the broker connection is up.
    pub connected: bool,
    /// Messages accepted for publishing (spooled, or handed to the connection for QoS 0).
    pub published: u64,
    /// Lines dropped by a pod's rate limit.
    pub dropped_rate: u64,
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

struct Subscriber {
    id: u64,
    filters: Vec<String>,
    sink: Sink,
}

/// Where a subscriber's messages go.
enum Sink {
    /// A container's stdin, as framed lines.
    Stdin(mpsc::Sender<Vec<u8>>),
    /// A module's `lichen:mqtt` inbox.
    Guest(mpsc::Sender<GuestMessage>),
    /// Gateway mode's downstream direction; it queues and counts itself.
    Gateway(GatewaySink),
}

/// The gateway's hook for messages from the upstream broker: topic, payload, retain, dup. When it
/// returns, a message it forwards is in its spool.
pub type GatewaySink = Arc<dyn Fn(&str, &[u8], bool, bool) + Send + Sync>;
/// The gateway's hook for its own messages as the upstream connection sends them.
pub type GatewaySent = Arc<dyn Fn(&str, &[u8]) + Send + Sync>;

/// The node's side of MQTT that pods and node telemetry use; the connection itself is
/// [`super::mqtt::MqttClient`].
pub struct MqttBridge {
    node: String,
    max_payload: usize,
    rate: u32,
    burst: u32,
    stdin_queue: usize,
    spool: Arc<TelemetrySpool>,
    direct: mpsc::Sender<SpoolMessage>,
    subscribers: Mutex<Vec<Subscriber>>,
    next_id: AtomicU64,
    subscriptions_changed: Notify,
    connected: AtomicBool,
    stats: BridgeStats,
    gateway: std::sync::OnceLock<(super::gateway::GatewayCounters, GatewaySent)>,
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
            stats: BridgeStats::default(),
            gateway: std::sync::OnceLock::new(),
        };
        (Arc::new(bridge), rx)
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
        self.connected.store(up, Ordering::Relaxed);
    }

    /// Every filter some container subscribes.
    pub fn filters(&self) -> BTreeSet<String> {
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
        for s in subs.iter().filter(|s| s.filters.iter().any(|f| topic_matches(f, topic))) {
            let sent = match &s.sink {
                // The gateway forwards whole messages; the broker's packet limit bounds them.
                Sink::Gateway(hook) => {
                    hook(topic, payload, retain, dup);
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
    pub fn set_gateway(&self, counters: super::gateway::GatewayCounters, sent: GatewaySent) {
        let _ = self.gateway.set((counters, sent));
    }

    /// Called by the upstream connection for every message it sends that came from the local
    /// broker ([`Origin::LocalBroker`]).
    pub fn gateway_sent(&self, topic: &str, payload: &[u8]) {
        if let Some((_, sent)) = self.gateway.get() {
            sent(topic, payload);
        }
    }

    /// Gateway mode's counters, when it is on.
    pub fn gateway_snapshot(&self) -> Option<super::gateway::GatewaySnapshot> {
        self.gateway.get().map(|(c, _)| c.snapshot())
    }

    /// Registers the gateway's upstream filters; their messages go to `sink`.
    pub fn subscribe_gateway(&self, filters: Vec<String>, sink: GatewaySink) {
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

    fn unsubscribe(&self, id: u64) {
        self.subscribers.lock().unwrap_or_else(|p| p.into_inner()).retain(|s| s.id != id);
        self.subscriptions_changed.notify_one();
    }
}

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

/// Subscriptions one container may hold through `lichen:mqtt`; each costs the broker and the
/// bridge's matching, so a module cannot add them without end.
pub const MAX_GUEST_SUBSCRIPTIONS: usize = 16;

/// Whether every topic `requested` can match is one `allowed` matches too, so a module granted
/// `allowed` by its annotations may subscribe `requested`.
pub fn filter_covers(allowed: &str, requested: &str) -> bool {
    if requested.starts_with('$') && (allowed.starts_with('+') || allowed.starts_with('#')) {
        return false;
    }
    let mut a = allowed.split('/');
    let mut r = requested.split('/');
    loop {
        match (a.next(), r.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(level)) if level != "#" => {}
            (Some(x), Some(y)) if x == y && y != "+" && y != "#" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A container's side of `lichen:mqtt`: the pod's rules applied to each call.
struct GuestPort {
    pod: Arc<PodBridge>,
    /// The expanded publish annotation: the module may publish there and below.
    publish_root: Option<String>,
    /// The expanded subscribe annotation: what the module may subscribe within.
    allowed: Vec<String>,
    id: u64,
    inbox: mpsc::Sender<GuestMessage>,
    subscribed: Mutex<Vec<String>>,
}

impl GuestMqttPort for GuestPort {
    fn publish(&self, topic: &str, payload: &[u8], qos: u8, retain: bool) -> Result<(), Errno> {
        if !valid_publish_topic(topic) {
            return Err(Errno::Inval);
        }
        let allowed = self.publish_root.as_deref().is_some_and(|root| {
            topic == root || topic.strip_prefix(root).is_some_and(|rest| rest.starts_with('/'))
        });
        if !allowed {
            return Err(Errno::Acces);
        }
        let b = &self.pod.bridge;
        if payload.len() > b.max_payload {
            return Err(Errno::Msgsize);
        }
        if b.rate != 0 && !self.pod.bucket.lock().unwrap_or_else(|p| p.into_inner()).take(Instant::now()) {
            return Err(Errno::Again);
        }
        let message = SpoolMessage {
            topic: topic.to_owned(),
            qos,
            retain,
            origin: Origin::Node,
            payload: payload.to_vec(),
        };
        match (b.publish(message), qos) {
            (true, _) => Ok(()),
            (false, 0) => Err(Errno::Notconn),
            (false, _) => Err(Errno::Io),
        }
    }

    fn subscribe(&self, filter: &str) -> Result<(), Errno> {
        if !valid_filter(filter) {
            return Err(Errno::Inval);
        }
        if !self.allowed.iter().any(|a| filter_covers(a, filter)) {
            return Err(Errno::Acces);
        }
        let mut mine = self.subscribed.lock().unwrap_or_else(|p| p.into_inner());
        if mine.iter().any(|f| f == filter) {
            return Ok(());
        }
        if mine.len() >= MAX_GUEST_SUBSCRIPTIONS {
            return Err(Errno::TooBig);
        }
        mine.push(filter.to_owned());
        let b = &self.pod.bridge;
        let mut subs = b.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        match subs.iter_mut().find(|s| s.id == self.id) {
            Some(s) => s.filters = mine.clone(),
            None => subs.push(Subscriber {
                id: self.id,
                filters: mine.clone(),
                sink: Sink::Guest(self.inbox.clone()),
            }),
        }
        drop(subs);
        b.subscriptions_changed.notify_one();
        tracing::info!(pod = %format!("{}/{}", self.pod.namespace, self.pod.pod), %filter, "module subscribed through lichen:mqtt");
        Ok(())
    }
}

impl Drop for GuestPort {
    fn drop(&mut self) {
        self.pod.bridge.unsubscribe(self.id);
    }
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
            tokio::spawn(self.clone().pump(rx, topic));
            io.stdout = Some(tx);
        }
        let filters: Vec<String> =
            self.binding.subscribe.iter().filter_map(|f| expand(f, &vars).ok()).collect();
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
                self.line(&topic, line).await;
            }
            if !more {
                return;
            }
        }
    }

    async fn line(&self, topic: &str, line: Result<Option<Vec<u8>>, LineFault>) {
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
        let allowed = self.bridge.rate == 0
            || self.bucket.lock().unwrap_or_else(|p| p.into_inner()).take(Instant::now());
        if !allowed {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn templates_expand_and_unknown_placeholders_are_named() {
        let v = TopicVars { node: "pi-07", namespace: "default", pod: "temp-pi-07", container: "main" };
        assert_eq!(expand("sensors/{node}/{pod}/temp", &v).as_deref(), Ok("sensors/pi-07/temp-pi-07/temp"));
        assert_eq!(expand("{namespace}/{container}", &v).as_deref(), Ok("default/main"));
        assert!(expand("a/{host}", &v).unwrap_err().contains("{host}"));
        assert!(expand("a/{node", &v).unwrap_err().contains("unclosed"));
    }

    #[test]
    fn annotations_parse_with_defaults_and_errors_name_the_annotation() {
        assert_eq!(parse_annotations(&ann(&[])), Ok(None));
        let m = parse_annotations(&ann(&[
            (PUBLISH_ANNOTATION, "sensors/{node}/{pod}/temp"),
            (SUBSCRIBE_ANNOTATION, "commands/{node}/#, config/{pod}"),
        ]))
        .expect("valid")
        .expect("some");
        assert_eq!((m.qos, m.retain), (1, false));
        assert_eq!(m.subscribe, vec!["commands/{node}/#", "config/{pod}"]);
        let errs = parse_annotations(&ann(&[
            (PUBLISH_ANNOTATION, "a/+/b"),
            (QOS_ANNOTATION, "2"),
            (RETAIN_ANNOTATION, "yes"),
            (SUBSCRIBE_ANNOTATION, "a/#/b"),
        ]))
        .unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(fields.len(), 4, "{errs:?}");
        assert!(fields.iter().any(|f| f.contains(QOS_ANNOTATION)));
        assert!(parse_annotations(&ann(&[(QOS_ANNOTATION, "0")])).is_err(), "qos without a topic");
    }

    #[test]
    fn filters_match_like_a_broker() {
        assert!(topic_matches("commands/pi/#", "commands/pi"));
        assert!(topic_matches("commands/pi/#", "commands/pi/a/b"));
        assert!(topic_matches("a/+/c", "a/b/c"));
        assert!(!topic_matches("a/+/c", "a/b/d"));
        assert!(!topic_matches("a/+", "a/b/c"));
        assert!(topic_matches("#", "x/y"));
        assert!(!topic_matches("#", "$SYS/x"));
        assert!(!topic_matches("a/b", "a/b/c"));
        assert!(valid_filter("a/+/#") && !valid_filter("a/b#") && !valid_filter("#/a") && !valid_filter(""));
    }

    #[test]
    fn a_filter_is_covered_only_by_one_granting_everything_it_matches() {
        assert!(filter_covers("in/pi/#", "in/pi/#"));
        assert!(filter_covers("in/pi/#", "in/pi/led"));
        assert!(filter_covers("in/pi/#", "in/pi/+/x"));
        assert!(filter_covers("in/+/led", "in/pi/led"));
        assert!(filter_covers("in/+/led", "in/+/led"));
        assert!(!filter_covers("in/pi/#", "in/#"), "wider than granted");
        assert!(!filter_covers("in/pi/led", "in/pi/+"));
        assert!(!filter_covers("in/+/led", "in/#"));
        assert!(!filter_covers("in/pi", "in/pi/x"));
        assert!(!filter_covers("#", "$SYS/#"), "wildcards do not reach $ topics");
    }

    #[test]
    fn stdout_framing_text_base64_and_faults() {
        assert_eq!(decode_line(b"21.5\r", 100), Ok(Some(b"21.5".to_vec())));
        assert_eq!(decode_line(b"", 100), Ok(None));
        assert_eq!(decode_line(b"base64:AP8=", 100), Ok(Some(vec![0, 255])));
        assert_eq!(decode_line(b"base64:%%%", 100), Err(LineFault::Malformed));
        assert_eq!(decode_line(&[b'x'; 101], 100), Err(LineFault::Oversized));
    }

    #[test]
    fn stdin_framing_escapes_topics_and_carries_binary_as_base64() {
        assert_eq!(encode_incoming("commands/pi/led", b"on"), b"commands/pi/led on\n".to_vec());
        assert_eq!(encode_incoming("a b%\n", b"x"), b"a%20b%25%0A x\n".to_vec());
        assert_eq!(encode_incoming("t", &[0, 255]), b"t base64:AP8=\n".to_vec());
        assert_eq!(encode_incoming("t", b"two\nlines"), b"t base64:dHdvCmxpbmVz\n".to_vec());
        assert_eq!(encode_incoming("t", b"base64:x"), b"t base64:YmFzZTY0Ong=\n".to_vec());
        assert_eq!(encode_incoming("t", b""), b"t \n".to_vec());
        assert_eq!(encode_incoming("t", &[1, 2]), b"t base64:AQI=\n".to_vec(), "control characters");
        assert_eq!(encode_incoming("t", "a\tb é".as_bytes()), "t a\tb é\n".as_bytes().to_vec());
    }

    #[test]
    fn the_splitter_bounds_memory_and_skips_overlong_lines_whole() {
        let mut s = LineSplitter::new(4);
        let mut got = Vec::new();
        let mut out = |l: Result<&[u8], LineFault>| got.push(l.map(|b| b.to_vec()));
        s.push(b"ab\ncde", &mut out);
        s.push(b"fg\n1234\n12345", &mut out);
        s.push(b"678\nok", &mut out);
        s.finish(&mut out);
        assert_eq!(
            got,
            vec![
                Ok(b"ab".to_vec()),
                Err(LineFault::Oversized),
                Ok(b"1234".to_vec()),
                Err(LineFault::Oversized),
                Ok(b"ok".to_vec())
            ]
        );
    }

    #[test]
    fn the_token_bucket_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 5, t0);
        assert_eq!((0..8).filter(|_| b.take(t0)).count(), 5, "the burst");
        assert!(!b.take(t0 + Duration::from_millis(50)), "half a token");
        assert!(b.take(t0 + Duration::from_millis(100)));
        assert_eq!(
            (0..100).filter(|_| b.take(t0 + Duration::from_secs(60))).count(),
            5,
            "refill caps at the burst"
        );
    }
}
