//! Facts about the board (ground floor): CPUs, memory, disk, kernel, OS image, address, as the
//! Node object and node telemetry report them. It reads `/proc`, `/etc` and the state directory's
//! filesystem; it imports nothing from the crate.

use std::net::IpAddr;
use std::path::Path;

/// What the host looks like right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// Usable CPUs.
    pub cpus: u64,
    /// `MemTotal`, bytes.
    pub memory_total: u64,
    /// `MemAvailable`, bytes.
    pub memory_available: u64,
    /// Size of the filesystem holding the state directory, bytes.
    pub disk_total: u64,
    /// Space available to unprivileged users there, bytes.
    pub disk_available: u64,
    /// `uname -r`.
    pub kernel: String,
    /// `PRETTY_NAME` from /etc/os-release.
    pub os_image: String,
    /// The node's address.
    pub ip: Option<IpAddr>,
    /// `/etc/machine-id`.
    pub machine_id: String,
    /// This boot's id.
    pub boot_id: String,
}

impl HostFacts {
    /// Reads the host. `node_ip` (from config) wins over detection; `state_dir` picks the disk.
    pub fn read(state_dir: &Path, node_ip: Option<IpAddr>) -> HostFacts {
        let text = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let mut facts = HostFacts {
            cpus: std::thread::available_parallelism().map(|n| n.get() as u64).unwrap_or(1),
            memory_total: 0,
            memory_available: 0,
            disk_total: 0,
            disk_available: 0,
            kernel: rustix::system::uname().release().to_string_lossy().into_owned(),
            os_image: os_image(&text("/etc/os-release")),
            ip: None,
            machine_id: text("/etc/machine-id").trim().to_owned(),
            boot_id: text("/proc/sys/kernel/random/boot_id").trim().to_owned(),
        };
        facts.refresh(state_dir, node_ip);
        facts
    }

    /// Re-reads what changes while the agent runs (memory, disk, a DHCP address); the kernel, OS
    /// image and ids stay as they were read at start.
    pub fn refresh(&mut self, state_dir: &Path, node_ip: Option<IpAddr>) {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        self.memory_total = meminfo_field(&meminfo, "MemTotal:");
        self.memory_available = meminfo_field(&meminfo, "MemAvailable:");
        (self.disk_total, self.disk_available) = disk(state_dir);
        self.ip = node_ip_or_detected(node_ip);
    }
}

/// The whole host's CPU and memory use, as the kubelet reports a node's (its root cgroup's): all
/// processes, not the agent's alone, so `kubectl top nodes` compares with the node's capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostUsage {
    /// CPU time every CPU spent not idle since boot (user, nice, system, irq, softirq, steal),
    /// nanoseconds.
    pub cpu_nanos: u64,
    /// When the host booted, Unix seconds.
    pub boot_time: i64,
    /// `MemTotal`, bytes.
    pub memory_total: u64,
    /// `MemTotal - MemFree`: what the root memory cgroup counts as used (page cache included).
    pub memory_usage: u64,
    /// The usage less the inactive file cache, which the kernel reclaims first: the kubelet's
    /// working set.
    pub memory_working_set: u64,
}

impl HostUsage {
    /// Reads `/proc/stat` and `/proc/meminfo`; `None` where they are missing (not Linux).
    pub fn read() -> Option<HostUsage> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
        let ticks_per_second = rustix::param::clock_ticks_per_second();
        HostUsage::parse(&stat, &meminfo, ticks_per_second)
    }

    /// The usage from the text of `/proc/stat` and `/proc/meminfo`, with the kernel's `USER_HZ`.
    pub fn parse(stat: &str, meminfo: &str, ticks_per_second: u64) -> Option<HostUsage> {
        let cpu = stat.lines().find_map(|l| l.strip_prefix("cpu "))?;
        let ticks: Vec<u64> = cpu.split_whitespace().map(|t| t.parse().unwrap_or(0)).collect();
        // user nice system idle iowait irq softirq steal (guest time is already in user and nice).
        let busy: u64 = [0, 1, 2, 5, 6, 7].iter().map(|&i| ticks.get(i).copied().unwrap_or(0)).sum();
        let boot_time = stat.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()?;
        let memory_total = meminfo_field(meminfo, "MemTotal:");
        if memory_total == 0 || ticks_per_second == 0 {
            return None;
        }
        let memory_usage = memory_total.saturating_sub(meminfo_field(meminfo, "MemFree:"));
        Some(HostUsage {
            cpu_nanos: busy.saturating_mul(1_000_000_000 / ticks_per_second),
            boot_time,
            memory_total,
            memory_usage,
            memory_working_set: memory_usage.saturating_sub(meminfo_field(meminfo, "Inactive(file):")),
        })
    }
}

/// The configured address, or the one of the default-route interface.
pub fn node_ip_or_detected(configured: Option<IpAddr>) -> Option<IpAddr> {
    configured.or_else(default_route_ip)
}

/// A `/proc/meminfo` field in bytes (0 if absent).
pub fn meminfo_field(meminfo: &str, name: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Total and available bytes of the filesystem holding `path`.
pub fn disk(path: &Path) -> (u64, u64) {
    // The state dir may not exist yet at first start; its nearest existing ancestor is on the same disk.
    let mut p = path;
    while !p.exists() {
        match p.parent() {
            Some(parent) => p = parent,
            None => break,
        }
    }
    match rustix::fs::statvfs(p) {
        Ok(s) => (s.f_blocks * s.f_frsize, s.f_bavail * s.f_frsize),
        Err(_) => (0, 0),
    }
}

/// `PRETTY_NAME` from an os-release file, unquoted.
pub fn os_image(os_release: &str) -> String {
    os_release
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .unwrap_or_else(|| "Linux".to_owned())
}

/// The source address the kernel would use for the default route. Connecting a UDP socket sends
/// nothing; it only makes the kernel pick a route and a source address.
fn default_route_ip() -> Option<IpAddr> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    sock.connect("192.0.2.1:9").ok()?; // TEST-NET-1: never routed anywhere real
    let ip = sock.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

/// The Kubernetes name of the architecture this binary was built for.
pub fn kube_arch() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "arm64",
        "arm" => "arm",
        "x86_64" => "amd64",
        "x86" => "386",
        other => other,
    }
}

/// The kernel's host name, as the kubelet uses for the node name by default.
pub fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_usage_is_busy_cpu_time_and_memory_less_inactive_cache() {
        let stat = "cpu  100 20 30 5000 40 5 6 7 8 9\ncpu0 50 10 15 2500 20 2 3 3 4 4\nbtime 1700000000\n";
        let meminfo =
            "MemTotal:  1000 kB\nMemFree:  300 kB\nMemAvailable:  600 kB\nInactive(file):  200 kB\n";
        let u = HostUsage::parse(stat, meminfo, 100).expect("parsed");
        // 100 + 20 + 30 + 5 + 6 + 7 ticks of 10 ms: idle, iowait and guest time left out.
        assert_eq!(u.cpu_nanos, 168 * 10_000_000);
        assert_eq!(u.boot_time, 1_700_000_000);
        assert_eq!((u.memory_total, u.memory_usage, u.memory_working_set), (1_024_000, 716_800, 512_000));
        assert_eq!(HostUsage::parse("", meminfo, 100), None);
        let live = HostUsage::read().expect("this host has /proc");
        assert!(
            live.cpu_nanos > 0 && live.memory_working_set > 0 && live.memory_working_set <= live.memory_total
        );
    }

    #[test]
    fn reads_this_host() {
        let f = HostFacts::read(Path::new("/nonexistent/state"), Some("127.0.0.1".parse().expect("ip")));
        assert!(f.cpus >= 1 && f.memory_total > 0 && f.memory_available <= f.memory_total, "{f:?}");
        assert!(f.disk_total > 0 && f.disk_available <= f.disk_total, "{f:?}");
        assert!(!f.kernel.is_empty());
        assert_eq!(f.ip, Some("127.0.0.1".parse().expect("ip")));
    }

    #[test]
    fn os_image_is_the_pretty_name() {
        assert_eq!(
            os_image("NAME=x\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n"),
            "Debian GNU/Linux 12 (bookworm)"
        );
        assert_eq!(os_image(""), "Linux");
    }
}
