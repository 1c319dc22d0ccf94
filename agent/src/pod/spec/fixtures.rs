//! Test fixtures shared by the planning tests: pods written as YAML, a static and a cluster
//! context, fetched inputs. Test-only; nothing here may be used by the planner itself.

use std::path::Path;

use k8s_openapi::api::core::v1::Pod;

use super::{PlanContext, PodPlan, SpecError, VolumeKind};
use crate::config::{ModulesConfig, RuntimeConfig};
use crate::modules::ImageOrigin;
use crate::pod::inputs::{IssuedToken, ObjectData, PodInputs, TokenRef};

pub(super) fn pod(yaml: &str) -> Pod {
    serde_saphyr::from_str_with_options(yaml, crate::pod::yaml_options()).expect("test pod parses")
}

pub(super) fn ctx(runtime: &RuntimeConfig) -> PlanContext<'_> {
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

pub(super) const BASE: &str = "
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

pub(super) fn inputs() -> PodInputs {
    let data = |pairs: &[(&str, &str)]| -> Option<ObjectData> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), k8s_openapi::ByteString(v.as_bytes().to_vec())))
                .collect(),
        )
    };
    let mut i = PodInputs::default();
    i.config_maps.insert("app".into(), data(&[("mode", "fast"), ("conf.toml", "x = 1"), ("LEVEL", "debug")]));
    i.config_maps.insert("kube-root-ca.crt".into(), data(&[("ca.crt", "CA")]));
    i.config_maps.insert("gone".into(), None);
    i.secrets.insert("creds".into(), data(&[("password", "hunter2")]));
    let now = jiff::Timestamp::now();
    i.tokens.insert(
        TokenRef { audience: String::new(), expiration_seconds: 3607 }.key(),
        IssuedToken { token: "tok".into(), issued: now, expires: now },
    );
    i
}

pub(super) const WITH_INPUTS: &str = "
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

pub(super) fn files(plan: &PodPlan, volume: &str) -> Vec<(String, String, u32)> {
    let v = plan.volumes.iter().find(|v| v.name == volume).expect("volume");
    let VolumeKind::Files(files) = &v.kind else { panic!("{volume} is not a files volume") };
    files
        .iter()
        .map(|f| (f.path.display().to_string(), String::from_utf8_lossy(&f.data).into_owned(), f.mode))
        .collect()
}

/// A one-container pod with `volumes` (a YAML flow list) mounted at /v0, /v1, ...
pub(super) fn with_volumes(uid: &str, volumes: &str) -> Pod {
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

pub(super) fn refusal(errs: &[SpecError], field: &str) -> String {
    let e = errs.iter().find(|e| e.field == field).unwrap_or_else(|| panic!("no {field} in {errs:#?}"));
    assert!(!e.pending, "a refusal, not a wait: {e}");
    e.message.clone()
}

pub(super) fn cluster<'a>(rt: &'a RuntimeConfig, inputs: &'a PodInputs) -> PlanContext<'a> {
    PlanContext { origin: ImageOrigin::Cluster, inputs: Some(inputs), ..ctx(rt) }
}
