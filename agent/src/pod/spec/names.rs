//! The identifiers that become directories on the node: the pod's UID (`pods/<uid>`, its log
//! directory) and container and volume names (`logs/<pod>/<container>`, `pods/<uid>/volumes/<name>`).
//!
//! Each is checked to be one plain path component before any path is built from it, so `..` or
//! `a/b` from a hostile or broken API server never reaches the disk. Only checks strings; builds
//! no path.

/// The longest UID accepted: a UUID has 36 characters; this leaves room for other schemes.
const MAX_UID_LEN: usize = 128;

/// Why a UID cannot name the pod's directories.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum UidError {
    /// The pod has no UID.
    #[error("is required")]
    Missing,
    /// Not one plain path component; `shown` is the UID cut to [`MAX_UID_LEN`] characters.
    #[error(
        "{shown:?} is not a pod UID: at most {max} letters, digits and '-' (it names \
         the pod's directories on the node); the API server sent a UID no real one hands out",
        max = MAX_UID_LEN
    )]
    NotAUid { shown: String },
}

/// Whether a UID can name the pod's directories (`<state_dir>/pods/<uid>`, its log directory): one
/// plain path component. The API server hands out UUIDs and static pods get a hash in the same
/// shape (`static_pods::parse_manifest`), so `..`, `a/b` or an empty UID only comes from a hostile
/// or broken server, and is refused before any path is built from it.
pub(super) fn check_uid(uid: &str) -> Result<(), UidError> {
    if uid.is_empty() {
        return Err(UidError::Missing);
    }
    let ok = uid.len() <= MAX_UID_LEN && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !ok {
        // Debug-quoted and cut short: the value comes from the API server and goes into a status.
        return Err(UidError::NotAUid { shown: uid.chars().take(MAX_UID_LEN).collect() });
    }
    Ok(())
}

/// Why a name is not an RFC 1123 label. The message follows its subject ("volume ...",
/// "container ..."), so it starts with "name".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum LabelError {
    /// The name is empty.
    #[error("name is required")]
    Missing,
    /// Not a label; `shown` is the name cut to 64 characters.
    #[error(
        "name {shown:?} must be an RFC 1123 label, as Kubernetes requires: at most 63 lower-case \
         letters, digits and '-', starting and ending with a letter or digit"
    )]
    NotALabel { shown: String },
}

/// Checks an RFC 1123 label, which Kubernetes requires of container and volume names. Both name
/// directories on the node (`pods/<uid>/volumes/<volume>`, `logs/<pod>/<container>`), so `..` or
/// `a/b` must never get that far.
pub(super) fn dns_label(name: &str) -> Result<(), LabelError> {
    if name.is_empty() {
        return Err(LabelError::Missing);
    }
    if name.len() <= 63 && crate::names::is_label_shaped(name) {
        return Ok(());
    }
    Err(LabelError::NotALabel { shown: name.chars().take(64).collect() })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::fixtures::{BASE, cluster, ctx, pod, refusal, with_volumes};
    use super::super::plan;
    use crate::config::RuntimeConfig;
    use crate::pod::inputs::PodInputs;

    #[test]
    fn uids_that_are_not_one_safe_path_component_are_refused() {
        let rt = RuntimeConfig::default();
        let inputs = PodInputs::default();
        let long = "a".repeat(129);
        for bad in ["..", ".", "", "a/b", "../../etc", "/abs", "u1\0", "ü", "a_b", long.as_str()] {
            let text = BASE.replace("uid: u1", &format!("uid: {bad:?}"));
            for ctx in [ctx(&rt), cluster(&rt, &inputs)] {
                let errs = plan(&pod(&text), &ctx).expect_err(bad);
                let why = refusal(&errs, "metadata.uid");
                assert!(bad.is_empty() || why.contains("not a pod UID"), "{bad:?}: {why}");
                // Nothing else is planned, so no path was built from it.
                assert_eq!(errs.len(), 1, "{errs:#?}");
            }
        }
        let uuid = BASE.replace("uid: u1", "uid: 0b6c1c02-3f4e-4b8a-9a53-5b2f0d2c7e11");
        let p = plan(&pod(&uuid), &ctx(&rt)).expect("a UUID is fine");
        assert_eq!(
            p.containers[0].preopens[0].host,
            Path::new("/var/lib/lichen/pods/0b6c1c02-3f4e-4b8a-9a53-5b2f0d2c7e11/volumes/data")
        );
    }

    #[test]
    fn volume_and_container_names_must_be_dns_labels() {
        let rt = RuntimeConfig::default();
        let long = "a".repeat(64);
        for bad in ["..", "a/b", "../../x", "Data", "a_b", "-a", "a-", "", long.as_str()] {
            let vols = format!("[{{name: {bad:?}, emptyDir: {{}}}}]");
            let text = format!(
                "
metadata: {{name: p, uid: u1}}
spec:
  volumes: {vols}
  containers: [{{name: app, image: mods/app.wasm, volumeMounts: [{{name: {bad:?}, mountPath: /v}}]}}]
"
            );
            let errs = plan(&pod(&text), &ctx(&rt)).expect_err(bad);
            let why = refusal(&errs, "spec.volumes[0].name");
            assert!(why.starts_with("volume name"), "{bad:?}: {why}");
            assert_eq!(errs.len(), 1, "the mount of an unplanned volume is not reported again: {errs:#?}");

            let named = format!("[{{name: {bad:?}, image: mods/app.wasm}}]");
            let ok = "[{name: ok, image: mods/app.wasm}]";
            for (containers, field) in [
                (format!("containers: {named}"), "spec.containers[0].name"),
                (format!("initContainers: {named}\n  containers: {ok}"), "spec.initContainers[0].name"),
            ] {
                let text = format!("metadata: {{name: p, uid: u1}}\nspec:\n  {containers}\n");
                let errs = plan(&pod(&text), &ctx(&rt)).expect_err(bad);
                let why = refusal(&errs, field);
                assert!(why.starts_with("container name"), "{bad:?}: {why}");
            }
        }
        let twice = with_volumes("u1", "[{name: v0, emptyDir: {}}, {name: v0, hostPath: {path: /etc/app}}]");
        let errs = plan(&twice, &ctx(&rt)).expect_err("one directory, two volumes");
        assert!(refusal(&errs, "spec.volumes[1].name").contains("used twice"));
    }

    #[test]
    fn messages_are_the_ones_users_see() {
        // Strengthening: the exact texts, which statuses and `lichen check` show.
        assert_eq!(super::check_uid("").expect_err("empty").to_string(), "is required");
        assert_eq!(
            super::check_uid("a/b").expect_err("slash").to_string(),
            "\"a/b\" is not a pod UID: at most 128 letters, digits and '-' (it names the pod's \
             directories on the node); the API server sent a UID no real one hands out"
        );
        assert_eq!(super::dns_label("").expect_err("empty").to_string(), "name is required");
        assert_eq!(
            super::dns_label("A").expect_err("upper").to_string(),
            "name \"A\" must be an RFC 1123 label, as Kubernetes requires: at most 63 lower-case \
             letters, digits and '-', starting and ending with a letter or digit"
        );
    }
}
