//! QoS 1 throughput against a Mosquitto bridge doing the same work, in the same run: a module's
//! output through Lichen, and Lichen's gateway (the bridge's own job), each beside the bridge in
//! rounds that alternate the three, so a machine busier in one moment weighs on all of them. Then
//! the latency of each at a fixed 5,000 msg/s. The paths are `lichen_tests::mqtt_paths`, the same
//! as the `mqtt` bench's, which also has QoS 0 and the load generator's ceiling.
//!
//! Everything is Lichen's default configuration (`inflight` 100, the spool on with its group
//! commit and fsync) except `mqtt.pod_rate_limit`, which is off: at its default a module is held to
//! 100 lines a second on purpose (the `qos1` section). Needs Debian's mosquitto.

use std::time::Duration;

use lichen_tests::mqtt_paths::{
    COUNT, Outcome, PathFailed, latency, lichen_gateway, lichen_stdout, mosquitto_bridge,
};

use crate::report::Report;

const SECTION: &str = "throughput";
/// Rounds of bridge, stdout, gateway.
const ROUNDS: usize = 3;
/// The latency runs' rate and length (the first second is not counted).
const RATE: u64 = 5_000;
const LATENCY_SECS: u64 = 6;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn rates(v: &[f64]) -> String {
    v.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(" / ")
}

fn percents(v: &[f64]) -> String {
    v.iter().map(|r| format!("{:.0}%", r * 100.0)).collect::<Vec<_>>().join(", ")
}

pub async fn run(report: &mut Report) {
    if std::process::Command::new("mosquitto").arg("-h").output().is_err() {
        return report.skipped(SECTION, "no mosquitto on the PATH (apt install mosquitto)");
    }
    if let Err(e) = measure(report).await {
        report.failed(SECTION, e.to_string());
    }
}

async fn measure(report: &mut Report) -> Result<(), PathFailed> {
    let (mut bridge, mut stdout, mut gateway) = (Vec::new(), Vec::new(), Vec::new());
    let mut cpu_per_line = Vec::new();
    for round in 1..=ROUNDS {
        let b = mosquitto_bridge(1, None).await?;
        let s = lichen_stdout(1, None, 100).await?;
        let g = lichen_gateway(1, None, 100).await?;
        println!(
            "{SECTION}: round {round}: bridge {:.0}, stdout {:.0}, gateway {:.0} msg/s ({}, {}, {} of {COUNT} received)",
            b.run.rate, s.run.rate, g.run.rate, b.run.received, s.run.received, g.run.received
        );
        if let Some(cpu) = s.agent_cpu {
            cpu_per_line.push(cpu.as_secs_f64() * 1e6 / s.run.received.max(1) as f64);
        }
        bridge.push(b.run.rate);
        stdout.push(s.run.rate);
        gateway.push(g.run.rate);
    }
    let ratio = |lichen: &[f64]| -> Vec<f64> { lichen.iter().zip(&bridge).map(|(l, b)| l / b).collect() };
    report.info(
        SECTION,
        format!("Mosquitto bridge, QoS 1, {COUNT} messages, {ROUNDS} rounds"),
        format!("{} msg/s", rates(&bridge)),
    );
    for (name, got) in [("module stdout", &stdout), ("gateway (the bridge's job)", &gateway)] {
        let r = ratio(got);
        let m = median(r.clone());
        report.aim(
            SECTION,
            format!("Lichen {name}, QoS 1, default config: median of each round's share of the bridge"),
            format!("{:.0}% ({} msg/s; {})", m * 100.0, rates(got), percents(&r)),
            "≥ 100% of the bridge in the same run",
            m >= 1.0,
        );
    }
    if !cpu_per_line.is_empty() {
        report.info(
            SECTION,
            "… agent CPU per QoS 1 stdout line (module, log file, spool and MQTT)",
            format!("{:.0} µs (median of {ROUNDS})", median(cpu_per_line)),
        );
    }
    let at = Some((RATE, LATENCY_SECS));
    let b = mosquitto_bridge(1, at).await?;
    let s = lichen_stdout(1, at, 100).await?;
    let g = lichen_gateway(1, at, 100).await?;
    let (_, bridge_p99, _) = latency(&b.samples, RATE);
    for (name, o) in [("module stdout", &s), ("gateway", &g)] {
        let (p50, p99, n) = latency(&o.samples, RATE);
        report.aim(
            SECTION,
            format!(
                "Lichen {name} at {RATE} msg/s, QoS 1: latency p99 (p50; the bridge's p99 in the same run)"
            ),
            format!("{p99:.2} ms ({p50:.2} ms; {bridge_p99:.2} ms; {n} messages, {})", written(o)),
            "≤ 5 ms",
            p99 <= Duration::from_millis(5).as_secs_f64() * 1000.0,
        );
    }
    Ok(())
}

/// How many of the run's messages the spool wrote to the disk (the rest were acknowledged first).
fn written(o: &Outcome) -> String {
    let w = o.agent_mqtt.as_ref().and_then(|m| m["spool"]["written"].as_u64());
    match w {
        Some(w) => format!("{w} written to the spool"),
        None => "spool writes not reported".into(),
    }
}
