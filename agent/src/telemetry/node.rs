//! The node's own telemetry: load, memory, disk, temperatures, uptime, pod counts and the MQTT
//! counters, as one JSON object on `lichen/<node>/telemetry` every `telemetry_interval_secs`.
//!
//! Reads `/proc` and `/sys` only; a file that is missing (no thermal zones in a VM) leaves its
//! field out rather than failing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::bridge::MqttBridge;
use super::spool::{Origin, SpoolMessage};
use crate::board::StatusBoard;

/// The topic node telemetry is published on.
pub fn telemetry_topic(node: &str) -> String {
    format!("lichen/{node}/telemetry")
}

/// Publishes a sample every `interval` until `cancel` fires.
pub struct NodeTelemetry {
    /// Where messages go.
    pub bridge: Arc<MqttBridge>,
    /// Pod phases come from here.
    pub board: Arc<StatusBoard>,
    /// The disk reported is the one holding this directory.
    pub state_dir: PathBuf,
    /// Between samples.
    pub interval: Duration,
    /// 0 or 1.
    pub qos: u8,
}

impl NodeTelemetry {
    /// Publishes the first sample at once, then one per interval.
    pub async fn run(self, cancel: CancellationToken) {
        let topic = telemetry_topic(self.bridge.node());
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let sample = self.sample();
            let payload = match serde_json::to_vec(&sample) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot encode node telemetry");
                    continue;
                }
            };
            self.bridge.publish(SpoolMessage {
                topic: topic.clone(),
                qos: self.qos,
                retain: false,
                origin: Origin::Node,
                payload,
            });
        }
    }

    /// One sample.
    pub fn sample(&self) -> Value {
        let text = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let mut pods: BTreeMap<String, u64> = BTreeMap::new();
        let entries = self.board.all();
        for (_, e) in &entries {
            let phase = e.status.phase.clone().unwrap_or_else(|| "Pending".into()).to_ascii_lowercase();
            *pods.entry(phase).or_default() += 1;
        }
        let meminfo = text("/proc/meminfo");
        let (disk_total, disk_available) = crate::host::disk(&self.state_dir);
        let mut v = json!({
            "node": self.bridge.node(),
            "time": jiff::Timestamp::now().to_string(),
            "uptime_secs": first_number(&text("/proc/uptime")),
            "load": load(&text("/proc/loadavg")),
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "memory": {
                "total_bytes": crate::host::meminfo_field(&meminfo, "MemTotal:"),
                "available_bytes": crate::host::meminfo_field(&meminfo, "MemAvailable:"),
            },
            "disk": {
                "path": self.state_dir.display().to_string(),
                "total_bytes": disk_total,
                "available_bytes": disk_available,
            },
            "pods": { "total": entries.len(), "phases": pods },
            "mqtt": {
                "bridge": self.bridge.snapshot(),
                "spool": self.bridge.spool().snapshot(),
                "gateway": self.bridge.gateway_snapshot(),
            },
        });
        let temps = temperatures(Path::new("/sys/class/thermal"));
        if !temps.is_empty() {
            v["temperatures_c"] = json!(temps);
        }
        v
    }
}

fn first_number(s: &str) -> Option<f64> {
    s.split_whitespace().next()?.parse().ok()
}

/// The 1, 5 and 15 minute load averages.
fn load(loadavg: &str) -> Vec<f64> {
    loadavg.split_whitespace().take(3).filter_map(|n| n.parse().ok()).collect()
}

/// `thermal_zone*/temp` (millidegrees) by the zone's `type`, in degrees Celsius.
pub fn temperatures(root: &Path) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(root) else { return out };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("thermal_zone") {
            continue;
        }
        let Some(milli) =
            std::fs::read_to_string(e.path().join("temp")).ok().and_then(|t| t.trim().parse::<f64>().ok())
        else {
            continue;
        };
        let kind =
            std::fs::read_to_string(e.path().join("type")).map(|t| t.trim().to_owned()).unwrap_or(name);
        out.insert(kind, milli / 1000.0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thermal_zones_and_proc_files_are_read_leniently() {
        let dir = tempfile::tempdir().expect("tempdir");
        let zone = dir.path().join("thermal_zone0");
        std::fs::create_dir(&zone).expect("zone");
        std::fs::write(zone.join("temp"), "47250\n").expect("temp");
        std::fs::write(zone.join("type"), "cpu-thermal\n").expect("type");
        std::fs::create_dir(dir.path().join("thermal_zone1")).expect("empty zone");
        std::fs::create_dir(dir.path().join("cooling_device0")).expect("other");
        assert_eq!(temperatures(dir.path()), BTreeMap::from([("cpu-thermal".to_owned(), 47.25)]));
        assert!(temperatures(&dir.path().join("absent")).is_empty());
        assert_eq!(load("0.52 0.58 0.59 1/467 12345\n"), vec![0.52, 0.58, 0.59]);
        assert_eq!(first_number("3600.52 7000.1\n"), Some(3600.52));
    }
}
