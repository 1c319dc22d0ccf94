//! Remote upgrades of the agent itself: what an operator asks for on the Node, what the node
//! reports back, and the rooms that carry an upgrade out (README: Upgrading a fleet).
//!
//! The operator sets [`IMAGE_ANNOTATION`] on a Node to an agent image pinned by digest (an OCI
//! image index with one entry per platform, published by `lichen push --agent`, signed cosign-style).
//! The node reports what runs in [`VERSION_ANNOTATION`] and `nodeInfo.kubeletVersion`, and the
//! progress of the last upgrade it was asked for in [`UPGRADE_ANNOTATION`] (an [`UpgradeReport`] as
//! JSON, for `lichen fleet upgrade` and scripts) and as Events on its Node ([`EventReason`]).
//!
//! This file owns the contract between the node and its operators: names and formats. It does no
//! I/O.

use serde::{Deserialize, Serialize};

pub mod artifact;
pub mod prepare;
pub mod registry;
pub mod signature;
pub mod slots;
pub mod switch;
pub mod upgrader;

/// The Node annotation an operator sets to ask for an upgrade: `<registry>/<repo>@sha256:<digest>`
/// of an agent image index. A tag alone is refused (a tag can move under a fleet mid-wave).
pub const IMAGE_ANNOTATION: &str = "lichen.dev/agent-image";
/// The Node annotation the node writes: `<version> <sha256:binary digest>` of the running agent.
pub const VERSION_ANNOTATION: &str = "lichen.dev/agent-version";
/// The Node annotation the node writes: the last upgrade's [`UpgradeReport`], as JSON.
pub const UPGRADE_ANNOTATION: &str = "lichen.dev/agent-upgrade";

/// Where the last upgrade the node was asked for stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Accepted: downloading, verifying, or switching to the new agent.
    Started,
    /// The new agent passed its health gate and is committed: it is what systemd starts from now on.
    Succeeded,
    /// Refused before anything was switched (unsigned, wrong architecture, a tag without a digest,
    /// upgrades off, ...): the running agent stays.
    Failed,
    /// The new agent ran and failed (did not start, crashed, hung, or missed its health gate): the
    /// previous version runs again. The digest is not tried again until the annotation changes.
    RolledBack,
}

impl Phase {
    /// Whether the upgrade has ended, one way or the other.
    pub fn is_final(self) -> bool {
        !matches!(self, Phase::Started)
    }
}

/// The value of [`UPGRADE_ANNOTATION`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeReport {
    /// The annotation's value this report answers, as the operator wrote it.
    pub image: String,
    /// Where it stands.
    pub phase: Phase,
    /// The new agent's version, once known (from the artifact).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Why it failed or was rolled back; what it is doing while started.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// When the phase was reached (RFC 3339).
    pub at: String,
}

/// The `reason` of the Events an upgrade records on its Node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventReason {
    /// The node accepted an upgrade and began it (Normal).
    UpgradeStarted,
    /// The new agent is committed (Normal).
    UpgradeSucceeded,
    /// The upgrade was refused, or the new agent failed (Warning).
    UpgradeFailed,
    /// The previous version runs again (Warning).
    UpgradeRolledBack,
}

impl EventReason {
    /// The Event's `reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventReason::UpgradeStarted => "UpgradeStarted",
            EventReason::UpgradeSucceeded => "UpgradeSucceeded",
            EventReason::UpgradeFailed => "UpgradeFailed",
            EventReason::UpgradeRolledBack => "UpgradeRolledBack",
        }
    }

    /// Whether the Event is a Warning (else Normal).
    pub fn is_warning(self) -> bool {
        matches!(self, EventReason::UpgradeFailed | EventReason::UpgradeRolledBack)
    }
}

/// The value of [`VERSION_ANNOTATION`] for `version` and the binary's sha256 `digest` (hex).
pub fn version_annotation(version: &str, digest_hex: &str) -> String {
    format!("{version} sha256:{digest_hex}")
}

/// `version` and binary digest (`sha256:<hex>`) from a [`VERSION_ANNOTATION`] value.
pub fn parse_version_annotation(value: &str) -> Option<(&str, &str)> {
    let (version, digest) = value.trim().split_once(' ')?;
    digest.starts_with("sha256:").then_some((version, digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_reads_as_operators_and_scripts_expect() {
        let r = UpgradeReport {
            image: "registry.example/lichen/agent@sha256:ab".into(),
            phase: Phase::RolledBack,
            version: Some("0.2.0".into()),
            reason: "the new agent exited with status 1 before its health gate".into(),
            at: "2026-12-06T15:00:00Z".into(),
        };
        let json = serde_json::to_string(&r).expect("json");
        assert_eq!(
            json,
            r#"{"image":"registry.example/lichen/agent@sha256:ab","phase":"RolledBack","version":"0.2.0","reason":"the new agent exited with status 1 before its health gate","at":"2026-12-06T15:00:00Z"}"#
        );
        assert_eq!(serde_json::from_str::<UpgradeReport>(&json).expect("back"), r);
        assert!(Phase::RolledBack.is_final() && !Phase::Started.is_final());
    }

    #[test]
    fn the_version_annotation_round_trips() {
        let v = version_annotation("0.1.0+ci.7", "00ff");
        assert_eq!(v, "0.1.0+ci.7 sha256:00ff");
        assert_eq!(parse_version_annotation(&v), Some(("0.1.0+ci.7", "sha256:00ff")));
        assert_eq!(parse_version_annotation("0.1.0"), None);
    }
}
