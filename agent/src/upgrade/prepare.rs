//! Readies a new agent for the switch, or says why it cannot be: the image resolved for this
//! platform (a few KiB), its signature checked before anything large is fetched, the binary downloaded
//! (resuming, retried while the registry is away), checked (ELF for this machine, the version the
//! artifact claims) and smoke-tested (it starts and answers `lichen version` for this
//! architecture), then staged beside the committed version, older ones removed.
//!
//! Nothing here switches: the upgrader records the trial and hands over once this succeeds.

use std::path::PathBuf;
use std::time::Duration;

use super::artifact::{ArtifactError, Platform, digest_hex};
use super::registry::{AgentRegistry, UpgradeFetchError, parse_reference};
use super::signature::{KeyError, TrustedKeys};
use super::slots::{SlotError, Slots};
use crate::config::{ModulesConfig, UpgradeConfig};
use crate::retry::RetryBackoff;

/// The largest agent binary downloaded (a debug build is about 100 MiB; a release one 14).
pub const MAX_AGENT_SIZE: u64 = 256 << 20;
/// How long the smoke test's `lichen version` may take (Wasmtime's start-up on a slow board).
const SMOKE_TIMEOUT: Duration = Duration::from_secs(60);
/// Attempts at a download the registry keeps interrupting before the upgrade fails.
const DOWNLOAD_ATTEMPTS: u32 = 8;

/// A staged binary: where it is, its sha256 (hex) and version.
#[derive(Debug, Clone)]
pub struct Staged {
    /// The staged binary.
    pub binary: PathBuf,
    /// Its sha256, hex.
    pub digest: String,
    /// Its version.
    pub version: String,
}

/// Why a new agent cannot be readied; the reason written on the Node.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// The trusted keys cannot be read.
    #[error("upgrade.trusted_keys: {0}")]
    Keys(#[source] KeyError),
    /// This machine has no agent platform.
    #[error("this machine ({0}) is not a platform agent images are built for")]
    Platform(&'static str),
    /// The registry, the signature or the artifact failed.
    #[error(transparent)]
    Fetch(#[from] UpgradeFetchError),
    /// The downloaded binary is not for this machine.
    #[error("the downloaded binary: {0}")]
    Binary(#[source] ArtifactError),
    /// The binary is not the version its artifact claims.
    #[error("the downloaded binary is {found}, but the image says {claimed}")]
    WrongVersion {
        /// What the artifact's config says.
        claimed: String,
        /// What the binary holds (`None`: not a Lichen binary).
        found: String,
    },
    /// The smoke test failed.
    #[error("smoke test (`lichen version`) failed: {0}")]
    Smoke(String),
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The binary could not be staged.
    #[error(transparent)]
    Stage(#[from] SlotError),
    /// A blocking task failed.
    #[error("internal task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
}

/// What is known of the new agent when preparing it failed, for the report.
#[derive(Debug)]
pub struct Failure {
    /// Why.
    pub error: PrepareError,
    /// The new agent's version, if the artifact was read that far.
    pub version: Option<String>,
}

impl Failure {
    /// The version, if known.
    pub fn version(&self) -> Option<String> {
        self.version.clone()
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

/// Readies `image` (pinned by digest) for the switch.
pub async fn prepare(
    image: &str,
    upgrade: &UpgradeConfig,
    modules: &ModulesConfig,
    slots: &Slots,
) -> Result<Staged, Failure> {
    let mut version = None;
    prepare_inner(image, upgrade, modules, slots, &mut version)
        .await
        .map_err(|error| Failure { error, version })
}

async fn prepare_inner(
    image: &str,
    upgrade: &UpgradeConfig,
    modules: &ModulesConfig,
    slots: &Slots,
    version: &mut Option<String>,
) -> Result<Staged, PrepareError> {
    let paths = upgrade.trusted_keys.clone();
    let keys = tokio::task::spawn_blocking(move || TrustedKeys::load(&paths))
        .await
        .map_err(PrepareError::Task)?
        .map_err(PrepareError::Keys)?;
    let platform = Platform::current().ok_or(PrepareError::Platform(std::env::consts::ARCH))?;
    let registry = AgentRegistry::new(modules)?;
    let reference = parse_reference(image)?;
    // The image first (its index, this platform's manifest and config: a few KiB), so that a
    // missing image or one without this platform says so; then trust, before anything large.
    let resolved = registry.resolve(&reference, platform, None).await?;
    registry.verify_signature(&reference, &keys, None).await?;
    *version = Some(resolved.version.clone());
    let hex = digest_hex(&resolved.binary_digest).unwrap_or_default().to_owned();
    let staged = slots.binary(&hex);
    let binary = if staged.is_file() {
        // Staged by an attempt a kill interrupted: verified then, and staged files are only ever
        // renamed into place whole.
        staged
    } else {
        let downloaded = download(&registry, &resolved, slots).await?;
        check(&downloaded, platform, &resolved.version).await?;
        let slots2 = slots.clone();
        let hex2 = hex.clone();
        tokio::task::spawn_blocking(move || slots2.stage(&downloaded, &hex2))
            .await
            .map_err(PrepareError::Task)??
    };
    smoke_test(&binary, &resolved.version).await?;
    // At most two versions on disk: the committed one (the way back) and this one.
    let keep_committed = slots.load().ok().and_then(|r| r.committed).map(|c| c.digest);
    let mut keep = vec![hex.as_str()];
    if let Some(c) = keep_committed.as_deref() {
        keep.push(c);
    }
    slots.prune(&keep);
    Ok(Staged { binary, digest: hex, version: resolved.version })
}

/// Downloads, retrying (and resuming) while the registry is away or cuts the transfer.
async fn download(
    registry: &AgentRegistry,
    resolved: &super::registry::Resolved,
    slots: &Slots,
) -> Result<PathBuf, PrepareError> {
    let mut backoff = RetryBackoff::new(Duration::from_secs(2), Duration::from_secs(60));
    let mut attempt = 1;
    loop {
        match registry.download(resolved, &slots.download_dir(), MAX_AGENT_SIZE, None).await {
            Ok(path) => return Ok(path),
            Err(e) if e.is_retryable() && attempt < DOWNLOAD_ATTEMPTS => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, attempt, retry_in_ms = delay.as_millis() as u64, "agent download interrupted; resuming");
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The binary is an executable for this machine, of the version the artifact claims.
async fn check(path: &std::path::Path, platform: Platform, claimed: &str) -> Result<(), PrepareError> {
    let p = path.to_owned();
    let bytes = tokio::task::spawn_blocking(move || std::fs::read(&p))
        .await
        .map_err(PrepareError::Task)?
        .map_err(|source| PrepareError::Read { path: path.to_owned(), source })?;
    platform.check_binary(&bytes).map_err(PrepareError::Binary)?;
    match crate::version::read_version(&bytes) {
        Some(found) if found == claimed => Ok(()),
        found => Err(PrepareError::WrongVersion {
            claimed: claimed.to_owned(),
            found: found.unwrap_or_else(|| "not a lichen binary".into()),
        }),
    }
}

/// Runs `binary version`: it must start and name the claimed version and this architecture.
async fn smoke_test(binary: &std::path::Path, version: &str) -> Result<(), PrepareError> {
    let binary = binary.to_owned();
    let out = tokio::task::spawn_blocking(move || run_with_timeout(&binary, SMOKE_TIMEOUT))
        .await
        .map_err(PrepareError::Task)??;
    let wants = [format!("lichen {version}"), format!("arch {}", std::env::consts::ARCH)];
    match wants.iter().find(|w| !out.lines().any(|l| l.trim() == w.as_str())) {
        None => Ok(()),
        Some(missing) => {
            Err(PrepareError::Smoke(format!("it did not print {missing:?} (it printed {:?})", out.trim())))
        }
    }
}

/// `binary version`'s stdout, if it exits successfully within `timeout` (killed otherwise).
fn run_with_timeout(binary: &std::path::Path, timeout: Duration) -> Result<String, PrepareError> {
    use std::io::Read;
    let mut child = std::process::Command::new(binary)
        .arg("version")
        .env_remove(super::slots::SLOT_ENV)
        .env_remove(super::slots::LAUNCHER_ENV)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| PrepareError::Smoke(format!("cannot start it: {e}")))?;
    let started = std::time::Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() < timeout => std::thread::sleep(Duration::from_millis(50)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(PrepareError::Smoke(format!("no answer within {}s", timeout.as_secs())));
            }
            Err(e) => return Err(PrepareError::Smoke(format!("cannot wait for it: {e}"))),
        }
    };
    // `lichen version` prints three short lines: they fit in the pipe before the exit.
    let (mut out, mut err) = (String::new(), String::new());
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    if !status.success() {
        return Err(PrepareError::Smoke(format!("it exited with {status}: {}", err.trim())));
    }
    Ok(out)
}
