//! `lichen fleet upgrade`: the operator's side of a fleet upgrade, rolling an agent image out in
//! waves (README: Rolling out in waves). A client run with an operator's kubeconfig, not a
//! controller in the cluster: it annotates the matching Nodes with `lichen.dev/agent-image` in waves
//! of `--max-unavailable`, waits for every node of a wave to report its outcome
//! (`lichen.dev/agent-upgrade`) and, for a success, the new `lichen.dev/agent-version` and Ready,
//! and stops at the first wave with a failure, leaving the nodes after it untouched.
//!
//! What a Node object says about the rollout ([`verdict`]), which nodes are skipped and how the
//! rest are cut into waves ([`plan`]), and the table ([`render`]) are pure; the loop that patches
//! and polls is thin. It writes nothing but the image annotation (what a node reports is the
//! node's own to write) and keeps no state of its own: run again, it skips the nodes already done.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, Patch, PatchParams};

use crate::upgrade::{IMAGE_ANNOTATION, Phase, UPGRADE_ANNOTATION, UpgradeReport, VERSION_ANNOTATION};

/// How often a wave's Nodes are read while it runs: one GET per node of the wave.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Why `lichen fleet upgrade` could not run (a node's own failure is an [`Outcome`], not this).
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The image is not pinned by digest.
    #[error(
        "--image {0:?} is not pinned by digest: give <registry>/<repository>@sha256:<digest> \
         (`lichen push --agent` prints it); a tag could move under the fleet mid-rollout"
    )]
    NotPinned(String),
    /// No client could be made from the kubeconfig.
    #[error(transparent)]
    Client(#[from] crate::cluster::client::ClientError),
    /// The Nodes could not be listed.
    #[error("cannot list the Nodes matching {selector:?}: {source}")]
    List {
        /// The label selector.
        selector: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The selector matches no Node: most likely a typo, so nothing is done.
    #[error("no Node matches the selector {0:?}")]
    NoNodes(String),
}

/// What `lichen fleet upgrade` was asked to do.
#[derive(Debug, Clone)]
pub struct FleetUpgrade {
    /// The label selector of the Nodes to upgrade (as `kubectl get nodes -l`).
    pub selector: String,
    /// The agent image, pinned by digest.
    pub image: String,
    /// How many nodes are upgraded at a time (at least 1).
    pub max_unavailable: usize,
    /// How long one wave may take.
    pub timeout: Duration,
    /// The operator's kubeconfig; `None`: kube's inference (`$KUBECONFIG`, `~/.kube/config`).
    pub kubeconfig: Option<PathBuf>,
}

/// How one node's upgrade ended, as the table shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Committed, reporting the new version, and Ready.
    Succeeded,
    /// Refused by the node before anything was switched (unsigned, wrong architecture, ...).
    Failed,
    /// The new agent ran and failed; the node runs the version before.
    RolledBack,
    /// No final outcome (or no Ready after a success) within the wave's timeout.
    TimedOut,
    /// Already running this image when the rollout began: not annotated.
    Skipped,
    /// Not annotated: the rollout stopped at an earlier wave's failure.
    NotStarted,
}

impl Outcome {
    /// The word in the table.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "Succeeded",
            Outcome::Failed => "Failed",
            Outcome::RolledBack => "RolledBack",
            Outcome::TimedOut => "TimedOut",
            Outcome::Skipped => "Skipped",
            Outcome::NotStarted => "NotStarted",
        }
    }

    /// Whether the node runs the image at the end (the command's exit status).
    pub fn is_success(self) -> bool {
        matches!(self, Outcome::Succeeded | Outcome::Skipped)
    }
}

/// One line of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeOutcome {
    /// The Node's name.
    pub node: String,
    /// How it ended.
    pub outcome: Outcome,
    /// The version the node reported for the image, if any.
    pub version: Option<String>,
    /// Why it failed, or what it was doing when the wave timed out.
    pub reason: String,
}

/// What a Node object says about its upgrade to an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Still under way: what it is doing (a progress line).
    Waiting(String),
    /// Ended: Succeeded, Failed or RolledBack.
    Done(NodeOutcome),
}

/// The verdict on `node`'s upgrade to `image`: its `lichen.dev/agent-upgrade` report for this image,
/// and for a success the reported running version and the Ready condition as well (a node that
/// committed but is not back is not done). `stale` is the report the node carried when it was
/// annotated, if that report predates this request: an outcome of an earlier try of the same image
/// (a retry after the annotation was removed) is no answer until the node writes a new one.
pub fn verdict(node: &Node, image: &str, stale: Option<&str>) -> Verdict {
    let name = node.metadata.name.clone().unwrap_or_default();
    let annotations = node.metadata.annotations.clone().unwrap_or_default();
    let text = annotations.get(UPGRADE_ANNOTATION).filter(|t| stale != Some(t.as_str()));
    let report = text.and_then(|t| serde_json::from_str::<UpgradeReport>(t).ok());
    let Some(report) = report.filter(|r| r.image == image) else {
        return Verdict::Waiting("waiting for the node to take up the image".to_owned());
    };
    let done = |outcome, reason: String| {
        Verdict::Done(NodeOutcome { node: name.clone(), outcome, version: report.version.clone(), reason })
    };
    match report.phase {
        Phase::Started => Verdict::Waiting(format!("started: {}", report.reason)),
        Phase::Failed => done(Outcome::Failed, report.reason.clone()),
        Phase::RolledBack => done(Outcome::RolledBack, report.reason.clone()),
        Phase::Succeeded => {
            let running = annotations
                .get(VERSION_ANNOTATION)
                .and_then(|v| crate::upgrade::parse_version_annotation(v))
                .map(|(v, _)| v.to_owned());
            let committed = report.version.clone().unwrap_or_default();
            if report.version.is_some() && running.as_deref() != report.version.as_deref() {
                Verdict::Waiting(format!("committed {committed}; waiting for it to report its version"))
            } else if !ready(node) {
                Verdict::Waiting(format!("committed {committed}; waiting for the node to be Ready"))
            } else {
                done(Outcome::Succeeded, String::new())
            }
        }
    }
}

fn ready(node: &Node) -> bool {
    let conditions = node.status.as_ref().and_then(|s| s.conditions.as_ref());
    conditions.is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The rollout: nodes already done, and the rest in waves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Nodes already running the image (reporting it Succeeded, its version, and Ready).
    pub skipped: Vec<NodeOutcome>,
    /// The other nodes by name, `max_unavailable` at a time.
    pub waves: Vec<Vec<String>>,
}

/// Splits `nodes` into those already done and waves of at most `max_unavailable` (at least 1), in
/// name order so that a rerun goes the same way.
pub fn plan(nodes: &[Node], image: &str, max_unavailable: usize) -> Plan {
    let mut sorted: Vec<&Node> = nodes.iter().collect();
    sorted.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut skipped = Vec::new();
    let mut todo = Vec::new();
    for node in sorted {
        match verdict(node, image, None) {
            Verdict::Done(d) if d.outcome == Outcome::Succeeded => skipped.push(NodeOutcome {
                outcome: Outcome::Skipped,
                reason: "already runs this image".to_owned(),
                ..d
            }),
            _ => todo.push(node.metadata.name.clone().unwrap_or_default()),
        }
    }
    let waves = todo.chunks(max_unavailable.max(1)).map(<[String]>::to_vec).collect();
    Plan { skipped, waves }
}

/// The table: NODE, OUTCOME, VERSION, REASON, columns aligned as kubectl aligns them.
pub fn render(outcomes: &[NodeOutcome]) -> String {
    let rows: Vec<[&str; 4]> = outcomes
        .iter()
        .map(|o| {
            [o.node.as_str(), o.outcome.as_str(), o.version.as_deref().unwrap_or("-"), o.reason.as_str()]
        })
        .collect();
    let header = ["NODE", "OUTCOME", "VERSION", "REASON"];
    let width = |i: usize| rows.iter().map(|r| r[i].len()).chain([header[i].len()]).max().unwrap_or(0);
    let widths = [width(0), width(1), width(2)];
    let line = |r: [&str; 4]| {
        let text = format!(
            "{:w0$}   {:w1$}   {:w2$}   {}",
            r[0],
            r[1],
            r[2],
            r[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
        format!("{}\n", text.trim_end())
    };
    std::iter::once(header).chain(rows).map(line).collect()
}

/// The end of a rollout: every matching node's outcome, in name order.
#[derive(Debug, Clone)]
pub struct FleetReport {
    /// One per node.
    pub outcomes: Vec<NodeOutcome>,
}

impl FleetReport {
    /// Whether every node runs the image.
    pub fn succeeded(&self) -> bool {
        self.outcomes.iter().all(|o| o.outcome.is_success())
    }
}

/// Runs the rollout, printing progress lines on standard output as it goes.
pub async fn upgrade(req: &FleetUpgrade) -> Result<FleetReport, FleetError> {
    let image = req.image.trim();
    if !crate::upgrade::upgrader::pinned(image) {
        return Err(FleetError::NotPinned(req.image.clone()));
    }
    let client = match &req.kubeconfig {
        Some(path) => crate::cluster::client::connect(path).await?,
        None => crate::cluster::client::infer().await?,
    };
    let nodes: Api<Node> = Api::all(client);
    let listed = nodes
        .list(&ListParams::default().labels(&req.selector))
        .await
        .map_err(|source| FleetError::List { selector: req.selector.clone(), source })?;
    if listed.items.is_empty() {
        return Err(FleetError::NoNodes(req.selector.clone()));
    }
    let plan = plan(&listed.items, image, req.max_unavailable);
    let mut outcomes: BTreeMap<String, NodeOutcome> = BTreeMap::new();
    for s in &plan.skipped {
        println!("{}: skipped, already runs {}", s.node, s.version.as_deref().unwrap_or(image));
        outcomes.insert(s.node.clone(), s.clone());
    }
    let total = plan.waves.len();
    let mut stopped = false;
    for (i, wave) in plan.waves.iter().enumerate() {
        if stopped {
            for node in wave {
                let reason = "not annotated: the rollout stopped at an earlier wave".to_owned();
                let o =
                    NodeOutcome { node: node.clone(), outcome: Outcome::NotStarted, version: None, reason };
                outcomes.insert(node.clone(), o);
            }
            continue;
        }
        println!("wave {}/{total}: {}", i + 1, wave.join(", "));
        let ended = run_wave(&nodes, wave, image, req.timeout).await;
        stopped = ended.iter().any(|o| !o.outcome.is_success());
        if stopped && i + 1 < total {
            println!("stopping: wave {} did not succeed; the nodes after it are not annotated", i + 1);
        }
        outcomes.extend(ended.into_iter().map(|o| (o.node.clone(), o)));
    }
    Ok(FleetReport { outcomes: outcomes.into_values().collect() })
}

/// Annotates the wave's nodes and waits until each has a final verdict or `timeout` passes.
async fn run_wave(nodes: &Api<Node>, wave: &[String], image: &str, timeout: Duration) -> Vec<NodeOutcome> {
    let deadline = Instant::now() + timeout;
    let mut ended = Vec::new();
    // The last progress line printed for each node still under way.
    let mut pending: BTreeMap<String, String> = BTreeMap::new();
    let patch = serde_json::json!({ "metadata": { "annotations": { IMAGE_ANNOTATION: image } } });
    // Per node, the report it carried before this annotation, when the annotation changes with it.
    let mut stale: BTreeMap<String, String> = BTreeMap::new();
    for node in wave {
        if let Ok(Some(before)) = nodes.get_opt(node).await {
            let a = before.metadata.annotations.unwrap_or_default();
            let asked_already = a.get(IMAGE_ANNOTATION).is_some_and(|i| i == image);
            if let (false, Some(report)) = (asked_already, a.get(UPGRADE_ANNOTATION)) {
                stale.insert(node.clone(), report.clone());
            }
        }
        match nodes.patch(node, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => {
                println!("{node}: annotated {IMAGE_ANNOTATION}={image}");
                pending.insert(node.clone(), String::new());
            }
            Err(e) => {
                let reason = format!("cannot annotate the Node: {}", crate::api_error::brief(&e));
                println!("{node}: {reason}");
                ended.push(NodeOutcome {
                    node: node.clone(),
                    outcome: Outcome::Failed,
                    version: None,
                    reason,
                });
            }
        }
    }
    while !pending.is_empty() {
        let names: Vec<String> = pending.keys().cloned().collect();
        for name in names {
            let status = match nodes.get_opt(&name).await {
                Ok(Some(node)) => verdict(&node, image, stale.get(&name).map(String::as_str)),
                Ok(None) => Verdict::Done(NodeOutcome {
                    node: name.clone(),
                    outcome: Outcome::Failed,
                    version: None,
                    reason: "the Node was deleted".to_owned(),
                }),
                // A blip on the operator's link is not the node's failure: read it again.
                Err(e) => Verdict::Waiting(format!("cannot read the Node: {}", crate::api_error::brief(&e))),
            };
            match status {
                Verdict::Done(o) => {
                    let version = o.version.as_deref().unwrap_or("-");
                    let line = format!("{name}: {} {version} {}", o.outcome.as_str(), o.reason);
                    println!("{}", line.trim_end());
                    pending.remove(&name);
                    ended.push(o);
                }
                Verdict::Waiting(what) => {
                    if pending.get(&name) != Some(&what) {
                        println!("{name}: {what}");
                        pending.insert(name, what);
                    }
                }
            }
        }
        if pending.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            for (node, what) in std::mem::take(&mut pending) {
                let reason = format!("no outcome within {}s: {what}", timeout.as_secs());
                println!("{node}: TimedOut {reason}");
                ended.push(NodeOutcome { node, outcome: Outcome::TimedOut, version: None, reason });
            }
            break;
        }
        tokio::time::sleep(POLL_INTERVAL.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
    ended
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{NodeCondition, NodeStatus};
    use kube::api::ObjectMeta;

    use super::*;

    const IMAGE: &str = "reg.example:5000/fleet/lichen@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const OTHER: &str = "reg.example:5000/fleet/lichen@sha256:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff";

    fn report(image: &str, phase: Phase, version: Option<&str>, reason: &str) -> String {
        serde_json::to_string(&UpgradeReport {
            image: image.into(),
            phase,
            version: version.map(str::to_owned),
            reason: reason.into(),
            at: "2026-12-06T15:00:00Z".into(),
        })
        .expect("json")
    }

    /// A Node `name` with an upgrade report (if any), a running version and a Ready status.
    fn node(name: &str, upgrade: Option<String>, running: &str, ready: &str) -> Node {
        let mut annotations = BTreeMap::from([(
            VERSION_ANNOTATION.to_owned(),
            crate::upgrade::version_annotation(running, "00ff"),
        )]);
        if let Some(u) = upgrade {
            annotations.insert(UPGRADE_ANNOTATION.to_owned(), u);
        }
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                annotations: Some(annotations),
                ..Default::default()
            },
            status: Some(NodeStatus {
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: ready.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn done(outcome: Outcome, version: Option<&str>, reason: &str) -> Verdict {
        Verdict::Done(NodeOutcome {
            node: "n".into(),
            outcome,
            version: version.map(str::to_owned),
            reason: reason.into(),
        })
    }

    #[test]
    fn a_nodes_verdict_follows_its_report_for_this_image_its_version_and_ready() {
        let waiting = |s: &str| Verdict::Waiting(s.to_owned());
        let cases = [
            (
                "no report yet",
                node("n", None, "0.1.0", "True"),
                waiting("waiting for the node to take up the image"),
            ),
            (
                "a report for another image is the last rollout's",
                node("n", Some(report(OTHER, Phase::Failed, None, "unsigned")), "0.1.0", "True"),
                waiting("waiting for the node to take up the image"),
            ),
            (
                "an unreadable report is no report",
                node("n", Some("{not json".into()), "0.1.0", "True"),
                waiting("waiting for the node to take up the image"),
            ),
            (
                "started",
                node("n", Some(report(IMAGE, Phase::Started, None, "upgrading from 0.1.0")), "0.1.0", "True"),
                waiting("started: upgrading from 0.1.0"),
            ),
            (
                "refused",
                node("n", Some(report(IMAGE, Phase::Failed, None, "unsigned")), "0.1.0", "True"),
                done(Outcome::Failed, None, "unsigned"),
            ),
            (
                "rolled back",
                node("n", Some(report(IMAGE, Phase::RolledBack, Some("0.2.0"), "exited")), "0.1.0", "True"),
                done(Outcome::RolledBack, Some("0.2.0"), "exited"),
            ),
            (
                "committed but the old version is still what the node says runs",
                node("n", Some(report(IMAGE, Phase::Succeeded, Some("0.2.0"), "")), "0.1.0", "True"),
                waiting("committed 0.2.0; waiting for it to report its version"),
            ),
            (
                "committed, reporting, but not Ready",
                node("n", Some(report(IMAGE, Phase::Succeeded, Some("0.2.0"), "")), "0.2.0", "False"),
                waiting("committed 0.2.0; waiting for the node to be Ready"),
            ),
            (
                "committed, reporting and Ready",
                node(
                    "n",
                    Some(report(IMAGE, Phase::Succeeded, Some("0.2.0"), "gate passed")),
                    "0.2.0",
                    "True",
                ),
                done(Outcome::Succeeded, Some("0.2.0"), ""),
            ),
        ];
        for (what, n, want) in cases {
            assert_eq!(verdict(&n, IMAGE, None), want, "{what}");
        }
        // A retry: the node still carries its refusal of an earlier try when it is annotated again.
        let before = report(IMAGE, Phase::Failed, None, "registry unreachable");
        let retried = node("n", Some(before.clone()), "0.1.0", "True");
        assert_eq!(
            verdict(&retried, IMAGE, Some(&before)),
            waiting("waiting for the node to take up the image"),
            "the old outcome is no answer"
        );
        let answered =
            node("n", Some(report(IMAGE, Phase::Started, None, "upgrading from 0.1.0")), "0.1.0", "True");
        assert_eq!(verdict(&answered, IMAGE, Some(&before)), waiting("started: upgrading from 0.1.0"));
        let mut no_status =
            node("n", Some(report(IMAGE, Phase::Succeeded, Some("0.2.0"), "")), "0.2.0", "True");
        no_status.status = None;
        assert!(matches!(verdict(&no_status, IMAGE, None), Verdict::Waiting(_)), "no status is not Ready");
    }

    #[test]
    fn nodes_done_are_skipped_and_the_rest_go_in_waves_by_name() {
        let fresh = |name: &str| node(name, None, "0.1.0", "True");
        let upgraded = |name: &str| {
            node(name, Some(report(IMAGE, Phase::Succeeded, Some("0.2.0"), "")), "0.2.0", "True")
        };
        let failed =
            |name: &str| node(name, Some(report(IMAGE, Phase::Failed, None, "unsigned")), "0.1.0", "True");
        let names = |w: &[&str]| w.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let nodes = [fresh("e"), upgraded("b"), fresh("a"), failed("d"), fresh("c")];
        let cases: [(usize, Vec<Vec<String>>); 4] = [
            (1, vec![names(&["a"]), names(&["c"]), names(&["d"]), names(&["e"])]),
            (2, vec![names(&["a", "c"]), names(&["d", "e"])]),
            (4, vec![names(&["a", "c", "d", "e"])]),
            (0, vec![names(&["a"]), names(&["c"]), names(&["d"]), names(&["e"])]),
        ];
        for (n, waves) in cases {
            let p = plan(&nodes, IMAGE, n);
            assert_eq!(p.waves, waves, "max unavailable {n}");
            assert_eq!(p.skipped.len(), 1);
            assert_eq!(
                (p.skipped[0].node.as_str(), p.skipped[0].outcome, p.skipped[0].version.as_deref()),
                ("b", Outcome::Skipped, Some("0.2.0"))
            );
        }
        let p = plan(&[upgraded("x")], IMAGE, 2);
        assert!(p.waves.is_empty(), "nothing to do");
        let p = plan(&[upgraded("x")], OTHER, 2);
        assert_eq!(p.waves, vec![names(&["x"])], "done for another image is not done for this one");
    }

    #[test]
    fn the_table_aligns_its_columns_and_says_which_outcomes_fail_the_command() {
        let row = |node: &str, outcome, version: Option<&str>, reason: &str| NodeOutcome {
            node: node.into(),
            outcome,
            version: version.map(str::to_owned),
            reason: reason.into(),
        };
        let rows = [
            row("fleet-a", Outcome::Succeeded, Some("0.2.0"), ""),
            row("fleet-bb", Outcome::Failed, None, "unsigned"),
            row("c", Outcome::NotStarted, None, "not annotated"),
        ];
        assert_eq!(
            render(&rows),
            "NODE       OUTCOME      VERSION   REASON\n\
             fleet-a    Succeeded    0.2.0\n\
             fleet-bb   Failed       -         unsigned\n\
             c          NotStarted   -         not annotated\n"
        );
        let ok: Vec<Outcome> = [
            Outcome::Succeeded,
            Outcome::Failed,
            Outcome::RolledBack,
            Outcome::TimedOut,
            Outcome::Skipped,
            Outcome::NotStarted,
        ]
        .into_iter()
        .filter(|o| o.is_success())
        .collect();
        assert_eq!(ok, [Outcome::Succeeded, Outcome::Skipped]);
        assert!(!FleetReport { outcomes: rows.to_vec() }.succeeded());
        assert!(FleetReport { outcomes: rows[..1].to_vec() }.succeeded());
    }
}
