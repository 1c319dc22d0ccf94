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

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lichen_tests::mosquitto::Mosquitto;
use lichen_tests::{Agent, Scratch, fixture, percentile};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// Messages per throughput run.
const COUNT: u64 = 100_000;
/// The fixed rate of the latency runs.
const RATE: u64 = 5_000;
const LATENCY_SECS: u64 = 6;
/// A run that receives nothing new for this long is over.
const IDLE: Duration = Duration::from_secs(5);
const T: Duration = Duration::from_secs(60);

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

fn qos(n: u8) -> QoS {
    if n == 0 { QoS::AtMostOnce } else { QoS::AtLeastOnce }
}

/// One received message: its sequence number, when it was produced, when it arrived (unix ns).
type Sample = (u64, u64, u64);

/// A subscriber recording every `<seq> <ns>` message on a filter.
struct Collector {
    samples: Arc<Mutex<Vec<Sample>>>,
    _client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    async fn connect(port: u16, id: &str, filter: &str, q: u8) -> Collector {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30)).set_clean_session(true).set_inflight(100);
        let (client, mut ev) = AsyncClient::new(o, 1000);
        let samples: Arc<Mutex<Vec<Sample>>> = Arc::new(Mutex::new(Vec::with_capacity(COUNT as usize)));
        let (sink, (tx, rx)) = (samples.clone(), tokio::sync::oneshot::channel::<()>());
        client.subscribe(filter, qos(q)).await.expect("subscribe");
        let task = tokio::spawn(async move {
            let mut tx = Some(tx);
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let at = now_ns();
                        let text = std::str::from_utf8(&p.payload).unwrap_or("");
                        let mut parts = text.split(' ');
                        let seq = parts.next().and_then(|s| s.parse().ok());
                        let sent = parts.next().and_then(|s| s.trim().parse().ok());
                        if let (Some(seq), Some(sent)) = (seq, sent) {
                            sink.lock().expect("samples").push((seq, sent, at));
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("bench subscriber: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        tokio::time::timeout(T, rx).await.expect("SUBACK in time").expect("SUBACK");
        Collector { samples, _client: client, task }
    }

    /// Waits until `count` distinct messages arrived or nothing new came for [`IDLE`]; returns the
    /// samples.
    async fn wait(&self, count: u64) -> Vec<Sample> {
        let (mut last_len, mut last_change) = (0, Instant::now());
        loop {
            let len = self.samples.lock().expect("samples").len();
            if len != last_len {
                (last_len, last_change) = (len, Instant::now());
            }
            let distinct = if len as u64 >= count {
                self.samples.lock().expect("samples").iter().map(|s| s.0).collect::<HashSet<_>>().len() as u64
            } else {
                0
            };
            if distinct >= count || last_change.elapsed() > IDLE {
                return self.samples.lock().expect("samples").clone();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Publishes `count` messages on `topic`: as fast as it can with `interval` zero, else one every
/// `interval` (each carrying the time it was published).
async fn load(port: u16, id: &str, topic: &str, q: u8, count: u64, interval: Duration) {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30)).set_clean_session(true).set_inflight(100);
    let (client, mut ev) = AsyncClient::new(o, 1000);
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let acks = done.clone();
    let poller = tokio::spawn(async move {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_)))
                | Ok(Event::Outgoing(rumqttc::Outgoing::Publish(_))) => {
                    acks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                // Disconnected on purpose: the run is over.
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                Ok(_) => {}
                Err(e) => {
                    eprintln!("bench publisher: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    let start = tokio::time::Instant::now();
    for seq in 0..count {
        if !interval.is_zero() {
            tokio::time::sleep_until(start + interval * seq as u32).await;
        }
        let payload = format!("{seq} {}", now_ns());
        client.publish(topic, qos(q), false, payload).await.expect("publish");
    }
    // QoS 1: until acknowledged; QoS 0: until written (each publish counts once either way, and a
    // QoS 1 one twice).
    let want = if q == 0 { count } else { count * 2 };
    let t0 = Instant::now();
    while done.load(std::sync::atomic::Ordering::Relaxed) < want && t0.elapsed() < T {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = client.disconnect().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    poller.abort();
}

/// Throughput of a run: (distinct messages, msg/s from the first arrival to the last).
fn throughput(samples: &[Sample]) -> (u64, f64) {
    let distinct = samples.iter().map(|s| s.0).collect::<HashSet<_>>().len() as u64;
    let (first, last) = match (samples.iter().map(|s| s.2).min(), samples.iter().map(|s| s.2).max()) {
        (Some(a), Some(b)) if b > a => (a, b),
        _ => return (distinct, 0.0),
    };
    (distinct, (distinct.saturating_sub(1)) as f64 / ((last - first) as f64 / 1e9))
}

/// p50 and p99 latency in ms, after the first second.
fn latency(samples: &[Sample]) -> (f64, f64, usize) {
    let mut v: Vec<Duration> = samples
        .iter()
        .filter(|s| s.0 >= RATE)
        .map(|s| Duration::from_nanos(s.2.saturating_sub(s.1)))
        .collect();
    v.sort();
    if v.is_empty() {
        return (f64::NAN, f64::NAN, 0);
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    (ms(percentile(&v, 0.5)), ms(percentile(&v, 0.99)), v.len())
}

fn fail(what: &str, agent: Option<&Agent>) -> ! {
    eprintln!("mqtt bench FAILED: {what}");
    if let Some(a) = agent {
        eprintln!("the agent logged:\n{}", a.log().join("\n"));
        // `exit` runs no destructors: stop the agent here.
        let _ = std::process::Command::new("kill").args(["-KILL", &a.pid().to_string()]).status();
    }
    std::process::exit(1);
}

/// A Lichen config for the bench: no node telemetry, the pod rate limit off, `inflight` QoS 1
/// messages in flight (the default is 100).
fn lichen_config(broker: &str, inflight: u16, extra: &str) -> String {
    format!(
        "[mqtt]\nbroker = {broker:?}\ntelemetry_interval_secs = 0\npod_rate_limit = 0\nreconnect_min_ms = 100\ninflight = {inflight}\n{extra}"
    )
}

fn ticker_pod(q: u8, interval_us: u64, count: u64) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: ticker\n  annotations:\n    lichen.dev/mqtt-publish: \"bench/{{pod}}\"\n    \
         lichen.dev/mqtt-qos: \"{q}\"\nspec:\n  restartPolicy: Never\n  containers:\n  - name: main\n    image: file://{}\n    \
         args: [\"{interval_us}\", \"{count}\"]\n",
        fixture("ticker.wat").display()
    )
}

/// What one path did.
struct Run {
    path: &'static str,
    q: u8,
    sent: u64,
    received: u64,
    rate: f64,
}

async fn ceiling(q: u8) -> Run {
    let broker = Mosquitto::start();
    let sub = Collector::connect(broker.port, "bench-sub", "bench/#", q).await;
    load(broker.port, "bench-load", "bench/x", q, COUNT, Duration::ZERO).await;
    let (received, rate) = throughput(&sub.wait(COUNT).await);
    Run { path: "load generator ceiling (publisher -> broker -> subscriber)", q, sent: COUNT, received, rate }
}

fn bridge_config(upstream: u16, q: u8) -> String {
    format!(
        "connection bench\naddress 127.0.0.1:{upstream}\ntopic bench/# in {q}\ncleansession false\n\
         bridge_protocol_version mqttv311\ntry_private true\nrestart_timeout 1\n"
    )
}

/// Waits until a probe published on `from` arrives at `sub` (a bridge or gateway is up).
async fn until_forwarded(from: u16, sub: &Collector) {
    let t0 = Instant::now();
    while sub.samples.lock().expect("samples").is_empty() {
        if t0.elapsed() > T {
            fail("the bridge never forwarded a probe", None);
        }
        load(from, "bench-probe", "bench/probe", 1, 1, Duration::ZERO).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sub.samples.lock().expect("samples").clear();
}

async fn mosquitto_bridge(q: u8, rate: Option<u64>) -> (Run, Vec<Sample>) {
    let a = Mosquitto::start();
    let b = Mosquitto::start_with(&bridge_config(a.port, q));
    let sub = Collector::connect(b.port, "bench-sub", "bench/#", q).await;
    until_forwarded(a.port, &sub).await;
    let (count, interval) = match rate {
        Some(r) => (r * LATENCY_SECS, Duration::from_nanos(1_000_000_000 / r)),
        None => (COUNT, Duration::ZERO),
    };
    load(a.port, "bench-load", "bench/x", q, count, interval).await;
    let samples = sub.wait(count).await;
    let (received, r) = throughput(&samples);
    (
        Run {
            path: "Mosquitto bridge (publisher -> A -> bridge -> B -> subscriber)",
            q,
            sent: count,
            received,
            rate: r,
        },
        samples,
    )
}

async fn lichen_stdout(q: u8, rate: Option<u64>, inflight: u16) -> (Run, Vec<Sample>, String) {
    let broker = Mosquitto::start();
    let sub = Collector::connect(broker.port, "bench-sub", "bench/#", q).await;
    let s = Scratch::new(&lichen_config(&broker.url(), inflight, ""));
    let agent = s.start();
    agent.wait_log(&["connected to the MQTT broker"], T);
    let (count, interval_us) = match rate {
        Some(r) => (r * LATENCY_SECS, 1_000_000 / r),
        None => (COUNT, 0),
    };
    s.put_pod("ticker.yaml", &ticker_pod(q, interval_us, count));
    let samples = sub.wait(count).await;
    let (received, r) = throughput(&samples);
    if received == 0 {
        fail("no message from the module reached the subscriber", Some(&agent));
    }
    let status = s.status_json()["mqtt"].to_string();
    let _ = agent.stop();
    (
        Run {
            path: if inflight == 100 {
                "Lichen, module stdout (spool on) -> broker -> subscriber"
            } else {
                "Lichen, module stdout (spool on), inflight 1000"
            },
            q,
            sent: count,
            received,
            rate: r,
        },
        samples,
        status,
    )
}

async fn lichen_gateway(q: u8, rate: Option<u64>, inflight: u16) -> (Run, Vec<Sample>, String) {
    let upstream = Mosquitto::start();
    let local = Mosquitto::start();
    let sub = Collector::connect(upstream.port, "bench-sub", "up/bench/#", q).await;
    let gw = format!(
        "[mqtt.gateway]\nlocal_broker = {:?}\nmappings = [{{ local = \"bench/#\", upstream_prefix = \"up/\", direction = \"up\" }}]\n",
        local.url()
    );
    let s = Scratch::new(&lichen_config(&upstream.url(), inflight, &gw));
    let agent = s.start();
    agent.wait_log(&["gateway: connected to the local MQTT broker"], T);
    agent.wait_log(&["connected to the MQTT broker"], T);
    until_forwarded(local.port, &sub).await;
    let (count, interval) = match rate {
        Some(r) => (r * LATENCY_SECS, Duration::from_nanos(1_000_000_000 / r)),
        None => (COUNT, Duration::ZERO),
    };
    load(local.port, "bench-load", "bench/x", q, count, interval).await;
    let samples = sub.wait(count).await;
    let (received, r) = throughput(&samples);
    if received == 0 {
        fail("no message through the gateway reached the subscriber", Some(&agent));
    }
    let status = s.status_json()["mqtt"].to_string();
    let _ = agent.stop();
    (
        Run {
            path: if inflight == 100 {
                "Lichen gateway (publisher -> local -> Lichen, spool on -> upstream -> subscriber)"
            } else {
                "Lichen gateway (spool on), inflight 1000"
            },
            q,
            sent: count,
            received,
            rate: r,
        },
        samples,
        status,
    )
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
            runs.push(both(ceiling(0).await, ceiling(1).await));
        }
        if on("bridge") {
            runs.push(both(mosquitto_bridge(0, None).await.0, mosquitto_bridge(1, None).await.0));
        }
        if on("stdout") {
            let (a, _, s0) = lichen_stdout(0, None, 100).await;
            let (b, _, s1) = lichen_stdout(1, None, 100).await;
            eprintln!("lichen stdout: QoS 0 {s0}\nQoS 1 {s1}");
            runs.push(both(a, b));
            runs.push((None, lichen_stdout(1, None, 1000).await.0));
        }
        if on("gateway") {
            let (a, _, s0) = lichen_gateway(0, None, 100).await;
            let (b, _, s1) = lichen_gateway(1, None, 100).await;
            eprintln!("lichen gateway: QoS 0 {s0}\nQoS 1 {s1}");
            runs.push(both(a, b));
            runs.push((None, lichen_gateway(1, None, 1000).await.0));
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
            let (_, s) = mosquitto_bridge(1, Some(RATE)).await;
            lat.push(("Mosquitto bridge", latency(&s)));
            let (_, s, st) = lichen_stdout(1, Some(RATE), 100).await;
            eprintln!("lichen stdout at {RATE} msg/s: {st}");
            lat.push(("Lichen, module stdout", latency(&s)));
            let (_, s, st) = lichen_gateway(1, Some(RATE), 100).await;
            eprintln!("lichen gateway at {RATE} msg/s: {st}");
            lat.push(("Lichen gateway", latency(&s)));
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
