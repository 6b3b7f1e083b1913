//! The sandbox's shared directory: `<task dir>/shared` on the host, served to the guest by
//! virtiofsd (started with the VM by the backend) and mounted by the agent at [`GUEST_SHARE_DIR`].
//! Whatever a container needs from the host (its rootfs when the VM already runs, host directories
//! and files) is mounted below `shared/<container id>/` and so appears in the guest.
//!
//! The directory is a shared mount (its own peer group), so that what is mounted in it after
//! virtiofsd has entered its own mount namespace (a slave of the host's) still reaches virtiofsd.
//! A read-only mount is made read-only before it enters the shared directory: the copy propagated
//! to virtiofsd inherits the flag, which a later remount would not change.

use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::sandbox::unmount_below;

/// The virtio-fs tag of the shared directory.
pub const SHARE_TAG: &str = "ironclad";
/// Where the agent mounts the shared directory in the guest.
pub const GUEST_SHARE_DIR: &str = "/run/ironclad/share";
/// The shared directory's name in the task directory.
const SHARED: &str = "shared";
/// Where a read-only mount is prepared before it enters the shared directory.
const STAGING: &str = "share-staging";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot {action} {path}")]
    Mount {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("{0:?} cannot name an entry of the shared directory (one plain path component)")]
    BadName(String),
}

/// The shared directory of one sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareFs {
    dir: PathBuf,
    staging: PathBuf,
}

/// Whether the guest may write to what is bound into the share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { action, path, source }
}

fn mount_err(action: &'static str, path: &Path) -> impl FnOnce(nix::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Mount { action, path, source }
}

/// A single path component: no separator, not `.` or `..`, not empty.
fn plain_name(name: &str) -> Result<&str, Error> {
    let mut components = Path::new(name).components();
    match (components.next(), components.next()) {
        (Some(Component::Normal(_)), None) if !name.contains('/') => Ok(name),
        _ => Err(Error::BadName(name.into())),
    }
}

impl ShareFs {
    /// The shared directory a sandbox in `task_dir` has (or will have): a pooled VM's directory
    /// has one [`ShareFs::prepare`] made already.
    pub fn of_task_dir(task_dir: &Path) -> ShareFs {
        ShareFs { dir: task_dir.join(SHARED), staging: task_dir.join(STAGING) }
    }

    /// Makes `<task dir>/shared` a shared mount of its own. Undone by the sandbox's clean-up
    /// (everything mounted below the task directory goes).
    pub fn prepare(task_dir: &Path) -> Result<ShareFs, Error> {
        let share = Self::of_task_dir(task_dir);
        for dir in [&share.dir, &share.staging] {
            std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        }
        mount(Some(&share.dir), &share.dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .map_err(mount_err("bind-mount the shared directory on itself", &share.dir))?;
        mount(None::<&str>, &share.dir, None::<&str>, MsFlags::MS_SHARED, None::<&str>)
            .map_err(mount_err("make the shared directory a shared mount", &share.dir))?;
        Ok(share)
    }

    /// The host directory virtiofsd serves.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `shared/<container id>`, where a container's mounts go.
    pub fn container_dir(&self, container_id: &str) -> Result<PathBuf, Error> {
        Ok(self.dir.join(plain_name(container_id)?))
    }

    /// The guest's path of `shared/<container id>/<name>`.
    pub fn guest_path(container_id: &str, name: &str) -> PathBuf {
        Path::new(GUEST_SHARE_DIR).join(container_id).join(name)
    }

    /// Makes `shared/<container id>/<name>` (a directory, or an empty file to bind a file on) and
    /// returns its host path.
    fn mount_point(&self, container_id: &str, name: &str, is_dir: bool) -> Result<PathBuf, Error> {
        let container_dir = self.container_dir(container_id)?;
        std::fs::create_dir_all(&container_dir).map_err(io_err("create", &container_dir))?;
        let target = container_dir.join(plain_name(name)?);
        if is_dir {
            std::fs::create_dir(&target).map_err(io_err("create", &target))?;
        } else {
            std::fs::File::create(&target).map_err(io_err("create", &target))?;
        }
        Ok(target)
    }

    /// Binds host file or directory `source` at `shared/<container id>/<name>` and returns where
    /// the guest sees it. Writes from the guest land in `source`; the host's later changes show in
    /// the guest.
    pub fn bind(
        &self,
        container_id: &str,
        name: &str,
        source: &Path,
        access: Access,
    ) -> Result<PathBuf, Error> {
        let is_dir = std::fs::metadata(source).map_err(io_err("read", source))?.is_dir();
        let target = self.mount_point(container_id, name, is_dir)?;
        match access {
            Access::ReadWrite => {
                mount(Some(source), &target, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
                    .map_err(mount_err("bind-mount into the shared directory", &target))?;
            }
            Access::ReadOnly => self.bind_read_only(source, &target, is_dir)?,
        }
        Ok(Self::guest_path(container_id, name))
    }

    /// Binds `source` read-only in the staging directory, then moves that mount to `target`.
    fn bind_read_only(&self, source: &Path, target: &Path, is_dir: bool) -> Result<(), Error> {
        let name = target.strip_prefix(&self.dir).unwrap_or(target).to_string_lossy().replace('/', "_");
        let staged = self.staging.join(name);
        if is_dir {
            std::fs::create_dir(&staged).map_err(io_err("create", &staged))?;
        } else {
            std::fs::File::create(&staged).map_err(io_err("create", &staged))?;
        }
        let bound =
            mount(Some(source), &staged, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
                .map_err(mount_err("bind-mount for read-only use", &staged))
                .and_then(|()| {
                    let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
                    mount(None::<&str>, &staged, None::<&str>, flags, None::<&str>)
                        .map_err(mount_err("make read-only", &staged))
                })
                .and_then(|()| {
                    mount(Some(&staged), target, None::<&str>, MsFlags::MS_MOVE, None::<&str>)
                        .map_err(mount_err("move a read-only mount into the shared directory", target))
                });
        if bound.is_err() {
            let _ = umount2(&staged, MntFlags::MNT_DETACH);
        }
        let _ = if is_dir { std::fs::remove_dir(&staged) } else { std::fs::remove_file(&staged) };
        bound
    }

    /// Mounts a container's rootfs (containerd's overlay, or a bind of a directory) at
    /// `shared/<container id>/rootfs` and returns where the guest sees it.
    pub fn mount_rootfs(
        &self,
        container_id: &str,
        kind: &str,
        source: &Path,
        options: &[String],
    ) -> Result<PathBuf, Error> {
        let target = self.mount_point(container_id, "rootfs", true)?;
        let mounted = match kind {
            "overlay" => {
                let data = options.join(",");
                mount(Some("overlay"), &target, Some("overlay"), MsFlags::empty(), Some(data.as_str()))
            }
            _ => mount(Some(source), &target, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>),
        };
        mounted.map_err(mount_err("mount the container's rootfs in the shared directory", &target))?;
        Ok(Self::guest_path(container_id, "rootfs"))
    }

    /// Unmounts and removes everything of one container (its rootfs and binds).
    pub fn release(&self, container_id: &str) {
        let Ok(dir) = self.container_dir(container_id) else { return };
        unmount_below(&dir);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_single_plain_components() {
        for good in ["c1", "3-resolv.conf", "rootfs"] {
            assert_eq!(plain_name(good).unwrap(), good);
        }
        for bad in ["", ".", "..", "a/b", "/abs", "../up"] {
            assert!(matches!(plain_name(bad), Err(Error::BadName(_))), "{bad:?}");
        }
        assert_eq!(ShareFs::guest_path("c1", "0-data"), Path::new("/run/ironclad/share/c1/0-data"));
    }

    #[test]
    fn binds_show_host_changes_and_read_only_ones_refuse_writes() {
        if !ironclad_test_prereq::needs().root().ready() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let task_dir = dir.path().join("task");
        let host = dir.path().join("volume");
        std::fs::create_dir_all(&host).unwrap();
        let share = ShareFs::prepare(&task_dir).unwrap();
        assert_eq!(
            share.bind("c1", "0-rw", &host, Access::ReadWrite).unwrap(),
            ShareFs::guest_path("c1", "0-rw")
        );
        share.bind("c1", "1-ro", &host, Access::ReadOnly).unwrap();
        std::fs::write(share.dir().join("c1/0-rw/from-guest"), "g").unwrap();
        assert_eq!(std::fs::read_to_string(host.join("from-guest")).unwrap(), "g");
        std::fs::write(host.join("from-host"), "h").unwrap();
        assert_eq!(std::fs::read_to_string(share.dir().join("c1/1-ro/from-host")).unwrap(), "h");
        let refused = std::fs::write(share.dir().join("c1/1-ro/x"), "x").unwrap_err();
        assert_eq!(refused.raw_os_error(), Some(libc::EROFS));
        let file = dir.path().join("hosts");
        std::fs::write(&file, "127.0.0.1 pod\n").unwrap();
        share.bind("c1", "2-hosts", &file, Access::ReadOnly).unwrap();
        assert_eq!(std::fs::read_to_string(share.dir().join("c1/2-hosts")).unwrap(), "127.0.0.1 pod\n");
        assert!(std::fs::read_dir(task_dir.join(STAGING)).unwrap().next().is_none(), "staging is left empty");
        share.release("c1");
        assert!(!share.dir().join("c1").exists());
        assert_eq!(std::fs::read_to_string(host.join("from-host")).unwrap(), "h", "release keeps host files");
        crate::sandbox::clean_up_task_dir(&task_dir);
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mountinfo.contains(task_dir.to_str().unwrap()), "a mount was left: {mountinfo}");
        assert!(!task_dir.exists());
    }
}
