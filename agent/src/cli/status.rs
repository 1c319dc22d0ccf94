//! `lichen status` and `lichen pods`: asks the running agent for its report (or reads the store
//! when none runs) and shows it as text or as kubectl's table.

use std::fmt::Write as _;

use super::CliError;
use super::client::{Reached, ask_agent_or_open_store, expect_answer};
use crate::config::AgentConfig;
use crate::control::report::{NodeReport, pod_lines, pod_list};
use crate::control::{ControlRequest, ControlResponse};

/// The node report: from the running agent through its control socket, or from the store when no
/// agent runs.
pub async fn node_report(config: &AgentConfig) -> Result<NodeReport, CliError> {
    let mut report = node_report_of_pods(config).await?;
    // The last upgrade's outcome, from its record in the state directory (read as the agent does
    // at start; whoever may read the state directory may read it).
    let slots = crate::upgrade::slots::Slots::new(&config.layout());
    report.upgrade =
        tokio::task::spawn_blocking(move || slots.load().ok().and_then(|r| r.report)).await.ok().flatten();
    Ok(report)
}

async fn node_report_of_pods(config: &AgentConfig) -> Result<NodeReport, CliError> {
    let layout = config.layout();
    let (socket, store_dir) = (layout.control_socket(), layout.store());
    let request = ControlRequest::Status;
    if !store_dir.exists() {
        // Opening would create a store; only a running agent (which has one) can answer.
        return match super::client::request(&socket, &request).await? {
            Some(answer) => status_answer(&socket, answer),
            None => Err(CliError::NoAgentNoStore(store_dir)),
        };
    }
    let store = match ask_agent_or_open_store(&socket, &request, &store_dir).await? {
        Reached::Agent(answer) => return status_answer(&socket, answer),
        Reached::Store(store) => store,
    };
    let pods = tokio::task::spawn_blocking(move || pod_lines(store.as_ref(), |_| false))
        .await
        .map_err(CliError::Task)??;
    Ok(NodeReport {
        node: config.node_name.clone(),
        agent_running: false,
        contact: None,
        outbox: None,
        pods,
        status_changes: 0,
        agent_version: None,
        upgrade: None,
        store_pod_writes: 0,
        mqtt: None,
    })
}

/// `lichen status --json` (`pods_only`: `lichen pods --json`): the report, or its pod lines, as
/// pretty JSON, without the pods' full objects (those are `lichen pods -o json`).
pub fn report_json(mut report: NodeReport, pods_only: bool) -> String {
    for p in &mut report.pods {
        p.object = None;
    }
    let text = if pods_only {
        serde_json::to_string_pretty(&report.pods)
    } else {
        serde_json::to_string_pretty(&report)
    };
    // Plain data with string keys: serialising it cannot fail.
    format!("{}\n", text.unwrap_or_default())
}

/// `lichen pods -o json|yaml`: a `v1 List` of the pods as `Pod` objects, as kubectl prints it.
pub fn pods_output(report: &NodeReport, format: super::PodsFormat) -> Result<String, CliError> {
    let list = pod_list(&report.pods);
    match format {
        super::PodsFormat::Json => {
            Ok(format!("{}\n", serde_json::to_string_pretty(&list).unwrap_or_default()))
        }
        super::PodsFormat::Yaml => serde_saphyr::to_string(&list).map_err(CliError::Yaml),
    }
}

fn status_answer(socket: &std::path::Path, answer: ControlResponse) -> Result<NodeReport, CliError> {
    match expect_answer(socket, &ControlRequest::Status, answer)? {
        ControlResponse::Status(report) => Ok(*report),
        other => Err(crate::control::ControlError::Unexpected {
            path: socket.to_owned(),
            asked: "status",
            what: other.name(),
        }
        .into()),
    }
}

/// `lichen pods`: one line per pod, as `kubectl get pods -A` prints them.
pub fn pods_table(pods: &[crate::control::report::PodLine], now: jiff::Timestamp) -> String {
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

/// The report as the operator reads it (`lichen status`).
pub fn render(report: &NodeReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "node:       {}", report.node);
    let now = jiff::Timestamp::now();
    let ago = |t: jiff::Timestamp| {
        let secs = now.as_second() - t.as_second();
        format!("{t} ({}s ago)", secs.max(0))
    };
    let agent = match (&report.agent_version, report.agent_running) {
        (Some(v), true) => format!("running, version {v}"),
        (None, true) => "running".to_owned(),
        (_, false) => "not running (read from the store)".to_owned(),
    };
    let _ = writeln!(out, "agent:      {agent}");
    if let Some(u) = &report.upgrade {
        let version = u.version.as_deref().map(|v| format!(" to {v}")).unwrap_or_default();
        let reason = if u.reason.is_empty() { String::new() } else { format!(": {}", u.reason) };
        let _ = writeln!(out, "upgrade:    {:?}{version} at {} ({}){reason}", u.phase, u.at, u.image);
    }
    let link = match &report.contact {
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
    let outbox = match report.outbox {
        Some(n) => format!("{n} pod status(es) waiting for the API server"),
        None => "unknown (agent not running)".into(),
    };
    let _ = writeln!(out, "outbox:     {outbox}");
    if let Some(m) = &report.mqtt {
        let (b, s) = (&m.bridge, &m.spool);
        let _ = writeln!(
            out,
            "mqtt:       {}; spool {} message(s), {} bytes; acked {}; throttled {} (QoS 1, rate limit); dropped: {} spool full, {} rate (QoS 0), {} oversized, {} malformed, {} offline (QoS 0), {} stdin full",
            if b.connected { "connected" } else { "not connected" },
            s.entries,
            s.bytes,
            s.acked,
            b.throttled,
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
    let _ = writeln!(out, "pods:       {}", report.pods.len());
    if !report.pods.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<40} {:<8} {:<10} {:<6} {:>8}  CONTAINERS",
            "POD", "ORIGIN", "PHASE", "READY", "RESTARTS"
        );
        for p in &report.pods {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::report::PodLine;
    use crate::control::report::fixtures::{crash_looping, record, web_pod};

    #[test]
    fn pods_show_as_kubectl_shows_them() {
        let record = record(web_pod(), crash_looping());
        let p = PodLine::from_record(&record, false);
        let now: jiff::Timestamp = "2024-05-01T10:03:05Z".parse().expect("ts");
        let table = pods_table(&[p], now);
        assert_eq!(
            table,
            "NAMESPACE   NAME   READY   STATUS             RESTARTS   AGE\n\
             default     web    1/2     CrashLoopBackOff   6          3m5s\n"
        );
        assert_eq!(pods_table(&[], now), "No pods on this node.\n");
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
