//! The agent's one configuration struct: a TOML file, overridden by environment variables, overridden
//! by command-line flags, validated once at start-up.
//!
//! Every field is documented in the README's configuration reference; keep the two in step. This module
//! only reads and checks settings: it opens no store and starts nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::host::host_name;
use crate::names::{TaintSpec, validate_dns_subdomain, validate_label};
use crate::quantity::ByteSize;

mod args;
mod mqtt;
mod sections;
#[cfg(test)]
mod tests;

pub use args::{ConfigArgs, LabelArg};
pub use mqtt::{
    BrokerArg, GatewayConfig, GatewayDirection, GatewayMapping, GatewayMappings, MappingsError, MqttConfig,
};
pub use sections::{
    AutonomyConfig, ContainerLogConfig, JoinConfig, KubeletApiConfig, MetricsConfig, ModulesConfig,
    RuntimeConfig, TokenSetting, UpgradeConfig,
};

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
    /// Taints the Node registers with, written `key=value:Effect` or `key:Effect`.
    #[serde(with = "taints")]
    pub node_taints: Vec<TaintSpec>,
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
    /// Remote upgrades of the agent; off unless `upgrade.trusted_keys` names a key.
    pub upgrade: UpgradeConfig,
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
            node_taints: vec![TaintSpec::default_taint()],
            memory_pressure_threshold: ByteSize(100 << 20),
            disk_pressure_percent: 10,
            modules: ModulesConfig::default(),
            autonomy: AutonomyConfig::default(),
            mqtt: MqttConfig::default(),
            join: JoinConfig::default(),
            node_hostname: String::new(),
            metrics: MetricsConfig::default(),
            kubelet_api: KubeletApiConfig::default(),
            upgrade: UpgradeConfig::default(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { level: "info".into(), format: LogFormat::Text }
    }
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
        args.apply(&mut config)?;
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
        let lists = config
            .modules
            .registry_ca_files
            .iter_mut()
            .chain(config.runtime.allowed_host_paths.iter_mut())
            .chain(config.upgrade.trusted_keys.iter_mut());
        for p in paths.into_iter().chain(lists) {
            if !p.as_os_str().is_empty() && p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(config)
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
        if let Err(e) = <tracing_subscriber::filter::Targets as std::str::FromStr>::from_str(&self.log.level)
        {
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
            validate_label(k, v)
                .map_err(|e| ConfigError::Invalid { field: "node_labels", message: e.to_string() })?;
        }
        if self.disk_pressure_percent > 50 {
            return Err(ConfigError::Invalid {
                field: "disk_pressure_percent",
                message: format!("{} is above 50; the kubelet's default is 10", self.disk_pressure_percent),
            });
        }
        self.modules.validate()?;
        self.runtime.validate_host_paths(&self.state_dir)?;
        self.mqtt.validate()?;
        self.join.validate(&self.state_dir)?;
        self.kubelet_api.validate()?;
        self.upgrade.validate()?;
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

    /// The static pod directory, unless static pods are turned off.
    pub fn static_pods(&self) -> Option<&Path> {
        (!self.static_pod_dir.as_os_str().is_empty()).then_some(self.static_pod_dir.as_path())
    }

    /// The config as TOML, for `lichen check`; the bootstrap token shows as `<redacted>`.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

/// Taints in the file: the same `key=value:Effect` strings as always. A refused taint names its field.
mod taints {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    use crate::names::TaintSpec;

    pub(super) fn serialize<S: Serializer>(taints: &[TaintSpec], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(taints.iter().map(ToString::to_string))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<TaintSpec>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|t| t.parse().map_err(|e| D::Error::custom(format!("invalid value for `node_taints`: {e}"))))
            .collect()
    }
}
