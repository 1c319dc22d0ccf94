//! The agent's one configuration struct: a TOML file, overridden by environment variables, overridden
//! by command-line flags, validated once at start-up.
//!
//! Every field is documented in the README's configuration reference; keep the two in step. This module
//! only reads and checks settings: it opens no store and starts nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::broker::{BrokerUrl, BrokerUrlError};
use crate::quantity::ByteSize;
use crate::topic::{TopicError, TopicFilter};

/// Where the config file is looked for when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/lichen/config.toml";

/// Errors from loading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named with `--config` (or `LICHEN_CONFIG`) could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown fields or wrongly typed values.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, which names the field and the line.
        message: String,
    },
    /// A value parsed but is not acceptable.
    #[error("invalid value for `{field}`: {message}")]
    Invalid {
        /// The TOML name of the field (flag and env names are listed in the README).
        field: &'static str,
        /// What is wrong and how to fix it.
        message: String,
    },
}

/// Output format of the agent's own logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (journald adds its own timestamps).
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// The whole agent configuration, after defaults, file, environment and flags have been merged.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// The node's name; defaults to the host name.
    pub node_name: String,
    /// Where the state store, volumes and container logs live.
    pub state_dir: PathBuf,
    /// A directory of Pod manifests run without a cluster, like kubelet's `--pod-manifest-path`.
    /// An empty path turns static pods off.
    pub static_pod_dir: PathBuf,
    /// The most pods this node admits; more are refused with `OutOfpods`.
    pub max_pods: u32,
    /// How long shutdown waits for pods and the store before giving up.
    pub shutdown_timeout_secs: u64,
    /// The agent's own logging.
    pub log: LogConfig,
    /// WebAssembly execution limits.
    pub runtime: RuntimeConfig,
    /// Where containers' stdout and stderr go.
    pub container_logs: ContainerLogConfig,
    /// Kubeconfig for joining a cluster; empty means standalone (static pods only).
    pub kubeconfig: PathBuf,
    /// The address reported as the node's InternalIP; empty means that of the default-route interface.
    pub node_ip: String,
    /// Labels added to the Node besides the ones Lichen sets.
    pub node_labels: BTreeMap<String, String>,
    /// Taints the Node registers with, as `key=value:Effect` or `key:Effect`.
    pub node_taints: Vec<String>,
    /// Memory available below which the node reports MemoryPressure (the kubelet's `memory.available`).
    pub memory_pressure_threshold: ByteSize,
    /// Percent of the state directory's disk free below which the node reports DiskPressure
    /// (the kubelet's `nodefs.available`).
    pub disk_pressure_percent: u32,
    /// Where modules come from and how many are kept.
    pub modules: ModulesConfig,
    /// What the node does while it cannot reach the API server, and when it is back.
    pub autonomy: AutonomyConfig,
    /// The MQTT telemetry bridge; off unless `mqtt.broker` is set.
    pub mqtt: MqttConfig,
    /// Zero-touch join with a bootstrap token; off unless `join.server` is set.
    pub join: JoinConfig,
    /// The Hostname address reported on the Node (the API server dials it first for `kubectl
    /// logs`); empty means the machine's host name.
    pub node_hostname: String,
    /// The local health and Prometheus metrics endpoint.
    pub metrics: MetricsConfig,
    /// The kubelet API the API server calls for `kubectl logs` (cluster nodes only).
    pub kubelet_api: KubeletApiConfig,
}

/// `/healthz` and `/metrics`, plain HTTP on a local address.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `host:port` to serve on; empty turns the endpoint off. Loopback by default: metrics name
    /// pods, and a scraper on the board (or an SSH tunnel) needs no more.
    pub address: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { address: "127.0.0.1:10248".into() }
    }
}

impl MetricsConfig {
    /// The parsed address, unless the endpoint is off.
    pub fn socket_addr(&self) -> Option<std::net::SocketAddr> {
        self.address.parse().ok()
    }
}

/// The kubelet API: TLS, authenticated and authorized through the API server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubeletApiConfig {
    /// TCP port, reported to the cluster as `status.daemonEndpoints.kubeletEndpoint.Port`; 0 turns
    /// the kubelet API off.
    pub port: u16,
    /// The address to listen on.
    pub address: String,
    /// PEM serving certificate; empty means one from a `kubernetes.io/kubelet-serving` CSR (see
    /// `serving_csr`), self-signed until it is issued.
    pub tls_cert_file: PathBuf,
    /// PEM key of `tls_cert_file`.
    pub tls_private_key_file: PathBuf,
    /// PEM CA that client certificates must chain to; empty means the cluster CA of the kubeconfig.
    pub client_ca_file: PathBuf,
    /// Ask the cluster for a serving certificate (signer `kubernetes.io/kubelet-serving`, SANs the
    /// node's addresses). Clusters approve these by hand or with an approver; until then, and if
    /// this is off, the API is served with a self-signed certificate as the kubelet does by default.
    pub serving_csr: bool,
}

impl Default for KubeletApiConfig {
    fn default() -> Self {
        Self {
            port: 10250,
            address: "0.0.0.0".into(),
            tls_cert_file: PathBuf::new(),
            tls_private_key_file: PathBuf::new(),
            client_ca_file: PathBuf::new(),
            serving_csr: true,
        }
    }
}

impl KubeletApiConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, message| ConfigError::Invalid { field, message };
        if self.port != 0 && self.address.parse::<std::net::IpAddr>().is_err() {
            return Err(invalid(
                "kubelet_api.address",
                format!("{:?} is not an IP address (0.0.0.0 listens on all)", self.address),
            ));
        }
        let (cert, key) =
            (self.tls_cert_file.as_os_str().is_empty(), self.tls_private_key_file.as_os_str().is_empty());
        if cert != key {
            return Err(invalid(
                "kubelet_api.tls_cert_file",
                "tls_cert_file and tls_private_key_file go together: set both or neither".into(),
            ));
        }
        Ok(())
    }
}

/// Joining a cluster with a bootstrap token: the agent asks for a node client certificate with a
/// CertificateSigningRequest, keeps it in `<state_dir>/pki/` and renews it before it expires. Off
/// while `server` is empty. `Debug` never shows the token.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JoinConfig {
    /// The API server, `https://host[:port]`; empty turns joining off.
    pub server: String,
    /// PEM file of the cluster's certificate authority (the API server's certificate must chain to it).
    pub ca_cert: PathBuf,
    /// The bootstrap token `<id>.<secret>`. Prefer `token_file` or `LICHEN_JOIN_TOKEN`: this file
    /// is readable by the lichen group and outlives the join.
    pub token: String,
    /// A file holding the bootstrap token; empty means `<state_dir>/bootstrap-token`. Lichen deletes
    /// it once the node has its certificate, when the file is under `state_dir`.
    pub token_file: PathBuf,
    /// How long to wait for the CSR to be approved and signed before giving up (and, under
    /// `lichen run`, trying again later).
    pub approval_timeout_secs: u64,
}

impl Default for JoinConfig {
    fn default() -> Self {
        Self {
            server: String::new(),
            ca_cert: PathBuf::new(),
            token: String::new(),
            token_file: PathBuf::new(),
            approval_timeout_secs: 900,
        }
    }
}

impl std::fmt::Debug for JoinConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinConfig")
            .field("server", &self.server)
            .field("ca_cert", &self.ca_cert)
            .field("token", &if self.token.is_empty() { "" } else { "<redacted>" })
            .field("token_file", &self.token_file)
            .field("approval_timeout_secs", &self.approval_timeout_secs)
            .finish()
    }
}

impl JoinConfig {
    /// Whether joining with a bootstrap token is configured.
    pub fn enabled(&self) -> bool {
        !self.server.is_empty()
    }

    fn validate(&mut self, state_dir: &Path) -> Result<(), ConfigError> {
        let invalid = |field, message: String| ConfigError::Invalid { field, message };
        if !self.enabled() {
            return Ok(());
        }
        if !self.server.starts_with("https://") {
            return Err(invalid(
                "join.server",
                format!(
                    "{:?} must be an https:// URL: a bootstrap token must never cross the network in clear",
                    self.server
                ),
            ));
        }
        if self.ca_cert.as_os_str().is_empty() {
            return Err(invalid(
                "join.ca_cert",
                "is required with join.server: the cluster CA certificate (/etc/kubernetes/pki/ca.crt on a kubeadm control plane)"
                    .into(),
            ));
        }
        if !self.token.is_empty() {
            crate::token::BootstrapToken::parse(&self.token)
                .map_err(|e| invalid("join.token", e.to_string()))?;
        }
        if self.token_file.as_os_str().is_empty() {
            self.token_file = crate::layout::StateLayout::new(state_dir).bootstrap_token();
        }
        if self.approval_timeout_secs == 0 {
            return Err(invalid("join.approval_timeout_secs", "must be at least 1".into()));
        }
        Ok(())
    }
}

/// The MQTT telemetry bridge: the broker connection, node telemetry, the durable spool and the
/// limits that keep a flooding module from hurting the node. Everything is off (no task, no tree
/// touched) while `broker` is empty.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// `mqtt://host[:port]` (default port 1883) or `mqtts://host[:port]` (8883); empty (`None`)
    /// turns MQTT off.
    #[serde(serialize_with = "broker_or_off::serialize", deserialize_with = "broker_or_off::broker")]
    pub broker: Option<BrokerUrl>,
    /// The MQTT client id; empty means the node name.
    pub client_id: String,
    /// User name sent in CONNECT; empty sends none.
    pub username: String,
    /// A file holding the password (trailing newline ignored), so it never appears in `ps` or the
    /// config file; empty sends none.
    pub password_file: PathBuf,
    /// PEM CA certificates trusted for `mqtts://`; empty uses the system's.
    pub ca_file: PathBuf,
    /// PEM client certificate (chain) for mutual TLS; needs `client_key_file`.
    pub client_cert_file: PathBuf,
    /// PEM private key of the client certificate.
    pub client_key_file: PathBuf,
    /// MQTT keep-alive, seconds (5–3600).
    pub keep_alive_secs: u64,
    /// Ask the broker to keep the session (subscriptions, queued QoS 1 messages) while the node is
    /// away (`clean_session = false`).
    pub persistent_session: bool,
    /// First reconnect delay in milliseconds; it doubles up to `reconnect_max_ms`, each ±20%.
    pub reconnect_min_ms: u64,
    /// Longest reconnect delay in milliseconds.
    pub reconnect_max_ms: u64,
    /// Seconds between node telemetry messages on `lichen/<node>/telemetry`; 0 turns them off.
    pub telemetry_interval_secs: u64,
    /// QoS of node telemetry (0 or 1); QoS 1 goes through the spool.
    pub telemetry_qos: u8,
    /// Byte budget of the spool; beyond it the oldest messages are dropped (and counted).
    pub spool_max_bytes: ByteSize,
    /// Group commit: the spool is flushed to disk at most this many milliseconds after a message
    /// is accepted (1–1000).
    pub spool_flush_ms: u64,
    /// Group commit: ... or as soon as this many messages wait to be flushed, whichever is first.
    pub spool_flush_messages: u32,
    /// QoS 1 messages sent and not yet acknowledged at once (1–1000).
    pub inflight: u16,
    /// The largest payload published from a module's line, in bytes; longer lines are dropped.
    pub max_payload: ByteSize,
    /// Messages per second one pod may publish (token bucket); 0 means unlimited.
    pub pod_rate_limit: u32,
    /// Messages a pod may publish at once above its rate before lines are dropped.
    pub pod_burst: u32,
    /// Incoming messages queued for one container's stdin before newer ones are dropped.
    pub stdin_queue: u32,
    /// Gateway mode: bridge a LAN broker to `broker` through the spool. Off unless
    /// `gateway.local_broker` is set.
    pub gateway: GatewayConfig,
}

/// Gateway mode: Lichen connects to a local (LAN) broker as well, and forwards messages between it
/// and the upstream broker (`mqtt.broker`) by topic mapping; upward through the durable spool.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// The local broker, `mqtt://host[:port]` or `mqtts://host[:port]` (system CAs); empty (`None`)
    /// turns gateway mode off.
    #[serde(serialize_with = "broker_or_off::serialize", deserialize_with = "broker_or_off::local_broker")]
    pub local_broker: Option<BrokerUrl>,
    /// The client id on the local broker; empty means `<mqtt.client_id>-gateway`.
    pub client_id: String,
    /// Budget of the durable spool holding upstream messages until the local broker acknowledges
    /// them; beyond it the oldest are dropped (counted).
    pub down_spool_max_bytes: ByteSize,
    /// What is forwarded, and which way.
    pub mappings: Vec<GatewayMapping>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            local_broker: None,
            client_id: String::new(),
            down_spool_max_bytes: ByteSize(16 << 20),
            mappings: Vec::new(),
        }
    }
}

/// One gateway mapping: local topics matching `local` appear upstream under `upstream_prefix`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GatewayMapping {
    /// A filter on the local broker, e.g. `sensors/#`.
    pub local: TopicFilter,
    /// Put before a local topic to make the upstream one (`site1/` makes `sensors/t` into
    /// `site1/sensors/t`), and taken off on the way down. May be empty.
    #[serde(default)]
    pub upstream_prefix: String,
    /// `up` (local to upstream), `down` (upstream to local) or `both`.
    #[serde(default)]
    pub direction: GatewayDirection,
}

impl GatewayMapping {
    /// The filter on the upstream broker that `down`/`both` subscribe.
    pub fn upstream_filter(&self) -> String {
        format!("{}{}", self.upstream_prefix, self.local)
    }

    /// [`Self::upstream_filter`], checked (config validation refuses a mapping where it fails).
    pub fn upstream_topic_filter(&self) -> Result<TopicFilter, TopicError> {
        TopicFilter::parse(self.upstream_filter())
    }

    /// Whether messages go from the local broker upstream.
    pub fn up(&self) -> bool {
        matches!(self.direction, GatewayDirection::Up | GatewayDirection::Both)
    }

    /// Whether messages go from upstream to the local broker.
    pub fn down(&self) -> bool {
        matches!(self.direction, GatewayDirection::Down | GatewayDirection::Both)
    }
}

/// Which way a gateway mapping forwards.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum GatewayDirection {
    /// Local broker to upstream.
    #[default]
    Up,
    /// Upstream to the local broker.
    Down,
    /// Both ways.
    Both,
}

/// Gateway mappings as a flag or environment variable: a TOML inline array, e.g.
/// `[{ local = "sensors/#", upstream_prefix = "site1/", direction = "both" }]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayMappings(pub Vec<GatewayMapping>);

/// A `--mqtt-gateway-mappings` value that is not a TOML inline array of mappings.
#[derive(Debug, thiserror::Error)]
#[error(
    "{source}; write a TOML inline array, e.g. [{{ local = \"sensors/#\", upstream_prefix = \"site1/\", direction = \"up\" }}]"
)]
pub struct MappingsError {
    #[source]
    source: toml::de::Error,
}

fn parse_mappings(s: &str) -> Result<GatewayMappings, MappingsError> {
    #[derive(Deserialize)]
    struct Wrap {
        m: Vec<GatewayMapping>,
    }
    let text = if s.trim().is_empty() { "[]" } else { s };
    toml::from_str::<Wrap>(&format!("m = {text}"))
        .map(|w| GatewayMappings(w.m))
        .map_err(|source| MappingsError { source })
}

/// A broker URL as a flag or environment variable: empty turns the connection off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerArg(pub Option<BrokerUrl>);

fn parse_broker_arg(s: &str) -> Result<BrokerArg, BrokerUrlError> {
    if s.is_empty() { Ok(BrokerArg(None)) } else { BrokerUrl::parse(s).map(|u| BrokerArg(Some(u))) }
}

/// A broker URL in the file: the same string as always, `""` for off. A refused URL names its
/// field, as validation errors do.
mod broker_or_off {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    use super::BrokerUrl;

    pub(super) fn serialize<S: Serializer>(url: &Option<BrokerUrl>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(url.as_ref().map_or("", BrokerUrl::as_str))
    }

    fn parse<'de, D: Deserializer<'de>>(d: D, field: &str) -> Result<Option<BrokerUrl>, D::Error> {
        let text = String::deserialize(d)?;
        if text.is_empty() {
            return Ok(None);
        }
        BrokerUrl::parse(&text)
            .map(Some)
            .map_err(|e| D::Error::custom(format!("invalid value for `{field}`: {e}")))
    }

    pub(super) fn broker<'de, D: Deserializer<'de>>(d: D) -> Result<Option<BrokerUrl>, D::Error> {
        parse(d, "mqtt.broker")
    }

    pub(super) fn local_broker<'de, D: Deserializer<'de>>(d: D) -> Result<Option<BrokerUrl>, D::Error> {
        parse(d, "mqtt.gateway.local_broker")
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            broker: None,
            client_id: String::new(),
            username: String::new(),
            password_file: PathBuf::new(),
            ca_file: PathBuf::new(),
            client_cert_file: PathBuf::new(),
            client_key_file: PathBuf::new(),
            keep_alive_secs: 30,
            persistent_session: true,
            reconnect_min_ms: 500,
            reconnect_max_ms: 60_000,
            telemetry_interval_secs: 30,
            telemetry_qos: 1,
            spool_max_bytes: ByteSize(64 << 20),
            spool_flush_ms: 5,
            spool_flush_messages: 256,
            inflight: 100,
            max_payload: ByteSize(64 << 10),
            pod_rate_limit: 100,
            pod_burst: 1000,
            stdin_queue: 64,
            gateway: GatewayConfig::default(),
        }
    }
}

impl MqttConfig {
    /// Whether MQTT is on (a broker is configured).
    pub fn enabled(&self) -> bool {
        self.broker.is_some()
    }

    fn validate(&mut self) -> Result<(), ConfigError> {
        let invalid = |field, message: String| ConfigError::Invalid { field, message };
        if !self.enabled() {
            return Ok(());
        }
        if !self.client_id.is_empty() && self.client_id.len() > 65_535 {
            return Err(invalid("mqtt.client_id", "is longer than MQTT allows (65535 bytes)".into()));
        }
        if self.client_cert_file.as_os_str().is_empty() != self.client_key_file.as_os_str().is_empty() {
            return Err(invalid(
                "mqtt.client_cert_file",
                "client_cert_file and client_key_file go together: set both for mutual TLS, or neither"
                    .into(),
            ));
        }
        if !(5..=3600).contains(&self.keep_alive_secs) {
            return Err(invalid(
                "mqtt.keep_alive_secs",
                format!("{} is outside 5..=3600", self.keep_alive_secs),
            ));
        }
        if self.reconnect_min_ms == 0 || self.reconnect_max_ms < self.reconnect_min_ms {
            return Err(invalid(
                "mqtt.reconnect_max_ms",
                format!(
                    "need 0 < reconnect_min_ms ({}) <= reconnect_max_ms ({})",
                    self.reconnect_min_ms, self.reconnect_max_ms
                ),
            ));
        }
        if self.telemetry_qos > 1 {
            return Err(invalid("mqtt.telemetry_qos", format!("{} is not 0 or 1", self.telemetry_qos)));
        }
        if self.spool_max_bytes.0 < 64 << 10 {
            return Err(invalid("mqtt.spool_max_bytes", format!("{} is below 64Ki", self.spool_max_bytes)));
        }
        if !(1..=1000).contains(&self.spool_flush_ms) {
            return Err(invalid(
                "mqtt.spool_flush_ms",
                format!("{} is outside 1..=1000", self.spool_flush_ms),
            ));
        }
        if self.spool_flush_messages == 0 {
            return Err(invalid("mqtt.spool_flush_messages", "must be at least 1".into()));
        }
        if !(1..=1000).contains(&self.inflight) {
            return Err(invalid("mqtt.inflight", format!("{} is outside 1..=1000", self.inflight)));
        }
        if !(16..=(1 << 20)).contains(&self.max_payload.0) {
            return Err(invalid("mqtt.max_payload", format!("{} is outside 16..=1Mi", self.max_payload)));
        }
        if self.max_payload.0 * 4 > self.spool_max_bytes.0 {
            return Err(invalid(
                "mqtt.max_payload",
                format!(
                    "{} is more than a quarter of mqtt.spool_max_bytes ({})",
                    self.max_payload, self.spool_max_bytes
                ),
            ));
        }
        if self.pod_rate_limit > 0 && self.pod_burst == 0 {
            return Err(invalid("mqtt.pod_burst", "must be at least 1 when pod_rate_limit is set".into()));
        }
        if !(1..=100_000).contains(&self.stdin_queue) {
            return Err(invalid("mqtt.stdin_queue", format!("{} is outside 1..=100000", self.stdin_queue)));
        }
        self.gateway.validate()
    }
}

impl GatewayConfig {
    /// Whether gateway mode is on.
    pub fn enabled(&self) -> bool {
        self.local_broker.is_some()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, message: String| ConfigError::Invalid { field, message };
        if !self.enabled() {
            return Ok(());
        }
        if self.mappings.is_empty() {
            return Err(invalid(
                "mqtt.gateway.mappings",
                "gateway mode needs at least one mapping, e.g. { local = \"sensors/#\", upstream_prefix = \"site1/\", direction = \"up\" }".into(),
            ));
        }
        for m in &self.mappings {
            if m.upstream_prefix.contains(['+', '#', '\0']) || m.upstream_prefix.starts_with('$') {
                return Err(invalid(
                    "mqtt.gateway.mappings",
                    format!(
                        "upstream_prefix = {:?} must not hold wildcards or start with $",
                        m.upstream_prefix
                    ),
                ));
            }
            if m.upstream_topic_filter().is_err() {
                return Err(invalid(
                    "mqtt.gateway.mappings",
                    format!(
                        "upstream_prefix = {:?} before local = {:?} makes the filter {:?}; end the prefix with '/'",
                        m.upstream_prefix,
                        m.local,
                        m.upstream_filter()
                    ),
                ));
            }
        }
        if self.down_spool_max_bytes.0 < 64 << 10 {
            return Err(invalid(
                "mqtt.gateway.down_spool_max_bytes",
                format!("{} is below 64Ki", self.down_spool_max_bytes),
            ));
        }
        Ok(())
    }
}

/// Edge autonomy: running without the control plane.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AutonomyConfig {
    /// How long cluster pods keep running without contact with the API server, in seconds (counted
    /// on the monotonic clock, across agent restarts); 0 means indefinitely. When it passes, the
    /// node's cluster pods are stopped (static pods keep running); they start again once the API
    /// server lists them.
    pub max_offline_secs: u64,
    /// For pods the control plane deleted (evicted) while the node was away: how long they keep
    /// running after the node is back before they are stopped and their deletion confirmed, in
    /// seconds. 0 stops them at once, as the kubelet does.
    pub evicted_grace_secs: u64,
}

/// Module pulls and the module cache.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModulesConfig {
    /// Registries (`host` or `host:port`) that may be reached over plain HTTP; also the hosts that
    /// `http://` module URLs may name. Everything else is HTTPS only.
    pub insecure_registries: Vec<String>,
    /// Directories whose files pods from the cluster may name as `file://` images. Empty: none
    /// (static pods may always use local files).
    pub file_dirs: Vec<PathBuf>,
    /// PEM files of extra certificate authorities trusted for registries and module URLs, on top of
    /// the system's.
    pub registry_ca_files: Vec<PathBuf>,
    /// Byte budget of the module cache (modules and their precompiled artifacts). Least recently used
    /// modules beyond it are removed, never one a pod on this node uses.
    pub cache_size: ByteSize,
    /// The largest module Lichen downloads; a bigger layer or response is refused before or while
    /// it is fetched.
    pub max_module_size: ByteSize,
    /// Pulls that may run at once.
    pub concurrent_pulls: u32,
    /// Seconds one pull may take before it is abandoned and retried with back-off.
    pub pull_timeout_secs: u64,
}

impl Default for ModulesConfig {
    fn default() -> Self {
        Self {
            insecure_registries: Vec::new(),
            file_dirs: Vec::new(),
            registry_ca_files: Vec::new(),
            cache_size: ByteSize(1 << 30),
            max_module_size: ByteSize(64 << 20),
            concurrent_pulls: 2,
            pull_timeout_secs: 300,
        }
    }
}

/// The agent's own logging.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter: `info`, `debug`, or per target such as `info,lichen::runtime=debug`.
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

/// WebAssembly execution limits applied to every container unless a pod asks otherwise.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Fuel (roughly, wasm instructions) one run of a container may burn; 0 means unlimited.
    /// A pod overrides it with the annotation `lichen.dev/fuel`.
    pub default_fuel: u64,
    /// Linear-memory limit for containers without `resources.limits.memory`.
    pub default_memory_limit: ByteSize,
    /// Wall-clock limit of one run of a container, in seconds; 0 means none.
    /// A pod overrides it with the annotation `lichen.dev/run-timeout-seconds`.
    pub run_timeout_secs: u64,
    /// Host directories (prefixes) that pods from the cluster may mount as `hostPath` volumes;
    /// empty (the default) refuses hostPath for cluster pods. Static pods, which only the board's
    /// administrator can write, may mount any path. Anyone who may create pods must not be able to
    /// read the node's key, its store or other pods' secrets under `state_dir`.
    pub allowed_host_paths: Vec<PathBuf>,
}

/// Container log files.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContainerLogConfig {
    /// A container's log file is rotated when it reaches this size.
    pub max_size: ByteSize,
    /// How many files (the live one included) are kept per container run.
    pub max_files: u32,
    /// Also print every line containers write into the agent's own log (handy standalone, noisy at scale).
    pub echo: bool,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            node_name: String::new(),
            state_dir: PathBuf::from("/var/lib/lichen"),
            static_pod_dir: PathBuf::from("/etc/lichen/pods"),
            max_pods: 110,
            shutdown_timeout_secs: 10,
            log: LogConfig::default(),
            runtime: RuntimeConfig::default(),
            container_logs: ContainerLogConfig::default(),
            kubeconfig: PathBuf::new(),
            node_ip: String::new(),
            node_labels: BTreeMap::new(),
            node_taints: vec![DEFAULT_TAINT.to_owned()],
            memory_pressure_threshold: ByteSize(100 << 20),
            disk_pressure_percent: 10,
            modules: ModulesConfig::default(),
            autonomy: AutonomyConfig::default(),
            mqtt: MqttConfig::default(),
            join: JoinConfig::default(),
            node_hostname: String::new(),
            metrics: MetricsConfig::default(),
            kubelet_api: KubeletApiConfig::default(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { level: "info".into(), format: LogFormat::Text }
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            default_fuel: 0,
            default_memory_limit: ByteSize(128 << 20),
            run_timeout_secs: 0,
            allowed_host_paths: Vec::new(),
        }
    }
}

impl Default for ContainerLogConfig {
    fn default() -> Self {
        Self { max_size: ByteSize(10 << 20), max_files: 5, echo: false }
    }
}

/// Command-line flags and environment variables that override the config file, one per field.
#[derive(Debug, Clone, Default, Args)]
pub struct ConfigArgs {
    /// Config file [default: /etc/lichen/config.toml, used only if it exists].
    #[arg(long, short = 'c', env = "LICHEN_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Node name [default: the host name].
    #[arg(long, env = "LICHEN_NODE_NAME", global = true)]
    pub node_name: Option<String>,
    /// State directory [default: /var/lib/lichen].
    #[arg(long, env = "LICHEN_STATE_DIR", global = true)]
    pub state_dir: Option<PathBuf>,
    /// Static pod manifest directory; empty turns static pods off [default: /etc/lichen/pods].
    #[arg(long, env = "LICHEN_STATIC_POD_DIR", global = true, value_parser = path_allow_empty)]
    pub static_pod_dir: Option<PathBuf>,
    /// Most pods admitted [default: 110].
    #[arg(long, env = "LICHEN_MAX_PODS", global = true)]
    pub max_pods: Option<u32>,
    /// Seconds shutdown may take [default: 10].
    #[arg(long, env = "LICHEN_SHUTDOWN_TIMEOUT_SECS", global = true)]
    pub shutdown_timeout_secs: Option<u64>,
    /// Log filter, e.g. `info` or `info,lichen::runtime=debug` [default: info].
    #[arg(long, env = "LICHEN_LOG_LEVEL", global = true)]
    pub log_level: Option<String>,
    /// Log format [default: text].
    #[arg(long, env = "LICHEN_LOG_FORMAT", global = true)]
    pub log_format: Option<LogFormat>,
    /// Fuel per container run, 0 = unlimited [default: 0].
    #[arg(long, env = "LICHEN_DEFAULT_FUEL", global = true)]
    pub default_fuel: Option<u64>,
    /// Memory limit for containers that set none [default: 128Mi].
    #[arg(long, env = "LICHEN_DEFAULT_MEMORY_LIMIT", global = true)]
    pub default_memory_limit: Option<ByteSize>,
    /// Wall-clock seconds per container run, 0 = none [default: 0].
    #[arg(long, env = "LICHEN_RUN_TIMEOUT_SECS", global = true)]
    pub run_timeout_secs: Option<u64>,
    /// Host directories cluster pods may mount as hostPath, comma-separated [default: none].
    #[arg(long, env = "LICHEN_ALLOWED_HOST_PATHS", global = true, value_delimiter = ',')]
    pub allowed_host_paths: Option<Vec<PathBuf>>,
    /// Container log rotation size [default: 10Mi].
    #[arg(long, env = "LICHEN_CONTAINER_LOG_MAX_SIZE", global = true)]
    pub container_log_max_size: Option<ByteSize>,
    /// Container log files kept per run [default: 5].
    #[arg(long, env = "LICHEN_CONTAINER_LOG_MAX_FILES", global = true)]
    pub container_log_max_files: Option<u32>,
    /// Echo container output into the agent log [default: false].
    #[arg(long, env = "LICHEN_CONTAINER_LOG_ECHO", global = true)]
    pub container_log_echo: Option<bool>,
    /// Kubeconfig to join a cluster with; empty = standalone [default: none].
    #[arg(long, env = "LICHEN_KUBECONFIG", global = true, value_parser = path_allow_empty)]
    pub kubeconfig: Option<PathBuf>,
    /// Node InternalIP [default: address of the default-route interface].
    #[arg(long, env = "LICHEN_NODE_IP", global = true)]
    pub node_ip: Option<String>,
    /// Node labels as key=value, comma-separated; replaces the file's list [default: none].
    #[arg(long, env = "LICHEN_NODE_LABELS", global = true, value_delimiter = ',')]
    pub node_labels: Option<Vec<String>>,
    /// Node taints as key=value:Effect, comma-separated; replaces the file's list
    /// [default: lichen.dev/runtime=wasm:NoSchedule].
    #[arg(long, env = "LICHEN_NODE_TAINTS", global = true, value_delimiter = ',')]
    pub node_taints: Option<Vec<String>>,
    /// MemoryPressure below this much available memory [default: 100Mi].
    #[arg(long, env = "LICHEN_MEMORY_PRESSURE_THRESHOLD", global = true)]
    pub memory_pressure_threshold: Option<ByteSize>,
    /// DiskPressure below this percent of free disk, 0 = never [default: 10].
    #[arg(long, env = "LICHEN_DISK_PRESSURE_PERCENT", global = true)]
    pub disk_pressure_percent: Option<u32>,
    /// Registries reachable over plain HTTP, comma-separated host[:port]; replaces the file's list
    /// [default: none].
    #[arg(long, env = "LICHEN_INSECURE_REGISTRIES", global = true, value_delimiter = ',')]
    pub insecure_registries: Option<Vec<String>>,
    /// Directories cluster pods may load file:// modules from, comma-separated [default: none].
    #[arg(long, env = "LICHEN_MODULE_FILE_DIRS", global = true, value_delimiter = ',')]
    pub module_file_dirs: Option<Vec<PathBuf>>,
    /// Extra CA certificate files (PEM) for registries, comma-separated [default: none].
    #[arg(long, env = "LICHEN_REGISTRY_CA_FILES", global = true, value_delimiter = ',')]
    pub registry_ca_files: Option<Vec<PathBuf>>,
    /// Byte budget of the module cache [default: 1Gi].
    #[arg(long, env = "LICHEN_MODULE_CACHE_SIZE", global = true)]
    pub module_cache_size: Option<ByteSize>,
    /// Largest module downloaded [default: 64Mi].
    #[arg(long, env = "LICHEN_MAX_MODULE_SIZE", global = true)]
    pub max_module_size: Option<ByteSize>,
    /// Pulls running at once [default: 2].
    #[arg(long, env = "LICHEN_CONCURRENT_PULLS", global = true)]
    pub concurrent_pulls: Option<u32>,
    /// Seconds a pull may take [default: 300].
    #[arg(long, env = "LICHEN_PULL_TIMEOUT_SECS", global = true)]
    pub pull_timeout_secs: Option<u64>,
    /// Seconds cluster pods run without API contact, 0 = indefinitely [default: 0].
    #[arg(long, env = "LICHEN_MAX_OFFLINE_SECS", global = true)]
    pub max_offline_secs: Option<u64>,
    /// Seconds pods evicted while away keep running once back, 0 = stop at once [default: 0].
    #[arg(long, env = "LICHEN_EVICTED_GRACE_SECS", global = true)]
    pub evicted_grace_secs: Option<u64>,
    /// MQTT broker URL, mqtt:// or mqtts://; empty turns MQTT off [default: none].
    #[arg(long, env = "LICHEN_MQTT_BROKER", global = true, value_parser = parse_broker_arg)]
    pub mqtt_broker: Option<BrokerArg>,
    /// MQTT client id [default: the node name].
    #[arg(long, env = "LICHEN_MQTT_CLIENT_ID", global = true)]
    pub mqtt_client_id: Option<String>,
    /// MQTT user name [default: none].
    #[arg(long, env = "LICHEN_MQTT_USERNAME", global = true)]
    pub mqtt_username: Option<String>,
    /// File holding the MQTT password [default: none].
    #[arg(long, env = "LICHEN_MQTT_PASSWORD_FILE", global = true, value_parser = path_allow_empty)]
    pub mqtt_password_file: Option<PathBuf>,
    /// CA certificates (PEM) for mqtts:// [default: the system's].
    #[arg(long, env = "LICHEN_MQTT_CA_FILE", global = true, value_parser = path_allow_empty)]
    pub mqtt_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS [default: none].
    #[arg(long, env = "LICHEN_MQTT_CLIENT_CERT_FILE", global = true, value_parser = path_allow_empty)]
    pub mqtt_client_cert_file: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS [default: none].
    #[arg(long, env = "LICHEN_MQTT_CLIENT_KEY_FILE", global = true, value_parser = path_allow_empty)]
    pub mqtt_client_key_file: Option<PathBuf>,
    /// MQTT keep-alive seconds [default: 30].
    #[arg(long, env = "LICHEN_MQTT_KEEP_ALIVE_SECS", global = true)]
    pub mqtt_keep_alive_secs: Option<u64>,
    /// Keep the MQTT session while away [default: true].
    #[arg(long, env = "LICHEN_MQTT_PERSISTENT_SESSION", global = true)]
    pub mqtt_persistent_session: Option<bool>,
    /// First MQTT reconnect delay, ms [default: 500].
    #[arg(long, env = "LICHEN_MQTT_RECONNECT_MIN_MS", global = true)]
    pub mqtt_reconnect_min_ms: Option<u64>,
    /// Longest MQTT reconnect delay, ms [default: 60000].
    #[arg(long, env = "LICHEN_MQTT_RECONNECT_MAX_MS", global = true)]
    pub mqtt_reconnect_max_ms: Option<u64>,
    /// Seconds between node telemetry messages, 0 = off [default: 30].
    #[arg(long, env = "LICHEN_MQTT_TELEMETRY_INTERVAL_SECS", global = true)]
    pub mqtt_telemetry_interval_secs: Option<u64>,
    /// QoS of node telemetry, 0 or 1 [default: 1].
    #[arg(long, env = "LICHEN_MQTT_TELEMETRY_QOS", global = true)]
    pub mqtt_telemetry_qos: Option<u8>,
    /// Byte budget of the MQTT spool [default: 64Mi].
    #[arg(long, env = "LICHEN_MQTT_SPOOL_MAX_BYTES", global = true)]
    pub mqtt_spool_max_bytes: Option<ByteSize>,
    /// Group commit window of the spool, ms [default: 5].
    #[arg(long, env = "LICHEN_MQTT_SPOOL_FLUSH_MS", global = true)]
    pub mqtt_spool_flush_ms: Option<u64>,
    /// Group commit size of the spool, messages [default: 256].
    #[arg(long, env = "LICHEN_MQTT_SPOOL_FLUSH_MESSAGES", global = true)]
    pub mqtt_spool_flush_messages: Option<u32>,
    /// Unacknowledged QoS 1 messages in flight [default: 100].
    #[arg(long, env = "LICHEN_MQTT_INFLIGHT", global = true)]
    pub mqtt_inflight: Option<u16>,
    /// Largest payload published from a module line [default: 64Ki].
    #[arg(long, env = "LICHEN_MQTT_MAX_PAYLOAD", global = true)]
    pub mqtt_max_payload: Option<ByteSize>,
    /// Messages per second per pod, 0 = unlimited [default: 100].
    #[arg(long, env = "LICHEN_MQTT_POD_RATE_LIMIT", global = true)]
    pub mqtt_pod_rate_limit: Option<u32>,
    /// Burst above the pod rate [default: 1000].
    #[arg(long, env = "LICHEN_MQTT_POD_BURST", global = true)]
    pub mqtt_pod_burst: Option<u32>,
    /// Incoming messages queued per container stdin [default: 64].
    #[arg(long, env = "LICHEN_MQTT_STDIN_QUEUE", global = true)]
    pub mqtt_stdin_queue: Option<u32>,
    /// API server to join with a bootstrap token, https://host:port; empty = off [default: none].
    #[arg(long, env = "LICHEN_JOIN_SERVER", global = true)]
    pub join_server: Option<String>,
    /// Cluster CA certificate (PEM) for joining [default: none].
    #[arg(long, env = "LICHEN_JOIN_CA_CERT", global = true, value_parser = path_allow_empty)]
    pub join_ca_cert: Option<PathBuf>,
    /// File holding the bootstrap token [default: <state_dir>/bootstrap-token].
    #[arg(long, env = "LICHEN_JOIN_TOKEN_FILE", global = true, value_parser = path_allow_empty)]
    pub join_token_file: Option<PathBuf>,
    /// Seconds to wait for the node's CSR to be approved and signed [default: 900].
    #[arg(long, env = "LICHEN_JOIN_APPROVAL_TIMEOUT_SECS", global = true)]
    pub join_approval_timeout_secs: Option<u64>,
    /// The node's Hostname address [default: the machine's host name].
    #[arg(long, env = "LICHEN_NODE_HOSTNAME", global = true)]
    pub node_hostname: Option<String>,
    /// host:port of /healthz and /metrics, empty = off [default: 127.0.0.1:10248].
    #[arg(long, env = "LICHEN_METRICS_ADDRESS", global = true)]
    pub metrics_address: Option<String>,
    /// Kubelet API port (kubectl logs), 0 = off [default: 10250].
    #[arg(long, env = "LICHEN_KUBELET_PORT", global = true)]
    pub kubelet_port: Option<u16>,
    /// Kubelet API listen address [default: 0.0.0.0].
    #[arg(long, env = "LICHEN_KUBELET_ADDRESS", global = true)]
    pub kubelet_address: Option<String>,
    /// Kubelet API serving certificate, PEM [default: from a kubelet-serving CSR, self-signed until issued].
    #[arg(long, env = "LICHEN_KUBELET_TLS_CERT_FILE", global = true)]
    pub kubelet_tls_cert_file: Option<PathBuf>,
    /// Key of --kubelet-tls-cert-file, PEM.
    #[arg(long, env = "LICHEN_KUBELET_TLS_PRIVATE_KEY_FILE", global = true)]
    pub kubelet_tls_private_key_file: Option<PathBuf>,
    /// CA for kubelet API client certificates [default: the kubeconfig's cluster CA].
    #[arg(long, env = "LICHEN_KUBELET_CLIENT_CA_FILE", global = true)]
    pub kubelet_client_ca_file: Option<PathBuf>,
    /// Request a kubelet-serving certificate from the cluster [default: true].
    #[arg(long, env = "LICHEN_KUBELET_SERVING_CSR", global = true)]
    pub kubelet_serving_csr: Option<bool>,
    /// The bootstrap token, from the environment only: a flag's value is visible in `ps`.
    #[arg(skip = std::env::var("LICHEN_JOIN_TOKEN").ok())]
    pub join_token: Option<String>,
    /// Gateway mode: the local broker, mqtt://host[:port]; empty turns it off [default: none].
    #[arg(long, env = "LICHEN_MQTT_GATEWAY_LOCAL_BROKER", global = true, value_parser = parse_broker_arg)]
    pub mqtt_gateway_local_broker: Option<BrokerArg>,
    /// Gateway client id on the local broker [default: <mqtt client id>-gateway].
    #[arg(long, env = "LICHEN_MQTT_GATEWAY_CLIENT_ID", global = true)]
    pub mqtt_gateway_client_id: Option<String>,
    /// Gateway spool budget for messages to the local broker, e.g. 16Mi [default: 16Mi].
    #[arg(long, env = "LICHEN_MQTT_GATEWAY_DOWN_SPOOL_MAX_BYTES", global = true)]
    pub mqtt_gateway_down_spool_max_bytes: Option<ByteSize>,
    /// Gateway mappings as a TOML inline array [default: none].
    #[arg(long, env = "LICHEN_MQTT_GATEWAY_MAPPINGS", global = true, value_parser = parse_mappings)]
    pub mqtt_gateway_mappings: Option<GatewayMappings>,
}

impl AgentConfig {
    /// Loads the file (if any), applies `args`, resolves defaults that depend on the host, and validates.
    pub fn load(args: &ConfigArgs) -> Result<Self, ConfigError> {
        let (path, required) = match &args.config {
            Some(p) => (p.clone(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        let mut config = match std::fs::read_to_string(&path) {
            Ok(text) => Self::from_toml(&text, &path)?,
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => Self::default(),
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        config.apply(args);
        config.finish()?;
        Ok(config)
    }

    /// Parses a config file's text. Relative paths in it are taken relative to the file's directory,
    /// so a config and its pods can move together.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut config: AgentConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let m = &mut config.mqtt;
        let paths = [
            &mut config.state_dir,
            &mut config.static_pod_dir,
            &mut config.kubeconfig,
            &mut m.password_file,
            &mut m.ca_file,
            &mut m.client_cert_file,
            &mut m.client_key_file,
            &mut config.join.ca_cert,
            &mut config.join.token_file,
            &mut config.kubelet_api.tls_cert_file,
            &mut config.kubelet_api.tls_private_key_file,
            &mut config.kubelet_api.client_ca_file,
        ];
        let lists =
            config.modules.registry_ca_files.iter_mut().chain(config.runtime.allowed_host_paths.iter_mut());
        for p in paths.into_iter().chain(lists) {
            if !p.as_os_str().is_empty() && p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(config)
    }

    fn apply(&mut self, a: &ConfigArgs) {
        fn set<T: Clone>(dst: &mut T, src: &Option<T>) {
            if let Some(v) = src {
                *dst = v.clone();
            }
        }
        set(&mut self.node_name, &a.node_name);
        set(&mut self.state_dir, &a.state_dir);
        set(&mut self.static_pod_dir, &a.static_pod_dir);
        set(&mut self.max_pods, &a.max_pods);
        set(&mut self.shutdown_timeout_secs, &a.shutdown_timeout_secs);
        set(&mut self.log.level, &a.log_level);
        set(&mut self.log.format, &a.log_format);
        set(&mut self.runtime.default_fuel, &a.default_fuel);
        set(&mut self.runtime.default_memory_limit, &a.default_memory_limit);
        set(&mut self.runtime.run_timeout_secs, &a.run_timeout_secs);
        set(&mut self.runtime.allowed_host_paths, &a.allowed_host_paths);
        set(&mut self.container_logs.max_size, &a.container_log_max_size);
        set(&mut self.container_logs.max_files, &a.container_log_max_files);
        set(&mut self.container_logs.echo, &a.container_log_echo);
        set(&mut self.kubeconfig, &a.kubeconfig);
        set(&mut self.node_ip, &a.node_ip);
        set(&mut self.node_taints, &a.node_taints);
        set(&mut self.memory_pressure_threshold, &a.memory_pressure_threshold);
        set(&mut self.disk_pressure_percent, &a.disk_pressure_percent);
        set(&mut self.modules.insecure_registries, &a.insecure_registries);
        set(&mut self.modules.file_dirs, &a.module_file_dirs);
        set(&mut self.modules.registry_ca_files, &a.registry_ca_files);
        set(&mut self.modules.cache_size, &a.module_cache_size);
        set(&mut self.modules.max_module_size, &a.max_module_size);
        set(&mut self.modules.concurrent_pulls, &a.concurrent_pulls);
        set(&mut self.modules.pull_timeout_secs, &a.pull_timeout_secs);
        set(&mut self.autonomy.max_offline_secs, &a.max_offline_secs);
        set(&mut self.autonomy.evicted_grace_secs, &a.evicted_grace_secs);
        let m = &mut self.mqtt;
        if let Some(BrokerArg(b)) = &a.mqtt_broker {
            m.broker = b.clone();
        }
        set(&mut m.client_id, &a.mqtt_client_id);
        set(&mut m.username, &a.mqtt_username);
        set(&mut m.password_file, &a.mqtt_password_file);
        set(&mut m.ca_file, &a.mqtt_ca_file);
        set(&mut m.client_cert_file, &a.mqtt_client_cert_file);
        set(&mut m.client_key_file, &a.mqtt_client_key_file);
        set(&mut m.keep_alive_secs, &a.mqtt_keep_alive_secs);
        set(&mut m.persistent_session, &a.mqtt_persistent_session);
        set(&mut m.reconnect_min_ms, &a.mqtt_reconnect_min_ms);
        set(&mut m.reconnect_max_ms, &a.mqtt_reconnect_max_ms);
        set(&mut m.telemetry_interval_secs, &a.mqtt_telemetry_interval_secs);
        set(&mut m.telemetry_qos, &a.mqtt_telemetry_qos);
        set(&mut m.spool_max_bytes, &a.mqtt_spool_max_bytes);
        set(&mut m.spool_flush_ms, &a.mqtt_spool_flush_ms);
        set(&mut m.spool_flush_messages, &a.mqtt_spool_flush_messages);
        set(&mut m.inflight, &a.mqtt_inflight);
        set(&mut m.max_payload, &a.mqtt_max_payload);
        set(&mut m.pod_rate_limit, &a.mqtt_pod_rate_limit);
        set(&mut m.pod_burst, &a.mqtt_pod_burst);
        set(&mut m.stdin_queue, &a.mqtt_stdin_queue);
        let j = &mut self.join;
        set(&mut j.server, &a.join_server);
        set(&mut j.ca_cert, &a.join_ca_cert);
        set(&mut j.token_file, &a.join_token_file);
        set(&mut j.approval_timeout_secs, &a.join_approval_timeout_secs);
        set(&mut self.node_hostname, &a.node_hostname);
        set(&mut self.metrics.address, &a.metrics_address);
        let k = &mut self.kubelet_api;
        set(&mut k.port, &a.kubelet_port);
        set(&mut k.address, &a.kubelet_address);
        set(&mut k.tls_cert_file, &a.kubelet_tls_cert_file);
        set(&mut k.tls_private_key_file, &a.kubelet_tls_private_key_file);
        set(&mut k.client_ca_file, &a.kubelet_client_ca_file);
        set(&mut k.serving_csr, &a.kubelet_serving_csr);
        set(&mut j.token, &a.join_token);
        if let Some(BrokerArg(b)) = &a.mqtt_gateway_local_broker {
            m.gateway.local_broker = b.clone();
        }
        set(&mut m.gateway.client_id, &a.mqtt_gateway_client_id);
        set(&mut m.gateway.down_spool_max_bytes, &a.mqtt_gateway_down_spool_max_bytes);
        if let Some(GatewayMappings(v)) = &a.mqtt_gateway_mappings {
            m.gateway.mappings = v.clone();
        }
        if let Some(labels) = &a.node_labels {
            // A malformed entry keeps its text as the key so validation names it.
            self.node_labels = labels
                .iter()
                .filter(|l| !l.is_empty())
                .map(|l| match l.split_once('=') {
                    Some((k, v)) => (k.to_owned(), v.to_owned()),
                    None => (l.clone(), "\0".to_owned()),
                })
                .collect();
        }
    }

    /// Fills host-dependent defaults and checks every value, naming the field that is wrong.
    pub fn finish(&mut self) -> Result<(), ConfigError> {
        if self.node_name.is_empty() {
            self.node_name = host_name().ok_or(ConfigError::Invalid {
                field: "node_name",
                message: "not set and the host name could not be read; set node_name in the config \
                          or LICHEN_NODE_NAME"
                    .into(),
            })?;
        }
        // Node names become Kubernetes object names (RFC 1123 subdomains) and parts of file names.
        self.node_name = self.node_name.to_ascii_lowercase();
        if let Err(why) = validate_dns_subdomain(&self.node_name) {
            return Err(ConfigError::Invalid {
                field: "node_name",
                message: format!("{:?} {why}", self.node_name),
            });
        }
        if self.state_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid {
                field: "state_dir",
                message: "must not be empty (the default is /var/lib/lichen)".into(),
            });
        }
        if !(1..=10_000).contains(&self.max_pods) {
            return Err(ConfigError::Invalid {
                field: "max_pods",
                message: format!("{} is outside 1..=10000", self.max_pods),
            });
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(ConfigError::Invalid {
                field: "log.level",
                message: format!("{:?}: {e} (examples: info, debug, info,lichen=debug)", self.log.level),
            });
        }
        if self.runtime.default_memory_limit.0 < 64 << 10 {
            return Err(ConfigError::Invalid {
                field: "runtime.default_memory_limit",
                message: format!(
                    "{} is below one WebAssembly page (64Ki)",
                    self.runtime.default_memory_limit
                ),
            });
        }
        if self.runtime.default_memory_limit.0 > 4 << 30 {
            return Err(ConfigError::Invalid {
                field: "runtime.default_memory_limit",
                message: format!(
                    "{} is above the 4Gi a 32-bit WebAssembly memory can address",
                    self.runtime.default_memory_limit
                ),
            });
        }
        if self.container_logs.max_size.0 < 4096 {
            return Err(ConfigError::Invalid {
                field: "container_logs.max_size",
                message: format!("{} is below the 4Ki minimum", self.container_logs.max_size),
            });
        }
        if !(1..=100).contains(&self.container_logs.max_files) {
            return Err(ConfigError::Invalid {
                field: "container_logs.max_files",
                message: format!("{} is outside 1..=100", self.container_logs.max_files),
            });
        }
        if !self.node_ip.is_empty() && self.node_ip.parse::<std::net::IpAddr>().is_err() {
            return Err(ConfigError::Invalid {
                field: "node_ip",
                message: format!("{:?} is not an IP address", self.node_ip),
            });
        }
        for (k, v) in &self.node_labels {
            validate_label(k, v).map_err(|message| ConfigError::Invalid { field: "node_labels", message })?;
        }
        if self.disk_pressure_percent > 50 {
            return Err(ConfigError::Invalid {
                field: "disk_pressure_percent",
                message: format!("{} is above 50; the kubelet's default is 10", self.disk_pressure_percent),
            });
        }
        for t in &self.node_taints {
            parse_taint(t).map_err(|message| ConfigError::Invalid { field: "node_taints", message })?;
        }
        self.modules.validate()?;
        self.runtime.validate_host_paths(&self.state_dir)?;
        self.mqtt.validate()?;
        self.join.validate(&self.state_dir)?;
        self.kubelet_api.validate()?;
        if !self.metrics.address.is_empty() && self.metrics.socket_addr().is_none() {
            return Err(ConfigError::Invalid {
                field: "metrics.address",
                message: format!(
                    "{:?} is not host:port, e.g. 127.0.0.1:10248 (\"\" turns it off)",
                    self.metrics.address
                ),
            });
        }
        if self.node_hostname.is_empty() {
            self.node_hostname = host_name().unwrap_or_else(|| self.node_name.clone());
        }
        if self.mqtt.enabled() && self.mqtt.client_id.is_empty() {
            self.mqtt.client_id = self.node_name.clone();
        }
        if self.mqtt.gateway.enabled() {
            if !self.mqtt.enabled() {
                return Err(ConfigError::Invalid {
                    field: "mqtt.gateway.local_broker",
                    message: "gateway mode forwards to the upstream broker mqtt.broker; set it".into(),
                });
            }
            if self.mqtt.gateway.client_id.is_empty() {
                self.mqtt.gateway.client_id = format!("{}-gateway", self.mqtt.client_id);
            }
            if self.mqtt.gateway.client_id == self.mqtt.client_id {
                return Err(ConfigError::Invalid {
                    field: "mqtt.gateway.client_id",
                    message: "must differ from mqtt.client_id".into(),
                });
            }
        }
        let kc = &mut self.kubeconfig;
        if !kc.as_os_str().is_empty() && kc.is_relative() {
            *kc = std::env::current_dir().map(|d| d.join(&*kc)).unwrap_or_else(|_| kc.clone());
        }
        Ok(())
    }

    /// The paths under `state_dir`.
    pub fn layout(&self) -> crate::layout::StateLayout {
        crate::layout::StateLayout::new(&self.state_dir)
    }

    /// The kubeconfig the agent uses, unless running standalone: `kubeconfig` if set, else the one
    /// joining writes (`<state_dir>/node.kubeconfig`) when `[join]` is configured.
    pub fn cluster(&self) -> Option<PathBuf> {
        if !self.kubeconfig.as_os_str().is_empty() {
            Some(self.kubeconfig.clone())
        } else {
            // A node that joined (`lichen join`, or `[join]` before) stays joined.
            let managed = self.layout().node_kubeconfig();
            (self.join.enabled() || managed.exists()).then_some(managed)
        }
    }

    /// The config as `lichen check` shows it: the bootstrap token is never printed.
    fn redacted(&self) -> Self {
        let mut c = self.clone();
        if !c.join.token.is_empty() {
            c.join.token = "<redacted>".into();
        }
        c
    }

    /// The static pod directory, unless static pods are turned off.
    pub fn static_pods(&self) -> Option<&Path> {
        (!self.static_pod_dir.as_os_str().is_empty()).then_some(self.static_pod_dir.as_path())
    }

    /// The config as TOML, for `lichen check`.
    pub fn to_toml(&self) -> String {
        toml::to_string(&self.redacted()).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

impl RuntimeConfig {
    /// `allowed_host_paths`: absolute, without `..`, and never the state directory or under it
    /// (pods may never mount that, so such an entry would only mislead).
    fn validate_host_paths(&mut self, state_dir: &Path) -> Result<(), ConfigError> {
        let invalid = |message| ConfigError::Invalid { field: "runtime.allowed_host_paths", message };
        self.allowed_host_paths.retain(|d| !d.as_os_str().is_empty());
        for d in &self.allowed_host_paths {
            if !d.is_absolute() || d.components().any(|c| c == std::path::Component::ParentDir) {
                return Err(invalid(format!("{} must be an absolute path without `..`", d.display())));
            }
            if d.starts_with(state_dir) {
                return Err(invalid(format!(
                    "{} is under state_dir ({}), which holds the node's key and every pod's \
                     secrets; no pod may mount it, so list another directory",
                    d.display(),
                    state_dir.display()
                )));
            }
        }
        Ok(())
    }
}

impl ModulesConfig {
    fn validate(&mut self) -> Result<(), ConfigError> {
        let invalid = |field, message| ConfigError::Invalid { field, message };
        self.insecure_registries.retain(|h| !h.is_empty());
        for h in &self.insecure_registries {
            if h.contains("://") || h.contains('/') {
                return Err(invalid(
                    "modules.insecure_registries",
                    format!("{h:?}: give host or host:port, without a scheme or path"),
                ));
            }
        }
        self.file_dirs.retain(|d| !d.as_os_str().is_empty());
        for d in &self.file_dirs {
            if !d.is_absolute() || d.components().any(|c| c == std::path::Component::ParentDir) {
                return Err(invalid(
                    "modules.file_dirs",
                    format!("{} must be an absolute path without `..`", d.display()),
                ));
            }
        }
        if self.max_module_size.0 < 1024 {
            return Err(invalid("modules.max_module_size", format!("{} is below 1Ki", self.max_module_size)));
        }
        if self.cache_size.0 < self.max_module_size.0 {
            return Err(invalid(
                "modules.cache_size",
                format!(
                    "{} is smaller than modules.max_module_size ({}): the cache must hold at least one module",
                    self.cache_size, self.max_module_size
                ),
            ));
        }
        if !(1..=16).contains(&self.concurrent_pulls) {
            return Err(invalid(
                "modules.concurrent_pulls",
                format!("{} is outside 1..=16", self.concurrent_pulls),
            ));
        }
        if self.pull_timeout_secs == 0 {
            return Err(invalid("modules.pull_timeout_secs", "must be at least 1".into()));
        }
        Ok(())
    }
}

/// The taint a Lichen node registers with unless configured otherwise: only pods that tolerate it
/// (WebAssembly workloads) are scheduled there.
pub const DEFAULT_TAINT: &str = "lichen.dev/runtime=wasm:NoSchedule";

/// A node taint: key, optional value, effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaintSpec {
    /// Taint key.
    pub key: String,
    /// Taint value, possibly empty.
    pub value: String,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`.
    pub effect: String,
}

/// Parses `key=value:Effect` or `key:Effect`.
pub fn parse_taint(s: &str) -> Result<TaintSpec, String> {
    let (kv, effect) = s.rsplit_once(':').ok_or_else(|| {
        format!("{s:?} has no effect; write key=value:NoSchedule (or PreferNoSchedule, NoExecute)")
    })?;
    if !matches!(effect, "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
        return Err(format!("{s:?}: effect {effect:?} must be NoSchedule, PreferNoSchedule or NoExecute"));
    }
    let (key, value) = kv.split_once('=').unwrap_or((kv, ""));
    validate_qualified_name(key).map_err(|e| format!("{s:?}: key {e}"))?;
    Ok(TaintSpec { key: key.to_owned(), value: value.to_owned(), effect: effect.to_owned() })
}

/// Checks a node label the way the API server and NodeRestriction will, so a bad label is refused at
/// start-up with a reason instead of by the API server later.
pub fn validate_label(key: &str, value: &str) -> Result<(), String> {
    if value == "\0" {
        return Err(format!("{key:?} is not key=value"));
    }
    validate_qualified_name(key).map_err(|e| format!("label {key:?}: {e}"))?;
    let value_ok = value.len() <= 63
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && value.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric())
        && value.bytes().last().is_none_or(|b| b.is_ascii_alphanumeric());
    if !value_ok {
        return Err(format!("label {key:?}: value {value:?} is not a valid label value"));
    }
    if let Some((prefix, _)) = key.split_once('/') {
        let restricted = |domain: &str| prefix == domain || prefix.ends_with(&format!(".{domain}"));
        if prefix == "node-role.kubernetes.io" || prefix.ends_with(".node-role.kubernetes.io") {
            return Err(format!(
                "label {key:?}: NodeRestriction forbids a node to set node-role labels on itself; \
                 an admin applies them with `kubectl label node <name> {key}=`"
            ));
        }
        if (restricted("kubernetes.io") || restricted("k8s.io")) && !NODE_SETTABLE.contains(&key) {
            let allowed_prefix = ["kubelet.kubernetes.io", "node.kubernetes.io"]
                .iter()
                .any(|p| prefix == *p || prefix.ends_with(&format!(".{p}")));
            if !allowed_prefix {
                return Err(format!(
                    "label {key:?}: NodeRestriction forbids a node to set labels under kubernetes.io or k8s.io \
                     other than {} and the kubelet.kubernetes.io/ and node.kubernetes.io/ prefixes; use your own prefix",
                    NODE_SETTABLE.join(", ")
                ));
            }
        }
    }
    Ok(())
}

/// The kubernetes.io labels NodeRestriction lets a node set on itself.
const NODE_SETTABLE: &[&str] = &[
    "kubernetes.io/hostname",
    "kubernetes.io/arch",
    "kubernetes.io/os",
    "beta.kubernetes.io/arch",
    "beta.kubernetes.io/os",
    "beta.kubernetes.io/instance-type",
    "node.kubernetes.io/instance-type",
    "failure-domain.beta.kubernetes.io/region",
    "failure-domain.beta.kubernetes.io/zone",
    "topology.kubernetes.io/region",
    "topology.kubernetes.io/zone",
];

fn validate_qualified_name(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        validate_dns_subdomain(p).map_err(|e| format!("prefix {e}"))?;
    }
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && name.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric());
    if ok { Ok(()) } else { Err(format!("{key:?} is not a valid qualified name")) }
}

/// Parses a path flag where an empty value means "off" (clap's own path parser refuses empty values).
fn path_allow_empty(s: &str) -> Result<PathBuf, std::convert::Infallible> {
    Ok(PathBuf::from(s))
}

/// The kernel's host name, as the kubelet uses for the node name by default.
pub fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_owned())
}

/// Checks an RFC 1123 subdomain, the rule for Node and Pod names.
pub fn validate_dns_subdomain(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 253 {
        return Err("must be 1 to 253 characters long");
    }
    for label in name.split('.') {
        let ok_chars = label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if label.is_empty() || !ok_chars || label.starts_with('-') || label.ends_with('-') {
            return Err("must consist of lower-case letters, digits, '-' and '.', and start and end with a \
                 letter or digit");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        let mut c = AgentConfig::from_toml(text, Path::new("/etc/lichen/config.toml"))?;
        c.finish()?;
        Ok(c)
    }

    #[test]
    fn empty_file_gives_documented_defaults() {
        let c = parse("node_name = \"pi-07\"").expect("valid");
        assert_eq!(c.state_dir, Path::new("/var/lib/lichen"));
        assert_eq!(c.static_pods(), Some(Path::new("/etc/lichen/pods")));
        assert_eq!(c.max_pods, 110);
        assert_eq!(c.runtime.default_memory_limit, ByteSize(128 << 20));
        assert_eq!(c.container_logs.max_size, ByteSize(10 << 20));
    }

    #[test]
    fn unknown_field_is_named_with_the_expected_ones() {
        let err = parse("node_name = \"a\"\nstatic_pods_dir = \"/x\"").unwrap_err().to_string();
        assert!(err.contains("static_pods_dir"), "{err}");
        assert!(err.contains("static_pod_dir"), "hint should list valid fields: {err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn bad_values_name_the_field() {
        let err = parse("node_name = \"Bad_Name\"").unwrap_err().to_string();
        assert!(err.contains("node_name"), "{err}");
        let err = parse("node_name = \"a\"\n[runtime]\ndefault_memory_limit = \"12 parsecs\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("default_memory_limit") && err.contains("unknown suffix"), "{err}");
        let err = parse("node_name = \"a\"\nmax_pods = 0").unwrap_err().to_string();
        assert!(err.contains("max_pods"), "{err}");
        let err = parse("node_name = \"a\"\n[log]\nlevel = \"lichen=[\"").unwrap_err().to_string();
        assert!(err.contains("log.level"), "{err}");
    }

    #[test]
    fn node_labels_and_taints_are_checked_like_the_api_server_would() {
        let err = parse("node_name = \"a\"\n[node_labels]\n\"node-role.kubernetes.io/edge\" = \"\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("node_labels") && err.contains("kubectl label node"), "{err}");
        let err =
            parse("node_name = \"a\"\n[node_labels]\n\"kubernetes.io/foo\" = \"x\"").unwrap_err().to_string();
        assert!(err.contains("NodeRestriction"), "{err}");
        parse("node_name = \"a\"\n[node_labels]\n\"topology.kubernetes.io/zone\" = \"barn-3\"\n\"acme.io/site\" = \"x\"")
            .expect("allowed labels");
        let err = parse("node_name = \"a\"\nnode_taints = [\"x=y:Sometimes\"]").unwrap_err().to_string();
        assert!(err.contains("node_taints") && err.contains("NoSchedule"), "{err}");
        assert_eq!(
            parse_taint(DEFAULT_TAINT),
            Ok(TaintSpec {
                key: "lichen.dev/runtime".into(),
                value: "wasm".into(),
                effect: "NoSchedule".into()
            })
        );
        assert!(parse("node_name = \"a\"\nnode_ip = \"pi.local\"").is_err());
    }

    #[test]
    fn mqtt_is_off_by_default_and_checked_when_on() {
        let c = parse("node_name = \"pi-07\"").expect("valid");
        assert!(!c.mqtt.enabled());
        assert_eq!((c.mqtt.spool_flush_ms, c.mqtt.inflight, c.mqtt.pod_rate_limit), (5, 100, 100));
        assert_eq!(c.mqtt.spool_max_bytes, ByteSize(64 << 20));
        let c = parse("node_name = \"pi-07\"\n[mqtt]\nbroker = \"mqtt://b\"\nca_file = \"ca.pem\"")
            .expect("valid");
        assert_eq!(c.mqtt.client_id, "pi-07", "the client id defaults to the node name");
        assert_eq!(c.mqtt.ca_file, Path::new("/etc/lichen/ca.pem"), "relative to the file");
        for (bad, field) in [
            ("broker = \"http://b\"", "mqtt.broker"),
            ("broker = \"mqtt://b\"\nclient_cert_file = \"/c.pem\"", "mqtt.client_cert_file"),
            ("broker = \"mqtt://b\"\nspool_flush_ms = 0", "mqtt.spool_flush_ms"),
            ("broker = \"mqtt://b\"\ntelemetry_qos = 2", "mqtt.telemetry_qos"),
            ("broker = \"mqtt://b\"\nmax_payload = \"32Mi\"", "mqtt.max_payload"),
        ] {
            let err = parse(&format!("node_name = \"a\"\n[mqtt]\n{bad}")).unwrap_err().to_string();
            assert!(err.contains(field), "{bad}: {err}");
        }
        let mut c =
            AgentConfig::from_toml("node_name = \"a\"", Path::new("/etc/lichen/config.toml")).expect("valid");
        let args = ConfigArgs {
            mqtt_broker: Some(parse_broker_arg("mqtts://b:8884").expect("a broker URL")),
            mqtt_inflight: Some(7),
            ..Default::default()
        };
        c.apply(&args);
        c.finish().expect("valid");
        assert_eq!(
            (c.mqtt.broker.as_ref().map(BrokerUrl::as_str), c.mqtt.inflight),
            (Some("mqtts://b:8884"), 7)
        );
    }

    #[test]
    fn join_is_off_by_default_checked_when_on_and_never_shows_the_token() {
        let c = parse("node_name = \"pi-07\"").expect("valid");
        assert!(!c.join.enabled() && c.cluster().is_none(), "standalone");
        let c = parse(
            "node_name = \"pi-07\"\n[join]\nserver = \"https://10.0.0.1:6443\"\nca_cert = \"ca.crt\"\n\
             token = \"abcdef.0123456789abcdef\"",
        )
        .expect("valid");
        assert_eq!(c.join.ca_cert, Path::new("/etc/lichen/ca.crt"), "relative to the file");
        assert_eq!(c.join.token_file, Path::new("/var/lib/lichen/bootstrap-token"), "under state_dir");
        assert_eq!(c.cluster(), Some(PathBuf::from("/var/lib/lichen/node.kubeconfig")));
        assert!(!c.to_toml().contains("0123456789abcdef") && !format!("{c:?}").contains("0123456789abcdef"));
        for (bad, field) in [
            ("server = \"http://10.0.0.1:6443\"\nca_cert = \"/c\"", "join.server"),
            ("server = \"https://10.0.0.1:6443\"", "join.ca_cert"),
            ("server = \"https://a\"\nca_cert = \"/c\"\ntoken = \"nope\"", "join.token"),
        ] {
            let err = parse(&format!("node_name = \"a\"\n[join]\n{bad}")).unwrap_err().to_string();
            assert!(err.contains(field), "{bad}: {err}");
            assert!(!err.contains("nope"), "the token is not repeated: {err}");
        }
    }

    #[test]
    fn gateway_mappings_parse_from_the_file_and_a_flag_and_bad_ones_are_named() {
        let c = parse(
            "node_name = \"pi-07\"\n[mqtt]\nbroker = \"mqtt://up\"\n[mqtt.gateway]\nlocal_broker = \"mqtt://127.0.0.1\"\n\
             mappings = [{ local = \"sensors/#\", upstream_prefix = \"site1/\", direction = \"both\" }, { local = \"cmd/#\" }]",
        )
        .expect("valid");
        let g = &c.mqtt.gateway;
        assert_eq!(g.client_id, "pi-07-gateway");
        assert_eq!(g.down_spool_max_bytes, ByteSize(16 << 20));
        assert_eq!(g.mappings[0].upstream_filter(), "site1/sensors/#");
        assert!(g.mappings[0].up() && g.mappings[0].down());
        assert_eq!(
            (g.mappings[1].direction, g.mappings[1].upstream_prefix.as_str()),
            (GatewayDirection::Up, "")
        );
        let flag = parse_mappings("[{ local = \"a/#\", upstream_prefix = \"x/\", direction = \"down\" }]")
            .expect("flag");
        assert_eq!(flag.0[0].direction, GatewayDirection::Down);
        assert!(parse_mappings("[{ local = \"a\", direction = \"sideways\" }]").is_err());
        for (bad, field) in [
            (
                "[mqtt.gateway]\nlocal_broker = \"mqtt://l\"\nmappings = [{ local = \"a\" }]",
                "mqtt.gateway.local_broker",
            ),
            (
                "[mqtt]\nbroker = \"mqtt://u\"\n[mqtt.gateway]\nlocal_broker = \"mqtt://l\"",
                "mqtt.gateway.mappings",
            ),
            (
                "[mqtt]\nbroker = \"mqtt://u\"\n[mqtt.gateway]\nlocal_broker = \"mqtt://l\"\nmappings = [{ local = \"#\", upstream_prefix = \"site1\" }]",
                "end the prefix with '/'",
            ),
            (
                "[mqtt]\nbroker = \"mqtt://u\"\n[mqtt.gateway]\nlocal_broker = \"mqtt://l\"\nmappings = [{ local = \"a/#/b\" }]",
                "not a valid filter",
            ),
            (
                "[mqtt]\nbroker = \"mqtt://u\"\n[mqtt.gateway]\nlocal_broker = \"mqtt://l\"\ndown_spool_max_bytes = \"4Ki\"\nmappings = [{ local = \"a\" }]",
                "mqtt.gateway.down_spool_max_bytes",
            ),
            (
                "[mqtt]\nbroker = \"mqtt://u\"\n[mqtt.gateway]\nlocal_broker = \"mqtt://l\"\ndown_queue = 1000\nmappings = [{ local = \"a\" }]",
                "down_queue",
            ),
        ] {
            let err = parse(&format!("node_name = \"a\"\n{bad}")).unwrap_err().to_string();
            assert!(err.contains(field), "{bad}: {err}");
        }
    }

    #[test]
    fn relative_paths_follow_the_file_and_flags_win() {
        let mut c = AgentConfig::from_toml("static_pod_dir = \"pods\"", Path::new("/opt/demo/lichen.toml"))
            .expect("valid");
        assert_eq!(c.static_pod_dir, Path::new("/opt/demo/pods"));
        let args = ConfigArgs {
            node_name: Some("edge-1".into()),
            max_pods: Some(7),
            default_fuel: Some(99),
            ..Default::default()
        };
        c.apply(&args);
        c.finish().expect("valid");
        assert_eq!((c.node_name.as_str(), c.max_pods, c.runtime.default_fuel), ("edge-1", 7, 99));
    }

    #[test]
    fn allowed_host_paths_follow_the_file_and_are_never_the_state_dir() {
        let text = "node_name = \"a\"\n[runtime]\nallowed_host_paths = [\"data\", \"/srv/shared\"]";
        let mut c = AgentConfig::from_toml(text, Path::new("/opt/demo/lichen.toml")).expect("valid");
        c.finish().expect("valid");
        assert_eq!(c.runtime.allowed_host_paths, [Path::new("/opt/demo/data"), Path::new("/srv/shared")]);
        let default = parse("node_name = \"a\"").expect("valid");
        assert!(default.runtime.allowed_host_paths.is_empty(), "none by default");

        for (bad, why) in [
            ("allowed_host_paths = [\"/srv/../var/lib/lichen\"]", "without `..`"),
            ("allowed_host_paths = [\"/var/lib/lichen\"]", "under state_dir"),
            ("allowed_host_paths = [\"/var/lib/lichen/pods\"]", "under state_dir"),
        ] {
            let err = parse(&format!("node_name = \"a\"\n[runtime]\n{bad}")).unwrap_err().to_string();
            assert!(err.contains("runtime.allowed_host_paths") && err.contains(why), "{bad}: {err}");
        }
        // Flags are taken as given: a relative one is refused rather than guessed at.
        let mut c = parse("node_name = \"a\"").expect("valid");
        c.apply(&ConfigArgs { allowed_host_paths: Some(vec!["data".into()]), ..Default::default() });
        let err = c.finish().unwrap_err().to_string();
        assert!(err.contains("runtime.allowed_host_paths") && err.contains("absolute"), "{err}");
    }
}
