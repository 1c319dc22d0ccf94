//! The `[mqtt]` and `[mqtt.gateway]` sections: the upstream broker connection, node telemetry, the
//! durable spool, the limits on modules' messages, and gateway mode's local broker and mappings. The
//! URL and topic grammars live in `broker` and `topic`; this module holds their parsed values.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::ConfigError;
use crate::broker::{BrokerUrl, BrokerUrlError};
use crate::quantity::ByteSize;
use crate::topic::{TopicError, TopicFilter};

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

pub(super) fn parse_mappings(s: &str) -> Result<GatewayMappings, MappingsError> {
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

pub(super) fn parse_broker_arg(s: &str) -> Result<BrokerArg, BrokerUrlError> {
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

    pub(super) fn validate(&mut self) -> Result<(), ConfigError> {
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
