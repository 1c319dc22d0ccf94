//! The board tier: the baked image booted for real. A Debian bookworm image (images/mkimage.sh)
//! with Lichen's `.deb` baked in by images/bake.sh, booted under QEMU full-system emulation with
//! systemd as PID 1, joins the real control plane (`LICHEN_E2E_KUBECONFIG`) by itself at first
//! boot, runs a Deployment, and survives an offline reboot, a killed agent and a power cut.
//!
//! Run: `LICHEN_BOARD_DEBS=<dir with lichen_*_arm64.deb and _armhf.deb> cargo test -p lichen-tests
//! --features board --test board -- --test-threads 1` as root (mkimage.sh needs it); CI runs it
//! after the e2e tier. Each guest takes about 1 GiB of memory and both cores.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams};
use lichen_tests::board::{BakeInputs, Board};
use lichen_tests::cluster::Cluster;
use lichen_tests::registry::{Registry, WASM_CONFIG_V0, WASM_LAYER};
use lichen_tests::{is_running_ready, node_condition, wait_for_async};

/// Under emulation everything is slower than on a board: generous bounds, never sleeps.
const BOOT: Duration = Duration::from_secs(900);
const API: Duration = Duration::from_secs(600);

fn deb(arch: &str) -> PathBuf {
    let dir = std::env::var_os("LICHEN_BOARD_DEBS").map(PathBuf::from).unwrap_or_else(|| {
        panic!("LICHEN_BOARD_DEBS is not set: the board tier bakes the .deb that cross/deb.sh built (CI: $CARGO_TARGET_DIR/debs)")
    });
    let found = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(&format!("_{arch}.deb")))
        });
    found.unwrap_or_else(|| panic!("no lichen_*_{arch}.deb in {}", dir.display()))
}

fn port_of(server: &str) -> u16 {
    server
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .expect("the API server URL has a port")
}

/// The restart count of the pod's first container.
fn restarts(p: &Pod) -> Option<i32> {
    Some(p.status.as_ref()?.container_statuses.as_ref()?.first()?.restart_count)
}

/// The pods `lichen pods --json` lists in the guest: (uid, phase, restarts).
fn guest_pods(board: &Board) -> Option<Vec<(String, String, u64)>> {
    let (rc, out) = board.exec("lichen pods --json", Duration::from_secs(60));
    if rc != 0 {
        return None;
    }
    let start = out.find('[')?;
    let json: serde_json::Value = serde_json::from_str(out[start..].trim()).ok()?;
    Some(
        json.as_array()?
            .iter()
            .map(|p| {
                (
                    p["uid"].as_str().unwrap_or_default().to_owned(),
                    p["phase"].as_str().unwrap_or_default().to_owned(),
                    p["restarts"].as_u64().unwrap_or_default(),
                )
            })
            .collect(),
    )
}

struct Setup {
    cluster: Cluster,
    board: Board,
    node: String,
    registry: Registry,
    kubelet_port: u16,
    api_port: u16,
    booted: Instant,
}

/// Bakes and boots a board for `arch` that joins as `node`, and waits for the Node to be Ready.
async fn first_boot(arch: &'static str, node: &str) -> Setup {
    first_boot_with(arch, node, "", None).await
}

/// [`first_boot`] with `extra` appended to the board's `lichen.toml` and, if given, upgrade keys
/// baked in (`bake.sh --upgrade-keys`).
async fn first_boot_with(arch: &'static str, node: &str, extra: &str, upgrade_keys: Option<&[u8]>) -> Setup {
    let cluster = Cluster::from_env().await;
    cluster.delete_node(node).await;
    let (server, ca) = cluster.server_and_ca();
    let api_port = port_of(&server);
    let registry = Registry::start();
    let ticker = wat::parse_file(lichen_tests::fixture("ticker.wat")).expect("fixture");
    registry.push_artifact("edge/ticker", "1.0", WASM_CONFIG_V0, b"{}", &[(WASM_LAYER, &ticker)]);
    let reg_port = port_of(&registry.host());
    let kubelet_port = lichen_tests::free_port();
    // The API server dials the node's Hostname address first, then its InternalIP, at the
    // kubelet port: `localhost` and 127.0.0.1 with the port exposed on the same host port, which
    // QEMU carries to the guest. (The guest's own host name, raspberrypi, resolves nowhere.)
    let config = format!(
        "node_name = {node:?}\nnode_ip = \"127.0.0.1\"\nnode_hostname = \"localhost\"\n\n[join]\nserver = \"https://10.0.2.100:{api_port}\"\n\
         ca_cert = \"/etc/lichen/ca.crt\"\n\n[kubelet_api]\nport = {kubelet_port}\n\n\
         [modules]\ninsecure_registries = [\"10.0.2.100:{reg_port}\"]\n{extra}"
    );
    let deb = deb(arch);
    let token = cluster.bootstrap_token();
    let mut board =
        Board::bake(arch, &BakeInputs { deb: &deb, config: &config, ca: &ca, token: &token, upgrade_keys });
    let booted = Instant::now();
    board.boot(&[api_port, reg_port], &[(kubelet_port, kubelet_port)]);
    board.wait_boot(BOOT, &[]);
    eprintln!("FIGURE {arch}: boot to multi-user.target {:.0} s", booted.elapsed().as_secs_f64());
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    wait_for_async(API, "the board's Node to be Ready", || async {
        let n = nodes.get(node).await.ok()?;
        (node_condition(&n, "Ready")? == "True").then_some(())
    })
    .await;
    eprintln!("FIGURE {arch}: boot to node Ready {:.0} s", booted.elapsed().as_secs_f64());
    Setup { cluster, board, node: node.to_owned(), registry, kubelet_port, api_port, booted }
}

/// What the first boot must have done on the board itself.
fn check_first_boot(board: &Board) {
    let boot_dir = board.sh("ls -A /boot/firmware");
    for gone in ["lichen.toml", "lichen-ca.crt", "lichen-bootstrap-token"] {
        assert!(
            !boot_dir.lines().any(|l| l.trim() == gone),
            "{gone} left on the boot partition:\n{boot_dir}"
        );
    }
    assert!(
        !boot_dir.contains(".invalid") && !boot_dir.contains(".error"),
        "first boot refused a file:\n{boot_dir}"
    );
    board.sh("test -s /etc/lichen/config.toml && test -s /etc/lichen/ca.crt");
    // The token is consumed by the join: lichen deletes it once the node has its certificate.
    board.sh("test ! -e /var/lib/lichen/bootstrap-token && test -s /var/lib/lichen/pki/node.crt || ls -la /var/lib/lichen /var/lib/lichen/pki");
    let show =
        board.sh("systemctl show lichen -p ActiveState -p SubState -p NRestarts -p WatchdogUSec -p User");
    for want in ["ActiveState=active", "SubState=running", "NRestarts=0", "User=lichen"] {
        if !show.lines().any(|l| l.trim() == want) {
            let (_, journal) = board.exec(
                "journalctl -b -u lichen -o short-monotonic --no-pager | tail -n 80",
                Duration::from_secs(60),
            );
            panic!("{want} not in:\n{show}\nthe agent's journal:\n{journal}");
        }
    }
    let watchdog = show.lines().find_map(|l| l.trim().strip_prefix("WatchdogUSec=")).unwrap_or("0");
    assert!(!["0", "infinity", ""].contains(&watchdog), "the watchdog is not armed: WatchdogUSec={watchdog}");
    board.sh("systemctl is-active lichen-firstboot.service || systemctl show lichen-firstboot -p Result | grep -qx Result=success");
    // The running agent has the unit's environment: glibc reads its allocator settings only when a
    // process starts (systemd/README.md, "Memory"), so this is where they can be seen to hold.
    let unit = lichen_tests::unit_environment().expect("systemd/lichen.service");
    assert!(
        unit.iter().any(|(k, _)| k == "GLIBC_TUNABLES"),
        "the unit no longer sets GLIBC_TUNABLES: {unit:?}"
    );
    let environ = board.sh("tr '\\0' '\\n' < /proc/$(systemctl show lichen -p MainPID --value)/environ");
    for (key, value) in &unit {
        let want = format!("{key}={value}");
        assert!(
            environ.lines().any(|l| l.trim() == want),
            "{want} is not in the running agent's environment:\n{environ}"
        );
    }
    // The unit's hardening in force without getting in the way: no call refused by the syscall
    // filter (SIGSYS would kill the agent: NRestarts above says it never died) and no write
    // refused by ProtectSystem/ReadWritePaths.
    let journal = board.sh("journalctl -b -u lichen -o cat --no-pager");
    for bad in ["Read-only file system", "status=31/SYS", "Operation not permitted", "panicked"] {
        assert!(!journal.contains(bad), "{bad:?} in the agent's journal:\n{journal}");
    }
}

fn ticker_deployment(name: &str, run: &str, node: &str, image: &str) -> Deployment {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name, "run": run}},
            "template": {
                "metadata": {"labels": {"app": name, "run": run}},
                "spec": {
                    "nodeSelector": {"kubernetes.io/hostname": node, "lichen.dev/runtime": "wasm"},
                    "tolerations": [{"key": "lichen.dev/runtime", "operator": "Equal", "value": "wasm", "effect": "NoSchedule"}],
                    "automountServiceAccountToken": false,
                    "containers": [{"name": "ticker", "image": image, "args": ["1000000", "100000000"]}]
                }
            }
        }
    }))
    .expect("deployment")
}

/// Creates the ticker Deployment and waits for its pod to be Running and Ready on the board.
/// Returns the pod and the label selector of this run's pods (a pod an earlier run left on a node of
/// the same name is never mistaken for one of them).
async fn run_ticker(s: &Setup, name: &str) -> (Pod, String) {
    let deploys: Api<Deployment> = Api::namespaced(s.cluster.client.clone(), "default");
    let _ = deploys.delete(name, &DeleteParams::default()).await;
    wait_for_async(API, "an old deployment to go", || async {
        deploys.get_opt(name).await.ok()?.is_none().then_some(())
    })
    .await;
    let image = format!("10.0.2.100:{}/edge/ticker:1.0", port_of(&s.registry.host()));
    let run = format!("r{:08x}", fastrand::u32(..));
    deploys
        .create(&PostParams::default(), &ticker_deployment(name, &run, &s.node, &image))
        .await
        .expect("deployment");
    let pods: Api<Pod> = Api::namespaced(s.cluster.client.clone(), "default");
    let selector = format!("app={name},run={run}");
    let lp = ListParams::default().labels(&selector);
    let started = Instant::now();
    let pod = wait_for_async(API, "the ticker pod Running and Ready on the board", || async {
        pods.list(&lp).await.ok()?.items.into_iter().find(is_running_ready)
    })
    .await;
    eprintln!(
        "FIGURE {}: deployment created to pod Ready {:.0} s",
        s.board.arch,
        started.elapsed().as_secs_f64()
    );
    assert_eq!(pod.spec.as_ref().and_then(|s| s.node_name.as_deref()), Some(s.node.as_str()));
    (pod, selector)
}

/// `kubectl logs` through the API server to the board's kubelet port.
async fn logs_through_the_api(s: &Setup, pod: &str) {
    let pods: Api<Pod> = Api::namespaced(s.cluster.client.clone(), "default");
    let text = wait_for_async(API, "kubectl logs to show the ticker's lines", || async {
        let t = pods.logs(pod, &LogParams::default()).await.ok()?;
        (t.lines().count() >= 2).then_some(t)
    })
    .await;
    let first = text.lines().next().unwrap_or_default();
    assert!(first.starts_with("1 ") || first.starts_with("0 "), "ticker lines are `<seq> <ns>`: {first:?}");
}

/// Pulls the board's network cable and reboots it; waits for the pod `uid` to run again from the
/// store, and checks that it did so before any API contact. Returns the pod as `lichen pods` shows
/// it then (uid, phase, restarts). The cable stays pulled.
fn offline_reboot(board: &mut Board, uid: &str) -> (String, String, u64) {
    board.guest("link-down");
    let first_boot_id = board.boot_id();
    let _ = board.exec("systemctl reboot", Duration::from_secs(10));
    let rebooted = Instant::now();
    board.wait_exec(
        "cat /proc/sys/kernel/random/boot_id",
        BOOT,
        "the guest to come back from its reboot",
        |rc, out| (rc == 0 && !out.trim().is_empty() && out.trim() != first_boot_id).then_some(()),
    );
    board.wait_boot(BOOT, &["systemd-networkd-wait-online.service"]);
    let offline =
        board.wait_exec("lichen pods --json", BOOT, "the pod Running again while offline", |_, _| {
            guest_pods(board)?.into_iter().find(|(u, phase, _)| u == uid && phase == "Running")
        });
    eprintln!(
        "FIGURE {}: offline reboot to pod Running {:.0} s",
        board.arch,
        rebooted.elapsed().as_secs_f64()
    );
    let (rc, status) = board.exec("lichen status --json", Duration::from_secs(60));
    assert_eq!(rc, 0, "{status}");
    let report: serde_json::Value =
        serde_json::from_str(status.get(status.find('{').unwrap_or(0)..).unwrap_or_default())
            .expect("status JSON");
    assert!(
        report["contact"]["last_ok"].is_null(),
        "the pod ran again only after API contact, or the link was not down:\n{status}"
    );
    offline
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arm64_first_boot_joins_runs_a_deployment_and_survives_reboots_kills_and_power_cuts() {
    let mut s = first_boot("arm64", "lichen-board-arm64").await;
    check_first_boot(&s.board);
    eprintln!("STEP arm64: first boot checked");
    let (pod, selector) = run_ticker(&s, "lichen-board-ticker").await;
    let pod_name = pod.metadata.name.clone().expect("name");
    let uid = pod.metadata.uid.clone().expect("uid");
    logs_through_the_api(&s, &pod_name).await;
    eprintln!("STEP arm64: kubectl logs through the API server");
    let pods: Api<Pod> = Api::namespaced(s.cluster.client.clone(), "default");
    let nodes: Api<Node> = Api::all(s.cluster.client.clone());

    // 1. Rebooted with the network cut: the pod runs again from the store before any API contact.
    eprintln!("STEP arm64: offline reboot");
    let offline = offline_reboot(&mut s.board, &uid);

    // 2. The link restored: Ready again, the same pod, not restarted by the reconnect.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(s.cluster.client.clone(), "kube-node-lease");
    let mark = jiff::Timestamp::now();
    eprintln!("STEP arm64: link restored");
    s.board.guest("link-up");
    let back = Instant::now();
    wait_for_async(API, "the Lease renewed and the node Ready after the link is back", || async {
        let renewed = leases.get(&s.node).await.ok()?.spec?.renew_time?.0;
        let n = nodes.get(&s.node).await.ok()?;
        (renewed > mark && node_condition(&n, "Ready")? == "True").then_some(())
    })
    .await;
    let reported =
        wait_for_async(API, "the API server to show the pod's status from after the reboot", || async {
            let p = pods.get(&pod_name).await.ok()?;
            let n = restarts(&p)?;
            (is_running_ready(&p) && n as u64 >= offline.2).then_some(n)
        })
        .await;
    eprintln!("FIGURE arm64: link back to node Ready {:.0} s", back.elapsed().as_secs_f64());
    assert_eq!(
        reported as u64, offline.2,
        "the reconnect restarted the pod (restarts offline {}, now {reported})",
        offline.2
    );
    let now = pods.get(&pod_name).await.expect("pod");
    assert_eq!(now.metadata.uid.as_deref(), Some(uid.as_str()), "the same pod, not a replacement");

    // 3. The agent killed: systemd restarts it and the pod resumes.
    eprintln!("STEP arm64: agent killed");
    s.board.sh("systemctl kill -s KILL lichen");
    s.board.wait_exec(
        "systemctl show lichen -p NRestarts -p SubState",
        API,
        "systemd to restart the agent",
        |_, out| (out.contains("NRestarts=1") && out.contains("SubState=running")).then_some(()),
    );
    wait_for_async(API, "the pod Running and Ready after the agent's restart", || async {
        let p = pods.get(&pod_name).await.ok()?;
        (is_running_ready(&p) && restarts(&p)? > reported).then_some(())
    })
    .await;

    // 4. A power cut in the middle of a burst of status changes: the next boot opens the store,
    // and nothing the API server already had goes backwards.
    let deploys: Api<Deployment> = Api::namespaced(s.cluster.client.clone(), "default");
    deploys
        .patch(
            "lichen-board-ticker",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"spec": {"replicas": 4}})),
        )
        .await
        .expect("scale");
    eprintln!("STEP arm64: power cut in a burst of status changes");
    let lp = ListParams::default().labels(&selector);
    wait_for_async(API, "a second pod Running on the board", || async {
        let n = pods.list(&lp).await.ok()?.items.iter().filter(|p| is_running_ready(p)).count();
        (n >= 2).then_some(())
    })
    .await;
    let acknowledged: Vec<(String, i32)> = pods
        .list(&lp)
        .await
        .expect("pods")
        .items
        .iter()
        .filter_map(|p| Some((p.metadata.uid.clone()?, restarts(p)?)))
        .collect();
    s.board.guest("kill");
    assert_eq!(s.board.wait_exit(Duration::from_secs(60)), Some(137), "boot.sh reports the power cut");
    let cut = Instant::now();
    s.board.boot(&[s.api_port, port_of(&s.registry.host())], &[(s.kubelet_port, s.kubelet_port)]);
    s.board.wait_boot(BOOT, &[]);
    let (rc, out) = s.board.exec("lichen status", Duration::from_secs(120));
    assert_eq!(rc, 0, "the store opens after the power cut:\n{out}");
    wait_for_async(API, "all four pods Running and Ready after the power cut", || async {
        let list = pods.list(&lp).await.ok()?.items;
        let ready = list.iter().filter(|p| is_running_ready(p)).count();
        (ready == 4).then_some(())
    })
    .await;
    eprintln!("FIGURE arm64: power cut to all pods Ready {:.0} s", cut.elapsed().as_secs_f64());
    for p in pods.list(&lp).await.expect("pods").items {
        let (Some(uid), Some(restarts)) = (p.metadata.uid.clone(), restarts(&p)) else {
            continue;
        };
        if let Some((_, before)) = acknowledged.iter().find(|(u, _)| *u == uid) {
            assert!(restarts >= *before, "pod {uid}: restart count went back from {before} to {restarts}");
        }
    }
    eprintln!("FIGURE arm64: whole scenario {:.0} s", s.booted.elapsed().as_secs_f64());

    let _ = deploys.delete("lichen-board-ticker", &DeleteParams::default()).await;
    s.board.guest("powerdown");
    assert_eq!(s.board.wait_exit(Duration::from_secs(300)), Some(0), "the board powers off cleanly");
    s.cluster.delete_node(&s.node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn armhf_first_boot_joins_and_runs_a_deployment_on_pulley() {
    let mut s = first_boot("armhf", "lichen-board-armhf").await;
    check_first_boot(&s.board);
    let (pod, _) = run_ticker(&s, "lichen-board-ticker-armhf").await;
    logs_through_the_api(&s, pod.metadata.name.as_deref().expect("name")).await;
    offline_reboot(&mut s.board, pod.metadata.uid.as_deref().expect("uid"));
    s.board.guest("link-up");
    let deploys: Api<Deployment> = Api::namespaced(s.cluster.client.clone(), "default");
    let _ = deploys.delete("lichen-board-ticker-armhf", &DeleteParams::default()).await;
    s.board.guest("powerdown");
    assert_eq!(s.board.wait_exit(Duration::from_secs(300)), Some(0), "the board powers off cleanly");
    s.cluster.delete_node(&s.node).await;
}

/// The binary the board's package installs as /usr/bin/lichen, extracted from the `.deb`.
fn packaged_binary(arch: &str, dir: &std::path::Path) -> PathBuf {
    let root = dir.join(format!("deb-{arch}"));
    let out = std::process::Command::new("dpkg-deb")
        .arg("-x")
        .arg(deb(arch))
        .arg(&root)
        .output()
        .expect("dpkg-deb");
    assert!(out.status.success(), "dpkg-deb -x: {}", String::from_utf8_lossy(&out.stderr));
    root.join("usr/bin/lichen")
}

/// The agent's main process in the guest: (systemd's restart count, the executable it runs).
fn agent_process(board: &Board) -> (u32, String) {
    let out = board.sh(
        "systemctl show lichen -p NRestarts --value; readlink /proc/$(systemctl show lichen -p MainPID --value)/exe",
    );
    let mut lines = out.lines().map(str::trim).filter(|l| !l.is_empty());
    let restarts = lines.next().and_then(|l| l.parse().ok()).expect("NRestarts");
    (restarts, lines.next().unwrap_or_default().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arm64_upgrades_itself_under_systemd_rolls_back_a_failing_version_and_survives_a_power_cut() {
    use lichen::upgrade::Phase;
    use lichen_tests::agent_image::{
        agent_version, annotate, p256_key, push_agent, stamped_copy, upgrade_outcome,
    };
    let keys = tempfile::tempdir().expect("tempdir");
    let (key, public) = p256_key(keys.path(), "fleet");
    let public_pem = std::fs::read(&public).expect("public key");
    let mut s = first_boot_with(
        "arm64",
        "lichen-board-upgrade",
        "\n[upgrade]\ntrusted_keys = [\"/etc/lichen/upgrade-keys.pub\"]\nhealth_timeout_secs = 600\n",
        Some(&public_pem),
    )
    .await;
    let client = s.cluster.client.clone();
    let packaged = wait_for_async(API, "the packaged version reported on the Node", || async {
        agent_version(&client, &s.node).await
    })
    .await;
    let (pod, _) = run_ticker(&s, "lichen-board-upgrade-ticker").await;
    let pod_name = pod.metadata.name.clone().expect("name");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");

    // 1. From the packaged version to a newer build, with a pod running.
    let packaged_bin = packaged_binary("arm64", keys.path());
    let (v2, v2_version) = stamped_copy(&packaged_bin, keys.path(), "board.2");
    let host = s.registry.host();
    let guest_registry = format!("10.0.2.100:{}", port_of(&host));
    // The operator's lichen pushes to the registry on the host's loopback.
    let push_config = keys.path().join("push.toml");
    std::fs::write(&push_config, format!("[modules]\ninsecure_registries = [{host:?}]\n")).expect("config");
    let image = push_agent(&push_config, &v2, &format!("{host}/fleet/lichen:board2"), Some(&key))
        .replace(&host, &guest_registry);
    let (restarts_before, _) = agent_process(&s.board);
    eprintln!("STEP arm64: upgrade to {v2_version}");
    let annotated = Instant::now();
    annotate(&client, &s.node, &image).await;
    let report = upgrade_outcome(&client, &s.node, &image, API).await;
    assert_eq!(
        (report.phase, report.version.as_deref()),
        (Phase::Succeeded, Some(v2_version.as_str())),
        "{report:?}"
    );
    eprintln!("FIGURE arm64: annotation to committed {:.0} s", annotated.elapsed().as_secs_f64());
    let running = wait_for_async(API, "the new version on the Node", || async {
        agent_version(&client, &s.node).await.filter(|(v, _)| *v == v2_version)
    })
    .await;
    assert_ne!(running.1, packaged.1, "another binary runs");
    let (restarts, exe) = agent_process(&s.board);
    assert_eq!(restarts, restarts_before, "the hand-over is an exec in the same service, not a restart");
    assert!(exe.starts_with("/var/lib/lichen/agent/versions/"), "systemd's main process runs {exe}");
    wait_for_async(API, "the ticker Running and Ready under the new agent", || async {
        let p = pods.get(&pod_name).await.ok()?;
        is_running_ready(&p).then_some(())
    })
    .await;

    // 2. A version that cannot start: the state a switch to it leaves (recorded, not yet booted),
    // then systemd's restart of the service. The launcher boots it, it exits at once, systemd
    // restarts the service, and the launcher rolls back to the committed version.
    eprintln!("STEP arm64: a failing version rolled back by systemd's restart");
    let failing = "10.0.2.100:5000/fleet/lichen@sha256:feedfeedfeedfeedfeedfeedfeedfeedfeedfeedfeedfeedfeedfeedfeedfeed";
    let record_text = s.board.sh("cat /var/lib/lichen/agent/upgrade.json");
    let mut record: lichen::upgrade::slots::SwitchRecord =
        serde_json::from_str(record_text.trim()).expect("the record reads");
    let digest = "f".repeat(64);
    record.trial = Some(lichen::upgrade::slots::Trial {
        slot: lichen::upgrade::slots::Slot {
            image: failing.into(),
            digest: digest.clone(),
            version: "9.9.9".into(),
        },
        boots: 0,
        had_contact: true,
        from_version: v2_version.clone(),
    });
    use base64::Engine as _;
    let json = base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(&record).expect("json"));
    s.board.sh(&format!(
        "set -e; d=/var/lib/lichen/agent/versions/{digest}; mkdir -p $d; printf '#!/bin/sh\\nexit 3\\n' > $d/lichen; \
         chmod 755 $d/lichen; chown -R lichen:lichen $d; echo {json} | base64 -d > /var/lib/lichen/agent/upgrade.json; \
         chown lichen:lichen /var/lib/lichen/agent/upgrade.json; systemctl restart --no-block lichen"
    ));
    let restarted = Instant::now();
    let report = upgrade_outcome(&client, &s.node, failing, API).await;
    assert_eq!(report.phase, Phase::RolledBack, "{report:?}");
    assert!(report.reason.contains("before passing its health gate"), "{}", report.reason);
    eprintln!(
        "FIGURE arm64: failed start to rolled back and reported {:.0} s",
        restarted.elapsed().as_secs_f64()
    );
    let (restarts, exe) = agent_process(&s.board);
    assert!(restarts > restarts_before, "systemd restarted the service after the failing version exited");
    let v2_binary =
        format!("/var/lib/lichen/agent/versions/{}/lichen", running.1.trim_start_matches("sha256:"));
    assert_eq!(exe, v2_binary, "the committed version's binary runs again");
    assert_eq!(
        agent_version(&client, &s.node).await.map(|v| v.0),
        Some(v2_version.clone()),
        "the committed version runs again"
    );

    // 3. A power cut in the middle of a switch to a third build: the board boots into a working
    // version (the one before, or the new one committed), and says which on the Node.
    eprintln!("STEP arm64: power cut mid-switch");
    let (v3, v3_version) = stamped_copy(&packaged_bin, keys.path(), "board.3");
    let image3 = push_agent(&push_config, &v3, &format!("{host}/fleet/lichen:board3"), Some(&key))
        .replace(&host, &guest_registry);
    annotate(&client, &s.node, &image3).await;
    s.board.wait_exec(
        "grep -c board.3 /var/lib/lichen/agent/upgrade.json || true",
        API,
        "the switch to the third build to be recorded",
        |_, out| {
            (out.trim().lines().last().and_then(|l| l.trim().parse::<u32>().ok()).unwrap_or(0) > 0)
                .then_some(())
        },
    );
    s.board.guest("kill");
    assert_eq!(s.board.wait_exit(Duration::from_secs(60)), Some(137), "boot.sh reports the power cut");
    let cut = Instant::now();
    s.board.boot(&[s.api_port, port_of(&s.registry.host())], &[(s.kubelet_port, s.kubelet_port)]);
    s.board.wait_boot(BOOT, &[]);
    let report = upgrade_outcome(&client, &s.node, &image3, API).await;
    let now = wait_for_async(API, "a version reported after the power cut", || async {
        let v = agent_version(&client, &s.node).await?;
        let n = Api::<Node>::all(client.clone()).get(&s.node).await.ok()?;
        (node_condition(&n, "Ready")? == "True" && (v.0 == v2_version || v.0 == v3_version)).then_some(v.0)
    })
    .await;
    match report.phase {
        Phase::Succeeded => assert_eq!(now, v3_version, "committed, so the new build runs"),
        Phase::RolledBack => assert_eq!(now, v2_version, "rolled back, so the build before runs"),
        other => panic!("after the power cut the upgrade ended {other:?}: {report:?}"),
    }
    eprintln!(
        "FIGURE arm64: power cut mid-switch to Ready on {now} ({:?}) {:.0} s",
        report.phase,
        cut.elapsed().as_secs_f64()
    );
    wait_for_async(API, "the ticker Running and Ready after the power cut", || async {
        let p = pods.get(&pod_name).await.ok()?;
        is_running_ready(&p).then_some(())
    })
    .await;

    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let _ = deploys.delete("lichen-board-upgrade-ticker", &DeleteParams::default()).await;
    s.board.guest("powerdown");
    assert_eq!(s.board.wait_exit(Duration::from_secs(300)), Some(0), "the board powers off cleanly");
    s.cluster.delete_node(&s.node).await;
}
