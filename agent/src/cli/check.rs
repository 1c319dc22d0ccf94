//! `lichen check`: validates the configuration and the environment and prints what would run, without
//! starting anything. Problems are listed all together, and the command exits non-zero if there are any.

use std::fmt::Write as _;

use crate::config::AgentConfig;
use crate::pod::spec::{self, PlanContext};
use crate::static_pods::StaticPodSource;
use crate::store::{SledStore, StateStore, StoreError};

/// The report and whether everything is in order.
pub struct CheckReport {
    /// Human-readable text.
    pub text: String,
    /// Problems found.
    pub problems: usize,
}

/// Runs every check against `config`.
pub fn check(config: &AgentConfig) -> CheckReport {
    let mut out = String::new();
    let mut problems = 0;
    let _ = writeln!(out, "# configuration (after file, environment and flags)\n{}", config.to_toml());
    let layout = config.layout();
    let (store_dir, pods_dir) = (layout.store(), layout.pods());
    // Checking must not create anything: a missing store is reported, not made.
    let store_result = if store_dir.join("db").exists() || store_dir.join("conf").exists() {
        Some(SledStore::open(&store_dir))
    } else {
        let _ = writeln!(
            out,
            "note  state store {} does not exist yet; `lichen run` creates it",
            store_dir.display()
        );
        None
    };
    match store_result {
        None => {}
        Some(Ok(store)) => {
            let pods = store.list_pods().map(|p| p.len()).unwrap_or(0);
            let modules = store.list_modules().map(|m| m.len()).unwrap_or(0);
            let _ = writeln!(
                out,
                "ok    state store {} (schema {}, {pods} pods, {modules} modules)",
                store_dir.display(),
                store.schema_version()
            );
        }
        Some(Err(StoreError::Locked { .. })) => {
            let _ = writeln!(out, "ok    state store {} is in use by a running lichen", store_dir.display());
        }
        Some(Err(e)) => {
            problems += 1;
            let _ = writeln!(out, "FAIL  {e}");
        }
    }
    match wasmtime::Engine::new(&crate::runtime::engine_config()) {
        Ok(_) => {
            let _ = writeln!(out, "ok    WebAssembly engine (wasmtime {})", crate::runtime::WASMTIME_VERSION);
        }
        Err(e) => {
            problems += 1;
            let _ = writeln!(out, "FAIL  WebAssembly engine: {e:#}");
        }
    }
    let Some(dir) = config.static_pods() else {
        let _ = writeln!(out, "ok    static pods are off");
        return CheckReport { text: out, problems };
    };
    if !dir.is_dir() {
        let _ = writeln!(
            out,
            "note  static pod directory {} does not exist (yet); nothing would run",
            dir.display()
        );
        return CheckReport { text: out, problems };
    }
    let (scan, _) = StaticPodSource::new(dir.to_owned(), config.node_name.clone()).scan();
    let _ = writeln!(out, "ok    static pod directory {}: {} pods", dir.display(), scan.pods.len());
    for e in &scan.errors {
        problems += 1;
        let _ = writeln!(out, "FAIL  {e}");
    }
    for d in &scan.pods {
        let ctx = PlanContext {
            node_name: &config.node_name,
            host_ip: None,
            pods_dir: &pods_dir,
            state_dir: &config.state_dir,
            origin: match d.image_base.as_deref() {
                Some(dir) => crate::modules::ImageOrigin::Static(dir),
                None => crate::modules::ImageOrigin::Cluster,
            },
            modules: &config.modules,
            runtime: &config.runtime,
            inputs: None,
        };
        match spec::plan(&d.pod, &ctx) {
            Ok(plan) => {
                let _ = writeln!(
                    out,
                    "ok    pod {} ({}, restartPolicy {})",
                    plan.key,
                    d.source,
                    plan.restart_policy.as_str()
                );
                for c in plan.all_containers() {
                    let fuel = c.fuel.map_or("unlimited".to_string(), |f| f.to_string());
                    let found = match &c.source {
                        spec::ModuleSource::File(p) if p.is_file() => "",
                        spec::ModuleSource::File(_) => "  (module file missing!)",
                        // Pulled when the pod starts; `lichen modules pull` fetches it ahead.
                        _ => "",
                    };
                    if !found.is_empty() {
                        problems += 1;
                    }
                    let _ = writeln!(
                        out,
                        "        container {}: {}{found}; argv {:?}; memory {} bytes; fuel {fuel}",
                        c.name,
                        c.source.describe(),
                        c.argv,
                        c.memory_limit
                    );
                }
                for w in &plan.warnings {
                    let _ = writeln!(out, "warn    {w}");
                }
            }
            Err(errs) => {
                problems += errs.len();
                for e in errs {
                    let _ = writeln!(out, "FAIL  pod {} ({}): {e}", d.key(), d.source);
                }
            }
        }
    }
    CheckReport { text: out, problems }
}
