//! Pods: from a `v1.Pod` to running modules and an honest `v1.PodStatus`.

pub mod events;
pub mod inputs;
pub mod logs;
pub mod manager;
pub mod spec;
pub mod state;
pub mod status;
pub mod worker;
