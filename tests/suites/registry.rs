//! Modules pulled like images, from a real OCI registry (Debian's `docker-registry`) on loopback:
//! `lichen push`, both Wasm artifact layouts, pull policies, credentials, the cache with its
//! precompiled artifacts, `lichen compile` and `lichen modules`, and every way a pull can go wrong,
//! each ending in a clear message and a cache holding only verified modules.

use std::path::{Path, PathBuf};
use std::time::Duration;

use lichen_tests::registry::{
    FaultMode, FaultProxy, Registry, WASM_CONFIG_V0, WASM_LAYER, WASM_TO_OCI_CONFIG, WASM_TO_OCI_LAYER,
    sha256_digest,
};
use lichen_tests::{Scratch, fixture, lichen_err, lichen_ok, wait_for};

const T: Duration = Duration::from_secs(30);

/// A fixture compiled to binary WebAssembly, as a user's toolchain would produce it.
fn wasm(name: &str) -> Vec<u8> {
    wat::parse_file(fixture(name)).expect("fixture compiles")
}

fn write_wasm(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name.replace(".wat", ".wasm"));
    std::fs::write(&path, wasm(name)).expect("write wasm");
    path
}

/// A scratch agent config that may reach `hosts` over plain HTTP.
fn scratch(hosts: &[String], modules_extra: &str) -> Scratch {
    let list = hosts.iter().map(|h| format!("{h:?}")).collect::<Vec<_>>().join(", ");
    Scratch::new(&format!("[modules]\ninsecure_registries = [{list}]\n{modules_extra}"))
}

fn static_pod(s: &Scratch, name: &str, image: &str, extra_container: &str) {
    s.put_pod(
        &format!("{name}.yaml"),
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  restartPolicy: Never\n  containers:\n  - name: main\n    image: {image}\n    args: [from-registry]\n{extra_container}"
        ),
    );
}

fn hello_ran(s: &Scratch, name: &str) -> Option<()> {
    s.output(name, "main", 0).iter().any(|l| l == "hello from-registry").then_some(())
}

#[test]
fn pushed_modules_run_as_static_pods_and_stay_cached_with_their_compiled_code() {
    let reg = Registry::start();
    let s = scratch(&[reg.host()], "");
    let file = write_wasm(s.dir.path(), "hello.wat");
    let image = format!("{}/demo/hello:1.0", reg.host());
    let pushed = lichen_ok(s.lichen(&["push", file.to_str().expect("utf-8"), &image], ""));
    let digest = sha256_digest(&wasm("hello.wat"));
    assert!(pushed.contains(&digest), "push names the module digest: {pushed}");

    // The registry holds a CNCF Wasm artifact: one application/wasm layer, the wasm config.
    let manifest = reg.request(
        "GET",
        "/v2/demo/hello/manifests/1.0",
        &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
        b"",
    );
    let manifest: serde_json::Value = serde_json::from_slice(&manifest.body).expect("manifest json");
    assert_eq!(manifest["config"]["mediaType"], WASM_CONFIG_V0);
    assert_eq!(manifest["layers"][0]["mediaType"], WASM_LAYER);
    assert_eq!(manifest["layers"][0]["digest"], digest.as_str());

    let agent = s.start();
    s.wait_running(T);
    static_pod(&s, "hello", &image, "");
    wait_for(T, "the pulled module's output", || hello_ran(&s, "hello"));
    agent.wait_log(&["pulled module", &digest], T);

    // `lichen modules list` reaches the running agent through its control socket.
    let list = lichen_ok(s.lichen(&["modules", "list"], ""));
    let short = &digest["sha256:".len().."sha256:".len() + 12];
    let line = list.lines().find(|l| l.contains(short)).unwrap_or_else(|| panic!("module listed: {list}"));
    assert!(line.contains("demo/hello:1.0"), "with its image: {line}");
    assert!(line.contains("used by default/hello-test-node"), "and its pod: {line}");
    let compiled: Vec<&str> = line.split_whitespace().collect();
    assert!(compiled[2].parse::<u64>().is_ok_and(|n| n > 0), "a precompiled artifact is cached: {line}");

    // Offline restart: the registry is gone, the module comes from the cache, compiled code too.
    drop(reg);
    let (status, _) = agent.stop();
    assert!(status.success());
    std::fs::remove_file(s.pods.join("hello.yaml")).expect("rm");
    let agent = s.start();
    s.wait_running(T);
    static_pod(&s, "again", &image, "");
    wait_for(T, "the cached module's output", || hello_ran(&s, "again"));
    assert!(
        !agent.log().iter().any(|l| l.contains("cannot pull module")),
        "IfNotPresent with a cached copy never touches the registry"
    );
}

#[test]
fn the_older_wasm_to_oci_layout_runs_too() {
    let reg = Registry::start();
    let module = wasm("hello.wat");
    reg.push_artifact("old/hello", "v1", WASM_TO_OCI_CONFIG, b"{}", &[(WASM_TO_OCI_LAYER, &module)]);
    let s = scratch(&[reg.host()], "");
    let agent = s.start();
    static_pod(&s, "old", &format!("{}/old/hello:v1", reg.host()), "");
    wait_for(T, "the wasm-to-oci module's output", || hello_ran(&s, "old"));
    drop(agent);
}

#[test]
fn credentials_from_the_command_line_pull_from_an_authenticated_registry() {
    let reg = Registry::start_with_auth("edge", "s3cret-pw");
    let s = scratch(&[reg.host()], "");
    let file = write_wasm(s.dir.path(), "hello.wat");
    let image = format!("{}/private/hello:2", reg.host());
    let path = file.to_str().expect("utf-8");

    let refused = lichen_err(s.lichen(&["push", path, &image], ""));
    assert!(refused.contains("unauthorized") || refused.contains("401"), "{refused}");
    lichen_ok(s.lichen(&["push", path, &image, "--username", "edge", "--password-stdin"], "s3cret-pw\n"));

    // No agent runs: `lichen modules` works on the store directly.
    let anonymous = lichen_err(s.lichen(&["modules", "pull", &image], ""));
    assert!(anonymous.contains("unauthorized"), "names the cause: {anonymous}");
    let wrong = lichen_err(
        s.lichen(&["modules", "pull", &image, "--username", "edge", "--password-stdin"], "nope\n"),
    );
    assert!(wrong.contains("unauthorized"), "{wrong}");
    assert!(!wrong.contains("nope"), "the password never shows: {wrong}");
    let pulled = lichen_ok(
        s.lichen(&["modules", "pull", &image, "--username", "edge", "--password-stdin"], "s3cret-pw\n"),
    );
    assert!(pulled.contains(&sha256_digest(&wasm("hello.wat"))), "{pulled}");

    // A pod naming the image with `Never` finds it in the cache.
    let agent = s.start();
    static_pod(&s, "private", &image, "    imagePullPolicy: Never\n");
    wait_for(T, "the private module's output", || hello_ran(&s, "private"));
    drop(agent);
}

#[test]
fn pull_policies_never_and_always_with_the_registry_away() {
    let mut reg = Registry::start();
    let s = scratch(&[reg.host()], "");
    let image = format!("{}/demo/hello:latest", reg.host());
    let agent = s.start();
    s.wait_running(T);

    static_pod(&s, "never", &image, "    imagePullPolicy: Never\n");
    agent.wait_log(&["cannot pull module", "not present with pull policy of Never"], T);

    reg.push_artifact("demo/hello", "latest", WASM_CONFIG_V0, b"{}", &[(WASM_LAYER, &wasm("hello.wat"))]);
    // `:latest` defaults to Always: pulled now, and run from the cache while the registry is away.
    static_pod(&s, "always", &image, "");
    wait_for(T, "the first Always pod", || hello_ran(&s, "always"));
    reg.kill();
    static_pod(&s, "stale", &image, "");
    wait_for(T, "the Always pod with the registry away", || hello_ran(&s, "stale"));
    agent.wait_log(&["registry unreachable; running the cached module"], T);
    // The Never pod was waiting in back-off; it finds the module now cached.
    wait_for(Duration::from_secs(60), "the Never pod once the module is cached", || hello_ran(&s, "never"));
}

#[test]
fn bad_artifacts_end_in_clear_errors_and_leave_the_cache_clean() {
    let reg = Registry::start();
    let s = scratch(&[reg.host()], "max_module_size = \"2Ki\"\n");
    let host = reg.host();
    let small = wasm("exit.wat");
    assert!(small.len() < 2048, "exit.wat fits the limit");
    let mut big_module = wasm("hello.wat");
    // A custom section pads the module past the 2Ki limit while keeping it valid.
    big_module.extend_from_slice(&custom_section(4096));

    reg.push_artifact(
        "bad/tar",
        "1",
        WASM_CONFIG_V0,
        b"{}",
        &[("application/vnd.oci.image.layer.v1.tar+gzip", &small)],
    );
    reg.push_artifact("bad/big", "1", WASM_CONFIG_V0, b"{}", &[(WASM_LAYER, &big_module)]);
    reg.push_artifact(
        "bad/image",
        "1",
        "application/vnd.oci.image.config.v1+json",
        b"{}",
        &[(WASM_LAYER, &small)],
    );
    reg.push_artifact("bad/missing", "1", WASM_CONFIG_V0, b"{}", &[(WASM_LAYER, &small)]);
    reg.delete_blob("bad/missing", &sha256_digest(&small));
    reg.push_artifact("good/exit", "1", WASM_CONFIG_V0, b"{}", &[(WASM_LAYER, &small)]);
    let not_wasm = b"this is not a module".to_vec();
    reg.push_artifact("bad/text", "1", WASM_CONFIG_V0, b"{}", &[(WASM_LAYER, &not_wasm)]);

    let pull = |image: &str| lichen_err(s.lichen(&["modules", "pull", image], ""));
    let e = pull(&format!("{host}/bad/tar:1"));
    assert!(e.contains("not a Wasm module artifact") && e.contains("tar+gzip"), "{e}");
    let e = pull(&format!("{host}/bad/big:1"));
    assert!(e.contains("over the node's limit"), "{e}");
    let e = pull(&format!("{host}/bad/image:1"));
    assert!(e.contains("container image"), "{e}");
    let e = pull(&format!("{host}/bad/missing:1"));
    assert!(e.contains("not found") || e.contains("BLOB_UNKNOWN") || e.contains("BlobUnknown"), "{e}");
    let e = pull(&format!("{host}/bad/absent:1"));
    assert!(e.contains("not found"), "{e}");
    let wrong = format!("{host}/good/exit@sha256:{}", "0".repeat(64));
    let e = pull(&wrong);
    assert!(e.contains("not found"), "{e}");
    let e = pull(&format!("{host}/bad/text:1"));
    assert!(e.contains("cannot run") || e.contains("not a valid WebAssembly module"), "{e}");
    // A URL pinned with the wrong digest: the bytes arrive and are refused.
    let blob = format!("http://{host}/v2/good/exit/blobs/{}", sha256_digest(&small));
    let e = pull(&format!("{blob}@sha256:{}", "1".repeat(64)));
    assert!(e.contains("digest mismatch"), "{e}");
    // The same URL with its real digest is fine.
    lichen_ok(s.lichen(&["modules", "pull", &format!("{blob}@{}", sha256_digest(&small))], ""));

    let list = lichen_ok(s.lichen(&["modules", "list"], ""));
    assert!(list.contains("1 module(s)"), "only the verified module is cached: {list}");
}

fn custom_section(len: usize) -> Vec<u8> {
    // id 0, LEB128 size, name "pad", payload.
    let payload = len;
    let size = 1 + 3 + payload;
    let mut out = vec![0u8];
    let mut n = size;
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    out.push(3);
    out.extend_from_slice(b"pad");
    out.extend(std::iter::repeat_n(0u8, payload));
    out
}

#[test]
fn a_registry_dying_mid_pull_is_retried_and_nothing_half_written_is_kept() {
    let reg = Registry::start();
    let module = wasm("hello.wat");
    reg.push_artifact("demo/hello", "1", WASM_CONFIG_V0, b"{}", &[(WASM_LAYER, &module)]);
    let proxy = FaultProxy::start(&reg);
    let s = scratch(&[proxy.host()], "pull_timeout_secs = 3\n");
    let image = format!("{}/demo/hello:1", proxy.host());

    proxy.set_mode(FaultMode::CutAfter(module.len() / 2));
    let e = lichen_err(s.lichen(&["modules", "pull", &image], ""));
    assert!(e.contains("registry unreachable") || e.contains("interrupted"), "{e}");
    proxy.set_mode(FaultMode::Stall);
    let e = lichen_err(s.lichen(&["modules", "pull", &image], ""));
    assert!(e.contains("timed out"), "{e}");
    let list = lichen_ok(s.lichen(&["modules", "list"], ""));
    assert!(list.contains("0 module(s)"), "nothing half-downloaded is cached: {list}");

    // A pod started while the blob download keeps dying waits in back-off, then runs once the
    // registry serves it whole.
    proxy.set_mode(FaultMode::CutAfter(100));
    let agent = s.start();
    static_pod(&s, "flaky", &image, "");
    agent.wait_log(&["cannot pull module", "interrupted"], T);
    proxy.set_mode(FaultMode::Pass);
    wait_for(Duration::from_secs(60), "the module after the registry recovered", || hello_ran(&s, "flaky"));
    drop(agent);
}

#[test]
fn precompiled_artifacts_from_lichen_compile_are_imported_and_checked() {
    let s = scratch(&[], "");
    let file = write_wasm(s.dir.path(), "hello.wat");
    let path = file.to_str().expect("utf-8");
    let host_art = s.dir.path().join("hello.cwasm");
    let out = lichen_ok(s.lichen(&["compile", path, "-o", host_art.to_str().expect("utf-8")], ""));
    assert!(out.contains("compiled"), "{out}");
    for target in ["aarch64", "armv7"] {
        let art = s.dir.path().join(format!("hello-{target}.cwasm"));
        lichen_ok(s.lichen(&["compile", "--target", target, path, "-o", art.to_str().expect("utf-8")], ""));
        // A board of another architecture is a different engine: its artifact is refused here.
        let e = lichen_err(
            s.lichen(&["modules", "import", path, "--precompiled", art.to_str().expect("utf-8")], ""),
        );
        assert!(e.contains("compiled for engine"), "{target}: {e}");
    }
    // An artifact of another module is refused.
    let other = write_wasm(s.dir.path(), "exit.wat");
    let e = lichen_err(s.lichen(
        &[
            "modules",
            "import",
            other.to_str().expect("utf-8"),
            "--precompiled",
            host_art.to_str().expect("utf-8"),
        ],
        "",
    ));
    assert!(e.contains("was compiled from module"), "{e}");
    // Garbage is refused before anything is deserialized.
    std::fs::write(s.dir.path().join("junk.cwasm"), b"\x7fELF not really").expect("junk");
    let junk = s.dir.path().join("junk.cwasm");
    let e = lichen_err(
        s.lichen(&["modules", "import", path, "--precompiled", junk.to_str().expect("utf-8")], ""),
    );
    assert!(e.contains("lichen compile"), "{e}");

    let image = "registry.invalid/acme/hello:1";
    let out = lichen_ok(s.lichen(
        &["modules", "import", path, "--precompiled", host_art.to_str().expect("utf-8"), "--as", image],
        "",
    ));
    assert!(out.contains("with its precompiled artifact"), "{out}");
    let agent = s.start();
    static_pod(&s, "imported", image, "    imagePullPolicy: IfNotPresent\n");
    wait_for(T, "the imported module's output", || hello_ran(&s, "imported"));
    let (status, _) = agent.stop();
    assert!(status.success());

    // Prune keeps what a pod uses; rm refuses it without --force.
    let e = lichen_err(s.lichen(&["modules", "rm", image], ""));
    assert!(e.contains("used by pod(s) default/imported-test-node"), "{e}");
    let pruned = lichen_ok(s.lichen(&["modules", "prune", "--all"], ""));
    assert!(pruned.contains("removed 0 module(s)"), "{pruned}");
    std::fs::remove_file(s.pods.join("imported.yaml")).expect("rm pod");
    let agent = s.start();
    agent.wait_log(&["forgetting pod whose source is gone"], T);
    let (status, _) = agent.stop();
    assert!(status.success());
    let pruned = lichen_ok(s.lichen(&["modules", "prune", "--all"], ""));
    assert!(pruned.contains("removed 1 module(s)"), "{pruned}");
}

#[test]
fn https_registries_are_verified_against_the_system_roots_and_the_configured_ca() {
    let reg = Registry::start_tls();
    let file = |s: &Scratch| write_wasm(s.dir.path(), "hello.wat");
    let image = format!("{}/secure/hello:1", reg.host());

    // Without the CA the certificate is unknown: refused, never downgraded to plain HTTP.
    let plain = scratch(&[], "");
    let path = file(&plain);
    let e = lichen_err(plain.lichen(&["push", path.to_str().expect("utf-8"), &image], ""));
    assert!(e.to_lowercase().contains("certificate"), "names the TLS failure: {e}");

    let ca = reg.ca_file();
    let s = scratch(&[], &format!("registry_ca_files = [{:?}]\n", ca.display().to_string()));
    let path = file(&s);
    lichen_ok(s.lichen(&["push", path.to_str().expect("utf-8"), &image], ""));
    let agent = s.start();
    static_pod(&s, "secure", &image, "");
    wait_for(T, "the module pulled over HTTPS", || hello_ran(&s, "secure"));
    drop(agent);

    // The same registry named in a pinned URL over https.
    let digest = sha256_digest(&wasm("hello.wat"));
    let url = format!("https://{}/v2/secure/hello/blobs/{digest}@{digest}", reg.host());
    let out = lichen_ok(s.lichen(&["modules", "pull", &url], ""));
    assert!(out.contains(&digest), "{out}");
}
