//! Admission: the pod and container fields Lichen refuses outright because a WebAssembly module
//! cannot honour them (host namespaces, ports, probes, privileges, extended resources), the restart
//! policy, the active deadline, and the memory limit a container gets.
//!
//! Every refusal names the field and says what to do instead; a field that is accepted but not
//! enforced becomes a warning, never a silent drop. Only checks on the pod as written live here:
//! no lookups in the fetched inputs, no paths, no I/O.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, PodSpec};

use super::Errors;
use crate::config::RuntimeConfig;
use crate::pod::state::RestartPolicy;
use crate::quantity::ByteSize;

/// `spec.restartPolicy`, or `Always` (with the refusal recorded) when it is not one Kubernetes has.
pub(super) fn restart_policy(spec: &PodSpec, errs: &mut Errors) -> RestartPolicy {
    RestartPolicy::parse(spec.restart_policy.as_deref()).unwrap_or_else(|e| {
        errs.add("spec.restartPolicy", e.to_string());
        RestartPolicy::Always
    })
}

/// Refuses the pod-level fields that assume Linux processes and namespaces.
pub(super) fn refuse_pod_fields(spec: &PodSpec, errs: &mut Errors) {
    let flag = |errs: &mut Errors, on: Option<bool>, field: &str, why: &str| {
        if on == Some(true) {
            errs.add(field, why);
        }
    };
    const NO_NET: &str = "WebAssembly modules have no network namespace to share; remove it";
    flag(errs, spec.host_network, "spec.hostNetwork", NO_NET);
    flag(errs, spec.host_pid, "spec.hostPID", "modules are not processes; remove it");
    flag(errs, spec.host_ipc, "spec.hostIPC", "modules are not processes; remove it");
    flag(
        errs,
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
}

/// At least one container, and no name used twice across init and regular containers (each
/// names a log directory).
pub(super) fn check_container_set(spec: &PodSpec, errs: &mut Errors) {
    if spec.containers.is_empty() {
        errs.add("spec.containers", "at least one container is required");
    }
    let mut seen = std::collections::HashSet::new();
    for c in spec.init_containers.iter().flatten().chain(&spec.containers) {
        if !seen.insert(c.name.as_str()) {
            errs.add("spec.containers", format!("container name {:?} is used twice", c.name));
        }
    }
}

/// `spec.activeDeadlineSeconds`, which must be positive when set.
pub(super) fn active_deadline(spec: &PodSpec, errs: &mut Errors) -> Option<Duration> {
    match spec.active_deadline_seconds {
        Some(s) if s <= 0 => {
            errs.add("spec.activeDeadlineSeconds", "must be positive");
            None
        }
        Some(s) => Some(Duration::from_secs(s as u64)),
        None => None,
    }
}

/// Refuses the container-level fields a module cannot honour; `path` is the container's.
pub(super) fn refuse_container_fields(c: &Container, path: &str, errs: &mut Errors) {
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
}

/// A resource a container may name in `resources`.
enum Resource<'a> {
    /// Enforced: the module's linear memory.
    Memory,
    /// Accepted, not enforced (`cpu`, `ephemeral-storage`): fuel bounds compute.
    Unenforced(&'a str),
    /// Extended resources (GPUs and the like), which no module can use.
    Extended(&'a str),
}

impl<'a> Resource<'a> {
    fn of(name: &'a str) -> Self {
        match name {
            "memory" => Resource::Memory,
            "cpu" | "ephemeral-storage" => Resource::Unenforced(name),
            other => Resource::Extended(other),
        }
    }
}

/// The memory limit in bytes: `resources.limits.memory` within what a wasm32 memory can be, or the
/// node's default. Checks the other limits and requests on the way.
pub(super) fn memory_limit(
    c: &Container,
    path: &str,
    runtime: &RuntimeConfig,
    errs: &mut Errors,
    warnings: &mut Vec<String>,
) -> u64 {
    let mut memory_limit = runtime.default_memory_limit.0;
    let Some(res) = &c.resources else { return memory_limit };
    for (name, q) in res.limits.iter().flatten() {
        match Resource::of(name) {
            Resource::Memory => match ByteSize::parse(&q.0) {
                Ok(b) if b.0 < 64 << 10 => errs.add(
                    &format!("{path}.resources.limits.memory"),
                    format!("{} is below one WebAssembly page (64Ki)", q.0),
                ),
                Ok(b) if b.0 > 4 << 30 => errs.add(
                    &format!("{path}.resources.limits.memory"),
                    format!("{} is above the 4Gi a wasm32 memory can address", q.0),
                ),
                Ok(b) => memory_limit = b.0,
                Err(e) => errs.add(&format!("{path}.resources.limits.memory"), e),
            },
            Resource::Unenforced(name) => {
                warnings.push(format!("{path}.resources.limits.{name} is not enforced (fuel bounds compute)"))
            }
            Resource::Extended(other) => errs.add(
                &format!("{path}.resources.limits.{other}"),
                "extended resources are not available to modules",
            ),
        }
    }
    for name in res.requests.iter().flatten().map(|(k, _)| k) {
        if let Resource::Extended(name) = Resource::of(name) {
            errs.add(
                &format!("{path}.resources.requests.{name}"),
                "extended resources are not available to modules",
            );
        }
    }
    memory_limit
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{ctx, pod};
    use super::super::plan;
    use crate::config::RuntimeConfig;

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
}
