//! Hostile modules: each one tries to take something from the board (the stack, the host's memory
//! through tables, more instances of a resource than a container may have, sockets, the compiler's
//! patience through huge import sections, the agent's own log) and must end in a clear outcome
//! while the agent carries on.

use std::sync::Arc;
use std::time::Duration;

use lichen::runtime::logs::{ContainerLog, LogRecord, Stream, read_run};
use lichen::runtime::{Outcome, RunReport, RunSpec, WasmRuntime};
use lichen::store::ModuleDigest;
use lichen_tests::{Scratch, fixture, pod_yaml, stdout_lines, wait_for};
use tokio_util::sync::CancellationToken;

async fn run(rt: &WasmRuntime, bytes: Vec<u8>) -> (RunReport, Vec<LogRecord>) {
    let logs = tempfile::tempdir().expect("tempdir");
    let log = ContainerLog::open(logs.path(), 0, 1 << 20, 2, None).expect("log");
    let report = match rt.prepare(ModuleDigest::of(&bytes), Arc::from(bytes)).await {
        Err(outcome) => RunReport { outcome, fuel_consumed: 0, peak_memory: 0, elapsed: Duration::ZERO },
        Ok((module, _artifact)) => {
            let spec = RunSpec {
                args: vec!["m".into()],
                env: vec![],
                preopens: vec![],
                fuel: Some(50_000_000_000),
                memory_limit: 16 << 20,
                timeout: Some(Duration::from_secs(120)),
                stdout: log.sink(Stream::Stdout),
                stderr: log.sink(Stream::Stderr),
                stdin: None,
                mqtt: None,
                meter: None,
            };
            rt.run(&module, spec, &CancellationToken::new()).await
        }
    };
    (report, read_run(logs.path(), 0).expect("read log"))
}

fn bytes(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).expect("fixture")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbounded_recursion_is_a_trap_not_a_crash() {
    let rt = WasmRuntime::new().expect("runtime");
    let (r, _) = run(&rt, bytes("stackbomb.wat")).await;
    let Outcome::Trap(msg) = &r.outcome else { panic!("expected a trap, got {:?}", r.outcome) };
    assert!(msg.contains("call stack exhausted"), "{msg}");
    assert_eq!((r.outcome.reason(), r.outcome.exit_code()), ("Trap", 134));
    // The process survived the overflow, and the next run of the same module traps the same way.
    let (again, _) = run(&rt, bytes("stackbomb.wat")).await;
    assert_eq!(again.outcome, r.outcome);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_growth_stops_at_the_limit() {
    let rt = WasmRuntime::new().expect("runtime");
    let (r, out) = run(&rt, bytes("tablebomb.wat")).await;
    assert_eq!(r.outcome, Outcome::Exited(3), "growth was refused and the module saw it: {out:?}");
    let size: u64 =
        stdout_lines(&out).first().and_then(|l| l.parse().ok()).expect("the table size it reached");
    assert!((10_000..=100_000).contains(&size), "grew to {size} elements");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_tables_memories_or_elements_than_allowed_cannot_instantiate() {
    let rt = WasmRuntime::new().expect("runtime");
    for (name, needle) in
        [("manytables.wat", "table count"), ("twomemories.wat", "memory count"), ("hugetable.wat", "table")]
    {
        let (r, _) = run(&rt, bytes(name)).await;
        let Outcome::InvalidModule(msg) = &r.outcome else {
            panic!("{name}: expected InvalidModule, got {:?}", r.outcome)
        };
        assert!(msg.contains(needle), "{name}: {msg}");
        assert_eq!(r.fuel_consumed, 0, "{name}: no code ran");
    }
}

/// A module with `n` function imports, all `(import "m" "f<i>" (func))`, and an empty `_start`: the
/// smallest way to hand the compiler and linker a huge import section. Written as bytes, so it
/// needs no text parser.
fn imports_module(n: u32) -> Vec<u8> {
    fn leb(mut v: u32, out: &mut Vec<u8>) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    fn section(id: u8, body: &[u8], out: &mut Vec<u8>) {
        out.push(id);
        leb(body.len() as u32, out);
        out.extend_from_slice(body);
    }
    let mut m = b"\0asm\x01\0\0\0".to_vec();
    section(1, &[1, 0x60, 0, 0], &mut m); // one type: () -> ()
    let mut imports = Vec::new();
    leb(n, &mut imports);
    for i in 0..n {
        imports.extend_from_slice(&[1, b'm']);
        let name = format!("f{i}");
        leb(name.len() as u32, &mut imports);
        imports.extend_from_slice(name.as_bytes());
        imports.extend_from_slice(&[0x00, 0x00]); // a function of type 0
    }
    section(2, &imports, &mut m);
    section(3, &[1, 0], &mut m); // one function of type 0: _start
    let mut exports = vec![1, 6];
    exports.extend_from_slice(b"_start");
    exports.push(0x00);
    leb(n, &mut exports); // function indices count the imports first
    section(7, &exports, &mut m);
    section(10, &[1, 2, 0, 0x0b], &mut m); // its body: no locals, `end`
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_import_sections_are_refused_with_a_reason() {
    let rt = WasmRuntime::new().expect("runtime");
    // Over the validator's limit on imports: refused while parsing, before any compilation.
    let (r, _) = run(&rt, imports_module(1_000_000)).await;
    let Outcome::InvalidModule(msg) = &r.outcome else {
        panic!("expected InvalidModule, got {:?}", r.outcome)
    };
    assert!(msg.contains("not a valid WebAssembly module") && msg.contains("limit"), "{msg}");
    // Under it, but none of them exist on the host: a link error naming the first missing import.
    let (r, _) = run(&rt, imports_module(50_000)).await;
    let Outcome::InvalidModule(msg) = &r.outcome else {
        panic!("expected InvalidModule, got {:?}", r.outcome)
    };
    assert!(msg.contains("m::f0"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modules_have_no_sockets() {
    let rt = WasmRuntime::new().expect("runtime");
    let (r, out) = run(&rt, bytes("sockets.wat")).await;
    assert_eq!(r.outcome, Outcome::Exited(0), "{out:?}");
    // WASI preview 1 errno 57 is ENOTSOCK, 8 is EBADF: either way, no socket.
    let lines = stdout_lines(&out);
    assert!(matches!(lines.first(), Some(&"errno 57") | Some(&"errno 08")), "{lines:?}");
    assert_eq!(lines.last(), Some(&"done"));
}

/// 400,000 refused socket calls from a module must not become 400,000 lines in the agent's log
/// (Wasmtime's WASI layer warns on every unimplemented socket call), even at `debug`.
#[test]
fn a_module_cannot_flood_the_agents_log() {
    let s = Scratch::new("[log]\nlevel = \"debug\"\n");
    s.put_pod("knock.yaml", &pod_yaml("knock", &fixture("sockets.wat"), "  restartPolicy: Never\n"));
    let agent = s.start();
    let t = Duration::from_secs(60);
    wait_for(t, "the module to finish knocking", || {
        s.output("knock", "main", 0).iter().any(|l| l == "done").then_some(())
    });
    s.wait_phase("knock", "Succeeded", t);
    let log = agent.log();
    let socket_lines = log.iter().filter(|l| l.contains("sock_")).count();
    assert_eq!(socket_lines, 0, "socket calls logged: {:?}", log.iter().find(|l| l.contains("sock_")));
    assert!(log.len() < 500, "{} agent log lines for one pod:\n{}", log.len(), log.join("\n"));
}
