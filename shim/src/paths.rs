//! The one place that decides where a sandbox's files live on the host.

use std::path::{Path, PathBuf};

/// Where sandboxes live unless told otherwise.
pub const DEFAULT_RUN_ROOT: &str = "/run/ironclad";

/// The longest task id used as it is for its task directory. The VM's Unix sockets live below
/// that directory and a socket path has at most 107 bytes; CRI's ids have 64.
const MAX_PLAIN_DIR_NAME: usize = 24;

/// The task directory's name: the task id, or for a long one its first 12 characters and 12 hex
/// digits of its sha256 (unique for ids that share a beginning).
pub fn task_dir_name(id: &str) -> String {
    if id.len() <= MAX_PLAIN_DIR_NAME {
        return id.to_string();
    }
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(id.as_bytes());
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    let start: String = id.chars().take(12).collect();
    format!("{start}-{hex}")
}

/// The files of one sandbox VM: sockets and the VM description under `<run root>/<sandbox id>/`,
/// the console log there too unless it is placed elsewhere (the shim keeps it off tmpfs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxPaths {
    dir: PathBuf,
    console_log: PathBuf,
}

impl SandboxPaths {
    pub fn new(run_root: &Path, sandbox_id: &str) -> Self {
        let dir = run_root.join(sandbox_id);
        SandboxPaths { console_log: dir.join("console.log"), dir }
    }

    pub fn with_console_log(mut self, path: PathBuf) -> Self {
        self.console_log = path;
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The hybrid-vsock Unix socket: host clients connect here and send `CONNECT <port>\n`.
    pub fn agent_socket(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }

    /// The vhost-user socket between QEMU and vhost-device-vsock.
    pub fn vhost_vsock_socket(&self) -> PathBuf {
        self.dir.join("vhost-vsock.sock")
    }

    /// The vhost-user socket between QEMU and virtiofsd (the shared directory).
    pub fn virtiofs_socket(&self) -> PathBuf {
        self.dir.join("virtiofs.sock")
    }

    /// What the guest wrote to its serial console (capped, see hypervisor::console).
    pub fn console_log(&self) -> PathBuf {
        self.console_log.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_task_ids_get_short_distinct_directory_names() {
        assert_eq!(task_dir_name("echo1"), "echo1");
        let (a, b) = ("7200c5b39492".repeat(5) + "aaaa", "7200c5b39492".repeat(5) + "aaab");
        let (name_a, name_b) = (task_dir_name(&a), task_dir_name(&b));
        assert_ne!(name_a, name_b);
        assert!(name_a.starts_with("7200c5b39492-") && name_a.len() == 25, "{name_a}");
    }

    #[test]
    fn every_path_is_inside_the_sandbox_dir() {
        let paths = SandboxPaths::new(Path::new("/run/ironclad"), "sb1");
        assert_eq!(paths.dir(), Path::new("/run/ironclad/sb1"));
        for path in
            [paths.agent_socket(), paths.vhost_vsock_socket(), paths.virtiofs_socket(), paths.console_log()]
        {
            assert_eq!(path.parent(), Some(paths.dir()));
        }
    }
}
