//! ironclad-jailer: the one way the shim starts a sandbox's helpers (QEMU, ironclad-vmm,
//! vhost-device-vsock, virtiofsd), after Firecracker's jailer. In order: wait until the shim has
//! put it into the sandbox's cgroup, new mount, PID, IPC and UTS namespaces, a fork so that the
//! helper is PID 1 of its namespace, a tmpfs root holding only what the helper needs and
//! `pivot_root` into it, resource limits, for a file server a user namespace of its own (the
//! sandbox's ids standing for the host's root there), every capability dropped (bar those a root
//! helper is told to keep), the sandbox's uid and gid, no_new_privs, and exec.

pub mod libraries;
pub mod privileges;
pub mod root;
pub mod spec;
pub mod supervisor;

use std::convert::Infallible;
use std::io::Read;
use std::os::unix::process::CommandExt;

use nix::sched::{unshare, CloneFlags};

pub use spec::{Args, JailSpec};

/// What the shim writes on the jailer's standard input once the jailer is in the sandbox's cgroup.
pub const GO: &[u8] = b"go\n";
/// The jailer's exit status when the jail could not be made (the helper's own statuses pass through).
pub const JAIL_FAILED: u8 = 125;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad jail")]
    Spec(#[from] spec::Error),
    #[error("cannot read the go-ahead on standard input")]
    ReadGo(#[source] std::io::Error),
    #[error("standard input closed without the go-ahead: the shim gave up on this helper")]
    NoGo,
    #[error("cannot put /dev/null on standard input")]
    Stdin(#[source] nix::Error),
    #[error("cannot hold the uid lock {path}")]
    UidLock {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot enter new mount, PID, IPC and UTS namespaces")]
    Unshare(#[source] nix::Error),
    #[error("cannot start the helper's process")]
    Supervisor(#[from] supervisor::Error),
    #[error("cannot build the jail's root")]
    Root(#[from] root::Error),
    #[error("cannot drop privileges")]
    Privileges(#[from] privileges::Error),
    #[error("cannot execute {program}")]
    Exec {
        program: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Makes the jail and executes the helper in it; returns only with the reason it could not.
pub fn run(spec: &JailSpec) -> Result<Infallible, Error> {
    wait_for_go()?;
    // Lives as long as the supervising parent; closed in the helper by its exec.
    let _uid_held = spec.uid_lock.as_deref().map(hold_uid).transpose()?;
    let namespaces = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS;
    unshare(namespaces).map_err(Error::Unshare)?;
    let id_maps = spec.user_namespace.then(|| supervisor::IdMaps {
        uid_map: spec::swapped_with_root(spec.uid),
        gid_map: spec::swapped_with_root(spec.gid),
    });
    let mut parent = supervisor::fork_helper(id_maps)?;
    root::enter(spec)?;
    privileges::set_host_name_and_limits(spec)?;
    parent.enter_user_namespace()?;
    privileges::drop_all(spec)?;
    parent.die_with_parent()?;
    let source = std::process::Command::new(&spec.program).args(&spec.args).exec();
    Err(Error::Exec { program: spec.program.clone(), source })
}

/// Takes the shim's uid lock shared; the shim holds it already, so only a lock taken by some other
/// sandbox (it exclusively: this uid is not ours) makes it fail.
fn hold_uid(path: &std::path::Path) -> Result<nix::fcntl::Flock<std::fs::File>, Error> {
    let failed = |source| Error::UidLock { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(failed)?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockSharedNonblock)
        .map_err(|(_, errno)| failed(errno.into()))
}

/// Reads standard input to its end (a few bytes at most), which must be [`GO`], then puts
/// /dev/null there for the helper.
fn wait_for_go() -> Result<(), Error> {
    let mut said = Vec::with_capacity(GO.len());
    std::io::stdin().take(GO.len() as u64 + 1).read_to_end(&mut said).map_err(Error::ReadGo)?;
    if said != GO {
        return Err(Error::NoGo);
    }
    let null = std::fs::File::open("/dev/null").map_err(Error::ReadGo)?;
    nix::unistd::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), libc::STDIN_FILENO).map_err(Error::Stdin)?;
    Ok(())
}
