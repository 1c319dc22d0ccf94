//! What one MQTT connection owes and is owed, as state advanced by events: the [`Outbox`] (spool
//! entries handed to the client, matched to their PUBACKs by packet id) and [`Acks`] (the
//! acknowledgements owed to the broker for what it delivered).
//!
//! Both talk to the client only through [`Wire`] and to the spool only through [`Spool`], so they
//! are tested here without a broker. When the client's request queue is full a hand-over is not
//! retried on a timer: it becomes one awaited hand-over ([`Outbox::ready`], [`Acks::ready`]) that
//! the session polls next to its events, and nothing else is handed over before it, which keeps
//! the order the client reports publishes in equal to the order they were handed over in.
//! This module opens no connection and reads no clock.

use std::collections::{HashMap, VecDeque};

use futures::future::BoxFuture;
use rumqttc::{AsyncClient, QoS};

use super::spool::{SpoolError, SpoolMessage, TelemetrySpool};
use crate::topic::TopicName;

/// The client's request queue is gone (its event loop ended).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the MQTT client's request queue is closed")]
pub struct QueueClosed;

/// The client's request queue could not take a request now (full, or closed: the awaited
/// hand-over tells which).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

/// A publish handed over once there is room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handover {
    /// Topic (already checked with [`TopicName::is_valid`]).
    pub topic: String,
    /// QoS.
    pub qos: QoS,
    /// Retain flag.
    pub retain: bool,
    /// Payload.
    pub payload: Vec<u8>,
}

/// The client as the session uses it: hand over a publish or an acknowledgement now if there is
/// room, or as a future that waits for room. The futures own what they hand over and a handle on
/// the queue, so they can outlive one turn of the session's loop.
pub trait Wire: Send {
    /// Hands a publish over if the request queue has room.
    fn try_publish(&self, topic: &str, qos: QoS, retain: bool, payload: &[u8]) -> Result<(), Full>;
    /// Hands a publish over once the request queue has room.
    fn publish(&self, p: Handover) -> BoxFuture<'static, Result<(), QueueClosed>>;
    /// Hands the acknowledgement of `p` over if the request queue has room.
    fn try_ack(&self, p: &rumqttc::Publish) -> Result<(), Full>;
    /// Hands the acknowledgement of `p` over once the request queue has room.
    fn ack(&self, p: rumqttc::Publish) -> BoxFuture<'static, Result<(), QueueClosed>>;
}

impl Wire for AsyncClient {
    fn try_publish(&self, topic: &str, qos: QoS, retain: bool, payload: &[u8]) -> Result<(), Full> {
        AsyncClient::try_publish(self, topic, qos, retain, payload.to_vec()).map_err(|_| Full)
    }

    fn publish(&self, p: Handover) -> BoxFuture<'static, Result<(), QueueClosed>> {
        let client = self.clone();
        Box::pin(
            async move { client.publish(p.topic, p.qos, p.retain, p.payload).await.map_err(|_| QueueClosed) },
        )
    }

    fn try_ack(&self, p: &rumqttc::Publish) -> Result<(), Full> {
        AsyncClient::try_ack(self, p).map_err(|_| Full)
    }

    fn ack(&self, p: rumqttc::Publish) -> BoxFuture<'static, Result<(), QueueClosed>> {
        let client = self.clone();
        Box::pin(async move { client.ack(&p).await.map_err(|_| QueueClosed) })
    }
}

/// The spool as the outbox uses it.
pub trait Spool {
    /// Up to `limit` entries after `after` (from the oldest if `None`), in order.
    fn next_batch(&self, after: Option<u64>, limit: usize) -> Result<Vec<(u64, SpoolMessage)>, SpoolError>;
    /// Removes an entry the broker acknowledged.
    fn ack(&self, seq: u64);
    /// The spool's name, for logs.
    fn name(&self) -> &'static str;
}

impl Spool for TelemetrySpool {
    fn next_batch(&self, after: Option<u64>, limit: usize) -> Result<Vec<(u64, SpoolMessage)>, SpoolError> {
        TelemetrySpool::next_batch(self, after, limit)
    }

    fn ack(&self, seq: u64) {
        TelemetrySpool::ack(self, seq)
    }

    fn name(&self) -> &'static str {
        self.tree().name()
    }
}

/// A spool's messages on one connection (each connection starts a new one, and so reads the spool
/// again from its oldest message). rumqttc reports every publish handed to it as
/// `Outgoing::Publish` with the packet id it chose, in the order they were handed over, which is
/// how a PUBACK finds its spool entry.
pub struct Outbox<W> {
    wire: W,
    /// Publishes handed over and not yet reported: a spool entry, or `None` for another message
    /// (QoS 0, the status) that also gets reported.
    sent: VecDeque<Option<u64>>,
    /// Spool entries by packet id, until acknowledged.
    inflight: HashMap<u16, u64>,
    /// The last spool entry taken on this connection (handed over or stalled).
    cursor: Option<u64>,
    /// A publish waiting for room in the request queue. It is already in `sent` and its message
    /// already reported: rumqttc's queue (flume) moves a waiting publish into the queue the moment
    /// its event loop takes a request off it, so the loop may send it, report its packet id and
    /// receive its echo before this future is polled again. (Counted only when the wait ended, a
    /// stalled publish's `Outgoing::Publish` found `sent` empty, and every later PUBACK of the
    /// connection was matched to the entry before its own; and a gateway saw its own message come
    /// back before it had remembered sending it, and forwarded it as a new one.)
    stalled: Option<BoxFuture<'static, Result<(), QueueClosed>>>,
}

fn qos(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

impl<W: Wire> Outbox<W> {
    /// An outbox for a new connection.
    pub fn new(wire: W) -> Self {
        Outbox { wire, sent: VecDeque::new(), inflight: HashMap::new(), cursor: None, stalled: None }
    }

    /// Spool entries handed over (or waiting for room) and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.inflight.len() + self.sent.iter().filter(|s| s.is_some()).count()
    }

    /// Whether a publish waits for room in the request queue; nothing else is handed over until
    /// [`Outbox::ready`] says it went.
    pub fn is_stalled(&self) -> bool {
        self.stalled.is_some()
    }

    /// Hands over spool entries in order while fewer than `window` are in flight and the request
    /// queue takes them; `sent` is told of each one handed over. An entry with a topic no broker
    /// would take is removed from the spool, not sent.
    pub fn fill(&mut self, spool: &impl Spool, window: usize, mut sent: impl FnMut(&SpoolMessage)) {
        while !self.is_stalled() && self.in_flight() < window {
            let batch = match spool.next_batch(self.cursor, window - self.in_flight()) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, spool = spool.name(), "cannot read the MQTT spool");
                    return;
                }
            };
            if batch.is_empty() {
                return;
            }
            for (seq, m) in batch {
                self.cursor = Some(seq);
                if !TopicName::is_valid(&m.topic) {
                    tracing::warn!(seq, topic = %m.topic, "dropping a spooled message with an invalid topic");
                    spool.ack(seq);
                    continue;
                }
                let q = qos(m.qos.max(1));
                // Told before any echo can be read: the session that reads events is the caller,
                // and a publish that must wait for room counts as handed over (see `stalled`).
                sent(&m);
                self.sent.push_back(Some(seq));
                if self.wire.try_publish(&m.topic, q, m.retain, &m.payload).is_err() {
                    let h = Handover { topic: m.topic, qos: q, retain: m.retain, payload: m.payload };
                    self.stalled = Some(self.wire.publish(h));
                    return;
                }
            }
        }
    }

    /// Hands over a publish that is not a spool entry (QoS 0, the status), now or, if the request
    /// queue is full, through [`Outbox::ready`]; the caller records what it carries first (see
    /// `stalled`). Call only when not [stalled](Outbox::is_stalled).
    pub fn other(&mut self, h: Handover) {
        if self.is_stalled() {
            // The caller broke the rule; keep the order anyway by not overtaking.
            tracing::warn!(topic = %h.topic, "MQTT publish handed over while another waits; dropped");
            return;
        }
        self.sent.push_back(None);
        if self.wire.try_publish(&h.topic, h.qos, h.retain, &h.payload).is_err() {
            self.stalled = Some(self.wire.publish(h));
        }
    }

    /// Waits until the stalled publish is in the request queue (pending forever if none waits).
    /// Cancel-safe: the hand-over stays stored until it completes.
    pub async fn ready(&mut self) -> Result<(), QueueClosed> {
        let Some(stalled) = self.stalled.as_mut() else {
            return std::future::pending().await;
        };
        stalled.await?;
        self.stalled = None;
        Ok(())
    }

    /// The client sent the next publish under `pkid` (`Outgoing::Publish`).
    pub fn outgoing(&mut self, pkid: u16) {
        if let Some(Some(seq)) = self.sent.pop_front() {
            self.inflight.insert(pkid, seq);
        }
    }

    /// A PUBACK: removes the spool entry it acknowledges; `true` if it was one.
    pub fn acked(&mut self, pkid: u16, spool: &impl Spool) -> bool {
        match self.inflight.remove(&pkid) {
            Some(seq) => {
                spool.ack(seq);
                true
            }
            None => false,
        }
    }
}

/// Acknowledgements owed to the broker for incoming QoS 1 messages, sent once each is delivered
/// (in a container's queue, or in the gateway's spool), in the order they arrived (MQTT 3.1.1
/// section 4.6). rumqttc's automatic acknowledgement would answer on arrival, so messages still
/// queued between its event loop and the bridge when the agent stops would be acknowledged and
/// lost; unacknowledged, the broker sends them again on the next connection.
pub struct Acks<W> {
    wire: W,
    queue: VecDeque<rumqttc::Publish>,
    /// The first acknowledgement the request queue had no room for.
    stalled: Option<BoxFuture<'static, Result<(), QueueClosed>>>,
}

impl<W: Wire> Acks<W> {
    /// Nothing owed yet.
    pub fn new(wire: W) -> Self {
        Acks { wire, queue: VecDeque::new(), stalled: None }
    }

    /// Owes the broker an acknowledgement for `p` (none for QoS 0).
    pub fn push(&mut self, mut p: rumqttc::Publish) {
        if p.qos != QoS::AtMostOnce {
            // Only the packet id and QoS are needed for the acknowledgement.
            p.payload = Default::default();
            self.queue.push_back(p);
        }
    }

    /// Sends what is owed, in order, while the request queue takes it; the first it cannot take
    /// waits for room ([`Acks::ready`]).
    pub fn send(&mut self) {
        while self.stalled.is_none()
            && let Some(p) = self.queue.front()
        {
            if self.wire.try_ack(p).is_err() {
                if let Some(p) = self.queue.pop_front() {
                    self.stalled = Some(self.wire.ack(p));
                }
                return;
            }
            self.queue.pop_front();
        }
    }

    /// Whether an acknowledgement waits for room.
    pub fn is_stalled(&self) -> bool {
        self.stalled.is_some()
    }

    /// Waits until the stalled acknowledgement is handed over (pending forever if none is), then
    /// sends what else is owed. Cancel-safe.
    pub async fn ready(&mut self) -> Result<(), QueueClosed> {
        let Some(stalled) = self.stalled.as_mut() else {
            return std::future::pending().await;
        };
        stalled.await?;
        self.stalled = None;
        self.send();
        Ok(())
    }

    /// Acknowledgements not yet handed over (the stalled one included).
    #[cfg(test)]
    pub fn owed(&self) -> usize {
        self.queue.len() + usize::from(self.stalled.is_some())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use tokio::sync::mpsc;

    use super::*;
    use crate::telemetry::spool::Origin;

    /// What the fake client's request queue holds: a publish's topic, or an acknowledgement's
    /// packet id.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Req {
        Publish(String),
        Ack(u16),
    }

    /// A client whose request queue is a bounded channel of `cap`, as rumqttc's is.
    #[derive(Clone)]
    struct FakeWire(mpsc::Sender<Req>);

    impl Wire for FakeWire {
        fn try_publish(&self, topic: &str, _: QoS, _: bool, _: &[u8]) -> Result<(), Full> {
            self.0.try_send(Req::Publish(topic.to_owned())).map_err(|_| Full)
        }
        fn publish(&self, p: Handover) -> BoxFuture<'static, Result<(), QueueClosed>> {
            let tx = self.0.clone();
            Box::pin(async move { tx.send(Req::Publish(p.topic)).await.map_err(|_| QueueClosed) })
        }
        fn try_ack(&self, p: &rumqttc::Publish) -> Result<(), Full> {
            self.0.try_send(Req::Ack(p.pkid)).map_err(|_| Full)
        }
        fn ack(&self, p: rumqttc::Publish) -> BoxFuture<'static, Result<(), QueueClosed>> {
            let tx = self.0.clone();
            Box::pin(async move { tx.send(Req::Ack(p.pkid)).await.map_err(|_| QueueClosed) })
        }
    }

    fn wire(cap: usize) -> (FakeWire, mpsc::Receiver<Req>) {
        let (tx, rx) = mpsc::channel(cap);
        (FakeWire(tx), rx)
    }

    /// A spool in memory: entries by sequence number, each message's topic `t<seq>`.
    #[derive(Default, Clone)]
    struct FakeSpool(Arc<Mutex<BTreeMap<u64, SpoolMessage>>>);

    impl FakeSpool {
        fn with(seqs: impl IntoIterator<Item = u64>) -> Self {
            let s = FakeSpool::default();
            for seq in seqs {
                s.append(seq, &format!("t{seq}"));
            }
            s
        }
        fn append(&self, seq: u64, topic: &str) {
            let m = SpoolMessage {
                topic: topic.to_owned(),
                qos: 1,
                retain: false,
                origin: Origin::Node,
                payload: seq.to_string().into_bytes(),
            };
            self.0.lock().expect("lock").insert(seq, m);
        }
        fn left(&self) -> Vec<u64> {
            self.0.lock().expect("lock").keys().copied().collect()
        }
    }

    impl Spool for FakeSpool {
        fn next_batch(
            &self,
            after: Option<u64>,
            limit: usize,
        ) -> Result<Vec<(u64, SpoolMessage)>, SpoolError> {
            let map = self.0.lock().expect("lock");
            let from = after.map_or(0, |a| a + 1);
            Ok(map.range(from..).take(limit).map(|(k, v)| (*k, v.clone())).collect())
        }
        fn ack(&self, seq: u64) {
            self.0.lock().expect("lock").remove(&seq);
        }
        fn name(&self) -> &'static str {
            "fake"
        }
    }

    fn drain(rx: &mut mpsc::Receiver<Req>) -> Vec<Req> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    fn published(topics: &[&str]) -> Vec<Req> {
        topics.iter().map(|t| Req::Publish((*t).to_owned())).collect()
    }

    fn incoming(pkid: u16) -> rumqttc::Publish {
        let mut p = rumqttc::Publish::new("in", QoS::AtLeastOnce, "x");
        p.pkid = pkid;
        p
    }

    #[test]
    fn a_window_is_handed_over_in_order_and_acks_out_of_order_find_their_entries() {
        let spool = FakeSpool::with(1..=5);
        let (w, mut rx) = wire(64);
        let mut outbox = Outbox::new(w);
        let mut told = Vec::new();
        outbox.fill(&spool, 3, |m| told.push(m.topic.clone()));
        assert_eq!(drain(&mut rx), published(&["t1", "t2", "t3"]));
        assert_eq!(told, ["t1", "t2", "t3"]);
        assert_eq!(outbox.in_flight(), 3);
        for pkid in [7, 8, 9] {
            outbox.outgoing(pkid);
        }
        // The broker acknowledges the second, then the third, then the first.
        assert!(outbox.acked(8, &spool));
        assert_eq!(spool.left(), [1, 3, 4, 5]);
        assert!(outbox.acked(9, &spool));
        assert!(outbox.acked(7, &spool));
        assert_eq!(spool.left(), [4, 5]);
        assert!(!outbox.acked(7, &spool), "a repeated PUBACK removes nothing more");
        outbox.fill(&spool, 3, |_| {});
        assert_eq!(drain(&mut rx), published(&["t4", "t5"]));
    }

    #[test]
    fn packet_ids_are_reused_and_other_publishes_keep_their_place() {
        let spool = FakeSpool::with(1..=2);
        let (w, mut rx) = wire(64);
        let mut outbox = Outbox::new(w);
        // The status goes first and is reported first (QoS 1: a packet id of its own).
        let status = Handover {
            topic: "lichen/n/status".into(),
            qos: QoS::AtLeastOnce,
            retain: true,
            payload: b"online".to_vec(),
        };
        outbox.other(status);
        outbox.fill(&spool, 10, |_| {});
        outbox.outgoing(1); // the status
        outbox.outgoing(2); // t1
        assert!(!outbox.acked(1, &spool), "the status is no spool entry");
        // rumqttc reuses packet id 1 for the next publish once the status was acknowledged.
        outbox.outgoing(1); // t2
        assert!(outbox.acked(1, &spool));
        assert_eq!(spool.left(), [1], "packet id 1 now stands for t2");
        assert!(outbox.acked(2, &spool));
        assert!(spool.left().is_empty());
        // A QoS 0 message in between takes its place in the report order (packet id 0).
        spool.append(3, "t3");
        let h = Handover { topic: "q0".into(), qos: QoS::AtMostOnce, retain: false, payload: vec![] };
        outbox.other(h);
        outbox.fill(&spool, 10, |_| {});
        outbox.outgoing(0);
        outbox.outgoing(5);
        assert!(outbox.acked(5, &spool));
        assert!(spool.left().is_empty());
        assert_eq!(drain(&mut rx), published(&["lichen/n/status", "t1", "t2", "q0", "t3"]));
    }

    #[test]
    fn a_reconnect_mid_window_sends_again_from_the_oldest_unacknowledged() {
        let spool = FakeSpool::with(1..=6);
        let (w, mut rx) = wire(64);
        let mut first = Outbox::new(w.clone());
        first.fill(&spool, 4, |_| {});
        for pkid in 1..=4 {
            first.outgoing(pkid);
        }
        assert!(first.acked(2, &spool));
        assert_eq!(drain(&mut rx), published(&["t1", "t2", "t3", "t4"]));
        // The connection drops: its outbox (and any PUBACK it was still owed) goes with it.
        drop(first);
        let mut second = Outbox::new(w);
        second.fill(&spool, 4, |_| {});
        assert_eq!(
            drain(&mut rx),
            published(&["t1", "t3", "t4", "t5"]),
            "in order, the acknowledged one not again"
        );
        for pkid in 1..=4 {
            second.outgoing(pkid);
        }
        assert!(second.acked(4, &spool) && second.acked(1, &spool));
        assert_eq!(spool.left(), [3, 4, 6]);
    }

    #[test]
    fn an_entry_with_an_invalid_topic_is_removed_not_sent() {
        let spool = FakeSpool::with([1]);
        spool.append(2, "a/+/b");
        spool.append(3, "t3");
        let (w, mut rx) = wire(64);
        let mut outbox = Outbox::new(w);
        outbox.fill(&spool, 10, |_| {});
        assert_eq!(drain(&mut rx), published(&["t1", "t3"]));
        assert_eq!(spool.left(), [1, 3]);
    }

    #[tokio::test]
    async fn a_full_request_queue_is_awaited_and_keeps_the_order() {
        let spool = FakeSpool::with(1..=5);
        let (w, mut rx) = wire(2);
        let mut outbox = Outbox::new(w);
        let mut told = Vec::new();
        outbox.fill(&spool, 5, |m| told.push(m.topic.clone()));
        assert_eq!(told, ["t1", "t2", "t3"], "the queue took two; the third, waiting, is told too");
        assert!(outbox.is_stalled());
        assert_eq!(outbox.in_flight(), 3, "the waiting one counts against the window");
        outbox.fill(&spool, 5, |_| panic!("nothing overtakes the waiting publish"));
        let q0 = Handover { topic: "q0".into(), qos: QoS::AtMostOnce, retain: false, payload: vec![] };
        outbox.other(q0);
        assert_eq!(outbox.in_flight(), 3, "nor another publish");
        // The client takes a request off the queue: the waiting hand-over completes.
        assert_eq!(rx.recv().await, Some(Req::Publish("t1".into())));
        outbox.ready().await.expect("queue open");
        assert!(!outbox.is_stalled());
        assert_eq!(rx.recv().await, Some(Req::Publish("t2".into())));
        assert_eq!(rx.recv().await, Some(Req::Publish("t3".into())));
        outbox.fill(&spool, 5, |m| told.push(m.topic.clone()));
        assert_eq!(drain(&mut rx), published(&["t4", "t5"]));
        assert_eq!(told, ["t1", "t2", "t3", "t4", "t5"]);
        for pkid in 1..=5 {
            outbox.outgoing(pkid);
        }
        assert!(outbox.acked(3, &spool), "the awaited one is matched like the others");
        assert_eq!(spool.left(), [1, 2, 4, 5]);
        // A closed queue ends the wait with an error instead of hanging.
        let (w, rx) = wire(1);
        let mut outbox = Outbox::new(w);
        outbox.fill(&spool, 5, |_| {});
        assert!(outbox.is_stalled());
        drop(rx);
        assert_eq!(outbox.ready().await, Err(QueueClosed));
    }

    /// rumqttc's request queue (flume) moves a waiting publish into the queue as soon as its event
    /// loop takes a request off it, before the waiting future is polled again: the loop may send
    /// it, report its packet id and get its PUBACK (or, for a gateway, its echo) first. Seen in
    /// the gateway test under QEMU: an echo arrived before the message was remembered as sent.
    #[tokio::test]
    async fn a_publish_that_waited_for_room_is_counted_before_the_wait_is_polled_again() {
        use futures::FutureExt;
        let spool = FakeSpool::with(1..=5);
        let (tx, rx) = flume::bounded(2);
        let mut outbox = Outbox::new(FlumeWire(tx));
        let mut told = Vec::new();
        outbox.fill(&spool, 5, |m| told.push(m.topic.clone()));
        assert_eq!(told, ["t1", "t2", "t3"], "the waiting one is told before it can reach the broker");
        assert!(outbox.ready().now_or_never().is_none(), "no room yet: the wait is registered");
        // The event loop takes t1; flume moves t3 in behind t2 at once.
        assert_eq!(rx.try_recv(), Ok("t1".to_owned()));
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), ["t2", "t3"], "t3 is in the queue already");
        // The loop reports all three and the broker acknowledges t3, before the session polls
        // the wait again.
        for pkid in 1..=3 {
            outbox.outgoing(pkid);
        }
        assert!(outbox.acked(3, &spool), "t3's PUBACK finds t3");
        assert_eq!(spool.left(), [1, 2, 4, 5]);
        outbox.ready().await.expect("queue open");
        outbox.fill(&spool, 5, |m| told.push(m.topic.clone()));
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), ["t4", "t5"]);
        outbox.outgoing(4);
        assert!(outbox.acked(4, &spool) && outbox.acked(1, &spool), "later PUBACKs find their own entries");
        assert_eq!(spool.left(), [2, 5]);
    }

    /// A client whose request queue is flume's bounded channel, as rumqttc's is (topics only).
    struct FlumeWire(flume::Sender<String>);

    impl Wire for FlumeWire {
        fn try_publish(&self, topic: &str, _: QoS, _: bool, _: &[u8]) -> Result<(), Full> {
            self.0.try_send(topic.to_owned()).map_err(|_| Full)
        }
        fn publish(&self, p: Handover) -> BoxFuture<'static, Result<(), QueueClosed>> {
            let tx = self.0.clone();
            Box::pin(async move { tx.send_async(p.topic).await.map_err(|_| QueueClosed) })
        }
        fn try_ack(&self, _: &rumqttc::Publish) -> Result<(), Full> {
            Ok(())
        }
        fn ack(&self, _: rumqttc::Publish) -> BoxFuture<'static, Result<(), QueueClosed>> {
            Box::pin(async { Ok(()) })
        }
    }

    #[tokio::test]
    async fn acknowledgements_go_in_arrival_order_through_a_full_queue() {
        let (w, mut rx) = wire(2);
        let mut acks = Acks::new(w);
        acks.push(rumqttc::Publish::new("q0", QoS::AtMostOnce, "x"));
        for pkid in 1..=4 {
            acks.push(incoming(pkid));
        }
        acks.send();
        assert!(acks.is_stalled());
        assert_eq!(acks.owed(), 2, "the third waits for room, the fourth behind it");
        assert_eq!(rx.recv().await, Some(Req::Ack(1)));
        acks.ready().await.expect("queue open");
        let mut got = vec![Req::Ack(1)];
        while acks.owed() > 0 {
            got.push(rx.recv().await.expect("queue open"));
            acks.ready().await.expect("queue open");
        }
        got.extend(drain(&mut rx));
        assert_eq!(got, [Req::Ack(1), Req::Ack(2), Req::Ack(3), Req::Ack(4)], "QoS 0 needs none");
    }
}
