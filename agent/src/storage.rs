//! File systems for containers: a virtio-blk disk is found by its serial (never by probe order),
//! the host's shared directory by its virtio-fs tag, and mounted where the request says; a tmpfs
//! (a pod's /dev/shm) is made new.

use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Where the kernel lists block devices and their virtio serials.
const SYS_BLOCK: &str = "/sys/block";
/// virtio-blk serials are at most 20 bytes.
const MAX_SERIAL_LEN: usize = 20;
/// virtio-fs tags are at most 36 bytes (the device's config space).
const MAX_TAG_LEN: usize = 36;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("mount point {0:?} must be an absolute path without '..'")]
    BadMountPoint(String),
    #[error("serial {0:?} is empty or longer than 20 bytes")]
    BadSerial(String),
    #[error("no block device has the serial {0:?}")]
    NoSuchDisk(String),
    #[error("virtio-fs tag {0:?} is empty, longer than 36 bytes or holds a NUL or comma")]
    BadTag(String),
    #[error("cannot create the mount point {path}")]
    MountPoint {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot mount {device} ({fstype}) on {path}")]
    Mount {
        device: PathBuf,
        fstype: String,
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// A read-only root file system made writable: an overlay at `<scratch>/merged` whose upper and work
/// directories live on a tmpfs mounted at `scratch`. The returned mounts come off in their order.
pub fn mount_writable_overlay(lower: &Path, scratch: &Path) -> Result<(PathBuf, Vec<Mounted>), Error> {
    let dir_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::MountPoint { path, source }
    };
    std::fs::create_dir_all(scratch).map_err(dir_err(scratch))?;
    mount(Some("tmpfs"), scratch, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755"))
        .map_err(|source| Error::Mount {
        device: "tmpfs".into(),
        fstype: "tmpfs".into(),
        path: scratch.to_path_buf(),
        source,
    })?;
    let tmpfs = Mounted { path: scratch.to_path_buf() };
    let merged = scratch.join("merged");
    let (upper, work) = (scratch.join("upper"), scratch.join("work"));
    for dir in [&merged, &upper, &work] {
        if let Err(err) = std::fs::create_dir(dir).map_err(dir_err(dir)) {
            tmpfs.unmount();
            return Err(err);
        }
    }
    let options =
        format!("lowerdir={},upperdir={},workdir={}", lower.display(), upper.display(), work.display());
    if let Err(source) =
        mount(Some("overlay"), &merged, Some("overlay"), MsFlags::empty(), Some(options.as_str()))
    {
        tmpfs.unmount();
        return Err(Error::Mount {
            device: lower.to_path_buf(),
            fstype: "overlay".into(),
            path: merged,
            source,
        });
    }
    Ok((merged.clone(), vec![Mounted { path: merged }, tmpfs]))
}

/// What a request asks to have mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageRequest {
    pub serial: String,
    /// The virtio-fs tag for fstype "virtiofs".
    pub source: String,
    pub fstype: String,
    pub options: Vec<String>,
    pub mount_point: String,
    pub read_only: bool,
}

/// A mount made for a container, undone when it is removed.
#[derive(Debug)]
pub struct Mounted {
    pub path: PathBuf,
}

impl Mounted {
    pub fn unmount(self) {
        // Lazily: a process that still holds it must not keep the container from going away.
        let _ = umount2(&self.path, MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&self.path);
    }
}

pub fn validate_mount_point(path: &str) -> Result<PathBuf, Error> {
    let candidate = Path::new(path);
    let clean = candidate.is_absolute() && candidate.components().all(|c| !matches!(c, Component::ParentDir));
    if clean && candidate != Path::new("/") {
        Ok(candidate.to_path_buf())
    } else {
        Err(Error::BadMountPoint(path.into()))
    }
}

/// The /dev node of the disk whose serial is `serial`, looked up under `sys_block`.
pub fn find_disk(sys_block: &Path, serial: &str) -> Result<PathBuf, Error> {
    if serial.is_empty() || serial.len() > MAX_SERIAL_LEN {
        return Err(Error::BadSerial(serial.into()));
    }
    let entries = std::fs::read_dir(sys_block).map_err(|_| Error::NoSuchDisk(serial.into()))?;
    for entry in entries.flatten() {
        let found = std::fs::read_to_string(entry.path().join("serial")).unwrap_or_default();
        if found.trim_end_matches(['\n', '\0']) == serial {
            return Ok(Path::new("/dev").join(entry.file_name()));
        }
    }
    Err(Error::NoSuchDisk(serial.into()))
}

/// What the kernel mounts for a request: the shared directory's tag, "tmpfs", or the disk.
fn storage_device(request: &StorageRequest) -> Result<PathBuf, Error> {
    match request.fstype.as_str() {
        "virtiofs" => validate_tag(&request.source).map(PathBuf::from),
        "tmpfs" => Ok(PathBuf::from("tmpfs")),
        _ => find_disk(Path::new(SYS_BLOCK), &request.serial),
    }
}

pub fn validate_tag(tag: &str) -> Result<&str, Error> {
    if tag.is_empty() || tag.len() > MAX_TAG_LEN || tag.contains(['\0', ',']) {
        return Err(Error::BadTag(tag.into()));
    }
    Ok(tag)
}

pub fn mount_storage(request: &StorageRequest) -> Result<Mounted, Error> {
    let path = validate_mount_point(&request.mount_point)?;
    let device = storage_device(request)?;
    std::fs::create_dir_all(&path).map_err(|source| Error::MountPoint { path: path.clone(), source })?;
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if request.read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    let options = request.options.join(",");
    let data = (!options.is_empty()).then_some(options.as_str());
    mount(Some(&device), &path, Some(request.fstype.as_str()), flags, data).map_err(|source| {
        Error::Mount { device, fstype: request.fstype.clone(), path: path.clone(), source }
    })?;
    Ok(Mounted { path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_must_be_absolute_and_stay_put() {
        assert!(validate_mount_point("/run/ironclad/rootfs/c1").is_ok());
        for bad in ["relative/path", "/run/../etc", "/", ""] {
            assert!(matches!(validate_mount_point(bad), Err(Error::BadMountPoint(_))), "{bad:?}");
        }
    }

    #[test]
    fn disks_are_found_by_serial_not_by_order() {
        let dir = tempfile::tempdir().unwrap();
        for (name, serial) in [("vda", "scratch\n"), ("vdb", "rootfs\n")] {
            std::fs::create_dir_all(dir.path().join(name)).unwrap();
            std::fs::write(dir.path().join(name).join("serial"), serial).unwrap();
        }
        std::fs::create_dir_all(dir.path().join("loop0")).unwrap();
        assert_eq!(find_disk(dir.path(), "rootfs").unwrap(), Path::new("/dev/vdb"));
        assert!(matches!(find_disk(dir.path(), "other"), Err(Error::NoSuchDisk(_))));
        assert!(matches!(find_disk(dir.path(), ""), Err(Error::BadSerial(_))));
        assert!(matches!(find_disk(dir.path(), &"s".repeat(21)), Err(Error::BadSerial(_))));
    }

    #[test]
    fn shared_directories_are_named_by_a_plain_tag_and_tmpfs_needs_no_device() {
        let request = |fstype: &str, source: &str| StorageRequest {
            serial: String::new(),
            source: source.into(),
            fstype: fstype.into(),
            options: vec![],
            mount_point: "/run/ironclad/share".into(),
            read_only: false,
        };
        assert_eq!(storage_device(&request("virtiofs", "ironclad")).unwrap(), Path::new("ironclad"));
        assert_eq!(storage_device(&request("tmpfs", "")).unwrap(), Path::new("tmpfs"));
        for bad in ["", "a,b", "nul\0", &"t".repeat(37)] {
            assert!(matches!(storage_device(&request("virtiofs", bad)), Err(Error::BadTag(_))), "{bad:?}");
        }
        assert!(matches!(storage_device(&request("ext4", "")), Err(Error::BadSerial(_))));
    }
}
