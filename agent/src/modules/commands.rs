//! `lichen modules list|pull|rm|prune|import`: the operator's view of the module cache. The same
//! code runs inside the agent (reached through the control socket while it runs) and in the CLI
//! process on the store directly (when no agent is running), so both answer alike.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Credential, ImageOrigin, ModuleCache, ModuleSource, PullCredentials, PullPolicy, parse_image};
use crate::store::{ModuleDigest, StateStore};

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
pub fn decode_artifact(bytes: &[u8]) -> Result<(ModuleDigest, String, &[u8]), String> {
    let bad = || "not an artifact written by `lichen compile`".to_string();
    let rest = bytes.strip_prefix(CWASM_MAGIC).ok_or_else(bad)?;
    let (&version, rest) = rest.split_first().ok_or_else(bad)?;
    if version != CWASM_VERSION {
        return Err(format!(
            "artifact format {version} is not understood by this lichen (it writes {CWASM_VERSION})"
        ));
    }
    let digest: [u8; 32] = rest.get(..32).and_then(|d| d.try_into().ok()).ok_or_else(bad)?;
    let len = rest.get(32..34).map(|l| u16::from_be_bytes([l[0], l[1]]) as usize).ok_or_else(bad)?;
    let key = rest.get(34..34 + len).ok_or_else(bad)?;
    let key = String::from_utf8(key.to_vec()).map_err(|_| bad())?;
    Ok((ModuleDigest(digest), key, &rest[34 + len..]))
}

impl ModuleCache {
    /// Runs one `lichen modules` command; the text is what the operator sees.
    pub async fn command(&self, cmd: ModuleCommand) -> Result<String, String> {
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
        f: impl FnOnce(&dyn StateStore, &crate::config::ModulesConfig) -> Result<T, String> + Send + 'static,
    ) -> Result<T, String> {
        let store = self.store.clone();
        let config = self.config.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref(), &config)).await.map_err(|e| e.to_string())?
    }

    async fn cmd_list(&self) -> Result<String, String> {
        let (mut modules, refs, used) = self
            .on_store(|s, c| {
                let e = |e: crate::store::StoreError| e.to_string();
                Ok((
                    s.list_modules().map_err(e)?,
                    s.list_image_refs().map_err(e)?,
                    super::modules_in_use(s, c).map_err(e)?,
                ))
            })
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
    ) -> Result<String, String> {
        let source = parse_image(image, ImageOrigin::Static(base), &self.config)?;
        let mut creds = PullCredentials::default();
        if let (ModuleSource::Oci(r), Some(username)) = (&source, username) {
            let password = password.unwrap_or_default();
            creds.push(r.resolve_registry(), Credential::Basic { username, password });
        }
        let resolution =
            self.resolve(&source, PullPolicy::Always, &creds).await.map_err(|e| e.to_string())?;
        let digest = resolution.digest();
        self.load(digest).await.map_err(|e| match e {
            super::LoadFailure::Invalid(o) => {
                format!("pulled {digest}, but it cannot run: {}", o.message().unwrap_or_default())
            }
            super::LoadFailure::Unavailable(e) => e,
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

    async fn cmd_remove(&self, target: &str, force: bool) -> Result<String, String> {
        let target = target.to_owned();
        let base = std::env::current_dir().unwrap_or_default();
        self.on_store(move |s, c| {
            let e = |e: crate::store::StoreError| e.to_string();
            let hex = target.strip_prefix("sha256:").unwrap_or(&target).to_ascii_lowercase();
            let by_digest: Vec<ModuleDigest> = if hex.len() >= 6 && hex.bytes().all(|b| b.is_ascii_hexdigit())
            {
                s.list_modules()
                    .map_err(e)?
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
                    let source = parse_image(&target, ImageOrigin::Static(&base), c).map_err(|_| {
                        format!("{target:?} is neither a cached digest nor an image reference")
                    })?;
                    s.get_image_ref(&source.cache_key())
                        .map_err(e)?
                        .ok_or_else(|| format!("{target:?} is not in the cache"))?
                }
                many => {
                    return Err(format!(
                        "{target:?} matches {} modules; give more of the digest",
                        many.len()
                    ));
                }
            };
            let used = super::modules_in_use(s, c).map_err(e)?;
            if let Some(pods) = used.get(&digest)
                && !force
            {
                return Err(format!(
                    "{digest} is used by pod(s) {}; remove them first, or pass --force",
                    pods.join(", ")
                ));
            }
            match s.remove_module(&digest).map_err(e)? {
                true => Ok(format!("removed {digest}\n")),
                false => Err(format!("{digest} is not in the cache")),
            }
        })
        .await
    }

    async fn cmd_prune(&self, all: bool) -> Result<String, String> {
        self.on_store(move |s, c| {
            let e = |e: crate::store::StoreError| e.to_string();
            let used: HashSet<ModuleDigest> = super::modules_in_use(s, c).map_err(e)?.into_keys().collect();
            let budget = if all { 0 } else { c.cache_size.0 };
            let report = super::gc(s, budget, &used).map_err(e)?;
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
    ) -> Result<String, String> {
        // As read, like a pod's file image: `.wat` text stays text, and the digest is of these bytes.
        let bytes =
            tokio::fs::read(wasm).await.map_err(|e| format!("cannot read {}: {e}", wasm.display()))?;
        let digest = ModuleDigest::of(&bytes);
        let artifact = match precompiled {
            None => None,
            Some(p) => {
                let file =
                    tokio::fs::read(p).await.map_err(|e| format!("cannot read {}: {e}", p.display()))?;
                let (for_module, key, artifact) =
                    decode_artifact(&file).map_err(|e| format!("{}: {e}", p.display()))?;
                if for_module != digest {
                    return Err(format!(
                        "{} was compiled from module {for_module}, not from {} ({digest})",
                        p.display(),
                        wasm.display()
                    ));
                }
                if key != self.runtime.engine_key() {
                    return Err(format!(
                        "{} was compiled for engine {key}, but this board runs {}: compile it with the same \
                         lichen version and the board's --target",
                        p.display(),
                        self.runtime.engine_key()
                    ));
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
            let e = |e: crate::store::StoreError| e.to_string();
            s.put_module(&bytes, &source).map_err(e)?;
            if let Some(a) = &artifact {
                s.put_artifact(&digest, &engine, a).map_err(e)?;
            }
            if let Some(key) = &image_key {
                s.put_image_ref(key, &digest).map_err(e)?;
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
            let _ = self.on_store(move |s, _| s.remove_module(&digest).map_err(|e| e.to_string())).await;
            return Err(format!("{} cannot run here: {why}", wasm.display()));
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
        assert!(decode_artifact(b"\x7fELF").unwrap_err().contains("lichen compile"));
        assert!(decode_artifact(&file[..20]).is_err());
    }
}
