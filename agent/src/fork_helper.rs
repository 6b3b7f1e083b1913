//! libcontainer's create and exec, each in a short-lived process of its own (as runc runs one
//! `runc create` per container).
//!
//! libcontainer forks with a raw `clone3`, without the C library's fork handling, and the forked
//! process goes on running Rust code (allocating, locking) before it execs. Forked from the agent,
//! which has several threads, the child could block for good on a lock another thread held at the
//! fork (seen: two creates at once, one hanging now and then). Its processes also wait on channels
//! for every copy of the other end to close, which a fork for a second container at the same time
//! would hold. A helper process has one thread and forks for one container only, so creates and
//! execs run side by side. The helper is this binary: `/proc/self/exe` with [`HELPER_ARG`], the
//! request as JSON in the next argument, the new process's stdio as its own stdin, stdout and
//! stderr (libcontainer hands its own on), and one JSON [`Reply`], ended by a newline, on
//! descriptor [`REPLY_FD`]. The reply ends at its newline, not at the pipe's end: the container's
//! init process inherits the descriptor and holds it until it execs at start.
//! The container's processes outlive the helper and are re-parented to the agent, which reaps them
//! (PID 1 in the guest, the child subreaper when run by hand).

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::error::LibcontainerError;
use libcontainer::syscall::syscall::SyscallType;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt};

/// The first argument that makes the agent binary a helper.
pub const HELPER_ARG: &str = "--libcontainer-helper";
/// Where the helper finds the pipe its reply goes to.
const REPLY_FD: RawFd = 3;
/// A reply is one short JSON object; more is not read.
const MAX_REPLY: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot encode the request for the helper")]
    Encode(#[source] serde_json::Error),
    #[error("cannot create the pipe the helper replies on")]
    Pipe(#[source] nix::Error),
    #[error("cannot start the helper process")]
    Spawn(#[source] std::io::Error),
    #[error("cannot read the helper's reply")]
    Read(#[source] std::io::Error),
    #[error("the helper ended without a reply")]
    NoReply,
    #[error("the helper's reply is not one we understand")]
    BadReply(#[source] serde_json::Error),
    #[error("the helper did not reply within {0:?} and was killed")]
    Timeout(Duration),
    #[error("the helper's process gave no pid")]
    NoPid,
    /// What libcontainer itself said, with its kind kept for the caller's error code.
    #[error("{message}")]
    Failed { kind: ErrorKind, message: String },
}

impl Error {
    /// libcontainer refused because the container's state was already there: not ours to remove.
    pub fn found_existing_state(&self) -> bool {
        matches!(self, Error::Failed { kind: ErrorKind::AlreadyExists, .. })
    }
}

/// libcontainer's errors by kind: what the request got wrong, what state forbids, what already
/// exists or is missing; the rest is ours. Kept whole across the process boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    InvalidArgument,
    FailedPrecondition,
    AlreadyExists,
    NotFound,
    Internal,
}

impl ErrorKind {
    pub fn of(err: &LibcontainerError) -> Self {
        use LibcontainerError as L;
        match err {
            L::InvalidID(_) | L::MissingSpec(_) | L::InvalidSpec(_) | L::InvalidInput(_) | L::Spec(_) => {
                ErrorKind::InvalidArgument
            }
            L::IncorrectStatus(_) => ErrorKind::FailedPrecondition,
            L::Exist => ErrorKind::AlreadyExists,
            L::NoDirectory => ErrorKind::NotFound,
            L::NoExecutors
            | L::NoUserNamespace
            | L::Tty(_)
            | L::UserNamespace(_)
            | L::NotifyListener(_)
            | L::Config(_)
            | L::Hook(_)
            | L::State(_)
            | L::MainProcess(_)
            | L::Procfs(_)
            | L::Capabilities(_)
            | L::CgroupManager(_)
            | L::CgroupCreate(_)
            | L::CgroupGet(_)
            | L::Checkpoint(_)
            | L::CreateContainerError(_)
            | L::NetDevicesError(_)
            | L::NetworkError(_)
            | L::IntelRdt(_)
            | L::OtherSyscall(_)
            | L::OtherIO(_)
            | L::OtherSerialization(_)
            | L::OtherCgroup(_)
            | L::Other(_) => ErrorKind::Internal,
        }
    }
}

/// What the helper is asked to do. `console_socket`: the process gets a terminal and sends its
/// master there; without one it keeps the helper's stdio.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    Create {
        id: String,
        state_root: PathBuf,
        bundle: PathBuf,
        no_pivot: bool,
        console_socket: Option<PathBuf>,
    },
    Exec {
        id: String,
        state_root: PathBuf,
        process_file: PathBuf,
        console_socket: Option<PathBuf>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
enum Reply {
    Done { pid: i32 },
    Failed { kind: ErrorKind, message: String },
}

/// The new process's stdin, stdout and stderr; `None` for /dev/null (a terminal replaces them).
pub struct ChildStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// Runs `request` in a helper and returns the new process's pid (the container's init process for
/// a create). A helper that has not replied within `deadline` is killed.
pub async fn run(request: &Request, stdio: Option<ChildStdio>, deadline: Duration) -> Result<i32, Error> {
    let json = serde_json::to_string(request).map_err(Error::Encode)?;
    let (reply_read, reply_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(Error::Pipe)?;
    let pid = tokio::task::spawn_blocking(move || spawn_helper(&json, stdio, reply_write))
        .await
        .map_err(|e| Error::Spawn(std::io::Error::other(e)))??;
    let mut reply = Vec::new();
    let pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(reply_read).map_err(Error::Read)?;
    let mut pipe = tokio::io::BufReader::new(pipe.take(MAX_REPLY));
    match tokio::time::timeout(deadline, pipe.read_until(b'\n', &mut reply)).await {
        Ok(read) => read.map_err(Error::Read)?,
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            return Err(Error::Timeout(deadline));
        }
    };
    if reply.is_empty() {
        return Err(Error::NoReply);
    }
    match serde_json::from_slice(&reply).map_err(Error::BadReply)? {
        Reply::Done { pid } => Ok(pid),
        Reply::Failed { kind, message } => Err(Error::Failed { kind, message }),
    }
}

/// Starts the helper with the reply pipe's write end at [`REPLY_FD`]; the command, holding the
/// child's ends, is dropped here so that only the helper keeps them. The agent's reaper collects
/// the helper when it exits.
#[allow(clippy::zombie_processes)]
fn spawn_helper(
    json: &str,
    stdio: Option<ChildStdio>,
    reply_write: OwnedFd,
) -> Result<nix::unistd::Pid, Error> {
    let mut command = Command::new("/proc/self/exe");
    command.arg(HELPER_ARG).arg(json);
    match stdio {
        Some(stdio) => command.stdin(stdio.stdin).stdout(stdio.stdout).stderr(stdio.stderr),
        None => command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()),
    };
    let reply_fd = reply_write.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and calls only dup2 and fcntl, which
    // are async-signal-safe, on descriptors the child inherited.
    unsafe {
        command.pre_exec(move || place_reply_fd(reply_fd));
    }
    let child = command.spawn().map_err(Error::Spawn)?;
    let pid = i32::try_from(child.id()).map_err(|_| Error::NoPid)?;
    Ok(nix::unistd::Pid::from_raw(pid))
}

/// Puts `fd` at [`REPLY_FD`], open across exec.
fn place_reply_fd(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: plain descriptor calls on descriptors of this process; nothing is dereferenced.
    let ret = unsafe {
        if fd == REPLY_FD {
            libc::fcntl(fd, libc::F_SETFD, 0)
        } else {
            libc::dup2(fd, REPLY_FD)
        }
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The helper's whole life: one request, one reply. Nothing is logged: stderr is the new
/// process's.
pub fn serve(request_json: &str) -> ExitCode {
    let Some(mut reply_pipe) = reply_pipe() else {
        eprintln!(
            "ironclad-agent {HELPER_ARG}: descriptor {REPLY_FD} is not a pipe; only the agent runs helpers"
        );
        return ExitCode::FAILURE;
    };
    let reply = match serde_json::from_str::<Request>(request_json) {
        Ok(request) => match execute(request) {
            Ok(pid) => Reply::Done { pid },
            Err(err) => {
                Reply::Failed { kind: ErrorKind::of(&err), message: ironclad_protocol::error_chain(&err) }
            }
        },
        Err(err) => Reply::Failed { kind: ErrorKind::Internal, message: format!("bad request: {err}") },
    };
    let written = serde_json::to_writer(&mut reply_pipe, &reply)
        .map_err(std::io::Error::from)
        .and_then(|()| reply_pipe.write_all(b"\n"));
    if written.is_err() {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Descriptor [`REPLY_FD`] as a file, when it is a pipe.
fn reply_pipe() -> Option<std::fs::File> {
    let stat = nix::sys::stat::fstat(REPLY_FD).ok()?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFIFO {
        return None;
    }
    // SAFETY: the descriptor is open (fstat succeeded), a pipe the agent placed there for this
    // process, and nothing else in the helper owns it.
    Some(unsafe { std::fs::File::from_raw_fd(REPLY_FD) })
}

fn execute(request: Request) -> Result<i32, LibcontainerError> {
    match request {
        Request::Create { id, state_root, bundle, no_pivot, console_socket } => {
            let container = ContainerBuilder::new(id, SyscallType::Linux)
                .with_root_path(state_root)?
                .with_console_socket(console_socket)
                .as_init(bundle)
                .with_systemd(false)
                .with_no_pivot(no_pivot)
                .with_detach(true)
                .build()?;
            container
                .pid()
                .map(|pid| pid.as_raw())
                .ok_or_else(|| LibcontainerError::Other("the created container has no init process".into()))
        }
        Request::Exec { id, state_root, process_file, console_socket } => {
            let pid = ContainerBuilder::new(id, SyscallType::Linux)
                .with_root_path(state_root)?
                .with_console_socket(console_socket)
                .as_tenant()
                .with_detach(true)
                .with_process(Some(process_file))
                .build()?;
            Ok(pid.as_raw())
        }
    }
}
