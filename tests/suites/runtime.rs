//! The Wasm runtime against real modules: every way a run can end is distinct, limits hold, and a
//! module cannot see outside its preopened directories.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use lichen::metrics::ContainerMeter;
use lichen::runtime::logs::{ContainerLog, LogRecord, Stream, read_run};
use lichen::runtime::{Outcome, Preopen, RunReport, RunSpec, WasmRuntime};
use lichen::store::ModuleDigest;
use lichen_tests::{fixture, stdout_lines};
use tokio_util::sync::CancellationToken;

struct Run {
    args: Vec<String>,
    fuel: Option<u64>,
    memory: u64,
    timeout: Option<Duration>,
    preopens: Vec<Preopen>,
    meter: Option<Arc<ContainerMeter>>,
}

impl Default for Run {
    fn default() -> Self {
        Run {
            args: vec!["m".into()],
            fuel: None,
            memory: 16 << 20,
            timeout: None,
            preopens: vec![],
            meter: None,
        }
    }
}

async fn run_bytes(rt: &WasmRuntime, bytes: Vec<u8>, run: Run) -> (RunReport, Vec<LogRecord>) {
    let logs = tempfile::tempdir().expect("tempdir");
    let log = ContainerLog::open(logs.path(), 0, 1 << 20, 2, None).expect("log");
    let digest = ModuleDigest::of(&bytes);
    let report = match rt.prepare(digest, Arc::from(bytes)).await {
        Err(outcome) => RunReport { outcome, fuel_consumed: 0, peak_memory: 0, elapsed: Duration::ZERO },
        Ok((module, _artifact)) => {
            let spec = RunSpec {
                args: run.args,
                env: vec![("GREETING_X".into(), "hi".into())],
                preopens: run.preopens,
                fuel: run.fuel,
                memory_limit: run.memory,
                timeout: run.timeout,
                stdout: log.sink(Stream::Stdout),
                stderr: log.sink(Stream::Stderr),
                stdin: None,
                mqtt: None,
                meter: run.meter,
            };
            rt.run(&module, spec, &CancellationToken::new()).await
        }
    };
    (report, read_run(logs.path(), 0).expect("read log"))
}

async fn run_fixture(rt: &WasmRuntime, name: &str, run: Run) -> (RunReport, Vec<LogRecord>) {
    run_bytes(rt, std::fs::read(fixture(name)).expect("fixture"), run).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_output_and_args_reach_the_user() {
    let rt = WasmRuntime::new().expect("runtime");
    let (r, out) =
        run_fixture(&rt, "hello.wat", Run { args: vec!["m".into(), "edge".into()], ..Run::default() }).await;
    assert_eq!(r.outcome, Outcome::Exited(0));
    assert_eq!(stdout_lines(&out), vec!["hello edge", "GREETING_X=hi"]);
    assert!(out.iter().any(|r| r.stream == Stream::Stderr && r.text == "bye"), "{out:?}");
    assert_eq!((r.outcome.reason(), r.outcome.exit_code()), ("Completed", 0));

    let (r, out) = run_fixture(&rt, "exit.wat", Run::default()).await;
    assert_eq!(r.outcome, Outcome::Exited(3));
    assert_eq!((r.outcome.reason(), r.outcome.exit_code()), ("Error", 3));
    assert_eq!(stdout_lines(&out), vec!["exiting with 3"]);

    let (r, out) = run_fixture(&rt, "trap.wat", Run::default()).await;
    let Outcome::Trap(msg) = &r.outcome else { panic!("expected a trap, got {:?}", r.outcome) };
    assert!(msg.contains("unreachable"), "trap message names the cause: {msg}");
    assert_eq!(stdout_lines(&out), vec!["about to trap"], "output before the trap is kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_infinite_loop_is_stopped_by_fuel() {
    let rt = WasmRuntime::new().expect("runtime");
    let (r, _) = run_fixture(&rt, "loop.wat", Run { fuel: Some(5_000_000), ..Run::default() }).await;
    assert_eq!(r.outcome, Outcome::OutOfFuel { fuel: 5_000_000 });
    assert_eq!(r.outcome.reason(), "OutOfFuel");
    assert_eq!(r.fuel_consumed, 5_000_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runs_cpu_time_is_the_time_its_code_ran_and_waiting_costs_none() {
    let rt = WasmRuntime::new().expect("runtime");
    let limit = Duration::from_millis(800);
    let busy = Arc::new(ContainerMeter::new("uid", jiff::Timestamp::now()));
    let (r, _) = run_fixture(
        &rt,
        "loop.wat",
        Run { timeout: Some(limit), meter: Some(busy.clone()), ..Run::default() },
    )
    .await;
    assert_eq!(r.outcome, Outcome::DeadlineExceeded { timeout: limit });
    let cpu = Duration::from_nanos(busy.cpu_nanos());
    // Spinning for 0.8 s: most of it on a CPU (the machine may be shared), never more than it ran.
    assert!(cpu >= Duration::from_millis(200) && cpu <= r.elapsed, "{cpu:?} of {:?}", r.elapsed);
    assert_eq!(busy.linear_memory(), 65536, "one page");

    let idle = Arc::new(ContainerMeter::new("uid", jiff::Timestamp::now()));
    let (r, out) = run_fixture(
        &rt,
        "idle.wat",
        Run { timeout: Some(limit), meter: Some(idle.clone()), ..Run::default() },
    )
    .await;
    assert_eq!(r.outcome, Outcome::DeadlineExceeded { timeout: limit });
    assert_eq!(stdout_lines(&out), vec!["started"]);
    let cpu = Duration::from_nanos(idle.cpu_nanos());
    // What it ran is instantiation, one print and the poll: a few ms natively, tens of ms on an
    // emulated board (45 ms was seen under QEMU). A module that spun would show most of the 0.8 s.
    assert!(cpu > Duration::ZERO && cpu < limit / 5, "asleep for 0.8 s: {cpu:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_busy_module_does_not_starve_the_reactor() {
    // One worker thread: if wasm did not yield, the timer below could not fire until fuel ran out.
    let rt = WasmRuntime::new().expect("runtime");
    let bytes = std::fs::read(fixture("loop.wat")).expect("fixture");
    let (module, _) = rt.prepare(ModuleDigest::of(&bytes), Arc::from(bytes)).await.expect("valid");
    let logs = tempfile::tempdir().expect("tempdir");
    let log = ContainerLog::open(logs.path(), 0, 1 << 20, 2, None).expect("log");
    let cancel = CancellationToken::new();
    let spec = RunSpec {
        args: vec![],
        env: vec![],
        preopens: vec![],
        fuel: None,
        memory_limit: 1 << 20,
        timeout: None,
        stdout: log.sink(Stream::Stdout),
        stderr: log.sink(Stream::Stderr),
        stdin: None,
        mqtt: None,
        meter: None,
    };
    let stopper = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        stopper.cancel();
    });
    let r =
        tokio::time::timeout(Duration::from_secs(30), rt.run(&module, spec, &cancel)).await.expect("stopped");
    assert_eq!(r.outcome, Outcome::Killed);
    assert!(r.fuel_consumed > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_bomb_is_stopped_by_the_memory_limit() {
    let rt = WasmRuntime::new().expect("runtime");
    let (r, _) = run_fixture(&rt, "membomb.wat", Run { memory: 4 << 20, ..Run::default() }).await;
    // exit 42 would mean growth was merely refused and the module limped on.
    assert_eq!(r.outcome, Outcome::MemoryLimitExceeded { limit: 4 << 20, requested: (4 << 20) + 65536 });
    assert_eq!((r.outcome.reason(), r.outcome.exit_code()), ("OOMKilled", 137));
    assert_eq!(r.peak_memory, 4 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initial_memory_over_the_limit_fails_at_instantiation() {
    let rt = WasmRuntime::new().expect("runtime");
    let wat = r#"(module (memory (export "memory") 100) (func (export "_start")))"#;
    let (r, _) = run_bytes(&rt, wat.as_bytes().to_vec(), Run { memory: 1 << 20, ..Run::default() }).await;
    assert!(
        matches!(r.outcome, Outcome::MemoryLimitExceeded { requested, .. } if requested == 100 * 65536),
        "{:?}",
        r.outcome
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wall_clock_limit_stops_compute_and_sleep_alike() {
    let rt = WasmRuntime::new().expect("runtime");
    let t = Duration::from_millis(300);
    let (r, _) = run_fixture(&rt, "loop.wat", Run { timeout: Some(t), ..Run::default() }).await;
    assert_eq!(r.outcome, Outcome::DeadlineExceeded { timeout: t });
    let (r, out) = run_fixture(&rt, "sleeper.wat", Run { timeout: Some(t), ..Run::default() }).await;
    assert_eq!(r.outcome, Outcome::DeadlineExceeded { timeout: t });
    assert_eq!(stdout_lines(&out).first(), Some(&"started"));
    assert!(r.elapsed < Duration::from_secs(5), "stopped promptly: {:?}", r.elapsed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_modules_are_reported_not_run() {
    let rt = WasmRuntime::new().expect("runtime");
    let garbage = b"\0asm\x01\0\0\0\x01\xff\xff\xff\xff garbage".to_vec();
    for (bytes, needle) in [
        (garbage, "not a valid WebAssembly module"),
        (b"hello, I am not wasm".to_vec(), "not a valid WebAssembly module"),
        (std::fs::read(fixture("badimport.wat")).expect("fixture"), "does_not_exist"),
        (std::fs::read(fixture("noexport.wat")).expect("fixture"), "_start"),
    ] {
        let (r, _) = run_bytes(&rt, bytes, Run::default()).await;
        let Outcome::InvalidModule(msg) = &r.outcome else {
            panic!("expected InvalidModule, got {:?}", r.outcome)
        };
        assert!(msg.contains(needle), "{msg}");
        assert_eq!((r.outcome.reason(), r.outcome.exit_code()), ("InvalidModule", 128));
    }
}

/// Runs fsprobe against fd 3 (the first preopen) and returns its one output line.
async fn probe(rt: &WasmRuntime, dir: &Path, read_only: bool, op: &[&str]) -> String {
    let preopens = vec![Preopen { host: dir.to_owned(), guest: "/data".into(), read_only }];
    let mut args = vec!["fsprobe".to_string(), op[0].into(), "3".into()];
    args.extend(op[1..].iter().map(|s| s.to_string()));
    let (_, out) = run_fixture(rt, "fsprobe.wat", Run { args, preopens, ..Run::default() }).await;
    stdout_lines(&out).join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_cannot_reach_outside_its_preopens() {
    let rt = WasmRuntime::new().expect("runtime");
    let root = tempfile::tempdir().expect("tempdir");
    let data = root.path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    std::fs::write(data.join("inside.txt"), "in").expect("write");
    std::fs::write(root.path().join("secret.txt"), "top secret").expect("write");
    std::os::unix::fs::symlink(root.path().join("secret.txt"), data.join("link")).expect("symlink");
    std::os::unix::fs::symlink("/etc/hostname", data.join("abs-link")).expect("symlink");

    assert_eq!(probe(&rt, &data, false, &["read", "inside.txt"]).await, "ok in");
    for path in ["../secret.txt", "/etc/passwd", "link", "abs-link", "./../data/../secret.txt"] {
        let out = probe(&rt, &data, false, &["read", path]).await;
        assert!(out.starts_with("errno "), "reading {path} must fail, got {out:?}");
        assert!(!out.contains("top secret"));
    }
    let out = probe(&rt, &data, false, &["write", "../escaped.txt", "x"]).await;
    assert!(out.starts_with("errno "), "{out}");
    assert!(!root.path().join("escaped.txt").exists());

    assert_eq!(probe(&rt, &data, false, &["write", "new.txt", "hello"]).await, "ok");
    assert_eq!(std::fs::read_to_string(data.join("new.txt")).expect("written"), "hello\n");
    let out = probe(&rt, &data, true, &["write", "ro.txt", "x"]).await;
    assert!(out.starts_with("errno "), "read-only mount refuses writes: {out}");
    assert!(!data.join("ro.txt").exists());
    assert_eq!(probe(&rt, &data, true, &["read", "inside.txt"]).await, "ok in", "read-only still reads");
}
