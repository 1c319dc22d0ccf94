//! The `v1.Node` Lichen registers and the `NodeStatus` it patches, built from config and host facts.
//! Pure: no I/O, so every label, taint and condition rule is unit-tested.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Node, NodeAddress, NodeCondition, NodeSpec, NodeStatus, NodeSystemInfo, Taint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

use crate::host::{HostFacts, kube_arch};
use crate::names::TaintSpec;

/// When the node reports pressure, as the kubelet's hard eviction thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// MemoryPressure below this many bytes available.
    pub memory_bytes: u64,
    /// DiskPressure below this percent of the disk free; 0 turns it off.
    pub disk_percent: u64,
}

impl Default for Thresholds {
    /// The kubelet's defaults: `memory.available<100Mi`, `nodefs.available<10%`.
    fn default() -> Self {
        Thresholds { memory_bytes: 100 << 20, disk_percent: 10 }
    }
}

/// What the Node says about the agent itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Running and accepting pods.
    Ready,
    /// Shutting down; pods should not be sent here.
    Stopping,
}

/// The labels Lichen sets, plus the user's.
pub fn labels(node_name: &str, user: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut l = user.clone();
    for (k, v) in [
        ("kubernetes.io/arch", kube_arch()),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/hostname", node_name),
        ("beta.kubernetes.io/arch", kube_arch()),
        ("beta.kubernetes.io/os", "linux"),
        ("lichen.dev/runtime", "wasm"),
        ("lichen.dev/edge", "true"),
    ] {
        l.insert(k.to_owned(), v.to_owned());
    }
    l
}

/// The Node to create at first registration.
pub fn registration(
    node_name: &str,
    user_labels: &BTreeMap<String, String>,
    taints: &[TaintSpec],
    status: NodeStatus,
) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(node_name.to_owned()),
            labels: Some(labels(node_name, user_labels)),
            annotations: Some(BTreeMap::from([("node.alpha.kubernetes.io/ttl".to_owned(), "0".to_owned())])),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            taints: Some(
                taints
                    .iter()
                    .map(|t| Taint {
                        key: t.key.clone(),
                        value: (!t.value.is_empty()).then(|| t.value.clone()),
                        effect: t.effect.as_str().to_owned(),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        status: Some(status),
    }
}

/// The node's status: capacity, allocatable, addresses, info and the four conditions.
/// `previous` keeps each condition's transition time while its status is unchanged.
pub fn status(
    node_name: &str,
    facts: &HostFacts,
    max_pods: u32,
    thresholds: Thresholds,
    readiness: Readiness,
    now: jiff::Timestamp,
    previous: &[NodeCondition],
) -> NodeStatus {
    let q = |v: u64| Quantity(v.to_string());
    let capacity = BTreeMap::from([
        ("cpu".to_owned(), q(facts.cpus)),
        ("memory".to_owned(), Quantity(format!("{}Ki", facts.memory_total / 1024))),
        ("ephemeral-storage".to_owned(), Quantity(format!("{}Ki", facts.disk_total / 1024))),
        ("pods".to_owned(), q(max_pods as u64)),
    ]);
    // Allocatable leaves out what the kubelet's default eviction thresholds hold back.
    let alloc_mem = facts.memory_total.saturating_sub(thresholds.memory_bytes);
    let alloc_disk = facts.disk_total / 100 * (100 - thresholds.disk_percent);
    let allocatable = BTreeMap::from([
        ("cpu".to_owned(), q(facts.cpus)),
        ("memory".to_owned(), Quantity(format!("{}Ki", alloc_mem / 1024))),
        ("ephemeral-storage".to_owned(), Quantity(format!("{}Ki", alloc_disk / 1024))),
        ("pods".to_owned(), q(max_pods as u64)),
    ]);
    let mut addresses = Vec::new();
    if let Some(ip) = facts.ip {
        addresses.push(NodeAddress { type_: "InternalIP".into(), address: ip.to_string() });
    }
    addresses.push(NodeAddress { type_: "Hostname".into(), address: node_name.to_owned() });

    let memory_pressure = facts.memory_total > 0 && facts.memory_available < thresholds.memory_bytes;
    let disk_pressure =
        facts.disk_total > 0 && facts.disk_available * 100 < facts.disk_total * thresholds.disk_percent;
    let ready = readiness == Readiness::Ready;
    let cond = |kind: &str, status: bool, reason: &str, message: &str| {
        let s = if status { "True" } else { "False" };
        let since = previous
            .iter()
            .find(|c| c.type_ == kind && c.status == s)
            .and_then(|c| c.last_transition_time.clone())
            .unwrap_or(Time(now));
        NodeCondition {
            type_: kind.to_owned(),
            status: s.to_owned(),
            reason: Some(reason.to_owned()),
            message: Some(message.to_owned()),
            last_heartbeat_time: Some(Time(now)),
            last_transition_time: Some(since),
        }
    };
    let conditions = vec![
        if memory_pressure {
            cond(
                "MemoryPressure",
                true,
                "KubeletHasInsufficientMemory",
                "node's available memory is below the memory pressure threshold",
            )
        } else {
            cond(
                "MemoryPressure",
                false,
                "KubeletHasSufficientMemory",
                "node has sufficient memory available",
            )
        },
        if disk_pressure {
            cond(
                "DiskPressure",
                true,
                "KubeletHasDiskPressure",
                "node's free disk is below the disk pressure threshold",
            )
        } else {
            cond("DiskPressure", false, "KubeletHasNoDiskPressure", "node has no disk pressure")
        },
        // Modules run inside the agent's process, so pods consume no PIDs.
        cond("PIDPressure", false, "KubeletHasSufficientPID", "node has sufficient PID available"),
        if ready {
            cond("Ready", true, "KubeletReady", "lichen is posting ready status")
        } else {
            cond("Ready", false, "KubeletNotReady", "lichen is shutting down")
        },
    ];
    NodeStatus {
        capacity: Some(capacity),
        allocatable: Some(allocatable),
        addresses: Some(addresses),
        conditions: Some(conditions),
        node_info: Some(NodeSystemInfo {
            architecture: kube_arch().to_owned(),
            operating_system: "linux".to_owned(),
            kernel_version: facts.kernel.clone(),
            os_image: facts.os_image.clone(),
            kubelet_version: kubelet_version(),
            kube_proxy_version: String::new(),
            container_runtime_version: format!("wasmtime://{}", crate::runtime::WASMTIME_VERSION),
            machine_id: facts.machine_id.clone(),
            system_uuid: String::new(),
            boot_id: facts.boot_id.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The status with heartbeat times removed: two statuses that compare equal here need no new write
/// except for the periodic one.
pub fn significant(status: &NodeStatus) -> NodeStatus {
    let mut s = status.clone();
    for c in s.conditions.iter_mut().flatten() {
        c.last_heartbeat_time = None;
    }
    s
}

/// `nodeInfo.kubeletVersion`: `v0.1.0-lichen`, or `v0.1.0-lichen+<build id>` (valid semver, as
/// tools reading the column expect).
pub fn kubelet_version() -> String {
    match crate::version::build_id() {
        Some(id) => format!("v{}-lichen+{id}", env!("CARGO_PKG_VERSION")),
        None => format!("v{}-lichen", env!("CARGO_PKG_VERSION")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> HostFacts {
        HostFacts {
            cpus: 4,
            memory_total: 4 << 30,
            memory_available: 3 << 30,
            disk_total: 32 << 30,
            disk_available: 20 << 30,
            kernel: "6.1.0".into(),
            os_image: "Raspbian".into(),
            ip: Some("10.0.0.7".parse().expect("ip")),
            machine_id: "m".into(),
            boot_id: "b".into(),
        }
    }

    fn condition<'a>(s: &'a NodeStatus, kind: &str) -> &'a NodeCondition {
        s.conditions.iter().flatten().find(|c| c.type_ == kind).expect("condition")
    }

    #[test]
    fn the_scheduler_gets_everything_it_needs() {
        let s = status(
            "pi",
            &facts(),
            110,
            Thresholds::default(),
            Readiness::Ready,
            jiff::Timestamp::UNIX_EPOCH,
            &[],
        );
        let alloc = s.allocatable.as_ref().expect("allocatable");
        assert_eq!(alloc["pods"].0, "110", "the scheduler ignores nodes without allocatable pods");
        assert_eq!(alloc["cpu"].0, "4");
        assert_eq!(alloc["memory"].0, format!("{}Ki", ((4u64 << 30) - (100 << 20)) / 1024));
        assert_eq!(condition(&s, "Ready").status, "True");
        assert_eq!(condition(&s, "MemoryPressure").status, "False");
        let addrs = s.addresses.as_ref().expect("addresses");
        assert_eq!((addrs[0].type_.as_str(), addrs[0].address.as_str()), ("InternalIP", "10.0.0.7"));
        let info = s.node_info.as_ref().expect("info");
        assert!(info.container_runtime_version.starts_with("wasmtime://48."));
    }

    #[test]
    fn pressure_and_stopping_are_reported_honestly() {
        let mut f = facts();
        f.memory_available = 50 << 20;
        f.disk_available = 1 << 30;
        let s = status(
            "pi",
            &f,
            110,
            Thresholds::default(),
            Readiness::Stopping,
            jiff::Timestamp::UNIX_EPOCH,
            &[],
        );
        assert_eq!(condition(&s, "MemoryPressure").status, "True");
        assert_eq!(condition(&s, "DiskPressure").status, "True");
        let ready = condition(&s, "Ready");
        assert_eq!((ready.status.as_str(), ready.reason.as_deref()), ("False", Some("KubeletNotReady")));
        let relaxed = Thresholds { memory_bytes: 10 << 20, disk_percent: 0 };
        let s = status("pi", &f, 110, relaxed, Readiness::Ready, jiff::Timestamp::UNIX_EPOCH, &[]);
        assert_eq!(condition(&s, "MemoryPressure").status, "False", "thresholds are configurable");
        assert_eq!(condition(&s, "DiskPressure").status, "False", "0 turns disk pressure off");
    }

    #[test]
    fn transition_times_hold_while_status_holds() {
        let t0 = jiff::Timestamp::UNIX_EPOCH;
        let t1 = t0 + jiff::SignedDuration::from_secs(60);
        let first = status("pi", &facts(), 110, Thresholds::default(), Readiness::Ready, t0, &[]);
        let again = status(
            "pi",
            &facts(),
            110,
            Thresholds::default(),
            Readiness::Ready,
            t1,
            first.conditions.as_deref().unwrap_or(&[]),
        );
        let r = condition(&again, "Ready");
        assert_eq!(r.last_transition_time, Some(Time(t0)));
        assert_eq!(r.last_heartbeat_time, Some(Time(t1)));
        assert_eq!(significant(&first), significant(&again));
        let stopping = status(
            "pi",
            &facts(),
            110,
            Thresholds::default(),
            Readiness::Stopping,
            t1,
            first.conditions.as_deref().unwrap_or(&[]),
        );
        assert_eq!(condition(&stopping, "Ready").last_transition_time, Some(Time(t1)));
    }

    #[test]
    fn labels_and_taints() {
        let user = BTreeMap::from([("acme.io/site".to_owned(), "barn".to_owned())]);
        let l = labels("pi-07", &user);
        assert_eq!(l["lichen.dev/runtime"], "wasm");
        assert_eq!(l["kubernetes.io/hostname"], "pi-07");
        assert_eq!(l["acme.io/site"], "barn");
        let taint = TaintSpec::default_taint();
        let node = registration("pi-07", &user, &[taint], NodeStatus::default());
        let t = &node.spec.and_then(|s| s.taints).expect("taints")[0];
        assert_eq!(
            (t.key.as_str(), t.value.as_deref(), t.effect.as_str()),
            ("lichen.dev/runtime", Some("wasm"), "NoSchedule")
        );
    }
}
