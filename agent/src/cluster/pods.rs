//! Pods bound to this node, from a watch on `spec.nodeName=<node>` in all namespaces. kube-runtime's
//! watcher lists, watches, re-lists on `410 Gone` and backs off on errors; this module turns its
//! events into the desired set, publishing only complete lists, so an outage never looks like "no
//! pods" and never stops a running pod. It also confirms deletions to the API server once a pod's
//! modules have stopped, from a task of its own that the main loop feeds and never waits for.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::TryStreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;

use super::ClusterClient;
use kube::api::{Api, DeleteParams, Preconditions};
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::inputs::InputResolver;
use crate::pod::manager::DesiredPod;
use crate::retry::RetryBackoff;

/// How often pods' ConfigMaps, Secrets and tokens are looked at again (each fetched only when
/// missing, failed, due, or older than [`super::inputs::REFRESH`]).
const INPUTS_PASS: Duration = Duration::from_secs(10);

/// The longest wait between attempts to reach the API server, here and in the heartbeat.
pub const RECONNECT_MAX: Duration = Duration::from_secs(4);

/// How long after a watch resumes from an interruption its events count as catching up on what
/// happened while the node was away.
const CATCH_UP: Duration = Duration::from_secs(10);

/// A pod being deleted: stop it, then remove the object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Terminating {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID, the precondition of the final delete.
    pub uid: String,
}

/// Pods with a deletion timestamp, waiting for their final delete.
pub type TerminatingSet = Arc<Mutex<HashMap<String, Terminating>>>;

/// Watches this node's pods and publishes the ones to run.
pub struct ApiPodSource {
    client: ClusterClient,
    node_name: String,
    terminating: TerminatingSet,
    inputs: InputResolver,
    /// `autonomy.evicted_grace_secs`.
    evicted_grace: Duration,
    /// Pods found already deleted when (re-)listing, by UID, with when that was noticed.
    evicted: HashMap<String, tokio::time::Instant>,
    /// The link to the API server, told when a list or watch gets through.
    contact: Option<Arc<super::ApiContact>>,
}

impl ApiPodSource {
    /// A source for `node_name`'s pods. Pods being deleted are put in `terminating`.
    pub fn new(client: ClusterClient, node_name: String, terminating: TerminatingSet) -> Self {
        let inputs = InputResolver::new(client.clone());
        ApiPodSource {
            client,
            node_name,
            terminating,
            inputs,
            evicted_grace: Duration::ZERO,
            evicted: HashMap::new(),
            contact: None,
        }
    }

    /// Reports successful lists and watch events to `contact` (which wakes the heartbeat after an
    /// outage).
    pub fn with_contact(mut self, contact: Arc<super::ApiContact>) -> Self {
        self.contact = Some(contact);
        self
    }

    /// Keeps pods that were deleted while the node was not watching (found terminating by a list,
    /// as the node-lifecycle controller's evictions are after an outage) running for `grace` before
    /// they are stopped.
    pub fn with_evicted_grace(mut self, grace: Duration) -> Self {
        self.evicted_grace = grace;
        self
    }

    /// Runs until `cancel`, sending the desired pods after every complete view.
    pub async fn run(mut self, tx: watch::Sender<Vec<DesiredPod>>, cancel: CancellationToken) {
        let api: Api<Pod> = Api::all(self.client.current());
        let config = watcher::Config::default().fields(&format!("spec.nodeName={}", self.node_name));
        let mut client = self.client.clone();
        // Back-off is ours rather than kube-runtime's: its default counts a `410 Gone` as one more
        // failure on top of an outage's, so the re-list that must follow an API server restart
        // would wait out the accumulated delay (up to 30 s) before pods bound meanwhile start.
        let mut stream = std::pin::pin!(watcher::watcher(api, config.clone()));
        // Capped low: an edge node must notice the API server's return within seconds (a refused
        // connection costs next to nothing), and the heartbeat wakes this watch when it gets
        // through first.
        let mut backoff = RetryBackoff::new(Duration::from_millis(500), RECONNECT_MAX);
        let mut pods: BTreeMap<String, Pod> = BTreeMap::new();
        let mut listing: Option<BTreeMap<String, Pod>> = None;
        let mut listed = false;
        let (mut interrupted, mut resumed_at) = (false, None::<tokio::time::Instant>);
        // Re-fetches ConfigMaps, Secrets and tokens: missing ones appear, changed ones propagate.
        let mut refresh = tokio::time::interval(INPUTS_PASS);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let event = tokio::select! {
                _ = cancel.cancelled() => return,
                e = stream.try_next() => Some(e),
                _ = refresh.tick() => None,
                () = client.changed() => {
                    // A renewed certificate: watch again with the new client, whose connections
                    // carry it. The re-list is a complete list like any other, so pods that stay
                    // bound keep running untouched.
                    stream.set(watcher::watcher(Api::all(client.current()), config.clone()));
                    None
                }
            };
            let Some(event) = event else {
                if listed && listing.is_none() {
                    let desired = self.desired(&pods).await;
                    tx.send_if_modified(|cur| {
                        let changed = *cur != desired;
                        if changed {
                            *cur = desired;
                        }
                        changed
                    });
                }
                continue;
            };
            match &event {
                // `Init` comes before every list attempt, failed ones too: it proves nothing.
                Ok(Some(Event::Init)) | Ok(None) => {}
                Ok(_) => {
                    backoff.reset();
                    if let Some(c) = &self.contact {
                        c.ok();
                    }
                    if std::mem::take(&mut interrupted) {
                        resumed_at = Some(tokio::time::Instant::now());
                    }
                }
                Err(_) => interrupted = true,
            }
            // What a resumed watch delivers first is what happened while the node was not watching.
            let catching_up = resumed_at.is_some_and(|t| t.elapsed() < CATCH_UP);
            let complete = match event {
                Ok(Some(Event::Init)) => {
                    listing = Some(BTreeMap::new());
                    false
                }
                Ok(Some(Event::InitApply(p))) => {
                    if let Some(l) = listing.as_mut() {
                        l.insert(uid(&p), p);
                    }
                    false
                }
                Ok(Some(Event::InitDone)) => {
                    let fresh = listing.take().unwrap_or_default();
                    self.note_evictions(&pods, &fresh);
                    pods = fresh;
                    listed = true;
                    tracing::info!(pods = pods.len(), "listed pods bound to this node");
                    true
                }
                Ok(Some(Event::Apply(p))) => {
                    if catching_up {
                        self.note_eviction(pods.get(&uid(&p)), &p);
                    }
                    pods.insert(uid(&p), p);
                    listing.is_none()
                }
                Ok(Some(Event::Delete(p))) => {
                    self.evicted.remove(&uid(&p));
                    pods.remove(&uid(&p));
                    listing.is_none()
                }
                Ok(None) => return,
                // The history the watch resumed from is gone (compaction, an API server restart):
                // the watcher re-lists on its next poll, at once. Running pods are untouched.
                Err(watcher::Error::WatchError(s)) if s.code == 410 => {
                    tracing::info!("pod watch expired (410 Gone); re-listing");
                    false
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %crate::api_error::watch_failed("pods", &e), retry_in_ms = delay.as_millis() as u64, "pod watch interrupted; retrying");
                    let restored = async {
                        match &self.contact {
                            Some(c) => c.restored().await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = restored => {}
                        _ = tokio::time::sleep(delay) => {}
                    }
                    false
                }
            };
            if complete {
                let desired = self.desired(&pods).await;
                // Pods awaiting their final delete need a sync even when the set to run is unchanged.
                let deleting = self.terminating.lock().is_ok_and(|t| !t.is_empty());
                tx.send_if_modified(|cur| {
                    let changed = *cur != desired || deleting;
                    if changed {
                        *cur = desired;
                    }
                    changed
                });
            }
        }
    }

    /// Pods that a list shows terminating although the node last saw them alive (or never saw
    /// them): deleted while it was not watching.
    fn note_evictions(&mut self, before: &BTreeMap<String, Pod>, now: &BTreeMap<String, Pod>) {
        self.evicted.retain(|uid, _| now.contains_key(uid));
        for (uid, p) in now {
            self.note_eviction(before.get(uid), p);
        }
    }

    /// Notes `p` if it turned out deleted (it was alive, or unknown, before).
    fn note_eviction(&mut self, before: Option<&Pod>, p: &Pod) {
        let was_alive = before.is_none_or(|b| b.metadata.deletion_timestamp.is_none());
        let id = uid(p);
        if self.evicted_grace.is_zero()
            || p.metadata.deletion_timestamp.is_none()
            || !was_alive
            || self.evicted.contains_key(&id)
        {
            return;
        }
        let m = &p.metadata;
        tracing::warn!(
            pod = %format!("{}/{}", m.namespace.as_deref().unwrap_or(""), m.name.as_deref().unwrap_or("")),
            grace_secs = self.evicted_grace.as_secs(),
            "pod was deleted while the node was away; it keeps running for autonomy.evicted_grace_secs"
        );
        self.evicted.insert(id, tokio::time::Instant::now());
    }

    async fn desired(&mut self, pods: &BTreeMap<String, Pod>) -> Vec<DesiredPod> {
        let mut terminating = HashMap::new();
        let mut out = Vec::new();
        for p in pods.values() {
            let key = format!(
                "{}/{}",
                p.metadata.namespace.as_deref().unwrap_or("default"),
                p.metadata.name.as_deref().unwrap_or("")
            );
            let in_grace = self.evicted.get(&uid(p)).is_some_and(|at| at.elapsed() < self.evicted_grace);
            if p.metadata.deletion_timestamp.is_some() && !in_grace {
                terminating.insert(
                    key,
                    Terminating {
                        namespace: p.metadata.namespace.clone().unwrap_or_default(),
                        name: p.metadata.name.clone().unwrap_or_default(),
                        uid: uid(p),
                    },
                );
                continue;
            }
            let inputs = self.inputs.inputs(p).await;
            out.push(DesiredPod {
                pod: p.clone(),
                source: crate::store::PodSource::Api,
                image_base: None,
                inputs: Some(inputs),
            });
        }
        self.inputs.retain(&pods.keys().cloned().collect());
        if let Ok(mut t) = self.terminating.lock() {
            *t = terminating;
        }
        out
    }
}

fn uid(p: &Pod) -> String {
    p.metadata.uid.clone().unwrap_or_default()
}

/// Pods whose deletion was requested and whose modules have stopped (`still_running` says which
/// have not): ready for their final delete. Only reads memory, so the main loop may call it.
pub fn ready_deletions(
    terminating: &TerminatingSet,
    still_running: impl Fn(&str, &str) -> bool,
) -> Vec<(String, Terminating)> {
    match terminating.lock() {
        Ok(t) => {
            t.iter().filter(|(k, t)| !still_running(k, &t.uid)).map(|(k, t)| (k.clone(), t.clone())).collect()
        }
        Err(_) => Vec::new(),
    }
}

/// Pods ready for their final delete, and the client to send it with.
#[derive(Clone)]
pub struct Deletions {
    /// The client current when the batch was made.
    pub client: Client,
    /// From [`ready_deletions`].
    pub ready: Vec<(String, Terminating)>,
}

/// Confirms deletions from a task of its own, fed by the main loop through a bounded channel: an
/// API server that holds a DELETE holds this task, never the loop. A delete that fails stays in
/// `terminating`, so a later batch tries it again.
pub async fn confirm_deletions(
    mut batches: tokio::sync::mpsc::Receiver<Deletions>,
    terminating: TerminatingSet,
    cancel: CancellationToken,
) {
    loop {
        let batch = tokio::select! {
            _ = cancel.cancelled() => return,
            b = batches.recv() => match b {
                Some(b) => b,
                None => return,
            },
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            () = finish_deletions(&batch.client, &terminating, batch.ready) => {}
        }
    }
}

/// Removes pods whose deletion was requested and whose modules have stopped: the last step of
/// graceful deletion, with grace 0 and the UID as precondition so a recreated pod is never hit.
pub async fn finish_deletions(
    client: &Client,
    terminating: &TerminatingSet,
    ready: Vec<(String, Terminating)>,
) {
    for (key, t) in ready {
        // A batch queued behind one that already confirmed this pod need not ask again.
        let pending = terminating.lock().is_ok_and(|set| set.get(&key).is_some_and(|p| p.uid == t.uid));
        if !pending {
            continue;
        }
        let api: Api<Pod> = Api::namespaced(client.clone(), &t.namespace);
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions { uid: Some(t.uid.clone()), resource_version: None }),
            ..Default::default()
        };
        match api.delete(&t.name, &dp).await {
            Ok(_) => tracing::info!(pod = %key, "pod deleted"),
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => {
                let resource = format!("pods {key}");
                tracing::warn!(error = %crate::api_error::failed("delete", &resource, &e), "cannot delete pod; will retry");
                continue;
            }
        }
        if let Ok(mut set) = terminating.lock() {
            set.remove(&key);
        }
    }
}
