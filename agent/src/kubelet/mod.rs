//! The kubelet API on `kubelet_api.port` (default 10250): what the API server calls for `kubectl
//! logs`, over TLS, for authenticated and authorized callers only.
//!
//! - `GET /containerLogs/{namespace}/{pod}/{container}` with `follow`, `tailLines`, `sinceSeconds`,
//!   `sinceTime`, `timestamps`, `previous` and `limitBytes`, streamed from the container's log files.
//! - `exec`, `attach`, `portForward` and `run` answer at once, with a `metav1.Status` (JSON, `405
//!   MethodNotAllowed`) whose message says that WebAssembly pods have nothing to exec into and what to
//!   use instead. kubectl decodes a refused upgrade's body as a Status on both its SPDY and
//!   WebSocket paths; plain text there shows the user `Error from server: ` and nothing more.
//! - `GET /metrics/resource` and `GET /stats/summary`: the node's and its running containers' CPU
//!   and memory, for metrics-server (`kubectl top`, autoscaling); see [`resources`].
//! - `GET /healthz`.
//!
//! The serving certificate is the configured pair, or one the cluster signs for a
//! `kubernetes.io/kubelet-serving` CSR (SANs: the node's addresses), renewed at 70-90% of its
//! lifetime; until one is issued the API is served with a self-signed certificate, as the kubelet
//! does when it is not told otherwise.

pub mod auth;
pub mod query;
pub mod resources;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::board::StatusBoard;
use crate::bootstrap::{CsrKind, pki};
use crate::cluster::ClusterClient;
use crate::config::AgentConfig;
use crate::logfmt::{self, LogError};
use crate::pod::logs;
use crate::store::StateStore;
use auth::{Attributes, Authorizer, Identity};

/// A response body: whole, or streamed (logs).
type Body = BoxBody<Bytes, Infallible>;

/// Errors that keep the kubelet API from starting. The agent runs on without it.
#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    /// A configured file cannot be read.
    #[error("kubelet_api: {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The configured serving certificate and key are unusable.
    #[error("kubelet_api: {path}: {source}")]
    Certificate {
        /// `kubelet_api.tls_cert_file`.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: TlsError,
    },
    /// TLS could not be set up.
    #[error("kubelet_api: TLS: {0}")]
    Tls(#[source] TlsError),
    /// The port is taken or not ours.
    #[error("kubelet_api: cannot listen on {address}: {source} (set kubelet_api.port, or 0 to turn it off)")]
    Listen {
        /// The address.
        address: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What keeps the kubelet API from serving TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate PEM does not parse.
    #[error("certificate: {0}")]
    CertificatePem(#[source] rustls::pki_types::pem::Error),
    /// The certificate PEM holds no certificate.
    #[error("no certificate in the PEM")]
    NoCertificate,
    /// The key PEM does not parse.
    #[error("private key: {0}")]
    KeyPem(#[source] rustls::pki_types::pem::Error),
    /// The certificate and key do not make a pair rustls can serve.
    #[error("certificate and key: {0}")]
    Pair(#[source] rustls::Error),
    /// The client CA file holds no certificate rustls accepts.
    #[error("the client CA holds no usable certificate")]
    NoClientCa,
    /// rustls refused the client verifier or the protocol versions.
    #[error("{0}")]
    Setup(#[source] rustls::Error),
    /// The client verifier could not be built.
    #[error("client verifier: {0}")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    /// The self-signed fallback could not be made.
    #[error("self-signed certificate: {0}")]
    SelfSigned(#[source] crate::bootstrap::BootstrapError),
}

/// What the kubelet API serves from.
pub struct KubeletApi {
    /// This node.
    pub node_name: String,
    /// Pods recorded on this node (to find their logs).
    pub store: Arc<dyn StateStore>,
    /// `<state_dir>/logs`.
    pub logs_dir: PathBuf,
    /// Newest pod statuses (whether a followed container still runs).
    pub board: Arc<StatusBoard>,
    /// The cluster client once connected (authentication, authorization, the serving CSR).
    pub client: watch::Receiver<Option<ClusterClient>>,
}

/// The certificate the server presents, swapped when a new one is issued.
#[derive(Debug)]
struct ServingCert(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().ok().map(|c| c.clone())
    }
}

fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(TlsError::CertificatePem)?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(TlsError::KeyPem)?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(chain, key, &provider).map_err(TlsError::Pair)
}

/// Where the serving certificates live: `<state_dir>/pki/kubelet-serving.{crt,key}` (issued) and
/// `kubelet-self-signed.{crt,key}` (the fallback, kept so its fingerprint survives restarts).
struct ServingFiles {
    dir: PathBuf,
}

impl ServingFiles {
    fn pair(&self, name: &str) -> (PathBuf, PathBuf) {
        (self.dir.join(format!("{name}.crt")), self.dir.join(format!("{name}.key")))
    }

    fn read(&self, name: &str) -> Option<(Vec<u8>, Vec<u8>)> {
        let (c, k) = self.pair(name);
        Some((std::fs::read(c).ok()?, std::fs::read(k).ok()?))
    }

    fn write(&self, name: &str, cert: &[u8], key: &[u8]) -> Result<(), crate::bootstrap::BootstrapError> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|source| crate::bootstrap::BootstrapError::File { path: self.dir.clone(), source })?;
        let (c, k) = self.pair(name);
        // The key first and private: a crash between the two leaves a key without a certificate,
        // which is simply made again.
        pki::write_private(&k, key, 0o600)?;
        pki::write_private(&c, cert, 0o644)
    }
}

/// The node's addresses for the certificate's SANs.
fn addresses(config: &AgentConfig) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(ip) = crate::host::node_ip_or_detected(config.node_ip.parse().ok()) {
        out.push(ip.to_string());
    }
    out.push(config.node_hostname.clone());
    out.push(config.node_name.clone());
    out
}

/// The PEM CA that client certificates must chain to: the configured file, else the kubeconfig's
/// cluster CA, else the CA a joining node trusts (`join.ca_cert`).
fn client_ca(config: &AgentConfig) -> Result<Option<Vec<u8>>, KubeletError> {
    let k = &config.kubelet_api;
    if !k.client_ca_file.as_os_str().is_empty() {
        return read_file(&k.client_ca_file).map(Some);
    }
    if let Some(pem) = config.cluster().and_then(|path| kubeconfig_ca(&path)) {
        return Ok(Some(pem));
    }
    // A board joining at first boot has no kubeconfig yet when the kubelet API starts; the CA it
    // joins with is the cluster's, and the API server's kubelet client certificate chains to it.
    // (Without this, every `kubectl logs` to a node that joined since its last start got 401.)
    if config.join.enabled() && !config.join.ca_cert.as_os_str().is_empty() {
        return read_file(&config.join.ca_cert).map(Some);
    }
    Ok(None)
}

/// Reads a file the kubelet API is configured with.
fn read_file(path: &Path) -> Result<Vec<u8>, KubeletError> {
    std::fs::read(path).map_err(|source| KubeletError::Read { path: path.to_owned(), source })
}

/// The cluster CA a kubeconfig names (embedded, or a file beside it).
fn kubeconfig_ca(path: &Path) -> Option<Vec<u8>> {
    let kc = kube::config::Kubeconfig::read_from(path).ok()?;
    let cluster = kc.clusters.first().and_then(|c| c.cluster.as_ref())?;
    if let Some(data) = &cluster.certificate_authority_data {
        use base64::Engine;
        return base64::engine::general_purpose::STANDARD.decode(data.trim()).ok();
    }
    let file = cluster.certificate_authority.as_ref()?;
    std::fs::read(path.parent().unwrap_or(Path::new(".")).join(file)).ok()
}

/// The kubelet API's socket and TLS set-up, ready to serve.
pub struct KubeletListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    /// Present when the serving certificate comes from the cluster and is renewed while serving.
    renewal: Option<(AgentConfig, Arc<ServingCert>)>,
}

/// Reads or makes the serving certificate, sets up client authentication and binds the port.
/// An error here leaves the node without `kubectl logs`, nothing more: the caller logs it.
pub async fn bind(config: &AgentConfig) -> Result<KubeletListener, KubeletError> {
    let k = &config.kubelet_api;
    let files = ServingFiles { dir: config.layout().pki() };
    let configured = !k.tls_cert_file.as_os_str().is_empty();
    let initial = if configured {
        let (cert, key) = (read_file(&k.tls_cert_file)?, read_file(&k.tls_private_key_file)?);
        certified_key(&cert, &key)
            .map_err(|source| KubeletError::Certificate { path: k.tls_cert_file.clone(), source })?
    } else {
        match files.read("kubelet-serving").and_then(|(c, k)| usable_issued(&c).then_some((c, k))) {
            Some((c, key)) => certified_key(&c, &key).map_err(KubeletError::Tls)?,
            None => self_signed(config, &files)?,
        }
    };
    let resolver = Arc::new(ServingCert(RwLock::new(Arc::new(initial))));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = match client_ca(config)? {
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&pem).flatten() {
                let _ = roots.add(c);
            }
            if roots.is_empty() {
                return Err(KubeletError::Tls(TlsError::NoClientCa));
            }
            // Certificates are optional at the TLS layer: bearer-token callers present none, and
            // a request with neither is refused with 401 by the handler, not by a failed handshake.
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(|e| KubeletError::Tls(TlsError::Verifier(e)))?
        }
        None => {
            tracing::warn!("kubelet API: no cluster CA known; only bearer tokens can authenticate");
            WebPkiClientVerifier::no_client_auth()
        }
    };
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| KubeletError::Tls(TlsError::Setup(e)))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver.clone());
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

    let ip: std::net::IpAddr = k.address.parse().unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
    let address = SocketAddr::new(ip, k.port);
    let tcp = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| KubeletError::Listen { address, source })?;
    tracing::info!(%address, "kubelet API listening (kubectl logs)");
    let renewal = (!configured && k.serving_csr).then(|| (config.clone(), resolver));
    Ok(KubeletListener { tcp, acceptor, renewal })
}

/// Serves the kubelet API on `listener` until `cancel`, then waits for its connections to end.
pub async fn run(listener: KubeletListener, api: KubeletApi, cancel: CancellationToken) {
    let KubeletListener { tcp: listener, acceptor, renewal } = listener;
    let tasks = tokio_util::task::TaskTracker::new();
    if let Some((config, resolver)) = renewal {
        tasks.spawn(keep_serving_certificate(config, api.client.clone(), resolver, cancel.child_token()));
    }
    let shared = Arc::new(Shared {
        authorizer: Authorizer::new(api.node_name.clone(), api.client.clone()),
        rates: resources::CpuRates::default(),
        api,
        cancel: cancel.clone(),
        tasks: tasks.clone(),
    });
    loop {
        let (tcp, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            c = listener.accept() => match c {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "kubelet API: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (acceptor, shared) = (acceptor.clone(), shared.clone());
        tasks.spawn(async move {
            let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "kubelet API: TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let cert_identity = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| pki::subject_of_der(c.as_ref()).ok())
                .map(|(user, groups)| Identity { user, groups });
            let cancel = shared.cancel.clone();
            let service = hyper::service::service_fn(move |req| {
                let (shared, id) = (shared.clone(), cert_identity.clone());
                async move { Ok::<_, Infallible>(handle(req, id, shared).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service);
            tokio::select! {
                _ = cancel.cancelled() => {}
                r = conn => if let Err(e) = r { tracing::debug!(%peer, error = %e, "kubelet API connection ended"); }
            }
        });
    }
    tasks.close();
    tasks.wait().await;
}

/// An issued certificate worth serving: readable and not yet due for renewal.
fn usable_issued(cert_pem: &[u8]) -> bool {
    pki::validity_of_pem(cert_pem).is_ok_and(|v| v.renew_at(0.8) > jiff::Timestamp::now())
}

fn self_signed(config: &AgentConfig, files: &ServingFiles) -> Result<CertifiedKey, KubeletError> {
    if let Some((c, k)) = files.read("kubelet-self-signed")
        && let Ok(key) = certified_key(&c, &k)
    {
        return Ok(key);
    }
    let (cert, key) = pki::self_signed_serving(&config.node_name, &addresses(config))
        .map_err(|e| KubeletError::Tls(TlsError::SelfSigned(e)))?;
    if let Err(e) = files.write("kubelet-self-signed", cert.as_bytes(), key.as_bytes()) {
        tracing::warn!(error = %e, "cannot keep the self-signed serving certificate; a new one is made at each start");
    }
    certified_key(cert.as_bytes(), key.as_bytes()).map_err(KubeletError::Tls)
}

/// Asks the cluster for a serving certificate and keeps one current: requested when there is none
/// (or it is due), renewed at a jittered 70-90% of its lifetime, swapped in without a restart.
async fn keep_serving_certificate(
    config: AgentConfig,
    mut client: watch::Receiver<Option<ClusterClient>>,
    resolver: Arc<ServingCert>,
    cancel: CancellationToken,
) {
    let files = ServingFiles { dir: config.layout().pki() };
    // Approval of serving CSRs is often by hand: wait long, then ask again.
    let approval_wait = Duration::from_secs(3600);
    loop {
        let renew_at = files
            .read("kubelet-serving")
            .and_then(|(c, _)| pki::validity_of_pem(&c).ok())
            .map(|v| v.renew_at(0.7 + 0.2 * fastrand::f64()));
        if let Some(at) = renew_at {
            let wait = at.duration_since(jiff::Timestamp::now()).unsigned_abs();
            if at > jiff::Timestamp::now() {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(wait.min(Duration::from_secs(24 * 3600))) => continue,
                }
            }
        }
        let c = loop {
            if let Some(c) = client.borrow_and_update().clone() {
                break c;
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = client.changed() => if r.is_err() { return },
            }
        };
        let outcome = async {
            let request = pki::new_serving_request(&config.node_name, &addresses(&config))?;
            let kind = CsrKind {
                prefix: format!("kubelet-serving-{}-", config.node_name),
                signer: pki::KUBELET_SERVING_SIGNER,
                usages: &pki::KUBELET_SERVING_USAGES,
                poll_every: Duration::from_secs(5),
            };
            crate::bootstrap::request_signed(&c.current(), request, kind, approval_wait, &cancel).await
        }
        .await;
        match outcome {
            Ok((key, cert)) => match certified_key(&cert, key.as_bytes()) {
                Ok(ck) => {
                    if let Err(e) = files.write("kubelet-serving", &cert, key.as_bytes()) {
                        tracing::warn!(error = %e, "cannot store the serving certificate; it is used until the agent stops");
                    }
                    if let Ok(mut current) = resolver.0.write() {
                        *current = Arc::new(ck);
                    }
                    tracing::info!("kubelet API now serves the certificate the cluster signed");
                    // Stored: the next round reads its renewal time from the file.
                    if files.read("kubelet-serving").is_none() {
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(24 * 3600)) => {}
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "the signed serving certificate is unusable"),
            },
            Err(crate::bootstrap::BootstrapError::Cancelled) => return,
            Err(e) => {
                tracing::warn!(error = %e, "no serving certificate from the cluster; serving the self-signed one and asking again later");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(600)) => {}
                }
            }
        }
    }
}

struct Shared {
    api: KubeletApi,
    authorizer: Authorizer,
    /// The previous `/stats/summary` reading, for CPU rates.
    rates: resources::CpuRates,
    cancel: CancellationToken,
    /// Connections and the log streams they follow; `run` waits for all of them.
    tasks: tokio_util::task::TaskTracker,
}

/// A route of the kubelet API.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Logs { namespace: String, pod: String, container: String },
    Unsupported { what: &'static str, namespace: String, pod: String },
    ResourceMetrics,
    StatsSummary,
    Healthz,
    NotFound,
}

fn route(path: &str) -> Route {
    // Namespaces, pods and containers are DNS labels: nothing in them is percent-encoded.
    let p: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let unsupported =
        |what, ns: &str, pod: &str| Route::Unsupported { what, namespace: ns.into(), pod: pod.into() };
    match p.as_slice() {
        ["containerLogs", ns, pod, container]
            if !ns.is_empty() && !pod.is_empty() && !container.is_empty() =>
        {
            Route::Logs { namespace: (*ns).into(), pod: (*pod).into(), container: (*container).into() }
        }
        ["exec", ns, pod, ..] => unsupported("exec", ns, pod),
        ["attach", ns, pod, ..] => unsupported("attach", ns, pod),
        ["portForward", ns, pod, ..] => unsupported("port-forward", ns, pod),
        ["run", ns, pod, ..] => unsupported("run", ns, pod),
        ["healthz"] | ["healthz", ""] => Route::Healthz,
        ["metrics", "resource"] | ["metrics", "resource", ""] => Route::ResourceMetrics,
        ["stats", "summary"] | ["stats", "summary", ""] => Route::StatsSummary,
        _ => Route::NotFound,
    }
}

fn text(code: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.into())).boxed());
    *r.status_mut() = code;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Why a streaming request cannot be served, and what to use instead.
fn unsupported_message(what: &str, namespace: &str, pod: &str) -> String {
    // `run` is the kubelet's run-a-command endpoint, not `kubectl run`.
    let action =
        if what == "run" { "running a command in a container".to_owned() } else { format!("kubectl {what}") };
    let lead = format!(
        "{action} is not supported on this Lichen node: pod {namespace}/{pod} runs as a WebAssembly (WASI) module in Wasmtime"
    );
    match what {
        "exec" | "run" => format!(
            "{lead}, with no shell or process to run a command in; use kubectl logs {pod} to see its output"
        ),
        "attach" => {
            format!("{lead}, with no terminal to attach to; use kubectl logs -f {pod} to follow its output")
        }
        _ => format!(
            "{lead}, and the node forwards no ports into it; use kubectl logs {pod} to see its output"
        ),
    }
}

/// The answer to `exec`, `attach`, `portForward` and `run`: a `metav1.Status`, which is what
/// kubectl decodes from a refused upgrade (the real kubelet answers plain text there, which kubectl
/// shows as an empty error). 405 `MethodNotAllowed` is apimachinery's answer for an action a
/// resource does not support. The connection closes after it: the API server splices a refused
/// upgrade's bytes straight to kubectl, which reads them until the end.
fn unsupported(what: &str, namespace: &str, pod: &str) -> Response<Body> {
    let status = serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": unsupported_message(what, namespace, pod),
        "reason": "MethodNotAllowed",
        "details": {"name": pod, "kind": "pods"},
        "code": 405,
    });
    let mut body = status.to_string();
    body.push('\n');
    let mut r = whole(body.into_bytes(), "application/json");
    *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    r.headers_mut().insert(hyper::header::CONNECTION, hyper::header::HeaderValue::from_static("close"));
    r
}

fn bearer(req: &Request<Incoming>) -> Option<String> {
    let value = req.headers().get(hyper::header::AUTHORIZATION)?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer "))?.trim();
    (!token.is_empty()).then(|| token.to_owned())
}

async fn handle(req: Request<Incoming>, cert: Option<Identity>, shared: Arc<Shared>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let route = route(&path);
    let kind = match &route {
        Route::Logs { .. } => "containerLogs",
        Route::Unsupported { what, .. } => what,
        Route::ResourceMetrics => "metrics/resource",
        Route::StatsSummary => "stats/summary",
        Route::Healthz => "healthz",
        Route::NotFound => "other",
    };
    let response = answer(req, cert, route, &shared).await;
    crate::metrics::global().kubelet_request(kind, response.status().as_u16());
    response
}

async fn answer(
    req: Request<Incoming>,
    cert: Option<Identity>,
    route: Route,
    shared: &Shared,
) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let who = match (cert, bearer(&req)) {
        (Some(id), _) => id,
        (None, Some(token)) => match shared.authorizer.authenticate_token(&token).await {
            Ok(Some(id)) => id,
            Ok(None) => return text(StatusCode::UNAUTHORIZED, "Unauthorized\n"),
            Err(e) => return text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
        },
        (None, None) => return text(StatusCode::UNAUTHORIZED, "Unauthorized\n"),
    };
    let attrs = Attributes::of(req.method(), &path);
    match shared.authorizer.authorize(&who, &attrs).await {
        Ok((true, _)) => {}
        Ok((false, reason)) => {
            tracing::info!(user = %who.user, verb = attrs.verb, subresource = attrs.subresource, %reason, "kubelet API: request refused");
            return text(
                StatusCode::FORBIDDEN,
                format!(
                    "Forbidden (user={}, verb={}, resource=nodes, subresource={})\n",
                    who.user, attrs.verb, attrs.subresource
                ),
            );
        }
        Err(e) => return text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    }
    match route {
        Route::Healthz => text(StatusCode::OK, "ok"),
        Route::NotFound => text(StatusCode::NOT_FOUND, format!("404 page not found: {path}\n")),
        Route::Unsupported { what, namespace, pod } => unsupported(what, &namespace, &pod),
        Route::Logs { namespace, pod, container } => {
            if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
                return text(StatusCode::METHOD_NOT_ALLOWED, "containerLogs takes GET\n");
            }
            logs_response(req.uri().query().unwrap_or(""), namespace, pod, container, shared).await
        }
        Route::ResourceMetrics | Route::StatsSummary
            if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD =>
        {
            text(StatusCode::METHOD_NOT_ALLOWED, format!("{path} takes GET\n"))
        }
        Route::ResourceMetrics => {
            let sample = resources::Sample::read(&shared.api.board);
            whole(resources::render_metrics(&sample).into_bytes(), resources::PROMETHEUS_TEXT)
        }
        Route::StatsSummary => {
            // Every figure the Summary has is CPU or memory, so `only_cpu_and_memory` (which
            // metrics-server 0.3 asks for) changes nothing.
            let sample = resources::Sample::read(&shared.api.board);
            let summary = resources::summary(&sample, &shared.api.node_name, &shared.rates);
            match serde_json::to_vec(&summary) {
                Ok(body) => whole(body, "application/json"),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
            }
        }
    }
}

/// A whole response of `content_type`, `200` unless the caller sets another status.
fn whole(body: Vec<u8>, content_type: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
    r.headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    r
}

async fn logs_response(
    query: &str,
    namespace: String,
    pod: String,
    container: String,
    shared: &Shared,
) -> Response<Body> {
    let opts = match query::log_options(query) {
        Ok(o) => o,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    let (store, dir) = (shared.api.store.clone(), shared.api.logs_dir.clone());
    let located = tokio::task::spawn_blocking(move || {
        logs::locate(store.as_ref(), &dir, &namespace, &pod, Some(&container))
    })
    .await;
    let located = match located {
        Ok(Ok(l)) => l,
        Ok(Err(e)) => {
            let code = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return text(code, format!("{e}\n"));
        }
        Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    };
    let probe =
        logs::running_probe(shared.api.board.clone(), located.pod_key.clone(), located.container.clone());
    // A few chunks in flight: a slow reader slows the file reader, never grows memory.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let cancel = shared.cancel.child_token();
    shared.tasks.spawn(async move {
        let result = logfmt::stream(located, opts, probe, tx, cancel).await;
        if let Err(e) = &result {
            tracing::debug!(error = %e, "kubelet API: log stream ended early");
        }
        let _ = done_tx.send(result);
    });
    // The status line waits briefly for the stream to start: a run that does not exist (no
    // previous run, a container not started yet) is an error status, not an empty 200. A follow
    // with nothing to send yet gets its headers after the wait.
    let error = |e: LogError| {
        let code = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        text(code, format!("{e}\n"))
    };
    let mut done_rx = done_rx;
    let first = tokio::select! {
        biased;
        chunk = rx.recv() => match chunk {
            Some(c) => Some(c),
            None => {
                if let Ok(Err(e)) = (&mut done_rx).await {
                    return error(e);
                }
                None
            }
        },
        done = &mut done_rx => {
            if let Ok(Err(e)) = done {
                return error(e);
            }
            rx.recv().await
        }
        _ = tokio::time::sleep(Duration::from_millis(250)) => None,
    };
    let rest = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|chunk| (chunk, rx)) });
    let stream = futures::stream::iter(first)
        .chain(rest)
        .map(|chunk| Ok::<_, Infallible>(Frame::data(Bytes::from(chunk))));
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    r.headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/plain"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_still_joining_trusts_the_join_ca_for_client_certificates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n").expect("ca");
        let text = format!(
            "node_name = \"pi\"\nstate_dir = {:?}\n[join]\nserver = \"https://10.0.0.1:6443\"\nca_cert = {:?}\n",
            dir.path().join("state").display().to_string(),
            ca.display().to_string()
        );
        let mut config = AgentConfig::from_toml(&text, &dir.path().join("c.toml")).expect("config");
        config.finish().expect("valid");
        assert!(!config.layout().node_kubeconfig().exists(), "not joined yet");
        let pem = client_ca(&config).expect("readable").expect("the join CA");
        assert_eq!(pem, std::fs::read(&ca).expect("ca"));
        // Standalone: no CA at all.
        let mut standalone =
            AgentConfig::from_toml("node_name = \"pi\"", &dir.path().join("c.toml")).expect("config");
        standalone.finish().expect("valid");
        assert_eq!(client_ca(&standalone).expect("no error"), None);
    }

    #[test]
    fn routes_cover_the_kubelet_paths() {
        assert_eq!(
            route("/containerLogs/default/web/app"),
            Route::Logs { namespace: "default".into(), pod: "web".into(), container: "app".into() }
        );
        assert!(matches!(route("/exec/default/web/app"), Route::Unsupported { what: "exec", .. }));
        assert!(matches!(route("/exec/default/web/uid/app"), Route::Unsupported { what: "exec", .. }));
        assert!(matches!(route("/portForward/default/web"), Route::Unsupported { what: "port-forward", .. }));
        assert!(matches!(route("/attach/default/web/app"), Route::Unsupported { what: "attach", .. }));
        assert_eq!(route("/healthz"), Route::Healthz);
        assert_eq!(route("/metrics/resource"), Route::ResourceMetrics);
        assert_eq!(route("/stats/summary"), Route::StatsSummary);
        assert_eq!(route("/stats/summary/"), Route::StatsSummary);
        assert_eq!(route("/metrics/cadvisor"), Route::NotFound);
        assert_eq!(route("/containerLogs/default/web"), Route::NotFound);
        assert_eq!(route("/containerLogs//web/app"), Route::NotFound);
        assert_eq!(route("/pods"), Route::NotFound);
    }

    #[test]
    fn unsupported_streaming_answers_a_status_kubectl_decodes() {
        for (what, hint) in [
            ("exec", "kubectl logs web"),
            ("attach", "kubectl logs -f web"),
            ("port-forward", "kubectl logs web"),
        ] {
            let r = unsupported(what, "default", "web");
            assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
            assert_eq!(r.headers()[hyper::header::CONTENT_TYPE], "application/json");
            let message = unsupported_message(what, "default", "web");
            assert!(message.contains(&format!("kubectl {what} is not supported")), "{message}");
            assert!(message.contains("WebAssembly (WASI)") && message.contains(hint), "{message}");
        }
        let run = unsupported_message("run", "default", "web");
        assert!(run.starts_with("running a command in a container is not supported"), "{run}");
    }

    #[test]
    fn self_signed_serving_certificates_name_the_node() {
        let (cert, key) =
            pki::self_signed_serving("pi-7", &["127.0.0.1".into(), "pi-7".into()]).expect("cert");
        certified_key(cert.as_bytes(), key.as_bytes()).expect("usable by rustls");
        let der = CertificateDer::from_pem_slice(cert.as_bytes()).expect("pem");
        let (cn, _) = pki::subject_of_der(der.as_ref()).expect("subject");
        assert_eq!(cn, "system:node:pi-7");
    }
}
