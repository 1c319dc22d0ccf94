//! A container's environment: `envFrom` (ConfigMaps and Secrets, prefixed), then `env` (literal
//! values, `fieldRef`s, `configMapKeyRef`/`secretKeyRef`), in the kubelet's order and with its
//! override rules, and Kubernetes' `$(VAR)` expansion (also used for `command` and `args`).
//!
//! Resolves values from the fetched inputs and the pod's fields only; the values are handed to
//! the module as they are and never logged here.

use k8s_openapi::api::core::v1::{Container, EnvVar, Pod};

use super::Errors;
use super::downward::{self, FieldValues};
use super::sources::{ObjectSource, lookup};
use crate::pod::inputs::{ObjectKind, PodInputs};

/// The environment of `c`, in order; `path` is the container's field path.
pub(super) fn container_env(
    c: &Container,
    path: &str,
    pod: &Pod,
    fields: &FieldValues,
    inputs: Option<&PodInputs>,
    errs: &mut Errors,
    warnings: &mut Vec<String>,
) -> Vec<(String, String)> {
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
        let Some(Some(data)) = lookup(inputs, &src, &format!("{fpath}.{spath}"), errs) else { continue };
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
        if let Some(v) = env_value(e, pod, fields, inputs, &epath, errs) {
            let v = expand(&v, &env);
            env.retain(|(k, _)| k != &e.name);
            env.push((e.name.clone(), v));
        }
    }
    env
}

/// The value of one `env` entry, or `None` with the reason recorded.
fn env_value(
    e: &EnvVar,
    pod: &Pod,
    fields: &FieldValues,
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
        return match downward::pod_field(pod, &f.field_path, fields) {
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
pub(super) fn expand(s: &str, env: &[(String, String)]) -> String {
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

    #[test]
    fn expansion_matches_kubernetes() {
        let env = vec![("A".to_string(), "1".to_string())];
        assert_eq!(expand("$(A)-$(B)-$$(A)-$", &env), "1-$(B)-$(A)-$");
    }
}
