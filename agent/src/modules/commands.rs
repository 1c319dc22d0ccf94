//! `lichen modules list|pull|rm|prune|import`: the operator's view of the module cache. The same
//! code runs inside the agent (reached through the control socket while it runs) and in the CLI
//! process on the store directly (when no agent is running), so both answer alike.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{
    Credential, ImageOrigin, ModuleCache, ModuleSource, PullCredentials, PullError, PullPolicy,
    ReferenceError, parse_image,
};
use crate::store::{ModuleDigest, StateStore, StoreError};

/// Why a `lichen modules` command failed: the text the operator reads.
#[derive(Debug, thiserror::Error)]
pub enum ModuleCommandError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The image is not one this node can use.
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    /// The pull failed.
    #[error(transparent)]
    Pull(#[from] PullError),
    /// The command's blocking task failed.
    #[error("{0}")]
    Task(#[source] tokio::task::JoinError),
    /// The module was pulled but cannot run on this engine.
    #[error("pulled {digest}, but it cannot run: {reason}")]
    Unrunnable {
        /// The module.
        digest: ModuleDigest,
        /// What the engine said.
        reason: String,
    },
    /// The cache lost the module it just resolved.
    #[error("{0}")]
    Unavailable(String),
    /// `rm` was given something that is neither a digest nor a reference.
    #[error("{target:?} is neither a cached digest nor an image reference")]
    NotATarget {
        /// What was given.
        target: String,
        /// Why it is not a reference.
        #[source]
        source: ReferenceError,
    },
    /// `rm` was given a reference the cache does not know.
    #[error("{0:?} is not in the cache")]
    NotCached(String),
    /// The module vanished before it could be removed.
    #[error("{0} is not in the cache")]
    Gone(ModuleDigest),
    /// A digest prefix matching several modules.
    #[error("{target:?} matches {count} modules; give more of the digest")]
    Ambiguous {
        /// The prefix.
        target: String,
        /// How many it matches.
        count: usize,
    },
    /// `rm` without `--force` of a module pods use.
    #[error("{digest} is used by pod(s) {}; remove them first, or pass --force", .pods.join(", "))]
    InUse {
        /// The module.
        digest: ModuleDigest,
        /// The pods using it.
        pods: Vec<String>,
    },
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The artifact file is not one `lichen compile` wrote.
    #[error("{}: {source}", path.display())]
    Artifact {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: ArtifactError,
    },
    /// The artifact was compiled from another module.
    #[error("{} was compiled from module {compiled_from}, not from {} ({digest})", artifact.display(), wasm.display())]
    WrongModule {
        /// The artifact file.
        artifact: PathBuf,
        /// The module it was compiled from.
        compiled_from: ModuleDigest,
        /// The module file given with it.
        wasm: PathBuf,
        /// That module's digest.
        digest: ModuleDigest,
    },
    /// The artifact was compiled for another engine.
    #[error(
        "{} was compiled for engine {key}, but this board runs {engine}: compile it with the same \
         lichen version and the board's --target",
        artifact.display()
    )]
    WrongEngine {
        /// The artifact file.
        artifact: PathBuf,
        /// The engine it was compiled for.
        key: String,
        /// This agent's engine.
        engine: String,
    },
    /// The imported module cannot run on this engine.
    #[error("{} cannot run here: {reason}", wasm.display())]
    CannotRun {
        /// The module file.
        wasm: PathBuf,
        /// What the engine or cache said.
        reason: String,
    },
}

/// Why a file is not a usable `lichen compile` artifact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ArtifactError {
    /// Wrong magic or truncated.
    #[error("not an artifact written by `lichen compile`")]
    NotArtifact,
    /// Written by a lichen with another artifact format.
    #[error("artifact format {0} is not understood by this lichen (it writes {CWASM_VERSION})")]
    Version(u8),
}

/// One `lichen modules` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum ModuleCommand {
    /// Every cached module with its size, artifacts, references and users.
    List,
    /// Pull an image into the cache (and precompile it), ahead of the pods that need it.
    Pull {
        /// The image as a pod would name it.
        image: String,
        /// Registry user name (basic auth), if the registry needs one.
        username: Option<String>,
        /// Its password or access token.
        password: Option<String>,
        /// Directory relative file paths are taken from (the CLI's working directory).
        base: PathBuf,
    },
    /// Remove a module by digest (or unique digest prefix) or by an image reference.
    Remove {
        /// Digest, digest prefix, or image reference.
        target: String,
        /// Remove it even if pods on this node use it (they pull it again when they next start).
        force: bool,
    },
    /// Garbage-collect to the cache budget, or (`all`) remove every module no pod uses.
    Prune {
        /// Remove every unused module, not only what exceeds the budget.
        all: bool,
    },
    /// Add a local module, optionally with an artifact from `lichen compile`, under an image name.
    Import {
        /// The `.wasm` (or `.wat`) file.
        wasm: PathBuf,
        /// Its precompiled artifact, made by `lichen compile` for this board.
        precompiled: Option<PathBuf>,
        /// An image reference pods use for it (then `imagePullPolicy: Never` or `IfNotPresent` finds it).
        image: Option<String>,
    },
}

/// Magic at the start of a `lichen compile` artifact file.
const CWASM_MAGIC: &[u8; 8] = b"LICHENCW";
const CWASM_VERSION: u8 = 1;

/// Wraps Wasmtime's artifact with the module digest and engine key it belongs to, so an import can
/// check both before anything is deserialized.
pub fn encode_artifact(module: &ModuleDigest, engine_key: &str, artifact: &[u8]) -> Vec<u8> {
    let key = engine_key.as_bytes();
    let mut out = Vec::with_capacity(artifact.len() + 64 + key.len());
    out.extend_from_slice(CWASM_MAGIC);
    out.push(CWASM_VERSION);
    out.extend_from_slice(&module.0);
    out.extend_from_slice(&(key.len() as u16).to_be_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(artifact);
    out
}

/// The module digest, engine key and Wasmtime artifact of a `lichen compile` file.
pub fn decode_artifact(bytes: &[u8]) -> Result<(ModuleDigest, String, &[u8]), ArtifactError> {
    let bad = ArtifactError::NotArtifact;
    let rest = bytes.strip_prefix(CWASM_MAGIC).ok_or(bad)?;
    let (&version, rest) = rest.split_first().ok_or(bad)?;
    if version != CWASM_VERSION {
        return Err(ArtifactError::Version(version));
    }
    let digest: [u8; 32] = rest.get(..32).and_then(|d| d.try_into().ok()).ok_or(bad)?;
    let len = rest.get(32..34).map(|l| u16::from_be_bytes([l[0], l[1]]) as usize).ok_or(bad)?;
    let key = rest.get(34..34 + len).ok_or(bad)?;
    let key = String::from_utf8(key.to_vec()).map_err(|_| bad)?;
    Ok((ModuleDigest(digest), key, &rest[34 + len..]))
}

impl ModuleCache {
    /// Runs one `lichen modules` command; the text is what the operator sees.
    pub async fn command(&self, cmd: ModuleCommand) -> Result<String, ModuleCommandError> {
        match cmd {
            ModuleCommand::List => self.cmd_list().await,
            ModuleCommand::Pull { image, username, password, base } => {
                self.cmd_pull(&image, username, password, &base).await
            }
            ModuleCommand::Remove { target, force } => self.cmd_remove(&target, force).await,
            ModuleCommand::Prune { all } => self.cmd_prune(all).await,
            ModuleCommand::Import { wasm, precompiled, image } => {
                self.cmd_import(&wasm, precompiled.as_deref(), image.as_deref()).await
            }
        }
    }

    async fn on_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn StateStore, &crate::config::ModulesConfig) -> Result<T, ModuleCommandError>
        + Send
        + 'static,
    ) -> Result<T, ModuleCommandError> {
        let store = self.store.clone();
        let config = self.config.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref(), &config))
            .await
            .map_err(ModuleCommandError::Task)?
    }

    async fn cmd_list(&self) -> Result<String, ModuleCommandError> {
        let (mut modules, refs, used) = self
            .on_store(|s, c| Ok((s.list_modules()?, s.list_image_refs()?, super::modules_in_use(s, c)?)))
            .await?;
        modules.sort_by_key(|m| std::cmp::Reverse(m.last_used));
        let total: u64 = modules.iter().map(|m| m.total_size()).sum();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<19} {:>10} {:>10}  {:<20} IMAGES / USED BY",
            "DIGEST", "SIZE", "COMPILED", "LAST USED"
        );
        for m in &modules {
            let compiled: u64 = m.artifacts.get(self.runtime.engine_key()).copied().unwrap_or(0);
            let when = jiff::Timestamp::from_second(m.last_used)
                .map(|t| t.strftime("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_else(|_| "-".into());
            let images: Vec<&str> =
                refs.iter().filter(|(_, d)| *d == m.digest).map(|(r, _)| r.as_str()).collect();
            let users = used.get(&m.digest).map(|p| p.join(",")).unwrap_or_default();
            let _ = writeln!(
                out,
                "sha256:{:<12} {:>10} {:>10}  {:<20} {}{}",
                &m.digest.hex()[..12],
                m.size,
                if compiled > 0 { compiled.to_string() } else { "-".into() },
                when,
                if images.is_empty() { "-".to_string() } else { images.join(" ") },
                if users.is_empty() { String::new() } else { format!("  [used by {users}]") },
            );
        }
        let _ = writeln!(
            out,
            "{} module(s), {total} bytes of a {} byte budget (modules.cache_size)",
            modules.len(),
            self.config.cache_size.0
        );
        Ok(out)
    }

    async fn cmd_pull(
        &self,
        image: &str,
        username: Option<String>,
        password: Option<String>,
        base: &Path,
    ) -> Result<String, ModuleCommandError> {
        let source = parse_image(image, ImageOrigin::Static(base), &self.config)?;
        let mut creds = PullCredentials::default();
        if let (ModuleSource::Oci(r), Some(username)) = (&source, username) {
            let password = password.unwrap_or_default();
            creds.push(r.resolve_registry(), Credential::Basic { username, password });
        }
        let resolution = self.resolve(&source, PullPolicy::Always, &creds).await?;
        let digest = resolution.digest();
        self.load(digest).await.map_err(|e| match e {
            super::LoadFailure::Invalid(o) => {
                ModuleCommandError::Unrunnable { digest, reason: o.message().unwrap_or_default() }
            }
            super::LoadFailure::Unavailable(e) => ModuleCommandError::Unavailable(e),
        })?;
        let how = match resolution {
            super::Resolution::Pulled { took, size, .. } => {
                format!("pulled {size} bytes in {:.2}s", took.as_secs_f64())
            }
            super::Resolution::Stale { error, .. } => {
                format!("registry unreachable ({error}); cached copy kept")
            }
            _ => "already cached".into(),
        };
        Ok(format!(
            "{} -> {digest} ({how}); precompiled for {}\n",
            source.describe(),
            self.runtime.engine_key()
        ))
    }

    async fn cmd_remove(&self, target: &str, force: bool) -> Result<String, ModuleCommandError> {
        let target = target.to_owned();
        let base = std::env::current_dir().unwrap_or_default();
        self.on_store(move |s, c| {
            let hex = target.strip_prefix("sha256:").unwrap_or(&target).to_ascii_lowercase();
            let by_digest: Vec<ModuleDigest> = if hex.len() >= 6 && hex.bytes().all(|b| b.is_ascii_hexdigit())
            {
                s.list_modules()?
                    .into_iter()
                    .map(|m| m.digest)
                    .filter(|d| d.hex().starts_with(&hex))
                    .collect()
            } else {
                Vec::new()
            };
            let digest = match by_digest.as_slice() {
                [one] => *one,
                [] => {
                    let source = parse_image(&target, ImageOrigin::Static(&base), c).map_err(|source| {
                        ModuleCommandError::NotATarget { target: target.clone(), source }
                    })?;
                    s.get_image_ref(&source.cache_key())?
                        .ok_or_else(|| ModuleCommandError::NotCached(target.clone()))?
                }
                many => {
                    return Err(ModuleCommandError::Ambiguous { target: target.clone(), count: many.len() });
                }
            };
            let mut used = super::modules_in_use(s, c)?;
            if let Some(pods) = used.remove(&digest)
                && !force
            {
                return Err(ModuleCommandError::InUse { digest, pods });
            }
            match s.remove_module(&digest)? {
                true => Ok(format!("removed {digest}\n")),
                false => Err(ModuleCommandError::Gone(digest)),
            }
        })
        .await
    }

    async fn cmd_prune(&self, all: bool) -> Result<String, ModuleCommandError> {
        self.on_store(move |s, c| {
            let used: HashSet<ModuleDigest> = super::modules_in_use(s, c)?.into_keys().collect();
            let budget = if all { 0 } else { c.cache_size.0 };
            let report = super::gc(s, budget, &used)?;
            Ok(format!(
                "removed {} module(s), freed {} bytes; {} bytes remain\n",
                report.removed.len(),
                report.freed,
                report.remaining
            ))
        })
        .await
    }

    async fn cmd_import(
        &self,
        wasm: &Path,
        precompiled: Option<&Path>,
        image: Option<&str>,
    ) -> Result<String, ModuleCommandError> {
        // As read, like a pod's file image: `.wat` text stays text, and the digest is of these bytes.
        let bytes = tokio::fs::read(wasm)
            .await
            .map_err(|source| ModuleCommandError::Read { path: wasm.to_owned(), source })?;
        let digest = ModuleDigest::of(&bytes);
        let artifact = match precompiled {
            None => None,
            Some(p) => {
                let file = tokio::fs::read(p)
                    .await
                    .map_err(|source| ModuleCommandError::Read { path: p.to_owned(), source })?;
                let (for_module, key, artifact) = decode_artifact(&file)
                    .map_err(|source| ModuleCommandError::Artifact { path: p.to_owned(), source })?;
                if for_module != digest {
                    return Err(ModuleCommandError::WrongModule {
                        artifact: p.to_owned(),
                        compiled_from: for_module,
                        wasm: wasm.to_owned(),
                        digest,
                    });
                }
                if key != self.runtime.engine_key() {
                    return Err(ModuleCommandError::WrongEngine {
                        artifact: p.to_owned(),
                        key,
                        engine: self.runtime.engine_key().to_owned(),
                    });
                }
                Some(artifact.to_vec())
            }
        };
        let source = format!("file://{}", wasm.display());
        let image_key = match image {
            Some(i) => Some(parse_image(i, ImageOrigin::Static(Path::new("/")), &self.config)?.cache_key()),
            None => None,
        };
        let engine = self.runtime.engine_key().to_owned();
        let with_artifact = artifact.is_some();
        self.on_store(move |s, _| {
            s.put_module(&bytes, &source)?;
            if let Some(a) = &artifact {
                s.put_artifact(&digest, &engine, a)?;
            }
            if let Some(key) = &image_key {
                s.put_image_ref(key, &digest)?;
            }
            Ok(())
        })
        .await?;
        // Prove it loads (Wasmtime checks the artifact header against the engine), or compile it now.
        if let Err(e) = self.load(digest).await {
            let why = match e {
                super::LoadFailure::Invalid(o) => o.message().unwrap_or_default(),
                super::LoadFailure::Unavailable(e) => e,
            };
            let _ = self.on_store(move |s, _| Ok(s.remove_module(&digest)?)).await;
            return Err(ModuleCommandError::CannotRun { wasm: wasm.to_owned(), reason: why });
        }
        Ok(format!(
            "imported {} as {digest}{}{}\n",
            wasm.display(),
            image.map(|i| format!(" ({i})")).unwrap_or_default(),
            if with_artifact { ", with its precompiled artifact" } else { ", compiled now" }
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifact_files_round_trip_and_reject_garbage() {
        let d = ModuleDigest([7; 32]);
        let file = encode_artifact(&d, "wasmtime-48.0.8-abc", b"ELF...");
        let (digest, key, body) = decode_artifact(&file).unwrap();
        assert_eq!((digest, key.as_str(), body), (d, "wasmtime-48.0.8-abc", &b"ELF..."[..]));
        assert!(decode_artifact(b"\x7fELF").unwrap_err().to_string().contains("lichen compile"));
        assert!(decode_artifact(&file[..20]).is_err());
    }
}
