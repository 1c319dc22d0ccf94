//! Reading container logs back, for the kubelet API's `containerLogs` and for `lichen logs`.
//!
//! It finds a container's log directory from the pods the store records, and streams one run of it
//! (`<run>.log` and its rotated files, as [`crate::runtime::logs`] writes them) the way the kubelet
//! does: the text of each line, optionally after its timestamp, filtered by time, tail and size, and
//! with `follow` the lines written after, across rotations, until the run is over.
//!
//! It only reads. The files belong to the writer, which may rotate or delete them at any moment, so
//! every file is read through a handle opened once (a rename or unlink does not disturb it) and
//! tracked by inode. Memory stays bounded whatever the files hold: a tail is found by reading the
//! files backwards, and lines are streamed in chunks.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::PodStatus;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::board::StatusBoard;
use crate::store::StateStore;

/// How long a follower sleeps between looks at the file: short enough that `-f` feels live, long
/// enough that an idle follower costs nothing.
const FOLLOW_POLL: Duration = Duration::from_millis(200);
/// Bytes read from a file at a time, forwards or backwards.
const BLOCK: usize = 64 * 1024;
/// The longest record line read; the writer's are at most 16 KiB of text plus the header. Longer
/// lines (not from Lichen) are skipped rather than buffered.
const MAX_RECORD: usize = 64 * 1024;
/// Partial records are joined into their line up to this size; beyond it the line is sent on in
/// pieces as they come, so one endless line cannot hold the reader's memory.
const MAX_JOINED: usize = 1 << 20;
/// How far back a tail looks for the first piece of a line whose end it has found, beyond the
/// last record it kept (a line's pieces lie close together; MAX_JOINED would be sent in pieces).
const TAIL_SLACK: u64 = 2 * MAX_JOINED as u64;
/// Output is sent in chunks of about this size.
const CHUNK: usize = 32 * 1024;
/// Bytes of a record read to learn its stream and tag (the time is at most 35 characters).
const HEADER: usize = 64;

/// What a caller asks of a container's log, as the kubelet's containerLogs takes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogOptions {
    /// Keep sending lines as they are written, until the run is over.
    pub follow: bool,
    /// Read the run before the newest (the container's previous instance).
    pub previous: bool,
    /// Put each line's RFC 3339 time and a space before it.
    pub timestamps: bool,
    /// Send only the last N lines (then, with `follow`, the new ones).
    pub tail_lines: Option<u64>,
    /// Send only lines written at or after this time (from sinceSeconds or sinceTime).
    pub since: Option<Timestamp>,
    /// Stop after this many bytes of output.
    pub limit_bytes: Option<u64>,
}

impl LogOptions {
    /// Parses a URL query string (`follow=true&tailLines=10&sinceSeconds=60&timestamps=true&
    /// previous=true&limitBytes=100&sinceTime=...`), percent-decoded; unknown keys are ignored. A
    /// malformed value is [`LogError::BadRequest`] naming the parameter, and so are sinceSeconds
    /// and sinceTime together (as in the real API). As in the API server, the first value of a
    /// repeated key counts, and a flag given without a value (`follow`) is true.
    pub fn from_query(query: &str) -> Result<Self, LogError> {
        let mut opts = LogOptions::default();
        let mut seen = BTreeSet::new();
        let (mut since_seconds, mut since_time) = (None, None);
        for pair in query.strip_prefix('?').unwrap_or(query).split('&').filter(|p| !p.is_empty()) {
            let (raw_key, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = percent_decode(raw_key).ok_or_else(|| {
                LogError::BadRequest(format!("query parameter {raw_key:?}: invalid percent-encoding"))
            })?;
            const KNOWN: [&str; 7] =
                ["follow", "previous", "timestamps", "tailLines", "limitBytes", "sinceSeconds", "sinceTime"];
            // Unknown keys (`container`, `insecureSkipTLSVerifyBackend`, …) are ignored, values and all.
            if !KNOWN.contains(&key.as_str()) {
                continue;
            }
            let value = percent_decode(raw_value).ok_or_else(|| {
                LogError::BadRequest(format!(
                    "query parameter {key}: invalid percent-encoding in {raw_value:?}"
                ))
            })?;
            if !seen.insert(key.clone()) {
                continue;
            }
            match key.as_str() {
                "follow" => opts.follow = parse_flag(&key, &value)?,
                "previous" => opts.previous = parse_flag(&key, &value)?,
                "timestamps" => opts.timestamps = parse_flag(&key, &value)?,
                "tailLines" => opts.tail_lines = Some(parse_count(&key, &value, 0)?),
                "limitBytes" => opts.limit_bytes = Some(parse_count(&key, &value, 1)?),
                "sinceSeconds" => since_seconds = Some(parse_count(&key, &value, 1)?),
                "sinceTime" => {
                    let t = value.parse::<Timestamp>().map_err(|e| {
                        LogError::BadRequest(format!(
                            "invalid sinceTime {value:?}: want an RFC 3339 time such as 2024-05-01T12:00:00Z ({e})"
                        ))
                    })?;
                    since_time = Some(t);
                }
                _ => {}
            }
        }
        opts.since = match (since_seconds, since_time) {
            (Some(_), Some(_)) => {
                return Err(LogError::BadRequest(
                    "at most one of sinceTime or sinceSeconds may be specified".into(),
                ));
            }
            (Some(secs), None) => Some(since_seconds_ago(secs)),
            (None, t) => t,
        };
        Ok(opts)
    }
}

/// The time `secs` seconds ago; a span reaching before the earliest time means "everything".
fn since_seconds_ago(secs: u64) -> Timestamp {
    let secs = i64::try_from(secs).unwrap_or(i64::MAX);
    Timestamp::now().checked_sub(jiff::SignedDuration::from_secs(secs)).unwrap_or(Timestamp::MIN)
}

/// Decodes `%XX` escapes and `+` (a space in a query string); `None` for a broken escape or bytes
/// that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// A boolean parameter, spelled as Go's `strconv.ParseBool` spells them; empty (`?follow`) is true.
fn parse_flag(key: &str, value: &str) -> Result<bool, LogError> {
    match value {
        "" | "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(LogError::BadRequest(format!("invalid {key} {value:?}: want true or false"))),
    }
}

/// A whole-number parameter of at least `min`.
fn parse_count(key: &str, value: &str, min: u64) -> Result<u64, LogError> {
    match value.parse::<u64>() {
        Ok(n) if n >= min => Ok(n),
        _ => Err(LogError::BadRequest(format!(
            "invalid {key} {value:?}: want a whole number of at least {min}"
        ))),
    }
}

/// Errors, each mapping to an HTTP status for the kubelet API.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The pod, the container or the run asked for does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// The request cannot be answered as asked (400): a malformed parameter, a pod with several
    /// containers and none named, a container that has not started yet.
    #[error("{0}")]
    BadRequest(String),
    /// A log file, the log directory or the store could not be read (500).
    #[error("cannot read {path}: {source}")]
    Io {
        /// What could not be read.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl LogError {
    /// The HTTP status the kubelet API answers with: 404, 400 or 500.
    pub fn http_status(&self) -> u16 {
        match self {
            LogError::NotFound(_) => 404,
            LogError::BadRequest(_) => 400,
            LogError::Io { .. } => 500,
        }
    }

    fn io(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
        move |source| LogError::Io { path: path.to_owned(), source }
    }
}

/// A located container log.
#[derive(Debug, Clone)]
pub struct ContainerLogs {
    /// `<logs>/<namespace>_<name>_<uid>/<container>`: the container's runs.
    pub dir: PathBuf,
    /// `namespace/name`.
    pub pod_key: String,
    /// The pod's UID.
    pub uid: String,
    /// The container's name.
    pub container: String,
}

/// A pod as far as finding its logs goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodContainers {
    /// `namespace/name`.
    pub key: String,
    /// The pod's UID.
    pub uid: String,
    /// Its app containers.
    pub containers: Vec<String>,
    /// Its init containers.
    pub init_containers: Vec<String>,
}

impl PodContainers {
    /// The containers of a stored pod.
    pub fn of_record(r: &crate::store::PodRecord) -> Self {
        let names = |field: &str| -> Vec<String> {
            r.pod["spec"][field]
                .as_array()
                .map(|cs| cs.iter().filter_map(|c| c["name"].as_str().map(str::to_owned)).collect())
                .unwrap_or_default()
        };
        PodContainers {
            key: r.key.clone(),
            uid: r.uid.clone(),
            containers: names("containers"),
            init_containers: names("initContainers"),
        }
    }
}

/// Finds a container's log directory from the pods the store records (newest UID of that
/// namespace/name). `container: None` picks the pod's only container, else
/// `LogError::BadRequest("a container name must be specified for pod NAME, choose one of: [a b]")`
/// like the API server. Unknown pod or container: `LogError::NotFound` naming it. Init containers
/// count as containers here.
pub fn locate(
    store: &dyn StateStore,
    logs_dir: &Path,
    namespace: &str,
    pod: &str,
    container: Option<&str>,
) -> Result<ContainerLogs, LogError> {
    let key = format!("{namespace}/{pod}");
    // The store keeps one record per key, the newest UID: a pod recreated under the same name
    // replaces the record of the old one.
    let record = store.get_pod(&key).map_err(|e| LogError::Io {
        path: logs_dir.parent().map(|d| d.join("store")).unwrap_or_else(|| logs_dir.to_owned()),
        source: io::Error::other(e.to_string()),
    })?;
    let Some(record) = record else {
        return Err(LogError::NotFound(format!("pod {key:?} not found on this node")));
    };
    locate_in(&PodContainers::of_record(&record), logs_dir, container)
}

/// Finds the log directory of `container` (or of the pod's only container) of `pod`.
pub fn locate_in(
    pod: &PodContainers,
    logs_dir: &Path,
    container: Option<&str>,
) -> Result<ContainerLogs, LogError> {
    let name = pod.key.split_once('/').map_or(pod.key.as_str(), |(_, n)| n);
    let container = match container {
        Some(c) if pod.containers.iter().chain(&pod.init_containers).any(|n| n == c) => c.to_owned(),
        Some(c) => {
            let all: Vec<&str> =
                pod.containers.iter().chain(&pod.init_containers).map(String::as_str).collect();
            return Err(LogError::NotFound(format!(
                "container {c:?} not found in pod {:?}; its containers: [{}]",
                pod.key,
                all.join(" ")
            )));
        }
        None if pod.containers.len() == 1 => pod.containers[0].clone(),
        None => {
            // The API server's wording, so scripts written against kubectl read it the same.
            let mut message = format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                pod.containers.join(" ")
            );
            if !pod.init_containers.is_empty() {
                message += &format!(" or one of the init containers: [{}]", pod.init_containers.join(" "));
            }
            return Err(LogError::BadRequest(message));
        }
    };
    Ok(ContainerLogs {
        dir: super::worker::pod_log_dir(logs_dir, &pod.key, &pod.uid).join(&container),
        pod_key: pod.key.clone(),
        uid: pod.uid.clone(),
        container,
    })
}

/// An `is_running` for [`stream`] answered from the status board: whether `container` of the pod
/// `pod_key` is in the running state now. A pod that is gone is not running.
pub fn running_probe(
    board: Arc<StatusBoard>,
    pod_key: String,
    container: String,
) -> Arc<dyn Fn() -> bool + Send + Sync> {
    Arc::new(move || board.get(&pod_key).is_some_and(|e| container_running(&e.status, &container)))
}

/// Whether `container` (an app or init container) is running in `status`.
pub fn container_running(status: &PodStatus, container: &str) -> bool {
    status
        .container_statuses
        .iter()
        .flatten()
        .chain(status.init_container_statuses.iter().flatten())
        .find(|c| c.name == container)
        .is_some_and(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
}

// ---- the files of a run ----

/// The run number and rotation order of a log file name: `3.log` is (3, 0), `3.log.2` is (3, 2).
fn parse_file_name(name: &str) -> Option<(u32, u32)> {
    let (run, rest) = name.split_once(".log")?;
    let run = run.parse().ok()?;
    match rest {
        "" => Some((run, 0)),
        r => Some((run, r.strip_prefix('.')?.parse().ok()?)),
    }
}

/// The run numbers that have files in `dir` (none if it does not exist).
fn runs(dir: &Path) -> Result<BTreeSet<u32>, LogError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(e) => return Err(LogError::io(dir)(e)),
    };
    Ok(entries
        .flatten()
        .filter_map(|e| parse_file_name(&e.file_name().to_string_lossy()))
        .map(|r| r.0)
        .collect())
}

/// One file of a run, as listed: its path and identity.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Listed {
    path: PathBuf,
    id: (u64, u64),
}

/// The files of run `run`, oldest first (`.N` … `.1`, then the live `<run>.log`).
fn list_run(dir: &Path, run: u32) -> Result<Vec<Listed>, LogError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(LogError::io(dir)(e)),
    };
    let mut files: Vec<(u32, Listed)> = Vec::new();
    for entry in entries.flatten() {
        let Some((r, order)) = parse_file_name(&entry.file_name().to_string_lossy()) else { continue };
        if r != run {
            continue;
        }
        // A file rotated away or deleted between the listing and here is simply not listed.
        let Ok(meta) = std::fs::metadata(entry.path()) else { continue };
        files.push((order, Listed { path: entry.path(), id: (meta.dev(), meta.ino()) }));
    }
    files.sort_by_key(|f| std::cmp::Reverse(f.0));
    Ok(files.into_iter().map(|f| f.1).collect())
}

/// An open file of the run being read.
struct RunFile {
    path: PathBuf,
    file: File,
    id: (u64, u64),
}

fn open_listed(l: &Listed) -> io::Result<Option<RunFile>> {
    let file = match File::open(&l.path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    let id = (meta.dev(), meta.ino());
    Ok((id == l.id).then(|| RunFile { path: l.path.clone(), file, id }))
}

/// Opens every file of run `run`, oldest first. A rotation between listing and opening renames
/// files under us; the listing is then taken again, until what was opened matches it.
fn open_run(dir: &Path, run: u32) -> Result<Vec<RunFile>, LogError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let listed = list_run(dir, run)?;
        let mut files = Vec::with_capacity(listed.len());
        for l in &listed {
            match open_listed(l).map_err(LogError::io(&l.path))? {
                Some(f) => files.push(f),
                None => break,
            }
        }
        let consistent = files.len() == listed.len()
            && list_run(dir, run)?.iter().map(|l| l.id).eq(files.iter().map(|f| f.id));
        // A writer rotating non-stop (megabytes a second into a tiny max_size) could keep this
        // going; after a few tries, take what was opened: it is in order, if perhaps not complete.
        if consistent || attempt >= 10 {
            return Ok(files);
        }
    }
}

/// The file of the run that follows `current` (tracked by inode): the next newer one once
/// `current` has been rotated away, or the oldest one left if `current` was deleted. `None` while
/// `current` is the live file (or the live file is being replaced).
fn next_file(dir: &Path, run: u32, current: (u64, u64)) -> Result<Option<RunFile>, LogError> {
    for _ in 0..10 {
        let listed = list_run(dir, run)?;
        let next = match listed.iter().position(|l| l.id == current) {
            Some(i) => listed.get(i + 1),
            // Rotation deletes the oldest files first: all that are left are newer than it.
            None => listed.first(),
        };
        let Some(next) = next else { return Ok(None) };
        if let Some(f) = open_listed(next).map_err(LogError::io(&next.path))? {
            return Ok(Some(f));
        }
        // Renamed between the listing and the open: look again.
    }
    Ok(None)
}

// ---- records and positions ----

/// Where a record starts: which file of the run (in reading order) and the byte offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Pos {
    file: usize,
    offset: u64,
}

/// A record's stream (0 stdout, 1 stderr) and whether it completes its line (`F`); `None` for a
/// line that is not a CRI record.
fn header(line: &[u8]) -> Option<(usize, bool)> {
    let mut parts = line.splitn(4, |&b| b == b' ');
    let _time = parts.next()?;
    let stream = match parts.next()? {
        b"stdout" => 0,
        b"stderr" => 1,
        _ => return None,
    };
    let complete = match parts.next()? {
        b"F" => true,
        b"P" => false,
        _ => return None,
    };
    Some((stream, complete))
}

/// What a tail keeps: records from `start` on, except those of a stream at or before its
/// `boundary` (lines older than the tail that interleave with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TailPlan {
    start: Pos,
    boundary: [Option<Pos>; 2],
}

impl TailPlan {
    fn everything() -> Self {
        TailPlan { start: Pos { file: 0, offset: 0 }, boundary: [None; 2] }
    }
}

/// Finds where the last `n` lines begin by reading the files backwards, a block at a time.
///
/// Each line ends with one `F` record; its `P` pieces come before it, possibly interleaved with the
/// other stream's records. Going backwards, the first `n` `F` records are the tail; a tail line of a
/// stream begins after that stream's previous `F`, which becomes the stream's boundary.
fn plan_tail(files: &[RunFile], n: u64) -> io::Result<TailPlan> {
    let Some(last) = files.last() else { return Ok(TailPlan::everything()) };
    // The end of the last complete record: a tail of nothing starts there, not inside a record
    // being written.
    let mut end = 0;
    scan_back(&last.file, last.file.metadata()?.len(), |offset, len, _| {
        end = offset + len + 1;
        false
    })?;
    let mut plan = TailPlan { start: Pos { file: files.len() - 1, offset: end }, boundary: [None; 2] };
    if n == 0 {
        return Ok(plan);
    }
    let mut count = 0u64;
    // Per stream: whether it has a tail line (or a line still being written) whose first piece is
    // yet to be found.
    let mut open = [false; 2];
    // Bytes read back since the last record kept, for the slack limit.
    let mut scanned_since_kept = 0u64;
    for (idx, f) in files.iter().enumerate().rev() {
        let len = f.file.metadata()?.len();
        let stopped = scan_back(&f.file, len, |offset, len, head| {
            scanned_since_kept += len + 1;
            let pos = Pos { file: idx, offset };
            match header(head) {
                Some((s, _)) if plan.boundary[s].is_some() => {}
                Some((s, true)) if count == n => {
                    // The end of an older line: this stream's tail lines start after it.
                    plan.boundary[s] = Some(pos);
                    open[s] = false;
                }
                Some((s, complete)) => {
                    // A tail line's end, one of its pieces, or a piece of a line being written.
                    count += u64::from(complete);
                    open[s] = true;
                    plan.start = pos;
                    scanned_since_kept = 0;
                }
                None => {}
            }
            if count == n && scanned_since_kept > TAIL_SLACK {
                // A line's pieces lie close together, and one this long is sent in parts anyway.
                for (o, b) in open.iter_mut().zip(plan.boundary.iter_mut()) {
                    if std::mem::take(o) {
                        *b = Some(pos);
                    }
                }
            }
            !(count == n && open.iter().all(|o| !o))
        })?;
        if stopped {
            break;
        }
    }
    Ok(plan)
}

/// Calls `visit(offset, length, header)` for each complete record of `file[..len]`, last first, until
/// it returns false; returns whether it stopped early. A trailing line without its newline (being
/// written) is not a record yet.
fn scan_back(file: &File, len: u64, mut visit: impl FnMut(u64, u64, &[u8]) -> bool) -> io::Result<bool> {
    let mut buf = vec![0u8; BLOCK];
    let mut head = [0u8; HEADER];
    // The newline ending the record whose start is being looked for.
    let mut record_end: Option<u64> = None;
    let mut pos = len;
    while pos > 0 {
        let block_start = pos.saturating_sub(BLOCK as u64);
        let n = (pos - block_start) as usize;
        file.read_exact_at(&mut buf[..n], block_start)?;
        for i in (0..n).rev() {
            if buf[i] != b'\n' {
                continue;
            }
            let nl = block_start + i as u64;
            if let Some(end) = record_end {
                let start = nl + 1;
                let h = read_head(file, &mut head, start, end, block_start, &buf[..n])?;
                if !visit(start, end - start, &head[..h]) {
                    return Ok(true);
                }
            }
            record_end = Some(nl);
        }
        pos = block_start;
    }
    if let Some(end) = record_end {
        let h = read_head(file, &mut head, 0, end, 0, &buf[..0])?;
        if !visit(0, end, &head[..h]) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Copies the first bytes of the record at `[start, end)` into `head`, from `block` (which holds
/// the file from `block_start`) when they are in it, else from the file.
fn read_head(
    file: &File,
    head: &mut [u8; HEADER],
    start: u64,
    end: u64,
    block_start: u64,
    block: &[u8],
) -> io::Result<usize> {
    let n = usize::try_from(end - start).unwrap_or(HEADER).min(HEADER);
    let block_end = block_start + block.len() as u64;
    if start >= block_start && start + n as u64 <= block_end {
        let from = (start - block_start) as usize;
        head[..n].copy_from_slice(&block[from..from + n]);
    } else {
        file.read_exact_at(&mut head[..n], start)?;
    }
    Ok(n)
}

/// Reads a file forwards from an offset, a block at a time, handing out complete record lines.
struct Reader {
    file: RunFile,
    idx: usize,
    /// File offset of `buf[0]`.
    offset: u64,
    buf: Vec<u8>,
    /// Inside a line longer than MAX_RECORD, which is dropped up to its newline.
    skipping: bool,
}

impl Reader {
    fn new(file: RunFile, idx: usize, offset: u64) -> Self {
        Reader { file, idx, offset, buf: Vec::new(), skipping: false }
    }

    /// Reads one more block and calls `record` for each complete line in it; returns false at the
    /// end of the file (for now: a live file grows).
    fn step(&mut self, mut record: impl FnMut(Pos, &[u8])) -> io::Result<bool> {
        let have = self.buf.len();
        self.buf.resize(have + BLOCK, 0);
        let read = self.file.file.read_at(&mut self.buf[have..], self.offset + have as u64);
        self.buf.truncate(have + *read.as_ref().unwrap_or(&0));
        let read = match read {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(true),
            Err(e) => return Err(e),
        };
        if read == 0 {
            return Ok(false);
        }
        let mut consumed = 0;
        while let Some(nl) = self.buf[consumed..].iter().position(|&b| b == b'\n') {
            let line = &self.buf[consumed..consumed + nl];
            if !self.skipping {
                record(Pos { file: self.idx, offset: self.offset + consumed as u64 }, line);
            }
            self.skipping = false;
            consumed += nl + 1;
        }
        if self.buf.len() - consumed > MAX_RECORD {
            self.skipping = true;
            consumed = self.buf.len();
        }
        self.buf.drain(..consumed);
        self.offset += consumed as u64;
        Ok(true)
    }
}

/// A line being put together from partial records.
#[derive(Default)]
struct Pending {
    text: Vec<u8>,
    /// The time of its first piece (the line's time), once it has one.
    time: Option<Vec<u8>>,
    /// Whether it passes `since`.
    keep: bool,
    /// Whether its start was already sent (it outgrew MAX_JOINED).
    spilled: bool,
}

/// Turns records into the kubelet's output: lines joined from their pieces, filtered and
/// prefixed, counted against `limit_bytes`.
struct Assembler {
    since: Option<Timestamp>,
    timestamps: bool,
    remaining: Option<u64>,
    /// Without follow, a tail is the last lines when the request came: lines the container writes
    /// while they are read are not added (`--tail 1` prints one line).
    lines_left: Option<u64>,
    boundary: [Option<Pos>; 2],
    pending: [Pending; 2],
    out: Vec<u8>,
}

impl Assembler {
    fn new(opts: &LogOptions, boundary: [Option<Pos>; 2]) -> Self {
        Assembler {
            since: opts.since,
            timestamps: opts.timestamps,
            remaining: opts.limit_bytes,
            lines_left: opts.tail_lines.filter(|_| !opts.follow || opts.previous),
            boundary,
            pending: Default::default(),
            out: Vec::new(),
        }
    }

    /// Whether `limit_bytes` has been reached.
    fn done(&self) -> bool {
        self.remaining == Some(0)
    }

    fn record(&mut self, pos: Pos, line: &[u8]) {
        if self.done() {
            return;
        }
        let mut parts = line.splitn(4, |&b| b == b' ');
        let (Some(time), Some((s, complete))) = (parts.next(), header(line)) else { return };
        if self.boundary[s].is_some_and(|b| pos <= b) {
            return;
        }
        if complete && self.lines_left == Some(0) {
            return;
        }
        let text = parts.nth(2).unwrap_or_default();
        let p = &mut self.pending[s];
        if p.time.is_none() {
            p.time = Some(time.to_vec());
            // A record whose time does not parse is kept: better a line too many than one lost.
            let t = std::str::from_utf8(time).ok().and_then(|t| t.parse::<Timestamp>().ok());
            p.keep = match (self.since, t) {
                (Some(since), Some(t)) => t >= since,
                _ => true,
            };
        }
        p.text.extend_from_slice(text);
        if complete {
            p.text.push(b'\n');
            let p = std::mem::take(&mut self.pending[s]);
            self.emit(&p);
            if let Some(n) = self.lines_left.as_mut() {
                *n = n.saturating_sub(1);
            }
        } else if p.spilled || p.text.len() >= MAX_JOINED {
            // Too long to hold: send what there is, and the rest as it comes.
            let mut p = std::mem::take(&mut self.pending[s]);
            self.emit(&p);
            p.text.clear();
            p.spilled = true;
            self.pending[s] = p;
        }
    }

    /// Sends the pieces of unfinished lines as lines (the run is over, or this is all there is).
    fn finish(&mut self) {
        for s in 0..2 {
            let mut p = std::mem::take(&mut self.pending[s]);
            if p.spilled || !p.text.is_empty() {
                p.text.push(b'\n');
                self.emit(&p);
            }
        }
    }

    /// Appends `p.text` to the output, after the line's timestamp if this is its start.
    fn emit(&mut self, p: &Pending) {
        if !p.keep {
            return;
        }
        let mut bytes = Vec::with_capacity(p.text.len() + 40);
        if self.timestamps && !p.spilled {
            bytes.extend_from_slice(p.time.as_deref().unwrap_or_default());
            bytes.push(b' ');
        }
        bytes.extend_from_slice(&p.text);
        if let Some(left) = self.remaining.as_mut() {
            let n = bytes.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
            bytes.truncate(n);
            *left -= n as u64;
        }
        self.out.extend_from_slice(&bytes);
    }
}

/// Sends what the assembler has gathered. Returns false when the reader should stop: the receiver
/// is gone or `cancel` fired.
async fn send(asm: &mut Assembler, out: &mpsc::Sender<Vec<u8>>, cancel: &CancellationToken) -> bool {
    if asm.out.is_empty() {
        return !out.is_closed() && !cancel.is_cancelled();
    }
    let chunk = std::mem::take(&mut asm.out);
    tokio::select! {
        sent = out.send(chunk) => sent.is_ok(),
        _ = cancel.cancelled() => false,
    }
}

/// How a drain ended.
enum Drained {
    /// At the end of the file (for now).
    Eof,
    /// `limit_bytes` reached, receiver gone or cancelled.
    Stop,
}

/// Reads `reader` to its current end, sending chunks as they fill.
///
/// The reads are plain blocking reads of one block each, between awaits: a log file is on local
/// disk and mostly in the page cache, so each takes microseconds, less than handing it to the
/// blocking pool would cost.
async fn drain(
    reader: &mut Reader,
    asm: &mut Assembler,
    out: &mpsc::Sender<Vec<u8>>,
    cancel: &CancellationToken,
) -> Result<Drained, LogError> {
    loop {
        let more = reader.step(|pos, line| asm.record(pos, line)).map_err(LogError::io(&reader.file.path))?;
        if (asm.out.len() >= CHUNK || asm.done()) && !send(asm, out, cancel).await {
            return Ok(Drained::Stop);
        }
        if asm.done() {
            return Ok(Drained::Stop);
        }
        if !more {
            return Ok(Drained::Eof);
        }
    }
}

/// Streams the chosen run (`previous`: the run before the newest; NotFound "previous terminated
/// container X in pod Y not found" if none) as the kubelet does: the text of each line with "\n"
/// (partial `P` records joined into their line), each prefixed with the record's RFC 3339 timestamp
/// and a space if `timestamps`; `since` filters by record time; `tail_lines` keeps the last N lines;
/// `limit_bytes` stops after that many bytes.
///
/// With `follow` (ignored with `previous`), after the existing lines it keeps sending new ones as
/// they are written (rotation included) until the run is over: `is_running()` returns false and
/// the file is drained, or a newer run's file appears, or the pod's log directory is removed; or the
/// receiver is dropped; or `cancel` fires. It looks for new lines every 200 ms.
///
/// A container that has not written a log yet (it has not started) is `BadRequest`, as the kubelet
/// answers for a container waiting to start. A line longer than 1 MiB is sent in pieces as they
/// come rather than held whole.
pub async fn stream(
    logs: ContainerLogs,
    opts: LogOptions,
    is_running: Arc<dyn Fn() -> bool + Send + Sync>,
    out: mpsc::Sender<Vec<u8>>,
    cancel: CancellationToken,
) -> Result<(), LogError> {
    let runs = runs(&logs.dir)?;
    let newest = runs.last().copied();
    let run = if opts.previous {
        match newest.and_then(|n| runs.range(..n).next_back().copied()) {
            Some(r) => r,
            None => {
                return Err(LogError::NotFound(format!(
                    "previous terminated container {:?} in pod {:?} not found",
                    logs.container, logs.pod_key
                )));
            }
        }
    } else {
        match newest {
            Some(r) => r,
            None => {
                return Err(LogError::BadRequest(format!(
                    "container {:?} in pod {:?} is waiting to start: it has written no log yet",
                    logs.container, logs.pod_key
                )));
            }
        }
    };
    let follow = opts.follow && !opts.previous;

    // Reading a tail backwards may touch every file of the run: off the async threads.
    let dir = logs.dir.clone();
    let tail = opts.tail_lines;
    let (files, plan) = tokio::task::spawn_blocking(move || -> Result<_, LogError> {
        let files = open_run(&dir, run)?;
        let plan = match tail {
            Some(n) => plan_tail(&files, n).map_err(LogError::io(&dir))?,
            None => TailPlan::everything(),
        };
        Ok((files, plan))
    })
    .await
    .map_err(|e| LogError::Io { path: logs.dir.clone(), source: io::Error::other(e) })??;

    let mut asm = Assembler::new(&opts, plan.boundary);
    let mut files = files.into_iter().enumerate().skip(plan.start.file);
    let Some((idx, first)) = files.next() else {
        // The run's files were deleted between the listing and the open (the pod was removed).
        asm.finish();
        send(&mut asm, &out, &cancel).await;
        return Ok(());
    };
    let mut reader = Reader::new(first, idx, plan.start.offset);
    for (idx, file) in files {
        if let Drained::Stop = drain(&mut reader, &mut asm, &out, &cancel).await? {
            return Ok(());
        }
        reader = Reader::new(file, idx, 0);
    }
    let mut over = !follow;
    loop {
        if let Drained::Stop = drain(&mut reader, &mut asm, &out, &cancel).await? {
            return Ok(());
        }
        if follow && let Some(next) = next_file(&logs.dir, run, reader.file.id)? {
            // The writer closes a file before rotating it, so what was read of it is all of it.
            let idx = reader.idx + 1;
            reader = Reader::new(next, idx, 0);
            continue;
        }
        if over {
            asm.finish();
            send(&mut asm, &out, &cancel).await;
            return Ok(());
        }
        if !is_running() || !logs.dir.exists() || runs_after(&logs.dir, run)? {
            // One more pass: what the run wrote before it ended, rotations included.
            over = true;
            continue;
        }
        if !send(&mut asm, &out, &cancel).await {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(FOLLOW_POLL) => {}
            _ = cancel.cancelled() => return Ok(()),
            _ = out.closed() => return Ok(()),
        }
    }
}

/// Whether a run newer than `run` has started (its file exists).
fn runs_after(dir: &Path, run: u32) -> Result<bool, LogError> {
    Ok(runs(dir)?.range(run + 1..).next().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::logs::{ContainerLog, Stream};
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn opts(query: &str) -> LogOptions {
        LogOptions::from_query(query).expect("valid query")
    }

    fn bad(query: &str) -> String {
        match LogOptions::from_query(query) {
            Err(e @ LogError::BadRequest(_)) => {
                assert_eq!(e.http_status(), 400);
                e.to_string()
            }
            other => panic!("{query}: expected BadRequest, got {other:?}"),
        }
    }

    #[test]
    fn queries_parse_as_the_kubelet_takes_them() {
        assert_eq!(opts(""), LogOptions::default());
        let o =
            opts("follow=true&tailLines=10&timestamps=1&previous=false&limitBytes=100&container=main&x=%zz");
        assert_eq!(
            o,
            LogOptions {
                follow: true,
                timestamps: true,
                tail_lines: Some(10),
                limit_bytes: Some(100),
                ..Default::default()
            }
        );
        assert!(opts("?follow").follow, "a bare flag is true");
        assert!(!opts("follow=false&follow=true").follow, "the first value counts");
        assert_eq!(opts("tailLines=0").tail_lines, Some(0));
        let t = opts("sinceTime=2024-05-01T12%3A00%3A00%2B02%3A00").since.expect("since");
        assert_eq!(t, "2024-05-01T10:00:00Z".parse::<Timestamp>().expect("ts"));
        let before = Timestamp::now();
        let since = opts("sinceSeconds=60").since.expect("since");
        let ago = before.as_second() - since.as_second();
        assert!((59..=61).contains(&ago), "{ago}");
        assert_eq!(opts(&format!("sinceSeconds={}", u64::MAX)).since, Some(Timestamp::MIN));

        assert!(bad("follow=yes").contains("follow"));
        assert!(bad("tailLines=-1").contains("tailLines"));
        assert!(bad("tailLines=ten").contains("tailLines"));
        assert!(bad("limitBytes=0").contains("limitBytes"));
        assert!(bad("sinceSeconds=0").contains("sinceSeconds"));
        assert!(bad("sinceTime=yesterday").contains("sinceTime"));
        assert!(bad("tailLines=%4").contains("tailLines"), "a broken escape names the parameter");
        assert!(bad("sinceSeconds=5&sinceTime=2024-05-01T10:00:00Z").contains("at most one of"));
    }

    /// A container directory with a fake pod around it.
    fn logs_in(dir: &Path) -> ContainerLogs {
        ContainerLogs { dir: dir.to_owned(), pod_key: "ns/p".into(), uid: "u".into(), container: "c".into() }
    }

    fn always(v: bool) -> Arc<dyn Fn() -> bool + Send + Sync> {
        Arc::new(move || v)
    }

    /// Runs `stream` to its end and returns everything it sent.
    async fn read(logs: &ContainerLogs, opts: LogOptions) -> Result<String, LogError> {
        let (tx, mut rx) = mpsc::channel(4);
        let task = tokio::spawn(stream(logs.clone(), opts, always(false), tx, CancellationToken::new()));
        let mut out = Vec::new();
        while let Some(chunk) = rx.recv().await {
            out.extend(chunk);
        }
        task.await.expect("join")?;
        Ok(String::from_utf8(out).expect("utf-8"))
    }

    /// Writes a CRI record by hand, at a chosen time.
    fn record(file: &mut File, time: &str, stream: &str, tag: &str, text: &str) {
        writeln!(file, "{time} {stream} {tag} {text}").expect("write");
    }

    #[tokio::test]
    async fn runs_are_read_back_with_tail_since_timestamps_and_limits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = logs_in(dir.path());
        // Run 0, the previous one, written at a known time.
        let mut f = File::create(dir.path().join("0.log")).expect("0.log");
        record(&mut f, "2024-05-01T10:00:00Z", "stdout", "F", "first run");
        drop(f);
        // Run 1, rotated small: it spans several files.
        let log = ContainerLog::open(dir.path(), 1, 1024, 20, None).expect("open");
        for i in 0..150 {
            let stream = if i % 10 == 9 { Stream::Stderr } else { Stream::Stdout };
            log_line(&log, stream, &format!("line {i:03}")).await;
        }
        log.finish();
        assert!(dir.path().join("1.log.2").exists(), "the run spans rotated files");
        assert!(dir.path().join("0.log").exists(), "the previous run is kept");

        let all = read(&logs, LogOptions::default()).await.expect("read");
        let lines: Vec<&str> = all.lines().collect();
        assert_eq!(lines.len(), 150);
        assert_eq!(lines[0], "line 000");
        assert_eq!(lines[149], "line 149");
        assert!(lines.windows(2).all(|w| w[0] < w[1]), "in order across rotations");

        let tail = read(&logs, LogOptions { tail_lines: Some(3), ..Default::default() }).await.expect("tail");
        assert_eq!(tail, "line 147\nline 148\nline 149\n");
        let none =
            read(&logs, LogOptions { tail_lines: Some(0), ..Default::default() }).await.expect("tail 0");
        assert_eq!(none, "");
        let more =
            read(&logs, LogOptions { tail_lines: Some(1000), ..Default::default() }).await.expect("tail");
        assert_eq!(more, all);

        let stamped = read(&logs, LogOptions { timestamps: true, tail_lines: Some(1), ..Default::default() })
            .await
            .expect("timestamps");
        let (time, text) = stamped.trim_end().split_once(' ').expect("a timestamp and the text");
        assert_eq!(text, "line 149");
        let t: Timestamp = time.parse().expect("an RFC 3339 timestamp");
        assert!((Timestamp::now().as_second() - t.as_second()).abs() < 60);

        let limited =
            read(&logs, LogOptions { limit_bytes: Some(13), ..Default::default() }).await.expect("limit");
        assert_eq!(limited, "line 000\nline");

        let future = Timestamp::now().checked_add(jiff::SignedDuration::from_hours(1)).expect("ts");
        let since =
            read(&logs, LogOptions { since: Some(future), ..Default::default() }).await.expect("since");
        assert_eq!(since, "");

        let prev = read(&logs, LogOptions { previous: true, timestamps: true, ..Default::default() })
            .await
            .expect("previous");
        assert_eq!(prev, "2024-05-01T10:00:00Z first run\n");
        let since_prev = read(
            &logs,
            LogOptions {
                previous: true,
                since: Some("2024-05-01T10:00:01Z".parse().expect("ts")),
                ..Default::default()
            },
        )
        .await
        .expect("previous since");
        assert_eq!(since_prev, "");
    }

    async fn log_line(log: &Arc<ContainerLog>, stream: Stream, text: &str) {
        use tokio::io::AsyncWriteExt;
        log.sink(stream).write_all(format!("{text}\n").as_bytes()).await.expect("write");
    }

    #[test]
    fn a_tail_without_follow_is_the_lines_there_when_it_was_asked() {
        // The plan found where the last line began; the container writes another before the read
        // reaches the end. `--tail 1` still prints one line.
        let opts = LogOptions { tail_lines: Some(1), ..Default::default() };
        let mut asm = Assembler::new(&opts, [None, None]);
        asm.record(Pos { file: 0, offset: 0 }, b"2024-05-01T10:00:00Z stdout F tick 27");
        asm.record(Pos { file: 0, offset: 40 }, b"2024-05-01T10:00:01Z stdout F tick 28");
        asm.finish();
        assert_eq!(String::from_utf8_lossy(&asm.out), "tick 27\n");
        // Following, new lines are the point.
        let follow = LogOptions { follow: true, ..opts };
        let mut asm = Assembler::new(&follow, [None, None]);
        asm.record(Pos { file: 0, offset: 0 }, b"2024-05-01T10:00:00Z stdout F tick 27");
        asm.record(Pos { file: 0, offset: 40 }, b"2024-05-01T10:00:01Z stdout F tick 28");
        assert_eq!(String::from_utf8_lossy(&asm.out), "tick 27\ntick 28\n");
    }

    #[tokio::test]
    async fn partial_records_are_joined_into_their_lines_and_tails_count_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = logs_in(dir.path());
        let mut f = File::create(dir.path().join("0.log.1")).expect("rotated");
        let t = |s: u32| format!("2024-05-01T10:00:{s:02}Z");
        record(&mut f, &t(0), "stdout", "F", "before");
        record(&mut f, &t(1), "stdout", "P", "long ");
        record(&mut f, &t(2), "stderr", "F", "interleaved");
        drop(f);
        // The line goes on in the next file.
        let mut f = File::create(dir.path().join("0.log")).expect("live");
        record(&mut f, &t(3), "stdout", "P", "line ");
        record(&mut f, &t(4), "stdout", "F", "ends");
        record(&mut f, &t(5), "stderr", "P", "cut off");
        drop(f);

        let all = read(&logs, LogOptions { timestamps: true, ..Default::default() }).await.expect("read");
        assert_eq!(
            all,
            format!("{} before\n{} interleaved\n{} long line ends\n{} cut off\n", t(0), t(2), t(1), t(5))
        );
        // The last line is the joined one (the unfinished one is not a line yet, but is shown).
        let tail = read(&logs, LogOptions { tail_lines: Some(1), ..Default::default() }).await.expect("tail");
        assert_eq!(tail, "long line ends\ncut off\n");
        let tail = read(&logs, LogOptions { tail_lines: Some(2), ..Default::default() }).await.expect("tail");
        assert_eq!(tail, "interleaved\nlong line ends\ncut off\n");
        let since = read(&logs, LogOptions { since: Some(t(2).parse().expect("ts")), ..Default::default() })
            .await
            .expect("since");
        assert_eq!(since, "interleaved\ncut off\n", "a line's time is its first piece's");
    }

    #[tokio::test]
    async fn missing_runs_are_clear_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = logs_in(&dir.path().join("c"));
        let e = read(&logs, LogOptions::default()).await.expect_err("no log yet");
        assert_eq!(e.http_status(), 400, "{e}");
        std::fs::create_dir_all(&logs.dir).expect("dir");
        std::fs::write(logs.dir.join("0.log"), "").expect("log");
        assert_eq!(read(&logs, LogOptions::default()).await.expect("empty"), "");
        let e =
            read(&logs, LogOptions { previous: true, ..Default::default() }).await.expect_err("no previous");
        assert_eq!(e.http_status(), 404);
        assert_eq!(e.to_string(), "previous terminated container \"c\" in pod \"ns/p\" not found");
    }

    /// Collects what a follower sends, as it arrives.
    struct Follower {
        rx: mpsc::Receiver<Vec<u8>>,
        got: String,
        task: tokio::task::JoinHandle<Result<(), LogError>>,
    }

    impl Follower {
        fn start(logs: &ContainerLogs, opts: LogOptions, running: Arc<AtomicBool>) -> Self {
            let (tx, rx) = mpsc::channel(4);
            let probe = Arc::new(move || running.load(Ordering::SeqCst));
            let task = tokio::spawn(stream(logs.clone(), opts, probe, tx, CancellationToken::new()));
            Follower { rx, got: String::new(), task }
        }

        async fn wait_for(&mut self, text: &str) {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while !self.got.contains(text) {
                match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                    Ok(Some(chunk)) => self.got.push_str(std::str::from_utf8(&chunk).expect("utf-8")),
                    Ok(None) => panic!("the follower ended before {text:?}; got {:?}", self.got),
                    Err(_) => panic!("timed out waiting for {text:?}; got {:?}", self.got),
                }
            }
        }

        async fn end(mut self) -> String {
            let ended = tokio::time::timeout(Duration::from_secs(10), async {
                while let Some(chunk) = self.rx.recv().await {
                    self.got.push_str(std::str::from_utf8(&chunk).expect("utf-8"));
                }
            })
            .await;
            assert!(ended.is_ok(), "the follower did not end; got {:?}", self.got);
            self.task.await.expect("join").expect("stream");
            self.got
        }
    }

    #[tokio::test]
    async fn follow_picks_up_new_lines_across_rotation_and_stops_when_the_run_ends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = logs_in(dir.path());
        let log = ContainerLog::open(dir.path(), 0, 4096, 3, None).expect("open");
        log_line(&log, Stream::Stdout, "old 1").await;
        log_line(&log, Stream::Stdout, "old 2").await;
        let running = Arc::new(AtomicBool::new(true));
        let mut f = Follower::start(
            &logs,
            LogOptions { follow: true, tail_lines: Some(1), ..Default::default() },
            running.clone(),
        );
        f.wait_for("old 2\n").await;
        assert!(!f.got.contains("old 1"), "tail 1: {:?}", f.got);
        log_line(&log, Stream::Stdout, "new 1").await;
        f.wait_for("new 1\n").await;
        // Enough to rotate twice (the max_files of 3 keeps them all).
        for i in 0..120 {
            log_line(&log, Stream::Stdout, &format!("rotating {i:03} padding padding padding")).await;
        }
        assert!(dir.path().join("0.log.2").exists(), "rotated twice");
        f.wait_for("rotating 119").await;
        // The run ends with a last line written just before the container state changes.
        log_line(&log, Stream::Stderr, "last words").await;
        running.store(false, Ordering::SeqCst);
        let got = f.end().await;
        let lines: Vec<&str> = got.lines().collect();
        assert_eq!(lines.len(), 1 + 1 + 120 + 1, "every line once: {got:?}");
        assert_eq!(lines.last(), Some(&"last words"));
    }

    #[tokio::test]
    async fn a_new_run_ends_a_follow_and_so_does_a_dropped_receiver() {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = logs_in(dir.path());
        let log = ContainerLog::open(dir.path(), 0, 1 << 20, 3, None).expect("open");
        log_line(&log, Stream::Stdout, "run 0").await;
        let mut f = Follower::start(
            &logs,
            LogOptions { follow: true, ..Default::default() },
            Arc::new(AtomicBool::new(true)),
        );
        f.wait_for("run 0\n").await;
        log_line(&log, Stream::Stdout, "run 0 again").await;
        log.finish();
        // The container restarts: run 1's file appears while it still reads "running".
        let next = ContainerLog::open(dir.path(), 1, 1 << 20, 3, None).expect("open run 1");
        log_line(&next, Stream::Stdout, "run 1").await;
        let got = f.end().await;
        assert_eq!(got, "run 0\nrun 0 again\n");

        // A reader whose receiver goes away stops.
        let (tx, rx) = mpsc::channel(1);
        let task = tokio::spawn(stream(
            logs.clone(),
            LogOptions { follow: true, ..Default::default() },
            always(true),
            tx,
            CancellationToken::new(),
        ));
        drop(rx);
        let done =
            tokio::time::timeout(Duration::from_secs(5), task).await.expect("stops without a receiver");
        done.expect("join").expect("stream");

        // And so does one that is cancelled.
        let (tx, mut rx) = mpsc::channel(8);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(stream(
            logs.clone(),
            LogOptions { follow: true, ..Default::default() },
            always(true),
            tx,
            cancel.clone(),
        ));
        assert_eq!(rx.recv().await.as_deref(), Some(&b"run 1\n"[..]));
        cancel.cancel();
        let done = tokio::time::timeout(Duration::from_secs(5), task).await.expect("stops when cancelled");
        done.expect("join").expect("stream");
    }

    #[test]
    fn containers_are_found_as_the_api_server_finds_them() {
        let dir = Path::new("/state/logs");
        let pod = PodContainers {
            key: "ns/web".into(),
            uid: "u1".into(),
            containers: vec!["app".into(), "side".into()],
            init_containers: vec!["setup".into()],
        };
        let l = locate_in(&pod, dir, Some("setup")).expect("init containers count");
        assert_eq!(l.dir, Path::new("/state/logs/ns_web_u1/setup"));
        let e = locate_in(&pod, dir, None).expect_err("two containers");
        assert_eq!(
            e.to_string(),
            "a container name must be specified for pod web, choose one of: [app side] or one of the init containers: [setup]"
        );
        assert_eq!(e.http_status(), 400);
        let e = locate_in(&pod, dir, Some("nope")).expect_err("unknown");
        assert_eq!(e.http_status(), 404);
        assert!(e.to_string().contains("\"nope\""), "{e}");
        let one = PodContainers { containers: vec!["app".into()], ..pod };
        assert_eq!(locate_in(&one, dir, None).expect("the only one").container, "app");
    }

    #[test]
    fn locate_reads_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::SledStore::open(&dir.path().join("store")).expect("store");
        let pod = serde_json::json!({
            "metadata": {"name": "web", "namespace": "ns"},
            "spec": {"containers": [{"name": "app"}, {"name": "side"}], "initContainers": [{"name": "setup"}]}
        });
        store
            .put_pod(&crate::store::PodRecord {
                key: "ns/web".into(),
                uid: "u2".into(),
                source: crate::store::PodSource::Api,
                pod,
                status: None,
                restart_counts: Default::default(),
                inputs: None,
            })
            .expect("put");
        let logs = dir.path().join("logs");
        let l = locate(&store, &logs, "ns", "web", Some("side")).expect("found");
        assert_eq!((l.pod_key.as_str(), l.uid.as_str()), ("ns/web", "u2"));
        assert_eq!(l.dir, logs.join("ns_web_u2/side"));
        let e = locate(&store, &logs, "default", "web", None).expect_err("other namespace");
        assert_eq!(e.http_status(), 404);
        assert_eq!(e.to_string(), "pod \"default/web\" not found on this node");
    }
}
