//! The agent's versions on disk and the record of a switch between them: what runs when systemd
//! starts `lichen run`, decided before anything else opens (the store, the runtime).
//!
//! The packaged binary (`/usr/bin/lichen`, the `.deb`'s) is the launcher: systemd always starts it,
//! and it `exec`s the version the record names. Upgraded binaries live in the state directory
//! (`agent/versions/<sha256>/lichen`, at most two), because the unit's `ProtectSystem=strict` leaves
//! only that writable and `apt` owns `/usr/bin`. The record (`agent/upgrade.json`) is a small JSON
//! file replaced atomically (written aside, synced, renamed, directory synced), not a store entry:
//! the launcher must read it before the store is opened, and any version, older or newer, must read
//! it. A power cut leaves either the old record or the new one.
//!
//! A new agent gets one boot on trial. The old agent records the trial, stops, and `exec`s the
//! launcher, which marks the trial booted and `exec`s it; if it dies before its health gate commits
//! it (a crash, the systemd watchdog, a power cut), the next start finds a trial already booted and
//! rolls back. This file is pure decisions over the record
//! plus the few file operations; the `exec` itself is [`exec_slot`].

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Phase, UpgradeReport};
use crate::layout::StateLayout;

/// The environment variable naming the slot (binary digest) a process was `exec`ed as.
pub const SLOT_ENV: &str = "LICHEN_AGENT_SLOT";
/// The environment variable naming the launcher (the packaged binary) a slot returns to.
pub const LAUNCHER_ENV: &str = "LICHEN_AGENT_LAUNCHER";
/// The most versions kept on disk: the committed one and the one before it (or the one on trial).
pub const KEEP_VERSIONS: usize = 2;

/// Why the record or a version could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// A file operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The record is not valid JSON of the expected shape.
    #[error("{} is unreadable ({source}); the packaged agent runs until the next upgrade rewrites it", path.display())]
    Corrupt {
        /// The record file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SlotError + use<> {
    let path = path.to_owned();
    move |source| SlotError::Io { what, path, source }
}

/// One staged agent binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Slot {
    /// The `lichen.dev/agent-image` value it came from.
    pub image: String,
    /// The binary's sha256, hex.
    pub digest: String,
    /// Its version (`lichen version`).
    pub version: String,
}

/// A new agent on trial.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Trial {
    /// The new agent.
    pub slot: Slot,
    /// How many times it has been started. It gets one start: a second means it died on trial.
    pub boots: u32,
    /// Whether the agent before it had contact with the API server (then the gate asks for it).
    pub had_contact: bool,
    /// The version it replaces, for the reports.
    pub from_version: String,
}

/// The switch's record (`agent/upgrade.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SwitchRecord {
    /// The upgraded agent systemd starts (through the launcher); none: the packaged binary runs.
    pub committed: Option<Slot>,
    /// A new agent on trial.
    pub trial: Option<Trial>,
    /// An image that failed and is not tried again until the annotation changes.
    pub refused: Option<String>,
    /// The last upgrade's outcome.
    pub report: Option<UpgradeReport>,
    /// Whether `report` still has to be written to the Node (and its events recorded).
    pub report_pending: bool,
}

/// Who this process is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// The packaged binary, started by systemd (or by hand).
    Launcher,
    /// A staged version, `exec`ed as the slot with this digest.
    Slot(String),
}

impl Identity {
    /// From the environment ([`SLOT_ENV`]).
    pub fn from_env() -> Self {
        match std::env::var(SLOT_ENV) {
            Ok(d) if !d.is_empty() => Identity::Slot(d),
            _ => Identity::Launcher,
        }
    }
}

/// What a starting agent does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launch {
    /// Run this binary, as the committed version (or the packaged one).
    Run,
    /// Run this binary on trial: pass the health gate within the timeout, then commit.
    RunTrial(Trial),
    /// `exec` a staged version.
    Exec(Slot),
}

/// The decision at start: what runs, and how the record changes. Pure: `exists` says whether a
/// slot's binary is on disk, `packaged` is the launcher's own version, `now` the time for reports.
pub fn decide(
    record: &mut SwitchRecord,
    me: &Identity,
    packaged: &str,
    exists: impl Fn(&Slot) -> bool,
    now: &str,
) -> Launch {
    if let Identity::Slot(digest) = me {
        if let Some(trial) = record.trial.as_ref().filter(|t| &t.slot.digest == digest) {
            return Launch::RunTrial(trial.clone());
        }
        // The committed version, or one exec'ed by an agent whose record has moved on: it is a
        // whole, verified binary either way.
        return Launch::Run;
    }
    if let Some(trial) = record.trial.take() {
        if trial.boots == 0 && exists(&trial.slot) {
            let mut trial = trial;
            trial.boots = 1;
            record.trial = Some(trial.clone());
            return Launch::Exec(trial.slot);
        }
        let reason = if exists(&trial.slot) {
            format!(
                "the new agent {} stopped before passing its health gate (it crashed, was killed by the \
                 watchdog or by hand, or the board lost power); {} runs again",
                trial.slot.version, trial.from_version
            )
        } else {
            format!(
                "the staged binary of {} is missing; {} runs again",
                trial.slot.version, trial.from_version
            )
        };
        record.refused = Some(trial.slot.image.clone());
        record.report = Some(UpgradeReport {
            image: trial.slot.image.clone(),
            phase: Phase::RolledBack,
            version: Some(trial.slot.version.clone()),
            reason,
            at: now.to_owned(),
        });
        record.report_pending = true;
    }
    match record.committed.clone() {
        // A newer package (`apt upgrade`) wins over an older upgraded version: the operator's
        // last deliberate act on the board.
        Some(slot) if newer(packaged, &slot.version) => {
            record.committed = None;
            Launch::Run
        }
        Some(slot) if exists(&slot) => Launch::Exec(slot),
        Some(_) => {
            record.committed = None;
            Launch::Run
        }
        None => Launch::Run,
    }
}

/// Whether version `a` is newer than `b`, comparing the numeric `major.minor.patch` (a build id
/// after `+` or a pre-release after `-` does not count).
pub fn newer(a: &str, b: &str) -> bool {
    fn parts(v: &str) -> Vec<u64> {
        v.split(['+', '-']).next().unwrap_or("").split('.').map(|p| p.parse().unwrap_or(0)).collect()
    }
    parts(a) > parts(b)
}

/// The agent's files under the state directory.
#[derive(Debug, Clone)]
pub struct Slots {
    dir: PathBuf,
}

impl Slots {
    /// The slots of the state directory `layout`.
    pub fn new(layout: &StateLayout) -> Self {
        Slots { dir: layout.agent() }
    }

    fn record_path(&self) -> PathBuf {
        self.dir.join("upgrade.json")
    }

    /// Where downloads in progress live.
    pub fn download_dir(&self) -> PathBuf {
        self.dir.join("download")
    }

    /// The staged binary of `digest`.
    pub fn binary(&self, digest: &str) -> PathBuf {
        self.dir.join("versions").join(digest).join("lichen")
    }

    /// Whether `slot`'s binary is on disk. A digest that is not 64 hex digits names no slot: the
    /// record never sends the launcher outside `versions/`.
    pub fn exists(&self, slot: &Slot) -> bool {
        super::artifact::is_sha256_hex(&slot.digest) && self.binary(&slot.digest).is_file()
    }

    /// The record; an absent file is an empty record.
    pub fn load(&self) -> Result<SwitchRecord, SlotError> {
        let path = self.record_path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| SlotError::Corrupt { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(SwitchRecord::default()),
            Err(e) => Err(io("cannot read", &path)(e)),
        }
    }

    /// Replaces the record atomically and durably.
    pub fn save(&self, record: &SwitchRecord) -> Result<(), SlotError> {
        let path = self.record_path();
        let bytes = serde_json::to_vec_pretty(record)
            .map_err(|source| SlotError::Corrupt { path: path.clone(), source })?;
        write_durably(&self.dir, &path, &bytes)
    }

    /// Moves a verified download into its slot, executable, synced; returns the binary's path.
    pub fn stage(&self, downloaded: &Path, digest: &str) -> Result<PathBuf, SlotError> {
        use std::os::unix::fs::PermissionsExt;
        let target = self.binary(digest);
        let dir = target.parent().unwrap_or(&self.dir).to_owned();
        std::fs::create_dir_all(&dir).map_err(io("cannot create", &dir))?;
        std::fs::set_permissions(downloaded, std::fs::Permissions::from_mode(0o755))
            .map_err(io("cannot make executable", downloaded))?;
        sync_file(downloaded)?;
        std::fs::rename(downloaded, &target).map_err(io("cannot stage", &target))?;
        sync_dir(&dir)?;
        Ok(target)
    }

    /// Removes every staged version but `keep` (digests), and downloads other than `keep`'s.
    pub fn prune(&self, keep: &[&str]) {
        let versions = self.dir.join("versions");
        let Ok(entries) = std::fs::read_dir(&versions) else { return };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !keep.contains(&name.as_str())
                && let Err(err) = std::fs::remove_dir_all(e.path())
            {
                tracing::warn!(path = %e.path().display(), error = %err, "cannot remove an old agent version");
            }
        }
    }

    /// The digests of the staged versions.
    pub fn staged(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.dir.join("versions")) else { return Vec::new() };
        let mut v: Vec<String> =
            entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }
}

/// Writes `bytes` to `path` so that a power cut leaves the old file or the new one: a sibling
/// temporary file, synced, renamed over, and the directory synced.
fn write_durably(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), SlotError> {
    use std::io::Write;
    std::fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io("cannot create", &tmp))?;
    f.write_all(bytes).map_err(io("cannot write", &tmp))?;
    f.sync_all().map_err(io("cannot sync", &tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io("cannot replace", path))?;
    sync_dir(dir)
}

fn sync_file(path: &Path) -> Result<(), SlotError> {
    std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(io("cannot sync", path))
}

fn sync_dir(dir: &Path) -> Result<(), SlotError> {
    std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(io("cannot sync", dir))
}

/// Replaces this process with `binary`, run with this process's arguments as slot `digest`, the
/// launcher remembered for a way back. Returns only if the `exec` failed.
pub fn exec_slot(binary: &Path, digest: &str, launcher: &Path) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "lichen".into());
    std::process::Command::new(binary)
        .arg0(arg0)
        .args(args)
        .env(SLOT_ENV, digest)
        .env(LAUNCHER_ENV, launcher)
        .exec()
}

/// Replaces this process with the launcher (the packaged binary), to run what the record says.
/// Returns only if the `exec` failed.
pub fn exec_launcher(launcher: &Path) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "lichen".into());
    std::process::Command::new(launcher)
        .arg0(arg0)
        .args(args)
        .env_remove(SLOT_ENV)
        .env_remove(LAUNCHER_ENV)
        .exec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(d: &str, v: &str) -> Slot {
        Slot { image: format!("reg/agent@sha256:{d}"), digest: d.into(), version: v.into() }
    }

    fn trial(d: &str, v: &str, boots: u32) -> Trial {
        Trial { slot: slot(d, v), boots, had_contact: true, from_version: "0.1.0".into() }
    }

    const NOW: &str = "2026-12-06T15:00:00Z";

    #[test]
    fn the_launcher_runs_itself_with_no_record_and_the_committed_version_with_one() {
        let mut r = SwitchRecord::default();
        assert_eq!(decide(&mut r, &Identity::Launcher, "0.1.0", |_| true, NOW), Launch::Run);
        r.committed = Some(slot("bb", "0.2.0"));
        assert_eq!(
            decide(&mut r, &Identity::Launcher, "0.1.0", |_| true, NOW),
            Launch::Exec(slot("bb", "0.2.0"))
        );
        assert_eq!(decide(&mut r, &Identity::Slot("bb".into()), "0.1.0", |_| true, NOW), Launch::Run);
    }

    #[test]
    fn a_trial_gets_one_boot_and_a_second_start_rolls_back() {
        let mut r = SwitchRecord {
            committed: Some(slot("aa", "0.1.5")),
            trial: Some(trial("bb", "0.2.0", 0)),
            ..Default::default()
        };
        // Started before the old agent exec'ed it (a power cut right after staging): boot it now.
        assert_eq!(
            decide(&mut r, &Identity::Launcher, "0.1.0", |_| true, NOW),
            Launch::Exec(slot("bb", "0.2.0"))
        );
        assert_eq!(r.trial.as_ref().map(|t| t.boots), Some(1));
        assert_eq!(
            decide(&mut r, &Identity::Slot("bb".into()), "0.1.0", |_| true, NOW),
            Launch::RunTrial(trial("bb", "0.2.0", 1))
        );
        // It died on trial: the launcher starts again, and the committed version runs.
        assert_eq!(
            decide(&mut r, &Identity::Launcher, "0.1.0", |_| true, NOW),
            Launch::Exec(slot("aa", "0.1.5"))
        );
        assert_eq!(r.trial, None);
        assert_eq!(r.refused.as_deref(), Some("reg/agent@sha256:bb"));
        let report = r.report.clone().expect("report");
        assert_eq!(report.phase, Phase::RolledBack);
        assert!(report.reason.contains("before passing its health gate"), "{}", report.reason);
        assert!(r.report_pending);
    }

    #[test]
    fn a_rollback_without_a_committed_version_runs_the_packaged_one() {
        let mut r = SwitchRecord { trial: Some(trial("bb", "0.2.0", 1)), ..Default::default() };
        assert_eq!(decide(&mut r, &Identity::Launcher, "0.1.0", |_| true, NOW), Launch::Run);
        assert_eq!(r.report.map(|r| r.phase), Some(Phase::RolledBack));
    }

    #[test]
    fn a_missing_binary_is_never_exec_ed() {
        let mut r = SwitchRecord { trial: Some(trial("bb", "0.2.0", 0)), ..Default::default() };
        assert_eq!(decide(&mut r, &Identity::Launcher, "0.1.0", |_| false, NOW), Launch::Run);
        assert!(r.report.expect("report").reason.contains("missing"));
        let mut r = SwitchRecord { committed: Some(slot("aa", "0.2.0")), ..Default::default() };
        assert_eq!(decide(&mut r, &Identity::Launcher, "0.1.0", |_| false, NOW), Launch::Run);
        assert_eq!(r.committed, None);
    }

    #[test]
    fn a_newer_package_wins_over_an_older_upgrade() {
        let mut r = SwitchRecord { committed: Some(slot("aa", "0.2.0+ci.3")), ..Default::default() };
        assert_eq!(decide(&mut r, &Identity::Launcher, "0.3.0", |_| true, NOW), Launch::Run);
        assert_eq!(r.committed, None);
        let mut r = SwitchRecord { committed: Some(slot("aa", "0.2.0+ci.3")), ..Default::default() };
        assert_eq!(
            decide(&mut r, &Identity::Launcher, "0.2.0", |_| true, NOW),
            Launch::Exec(slot("aa", "0.2.0+ci.3"))
        );
        assert!(newer("0.10.0", "0.9.9") && !newer("0.2.0+b", "0.2.0") && !newer("0.1.0", "0.2.0"));
    }

    #[test]
    fn the_record_survives_a_torn_write_and_is_replaced_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let slots = Slots::new(&StateLayout::new(dir.path()));
        assert_eq!(slots.load().expect("empty"), SwitchRecord::default());
        let r = SwitchRecord { committed: Some(slot("aa", "0.2.0")), ..Default::default() };
        slots.save(&r).expect("save");
        // A power cut mid-write leaves a partial temporary file beside the record: never read.
        std::fs::write(dir.path().join("agent/upgrade.json.tmp"), b"{\"committed\":").expect("torn");
        assert_eq!(slots.load().expect("load"), r);
        std::fs::write(dir.path().join("agent/upgrade.json"), b"{not json").expect("corrupt");
        assert!(matches!(slots.load(), Err(SlotError::Corrupt { .. })));
    }

    #[test]
    fn staging_and_pruning_keep_what_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let slots = Slots::new(&StateLayout::new(dir.path()));
        for d in ["aa", "bb", "cc"] {
            let f = dir.path().join(format!("{d}.part"));
            std::fs::write(&f, d).expect("write");
            let staged = slots.stage(&f, d).expect("stage");
            assert!(staged.is_file());
        }
        assert_eq!(slots.staged(), ["aa", "bb", "cc"]);
        // Only a sha256 names a slot the launcher may exec.
        assert!(!slots.exists(&slot("aa", "0.2.0")), "not a digest");
        let traversal = Slot { image: "x".into(), digest: "../../../bin".into(), version: "0".into() };
        assert!(!slots.exists(&traversal));
        slots.prune(&["bb", "cc"]);
        assert_eq!(slots.staged(), ["bb", "cc"]);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(slots.binary("bb")).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
    }
}
