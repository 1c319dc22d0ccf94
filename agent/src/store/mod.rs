//! The agent's durable memory: pods (desired spec, last observed status, restart counts) and modules
//! (content-addressed by sha256), behind the [`StateStore`] trait.
//!
//! The store records; it never decides. Callers write a pod before they start it, so that whatever
//! the agent has acknowledged survives `kill -9` and power loss. The sled implementation lives in
//! [`sled_store`]; tests and later backends implement the same trait.

pub mod inputs;
mod sled_store;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use sled_store::SledStore;

/// Opens the sled store on a blocking thread: sled recovers its log on open, which can take a
/// while on a slow SD card, and must not hold a runtime thread.
pub async fn open_off_reactor(path: PathBuf) -> Result<std::sync::Arc<SledStore>, StoreError> {
    let p = path.clone();
    tokio::task::spawn_blocking(move || SledStore::open(&p))
        .await
        .map_err(|e| StoreError::Io { path, source: std::io::Error::other(e) })?
        .map(std::sync::Arc::new)
}

/// The schema this build writes. Bump it with a migration in `sled_store::MIGRATIONS`.
pub const SCHEMA_VERSION: u32 = 1;

/// Errors from the state store. Each names the store's path and what the operator can do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The directory could not be created or opened for writing.
    #[error(
        "cannot use the state directory {path}: permission denied; run lichen as the user that owns \
         it, or give it that user (for the packaged service: chown -R lichen:lichen {path})"
    )]
    PermissionDenied {
        /// The state directory.
        path: PathBuf,
    },
    /// Another process holds the store's lock.
    #[error(
        "the state store {path} is in use by another process; is another lichen running? \
         (stop it, or give this one its own --state-dir)"
    )]
    Locked {
        /// The store directory.
        path: PathBuf,
    },
    /// The on-disk data could not be read back.
    #[error(
        "the state store {path} is corrupt ({detail}); move it aside (mv {path} {path}.corrupt) and \
         start again: static pods come back from their manifests, cluster pods from the API server"
    )]
    Corrupt {
        /// The store directory.
        path: PathBuf,
        /// What was found.
        detail: String,
    },
    /// The store was written by a newer Lichen.
    #[error(
        "the state store {path} has schema version {found}, but this lichen understands up to \
         {supported}; run the newer lichen again, or move the store aside to start afresh"
    )]
    TooNew {
        /// The store directory.
        path: PathBuf,
        /// The version on disk.
        found: u32,
        /// [`SCHEMA_VERSION`].
        supported: u32,
    },
    /// A migration from an older schema failed.
    #[error("migrating the state store {path} from schema {from}: {source}")]
    Migration {
        /// The store directory.
        path: PathBuf,
        /// The version migrated from.
        from: u32,
        /// What failed.
        #[source]
        source: MigrationError,
    },
    /// Any other I/O failure (disk full, device gone).
    #[error("state store {path}: {source}")]
    Io {
        /// The store directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Why a migration of the store to the next schema failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// This build has no migration from that schema (a gap in `MIGRATIONS`).
    #[error("no migration registered")]
    Missing,
    /// sled failed while the records were rewritten.
    #[error("{0}")]
    Sled(#[from] sled::Error),
    /// A record could not be read in its old form or written in its new one.
    #[error("record {key}: {source}")]
    Record {
        /// The record's key.
        key: String,
        /// What serde said.
        #[source]
        source: serde_json::Error,
    },
}

/// A module's content address: the sha256 of its bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ModuleDigest(pub [u8; 32]);

impl ModuleDigest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        ModuleDigest(Sha256::digest(bytes).into())
    }

    /// Lower-case hex without the `sha256:` prefix.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses `sha256:<64 hex>` or the bare hex.
    pub fn parse(s: &str) -> Option<Self> {
        let hex = s.strip_prefix("sha256:").unwrap_or(s);
        if hex.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
            let s = std::str::from_utf8(chunk).ok()?;
            out[i] = u8::from_str_radix(s, 16).ok()?;
        }
        Some(ModuleDigest(out))
    }
}

impl fmt::Display for ModuleDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for ModuleDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Where a pod came from: the API server, or a static manifest file. Stored as the string older
/// builds wrote (`api:`, `file:<path>`), so a store written before this type existed reads the
/// same.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PodSource {
    /// Bound to this node by the API server.
    Api,
    /// A static pod manifest.
    File(PathBuf),
}

/// The two kinds of [`PodSource`], for the code that treats every pod of one kind alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceKind {
    /// Cluster pods: reported to the API server.
    Api,
    /// Static pods: only this node knows them.
    Static,
}

impl PodSource {
    /// Which kind of source this is.
    pub fn kind(&self) -> SourceKind {
        match self {
            PodSource::Api => SourceKind::Api,
            PodSource::File(_) => SourceKind::Static,
        }
    }

    /// Whether the API server owns this pod.
    pub fn is_api(&self) -> bool {
        self.kind() == SourceKind::Api
    }
}

impl fmt::Display for PodSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PodSource::Api => f.write_str("api:"),
            PodSource::File(path) => write!(f, "file:{}", path.display()),
        }
    }
}

/// A source string that is neither `api:` nor `file:<path>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown pod source {0:?} (expected api: or file:<path>)")]
pub struct UnknownSource(pub String);

impl std::str::FromStr for PodSource {
    type Err = UnknownSource;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "api:" {
            Ok(PodSource::Api)
        } else if let Some(path) = s.strip_prefix("file:").filter(|p| !p.is_empty()) {
            Ok(PodSource::File(PathBuf::from(path)))
        } else {
            Err(UnknownSource(s.to_owned()))
        }
    }
}

impl Serialize for PodSource {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PodSource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Everything the agent remembers about one pod.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PodRecord {
    /// `namespace/name`.
    pub key: String,
    /// The pod's UID; a pod recreated under the same name has a new one.
    pub uid: String,
    /// Where the pod came from.
    pub source: PodSource,
    /// The desired `v1.Pod` as JSON.
    pub pod: serde_json::Value,
    /// The last `v1.PodStatus` observed, as JSON.
    pub status: Option<serde_json::Value>,
    /// Restarts per container name, carried across agent restarts.
    pub restart_counts: BTreeMap<String, u32>,
    /// The ConfigMaps, Secrets and tokens fetched for it, so it can start again offline. Kept in the
    /// store, which is private to the agent's user, as the kubelet keeps them on the node.
    #[serde(default)]
    pub inputs: Option<inputs::PodInputs>,
}

/// What the store keeps about a cached module besides its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleInfo {
    /// The content address.
    pub digest: ModuleDigest,
    /// Size in bytes.
    pub size: u64,
    /// Where it was last loaded from.
    pub source: String,
    /// When a container last started from it (Unix seconds): the cache evicts the least recent.
    #[serde(default)]
    pub last_used: i64,
    /// Sizes of its precompiled artifacts, by engine key.
    #[serde(default)]
    pub artifacts: BTreeMap<String, u64>,
}

impl ModuleInfo {
    /// Bytes the module and its artifacts take in the cache.
    pub fn total_size(&self) -> u64 {
        self.size + self.artifacts.values().sum::<u64>()
    }
}

/// The durable store's operations. Implementations must make `put_pod`, `delete_pod` and
/// `put_module` durable before returning; status writes may be batched by the store's own flusher.
pub trait StateStore: Send + Sync + 'static {
    /// Inserts or replaces a pod record and flushes it to disk.
    fn put_pod(&self, record: &PodRecord) -> Result<(), StoreError>;
    /// Updates only the observed status and restart counts of a pod (not flushed synchronously).
    /// Ignored if the stored pod has a different UID, so a late write never lands on a newer pod.
    fn put_pod_status(
        &self,
        key: &str,
        uid: &str,
        status: &serde_json::Value,
        restart_counts: &BTreeMap<String, u32>,
    ) -> Result<(), StoreError>;
    /// The record stored under `key`.
    fn get_pod(&self, key: &str) -> Result<Option<PodRecord>, StoreError>;
    /// Every pod record, ordered by key.
    fn list_pods(&self) -> Result<Vec<PodRecord>, StoreError>;
    /// Removes a pod record (if its UID matches) and flushes.
    fn delete_pod(&self, key: &str, uid: &str) -> Result<(), StoreError>;
    /// Stores module bytes under their digest and flushes; storing the same bytes again is a no-op.
    fn put_module(&self, bytes: &[u8], source: &str) -> Result<ModuleDigest, StoreError>;
    /// Module bytes by digest, verified against it.
    fn get_module(&self, digest: &ModuleDigest) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every cached module.
    fn list_modules(&self) -> Result<Vec<ModuleInfo>, StoreError>;
    /// Records that a container started from the module now (not flushed synchronously).
    fn touch_module(&self, digest: &ModuleDigest, now: i64) -> Result<(), StoreError>;
    /// Removes a module, its artifacts and every image reference resolved to it, and flushes.
    /// Returns whether it was cached.
    fn remove_module(&self, digest: &ModuleDigest) -> Result<bool, StoreError>;
    /// Stores the precompiled artifact of a cached module for one engine, with a checksum, and
    /// flushes. Ignored if the module is not cached (it was removed meanwhile).
    fn put_artifact(&self, digest: &ModuleDigest, engine: &str, bytes: &[u8]) -> Result<(), StoreError>;
    /// The precompiled artifact for `engine`, verified against its checksum; a damaged one is
    /// dropped and reported as absent.
    fn get_artifact(&self, digest: &ModuleDigest, engine: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Remembers that the image reference `image` resolved to `digest`, and flushes.
    fn put_image_ref(&self, image: &str, digest: &ModuleDigest) -> Result<(), StoreError>;
    /// What `image` last resolved to, if that module is still cached.
    fn get_image_ref(&self, image: &str) -> Result<Option<ModuleDigest>, StoreError>;
    /// Every remembered image reference and its digest.
    fn list_image_refs(&self) -> Result<Vec<(String, ModuleDigest)>, StoreError>;
    /// Writes everything buffered to disk.
    fn flush(&self) -> Result<(), StoreError>;
    /// The schema version on disk.
    fn schema_version(&self) -> u32;
    /// Pod record writes (puts, status updates, deletes) since the store was opened: what a status
    /// change costs the disk.
    fn pod_writes(&self) -> u64 {
        0
    }
    /// Adds an entry to the MQTT spool under `seq`, without flushing: the spool's group commit calls
    /// [`StateStore::flush`]. The spool's tree is only created by the first spool call, so a node
    /// without MQTT never has one.
    fn spool_put(&self, spool: SpoolTree, seq: u64, entry: &[u8]) -> Result<(), StoreError>;
    /// Removes a spool entry (not flushed); returns its size if it was there.
    fn spool_remove(&self, spool: SpoolTree, seq: u64) -> Result<Option<usize>, StoreError>;
    /// Up to `limit` spool entries with a sequence number above `after` (all if `None`), in order.
    fn spool_range(
        &self,
        spool: SpoolTree,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;
}

/// Which MQTT spool: each is a tree of its own, with its own sequence numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpoolTree {
    /// Messages for the upstream broker (`mqtt.broker`).
    Upstream = 0,
    /// Gateway mode: messages from upstream for the local broker.
    Local = 1,
}

impl SpoolTree {
    /// How logs and `lichen status` name it.
    pub fn name(self) -> &'static str {
        match self {
            SpoolTree::Upstream => "upstream",
            SpoolTree::Local => "local",
        }
    }
}
