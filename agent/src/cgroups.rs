//! Where the agent's cgroups are in the file system. In the guest that is cgroup v2, mounted and
//! set up by `init`. An agent run by hand follows its host instead, as libcgroups (which applies
//! the limits) does: a host that keeps its controllers on cgroup v1 (legacy, or hybrid with an empty
//! v2 tree beside them) gets its containers' cgroups in every v1 hierarchy.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use libcgroups::common::{CgroupSetup, DEFAULT_CGROUP_ROOT};
use libcgroups::v1::ControllerType;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot tell how cgroups are set up below {DEFAULT_CGROUP_ROOT}")]
    Setup(#[source] libcgroups::common::GetCgroupSetupError),
    #[error("cannot find the cgroup v1 hierarchies in the mount table")]
    V1Mounts(#[source] libcgroups::v1::util::V1MountPointError),
    #[error("the cgroup v1 memory controller is not mounted: containers could not get memory limits")]
    NoV1Memory,
}

/// The cgroup file systems the agent's cgroups go into.
#[derive(Debug, Clone)]
pub enum Layout {
    /// One cgroup v2 tree with every controller (the guest).
    Unified { root: PathBuf },
    /// Cgroup v1 hierarchies, one per controller or per group of co-mounted ones (some hosts).
    V1 { hierarchies: BTreeSet<PathBuf>, memory: PathBuf },
}

impl Layout {
    /// The layout of this system's `/sys/fs/cgroup`.
    pub fn detect() -> Result<Self, Error> {
        match libcgroups::common::get_cgroup_setup().map_err(Error::Setup)? {
            CgroupSetup::Unified => Ok(Layout::Unified { root: DEFAULT_CGROUP_ROOT.into() }),
            CgroupSetup::Legacy | CgroupSetup::Hybrid => {
                let mounts = libcgroups::v1::util::list_supported_mount_points().map_err(Error::V1Mounts)?;
                let memory = mounts.get(&ControllerType::Memory).cloned().ok_or(Error::NoV1Memory)?;
                Ok(Layout::V1 { hierarchies: mounts.into_values().collect(), memory })
            }
        }
    }

    /// Every directory that makes up `cgroup` (a path as the agent names it, from the root of the
    /// tree): one on cgroup v2, one per hierarchy on v1.
    pub fn dirs(&self, cgroup: &Path) -> Vec<PathBuf> {
        let relative = cgroup.strip_prefix("/").unwrap_or(cgroup);
        match self {
            Layout::Unified { root } => vec![root.join(relative)],
            Layout::V1 { hierarchies, .. } => hierarchies.iter().map(|mount| mount.join(relative)).collect(),
        }
    }

    /// The cgroup v2 directory of `cgroup`; None on v1.
    pub fn unified_dir(&self, cgroup: &Path) -> Option<PathBuf> {
        match self {
            Layout::Unified { .. } => self.dirs(cgroup).into_iter().next(),
            Layout::V1 { .. } => None,
        }
    }

    /// The file whose `oom_kill` line counts the OOM kills in `cgroup`.
    pub fn oom_kill_file(&self, cgroup: &Path) -> PathBuf {
        let relative = cgroup.strip_prefix("/").unwrap_or(cgroup);
        match self {
            Layout::Unified { root } => root.join(relative).join("memory.events"),
            Layout::V1 { memory, .. } => memory.join(relative).join("memory.oom_control"),
        }
    }

    /// Creates `cgroup` wherever it has to exist, leaving what is there.
    pub fn create(&self, cgroup: &Path) -> std::io::Result<()> {
        self.dirs(cgroup).iter().try_for_each(std::fs::create_dir_all)
    }
}

/// The OOM-kill count in a memory.events (v2) or memory.oom_control (v1) file; None once the cgroup
/// is gone or where the memory controller is off.
pub fn oom_kills(file: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|l| l.strip_prefix("oom_kill ")).and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v1() -> Layout {
        let hierarchies = BTreeSet::from(["/cg/memory".into(), "/cg/pids".into()]);
        Layout::V1 { hierarchies, memory: "/cg/memory".into() }
    }

    #[test]
    fn a_v2_cgroup_is_one_directory_with_memory_events() {
        let layout = Layout::Unified { root: "/sys/fs/cgroup".into() };
        assert_eq!(layout.dirs(Path::new("/ironclad/c1")), vec![PathBuf::from("/sys/fs/cgroup/ironclad/c1")]);
        assert_eq!(layout.unified_dir(Path::new("/ironclad/c1")), Some("/sys/fs/cgroup/ironclad/c1".into()));
        assert_eq!(
            layout.oom_kill_file(Path::new("/ironclad/c1")),
            PathBuf::from("/sys/fs/cgroup/ironclad/c1/memory.events")
        );
    }

    #[test]
    fn a_v1_cgroup_is_a_directory_per_hierarchy_with_the_oom_count_in_oom_control() {
        let layout = v1();
        assert_eq!(
            layout.dirs(Path::new("/ironclad/c1")),
            vec![PathBuf::from("/cg/memory/ironclad/c1"), PathBuf::from("/cg/pids/ironclad/c1")]
        );
        assert_eq!(layout.unified_dir(Path::new("/ironclad/c1")), None);
        assert_eq!(
            layout.oom_kill_file(Path::new("/ironclad/c1")),
            PathBuf::from("/cg/memory/ironclad/c1/memory.oom_control")
        );
    }

    #[test]
    fn the_oom_kill_count_is_read_from_either_file_and_absent_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let events = dir.path().join("memory.events");
        std::fs::write(&events, "low 0\nhigh 0\nmax 4\noom 1\noom_kill 2\n").unwrap();
        let control = dir.path().join("memory.oom_control");
        std::fs::write(&control, "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n").unwrap();
        assert_eq!(oom_kills(&events), Some(2));
        assert_eq!(oom_kills(&control), Some(3));
        assert_eq!(oom_kills(&dir.path().join("gone")), None);
    }
}
