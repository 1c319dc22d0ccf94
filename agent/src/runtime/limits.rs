//! The per-container [`ResourceLimiter`]: linear memory, tables and instance counts.

use wasmtime::ResourceLimiter;

/// Raised from `memory.grow` (or instantiation) past the container's memory limit. The module traps
/// at once, like a process killed by the OOM killer, rather than seeing `-1` and limping on.
#[derive(Debug, thiserror::Error)]
#[error("memory limit exceeded: asked for {requested} bytes")]
pub struct MemoryLimitExceeded {
    /// Bytes the module asked for.
    pub requested: u64,
}

/// Table elements a module may have; generous for real programs, fatal to table bombs.
const MAX_TABLE_ELEMENTS: usize = 100_000;

pub(super) struct ContainerLimits {
    memory_limit: u64,
    peak_memory: u64,
    /// Where /metrics reads the container's current memory size.
    gauge: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

impl ContainerLimits {
    pub(super) fn new(
        memory_limit: u64,
        gauge: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    ) -> Self {
        ContainerLimits { memory_limit, peak_memory: 0, gauge }
    }

    pub(super) fn peak_memory(&self) -> u64 {
        self.peak_memory
    }
}

impl ResourceLimiter for ContainerLimits {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let desired = desired as u64;
        if desired > self.memory_limit {
            return Err(wasmtime::Error::new(MemoryLimitExceeded { requested: desired }));
        }
        self.peak_memory = self.peak_memory.max(desired);
        if let Some(g) = &self.gauge {
            g.store(desired, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        1
    }

    fn tables(&self) -> usize {
        4
    }

    fn memories(&self) -> usize {
        1
    }
}
