//! `lichen status`: the node as the agent sees it (pods, their states, the status outbox, the link to
//! the API server), from the running agent, or from the store alone when no agent runs.

use std::fmt::Write as _;

use k8s_openapi::api::core::v1::PodStatus;
use serde::{Deserialize, Serialize};

use crate::cluster::ContactState;
use crate::store::{PodRecord, StateStore, StoreError};

/// One pod in the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    PodLine {
        key: r.key.clone(),
        origin: if r.source.starts_with("file:") { "static".into() } else { "cluster".into() },
        phase: st.phase.unwrap_or_else(|| "Unknown".into()),
        ready,
        restarts,
        containers,
        unreported,
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
                    "gateway:    local broker {}; forwarded {} up, {} down; dropped {} down (queue full); {} loops suppressed",
                    if g.connected { "connected" } else { "not connected" },
                    g.forwarded_up,
                    g.forwarded_down,
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
