//! One task per pod: prepares volumes, loads modules, runs init containers in order and the other
//! containers side by side, restarts them by policy with the kubelet's back-off, and publishes every
//! state change to the store and to watchers.
//!
//! The worker acts; it does not decide phases (that is [`super::state`]) and it never talks to the API.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::PodStatus;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::events::{EventRecorder, EventType, PodEvent};
use super::spec::{ContainerPlan, PodPlan, VolumeFile, VolumeKind};
use super::state::{Backoff, ContainerState, ContainerView, RestartPolicy, Termination};
use super::status::{self, PodFailure, PodView};
use crate::board::StatusBoard;
use crate::config::ContainerLogConfig;
use crate::logfmt::{ContainerLog, Stream};
use crate::modules::{LoadFailure, ModuleCache, PullCredentials, PullError, Resolution};
use crate::runtime::{Outcome, PreparedModule, RunSpec, WasmRuntime};
use crate::store::{ModuleDigest, PodSource, StateStore};

/// What every worker shares.
pub struct WorkerDeps {
    /// The Wasm engine.
    pub runtime: Arc<WasmRuntime>,
    /// Where modules are pulled, cached and compiled.
    pub modules: Arc<ModuleCache>,
    /// The durable store.
    pub store: Arc<dyn StateStore>,
    /// `<state_dir>/logs`.
    pub logs_dir: PathBuf,
    /// Log rotation settings.
    pub log_config: ContainerLogConfig,
    /// The node's address, for `status.hostIP`.
    pub host_ip: Option<String>,
    /// The back-off between restarts (the kubelet's unless a test shortens it).
    pub backoff: Backoff,
    /// Where every status change is also posted, for reporting beyond the store.
    pub board: Arc<StatusBoard>,
    /// Where pod events go.
    pub events: EventRecorder,
    /// The MQTT bridge, when `mqtt.broker` is set.
    pub mqtt: Option<Arc<crate::telemetry::bridge::MqttBridge>>,
}

/// A running pod worker.
pub struct PodHandle {
    /// The pod's UID.
    pub uid: String,
    cancel: CancellationToken,
    done: watch::Receiver<bool>,
    status: watch::Receiver<PodStatus>,
}

impl PodHandle {
    /// Latest status.
    pub fn status(&self) -> PodStatus {
        self.status.borrow().clone()
    }

    /// A receiver that sees every status change.
    pub fn watch(&self) -> watch::Receiver<PodStatus> {
        self.status.clone()
    }

    /// Stops the pod's modules and waits up to `grace` for the worker to finish.
    /// Returns whether it finished in time.
    pub async fn stop(&self, grace: Duration) -> bool {
        self.cancel.cancel();
        let mut done = self.done.clone();
        tokio::time::timeout(grace, done.wait_for(|d| *d)).await.is_ok()
    }
}

/// A pod's log directory, `<logs>/<namespace>_<name>_<uid>`, as the kubelet lays out `/var/log/pods`.
pub fn pod_log_dir(logs_dir: &Path, key: &str, uid: &str) -> PathBuf {
    logs_dir.join(format!("{}_{uid}", key.replace('/', "_")))
}

/// What an earlier life of the agent left of a pod: restart counts and the last status recorded.
#[derive(Debug, Clone, Default)]
pub struct Resume {
    /// Restarts per container.
    pub restart_counts: BTreeMap<String, u32>,
    /// The last status recorded for this pod (same UID), if it ran before.
    pub previous: Option<PodStatus>,
}

/// How a container picks up after an agent restart.
#[derive(Debug, Clone, PartialEq)]
enum Resumed {
    /// It never ran: start it as new.
    Fresh,
    /// It ran and is due to run again: the next run is a restart, and this was how the last ended.
    Again(Termination),
    /// It ended for good: it is not run again.
    Done(Termination),
}

/// Reason shown in `lastState` for a run that the agent's own stop, crash or power loss ended.
pub const AGENT_RESTARTED: &str = "AgentRestarted";

impl Resume {
    /// How container `name` resumes: a run that was going when the agent stopped (or that the
    /// agent's shutdown killed) ran and runs again; one that ended for good under `policy` stays
    /// ended. An agent restart is not a new pod sandbox (volumes persist on disk), so completed init
    /// containers are not run again.
    fn container(&self, name: &str, init: bool, policy: RestartPolicy, now: Timestamp) -> Resumed {
        let Some(st) = &self.previous else { return Resumed::Fresh };
        let list = if init { &st.init_container_statuses } else { &st.container_statuses };
        let Some(c) = list.iter().flatten().find(|c| c.name == name) else { return Resumed::Fresh };
        let state = c.state.clone().unwrap_or_default();
        let ts = |t: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| t.as_ref().map(|t| t.0);
        if let Some(r) = state.running {
            return Resumed::Again(Termination {
                exit_code: 137,
                reason: AGENT_RESTARTED.into(),
                message: Some("the run ended when lichen stopped (restart, kill or power loss)".into()),
                started_at: ts(&r.started_at),
                finished_at: now,
            });
        }
        let terminated = |t: &k8s_openapi::api::core::v1::ContainerStateTerminated| Termination {
            exit_code: t.exit_code,
            reason: t.reason.clone().unwrap_or_default(),
            message: t.message.clone(),
            started_at: ts(&t.started_at),
            finished_at: ts(&t.finished_at).unwrap_or(now),
        };
        if let Some(t) = &state.terminated {
            let t = terminated(t);
            let killed_by_agent = t.reason == "Killed";
            let again = if init {
                t.exit_code != 0 && policy != RestartPolicy::Never
            } else {
                policy.restarts(t.exit_code)
            };
            return if again || (killed_by_agent && !(init && t.exit_code == 0)) {
                Resumed::Again(t)
            } else {
                Resumed::Done(t)
            };
        }
        match c.last_state.as_ref().and_then(|s| s.terminated.as_ref()) {
            // Waiting in back-off between runs.
            Some(t) => Resumed::Again(terminated(t)),
            None => Resumed::Fresh,
        }
    }
}

/// Starts a worker for `plan` on `tracker`, picking up what `resume` says an earlier agent left.
pub fn spawn(
    plan: PodPlan,
    source: &PodSource,
    resume: Resume,
    deps: Arc<WorkerDeps>,
    tracker: &TaskTracker,
    parent: &CancellationToken,
) -> PodHandle {
    let cancel = parent.child_token();
    let now = Timestamp::now();
    let count = |name: &str| resume.restart_counts.get(name).copied().unwrap_or(0);
    let init_reason = if plan.init_containers.is_empty() { "ContainerCreating" } else { "PodInitializing" };
    let init_policy = match plan.restart_policy {
        RestartPolicy::Never => RestartPolicy::Never,
        _ => RestartPolicy::OnFailure,
    };
    let view_of = |c: &ContainerPlan, init: bool, reason: &str| {
        let policy = if init { init_policy } else { plan.restart_policy };
        let mut v = ContainerView::new(&c.name, &c.image, reason, count(&c.name));
        let resumed = resume.container(&c.name, init, policy, now);
        match &resumed {
            Resumed::Fresh => {}
            Resumed::Again(t) => v.last_termination = Some(t.clone()),
            Resumed::Done(t) => v.state = ContainerState::Terminated(t.clone()),
        }
        (v, resumed)
    };
    let (init, init_resumed): (Vec<_>, Vec<_>) =
        plan.init_containers.iter().map(|c| view_of(c, true, "PodInitializing")).unzip();
    let (app, app_resumed): (Vec<_>, Vec<_>) =
        plan.containers.iter().map(|c| view_of(c, false, init_reason)).unzip();
    let start_time = resume.previous.as_ref().and_then(|s| s.start_time.as_ref()).map(|t| t.0).unwrap_or(now);
    let view = PodView {
        restart_policy: plan.restart_policy,
        init,
        app,
        failure: None,
        start_time: Some(start_time),
        host_ip: deps.host_ip.clone(),
    };
    let initial = status::build(&view, None, now);
    let (status_tx, status_rx) = watch::channel(initial);
    let (done_tx, done_rx) = watch::channel(false);
    let mqtt = match (&plan.mqtt, &deps.mqtt) {
        (Some(binding), Some(bridge)) => Some(bridge.pod(binding.clone(), &plan.namespace, &plan.name)),
        (Some(_), None) => {
            tracing::warn!(pod = %plan.key, "the pod's lichen.dev/mqtt-* annotations are ignored: MQTT is off (set mqtt.broker)");
            None
        }
        _ => None,
    };
    let shared = Arc::new(Shared {
        mqtt,
        view: Mutex::new(view),
        status_tx,
        plan_key: plan.key.clone(),
        uid: plan.uid.clone(),
        source: source.clone(),
        pull_credentials: plan.pull_credentials.clone(),
        resumed: init_resumed
            .into_iter()
            .map(|r| (true, r))
            .chain(app_resumed.into_iter().map(|r| (false, r)))
            .collect(),
        deps: deps.clone(),
        written: AtomicBool::new(false),
    });
    shared.publish();
    let uid = plan.uid.clone();
    let token = cancel.clone();
    let span = tracing::info_span!("pod", pod = %plan.key);
    tracker.spawn(tracing::Instrument::instrument(
        async move {
            run_pod(plan, shared, token).await;
            let _ = done_tx.send(true);
        },
        span,
    ));
    PodHandle { uid, cancel, done: done_rx, status: status_rx }
}

struct Shared {
    /// The pod's MQTT bridge (its rate limit lives here, shared by its containers).
    mqtt: Option<Arc<crate::telemetry::bridge::PodBridge>>,
    view: Mutex<PodView>,
    status_tx: watch::Sender<PodStatus>,
    plan_key: String,
    source: PodSource,
    uid: String,
    pull_credentials: PullCredentials,
    /// Per container, init containers first: how it resumes after an agent restart.
    resumed: Vec<(bool, Resumed)>,
    deps: Arc<WorkerDeps>,
    written: AtomicBool,
}

#[derive(Clone, Copy)]
enum Slot {
    Init(usize),
    App(usize),
}

impl Shared {
    fn update(&self, slot: Slot, f: impl FnOnce(&mut ContainerView)) {
        if let Ok(mut view) = self.view.lock() {
            let c = match slot {
                Slot::Init(i) => view.init.get_mut(i),
                Slot::App(i) => view.app.get_mut(i),
            };
            if let Some(c) = c {
                f(c);
            }
        }
        self.publish();
    }

    fn event(&self, slot: Option<(Slot, &str)>, kind: EventType, reason: &'static str, message: String) {
        let field_path = slot.map(|(s, name)| match s {
            Slot::Init(_) => format!("spec.initContainers{{{name}}}"),
            Slot::App(_) => format!("spec.containers{{{name}}}"),
        });
        let e = PodEvent {
            key: self.plan_key.clone(),
            uid: self.uid.clone(),
            field_path,
            kind,
            reason,
            message,
            at: Timestamp::now(),
        };
        self.deps.events.emit(&self.source, e);
    }

    fn fail(&self, reason: &str, message: String) {
        if let Ok(mut view) = self.view.lock() {
            view.failure = Some(PodFailure { reason: reason.to_owned(), message });
        }
        self.publish();
    }

    /// Renders the status and records it, once per change.
    fn publish(&self) {
        let Ok(view) = self.view.lock() else { return };
        let previous = self.status_tx.borrow().clone();
        let status = status::build(&view, Some(&previous), Timestamp::now());
        let counts: BTreeMap<String, u32> =
            view.init.iter().chain(&view.app).map(|c| (c.name.clone(), c.restart_count)).collect();
        drop(view);
        // One store write per visible change; the first call always records the pod's initial state.
        if status == previous && self.written.swap(true, Ordering::Relaxed) {
            return;
        }
        match serde_json::to_value(&status) {
            Ok(json) => {
                if let Err(e) = self.deps.store.put_pod_status(&self.plan_key, &self.uid, &json, &counts) {
                    tracing::error!(error = %e, "cannot record pod status");
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot encode pod status"),
        }
        self.deps.board.set(&self.plan_key, &self.uid, &self.source, status.clone());
        self.status_tx.send_replace(status);
    }
}

async fn run_pod(plan: PodPlan, shared: Arc<Shared>, cancel: CancellationToken) {
    tracing::info!(uid = %plan.uid, containers = plan.containers.len(), init_containers = plan.init_containers.len(), "starting pod");
    for w in &plan.warnings {
        tracing::warn!("{w}");
    }
    let deadline = plan.active_deadline.map(|d| tokio::time::Instant::now() + d);
    let body = run_containers(&plan, &shared, &cancel);
    tokio::pin!(body);
    tokio::select! {
        _ = &mut body => {}
        _ = sleep_until(deadline) => {
            // Stop the containers and let them record how they ended before failing the pod.
            cancel.cancel();
            body.await;
            let d = plan.active_deadline.unwrap_or_default().as_secs();
            let message = format!("Pod was active on the node longer than the specified deadline ({d}s)");
            shared.event(None, EventType::Warning, "DeadlineExceeded", message.clone());
            shared.fail("DeadlineExceeded", message);
        }
    }
    let phase = shared.status_tx.borrow().phase.clone().unwrap_or_default();
    tracing::info!(%phase, "pod worker finished");
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn run_containers(plan: &PodPlan, shared: &Arc<Shared>, cancel: &CancellationToken) {
    if let Err(e) = prepare_volumes(plan) {
        let message = e.to_string();
        tracing::error!(error = %message, "cannot prepare volumes");
        for i in 0..plan.containers.len() {
            shared.update(Slot::App(i), |c| {
                c.state = ContainerState::Waiting {
                    reason: "CreateContainerConfigError".into(),
                    message: Some(message.clone()),
                };
            });
        }
        shared.event(None, EventType::Warning, "FailedMount", message.clone());
        shared.fail("VolumeSetupFailed", message);
        return;
    }
    for (i, c) in plan.init_containers.iter().enumerate() {
        // Init containers run to success; Always behaves as OnFailure for them, as in the kubelet.
        let policy = match plan.restart_policy {
            RestartPolicy::Never => RestartPolicy::Never,
            _ => RestartPolicy::OnFailure,
        };
        let ok = run_container(c, Slot::Init(i), policy, shared, cancel).await;
        if !ok || cancel.is_cancelled() {
            return;
        }
    }
    let runs = plan
        .containers
        .iter()
        .enumerate()
        .map(|(i, c)| run_container(c, Slot::App(i), plan.restart_policy, shared, cancel));
    futures_join_all(runs).await;
}

/// Runs futures to completion side by side without spawning, so they share the pod's span and borrow.
async fn futures_join_all<F: std::future::Future<Output = bool>>(futs: impl Iterator<Item = F>) {
    let mut set: Vec<std::pin::Pin<Box<F>>> = futs.map(Box::pin).collect();
    std::future::poll_fn(|cx| {
        set.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if set.is_empty() { std::task::Poll::Ready(()) } else { std::task::Poll::Pending }
    })
    .await
}

/// A volume that could not be made ready; shown as the containers' `CreateContainerConfigError`
/// and a `FailedMount` event.
#[derive(Debug, thiserror::Error)]
enum VolumeError {
    #[error("volume {name:?}: cannot write {}: {source}", path.display())]
    Write {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("volume {name:?}: cannot create {}: {source}", path.display())]
    Create {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("volume {name:?}: hostPath {} is not an existing directory", path.display())]
    NotADirectory { name: String, path: PathBuf },
}

fn prepare_volumes(plan: &PodPlan) -> Result<(), VolumeError> {
    for v in &plan.volumes {
        let (name, path) = (v.name.clone(), v.host.clone());
        match &v.kind {
            VolumeKind::Files(files) => {
                write_files(&v.host, files).map_err(|source| VolumeError::Write { name, path, source })?
            }
            VolumeKind::EmptyDir | VolumeKind::HostPathOrCreate => std::fs::create_dir_all(&v.host)
                .map_err(|source| VolumeError::Create { name, path, source })?,
            VolumeKind::HostPath if !v.host.is_dir() => {
                return Err(VolumeError::NotADirectory { name, path });
            }
            VolumeKind::HostPath => {}
        }
    }
    Ok(())
}

/// Makes `dir` hold exactly `files`. Each file is replaced by a rename, so a module never reads a
/// half-written one; files that are no longer listed are removed. The directory is private to the
/// agent's user because it may hold secrets; modules reach it through their preopen.
pub fn write_files(dir: &Path, files: &[VolumeFile]) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let mut wanted = std::collections::HashSet::new();
    for f in files {
        let target = dir.join(&f.path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let unchanged = std::fs::read(&target).is_ok_and(|old| old == f.data);
        if !unchanged {
            let tmp = target.with_file_name(format!(
                ".{}.tmp",
                target.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
            ));
            std::fs::write(&tmp, &f.data)?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(f.mode & 0o777))?;
            std::fs::rename(&tmp, &target)?;
        }
        wanted.insert(target);
    }
    remove_unlisted(dir, &wanted)?;
    Ok(())
}

/// Removes files under `dir` that are not in `keep`, and directories left empty.
fn remove_unlisted(dir: &Path, keep: &std::collections::HashSet<PathBuf>) -> std::io::Result<bool> {
    let mut empty = true;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            if remove_unlisted(&path, keep)? {
                std::fs::remove_dir(&path)?;
            } else {
                empty = false;
            }
        } else if keep.contains(&path) {
            empty = false;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(empty)
}

/// Runs one container until it ends for good (returns whether it succeeded) or the pod is stopped.
async fn run_container(
    plan: &ContainerPlan,
    slot: Slot,
    policy: RestartPolicy,
    shared: &Arc<Shared>,
    cancel: &CancellationToken,
) -> bool {
    let restart_count = shared
        .view
        .lock()
        .ok()
        .and_then(|v| match slot {
            Slot::Init(i) => v.init.get(i).map(|c| c.restart_count),
            Slot::App(i) => v.app.get(i).map(|c| c.restart_count),
        })
        .unwrap_or(0);
    let index = match slot {
        Slot::Init(i) => Some(i),
        Slot::App(i) => shared.resumed.iter().position(|(init, _)| !init).map(|first| first + i),
    };
    let resumed = index.and_then(|i| shared.resumed.get(i)).map(|(_, r)| r.clone()).unwrap_or(Resumed::Fresh);
    if let Resumed::Done(t) = &resumed {
        tracing::info!(container = %plan.name, reason = %t.reason, "container ended before the agent restarted; not run again");
        return t.exit_code == 0;
    }
    let runner = ContainerRunner {
        ran_before: matches!(resumed, Resumed::Again(_)),
        plan,
        slot,
        policy,
        shared,
        cancel,
        backoff: shared.deps.backoff.clone(),
        restart_count,
        log_dir: pod_log_dir(&shared.deps.logs_dir, &shared.plan_key, &shared.uid).join(&plan.name),
    };
    runner.run().await
}

/// One container's restart loop and the state it carries between runs.
struct ContainerRunner<'a> {
    /// The container ran in an earlier life of the agent: its first run here is a restart.
    ran_before: bool,
    plan: &'a ContainerPlan,
    slot: Slot,
    policy: RestartPolicy,
    shared: &'a Arc<Shared>,
    cancel: &'a CancellationToken,
    backoff: Backoff,
    restart_count: u32,
    log_dir: PathBuf,
}

impl ContainerRunner<'_> {
    async fn run(mut self) -> bool {
        let deps = self.shared.deps.clone();
        // Whether the previous iteration ended a run; only then is the next run a restart. A pull
        // that failed or a log that could not be opened is not a run, as with the kubelet.
        let mut ran = self.ran_before;
        loop {
            if std::mem::take(&mut ran) {
                self.restart_count += 1;
            }
            let module = match self.load_module(&deps).await {
                Ok(m) => m,
                Err(LoadError::Pull(error)) => {
                    if self.pull_back_off(error).await {
                        return false;
                    }
                    continue;
                }
                Err(LoadError::Invalid(outcome, digest)) => {
                    let t = termination(&outcome, None, Timestamp::now());
                    let why = t.message.clone().unwrap_or_else(|| t.reason.clone());
                    self.event(EventType::Warning, "Failed", format!("Error: {why}"));
                    match self.finish(t, digest, Duration::ZERO).await {
                        Some(result) => return result,
                        None => {
                            ran = true;
                            continue;
                        }
                    }
                }
            };
            let digest = module.digest();
            let echo = deps.log_config.echo.then(|| format!("{}/{}", self.shared.plan_key, self.plan.name));
            let log = match ContainerLog::open(
                &self.log_dir,
                self.restart_count,
                deps.log_config.max_size.0,
                deps.log_config.max_files,
                echo,
            ) {
                Ok(log) => log,
                Err(e) => {
                    let message = format!("cannot open log {}: {e}", self.log_dir.display());
                    tracing::error!(container = %self.plan.name, %message);
                    self.set_waiting("CreateContainerError", message);
                    if sleep_or_cancel(self.backoff.next_delay(Duration::ZERO), self.cancel).await {
                        return false;
                    }
                    continue;
                }
            };
            // Init containers run to completion before anything else; MQTT is for the app's own.
            let wants_api = module.imports_mqtt();
            let mut mqtt = match (self.slot, &self.shared.mqtt) {
                (Slot::App(_), Some(pod)) => pod.attach(&self.plan.name, wants_api),
                _ => Default::default(),
            };
            if wants_api && mqtt.guest.is_none() {
                let why = if deps.mqtt.is_none() {
                    "MQTT is off on this node (set mqtt.broker)"
                } else if matches!(self.slot, Slot::Init(_)) {
                    "init containers get no MQTT"
                } else {
                    "the pod grants it no topics (annotate it with lichen.dev/mqtt-publish and/or lichen.dev/mqtt-subscribe)"
                };
                mqtt.guest = Some(crate::runtime::mqtt_api::GuestMqtt::denied(why));
            }
            let started_at = Timestamp::now();
            let restart_count = self.restart_count;
            self.shared.update(self.slot, |c| {
                c.state = ContainerState::Running { started_at };
                c.restart_count = restart_count;
                c.image_id = Some(digest.to_string());
            });
            tracing::info!(container = %self.plan.name, restart_count, module = %digest, "container started");
            self.event(EventType::Normal, "Created", format!("Created container {}", self.plan.name));
            self.event(EventType::Normal, "Started", format!("Started container {}", self.plan.name));
            let metrics = crate::metrics::global();
            let memory = metrics.memory_cell(&self.shared.plan_key, &self.plan.name);
            let spec = RunSpec {
                args: self.plan.argv.clone(),
                env: self.plan.env.clone(),
                preopens: self.plan.preopens.clone(),
                fuel: self.plan.fuel,
                memory_limit: self.plan.memory_limit,
                timeout: self.plan.timeout,
                stdout: log.sink_with_tap(Stream::Stdout, mqtt.stdout),
                stderr: log.sink(Stream::Stderr),
                stdin: mqtt.stdin,
                mqtt: mqtt.guest,
                memory_gauge: Some(memory.clone()),
            };
            metrics.container_started(restart_count > 0);
            let run_started = Instant::now();
            let report = deps.runtime.run(&module, spec, self.cancel).await;
            metrics.forget_memory(&self.shared.plan_key, &self.plan.name, &memory);
            metrics
                .container_ended(report.fuel_consumed, matches!(report.outcome, Outcome::OutOfFuel { .. }));
            let t = termination(&report.outcome, Some(started_at), Timestamp::now());
            tracing::info!(
                container = %self.plan.name,
                exit_code = t.exit_code,
                reason = %t.reason,
                message = t.message.as_deref().unwrap_or(""),
                fuel_consumed = report.fuel_consumed,
                peak_memory = report.peak_memory,
                "container ended"
            );
            if let Outcome::OutOfFuel { fuel } = report.outcome {
                let message = format!(
                    "Container {} used its fuel budget of {fuel} units; raise the lichen.dev/fuel annotation if it needs more",
                    self.plan.name
                );
                self.event(EventType::Warning, "OutOfFuel", message);
            }
            if report.outcome == Outcome::Killed {
                self.event(EventType::Normal, "Killing", format!("Stopping container {}", self.plan.name));
                self.shared.update(self.slot, |c| c.state = ContainerState::Terminated(t));
                return false;
            }
            match self.finish(t, Some(digest), run_started.elapsed()).await {
                Some(result) => return result,
                None => ran = true,
            }
        }
    }

    fn event(&self, kind: EventType, reason: &'static str, message: String) {
        self.shared.event(Some((self.slot, &self.plan.name)), kind, reason, message);
    }

    /// Resolves the image (pulling if the policy says so), reports how, and loads the module.
    async fn load_module(&mut self, deps: &WorkerDeps) -> Result<PreparedModule, LoadError> {
        let image = &self.plan.image;
        let resolution = deps
            .modules
            .resolve(&self.plan.source, self.plan.pull_policy, &self.shared.pull_credentials)
            .await
            .map_err(LoadError::Pull)?;
        match &resolution {
            Resolution::Present(d) | Resolution::File(d) => self.event(
                EventType::Normal,
                "Pulled",
                format!("Container image {image:?} already present on machine ({d})"),
            ),
            Resolution::Pulled { digest, took, size } => self.event(
                EventType::Normal,
                "Pulled",
                format!(
                    "Successfully pulled image {image:?} in {:.3}s. Image size: {size} bytes. Digest: {digest}",
                    took.as_secs_f64()
                ),
            ),
            Resolution::Stale { digest, error } => {
                tracing::warn!(container = %self.plan.name, %image, %error, "registry unreachable; running the cached module");
                self.event(
                    EventType::Warning,
                    "PullSkipped",
                    format!("Cannot check image {image:?} ({error}); running the cached copy {digest}"),
                );
            }
        }
        let digest = resolution.digest();
        match deps.modules.load(digest).await {
            Ok(m) => Ok(m),
            Err(LoadFailure::Invalid(outcome)) => Err(LoadError::Invalid(outcome, Some(digest))),
            Err(LoadFailure::Unavailable(e)) => Err(LoadError::Pull(PullError::Store(e))),
        }
    }

    /// Shows `ErrImagePull` (or `ErrImageNeverPull`), then `ImagePullBackOff` until the next try, as
    /// the kubelet does. Returns true if cancelled.
    async fn pull_back_off(&mut self, error: PullError) -> bool {
        let image = self.plan.image.clone();
        tracing::warn!(container = %self.plan.name, %image, %error, "cannot pull module");
        let reason = error.reason();
        let message = match &error {
            PullError::NeverPull => {
                format!("Container image {image:?} is not present with pull policy of Never")
            }
            e => format!("Failed to pull image {image:?}: {e}"),
        };
        self.event(
            EventType::Warning,
            if reason == "ErrImagePull" { "Failed" } else { reason },
            message.clone(),
        );
        self.set_waiting(reason, message);
        let delay = self.backoff.next_delay(Duration::ZERO);
        // The failure itself stays visible for a moment (a status write, a `kubectl get`), then the
        // container waits in back-off.
        let shown = delay.min(ERR_IMAGE_PULL_SHOWN);
        if sleep_or_cancel(shown, self.cancel).await {
            return true;
        }
        self.event(EventType::Normal, "BackOff", format!("Back-off pulling image {image:?}"));
        self.set_waiting(
            "ImagePullBackOff",
            format!("Back-off pulling image {image:?}: {error}; retrying in {}s", (delay - shown).as_secs()),
        );
        sleep_or_cancel(delay - shown, self.cancel).await
    }

    fn set_waiting(&self, reason: &str, message: String) {
        self.shared.update(self.slot, |c| {
            c.state = ContainerState::Waiting { reason: reason.to_owned(), message: Some(message) };
        });
    }

    /// Records a run's end; returns `None` to run again (after back-off) or the final success.
    async fn finish(
        &mut self,
        t: Termination,
        digest: Option<ModuleDigest>,
        ran_for: Duration,
    ) -> Option<bool> {
        let succeeded = t.exit_code == 0;
        let again = match self.slot {
            Slot::Init(_) => !succeeded && self.policy != RestartPolicy::Never,
            Slot::App(_) => self.policy.restarts(t.exit_code),
        };
        let restart_count = self.restart_count;
        if !again {
            self.shared.update(self.slot, |c| {
                c.state = ContainerState::Terminated(t);
                c.restart_count = restart_count;
                if let Some(d) = digest {
                    c.image_id = Some(d.to_string());
                }
            });
            return Some(succeeded);
        }
        let delay = self.backoff.next_delay(ran_for);
        let message = format!(
            "back-off {}s restarting failed container={} pod={}",
            delay.as_secs(),
            self.plan.name,
            self.shared.plan_key
        );
        tracing::info!(container = %self.plan.name, delay_secs = delay.as_secs(), "back-off before restart");
        let event = format!(
            "Back-off restarting failed container {} in pod {}",
            self.plan.name, self.shared.plan_key
        );
        self.event(EventType::Warning, "BackOff", event);
        self.shared.update(self.slot, |c| {
            c.state = ContainerState::Waiting { reason: "CrashLoopBackOff".into(), message: Some(message) };
            c.last_termination = Some(t);
            c.restart_count = restart_count;
        });
        if sleep_or_cancel(delay, self.cancel).await {
            return Some(false);
        }
        None
    }
}

/// Sleeps; returns true if cancelled first.
async fn sleep_or_cancel(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = cancel.cancelled() => true,
    }
}

fn termination(outcome: &Outcome, started_at: Option<Timestamp>, finished_at: Timestamp) -> Termination {
    Termination {
        exit_code: outcome.exit_code(),
        reason: outcome.reason().to_owned(),
        message: outcome.message(),
        started_at,
        finished_at,
    }
}

enum LoadError {
    /// The module could not be fetched; retried with back-off like an image pull.
    Pull(PullError),
    /// The bytes cannot run; handled like a failed run.
    Invalid(Outcome, Option<ModuleDigest>),
}

/// How long `ErrImagePull` shows before `ImagePullBackOff`.
const ERR_IMAGE_PULL_SHOWN: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ContainerStatus;

    fn previous(states: serde_json::Value) -> Resume {
        let statuses: Vec<ContainerStatus> = serde_json::from_value(states).expect("statuses");
        Resume {
            restart_counts: BTreeMap::new(),
            previous: Some(PodStatus { container_statuses: Some(statuses), ..Default::default() }),
        }
    }

    #[test]
    fn an_agent_restart_resumes_each_container_honestly() {
        let now = Timestamp::now();
        let r = previous(serde_json::json!([
            {"name": "running", "image": "x", "imageID": "", "ready": true, "restartCount": 2,
             "state": {"running": {"startedAt": "2026-11-25T01:00:00Z"}}},
            {"name": "done", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
             "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}},
            {"name": "killed", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
             "state": {"terminated": {"exitCode": 137, "reason": "Killed"}}},
            {"name": "looping", "image": "x", "imageID": "", "ready": false, "restartCount": 3,
             "state": {"waiting": {"reason": "CrashLoopBackOff"}},
             "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}}},
            {"name": "pulling", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
             "state": {"waiting": {"reason": "ImagePullBackOff"}}}
        ]));
        let never = RestartPolicy::Never;
        match r.container("running", false, never, now) {
            Resumed::Again(t) => {
                assert_eq!(t.reason, AGENT_RESTARTED);
                assert_eq!(t.started_at.map(|t| t.as_second()), Some(1_795_568_400), "the run's own start");
            }
            other => panic!("a running container runs again: {other:?}"),
        }
        assert!(
            matches!(r.container("done", false, never, now), Resumed::Done(t) if t.reason == "Completed")
        );
        assert!(matches!(r.container("done", false, RestartPolicy::Always, now), Resumed::Again(_)));
        assert!(
            matches!(r.container("killed", false, never, now), Resumed::Again(_)),
            "the agent's own stop"
        );
        assert!(
            matches!(r.container("looping", false, RestartPolicy::Always, now), Resumed::Again(t) if t.reason == "Error")
        );
        assert_eq!(r.container("pulling", false, never, now), Resumed::Fresh);
        assert_eq!(r.container("absent", false, never, now), Resumed::Fresh);
        assert_eq!(Resume::default().container("running", false, never, now), Resumed::Fresh);
    }
}
