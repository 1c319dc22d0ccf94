//! Modules precompiled on a build machine and run on a board: `lichen compile --target <board>`
//! there, `lichen modules import --precompiled` here, and this machine's agent running the imported
//! artifacts as static pods — one module to completion, one infinite loop stopped by its fuel
//! budget — with the same statuses on every architecture.
//!
//! Natively the build machine is this machine. `cross/build.sh test` runs this suite for aarch64
//! and armv7 under QEMU with `LICHEN_COMPILE_BIN` naming the x86-64 `lichen`, so the artifacts are
//! the ones a user would make on a laptop: native aarch64 code, or `pulley32` bytecode for armv7.
//! There the looping pod runs that bytecode on Wasmtime's Pulley interpreter, so its `OutOfFuel`
//! shows fuel metering works without Cranelift's native code too.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use lichen::store::{SledStore, StateStore};
use lichen_tests::{Scratch, fixture, lichen_bin, lichen_ok};

/// Generous: under QEMU every instruction of the agent is emulated.
const T: Duration = Duration::from_secs(120);

/// The fuel budget of the looping pod: small enough for an emulated interpreter to burn quickly.
const FUEL: u64 = 2_000_000;

/// The `lichen compile --target` value for this machine.
fn board_target() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "aarch64",
        "arm" => "armv7",
        // x86-64's engine uses the CPU features it finds (AVX and so on), so only `host` matches.
        _ => "host",
    }
}

/// A target whose artifacts this machine must refuse.
fn foreign_target() -> &'static str {
    if std::env::consts::ARCH == "aarch64" { "armv7" } else { "aarch64" }
}

/// The build machine's `lichen`: `LICHEN_COMPILE_BIN`, or this machine's own.
fn compile_bin() -> PathBuf {
    std::env::var_os("LICHEN_COMPILE_BIN").map(PathBuf::from).unwrap_or_else(lichen_bin)
}

fn run(bin: &Path, s: &Scratch, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .arg("--config")
        .arg(&s.config)
        .env_remove("LICHEN_CONFIG")
        .stdin(Stdio::null())
        .output()
        .expect("spawn lichen")
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Compiles fixture `name` for `target` on the build machine; returns the `.wasm` and `.cwasm`.
fn compile(s: &Scratch, name: &str, target: &str) -> (PathBuf, PathBuf) {
    let wasm = s.dir.path().join(format!("{name}.wasm"));
    std::fs::write(&wasm, wat::parse_file(fixture(&format!("{name}.wat"))).expect("fixture compiles"))
        .expect("write wasm");
    let art = s.dir.path().join(format!("{name}-{target}.cwasm"));
    let out = lichen_ok(run(
        &compile_bin(),
        s,
        &["compile", "--target", target, path_str(&wasm), "-o", path_str(&art)],
    ));
    assert!(out.contains("compiled"), "{out}");
    (wasm, art)
}

/// `phase container-state exit-code reason message` of a stored pod status.
fn summary(status: &serde_json::Value) -> String {
    let c = &status["containerStatuses"][0];
    let t = &c["state"]["terminated"];
    format!(
        "{} {} exit={} reason={} message={:?}",
        status["phase"].as_str().unwrap_or("?"),
        c["name"].as_str().unwrap_or("?"),
        t["exitCode"],
        t["reason"].as_str().unwrap_or("?"),
        t["message"].as_str().unwrap_or(""),
    )
}

#[test]
fn artifacts_compiled_on_a_build_machine_run_here_with_the_same_statuses() {
    let s = Scratch::new("");
    let target = board_target();
    let board = lichen_bin();

    // Another architecture's artifact is refused by this machine's engine, before it is loaded.
    let (hello, foreign) = compile(&s, "hello", foreign_target());
    let out = run(&board, &s, &["modules", "import", path_str(&hello), "--precompiled", path_str(&foreign)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("compiled for engine"), "{target}: {err}");

    // This machine's artifacts are accepted: the build machine computed this engine's key.
    for name in ["hello", "loop"] {
        let (wasm, art) = compile(&s, name, target);
        let image = format!("build.invalid/cross/{name}:1");
        let out = lichen_ok(run(
            &board,
            &s,
            &["modules", "import", path_str(&wasm), "--precompiled", path_str(&art), "--as", &image],
        ));
        assert!(out.contains("with its precompiled artifact"), "{target}: {out}");
    }

    let pod = |name: &str, image: &str, annotations: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n{annotations}spec:\n  restartPolicy: Never\n  containers:\n  - name: main\n    image: {image}\n    imagePullPolicy: IfNotPresent\n    args: [\"ran on\", \"{target}\"]\n"
        )
    };
    s.put_pod("hello.yaml", &pod("hello", "build.invalid/cross/hello:1", ""));
    let fuel = format!("  annotations:\n    lichen.dev/fuel: \"{FUEL}\"\n");
    s.put_pod("spin.yaml", &pod("spin", "build.invalid/cross/loop:1", &fuel));
    let agent = s.start();
    s.wait_running(T);
    s.wait_phase("hello", "Succeeded", T);
    s.wait_phase("spin", "Failed", T);
    let output = s.output("hello", "main", 0);
    assert!(output.contains(&format!("hello ran on {target}")), "{output:?}");
    let (status, log) = agent.stop();
    let log = log.join("\n");
    assert!(status.success(), "{log}");
    assert!(!log.contains("precompiled artifact unusable"), "the imported artifacts ran as they were: {log}");

    let store = SledStore::open(&s.state.join("store")).expect("open the agent's store");
    let stored = |name: &str| {
        let key = format!("default/{name}-test-node");
        let record = store.get_pod(&key).expect("read the store").unwrap_or_else(|| panic!("{key} stored"));
        summary(&record.status.unwrap_or_else(|| panic!("{key} has a status")))
    };
    let (hello, spin) = (stored("hello"), stored("spin"));
    let arch = std::env::consts::ARCH;
    eprintln!("{arch}: {hello}\n{arch}: {spin}");
    assert_eq!(hello, r#"Succeeded main exit=0 reason=Completed message="""#);
    assert_eq!(
        spin,
        format!("Failed main exit=137 reason=OutOfFuel message=\"fuel budget of {FUEL} exhausted\"")
    );
}
