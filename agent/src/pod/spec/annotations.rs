//! The pod annotations that change how its containers run: the `lichen.dev/*` run limits (fuel,
//! wall-clock timeout) and, through the telemetry bridge's grammar, the MQTT wiring.
//!
//! Reads annotations only; a malformed one is refused with its key as the field. The MQTT
//! annotations' grammar is the bridge's, not repeated here.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{Errors, RunLimits};
use crate::config::RuntimeConfig;

/// Annotation overriding the fuel budget of every container run in the pod (`0` = unlimited).
pub const FUEL_ANNOTATION: &str = "lichen.dev/fuel";
/// Annotation overriding the wall-clock limit of every container run, in seconds (`0` = none).
pub const TIMEOUT_ANNOTATION: &str = "lichen.dev/run-timeout-seconds";

/// The fuel and timeout every container of the pod runs with: the annotations' values, or the
/// node's defaults where they are absent (`0` meaning none in both).
pub(super) fn run_limits(
    annotations: &BTreeMap<String, String>,
    runtime: &RuntimeConfig,
    errs: &mut Errors,
) -> RunLimits {
    let fuel = match annotations.get(FUEL_ANNOTATION) {
        None => nonzero(runtime.default_fuel),
        Some(v) => match v.trim().parse::<u64>() {
            Ok(n) => nonzero(n),
            Err(_) => {
                errs.add(
                    &format!("metadata.annotations[{FUEL_ANNOTATION}]"),
                    format!("{v:?} is not a whole number of fuel units (\"0\" means unlimited)"),
                );
                None
            }
        },
    };
    let timeout = match annotations.get(TIMEOUT_ANNOTATION) {
        None => nonzero(runtime.run_timeout_secs).map(Duration::from_secs),
        Some(v) => match v.trim().parse::<u64>() {
            Ok(n) => nonzero(n).map(Duration::from_secs),
            Err(_) => {
                errs.add(
                    &format!("metadata.annotations[{TIMEOUT_ANNOTATION}]"),
                    format!("{v:?} is not a whole number of seconds (\"0\" means none)"),
                );
                None
            }
        },
    };
    RunLimits { fuel, timeout }
}

/// What the annotations ask of MQTT, or `None` (with every refusal recorded) when they are wrong.
pub(super) fn mqtt(
    annotations: &BTreeMap<String, String>,
    errs: &mut Errors,
) -> Option<crate::telemetry::bridge::PodMqtt> {
    match crate::telemetry::bridge::parse_annotations(annotations) {
        Ok(m) => m,
        Err(bad) => {
            for (field, message) in bad {
                errs.add(&field, message);
            }
            None
        }
    }
}

fn nonzero(n: u64) -> Option<u64> {
    (n != 0).then_some(n)
}
