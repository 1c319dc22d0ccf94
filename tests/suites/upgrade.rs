//! The agent's own upgrades, on the node's side of the switch: the launcher booting a new agent on
//! trial, the health gate committing it or handing back, and a new agent that dies on trial rolled
//! back by the next start. Each test starts from the state a step of an upgrade leaves on disk
//! (written with the agent's own record code), then runs the real binaries: the test build as the
//! packaged launcher, and a copy of it stamped with another build id as the new agent.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, Patch, PatchParams};
use lichen::layout::StateLayout;
use lichen::upgrade::slots::{Slot, Slots, SwitchRecord, Trial};
use lichen::upgrade::{IMAGE_ANNOTATION, Phase, UPGRADE_ANNOTATION, UpgradeReport, VERSION_ANNOTATION};
use lichen_tests::agent_image::{
    annotate, fleet_upgrade, node_events, p256_key, push_agent, upgrade_outcome,
};
use lichen_tests::fakeapi::FakeApi;
use lichen_tests::registry::{FaultMode, FaultProxy, Registry};
use lichen_tests::{Agent, Scratch, fixture, lichen_bin, node_condition, pod_yaml, wait_for, wait_for_async};

const T: Duration = Duration::from_secs(60);
/// How long an upgrade's outcome may take to reach the Node (a debug build's download and switch).
const T2: Duration = Duration::from_secs(120);
const IMAGE: &str =
    "127.0.0.1:5000/lichen/agent@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// A copy of the test build stamped with build id `id`: another version of the agent.
fn stamped(dir: &Path, id: &str) -> (PathBuf, String) {
    lichen_tests::agent_image::stamped_copy(&lichen_bin(), dir, id)
}

fn sha256_hex(path: &Path) -> String {
    let digest = lichen_tests::registry::sha256_digest(&std::fs::read(path).expect("read"));
    digest.trim_start_matches("sha256:").to_owned()
}

/// Stages `binary` as the upgrade's download would, and records a trial of it with `boots`.
fn stage_trial(s: &Scratch, binary: &Path, version: &str, boots: u32, had_contact: bool) -> Slot {
    let slots = Slots::new(&StateLayout::new(&s.state));
    let digest = sha256_hex(binary);
    let download = s.dir.path().join("download.part");
    std::fs::copy(binary, &download).expect("copy");
    slots.stage(&download, &digest).expect("stage");
    let slot = Slot { image: IMAGE.into(), digest, version: version.into() };
    let from = lichen::version::version();
    let record = SwitchRecord {
        trial: Some(Trial { slot: slot.clone(), boots, had_contact, from_version: from }),
        ..SwitchRecord::default()
    };
    slots.save(&record).expect("save the record");
    slot
}

fn record(s: &Scratch) -> SwitchRecord {
    Slots::new(&StateLayout::new(&s.state)).load().expect("the record reads")
}

/// The version the running agent reports through `lichen status` (`None` until one answers).
fn running_version(s: &Scratch) -> Option<String> {
    let out = s.status_output();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    (status["agent_running"] == true).then(|| status["agent_version"].as_str().map(str::to_owned)).flatten()
}

/// Waits until the packaged agent (the test build, no upgrade) answers as running; its process
/// must run the test build's own binary.
fn wait_packaged(s: &Scratch, pid: u32) {
    wait_for(T, "the packaged agent to run", || {
        running_version(s).filter(|v| *v == lichen::version::version())
    });
    assert_eq!(exe(pid), packaged_exe(), "the packaged binary runs");
}

/// The test build's own binary: the packaged launcher in these tests.
fn packaged_exe() -> PathBuf {
    std::fs::canonicalize(lichen_bin()).expect("canonical")
}

fn exe(pid: u32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).expect("the agent's executable")
}

#[test]
fn a_staged_trial_is_booted_by_the_launcher_passes_its_gate_and_stays_committed() {
    let s = Scratch::new("");
    s.put_pod("tick.yaml", &pod_yaml("tick", &fixture("sleeper.wat"), ""));
    let (v2, version) = stamped(s.dir.path(), "test.2");
    assert_ne!(version, lichen::version::version());
    // Power was cut after the switch was recorded and before the old agent handed over.
    let slot = stage_trial(&s, &v2, &version, 0, false);
    let agent = s.start();
    let staged = Slots::new(&StateLayout::new(&s.state)).binary(&slot.digest);
    wait_for(T, "the new agent to run and commit itself", || {
        let r = record(&s);
        (r.committed.as_ref() == Some(&slot) && r.trial.is_none()).then_some(r)
    });
    assert_eq!(exe(agent.pid()), staged, "the launcher exec'ed the staged binary in its own process");
    wait_for(T, "the new agent to answer as running", || running_version(&s).filter(|v| *v == version));
    let r = record(&s);
    let report = r.report.expect("an outcome to report");
    assert_eq!(report.phase, Phase::Succeeded);
    assert_eq!(report.version.as_deref(), Some(version.as_str()));
    assert!(r.report_pending, "reported to the Node once connected (this node is standalone)");
    assert!(agent.stop().0.success());

    // From now on the launcher starts the committed version.
    let agent = s.start();
    wait_for(T, "the committed version to run again", || running_version(&s).filter(|v| *v == version));
    assert_eq!(exe(agent.pid()), staged);
    assert!(agent.stop().0.success());
}

#[test]
fn a_new_agent_that_died_on_trial_is_rolled_back_and_not_tried_again() {
    let s = Scratch::new("");
    let (v2, version) = stamped(s.dir.path(), "test.3");
    // The launcher had booted it (boots = 1), and it never committed: a crash, the watchdog, a
    // power cut.
    stage_trial(&s, &v2, &version, 1, false);
    let agent = s.start();
    wait_packaged(&s, agent.pid());
    let r = record(&s);
    assert_eq!(r.trial, None);
    assert_eq!(r.refused.as_deref(), Some(IMAGE), "not tried again until the annotation changes");
    let report = r.report.expect("an outcome");
    assert_eq!(report.phase, Phase::RolledBack);
    assert!(report.reason.contains("before passing its health gate"), "{}", report.reason);
    // What the operator on the board sees.
    let status = s.status_json();
    assert_eq!(status["upgrade"]["phase"], "RolledBack", "{status}");
    assert_eq!(status["upgrade"]["version"], version.as_str(), "{status}");
    assert!(agent.stop().0.success());
}

#[test]
fn a_new_agent_that_exits_at_start_is_rolled_back_by_the_next_start() {
    let s = Scratch::new("");
    // Not a Lichen at all: it exits at once, as a broken build would.
    let broken = s.dir.path().join("broken");
    std::fs::write(&broken, "#!/bin/sh\nexit 3\n").expect("write");
    stage_trial(&s, &broken, "0.9.0", 0, false);
    let agent = s.start();
    let (status, _) = agent.wait(T);
    assert_eq!(status.code(), Some(3), "the process the launcher exec'ed was the broken agent");
    // systemd restarts the service: the launcher finds the trial booted and rolls back.
    let agent = s.start();
    wait_packaged(&s, agent.pid());
    let report = record(&s).report.expect("an outcome");
    assert_eq!((report.phase, report.version.as_deref()), (Phase::RolledBack, Some("0.9.0")));
    assert!(agent.stop().0.success());
}

#[test]
fn a_new_agent_failing_its_health_gate_hands_back_to_the_version_before() {
    let s = Scratch::new("[upgrade]\nhealth_timeout_secs = 10\n");
    let (v2, version) = stamped(s.dir.path(), "test.4");
    // The old agent had reached the API server; this standalone node never will, so the gate
    // cannot pass.
    stage_trial(&s, &v2, &version, 0, true);
    let agent = s.start();
    let report = wait_for(T, "the gate to fail and the rollback to be recorded", || {
        record(&s).report.filter(|r| r.phase == Phase::RolledBack)
    });
    assert!(report.reason.contains("health gate timed out"), "{}", report.reason);
    assert!(report.reason.contains("API server"), "{}", report.reason);
    // The version before, in the same process.
    wait_packaged(&s, agent.pid());
    assert_eq!(record(&s).committed, None);
    assert!(agent.stop().0.success());
}

// ---------------------------------------------------------------------------------------------
// The whole path: published, signed, annotated, switched, reported (fake API server, real
// registry, the real binaries)
// ---------------------------------------------------------------------------------------------

/// A registry, a fake API server and node `name` joined to it, trusting `trusted` (PEM public key
/// files) for upgrades; the node is Ready when this returns.
async fn fleet_node(name: &str, trusted: &[&Path], extra: &str) -> (Registry, FakeApi, Scratch, Agent) {
    let reg = Registry::start();
    let api = FakeApi::start().await;
    let (s, agent) = join_node(&api, &reg, name, trusted, extra).await;
    (reg, api, s, agent)
}

/// Node `name` joined to `api` with node credentials, pulling from `reg` and trusting `trusted`
/// for upgrades, `extra` after its `[upgrade]` table; Ready when this returns.
async fn join_node(
    api: &FakeApi,
    reg: &Registry,
    name: &str,
    trusted: &[&Path],
    extra: &str,
) -> (Scratch, Agent) {
    let s = Scratch::new("");
    let kc = api.node_kubeconfig(name, s.dir.path()).await;
    let keys: Vec<String> = trusted.iter().map(|p| format!("{:?}", p.display().to_string())).collect();
    let config = format!(
        "node_name = {name:?}\nstate_dir = {:?}\nstatic_pod_dir = \"\"\nnode_ip = \"127.0.0.1\"\n\
         shutdown_timeout_secs = 5\ndisk_pressure_percent = 0\nkubeconfig = {:?}\n{}\
         insecure_registries = [{:?}]\n[upgrade]\ntrusted_keys = [{}]\n{extra}",
        s.state.display().to_string(),
        kc.display().to_string(),
        s.modules_table(),
        reg.host(),
        keys.join(", ")
    );
    std::fs::write(&s.config, config).expect("config");
    let agent = s.start();
    let nodes: Api<Node> = Api::all(api.client());
    wait_for_async(T, "the node to be Ready", || async {
        let n = nodes.get(name).await.ok()?;
        (node_condition(&n, "Ready")? == "True").then_some(())
    })
    .await;
    (s, agent)
}

/// The ticker pod's line times (ns since the epoch, as it wrote them), from every log file the
/// node keeps for it, sorted.
fn ticks(s: &Scratch) -> Vec<i64> {
    fn files(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                files(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut paths = Vec::new();
    files(&s.state.join("logs"), &mut paths);
    let mut times: Vec<i64> = paths
        .iter()
        .filter(|p| p.to_string_lossy().contains("tick"))
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|text| {
            text.lines().filter_map(|l| l.rsplit(' ').next()?.parse::<i64>().ok()).collect::<Vec<_>>()
        })
        .collect();
    times.sort_unstable();
    times.dedup();
    times
}

/// The body bytes of a GET the registry served, from its access-log line (`"GET … HTTP/1.1" 200
/// 1234 …`).
fn served_bytes(line: &str) -> Option<u64> {
    let (_, rest) = line.split_once("\"GET ")?;
    let (_, after) = rest.split_once("\" ")?;
    let mut fields = after.split_whitespace();
    let status: u16 = fields.next()?.parse().ok()?;
    (200..300).contains(&status).then(|| fields.next()?.parse().ok()).flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_annotated_node_upgrades_itself_to_a_signed_image_and_reports_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, public) = p256_key(dir.path(), "fleet");
    let (reg, api, s, agent) = fleet_node("pi-up", &[public.as_path()], "").await;
    let (v2, version) = stamped(dir.path(), "test.5");
    let image = push_agent(&s.config, &v2, &format!("{}/fleet/lichen:next", reg.host()), Some(key.as_path()));
    let nodes: Api<Node> = Api::all(api.client());
    let before = nodes.get("pi-up").await.expect("node");
    let running = before.metadata.annotations.as_ref().and_then(|a| a.get(VERSION_ANNOTATION)).cloned();
    assert_eq!(
        running.as_deref().and_then(lichen::upgrade::parse_version_annotation).map(|(v, _)| v.to_owned()),
        Some(lichen::version::version()),
        "the node reports what runs"
    );

    // A pod ticking every 100 ms through the switch: each line carries the time it was written.
    let pods: Api<Pod> = Api::namespaced(api.client(), "default");
    let ticker = serde_json::json!({
        "metadata": {"name": "tick"},
        "spec": {
            "nodeName": "pi-up",
            "automountServiceAccountToken": false,
            "containers": [{"name": "main", "image": format!("file://{}", fixture("ticker.wat").display()),
                            "args": ["100000", "100000000"]}]
        }
    });
    pods.create(&Default::default(), &serde_json::from_value(ticker).expect("pod"))
        .await
        .expect("create the pod");
    wait_for(T, "the ticker's first lines", || (ticks(&s).len() >= 3).then_some(()));

    let log_mark = reg.log().len();
    let annotated = std::time::Instant::now();
    annotate(&api.client, "pi-up", &image).await;
    let report = upgrade_outcome(&api.client, "pi-up", &image, T2).await;
    let took = annotated.elapsed();
    let after = ticks(&s).last().copied().expect("ticks");
    wait_for(T, "the ticker to tick under the new agent", || {
        (ticks(&s).iter().filter(|t| **t > after).count() >= 3).then_some(())
    });
    let gap = ticks(&s).windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
    let pod = pods.get("tick").await.expect("the pod");
    assert_eq!(pod.status.and_then(|s| s.phase).as_deref(), Some("Running"), "the pod kept running");
    assert_eq!(report.phase, Phase::Succeeded, "{report:?}");
    assert_eq!(report.version.as_deref(), Some(version.as_str()));
    let node = wait_for_async(T, "the new version on the Node", || async {
        let n = nodes.get("pi-up").await.ok()?;
        let v = n.metadata.annotations.as_ref()?.get(VERSION_ANNOTATION)?.clone();
        v.starts_with(&format!("{version} sha256:")).then_some(n)
    })
    .await;
    let kubelet_version =
        node.status.and_then(|s| s.node_info).map(|i| i.kubelet_version).unwrap_or_default();
    assert!(kubelet_version.ends_with("-lichen+test.5"), "nodeInfo.kubeletVersion {kubelet_version}");
    let events = node_events(&api.client, "pi-up").await;
    let reasons: Vec<&str> = events.iter().map(|(r, _, _)| r.as_str()).collect();
    assert_eq!(reasons, ["UpgradeStarted", "UpgradeSucceeded"], "{events:?}");
    assert!(events.iter().all(|(_, t, _)| t == "Normal"), "{events:?}");
    let staged = Slots::new(&StateLayout::new(&s.state)).binary(&sha256_hex(&v2));
    assert_eq!(exe(agent.pid()), staged, "the new agent runs in the agent's own process");
    // Everything the node fetched from the registry for the upgrade, from its access log.
    let fetched: u64 = reg.log()[log_mark..].iter().filter_map(|l| served_bytes(l)).sum();
    let binary = std::fs::metadata(&v2).expect("binary").len();
    assert!(
        fetched >= binary && fetched < binary + 64 * 1024,
        "fetched {fetched} bytes for a {binary}-byte binary"
    );
    eprintln!(
        "figures: annotation to committed {:.1}s, pod output gap at the switch {:.2}s, {fetched} bytes fetched for a {binary}-byte binary (+{} of index, manifests, config and signature; debug build, loopback registry)",
        took.as_secs_f64(),
        gap as f64 / 1e9,
        fetched - binary
    );
    assert!(agent.stop().0.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_wrongly_signed_unpinned_foreign_and_missing_images_are_refused_with_the_reason_on_the_node()
{
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, public) = p256_key(dir.path(), "fleet");
    let (stranger, _) = p256_key(dir.path(), "stranger");
    let (reg, api, s, agent) = fleet_node("pi-no", &[public.as_path()], "").await;
    // Two builds: a signature belongs to an image's digest, and the same binary pushed twice is
    // the same image.
    let (v2, _) = stamped(dir.path(), "test.6");
    let (v3, _) = stamped(dir.path(), "test.7");
    // A build for another machine, signed by the trusted key: its ELF header names the other
    // 64-bit machine (nothing runs it).
    let mut foreign = std::fs::read(&v3).expect("read");
    let other: u16 = if std::env::consts::ARCH == "aarch64" { 62 } else { 183 };
    foreign[18..20].copy_from_slice(&other.to_le_bytes());
    let foreign_path = dir.path().join("lichen-foreign");
    std::fs::write(&foreign_path, &foreign).expect("write");
    let repo = format!("{}/fleet/lichen", reg.host());
    let cases = [
        (push_agent(&s.config, &v2, &format!("{repo}:unsigned"), None), "unsigned"),
        (push_agent(&s.config, &v3, &format!("{repo}:stranger"), Some(stranger.as_path())), "bad signature"),
        (format!("{repo}:unsigned"), "not pinned by digest"),
        (
            push_agent(&s.config, &foreign_path, &format!("{repo}:foreign"), Some(key.as_path())),
            "binary (it has: linux/",
        ),
        (format!("{repo}@sha256:{}", "0".repeat(64)), "not found"),
    ];
    for (image, why) in &cases {
        annotate(&api.client, "pi-no", image).await;
        let report = upgrade_outcome(&api.client, "pi-no", image, T2).await;
        assert_eq!(report.phase, Phase::Failed, "{report:?}");
        assert!(report.reason.contains(why), "{image}: {:?} should say {why:?}", report.reason);
    }
    let events = node_events(&api.client, "pi-no").await;
    let failed = events.iter().filter(|(r, t, _)| r == "UpgradeFailed" && t == "Warning").count();
    assert_eq!(failed, cases.len(), "{events:?}");
    // Nothing was switched: the agent that started is the one running.
    assert_eq!(exe(agent.pid()), packaged_exe());
    assert!(Slots::new(&StateLayout::new(&s.state)).staged().is_empty(), "nothing was staged");
    assert!(agent.stop().0.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_download_resumes_after_the_restart_and_completes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, public) = p256_key(dir.path(), "fleet");
    let (reg, api, s, agent) = fleet_node("pi-cut", &[public.as_path()], "").await;
    let (proxy, restart) = through_a_proxy(&reg, &s, agent);
    let agent = restart();
    let (v2, version) = stamped(dir.path(), "test.8");
    let binary = std::fs::metadata(&v2).expect("binary").len();
    let image = push_agent(&s.config, &v2, &format!("{}/fleet/lichen:cut", reg.host()), Some(key.as_path()))
        .replace(&reg.host(), &proxy.host());

    // The first transfer stops after 30 MB; the node would retry, but is killed while it waits.
    proxy.set_mode(FaultMode::CutAfter(30_000_000));
    annotate(&api.client, "pi-cut", &image).await;
    let part = cut_download(&s, 20_000_000);
    drop(agent); // SIGKILL, as a power cut would
    proxy.set_mode(FaultMode::Pass);
    let log_mark = reg.log().len();
    let agent = restart();
    let report = upgrade_outcome(&api.client, "pi-cut", &image, T2).await;
    assert_eq!(
        (report.phase, report.version.as_deref()),
        (Phase::Succeeded, Some(version.as_str())),
        "{report:?}"
    );
    // The restart resumed from what was on disk: the rest of the blob, by a range request.
    let resumed: Vec<String> =
        reg.log()[log_mark..].iter().filter(|l| l.contains("\" 206 ")).cloned().collect();
    assert!(!resumed.is_empty(), "no range request after the restart: {:?}", &reg.log()[log_mark..]);
    let rest: u64 = resumed.iter().filter_map(|l| served_partial(l)).sum();
    assert!(rest <= binary - part + 1, "resumed with {rest} bytes; {part} of {binary} were on disk");
    let staged = Slots::new(&StateLayout::new(&s.state)).binary(&sha256_hex(&v2));
    assert_eq!(exe(agent.pid()), staged);
    assert!(agent.stop().0.success());
}

/// Stops `agent` and returns a proxy in front of `reg` (which can cut a download short) and how to
/// start the agent again reaching the registry through it too.
fn through_a_proxy<'a>(
    reg: &Registry,
    s: &'a Scratch,
    agent: Agent,
) -> (FaultProxy, impl Fn() -> Agent + 'a) {
    let proxy = FaultProxy::start(reg);
    let registries = format!("{},{}", reg.host(), proxy.host());
    assert!(agent.stop().0.success());
    let restart = move || {
        let args = s.run_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Agent::start_with_env(&args, &s.state, &[("LICHEN_INSECURE_REGISTRIES", registries.as_str())])
    };
    (proxy, restart)
}

/// Waits for a download cut short on disk (a `.part` of at least `bytes`); returns its length.
fn cut_download(s: &Scratch, bytes: u64) -> u64 {
    let download = s.state.join("agent/download");
    wait_for(T, "a cut download on disk", || {
        let p = std::fs::read_dir(&download)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "part"))?;
        let len = std::fs::metadata(&p).ok()?.len();
        (len >= bytes).then_some(len)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_under_way_when_the_api_server_goes_finishes_and_reports_when_it_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, public) = p256_key(dir.path(), "fleet");
    let (reg, api, s, agent) = fleet_node("pi-off", &[public.as_path()], "").await;
    let (proxy, restart) = through_a_proxy(&reg, &s, agent);
    let agent = restart();
    let nodes: Api<Node> = Api::all(api.client());
    wait_for_async(T, "the node Ready again", || async {
        let n = nodes.get("pi-off").await.ok()?;
        (node_condition(&n, "Ready")? == "True").then_some(())
    })
    .await;
    let (v2, version) = stamped(dir.path(), "test.9");
    let image = push_agent(&s.config, &v2, &format!("{}/fleet/lichen:off", reg.host()), Some(key.as_path()))
        .replace(&reg.host(), &proxy.host());
    // The download is held back (cut every 5 MB) until the API server is gone and the node knows.
    proxy.set_mode(FaultMode::CutAfter(5_000_000));
    annotate(&api.client, "pi-off", &image).await;
    cut_download(&s, 4_000_000);
    api.faults().stop().await;
    wait_for(T, "the node to notice the API server is gone", || {
        let status: serde_json::Value = serde_json::from_slice(&s.status_output().stdout).ok()?;
        status["contact"]["down_since"].as_str().map(drop)
    });
    proxy.set_mode(FaultMode::Pass);
    let staged = Slots::new(&StateLayout::new(&s.state)).binary(&sha256_hex(&v2));
    let committed =
        wait_for(Duration::from_secs(180), "the new agent committed without the API server", || {
            record(&s).committed.filter(|c| c.version == version)
        });
    assert_eq!(exe(agent.pid()), staged);
    assert!(record(&s).report_pending, "the outcome waits for the link");
    api.faults().start().await;
    let report = upgrade_outcome(&api.client, "pi-off", &image, T2).await;
    assert_eq!(
        (report.phase, report.version.as_deref()),
        (Phase::Succeeded, Some(committed.version.as_str()))
    );
    let events = node_events(&api.client, "pi-off").await;
    assert!(events.iter().any(|(r, _, _)| r == "UpgradeSucceeded"), "{events:?}");
    assert!(agent.stop().0.success());
}

/// The body bytes of a 206 the registry served, from its access-log line.
fn served_partial(line: &str) -> Option<u64> {
    let (_, after) = line.split_once("\" 206 ")?;
    after.split_whitespace().next()?.parse().ok()
}

const FLEET: [&str; 3] = ["fleet-a", "fleet-b", "fleet-c"];
const FLEET_LABELS: &str = "[node_labels]\n\"lichen.dev/fleet\" = \"waves\"\n";

/// The fake API server's request index of the first successful PATCH of Node `node` by a user
/// `user` accepts, with a body containing every one of `needles`.
fn write_index(api: &FakeApi, user: impl Fn(&str) -> bool, node: &str, needles: &[&str]) -> Option<usize> {
    let path = format!("/api/v1/nodes/{node}");
    api.requests().iter().position(|r| {
        r.method == "PATCH"
            && user(&r.user)
            && r.path_only() == path
            && r.code < 300
            && needles.iter().all(|n| r.body.contains(n))
    })
}

fn annotations(node: &Node) -> std::collections::BTreeMap<String, String> {
    node.metadata.annotations.clone().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_upgrade_rolls_a_signed_image_out_in_waves_and_prints_the_outcomes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, public) = p256_key(dir.path(), "fleet");
    let reg = Registry::start();
    let api = FakeApi::start().await;
    let mut agents = Vec::new();
    for name in FLEET {
        agents.push(join_node(&api, &reg, name, &[public.as_path()], FLEET_LABELS).await);
    }
    let (v2, version) = stamped(dir.path(), "test.8");
    let image =
        push_agent(&agents[0].0.config, &v2, &format!("{}/fleet/lichen:waves", reg.host()), Some(&key));
    let admin = api.admin_kubeconfig(dir.path());

    let run = fleet_upgrade(&admin, "lichen.dev/fleet=waves", &image, 2).await;
    assert!(run.status.success(), "{}{}", run.stdout, run.stderr);
    for node in FLEET {
        assert_eq!(run.row(node)[..3], [node, "Succeeded", version.as_str()], "{}", run.stdout);
    }
    assert!(
        run.line_index("wave 1/2: fleet-a, fleet-b") < run.line_index("wave 2/2: fleet-c"),
        "{}",
        run.stdout
    );

    // The order, as the API server saw it: the third node was annotated only after the first two
    // had reported their success (with their own credentials).
    let operator = |user: &str| !user.starts_with("system:node:");
    let annotated = |node: &str| write_index(&api, operator, node, &[IMAGE_ANNOTATION]);
    let succeeded = |node: &str| {
        let own = format!("system:node:{node}");
        write_index(&api, |user| user == own, node, &[UPGRADE_ANNOTATION, "Succeeded"])
    };
    let (a, b, c) = (succeeded("fleet-a"), succeeded("fleet-b"), annotated("fleet-c"));
    assert!(a.is_some() && b.is_some() && c.is_some(), "{a:?} {b:?} {c:?}");
    assert!(annotated("fleet-a") < a && annotated("fleet-b") < b, "annotated, then reported");
    assert!(
        c > a && c > b,
        "fleet-c annotated at request {c:?}, after fleet-a {a:?} and fleet-b {b:?} reported"
    );

    let nodes: Api<Node> = Api::all(api.client());
    let staged = sha256_hex(&v2);
    for (name, (s, agent)) in FLEET.iter().zip(&agents) {
        let n = nodes.get(name).await.expect("node");
        let running = annotations(&n).get(VERSION_ANNOTATION).cloned().unwrap_or_default();
        assert!(running.starts_with(&format!("{version} sha256:")), "{name}: {running}");
        let events = node_events(&api.client, name).await;
        let reasons: Vec<&str> = events.iter().map(|(r, _, _)| r.as_str()).collect();
        assert_eq!(reasons, ["UpgradeStarted", "UpgradeSucceeded"], "{name}: {events:?}");
        let binary = Slots::new(&StateLayout::new(&s.state)).binary(&staged);
        assert_eq!(exe(agent.pid()), binary, "{name}: the new agent runs in the agent's own process");
    }

    // Run again: every node already runs it, nothing is annotated, and it says so.
    let again = fleet_upgrade(&admin, "lichen.dev/fleet=waves", &image, 2).await;
    assert!(again.status.success(), "{}", again.stdout);
    for node in FLEET {
        assert_eq!(again.row(node)[..3], [node, "Skipped", version.as_str()]);
    }
    assert!(!again.stdout.contains("wave "), "{}", again.stdout);
    for (_, agent) in agents {
        assert!(agent.stop().0.success());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_upgrade_stops_after_a_wave_with_a_failure_and_leaves_the_rest_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, public) = p256_key(dir.path(), "fleet");
    let (_, other) = p256_key(dir.path(), "other");
    let reg = Registry::start();
    let api = FakeApi::start().await;
    // fleet-b was baked with another key than the one the image is signed with. (A node baked with
    // no key at all does not watch for upgrades: the rollout would time out on it instead.)
    let mut agents = Vec::new();
    for name in FLEET {
        let trusted: &[&Path] = if name == "fleet-b" { &[other.as_path()] } else { &[public.as_path()] };
        agents.push(join_node(&api, &reg, name, trusted, FLEET_LABELS).await);
    }
    let (v2, version) = stamped(dir.path(), "test.9");
    let image =
        push_agent(&agents[0].0.config, &v2, &format!("{}/fleet/lichen:waves", reg.host()), Some(&key));
    let admin = api.admin_kubeconfig(dir.path());

    let run = fleet_upgrade(&admin, "lichen.dev/fleet=waves", &image, 2).await;
    assert_eq!(run.status.code(), Some(1), "{}{}", run.stdout, run.stderr);
    assert_eq!(
        run.row("fleet-a")[..3],
        ["fleet-a", "Succeeded", version.as_str()],
        "the wave ran to its end"
    );
    let b = run.row("fleet-b");
    assert_eq!(b[..3], ["fleet-b", "Failed", "-"]);
    assert!(b.join(" ").contains("bad signature"), "the node's own reason: {b:?}");
    assert_eq!(run.row("fleet-c")[..2], ["fleet-c", "NotStarted"]);
    assert!(!run.stdout.contains("wave 2/2"), "{}", run.stdout);

    let nodes: Api<Node> = Api::all(api.client());
    let c = nodes.get("fleet-c").await.expect("node");
    assert_eq!(annotations(&c).get(IMAGE_ANNOTATION), None, "fleet-c was never annotated");
    assert_eq!(annotations(&c).get(UPGRADE_ANNOTATION), None);
    let b = nodes.get("fleet-b").await.expect("node");
    let report: UpgradeReport =
        serde_json::from_str(&annotations(&b)[UPGRADE_ANNOTATION]).expect("fleet-b's report");
    assert_eq!((report.image.as_str(), report.phase), (image.as_str(), Phase::Failed));
    // A tag is refused before anything is touched.
    let tag =
        fleet_upgrade(&admin, "lichen.dev/fleet=waves", &format!("{}/fleet/lichen:waves", reg.host()), 2)
            .await;
    assert_eq!(tag.status.code(), Some(1));
    assert!(tag.stderr.contains("not pinned by digest"), "{}", tag.stderr);
    assert_eq!(annotations(&nodes.get("fleet-c").await.expect("node")).get(IMAGE_ANNOTATION), None);

    // The operator fixes fleet-b (the fleet's key baked in, the agent restarted), removes its
    // annotation so that it tries the image again, and runs the command again: fleet-a is skipped,
    // fleet-b's refusal from the first run is not taken for its answer, and both others upgrade.
    let (b_scratch, b_agent) = agents.remove(1);
    assert!(b_agent.stop().0.success());
    let clear = serde_json::json!({"metadata": {"annotations": {IMAGE_ANNOTATION: null}}});
    nodes.patch("fleet-b", &PatchParams::default(), &Patch::Merge(&clear)).await.expect("clear");
    let config = std::fs::read_to_string(&b_scratch.config).expect("config");
    let other = other.display().to_string();
    assert!(config.contains(&other));
    std::fs::write(&b_scratch.config, config.replace(&other, &public.display().to_string())).expect("config");
    let b_agent = b_scratch.start();
    // The node found its Node without the annotation: its refusal of the image is lifted (so that
    // the same image, set again, is tried).
    wait_for(T, "fleet-b to lift its refusal", || record(&b_scratch).refused.is_none().then_some(()));
    wait_for_async(T, "fleet-b Ready again", || async {
        (node_condition(&nodes.get("fleet-b").await.ok()?, "Ready")? == "True").then_some(())
    })
    .await;
    agents.insert(1, (b_scratch, b_agent));
    let again = fleet_upgrade(&admin, "lichen.dev/fleet=waves", &image, 2).await;
    assert!(again.status.success(), "{}{}", again.stdout, again.stderr);
    assert_eq!(again.row("fleet-a")[..3], ["fleet-a", "Skipped", version.as_str()]);
    assert_eq!(again.row("fleet-b")[..3], ["fleet-b", "Succeeded", version.as_str()]);
    assert_eq!(again.row("fleet-c")[..3], ["fleet-c", "Succeeded", version.as_str()]);
    assert!(again.stdout.contains("wave 1/1: fleet-b, fleet-c"), "{}", again.stdout);
    for (_, agent) in agents {
        assert!(agent.stop().0.success());
    }
}
