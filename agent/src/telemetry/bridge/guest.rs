//! Guest ports: a container's side of `lichen:mqtt` ([`GuestPort`]), the pod's annotations
//! applied to each call a module makes (where it may publish, what it may subscribe within, its
//! rate limit).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;

use super::PodBridge;
use super::hub::{Sink, Subscriber};
use crate::runtime::mqtt_api::{Errno, GuestMessage, GuestMqttPort};
use crate::telemetry::spool::{Origin, SpoolMessage};
use crate::topic::{TopicFilter, TopicName};

/// Subscriptions one container may hold through `lichen:mqtt`; each costs the broker and the
/// bridge's matching, so a module cannot add them without end.
pub const MAX_GUEST_SUBSCRIPTIONS: usize = 16;

/// A container's side of `lichen:mqtt`: the pod's rules applied to each call.
pub(super) struct GuestPort {
    pub(super) pod: Arc<PodBridge>,
    /// The expanded publish annotation: the module may publish there and below.
    pub(super) publish_root: Option<String>,
    /// The expanded subscribe annotation: what the module may subscribe within.
    pub(super) allowed: Vec<TopicFilter>,
    pub(super) id: u64,
    pub(super) inbox: mpsc::Sender<GuestMessage>,
    pub(super) subscribed: Mutex<Vec<TopicFilter>>,
}

impl GuestMqttPort for GuestPort {
    fn publish(&self, topic: &str, payload: &[u8], qos: u8, retain: bool) -> Result<(), Errno> {
        let Ok(topic) = TopicName::parse(topic) else {
            return Err(Errno::Inval);
        };
        let allowed = self.publish_root.as_deref().is_some_and(|root| topic.is_under(root));
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
            topic: topic.into(),
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
        let Ok(filter) = TopicFilter::parse(filter) else {
            return Err(Errno::Inval);
        };
        if !self.allowed.iter().any(|a| a.covers(&filter)) {
            return Err(Errno::Acces);
        }
        let mut mine = self.subscribed.lock().unwrap_or_else(|p| p.into_inner());
        if mine.contains(&filter) {
            return Ok(());
        }
        if mine.len() >= MAX_GUEST_SUBSCRIPTIONS {
            return Err(Errno::TooBig);
        }
        mine.push(filter.clone());
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
