//! The plan types: what admission hands the worker for one pod (containers, volumes, limits,
//! credentials, warnings).
//!
//! Plain data, built only by [`super::plan`] once every check has passed, so a worker holding a
//! [`PodPlan`] may trust it (names and UIDs are safe path components, hostPaths were admitted). No
//! validation or I/O lives here.

use std::path::PathBuf;
use std::time::Duration;

use super::ModuleSource;
use crate::modules::{PullCredentials, PullPolicy};
use crate::pod::state::RestartPolicy;
use crate::runtime::Preopen;

/// What the agent needs to run one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerPlan {
    /// Container name.
    pub name: String,
    /// `image` as written.
    pub image: String,
    /// Where the module is.
    pub source: ModuleSource,
    /// `imagePullPolicy`, defaulted as Kubernetes does.
    pub pull_policy: PullPolicy,
    /// `argv`: `command` (or the container name) followed by `args`.
    pub argv: Vec<String>,
    /// Environment, in order.
    pub env: Vec<(String, String)>,
    /// Volume mounts.
    pub preopens: Vec<Preopen>,
    /// Fuel per run; `None` is unlimited.
    pub fuel: Option<u64>,
    /// Memory limit in bytes.
    pub memory_limit: u64,
    /// Wall-clock limit per run.
    pub timeout: Option<Duration>,
}

/// A pod volume backed by a host directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumePlan {
    /// Volume name.
    pub name: String,
    /// The directory on the host.
    pub host: PathBuf,
    /// Whether the agent creates (and, for emptyDir, deletes) it.
    pub kind: VolumeKind,
}

/// How a volume's directory is managed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeKind {
    /// Created with the pod, removed with it.
    EmptyDir,
    /// Must exist already.
    HostPath,
    /// Created if missing, never removed.
    HostPathOrCreate,
    /// Files the agent writes (configMap, secret, downwardAPI, projected), always mounted read-only
    /// and rewritten when their sources change.
    Files(Vec<VolumeFile>),
}

/// One file of a [`VolumeKind::Files`] volume.
#[derive(Clone, PartialEq, Eq)]
pub struct VolumeFile {
    /// Path relative to the volume's directory (validated: no `..`, not absolute).
    pub path: PathBuf,
    /// Contents.
    pub data: Vec<u8>,
    /// Permission bits on the host.
    pub mode: u32,
}

impl std::fmt::Debug for VolumeFile {
    // Secret contents stay out of logs and test output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VolumeFile({}, {} bytes, {:o})", self.path.display(), self.data.len(), self.mode)
    }
}

/// A pod ready to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodPlan {
    /// `namespace/name`.
    pub key: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
    /// Restart policy.
    pub restart_policy: RestartPolicy,
    /// Init containers, run in order before the others.
    pub init_containers: Vec<ContainerPlan>,
    /// Containers.
    pub containers: Vec<ContainerPlan>,
    /// Volumes.
    pub volumes: Vec<VolumePlan>,
    /// `spec.activeDeadlineSeconds`.
    pub active_deadline: Option<Duration>,
    /// Registry credentials from `imagePullSecrets`.
    pub pull_credentials: PullCredentials,
    /// Accepted but not enforced.
    pub warnings: Vec<String>,
    /// What the pod's annotations ask of MQTT (stdout to a topic, subscriptions to stdin).
    pub mqtt: Option<crate::telemetry::bridge::PodMqtt>,
}

impl PodPlan {
    /// Every container, init containers first.
    pub fn all_containers(&self) -> impl Iterator<Item = &ContainerPlan> {
        self.init_containers.iter().chain(&self.containers)
    }
}
