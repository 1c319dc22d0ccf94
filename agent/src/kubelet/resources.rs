//! The kubelet's resource endpoints, which metrics-server scrapes for `kubectl top` and the
//! HorizontalPodAutoscaler: `/metrics/resource` (Prometheus text, what metrics-server 0.4 and later
//! read) and `/stats/summary` (the `stats/v1alpha1` Summary, what older ones and other tools read).
//!
//! Both present one [`Sample`]: the host's CPU and memory for the node (as the kubelet reports its
//! root cgroup) and, for every running container, the meter its runtime keeps (CPU time spent
//! running its code; linear memory, tables and the instance's allowance). Names, labels and
//! timestamps follow the kubelet's resource metrics collector, so metrics-server's decoder finds
//! what it looks for. Nothing here measures; it only reads and formats.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Mutex;

use jiff::Timestamp;
use serde::Serialize;

use crate::board::StatusBoard;
use crate::host::HostUsage;
use crate::metrics::ContainerMeter;

/// The content type of the Prometheus text format the kubelet serves.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Everything the endpoints report, read at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// When it was read.
    pub at: Timestamp,
    /// The host; `None` where it cannot be read.
    pub node: Option<HostUsage>,
    /// Pods with running containers, by namespace and name.
    pub pods: Vec<PodSample>,
}

/// One pod's running containers.
#[derive(Debug, Clone, PartialEq)]
pub struct PodSample {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
    /// When the node accepted the pod (its status' `startTime`), else its first container's start.
    pub start: Timestamp,
    /// Its running containers, by name.
    pub containers: Vec<ContainerSample>,
}

/// One running container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSample {
    /// Name.
    pub name: String,
    /// When this run started.
    pub start: Timestamp,
    /// CPU time spent running its code in this run, nanoseconds.
    pub cpu_nanos: u64,
    /// Its working set, bytes.
    pub working_set: u64,
}

impl PodSample {
    fn cpu_nanos(&self) -> u64 {
        self.containers.iter().map(|c| c.cpu_nanos).sum()
    }

    fn working_set(&self) -> u64 {
        self.containers.iter().map(|c| c.working_set).sum()
    }
}

impl Sample {
    /// Reads the host and the running containers' meters now; pod start times from `board`.
    pub fn read(board: &StatusBoard) -> Sample {
        Sample::of(HostUsage::read(), crate::metrics::global().containers(), board, Timestamp::now())
    }

    /// A sample of `meters` (pod key, container, meter) and `node`, taken at `at`.
    pub fn of(
        node: Option<HostUsage>,
        meters: Vec<(String, String, std::sync::Arc<ContainerMeter>)>,
        board: &StatusBoard,
        at: Timestamp,
    ) -> Sample {
        let mut pods: BTreeMap<String, PodSample> = BTreeMap::new();
        for (key, container, meter) in meters {
            let (namespace, name) = key.split_once('/').unwrap_or(("", key.as_str()));
            let pod = pods.entry(key.clone()).or_insert_with(|| PodSample {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                uid: meter.pod_uid().to_owned(),
                start: board
                    .get(&key)
                    .filter(|e| e.uid == meter.pod_uid())
                    .and_then(|e| e.status.start_time)
                    .map_or(meter.started(), |t| t.0),
                containers: Vec::new(),
            });
            pod.start = pod.start.min(meter.started());
            pod.containers.push(ContainerSample {
                name: container,
                start: meter.started(),
                cpu_nanos: meter.cpu_nanos(),
                working_set: meter.working_set(),
            });
        }
        let mut pods: Vec<PodSample> = pods.into_values().collect();
        for p in &mut pods {
            p.containers.sort_by(|a, b| a.name.cmp(&b.name));
        }
        Sample { at, node, pods }
    }
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// `/metrics/resource`: the kubelet's resource metrics in the Prometheus text format. CPU and
/// memory samples carry the sample's time in milliseconds, as the kubelet gives its stats' time;
/// start times and the scrape error carry none. Families come sorted by name, each announced only
/// when it has samples, as the kubelet's registry writes them.
pub fn render_metrics(s: &Sample) -> String {
    let ms = s.at.as_millisecond();
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, lines: Vec<String>| {
        if lines.is_empty() {
            return;
        }
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for l in lines {
            let _ = writeln!(out, "{name}{l}");
        }
    };
    let seconds = |nanos: u64| nanos as f64 / 1e9;
    let containers = |f: &dyn Fn(&ContainerSample) -> String| -> Vec<String> {
        s.pods
            .iter()
            .flat_map(|p| {
                p.containers.iter().map(move |c| {
                    format!(
                        "{{container=\"{}\",namespace=\"{}\",pod=\"{}\"}} {}",
                        label(&c.name),
                        label(&p.namespace),
                        label(&p.name),
                        f(c)
                    )
                })
            })
            .collect()
    };
    let pods = |f: &dyn Fn(&PodSample) -> String| -> Vec<String> {
        s.pods
            .iter()
            .map(|p| format!("{{namespace=\"{}\",pod=\"{}\"}} {}", label(&p.namespace), label(&p.name), f(p)))
            .collect()
    };
    family(
        "container_cpu_usage_seconds_total",
        "counter",
        "[STABLE] Cumulative cpu time consumed by the container in core-seconds",
        containers(&|c| format!("{} {ms}", seconds(c.cpu_nanos))),
    );
    family(
        "container_memory_working_set_bytes",
        "gauge",
        "[STABLE] Current working set of the container in bytes",
        containers(&|c| format!("{} {ms}", c.working_set)),
    );
    family(
        "container_start_time_seconds",
        "gauge",
        "[STABLE] Start time of the container since unix epoch in seconds",
        containers(&|c| format!("{}", c.start.as_nanosecond() as f64 / 1e9)),
    );
    let node = |v: Option<String>| v.map(|v| vec![format!(" {v} {ms}")]).unwrap_or_default();
    family(
        "node_cpu_usage_seconds_total",
        "counter",
        "[STABLE] Cumulative cpu time consumed by the node in core-seconds",
        node(s.node.map(|n| seconds(n.cpu_nanos).to_string())),
    );
    family(
        "node_memory_working_set_bytes",
        "gauge",
        "[STABLE] Current working set of the node in bytes",
        node(s.node.map(|n| n.memory_working_set.to_string())),
    );
    family(
        "pod_cpu_usage_seconds_total",
        "counter",
        "[STABLE] Cumulative cpu time consumed by the pod in core-seconds",
        pods(&|p| format!("{} {ms}", seconds(p.cpu_nanos()))),
    );
    family(
        "pod_memory_working_set_bytes",
        "gauge",
        "[STABLE] Current working set of the pod in bytes",
        pods(&|p| format!("{} {ms}", p.working_set())),
    );
    // 1 when the node's own figures could not be read, as the kubelet says when its stats fail.
    let error = if s.node.is_some() { "0" } else { "1" };
    let help = "1 if there was an error while getting container metrics, 0 otherwise";
    family("resource_scrape_error", "gauge", &format!("[STABLE] {help}"), vec![format!(" {error}")]);
    // The older name, which the kubelet still writes (deprecated since 1.29) for older scrapers.
    family("scrape_error", "gauge", &format!("[ALPHA] {help}"), vec![format!(" {error}")]);
    out
}

/// CPU rates (`usageNanoCores`) from consecutive readings of cumulative counters, as the kubelet
/// derives them between two stats samples. Bounded: only what the last sample had is kept.
#[derive(Default)]
pub struct CpuRates {
    last: Mutex<HashMap<String, (Timestamp, Timestamp, u64)>>,
}

impl CpuRates {
    /// The rate of `key`'s counter `nanos` (since `start`) at `at`: over the interval since the
    /// previous reading of the same run, or the average since `start` for a first reading.
    fn rate(
        seen: &mut HashMap<String, (Timestamp, Timestamp, u64)>,
        previous: &HashMap<String, (Timestamp, Timestamp, u64)>,
        key: String,
        start: Timestamp,
        at: Timestamp,
        nanos: u64,
    ) -> u64 {
        // In integers: nanoseconds of CPU per second of wall time are nanocores.
        let per_second = |cpu: u64, from: Timestamp| {
            let wall = at.as_nanosecond() - from.as_nanosecond();
            if wall <= 0 { 0 } else { (i128::from(cpu) * 1_000_000_000 / wall) as u64 }
        };
        let rate = match previous.get(&key) {
            Some(&(s, t, n)) if s == start && t < at && n <= nanos => per_second(nanos - n, t),
            _ => per_second(nanos, start),
        };
        seen.insert(key, (start, at, nanos));
        rate
    }
}

/// `metav1.Time`: RFC 3339 in UTC, whole seconds.
fn time(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// The parts of `stats/v1alpha1` Lichen fills in.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    node: NodeStats,
    pods: Vec<PodStats>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct NodeStats {
    node_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    start_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu: Option<CpuStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    memory: Option<MemoryStats>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct PodStats {
    pod_ref: PodReference,
    start_time: String,
    containers: Vec<ContainerStats>,
    cpu: CpuStats,
    memory: MemoryStats,
}

#[derive(Debug, Serialize)]
struct PodReference {
    name: String,
    namespace: String,
    uid: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ContainerStats {
    name: String,
    start_time: String,
    cpu: CpuStats,
    memory: MemoryStats,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct CpuStats {
    time: String,
    usage_nano_cores: u64,
    usage_core_nano_seconds: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct MemoryStats {
    time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    available_bytes: Option<u64>,
    usage_bytes: u64,
    working_set_bytes: u64,
}

/// `/stats/summary` for `node_name`; `rates` turns the counters into `usageNanoCores`.
pub fn summary(s: &Sample, node_name: &str, rates: &CpuRates) -> Summary {
    let Ok(mut last) = rates.last.lock() else {
        return summary_with(s, node_name, &mut HashMap::new(), &HashMap::new());
    };
    let previous = std::mem::take(&mut *last);
    summary_with(s, node_name, &mut last, &previous)
}

fn summary_with(
    s: &Sample,
    node_name: &str,
    seen: &mut HashMap<String, (Timestamp, Timestamp, u64)>,
    previous: &HashMap<String, (Timestamp, Timestamp, u64)>,
) -> Summary {
    let at = time(s.at);
    let mut cpu = |key: String, start: Timestamp, nanos: u64| CpuStats {
        time: at.clone(),
        usage_nano_cores: CpuRates::rate(seen, previous, key, start, s.at, nanos),
        usage_core_nano_seconds: nanos,
    };
    let memory = |working_set: u64| MemoryStats {
        time: at.clone(),
        available_bytes: None,
        usage_bytes: working_set,
        working_set_bytes: working_set,
    };
    let node = match s.node {
        Some(n) => {
            let boot = Timestamp::from_second(n.boot_time).unwrap_or(Timestamp::UNIX_EPOCH);
            NodeStats {
                node_name: node_name.to_owned(),
                start_time: Some(time(boot)),
                cpu: Some(cpu(String::new(), boot, n.cpu_nanos)),
                memory: Some(MemoryStats {
                    time: at.clone(),
                    available_bytes: Some(n.memory_total.saturating_sub(n.memory_working_set)),
                    usage_bytes: n.memory_usage,
                    working_set_bytes: n.memory_working_set,
                }),
            }
        }
        None => NodeStats { node_name: node_name.to_owned(), start_time: None, cpu: None, memory: None },
    };
    let pods = s
        .pods
        .iter()
        .map(|p| {
            let containers = p
                .containers
                .iter()
                .map(|c| ContainerStats {
                    name: c.name.clone(),
                    start_time: time(c.start),
                    cpu: cpu(format!("{}/{}", p.uid, c.name), c.start, c.cpu_nanos),
                    memory: memory(c.working_set),
                })
                .collect::<Vec<_>>();
            // A pod's rate is its containers' (their runs restart on their own).
            let rate = containers.iter().map(|c| c.cpu.usage_nano_cores).sum();
            PodStats {
                pod_ref: PodReference {
                    name: p.name.clone(),
                    namespace: p.namespace.clone(),
                    uid: p.uid.clone(),
                },
                start_time: time(p.start),
                cpu: CpuStats {
                    time: at.clone(),
                    usage_nano_cores: rate,
                    usage_core_nano_seconds: p.cpu_nanos(),
                },
                memory: memory(p.working_set()),
                containers,
            }
        })
        .collect();
    Summary { node, pods }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn sample(at: Timestamp, cpu: u64) -> Sample {
        let board = StatusBoard::default();
        let started = Timestamp::from_second(1_700_000_000).expect("time");
        let busy = Arc::new(ContainerMeter::new("uid-1", started));
        busy.add_cpu(cpu);
        busy.set_linear_memory(1 << 16);
        let other = Arc::new(ContainerMeter::new("uid-1", started));
        other.add_cpu(1);
        let node = HostUsage {
            cpu_nanos: 2_500_000_000,
            boot_time: 1_600_000_000,
            memory_total: 1000,
            memory_usage: 700,
            memory_working_set: 500,
        };
        let meters = vec![
            ("default/web".to_owned(), "main".to_owned(), busy),
            ("default/web".to_owned(), "a-side".to_owned(), other),
        ];
        Sample::of(Some(node), meters, &board, at)
    }

    #[test]
    fn resource_metrics_have_the_kubelets_names_labels_and_timestamps() {
        let at = Timestamp::from_millisecond(1_700_000_100_123).expect("time");
        let text = render_metrics(&sample(at, 1_500_000_000));
        let ws = 65536 + crate::metrics::INSTANCE_OVERHEAD_BYTES;
        for line in [
            "# TYPE container_cpu_usage_seconds_total counter".to_owned(),
            "# HELP node_cpu_usage_seconds_total [STABLE] Cumulative cpu time consumed by the node in core-seconds".to_owned(),
            "container_cpu_usage_seconds_total{container=\"main\",namespace=\"default\",pod=\"web\"} 1.5 1700000100123".to_owned(),
            format!("container_memory_working_set_bytes{{container=\"main\",namespace=\"default\",pod=\"web\"}} {ws} 1700000100123"),
            "container_start_time_seconds{container=\"main\",namespace=\"default\",pod=\"web\"} 1700000000".to_owned(),
            "node_cpu_usage_seconds_total 2.5 1700000100123".to_owned(),
            "node_memory_working_set_bytes 500 1700000100123".to_owned(),
            "pod_cpu_usage_seconds_total{namespace=\"default\",pod=\"web\"} 1.500000001 1700000100123".to_owned(),
            "resource_scrape_error 0".to_owned(),
            "scrape_error 0".to_owned(),
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing from\n{text}");
        }
        let a_side = text.find("container=\"a-side\"").expect("a-side");
        assert!(a_side < text.find("container=\"main\"").expect("main"), "containers sorted");
        let none = Sample { at, node: None, pods: vec![] };
        assert_eq!(
            render_metrics(&none).lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>(),
            vec!["resource_scrape_error 1", "scrape_error 1"],
            "nothing else announced without samples"
        );
    }

    #[test]
    fn the_summary_has_the_stats_api_shape_and_rates_between_readings() {
        let rates = CpuRates::default();
        let t0 = Timestamp::from_second(1_700_000_100).expect("time");
        let first = serde_json::to_value(summary(&sample(t0, 1_000_000_000), "pi", &rates)).expect("json");
        assert_eq!(first["node"]["nodeName"], "pi");
        assert_eq!(first["node"]["cpu"]["usageCoreNanoSeconds"], 2_500_000_000u64);
        assert_eq!(first["node"]["memory"]["workingSetBytes"], 500);
        assert_eq!(first["node"]["memory"]["availableBytes"], 500);
        assert_eq!(first["node"]["startTime"], "2020-09-13T12:26:40Z");
        let pod = &first["pods"][0];
        assert_eq!(pod["podRef"], serde_json::json!({"name": "web", "namespace": "default", "uid": "uid-1"}));
        let main = &pod["containers"][1];
        assert_eq!(main["name"], "main");
        assert_eq!(main["startTime"], "2023-11-14T22:13:20Z");
        assert_eq!(main["cpu"]["time"], "2023-11-14T22:15:00Z");
        assert_eq!(main["cpu"]["usageCoreNanoSeconds"], 1_000_000_000u64);
        // First reading: the average since the start, 1 s in 100 s.
        assert_eq!(main["cpu"]["usageNanoCores"], 10_000_000u64);
        assert!(main["memory"]["workingSetBytes"].as_u64().is_some_and(|b| b > 65536));
        // Ten seconds later, 5 s more: half a core.
        let t1 = Timestamp::from_second(1_700_000_110).expect("time");
        let second = serde_json::to_value(summary(&sample(t1, 6_000_000_000), "pi", &rates)).expect("json");
        assert_eq!(second["pods"][0]["containers"][1]["cpu"]["usageNanoCores"], 500_000_000u64);
        assert_eq!(second["pods"][0]["cpu"]["usageCoreNanoSeconds"], 6_000_000_001u64);
    }
}
