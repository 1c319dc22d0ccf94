//! The pod's side of container logs: which directory holds the logs of a pod's container (from
//! the pods the store records, or a pod described by the caller), and whether that container is
//! running now (from the status board), which ends a follow.
//!
//! The log format itself, writing and reading it, is [`crate::logfmt`]'s; this file must not read
//! or parse log files. Spelling a request's options is the kubelet's (`kubelet::query`).

use std::io;
use std::path::Path;
use std::sync::Arc;

use k8s_openapi::api::core::v1::PodStatus;

use crate::board::StatusBoard;
use crate::logfmt::{ContainerLogs, LogError};
use crate::store::StateStore;

/// A pod as far as finding its logs goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodContainers {
    /// `namespace/name`.
    pub key: String,
    /// The pod's UID.
    pub uid: String,
    /// Its app containers.
    pub containers: Vec<String>,
    /// Its init containers.
    pub init_containers: Vec<String>,
}

impl PodContainers {
    /// The containers of a stored pod.
    pub fn of_record(r: &crate::store::PodRecord) -> Self {
        let names = |field: &str| -> Vec<String> {
            r.pod["spec"][field]
                .as_array()
                .map(|cs| cs.iter().filter_map(|c| c["name"].as_str().map(str::to_owned)).collect())
                .unwrap_or_default()
        };
        PodContainers {
            key: r.key.clone(),
            uid: r.uid.clone(),
            containers: names("containers"),
            init_containers: names("initContainers"),
        }
    }
}

/// Finds a container's log directory from the pods the store records (newest UID of that
/// namespace/name). `container: None` picks the pod's only container, else
/// `LogError::BadRequest("a container name must be specified for pod NAME, choose one of: [a b]")`
/// like the API server. Unknown pod or container: `LogError::NotFound` naming it. Init containers
/// count as containers here.
pub fn locate(
    store: &dyn StateStore,
    logs_dir: &Path,
    namespace: &str,
    pod: &str,
    container: Option<&str>,
) -> Result<ContainerLogs, LogError> {
    let key = format!("{namespace}/{pod}");
    // The store keeps one record per key, the newest UID: a pod recreated under the same name
    // replaces the record of the old one.
    let record = store.get_pod(&key).map_err(|e| LogError::Io {
        path: logs_dir.parent().map(|d| d.join("store")).unwrap_or_else(|| logs_dir.to_owned()),
        source: io::Error::other(e.to_string()),
    })?;
    let Some(record) = record else {
        return Err(LogError::NotFound(format!("pod {key:?} not found on this node")));
    };
    locate_in(&PodContainers::of_record(&record), logs_dir, container)
}

/// Finds the log directory of `container` (or of the pod's only container) of `pod`.
pub fn locate_in(
    pod: &PodContainers,
    logs_dir: &Path,
    container: Option<&str>,
) -> Result<ContainerLogs, LogError> {
    let name = pod.key.split_once('/').map_or(pod.key.as_str(), |(_, n)| n);
    let container = match container {
        Some(c) if pod.containers.iter().chain(&pod.init_containers).any(|n| n == c) => c.to_owned(),
        Some(c) => {
            let all: Vec<&str> =
                pod.containers.iter().chain(&pod.init_containers).map(String::as_str).collect();
            return Err(LogError::NotFound(format!(
                "container {c:?} not found in pod {:?}; its containers: [{}]",
                pod.key,
                all.join(" ")
            )));
        }
        None if pod.containers.len() == 1 => pod.containers[0].clone(),
        None => {
            // The API server's wording, so scripts written against kubectl read it the same.
            let mut message = format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                pod.containers.join(" ")
            );
            if !pod.init_containers.is_empty() {
                message += &format!(" or one of the init containers: [{}]", pod.init_containers.join(" "));
            }
            return Err(LogError::BadRequest(message));
        }
    };
    Ok(ContainerLogs {
        dir: super::worker::pod_log_dir(logs_dir, &pod.key, &pod.uid).join(&container),
        pod_key: pod.key.clone(),
        uid: pod.uid.clone(),
        container,
    })
}

/// An `is_running` for [`crate::logfmt::stream`] answered from the status board: whether
/// `container` of the pod `pod_key` is in the running state now. A pod that is gone is not running.
pub fn running_probe(
    board: Arc<StatusBoard>,
    pod_key: String,
    container: String,
) -> Arc<dyn Fn() -> bool + Send + Sync> {
    Arc::new(move || board.get(&pod_key).is_some_and(|e| container_running(&e.status, &container)))
}

/// Whether `container` (an app or init container) is running in `status`.
pub fn container_running(status: &PodStatus, container: &str) -> bool {
    status
        .container_statuses
        .iter()
        .flatten()
        .chain(status.init_container_statuses.iter().flatten())
        .find(|c| c.name == container)
        .is_some_and(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containers_are_found_as_the_api_server_finds_them() {
        let dir = Path::new("/state/logs");
        let pod = PodContainers {
            key: "ns/web".into(),
            uid: "u1".into(),
            containers: vec!["app".into(), "side".into()],
            init_containers: vec!["setup".into()],
        };
        let l = locate_in(&pod, dir, Some("setup")).expect("init containers count");
        assert_eq!(l.dir, Path::new("/state/logs/ns_web_u1/setup"));
        let e = locate_in(&pod, dir, None).expect_err("two containers");
        assert_eq!(
            e.to_string(),
            "a container name must be specified for pod web, choose one of: [app side] or one of the init containers: [setup]"
        );
        assert_eq!(e.http_status(), 400);
        let e = locate_in(&pod, dir, Some("nope")).expect_err("unknown");
        assert_eq!(e.http_status(), 404);
        assert!(e.to_string().contains("\"nope\""), "{e}");
        let one = PodContainers { containers: vec!["app".into()], ..pod };
        assert_eq!(locate_in(&one, dir, None).expect("the only one").container, "app");
    }

    #[test]
    fn locate_reads_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::SledStore::open(&dir.path().join("store")).expect("store");
        let pod = serde_json::json!({
            "metadata": {"name": "web", "namespace": "ns"},
            "spec": {"containers": [{"name": "app"}, {"name": "side"}], "initContainers": [{"name": "setup"}]}
        });
        store
            .put_pod(&crate::store::PodRecord {
                key: "ns/web".into(),
                uid: "u2".into(),
                source: crate::store::PodSource::Api,
                pod,
                status: None,
                restart_counts: Default::default(),
                inputs: None,
            })
            .expect("put");
        let logs = dir.path().join("logs");
        let l = locate(&store, &logs, "ns", "web", Some("side")).expect("found");
        assert_eq!((l.pod_key.as_str(), l.uid.as_str()), ("ns/web", "u2"));
        assert_eq!(l.dir, logs.join("ns_web_u2/side"));
        let e = locate(&store, &logs, "default", "web", None).expect_err("other namespace");
        assert_eq!(e.http_status(), 404);
        assert_eq!(e.to_string(), "pod \"default/web\" not found on this node");
    }
}
