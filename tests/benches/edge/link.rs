//! Bytes on the link: what one joined node exchanges with a real API server while idle, and with
//! 10 idle pods running, counted by a TCP proxy between the agent and the API server (the bytes a
//! cellular modem carries, TLS included, IP and TCP headers not), with the connections it opens.
//! Also how soon a pod bound after a long quiet spell is seen: the watch must still be open.
//!
//! Needs `LICHEN_E2E_KUBECONFIG` (the e2e tier's cluster). `LICHEN_BENCH_LINK_SECS` sets each
//! counting window (default 300 s, so that the node status refresh, every 5 minutes, and the
//! server's end of a watch fall inside one); figures are scaled to a day. `LICHEN_BENCH_LINK_DELAY_MS`
//! delays every byte the proxy forwards by that long each way (0 unless set), for the round trips
//! of a cellular link: the bytes do not depend on it, but a race between requests does.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::watcher;
use lichen_tests::cluster::Cluster;
use lichen_tests::{Scratch, is_running_ready, wait_for_async};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::report::Report;

const SECTION: &str = "link";
const NODE: &str = "lichen-bench-link";
const LABEL: &str = "lichen.dev/bench=link";
const TIMEOUT: Duration = Duration::from_secs(120);
/// The aim for an idle node.
const IDLE_AIM_MIB_PER_DAY: f64 = 6.0;

/// What the proxy counted since the last reset.
#[derive(Default)]
struct Counters {
    up: AtomicU64,
    down: AtomicU64,
    connections: AtomicU64,
}

impl Counters {
    fn take(&self) -> (u64, u64, u64) {
        (
            self.up.swap(0, Ordering::SeqCst),
            self.down.swap(0, Ordering::SeqCst),
            self.connections.swap(0, Ordering::SeqCst),
        )
    }
}

/// A TCP proxy on 127.0.0.1 to `upstream`, counting bytes each way and connections accepted, and
/// delaying what it forwards by `delay` each way.
async fn proxy(upstream: SocketAddr, counters: Arc<Counters>, delay: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the counting proxy");
    let addr = listener.local_addr().expect("proxy address");
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            counters.connections.fetch_add(1, Ordering::SeqCst);
            let counters = counters.clone();
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(upstream).await else { return };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let c1 = counters.clone();
                tokio::join!(
                    pump(cr, sw, delay, move |n| c1.up.fetch_add(n, Ordering::SeqCst)),
                    pump(sr, cw, delay, move |n| { counters.down.fetch_add(n, Ordering::SeqCst) })
                );
            });
        }
    });
    addr
}

/// Forwards `from` to `to`, each chunk `delay` after it was read (a delay line: the link's
/// throughput is kept, only its latency grows).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
    count: impl Fn(u64) -> u64,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(64);
    let read = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    count(n as u64);
                    if tx.send((tokio::time::Instant::now() + delay, buf[..n].to_vec())).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    let write = async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}

/// The agent's `lichen_api_requests_total` series (`verb,code` → count) from its metrics endpoint
/// on loopback (not through the proxy: it is not on the link).
async fn api_requests(metrics: SocketAddr) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(mut conn) = TcpStream::connect(metrics).await else { return out };
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {metrics}\r\nConnection: close\r\n\r\n");
    let mut text = String::new();
    if conn.write_all(request.as_bytes()).await.is_err() || conn.read_to_string(&mut text).await.is_err() {
        return out;
    }
    for line in text.lines().filter(|l| l.starts_with("lichen_api_requests_total{")) {
        let Some((labels, value)) = line.rsplit_once(' ') else { continue };
        let labels = labels.trim_start_matches("lichen_api_requests_total{").trim_end_matches('}');
        let mut verb_code =
            labels.split(',').filter_map(|kv| kv.split_once('=')).map(|(_, v)| v.trim_matches('"'));
        let key = format!("{} {}", verb_code.next().unwrap_or("?"), verb_code.next().unwrap_or("?"));
        out.insert(key, value.parse::<f64>().unwrap_or(0.0) as u64);
    }
    out
}

fn per_day(bytes: u64, window: Duration) -> f64 {
    bytes as f64 * 86_400.0 / window.as_secs_f64() / (1024.0 * 1024.0)
}

/// Counts one window and reports it as `what`.
async fn window(
    report: &mut Report,
    counters: &Counters,
    metrics: SocketAddr,
    secs: Duration,
    what: &str,
    aim: Option<f64>,
) {
    let before = api_requests(metrics).await;
    counters.take();
    tokio::time::sleep(secs).await;
    let (up, down, conns) = counters.take();
    let after = api_requests(metrics).await;
    let requests: Vec<String> = after
        .iter()
        .filter_map(|(k, n)| {
            let d = n - before.get(k).copied().unwrap_or(0);
            (d > 0).then(|| format!("{k} ×{d}"))
        })
        .collect();
    report.info(SECTION, format!("{what}: API requests in the window"), requests.join(", "));
    let day = per_day(up + down, secs);
    let value = format!(
        "{day:.2} MiB/day ({} B up, {} B down in {} s; {:.0} B/s)",
        up,
        down,
        secs.as_secs(),
        (up + down) as f64 / secs.as_secs_f64()
    );
    match aim {
        Some(aim) => report.aim(
            SECTION,
            format!("{what}: bytes on the link"),
            value,
            &format!("≤ {aim} MiB/day"),
            day <= aim,
        ),
        None => report.info(SECTION, format!("{what}: bytes on the link"), value),
    }
    let per_hour = conns as f64 * 3600.0 / secs.as_secs_f64();
    report.aim(
        SECTION,
        format!("{what}: new connections"),
        format!("{conns} in {} s", secs.as_secs()),
        "≤ 1 per hour",
        per_hour <= 1.0,
    );
}

pub async fn run(report: &mut Report) {
    if std::env::var_os("LICHEN_E2E_KUBECONFIG").is_none() {
        return report.skipped(SECTION, "LICHEN_E2E_KUBECONFIG is not set (a real API server is needed)");
    }
    let secs = Duration::from_secs(
        std::env::var("LICHEN_BENCH_LINK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(300),
    );
    let cluster = Cluster::from_env().await;
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    let grace0 = DeleteParams { grace_period_seconds: Some(0), ..Default::default() };
    let _ = pods.delete_collection(&grace0, &ListParams::default().labels(LABEL)).await;
    let old_events: Api<k8s_openapi::api::core::v1::Event> =
        Api::namespaced(cluster.client.clone(), "default");
    if let Ok(list) = old_events.list(&ListParams::default()).await {
        for e in list
            .items
            .iter()
            .filter(|e| e.involved_object.name.as_deref().is_some_and(|n| n.starts_with("lichen-link-")))
        {
            if let Some(name) = e.metadata.name.as_deref() {
                let _ = old_events.delete(name, &DeleteParams::default()).await;
            }
        }
    }
    cluster.delete_node(NODE).await;
    // A Lease left by an earlier run would be collected with its old Node during the first window
    // (and re-created by the agent), which is not what an idle node costs.
    let leases: Api<Lease> = Api::namespaced(cluster.client.clone(), "kube-node-lease");
    let _ = leases.delete(NODE, &DeleteParams::default()).await;
    wait_for_async(TIMEOUT, "the old Lease to be gone", || async {
        leases.get_opt(NODE).await.ok()?.is_none().then_some(())
    })
    .await;

    let (server, _) = cluster.server_and_ca();
    let hostport = server.trim_start_matches("https://").trim_end_matches('/').to_owned();
    let Some(upstream) = tokio::net::lookup_host(hostport).await.ok().and_then(|mut a| a.next()) else {
        return report.failed(SECTION, format!("cannot resolve the API server {server}"));
    };
    let counters = Arc::new(Counters::default());
    let delay = Duration::from_millis(
        std::env::var("LICHEN_BENCH_LINK_DELAY_MS").ok().and_then(|s| s.parse().ok()).unwrap_or(0),
    );
    if !delay.is_zero() {
        report.info(SECTION, "link delay (each way)", format!("{} ms", delay.as_millis()));
    }
    let via = proxy(upstream, counters.clone(), delay).await;

    let s = Scratch::new("");
    let kubeconfig = cluster.node_kubeconfig(NODE, s.dir.path()).await;
    let text = std::fs::read_to_string(&kubeconfig).expect("node kubeconfig");
    std::fs::write(&kubeconfig, text.replace(server.trim_end_matches('/'), &format!("https://{via}")))
        .expect("node kubeconfig through the proxy");
    s.write_bench_node_config(NODE, &kubeconfig);
    // The metrics endpoint on loopback (not on the link), to count the requests behind the bytes.
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port for the metrics endpoint");
    let args = s.run_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = lichen_tests::Agent::start_with_env(
        &args,
        &s.state,
        &[("LICHEN_METRICS_ADDRESS", &metrics.to_string())],
    );
    let started = Instant::now();
    wait_for_async(TIMEOUT, "the node to be Ready", || async {
        let n = nodes.get_opt(NODE).await.ok()??;
        let ready = n.status?.conditions?.into_iter().any(|c| c.type_ == "Ready" && c.status == "True");
        ready.then_some(())
    })
    .await;
    wait_for_async(TIMEOUT, "the node's Lease", || async {
        leases.get_opt(NODE).await.ok()??.spec?.renew_time.map(|_| ())
    })
    .await;
    let (up, down, conns) = counters.take();
    report.info(
        SECTION,
        "join to Ready (registration, first status, Lease)",
        format!(
            "{} B up, {} B down, {conns} connections, {:.1} s",
            up,
            down,
            started.elapsed().as_secs_f64()
        ),
    );

    window(report, &counters, metrics, secs, "idle node", Some(IDLE_AIM_MIB_PER_DAY)).await;
    // What the joined idle node holds by the end of that window (its heartbeat, watches and two
    // connections running; start-up's code pages given back), beside the standalone figure of the
    // memory section.
    if let Some(rss) = crate::memory::Rss::read(agent.pid()) {
        report.info(SECTION, "idle node: RSS at the end of the window", rss.both());
    }

    // After that quiet spell, a pod bound to the node: how long until a watching client sees it
    // Running (two watch hops and a status patch; the agent's share is most of it only if its
    // watch is already open).
    let seen = tokio::spawn({
        let pods = pods.clone();
        async move {
            let mut stream = std::pin::pin!(watcher::watcher(pods, watcher::Config::default().labels(LABEL)));
            while let Some(event) = stream.next().await {
                if let Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) = event
                    && is_running_ready(&p)
                {
                    return Instant::now();
                }
            }
            Instant::now()
        }
    });
    let image = format!("file://{}", lichen_tests::fixture("idle.wat").display());
    let pod = |i: usize| -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("lichen-link-{i:02}"), "labels": {"lichen.dev/bench": "link"}},
            "spec": {
                "nodeName": NODE,
                "automountServiceAccountToken": false,
                "containers": [{"name": "main", "image": image}]
            }
        }))
        .expect("pod")
    };
    let created = Instant::now();
    pods.create(&PostParams::default(), &pod(0)).await.expect("create pod");
    match tokio::time::timeout(TIMEOUT, seen).await {
        Ok(Ok(at)) => report.aim(
            SECTION,
            format!(
                "pod bound after {} s idle: create to Running and Ready (seen by a watch)",
                secs.as_secs()
            ),
            format!("{:.0} ms", (at - created).as_secs_f64() * 1000.0),
            "≤ 500 ms (the watch open, no reconnect wait)",
            (at - created) <= Duration::from_millis(500),
        ),
        _ => return report.failed(SECTION, "the first pod never became Running and Ready"),
    }
    // The agent's own share: from the create to its worker starting the pod (planned, admitted,
    // the module resolved), the moment its `starting pod` line left the process.
    match agent
        .line_arrived(&["starting pod", "lichen-link-00"])
        .map(|at| at.saturating_duration_since(created))
    {
        Some(took) => report.aim(
            SECTION,
            format!(
                "pod bound after {} s idle: create to the agent starting it (its log line)",
                secs.as_secs()
            ),
            format!("{:.0} ms", took.as_secs_f64() * 1000.0),
            "≤ 100 ms (pod changes seen at once)",
            took <= Duration::from_millis(100),
        ),
        None => return report.failed(SECTION, "the agent never logged starting the first pod"),
    }
    for i in 1..10 {
        pods.create(&PostParams::default(), &pod(i)).await.expect("create pod");
    }
    wait_for_async(TIMEOUT, "10 pods Running and Ready", || async {
        let list = pods.list(&ListParams::default().labels(LABEL)).await.ok()?;
        (list.items.iter().filter(|p| is_running_ready(p)).count() == 10).then_some(())
    })
    .await;
    // The agent posts each pod's Pulled, Created and Started events from a queue of its own; the
    // window starts once they are all in, so it counts running pods, not their start.
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(cluster.client.clone(), "default");
    wait_for_async(TIMEOUT, "the 10 pods' start events", || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        let ours = list
            .items
            .iter()
            .filter(|e| e.involved_object.name.as_deref().is_some_and(|n| n.starts_with("lichen-link-")))
            .filter(|e| matches!(e.reason.as_deref(), Some("Pulled" | "Created" | "Started")))
            .count();
        (ours >= 30).then_some(())
    })
    .await;
    window(report, &counters, metrics, secs, "node with 10 idle pods", None).await;

    let _ = pods.delete_collection(&grace0, &ListParams::default().labels(LABEL)).await;
    drop(agent);
    cluster.delete_node(NODE).await;
}
