//! Pod workers with the real runtime and a real sled store: restart policies, the kubelet back-off
//! (on paused tokio time), init container order, deadlines, and status that tells the truth.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ContainerStatus, Pod, PodStatus};
use lichen::config::{ContainerLogConfig, ModulesConfig, RuntimeConfig};
use lichen::modules::{ImageOrigin, ModuleCache};
use lichen::pod::spec::{PlanContext, plan};
use lichen::pod::state::Backoff;
use lichen::pod::worker::{self, PodHandle, WorkerDeps};
use lichen::runtime::WasmRuntime;
use lichen::store::{PodRecord, PodSource, SledStore, StateStore};
use lichen_tests::fixture;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

struct Env {
    dir: tempfile::TempDir,
    store: Arc<SledStore>,
    deps: Arc<WorkerDeps>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

fn env(backoff: Backoff) -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(SledStore::open(&dir.path().join("store")).expect("store"));
    let runtime = WasmRuntime::new().expect("runtime");
    let tasks = tokio_util::task::TaskTracker::new();
    let cancel = tokio_util::sync::CancellationToken::new();
    let modules =
        ModuleCache::new(store.clone(), runtime.clone(), &ModulesConfig::default(), &tasks, &cancel)
            .expect("cache");
    let deps = Arc::new(WorkerDeps {
        runtime,
        modules,
        store: store.clone(),
        logs_dir: dir.path().join("logs"),
        log_config: ContainerLogConfig::default(),
        host_ip: Some("127.0.0.1".into()),
        backoff,
        board: Default::default(),
        events: lichen::pod::events::EventRecorder::disabled(),
        mqtt: None,
    });
    Env { dir, store, deps, tracker: TaskTracker::new(), cancel: CancellationToken::new() }
}

impl Env {
    fn start(&self, yaml: &str, counts: BTreeMap<String, u32>) -> PodHandle {
        let pod: Pod = pod_from_json(yaml);
        let rt = RuntimeConfig::default();
        let fixtures = fixtures_dir();
        let pods_dir = self.dir.path().join("pods");
        let ctx = PlanContext {
            node_name: "n",
            host_ip: Some("127.0.0.1"),
            pods_dir: &pods_dir,
            state_dir: self.dir.path(),
            origin: ImageOrigin::Static(&fixtures),
            modules: &ModulesConfig::default(),
            runtime: &rt,
            inputs: None,
        };
        let plan = plan(&pod, &ctx).expect("valid pod");
        self.store
            .put_pod(&PodRecord {
                key: plan.key.clone(),
                uid: plan.uid.clone(),
                source: PodSource::File("test.yaml".into()),
                pod: serde_json::to_value(&pod).expect("json"),
                status: None,
                restart_counts: BTreeMap::new(),
                inputs: None,
            })
            .expect("record");
        let resume = worker::Resume { restart_counts: counts, previous: None };
        worker::spawn(
            plan,
            &PodSource::File("test.yaml".into()),
            resume,
            self.deps.clone(),
            &self.tracker,
            &self.cancel,
        )
    }
}

fn fixtures_dir() -> PathBuf {
    fixture("x").parent().expect("fixtures").to_owned()
}

fn pod_from_json(yaml: &str) -> Pod {
    let v: serde_json::Value = serde_json::from_str(yaml).expect("test pod json");
    serde_json::from_value(v).expect("test pod")
}

fn pod(policy: &str, annotations: &str, init: &[&str], containers: &[&str], extra: &str) -> String {
    let c = |list: &[&str], prefix: &str| {
        list.iter()
            .enumerate()
            .map(|(i, img)| format!(r#"{{"name": "{prefix}{i}", "image": "{img}", "args": ["x"]}}"#))
            .collect::<Vec<_>>()
            .join(",")
    };
    format!(
        r#"{{"metadata": {{"name": "p", "namespace": "default", "uid": "u1", "annotations": {{{annotations}}}}},
            "spec": {{"restartPolicy": "{policy}", {extra} "initContainers": [{}], "containers": [{}]}}}}"#,
        c(init, "i"),
        c(containers, "c")
    )
}

async fn until(h: &PodHandle, what: &str, f: impl Fn(&PodStatus) -> bool) -> PodStatus {
    let mut rx = h.watch();
    let wait = rx.wait_for(|s| f(s));
    match tokio::time::timeout(Duration::from_secs(600), wait).await {
        Ok(Ok(s)) => s.clone(),
        _ => panic!("timed out waiting for {what}; last status: {:#?}", h.status()),
    }
}

fn phase(s: &PodStatus) -> &str {
    s.phase.as_deref().unwrap_or("")
}

fn containers(s: &PodStatus) -> &[ContainerStatus] {
    s.container_statuses.as_deref().unwrap_or(&[])
}

fn condition(s: &PodStatus, kind: &str) -> String {
    s.conditions.iter().flatten().find(|c| c.type_ == kind).map(|c| c.status.clone()).unwrap_or_default()
}

#[tokio::test(start_paused = true)]
async fn crash_loop_backs_off_like_the_kubelet() {
    let e = env(Backoff::default());
    let h = e.start(&pod("Always", "", &[], &["exit.wat"], ""), BTreeMap::new());
    let mut rx = h.watch();
    let mut delays = Vec::new();
    // Runs take no virtual time, so the gaps between back-off entries are the back-off delays.
    let mut last_backoff: Option<tokio::time::Instant> = None;
    let mut gaps = Vec::new();
    let mut seen_restart = u32::MAX;
    while delays.len() < 7 {
        let s = rx.borrow_and_update().clone();
        let c = &containers(&s)[0];
        let state = c.state.as_ref().expect("state");
        if let Some(w) = &state.waiting
            && w.reason.as_deref() == Some("CrashLoopBackOff")
            && seen_restart != c.restart_count as u32
        {
            seen_restart = c.restart_count as u32;
            let msg = w.message.clone().unwrap_or_default();
            let secs: u64 =
                msg.split(['f', 's']).nth(2).and_then(|n| n.trim().parse().ok()).expect("delay in message");
            delays.push(secs);
            assert_eq!(phase(&s), "Running", "a crash-looping Always pod is Running, as in the kubelet");
            assert_eq!(condition(&s, "Ready"), "False");
            let last = c.last_state.as_ref().and_then(|l| l.terminated.as_ref()).expect("lastState");
            assert_eq!((last.exit_code, last.reason.as_deref()), (3, Some("Error")));
            let now = tokio::time::Instant::now();
            if let Some(prev) = last_backoff.replace(now) {
                gaps.push((now - prev).as_secs());
            }
        }
        rx.changed().await.expect("worker alive");
    }
    assert_eq!(delays, vec![10, 20, 40, 80, 160, 300, 300]);
    assert_eq!(gaps, vec![10, 20, 40, 80, 160, 300], "restarts really wait that long");
    // Current-thread runtime: the worker cannot move between these two reads.
    let shown = containers(&h.status())[0].restart_count as u32;
    let counts = e.store.get_pod("default/p").expect("get").expect("record").restart_counts;
    assert!(shown >= 6);
    assert_eq!(counts.get("c0"), Some(&shown), "restart count is recorded in the store");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_failure_pods_succeed_and_never_pods_fail_for_good() {
    let e = env(Backoff::default());
    let ok = e.start(&pod("OnFailure", "", &[], &["hello.wat"], ""), BTreeMap::new());
    let s = until(&ok, "Succeeded", |s| phase(s) == "Succeeded").await;
    let t = containers(&s)[0].state.as_ref().and_then(|st| st.terminated.clone()).expect("terminated");
    assert_eq!((t.exit_code, t.reason.as_deref()), (0, Some("Completed")));
    assert!(containers(&s)[0].image_id.starts_with("sha256:"), "imageID is the module digest");
    assert_eq!(condition(&s, "Ready"), "False");
    let stored = e.store.get_pod("default/p").expect("get").expect("record").status.expect("status");
    assert_eq!(stored["phase"], "Succeeded", "the store holds the last status");

    let e = env(Backoff::default());
    let h = e.start(&pod("Never", "", &[], &["trap.wat"], ""), BTreeMap::new());
    let s = until(&h, "Failed", |s| phase(s) == "Failed").await;
    let t = containers(&s)[0].state.as_ref().and_then(|st| st.terminated.clone()).expect("terminated");
    assert_eq!(t.reason.as_deref(), Some("Trap"));
    assert!(t.message.unwrap_or_default().contains("unreachable"));
    assert_eq!(containers(&s)[0].restart_count, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuel_and_memory_limits_show_in_the_status() {
    let e = env(Backoff::default());
    let h =
        e.start(&pod("Never", r#""lichen.dev/fuel": "2000000""#, &[], &["loop.wat"], ""), BTreeMap::new());
    let s = until(&h, "Failed", |s| phase(s) == "Failed").await;
    let t = containers(&s)[0].state.as_ref().and_then(|st| st.terminated.clone()).expect("terminated");
    assert_eq!((t.exit_code, t.reason.as_deref()), (137, Some("OutOfFuel")));
    assert_eq!(t.message.as_deref(), Some("fuel budget of 2000000 exhausted"));

    let e = env(Backoff::default());
    let yaml = pod("Never", "", &[], &["membomb.wat"], "")
        .replace(r#""args": ["x"]"#, r#""args": ["x"], "resources": {"limits": {"memory": "2Mi"}}"#);
    let h = e.start(&yaml, BTreeMap::new());
    let s = until(&h, "Failed", |s| phase(s) == "Failed").await;
    let t = containers(&s)[0].state.as_ref().and_then(|st| st.terminated.clone()).expect("terminated");
    assert_eq!(t.reason.as_deref(), Some("OOMKilled"));
    assert!(t.message.unwrap_or_default().contains("2097152"), "names the limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_containers_run_in_order_before_the_app() {
    let e = env(Backoff::default());
    let h = e.start(&pod("Never", "", &["hello.wat", "hello.wat"], &["sleeper.wat"], ""), BTreeMap::new());
    let s = until(&h, "Running", |s| phase(s) == "Running").await;
    let init = s.init_container_statuses.clone().expect("init statuses");
    for c in &init {
        let t = c.state.as_ref().and_then(|st| st.terminated.clone()).expect("init finished");
        assert_eq!(t.reason.as_deref(), Some("Completed"));
    }
    let t0 = init[0].state.as_ref().and_then(|s| s.terminated.as_ref()).and_then(|t| t.finished_at.clone());
    let t1 = init[1].state.as_ref().and_then(|s| s.terminated.as_ref()).and_then(|t| t.started_at.clone());
    assert!(t0.expect("finished").0 <= t1.expect("started").0, "second init starts after the first ends");
    assert_eq!(condition(&s, "Initialized"), "True");
    assert_eq!(condition(&s, "Ready"), "True");
    assert!(h.stop(Duration::from_secs(5)).await, "stops promptly");

    // A failing init container under Never fails the pod and the app never starts.
    let e = env(Backoff::default());
    let h = e.start(&pod("Never", "", &["exit.wat"], &["sleeper.wat"], ""), BTreeMap::new());
    let s = until(&h, "Failed", |s| phase(s) == "Failed").await;
    let app = containers(&s)[0].state.as_ref().and_then(|st| st.waiting.clone()).expect("app waiting");
    assert_eq!(app.reason.as_deref(), Some("PodInitializing"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_deadline_fails_the_pod() {
    let e = env(Backoff::default());
    let h =
        e.start(&pod("Always", "", &[], &["sleeper.wat"], r#""activeDeadlineSeconds": 1,"#), BTreeMap::new());
    let s = until(&h, "Failed", |s| phase(s) == "Failed").await;
    assert_eq!(s.reason.as_deref(), Some("DeadlineExceeded"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_counts_carry_over_and_invalid_modules_crash_loop() {
    let e =
        env(Backoff::new(Duration::from_millis(50), Duration::from_millis(100), Duration::from_secs(600)));
    std::fs::write(e.dir.path().join("bad.wasm"), b"not wasm at all").expect("write");
    let yaml = pod("Always", "", &[], &[&format!("file://{}/bad.wasm", e.dir.path().display())], "");
    let h = e.start(&yaml, BTreeMap::from([("c0".to_string(), 5)]));
    assert_eq!(containers(&h.status())[0].restart_count, 5, "counts from the store are the starting point");
    let s = until(&h, "two restarts", |s| containers(s)[0].restart_count >= 7).await;
    let c = &containers(&s)[0];
    let last = c.last_state.as_ref().and_then(|l| l.terminated.clone()).expect("lastState");
    assert_eq!((last.reason.as_deref(), last.exit_code), (Some("InvalidModule"), 128));
    assert!(last.message.unwrap_or_default().contains("not a valid WebAssembly module"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_module_file_waits_like_an_image_pull() {
    let e =
        env(Backoff::new(Duration::from_millis(50), Duration::from_millis(100), Duration::from_secs(600)));
    let path = e.dir.path().join("later.wat");
    let yaml = pod("Always", "", &[], &[&format!("file://{}", path.display())], "");
    let h = e.start(&yaml, BTreeMap::new());
    let s = until(&h, "ImagePullBackOff", |s| {
        containers(s)[0].state.as_ref().and_then(|st| st.waiting.as_ref()).and_then(|w| w.reason.as_deref())
            == Some("ImagePullBackOff")
    })
    .await;
    assert_eq!(phase(&s), "Pending");
    std::fs::copy(fixture("sleeper.wat"), &path).expect("copy");
    until(&h, "Running", |s| phase(s) == "Running").await;
}
