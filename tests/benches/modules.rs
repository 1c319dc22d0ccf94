//! Module start benchmark: a cold start (pull, compile, instantiate) against a warm start (the
//! cached precompiled artifact) of the same module, through the agent's own [`ModuleCache`] and
//! [`WasmRuntime`], with a real `docker-registry` on loopback and sled on a real disk.
//!
//! Run with `cargo bench -p lichen-tests --bench modules` (it needs `docker-registry`, like the
//! registry tests). For each module it measures:
//!
//! 1. cold start, [`COLD_RUNS`] times: a fresh store directory, a fresh runtime and a fresh cache;
//!    the time to resolve the image (pull from the registry, validate, store), load it (compile
//!    with Cranelift, serialize and store the artifact) and run it to completion (instantiate,
//!    `_start` writes one line to stdout and returns);
//! 2. warm start, [`WARM_RUNS`] times: the same store directory reopened (the previous store,
//!    cache and runtime dropped first) with a fresh runtime and cache, so nothing is compiled in
//!    memory; the time to resolve (`IfNotPresent`: found in the cache, no network), load
//!    (deserialize the cached artifact) and run. Reopening the store and creating the runtime are
//!    not part of a start (the agent does both once, at boot) and are reported separately.
//!
//! The main module is generated here to the size of a real application ([`FUNCTIONS`] functions of
//! loops, branch tables, 64-bit and float arithmetic and calls, all in a function table, plus a
//! data segment); `tests/fixtures/hello.wat` is measured too for contrast. The aim is a warm start
//! at least 50 times faster than a cold one. It prints figures and a Markdown table, and exits
//! non-zero only if something fails (a pull, a load, a run, the output).

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lichen::config::ModulesConfig;
use lichen::modules::{
    ImageOrigin, ModuleCache, ModuleSource, PullCredentials, PullPolicy, Resolution, parse_image,
};
use lichen::runtime::logs::{ContainerLog, Stream, read_run};
use lichen::runtime::{Outcome, PreparedModule, RunSpec, WasmRuntime};
use lichen::store::{SledStore, StateStore};
use lichen_tests::registry::{Registry, WASM_CONFIG_V0, WASM_LAYER};
use tokio_util::sync::CancellationToken;

/// Functions in the generated module.
const FUNCTIONS: usize = 3000;
/// Cold starts per module.
const COLD_RUNS: usize = 7;
/// Warm starts per module.
const WARM_RUNS: usize = 30;
/// The line the generated module prints.
const READY_LINE: &str = "lichen bench module ready";
/// The aim: a warm start at least this many times faster than a cold one (medians).
const AIM_RATIO: f64 = 50.0;

fn fail(message: &str) -> ! {
    eprintln!("modules bench FAILED: {message}");
    std::process::exit(1);
}

/// A small deterministic generator for the constants of the generated code.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

/// One stage of a generated function: a byte-scanning loop mixing into 32- and 64-bit
/// accumulators, then a four-way branch table, one arm of which does float arithmetic.
fn stage(w: &mut String, rng: &mut Lcg) {
    let (c2, c3, rot, shift) =
        (rng.next() | 1, rng.next() as u32 | 1, rng.next() % 31 + 1, rng.next() % 40 + 8);
    let (f, g) = (rng.next() % 1000, rng.next() % 97 + 3);
    let _ = write!(
        w,
        r#"
    (local.set $i (i32.const 0))
    (block $done
      (loop $scan
        (br_if $done (i32.ge_u (local.get $i) (i32.and (local.get $b) (i32.const 15))))
        (local.set $acc
          (i32.add (i32.rotl (local.get $acc) (i32.const {rot}))
                   (i32.load8_u offset=65536
                     (i32.and (i32.add (local.get $a) (local.get $i)) (i32.const 0xbfff)))))
        (local.set $x (i64.mul (i64.xor (local.get $x) (i64.extend_i32_u (local.get $acc)))
                               (i64.const {c2})))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $scan)))
    (block $join
      (block $c2
        (block $c1
          (block $c0
            (br_table $c0 $c1 $c2 $join (i32.and (local.get $acc) (i32.const 3))))
          (local.set $acc (i32.mul (local.get $acc) (i32.const {c3})))
          (br $join))
        (local.set $acc (i32.sub (local.get $acc)
                                 (i32.wrap_i64 (i64.shr_u (local.get $x) (i64.const {shift})))))
        (br $join))
      (local.set $y (f64.sqrt (f64.add (f64.convert_i32_u (local.get $acc)) (f64.const {f}.5))))
      (local.set $acc (i32.xor (local.get $acc)
                               (i32.trunc_sat_f64_u (f64.mul (local.get $y) (f64.const {g}.25))))))
    (i32.store offset=1024 (i32.and (local.get $acc) (i32.const 0x1ffc)) (local.get $acc))"#
    );
}

/// A WASI command module of `functions` functions (one to three stages each, and a call to another
/// function with a halved depth argument), all in a function table so none is dead code, and a
/// 48 KiB data segment they read. `_start` calls 64 of them through the table, then prints
/// [`READY_LINE`] and returns.
fn generated_module(functions: usize) -> Vec<u8> {
    let mut rng = Lcg(0x5eed);
    let mut w = String::with_capacity(functions * 3000);
    w.push_str(
        r#"(module
  (type $work (func (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  ;; 0..8 iovec, 8..12 bytes written, 16..20 checksum, 64.. the line, 1024..9220 scratch,
  ;; 65536..114688 read-only data.
  (memory (export "memory") 2)
"#,
    );
    let _ = writeln!(w, "  (table {functions} funcref)");
    w.push_str("  (elem (i32.const 0) func");
    for i in 0..functions {
        let _ = write!(w, " $f{i}");
    }
    w.push_str(")\n  (data (i32.const 65536) \"");
    for _ in 0..48 * 1024 {
        let _ = write!(w, "\\{:02x}", rng.next() as u8);
    }
    w.push_str("\")\n");
    let _ = writeln!(w, "  (data (i32.const 64) \"{READY_LINE}\\n\")");
    for i in 0..functions {
        let c1 = rng.next() as u32;
        let _ = write!(
            w,
            r#"  (func $f{i} (type $work) (param $a i32) (param $b i32) (result i32)
    (local $i i32) (local $acc i32) (local $x i64) (local $y f64)
    (local.set $acc (i32.xor (local.get $a) (i32.const {c1})))
    (local.set $x (i64.extend_i32_u (local.get $b)))"#
        );
        for _ in 0..1 + i % 3 {
            stage(&mut w, &mut rng);
        }
        let callee = rng.next() as usize % functions;
        let _ = writeln!(
            w,
            r#"
    (if (result i32) (i32.gt_u (local.get $b) (i32.const 1))
      (then (i32.add (local.get $acc)
                     (call $f{callee} (local.get $acc) (i32.shr_u (local.get $b) (i32.const 1)))))
      (else (i32.xor (local.get $acc) (i32.wrap_i64 (local.get $x))))))"#
        );
    }
    let _ = write!(
        w,
        r#"  (func (export "_start")
    (local $k i32) (local $sum i32)
    (block $done
      (loop $each
        (br_if $done (i32.ge_u (local.get $k) (i32.const 64)))
        (local.set $sum (i32.add (local.get $sum)
          (call_indirect (type $work) (local.get $k) (i32.const 8)
            (i32.rem_u (i32.mul (local.get $k) (i32.const 47)) (i32.const {functions})))))
        (local.set $k (i32.add (local.get $k) (i32.const 1)))
        (br $each)))
    (i32.store (i32.const 16) (local.get $sum))
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const {len}))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"#,
        len = READY_LINE.len() + 1
    );
    wat::parse_str(&w).unwrap_or_else(|e| fail(&format!("the generated module does not assemble: {e}")))
}

/// One start, by phase.
#[derive(Clone, Copy)]
struct Start {
    /// `ModuleCache::resolve`: a pull when cold, a cache lookup when warm.
    resolve: Duration,
    /// `ModuleCache::load`: compile and store the artifact when cold, deserialize it when warm.
    load: Duration,
    /// `WasmRuntime::run`: instantiate, `_start` to its return.
    run: Duration,
    /// Not part of the start: opening the store.
    store_open: Duration,
    /// Not part of the start: creating the engine, its linker and the cache.
    setup: Duration,
}

impl Start {
    fn total(&self) -> Duration {
        self.resolve + self.load + self.run
    }
}

/// What one module's runs gave.
struct Figures {
    name: String,
    /// Whether the aim applies (a realistic module, not a contrast).
    judged: bool,
    module_size: usize,
    artifact_size: u64,
    cold: Vec<Start>,
    warm: Vec<Start>,
}

/// The `q` quantile (nearest rank) of `v`.
fn quantile(v: &[Duration], q: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn median(starts: &[Start], f: impl Fn(&Start) -> Duration) -> Duration {
    quantile(&starts.iter().map(f).collect::<Vec<_>>(), 0.5)
}

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms >= 100.0 { format!("{ms:.0} ms") } else { format!("{ms:.2} ms") }
}

fn size(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.2} MiB", bytes as f64 / f64::from(1 << 20))
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

/// Everything one start needs, made before the clock starts.
struct Node {
    cache: Arc<ModuleCache>,
    runtime: Arc<WasmRuntime>,
    store_open: Duration,
    setup: Duration,
}

impl Node {
    /// Opens (or creates) the store in `state` and a fresh runtime and cache over it.
    async fn open(state: &Path, config: &ModulesConfig) -> Node {
        let started = Instant::now();
        let path = state.to_owned();
        let store = tokio::task::spawn_blocking(move || SledStore::open(&path))
            .await
            .unwrap_or_else(|e| fail(&format!("store open task: {e}")))
            .unwrap_or_else(|e| fail(&format!("cannot open the store: {e}")));
        let store_open = started.elapsed();
        let started = Instant::now();
        let store: Arc<dyn StateStore> = Arc::new(store);
        let runtime = WasmRuntime::new().unwrap_or_else(|e| fail(&format!("runtime: {e}")));
        let tasks = tokio_util::task::TaskTracker::new();
        let cache = ModuleCache::new(
            store,
            runtime.clone(),
            config,
            &tasks,
            &tokio_util::sync::CancellationToken::new(),
        )
        .unwrap_or_else(|e| fail(&format!("module cache: {e}")));
        Node { cache, runtime, store_open, setup: started.elapsed() }
    }

    /// Resolves, loads and runs `source` once; checks the resolution's kind and the output line.
    async fn start(&self, source: &ModuleSource, logs: &Path, run: u32, cold: bool, line: &str) -> Start {
        let log = ContainerLog::open(logs, run, 1 << 20, 2, None)
            .unwrap_or_else(|e| fail(&format!("container log: {e}")));
        let spec = RunSpec {
            args: vec!["m".into()],
            env: vec![],
            preopens: vec![],
            fuel: None,
            memory_limit: 16 << 20,
            timeout: Some(Duration::from_secs(60)),
            stdout: log.sink(Stream::Stdout),
            stderr: log.sink(Stream::Stderr),
            stdin: None,
            mqtt: None,
            meter: None,
        };
        let cancel = CancellationToken::new();

        let t0 = Instant::now();
        let resolution = self
            .cache
            .resolve(source, PullPolicy::IfNotPresent, &PullCredentials::default())
            .await
            .unwrap_or_else(|e| fail(&format!("resolve {}: {e}", source.describe())));
        let t1 = Instant::now();
        let module: PreparedModule = self
            .cache
            .load(resolution.digest())
            .await
            .unwrap_or_else(|e| fail(&format!("load {}: {e:?}", source.describe())));
        let t2 = Instant::now();
        let report = self.runtime.run(&module, spec, &cancel).await;
        let t3 = Instant::now();

        match (&resolution, cold) {
            (Resolution::Pulled { .. }, true) | (Resolution::Present(_), false) => {}
            (r, _) => fail(&format!("a {} start resolved as {r:?}", if cold { "cold" } else { "warm" })),
        }
        if report.outcome != Outcome::Exited(0) {
            fail(&format!("{} ended with {:?}", source.describe(), report.outcome));
        }
        let records = read_run(logs, run).unwrap_or_else(|e| fail(&format!("read the container log: {e}")));
        let first = records.iter().find(|r| r.stream == Stream::Stdout).map(|r| r.text.as_str());
        if first != Some(line) {
            fail(&format!("expected {line:?} on stdout, the module wrote {records:?}"));
        }
        Start {
            resolve: t1 - t0,
            load: t2 - t1,
            run: t3 - t2,
            store_open: self.store_open,
            setup: self.setup,
        }
    }
}

/// Pushes `wasm` to `reg` as `bench/<repo>:1` and measures its cold and warm starts.
async fn measure(reg: &Registry, name: &str, repo: &str, wasm: &[u8], line: &str, judged: bool) -> Figures {
    reg.push_artifact(&format!("bench/{repo}"), "1", WASM_CONFIG_V0, b"{}", &[(WASM_LAYER, wasm)]);
    let config = ModulesConfig { insecure_registries: vec![reg.host()], ..ModulesConfig::default() };
    let image = format!("{}/bench/{repo}:1", reg.host());
    let source = parse_image(&image, ImageOrigin::Cluster, &config)
        .unwrap_or_else(|e| fail(&format!("image {image}: {e}")));
    let scratch = tempfile::tempdir().unwrap_or_else(|e| fail(&format!("tempdir: {e}")));
    let logs = scratch.path().join("logs");

    let mut cold = Vec::new();
    for i in 0..COLD_RUNS {
        let state = scratch.path().join(format!("cold-{i}"));
        let node = Node::open(&state, &config).await;
        let s = node.start(&source, &logs, i as u32, true, line).await;
        println!(
            "  {name} cold {}: {} (pull {}, compile {}, run {})",
            i + 1,
            ms(s.total()),
            ms(s.resolve),
            ms(s.load),
            ms(s.run)
        );
        cold.push(s);
        drop(node);
        // Each cold start had a store of its own; only the last is kept, for the warm starts.
        if i + 1 < COLD_RUNS {
            let _ = std::fs::remove_dir_all(&state);
        }
    }

    // The last cold start's store holds the module and its artifact for this engine.
    let state = scratch.path().join(format!("cold-{}", COLD_RUNS - 1));
    let node = Node::open(&state, &config).await;
    let modules = node.cache.list().await.unwrap_or_else(|e| fail(&format!("list modules: {e}")));
    let artifact_size =
        modules.iter().find_map(|m| m.artifacts.get(node.runtime.engine_key()).copied()).unwrap_or_else(
            || fail(&format!("no artifact for {} in the cache: {modules:?}", node.runtime.engine_key())),
        );
    drop(node);

    let mut warm = Vec::new();
    for i in 0..WARM_RUNS {
        let node = Node::open(&state, &config).await;
        warm.push(node.start(&source, &logs, (COLD_RUNS + i) as u32, false, line).await);
        // sled holds a lock on the directory: the store must be closed before the next open.
        drop(node);
    }
    let m = median(&warm, Start::total);
    println!("  {name} warm x{WARM_RUNS}: median {}", ms(m));
    Figures { name: name.into(), judged, module_size: wasm.len(), artifact_size, cold, warm }
}

fn report(f: &Figures) {
    let cold = f.cold.iter().map(Start::total).collect::<Vec<_>>();
    let warm = f.warm.iter().map(Start::total).collect::<Vec<_>>();
    let ratio = quantile(&cold, 0.5).as_secs_f64() / quantile(&warm, 0.5).as_secs_f64();
    println!();
    println!("{}: module {}, artifact {}", f.name, size(f.module_size as u64), size(f.artifact_size));
    println!(
        "  cold start x{}: p50 {}, p99 {} (p50 by phase: pull {}, compile + store artifact {}, run {})",
        cold.len(),
        ms(quantile(&cold, 0.5)),
        ms(quantile(&cold, 0.99)),
        ms(median(&f.cold, |s| s.resolve)),
        ms(median(&f.cold, |s| s.load)),
        ms(median(&f.cold, |s| s.run)),
    );
    println!(
        "  warm start x{}: p50 {}, p99 {} (p50 by phase: resolve {}, load artifact {}, run {})",
        warm.len(),
        ms(quantile(&warm, 0.5)),
        ms(quantile(&warm, 0.99)),
        ms(median(&f.warm, |s| s.resolve)),
        ms(median(&f.warm, |s| s.load)),
        ms(median(&f.warm, |s| s.run)),
    );
    println!(
        "  not in a start: store reopen p50 {}, p99 {}; engine + cache creation p50 {}",
        ms(median(&f.warm, |s| s.store_open)),
        ms(quantile(&f.warm.iter().map(|s| s.store_open).collect::<Vec<_>>(), 0.99)),
        ms(median(&f.warm, |s| s.setup)),
    );
    let verdict = match (f.judged, ratio >= AIM_RATIO) {
        (false, _) => "not judged: a contrast, whose cold start is mostly the pull's round trips",
        (true, true) => "met",
        (true, false) => "NOT met",
    };
    println!("  cold/warm (medians): {ratio:.0}x; aim >= {AIM_RATIO:.0}x: {verdict}");
}

fn row(label: &str, all: &[Figures], f: impl Fn(&Figures) -> String) {
    let cells = all.iter().map(f).collect::<Vec<_>>().join(" | ");
    println!("| {label} | {cells} |");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let reg = Registry::start();
    let large = generated_module(FUNCTIONS);
    let hello_wat = std::fs::read_to_string(lichen_tests::fixture("hello.wat"))
        .unwrap_or_else(|e| fail(&format!("hello.wat: {e}")));
    let hello = wat::parse_str(&hello_wat).unwrap_or_else(|e| fail(&format!("hello.wat: {e}")));
    println!("registry {}; {COLD_RUNS} cold and {WARM_RUNS} warm starts per module", reg.host());

    let all = vec![
        measure(&reg, &format!("generated ({FUNCTIONS} functions)"), "large", &large, READY_LINE, true).await,
        measure(&reg, "hello.wat", "hello", &hello, "hello", false).await,
    ];
    for f in &all {
        report(f);
    }

    let totals = |s: &[Start]| s.iter().map(Start::total).collect::<Vec<_>>();
    println!();
    let header = all.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(" | ");
    println!("| figure | {header} |");
    println!("|---|{}", "---|".repeat(all.len()));
    row("module size", &all, |f| size(f.module_size as u64));
    row("precompiled artifact size", &all, |f| size(f.artifact_size));
    row("cold start p50 (pull + compile + run)", &all, |f| ms(quantile(&totals(&f.cold), 0.5)));
    row("cold start p99", &all, |f| ms(quantile(&totals(&f.cold), 0.99)));
    row("– pull p50", &all, |f| ms(median(&f.cold, |s| s.resolve)));
    row("– compile + store artifact p50", &all, |f| ms(median(&f.cold, |s| s.load)));
    row("– instantiate + run p50", &all, |f| ms(median(&f.cold, |s| s.run)));
    row("warm start p50 (resolve + load artifact + run)", &all, |f| ms(quantile(&totals(&f.warm), 0.5)));
    row("warm start p99", &all, |f| ms(quantile(&totals(&f.warm), 0.99)));
    row("– resolve p50", &all, |f| ms(median(&f.warm, |s| s.resolve)));
    row("– load artifact p50", &all, |f| ms(median(&f.warm, |s| s.load)));
    row("– instantiate + run p50", &all, |f| ms(median(&f.warm, |s| s.run)));
    row("store reopen p50 (not in a start)", &all, |f| ms(median(&f.warm, |s| s.store_open)));
    row("cold/warm, medians (aim ≥ 50× for a real-sized module)", &all, |f| {
        let r = quantile(&totals(&f.cold), 0.5).as_secs_f64() / quantile(&totals(&f.warm), 0.5).as_secs_f64();
        format!("{r:.0}×")
    });
}
