//! Test harness for Lichen's integration tests: fixture modules, the real `lichen` binary run as a
//! child process with its log captured, and waiting helpers that fail with what was seen.
//!
//! Tests here use real parts only: Wasmtime itself, sled on a real disk, the compiled binary.

pub mod agent_image;
pub mod board;
pub mod cluster;
pub mod fakeapi;
pub mod mosquitto;
pub mod mqtt_paths;
pub mod registry;
pub mod strict_json;
pub mod top;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A fixture module's path (`tests/fixtures/<name>`).
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

/// The `lichen` binary that `cargo test --workspace` built beside this test.
///
/// Tests of a cross build run under an emulator (`cross/build.sh test`, with cargo's
/// `CARGO_TARGET_<TRIPLE>_RUNNER`), where the binary is a foreign-architecture executable that
/// cannot be spawned directly unless binfmt_misc is set up. There `LICHEN_BIN_RUNNER` names the
/// command that runs it (`qemu-aarch64-static -L /usr/aarch64-linux-gnu`), and this returns a
/// `sh` script beside the binary that `exec`s it through that command: callers keep spawning one
/// path, and the pid they signal is the emulated agent's.
pub fn lichen_bin() -> PathBuf {
    let bin = match std::env::var_os("LICHEN_BIN") {
        Some(p) => PathBuf::from(p),
        None => {
            let exe = std::env::current_exe().expect("test executable path");
            // target/<profile>/deps/<test> -> target/<profile>/lichen
            let bin = exe.parent().and_then(Path::parent).map(|d| d.join("lichen")).expect("target dir");
            assert!(
                bin.is_file(),
                "{} not found: run the tests with `cargo test --workspace` (which builds it) or set LICHEN_BIN",
                bin.display()
            );
            bin
        }
    };
    match std::env::var("LICHEN_BIN_RUNNER") {
        Ok(runner) if !runner.trim().is_empty() => {
            static WRAPPER: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
            WRAPPER.get_or_init(|| runner_script(&bin, &runner)).clone()
        }
        _ => bin,
    }
}

/// Writes `<bin>-via-runner`, a script running `bin` through `runner` (written to a temporary
/// name and renamed, so a concurrent test process never sees half a script).
fn runner_script(bin: &Path, runner: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let quoted = format!("'{}'", bin.display().to_string().replace('\'', r#"'\''"#));
    let script = format!("#!/bin/sh\nexec {runner} {quoted} \"$@\"\n");
    let path = PathBuf::from(format!("{}-via-runner", bin.display()));
    let tmp = PathBuf::from(format!("{}.{}", path.display(), std::process::id()));
    std::fs::write(&tmp, script).expect("write the runner script");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).expect("chmod the runner script");
    std::fs::rename(&tmp, &path).expect("rename the runner script");
    path
}

/// Polls `f` every 10 ms until it returns `Some` or `timeout` passes; panics with `what` on timeout.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Like [`wait_for`] for async checks (API calls).
pub async fn wait_for_async<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The environment `systemd/lichen.service` gives the agent (its `Environment=` lines, each
/// `KEY=VALUE` word), for benchmarks that measure the agent as a board runs it. Empty when
/// `LICHEN_BENCH_UNIT_ENV=0` (to measure without it) or when the unit cannot be read.
pub fn service_environment() -> Vec<(String, String)> {
    if std::env::var("LICHEN_BENCH_UNIT_ENV").is_ok_and(|v| v == "0") {
        return Vec::new();
    }
    unit_environment().unwrap_or_default()
}

/// The `Environment=` settings of `systemd/lichen.service` in this checkout, each `KEY=VALUE` word.
pub fn unit_environment() -> std::io::Result<Vec<(String, String)>> {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/lichen.service");
    let text = std::fs::read_to_string(unit)?;
    Ok(text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Environment="))
        .flat_map(str::split_whitespace)
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect())
}

/// A `lichen run` child process with its stderr captured line by line.
pub struct Agent {
    child: Child,
    /// Each stderr line, with when the reader took it from the pipe.
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    /// The state directory it was given.
    pub state_dir: PathBuf,
}

impl Agent {
    /// Starts `lichen <args>` (normally `run --config …`) with `state_dir` for later inspection.
    pub fn start(args: &[&str], state_dir: &Path) -> Agent {
        Agent::start_with_env(args, state_dir, &[])
    }

    /// [`Agent::start`] with extra environment variables (libfaketime's, say, to move its clock).
    pub fn start_with_env(args: &[&str], state_dir: &Path, env: &[(&str, &str)]) -> Agent {
        let mut child = Command::new(lichen_bin())
            .args(args)
            // Tests run side by side: the metrics endpoint on a port of its own, and the kubelet
            // API (0.0.0.0:10250 by default) off unless a test asks for it with a flag or `env`.
            .env("LICHEN_METRICS_ADDRESS", "127.0.0.1:0")
            .env("LICHEN_KUBELET_PORT", "0")
            .envs(env.iter().copied())
            .env_remove("LICHEN_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn lichen");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let stderr = child.stderr.take().expect("stderr piped");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("LICHEN_TEST_ECHO").is_some() {
                    eprintln!("agent| {line}");
                }
                sink.lock().expect("log lock").push((Instant::now(), line));
            }
        });
        Agent { child, lines, state_dir: state_dir.to_owned() }
    }

    /// Everything the agent logged so far.
    pub fn log(&self) -> Vec<String> {
        self.lines.lock().expect("log lock").iter().map(|(_, l)| l.clone()).collect()
    }

    /// When the first line containing every one of `needles` came out of the agent's stderr (for
    /// benchmarks timing what the agent did against what a client did).
    pub fn line_arrived(&self, needles: &[&str]) -> Option<Instant> {
        let lines = self.lines.lock().expect("log lock");
        lines.iter().find(|(_, l)| needles.iter().all(|n| l.contains(n))).map(|(at, _)| *at)
    }

    /// Waits until a log line contains every one of `needles`; returns it.
    pub fn wait_log(&self, needles: &[&str], timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Some(l) = self.log().into_iter().find(|l| needles.iter().all(|n| l.contains(n))) {
                return l;
            }
            if start.elapsed() > timeout {
                panic!(
                    "timed out waiting for a log line with {needles:?}; the agent logged:\n{}",
                    self.log().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for exit.
    pub fn stop(mut self) -> (ExitStatus, Vec<String>) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let status = wait_exit(&mut self.child, Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(50));
        (status, self.log())
    }

    /// Waits for the process to exit on its own.
    pub fn wait(mut self, timeout: Duration) -> (ExitStatus, Vec<String>) {
        let status = wait_exit(&mut self.child, timeout);
        std::thread::sleep(Duration::from_millis(50));
        (status, self.log())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_exit(child: &mut Child, timeout: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            panic!("lichen did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A scratch layout for one agent: a state dir, a pod dir and a config file pointing at both.
pub struct Scratch {
    /// Keeps the directory alive.
    pub dir: tempfile::TempDir,
    /// `<dir>/state`.
    pub state: PathBuf,
    /// `<dir>/pods`.
    pub pods: PathBuf,
    /// `<dir>/lichen.toml`.
    pub config: PathBuf,
}

impl Scratch {
    /// Creates the layout with `extra` appended to the config file.
    pub fn new(extra: &str) -> Scratch {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let pods = dir.path().join("pods");
        std::fs::create_dir_all(&pods).expect("pods dir");
        let config = dir.path().join("lichen.toml");
        let text = format!(
            "node_name = \"test-node\"\nstate_dir = {:?}\nstatic_pod_dir = {:?}\nshutdown_timeout_secs = 5\n{extra}\n",
            state.display().to_string(),
            pods.display().to_string()
        );
        std::fs::write(&config, text).expect("config");
        Scratch { dir, state, pods, config }
    }

    /// A `[modules]` table letting cluster pods load `file://` modules from the fixtures and this
    /// scratch directory (what an operator lists in `modules.file_dirs`). Put it after top-level keys.
    pub fn modules_table(&self) -> String {
        format!(
            "[modules]\nfile_dirs = [{:?}, {:?}]\n",
            fixture("").display().to_string().trim_end_matches('/'),
            self.dir.path().display().to_string()
        )
    }

    /// Rewrites the config for a benchmark's cluster node `name` with `kubeconfig`: no static pods,
    /// loopback address, no disk-pressure threshold, container logs not echoed, the fixtures'
    /// modules allowed.
    pub fn write_bench_node_config(&self, name: &str, kubeconfig: &Path) {
        let config = format!(
            "node_name = {name:?}\nstate_dir = {:?}\nstatic_pod_dir = \"\"\nnode_ip = \"127.0.0.1\"\n\
             shutdown_timeout_secs = 10\ndisk_pressure_percent = 0\nkubeconfig = {:?}\n\
             [container_logs]\necho = false\n{}",
            self.state.display().to_string(),
            kubeconfig.display().to_string(),
            self.modules_table()
        );
        std::fs::write(&self.config, config).expect("config");
    }

    /// What `lichen status --json` printed for this agent, and how it exited.
    pub fn status_output(&self) -> std::process::Output {
        Command::new(lichen_bin())
            .args(["status", "--json", "--config"])
            .arg(&self.config)
            .env_remove("LICHEN_CONFIG")
            .output()
            .expect("lichen status")
    }

    /// `lichen status --json` for this agent: through its socket while it runs, from the store
    /// when it does not.
    pub fn status_json(&self) -> serde_json::Value {
        let out = self.status_output();
        assert!(out.status.success(), "lichen status failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("status json")
    }

    /// Waits until the agent on this layout answers `lichen status` itself (`agent_running`): its
    /// store is open and its control socket serves. Calls before that read the store, or fail
    /// while there is none yet; both mean "not yet".
    pub fn wait_running(&self, timeout: Duration) {
        wait_for(timeout, "the agent to answer `lichen status` as running", || {
            let out = self.status_output();
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            (out.status.success() && v["agent_running"] == true).then_some(())
        })
    }

    /// Waits until `lichen status` shows the static pod `pod` (on node `test-node`) in `phase`.
    pub fn wait_phase(&self, pod: &str, phase: &str, timeout: Duration) {
        let key = format!("default/{pod}-test-node");
        wait_for(timeout, &format!("{key} to be {phase}"), || {
            let status = self.status_json();
            let pods = status["pods"].as_array()?;
            pods.iter().any(|p| p["key"] == key.as_str() && p["phase"] == phase).then_some(())
        })
    }

    /// `["run", "--config", <config>]`.
    pub fn run_args(&self) -> Vec<String> {
        vec!["run".into(), "--config".into(), self.config.display().to_string()]
    }

    /// Runs `lichen <args> --config <this layout's config>` with `input` on its stdin and no
    /// registry password from the environment; its output, whatever the exit status.
    pub fn lichen(&self, args: &[&str], input: &str) -> std::process::Output {
        use std::io::Write as _;
        let mut child = Command::new(lichen_bin())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env_remove("LICHEN_CONFIG")
            .env_remove("LICHEN_REGISTRY_PASSWORD")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn lichen");
        child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("stdin");
        child.wait_with_output().expect("lichen output")
    }

    /// Starts the agent on this layout.
    pub fn start(&self) -> Agent {
        let args = self.run_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Agent::start(&args, &self.state)
    }

    /// Starts the agent on this layout with the environment its systemd unit gives it
    /// ([`service_environment`]).
    pub fn start_as_service(&self) -> Agent {
        let args = self.run_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env = service_environment();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Agent::start_with_env(&args, &self.state, &env)
    }

    /// Writes a manifest atomically (write + rename), as configuration tools do.
    pub fn put_pod(&self, file: &str, yaml: &str) {
        let tmp = self.dir.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).expect("write manifest");
        std::fs::rename(&tmp, self.pods.join(file)).expect("rename manifest");
    }

    /// The directory holding a static pod's container logs, once it exists.
    pub fn log_dir(&self, pod: &str, container: &str) -> Option<PathBuf> {
        self.pod_log_dir(&format!("{pod}-test-node"), container)
    }

    /// The directory holding the container logs of the pod `default/<name>`, once it exists.
    fn pod_log_dir(&self, name: &str, container: &str) -> Option<PathBuf> {
        let prefix = format!("default_{name}_");
        std::fs::read_dir(self.state.join("logs"))
            .ok()?
            .flatten()
            .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path().join(container))
    }

    /// The text lines of a static pod's container log for run `run`.
    pub fn output(&self, pod: &str, container: &str, run: u32) -> Vec<String> {
        self.pod_output(&format!("{pod}-test-node"), container, run)
    }

    /// The text lines of run `run` of a container of the pod `default/<name>` (a cluster pod's
    /// name as is; a static pod's with its node suffix).
    pub fn pod_output(&self, name: &str, container: &str, run: u32) -> Vec<String> {
        self.pod_log_dir(name, container)
            .and_then(|d| lichen::runtime::logs::read_run(&d, run).ok())
            .map(|recs| recs.into_iter().map(|r| r.text).collect())
            .unwrap_or_default()
    }
}

/// Starts `lichen` as cluster node `name` with `kubeconfig`, its kubelet API on 127.0.0.1:`port`
/// and the Hostname address `localhost` (which the API server dials first for `kubectl logs`).
pub fn start_kubelet_node(s: &Scratch, name: &str, kubeconfig: &Path, port: u16) -> Agent {
    let config = format!(
        "node_name = {name:?}\nstate_dir = {:?}\nstatic_pod_dir = \"\"\nnode_ip = \"127.0.0.1\"\n\
         node_hostname = \"localhost\"\nshutdown_timeout_secs = 5\ndisk_pressure_percent = 0\nkubeconfig = {:?}\n\
         [kubelet_api]\naddress = \"127.0.0.1\"\n{}",
        s.state.display().to_string(),
        kubeconfig.display().to_string(),
        s.modules_table()
    );
    std::fs::write(&s.config, config).expect("config");
    let args = s.run_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let port = port.to_string();
    Agent::start_with_env(&args, &s.state, &[("LICHEN_KUBELET_PORT", &port)])
}

/// A Pod manifest with one container.
pub fn pod_yaml(name: &str, image: &Path, extra_spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n{extra_spec}  containers:\n  - name: main\n    image: file://{}\n",
        image.display()
    )
}

/// The status (`True`, `False`, `Unknown`) of a Node's condition `kind`, if reported.
pub fn node_condition(node: &k8s_openapi::api::core::v1::Node, kind: &str) -> Option<String> {
    let c = node.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == kind)?;
    Some(c.status.clone())
}

/// Whether a pod is `Running`, `Ready`, and its first container running: what a user waits for.
pub fn is_running_ready(p: &k8s_openapi::api::core::v1::Pod) -> bool {
    let st = p.status.as_ref();
    st.and_then(|s| s.phase.as_deref()) == Some("Running")
        && st
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        && st
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .is_some_and(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
}

/// Whether this process runs as root (the permission and packaging tests take other paths then).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// The stdout lines of a container run's log records, in order.
pub fn stdout_lines(recs: &[lichen::runtime::logs::LogRecord]) -> Vec<&str> {
    recs.iter()
        .filter(|r| r.stream == lichen::runtime::logs::Stream::Stdout)
        .map(|r| r.text.as_str())
        .collect()
}

/// A finished `lichen` command's stderr; fails the test unless it failed.
pub fn lichen_err(out: std::process::Output) -> String {
    assert!(!out.status.success(), "lichen should have failed: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A finished `lichen` command's stdout; fails the test with its stdout and stderr unless it
/// succeeded.
pub fn lichen_ok(out: std::process::Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "lichen failed: {}{}", text, String::from_utf8_lossy(&out.stderr));
    text
}

/// Whether the agent runs under an emulator (`LICHEN_BIN_RUNNER`, see [`lichen_bin`]). There a
/// process's resident memory is the emulator's: its translated-code cache and its own maps come on
/// top of the agent's.
pub fn emulated() -> bool {
    std::env::var("LICHEN_BIN_RUNNER").is_ok_and(|r| !r.trim().is_empty())
}

/// The number a `/proc` status file (a process's, or a thread's under `task/`) gives for `name`
/// (`"VmRSS"`, `"Threads"`: the first word after the colon), if it can be read.
pub fn status_field(status: &Path, name: &str) -> Option<u64> {
    let text = std::fs::read_to_string(status).ok()?;
    let rest = text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))?;
    rest.split_whitespace().next()?.parse().ok()
}

/// Resident memory of process `pid` in KiB (0 if it cannot be read), for benchmarks.
pub fn rss_kib(pid: u32) -> u64 {
    status_field(Path::new(&format!("/proc/{pid}/status")), "VmRSS").unwrap_or(0)
}

/// The `p` quantile (0.0–1.0) of sorted, non-empty durations, for benchmarks.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Copies a child process's output into `log` line by line (echoed as `<label>| line` with
/// `LICHEN_TEST_ECHO` set), for the harnesses of the real daemons tests start.
pub fn capture_lines(
    pipe: Option<impl std::io::Read + Send + 'static>,
    log: Arc<Mutex<Vec<String>>>,
    label: &'static str,
) {
    let Some(pipe) = pipe else { return };
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if std::env::var_os("LICHEN_TEST_ECHO").is_some() {
                eprintln!("{label}| {line}");
            }
            log.lock().expect("captured log lock").push(line);
        }
    });
}

/// A loopback port that was free a moment ago and that this process has not handed out before
/// (two daemons started in one test never get the same one).
pub fn free_port() -> u16 {
    static GIVEN: Mutex<std::collections::BTreeSet<u16>> = Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind a loopback port")
            .port();
        if GIVEN.lock().expect("port set lock").insert(port) {
            return port;
        }
    }
}

/// Makes a test PKI in `dir` with the `openssl` command: `ca.key`/`ca.pem` for a CA named
/// `ca_subject`, and for each `(name, subject, extensions)` a key `<name>.key` and a certificate
/// `<name>.pem` signed by it (`extensions` in openssl's extfile syntax, e.g. the SAN and
/// extended key usage). Valid for two days.
pub fn openssl_pki(dir: &Path, ca_subject: &str, certs: &[(&str, &str, &str)]) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().unwrap_or_else(|e| {
            panic!("running `openssl` failed: {e}; the TLS tests need it (apt-get install openssl)")
        });
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    openssl(&[
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", ca_subject, "-keyout",
        "ca.key", "-out", "ca.pem",
    ]);
    for (name, subject, extensions) in certs {
        let (key, csr, ext, pem) =
            (format!("{name}.key"), format!("{name}.csr"), format!("{name}.ext"), format!("{name}.pem"));
        openssl(&["req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", &key, "-out", &csr]);
        std::fs::write(dir.join(&ext), format!("{extensions}\n")).expect("extensions file");
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &pem,
        ]);
    }
}
