//! Gateway mode ([`Gateway`]): a board serving LAN sensors bridges its local broker (Mosquitto, as
//! its own service) to the upstream broker (`mqtt.broker`).
//!
//! - **Up**: the gateway subscribes each `up`/`both` mapping's `local` filter on the local broker,
//!   as a client of its own (`gateway.client_id`, persistent session, manual acknowledgements).
//!   A message is appended to the durable spool (origin [`Origin::LocalBroker`]) under
//!   `upstream_prefix` + its topic, and only then acknowledged to the local broker, so it is as
//!   safe as a module's own QoS 1 line: at least once, in order per topic, through upstream
//!   outages and agent restarts (within the spool's budget). QoS 0 stays QoS 0 (never spooled).
//! - **Down**: the upstream connection subscribes `upstream_prefix` + `local` for each
//!   `down`/`both` mapping; a message has its prefix taken off and is appended to a durable spool
//!   of its own ([`SpoolTree::Local`], origin [`Origin::Upstream`]) before the upstream broker gets
//!   its acknowledgement. The local connection drains that spool in order like the upstream one
//!   drains its own, removing each message when the local broker acknowledges it: at least once,
//!   in order, through local broker outages and agent restarts, within
//!   `down_spool_max_bytes` (beyond it the oldest are dropped and counted).
//!
//! # Loop prevention
//! MQTT 3.1.1 has no "no local" option: a broker sends a client its own publications back when
//! one of its subscriptions matches. With `both`, `sensors/t` going up as `site1/sensors/t`
//! matches the upstream subscription `site1/sensors/#` and would come straight back down, then up
//! again, forever. Payloads cannot carry a marker (they belong to the sensors), and MQTT 3.1.1 has
//! no user properties, so every message the gateway publishes is remembered on the side it was
//! published to ([`EchoTable`]: topic and payload hash, per copy), and the first matching message
//! to arrive back from that broker is recognised as the echo and dropped (counted as
//! `loops_suppressed`). An entry is kept at least [`ECHO_TTL`], and beyond it until the echo of a
//! later message has come back: a broker's backlog (what it queued for the gateway through an
//! outage) delays echoes without reordering them, so no clock alone can say an echo is lost.
//!
//! A broker sends an echo again after a reconnect when the gateway's acknowledgement of it was
//! lost with the connection, and after a broker restart that copy may come without the `dup`
//! flag (seen once in CI: one sensor message came back down through an upstream restart). So an
//! echo taken on one connection leaves one credit for a repeat on a later one: the gateway then
//! takes as echoes what it sent plus what it took before each reconnect, never more. Every hop
//! checks, so even a duplicate that slips through crosses once and is stopped at the next broker.
//! The cost: a message another client publishes with the same topic and payload while the
//! gateway still remembers one it forwarded, on the broker the gateway forwarded to, may be
//! taken for the echo (it is still delivered to that broker's other subscribers; only its
//! forwarding is skipped).

pub mod counters;

pub use counters::{GatewayCounters, GatewaySnapshot};

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{MqttOptions, QoS};
use tokio_util::sync::CancellationToken;

use super::bridge::{Arrival, MqttBridge};
use super::options::{MqttError, options};
use super::session::{self, Link, SessionError};
use super::spool::{Origin, SpoolMessage, TelemetrySpool};
use crate::config::{GatewayConfig, GatewayMapping, MqttConfig};
use crate::retry::RetryBackoff;
#[cfg(doc)]
use crate::store::SpoolTree;
use crate::topic::{TopicFilter, TopicName};

/// The least time a forwarded message is remembered to recognise its echo; beyond it, until the
/// echo of a message sent after it has come back (see [`EchoTable`]).
pub const ECHO_TTL: Duration = Duration::from_secs(30);
/// The most time a forwarded message is remembered, for an echo that never comes (a broker that
/// dropped it, or refuses the gateway's subscription).
pub const ECHO_MAX_AGE: Duration = Duration::from_secs(600);
/// Most forwarded messages remembered per broker; beyond it the oldest are forgotten.
const ECHO_CAPACITY: usize = 65_536;

/// The messages the gateway published to one broker and has not seen come back yet.
///
/// How long an entry lives follows the broker's order, not only the clock: a broker sends a
/// subscriber what it took in the order it took it, so a backlog there (the downstream messages
/// queued for the gateway through an outage, a slow board draining them) delays an echo without
/// reordering it. An entry is forgotten once it is [`ECHO_TTL`] old *and* the echo of a copy sent
/// after it has come back (then its own echo came before that one, or is not coming), or once it
/// is [`ECHO_MAX_AGE`] old. With the clock alone, an echo stuck behind more than [`ECHO_TTL`] of
/// backlog came back as a fresh message and crossed once more.
#[derive(Debug, Default)]
pub struct EchoTable {
    entries: HashMap<(String, u64), Echo>,
    /// When the newest copy whose echo came back (first delivery, not a resend) was sent.
    horizon: Option<Instant>,
    /// When expired entries are next swept out: most are never looked up again (a sensor's
    /// readings differ), and would otherwise stay until the table is full.
    sweep_at: Option<Instant>,
}

/// One (topic, payload) the gateway published, and what came back of it.
#[derive(Debug, Clone)]
struct Echo {
    /// When each copy whose echo has not arrived yet was sent, oldest first.
    copies: VecDeque<Instant>,
    /// Echoes taken on a connection since lost: each may come once more, `dup` flag or not.
    repeats: u32,
    /// Echoes taken on `connection`.
    taken: u32,
    /// The connection the last echo arrived on.
    connection: u64,
    /// When the last copy was sent.
    at: Instant,
}

fn payload_hash(payload: &[u8]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    payload.hash(&mut h);
    h.finish()
}

impl Echo {
    fn new(now: Instant) -> Echo {
        Echo { copies: VecDeque::new(), repeats: 0, taken: 0, connection: 0, at: now }
    }

    /// Whether this entry is over (see [`EchoTable`]).
    fn expired(&self, horizon: Option<Instant>, now: Instant) -> bool {
        let age = now.saturating_duration_since(self.at);
        age >= ECHO_MAX_AGE || (age >= ECHO_TTL && horizon.is_some_and(|h| h > self.at))
    }
}

impl EchoTable {
    /// Remembers one copy of a message published at `now`.
    pub fn record(&mut self, topic: &str, payload: &[u8], now: Instant) {
        let horizon = self.horizon;
        if self.entries.len() >= ECHO_CAPACITY || self.sweep_at.is_none_or(|at| now >= at) {
            self.entries.retain(|_, e| !e.expired(horizon, now));
            self.sweep_at = Some(now + ECHO_TTL);
            if self.entries.len() >= ECHO_CAPACITY {
                // Still full of live entries: forget the oldest.
                if let Some(oldest) = self.entries.iter().min_by_key(|(_, e)| e.at).map(|(k, _)| k.clone()) {
                    self.entries.remove(&oldest);
                }
            }
        }
        let e =
            self.entries.entry((topic.to_owned(), payload_hash(payload))).or_insert_with(|| Echo::new(now));
        if e.expired(horizon, now) {
            // What an expired entry counted is over: nothing of it may excuse a message now.
            *e = Echo::new(now);
        }
        e.copies.push_back(now);
        e.at = now;
    }

    /// Whether a message arriving on `connection` (a number that changes with every connection to
    /// the broker) is the echo of one the gateway published; each echo taken uses up one copy, or
    /// one repeat of an echo taken on an earlier connection. A broker's resend flagged `dup` of
    /// an echo already taken is an echo too, so a used-up entry is kept until it expires.
    pub fn take(&mut self, topic: &str, payload: &[u8], dup: bool, connection: u64, now: Instant) -> bool {
        let key = (topic.to_owned(), payload_hash(payload));
        let Some(e) = self.entries.get_mut(&key) else { return false };
        if e.expired(self.horizon, now) {
            self.entries.remove(&key);
            return false;
        }
        if e.connection != connection {
            // What was taken on the connection before may all come again on this one.
            e.repeats = e.repeats.saturating_add(e.taken);
            e.taken = 0;
            e.connection = connection;
        }
        let echo = if let Some(sent) = e.copies.pop_front() {
            // A first delivery says how far the broker's queue has come (a resend flagged `dup`
            // may come ahead of its place). The oldest copy is taken to be the one that came
            // back, which can only hold the horizon back, never move it too far.
            if !dup {
                self.horizon = Some(self.horizon.map_or(sent, |h| h.max(sent)));
            }
            true
        } else if e.repeats > 0 {
            e.repeats -= 1;
            true
        } else {
            dup
        };
        if echo {
            e.taken = e.taken.saturating_add(1);
        }
        echo
    }
}

/// The upstream topic for a local one, by the first `up`/`both` mapping whose filter matches.
pub fn map_up(mappings: &[GatewayMapping], local_topic: &str) -> Option<String> {
    mappings
        .iter()
        .find(|m| m.up() && m.local.matches(local_topic))
        .map(|m| format!("{}{}", m.upstream_prefix, local_topic))
}

/// The local topic for an upstream one, by the first `down`/`both` mapping whose upstream filter
/// matches and whose prefix it carries (the prefix is taken off; nothing may be left empty).
pub fn map_down(mappings: &[GatewayMapping], upstream_topic: &str) -> Option<String> {
    mappings.iter().filter(|m| m.down()).find_map(|m| {
        let local = upstream_topic.strip_prefix(m.upstream_prefix.as_str())?;
        (TopicName::is_valid(local) && m.local.matches(local)).then(|| local.to_owned())
    })
}

/// The gateway task; see the module docs.
pub struct Gateway {
    mqtt: MqttConfig,
    path: UpPath,
    down: Arc<TelemetrySpool>,
}

/// What handles messages from the local broker (and remembers what went to it).
struct UpPath {
    gateway: GatewayConfig,
    bridge: Arc<MqttBridge>,
    stats: GatewayCounters,
    local_echo: EchoTable,
    /// Counts connections to the local broker, for [`EchoTable::take`].
    connection: u64,
}

impl Gateway {
    /// Registers the downstream filters with the upstream connection and returns the gateway, to
    /// be run with [`Gateway::run`]. `down` is the spool towards the local broker
    /// ([`SpoolTree::Local`]); its group committer is the caller's to run.
    pub fn new(
        mqtt: &MqttConfig,
        bridge: Arc<MqttBridge>,
        down: Arc<TelemetrySpool>,
    ) -> (Gateway, GatewayCounters) {
        let gateway = mqtt.gateway.clone();
        let stats = GatewayCounters(Arc::default(), down.clone());
        let up_echo = Arc::new(Mutex::new(EchoTable::default()));
        // Config validation refused any mapping whose upstream filter is not one.
        let filters: Vec<TopicFilter> = gateway
            .mappings
            .iter()
            .filter(|m| m.down())
            .filter_map(|m| m.upstream_topic_filter().ok())
            .collect();
        let (hook_stats, hook_echo, mappings, spool) =
            (stats.clone(), up_echo.clone(), gateway.mappings.clone(), down.clone());
        bridge.subscribe_gateway(
            filters,
            Arc::new(move |arrival: &Arrival| {
                let s = &hook_stats.0;
                let Arrival { topic, payload, retain, dup, connection } = *arrival;
                if hook_echo.lock().unwrap_or_else(|p| p.into_inner()).take(topic, payload, dup, connection, Instant::now()) {
                    s.loops_suppressed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                let Some(local) = map_down(&mappings, topic) else { return };
                // The upstream connection subscribes at QoS 1, so what arrives is QoS 0 or 1 as
                // published; it is forwarded at QoS 1 either way (the local hop is cheap). The
                // upstream connection acknowledges it once this returns: it is in the spool.
                let m = SpoolMessage { topic: local, qos: 1, retain, origin: Origin::Upstream, payload: payload.to_vec() };
                if let Err(e) = spool.append(&m) {
                    s.dropped_down.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, topic = %m.topic, "gateway: cannot spool a message from upstream; dropped");
                }
            }),
        );
        // The upstream connection reports every message of the gateway's it sends (each resend
        // too: each can come back once); only one a down mapping would bring back can echo.
        let (sent_echo, sent_mappings) = (up_echo, gateway.mappings.clone());
        bridge.set_gateway(
            stats.clone(),
            Arc::new(move |topic: &str, payload: &[u8]| {
                if map_down(&sent_mappings, topic).is_some() {
                    sent_echo.lock().unwrap_or_else(|p| p.into_inner()).record(
                        topic,
                        payload,
                        Instant::now(),
                    );
                }
            }),
        );
        let g = Gateway {
            mqtt: mqtt.clone(),
            path: UpPath {
                gateway,
                bridge,
                stats: stats.clone(),
                local_echo: EchoTable::default(),
                connection: 0,
            },
            down,
        };
        (g, stats)
    }

    /// Connects to the local broker and forwards until `cancel` fires; reconnects back off like
    /// the upstream connection's. Each connection reads the down spool again from its oldest
    /// message, so what the local broker did not acknowledge is sent again, in order (see
    /// [`super::session`]).
    pub async fn run(self, cancel: CancellationToken) {
        let Gateway { mqtt, path, down } = self;
        let gw = &path.gateway;
        let local = MqttConfig {
            broker: gw.local_broker.clone(),
            client_id: gw.client_id.clone(),
            // The local broker is the LAN's: no credentials or client certificate of upstream's.
            username: String::new(),
            password_file: Default::default(),
            ca_file: Default::default(),
            client_cert_file: Default::default(),
            client_key_file: Default::default(),
            ..mqtt
        };
        // Subscribed on every connection (the broker may have lost the session), in one
        // SUBSCRIBE: its SUBACK, logged, says the broker routes the LAN's messages to the gateway.
        let filters = gw.mappings.iter().filter(|m| m.up()).map(|m| m.local.clone()).collect();
        session::run(LocalLink { local, path, down, filters }, cancel).await
    }
}

/// The gateway's connection to the local broker, as the session driver sees it.
struct LocalLink {
    local: MqttConfig,
    path: UpPath,
    down: Arc<TelemetrySpool>,
    filters: BTreeSet<TopicFilter>,
}

impl Link for LocalLink {
    fn broker(&self) -> String {
        self.local.broker.as_ref().map(ToString::to_string).unwrap_or_default()
    }

    fn options(&self) -> Result<MqttOptions, MqttError> {
        let client_id = &self.path.gateway.client_id;
        let mut o = options(&self.local, client_id)?;
        // The gateway announces nothing on the local broker: no will, no status topic.
        o.set_last_will(rumqttc::LastWill::new(
            format!("lichen/{client_id}/gateway"),
            "offline",
            QoS::AtMostOnce,
            false,
        ));
        // rumqttc stops reading requests (acknowledgements included) while its in-flight window
        // is full; the gateway keeps its own publishes one below it, so acknowledgements of
        // incoming messages always get through.
        o.set_inflight(self.local.inflight.max(1).saturating_add(1));
        Ok(o)
    }

    fn window(&self) -> usize {
        usize::from(self.local.inflight.max(1))
    }

    fn spool(&self) -> &Arc<TelemetrySpool> {
        &self.down
    }

    fn backoff(&self) -> RetryBackoff {
        RetryBackoff::new(
            Duration::from_millis(self.local.reconnect_min_ms),
            Duration::from_millis(self.local.reconnect_max_ms),
        )
    }

    fn connected(&mut self, ack: &rumqttc::ConnAck) {
        tracing::info!(broker = %self.broker(), session_present = ack.session_present, spooled = self.down.snapshot().entries, "gateway: connected to the local MQTT broker");
        self.path.stats.0.connected.store(true, Ordering::Relaxed);
        self.path.connection += 1;
    }

    fn lost(&mut self, _connected_for: Option<Duration>, error: &SessionError, delay: Duration) {
        self.path.stats.0.connected.store(false, Ordering::Relaxed);
        tracing::warn!(broker = %self.broker(), %error, spooled = self.down.snapshot().entries, retry_in_ms = delay.as_millis() as u64, "gateway: cannot reach the local MQTT broker");
    }

    fn closed(&self) {
        self.path.stats.0.connected.store(false, Ordering::Relaxed);
    }

    fn wanted(&self) -> BTreeSet<TopicFilter> {
        self.filters.clone()
    }

    fn subscribed(&self, filters: &[TopicFilter], refused: bool) {
        let filters: Vec<&str> = filters.iter().map(TopicFilter::as_str).collect();
        if refused {
            tracing::warn!(?filters, "gateway: the local broker refused a subscription (check its ACL)");
        } else {
            tracing::info!(?filters, "gateway: subscribed on the local broker");
        }
    }

    fn sent(&mut self, m: &SpoolMessage) {
        self.path.local_echo.record(&m.topic, &m.payload, Instant::now());
    }

    fn acked(&mut self) {
        self.path.stats.0.forwarded_down.fetch_add(1, Ordering::Relaxed);
    }

    async fn incoming(&mut self, p: &rumqttc::Publish) {
        // Acknowledged (by the driver) once spooled: the local broker keeps it until then.
        self.path.up(p).await;
    }
}

impl UpPath {
    /// A message from the local broker: its echo is dropped, anything else goes upstream (QoS 1
    /// through the spool). The caller acknowledges it afterwards.
    async fn up(&mut self, p: &rumqttc::Publish) {
        let now = Instant::now();
        if self.local_echo.take(&p.topic, &p.payload, p.dup, self.connection, now) {
            self.stats.0.loops_suppressed.fetch_add(1, Ordering::Relaxed);
        } else if let Some(topic) = map_up(&self.gateway.mappings, &p.topic) {
            let qos = if p.qos == QoS::AtMostOnce { 0 } else { 1 };
            let message = SpoolMessage {
                topic,
                qos,
                retain: p.retain,
                origin: Origin::LocalBroker,
                payload: p.payload.to_vec(),
            };
            // QoS 0 waits briefly for the upstream connection's queue, as a module's lines do.
            let taken = if qos == 0 {
                self.bridge.publish_waiting(message).await
            } else {
                self.bridge.publish(message)
            };
            if taken {
                self.stats.0.forwarded_up.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GatewayDirection;

    fn mapping(local: &str, prefix: &str, direction: GatewayDirection) -> GatewayMapping {
        let local = TopicFilter::parse(local).expect("a valid filter");
        GatewayMapping { local, upstream_prefix: prefix.into(), direction }
    }

    #[test]
    fn topics_map_with_prefixes_both_ways() {
        let m = vec![
            mapping("sensors/#", "site1/", GatewayDirection::Both),
            mapping("cmd/#", "site1/", GatewayDirection::Down),
            mapping("raw/+", "", GatewayDirection::Up),
        ];
        assert_eq!(map_up(&m, "sensors/t").as_deref(), Some("site1/sensors/t"));
        assert_eq!(map_up(&m, "raw/x").as_deref(), Some("raw/x"));
        assert_eq!(map_up(&m, "cmd/led"), None, "down only");
        assert_eq!(map_down(&m, "site1/cmd/led").as_deref(), Some("cmd/led"));
        assert_eq!(map_down(&m, "site1/sensors/t").as_deref(), Some("sensors/t"));
        assert_eq!(map_down(&m, "raw/x"), None, "up only");
        assert_eq!(map_down(&m, "site1/other"), None);
        assert_eq!(map_down(&m, "site1"), None, "the parent the filter matches has no local topic");
    }

    #[test]
    fn an_echo_is_taken_once_per_copy_and_forgotten_after_its_time() {
        let t0 = Instant::now();
        let mut e = EchoTable::default();
        e.record("a", b"1", t0);
        e.record("a", b"1", t0);
        assert!(!e.take("a", b"2", false, 1, t0), "another payload");
        assert!(!e.take("b", b"1", false, 1, t0), "another topic");
        assert!(e.take("a", b"1", false, 1, t0));
        assert!(e.take("a", b"1", false, 1, t0));
        assert!(!e.take("a", b"1", false, 1, t0), "two copies, two echoes");
        assert!(e.take("a", b"1", true, 1, t0), "a broker's resend of an echo is an echo");
        e.record("a", b"1", t0);
        assert!(!e.take("a", b"1", true, 1, t0 + ECHO_MAX_AGE), "expired");
    }

    /// A backlog on the broker delays echoes beyond [`ECHO_TTL`] without reordering them: an echo
    /// is still one until the echo of a later message has come back.
    #[test]
    fn an_echo_late_behind_a_backlog_is_still_an_echo_and_one_overtaken_is_lost() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut e = EchoTable::default();
        e.record("a", b"1", t0);
        e.record("b", b"1", t0 + ms(1));
        // A second copy of "a", sent after "b": the first echo of "a" must not stand for it.
        e.record("a", b"1", t0 + ms(2));
        let late = t0 + ECHO_TTL * 3;
        assert!(e.take("a", b"1", false, 1, late), "the first echo, far behind a backlog");
        assert!(e.take("b", b"1", false, 1, late), "sent after the first copy of a: still awaited");
        assert!(e.take("a", b"1", false, 1, late), "the second copy's echo");
        assert!(!e.take("a", b"1", false, 1, late), "nothing more was sent");
        // "c" was sent before "d", and d's echo is in: c's is not coming, and once c is
        // ECHO_TTL old an arrival like it is someone else's message.
        e.record("c", b"1", late);
        e.record("d", b"1", late + ms(1));
        assert!(e.take("d", b"1", false, 1, late + ECHO_TTL));
        assert!(!e.take("c", b"1", false, 1, late + ECHO_TTL), "overtaken and old: lost");
        // A broker's resend (dup) does not move the horizon: it may come ahead of its place.
        let mut e = EchoTable::default();
        e.record("f", b"1", t0);
        e.record("g", b"1", t0 + ms(1));
        assert!(e.take("g", b"1", true, 1, t0 + ECHO_TTL));
        assert!(e.take("f", b"1", false, 1, t0 + ECHO_TTL), "a resend of a later one overtook it");
        // With no echo coming at all, an entry lasts ECHO_MAX_AGE.
        let mut e = EchoTable::default();
        e.record("e", b"1", t0);
        e.record("e", b"2", t0);
        assert!(e.take("e", b"1", false, 1, t0 + ECHO_MAX_AGE - ms(1)));
        assert!(!e.take("e", b"2", false, 1, t0 + ECHO_MAX_AGE));
    }

    /// What CI saw once through an upstream restart: the gateway's message came back and was
    /// taken, the acknowledgement of that echo was lost with the connection, the gateway sent its
    /// message again (no acknowledgement either), and on the new connection the broker sent both
    /// the old echo again, unflagged, and the echo of the new copy.
    #[test]
    fn an_echo_taken_before_a_reconnect_may_come_once_more_unflagged() {
        let t0 = Instant::now();
        let mut e = EchoTable::default();
        e.record("a", b"1", t0);
        assert!(e.take("a", b"1", false, 1, t0));
        e.record("a", b"1", t0);
        assert!(e.take("a", b"1", false, 2, t0), "the old echo again");
        assert!(e.take("a", b"1", false, 2, t0), "the resend's echo");
        assert!(!e.take("a", b"1", false, 2, t0), "a third copy on the same connection is someone else's");
        // Both echoes taken on connection 2 may come again on connection 3, and no more.
        assert!(e.take("a", b"1", false, 3, t0));
        assert!(e.take("a", b"1", false, 3, t0));
        assert!(!e.take("a", b"1", false, 3, t0));
        // An entry sent again after it expired starts afresh: the old echo's repeat is gone.
        e.record("a", b"1", t0 + ECHO_MAX_AGE);
        assert!(e.take("a", b"1", false, 4, t0 + ECHO_MAX_AGE));
        assert!(!e.take("a", b"1", false, 4, t0 + ECHO_MAX_AGE), "no repeat left from before it expired");
        // Without a reconnect, an unflagged repeat is a new message.
        let mut e = EchoTable::default();
        e.record("b", b"1", t0);
        assert!(e.take("b", b"1", false, 7, t0));
        assert!(!e.take("b", b"1", false, 7, t0));
    }

    #[test]
    fn expired_entries_are_swept_out_though_never_looked_up_again() {
        let t0 = Instant::now();
        let mut e = EchoTable::default();
        for i in 0..100u32 {
            e.record("t", &i.to_be_bytes(), t0 + Duration::from_millis(i.into()));
        }
        let newest = t0 + Duration::from_millis(99);
        assert!(e.take("t", &99u32.to_be_bytes(), false, 1, newest), "the newest echo is in");
        e.record("t", b"later", newest + ECHO_TTL);
        assert_eq!(e.entries.len(), 2, "the old readings went; the newest and the latest stay");
    }

    #[test]
    fn the_echo_table_is_bounded() {
        let t0 = Instant::now();
        let mut e = EchoTable::default();
        for i in 0..ECHO_CAPACITY + 10 {
            e.record(&i.to_string(), b"x", t0 + Duration::from_nanos(i as u64));
        }
        assert_eq!(e.entries.len(), ECHO_CAPACITY);
        assert!(!e.take("0", b"x", false, 1, t0), "the oldest went first");
        assert!(e.take(&(ECHO_CAPACITY + 9).to_string(), b"x", false, 1, t0 + Duration::from_secs(1)));
    }
}
