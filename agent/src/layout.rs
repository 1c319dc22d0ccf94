//! The state directory's layout: every path Lichen keeps under `state_dir`, named here and nowhere
//! else.
//!
//! Ground floor: it imports nothing from the crate. Rooms ask a [`StateLayout`] for their paths
//! instead of joining names onto `state_dir` themselves, so that what is on a board's disk can be
//! read in one place (and the packaging, the README and the security review agree with it).
//!
//! ```text
//! <state_dir>/                  0700, owned by the agent's user
//!   store/                      the sled database (pods, modules, artifacts, the MQTT spools)
//!   pods/<uid>/                 each pod's own directories (emptyDir, configMap, secret volumes)
//!   logs/<ns>_<name>_<uid>/     container logs
//!   pki/                        the node's key and certificates, the kubelet serving pair
//!   node.kubeconfig             written by a bootstrap-token join
//!   bootstrap-token             the default place of the join token (deleted after the join)
//!   lichen.sock                 the control socket (0600)
//!   offline-seconds             time without API contact, carried across restarts
//! ```

use std::path::{Path, PathBuf};

/// The paths under one state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateLayout {
    root: PathBuf,
}

impl StateLayout {
    /// The layout of `state_dir`.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        StateLayout { root: state_dir.into() }
    }

    /// The state directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The sled database.
    pub fn store(&self) -> PathBuf {
        self.root.join("store")
    }

    /// Per-pod directories (emptyDir, configMap and secret volumes), `pods/<uid>`.
    pub fn pods(&self) -> PathBuf {
        self.root.join("pods")
    }

    /// Container logs, one directory per pod.
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }

    /// The node's key and certificates, and the kubelet API's serving pair.
    pub fn pki(&self) -> PathBuf {
        self.root.join("pki")
    }

    /// The kubeconfig a bootstrap-token join writes.
    pub fn node_kubeconfig(&self) -> PathBuf {
        self.root.join("node.kubeconfig")
    }

    /// Where the bootstrap token is looked for when `join.token_file` is not set.
    pub fn bootstrap_token(&self) -> PathBuf {
        self.root.join("bootstrap-token")
    }

    /// The control socket `lichen status` and `lichen modules` reach a running agent through.
    pub fn control_socket(&self) -> PathBuf {
        self.root.join("lichen.sock")
    }

    /// Seconds without API contact, kept across restarts.
    pub fn offline_seconds(&self) -> PathBuf {
        self.root.join("offline-seconds")
    }

    /// The agent's own upgrades: `upgrade.json` (the switch's record), `versions/<digest>/lichen`
    /// (at most two staged binaries) and `download/` (a download in progress, resumable).
    pub fn agent(&self) -> PathBuf {
        self.root.join("agent")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_is_inside_the_state_dir_and_distinct() {
        let l = StateLayout::new("/var/lib/lichen");
        let paths = [
            l.store(),
            l.pods(),
            l.logs(),
            l.pki(),
            l.node_kubeconfig(),
            l.bootstrap_token(),
            l.control_socket(),
            l.offline_seconds(),
            l.agent(),
        ];
        for p in &paths {
            assert_eq!(p.parent(), Some(Path::new("/var/lib/lichen")), "{}", p.display());
        }
        let mut names: Vec<_> = paths.iter().collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), paths.len());
        // What packaging, the README and existing boards rely on.
        assert_eq!(l.store(), Path::new("/var/lib/lichen/store"));
        assert_eq!(l.control_socket(), Path::new("/var/lib/lichen/lichen.sock"));
        assert_eq!(l.node_kubeconfig(), Path::new("/var/lib/lichen/node.kubeconfig"));
    }
}
