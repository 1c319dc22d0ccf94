//! Writing a container run's stdout and stderr to its log file: bytes in, CRI records out
//! ([`super::record_line`]), lines longer than [`MAX_LINE`] split into partial records, the file
//! rotated by size (`<run>.log` → `<run>.log.1` → …) and the runs before the previous one removed,
//! so `--previous` stays readable after a restart.
//!
//! It takes bytes and knows nothing of where they come from: tying a [`ContainerLog`] to a Wasm
//! module's stdout and stderr is the runtime's (`runtime::logs`). A write never fails the caller:
//! a full disk must not kill the module, so a failed write is reported once and the output dropped.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{MAX_LINE, Stream, file_name, parse_file_name, record_line, rotated_name};

/// One container run's log file.
pub struct ContainerLog {
    state: Mutex<LogFile>,
    echo: Option<String>,
}

struct LogFile {
    dir: PathBuf,
    run: u32,
    /// `<dir>/<run>.log`, the live file.
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
            let old_run = parse_file_name(&entry.file_name().to_string_lossy()).map(|(r, _)| r);
            if old_run.is_some_and(|r| r + 1 < run || r > run) {
                let _ = fs::remove_file(entry.path());
            }
        }
        let path = dir.join(file_name(run));
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let size = file.metadata()?.len();
        Ok(Arc::new(ContainerLog {
            state: Mutex::new(LogFile {
                dir: dir.to_owned(),
                run,
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

    /// Appends output of `stream`: each complete line becomes a record; an unterminated end is
    /// held until its line ends (or [`MAX_LINE`] bytes of it are written as a partial record).
    pub fn write(&self, stream: Stream, mut bytes: &[u8]) {
        let Ok(mut f) = self.state.lock() else { return };
        let idx = stream.index();
        while let Some(nl) = bytes.iter().position(|&b| b == b'\n') {
            let mut line = std::mem::take(&mut f.partial[idx]);
            line.extend_from_slice(&bytes[..nl]);
            self.record(&mut f, stream, true, &line);
            bytes = &bytes[nl + 1..];
        }
        f.partial[idx].extend_from_slice(bytes);
        while f.partial[idx].len() >= MAX_LINE {
            let rest = f.partial[idx].split_off(MAX_LINE);
            let chunk = std::mem::replace(&mut f.partial[idx], rest);
            self.record(&mut f, stream, false, &chunk);
        }
    }

    /// Writes out unterminated lines; called when the run ends.
    pub fn finish(&self) {
        let Ok(mut f) = self.state.lock() else { return };
        for stream in [Stream::Stdout, Stream::Stderr] {
            let line = std::mem::take(&mut f.partial[stream.index()]);
            if !line.is_empty() {
                self.record(&mut f, stream, true, &line);
            }
        }
        if let Some(file) = f.file.as_mut() {
            let _ = file.flush();
        }
    }

    fn record(&self, f: &mut LogFile, stream: Stream, complete: bool, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        if let Some(label) = &self.echo {
            tracing::info!(target: "lichen::container", container = %label, stream = stream.name(), "{text}");
        }
        let record = record_line(jiff::Timestamp::now(), stream, complete, &text);
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
        let rotated = |i: u32| self.dir.join(rotated_name(self.run, i));
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

#[cfg(test)]
mod tests {
    use super::super::read_run;
    use super::*;

    #[test]
    fn lines_are_framed_split_and_rotated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = ContainerLog::open(dir.path(), 0, 4096, 3, None).expect("open");
        log.write(Stream::Stdout, b"hel");
        log.write(Stream::Stdout, b"lo\nwor");
        log.write(Stream::Stderr, b"oops\n");
        log.finish();
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
