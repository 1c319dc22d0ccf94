//! Turns a `v1.Pod` into a [`PodPlan`]: what to run, with which limits, mounts and environment.
//!
//! Anything Lichen cannot honour is refused here with the field's path and a reason a user can act
//! on; nothing is silently dropped. Fields that are accepted but not enforced (CPU limits, emptyDir
//! size limits) come back as warnings, which the agent logs and `lichen check` prints.
//!
//! This file owns the entry point ([`plan`]), what planning depends on ([`PlanContext`]) and how
//! refusals are collected ([`SpecError`]); each concern has its own file:
//! - `plans`: the plan types handed to the worker;
//! - `admission`: fields refused outright, restart policy, deadline, memory limits;
//! - `annotations`: the `lichen.dev/*` run limits and the MQTT annotations;
//! - `names`: the UID and the names that become directories on the node;
//! - `volumes`: which volume types run and how mounts become preopens;
//! - `files`: the files of configMap, secret, downwardAPI and projected volumes;
//! - `host_path`: which host directories a pod may mount (the security boundary);
//! - `sources`: ConfigMaps and Secrets looked up in the fetched inputs, pull secrets;
//! - `downward`: the pod fields a `fieldRef` may name;
//! - `env`: a container's environment and `$(VAR)` expansion;
//! - `container`: one container's plan, from the pieces above.
//!
//! Planning must stay free of side effects: it reads no store, fetches nothing, creates no
//! directory. The one look at the disk is resolving a hostPath's symlinks (`host_path`).

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod};

use super::inputs::PodInputs;
use crate::config::{ModulesConfig, RuntimeConfig};
use crate::modules::ImageOrigin;

mod admission;
mod annotations;
mod container;
mod downward;
mod env;
mod files;
mod host_path;
mod names;
mod plans;
mod sources;
mod volumes;

#[cfg(test)]
mod fixtures;

pub use crate::modules::ModuleSource;
pub use annotations::{FUEL_ANNOTATION, TIMEOUT_ANNOTATION};
pub use plans::{ContainerPlan, PodPlan, VolumeFile, VolumeKind, VolumePlan};

/// A field Lichen cannot run, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    /// JSON path of the field, e.g. `spec.containers[0].ports`.
    pub field: String,
    /// The reason and, where there is one, what to do instead.
    pub message: String,
    /// The pod is fine but waits for something from the API server (a ConfigMap, Secret or token
    /// not found or not fetched yet): it stays Pending and is planned again when that arrives.
    pub pending: bool,
}

/// What planning a volume needs besides the volume (`volumes` plans the volume, `files` the files
/// the agent writes into one).
struct VolumeContext<'a> {
    ctx: &'a PlanContext<'a>,
    pod: &'a Pod,
    /// `<pods_dir>/<uid>`, from a checked UID.
    pod_dir: &'a Path,
    fields: &'a downward::FieldValues,
}

/// What the plan depends on besides the pod.
pub struct PlanContext<'a> {
    /// This node's name (for `fieldRef: spec.nodeName`).
    pub node_name: &'a str,
    /// This node's address (for `fieldRef: status.hostIP`), if known.
    pub host_ip: Option<&'a str>,
    /// `<state_dir>/pods`. The pod's own directories (emptyDir, configMap, secret volumes) are made
    /// under `<pods_dir>/<uid>`, and only once the UID is known to be one plain path component.
    pub pods_dir: &'a Path,
    /// The agent's state directory (the node's key, its store, every pod's secrets): no hostPath
    /// may be, hold or lie under it, whichever origin the pod has.
    pub state_dir: &'a Path,
    /// Static pods may name any local module file (relative to their directory) and mount any
    /// hostPath outside `state_dir`; cluster pods only registries, URLs and files under
    /// `modules.file_dirs`, and hostPaths under `runtime.allowed_host_paths`.
    pub origin: ImageOrigin<'a>,
    /// Module settings (allowed file directories, insecure registries).
    pub modules: &'a ModulesConfig,
    /// Default limits, and the hostPaths cluster pods may mount.
    pub runtime: &'a RuntimeConfig,
    /// What was fetched from the API server for this pod; `None` for pods without a cluster
    /// (static pods), which then cannot refer to ConfigMaps, Secrets or tokens.
    pub inputs: Option<&'a PodInputs>,
}

/// Builds the plan for `pod`, or every reason it cannot run.
pub fn plan(pod: &Pod, ctx: &PlanContext<'_>) -> Result<PodPlan, Vec<SpecError>> {
    let mut errs = Errors::default();
    let meta = &pod.metadata;
    let name = meta.name.clone().unwrap_or_default();
    let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
    let uid = meta.uid.clone().unwrap_or_default();
    if name.is_empty() {
        errs.add("metadata.name", "is required");
    }
    // The UID names the pod's directories, so nothing else is looked at (and no path is built)
    // until it is known to be safe.
    if let Err(why) = names::check_uid(&uid) {
        errs.add("metadata.uid", why);
        return Err(errs.0);
    }
    let Some(spec) = &pod.spec else {
        errs.add("spec", "is required");
        return Err(errs.0);
    };
    let annotations = meta.annotations.clone().unwrap_or_default();
    let restart_policy = admission::restart_policy(spec, &mut errs);
    admission::refuse_pod_fields(spec, &mut errs);
    let limits = annotations::run_limits(&annotations, ctx.runtime, &mut errs);
    let mqtt = annotations::mqtt(&annotations, &mut errs);

    let fields = downward::field_values(pod, ctx);
    let mut warnings = Vec::new();
    let pod_dir = ctx.pods_dir.join(&uid);
    let vctx = VolumeContext { ctx, pod, pod_dir: &pod_dir, fields: &fields };
    let planned = volumes::plan_volumes(spec, &vctx, &mut errs, &mut warnings);
    let cctx = container::ContainerContext { ctx, pod, volumes: &planned, fields: &fields, limits };
    let mut containers_of = |list: Option<&Vec<Container>>, kind: &str| -> Vec<ContainerPlan> {
        list.into_iter()
            .flatten()
            .enumerate()
            .filter_map(|(i, c)| {
                let path = format!("spec.{kind}[{i}]");
                container::container(c, &path, &cctx, &mut errs, &mut warnings)
            })
            .collect()
    };
    let init_containers = containers_of(spec.init_containers.as_ref(), "initContainers");
    let containers = containers_of(Some(&spec.containers), "containers");
    admission::check_container_set(spec, &mut errs);
    let active_deadline = admission::active_deadline(spec, &mut errs);
    let pull_credentials = sources::pull_credentials(spec, ctx.inputs, &mut warnings);

    if !errs.0.is_empty() {
        return Err(errs.0);
    }
    Ok(PodPlan {
        key: format!("{namespace}/{name}"),
        namespace,
        name,
        uid,
        restart_policy,
        init_containers,
        containers,
        volumes: planned.volumes,
        active_deadline,
        pull_credentials,
        warnings,
        mqtt,
    })
}

/// Every refusal found so far: planning goes on after the first, so a user sees them all at once.
#[derive(Default)]
struct Errors(Vec<SpecError>);

impl Errors {
    /// A refusal: the pod cannot run as written.
    fn add(&mut self, field: &str, message: impl std::fmt::Display) {
        self.0.push(SpecError { field: field.to_owned(), message: message.to_string(), pending: false });
    }

    /// A wait: the pod is fine but needs something not fetched (or not existing) yet.
    fn pending(&mut self, field: &str, message: impl std::fmt::Display) {
        self.0.push(SpecError { field: field.to_owned(), message: message.to_string(), pending: true });
    }
}

/// Run limits shared by every container of the pod, from its annotations or the node's defaults.
#[derive(Debug, Clone, Copy)]
struct RunLimits {
    /// Fuel per run; `None` is unlimited.
    fuel: Option<u64>,
    /// Wall-clock limit per run.
    timeout: Option<Duration>,
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::fixtures::{BASE, ctx, pod};
    use super::*;
    use crate::config::RuntimeConfig;
    use crate::pod::state::RestartPolicy;

    #[test]
    fn a_supported_pod_becomes_a_plan() {
        let rt = RuntimeConfig::default();
        let plan = plan(&pod(BASE), &ctx(&rt)).expect("valid");
        assert_eq!(plan.key, "ns/p");
        assert_eq!(plan.restart_policy, RestartPolicy::OnFailure);
        let c = &plan.containers[0];
        assert_eq!(c.source, ModuleSource::File(PathBuf::from("/etc/lichen/pods/mods/app.wasm")));
        assert_eq!(c.argv, vec!["app", "--node", "pi-07", "hi-pi-07-x", "$(NODE)"]);
        assert_eq!(c.env, vec![("NODE".into(), "pi-07".into()), ("GREETING".into(), "hi-pi-07".into())]);
        assert_eq!((c.fuel, c.memory_limit), (Some(500), 16 << 20));
        assert_eq!(c.preopens[0].host, Path::new("/var/lib/lichen/pods/u1/volumes/data"));
        assert!(c.preopens[1].read_only && !c.preopens[0].read_only);
        assert_eq!(
            plan.warnings,
            vec!["spec.containers[0].resources.limits.cpu is not enforced (fuel bounds compute)"]
        );
    }
}
