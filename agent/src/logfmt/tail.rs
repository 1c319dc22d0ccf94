//! Where a tail begins: the last N lines of a run found by reading its files backwards, a block
//! at a time, so a tail of a large log costs a few blocks, not the whole file.
//!
//! It plans and does not send: the reader then reads forwards from the plan's start. It must not
//! hold a file in memory, and it parses records only through [`Record::parse`].

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::files::{BLOCK, Pos, RunFile};
use super::{MAX_HEADER, MAX_JOINED, Record};

/// How far back a tail looks for the first piece of a line whose end it has found, beyond the
/// last record it kept (a line's pieces lie close together; MAX_JOINED would be sent in pieces).
const TAIL_SLACK: u64 = 2 * MAX_JOINED as u64;

/// What a tail keeps: records from `start` on, except those of a stream at or before its
/// `boundary` (lines older than the tail that interleave with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TailPlan {
    pub(super) start: Pos,
    pub(super) boundary: [Option<Pos>; 2],
}

impl TailPlan {
    pub(super) fn everything() -> Self {
        TailPlan { start: Pos { file: 0, offset: 0 }, boundary: [None; 2] }
    }
}

/// Finds where the last `n` lines begin by reading the files backwards, a block at a time.
///
/// Each line ends with one `F` record; its `P` pieces come before it, possibly interleaved with the
/// other stream's records. Going backwards, the first `n` `F` records are the tail; a tail line of a
/// stream begins after that stream's previous `F`, which becomes the stream's boundary.
pub(super) fn plan_tail(files: &[RunFile], n: u64) -> io::Result<TailPlan> {
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
            match Record::parse(head).map(|r| (r.stream.index(), r.complete)) {
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
    let mut head = [0u8; MAX_HEADER];
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
    head: &mut [u8; MAX_HEADER],
    start: u64,
    end: u64,
    block_start: u64,
    block: &[u8],
) -> io::Result<usize> {
    let n = usize::try_from(end - start).unwrap_or(MAX_HEADER).min(MAX_HEADER);
    let block_end = block_start + block.len() as u64;
    if start >= block_start && start + n as u64 <= block_end {
        let from = (start - block_start) as usize;
        head[..n].copy_from_slice(&block[from..from + n]);
    } else {
        file.read_exact_at(&mut head[..n], start)?;
    }
    Ok(n)
}
