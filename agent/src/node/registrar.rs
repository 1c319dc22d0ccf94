//! Registers the Node and keeps it alive: a Lease renewed every 10 s and the node status patched on
//! change and at least every 5 minutes, as the kubelet does. API failures are retried with jittered
//! back-off forever; they are logged, never fatal, and pods keep running meanwhile.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, NodeStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use kube::api::{Api, Patch, PatchParams, PostParams};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::object::{self, Readiness};
use crate::config::AgentConfig;
use crate::host::HostFacts;
use crate::names::TaintSpec;
use crate::retry::RetryBackoff;

/// How often the Lease is renewed.
pub const LEASE_RENEW: Duration = Duration::from_secs(10);
/// The Lease's duration: the node-lifecycle controller marks the node unknown after this much silence.
pub const LEASE_DURATION_SECS: i32 = 40;
/// The longest the node status goes unwritten.
pub const STATUS_REFRESH: Duration = Duration::from_secs(300);
const LEASE_NAMESPACE: &str = "kube-node-lease";

/// Errors talking to the cluster.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The API server refused or failed a request.
    #[error("{what}: {}", crate::api_error::brief(.source))]
    Api {
        /// The request.
        what: String,
        /// The error.
        #[source]
        source: kube::Error,
    },
}

impl NodeError {
    /// Whether the API server answered 404.
    pub fn is_not_found(&self) -> bool {
        matches!(self, NodeError::Api { source: kube::Error::Api(s), .. } if s.code == 404)
    }
}

fn api(what: impl Into<String>) -> impl FnOnce(kube::Error) -> NodeError {
    let what = what.into();
    move |source| NodeError::Api { what, source }
}

/// Owns the Node object and its Lease.
pub struct NodeRegistrar {
    node_name: String,
    labels: BTreeMap<String, String>,
    taints: Vec<TaintSpec>,
    max_pods: u32,
    thresholds: object::Thresholds,
    state_dir: PathBuf,
    node_ip: Option<std::net::IpAddr>,
    /// The Hostname address (the API server dials it first for `kubectl logs`).
    hostname: String,
    /// The kubelet API's port (0: off), reported as `daemonEndpoints.kubeletEndpoint.Port`.
    kubelet_port: u16,
    /// Read once; memory, disk and address are refreshed before each status.
    facts: HostFacts,
    /// The Node UID for which the Lease was last seen held by this node and owned by that Node:
    /// from then on a renewal only moves `renewTime`, and its answer is not read.
    lease_checked_for: Option<String>,
}

impl NodeRegistrar {
    /// A registrar for the config's node.
    pub fn new(config: &AgentConfig) -> Self {
        NodeRegistrar {
            node_name: config.node_name.clone(),
            labels: config.node_labels.clone(),
            // Validated at config load; an invalid one cannot reach here.
            taints: config.node_taints.clone(),
            max_pods: config.max_pods,
            thresholds: object::Thresholds {
                memory_bytes: config.memory_pressure_threshold.0,
                disk_percent: config.disk_pressure_percent as u64,
            },
            state_dir: config.state_dir.clone(),
            node_ip: config.node_ip.parse().ok(),
            hostname: config.node_hostname.clone(),
            kubelet_port: config.kubelet_api.port,
            facts: HostFacts::read(&config.state_dir, config.node_ip.parse().ok()),
            lease_checked_for: None,
        }
    }

    fn status(&mut self, readiness: Readiness, previous: Option<&NodeStatus>) -> NodeStatus {
        self.facts.refresh(&self.state_dir, self.node_ip);
        let prev = previous.and_then(|p| p.conditions.as_deref()).unwrap_or(&[]);
        let mut status = object::status(
            &self.node_name,
            &self.facts,
            self.max_pods,
            self.thresholds,
            readiness,
            jiff::Timestamp::now(),
            prev,
        );
        if !self.hostname.is_empty()
            && let Some(a) =
                status.addresses.as_mut().and_then(|a| a.iter_mut().find(|a| a.type_ == "Hostname"))
        {
            a.address = self.hostname.clone();
        }
        if self.kubelet_port != 0 {
            status.daemon_endpoints = Some(k8s_openapi::api::core::v1::NodeDaemonEndpoints {
                kubelet_endpoint: Some(k8s_openapi::api::core::v1::DaemonEndpoint {
                    port: i32::from(self.kubelet_port),
                }),
            });
        }
        status
    }

    /// Registers, then heartbeats until `cancel`; on the way out marks the node NotReady.
    pub async fn run(
        mut self,
        client: crate::cluster::ClusterClient,
        contact: std::sync::Arc<crate::cluster::ApiContact>,
        cancel: CancellationToken,
    ) {
        let mut backoff = RetryBackoff::new(Duration::from_secs(1), Duration::from_secs(60));
        // Taken afresh for every round: a renewed certificate replaces the client.
        let mut uid = loop {
            match self.register(&client.current()).await {
                Ok(uid) => break uid,
                Err(e) => {
                    contact.failed(&e.to_string());
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_secs = delay.as_secs(), "node registration failed");
                    // Another part (the pod watch) reaching the API server cuts the wait short.
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                        _ = contact.restored() => {}
                    }
                }
            }
        };
        tracing::info!(node = %self.node_name, %uid, "node registered");
        backoff.reset();

        let mut written: Option<(NodeStatus, Instant)> = None;
        let mut next = Instant::now();
        let mut failing = false;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep_until(next) => {}
                // After an outage, renew as soon as any part gets through, not at the end of the
                // back-off: the Lease is what makes the node Ready again.
                _ = contact.restored(), if failing => {}
            }
            let api = client.current();
            let lease = self.renew_lease(&api, &uid).await;
            // A Lease that had to be created again went with its Node: check the Node now.
            if matches!(lease, Ok(true)) {
                written = None;
            }
            let lease = lease.map(|_| ());
            if lease.is_ok() {
                crate::metrics::global().heartbeat();
            }
            let status = self.status(Readiness::Ready, written.as_ref().map(|(s, _)| s));
            let due = written.as_ref().is_none_or(|(s, at)| {
                object::significant(s) != object::significant(&status) || at.elapsed() >= STATUS_REFRESH
            });
            let mut patched =
                if due { self.patch_status(&api, &status).await.map(|()| true) } else { Ok(false) };
            if patched.as_ref().is_err_and(NodeError::is_not_found) {
                // Someone deleted the Node: register again rather than heartbeat into the void.
                tracing::warn!(node = %self.node_name, "the Node object was deleted; registering again");
                patched = self.register(&api).await.map(|new_uid| {
                    // The Lease must now be owned by the new Node.
                    uid = new_uid;
                    true
                });
            }
            match (lease, patched) {
                (Ok(()), Ok(wrote)) => {
                    failing = false;
                    contact.ok();
                    if wrote {
                        written = Some((status, Instant::now()));
                    }
                    backoff.reset();
                    next = Instant::now() + LEASE_RENEW;
                }
                (l, p) => {
                    failing = true;
                    let delay = backoff.next_delay().min(crate::cluster::pods::RECONNECT_MAX);
                    for e in [l.err(), p.err()].into_iter().flatten() {
                        contact.failed(&e.to_string());
                        tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "heartbeat failed");
                    }
                    next = Instant::now() + delay;
                }
            }
        }
        // Tell the scheduler and the controllers before going quiet, but do not hold up shutdown for it.
        let status = self.status(Readiness::Stopping, written.as_ref().map(|(s, _)| s));
        match tokio::time::timeout(Duration::from_secs(5), self.patch_status(&client.current(), &status))
            .await
        {
            Ok(Ok(())) => tracing::info!("node marked NotReady for shutdown"),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot mark the node NotReady"),
            Err(_) => tracing::warn!("timed out marking the node NotReady"),
        }
    }

    /// Creates the Node, or adopts an existing one (refreshing Lichen's labels); returns its UID.
    async fn register(&mut self, client: &kube::Client) -> Result<String, NodeError> {
        let nodes: Api<Node> = Api::all(client.clone());
        let status = self.status(Readiness::Ready, None);
        let node = object::registration(&self.node_name, &self.labels, &self.taints, status.clone());
        let uid = match nodes.create(&PostParams::default(), &node).await {
            Ok(created) => created.metadata.uid,
            Err(kube::Error::Api(s)) if s.code == 409 => {
                // Taints are only set at creation, as the kubelet does: admins may have changed them since.
                let labels = object::labels(&self.node_name, &self.labels);
                let patch = serde_json::json!({ "metadata": { "labels": labels } });
                let patched = nodes
                    .patch(&self.node_name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map_err(api(format!("updating the labels of existing node {}", self.node_name)))?;
                patched.metadata.uid
            }
            Err(e) => return Err(api(format!("creating node {}", self.node_name))(e)),
        };
        self.patch_status(client, &status).await?;
        Ok(uid.unwrap_or_default())
    }

    /// PATCHes `nodes/status` (a node may patch its status but not read it); the Node the server
    /// answers with, several KB, is not read.
    async fn patch_status(&self, client: &kube::Client, status: &NodeStatus) -> Result<(), NodeError> {
        let patch = serde_json::json!({ "status": status });
        let path = format!("/api/v1/nodes/{}/status", self.node_name);
        crate::cluster::lean::merge_patch(client, &path, &patch).await.map_err(api("patching node status"))
    }

    /// Renews the Lease; returns whether it had to be created.
    async fn renew_lease(&mut self, client: &kube::Client, node_uid: &str) -> Result<bool, NodeError> {
        let now = MicroTime(jiff::Timestamp::now());
        if self.lease_checked_for.as_deref() == Some(node_uid) {
            // Held by this node and owned by its Node since the last full renewal: only the time
            // moves, 8,640 times a day, so the patch is that alone and the Lease sent back unread.
            let patch = serde_json::json!({ "spec": { "renewTime": now } });
            let path = format!(
                "/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases/{}",
                self.node_name
            );
            match crate::cluster::lean::merge_patch(client, &path, &patch).await {
                Ok(()) => return Ok(false),
                // Deleted meanwhile (with its Node, or by hand): the full renewal below creates it.
                Err(kube::Error::Api(s)) if s.code == 404 => self.lease_checked_for = None,
                Err(e) => return Err(api("renewing the node lease")(e)),
            }
        }
        let leases: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
        let patch = serde_json::json!({ "spec": {
            "holderIdentity": self.node_name,
            "leaseDurationSeconds": LEASE_DURATION_SECS,
            "renewTime": now,
        }});
        let owners = (!node_uid.is_empty()).then(|| {
            vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Node".into(),
                name: self.node_name.clone(),
                uid: node_uid.to_owned(),
                ..Default::default()
            }]
        });
        match leases.patch(&self.node_name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(lease) => {
                // A Lease left by a deleted Node of the same name still names that Node as its
                // owner, and the garbage collector would delete it under the new one: adopt it,
                // as the kubelet does.
                let adopted = lease.metadata.owner_references.iter().flatten().any(|o| o.uid == node_uid);
                if let Some(owners) = owners.filter(|_| !adopted) {
                    let fix = serde_json::json!({ "metadata": { "ownerReferences": owners } });
                    leases
                        .patch(&self.node_name, &PatchParams::default(), &Patch::Merge(&fix))
                        .await
                        .map_err(api("adopting the node lease"))?;
                }
                self.lease_checked_for = Some(node_uid.to_owned());
                Ok(false)
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.node_name.clone()),
                        namespace: Some(LEASE_NAMESPACE.into()),
                        // Owned by the Node, so deleting the Node collects its Lease.
                        owner_references: owners,
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.node_name.clone()),
                        lease_duration_seconds: Some(LEASE_DURATION_SECS),
                        renew_time: Some(now),
                        ..Default::default()
                    }),
                };
                leases
                    .create(&PostParams::default(), &lease)
                    .await
                    .map_err(api("creating the node lease"))?;
                self.lease_checked_for = Some(node_uid.to_owned());
                Ok(true)
            }
            Err(e) => Err(api("renewing the node lease")(e)),
        }
    }
}
