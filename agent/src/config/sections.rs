//! The config sections other than `[mqtt]`: `[metrics]`, `[kubelet_api]`, `[join]`, `[autonomy]`,
//! `[modules]`, `[runtime]`, `[container_logs]` and `[upgrade]`, with their defaults and checks.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ConfigError;
use crate::quantity::ByteSize;
use crate::token::BootstrapToken;

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
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
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
/// while `server` is empty. Neither `Debug` nor the TOML that `lichen check` prints shows the token.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JoinConfig {
    /// The API server, `https://host[:port]`; empty turns joining off.
    pub server: String,
    /// PEM file of the cluster's certificate authority (the API server's certificate must chain to it).
    pub ca_cert: PathBuf,
    /// The bootstrap token `<id>.<secret>`. Prefer `token_file` or `LICHEN_JOIN_TOKEN`: this file
    /// is readable by the lichen group and outlives the join. Parsed once, here.
    #[serde(with = "token_or_empty")]
    pub token: TokenSetting,
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
            token: TokenSetting::Unset,
            token_file: PathBuf::new(),
            approval_timeout_secs: 900,
        }
    }
}

/// `join.token` as read. Text that is not a token is kept as `Refused` rather than failing the
/// TOML parse: the parser's message quotes the offending line, and the token must never reach a log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum TokenSetting {
    /// No token in the config (the token file or `lichen join --token` may still give one).
    #[default]
    Unset,
    /// A well-formed token.
    Token(BootstrapToken),
    /// Something that is not `<id>.<secret>`; validation refuses it when joining is on.
    Refused,
}

impl TokenSetting {
    /// Reads a token given as text: empty is `Unset`, anything not `<id>.<secret>` is `Refused`.
    pub fn from_text(text: &str) -> TokenSetting {
        if text.trim().is_empty() {
            TokenSetting::Unset
        } else {
            BootstrapToken::parse(text).map_or(TokenSetting::Refused, TokenSetting::Token)
        }
    }
}

/// The token in the file: `""` for none; always written back as `<redacted>`, so no printed
/// config can leak it.
mod token_or_empty {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::TokenSetting;

    pub(super) fn serialize<S: Serializer>(token: &TokenSetting, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if *token == TokenSetting::Unset { "" } else { "<redacted>" })
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<TokenSetting, D::Error> {
        let text = String::deserialize(d)?;
        Ok(TokenSetting::from_text(&text))
    }
}

impl JoinConfig {
    /// Whether joining with a bootstrap token is configured.
    pub fn enabled(&self) -> bool {
        !self.server.is_empty()
    }

    /// The token given in the config or `LICHEN_JOIN_TOKEN`, if any.
    pub fn token(&self) -> Option<&BootstrapToken> {
        match &self.token {
            TokenSetting::Token(t) => Some(t),
            TokenSetting::Unset | TokenSetting::Refused => None,
        }
    }

    pub(super) fn validate(&mut self, state_dir: &Path) -> Result<(), ConfigError> {
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
        if self.token == TokenSetting::Refused {
            return Err(invalid("join.token", crate::token::BadToken.to_string()));
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

impl RuntimeConfig {
    /// `allowed_host_paths`: absolute, without `..`, and never the state directory or under it
    /// (pods may never mount that, so such an entry would only mislead).
    pub(super) fn validate_host_paths(&mut self, state_dir: &Path) -> Result<(), ConfigError> {
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
    pub(super) fn validate(&mut self) -> Result<(), ConfigError> {
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

/// Remote upgrades of the agent itself (README: Upgrading a fleet).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpgradeConfig {
    /// PEM files of the ECDSA P-256 public keys (`cosign.pub` files) an upgrade must be signed by;
    /// one signature by any of them is enough. Empty turns remote upgrades off: the node then
    /// refuses every `lichen.dev/agent-image`, saying why on its Node.
    pub trusted_keys: Vec<PathBuf>,
    /// Seconds a new agent has to pass its health gate (store open, pods resumed, the Lease renewed
    /// if the old agent had reached the API server) before it is rolled back.
    pub health_timeout_secs: u64,
}

impl Default for UpgradeConfig {
    fn default() -> Self {
        Self { trusted_keys: Vec::new(), health_timeout_secs: 120 }
    }
}

impl UpgradeConfig {
    /// Whether remote upgrades are on.
    pub fn enabled(&self) -> bool {
        !self.trusted_keys.is_empty()
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if !(10..=3600).contains(&self.health_timeout_secs) {
            return Err(ConfigError::Invalid {
                field: "upgrade.health_timeout_secs",
                message: format!(
                    "{} is outside 10..=3600 (a new agent needs time to open the store and resume its pods)",
                    self.health_timeout_secs
                ),
            });
        }
        Ok(())
    }
}
