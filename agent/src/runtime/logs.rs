//! A container's stdout and stderr as WASI sees them: an [`OutputSink`] per stream, writing into
//! the run's [`ContainerLog`] and, for stdout, optionally a copy to a tap (the MQTT bridge).
//!
//! This file only ties the log writer to Wasmtime/WASI; the log format, the writer (framing,
//! rotation) and the reader are [`crate::logfmt`]'s, and nothing here may frame or parse records.
//! [`ContainerLog`], [`Stream`], [`LogRecord`] and [`read_run`] are re-exported so that whoever
//! runs a module and reads its output back (the suites, the benchmarks) needs one path.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

pub use crate::logfmt::Stream;
pub use crate::logfmt::{ContainerLog, LogRecord, read_run};

/// The most bytes one write hands to a tap (a longer write is taken in parts), which bounds the
/// memory a tap's channel can hold.
pub const MAX_TAP_CHUNK: usize = 64 * 1024;

impl ContainerLog {
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

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    #[tokio::test]
    async fn sinks_write_their_stream_and_a_tap_gets_a_copy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = ContainerLog::open(dir.path(), 0, 1 << 20, 2, None).expect("open");
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let mut out = log.sink_with_tap(Stream::Stdout, Some(tx));
        let mut err = log.sink(Stream::Stderr);
        out.write_all(b"hel").await.expect("write");
        err.write_all(b"oops\n").await.expect("write");
        out.write_all(b"lo\nwor").await.expect("write");
        out.finish();
        let recs = read_run(dir.path(), 0).expect("read");
        let texts: Vec<_> = recs.iter().map(|r| (r.stream, r.text.as_str())).collect();
        assert_eq!(texts, vec![(Stream::Stderr, "oops"), (Stream::Stdout, "hello"), (Stream::Stdout, "wor")]);
        let mut tapped = Vec::new();
        while let Ok(chunk) = rx.try_recv() {
            tapped.extend(chunk);
        }
        assert_eq!(tapped, b"hello\nwor", "the tap sees stdout as written");
    }

    #[tokio::test]
    async fn a_tap_takes_long_writes_in_parts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = ContainerLog::open(dir.path(), 0, 1 << 20, 2, None).expect("open");
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let mut out = log.sink_with_tap(Stream::Stdout, Some(tx));
        let n = out.write(&vec![b'x'; MAX_TAP_CHUNK + 1]).await.expect("write");
        assert_eq!(n, MAX_TAP_CHUNK);
        assert_eq!(rx.try_recv().expect("a chunk").len(), MAX_TAP_CHUNK);
        drop(rx);
        let n = out.write(b"after\n").await.expect("a gone tap is ignored");
        assert_eq!(n, 6);
    }
}
