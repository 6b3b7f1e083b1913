//! The jail's new PID namespace takes effect for a child only, so the jailer forks: the child
//! becomes the helper (PID 1 inside), the parent stays outside as the process the shim started,
//! passing on the signals it gets and exiting as the helper exits. If the parent is killed, the
//! helper is killed too (parent-death signal), and with it anything it started.

use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::{kill, raise, signal as signal_handler, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

/// Passed on to the helper. (PID 1 of a namespace only gets those it has a handler for; SIGKILL
/// reaches it regardless.)
const FORWARDED: &[Signal] =
    &[Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGQUIT, Signal::SIGUSR1, Signal::SIGUSR2];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot block the signals to pass on")]
    Block(#[source] nix::Error),
    #[error("cannot fork the helper into its PID namespace")]
    Fork(#[source] nix::Error),
    #[error("cannot arrange for the helper to die with the jailer")]
    DeathSignal(#[source] nix::Error),
    #[error("the jailer died before the helper started")]
    Orphaned,
    #[error("cannot enter a user namespace of the helper's own")]
    UserNamespace(#[source] nix::Error),
    #[error("cannot open the host's /proc, where the helper's user namespace is mapped")]
    HostProc(#[source] std::io::Error),
    #[error("cannot tell the jailer the helper entered its user namespace")]
    Handshake(#[source] std::io::Error),
    #[error("the jailer did not map the ids of the helper's user namespace (its error is above)")]
    IdsNotMapped,
}

/// The uid_map and gid_map the parent writes for the helper's user namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdMaps {
    pub uid_map: String,
    pub gid_map: String,
}

/// The child's end of the user-namespace handshake: it says it has entered the namespace, the
/// parent (still the host's root, which the child no longer is there) writes the maps and says so.
struct Handshake {
    entered: std::fs::File,
    mapped: std::fs::File,
}

/// The child's tie to the parent: the read end of a pipe only the parent holds open.
pub struct ParentLink {
    alive: std::os::fd::OwnedFd,
    user_namespace: Option<Handshake>,
}

impl ParentLink {
    /// Enters a new user namespace whose ids the parent maps; a no-op without one asked for.
    pub fn enter_user_namespace(&mut self) -> Result<(), Error> {
        use std::io::{Read, Write};
        let Some(mut handshake) = self.user_namespace.take() else { return Ok(()) };
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER).map_err(Error::UserNamespace)?;
        handshake.entered.write_all(ENTERED).map_err(Error::Handshake)?;
        let mut answer = [0u8; 1];
        match handshake.mapped.read(&mut answer) {
            Ok(1) if answer == *MAPPED => Ok(()),
            _ => Err(Error::IdsNotMapped),
        }
    }

    /// Arms the parent-death signal (again: the kernel clears it whenever the effective or
    /// file-system uid or gid changes, so the jail arms it last, just before exec) and checks the
    /// parent did not die before.
    pub fn die_with_parent(&self) -> Result<(), Error> {
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(Error::DeathSignal)?;
        if parent_gone(&self.alive) {
            return Err(Error::Orphaned);
        }
        Ok(())
    }
}

/// What the child writes once it is in its user namespace, and the parent once it mapped the ids.
const ENTERED: &[u8; 1] = b"u";
const MAPPED: &[u8; 1] = b"m";

/// Returns in the child, ready to become the helper; the parent never returns. With `id_maps`,
/// the parent writes them for the user namespace the child enters ([`ParentLink::enter_user_namespace`]).
pub fn fork_helper(id_maps: Option<IdMaps>) -> Result<ParentLink, Error> {
    let watched = watched_signals();
    watched.thread_block().map_err(Error::Block)?;
    // Held open by the parent alone: its end tells the child whether the parent still lives
    // (getppid cannot, the parent being outside the child's PID namespace).
    let (alive_read, alive_write) = pipe()?;
    let handshake = match id_maps {
        // The host's /proc, opened now: once the child pivots into the jail (a mount namespace
        // the parent shares), /proc there is the jail's, where the child is PID 1.
        Some(_) => Some((pipe()?, pipe()?, std::fs::File::open("/proc").map_err(Error::HostProc)?)),
        None => None,
    };
    // SAFETY: the jailer is single-threaded, so the child may do anything the parent could.
    match unsafe { fork() }.map_err(Error::Fork)? {
        ForkResult::Child => {
            drop(alive_write);
            let user_namespace = handshake.map(|((_, entered), (mapped, _), _)| Handshake {
                entered: std::fs::File::from(entered),
                mapped: std::fs::File::from(mapped),
            });
            let link = ParentLink { alive: alive_read, user_namespace };
            link.die_with_parent()?;
            watched.thread_unblock().map_err(Error::Block)?;
            Ok(link)
        }
        ForkResult::Parent { child } => {
            drop(alive_read);
            // Kept open for as long as the parent lives.
            std::mem::forget(alive_write);
            if let (Some(maps), Some(((entered, _), (_, mapped), proc))) = (id_maps, handshake) {
                let ends = (std::fs::File::from(entered), std::fs::File::from(mapped));
                map_child_ids(child, &maps, &proc, ends);
            }
            supervise(child, &watched)
        }
    }
}

fn pipe() -> Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd), Error> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(Error::Fork)
}

/// Waits for the child to enter its user namespace, then writes its maps (one write each, as
/// the kernel wants) and tells it. A child that died first is reaped by the supervision; one whose
/// maps cannot be written is told nothing, and fails.
fn map_child_ids(
    child: Pid,
    maps: &IdMaps,
    proc: &std::fs::File,
    (mut entered, mut mapped): (std::fs::File, std::fs::File),
) {
    use std::io::{Read, Write};
    let mut said = [0u8; 1];
    if !matches!(entered.read(&mut said), Ok(1) if said == *ENTERED) {
        return;
    }
    let write_map = |name: &str, map: &str| -> std::io::Result<()> {
        use std::os::fd::{AsRawFd, FromRawFd};
        let path = format!("{child}/{name}");
        let flags = nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC;
        let fd =
            nix::fcntl::openat(Some(proc.as_raw_fd()), path.as_str(), flags, nix::sys::stat::Mode::empty())?;
        // SAFETY: `fd` was just opened here and is owned by the file from now on.
        let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.write_all(map.as_bytes())
    };
    let written = write_map("uid_map", &maps.uid_map).and_then(|()| write_map("gid_map", &maps.gid_map));
    match written {
        Ok(()) => {
            let _ = mapped.write_all(MAPPED);
        }
        Err(err) => eprintln!("ironclad-jailer: cannot map the ids of the helper's user namespace: {err}"),
    }
}

/// The pipe's other end is closed: its only holder, the parent, is gone.
fn parent_gone(alive_read: &std::os::fd::OwnedFd) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(alive_read.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(0) => false,
        _ => fds[0].revents().is_some_and(|events| events.contains(PollFlags::POLLHUP)),
    }
}

fn watched_signals() -> SigSet {
    let mut set = SigSet::empty();
    for signal in FORWARDED.iter().copied().chain([Signal::SIGCHLD]) {
        set.add(signal);
    }
    set
}

fn supervise(child: Pid, watched: &SigSet) -> ! {
    loop {
        match watched.wait() {
            Ok(Signal::SIGCHLD) => reap(child),
            Ok(signal) => {
                let _ = kill(child, signal);
            }
            Err(_) => continue,
        }
    }
}

/// Exits as the helper did, if it did.
fn reap(child: Pid) {
    match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::Exited(_, code)) => std::process::exit(code),
        Ok(WaitStatus::Signaled(_, signal, _)) => die_of(signal),
        Ok(_) => {}
        Err(_) => std::process::exit(1),
    }
}

/// Dies of `signal` too, so the shim sees the helper's own end (a seccomp kill stays a SIGSYS).
fn die_of(signal: Signal) -> ! {
    // SAFETY: restoring the default action installs no handler.
    let _ = unsafe { signal_handler(signal, SigHandler::SigDfl) };
    let mut only = SigSet::empty();
    only.add(signal);
    let _ = only.thread_unblock();
    // The helper's core (none: its limit is 0) is not ours to write either.
    let _ = setrlimit(Resource::RLIMIT_CORE, 0, 0);
    let _ = raise(signal);
    // A signal whose default is not to end the process: an exit all the same.
    std::process::exit(128 + signal as i32)
}
