//! The one place that decides where the agent keeps its state inside the guest.

use std::path::{Path, PathBuf};

/// Where the agent keeps container bundles and libcontainer's state, unless told otherwise.
pub const DEFAULT_STATE_ROOT: &str = "/run/ironclad/agent";

#[derive(Debug, Clone)]
pub struct AgentPaths {
    root: PathBuf,
}

impl AgentPaths {
    pub fn new(root: &Path) -> Self {
        AgentPaths {
            root: root.to_path_buf(),
        }
    }

    /// The OCI bundle (config.json) of one container.
    pub fn bundle(&self, container_id: &str) -> PathBuf {
        self.root.join("bundles").join(container_id)
    }

    /// The container's cgroup, below the guest's cgroup v2 root. The agent decides it: the path in a
    /// spec from the host means nothing inside the guest.
    pub fn cgroup(&self, container_id: &str) -> PathBuf {
        Path::new("/ironclad").join(container_id)
    }

    /// Files the host copies in (CopyFile) for containers to bind-mount.
    pub fn shared(&self) -> PathBuf {
        self.root.join("shared")
    }

    /// libcontainer's own state directory.
    pub fn libcontainer_root(&self) -> PathBuf {
        self.root.join("libcontainer")
    }
}
