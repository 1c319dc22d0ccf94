//! Memory that comes back: the release agent's resident memory standalone (static pods only; no API
//! server, MQTT, metrics endpoint or kubelet API), idle, with 100 idle pods, after deleting them, and
//! over create/delete cycles of 100 pods. A node running Jobs for months churns pods the same way,
//! so memory that a churned pod leaves behind is a leak there.
//!
//! Every pod runs `tests/fixtures/idle.wat` (prints a line, then sleeps). Each reading is VmRSS from
//! `/proc/<pid>/status` (RssAnon and RssFile beside it), taken [`SETTLE`] after the fact it follows:
//! `lichen running` in the agent's log; `lichen pods` showing all 100 `Running`; `lichen pods`
//! listing none after the manifests were removed. The settling time is part of the definition: it
//! lets the agent finish what it does after a pod is gone, as any later reading would see it. The
//! three aims (idle, with 100 pods, after deleting them) are read once the work is over: [`AFTER_RELEASE`]
//! after the agent next gives back the code pages the work ran (heap.rs); the reading right after
//! the fact is printed beside. The cycles' count is `LICHEN_BENCH_CYCLES` (20 unless set; a soak
//! sets 1000), each read right after its deletion, and one more reading is taken [`LATER`] after
//! the last cycle. The growth aim compares what the cycles left once the work is over, read as the
//! first deletion's ([`AFTER_RELEASE`] after the release that follows the cycles), with that first
//! reading; the readings right after each deletion still hold what the agent gives back a few
//! seconds later by design, and their growth is printed beside. The agent gets the environment `systemd/lichen.service` gives it on a board
//! (glibc's allocator settings); `LICHEN_BENCH_UNIT_ENV=0` runs it without.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::report::Report;

const SECTION: &str = "memory";
/// Pods created at once in each step.
const PODS: usize = 100;
/// Cycles unless `LICHEN_BENCH_CYCLES` says otherwise.
const CYCLES: usize = 20;
/// From the fact a reading follows to the reading.
const SETTLE: Duration = Duration::from_secs(2);
/// From the agent's release of idle code pages to a reading (idle, with pods, after deleting).
const AFTER_RELEASE: Duration = Duration::from_secs(30);
/// The reading after the last cycle.
const LATER: Duration = Duration::from_secs(30);
/// The longest any wait for a fact may take.
const TIMEOUT: Duration = Duration::from_secs(120);
/// The aims (MiB).
const IDLE_AIM: f64 = 8.0;
const PODS_AIM: f64 = 24.0;
const AFTER_AIM_OVER_IDLE: f64 = 5.0;
/// "No growth" over the cycles: the last reading within this of the first (allocator noise).
const GROWTH_TOLERANCE: f64 = 1.0;

/// One reading of `/proc/<pid>/status`, in MiB, with the thread count.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rss {
    total: f64,
    anon: f64,
    file: f64,
    threads: u64,
}

impl Rss {
    pub(crate) fn read(pid: u32) -> Option<Rss> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok())
        };
        let mib = |kib: u64| kib as f64 / 1024.0;
        Some(Rss {
            total: mib(field("VmRSS:")?),
            anon: mib(field("RssAnon:")?),
            file: mib(field("RssFile:")?),
            threads: field("Threads:")?,
        })
    }

    fn text(&self) -> String {
        format!("{:.1} MiB", self.total)
    }

    /// The total with its split.
    pub(crate) fn both(&self) -> String {
        format!("{} ({})", self.text(), self.split())
    }

    fn split(&self) -> String {
        format!("anon {:.1} MiB, file {:.1} MiB, {} threads", self.anon, self.file, self.threads)
    }
}

/// Where a reading's resident memory is, from `/proc/<pid>/smaps`, in MiB: the heap (`[heap]`,
/// glibc's main arena), other anonymous mappings (thread stacks, fibers, Wasmtime's memories,
/// memory images and code, large blocks on pages of their own), the agent's binary (code,
/// read-only data and its relocated part) and everything else file-backed (the C library, the
/// loader; shared with other processes). It tells fragmentation in the heap from memory held
/// elsewhere.
#[derive(Debug, Clone, Copy, Default)]
struct Mappings {
    heap: f64,
    anon: f64,
    binary: f64,
    libraries: f64,
}

impl Mappings {
    fn read(pid: u32) -> Option<Mappings> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
        let exe = exe.to_string_lossy();
        let mut m = Mappings::default();
        let mut slot: Option<&mut f64> = None;
        for line in text.lines() {
            let mut fields = line.split_whitespace();
            let Some(first) = fields.next() else { continue };
            if first.contains('-') && !first.ends_with(':') {
                // A mapping's header: range, perms, offset, device, inode, then the path if any
                // (which may hold spaces: it is the rest of the line).
                let path = fields.nth(4).map(|_| line[line.find(['/', '[']).unwrap_or(line.len())..].trim());
                slot = Some(match path {
                    Some("[heap]") => &mut m.heap,
                    Some(p) if p == exe => &mut m.binary,
                    // Wasmtime's memory images: shared memory, not a library.
                    Some(p) if p.starts_with("/memfd:") => &mut m.anon,
                    Some(p) if p.starts_with('/') => &mut m.libraries,
                    _ => &mut m.anon,
                });
            } else if first == "Rss:" {
                let kib: f64 = fields.next()?.parse().ok()?;
                if let Some(s) = slot.as_deref_mut() {
                    *s += kib / 1024.0;
                }
            }
        }
        Some(m)
    }

    fn text(&self) -> String {
        format!(
            "heap {:.1} MiB, other anonymous {:.1} MiB, binary {:.1} MiB, libraries {:.1} MiB",
            self.heap, self.anon, self.binary, self.libraries
        )
    }
}

/// The agent under measurement, its layout and its log file.
struct Node {
    child: Child,
    config: PathBuf,
    pods: PathBuf,
    staging: PathBuf,
    log: PathBuf,
    image: PathBuf,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start() -> Result<Node, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
        let (state, pods, staging) =
            (dir.path().join("state"), dir.path().join("pods"), dir.path().join("staging"));
        for d in [&pods, &staging] {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        let config = dir.path().join("lichen.toml");
        let text = format!(
            "node_name = \"memnode\"\nstate_dir = {:?}\nstatic_pod_dir = {:?}\nmax_pods = {}\n\
             shutdown_timeout_secs = 5\n\n[metrics]\naddress = \"\"\n\n[kubelet_api]\nport = 0\n",
            state.display().to_string(),
            pods.display().to_string(),
            2 * PODS
        );
        std::fs::write(&config, text).map_err(|e| format!("{}: {e}", config.display()))?;
        let log = dir.path().join("agent.log");
        let log_file = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let bin = lichen_tests::lichen_bin();
        let child = Command::new(&bin)
            .args(["run", "--config"])
            .arg(&config)
            .env_remove("LICHEN_CONFIG")
            .env_remove("RUST_LOG")
            // As under systemd: with it, every error the agent makes captures a backtrace.
            .env_remove("RUST_BACKTRACE")
            .env_remove("LICHEN_METRICS_ADDRESS")
            .env_remove("LICHEN_KUBELET_PORT")
            // As a board runs it: glibc's allocator settings come from the unit.
            .envs(lichen_tests::service_environment())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let image = lichen_tests::fixture("idle.wat");
        Ok(Node { child, config, pods, staging, log, image, _dir: dir })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `done` every 50 ms until it holds; an error names `what` and ends with the agent's log.
    fn wait(&mut self, what: &str, mut done: impl FnMut(&Node) -> bool) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if done(self) {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "lichen exited ({status}) waiting for {what}; it logged:\n{}",
                    self.log_text()
                ));
            }
            if start.elapsed() > TIMEOUT {
                return Err(format!(
                    "timed out after {TIMEOUT:?} waiting for {what}; the agent logged:\n{}",
                    self.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The phases `lichen pods --json` shows, or `None` if it did not answer.
    fn phases(&self) -> Option<Vec<String>> {
        let out = Command::new(lichen_tests::lichen_bin())
            .args(["pods", "--json", "--config"])
            .arg(&self.config)
            .env_remove("LICHEN_CONFIG")
            .output()
            .ok()?;
        let pods: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        pods.as_array()?.iter().map(|p| p["phase"].as_str().map(str::to_owned)).collect()
    }

    /// Writes [`PODS`] manifests (each renamed into place) and waits until all run.
    fn create(&mut self) -> Result<(), String> {
        for i in 0..PODS {
            let yaml = format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: mem-{i}\nspec:\n  containers:\n  - name: main\n    image: file://{}\n",
                self.image.display()
            );
            let tmp = self.staging.join(format!("mem-{i}.yaml"));
            std::fs::write(&tmp, yaml).map_err(|e| format!("{}: {e}", tmp.display()))?;
            std::fs::rename(&tmp, self.pods.join(format!("mem-{i}.yaml")))
                .map_err(|e| format!("rename into {}: {e}", self.pods.display()))?;
        }
        self.wait(&format!("`lichen pods` to show {PODS} pods Running"), |n| {
            n.phases().is_some_and(|p| p.len() == PODS && p.iter().all(|s| s == "Running"))
        })
    }

    /// Removes every manifest and waits until `lichen pods` lists none.
    fn delete(&mut self) -> Result<(), String> {
        for i in 0..PODS {
            let file = self.pods.join(format!("mem-{i}.yaml"));
            std::fs::remove_file(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        }
        self.wait("`lichen pods` to list no pod", |n| n.phases().is_some_and(|p| p.is_empty()))
    }

    /// RSS [`AFTER_RELEASE`] after the agent's next release of idle code pages, its `seen`th
    /// having been logged before (heap.rs: 10 s after start-up or a burst of pod work ends, at most
    /// once a minute): what the node holds once the work is over and it has read back what it
    /// runs.
    fn after_code_release(&mut self, seen: usize) -> Result<Rss, String> {
        self.wait("the agent to release idle code pages", |n| {
            n.log_text().matches("releasing idle code pages").count() > seen
        })?;
        std::thread::sleep(AFTER_RELEASE.saturating_sub(SETTLE));
        self.settled()
    }

    /// Prints where the resident memory is now ([`Mappings`]), if smaps can be read.
    fn where_it_is(&self, report: &mut Report, when: &str) {
        if let Some(m) = Mappings::read(self.pid()) {
            report.info(SECTION, format!("{when}, by mapping"), m.text());
        }
    }

    /// RSS [`SETTLE`] from now.
    fn settled(&mut self) -> Result<Rss, String> {
        std::thread::sleep(SETTLE);
        Rss::read(self.pid()).ok_or_else(|| format!("cannot read /proc/{}/status", self.pid()))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The cycle count: `LICHEN_BENCH_CYCLES`, or [`CYCLES`].
fn cycles() -> usize {
    std::env::var("LICHEN_BENCH_CYCLES").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(CYCLES)
}

pub async fn run(report: &mut Report) {
    if let Err(why) = measure(report) {
        report.failed(SECTION, why);
    }
}

fn measure(report: &mut Report) -> Result<(), String> {
    let bin = lichen_tests::lichen_bin();
    println!("{SECTION}: agent {}", bin.display());
    let env: Vec<String> =
        lichen_tests::service_environment().iter().map(|(k, v)| format!("{k}={v}")).collect();
    report.info(
        SECTION,
        "environment (systemd/lichen.service's; LICHEN_BENCH_UNIT_ENV=0 for none)",
        format!("{env:?}"),
    );
    let mut node = Node::start()?;
    node.wait("`lichen running` in the agent's log", |n| n.log_text().contains("lichen running"))?;
    report.info(SECTION, "RSS right after start-up", node.settled()?.both());
    let idle = node.after_code_release(0)?;
    report.aim(
        SECTION,
        "idle RSS, no pods",
        idle.text(),
        &format!("≤ {IDLE_AIM} MiB"),
        idle.total <= IDLE_AIM,
    );
    report.info(SECTION, "idle, split", idle.split());
    node.where_it_is(report, "idle");

    node.create()?;
    report.info(SECTION, format!("RSS {SETTLE:?} after all {PODS} pods run"), node.settled()?.both());
    let full = node.after_code_release(1)?;
    report.aim(
        SECTION,
        format!("RSS with {PODS} idle pods"),
        full.text(),
        &format!("≤ {PODS_AIM} MiB"),
        full.total <= PODS_AIM,
    );
    report.info(SECTION, format!("{PODS} idle pods, split"), full.split());
    node.where_it_is(report, &format!("{PODS} idle pods"));

    node.delete()?;
    report.info(SECTION, format!("RSS {SETTLE:?} after the last pod is gone"), node.settled()?.both());
    let after = node.after_code_release(2)?;
    let limit = idle.total + AFTER_AIM_OVER_IDLE;
    report.aim(
        SECTION,
        format!("RSS after deleting the {PODS} pods"),
        after.text(),
        &format!("≤ idle + {AFTER_AIM_OVER_IDLE} MiB ({limit:.1} MiB)"),
        after.total <= limit,
    );
    report.info(SECTION, "after deleting, split", after.split());
    node.where_it_is(report, "after deleting");

    let n = cycles();
    if n == 0 {
        return Ok(());
    }
    let mut curve = Vec::with_capacity(n);
    let started = Instant::now();
    for cycle in 1..=n {
        node.create()?;
        node.delete()?;
        let rss = node.settled()?;
        println!(
            "{SECTION}: cycle {cycle}/{n} ({:.0} s): RSS {} ({})",
            started.elapsed().as_secs_f64(),
            rss.text(),
            rss.split()
        );
        curve.push(rss);
    }
    let ended = Instant::now() - SETTLE;
    let releases = node.log_text().matches("releasing idle code pages").count();
    let (first, last) = (curve[0], curve[n - 1]);
    let peak = curve.iter().map(|r| r.total).fold(0.0, f64::max);
    report.info(SECTION, "RSS after the first cycle's deletion", first.text());
    report.info(SECTION, format!("RSS after the last ({n}th) cycle's deletion"), last.text());
    report.info(SECTION, format!("highest RSS after a deletion over {n} cycles"), format!("{peak:.1} MiB"));
    report.info(
        SECTION,
        format!("growth of the readings {SETTLE:?} after each deletion, first to last of {n} cycles"),
        format!(
            "{:+.1} MiB (what the work had not given back yet: see the aim below)",
            last.total - first.total
        ),
    );

    // What the cycles left once the work is over, read as the first deletion was: the reading 2 s
    // after a deletion still holds what the agent gives back later by design (its blocking
    // threads' stacks for the 10 s they idle, the burst's code pages and freed heap until the
    // release 10 s after the burst).
    node.wait("the agent to release idle code pages after the cycles", |n| {
        n.log_text().matches("releasing idle code pages").count() > releases
    })?;
    let released = Instant::now();
    std::thread::sleep((ended + LATER).saturating_duration_since(Instant::now()));
    let later = Rss::read(node.pid()).ok_or("cannot read the agent's status after the cycles")?;
    report.aim(
        SECTION,
        format!("RSS {} s after the last cycle", LATER.as_secs()),
        later.text(),
        &format!("≤ idle + {AFTER_AIM_OVER_IDLE} MiB ({limit:.1} MiB)"),
        later.total <= limit,
    );
    report.info(SECTION, format!("{} s after the last cycle, split", LATER.as_secs()), later.split());
    node.where_it_is(report, &format!("{} s after the last cycle", LATER.as_secs()));
    std::thread::sleep((released + AFTER_RELEASE).saturating_duration_since(Instant::now()));
    let held = Rss::read(node.pid()).ok_or("cannot read the agent's status after the cycles")?;
    let growth = held.total - after.total;
    report.aim(
        SECTION,
        format!(
            "growth over {n} cycles: RSS {}s after the release that followed them, against the same reading after the first deletion ({})",
            AFTER_RELEASE.as_secs(),
            after.text()
        ),
        format!("{growth:+.1} MiB ({})", held.text()),
        &format!("no growth (≤ +{GROWTH_TOLERANCE} MiB)"),
        growth <= GROWTH_TOLERANCE,
    );
    report.info(SECTION, format!("after {n} cycles, settled, split"), held.split());
    Ok(())
}
