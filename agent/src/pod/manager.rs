//! Keeps the running pods equal to the desired ones: admits new pods (validation, `max_pods`),
//! records them in the store before they start, stops pods that went away or changed UID, and cleans
//! up their directories.
//!
//! It must never make its caller wait: the agent's main loop calls it between feeding the systemd
//! watchdog, so planning, store and file work and the stopping of pods run as tasks on the shutdown
//! tracker, and their results come back through [`PodManager::collect`].

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::events::{EventType, PodEvent};
use super::inputs::PodInputs;
use super::spec::{self, PlanContext};
use super::state::RestartPolicy;
use super::status::{self, PodFailure, PodFailureReason, PodView};
use super::worker::{self, PodHandle, WorkerDeps};
use crate::config::{ModulesConfig, RuntimeConfig};
use crate::modules::ImageOrigin;
use crate::store::{PodRecord, PodSource, SourceKind};

mod admission;

/// A pod some source wants running.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredPod {
    /// The pod, with name, namespace and UID set.
    pub pod: Pod,
    /// Where it came from.
    pub source: PodSource,
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
        /// Whether its volumes are being rewritten off the loop.
        refreshing: bool,
    },
    /// Refused at admission; kept so the refusal is not repeated on every sync.
    Rejected { uid: String },
    /// Waiting for a ConfigMap, Secret or token; admitted again when its inputs change.
    Waiting { uid: String, inputs: Option<PodInputs> },
    /// Finished before this agent started; kept so its files are removed when it is deleted.
    Finished { uid: String },
    /// Being planned and recorded off the loop; its worker starts when the admission reports.
    Admitting { uid: String },
}

impl Entry {
    fn uid(&self) -> &str {
        match self {
            Entry::Running { handle, .. } => &handle.uid,
            Entry::Rejected { uid }
            | Entry::Waiting { uid, .. }
            | Entry::Finished { uid }
            | Entry::Admitting { uid } => uid,
        }
    }

    /// Whether work for it is under way off the loop: a sync leaves it alone until that reports,
    /// then compares it with the desired pods again.
    fn busy(&self) -> bool {
        matches!(self, Entry::Admitting { .. } | Entry::Running { refreshing: true, .. })
    }
}

/// File and store work handed off the loop. Admissions, refreshes and forgetting run in one lane, a
/// batch at a time and in order, as a sync used to run them inline: `max_pods` counts every pod
/// admitted before, and a pod's record is never written by two batches at once.
enum Job {
    Admit { key: String, desired: DesiredPod },
    Refresh { key: String, desired: DesiredPod },
    Forget { desired: Vec<DesiredPod>, kind: SourceKind, present: Vec<(String, String)> },
}

/// What an admission or refresh decided, applied on the loop.
enum Outcome {
    /// Planned and recorded: its worker starts.
    Start(Box<Admitted>),
    Waiting {
        key: String,
        uid: String,
        inputs: Option<PodInputs>,
    },
    Rejected {
        key: String,
        uid: String,
    },
    /// Its volumes were rewritten from these inputs (or kept, if they could not be).
    Refreshed {
        key: String,
        inputs: Option<PodInputs>,
    },
}

/// A pod planned and recorded, ready for its worker.
struct Admitted {
    key: String,
    plan: spec::PodPlan,
    source: PodSource,
    resume: worker::Resume,
    inputs: Option<PodInputs>,
}

/// A piece of off-loop work that finished.
enum Done {
    Batch(Vec<Outcome>),
    /// A removed pod's worker stopped (or was given up on after the grace), and its record and
    /// files are gone.
    Removed,
}

/// What a task in flight is about, so that its keys are freed even if it panicked.
enum Work {
    Batch(Vec<String>),
    Removal(String),
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

/// What the off-loop work needs: the settings and the workers' shared parts.
struct Shared {
    config: ManagerConfig,
    deps: Arc<WorkerDeps>,
}

/// Owns every pod worker.
///
/// Its methods never wait: [`PodManager::sync`] decides, and the file and store work (planning
/// with its `canonicalize`, sled reads and writes, directory removal) and the stopping of pods run
/// as tasks on the tracker, which report through [`PodManager::collect`]. The agent's main loop
/// polls `collect` in its `select!`, so a pod slow to stop never holds the loop (and the watchdog
/// it feeds).
pub struct PodManager {
    shared: Arc<Shared>,
    pods: HashMap<String, Entry>,
    /// Removed pods whose worker is stopping or whose files are being removed: key to UID. A pod
    /// of the same key is admitted only once this one is gone, as when removal ran inline.
    removing: HashMap<String, String>,
    work: JoinSet<Done>,
    in_flight: HashMap<tokio::task::Id, Work>,
    /// Whether a batch of the lane is running.
    lane_busy: bool,
    /// A [`PodManager::forget_absent`] waiting for the lane.
    forget: Option<(Vec<DesiredPod>, SourceKind)>,
    /// Whether a pod was admitted or removed since the allocator last gave freed memory back.
    freed: bool,
    /// Whether a burst of admissions or removals ended since [`PodManager::take_burst_ended`].
    burst_ended: bool,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl PodManager {
    /// A manager with no pods. Workers and the manager's own tasks run on `tracker`; workers stop
    /// when `cancel` fires.
    pub fn new(
        config: ManagerConfig,
        deps: Arc<WorkerDeps>,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) -> Self {
        PodManager {
            shared: Arc::new(Shared { config, deps }),
            pods: HashMap::new(),
            removing: HashMap::new(),
            work: JoinSet::new(),
            in_flight: HashMap::new(),
            lane_busy: false,
            forget: None,
            freed: false,
            burst_ended: false,
            tracker,
            cancel,
        }
    }

    /// Moves the running set towards `desired`: starts removing pods that went away or changed
    /// UID, and hands admissions and volume refreshes to the lane. Pods with work under way are
    /// left for a later sync (the loop syncs again whenever work reports).
    pub fn sync(&mut self, desired: &[DesiredPod]) {
        let wanted: BTreeMap<String, &DesiredPod> = desired.iter().map(|d| (d.key(), d)).collect();
        let stale: Vec<String> = self
            .pods
            .iter()
            .filter(|(key, e)| !e.busy() && wanted.get(*key).is_none_or(|d| d.uid() != e.uid()))
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            if let Some(entry) = self.pods.remove(&key) {
                self.remove(key, entry);
            }
        }
        let mut jobs = Vec::new();
        for (key, d) in wanted {
            if self.removing.contains_key(&key) {
                continue;
            }
            match self.pods.get(&key) {
                None if d.finished() => {
                    self.pods.insert(key, Entry::Finished { uid: d.uid().to_owned() });
                }
                None => jobs.push(Job::Admit { key, desired: d.clone() }),
                Some(Entry::Waiting { inputs, .. }) if *inputs != d.inputs => {
                    jobs.push(Job::Admit { key, desired: d.clone() })
                }
                Some(Entry::Running { inputs, refreshing: false, .. }) if *inputs != d.inputs => {
                    jobs.push(Job::Refresh { key, desired: d.clone() })
                }
                Some(_) => {}
            }
        }
        self.launch(jobs);
        let keep = self.running_modules();
        self.shared.deps.runtime.retain_compiled(&keep);
    }

    /// Starts a batch on the lane, unless one runs (its report brings another sync, which finds
    /// what is still to do).
    fn launch(&mut self, mut jobs: Vec<Job>) {
        if self.lane_busy || (jobs.is_empty() && self.forget.is_none()) {
            return;
        }
        let mut keys = Vec::with_capacity(jobs.len());
        for job in &jobs {
            match job {
                Job::Admit { key, desired } => {
                    self.pods.insert(key.clone(), Entry::Admitting { uid: desired.uid().to_owned() });
                    keys.push(key.clone());
                }
                Job::Refresh { key, .. } => {
                    if let Some(Entry::Running { refreshing, .. }) = self.pods.get_mut(key) {
                        *refreshing = true;
                    }
                    keys.push(key.clone());
                }
                Job::Forget { .. } => {}
            }
        }
        if let Some((desired, kind)) = self.forget.take() {
            // After this batch's admissions, as it ran after the first sync: every pod known now
            // (these admissions included) keeps its record.
            let present = self.pods.iter().map(|(k, e)| (k.clone(), e.uid().to_owned())).collect();
            jobs.push(Job::Forget { desired, kind, present });
        }
        let running = self.pods.values().filter(|e| matches!(e, Entry::Running { .. })).count();
        let shared = self.shared.clone();
        self.lane_busy = true;
        let task = self.work.spawn(self.tracker.track_future(async move {
            match tokio::task::spawn_blocking(move || shared.run(jobs, running)).await {
                Ok(outcomes) => Done::Batch(outcomes),
                Err(e) => {
                    tracing::error!(error = %e, "pod admission task failed; retrying on the next sync");
                    Done::Batch(Vec::new())
                }
            }
        }));
        self.in_flight.insert(task.id(), Work::Batch(keys));
    }

    /// Stops a pod's worker (if it has one) and removes its record and files, in a task of its
    /// own: the loop goes on while the pod takes its grace period.
    fn remove(&mut self, key: String, entry: Entry) {
        let uid = entry.uid().to_owned();
        let handle = match entry {
            Entry::Running { handle, .. } => {
                tracing::info!(pod = %key, "stopping pod");
                Some(handle)
            }
            Entry::Rejected { .. }
            | Entry::Waiting { .. }
            | Entry::Finished { .. }
            | Entry::Admitting { .. } => None,
        };
        self.removing.insert(key.clone(), uid.clone());
        let shared = self.shared.clone();
        let k = key.clone();
        let task = self.work.spawn(self.tracker.track_future(async move {
            if let Some(handle) = handle
                && !handle.stop(shared.config.stop_grace).await
            {
                tracing::warn!(pod = %k, "pod did not stop within {:?}", shared.config.stop_grace);
            }
            let (s, k2) = (shared.clone(), k.clone());
            if let Err(e) = tokio::task::spawn_blocking(move || s.cleanup(&k2, &uid)).await {
                tracing::error!(pod = %k, error = %e, "pod cleanup task failed");
            }
            tracing::info!(pod = %k, "pod removed");
            Done::Removed
        }));
        self.in_flight.insert(task.id(), Work::Removal(key));
    }

    /// Waits for the next piece of off-loop work to finish and applies what it decided (a worker
    /// started, a pod found waiting or refused, a removal finished). Pending while no work is under
    /// way. Cancel-safe: the main loop's `select!` may drop it.
    pub async fn collect(&mut self) {
        let Some(joined) = self.work.join_next_with_id().await else {
            return std::future::pending().await;
        };
        let id = match joined {
            Ok((id, done)) => {
                if let Done::Batch(outcomes) = done {
                    for outcome in outcomes {
                        self.apply(outcome);
                    }
                }
                id
            }
            Err(e) => {
                tracing::error!(error = %e, "pod manager task failed");
                e.id()
            }
        };
        match self.in_flight.remove(&id) {
            Some(Work::Batch(keys)) => {
                self.lane_busy = false;
                // Admitting frees much too: each module's artifact and load buffers.
                self.freed = true;
                // Whatever the batch left undecided (it failed) is tried again by the next sync.
                for key in keys {
                    match self.pods.get_mut(&key) {
                        Some(Entry::Admitting { .. }) => {
                            self.pods.remove(&key);
                        }
                        Some(Entry::Running { refreshing, .. }) => *refreshing = false,
                        _ => {}
                    }
                }
            }
            Some(Work::Removal(key)) => {
                self.removing.remove(&key);
                self.freed = true;
            }
            None => {}
        }
        // Removed pods' memory, and what admitting a burst used for a while, goes back to the
        // system once the last admission or removal of a burst is done:
        // the allocator keeps freed pages otherwise, and a node churning Jobs would look like it
        // leaked (100 pods created and deleted left 17 MiB more than idle, and each further 100
        // another 2.5 MiB). Off the loop: it takes milliseconds.
        if self.freed && self.work.is_empty() {
            self.freed = false;
            self.burst_ended = true;
            self.tracker.spawn_blocking(crate::heap::release_free_memory);
        }
    }

    fn apply(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Start(admitted) => {
                let Admitted { key, plan, source, resume, inputs } = *admitted;
                let handle = worker::spawn(
                    plan,
                    &source,
                    resume,
                    self.shared.deps.clone(),
                    &self.tracker,
                    &self.cancel,
                );
                self.pods.insert(key, Entry::Running { handle, inputs, refreshing: false });
            }
            Outcome::Waiting { key, uid, inputs } => {
                self.pods.insert(key, Entry::Waiting { uid, inputs });
            }
            Outcome::Rejected { key, uid } => {
                self.pods.insert(key, Entry::Rejected { uid });
            }
            Outcome::Refreshed { key, inputs: new } => {
                if let Some(Entry::Running { inputs, refreshing, .. }) = self.pods.get_mut(&key) {
                    *inputs = new;
                    *refreshing = false;
                }
            }
        }
    }

    fn running_modules(&self) -> std::collections::HashSet<crate::store::ModuleDigest> {
        self.pods
            .values()
            .filter_map(|e| match e {
                Entry::Running { handle, .. } => Some(handle.status()),
                Entry::Rejected { .. }
                | Entry::Waiting { .. }
                | Entry::Finished { .. }
                | Entry::Admitting { .. } => None,
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

    /// Forgets pods from `source_prefix` that the store remembers but `desired` no longer lists,
    /// e.g. static pods whose manifests were deleted while the agent was not running. Runs on the
    /// lane, after the admissions of the sync before it.
    pub fn forget_absent(&mut self, desired: &[DesiredPod], kind: SourceKind) {
        self.forget = Some((desired.to_vec(), kind));
        self.launch(Vec::new());
    }

    /// Whether a burst of pod work (admissions, removals) has ended since the last call: the code
    /// that ran for it is idle now (see `heap::CodePages`).
    pub fn take_burst_ended(&mut self) -> bool {
        std::mem::take(&mut self.burst_ended)
    }

    /// Whether the pod `key` with `uid` runs.
    pub fn is_running(&self, key: &str, uid: &str) -> bool {
        self.removing.get(key).is_some_and(|u| u == uid)
            || match self.pods.get(key) {
                Some(Entry::Running { handle, .. }) => handle.uid == uid,
                Some(Entry::Admitting { uid: u }) => u == uid,
                _ => false,
            }
    }

    /// (running, preparing): pods with a worker, and those of them still preparing their first
    /// run (every container waiting as `ContainerCreating` or `PodInitializing` while its module
    /// is pulled or compiled). A pod being admitted counts as both.
    pub fn started(&self) -> (usize, usize) {
        let mut running = 0;
        let mut preparing = 0;
        for e in self.pods.values() {
            match e {
                Entry::Running { handle, .. } => {
                    running += 1;
                    let s = handle.status();
                    let all = s
                        .init_container_statuses
                        .iter()
                        .flatten()
                        .chain(s.container_statuses.iter().flatten());
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
                Entry::Admitting { .. } => {
                    running += 1;
                    preparing += 1;
                }
                Entry::Rejected { .. } | Entry::Waiting { .. } | Entry::Finished { .. } => {}
            }
        }
        (running, preparing)
    }

    /// Stops every pod at once and waits for them, and for removals under way (which still remove
    /// their pod's files). Records of running pods stay, so they resume after a restart; a batch of
    /// admissions under way is not acted on (its pods' records stay too).
    pub async fn shutdown(&mut self) {
        let grace = self.shared.config.stop_grace;
        let running: Vec<(String, PodHandle)> = self
            .pods
            .drain()
            .filter_map(|(key, e)| match e {
                Entry::Running { handle, .. } => Some((key, handle)),
                _ => None,
            })
            .collect();
        let stops = futures::future::join_all(running.iter().map(|(key, handle)| async move {
            if !handle.stop(grace).await {
                tracing::warn!(pod = %key, "pod did not stop in time");
            }
        }));
        let work = &mut self.work;
        let rest = async {
            while let Some(r) = work.join_next().await {
                if let Err(e) = r {
                    tracing::error!(error = %e, "pod manager task failed");
                }
            }
        };
        tokio::join!(stops, rest);
        self.in_flight.clear();
        self.removing.clear();
        self.lane_busy = false;
    }
}

#[cfg(test)]
mod tests {
    use super::admission::is_child_of;
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
