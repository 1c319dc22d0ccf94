//! Volumes: which volume types a pod may use (emptyDir, hostPath, and the agent-written configMap,
//! secret, downwardAPI and projected), the host directory each one gets, and how a container's
//! `volumeMounts` become WASI preopens.
//!
//! Names a volume's directory only after its name passed `names::dns_label`; leaves hostPath's
//! rules to `host_path` and the agent-written files to `files`. Creates no directory: the worker
//! does, from the plan.

use std::collections::HashSet;

use k8s_openapi::api::core::v1::{Container, EmptyDirVolumeSource, HostPathVolumeSource, PodSpec, Volume};

use super::files::{self, FileSource};
use super::{Errors, VolumeContext, VolumeKind, VolumePlan, host_path, names};
use crate::runtime::Preopen;

/// The pod's volumes, as far as they could be planned.
pub(super) struct PlannedVolumes {
    /// The volumes that can be mounted.
    pub(super) volumes: Vec<VolumePlan>,
    /// Volumes that could not be planned: their errors are reported once, not again at every mount.
    pub(super) unplanned: HashSet<String>,
}

/// A volume's type: the one source field set besides `name`.
enum VolumeSource<'a> {
    /// Files the agent writes.
    Files(FileSource<'a>),
    /// `emptyDir`.
    EmptyDir(&'a EmptyDirVolumeSource),
    /// `hostPath`.
    HostPath(&'a HostPathVolumeSource),
    /// Any other type, named as the user wrote it.
    Unsupported(String),
}

impl<'a> VolumeSource<'a> {
    /// Which source `v` uses. The API server lets only one be set; should a static pod's file set
    /// several, the first in this order wins.
    fn of(v: &'a Volume) -> Self {
        if let Some(c) = &v.config_map {
            VolumeSource::Files(FileSource::ConfigMap(c))
        } else if let Some(s) = &v.secret {
            VolumeSource::Files(FileSource::Secret(s))
        } else if let Some(d) = &v.downward_api {
            VolumeSource::Files(FileSource::DownwardApi(d))
        } else if let Some(p) = &v.projected {
            VolumeSource::Files(FileSource::Projected(p))
        } else if let Some(e) = &v.empty_dir {
            VolumeSource::EmptyDir(e)
        } else if let Some(h) = &v.host_path {
            VolumeSource::HostPath(h)
        } else {
            // Name the volume type the user wrote, from the one field besides `name` that is set.
            let kind = serde_json::to_value(v)
                .ok()
                .and_then(|j| j.as_object().and_then(|o| o.keys().find(|k| *k != "name").cloned()))
                .unwrap_or_else(|| "(no type)".into());
            VolumeSource::Unsupported(kind)
        }
    }
}

/// Plans every volume of `spec`, refusing names that are not labels or are used twice.
pub(super) fn plan_volumes(
    spec: &PodSpec,
    vctx: &VolumeContext<'_>,
    errs: &mut Errors,
    warnings: &mut Vec<String>,
) -> PlannedVolumes {
    let mut volumes = Vec::new();
    let mut unplanned = HashSet::new();
    let mut volume_names = HashSet::new();
    for (i, v) in spec.volumes.iter().flatten().enumerate() {
        let vpath = format!("spec.volumes[{i}]");
        // The name becomes `<pod_dir>/volumes/<name>`: it is checked before that path is built.
        if let Err(why) = names::dns_label(&v.name) {
            errs.add(&format!("{vpath}.name"), format!("volume {why}"));
            unplanned.insert(v.name.clone());
            continue;
        }
        if !volume_names.insert(v.name.as_str()) {
            errs.add(&format!("{vpath}.name"), format!("volume name {:?} is used twice", v.name));
            continue;
        }
        match volume(v, &vpath, vctx, errs, warnings) {
            Some(plan) => volumes.push(plan),
            None => {
                unplanned.insert(v.name.clone());
            }
        }
    }
    PlannedVolumes { volumes, unplanned }
}

fn volume(
    v: &Volume,
    path: &str,
    vctx: &VolumeContext<'_>,
    errs: &mut Errors,
    warnings: &mut Vec<String>,
) -> Option<VolumePlan> {
    let own_dir = || vctx.pod_dir.join("volumes").join(&v.name);
    match VolumeSource::of(v) {
        VolumeSource::Files(src) => files::files(&src, path, vctx, errs).map(|files| VolumePlan {
            name: v.name.clone(),
            host: own_dir(),
            kind: VolumeKind::Files(files),
        }),
        VolumeSource::EmptyDir(e) => {
            if e.medium.as_deref().is_some_and(|m| !m.is_empty()) {
                errs.add(
                    &format!("{path}.emptyDir.medium"),
                    "only disk-backed emptyDir is supported; remove medium",
                );
                return None;
            }
            if e.size_limit.is_some() {
                warnings.push(format!("{path}.emptyDir.sizeLimit is not enforced"));
            }
            Some(VolumePlan { name: v.name.clone(), host: own_dir(), kind: VolumeKind::EmptyDir })
        }
        VolumeSource::HostPath(h) => {
            let kind = match h.type_.as_deref().unwrap_or("") {
                "" | "Directory" => VolumeKind::HostPath,
                "DirectoryOrCreate" => VolumeKind::HostPathOrCreate,
                other => {
                    errs.add(
                        &format!("{path}.hostPath.type"),
                        format!("{other:?} is not supported: modules see volumes as preopened directories, so use Directory or DirectoryOrCreate"),
                    );
                    return None;
                }
            };
            match host_path::host_path(&h.path, vctx.ctx) {
                Ok(host) => Some(VolumePlan { name: v.name.clone(), host, kind }),
                Err(why) => {
                    errs.add(&format!("{path}.hostPath.path"), why);
                    None
                }
            }
        }
        VolumeSource::Unsupported(kind) => {
            errs.add(
                path,
                format!(
                    "volume {:?} of type {kind} is not supported here; use emptyDir, hostPath, configMap, \
                     secret, downwardAPI or projected",
                    v.name
                ),
            );
            None
        }
    }
}

/// A container's `volumeMounts` as preopens; `path` is the container's field path.
pub(super) fn preopens(
    c: &Container,
    path: &str,
    planned: &PlannedVolumes,
    errs: &mut Errors,
    warnings: &mut Vec<String>,
) -> Vec<Preopen> {
    let mut preopens = Vec::new();
    for (i, m) in c.volume_mounts.iter().flatten().enumerate() {
        let mpath = format!("{path}.volumeMounts[{i}]");
        if m.sub_path.as_deref().is_some_and(|s| !s.is_empty())
            || m.sub_path_expr.as_deref().is_some_and(|s| !s.is_empty())
        {
            errs.add(&mpath, "subPath is not supported; mount the volume and use the subdirectory");
            continue;
        }
        if m.mount_propagation.as_deref().is_some_and(|p| p != "None") {
            errs.add(&format!("{mpath}.mountPropagation"), "modules have no mount namespace; remove it");
        }
        if m.recursive_read_only.as_deref().is_some_and(|p| p != "Disabled") {
            warnings.push(format!(
                "{mpath}.recursiveReadOnly: read-only mounts are always recursive for modules"
            ));
        }
        match planned.volumes.iter().find(|v| v.name == m.name) {
            Some(v) => preopens.push(Preopen {
                host: v.host.clone(),
                guest: m.mount_path.clone(),
                // The agent's own files are never the module's to change, as on a kubelet.
                read_only: m.read_only == Some(true) || matches!(v.kind, VolumeKind::Files(_)),
            }),
            None if planned.unplanned.contains(&m.name) => {}
            None => errs.add(&mpath, format!("no volume named {:?} in spec.volumes", m.name)),
        }
    }
    preopens
}
