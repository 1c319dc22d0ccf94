//! Modules as images: what a container's `image:` names ([`mod@reference`]), the credentials to fetch it
//! ([`auth`]), the network fetch ([`fetch`]) and the content-addressed cache in the store, with
//! precompiled artifacts for this engine and garbage collection under a byte budget.
//!
//! [`ModuleCache`] is the one door: a pod worker asks it to [`resolve`](ModuleCache::resolve) an
//! image (pulling in the background under a concurrency limit, honouring the pull policy) and then
//! to [`load`](ModuleCache::load) the digest. It never decides container states; the worker maps its
//! errors to `ErrImagePull`, `ImagePullBackOff` and `ErrImageNeverPull`.

pub mod auth;
pub mod commands;
pub mod fetch;
pub mod reference;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ModulesConfig;
use crate::runtime::{Outcome, PreparedModule, WasmRuntime};
use crate::store::{ModuleDigest, ModuleInfo, StateStore, StoreError};
pub use auth::{Credential, PullCredentials, PullSecretError};
pub use commands::{ArtifactError, ModuleCommandError};
pub use fetch::{Fetcher, FetcherError};
pub use reference::{ImageOrigin, ModuleSource, ReferenceError, parse_image};

/// Why a module could not be fetched. Cloneable, because one pull answers every container
/// waiting for the same image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PullError {
    /// `imagePullPolicy: Never` and the module is not cached.
    #[error(
        "image is not present with pull policy of Never; add it with `lichen modules pull` or change the policy"
    )]
    NeverPull,
    /// The registry or server says the reference does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The registry refused the credentials (or their absence).
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// The artifact is not a WebAssembly module.
    #[error("not a Wasm module artifact: {0}")]
    NotWasm(String),
    /// The module is bigger than `modules.max_module_size`.
    #[error("module is {size} bytes, over the node's limit of {limit} bytes (modules.max_module_size)")]
    TooLarge {
        /// Size announced or received so far.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The bytes received do not have the digest they were announced with.
    #[error(
        "digest mismatch: expected {expected}, received {actual}; the download was corrupted or tampered with"
    )]
    DigestMismatch {
        /// What the manifest or reference names.
        expected: ModuleDigest,
        /// What arrived.
        actual: ModuleDigest,
    },
    /// The registry or server could not be reached or failed (retried; a cached copy may stand in).
    #[error("registry unreachable: {0}")]
    Network(String),
    /// The agent is shutting down; the pull was abandoned.
    #[error("pull abandoned: the agent is stopping")]
    Cancelled,
    /// The pull took longer than `modules.pull_timeout_secs`.
    #[error("pull timed out after {0}s (modules.pull_timeout_secs)")]
    Timeout(u64),
    /// The registry answered something else that is wrong.
    #[error("registry error: {0}")]
    Registry(String),
    /// A local module file could not be read.
    #[error("{0}")]
    File(String),
    /// The store could not keep the module.
    #[error("cannot cache the module: {0}")]
    Store(String),
}

impl PullError {
    /// Whether the failure says nothing about the image itself (the network, the registry's
    /// health): then a cached copy of the same reference may stand in.
    pub fn is_transient(&self) -> bool {
        matches!(self, PullError::Network(_) | PullError::Timeout(_) | PullError::Cancelled)
    }
}

impl From<StoreError> for PullError {
    fn from(e: StoreError) -> Self {
        PullError::Store(e.to_string())
    }
}

/// An `imagePullPolicy` Kubernetes does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not one of Always, IfNotPresent, Never")]
pub struct UnknownPullPolicy(pub String);

/// `imagePullPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullPolicy {
    /// Check the registry at every container start; a cached copy stands in while it is unreachable.
    Always,
    /// Pull only if no copy is cached.
    IfNotPresent,
    /// Never pull.
    Never,
}

impl PullPolicy {
    /// The policy as written, or the Kubernetes default: `Always` for `:latest` or no tag,
    /// otherwise `IfNotPresent`.
    pub fn from_spec(written: Option<&str>, image: &str) -> Result<Self, UnknownPullPolicy> {
        match written {
            Some("Always") => Ok(PullPolicy::Always),
            Some("IfNotPresent") => Ok(PullPolicy::IfNotPresent),
            Some("Never") => Ok(PullPolicy::Never),
            Some(other) => Err(UnknownPullPolicy(other.to_owned())),
            None => {
                let name = image.rsplit('/').next().unwrap_or(image);
                let untagged = !name.contains(':') && !image.contains('@');
                Ok(if untagged || image.ends_with(":latest") {
                    PullPolicy::Always
                } else {
                    PullPolicy::IfNotPresent
                })
            }
        }
    }
}

/// How a reference was resolved, for the `Pulled` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Cached already; nothing was fetched.
    Present(ModuleDigest),
    /// Fetched now.
    Pulled {
        /// The module's digest.
        digest: ModuleDigest,
        /// How long the pull took (including waiting for a pull slot).
        took: Duration,
        /// Module size in bytes.
        size: u64,
    },
    /// The registry was unreachable; the copy cached for this reference stands in.
    Stale {
        /// The cached module's digest.
        digest: ModuleDigest,
        /// Why the pull failed.
        error: PullError,
    },
    /// A local file (read at every start, as files change in place).
    File(ModuleDigest),
}

impl Resolution {
    /// The module to run.
    pub fn digest(&self) -> ModuleDigest {
        match self {
            Resolution::Present(d) | Resolution::File(d) => *d,
            Resolution::Pulled { digest, .. } | Resolution::Stale { digest, .. } => *digest,
        }
    }
}

type PullFuture = Shared<BoxFuture<'static, Result<(ModuleDigest, u64), PullError>>>;

/// What a garbage collection removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    /// Modules removed.
    pub removed: Vec<ModuleDigest>,
    /// Bytes freed.
    pub freed: u64,
    /// Bytes the cache holds afterwards.
    pub remaining: u64,
}

/// The module cache and puller. One per agent, shared by every pod worker.
pub struct ModuleCache {
    store: Arc<dyn StateStore>,
    runtime: Arc<WasmRuntime>,
    fetcher: Fetcher,
    config: ModulesConfig,
    slots: Arc<Semaphore>,
    inflight: Mutex<HashMap<String, PullFuture>>,
    /// One load (deserialize or compile) per module at a time, by digest; entries live while a
    /// load is under way or awaited.
    loading: Mutex<HashMap<ModuleDigest, Arc<tokio::sync::Mutex<()>>>>,
    /// Pulls run as tasks of the agent's shutdown tree: tracked, and abandoned when it is cancelled.
    tasks: TaskTracker,
    cancel: CancellationToken,
    /// Woken after each pull, which may have pushed the cache over its budget.
    gc_wake: Arc<tokio::sync::Notify>,
}

/// Garbage collection also runs this often, to catch what a pod's removal left unused.
const GC_INTERVAL: Duration = Duration::from_secs(600);

impl ModuleCache {
    /// The cache over `store`, compiling for `runtime`'s engine. Pulls run on `tasks` and stop
    /// when `cancel` fires.
    pub fn new(
        store: Arc<dyn StateStore>,
        runtime: Arc<WasmRuntime>,
        config: &ModulesConfig,
        tasks: &TaskTracker,
        cancel: &CancellationToken,
    ) -> Result<Arc<Self>, FetcherError> {
        Ok(Arc::new(ModuleCache {
            store,
            runtime,
            fetcher: Fetcher::new(config)?,
            slots: Arc::new(Semaphore::new(config.concurrent_pulls.max(1) as usize)),
            config: config.clone(),
            inflight: Mutex::new(HashMap::new()),
            loading: Mutex::new(HashMap::new()),
            gc_wake: Arc::new(tokio::sync::Notify::new()),
            tasks: tasks.clone(),
            cancel: cancel.child_token(),
        }))
    }

    /// Finds or fetches the module `source` names, following `policy`.
    pub async fn resolve(
        &self,
        source: &ModuleSource,
        policy: PullPolicy,
        credentials: &PullCredentials,
    ) -> Result<Resolution, PullError> {
        if let ModuleSource::File(path) = source {
            return self.read_file(path).await.map(Resolution::File);
        }
        let key = source.cache_key();
        let cached = self
            .blocking({
                let key = key.clone();
                move |s| s.get_image_ref(&key)
            })
            .await?;
        match (policy, cached) {
            (PullPolicy::Never, Some(d)) | (PullPolicy::IfNotPresent, Some(d)) => {
                return Ok(Resolution::Present(d));
            }
            // A digest names content that cannot change: checking the registry would only add a
            // way to fail.
            (PullPolicy::Always, Some(d)) if source.is_pinned() => return Ok(Resolution::Present(d)),
            (PullPolicy::Never, None) => return Err(PullError::NeverPull),
            _ => {}
        }
        let started = Instant::now();
        match self.pull_shared(source, credentials).await {
            Ok((digest, size)) => {
                if cached == Some(digest) {
                    Ok(Resolution::Present(digest))
                } else {
                    Ok(Resolution::Pulled { digest, took: started.elapsed(), size })
                }
            }
            Err(error) if error.is_transient() => match cached {
                Some(digest) => Ok(Resolution::Stale { digest, error }),
                None => Err(error),
            },
            Err(e) => Err(e),
        }
    }

    /// Joins a pull of the same reference with the same credentials already under way, or starts one.
    async fn pull_shared(
        &self,
        source: &ModuleSource,
        credentials: &PullCredentials,
    ) -> Result<(ModuleDigest, u64), PullError> {
        let credential = match source {
            ModuleSource::Oci(r) => credentials.for_registry(r.resolve_registry()).cloned(),
            _ => None,
        };
        let key = format!("{}\0{}", source.cache_key(), credential_id(credential.as_ref()));
        let future = {
            let mut inflight =
                self.inflight.lock().map_err(|_| PullError::Store("pull table poisoned".into()))?;
            // A finished pull nobody collected (its pods went away) must not answer a new one.
            inflight.retain(|_, f| f.peek().is_none());
            match inflight.get(&key) {
                Some(f) => f.clone(),
                None => {
                    // The pull runs as its own task: if every pod waiting for it goes away, it still
                    // finishes (bounded by the pull timeout) and frees its slot, rather than holding
                    // a slot while nobody polls it.
                    let pull = self.pull_task(source.clone(), credential);
                    let cancel = self.cancel.clone();
                    let task = self.tasks.spawn(async move {
                        tokio::select! {
                            r = pull => r,
                            _ = cancel.cancelled() => Err(PullError::Cancelled),
                        }
                    });
                    let f = async move {
                        task.await.unwrap_or_else(|e| Err(PullError::Store(format!("pull task: {e}"))))
                    }
                    .boxed()
                    .shared();
                    inflight.insert(key.clone(), f.clone());
                    f
                }
            }
        };
        let result = future.clone().await;
        if let Ok(mut inflight) = self.inflight.lock()
            && inflight.get(&key).is_some_and(|f| f.ptr_eq(&future))
        {
            inflight.remove(&key);
        }
        result
    }

    fn pull_task(
        &self,
        source: ModuleSource,
        credential: Option<Credential>,
    ) -> impl std::future::Future<Output = Result<(ModuleDigest, u64), PullError>> + Send + 'static {
        let slots = self.slots.clone();
        let fetcher = self.fetcher.clone();
        let store = self.store.clone();
        let timeout = Duration::from_secs(self.config.pull_timeout_secs);
        let gc_wake = self.gc_wake.clone();
        let runtime = self.runtime.clone();
        async move {
            let _slot = slots.acquire_owned().await.map_err(|_| PullError::Store("puller closed".into()))?;
            let started = std::time::Instant::now();
            let result = Self::pull_into_cache(source, credential, fetcher, store, timeout, runtime).await;
            crate::metrics::global().pull_finished(started.elapsed(), result.is_ok());
            if result.is_ok() {
                gc_wake.notify_one();
            }
            result
        }
    }

    /// Fetches, validates and stores one module (the body of a pull task, timed by its caller).
    async fn pull_into_cache(
        source: ModuleSource,
        credential: Option<Credential>,
        fetcher: Fetcher,
        store: Arc<dyn StateStore>,
        timeout: Duration,
        runtime: Arc<WasmRuntime>,
    ) -> Result<(ModuleDigest, u64), PullError> {
        {
            let description = source.describe();
            let fetch = async {
                match &source {
                    ModuleSource::Oci(r) => fetcher.pull_oci(r, credential.as_ref()).await,
                    ModuleSource::Url { url, digest } => {
                        fetcher.pull_url(url, *digest).await.map(|b| (b, *digest))
                    }
                    ModuleSource::File(_) => Err(PullError::File("files are not pulled".into())),
                }
            };
            let (bytes, digest) = tokio::time::timeout(timeout, fetch)
                .await
                .map_err(|_| PullError::Timeout(timeout.as_secs()))??;
            // Bytes that are not WebAssembly never enter the cache (validation is far cheaper than
            // compiling; the compiler runs when a container starts).
            let bytes = tokio::task::spawn_blocking(move || runtime.validate(&bytes).map(|()| bytes))
                .await
                .map_err(|e| PullError::Store(e.to_string()))?
                .map_err(|e| {
                    PullError::NotWasm(format!("the layer is not a valid WebAssembly module: {e}"))
                })?;
            let size = bytes.len() as u64;
            // Verified bytes only reach the store; the reference is recorded after them, so a crash
            // in between leaves an unreferenced module that GC removes, never a dangling reference.
            tokio::task::spawn_blocking(move || {
                let stored = store.put_module(&bytes, &description)?;
                debug_assert_eq!(stored, digest);
                store.put_image_ref(&description, &digest)
            })
            .await
            .map_err(|e| PullError::Store(e.to_string()))??;
            tracing::info!(image = %source.describe(), module = %digest, size, "pulled module");
            Ok((digest, size))
        }
    }

    async fn read_file(&self, path: &std::path::Path) -> Result<ModuleDigest, PullError> {
        let meta = tokio::fs::metadata(path)
            .await
            .map_err(|e| PullError::File(format!("cannot read module {}: {e}", path.display())))?;
        if meta.len() > self.config.max_module_size.0 {
            return Err(PullError::TooLarge { size: meta.len(), limit: self.config.max_module_size.0 });
        }
        let bytes = tokio::fs::read(path)
            .await
            .map_err(|e| PullError::File(format!("cannot read module {}: {e}", path.display())))?;
        let source = format!("file://{}", path.display());
        // The store fsyncs a new module; keep that off the reactor. An unchanged file costs lookups.
        // The reference is recorded so the module counts as in use while a pod names the file.
        self.blocking(move |s| {
            let digest = s.put_module(&bytes, &source)?;
            s.put_image_ref(&source, &digest)?;
            Ok::<_, StoreError>(digest)
        })
        .await
    }

    /// Compiles (or loads the cached precompiled artifact of) a cached module, and marks it used.
    pub async fn load(&self, digest: ModuleDigest) -> Result<PreparedModule, LoadFailure> {
        let now = jiff::Timestamp::now().as_second();
        // Recency is advisory (GC order); it is not worth an fsync.
        let _ = self.blocking(move |s| s.touch_module(&digest, now)).await;
        if let Some(m) = self.runtime.cached(&digest) {
            return Ok(m);
        }
        // Pods of one module starting together load it once: the first loads, the others wait and
        // find it compiled in memory. Loaded side by side, 100 pods took 100 blocking threads and
        // 100 copies of the artifact and its machine code at once.
        let gate = self
            .loading
            .lock()
            .map_err(|_| LoadFailure::Unavailable("module load table poisoned".into()))?
            .entry(digest)
            .or_default()
            .clone();
        let held = gate.lock().await;
        let loaded = match self.runtime.cached(&digest) {
            Some(m) => Ok(m),
            None => self.load_uncached(digest).await,
        };
        drop(held);
        drop(gate);
        if let Ok(mut loading) = self.loading.lock() {
            // Handles are cloned under this lock, so an entry only the table holds has nobody
            // loading or waiting (a waiting pod that was stopped drops its handle too).
            loading.retain(|_, g| Arc::strong_count(g) > 1);
        }
        loaded
    }

    /// [`ModuleCache::load`] of a module not in memory: its precompiled artifact if it has a usable
    /// one, a compile otherwise.
    async fn load_uncached(&self, digest: ModuleDigest) -> Result<PreparedModule, LoadFailure> {
        let engine = self.runtime.engine_key().to_owned();
        let artifact = self
            .blocking(move |s| s.get_artifact(&digest, &engine))
            .await
            .map_err(|e| LoadFailure::Unavailable(e.to_string()))?;
        if let Some(artifact) = artifact {
            match self.runtime.prepare_precompiled(digest, artifact).await {
                Ok(m) => return Ok(m),
                // Wasmtime refused it (a changed CPU feature set, say): compile afresh below.
                Err(o) => {
                    tracing::warn!(module = %digest, error = %o.message().unwrap_or_default(), "precompiled artifact unusable; recompiling")
                }
            }
        }
        let bytes = self
            .blocking(move |s| s.get_module(&digest))
            .await
            .map_err(|e| LoadFailure::Unavailable(e.to_string()))?
            .ok_or_else(|| LoadFailure::Unavailable(format!("module {digest} is no longer cached")))?;
        let (module, artifact) =
            self.runtime.prepare(digest, bytes.into()).await.map_err(LoadFailure::Invalid)?;
        if let Some(artifact) = artifact {
            let engine = self.runtime.engine_key().to_owned();
            if let Err(e) = self.blocking(move |s| s.put_artifact(&digest, &engine, &artifact)).await {
                tracing::warn!(module = %digest, error = %e, "cannot cache the precompiled artifact");
            }
        }
        Ok(module)
    }

    /// Removes least recently used modules until the cache fits `modules.cache_size`, sparing
    /// every module a pod on this node uses (running or not) and every module compiled in memory.
    pub async fn collect_garbage(&self) -> Result<GcReport, StoreError> {
        let budget = self.config.cache_size.0;
        let store = self.store.clone();
        let config = self.config.clone();
        let loaded = self.runtime.compiled_digests();
        tokio::task::spawn_blocking(move || {
            let mut in_use: HashSet<ModuleDigest> =
                modules_in_use(store.as_ref(), &config)?.into_keys().collect();
            in_use.extend(loaded);
            gc(store.as_ref(), budget, &in_use)
        })
        .await
        .map_err(|e| StoreError::Io { path: Default::default(), source: std::io::Error::other(e) })?
    }

    /// Collects garbage after pulls and every [`GC_INTERVAL`] until `cancel`.
    pub async fn collect_garbage_periodically(self: Arc<Self>, cancel: tokio_util::sync::CancellationToken) {
        loop {
            match self.collect_garbage().await {
                Ok(r) if !r.removed.is_empty() => {
                    tracing::info!(
                        removed = r.removed.len(),
                        freed = r.freed,
                        remaining = r.remaining,
                        "module cache trimmed"
                    )
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "module cache garbage collection failed"),
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.gc_wake.notified() => {}
                _ = tokio::time::sleep(GC_INTERVAL) => {}
            }
        }
    }

    /// Every cached module.
    pub async fn list(&self) -> Result<Vec<ModuleInfo>, StoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.list_modules())
            .await
            .map_err(|e| StoreError::Io { path: Default::default(), source: std::io::Error::other(e) })?
    }

    async fn blocking<T: Send + 'static, E: Into<PullError> + Send + 'static>(
        &self,
        f: impl FnOnce(&dyn StateStore) -> Result<T, E> + Send + 'static,
    ) -> Result<T, PullError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref()).map_err(Into::into))
            .await
            .map_err(|e| PullError::Store(e.to_string()))?
    }
}

/// Why a resolved module could not be made ready to run.
#[derive(Debug)]
pub enum LoadFailure {
    /// The cache lost it (removed, damaged): resolve again.
    Unavailable(String),
    /// The bytes cannot run here.
    Invalid(Outcome),
}

/// Removes least recently used modules beyond `budget`, never one in `in_use`.
pub fn gc(
    store: &dyn StateStore,
    budget: u64,
    in_use: &HashSet<ModuleDigest>,
) -> Result<GcReport, StoreError> {
    let mut modules = store.list_modules()?;
    let mut total: u64 = modules.iter().map(ModuleInfo::total_size).sum();
    let mut report = GcReport::default();
    modules.sort_by_key(|m| (m.last_used, m.digest));
    for m in modules {
        if total <= budget {
            break;
        }
        if in_use.contains(&m.digest) {
            continue;
        }
        if store.remove_module(&m.digest)? {
            total = total.saturating_sub(m.total_size());
            report.freed += m.total_size();
            report.removed.push(m.digest);
        }
    }
    report.remaining = total;
    Ok(report)
}

/// The modules pods on this node use (running or not, static or from the cluster), each with the
/// pods using it: what garbage collection and `lichen modules rm` must spare.
pub fn modules_in_use(
    store: &dyn StateStore,
    config: &ModulesConfig,
) -> Result<HashMap<ModuleDigest, Vec<String>>, StoreError> {
    let mut used: HashMap<ModuleDigest, Vec<String>> = HashMap::new();
    for record in store.list_pods()? {
        let mut digests = HashSet::new();
        let static_dir = match &record.source {
            crate::store::PodSource::File(f) => f.parent().map(std::path::Path::to_path_buf),
            crate::store::PodSource::Api => None,
        };
        let origin = match &static_dir {
            Some(dir) => ImageOrigin::Static(dir),
            None => ImageOrigin::Cluster,
        };
        let spec = record.pod.get("spec");
        for list in ["initContainers", "containers"] {
            for c in spec.and_then(|s| s.get(list)).and_then(|l| l.as_array()).into_iter().flatten() {
                let image = c.get("image").and_then(|i| i.as_str()).unwrap_or("");
                if let Ok(source) = parse_image(image, origin, config)
                    && let Some(d) = store.get_image_ref(&source.cache_key())?
                {
                    digests.insert(d);
                }
            }
        }
        let status = record.status.as_ref();
        for list in ["initContainerStatuses", "containerStatuses"] {
            for c in status.and_then(|s| s.get(list)).and_then(|l| l.as_array()).into_iter().flatten() {
                if let Some(d) = c.get("imageID").and_then(|i| i.as_str()).and_then(ModuleDigest::parse) {
                    digests.insert(d);
                }
            }
        }
        for d in digests {
            used.entry(d).or_default().push(record.key.clone());
        }
    }
    Ok(used)
}

fn credential_id(c: Option<&Credential>) -> String {
    use sha2::Digest as _;
    let text = match c {
        None => return "anonymous".into(),
        Some(Credential::Basic { username, password }) => format!("basic\0{username}\0{password}"),
        Some(Credential::Bearer(t)) => format!("bearer\0{t}"),
    };
    ModuleDigest(sha2::Sha256::digest(text.as_bytes()).into()).hex()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;

    #[test]
    fn default_pull_policy_follows_kubernetes() {
        let p = |w: Option<&str>, i: &str| PullPolicy::from_spec(w, i).unwrap();
        assert_eq!(p(None, "registry.lan:5000/app"), PullPolicy::Always);
        assert_eq!(p(None, "registry.lan:5000/app:latest"), PullPolicy::Always);
        assert_eq!(p(None, "registry.lan:5000/app:1.2"), PullPolicy::IfNotPresent);
        assert_eq!(p(None, &format!("r/app@sha256:{}", "a".repeat(64))), PullPolicy::IfNotPresent);
        assert_eq!(p(Some("Never"), "r/app:latest"), PullPolicy::Never);
        assert!(PullPolicy::from_spec(Some("Sometimes"), "x").is_err());
    }

    #[test]
    fn gc_evicts_least_recently_used_but_never_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let a = store.put_module(&[1u8; 1000], "a").unwrap();
        let b = store.put_module(&[2u8; 1000], "b").unwrap();
        let c = store.put_module(&[3u8; 1000], "c").unwrap();
        store.put_artifact(&c, "engine", &[9u8; 500]).unwrap();
        store.touch_module(&a, 10).unwrap();
        store.touch_module(&b, 20).unwrap();
        store.touch_module(&c, 30).unwrap();
        store.put_image_ref("reg/a:1", &a).unwrap();
        // a is oldest but in use; b goes, then the cache (1000 + 1500) fits 2600.
        let report = gc(&store, 2600, &HashSet::from([a])).unwrap();
        assert_eq!(report.removed, vec![b]);
        assert_eq!(report.remaining, 2500);
        assert_eq!(store.get_module(&b).unwrap(), None);
        assert_eq!(store.get_image_ref("reg/a:1").unwrap(), Some(a));
        // Over budget with everything in use: nothing is removed.
        let report = gc(&store, 10, &HashSet::from([a, c])).unwrap();
        assert!(report.removed.is_empty());
        let report = gc(&store, 10, &HashSet::new()).unwrap();
        assert_eq!(report.removed, vec![a, c]);
        assert_eq!(store.get_image_ref("reg/a:1").unwrap(), None);
        assert_eq!(store.get_artifact(&c, "engine").unwrap(), None);
    }
}
