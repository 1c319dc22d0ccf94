//! Builds the `v1.PodStatus` the user sees from the worker's container views and the pure phase rules.

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{
    ContainerState as K8sState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, HostIP, PodCondition, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::state::{self, ContainerState, ContainerView, PodPhase, RestartPolicy, Termination};

/// A pod-level failure that overrides the container-derived phase (deadline, admission).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFailure {
    /// Why.
    pub reason: PodFailureReason,
    /// For `kubectl describe`.
    pub message: String,
}

/// Why a whole pod failed or waits, as `status.reason` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodFailureReason {
    /// `activeDeadlineSeconds` passed.
    DeadlineExceeded,
    /// The node already runs `max_pods`.
    OutOfPods,
    /// The spec asks for what Lichen cannot do.
    UnsupportedPodSpec,
    /// A ConfigMap, Secret or token it needs is missing; it may still become runnable.
    CreateContainerConfigError,
    /// Its volumes could not be made.
    VolumeSetupFailed,
}

impl PodFailureReason {
    /// The API's spelling (`OutOfpods` as the kubelet writes it).
    pub fn as_str(self) -> &'static str {
        match self {
            PodFailureReason::DeadlineExceeded => "DeadlineExceeded",
            PodFailureReason::OutOfPods => "OutOfpods",
            PodFailureReason::UnsupportedPodSpec => "UnsupportedPodSpec",
            PodFailureReason::CreateContainerConfigError => "CreateContainerConfigError",
            PodFailureReason::VolumeSetupFailed => "VolumeSetupFailed",
        }
    }
}

impl std::fmt::Display for PodFailureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The inputs of a pod's status.
#[derive(Debug, Clone)]
pub struct PodView {
    /// Restart policy.
    pub restart_policy: RestartPolicy,
    /// Init containers.
    pub init: Vec<ContainerView>,
    /// App containers.
    pub app: Vec<ContainerView>,
    /// Set when the pod as a whole failed.
    pub failure: Option<PodFailure>,
    /// When the worker accepted the pod.
    pub start_time: Option<Timestamp>,
    /// The node's address.
    pub host_ip: Option<String>,
}

impl PodView {
    /// The phase, pod-level failures first.
    pub fn phase(&self) -> PodPhase {
        if self.failure.is_some() {
            return PodPhase::Failed;
        }
        state::pod_phase(self.restart_policy, &self.init, &self.app)
    }
}

/// Renders the status. `previous` keeps conditions' transition times stable across updates.
pub fn build(view: &PodView, previous: Option<&PodStatus>, now: Timestamp) -> PodStatus {
    let phase = view.phase();
    let conditions = state::conditions(phase, &view.init, &view.app)
        .into_iter()
        .map(|c| {
            let status = if c.status { "True" } else { "False" };
            let since = previous
                .and_then(|p| p.conditions.as_ref())
                .and_then(|cs| cs.iter().find(|p| p.type_ == c.kind && p.status == status))
                .and_then(|p| p.last_transition_time.clone())
                .unwrap_or(Time(now));
            PodCondition {
                type_: c.kind.to_owned(),
                status: status.to_owned(),
                reason: c.reason.map(str::to_owned),
                last_transition_time: Some(since),
                ..Default::default()
            }
        })
        .collect();
    PodStatus {
        phase: Some(phase.as_str().to_owned()),
        reason: view.failure.as_ref().map(|f| f.reason.as_str().to_owned()),
        message: view.failure.as_ref().map(|f| f.message.clone()),
        conditions: Some(conditions),
        host_ip: view.host_ip.clone(),
        host_ips: view.host_ip.clone().map(|ip| vec![HostIP { ip }]),
        start_time: view.start_time.map(Time),
        init_container_statuses: (!view.init.is_empty()).then(|| view.init.iter().map(container).collect()),
        container_statuses: Some(view.app.iter().map(container).collect()),
        ..Default::default()
    }
}

fn container(c: &ContainerView) -> ContainerStatus {
    ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone(),
        image_id: c.image_id.clone().unwrap_or_default(),
        ready: c.ready(),
        started: Some(c.ready()),
        restart_count: c.restart_count as i32,
        state: Some(k8s_state(&c.state)),
        last_state: c
            .last_termination
            .as_ref()
            .map(|t| K8sState { terminated: Some(terminated(t)), ..Default::default() }),
        ..Default::default()
    }
}

fn k8s_state(s: &ContainerState) -> K8sState {
    match s {
        ContainerState::Waiting { reason, message } => K8sState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.as_str().to_owned()),
                message: message.clone(),
            }),
            ..Default::default()
        },
        ContainerState::Running { started_at } => K8sState {
            running: Some(ContainerStateRunning { started_at: Some(Time(*started_at)) }),
            ..Default::default()
        },
        ContainerState::Terminated(t) => K8sState { terminated: Some(terminated(t)), ..Default::default() },
    }
}

fn terminated(t: &Termination) -> ContainerStateTerminated {
    ContainerStateTerminated {
        exit_code: t.exit_code,
        reason: Some(t.reason.as_str().to_owned()),
        message: t.message.clone(),
        started_at: t.started_at.map(Time),
        finished_at: Some(Time(t.finished_at)),
        ..Default::default()
    }
}
