//! The blocking side of the pod manager, run on the tracker's blocking threads: planning a pod,
//! admitting it (store record, files, its worker's inputs), refreshing its files, cleaning up its
//! directories, and forgetting records no source wants any more. The manager (`super`) decides
//! what to run; this file does the work, off the main loop.

use super::*;

impl Shared {
    fn plan(&self, d: &DesiredPod) -> Result<spec::PodPlan, Vec<spec::SpecError>> {
        let ctx = PlanContext {
            node_name: &self.config.node_name,
            host_ip: self.deps.host_ip.as_deref(),
            pods_dir: &self.config.pods_dir,
            state_dir: &self.config.state_dir,
            origin: match d.image_base.as_deref() {
                Some(dir) => ImageOrigin::Static(dir),
                None => ImageOrigin::Cluster,
            },
            modules: &self.config.modules,
            runtime: &self.config.runtime,
            inputs: d.inputs.as_ref(),
        };
        spec::plan(&d.pod, &ctx)
    }

    /// Runs one batch of the lane (on a blocking thread). `running` is how many pods have a
    /// worker; each admission that starts one counts for the next.
    pub(super) fn run(&self, jobs: Vec<Job>, mut running: usize) -> Vec<Outcome> {
        let mut outcomes = Vec::with_capacity(jobs.len());
        for job in jobs {
            match job {
                Job::Admit { key, desired } => {
                    if let Some(o) = self.admit(key, &desired, running) {
                        if matches!(o, Outcome::Start(_)) {
                            running += 1;
                        }
                        outcomes.push(o);
                    }
                }
                Job::Refresh { key, desired } => outcomes.push(self.refresh_files(key, &desired)),
                Job::Forget { desired, kind, present } => self.forget_absent(&desired, kind, &present),
            }
        }
        outcomes
    }

    /// Rewrites a running pod's configMap, secret and projected volumes from new inputs, as the
    /// kubelet does; environment variables keep the values the containers started with.
    fn refresh_files(&self, key: String, d: &DesiredPod) -> Outcome {
        match self.plan(d) {
            Ok(plan) => {
                for v in &plan.volumes {
                    if let spec::VolumeKind::Files(files) = &v.kind
                        && let Err(e) = worker::write_files(&v.host, files)
                    {
                        tracing::warn!(pod = %key, volume = %v.name, error = %e, "cannot update volume");
                    }
                }
                if let Ok(Some(mut record)) = self.deps.store.get_pod(&key)
                    && record.uid == d.uid()
                {
                    record.inputs = d.inputs.clone();
                    if let Err(e) = self.deps.store.put_pod(&record) {
                        tracing::warn!(pod = %key, error = %e, "cannot record updated inputs");
                    }
                }
            }
            // A source deleted or emptied under a running pod: keep what it has, as the kubelet does.
            Err(errs) => {
                let why = errs.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
                tracing::warn!(pod = %key, "volumes not updated: {why}");
            }
        }
        Outcome::Refreshed { key, inputs: d.inputs.clone() }
    }

    /// Admits one pod: plans it, records it, and says what the loop is to do with it. `None` when
    /// it could not be recorded: it is not started, and the next sync tries again.
    fn admit(&self, key: String, d: &DesiredPod, running: usize) -> Option<Outcome> {
        let uid = d.uid().to_owned();
        let refusal = if running >= self.config.max_pods as usize {
            Some(PodFailure {
                reason: PodFailureReason::OutOfPods,
                message: format!(
                    "Node didn't have enough resource: pods, requested: 1, used: {running}, capacity: {}",
                    self.config.max_pods
                ),
            })
        } else {
            None
        };
        let mut waiting = false;
        let plan = match refusal {
            Some(f) => Err(f),
            None => self.plan(d).map_err(|errs| {
                // Only a pod whose every problem is a missing input can become runnable by itself.
                waiting = errs.iter().all(|e| e.pending);
                PodFailure {
                    reason: if waiting {
                        PodFailureReason::CreateContainerConfigError
                    } else {
                        PodFailureReason::UnsupportedPodSpec
                    },
                    message: errs.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
                }
            }),
        };
        let previous = self.deps.store.get_pod(&key).ok().flatten().filter(|r| r.uid == uid);
        let restart_counts = previous.as_ref().map(|r| r.restart_counts.clone()).unwrap_or_default();
        let previous_status = previous.and_then(|r| r.status);
        let pod_json = serde_json::to_value(&d.pod).unwrap_or_default();
        let mut record = PodRecord {
            key: key.clone(),
            uid: uid.clone(),
            source: d.source.clone(),
            pod: pod_json,
            status: previous_status.clone(),
            restart_counts: restart_counts.clone(),
            inputs: d.inputs.clone(),
        };
        match plan {
            Ok(plan) => {
                // Recorded durably before it starts, so a crash never forgets a pod it ran.
                if let Err(e) = self.deps.store.put_pod(&record) {
                    tracing::error!(pod = %key, error = %e, "cannot record pod; not starting it");
                    return None;
                }
                let resume = worker::Resume {
                    restart_counts,
                    previous: previous_status.and_then(|s| serde_json::from_value(s).ok()),
                };
                Some(Outcome::Start(Box::new(Admitted {
                    key,
                    plan,
                    source: d.source.clone(),
                    resume,
                    inputs: d.inputs.clone(),
                })))
            }
            Err(failure) if waiting => {
                tracing::warn!(pod = %key, "pod waits for its configuration: {}", failure.message);
                self.event(d, EventType::Warning, "Failed", format!("Error: {}", failure.message));
                let status = waiting_status(&d.pod, &failure, self.deps.host_ip.clone());
                record.status = serde_json::to_value(&status).ok();
                if let Err(e) = self.deps.store.put_pod(&record) {
                    tracing::error!(pod = %key, error = %e, "cannot record waiting pod");
                }
                self.deps.board.set(&key, &uid, &d.source, status);
                Some(Outcome::Waiting { key, uid, inputs: d.inputs.clone() })
            }
            Err(failure) => {
                tracing::error!(pod = %key, source = %d.source, reason = %failure.reason, "pod refused: {}", failure.message);
                let reason = match failure.reason {
                    PodFailureReason::OutOfPods => "OutOfpods",
                    _ => "UnsupportedPodSpec",
                };
                self.event(d, EventType::Warning, reason, failure.message.clone());
                let view = PodView {
                    restart_policy: RestartPolicy::Never,
                    init: vec![],
                    app: vec![],
                    failure: Some(failure),
                    start_time: None,
                    host_ip: self.deps.host_ip.clone(),
                };
                let status = status::build(&view, None, Timestamp::now());
                record.status = serde_json::to_value(&status).ok();
                if let Err(e) = self.deps.store.put_pod(&record) {
                    tracing::error!(pod = %key, error = %e, "cannot record refused pod");
                }
                self.deps.board.set(&key, &uid, &d.source, status);
                Some(Outcome::Rejected { key, uid })
            }
        }
    }

    fn event(&self, d: &DesiredPod, kind: EventType, reason: &'static str, message: String) {
        let e = PodEvent {
            key: d.key(),
            uid: d.uid().to_owned(),
            field_path: None,
            kind,
            reason,
            message,
            at: Timestamp::now(),
        };
        self.deps.events.emit(&d.source, e);
    }

    /// Deletes a pod's record, volumes and logs (on a blocking thread).
    pub(super) fn cleanup(&self, key: &str, uid: &str) {
        self.deps.board.remove(key, uid);
        if let Err(e) = self.deps.store.delete_pod(key, uid) {
            tracing::error!(pod = %key, error = %e, "cannot remove pod record");
        }
        // The pod's volumes and logs go with it, or a board's disk fills with pods long gone.
        let logs = worker::pod_log_dir(&self.deps.logs_dir, key, uid);
        let dirs =
            [(self.config.pods_dir.as_path(), self.config.pods_dir.join(uid)), (&self.deps.logs_dir, logs)];
        for (base, dir) in dirs {
            if !is_child_of(&dir, base) {
                tracing::warn!(
                    pod = %key,
                    uid = ?uid,
                    dir = %dir.display(),
                    "not removing a pod directory that is not directly under {}",
                    base.display()
                );
                continue;
            }
            if let Err(e) = std::fs::remove_dir_all(&dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(pod = %key, dir = %dir.display(), error = %e, "cannot remove pod directory");
            }
        }
    }

    /// The body of [`PodManager::forget_absent`]; `present` is every pod the manager knew of when
    /// the batch started.
    fn forget_absent(&self, desired: &[DesiredPod], kind: SourceKind, present: &[(String, String)]) {
        let records = match self.deps.store.list_pods() {
            Ok(r) => r,
            Err(e) => return tracing::warn!(error = %e, "cannot list stored pods"),
        };
        for r in records {
            let wanted = desired.iter().any(|d| d.key() == r.key && d.uid() == r.uid);
            let running = present.iter().any(|(k, u)| *k == r.key && *u == r.uid);
            if r.source.kind() == kind && !wanted && !running {
                tracing::info!(pod = %r.key, "forgetting pod whose source is gone");
                self.cleanup(&r.key, &r.uid);
            }
        }
    }
}

/// Whether `dir` is one plain component below `base`, so that removing it stays inside `base`. UIDs
/// are checked when a pod is planned, but a pod refused for its UID, or a record an older Lichen
/// stored, can still carry `..`, `a/b` or an empty UID: `<pods>/..` is the state directory and
/// `<pods>/` every pod's, so the joined path is checked again right before `remove_dir_all`.
pub(super) fn is_child_of(dir: &Path, base: &Path) -> bool {
    dir.parent() == Some(base) && matches!(dir.components().next_back(), Some(Component::Normal(_)))
}

/// A pod that waits for a ConfigMap, Secret or token: Pending, every container waiting with
/// `CreateContainerConfigError` and the reason, as `kubectl describe pod` shows it on a kubelet.
fn waiting_status(
    pod: &Pod,
    why: &PodFailure,
    host_ip: Option<String>,
) -> k8s_openapi::api::core::v1::PodStatus {
    const WAITING: crate::pod::state::WaitingReason =
        crate::pod::state::WaitingReason::CreateContainerConfigError;
    let spec = pod.spec.clone().unwrap_or_default();
    let view_of = |c: &k8s_openapi::api::core::v1::Container| {
        let mut v =
            crate::pod::state::ContainerView::new(&c.name, c.image.as_deref().unwrap_or(""), WAITING, 0);
        v.state = crate::pod::state::ContainerState::Waiting {
            reason: WAITING,
            message: Some(why.message.clone()),
        };
        v
    };
    let view = PodView {
        restart_policy: RestartPolicy::parse(spec.restart_policy.as_deref()).unwrap_or(RestartPolicy::Always),
        init: spec.init_containers.iter().flatten().map(view_of).collect(),
        app: spec.containers.iter().map(view_of).collect(),
        failure: None,
        start_time: Some(Timestamp::now()),
        host_ip,
    };
    status::build(&view, None, Timestamp::now())
}
