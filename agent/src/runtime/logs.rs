//! Container stdout and stderr, written to per-run log files in the CRI log format the kubelet uses
//! (`<RFC 3339 time> <stdout|stderr> <F|P> <text>`), rotated by size.
//!
//! Layout: `<dir>/<run>.log`, rotated to `<run>.log.1`, `<run>.log.2`, …; `<run>` is the container's
//! restart count, so the previous run's log stays readable after a restart, and older runs are removed.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

/// Longest line kept whole; longer output is split into partial (`P`) records, as CRI does.
const MAX_LINE: usize = 16 * 1024;
/// The most bytes one write hands to a tap (a longer write is taken in parts), which bounds the
/// memory a tap's channel can hold.
pub const MAX_TAP_CHUNK: usize = 64 * 1024;

/// Which output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// One container run's log file.
pub struct ContainerLog {
    state: Mutex<LogFile>,
    echo: Option<String>,
}

struct LogFile {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    max_size: u64,
    max_files: u32,
    partial: [Vec<u8>; 2],
    write_failed: bool,
}

impl ContainerLog {
    /// Opens the log of run `run` in `dir`, deleting logs of runs before `run - 1`.
    /// `echo`, when set, also prints each line into the agent's log under that label.
    pub fn open(
        dir: &Path,
        run: u32,
        max_size: u64,
        max_files: u32,
        echo: Option<String>,
    ) -> io::Result<Arc<Self>> {
        fs::create_dir_all(dir)?;
        for entry in fs::read_dir(dir)?.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let old_run = name.split('.').next().and_then(|r| r.parse::<u32>().ok());
            if old_run.is_some_and(|r| r + 1 < run || r > run) {
                let _ = fs::remove_file(entry.path());
            }
        }
        let path = dir.join(format!("{run}.log"));
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let size = file.metadata()?.len();
        Ok(Arc::new(ContainerLog {
            state: Mutex::new(LogFile {
                path,
                file: Some(file),
                size,
                max_size,
                max_files,
                partial: [Vec::new(), Vec::new()],
                write_failed: false,
            }),
            echo,
        }))
    }

    /// A stream handle to give to WASI.
    pub fn sink(self: &Arc<Self>, stream: Stream) -> OutputSink {
        OutputSink { log: self.clone(), stream, tap: None }
    }

    /// A stream handle that also sends a copy of every write to `tap` (the MQTT bridge). While the
    /// tap's channel is full the module's writes wait: a tap slows a module down, it never drops
    /// output or grows without bound. A tap whose receiver is gone is ignored.
    pub fn sink_with_tap(
        self: &Arc<Self>,
        stream: Stream,
        tap: Option<tokio::sync::mpsc::Sender<Vec<u8>>>,
    ) -> OutputSink {
        OutputSink { log: self.clone(), stream, tap: tap.map(tokio_util::sync::PollSender::new) }
    }

    fn write(&self, stream: Stream, mut bytes: &[u8]) {
        let Ok(mut f) = self.state.lock() else { return };
        let idx = stream as usize;
        while let Some(nl) = bytes.iter().position(|&b| b == b'\n') {
            let mut line = std::mem::take(&mut f.partial[idx]);
            line.extend_from_slice(&bytes[..nl]);
            self.record(&mut f, stream, b'F', &line);
            bytes = &bytes[nl + 1..];
        }
        f.partial[idx].extend_from_slice(bytes);
        while f.partial[idx].len() >= MAX_LINE {
            let rest = f.partial[idx].split_off(MAX_LINE);
            let chunk = std::mem::replace(&mut f.partial[idx], rest);
            self.record(&mut f, stream, b'P', &chunk);
        }
    }

    /// Writes out unterminated lines; called when the run ends.
    pub fn finish(&self) {
        let Ok(mut f) = self.state.lock() else { return };
        for stream in [Stream::Stdout, Stream::Stderr] {
            let line = std::mem::take(&mut f.partial[stream as usize]);
            if !line.is_empty() {
                self.record(&mut f, stream, b'F', &line);
            }
        }
        if let Some(file) = f.file.as_mut() {
            let _ = file.flush();
        }
    }

    fn record(&self, f: &mut LogFile, stream: Stream, tag: u8, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        if let Some(label) = &self.echo {
            tracing::info!(target: "lichen::container", container = %label, stream = stream.name(), "{text}");
        }
        let record = format!("{} {} {} {}\n", jiff::Timestamp::now(), stream.name(), tag as char, text);
        let result = match f.file.as_mut() {
            Some(file) => file.write_all(record.as_bytes()),
            None => Err(io::Error::other("log file closed")),
        };
        match result {
            Ok(()) => {
                f.size += record.len() as u64;
                if f.size >= f.max_size {
                    f.rotate();
                }
            }
            // A full disk must not kill the module; say so once per run.
            Err(e) if !f.write_failed => {
                f.write_failed = true;
                tracing::warn!(log = %f.path.display(), error = %e, "cannot write container log; output is being dropped");
            }
            Err(_) => {}
        }
    }
}

impl LogFile {
    fn rotate(&mut self) {
        self.file = None;
        let keep = self.max_files.saturating_sub(1);
        let rotated = |i: u32| PathBuf::from(format!("{}.{i}", self.path.display()));
        if keep == 0 {
            let _ = fs::remove_file(&self.path);
        } else {
            let _ = fs::remove_file(rotated(keep));
            for i in (1..keep).rev() {
                let _ = fs::rename(rotated(i), rotated(i + 1));
            }
            let _ = fs::rename(&self.path, rotated(1));
        }
        self.size = 0;
        match OpenOptions::new().create(true).append(true).truncate(false).open(&self.path) {
            Ok(file) => self.file = Some(file),
            Err(e) => {
                tracing::warn!(log = %self.path.display(), error = %e, "cannot reopen container log after rotation")
            }
        }
    }
}

/// One of a container's output streams, given to WASI as stdout or stderr.
#[derive(Clone)]
pub struct OutputSink {
    log: Arc<ContainerLog>,
    stream: Stream,
    tap: Option<tokio_util::sync::PollSender<Vec<u8>>>,
}

impl OutputSink {
    /// Writes out any unterminated line.
    pub fn finish(&self) {
        self.log.finish();
    }
}

impl IsTerminal for OutputSink {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for OutputSink {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

// Appends go to the page cache and take microseconds; routing them through a blocking pool would cost
// more than it saves.
impl tokio::io::AsyncWrite for OutputSink {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let Some(tap) = this.tap.as_mut() else {
            this.log.write(this.stream, buf);
            return Poll::Ready(Ok(buf.len()));
        };
        let n = buf.len().min(MAX_TAP_CHUNK);
        match tap.poll_reserve(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(())) => {
                let _ = tap.send_item(buf[..n].to_vec());
            }
            // The bridge is gone (the agent is stopping): keep logging.
            Poll::Ready(Err(_)) => this.tap = None,
        }
        this.log.write(this.stream, &buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// One record read back from a log file.
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

/// Reads every record of run `run` in `dir`, oldest rotated file first.
pub fn read_run(dir: &Path, run: u32) -> io::Result<Vec<LogRecord>> {
    let mut files: Vec<(u32, PathBuf)> = Vec::new();
    for entry in fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&format!("{run}.log")) else {
            continue;
        };
        let order = match rest.strip_prefix('.') {
            None if rest.is_empty() => 0,
            Some(n) => match n.parse() {
                Ok(n) => n,
                Err(_) => continue,
            },
            None => continue,
        };
        files.push((order, entry.path()));
    }
    files.sort_by_key(|f| std::cmp::Reverse(f.0));
    let mut out = Vec::new();
    for (_, path) in files {
        for line in fs::read_to_string(path)?.lines() {
            let mut parts = line.splitn(4, ' ');
            let (Some(time), Some(stream), Some(tag)) = (parts.next(), parts.next(), parts.next()) else {
                continue;
            };
            let stream = if stream == "stderr" { Stream::Stderr } else { Stream::Stdout };
            out.push(LogRecord {
                time: time.to_owned(),
                stream,
                complete: tag == "F",
                text: parts.next().unwrap_or("").to_owned(),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_framed_split_and_rotated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = ContainerLog::open(dir.path(), 0, 4096, 3, None).expect("open");
        let out = log.sink(Stream::Stdout);
        log.write(Stream::Stdout, b"hel");
        log.write(Stream::Stdout, b"lo\nwor");
        log.write(Stream::Stderr, b"oops\n");
        out.finish();
        let recs = read_run(dir.path(), 0).expect("read");
        let texts: Vec<_> = recs.iter().map(|r| (r.stream, r.text.as_str())).collect();
        assert_eq!(texts, vec![(Stream::Stdout, "hello"), (Stream::Stderr, "oops"), (Stream::Stdout, "wor")]);

        for i in 0..200 {
            log.write(Stream::Stdout, format!("line {i:04} padding padding padding\n").as_bytes());
        }
        let files = fs::read_dir(dir.path()).expect("dir").count();
        assert_eq!(files, 3, "live file plus max_files - 1 rotated ones");
        let recs = read_run(dir.path(), 0).expect("read");
        assert_eq!(recs.last().map(|r| r.text.as_str()), Some("line 0199 padding padding padding"));
        let nums: Vec<u32> = recs.iter().filter_map(|r| r.text.get(5..9)?.parse().ok()).collect();
        assert!(nums.windows(2).all(|w| w[1] == w[0] + 1), "rotated files read back in order");
    }

    #[test]
    fn long_lines_become_partial_records_and_old_runs_are_pruned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = ContainerLog::open(dir.path(), 0, 1 << 20, 2, None).expect("open");
        log.write(Stream::Stdout, &vec![b'x'; MAX_LINE + 10]);
        log.finish();
        let recs = read_run(dir.path(), 0).expect("read");
        assert_eq!(recs.iter().map(|r| r.complete).collect::<Vec<_>>(), vec![false, true]);
        let _ = ContainerLog::open(dir.path(), 1, 1 << 20, 2, None).expect("run 1");
        let _ = ContainerLog::open(dir.path(), 2, 1 << 20, 2, None).expect("run 2");
        assert!(!dir.path().join("0.log").exists(), "runs before the previous are pruned");
        assert!(dir.path().join("1.log").exists(), "the previous run is kept for --previous");
    }
}
