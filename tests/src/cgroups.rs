//! Finding and clearing away cgroups that tests and benchmarks made, in whichever cgroup file
//! systems a process sees: the cgroup2 mount of an agent's own mount namespace, or the host's v1
//! hierarchies.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The mount points of every cgroup (v1) and cgroup2 file system in a mountinfo text.
pub fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (fields, after) = line.split_once(" - ")?;
            let is_cgroup = matches!(after.split(' ').next(), Some("cgroup" | "cgroup2"));
            let mount_point = fields.split(' ').nth(4)?;
            is_cgroup.then(|| PathBuf::from(mount_point))
        })
        .collect()
}

/// Where `cgroup` (a path from the root of a cgroup tree) is in each cgroup file system that the
/// process `pid` sees, as paths reachable from here (through its /proc/PID/root).
pub fn dirs_seen_by(pid: u32, cgroup: &str) -> Vec<PathBuf> {
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
    let relative = cgroup.trim_start_matches('/');
    mount_points(&mountinfo)
        .into_iter()
        .map(|mount| Path::new(&format!("/proc/{pid}/root")).join(mount.strip_prefix("/").unwrap_or(&mount)))
        .map(|mount| mount.join(relative))
        .collect()
}

/// Removes the cgroup `parent` wherever `pid` sees it, after killing whatever still runs in the
/// cgroups below it (what a failed test or an interrupted benchmark left).
pub fn clear_away(pid: u32, parent: &str) {
    let parents = dirs_seen_by(pid, parent);
    let children: Vec<PathBuf> = parents
        .iter()
        .flat_map(|dir| std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()))
        .filter(|path| path.is_dir())
        .collect();
    // Every hierarchy first, then the removals: on cgroup v1 a process frozen in the freezer
    // hierarchy would keep the cgroups of the others busy.
    children.iter().for_each(|dir| thaw_and_kill(dir));
    children.iter().for_each(|dir| remove_once_empty(dir));
    for dir in parents {
        let _ = std::fs::remove_dir(dir);
    }
}

/// Thaws (a frozen process cannot act on SIGKILL) and SIGKILLs every process in the cgroup `dir`.
fn thaw_and_kill(dir: &Path) {
    let _ = std::fs::write(dir.join("cgroup.freeze"), "0");
    let _ = std::fs::write(dir.join("freezer.state"), "THAWED");
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines().filter_map(|l| l.parse().ok()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
    }
}

/// Removes the cgroup `dir`, waiting a little for its killed processes to be gone.
fn remove_once_empty(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::remove_dir(dir).is_err() && dir.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_mounts_of_both_versions_are_found_and_nothing_else() {
        let mountinfo = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                         35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
                         41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                         50 23 0:40 / /proc rw - proc proc rw\n";
        assert_eq!(
            mount_points(mountinfo),
            vec![PathBuf::from("/sys/fs/cgroup/memory"), PathBuf::from("/sys/fs/cgroup/unified")]
        );
    }

    #[test]
    fn a_cgroup_is_looked_for_through_the_processes_root() {
        let pid = std::process::id();
        for dir in dirs_seen_by(pid, "/ironclad-x/c1") {
            let text = dir.display().to_string();
            assert!(
                text.starts_with(&format!("/proc/{pid}/root/")) && text.ends_with("/ironclad-x/c1"),
                "{text}"
            );
        }
    }
}
