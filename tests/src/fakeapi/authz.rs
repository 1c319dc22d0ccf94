//! Who may do what: an admin may do anything; a node (`system:node:<name>`, group `system:nodes`)
//! gets what the Node authorizer, the `system:node` rules and the NodeRestriction admission plugin
//! give it, with the real messages. [`authorize`] runs before the object is read (like the
//! authorizer); the `admit_*` checks run with the objects at hand (like admission).

use std::collections::BTreeMap;

use serde_json::Value;

use super::errors::ApiError;
use super::select::FieldSelector;
use super::store::{Res, Store};

/// An authenticated user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum User {
    Admin,
    Node(String),
    /// A bootstrap token's user, `system:bootstrap:<token id>`, in `system:bootstrappers`.
    Bootstrap(String),
}

impl User {
    /// The user name as the apiserver reports it.
    pub fn name(&self) -> String {
        match self {
            User::Admin => "kubernetes-admin".into(),
            User::Node(n) => format!("system:node:{n}"),
            User::Bootstrap(id) => format!("system:bootstrap:{id}"),
        }
    }

    /// The groups the authenticator adds.
    pub fn groups(&self) -> Vec<&'static str> {
        match self {
            User::Admin => vec!["system:masters", "system:authenticated"],
            User::Node(_) => vec!["system:nodes", "system:authenticated"],
            User::Bootstrap(_) => vec!["system:bootstrappers", "system:authenticated"],
        }
    }
}

/// The attributes of a request, as the authorizer sees them.
pub(crate) struct Attrs<'a> {
    pub verb: &'a str,
    pub res: &'static Res,
    pub sub: Option<&'a str>,
    pub namespace: &'a str,
    pub name: &'a str,
    pub fields: &'a FieldSelector,
}

/// The authorizer's `403`: `User "…" cannot <verb> resource "<res/sub>" in API group "…" …: reason`.
fn deny(user: &User, a: &Attrs, reason: &str) -> ApiError {
    let resource = match a.sub {
        Some(s) => format!("{}/{s}", a.res.plural),
        None => a.res.plural.to_owned(),
    };
    let scope = if a.namespace.is_empty() {
        "at the cluster scope".to_owned()
    } else {
        format!("in the namespace \"{}\"", a.namespace)
    };
    let mut why = format!(
        "User \"{}\" cannot {} resource \"{resource}\" in API group \"{}\" {scope}",
        user.name(),
        a.verb,
        a.res.group
    );
    if !reason.is_empty() {
        why.push_str(": ");
        why.push_str(reason);
    }
    ApiError::forbidden(a.res, a.name, &why)
}

/// Authorizes a request. Checks that need the object itself come later, in the `admit_*` functions.
pub(crate) fn authorize(user: &User, a: &Attrs, store: &Store) -> Result<(), ApiError> {
    let csr = a.res.plural == "certificatesigningrequests" && a.sub.is_none();
    let node = match user {
        User::Admin => return Ok(()),
        // system:node-bootstrapper: CSRs, nothing else.
        User::Bootstrap(_) if csr && matches!(a.verb, "create" | "get" | "list" | "watch") => return Ok(()),
        User::Bootstrap(_) => return Err(deny(user, a, "")),
        User::Node(node) => node,
    };
    let verb = a.verb;
    let no_relationship = format!("no relationship found between node '{node}' and this object");
    match (a.res.plural, a.sub) {
        ("nodes", None)
            if matches!(verb, "get" | "list" | "watch" | "create" | "update" | "patch" | "delete") =>
        {
            Ok(())
        }
        ("nodes", Some("status")) if matches!(verb, "update" | "patch") => Ok(()),
        ("leases", None) => {
            if !matches!(verb, "get" | "create" | "update" | "patch" | "delete") {
                return Err(deny(user, a, "can only get, create, update, patch, or delete a node lease"));
            }
            if a.namespace != "kube-node-lease" {
                return Err(deny(
                    user,
                    a,
                    "can only access leases in the \"kube-node-lease\" system namespace",
                ));
            }
            if verb != "create" && a.name != node {
                return Err(deny(
                    user,
                    a,
                    "can only access node lease with the same name as the requesting node",
                ));
            }
            Ok(())
        }
        ("pods", None) if matches!(verb, "list" | "watch") => {
            if a.fields.required("spec.nodeName") == Some(node.as_str()) {
                Ok(())
            } else {
                Err(deny(user, a, "can only list/watch pods with spec.nodeName field selector"))
            }
        }
        ("pods", None) if matches!(verb, "get" | "create" | "delete") => Ok(()),
        ("pods", Some("status")) if matches!(verb, "update" | "patch") => Ok(()),
        ("configmaps" | "secrets", None) => {
            if !matches!(verb, "get" | "list" | "watch") {
                return Err(deny(user, a, "can only read resources of this type"));
            }
            // A list or watch names its one object through a metadata.name field selector.
            let name = if verb == "get" { Some(a.name) } else { a.fields.required("metadata.name") };
            let Some(name) = name.filter(|n| !n.is_empty()) else {
                return Err(deny(user, a, "No Object name found"));
            };
            if references(store, node, a.namespace)
                .get(a.res.plural)
                .is_some_and(|names| names.iter().any(|n| n == name))
            {
                Ok(())
            } else {
                Err(deny(user, a, &no_relationship))
            }
        }
        ("serviceaccounts", Some("token")) if verb == "create" => {
            let Some(pods) = super::store::resource("", "pods") else {
                return Err(deny(user, a, &no_relationship));
            };
            let uses = store.all(pods, Some(a.namespace)).any(|p| {
                bound_to(p, node)
                    && p.pointer("/spec/serviceAccountName").and_then(Value::as_str).unwrap_or("default")
                        == a.name
            });
            if uses { Ok(()) } else { Err(deny(user, a, &no_relationship)) }
        }
        ("events", None) if matches!(verb, "create" | "update" | "patch") => Ok(()),
        // The Node authorizer's rules for a node's own certificate renewals.
        ("certificatesigningrequests", None) if matches!(verb, "create" | "get" | "list" | "watch") => Ok(()),
        _ => Err(deny(user, a, "")),
    }
}

/// Whether `pod` is bound to `node`.
pub(crate) fn bound_to(pod: &Value, node: &str) -> bool {
    pod.pointer("/spec/nodeName").and_then(Value::as_str) == Some(node)
}

/// The configmaps and secrets that pods bound to `node` in `ns` reference: the Node authorizer's graph.
fn references(store: &Store, node: &str, ns: &str) -> BTreeMap<&'static str, Vec<String>> {
    let mut out: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    let Some(pods) = super::store::resource("", "pods") else { return out };
    let mut add = |kind: &'static str, v: Option<&Value>| {
        if let Some(n) = v.and_then(Value::as_str) {
            out.entry(kind).or_default().push(n.to_owned());
        }
    };
    for pod in store.all(pods, Some(ns)).filter(|p| bound_to(p, node)) {
        let spec = &pod["spec"];
        for v in spec.get("volumes").and_then(Value::as_array).into_iter().flatten() {
            add("configmaps", v.pointer("/configMap/name"));
            add("secrets", v.pointer("/secret/secretName"));
            for s in v.pointer("/projected/sources").and_then(Value::as_array).into_iter().flatten() {
                add("configmaps", s.pointer("/configMap/name"));
                add("secrets", s.pointer("/secret/name"));
            }
        }
        for list in ["containers", "initContainers", "ephemeralContainers"] {
            for c in spec.get(list).and_then(Value::as_array).into_iter().flatten() {
                for e in c.get("env").and_then(Value::as_array).into_iter().flatten() {
                    add("configmaps", e.pointer("/valueFrom/configMapKeyRef/name"));
                    add("secrets", e.pointer("/valueFrom/secretKeyRef/name"));
                }
                for e in c.get("envFrom").and_then(Value::as_array).into_iter().flatten() {
                    add("configmaps", e.pointer("/configMapRef/name"));
                    add("secrets", e.pointer("/secretRef/name"));
                }
            }
        }
        for s in spec.get("imagePullSecrets").and_then(Value::as_array).into_iter().flatten() {
            add("secrets", s.get("name"));
        }
    }
    out
}

/// Labels a node may not set on itself (NodeRestriction): any in the `kubernetes.io` / `k8s.io`
/// namespaces outside the kubelet's own set, and all of `node-restriction.kubernetes.io/`.
///
/// The list repeats the agent's `config::NODE_SETTABLE` on purpose: the fake stands for the API
/// server, so it keeps its own copy of the rule, and a mistake in the agent's list shows up as a
/// 403 in the tests instead of being shared by both sides.
pub(crate) fn forbidden_node_label(key: &str) -> bool {
    const KUBELET_LABELS: &[&str] = &[
        "kubernetes.io/hostname",
        "kubernetes.io/arch",
        "kubernetes.io/os",
        "beta.kubernetes.io/arch",
        "beta.kubernetes.io/os",
        "beta.kubernetes.io/instance-type",
        "node.kubernetes.io/instance-type",
        "failure-domain.beta.kubernetes.io/region",
        "failure-domain.beta.kubernetes.io/zone",
        "topology.kubernetes.io/region",
        "topology.kubernetes.io/zone",
    ];
    let Some((prefix, _)) = key.split_once('/') else { return false };
    if prefix == "node-restriction.kubernetes.io" || prefix.ends_with(".node-restriction.kubernetes.io") {
        return true;
    }
    let k8s = ["kubernetes.io", "k8s.io"].iter().any(|d| prefix == *d || prefix.ends_with(&format!(".{d}")));
    let allowed = KUBELET_LABELS.contains(&key)
        || ["kubelet.kubernetes.io", "node.kubernetes.io"]
            .iter()
            .any(|d| prefix == *d || prefix.ends_with(&format!(".{d}")));
    k8s && !allowed
}

fn labels(obj: Option<&Value>) -> BTreeMap<String, String> {
    obj.and_then(|o| o.pointer("/metadata/labels"))
        .and_then(Value::as_object)
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned())).collect())
        .unwrap_or_default()
}

/// NodeRestriction for Nodes: a node writes only itself, registers without restricted labels,
/// and changes neither restricted labels nor taints afterwards.
pub(crate) fn admit_node(
    user: &User,
    res: &Res,
    name: &str,
    old: Option<&Value>,
    new: Option<&Value>,
) -> Result<(), ApiError> {
    let User::Node(node) = user else { return Ok(()) };
    if name != node {
        return Err(ApiError::forbidden(
            res,
            name,
            &format!("node \"{node}\" is not allowed to modify node \"{name}\""),
        ));
    }
    let Some(new) = new else { return Ok(()) };
    let (before, after) = (labels(old), labels(Some(new)));
    match old {
        None => {
            let bad: Vec<&str> =
                after.keys().filter(|k| forbidden_node_label(k)).map(String::as_str).collect();
            if !bad.is_empty() {
                return Err(ApiError::forbidden(
                    res,
                    name,
                    &format!(
                        "node \"{node}\" is not allowed to set the following labels: {}",
                        bad.join(", ")
                    ),
                ));
            }
        }
        Some(old) => {
            let mut bad: Vec<&str> = after
                .iter()
                .filter(|(k, v)| before.get(*k) != Some(v))
                .map(|(k, _)| k.as_str())
                .chain(before.keys().filter(|k| !after.contains_key(*k)).map(String::as_str))
                .filter(|k| forbidden_node_label(k))
                .collect();
            bad.sort_unstable();
            if !bad.is_empty() {
                return Err(ApiError::forbidden(
                    res,
                    name,
                    &format!("node \"{node}\" is not allowed to modify labels: {}", bad.join(", ")),
                ));
            }
            let taints = |o: &Value| {
                o.pointer("/spec/taints").and_then(Value::as_array).filter(|t| !t.is_empty()).cloned()
            };
            if taints(old) != taints(new) {
                return Err(ApiError::forbidden(
                    res,
                    name,
                    &format!("node \"{node}\" is not allowed to modify taints"),
                ));
            }
        }
    }
    Ok(())
}

/// NodeRestriction for Leases: a node creates only its own.
pub(crate) fn admit_lease_create(user: &User, res: &Res, name: &str) -> Result<(), ApiError> {
    match user {
        User::Node(node) if node != name => Err(ApiError::forbidden(
            res,
            name,
            "can only access node lease with the same name as the requesting node",
        )),
        _ => Ok(()),
    }
}

/// What a node may do to an existing pod: `verb` is `get`, `delete` or `status`.
pub(crate) fn admit_pod(user: &User, res: &'static Res, pod: &Value, verb: &str) -> Result<(), ApiError> {
    let User::Node(node) = user else { return Ok(()) };
    if bound_to(pod, node) {
        return Ok(());
    }
    let name = pod.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default();
    let ns = pod.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or_default();
    let why = match verb {
        "delete" => format!("node \"{node}\" can only delete pods with spec.nodeName set to itself"),
        "status" => {
            format!("node \"{node}\" can only update pod status for pods with spec.nodeName set to itself")
        }
        _ => {
            let fields = FieldSelector::default();
            let a = Attrs { verb: "get", res, sub: None, namespace: ns, name, fields: &fields };
            return Err(deny(
                user,
                &a,
                &format!("no relationship found between node '{node}' and this object"),
            ));
        }
    };
    Err(ApiError::forbidden(res, name, &why))
}

/// A node creates only mirror pods, bound to itself.
pub(crate) fn admit_pod_create(user: &User, res: &Res, pod: &Value) -> Result<(), ApiError> {
    let User::Node(node) = user else { return Ok(()) };
    let name = pod.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default();
    if pod.pointer("/metadata/annotations/kubernetes.io~1config.mirror").is_none() {
        return Err(ApiError::forbidden(
            res,
            name,
            &format!(
                "pod does not have \"kubernetes.io/config.mirror\" annotation, node \"{node}\" can only create mirror pods"
            ),
        ));
    }
    if !bound_to(pod, node) {
        return Err(ApiError::forbidden(
            res,
            name,
            &format!("node \"{node}\" can only create pods with spec.nodeName set to itself"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_restriction_label_rules() {
        for k in [
            "node-role.kubernetes.io/master",
            "kubernetes.io/role",
            "foo.k8s.io/x",
            "node-restriction.kubernetes.io/a",
        ] {
            assert!(forbidden_node_label(k), "{k}");
        }
        for k in [
            "kubernetes.io/hostname",
            "node.kubernetes.io/exclude",
            "lichen.dev/edge",
            "plain",
            "kubelet.kubernetes.io/x",
        ] {
            assert!(!forbidden_node_label(k), "{k}");
        }
    }
}
