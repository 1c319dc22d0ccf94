//! The process-wide counters (ground floor): what the pod workers, the module puller, the kubelet
//! API and the API client count as things happen, and the running containers' usage meters.
//!
//! It imports nothing from the crate, so every room may count into it. The endpoint that serves
//! them, with the gauges read from their owners at scrape time, is [`crate::metrics_server`].

mod api;
mod usage;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

pub use api::{ApiMetricsLayer, ApiMetricsService, is_watch};
pub use usage::{ContainerMeter, INSTANCE_OVERHEAD_BYTES};

/// Label set of a metric with labels.
pub type Labels = Vec<(&'static str, String)>;

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
    /// What every running container uses, by pod key and container.
    containers: Mutex<HashMap<(String, String), Arc<ContainerMeter>>>,
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
        containers: Mutex::new(HashMap::new()),
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

    /// A meter the runtime keeps current for a container run of the pod `pod` (its key) with UID
    /// `uid`, started at `started`; dropped by [`Metrics::forget_container`] when the run ends.
    pub fn container_meter(
        &self,
        pod: &str,
        uid: &str,
        container: &str,
        started: jiff::Timestamp,
    ) -> Arc<ContainerMeter> {
        let meter = Arc::new(ContainerMeter::new(uid, started));
        if let Ok(mut m) = self.containers.lock() {
            m.insert((pod.to_owned(), container.to_owned()), meter.clone());
        }
        meter
    }

    /// Drops a container's meter (its run ended).
    pub fn forget_container(&self, pod: &str, container: &str, meter: &Arc<ContainerMeter>) {
        if let Ok(mut m) = self.containers.lock() {
            let key = (pod.to_owned(), container.to_owned());
            // A newer run of the same container may already have its own meter.
            if m.get(&key).is_some_and(|c| Arc::ptr_eq(c, meter)) {
                m.remove(&key);
            }
        }
    }

    /// The running containers' meters: (pod key, container, meter), in no particular order.
    pub fn containers(&self) -> Vec<(String, String, Arc<ContainerMeter>)> {
        self.containers
            .lock()
            .map(|m| m.iter().map(|((p, c), meter)| (p.clone(), c.clone(), meter.clone())).collect())
            .unwrap_or_default()
    }

    /// Registers the counters, the memory of running containers and the last heartbeat in `r`.
    pub fn register_into(&self, r: &mut Registry) {
        r.register(
            "module_starts",
            "Container runs started (first runs and restarts)",
            self.module_starts.clone(),
        );
        r.register("container_restarts", "Container runs that were restarts", self.restarts.clone());
        r.register(
            "fuel_consumed",
            "Fuel units consumed by container runs, counted when a run ends",
            self.fuel_consumed.clone(),
        );
        r.register(
            "out_of_fuel_kills",
            "Container runs stopped because their fuel budget ran out",
            self.out_of_fuel.clone(),
        );
        r.register(
            "module_pull_duration_seconds",
            "Time taken by module pulls, by result",
            self.pulls.clone(),
        );
        r.register(
            "api_requests",
            "Requests to the Kubernetes API server, by verb and status code",
            self.api_requests.clone(),
        );
        r.register(
            "api_request_errors",
            "API requests that got no answer, a 5xx or a 429, by verb",
            self.api_errors.clone(),
        );
        r.register(
            "api_request_duration_seconds",
            "Latency of API requests (watches excluded), by verb",
            self.api_latency.clone(),
        );
        r.register(
            "kubelet_api_requests",
            "Requests to the kubelet API, by path and status code",
            self.kubelet_requests.clone(),
        );

        let memory: Family<Labels, Gauge> = Family::default();
        if let Ok(meters) = self.containers.lock() {
            for ((pod, container), meter) in meters.iter() {
                let (namespace, name) = pod.split_once('/').unwrap_or(("", pod));
                let labels = vec![
                    ("namespace", namespace.to_owned()),
                    ("pod", name.to_owned()),
                    ("container", container.clone()),
                ];
                memory.get_or_create(&labels).set(meter.linear_memory() as i64);
            }
        }
        r.register("container_memory_bytes", "Linear memory of running containers", memory);

        let heartbeat: Gauge = Gauge::default();
        heartbeat.set(self.last_heartbeat.load(Ordering::Relaxed));
        r.register(
            "last_heartbeat_timestamp_seconds",
            "Unix time of the last renewed node Lease (0: none since start)",
            heartbeat,
        );
    }
}
