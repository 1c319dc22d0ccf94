//! Reading a container's run back as the kubelet does, for the kubelet API's `containerLogs` and
//! for `lichen logs`: the text of each line (its `P` pieces joined), optionally after its
//! timestamp, filtered by time, tail and size, and with `follow` the lines written after, across
//! rotations, until the run is over. [`read_run`] reads a whole run as records, for tests and
//! benchmarks.
//!
//! It only reads, and its memory stays bounded whatever the files hold: a tail is found by reading
//! the files backwards (`tail.rs`), files are read through handles tracked by inode
//! (`files.rs`), and lines are sent on in chunks. Records are parsed by [`Record::parse`]
//! alone. It knows a log directory, not a pod: finding the directory of a pod's container is the
//! pod's side (`pod::logs`), and spelling [`LogOptions`] as a URL query is the kubelet's.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::files::{Pos, Reader, next_file, open_run, runs, runs_after};
use super::tail::{TailPlan, plan_tail};
use super::{LogError, MAX_JOINED, Record, Stream};

/// How long a follower sleeps between looks at the file: short enough that `-f` feels live, long
/// enough that an idle follower costs nothing.
const FOLLOW_POLL: Duration = Duration::from_millis(200);
/// Output is sent in chunks of about this size.
const CHUNK: usize = 32 * 1024;

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

/// A container's log directory, and who it belongs to (for messages).
#[derive(Debug, Clone)]
pub struct ContainerLogs {
    /// The directory holding the container's runs; where it lies is the pod side's choice.
    pub dir: PathBuf,
    /// `namespace/name`.
    pub pod_key: String,
    /// The pod's UID.
    pub uid: String,
    /// The container's name.
    pub container: String,
}

/// One record of a run, as [`read_run`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    /// The time it was written, RFC 3339.
    pub time: String,
    /// Which stream.
    pub stream: Stream,
    /// Whether the line was complete (`F`) or a piece of a longer one (`P`).
    pub complete: bool,
    /// The text.
    pub text: String,
}

/// Reads every record of run `run` in `dir`, oldest rotated file first, as the streaming reader
/// sees them: complete record lines only (a record still being written is not one yet), lines
/// that are not records skipped. A missing `dir` is an error. It holds the whole run in memory:
/// for tests and benchmarks, not for serving logs.
pub fn read_run(dir: &Path, run: u32) -> Result<Vec<LogRecord>, LogError> {
    std::fs::metadata(dir).map_err(LogError::io_at(dir))?;
    let mut out = Vec::new();
    for (idx, file) in open_run(dir, run)?.into_iter().enumerate() {
        let mut reader = Reader::new(file, idx, 0);
        let mut more = true;
        while more {
            more = reader
                .step(|_, line| {
                    if let Some(r) = Record::parse(line) {
                        out.push(LogRecord {
                            time: String::from_utf8_lossy(r.time).into_owned(),
                            stream: r.stream,
                            complete: r.complete,
                            text: String::from_utf8_lossy(r.text).into_owned(),
                        });
                    }
                })
                .map_err(LogError::io_at(&reader.file.path))?;
        }
    }
    Ok(out)
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
        let Some(Record { time, stream, complete, text }) = Record::parse(line) else { return };
        let s = stream.index();
        if self.boundary[s].is_some_and(|b| pos <= b) {
            return;
        }
        if complete && self.lines_left == Some(0) {
            return;
        }
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
        let more =
            reader.step(|pos, line| asm.record(pos, line)).map_err(LogError::io_at(&reader.file.path))?;
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
            Some(n) => plan_tail(&files, n).map_err(LogError::io_at(&dir))?,
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

#[cfg(test)]
mod tests {
    use super::super::ContainerLog;
    use super::*;
    use std::fs::File;
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};

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
            log_line(&log, stream, &format!("line {i:03}"));
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

    fn log_line(log: &Arc<ContainerLog>, stream: Stream, text: &str) {
        log.write(stream, format!("{text}\n").as_bytes());
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
        log_line(&log, Stream::Stdout, "old 1");
        log_line(&log, Stream::Stdout, "old 2");
        let running = Arc::new(AtomicBool::new(true));
        let mut f = Follower::start(
            &logs,
            LogOptions { follow: true, tail_lines: Some(1), ..Default::default() },
            running.clone(),
        );
        f.wait_for("old 2\n").await;
        assert!(!f.got.contains("old 1"), "tail 1: {:?}", f.got);
        log_line(&log, Stream::Stdout, "new 1");
        f.wait_for("new 1\n").await;
        // Enough to rotate twice (the max_files of 3 keeps them all).
        for i in 0..120 {
            log_line(&log, Stream::Stdout, &format!("rotating {i:03} padding padding padding"));
        }
        assert!(dir.path().join("0.log.2").exists(), "rotated twice");
        f.wait_for("rotating 119").await;
        // The run ends with a last line written just before the container state changes.
        log_line(&log, Stream::Stderr, "last words");
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
        log_line(&log, Stream::Stdout, "run 0");
        let mut f = Follower::start(
            &logs,
            LogOptions { follow: true, ..Default::default() },
            Arc::new(AtomicBool::new(true)),
        );
        f.wait_for("run 0\n").await;
        log_line(&log, Stream::Stdout, "run 0 again");
        log.finish();
        // The container restarts: run 1's file appears while it still reads "running".
        let next = ContainerLog::open(dir.path(), 1, 1 << 20, 3, None).expect("open run 1");
        log_line(&next, Stream::Stdout, "run 1");
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
}
