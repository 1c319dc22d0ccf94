//! The agent's main loop never waits on I/O: while the API server holds every DELETE and a deleted
//! pod takes its whole grace period to stop, new static pods still start within a second and the
//! systemd watchdog keeps being fed at its rate (the real binary, a fake API server, a notify
//! socket this test owns).

use std::net::TcpListener;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, PostParams};
use lichen_tests::fakeapi::FakeApi;
use lichen_tests::{Agent, Scratch, fixture, pod_yaml, wait_for, wait_for_async};
use serde_json::json;

const T: Duration = Duration::from_secs(30);

/// `WATCHDOG_USEC` as systemd would set it for `WatchdogSec=2`: the agent feeds every second, and
/// a gap of two seconds would get it killed.
const WATCHDOG: Duration = Duration::from_secs(2);

/// How fast a new static pod must start, whatever else the agent is waiting for.
const START_WITHIN: Duration = Duration::from_secs(1);

/// Every datagram the agent sent to the notify socket, with when it arrived.
struct NotifySocket {
    seen: Arc<Mutex<Vec<(Instant, String)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NotifySocket {
    fn bind(path: &std::path::Path) -> NotifySocket {
        let socket = UnixDatagram::bind(path).expect("bind the notify socket");
        socket.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (sink, done) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !done.load(Ordering::Relaxed) {
                // Timeouts and EINTR (a neighbouring test's child exiting) just go round again.
                if let Ok(n) = socket.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    sink.lock().expect("notify lock").push((Instant::now(), text));
                }
            }
        });
        NotifySocket { seen, stop, thread: Some(thread) }
    }

    fn messages(&self) -> Vec<(Instant, String)> {
        self.seen.lock().expect("notify lock").clone()
    }

    /// When `WATCHDOG=1` arrived, from `since` on.
    fn pings_since(&self, since: Instant) -> Vec<Instant> {
        self.messages()
            .into_iter()
            .filter(|(at, m)| *at >= since && m == "WATCHDOG=1")
            .map(|(at, _)| at)
            .collect()
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A module server that accepts connections and never answers: a pod pulling from it cannot stop
/// until the pull gives up (the fetcher's 30 s read timeout), longer than its grace period.
struct SilentServer {
    port: u16,
    accepted: Arc<AtomicUsize>,
}

impl SilentServer {
    fn start() -> SilentServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the silent server");
        let port = listener.local_addr().expect("address").port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            // Held open, never read from or written to, for the life of the test process.
            let mut open = Vec::new();
            for conn in listener.incoming().map_while(Result::ok) {
                open.push(conn);
                count.fetch_add(1, Ordering::SeqCst);
            }
        });
        SilentServer { port, accepted }
    }
}

/// Waits until the static pod `name` (on node `test-node`) has printed `started`; returns how long
/// that took from `since`.
fn started_after(s: &Scratch, name: &str, since: Instant) -> Duration {
    wait_for(T, &format!("static pod {name} to start"), || {
        s.output(name, "main", 0).iter().any(|l| l == "started").then(|| since.elapsed())
    })
}

/// The longest silence between two `WATCHDOG=1`, counting from `from` to the first and from the
/// last to `to`.
fn longest_gap(pings: &[Instant], from: Instant, to: Instant) -> Duration {
    let mut points = vec![from];
    points.extend(pings.iter().copied().filter(|p| *p >= from && *p <= to));
    points.push(to);
    points.windows(2).map(|w| w[1].duration_since(w[0])).max().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_delete_and_a_pod_slow_to_stop_never_hold_the_main_loop() {
    let api = FakeApi::start().await;
    let node = "test-node";
    let silent = SilentServer::start();
    let s = Scratch::new("");
    let kubeconfig = api.node_kubeconfig(node, s.dir.path()).await;
    // `shutdown_timeout_secs` is the grace a stopping pod gets.
    let config = format!(
        "node_name = {node:?}\nstate_dir = {:?}\nstatic_pod_dir = {:?}\nnode_ip = \"127.0.0.1\"\n\
         shutdown_timeout_secs = 5\ndisk_pressure_percent = 0\nkubeconfig = {:?}\n\
         [modules]\ninsecure_registries = [\"127.0.0.1:{}\"]\n",
        s.state.display().to_string(),
        s.pods.display().to_string(),
        kubeconfig.display().to_string(),
        silent.port,
    );
    std::fs::write(&s.config, config).expect("config");
    let grace = Duration::from_secs(5);
    // A running static pod keeps idle.wat compiled, so the pods started later measure the loop,
    // not the compiler.
    let idle = fixture("idle.wat");
    s.put_pod("warm.yaml", &pod_yaml("warm", &idle, ""));

    let notify = NotifySocket::bind(&s.dir.path().join("notify"));
    let args = s.run_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let socket = s.dir.path().join("notify").display().to_string();
    let usec = WATCHDOG.as_micros().to_string();
    let agent = Agent::start_with_env(
        &args,
        &s.state,
        &[("NOTIFY_SOCKET", socket.as_str()), ("WATCHDOG_USEC", usec.as_str())],
    );
    wait_for(T, "READY=1", || notify.messages().iter().any(|(_, m)| m.starts_with("READY=1")).then_some(()));
    started_after(&s, "warm", Instant::now());
    let nodes: Api<Node> = Api::all(api.client());
    wait_for_async(T, "the node to be Ready", || async {
        let n = nodes.get(node).await.ok()?;
        let ready = n.status?.conditions?.into_iter().any(|c| c.type_ == "Ready" && c.status == "True");
        ready.then_some(())
    })
    .await;

    // A cluster pod stuck pulling its module from the silent server.
    let pods: Api<Pod> = Api::namespaced(api.client(), "default");
    let image = format!("http://127.0.0.1:{}/slow.wasm@sha256:{}", silent.port, "ab".repeat(32));
    let slow: Pod = serde_json::from_value(json!({
        "metadata": {"name": "slow"},
        "spec": {
            "nodeName": node,
            "automountServiceAccountToken": false,
            "containers": [{"name": "main", "image": image}],
        },
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &slow).await.expect("create the slow pod");
    wait_for(T, "the slow pod's pull to reach the silent server", || {
        (silent.accepted.load(Ordering::SeqCst) > 0).then_some(())
    });

    // Deleted: the agent stops it (which takes the whole grace), then confirms the deletion with a
    // DELETE the API server holds for a minute.
    pods.delete("slow", &DeleteParams::default()).await.expect("delete the slow pod");
    let deleted = Instant::now();
    api.faults().hold_deletes(Duration::from_secs(60));
    agent.wait_log(&["stopping pod", "default/slow"], T);

    // While the slow pod takes its grace period to stop.
    let put = Instant::now();
    s.put_pod("quick.yaml", &pod_yaml("quick", &idle, ""));
    let took = started_after(&s, "quick", put);
    assert!(
        took < START_WITHIN,
        "a static pod took {took:?} to start while another pod was stopping\n{}",
        agent.log().join("\n")
    );
    assert_eq!(api.faults().held_deletes(), 0, "the slow pod was still stopping");

    // While the API server holds the DELETE confirming the slow pod's deletion.
    let held =
        wait_for(T, "the agent's DELETE to be held", || (api.faults().held_deletes() > 0).then(Instant::now));
    assert!(
        held.duration_since(deleted) >= grace,
        "the slow pod took its whole grace ({grace:?}) to stop: deletion confirmed after {:?}",
        held.duration_since(deleted)
    );
    let put = Instant::now();
    s.put_pod("quick2.yaml", &pod_yaml("quick2", &idle, ""));
    let took = started_after(&s, "quick2", put);
    assert!(
        took < START_WITHIN,
        "a static pod took {took:?} to start while a DELETE was held\n{}",
        agent.log().join("\n")
    );
    // Three watchdog periods more of the DELETE being held.
    let until = held + 3 * WATCHDOG;
    wait_for(T, "three watchdog periods into the held DELETE", || (Instant::now() >= until).then_some(()));
    let status = s.status_json();
    let keys: Vec<&str> =
        status["pods"].as_array().expect("pods").iter().filter_map(|p| p["key"].as_str()).collect();
    assert!(keys.contains(&"default/quick2-test-node") && !keys.contains(&"default/slow"), "{status}");

    // The watchdog was fed at its rate throughout: from the deletion to now, no silence as long as
    // `WatchdogSec`, which is when systemd would have killed the agent.
    let now = Instant::now();
    let pings = notify.pings_since(deleted);
    let gap = longest_gap(&pings, deleted, now);
    assert!(
        gap < WATCHDOG,
        "the watchdog went unfed for {gap:?} (WatchdogSec is {WATCHDOG:?}); {} pings in {:?}\n{}",
        pings.len(),
        now.duration_since(deleted),
        agent.log().join("\n")
    );
    let expected = now.duration_since(deleted).as_secs_f64() / (WATCHDOG.as_secs_f64() / 2.0);
    assert!(
        pings.len() as f64 >= expected.floor() - 1.0,
        "{} pings, about {expected:.0} expected",
        pings.len()
    );

    // Shutdown is bounded even with a worker stuck in its pull and a DELETE held.
    let stopping = Instant::now();
    let (exit, log) = agent.stop();
    assert!(exit.success(), "{exit:?}\n{}", log.join("\n"));
    assert!(stopping.elapsed() < 3 * grace, "shutdown took {:?}", stopping.elapsed());
    assert!(
        notify.messages().iter().any(|(_, m)| m == "STOPPING=1\nSTATUS=stopping pods"),
        "STOPPING on SIGTERM"
    );
}

/// A static pod edited (a new UID under the same key) while its old version takes its whole grace
/// to stop starts again only once the old one is gone, as when the loop stopped pods inline; other
/// pods start meanwhile.
#[test]
fn a_pod_replaced_while_it_stops_starts_again_only_once_the_old_one_is_gone() {
    let silent = SilentServer::start();
    let s = Scratch::new(&format!("[modules]\ninsecure_registries = [\"127.0.0.1:{}\"]\n", silent.port));
    let grace = Duration::from_secs(5);
    let slow = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: edit\nspec:\n  containers:\n  - name: main\n    image: http://127.0.0.1:{}/slow.wasm@sha256:{}\n",
        silent.port,
        "cd".repeat(32)
    );
    s.put_pod("edit.yaml", &slow);
    let agent = s.start();
    wait_for(T, "the pod's pull to reach the silent server", || {
        (silent.accepted.load(Ordering::SeqCst) > 0).then_some(())
    });

    let edited = Instant::now();
    let idle = fixture("idle.wat");
    s.put_pod("edit.yaml", &pod_yaml("edit", &idle, ""));
    agent.wait_log(&["stopping pod", "default/edit-test-node"], T);
    let put = Instant::now();
    s.put_pod("other.yaml", &pod_yaml("other", &idle, ""));
    let took = started_after(&s, "other", put);
    assert!(took < START_WITHIN, "a static pod took {took:?} to start while another was stopping");

    let running = |s: &Scratch| {
        s.status_json()["pods"]
            .as_array()
            .expect("pods")
            .iter()
            .any(|p| p["key"] == "default/edit-test-node" && p["containers"][0] == "main=running")
    };
    // Still inside the old version's grace, the new one waits.
    let waiting = !running(&s);
    let within = edited.elapsed();
    assert!(
        within < grace && waiting,
        "the edited pod ran {within:?} after the edit, inside its old version's grace"
    );
    wait_for(T, "the edited pod to run", || running(&s).then_some(()));
    let removed = agent.log().iter().position(|l| l.contains("pod removed") && l.contains("edit-test-node"));
    let started = agent
        .log()
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains("starting pod") && l.contains("edit-test-node"))
        .map(|(i, _)| i)
        .nth(1);
    assert!(
        matches!((removed, started), (Some(r), Some(s)) if r < s),
        "the old pod is removed before the new one starts\n{}",
        agent.log().join("\n")
    );
    let (exit, log) = agent.stop();
    assert!(exit.success(), "{exit:?}\n{}", log.join("\n"));
}
