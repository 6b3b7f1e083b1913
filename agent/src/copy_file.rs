//! CopyFile: the host puts a file (resolv.conf, hosts, a secret) into the guest, below one shared
//! directory, atomically, and never anywhere else.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Larger payloads belong on a disk, not in an RPC.
pub const MAX_FILE_SIZE: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("path {0:?} must be relative, without '..' or empty parts")]
    BadPath(String),
    #[error("{0} is a symbolic link or not a directory: refusing to follow it")]
    Escape(PathBuf),
    #[error("{size} bytes is more than the {MAX_FILE_SIZE} a copied file may have")]
    TooLarge { size: usize },
    #[error("mode {0:o} has bits beyond 0o7777")]
    BadMode(u32),
    #[error("cannot write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Checks `relative` and joins it to `base`: plain names only.
fn resolve(base: &Path, relative: &str) -> Result<PathBuf, Error> {
    // Raw segments, not Path::components, which would quietly drop "." and empty parts.
    let plain = !relative.is_empty() && relative.split('/').all(|part| !matches!(part, "" | "." | ".."));
    if !plain {
        return Err(Error::BadPath(relative.into()));
    }
    Ok(base.join(relative))
}

/// Creates the directories between `base` and `target`, refusing any that is a symlink.
fn make_parents(base: &Path, target: &Path) -> Result<(), Error> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    fs::create_dir_all(base).map_err(io(base))?;
    let Some(parent) = target.parent() else {
        return Ok(());
    };
    let mut current = base.to_path_buf();
    for component in parent.strip_prefix(base).unwrap_or(Path::new("")).components() {
        current.push(component);
        match fs::symlink_metadata(&current) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(Error::Escape(current)),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                fs::create_dir(&current).map_err(io(&current))?;
            }
            Err(source) => return Err(Error::Io { path: current, source }),
        }
    }
    Ok(())
}

/// Writes `data` to `base/relative` through a temporary file renamed into place, so a reader never
/// sees half a file; a symlink already at the destination is replaced, not followed.
pub fn copy_file(
    base: &Path,
    relative: &str,
    data: &[u8],
    mode: u32,
    uid: u32,
    gid: u32,
) -> Result<PathBuf, Error> {
    if data.len() > MAX_FILE_SIZE {
        return Err(Error::TooLarge { size: data.len() });
    }
    if mode & !0o7777 != 0 {
        return Err(Error::BadMode(mode));
    }
    let target = resolve(base, relative)?;
    make_parents(base, &target)?;
    let file_name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temporary = target.with_file_name(format!(".{file_name}.ironclad-tmp"));
    let io = |source| Error::Io { path: target.clone(), source };
    let _ = fs::remove_file(&temporary);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(mode)
        .open(&temporary)
        .map_err(io)?;
    let written = file
        .write_all(data)
        .and_then(|()| file.set_permissions(fs::Permissions::from_mode(mode)))
        .and_then(|()| std::os::unix::fs::fchown(&file, Some(uid), Some(gid)))
        .and_then(|()| file.sync_all())
        .and_then(|()| fs::rename(&temporary, &target));
    if let Err(source) = written {
        let _ = fs::remove_file(&temporary);
        return Err(io(source));
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn writes_the_file_with_its_mode_and_owner_creating_directories() {
        let base = tempfile::tempdir().unwrap();
        let path =
            copy_file(base.path(), "c1/etc/resolv.conf", b"nameserver 10.0.0.1\n", 0o644, 0, 0).unwrap();
        assert_eq!(path, base.path().join("c1/etc/resolv.conf"));
        assert_eq!(fs::read(&path).unwrap(), b"nameserver 10.0.0.1\n");
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o7777, 0o644);
        // Again, atomically replaced.
        copy_file(base.path(), "c1/etc/resolv.conf", b"nameserver 10.0.0.2\n", 0o600, 0, 0).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"nameserver 10.0.0.2\n");
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o7777, 0o600);
        assert!(!base.path().join("c1/etc/.resolv.conf.ironclad-tmp").exists());
    }

    #[test]
    fn paths_that_leave_the_shared_directory_are_refused() {
        let base = tempfile::tempdir().unwrap();
        for bad in ["../escape", "/etc/passwd", "a/../../b", "", "a//b/./c"] {
            let err = copy_file(base.path(), bad, b"x", 0o644, 0, 0).unwrap_err();
            assert!(matches!(err, Error::BadPath(_)), "{bad:?}: {err}");
        }
    }

    #[test]
    fn a_symlink_on_the_way_is_not_followed() {
        let base = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), base.path().join("link")).unwrap();
        let err = copy_file(base.path(), "link/file", b"x", 0o644, 0, 0).unwrap_err();
        assert!(matches!(err, Error::Escape(_)), "{err}");
        assert!(!outside.path().join("file").exists());
        // A symlink at the destination itself is replaced, never written through.
        let victim = outside.path().join("victim");
        fs::write(&victim, b"untouched").unwrap();
        std::os::unix::fs::symlink(&victim, base.path().join("dest")).unwrap();
        copy_file(base.path(), "dest", b"new", 0o644, 0, 0).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"untouched");
        assert!(!fs::symlink_metadata(base.path().join("dest")).unwrap().file_type().is_symlink());
    }

    #[test]
    fn oversized_files_and_odd_modes_are_refused() {
        let base = tempfile::tempdir().unwrap();
        let big = vec![0u8; MAX_FILE_SIZE + 1];
        assert!(matches!(copy_file(base.path(), "big", &big, 0o644, 0, 0), Err(Error::TooLarge { .. })));
        assert!(matches!(copy_file(base.path(), "odd", b"x", 0o10777, 0, 0), Err(Error::BadMode(_))));
    }
}
