//! `lichen status` and `lichen pods`: the node as the agent sees it (pods, their states, the status
//! outbox, the link to the API server), from the running agent, or from the store alone when no
//! agent runs.

use std::fmt::Write as _;

use k8s_openapi::api::core::v1::PodStatus;
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
    Ok(store.list_pods()?.iter().map(|r| line(r, unreported(&r.key))).collect())
}

fn line(r: &PodRecord, unreported: bool) -> PodLine {
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
        origin: if r.source.starts_with("file:") { "static".into() } else { "cluster".into() },
        status: kubectl_status(&st, &phase, init_names.len(), ready, deleting),
        phase,
        ready,
        restarts,
        containers,
        unreported,
        uid: r.uid.clone(),
        start_time: st.start_time.as_ref().map(|t| t.0),
        container_lines,
    }
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

/// `lichen pods`: one line per pod, as `kubectl get pods -A` prints them.
pub fn pods_table(pods: &[PodLine], now: jiff::Timestamp) -> String {
    if pods.is_empty() {
        return "No pods on this node.\n".into();
    }
    let mut rows = vec![["NAMESPACE", "NAME", "READY", "STATUS", "RESTARTS", "AGE"].map(str::to_owned)];
    for p in pods {
        let (namespace, name) = p.key.split_once('/').unwrap_or(("", p.key.as_str()));
        let status = if p.status.is_empty() { p.phase.clone() } else { p.status.clone() };
        let age = p
            .start_time
            .map_or_else(|| "<unknown>".to_owned(), |t| human_duration(now.as_second() - t.as_second()));
        rows.push([namespace.into(), name.into(), p.ready_column(), status, p.restarts.to_string(), age]);
    }
    let mut widths = [0usize; 6];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line += cell;
            } else {
                // kubectl's tabwriter: three spaces between columns.
                let _ = write!(line, "{cell:<w$}   ", w = widths[i]);
            }
        }
        out += line.trim_end();
        out.push('\n');
    }
    out
}

/// A duration as kubectl prints ages (`45s`, `3m12s`, `5h20m`, `6d`): precise when short, coarser
/// as it grows. A time up to a second ahead (clock skew) is `0s`.
pub fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    let secs = secs.max(0);
    let (minutes, hours, days) = (secs / 60, secs / 3600, secs / 86400);
    let with = |big: i64, unit: &str, small: i64, small_unit: &str| {
        if small == 0 { format!("{big}{unit}") } else { format!("{big}{unit}{small}{small_unit}") }
    };
    if secs < 120 {
        format!("{secs}s")
    } else if minutes < 10 {
        with(minutes, "m", secs % 60, "s")
    } else if minutes < 180 {
        format!("{minutes}m")
    } else if hours < 8 {
        with(hours, "h", minutes % 60, "m")
    } else if hours < 48 {
        format!("{hours}h")
    } else if hours < 24 * 8 {
        with(days, "d", hours % 24, "h")
    } else if hours < 24 * 365 * 2 {
        format!("{days}d")
    } else if hours < 24 * 365 * 8 {
        with(days / 365, "y", days % 365, "d")
    } else {
        format!("{}y", days / 365)
    }
}

impl NodeReport {
    /// The report as the operator reads it.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "node:       {}", self.node);
        let now = jiff::Timestamp::now();
        let ago = |t: jiff::Timestamp| {
            let secs = now.as_second() - t.as_second();
            format!("{t} ({}s ago)", secs.max(0))
        };
        let agent = if self.agent_running { "running" } else { "not running (read from the store)" };
        let _ = writeln!(out, "agent:      {agent}");
        let link = match &self.contact {
            None => "unknown (agent not running)".to_owned(),
            Some(c) if !c.configured => "standalone (no kubeconfig)".to_owned(),
            Some(c) => match (&c.last_ok, &c.down_since) {
                (Some(ok), None) => format!("connected; last contact {}", ago(*ok)),
                (last, Some(down)) => format!(
                    "offline since {}; last contact {}; last error: {}",
                    ago(*down),
                    last.map(ago).unwrap_or_else(|| "never".into()),
                    c.last_error.as_deref().unwrap_or("-")
                ),
                (None, None) => "connecting (no contact yet)".to_owned(),
            },
        };
        let _ = writeln!(out, "api server: {link}");
        let outbox = match self.outbox {
            Some(n) => format!("{n} pod status(es) waiting for the API server"),
            None => "unknown (agent not running)".into(),
        };
        let _ = writeln!(out, "outbox:     {outbox}");
        if let Some(m) = &self.mqtt {
            let (b, s) = (&m.bridge, &m.spool);
            let _ = writeln!(
                out,
                "mqtt:       {}; spool {} message(s), {} bytes; acked {}; dropped: {} spool full, {} rate, {} oversized, {} malformed, {} offline (QoS 0), {} stdin full",
                if b.connected { "connected" } else { "not connected" },
                s.entries,
                s.bytes,
                s.acked,
                s.dropped_full,
                b.dropped_rate,
                b.dropped_oversized,
                b.dropped_malformed,
                b.dropped_offline,
                b.dropped_stdin
            );
            if let Some(g) = &m.gateway {
                let _ = writeln!(
                    out,
                    "gateway:    local broker {}; forwarded {} up, {} down; {} spooled down, dropped {} down (spool full); {} loops suppressed",
                    if g.connected { "connected" } else { "not connected" },
                    g.forwarded_up,
                    g.forwarded_down,
                    g.spooled_down,
                    g.dropped_down,
                    g.loops_suppressed
                );
            }
        }
        let _ = writeln!(out, "pods:       {}", self.pods.len());
        if !self.pods.is_empty() {
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "{:<40} {:<8} {:<10} {:<6} {:>8}  CONTAINERS",
                "POD", "ORIGIN", "PHASE", "READY", "RESTARTS"
            );
            for p in &self.pods {
                let _ = writeln!(
                    out,
                    "{:<40} {:<8} {:<10} {:<6} {:>8}  {}{}",
                    p.key,
                    p.origin,
                    p.phase,
                    if p.ready { "yes" } else { "no" },
                    p.restarts,
                    p.containers.join(" "),
                    if p.unreported { "  (not yet reported)" } else { "" }
                );
            }
        }
        out
    }
}

/// `lichen status`: asks the running agent through its control socket, or reads the store when no
/// agent runs.
pub async fn node_report(config: &crate::config::AgentConfig) -> Result<NodeReport, String> {
    let socket = crate::control::socket_path(&config.state_dir);
    let layout = crate::app::StateLayout::of(config);
    let request = crate::control::ControlRequest::Status;
    if !layout.store.exists() {
        // Opening would create a store; only a running agent (which has one) can answer.
        return match crate::control::request(&socket, &request).await.map_err(|e| e.to_string())? {
            Some(answer) => status_answer(answer),
            None => Err(format!("no agent is running and there is no store at {}", layout.store.display())),
        };
    }
    let store = match crate::control::ask_agent_or_open_store(&socket, &request, &layout.store).await? {
        crate::control::Reached::Agent(answer) => return status_answer(answer),
        crate::control::Reached::Store(store) => store,
    };
    let pods = tokio::task::spawn_blocking(move || pod_lines(store.as_ref(), |_| false))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    Ok(NodeReport {
        node: config.node_name.clone(),
        agent_running: false,
        contact: None,
        outbox: None,
        pods,
        status_changes: 0,
        store_pod_writes: 0,
        mqtt: None,
    })
}

fn status_answer(answer: crate::control::ControlResponse) -> Result<NodeReport, String> {
    if !answer.ok {
        return Err(answer.output);
    }
    serde_json::from_str(&answer.output).map_err(|e| format!("unreadable answer from the agent: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(pod: serde_json::Value, status: serde_json::Value) -> PodRecord {
        PodRecord {
            key: "default/web".into(),
            uid: "u1".into(),
            source: "file:/etc/lichen/pods/web.yaml".into(),
            pod,
            status: Some(status),
            restart_counts: Default::default(),
            inputs: None,
        }
    }

    #[test]
    fn pods_show_what_kubectl_would() {
        let pod = serde_json::json!({"spec": {
            "initContainers": [{"name": "setup"}],
            "containers": [{"name": "app"}, {"name": "side"}]
        }});
        let cs = |name: &str, state: serde_json::Value, ready: bool| serde_json::json!({"name": name, "image": "x", "imageID": "", "ready": ready, "restartCount": 2, "state": state});
        let status = serde_json::json!({
            "phase": "Running",
            "startTime": "2024-05-01T10:00:00Z",
            "conditions": [{"type": "Ready", "status": "False"}],
            "initContainerStatuses": [cs("setup", serde_json::json!({"terminated": {"exitCode": 0, "reason": "Completed"}}), false)],
            "containerStatuses": [
                cs("app", serde_json::json!({"running": {}}), true),
                cs("side", serde_json::json!({"waiting": {"reason": "CrashLoopBackOff"}}), false),
            ]
        });
        let p = line(&record(pod.clone(), status), false);
        assert_eq!(p.status, "CrashLoopBackOff");
        assert_eq!(p.ready_column(), "1/2");
        assert!(p.container_running("app") && !p.container_running("side") && !p.container_running("setup"));
        assert_eq!(p.container_lines.iter().filter(|c| c.init).count(), 1);
        let now: jiff::Timestamp = "2024-05-01T10:03:05Z".parse().expect("ts");
        let table = pods_table(&[p], now);
        assert_eq!(
            table,
            "NAMESPACE   NAME   READY   STATUS             RESTARTS   AGE\n\
             default     web    1/2     CrashLoopBackOff   6          3m5s\n"
        );

        let initializing = serde_json::json!({
            "phase": "Pending",
            "initContainerStatuses": [cs("setup", serde_json::json!({"running": {}}), false)],
        });
        assert_eq!(line(&record(pod.clone(), initializing), false).status, "Init:0/1");
        let failed_init = serde_json::json!({
            "phase": "Failed",
            "initContainerStatuses": [cs("setup", serde_json::json!({"terminated": {"exitCode": 3, "reason": "Error"}}), false)],
        });
        assert_eq!(line(&record(pod, failed_init), false).status, "Init:Error");
    }

    #[test]
    fn ages_read_as_kubectl_prints_them() {
        let cases = [
            (-5, "<invalid>"),
            (-1, "0s"),
            (59, "59s"),
            (119, "119s"),
            (185, "3m5s"),
            (600, "10m"),
            (3 * 3600 + 60, "3h1m"),
            (30 * 3600, "30h"),
            (3 * 86400 + 3600, "3d1h"),
            (40 * 86400, "40d"),
            (3 * 365 * 86400, "3y"),
            (10 * 365 * 86400, "10y"),
        ];
        for (secs, want) in cases {
            assert_eq!(human_duration(secs), want, "{secs}s");
        }
    }
}
