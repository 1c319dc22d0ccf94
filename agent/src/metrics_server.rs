//! The metrics endpoint (edge floor), served on `metrics.address` (default 127.0.0.1:10248, the
//! kubelet's healthz port): `GET /metrics` in the Prometheus text format, `GET /healthz`.
//!
//! Counters live in the process-wide [`crate::metrics::Metrics`] (ground floor) that the pod
//! workers, the module puller and the API client bump as things happen. Gauges (pods by phase, the
//! status outbox, the MQTT spool) are read from their owners at scrape time, so they can never go
//! stale or leak series for pods that are gone.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::board::StatusBoard;
use crate::cluster::ApiContact;
use crate::metrics::{Labels, global};
use crate::runtime::WasmRuntime;
use crate::store::StateStore;
use crate::telemetry::bridge::MqttBridge;

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
    let mut r = <Registry>::with_prefix("lichen");
    global().register_into(&mut r);

    let phases: Family<Labels, Gauge> = Family::default();
    for phase in ["Pending", "Running", "Succeeded", "Failed", "Unknown"] {
        let _ = phases.get_or_create(&vec![("phase", phase.to_owned())]);
    }
    for (_, entry) in sources.board.all() {
        let phase = entry.status.phase.unwrap_or_else(|| "Unknown".into());
        phases.get_or_create(&vec![("phase", phase)]).inc();
    }
    r.register("pods", "Pods on this node, by phase", phases);

    gauge(
        &mut r,
        "status_outbox_depth",
        "Pod statuses waiting to reach the API server",
        sources.board.pending_count(crate::store::SourceKind::Api) as i64,
    );

    let contact = sources.contact.snapshot();
    gauge(
        &mut r,
        "api_offline_seconds",
        "Seconds without contact with the API server (0: connected)",
        contact.offline_secs as i64,
    );

    gauge(
        &mut r,
        "uptime_seconds",
        "Seconds since the agent started",
        sources.started.elapsed().as_secs() as i64,
    );

    if let Some(bridge) = &sources.mqtt {
        let spool = bridge.spool().snapshot();
        let b = bridge.snapshot();
        gauge(
            &mut r,
            "mqtt_spool_depth",
            "Messages in the MQTT spool waiting for the broker",
            spool.entries as i64,
        );
        gauge(&mut r, "mqtt_spool_bytes", "Bytes in the MQTT spool", spool.bytes as i64);
        counter(
            &mut r,
            "mqtt_spool_written",
            "QoS 1 messages written to the disk (those the broker had not acknowledged by their group commit)",
            spool.written,
        );
        counter(&mut r, "mqtt_published", "Messages handed to the MQTT client", b.published);
        counter(
            &mut r,
            "mqtt_throttled",
            "QoS 1 lines held back by a pod's rate limit until it allowed them (the module was slowed, nothing dropped)",
            b.throttled,
        );
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
        gauge(&mut r, "mqtt_connected", "1 while connected to the MQTT broker", i64::from(b.connected));
        if let Some(g) = bridge.gateway_snapshot() {
            gauge(
                &mut r,
                "mqtt_gateway_spool_depth",
                "Messages from upstream in the gateway's spool waiting for the local broker",
                g.spooled_down as i64,
            );
            let forwarded: Family<Labels, Counter> = Family::default();
            for (direction, n) in [("up", g.forwarded_up), ("down", g.forwarded_down)] {
                forwarded.get_or_create(&vec![("direction", direction.to_owned())]).inc_by(n);
            }
            r.register("mqtt_gateway_forwarded", "Messages the gateway forwarded, by direction", forwarded);
            counter(
                &mut r,
                "mqtt_gateway_dropped_down",
                "Messages from upstream dropped (gateway spool full or refused by the disk)",
                g.dropped_down,
            );
            counter(
                &mut r,
                "mqtt_gateway_loops_suppressed",
                "Echoes of the gateway's own messages not forwarded",
                g.loops_suppressed,
            );
            gauge(
                &mut r,
                "mqtt_gateway_connected",
                "1 while connected to the local broker",
                i64::from(g.connected),
            );
        }
    }

    let mut out = String::new();
    // Encoding into a String cannot fail.
    let _ = encode(&mut out, &r);
    out
}

/// Registers a gauge `name` at `value`.
fn gauge(r: &mut Registry, name: &str, help: &str, value: i64) {
    let gauge: Gauge = Gauge::default();
    gauge.set(value);
    r.register(name, help, gauge);
}

/// Registers a counter `name` at `value` (read from its owner's own counter at scrape time).
fn counter(r: &mut Registry, name: &str, help: &str, value: u64) {
    let counter: Counter = Counter::default();
    counter.inc_by(value);
    r.register(name, help, counter);
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
        Err(e) => e.to_string(),
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
        let meter = m.container_meter("default/p", "uid-p", "c", jiff::Timestamp::now());
        meter.set_linear_memory(65536);
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
        m.forget_container("default/p", "c", &meter);
        assert!(!render(&sources).contains("pod=\"p\""), "a finished run's memory series is gone");
    }
}
