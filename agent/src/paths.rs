//! The one place that decides where the agent keeps its state inside the guest.

use std::path::{Path, PathBuf};

/// Where the agent keeps container bundles and libcontainer's state, unless told otherwise.
pub const DEFAULT_STATE_ROOT: &str = "/run/ironclad/agent";
/// The cgroup below which containers get theirs, unless told otherwise. In the guest the agent
/// owns the whole tree; agents run by hand on one host each need their own parent.
pub const DEFAULT_CGROUP_PARENT: &str = "/ironclad";

#[derive(Debug, Clone)]
pub struct AgentPaths {
    root: PathBuf,
    cgroup_parent: PathBuf,
}

impl AgentPaths {
    pub fn new(root: &Path, cgroup_parent: &Path) -> Self {
        AgentPaths { root: root.to_path_buf(), cgroup_parent: cgroup_parent.to_path_buf() }
    }

    /// The OCI bundle (config.json) of one container.
    pub fn bundle(&self, container_id: &str) -> PathBuf {
        self.root.join("bundles").join(container_id)
    }

    /// The container's cgroup, below the guest's cgroup v2 root. The agent decides it: the path in a
    /// spec from the host means nothing inside the guest.
    pub fn cgroup(&self, container_id: &str) -> PathBuf {
        self.cgroup_parent.join(container_id)
    }

    /// The cgroup every container's cgroup is created below.
    pub fn cgroup_parent(&self) -> &Path {
        &self.cgroup_parent
    }

    /// Files the host copies in (CopyFile) for containers to bind-mount.
    pub fn shared(&self) -> PathBuf {
        self.root.join("shared")
    }

    /// The tmpfs holding the writable layer of a container whose rootfs is read-only.
    pub fn overlay(&self, container_id: &str) -> PathBuf {
        self.root.join("overlay").join(container_id)
    }

    /// libcontainer's own state directory.
    pub fn libcontainer_root(&self) -> PathBuf {
        self.root.join("libcontainer")
    }
}
