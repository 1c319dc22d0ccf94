//! QoS 1 under the default per-pod rate limit: a module printing 10,000 lines as fast as it can
//! (`tests/fixtures/counter.wat`) to a QoS 1 topic, through a Mosquitto restart mid-stream, with the
//! default `[mqtt]` settings (100 lines/s after a burst of 1,000). Every line must arrive, in order:
//! the limit slows the module instead of dropping its lines. Needs Debian's mosquitto.

use std::time::{Duration, Instant};

use lichen_tests::mosquitto::{Mosquitto, Subscriber, check_in_order};
use lichen_tests::{Scratch, fixture, pod_yaml, wait_for};

use crate::report::Report;

const SECTION: &str = "qos1";
const COUNT: u64 = 10_000;
const TOPIC: &str = "bench/test-node/counter-test-node";

pub async fn run(report: &mut Report) {
    if std::process::Command::new("mosquitto").arg("-h").output().is_err() {
        return report.skipped(SECTION, "no mosquitto on the PATH (apt install mosquitto)");
    }
    let mut broker = Mosquitto::start();
    let sub = Subscriber::connect(broker.port, "qos-bench", "bench/#");
    // Only the broker and quick reconnects: every other [mqtt] setting is the default.
    let s = Scratch::new(&format!(
        "[mqtt]\nbroker = {:?}\nreconnect_min_ms = 100\nreconnect_max_ms = 1000\ntelemetry_interval_secs = 0\n",
        broker.url()
    ));
    let agent = s.start();
    s.wait_running(Duration::from_secs(60));
    wait_for(Duration::from_secs(60), "the agent connected to the broker", || {
        (s.status_json()["mqtt"]["bridge"]["connected"] == true).then_some(())
    });
    let yaml = pod_yaml("counter", &fixture("counter.wat"), "  restartPolicy: Never\n").replace(
        "metadata:\n  name:",
        "metadata:\n  annotations:\n    lichen.dev/mqtt-publish: \"bench/{node}/{pod}\"\n  name:",
    );
    let start = Instant::now();
    s.put_pod("counter.yaml", &yaml);
    wait_for(Duration::from_secs(60), "the burst and then some", || {
        (sub.texts(TOPIC).len() >= 1_500).then_some(())
    });
    broker.restart();
    let at_restart = sub.texts(TOPIC).len();
    // 9,000 lines at 100 a second after the burst: about 90 s.
    wait_for(Duration::from_secs(300), "all 10,000 lines", || check_in_order(&sub.texts(TOPIC), COUNT).ok());
    let took = start.elapsed();
    let texts = sub.texts(TOPIC);
    let arrived = check_in_order(&texts, COUNT).map(|dups| texts.len() - dups).unwrap_or(0);
    let bridge = s.status_json()["mqtt"]["bridge"].clone();
    report.aim(
        SECTION,
        "10,000 QoS 1 lines at full speed, default rate limit, broker restarted mid-stream: arrived in order",
        format!("{arrived} of {COUNT} ({at_restart} before the restart)"),
        "all",
        arrived as u64 == COUNT,
    );
    report.info(
        SECTION,
        "… time for all of them (the limit's 100/s after the 1,000 burst makes ≥ 90 s)",
        format!(
            "{:.1} s; throttled {}, dropped by the rate limit {}",
            took.as_secs_f64(),
            bridge["throttled"],
            bridge["dropped_rate"]
        ),
    );
    drop(agent);
}
