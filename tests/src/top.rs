//! What metrics-server takes from a node's `/metrics/resource` for `kubectl top`: the text parsed
//! with a Prometheus text-format parser, then the node's and containers' points picked out as its
//! decoder picks them (by metric name; `container`, `namespace` and `pod` labels; the sample's own
//! millisecond timestamp). A point metrics-server would drop (a zero, a missing timestamp) fails the
//! decoding here, so a test sees what `kubectl top` would not show.

use std::collections::BTreeMap;

/// A container's point: (namespace, pod, container) → this.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ContainerPoint {
    /// `container_cpu_usage_seconds_total`.
    pub cpu_seconds: f64,
    /// `container_memory_working_set_bytes`.
    pub memory_bytes: f64,
    /// `container_start_time_seconds`.
    pub start_time_seconds: f64,
    /// The CPU sample's timestamp, Unix milliseconds.
    pub timestamp_ms: i64,
}

/// One scrape, decoded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResourceScrape {
    /// `node_cpu_usage_seconds_total`.
    pub node_cpu_seconds: f64,
    /// `node_memory_working_set_bytes`.
    pub node_memory_bytes: f64,
    /// The node samples' timestamp, Unix milliseconds.
    pub node_timestamp_ms: i64,
    /// Every container, by (namespace, pod, container).
    pub containers: BTreeMap<(String, String, String), ContainerPoint>,
    /// `pod_cpu_usage_seconds_total`, by (namespace, pod).
    pub pod_cpu_seconds: BTreeMap<(String, String), f64>,
    /// `resource_scrape_error`.
    pub scrape_error: f64,
}

impl ResourceScrape {
    /// The containers of the pod `namespace/pod`.
    pub fn pod(&self, namespace: &str, pod: &str) -> Vec<(&str, ContainerPoint)> {
        self.containers
            .iter()
            .filter(|((n, p, _), _)| n == namespace && p == pod)
            .map(|((_, _, c), point)| (c.as_str(), *point))
            .collect()
    }
}

/// The explicit timestamp of a sample line (`name{labels} value timestamp`), if it has one.
fn timestamp_of(text: &str, metric: &str, labels: &BTreeMap<String, String>) -> Option<i64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, rest) = l.split_once('}').or_else(|| l.split_once(' '))?;
        let name = series.split('{').next()?;
        let matches = name == metric && labels.iter().all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")));
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if matches { fields.get(1).and_then(|t| t.parse().ok()) } else { None }
    })
}

/// Decodes a `/metrics/resource` body as metrics-server does; panics, saying why, at anything it
/// would reject or drop.
pub fn decode(text: &str) -> ResourceScrape {
    let parsed = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|e| panic!("not the Prometheus text format ({e}):\n{text}"));
    let mut out = ResourceScrape::default();
    for s in parsed.samples {
        let value = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            other => panic!("{} is not a counter or gauge: {other:?}", s.metric),
        };
        let labels: BTreeMap<String, String> = s.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let stamp = || {
            timestamp_of(text, &s.metric, &labels)
                .unwrap_or_else(|| panic!("{} {labels:?} has no timestamp:\n{text}", s.metric))
        };
        let key = || {
            let l =
                |k: &str| labels.get(k).cloned().unwrap_or_else(|| panic!("{} has no {k} label", s.metric));
            (l("namespace"), l("pod"), l("container"))
        };
        match s.metric.as_str() {
            "node_cpu_usage_seconds_total" => {
                out.node_cpu_seconds = value;
                out.node_timestamp_ms = stamp();
            }
            "node_memory_working_set_bytes" => {
                out.node_memory_bytes = value;
                out.node_timestamp_ms = stamp();
            }
            "container_cpu_usage_seconds_total" => {
                let ts = stamp();
                let p = out.containers.entry(key()).or_default();
                p.cpu_seconds = value;
                p.timestamp_ms = ts;
            }
            "container_memory_working_set_bytes" => {
                stamp();
                out.containers.entry(key()).or_default().memory_bytes = value;
            }
            "container_start_time_seconds" => {
                out.containers.entry(key()).or_default().start_time_seconds = value
            }
            "pod_cpu_usage_seconds_total" => {
                stamp();
                let l = |k: &str| labels.get(k).cloned().unwrap_or_default();
                out.pod_cpu_seconds.insert((l("namespace"), l("pod")), value);
            }
            "resource_scrape_error" => out.scrape_error = value,
            _ => {}
        }
    }
    assert!(
        out.node_cpu_seconds > 0.0 && out.node_memory_bytes > 0.0 && out.node_timestamp_ms > 0,
        "metrics-server would call the node's metrics incomplete:\n{text}"
    );
    for (k, p) in &out.containers {
        assert!(
            p.cpu_seconds > 0.0 && p.memory_bytes > 0.0 && p.start_time_seconds > 0.0,
            "metrics-server would drop the pod of {k:?}: {p:?}\n{text}"
        );
    }
    out
}
