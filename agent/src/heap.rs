//! How the process holds and gives back memory (ground floor): the allocator's free pages, the
//! objects sled retired but has not freed yet, and the pages of the agent's own binary that
//! start-up or a burst of pod work ran. It imports nothing from the crate; it must not decide when
//! to give memory back, only how (its callers know when a burst of work has ended, or start-up
//! has).
//!
//! glibc's allocator keeps memory that was freed: each thread that allocates gets an arena (up to
//! eight per core), and an arena returns pages to the kernel only from its top, so the pages a
//! burst of pods used stay resident after the pods are gone. Measured on the development machine
//! (release build, 2 cores) with 100 static pods created and deleted: `malloc_trim` after the
//! deletions gave back 60% of what they left (17 MiB more than idle before), and two arenas
//! instead of sixteen kept another 1.5-2.5 MiB less at every reading. One arena instead of two,
//! with a trim again once the pods' tasks had freed their last buffers, held 10.3 MiB of
//! anonymous memory instead of 12.2 after five cycles of 100 pods; the module-output path's QoS 1
//! throughput did not change (29-36k against 31-32k msg/s in alternating runs). Blocks of 32 KiB
//! and more get pages of their own, which go back when the block is freed, instead of leaving
//! holes in the heap that small long-lived objects then fill ([`tune_allocator`]). Other C
//! libraries (musl) keep little, and there all of this does nothing.
//!
//! One more of glibc's habits cannot be changed from here: each thread keeps freed small blocks in
//! a cache of its own (the tcache) that no trim empties, and glibc reads the setting that turns it
//! off (`GLIBC_TUNABLES=glibc.malloc.tcache_count=0`) only when a process starts. The systemd
//! unit sets it (systemd/README.md has the figures).
//!
//! sled frees what it replaces (each version of a tree page a write supersedes, holding every
//! record of that page, old values included) through crossbeam's epoch-based reclamation: a thread
//! collects what it retired in a bag of its own, 64 entries, and hands the bag to the process-wide
//! queue only when it is full; the queue is freed eight bags at a time, on every 128th pin of some
//! thread. So after a burst of pod status writes every runtime thread that wrote kept up to 63
//! retired page versions for as long as it had nothing more to write, and the queue drained at the
//! pace of sled's flusher: live blocks among the burst's freed ones, holding pages no trim can
//! give back ([`on_thread_idle`], [`release_free_memory`]).

/// The allocator arenas the agent's threads share. One: the agent's threads rarely allocate at
/// the same instant on a board's 2-4 cores, and each further arena scatters live objects over
/// pages that can then never be given back (the second arena held 4.2 MiB, 3.75 of it free, after
/// five cycles of 100 pods).
const ARENAS: i32 = 1;

/// The size from which a block gets pages of its own (`mmap`) when the heap has no free space
/// for it, and goes back to the kernel the moment it is freed. glibc's default is 128 KiB, rising
/// (up to 32 MiB on 64-bit boards) each time such a block is freed, so the blocks of 32-128 KiB
/// that start-up and a burst of pods allocate grew the heap. Freed, they leave room the heap
/// hands to the small long-lived objects allocated after them, which can then hold pages no trim
/// gives back. (Which blocks these are was not traced; the figures below are the evidence.)
/// Measured on the development machine (release, x86_64; the edge bench's memory section with the
/// unit's environment; seven runs with a threshold of 8-32 KiB, five without, interleaved), the
/// agent's anonymous memory: idle 1.5 MiB instead of 2.0 in every run; after deleting 100 pods
/// 4.6-5.1 MiB instead of 5.1-5.6; 30 s after 20 cycles of 100 pods 7.4-8.7 MiB instead of
/// 8.7-10.1. The growth over the cycles did not change beyond its noise, nor did QoS 1 throughput
/// or CPU per message in alternating runs.
const MMAP_THRESHOLD: i32 = 32 << 10;

/// Sets the allocator up for a long-running agent on a small board: [`ARENAS`] arenas, blocks of
/// [`MMAP_THRESHOLD`] and more in pages of their own. Call it first thing in `main`, before any
/// thread. (The per-thread cache cannot be set from here: see the module's documentation.)
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        glibc::mallopt(glibc::M_ARENA_MAX, ARENAS);
        glibc::mallopt(glibc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// Frees what is due of the objects sled retired, then returns the allocator's free pages to the
/// kernel. Worth a few milliseconds when the agent has just freed much (pods removed, a module
/// compiled); not on every allocation.
pub fn release_free_memory() {
    free_retired();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    glibc::malloc_trim(0);
}

/// For the runtime's threads as they go idle (tokio's `on_thread_park`): hands this thread's
/// retired objects to the shared queue, where the next [`release_free_memory`] (or any thread's
/// collection) frees them, and frees up to eight bags due there. A thread parks only when it has
/// run out of work, and with an empty bag this is a pin and an unpin: the edge bench's throughput
/// section measured the same agent CPU per QoS 1 line with and without it (16 µs).
pub fn on_thread_idle() {
    crossbeam_epoch::pin().flush();
}

/// Rounds of [`free_retired`]: each moves the epoch on once if no other thread is pinned in an
/// older one, and frees up to eight bags that are two epochs old, so 32 rounds free a queue of up
/// to about 240 bags (15,000 retired objects, where a burst of 100 pods writes 400 statuses).
const FREE_ROUNDS: usize = 32;

/// Hands this thread's retired objects over and frees what the shared queue holds that no thread
/// can still be reading.
fn free_retired() {
    for _ in 0..FREE_ROUNDS {
        crossbeam_epoch::pin().flush();
    }
}

/// The agent's own executable as mapped now: clean copies of the binary (code and read-only
/// data), which [`CodePages::page_out`] asks the kernel to reclaim. Nothing is lost: a page touched
/// again is read back from the page cache, or from the disk if the kernel dropped it. Worth it when
/// work is over, not often: parsing flags and config, the join, opening the store, building TLS
/// and the Wasmtime engine touch about 5 MiB of a 14-20 MB binary that an idle node never runs
/// again, and a burst of pods (manifests, compiling and loading modules, WASI set-up) about as
/// much; those pages otherwise stay in the agent's resident memory (and its cgroup's charge) until
/// the board runs short of memory. Measured on the development machine (release, x86_64,
/// standalone): idle, 12.8 MiB resident after start-up and 6.6-7.0 MiB 30 s after the advice,
/// the idle loop having read back what it runs; with 100 idle pods, 26.4-26.6 and 16.1-16.8 MiB.
///
/// Found and advised in two steps so that the caller can say what it releases before it does:
/// whatever runs after the advice is read straight back (a log line's formatting, which an idle
/// node does not otherwise run, kept about 1 MiB resident).
///
/// Only the executable's own mappings are advised (shared libraries' pages serve other processes
/// too). Kernels before 5.4 do not know `MADV_PAGEOUT` and answer with an error; QEMU's user-mode
/// emulation takes the advice and ignores it.
#[derive(Debug)]
pub struct CodePages {
    ranges: Vec<(usize, usize)>,
}

impl CodePages {
    /// Reads this process's mappings of its executable from `/proc/self/maps`.
    pub fn find() -> std::io::Result<CodePages> {
        #[cfg(target_os = "linux")]
        {
            // The link's text, as maps shows the path (both say " (deleted)" once an upgrade or
            // a package replaced the file); an emulator answers for its guest in both.
            let exe = std::fs::read_link("/proc/self/exe")?;
            let exe = exe.to_str().ok_or_else(|| std::io::Error::other("executable path is not UTF-8"))?;
            let maps = std::fs::read_to_string("/proc/self/maps")?;
            Ok(CodePages { ranges: own_mappings(&maps, exe) })
        }
        #[cfg(not(target_os = "linux"))]
        Ok(CodePages { ranges: Vec::new() })
    }

    /// The bytes of the mappings found (resident or not).
    pub fn mapped_bytes(&self) -> u64 {
        self.ranges.iter().map(|(start, end)| (end - start) as u64).sum()
    }

    /// Asks the kernel to reclaim the pages of these mappings that are resident now.
    pub fn page_out(self) -> std::io::Result<()> {
        #[cfg(target_os = "linux")]
        for &(start, end) in &self.ranges {
            linux::page_out(start, end - start)?;
        }
        Ok(())
    }
}

/// The address ranges of `/proc/self/maps` lines that map the file `exe` without write permission.
fn own_mappings(maps: &str, exe: &str) -> Vec<(usize, usize)> {
    maps.lines()
        .filter_map(|line| {
            // The path is the rest of the line from its first '/': no field before it has one.
            let path = &line[line.find('/')?..];
            let mut fields = line.split_whitespace();
            let (range, perms) = (fields.next()?, fields.next()?);
            if path != exe || perms.contains('w') {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            let (start, end) = (usize::from_str_radix(start, 16).ok()?, usize::from_str_radix(end, 16).ok()?);
            (end > start).then_some((start, end))
        })
        .collect()
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod linux {
    use std::ffi::{c_int, c_void};

    /// `<sys/mman.h>`'s `MADV_PAGEOUT` (Linux 5.4).
    const MADV_PAGEOUT: c_int = 21;

    unsafe extern "C" {
        fn madvise(addr: *mut c_void, len: usize, advice: c_int) -> c_int;
    }

    /// `MADV_PAGEOUT` on `len` bytes at `start`, a range of a read-only file mapping.
    pub fn page_out(start: usize, len: usize) -> std::io::Result<()> {
        // SAFETY: `MADV_PAGEOUT` changes no memory's contents or permissions: it only lets the
        // kernel reclaim the pages now, and a later access faults them back in from their file.
        // The range is a whole mapping of this process (from /proc/self/maps), page-aligned; one
        // unmapped meanwhile makes the call fail with ENOMEM, which is reported, not undefined.
        let rc = unsafe { madvise(start as *mut c_void, len, MADV_PAGEOUT) };
        if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
mod glibc {
    use std::ffi::c_int;

    /// `<malloc.h>`'s `M_ARENA_MAX`.
    pub const M_ARENA_MAX: c_int = -8;
    /// `<malloc.h>`'s `M_MMAP_THRESHOLD`.
    pub const M_MMAP_THRESHOLD: c_int = -3;

    // SAFETY: both are glibc's (2.10 and later, older than any board's) and touch only the
    // allocator's own state, under its own locks. `malloc_trim` takes any byte count; `mallopt`
    // takes any parameter and value, refusing (returning 0) what it does not know. Neither can
    // leave memory unsound, so both are declared safe to call.
    unsafe extern "C" {
        pub safe fn malloc_trim(pad: usize) -> c_int;
        pub safe fn mallopt(param: c_int, value: c_int) -> c_int;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_executables_read_only_mappings_are_taken() {
        // Addresses that fit a 32-bit board's usize as well.
        let maps = "\
00400000-00600000 r--p 00000000 fd:01 4242 /usr/bin/lichen
00600000-01400000 r-xp 00200000 fd:01 4242 /usr/bin/lichen
01400000-01500000 rw-p 01000000 fd:01 4242 /usr/bin/lichen
02000000-02100000 rw-p 00000000 00:00 0 [heap]
b6f00000-b7000000 r-xp 00000000 fd:01 777 /usr/lib/arm-linux-gnueabihf/libc.so.6
b7100000-b7200000 r-xp 00000000 fd:01 4242 /var/lib/lichen/agent/versions/ab/lichen (deleted)
";
        assert_eq!(
            own_mappings(maps, "/usr/bin/lichen"),
            vec![(0x0040_0000, 0x0060_0000), (0x0060_0000, 0x0140_0000)]
        );
        assert_eq!(
            own_mappings(maps, "/var/lib/lichen/agent/versions/ab/lichen (deleted)"),
            vec![(0xb710_0000, 0xb720_0000)]
        );
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn blocks_from_the_threshold_up_get_pages_of_their_own() {
        tune_allocator();
        // glibc hands out a block with pages of its own two words into its first page; a block
        // from the heap lands there only by chance (1 in 256 at best). A large block is still
        // cut from free heap space when there is some, so of 128 blocks (8 MiB on 64-bit) a few
        // may come from the heap; with glibc's default threshold (128 KiB) all of them would.
        let header = 2 * std::mem::size_of::<usize>();
        let size = MMAP_THRESHOLD as usize * 2;
        let blocks: Vec<Vec<u8>> = (0..128).map(|_| Vec::with_capacity(size)).collect();
        let own = blocks.iter().filter(|b| b.as_ptr() as usize % 4096 == header).count();
        assert!(own >= 96, "only {own} of 128 blocks of {size} bytes got pages of their own");
    }

    /// What a runtime thread retired (as sled does a replaced page) stays in that thread's own bag
    /// until the thread hands it over, however often another thread releases memory; once handed
    /// over (the runtime calls [`on_thread_idle`] as the thread parks), a release frees it.
    #[test]
    fn what_an_idle_thread_retired_is_freed_once_it_parks() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let freed = Arc::new(AtomicBool::new(false));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .on_thread_park(on_thread_idle)
            .build()
            .expect("a runtime");
        let flag = freed.clone();
        runtime.block_on(async move {
            tokio::spawn(async move {
                let guard = crossbeam_epoch::pin();
                guard.defer(move || flag.store(true, Ordering::SeqCst));
            })
            .await
            .expect("the task ran");
        });
        let start = std::time::Instant::now();
        while !freed.load(Ordering::SeqCst) {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "the retired object was never freed"
            );
            release_free_memory();
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        drop(runtime);

        // Without the hand-over: a thread that retired something and then waits keeps it.
        let freed = Arc::new(AtomicBool::new(false));
        let (flag, (go_tx, go_rx)) = (freed.clone(), std::sync::mpsc::channel::<()>());
        let (retired_tx, retired_rx) = std::sync::mpsc::channel();
        let waiting = std::thread::spawn(move || {
            crossbeam_epoch::pin().defer(move || flag.store(true, Ordering::SeqCst));
            retired_tx.send(()).expect("the test waits");
            let _ = go_rx.recv();
        });
        retired_rx.recv().expect("the thread retired its object");
        for _ in 0..10 {
            release_free_memory();
        }
        assert!(!freed.load(Ordering::SeqCst), "another thread freed what this one still held");
        drop(go_tx);
        waiting.join().expect("the thread ends");
    }

    #[test]
    fn releasing_this_processs_code_pages_works_or_says_why() {
        let pages = CodePages::find().expect("this process's maps");
        assert!(pages.mapped_bytes() > 0, "the test binary maps its own code");
        match pages.page_out() {
            Ok(()) => {}
            // A kernel before 5.4 (or an emulator) without MADV_PAGEOUT.
            Err(e) => assert_eq!(e.raw_os_error(), Some(22), "{e}"),
        }
    }
}
