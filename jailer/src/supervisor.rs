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
}

/// The child's tie to the parent: the read end of a pipe only the parent holds open.
pub struct ParentLink(std::os::fd::OwnedFd);

impl ParentLink {
    /// Arms the parent-death signal (again: the kernel clears it whenever the effective or
    /// file-system uid or gid changes, so the jail arms it last, just before exec) and checks the
    /// parent did not die before.
    pub fn die_with_parent(&self) -> Result<(), Error> {
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(Error::DeathSignal)?;
        if parent_gone(&self.0) {
            return Err(Error::Orphaned);
        }
        Ok(())
    }
}

/// Returns in the child, ready to become the helper; the parent never returns.
pub fn fork_helper() -> Result<ParentLink, Error> {
    let watched = watched_signals();
    watched.thread_block().map_err(Error::Block)?;
    // Held open by the parent alone: its end tells the child whether the parent still lives
    // (getppid cannot, the parent being outside the child's PID namespace).
    let (alive_read, alive_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(Error::Fork)?;
    // SAFETY: the jailer is single-threaded, so the child may do anything the parent could.
    match unsafe { fork() }.map_err(Error::Fork)? {
        ForkResult::Child => {
            drop(alive_write);
            let link = ParentLink(alive_read);
            link.die_with_parent()?;
            watched.thread_unblock().map_err(Error::Block)?;
            Ok(link)
        }
        ForkResult::Parent { child } => {
            drop(alive_read);
            // Kept open for as long as the parent lives.
            std::mem::forget(alive_write);
            supervise(child, &watched)
        }
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
