//! Pods: from a `v1.Pod` to running modules and an honest `v1.PodStatus`.

pub mod events;
pub mod inputs;
pub mod logs;
pub mod manager;
pub mod spec;
pub mod state;
pub mod status;
pub mod worker;

/// YAML as `kubectl` reads it: `defaultMode: 0400` is the octal mode users mean (YAML 1.1). Every
/// pod manifest Lichen reads (static pod files, tests) goes through these options.
pub fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! { legacy_octal_numbers: true }
}
