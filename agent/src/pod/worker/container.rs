//! One container's life inside its pod's worker: load the module (pulling with the kubelet's
//! `ErrImagePull`/`ImagePullBackOff`), open its log, run it in Wasmtime, record how it ended, and
//! restart it by policy with the crash-loop back-off.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use tokio_util::sync::CancellationToken;

use super::{Resumed, Shared, Slot, WorkerDeps, pod_log_dir};
use crate::logfmt::{ContainerLog, Stream};
use crate::modules::{LoadFailure, PullError, Resolution};
use crate::pod::events::EventType;
use crate::pod::spec::ContainerPlan;
use crate::pod::state::{
    Backoff, ContainerState, RestartPolicy, Termination, TerminationReason, WaitingReason,
};
use crate::runtime::{Outcome, PreparedModule, RunSpec};
use crate::store::ModuleDigest;

/// Runs one container until it ends for good (returns whether it succeeded) or the pod is stopped.
pub(super) async fn run_container(
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
                    let why = t.message.clone().unwrap_or_else(|| t.reason.to_string());
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
                    self.set_waiting(WaitingReason::CreateContainerError, message);
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
            let meter =
                metrics.container_meter(&self.shared.plan_key, &self.shared.uid, &self.plan.name, started_at);
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
                meter: Some(meter.clone()),
            };
            metrics.container_started(restart_count > 0);
            let run_started = Instant::now();
            let report = deps.runtime.run(&module, spec, self.cancel).await;
            metrics.forget_container(&self.shared.plan_key, &self.plan.name, &meter);
            metrics
                .container_ended(report.fuel_consumed, matches!(report.outcome, Outcome::OutOfFuel { .. }));
            let t = termination(&report.outcome, Some(started_at), Timestamp::now());
            tracing::info!(
                container = %self.plan.name,
                exit_code = t.exit_code,
                reason = %t.reason,
                termination_message = t.message.as_deref().unwrap_or(""),
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
        let (reason, event, message) = match &error {
            PullError::NeverPull => (
                WaitingReason::ErrImageNeverPull,
                "ErrImageNeverPull",
                format!("Container image {image:?} is not present with pull policy of Never"),
            ),
            e => (WaitingReason::ErrImagePull, "Failed", format!("Failed to pull image {image:?}: {e}")),
        };
        self.event(EventType::Warning, event, message.clone());
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
            WaitingReason::ImagePullBackOff,
            format!("Back-off pulling image {image:?}: {error}; retrying in {}s", (delay - shown).as_secs()),
        );
        sleep_or_cancel(delay - shown, self.cancel).await
    }

    fn set_waiting(&self, reason: WaitingReason, message: String) {
        self.shared.update(self.slot, |c| {
            c.state = ContainerState::Waiting { reason, message: Some(message) };
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
            c.state =
                ContainerState::Waiting { reason: WaitingReason::CrashLoopBackOff, message: Some(message) };
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
        reason: TerminationReason::parse(outcome.reason()),
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
