//! How the process's memory allocator holds and gives back memory (ground floor). It imports
//! nothing from the crate; it must not decide when to give memory back, only how (its callers know
//! when a burst of work has ended).
//!
//! glibc's allocator keeps memory that was freed: each thread that allocates gets an arena (up to
//! eight per core), and an arena returns pages to the kernel only from its top, so the pages a
//! burst of pods used stay resident after the pods are gone. Measured on the development machine
//! (release build, 2 cores) with 100 static pods created and deleted: `malloc_trim` after the
//! deletions gave back 60% of what they left (17 MiB more than idle before), and two arenas
//! instead of sixteen kept another 1.5-2.5 MiB less at every reading. Other C libraries (musl)
//! keep little, and there both do nothing.

/// The allocator arenas the agent's threads share. Two: a tokio worker and a blocking thread
/// rarely allocate at the same instant on a board's 2-4 cores, and each further arena scatters
/// live objects over pages that can then never be given back.
const ARENAS: i32 = 2;

/// Limits the allocator to [`ARENAS`] arenas. Call it first thing in `main`, before any thread.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    glibc::mallopt(glibc::M_ARENA_MAX, ARENAS);
}

/// Returns the allocator's free pages to the kernel. Worth a few milliseconds when the agent has
/// just freed much (pods removed, a module compiled); not on every allocation.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    glibc::malloc_trim(0);
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
mod glibc {
    use std::ffi::c_int;

    /// `<malloc.h>`'s `M_ARENA_MAX`.
    pub const M_ARENA_MAX: c_int = -8;

    // SAFETY: both are glibc's (2.10 and later, older than any board's) and touch only the
    // allocator's own state, under its own locks. `malloc_trim` takes any byte count; `mallopt`
    // takes any parameter and value, refusing (returning 0) what it does not know. Neither can
    // leave memory unsound, so both are declared safe to call.
    unsafe extern "C" {
        pub safe fn malloc_trim(pad: usize) -> c_int;
        pub safe fn mallopt(param: c_int, value: c_int) -> c_int;
    }
}
