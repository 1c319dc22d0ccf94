//! The container log format, in one place: the CRI format the kubelet writes and reads.
//!
//! - **Files**: one directory per container; run `<run>` (the container's restart count) is
//!   written to `<run>.log` and rotated by size to `<run>.log.1`, `<run>.log.2`, … (`.1` the
//!   newest rotated file). [`file_name`], [`rotated_name`] and [`parse_file_name`] are the only
//!   spellings of these names.
//! - **Records**: one line each, `<RFC 3339 time> <stdout|stderr> <F|P> <text>\n`; `F` ends a line,
//!   `P` is a piece of a line longer than [`MAX_LINE`] whose next pieces follow. [`record_line`]
//!   writes one and [`Record::parse`] is the one parser every reader of records uses.
//! - [`writer`]: a run's log file, framed and rotated ([`ContainerLog`]).
//! - [`reader`]: streaming a run back as the kubelet does (tail, since, follow, limit), and
//!   [`read_run`] for reading a whole run at once.
//!
//! This is the ground floor: it knows files and bytes, nothing of pods, the store, the runtime or
//! HTTP. It must import nothing from the crate above the ground floor; who owns a log directory
//! (the pod's side) and how a request spells its options (the kubelet's query) live upstairs.

use std::io;
use std::path::{Path, PathBuf};

mod files;
pub mod reader;
mod tail;
pub mod writer;

pub use reader::{ContainerLogs, LogOptions, LogRecord, read_run, stream};
pub use writer::ContainerLog;

/// Longest line the writer keeps whole; longer output is split into partial (`P`) records, as CRI
/// does.
pub const MAX_LINE: usize = 16 * 1024;
/// The longest record line a reader takes: the writer's are at most [`MAX_LINE`] bytes of text
/// plus the header. Longer lines (not from Lichen) are skipped rather than buffered.
pub const MAX_RECORD: usize = 64 * 1024;
/// Bytes of a record that hold its time, stream and tag (the time is at most 35 characters): enough
/// to read to learn a record's stream and whether it ends its line.
pub const MAX_HEADER: usize = 64;

/// Partial records are joined into their line up to this size; beyond it the line is sent on in
/// pieces as they come, so one endless line cannot hold the reader's memory.
const MAX_JOINED: usize = 1 << 20;

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

    /// Maps an I/O error on `path`.
    fn io_at(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
        move |source| LogError::Io { path: path.to_owned(), source }
    }
}

/// Which output stream a record belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl Stream {
    /// The stream's name in a record: `stdout` or `stderr`.
    pub fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }

    /// 0 for stdout, 1 for stderr: an index into per-stream state.
    pub fn index(self) -> usize {
        self as usize
    }

    fn from_name(name: &[u8]) -> Option<Self> {
        match name {
            b"stdout" => Some(Stream::Stdout),
            b"stderr" => Some(Stream::Stderr),
            _ => None,
        }
    }
}

/// The live file of run `run`: `<run>.log`.
pub fn file_name(run: u32) -> String {
    format!("{run}.log")
}

/// The `n`th rotated file of run `run` (1 the newest): `<run>.log.<n>`.
pub fn rotated_name(run: u32, n: u32) -> String {
    format!("{run}.log.{n}")
}

/// The run number and rotation order of a log file name: `3.log` is (3, 0), `3.log.2` is (3, 2);
/// `None` for a name that is not a run's file.
pub fn parse_file_name(name: &str) -> Option<(u32, u32)> {
    let (run, rest) = name.split_once(".log")?;
    let run = run.parse().ok()?;
    match rest {
        "" => Some((run, 0)),
        r => Some((run, r.strip_prefix('.')?.parse().ok()?)),
    }
}

/// One record as written: `<time> <stream> <F|P> <text>\n`.
pub fn record_line(time: jiff::Timestamp, stream: Stream, complete: bool, text: &str) -> String {
    let tag = if complete { 'F' } else { 'P' };
    format!("{time} {} {tag} {text}\n", stream.name())
}

/// A record, borrowed from its line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// The time it was written, as written (RFC 3339).
    pub time: &'a [u8],
    /// Which stream.
    pub stream: Stream,
    /// Whether it ends its line (`F`) rather than being a piece of a longer one (`P`).
    pub complete: bool,
    /// The text (empty if the record has none).
    pub text: &'a [u8],
}

impl<'a> Record<'a> {
    /// Parses one record line (without its newline); `None` for a line that is not a CRI record.
    /// Given only a record's first [`MAX_HEADER`] bytes, the time, stream and tag are whole and the
    /// text is cut short.
    pub fn parse(line: &'a [u8]) -> Option<Self> {
        let mut parts = line.splitn(4, |&b| b == b' ');
        let time = parts.next()?;
        let stream = Stream::from_name(parts.next()?)?;
        let complete = match parts.next()? {
            b"F" => true,
            b"P" => false,
            _ => return None,
        };
        Some(Record { time, stream, complete, text: parts.next().unwrap_or_default() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_round_trip() {
        assert_eq!(parse_file_name(&file_name(3)), Some((3, 0)));
        assert_eq!(parse_file_name(&rotated_name(3, 2)), Some((3, 2)));
        for other in ["x.log", "3.logx", "3.log.", "3.log.a", "3", "3.tmp"] {
            assert_eq!(parse_file_name(other), None, "{other}");
        }
    }

    #[test]
    fn records_round_trip_through_the_one_parser() {
        let time: jiff::Timestamp = "2024-05-01T10:00:00Z".parse().expect("ts");
        let line = record_line(time, Stream::Stderr, false, "a b  c");
        let line = line.strip_suffix('\n').expect("a record ends with a newline");
        let r = Record::parse(line.as_bytes()).expect("a record");
        assert_eq!(
            r,
            Record {
                time: b"2024-05-01T10:00:00Z",
                stream: Stream::Stderr,
                complete: false,
                text: b"a b  c"
            }
        );
        let empty = Record::parse(b"2024-05-01T10:00:00Z stdout F").expect("no text");
        assert_eq!((empty.stream, empty.complete, empty.text), (Stream::Stdout, true, &b""[..]));
        for bad in [&b""[..], b"2024-05-01T10:00:00Z", b"t stdin F x", b"t stdout X x", b"t stdout"] {
            assert_eq!(Record::parse(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
