//! One request: the URL to a resource and verb, authorization, admission, the store operation, and
//! the response. Watches become [`WatchStream`]s of newline-delimited JSON events.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::authn::{SaToken, Tokens};
use super::authz::{self, Attrs, Grant, User};
use super::errors::ApiError;
use super::kubelet;
use super::review;
use super::select::{FieldSelector, LabelSelector, merge_patch};
use super::store::{self, Change, ChangeKind, Changes, DeleteOpts, Part, Res, Store};

/// A parsed request, body read.
pub(crate) struct Req<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: &'a str,
    pub content_type: &'a str,
    pub body: &'a [u8],
    pub user: &'a User,
    /// `127.0.0.1:port`, for discovery documents.
    pub server: &'a str,
    /// The tokens the server knows (TokenReviews read them, TokenRequests add to them); locked
    /// while the store is.
    pub tokens: &'a Mutex<Tokens>,
    /// The test's RBAC-lite rules.
    pub grants: &'a [Grant],
}

/// What to send back.
pub(crate) enum Outcome {
    Json(u16, Value),
    Text(u16, &'static str),
    Watch(Box<WatchPlan>),
    /// A call to a node's kubelet, made once the store is unlocked.
    Proxy(Box<kubelet::Plan>),
}

/// Everything a watch stream needs, taken under the store lock.
pub(crate) struct WatchPlan {
    res: &'static Res,
    namespace: Option<String>,
    fields: FieldSelector,
    labels: LabelSelector,
    /// Events to send first (synthetic ADDEDs, the history since the asked resourceVersion, or a 410).
    initial: VecDeque<Bytes>,
    rx: Option<Changes>,
    bookmarks: bool,
    timeout: Option<Duration>,
}

enum Route {
    Doc(Value),
    Health,
    Review(review::Kind),
    Res { res: &'static Res, namespace: String, name: Option<String>, sub: Option<String> },
}

/// `%xx` decoding; `+` is a space in query strings.
pub(crate) fn decode(s: &str, plus_is_space: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b.get(i + 1..i + 3).filter(|h| h.iter().all(u8::is_ascii_hexdigit));
                match hex.and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' if plus_is_space => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The decoded query parameters.
pub(crate) fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k, true), decode(v, true))
        })
        .collect()
}

fn route(path: &str, server: &str) -> Result<Route, ApiError> {
    let segs: Vec<String> = path.split('/').filter(|s| !s.is_empty()).map(|s| decode(s, false)).collect();
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    match s.as_slice() {
        ["version"] => Ok(Route::Doc(json!({
            "major": "1", "minor": "33", "gitVersion": "v1.33.0-lichen-fake", "platform": "linux/amd64"
        }))),
        ["healthz" | "readyz" | "livez"] => Ok(Route::Health),
        ["api"] => Ok(Route::Doc(json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server}]
        }))),
        ["apis"] => Ok(Route::Doc(json!({
            "kind": "APIGroupList", "apiVersion": "v1",
            "groups": [{"name": "coordination.k8s.io",
                        "versions": [{"groupVersion": "coordination.k8s.io/v1", "version": "v1"}],
                        "preferredVersion": {"groupVersion": "coordination.k8s.io/v1", "version": "v1"}}]
        }))),
        ["apis", "authentication.k8s.io", "v1", "tokenreviews"] => Ok(Route::Review(review::Kind::Token)),
        ["apis", "authorization.k8s.io", "v1", "subjectaccessreviews"] => {
            Ok(Route::Review(review::Kind::SubjectAccess))
        }
        ["api", "v1", rest @ ..] => resource_route("", rest),
        ["apis", group, "v1", rest @ ..] => resource_route(group, rest),
        _ => Err(ApiError::no_route()),
    }
}

fn resource_route(group: &str, rest: &[&str]) -> Result<Route, ApiError> {
    let r = |res: &'static Res,
             namespace: &str,
             name: Option<&&str>,
             sub: Option<&&str>|
     -> Result<Route, ApiError> {
        if let Some(sub) = sub {
            let ok = (*sub == "status" && res.status)
                || (*sub == "token" && res.plural == "serviceaccounts")
                || (res.plural == "pods" && kubelet::SUBRESOURCES.contains(sub));
            if !ok {
                return Err(ApiError::no_route());
            }
        }
        Ok(Route::Res {
            res,
            namespace: namespace.to_owned(),
            name: name.map(|n| n.to_string()),
            sub: sub.map(|s| s.to_string()),
        })
    };
    if let ["namespaces", ns, plural, tail @ ..] = rest
        && let Some(res) = store::resource(group, plural).filter(|r| r.namespaced)
    {
        return match tail {
            [] | [_] | [_, _] => r(res, ns, tail.first(), tail.get(1)),
            _ => Err(ApiError::no_route()),
        };
    }
    match rest {
        [plural, tail @ ..] if tail.len() <= 2 => {
            let res = store::resource(group, plural).ok_or_else(ApiError::no_route)?;
            if res.namespaced && !tail.is_empty() {
                return Err(ApiError::no_route());
            }
            r(res, "", tail.first(), tail.get(1))
        }
        _ => Err(ApiError::no_route()),
    }
}

fn param<'a>(q: &'a [(String, String)], key: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

pub(crate) fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}")))
}

/// Serves one request against the locked store.
pub(crate) fn dispatch(store: &mut Store, req: &Req) -> Result<Outcome, ApiError> {
    let (res, ns, name, sub) = match route(req.path, req.server)? {
        Route::Doc(v) if req.method == "GET" => return Ok(Outcome::Json(200, v)),
        Route::Health if req.method == "GET" => return Ok(Outcome::Text(200, "ok")),
        Route::Doc(_) | Route::Health => return Err(ApiError::method_not_allowed(req.method)),
        Route::Review(kind) => return review::create(store, req, kind),
        Route::Res { res, namespace, name, sub } => (res, namespace, name, sub),
    };
    let q = query_pairs(req.query);
    if param(&q, "dryRun").is_some() {
        return Err(ApiError::bad_request("dryRun is not supported by the fake API server"));
    }
    // pods/log is read-only; exec, attach and portforward are connect verbs (GET or POST).
    let through_kubelet = sub.as_deref().filter(|s| kubelet::SUBRESOURCES.contains(s)).map(str::to_owned);
    if let Some(s) = &through_kubelet {
        let allowed = if s == "log" { req.method == "GET" } else { matches!(req.method, "GET" | "POST") };
        if !allowed {
            return Err(ApiError::method_not_allowed(req.method));
        }
    }
    let watching = matches!(param(&q, "watch"), Some("true" | "1"));
    let verb = match (req.method, &name, sub.as_deref()) {
        ("GET", None, _) if watching => "watch",
        ("GET", None, _) => "list",
        ("GET", Some(_), _) => "get",
        ("POST", None, _) => "create",
        ("POST", Some(_), Some("token" | "exec" | "attach" | "portforward")) => "create",
        ("PUT", Some(_), _) => "update",
        ("PATCH", Some(_), _) => "patch",
        ("DELETE", Some(_), None) => "delete",
        _ => return Err(ApiError::method_not_allowed(req.method)),
    };
    let fields = match param(&q, "fieldSelector") {
        Some(f) if matches!(verb, "list" | "watch") => FieldSelector::parse(f, &res.selectable())?,
        _ => FieldSelector::default(),
    };
    let labels = match param(&q, "labelSelector") {
        Some(l) if matches!(verb, "list" | "watch") => LabelSelector::parse(l)?,
        _ => LabelSelector::default(),
    };
    let name = name.unwrap_or_default();
    let attrs = Attrs { verb, res, sub: sub.as_deref(), namespace: &ns, name: &name, fields: &fields };
    authz::authorize(req.user, &attrs, store, req.grants)?;
    if let Some(s) = through_kubelet {
        return Ok(match kubelet::plan(store, &ns, &name, &s, &q)? {
            Some(plan) => Outcome::Proxy(Box::new(plan)),
            // The log of a pod not yet on a node: the real server's empty stream.
            None => Outcome::Text(204, ""),
        });
    }
    let user = req.user;
    let part = if sub.as_deref() == Some("status") { Part::Status } else { Part::Main };
    match verb {
        "get" => {
            let obj = match store.get(res, &ns, &name) {
                Some(o) => o.clone(),
                // Any namespace exists in the fake.
                None if res.plural == "namespaces" => json!({
                    "kind": "Namespace", "apiVersion": "v1",
                    "metadata": {"name": name, "resourceVersion": "1"},
                    "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}
                }),
                None => return Err(ApiError::not_found(res, &name)),
            };
            if res.plural == "pods" {
                authz::admit_pod(user, res, &obj, "get")?;
            }
            Ok(Outcome::Json(200, obj))
        }
        "list" => {
            let scope = (!ns.is_empty()).then_some(ns.as_str());
            let items: Vec<Value> = store
                .list(res, scope, &fields, &labels)
                .into_iter()
                .map(|mut o| {
                    // List items carry no type meta.
                    if let Some(m) = o.as_object_mut() {
                        m.remove("kind");
                        m.remove("apiVersion");
                    }
                    o
                })
                .collect();
            Ok(Outcome::Json(
                200,
                json!({
                    "kind": format!("{}List", res.kind),
                    "apiVersion": res.api_version(),
                    "metadata": {"resourceVersion": store.rv().to_string()},
                    "items": items,
                }),
            ))
        }
        "watch" => watch(store, res, &ns, fields, labels, &q).map(|p| Outcome::Watch(Box::new(p))),
        "create" if sub.as_deref() == Some("token") => token(store, req.tokens, user, &ns, &name, req.body),
        "create" => {
            let mut body = parse_body(req.body)?;
            if res.plural == "certificatesigningrequests" {
                // The API server records who asked; the approver decides on it.
                body["spec"]["username"] = json!(user.name());
                body["spec"]["groups"] = json!(user.groups());
                if body.pointer("/spec/request").and_then(Value::as_str).is_none_or(str::is_empty) {
                    let e =
                        super::errors::field_error("spec.request", "FieldValueRequired", "Required value");
                    return Err(ApiError::invalid(res, "", &[e]));
                }
            }
            let body_name = body.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default();
            match res.plural {
                "nodes" => authz::admit_node(user, res, body_name, None, Some(&body))?,
                "leases" => authz::admit_lease_create(user, res, body_name)?,
                "pods" => authz::admit_pod_create(user, res, &body)?,
                _ => {}
            }
            store.create(res, &ns, body).map(|o| Outcome::Json(201, o))
        }
        "update" | "patch" => {
            let old = store.get(res, &ns, &name).cloned().ok_or_else(|| ApiError::not_found(res, &name))?;
            let new = if verb == "update" {
                parse_body(req.body)?
            } else {
                let ct = req.content_type.split(';').next().unwrap_or_default().trim();
                if !matches!(ct, "application/merge-patch+json" | "application/strategic-merge-patch+json") {
                    return Err(ApiError::unsupported_media(ct));
                }
                let patch = parse_body(req.body)?;
                if !patch.is_object() {
                    return Err(ApiError::bad_request("the patch is not a JSON object"));
                }
                let mut new = old.clone();
                merge_patch(&mut new, &patch);
                new
            };
            match (res.plural, part) {
                ("nodes", Part::Main) => authz::admit_node(user, res, &name, Some(&old), Some(&new))?,
                ("nodes", Part::Status) => authz::admit_node(user, res, &name, Some(&old), None)?,
                ("pods", Part::Status) => authz::admit_pod(user, res, &old, "status")?,
                _ => {}
            }
            store.update(res, &ns, &name, new, part).map(|o| Outcome::Json(200, o))
        }
        "delete" => {
            let opts = delete_opts(req.body, &q)?;
            if let Some(old) = store.get(res, &ns, &name) {
                match res.plural {
                    "pods" => authz::admit_pod(user, res, old, "delete")?,
                    "nodes" => authz::admit_node(user, res, &name, Some(old), None)?,
                    _ => {}
                }
            }
            store.delete(res, &ns, &name, &opts).map(|o| Outcome::Json(200, o))
        }
        _ => Err(ApiError::method_not_allowed(req.method)),
    }
}

fn delete_opts(body: &[u8], q: &[(String, String)]) -> Result<DeleteOpts, ApiError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) { json!({}) } else { parse_body(body)? };
    let s = |p: &str| body.pointer(p).and_then(Value::as_str).map(str::to_owned);
    let grace = match param(q, "gracePeriodSeconds") {
        Some(g) => {
            Some(g.parse().map_err(|_| ApiError::bad_request(format!("invalid gracePeriodSeconds {g:?}")))?)
        }
        None => body.get("gracePeriodSeconds").and_then(Value::as_i64),
    };
    Ok(DeleteOpts {
        grace,
        uid: s("/preconditions/uid"),
        resource_version: s("/preconditions/resourceVersion"),
    })
}

fn watch(
    store: &mut Store,
    res: &'static Res,
    ns: &str,
    fields: FieldSelector,
    labels: LabelSelector,
    q: &[(String, String)],
) -> Result<WatchPlan, ApiError> {
    let namespace = (!ns.is_empty()).then(|| ns.to_owned());
    let timeout = match param(q, "timeoutSeconds") {
        Some(t) => Some(Duration::from_secs(
            t.parse().map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds {t:?}")))?,
        )),
        None => None,
    };
    let mut plan = WatchPlan {
        res,
        namespace,
        fields,
        labels,
        initial: VecDeque::new(),
        rx: None,
        bookmarks: matches!(param(q, "allowWatchBookmarks"), Some("true" | "1")),
        timeout,
    };
    match param(q, "resourceVersion").unwrap_or_default() {
        "" | "0" => {
            let scope = plan.namespace.as_deref();
            let current = store.list(res, scope, &plan.fields, &plan.labels);
            plan.initial = current.iter().map(|o| line("ADDED", o)).collect();
            plan.rx = Some(store.subscribe(res));
        }
        rv => {
            let from: u64 = rv.parse().map_err(|_| {
                ApiError::bad_request(format!("resourceVersion: Invalid value: {rv:?}: must be an integer"))
            })?;
            match store.watch_from(res, from) {
                Ok((backlog, rx)) => {
                    plan.initial = backlog.iter().filter_map(|c| plan.view(c)).collect();
                    plan.rx = Some(rx);
                }
                Err(gone) => plan.initial.push_back(line("ERROR", &gone.status())),
            }
        }
    }
    Ok(plan)
}

fn line(kind: &str, obj: &Value) -> Bytes {
    let mut text = json!({ "type": kind, "object": obj }).to_string();
    text.push('\n');
    Bytes::from(text)
}

impl WatchPlan {
    /// The event this watcher sees for a change, if any: a modification moves an object in or out
    /// of the selectors' view as ADDED or DELETED, as the apiserver's watch cache does.
    fn view(&self, c: &Change) -> Option<Bytes> {
        if c.plural != self.res.plural || self.namespace.as_deref().is_some_and(|ns| ns != c.namespace) {
            return None;
        }
        let sees = |o: &Value| self.fields.matches(o) && self.labels.matches(o);
        match c.kind {
            ChangeKind::Added => sees(&c.object).then(|| line("ADDED", &c.object)),
            ChangeKind::Deleted => sees(&c.object).then(|| line("DELETED", &c.object)),
            ChangeKind::Modified => {
                let before = c.prev.as_ref().is_some_and(sees);
                match (before, sees(&c.object)) {
                    (true, true) => Some(line("MODIFIED", &c.object)),
                    (false, true) => Some(line("ADDED", &c.object)),
                    (true, false) => {
                        let mut gone = c.prev.clone().unwrap_or(Value::Null);
                        gone["metadata"]["resourceVersion"] = json!(c.rv.to_string());
                        Some(line("DELETED", &gone))
                    }
                    (false, false) => None,
                }
            }
        }
    }

    /// Turns the plan into the stream the response body sends.
    pub fn into_stream(self, store: Arc<Mutex<Store>>, bookmark_every: Duration) -> WatchStream {
        let deadline = self.timeout.map(|t| Instant::now() + t);
        let bookmark = tokio::time::interval_at(Instant::now() + bookmark_every, bookmark_every);
        WatchStream { plan: self, store, deadline, bookmark }
    }
}

/// A running watch.
pub(crate) struct WatchStream {
    plan: WatchPlan,
    store: Arc<Mutex<Store>>,
    deadline: Option<Instant>,
    bookmark: tokio::time::Interval,
}

impl WatchStream {
    /// The next chunk; `None` ends the response (timeout, or the watch was closed).
    pub async fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(b) = self.plan.initial.pop_front() {
                return Some(b);
            }
            let rx = self.plan.rx.as_mut()?;
            let deadline = self.deadline;
            let bookmarks = self.plan.bookmarks;
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(c) => {
                        if let Some(b) = self.plan.view(&c) {
                            return Some(b);
                        }
                    }
                    None => self.plan.rx = None,
                },
                _ = self.bookmark.tick(), if bookmarks => self.queue_bookmark(),
                _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                    return None;
                }
            }
        }
    }

    /// Queues every change already sent to this watcher, then a bookmark at the current
    /// resourceVersion: read under the store lock, so no change at or below it is still in flight.
    fn queue_bookmark(&mut self) {
        let Ok(store) = self.store.lock() else { return };
        let rv = store.rv();
        let mut pending = vec![];
        if let Some(rx) = self.plan.rx.as_mut() {
            while let Ok(c) = rx.try_recv() {
                pending.push(c);
            }
        }
        drop(store);
        for c in pending {
            if let Some(b) = self.plan.view(&c) {
                self.plan.initial.push_back(b);
            }
        }
        let obj = json!({
            "kind": self.plan.res.kind,
            "apiVersion": self.plan.res.api_version(),
            "metadata": {"resourceVersion": rv.to_string()},
        });
        self.plan.initial.push_back(line("BOOKMARK", &obj));
    }
}

/// `POST serviceaccounts/<name>/token`: a TokenRequest answered with a JWT-shaped token, which then
/// authenticates as the service account while its claims hold (see [`super::authn`]).
fn token(
    store: &Store,
    tokens: &Mutex<Tokens>,
    user: &User,
    ns: &str,
    sa: &str,
    body: &[u8],
) -> Result<Outcome, ApiError> {
    let mut tr = parse_body(body)?;
    let tr_res = Res {
        group: "authentication.k8s.io",
        version: "v1",
        plural: "tokenrequests",
        kind: "TokenRequest",
        namespaced: true,
        status: false,
        fields: &[],
    };
    let sa_res = store::resource("", "serviceaccounts").ok_or_else(ApiError::no_route)?;
    let expiration = tr.pointer("/spec/expirationSeconds").and_then(Value::as_i64).unwrap_or(3600);
    if expiration < 600 {
        return Err(ApiError::invalid(
            &tr_res,
            "",
            &[super::errors::field_error(
                "spec.expirationSeconds",
                "FieldValueInvalid",
                format!("Invalid value: {expiration}: may not specify a duration less than 10 minutes"),
            )],
        ));
    }
    let bound = tr.pointer("/spec/boundObjectRef").filter(|b| !b.is_null()).cloned();
    if matches!(user, User::Node(_)) {
        let why = match &bound {
            None => Some("node requested token not bound to a pod".to_owned()),
            Some(b) if b.get("kind").and_then(Value::as_str) != Some("Pod") => Some(format!(
                "node requested token bound to a {}",
                b.get("kind").and_then(Value::as_str).unwrap_or_default()
            )),
            _ => None,
        };
        if let Some(why) = why {
            return Err(ApiError::forbidden(sa_res, sa, &why));
        }
    }
    let mut bound_pod = None;
    if let Some(b) = &bound
        && b.get("kind").and_then(Value::as_str) == Some("Pod")
    {
        let pods = store::resource("", "pods").ok_or_else(ApiError::no_route)?;
        let pod_name = b.get("name").and_then(Value::as_str).unwrap_or_default();
        let pod = store.get(pods, ns, pod_name).ok_or_else(|| ApiError::not_found(pods, pod_name))?;
        let uid = pod.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or_default();
        if let Some(want) = b.get("uid").and_then(Value::as_str).filter(|u| !u.is_empty())
            && want != uid
        {
            let why = format!(
                "the UID in the bound object reference ({want}) does not match the UID in record. \
                 The object might have been deleted and then recreated"
            );
            return Err(match user {
                User::Node(_) | User::Bootstrap(_) => ApiError::forbidden(sa_res, sa, &why),
                User::Admin | User::Other { .. } => ApiError::conflict(pods, pod_name, &why),
            });
        }
        if let User::Node(node) = user
            && !authz::bound_to(pod, node)
        {
            return Err(ApiError::forbidden(
                sa_res,
                sa,
                "node requested token bound to a pod scheduled on a different node",
            ));
        }
        if pod.pointer("/spec/serviceAccountName").and_then(Value::as_str).unwrap_or("default") != sa {
            return Err(ApiError::bad_request(format!(
                "cannot bind token for serviceaccount \"{sa}\" to pod running with different serviceaccount name."
            )));
        }
        bound_pod = Some((pod_name.to_owned(), uid.to_owned()));
    }
    let expires = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(expiration);
    if !tr.is_object() {
        tr = json!({});
    }
    tr["kind"] = json!("TokenRequest");
    tr["apiVersion"] = json!("authentication.k8s.io/v1");
    tr["metadata"] = json!({"name": sa, "namespace": ns, "creationTimestamp": null});
    if !tr.get("spec").is_some_and(Value::is_object) {
        tr["spec"] = json!({});
    }
    tr["spec"]["expirationSeconds"] = json!(expiration);
    if tr["spec"].get("audiences").is_none_or(|a| a.as_array().is_none_or(Vec::is_empty)) {
        tr["spec"]["audiences"] = json!(["https://kubernetes.default.svc.cluster.local"]);
    }
    let audiences = tr["spec"]["audiences"].clone();
    let token = jwt(ns, sa, &audiences, bound.as_ref(), expires);
    // The token authenticates (requests, TokenReviews) while its claims hold.
    let claims = SaToken {
        namespace: ns.to_owned(),
        name: sa.to_owned(),
        pod: bound_pod,
        audiences: audiences
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        expires: expires.as_second(),
    };
    super::lock(tokens).insert_service_account(token.clone(), claims);
    tr["status"] = json!({
        "token": token,
        "expirationTimestamp": store::timestamp(expires),
    });
    Ok(Outcome::Json(201, tr))
}

/// A token shaped like the apiserver's (a JWT with its claims) but signed by nobody: opaque to
/// anything but a reader of its claims.
fn jwt(ns: &str, sa: &str, audiences: &Value, bound: Option<&Value>, expires: jiff::Timestamp) -> String {
    let b64 = |v: &Value| {
        super::defaults::base64(v.to_string().as_bytes()).replace('+', "-").replace('/', "_").replace('=', "")
    };
    let now = jiff::Timestamp::now().as_second();
    let mut k8s = json!({"namespace": ns, "serviceaccount": {"name": sa}});
    if let Some(b) = bound {
        k8s["pod"] = json!({"name": b.get("name"), "uid": b.get("uid")});
    }
    let claims = json!({
        "aud": audiences, "exp": expires.as_second(), "iat": now, "nbf": now,
        "iss": "https://kubernetes.default.svc.cluster.local",
        "sub": format!("system:serviceaccount:{ns}:{sa}"),
        "jti": store::uuid(),
        "kubernetes.io": k8s,
    });
    let signature = super::defaults::base64(store::uuid().as_bytes()).replace('=', "");
    format!("{}.{}.{signature}", b64(&json!({"alg": "RS256", "kid": "lichen-fake"})), b64(&claims))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding_handles_escapes_and_plus() {
        assert_eq!(decode("spec.nodeName%3Dn1%2Cx+y", true), "spec.nodeName=n1,x y");
        assert_eq!(decode("a%2", false), "a%2");
        assert_eq!(decode("100%", false), "100%");
    }

    #[test]
    fn routes_name_resources_and_reject_the_rest() {
        let ok = |p: &str| matches!(route(p, "x"), Ok(Route::Res { .. }));
        assert!(ok("/api/v1/nodes/n1/status"));
        assert!(ok("/api/v1/namespaces/default/pods/p/status"));
        assert!(ok("/api/v1/pods"));
        assert!(ok("/api/v1/namespaces/default"));
        assert!(ok("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n1"));
        assert!(ok("/api/v1/namespaces/d/serviceaccounts/default/token"));
        for sub in ["log", "exec", "attach", "portforward"] {
            assert!(ok(&format!("/api/v1/namespaces/d/pods/p/{sub}")), "{sub}");
        }
        let review = |p: &str| matches!(route(p, "x"), Ok(Route::Review(_)));
        assert!(review("/apis/authentication.k8s.io/v1/tokenreviews"));
        assert!(review("/apis/authorization.k8s.io/v1/subjectaccessreviews"));
        assert!(route("/api/v1/namespaces/d/configmaps/c/log", "x").is_err());
        assert!(route("/api/v1/nodes/n1/log", "x").is_err());
        for bad in [
            "/api/v1/leases",
            "/api/v1/pods/p",
            "/api/v1/namespaces/d/configmaps/c/status",
            "/apis/x/v1/y",
            "/nope",
        ] {
            assert!(route(bad, "x").is_err(), "{bad}");
        }
    }
}
