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
//! - While a pool has no connection that has answered, its requests go one at a time
//!   ([`OneConnect`]): requests racing at start or after the API server went away would each open
//!   a connection of their own before ALPN has said that one HTTP/2 connection carries them all.
//! - Writes whose answer is not needed (the Lease renewal, node and pod status) go on a second
//!   long-lived connection whose streams get no receive window, so the object the server sends
//!   back never crosses the link ([`LeanWrite`], [`super::lean`]).
//!
//! kube's own retry layer (429, 503 and 504 tried again inside one call) is not part of this stack:
//! every caller already retries with its own back-off (the heartbeat, the pod watch, the status
//! writer, the inputs pass), and a retry hidden inside a call would stretch a heartbeat round past
//! its 10 s.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
        let gate = Arc::new(Gate::default());
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE)
            .http2_keep_alive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .http2_keep_alive_while_idle(true)
            .http2_initial_stream_window_size(stream_window)
            .build::<_, kube::client::Body>(Counting { inner: https.clone(), gate: gate.clone() });
        OneConnect { inner: client, gate }
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
/// streams have a zero receive window), everything else on the full one. Each pool holds one
/// HTTP/2 connection ([`OneConnect`]).
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

/// One pool's open connections, and the gate in front of it ([`OneConnect`]).
#[derive(Default)]
struct Gate {
    /// The pool's connections still open ([`Counting`]).
    live: AtomicUsize,
    /// Whether a request had its answer since the pool last had no connection (or a request
    /// failed).
    answered: AtomicBool,
    /// Held by the one request in flight while the gate is closed.
    turn: tokio::sync::Mutex<()>,
}

impl Gate {
    /// Whether requests may go at once: the pool holds a connection that has answered.
    fn is_open(&self) -> bool {
        self.answered.load(Ordering::Acquire) && self.live.load(Ordering::Acquire) > 0
    }

    fn connection_opened(&self) {
        self.live.fetch_add(1, Ordering::AcqRel);
    }

    fn connection_closed(&self) {
        if self.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.answered.store(false, Ordering::Release);
        }
    }
}

/// Lets a pool's requests through one at a time while it has no connection that has answered
/// ([`Gate`]), and all at once otherwise.
///
/// hyper's pool can only know that a connection speaks HTTP/2, and so can carry every request,
/// once ALPN has answered in the TLS handshake. Until then each request that finds no connection
/// opens one of its own: on a new client, 8 reads and 8 writes at once opened 16 connections (a TLS
/// handshake with the client certificate is several KB on a metered link), which hyper then closed
/// as they went unused. At start the node's registration, the pod watch, the Lease and the first
/// status writes race like that, and so do the retries after the API server went away. The cost is
/// one round trip for the requests behind the first one, once per connection.
#[derive(Clone)]
struct OneConnect<T> {
    inner: T,
    gate: Arc<Gate>,
}

impl<T, B> tower::Service<hyper::Request<B>> for OneConnect<T>
where
    T: tower::Service<hyper::Request<B>> + Clone + Send + 'static,
    T::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = T::Response;
    type Error = T::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T::Response, T::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: hyper::Request<B>) -> Self::Future {
        let gate = self.gate.clone();
        // The service that was polled ready takes the request, in the future (tower's idiom).
        let fresh = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, fresh);
        Box::pin(async move {
            let turn = if gate.is_open() { None } else { Some(gate.turn.lock().await) };
            // Whoever had the turn before may have opened the gate meanwhile.
            let alone = turn.filter(|_| !gate.is_open());
            let result = inner.call(req).await;
            if result.is_err() {
                gate.answered.store(false, Ordering::Release);
            } else if alone.is_some() {
                gate.answered.store(true, Ordering::Release);
            }
            result
        })
    }
}

/// The connector under a pool: counts the connections it made that are still open, for [`Gate`].
#[derive(Clone)]
struct Counting<C> {
    inner: C,
    gate: Arc<Gate>,
}

impl<C> tower::Service<hyper::Uri> for Counting<C>
where
    C: tower::Service<hyper::Uri>,
    C::Future: Send + 'static,
    C::Response: Send + 'static,
{
    type Response = Counted<C::Response>;
    type Error = C::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, C::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: hyper::Uri) -> Self::Future {
        let (connecting, gate) = (self.inner.call(uri), self.gate.clone());
        Box::pin(async move {
            let io = connecting.await?;
            gate.connection_opened();
            Ok(Counted { io, gate })
        })
    }
}

/// A connection [`Counting`] counts until it is dropped.
struct Counted<T> {
    io: T,
    gate: Arc<Gate>,
}

impl<T> Drop for Counted<T> {
    fn drop(&mut self) {
        self.gate.connection_closed();
    }
}

impl<T: hyper_util::client::legacy::connect::Connection> hyper_util::client::legacy::connect::Connection
    for Counted<T>
{
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        self.io.connected()
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for Counted<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for Counted<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tower::Service;

    /// A pool as the gate sees it: requests in flight, answered when the test says, `Ok` or not.
    #[derive(Clone, Default)]
    struct Pool(Arc<Mutex<PoolState>>, Arc<tokio::sync::Notify>);

    #[derive(Default)]
    struct PoolState {
        in_flight: usize,
        most_in_flight: usize,
        answered: usize,
        /// What the requests waiting now get.
        answer: Option<bool>,
    }

    impl tower::Service<hyper::Request<()>> for Pool {
        type Response = ();
        type Error = &'static str;
        type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), &'static str>> + Send>>;

        fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: hyper::Request<()>) -> Self::Future {
            let (state, wake) = (self.0.clone(), self.1.clone());
            Box::pin(async move {
                {
                    let mut s = state.lock().unwrap();
                    s.in_flight += 1;
                    s.most_in_flight = s.most_in_flight.max(s.in_flight);
                }
                loop {
                    let notified = wake.notified();
                    let answer = state.lock().unwrap().answer;
                    if let Some(ok) = answer {
                        let mut s = state.lock().unwrap();
                        s.in_flight -= 1;
                        s.answered += 1;
                        return if ok { Ok(()) } else { Err("connection reset") };
                    }
                    notified.await;
                }
            })
        }
    }

    impl Pool {
        fn answer(&self, ok: Option<bool>) {
            self.0.lock().unwrap().answer = ok;
            self.1.notify_waiters();
        }
        fn get(&self, f: impl Fn(&PoolState) -> usize) -> usize {
            f(&self.0.lock().unwrap())
        }
    }

    /// Lets every task that can run do so (the runtime has one thread).
    async fn settle() {
        for _ in 0..64 {
            tokio::task::yield_now().await;
        }
    }

    fn burst(service: &OneConnect<Pool>, n: usize) {
        for _ in 0..n {
            let mut s = service.clone();
            tokio::spawn(async move { s.call(hyper::Request::new(())).await });
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn one_request_at_a_time_until_a_connection_has_answered_then_all_at_once() {
        let pool = Pool::default();
        let service = OneConnect { inner: pool.clone(), gate: Arc::new(Gate::default()) };

        // No connection yet: one request goes, the others wait for its answer.
        burst(&service, 5);
        settle().await;
        assert_eq!(pool.get(|s| s.in_flight), 1, "one request while the pool has no connection");
        // It connected (the connector counts it) and was answered: the rest go at once.
        service.gate.connection_opened();
        pool.answer(Some(true));
        settle().await;
        assert_eq!(pool.get(|s| s.answered), 5);
        assert_eq!(pool.get(|s| s.most_in_flight), 1, "the others went one by one or after the answer");

        // With a connection that has answered, a burst goes at once.
        pool.answer(None);
        burst(&service, 5);
        settle().await;
        assert_eq!(pool.get(|s| s.in_flight), 5, "all at once on a working connection");
        pool.answer(Some(true));
        settle().await;

        // The connection closed (the API server went away): one at a time again.
        service.gate.connection_closed();
        pool.answer(None);
        burst(&service, 3);
        settle().await;
        assert_eq!(pool.get(|s| s.in_flight), 1, "one request after the connection closed");
        service.gate.connection_opened();
        pool.answer(Some(true));
        settle().await;
        assert_eq!(pool.get(|s| s.answered), 13);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_failed_request_closes_the_gate_until_one_is_answered() {
        let pool = Pool::default();
        let service = OneConnect { inner: pool.clone(), gate: Arc::new(Gate::default()) };
        service.gate.connection_opened();
        service.gate.answered.store(true, Ordering::Release);

        // A request fails on the open connection (reset): the gate closes.
        burst(&service, 1);
        settle().await;
        pool.answer(Some(false));
        settle().await;
        assert!(!service.gate.is_open(), "a failure closes the gate");

        // The next burst goes one at a time until a request is answered again.
        pool.answer(None);
        burst(&service, 4);
        settle().await;
        assert_eq!(pool.get(|s| s.in_flight), 1);
        pool.answer(Some(true));
        settle().await;
        assert_eq!(pool.get(|s| s.answered), 5);
        assert!(service.gate.is_open(), "an answer opens it again");
    }
}
