//! hostPath security: which host directories a pod may mount. This is the boundary between whoever
//! may create pods and the board itself.
//!
//! A hostPath is absolute, without `..`; it may never be, hold or lie under the agent's state
//! directory (the node's key, its store, every pod's secrets), whichever origin the pod has; a
//! pod from the cluster may mount only directories under `runtime.allowed_host_paths`. The path is
//! checked as written and again with its symlinks resolved. The only I/O is that resolution
//! (`canonicalize`); nothing is created or changed here, and the rules must not be loosened for a
//! convenience elsewhere.

use std::path::{Component, Path, PathBuf};

use super::PlanContext;
use crate::modules::ImageOrigin;

/// Why a pod may not mount a hostPath.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum HostPathError {
    /// A relative path.
    #[error("must be an absolute path")]
    Relative,
    /// `..` anywhere, refused outright as Kubernetes' own validation does.
    #[error("{written:?} must not contain '..'")]
    ParentDir { written: String },
    /// The state directory, a parent of it or a directory under it.
    #[error(
        "{} is, holds or lies under the agent's state directory {} (the node's key, its \
         store and every pod's secrets); no pod may mount it, use another directory",
        .path.display(),
        .state.display()
    )]
    StateDir { path: PathBuf, state: PathBuf },
    /// A cluster pod's path outside `runtime.allowed_host_paths` (listed in the message).
    #[error(
        "pods from the cluster may mount only host directories under \
         runtime.allowed_host_paths ({}); add {} or a parent there, or use emptyDir",
        allowed_list(.allowed),
        .path.display()
    )]
    NotAllowed { path: PathBuf, allowed: Vec<PathBuf> },
    /// Allowed as written, but a symlink on the way leads into the state directory.
    #[error(
        "{} leads through a symlink to {}, which is, holds or lies under the agent's state directory",
        .path.display(),
        .resolved.display()
    )]
    SymlinkIntoState { path: PathBuf, resolved: PathBuf },
    /// Allowed as written, but a symlink on the way leads out of `runtime.allowed_host_paths`.
    #[error(
        "{} leads through a symlink to {}, which is not under runtime.allowed_host_paths",
        .path.display(),
        .resolved.display()
    )]
    SymlinkOutOfAllowed { path: PathBuf, resolved: PathBuf },
}

/// `runtime.allowed_host_paths` as a refusal shows it.
fn allowed_list(allowed: &[PathBuf]) -> String {
    if allowed.is_empty() {
        "which is empty, so no hostPath is allowed".to_owned()
    } else {
        let dirs: Vec<String> = allowed.iter().map(|a| a.display().to_string()).collect();
        format!("which lists {}", dirs.join(", "))
    }
}

/// A hostPath the pod may mount, normalised: absolute, without `..` (refused outright, as
/// Kubernetes' own validation does), `.` and repeated `/` dropped. It may never be, hold or lie
/// under the agent's state directory; for pods from the cluster it must also be, or lie under, one
/// of `runtime.allowed_host_paths`, because whoever may create pods must not read the board.
///
/// The path is checked as written and, when it exists, again with its symlinks resolved: a link
/// under an allowed directory (one a pod with a writable mount there could leave) must not lead
/// into the state directory or out of the allowed ones. A link created after admission is not
/// seen until the pod is admitted again, so allowed directories should be ones no untrusted
/// writer can put links into.
pub(super) fn host_path(p: &str, ctx: &PlanContext<'_>) -> Result<PathBuf, HostPathError> {
    let path = host_path_as_written(p, ctx)?;
    if let Ok(resolved) = std::fs::canonicalize(&path)
        && resolved != path
    {
        let resolve = |d: &Path| std::fs::canonicalize(d).unwrap_or_else(|_| lexical(d));
        let state = resolve(ctx.state_dir);
        let inside_state = resolved.starts_with(&state) || state.starts_with(&resolved);
        let outside_allowed = matches!(ctx.origin, ImageOrigin::Cluster)
            && !ctx.runtime.allowed_host_paths.iter().any(|a| resolved.starts_with(resolve(a)));
        if inside_state {
            return Err(HostPathError::SymlinkIntoState { path, resolved });
        }
        if outside_allowed {
            return Err(HostPathError::SymlinkOutOfAllowed { path, resolved });
        }
    }
    Ok(path)
}

fn host_path_as_written(p: &str, ctx: &PlanContext<'_>) -> Result<PathBuf, HostPathError> {
    let raw = Path::new(p);
    if !raw.is_absolute() {
        return Err(HostPathError::Relative);
    }
    if raw.components().any(|c| c == Component::ParentDir) {
        return Err(HostPathError::ParentDir { written: p.to_owned() });
    }
    let path = lexical(raw);
    let state = lexical(ctx.state_dir);
    if path.starts_with(&state) || state.starts_with(&path) {
        return Err(HostPathError::StateDir { path, state });
    }
    if matches!(ctx.origin, ImageOrigin::Cluster) {
        let allowed = &ctx.runtime.allowed_host_paths;
        if !allowed.iter().any(|a| path.starts_with(lexical(a))) {
            return Err(HostPathError::NotAllowed { path, allowed: allowed.clone() });
        }
    }
    Ok(path)
}

/// `p` made absolute against the working directory, with `.`, `..` and repeated `/` resolved
/// lexically; no symlink is followed, nothing is read from disk.
fn lexical(p: &Path) -> PathBuf {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::fixtures::{cluster, ctx, refusal, with_volumes};
    use super::super::plan;
    use crate::config::RuntimeConfig;
    use crate::pod::inputs::PodInputs;

    #[test]
    fn cluster_pods_mount_only_allowed_host_paths() {
        let inputs = PodInputs::default();
        let refused = RuntimeConfig::default();
        let host = "[{name: v0, hostPath: {path: /srv/data}}]";
        let errs = plan(&with_volumes("u1", host), &cluster(&refused, &inputs)).expect_err("none allowed");
        let why = refusal(&errs, "spec.volumes[0].hostPath.path");
        assert!(why.contains("runtime.allowed_host_paths") && why.contains("empty"), "{why}");

        let rt = RuntimeConfig { allowed_host_paths: vec!["/srv/data".into(), "/mnt/usb".into()], ..refused };
        let ctx = cluster(&rt, &inputs);
        for ok in ["/srv/data", "/srv/data/", "/srv/data/sub", "/srv//data/./sub", "/mnt/usb/x"] {
            let p = plan(&with_volumes("u1", &host.replace("/srv/data", ok)), &ctx)
                .unwrap_or_else(|e| panic!("{ok} is allowed: {e:#?}"));
            assert!(p.volumes[0].host.starts_with("/srv/data") || p.volumes[0].host.starts_with("/mnt/usb"));
            assert!(
                !p.volumes[0].host.to_string_lossy().contains("/."),
                "normalised: {:?}",
                p.volumes[0].host
            );
        }
        for bad in ["/srv", "/srv/database", "/etc", "/mnt"] {
            let errs = plan(&with_volumes("u1", &host.replace("/srv/data", bad)), &ctx).expect_err(bad);
            let why = refusal(&errs, "spec.volumes[0].hostPath.path");
            assert!(why.contains("runtime.allowed_host_paths") && why.contains("/srv/data"), "{bad}: {why}");
        }
        // `..` is refused outright, even where it would land inside an allowed directory.
        for bad in ["/srv/data/../../var/lib/lichen", "/srv/data/x/.."] {
            let errs = plan(&with_volumes("u1", &host.replace("/srv/data", bad)), &ctx).expect_err(bad);
            assert!(refusal(&errs, "spec.volumes[0].hostPath.path").contains("'..'"), "{bad}");
        }
    }

    #[test]
    fn no_pod_mounts_the_state_dir_not_even_a_static_one() {
        let inputs = PodInputs::default();
        // Allowing everything still leaves the state directory out, for both origins.
        let rt = RuntimeConfig { allowed_host_paths: vec!["/".into()], ..RuntimeConfig::default() };
        let host = "[{name: v0, hostPath: {path: PATH, type: DirectoryOrCreate}}]";
        for ctx in [ctx(&rt), cluster(&rt, &inputs)] {
            for bad in
                ["/var/lib/lichen", "/var/lib/lichen/store", "/var/lib//lichen/pods/u2", "/var/lib", "/"]
            {
                let errs = plan(&with_volumes("u1", &host.replace("PATH", bad)), &ctx).expect_err(bad);
                let why = refusal(&errs, "spec.volumes[0].hostPath.path");
                assert!(why.contains("state directory /var/lib/lichen"), "{bad}: {why}");
            }
            let ok = plan(&with_volumes("u1", &host.replace("PATH", "/var/lib/lichen-data")), &ctx);
            assert!(ok.is_ok(), "a sibling is not the state dir: {ok:?}");
        }
        // A static pod may mount any other path, as before.
        let p = plan(&with_volumes("u1", &host.replace("PATH", "/etc/app")), &ctx(&RuntimeConfig::default()));
        assert_eq!(p.expect("static").volumes[0].host, Path::new("/etc/app"));
    }

    #[test]
    fn a_symlink_in_an_allowed_directory_does_not_lead_out_of_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let allowed = dir.path().join("shared");
        let state = dir.path().join("state");
        std::fs::create_dir_all(allowed.join("real")).expect("dirs");
        std::fs::create_dir_all(state.join("store")).expect("state");
        std::os::unix::fs::symlink("../state/store", allowed.join("to-store")).expect("link");
        std::os::unix::fs::symlink("/etc", allowed.join("to-etc")).expect("link");
        let rt = RuntimeConfig { allowed_host_paths: vec![allowed.clone()], ..RuntimeConfig::default() };
        let inputs = PodInputs::default();
        let mut c = cluster(&rt, &inputs);
        c.state_dir = &state;
        let host = "[{name: v0, hostPath: {path: PATH, type: Directory}}]";
        let vol = |p: &Path| with_volumes("u1", &host.replace("PATH", &p.display().to_string()));
        assert!(plan(&vol(&allowed.join("real")), &c).is_ok(), "a real directory under the allowed one");
        let why = refusal(
            &plan(&vol(&allowed.join("to-store")), &c).expect_err("link"),
            "spec.volumes[0].hostPath.path",
        );
        assert!(why.contains("symlink") && why.contains("state directory"), "{why}");
        let why = refusal(
            &plan(&vol(&allowed.join("to-etc")), &c).expect_err("link"),
            "spec.volumes[0].hostPath.path",
        );
        assert!(why.contains("symlink") && why.contains("allowed_host_paths"), "{why}");
    }

    #[test]
    fn refusals_read_as_before() {
        // Strengthening: the exact texts a refused hostPath shows.
        use super::{HostPathError, allowed_list};
        use std::path::PathBuf;
        let at = |s: &str| PathBuf::from(s);
        assert_eq!(HostPathError::Relative.to_string(), "must be an absolute path");
        assert_eq!(
            HostPathError::ParentDir { written: "/a/../b".into() }.to_string(),
            "\"/a/../b\" must not contain '..'"
        );
        assert_eq!(
            HostPathError::StateDir { path: at("/var/lib"), state: at("/var/lib/lichen") }.to_string(),
            "/var/lib is, holds or lies under the agent's state directory /var/lib/lichen (the node's \
             key, its store and every pod's secrets); no pod may mount it, use another directory"
        );
        assert_eq!(
            HostPathError::NotAllowed { path: at("/etc"), allowed: vec![at("/srv"), at("/mnt")] }.to_string(),
            "pods from the cluster may mount only host directories under runtime.allowed_host_paths \
             (which lists /srv, /mnt); add /etc or a parent there, or use emptyDir"
        );
        assert_eq!(allowed_list(&[]), "which is empty, so no hostPath is allowed");
        assert_eq!(
            HostPathError::SymlinkIntoState { path: at("/s/l"), resolved: at("/st") }.to_string(),
            "/s/l leads through a symlink to /st, which is, holds or lies under the agent's state directory"
        );
        assert_eq!(
            HostPathError::SymlinkOutOfAllowed { path: at("/s/l"), resolved: at("/etc") }.to_string(),
            "/s/l leads through a symlink to /etc, which is not under runtime.allowed_host_paths"
        );
    }
}
