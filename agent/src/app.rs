//! Wires the agent together: opens the store, creates the runtime, feeds the static pod source into
//! the pod manager, and shuts everything down in order when the root cancellation token fires.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::board::StatusBoard;
use crate::cluster::{self, ApiContact, pods::TerminatingSet};
use crate::config::AgentConfig;
use crate::modules::ModuleCache;
use crate::node::NodeRegistrar;
use crate::notify::Notifier;
use crate::pod::events::EventRecorder;
use crate::pod::manager::{DesiredPod, ManagerConfig, PodManager};
use crate::pod::state::Backoff;
use crate::pod::worker::WorkerDeps;
use crate::runtime::{RuntimeError, WasmRuntime};
use crate::static_pods::StaticPodSource;
use crate::store::{SledStore, SourceKind, StateStore, StoreError};
use crate::upgrade::switch::{AgentSwitch, GateVerdict, HealthGate};

/// Why the agent could not start or stopped in error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The state store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The Wasm engine could not be created.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The module settings cannot be used (an unreadable CA file).
    #[error("modules: {0}")]
    Modules(#[source] crate::modules::FetcherError),
    /// The MQTT spool could not be opened.
    #[error("mqtt: {0}")]
    Mqtt(#[source] crate::telemetry::spool::SpoolError),
    /// A task the agent depends on failed.
    #[error("internal task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
}

/// How long the agent waits for a store another process holds: a `lichen status` or `lichen
/// modules` run while the agent was stopped holds it for a moment, and must not make the agent's
/// start fail.
const STORE_LOCK_WAIT: Duration = Duration::from_secs(15);

async fn open_store_waiting(
    path: &std::path::Path,
    cancel: &CancellationToken,
) -> Result<Arc<SledStore>, StoreError> {
    let deadline = Instant::now() + STORE_LOCK_WAIT;
    let mut said = false;
    loop {
        match crate::store::open_off_reactor(path.to_owned()).await {
            Err(StoreError::Locked { .. }) if Instant::now() < deadline && !cancel.is_cancelled() => {
                if !said {
                    tracing::info!(store = %path.display(), "the store is held by another process (a lichen command?); waiting for it");
                    said = true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

/// Runs the agent until `cancel` fires, then stops pods and flushes the store. `switch` is this
/// agent's place in an upgrade: on trial, the main loop holds its health gate, and a handover asked
/// for there is left in `switch` for the caller to perform once this returns.
pub async fn run(
    config: AgentConfig,
    cancel: CancellationToken,
    switch: Arc<AgentSwitch>,
) -> Result<(), AppError> {
    let layout = config.layout();
    let store = open_store_waiting(&layout.store(), &cancel).await?;
    tracing::info!(store = %layout.store().display(), schema = store.schema_version(), "state store open");
    let started = Instant::now();
    let runtime = WasmRuntime::new()?;
    let tracker = TaskTracker::new();
    let modules = ModuleCache::new(store.clone(), runtime.clone(), &config.modules, &tracker, &cancel)
        .map_err(AppError::Modules)?;
    let board = Arc::new(StatusBoard::default());
    let mqtt = crate::telemetry::start(&config, store.clone(), board.clone(), &tracker, &cancel)
        .map_err(AppError::Mqtt)?;
    let (events, events_rx) = match config.cluster() {
        Some(_) => {
            let (recorder, rx) = EventRecorder::new();
            (recorder, Some(rx))
        }
        None => (EventRecorder::disabled(), None),
    };
    let deps_runtime = runtime.clone();
    let deps = Arc::new(WorkerDeps {
        runtime,
        modules: modules.clone(),
        store: store.clone(),
        logs_dir: layout.logs(),
        log_config: config.container_logs.clone(),
        host_ip: node_ip(&config).map(|ip| ip.to_string()),
        backoff: Backoff::default(),
        board: board.clone(),
        events,
        mqtt: mqtt.clone(),
    });
    let pods_cancel = cancel.child_token();
    let mut manager = PodManager::new(
        ManagerConfig {
            node_name: config.node_name.clone(),
            pods_dir: layout.pods(),
            state_dir: config.state_dir.clone(),
            max_pods: config.max_pods,
            runtime: config.runtime.clone(),
            modules: config.modules.clone(),
            stop_grace: Duration::from_secs(config.shutdown_timeout_secs),
        },
        deps,
        tracker.clone(),
        pods_cancel.clone(),
    );

    tracker.spawn(modules.clone().collect_garbage_periodically(cancel.child_token()));
    let contact = Arc::new(ApiContact::new(config.cluster().is_some(), Some(layout.offline_seconds())));
    let socket = layout.control_socket();
    let control = Arc::new(crate::control::Control {
        modules,
        store: store.clone(),
        board: board.clone(),
        contact: contact.clone(),
        node_name: config.node_name.clone(),
        mqtt: mqtt.clone(),
    });
    if let Some(address) = config.metrics.socket_addr() {
        let sources = crate::metrics_server::Sources {
            board: board.clone(),
            store: store.clone(),
            runtime: deps_runtime.clone(),
            contact: contact.clone(),
            mqtt: mqtt.clone(),
            started,
        };
        match crate::metrics_server::bind(address).await {
            Ok(listener) => {
                tracing::info!(%address, "serving /healthz and /metrics");
                tracker.spawn(crate::metrics_server::serve(listener, sources, cancel.child_token()));
            }
            // Pods matter more than their metrics: the agent runs on without the endpoint.
            Err(e) => tracing::error!(error = %e, "metrics endpoint unavailable"),
        }
    }
    // Without the socket the agent still runs pods; only `lichen status` and `lichen modules` lose
    // their way in.
    match crate::control::server::bind(&socket).await {
        Ok(listener) => {
            tracker.spawn(crate::control::server::run(listener, control, cancel.child_token()));
        }
        Err(e) => tracing::warn!(error = %e, "control socket unavailable"),
    }

    let (static_tx, mut static_rx) = watch::channel(Vec::<DesiredPod>::new());
    // Cluster pods the store remembers run again before any API contact, so a reboot while the
    // link is down does not stop a board's workloads; the first complete list then reconciles.
    let remembered =
        if config.cluster().is_some() { remembered_api_pods(store.as_ref()) } else { Vec::new() };
    // The store is the status outbox: every recorded status of a cluster pod is offered to the API
    // server again after a restart (pods that run publish newer ones at once; finished ones would
    // otherwise never be reported if the agent stopped before it could).
    if config.cluster().is_some() {
        seed_board(store.as_ref(), &board);
    }
    if !remembered.is_empty() {
        tracing::info!(pods = remembered.len(), "resuming cluster pods from the store");
    }
    let (api_tx, mut api_rx) = watch::channel(remembered);
    let (client_tx, client_rx) = watch::channel(None::<cluster::ClusterClient>);
    let terminating = TerminatingSet::default();
    if config.cluster().is_some() && config.kubelet_api.port != 0 {
        let api = crate::kubelet::KubeletApi {
            node_name: config.node_name.clone(),
            store: store.clone(),
            logs_dir: layout.logs(),
            board: board.clone(),
            client: client_rx.clone(),
        };
        // A kubelet API that cannot start costs `kubectl logs` on this node, not the node.
        match crate::kubelet::bind(&config).await {
            Ok(listener) => {
                tracker.spawn(crate::kubelet::run(listener, api, cancel.child_token()));
            }
            Err(e) => {
                tracing::error!(error = %e, "kubelet API unavailable (kubectl logs will not reach this node)")
            }
        }
    }
    match config.static_pods() {
        Some(dir) => {
            tracing::info!(dir = %dir.display(), "watching static pod manifests");
            let source = StaticPodSource::new(dir.to_owned(), config.node_name.clone());
            tracker.spawn(source.run(static_tx, cancel.child_token()));
        }
        None => {
            tracing::info!("static pods are off (static_pod_dir is empty)");
            drop(static_tx);
        }
    }
    match config.cluster() {
        Some(_) => {
            let (registrar, node) = (NodeRegistrar::new(&config), config.node_name.clone());
            let evicted_grace = Duration::from_secs(config.autonomy.evicted_grace_secs);
            let (cancel, tracker2, terminating, board, contact, switch) = (
                cancel.clone(),
                tracker.clone(),
                terminating.clone(),
                board.clone(),
                contact.clone(),
                switch.clone(),
            );
            let config = config.clone();
            tracker.spawn(async move {
                // With `[join]`, this joins first if the node has no usable credentials yet.
                let Some(credentials) = crate::bootstrap::credentials(&config, &cancel).await else { return };
                let kubeconfig = credentials.path().to_owned();
                tracing::info!(kubeconfig = %kubeconfig.display(), "joining the cluster");
                let Some(client) = cluster::connect_with_retry(&kubeconfig, &cancel).await else { return };
                let (client, rotate) = cluster::ClusterClient::new(client);
                if let crate::bootstrap::Credentials::Managed(_) = credentials {
                    let rotation = crate::bootstrap::rotation::CertificateRotation::new(&config);
                    tracker2.spawn(rotation.run(rotate, cancel.child_token()));
                }
                tracker2.spawn(registrar.run(client.clone(), contact.clone(), cancel.child_token()));
                // The upgrader's shutdown is the root token: a handover stops the whole agent.
                let upgrader = crate::upgrade::upgrader::Upgrader::new(
                    node.clone(),
                    config.upgrade.clone(),
                    config.modules.clone(),
                    switch.clone(),
                    contact.clone(),
                    cancel.clone(),
                );
                tracker2.spawn(upgrader.run(client.clone(), cancel.child_token()));
                let source = cluster::pods::ApiPodSource::new(client.clone(), node.clone(), terminating)
                    .with_evicted_grace(evicted_grace)
                    .with_contact(contact.clone());
                tracker2.spawn(source.run(api_tx, cancel.child_token()));
                tracker2.spawn(cluster::status::run(client.clone(), board, contact, cancel.child_token()));
                if let Some(rx) = events_rx {
                    tracker2.spawn(cluster::events::run(
                        client.clone(),
                        node.clone(),
                        rx,
                        cancel.child_token(),
                    ));
                }
                let _ = client_tx.send(Some(client));
            });
        }
        None => {
            tracing::info!("standalone: no kubeconfig, static pods only");
            drop(api_tx);
        }
    }
    if config.static_pods().is_some() {
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = static_rx.changed() => {}
        }
    }
    tracing::info!(node = %config.node_name, version = %crate::version::version(), "lichen running");
    let notifier = Notifier::from_env();
    let watchdog = notifier.watchdog_interval();
    if let Some(every) = watchdog {
        tracing::info!(
            every_ms = every.as_millis() as u64,
            "feeding the systemd watchdog from the main loop"
        );
    }
    let ready_by = Instant::now() + READY_WAIT;
    let mut ready = false;
    let mut shown_status = String::new();
    let mut first = true;
    let (mut static_open, mut api_open) = (config.static_pods().is_some(), config.cluster().is_some());
    let max_offline = (config.cluster().is_some() && config.autonomy.max_offline_secs > 0)
        .then(|| Duration::from_secs(config.autonomy.max_offline_secs));
    let mut offline_expired = false;
    // Deletions are confirmed from a task of their own: a DELETE the API server holds must not
    // hold the loop. One batch may wait while another is sent; the loop offers the ready ones again
    // on every turn, so a batch refused because the queue is full is only late, never lost.
    let (deletions_tx, deletions_rx) = tokio::sync::mpsc::channel(1);
    if config.cluster().is_some() {
        tracker.spawn(cluster::pods::confirm_deletions(
            deletions_rx,
            terminating.clone(),
            cancel.child_token(),
        ));
    }
    // Created once, so their periods hold however often the loop wakes; a late tick is not made
    // up for with a burst.
    let interval = |every: Duration| {
        let mut i = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    };
    let mut offline_check = interval(OFFLINE_CHECK);
    let mut ready_poll = interval(READY_POLL);
    // Without a watchdog the branch is off; the period is then any.
    let mut watchdog_tick = interval(watchdog.unwrap_or(OFFLINE_CHECK));
    let mut persisting: Option<tokio::task::JoinHandle<()>> = None;
    // On trial, the gate is looked at every turn and at least every second; its verdict (commit,
    // or record the rollback and stop for the handover) is carried out by a task of its own.
    let mut gate = switch.trial().map(|t| {
        let timeout = Duration::from_secs(config.upgrade.health_timeout_secs);
        tracing::info!(timeout_secs = timeout.as_secs(), need_contact = t.had_contact, "health gate open");
        HealthGate::new(timeout, t.had_contact)
    });
    let mut gate_tick = interval(GATE_POLL);
    // The code pages start-up, or a burst of pod work, ran go back once that work has been over
    // for a while (heap.rs), off the loop, and at most once per RELEASE_CODE_EVERY: a page read
    // back in is a read of the binary (from the SD card, if the kernel dropped it meanwhile).
    let release_code = tokio::time::sleep(Duration::ZERO); // armed (reset) at ready
    let mut release_code = std::pin::pin!(release_code);
    let mut release_code_armed = false;
    let mut code_released: Option<tokio::time::Instant> = None;
    loop {
        // Fed here, where the loop proves it still turns: a wedged loop stops the feeding and
        // systemd restarts the agent. (systemd arms the watchdog at READY=1.) Nothing below waits
        // on I/O: pods stop, plan and write their files in tasks of the manager, and deletions are
        // confirmed from their own task.
        if ready {
            notifier.watchdog();
        }
        if let Some(limit) = max_offline {
            let expired = contact.offline_for().is_some_and(|d| d >= limit);
            if expired != offline_expired {
                if expired {
                    tracing::warn!(
                        limit_secs = limit.as_secs(),
                        "no contact with the API server for longer than autonomy.max_offline_secs; stopping cluster pods (static pods keep running)"
                    );
                } else {
                    tracing::info!("the API server is reachable again; cluster pods may run");
                }
                offline_expired = expired;
            }
        }
        let api_pods = api_rx.borrow_and_update().clone();
        let api_pods = if offline_expired { Vec::new() } else { api_pods };
        let desired: Vec<DesiredPod> =
            static_rx.borrow_and_update().iter().cloned().chain(api_pods).collect();
        manager.sync(&desired);
        if first && !cancel.is_cancelled() {
            first = false;
            let static_pods: Vec<DesiredPod> =
                desired.iter().filter(|d| d.source.kind() == SourceKind::Static).cloned().collect();
            // Queued behind the first sync's admissions, as it ran after them.
            manager.forget_absent(&static_pods, SourceKind::Static);
        }
        let client = client_rx.borrow().clone();
        if let Some(client) = client {
            let confirmable =
                cluster::pods::ready_deletions(&terminating, |key, uid| manager.is_running(key, uid));
            if !confirmable.is_empty() {
                // Full: a batch is already queued behind the one being sent; this turn's offer is
                // made again on the next.
                let _ = deletions_tx
                    .try_send(cluster::pods::Deletions { client: client.current(), ready: confirmable });
            }
        }
        let (running, preparing) = manager.started();
        let status = status_line(running, preparing, &contact);
        if !ready && (preparing == 0 || Instant::now() >= ready_by) {
            if preparing > 0 {
                tracing::warn!(
                    preparing,
                    "telling systemd the agent is ready while pods still prepare their first run"
                );
            }
            notifier.ready(&status);
            ready = true;
            release_code.as_mut().reset(tokio::time::Instant::now() + RELEASE_CODE_AFTER);
            release_code_armed = true;
        } else if ready && status != shown_status {
            notifier.status(&status);
        }
        shown_status = status;
        if manager.take_burst_ended() && ready {
            // Re-armed by each burst's end: a node churning pods keeps its code until it pauses.
            let at = tokio::time::Instant::now() + RELEASE_CODE_AFTER;
            let at = code_released.map_or(at, |last| at.max(last + RELEASE_CODE_EVERY));
            release_code.as_mut().reset(at);
            release_code_armed = true;
        }
        if let Some(g) = &gate {
            let contact_ok = contact.snapshot().last_ok.is_some();
            match g.look(Instant::now(), !first && preparing == 0, contact_ok) {
                GateVerdict::Waiting => {}
                GateVerdict::Passed => {
                    gate = None;
                    let switch = switch.clone();
                    tracker.spawn_blocking(move || match switch.commit() {
                        Ok(()) => tracing::info!("health gate passed: the upgrade is committed"),
                        Err(e) => tracing::error!(error = %e, "health gate passed, but the commit could not be recorded"),
                    });
                }
                GateVerdict::Failed(why) => {
                    gate = None;
                    tracing::error!(reason = %why, "the new agent failed its health gate; rolling back");
                    let (switch, cancel) = (switch.clone(), cancel.clone());
                    tracker.spawn_blocking(move || {
                        if switch.fail_trial(&why) {
                            cancel.cancel();
                        }
                    });
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            changed = static_rx.changed(), if static_open => static_open = changed.is_ok(),
            changed = api_rx.changed(), if api_open => api_open = changed.is_ok(),
            // A pod stopped, was admitted or had its files rewritten: sync again.
            () = manager.collect() => {}
            // Offline time is kept across restarts, and checked against the limit. The file is
            // written off the loop, one write at a time.
            _ = offline_check.tick(), if config.cluster().is_some() => {
                if persisting.as_ref().is_none_or(|p| p.is_finished()) {
                    let contact = contact.clone();
                    persisting = Some(tracker.spawn_blocking(move || contact.persist()));
                }
            }
            _ = ready_poll.tick(), if !ready => {}
            _ = watchdog_tick.tick(), if watchdog.is_some() => {}
            _ = gate_tick.tick(), if gate.is_some() => {}
            () = &mut release_code, if release_code_armed => {
                release_code_armed = false;
                code_released = Some(tokio::time::Instant::now());
                tracker.spawn_blocking(|| {
                    // The pod manager trims the heap as a burst's last admission or removal is
                    // done, but the pods' own tasks free their last buffers a little later: after
                    // five cycles of 100 pods, a trim here gave back another 1.8 MiB.
                    crate::heap::release_free_memory();
                    let pages = match crate::heap::CodePages::find() {
                        Ok(pages) => pages,
                        Err(e) => return tracing::debug!(error = %e, "cannot find the code pages"),
                    };
                    // Said before, not after: the advice is the last thing this thread does, so
                    // that the code of the log line (the formatter, the clock, the fields) is not
                    // read straight back. Logged after, it kept about 1 MiB resident on an idle
                    // node, which logs nothing else.
                    tracing::info!(mapped_kib = pages.mapped_bytes() / 1024, "releasing idle code pages");
                    if let Err(e) = pages.page_out() {
                        tracing::debug!(error = %e, "cannot release idle code pages");
                    }
                });
            }
        }
    }

    notifier.stopping("stopping pods");
    tracing::info!("shutting down: stopping pods");
    pods_cancel.cancel();
    let bound = Duration::from_secs(config.shutdown_timeout_secs);
    if tokio::time::timeout(bound, manager.shutdown()).await.is_err() {
        tracing::warn!("pods did not stop within {}s", bound.as_secs());
    }
    if let Some(bridge) = &mqtt
        && tokio::time::timeout(bound, bridge.pumps_drained()).await.is_err()
    {
        tracing::warn!("module output did not reach the MQTT spool within {}s", bound.as_secs());
    }
    drop(deletions_tx);
    tracker.close();
    if tokio::time::timeout(bound, tracker.wait()).await.is_err() {
        tracing::warn!("background tasks did not finish within {}s", bound.as_secs());
    }
    let s = store.clone();
    tokio::task::spawn_blocking(move || s.flush()).await.map_err(AppError::Task)??;
    tracing::info!("stopped");
    Ok(())
}

/// How often the offline time is recorded and checked against `autonomy.max_offline_secs`.
const OFFLINE_CHECK: Duration = Duration::from_secs(5);

/// The longest startup waits for pods to begin their first run before telling systemd it is
/// ready: a module stuck behind an unreachable registry must not hold the whole service in
/// "activating" until systemd gives up and restarts it.
const READY_WAIT: Duration = Duration::from_secs(60);
/// From ready, or from the end of a burst of pod work, to giving back the code pages it ran: the
/// first heartbeat, node status and pod watch are done by then on a working link, and new pods
/// have run their first instructions.
const RELEASE_CODE_AFTER: Duration = Duration::from_secs(10);
/// The least time between two such releases: each costs reading back what the node runs next.
const RELEASE_CODE_EVERY: Duration = Duration::from_secs(60);

/// How often an agent on trial looks at its health gate, at least.
const GATE_POLL: Duration = Duration::from_secs(1);

/// How often startup checks whether every pod has begun its first run.
const READY_POLL: Duration = Duration::from_millis(200);

/// What `systemctl status lichen` shows.
fn status_line(running: usize, preparing: usize, contact: &ApiContact) -> String {
    let mut s = format!("{running} pod(s)");
    if preparing > 0 {
        s.push_str(&format!(", {preparing} preparing"));
    }
    if let Some(away) = contact.offline_for() {
        s.push_str(&format!("; API server unreachable for {}s", away.as_secs()));
    }
    s
}

/// Offers every cluster pod's recorded status to the status writer.
fn seed_board(store: &dyn StateStore, board: &StatusBoard) {
    let Ok(records) = store.list_pods() else { return };
    for r in records.into_iter().filter(|r| r.source.is_api()) {
        if let Some(status) = r.status.and_then(|s| serde_json::from_value(s).ok()) {
            board.set(&r.key, &r.uid, &r.source, status);
        }
    }
}

/// The cluster pods in the store that should run: not being deleted, and with a readable spec.
fn remembered_api_pods(store: &dyn StateStore) -> Vec<DesiredPod> {
    let records = match store.list_pods() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read stored pods; cluster pods start when the API answers");
            return Vec::new();
        }
    };
    records
        .into_iter()
        .filter(|r| r.source.is_api())
        // Through the same deserializer as static pod manifests: one copy of the Pod decoder in the
        // binary instead of two (it is hundreds of KiB on a board), and the error names the field.
        .filter_map(|r| match serde_path_to_error::deserialize::<_, k8s_openapi::api::core::v1::Pod>(&r.pod) {
            Ok(mut pod) if pod.metadata.deletion_timestamp.is_none() => {
                // The stored object is as it was admitted; what Lichen saw last decides whether it
                // had finished, so a pod that succeeded is not run again after a reboot.
                let last = r.status.and_then(|s| serde_json::from_value::<k8s_openapi::api::core::v1::PodStatus>(s).ok());
                if last.as_ref().is_some_and(|s| matches!(s.phase.as_deref(), Some("Succeeded" | "Failed"))) {
                    pod.status = last;
                }
                Some(DesiredPod {
                pod,
                source: r.source,
                image_base: None,
                inputs: Some(r.inputs.unwrap_or_default()),
            })
            }
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(pod = %r.key, error = %e, "stored pod is unreadable; waiting for the API server");
                None
            }
        })
        .collect()
}

/// The node's address: configured, or that of the default-route interface.
fn node_ip(config: &AgentConfig) -> Option<std::net::IpAddr> {
    crate::host::node_ip_or_detected(config.node_ip.parse().ok())
}
