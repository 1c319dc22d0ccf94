//! The one MQTT session driver both connections run (the upstream one, [`super::mqtt`], and the
//! gateway's local one, [`super::gateway`]): connect with a fresh rumqttc event loop, poll it in a
//! task of its own, hand the spool's entries over within the window ([`Outbox`]), acknowledge what
//! was delivered ([`Acks`]), keep the subscriptions a connection wants, and reconnect with capped
//! exponential back-off with jitter ([`RetryBackoff`]). A connection supplies only its own setup
//! and what to do with what arrives ([`Link`]).
//!
//! Each connection gets a fresh `EventLoop`, so nothing rumqttc kept in memory is resent behind
//! the spool's back: after a reconnect the spool is read again from its oldest unacknowledged
//! message, which keeps order per topic (first arrivals are in order; resent messages may repeat
//! ones the broker had already taken). rumqttc's own replay is not used: it drops everything
//! unsent when the broker has lost the session, and across a connection that dies during a replay
//! it can reorder or, with its single collision slot, lose a message.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, ConnAck, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::options::MqttError;
use super::outbox::{Acks, Handover, Outbox, QueueClosed};
use super::spool::{SpoolMessage, TelemetrySpool};
use crate::retry::RetryBackoff;
use crate::topic::{TopicFilter, TopicName};

/// How long a connection attempt (TCP, TLS and CONNACK) may take.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection that lasted this long resets the back-off; a broker that accepts and drops at once
/// (a client id taken over, say) is retried with growing delays.
pub(super) const STABLE_CONNECTION: Duration = Duration::from_secs(5);
/// How long a clean shutdown waits to say goodbye and disconnect.
const DISCONNECT_GRACE: Duration = Duration::from_secs(1);
/// Events handled in one go before the session looks at the spool again.
const EVENT_BURST: usize = 256;
/// Room in rumqttc's request queue beyond the window (acknowledgements, subscriptions, QoS 0).
const QUEUE_SLACK: usize = 64;

/// Why a session ended or could not start.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The settings could not be turned into a connection.
    #[error(transparent)]
    Setup(#[from] MqttError),
    /// The broker answered CONNECT with a refusal.
    #[error("the broker refused the connection: {0:?} (check the username, password file and client id)")]
    Refused(rumqttc::ConnectReturnCode),
    /// The first packet was not a CONNACK.
    #[error("unexpected first packet {0:?}")]
    Unexpected(Box<Event>),
    /// No CONNACK in time.
    #[error("no CONNACK within {}s", CONNECT_TIMEOUT.as_secs())]
    NoConnAck,
    /// The connection failed.
    #[error("{0}")]
    Connection(#[source] Box<rumqttc::ConnectionError>),
    /// The event loop's task ended.
    #[error("the MQTT event loop stopped")]
    Stopped,
    /// The request queue is gone.
    #[error(transparent)]
    Queue(#[from] QueueClosed),
    /// rumqttc refused a subscription request.
    #[error("subscribe {filters}: {source}")]
    Subscribe {
        /// The filters.
        filters: String,
        /// Why.
        #[source]
        source: Box<rumqttc::ClientError>,
    },
    /// rumqttc refused an unsubscription request.
    #[error("unsubscribe {filter}: {source}")]
    Unsubscribe {
        /// The filter.
        filter: TopicFilter,
        /// Why.
        #[source]
        source: Box<rumqttc::ClientError>,
    },
}

/// Why a connection's [`Link::woken`] woke the session.
pub(super) enum Wake {
    /// A message to send at once, not spooled (QoS 0).
    Direct(SpoolMessage),
    /// The wanted subscriptions may have changed.
    Subscriptions,
}

/// What one connection supplies to the driver.
pub(super) trait Link: Send {
    /// The broker, for logs.
    fn broker(&self) -> String;
    /// rumqttc's options for a new connection. Manual acknowledgements are turned on by the
    /// driver; the in-flight limit must leave room above [`Link::window`] for whatever else the
    /// connection publishes at QoS 1, or rumqttc stops reading requests (acknowledgements too).
    fn options(&self) -> Result<MqttOptions, MqttError>;
    /// Spool entries in flight at once.
    fn window(&self) -> usize;
    /// The spool this connection drains.
    fn spool(&self) -> &Arc<TelemetrySpool>;
    /// The back-off between connections.
    fn backoff(&self) -> RetryBackoff;
    /// The broker accepted the connection.
    fn connected(&mut self, ack: &ConnAck);
    /// The connection is gone (or never came); the next attempt is in `delay`.
    fn lost(&mut self, connected_for: Option<Duration>, error: &SessionError, delay: Duration);
    /// A publish to make first on each connection (the status).
    fn hello(&self) -> Option<Handover> {
        None
    }
    /// A publish to make before a clean disconnect.
    fn goodbye(&self) -> Option<Handover> {
        None
    }
    /// Logged once the goodbye is done.
    fn closed(&self) {}
    /// The filters this connection should hold now.
    fn wanted(&self) -> BTreeSet<TopicFilter>;
    /// The broker answered a SUBSCRIBE of `filters`.
    fn subscribed(&self, filters: &[TopicFilter], refused: bool);
    /// A message (spooled or direct) is being handed to the client: told before the client can
    /// send it, so before any echo of it can be read.
    fn sent(&mut self, m: &SpoolMessage);
    /// The broker acknowledged a spool entry (it is already removed).
    fn acked(&mut self) {}
    /// A message arrived; when this returns it is delivered and may be acknowledged.
    fn incoming(&mut self, p: &rumqttc::Publish) -> impl Future<Output = ()> + Send;
    /// Resolves when something other than the spool and the broker needs the session.
    fn woken(&mut self) -> impl Future<Output = Wake> + Send {
        std::future::pending()
    }
    /// A direct message could not be sent (its topic is invalid).
    fn dropped(&self) {}
}

/// How a session ended.
enum SessionEnd {
    /// `cancel` fired.
    Cancelled,
    /// The connection failed or could not be made; `connected_for` is `None` if it never was.
    Lost { connected_for: Option<Duration>, error: SessionError },
}

/// Connects, sends and reconnects until `cancel` fires, then says goodbye and disconnects. Never
/// returns early: a broker that is away or refuses is retried with back-off.
pub(super) async fn run(mut link: impl Link, cancel: CancellationToken) {
    let mut backoff = link.backoff();
    loop {
        let end = match link.options() {
            Ok(mut o) => {
                o.set_manual_acks(true);
                let (client, eventloop) = AsyncClient::new(o, link.window() + QUEUE_SLACK);
                session(&mut link, client, eventloop, &cancel).await
            }
            // Certificates may be put in place later: keep trying, loudly.
            Err(e) => SessionEnd::Lost { connected_for: None, error: e.into() },
        };
        let delay = match end {
            SessionEnd::Cancelled => return,
            SessionEnd::Lost { connected_for, error } => {
                if connected_for.is_some_and(|d| d >= STABLE_CONNECTION) {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                link.lost(connected_for, &error, delay);
                delay
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Waits for the CONNACK of a new event loop's first connection: `Ok` once the broker accepted,
/// `Err(None)` if `cancel` fired.
async fn connect(ev: &mut EventLoop, cancel: &CancellationToken) -> Result<ConnAck, Option<SessionError>> {
    let connack = tokio::select! {
        _ = cancel.cancelled() => return Err(None),
        r = tokio::time::timeout(CONNECT_TIMEOUT, ev.poll()) => r,
    };
    match connack {
        Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) if ack.code == rumqttc::ConnectReturnCode::Success => {
            Ok(ack)
        }
        Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => Err(Some(SessionError::Refused(ack.code))),
        Ok(Ok(other)) => Err(Some(SessionError::Unexpected(Box::new(other)))),
        Ok(Err(e)) => Err(Some(SessionError::Connection(Box::new(e)))),
        Err(_) => Err(Some(SessionError::NoConnAck)),
    }
}

/// Events of one connection, as a channel. The event loop runs in a task of its own and is never
/// dropped mid-poll: a poll cancelled after taking a request from rumqttc's channel would lose that
/// publish and put every later PUBACK on the wrong message. The task ends at the connection's
/// first error (sent on as the last event); abort it when the session ends.
type Events = mpsc::Receiver<Result<Event, rumqttc::ConnectionError>>;

/// Starts polling a connected event loop; see [`Events`].
fn spawn_poller(mut ev: EventLoop) -> (tokio::task::JoinHandle<()>, Events) {
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

/// The event just received and up to [`EVENT_BURST`] in all of those already waiting, in order,
/// and why the connection ended if one of them says it did (the events before it still count:
/// acknowledgements among them). The event taken to look for more is kept when the burst is full
/// (dropping it lost every 257th event of a burst and shifted PUBACKs onto the wrong entries).
fn take_burst(
    first: Option<Result<Event, rumqttc::ConnectionError>>,
    events: &mut Events,
) -> (Vec<Event>, Option<SessionError>) {
    let mut burst = Vec::new();
    let mut next = first;
    loop {
        match next {
            None => return (burst, Some(SessionError::Stopped)),
            Some(Err(e)) => return (burst, Some(SessionError::Connection(Box::new(e)))),
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

async fn session(
    link: &mut impl Link,
    client: AsyncClient,
    mut ev: EventLoop,
    cancel: &CancellationToken,
) -> SessionEnd {
    match connect(&mut ev, cancel).await {
        Ok(ack) => link.connected(&ack),
        Err(None) => return SessionEnd::Cancelled,
        Err(Some(error)) => return SessionEnd::Lost { connected_for: None, error },
    }
    let since = Instant::now();
    let (poller, mut events) = spawn_poller(ev);
    let end = Connected::new(link, client).run(&mut events, cancel).await;
    poller.abort();
    match end {
        Ok(()) => SessionEnd::Cancelled,
        Err(error) => SessionEnd::Lost { connected_for: Some(since.elapsed()), error },
    }
}

/// A connection's subscriptions: what it holds, and which SUBSCRIBE carried which filters, so the
/// broker's SUBACK can be logged (or its refusal named) for them. Messages published before the
/// SUBACK may not be routed yet; "subscribed" in the log means the broker said so.
#[derive(Default)]
struct Subscriptions {
    held: BTreeSet<TopicFilter>,
    /// Handed to rumqttc, not yet reported as sent (rumqttc reports them in order).
    requested: VecDeque<Vec<TopicFilter>>,
    by_pkid: HashMap<u16, Vec<TopicFilter>>,
}

/// One connected session.
struct Connected<'a, L> {
    link: &'a mut L,
    client: AsyncClient,
    spool: Arc<TelemetrySpool>,
    window: usize,
    outbox: Outbox<AsyncClient>,
    acks: Acks<AsyncClient>,
    subs: Subscriptions,
}

impl<'a, L: Link> Connected<'a, L> {
    fn new(link: &'a mut L, client: AsyncClient) -> Self {
        let spool = link.spool().clone();
        let window = link.window().max(1);
        let (outbox, acks) = (Outbox::new(client.clone()), Acks::new(client.clone()));
        Connected { link, client, spool, window, outbox, acks, subs: Subscriptions::default() }
    }

    /// Runs until the connection fails (`Err`) or `cancel` fires (`Ok`).
    async fn run(mut self, events: &mut Events, cancel: &CancellationToken) -> Result<(), SessionError> {
        if let Some(h) = self.link.hello() {
            self.outbox.other(h);
        }
        loop {
            self.sync_subscriptions()?;
            self.acks.send();
            // Events are handled in bursts (below), so a busy stream refills the window with one
            // spool read per burst of acknowledgements rather than one per acknowledgement.
            let link = &mut *self.link;
            self.outbox.fill(&*self.spool, self.window, |m| link.sent(m));
            let room = !self.outbox.is_stalled() && self.outbox.in_flight() < self.window;
            tokio::select! {
                biased;
                _ = cancel.cancelled() => {
                    self.goodbye(events).await;
                    return Ok(());
                }
                event = events.recv() => {
                    // Handle what else is already waiting too (a burst of acknowledgements)
                    // before going round the loop again.
                    let (burst, end) = take_burst(event, events);
                    for e in burst {
                        self.event(e).await;
                    }
                    if let Some(error) = end {
                        return Err(error);
                    }
                }
                // rumqttc's request queue had no room: the hand-over waits for it here, next to
                // the events that drain it.
                handed = self.outbox.ready(), if self.outbox.is_stalled() => handed?,
                r = self.acks.ready(), if self.acks.is_stalled() => r?,
                _ = self.spool.appended(), if room => {}
                wake = self.link.woken(), if !self.outbox.is_stalled() => match wake {
                    Wake::Direct(m) => self.direct(m),
                    Wake::Subscriptions => {}
                },
            }
        }
    }

    /// A QoS 0 message: handed over in its place among the publishes (waiting for room if need
    /// be), or dropped and counted if its topic is invalid.
    fn direct(&mut self, m: SpoolMessage) {
        if !TopicName::is_valid(&m.topic) {
            self.link.dropped();
            return;
        }
        // Recorded before the hand-over: once in rumqttc's queue it may be sent, and its echo read,
        // before a wait for room would say it went.
        self.link.sent(&m);
        self.outbox.other(Handover {
            topic: m.topic,
            qos: QoS::AtMostOnce,
            retain: m.retain,
            payload: m.payload,
        });
    }

    /// One event: publishes get their packet ids, acknowledgements remove messages from the spool,
    /// incoming messages go to the link and are acknowledged once it has them.
    async fn event(&mut self, event: Event) {
        match event {
            Event::Outgoing(Outgoing::Publish(pkid)) => self.outbox.outgoing(pkid),
            Event::Outgoing(Outgoing::Subscribe(pkid)) => {
                if let Some(f) = self.subs.requested.pop_front() {
                    self.subs.by_pkid.insert(pkid, f);
                }
            }
            Event::Incoming(Packet::SubAck(ack)) => {
                let filters = self.subs.by_pkid.remove(&ack.pkid).unwrap_or_default();
                let refused =
                    ack.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure));
                self.link.subscribed(&filters, refused);
            }
            Event::Incoming(Packet::PubAck(ack)) => self.puback(ack.pkid),
            Event::Incoming(Packet::Publish(p)) => {
                self.link.incoming(&p).await;
                self.acks.push(p);
                self.acks.send();
            }
            _ => {}
        }
    }

    /// A PUBACK: the spool entry it acknowledges is removed, and the link told.
    fn puback(&mut self, pkid: u16) {
        if self.outbox.acked(pkid, &*self.spool) {
            self.link.acked();
        }
    }

    /// Subscribes filters the link now wants (in one SUBSCRIBE) and unsubscribes ones it no longer
    /// does.
    fn sync_subscriptions(&mut self) -> Result<(), SessionError> {
        let wanted = self.link.wanted();
        let new: Vec<TopicFilter> = wanted.difference(&self.subs.held).cloned().collect();
        if !new.is_empty() {
            let req = new.iter().map(|f| rumqttc::SubscribeFilter::new(f.to_string(), QoS::AtLeastOnce));
            self.client.try_subscribe_many(req).map_err(|source| SessionError::Subscribe {
                filters: new.iter().map(TopicFilter::as_str).collect::<Vec<_>>().join(", "),
                source: Box::new(source),
            })?;
            self.subs.requested.push_back(new);
        }
        for f in self.subs.held.difference(&wanted) {
            self.client.try_unsubscribe(f.to_string()).map_err(|source| SessionError::Unsubscribe {
                filter: f.clone(),
                source: Box::new(source),
            })?;
        }
        self.subs.held = wanted;
        Ok(())
    }

    /// A clean goodbye: what is delivered is acknowledged (or it comes again), the link's last
    /// word (a clean DISCONNECT suppresses the will), then DISCONNECT, driven for at most
    /// [`DISCONNECT_GRACE`].
    async fn goodbye(&mut self, events: &mut Events) {
        self.acks.send();
        if let Some(h) = self.link.goodbye() {
            let _ = self.client.try_publish(&h.topic, h.qos, h.retain, &h.payload[..]);
        }
        let _ = self.client.try_disconnect();
        let _ = tokio::time::timeout(DISCONNECT_GRACE, async {
            loop {
                match events.recv().await {
                    Some(Ok(Event::Outgoing(Outgoing::Disconnect))) | Some(Err(_)) | None => return,
                    Some(Ok(_)) => {}
                }
            }
        })
        .await;
        self.link.closed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!((burst.len(), end.map(|e| e.to_string())), (1, None));
        let (burst, end) = take_burst(rx.try_recv().ok(), &mut rx);
        assert_eq!(
            (burst.len(), end.map(|e| e.to_string()).as_deref()),
            (0, Some("the MQTT event loop stopped"))
        );
    }
}
