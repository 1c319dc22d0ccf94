//! The command-line flags and environment variables that override the config file. Each is declared
//! once, in the `overlay!` list below, with the config field it sets; the macro writes both the clap
//! struct and the code that lays the values over the file's.
//!
//! The fields' doc comments are `--help` text, written for a terminal (`host[:port]`, `<id>`), not
//! rustdoc markup.
#![allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Args;

use super::mqtt::{BrokerArg, GatewayMappings, parse_broker_arg, parse_mappings};
use super::{AgentConfig, ConfigError, LogFormat};
use crate::broker::BrokerUrl;
use crate::config::GatewayMapping;
use crate::names::{LabelError, TaintSpec};
use crate::quantity::ByteSize;
use crate::token::BootstrapToken;

/// How a flag's value replaces a config field: as is, or converted from the flag's own type.
trait Overlay<T> {
    fn overlay(&self, field: &mut T);
}

impl<T: Clone> Overlay<T> for T {
    fn overlay(&self, field: &mut T) {
        *field = self.clone();
    }
}

impl Overlay<Option<BrokerUrl>> for BrokerArg {
    fn overlay(&self, field: &mut Option<BrokerUrl>) {
        *field = self.0.clone();
    }
}

impl Overlay<Vec<GatewayMapping>> for GatewayMappings {
    fn overlay(&self, field: &mut Vec<GatewayMapping>) {
        *field = self.0.clone();
    }
}

impl Overlay<BTreeMap<String, String>> for Vec<LabelArg> {
    fn overlay(&self, field: &mut BTreeMap<String, String>) {
        *field = self.iter().filter(|l| !l.0.is_empty()).map(|l| (l.0.clone(), l.1.clone())).collect();
    }
}

/// Declares the flags: doc comment (clap's help), `[clap attributes]`, flag field and type, and the
/// config field it overrides. Every flag is `--long`, global, and optional (absent = the file's value).
macro_rules! overlay {
    ($( $(#[doc = $doc:literal])* [$($attr:tt)*] $flag:ident : $ty:ty => $($field:ident).+ ; )*) => {
        /// Command-line flags and environment variables that override the config file, one per field.
        #[derive(Debug, Clone, Default, Args)]
        pub struct ConfigArgs {
            /// Config file [default: /etc/lichen/config.toml, used only if it exists].
            #[arg(long, short = 'c', env = "LICHEN_CONFIG", global = true)]
            pub config: Option<PathBuf>,
            $(
                $(#[doc = $doc])*
                #[arg(long, global = true, $($attr)*)]
                pub $flag: Option<$ty>,
            )*
            /// The bootstrap token, from the environment only: a flag's value is visible in `ps`.
            #[arg(skip = std::env::var("LICHEN_JOIN_TOKEN").ok())]
            pub join_token: Option<String>,
        }

        impl ConfigArgs {
            /// Lays the flags and environment variables that are set over `config`.
            pub(super) fn apply(&self, config: &mut AgentConfig) -> Result<(), ConfigError> {
                $(
                    if let Some(value) = &self.$flag {
                        value.overlay(&mut config.$($field).+);
                    }
                )*
                if let Some(text) = self.join_token.as_deref().filter(|t| !t.trim().is_empty()) {
                    let token = BootstrapToken::parse(text).map_err(|e| ConfigError::Invalid {
                        field: "join.token",
                        message: format!("LICHEN_JOIN_TOKEN: {e}"),
                    })?;
                    config.join.token = super::TokenSetting::Token(token);
                }
                Ok(())
            }
        }
    };
}

overlay! {
        /// Node name [default: the host name].
        [env = "LICHEN_NODE_NAME"] node_name: String => node_name;
        /// State directory [default: /var/lib/lichen].
        [env = "LICHEN_STATE_DIR"] state_dir: PathBuf => state_dir;
        /// Static pod manifest directory; empty turns static pods off [default: /etc/lichen/pods].
        [env = "LICHEN_STATIC_POD_DIR", value_parser = path_allow_empty] static_pod_dir: PathBuf => static_pod_dir;
        /// Most pods admitted [default: 110].
        [env = "LICHEN_MAX_PODS"] max_pods: u32 => max_pods;
        /// Seconds shutdown may take [default: 10].
        [env = "LICHEN_SHUTDOWN_TIMEOUT_SECS"] shutdown_timeout_secs: u64 => shutdown_timeout_secs;
        /// Log filter, e.g. `info` or `info,lichen::runtime=debug` [default: info].
        [env = "LICHEN_LOG_LEVEL"] log_level: String => log.level;
        /// Log format [default: text].
        [env = "LICHEN_LOG_FORMAT"] log_format: LogFormat => log.format;
        /// Fuel per container run, 0 = unlimited [default: 0].
        [env = "LICHEN_DEFAULT_FUEL"] default_fuel: u64 => runtime.default_fuel;
        /// Memory limit for containers that set none [default: 128Mi].
        [env = "LICHEN_DEFAULT_MEMORY_LIMIT"] default_memory_limit: ByteSize => runtime.default_memory_limit;
        /// Wall-clock seconds per container run, 0 = none [default: 0].
        [env = "LICHEN_RUN_TIMEOUT_SECS"] run_timeout_secs: u64 => runtime.run_timeout_secs;
        /// Host directories cluster pods may mount as hostPath, comma-separated [default: none].
        [env = "LICHEN_ALLOWED_HOST_PATHS", value_delimiter = ','] allowed_host_paths: Vec<PathBuf> => runtime.allowed_host_paths;
        /// Container log rotation size [default: 10Mi].
        [env = "LICHEN_CONTAINER_LOG_MAX_SIZE"] container_log_max_size: ByteSize => container_logs.max_size;
        /// Container log files kept per run [default: 5].
        [env = "LICHEN_CONTAINER_LOG_MAX_FILES"] container_log_max_files: u32 => container_logs.max_files;
        /// Echo container output into the agent log [default: false].
        [env = "LICHEN_CONTAINER_LOG_ECHO"] container_log_echo: bool => container_logs.echo;
        /// Kubeconfig to join a cluster with; empty = standalone [default: none].
        [env = "LICHEN_KUBECONFIG", value_parser = path_allow_empty] kubeconfig: PathBuf => kubeconfig;
        /// Node InternalIP [default: address of the default-route interface].
        [env = "LICHEN_NODE_IP"] node_ip: String => node_ip;
        /// Node labels as key=value, comma-separated; replaces the file's list [default: none].
        [env = "LICHEN_NODE_LABELS", value_delimiter = ',', value_parser = parse_label] node_labels: Vec<LabelArg> => node_labels;
        /// Node taints as key=value:Effect, comma-separated; replaces the file's list
        /// [default: lichen.dev/runtime=wasm:NoSchedule].
        [env = "LICHEN_NODE_TAINTS", value_delimiter = ','] node_taints: Vec<TaintSpec> => node_taints;
        /// MemoryPressure below this much available memory [default: 100Mi].
        [env = "LICHEN_MEMORY_PRESSURE_THRESHOLD"] memory_pressure_threshold: ByteSize => memory_pressure_threshold;
        /// DiskPressure below this percent of free disk, 0 = never [default: 10].
        [env = "LICHEN_DISK_PRESSURE_PERCENT"] disk_pressure_percent: u32 => disk_pressure_percent;
        /// Registries reachable over plain HTTP, comma-separated host[:port]; replaces the file's list
        /// [default: none].
        [env = "LICHEN_INSECURE_REGISTRIES", value_delimiter = ','] insecure_registries: Vec<String> => modules.insecure_registries;
        /// Directories cluster pods may load file:// modules from, comma-separated [default: none].
        [env = "LICHEN_MODULE_FILE_DIRS", value_delimiter = ','] module_file_dirs: Vec<PathBuf> => modules.file_dirs;
        /// Extra CA certificate files (PEM) for registries, comma-separated [default: none].
        [env = "LICHEN_REGISTRY_CA_FILES", value_delimiter = ','] registry_ca_files: Vec<PathBuf> => modules.registry_ca_files;
        /// Byte budget of the module cache [default: 1Gi].
        [env = "LICHEN_MODULE_CACHE_SIZE"] module_cache_size: ByteSize => modules.cache_size;
        /// Largest module downloaded [default: 64Mi].
        [env = "LICHEN_MAX_MODULE_SIZE"] max_module_size: ByteSize => modules.max_module_size;
        /// Pulls running at once [default: 2].
        [env = "LICHEN_CONCURRENT_PULLS"] concurrent_pulls: u32 => modules.concurrent_pulls;
        /// Seconds a pull may take [default: 300].
        [env = "LICHEN_PULL_TIMEOUT_SECS"] pull_timeout_secs: u64 => modules.pull_timeout_secs;
        /// Seconds cluster pods run without API contact, 0 = indefinitely [default: 0].
        [env = "LICHEN_MAX_OFFLINE_SECS"] max_offline_secs: u64 => autonomy.max_offline_secs;
        /// Seconds pods evicted while away keep running once back, 0 = stop at once [default: 0].
        [env = "LICHEN_EVICTED_GRACE_SECS"] evicted_grace_secs: u64 => autonomy.evicted_grace_secs;
        /// Public keys (PEM) an agent upgrade must be signed by, comma-separated; none turns remote
        /// upgrades off [default: none].
        [env = "LICHEN_UPGRADE_TRUSTED_KEYS", value_delimiter = ','] upgrade_trusted_keys: Vec<PathBuf> => upgrade.trusted_keys;
        /// Seconds a new agent has to pass its health gate before it is rolled back [default: 120].
        [env = "LICHEN_UPGRADE_HEALTH_TIMEOUT_SECS"] upgrade_health_timeout_secs: u64 => upgrade.health_timeout_secs;
        /// MQTT broker URL, mqtt:// or mqtts://; empty turns MQTT off [default: none].
        [env = "LICHEN_MQTT_BROKER", value_parser = parse_broker_arg] mqtt_broker: BrokerArg => mqtt.broker;
        /// MQTT client id [default: the node name].
        [env = "LICHEN_MQTT_CLIENT_ID"] mqtt_client_id: String => mqtt.client_id;
        /// MQTT user name [default: none].
        [env = "LICHEN_MQTT_USERNAME"] mqtt_username: String => mqtt.username;
        /// File holding the MQTT password [default: none].
        [env = "LICHEN_MQTT_PASSWORD_FILE", value_parser = path_allow_empty] mqtt_password_file: PathBuf => mqtt.password_file;
        /// CA certificates (PEM) for mqtts:// [default: the system's].
        [env = "LICHEN_MQTT_CA_FILE", value_parser = path_allow_empty] mqtt_ca_file: PathBuf => mqtt.ca_file;
        /// Client certificate (PEM) for mutual TLS [default: none].
        [env = "LICHEN_MQTT_CLIENT_CERT_FILE", value_parser = path_allow_empty] mqtt_client_cert_file: PathBuf => mqtt.client_cert_file;
        /// Client key (PEM) for mutual TLS [default: none].
        [env = "LICHEN_MQTT_CLIENT_KEY_FILE", value_parser = path_allow_empty] mqtt_client_key_file: PathBuf => mqtt.client_key_file;
        /// MQTT keep-alive seconds [default: 30].
        [env = "LICHEN_MQTT_KEEP_ALIVE_SECS"] mqtt_keep_alive_secs: u64 => mqtt.keep_alive_secs;
        /// Keep the MQTT session while away [default: true].
        [env = "LICHEN_MQTT_PERSISTENT_SESSION"] mqtt_persistent_session: bool => mqtt.persistent_session;
        /// First MQTT reconnect delay, ms [default: 500].
        [env = "LICHEN_MQTT_RECONNECT_MIN_MS"] mqtt_reconnect_min_ms: u64 => mqtt.reconnect_min_ms;
        /// Longest MQTT reconnect delay, ms [default: 60000].
        [env = "LICHEN_MQTT_RECONNECT_MAX_MS"] mqtt_reconnect_max_ms: u64 => mqtt.reconnect_max_ms;
        /// Seconds between node telemetry messages, 0 = off [default: 30].
        [env = "LICHEN_MQTT_TELEMETRY_INTERVAL_SECS"] mqtt_telemetry_interval_secs: u64 => mqtt.telemetry_interval_secs;
        /// QoS of node telemetry, 0 or 1 [default: 1].
        [env = "LICHEN_MQTT_TELEMETRY_QOS"] mqtt_telemetry_qos: u8 => mqtt.telemetry_qos;
        /// Byte budget of the MQTT spool [default: 64Mi].
        [env = "LICHEN_MQTT_SPOOL_MAX_BYTES"] mqtt_spool_max_bytes: ByteSize => mqtt.spool_max_bytes;
        /// Group commit window of the spool, ms [default: 5].
        [env = "LICHEN_MQTT_SPOOL_FLUSH_MS"] mqtt_spool_flush_ms: u64 => mqtt.spool_flush_ms;
        /// Group commit size of the spool, messages [default: 256].
        [env = "LICHEN_MQTT_SPOOL_FLUSH_MESSAGES"] mqtt_spool_flush_messages: u32 => mqtt.spool_flush_messages;
        /// Unacknowledged QoS 1 messages in flight [default: 100].
        [env = "LICHEN_MQTT_INFLIGHT"] mqtt_inflight: u16 => mqtt.inflight;
        /// Largest payload published from a module line [default: 64Ki].
        [env = "LICHEN_MQTT_MAX_PAYLOAD"] mqtt_max_payload: ByteSize => mqtt.max_payload;
        /// Messages per second per pod, 0 = unlimited [default: 100].
        [env = "LICHEN_MQTT_POD_RATE_LIMIT"] mqtt_pod_rate_limit: u32 => mqtt.pod_rate_limit;
        /// Burst above the pod rate [default: 1000].
        [env = "LICHEN_MQTT_POD_BURST"] mqtt_pod_burst: u32 => mqtt.pod_burst;
        /// Incoming messages queued per container stdin [default: 64].
        [env = "LICHEN_MQTT_STDIN_QUEUE"] mqtt_stdin_queue: u32 => mqtt.stdin_queue;
        /// API server to join with a bootstrap token, https://host:port; empty = off [default: none].
        [env = "LICHEN_JOIN_SERVER"] join_server: String => join.server;
        /// Cluster CA certificate (PEM) for joining [default: none].
        [env = "LICHEN_JOIN_CA_CERT", value_parser = path_allow_empty] join_ca_cert: PathBuf => join.ca_cert;
        /// File holding the bootstrap token [default: <state_dir>/bootstrap-token].
        [env = "LICHEN_JOIN_TOKEN_FILE", value_parser = path_allow_empty] join_token_file: PathBuf => join.token_file;
        /// Seconds to wait for the node's CSR to be approved and signed [default: 900].
        [env = "LICHEN_JOIN_APPROVAL_TIMEOUT_SECS"] join_approval_timeout_secs: u64 => join.approval_timeout_secs;
        /// The node's Hostname address [default: the machine's host name].
        [env = "LICHEN_NODE_HOSTNAME"] node_hostname: String => node_hostname;
        /// host:port of /healthz and /metrics, empty = off [default: 127.0.0.1:10248].
        [env = "LICHEN_METRICS_ADDRESS"] metrics_address: String => metrics.address;
        /// Kubelet API port (kubectl logs), 0 = off [default: 10250].
        [env = "LICHEN_KUBELET_PORT"] kubelet_port: u16 => kubelet_api.port;
        /// Kubelet API listen address [default: 0.0.0.0].
        [env = "LICHEN_KUBELET_ADDRESS"] kubelet_address: String => kubelet_api.address;
        /// Kubelet API serving certificate, PEM [default: from a kubelet-serving CSR, self-signed until issued].
        [env = "LICHEN_KUBELET_TLS_CERT_FILE"] kubelet_tls_cert_file: PathBuf => kubelet_api.tls_cert_file;
        /// Key of --kubelet-tls-cert-file, PEM.
        [env = "LICHEN_KUBELET_TLS_PRIVATE_KEY_FILE"] kubelet_tls_private_key_file: PathBuf => kubelet_api.tls_private_key_file;
        /// CA for kubelet API client certificates [default: the kubeconfig's cluster CA].
        [env = "LICHEN_KUBELET_CLIENT_CA_FILE"] kubelet_client_ca_file: PathBuf => kubelet_api.client_ca_file;
        /// Request a kubelet-serving certificate from the cluster [default: true].
        [env = "LICHEN_KUBELET_SERVING_CSR"] kubelet_serving_csr: bool => kubelet_api.serving_csr;
        /// Gateway mode: the local broker, mqtt://host[:port]; empty turns it off [default: none].
        [env = "LICHEN_MQTT_GATEWAY_LOCAL_BROKER", value_parser = parse_broker_arg] mqtt_gateway_local_broker: BrokerArg => mqtt.gateway.local_broker;
        /// Gateway client id on the local broker [default: <mqtt client id>-gateway].
        [env = "LICHEN_MQTT_GATEWAY_CLIENT_ID"] mqtt_gateway_client_id: String => mqtt.gateway.client_id;
        /// Gateway spool budget for messages to the local broker, e.g. 16Mi [default: 16Mi].
        [env = "LICHEN_MQTT_GATEWAY_DOWN_SPOOL_MAX_BYTES"] mqtt_gateway_down_spool_max_bytes: ByteSize => mqtt.gateway.down_spool_max_bytes;
        /// Gateway mappings as a TOML inline array [default: none].
        [env = "LICHEN_MQTT_GATEWAY_MAPPINGS", value_parser = parse_mappings] mqtt_gateway_mappings: GatewayMappings => mqtt.gateway.mappings;
}

/// A `key=value` node label from a flag or the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelArg(String, String);

/// Parses `key=value`; an empty entry (a trailing comma) is skipped.
fn parse_label(s: &str) -> Result<LabelArg, LabelError> {
    if s.is_empty() {
        return Ok(LabelArg(String::new(), String::new()));
    }
    let (k, v) = s.split_once('=').ok_or_else(|| LabelError::NotKeyValue(s.to_owned()))?;
    Ok(LabelArg(k.to_owned(), v.to_owned()))
}

/// Parses a path flag where an empty value means "off" (clap's own path parser refuses empty values).
fn path_allow_empty(s: &str) -> Result<PathBuf, std::convert::Infallible> {
    Ok(PathBuf::from(s))
}
