//! The running agent's side of a switch: at start, what runs ([`AgentSwitch::start`], which may
//! `exec` another version and not return); while running on trial, the health gate
//! ([`HealthGate`], pure) and its verdict (commit, or roll back); and the handover: once the agent
//! has stopped its pods and flushed its store, `main` `exec`s the launcher, which reads the record
//! and starts what it names (the new agent on trial, or after a rollback the version before). Every
//! switch goes through the launcher, so a kill at any step leaves a record the next start acts on.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::slots::{self, Identity, Launch, Slot, Slots, SwitchRecord, Trial};
use super::{Phase, UpgradeReport};
use crate::layout::StateLayout;

/// The health gate of an agent on trial: it passes once the pods have resumed and, if the agent
/// before it had reached the API server, once this one has too; it fails when the time is up.
#[derive(Debug, Clone)]
pub struct HealthGate {
    deadline: Instant,
    need_contact: bool,
}

/// The gate's verdict on one look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateVerdict {
    /// Not yet.
    Waiting,
    /// Passed: commit.
    Passed,
    /// Failed, with what was missing.
    Failed(String),
}

impl HealthGate {
    /// A gate starting now with `timeout`.
    pub fn new(timeout: Duration, need_contact: bool) -> Self {
        HealthGate { deadline: Instant::now() + timeout, need_contact }
    }

    /// The verdict at `now`: `pods_resumed` when every pod has begun its run again, `contact`
    /// when this agent has exchanged with the API server.
    pub fn look(&self, now: Instant, pods_resumed: bool, contact: bool) -> GateVerdict {
        if pods_resumed && (contact || !self.need_contact) {
            return GateVerdict::Passed;
        }
        if now < self.deadline {
            return GateVerdict::Waiting;
        }
        let mut missing = Vec::new();
        if !pods_resumed {
            missing.push("the pods had not all resumed");
        }
        if self.need_contact && !contact {
            missing.push("it had not reached the API server (the agent before it had)");
        }
        GateVerdict::Failed(format!("health gate timed out: {}", missing.join(" and ")))
    }

    /// When the gate gives up.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }
}

/// The switch as the running agent sees it.
#[derive(Debug)]
pub struct AgentSwitch {
    slots: Slots,
    /// The digest of the slot this process was `exec`ed as; `None` for the packaged binary.
    slot: Option<String>,
    /// The packaged binary, for the way back; `None` if it cannot be known.
    launcher: Option<PathBuf>,
    trial: Mutex<Option<Trial>>,
    handover: std::sync::atomic::AtomicBool,
    /// Woken when an outcome awaits reporting (the health gate committed, or a report failed to
    /// go out), so it reaches the Node at once, retried until it does.
    decided: tokio::sync::Notify,
}

fn now() -> String {
    jiff::Timestamp::now().to_string()
}

impl AgentSwitch {
    /// Decides what runs at start. If that is another version, `exec`s it and does not return;
    /// otherwise returns this agent's switch (on trial or not). Every failure here is logged and
    /// ends in running this binary: a board must come up with some working agent.
    pub fn start(layout: &StateLayout) -> Arc<AgentSwitch> {
        let slots = Slots::new(layout);
        let me = Identity::from_env();
        let launcher = match &me {
            Identity::Launcher => std::env::current_exe().ok(),
            Identity::Slot(_) => std::env::var_os(slots::LAUNCHER_ENV).map(PathBuf::from),
        };
        let switch = |trial| {
            Arc::new(AgentSwitch {
                slots: slots.clone(),
                slot: match &me {
                    Identity::Slot(d) => Some(d.clone()),
                    Identity::Launcher => None,
                },
                launcher: launcher.clone(),
                trial: Mutex::new(trial),
                handover: false.into(),
                decided: tokio::sync::Notify::new(),
            })
        };
        let mut record = match slots.load() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "the upgrade record is unreadable; running this agent");
                return switch(None);
            }
        };
        let before = record.clone();
        let packaged = crate::version::version();
        let launch = slots::decide(&mut record, &me, &packaged, |s| slots.exists(s), &now());
        if record != before
            && let Err(e) = slots.save(&record)
        {
            tracing::error!(error = %e, "cannot record the upgrade decision; running this agent");
            return switch(None);
        }
        match launch {
            Launch::Run => switch(None),
            Launch::RunTrial(trial) => {
                tracing::info!(version = %trial.slot.version, from = %trial.from_version, "running on trial: the health gate decides");
                switch(Some(trial))
            }
            Launch::Exec(slot) => {
                let Some(launcher) = launcher.clone() else {
                    tracing::error!(
                        "cannot find this binary's own path; running it instead of {}",
                        slot.version
                    );
                    return switch(None);
                };
                tracing::info!(version = %slot.version, "starting the upgraded agent");
                let e = slots::exec_slot(&slots.binary(&slot.digest), &slot.digest, &launcher);
                tracing::error!(version = %slot.version, error = %e, "cannot start the upgraded agent; running this one");
                fail_exec(&slots, &slot, &e);
                switch(None)
            }
        }
    }

    /// The trial this agent is on, if any.
    pub fn trial(&self) -> Option<Trial> {
        self.trial.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits until an outcome awaits reporting.
    pub async fn decided(&self) {
        self.decided.notified().await;
    }

    /// Says an outcome awaits reporting (kept until someone waits, like a permit).
    pub fn outcome_pending(&self) {
        self.decided.notify_one();
    }

    /// The digest of the staged version this process runs, if it is one (else the packaged binary).
    pub fn slot(&self) -> Option<&str> {
        self.slot.as_deref()
    }

    /// The slots on disk.
    pub fn slots(&self) -> &Slots {
        &self.slots
    }

    /// Commits the trial: from now on the launcher starts this version. Blocking file I/O.
    pub fn commit(&self) -> Result<(), slots::SlotError> {
        let Some(trial) = self.trial() else { return Ok(()) };
        let mut record = self.slots.load()?;
        let previous = record.committed.replace(trial.slot.clone());
        record.trial = None;
        record.refused = None;
        record.report = Some(UpgradeReport {
            image: trial.slot.image.clone(),
            phase: Phase::Succeeded,
            version: Some(trial.slot.version.clone()),
            reason: format!("{} replaced {}", trial.slot.version, trial.from_version),
            at: now(),
        });
        record.report_pending = true;
        self.slots.save(&record)?;
        *self.trial.lock().unwrap_or_else(|p| p.into_inner()) = None;
        // A stored permit: the upgrader may be busy when the commit lands.
        self.outcome_pending();
        let mut keep = vec![trial.slot.digest.as_str()];
        if let Some(p) = &previous {
            keep.push(p.digest.as_str());
        }
        self.slots.prune(&keep);
        Ok(())
    }

    /// Fails the trial with `reason`: records the rollback and asks for a handover to the launcher.
    /// Blocking file I/O. Returns whether a handover was set (else this agent runs on).
    pub fn fail_trial(&self, reason: &str) -> bool {
        let Some(trial) = self.trial() else { return false };
        let result = self.slots.load().and_then(|mut record| {
            record.trial = None;
            record.refused = Some(trial.slot.image.clone());
            record.report = Some(UpgradeReport {
                image: trial.slot.image.clone(),
                phase: Phase::RolledBack,
                version: Some(trial.slot.version.clone()),
                reason: format!("{reason}; {} runs again", trial.from_version),
                at: now(),
            });
            record.report_pending = true;
            self.slots.save(&record)
        });
        if let Err(e) = result {
            tracing::error!(error = %e, "cannot record the rollback");
        }
        self.request_handover()
    }

    /// Asks for a handover to the launcher once the agent has stopped; false (and nothing asked)
    /// if the launcher's path is unknown.
    pub fn request_handover(&self) -> bool {
        if self.launcher.is_none() {
            tracing::error!("the launcher's path is unknown: no handover; this agent runs on");
            return false;
        }
        self.handover.store(true, std::sync::atomic::Ordering::SeqCst);
        true
    }

    /// Whether a handover was asked for.
    pub fn handover_requested(&self) -> bool {
        self.handover.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// `exec`s the launcher: returns only if that failed. Call after the agent has stopped.
    pub fn hand_over(&self) -> std::io::Error {
        match &self.launcher {
            Some(l) => slots::exec_launcher(l),
            None => std::io::Error::other("the launcher's path is unknown"),
        }
    }
}

/// An `exec` of `slot` failed: the record must not send the next start there again.
fn fail_exec(slots: &Slots, slot: &Slot, e: &std::io::Error) {
    let result = slots.load().and_then(|mut r: SwitchRecord| {
        if r.committed.as_ref() == Some(slot) {
            r.committed = None;
        }
        if r.trial.as_ref().is_some_and(|t| &t.slot == slot) {
            r.trial = None;
            r.refused = Some(slot.image.clone());
        }
        r.report = Some(UpgradeReport {
            image: slot.image.clone(),
            phase: Phase::RolledBack,
            version: Some(slot.version.clone()),
            reason: format!("cannot start {}: {e}", slot.version),
            at: now(),
        });
        r.report_pending = true;
        slots.save(&r)
    });
    if let Err(e) = result {
        tracing::error!(error = %e, "cannot record the failed start");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_passes_on_resumed_pods_and_contact_and_fails_saying_what_was_missing() {
        let t0 = Instant::now();
        let gate = HealthGate::new(Duration::from_secs(60), true);
        assert_eq!(gate.look(t0, true, false), GateVerdict::Waiting);
        assert_eq!(gate.look(t0, true, true), GateVerdict::Passed);
        let late = gate.deadline() + Duration::from_secs(1);
        let GateVerdict::Failed(why) = gate.look(late, true, false) else { panic!("fails when late") };
        assert!(why.contains("API server") && !why.contains("pods"), "{why}");
        let GateVerdict::Failed(why) = gate.look(late, false, true) else { panic!("fails when late") };
        assert!(why.contains("pods"), "{why}");
        // Offline before the switch: contact is not asked for.
        assert_eq!(
            HealthGate::new(Duration::from_secs(60), false).look(t0, true, false),
            GateVerdict::Passed
        );
    }
}
