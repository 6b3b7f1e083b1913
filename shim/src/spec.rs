//! The bundle's OCI runtime spec, read as oci-spec's typed `Spec`, and what the shim takes from it:
//! annotations, the guest's hostname, the task's place in a pod. (Its mounts of host paths are
//! `resources::volumes`' business.)

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{Process, Spec};

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

/// containerd's CRI plugin marks each task's place in its pod with these annotations.
pub const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";

/// A task's place in a pod, from the CRI annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodRole {
    /// No CRI annotations (`ctr run`): a VM of its own.
    Standalone,
    /// A pod's sandbox (pause) container: it boots the pod's VM.
    Sandbox,
    /// A container of the pod whose sandbox is `sandbox_id`: it joins that VM.
    Container { sandbox_id: String },
}

pub fn pod_role(spec: &Spec) -> PodRole {
    let annotations = spec.annotations().as_ref();
    let get = |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str);
    match (get(CONTAINER_TYPE_ANNOTATION), get(SANDBOX_ID_ANNOTATION)) {
        (Some("sandbox"), _) => PodRole::Sandbox,
        (Some("container"), Some(sandbox_id)) if !sandbox_id.is_empty() => {
            PodRole::Container { sandbox_id: sandbox_id.to_string() }
        }
        _ => PodRole::Standalone,
    }
}

/// The shim a task belongs to (containerd-shim's grouping): a pod's container joins its
/// sandbox's shim, everything else has its own.
pub fn shim_grouping(spec: &Spec, id: &str) -> String {
    match pod_role(spec) {
        PodRole::Container { sandbox_id } => sandbox_id,
        PodRole::Sandbox | PodRole::Standalone => id.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Spec {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn cri_annotations_place_a_task_in_its_pod() {
        let annotated =
            |pairs: serde_json::Value| spec(serde_json::json!({"ociVersion": "1.0.2", "annotations": pairs}));
        let sandbox =
            annotated(serde_json::json!({CONTAINER_TYPE_ANNOTATION: "sandbox", SANDBOX_ID_ANNOTATION: "p1"}));
        let member = annotated(
            serde_json::json!({CONTAINER_TYPE_ANNOTATION: "container", SANDBOX_ID_ANNOTATION: "p1"}),
        );
        let orphan = annotated(serde_json::json!({CONTAINER_TYPE_ANNOTATION: "container"}));
        let plain = spec(serde_json::json!({"ociVersion": "1.0.2"}));
        assert_eq!(pod_role(&sandbox), PodRole::Sandbox);
        assert_eq!(pod_role(&member), PodRole::Container { sandbox_id: "p1".into() });
        assert_eq!(pod_role(&orphan), PodRole::Standalone);
        assert_eq!(pod_role(&plain), PodRole::Standalone);
        assert_eq!(shim_grouping(&member, "c1"), "p1");
        assert_eq!(shim_grouping(&sandbox, "p1"), "p1");
        assert_eq!(shim_grouping(&plain, "t1"), "t1");
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
