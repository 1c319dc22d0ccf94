//! Field validation: what the real server's validation rejects among the things a node writes
//! (names and labels, pod status transitions, events, leases) and the immutability of pods.

use serde_json::Value;

use super::errors::{ApiError, FieldError, field_error};
use super::store::{Res, is_dns_subdomain};

/// Field validation of a created or updated object: what the agent could get wrong and a real server rejects.
pub(crate) fn validate(res: &Res, name: &str, ns: &str, obj: &Value) -> Result<(), ApiError> {
    let mut errs: Vec<FieldError> = vec![];
    validate_labels(obj, &mut errs);
    match res.plural {
        "pods" => match obj.pointer("/spec/containers").and_then(Value::as_array) {
            Some(cs) if !cs.is_empty() => {
                let inits = obj.pointer("/spec/initContainers").and_then(Value::as_array);
                let all = cs
                    .iter()
                    .map(|c| ("containers", c))
                    .enumerate()
                    .chain(inits.into_iter().flatten().map(|c| ("initContainers", c)).enumerate());
                for (i, (list, c)) in all {
                    for f in ["name", "image"] {
                        if c.get(f).and_then(Value::as_str).is_none_or(str::is_empty) {
                            errs.push(field_error(
                                format!("spec.{list}[{i}].{f}"),
                                "FieldValueRequired",
                                "Required value",
                            ));
                        }
                    }
                }
            }
            _ => errs.push(field_error("spec.containers", "FieldValueRequired", "Required value")),
        },
        "events" => validate_event(ns, obj, &mut errs),
        "leases" => {
            if let Some(d) = obj.pointer("/spec/leaseDurationSeconds").and_then(Value::as_i64)
                && d <= 0
            {
                errs.push(field_error(
                    "spec.leaseDurationSeconds",
                    "FieldValueInvalid",
                    format!("Invalid value: {d}: must be greater than 0"),
                ));
            }
        }
        _ => {}
    }
    if errs.is_empty() { Ok(()) } else { Err(ApiError::invalid(res, name, &errs)) }
}

/// The core/v1 Event rules (`legacyValidateEvent`): the namespace matches the involved object's
/// (a cluster-scoped object's events live in `default`), and an event with an `eventTime` names its
/// reporting controller and instance, its action and its reason.
fn validate_event(ns: &str, obj: &Value, errs: &mut Vec<FieldError>) {
    let s = |p: &str| obj.pointer(p).and_then(Value::as_str).unwrap_or_default();
    let io_ns = s("/involvedObject/namespace");
    let mismatch = || {
        field_error(
            "involvedObject.namespace",
            "FieldValueInvalid",
            format!("Invalid value: \"{io_ns}\": does not match event.namespace"),
        )
    };
    let event_time = obj.get("eventTime").is_some_and(|t| !t.is_null());
    if !event_time {
        if (io_ns.is_empty() && ns != "default") || (!io_ns.is_empty() && io_ns != ns) {
            errs.push(mismatch());
        }
        return;
    }
    if io_ns.is_empty() && ns != "default" && ns != "kube-system" {
        errs.push(mismatch());
    }
    for (path, field) in [
        ("/reportingComponent", "reportingController"),
        ("/reportingInstance", "reportingInstance"),
        ("/action", "action"),
        ("/reason", "reason"),
    ] {
        if s(path).is_empty() {
            errs.push(field_error(field, "FieldValueRequired", "Required value"));
        }
    }
}

/// Label keys are qualified names, values at most 63 characters of `[A-Za-z0-9._-]`, alphanumeric at
/// both ends.
fn validate_labels(obj: &Value, errs: &mut Vec<FieldError>) {
    let Some(labels) = obj.pointer("/metadata/labels").and_then(Value::as_object) else { return };
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && s.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
    };
    for (k, v) in labels {
        let key_ok = match k.split_once('/') {
            Some((prefix, n)) => is_dns_subdomain(prefix) && name_ok(n),
            None => name_ok(k),
        };
        if !key_ok {
            errs.push(field_error(
                "metadata.labels",
                "FieldValueInvalid",
                format!("Invalid value: \"{k}\": name part must consist of alphanumeric characters, '-', '_' or '.', \
                         and must start and end with an alphanumeric character"),
            ));
        }
        let value = v.as_str().unwrap_or_default();
        if !v.is_string() || !(value.is_empty() || name_ok(value)) {
            errs.push(field_error(
                "metadata.labels",
                "FieldValueInvalid",
                format!("Invalid value: \"{value}\": a valid label must be an empty string or consist of alphanumeric \
                         characters, '-', '_' or '.', and must start and end with an alphanumeric character"),
            ));
        }
    }
}

/// What `ValidatePodStatusUpdate` rejects: a changed QoS class, a terminated container coming back
/// when the restart policy forbids it, bad or inconsistent host and pod IPs, custom condition types
/// that are not qualified names.
pub(crate) fn validate_pod_status(
    res: &Res,
    name: &str,
    old: &Value,
    new: &mut Value,
) -> Result<(), ApiError> {
    let mut errs: Vec<FieldError> = vec![];
    let old_qos = old.pointer("/status/qosClass").cloned().unwrap_or(Value::Null);
    match new.pointer("/status/qosClass") {
        None | Some(Value::Null) => {
            if !old_qos.is_null() && new.get("status").is_some_and(Value::is_object) {
                new["status"]["qosClass"] = old_qos;
            }
        }
        Some(q) if *q != old_qos => errs.push(field_error(
            "status.qosClass",
            "FieldValueInvalid",
            format!("Invalid value: {q}: field is immutable"),
        )),
        Some(_) => {}
    }
    let policy = old.pointer("/spec/restartPolicy").and_then(Value::as_str).unwrap_or("Always");
    if policy != "Always" {
        for list in ["containerStatuses", "initContainerStatuses"] {
            let statuses = |o: &Value| {
                o.pointer(&format!("/status/{list}")).and_then(Value::as_array).cloned().unwrap_or_default()
            };
            let (before, after) = (statuses(old), statuses(new));
            for (i, o) in before.iter().enumerate() {
                let Some(term) = o.pointer("/state/terminated") else { continue };
                if policy == "OnFailure" && term.get("exitCode").and_then(Value::as_i64).unwrap_or(0) != 0 {
                    continue;
                }
                let back = after
                    .iter()
                    .any(|n| n.get("name") == o.get("name") && n.pointer("/state/terminated").is_none());
                if back {
                    errs.push(field_error(
                        format!("status.{list}[{i}].state"),
                        "FieldValueForbidden",
                        "Forbidden: may not be transitioned to non-terminated state",
                    ));
                }
            }
        }
    }
    for (single, plural) in [("hostIP", "hostIPs"), ("podIP", "podIPs")] {
        let one = new.pointer(&format!("/status/{single}")).and_then(Value::as_str).unwrap_or_default();
        if !one.is_empty() && one.parse::<std::net::IpAddr>().is_err() {
            errs.push(field_error(
                format!("status.{single}"),
                "FieldValueInvalid",
                format!("Invalid value: \"{one}\": must be a valid IP address"),
            ));
        }
        let many =
            new.pointer(&format!("/status/{plural}")).and_then(Value::as_array).cloned().unwrap_or_default();
        for (i, ip) in many.iter().enumerate() {
            let ip = ip.get("ip").and_then(Value::as_str).unwrap_or_default();
            if ip.parse::<std::net::IpAddr>().is_err() {
                errs.push(field_error(
                    format!("status.{plural}[{i}].ip"),
                    "FieldValueInvalid",
                    format!("Invalid value: \"{ip}\": must be a valid IP address"),
                ));
            } else if i == 0 && ip != one {
                errs.push(field_error(
                    format!("status.{plural}[0].ip"),
                    "FieldValueInvalid",
                    format!("Invalid value: \"{ip}\": must be equal to {single}"),
                ));
            }
        }
    }
    for (i, c) in
        new.pointer("/status/conditions").and_then(Value::as_array).into_iter().flatten().enumerate()
    {
        let t = c.get("type").and_then(Value::as_str).unwrap_or_default();
        let system = matches!(t, "PodScheduled" | "Ready" | "Initialized");
        let qualified =
            match t.split_once('/') {
                Some((p, n)) => is_dns_subdomain(p) && !n.is_empty(),
                None => !t.is_empty(),
            } && t.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'));
        if !system && !qualified {
            errs.push(field_error(
                format!("status.conditions[{i}].Type"),
                "FieldValueInvalid",
                format!("Invalid value: \"{t}\": name part must consist of alphanumeric characters, '-', '_' or '.'"),
            ));
        }
    }
    if errs.is_empty() { Ok(()) } else { Err(ApiError::invalid(res, name, &errs)) }
}

/// Pods are immutable but for a few fields; the real message lists them.
pub(crate) fn check_pod_spec_update(res: &Res, name: &str, old: &Value, new: &Value) -> Result<(), ApiError> {
    let strip = |pod: &Value| {
        let mut spec = pod.get("spec").cloned().unwrap_or(Value::Null);
        for list in ["containers", "initContainers"] {
            if let Some(cs) = spec.get_mut(list).and_then(Value::as_array_mut) {
                for c in cs {
                    if let Some(o) = c.as_object_mut() {
                        o.remove("image");
                    }
                }
            }
        }
        if let Some(o) = spec.as_object_mut() {
            for f in ["activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds"] {
                o.remove(f);
            }
        }
        spec
    };
    if strip(old) == strip(new) {
        return Ok(());
    }
    Err(ApiError::invalid(
        res,
        name,
        &[field_error(
            "spec",
            "FieldValueForbidden",
            "Forbidden: pod updates may not change fields other than `spec.containers[*].image`, \
             `spec.initContainers[*].image`, `spec.activeDeadlineSeconds`, `spec.tolerations` (only additions \
             to existing tolerations) or `spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was \
             previously negative)",
        )],
    ))
}
