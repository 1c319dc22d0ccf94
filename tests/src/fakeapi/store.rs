//! The fake's etcd and registry: objects as JSON, one global resourceVersion, a bounded history
//! of changes for watches, and the write semantics of the real registry (UIDs, timestamps,
//! AlreadyExists, optimistic concurrency, UID preconditions, status subresources, no-op updates
//! that change nothing, graceful pod deletion). It knows nothing about HTTP or users.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use super::defaults::{default_pod, fold_string_data, prepare_for_create};
use super::errors::{ApiError, field_error};
use super::select::{FieldSelector, LabelSelector};
use super::validate::{check_pod_spec_update, validate, validate_pod_status};

/// A resource the fake serves.
#[derive(Debug)]
pub(crate) struct Res {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    /// Has a `status` subresource: the main resource cannot change status, `/status` only can.
    pub status: bool,
    /// Fields a `fieldSelector` may name besides `metadata.name` and `metadata.namespace`.
    pub fields: &'static [&'static str],
}

impl Res {
    /// `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `pods`, or `leases.coordination.k8s.io`, as error messages name a resource.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() { self.plural.to_owned() } else { format!("{}.{}", self.plural, self.group) }
    }

    /// Every field a field selector may use on this resource.
    pub fn selectable(&self) -> Vec<&'static str> {
        let mut f = vec!["metadata.name", "metadata.namespace"];
        f.extend_from_slice(self.fields);
        f
    }
}

const fn res(
    group: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    status: bool,
    fields: &'static [&'static str],
) -> Res {
    Res { group, version: "v1", plural, kind, namespaced, status, fields }
}

/// Everything served.
pub(crate) static RESOURCES: &[Res] = &[
    res("", "nodes", "Node", false, true, &["spec.unschedulable"]),
    res(
        "",
        "pods",
        "Pod",
        true,
        true,
        &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
    ),
    res("", "configmaps", "ConfigMap", true, false, &[]),
    res("", "secrets", "Secret", true, false, &["type"]),
    res(
        "",
        "events",
        "Event",
        true,
        false,
        &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
    ),
    res("", "serviceaccounts", "ServiceAccount", true, false, &[]),
    res("", "namespaces", "Namespace", false, false, &["status.phase"]),
    res("coordination.k8s.io", "leases", "Lease", true, false, &[]),
    res(
        "certificates.k8s.io",
        "certificatesigningrequests",
        "CertificateSigningRequest",
        false,
        true,
        &["spec.signerName"],
    ),
];

/// Looks a resource up by API group and plural.
pub(crate) fn resource(group: &str, plural: &str) -> Option<&'static Res> {
    RESOURCES.iter().find(|r| r.group == group && r.plural == plural)
}

/// What a change did, as a watch event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

/// One write, kept in the history and sent to open watches.
#[derive(Debug)]
pub(crate) struct Change {
    pub rv: u64,
    pub plural: &'static str,
    pub namespace: String,
    pub kind: ChangeKind,
    /// The object after the change (for a deletion: its last state, stamped with the deletion's RV).
    pub object: Value,
    /// The object before a modification, so selector watches can turn it into ADDED/DELETED.
    pub prev: Option<Value>,
}

type Key = (&'static str, String, String);

/// The changes a watch receives as they happen.
pub(crate) type Changes = mpsc::UnboundedReceiver<Arc<Change>>;

const ROOT_CA: &str = "kube-root-ca.crt";

/// The fake's "cluster CA": the server speaks plain HTTP, so this only has to look like one.
const FAKE_CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBdzCCAR2gAwIBAgIBADAKBggqhkjOPQQDAjAjMSEwHwYDVQQDDBhsaWNoZW4t\nZmFrZS1hcGlzZXJ2ZXItY2EwHhcNMjQwMTAxMDAwMDAwWhcNMzQwMTAxMDAwMDAw\nWjAjMSEwHwYDVQQDDBhsaWNoZW4tZmFrZS1hcGlzZXJ2ZXItY2E=\n-----END CERTIFICATE-----\n";

struct Watcher {
    plural: &'static str,
    tx: mpsc::UnboundedSender<Arc<Change>>,
}

/// Which pod or subresource a write goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    Main,
    Status,
}

/// Delete options the store honours.
#[derive(Debug, Default)]
pub(crate) struct DeleteOpts {
    pub grace: Option<i64>,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

/// The objects and their history.
pub(crate) struct Store {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Arc<Change>>,
    /// Every change with a resourceVersion above this is still in `history`.
    floor: u64,
    pub history_limit: usize,
    watchers: Vec<Watcher>,
    /// Namespaces that have their `kube-root-ca.crt` ConfigMap.
    published: BTreeSet<String>,
}

impl Default for Store {
    fn default() -> Self {
        let mut s = Store {
            rv: 1,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            floor: 1,
            history_limit: 1000,
            watchers: vec![],
            published: BTreeSet::new(),
        };
        // The namespaces every cluster starts with.
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            s.publish_root_ca(ns);
        }
        s
    }
}

/// `2006-01-02T15:04:05Z`, the precision of `metav1.Time`.
pub(crate) fn timestamp(t: jiff::Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// A random UUID (version 4 layout), as the apiserver assigns.
pub(crate) fn uuid() -> String {
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        fastrand::u32(..),
        fastrand::u16(..),
        fastrand::u16(..0x1000),
        (fastrand::u16(..) & 0x3fff) | 0x8000,
        fastrand::u64(..1 << 48)
    )
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str().filter(|s| !s.is_empty())
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    match obj.get_mut("metadata") {
        Some(Value::Object(m)) => m,
        // Made an object just above.
        _ => unreachable!("metadata is an object"),
    }
}

/// Whether `s` is a lowercase RFC 1123 subdomain (names of most objects).
pub(crate) fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

impl Store {
    /// The current (newest) resourceVersion.
    pub fn rv(&self) -> u64 {
        self.rv
    }

    /// One object.
    pub fn get(&self, res: &Res, ns: &str, name: &str) -> Option<&Value> {
        self.objects.get(&(res.plural, ns.to_owned(), name.to_owned()))
    }

    /// Every object of `res` (in `ns`, if given), in key order.
    pub fn all<'a>(&'a self, res: &'a Res, ns: Option<&'a str>) -> impl Iterator<Item = &'a Value> + 'a {
        self.objects
            .range((res.plural, String::new(), String::new())..)
            .take_while(move |((p, _, _), _)| *p == res.plural)
            .filter(move |((_, n, _), _)| ns.is_none_or(|ns| ns == n))
            .map(|(_, v)| v)
    }

    /// The items a list returns.
    pub fn list(
        &self,
        res: &Res,
        ns: Option<&str>,
        fields: &FieldSelector,
        labels: &LabelSelector,
    ) -> Vec<Value> {
        self.all(res, ns).filter(|o| fields.matches(o) && labels.matches(o)).cloned().collect()
    }

    fn bump(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn record(
        &mut self,
        plural: &'static str,
        namespace: &str,
        kind: ChangeKind,
        object: Value,
        prev: Option<Value>,
    ) {
        let change =
            Arc::new(Change { rv: self.rv, plural, namespace: namespace.to_owned(), kind, object, prev });
        self.watchers.retain(|w| w.plural != plural || w.tx.send(change.clone()).is_ok());
        self.history.push_back(change);
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.floor = old.rv;
            }
        }
    }

    /// Forgets the history: a watch from any resourceVersion before now gets `410 Gone`.
    pub fn compact(&mut self) {
        self.history.clear();
        self.floor = self.rv;
    }

    /// Ends every open watch (their streams finish cleanly once drained).
    pub fn close_watches(&mut self) {
        self.watchers.clear();
    }

    /// Starts a watch of `res` after resourceVersion `from`: the retained changes after it, and a
    /// receiver for the ones to come, registered atomically so nothing falls between. `Err` is
    /// the `410 Gone` of a compacted resourceVersion.
    pub fn watch_from(
        &mut self,
        res: &'static Res,
        from: u64,
    ) -> Result<(Vec<Arc<Change>>, Changes), ApiError> {
        if from < self.floor {
            return Err(ApiError::expired(format!("too old resource version: {from} ({})", self.floor)));
        }
        let backlog =
            self.history.iter().filter(|c| c.rv > from && c.plural == res.plural).cloned().collect();
        Ok((backlog, self.subscribe(res)))
    }

    /// A receiver for future changes of `res`.
    pub fn subscribe(&mut self, res: &'static Res) -> Changes {
        let (tx, rx) = mpsc::unbounded_channel();
        self.watchers.push(Watcher { plural: res.plural, tx });
        rx
    }

    /// What the root-ca-cert-publisher controller does for every namespace: a `kube-root-ca.crt`
    /// ConfigMap with the cluster's CA, created the first time the namespace is used.
    fn publish_root_ca(&mut self, ns: &str) {
        if !self.published.insert(ns.to_owned()) {
            return;
        }
        let Some(cms) = resource("", "configmaps") else { return };
        if self.get(cms, ns, ROOT_CA).is_some() {
            return;
        }
        let rv = self.bump();
        let obj = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": ROOT_CA, "namespace": ns, "uid": uuid(), "resourceVersion": rv.to_string(),
                         "creationTimestamp": timestamp(jiff::Timestamp::now()),
                         "annotations": {"kubernetes.io/description": "Contains a CA bundle that can be used to verify the kube-apiserver when using internal endpoints such as the internal service IP or kubernetes.default.svc. No other usage is guaranteed across distributions of Kubernetes clusters."}},
            "data": {"ca.crt": FAKE_CA},
        });
        self.objects.insert((cms.plural, ns.to_owned(), ROOT_CA.to_owned()), obj.clone());
        self.record(cms.plural, ns, ChangeKind::Added, obj, None);
    }

    /// Creates an object in `ns` (empty for cluster-scoped resources).
    pub fn create(&mut self, res: &'static Res, ns: &str, mut obj: Value) -> Result<Value, ApiError> {
        if !obj.is_object() {
            return Err(ApiError::bad_request(format!(
                "the body of the request is not a {} object",
                res.kind
            )));
        }
        check_kind(res, &obj)?;
        if res.namespaced
            && let Some(body_ns) = meta_str(&obj, "namespace")
            && body_ns != ns
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let name = match (meta_str(&obj, "name"), meta_str(&obj, "generateName")) {
            (Some(n), _) => n.to_owned(),
            (None, Some(prefix)) => {
                const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
                let suffix: String =
                    (0..5).map(|_| ALPHABET[fastrand::usize(..ALPHABET.len())] as char).collect();
                format!("{prefix}{suffix}")
            }
            (None, None) => {
                return Err(ApiError::invalid(
                    res,
                    "",
                    &[field_error(
                        "metadata.name",
                        "FieldValueRequired",
                        "Required value: name or generateName is required",
                    )],
                ));
            }
        };
        if !is_dns_subdomain(&name) || (res.plural == "namespaces" && name.contains('.')) {
            return Err(ApiError::invalid(
                res,
                &name,
                &[field_error(
                    "metadata.name",
                    "FieldValueInvalid",
                    format!(
                        "Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case \
                         alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
                    ),
                )],
            ));
        }
        if meta_str(&obj, "resourceVersion").is_some() {
            return Err(ApiError::internal("resourceVersion should not be set on objects to be created"));
        }
        validate(res, &name, ns, &obj)?;
        if self.get(res, ns, &name).is_some() {
            return Err(ApiError::already_exists(res, &name));
        }
        if res.namespaced {
            self.publish_root_ca(ns);
        }
        if res.plural == "pods" {
            let sa =
                obj.pointer("/spec/serviceAccountName").and_then(Value::as_str).filter(|s| !s.is_empty());
            let sa_res = resource("", "serviceaccounts").ok_or_else(ApiError::no_route)?;
            let sa_automount = self
                .get(sa_res, ns, sa.unwrap_or("default"))
                .and_then(|sa| sa.get("automountServiceAccountToken"))
                .and_then(Value::as_bool);
            default_pod(&mut obj, sa_automount);
        }
        prepare_for_create(res, &mut obj);
        let rv = self.bump();
        stamp_type(res, &mut obj);
        let meta = meta_mut(&mut obj);
        meta.insert("name".into(), json!(name));
        if res.namespaced {
            meta.insert("namespace".into(), json!(ns));
        } else {
            meta.remove("namespace");
        }
        meta.insert("uid".into(), json!(uuid()));
        meta.insert("creationTimestamp".into(), json!(timestamp(jiff::Timestamp::now())));
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        meta.remove("deletionTimestamp");
        meta.remove("deletionGracePeriodSeconds");
        self.objects.insert((res.plural, ns.to_owned(), name), obj.clone());
        self.record(res.plural, ns, ChangeKind::Added, obj.clone(), None);
        self.collect_garbage();
        Ok(obj)
    }

    /// Writes `new` over the object `name` (PUT, or a patch already applied to the current
    /// object), to the main resource or to its status. Returns the stored object.
    pub fn update(
        &mut self,
        res: &'static Res,
        ns: &str,
        name: &str,
        mut new: Value,
        part: Part,
    ) -> Result<Value, ApiError> {
        let old = self.get(res, ns, name).cloned().ok_or_else(|| ApiError::not_found(res, name))?;
        if !new.is_object() {
            return Err(ApiError::bad_request(format!(
                "the body of the request is not a {} object",
                res.kind
            )));
        }
        check_kind(res, &new)?;
        if let Some(body_name) = meta_str(&new, "name")
            && body_name != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        if res.namespaced
            && let Some(body_ns) = meta_str(&new, "namespace")
            && body_ns != ns
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let old_uid = meta_str(&old, "uid").unwrap_or_default().to_owned();
        if let Some(uid) = meta_str(&new, "uid")
            && uid != old_uid
        {
            return Err(ApiError::uid_mismatch(res, name, uid, &old_uid));
        }
        if let Some(rv) = meta_str(&new, "resourceVersion")
            && meta_str(&old, "resourceVersion") != Some(rv)
        {
            return Err(ApiError::stale(res, name));
        }
        let mut result = match part {
            Part::Status => {
                let mut r = old.clone();
                match new.get("status") {
                    Some(s) if !s.is_null() => r["status"] = s.clone(),
                    _ => {
                        if let Some(o) = r.as_object_mut() {
                            o.remove("status");
                        }
                    }
                }
                if res.plural == "pods" {
                    validate_pod_status(res, name, &old, &mut r)?;
                }
                r
            }
            Part::Main => {
                if res.status
                    && let Some(o) = new.as_object_mut()
                {
                    match old.get("status") {
                        Some(s) => o.insert("status".into(), s.clone()),
                        None => o.remove("status"),
                    };
                }
                // What the server owns cannot be changed by a client.
                let meta = meta_mut(&mut new);
                for field in ["uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds"] {
                    match old.get("metadata").and_then(|m| m.get(field)) {
                        Some(v) => meta.insert(field.into(), v.clone()),
                        None => meta.remove(field),
                    };
                }
                meta.insert("name".into(), json!(name));
                if res.namespaced {
                    meta.insert("namespace".into(), json!(ns));
                }
                if res.plural == "pods" {
                    check_pod_spec_update(res, name, &old, &new)?;
                }
                if res.plural == "secrets" {
                    fold_string_data(&mut new);
                }
                validate(res, name, ns, &new)?;
                new
            }
        };
        stamp_type(res, &mut result);
        // Like etcd's guaranteed update: a write that changes nothing is not a write.
        let mut cmp = result.clone();
        meta_mut(&mut cmp).insert("resourceVersion".into(), old["metadata"]["resourceVersion"].clone());
        if cmp == old {
            return Ok(old);
        }
        let rv = self.bump();
        meta_mut(&mut result).insert("resourceVersion".into(), json!(rv.to_string()));
        self.objects.insert((res.plural, ns.to_owned(), name.to_owned()), result.clone());
        self.record(res.plural, ns, ChangeKind::Modified, result.clone(), Some(old));
        Ok(result)
    }

    /// Deletes `name`. A pod bound to a node is deleted gracefully: the first delete sets
    /// `deletionTimestamp`, the object goes with a delete of grace 0 (the kubelet's). Returns the
    /// object as the response shows it.
    pub fn delete(
        &mut self,
        res: &'static Res,
        ns: &str,
        name: &str,
        opts: &DeleteOpts,
    ) -> Result<Value, ApiError> {
        let old = self.get(res, ns, name).cloned().ok_or_else(|| ApiError::not_found(res, name))?;
        let uid = meta_str(&old, "uid").unwrap_or_default().to_owned();
        if let Some(want) = opts.uid.as_deref()
            && want != uid
        {
            return Err(ApiError::uid_mismatch(res, name, want, &uid));
        }
        let current_rv = meta_str(&old, "resourceVersion").unwrap_or_default();
        if let Some(want) = opts.resource_version.as_deref()
            && want != current_rv
        {
            return Err(ApiError::rv_mismatch(res, name, want, current_rv));
        }
        if res.plural == "pods"
            && let Some(grace) = pod_grace(&old, opts.grace)
        {
            let mut new = old.clone();
            let current = old["metadata"].get("deletionGracePeriodSeconds").and_then(Value::as_i64);
            if current.is_some_and(|c| c <= grace) {
                // Already terminating as soon or sooner: nothing changes.
                return Ok(old);
            }
            let at = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(grace);
            let rv = self.bump();
            let meta = meta_mut(&mut new);
            meta.insert("deletionTimestamp".into(), json!(timestamp(at)));
            meta.insert("deletionGracePeriodSeconds".into(), json!(grace));
            meta.insert("resourceVersion".into(), json!(rv.to_string()));
            self.objects.insert((res.plural, ns.to_owned(), name.to_owned()), new.clone());
            self.record(res.plural, ns, ChangeKind::Modified, new.clone(), Some(old));
            return Ok(new);
        }
        let gone = self.remove(res, ns, name);
        self.collect_garbage();
        Ok(gone)
    }

    /// Removes an object for good, emitting DELETED.
    fn remove(&mut self, res: &'static Res, ns: &str, name: &str) -> Value {
        let Some(mut obj) = self.objects.remove(&(res.plural, ns.to_owned(), name.to_owned())) else {
            return Value::Null;
        };
        let rv = self.bump();
        meta_mut(&mut obj).insert("resourceVersion".into(), json!(rv.to_string()));
        self.record(res.plural, ns, ChangeKind::Deleted, obj.clone(), None);
        obj
    }

    /// The garbage collector, done at once: deletes objects whose owners (of the kinds the fake
    /// serves) are all gone, such as a Node's Lease, or a Lease created for a Node deleted meanwhile.
    fn collect_garbage(&mut self) {
        loop {
            let orphans: Vec<Key> =
                self.objects.iter().filter(|(_, o)| self.orphaned(o)).map(|(k, _)| k.clone()).collect();
            if orphans.is_empty() {
                return;
            }
            for (plural, ns, name) in orphans {
                if let Some(r) = RESOURCES.iter().find(|r| r.plural == plural) {
                    self.remove(r, &ns, &name);
                }
            }
        }
    }

    fn orphaned(&self, obj: &Value) -> bool {
        let Some(refs) = obj.pointer("/metadata/ownerReferences").and_then(Value::as_array) else {
            return false;
        };
        !refs.is_empty()
            && refs.iter().all(|r| {
                let served = r
                    .get("kind")
                    .and_then(Value::as_str)
                    .is_some_and(|k| RESOURCES.iter().any(|x| x.kind == k));
                let uid = r.get("uid").and_then(Value::as_str).unwrap_or_default();
                served && !self.objects.values().any(|o| meta_str(o, "uid") == Some(uid))
            })
    }
}

/// The grace period of a pod deletion, or `None` if the pod goes at once: not bound to a node, in a
/// terminal phase, or asked with grace 0.
fn pod_grace(pod: &Value, asked: Option<i64>) -> Option<i64> {
    let bound = pod.pointer("/spec/nodeName").and_then(Value::as_str).is_some_and(|n| !n.is_empty());
    let phase = pod.pointer("/status/phase").and_then(Value::as_str);
    if !bound || matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    let grace = asked
        .or_else(|| pod.pointer("/spec/terminationGracePeriodSeconds").and_then(Value::as_i64))
        .unwrap_or(30);
    // A negative grace period means "the default" to the apiserver; 0 means now.
    let grace = if grace < 0 { 1 } else { grace };
    (grace > 0).then_some(grace)
}

fn stamp_type(res: &Res, obj: &mut Value) {
    if let Some(o) = obj.as_object_mut() {
        o.insert("apiVersion".into(), json!(res.api_version()));
        o.insert("kind".into(), json!(res.kind));
    }
}

fn check_kind(res: &Res, obj: &Value) -> Result<(), ApiError> {
    match obj.get("kind").and_then(Value::as_str) {
        Some(k) if !k.is_empty() && k != res.kind => Err(ApiError::bad_request(format!(
            "{k} in version \"{}\" cannot be handled as a {}: the kind does not match",
            res.version, res.kind
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::defaults::TOKEN_MOUNT_PATH;
    use super::*;

    fn pods() -> &'static Res {
        resource("", "pods").expect("pods")
    }

    #[test]
    fn uuids_have_the_canonical_shape() {
        let u = uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(u.matches('-').count(), 4);
    }

    #[test]
    fn a_no_op_update_keeps_the_resource_version() {
        let mut s = Store::default();
        let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}]}});
        let created = s.create(pods(), "default", pod).expect("create");
        let rv = s.rv();
        let again = s.update(pods(), "default", "p", created.clone(), Part::Main).expect("update");
        assert_eq!(again, created);
        assert_eq!(s.rv(), rv);
    }

    #[test]
    fn pods_get_the_service_account_volume_unless_they_opt_out() {
        let mut s = Store::default();
        let spec = |extra: Value| {
            let mut p = json!({"metadata": {"name": "p"}, "spec": {"containers": [
                {"name": "a", "image": "i", "volumeMounts": [{"name": "v", "mountPath": "/v"}]}]}});
            if let (Some(sp), Some(e)) = (p["spec"].as_object_mut(), extra.as_object()) {
                sp.extend(e.clone());
            }
            p
        };
        let p = s.create(pods(), "ns1", spec(json!({}))).expect("create");
        let volumes = p.pointer("/spec/volumes").and_then(Value::as_array).expect("volumes");
        let name = volumes[0]["name"].as_str().expect("name");
        assert!(name.starts_with("kube-api-access-"), "{name}");
        let mounts = p.pointer("/spec/containers/0/volumeMounts").and_then(Value::as_array).expect("mounts");
        assert_eq!(mounts[1]["mountPath"], TOKEN_MOUNT_PATH, "appended after the pod's own");
        let off =
            s.create(pods(), "ns2", spec(json!({"automountServiceAccountToken": false}))).expect("create");
        assert!(off.pointer("/spec/volumes").is_none());
        // Every namespace gets the cluster CA the volume projects.
        let cms = resource("", "configmaps").expect("configmaps");
        assert!(s.get(cms, "ns1", ROOT_CA).is_some() && s.get(cms, "default", ROOT_CA).is_some());
    }

    #[test]
    fn secrets_fold_string_data_into_data() {
        let mut s = Store::default();
        let secrets = resource("", "secrets").expect("secrets");
        let sec = s
            .create(secrets, "ns", json!({"metadata": {"name": "s"}, "stringData": {"k": "hello"}}))
            .expect("create");
        assert_eq!(sec["data"]["k"], "aGVsbG8=");
        assert_eq!(sec["type"], "Opaque");
        assert!(sec.get("stringData").is_none());
    }
}
