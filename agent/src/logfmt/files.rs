//! The files of one run, as a reader sees them: which runs a directory holds, the run's files in
//! reading order (oldest rotated file first, the live file last), opened once and tracked by inode,
//! the file that follows one that was rotated away, and reading a file forwards in blocks.
//!
//! It only reads. The files belong to the writer, which may rotate or delete them at any moment, so
//! every file is read through a handle opened once (a rename or unlink does not disturb it) and
//! identified by its inode, never by its name. Records are not parsed here: lines are handed out
//! whole to the caller, which parses them with [`super::Record::parse`].

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::{LogError, MAX_RECORD, parse_file_name};

/// Bytes read from a file at a time, forwards or backwards.
pub(super) const BLOCK: usize = 64 * 1024;

/// The run numbers that have files in `dir` (none if it does not exist).
pub(super) fn runs(dir: &Path) -> Result<BTreeSet<u32>, LogError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(e) => return Err(LogError::io_at(dir)(e)),
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
        Err(e) => return Err(LogError::io_at(dir)(e)),
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
pub(super) struct RunFile {
    pub(super) path: PathBuf,
    pub(super) file: File,
    pub(super) id: (u64, u64),
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
pub(super) fn open_run(dir: &Path, run: u32) -> Result<Vec<RunFile>, LogError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let listed = list_run(dir, run)?;
        let mut files = Vec::with_capacity(listed.len());
        for l in &listed {
            match open_listed(l).map_err(LogError::io_at(&l.path))? {
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
pub(super) fn next_file(dir: &Path, run: u32, current: (u64, u64)) -> Result<Option<RunFile>, LogError> {
    for _ in 0..10 {
        let listed = list_run(dir, run)?;
        let next = match listed.iter().position(|l| l.id == current) {
            Some(i) => listed.get(i + 1),
            // Rotation deletes the oldest files first: all that are left are newer than it.
            None => listed.first(),
        };
        let Some(next) = next else { return Ok(None) };
        if let Some(f) = open_listed(next).map_err(LogError::io_at(&next.path))? {
            return Ok(Some(f));
        }
        // Renamed between the listing and the open: look again.
    }
    Ok(None)
}

/// Where a record starts: which file of the run (in reading order) and the byte offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Pos {
    pub(super) file: usize,
    pub(super) offset: u64,
}

/// Reads a file forwards from an offset, a block at a time, handing out complete record lines.
pub(super) struct Reader {
    pub(super) file: RunFile,
    pub(super) idx: usize,
    /// File offset of `buf[0]`.
    offset: u64,
    buf: Vec<u8>,
    /// Inside a line longer than MAX_RECORD, which is dropped up to its newline.
    skipping: bool,
}

impl Reader {
    pub(super) fn new(file: RunFile, idx: usize, offset: u64) -> Self {
        Reader { file, idx, offset, buf: Vec::new(), skipping: false }
    }

    /// Reads one more block and calls `record` for each complete line in it; returns false at the
    /// end of the file (for now: a live file grows).
    pub(super) fn step(&mut self, mut record: impl FnMut(Pos, &[u8])) -> io::Result<bool> {
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

/// Whether a run newer than `run` has started (its file exists).
pub(super) fn runs_after(dir: &Path, run: u32) -> Result<bool, LogError> {
    Ok(runs(dir)?.range(run + 1..).next().is_some())
}
