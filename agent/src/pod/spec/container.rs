//! One container's plan, assembled from the other concerns: its name, the fields admission refuses,
//! its memory limit, its module (`image`, `imagePullPolicy`), environment, mounts and `argv`.
//!
//! Owns the order in which a container's checks run (so refusals read top to bottom as the
//! manifest does) and `argv`; the rules themselves live in the files named above. Image grammar and
//! origin rules are `modules`', not repeated here.

use k8s_openapi::api::core::v1::{Container, Pod};

use super::downward::FieldValues;
use super::volumes::{self, PlannedVolumes};
use super::{ContainerPlan, Errors, PlanContext, RunLimits, admission, env, names};
use crate::modules::{PullPolicy, parse_image};

/// What planning a container needs besides the container.
pub(super) struct ContainerContext<'a> {
    pub(super) ctx: &'a PlanContext<'a>,
    pub(super) pod: &'a Pod,
    /// The pod's volumes, for its mounts.
    pub(super) volumes: &'a PlannedVolumes,
    pub(super) fields: &'a FieldValues,
    /// From the pod's annotations, the same for every container.
    pub(super) limits: RunLimits,
}

/// The plan for `c`, or `None` with every reason recorded; `path` is its field path.
pub(super) fn container(
    c: &Container,
    path: &str,
    cctx: &ContainerContext<'_>,
    errs: &mut Errors,
    warnings: &mut Vec<String>,
) -> Option<ContainerPlan> {
    let ctx = cctx.ctx;
    let before = errs.0.len();
    // The name becomes the container's log directory: checked here, before any path is built.
    if let Err(why) = names::dns_label(&c.name) {
        errs.add(&format!("{path}.name"), format!("container {why}"));
    }
    admission::refuse_container_fields(c, path, errs);
    let memory_limit = admission::memory_limit(c, path, ctx.runtime, errs, warnings);

    let image = c.image.as_deref().unwrap_or("");
    let source = match parse_image(image, ctx.origin, ctx.modules) {
        Ok(s) => Some(s),
        Err(e) => {
            errs.add(&format!("{path}.image"), e);
            None
        }
    };
    let pull_policy = match PullPolicy::from_spec(c.image_pull_policy.as_deref(), image) {
        Ok(p) => Some(p),
        Err(e) => {
            errs.add(&format!("{path}.imagePullPolicy"), e);
            None
        }
    };

    let env = env::container_env(c, path, cctx.pod, cctx.fields, ctx.inputs, errs, warnings);
    let preopens = volumes::preopens(c, path, cctx.volumes, errs, warnings);

    let mut argv: Vec<String> = match &c.command {
        Some(cmd) if !cmd.is_empty() => cmd.iter().map(|a| env::expand(a, &env)).collect(),
        _ => vec![c.name.clone()],
    };
    argv.extend(c.args.iter().flatten().map(|a| env::expand(a, &env)));

    if errs.0.len() > before {
        return None;
    }
    Some(ContainerPlan {
        name: c.name.clone(),
        image: c.image.clone().unwrap_or_default(),
        source: source?,
        pull_policy: pull_policy?,
        argv,
        env,
        preopens,
        fuel: cctx.limits.fuel,
        memory_limit,
        timeout: cctx.limits.timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{ctx, pod};
    use super::super::{ModuleSource, PlanContext, plan};
    use crate::config::RuntimeConfig;
    use crate::modules::PullPolicy;
    use crate::pod::inputs::PodInputs;

    #[test]
    fn images_pull_policies_and_pull_secrets() {
        let rt = RuntimeConfig::default();
        let p = pod("
metadata: {name: p, uid: u1}
spec:
  imagePullSecrets: [{name: regcred}, {name: absent}]
  containers:
  - {name: a, image: registry.lan:5000/acme/app:1.0}
  - {name: b, image: registry.lan:5000/acme/app}
  - {name: c, image: mods/c.wasm, imagePullPolicy: Never}
");
        let mut inputs = PodInputs::default();
        let config = r#"{"auths":{"registry.lan:5000":{"username":"u","password":"p"}}}"#;
        let data = [(".dockerconfigjson".to_owned(), k8s_openapi::ByteString(config.as_bytes().to_vec()))];
        inputs.secrets.insert("regcred".into(), Some(data.into_iter().collect()));
        inputs.secrets.insert("absent".into(), None);
        let ctx = PlanContext { inputs: Some(&inputs), ..ctx(&rt) };
        let plan = plan(&p, &ctx).expect("plans");
        let policies: Vec<PullPolicy> = plan.containers.iter().map(|c| c.pull_policy).collect();
        assert_eq!(policies, [PullPolicy::IfNotPresent, PullPolicy::Always, PullPolicy::Never]);
        assert!(matches!(plan.containers[0].source, ModuleSource::Oci(_)));
        assert_eq!(plan.containers[2].source, ModuleSource::File("/etc/lichen/pods/mods/c.wasm".into()));
        assert!(plan.pull_credentials.for_registry("registry.lan:5000").is_some());
        // A missing pull secret does not hold the pod; it is only a warning.
        assert!(plan.warnings.iter().any(|w| w.contains("\"absent\" not found")), "{:?}", plan.warnings);

        let bad = pod("
metadata: {name: p, uid: u1}
spec:
  containers: [{name: a, image: r/app:1, imagePullPolicy: Sometimes}]
");
        let errs = super::super::plan(&bad, &ctx).expect_err("refused");
        assert_eq!(errs[0].field, "spec.containers[0].imagePullPolicy");
    }
}
