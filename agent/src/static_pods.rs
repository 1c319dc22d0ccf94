//! Static pods: Pod manifests (YAML or JSON, one pod per file) in a directory, run with no cluster,
//! like the kubelet's `--pod-manifest-path`. The directory is watched with inotify and rescanned
//! every [`RESYNC`] as a safety net.
//!
//! As in the kubelet, a static pod is named `<name>-<node>` and its UID is derived from the file and
//! its content, so an edited manifest is a new pod. A manifest that fails to parse is reported with
//! the file and the field, and does not disturb the others; if it was valid before, the last valid
//! version keeps running until the file is fixed or removed.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::pod::manager::DesiredPod;

/// Full rescan interval, in case an inotify event was missed (or the directory did not exist yet).
pub const RESYNC: Duration = Duration::from_secs(20);
/// Editors write in bursts; wait this long after an event before rescanning.
const SETTLE: Duration = Duration::from_millis(5);

/// A manifest that cannot become a pod.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ManifestError {
    /// The manifest file.
    pub file: PathBuf,
    /// What is wrong, naming the field.
    pub message: String,
}

/// Parses one manifest into a static pod for `node_name`.
pub fn parse_manifest(text: &str, file: &Path, node_name: &str) -> Result<Pod, ManifestError> {
    let err = |message: String| ManifestError { file: file.to_owned(), message };
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple_with_options(text, crate::pod::yaml_options())
            .map_err(|e| err(format!("not valid YAML or JSON: {}", one_line(&e))))?;
    let json = match docs.as_slice() {
        [one] => one.clone(),
        [] => return Err(err("empty manifest".into())),
        _ => return Err(err(format!("{} documents in one file; put one Pod in each file", docs.len()))),
    };
    let kind = json.get("kind").and_then(|v| v.as_str()).unwrap_or("");
    let api = json.get("apiVersion").and_then(|v| v.as_str()).unwrap_or("");
    if kind != "Pod" || api != "v1" {
        return Err(err(format!("apiVersion/kind: expected v1/Pod, found {api:?}/{kind:?}")));
    }
    let mut pod: Pod = serde_path_to_error::deserialize(&json).map_err(|e| {
        let path = e.path().to_string();
        err(format!("field {path}: {}", e.into_inner()))
    })?;
    let round_trip = serde_json::to_value(&pod).map_err(|e| err(format!("cannot re-encode pod: {e}")))?;
    if let Some(unknown) = first_unknown_field(&json, &round_trip, String::new()) {
        return Err(err(format!("unknown field {unknown} (check its spelling and indentation)")));
    }
    let name = pod.metadata.name.clone().unwrap_or_default();
    if name.is_empty() {
        return Err(err("field metadata.name: is required".into()));
    }
    let full_name = format!("{name}-{node_name}");
    if let Err(why) = crate::names::validate_dns_subdomain(&full_name) {
        return Err(err(format!("field metadata.name: {full_name:?} {why}")));
    }
    let mut hasher = Sha256::new();
    hasher.update(file.to_string_lossy().as_bytes());
    hasher.update([0]);
    hasher.update(node_name.as_bytes());
    hasher.update([0]);
    hasher.update(text.as_bytes());
    let hash: [u8; 32] = hasher.finalize().into();
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    let uid = format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32]);
    let meta = &mut pod.metadata;
    meta.name = Some(full_name);
    meta.namespace =
        Some(meta.namespace.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| "default".into()));
    meta.uid = Some(uid);
    let annotations = meta.annotations.get_or_insert_with(BTreeMap::new);
    annotations.insert("kubernetes.io/config.source".into(), "file".into());
    annotations.insert("kubernetes.io/config.hash".into(), hex[..32].to_owned());
    if let Some(spec) = pod.spec.as_mut() {
        spec.node_name = Some(node_name.to_owned());
    }
    Ok(pod)
}

/// The parser's message without its multi-line source snippet, so a log record stays one line.
fn one_line(e: &impl std::fmt::Display) -> String {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default().trim();
    first.strip_prefix("error: ").unwrap_or(first).to_owned()
}

/// The first path present (and not null) in `input` but missing from `parsed`.
fn first_unknown_field(
    input: &serde_json::Value,
    parsed: &serde_json::Value,
    path: String,
) -> Option<String> {
    use serde_json::Value;
    match (input, parsed) {
        (Value::Object(a), Value::Object(b)) => a.iter().find_map(|(k, v)| {
            let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
            match b.get(k) {
                None if !v.is_null() && !is_empty_container(v) => Some(p),
                None => None,
                Some(pv) => first_unknown_field(v, pv, p),
            }
        }),
        (Value::Array(a), Value::Array(b)) => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (x, y))| first_unknown_field(x, y, format!("{path}[{i}]"))),
        _ => None,
    }
}

fn is_empty_container(v: &serde_json::Value) -> bool {
    matches!(v, serde_json::Value::Object(o) if o.is_empty())
        || matches!(v, serde_json::Value::Array(a) if a.is_empty())
}

/// What a scan found.
#[derive(Debug, Default, Clone)]
pub struct Scan {
    /// Pods to run, one per valid manifest.
    pub pods: Vec<DesiredPod>,
    /// Manifests that cannot run.
    pub errors: Vec<ManifestError>,
}

/// Reads the directory and remembers each file's last valid pod.
pub struct StaticPodSource {
    dir: PathBuf,
    node_name: String,
    /// file -> (content hash, last valid pod, error reported for that content)
    known: HashMap<PathBuf, FileState>,
}

struct FileState {
    content: [u8; 32],
    last_good: Option<DesiredPod>,
    error: Option<ManifestError>,
}

impl StaticPodSource {
    /// A source for `dir`.
    pub fn new(dir: PathBuf, node_name: String) -> Self {
        StaticPodSource { dir, node_name, known: HashMap::new() }
    }

    /// Rescans the directory. Errors are returned for every invalid file; `newly_broken` lists only those
    /// whose content changed since the last scan, so callers log each problem once.
    pub fn scan(&mut self) -> (Scan, Vec<ManifestError>) {
        let mut seen = HashMap::new();
        let mut newly = Vec::new();
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd.flatten().map(|e| e.path()).filter(|p| is_manifest(p)).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                let err = ManifestError {
                    file: self.dir.clone(),
                    message: format!("cannot read the static pod directory: {e}"),
                };
                return (
                    Scan {
                        pods: self.known.values().filter_map(|f| f.last_good.clone()).collect(),
                        errors: vec![err.clone()],
                    },
                    vec![err],
                );
            }
        };
        files.sort();
        for file in files {
            // An unreadable file is keyed by its error, so each problem is reported once, like a bad parse.
            let read = read_manifest(&file);
            let content: [u8; 32] = match &read {
                Ok(text) => Sha256::digest(text.as_bytes()).into(),
                Err(e) => Sha256::digest(e.to_string().as_bytes()).into(),
            };
            seen.insert(file.clone(), ());
            if self.known.get(&file).is_some_and(|s| s.content == content) {
                continue;
            }
            let parsed = read
                .map_err(|e| ManifestError { file: file.clone(), message: e.to_string() })
                .and_then(|text| parse_manifest(&text, &file, &self.node_name))
                .map(|pod| DesiredPod {
                    inputs: None,
                    pod,
                    source: crate::store::PodSource::File(file.to_owned()),
                    image_base: Some(self.dir.clone()),
                });
            let previous = self.known.remove(&file).and_then(|s| s.last_good);
            let state = match parsed {
                Ok(pod) => FileState { content, last_good: Some(pod), error: None },
                Err(e) => {
                    newly.push(e.clone());
                    FileState { content, last_good: previous, error: Some(e) }
                }
            };
            self.known.insert(file, state);
        }
        self.known.retain(|f, _| seen.contains_key(f));

        let mut scan = Scan::default();
        let mut by_key: BTreeMap<String, PathBuf> = BTreeMap::new();
        let mut files: Vec<_> = self.known.iter().collect();
        files.sort_by(|a, b| a.0.cmp(b.0));
        for (file, state) in files {
            scan.errors.extend(state.error.clone());
            let Some(pod) = &state.last_good else {
                continue;
            };
            let key = pod.key();
            if let Some(other) = by_key.get(&key) {
                scan.errors.push(ManifestError {
                    file: file.clone(),
                    message: format!("pod {key} is already defined in {}", other.display()),
                });
                continue;
            }
            by_key.insert(key, file.clone());
            scan.pods.push(pod.clone());
        }
        (scan, newly)
    }

    /// Watches the directory and sends the desired pods after every change, until `cancel`.
    pub async fn run(mut self, tx: watch::Sender<Vec<DesiredPod>>, cancel: CancellationToken) {
        let (ev_tx, mut ev_rx) = mpsc::channel::<()>(1);
        // The watcher lives as long as this task; its callback runs on notify's own thread.
        let mut watcher = self.watch_dir(ev_tx.clone());
        let mut first = true;
        loop {
            let (scan, newly) = self.scan();
            for e in &newly {
                tracing::error!(file = %e.file.display(), "static pod manifest rejected: {}", e.message);
            }
            // The first scan is always sent, even when empty: the agent waits for it before it forgets
            // records of pods whose manifests are gone.
            tx.send_if_modified(|cur| {
                let changed = first || *cur != scan.pods;
                if changed {
                    *cur = scan.pods.clone();
                }
                changed
            });
            first = false;
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = ev_rx.recv() => tokio::time::sleep(SETTLE).await,
                _ = tokio::time::sleep(RESYNC) => {
                    if watcher.is_none() {
                        watcher = self.watch_dir(ev_tx.clone());
                    }
                }
            }
            while ev_rx.try_recv().is_ok() {}
        }
    }

    fn watch_dir(&self, tx: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
        use notify::Watcher;
        let handler = move |res: notify::Result<notify::Event>| {
            // Opening, reading and closing a file changes nothing, and the scan itself does all
            // three: acting on those events rescanned the directory a few hundred times a second,
            // for as long as the agent ran. Anything else (and an error: events may have been
            // lost) means "rescan".
            if res.as_ref().is_ok_and(|e| e.kind.is_access()) {
                return;
            }
            // A full channel already means "rescan": dropping the extra signal is fine.
            let _ = tx.try_send(());
        };
        let mut w = match notify::recommended_watcher(handler) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the static pod directory; rescanning every {}s", RESYNC.as_secs());
                return None;
            }
        };
        match w.watch(&self.dir, notify::RecursiveMode::NonRecursive) {
            Ok(()) => Some(w),
            Err(e) => {
                tracing::info!(dir = %self.dir.display(), error = %e, "static pod directory not watchable yet; rescanning every {}s", RESYNC.as_secs());
                None
            }
        }
    }
}

/// Largest manifest read; a Pod spec is a few KiB, so anything near this is a mistake or an attack.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// Why a manifest file could not be read (its parse errors are [`ManifestError`]s).
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("cannot read: {0}")]
    Io(#[source] std::io::Error),
    #[error("{0} bytes is larger than the {MAX_MANIFEST_BYTES}-byte limit for a manifest")]
    TooLarge(u64),
}

fn read_manifest(file: &Path) -> Result<String, ReadError> {
    let len = std::fs::metadata(file).map_err(ReadError::Io)?.len();
    if len > MAX_MANIFEST_BYTES {
        return Err(ReadError::TooLarge(len));
    }
    std::fs::read_to_string(file).map_err(ReadError::Io)
}

fn is_manifest(p: &Path) -> bool {
    let name = p.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    !name.starts_with('.')
        && p.is_file()
        && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str =
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web}\nspec:\n  containers: [{name: c, image: a.wasm}]\n";

    #[test]
    fn a_manifest_becomes_a_static_pod() {
        let pod = parse_manifest(GOOD, Path::new("/p/web.yaml"), "pi-07").expect("valid");
        assert_eq!(pod.metadata.name.as_deref(), Some("web-pi-07"));
        assert_eq!(pod.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(pod.spec.as_ref().and_then(|s| s.node_name.as_deref()), Some("pi-07"));
        let again = parse_manifest(GOOD, Path::new("/p/web.yaml"), "pi-07").expect("valid");
        assert_eq!(pod.metadata.uid, again.metadata.uid, "UID is stable for the same content");
        let edited = parse_manifest(&GOOD.replace("a.wasm", "b.wasm"), Path::new("/p/web.yaml"), "pi-07")
            .expect("valid");
        assert_ne!(pod.metadata.uid, edited.metadata.uid, "an edit makes a new pod");
    }

    #[test]
    fn errors_name_the_field() {
        let file = Path::new("/p/bad.yaml");
        let typo = GOOD.replace("image:", "imagee:");
        let e = parse_manifest(&typo, file, "n").expect_err("typo");
        assert!(e.message.contains("spec.containers[0].imagee"), "{e}");
        let wrong_type = GOOD.replace("containers: [", "containers: 3 #[");
        let e = parse_manifest(&wrong_type, file, "n").expect_err("type");
        assert!(e.message.contains("spec.containers"), "{e}");
        assert!(e.to_string().starts_with("/p/bad.yaml: "), "{e}");
        let e = parse_manifest("apiVersion: apps/v1\nkind: Deployment\n", file, "n").expect_err("kind");
        assert!(e.message.contains("v1/Pod"), "{e}");
        let e = parse_manifest(&format!("{GOOD}---\n{GOOD}"), file, "n").expect_err("two docs");
        assert!(e.message.contains("2 documents"), "{e}");
        let e = parse_manifest("a: [", file, "n").expect_err("syntax");
        assert!(e.message.contains("not valid YAML") && e.message.contains("line 1"), "{e}");
        assert!(!e.message.contains('\n'), "one line for the log: {e}");
    }

    #[test]
    fn an_oversized_manifest_is_refused_without_disturbing_others() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("web.yaml"), GOOD).expect("write");
        let huge = format!("{GOOD}# {}\n", "x".repeat(MAX_MANIFEST_BYTES as usize));
        std::fs::write(dir.path().join("huge.yaml"), huge).expect("write");
        let mut src = StaticPodSource::new(dir.path().to_owned(), "n".into());
        let (scan, newly) = src.scan();
        assert_eq!(scan.pods.len(), 1);
        assert_eq!(newly.len(), 1);
        assert!(newly[0].message.contains("limit"), "{}", newly[0]);
        let (_, newly) = src.scan();
        assert!(newly.is_empty(), "reported once");
    }

    #[test]
    fn a_broken_edit_keeps_the_last_good_pod() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("web.yaml");
        std::fs::write(&path, GOOD).expect("write");
        std::fs::write(dir.path().join("notes.txt"), "ignored").expect("write");
        let mut src = StaticPodSource::new(dir.path().to_owned(), "n".into());
        let (scan, _) = src.scan();
        assert_eq!(scan.pods.len(), 1);
        std::fs::write(&path, "kind: Pod\nspec: [").expect("write");
        let (scan, newly) = src.scan();
        assert_eq!((scan.pods.len(), scan.errors.len(), newly.len()), (1, 1, 1));
        let (_, newly) = src.scan();
        assert!(newly.is_empty(), "the same error is not reported twice");
        std::fs::remove_file(&path).expect("rm");
        let (scan, _) = src.scan();
        assert!(scan.pods.is_empty() && scan.errors.is_empty());
    }
}
