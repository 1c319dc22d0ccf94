//! Cluster benchmark: what joining a real API server costs, with the release binary.
//!
//! Run against a cluster named by `LICHEN_E2E_KUBECONFIG` (CI's realk8s: see the README):
//!
//! ```text
//! cargo build --release -p lichen
//! LICHEN_E2E_KUBECONFIG=/opt/realk8s/admin.kubeconfig cargo bench -p lichen-tests --bench cluster
//! ```
//!
//! It measures:
//! 1. node start to Ready: from spawning `lichen run` to a client seeing the Node's Ready condition
//!    True (the agent registers, writes status and its Lease);
//! 2. bind to Running: 100 pods (`tests/fixtures/idle.wat`) created already bound
//!    (`spec.nodeName`), one every 50 ms; for each, the time from the create request to a watching
//!    client seeing `phase: Running`. That spans two watch hops (API server to agent, agent's status
//!    patch to the client), so the agent's own share is smaller;
//! 3. RSS idle after joining, and with the 100 pods running;
//! 4. the time for all 100 to be deleted gracefully (the agent stops each module and removes it).
//!
//! It prints figures and a Markdown table, and exits non-zero only if something never happens.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::watcher;
use lichen_tests::cluster::Cluster;
use lichen_tests::{Scratch, percentile, rss_kib, wait_for_async};

const NODE: &str = "lichen-bench";
const PODS: usize = 100;
const LABEL: &str = "lichen.dev/bench=cluster";
const TIMEOUT: Duration = Duration::from_secs(120);

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

async fn delete_bench_pods(pods: &Api<Pod>) {
    let lp = ListParams::default().labels(LABEL);
    let grace0 = DeleteParams { grace_period_seconds: Some(0), ..Default::default() };
    let _ = pods.delete_collection(&grace0, &lp).await;
    wait_for_async(TIMEOUT, "leftover bench pods to go", || async {
        pods.list(&lp).await.ok()?.items.is_empty().then_some(())
    })
    .await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let cluster = Cluster::from_env().await;
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    delete_bench_pods(&pods).await;
    cluster.delete_node(NODE).await;

    let s = Scratch::new("");
    let kubeconfig = cluster.node_kubeconfig(NODE, s.dir.path()).await;
    s.write_bench_node_config(NODE, &kubeconfig);
    println!("agent: {}", lichen_tests::lichen_bin().display());

    let started = Instant::now();
    let agent = s.start();
    wait_for_async(TIMEOUT, "the node to be Ready", || async {
        let n = nodes.get_opt(NODE).await.ok()??;
        let ready = n.status?.conditions?.into_iter().any(|c| c.type_ == "Ready" && c.status == "True");
        ready.then_some(())
    })
    .await;
    let to_ready = started.elapsed();
    println!("node start to Ready: {}", ms(to_ready));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rss = rss_kib(agent.pid());

    // Running as a watching client sees it, per pod name.
    let running: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let seen = running.clone();
    let watch_api = pods.clone();
    let watch = tokio::spawn(async move {
        let mut stream =
            std::pin::pin!(watcher::watcher(watch_api, watcher::Config::default().labels(LABEL)));
        while let Some(event) = stream.next().await {
            let pods = match event {
                Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => vec![p],
                _ => continue,
            };
            for p in pods {
                if p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                    && let Some(name) = p.metadata.name
                    && let Ok(mut seen) = seen.lock()
                {
                    seen.entry(name).or_insert_with(Instant::now);
                }
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    let image = format!("file://{}", lichen_tests::fixture("idle.wat").display());
    let mut created = HashMap::new();
    for i in 0..PODS {
        let name = format!("lichen-bench-{i:03}");
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"lichen.dev/bench": "cluster"}},
            "spec": {
                "nodeName": NODE,
                "automountServiceAccountToken": false,
                "containers": [{"name": "main", "image": image}]
            }
        }))
        .expect("pod");
        let at = Instant::now();
        pods.create(&PostParams::default(), &pod).await.expect("create pod");
        created.insert(name, at);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all_running = wait_for_async(TIMEOUT, "all bench pods Running", || async {
        let seen = running.lock().ok()?;
        (seen.len() == PODS).then(|| seen.clone())
    })
    .await;
    watch.abort();
    let mut latencies: Vec<Duration> =
        created.iter().map(|(name, at)| all_running[name].saturating_duration_since(*at)).collect();
    latencies.sort();
    let (p50, p99, max) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99), latencies[PODS - 1]);
    println!("bind to Running over {PODS} pods: p50 {}, p99 {}, max {}", ms(p50), ms(p99), ms(max));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let busy_rss = rss_kib(agent.pid());
    println!(
        "RSS: idle {:.1} MiB, with {PODS} pods {:.1} MiB",
        idle_rss as f64 / 1024.0,
        busy_rss as f64 / 1024.0
    );

    let deleting = Instant::now();
    let lp = ListParams::default().labels(LABEL);
    pods.delete_collection(&DeleteParams::default(), &lp).await.expect("delete pods");
    wait_for_async(TIMEOUT, "the bench pods to be deleted", || async {
        pods.list(&lp).await.ok()?.items.is_empty().then_some(())
    })
    .await;
    let deleted = deleting.elapsed();
    println!("graceful deletion of {PODS} pods: {}", ms(deleted));

    let (status, _) = agent.stop();
    cluster.delete_node(NODE).await;
    assert!(status.success(), "agent exit: {status}");

    println!();
    println!("| figure | value | aim |");
    println!("|---|---|---|");
    println!("| node start to Ready | {} | ≤ 1 s |", ms(to_ready));
    println!("| bind to Running, p50 ({PODS} pods) | {} | ≤ 100 ms |", ms(p50));
    println!("| bind to Running, p99 | {} | ≤ 500 ms |", ms(p99));
    println!("| RSS joined, no pods | {:.1} MiB | |", idle_rss as f64 / 1024.0);
    println!("| RSS with {PODS} pods | {:.1} MiB | |", busy_rss as f64 / 1024.0);
    println!("| graceful deletion of {PODS} pods | {} | |", ms(deleted));
}
