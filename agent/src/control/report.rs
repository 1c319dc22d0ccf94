//! What `lichen status` and `lichen pods` show: the node as the agent sees it (pods, their states,
//! the status outbox, the link to the API server, MQTT), and how the pod lines are read from the
//! store. The running agent builds it ([`super::server`]); with no agent running the `cli` layer
//! reads the store itself. Presentation (tables, text) is the `cli` layer's.

use k8s_openapi::api::core::v1::{ContainerStatus, Pod, PodStatus};
use serde::{Deserialize, Serialize};

use crate::cluster::ContactState;
use crate::store::{PodRecord, StateStore, StoreError};

/// One pod in the report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PodLine {
    /// `namespace/name`.
    pub key: String,
    /// `static` or `cluster`.
    pub origin: String,
    /// The phase last recorded.
    pub phase: String,
    /// Whether the Ready condition holds.
    pub ready: bool,
    /// Restarts over all containers.
    pub restarts: u32,
    /// `name=state[:reason]` per container.
    pub containers: Vec<String>,
    /// Whether the API server has yet to receive this pod's newest status.
    pub unreported: bool,
    /// The pod's UID (empty from an agent older than this field).
    #[serde(default)]
    pub uid: String,
    /// `status.startTime`: when the agent took the pod on.
    #[serde(default)]
    pub start_time: Option<jiff::Timestamp>,
    /// What `kubectl get pods` shows as STATUS: the phase, or the reason behind it
    /// (`CrashLoopBackOff`, `Completed`, `Init:0/1`, `Terminating`, …).
    #[serde(default)]
    pub status: String,
    /// Every container of the pod's spec, init containers first.
    #[serde(default)]
    pub container_lines: Vec<ContainerLine>,
    /// The init containers' statuses as the API's `PodStatus` has them: state (running, waiting, or
    /// terminated with exit code, reason, message, start and finish times), last state, restarts.
    #[serde(default)]
    pub init_container_statuses: Vec<ContainerStatus>,
    /// The app containers' statuses, as [`PodLine::init_container_statuses`].
    #[serde(default)]
    pub container_statuses: Vec<ContainerStatus>,
    /// The pod as a v1 `Pod` object, for `lichen pods -o json|yaml` (see [`pod_object`]); left out
    /// of `--json`, which lists the lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<serde_json::Value>,
}

/// One container of a pod in the report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerLine {
    /// Its name.
    pub name: String,
    /// Whether it is an init container.
    pub init: bool,
    /// Whether it is running now.
    pub running: bool,
    /// Whether it is ready.
    pub ready: bool,
}

impl PodLine {
    /// Whether the container `name` is running.
    pub fn container_running(&self, name: &str) -> bool {
        self.container_lines.iter().any(|c| c.name == name && c.running)
    }

    /// `kubectl get pods`' READY column: app containers running and ready, of all app containers.
    pub fn ready_column(&self) -> String {
        let app = self.container_lines.iter().filter(|c| !c.init);
        let (ready, total) = app.fold((0, 0), |(r, t), c| (r + usize::from(c.ready && c.running), t + 1));
        format!("{ready}/{total}")
    }
}

/// Everything `lichen status` shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeReport {
    /// The node name.
    pub node: String,
    /// Whether this came from a running agent (else from the store of a stopped one).
    pub agent_running: bool,
    /// The link to the API server (`None` when the agent is not running).
    pub contact: Option<ContactState>,
    /// Pods whose newest status the API server has not acknowledged (`None`: unknown, agent stopped).
    pub outbox: Option<usize>,
    /// Every pod the store knows.
    pub pods: Vec<PodLine>,
    /// Pod status changes since the agent started (0 when it is not running).
    #[serde(default)]
    pub status_changes: u64,
    /// Pod record writes to the store since the agent started: with `status_changes`, what a status
    /// change costs the disk.
    #[serde(default)]
    pub store_pod_writes: u64,
    /// The MQTT bridge and spool (`None`: MQTT off or the agent not running).
    #[serde(default)]
    pub mqtt: Option<MqttReport>,
    /// The running agent's version, `lichen version`'s (`None`: the agent is not running).
    #[serde(default)]
    pub agent_version: Option<String>,
    /// The last upgrade of the agent this node was asked for, and how it ended (`lichen status`
    /// reads it from the state directory; the agent does not send it).
    #[serde(default)]
    pub upgrade: Option<crate::upgrade::UpgradeReport>,
}

/// What `lichen status` shows of MQTT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MqttReport {
    /// Connection and bridge counters.
    pub bridge: crate::telemetry::bridge::BridgeSnapshot,
    /// Spool size and counters.
    pub spool: crate::telemetry::spool::SpoolSnapshot,
    /// Gateway mode's counters (`None`: gateway mode off).
    #[serde(default)]
    pub gateway: Option<crate::telemetry::gateway::GatewaySnapshot>,
}

/// Builds the pod lines from the store; `unreported(key, uid)` tells whether a pod's status is still
/// in the outbox.
pub fn pod_lines(
    store: &dyn StateStore,
    unreported: impl Fn(&str) -> bool,
) -> Result<Vec<PodLine>, StoreError> {
    Ok(store.list_pods()?.iter().map(|r| PodLine::from_record(r, unreported(&r.key))).collect())
}

impl PodLine {
    /// The line of one stored pod; `unreported`: its newest status is still in the outbox.
    pub fn from_record(r: &PodRecord, unreported: bool) -> PodLine {
        let status: Option<PodStatus> = r.status.clone().and_then(|s| serde_json::from_value(s).ok());
        let st = status.unwrap_or_default();
        let ready = st.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True");
        let all = st.init_container_statuses.iter().flatten().chain(st.container_statuses.iter().flatten());
        let mut restarts = 0;
        let mut containers = Vec::new();
        for c in all {
            restarts += c.restart_count.max(0) as u32;
            let s = c.state.clone().unwrap_or_default();
            let state = if s.running.is_some() {
                "running".to_owned()
            } else if let Some(t) = s.terminated {
                format!("terminated:{}", t.reason.unwrap_or_default())
            } else if let Some(w) = s.waiting {
                format!("waiting:{}", w.reason.unwrap_or_default())
            } else {
                "unknown".into()
            };
            containers.push(format!("{}={state}", c.name));
        }
        let spec_names = |field: &str| -> Vec<String> {
            r.pod["spec"][field]
                .as_array()
                .map(|cs| cs.iter().filter_map(|c| c["name"].as_str().map(str::to_owned)).collect())
                .unwrap_or_default()
        };
        let init_names = spec_names("initContainers");
        let container_lines = init_names
            .iter()
            .map(|n| (n, true))
            .chain(spec_names("containers").iter().map(|n| (n, false)).collect::<Vec<_>>())
            .map(|(name, init)| {
                let list = if init { &st.init_container_statuses } else { &st.container_statuses };
                let status = list.iter().flatten().find(|c| &c.name == name);
                ContainerLine {
                    name: name.clone(),
                    init,
                    running: status.is_some_and(|c| c.state.as_ref().is_some_and(|s| s.running.is_some())),
                    ready: status.is_some_and(|c| c.ready),
                }
            })
            .collect();
        let deleting = r.pod["metadata"]["deletionTimestamp"].is_string();
        let phase = st.phase.clone().unwrap_or_else(|| "Unknown".into());
        PodLine {
            key: r.key.clone(),
            origin: if r.source.is_api() { "cluster".into() } else { "static".into() },
            status: kubectl_status(&st, &phase, init_names.len(), ready, deleting),
            phase,
            ready,
            restarts,
            containers,
            unreported,
            uid: r.uid.clone(),
            start_time: st.start_time.as_ref().map(|t| t.0),
            container_lines,
            init_container_statuses: st.init_container_statuses.clone().unwrap_or_default(),
            container_statuses: st.container_statuses.clone().unwrap_or_default(),
            object: Some(pod_object(r)),
        }
    }
}

/// The stored pod as the API shows it (`kubectl get pod -o json`): its manifest as a v1 `Pod`,
/// with its namespace, name and UID, and the status last recorded. Put through the typed `Pod`, so
/// it has the API's shape; a manifest the type does not take is shown as it is.
pub fn pod_object(r: &PodRecord) -> serde_json::Value {
    let mut object = match &r.pod {
        serde_json::Value::Object(m) => m.clone(),
        _ => serde_json::Map::new(),
    };
    let (namespace, name) = r.key.split_once('/').unwrap_or(("default", r.key.as_str()));
    let mut meta = match object.remove("metadata") {
        Some(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    meta.entry("namespace").or_insert_with(|| namespace.into());
    meta.entry("name").or_insert_with(|| name.into());
    if !r.uid.is_empty() {
        meta.entry("uid").or_insert_with(|| r.uid.clone().into());
    }
    object.insert("apiVersion".into(), "v1".into());
    object.insert("kind".into(), "Pod".into());
    object.insert("metadata".into(), meta.into());
    if let Some(status) = &r.status {
        object.insert("status".into(), status.clone());
    }
    let object = serde_json::Value::Object(object);
    serde_json::from_value::<Pod>(object.clone()).and_then(|p| serde_json::to_value(&p)).unwrap_or(object)
}

/// `kubectl get pods -o json`'s shape: a `v1 List` of the pods' objects.
pub fn pod_list(pods: &[PodLine]) -> serde_json::Value {
    let items: Vec<serde_json::Value> = pods.iter().filter_map(|p| p.object.clone()).collect();
    serde_json::json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": items})
}

/// The STATUS `kubectl get pods` would show, by kubectl's own rules: the first init container
/// that has not succeeded explains an initialising pod; otherwise the last app container with a
/// waiting or terminated reason does, and a pod with containers still running is not `Completed`.
fn kubectl_status(st: &PodStatus, phase: &str, init_total: usize, pod_ready: bool, deleting: bool) -> String {
    if deleting {
        return "Terminating".into();
    }
    let nonempty = |r: &Option<String>| r.clone().filter(|r| !r.is_empty());
    let exit =
        |t: &k8s_openapi::api::core::v1::ContainerStateTerminated, prefix: &str| match nonempty(&t.reason) {
            Some(r) => format!("{prefix}{r}"),
            None if t.signal.unwrap_or(0) != 0 => format!("{prefix}Signal:{}", t.signal.unwrap_or(0)),
            None => format!("{prefix}ExitCode:{}", t.exit_code),
        };
    let mut reason = nonempty(&st.reason).unwrap_or_else(|| phase.to_owned());
    for (i, c) in st.init_container_statuses.iter().flatten().enumerate() {
        let s = c.state.clone().unwrap_or_default();
        match (&s.terminated, &s.waiting) {
            (Some(t), _) if t.exit_code == 0 => continue,
            (Some(t), _) => reason = exit(t, "Init:"),
            (None, Some(w)) if nonempty(&w.reason).is_some_and(|r| r != "PodInitializing") => {
                reason = format!("Init:{}", nonempty(&w.reason).unwrap_or_default())
            }
            _ => reason = format!("Init:{i}/{init_total}"),
        }
        return reason;
    }
    let mut has_running = false;
    for c in st.container_statuses.iter().flatten().rev() {
        let s = c.state.clone().unwrap_or_default();
        if let Some(r) = s.waiting.as_ref().and_then(|w| nonempty(&w.reason)) {
            reason = r;
        } else if let Some(t) = &s.terminated {
            reason = exit(t, "");
        } else if c.ready && s.running.is_some() {
            has_running = true;
        }
    }
    if reason == "Completed" && has_running {
        reason = if pod_ready { "Running".into() } else { "NotReady".into() };
    }
    reason
}

/// Pods for tests, shared with the `cli` layer's table tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    /// A stored pod `default/web` from a static manifest.
    pub(crate) fn record(pod: serde_json::Value, status: serde_json::Value) -> PodRecord {
        PodRecord {
            key: "default/web".into(),
            uid: "u1".into(),
            source: crate::store::PodSource::File("/etc/lichen/pods/web.yaml".into()),
            pod,
            status: Some(status),
            restart_counts: Default::default(),
            inputs: None,
        }
    }

    /// A spec with one init container (`setup`) and two app containers (`app`, `side`).
    pub(crate) fn web_pod() -> serde_json::Value {
        serde_json::json!({"spec": {
            "initContainers": [{"name": "setup"}],
            "containers": [{"name": "app"}, {"name": "side"}]
        }})
    }

    /// A container status with two restarts.
    pub(crate) fn container(name: &str, state: serde_json::Value, ready: bool) -> serde_json::Value {
        serde_json::json!({"name": name, "image": "x", "imageID": "", "ready": ready, "restartCount": 2, "state": state})
    }

    /// `web_pod` running since 10:00, `setup` done, `app` ready, `side` in CrashLoopBackOff.
    pub(crate) fn crash_looping() -> serde_json::Value {
        serde_json::json!({
            "phase": "Running",
            "startTime": "2024-05-01T10:00:00Z",
            "conditions": [{"type": "Ready", "status": "False"}],
            "initContainerStatuses": [container("setup", serde_json::json!({"terminated": {"exitCode": 0, "reason": "Completed"}}), false)],
            "containerStatuses": [
                container("app", serde_json::json!({"running": {}}), true),
                container("side", serde_json::json!({"waiting": {"reason": "CrashLoopBackOff"}}), false),
            ]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{container as cs, crash_looping, record, web_pod};
    use super::*;

    #[test]
    fn pods_show_what_kubectl_would() {
        let pod = web_pod();
        let p = PodLine::from_record(&record(pod.clone(), crash_looping()), false);
        assert_eq!(p.status, "CrashLoopBackOff");
        assert_eq!(p.ready_column(), "1/2");
        assert!(p.container_running("app") && !p.container_running("side") && !p.container_running("setup"));
        assert_eq!(p.container_lines.iter().filter(|c| c.init).count(), 1);
        assert_eq!(p.restarts, 6);
        assert_eq!(p.start_time, Some("2024-05-01T10:00:00Z".parse().expect("ts")));

        let initializing = serde_json::json!({
            "phase": "Pending",
            "initContainerStatuses": [cs("setup", serde_json::json!({"running": {}}), false)],
        });
        assert_eq!(PodLine::from_record(&record(pod.clone(), initializing), false).status, "Init:0/1");
        let failed_init = serde_json::json!({
            "phase": "Failed",
            "initContainerStatuses": [cs("setup", serde_json::json!({"terminated": {"exitCode": 3, "reason": "Error"}}), false)],
        });
        assert_eq!(PodLine::from_record(&record(pod, failed_init), false).status, "Init:Error");
    }
}
