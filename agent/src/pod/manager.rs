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

    /// Whether a worker for this pod is still running (or about to, or still being removed).
    /// Whether a burst of pod work (admissions, removals) has ended since the last call: the code
    /// that ran for it is idle now (see `heap::release_code_pages`).
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

impl Shared {
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

    /// Runs one batch of the lane (on a blocking thread). `running` is how many pods have a
    /// worker; each admission that starts one counts for the next.
    fn run(&self, jobs: Vec<Job>, mut running: usize) -> Vec<Outcome> {
        let mut outcomes = Vec::with_capacity(jobs.len());
        for job in jobs {
            match job {
                Job::Admit { key, desired } => {
                    if let Some(o) = self.admit(key, &desired, running) {
                        if matches!(o, Outcome::Start(_)) {
                            running += 1;
                        }
                        outcomes.push(o);
                    }
                }
                Job::Refresh { key, desired } => outcomes.push(self.refresh_files(key, &desired)),
                Job::Forget { desired, kind, present } => self.forget_absent(&desired, kind, &present),
            }
        }
        outcomes
    }

    /// Rewrites a running pod's configMap, secret and projected volumes from new inputs, as the
    /// kubelet does; environment variables keep the values the containers started with.
    fn refresh_files(&self, key: String, d: &DesiredPod) -> Outcome {
        match self.plan(d) {
            Ok(plan) => {
                for v in &plan.volumes {
                    if let spec::VolumeKind::Files(files) = &v.kind
                        && let Err(e) = worker::write_files(&v.host, files)
                    {
                        tracing::warn!(pod = %key, volume = %v.name, error = %e, "cannot update volume");
                    }
                }
                if let Ok(Some(mut record)) = self.deps.store.get_pod(&key)
                    && record.uid == d.uid()
                {
                    record.inputs = d.inputs.clone();
                    if let Err(e) = self.deps.store.put_pod(&record) {
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
        Outcome::Refreshed { key, inputs: d.inputs.clone() }
    }

    /// Admits one pod: plans it, records it, and says what the loop is to do with it. `None` when
    /// it could not be recorded: it is not started, and the next sync tries again.
    fn admit(&self, key: String, d: &DesiredPod, running: usize) -> Option<Outcome> {
        let uid = d.uid().to_owned();
        let refusal = if running >= self.config.max_pods as usize {
            Some(PodFailure {
                reason: PodFailureReason::OutOfPods,
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
                    reason: if waiting {
                        PodFailureReason::CreateContainerConfigError
                    } else {
                        PodFailureReason::UnsupportedPodSpec
                    },
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
                if let Err(e) = self.deps.store.put_pod(&record) {
                    tracing::error!(pod = %key, error = %e, "cannot record pod; not starting it");
                    return None;
                }
                let resume = worker::Resume {
                    restart_counts,
                    previous: previous_status.and_then(|s| serde_json::from_value(s).ok()),
                };
                Some(Outcome::Start(Box::new(Admitted {
                    key,
                    plan,
                    source: d.source.clone(),
                    resume,
                    inputs: d.inputs.clone(),
                })))
            }
            Err(failure) if waiting => {
                tracing::warn!(pod = %key, "pod waits for its configuration: {}", failure.message);
                self.event(d, EventType::Warning, "Failed", format!("Error: {}", failure.message));
                let status = waiting_status(&d.pod, &failure, self.deps.host_ip.clone());
                record.status = serde_json::to_value(&status).ok();
                if let Err(e) = self.deps.store.put_pod(&record) {
                    tracing::error!(pod = %key, error = %e, "cannot record waiting pod");
                }
                self.deps.board.set(&key, &uid, &d.source, status);
                Some(Outcome::Waiting { key, uid, inputs: d.inputs.clone() })
            }
            Err(failure) => {
                tracing::error!(pod = %key, source = %d.source, reason = %failure.reason, "pod refused: {}", failure.message);
                let reason = match failure.reason {
                    PodFailureReason::OutOfPods => "OutOfpods",
                    _ => "UnsupportedPodSpec",
                };
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
                if let Err(e) = self.deps.store.put_pod(&record) {
                    tracing::error!(pod = %key, error = %e, "cannot record refused pod");
                }
                self.deps.board.set(&key, &uid, &d.source, status);
                Some(Outcome::Rejected { key, uid })
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

    /// Deletes a pod's record, volumes and logs (on a blocking thread).
    fn cleanup(&self, key: &str, uid: &str) {
        self.deps.board.remove(key, uid);
        if let Err(e) = self.deps.store.delete_pod(key, uid) {
            tracing::error!(pod = %key, error = %e, "cannot remove pod record");
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

    /// The body of [`PodManager::forget_absent`]; `present` is every pod the manager knew of when
    /// the batch started.
    fn forget_absent(&self, desired: &[DesiredPod], kind: SourceKind, present: &[(String, String)]) {
        let records = match self.deps.store.list_pods() {
            Ok(r) => r,
            Err(e) => return tracing::warn!(error = %e, "cannot list stored pods"),
        };
        for r in records {
            let wanted = desired.iter().any(|d| d.key() == r.key && d.uid() == r.uid);
            let running = present.iter().any(|(k, u)| *k == r.key && *u == r.uid);
            if r.source.kind() == kind && !wanted && !running {
                tracing::info!(pod = %r.key, "forgetting pod whose source is gone");
                self.cleanup(&r.key, &r.uid);
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
    const WAITING: super::state::WaitingReason = super::state::WaitingReason::CreateContainerConfigError;
    let spec = pod.spec.clone().unwrap_or_default();
    let view_of = |c: &k8s_openapi::api::core::v1::Container| {
        let mut v = super::state::ContainerView::new(&c.name, c.image.as_deref().unwrap_or(""), WAITING, 0);
        v.state =
            super::state::ContainerState::Waiting { reason: WAITING, message: Some(why.message.clone()) };
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
