//! The node's side of a fleet upgrade while connected: reports what runs (the Node's
//! `lichen.dev/agent-version`), the outcome of the last upgrade (`lichen.dev/agent-upgrade` and
//! Events on the Node, including outcomes decided while the API server was away), and watches its
//! own Node for `lichen.dev/agent-image`. An accepted image is resolved for this platform, its
//! signature verified, the binary downloaded (resuming), checked and smoke-tested, staged, and handed over to:
//! the agent stops its pods, flushes its store and `exec`s the new binary on trial.
//!
//! What to do with an annotation is decided by [`consider`] (pure); everything that can fail before
//! the switch ends in `Failed` with the reason, and the running agent stays.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use k8s_openapi::api::core::v1::{Event, EventSource, Node, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, PartialObjectMeta, PostParams};
use kube::runtime::watcher::{self, Event as WatchEvent};
use tokio_util::sync::CancellationToken;

use super::slots::{Slot, SwitchRecord, Trial};
use super::switch::AgentSwitch;
use super::{EventReason, IMAGE_ANNOTATION, Phase, UPGRADE_ANNOTATION, UpgradeReport, VERSION_ANNOTATION};
use crate::cluster::{ApiContact, ClusterClient};
use crate::config::{ModulesConfig, UpgradeConfig};
use crate::retry::RetryBackoff;

/// What to do with the Node's `lichen.dev/agent-image`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing: no annotation, the version running, or an image already refused.
    Nothing,
    /// Refuse it, saying why.
    Refuse(String),
    /// Upgrade to it.
    Start,
}

/// Whether `image` is `<name>@sha256:<64 hex>`.
pub fn pinned(image: &str) -> bool {
    image
        .rsplit_once("@sha256:")
        .is_some_and(|(name, hex)| !name.is_empty() && super::artifact::is_sha256_hex(hex))
}

/// The decision on annotation `image` given the record and whether upgrades are on.
pub fn consider(image: Option<&str>, record: &SwitchRecord, enabled: bool) -> Decision {
    let Some(image) = image.map(str::trim).filter(|i| !i.is_empty()) else { return Decision::Nothing };
    let done = record.committed.as_ref().is_some_and(|c| c.image == image)
        || record.trial.as_ref().is_some_and(|t| t.slot.image == image)
        || record.refused.as_deref() == Some(image);
    if done {
        return Decision::Nothing;
    }
    if !pinned(image) {
        return Decision::Refuse(format!(
            "{IMAGE_ANNOTATION} {image:?} is not pinned by digest: write <registry>/<repository>@sha256:<digest> \
             (`lichen push --agent` prints it); a tag can move under a fleet mid-wave"
        ));
    }
    if !enabled {
        return Decision::Refuse(
            "remote upgrades are off on this node: upgrade.trusted_keys names no key".to_owned(),
        );
    }
    Decision::Start
}

/// The upgrader of one node.
pub struct Upgrader {
    node: String,
    upgrade: UpgradeConfig,
    modules: ModulesConfig,
    switch: Arc<AgentSwitch>,
    contact: Arc<ApiContact>,
    /// The agent's root token: a handover stops the whole agent.
    shutdown: CancellationToken,
}

impl Upgrader {
    /// An upgrader for `node`; `shutdown` is the agent's root cancellation token.
    pub fn new(
        node: String,
        upgrade: UpgradeConfig,
        modules: ModulesConfig,
        switch: Arc<AgentSwitch>,
        contact: Arc<ApiContact>,
        shutdown: CancellationToken,
    ) -> Self {
        Upgrader { node, upgrade, modules, switch, contact, shutdown }
    }

    /// Reports, then watches the Node until `cancel`.
    pub async fn run(self, mut client: ClusterClient, cancel: CancellationToken) {
        let mut backoff = RetryBackoff::new(Duration::from_secs(1), Duration::from_secs(60));
        // What runs, and any outcome decided while away, reach the Node first.
        let node = loop {
            match self.report_start(&client).await {
                Ok(node) => break node,
                Err(e) => {
                    let delay = backoff.next_delay();
                    // The registrar creates the Node alongside: at first start it may not be there yet.
                    if matches!(&e, kube::Error::Api(s) if s.code == 404) {
                        tracing::debug!(
                            retry_in_ms = delay.as_millis() as u64,
                            "the Node is not registered yet"
                        );
                    } else {
                        tracing::warn!(error = %crate::api_error::brief(&e), retry_in_ms = delay.as_millis() as u64, "cannot report the agent's version on the Node; retrying");
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        };
        if !self.upgrade.enabled() {
            // No watch on a node that refuses every upgrade anyway (each node status refresh,
            // every 5 minutes, would come back on it as an event): an annotation set before this
            // start is refused now, one set later at the next start.
            let image = node.annotations.as_ref().and_then(|a| a.get(IMAGE_ANNOTATION)).cloned();
            self.on_annotation(&client, &node, image.as_deref(), &cancel).await;
            return;
        }
        // The Node's metadata only (annotations are all this reads): each status refresh comes
        // back on this watch, without the status.
        let config = watcher::Config::default().fields(&format!("metadata.name={}", self.node));
        let mut stream = std::pin::pin!(watcher::watcher(
            Api::<PartialObjectMeta<Node>>::all(client.current()),
            config.clone()
        ));
        // `None` until the first event: the Node as found at start is acted on even without the
        // annotation, so that one removed while the agent was down clears a refusal of its image
        // (else the same image set again would never be tried).
        let mut seen: Option<Option<String>> = None;
        loop {
            let event = tokio::select! {
                _ = cancel.cancelled() => return,
                // The health gate decided (this agent was on trial): say so on the Node.
                () = self.switch.decided() => {
                    self.report_decided(&client, &node, &cancel).await;
                    continue;
                }
                // A renewed certificate: watch again with the new client, whose connections carry
                // it (the re-list is acted on like any event; an unchanged annotation is skipped).
                () = client.changed() => {
                    stream.set(watcher::watcher(Api::<PartialObjectMeta<Node>>::all(client.current()), config.clone()));
                    continue;
                }
                e = stream.try_next() => e,
            };
            let node = match event {
                Ok(Some(WatchEvent::Apply(n) | WatchEvent::InitApply(n))) => n.metadata,
                Ok(Some(_)) => continue,
                Ok(None) => return,
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::debug!(error = %e, "node watch interrupted; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    continue;
                }
            };
            backoff.reset();
            let image = node.annotations.as_ref().and_then(|a| a.get(IMAGE_ANNOTATION)).cloned();
            if seen.as_ref() == Some(&image) {
                continue;
            }
            seen = Some(image.clone());
            if self.on_annotation(&client, &node, image.as_deref(), &cancel).await {
                return;
            }
        }
    }

    /// Acts on a changed annotation; true once a handover is under way.
    async fn on_annotation(
        &self,
        client: &ClusterClient,
        node: &ObjectMeta,
        image: Option<&str>,
        cancel: &CancellationToken,
    ) -> bool {
        let slots = self.switch.slots().clone();
        let mut record = match tokio::task::spawn_blocking(move || slots.load()).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot read the upgrade record");
                return false;
            }
            Err(_) => return false,
        };
        // "Not tried again until the annotation changes": it has.
        if record.refused.is_some() && record.refused.as_deref() != image.map(str::trim) {
            record.refused = None;
            self.save(record.clone()).await;
        }
        let Some(image) = image.map(str::trim) else { return false };
        match consider(Some(image), &record, self.upgrade.enabled()) {
            Decision::Nothing => false,
            Decision::Refuse(reason) => {
                self.fail(client, node, &mut record, image, None, reason).await;
                false
            }
            Decision::Start => self.upgrade_to(client, node, &mut record, image, cancel).await,
        }
    }

    async fn upgrade_to(
        &self,
        client: &ClusterClient,
        node: &ObjectMeta,
        record: &mut SwitchRecord,
        image: &str,
        cancel: &CancellationToken,
    ) -> bool {
        let started = UpgradeReport {
            image: image.to_owned(),
            phase: Phase::Started,
            version: None,
            reason: format!("upgrading from {}", crate::version::version()),
            at: jiff::Timestamp::now().to_string(),
        };
        self.publish(client, node, &started, &[EventReason::UpgradeStarted]).await;
        let staged = tokio::select! {
            _ = cancel.cancelled() => return false,
            s = super::prepare::prepare(image, &self.upgrade, &self.modules, self.switch.slots()) => s,
        };
        let staged = match staged {
            Ok(s) => s,
            Err(e) => {
                self.fail(client, node, record, image, e.version(), e.to_string()).await;
                return false;
            }
        };
        // The trial is recorded unbooted; the launcher boots it (a kill before that leaves a trial
        // the next start boots, a kill after it one the next start rolls back).
        record.trial = Some(Trial {
            slot: Slot {
                image: image.to_owned(),
                digest: staged.digest.clone(),
                version: staged.version.clone(),
            },
            boots: 0,
            had_contact: self.contact.offline_for().is_none(),
            from_version: crate::version::version(),
        });
        record.report = Some(UpgradeReport {
            image: image.to_owned(),
            phase: Phase::Started,
            version: Some(staged.version.clone()),
            reason: format!("switching from {} to {}", crate::version::version(), staged.version),
            at: jiff::Timestamp::now().to_string(),
        });
        record.report_pending = false;
        let slots = self.switch.slots().clone();
        let to_save = record.clone();
        match tokio::task::spawn_blocking(move || slots.save(&to_save)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                self.fail(
                    client,
                    node,
                    record,
                    image,
                    Some(staged.version.clone()),
                    format!("cannot record the switch: {e}"),
                )
                .await;
                return false;
            }
            Err(_) => return false,
        }
        if let Some(report) = &record.report {
            self.annotate(client, report).await;
        }
        tracing::info!(version = %staged.version, "handing over to the new agent");
        if !self.switch.request_handover() {
            return false;
        }
        self.shutdown.cancel();
        true
    }

    /// Records and reports a refusal or a failure before any switch.
    async fn fail(
        &self,
        client: &ClusterClient,
        node: &ObjectMeta,
        record: &mut SwitchRecord,
        image: &str,
        version: Option<String>,
        reason: String,
    ) {
        tracing::warn!(image, reason = %reason, "upgrade refused");
        let report = UpgradeReport {
            image: image.to_owned(),
            phase: Phase::Failed,
            version,
            reason,
            at: jiff::Timestamp::now().to_string(),
        };
        record.refused = Some(image.to_owned());
        record.report = Some(report.clone());
        record.report_pending = true;
        self.save(record.clone()).await;
        if self.publish(client, node, &report, &[EventReason::UpgradeFailed]).await {
            record.report_pending = false;
            self.save(record.clone()).await;
        } else {
            // Retried by the watch loop until it goes out (the record keeps it for a restart).
            self.switch.outcome_pending();
        }
    }

    async fn save(&self, record: SwitchRecord) {
        let slots = self.switch.slots().clone();
        match tokio::task::spawn_blocking(move || slots.save(&record)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "cannot write the upgrade record"),
            Err(e) => tracing::error!(error = %e, "upgrade record task failed"),
        }
    }

    /// The version annotation, and a pending outcome with its events.
    async fn report_start(&self, client: &ClusterClient) -> Result<ObjectMeta, kube::Error> {
        let api: Api<Node> = Api::all(client.current());
        // Its metadata only: the whole Node (status, images, addresses) is several KB more.
        let node = api.get_metadata(&self.node).await?.metadata;
        let digest = own_digest(&self.switch).await;
        let version = BTreeMap::from([(
            VERSION_ANNOTATION.to_owned(),
            super::version_annotation(&crate::version::version(), &digest),
        )]);
        self.report_pending(client, &node, version).await?;
        Ok(node)
    }

    /// Writes `annotations` and the record's pending outcome (if any) to the Node, records the
    /// outcome's Events, and marks it reported.
    async fn report_pending(
        &self,
        client: &ClusterClient,
        node: &ObjectMeta,
        mut annotations: BTreeMap<String, String>,
    ) -> Result<(), kube::Error> {
        let slots = self.switch.slots().clone();
        let record = tokio::task::spawn_blocking(move || slots.load()).await.ok().and_then(Result::ok);
        let pending = record.as_ref().filter(|r| r.report_pending).and_then(|r| r.report.clone());
        if let Some(report) = &pending {
            annotations
                .insert(UPGRADE_ANNOTATION.to_owned(), serde_json::to_string(report).unwrap_or_default());
        }
        if !annotations.is_empty() {
            patch_annotations(client, &self.node, annotations).await?;
        }
        if let Some(report) = pending {
            let reasons: &[EventReason] = match report.phase {
                Phase::Succeeded => &[EventReason::UpgradeSucceeded],
                Phase::RolledBack => &[EventReason::UpgradeFailed, EventReason::UpgradeRolledBack],
                Phase::Failed => &[EventReason::UpgradeFailed],
                Phase::Started => &[],
            };
            for reason in reasons {
                record_event(client, node, *reason, &event_message(*reason, &report)).await?;
            }
            // Read again: only this outcome is marked reported, not one decided meanwhile.
            let slots = self.switch.slots().clone();
            if let Ok(Ok(mut r)) = tokio::task::spawn_blocking(move || slots.load()).await
                && r.report.as_ref() == Some(&report)
            {
                r.report_pending = false;
                self.save(r).await;
            }
        }
        Ok(())
    }

    /// Reports an outcome decided while running (the health gate's), retrying until it is written.
    async fn report_decided(&self, client: &ClusterClient, node: &ObjectMeta, cancel: &CancellationToken) {
        let mut backoff = RetryBackoff::new(Duration::from_secs(1), Duration::from_secs(60));
        while let Err(e) = self.report_pending(client, node, BTreeMap::new()).await {
            let delay = backoff.next_delay();
            tracing::warn!(error = %crate::api_error::brief(&e), retry_in_ms = delay.as_millis() as u64, "cannot report the upgrade's outcome on the Node; retrying");
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Writes `report` to the Node's annotation and records `reasons` as Events; whether all went
    /// through.
    async fn publish(
        &self,
        client: &ClusterClient,
        node: &ObjectMeta,
        report: &UpgradeReport,
        reasons: &[EventReason],
    ) -> bool {
        let mut ok = self.annotate(client, report).await;
        for reason in reasons {
            if let Err(e) = record_event(client, node, *reason, &event_message(*reason, report)).await {
                tracing::warn!(error = %crate::api_error::brief(&e), "cannot record the upgrade event");
                ok = false;
            }
        }
        ok
    }

    /// Writes `report` to the Node's [`UPGRADE_ANNOTATION`]; whether it went through.
    async fn annotate(&self, client: &ClusterClient, report: &UpgradeReport) -> bool {
        let annotations = BTreeMap::from([(
            UPGRADE_ANNOTATION.to_owned(),
            serde_json::to_string(report).unwrap_or_default(),
        )]);
        match patch_annotations(client, &self.node, annotations).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %crate::api_error::brief(&e), "cannot write the upgrade's outcome on the Node");
                false
            }
        }
    }
}

fn event_message(reason: EventReason, report: &UpgradeReport) -> String {
    let version = report.version.as_deref().unwrap_or("the new agent");
    match reason {
        EventReason::UpgradeStarted => format!("upgrading to {}: {}", report.image, report.reason),
        EventReason::UpgradeSucceeded => {
            format!("{version} is committed ({}): {}", report.image, report.reason)
        }
        EventReason::UpgradeFailed => format!("{}: {}", report.image, report.reason),
        EventReason::UpgradeRolledBack => format!("{version} rolled back: {}", report.reason),
    }
}

/// The sha256 (hex) of this process's own binary: a staged version knows it (its slot), the
/// packaged one reads and hashes itself once.
async fn own_digest(switch: &AgentSwitch) -> String {
    if let Some(digest) = switch.slot() {
        return digest.to_owned();
    }
    tokio::task::spawn_blocking(|| {
        use sha2::{Digest, Sha256};
        let path = std::env::current_exe().ok()?;
        let mut file = std::fs::File::open(path).ok()?;
        let mut hasher = Sha256::new();
        std::io::copy(&mut file, &mut hasher).ok()?;
        Some(crate::store::ModuleDigest(hasher.finalize().into()).hex())
    })
    .await
    .ok()
    .flatten()
    .unwrap_or_default()
}

/// Merges `annotations` into the Node's; the Node the server answers with is not read
/// ([`crate::cluster::lean`]).
async fn patch_annotations(
    client: &ClusterClient,
    node: &str,
    annotations: BTreeMap<String, String>,
) -> Result<(), kube::Error> {
    let patch = serde_json::json!({ "metadata": { "annotations": annotations } });
    crate::cluster::lean::merge_patch(&client.current(), &format!("/api/v1/nodes/{node}"), &patch).await
}

/// Records an Event on the Node, as the kubelet records node events (namespace `default`).
async fn record_event(
    client: &ClusterClient,
    node: &ObjectMeta,
    reason: EventReason,
    message: &str,
) -> Result<(), kube::Error> {
    let name = node.name.clone().unwrap_or_default();
    let now = jiff::Timestamp::now();
    let event = Event {
        metadata: ObjectMeta {
            name: Some(format!("{name}.{:x}", now.as_nanosecond())),
            namespace: Some("default".into()),
            ..ObjectMeta::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(name.clone()),
            uid: node.uid.clone(),
            ..ObjectReference::default()
        },
        reason: Some(reason.as_str().into()),
        message: Some(message.to_owned()),
        type_: Some(if reason.is_warning() { "Warning" } else { "Normal" }.into()),
        source: Some(EventSource { component: Some("lichen".into()), host: Some(name) }),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        count: Some(1),
        ..Event::default()
    };
    Api::<Event>::namespaced(client.current(), "default")
        .create(&PostParams::default(), &event)
        .await
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PINNED: &str = "reg.example:5000/lichen/agent@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn only_a_pinned_image_on_a_node_with_keys_is_started_once() {
        let empty = SwitchRecord::default();
        assert_eq!(consider(None, &empty, true), Decision::Nothing);
        assert_eq!(consider(Some("  "), &empty, true), Decision::Nothing);
        assert_eq!(consider(Some(PINNED), &empty, true), Decision::Start);
        let Decision::Refuse(why) = consider(Some("reg.example/lichen/agent:0.2.0"), &empty, true) else {
            panic!("a tag is refused")
        };
        assert!(why.contains("not pinned by digest"), "{why}");
        let Decision::Refuse(why) = consider(Some(PINNED), &empty, false) else { panic!("off") };
        assert!(why.contains("upgrade.trusted_keys"), "{why}");
        let refused = SwitchRecord { refused: Some(PINNED.into()), ..Default::default() };
        assert_eq!(consider(Some(PINNED), &refused, true), Decision::Nothing, "not tried again");
        let running = SwitchRecord {
            committed: Some(Slot { image: PINNED.into(), digest: "aa".into(), version: "0.2.0".into() }),
            ..Default::default()
        };
        assert_eq!(consider(Some(PINNED), &running, true), Decision::Nothing, "already running");
        assert!(!pinned("reg/agent@sha256:ABC"));
        assert!(!pinned("@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"));
    }
}
