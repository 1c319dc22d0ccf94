//! [`StateStore`] on sled: one tree per record type and a `meta` tree for the schema version.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use super::{
    MigrationError, ModuleDigest, ModuleInfo, PodRecord, SCHEMA_VERSION, SpoolTree, StateStore, StoreError,
};

const PODS: &str = "pods";
const MODULES: &str = "modules";
const MODULE_INFO: &str = "module_info";
/// Precompiled artifacts: key = module digest ++ engine key, value = sha256 of the artifact ++ artifact.
const ARTIFACTS: &str = "artifacts";
/// Image references: key = the reference as written, value = the module digest it resolved to.
const IMAGE_REFS: &str = "image_refs";
/// The MQTT spool: key = sequence number (big-endian u64, so keys sort in order), value = the
/// encoded message (`telemetry::spool` owns the format).
const MQTT_SPOOL: &str = "mqtt_spool";
/// Gateway mode's spool towards the local broker, in the same format.
const MQTT_SPOOL_LOCAL: &str = "mqtt_spool_local";
const META: &str = "meta";
const SCHEMA_KEY: &str = "schema_version";
/// Module use is recorded at most this often (seconds) per module.
const TOUCH_RESOLUTION_SECS: i64 = 60;
/// File beside sled's own, present once the store has been initialised.
const MARKER: &str = "lichen-store";

/// A migration takes the store from schema `n` to `n + 1`; `MIGRATIONS[n - 1]` migrates from `n`.
type Migration = fn(&sled::Db) -> Result<(), MigrationError>;
const MIGRATIONS: &[Migration] = &[];

/// The sled-backed store. Cheap to clone; all clones share one database.
#[derive(Clone)]
pub struct SledStore {
    db: sled::Db,
    pods: sled::Tree,
    modules: sled::Tree,
    module_info: sled::Tree,
    artifacts: sled::Tree,
    image_refs: sled::Tree,
    path: PathBuf,
    schema: u32,
    pod_writes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    spool: std::sync::Arc<[std::sync::OnceLock<sled::Tree>; 2]>,
}

impl SledStore {
    /// Opens (or creates) the store in `dir`, migrating an older schema and refusing a newer one.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.to_owned();
        // Created private (with the state dir above it, when missing): the store holds pod specs,
        // secret-backed volumes' sources and the spool. Under systemd, StateDirectoryMode=0700 and
        // UMask=0077 say the same; this covers `lichen run` started by hand.
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&path)
                .map_err(|e| io_error(&path, e))?;
        }
        // sled's own flusher bounds how much unflushed status a crash can lose; durable writes flush
        // explicitly.
        let db = sled::Config::new()
            .path(&path)
            .flush_every_ms(Some(500))
            .cache_capacity(8 << 20)
            .open()
            .map_err(|e| sled_error(&path, e))?;
        let tree = |name: &str| db.open_tree(name).map_err(|e| sled_error(&path, e));
        let (pods, modules, module_info, meta) =
            (tree(PODS)?, tree(MODULES)?, tree(MODULE_INFO)?, tree(META)?);
        let (artifacts, image_refs) = (tree(ARTIFACTS)?, tree(IMAGE_REFS)?);
        // sled recovers a damaged log to its last consistent prefix without complaint, which can leave
        // an empty database. The marker, written once the store is initialised, tells that apart
        // from a new store.
        let marker = path.join(MARKER);
        let initialised = marker.exists();
        let schema = match meta.get(SCHEMA_KEY).map_err(|e| sled_error(&path, e))? {
            None if initialised => {
                return Err(StoreError::Corrupt {
                    path,
                    detail: "the database came back empty although it was initialised before: \
                             its files were damaged or removed"
                        .into(),
                });
            }
            None if pods.is_empty() && modules.is_empty() => {
                meta.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes()).map_err(|e| sled_error(&path, e))?;
                db.flush().map_err(|e| sled_error(&path, e))?;
                SCHEMA_VERSION
            }
            None => {
                return Err(StoreError::Corrupt { path, detail: "schema version missing".into() });
            }
            Some(v) => {
                let bytes: [u8; 4] = v.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                    path: path.clone(),
                    detail: "schema version unreadable".into(),
                })?;
                u32::from_be_bytes(bytes)
            }
        };
        if !initialised {
            write_marker(&marker).map_err(|e| io_error(&path, e))?;
        }
        if schema > SCHEMA_VERSION {
            return Err(StoreError::TooNew { path, found: schema, supported: SCHEMA_VERSION });
        }
        if schema == 0 {
            return Err(StoreError::Corrupt { path, detail: "schema version 0".into() });
        }
        for from in schema..SCHEMA_VERSION {
            let migrate = MIGRATIONS.get(from as usize - 1).ok_or_else(|| StoreError::Migration {
                path: path.clone(),
                from,
                source: MigrationError::Missing,
            })?;
            migrate(&db).map_err(|source| StoreError::Migration { path: path.clone(), from, source })?;
            meta.insert(SCHEMA_KEY, &(from + 1).to_be_bytes()).map_err(|e| sled_error(&path, e))?;
            db.flush().map_err(|e| sled_error(&path, e))?;
            tracing::info!(store = %path.display(), from, to = from + 1, "migrated state store");
        }
        Ok(SledStore {
            db,
            pods,
            modules,
            module_info,
            artifacts,
            image_refs,
            path,
            schema: SCHEMA_VERSION,
            pod_writes: Default::default(),
            spool: Default::default(),
        })
    }

    /// The directory the store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, e: sled::Error) -> StoreError {
        sled_error(&self.path, e)
    }

    fn decode<T: serde::de::DeserializeOwned>(&self, what: &str, bytes: &[u8]) -> Result<T, StoreError> {
        serde_json::from_slice(bytes)
            .map_err(|e| StoreError::Corrupt { path: self.path.clone(), detail: format!("{what}: {e}") })
    }

    fn encode<T: serde::Serialize>(&self, value: &T) -> Result<Vec<u8>, StoreError> {
        serde_json::to_vec(value).map_err(|e| io_error(&self.path, io::Error::other(e)))
    }

    fn count_pod_write(&self) {
        self.pod_writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(|e| self.err(e))
    }

    /// Read-modify-write of a module's info; `f` is not called if the module is not cached.
    fn update_info(&self, digest: &ModuleDigest, f: impl Fn(&mut ModuleInfo)) -> Result<(), StoreError> {
        loop {
            let Some(old) = self.module_info.get(digest.0).map_err(|e| self.err(e))? else { return Ok(()) };
            let mut info: ModuleInfo = self.decode("module info", &old)?;
            f(&mut info);
            let new = self.encode(&info)?;
            if self
                .module_info
                .compare_and_swap(digest.0, Some(old), Some(new))
                .map_err(|e| self.err(e))?
                .is_ok()
            {
                return Ok(());
            }
        }
    }

    /// The spool's tree, opened on first use (opening a tree writes to sled, and a node without
    /// MQTT must not pay for it).
    fn spool_tree(&self, spool: SpoolTree) -> Result<&sled::Tree, StoreError> {
        let slot = &self.spool[spool as usize];
        if let Some(t) = slot.get() {
            return Ok(t);
        }
        let name = match spool {
            SpoolTree::Upstream => MQTT_SPOOL,
            SpoolTree::Local => MQTT_SPOOL_LOCAL,
        };
        let tree = self.db.open_tree(name).map_err(|e| self.err(e))?;
        Ok(slot.get_or_init(|| tree))
    }

    fn artifact_key(digest: &ModuleDigest, engine: &str) -> Vec<u8> {
        let mut key = digest.0.to_vec();
        key.extend_from_slice(engine.as_bytes());
        key
    }
}

impl StateStore for SledStore {
    fn put_pod(&self, record: &PodRecord) -> Result<(), StoreError> {
        self.count_pod_write();
        let bytes = self.encode(record)?;
        self.pods.insert(record.key.as_bytes(), bytes).map_err(|e| self.err(e))?;
        self.sync()
    }

    fn put_pod_status(
        &self,
        key: &str,
        uid: &str,
        status: &serde_json::Value,
        restart_counts: &BTreeMap<String, u32>,
    ) -> Result<(), StoreError> {
        // Compare-and-swap so a concurrent put_pod or delete of a newer pod is never overwritten.
        loop {
            let Some(old) = self.pods.get(key.as_bytes()).map_err(|e| self.err(e))? else {
                return Ok(());
            };
            let mut record: PodRecord = self.decode(key, &old)?;
            if record.uid != uid {
                return Ok(());
            }
            record.status = Some(status.clone());
            record.restart_counts = restart_counts.clone();
            let new = self.encode(&record)?;
            self.count_pod_write();
            match self.pods.compare_and_swap(key.as_bytes(), Some(old), Some(new)).map_err(|e| self.err(e))? {
                Ok(()) => return Ok(()),
                Err(_) => continue,
            }
        }
    }

    fn get_pod(&self, key: &str) -> Result<Option<PodRecord>, StoreError> {
        match self.pods.get(key.as_bytes()).map_err(|e| self.err(e))? {
            Some(bytes) => Ok(Some(self.decode(key, &bytes)?)),
            None => Ok(None),
        }
    }

    fn list_pods(&self) -> Result<Vec<PodRecord>, StoreError> {
        self.pods
            .iter()
            .map(|kv| {
                let (k, v) = kv.map_err(|e| self.err(e))?;
                self.decode(&String::from_utf8_lossy(&k), &v)
            })
            .collect()
    }

    fn delete_pod(&self, key: &str, uid: &str) -> Result<(), StoreError> {
        if let Some(record) = self.get_pod(key)?
            && record.uid == uid
        {
            self.count_pod_write();
            self.pods.remove(key.as_bytes()).map_err(|e| self.err(e))?;
            self.sync()?;
        }
        Ok(())
    }

    fn put_module(&self, bytes: &[u8], source: &str) -> Result<ModuleDigest, StoreError> {
        let digest = ModuleDigest::of(bytes);
        let key = digest.0;
        // Starting a cached module must not cost an fsync.
        if self.modules.contains_key(key).map_err(|e| self.err(e))? {
            return Ok(digest);
        }
        self.modules.insert(key, bytes).map_err(|e| self.err(e))?;
        let info = ModuleInfo {
            digest,
            size: bytes.len() as u64,
            source: source.to_owned(),
            last_used: jiff::Timestamp::now().as_second(),
            artifacts: BTreeMap::new(),
        };
        self.module_info.insert(key, self.encode(&info)?).map_err(|e| self.err(e))?;
        self.sync()?;
        Ok(digest)
    }

    fn get_module(&self, digest: &ModuleDigest) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(bytes) = self.modules.get(digest.0).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        if ModuleDigest::of(&bytes) != *digest {
            // A damaged entry is dropped rather than served: the caller fetches the module again.
            tracing::warn!(store = %self.path.display(), %digest, "cached module failed its digest check; dropped");
            self.remove_module(digest)?;
            return Ok(None);
        }
        Ok(Some(bytes.to_vec()))
    }

    fn touch_module(&self, digest: &ModuleDigest, now: i64) -> Result<(), StoreError> {
        // Recency only orders garbage collection: a crash-looping container must not rewrite the
        // module's info (an SD card write) on every restart.
        if let Some(v) = self.module_info.get(digest.0).map_err(|e| self.err(e))? {
            let info: ModuleInfo = self.decode("module info", &v)?;
            if (now - info.last_used).abs() < TOUCH_RESOLUTION_SECS {
                return Ok(());
            }
        }
        self.update_info(digest, |i| i.last_used = now)
    }

    fn remove_module(&self, digest: &ModuleDigest) -> Result<bool, StoreError> {
        // Info first: a crash part-way leaves bytes without info, which list_modules does not show
        // and the next put_module of the same digest repairs; never info pointing at nothing.
        let existed = self.module_info.remove(digest.0).map_err(|e| self.err(e))?.is_some();
        let existed = self.modules.remove(digest.0).map_err(|e| self.err(e))?.is_some() || existed;
        for kv in self.artifacts.scan_prefix(digest.0) {
            let (k, _) = kv.map_err(|e| self.err(e))?;
            self.artifacts.remove(k).map_err(|e| self.err(e))?;
        }
        for kv in self.image_refs.iter() {
            let (k, v) = kv.map_err(|e| self.err(e))?;
            if v.as_ref() == digest.0 {
                self.image_refs.remove(k).map_err(|e| self.err(e))?;
            }
        }
        self.sync()?;
        Ok(existed)
    }

    fn put_artifact(&self, digest: &ModuleDigest, engine: &str, bytes: &[u8]) -> Result<(), StoreError> {
        if !self.module_info.contains_key(digest.0).map_err(|e| self.err(e))? {
            return Ok(());
        }
        let mut value = ModuleDigest::of(bytes).0.to_vec();
        value.extend_from_slice(bytes);
        self.artifacts.insert(Self::artifact_key(digest, engine), value).map_err(|e| self.err(e))?;
        self.update_info(digest, |i| {
            i.artifacts.insert(engine.to_owned(), bytes.len() as u64);
        })?;
        self.sync()
    }

    fn get_artifact(&self, digest: &ModuleDigest, engine: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = Self::artifact_key(digest, engine);
        let Some(value) = self.artifacts.get(&key).map_err(|e| self.err(e))? else { return Ok(None) };
        let intact = value.len() >= 32 && ModuleDigest::of(&value[32..]).0[..] == value[..32];
        if !intact {
            // Deserializing damaged machine code would be unsound; recompiling costs only time.
            tracing::warn!(store = %self.path.display(), %digest, "precompiled artifact failed its checksum; dropped");
            self.artifacts.remove(&key).map_err(|e| self.err(e))?;
            self.update_info(digest, |i| {
                i.artifacts.remove(engine);
            })?;
            return Ok(None);
        }
        Ok(Some(value[32..].to_vec()))
    }

    fn put_image_ref(&self, image: &str, digest: &ModuleDigest) -> Result<(), StoreError> {
        // Unchanged (a file image read at every start): no write at all.
        if self.image_refs.get(image.as_bytes()).map_err(|e| self.err(e))?.as_deref() == Some(&digest.0[..]) {
            return Ok(());
        }
        self.image_refs.insert(image.as_bytes(), &digest.0).map_err(|e| self.err(e))?;
        self.sync()
    }

    fn get_image_ref(&self, image: &str) -> Result<Option<ModuleDigest>, StoreError> {
        let Some(v) = self.image_refs.get(image.as_bytes()).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        let Ok(bytes) = <[u8; 32]>::try_from(v.as_ref()) else { return Ok(None) };
        let digest = ModuleDigest(bytes);
        Ok(self.module_info.contains_key(digest.0).map_err(|e| self.err(e))?.then_some(digest))
    }

    fn list_image_refs(&self) -> Result<Vec<(String, ModuleDigest)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.image_refs.iter() {
            let (k, v) = kv.map_err(|e| self.err(e))?;
            if let Ok(bytes) = <[u8; 32]>::try_from(v.as_ref()) {
                out.push((String::from_utf8_lossy(&k).into_owned(), ModuleDigest(bytes)));
            }
        }
        Ok(out)
    }

    fn list_modules(&self) -> Result<Vec<ModuleInfo>, StoreError> {
        self.module_info
            .iter()
            .map(|kv| {
                let (_, v) = kv.map_err(|e| self.err(e))?;
                self.decode("module info", &v)
            })
            .collect()
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.sync()
    }

    fn schema_version(&self) -> u32 {
        self.schema
    }

    fn pod_writes(&self) -> u64 {
        self.pod_writes.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn spool_put(&self, spool: SpoolTree, seq: u64, entry: &[u8]) -> Result<(), StoreError> {
        self.spool_tree(spool)?.insert(seq.to_be_bytes(), entry).map(|_| ()).map_err(|e| self.err(e))
    }

    fn spool_remove(&self, spool: SpoolTree, seq: u64) -> Result<Option<usize>, StoreError> {
        Ok(self.spool_tree(spool)?.remove(seq.to_be_bytes()).map_err(|e| self.err(e))?.map(|v| v.len()))
    }

    fn spool_range(
        &self,
        spool: SpoolTree,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let tree = self.spool_tree(spool)?;
        let iter = match after {
            Some(seq) => match seq.checked_add(1) {
                Some(next) => tree.range(next.to_be_bytes()..),
                None => return Ok(Vec::new()),
            },
            None => tree.iter(),
        };
        iter.take(limit)
            .map(|kv| {
                let (k, v) = kv.map_err(|e| self.err(e))?;
                let key: [u8; 8] = k.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                    path: self.path.clone(),
                    detail: "an MQTT spool key is not 8 bytes".into(),
                })?;
                Ok((u64::from_be_bytes(key), v.to_vec()))
            })
            .collect()
    }
}

fn write_marker(marker: &Path) -> io::Result<()> {
    let mut f = std::fs::File::create(marker)?;
    io::Write::write_all(&mut f, b"lichen state store; see the README before touching these files\n")?;
    f.sync_all()
}

fn io_error(path: &Path, e: io::Error) -> StoreError {
    match e.kind() {
        io::ErrorKind::PermissionDenied => StoreError::PermissionDenied { path: path.to_owned() },
        io::ErrorKind::WouldBlock => StoreError::Locked { path: path.to_owned() },
        io::ErrorKind::AlreadyExists | io::ErrorKind::NotADirectory => StoreError::Io {
            path: path.to_owned(),
            source: io::Error::new(e.kind(), format!("{e}: the path must be a directory (or not exist yet)")),
        },
        _ if e.to_string().contains("could not acquire lock") => StoreError::Locked { path: path.to_owned() },
        _ => StoreError::Io { path: path.to_owned(), source: e },
    }
}

fn sled_error(path: &Path, e: sled::Error) -> StoreError {
    match e {
        sled::Error::Io(e) => io_error(path, e),
        sled::Error::Corruption { at, .. } => StoreError::Corrupt {
            path: path.to_owned(),
            detail: match at {
                Some(at) => format!("bad data at {at:?}"),
                None => "bad data".into(),
            },
        },
        other => StoreError::Corrupt { path: path.to_owned(), detail: other.to_string() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pod records as the builds before `PodSource` wrote them (the source a plain string): a store
    /// from such a build opens and reads the same, and what this build writes reads back as it
    /// was written.
    #[test]
    fn records_written_before_pod_sources_were_typed_read_the_same() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store");
        let old = [
            (
                "default/web",
                r#"{"key":"default/web","uid":"u1","source":"api:","pod":{"metadata":{"name":"web"}},"status":null,"restart_counts":{"main":2},"inputs":null}"#,
            ),
            (
                "default/ticker-pi",
                r#"{"key":"default/ticker-pi","uid":"u2","source":"file:/etc/lichen/pods/ticker.yaml","pod":{},"status":null,"restart_counts":{}}"#,
            ),
        ];
        {
            let store = SledStore::open(&path).expect("open");
            for (key, json) in old {
                store.pods.insert(key.as_bytes(), json.as_bytes()).expect("raw insert");
            }
            store.flush().expect("flush");
        }
        let store = SledStore::open(&path).expect("reopen");
        let mut pods = store.list_pods().expect("list");
        pods.sort_by(|a, b| a.key.cmp(&b.key));
        assert_eq!(pods[0].source, crate::store::PodSource::File("/etc/lichen/pods/ticker.yaml".into()));
        assert_eq!(pods[1].source, crate::store::PodSource::Api);
        assert_eq!(pods[1].restart_counts.get("main"), Some(&2));
        store.put_pod(&pods[0]).expect("write back");
        let raw = store.pods.get(b"default/ticker-pi").expect("get").expect("present");
        let value: serde_json::Value = serde_json::from_slice(&raw).expect("json");
        assert_eq!(value["source"], "file:/etc/lichen/pods/ticker.yaml", "written as older builds read it");
        for bad in ["", "api", "file:", "cluster:"] {
            assert!(bad.parse::<crate::store::PodSource>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_new_state_dir_and_store_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let _store = SledStore::open(&state.join("store")).expect("open");
        for d in [&state, &state.join("store")] {
            let mode = std::fs::metadata(d).expect("stat").permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
    }

    fn record(key: &str, uid: &str) -> PodRecord {
        PodRecord {
            key: key.into(),
            uid: uid.into(),
            source: crate::store::PodSource::File("/etc/lichen/pods/test.yaml".into()),
            pod: serde_json::json!({"metadata": {"name": key}}),
            status: None,
            restart_counts: BTreeMap::new(),
            inputs: None,
        }
    }

    #[test]
    fn damaged_modules_and_artifacts_are_dropped_not_served() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let m = store.put_module(b"\0asm\x01\0\0\0", "m").expect("module");
        store.put_artifact(&m, "engine-a", b"machine code").expect("artifact");
        store.put_image_ref("reg/app:1", &m).expect("ref");
        assert_eq!(store.get_artifact(&m, "engine-a").expect("get").as_deref(), Some(&b"machine code"[..]));
        assert_eq!(store.get_artifact(&m, "engine-b").expect("get"), None, "artifacts are per engine");

        // A flipped byte in the artifact: dropped, and the module's info forgets it.
        let key = SledStore::artifact_key(&m, "engine-a");
        let mut value = store.artifacts.get(&key).expect("raw").expect("present").to_vec();
        let last = value.len() - 1;
        value[last] ^= 1;
        store.artifacts.insert(&key, value).expect("corrupt");
        assert_eq!(store.get_artifact(&m, "engine-a").expect("get"), None);
        assert!(store.list_modules().expect("list")[0].artifacts.is_empty());

        // A damaged module: dropped with its references, so the next start pulls it again.
        store.modules.insert(m.0, &b"\0asm\x01\0\0\x01"[..]).expect("corrupt");
        assert_eq!(store.get_module(&m).expect("get"), None);
        assert_eq!(store.get_image_ref("reg/app:1").expect("ref"), None);
        assert!(store.list_modules().expect("list").is_empty());
    }

    #[test]
    fn pods_survive_reopen_and_status_respects_uid() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = SledStore::open(dir.path()).expect("open");
            store.put_pod(&record("default/a", "u1")).expect("put");
            let counts = BTreeMap::from([("c".to_string(), 2)]);
            store
                .put_pod_status("default/a", "u1", &serde_json::json!({"phase": "Running"}), &counts)
                .expect("status");
            // A write for an older incarnation of the pod must not land.
            store
                .put_pod_status("default/a", "u0", &serde_json::json!({"phase": "Failed"}), &counts)
                .expect("stale status");
            store.flush().expect("flush");
        }
        let store = SledStore::open(dir.path()).expect("reopen");
        let got = store.get_pod("default/a").expect("get").expect("present");
        assert_eq!(got.status, Some(serde_json::json!({"phase": "Running"})));
        assert_eq!(got.restart_counts.get("c"), Some(&2));
        store.delete_pod("default/a", "other").expect("delete wrong uid");
        assert!(store.get_pod("default/a").expect("get").is_some());
        store.delete_pod("default/a", "u1").expect("delete");
        assert!(store.list_pods().expect("list").is_empty());
    }

    #[test]
    fn modules_are_content_addressed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let d1 = store.put_module(b"\0asm\x01\0\0\0", "a").expect("put");
        let d2 = store.put_module(b"\0asm\x01\0\0\0", "b").expect("put again");
        assert_eq!(d1, d2);
        assert_eq!(store.list_modules().expect("list").len(), 1);
        assert_eq!(store.get_module(&d1).expect("get").as_deref(), Some(&b"\0asm\x01\0\0\0"[..]));
        assert_eq!(ModuleDigest::parse(&d1.to_string()), Some(d1));
    }

    #[test]
    fn newer_schema_is_refused_with_the_way_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let db = sled::open(dir.path()).expect("sled");
            db.open_tree(META).expect("meta").insert(SCHEMA_KEY, &99u32.to_be_bytes()).expect("insert");
            db.flush().expect("flush");
        }
        let err = SledStore::open(dir.path()).err().expect("must fail").to_string();
        assert!(
            err.contains("schema version 99") && err.contains(&dir.path().display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn a_store_that_comes_back_empty_is_reported_corrupt() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = SledStore::open(dir.path()).expect("open");
            store.put_pod(&record("default/a", "u1")).expect("put");
        }
        // Garbage where the log was: sled alone would start over with an empty database.
        std::fs::write(dir.path().join("db"), vec![0x5a; 5000]).expect("overwrite");
        let err = SledStore::open(dir.path()).err().expect("must fail");
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains(&dir.path().display().to_string()) && text.contains("move it aside"), "{text}");
    }

    #[test]
    fn second_opener_is_told_the_store_is_in_use() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = SledStore::open(dir.path()).expect("open");
        // flock(2) locks belong to the open file description, so a second open in this process
        // meets the lock exactly as a second process would.
        let err = SledStore::open(dir.path()).err().expect("second open must fail");
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    }
}
