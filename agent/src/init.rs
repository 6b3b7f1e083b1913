//! PID 1 duties: the guest's file system skeleton, cgroup v2 controllers, logging and ending the VM.

use std::fs;
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create mount point {path}")]
    MountPoint {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot mount {fstype} on {target}")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("cannot enable cgroup v2 controllers {controllers:?}")]
    Controllers {
        controllers: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no vsock device: the host could never reach the agent (the guest's vsock CID is {cid:#x})")]
    NoVsockDevice { cid: u32 },
    #[error("cannot ask /dev/vsock for the guest's vsock CID")]
    VsockCid(#[source] std::io::Error),
    #[error("cannot link {link} to {target}")]
    Symlink {
        link: &'static str,
        target: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// One file system the guest needs before anything else runs.
struct GuestMount {
    fstype: &'static str,
    target: &'static str,
    flags: MsFlags,
    data: &'static str,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV).union(MsFlags::MS_NOEXEC);

/// In mount order: a mount point must exist on the file system mounted before it.
const GUEST_MOUNTS: &[GuestMount] = &[
    GuestMount { fstype: "proc", target: "/proc", flags: NOSUID_NODEV_NOEXEC, data: "" },
    GuestMount { fstype: "sysfs", target: "/sys", flags: NOSUID_NODEV_NOEXEC, data: "" },
    GuestMount { fstype: "devtmpfs", target: "/dev", flags: MsFlags::MS_NOSUID, data: "mode=0755" },
    GuestMount {
        fstype: "devpts",
        target: "/dev/pts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: "newinstance,ptmxmode=0666,mode=0620,gid=5",
    },
    GuestMount {
        fstype: "tmpfs",
        target: "/dev/shm",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: "mode=1777",
    },
    GuestMount {
        fstype: "cgroup2",
        target: "/sys/fs/cgroup",
        flags: NOSUID_NODEV_NOEXEC,
        data: "nsdelegate",
    },
    GuestMount {
        fstype: "tmpfs",
        target: "/run",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: "mode=0755",
    },
    GuestMount {
        fstype: "tmpfs",
        target: "/tmp",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: "mode=1777",
    },
];

/// The cgroup v2 controllers containers get limits from; freezing is built into cgroup v2 itself.
const CGROUP_CONTROLLERS: &[&str] = &["cpuset", "cpu", "io", "memory", "pids"];

/// Mounts the guest's pseudo file systems and enables the cgroup controllers for child cgroups.
pub fn prepare_guest() -> Result<(), Error> {
    for guest_mount in GUEST_MOUNTS {
        mount_one(guest_mount)?;
    }
    link_ptmx()?;
    enable_cgroup_controllers(Path::new("/sys/fs/cgroup"))?;
    Ok(())
}

fn mount_one(m: &GuestMount) -> Result<(), Error> {
    fs::create_dir_all(m.target)
        .map_err(|source| Error::MountPoint { path: PathBuf::from(m.target), source })?;
    let data = (!m.data.is_empty()).then_some(m.data);
    mount(Some(m.fstype), m.target, Some(m.fstype), m.flags, data).map_err(|source| Error::Mount {
        fstype: m.fstype,
        target: m.target,
        source,
    })
}

/// The guest's vsock CID, which only a vsock device gives it. Without one the agent would listen
/// where the host can never connect, and the sandbox would hang until the host gave up: that is a
/// fatal error, which resets the VM at once with the reason on the console.
pub fn require_vsock_device() -> Result<u32, Error> {
    use std::os::fd::AsRawFd;
    /// `_IO(7, 0xb9)`, linux/vm_sockets.h.
    const IOCTL_VM_SOCKETS_GET_LOCAL_CID: libc::c_ulong = 0x7b9;
    const VMADDR_CID_ANY: u32 = u32::MAX;
    let vsock = fs::File::open("/dev/vsock").map_err(Error::VsockCid)?;
    let mut cid: u32 = 0;
    // SAFETY: this ioctl writes one u32 through the pointer, which points at a live u32; the fd is
    // /dev/vsock, open for the call's duration.
    let ret = unsafe { libc::ioctl(vsock.as_raw_fd(), IOCTL_VM_SOCKETS_GET_LOCAL_CID, &mut cid) };
    if ret < 0 {
        return Err(Error::VsockCid(std::io::Error::last_os_error()));
    }
    if cid == VMADDR_CID_ANY {
        return Err(Error::NoVsockDevice { cid });
    }
    Ok(cid)
}

/// With a private devpts instance, /dev/ptmx must point into it.
fn link_ptmx() -> Result<(), Error> {
    const LINK: &str = "/dev/ptmx";
    const TARGET: &str = "pts/ptmx";
    let _ = fs::remove_file(LINK);
    std::os::unix::fs::symlink(TARGET, LINK).map_err(|source| Error::Symlink {
        link: LINK,
        target: TARGET,
        source,
    })
}

/// Turns on, for the cgroups below `root`, every wanted controller the kernel offers.
fn enable_cgroup_controllers(root: &Path) -> Result<(), Error> {
    let available = fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    let request = controllers_to_enable(&available);
    for missing in CGROUP_CONTROLLERS.iter().filter(|c| !available.split_whitespace().any(|a| a == **c)) {
        warn!("cgroup v2 controller {missing} is not offered by this kernel");
    }
    if request.is_empty() {
        return Ok(());
    }
    fs::write(root.join("cgroup.subtree_control"), &request)
        .map_err(|source| Error::Controllers { controllers: request.clone(), source })?;
    info!("cgroup v2 controllers enabled: {request}");
    Ok(())
}

/// The `cgroup.subtree_control` line enabling the wanted controllers found in `available`.
fn controllers_to_enable(available: &str) -> String {
    CGROUP_CONTROLLERS
        .iter()
        .filter(|c| available.split_whitespace().any(|a| a == **c))
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Logs go to stderr, which is the serial console when running as PID 1: warnings only unless
/// IRONCLAD_AGENT_LOG asks for more, so the console's one line from the agent is its ready line.
pub fn setup_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("IRONCLAD_AGENT_LOG")
        // libcontainer warns when the agent's reaper collected its intermediate process first,
        // which is expected and harmless here.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,libcontainer=error"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .try_init();
}

/// Ends the VM. Without ACPI there is no power-off, so PID 1 resets the machine: the kernel runs
/// with `reboot=k`, and both ironclad-vmm (i8042) and QEMU (`-no-reboot`) treat a reset as exit.
pub fn end_vm() -> ! {
    nix::unistd::sync();
    let err = reboot(RebootMode::RB_AUTOBOOT);
    eprintln!("ironclad-agent: reset failed: {err:?}");
    // Returning from PID 1 panics the kernel, which `panic=-1` turns into a reset as well.
    std::process::exit(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enables_only_offered_controllers_in_a_stable_order() {
        assert_eq!(controllers_to_enable("memory pids cpu misc"), "+cpu +memory +pids");
        assert_eq!(
            controllers_to_enable("cpuset cpu io memory hugetlb pids rdma"),
            "+cpuset +cpu +io +memory +pids"
        );
        assert_eq!(controllers_to_enable(""), "");
    }

    #[test]
    fn error_chain_names_every_cause() {
        let err = Error::Controllers {
            controllers: "+cpu".into(),
            source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied"),
        };
        assert_eq!(
            ironclad_protocol::error_chain(&err),
            "cannot enable cgroup v2 controllers \"+cpu\": denied"
        );
    }

    #[test]
    fn guest_mounts_come_after_the_mounts_they_sit_on() {
        for (i, m) in GUEST_MOUNTS.iter().enumerate() {
            for (j, other) in GUEST_MOUNTS.iter().enumerate() {
                if other.target != m.target && Path::new(m.target).starts_with(other.target) {
                    assert!(j < i, "{} is mounted before {}, which it sits on", m.target, other.target);
                }
            }
        }
    }
}
