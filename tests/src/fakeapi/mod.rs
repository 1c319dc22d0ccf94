//! A fake kube-apiserver, in-process, for what a real one cannot easily be made to do: answer
//! `410 Gone`, fail on purpose, go away and come back on the same port with its state, or answer
//! slowly. It follows the real server's semantics (the agent is never shaped to the fake):
//!
//! - one global, etcd-like resourceVersion; UIDs, creation timestamps, `generateName`;
//!   `AlreadyExists`, optimistic concurrency on `metadata.resourceVersion`, `metadata.uid` as a
//!   precondition, no-op writes that change nothing (no new resourceVersion, no event);
//! - `status` subresources for pods and nodes; merge patch (RFC 7386);
//! - lists and watches with field and label selectors, a bounded watch history (`410 Gone` as
//!   an `ERROR` event past it), bookmarks, objects entering or leaving a selector's view as
//!   ADDED/DELETED;
//! - graceful deletion of bound pods, delete preconditions, a Node's Lease collected with it;
//! - the Node authorizer and NodeRestriction for `system:node:<name>` users, bearer tokens, and
//!   RBAC-lite rules a test grants ([`FakeApi::grant`]) to users it registers tokens for
//!   ([`FakeApi::add_user_token`]);
//! - what a kubelet delegates to its API server: TokenReviews and SubjectAccessReviews answered by
//!   the same authenticator and authorizer;
//! - `pods/log`, `exec`, `attach` and `portforward` served by calling the node's kubelet API on
//!   the address and port its Node reports, over TLS with the API server's kubelet client
//!   certificate, streamed (loopback addresses only: anything else is refused);
//! - `kubernetes.io/kubelet-serving` CSRs, left pending as 1.20 does until a test approves them as
//!   an operator would ([`FakeApi::approve_serving_csrs`]);
//! - errors as `metav1.Status` with the real reasons and messages.
//!
//! Simplifications, each legal server behaviour or outside what Lichen uses:
//! - `limit`/`continue` are ignored: a list returns everything, with no continue token; a list's
//!   `resourceVersion` parameter is ignored (lists are always current);
//! - `application/strategic-merge-patch+json` is applied as a JSON merge patch (lists are replaced,
//!   not merged by key); JSON patch and server-side apply answer `415`;
//! - `/status` writes change only `status` (the real server also takes labels and annotations);
//! - no finalizers; the garbage collector acts at once and only on owners of the kinds served (a
//!   Node's Lease goes with it, a pod owned by a ReplicaSet stays); admission is NodeRestriction,
//!   pod defaulting, DefaultTolerationSeconds and the ServiceAccount plugin's `kube-api-access-*`
//!   volume (a ServiceAccount need not exist, for pods or TokenRequests); every namespace exists
//!   and has its `kube-root-ca.crt`; tokens are JWT-shaped but unsigned (the fake knows the ones
//!   it issued); `dryRun` is refused with `400`;
//! - RBAC is the bootstrap policy's defaults plus [`FakeApi::grant`]'s rules (no Role objects); a
//!   denying SubjectAccessReview gets a reason where RBAC would give none;
//! - exec, attach and portforward without an `Upgrade` are proxied to the kubelet as plain
//!   requests (the real server answers them `400 Upgrade request required` itself), so a test
//!   sees the kubelet's own answer; upgrades are proxied and spliced;
//! - validation covers what a node writes (names, labels, pod status rules, events, leases), not
//!   every field of every kind.
//!
//! The server is plain HTTP on `127.0.0.1`; kube's rustls connector takes `http://` servers.
//! [`FakeApi::start_tls`] serves HTTPS instead, from a real CA that also signs node client CSRs
//! (approved by a stand-in for the controller-manager's approver, with 1.20's rules), and then
//! authenticates client certificates (`CN=system:node:<name>`, `O=system:nodes`) and bootstrap
//! tokens (`system:bootstrap:<id>`, group `system:bootstrappers`) as the real server does. Both
//! modes have the CA: it signs the kubelet client certificate the fake presents to kubelets
//! ([`FakeApi::ca_pem`] is what a kubelet verifies it with).
//!
//! ```no_run
//! # async fn demo() {
//! use lichen_tests::fakeapi::FakeApi;
//! let api = FakeApi::start().await;
//! let kubeconfig = api.node_kubeconfig("pi-07", std::path::Path::new("/tmp")).await;
//! // … start `lichen` with `kubeconfig`, then:
//! api.faults().fail_next(3, 500, Some("/status"));
//! api.faults().stop().await; // connection refused, watches dropped
//! api.faults().start().await; // the same port, the same objects
//! assert!(!api.requests().iter().any(|r| r.code == 403));
//! # }
//! ```

mod authn;
mod authz;
mod certs;
mod defaults;
mod errors;
mod handler;
mod kubelet;
mod review;
mod select;
mod store;
#[cfg(test)]
mod tests;
mod validate;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use authz::{Grant, User};
use errors::ApiError;
use handler::Outcome;
use store::Store;

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// One request the fake served.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    /// `GET`, `POST`, …
    pub method: String,
    /// Path and query, as sent (`/api/v1/pods?watch=true&…`).
    pub path: String,
    /// `system:node:<name>`, `kubernetes-admin`, or `system:anonymous`.
    pub user: String,
    /// The response status code (`200` for a watch, whatever it then streams).
    pub code: u16,
    /// The request body as text (empty for none).
    pub body: String,
    /// When the response was sent (for a watch: its headers and first events).
    pub at: std::time::Instant,
}

impl RequestRecord {
    /// The path without the query.
    pub fn path_only(&self) -> &str {
        self.path.split_once('?').map_or(self.path.as_str(), |(p, _)| p)
    }

    /// A decoded query parameter.
    pub fn query(&self, key: &str) -> Option<String> {
        let q = self.path.split_once('?')?.1;
        handler::query_pairs(q).into_iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The body as JSON, if it is JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_str(&self.body).ok()
    }

    /// Whether it is a write (anything but `GET`).
    pub fn is_write(&self) -> bool {
        self.method != "GET"
    }
}

#[derive(Default)]
struct FaultState {
    delay: Duration,
    /// How long every DELETE is held before it is answered.
    hold_deletes: Duration,
    /// DELETEs that began to be held.
    held_deletes: usize,
    /// (remaining, code, path substring)
    failures: Vec<(usize, u16, Option<String>)>,
    /// (remaining, path substring): node requests the Node authorizer refuses as if its graph had
    /// not yet caught up with a binding.
    graph_lag: Vec<(usize, String)>,
}

struct Running {
    cancel: CancellationToken,
    tracker: TaskTracker,
}

struct Inner {
    port: u16,
    store: Arc<Mutex<Store>>,
    tokens: Mutex<authn::Tokens>,
    grants: Mutex<Vec<Grant>>,
    requests: Mutex<Vec<RequestRecord>>,
    faults: Mutex<FaultState>,
    bookmark_every: Mutex<Duration>,
    running: tokio::sync::Mutex<Option<Running>>,
    admin_token: String,
    /// The CA: the kubelet client certificate, the CSR signer and, in TLS mode, the server's certificate.
    ca: certs::FakeCa,
    /// Whether the server speaks HTTPS.
    tls: bool,
    approver: Mutex<Approver>,
}

/// The stand-in for the controller-manager's CSR approver and signer (TLS mode only).
struct Approver {
    auto: bool,
    lifetime: Duration,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not take the server down with it.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The fake API server. Clones share one server.
#[derive(Clone)]
pub struct FakeApi {
    inner: Arc<Inner>,
    /// An admin client (the same as [`FakeApi::client`]), as `Cluster::client` in the cluster tier.
    pub client: kube::Client,
}

impl FakeApi {
    /// Starts a server on `127.0.0.1` and a free port, with an empty store.
    pub async fn start() -> FakeApi {
        Self::start_with(false).await
    }

    /// Starts a server in TLS mode (see the module docs): node client CSRs are approved and signed
    /// (valid one year unless [`FakeApi::set_cert_lifetime`] says otherwise).
    pub async fn start_tls() -> FakeApi {
        let api = Self::start_with(true).await;
        let weak = Arc::downgrade(&api.inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let Some(inner) = weak.upgrade() else { return };
                inner.approve_and_sign(false);
            }
        });
        api
    }

    async fn start_with(tls: bool) -> FakeApi {
        let listener = bind(0).expect("bind the fake API server to 127.0.0.1");
        let port = listener.local_addr().expect("local address").port();
        let inner = Arc::new(Inner {
            port,
            store: Arc::new(Mutex::new(Store::default())),
            tokens: Mutex::new(authn::Tokens::default()),
            grants: Mutex::new(Vec::new()),
            requests: Mutex::new(Vec::new()),
            faults: Mutex::new(FaultState::default()),
            bookmark_every: Mutex::new(Duration::from_secs(1)),
            running: tokio::sync::Mutex::new(None),
            admin_token: format!("admin-{}", store::uuid()),
            ca: certs::FakeCa::new(),
            tls,
            approver: Mutex::new(Approver { auto: true, lifetime: Duration::from_secs(365 * 86400) }),
        });
        lock(&inner.tokens).insert(inner.admin_token.clone(), User::Admin);
        *inner.running.lock().await = Some(serve(inner.clone(), listener));
        let client = client_for(&inner.kubeconfig_text("admin", &inner.admin_token)).await;
        FakeApi { inner, client }
    }

    /// An admin client.
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        self.inner.url()
    }

    /// Writes `dir/node.kubeconfig` for user `system:node:<name>` (group `system:nodes`), with a
    /// bearer token of its own.
    pub async fn node_kubeconfig(&self, name: &str, dir: &Path) -> PathBuf {
        let token = self.node_token(name);
        let out = dir.join("node.kubeconfig");
        std::fs::write(&out, self.inner.kubeconfig_text("node", &token)).expect("write kubeconfig");
        out
    }

    /// Writes `dir/admin.kubeconfig` for the admin user.
    pub fn admin_kubeconfig(&self, dir: &Path) -> PathBuf {
        let out = dir.join("admin.kubeconfig");
        std::fs::write(&out, self.inner.kubeconfig_text("admin", &self.inner.admin_token))
            .expect("write kubeconfig");
        out
    }

    /// The cluster CA certificate (PEM): what a TLS-mode server's certificate and the node client
    /// certificates chain to, and in either mode what signs the client certificate the fake
    /// presents to kubelets (`CN=kube-apiserver-kubelet-client`, `O=system:masters`) and the
    /// kubelet serving certificates it issues: a kubelet's client CA.
    pub fn ca_pem(&self) -> String {
        self.inner.ca.ca_pem.clone()
    }

    /// Registers a bearer token for `user` in `groups` (`system:authenticated` is added, as the
    /// authenticator does). It authenticates requests and TokenReviews (for the API server's own
    /// audience); what the user may do is what the authorizer gives its name and groups:
    /// everything in `system:masters`, the node rules for `system:node:<name>` in `system:nodes`,
    /// and whatever [`FakeApi::grant`] grants.
    pub fn add_user_token(&self, token: &str, user: &str, groups: &[&str]) {
        let mut groups: Vec<String> = groups.iter().map(|g| (*g).to_owned()).collect();
        if !groups.iter().any(|g| g == "system:authenticated") {
            groups.push("system:authenticated".to_owned());
        }
        lock(&self.inner.tokens).insert(token.to_owned(), User::from_info(user, &groups));
    }

    /// Grants `user` (a user name or a group) `verb` on `resource` (and `subresource`), cluster-wide
    /// and in every API group, like a ClusterRole with one rule and its ClusterRoleBinding. `*`
    /// matches any verb or resource; a `resource` starting with `/` is a non-resource URL (`/logs*`
    /// for a prefix); `subresource` `None` covers the resource itself only (`pods` does not cover
    /// `pods/log`), `Some("*")` every subresource. Requests and SubjectAccessReviews both see it.
    pub fn grant(&self, user: &str, verb: &str, resource: &str, subresource: Option<&str>) {
        lock(&self.inner.grants).push(Grant::new(user, verb, resource, subresource));
    }

    /// What an operator's `kubectl certificate approve` and the controller-manager's
    /// kubelet-serving signer do to the pending `kubernetes.io/kubelet-serving` CSRs (which 1.20
    /// never approves by itself): each one a node made for itself (`spec.username` is the
    /// request's CN, in `system:nodes`) is approved; the signer then issues a server-auth
    /// certificate with the request's DNS and IP SANs, valid for the lifetime
    /// [`FakeApi::set_cert_lifetime`] sets, or marks it `Failed` (`SignerValidationFailure`) if it
    /// breaks the signer's rules (subject `O=system:nodes`, `CN=system:node:…`, DNS or IP SANs
    /// and no email or URI ones, usages exactly digital signature, key encipherment, server auth).
    /// Requests for another node are left pending. Returns how many certificates were issued.
    pub fn approve_serving_csrs(&self) -> usize {
        self.inner.approve_and_sign(true)
    }

    /// A new bootstrap token `<id>.<secret>`, for user `system:bootstrap:<id>` in `system:bootstrappers`.
    pub fn bootstrap_token(&self) -> String {
        let hex = store::uuid().replace('-', "");
        let (id, secret) = (&hex[..6], &hex[6..22]);
        lock(&self.inner.tokens).insert(format!("{id}.{secret}"), User::Bootstrap(id.to_owned()));
        format!("{id}.{secret}")
    }

    /// Whether node client CSRs are approved and signed automatically (default true).
    pub fn set_auto_approve(&self, on: bool) {
        lock(&self.inner.approver).auto = on;
    }

    /// How long the certificates the signer issues are valid.
    pub fn set_cert_lifetime(&self, lifetime: Duration) {
        lock(&self.inner.approver).lifetime = lifetime;
    }

    /// A client acting as `system:node:<name>`.
    pub async fn node_client(&self, name: &str) -> kube::Client {
        let token = self.node_token(name);
        client_for(&self.inner.kubeconfig_text("node", &token)).await
    }

    fn node_token(&self, name: &str) -> String {
        let token = format!("node-{name}-{}", store::uuid());
        lock(&self.inner.tokens).insert(token.clone(), User::Node(name.to_owned()));
        token
    }

    /// Deletes a node (and, like the garbage collector, its Lease); a missing node is fine.
    pub async fn delete_node(&self, name: &str) {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let _ = nodes.delete(name, &DeleteParams::default()).await;
    }

    /// Every request served so far, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.inner.requests).clone()
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        lock(&self.inner.store).rv()
    }

    /// How often a watch that allows bookmarks gets one (default 1 s; a real server: about a minute).
    pub fn set_bookmark_interval(&self, every: Duration) {
        *lock(&self.inner.bookmark_every) = every.max(Duration::from_millis(10));
    }

    /// How many changes the watch history keeps (default 1000); a watch from before the oldest
    /// kept change gets `410 Gone`.
    pub fn set_history_limit(&self, changes: usize) {
        lock(&self.inner.store).history_limit = changes.max(1);
    }

    /// The fault-injection handle.
    pub fn faults(&self) -> Faults {
        Faults { inner: self.inner.clone() }
    }
}

/// Fault injection. Clones share the server; every method may be called from any task.
#[derive(Clone)]
pub struct Faults {
    inner: Arc<Inner>,
}

impl Faults {
    /// Takes the server down: the listener is closed and every open connection (watches included)
    /// is dropped, so clients see connection refused. The state is kept for [`Faults::start`].
    pub async fn stop(&self) {
        let running = self.inner.running.lock().await.take();
        if let Some(r) = running {
            r.cancel.cancel();
            r.tracker.close();
            r.tracker.wait().await;
        }
        lock(&self.inner.store).close_watches();
    }

    /// Brings a stopped server back on the same port, with the same objects and watch history
    /// (call [`Faults::compact`] as well for a server that lost its history). Does nothing if it runs.
    pub async fn start(&self) {
        let mut running = self.inner.running.lock().await;
        if running.is_none() {
            let listener = bind(self.inner.port).expect("rebind the fake API server's port");
            *running = Some(serve(self.inner.clone(), listener));
        }
    }

    /// Whether the server is up.
    pub async fn is_up(&self) -> bool {
        self.inner.running.lock().await.is_some()
    }

    /// The next `n` requests whose path and query contain `path_contains` (any request if `None`)
    /// fail with `code` and a `Status` of the matching reason.
    pub fn fail_next(&self, n: usize, code: u16, path_contains: Option<&str>) {
        lock(&self.inner.faults).failures.push((n, code, path_contains.map(str::to_owned)));
    }

    /// The next `n` requests by a node whose path contains `path_contains` are refused as the real
    /// Node authorizer refuses a node's read of a Secret or ConfigMap of a pod bound moments ago,
    /// before its graph has the pod: `403 Forbidden`, `… no relationship found between node '<node>'
    /// and this object`.
    pub fn lag_node_graph(&self, n: usize, path_contains: &str) {
        lock(&self.inner.faults).graph_lag.push((n, path_contains.to_owned()));
    }

    /// Delays every response by `delay` (zero turns it off).
    pub fn set_delay(&self, delay: Duration) {
        lock(&self.inner.faults).delay = delay;
    }

    /// Holds every DELETE for `hold` before answering it, as an overloaded API server might (zero
    /// turns it off; DELETEs already held stay held).
    pub fn hold_deletes(&self, hold: Duration) {
        lock(&self.inner.faults).hold_deletes = hold;
    }

    /// How many DELETEs began to be held by [`Faults::hold_deletes`].
    pub fn held_deletes(&self) -> usize {
        lock(&self.inner.faults).held_deletes
    }

    /// A write by some other client (a ConfigMap in `kube-system`), straight into the store, so it
    /// works while the server is down: a cluster's resourceVersion keeps moving while one node is
    /// cut off, and a watch resuming from before it is then older than a compacted history.
    pub fn write_elsewhere(&self) {
        let mut store = lock(&self.inner.store);
        if let Some(res) = store::resource("", "configmaps") {
            let cm = serde_json::json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"generateName": "other-writer-", "namespace": "kube-system"},
            });
            if let Err(e) = store.create(res, "kube-system", cm) {
                panic!("the fake's own write failed: {e:?}");
            }
        }
    }

    /// What the node-lifecycle controller does to the pods of a node that stays unreachable past
    /// their tolerations: a graceful delete (the pod gets a `deletionTimestamp` and waits for the
    /// node's final delete), straight into the store, so it works while the server is down for the
    /// node.
    pub fn evict(&self, namespace: &str, name: &str) {
        let mut store = lock(&self.inner.store);
        if let Some(res) = store::resource("", "pods") {
            let opts = store::DeleteOpts { grace: Some(30), uid: None, resource_version: None };
            if let Err(e) = store.delete(res, namespace, name, &opts) {
                panic!("evicting {namespace}/{name}: {e:?}");
            }
        }
    }

    /// Drops the watch history: a watch from any older resourceVersion gets `410 Gone`.
    pub fn compact(&self) {
        lock(&self.inner.store).compact();
    }

    /// Ends every open watch cleanly; clients must watch again.
    pub fn close_watches(&self) {
        lock(&self.inner.store).close_watches();
    }
}

impl Inner {
    fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The controller-manager's approver and signers, one pass: every pending kubelet client CSR
    /// the approver recognises is approved (if auto-approval is on); with `serving`, so is every
    /// pending kubelet-serving CSR a node made for itself, as an operator would. Then every
    /// approved CSR of the two kubelet signers is signed, or marked `Failed` by the serving
    /// signer. Returns how many serving certificates were issued.
    fn approve_and_sign(&self, serving: bool) -> usize {
        use base64::Engine;
        use serde_json::{Value, json};
        let ca = &self.ca;
        let (auto, lifetime) = {
            let a = lock(&self.approver);
            (a.auto, a.lifetime)
        };
        let Some(res) = store::resource("certificates.k8s.io", "certificatesigningrequests") else {
            return 0;
        };
        let mut store = lock(&self.store);
        let unsigned: Vec<Value> =
            store.all(res, None).filter(|c| c.pointer("/status/certificate").is_none()).cloned().collect();
        let mut issued = 0;
        for mut csr in unsigned {
            let name = csr.pointer("/metadata/name").and_then(|v| v.as_str()).unwrap_or_default().to_owned();
            let has = |csr: &Value, t: &str| {
                csr.pointer("/status/conditions")
                    .and_then(|v| v.as_array())
                    .is_some_and(|cs| cs.iter().any(|c| c["type"] == t))
            };
            if has(&csr, "Denied") || has(&csr, "Failed") {
                continue;
            }
            let signer =
                csr.pointer("/spec/signerName").and_then(Value::as_str).unwrap_or_default().to_owned();
            let is_serving = signer == certs::SERVING_SIGNER;
            if !is_serving && signer != "kubernetes.io/kube-apiserver-client-kubelet" {
                // No signer of the fake's handles it: it stays as it is.
                continue;
            }
            let approved = has(&csr, "Approved");
            if !approved {
                let approve = if is_serving {
                    let username = csr.pointer("/spec/username").and_then(Value::as_str).unwrap_or_default();
                    let in_nodes = csr
                        .pointer("/spec/groups")
                        .and_then(Value::as_array)
                        .is_some_and(|g| g.iter().any(|g| g == "system:nodes"));
                    serving
                        && in_nodes
                        && username.starts_with("system:node:")
                        && certs::request_cn(&csr).as_deref() == Some(username)
                } else {
                    // Unrecognised requests stay pending, as with the real approver.
                    auto && certs::recognise(&csr).is_ok()
                };
                if !approve {
                    continue;
                }
                let condition = if is_serving {
                    certs::kubectl_approved_condition()
                } else {
                    certs::approved_condition()
                };
                let mut conditions =
                    csr.pointer("/status/conditions").and_then(Value::as_array).cloned().unwrap_or_default();
                conditions.push(condition);
                csr["status"]["conditions"] = json!(conditions);
            }
            let b64 =
                |cert: String| -> Value { base64::engine::general_purpose::STANDARD.encode(cert).into() };
            if is_serving {
                match certs::validate_serving(&csr) {
                    Ok(pem) => {
                        if let Ok(cert) = ca.sign_serving(&pem, lifetime) {
                            csr["status"]["certificate"] = b64(cert);
                            issued += 1;
                        }
                    }
                    Err(why) => {
                        if let Some(cs) = csr["status"]["conditions"].as_array_mut() {
                            cs.push(certs::failed_condition(&why));
                        }
                    }
                }
            } else {
                let pem = csr
                    .pointer("/spec/request")
                    .and_then(|v| v.as_str())
                    .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                    .and_then(|b| String::from_utf8(b).ok())
                    .unwrap_or_default();
                if let Ok(cert) = ca.sign(&pem, lifetime) {
                    csr["status"]["certificate"] = b64(cert);
                }
            }
            if let Err(e) = store.update(res, "", &name, csr, store::Part::Status) {
                panic!("the fake signer's own write failed: {e:?}");
            }
        }
        issued
    }

    fn kubeconfig_text(&self, user: &str, token: &str) -> String {
        let ca = if self.tls {
            use base64::Engine;
            format!(
                "    certificate-authority-data: {}\n",
                base64::engine::general_purpose::STANDARD.encode(&self.ca.ca_pem)
            )
        } else {
            String::new()
        };
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n{ca}\
             users:\n- name: {user}\n  user:\n    token: {token}\n\
             contexts:\n- name: default\n  context: {{cluster: fake, user: {user}}}\ncurrent-context: default\n",
            self.url()
        )
    }

    /// The Node authorizer's refusal of `path` for `node`, if a [`Faults::lag_node_graph`] matches.
    fn take_graph_lag(&self, path: &str, user: Option<&User>) -> Option<ApiError> {
        let Some(User::Node(node)) = user else { return None };
        let mut f = lock(&self.faults);
        let i = f.graph_lag.iter().position(|(n, p)| *n > 0 && path.contains(p.as_str()))?;
        f.graph_lag[i].0 -= 1;
        f.graph_lag.retain(|(n, _)| *n > 0);
        Some(ApiError::node_graph_lag(node, path))
    }

    fn take_fault(&self, path: &str) -> Option<u16> {
        let mut f = lock(&self.faults);
        let i = f
            .failures
            .iter()
            .position(|(n, _, p)| *n > 0 && p.as_deref().is_none_or(|p| path.contains(p)))?;
        f.failures[i].0 -= 1;
        let code = f.failures[i].1;
        f.failures.retain(|(n, _, _)| *n > 0);
        Some(code)
    }
}

async fn client_for(kubeconfig: &str) -> kube::Client {
    let kc = kube::config::Kubeconfig::from_yaml(kubeconfig).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .expect("client config");
    kube::Client::try_from(config).expect("client")
}

/// A listener with SO_REUSEADDR, so a stopped server can take its port back at once.
fn bind(port: u16) -> std::io::Result<tokio::net::TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
    socket.listen(1024)
}

fn serve(inner: Arc<Inner>, listener: tokio::net::TcpListener) -> Running {
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let (c, t) = (cancel.clone(), tracker.clone());
    tracker.spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = c.cancelled() => break,
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
            };
            let (inner, c2) = (inner.clone(), c.clone());
            t.spawn(async move {
                let acceptor =
                    inner.tls.then(|| tokio_rustls::TlsAcceptor::from(inner.ca.server_config.clone()));
                match acceptor {
                    Some(acceptor) => {
                        // A handshake that fails (an expired or foreign client certificate) is
                        // what a real server does too: the client sees a TLS error.
                        let Ok(tls) = acceptor.accept(stream).await else { return };
                        let cert_user = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(|c| certs::user_of_cert(c.as_ref()));
                        serve_connection(inner, tls, cert_user, c2).await;
                    }
                    None => serve_connection(inner, stream, None, c2).await,
                }
            });
        }
    });
    Running { cancel, tracker }
}

/// Serves HTTP/1.1 on one connection; `cert_user` is who its client certificate says it is.
async fn serve_connection<S>(
    inner: Arc<Inner>,
    io: S,
    cert_user: Option<(User, i64)>,
    cancel: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let c = cancel.clone();
    let svc = hyper::service::service_fn(move |req| {
        let (inner, cert_user, c) = (inner.clone(), cert_user.clone(), c.clone());
        async move { Ok::<_, Infallible>(handle(inner, req, cert_user, c).await) }
    });
    // Upgrades: exec, attach and portforward splice a connection the kubelet upgraded.
    let conn =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(io), svc).with_upgrades();
    tokio::select! {
        _ = conn => {}
        _ = cancel.cancelled() => {}
    }
}

fn json_response(code: u16, body: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())).boxed_unsync());
    *r.status_mut() = hyper::StatusCode::from_u16(code).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    r
}

impl Inner {
    /// Who a bearer token authenticates as, for a request to this server.
    fn bearer_user(&self, token: &str) -> Option<User> {
        let found = lock(&self.tokens).find(token);
        if matches!(found, authn::Found::Unknown) {
            return None;
        }
        let audiences = [authn::API_AUDIENCE.to_owned()];
        authn::authenticate(found, &lock(&self.store), &audiences).ok().flatten().map(|id| id.user)
    }
}

async fn handle(
    inner: Arc<Inner>,
    mut req: Request<Incoming>,
    cert_user: Option<(User, i64)>,
    cancel: CancellationToken,
) -> Response<Body> {
    let delay = lock(&inner.faults).delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if req.method() == hyper::Method::DELETE {
        let hold = {
            let mut f = lock(&inner.faults);
            if !f.hold_deletes.is_zero() {
                f.held_deletes += 1;
            }
            f.hold_deletes
        };
        if !hold.is_zero() {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep(hold) => {}
            }
        }
    }
    let upgrade = hyper::upgrade::on(&mut req);
    let (parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let user = parts
        .headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(|t| inner.bearer_user(t));
    // As the real authenticator chain: a verified client certificate first, then bearer tokens.
    // An expired certificate authenticates nobody, even on a connection opened while it was valid.
    let now = jiff::Timestamp::now().as_second();
    let user = cert_user.filter(|(_, not_after)| now < *not_after).map(|(u, _)| u).or(user);
    let body = Limited::new(body, 3 * 1024 * 1024).collect().await.map(|b| b.to_bytes());
    let fault = inner.take_fault(&path);
    let lag = inner.take_graph_lag(&path, user.as_ref());
    let outcome = match (&body, &user, fault, lag) {
        (Err(_), _, _, _) => Err(ApiError::too_large()),
        (_, _, Some(code), _) => Err(ApiError::injected(code)),
        (_, _, _, Some(refusal)) => Err(refusal),
        (_, None, _, _) => Err(ApiError::unauthorized()),
        (Ok(bytes), Some(u), None, None) => {
            let (p, q) = path.split_once('?').unwrap_or((&path, ""));
            let content_type = parts
                .headers
                .get(hyper::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let server = format!("127.0.0.1:{}", inner.port);
            let grants = lock(&inner.grants).clone();
            let req = handler::Req {
                method: parts.method.as_str(),
                path: p,
                query: q,
                content_type,
                body: bytes,
                user: u,
                server: &server,
                tokens: &inner.tokens,
                grants: &grants,
            };
            handler::dispatch(&mut lock(&inner.store), &req)
        }
    };
    let (code, response) = match outcome {
        Ok(Outcome::Json(code, v)) => (code, json_response(code, &v)),
        Ok(Outcome::Text(code, text)) => {
            let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())).boxed_unsync());
            *r.status_mut() = hyper::StatusCode::from_u16(code).unwrap_or(hyper::StatusCode::OK);
            (code, r)
        }
        Ok(Outcome::Watch(plan)) => {
            let every = *lock(&inner.bookmark_every);
            let stream = plan.into_stream(inner.store.clone(), every);
            let chunks = futures::stream::unfold(stream, |mut s| async move {
                s.next().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), s))
            });
            let mut r = Response::new(StreamBody::new(chunks).boxed_unsync());
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            (200, r)
        }
        Ok(Outcome::Proxy(plan)) => {
            let fwd = kubelet::Forward {
                method: &parts.method,
                headers: &parts.headers,
                body: body.as_ref().map(Bytes::clone).unwrap_or_default(),
                upgrade,
            };
            match kubelet::proxy(*plan, inner.ca.kubelet_client.clone(), fwd, cancel).await {
                Ok(done) => done,
                Err(e) => (e.code, json_response(e.code, &e.status())),
            }
        }
        Err(e) => {
            let mut r = json_response(e.code, &e.status());
            if e.code == 429 {
                r.headers_mut()
                    .insert(hyper::header::RETRY_AFTER, hyper::header::HeaderValue::from_static("1"));
            }
            (e.code, r)
        }
    };
    let record = RequestRecord {
        method: parts.method.to_string(),
        path,
        user: user.map_or_else(|| "system:anonymous".to_owned(), |u| u.name()),
        code,
        body: body.map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default(),
        at: std::time::Instant::now(),
    };
    lock(&inner.requests).push(record);
    response
}
