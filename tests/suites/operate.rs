//! Operating a node: `/healthz` and `/metrics` of the real binary, scraped while static pods run,
//! succeed, run out of fuel and restart, and parsed with a Prometheus text-format parser.

use std::io::{Read, Write};
use std::time::Duration;

use lichen_tests::{Scratch, fixture, free_port, pod_yaml, wait_for};

const T: Duration = Duration::from_secs(60);

/// `GET path` over plain HTTP/1.0: (status code, body).
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_owned()))
}

/// The scrape, parsed: every sample as (name, labels, value).
fn scrape(port: u16) -> Vec<(String, std::collections::BTreeMap<String, String>, f64)> {
    let (code, body) = get(port, "/metrics").expect("scrape");
    assert_eq!(code, 200, "{body}");
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    let parsed = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
    parsed
        .samples
        .into_iter()
        .map(|s| {
            let v = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                prometheus_parse::Value::Histogram(h) => h.iter().map(|c| c.count).fold(0.0, f64::max),
                prometheus_parse::Value::Summary(_) => f64::NAN,
            };
            let labels = s.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            (s.metric, labels, v)
        })
        .collect()
}

fn value(
    samples: &[(String, std::collections::BTreeMap<String, String>, f64)],
    name: &str,
    label: Option<(&str, &str)>,
) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| n == name && label.is_none_or(|(k, v)| l.get(k).map(String::as_str) == Some(v)))
        .map(|s| s.2)
}

#[test]
fn metrics_follow_the_pods_and_healthz_reports_the_parts() {
    let s = Scratch::new("");
    let fuel = "  restartPolicy: Never\n";
    s.put_pod("hello.yaml", &pod_yaml("hello", &fixture("hello.wat"), "  restartPolicy: Never\n"));
    s.put_pod("idle.yaml", &pod_yaml("idle", &fixture("sleeper.wat"), ""));
    let spin = pod_yaml("spin", &fixture("loop.wat"), fuel)
        .replace("metadata:", "metadata:\n  annotations: {lichen.dev/fuel: \"2000000\"}");
    s.put_pod("spin.yaml", &spin);
    // Exits non-zero at once: restarted with back-off (10 s, then 20 s).
    s.put_pod("exit.yaml", &pod_yaml("exit", &fixture("exit.wat"), "  restartPolicy: Always\n"));
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let mut args = s.run_args();
    args.extend(["--metrics-address".to_owned(), address]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = lichen_tests::Agent::start(&args, &s.state);
    wait_for(T, "the metrics endpoint to accept connections", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });

    // `exit` is Running too (between its restarts), so the phases alone do not say that `idle`
    // has started: wait for its memory series as well.
    let first = wait_for(T, "hello Succeeded, spin Failed and idle Running in the metrics", || {
        let m = scrape(port);
        let phase = |p| value(&m, "lichen_pods", Some(("phase", p))).unwrap_or(0.0);
        let idle_runs = value(&m, "lichen_container_memory_bytes", Some(("pod", "idle-test-node")))
            .is_some_and(|b| b >= 65536.0);
        (phase("Succeeded") >= 1.0 && phase("Failed") >= 1.0 && phase("Running") >= 1.0 && idle_runs)
            .then_some(m)
    });
    assert!(value(&first, "lichen_out_of_fuel_kills_total", None).unwrap_or(0.0) >= 1.0, "{first:?}");
    assert!(
        value(&first, "lichen_fuel_consumed_total", None).unwrap_or(0.0) >= 2_000_000.0,
        "spin used its budget"
    );
    let idle_memory = value(&first, "lichen_container_memory_bytes", Some(("pod", "idle-test-node")));
    assert!(idle_memory.is_some_and(|b| b >= 65536.0), "the running pod's memory is shown: {idle_memory:?}");
    assert!(
        value(&first, "lichen_container_memory_bytes", Some(("pod", "hello-test-node"))).is_none(),
        "a finished container has no memory series"
    );
    assert_eq!(value(&first, "lichen_status_outbox_depth", None), Some(0.0), "standalone: no outbox");
    assert_eq!(
        value(&first, "lichen_last_heartbeat_timestamp_seconds", None),
        Some(0.0),
        "no Lease without a cluster"
    );
    let starts = value(&first, "lichen_module_starts_total", None).unwrap_or(0.0);
    assert!(starts >= 4.0, "four pods started: {starts}");

    // The failing pod restarts: the counters move.
    let later = wait_for(T, "a restart to be counted", || {
        let m = scrape(port);
        (value(&m, "lichen_container_restarts_total", None).unwrap_or(0.0) >= 1.0).then_some(m)
    });
    assert!(value(&later, "lichen_module_starts_total", None).unwrap_or(0.0) > starts);

    let (code, body) = get(port, "/healthz").expect("healthz");
    assert_eq!(code, 200, "{body}");
    let h: serde_json::Value = serde_json::from_str(&body).expect("healthz json");
    assert_eq!(
        (h["ok"].as_bool(), h["store"].as_str(), h["runtime"].as_str()),
        (Some(true), Some("ok"), Some("ok")),
        "{h}"
    );
    assert_eq!(h["cluster"], false);
    assert!(h["api_contact_age_secs"].is_null(), "standalone: never in contact: {h}");
    assert_eq!(get(port, "/nope").map(|r| r.0), Some(404));

    let (status, log) = agent.stop();
    assert!(status.success(), "{}", log.join("\n"));
    assert!(get(port, "/metrics").is_none(), "the endpoint closes with the agent");
}

#[test]
fn a_taken_metrics_port_is_reported_and_pods_run_anyway() {
    let s = Scratch::new("");
    s.put_pod("idle.yaml", &pod_yaml("idle", &fixture("sleeper.wat"), ""));
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = holder.local_addr().expect("addr").to_string();
    let mut args = s.run_args();
    args.extend(["--metrics-address".to_owned(), address.clone()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = lichen_tests::Agent::start(&args, &s.state);
    let line = agent.wait_log(&["metrics endpoint unavailable"], T);
    assert!(
        line.contains(&address) && line.contains("metrics.address"),
        "names the address and the setting: {line}"
    );
    wait_for(T, "the pod to run regardless", || s.output("idle", "main", 0).first().cloned());
    let (status, _) = agent.stop();
    assert!(status.success());
}
