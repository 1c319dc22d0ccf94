//! Board binary sizes against `cross/size-budget`: the stripped release binaries that
//! `cross/build.sh build aarch64 armv7` leaves in the target directory, measured as built.

use std::path::{Path, PathBuf};

use crate::report::Report;

const SECTION: &str = "binaries";

/// The budget lines: target triple and the largest size allowed, in bytes; a failure is reported.
fn budget(path: &Path, report: &mut Report) -> Option<Vec<(String, u64)>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            report.failed(SECTION, format!("{}: {e}", path.display()));
            return None;
        }
    };
    let mut lines = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let mut words = line.split_whitespace();
        match (words.next(), words.next().map(str::parse::<u64>)) {
            (Some(triple), Some(Ok(bytes))) => lines.push((triple.to_owned(), bytes)),
            _ => {
                report.failed(SECTION, format!("{}: not `<target> <bytes>`: {line:?}", path.display()));
                return None;
            }
        }
    }
    Some(lines)
}

fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / (1024.0 * 1024.0))
}

pub async fn run(report: &mut Report) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let Some(lines) = budget(&root.join("cross/size-budget"), report) else { return };
    let target_dir = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    // The host's release binary, for comparison (it has no budget: no board runs it).
    if let Ok(m) = std::fs::metadata(target_dir.join("release/lichen")) {
        report.info(SECTION, "host (x86_64) release binary, stripped", mib(m.len()));
    }
    for (triple, allowed) in lines {
        let binary = target_dir.join(&triple).join("release/lichen");
        // The aims, beside the budget line CI holds each build to.
        let aim = if triple.starts_with("armv7") { 10 << 20 } else { 12 << 20 };
        match std::fs::metadata(&binary) {
            Ok(m) => {
                report.aim(
                    SECTION,
                    format!("{triple} release binary, stripped"),
                    format!("{} ({} bytes)", mib(m.len()), m.len()),
                    &format!("≤ {}", mib(aim)),
                    m.len() <= aim,
                );
                report.aim(
                    SECTION,
                    "… against its line in cross/size-budget (checked in CI)",
                    format!("{} bytes", m.len()),
                    &format!("≤ {allowed} bytes ({})", mib(allowed)),
                    m.len() <= allowed,
                );
            }
            Err(_) => report.skipped(
                SECTION,
                format!("{triple}: no {} (run `bash cross/build.sh build`)", binary.display()),
            ),
        }
    }
}
