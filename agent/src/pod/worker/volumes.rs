//! A pod's volumes on disk before its containers start: emptyDir and hostPath directories, and the
//! files of configMap, secret, downwardAPI and projected volumes, replaced atomically. Paths come
//! planned and checked from `spec`; this module only writes.

use std::path::{Path, PathBuf};

use crate::pod::spec::{PodPlan, VolumeFile, VolumeKind};

/// A volume that could not be made ready; shown as the containers' `CreateContainerConfigError`
/// and a `FailedMount` event.
#[derive(Debug, thiserror::Error)]
pub(super) enum VolumeError {
    #[error("volume {name:?}: cannot write {}: {source}", path.display())]
    Write {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("volume {name:?}: cannot create {}: {source}", path.display())]
    Create {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("volume {name:?}: hostPath {} is not an existing directory", path.display())]
    NotADirectory { name: String, path: PathBuf },
}

pub(super) fn prepare_volumes(plan: &PodPlan) -> Result<(), VolumeError> {
    for v in &plan.volumes {
        let (name, path) = (v.name.clone(), v.host.clone());
        match &v.kind {
            VolumeKind::Files(files) => {
                write_files(&v.host, files).map_err(|source| VolumeError::Write { name, path, source })?
            }
            VolumeKind::EmptyDir | VolumeKind::HostPathOrCreate => std::fs::create_dir_all(&v.host)
                .map_err(|source| VolumeError::Create { name, path, source })?,
            VolumeKind::HostPath if !v.host.is_dir() => {
                return Err(VolumeError::NotADirectory { name, path });
            }
            VolumeKind::HostPath => {}
        }
    }
    Ok(())
}

/// Makes `dir` hold exactly `files`. Each file is replaced by a rename, so a module never reads a
/// half-written one; files that are no longer listed are removed. The directory is private to the
/// agent's user because it may hold secrets; modules reach it through their preopen.
pub fn write_files(dir: &Path, files: &[VolumeFile]) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let mut wanted = std::collections::HashSet::new();
    for f in files {
        let target = dir.join(&f.path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let unchanged = std::fs::read(&target).is_ok_and(|old| old == f.data);
        if !unchanged {
            let tmp = target.with_file_name(format!(
                ".{}.tmp",
                target.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
            ));
            std::fs::write(&tmp, &f.data)?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(f.mode & 0o777))?;
            std::fs::rename(&tmp, &target)?;
        }
        wanted.insert(target);
    }
    remove_unlisted(dir, &wanted)?;
    Ok(())
}

/// Removes files under `dir` that are not in `keep`, and directories left empty.
fn remove_unlisted(dir: &Path, keep: &std::collections::HashSet<PathBuf>) -> std::io::Result<bool> {
    let mut empty = true;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            if remove_unlisted(&path, keep)? {
                std::fs::remove_dir(&path)?;
            } else {
                empty = false;
            }
        } else if keep.contains(&path) {
            empty = false;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(empty)
}
