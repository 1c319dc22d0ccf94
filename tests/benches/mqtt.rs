//! MQTT benchmark: Lichen's telemetry paths beside a Mosquitto bridge doing the same work, with the
//! release binary and real Mosquitto 2.0 brokers on loopback.
//!
//! ```text
//! cargo build --release -p lichen
//! cargo bench -p lichen-tests --bench mqtt
//! ```
//!
//! The bench finds `target/release/lichen` beside itself; `LICHEN_BIN` names another binary (an
//! absolute path: cargo runs benches in `tests/`).
//!
//! Paths, each at QoS 0 and QoS 1, [`COUNT`] messages of about 30 bytes (`<seq> <unix ns>`):
//! - **load generator ceiling**: a publisher (rumqttc, in this process, as fast as it can with 100
//!   in flight) -> one broker -> a subscriber (rumqttc, in this process). Everything below shares
//!   the machine's cores with these two, so this is the most any path can show here.
//! - **Mosquitto bridge**: publisher -> broker A -> bridge (broker B's `connection`, `topic bench/#
//!   in <qos>`) -> broker B -> subscriber.
//! - **Lichen, module stdout**: `tests/fixtures/ticker.wat` printing lines as fast as it can ->
//!   Lichen (QoS 1 through the spool, group commit 5 ms / 256, fsync on) -> broker -> subscriber.
//! - **Lichen gateway**: publisher -> local broker -> Lichen's gateway (QoS 1 through the spool)
//!   -> upstream broker -> subscriber: the same work as the Mosquitto bridge.
//!
//! Throughput is distinct messages received over the time from the first to the last. Latency is
//! measured at a fixed [`RATE`] msg/s for [`LATENCY_SECS`] s, QoS 1: from the time written into the
//! message by its producer (the module's `clock_time_get`, or the publisher) to its arrival at the
//! subscriber, same machine clock; the first second is warm-up and not counted.
//!
//! `mqtt.pod_rate_limit` defaults to 100 msg/s per pod; the bench sets it to 0 (unlimited), or
//! the module would be held to 100 msg/s. Everything else is the default configuration
//! (`inflight` 100), plus one QoS 1 run of each Lichen path with `inflight = 1000`.
//!
//! It prints figures and a Markdown table, and exits non-zero only if a path never delivers. Names
//! after `--` limit a run to some parts: `ceiling`, `bridge`, `stdout`, `gateway`, `latency`.

use lichen_tests::mqtt_paths::{
    COUNT, Outcome, PathFailed, Run, ceiling, latency, lichen_gateway, lichen_stdout, mosquitto_bridge,
};

/// The fixed rate of the latency runs.
const RATE: u64 = 5_000;
const LATENCY_SECS: u64 = 6;

/// A path's outcome, or the end of the run: a path that never delivered leaves nothing to compare.
fn ok<T>(r: Result<T, PathFailed>) -> T {
    r.unwrap_or_else(|e| {
        eprintln!("mqtt bench FAILED: {e}");
        std::process::exit(1)
    })
}

/// The parts a run can be limited to (`cargo bench -p lichen-tests --bench mqtt -- stdout`).
const PARTS: [&str; 5] = ["ceiling", "bridge", "stdout", "gateway", "latency"];

fn main() {
    let wanted: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    if let Some(w) = wanted.iter().find(|w| !PARTS.contains(&w.as_str())) {
        eprintln!("unknown part {w:?}; the parts are: {}", PARTS.join(", "));
        std::process::exit(2);
    }
    let on = |part: &str| wanted.is_empty() || wanted.iter().any(|w| w == part);
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio");
    rt.block_on(async {
        // (path, QoS 0, QoS 1) in the order of the table.
        let mut runs: Vec<(Option<Run>, Run)> = Vec::new();
        let both = |a: Run, b: Run| (Some(a), b);
        if on("ceiling") {
            runs.push(both(ok(ceiling(0).await), ok(ceiling(1).await)));
        }
        if on("bridge") {
            runs.push(both(ok(mosquitto_bridge(0, None).await).run, ok(mosquitto_bridge(1, None).await).run));
        }
        // What the agent's status said at the end of a Lichen run: its spool and session counters.
        let said = |o: &Outcome| o.agent_mqtt.as_ref().map(|m| m.to_string()).unwrap_or_default();
        if on("stdout") {
            let a = ok(lichen_stdout(0, None, 100).await);
            let b = ok(lichen_stdout(1, None, 100).await);
            eprintln!("lichen stdout: QoS 0 {}\nQoS 1 {}", said(&a), said(&b));
            runs.push(both(a.run, b.run));
            runs.push((None, ok(lichen_stdout(1, None, 1000).await).run));
        }
        if on("gateway") {
            let a = ok(lichen_gateway(0, None, 100).await);
            let b = ok(lichen_gateway(1, None, 100).await);
            eprintln!("lichen gateway: QoS 0 {}\nQoS 1 {}", said(&a), said(&b));
            runs.push(both(a.run, b.run));
            runs.push((None, ok(lichen_gateway(1, None, 1000).await).run));
        }
        println!(
            "\nthroughput, {COUNT} messages per run (distinct messages received / time from first to last):"
        );
        for r in runs.iter().flat_map(|(a, b)| a.iter().chain(std::iter::once(b))) {
            println!(
                "  QoS {} {:<86} {:>9.0} msg/s  ({} of {} received)",
                r.q, r.path, r.rate, r.received, r.sent
            );
        }
        let mut lat = Vec::new();
        if on("latency") {
            let at = Some((RATE, LATENCY_SECS));
            let o = ok(mosquitto_bridge(1, at).await);
            lat.push(("Mosquitto bridge", latency(&o.samples, RATE)));
            let o = ok(lichen_stdout(1, at, 100).await);
            eprintln!("lichen stdout at {RATE} msg/s: {}", said(&o));
            lat.push(("Lichen, module stdout", latency(&o.samples, RATE)));
            let o = ok(lichen_gateway(1, at, 100).await);
            eprintln!("lichen gateway at {RATE} msg/s: {}", said(&o));
            lat.push(("Lichen gateway", latency(&o.samples, RATE)));
        }
        println!("\nlatency at {RATE} msg/s, QoS 1, {LATENCY_SECS} s (first second not counted):");
        for (path, (p50, p99, n)) in &lat {
            println!("  {path:<24} p50 {p50:.2} ms  p99 {p99:.2} ms  ({n} messages)");
        }
        println!("\n| path | QoS 0 msg/s | QoS 1 msg/s |\n|---|---|---|");
        for (a, b) in &runs {
            let q0 = a.as_ref().map_or_else(|| "".to_string(), |a| format!("{:.0}", a.rate));
            println!("| {} | {q0} | {:.0} |", b.path, b.rate);
        }
        println!("\n| at {RATE} msg/s, QoS 1 | p50 | p99 |\n|---|---|---|");
        for (path, (p50, p99, _)) in &lat {
            println!("| {path} | {p50:.2} ms | {p99:.2} ms |");
        }
    });
}
