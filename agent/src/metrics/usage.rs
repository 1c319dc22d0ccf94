//! What each running container uses (ground floor): the CPU time spent running its code and its
//! memory, kept current by the runtime while the run lasts and read by `/metrics` and the kubelet
//! API's `/metrics/resource` and `/stats/summary`. A meter lives exactly as long as one run, as a
//! container's cgroup does on a kubelet, so a restart starts a new counter with a new start time and
//! an ended run (or a deleted pod) leaves no series behind.
//!
//! It only holds numbers; measuring is the runtime's, presenting is the servers'.

use std::sync::atomic::{AtomicU64, Ordering};

/// What a Wasmtime instance costs beside its linear memory and tables: the pages of its fiber stack
/// a module touches (a few of the 2 MiB reserved), its `VMContext`, the `Store` and the WASI context
/// with its descriptor table and pipes. An allowance rather than a measurement per instance, as
/// Wasmtime exposes no such figure; it keeps an instance without linear memory from reporting zero,
/// which metrics-server would take for a missing sample.
pub const INSTANCE_OVERHEAD_BYTES: u64 = 64 << 10;

/// Bytes one table element takes in Wasmtime (a function or GC reference: one pointer).
const TABLE_ELEMENT_BYTES: u64 = std::mem::size_of::<usize>() as u64;

/// One container run's usage.
#[derive(Debug)]
pub struct ContainerMeter {
    pod_uid: String,
    started: jiff::Timestamp,
    memory: AtomicU64,
    table_elements: AtomicU64,
    cpu_nanos: AtomicU64,
}

impl ContainerMeter {
    /// A meter for a run of a container of the pod with `pod_uid` that started at `started`.
    pub fn new(pod_uid: &str, started: jiff::Timestamp) -> Self {
        ContainerMeter {
            pod_uid: pod_uid.to_owned(),
            started,
            memory: AtomicU64::new(0),
            table_elements: AtomicU64::new(0),
            cpu_nanos: AtomicU64::new(0),
        }
    }

    /// The pod's UID.
    pub fn pod_uid(&self) -> &str {
        &self.pod_uid
    }

    /// When the run started.
    pub fn started(&self) -> jiff::Timestamp {
        self.started
    }

    /// The run's linear memory grew (or was created) to `bytes`.
    pub fn set_linear_memory(&self, bytes: u64) {
        self.memory.store(bytes, Ordering::Relaxed);
    }

    /// A table grew (or was created) to `elements`; the largest table is kept.
    pub fn set_table_elements(&self, elements: u64) {
        self.table_elements.fetch_max(elements, Ordering::Relaxed);
    }

    /// The linear memory's current size, bytes (what `memory.size` says, times 64 KiB).
    pub fn linear_memory(&self) -> u64 {
        self.memory.load(Ordering::Relaxed)
    }

    /// The working set as the kubelet API reports it: the linear memory, the tables and the
    /// instance's allowance ([`INSTANCE_OVERHEAD_BYTES`]).
    pub fn working_set(&self) -> u64 {
        self.linear_memory()
            + self.table_elements.load(Ordering::Relaxed) * TABLE_ELEMENT_BYTES
            + INSTANCE_OVERHEAD_BYTES
    }

    /// Adds CPU time the run spent.
    pub fn add_cpu(&self, nanos: u64) {
        self.cpu_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// CPU time spent running the container's code since it started, nanoseconds.
    pub fn cpu_nanos(&self) -> u64 {
        self.cpu_nanos.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_working_set_counts_memory_tables_and_the_instance() {
        let m = ContainerMeter::new("u1", jiff::Timestamp::UNIX_EPOCH);
        assert_eq!(m.working_set(), INSTANCE_OVERHEAD_BYTES, "never zero");
        m.set_linear_memory(2 << 16);
        m.set_table_elements(10);
        m.set_table_elements(4);
        assert_eq!(m.working_set(), (2 << 16) + 10 * TABLE_ELEMENT_BYTES + INSTANCE_OVERHEAD_BYTES);
        m.add_cpu(5);
        m.add_cpu(7);
        assert_eq!(m.cpu_nanos(), 12);
    }
}
