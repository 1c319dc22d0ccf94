//! Autonomy benchmark ("survive the edge"): what an offline restart, the reconcile after the API
//! server comes back, and a pod status change cost, with the release binary against the in-process
//! fake API server.
//!
//! ```text
//! cargo build --release -p lichen
//! cargo bench -p lichen-tests --bench autonomy
//! ```
//!
//! The bench finds `target/release/lichen` beside itself; `LICHEN_BIN` names another binary (an
//! absolute path: cargo runs benches in `tests/`).
//!
//! One node joins the fake and runs 100 cluster pods (`tests/fixtures/idle.wat`, `restartPolicy:
//! Always`). Then, [`REPS`] times:
//!
//! 1. **offline restart**: the API server is stopped, the agent is killed (SIGKILL, as a power cut
//!    would) and started again on the same state directory. Measured from spawning the process to
//!    every one of the 100 pods having written output in its new run (the CRI log record's own
//!    time, `<state_dir>/logs/<ns>_<pod>_<uid>/main/<run>.log`; the killed run counts as a
//!    restart, so the new run is `restartCount + 1`), with the agent's log times of "state store
//!    open", "resuming cluster pods from the store" and the first "container started";
//! 2. **reconcile**: [`OUTAGE`] after the restart the API server comes back. For a moment it still
//!    fails the node's requests (`503` on every path the node uses, none the admin uses) while an
//!    admin deletes [`DELETED`] of the pods (gracefully: they get a `deletionTimestamp`); then the
//!    node is let through. Measured from the server's return: the node's first request, its Lease
//!    renewed, every surviving pod's status in the API showing the new run (Running, Ready,
//!    `restartCount` one higher), every deleted pod stopped and removed by the node's final delete,
//!    and `lichen status` showing an empty outbox; "reconciled" is when all of them hold. Times come
//!    from the fake's request log (exact), except the outbox (polled, about every 100 ms). The
//!    deleted pods are then replaced by new ones, so every repetition starts with 100.
//! 3. **store writes per status change**: `lichen status --json` reports `status_changes` and
//!    `store_pod_writes` since the agent started: for the first start of the 100 pods, for each
//!    restart and reconcile (the 100 statuses offered again from the store at start-up count as
//!    changes, though the store is not written for them), for a steady window with nothing
//!    happening, and for [`CRASHERS`] crash-looping pods (`tests/fixtures/exit.wat`, exit code 3,
//!    `restartPolicy: Always`, so restarts with the kubelet's back-off).
//!
//! It also reads the agent's RSS with the pods running. It prints figures and a Markdown table, and
//! exits non-zero only if something never happens (with the agent's log).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use lichen_tests::fakeapi::{FakeApi, RequestRecord};
use lichen_tests::{Agent, Scratch, fixture, is_running_ready, percentile, rss_kib};
use serde_json::{Value, json};

const NODE: &str = "lichen-autonomy";
const NODE_USER: &str = "system:node:lichen-autonomy";
/// Idle pods on the node.
const PODS: usize = 100;
/// Offline restarts measured.
const REPS: usize = 5;
/// How long the API server stays away after each restart (the agent's back-off grows meanwhile).
const OUTAGE: Duration = Duration::from_secs(10);
/// Pods deleted while the node is cut off, in each repetition.
const DELETED: usize = 10;
/// Injected failures per path while the node is cut off (more than it can send in that moment).
const CUT: usize = 200;
/// The steady window for store writes.
const STEADY: Duration = Duration::from_secs(10);
/// Crash-looping pods, and the window their store writes are counted over.
const CRASHERS: usize = 10;
const CRASH_WINDOW: Duration = Duration::from_secs(30);
const LABEL: &str = "lichen.dev/bench=autonomy";
const TIMEOUT: Duration = Duration::from_secs(120);

fn fail(agent: &Agent, what: &str) -> ! {
    eprintln!("autonomy bench FAILED: {what}; the agent logged:\n{}", agent.log().join("\n"));
    std::process::exit(1);
}

fn pod(name: &str, image: &str, restart_policy: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"lichen.dev/bench": "autonomy"}},
        "spec": {
            "nodeName": NODE,
            "restartPolicy": restart_policy,
            "automountServiceAccountToken": false,
            "containers": [{"name": "main", "image": image}]
        }
    }))
    .expect("pod")
}

fn restart_count(p: &Pod) -> Option<i32> {
    Some(p.status.as_ref()?.container_statuses.as_ref()?.first()?.restart_count)
}

fn ms(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.2} s", d.as_secs_f64())
    } else {
        format!("{:.1} ms", d.as_secs_f64() * 1000.0)
    }
}

fn opt_ms(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".into(), ms)
}

/// p50 and max of some durations, as text.
fn p50_max(values: &[Duration]) -> (String, String) {
    let mut v = values.to_vec();
    v.sort();
    match v.last() {
        Some(max) => (ms(percentile(&v, 0.5)), ms(*max)),
        None => ("-".into(), "-".into()),
    }
}

/// `later - earlier` of two wall-clock times, as a duration (zero if negative).
fn since(earlier: jiff::Timestamp, later: jiff::Timestamp) -> Duration {
    Duration::try_from(later.duration_since(earlier)).unwrap_or_default()
}

/// `lichen status --json` for the running agent (a blocking process: run off the reactor).
async fn lichen_status(config: &Path) -> Value {
    let config = config.to_owned();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(lichen_tests::lichen_bin())
            .args(["status", "--json", "--config"])
            .arg(&config)
            .env_remove("LICHEN_CONFIG")
            .output()
            .expect("lichen status");
        assert!(out.status.success(), "lichen status failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).expect("status json")
    })
    .await
    .expect("status task")
}

/// `(status_changes, store_pod_writes)` of a status report.
fn counters(report: &Value) -> (u64, u64) {
    (report["status_changes"].as_u64().unwrap_or(0), report["store_pod_writes"].as_u64().unwrap_or(0))
}

/// Writes per change as text, with the raw numbers.
fn ratio(changes: u64, writes: u64) -> String {
    if changes == 0 {
        format!("{writes} writes / 0 changes")
    } else {
        format!("{:.2} ({writes} writes / {changes} changes)", writes as f64 / changes as f64)
    }
}

/// Writes per change with what is not a status write taken out: one record write per pod admitted
/// (written before it starts) or removed, and the `seeded` statuses offered again from the store at
/// start-up (counted as changes, not written).
fn status_ratio(changes: u64, writes: u64, admitted: u64, removed: u64, seeded: u64) -> String {
    ratio(changes.saturating_sub(seeded), writes.saturating_sub(admitted + removed))
}

/// The first line of the agent's JSON log whose message contains `needle`, and its time.
fn log_time(agent: &Agent, needle: &str) -> Option<jiff::Timestamp> {
    agent.log().iter().find_map(|line| {
        let v: Value = serde_json::from_str(line).ok()?;
        v["fields"]["message"].as_str()?.contains(needle).then_some(())?;
        v["timestamp"].as_str()?.parse().ok()
    })
}

/// Pod name -> the directory of its `main` container's logs (`<state>/logs/default_<pod>_<uid>/main`).
fn log_dirs(state: &Path) -> HashMap<String, PathBuf> {
    let mut out = HashMap::new();
    for e in std::fs::read_dir(state.join("logs")).into_iter().flatten().flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        if let Some((name, _uid)) = file.strip_prefix("default_").and_then(|r| r.rsplit_once('_')) {
            out.insert(name.to_owned(), e.path().join("main"));
        }
    }
    out
}

/// Waits until every pod in `want` (name -> (log dir, run)) has output in that run; returns the
/// time of each one's first record. Polls on this thread: call it off the reactor.
fn wait_outputs(want: &HashMap<String, (PathBuf, u32)>) -> Option<HashMap<String, jiff::Timestamp>> {
    let start = Instant::now();
    let mut seen = HashMap::new();
    while seen.len() < want.len() {
        for (name, (dir, run)) in want {
            if seen.contains_key(name) {
                continue;
            }
            let first = lichen::runtime::logs::read_run(dir, *run)
                .ok()
                .and_then(|recs| recs.first().and_then(|r| r.time.parse::<jiff::Timestamp>().ok()));
            if let Some(t) = first {
                seen.insert(name.clone(), t);
            }
        }
        if start.elapsed() > TIMEOUT {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Some(seen)
}

/// Waits until every pod in `want` (name -> restart count) is Running and Ready in the API with that
/// restart count, and the agent's outbox is empty.
async fn wait_running(pods: &Api<Pod>, agent: &Agent, config: &Path, want: &BTreeMap<String, i32>) {
    let lp = ListParams::default().labels(LABEL);
    let start = Instant::now();
    loop {
        let list = pods.list(&lp).await.map(|l| l.items).unwrap_or_default();
        let by_name: HashMap<String, &Pod> =
            list.iter().filter_map(|p| Some((p.metadata.name.clone()?, p))).collect();
        let ok = want.iter().all(|(name, rc)| {
            by_name.get(name).is_some_and(|p| is_running_ready(p) && restart_count(p) == Some(*rc))
        });
        if ok && lichen_status(config).await["outbox"] == 0 {
            return;
        }
        if start.elapsed() > TIMEOUT {
            let missing: Vec<&String> = want
                .iter()
                .filter(|(n, rc)| {
                    !by_name.get(*n).is_some_and(|p| is_running_ready(p) && restart_count(p) == Some(**rc))
                })
                .map(|(n, _)| n)
                .collect();
            fail(agent, &format!("pods not Running with the expected restart count: {missing:?}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// An admin client that does not retry `503`s itself (kube's default does, 15 times), to use up
/// injected failures one request at a time.
async fn plain_admin_client(api: &FakeApi, dir: &Path) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(api.admin_kubeconfig(dir)).expect("admin kubeconfig");
    let mut config = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .expect("client config");
    config.default_retry = false;
    kube::Client::try_from(config).expect("client")
}

/// Sends GETs of `path` until one is not an injected `503`: the faults matching it are used up.
async fn drain(client: &kube::Client, path: &str) {
    for _ in 0..CUT + 10 {
        let req = hyper::http::Request::builder().method("GET").uri(path).body(Vec::new()).expect("request");
        match client.request_text(req).await {
            Err(kube::Error::Api(s)) if s.code == 503 => continue,
            _ => return,
        }
    }
}

/// One offline restart and the reconcile after it.
struct Rep {
    /// Spawn to every pod's first output in its new run.
    all_output: Duration,
    first_output: Duration,
    store_open: Option<Duration>,
    resuming: Option<Duration>,
    first_started: Option<Duration>,
    /// From the API server's return.
    first_request: Option<Duration>,
    listed: Option<Duration>,
    lease: Option<Duration>,
    statuses: Option<Duration>,
    deleted: Option<Duration>,
    outbox: Option<Duration>,
    reconciled: Duration,
    /// Status changes and store pod writes of this agent, at reconciled.
    changes: u64,
    writes: u64,
    rss_kib: u64,
}

/// When the node's requests in `log` first did what `f` picks, relative to `back`.
fn first_at(log: &[RequestRecord], back: Instant, f: impl Fn(&RequestRecord) -> bool) -> Option<Duration> {
    log.iter().find(|r| r.user == NODE_USER && f(r)).map(|r| r.at.saturating_duration_since(back))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let api = FakeApi::start().await;
    let pods: Api<Pod> = Api::namespaced(api.client(), "default");
    let nodes: Api<Node> = Api::all(api.client());
    let leases: Api<Lease> = Api::namespaced(api.client(), "kube-node-lease");
    let s = Scratch::new("");
    let plain = plain_admin_client(&api, s.dir.path()).await;
    let kubeconfig = api.node_kubeconfig(NODE, s.dir.path()).await;
    let config = format!(
        "node_name = {NODE:?}\nstate_dir = {:?}\nstatic_pod_dir = \"\"\nnode_ip = \"127.0.0.1\"\n\
         shutdown_timeout_secs = 10\ndisk_pressure_percent = 0\nkubeconfig = {:?}\n\
         [log]\nformat = \"json\"\n[container_logs]\necho = false\n{}",
        s.state.display().to_string(),
        kubeconfig.display().to_string(),
        s.modules_table()
    );
    std::fs::write(&s.config, config).expect("config");
    println!("agent: {}", lichen_tests::lichen_bin().display());

    let mut agent = s.start();
    let start = Instant::now();
    loop {
        let ready = nodes
            .get_opt(NODE)
            .await
            .ok()
            .flatten()
            .and_then(|n| n.status?.conditions)
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if ready {
            break;
        }
        if start.elapsed() > TIMEOUT {
            fail(&agent, "the node never became Ready");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let idle = format!("file://{}", fixture("idle.wat").display());
    let mut want: BTreeMap<String, i32> = BTreeMap::new();
    let creating = Instant::now();
    for i in 0..PODS {
        let name = format!("idle-{i:03}");
        pods.create(&PostParams::default(), &pod(&name, &idle, "Always")).await.expect("create pod");
        want.insert(name, 0);
    }
    let mut next_pod = PODS;
    wait_running(&pods, &agent, &s.config, &want).await;
    let first_start = creating.elapsed();
    let (first_changes, first_writes) = counters(&lichen_status(&s.config).await);
    println!(
        "first start: {PODS} pods created to Running in the API with an empty outbox: {}; \
         store writes per status change {}",
        ms(first_start),
        ratio(first_changes, first_writes)
    );

    let mut reps = Vec::new();
    for rep in 1..=REPS {
        // startedAt has whole seconds: let the new runs' differ from the old.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let dirs = log_dirs(&s.state);
        let outputs_wanted: HashMap<String, (PathBuf, u32)> = want
            .iter()
            .map(|(name, rc)| {
                let dir =
                    dirs.get(name).cloned().unwrap_or_else(|| fail(&agent, &format!("no logs for {name}")));
                (name.clone(), (dir, (*rc + 1) as u32))
            })
            .collect();

        let renewed = leases.get(NODE).await.ok().and_then(|l| l.spec?.renew_time).map(|t| t.0);
        api.faults().stop().await;
        drop(agent); // SIGKILL
        let spawned_wall = jiff::Timestamp::now();
        let spawned = Instant::now();
        agent = s.start();
        let outputs = tokio::task::spawn_blocking(move || wait_outputs(&outputs_wanted)).await.expect("poll");
        let Some(outputs) = outputs else { fail(&agent, "not every pod wrote output after the restart") };
        let mut per_pod: Vec<Duration> = outputs.values().map(|t| since(spawned_wall, *t)).collect();
        per_pod.sort();
        let (first_output, all_output) = (per_pod[0], per_pod[per_pod.len() - 1]);
        let started_wait = Instant::now();
        while log_time(&agent, "container started").is_none()
            && started_wait.elapsed() < Duration::from_secs(5)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let store_open = log_time(&agent, "state store open").map(|t| since(spawned_wall, t));
        let resuming =
            log_time(&agent, "resuming cluster pods from the store").map(|t| since(spawned_wall, t));
        let first_started = log_time(&agent, "container started").map(|t| since(spawned_wall, t));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss = rss_kib(agent.pid());
        println!(
            "restart {rep}: spawn to all {} pods' output {}, first {}, p50 {} (store open {}, resuming {}, \
             first container started {}); RSS {:.1} MiB",
            per_pod.len(),
            ms(all_output),
            ms(first_output),
            ms(percentile(&per_pod, 0.5)),
            opt_ms(store_open),
            opt_ms(resuming),
            opt_ms(first_started),
            rss as f64 / 1024.0
        );

        // The outage goes on; then the server returns, first refusing only the node.
        tokio::time::sleep_until((spawned + OUTAGE).into()).await;
        let faults = api.faults();
        for path in [NODE, "/status", "/events"] {
            faults.fail_next(CUT, 503, Some(path));
        }
        let seen = api.requests().len();
        let back = Instant::now();
        faults.start().await;
        let doomed: Vec<String> = want.keys().take(DELETED).cloned().collect();
        for name in &doomed {
            pods.delete(name, &DeleteParams::default()).await.expect("delete pod");
        }
        let survivor = want.keys().nth(DELETED).cloned().expect("a survivor");
        drain(&plain, &format!("/api/v1/nodes/{NODE}")).await;
        drain(&plain, &format!("/api/v1/namespaces/default/pods/{survivor}/status")).await;
        drain(&plain, "/api/v1/namespaces/default/events").await;
        let cut_for = back.elapsed();

        let survivors: BTreeMap<String, i32> =
            want.iter().filter(|(n, _)| !doomed.contains(n)).map(|(n, rc)| (n.clone(), rc + 1)).collect();
        let lp = ListParams::default().labels(LABEL);
        let mut outbox_at = None;
        let reconciled = loop {
            let (list, report, lease) =
                tokio::join!(pods.list(&lp), lichen_status(&s.config), leases.get(NODE));
            let now = back.elapsed();
            let lease_renewed = lease.ok().and_then(|l| l.spec?.renew_time).map(|t| t.0) > renewed;
            let empty = report["outbox"] == 0;
            if empty && outbox_at.is_none() {
                outbox_at = Some(now);
            }
            let list = list.map(|l| l.items).unwrap_or_default();
            let by_name: HashMap<String, &Pod> =
                list.iter().filter_map(|p| Some((p.metadata.name.clone()?, p))).collect();
            let running = survivors.iter().all(|(n, rc)| {
                by_name.get(n).is_some_and(|p| is_running_ready(p) && restart_count(p) == Some(*rc))
            });
            let gone = doomed.iter().all(|n| !by_name.contains_key(n));
            if running && gone && empty && lease_renewed {
                break now;
            }
            if now > TIMEOUT {
                fail(
                    &agent,
                    &format!(
                        "no reconcile: running {running}, deleted {gone}, lease renewed {lease_renewed}, outbox {}",
                        report["outbox"]
                    ),
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let (changes, writes) = counters(&lichen_status(&s.config).await);
        let log = api.requests()[seen..].to_vec();
        let first_request = first_at(&log, back, |_| true);
        let listed = first_at(&log, back, |r| {
            r.method == "GET"
                && r.path_only() == "/api/v1/pods"
                && r.query("watch").is_none()
                && r.code == 200
        });
        let lease = first_at(&log, back, |r| {
            r.is_write() && r.path_only().contains("/leases") && (200..300).contains(&r.code)
        });
        let status_patch = |name: &str, rc: i32| {
            let path = format!("/api/v1/namespaces/default/pods/{name}/status");
            first_at(&log, back, |r| {
                r.method == "PATCH"
                    && r.path_only() == path
                    && r.code == 200
                    && r.json().is_some_and(|b| {
                        let c = &b["status"]["containerStatuses"][0];
                        c["restartCount"] == rc && c["state"]["running"].is_object()
                    })
            })
        };
        let statuses: Option<Vec<Duration>> = survivors.iter().map(|(n, rc)| status_patch(n, *rc)).collect();
        let statuses = statuses.and_then(|v| v.into_iter().max());
        let deletes: Option<Vec<Duration>> = doomed
            .iter()
            .map(|n| {
                let path = format!("/api/v1/namespaces/default/pods/{n}");
                first_at(&log, back, |r| r.method == "DELETE" && r.path_only() == path && r.code == 200)
            })
            .collect();
        let deleted = deletes.and_then(|v| v.into_iter().max());
        let injected = log.iter().filter(|r| r.user == NODE_USER && r.code == 503).count();
        println!(
            "reconcile {rep}: node cut off for {} after the server's return ({injected} of its requests \
             refused); first request {}, pods listed {}, Lease {}, {} statuses {}, {DELETED} deletions {}, outbox empty {}, \
             reconciled {}; store writes per status change since the restart {}",
            ms(cut_for),
            opt_ms(first_request),
            opt_ms(listed),
            opt_ms(lease),
            survivors.len(),
            opt_ms(statuses),
            opt_ms(deleted),
            opt_ms(outbox_at),
            ms(reconciled),
            ratio(changes, writes)
        );
        reps.push(Rep {
            all_output,
            first_output,
            store_open,
            resuming,
            first_started,
            first_request,
            listed,
            lease,
            statuses,
            deleted,
            outbox: outbox_at,
            reconciled,
            changes,
            writes,
            rss_kib: rss,
        });

        // Back to 100 pods.
        want = survivors;
        for _ in 0..DELETED {
            let name = format!("idle-{next_pod:03}");
            next_pod += 1;
            pods.create(&PostParams::default(), &pod(&name, &idle, "Always")).await.expect("create pod");
            want.insert(name, 0);
        }
        wait_running(&pods, &agent, &s.config, &want).await;
    }

    // Store writes with nothing happening, then with pods crash-looping.
    let before = counters(&lichen_status(&s.config).await);
    tokio::time::sleep(STEADY).await;
    let after = counters(&lichen_status(&s.config).await);
    let steady = (after.0 - before.0, after.1 - before.1);
    println!(
        "steady {} with {PODS} pods: store writes per status change {}",
        ms(STEADY),
        ratio(steady.0, steady.1)
    );

    let exit = format!("file://{}", fixture("exit.wat").display());
    for i in 0..CRASHERS {
        pods.create(&PostParams::default(), &pod(&format!("crash-{i:02}"), &exit, "Always"))
            .await
            .expect("create pod");
    }
    // Past the first runs: from here on it is the back-off loop.
    let lp = ListParams::default().labels(LABEL);
    let start = Instant::now();
    loop {
        let list = pods.list(&lp).await.map(|l| l.items).unwrap_or_default();
        let crashed = list
            .iter()
            .filter(|p| p.metadata.name.as_deref().is_some_and(|n| n.starts_with("crash-")))
            .filter(|p| {
                let c = p.status.as_ref().and_then(|s| s.container_statuses.as_ref()).and_then(|c| c.first());
                c.is_some_and(|c| {
                    c.state.as_ref().and_then(|s| s.waiting.as_ref()).and_then(|w| w.reason.as_deref())
                        == Some("CrashLoopBackOff")
                })
            })
            .count();
        if crashed == CRASHERS {
            break;
        }
        if start.elapsed() > TIMEOUT {
            fail(&agent, "the crash-looping pods never reached CrashLoopBackOff");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let before = counters(&lichen_status(&s.config).await);
    tokio::time::sleep(CRASH_WINDOW).await;
    let after = counters(&lichen_status(&s.config).await);
    let crash = (after.0 - before.0, after.1 - before.1);
    let restarts: i32 = pods
        .list(&lp)
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .iter()
        .filter(|p| p.metadata.name.as_deref().is_some_and(|n| n.starts_with("crash-")))
        .filter_map(restart_count)
        .sum();
    println!(
        "crash loop, {CRASHERS} pods over {}: store writes per status change {} ({restarts} restarts in all)",
        ms(CRASH_WINDOW),
        ratio(crash.0, crash.1)
    );
    let rss_busy = rss_kib(agent.pid());

    let (status, _) = agent.stop();
    assert!(status.success(), "agent exit: {status}");

    let col = |f: fn(&Rep) -> Option<Duration>| -> (String, String) {
        let v: Vec<Duration> = reps.iter().filter_map(f).collect();
        p50_max(&v)
    };
    let (out_p50, out_max) = col(|r| Some(r.all_output));
    let (first_p50, _) = col(|r| Some(r.first_output));
    let (open_p50, _) = col(|r| r.store_open);
    let (res_p50, _) = col(|r| r.resuming);
    let (started_p50, _) = col(|r| r.first_started);
    let (rec_p50, rec_max) = col(|r| Some(r.reconciled));
    let (req_p50, req_max) = col(|r| r.first_request);
    let (list_p50, list_max) = col(|r| r.listed);
    let (lease_p50, lease_max) = col(|r| r.lease);
    let (st_p50, st_max) = col(|r| r.statuses);
    let (del_p50, del_max) = col(|r| r.deleted);
    let (ob_p50, ob_max) = col(|r| r.outbox);
    let (changes, writes) = reps.iter().fold((0, 0), |(c, w), r| (c + r.changes, w + r.writes));
    let rss = reps.last().map_or(0, |r| r.rss_kib);
    let outage = OUTAGE.as_secs();

    println!();
    println!("| figure ({REPS} offline restarts, {PODS} pods) | p50 | max | aim |");
    println!("|---|---|---|---|");
    println!(
        "| offline restart: spawn to all {PODS} pods running again (output) | {out_p50} | {out_max} | ≤ 1 s |"
    );
    println!("| … spawn to \"state store open\" | {open_p50} | | |");
    println!("| … spawn to \"resuming cluster pods from the store\" | {res_p50} | | |");
    println!("| … spawn to the first \"container started\" | {started_p50} | | |");
    println!("| … spawn to the first pod's output | {first_p50} | | |");
    println!(
        "| reconcile after a {outage} s outage, from the API's return: all done | {rec_p50} | {rec_max} | ≤ 2 s |"
    );
    println!("| … the node's first request | {req_p50} | {req_max} | |");
    println!("| … its pods listed | {list_p50} | {list_max} | |");
    println!("| … Lease renewed | {lease_p50} | {lease_max} | |");
    println!("| … {} pods' status shows the new run | {st_p50} | {st_max} | |", PODS - DELETED);
    println!("| … {DELETED} pods deleted meanwhile stopped and removed | {del_p50} | {del_max} | |");
    println!("| … outbox empty (`lichen status`, polled) | {ob_p50} | {ob_max} | |");
    println!();
    println!("| store writes per pod status change | value | aim |");
    println!("|---|---|---|");
    println!("| first start of {PODS} pods | {} | ≤ 1 |", ratio(first_changes, first_writes));
    println!(
        "| … status writes only (less {PODS} admission writes) | {} | ≤ 1 |",
        status_ratio(first_changes, first_writes, PODS as u64, 0, 0)
    );
    println!(
        "| offline restart + reconcile ({REPS} restarts, all counted) | {} | ≤ 1 |",
        ratio(changes, writes)
    );
    let (n, removed) = (REPS as u64 * PODS as u64, REPS as u64 * DELETED as u64);
    println!(
        "| … status writes only (less {n} admission and {removed} removal writes, {n} re-offered statuses) | {} | ≤ 1 |",
        status_ratio(changes, writes, n, removed, n)
    );
    println!("| steady, {} s, {PODS} idle pods | {} | ≤ 1 |", STEADY.as_secs(), ratio(steady.0, steady.1));
    println!(
        "| crash loop, {CRASHERS} pods (exit.wat, Always), {} s | {} | ≤ 1 |",
        CRASH_WINDOW.as_secs(),
        ratio(crash.0, crash.1)
    );
    println!();
    println!("| other | value |");
    println!("|---|---|");
    println!("| first start: {PODS} pods created to all Running in the API | {} |", ms(first_start));
    println!("| RSS after an offline restart, {PODS} pods | {:.1} MiB |", rss as f64 / 1024.0);
    println!(
        "| RSS with {PODS} idle + {CRASHERS} crash-looping pods | {:.1} MiB |",
        rss_busy as f64 / 1024.0
    );
}
