//! Writes pod events to the API server as the kubelet does: core/v1 `Event`s (a node may create
//! and patch those; 1.20's Node authorizer does not let it write `events.k8s.io`), with repeats
//! of the same event folded into one object whose `count` and `lastTimestamp` are patched, and a
//! per-pod spam filter (a burst of 25, then one every 5 minutes), so a crash-looping module
//! cannot flood etcd.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::pod::events::PodEvent;
use crate::retry::RetryBackoff;

/// Repeats within this window patch the existing event; later ones start a new one.
const CORRELATION_WINDOW: i64 = 10 * 60;
/// Events remembered for folding repeats.
const REMEMBERED: usize = 4096;
/// The spam filter's burst per pod.
const BURST: f64 = 25.0;
/// The spam filter's refill: one token per this many seconds.
const REFILL_SECS: f64 = 300.0;

/// The identity of an event for folding repeats: same pod, container, reason and message.
type Fold = (String, String, Option<String>, &'static str, String);

struct Seen {
    name: String,
    namespace: String,
    count: i32,
    first: Timestamp,
}

struct Bucket {
    tokens: f64,
    at: Timestamp,
}

/// Folding and rate-limiting, without I/O.
#[derive(Default)]
pub struct Correlator {
    seen: HashMap<Fold, Seen>,
    order: VecDeque<Fold>,
    buckets: HashMap<String, Bucket>,
}

/// What to do with one event.
#[derive(Debug, PartialEq)]
pub enum Action {
    /// Create a new Event object.
    Create(Box<Event>),
    /// Patch the existing event `name` in `namespace` to this count and last timestamp.
    Bump {
        /// Namespace.
        namespace: String,
        /// Event name.
        name: String,
        /// New count.
        count: i32,
        /// New `lastTimestamp`.
        last: Timestamp,
    },
    /// Over the spam filter's budget.
    Drop,
}

impl Action {
    /// The request's verb, for log lines.
    fn verb(&self) -> &'static str {
        match self {
            Action::Create(_) => "create",
            Action::Bump { .. } => "patch",
            Action::Drop => "drop",
        }
    }
}

impl Correlator {
    /// Decides how `e` reaches the API server, and remembers it.
    pub fn observe(&mut self, e: &PodEvent, node: &str) -> Action {
        if !self.allow(&e.uid, e.at) {
            return Action::Drop;
        }
        let fold: Fold = (e.key.clone(), e.uid.clone(), e.field_path.clone(), e.reason, e.message.clone());
        if let Some(s) = self.seen.get_mut(&fold)
            && e.at.as_second() - s.first.as_second() < CORRELATION_WINDOW
        {
            s.count += 1;
            return Action::Bump {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
                count: s.count,
                last: e.at,
            };
        }
        let (namespace, pod) = e.key.split_once('/').unwrap_or(("default", e.key.as_str()));
        // The kubelet's naming: the object's name and the time in nanoseconds, in hex.
        let name = format!("{pod}.{:x}", e.at.as_nanosecond());
        let event = Event {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.to_owned()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                namespace: Some(namespace.to_owned()),
                name: Some(pod.to_owned()),
                uid: Some(e.uid.clone()),
                field_path: e.field_path.clone(),
                ..Default::default()
            },
            reason: Some(e.reason.to_owned()),
            message: Some(e.message.clone()),
            type_: Some(e.kind.as_str().to_owned()),
            source: Some(EventSource { component: Some("lichen".into()), host: Some(node.to_owned()) }),
            reporting_component: Some("lichen".into()),
            reporting_instance: Some(node.to_owned()),
            first_timestamp: Some(Time(e.at)),
            last_timestamp: Some(Time(e.at)),
            count: Some(1),
            ..Default::default()
        };
        if self
            .seen
            .insert(fold.clone(), Seen { name, namespace: namespace.to_owned(), count: 1, first: e.at })
            .is_none()
        {
            self.order.push_back(fold);
        }
        while self.order.len() > REMEMBERED {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        Action::Create(Box::new(event))
    }

    /// The per-pod token bucket.
    fn allow(&mut self, uid: &str, now: Timestamp) -> bool {
        if self.buckets.len() > REMEMBERED {
            // Pods come and go; forget the ones whose buckets have long been full again.
            self.buckets.retain(|_, b| (now.as_second() - b.at.as_second()) as f64 <= BURST * REFILL_SECS);
        }
        let b = self.buckets.entry(uid.to_owned()).or_insert(Bucket { tokens: BURST, at: now });
        let elapsed = (now.as_millisecond() - b.at.as_millisecond()).max(0) as f64 / 1000.0;
        b.tokens = (b.tokens + elapsed / REFILL_SECS).min(BURST);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Writes events from `rx` until `cancel`. While the API server is away the event being written
/// is retried with back-off and the rest wait in the bounded queue.
pub async fn run(
    client: super::ClusterClient,
    node: String,
    mut rx: mpsc::Receiver<PodEvent>,
    cancel: CancellationToken,
) {
    let mut correlator = Correlator::default();
    let mut backoff = RetryBackoff::new(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        let e = tokio::select! {
            _ = cancel.cancelled() => return,
            e = rx.recv() => match e { Some(e) => e, None => return },
        };
        let action = correlator.observe(&e, &node);
        loop {
            match write(&client.current(), &action).await {
                Ok(()) => {
                    backoff.reset();
                    break;
                }
                Err(WriteError::Rejected(why)) => {
                    let resource = format!("events {}", e.key);
                    tracing::warn!(reason = e.reason, error = %crate::api_error::failed(action.verb(), &resource, &why), "event refused by the API server");
                    break;
                }
                Err(WriteError::Unreachable(why)) => {
                    let delay = backoff.next_delay();
                    let resource = format!("events {}", e.key);
                    tracing::debug!(error = %crate::api_error::failed(action.verb(), &resource, &why), retry_in_secs = delay.as_secs(), "cannot write event");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}

enum WriteError {
    /// The API server answered no; retrying will not help.
    Rejected(kube::Error),
    /// No answer; retry.
    Unreachable(kube::Error),
}

fn classify(e: kube::Error) -> WriteError {
    match &e {
        kube::Error::Api(s) if s.code < 500 && s.code != 429 => WriteError::Rejected(e),
        _ => WriteError::Unreachable(e),
    }
}

async fn write(client: &Client, action: &Action) -> Result<(), WriteError> {
    match action {
        Action::Drop => Ok(()),
        Action::Create(event) => {
            let ns = event.metadata.namespace.as_deref().unwrap_or("default");
            let api: Api<Event> = Api::namespaced(client.clone(), ns);
            match api.create(&PostParams::default(), event).await {
                // Written already by an attempt whose answer was lost.
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
                r => r.map(|_| ()).map_err(classify),
            }
        }
        Action::Bump { namespace, name, count, last } => {
            let api: Api<Event> = Api::namespaced(client.clone(), namespace);
            let patch = serde_json::json!({ "count": count, "lastTimestamp": Time(*last) });
            match api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                // Events expire (an hour by default); the next repeat starts a new one.
                Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
                r => r.map(|_| ()).map_err(classify),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::events::EventType;

    fn event(reason: &'static str, message: &str, at: i64) -> PodEvent {
        PodEvent {
            key: "ns/p".into(),
            uid: "u1".into(),
            field_path: Some("spec.containers{app}".into()),
            kind: EventType::Warning,
            reason,
            message: message.into(),
            at: Timestamp::from_second(at).expect("ts"),
        }
    }

    #[test]
    fn repeats_fold_into_one_event_within_ten_minutes() {
        let mut c = Correlator::default();
        let Action::Create(first) = c.observe(&event("BackOff", "Back-off restarting", 1_000), "n") else {
            panic!("first is created")
        };
        let name = first.metadata.name.clone().expect("name");
        assert!(name.starts_with("p."), "{name}");
        assert_eq!(first.involved_object.field_path.as_deref(), Some("spec.containers{app}"));
        assert_eq!(first.source.as_ref().and_then(|s| s.host.as_deref()), Some("n"));
        match c.observe(&event("BackOff", "Back-off restarting", 1_010), "n") {
            Action::Bump { name: n, count, .. } => assert_eq!((n, count), (name.clone(), 2)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(c.observe(&event("BackOff", "other message", 1_020), "n"), Action::Create(_)));
        assert!(matches!(
            c.observe(&event("BackOff", "Back-off restarting", 1_000 + 601), "n"),
            Action::Create(_)
        ));
    }

    #[test]
    fn the_spam_filter_allows_a_burst_then_one_per_five_minutes() {
        let mut c = Correlator::default();
        let allowed =
            (0..40).filter(|i| c.observe(&event("Started", &format!("m{i}"), 1_000), "n") != Action::Drop);
        assert_eq!(allowed.count(), 25);
        assert_eq!(c.observe(&event("Started", "later", 1_000 + 299), "n"), Action::Drop);
        assert_ne!(c.observe(&event("Started", "later", 1_000 + 301), "n"), Action::Drop);
    }
}
