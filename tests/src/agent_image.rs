//! What the agent-image and fleet-upgrade tests share (the fast tier and the cluster tier): signing
//! keys made with openssl as an operator makes them, version-stamped copies of the agent under test
//! (another build of it), `lichen push --agent` and the lines it prints, what a node reports of an
//! upgrade (its Node's annotation and Events), and `lichen fleet upgrade` run as an operator runs it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, Node};
use kube::api::{Api, Patch, PatchParams};
use lichen::upgrade::{IMAGE_ANNOTATION, UPGRADE_ANNOTATION, UpgradeReport, VERSION_ANNOTATION};

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Makes an ECDSA P-256 key pair with openssl: `<name>.pem` (PKCS#8) and `<name>.pub` (SPKI).
pub fn p256_key(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (key, public) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.pub")));
    for args in [
        vec!["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path(&key)],
        vec!["ec", "-in", path(&key), "-pubout", "-out", path(&public)],
    ] {
        let out = Command::new("openssl").args(&args).output().expect("openssl (tests/run.sh installs it)");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    (key, public)
}

/// The value after `<label>: ` on a line of `out`.
pub fn field<'a>(out: &'a str, label: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(label).and_then(|r| r.strip_prefix(": ")))
        .unwrap_or_else(|| panic!("no {label:?} line in:\n{out}"))
}

/// A copy of the agent binary `elf` stamped with build id `id`, written into `dir`: another build
/// of the same agent. Returns its path and the version it reports.
pub fn stamped_copy(elf: &Path, dir: &Path, id: &str) -> (PathBuf, String) {
    let mut bytes = std::fs::read(elf).expect("read the lichen binary");
    lichen::version::stamp(&mut bytes, id).expect("stamp");
    let copy = dir.join(format!("lichen-{id}"));
    std::fs::write(&copy, &bytes).expect("write the stamped binary");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    (copy, lichen::version::read_version(&bytes).expect("its version"))
}

/// `lichen push --agent <binary> <reference> [--sign-key <key>]` with the agent config `config`
/// (its `modules.*` settings: insecure registries, CAs); the pinned image it printed.
pub fn push_agent(config: &Path, binary: &Path, reference: &str, key: Option<&Path>) -> String {
    let mut cmd = Command::new(crate::lichen_bin());
    cmd.args(["push", "--agent"]).arg(binary).arg(reference).arg("--config").arg(config);
    if let Some(k) = key {
        cmd.arg("--sign-key").arg(k);
    }
    let out = crate::lichen_ok(cmd.env_remove("LICHEN_CONFIG").output().expect("lichen push"));
    field(&out, "image").to_owned()
}

/// Sets `lichen.dev/agent-image` on Node `node`, as an operator's `kubectl annotate` does.
pub async fn annotate(client: &kube::Client, node: &str, image: &str) {
    let patch = serde_json::json!({"metadata": {"annotations": {IMAGE_ANNOTATION: image}}});
    Api::<Node>::all(client.clone())
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("annotate the node");
}

/// The Node's `lichen.dev/agent-version`: (version, binary digest).
pub async fn agent_version(client: &kube::Client, node: &str) -> Option<(String, String)> {
    let n = Api::<Node>::all(client.clone()).get(node).await.ok()?;
    let v = n.metadata.annotations.as_ref()?.get(VERSION_ANNOTATION)?.clone();
    lichen::upgrade::parse_version_annotation(&v).map(|(v, d)| (v.to_owned(), d.to_owned()))
}

/// Node `node`'s `lichen.dev/agent-upgrade` report once it answers `image` with a final phase,
/// waiting at most `timeout`.
pub async fn upgrade_outcome(
    client: &kube::Client,
    node: &str,
    image: &str,
    timeout: Duration,
) -> UpgradeReport {
    let nodes: Api<Node> = Api::all(client.clone());
    crate::wait_for_async(timeout, "the upgrade's outcome on the Node", || async {
        let n = nodes.get(node).await.ok()?;
        let text = n.metadata.annotations.as_ref()?.get(UPGRADE_ANNOTATION)?.clone();
        let report: UpgradeReport = serde_json::from_str(&text).ok()?;
        (report.image == image && report.phase.is_final()).then_some(report)
    })
    .await
}

/// `(reason, type, message)` of the Events recorded on Node `node` (namespace `default`, where
/// node events go), oldest first.
pub async fn node_events(client: &kube::Client, node: &str) -> Vec<(String, String, String)> {
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let mut list: Vec<Event> = events
        .list(&Default::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| {
            e.involved_object.kind.as_deref() == Some("Node")
                && e.involved_object.name.as_deref() == Some(node)
        })
        .collect();
    list.sort_by_key(|e| e.metadata.creation_timestamp.clone().map(|t| t.0));
    list.into_iter()
        .map(|e| (e.reason.unwrap_or_default(), e.type_.unwrap_or_default(), e.message.unwrap_or_default()))
        .collect()
}

/// What `lichen fleet upgrade` printed and how it exited.
pub struct FleetRun {
    /// Its exit status.
    pub status: std::process::ExitStatus,
    /// Progress lines, then the table.
    pub stdout: String,
    /// Errors.
    pub stderr: String,
}

impl FleetRun {
    /// The table's row for `node`, split on runs of spaces: NODE, OUTCOME, VERSION, then the
    /// reason's words.
    pub fn row(&self, node: &str) -> Vec<&str> {
        let table = self.stdout.rsplit_once("\nNODE ").map_or("", |(_, t)| t);
        table
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|cols| cols.first() == Some(&node))
            .unwrap_or_else(|| panic!("no row for {node} in the table:\n{}", self.stdout))
    }

    /// The position of the first progress line starting with `prefix` (for the order of events).
    pub fn line_index(&self, prefix: &str) -> usize {
        self.stdout
            .lines()
            .position(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{}", self.stdout))
    }
}

/// Runs `lichen fleet upgrade -l <selector> --image <image> --max-unavailable <n>` with the operator
/// kubeconfig `kubeconfig` (off the async runtime: it takes as long as the rollout).
pub async fn fleet_upgrade(kubeconfig: &Path, selector: &str, image: &str, max_unavailable: u32) -> FleetRun {
    let mut cmd = Command::new(crate::lichen_bin());
    cmd.args(["fleet", "upgrade", "--selector", selector, "--image", image, "--timeout-secs", "180"])
        .arg("--max-unavailable")
        .arg(max_unavailable.to_string())
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .env_remove("LICHEN_CONFIG")
        .env_remove("LICHEN_KUBECONFIG");
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("lichen fleet upgrade"))
        .await
        .expect("the fleet command's thread");
    let run = FleetRun {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    eprintln!("lichen fleet upgrade ({}):\n{}{}", run.status, run.stdout, run.stderr);
    run
}
