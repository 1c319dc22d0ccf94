//! The pod's phase and container states as a pure state machine, following the kubelet's rules
//! (`getPhase` and the restart back-off), so that what `kubectl get pods` shows is derived, never
//! guessed. No I/O and no clocks: callers pass the time in.

use std::time::Duration;

use jiff::Timestamp;

/// `spec.restartPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    /// Restart whatever the exit code.
    Always,
    /// Restart only after a failure.
    OnFailure,
    /// Never restart.
    Never,
}

impl RestartPolicy {
    /// Parses the API's spelling; absent means `Always`, as the API server defaults it.
    pub fn parse(s: Option<&str>) -> Result<Self, UnknownRestartPolicy> {
        match s {
            None | Some("Always") => Ok(RestartPolicy::Always),
            Some("OnFailure") => Ok(RestartPolicy::OnFailure),
            Some("Never") => Ok(RestartPolicy::Never),
            Some(other) => Err(UnknownRestartPolicy(other.to_owned())),
        }
    }

    /// Whether a container that ended with `exit_code` runs again.
    pub fn restarts(self, exit_code: i32) -> bool {
        match self {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => exit_code != 0,
            RestartPolicy::Never => false,
        }
    }

    /// The API's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::Always => "Always",
            RestartPolicy::OnFailure => "OnFailure",
            RestartPolicy::Never => "Never",
        }
    }
}

/// A `restartPolicy` Kubernetes does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown restartPolicy {0:?} (Always, OnFailure or Never)")]
pub struct UnknownRestartPolicy(pub String);

/// Why a container is not running, as `kubectl get pods` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitingReason {
    /// Being prepared (module load, log file).
    ContainerCreating,
    /// An app container while init containers run.
    PodInitializing,
    /// In restart back-off after a run ended.
    CrashLoopBackOff,
    /// The module could not be fetched (shown first).
    ErrImagePull,
    /// `imagePullPolicy: Never` and the module is not cached.
    ErrImageNeverPull,
    /// In back-off between pull attempts.
    ImagePullBackOff,
    /// A volume, ConfigMap, Secret or token the container needs is not there.
    CreateContainerConfigError,
    /// The container could not be set up (its log file could not be opened).
    CreateContainerError,
}

impl WaitingReason {
    /// The API's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            WaitingReason::ContainerCreating => "ContainerCreating",
            WaitingReason::PodInitializing => "PodInitializing",
            WaitingReason::CrashLoopBackOff => "CrashLoopBackOff",
            WaitingReason::ErrImagePull => "ErrImagePull",
            WaitingReason::ErrImageNeverPull => "ErrImageNeverPull",
            WaitingReason::ImagePullBackOff => "ImagePullBackOff",
            WaitingReason::CreateContainerConfigError => "CreateContainerConfigError",
            WaitingReason::CreateContainerError => "CreateContainerError",
        }
    }
}

impl std::fmt::Display for WaitingReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a container run ended. Runs of an earlier agent are read back from the stored status, so
/// a reason this build does not know is kept as it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TerminationReason {
    /// Exit code 0.
    Completed,
    /// Another exit code.
    Error,
    /// The fuel limit ran out.
    OutOfFuel,
    /// The memory limit was hit.
    OOMKilled,
    /// The wall-clock limit passed.
    DeadlineExceeded,
    /// A WebAssembly trap.
    Trap,
    /// The module cannot be run.
    InvalidModule,
    /// Stopped by Lichen (pod deleted, grace period over).
    Killed,
    /// Running when the agent itself stopped (restart, kill, power loss).
    AgentRestarted,
    /// Written by another version.
    Other(String),
}

impl TerminationReason {
    /// Reads the API's spelling (a stored status, or [`crate::runtime::Outcome::reason`]).
    pub fn parse(s: &str) -> TerminationReason {
        match s {
            "Completed" => TerminationReason::Completed,
            "Error" => TerminationReason::Error,
            "OutOfFuel" => TerminationReason::OutOfFuel,
            "OOMKilled" => TerminationReason::OOMKilled,
            "DeadlineExceeded" => TerminationReason::DeadlineExceeded,
            "Trap" => TerminationReason::Trap,
            "InvalidModule" => TerminationReason::InvalidModule,
            "Killed" => TerminationReason::Killed,
            "AgentRestarted" => TerminationReason::AgentRestarted,
            other => TerminationReason::Other(other.to_owned()),
        }
    }

    /// The API's spelling.
    pub fn as_str(&self) -> &str {
        match self {
            TerminationReason::Completed => "Completed",
            TerminationReason::Error => "Error",
            TerminationReason::OutOfFuel => "OutOfFuel",
            TerminationReason::OOMKilled => "OOMKilled",
            TerminationReason::DeadlineExceeded => "DeadlineExceeded",
            TerminationReason::Trap => "Trap",
            TerminationReason::InvalidModule => "InvalidModule",
            TerminationReason::Killed => "Killed",
            TerminationReason::AgentRestarted => "AgentRestarted",
            TerminationReason::Other(s) => s,
        }
    }
}

impl std::fmt::Display for TerminationReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a container run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Termination {
    /// Exit code (see `runtime::Outcome::exit_code`).
    pub exit_code: i32,
    /// Why.
    pub reason: TerminationReason,
    /// Details for `kubectl describe`.
    pub message: Option<String>,
    /// When the run started, if it did.
    pub started_at: Option<Timestamp>,
    /// When it ended.
    pub finished_at: Timestamp,
}

/// A container's current state, as in `v1.ContainerState`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerState {
    /// Not running: being prepared, or in back-off.
    Waiting {
        /// Why.
        reason: WaitingReason,
        /// Details.
        message: Option<String>,
    },
    /// Running since.
    Running {
        /// Start time.
        started_at: Timestamp,
    },
    /// Ended and will not run again (or not yet decided).
    Terminated(Termination),
}

/// Everything the status needs about one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerView {
    /// Container name.
    pub name: String,
    /// `image` from the spec.
    pub image: String,
    /// `sha256:…` of the module, once loaded.
    pub image_id: Option<String>,
    /// Current state.
    pub state: ContainerState,
    /// The previous run's ending, shown as `lastState`.
    pub last_termination: Option<Termination>,
    /// Restarts so far.
    pub restart_count: u32,
}

impl ContainerView {
    /// A container that has not started yet.
    pub fn new(name: &str, image: &str, reason: WaitingReason, restart_count: u32) -> Self {
        ContainerView {
            name: name.to_owned(),
            image: image.to_owned(),
            image_id: None,
            state: ContainerState::Waiting { reason, message: None },
            last_termination: None,
            restart_count,
        }
    }

    /// Running containers are ready: Lichen refuses probes, so there is nothing else to wait for.
    pub fn ready(&self) -> bool {
        matches!(self.state, ContainerState::Running { .. })
    }

    fn succeeded(&self) -> bool {
        matches!(&self.state, ContainerState::Terminated(t) if t.exit_code == 0)
    }
}

/// `status.phase`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodPhase {
    /// Accepted, not all containers started.
    Pending,
    /// Bound and at least one container running or restarting.
    Running,
    /// All containers ended successfully and none will restart.
    Succeeded,
    /// All containers ended, at least one in failure, and none will restart.
    Failed,
}

impl PodPhase {
    /// The API's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PodPhase::Pending => "Pending",
            PodPhase::Running => "Running",
            PodPhase::Succeeded => "Succeeded",
            PodPhase::Failed => "Failed",
        }
    }

    /// Whether the pod will never run anything again.
    pub fn is_terminal(self) -> bool {
        matches!(self, PodPhase::Succeeded | PodPhase::Failed)
    }
}

/// The phase, by the kubelet's rules.
pub fn pod_phase(policy: RestartPolicy, init: &[ContainerView], app: &[ContainerView]) -> PodPhase {
    // An init container that failed for good fails the pod; one still to finish keeps it Pending.
    for c in init {
        match &c.state {
            ContainerState::Terminated(t) if t.exit_code != 0 && !policy.restarts(t.exit_code) => {
                return PodPhase::Failed;
            }
            ContainerState::Terminated(t) if t.exit_code == 0 => {}
            _ => return PodPhase::Pending,
        }
    }
    let (mut running, mut waiting, mut stopped, mut succeeded) = (0, 0, 0, 0);
    for c in app {
        match &c.state {
            ContainerState::Running { .. } => running += 1,
            ContainerState::Terminated(t) => {
                stopped += 1;
                if t.exit_code == 0 {
                    succeeded += 1;
                }
            }
            // A container in back-off between runs has run; it counts as stopped, not waiting.
            ContainerState::Waiting { .. } if c.last_termination.is_some() => stopped += 1,
            ContainerState::Waiting { .. } => waiting += 1,
        }
    }
    if waiting > 0 || app.is_empty() {
        PodPhase::Pending
    } else if running > 0 {
        PodPhase::Running
    } else if stopped > 0 {
        match policy {
            RestartPolicy::Always => PodPhase::Running,
            _ if stopped == succeeded => PodPhase::Succeeded,
            RestartPolicy::OnFailure
                if app.iter().any(|c| !c.succeeded() && c.last_termination.is_some()) =>
            {
                PodPhase::Running
            }
            RestartPolicy::OnFailure | RestartPolicy::Never => PodPhase::Failed,
        }
    } else {
        PodPhase::Pending
    }
}

/// One `status.conditions` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// `PodScheduled`, `Initialized`, `ContainersReady` or `Ready`.
    pub kind: &'static str,
    /// Whether it holds.
    pub status: bool,
    /// Why not, when it does not.
    pub reason: Option<&'static str>,
}

/// The four standard pod conditions.
pub fn conditions(phase: PodPhase, init: &[ContainerView], app: &[ContainerView]) -> Vec<Condition> {
    let initialized = init.iter().all(ContainerView::succeeded);
    let ready = !phase.is_terminal() && !app.is_empty() && app.iter().all(ContainerView::ready);
    let not_ready_reason = if phase.is_terminal() { "PodCompleted" } else { "ContainersNotReady" };
    vec![
        Condition { kind: "PodScheduled", status: true, reason: None },
        Condition {
            kind: "Initialized",
            status: initialized,
            reason: (!initialized).then_some("ContainersNotInitialized"),
        },
        Condition { kind: "ContainersReady", status: ready, reason: (!ready).then_some(not_ready_reason) },
        Condition { kind: "Ready", status: ready, reason: (!ready).then_some(not_ready_reason) },
    ]
}

/// The kubelet's crash-loop back-off: 10 s, doubling to 5 min, forgotten after 10 min of running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    reset_after: Duration,
    last: Option<Duration>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(Duration::from_secs(10), Duration::from_secs(300), Duration::from_secs(600))
    }
}

impl Backoff {
    /// A back-off with explicit bounds.
    pub fn new(initial: Duration, max: Duration, reset_after: Duration) -> Self {
        Backoff { initial, max, reset_after, last: None }
    }

    /// The delay before the next run of a container whose last run lasted `ran_for`.
    pub fn next_delay(&mut self, ran_for: Duration) -> Duration {
        if ran_for >= self.reset_after {
            self.last = None;
        }
        let delay = match self.last {
            None => self.initial,
            Some(d) => (d * 2).min(self.max),
        };
        self.last = Some(delay);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> Timestamp {
        Timestamp::UNIX_EPOCH
    }

    fn ended(code: i32) -> ContainerState {
        ContainerState::Terminated(Termination {
            exit_code: code,
            reason: if code == 0 { TerminationReason::Completed } else { TerminationReason::Error },
            message: None,
            started_at: Some(t()),
            finished_at: t(),
        })
    }

    fn c(state: ContainerState) -> ContainerView {
        ContainerView { state, ..ContainerView::new("c", "img", WaitingReason::ContainerCreating, 0) }
    }

    fn backing_off(code: i32) -> ContainerView {
        let ContainerState::Terminated(last) = ended(code) else { unreachable!() };
        ContainerView {
            state: ContainerState::Waiting { reason: WaitingReason::CrashLoopBackOff, message: None },
            last_termination: Some(last),
            restart_count: 1,
            ..ContainerView::new("c", "img", WaitingReason::ContainerCreating, 0)
        }
    }

    fn running() -> ContainerView {
        c(ContainerState::Running { started_at: t() })
    }

    fn waiting() -> ContainerView {
        ContainerView::new("c", "img", WaitingReason::ContainerCreating, 0)
    }

    use PodPhase::*;
    use RestartPolicy::*;

    #[test]
    fn phases_follow_the_kubelet() {
        assert_eq!(pod_phase(Always, &[], &[waiting()]), Pending);
        assert_eq!(pod_phase(Always, &[], &[running(), waiting()]), Pending);
        assert_eq!(pod_phase(Always, &[], &[running()]), Running);
        assert_eq!(pod_phase(Always, &[], &[backing_off(1)]), Running);
        assert_eq!(pod_phase(Always, &[], &[backing_off(0)]), Running);
        assert_eq!(pod_phase(OnFailure, &[], &[c(ended(0))]), Succeeded);
        assert_eq!(pod_phase(OnFailure, &[], &[backing_off(2)]), Running);
        assert_eq!(pod_phase(OnFailure, &[], &[c(ended(0)), running()]), Running);
        assert_eq!(pod_phase(Never, &[], &[c(ended(0)), c(ended(0))]), Succeeded);
        assert_eq!(pod_phase(Never, &[], &[c(ended(0)), c(ended(3))]), Failed);
        assert_eq!(pod_phase(Never, &[], &[c(ended(0)), running()]), Running);
    }

    #[test]
    fn init_containers_gate_the_pod() {
        assert_eq!(pod_phase(Always, &[waiting()], &[waiting()]), Pending);
        assert_eq!(pod_phase(Always, &[running()], &[waiting()]), Pending);
        assert_eq!(pod_phase(Always, &[backing_off(1)], &[waiting()]), Pending);
        assert_eq!(pod_phase(Never, &[c(ended(1))], &[waiting()]), Failed);
        assert_eq!(pod_phase(OnFailure, &[c(ended(0))], &[running()]), Running);
    }

    #[test]
    fn ready_only_when_every_container_runs() {
        let conds = conditions(Running, &[c(ended(0))], &[running(), running()]);
        assert!(conds.iter().all(|c| c.status), "{conds:?}");
        let conds = conditions(Running, &[], &[running(), backing_off(1)]);
        let ready = conds.iter().find(|c| c.kind == "Ready").expect("Ready");
        assert_eq!((ready.status, ready.reason), (false, Some("ContainersNotReady")));
        let conds = conditions(Succeeded, &[], &[c(ended(0))]);
        let ready = conds.iter().find(|c| c.kind == "Ready").expect("Ready");
        assert_eq!(ready.reason, Some("PodCompleted"));
        let init = conditions(Pending, &[running()], &[waiting()]);
        assert!(!init.iter().find(|c| c.kind == "Initialized").expect("Initialized").status);
    }

    #[test]
    fn backoff_doubles_caps_and_resets() {
        let mut b = Backoff::default();
        let secs: Vec<u64> = (0..7).map(|_| b.next_delay(Duration::from_secs(1)).as_secs()).collect();
        assert_eq!(secs, vec![10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(b.next_delay(Duration::from_secs(600)).as_secs(), 10, "reset after 10 min of running");
        assert_eq!(b.next_delay(Duration::from_secs(599)).as_secs(), 20);
    }

    #[test]
    fn restart_policy_parses_and_decides() {
        assert_eq!(RestartPolicy::parse(None), Ok(Always));
        assert!(RestartPolicy::parse(Some("Sometimes")).is_err());
        assert!(OnFailure.restarts(1) && !OnFailure.restarts(0));
        assert!(!Never.restarts(1) && Always.restarts(0));
    }
}
