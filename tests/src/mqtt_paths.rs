//! The MQTT paths the benchmarks compare, each set up with real Mosquitto brokers on loopback and
//! driven by an in-process rumqttc publisher and subscriber: the load generator's ceiling, a
//! Mosquitto bridge, Lichen's module-stdout path and Lichen's gateway. Shared by the `mqtt` bench
//! (every path, both QoS levels) and the `edge` bench (QoS 1 against the bridge, beside its aim).
//!
//! Every message is `<seq> <unix ns>`, about 30 bytes: the subscriber records when each arrived, so
//! a run gives both throughput (distinct messages over the time from the first arrival to the last)
//! and latency (from the time its producer wrote into it to its arrival, same machine clock).
//! The agent runs with the environment its systemd unit gives it on a board
//! ([`crate::service_environment`]).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::mosquitto::Mosquitto;
use crate::{Agent, Scratch, fixture, percentile};

/// Messages per throughput run.
pub const COUNT: u64 = 100_000;
/// A run that receives nothing new for this long is over.
const IDLE: Duration = Duration::from_secs(5);
const T: Duration = Duration::from_secs(60);

/// One received message: its sequence number, when it was produced, when it arrived (unix ns).
pub type Sample = (u64, u64, u64);

/// A path that never delivered, or whose set-up never finished: what was missing and, for a
/// Lichen path, what the agent logged.
#[derive(Debug)]
pub struct PathFailed {
    /// What never happened.
    pub what: String,
    /// Everything the agent logged, for a Lichen path.
    pub agent_log: Vec<String>,
}

impl std::fmt::Display for PathFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.what)?;
        if !self.agent_log.is_empty() {
            write!(f, "; the agent logged:\n{}", self.agent_log.join("\n"))?;
        }
        Ok(())
    }
}

impl std::error::Error for PathFailed {}

fn failed(what: &str, agent: Option<&Agent>) -> PathFailed {
    PathFailed { what: what.to_owned(), agent_log: agent.map(Agent::log).unwrap_or_default() }
}

/// What one path did.
#[derive(Debug, Clone)]
pub struct Run {
    /// The path, as the tables name it.
    pub path: &'static str,
    /// The QoS of the messages, 0 or 1.
    pub q: u8,
    /// Messages the producer sent.
    pub sent: u64,
    /// Distinct messages the subscriber received.
    pub received: u64,
    /// Distinct messages a second, from the first arrival to the last.
    pub rate: f64,
}

/// A run of one path with what it measured besides throughput.
#[derive(Debug)]
pub struct Outcome {
    /// What went through.
    pub run: Run,
    /// Every message the subscriber received.
    pub samples: Vec<Sample>,
    /// A Lichen path's `mqtt` object from `lichen status --json` at the end of the run.
    pub agent_mqtt: Option<serde_json::Value>,
    /// The CPU time (user and system) the agent used over its whole life, read just before it
    /// was stopped.
    pub agent_cpu: Option<Duration>,
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

fn qos(n: u8) -> QoS {
    if n == 0 { QoS::AtMostOnce } else { QoS::AtLeastOnce }
}

/// A subscriber recording every `<seq> <ns>` message on a filter.
struct Collector {
    samples: Arc<Mutex<Vec<Sample>>>,
    _client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    async fn connect(port: u16, id: &str, filter: &str, q: u8) -> Result<Collector, PathFailed> {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30)).set_clean_session(true).set_inflight(100);
        let (client, mut ev) = AsyncClient::new(o, 1000);
        let samples: Arc<Mutex<Vec<Sample>>> = Arc::new(Mutex::new(Vec::with_capacity(COUNT as usize)));
        let (sink, (tx, rx)) = (samples.clone(), tokio::sync::oneshot::channel::<()>());
        client.subscribe(filter, qos(q)).await.map_err(|e| failed(&format!("subscribe: {e}"), None))?;
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
        match tokio::time::timeout(T, rx).await {
            Ok(Ok(())) => Ok(Collector { samples, _client: client, task }),
            _ => Err(failed("the bench subscriber got no SUBACK in 60 s", None)),
        }
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
async fn load(
    port: u16,
    id: &str,
    topic: &str,
    q: u8,
    count: u64,
    interval: Duration,
) -> Result<(), PathFailed> {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30)).set_clean_session(true).set_inflight(100);
    let (client, mut ev) = AsyncClient::new(o, 1000);
    let done = Arc::new(AtomicU64::new(0));
    let acks = done.clone();
    let poller = tokio::spawn(async move {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_)))
                | Ok(Event::Outgoing(rumqttc::Outgoing::Publish(_))) => {
                    acks.fetch_add(1, Ordering::Relaxed);
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
        if let Err(e) = client.publish(topic, qos(q), false, payload).await {
            poller.abort();
            return Err(failed(&format!("the bench publisher could not queue message {seq}: {e}"), None));
        }
    }
    // QoS 1: until acknowledged; QoS 0: until written (each publish counts once either way, and a
    // QoS 1 one twice).
    let want = if q == 0 { count } else { count * 2 };
    let t0 = Instant::now();
    while done.load(Ordering::Relaxed) < want && t0.elapsed() < T {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = client.disconnect().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    poller.abort();
    Ok(())
}

/// Throughput of a run: (distinct messages, msg/s from the first arrival to the last).
pub fn throughput(samples: &[Sample]) -> (u64, f64) {
    let distinct = samples.iter().map(|s| s.0).collect::<HashSet<_>>().len() as u64;
    let (first, last) = match (samples.iter().map(|s| s.2).min(), samples.iter().map(|s| s.2).max()) {
        (Some(a), Some(b)) if b > a => (a, b),
        _ => return (distinct, 0.0),
    };
    (distinct, (distinct.saturating_sub(1)) as f64 / ((last - first) as f64 / 1e9))
}

/// p50 and p99 latency in ms of a run at `rate` msg/s, without its first second (warm-up), and
/// the number of messages counted.
pub fn latency(samples: &[Sample], rate: u64) -> (f64, f64, usize) {
    let mut v: Vec<Duration> = samples
        .iter()
        .filter(|s| s.0 >= rate)
        .map(|s| Duration::from_nanos(s.2.saturating_sub(s.1)))
        .collect();
    v.sort();
    if v.is_empty() {
        return (f64::NAN, f64::NAN, 0);
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    (ms(percentile(&v, 0.5)), ms(percentile(&v, 0.99)), v.len())
}

/// A Lichen config for the bench: no node telemetry, the pod rate limit off (it would hold a
/// module to 100 lines a second), `inflight` QoS 1 messages in flight (the default is 100).
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

/// How many messages a run sends, and how far apart: [`COUNT`] as fast as possible, or `rate` a
/// second for `secs`.
fn plan(rate: Option<(u64, u64)>) -> (u64, Duration) {
    match rate {
        Some((r, secs)) => (r * secs, Duration::from_nanos(1_000_000_000 / r)),
        None => (COUNT, Duration::ZERO),
    }
}

/// The agent's CPU time so far (utime + stime from `/proc/<pid>/stat`; Linux counts them in
/// USER_HZ, 100 a second on every architecture it exports to user space).
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, field 2, is in parentheses and may hold spaces: count from after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// Publisher -> one broker -> subscriber, both in this process: the most any path can show here.
pub async fn ceiling(q: u8) -> Result<Run, PathFailed> {
    let broker = Mosquitto::start();
    let sub = Collector::connect(broker.port, "bench-sub", "bench/#", q).await?;
    load(broker.port, "bench-load", "bench/x", q, COUNT, Duration::ZERO).await?;
    let (received, rate) = throughput(&sub.wait(COUNT).await);
    Ok(Run {
        path: "load generator ceiling (publisher -> broker -> subscriber)",
        q,
        sent: COUNT,
        received,
        rate,
    })
}

fn bridge_config(upstream: u16, q: u8) -> String {
    format!(
        "connection bench\naddress 127.0.0.1:{upstream}\ntopic bench/# in {q}\ncleansession false\n\
         bridge_protocol_version mqttv311\ntry_private true\nrestart_timeout 1\n"
    )
}

/// Waits until a probe published on `from` arrives at `sub` (a bridge or gateway is up).
async fn until_forwarded(from: u16, sub: &Collector, agent: Option<&Agent>) -> Result<(), PathFailed> {
    let t0 = Instant::now();
    while sub.samples.lock().expect("samples").is_empty() {
        if t0.elapsed() > T {
            return Err(failed("the bridge never forwarded a probe in 60 s", agent));
        }
        load(from, "bench-probe", "bench/probe", 1, 1, Duration::ZERO).await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sub.samples.lock().expect("samples").clear();
    Ok(())
}

/// Publisher -> broker A -> bridge (broker B's `connection`, `topic bench/# in <q>`) -> broker B
/// -> subscriber. `rate`: (messages a second, seconds), or [`COUNT`] as fast as possible.
pub async fn mosquitto_bridge(q: u8, rate: Option<(u64, u64)>) -> Result<Outcome, PathFailed> {
    let a = Mosquitto::start();
    let b = Mosquitto::start_with(&bridge_config(a.port, q));
    let sub = Collector::connect(b.port, "bench-sub", "bench/#", q).await?;
    until_forwarded(a.port, &sub, None).await?;
    let (count, interval) = plan(rate);
    load(a.port, "bench-load", "bench/x", q, count, interval).await?;
    let samples = sub.wait(count).await;
    let (received, r) = throughput(&samples);
    let run = Run {
        path: "Mosquitto bridge (publisher -> A -> bridge -> B -> subscriber)",
        q,
        sent: count,
        received,
        rate: r,
    };
    Ok(Outcome { run, samples, agent_mqtt: None, agent_cpu: None })
}

/// `tests/fixtures/ticker.wat` printing lines (as fast as it can, or at `rate`) -> Lichen's
/// module-output path (QoS 1 through the spool) -> broker -> subscriber.
pub async fn lichen_stdout(q: u8, rate: Option<(u64, u64)>, inflight: u16) -> Result<Outcome, PathFailed> {
    let broker = Mosquitto::start();
    let sub = Collector::connect(broker.port, "bench-sub", "bench/#", q).await?;
    let s = Scratch::new(&lichen_config(&broker.url(), inflight, ""));
    let agent = s.start_as_service();
    agent.wait_log(&["connected to the MQTT broker"], T);
    let (count, interval) = plan(rate);
    s.put_pod("ticker.yaml", &ticker_pod(q, interval.as_micros() as u64, count));
    let path = if inflight == 100 {
        "Lichen, module stdout (spool on) -> broker -> subscriber"
    } else {
        "Lichen, module stdout (spool on), inflight 1000"
    };
    let run = Run { path, q, sent: count, received: 0, rate: 0.0 };
    lichen_outcome(run, sub.wait(count).await, &s, agent, "no message from the module reached the subscriber")
}

/// Publisher -> local broker -> Lichen's gateway (QoS 1 through the spool) -> upstream broker ->
/// subscriber: the same work as the Mosquitto bridge.
pub async fn lichen_gateway(q: u8, rate: Option<(u64, u64)>, inflight: u16) -> Result<Outcome, PathFailed> {
    let upstream = Mosquitto::start();
    let local = Mosquitto::start();
    let sub = Collector::connect(upstream.port, "bench-sub", "up/bench/#", q).await?;
    let gw = format!(
        "[mqtt.gateway]\nlocal_broker = {:?}\nmappings = [{{ local = \"bench/#\", upstream_prefix = \"up/\", direction = \"up\" }}]\n",
        local.url()
    );
    let s = Scratch::new(&lichen_config(&upstream.url(), inflight, &gw));
    let agent = s.start_as_service();
    agent.wait_log(&["gateway: connected to the local MQTT broker"], T);
    agent.wait_log(&["connected to the MQTT broker"], T);
    until_forwarded(local.port, &sub, Some(&agent)).await?;
    let (count, interval) = plan(rate);
    load(local.port, "bench-load", "bench/x", q, count, interval).await?;
    let path = if inflight == 100 {
        "Lichen gateway (publisher -> local -> Lichen, spool on -> upstream -> subscriber)"
    } else {
        "Lichen gateway (spool on), inflight 1000"
    };
    let run = Run { path, q, sent: count, received: 0, rate: 0.0 };
    lichen_outcome(
        run,
        sub.wait(count).await,
        &s,
        agent,
        "no message through the gateway reached the subscriber",
    )
}

/// The end of a Lichen path's run: its throughput from `samples`, the agent's MQTT status and CPU
/// time, and the agent stopped. A run that delivered nothing fails with `nothing` and the log.
fn lichen_outcome(
    mut run: Run,
    samples: Vec<Sample>,
    s: &Scratch,
    agent: Agent,
    nothing: &str,
) -> Result<Outcome, PathFailed> {
    (run.received, run.rate) = throughput(&samples);
    if run.received == 0 {
        return Err(failed(nothing, Some(&agent)));
    }
    let agent_mqtt = Some(s.status_json()["mqtt"].clone());
    let agent_cpu = cpu_time(agent.pid());
    let _ = agent.stop();
    Ok(Outcome { run, samples, agent_mqtt, agent_cpu })
}
