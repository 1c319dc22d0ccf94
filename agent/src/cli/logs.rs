//! `lichen logs`: finds the pod in the agent's report (or the store's), then reads its log files
//! directly, so it works offline and whether or not the agent runs.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::CliError;
use super::args::LogsArgs;
use crate::config::AgentConfig;
use crate::control::report::PodLine;
use crate::control::{ControlRequest, ControlResponse};
use crate::logfmt::{LogError, LogOptions, stream};
use crate::pod::logs::{PodContainers, locate_in};

/// `lichen logs` from its flags: prints the log until it ends, or until Ctrl-C (or SIGTERM), which
/// ends it cleanly.
pub async fn print(config: AgentConfig, args: LogsArgs) -> Result<(), CliError> {
    let since = args.since.map(|d| {
        let now = jiff::Timestamp::now();
        jiff::SignedDuration::try_from(d)
            .ok()
            .and_then(|d| now.checked_sub(d).ok())
            .unwrap_or(jiff::Timestamp::MIN)
    });
    let cmd = LogsCommand {
        namespace: args.namespace,
        pod: args.pod,
        container: args.container,
        options: LogOptions {
            follow: args.follow,
            previous: args.previous,
            timestamps: args.timestamps,
            tail_lines: args.tail,
            since,
            limit_bytes: None,
        },
    };
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
        else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        stop.cancel();
    });
    let mut out = tokio::io::stdout();
    run_command(&config, cmd, &mut out, cancel).await
}

/// What `lichen logs` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogsCommand {
    /// `-n`; without it, `default`, or the namespace of the only pod of that name.
    pub namespace: Option<String>,
    /// The pod's name; a static pod's may leave out its `-<node_name>` suffix.
    pub pod: String,
    /// The container; may be left out when the pod has one.
    pub container: Option<String>,
    /// What to read.
    pub options: LogOptions,
}

/// How often `lichen logs -f` asks the agent whether the container still runs.
const AGENT_POLL: Duration = Duration::from_secs(1);

/// `lichen logs`: finds the pod in the running agent's report (or in the store when no agent
/// runs), then reads its log files directly and writes them to `out` until they end, the run is
/// over (with `follow`) or `cancel` fires. A closed `out` (a pipe into `head`) ends it quietly.
pub async fn run_command(
    config: &crate::config::AgentConfig,
    cmd: LogsCommand,
    out: &mut (dyn AsyncWrite + Unpin + Send),
    cancel: CancellationToken,
) -> Result<(), CliError> {
    let report = super::status::node_report(config).await?;
    let pod = choose_pod(&report.pods, cmd.namespace.as_deref(), &cmd.pod, &config.node_name)?;
    let layout = config.layout();
    let logs = locate_in(&containers_of(pod), &layout.logs(), cmd.container.as_deref())?;
    let running = Arc::new(AtomicBool::new(report.agent_running && pod.container_running(&logs.container)));
    let stop_polling = cancel.child_token();
    if cmd.options.follow && report.agent_running {
        let (running, stop) = (running.clone(), stop_polling.clone());
        let socket = layout.control_socket();
        let (key, uid, container) = (logs.pod_key.clone(), logs.uid.clone(), logs.container.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(AGENT_POLL) => {}
                    _ = stop.cancelled() => return,
                }
                let now = agent_says_running(&socket, &key, &uid, &container).await;
                running.store(now, Ordering::Relaxed);
            }
        });
    }
    let probe = {
        let running = running.clone();
        Arc::new(move || running.load(Ordering::Relaxed)) as Arc<dyn Fn() -> bool + Send + Sync>
    };
    let (tx, mut rx) = mpsc::channel(8);
    let reader = tokio::spawn(stream(logs, cmd.options, probe, tx, cancel.clone()));
    let mut write_error = None;
    while let Some(chunk) = rx.recv().await {
        if let Err(e) = write_all_flush(out, &chunk).await {
            if e.kind() != io::ErrorKind::BrokenPipe {
                write_error = Some(CliError::WriteLog(e));
            }
            break;
        }
    }
    drop(rx);
    stop_polling.cancel();
    reader.await.map_err(CliError::Task)??;
    write_error.map_or(Ok(()), Err)
}

async fn write_all_flush(out: &mut (dyn AsyncWrite + Unpin + Send), chunk: &[u8]) -> io::Result<()> {
    out.write_all(chunk).await?;
    out.flush().await
}

/// Whether the agent on `socket` reports `container` of the pod `key` (with UID `uid`) running. No
/// answer (the agent stopped) means not running.
async fn agent_says_running(socket: &Path, key: &str, uid: &str, container: &str) -> bool {
    let request = ControlRequest::Status;
    let Ok(Some(ControlResponse::Status(report))) = super::client::request(socket, &request).await else {
        return false;
    };
    report
        .pods
        .iter()
        .any(|p| p.key == key && (p.uid.is_empty() || p.uid == uid) && p.container_running(container))
}

/// The pod `lichen logs` means. With a namespace, `namespace/pod`; without, the only pod of that
/// name in any namespace, else `default/pod`. A static pod may be named without its
/// `-<node_name>` suffix when no pod has the name as given.
fn choose_pod<'a>(
    pods: &'a [PodLine],
    namespace: Option<&str>,
    name: &str,
    node_name: &str,
) -> Result<&'a PodLine, LogError> {
    let named = |n: &str| -> Vec<&'a PodLine> {
        pods.iter()
            .filter(|p| {
                p.key
                    .split_once('/')
                    .is_some_and(|(ns, pn)| pn == n && namespace.is_none_or(|want| want == ns))
            })
            .collect()
    };
    let mut candidates = named(name);
    if candidates.is_empty() {
        candidates = named(&format!("{name}-{node_name}"));
    }
    match (candidates.as_slice(), namespace) {
        ([only], _) => Ok(only),
        ([], Some(ns)) => Err(LogError::NotFound(format!(
            "pod \"{ns}/{name}\" not found on this node (lichen pods lists the pods)"
        ))),
        ([], None) => Err(LogError::NotFound(format!(
            "pod {name:?} not found on this node in any namespace (lichen pods lists the pods)"
        ))),
        (many, _) => match many.iter().find(|p| p.key.starts_with("default/")) {
            Some(p) => Ok(p),
            None => {
                let namespaces: Vec<&str> =
                    many.iter().filter_map(|p| p.key.split_once('/').map(|k| k.0)).collect();
                Err(LogError::NotFound(format!(
                    "pod {name:?} is in several namespaces ({}); choose one with -n",
                    namespaces.join(", ")
                )))
            }
        },
    }
}

/// The containers of a pod in the agent's report.
fn containers_of(p: &PodLine) -> PodContainers {
    let names =
        |init: bool| p.container_lines.iter().filter(|c| c.init == init).map(|c| c.name.clone()).collect();
    PodContainers {
        key: p.key.clone(),
        uid: p.uid.clone(),
        containers: names(false),
        init_containers: names(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_finds_pods_by_name_and_namespace() {
        let line = |key: &str| PodLine { key: key.into(), ..Default::default() };
        let pods = vec![
            line("default/web"),
            line("kube-system/web"),
            line("edge/sensor-pi-07"),
            line("a/x"),
            line("b/x"),
        ];
        let key = |ns, name| choose_pod(&pods, ns, name, "pi-07").map(|p| p.key.clone());
        assert_eq!(key(None, "web").expect("default wins"), "default/web");
        assert_eq!(key(Some("kube-system"), "web").expect("asked"), "kube-system/web");
        assert_eq!(key(None, "sensor-pi-07").expect("the only one"), "edge/sensor-pi-07");
        assert_eq!(key(None, "sensor").expect("static pod's short name"), "edge/sensor-pi-07");
        assert!(key(None, "x").expect_err("ambiguous").to_string().contains("a, b"));
        assert!(
            key(Some("default"), "sensor")
                .expect_err("wrong namespace")
                .to_string()
                .contains("default/sensor")
        );
        assert_eq!(key(None, "nope").expect_err("unknown").http_status(), 404);
    }
}
