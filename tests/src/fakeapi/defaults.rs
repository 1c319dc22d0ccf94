//! Defaulting and mutating admission: what the registry and the default admission plugins do to
//! a new object before it is stored (pod defaults and initial status, the ServiceAccount plugin's
//! token volume, DefaultTolerationSeconds, Secret `stringData`).

use serde_json::{Value, json};

use super::store::Res;

/// What the registry and the default admission chain do to a new object.
pub(crate) fn prepare_for_create(res: &Res, obj: &mut Value) {
    match res.plural {
        "secrets" => {
            fold_string_data(obj);
            if obj.get("type").is_none_or(Value::is_null) {
                obj["type"] = json!("Opaque");
            }
        }
        "namespaces" => obj["status"] = json!({ "phase": "Active" }),
        _ => {}
    }
}

/// `stringData` is write-only: it is merged into `data`, base64-encoded.
pub(crate) fn fold_string_data(obj: &mut Value) {
    let Some(sd) = obj.as_object_mut().and_then(|o| o.remove("stringData")) else { return };
    if let Some(sd) = sd.as_object() {
        if !obj.get("data").is_some_and(Value::is_object) {
            obj["data"] = json!({});
        }
        for (k, v) in sd {
            obj["data"][k] = json!(base64(v.as_str().unwrap_or_default().as_bytes()));
        }
    }
}

/// Standard base64 with padding.
pub(crate) fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let b = |i: usize| c.get(i).copied().unwrap_or(0) as u32;
        let n = (b(0) << 16) | (b(1) << 8) | b(2);
        for i in 0..4 {
            out.push(if i <= c.len() { T[((n >> (18 - 6 * i)) & 63) as usize] as char } else { '=' });
        }
    }
    out
}

/// The pod defaults of the API's defaulting, the ServiceAccount and DefaultTolerationSeconds
/// admission plugins, and the registry's initial status.
pub(crate) fn default_pod(pod: &mut Value, sa_automount: Option<bool>) {
    if !pod.get("spec").is_some_and(Value::is_object) {
        pod["spec"] = json!({});
    }
    let spec = &mut pod["spec"];
    for (k, v) in [
        ("restartPolicy", json!("Always")),
        ("terminationGracePeriodSeconds", json!(30)),
        ("dnsPolicy", json!("ClusterFirst")),
        ("schedulerName", json!("default-scheduler")),
        ("securityContext", json!({})),
        ("serviceAccountName", json!("default")),
        ("enableServiceLinks", json!(true)),
        ("priority", json!(0)),
        ("preemptionPolicy", json!("PreemptLowerPriority")),
    ] {
        if spec.get(k).is_none_or(Value::is_null) {
            spec[k] = v;
        }
    }
    spec["serviceAccount"] = spec["serviceAccountName"].clone();
    if !spec.get("tolerations").is_some_and(Value::is_array) {
        spec["tolerations"] = json!([]);
    }
    if let Some(t) = spec["tolerations"].as_array_mut() {
        for key in ["node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"] {
            if !t.iter().any(|x| x.get("key").and_then(Value::as_str) == Some(key)) {
                t.push(json!({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}));
            }
        }
    }
    let mut any_resources = false;
    let mut guaranteed = true;
    for list in ["initContainers", "containers"] {
        let Some(cs) = spec.get_mut(list).and_then(Value::as_array_mut) else { continue };
        for c in cs.iter_mut().filter(|c| c.is_object()) {
            let image = c.get("image").and_then(Value::as_str).unwrap_or_default();
            let last = image.rsplit('/').next().unwrap_or_default();
            let latest = !last.contains(':') || last.ends_with(":latest");
            for (k, v) in [
                (
                    "imagePullPolicy",
                    json!(if latest && !image.contains('@') { "Always" } else { "IfNotPresent" }),
                ),
                ("terminationMessagePath", json!("/dev/termination-log")),
                ("terminationMessagePolicy", json!("File")),
                ("resources", json!({})),
            ] {
                if c.get(k).is_none_or(Value::is_null) {
                    c[k] = v;
                }
            }
            let limits = c.pointer("/resources/limits").and_then(Value::as_object);
            let requests = c.pointer("/resources/requests").and_then(Value::as_object);
            any_resources |= limits.is_some_and(|l| !l.is_empty()) || requests.is_some_and(|r| !r.is_empty());
            guaranteed &= ["cpu", "memory"].iter().all(|r| {
                let l = limits.and_then(|l| l.get(*r));
                l.is_some() && requests.and_then(|q| q.get(*r)).is_none_or(|q| Some(q) == l)
            });
        }
    }
    let qos = if !any_resources {
        "BestEffort"
    } else if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    };
    pod["status"] = json!({ "phase": "Pending", "qosClass": qos });
    let mirror = pod.pointer("/metadata/annotations/kubernetes.io~1config.mirror").is_some();
    let automount =
        pod.pointer("/spec/automountServiceAccountToken").and_then(Value::as_bool).or(sa_automount);
    if !mirror && automount != Some(false) {
        mount_service_account_token(&mut pod["spec"]);
    }
}

/// Where the ServiceAccount admission plugin mounts the API credentials.
pub(crate) const TOKEN_MOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The ServiceAccount admission plugin's `kube-api-access-*` projected volume (a bound token, the
/// cluster CA, the namespace), mounted into every container that has nothing at its path.
fn mount_service_account_token(spec: &mut Value) {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let suffix: String = (0..5).map(|_| ALPHABET[fastrand::usize(..ALPHABET.len())] as char).collect();
    let volume = format!("kube-api-access-{suffix}");
    let mut needed = false;
    for list in ["initContainers", "containers"] {
        for c in
            spec.get_mut(list).and_then(Value::as_array_mut).into_iter().flatten().filter(|c| c.is_object())
        {
            if !c.get("volumeMounts").is_some_and(Value::is_array) {
                c["volumeMounts"] = json!([]);
            }
            if let Some(mounts) = c["volumeMounts"].as_array_mut()
                && !mounts
                    .iter()
                    .any(|m| m.get("mountPath").and_then(Value::as_str) == Some(TOKEN_MOUNT_PATH))
            {
                mounts.push(json!({"name": volume, "readOnly": true, "mountPath": TOKEN_MOUNT_PATH}));
                needed = true;
            }
        }
    }
    if !needed {
        return;
    }
    if !spec.get("volumes").is_some_and(Value::is_array) {
        spec["volumes"] = json!([]);
    }
    if let Some(volumes) = spec["volumes"].as_array_mut() {
        volumes.push(json!({"name": volume, "projected": {"defaultMode": 420, "sources": [
            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace",
                "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}
        ]}}));
    }
}
