//! Registry credentials from a pod's `imagePullSecrets`: Secrets of type
//! `kubernetes.io/dockerconfigjson` (`.dockerconfigjson`) or the legacy `kubernetes.io/dockercfg`
//! (`.dockercfg`), matched against a registry host as the kubelet matches them.
//!
//! Credentials never reach logs: [`Credential`]'s `Debug` hides them.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

use crate::store::inputs::ObjectData;

/// How to authenticate to one registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// HTTP basic (also what registries' token services take to issue a bearer token).
    Basic {
        /// User name.
        username: String,
        /// Password or access token.
        password: String,
    },
    /// A registry or identity token, sent as a bearer token.
    Bearer(String),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Basic { username, .. } => write!(f, "Basic({username}, <hidden>)"),
            Credential::Bearer(_) => f.write_str("Bearer(<hidden>)"),
        }
    }
}

/// Why a pull secret offers no credentials.
#[derive(Debug, thiserror::Error)]
pub enum PullSecretError {
    /// Neither key a registry secret has.
    #[error(
        "has neither .dockerconfigjson nor .dockercfg (a kubernetes.io/dockerconfigjson Secret is expected)"
    )]
    NoDockerConfig,
    /// `.dockercfg` is not JSON of the legacy shape.
    #[error(".dockercfg is not valid JSON: {0}")]
    DockerCfg(#[source] serde_json::Error),
    /// `.dockerconfigjson` is not a Docker config.
    #[error(".dockerconfigjson is not valid: {0}")]
    DockerConfigJson(#[source] serde_json::Error),
}

/// Every credential a pod's pull secrets offer, by registry pattern, in the order the secrets are
/// listed (the first match wins, as with the kubelet).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PullCredentials(Vec<(String, Credential)>);

impl fmt::Debug for PullCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.iter().map(|(host, _)| host)).finish()
    }
}

impl PullCredentials {
    /// Whether there are none (anonymous pulls).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds one credential for `registry` (from the command line).
    pub fn push(&mut self, registry: &str, credential: Credential) {
        self.0.push((normalize_host(registry), credential));
    }

    /// Adds the entries of one pull secret's data; returns a message if the data holds none.
    pub fn add_secret(&mut self, data: &ObjectData) -> Result<(), PullSecretError> {
        let (config, legacy) = match (data.get(".dockerconfigjson"), data.get(".dockercfg")) {
            (Some(v), _) => (v, false),
            (None, Some(v)) => (v, true),
            (None, None) => return Err(PullSecretError::NoDockerConfig),
        };
        let auths: BTreeMap<String, Entry> = if legacy {
            serde_json::from_slice(&config.0).map_err(PullSecretError::DockerCfg)?
        } else {
            serde_json::from_slice::<DockerConfig>(&config.0)
                .map_err(PullSecretError::DockerConfigJson)?
                .auths
        };
        for (host, entry) in auths {
            if let Some(c) = entry.credential() {
                self.0.push((normalize_host(&host), c));
            }
        }
        Ok(())
    }

    /// The credential for `registry` (`host` or `host:port`), if any secret has one.
    pub fn for_registry(&self, registry: &str) -> Option<&Credential> {
        let registry = normalize_host(registry);
        self.0.iter().find(|(pattern, _)| host_matches(pattern, &registry)).map(|(_, c)| c)
    }
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, Entry>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Entry {
    username: Option<String>,
    password: Option<String>,
    auth: Option<String>,
    identitytoken: Option<String>,
    registrytoken: Option<String>,
}

impl Entry {
    fn credential(self) -> Option<Credential> {
        if let Some(t) = self.registrytoken.filter(|t| !t.is_empty()) {
            return Some(Credential::Bearer(t));
        }
        if let (Some(username), Some(password)) = (&self.username, &self.password)
            && !username.is_empty()
        {
            return Some(Credential::Basic { username: username.clone(), password: password.clone() });
        }
        if let Some(auth) = self.auth.filter(|a| !a.is_empty()) {
            let decoded = decode_base64(&auth)?;
            let text = String::from_utf8(decoded).ok()?;
            let (username, password) = text.split_once(':')?;
            return Some(Credential::Basic { username: username.to_owned(), password: password.to_owned() });
        }
        // An identity token is exchanged for a registry token with the user name `<token>`.
        self.identitytoken
            .filter(|t| !t.is_empty())
            .map(|t| Credential::Basic { username: "<token>".into(), password: t })
    }
}

/// `https://index.docker.io/v1/` → `docker.io`; `registry.lan:5000/path` → `registry.lan:5000`.
fn normalize_host(s: &str) -> String {
    let s = s.trim();
    let s = s.strip_prefix("https://").or_else(|| s.strip_prefix("http://")).unwrap_or(s);
    let host = s.split('/').next().unwrap_or("").to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => "docker.io".into(),
        _ => host,
    }
}

/// Exact match, or a `*.example.com` pattern matching one label, as the kubelet's keyring does.
fn host_matches(pattern: &str, host: &str) -> bool {
    if pattern == host {
        return true;
    }
    let Some(suffix) = pattern.strip_prefix("*.") else { return false };
    match host.split_once('.') {
        Some((label, rest)) => !label.is_empty() && rest == suffix,
        None => false,
    }
}

/// Standard base64 with or without padding; `None` if it is not base64.
fn decode_base64(s: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    LENIENT.decode(s.trim()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn secret(key: &str, json: &str) -> ObjectData {
        [(key.to_owned(), ByteString(json.as_bytes().to_vec()))].into_iter().collect()
    }

    #[test]
    fn dockerconfigjson_auth_field_and_hub_aliases() {
        // "alice:s3cret"
        let data = secret(
            ".dockerconfigjson",
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"YWxpY2U6czNjcmV0"},
                         "registry.lan:5000":{"username":"bob","password":"pw"},
                         "*.corp.example":{"registrytoken":"tok"}}}"#,
        );
        let mut creds = PullCredentials::default();
        creds.add_secret(&data).unwrap();
        let basic = |u: &str, p: &str| Credential::Basic { username: u.into(), password: p.into() };
        assert_eq!(creds.for_registry("docker.io"), Some(&basic("alice", "s3cret")));
        assert_eq!(creds.for_registry("registry.lan:5000"), Some(&basic("bob", "pw")));
        assert_eq!(creds.for_registry("eu.corp.example"), Some(&Credential::Bearer("tok".into())));
        assert_eq!(creds.for_registry("a.b.corp.example"), None);
        assert_eq!(creds.for_registry("registry.lan"), None);
        assert!(!format!("{creds:?} {:?}", basic("alice", "s3cret")).contains("s3cret"));
    }

    #[test]
    fn legacy_dockercfg_and_bad_secrets() {
        let mut creds = PullCredentials::default();
        creds.add_secret(&secret(".dockercfg", r#"{"quay.io":{"auth":"dTpw"}}"#)).unwrap();
        assert_eq!(
            creds.for_registry("quay.io"),
            Some(&Credential::Basic { username: "u".into(), password: "p".into() })
        );
        assert!(
            creds.add_secret(&secret("token", "x")).unwrap_err().to_string().contains(".dockerconfigjson")
        );
        assert!(
            creds
                .add_secret(&secret(".dockerconfigjson", "{"))
                .unwrap_err()
                .to_string()
                .contains("not valid")
        );
    }

    #[test]
    fn base64() {
        assert_eq!(decode_base64("YWxpY2U6czNjcmV0").as_deref(), Some(&b"alice:s3cret"[..]));
        assert_eq!(decode_base64("YQ==").as_deref(), Some(&b"a"[..]));
        assert_eq!(decode_base64("YWI").as_deref(), Some(&b"ab"[..]));
        assert_eq!(decode_base64("!!!!"), None);
    }
}
