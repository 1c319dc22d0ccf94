//! `systemd/lichen.service` as a board runs it: the unit passes `systemd-analyze verify`, every
//! system call the agent makes is allowed by its `SystemCallFilter=`, and the agent speaks the
//! `Type=notify` protocol (READY once pods run, the watchdog from the main loop, STOPPING).

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use lichen_tests::fakeapi::FakeApi;
use lichen_tests::{Scratch, fixture, lichen_bin, pod_yaml, wait_for};

const T: Duration = Duration::from_secs(30);

fn unit_text() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/lichen.service"))
        .expect("systemd/lichen.service")
}

/// `systemd-analyze`, which the test needs (Debian's `systemd` package).
fn systemd_analyze(args: &[&str]) -> std::process::Output {
    Command::new("systemd-analyze")
        .args(args)
        .output()
        .expect("systemd-analyze not found: install the `systemd` package (.ci/run does)")
}

#[test]
fn the_unit_passes_systemd_analyze_verify_and_keeps_its_promises() {
    let unit = unit_text();
    // verify insists that ExecStart's program exists; point it at the binary under test.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("lichen.service");
    std::fs::write(&path, unit.replace("/usr/bin/lichen", &lichen_bin().display().to_string()))
        .expect("unit");
    let out = systemd_analyze(&["verify", path.to_str().expect("utf-8 path")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify: {stderr}");

    let settings: Vec<(&str, &str)> =
        unit.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split_once('=')).collect();
    let has = |k: &str, v: &str| settings.iter().any(|(a, b)| *a == k && *b == v);
    for (k, v) in [
        ("Type", "notify"),
        ("Restart", "always"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ReadWritePaths", "/var/lib/lichen"),
        ("PrivateTmp", "yes"),
        ("CapabilityBoundingSet", ""),
        ("User", "lichen"),
    ] {
        assert!(has(k, v), "lichen.service should say {k}={v}");
    }
    assert!(settings.iter().any(|(k, _)| *k == "WatchdogSec"), "a watchdog period");

    // systemd's own score for the sandbox (0 = fully confined, 10 = not at all).
    let out = systemd_analyze(&["security", "--offline=yes", path.to_str().expect("utf-8 path")]);
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("exposure level for lichen.service: ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    println!("systemd-analyze security: exposure {score}");
    assert!(score <= 2.0, "exposure {score} (systemd calls up to 2.0 OK):\n{text}");
}

/// The syscalls a `SystemCallFilter=` line allows, groups expanded the way systemd does.
fn expand(names: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for name in names.split_whitespace() {
        if name.starts_with('@') {
            let listing = systemd_analyze(&["syscall-filter", name]);
            let text = String::from_utf8_lossy(&listing.stdout).into_owned();
            assert!(listing.status.success(), "systemd-analyze syscall-filter {name} failed");
            for l in text.lines().skip(1).map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
                if l.starts_with('@') {
                    out.extend(expand(l));
                } else {
                    out.insert(l.to_owned());
                }
            }
        } else {
            out.insert(name.to_owned());
        }
    }
    out
}

/// Runs the agent under `strace -f -c` through a day in its life (static pods that finish, fail by
/// fuel and keep running; a cluster pod from the fake API server; `lichen status` on its socket;
/// SIGTERM) and checks that the unit's filter allows every system call it made. A syscall outside
/// the filter would fail with EPERM on a board, in whatever code path first needed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_syscall_the_agent_makes_is_allowed_by_the_unit() {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, PostParams};

    let unit = unit_text();
    let mut allowed = BTreeSet::new();
    let mut denied = BTreeSet::new();
    for value in unit.lines().filter_map(|l| l.strip_prefix("SystemCallFilter=")) {
        match value.strip_prefix('~') {
            Some(deny) => denied.extend(expand(deny)),
            None => allowed.extend(expand(value)),
        }
    }
    assert!(allowed.contains("openat") && denied.contains("reboot"), "the filter expands: {allowed:?}");

    let api = FakeApi::start().await;
    let s = Scratch::new("");
    let kubeconfig = api.node_kubeconfig("test-node", s.dir.path()).await;
    let cfg = std::fs::read_to_string(&s.config).expect("config");
    std::fs::write(
        &s.config,
        format!(
            "kubeconfig = {:?}\nnode_ip = \"127.0.0.1\"\n{cfg}\n{}",
            kubeconfig.display().to_string(),
            s.modules_table()
        ),
    )
    .expect("config");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/pods");
    for f in ["hello.yaml", "spin.yaml", "ticker.yaml"] {
        let text = std::fs::read_to_string(examples.join(f)).expect("example pod");
        let dir = examples.join("modules").display().to_string();
        s.put_pod(f, &text.replace("image: modules/", &format!("image: {dir}/")));
    }
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "cluster-pod"},
        "spec": {"nodeName": "test-node", "automountServiceAccountToken": false,
                 "containers": [{"name": "main", "image": format!("file://{}", fixture("sleeper.wat").display())}]}
    }))
    .expect("pod");
    Api::<Pod>::namespaced(api.client(), "default")
        .create(&PostParams::default(), &pod)
        .await
        .expect("create");

    let trace = s.dir.path().join("strace.txt");
    let mut strace = Command::new("strace")
        .args(["-f", "-c", "-o"])
        .arg(&trace)
        .arg(lichen_bin())
        .args(s.run_args())
        .env_remove("LICHEN_CONFIG")
        // The kubelet API and the metrics endpoint are traced too, on loopback only.
        .env("LICHEN_KUBELET_ADDRESS", "127.0.0.1")
        .env("LICHEN_KUBELET_PORT", lichen_tests::free_port().to_string())
        .env("LICHEN_METRICS_ADDRESS", "127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("strace not found: install the `strace` package (.ci/run does)");
    let status = || {
        let out = Command::new(lichen_bin())
            .args(["status", "--json", "--config"])
            .arg(&s.config)
            .env_remove("LICHEN_CONFIG")
            .output()
            .expect("lichen status");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).ok()
    };
    let settled = |v: &serde_json::Value| {
        let pods = v["pods"].as_array().cloned().unwrap_or_default();
        let phase = |name: &str| {
            pods.iter()
                .find(|p| p["key"].as_str().is_some_and(|k| k.contains(name)))
                .map(|p| p["phase"].clone())
        };
        phase("hello") == Some("Succeeded".into())
            && phase("spin") == Some("Failed".into())
            && phase("ticker") == Some("Running".into())
            && phase("cluster-pod") == Some("Running".into())
    };
    // Under strace everything is slower; spin burns 50M fuel.
    let report = wait_for(Duration::from_secs(120), "every pod to reach its phase under strace", || {
        status().filter(|v| v["agent_running"] == true && settled(v))
    });
    assert!(report["contact"]["last_ok"].is_string(), "the agent reached the API server: {report}");
    // The agent is strace's child; SIGTERM it, not strace.
    let agent_pid = wait_for(T, "the agent's pid", || {
        std::fs::read_to_string(format!("/proc/{}/task/{}/children", strace.id(), strace.id()))
            .ok()
            .and_then(|c| c.split_whitespace().next().map(str::to_owned))
    });
    assert!(Command::new("kill").args(["-TERM", &agent_pid]).status().expect("kill").success());
    let exit = wait_for(T, "the agent to stop", || strace.try_wait().expect("wait"));
    assert!(exit.success(), "strace (and the agent) exited with {exit:?}");

    let table = std::fs::read_to_string(&trace).expect("strace summary");
    let used: BTreeSet<String> = table
        .lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let name = *cols.last()?;
            (cols.len() >= 5 && cols[0].parse::<f64>().is_ok() && name != "total").then(|| name.to_owned())
        })
        .collect();
    assert!(used.contains("epoll_wait") || used.contains("epoll_pwait"), "parsed the summary: {table}");
    println!("{} distinct syscalls: {}", used.len(), used.iter().cloned().collect::<Vec<_>>().join(" "));
    let refused: Vec<&String> =
        used.iter().filter(|c| !allowed.contains(*c) || denied.contains(*c)).collect();
    assert!(refused.is_empty(), "lichen.service's SystemCallFilter= would refuse {refused:?}");
}

/// Under systemd (`Type=notify`, `WatchdogSec=`): `READY=1` only once the store is open and the
/// static pods run, then `WATCHDOG=1` from the main loop, then `STOPPING=1` on SIGTERM.
#[test]
fn systemd_hears_ready_once_pods_run_then_the_watchdog_then_stopping() {
    use std::os::unix::net::UnixDatagram;
    let s = Scratch::new("");
    // Big enough that compiling it keeps the pod in ContainerCreating for a while, which READY
    // must wait out.
    let module = s.dir.path().join("big.wat");
    std::fs::write(&module, idle_module_with_functions(1500)).expect("module");
    s.put_pod("big.yaml", &pod_yaml("big", &module, ""));
    let socket_path = s.dir.path().join("notify");
    let socket = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    socket.set_read_timeout(Some(T)).expect("timeout");
    let recv = || {
        let mut buf = [0u8; 512];
        // A signal to this process (a neighbouring test's child exiting, under strace) may cut the
        // wait short with EINTR; that is not the agent's silence.
        let n = loop {
            match socket.recv(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => break r.expect("a notification within the timeout"),
            }
        };
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let args = s.run_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let notify = socket_path.display().to_string();
    let agent = lichen_tests::Agent::start_with_env(
        &args,
        &s.state,
        &[("NOTIFY_SOCKET", notify.as_str()), ("WATCHDOG_USEC", "1000000")],
    );

    let first = recv();
    assert_eq!(first, "READY=1\nSTATUS=1 pod(s)", "the first notification is READY, with no pod preparing");
    let status = s.status_json();
    let pods = status["pods"].as_array().expect("pods");
    assert_eq!(pods.len(), 1, "{status}");
    assert_eq!(pods[0]["containers"][0], "main=running", "the pod runs when systemd hears READY: {status}");
    agent.wait_log(&["feeding the systemd watchdog", "every_ms=500"], T);

    let mut pings = 0;
    while pings < 3 {
        match recv().as_str() {
            "WATCHDOG=1" => pings += 1,
            other => assert!(other.starts_with("STATUS="), "unexpected notification {other:?}"),
        }
    }
    let (exit, log) = agent.stop();
    assert!(exit.success(), "{exit:?}\n{}", log.join("\n"));
    let rest: Vec<String> = std::iter::from_fn(|| {
        let mut buf = [0u8; 512];
        socket.set_read_timeout(Some(Duration::from_millis(200))).ok()?;
        let n = loop {
            match socket.recv(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => break r.ok()?,
            }
        };
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
    .collect();
    assert!(rest.iter().any(|m| m == "STOPPING=1\nSTATUS=stopping pods"), "STOPPING on SIGTERM: {rest:?}");
}

/// `idle.wat` with `n` extra functions that only make it slower to compile.
fn idle_module_with_functions(n: usize) -> String {
    let idle = std::fs::read_to_string(fixture("idle.wat")).expect("idle.wat");
    let end = idle.rfind(')').expect("module end");
    let mut w = idle[..end].to_owned();
    for i in 0..n {
        w.push_str(&format!(
            "  (func $pad{i} (param i32) (result i32) (local i32)\n    (local.set 1 (i32.mul (local.get 0) (i32.const {i})))\n    (if (i32.gt_u (local.get 1) (i32.const 7)) (then (local.set 1 (i32.add (local.get 1) (i32.const 3)))))\n    (local.get 1))\n"
        ));
    }
    w.push_str(")\n");
    w
}
