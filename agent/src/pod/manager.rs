//! Keeps the running pods equal to the desired ones: admits new pods (validation, `max_pods`),
//! records them in the store before they start, stops pods that went away or changed UID, and cleans
//! up their directories.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::events::{EventType, PodEvent};
use super::inputs::PodInputs;
use super::spec::{self, PlanContext};
use super::state::RestartPolicy;
use super::status::{self, PodFailure, PodView};
use super::worker::{self, PodHandle, WorkerDeps};
use crate::config::{ModulesConfig, RuntimeConfig};
use crate::modules::ImageOrigin;
use crate::store::PodRecord;

/// A pod some source wants running.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredPod {
    /// The pod, with name, namespace and UID set.
    pub pod: Pod,
    /// Where it came from, e.g. `file:/etc/lichen/pods/a.yaml`.
    pub source: String,
    /// Directory relative image paths resolve against.
    pub image_base: Option<PathBuf>,
    /// What was fetched from the API server for it; `None` for pods without a cluster.
    pub inputs: Option<PodInputs>,
}

impl DesiredPod {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        let m = &self.pod.metadata;
        format!("{}/{}", m.namespace.as_deref().unwrap_or("default"), m.name.as_deref().unwrap_or(""))
    }

    fn uid(&self) -> &str {
        self.pod.metadata.uid.as_deref().unwrap_or("")
    }

    /// Whether the API server already shows the pod as finished: it is never run again (as on a
    /// kubelet), but its logs stay until the pod is deleted.
    fn finished(&self) -> bool {
        let phase = self.pod.status.as_ref().and_then(|s| s.phase.as_deref());
        matches!(phase, Some("Succeeded" | "Failed"))
    }
}

enum Entry {
    Running {
        handle: PodHandle,
        /// The inputs its volumes were written from.
        inputs: Option<PodInputs>,
    },
    /// Refused at admission; kept so the refusal is not repeated on every sync.
    Rejected { uid: String },
    /// Waiting for a ConfigMap, Secret or token; admitted again when its inputs change.
    Waiting { uid: String, inputs: Option<PodInputs> },
    /// Finished before this agent started; kept so its files are removed when it is deleted.
    Finished { uid: String },
}

impl Entry {
    fn uid(&self) -> &str {
        match self {
            Entry::Running { handle, .. } => &handle.uid,
            Entry::Rejected { uid } | Entry::Waiting { uid, .. } | Entry::Finished { uid } => uid,
        }
    }
}

/// Settings the manager needs besides the workers' shared parts.
pub struct ManagerConfig {
    /// This node's name.
    pub node_name: String,
    /// `<state_dir>/pods`: per-pod directories (emptyDir volumes).
    pub pods_dir: PathBuf,
    /// The agent's state directory, which no pod may mount.
    pub state_dir: PathBuf,
    /// Admission limit.
    pub max_pods: u32,
    /// Default limits.
    pub runtime: RuntimeConfig,
    /// Module settings (which images pods may name).
    pub modules: ModulesConfig,
    /// How long a stopping pod gets before its worker is abandoned.
    pub stop_grace: Duration,
}

/// Owns every pod worker.
pub struct PodManager {
    config: ManagerConfig,
    deps: Arc<WorkerDeps>,
    pods: HashMap<String, Entry>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl PodManager {
    /// A manager with no pods. Workers run on `tracker` and stop when `cancel` fires.
    pub fn new(
        config: ManagerConfig,
        deps: Arc<WorkerDeps>,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) -> Self {
        PodManager { config, deps, pods: HashMap::new(), tracker, cancel }
    }

    /// Makes the running set equal to `desired`.
    pub async fn sync(&mut self, desired: &[DesiredPod]) {
        let wanted: BTreeMap<String, &DesiredPod> = desired.iter().map(|d| (d.key(), d)).collect();
        let stale: Vec<String> = self
            .pods
            .iter()
            .filter(|(key, e)| wanted.get(*key).is_none_or(|d| d.uid() != e.uid()))
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            self.remove(&key).await;
        }
        for (key, d) in wanted {
            match self.pods.get(&key) {
                None if d.finished() => {
                    self.pods.insert(key, Entry::Finished { uid: d.uid().to_owned() });
                }
                None => self.admit(key, d).await,
                Some(Entry::Waiting { inputs, .. }) if *inputs != d.inputs => {
                    self.pods.remove(&key);
                    self.admit(key, d).await;
                }
                Some(Entry::Running { inputs, .. }) if *inputs != d.inputs => {
                    self.refresh_files(&key, d).await
                }
                Some(_) => {}
            }
        }
        let keep = self.running_modules();
        self.deps.runtime.retain_compiled(&keep);
    }

    fn running_modules(&self) -> std::collections::HashSet<crate::store::ModuleDigest> {
        self.pods
            .values()
            .filter_map(|e| match e {
                Entry::Running { handle, .. } => Some(handle.status()),
                Entry::Rejected { .. } | Entry::Waiting { .. } | Entry::Finished { .. } => None,
            })
            .flat_map(|s| {
                s.init_container_statuses
                    .into_iter()
                    .flatten()
                    .chain(s.container_statuses.into_iter().flatten())
            })
            .filter_map(|c| crate::store::ModuleDigest::parse(&c.image_id))
            .collect()
    }

    fn plan(&self, d: &DesiredPod) -> Result<spec::PodPlan, Vec<spec::SpecError>> {
        let ctx = PlanContext {
            node_name: &self.config.node_name,
            host_ip: self.deps.host_ip.as_deref(),
            pods_dir: &self.config.pods_dir,
            state_dir: &self.config.state_dir,
            origin: match d.image_base.as_deref() {
                Some(dir) => ImageOrigin::Static(dir),
                None => ImageOrigin::Cluster,
            },
            modules: &self.config.modules,
            runtime: &self.config.runtime,
            inputs: d.inputs.as_ref(),
        };
        spec::plan(&d.pod, &ctx)
    }

    /// Rewrites a running pod's configMap, secret and projected volumes from new inputs, as the
    /// kubelet does; environment variables keep the values the containers started with.
    async fn refresh_files(&mut self, key: &str, d: &DesiredPod) {
        match self.plan(d) {
            Ok(plan) => {
                for v in &plan.volumes {
                    if let spec::VolumeKind::Files(files) = &v.kind
                        && let Err(e) = worker::write_files(&v.host, files)
                    {
                        tracing::warn!(pod = %key, volume = %v.name, error = %e, "cannot update volume");
                    }
                }
                if let Ok(Some(mut record)) = self.deps.store.get_pod(key)
                    && record.uid == d.uid()
                {
                    record.inputs = d.inputs.clone();
                    if let Err(e) = self.put_record(&record).await {
                        tracing::warn!(pod = %key, error = %e, "cannot record updated inputs");
                    }
                }
            }
            // A source deleted or emptied under a running pod: keep what it has, as the kubelet does.
            Err(errs) => {
                let why = errs.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
                tracing::warn!(pod = %key, "volumes not updated: {why}");
            }
        }
        if let Some(Entry::Running { inputs, .. }) = self.pods.get_mut(key) {
            *inputs = d.inputs.clone();
        }
    }

    async fn admit(&mut self, key: String, d: &DesiredPod) {
        let uid = d.uid().to_owned();
        let running = self.pods.values().filter(|e| matches!(e, Entry::Running { .. })).count();
        let refusal = if running >= self.config.max_pods as usize {
            Some(PodFailure {
                reason: "OutOfpods".into(),
                message: format!(
                    "Node didn't have enough resource: pods, requested: 1, used: {running}, capacity: {}",
                    self.config.max_pods
                ),
            })
        } else {
            None
        };
        let mut waiting = false;
        let plan = match refusal {
            Some(f) => Err(f),
            None => self.plan(d).map_err(|errs| {
                // Only a pod whose every problem is a missing input can become runnable by itself.
                waiting = errs.iter().all(|e| e.pending);
                PodFailure {
                    reason: if waiting { "CreateContainerConfigError" } else { "UnsupportedPodSpec" }.into(),
                    message: errs.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
                }
            }),
        };
        let previous = self.deps.store.get_pod(&key).ok().flatten().filter(|r| r.uid == uid);
        let restart_counts = previous.as_ref().map(|r| r.restart_counts.clone()).unwrap_or_default();
        let previous_status = previous.and_then(|r| r.status);
        let pod_json = serde_json::to_value(&d.pod).unwrap_or_default();
        let mut record = PodRecord {
            key: key.clone(),
            uid: uid.clone(),
            source: d.source.clone(),
            pod: pod_json,
            status: previous_status.clone(),
            restart_counts: restart_counts.clone(),
            inputs: d.inputs.clone(),
        };
        match plan {
            Ok(plan) => {
                // Recorded durably before it starts, so a crash never forgets a pod it ran.
                if let Err(e) = self.put_record(&record).await {
                    tracing::error!(pod = %key, error = %e, "cannot record pod; not starting it");
                    return;
                }
                let resume = worker::Resume {
                    restart_counts,
                    previous: previous_status.and_then(|s| serde_json::from_value(s).ok()),
                };
                let handle =
                    worker::spawn(plan, &d.source, resume, self.deps.clone(), &self.tracker, &self.cancel);
                self.pods.insert(key, Entry::Running { handle, inputs: d.inputs.clone() });
            }
            Err(failure) if waiting => {
                tracing::warn!(pod = %key, "pod waits for its configuration: {}", failure.message);
                self.event(d, EventType::Warning, "Failed", format!("Error: {}", failure.message));
                let status = waiting_status(&d.pod, &failure, self.deps.host_ip.clone());
                record.status = serde_json::to_value(&status).ok();
                if let Err(e) = self.put_record(&record).await {
                    tracing::error!(pod = %key, error = %e, "cannot record waiting pod");
                }
                self.deps.board.set(&key, &uid, &d.source, status);
                self.pods.insert(key, Entry::Waiting { uid, inputs: d.inputs.clone() });
            }
            Err(failure) => {
                tracing::error!(pod = %key, source = %d.source, reason = %failure.reason, "pod refused: {}", failure.message);
                let reason = if failure.reason == "OutOfpods" { "OutOfpods" } else { "UnsupportedPodSpec" };
                self.event(d, EventType::Warning, reason, failure.message.clone());
                let view = PodView {
                    restart_policy: RestartPolicy::Never,
                    init: vec![],
                    app: vec![],
                    failure: Some(failure),
                    start_time: None,
                    host_ip: self.deps.host_ip.clone(),
                };
                let status = status::build(&view, None, Timestamp::now());
                record.status = serde_json::to_value(&status).ok();
                if let Err(e) = self.put_record(&record).await {
                    tracing::error!(pod = %key, error = %e, "cannot record refused pod");
                }
                self.deps.board.set(&key, &uid, &d.source, status);
                self.pods.insert(key, Entry::Rejected { uid });
            }
        }
    }

    fn event(&self, d: &DesiredPod, kind: EventType, reason: &'static str, message: String) {
        let e = PodEvent {
            key: d.key(),
            uid: d.uid().to_owned(),
            field_path: None,
            kind,
            reason,
            message,
            at: Timestamp::now(),
        };
        self.deps.events.emit(&d.source, e);
    }

    async fn put_record(&self, record: &PodRecord) -> Result<(), String> {
        let store = self.deps.store.clone();
        let record = record.clone();
        tokio::task::spawn_blocking(move || store.put_pod(&record))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    async fn remove(&mut self, key: &str) {
        let Some(entry) = self.pods.remove(key) else {
            return;
        };
        let uid = entry.uid().to_owned();
        if let Entry::Running { handle, .. } = &entry {
            tracing::info!(pod = %key, "stopping pod");
            if !handle.stop(self.config.stop_grace).await {
                tracing::warn!(pod = %key, "pod did not stop within {:?}", self.config.stop_grace);
            }
        }
        self.cleanup(key, &uid).await;
        tracing::info!(pod = %key, "pod removed");
    }

    /// Deletes a pod's record, volumes and logs.
    async fn cleanup(&self, key: &str, uid: &str) {
        self.deps.board.remove(key, uid);
        let store = self.deps.store.clone();
        let (k, u) = (key.to_owned(), uid.to_owned());
        match tokio::task::spawn_blocking(move || store.delete_pod(&k, &u)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(pod = %key, error = %e, "cannot remove pod record"),
            Err(e) => tracing::error!(pod = %key, error = %e, "pod record task failed"),
        }
        // The pod's volumes and logs go with it, or a board's disk fills with pods long gone.
        let logs = worker::pod_log_dir(&self.deps.logs_dir, key, uid);
        let dirs =
            [(self.config.pods_dir.as_path(), self.config.pods_dir.join(uid)), (&self.deps.logs_dir, logs)];
        for (base, dir) in dirs {
            if !is_child_of(&dir, base) {
                tracing::warn!(
                    pod = %key,
                    uid = ?uid,
                    dir = %dir.display(),
                    "not removing a pod directory that is not directly under {}",
                    base.display()
                );
                continue;
            }
            if let Err(e) = std::fs::remove_dir_all(&dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(pod = %key, dir = %dir.display(), error = %e, "cannot remove pod directory");
            }
        }
    }

    /// Forgets pods from `source_prefix` that the store remembers but `desired` no longer lists,
    /// e.g. static pods whose manifests were deleted while the agent was not running.
    pub async fn forget_absent(&self, desired: &[DesiredPod], source_prefix: &str) {
        let records = match self.deps.store.list_pods() {
            Ok(r) => r,
            Err(e) => return tracing::warn!(error = %e, "cannot list stored pods"),
        };
        for r in records {
            let wanted = desired.iter().any(|d| d.key() == r.key && d.uid() == r.uid);
            let running = self.pods.get(&r.key).is_some_and(|e| e.uid() == r.uid);
            if r.source.starts_with(source_prefix) && !wanted && !running {
                tracing::info!(pod = %r.key, "forgetting pod whose source is gone");
                self.cleanup(&r.key, &r.uid).await;
            }
        }
    }

    /// Whether a worker for this pod is still running.
    pub fn is_running(&self, key: &str, uid: &str) -> bool {
        matches!(self.pods.get(key), Some(Entry::Running { handle, .. }) if handle.uid == uid)
    }

    /// (running, preparing): pods with a worker, and those of them still preparing their first
    /// run (every container waiting as `ContainerCreating` or `PodInitializing` while its module
    /// is pulled or compiled).
    pub fn started(&self) -> (usize, usize) {
        let mut running = 0;
        let mut preparing = 0;
        for e in self.pods.values() {
            if let Entry::Running { handle, .. } = e {
                running += 1;
                let s = handle.status();
                let all =
                    s.init_container_statuses.iter().flatten().chain(s.container_statuses.iter().flatten());
                let first_run = all.clone().next().is_some()
                    && all.into_iter().all(|c| {
                        c.state
                            .as_ref()
                            .and_then(|st| st.waiting.as_ref())
                            .and_then(|w| w.reason.as_deref())
                            .is_some_and(|r| matches!(r, "ContainerCreating" | "PodInitializing"))
                    });
                if first_run {
                    preparing += 1;
                }
            }
        }
        (running, preparing)
    }

    /// Stops every pod (their records stay, so they resume after a restart).
    pub async fn shutdown(&mut self) {
        for (key, entry) in self.pods.drain() {
            if let Entry::Running { handle, .. } = entry
                && !handle.stop(self.config.stop_grace).await
            {
                tracing::warn!(pod = %key, "pod did not stop in time");
            }
        }
    }
}

/// Whether `dir` is one plain component below `base`, so that removing it stays inside `base`. UIDs
/// are checked when a pod is planned, but a pod refused for its UID, or a record an older Lichen
/// stored, can still carry `..`, `a/b` or an empty UID: `<pods>/..` is the state directory and
/// `<pods>/` every pod's, so the joined path is checked again right before `remove_dir_all`.
fn is_child_of(dir: &Path, base: &Path) -> bool {
    dir.parent() == Some(base) && matches!(dir.components().next_back(), Some(Component::Normal(_)))
}

/// A pod that waits for a ConfigMap, Secret or token: Pending, every container waiting with
/// `CreateContainerConfigError` and the reason, as `kubectl describe pod` shows it on a kubelet.
fn waiting_status(
    pod: &Pod,
    why: &PodFailure,
    host_ip: Option<String>,
) -> k8s_openapi::api::core::v1::PodStatus {
    let spec = pod.spec.clone().unwrap_or_default();
    let view_of = |c: &k8s_openapi::api::core::v1::Container| {
        let mut v =
            super::state::ContainerView::new(&c.name, c.image.as_deref().unwrap_or(""), &why.reason, 0);
        v.state = super::state::ContainerState::Waiting {
            reason: why.reason.clone(),
            message: Some(why.message.clone()),
        };
        v
    };
    let view = PodView {
        restart_policy: RestartPolicy::parse(spec.restart_policy.as_deref()).unwrap_or(RestartPolicy::Always),
        init: spec.init_containers.iter().flatten().map(view_of).collect(),
        app: spec.containers.iter().map(view_of).collect(),
        failure: None,
        start_time: Some(Timestamp::now()),
        host_ip,
    };
    status::build(&view, None, Timestamp::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleanup_never_leaves_the_pods_or_logs_directory_for_a_hostile_uid() {
        let pods = Path::new("/var/lib/lichen/pods");
        let logs = Path::new("/var/lib/lichen/logs");
        assert!(is_child_of(&pods.join("0b6c1c02-3f4e-4b8a-9a53-5b2f0d2c7e11"), pods));
        assert!(is_child_of(&worker::pod_log_dir(logs, "ns/p", "u1"), logs));
        // `..` as the log directory's last part stays inside: it is `ns_p_..`, one plain name.
        assert!(is_child_of(&worker::pod_log_dir(logs, "ns/p", ".."), logs));
        for uid in ["..", "", ".", "a/b", "../../etc", "/etc", "a/..", "x/../.."] {
            assert!(!is_child_of(&pods.join(uid), pods), "pods dir with uid {uid:?}");
        }
        for uid in ["a/b", "../../etc", "x/../..", "/.."] {
            assert!(!is_child_of(&worker::pod_log_dir(logs, "ns/p", uid), logs), "log dir with uid {uid:?}");
        }
    }
}
