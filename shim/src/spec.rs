//! The bundle's OCI runtime spec, read as oci-spec's typed `Spec`, and what the shim takes from it:
//! annotations, the guest's hostname, the bind mounts of host files and directories.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{Mount, Process, Spec};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the OCI spec {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: oci_spec::OciSpecError,
    },
    #[error("the exec process is not an OCI process object (JSON)")]
    ExecProcess(#[source] serde_json::Error),
    #[error("cannot encode the OCI spec for the agent")]
    Encode(#[source] serde_json::Error),
    #[error(
        "bind mount of host directory {host} on {destination} is not supported: ironclad has no \
         shared file system between host and guest"
    )]
    HostDirectory { host: PathBuf, destination: PathBuf },
    #[error("bind mount source {host} on {destination} is neither a file nor a directory")]
    NotFileOrDirectory { host: PathBuf, destination: PathBuf },
    #[error("bind mount source {host} on {destination}")]
    BindSource {
        host: PathBuf,
        destination: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `<bundle>/config.json`.
pub fn read(bundle: &Path) -> Result<Spec, Error> {
    let path = bundle.join("config.json");
    Spec::load(&path).map_err(|source| Error::Read { path, source })
}

/// The JSON the agent takes.
pub fn to_json(spec: &Spec) -> Result<String, Error> {
    serde_json::to_string(spec).map_err(Error::Encode)
}

/// An exec's process as containerd sends it (JSON), checked to be an OCI process.
pub fn exec_process(json: &[u8]) -> Result<String, Error> {
    let process: Process = serde_json::from_slice(json).map_err(Error::ExecProcess)?;
    serde_json::to_string(&process).map_err(Error::Encode)
}

pub fn annotations(spec: &Spec) -> HashMap<String, String> {
    spec.annotations().clone().unwrap_or_default()
}

/// The spec's hostname, else the task id where that is a valid host name (as Docker names
/// containers), else "ironclad".
pub fn guest_hostname(spec: &Spec, id: &str) -> String {
    if let Some(hostname) = spec.hostname().as_deref().filter(|h| !h.is_empty()) {
        return hostname.to_string();
    }
    let valid = !id.is_empty()
        && id.len() <= 63
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !id.starts_with('-')
        && !id.ends_with('-');
    if valid {
        id.to_string()
    } else {
        "ironclad".to_string()
    }
}

/// A bind mount: type `bind`, or `bind`/`rbind` among the options.
pub fn is_bind(mount: &Mount) -> bool {
    mount.typ().as_deref() == Some("bind")
        || mount.options().as_ref().is_some_and(|o| o.iter().any(|v| v == "bind" || v == "rbind"))
}

/// The indexes of the spec's bind mounts of host files, which are copied into the guest. A bind
/// mount of a host directory cannot be honoured (there is no shared file system yet).
pub fn host_file_mounts(spec: &Spec) -> Result<Vec<usize>, Error> {
    let mut files = Vec::new();
    for (index, mount) in spec.mounts().iter().flatten().enumerate() {
        if !is_bind(mount) {
            continue;
        }
        let host = mount.source().clone().unwrap_or_default();
        let destination = mount.destination().clone();
        match std::fs::metadata(&host) {
            Ok(meta) if meta.is_file() => files.push(index),
            Ok(meta) if meta.is_dir() => return Err(Error::HostDirectory { host, destination }),
            Ok(_) => return Err(Error::NotFileOrDirectory { host, destination }),
            Err(source) => return Err(Error::BindSource { host, destination, source }),
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Spec {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn host_files_are_copied_and_host_directories_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("resolv.conf");
        std::fs::write(&file, "nameserver 10.0.0.1\n").unwrap();
        let with_file = spec(serde_json::json!({"ociVersion": "1.0.2", "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/resolv.conf", "type": "bind", "source": file, "options": ["rbind", "ro"]},
        ]}));
        assert_eq!(host_file_mounts(&with_file).unwrap(), vec![1]);
        let with_dir = spec(serde_json::json!({"ociVersion": "1.0.2", "mounts": [
            {"destination": "/data", "type": "bind", "source": dir.path(), "options": ["rbind"]},
        ]}));
        let err = host_file_mounts(&with_dir).unwrap_err().to_string();
        assert!(err.contains(&dir.path().display().to_string()) && err.contains("/data"), "{err}");
        let missing = spec(serde_json::json!({"ociVersion": "1.0.2", "mounts": [
            {"destination": "/x", "source": "/nonexistent/ironclad", "options": ["bind"]},
        ]}));
        assert!(matches!(host_file_mounts(&missing), Err(Error::BindSource { .. })));
    }

    #[test]
    fn the_guest_is_named_by_the_spec_else_by_a_usable_task_id() {
        let named = spec(serde_json::json!({"ociVersion": "1.0.2", "hostname": "web"}));
        let unnamed = spec(serde_json::json!({"ociVersion": "1.0.2"}));
        let empty = spec(serde_json::json!({"ociVersion": "1.0.2", "hostname": ""}));
        assert_eq!(guest_hostname(&named, "t1"), "web");
        assert_eq!(guest_hostname(&unnamed, "t1"), "t1");
        assert_eq!(guest_hostname(&empty, "a_b"), "ironclad");
        assert_eq!(guest_hostname(&unnamed, &"x".repeat(64)), "ironclad");
    }

    #[test]
    fn a_malformed_spec_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), r#"{"ociVersion": 5}"#).unwrap();
        let err = read(dir.path()).unwrap_err();
        assert!(matches!(&err, Error::Read { path, .. } if path.ends_with("config.json")), "{err}");
        assert!(matches!(read(&dir.path().join("none")), Err(Error::Read { .. })));
    }

    #[test]
    fn exec_processes_must_be_oci_processes() {
        let json = br#"{"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}}"#;
        let process: serde_json::Value = serde_json::from_str(&exec_process(json).unwrap()).unwrap();
        assert_eq!(process["args"][0], "sh");
        assert!(matches!(exec_process(b"{\"args\": 7}"), Err(Error::ExecProcess(_))));
        assert!(matches!(exec_process(b"not json"), Err(Error::ExecProcess(_))));
    }
}
