//! The one place that decides where a sandbox's files live on the host.

use std::path::{Path, PathBuf};

/// Where sandboxes live unless told otherwise.
pub const DEFAULT_RUN_ROOT: &str = "/run/ironclad";

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
