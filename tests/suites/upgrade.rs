//! The agent's own upgrades, on the node's side of the switch: the launcher booting a new agent on
//! trial, the health gate committing it or handing back, and a new agent that dies on trial rolled
//! back by the next start. Each test starts from the state a step of an upgrade leaves on disk
//! (written with the agent's own record code), then runs the real binaries: the test build as the
//! packaged launcher, and a copy of it stamped with another build id as the new agent.

use std::path::{Path, PathBuf};
use std::time::Duration;

use lichen::layout::StateLayout;
use lichen::upgrade::Phase;
use lichen::upgrade::slots::{Slot, Slots, SwitchRecord, Trial};
use lichen_tests::{Scratch, fixture, lichen_bin, pod_yaml, wait_for};

const T: Duration = Duration::from_secs(60);
const IMAGE: &str =
    "127.0.0.1:5000/lichen/agent@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// A copy of the test build stamped with build id `id`: another version of the agent.
fn stamped(dir: &Path, id: &str) -> (PathBuf, String) {
    let mut bytes = std::fs::read(lichen_bin()).expect("read the lichen binary");
    lichen::version::stamp(&mut bytes, id).expect("stamp");
    let path = dir.join(format!("lichen-{id}"));
    std::fs::write(&path, &bytes).expect("write the stamped binary");
    (path, lichen::version::read_version(&bytes).expect("its version"))
}

fn sha256_hex(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).expect("read");
    Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Stages `binary` as the upgrade's download would, and records a trial of it with `boots`.
fn stage_trial(s: &Scratch, binary: &Path, version: &str, boots: u32, had_contact: bool) -> Slot {
    let slots = Slots::new(&StateLayout::new(&s.state));
    let digest = sha256_hex(binary);
    let download = s.dir.path().join("download.part");
    std::fs::copy(binary, &download).expect("copy");
    slots.stage(&download, &digest).expect("stage");
    let slot = Slot { image: IMAGE.into(), digest, version: version.into() };
    let from = lichen::version::version();
    let record = SwitchRecord {
        trial: Some(Trial { slot: slot.clone(), boots, had_contact, from_version: from }),
        ..SwitchRecord::default()
    };
    slots.save(&record).expect("save the record");
    slot
}

fn record(s: &Scratch) -> SwitchRecord {
    Slots::new(&StateLayout::new(&s.state)).load().expect("the record reads")
}

/// The version the running agent reports through `lichen status` (`None` until one answers).
fn running_version(s: &Scratch) -> Option<String> {
    let out = s.status_output();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    (status["agent_running"] == true).then(|| status["agent_version"].as_str().map(str::to_owned)).flatten()
}

fn exe(pid: u32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).expect("the agent's executable")
}

#[test]
fn a_staged_trial_is_booted_by_the_launcher_passes_its_gate_and_stays_committed() {
    let s = Scratch::new("");
    s.put_pod("tick.yaml", &pod_yaml("tick", &fixture("sleeper.wat"), ""));
    let (v2, version) = stamped(s.dir.path(), "test.2");
    assert_ne!(version, lichen::version::version());
    // Power was cut after the switch was recorded and before the old agent handed over.
    let slot = stage_trial(&s, &v2, &version, 0, false);
    let agent = s.start();
    let staged = Slots::new(&StateLayout::new(&s.state)).binary(&slot.digest);
    wait_for(T, "the new agent to run and commit itself", || {
        let r = record(&s);
        (r.committed.as_ref() == Some(&slot) && r.trial.is_none()).then_some(r)
    });
    assert_eq!(exe(agent.pid()), staged, "the launcher exec'ed the staged binary in its own process");
    wait_for(T, "the new agent to answer as running", || running_version(&s).filter(|v| *v == version));
    let r = record(&s);
    let report = r.report.expect("an outcome to report");
    assert_eq!(report.phase, Phase::Succeeded);
    assert_eq!(report.version.as_deref(), Some(version.as_str()));
    assert!(r.report_pending, "reported to the Node once connected (this node is standalone)");
    assert!(agent.stop().0.success());

    // From now on the launcher starts the committed version.
    let agent = s.start();
    wait_for(T, "the committed version to run again", || running_version(&s).filter(|v| *v == version));
    assert_eq!(exe(agent.pid()), staged);
    assert!(agent.stop().0.success());
}

#[test]
fn a_new_agent_that_died_on_trial_is_rolled_back_and_not_tried_again() {
    let s = Scratch::new("");
    let (v2, version) = stamped(s.dir.path(), "test.3");
    // The launcher had booted it (boots = 1), and it never committed: a crash, the watchdog, a
    // power cut.
    stage_trial(&s, &v2, &version, 1, false);
    let agent = s.start();
    wait_for(T, "the packaged agent to run", || {
        running_version(&s).filter(|v| *v == lichen::version::version())
    });
    assert_eq!(exe(agent.pid()), std::fs::canonicalize(lichen_bin()).expect("canonical"));
    let r = record(&s);
    assert_eq!(r.trial, None);
    assert_eq!(r.refused.as_deref(), Some(IMAGE), "not tried again until the annotation changes");
    let report = r.report.expect("an outcome");
    assert_eq!(report.phase, Phase::RolledBack);
    assert!(report.reason.contains("before passing its health gate"), "{}", report.reason);
    assert!(agent.stop().0.success());
}

#[test]
fn a_new_agent_that_exits_at_start_is_rolled_back_by_the_next_start() {
    let s = Scratch::new("");
    // Not a Lichen at all: it exits at once, as a broken build would.
    let broken = s.dir.path().join("broken");
    std::fs::write(&broken, "#!/bin/sh\nexit 3\n").expect("write");
    stage_trial(&s, &broken, "0.9.0", 0, false);
    let agent = s.start();
    let (status, _) = agent.wait(T);
    assert_eq!(status.code(), Some(3), "the process the launcher exec'ed was the broken agent");
    // systemd restarts the service: the launcher finds the trial booted and rolls back.
    let agent = s.start();
    wait_for(T, "the packaged agent to run", || {
        running_version(&s).filter(|v| *v == lichen::version::version())
    });
    let report = record(&s).report.expect("an outcome");
    assert_eq!((report.phase, report.version.as_deref()), (Phase::RolledBack, Some("0.9.0")));
    assert!(agent.stop().0.success());
}

#[test]
fn a_new_agent_failing_its_health_gate_hands_back_to_the_version_before() {
    let s = Scratch::new("[upgrade]\nhealth_timeout_secs = 10\n");
    let (v2, version) = stamped(s.dir.path(), "test.4");
    // The old agent had reached the API server; this standalone node never will, so the gate
    // cannot pass.
    stage_trial(&s, &v2, &version, 0, true);
    let agent = s.start();
    let report = wait_for(T, "the gate to fail and the rollback to be recorded", || {
        record(&s).report.filter(|r| r.phase == Phase::RolledBack)
    });
    assert!(report.reason.contains("health gate timed out"), "{}", report.reason);
    assert!(report.reason.contains("API server"), "{}", report.reason);
    wait_for(T, "the version before to run in the same process", || {
        running_version(&s).filter(|v| *v == lichen::version::version())
    });
    assert_eq!(exe(agent.pid()), std::fs::canonicalize(lichen_bin()).expect("canonical"));
    assert_eq!(record(&s).committed, None);
    assert!(agent.stop().0.success());
}
