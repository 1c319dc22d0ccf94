//! What a cluster pod was given by the API server besides its spec (ConfigMaps, Secrets, service
//! account tokens), as it is recorded with the pod, so the pod can start again after a reboot with
//! no network at all. `pod::inputs` lists what a spec needs; `cluster::inputs` fetches it.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::ByteString;
use serde::{Deserialize, Serialize};

/// A ConfigMap's or Secret's data: `data` and `binaryData` merged, as bytes.
pub type ObjectData = BTreeMap<String, ByteString>;

/// A projected service account token request, as the spec asks for it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TokenRef {
    /// The audience; empty means the API server's own.
    pub audience: String,
    /// Requested lifetime in seconds.
    pub expiration_seconds: i64,
}

impl TokenRef {
    /// The key the token is stored under in [`PodInputs::tokens`].
    pub fn key(&self) -> String {
        format!("{}#{}", self.audience, self.expiration_seconds)
    }
}

/// A token issued through the TokenRequest API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedToken {
    /// The bearer token.
    pub token: String,
    /// When it was issued.
    pub issued: Timestamp,
    /// When it expires.
    pub expires: Timestamp,
}

impl IssuedToken {
    /// Whether it should be replaced: past 80% of its life, as the kubelet rotates them.
    pub fn due(&self, now: Timestamp) -> bool {
        let life = self.expires.as_second() - self.issued.as_second();
        now.as_second() >= self.issued.as_second() + life * 4 / 5
    }
}

/// Everything fetched for one pod. A name that is absent from a map has not been fetched (yet);
/// a name mapped to `None` was fetched and does not exist.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodInputs {
    /// ConfigMaps in the pod's namespace, by name.
    #[serde(default)]
    pub config_maps: BTreeMap<String, Option<ObjectData>>,
    /// Secrets in the pod's namespace, by name.
    #[serde(default)]
    pub secrets: BTreeMap<String, Option<ObjectData>>,
    /// Service account tokens by [`TokenRef::key`].
    #[serde(default)]
    pub tokens: BTreeMap<String, IssuedToken>,
    /// Why the last fetch of a name failed, by `configmap/<name>`, `secret/<name>` or `token/<key>`.
    #[serde(default)]
    pub errors: BTreeMap<String, String>,
}

/// The kind of object a reference names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// A ConfigMap.
    ConfigMap,
    /// A Secret.
    Secret,
}

impl ObjectKind {
    /// As Kubernetes spells it in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::ConfigMap => "ConfigMap",
            ObjectKind::Secret => "Secret",
        }
    }

    /// The API resource, as request log lines name it.
    pub fn resource(self) -> &'static str {
        match self {
            ObjectKind::ConfigMap => "configmaps",
            ObjectKind::Secret => "secrets",
        }
    }

    /// The prefix of [`PodInputs::errors`] keys.
    pub fn error_key(self, name: &str) -> String {
        match self {
            ObjectKind::ConfigMap => format!("configmap/{name}"),
            ObjectKind::Secret => format!("secret/{name}"),
        }
    }
}

/// Why an object a pod needs is not at hand (it may come later: the pod waits, it does not fail).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MissingObject {
    /// The last fetch failed; the recorded error is the API server's answer as text.
    #[error("cannot fetch {kind} {name:?} from the API server: {error}")]
    FetchFailed {
        /// `ConfigMap` or `Secret`.
        kind: &'static str,
        /// The object's name.
        name: String,
        /// Why the fetch failed, as recorded with the pod.
        error: String,
    },
    /// Not fetched yet.
    #[error("{kind} {name:?} has not been fetched from the API server yet")]
    NotFetched {
        /// `ConfigMap` or `Secret`.
        kind: &'static str,
        /// The object's name.
        name: String,
    },
}

impl PodInputs {
    /// Looks up a fetched object: `Ok(Some)` found, `Ok(None)` known not to exist, `Err` not fetched.
    pub fn object(&self, kind: ObjectKind, name: &str) -> Result<Option<&ObjectData>, MissingObject> {
        let map = match kind {
            ObjectKind::ConfigMap => &self.config_maps,
            ObjectKind::Secret => &self.secrets,
        };
        match map.get(name) {
            Some(found) => Ok(found.as_ref()),
            None => Err(match self.errors.get(&kind.error_key(name)) {
                Some(e) => MissingObject::FetchFailed {
                    kind: kind.as_str(),
                    name: name.to_owned(),
                    error: e.clone(),
                },
                None => MissingObject::NotFetched { kind: kind.as_str(), name: name.to_owned() },
            }),
        }
    }
}
