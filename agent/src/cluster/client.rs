//! The one kube client builder: from a kubeconfig file or a parsed kubeconfig, with the agent's own
//! HTTP transport and the API metrics layer. Every room that talks to the API server (the node,
//! pods, bootstrap, rotation, the kubelet API's reviews) gets its client here.
//!
//! The transport is built here rather than by kube's default builder because a board on a metered
//! link pays for every TLS handshake (several KB with a client certificate) and every uncompressed
//! header. kube's default speaks HTTP/1.1 only and bounds every read with one timeout, so an idle
//! watch (no events for 30 s) was cut and re-established about twice a minute, each time on a new
//! connection. Here:
//! - HTTP/2 is offered through ALPN (HTTP/1.1 stays the fallback): reads, lists and every watch
//!   share one long-lived connection, with headers compressed (HPACK).
//! - No read timeout on the connection: a watch stays open until the server ends it (its
//!   `timeoutSeconds`), and is resumed from its resourceVersion on the same connection.
//! - A dead link is found by HTTP/2 PINGs after [`KEEPALIVE_INTERVAL`] without a frame, answered
//!   within [`KEEPALIVE_TIMEOUT`] (and, on HTTP/1.1, by TCP keep-alive probes); the heartbeat's own
//!   traffic every 10 s means a healthy link never PINGs on the lean connection.
//! - A request that is not a watch must answer within [`REQUEST_TIMEOUT`], so a silent server
//!   cannot hang a heartbeat for minutes.
//! - Writes whose answer is not needed (the Lease renewal, node and pod status) go on a second
//!   long-lived connection whose streams get no receive window, so the object the server sends
//!   back never crosses the link ([`LeanWrite`], [`super::lean`]).
//!
//! kube's own retry layer (429, 503 and 504 tried again inside one call) is not part of this stack:
//! every caller already retries with its own back-off (the heartbeat, the pod watch, the status
//! writer, the inputs pass), and a retry hidden inside a call would stretch a heartbeat round past
//! its 10 s.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use kube::Client;
use kube::client::ConfigExt;
use kube::config::KubeconfigError;
use tower::ServiceBuilder;

/// How long a TCP connection (and its TLS handshake) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request other than a watch may wait for its response's head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Silence on the connection after which an HTTP/2 PING is sent (and TCP keep-alive starts).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a PING may go unanswered before the connection is closed and its requests fail.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection no request has taken stays in the pool. hyper counts from the last
/// request that took it, even while a stream on it (a watch) is open. The heartbeat takes the lean
/// connection every 10 s; on the full one, an idle node's only request is the pod watch, started
/// again when the server ends it (kube's default `timeoutSeconds`, 290 s): longer than that, so
/// the restart finds the connection in the pool instead of opening a new one.
const POOL_IDLE: Duration = Duration::from_secs(600);

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The kubeconfig file could not be read or used.
    #[error("kubeconfig {}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: Box<ClientError>,
    },
    /// The kubeconfig could not be parsed or resolved.
    #[error("{0}")]
    Kubeconfig(#[source] KubeconfigError),
    /// Neither `$KUBECONFIG`, `~/.kube/config` nor an in-cluster service account gave a config.
    #[error("no kubeconfig found (give --kubeconfig, or set KUBECONFIG): {0}")]
    Infer(#[source] kube::config::InferConfigError),
    /// The HTTP client could not be built from it (TLS material, headers, credentials).
    #[error("{0}")]
    Build(#[source] kube::Error),
    /// The TLS server name given in the kubeconfig is not a valid name.
    #[error("tls-server-name {0:?} is not a valid server name")]
    ServerName(String),
    /// The kubeconfig names an HTTP proxy, which the agent does not use.
    #[error("proxy-url {0} is not supported: the agent connects to the API server directly")]
    Proxy(String),
}

/// A client from a kubeconfig file (rustls, ring; no OpenSSL).
pub async fn connect(kubeconfig: &Path) -> Result<Client, ClientError> {
    let in_file = |source| ClientError::File { path: kubeconfig.to_owned(), source: Box::new(source) };
    let kc =
        kube::config::Kubeconfig::read_from(kubeconfig).map_err(|e| in_file(ClientError::Kubeconfig(e)))?;
    client_for(kc).await.map_err(in_file)
}

/// A client from kube's config inference, as kubectl finds its config: `$KUBECONFIG`, else
/// `~/.kube/config`, else the in-cluster service account. For operator commands (`lichen fleet`),
/// never for the agent, whose kubeconfig is its config's.
pub async fn infer() -> Result<Client, ClientError> {
    let config = kube::Config::infer().await.map_err(ClientError::Infer)?;
    build(&config)
}

/// A client for a parsed kubeconfig, on the agent's transport (see the module's notes).
pub async fn client_for(kc: kube::config::Kubeconfig) -> Result<Client, ClientError> {
    let config = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .map_err(ClientError::Kubeconfig)?;
    build(&config)
}

/// The transport and kube's request layers (base URI, credentials, extra headers), the request
/// timeout and the API metrics.
fn build(config: &kube::Config) -> Result<Client, ClientError> {
    if let Some(proxy) = &config.proxy_url {
        return Err(ClientError::Proxy(proxy.to_string()));
    }
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_connect_timeout(Some(CONNECT_TIMEOUT));
    tcp.set_nodelay(true);
    // HTTP/1.1's only way to notice a dead peer while a watch waits: kernel probes after the same
    // silence as the PINGs, three of them 10 s apart.
    tcp.set_keepalive(Some(KEEPALIVE_INTERVAL));
    tcp.set_keepalive_interval(Some(KEEPALIVE_TIMEOUT));
    tcp.set_keepalive_retries(Some(3));

    let tls = config.rustls_client_config().map_err(ClientError::Build)?;
    let mut https = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http();
    if let Some(name) = &config.tls_server_name {
        let server_name = rustls_pki_types::ServerName::try_from(name.clone())
            .map_err(|_| ClientError::ServerName(name.clone()))?;
        https = https.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(server_name));
    }
    let https = https.enable_http1().enable_http2().wrap_connector(tcp);

    let transport = |stream_window: Option<u32>| {
        hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE)
            .http2_keep_alive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .http2_keep_alive_while_idle(true)
            .http2_initial_stream_window_size(stream_window)
            .build::<_, kube::client::Body>(https.clone())
    };
    // The lean connection's streams get no flow-control window: the server can send a write's
    // response head (HEADERS are not flow-controlled) but not its body, which `lean` then cancels
    // unread. A Lease renewal's answer is 532 of its 662 bytes down, 8,640 times a day.
    let transport = Route { full: transport(None), lean: transport(Some(0)) };

    let auth = config.auth_layer().map_err(ClientError::Build)?;
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(auth)
        .layer(config.extra_headers_layer().map_err(ClientError::Build)?)
        .layer(RequestTimeoutLayer)
        .map_err(tower::BoxError::from)
        .service(transport);
    // Every request is counted and timed for /metrics (lichen_api_request_*).
    Ok(kube::client::ClientBuilder::new(service, config.default_namespace.clone())
        .with_layer(&crate::metrics::ApiMetricsLayer)
        .build())
}

/// Marks a request for the lean connection (a request extension): a write whose answer the
/// caller drops unread when it succeeded ([`super::lean`]).
#[derive(Clone, Copy, Debug)]
pub struct LeanWrite;

/// Sends requests marked [`LeanWrite`] on the lean transport (a connection of its own whose HTTP/2
/// streams have a zero receive window), everything else on the full one. Each pool normally holds
/// one HTTP/2 connection (requests racing at start, before ALPN has answered, can open a second,
/// which closes once unused).
#[derive(Clone)]
struct Route<T> {
    full: T,
    lean: T,
}

impl<T, B> tower::Service<hyper::Request<B>> for Route<T>
where
    T: tower::Service<hyper::Request<B>>,
{
    type Response = T::Response;
    type Error = T::Error;
    type Future = T::Future;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        // Both must be ready: which one a request takes is known only in `call`. hyper's client
        // pools are always ready (they queue for a connection inside the call).
        match self.full.poll_ready(cx) {
            std::task::Poll::Ready(Ok(())) => self.lean.poll_ready(cx),
            other => other,
        }
    }

    fn call(&mut self, req: hyper::Request<B>) -> Self::Future {
        if req.extensions().get::<LeanWrite>().is_some() { self.lean.call(req) } else { self.full.call(req) }
    }
}

/// A request other than a watch that got no response head within [`REQUEST_TIMEOUT`].
#[derive(Debug, thiserror::Error)]
#[error("no response from the API server within {}s", REQUEST_TIMEOUT.as_secs())]
pub struct RequestTimedOut;

/// Bounds every request but watches by [`REQUEST_TIMEOUT`] (a watch's wait is its purpose; a dead
/// link under it is found by the keep-alives).
#[derive(Clone, Copy, Default)]
struct RequestTimeoutLayer;

impl<S> tower::Layer<S> for RequestTimeoutLayer {
    type Service = RequestTimeout<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestTimeout { inner }
    }
}

#[derive(Clone)]
struct RequestTimeout<S> {
    inner: S,
}

impl<S, B> tower::Service<hyper::Request<B>> for RequestTimeout<S>
where
    S: tower::Service<hyper::Request<B>>,
    S::Error: Into<tower::BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = tower::BoxError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, tower::BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: hyper::Request<B>) -> Self::Future {
        let watch = crate::metrics::is_watch(req.uri());
        let future = self.inner.call(req);
        Box::pin(async move {
            if watch {
                return future.await.map_err(Into::into);
            }
            match tokio::time::timeout(REQUEST_TIMEOUT, future).await {
                Ok(result) => result.map_err(Into::into),
                Err(_) => Err(Box::new(RequestTimedOut) as tower::BoxError),
            }
        })
    }
}
