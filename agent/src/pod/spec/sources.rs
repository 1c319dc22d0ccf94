//! References to ConfigMaps and Secrets, resolved against what was fetched from the API server
//! ([`PodInputs`]): for volumes, `envFrom`, `valueFrom` and `imagePullSecrets`.
//!
//! Decides whether a missing object holds the pod (it waits, `pending`), is skipped (an optional
//! source) or is refused (a static pod, which has no cluster). Never fetches: the inputs were
//! gathered before planning, and a pod that waits is planned again when they change.

use k8s_openapi::api::core::v1::PodSpec;

use super::Errors;
use crate::modules::PullCredentials;
use crate::pod::inputs::{ObjectData, ObjectKind, PodInputs};

/// One reference to a ConfigMap or Secret, as a volume, `envFrom` or `valueFrom` writes it.
pub(super) struct ObjectSource<'a> {
    /// Which kind of object.
    pub(super) kind: ObjectKind,
    /// Its name in the pod's namespace.
    pub(super) name: &'a str,
    /// `optional: true`: a missing object (or key) is skipped rather than waited for.
    pub(super) optional: Option<bool>,
}

/// The data of a ConfigMap or Secret: `Some(Some)` found, `Some(None)` optional and absent,
/// `None` an error was recorded.
pub(super) fn lookup<'a>(
    inputs: Option<&'a PodInputs>,
    src: &ObjectSource<'_>,
    path: &str,
    errs: &mut Errors,
) -> Option<Option<&'a ObjectData>> {
    let kind = src.kind.as_str();
    if src.name.is_empty() {
        errs.add(&format!("{path}.name"), "is required");
        return None;
    }
    let Some(inputs) = inputs else {
        errs.add(
            path,
            format!("{kind}s need a cluster connection; static pods must use literal values or hostPath"),
        );
        return None;
    };
    match inputs.object(src.kind, src.name) {
        Ok(Some(d)) => Some(Some(d)),
        Ok(None) if src.optional == Some(true) => Some(None),
        Ok(None) => {
            errs.pending(path, format!("{} {:?} not found", kind.to_lowercase(), src.name));
            None
        }
        Err(why) => {
            errs.pending(path, why);
            None
        }
    }
}

/// Credentials from `imagePullSecrets`. As with the kubelet, a missing or malformed pull secret
/// does not hold the pod: the pull goes ahead without it (and fails if the registry insists).
pub(super) fn pull_credentials(
    spec: &PodSpec,
    inputs: Option<&PodInputs>,
    warnings: &mut Vec<String>,
) -> PullCredentials {
    let mut creds = PullCredentials::default();
    for (i, r) in spec.image_pull_secrets.iter().flatten().enumerate() {
        let field = format!("spec.imagePullSecrets[{i}]");
        let Some(inputs) = inputs else {
            warnings.push(format!("{field}: pods without a cluster have no Secrets; pulls are anonymous"));
            continue;
        };
        match inputs.object(ObjectKind::Secret, &r.name) {
            Ok(Some(data)) => {
                if let Err(e) = creds.add_secret(data) {
                    warnings.push(format!("{field}: Secret {:?} {e}", r.name));
                }
            }
            Ok(None) => warnings.push(format!("{field}: Secret {:?} not found; pulling without it", r.name)),
            Err(e) => warnings.push(format!("{field}: {e}; pulling without it")),
        }
    }
    creds
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{WITH_INPUTS, ctx, inputs, pod};
    use super::super::{PlanContext, plan};
    use crate::config::RuntimeConfig;

    #[test]
    fn a_missing_input_makes_the_pod_wait_and_a_static_pod_cannot_refer_to_one() {
        let rt = RuntimeConfig::default();
        let mut inputs = inputs();
        inputs.secrets.insert("creds".into(), None);
        inputs.config_maps.remove("app");
        inputs.errors.insert("configmap/app".into(), "connection refused".into());
        let with = PlanContext { inputs: Some(&inputs), ..ctx(&rt) };
        let errs = plan(&pod(WITH_INPUTS), &with).expect_err("waits");
        assert!(errs.iter().all(|e| e.pending), "{errs:#?}");
        let text = errs.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n");
        assert!(text.contains("spec.volumes[1].secret: secret \"creds\" not found"), "{text}");
        assert!(
            text.contains("cannot fetch ConfigMap \"app\" from the API server: connection refused"),
            "{text}"
        );

        let errs = plan(&pod(WITH_INPUTS), &ctx(&rt)).expect_err("static pods have no cluster");
        assert!(errs.iter().all(|e| !e.pending), "{errs:#?}");
        assert!(errs.iter().any(|e| e.message.contains("need a cluster connection")), "{errs:#?}");
    }
}
