//! Who may do what, as the kube-apiserver's `Node,RBAC` authorizer chain decides it with the
//! default bootstrap policy: `system:masters` may do anything (RBAC's `cluster-admin` binding); a
//! node (`system:node:<name>`, group `system:nodes`) gets what the Node authorizer and its static
//! node rules give it; bootstrap tokens get `system:node-bootstrapper`; every authenticated user
//! gets discovery and `system:basic-user`; tests add RBAC-lite [`Grant`]s; everything else is
//! denied. [`decide`] is the authorizer itself (what a SubjectAccessReview asks); [`authorize`]
//! runs it before the object is read; the `admit_*` checks (NodeRestriction) run with the objects
//! at hand, like admission.

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
    /// Anyone else: a user a test registered a token for, a service account's token, the subject
    /// of a SubjectAccessReview. `groups` are exactly the user's groups.
    Other {
        name: String,
        groups: Vec<String>,
    },
}

impl User {
    /// The user with this name and these groups: a node or bootstrap user when they are exactly
    /// what the authenticator gives one (so NodeRestriction applies), anyone else otherwise.
    pub fn from_info(name: &str, groups: &[String]) -> User {
        let only = |allowed: &[&str]| groups.iter().all(|g| allowed.contains(&g.as_str()));
        let has = |g: &str| groups.iter().any(|x| x == g);
        if let Some(node) = name.strip_prefix("system:node:").filter(|n| !n.is_empty())
            && has("system:nodes")
            && only(&["system:nodes", "system:authenticated"])
        {
            return User::Node(node.to_owned());
        }
        if let Some(id) = name.strip_prefix("system:bootstrap:").filter(|n| !n.is_empty())
            && has("system:bootstrappers")
            && only(&["system:bootstrappers", "system:authenticated"])
        {
            return User::Bootstrap(id.to_owned());
        }
        User::Other { name: name.to_owned(), groups: groups.to_vec() }
    }

    /// The user name as the apiserver reports it.
    pub fn name(&self) -> String {
        match self {
            User::Admin => "kubernetes-admin".into(),
            User::Node(n) => format!("system:node:{n}"),
            User::Bootstrap(id) => format!("system:bootstrap:{id}"),
            User::Other { name, .. } => name.clone(),
        }
    }

    /// The groups the authenticator adds.
    pub fn groups(&self) -> Vec<String> {
        let fixed: &[&str] = match self {
            User::Admin => &["system:masters", "system:authenticated"],
            User::Node(_) => &["system:nodes", "system:authenticated"],
            User::Bootstrap(_) => &["system:bootstrappers", "system:authenticated"],
            User::Other { groups, .. } => return groups.clone(),
        };
        fixed.iter().map(|g| (*g).to_owned()).collect()
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

/// What the authorizer is asked: a request's attributes, or a SubjectAccessReview's, which may
/// name any resource (served or not) or a non-resource path.
#[derive(Debug)]
pub(crate) struct Check<'a> {
    pub verb: &'a str,
    pub group: &'a str,
    pub resource: &'a str,
    pub sub: Option<&'a str>,
    pub namespace: &'a str,
    pub name: &'a str,
    pub fields: &'a FieldSelector,
    /// A non-resource request's path (`/healthz`); the resource fields are then empty.
    pub path: Option<&'a str>,
}

/// The authorizer chain's answer. `reason` is what the deciding (or last) authorizer said: empty
/// for most allows and for RBAC's denials, the Node authorizer's words for a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Decision {
    pub allowed: bool,
    pub reason: String,
}

impl Decision {
    fn allow(reason: impl Into<String>) -> Decision {
        Decision { allowed: true, reason: reason.into() }
    }

    fn deny(reason: impl Into<String>) -> Decision {
        Decision { allowed: false, reason: reason.into() }
    }
}

/// One RBAC-lite rule a test grants ([`super::FakeApi::grant`]): like a ClusterRole with one rule
/// bound cluster-wide to a user or a group named `subject`. `verb` and `resource` may be `*`; a
/// `resource` starting with `/` is a non-resource URL (a trailing `*` matches a prefix); `sub` is
/// the subresource (`Some("*")` for any), and a rule without one covers the resource itself only,
/// as in RBAC (`pods` does not cover `pods/log`; `*` covers everything). Any API group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Grant {
    pub subject: String,
    pub verb: String,
    pub resource: String,
    pub sub: Option<String>,
}

impl Grant {
    /// A rule from [`super::FakeApi::grant`]'s arguments; `pods/log` with no subresource is read
    /// as resource `pods`, subresource `log`.
    pub fn new(subject: &str, verb: &str, resource: &str, sub: Option<&str>) -> Grant {
        let (resource, sub) = match (resource.split_once('/'), sub) {
            (Some((r, s)), None) if !resource.starts_with('/') => (r, Some(s)),
            _ => (resource, sub),
        };
        Grant {
            subject: subject.to_owned(),
            verb: verb.to_owned(),
            resource: resource.to_owned(),
            sub: sub.map(str::to_owned),
        }
    }

    fn allows(&self, name: &str, groups: &[String], c: &Check) -> bool {
        if self.subject != name && !groups.contains(&self.subject) {
            return false;
        }
        if self.verb != "*" && self.verb != c.verb {
            return false;
        }
        if let Some(path) = self.resource.strip_prefix('/') {
            let want = format!("/{path}");
            return c.path.is_some_and(|p| match want.strip_suffix('*') {
                Some(prefix) => p.starts_with(prefix),
                None => p == want,
            });
        }
        if c.path.is_some() {
            return false;
        }
        if self.resource == "*" {
            return true;
        }
        self.resource == c.resource
            && match (self.sub.as_deref(), c.sub) {
                (None, None) => true,
                (Some("*"), Some(_)) => true,
                (Some(a), Some(b)) => a == b,
                _ => false,
            }
    }
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
pub(crate) fn authorize(user: &User, a: &Attrs, store: &Store, grants: &[Grant]) -> Result<(), ApiError> {
    let check = Check {
        verb: a.verb,
        group: a.res.group,
        resource: a.res.plural,
        sub: a.sub,
        namespace: a.namespace,
        name: a.name,
        fields: a.fields,
        path: None,
    };
    let d = decide(user, &check, store, grants);
    if d.allowed { Ok(()) } else { Err(deny(user, a, &d.reason)) }
}

/// The Node authorizer's identity check: `system:node:<name>` in group `system:nodes`.
fn node_identity<'a>(name: &'a str, groups: &[String]) -> Option<&'a str> {
    name.strip_prefix("system:node:").filter(|n| !n.is_empty() && groups.iter().any(|g| g == "system:nodes"))
}

/// The authorizer chain (`Node,RBAC` with the bootstrap policy, plus the test's grants).
pub(crate) fn decide(user: &User, c: &Check, store: &Store, grants: &[Grant]) -> Decision {
    let name = user.name();
    let groups = user.groups();
    let in_group = |g: &str| groups.iter().any(|x| x == g);
    if in_group("system:masters") {
        return Decision::allow(
            "RBAC: allowed by ClusterRoleBinding \"cluster-admin\" of ClusterRole \"cluster-admin\" to Group \"system:masters\"",
        );
    }
    let mut reason = String::new();
    if let Some(node) = node_identity(&name, &groups) {
        match node_rules(node, c, store) {
            Ok(()) => return Decision::allow(""),
            Err(why) => reason = why,
        }
    }
    let rule = |group: &str, resource: &str, verbs: &[&str]| {
        c.path.is_none()
            && c.group == group
            && c.resource == resource
            && c.sub.is_none()
            && verbs.contains(&c.verb)
    };
    // system:node-bootstrapper, bound to system:bootstrappers.
    if in_group("system:bootstrappers")
        && rule("certificates.k8s.io", "certificatesigningrequests", &["create", "get", "list", "watch"])
    {
        return Decision::allow("");
    }
    if in_group("system:authenticated") {
        // system:basic-user, system:discovery and system:public-info-viewer.
        let self_review = rule("authorization.k8s.io", "selfsubjectaccessreviews", &["create"])
            || rule("authorization.k8s.io", "selfsubjectrulesreviews", &["create"]);
        let discovery = c.verb == "get"
            && c.path.is_some_and(|p| {
                matches!(
                    p,
                    "/api"
                        | "/apis"
                        | "/healthz"
                        | "/livez"
                        | "/readyz"
                        | "/version"
                        | "/version/"
                        | "/openapi"
                ) || p.starts_with("/api/")
                    || p.starts_with("/apis/")
                    || p.starts_with("/openapi/")
            });
        if self_review || discovery {
            return Decision::allow("");
        }
    }
    if let Some(g) = grants.iter().find(|g| g.allows(&name, &groups, c)) {
        return Decision::allow(format!(
            "allowed by the fake API server's grant of {} {}{} to {:?}",
            g.verb,
            g.resource,
            g.sub.as_deref().map(|s| format!("/{s}")).unwrap_or_default(),
            g.subject
        ));
    }
    Decision::deny(reason)
}

/// The Node authorizer for node `node`: `Err` carries its reason (often empty) for not allowing.
fn node_rules(node: &str, c: &Check, store: &Store) -> Result<(), String> {
    if c.path.is_some() {
        return Err(String::new());
    }
    let verb = c.verb;
    let no_relationship = || format!("no relationship found between node '{node}' and this object");
    match (c.group, c.resource, c.sub) {
        ("", "nodes", None)
            if matches!(verb, "get" | "list" | "watch" | "create" | "update" | "patch" | "delete") =>
        {
            Ok(())
        }
        ("", "nodes", Some("status")) if matches!(verb, "update" | "patch") => Ok(()),
        ("coordination.k8s.io", "leases", None) => {
            if !matches!(verb, "get" | "create" | "update" | "patch" | "delete") {
                return Err("can only get, create, update, patch, or delete a node lease".into());
            }
            if c.namespace != "kube-node-lease" {
                return Err("can only access leases in the \"kube-node-lease\" system namespace".into());
            }
            if verb != "create" && c.name != node {
                return Err("can only access node lease with the same name as the requesting node".into());
            }
            Ok(())
        }
        ("", "pods", None) if matches!(verb, "list" | "watch") => {
            if c.fields.required("spec.nodeName") == Some(node) {
                Ok(())
            } else {
                Err("can only list/watch pods with spec.nodeName field selector".into())
            }
        }
        ("", "pods", None) if matches!(verb, "get" | "create" | "delete") => Ok(()),
        ("", "pods", Some("status")) if matches!(verb, "update" | "patch") => Ok(()),
        ("", plural @ ("configmaps" | "secrets"), None) => {
            if !matches!(verb, "get" | "list" | "watch") {
                return Err("can only read resources of this type".into());
            }
            // A list or watch names its one object through a metadata.name field selector.
            let name = if verb == "get" { Some(c.name) } else { c.fields.required("metadata.name") };
            let Some(name) = name.filter(|n| !n.is_empty()) else {
                return Err("No Object name found".into());
            };
            if references(store, node, c.namespace)
                .get(plural)
                .is_some_and(|names| names.iter().any(|n| n == name))
            {
                Ok(())
            } else {
                Err(no_relationship())
            }
        }
        ("", "serviceaccounts", Some("token")) if verb == "create" => {
            let Some(pods) = super::store::resource("", "pods") else {
                return Err(no_relationship());
            };
            let uses = store.all(pods, Some(c.namespace)).any(|p| {
                bound_to(p, node)
                    && p.pointer("/spec/serviceAccountName").and_then(Value::as_str).unwrap_or("default")
                        == c.name
            });
            if uses { Ok(()) } else { Err(no_relationship()) }
        }
        ("" | "events.k8s.io", "events", None) if matches!(verb, "create" | "update" | "patch") => Ok(()),
        // The node rules for a node's own certificate renewals, and for the kubelet's delegated
        // authentication and authorization of its own API.
        ("certificates.k8s.io", "certificatesigningrequests", None)
            if matches!(verb, "create" | "get" | "list" | "watch") =>
        {
            Ok(())
        }
        ("authentication.k8s.io", "tokenreviews", None)
        | ("authorization.k8s.io", "subjectaccessreviews" | "localsubjectaccessreviews", None)
            if verb == "create" =>
        {
            Ok(())
        }
        _ => Err(String::new()),
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
/// The list repeats the agent's `names::NODE_SETTABLE` on purpose: the fake stands for the API
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

    fn check<'a>(
        verb: &'a str,
        group: &'a str,
        resource: &'a str,
        sub: Option<&'a str>,
        ns: &'a str,
        name: &'a str,
        fields: &'a FieldSelector,
    ) -> Check<'a> {
        Check { verb, group, resource, sub, namespace: ns, name, fields, path: None }
    }

    fn other(name: &str, groups: &[&str]) -> User {
        User::Other { name: name.into(), groups: groups.iter().map(|g| (*g).to_owned()).collect() }
    }

    #[test]
    fn users_from_info_are_nodes_only_with_exactly_a_nodes_groups() {
        let g = |gs: &[&str]| gs.iter().map(|g| (*g).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            User::from_info("system:node:n1", &g(&["system:nodes", "system:authenticated"])),
            User::Node("n1".into())
        );
        assert_eq!(
            User::from_info("system:bootstrap:abc", &g(&["system:bootstrappers"])),
            User::Bootstrap("abc".into())
        );
        assert!(matches!(
            User::from_info("system:node:n1", &g(&["system:authenticated"])),
            User::Other { .. }
        ));
        let masters_node = User::from_info("system:node:n1", &g(&["system:nodes", "system:masters"]));
        assert!(matches!(masters_node, User::Other { .. }), "keeps its extra group");
        assert_eq!(other("alice", &["dev"]).groups(), ["dev"]);
    }

    #[test]
    fn masters_nodes_bootstrappers_and_others() {
        let store = Store::default();
        let f = FieldSelector::default();
        let node = User::Node("n1".into());
        let ok = |u: &User, c: &Check| decide(u, c, &store, &[]).allowed;
        // system:masters, as the admin or any user in the group, may do anything.
        let log = check("get", "", "pods", Some("log"), "default", "p", &f);
        assert!(ok(&User::Admin, &log));
        assert!(ok(
            &other("root", &["system:masters"]),
            &check("delete", "apps", "deployments", None, "x", "d", &f)
        ));
        // The node rules: the kubelet's delegated authn/authz, but no pod logs (its own or others').
        assert!(ok(&node, &check("create", "authentication.k8s.io", "tokenreviews", None, "", "", &f)));
        assert!(ok(
            &node,
            &check("create", "authorization.k8s.io", "subjectaccessreviews", None, "", "", &f)
        ));
        assert!(!ok(&node, &check("get", "authentication.k8s.io", "tokenreviews", None, "", "", &f)));
        let d = decide(&node, &log, &store, &[]);
        assert_eq!(d, Decision { allowed: false, reason: String::new() });
        assert!(!ok(&node, &check("get", "", "nodes", Some("proxy"), "", "n1", &f)));
        // A node identity given as name and groups (a SubjectAccessReview's subject) is a node too.
        let as_info = other("system:node:n1", &["system:nodes", "system:masters"]);
        assert!(ok(&as_info, &log), "system:masters wins");
        let sec = decide(&node, &check("get", "", "secrets", None, "default", "s", &f), &store, &[]);
        assert_eq!(sec.reason, "no relationship found between node 'n1' and this object");
        let lease = decide(
            &node,
            &check("update", "coordination.k8s.io", "leases", None, "kube-node-lease", "n2", &f),
            &store,
            &[],
        );
        assert!(!lease.allowed && lease.reason.contains("same name"));
        // Bootstrappers: CSRs only; everyone authenticated: discovery and self-reviews.
        let boot = User::Bootstrap("abcdef".into());
        assert!(ok(
            &boot,
            &check("create", "certificates.k8s.io", "certificatesigningrequests", None, "", "", &f)
        ));
        assert!(!ok(&boot, &check("get", "", "nodes", None, "", "n1", &f)));
        let alice = other("alice", &["dev", "system:authenticated"]);
        assert!(ok(
            &alice,
            &check("create", "authorization.k8s.io", "selfsubjectaccessreviews", None, "", "", &f)
        ));
        let version = Check { path: Some("/version"), ..check("get", "", "", None, "", "", &f) };
        assert!(ok(&alice, &version));
        assert!(!ok(&other("anon", &[]), &version));
        assert!(!ok(&alice, &check("list", "", "pods", None, "", "", &f)));
    }

    #[test]
    fn grants_are_rbac_rules() {
        let store = Store::default();
        let f = FieldSelector::default();
        let alice = other("alice", &["dev", "system:authenticated"]);
        let log = check("get", "", "pods", Some("log"), "default", "p", &f);
        let pods = check("get", "", "pods", None, "default", "p", &f);
        let can = |grants: &[Grant], c: &Check| decide(&alice, c, &store, grants).allowed;
        assert!(!can(&[], &log));
        assert!(can(&[Grant::new("alice", "get", "pods", Some("log"))], &log));
        assert!(
            can(&[Grant::new("alice", "get", "pods/log", None)], &log),
            "pods/log is read as resource/subresource"
        );
        assert!(!can(&[Grant::new("alice", "get", "pods", None)], &log), "pods does not cover pods/log");
        assert!(can(&[Grant::new("alice", "get", "pods", None)], &pods));
        assert!(can(&[Grant::new("alice", "get", "pods", Some("*"))], &log));
        assert!(can(&[Grant::new("dev", "*", "*", None)], &log), "a group subject, wildcards");
        assert!(!can(&[Grant::new("bob", "get", "pods", Some("log"))], &log));
        assert!(!can(&[Grant::new("alice", "list", "pods", Some("log"))], &log));
        let metrics = Check { path: Some("/metrics/cadvisor"), ..check("get", "", "", None, "", "", &f) };
        assert!(can(&[Grant::new("alice", "get", "/metrics*", None)], &metrics));
        assert!(!can(&[Grant::new("alice", "get", "/metrics", None)], &metrics));
        assert!(!can(&[Grant::new("alice", "get", "/metrics*", None)], &pods));
        // Grants add to the node rules, as RBAC follows the Node authorizer.
        let node = User::Node("n1".into());
        assert!(
            decide(&node, &log, &store, &[Grant::new("system:nodes", "get", "pods", Some("log"))]).allowed
        );
    }

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
