//! The binary's own command line. (Running this target also makes `cargo test --workspace` build the
//! `lichen` binary that the `lichen-tests` suites drive.)

use std::process::Command;

#[test]
fn version_names_the_runtime_and_arch() {
    let out = Command::new(env!("CARGO_BIN_EXE_lichen")).arg("version").output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains(concat!("lichen ", env!("CARGO_PKG_VERSION"))), "{text}");
    assert!(text.contains("wasmtime 48.") && text.contains(std::env::consts::ARCH), "{text}");
}

#[test]
fn help_lists_the_commands_and_every_flag_has_an_env_var() {
    let out = Command::new(env!("CARGO_BIN_EXE_lichen")).arg("--help").output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["run", "check", "version"] {
        assert!(text.contains(cmd), "{text}");
    }
    // Long help lists each option as a block: the flag line, its doc, then `[env: …]`.
    let mut blocks: Vec<String> = Vec::new();
    for line in text.lines() {
        let t = line.trim_start();
        let short = t.len() > 2
            && t.as_bytes()[0] == b'-'
            && t.as_bytes()[1].is_ascii_alphabetic()
            && t.as_bytes()[2] == b',';
        if t.starts_with("--") || short {
            blocks.push(String::new());
        }
        if let Some(b) = blocks.last_mut() {
            b.push_str(line);
            b.push('\n');
        }
    }
    let options: Vec<&String> =
        blocks.iter().filter(|b| !b.contains("--help") && !b.contains("--version")).collect();
    assert!(options.len() >= 14, "every config field has a flag: {}", options.len());
    for b in options {
        assert!(b.contains("[env: LICHEN_"), "flag without an env var: {b}");
    }
}
