//! Keeps the running pods equal to the desired ones: admits new pods (validation, `max_pods`),
//! records them in the store before they start, stops pods that went away or changed UID, and cleans
//! up their directories.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::spec::{self, PlanContext};
use super::state::RestartPolicy;
use super::status::{self, PodFailure, PodView};
use super::worker::{self, PodHandle, WorkerDeps};
use crate::config::RuntimeConfig;
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
}

enum Entry {
    Running(PodHandle),
    /// Refused at admission; kept so the refusal is not repeated on every sync.
    Rejected {
        uid: String,
    },
}

impl Entry {
    fn uid(&self) -> &str {
        match self {
            Entry::Running(h) => &h.uid,
            Entry::Rejected { uid, .. } => uid,
        }
    }
}

/// Settings the manager needs besides the workers' shared parts.
pub struct ManagerConfig {
    /// This node's name.
    pub node_name: String,
    /// `<state_dir>/pods`: per-pod directories (emptyDir volumes).
    pub pods_dir: PathBuf,
    /// Admission limit.
    pub max_pods: u32,
    /// Default limits.
    pub runtime: RuntimeConfig,
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
            if !self.pods.contains_key(&key) {
                self.admit(key, d).await;
            }
        }
        let keep = self.running_modules();
        self.deps.runtime.retain_compiled(&keep);
    }

    fn running_modules(&self) -> std::collections::HashSet<crate::store::ModuleDigest> {
        self.pods
            .values()
            .filter_map(|e| match e {
                Entry::Running(h) => Some(h.status()),
                Entry::Rejected { .. } => None,
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

    async fn admit(&mut self, key: String, d: &DesiredPod) {
        let uid = d.uid().to_owned();
        let pod_dir = self.config.pods_dir.join(&uid);
        let ctx = PlanContext {
            node_name: &self.config.node_name,
            host_ip: self.deps.host_ip.as_deref(),
            pod_dir,
            image_base: d.image_base.as_deref(),
            runtime: &self.config.runtime,
        };
        let running = self.pods.values().filter(|e| matches!(e, Entry::Running(_))).count();
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
        let plan = match refusal {
            Some(f) => Err(f),
            None => spec::plan(&d.pod, &ctx).map_err(|errs| PodFailure {
                reason: "UnsupportedPodSpec".into(),
                message: errs.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
            }),
        };
        let previous = self.deps.store.get_pod(&key).ok().flatten().filter(|r| r.uid == uid);
        let restart_counts = previous.as_ref().map(|r| r.restart_counts.clone()).unwrap_or_default();
        let pod_json = serde_json::to_value(&d.pod).unwrap_or_default();
        let mut record = PodRecord {
            key: key.clone(),
            uid: uid.clone(),
            source: d.source.clone(),
            pod: pod_json,
            status: previous.and_then(|r| r.status),
            restart_counts: restart_counts.clone(),
        };
        match plan {
            Ok(plan) => {
                // Recorded durably before it starts, so a crash never forgets a pod it ran.
                if let Err(e) = self.put_record(&record).await {
                    tracing::error!(pod = %key, error = %e, "cannot record pod; not starting it");
                    return;
                }
                let handle = worker::spawn(
                    plan,
                    &d.source,
                    restart_counts,
                    self.deps.clone(),
                    &self.tracker,
                    &self.cancel,
                );
                self.pods.insert(key, Entry::Running(handle));
            }
            Err(failure) => {
                tracing::error!(pod = %key, source = %d.source, reason = %failure.reason, "pod refused: {}", failure.message);
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
        if let Entry::Running(handle) = &entry {
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
        for dir in [self.config.pods_dir.join(uid), logs] {
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
        matches!(self.pods.get(key), Some(Entry::Running(h)) if h.uid == uid)
    }

    /// Stops every pod (their records stay, so they resume after a restart).
    pub async fn shutdown(&mut self) {
        for (key, entry) in self.pods.drain() {
            if let Entry::Running(h) = entry
                && !h.stop(self.config.stop_grace).await
            {
                tracing::warn!(pod = %key, "pod did not stop in time");
            }
        }
    }
}
