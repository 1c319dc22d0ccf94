//! Kubernetes names as the API server checks them (ground floor): RFC 1123 subdomains (Node and Pod
//! names), qualified names and label values, node labels a node may set on itself under
//! NodeRestriction, and node taints with their `key=value:Effect` grammar. Config parses these once
//! at start-up; the node and static pods use the parsed values. It imports nothing from the crate.

use std::fmt;
use std::str::FromStr;

/// The taint a Lichen node registers with unless configured otherwise: only pods that tolerate it
/// (WebAssembly workloads) are scheduled there.
pub const DEFAULT_TAINT: &str = "lichen.dev/runtime=wasm:NoSchedule";

/// A name the API server would refuse, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Not an RFC 1123 subdomain.
    #[error("must be 1 to 253 characters long")]
    SubdomainLength,
    /// Not an RFC 1123 subdomain.
    #[error(
        "must consist of lower-case letters, digits, '-' and '.', and start and end with a letter or digit"
    )]
    SubdomainChars,
    /// A qualified name (label key, taint key) with a bad prefix.
    #[error("{key:?}: prefix {source}")]
    Prefix {
        /// The whole key.
        key: String,
        /// What is wrong with the prefix.
        #[source]
        source: Box<NameError>,
    },
    /// A qualified name whose name part is wrong.
    #[error("{0:?} is not a valid qualified name")]
    Qualified(String),
}

/// Whether `s` has the shape of an RFC 1123 label: not empty, lower-case letters, digits and '-',
/// starting and ending with a letter or digit. (Length bounds are the caller's: a label alone may
/// have 63 characters, a subdomain 253 in all.)
pub fn is_label_shaped(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Checks an RFC 1123 subdomain, the rule for Node and Pod names.
pub fn validate_dns_subdomain(name: &str) -> Result<(), NameError> {
    if name.is_empty() || name.len() > 253 {
        return Err(NameError::SubdomainLength);
    }
    if !name.split('.').all(is_label_shaped) {
        return Err(NameError::SubdomainChars);
    }
    Ok(())
}

/// Checks a qualified name, `[prefix/]name`, as label and taint keys are.
pub fn validate_qualified_name(key: &str) -> Result<(), NameError> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        validate_dns_subdomain(p)
            .map_err(|e| NameError::Prefix { key: key.to_owned(), source: Box::new(e) })?;
    }
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && name.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric());
    if ok { Ok(()) } else { Err(NameError::Qualified(key.to_owned())) }
}

/// A node label the API server or NodeRestriction would refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    /// A flag or variable entry without `=`.
    #[error("{0:?} is not key=value")]
    NotKeyValue(String),
    /// The key is not a qualified name.
    #[error("label {key:?}: {source}")]
    Key {
        /// The key.
        key: String,
        /// Why.
        #[source]
        source: NameError,
    },
    /// The value is not a label value.
    #[error("label {key:?}: value {value:?} is not a valid label value")]
    Value {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// NodeRestriction forbids node-role labels on the node itself.
    #[error(
        "label {0:?}: NodeRestriction forbids a node to set node-role labels on itself; an admin applies \
         them with `kubectl label node <name> {0}=`"
    )]
    NodeRole(String),
    /// NodeRestriction forbids other kubernetes.io and k8s.io labels.
    #[error(
        "label {0:?}: NodeRestriction forbids a node to set labels under kubernetes.io or k8s.io other \
         than {settable} and the kubelet.kubernetes.io/ and node.kubernetes.io/ prefixes; use your own prefix",
        settable = NODE_SETTABLE.join(", ")
    )]
    Restricted(String),
}

/// Checks a node label the way the API server and NodeRestriction will, so a bad label is refused at
/// start-up with a reason instead of by the API server later.
pub fn validate_label(key: &str, value: &str) -> Result<(), LabelError> {
    validate_qualified_name(key).map_err(|source| LabelError::Key { key: key.to_owned(), source })?;
    let value_ok = value.len() <= 63
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && value.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric())
        && value.bytes().last().is_none_or(|b| b.is_ascii_alphanumeric());
    if !value_ok {
        return Err(LabelError::Value { key: key.to_owned(), value: value.to_owned() });
    }
    if let Some((prefix, _)) = key.split_once('/') {
        let under = |domain: &str| prefix == domain || prefix.ends_with(&format!(".{domain}"));
        if under("node-role.kubernetes.io") {
            return Err(LabelError::NodeRole(key.to_owned()));
        }
        if (under("kubernetes.io") || under("k8s.io"))
            && !NODE_SETTABLE.contains(&key)
            && !["kubelet.kubernetes.io", "node.kubernetes.io"].iter().any(|p| under(p))
        {
            return Err(LabelError::Restricted(key.to_owned()));
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

/// What a taint does to pods that do not tolerate it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaintEffect {
    /// New pods are not scheduled.
    NoSchedule,
    /// The scheduler avoids the node.
    PreferNoSchedule,
    /// Running pods are evicted too.
    NoExecute,
}

impl TaintEffect {
    /// The API's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TaintEffect::NoSchedule => "NoSchedule",
            TaintEffect::PreferNoSchedule => "PreferNoSchedule",
            TaintEffect::NoExecute => "NoExecute",
        }
    }
}

/// A node taint: key, optional value, effect. Written `key=value:Effect` or `key:Effect` in the
/// config, flags and environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaintSpec {
    /// Taint key.
    pub key: String,
    /// Taint value, possibly empty.
    pub value: String,
    /// The effect.
    pub effect: TaintEffect,
}

/// A taint that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaintError {
    /// No `:Effect`.
    #[error("{0:?} has no effect; write key=value:NoSchedule (or PreferNoSchedule, NoExecute)")]
    NoEffect(String),
    /// An effect the API does not know.
    #[error("{0:?}: effect {1:?} must be NoSchedule, PreferNoSchedule or NoExecute")]
    Effect(String, String),
    /// A bad key.
    #[error("{taint:?}: key {source}")]
    Key {
        /// The whole taint.
        taint: String,
        /// Why the key is refused.
        #[source]
        source: NameError,
    },
}

impl FromStr for TaintSpec {
    type Err = TaintError;

    fn from_str(s: &str) -> Result<Self, TaintError> {
        let (kv, effect) = s.rsplit_once(':').ok_or_else(|| TaintError::NoEffect(s.to_owned()))?;
        let effect = match effect {
            "NoSchedule" => TaintEffect::NoSchedule,
            "PreferNoSchedule" => TaintEffect::PreferNoSchedule,
            "NoExecute" => TaintEffect::NoExecute,
            other => return Err(TaintError::Effect(s.to_owned(), other.to_owned())),
        };
        let (key, value) = kv.split_once('=').unwrap_or((kv, ""));
        validate_qualified_name(key).map_err(|source| TaintError::Key { taint: s.to_owned(), source })?;
        Ok(TaintSpec { key: key.to_owned(), value: value.to_owned(), effect })
    }
}

impl fmt::Display for TaintSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "{}:{}", self.key, self.effect.as_str())
        } else {
            write!(f, "{}={}:{}", self.key, self.value, self.effect.as_str())
        }
    }
}

impl TaintSpec {
    /// [`DEFAULT_TAINT`], parsed.
    pub fn default_taint() -> TaintSpec {
        TaintSpec { key: "lichen.dev/runtime".into(), value: "wasm".into(), effect: TaintEffect::NoSchedule }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taints_parse_and_print_back() {
        assert_eq!(DEFAULT_TAINT.parse::<TaintSpec>(), Ok(TaintSpec::default_taint()));
        assert_eq!(TaintSpec::default_taint().to_string(), DEFAULT_TAINT);
        let t: TaintSpec = "edge:NoExecute".parse().expect("no value");
        assert_eq!((t.value.as_str(), t.effect), ("", TaintEffect::NoExecute));
        assert_eq!(t.to_string(), "edge:NoExecute");
        assert!(matches!("x=y".parse::<TaintSpec>(), Err(TaintError::NoEffect(_))));
        assert!(matches!("x=y:Sometimes".parse::<TaintSpec>(), Err(TaintError::Effect(..))));
        assert!(matches!("-x:NoSchedule".parse::<TaintSpec>(), Err(TaintError::Key { .. })));
    }

    #[test]
    fn labels_follow_node_restriction() {
        assert!(validate_label("acme.io/site", "barn-3").is_ok());
        assert!(validate_label("topology.kubernetes.io/zone", "z").is_ok());
        assert!(validate_label("node.kubernetes.io/anything", "z").is_ok());
        assert!(matches!(validate_label("node-role.kubernetes.io/edge", ""), Err(LabelError::NodeRole(_))));
        assert!(matches!(validate_label("kubernetes.io/foo", "x"), Err(LabelError::Restricted(_))));
        assert!(matches!(validate_label("a", "-x"), Err(LabelError::Value { .. })));
        assert!(matches!(validate_label("Bad_/x", "v"), Err(LabelError::Key { .. })));
    }

    #[test]
    fn subdomains() {
        assert!(validate_dns_subdomain("pi-01.site").is_ok());
        assert_eq!(validate_dns_subdomain(""), Err(NameError::SubdomainLength));
        assert_eq!(validate_dns_subdomain("Pi"), Err(NameError::SubdomainChars));
        assert_eq!(validate_dns_subdomain("a..b"), Err(NameError::SubdomainChars));
    }
}
