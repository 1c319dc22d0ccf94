//! The real `lichen` binary, as a user runs it: static pods follow their directory, bad input is
//! named precisely without disturbing anything else, and a broken state store is a clear error.

use std::path::Path;
use std::time::Duration;

use lichen_tests::{Scratch, fixture, is_root, lichen_bin, pod_yaml, status_field, wait_for};

const T: Duration = Duration::from_secs(30);

#[test]
fn static_pods_follow_their_directory() {
    let s = Scratch::new("");
    let agent = s.start();
    s.wait_running(T);

    let volume = "  volumes: [{name: scratch, emptyDir: {}}]\n";
    s.put_pod("idle.yaml", &pod_yaml("idle", &fixture("idle.wat"), volume));
    wait_for(T, "first output of the new pod", || s.output("idle", "main", 0).first().cloned());
    // The pods `lichen status` shows, as (key, uid).
    let pods = || -> Vec<(String, String)> {
        let status = s.status_json();
        let list = status["pods"].as_array().cloned().unwrap_or_default();
        list.iter()
            .map(|p| (p["key"].as_str().unwrap_or("").to_owned(), p["uid"].as_str().unwrap_or("").to_owned()))
            .collect()
    };
    let first_uid = wait_for(T, "the pod in the status", || {
        pods().into_iter().find(|(k, _)| k == "default/idle-test-node").map(|(_, uid)| uid)
    });

    // An edit is a new pod: the old one is stopped, the new one started.
    s.put_pod("idle.yaml", &pod_yaml("idle", &fixture("sleeper.wat"), volume));
    wait_for(T, "ticks from the edited pod", || {
        s.output("idle", "main", 0).iter().any(|l| l.starts_with("tick")).then_some(())
    });
    let listed = pods();
    assert_eq!(listed.len(), 1, "the old pod is gone from the store: {listed:?}");
    assert_eq!(listed[0].0, "default/idle-test-node");
    assert_ne!(listed[0].1, first_uid, "the edited pod is a new pod");
    // The old pod's directories go as it is removed.
    let pods_dir = s.state.join("pods");
    let logs_dir = s.state.join("logs");
    let count = |d: &std::path::Path| std::fs::read_dir(d).expect("state subdirectory").count();
    wait_for(T, "the old pod's emptyDir and logs to be removed", || {
        (count(&pods_dir) == 1 && count(&logs_dir) == 1).then_some(())
    });

    std::fs::remove_file(s.pods.join("idle.yaml")).expect("rm");
    wait_for(T, "the pod to be removed", || pods().is_empty().then_some(()));
    // The pod's record goes first, then its directory, then its logs (one cleanup, in that order):
    // each is waited for, not read between two of the removals.
    wait_for(T, "its directory to be removed", || {
        (std::fs::read_dir(&pods_dir).expect("pods dir").count() == 0).then_some(())
    });
    wait_for(T, "its logs to be removed (removed pods leave no logs behind)", || {
        (std::fs::read_dir(&logs_dir).expect("logs dir").count() == 0).then_some(())
    });
    let (status, log) = agent.stop();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}\n{}", log.join("\n"));
    assert!(log.iter().any(|l| l.contains("stopped")));
}

#[test]
fn a_malformed_manifest_is_named_and_the_others_keep_running() {
    let s = Scratch::new("");
    s.put_pod("good.yaml", &pod_yaml("good", &fixture("sleeper.wat"), ""));
    let bad = pod_yaml("bad", &fixture("hello.wat"), "").replace("image:", "imagee:");
    s.put_pod("bad.yaml", &bad);
    s.put_pod("worse.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: worse}\nspec: {containers: 7}\n");
    let agent = s.start();
    let line = agent.wait_log(&["bad.yaml", "spec.containers[0].imagee"], T);
    assert!(line.contains("unknown field"), "{line}");
    agent.wait_log(&["worse.yaml", "spec.containers"], T);
    let ticks = |s: &Scratch| s.output("good", "main", 0).iter().filter(|l| l.starts_with("tick")).count();
    wait_for(T, "the good pod to tick", || (ticks(&s) > 2).then_some(()));

    // Breaking the good manifest keeps its last valid version running.
    s.put_pod("good.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: good}\nspec: [");
    agent.wait_log(&["good.yaml", "not valid YAML"], T);
    let before = ticks(&s);
    wait_for(T, "the good pod to keep ticking", || (ticks(&s) > before + 5).then_some(()));
    assert!(!agent.log().iter().any(|l| l.contains("pod removed")), "nothing was stopped");

    // A pod Lichen cannot honour is refused with the field and the reason.
    s.put_pod(
        "ports.yaml",
        &pod_yaml("ports", &fixture("hello.wat"), "")
            .replace("    image:", "    ports: [{containerPort: 80}]\n    image:"),
    );
    let line = agent.wait_log(&["default/ports-test-node", "UnsupportedPodSpec"], T);
    assert!(line.contains("spec.containers[0].ports") && line.contains("cannot listen"), "{line}");
    let (status, _) = agent.stop();
    assert!(status.success());
}

#[test]
fn a_manifest_deleted_while_stopped_is_forgotten_with_its_files() {
    let s = Scratch::new("");
    s.put_pod("keep.yaml", &pod_yaml("keep", &fixture("idle.wat"), ""));
    s.put_pod("gone.yaml", &pod_yaml("gone", &fixture("idle.wat"), "  volumes: [{name: v, emptyDir: {}}]\n"));
    let agent = s.start();
    wait_for(T, "both pods to run", || {
        (!s.output("keep", "main", 0).is_empty() && !s.output("gone", "main", 0).is_empty()).then_some(())
    });
    assert!(agent.stop().0.success());
    assert_eq!(std::fs::read_dir(s.state.join("logs")).expect("logs").count(), 2);

    std::fs::remove_file(s.pods.join("gone.yaml")).expect("rm");
    let agent = s.start();
    agent.wait_log(&["forgetting pod", "default/gone-test-node"], T);
    // Its run ended with the agent: the next one is its first restart, logged as run 1.
    wait_for(T, "the kept pod to run again", || (!s.output("keep", "main", 1).is_empty()).then_some(()));
    // "forgetting pod" is logged before its files go: wait for them to be gone.
    let logs = wait_for(T, "the forgotten pod's logs to be removed", || {
        let logs: Vec<String> = std::fs::read_dir(s.state.join("logs"))
            .expect("logs")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        (logs.len() == 1).then_some(logs)
    });
    assert!(logs[0].starts_with("default_keep-test-node_"), "{logs:?}");
    assert_eq!(
        std::fs::read_dir(s.state.join("pods")).map(|d| d.count()).unwrap_or(0),
        0,
        "emptyDir removed"
    );
    assert!(agent.stop().0.success());
}

#[test]
fn a_corrupt_store_is_a_clear_error_naming_the_way_out() {
    let s = Scratch::new("");
    s.put_pod("idle.yaml", &pod_yaml("idle", &fixture("idle.wat"), ""));
    let agent = s.start();
    wait_for(T, "the pod to run", || s.output("idle", "main", 0).first().cloned());
    let (status, _) = agent.stop();
    assert!(status.success());

    let db = s.state.join("store/db");
    let len = std::fs::metadata(&db).expect("db").len() as usize;
    std::fs::write(&db, vec![0xa5; len]).expect("corrupt the db");
    let (status, log) = s.start().wait(T);
    let text = log.join("\n");
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(
        text.contains("is corrupt") && text.contains(&s.state.join("store").display().to_string()),
        "{text}"
    );
    assert!(text.contains("move it aside"), "tells the way out: {text}");
    assert!(!text.contains("panicked"), "{text}");
}

#[test]
fn a_state_dir_without_permission_is_a_clear_error() {
    let s = Scratch::new("");
    std::fs::create_dir_all(&s.state).expect("state dir");
    let args = s.run_args();
    let mut cmd = if is_root() {
        // Root ignores file modes, so run as nobody against a directory only root may write.
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(lichen_bin());
        c
    } else {
        std::process::Command::new(lichen_bin())
    };
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&s.state, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    if !is_root() {
        std::fs::set_permissions(&s.state, std::fs::Permissions::from_mode(0o555)).expect("chmod");
    }
    // nobody must be able to reach the config file and the pods to get as far as the store.
    for p in [s.dir.path(), &s.pods] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    std::fs::set_permissions(&s.config, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = cmd.args(&args).output().expect("run lichen");
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("permission denied") && text.contains(&s.state.join("store").display().to_string()),
        "{text}"
    );
    assert!(text.contains("chown"), "tells the way out: {text}");
}

#[test]
fn check_reports_every_problem_and_what_would_run() {
    let s = Scratch::new("");
    s.put_pod("hello.yaml", &pod_yaml("hello", &fixture("hello.wat"), ""));
    s.put_pod("bad.yaml", &pod_yaml("bad", &fixture("hello.wat"), "  hostNetwork: true\n"));
    let out = std::process::Command::new(lichen_bin())
        .args(["check", "--config"])
        .arg(&s.config)
        .output()
        .expect("run check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("ok    pod default/hello-test-node"), "{text}");
    assert!(text.contains("FAIL  pod default/bad-test-node") && text.contains("spec.hostNetwork"), "{text}");
    assert!(text.contains("1 problem(s) found"), "{text}");
    assert!(text.contains("does not exist yet"), "{text}");
    assert!(!s.state.exists(), "check creates nothing");

    std::fs::remove_file(s.pods.join("bad.yaml")).expect("rm");
    let out = std::process::Command::new(lichen_bin())
        .args(["check", "-c"])
        .arg(&s.config)
        .output()
        .expect("check");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn bad_config_names_the_field_and_flags_override_the_file() {
    let s = Scratch::new("[runtime]\ndefault_fule = 5\n");
    let out =
        std::process::Command::new(lichen_bin()).args(["check", "-c"]).arg(&s.config).output().expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("default_fule") && err.contains("default_fuel") && err.contains("lichen.toml"),
        "{err}"
    );

    let s = Scratch::new("max_pods = 3\n");
    let out = std::process::Command::new(lichen_bin())
        .args(["check", "--max-pods", "9", "-c"])
        .arg(&s.config)
        .env("LICHEN_DEFAULT_FUEL", "77")
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("max_pods = 9") && text.contains("default_fuel = 77"), "{text}");

    let out = std::process::Command::new(lichen_bin())
        .args(["check", "--default-memory-limit", "lots"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--default-memory-limit"));
}

#[test]
fn a_missing_explicit_config_file_is_an_error() {
    let out = std::process::Command::new(lichen_bin())
        .args(["check", "--config", "/nonexistent/lichen.toml"])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("/nonexistent/lichen.toml"), "{err}");
}

#[test]
fn an_unreachable_api_server_never_stops_static_pods() {
    let s = Scratch::new("");
    // A kubeconfig for a server that refuses connections: the agent must retry, not give up.
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let kc = s.dir.path().join("kubeconfig");
    std::fs::write(
        &kc,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: \"https://127.0.0.1:{port}\", insecure-skip-tls-verify: true}}\n\
             users:\n- name: u\n  user: {{token: not-a-secret}}\ncontexts:\n- name: d\n  context: {{cluster: c, user: u}}\ncurrent-context: d\n"
        ),
    )
    .expect("kubeconfig");
    let cfg = std::fs::read_to_string(&s.config).expect("config");
    std::fs::write(
        &s.config,
        format!("kubeconfig = {:?}\nnode_ip = \"127.0.0.1\"\n{cfg}", kc.display().to_string()),
    )
    .expect("config");
    s.put_pod("ticker.yaml", &pod_yaml("ticker", &fixture("sleeper.wat"), ""));
    let agent = s.start();
    agent.wait_log(&["node registration failed", "retry_in_secs"], T);
    let ticks = || s.output("ticker", "main", 0).iter().filter(|l| l.starts_with("tick")).count();
    wait_for(T, "the static pod to keep ticking", || (ticks() > 10).then_some(()));
    let (status, log) = agent.stop();
    assert!(status.success(), "{}", log.join("\n"));
    assert!(!log.iter().any(|l| l.contains("panicked")), "{}", log.join("\n"));
}

#[test]
fn sigkill_at_random_points_never_corrupts_the_store_or_loses_what_it_recorded() {
    let s = Scratch::new("");
    let pods = ["idle", "sleeper", "hello", "crash"];
    s.put_pod("idle.yaml", &pod_yaml("idle", &fixture("idle.wat"), "  volumes: [{name: v, emptyDir: {}}]\n"));
    s.put_pod("sleeper.yaml", &pod_yaml("sleeper", &fixture("sleeper.wat"), ""));
    s.put_pod("hello.yaml", &pod_yaml("hello", &fixture("hello.wat"), "  restartPolicy: Never\n"));
    s.put_pod("crash.yaml", &pod_yaml("crash", &fixture("trap.wat"), ""));
    let mut restarts: std::collections::BTreeMap<String, u64> = Default::default();
    for round in 0..20 {
        let agent = s.start();
        if round == 0 {
            s.wait_running(T);
            wait_for(T, "a container running", || {
                let report = s.status_json();
                let pods = report["pods"].as_array()?.clone();
                pods.iter()
                    .any(|p| {
                        p["containers"].as_array().is_some_and(|c| c.iter().any(|c| c == "main=running"))
                    })
                    .then_some(())
            });
        }
        std::thread::sleep(Duration::from_millis(fastrand::u64(20..400)));
        drop(agent); // SIGKILL, wherever it was
        // The store opens (read by a second process: no agent runs now) and holds only real pods,
        // and what it recorded never goes backwards.
        let report = s.status_json();
        assert_eq!(report["agent_running"], false);
        for p in report["pods"].as_array().expect("pods") {
            let key = p["key"].as_str().expect("key");
            assert!(pods.iter().any(|n| key == format!("default/{n}-test-node")), "unknown pod {key}");
            let r = p["restarts"].as_u64().expect("restarts");
            let before = restarts.insert(key.to_owned(), r).unwrap_or(0);
            assert!(r >= before, "round {round}: {key} restarts went from {before} to {r}");
        }
    }
    // A last, clean start: every pod runs (or ran) again, and the finished one is not run twice.
    let agent = s.start();
    s.wait_running(T);
    wait_for(T, "all four pods in the report, idle running and hello done", || {
        let report = s.status_json();
        let pods = report["pods"].as_array()?;
        let phase = |n: &str| {
            pods.iter().find(|p| p["key"] == format!("default/{n}-test-node")).map(|p| p["phase"].clone())
        };
        (pods.len() == 4
            && report["agent_running"] == true
            && phase("idle")? == "Running"
            && phase("hello")? == "Succeeded")
            .then_some(())
    });
    let (status, log) = agent.stop();
    assert!(status.success(), "{}", log.join("\n"));
    assert!(!log.iter().any(|l| l.contains("corrupt")), "{}", log.join("\n"));
}

/// `lichen status` run while the agent starts (systemd starting it, an operator typing) neither
/// fails with "in use by another process" nor makes the agent's start fail: each waits for the
/// other. A second agent on the same state directory still gets the clear error.
#[test]
fn commands_and_a_starting_agent_wait_for_each_other() {
    let s = Scratch::new("");
    s.put_pod("idle.yaml", &pod_yaml("idle", &fixture("idle.wat"), ""));
    // A store to read before the agent has one of its own.
    let first = s.start();
    s.wait_running(T);
    drop(first.stop());
    let status = || {
        std::process::Command::new(lichen_bin())
            .args(["status", "--json", "--config"])
            .arg(&s.config)
            .env_remove("LICHEN_CONFIG")
            .output()
            .expect("lichen status")
    };
    let agent = s.start();
    // From the moment it is spawned until it answers itself, every call succeeds: from the store
    // before the agent takes it, from the agent after.
    wait_for(T, "the agent to answer lichen status", || {
        let out = status();
        assert!(out.status.success(), "lichen status during start: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        (v["agent_running"] == true).then_some(())
    });

    let second =
        lichen_tests::Agent::start(&s.run_args().iter().map(String::as_str).collect::<Vec<_>>(), &s.state);
    let (exit, log) = second.wait(Duration::from_secs(40));
    assert!(!exit.success());
    let text = log.join("\n");
    assert!(text.contains("is in use by another process; is another lichen running?"), "{text}");
    let (exit, log) = agent.stop();
    assert!(exit.success(), "{}", log.join("\n"));
}

/// `lichen pods -o json|yaml` prints a `v1 List` of `Pod` objects as kubectl does, so a kubectl
/// user's filters read why a container ended (`.items[].status.containerStatuses[].state.terminated`:
/// exit code, reason, message, start and finish times); `lichen pods --json` carries the same
/// container states on its lines. The agent logs JSON meanwhile, and every line of it is one
/// object with no key twice.
#[test]
fn pods_as_api_objects_show_why_each_container_ended() {
    let s = Scratch::new("[log]\nformat = \"json\"\n");
    let manifest = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: ender\n  labels: {{app: ender}}\nspec:\n  restartPolicy: Never\n  \
         containers:\n  - name: exits\n    image: file://{}\n  - name: traps\n    image: file://{}\n",
        fixture("exit.wat").display(),
        fixture("trap.wat").display()
    );
    s.put_pod("ender.yaml", &manifest);
    let agent = s.start();
    s.wait_running(T);
    s.wait_phase("ender", "Failed", T);

    let text = lichen_ok(&s, &["pods", "-o", "json"]);
    let list: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!((list["apiVersion"].as_str(), list["kind"].as_str()), (Some("v1"), Some("List")), "{text}");
    let pod = list["items"]
        .as_array()
        .and_then(|items| items.iter().find(|p| p["metadata"]["name"] == "ender-test-node"))
        .unwrap_or_else(|| panic!("the pod in {text}"));
    assert_eq!((pod["apiVersion"].as_str(), pod["kind"].as_str()), (Some("v1"), Some("Pod")));
    assert_eq!(pod["metadata"]["namespace"], "default");
    assert_eq!(pod["metadata"]["labels"]["app"], "ender");
    assert!(pod["metadata"]["uid"].as_str().is_some_and(|u| !u.is_empty()), "{pod}");
    assert_eq!(pod["spec"]["restartPolicy"], "Never");
    assert_eq!(pod["status"]["phase"], "Failed");
    let terminated = |name: &str| -> serde_json::Value {
        let statuses = pod["status"]["containerStatuses"].as_array().expect("containerStatuses");
        let c = statuses.iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("{name} in {pod}"));
        c["state"]["terminated"].clone()
    };
    let exits = terminated("exits");
    assert_eq!((exits["exitCode"].as_i64(), exits["reason"].as_str()), (Some(3), Some("Error")), "{exits}");
    let traps = terminated("traps");
    assert_eq!((traps["exitCode"].as_i64(), traps["reason"].as_str()), (Some(134), Some("Trap")), "{traps}");
    assert!(traps["message"].as_str().is_some_and(|m| !m.is_empty()), "the trap is explained: {traps}");
    for t in [&exits, &traps] {
        let started: jiff::Timestamp =
            t["startedAt"].as_str().and_then(|t| t.parse().ok()).expect("startedAt");
        let finished: jiff::Timestamp =
            t["finishedAt"].as_str().and_then(|t| t.parse().ok()).expect("finishedAt");
        assert!(started <= finished, "{t}");
    }

    // YAML: the same objects.
    let yaml = lichen_ok(&s, &["pods", "-o", "yaml"]);
    let from_yaml: serde_json::Value = serde_saphyr::from_str(&yaml).expect("yaml");
    assert_eq!(from_yaml, list, "{yaml}");

    // --json: the report's lines, now with each container's full state, and no objects.
    let lines: serde_json::Value = serde_json::from_str(&lichen_ok(&s, &["pods", "--json"])).expect("json");
    let line = lines
        .as_array()
        .and_then(|l| l.iter().find(|p| p["key"] == "default/ender-test-node"))
        .expect("line");
    let exits = line["container_statuses"].as_array().and_then(|c| c.iter().find(|c| c["name"] == "exits"));
    assert_eq!(
        exits.map(|c| c["state"]["terminated"]["exitCode"].clone()),
        Some(serde_json::json!(3)),
        "{line}"
    );
    assert!(line.get("object").is_none(), "{line}");

    let (exit, log) = agent.stop();
    assert!(exit.success(), "{}", log.join("\n"));
    assert!(!log.is_empty());
    for l in &log {
        lichen_tests::strict_json::parse(l).unwrap_or_else(|e| panic!("{e}: {l}"));
    }
}

/// `lichen <args> --config <scratch config>`, run to its end.
fn lichen_cmd(s: &Scratch, args: &[&str]) -> std::process::Output {
    std::process::Command::new(lichen_bin())
        .args(args)
        .arg("--config")
        .arg(&s.config)
        .env_remove("LICHEN_CONFIG")
        .output()
        .expect("run lichen")
}

/// The command's stdout, after checking that it succeeded.
fn lichen_ok(s: &Scratch, args: &[&str]) -> String {
    let out = lichen_cmd(s, args);
    assert!(out.status.success(), "lichen {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// The command's one-line error, after checking that it failed with status 1.
fn lichen_err(s: &Scratch, args: &[&str]) -> String {
    let out = lichen_cmd(s, args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "lichen {args:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one clear line: {err}");
    err
}

/// A `lichen logs -f` child with its stdout collected line by line.
struct Follow {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Follow {
    fn start(s: &Scratch, args: &[&str]) -> Follow {
        use std::io::BufRead;
        let mut child = std::process::Command::new(lichen_bin())
            .args(args)
            .arg("--config")
            .arg(&s.config)
            .env_remove("LICHEN_CONFIG")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn lichen logs -f");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        let stdout = child.stdout.take().expect("piped");
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().expect("lines").push(line);
            }
        });
        Follow { child, lines }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }

    /// Waits for it to exit on its own.
    fn wait(mut self, timeout: Duration) -> (std::process::ExitStatus, Vec<String>) {
        let status = wait_for(timeout, "lichen logs -f to end", || self.child.try_wait().expect("try_wait"));
        std::thread::sleep(Duration::from_millis(50));
        (status, self.lines())
    }
}

impl Drop for Follow {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The number of a sleeper's `tick N` line.
fn tick(line: &str) -> Option<u64> {
    line.strip_prefix("tick ")?.parse().ok()
}

/// `lichen logs` and `lichen pods` on a running agent and on a stopped one: the container's lines
/// (both streams, in order), `--tail`, `--timestamps`, `-f` getting new lines and ending cleanly on
/// Ctrl-C or when the run ends, `--previous` after a restart, and clear errors.
#[test]
fn logs_and_pods_show_what_static_pods_wrote() {
    let s = Scratch::new("");
    s.put_pod("sleeper.yaml", &pod_yaml("sleeper", &fixture("sleeper.wat"), ""));
    // Exits at once and restarts after the 10 s back-off: its first run becomes the previous one.
    s.put_pod(
        "hello.yaml",
        &format!(
            "{}    args: [from, lichen]\n",
            pod_yaml("hello", &fixture("hello.wat"), "  restartPolicy: Always\n")
        ),
    );
    let agent = s.start();
    wait_for(T, "the sleeper to tick", || (s.output("sleeper", "main", 0).len() > 3).then_some(()));
    wait_for(T, "hello's first run", || (s.output("hello", "main", 0).len() == 2).then_some(()));

    // Everything so far, as the files hold it; the static pod's name with or without the node.
    let full = lichen_ok(&s, &["logs", "sleeper-test-node"]);
    let lines: Vec<&str> = full.lines().collect();
    assert_eq!(lines[..2], ["started", "tick 1"], "{full}");
    assert!(lines[1..].iter().zip(1..).all(|(l, n)| tick(l) == Some(n)), "ticks in order: {full}");
    let short = lichen_ok(&s, &["logs", "sleeper", "main"]);
    assert!(short.starts_with(&full), "the same log by its short name");
    assert_eq!(
        lichen_ok(&s, &["logs", "hello", "-n", "default"]),
        "hello from lichen\nbye\n",
        "stdout and stderr, in order"
    );

    // --tail and --timestamps.
    let last = lichen_ok(&s, &["logs", "sleeper", "--tail", "1"]);
    assert_eq!(last.lines().count(), 1, "{last}");
    assert!(tick(last.trim_end()).is_some_and(|n| n >= 3), "{last}");
    let stamped = lichen_ok(&s, &["logs", "sleeper", "--tail", "2", "--timestamps"]);
    let stamped: Vec<&str> = stamped.lines().collect();
    assert_eq!(stamped.len(), 2, "{stamped:?}");
    let mut times = Vec::new();
    for line in &stamped {
        let (time, text) = line.split_once(' ').expect("time and text");
        times.push(time.parse::<jiff::Timestamp>().unwrap_or_else(|e| panic!("{time}: {e}")));
        assert!(tick(text).is_some(), "{line}");
    }
    assert!(times[0] <= times[1]);
    let age = jiff::Timestamp::now().as_second() - times[1].as_second();
    assert!((0..60).contains(&age), "recent: {stamped:?}");
    assert_eq!(lichen_ok(&s, &["logs", "sleeper", "--since", "1h", "--tail", "1"]).lines().count(), 1);

    // -f: the tail, then lines written after; Ctrl-C ends it cleanly.
    let follow = Follow::start(&s, &["logs", "-f", "--tail", "1", "sleeper"]);
    let first = wait_for(T, "the followed tail", || follow.lines().first().and_then(|l| tick(l)));
    wait_for(T, "new lines while following", || {
        let got: Vec<u64> = follow.lines().iter().filter_map(|l| tick(l)).collect();
        (got.len() >= 5).then_some(()).inspect(|()| {
            assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "each line once, in order: {got:?}");
        })
    });
    assert!(first > 0);
    let _ = std::process::Command::new("kill").args(["-INT", &follow.child.id().to_string()]).status();
    let (status, _) = follow.wait(T);
    assert!(status.success(), "Ctrl-C ends lichen logs -f cleanly: {status:?}");

    // `lichen pods`, from the running agent.
    let pods = lichen_ok(&s, &["pods"]);
    let header = pods.lines().next().expect("header");
    assert!(
        ["NAMESPACE", "NAME", "READY", "STATUS", "RESTARTS", "AGE"].iter().all(|c| header.contains(c)),
        "{pods}"
    );
    let row = pods.lines().find(|l| l.contains("sleeper-test-node")).expect("the sleeper's row");
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[..5], ["default", "sleeper-test-node", "1/1", "Running", "0"], "{pods}");
    assert!(cells[5].ends_with('s'), "an age in seconds: {row}");
    assert!(pods.contains("hello-test-node"), "{pods}");
    let json: serde_json::Value = serde_json::from_str(&lichen_ok(&s, &["pods", "--json"])).expect("json");
    let keys: Vec<&str> = json.as_array().expect("array").iter().filter_map(|p| p["key"].as_str()).collect();
    assert_eq!(keys, ["default/hello-test-node", "default/sleeper-test-node"]);

    // Clear errors.
    let err = lichen_err(&s, &["logs", "nope"]);
    assert!(err.contains("\"nope\"") && err.contains("not found"), "{err}");
    let err = lichen_err(&s, &["logs", "sleeper", "other"]);
    assert!(err.contains("\"other\"") && err.contains("[main]"), "{err}");
    let err = lichen_err(&s, &["logs", "sleeper", "--previous"]);
    assert!(err.contains("previous terminated container \"main\""), "{err}");
    let bad = lichen_cmd(&s, &["logs", "sleeper", "--since", "soon"]);
    assert_eq!(bad.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid duration \"soon\""));

    // --previous once hello has restarted; -f on it ends by itself when its run is over.
    wait_for(Duration::from_secs(40), "hello's second run", || {
        (s.output("hello", "main", 1).len() == 2).then_some(())
    });
    let previous = lichen_ok(&s, &["logs", "hello", "--previous", "--timestamps"]);
    let current = lichen_ok(&s, &["logs", "hello", "--timestamps"]);
    let time = |out: &str| -> jiff::Timestamp {
        out.split_once(' ').and_then(|(t, _)| t.parse().ok()).unwrap_or_else(|| panic!("no timestamp: {out}"))
    };
    assert!(previous.lines().next().is_some_and(|l| l.ends_with(" hello from lichen")), "{previous}");
    assert_eq!(previous.lines().count(), 2, "{previous}");
    assert!(time(&previous) < time(&current), "the previous run is the earlier one:\n{previous}\n{current}");
    let hello_follow = Follow::start(&s, &["logs", "-f", "hello"]);
    let (status, lines) = hello_follow.wait(T);
    assert!(status.success(), "{status:?}");
    assert_eq!(lines[..2], ["hello from lichen", "bye"]);

    // With the agent stopped, the store and the files still answer.
    let (status, log) = agent.stop();
    assert!(status.success(), "{}", log.join("\n"));
    let offline = lichen_ok(&s, &["logs", "sleeper"]);
    assert!(offline.starts_with(&full), "offline, the same log");
    let pods = lichen_ok(&s, &["pods"]);
    assert!(pods.contains("sleeper-test-node"), "{pods}");
    // Nothing runs: -f prints what there is and ends.
    let (status, lines) = Follow::start(&s, &["logs", "-f", "--tail", "1", "sleeper"]).wait(T);
    assert!(status.success() && lines.len() == 1, "{status:?} {lines:?}");
}

/// The agent's thread count (`/proc/<pid>/status`), 0 once it cannot be read.
fn threads(pid: u32) -> u64 {
    status_field(Path::new(&format!("/proc/{pid}/status")), "Threads").unwrap_or(0)
}

/// Wake-ups so far of every thread of process `pid`: the sum of their voluntary context switches
/// (each is the end of a wait), as powertop counts them.
fn wakeups(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks.flatten().filter_map(|t| status_field(&t.path().join("status"), "voluntary_ctxt_switches")).sum()
}

#[test]
fn an_idle_agent_sleeps() {
    // The static pod watcher once took the open and close events of its own scan for changes and
    // rescanned the directory a few hundred times a second for as long as the agent ran: about
    // 400 wake-ups a second on an idle node, a core's worth of power on a board. Idle, the agent
    // wakes for its timers and sled's I/O threads' ticks: about 7 a second.
    const MOST_PER_SEC: f64 = 40.0;
    const WINDOW: Duration = Duration::from_secs(5);
    let s = Scratch::new("");
    let agent = s.start();
    s.wait_running(T);
    s.put_pod("idle.yaml", &pod_yaml("idle", &fixture("idle.wat"), ""));
    wait_for(T, "the pod's first output", || s.output("idle", "main", 0).first().cloned());
    let pid = agent.pid();
    let (before, start) = (wakeups(pid), std::time::Instant::now());
    // The window is the measurement, not a wait for something to happen.
    std::thread::sleep(WINDOW);
    let rate = wakeups(pid).saturating_sub(before) as f64 / start.elapsed().as_secs_f64();
    assert!(
        rate <= MOST_PER_SEC,
        "an idle agent woke {rate:.0} times a second (at most {MOST_PER_SEC} wanted)"
    );
    let (status, _) = agent.stop();
    assert!(status.success());
}

#[test]
fn a_burst_of_pods_starts_and_goes_on_a_bounded_number_of_threads() {
    // 100 pods of one module created at once, then deleted at once: with tokio's default blocking
    // pool, each pod loaded the module on a thread of its own and each removal took one, and the
    // agent grew to 89-277 threads (each keeping its stack for 10 s after). Now one load serves
    // them all and the pool has at most 16 threads: 13 idle, so 29 at most, with room for sled's
    // I/O threads, which it starts under load.
    const PODS: usize = 100;
    const MOST: u64 = 36;
    let s = Scratch::new("max_pods = 200");
    let agent = s.start();
    s.wait_running(T);
    let pid = agent.pid();
    let mut most = threads(pid);
    for i in 0..PODS {
        s.put_pod(&format!("burst-{i}.yaml"), &pod_yaml(&format!("burst-{i}"), &fixture("idle.wat"), ""));
    }
    let phases = |s: &Scratch| -> Vec<String> {
        let status = s.status_json();
        let pods = status["pods"].as_array().cloned().unwrap_or_default();
        pods.iter().map(|p| p["phase"].as_str().unwrap_or("").to_owned()).collect()
    };
    wait_for(T, "every pod of the burst Running", || {
        most = most.max(threads(pid));
        let p = phases(&s);
        (p.len() == PODS && p.iter().all(|x| x == "Running")).then_some(())
    });
    for i in 0..PODS {
        std::fs::remove_file(s.pods.join(format!("burst-{i}.yaml"))).expect("remove a manifest");
    }
    wait_for(T, "every pod of the burst gone", || {
        most = most.max(threads(pid));
        phases(&s).is_empty().then_some(())
    });
    assert!(most <= MOST, "the agent used {most} threads for a burst of {PODS} pods (at most {MOST} wanted)");
    let (status, _) = agent.stop();
    assert!(status.success());
}
