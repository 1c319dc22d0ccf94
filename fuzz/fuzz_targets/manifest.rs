//! A pod as Lichen receives it, translated into a plan. The same bytes are read two ways:
//!
//! - as a static pod manifest (YAML or JSON text from `/etc/lichen/pods`) through
//!   `static_pods::parse_manifest`, then planned with the static origin and no cluster inputs;
//! - as a pod from the API server (JSON, decoded as kube-rs decodes it), then planned with the
//!   cluster origin and inputs as `cluster::inputs` would fetch them (`fetched_inputs`: found,
//!   missing, failed to fetch or hostile, by the object's name; every projected token issued).
//!
//! Any input must end in a plan or in named errors, never a panic, and an accepted plan must keep
//! the promises the rest of the agent builds paths from (see `check_plan`). With
//! `LICHEN_FUZZ_DEBUG=1` in the environment each outcome is printed, to see why a seed is refused.

#![no_main]

use std::path::{Component, Path};
use std::sync::OnceLock;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Pod;
use libfuzzer_sys::fuzz_target;
use lichen::config::{ModulesConfig, RuntimeConfig};
use lichen::modules::reference::ImageOrigin;
use lichen::pod::inputs::{IssuedToken, ObjectData, ObjectKind, PodInputs, references};
use lichen::pod::spec::{ModuleSource, PlanContext, PodPlan, VolumeKind, plan};
use lichen::pod::worker::pod_log_dir;
use lichen::static_pods::parse_manifest;

const NODE: &str = "fuzz-node";
const STATE_DIR: &str = "/var/lib/lichen";
const PODS_DIR: &str = "/var/lib/lichen/pods";
const LOGS_DIR: &str = "/var/lib/lichen/logs";
const STATIC_DIR: &str = "/etc/lichen/pods";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let modules = ModulesConfig { file_dirs: vec!["/opt/modules".into()], ..ModulesConfig::default() };
    let runtime = RuntimeConfig { allowed_host_paths: vec!["/srv/data".into()], ..RuntimeConfig::default() };

    let file = Path::new(STATIC_DIR).join("fuzz.yaml");
    let parsed = parse_manifest(text, &file, NODE);
    debug(|| format!("static manifest: {:?}", parsed.as_ref().map(|p| &p.metadata.name)));
    match parsed {
        Ok(pod) => {
            let name = pod.metadata.name.as_deref().unwrap_or_default();
            assert!(name.ends_with(&format!("-{NODE}")), "a static pod is named <name>-<node>: {name:?}");
            assert!(pod.metadata.uid.as_deref().is_some_and(|u| !u.is_empty()), "a static pod has a UID");
            let origin = ImageOrigin::Static(Path::new(STATIC_DIR));
            run(&pod, origin, &modules, &runtime, None);
        }
        Err(e) => {
            assert_eq!(e.file, file, "a manifest error names its file");
            assert!(!e.message.is_empty(), "a manifest error says what is wrong");
        }
    }

    let decoded = serde_json::from_str::<Pod>(text);
    debug(|| format!("cluster pod: {:?}", decoded.as_ref().map(|p| &p.metadata.name)));
    if let Ok(pod) = decoded {
        let inputs = fetched_inputs(&pod);
        run(&pod, ImageOrigin::Cluster, &modules, &runtime, Some(&inputs));
    }
});

fn run(
    pod: &Pod,
    origin: ImageOrigin<'_>,
    modules: &ModulesConfig,
    runtime: &RuntimeConfig,
    inputs: Option<&PodInputs>,
) {
    let ctx = PlanContext {
        node_name: NODE,
        host_ip: Some("192.0.2.7"),
        pods_dir: Path::new(PODS_DIR),
        state_dir: Path::new(STATE_DIR),
        origin,
        modules,
        runtime,
        inputs,
    };
    let planned = plan(pod, &ctx);
    debug(|| format!("  plan ({origin:?}): {:?}", planned.as_ref().map(|p| &p.key)));
    match planned {
        Ok(p) => check_plan(&p, &ctx),
        Err(errors) => {
            assert!(!errors.is_empty(), "a refusal names at least one reason");
            for e in &errors {
                assert!(!e.field.is_empty() && !e.message.is_empty(), "a reason names a field: {e:?}");
            }
        }
    }
}

/// What the worker, the volume code and the log writer rely on when they turn a plan into paths.
fn check_plan(p: &PodPlan, ctx: &PlanContext<'_>) {
    assert_eq!(p.key, format!("{}/{}", p.namespace, p.name));
    assert!(one_component(&p.uid), "the UID names one directory: {:?}", p.uid);
    assert!(!p.containers.is_empty(), "a planned pod has a container");
    let pod_dir = ctx.pods_dir.join(&p.uid);
    let logs = Path::new(LOGS_DIR);
    let pod_logs = pod_log_dir(logs, &p.key, &p.uid);
    // The worker's `<logs>/<namespace>_<name>_<uid>`: the name and namespace of a cluster pod are
    // not checked, so this holds only because the UID is and `/` is replaced.
    let rel = pod_logs.strip_prefix(logs).ok().and_then(Path::to_str);
    assert!(
        rel.is_some_and(one_component),
        "the pod's log directory {} is one level under {LOGS_DIR}",
        pod_logs.display()
    );
    for c in p.all_containers() {
        assert!(one_component(&c.name), "a container name names one log directory: {:?}", c.name);
        assert!(!c.argv.is_empty(), "argv[0] is always there ({})", c.name);
        assert!(c.memory_limit >= 64 << 10 && c.memory_limit <= 4 << 30, "memory limit {}", c.memory_limit);
        // What the module cache does with the source: its key, and the credential for a registry.
        let _ = (c.source.cache_key(), c.source.is_pinned());
        if let ModuleSource::Oci(r) = &c.source {
            let _ = p.pull_credentials.for_registry(r.resolve_registry());
        }
        for o in &c.preopens {
            let v = p.volumes.iter().find(|v| v.host == o.host);
            let v = v.unwrap_or_else(|| panic!("preopen {} is not a planned volume", o.host.display()));
            if matches!(v.kind, VolumeKind::Files(_)) {
                assert!(o.read_only, "the agent's files are mounted read-only ({})", v.name);
            }
        }
    }
    for v in &p.volumes {
        assert!(one_component(&v.name), "a volume name names one directory: {:?}", v.name);
        match &v.kind {
            VolumeKind::EmptyDir | VolumeKind::Files(_) => {
                assert_eq!(v.host, pod_dir.join("volumes").join(&v.name), "where volume {} lives", v.name);
            }
            VolumeKind::HostPath | VolumeKind::HostPathOrCreate => {
                assert!(v.host.is_absolute(), "hostPath {} is absolute", v.host.display());
                assert!(
                    v.host.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_))),
                    "hostPath {} is lexically clean",
                    v.host.display()
                );
                let state = Path::new(STATE_DIR);
                assert!(
                    !v.host.starts_with(state) && !state.starts_with(&v.host),
                    "hostPath {} reaches the state directory",
                    v.host.display()
                );
                if matches!(ctx.origin, ImageOrigin::Cluster) {
                    assert!(
                        ctx.runtime.allowed_host_paths.iter().any(|a| v.host.starts_with(a)),
                        "a cluster pod's hostPath {} is under runtime.allowed_host_paths",
                        v.host.display()
                    );
                }
            }
        }
        if let VolumeKind::Files(files) = &v.kind {
            for f in files {
                let ok = !f.path.as_os_str().is_empty()
                    && f.path.components().all(|c| matches!(c, Component::Normal(_)));
                assert!(ok, "file {} stays inside volume {}", f.path.display(), v.name);
            }
        }
    }
}

/// Prints `what()` when `LICHEN_FUZZ_DEBUG` is set.
fn debug(what: impl FnOnce() -> String) {
    static ON: OnceLock<bool> = OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("LICHEN_FUZZ_DEBUG").is_some()) {
        eprintln!("{}", what());
    }
}

/// A name that is exactly one normal path component (not empty, `.`, `..`, and without `/`).
fn one_component(s: &str) -> bool {
    let mut c = Path::new(s).components();
    matches!((c.next(), c.next()), (Some(Component::Normal(n)), None) if n == s)
}

/// What `cluster::inputs` would have fetched for `pod`. The object's name picks the case, so the
/// fuzzer can reach each: a name starting with `missing` was fetched and does not exist, one
/// starting with `unfetched` failed to fetch, one starting with `hostile` holds keys no real API
/// server accepts (`..`, `a/b`), one starting with `annotations` holds the pod's own annotations
/// (keys and values the fuzzer writes: a `.dockerconfigjson` for a pull secret, say), and any
/// other exists with a few plain keys.
fn fetched_inputs(pod: &Pod) -> PodInputs {
    let object = |keys: &[&str]| -> ObjectData {
        keys.iter().map(|k| (k.to_string(), ByteString(format!("value of {k}").into_bytes()))).collect()
    };
    let plain = object(&["key", "config", "a", "..data", ".dockerconfigjson"]);
    let hostile = object(&["key", "..", "a/b", "/abs", ""]);
    let from_annotations: ObjectData = (pod.metadata.annotations.iter().flatten())
        .map(|(k, v)| (k.clone(), ByteString(v.clone().into_bytes())))
        .collect();
    let refs = references(pod);
    let mut inputs = PodInputs::default();
    let mut add = |kind: ObjectKind, name: String| {
        let found = if name.starts_with("missing") {
            None
        } else if name.starts_with("unfetched") {
            inputs.errors.insert(kind.error_key(&name), "connection refused".into());
            return;
        } else if name.starts_with("hostile") {
            Some(hostile.clone())
        } else if name.starts_with("annotations") {
            Some(from_annotations.clone())
        } else {
            Some(plain.clone())
        };
        match kind {
            ObjectKind::ConfigMap => inputs.config_maps.insert(name, found),
            ObjectKind::Secret => inputs.secrets.insert(name, found),
        };
    };
    for name in refs.config_maps {
        add(ObjectKind::ConfigMap, name);
    }
    for name in refs.secrets {
        add(ObjectKind::Secret, name);
    }
    let issued = jiff::Timestamp::from_second(1_700_000_000).expect("a valid time");
    let expires = jiff::Timestamp::from_second(1_700_003_607).expect("a valid time");
    for t in refs.tokens {
        let token = IssuedToken { token: "fuzz.token".into(), issued, expires };
        inputs.tokens.insert(t.key(), token);
    }
    inputs
}
