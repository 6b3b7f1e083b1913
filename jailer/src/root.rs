//! The jail's file system: a tmpfs root, private to the jail's mount namespace, holding only the
//! binds of its spec, a few device nodes and the jail's own /proc; then `pivot_root` into it and
//! the old root detached, and the tmpfs made read-only.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{major, makedev, minor, mknod, Mode, SFlag};
use nix::unistd::{chown, pivot_root, Gid, Uid};

use crate::libraries::Library;
use crate::spec::{Bind, JailSpec, SYSTEM_LINKS};

/// The tmpfs root holds directories, links and device nodes only.
const ROOT_TMPFS_OPTIONS: &str = "size=1m,mode=0755";
/// Device nodes every program may expect, world-usable as on the host.
const COMMON_DEVICES: &[&str] = &["/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot {action} {path}")]
    Mount {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make the device node {path}")]
    Device {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// Builds the root in the current (new) mount namespace and enters it. Mounts made on the host
/// afterwards still reach the jail's binds (slave propagation: a directory shared with the guest
/// gains mounts while the helper runs), and nothing mounted here reaches the host.
pub fn enter(spec: &JailSpec) -> Result<(), Error> {
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_SLAVE, None::<&str>)
        .map_err(mount_err("make the host's mounts slaves in", Path::new("/")))?;
    let root = &spec.root;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(root).map_err(|source| Error::Io {
        action: "create the jail's mount point",
        path: root.clone(),
        source,
    })?;
    mount(Some("tmpfs"), root, Some("tmpfs"), MsFlags::MS_NOSUID, Some(ROOT_TMPFS_OPTIONS))
        .map_err(mount_err("mount the jail's tmpfs root on", root))?;
    link_system_names(root)?;
    for bind in &spec.binds {
        place_bind(root, bind)?;
    }
    for library in &spec.libraries {
        place_library(root, library)?;
    }
    make_devices(root, spec)?;
    let proc_dir = inside(root, Path::new("/proc"));
    create_dir(&proc_dir)?;
    // The jail is PID 1 of its own PID namespace here: this /proc shows the jail's processes only.
    let proc_flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(Some("proc"), &proc_dir, Some("proc"), proc_flags, None::<&str>)
        .map_err(mount_err("mount the jail's /proc on", &proc_dir))?;
    pivot_into(root)
}

fn mount_err(action: &'static str, path: &Path) -> impl FnOnce(nix::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Mount { action, path, source }
}

/// `path` as seen from the host before the pivot.
fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

fn create_dir(path: &Path) -> Result<(), Error> {
    std::fs::DirBuilder::new().recursive(true).mode(0o755).create(path).map_err(|source| Error::Io {
        action: "create",
        path: path.to_path_buf(),
        source,
    })
}

/// /lib → usr/lib and its kind, as on the host: the loader's path in every binary names them.
fn link_system_names(root: &Path) -> Result<(), Error> {
    for name in SYSTEM_LINKS {
        if let Ok(target) = std::fs::read_link(name) {
            let link = inside(root, Path::new(name));
            std::os::unix::fs::symlink(&target, &link).map_err(|source| Error::Io {
                action: "link",
                path: link,
                source,
            })?;
        }
    }
    Ok(())
}

/// Binds `bind.path` at the same path inside; read-only unless writable, and then never
/// executable; never set-user-id or device nodes.
fn place_bind(root: &Path, bind: &Bind) -> Result<(), Error> {
    let target = inside(root, &bind.path);
    let meta = std::fs::metadata(&bind.path).map_err(|source| Error::Io {
        action: "bind",
        path: bind.path.clone(),
        source,
    })?;
    if let Some(parent) = target.parent() {
        create_dir(parent)?;
    }
    if meta.is_dir() {
        create_dir(&target)?;
    } else {
        std::fs::File::create(&target).map_err(|source| Error::Io {
            action: "create the bind target",
            path: target.clone(),
            source,
        })?;
    }
    mount(Some(&bind.path), &target, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
        .map_err(mount_err("bind", &bind.path))?;
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    flags |= if bind.writable { MsFlags::MS_NOEXEC } else { MsFlags::MS_RDONLY };
    mount(None::<&str>, &target, None::<&str>, flags, None::<&str>)
        .map_err(mount_err("restrict the bind of", &bind.path))
}

/// The library's file, bound read-only at its own path, and a link to it where the loader looks
/// for it through a link of the host's (libc.so.6 -> libc-2.36.so, say).
fn place_library(root: &Path, library: &Library) -> Result<(), Error> {
    place_bind(root, &Bind { path: library.file.clone(), writable: false })?;
    let Some(link) = library.link() else { return Ok(()) };
    let inside_link = inside(root, &link);
    if std::fs::symlink_metadata(&inside_link).is_ok() {
        return Ok(());
    }
    if let Some(parent) = inside_link.parent() {
        create_dir(parent)?;
    }
    std::os::unix::fs::symlink(&library.file, &inside_link).map_err(|source| Error::Io {
        action: "link",
        path: inside_link,
        source,
    })
}

/// The common nodes, and the helper's own /dev/kvm and /dev/net/tun (readable by it alone).
fn make_devices(root: &Path, spec: &JailSpec) -> Result<(), Error> {
    for host in COMMON_DEVICES {
        let node = copy_device_node(root, Path::new(host))?;
        set_mode(&node, 0o666)?;
    }
    for device in &spec.devices {
        let node = copy_device_node(root, Path::new(device.path()))?;
        let (uid, gid) = (Uid::from_raw(spec.uid), Gid::from_raw(spec.gid));
        chown(&node, Some(uid), Some(gid)).map_err(|source| Error::Device { path: node.clone(), source })?;
        set_mode(&node, 0o600)?;
    }
    Ok(())
}

/// A character device inside with the host node's numbers (a bind would carry the host's owner).
fn copy_device_node(root: &Path, host: &Path) -> Result<PathBuf, Error> {
    let meta = std::fs::metadata(host).map_err(|source| Error::Io {
        action: "find the device",
        path: host.to_path_buf(),
        source,
    })?;
    let node = inside(root, host);
    if let Some(parent) = node.parent() {
        create_dir(parent)?;
    }
    let rdev = meta.rdev();
    mknod(&node, SFlag::S_IFCHR, Mode::from_bits_truncate(0o600), makedev(major(rdev), minor(rdev)))
        .map_err(|source| Error::Device { path: node.clone(), source })?;
    Ok(node)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), Error> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| Error::Io {
        action: "set the mode of",
        path: path.to_path_buf(),
        source,
    })
}

/// pivot_root(".", ".") stacks the old root on the new one; detaching it leaves only the jail.
fn pivot_into(root: &Path) -> Result<(), Error> {
    nix::unistd::chdir(root).map_err(mount_err("enter", root))?;
    pivot_root(".", ".").map_err(mount_err("pivot_root into", root))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(mount_err("detach the host's root from", root))?;
    nix::unistd::chdir("/").map_err(mount_err("enter", Path::new("/")))?;
    let read_only = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID;
    mount(None::<&str>, "/", None::<&str>, read_only, Some(ROOT_TMPFS_OPTIONS))
        .map_err(mount_err("make read-only the jail's root", Path::new("/")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Device;

    #[test]
    fn paths_inside_are_the_host_paths_below_the_root() {
        assert_eq!(inside(Path::new("/run/j"), Path::new("/usr/bin/qemu")), Path::new("/run/j/usr/bin/qemu"));
        assert_eq!(inside(Path::new("/run/j"), Path::new("/dev/net/tun")), Path::new("/run/j/dev/net/tun"));
    }

    #[test]
    fn the_devices_inside_are_where_they_are_on_the_host() {
        assert_eq!(Device::Kvm.path(), "/dev/kvm");
        assert_eq!(Device::Tun.path(), "/dev/net/tun");
    }
}
