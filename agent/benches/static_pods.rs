//! Static pod benchmark: what the release-built `lichen run` costs on this machine.
//!
//! Run with `cargo bench -p lichen --bench static_pods`. It measures, against the real binary:
//!
//! 1. idle RSS with an empty static pod directory;
//! 2. start latency, from a manifest being renamed into the pod directory to the module's first output
//!    line (as echoed into the agent's JSON log), over 100 pods created one at a time: the first pod
//!    compiles `tests/fixtures/idle.wat`, the other 99 reuse the compiled module;
//! 3. RSS with those 100 idle pods running, and the increment per pod over idle.
//!
//! It prints figures and a Markdown table for the README. It exits non-zero only if the agent misbehaves
//! (does not start, a pod never prints, a wait times out), after printing what the agent logged.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Pods started in the latency run.
const PODS: usize = 100;
/// Longest any single wait may take.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Settling time before reading RSS.
const SETTLE: Duration = Duration::from_secs(2);
const NODE: &str = "benchnode";

/// What the stderr reader has seen.
#[derive(Default)]
struct Seen {
    /// Every line, for the failure report.
    lines: Vec<String>,
    /// The agent logged `lichen running`.
    running: bool,
    /// Container label (`default/<pod>-<node>/main`) -> timestamp of its first output line.
    first_output: HashMap<String, jiff::Timestamp>,
}

/// The agent's log, shared with the reader thread.
#[derive(Clone, Default)]
struct Log(Arc<(Mutex<Seen>, Condvar)>);

impl Log {
    fn record(&self, line: String) {
        let (lock, cvar) = &*self.0;
        let mut seen = lock.lock().expect("log lock");
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            let fields = &v["fields"];
            let message = fields["message"].as_str().unwrap_or("");
            if v["target"] == "lichen::container" {
                let label = fields["container"].as_str().unwrap_or("").to_owned();
                let ts = v["timestamp"].as_str().and_then(|t| t.parse::<jiff::Timestamp>().ok());
                if let Some(ts) = ts {
                    seen.first_output.entry(label).or_insert(ts);
                }
            } else if message == "lichen running" {
                seen.running = true;
            }
        }
        seen.lines.push(line);
        cvar.notify_all();
    }

    /// Waits until `f` returns `Some`, or fails the benchmark after [`TIMEOUT`] naming `what`.
    fn wait<T>(&self, what: &str, mut f: impl FnMut(&Seen) -> Option<T>) -> T {
        let (lock, cvar) = &*self.0;
        let start = Instant::now();
        let mut seen = lock.lock().expect("log lock");
        loop {
            if let Some(v) = f(&seen) {
                return v;
            }
            let left = TIMEOUT.saturating_sub(start.elapsed());
            if left.is_zero() {
                let lines = seen.lines.join("\n");
                drop(seen);
                fail(&format!("timed out after {TIMEOUT:?} waiting for {what}; the agent logged:\n{lines}"));
            }
            seen = cvar.wait_timeout(seen, left.min(Duration::from_millis(200))).expect("log lock").0;
        }
    }

    fn lines(&self) -> String {
        self.0.0.lock().expect("log lock").lines.join("\n")
    }
}

fn fail(message: &str) -> ! {
    eprintln!("static_pods bench FAILED: {message}");
    std::process::exit(1);
}

/// Reads `VmRSS` and `VmHWM` (KiB) and `Threads` from `/proc/<pid>/status`.
fn proc_status(pid: u32) -> (u64, u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| fail(&format!("cannot read /proc/{pid}/status: {e}")));
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| fail(&format!("no {name} in /proc/{pid}/status")))
    };
    (field("VmRSS:"), field("VmHWM:"), field("Threads:"))
}

/// The `Rss`, `Anonymous` and `Pss_File` lines of `/proc/<pid>/smaps_rollup`, if readable.
fn smaps_summary(pid: u32) -> String {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) else {
        return "unavailable".into();
    };
    let get = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or("?")
            .to_owned()
    };
    format!("Anonymous {} KiB, Pss_File {} KiB", get("Anonymous:"), get("Pss_File:"))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The `q` quantile (nearest rank) of sorted `v`.
fn quantile(v: &[Duration], q: f64) -> Duration {
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn command_output(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "?".into())
}

fn pod_manifest(name: &str, image: &Path) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  containers:\n  - name: main\n    image: file://{}\n",
        image.display()
    )
}

struct Agent {
    child: Child,
    log: Log,
}

impl Agent {
    fn start(config: &Path) -> Agent {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lichen"))
            .args(["run", "--config"])
            .arg(config)
            .env_remove("LICHEN_CONFIG")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| fail(&format!("cannot start {}: {e}", env!("CARGO_BIN_EXE_lichen"))));
        let stderr = child.stderr.take().unwrap_or_else(|| fail("stderr not piped"));
        let log = Log::default();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.record(line);
            }
        });
        Agent { child, log }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails the benchmark if the agent has exited.
    fn check_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            std::thread::sleep(Duration::from_millis(100));
            fail(&format!("lichen exited early ({status}); it logged:\n{}", self.log.lines()));
        }
    }

    /// SIGTERM, then waits (bounded) for exit; returns the wall time shutdown took.
    fn stop(mut self) -> Duration {
        let start = Instant::now();
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) if status.success() => return start.elapsed(),
                Ok(Some(status)) => {
                    std::thread::sleep(Duration::from_millis(100));
                    fail(&format!("lichen exited with {status} on SIGTERM; it logged:\n{}", self.log.lines()))
                }
                Ok(None) if start.elapsed() > TIMEOUT => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    fail(&format!(
                        "lichen did not exit within {TIMEOUT:?} of SIGTERM; it logged:\n{}",
                        self.log.lines()
                    ))
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => fail(&format!("cannot wait for lichen: {e}")),
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Only reached on a failure path that did not exit: never leave an agent behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn main() {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_lichen"));
    let image = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/idle.wat");
    let image = image.canonicalize().unwrap_or_else(|e| fail(&format!("{}: {e}", image.display())));
    let bin_size = std::fs::metadata(&bin).map(|m| m.len()).unwrap_or(0);
    println!("lichen static pod benchmark");
    println!(
        "machine: {} cores (nproc), {}; kernel {}",
        command_output("nproc", &[]),
        command_output("uname", &["-m"]),
        command_output("uname", &["-r"])
    );
    println!("binary:  {} ({:.2} MiB, {bin_size} bytes)", bin.display(), mib(bin_size / 1024));
    println!("module:  {}", image.display());

    let dir = tempfile::tempdir().unwrap_or_else(|e| fail(&format!("tempdir: {e}")));
    let state = dir.path().join("state");
    let pods = dir.path().join("pods");
    let staging = dir.path().join("staging");
    for d in [&pods, &staging] {
        std::fs::create_dir_all(d).unwrap_or_else(|e| fail(&format!("{}: {e}", d.display())));
    }
    let config = dir.path().join("lichen.toml");
    let text = format!(
        "node_name = \"{NODE}\"\nstate_dir = {:?}\nstatic_pod_dir = {:?}\nmax_pods = 200\n\
         shutdown_timeout_secs = 5\n\n[log]\nformat = \"json\"\n\n[container_logs]\necho = true\n",
        state.display().to_string(),
        pods.display().to_string()
    );
    std::fs::write(&config, text).unwrap_or_else(|e| fail(&format!("{}: {e}", config.display())));

    // 1. Idle.
    let mut agent = Agent::start(&config);
    let pid = agent.pid();
    agent.log.wait("`lichen running`", |s| s.running.then_some(()));
    std::thread::sleep(SETTLE);
    agent.check_alive();
    let (idle_rss, idle_hwm, idle_threads) = proc_status(pid);
    println!();
    println!(
        "idle RSS, no pods: VmRSS {:.2} MiB, VmHWM {:.2} MiB, {idle_threads} threads ({})",
        mib(idle_rss),
        mib(idle_hwm),
        smaps_summary(pid)
    );

    // 2. Start latency, one pod at a time.
    let mut latencies = Vec::with_capacity(PODS);
    let wall = Instant::now();
    for i in 0..PODS {
        let name = format!("bench-{i}");
        let file = format!("{name}.yaml");
        let tmp = staging.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, pod_manifest(&name, &image))
            .unwrap_or_else(|e| fail(&format!("{}: {e}", tmp.display())));
        let label = format!("default/{name}-{NODE}/main");
        let created = SystemTime::now();
        std::fs::rename(&tmp, pods.join(&file)).unwrap_or_else(|e| fail(&format!("rename {file}: {e}")));
        let first = agent
            .log
            .wait(&format!("the first output line of {label}"), |s| s.first_output.get(&label).copied());
        let created = jiff::Timestamp::try_from(created).unwrap_or_else(|e| fail(&format!("clock: {e}")));
        let latency = first.duration_since(created);
        let latency = Duration::try_from(latency).unwrap_or_else(|_| {
            fail(&format!("{label} printed at {first}, before its manifest appeared at {created}"))
        });
        latencies.push(latency);
    }
    let wall = wall.elapsed();
    agent.check_alive();
    let first_pod = latencies[0];
    let mut cached = latencies[1..].to_vec();
    cached.sort();
    let mut all = latencies.clone();
    all.sort();
    println!();
    println!(
        "start to first output, {PODS} pods created one at a time ({:.2} s in all):",
        wall.as_secs_f64()
    );
    println!("  first pod (compiles the module): {:.2} ms", ms(first_pod));
    println!(
        "  cached module ({} pods): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, min {:.2} ms",
        cached.len(),
        ms(quantile(&cached, 0.50)),
        ms(quantile(&cached, 0.99)),
        ms(quantile(&cached, 1.0)),
        ms(quantile(&cached, 0.0)),
    );
    println!(
        "  all {PODS} pods:                  p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(quantile(&all, 0.50)),
        ms(quantile(&all, 0.99)),
        ms(quantile(&all, 1.0)),
    );

    // 3. RSS with every pod running.
    std::thread::sleep(SETTLE);
    agent.check_alive();
    let (rss100, hwm100, threads100) = proc_status(pid);
    let per_pod_kib = rss100.saturating_sub(idle_rss) as f64 / PODS as f64;
    println!();
    println!(
        "RSS with {PODS} idle pods: VmRSS {:.2} MiB, VmHWM {:.2} MiB, {threads100} threads ({})",
        mib(rss100),
        mib(hwm100),
        smaps_summary(pid)
    );
    println!("per idle running module: {per_pod_kib:.1} KiB ((VmRSS - idle) / {PODS})");

    let shutdown = agent.stop();
    println!();
    println!("shutdown with {PODS} pods (SIGTERM to exit): {:.2} s", shutdown.as_secs_f64());

    println!();
    println!("| figure | value | aim |");
    println!("|---|---|---|");
    println!("| idle RSS, no pods | {:.1} MiB | ≤ 15 MiB |", mib(idle_rss));
    println!(
        "| start to first output, p50 (cached module) | {:.1} ms | ≤ 20 ms |",
        ms(quantile(&cached, 0.50))
    );
    println!("| start to first output, p99 | {:.1} ms | |", ms(quantile(&cached, 0.99)));
    println!("| first pod (compiles the module) | {:.1} ms | |", ms(first_pod));
    println!("| RSS with {PODS} idle pods | {:.1} MiB | |", mib(rss100));
    println!("| per idle running module | {per_pod_kib:.0} KiB | ≤ 512 KiB |");
}
