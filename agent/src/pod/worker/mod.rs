//! One task per pod: prepares volumes, loads modules, runs init containers in order and the other
//! containers side by side, restarts them by policy with the kubelet's back-off, and publishes every
//! state change to the store and to watchers.
//!
//! The worker acts; it does not decide phases (that is [`super::state`]) and it never talks to the API.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::PodStatus;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::events::{EventRecorder, EventType, PodEvent};
use super::spec::{ContainerPlan, PodPlan};
use super::state::{
    Backoff, ContainerState, ContainerView, RestartPolicy, Termination, TerminationReason, WaitingReason,
};
use super::status::{self, PodFailure, PodFailureReason, PodView};
use crate::board::StatusBoard;
use crate::config::ContainerLogConfig;
use crate::modules::{ModuleCache, PullCredentials};
use crate::runtime::WasmRuntime;
use crate::store::{PodSource, StateStore};

mod container;
mod volumes;

use container::run_container;
use volumes::prepare_volumes;
pub use volumes::write_files;

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
                reason: TerminationReason::AgentRestarted,
                message: Some("the run ended when lichen stopped (restart, kill or power loss)".into()),
                started_at: ts(&r.started_at),
                finished_at: now,
            });
        }
        let terminated = |t: &k8s_openapi::api::core::v1::ContainerStateTerminated| Termination {
            exit_code: t.exit_code,
            reason: TerminationReason::parse(t.reason.as_deref().unwrap_or_default()),
            message: t.message.clone(),
            started_at: ts(&t.started_at),
            finished_at: ts(&t.finished_at).unwrap_or(now),
        };
        if let Some(t) = &state.terminated {
            let t = terminated(t);
            let killed_by_agent = t.reason == TerminationReason::Killed;
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
    let init_reason = if plan.init_containers.is_empty() {
        WaitingReason::ContainerCreating
    } else {
        WaitingReason::PodInitializing
    };
    let init_policy = match plan.restart_policy {
        RestartPolicy::Never => RestartPolicy::Never,
        _ => RestartPolicy::OnFailure,
    };
    let view_of = |c: &ContainerPlan, init: bool, reason: WaitingReason| {
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
        plan.init_containers.iter().map(|c| view_of(c, true, WaitingReason::PodInitializing)).unzip();
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

    fn fail(&self, reason: PodFailureReason, message: String) {
        if let Ok(mut view) = self.view.lock() {
            view.failure = Some(PodFailure { reason, message });
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
            shared.fail(PodFailureReason::DeadlineExceeded, message);
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
                    reason: WaitingReason::CreateContainerConfigError,
                    message: Some(message.clone()),
                };
            });
        }
        shared.event(None, EventType::Warning, "FailedMount", message.clone());
        shared.fail(PodFailureReason::VolumeSetupFailed, message);
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
                assert_eq!(t.reason, TerminationReason::AgentRestarted);
                assert_eq!(t.started_at.map(|t| t.as_second()), Some(1_795_568_400), "the run's own start");
            }
            other => panic!("a running container runs again: {other:?}"),
        }
        assert!(
            matches!(r.container("done", false, never, now), Resumed::Done(t) if t.reason == TerminationReason::Completed)
        );
        assert!(matches!(r.container("done", false, RestartPolicy::Always, now), Resumed::Again(_)));
        assert!(
            matches!(r.container("killed", false, never, now), Resumed::Again(_)),
            "the agent's own stop"
        );
        assert!(
            matches!(r.container("looping", false, RestartPolicy::Always, now), Resumed::Again(t) if t.reason == TerminationReason::Error)
        );
        assert_eq!(r.container("pulling", false, never, now), Resumed::Fresh);
        assert_eq!(r.container("absent", false, never, now), Resumed::Fresh);
        assert_eq!(Resume::default().container("running", false, never, now), Resumed::Fresh);
    }
}
