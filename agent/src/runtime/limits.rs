//! The per-container [`ResourceLimiter`]: linear memory, tables and instance counts.

use wasmtime::ResourceLimiter;

use crate::metrics::ContainerMeter;

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
    /// Where /metrics and the kubelet API read the container's current memory and table sizes.
    meter: Option<std::sync::Arc<ContainerMeter>>,
}

impl ContainerLimits {
    pub(super) fn new(memory_limit: u64, meter: Option<std::sync::Arc<ContainerMeter>>) -> Self {
        ContainerLimits { memory_limit, peak_memory: 0, meter }
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
        if let Some(m) = &self.meter {
            m.set_linear_memory(desired);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = desired <= MAX_TABLE_ELEMENTS;
        if allowed && let Some(m) = &self.meter {
            m.set_table_elements(desired as u64);
        }
        Ok(allowed)
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
