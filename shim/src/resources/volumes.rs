//! The spec's mounts of host paths (emptyDir, configMap, secret, hostPath; resolv.conf, hosts,
//! hostname, the termination log) carried into the guest: each is bound into the sandbox's shared
//! directory (read-only where the mount says so) and the spec points at the guest's view, so that
//! writes from either side are seen by the other (a copy would miss a configMap update and the
//! termination log). A pod's /dev/shm is a tmpfs of the guest shared by the pod's containers, not
//! a host directory.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{Mount, Spec};

use super::share_fs::{self, Access, ShareFs};
use crate::spec::PodRole;

/// Where the pod's /dev/shm lives in the guest (a tmpfs the sandbox container mounts).
pub const GUEST_POD_SHM: &str = "/run/ironclad/pod-shm";
/// The size of that tmpfs: Kubernetes' default for /dev/shm.
pub const POD_SHM_OPTIONS: &str = "size=64m,mode=1777";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bind mount of {host} on {destination} needs the sandbox's shared directory, which it has not")]
    NoSharedDirectory { host: PathBuf, destination: PathBuf },
    #[error("bind mount source {host} on {destination} is neither a file nor a directory")]
    NotFileOrDirectory { host: PathBuf, destination: PathBuf },
    #[error("bind mount source {host} on {destination}")]
    BindSource {
        host: PathBuf,
        destination: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot share {host} with the guest")]
    Share {
        host: PathBuf,
        #[source]
        source: share_fs::Error,
    },
}

/// What kind of host path a mount brings in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Directory,
    /// The pod's /dev/shm (a host tmpfs that containerd's CRI made for runc).
    PodShm,
}

/// A mount of the spec (by index) that brings in a host path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Volume {
    pub index: usize,
    pub kind: Kind,
}

/// A bind mount: type `bind`, or `bind`/`rbind` among the options.
pub fn is_bind(mount: &Mount) -> bool {
    mount.typ().as_deref() == Some("bind")
        || mount.options().as_ref().is_some_and(|o| o.iter().any(|v| v == "bind" || v == "rbind"))
}

fn is_read_only(mount: &Mount) -> bool {
    mount.options().as_ref().is_some_and(|o| o.iter().any(|v| v == "ro"))
}

/// The spec's bind mounts of host paths, each with its kind. A source that is missing or neither a
/// file nor a directory is an error naming it.
pub fn classify(spec: &Spec, role: &PodRole) -> Result<Vec<Volume>, Error> {
    let mut volumes = Vec::new();
    for (index, mount) in spec.mounts().iter().flatten().enumerate() {
        if !is_bind(mount) {
            continue;
        }
        let destination = mount.destination().clone();
        if *role != PodRole::Standalone && destination == Path::new("/dev/shm") {
            volumes.push(Volume { index, kind: Kind::PodShm });
            continue;
        }
        let host = mount.source().clone().unwrap_or_default();
        let kind = match std::fs::metadata(&host) {
            Ok(meta) if meta.is_file() => Kind::File,
            Ok(meta) if meta.is_dir() => Kind::Directory,
            Ok(_) => return Err(Error::NotFileOrDirectory { host, destination }),
            Err(source) => return Err(Error::BindSource { host, destination, source }),
        };
        volumes.push(Volume { index, kind });
    }
    Ok(volumes)
}

/// Whether any of `volumes` needs the shared directory.
pub fn need_share(volumes: &[Volume]) -> bool {
    volumes.iter().any(|v| matches!(v.kind, Kind::File | Kind::Directory))
}

/// Points each volume's mount at the guest's view of it, bound into `share`.
pub fn attach(
    spec: &mut Spec,
    volumes: &[Volume],
    share: Option<&ShareFs>,
    container_id: &str,
) -> Result<(), Error> {
    let Some(mounts) = spec.mounts_mut().as_mut() else { return Ok(()) };
    for volume in volumes {
        let Some(mount) = mounts.get_mut(volume.index) else { continue };
        let host = mount.source().clone().unwrap_or_default();
        match (volume.kind, share) {
            (Kind::PodShm, _) => {
                mount.set_source(Some(PathBuf::from(GUEST_POD_SHM)));
            }
            (Kind::File | Kind::Directory, Some(share)) => {
                let access = if is_read_only(mount) { Access::ReadOnly } else { Access::ReadWrite };
                let name = entry_name(volume.index, &host);
                let guest = share
                    .bind(container_id, &name, &host, access)
                    .map_err(|source| Error::Share { host: host.clone(), source })?;
                mount.set_source(Some(guest));
            }
            (Kind::File | Kind::Directory, None) => {
                let destination = mount.destination().clone();
                return Err(Error::NoSharedDirectory { host, destination });
            }
        }
    }
    Ok(())
}

/// `<index>-<file name>`: unique within the container, and readable in the guest's listing.
fn entry_name(index: usize, host: &Path) -> String {
    let name = host.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "root".into());
    format!("{index}-{}", name.replace('/', "_"))
}

/// Whether `spec` has a mount that the role makes the pod's /dev/shm.
pub fn has_pod_shm(volumes: &[Volume]) -> bool {
    volumes.iter().any(|v| v.kind == Kind::PodShm)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Spec {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn host_files_and_directories_are_told_apart_and_missing_sources_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("resolv.conf");
        std::fs::write(&file, "nameserver 10.0.0.1\n").unwrap();
        let with = spec(serde_json::json!({"ociVersion": "1.0.2", "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/resolv.conf", "type": "bind", "source": file, "options": ["rbind", "ro"]},
            {"destination": "/data", "type": "bind", "source": dir.path(), "options": ["rbind"]},
            {"destination": "/dev/shm", "type": "bind", "source": dir.path(), "options": ["rbind"]},
        ]}));
        let standalone = classify(&with, &PodRole::Standalone).unwrap();
        assert_eq!(
            standalone,
            vec![
                Volume { index: 1, kind: Kind::File },
                Volume { index: 2, kind: Kind::Directory },
                Volume { index: 3, kind: Kind::Directory },
            ]
        );
        let in_pod = classify(&with, &PodRole::Sandbox).unwrap();
        assert_eq!(in_pod[2], Volume { index: 3, kind: Kind::PodShm });
        let missing = spec(serde_json::json!({"ociVersion": "1.0.2", "mounts": [
            {"destination": "/x", "source": "/nonexistent/ironclad", "options": ["bind"]},
        ]}));
        assert!(matches!(classify(&missing, &PodRole::Standalone), Err(Error::BindSource { .. })));
    }

    #[test]
    fn shm_is_the_guests_and_host_paths_need_the_share() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hosts");
        std::fs::write(&file, "127.0.0.1 localhost\n").unwrap();
        let mut with = spec(serde_json::json!({"ociVersion": "1.0.2", "mounts": [
            {"destination": "/dev/shm", "type": "bind", "source": dir.path(), "options": ["rbind"]},
        ]}));
        let volumes = classify(&with, &PodRole::Sandbox).unwrap();
        attach(&mut with, &volumes, None, "c1").unwrap();
        let shm = &with.mounts().as_ref().unwrap()[0];
        assert_eq!(shm.source().as_deref(), Some(Path::new(GUEST_POD_SHM)));

        let mut with_file = spec(serde_json::json!({"ociVersion": "1.0.2", "mounts": [
            {"destination": "/etc/hosts", "type": "bind", "source": file, "options": ["rbind", "ro"]},
        ]}));
        let volumes = classify(&with_file, &PodRole::Standalone).unwrap();
        assert!(need_share(&volumes));
        let err = attach(&mut with_file, &volumes, None, "c1").unwrap_err().to_string();
        assert!(err.contains(&file.display().to_string()) && err.contains("/etc/hosts"), "{err}");
    }

    #[test]
    fn entry_names_are_one_component() {
        assert_eq!(entry_name(3, Path::new("/var/lib/kubelet/pods/x/volumes/data")), "3-data");
        assert_eq!(entry_name(0, Path::new("/")), "0-root");
    }
}
