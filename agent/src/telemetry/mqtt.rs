//! The broker connection ([`MqttClient`]): owns rumqttc's `EventLoop`, sends the spool's messages in
//! order with at most `inflight` unacknowledged, removes each from the spool when its PUBACK
//! arrives, subscribes the filters pods asked for and hands incoming messages to the bridge.
//!
//! rumqttc reconnects as fast as it is polled; this module adds capped exponential back-off with
//! jitter ([`RetryBackoff`]). Each connection gets a fresh `EventLoop`, so nothing rumqttc kept in
//! memory is resent behind the spool's back: after a reconnect the spool is read again from its
//! oldest unacknowledged message, which keeps order per topic (first arrivals are in order;
//! resent messages may repeat ones the broker had already taken).
//!
//! The node announces itself on `lichen/<node>/status`: a retained `online` after each connect, a
//! retained `offline` on clean shutdown, and the same `offline` as the last will when the
//! connection dies without one.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS, Transport};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::bridge::MqttBridge;
use super::spool::{Origin, SpoolMessage, TelemetrySpool};
use crate::config::MqttConfig;
use crate::retry::RetryBackoff;

/// How long a connection attempt (TCP, TLS and CONNACK) may take.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection that lasted this long resets the back-off; a broker that accepts and drops at once
/// (a client id taken over, say) is retried with growing delays.
pub(super) const STABLE_CONNECTION: Duration = Duration::from_secs(5);
/// How long a clean shutdown waits to announce `offline` and disconnect.
const DISCONNECT_GRACE: Duration = Duration::from_secs(1);
/// Events handled in one go before the session looks at the spool again.
const EVENT_BURST: usize = 256;
/// How long a QoS 0 message waits for room in rumqttc's request queue before it is dropped.
const QOS0_QUEUE_WAIT: Duration = Duration::from_millis(50);
/// Largest packet accepted from the broker; a bigger one ends the connection (MQTT 3.1.1 has no way
/// to tell the broker), so it is generous.
const MAX_INCOMING_PACKET: usize = 1 << 20;

/// Errors setting up the connection; each names the setting to fix.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// A file named in `[mqtt]` could not be read.
    #[error("cannot read {field} {path}: {source}")]
    ReadFile {
        /// The setting.
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A certificate or key file has no usable PEM content.
    #[error("{field} {path}: {message}")]
    Pem {
        /// The setting.
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the TLS settings.
    #[error("TLS settings for the MQTT broker: {0}")]
    Tls(String),
}

/// A parsed `mqtt.broker`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// Whether to use TLS (`mqtts://`).
    pub tls: bool,
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
}

impl BrokerUrl {
    /// Parses `mqtt://host[:port]` or `mqtts://host[:port]` (IPv6 as `[::1]`).
    pub fn parse(url: &str) -> Result<Self, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("mqtt://") {
            (false, r)
        } else {
            return Err(format!("{url:?}: use mqtt://host[:port] or mqtts://host[:port]"));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') || rest.contains('@') || rest.contains('?') {
            return Err(format!(
                "{url:?}: give only host and port (credentials go in mqtt.username and mqtt.password_file)"
            ));
        }
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| format!("{url:?}: unclosed '['"))?;
            match after.strip_prefix(':') {
                Some(p) => (host, Some(p)),
                None if after.is_empty() => (host, None),
                None => return Err(format!("{url:?}: unexpected {after:?} after the address")),
            }
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err(format!("{url:?} names no host"));
        }
        let port = match port {
            None => default_port,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => return Err(format!("{url:?}: {p:?} is not a port number")),
            },
        };
        Ok(BrokerUrl { tls, host: host.to_owned(), port })
    }
}

/// The topic the node's `online`/`offline` status is retained on.
pub fn status_topic(node: &str) -> String {
    format!("lichen/{node}/status")
}

/// Whether `topic` may be published to: not empty, no wildcards, no NUL, at most 65535 bytes.
pub fn valid_publish_topic(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= 65_535 && !topic.contains(['+', '#', '\0'])
}

/// Builds rumqttc's options from `[mqtt]`: TLS on ring, credentials, keep-alive, session, will.
pub fn options(config: &MqttConfig, node: &str) -> Result<MqttOptions, MqttError> {
    let url = BrokerUrl::parse(&config.broker).map_err(MqttError::Tls)?;
    let id = if config.client_id.is_empty() { node } else { &config.client_id };
    let mut o = MqttOptions::new(id, url.host.clone(), url.port);
    o.set_keep_alive(Duration::from_secs(config.keep_alive_secs.max(5)))
        .set_clean_session(!config.persistent_session)
        .set_inflight(config.inflight.max(1))
        .set_max_packet_size(
            MAX_INCOMING_PACKET.max(config.max_payload.0 as usize + (64 << 10)),
            config.max_payload.0 as usize + (64 << 10) + 16,
        )
        .set_last_will(LastWill::new(status_topic(node), "offline", QoS::AtLeastOnce, true));
    if !config.username.is_empty() || !config.password_file.as_os_str().is_empty() {
        let password = if config.password_file.as_os_str().is_empty() {
            String::new()
        } else {
            read("mqtt.password_file", &config.password_file)
                .map(|b| String::from_utf8_lossy(&b).trim_end_matches(['\n', '\r']).to_owned())?
        };
        o.set_credentials(config.username.clone(), password);
    }
    if url.tls {
        o.set_transport(Transport::Tls(rumqttc::TlsConfiguration::Rustls(Arc::new(tls_config(config)?))));
    }
    Ok(o)
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, MqttError> {
    std::fs::read(path).map_err(|source| MqttError::ReadFile { field, path: path.to_owned(), source })
}

/// A rustls client config on the ring provider (never the process default, never aws-lc).
fn tls_config(config: &MqttConfig) -> Result<rustls::ClientConfig, MqttError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let pem_err =
        |field, path: &Path, message: String| MqttError::Pem { field, path: path.to_owned(), message };
    let mut roots = rustls::RootCertStore::empty();
    if config.ca_file.as_os_str().is_empty() {
        let native = rustls_native_certs::load_native_certs();
        let (added, _) = roots.add_parsable_certificates(native.certs);
        if added == 0 {
            return Err(MqttError::Tls(
                "no system CA certificates found; set mqtt.ca_file to the broker's CA".into(),
            ));
        }
    } else {
        let pem = read("mqtt.ca_file", &config.ca_file)?;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| pem_err("mqtt.ca_file", &config.ca_file, e.to_string()))?;
            roots.add(cert).map_err(|e| pem_err("mqtt.ca_file", &config.ca_file, e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(pem_err("mqtt.ca_file", &config.ca_file, "holds no PEM certificate".into()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| MqttError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    if config.client_cert_file.as_os_str().is_empty() {
        return Ok(builder.with_no_client_auth());
    }
    let (cert_path, key_path) = (&config.client_cert_file, &config.client_key_file);
    let pem = read("mqtt.client_cert_file", cert_path)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| pem_err("mqtt.client_cert_file", cert_path, e.to_string()))?;
    if chain.is_empty() {
        return Err(pem_err("mqtt.client_cert_file", cert_path, "holds no PEM certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(&read("mqtt.client_key_file", key_path)?)
        .map_err(|e| pem_err("mqtt.client_key_file", key_path, e.to_string()))?;
    builder.with_client_auth_cert(chain, key).map_err(|e| MqttError::Tls(format!("client certificate: {e}")))
}

fn qos(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// Waits for the CONNACK of a new event loop's first connection: `Ok` once the broker accepted,
/// `Err(None)` if `cancel` fired, `Err(Some(why))` otherwise (naming what to check).
pub(super) async fn connect(
    ev: &mut EventLoop,
    cancel: &CancellationToken,
) -> Result<rumqttc::ConnAck, Option<String>> {
    let connack = tokio::select! {
        _ = cancel.cancelled() => return Err(None),
        r = tokio::time::timeout(CONNECT_TIMEOUT, ev.poll()) => r,
    };
    match connack {
        Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) if ack.code == rumqttc::ConnectReturnCode::Success => {
            Ok(ack)
        }
        Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => Err(Some(format!(
            "the broker refused the connection: {:?} (check the username, password file and client id)",
            ack.code
        ))),
        Ok(Ok(other)) => Err(Some(format!("unexpected first packet {other:?}"))),
        Ok(Err(e)) => Err(Some(e.to_string())),
        Err(_) => Err(Some(format!("no CONNACK within {}s", CONNECT_TIMEOUT.as_secs()))),
    }
}

/// Events of one connection, as a channel. The event loop runs in a task of its own and is never
/// dropped mid-poll: a poll cancelled after taking a request from rumqttc's channel would lose that
/// publish and put every later PUBACK on the wrong message. The task ends at the connection's
/// first error (sent on as the last event); abort it when the session ends.
pub(super) type Events = mpsc::Receiver<Result<Event, rumqttc::ConnectionError>>;

/// The event just received and up to [`EVENT_BURST`] in all of those already waiting, in order,
/// and why the connection ended if one of them says it did (the events before it still count:
/// acknowledgements among them).
pub(super) fn take_burst(
    first: Option<Result<Event, rumqttc::ConnectionError>>,
    events: &mut Events,
) -> (Vec<Event>, Option<String>) {
    let mut burst = Vec::new();
    let mut next = first;
    loop {
        match next {
            None => return (burst, Some("the MQTT event loop stopped".into())),
            Some(Err(e)) => return (burst, Some(e.to_string())),
            Some(Ok(e)) => burst.push(e),
        }
        if burst.len() >= EVENT_BURST {
            return (burst, None);
        }
        match events.try_recv() {
            Ok(e) => next = Some(e),
            Err(_) => return (burst, None),
        }
    }
}

/// Starts polling a connected event loop; see [`Events`].
pub(super) fn spawn_poller(mut ev: EventLoop) -> (tokio::task::JoinHandle<()>, Events) {
    let (events_tx, events) = mpsc::channel(1024);
    let poller = tokio::spawn(async move {
        loop {
            let event = ev.poll().await;
            let failed = event.is_err();
            if events_tx.send(event).await.is_err() || failed {
                return;
            }
        }
    });
    (poller, events)
}

/// Acknowledgements owed to the broker for incoming QoS 1 messages, sent once each is delivered
/// ([`MqttBridge::deliver`]: in a container's queue, or in the gateway's spool), in the order they
/// arrived (MQTT 3.1.1 section 4.6). rumqttc's automatic acknowledgement would answer on arrival,
/// so messages still queued between its event loop and the bridge when the agent stops would be
/// acknowledged and lost; unacknowledged, the broker sends them again on the next connection.
#[derive(Default)]
pub(super) struct Acks {
    queue: VecDeque<rumqttc::Publish>,
}

impl Acks {
    /// Owes the broker an acknowledgement for `p` (none for QoS 0).
    pub(super) fn push(&mut self, mut p: rumqttc::Publish) {
        if p.qos != QoS::AtMostOnce {
            // Only the packet id and QoS are needed for the acknowledgement.
            p.payload = Default::default();
            self.queue.push_back(p);
        }
    }

    /// Sends what is owed; `true` if rumqttc's request queue was full (try again shortly).
    pub(super) fn send(&mut self, client: &AsyncClient) -> bool {
        while let Some(p) = self.queue.front() {
            if client.try_ack(p).is_err() {
                return true;
            }
            self.queue.pop_front();
        }
        false
    }
}

/// A spool's messages on one connection (each connection starts a new one, and so reads the spool
/// again from its oldest message). rumqttc reports every publish handed to it as
/// `Outgoing::Publish` with the packet id it chose, in the order they were handed over, which is
/// how a PUBACK finds its spool entry.
#[derive(Default)]
pub(super) struct Outbox {
    /// Publishes handed to rumqttc and not yet reported: a spool entry, or `None` for another
    /// message (QoS 0, the status) that also gets reported.
    sent: VecDeque<Option<u64>>,
    /// Spool entries by packet id, until acknowledged.
    inflight: HashMap<u16, u64>,
    /// The last spool entry handed over on this connection.
    cursor: Option<u64>,
}

impl Outbox {
    /// Spool entries handed over and not yet acknowledged.
    pub(super) fn in_flight(&self) -> usize {
        self.inflight.len() + self.sent.iter().filter(|s| s.is_some()).count()
    }

    /// Hands over spool entries in order while fewer than `window` are in flight; `sent` is told
    /// of each one rumqttc took. Returns `true` if rumqttc's request queue was full.
    pub(super) fn fill(
        &mut self,
        client: &AsyncClient,
        spool: &TelemetrySpool,
        window: usize,
        mut sent: impl FnMut(&SpoolMessage),
    ) -> bool {
        while self.in_flight() < window {
            let batch = match spool.next_batch(self.cursor, window - self.in_flight()) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, spool = spool.tree().name(), "cannot read the MQTT spool");
                    return false;
                }
            };
            if batch.is_empty() {
                return false;
            }
            for (seq, m) in batch {
                if !valid_publish_topic(&m.topic) {
                    tracing::warn!(seq, topic = %m.topic, "dropping a spooled message with an invalid topic");
                    spool.ack(seq);
                    self.cursor = Some(seq);
                    continue;
                }
                if client
                    .try_publish(m.topic.clone(), qos(m.qos.max(1)), m.retain, m.payload.clone())
                    .is_err()
                {
                    return true;
                }
                // Told after the hand-over, yet before any echo can be read: the session that
                // reads events is this one.
                sent(&m);
                self.sent.push_back(Some(seq));
                self.cursor = Some(seq);
            }
        }
        false
    }

    /// A publish other than a spool entry was handed over.
    pub(super) fn other_sent(&mut self) {
        self.sent.push_back(None);
    }

    /// rumqttc sent the next publish under `pkid`.
    pub(super) fn outgoing(&mut self, pkid: u16) {
        if let Some(Some(seq)) = self.sent.pop_front() {
            self.inflight.insert(pkid, seq);
        }
    }

    /// A PUBACK: the spool entry it acknowledges, if it was one.
    pub(super) fn acked(&mut self, pkid: u16) -> Option<u64> {
        self.inflight.remove(&pkid)
    }
}

/// A connection's subscriptions: what pods want, and which SUBSCRIBE carried which filter, so the
/// broker's SUBACK can be logged (or its refusal named) for that filter. Messages published before
/// the SUBACK may not be routed to the node yet; "subscribed" in the log means the broker said so.
#[derive(Default)]
struct Subscriptions {
    wanted: BTreeSet<String>,
    /// Handed to rumqttc, not yet reported as sent (rumqttc reports them in order).
    requested: VecDeque<String>,
    by_pkid: HashMap<u16, String>,
}

impl Subscriptions {
    fn sent(&mut self, pkid: u16) {
        if let Some(f) = self.requested.pop_front() {
            self.by_pkid.insert(pkid, f);
        }
    }

    fn acked(&mut self, ack: &rumqttc::SubAck) {
        let filter = self.by_pkid.remove(&ack.pkid).unwrap_or_default();
        if ack.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
            tracing::warn!(%filter, "the broker refused a subscription (check its ACL)");
        } else {
            tracing::info!(%filter, "subscribed");
        }
    }
}

/// How a session ended.
pub(super) enum SessionEnd {
    /// `cancel` fired.
    Cancelled,
    /// The connection failed or could not be made; `connected_for` is `None` if it never was.
    Lost { connected_for: Option<Duration>, error: String },
}

impl SessionEnd {
    /// How a connected session that began at `since` ended: `Ok` when `cancel` fired.
    pub(super) fn after(run: Result<(), String>, since: Instant) -> Self {
        match run {
            Ok(()) => SessionEnd::Cancelled,
            Err(error) => SessionEnd::Lost { connected_for: Some(since.elapsed()), error },
        }
    }
}

/// The broker connection task; see the module docs.
pub struct MqttClient {
    config: MqttConfig,
    node: String,
    spool: Arc<TelemetrySpool>,
    bridge: Arc<MqttBridge>,
    direct: mpsc::Receiver<SpoolMessage>,
}

impl MqttClient {
    /// A client for `node` sending `spool`'s messages and `direct` (QoS 0, not spooled) ones.
    pub fn new(
        config: MqttConfig,
        node: String,
        spool: Arc<TelemetrySpool>,
        bridge: Arc<MqttBridge>,
        direct: mpsc::Receiver<SpoolMessage>,
    ) -> Self {
        MqttClient { config, node, spool, bridge, direct }
    }

    /// Connects, sends and reconnects until `cancel` fires, then announces `offline` and disconnects.
    /// Never returns early: a broker that is away or refuses is retried with back-off.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut backoff = RetryBackoff::new(
            Duration::from_millis(self.config.reconnect_min_ms),
            Duration::from_millis(self.config.reconnect_max_ms),
        );
        let broker = self.config.broker.clone();
        loop {
            let end = match options(&self.config, &self.node) {
                Ok(mut o) => {
                    // Incoming messages are acknowledged once delivered (see `Acks`); rumqttc's
                    // window is above the spool's (and the status message's), so those
                    // acknowledgements are never stuck behind a full window of publishes (rumqttc
                    // reads no requests then).
                    o.set_manual_acks(true).set_inflight(self.config.inflight.max(1).saturating_add(2));
                    let cap = usize::from(self.config.inflight) + 64;
                    let (client, eventloop) = AsyncClient::new(o, cap);
                    self.session(client, eventloop, &cancel).await
                }
                // Certificates may be put in place later: keep trying, loudly.
                Err(e) => SessionEnd::Lost { connected_for: None, error: e.to_string() },
            };
            let delay = match end {
                SessionEnd::Cancelled => return,
                SessionEnd::Lost { connected_for, error } => {
                    if connected_for.is_some_and(|d| d >= STABLE_CONNECTION) {
                        backoff.reset();
                    }
                    let delay = backoff.next_delay();
                    match connected_for {
                        Some(_) => {
                            tracing::warn!(%broker, %error, retry_in_ms = delay.as_millis() as u64, "MQTT connection lost; messages are spooled until it is back")
                        }
                        None => {
                            tracing::warn!(%broker, %error, retry_in_ms = delay.as_millis() as u64, "cannot connect to the MQTT broker; messages are spooled until it answers")
                        }
                    }
                    self.bridge.set_connected(false);
                    delay
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn session(
        &mut self,
        client: AsyncClient,
        mut ev: EventLoop,
        cancel: &CancellationToken,
    ) -> SessionEnd {
        match connect(&mut ev, cancel).await {
            Ok(ack) => {
                tracing::info!(broker = %self.config.broker, session_present = ack.session_present, spooled = self.spool.snapshot().entries, "connected to the MQTT broker");
            }
            Err(None) => return SessionEnd::Cancelled,
            Err(Some(error)) => return SessionEnd::Lost { connected_for: None, error },
        }
        let since = Instant::now();
        self.bridge.set_connected(true);
        let (poller, mut events) = spawn_poller(ev);
        let end = self.connected(&client, &mut events, cancel).await;
        poller.abort();
        SessionEnd::after(end, since)
    }

    /// Runs a connected session until it fails (`Err`) or `cancel` fires (`Ok`).
    async fn connected(
        &mut self,
        client: &AsyncClient,
        events: &mut Events,
        cancel: &CancellationToken,
    ) -> Result<(), String> {
        let window = usize::from(self.config.inflight.max(1));
        let mut outbox = Outbox::default();
        let mut subs = Subscriptions::default();
        let mut acks = Acks::default();

        if client.try_publish(status_topic(&self.node), QoS::AtLeastOnce, true, "online").is_ok() {
            outbox.other_sent();
        }
        loop {
            self.sync_subscriptions(client, &mut subs)?;
            let acks_blocked = acks.send(client);
            // Events are handled in bursts (below), so a busy stream refills the window with one
            // spool read per burst of acknowledgements rather than one per acknowledgement.
            let bridge = &self.bridge;
            let full = outbox.fill(client, &self.spool, window, |m| {
                if m.origin == Origin::LocalBroker {
                    bridge.gateway_sent(&m.topic, &m.payload);
                }
            });
            tokio::select! {
                biased;
                _ = cancel.cancelled() => {
                    // What is delivered is acknowledged before the goodbye, or it comes again.
                    acks.send(client);
                    self.disconnect(client, events).await;
                    return Ok(());
                }
                event = events.recv() => {
                    // Handle what else is already waiting too (a burst of acknowledgements)
                    // before going round the loop again.
                    let (burst, end) = take_burst(event, events);
                    for e in burst {
                        self.event(e, &mut outbox, &mut subs, &mut acks);
                    }
                    if let Some(error) = end {
                        return Err(error);
                    }
                }
                _ = self.spool.appended(), if !full && outbox.in_flight() < window => {}
                Some(m) = self.direct.recv() => {
                    // rumqttc's request queue may be full for a moment: wait a little (the poller
                    // keeps draining it), then drop and count rather than stall the session.
                    let taken = valid_publish_topic(&m.topic)
                        && matches!(
                            tokio::time::timeout(QOS0_QUEUE_WAIT, client.publish(m.topic.clone(), QoS::AtMostOnce, m.retain, m.payload.clone())).await,
                            Ok(Ok(()))
                        );
                    if taken {
                        // Recorded once sent: the echo cannot be read before this session reads events again.
                        if m.origin == Origin::LocalBroker {
                            self.bridge.gateway_sent(&m.topic, &m.payload);
                        }
                        outbox.other_sent();
                    } else {
                        self.bridge.dropped_offline();
                    }
                }
                _ = self.bridge.subscriptions_changed() => {}
                // An acknowledgement waits for rumqttc's request queue to drain.
                _ = tokio::time::sleep(Duration::from_millis(1)), if acks_blocked => {}
            }
        }
    }

    /// One event of a connected session: publishes get their packet ids, acknowledgements remove
    /// messages from the spool, incoming messages go to the bridge.
    fn event(&self, event: Event, outbox: &mut Outbox, subs: &mut Subscriptions, acks: &mut Acks) {
        match event {
            Event::Outgoing(Outgoing::Publish(pkid)) => outbox.outgoing(pkid),
            Event::Outgoing(Outgoing::Subscribe(pkid)) => subs.sent(pkid),
            Event::Incoming(Packet::SubAck(ack)) => subs.acked(&ack),
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(seq) = outbox.acked(ack.pkid) {
                    self.spool.ack(seq);
                }
            }
            Event::Incoming(Packet::Publish(p)) => {
                self.bridge.deliver(&p.topic, &p.payload, p.retain, p.dup);
                acks.push(p);
            }
            _ => {}
        }
    }

    /// Subscribes filters pods added and unsubscribes ones no pod uses any more.
    fn sync_subscriptions(&self, client: &AsyncClient, subs: &mut Subscriptions) -> Result<(), String> {
        let wanted = self.bridge.filters();
        for f in wanted.difference(&subs.wanted) {
            client.try_subscribe(f.clone(), QoS::AtLeastOnce).map_err(|e| format!("subscribe {f}: {e}"))?;
            subs.requested.push_back(f.clone());
        }
        for f in subs.wanted.difference(&wanted) {
            client.try_unsubscribe(f.clone()).map_err(|e| format!("unsubscribe {f}: {e}"))?;
        }
        subs.wanted = wanted;
        Ok(())
    }

    /// A clean goodbye: the retained `offline` (a clean DISCONNECT suppresses the will), then
    /// DISCONNECT, driven for at most [`DISCONNECT_GRACE`].
    async fn disconnect(&self, client: &AsyncClient, events: &mut Events) {
        let _ = client.try_publish(status_topic(&self.node), QoS::AtLeastOnce, true, "offline");
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(DISCONNECT_GRACE, async {
            loop {
                match events.recv().await {
                    Some(Ok(Event::Outgoing(Outgoing::Disconnect))) | Some(Err(_)) | None => return,
                    Some(Ok(_)) => {}
                }
            }
        })
        .await;
        tracing::info!("disconnected from the MQTT broker");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let u = |s| BrokerUrl::parse(s);
        assert_eq!(
            u("mqtt://broker.lan"),
            Ok(BrokerUrl { tls: false, host: "broker.lan".into(), port: 1883 })
        );
        assert_eq!(u("mqtts://b:9000/"), Ok(BrokerUrl { tls: true, host: "b".into(), port: 9000 }));
        assert_eq!(u("mqtts://b"), Ok(BrokerUrl { tls: true, host: "b".into(), port: 8883 }));
        assert_eq!(u("mqtt://[::1]:1884"), Ok(BrokerUrl { tls: false, host: "::1".into(), port: 1884 }));
        for bad in ["tcp://b", "mqtt://", "mqtt://b:0", "mqtt://b:x", "mqtt://u:p@b", "mqtt://b/t", "b:1883"]
        {
            assert!(u(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_burst_takes_at_most_its_share_and_loses_no_event() {
        let (tx, mut rx) = mpsc::channel(1024);
        for pkid in 1..=600u16 {
            tx.try_send(Ok(Event::Outgoing(Outgoing::Publish(pkid)))).expect("room");
        }
        let mut seen = Vec::new();
        while let Ok(first) = rx.try_recv() {
            let (burst, end) = take_burst(Some(first), &mut rx);
            assert!(end.is_none() && burst.len() <= EVENT_BURST);
            seen.extend(burst.into_iter().map(|e| match e {
                Event::Outgoing(Outgoing::Publish(p)) => p,
                _ => 0,
            }));
        }
        assert_eq!(seen, (1..=600).collect::<Vec<u16>>(), "every event, once, in order");
        tx.try_send(Ok(Event::Outgoing(Outgoing::PingReq))).expect("room");
        drop(tx);
        let first = rx.try_recv().ok();
        let (burst, end) = take_burst(first, &mut rx);
        assert_eq!((burst.len(), end), (1, None));
        let (burst, end) = take_burst(rx.try_recv().ok(), &mut rx);
        assert_eq!((burst.len(), end.as_deref()), (0, Some("the MQTT event loop stopped")));
    }

    #[test]
    fn publish_topics() {
        assert!(valid_publish_topic("sensors/pi-07/temp"));
        for bad in ["", "a/+/b", "a/#", "a\0b"] {
            assert!(!valid_publish_topic(bad), "{bad:?}");
        }
    }

    #[test]
    fn options_name_the_unreadable_file() {
        let config = MqttConfig {
            broker: "mqtts://127.0.0.1".into(),
            ca_file: "/nonexistent/ca.pem".into(),
            ..Default::default()
        };
        let e = options(&config, "n").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("mqtt.ca_file") && e.contains("/nonexistent/ca.pem"), "{e}");
        let o = options(&MqttConfig { broker: "mqtt://h:1".into(), ..Default::default() }, "pi-07")
            .expect("options");
        assert_eq!((o.client_id(), o.clean_session()), ("pi-07".to_owned(), false));
    }
}
