//! Turns a `v1.Pod` into a [`PodPlan`]: what to run, with which limits, mounts and environment.
//!
//! Anything Lichen cannot honour is refused here with the field's path and a reason a user can act
//! on; nothing is silently dropped. Fields that are accepted but not enforced (CPU limits, emptyDir
//! size limits) come back as warnings, which the agent logs and `lichen check` prints.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, EnvVar, KeyToPath, Pod, PodSpec, Volume};

use super::inputs::{ObjectData, ObjectKind, PodInputs, TokenRef};
use super::state::RestartPolicy;
use crate::config::{ModulesConfig, RuntimeConfig};
use crate::modules::{ImageOrigin, PullCredentials, PullPolicy, parse_image};
use crate::quantity::ByteSize;
use crate::runtime::Preopen;

/// Annotation overriding the fuel budget of every container run in the pod (`0` = unlimited).
pub const FUEL_ANNOTATION: &str = "lichen.dev/fuel";
/// Annotation overriding the wall-clock limit of every container run, in seconds (`0` = none).
pub const TIMEOUT_ANNOTATION: &str = "lichen.dev/run-timeout-seconds";

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

pub use crate::modules::ModuleSource;

/// What the agent needs to run one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerPlan {
    /// Container name.
    pub name: String,
    /// `image` as written.
    pub image: String,
    /// Where the module is.
    pub source: ModuleSource,
    /// `imagePullPolicy`, defaulted as Kubernetes does.
    pub pull_policy: PullPolicy,
    /// `argv`: `command` (or the container name) followed by `args`.
    pub argv: Vec<String>,
    /// Environment, in order.
    pub env: Vec<(String, String)>,
    /// Volume mounts.
    pub preopens: Vec<Preopen>,
    /// Fuel per run; `None` is unlimited.
    pub fuel: Option<u64>,
    /// Memory limit in bytes.
    pub memory_limit: u64,
    /// Wall-clock limit per run.
    pub timeout: Option<Duration>,
}

/// A pod volume backed by a host directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumePlan {
    /// Volume name.
    pub name: String,
    /// The directory on the host.
    pub host: PathBuf,
    /// Whether the agent creates (and, for emptyDir, deletes) it.
    pub kind: VolumeKind,
}

/// How a volume's directory is managed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeKind {
    /// Created with the pod, removed with it.
    EmptyDir,
    /// Must exist already.
    HostPath,
    /// Created if missing, never removed.
    HostPathOrCreate,
    /// Files the agent writes (configMap, secret, downwardAPI, projected), always mounted read-only
    /// and rewritten when their sources change.
    Files(Vec<VolumeFile>),
}

/// One file of a [`VolumeKind::Files`] volume.
#[derive(Clone, PartialEq, Eq)]
pub struct VolumeFile {
    /// Path relative to the volume's directory (validated: no `..`, not absolute).
    pub path: PathBuf,
    /// Contents.
    pub data: Vec<u8>,
    /// Permission bits on the host.
    pub mode: u32,
}

impl std::fmt::Debug for VolumeFile {
    // Secret contents stay out of logs and test output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VolumeFile({}, {} bytes, {:o})", self.path.display(), self.data.len(), self.mode)
    }
}

/// A pod ready to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodPlan {
    /// `namespace/name`.
    pub key: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
    /// Restart policy.
    pub restart_policy: RestartPolicy,
    /// Init containers, run in order before the others.
    pub init_containers: Vec<ContainerPlan>,
    /// Containers.
    pub containers: Vec<ContainerPlan>,
    /// Volumes.
    pub volumes: Vec<VolumePlan>,
    /// `spec.activeDeadlineSeconds`.
    pub active_deadline: Option<Duration>,
    /// Registry credentials from `imagePullSecrets`.
    pub pull_credentials: PullCredentials,
    /// Accepted but not enforced.
    pub warnings: Vec<String>,
    /// What the pod's annotations ask of MQTT (stdout to a topic, subscriptions to stdin).
    pub mqtt: Option<crate::telemetry::bridge::PodMqtt>,
}

impl PodPlan {
    /// Every container, init containers first.
    pub fn all_containers(&self) -> impl Iterator<Item = &ContainerPlan> {
        self.init_containers.iter().chain(&self.containers)
    }
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
    if let Err(why) = check_uid(&uid) {
        errs.add("metadata.uid", why);
        return Err(errs.0);
    }
    let Some(spec) = &pod.spec else {
        errs.add("spec", "is required");
        return Err(errs.0);
    };
    let annotations = meta.annotations.clone().unwrap_or_default();
    let restart_policy = RestartPolicy::parse(spec.restart_policy.as_deref()).unwrap_or_else(|e| {
        errs.add("spec.restartPolicy", e);
        RestartPolicy::Always
    });

    let flag = |errs: &mut Errors, on: Option<bool>, field: &str, why: &str| {
        if on == Some(true) {
            errs.add(field, why);
        }
    };
    const NO_NET: &str = "WebAssembly modules have no network namespace to share; remove it";
    flag(&mut errs, spec.host_network, "spec.hostNetwork", NO_NET);
    flag(&mut errs, spec.host_pid, "spec.hostPID", "modules are not processes; remove it");
    flag(&mut errs, spec.host_ipc, "spec.hostIPC", "modules are not processes; remove it");
    flag(
        &mut errs,
        spec.share_process_namespace,
        "spec.shareProcessNamespace",
        "modules are not processes; remove it",
    );
    if spec.ephemeral_containers.as_ref().is_some_and(|v| !v.is_empty()) {
        errs.add("spec.ephemeralContainers", "debug containers are not supported for WebAssembly pods");
    }
    if spec.readiness_gates.as_ref().is_some_and(|v| !v.is_empty()) {
        errs.add(
            "spec.readinessGates",
            "Lichen cannot evaluate readiness gates, so the pod would never be Ready",
        );
    }
    if spec.host_aliases.as_ref().is_some_and(|v| !v.is_empty()) {
        errs.add("spec.hostAliases", "modules have no /etc/hosts; remove it");
    }
    if spec.resource_claims.as_ref().is_some_and(|v| !v.is_empty()) {
        errs.add("spec.resourceClaims", "dynamic resource allocation is not supported");
    }
    if let Some(sc) = &spec.security_context
        && sc.sysctls.as_ref().is_some_and(|v| !v.is_empty())
    {
        errs.add("spec.securityContext.sysctls", "modules have no kernel namespace to tune; remove it");
    }

    let fuel = match annotations.get(FUEL_ANNOTATION) {
        None => nonzero(ctx.runtime.default_fuel),
        Some(v) => match v.trim().parse::<u64>() {
            Ok(n) => nonzero(n),
            Err(_) => {
                errs.add(
                    &format!("metadata.annotations[{FUEL_ANNOTATION}]"),
                    format!("{v:?} is not a whole number of fuel units (\"0\" means unlimited)"),
                );
                None
            }
        },
    };
    let timeout = match annotations.get(TIMEOUT_ANNOTATION) {
        None => nonzero(ctx.runtime.run_timeout_secs).map(Duration::from_secs),
        Some(v) => match v.trim().parse::<u64>() {
            Ok(n) => nonzero(n).map(Duration::from_secs),
            Err(_) => {
                errs.add(
                    &format!("metadata.annotations[{TIMEOUT_ANNOTATION}]"),
                    format!("{v:?} is not a whole number of seconds (\"0\" means none)"),
                );
                None
            }
        },
    };

    let mqtt = match crate::telemetry::bridge::parse_annotations(&annotations) {
        Ok(m) => m,
        Err(bad) => {
            for (field, message) in bad {
                errs.add(&field, message);
            }
            None
        }
    };

    let field_env = field_values(pod, ctx);
    let mut warnings = Vec::new();
    let mut volumes = Vec::new();
    // Volumes that could not be planned: their errors are reported once, not again at every mount.
    let mut unplanned = std::collections::HashSet::new();
    let mut volume_names = std::collections::HashSet::new();
    let pod_dir = ctx.pods_dir.join(&uid);
    for (i, v) in spec.volumes.iter().flatten().enumerate() {
        let vpath = format!("spec.volumes[{i}]");
        // The name becomes `<pod_dir>/volumes/<name>`: it is checked before that path is built.
        if let Err(why) = dns_label(&v.name) {
            errs.add(&format!("{vpath}.name"), format!("volume {why}"));
            unplanned.insert(v.name.clone());
            continue;
        }
        if !volume_names.insert(v.name.as_str()) {
            errs.add(&format!("{vpath}.name"), format!("volume name {:?} is used twice", v.name));
            continue;
        }
        let vctx = VolumeContext { ctx, pod, pod_dir: &pod_dir, fields: &field_env };
        match volume(v, &vpath, &vctx, &mut errs, &mut warnings) {
            Some(plan) => volumes.push(plan),
            None => {
                unplanned.insert(v.name.clone());
            }
        }
    }
    let mut containers_of = |list: Option<&Vec<Container>>, kind: &str| -> Vec<ContainerPlan> {
        list.into_iter()
            .flatten()
            .enumerate()
            .filter_map(|(i, c)| {
                let path = format!("spec.{kind}[{i}]");
                let vols = (&volumes[..], &unplanned);
                container(c, pod, &path, ctx, vols, &field_env, fuel, timeout, &mut errs, &mut warnings)
            })
            .collect()
    };
    let init_containers = containers_of(spec.init_containers.as_ref(), "initContainers");
    let containers = containers_of(Some(&spec.containers), "containers");
    if spec.containers.is_empty() {
        errs.add("spec.containers", "at least one container is required");
    }
    let mut seen = std::collections::HashSet::new();
    for c in spec.init_containers.iter().flatten().chain(&spec.containers) {
        if !seen.insert(c.name.as_str()) {
            errs.add("spec.containers", format!("container name {:?} is used twice", c.name));
        }
    }

    let active_deadline = match spec.active_deadline_seconds {
        Some(s) if s <= 0 => {
            errs.add("spec.activeDeadlineSeconds", "must be positive");
            None
        }
        Some(s) => Some(Duration::from_secs(s as u64)),
        None => None,
    };

    let pull_credentials = pull_credentials(spec, ctx.inputs, &mut warnings);

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
        volumes,
        active_deadline,
        pull_credentials,
        warnings,
        mqtt,
    })
}

/// Credentials from `imagePullSecrets`. As with the kubelet, a missing or malformed pull secret
/// does not hold the pod: the pull goes ahead without it (and fails if the registry insists).
fn pull_credentials(
    spec: &PodSpec,
    inputs: Option<&PodInputs>,
    warnings: &mut Vec<String>,
) -> PullCredentials {
    let mut creds = PullCredentials::default();
    for (i, r) in spec.image_pull_secrets.iter().flatten().enumerate() {
        let field = format!("spec.imagePullSecrets[{i}]");
        let Some(inputs) = inputs else {
            warnings.push(format!("{field}: pods without a cluster have no Secrets; pulls are anonymous"));
            continue;
        };
        match inputs.object(ObjectKind::Secret, &r.name) {
            Ok(Some(data)) => {
                if let Err(e) = creds.add_secret(data) {
                    warnings.push(format!("{field}: Secret {:?} {e}", r.name));
                }
            }
            Ok(None) => warnings.push(format!("{field}: Secret {:?} not found; pulling without it", r.name)),
            Err(e) => warnings.push(format!("{field}: {e}; pulling without it")),
        }
    }
    creds
}

#[derive(Default)]
struct Errors(Vec<SpecError>);

impl Errors {
    fn add(&mut self, field: &str, message: impl Into<String>) {
        self.0.push(SpecError { field: field.to_owned(), message: message.into(), pending: false });
    }

    fn pending(&mut self, field: &str, message: impl Into<String>) {
        self.0.push(SpecError { field: field.to_owned(), message: message.into(), pending: true });
    }
}

fn nonzero(n: u64) -> Option<u64> {
    (n != 0).then_some(n)
}

struct VolumeContext<'a> {
    ctx: &'a PlanContext<'a>,
    pod: &'a Pod,
    /// `<pods_dir>/<uid>`, from a checked UID.
    pod_dir: &'a Path,
    fields: &'a BTreeMap<&'static str, String>,
}

fn volume(
    v: &Volume,
    path: &str,
    vctx: &VolumeContext<'_>,
    errs: &mut Errors,
    warnings: &mut Vec<String>,
) -> Option<VolumePlan> {
    let pod_dir = vctx.pod_dir;
    if let Some(files) = file_volume(v, path, vctx, errs) {
        return files.map(|files| VolumePlan {
            name: v.name.clone(),
            host: pod_dir.join("volumes").join(&v.name),
            kind: VolumeKind::Files(files),
        });
    }
    if let Some(e) = &v.empty_dir {
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
        return Some(VolumePlan {
            name: v.name.clone(),
            host: pod_dir.join("volumes").join(&v.name),
            kind: VolumeKind::EmptyDir,
        });
    }
    if let Some(h) = &v.host_path {
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
        let host = host_path(&h.path, &format!("{path}.hostPath.path"), vctx.ctx, errs)?;
        return Some(VolumePlan { name: v.name.clone(), host, kind });
    }
    // Name the volume type the user wrote, from the one field besides `name` that is set.
    let kind = serde_json::to_value(v)
        .ok()
        .and_then(|j| j.as_object().and_then(|o| o.keys().find(|k| *k != "name").cloned()))
        .unwrap_or_else(|| "(no type)".into());
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

/// The kubelet's default mode for files it writes into volumes.
const DEFAULT_FILE_MODE: i32 = 0o644;

/// The files of a configMap, secret, downwardAPI or projected volume: `None` when `v` is another
/// type, `Some(None)` when it is one of these but cannot be built (errors recorded).
fn file_volume(
    v: &Volume,
    path: &str,
    vctx: &VolumeContext<'_>,
    errs: &mut Errors,
) -> Option<Option<Vec<VolumeFile>>> {
    let before = errs.0.len();
    let mut files = Vec::new();
    if let Some(c) = &v.config_map {
        let mode = c.default_mode.unwrap_or(DEFAULT_FILE_MODE);
        let src = ObjectSource { kind: ObjectKind::ConfigMap, name: &c.name, optional: c.optional };
        object_files(&src, c.items.as_deref(), mode, &format!("{path}.configMap"), vctx, errs, &mut files);
    } else if let Some(s) = &v.secret {
        let mode = s.default_mode.unwrap_or(DEFAULT_FILE_MODE);
        let name = s.secret_name.as_deref().unwrap_or("");
        let src = ObjectSource { kind: ObjectKind::Secret, name, optional: s.optional };
        object_files(&src, s.items.as_deref(), mode, &format!("{path}.secret"), vctx, errs, &mut files);
    } else if let Some(d) = &v.downward_api {
        let mode = d.default_mode.unwrap_or(DEFAULT_FILE_MODE);
        for (i, item) in d.items.iter().flatten().enumerate() {
            downward_file(item, mode, &format!("{path}.downwardAPI.items[{i}]"), vctx, errs, &mut files);
        }
    } else if let Some(p) = &v.projected {
        let mode = p.default_mode.unwrap_or(DEFAULT_FILE_MODE);
        for (i, src) in p.sources.iter().flatten().enumerate() {
            let spath = format!("{path}.projected.sources[{i}]");
            if let Some(c) = &src.config_map {
                let o = ObjectSource { kind: ObjectKind::ConfigMap, name: &c.name, optional: c.optional };
                object_files(
                    &o,
                    c.items.as_deref(),
                    mode,
                    &format!("{spath}.configMap"),
                    vctx,
                    errs,
                    &mut files,
                );
            } else if let Some(s) = &src.secret {
                let o = ObjectSource { kind: ObjectKind::Secret, name: &s.name, optional: s.optional };
                object_files(
                    &o,
                    s.items.as_deref(),
                    mode,
                    &format!("{spath}.secret"),
                    vctx,
                    errs,
                    &mut files,
                );
            } else if let Some(d) = &src.downward_api {
                for (j, item) in d.items.iter().flatten().enumerate() {
                    let ipath = format!("{spath}.downwardAPI.items[{j}]");
                    downward_file(item, mode, &ipath, vctx, errs, &mut files);
                }
            } else if let Some(t) = &src.service_account_token {
                let tpath = format!("{spath}.serviceAccountToken");
                let r = TokenRef {
                    audience: t.audience.clone().unwrap_or_default(),
                    expiration_seconds: t.expiration_seconds.unwrap_or(super::inputs::DEFAULT_TOKEN_SECONDS),
                };
                if r.expiration_seconds < 600 {
                    errs.add(&format!("{tpath}.expirationSeconds"), "must be at least 600");
                    continue;
                }
                let Some(inputs) = vctx.ctx.inputs else {
                    errs.add(
                        &tpath,
                        "service account tokens need a cluster connection; static pods cannot use them",
                    );
                    continue;
                };
                match inputs.tokens.get(&r.key()) {
                    Some(tok) => {
                        if let Some(p) = file_path(&t.path, &format!("{tpath}.path"), errs) {
                            files.push(VolumeFile {
                                path: p,
                                data: tok.token.clone().into_bytes(),
                                mode: mode as u32,
                            });
                        }
                    }
                    None => {
                        let why = inputs.errors.get(&format!("token/{}", r.key()));
                        errs.pending(
                            &tpath,
                            match why {
                                Some(e) => format!("cannot get a service account token: {e}"),
                                None => "the service account token has not been issued yet".into(),
                            },
                        );
                    }
                }
            } else {
                let kind = serde_json::to_value(src)
                    .ok()
                    .and_then(|j| j.as_object().and_then(|o| o.keys().next().cloned()))
                    .unwrap_or_else(|| "(no type)".into());
                errs.add(
                    &spath,
                    format!("projected source {kind} is not supported; use configMap, secret, downwardAPI or serviceAccountToken"),
                );
            }
        }
    } else {
        return None;
    }
    let mut seen = std::collections::HashSet::new();
    for f in &files {
        if !seen.insert(f.path.clone()) {
            errs.add(path, format!("two sources write the file {}", f.path.display()));
        }
    }
    Some((errs.0.len() == before).then_some(files))
}

struct ObjectSource<'a> {
    kind: ObjectKind,
    name: &'a str,
    optional: Option<bool>,
}

/// Adds the files of a ConfigMap or Secret source: every key, or the listed `items`.
fn object_files(
    src: &ObjectSource<'_>,
    items: Option<&[KeyToPath]>,
    mode: i32,
    path: &str,
    vctx: &VolumeContext<'_>,
    errs: &mut Errors,
    out: &mut Vec<VolumeFile>,
) {
    let Some(data) = lookup(vctx.ctx.inputs, src, path, errs) else { return };
    let Some(data) = data else { return };
    let kind = src.kind.as_str().to_lowercase();
    match items {
        None | Some([]) => {
            for (key, value) in data {
                if let Some(p) = file_path(key, &format!("{path}[{key}]"), errs) {
                    out.push(VolumeFile { path: p, data: value.0.clone(), mode: mode as u32 });
                }
            }
        }
        Some(items) => {
            for (i, item) in items.iter().enumerate() {
                let ipath = format!("{path}.items[{i}]");
                match data.get(&item.key) {
                    Some(value) => {
                        if let Some(p) = file_path(&item.path, &format!("{ipath}.path"), errs) {
                            let mode = item.mode.unwrap_or(mode) as u32;
                            out.push(VolumeFile { path: p, data: value.0.clone(), mode });
                        }
                    }
                    None if src.optional == Some(true) => {}
                    None => errs.pending(
                        &ipath,
                        format!(
                            "{kind} {:?} has no key {:?} (add it, or mark the source optional)",
                            src.name, item.key
                        ),
                    ),
                }
            }
        }
    }
}

/// The data of a ConfigMap or Secret: `Some(Some)` found, `Some(None)` optional and absent,
/// `None` an error was recorded.
fn lookup<'a>(
    inputs: Option<&'a PodInputs>,
    src: &ObjectSource<'_>,
    path: &str,
    errs: &mut Errors,
) -> Option<Option<&'a ObjectData>> {
    let kind = src.kind.as_str();
    if src.name.is_empty() {
        errs.add(&format!("{path}.name"), "is required");
        return None;
    }
    let Some(inputs) = inputs else {
        errs.add(
            path,
            format!("{kind}s need a cluster connection; static pods must use literal values or hostPath"),
        );
        return None;
    };
    match inputs.object(src.kind, src.name) {
        Ok(Some(d)) => Some(Some(d)),
        Ok(None) if src.optional == Some(true) => Some(None),
        Ok(None) => {
            errs.pending(path, format!("{} {:?} not found", kind.to_lowercase(), src.name));
            None
        }
        Err(why) => {
            errs.pending(path, why.to_string());
            None
        }
    }
}

fn downward_file(
    item: &k8s_openapi::api::core::v1::DownwardAPIVolumeFile,
    mode: i32,
    path: &str,
    vctx: &VolumeContext<'_>,
    errs: &mut Errors,
    out: &mut Vec<VolumeFile>,
) {
    let value = match (&item.field_ref, &item.resource_field_ref) {
        (Some(f), _) => match pod_field(vctx.pod, &f.field_path, vctx.fields) {
            Ok(v) => v,
            Err(why) => return errs.add(&format!("{path}.fieldRef"), why),
        },
        (None, Some(_)) => {
            return errs.add(&format!("{path}.resourceFieldRef"), "is not supported; use a fieldRef");
        }
        (None, None) => return errs.add(path, "needs a fieldRef"),
    };
    if let Some(p) = file_path(&item.path, &format!("{path}.path"), errs) {
        out.push(VolumeFile { path: p, data: value.into_bytes(), mode: item.mode.unwrap_or(mode) as u32 });
    }
}

/// A file path inside a volume, as the API server validates it: relative, without `..`.
fn file_path(p: &str, field: &str, errs: &mut Errors) -> Option<PathBuf> {
    let path = Path::new(p);
    let ok =
        !p.is_empty() && path.is_relative() && path.components().all(|c| matches!(c, Component::Normal(_)));
    if !ok {
        errs.add(field, format!("{p:?} must be a relative path without '..'"));
        return None;
    }
    Some(path.to_owned())
}

/// The longest UID accepted: a UUID has 36 characters; this leaves room for other schemes.
const MAX_UID_LEN: usize = 128;

/// Whether a UID can name the pod's directories (`<state_dir>/pods/<uid>`, its log directory): one
/// plain path component. The API server hands out UUIDs and static pods get a hash in the same
/// shape (`static_pods::parse_manifest`), so `..`, `a/b` or an empty UID only comes from a hostile
/// or broken server, and is refused before any path is built from it.
fn check_uid(uid: &str) -> Result<(), String> {
    if uid.is_empty() {
        return Err("is required".into());
    }
    let ok = uid.len() <= MAX_UID_LEN && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !ok {
        // Debug-quoted and cut short: the value comes from the API server and goes into a status.
        let shown: String = uid.chars().take(MAX_UID_LEN).collect();
        return Err(format!(
            "{shown:?} is not a pod UID: at most {MAX_UID_LEN} letters, digits and '-' (it names \
             the pod's directories on the node); the API server sent a UID no real one hands out"
        ));
    }
    Ok(())
}

/// Checks an RFC 1123 label, which Kubernetes requires of container and volume names. Both name
/// directories on the node (`pods/<uid>/volumes/<volume>`, `logs/<pod>/<container>`), so `..` or
/// `a/b` must never get that far. The message follows the subject: "volume ...", "container ...".
fn dns_label(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("name is required".into());
    }
    let ok = name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        return Ok(());
    }
    let shown: String = name.chars().take(64).collect();
    Err(format!(
        "name {shown:?} must be an RFC 1123 label, as Kubernetes requires: at most 63 lower-case \
         letters, digits and '-', starting and ending with a letter or digit"
    ))
}

/// A hostPath the pod may mount, normalised: absolute, without `..` (refused outright, as
/// Kubernetes' own validation does), `.` and repeated `/` dropped. It may never be, hold or lie
/// under the agent's state directory; for pods from the cluster it must also be, or lie under, one
/// of `runtime.allowed_host_paths`, because whoever may create pods must not read the board.
///
/// The path is checked as written and, when it exists, again with its symlinks resolved: a link
/// under an allowed directory (one a pod with a writable mount there could leave) must not lead
/// into the state directory or out of the allowed ones. A link created after admission is not
/// seen until the pod is admitted again, so allowed directories should be ones no untrusted
/// writer can put links into.
fn host_path(p: &str, field: &str, ctx: &PlanContext<'_>, errs: &mut Errors) -> Option<PathBuf> {
    let path = host_path_as_written(p, field, ctx, errs)?;
    if let Ok(resolved) = std::fs::canonicalize(&path)
        && resolved != path
    {
        let resolve = |d: &Path| std::fs::canonicalize(d).unwrap_or_else(|_| lexical(d));
        let state = resolve(ctx.state_dir);
        let inside_state = resolved.starts_with(&state) || state.starts_with(&resolved);
        let outside_allowed = matches!(ctx.origin, ImageOrigin::Cluster)
            && !ctx.runtime.allowed_host_paths.iter().any(|a| resolved.starts_with(resolve(a)));
        if inside_state || outside_allowed {
            errs.add(
                field,
                format!(
                    "{} leads through a symlink to {}, which {}",
                    path.display(),
                    resolved.display(),
                    if inside_state {
                        "is, holds or lies under the agent's state directory"
                    } else {
                        "is not under runtime.allowed_host_paths"
                    }
                ),
            );
            return None;
        }
    }
    Some(path)
}

fn host_path_as_written(p: &str, field: &str, ctx: &PlanContext<'_>, errs: &mut Errors) -> Option<PathBuf> {
    let raw = Path::new(p);
    if !raw.is_absolute() {
        errs.add(field, "must be an absolute path");
        return None;
    }
    if raw.components().any(|c| c == Component::ParentDir) {
        errs.add(field, format!("{p:?} must not contain '..'"));
        return None;
    }
    let path = lexical(raw);
    let state = lexical(ctx.state_dir);
    if path.starts_with(&state) || state.starts_with(&path) {
        errs.add(
            field,
            format!(
                "{} is, holds or lies under the agent's state directory {} (the node's key, its \
                 store and every pod's secrets); no pod may mount it, use another directory",
                path.display(),
                state.display()
            ),
        );
        return None;
    }
    if matches!(ctx.origin, ImageOrigin::Cluster) {
        let allowed = &ctx.runtime.allowed_host_paths;
        if !allowed.iter().any(|a| path.starts_with(lexical(a))) {
            let list = if allowed.is_empty() {
                "which is empty, so no hostPath is allowed".to_owned()
            } else {
                let dirs: Vec<String> = allowed.iter().map(|a| a.display().to_string()).collect();
                format!("which lists {}", dirs.join(", "))
            };
            errs.add(
                field,
                format!(
                    "pods from the cluster may mount only host directories under \
                     runtime.allowed_host_paths ({list}); add {} or a parent there, or use emptyDir",
                    path.display()
                ),
            );
            return None;
        }
    }
    Some(path)
}

/// `p` made absolute against the working directory, with `.`, `..` and repeated `/` resolved
/// lexically; no symlink is followed, nothing is read from disk.
fn lexical(p: &Path) -> PathBuf {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

/// A `fieldRef` value: the plain fields, or one label or annotation, or all of them as the
/// downward API formats them (`key="value"` lines, sorted).
fn pod_field(pod: &Pod, field: &str, fields: &BTreeMap<&'static str, String>) -> Result<String, String> {
    if let Some(v) = fields.get(field) {
        return Ok(v.clone());
    }
    let m = &pod.metadata;
    let one = |prefix: &str, map: &Option<BTreeMap<String, String>>| {
        field
            .strip_prefix(prefix)
            .and_then(|r| r.strip_suffix("']"))
            .map(|k| map.as_ref().and_then(|m| m.get(k)).cloned().unwrap_or_default())
    };
    if let Some(v) =
        one("metadata.labels['", &m.labels).or_else(|| one("metadata.annotations['", &m.annotations))
    {
        return Ok(v);
    }
    let all = |map: &Option<BTreeMap<String, String>>| {
        map.iter().flatten().map(|(k, v)| format!("{k}={v:?}\n")).collect::<String>()
    };
    match field {
        "metadata.labels" => Ok(all(&m.labels)),
        "metadata.annotations" => Ok(all(&m.annotations)),
        _ => Err(format!(
            "{field:?} is not available; use one of {}, metadata.labels, metadata.annotations",
            fields.keys().copied().collect::<Vec<_>>().join(", ")
        )),
    }
}

#[allow(clippy::too_many_arguments)]
fn container(
    c: &Container,
    pod: &Pod,
    path: &str,
    ctx: &PlanContext<'_>,
    (volumes, unplanned): (&[VolumePlan], &std::collections::HashSet<String>),
    field_env: &BTreeMap<&'static str, String>,
    fuel: Option<u64>,
    timeout: Option<Duration>,
    errs: &mut Errors,
    warnings: &mut Vec<String>,
) -> Option<ContainerPlan> {
    let before = errs.0.len();
    // The name becomes the container's log directory: checked here, before any path is built.
    if let Err(why) = dns_label(&c.name) {
        errs.add(&format!("{path}.name"), format!("container {why}"));
    }
    let reject = |errs: &mut Errors, set: bool, field: &str, why: &str| {
        if set {
            errs.add(&format!("{path}.{field}"), why);
        }
    };
    reject(
        errs,
        c.ports.as_ref().is_some_and(|p| !p.is_empty()),
        "ports",
        "WASI preview 1 modules cannot listen on ports; remove ports",
    );
    let probe_why = "Lichen does not run probes, and an unrun probe would make status dishonest; remove it";
    reject(errs, c.liveness_probe.is_some(), "livenessProbe", probe_why);
    reject(errs, c.readiness_probe.is_some(), "readinessProbe", probe_why);
    reject(errs, c.startup_probe.is_some(), "startupProbe", probe_why);
    reject(errs, c.lifecycle.is_some(), "lifecycle", "modules receive no hooks or signals; remove lifecycle");
    reject(errs, c.tty == Some(true), "tty", "modules have no terminal");
    reject(errs, c.stdin == Some(true), "stdin", "attaching to a module's stdin is not supported");
    reject(
        errs,
        c.working_dir.is_some(),
        "workingDir",
        "WASI preview 1 has no working directory; use paths under a volume's mountPath",
    );
    reject(
        errs,
        c.volume_devices.as_ref().is_some_and(|v| !v.is_empty()),
        "volumeDevices",
        "modules cannot use block devices",
    );
    reject(
        errs,
        c.restart_policy.is_some(),
        "restartPolicy",
        "sidecar containers are not supported; use spec.restartPolicy",
    );
    if let Some(sc) = &c.security_context {
        reject(
            errs,
            sc.privileged == Some(true),
            "securityContext.privileged",
            "modules cannot be privileged; remove it",
        );
        let adds = sc.capabilities.as_ref().and_then(|cap| cap.add.as_ref()).is_some_and(|a| !a.is_empty());
        reject(
            errs,
            adds,
            "securityContext.capabilities.add",
            "modules have no Linux capabilities to add; remove it",
        );
    }

    let mut memory_limit = ctx.runtime.default_memory_limit.0;
    if let Some(res) = &c.resources {
        for (name, q) in res.limits.iter().flatten() {
            match name.as_str() {
                "memory" => match ByteSize::parse(&q.0) {
                    Ok(b) if b.0 < 64 << 10 => errs.add(
                        &format!("{path}.resources.limits.memory"),
                        format!("{} is below one WebAssembly page (64Ki)", q.0),
                    ),
                    Ok(b) if b.0 > 4 << 30 => errs.add(
                        &format!("{path}.resources.limits.memory"),
                        format!("{} is above the 4Gi a wasm32 memory can address", q.0),
                    ),
                    Ok(b) => memory_limit = b.0,
                    Err(e) => errs.add(&format!("{path}.resources.limits.memory"), e.to_string()),
                },
                "cpu" | "ephemeral-storage" => warnings
                    .push(format!("{path}.resources.limits.{name} is not enforced (fuel bounds compute)")),
                other => errs.add(
                    &format!("{path}.resources.limits.{other}"),
                    "extended resources are not available to modules",
                ),
            }
        }
        for name in res.requests.iter().flatten().map(|(k, _)| k) {
            if !matches!(name.as_str(), "memory" | "cpu" | "ephemeral-storage") {
                errs.add(
                    &format!("{path}.resources.requests.{name}"),
                    "extended resources are not available to modules",
                );
            }
        }
    }

    let image = c.image.as_deref().unwrap_or("");
    let source = match parse_image(image, ctx.origin, ctx.modules) {
        Ok(s) => Some(s),
        Err(e) => {
            errs.add(&format!("{path}.image"), e.to_string());
            None
        }
    };
    let pull_policy = match PullPolicy::from_spec(c.image_pull_policy.as_deref(), image) {
        Ok(p) => Some(p),
        Err(e) => {
            errs.add(&format!("{path}.imagePullPolicy"), e.to_string());
            None
        }
    };

    // envFrom first, then env, which overrides it: the kubelet's order.
    let mut env: Vec<(String, String)> = Vec::new();
    for (i, f) in c.env_from.iter().flatten().enumerate() {
        let fpath = format!("{path}.envFrom[{i}]");
        let (src, spath) = match (&f.config_map_ref, &f.secret_ref) {
            (Some(c), None) => (
                ObjectSource { kind: ObjectKind::ConfigMap, name: &c.name, optional: c.optional },
                "configMapRef",
            ),
            (None, Some(s)) => {
                (ObjectSource { kind: ObjectKind::Secret, name: &s.name, optional: s.optional }, "secretRef")
            }
            _ => {
                errs.add(&fpath, "needs exactly one of configMapRef or secretRef");
                continue;
            }
        };
        let Some(Some(data)) = lookup(ctx.inputs, &src, &format!("{fpath}.{spath}"), errs) else { continue };
        let prefix = f.prefix.as_deref().unwrap_or("");
        for (key, value) in data {
            let name = format!("{prefix}{key}");
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                warnings.push(format!("{fpath}: skipped key {key:?}, which is not a valid variable name"));
                continue;
            }
            env.retain(|(k, _)| k != &name);
            env.push((name, String::from_utf8_lossy(&value.0).into_owned()));
        }
    }
    for (i, e) in c.env.iter().flatten().enumerate() {
        let epath = format!("{path}.env[{i}]");
        if let Some(v) = env_value(e, pod, field_env, ctx.inputs, &epath, errs) {
            let v = expand(&v, &env);
            env.retain(|(k, _)| k != &e.name);
            env.push((e.name.clone(), v));
        }
    }

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
        match volumes.iter().find(|v| v.name == m.name) {
            Some(v) => preopens.push(Preopen {
                host: v.host.clone(),
                guest: m.mount_path.clone(),
                // The agent's own files are never the module's to change, as on a kubelet.
                read_only: m.read_only == Some(true) || matches!(v.kind, VolumeKind::Files(_)),
            }),
            None if unplanned.contains(&m.name) => {}
            None => errs.add(&mpath, format!("no volume named {:?} in spec.volumes", m.name)),
        }
    }

    let mut argv: Vec<String> = match &c.command {
        Some(cmd) if !cmd.is_empty() => cmd.iter().map(|a| expand(a, &env)).collect(),
        _ => vec![c.name.clone()],
    };
    argv.extend(c.args.iter().flatten().map(|a| expand(a, &env)));

    if errs.0.len() > before {
        return None;
    }
    Some(ContainerPlan {
        name: c.name.clone(),
        image: c.image.clone().unwrap_or_default(),
        source: source?,
        pull_policy: pull_policy?,
        argv,
        env,
        preopens,
        fuel,
        memory_limit,
        timeout,
    })
}

fn field_values(pod: &Pod, ctx: &PlanContext<'_>) -> BTreeMap<&'static str, String> {
    let m = &pod.metadata;
    let mut out = BTreeMap::new();
    out.insert("metadata.name", m.name.clone().unwrap_or_default());
    out.insert("metadata.namespace", m.namespace.clone().unwrap_or_else(|| "default".into()));
    out.insert("metadata.uid", m.uid.clone().unwrap_or_default());
    out.insert("spec.nodeName", ctx.node_name.to_owned());
    let sa =
        pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into());
    out.insert("spec.serviceAccountName", sa);
    if let Some(ip) = ctx.host_ip {
        out.insert("status.hostIP", ip.to_owned());
    }
    out
}

/// The value of one `env` entry, or `None` with the reason recorded.
fn env_value(
    e: &EnvVar,
    pod: &Pod,
    fields: &BTreeMap<&'static str, String>,
    inputs: Option<&PodInputs>,
    path: &str,
    errs: &mut Errors,
) -> Option<String> {
    let Some(from) = &e.value_from else {
        return Some(e.value.clone().unwrap_or_default());
    };
    if let Some(f) = &from.field_ref {
        // Whole label and annotation sets are for downwardAPI volumes only.
        let whole = matches!(f.field_path.as_str(), "metadata.labels" | "metadata.annotations");
        return match pod_field(pod, &f.field_path, fields) {
            Ok(v) if !whole => Some(v),
            Ok(_) => {
                errs.add(
                    &format!("{path}.valueFrom.fieldRef"),
                    format!("{}: use metadata.labels['key']", e.name),
                );
                None
            }
            Err(why) => {
                errs.add(&format!("{path}.valueFrom.fieldRef"), format!("{}: {why}", e.name));
                None
            }
        };
    }
    let (src, key, field) = match (&from.config_map_key_ref, &from.secret_key_ref) {
        (Some(k), None) => (
            ObjectSource { kind: ObjectKind::ConfigMap, name: &k.name, optional: k.optional },
            &k.key,
            "configMapKeyRef",
        ),
        (None, Some(k)) => (
            ObjectSource { kind: ObjectKind::Secret, name: &k.name, optional: k.optional },
            &k.key,
            "secretKeyRef",
        ),
        (None, None) => {
            errs.add(
                &format!("{path}.valueFrom"),
                format!("{}: resourceFieldRef is not supported; use a literal value", e.name),
            );
            return None;
        }
        _ => {
            errs.add(&format!("{path}.valueFrom"), format!("{}: set only one source", e.name));
            return None;
        }
    };
    let fpath = format!("{path}.valueFrom.{field}");
    let data = lookup(inputs, &src, &fpath, errs)?;
    match data.and_then(|d| d.get(key)) {
        Some(v) => Some(String::from_utf8_lossy(&v.0).into_owned()),
        // An optional reference that resolves to nothing leaves the variable unset, as on a kubelet.
        None if src.optional == Some(true) => None,
        None => {
            let kind = src.kind.as_str();
            let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
            errs.pending(&fpath, format!("couldn't find key {key} in {kind} {ns}/{}", src.name));
            None
        }
    }
}

/// Kubernetes' `$(VAR)` expansion against variables defined earlier; `$$` escapes, unknown names stay.
fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Pod {
        serde_saphyr::from_str_with_options(yaml, crate::static_pods::yaml_options())
            .expect("test pod parses")
    }

    fn ctx(runtime: &RuntimeConfig) -> PlanContext<'_> {
        PlanContext {
            node_name: "pi-07",
            host_ip: Some("10.0.0.7"),
            pods_dir: Path::new("/var/lib/lichen/pods"),
            state_dir: Path::new("/var/lib/lichen"),
            origin: ImageOrigin::Static(Path::new("/etc/lichen/pods")),
            modules: &NO_MODULE_SETTINGS,
            runtime,
            inputs: None,
        }
    }

    static NO_MODULE_SETTINGS: std::sync::LazyLock<ModulesConfig> =
        std::sync::LazyLock::new(ModulesConfig::default);

    const BASE: &str = "
metadata: {name: p, namespace: ns, uid: u1, annotations: {lichen.dev/fuel: '500'}}
spec:
  restartPolicy: OnFailure
  volumes: [{name: data, emptyDir: {}}, {name: cfg, hostPath: {path: /etc/app, type: Directory}}]
  containers:
  - name: app
    image: mods/app.wasm
    command: [app, --node, $(NODE)]
    args: [$(GREETING)-x, $$(NODE)]
    env:
    - {name: NODE, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}
    - {name: GREETING, value: hi-$(NODE)}
    resources: {limits: {memory: 16Mi, cpu: 250m}}
    volumeMounts: [{name: data, mountPath: /data}, {name: cfg, mountPath: /cfg, readOnly: true}]
";

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

    #[test]
    fn unsupported_fields_are_refused_by_path() {
        let rt = RuntimeConfig::default();
        let bad = pod("
metadata: {name: p, uid: u1, annotations: {lichen.dev/fuel: lots}}
spec:
  hostNetwork: true
  volumes: [{name: s, nfs: {server: x, path: /}}, {name: f, hostPath: {path: /dev/x, type: File}}]
  containers:
  - name: app
    image: ftp://acme/app.wasm
    ports: [{containerPort: 80}]
    securityContext: {privileged: true}
    readinessProbe: {exec: {command: [x]}}
    resources: {limits: {nvidia.com/gpu: '1'}}
    volumeMounts: [{name: nope, mountPath: /x}]
");
        let errs = plan(&bad, &ctx(&rt)).expect_err("must be refused");
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        for want in [
            "spec.hostNetwork",
            "metadata.annotations[lichen.dev/fuel]",
            "spec.volumes[0]",
            "spec.volumes[1].hostPath.type",
            "spec.containers[0].ports",
            "spec.containers[0].readinessProbe",
            "spec.containers[0].securityContext.privileged",
            "spec.containers[0].resources.limits.nvidia.com/gpu",
            "spec.containers[0].image",
            "spec.containers[0].volumeMounts[0]",
        ] {
            assert!(fields.contains(&want), "missing {want} in {errs:#?}");
        }
        let nfs = errs.iter().find(|e| e.field == "spec.volumes[0]").expect("volume error");
        assert!(nfs.message.contains("nfs"), "names the type: {}", nfs.message);
    }

    #[test]
    fn images_pull_policies_and_pull_secrets() {
        let rt = RuntimeConfig::default();
        let p = pod("
metadata: {name: p, uid: u1}
spec:
  imagePullSecrets: [{name: regcred}, {name: absent}]
  containers:
  - {name: a, image: registry.lan:5000/acme/app:1.0}
  - {name: b, image: registry.lan:5000/acme/app}
  - {name: c, image: mods/c.wasm, imagePullPolicy: Never}
");
        let mut inputs = PodInputs::default();
        let config = r#"{"auths":{"registry.lan:5000":{"username":"u","password":"p"}}}"#;
        let data = [(".dockerconfigjson".to_owned(), k8s_openapi::ByteString(config.as_bytes().to_vec()))];
        inputs.secrets.insert("regcred".into(), Some(data.into_iter().collect()));
        inputs.secrets.insert("absent".into(), None);
        let ctx = PlanContext { inputs: Some(&inputs), ..ctx(&rt) };
        let plan = plan(&p, &ctx).expect("plans");
        let policies: Vec<PullPolicy> = plan.containers.iter().map(|c| c.pull_policy).collect();
        assert_eq!(policies, [PullPolicy::IfNotPresent, PullPolicy::Always, PullPolicy::Never]);
        assert!(matches!(plan.containers[0].source, ModuleSource::Oci(_)));
        assert_eq!(plan.containers[2].source, ModuleSource::File("/etc/lichen/pods/mods/c.wasm".into()));
        assert!(plan.pull_credentials.for_registry("registry.lan:5000").is_some());
        // A missing pull secret does not hold the pod; it is only a warning.
        assert!(plan.warnings.iter().any(|w| w.contains("\"absent\" not found")), "{:?}", plan.warnings);

        let bad = pod("
metadata: {name: p, uid: u1}
spec:
  containers: [{name: a, image: r/app:1, imagePullPolicy: Sometimes}]
");
        let errs = super::plan(&bad, &ctx).expect_err("refused");
        assert_eq!(errs[0].field, "spec.containers[0].imagePullPolicy");
    }

    fn inputs() -> PodInputs {
        let data = |pairs: &[(&str, &str)]| -> Option<ObjectData> {
            Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), k8s_openapi::ByteString(v.as_bytes().to_vec())))
                    .collect(),
            )
        };
        let mut i = PodInputs::default();
        i.config_maps
            .insert("app".into(), data(&[("mode", "fast"), ("conf.toml", "x = 1"), ("LEVEL", "debug")]));
        i.config_maps.insert("kube-root-ca.crt".into(), data(&[("ca.crt", "CA")]));
        i.config_maps.insert("gone".into(), None);
        i.secrets.insert("creds".into(), data(&[("password", "hunter2")]));
        let now = jiff::Timestamp::now();
        i.tokens.insert(
            TokenRef { audience: String::new(), expiration_seconds: 3607 }.key(),
            super::super::inputs::IssuedToken { token: "tok".into(), issued: now, expires: now },
        );
        i
    }

    const WITH_INPUTS: &str = "
metadata: {name: p, namespace: ns, uid: u1, labels: {app: web, tier: edge}}
spec:
  volumes:
  - {name: cfg, configMap: {name: app, items: [{key: conf.toml, path: etc/app.toml}]}}
  - {name: sec, secret: {secretName: creds, defaultMode: 0400}}
  - {name: meta, downwardAPI: {items: [{path: labels, fieldRef: {fieldPath: metadata.labels}}]}}
  - name: sa
    projected:
      sources:
      - serviceAccountToken: {path: token}
      - configMap: {name: kube-root-ca.crt, items: [{key: ca.crt, path: ca.crt}]}
      - downwardAPI: {items: [{path: namespace, fieldRef: {fieldPath: metadata.namespace}}]}
  - {name: opt, configMap: {name: gone, optional: true}}
  containers:
  - name: app
    image: mods/app.wasm
    envFrom: [{configMapRef: {name: app}, prefix: CFG_}]
    env:
    - {name: CFG_mode, value: overridden}
    - {name: PASS, valueFrom: {secretKeyRef: {name: creds, key: password}}}
    - {name: TIER, valueFrom: {fieldRef: {fieldPath: \"metadata.labels['tier']\"}}}
    - {name: MISSING_OK, valueFrom: {configMapKeyRef: {name: gone, key: k, optional: true}}}
    volumeMounts: [{name: cfg, mountPath: /cfg}, {name: sa, mountPath: /var/run/secrets/kubernetes.io/serviceaccount}]
";

    fn files(plan: &PodPlan, volume: &str) -> Vec<(String, String, u32)> {
        let v = plan.volumes.iter().find(|v| v.name == volume).expect("volume");
        let VolumeKind::Files(files) = &v.kind else { panic!("{volume} is not a files volume") };
        files
            .iter()
            .map(|f| (f.path.display().to_string(), String::from_utf8_lossy(&f.data).into_owned(), f.mode))
            .collect()
    }

    #[test]
    fn config_maps_secrets_tokens_and_the_downward_api_become_files_and_env() {
        let rt = RuntimeConfig::default();
        let inputs = inputs();
        let ctx = PlanContext { inputs: Some(&inputs), ..ctx(&rt) };
        let plan = plan(&pod(WITH_INPUTS), &ctx).expect("valid");
        assert_eq!(files(&plan, "cfg"), [("etc/app.toml".into(), "x = 1".into(), 0o644)]);
        assert_eq!(files(&plan, "sec"), [("password".into(), "hunter2".into(), 0o400)]);
        assert_eq!(files(&plan, "meta"), [("labels".into(), "app=\"web\"\ntier=\"edge\"\n".into(), 0o644)]);
        assert_eq!(
            files(&plan, "sa"),
            [
                ("token".into(), "tok".into(), 0o644),
                ("ca.crt".into(), "CA".into(), 0o644),
                ("namespace".into(), "ns".into(), 0o644)
            ]
        );
        assert_eq!(files(&plan, "opt"), []);
        let c = &plan.containers[0];
        let env: Vec<(&str, &str)> = c.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            env,
            [
                ("CFG_LEVEL", "debug"),
                ("CFG_conf.toml", "x = 1"),
                ("CFG_mode", "overridden"),
                ("PASS", "hunter2"),
                ("TIER", "edge")
            ]
        );
        assert!(c.preopens.iter().all(|p| p.read_only), "agent-written volumes are read-only");
        assert!(!format!("{:?}", plan.volumes).contains("hunter2"), "secret files stay out of Debug output");
    }

    #[test]
    fn a_missing_input_makes_the_pod_wait_and_a_static_pod_cannot_refer_to_one() {
        let rt = RuntimeConfig::default();
        let mut inputs = inputs();
        inputs.secrets.insert("creds".into(), None);
        inputs.config_maps.remove("app");
        inputs.errors.insert("configmap/app".into(), "connection refused".into());
        let with = PlanContext { inputs: Some(&inputs), ..ctx(&rt) };
        let errs = plan(&pod(WITH_INPUTS), &with).expect_err("waits");
        assert!(errs.iter().all(|e| e.pending), "{errs:#?}");
        let text = errs.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n");
        assert!(text.contains("spec.volumes[1].secret: secret \"creds\" not found"), "{text}");
        assert!(
            text.contains("cannot fetch ConfigMap \"app\" from the API server: connection refused"),
            "{text}"
        );

        let errs = plan(&pod(WITH_INPUTS), &ctx(&rt)).expect_err("static pods have no cluster");
        assert!(errs.iter().all(|e| !e.pending), "{errs:#?}");
        assert!(errs.iter().any(|e| e.message.contains("need a cluster connection")), "{errs:#?}");
    }

    #[test]
    fn volume_file_paths_cannot_escape() {
        let rt = RuntimeConfig::default();
        let inputs = inputs();
        let ctx = PlanContext { inputs: Some(&inputs), ..ctx(&rt) };
        let bad = WITH_INPUTS.replace("path: etc/app.toml", "path: ../../etc/passwd");
        let errs = plan(&pod(&bad), &ctx).expect_err("refused");
        assert_eq!(errs[0].field, "spec.volumes[0].configMap.items[0].path");
        assert!(!errs[0].pending);
    }

    /// A one-container pod with `volumes` (a YAML flow list) mounted at /v0, /v1, ...
    fn with_volumes(uid: &str, volumes: &str) -> Pod {
        let n = volumes.matches("name:").count();
        let mounts: Vec<String> = (0..n).map(|i| format!("{{name: v{i}, mountPath: /v{i}}}")).collect();
        pod(&format!(
            "
metadata: {{name: p, uid: {uid:?}}}
spec:
  volumes: {volumes}
  containers: [{{name: app, image: registry.lan/acme/app:1.0, volumeMounts: [{}]}}]
",
            mounts.join(", ")
        ))
    }

    fn refusal(errs: &[SpecError], field: &str) -> String {
        let e = errs.iter().find(|e| e.field == field).unwrap_or_else(|| panic!("no {field} in {errs:#?}"));
        assert!(!e.pending, "a refusal, not a wait: {e}");
        e.message.clone()
    }

    fn cluster<'a>(rt: &'a RuntimeConfig, inputs: &'a PodInputs) -> PlanContext<'a> {
        PlanContext { origin: ImageOrigin::Cluster, inputs: Some(inputs), ..ctx(rt) }
    }

    #[test]
    fn cluster_pods_mount_only_allowed_host_paths() {
        let inputs = PodInputs::default();
        let refused = RuntimeConfig::default();
        let host = "[{name: v0, hostPath: {path: /srv/data}}]";
        let errs = plan(&with_volumes("u1", host), &cluster(&refused, &inputs)).expect_err("none allowed");
        let why = refusal(&errs, "spec.volumes[0].hostPath.path");
        assert!(why.contains("runtime.allowed_host_paths") && why.contains("empty"), "{why}");

        let rt = RuntimeConfig { allowed_host_paths: vec!["/srv/data".into(), "/mnt/usb".into()], ..refused };
        let ctx = cluster(&rt, &inputs);
        for ok in ["/srv/data", "/srv/data/", "/srv/data/sub", "/srv//data/./sub", "/mnt/usb/x"] {
            let p = plan(&with_volumes("u1", &host.replace("/srv/data", ok)), &ctx)
                .unwrap_or_else(|e| panic!("{ok} is allowed: {e:#?}"));
            assert!(p.volumes[0].host.starts_with("/srv/data") || p.volumes[0].host.starts_with("/mnt/usb"));
            assert!(
                !p.volumes[0].host.to_string_lossy().contains("/."),
                "normalised: {:?}",
                p.volumes[0].host
            );
        }
        for bad in ["/srv", "/srv/database", "/etc", "/mnt"] {
            let errs = plan(&with_volumes("u1", &host.replace("/srv/data", bad)), &ctx).expect_err(bad);
            let why = refusal(&errs, "spec.volumes[0].hostPath.path");
            assert!(why.contains("runtime.allowed_host_paths") && why.contains("/srv/data"), "{bad}: {why}");
        }
        // `..` is refused outright, even where it would land inside an allowed directory.
        for bad in ["/srv/data/../../var/lib/lichen", "/srv/data/x/.."] {
            let errs = plan(&with_volumes("u1", &host.replace("/srv/data", bad)), &ctx).expect_err(bad);
            assert!(refusal(&errs, "spec.volumes[0].hostPath.path").contains("'..'"), "{bad}");
        }
    }

    #[test]
    fn no_pod_mounts_the_state_dir_not_even_a_static_one() {
        let inputs = PodInputs::default();
        // Allowing everything still leaves the state directory out, for both origins.
        let rt = RuntimeConfig { allowed_host_paths: vec!["/".into()], ..RuntimeConfig::default() };
        let host = "[{name: v0, hostPath: {path: PATH, type: DirectoryOrCreate}}]";
        for ctx in [ctx(&rt), cluster(&rt, &inputs)] {
            for bad in
                ["/var/lib/lichen", "/var/lib/lichen/store", "/var/lib//lichen/pods/u2", "/var/lib", "/"]
            {
                let errs = plan(&with_volumes("u1", &host.replace("PATH", bad)), &ctx).expect_err(bad);
                let why = refusal(&errs, "spec.volumes[0].hostPath.path");
                assert!(why.contains("state directory /var/lib/lichen"), "{bad}: {why}");
            }
            let ok = plan(&with_volumes("u1", &host.replace("PATH", "/var/lib/lichen-data")), &ctx);
            assert!(ok.is_ok(), "a sibling is not the state dir: {ok:?}");
        }
        // A static pod may mount any other path, as before.
        let p = plan(&with_volumes("u1", &host.replace("PATH", "/etc/app")), &ctx(&RuntimeConfig::default()));
        assert_eq!(p.expect("static").volumes[0].host, Path::new("/etc/app"));
    }

    #[test]
    fn a_symlink_in_an_allowed_directory_does_not_lead_out_of_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let allowed = dir.path().join("shared");
        let state = dir.path().join("state");
        std::fs::create_dir_all(allowed.join("real")).expect("dirs");
        std::fs::create_dir_all(state.join("store")).expect("state");
        std::os::unix::fs::symlink("../state/store", allowed.join("to-store")).expect("link");
        std::os::unix::fs::symlink("/etc", allowed.join("to-etc")).expect("link");
        let rt = RuntimeConfig { allowed_host_paths: vec![allowed.clone()], ..RuntimeConfig::default() };
        let inputs = PodInputs::default();
        let mut c = cluster(&rt, &inputs);
        c.state_dir = &state;
        let host = "[{name: v0, hostPath: {path: PATH, type: Directory}}]";
        let vol = |p: &Path| with_volumes("u1", &host.replace("PATH", &p.display().to_string()));
        assert!(plan(&vol(&allowed.join("real")), &c).is_ok(), "a real directory under the allowed one");
        let why = refusal(
            &plan(&vol(&allowed.join("to-store")), &c).expect_err("link"),
            "spec.volumes[0].hostPath.path",
        );
        assert!(why.contains("symlink") && why.contains("state directory"), "{why}");
        let why = refusal(
            &plan(&vol(&allowed.join("to-etc")), &c).expect_err("link"),
            "spec.volumes[0].hostPath.path",
        );
        assert!(why.contains("symlink") && why.contains("allowed_host_paths"), "{why}");
    }

    #[test]
    fn uids_that_are_not_one_safe_path_component_are_refused() {
        let rt = RuntimeConfig::default();
        let inputs = PodInputs::default();
        let long = "a".repeat(129);
        for bad in ["..", ".", "", "a/b", "../../etc", "/abs", "u1\0", "ü", "a_b", long.as_str()] {
            let text = BASE.replace("uid: u1", &format!("uid: {bad:?}"));
            for ctx in [ctx(&rt), cluster(&rt, &inputs)] {
                let errs = plan(&pod(&text), &ctx).expect_err(bad);
                let why = refusal(&errs, "metadata.uid");
                assert!(bad.is_empty() || why.contains("not a pod UID"), "{bad:?}: {why}");
                // Nothing else is planned, so no path was built from it.
                assert_eq!(errs.len(), 1, "{errs:#?}");
            }
        }
        let uuid = BASE.replace("uid: u1", "uid: 0b6c1c02-3f4e-4b8a-9a53-5b2f0d2c7e11");
        let p = plan(&pod(&uuid), &ctx(&rt)).expect("a UUID is fine");
        assert_eq!(
            p.containers[0].preopens[0].host,
            Path::new("/var/lib/lichen/pods/0b6c1c02-3f4e-4b8a-9a53-5b2f0d2c7e11/volumes/data")
        );
    }

    #[test]
    fn volume_and_container_names_must_be_dns_labels() {
        let rt = RuntimeConfig::default();
        let long = "a".repeat(64);
        for bad in ["..", "a/b", "../../x", "Data", "a_b", "-a", "a-", "", long.as_str()] {
            let vols = format!("[{{name: {bad:?}, emptyDir: {{}}}}]");
            let text = format!(
                "
metadata: {{name: p, uid: u1}}
spec:
  volumes: {vols}
  containers: [{{name: app, image: mods/app.wasm, volumeMounts: [{{name: {bad:?}, mountPath: /v}}]}}]
"
            );
            let errs = plan(&pod(&text), &ctx(&rt)).expect_err(bad);
            let why = refusal(&errs, "spec.volumes[0].name");
            assert!(why.starts_with("volume name"), "{bad:?}: {why}");
            assert_eq!(errs.len(), 1, "the mount of an unplanned volume is not reported again: {errs:#?}");

            let named = format!("[{{name: {bad:?}, image: mods/app.wasm}}]");
            let ok = "[{name: ok, image: mods/app.wasm}]";
            for (containers, field) in [
                (format!("containers: {named}"), "spec.containers[0].name"),
                (format!("initContainers: {named}\n  containers: {ok}"), "spec.initContainers[0].name"),
            ] {
                let text = format!("metadata: {{name: p, uid: u1}}\nspec:\n  {containers}\n");
                let errs = plan(&pod(&text), &ctx(&rt)).expect_err(bad);
                let why = refusal(&errs, field);
                assert!(why.starts_with("container name"), "{bad:?}: {why}");
            }
        }
        let twice = with_volumes("u1", "[{name: v0, emptyDir: {}}, {name: v0, hostPath: {path: /etc/app}}]");
        let errs = plan(&twice, &ctx(&rt)).expect_err("one directory, two volumes");
        assert!(refusal(&errs, "spec.volumes[1].name").contains("used twice"));
    }

    #[test]
    fn expansion_matches_kubernetes() {
        let env = vec![("A".to_string(), "1".to_string())];
        assert_eq!(expand("$(A)-$(B)-$$(A)-$", &env), "1-$(B)-$(A)-$");
    }
}
