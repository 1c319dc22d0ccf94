//! The downward API's values: which pod fields a `fieldRef` may name (in an env variable or a
//! downwardAPI volume file) and how each is rendered.
//!
//! Reads the pod and the node's name and address from the plan context; decides nothing about
//! where a value goes (env and volume files apply their own rules on top).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;

use super::PlanContext;

/// The plain fields a `fieldRef` may name, by their path.
pub(super) type FieldValues = BTreeMap<&'static str, String>;

/// A `fieldRef` naming a field Lichen does not provide.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field:?} is not available; use one of {available}, metadata.labels, metadata.annotations")]
pub(super) struct FieldRefError {
    /// The field path as written.
    field: String,
    /// The plain fields there are, comma-separated.
    available: String,
}

/// The plain fields of `pod` on this node: name, namespace, UID, node name, service account and,
/// when known, the host's address.
pub(super) fn field_values(pod: &Pod, ctx: &PlanContext<'_>) -> FieldValues {
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

/// A `fieldRef` value: the plain fields, or one label or annotation, or all of them as the
/// downward API formats them (`key="value"` lines, sorted).
pub(super) fn pod_field(pod: &Pod, field: &str, fields: &FieldValues) -> Result<String, FieldRefError> {
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
        _ => Err(FieldRefError {
            field: field.to_owned(),
            available: fields.keys().copied().collect::<Vec<_>>().join(", "),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{ctx, pod};
    use super::*;
    use crate::config::RuntimeConfig;

    #[test]
    fn an_unknown_field_lists_the_ones_there_are() {
        // Strengthening: the exact text a refused fieldRef shows.
        let rt = RuntimeConfig::default();
        let p = pod("metadata: {name: p, uid: u1}\nspec: {containers: [{name: a, image: mods/a.wasm}]}\n");
        let fields = field_values(&p, &ctx(&rt));
        let err = pod_field(&p, "status.podIP", &fields).expect_err("not provided");
        assert_eq!(
            err.to_string(),
            "\"status.podIP\" is not available; use one of metadata.name, metadata.namespace, \
             metadata.uid, spec.nodeName, spec.serviceAccountName, status.hostIP, metadata.labels, \
             metadata.annotations"
        );
    }
}
