//! Prometheus metrics and the health check, served on `metrics.address` (default 127.0.0.1:10248,
//! the kubelet's healthz port): `GET /metrics` in the Prometheus text format, `GET /healthz`.
//!
//! Counters live in one process-wide [`Metrics`] that the pod workers, the module puller and the
//! API client bump as things happen. Gauges (pods by phase, the status outbox, the MQTT spool,
//! memory per pod) are read from their owners at scrape time, so they can never go stale or leak
//! series for pods that are gone.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::cluster::ApiContact;
use crate::pod::board::StatusBoard;
use crate::runtime::WasmRuntime;
use crate::store::StateStore;
use crate::telemetry::bridge::MqttBridge;

/// Label set of a metric with labels.
type Labels = Vec<(&'static str, String)>;

/// Counters and histograms bumped where things happen.
pub struct Metrics {
    module_starts: Counter,
    restarts: Counter,
    fuel_consumed: Counter,
    out_of_fuel: Counter,
    pulls: Family<Labels, Histogram, fn() -> Histogram>,
    api_requests: Family<Labels, Counter>,
    api_errors: Family<Labels, Counter>,
    api_latency: Family<Labels, Histogram, fn() -> Histogram>,
    kubelet_requests: Family<Labels, Counter>,
    /// Unix seconds of the last renewed Lease (0: never).
    last_heartbeat: AtomicI64,
    /// Live linear-memory size of every running container, by pod key and container.
    memory: Mutex<HashMap<(String, String), Arc<AtomicU64>>>,
}

fn pull_histogram() -> Histogram {
    // 50 ms .. ~100 s: a small module from a LAN registry to a large one over a slow uplink.
    Histogram::new(exponential_buckets(0.05, 2.0, 12))
}

fn api_histogram() -> Histogram {
    // 5 ms .. ~20 s; watches are long polls and are not timed (see `ApiMetricsLayer`).
    Histogram::new(exponential_buckets(0.005, 2.0, 13))
}

/// The process-wide metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| Metrics {
        module_starts: Counter::default(),
        restarts: Counter::default(),
        fuel_consumed: Counter::default(),
        out_of_fuel: Counter::default(),
        pulls: Family::new_with_constructor(pull_histogram as fn() -> Histogram),
        api_requests: Family::default(),
        api_errors: Family::default(),
        api_latency: Family::new_with_constructor(api_histogram as fn() -> Histogram),
        kubelet_requests: Family::default(),
        last_heartbeat: AtomicI64::new(0),
        memory: Mutex::new(HashMap::new()),
    })
}

impl Metrics {
    /// A container run began (`restart`: it is not the container's first).
    pub fn container_started(&self, restart: bool) {
        self.module_starts.inc();
        if restart {
            self.restarts.inc();
        }
    }

    /// A container run ended, having used `fuel` units; `out_of_fuel` if that ended it.
    pub fn container_ended(&self, fuel: u64, out_of_fuel: bool) {
        self.fuel_consumed.inc_by(fuel);
        if out_of_fuel {
            self.out_of_fuel.inc();
        }
    }

    /// A pull finished after `elapsed`, `ok` or not.
    pub fn pull_finished(&self, elapsed: Duration, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.pulls.get_or_create(&vec![("result", result.to_owned())]).observe(elapsed.as_secs_f64());
    }

    /// An API request finished: `verb` (HTTP method), `code` (0: no response), after `elapsed`.
    pub fn api_request(&self, verb: &str, code: u16, elapsed: Option<Duration>) {
        let code_label = if code == 0 { "none".to_owned() } else { code.to_string() };
        let labels = vec![("verb", verb.to_owned()), ("code", code_label)];
        self.api_requests.get_or_create(&labels).inc();
        if code == 0 || code >= 500 || code == 429 {
            self.api_errors.get_or_create(&vec![("verb", verb.to_owned())]).inc();
        }
        if let Some(e) = elapsed {
            self.api_latency.get_or_create(&vec![("verb", verb.to_owned())]).observe(e.as_secs_f64());
        }
    }

    /// The kubelet API answered a request on `path_kind` (`containerLogs`, `exec`, …) with `code`.
    pub fn kubelet_request(&self, path_kind: &str, code: u16) {
        let labels = vec![("path", path_kind.to_owned()), ("code", code.to_string())];
        self.kubelet_requests.get_or_create(&labels).inc();
    }

    /// The Lease was renewed now.
    pub fn heartbeat(&self) {
        self.last_heartbeat.store(jiff::Timestamp::now().as_second(), Ordering::Relaxed);
    }

    /// A gauge cell the runtime keeps at a running container's memory size; dropped from the
    /// metrics by [`Metrics::forget_memory`] when the run ends.
    pub fn memory_cell(&self, pod: &str, container: &str) -> Arc<AtomicU64> {
        let cell = Arc::new(AtomicU64::new(0));
        if let Ok(mut m) = self.memory.lock() {
            m.insert((pod.to_owned(), container.to_owned()), cell.clone());
        }
        cell
    }

    /// Drops a container's memory series (its run ended).
    pub fn forget_memory(&self, pod: &str, container: &str, cell: &Arc<AtomicU64>) {
        if let Ok(mut m) = self.memory.lock() {
            let key = (pod.to_owned(), container.to_owned());
            // A newer run of the same container may already have its own cell.
            if m.get(&key).is_some_and(|c| Arc::ptr_eq(c, cell)) {
                m.remove(&key);
            }
        }
    }
}

/// What a scrape reads besides the counters.
#[derive(Clone)]
pub struct Sources {
    /// Pod statuses.
    pub board: Arc<StatusBoard>,
    /// The store (health).
    pub store: Arc<dyn StateStore>,
    /// The engine (health).
    pub runtime: Arc<WasmRuntime>,
    /// The link to the API server.
    pub contact: Arc<ApiContact>,
    /// The MQTT bridge, when MQTT is on.
    pub mqtt: Option<Arc<MqttBridge>>,
    /// When the agent started.
    pub started: Instant,
}

/// Renders every metric in the Prometheus text format.
pub fn render(sources: &Sources) -> String {
    let m = global();
    let mut r = <Registry>::with_prefix("lichen");
    r.register("module_starts", "Container runs started (first runs and restarts)", m.module_starts.clone());
    r.register("container_restarts", "Container runs that were restarts", m.restarts.clone());
    r.register(
        "fuel_consumed",
        "Fuel units consumed by container runs, counted when a run ends",
        m.fuel_consumed.clone(),
    );
    r.register(
        "out_of_fuel_kills",
        "Container runs stopped because their fuel budget ran out",
        m.out_of_fuel.clone(),
    );
    r.register("module_pull_duration_seconds", "Time taken by module pulls, by result", m.pulls.clone());
    r.register(
        "api_requests",
        "Requests to the Kubernetes API server, by verb and status code",
        m.api_requests.clone(),
    );
    r.register(
        "api_request_errors",
        "API requests that got no answer, a 5xx or a 429, by verb",
        m.api_errors.clone(),
    );
    r.register(
        "api_request_duration_seconds",
        "Latency of API requests (watches excluded), by verb",
        m.api_latency.clone(),
    );
    r.register(
        "kubelet_api_requests",
        "Requests to the kubelet API, by path and status code",
        m.kubelet_requests.clone(),
    );

    let phases: Family<Labels, Gauge> = Family::default();
    for phase in ["Pending", "Running", "Succeeded", "Failed", "Unknown"] {
        let _ = phases.get_or_create(&vec![("phase", phase.to_owned())]);
    }
    for (_, entry) in sources.board.all() {
        let phase = entry.status.phase.unwrap_or_else(|| "Unknown".into());
        phases.get_or_create(&vec![("phase", phase)]).inc();
    }
    r.register("pods", "Pods on this node, by phase", phases);

    let memory: Family<Labels, Gauge> = Family::default();
    if let Ok(cells) = m.memory.lock() {
        for ((pod, container), cell) in cells.iter() {
            let (namespace, name) = pod.split_once('/').unwrap_or(("", pod));
            let labels = vec![
                ("namespace", namespace.to_owned()),
                ("pod", name.to_owned()),
                ("container", container.clone()),
            ];
            memory.get_or_create(&labels).set(cell.load(Ordering::Relaxed) as i64);
        }
    }
    r.register("container_memory_bytes", "Linear memory of running containers", memory);

    let outbox: Gauge = Gauge::default();
    outbox.set(sources.board.pending_count(crate::cluster::pods::SOURCE) as i64);
    r.register("status_outbox_depth", "Pod statuses waiting to reach the API server", outbox);

    let heartbeat: Gauge = Gauge::default();
    heartbeat.set(m.last_heartbeat.load(Ordering::Relaxed));
    r.register(
        "last_heartbeat_timestamp_seconds",
        "Unix time of the last renewed node Lease (0: none since start)",
        heartbeat,
    );
    let contact = sources.contact.snapshot();
    let offline: Gauge = Gauge::default();
    offline.set(contact.offline_secs as i64);
    r.register("api_offline_seconds", "Seconds without contact with the API server (0: connected)", offline);

    let uptime: Gauge = Gauge::default();
    uptime.set(sources.started.elapsed().as_secs() as i64);
    r.register("uptime_seconds", "Seconds since the agent started", uptime);

    if let Some(bridge) = &sources.mqtt {
        let spool = bridge.spool().snapshot();
        let b = bridge.snapshot();
        let depth: Gauge = Gauge::default();
        depth.set(spool.entries as i64);
        r.register("mqtt_spool_depth", "Messages in the MQTT spool waiting for the broker", depth);
        let bytes: Gauge = Gauge::default();
        bytes.set(spool.bytes as i64);
        r.register("mqtt_spool_bytes", "Bytes in the MQTT spool", bytes);
        let published: Counter = Counter::default();
        published.inc_by(b.published);
        r.register("mqtt_published", "Messages handed to the MQTT client", published);
        let drops: Family<Labels, Counter> = Family::default();
        for (reason, n) in [
            ("spool_full", spool.dropped_full),
            ("spool_corrupt", spool.dropped_corrupt),
            ("rate_limit", b.dropped_rate),
            ("oversized", b.dropped_oversized),
            ("malformed", b.dropped_malformed),
            ("offline_qos0", b.dropped_offline),
            ("spool_error", b.dropped_spool_error),
            ("stdin_full", b.dropped_stdin),
        ] {
            drops.get_or_create(&vec![("reason", reason.to_owned())]).inc_by(n);
        }
        r.register("mqtt_dropped", "MQTT messages dropped, by reason", drops);
        let connected: Gauge = Gauge::default();
        connected.set(i64::from(b.connected));
        r.register("mqtt_connected", "1 while connected to the MQTT broker", connected);
        if let Some(g) = bridge.gateway_snapshot() {
            let depth: Gauge = Gauge::default();
            depth.set(g.spooled_down as i64);
            r.register(
                "mqtt_gateway_spool_depth",
                "Messages from upstream in the gateway's spool waiting for the local broker",
                depth,
            );
            let forwarded: Family<Labels, Counter> = Family::default();
            for (direction, n) in [("up", g.forwarded_up), ("down", g.forwarded_down)] {
                forwarded.get_or_create(&vec![("direction", direction.to_owned())]).inc_by(n);
            }
            r.register("mqtt_gateway_forwarded", "Messages the gateway forwarded, by direction", forwarded);
            let dropped: Counter = Counter::default();
            dropped.inc_by(g.dropped_down);
            r.register(
                "mqtt_gateway_dropped_down",
                "Messages from upstream dropped (gateway spool full or refused by the disk)",
                dropped,
            );
            let loops: Counter = Counter::default();
            loops.inc_by(g.loops_suppressed);
            r.register(
                "mqtt_gateway_loops_suppressed",
                "Echoes of the gateway's own messages not forwarded",
                loops,
            );
            let connected: Gauge = Gauge::default();
            connected.set(i64::from(g.connected));
            r.register("mqtt_gateway_connected", "1 while connected to the local broker", connected);
        }
    }

    let mut out = String::new();
    // Encoding into a String cannot fail.
    let _ = encode(&mut out, &r);
    out
}

/// The health of the agent, as `/healthz` reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Health {
    /// Whether the agent can do its job (the store answers, the engine works).
    pub ok: bool,
    /// "ok" or why not.
    pub store: String,
    /// "ok" or why not.
    pub runtime: String,
    /// Seconds since the last successful exchange with the API server (`None`: never, or standalone).
    pub api_contact_age_secs: Option<i64>,
    /// Whether a cluster is configured.
    pub cluster: bool,
}

/// Checks the store with a point read and the engine by validating the smallest module. Being
/// offline is not unhealthy: the node is built to run without the API server.
pub async fn health(sources: &Sources) -> Health {
    let store = sources.store.clone();
    let store = match tokio::task::spawn_blocking(move || store.get_pod("\u{0}healthz")).await {
        Ok(Ok(_)) => "ok".to_owned(),
        Ok(Err(e)) => e.to_string(),
        Err(e) => format!("store check failed: {e}"),
    };
    let runtime = match sources.runtime.validate(b"\0asm\x01\0\0\0") {
        Ok(()) => "ok".to_owned(),
        Err(e) => e,
    };
    let contact = sources.contact.snapshot();
    let age = contact.last_ok.map(|t| (jiff::Timestamp::now().as_second() - t.as_second()).max(0));
    Health {
        ok: store == "ok" && runtime == "ok",
        store,
        runtime,
        api_contact_age_secs: age,
        cluster: contact.configured,
    }
}

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for metrics on {address}: {source} (set metrics.address, or \"\" to turn it off)")]
pub struct MetricsError {
    /// The address.
    pub address: SocketAddr,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// Binds `address` (so a taken port is an error at start, not a silent gap).
pub async fn bind(address: SocketAddr) -> Result<tokio::net::TcpListener, MetricsError> {
    tokio::net::TcpListener::bind(address).await.map_err(|source| MetricsError { address, source })
}

/// Serves `/metrics` and `/healthz` on `listener` until `cancel`.
pub async fn serve(listener: tokio::net::TcpListener, sources: Sources, cancel: CancellationToken) {
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, _) = tokio::select! {
            _ = cancel.cancelled() => break,
            c = listener.accept() => match c {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let sources = sources.clone();
        let cancel = cancel.clone();
        tasks.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let sources = sources.clone();
                async move { Ok::<_, Infallible>(answer(req, &sources).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = conn => {}
            }
        });
    }
    tasks.close();
    tasks.wait().await;
}

async fn answer(req: Request<Incoming>, sources: &Sources) -> Response<Full<Bytes>> {
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into(), "text/plain");
    }
    match req.uri().path() {
        "/metrics" => text(StatusCode::OK, render(sources), "text/plain; version=0.0.4; charset=utf-8"),
        "/healthz" => {
            let h = health(sources).await;
            let code = if h.ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            let body = serde_json::to_string(&h).unwrap_or_default() + "\n";
            text(code, body, "application/json")
        }
        _ => text(StatusCode::NOT_FOUND, "not found: try /metrics or /healthz\n".into(), "text/plain"),
    }
}

fn text(code: StatusCode, body: String, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    r
}

/// A tower layer for the kube client that counts every API request by verb and status code and
/// times those that are not watches (a watch is a long poll whose duration says nothing).
#[derive(Clone, Copy, Default)]
pub struct ApiMetricsLayer;

impl<S> tower::Layer<S> for ApiMetricsLayer {
    type Service = ApiMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ApiMetricsService { inner }
    }
}

/// The service [`ApiMetricsLayer`] wraps around the client's.
#[derive(Clone)]
pub struct ApiMetricsService<S> {
    inner: S,
}

impl<S, B, R> tower::Service<Request<B>> for ApiMetricsService<S>
where
    S: tower::Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let watch =
            req.uri().query().is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"));
        let verb = if watch { "WATCH".to_owned() } else { req.method().as_str().to_owned() };
        let started = Instant::now();
        let future = self.inner.call(req);
        Box::pin(async move {
            let result = future.await;
            let elapsed = (!watch).then(|| started.elapsed());
            match &result {
                Ok(resp) => global().api_request(&verb, resp.status().as_u16(), elapsed),
                Err(_) => global().api_request(&verb, 0, elapsed),
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counters_show_up_in_the_text_format() {
        let m = global();
        m.container_started(true);
        m.container_ended(1234, true);
        m.pull_finished(Duration::from_millis(120), true);
        m.api_request("PATCH", 503, Some(Duration::from_millis(7)));
        let cell = m.memory_cell("default/p", "c");
        cell.store(65536, Ordering::Relaxed);
        let dir = tempfile::tempdir().expect("tempdir");
        let sources = Sources {
            board: Arc::new(StatusBoard::default()),
            store: Arc::new(crate::store::SledStore::open(&dir.path().join("store")).expect("store")),
            runtime: WasmRuntime::new().expect("engine"),
            contact: Arc::new(ApiContact::default()),
            mqtt: None,
            started: Instant::now(),
        };
        let text = render(&sources);
        for line in [
            "lichen_module_starts_total ",
            "lichen_container_restarts_total ",
            "lichen_out_of_fuel_kills_total ",
            "lichen_module_pull_duration_seconds_count{result=\"success\"} ",
            "lichen_api_request_errors_total{verb=\"PATCH\"} ",
            "lichen_container_memory_bytes{namespace=\"default\",pod=\"p\",container=\"c\"} 65536",
            "lichen_pods{phase=\"Running\"} 0",
        ] {
            assert!(text.contains(line), "{line:?} missing from\n{text}");
        }
        m.forget_memory("default/p", "c", &cell);
        assert!(!render(&sources).contains("pod=\"p\""), "a finished run's memory series is gone");
    }
}
