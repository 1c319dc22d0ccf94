//! The files of configMap, secret, downwardAPI and projected volumes (service account tokens
//! included): which files the agent writes into the volume, with which contents and modes.
//!
//! Every file path is checked to stay inside the volume (relative, no `..`) and no two sources may
//! write the same file. Builds the list only: the worker writes it (`worker::write_files`), and
//! contents never reach logs (`VolumeFile`'s `Debug` leaves them out).

use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, DownwardAPIVolumeFile, DownwardAPIVolumeSource, KeyToPath, ProjectedVolumeSource,
    SecretVolumeSource, ServiceAccountTokenProjection,
};

use super::sources::{ObjectSource, lookup};
use super::{Errors, VolumeContext, VolumeFile, downward};
use crate::pod::inputs::{DEFAULT_TOKEN_SECONDS, ObjectKind, TokenRef};

/// The kubelet's default mode for files it writes into volumes.
const DEFAULT_FILE_MODE: i32 = 0o644;

/// A volume whose files the agent writes.
pub(super) enum FileSource<'a> {
    /// `configMap`.
    ConfigMap(&'a ConfigMapVolumeSource),
    /// `secret`.
    Secret(&'a SecretVolumeSource),
    /// `downwardAPI`.
    DownwardApi(&'a DownwardAPIVolumeSource),
    /// `projected`: several of the above, and service account tokens, in one directory.
    Projected(&'a ProjectedVolumeSource),
}

/// A file path inside a volume that would leave it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} must be a relative path without '..'")]
struct EscapingPath(String);

/// The files of a volume: `None` when it cannot be built (the reasons recorded in `errs`). `path`
/// is the volume's field path.
pub(super) fn files(
    src: &FileSource<'_>,
    path: &str,
    vctx: &VolumeContext<'_>,
    errs: &mut Errors,
) -> Option<Vec<VolumeFile>> {
    let before = errs.0.len();
    let mut files = Vec::new();
    match src {
        FileSource::ConfigMap(c) => {
            let mode = c.default_mode.unwrap_or(DEFAULT_FILE_MODE);
            let src = ObjectSource { kind: ObjectKind::ConfigMap, name: &c.name, optional: c.optional };
            object_files(
                &src,
                c.items.as_deref(),
                mode,
                &format!("{path}.configMap"),
                vctx,
                errs,
                &mut files,
            );
        }
        FileSource::Secret(s) => {
            let mode = s.default_mode.unwrap_or(DEFAULT_FILE_MODE);
            let name = s.secret_name.as_deref().unwrap_or("");
            let src = ObjectSource { kind: ObjectKind::Secret, name, optional: s.optional };
            object_files(&src, s.items.as_deref(), mode, &format!("{path}.secret"), vctx, errs, &mut files);
        }
        FileSource::DownwardApi(d) => {
            let mode = d.default_mode.unwrap_or(DEFAULT_FILE_MODE);
            for (i, item) in d.items.iter().flatten().enumerate() {
                downward_file(item, mode, &format!("{path}.downwardAPI.items[{i}]"), vctx, errs, &mut files);
            }
        }
        FileSource::Projected(p) => projected_files(p, path, vctx, errs, &mut files),
    }
    let mut seen = std::collections::HashSet::new();
    for f in &files {
        if !seen.insert(f.path.clone()) {
            errs.add(path, format!("two sources write the file {}", f.path.display()));
        }
    }
    (errs.0.len() == before).then_some(files)
}

/// The files of each source of a projected volume, in order.
fn projected_files(
    p: &ProjectedVolumeSource,
    path: &str,
    vctx: &VolumeContext<'_>,
    errs: &mut Errors,
    files: &mut Vec<VolumeFile>,
) {
    let mode = p.default_mode.unwrap_or(DEFAULT_FILE_MODE);
    for (i, src) in p.sources.iter().flatten().enumerate() {
        let spath = format!("{path}.projected.sources[{i}]");
        if let Some(c) = &src.config_map {
            let o = ObjectSource { kind: ObjectKind::ConfigMap, name: &c.name, optional: c.optional };
            object_files(&o, c.items.as_deref(), mode, &format!("{spath}.configMap"), vctx, errs, files);
        } else if let Some(s) = &src.secret {
            let o = ObjectSource { kind: ObjectKind::Secret, name: &s.name, optional: s.optional };
            object_files(&o, s.items.as_deref(), mode, &format!("{spath}.secret"), vctx, errs, files);
        } else if let Some(d) = &src.downward_api {
            for (j, item) in d.items.iter().flatten().enumerate() {
                let ipath = format!("{spath}.downwardAPI.items[{j}]");
                downward_file(item, mode, &ipath, vctx, errs, files);
            }
        } else if let Some(t) = &src.service_account_token {
            token_file(t, mode, &format!("{spath}.serviceAccountToken"), vctx, errs, files);
        } else {
            let kind = serde_json::to_value(src)
                .ok()
                .and_then(|j| j.as_object().and_then(|o| o.keys().next().cloned()))
                .unwrap_or_else(|| "(no type)".into());
            errs.add(
                &spath,
                format!("projected source {kind} is not supported; use configMap, secret, downwardAPI or serviceAccountToken"),
            );
        }
    }
}

/// A service account token, as issued for this pod and fetched before planning; a pod whose token
/// has not been issued yet waits for it.
fn token_file(
    t: &ServiceAccountTokenProjection,
    mode: i32,
    tpath: &str,
    vctx: &VolumeContext<'_>,
    errs: &mut Errors,
    out: &mut Vec<VolumeFile>,
) {
    let r = TokenRef {
        audience: t.audience.clone().unwrap_or_default(),
        expiration_seconds: t.expiration_seconds.unwrap_or(DEFAULT_TOKEN_SECONDS),
    };
    if r.expiration_seconds < 600 {
        errs.add(&format!("{tpath}.expirationSeconds"), "must be at least 600");
        return;
    }
    let Some(inputs) = vctx.ctx.inputs else {
        errs.add(tpath, "service account tokens need a cluster connection; static pods cannot use them");
        return;
    };
    match inputs.tokens.get(&r.key()) {
        Some(tok) => {
            if let Some(p) = file_path(&t.path, &format!("{tpath}.path"), errs) {
                out.push(VolumeFile { path: p, data: tok.token.clone().into_bytes(), mode: mode as u32 });
            }
        }
        None => {
            let why = inputs.errors.get(&format!("token/{}", r.key()));
            errs.pending(
                tpath,
                match why {
                    Some(e) => format!("cannot get a service account token: {e}"),
                    None => "the service account token has not been issued yet".into(),
                },
            );
        }
    }
}

/// Adds the files of a ConfigMap or Secret source: every key, or the listed `items`.
fn object_files(
    src: &ObjectSource<'_>,
    items: Option<&[KeyToPath]>,
    mode: i32,
    path: &str,
    vctx: &VolumeContext<'_>,
    errs: &mut Errors,
    out: &mut Vec<VolumeFile>,
) {
    let Some(data) = lookup(vctx.ctx.inputs, src, path, errs) else { return };
    let Some(data) = data else { return };
    let kind = src.kind.as_str().to_lowercase();
    match items {
        None | Some([]) => {
            for (key, value) in data {
                if let Some(p) = file_path(key, &format!("{path}[{key}]"), errs) {
                    out.push(VolumeFile { path: p, data: value.0.clone(), mode: mode as u32 });
                }
            }
        }
        Some(items) => {
            for (i, item) in items.iter().enumerate() {
                let ipath = format!("{path}.items[{i}]");
                match data.get(&item.key) {
                    Some(value) => {
                        if let Some(p) = file_path(&item.path, &format!("{ipath}.path"), errs) {
                            let mode = item.mode.unwrap_or(mode) as u32;
                            out.push(VolumeFile { path: p, data: value.0.clone(), mode });
                        }
                    }
                    None if src.optional == Some(true) => {}
                    None => errs.pending(
                        &ipath,
                        format!(
                            "{kind} {:?} has no key {:?} (add it, or mark the source optional)",
                            src.name, item.key
                        ),
                    ),
                }
            }
        }
    }
}

/// One downwardAPI file: a pod field (a `fieldRef`; resource fields are not supported).
fn downward_file(
    item: &DownwardAPIVolumeFile,
    mode: i32,
    path: &str,
    vctx: &VolumeContext<'_>,
    errs: &mut Errors,
    out: &mut Vec<VolumeFile>,
) {
    let value = match (&item.field_ref, &item.resource_field_ref) {
        (Some(f), _) => match downward::pod_field(vctx.pod, &f.field_path, vctx.fields) {
            Ok(v) => v,
            Err(why) => return errs.add(&format!("{path}.fieldRef"), why),
        },
        (None, Some(_)) => {
            return errs.add(&format!("{path}.resourceFieldRef"), "is not supported; use a fieldRef");
        }
        (None, None) => return errs.add(path, "needs a fieldRef"),
    };
    if let Some(p) = file_path(&item.path, &format!("{path}.path"), errs) {
        out.push(VolumeFile { path: p, data: value.into_bytes(), mode: item.mode.unwrap_or(mode) as u32 });
    }
}

/// A file path inside a volume, as the API server validates it: relative, without `..`; `None`
/// with the refusal recorded under `field` otherwise.
fn file_path(p: &str, field: &str, errs: &mut Errors) -> Option<PathBuf> {
    match inside_volume(p) {
        Ok(path) => Some(path),
        Err(e) => {
            errs.add(field, e);
            None
        }
    }
}

fn inside_volume(p: &str) -> Result<PathBuf, EscapingPath> {
    let path = Path::new(p);
    let ok =
        !p.is_empty() && path.is_relative() && path.components().all(|c| matches!(c, Component::Normal(_)));
    if !ok {
        return Err(EscapingPath(p.to_owned()));
    }
    Ok(path.to_owned())
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{WITH_INPUTS, ctx, files, inputs, pod};
    use super::super::{PlanContext, plan};
    use crate::config::RuntimeConfig;

    #[test]
    fn config_maps_secrets_tokens_and_the_downward_api_become_files_and_env() {
        let rt = RuntimeConfig::default();
        let inputs = inputs();
        let ctx = PlanContext { inputs: Some(&inputs), ..ctx(&rt) };
        let plan = plan(&pod(WITH_INPUTS), &ctx).expect("valid");
        assert_eq!(files(&plan, "cfg"), [("etc/app.toml".into(), "x = 1".into(), 0o644)]);
        assert_eq!(files(&plan, "sec"), [("password".into(), "hunter2".into(), 0o400)]);
        assert_eq!(files(&plan, "meta"), [("labels".into(), "app=\"web\"\ntier=\"edge\"\n".into(), 0o644)]);
        assert_eq!(
            files(&plan, "sa"),
            [
                ("token".into(), "tok".into(), 0o644),
                ("ca.crt".into(), "CA".into(), 0o644),
                ("namespace".into(), "ns".into(), 0o644)
            ]
        );
        assert_eq!(files(&plan, "opt"), []);
        let c = &plan.containers[0];
        let env: Vec<(&str, &str)> = c.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            env,
            [
                ("CFG_LEVEL", "debug"),
                ("CFG_conf.toml", "x = 1"),
                ("CFG_mode", "overridden"),
                ("PASS", "hunter2"),
                ("TIER", "edge")
            ]
        );
        assert!(c.preopens.iter().all(|p| p.read_only), "agent-written volumes are read-only");
        assert!(!format!("{:?}", plan.volumes).contains("hunter2"), "secret files stay out of Debug output");
    }

    #[test]
    fn volume_file_paths_cannot_escape() {
        let rt = RuntimeConfig::default();
        let inputs = inputs();
        let ctx = PlanContext { inputs: Some(&inputs), ..ctx(&rt) };
        let bad = WITH_INPUTS.replace("path: etc/app.toml", "path: ../../etc/passwd");
        let errs = plan(&pod(&bad), &ctx).expect_err("refused");
        assert_eq!(errs[0].field, "spec.volumes[0].configMap.items[0].path");
        assert!(!errs[0].pending);
        // Strengthening: the exact refusal.
        assert_eq!(errs[0].message, "\"../../etc/passwd\" must be a relative path without '..'");
    }
}
