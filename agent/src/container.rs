//! Containers through libcontainer (youki): an OCI spec and a root file system in, a running
//! container with its stdio relayed and its exit status recorded out.

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use libcgroups::common::{
    AnyCgroupManager, AnyManagerError, CgroupConfig, CgroupManager, ControllerOpt, CreateCgroupSetupError,
};
use libcontainer::container::Container;
use libcontainer::error::LibcontainerError;
use libcontainer::oci_spec::runtime::{LinuxNamespaceType, LinuxResources, Process as OciProcess, Spec};
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc, watch, Mutex};

use crate::cgroups::{self, Layout};
use crate::fork_helper::{self, ChildStdio};
use crate::paths::AgentPaths;
use crate::storage::{self, Mounted, StorageRequest};

/// Output is relayed in chunks of at most this size, and at most this many chunks wait per stream:
/// a chatty process blocks on its pipe instead of filling guest memory, and nothing is lost.
pub const CHUNK_SIZE: usize = 64 * 1024;
const BUFFERED_CHUNKS: usize = 16;
const DEFAULT_REMOVE_TIMEOUT: Duration = Duration::from_secs(10);
/// A create or exec helper not done by then is killed: the shim stops waiting for any agent call
/// after as long.
const HELPER_DEADLINE: Duration = Duration::from_secs(30);
/// How often a container's OOM-kill count is read for new kills.
const OOM_POLL: Duration = Duration::from_millis(100);
/// OOM events waiting for GetOOMEvent; more are dropped (and logged) rather than held.
const OOM_QUEUE: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid container id {id:?}: {reason}")]
    InvalidId { id: String, reason: String },
    #[error("a container {0:?} already exists")]
    AlreadyExists(String),
    #[error("no container {0:?}")]
    NotFound(String),
    #[error("container {id:?} has no exec process {exec_id:?}")]
    ExecNotFound { id: String, exec_id: String },
    #[error("container {id:?} already has an exec process {exec_id:?}")]
    ExecExists { id: String, exec_id: String },
    #[error("invalid OCI spec: {0}")]
    InvalidSpec(String),
    #[error("the root file system {0} is not a directory")]
    BadRootfs(PathBuf),
    #[error("container {id:?} is {state}, it cannot be {action}")]
    WrongState { id: String, state: &'static str, action: &'static str },
    #[error("container {id:?} did not stop within {timeout:?} of SIGKILL")]
    StopTimeout { id: String, timeout: Duration },
    #[error("cannot prepare the bundle of {id:?}")]
    Bundle {
        id: String,
        #[source]
        source: std::io::Error,
    },
    /// libcontainer's own error, kept whole: the server maps it to a ttrpc code by variant.
    #[error("libcontainer failed to {action} container {id:?}{said}")]
    Libcontainer {
        id: String,
        action: &'static str,
        /// What the process wrote on stderr before it failed ("; the container said: …"), or "".
        said: String,
        #[source]
        source: Box<LibcontainerError>,
    },
    /// A create or exec, run by a helper process: libcontainer's failure (its kind kept for the
    /// server's code) or the helper's own.
    #[error("cannot {action} container {id:?}{said}")]
    Helper {
        id: String,
        action: &'static str,
        /// What the process wrote on stderr before it failed ("; the container said: …"), or "".
        said: String,
        #[source]
        source: fork_helper::Error,
    },
    #[error("cannot open the cgroup of container {id:?}")]
    CgroupOpen {
        id: String,
        #[source]
        source: CreateCgroupSetupError,
    },
    #[error("cannot {action} the cgroup of container {id:?}")]
    Cgroup {
        id: String,
        action: &'static str,
        #[source]
        source: AnyManagerError,
    },
    #[error("cannot {action} container {id:?}")]
    Io {
        id: String,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot signal container {id:?}")]
    Signal {
        id: String,
        #[source]
        source: nix::Error,
    },
    #[error("cannot set up the stdio of container {id:?}: {message}")]
    Stdio { id: String, message: String },
    #[error("libcontainer gave container {id:?} no usable pid after it was {action}")]
    NoPid { id: String, action: &'static str },
    #[error("a blocking call for container {id:?} did not finish")]
    Blocking {
        id: String,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("the state of container {0:?} was left inconsistent by a panic")]
    Poisoned(String),
    #[error("cannot give the thread working on container {id:?} a working directory of its own")]
    OwnDirectory {
        id: String,
        #[source]
        source: nix::Error,
    },
    #[error("cannot create the cgroup {path:?} that containers' cgroups go below")]
    CgroupParent {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the stdio pipes")]
    Pipes(#[source] nix::Error),
    #[error("storage for the container")]
    Storage(#[from] storage::Error),
}

/// One output stream as the reader sees it: chunks from the pipe, and what a previous, smaller
/// read left of the last chunk.
struct Output {
    chunks: mpsc::Receiver<Vec<u8>>,
    leftover: Vec<u8>,
}

impl Output {
    fn new(chunks: mpsc::Receiver<Vec<u8>>) -> Self {
        Output { chunks, leftover: Vec::new() }
    }

    /// Up to `max` bytes (0: a whole chunk); empty at the end of the stream.
    async fn read(&mut self, max: usize) -> Vec<u8> {
        let mut data = if self.leftover.is_empty() {
            self.chunks.recv().await.unwrap_or_default()
        } else {
            std::mem::take(&mut self.leftover)
        };
        if max > 0 && data.len() > max {
            self.leftover = data.split_off(max);
        }
        data
    }
}

/// The host-facing ends of a process's stdio.
struct Stdio {
    stdin: Mutex<Option<Input>>,
    stdout: Mutex<Output>,
    stderr: Mutex<Output>,
    /// The pty master, when the process has a terminal: for window sizes.
    terminal: Option<Arc<std::fs::File>>,
}

/// Where a process's input goes: a pipe, or the pty master of its terminal.
enum Input {
    Pipe(tokio::net::unix::pipe::Sender),
    Terminal(Arc<std::fs::File>),
}

impl Input {
    async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Input::Pipe(pipe) => pipe.write_all(data).await,
            Input::Terminal(master) => {
                let (master, data) = (master.clone(), data.to_vec());
                tokio::task::spawn_blocking(move || std::io::Write::write_all(&mut &*master, &data))
                    .await
                    .map_err(std::io::Error::other)?
            }
        }
    }
}

/// A terminal's output, read by a thread (tokio's pipe types refuse a pty); a pty master reports
/// EIO once the terminal's last process is gone, which ends the stream.
fn relay_terminal(master: std::fs::File) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel(BUFFERED_CHUNKS);
    std::thread::spawn(move || {
        let mut master = master;
        let mut buf = vec![0u8; CHUNK_SIZE];
        loop {
            match std::io::Read::read(&mut master, &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// The stdio of a process with a terminal: its output is the pty's, stderr included.
fn terminal_stdio(master: OwnedFd) -> Result<Arc<Stdio>, std::io::Error> {
    let master = std::fs::File::from(master);
    let reader = master.try_clone()?;
    let master = Arc::new(master);
    let (_, no_stderr) = mpsc::channel(1);
    Ok(Arc::new(Stdio {
        stdin: Mutex::new(Some(Input::Terminal(master.clone()))),
        stdout: Mutex::new(Output::new(relay_terminal(reader))),
        stderr: Mutex::new(Output::new(no_stderr)),
        terminal: Some(master),
    }))
}

/// Waits (a few seconds at most) for the process to send its pty master over the console socket.
fn receive_pty_master(listener: &std::os::unix::net::UnixListener) -> Result<OwnedFd, String> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
    use std::os::fd::{AsRawFd, FromRawFd};
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(err)
                if err.kind() == std::io::ErrorKind::WouldBlock && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(err) => return Err(format!("no terminal from the container: {err}")),
        }
    };
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    let mut name = [0u8; 64];
    let mut iov = [std::io::IoSliceMut::new(&mut name)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let message =
        recvmsg::<UnixAddr>(stream.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
            .map_err(|e| format!("cannot receive the terminal: {e}"))?;
    for cmsg in message.cmsgs().map_err(|e| e.to_string())? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            if let Some(fd) = fds.first() {
                // SAFETY: SCM_RIGHTS just installed this descriptor in our table; nothing else owns it.
                return Ok(unsafe { OwnedFd::from_raw_fd(*fd) });
            }
        }
    }
    Err("the container sent no terminal".into())
}

/// Our ends of those pipes, before the relays start.
struct HostEnds {
    stdin: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
}

fn stdio_pipes() -> Result<(ChildStdio, HostEnds), Error> {
    let (stdin_read, stdin_write) = pipe()?;
    let (stdout_read, stdout_write) = pipe()?;
    let (stderr_read, stderr_write) = pipe()?;
    Ok((
        ChildStdio { stdin: stdin_read, stdout: stdout_write, stderr: stderr_write },
        HostEnds { stdin: stdin_write, stdout: stdout_read, stderr: stderr_read },
    ))
}

impl HostEnds {
    fn into_stdio(self) -> Arc<Stdio> {
        Arc::new(Stdio {
            stdin: Mutex::new(
                tokio::net::unix::pipe::Sender::from_owned_fd(self.stdin).ok().map(Input::Pipe),
            ),
            stdout: Mutex::new(Output::new(relay_output(self.stdout))),
            stderr: Mutex::new(Output::new(relay_output(self.stderr))),
            terminal: None,
        })
    }
}

/// One process of a container, the init process or an exec: its stdio and, once it has exited,
/// its status.
struct Process {
    pid: Option<i32>,
    stdio: Arc<Stdio>,
    exit: watch::Receiver<Option<i32>>,
    exit_tx: Arc<watch::Sender<Option<i32>>>,
}

impl Process {
    fn new(stdio: Arc<Stdio>) -> Self {
        let (exit_tx, exit) = watch::channel(None);
        Process { pid: None, stdio, exit, exit_tx: Arc::new(exit_tx) }
    }

    fn has_exited(&self) -> bool {
        self.exit.borrow().is_some()
    }
}

/// Records `pid`'s exit status from the reaper's announcements. Subscribe before the process can
/// exit, so that its exit cannot be missed.
fn watch_exit(
    mut exits: broadcast::Receiver<WaitStatus>,
    pid: i32,
    exit_tx: Arc<watch::Sender<Option<i32>>>,
) {
    tokio::spawn(async move {
        if let Some(code) = exit_of(&mut exits, Pid::from_raw(pid)).await {
            let _ = exit_tx.send(Some(code));
        }
    });
}

/// `pid`'s exit status, once the reaper announces it; None if the reaper goes away first.
async fn exit_of(exits: &mut broadcast::Receiver<WaitStatus>, pid: Pid) -> Option<i32> {
    loop {
        match exits.recv().await {
            Ok(status) => match exit_code(status) {
                Some((exited, code)) if exited == pid => return Some(code),
                _ => continue,
            },
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return None,
        }
    }
}

struct Entry {
    container: Arc<std::sync::Mutex<Container>>,
    bundle: PathBuf,
    mounts: Vec<Mounted>,
    init: Process,
    execs: HashMap<String, Process>,
}

impl Entry {
    fn process(&self, id: &str, exec_id: &str) -> Result<&Process, Error> {
        if exec_id.is_empty() {
            return Ok(&self.init);
        }
        self.execs.get(exec_id).ok_or_else(|| Error::ExecNotFound { id: id.into(), exec_id: exec_id.into() })
    }
}

/// Every container of the sandbox.
pub struct Containers {
    paths: AgentPaths,
    cgroups: Layout,
    entries: Mutex<HashMap<String, Entry>>,
    exits: broadcast::Sender<WaitStatus>,
    /// pivot_root cannot leave the initramfs: there, containers enter their root with MS_MOVE and
    /// chroot instead (runc's and youki's no-pivot mode). The VM stays the outer boundary.
    no_pivot: bool,
    oom_tx: mpsc::Sender<String>,
    oom_rx: Mutex<mpsc::Receiver<String>>,
    /// Ids of containers being created (not yet in `entries`): the table is not locked across a
    /// create, and libcontainer's part runs in a helper process of its own (see `fork_helper`), so
    /// containers are created side by side.
    creating: std::sync::Mutex<HashSet<String>>,
    /// (container, exec id) of processes being exec'd: the table is not locked across the
    /// helper, so an exec does not hold back the calls of the sandbox's other containers.
    starting_execs: std::sync::Mutex<HashSet<(String, String)>>,
}

/// A key held in one of the sets of things being made ([`Containers::reserve`],
/// [`Containers::reserve_exec`]); dropping it frees the key again.
struct Reservation<'a, K: Eq + std::hash::Hash> {
    held: &'a std::sync::Mutex<HashSet<K>>,
    key: K,
}

impl<K: Eq + std::hash::Hash> Drop for Reservation<'_, K> {
    fn drop(&mut self) {
        if let Ok(mut held) = self.held.lock() {
            held.remove(&self.key);
        }
    }
}

/// Reports each new OOM kill counted in `oom_kill_file` until the cgroup goes away.
fn watch_oom(id: String, oom_kill_file: PathBuf, events: mpsc::Sender<String>) {
    tokio::spawn(async move {
        let Some(mut seen) = cgroups::oom_kills(&oom_kill_file) else {
            return;
        };
        loop {
            tokio::time::sleep(OOM_POLL).await;
            let Some(now) = cgroups::oom_kills(&oom_kill_file) else {
                return;
            };
            if now > seen {
                seen = now;
                if events.try_send(id.clone()).is_err() {
                    tracing::warn!("OOM event for {id} dropped: nobody is reading them");
                }
            }
        }
    });
}

/// Whether `/` is the initramfs (ramfs, or tmpfs when the kernel unpacks into one).
pub fn root_is_initramfs() -> bool {
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    nix::sys::statfs::statfs("/")
        .map(|s| {
            let kind = s.filesystem_type().0;
            kind == RAMFS_MAGIC || kind == TMPFS_MAGIC
        })
        .unwrap_or(false)
}

/// An exit code, or 128 + the signal that ended the process.
fn exit_code(status: WaitStatus) -> Option<(Pid, i32)> {
    match status {
        WaitStatus::Exited(pid, code) => Some((pid, code)),
        WaitStatus::Signaled(pid, signal, _) => Some((pid, 128 + signal as i32)),
        _ => None,
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), Error> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(Error::Pipes)
}

/// Relays one output pipe into a bounded channel; the channel closing is end of stream.
fn relay_output(read_end: OwnedFd) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel(BUFFERED_CHUNKS);
    tokio::spawn(async move {
        let Ok(mut pipe) = tokio::net::unix::pipe::Receiver::from_owned_fd(read_end) else {
            return;
        };
        let mut buf = vec![0u8; CHUNK_SIZE];
        loop {
            match pipe.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// What a new process is given for its stdio: pipes, or a console socket to send its pty master to.
enum ChildSide {
    Pipes(ChildStdio),
    Terminal(PathBuf),
}

impl ChildSide {
    /// The helper's stdio and console socket.
    fn into_parts(self) -> (Option<ChildStdio>, Option<PathBuf>) {
        match self {
            ChildSide::Pipes(pipes) => (Some(pipes), None),
            ChildSide::Terminal(console_socket) => (None, Some(console_socket)),
        }
    }
}

/// Our side of the same: the pipes' other ends, or the socket the pty master will arrive on.
enum HostSide {
    Pipes(HostEnds),
    Terminal(std::os::unix::net::UnixListener, PathBuf),
}

/// Pipes, or (for `terminal: true`) a console socket at `console_socket`.
fn plan_stdio(terminal: bool, console_socket: PathBuf) -> Result<(ChildSide, HostSide), Error> {
    if !terminal {
        let (child, host) = stdio_pipes()?;
        return Ok((ChildSide::Pipes(child), HostSide::Pipes(host)));
    }
    let _ = std::fs::remove_file(&console_socket);
    let listener = std::os::unix::net::UnixListener::bind(&console_socket)
        .map_err(|e| Error::Pipes(nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO))))?;
    Ok((ChildSide::Terminal(console_socket.clone()), HostSide::Terminal(listener, console_socket)))
}

impl HostSide {
    /// Once the process exists: the relays for pipes, or the terminal it sent back.
    fn finish(self) -> Result<Arc<Stdio>, String> {
        match self {
            HostSide::Pipes(host) => Ok(host.into_stdio()),
            HostSide::Terminal(listener, path) => {
                let master = receive_pty_master(&listener);
                let _ = std::fs::remove_file(path);
                terminal_stdio(master?).map_err(|e| e.to_string())
            }
        }
    }

    /// After a failure: what the process said on its stderr, if it had one we can read.
    fn said(&self) -> String {
        match self {
            HostSide::Pipes(host) => said(&host.stderr),
            HostSide::Terminal(_, path) => {
                let _ = std::fs::remove_file(path);
                String::new()
            }
        }
    }
}

/// Runs a blocking libcontainer call off the async threads, on a thread with a working directory
/// of its own: libcontainer changes the working directory around its socket calls (the notify
/// socket at create and start, the console socket), which, shared by the whole process, would move
/// the calls for other containers running at the same time (seen: a container's create failing
/// with "failed to get cwd" after another's state directory, its cwd of the moment, was removed).
async fn blocking<T: Send + 'static>(
    id: &str,
    call: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Error> {
    let on_own_directory = move || nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS).map(|()| call());
    tokio::task::spawn_blocking(on_own_directory)
        .await
        .map_err(|source| Error::Blocking { id: id.into(), source })?
        .map_err(|source| Error::OwnDirectory { id: id.into(), source })
}

/// libcontainer's error for `action` on container `id`.
fn libcontainer(id: &str, action: &'static str, said: String) -> impl FnOnce(LibcontainerError) -> Error {
    let id = id.to_string();
    move |source| Error::Libcontainer { id, action, said, source: Box::new(source) }
}

/// libcontainer's state of a container a helper created.
async fn load(id: &str, container_dir: PathBuf) -> Result<Container, Error> {
    let owned_id = id.to_string();
    blocking(id, move || {
        Container::load(container_dir).map_err(libcontainer(&owned_id, "load", String::new()))
    })
    .await?
}

/// After a failed create: whatever the helper left of the container (a helper killed half-way
/// leaves its state directory, and maybe a process waiting to be started), so that the id can
/// be used again.
async fn discard_state(id: &str, state_root: &Path) {
    let container_dir = state_root.join(id);
    if !container_dir.exists() {
        return;
    }
    let dir = container_dir.clone();
    let deleted = blocking(id, move || Container::load(dir).and_then(|mut c| c.delete(true))).await;
    if !matches!(deleted, Ok(Ok(()))) {
        let _ = std::fs::remove_dir_all(&container_dir);
    }
}

/// Locks a container's libcontainer state; a panic while it was held is an error, not a crash.
fn lock<'a>(
    id: &str,
    container: &'a std::sync::Mutex<Container>,
) -> Result<std::sync::MutexGuard<'a, Container>, Error> {
    container.lock().map_err(|_| Error::Poisoned(id.into()))
}

fn pid_u32(id: &str, action: &'static str, pid: i32) -> Result<u32, Error> {
    u32::try_from(pid).map_err(|_| Error::NoPid { id: id.into(), action })
}

impl Containers {
    pub fn new(
        paths: AgentPaths,
        cgroups: Layout,
        exits: broadcast::Sender<WaitStatus>,
        no_pivot: bool,
    ) -> Self {
        let (oom_tx, oom_rx) = mpsc::channel(OOM_QUEUE);
        Containers {
            paths,
            cgroups,
            entries: Mutex::new(HashMap::new()),
            exits,
            no_pivot,
            oom_tx,
            oom_rx: Mutex::new(oom_rx),
            creating: std::sync::Mutex::new(HashSet::new()),
            starting_execs: std::sync::Mutex::new(HashSet::new()),
        }
    }

    /// Removes the cgroup the containers' cgroups went below, where it is empty: an agent run by
    /// hand leaves nothing in the host's cgroups.
    pub fn remove_cgroup_parent(&self) {
        for dir in self.cgroups.dirs(self.paths.cgroup_parent()) {
            let _ = std::fs::remove_dir(dir);
        }
    }

    /// Where CopyFile puts files.
    pub fn shared_dir(&self) -> PathBuf {
        self.paths.shared()
    }

    /// The container's cgroup figures, shaped as cgroup v2's whatever the kernel keeps them in.
    pub async fn stats(&self, id: &str) -> Result<ironclad_protocol::agent::StatsContainerResponse, Error> {
        if !self.entries.lock().await.contains_key(id) {
            return Err(Error::NotFound(id.into()));
        }
        let cgroup = self.paths.cgroup(id);
        if let Some(dir) = self.cgroups.unified_dir(&cgroup) {
            return Ok(crate::stats::read(&dir));
        }
        let manager = self.cgroup_manager(id)?;
        let v1 = blocking(id, move || manager.stats()).await?.map_err(|source| Error::Cgroup {
            id: id.into(),
            action: "read the figures of",
            source,
        })?;
        let oom_kills = cgroups::oom_kills(&self.cgroups.oom_kill_file(&cgroup)).unwrap_or(0);
        Ok(crate::stats::from_v1(&v1, oom_kills))
    }

    /// Freezes (or thaws) every process of a running container through its cgroup.
    pub async fn set_paused(&self, id: &str, paused: bool) -> Result<(), Error> {
        let container = {
            let entries = self.entries.lock().await;
            let entry = entries.get(id).ok_or_else(|| Error::NotFound(id.into()))?;
            if entry.init.pid.is_none() || entry.init.has_exited() {
                let action = if paused { "paused" } else { "resumed" };
                return Err(Error::WrongState { id: id.into(), state: "not running", action });
            }
            entry.container.clone()
        };
        let action = if paused { "pause" } else { "resume" };
        let owned_id = id.to_string();
        blocking(id, move || {
            let mut container = lock(&owned_id, &container)?;
            if paused { container.pause() } else { container.resume() }.map_err(libcontainer(
                &owned_id,
                action,
                String::new(),
            ))
        })
        .await?
    }

    /// The next container the OOM killer struck.
    pub async fn next_oom_event(&self) -> Option<String> {
        self.oom_rx.lock().await.recv().await
    }

    /// Mounts the storages, then creates the container; whatever fails undoes what came before.
    pub async fn create(
        &self,
        id: &str,
        spec_json: &str,
        rootfs: &Path,
        storages: &[StorageRequest],
        rootfs_overlay: bool,
        sandbox_container: &str,
    ) -> Result<(), Error> {
        validate_id(id)?;
        let mut spec = parse_spec(spec_json)?;
        self.join_sandbox_namespaces(&mut spec, sandbox_container).await?;
        // The table is locked only to reserve the id and, at the end, to enter the container, not
        // across libcontainer's create (seconds under emulation): other containers' calls go on.
        let _reservation = self.reserve(id).await?;
        let mut mounts = Vec::with_capacity(storages.len());
        for request in storages {
            match storage::mount_storage(request) {
                Ok(mounted) => mounts.push(mounted),
                Err(err) => {
                    unmount_all(mounts);
                    return Err(err.into());
                }
            }
        }
        let rootfs = if rootfs_overlay {
            match storage::mount_writable_overlay(rootfs, &self.paths.overlay(id)) {
                Ok((merged, overlay)) => {
                    mounts.extend(overlay);
                    merged
                }
                Err(err) => {
                    unmount_all(mounts);
                    return Err(err.into());
                }
            }
        } else {
            rootfs.to_path_buf()
        };
        let created = self.create_with_mounts(id, spec, &rootfs, &mut mounts).await;
        if created.is_err() {
            unmount_all(mounts);
        }
        created
    }

    async fn create_with_mounts(
        &self,
        id: &str,
        mut spec: Spec,
        rootfs: &Path,
        mounts: &mut Vec<Mounted>,
    ) -> Result<(), Error> {
        if !rootfs.is_dir() {
            return Err(Error::BadRootfs(rootfs.to_path_buf()));
        }
        let mut root = spec.root().clone().unwrap_or_default();
        root.set_path(rootfs.to_path_buf());
        spec.set_root(Some(root));
        let mut linux = spec.linux().clone().unwrap_or_default();
        linux.set_cgroups_path(Some(self.paths.cgroup(id)));
        spec.set_linux(Some(linux));

        let bundle = self.paths.bundle(id);
        let bundle_err = |source| Error::Bundle { id: id.into(), source };
        std::fs::create_dir_all(&bundle).map_err(bundle_err)?;
        let written = serde_json::to_vec(&spec)
            .map_err(std::io::Error::other)
            .and_then(|json| std::fs::write(bundle.join("config.json"), json));
        if let Err(source) = written {
            let _ = std::fs::remove_dir_all(&bundle);
            return Err(bundle_err(source));
        }

        let terminal = spec.process().as_ref().and_then(|p| p.terminal()).unwrap_or(false);
        let (child, host) = plan_stdio(terminal, bundle.join("console.sock"))?;
        let state_root = self.paths.libcontainer_root();
        if let Err(err) = self.create_cgroup_parent() {
            let _ = std::fs::remove_dir_all(&bundle);
            return Err(err);
        }
        let (stdio, console_socket) = child.into_parts();
        let request = fork_helper::Request::Create {
            id: id.into(),
            state_root: state_root.clone(),
            bundle: bundle.clone(),
            no_pivot: self.no_pivot,
            console_socket,
        };
        let built = match fork_helper::run(&request, stdio, HELPER_DEADLINE).await {
            Ok(_) => load(id, state_root.join(id)).await,
            Err(source) => Err(Error::Helper { id: id.into(), action: "create", said: host.said(), source }),
        };
        let container = match built {
            Ok(container) => container,
            Err(err) => {
                if !matches!(&err, Error::Helper { source, .. } if source.found_existing_state()) {
                    discard_state(id, &state_root).await;
                }
                let _ = std::fs::remove_dir_all(&bundle);
                return Err(err);
            }
        };
        let stdio = match tokio::task::spawn_blocking(move || host.finish()).await {
            Ok(Ok(stdio)) => stdio,
            failed => {
                let message = failed.map_err(|e| e.to_string()).and_then(|r| r).err().unwrap_or_default();
                let mut container = container;
                let _ = container.delete(true);
                let _ = std::fs::remove_dir_all(&bundle);
                return Err(Error::Stdio { id: id.into(), message });
            }
        };
        self.entries.lock().await.insert(
            id.to_string(),
            Entry {
                container: Arc::new(std::sync::Mutex::new(container)),
                bundle,
                mounts: std::mem::take(mounts),
                init: Process::new(stdio),
                execs: HashMap::new(),
            },
        );
        Ok(())
    }

    /// Holds `id` for a container being created, so a second create of the same id is refused
    /// while the table is not locked; dropping the reservation frees the id again.
    async fn reserve(&self, id: &str) -> Result<Reservation<'_, String>, Error> {
        let entries = self.entries.lock().await;
        let mut creating = self.creating.lock().map_err(|_| Error::Poisoned(id.into()))?;
        if entries.contains_key(id) || !creating.insert(id.to_string()) {
            return Err(Error::AlreadyExists(id.into()));
        }
        Ok(Reservation { held: &self.creating, key: id.to_string() })
    }

    /// The cgroup containers' cgroups go below, made before libcontainer runs: libcgroups creates
    /// missing path components with a check-then-create that fails when two containers are created
    /// at once below a new parent (creating it here twice at once is harmless).
    fn create_cgroup_parent(&self) -> Result<(), Error> {
        let parent = self.paths.cgroup_parent();
        self.cgroups.create(parent).map_err(|source| Error::CgroupParent { path: parent.into(), source })
    }

    pub async fn start(&self, id: &str) -> Result<u32, Error> {
        let mut entries = self.entries.lock().await;
        let entry = entries.get_mut(id).ok_or_else(|| Error::NotFound(id.into()))?;
        if entry.init.pid.is_some() {
            return Err(Error::WrongState { id: id.into(), state: "started", action: "started again" });
        }
        // Watch for the exit before the process can exit.
        let exits = self.exits.subscribe();
        let container = entry.container.clone();
        let owned_id = id.to_string();
        let pid = blocking(id, move || {
            let mut container = lock(&owned_id, &container)?;
            container.start().map_err(libcontainer(&owned_id, "start", String::new()))?;
            container
                .pid()
                .map(|p| p.as_raw())
                .ok_or(Error::NoPid { id: owned_id.clone(), action: "started" })
        })
        .await??;
        entry.init.pid = Some(pid);
        watch_exit(exits, pid, entry.init.exit_tx.clone());
        watch_oom(id.to_string(), self.cgroups.oom_kill_file(&self.paths.cgroup(id)), self.oom_tx.clone());
        pid_u32(id, "started", pid)
    }

    /// Starts another process in a running container's namespaces and cgroup. The table is locked
    /// to check and reserve the exec id and, at the end, to enter the process, not across the
    /// helper (a probe's exec must not stall the pod's other containers).
    pub async fn exec(&self, id: &str, exec_id: &str, process_json: &str) -> Result<u32, Error> {
        validate_id(exec_id)?;
        let process: OciProcess =
            serde_json::from_str(process_json).map_err(|e| Error::InvalidSpec(format!("process: {e}")))?;
        if process.args().as_ref().is_none_or(|a| a.is_empty()) {
            return Err(Error::InvalidSpec("process.args is empty".into()));
        }
        let (bundle, _reservation) = self.reserve_exec(id, exec_id).await?;
        let process_file = bundle.join(format!("exec-{exec_id}.json"));
        std::fs::write(&process_file, process_json)
            .map_err(|source| Error::Bundle { id: id.into(), source })?;
        let terminal = process.terminal().unwrap_or(false);
        let (child, host) = plan_stdio(terminal, bundle.join(format!("exec-{exec_id}.sock")))?;
        let exits = self.exits.subscribe();
        let (stdio, console_socket) = child.into_parts();
        let request = fork_helper::Request::Exec {
            id: id.into(),
            state_root: self.paths.libcontainer_root(),
            process_file,
            console_socket,
        };
        let pid = fork_helper::run(&request, stdio, HELPER_DEADLINE).await.map_err(|source| {
            Error::Helper { id: id.into(), action: "exec into", said: host.said(), source }
        })?;
        let stdio = blocking(id, move || host.finish())
            .await?
            .map_err(|message| Error::Stdio { id: id.into(), message });
        let mut entries = self.entries.lock().await;
        let placed = stdio.and_then(|stdio| {
            entries.get_mut(id).map(|entry| (stdio, entry)).ok_or_else(|| Error::NotFound(id.into()))
        });
        let (stdio, entry) = match placed {
            Ok(placed) => placed,
            Err(err) => {
                // Without its stdio, or with its container removed meanwhile, the process is
                // nobody's: it goes.
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
                return Err(err);
            }
        };
        let mut process = Process::new(stdio);
        process.pid = Some(pid);
        watch_exit(exits, pid, process.exit_tx.clone());
        entry.execs.insert(exec_id.to_string(), process);
        pid_u32(id, "exec'd into", pid)
    }

    /// Checks that `id` runs and `exec_id` is new to it (neither started nor starting), and holds
    /// `exec_id` until the reservation is dropped; gives the container's bundle.
    async fn reserve_exec(
        &self,
        id: &str,
        exec_id: &str,
    ) -> Result<(PathBuf, Reservation<'_, (String, String)>), Error> {
        let entries = self.entries.lock().await;
        let entry = entries.get(id).ok_or_else(|| Error::NotFound(id.into()))?;
        if entry.init.pid.is_none() || entry.init.has_exited() {
            return Err(Error::WrongState { id: id.into(), state: "not running", action: "exec'd into" });
        }
        let key = (id.to_string(), exec_id.to_string());
        let mut starting = self.starting_execs.lock().map_err(|_| Error::Poisoned(id.into()))?;
        if entry.execs.contains_key(exec_id) || !starting.insert(key.clone()) {
            return Err(Error::ExecExists { id: id.into(), exec_id: exec_id.into() });
        }
        Ok((entry.bundle.clone(), Reservation { held: &self.starting_execs, key }))
    }

    /// The stdio, exit status and pid of a container's process (exec_id empty: its init process).
    async fn process_parts(
        &self,
        id: &str,
        exec_id: &str,
    ) -> Result<(Arc<Stdio>, watch::Receiver<Option<i32>>, Option<i32>), Error> {
        let entries = self.entries.lock().await;
        let entry = entries.get(id).ok_or_else(|| Error::NotFound(id.into()))?;
        let process = entry.process(id, exec_id)?;
        Ok((process.stdio.clone(), process.exit.clone(), process.pid))
    }

    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<i32, Error> {
        let (_, mut exit, pid) = self.process_parts(id, exec_id).await?;
        if pid.is_none() {
            return Err(Error::WrongState { id: id.into(), state: "not started", action: "waited for" });
        }
        loop {
            if let Some(code) = *exit.borrow_and_update() {
                return Ok(code);
            }
            if exit.changed().await.is_err() {
                return Err(Error::NotFound(id.into()));
            }
        }
    }

    /// The next chunk of stdout (or stderr); empty at the end of the stream.
    pub async fn read_output(
        &self,
        id: &str,
        exec_id: &str,
        stderr: bool,
        max: usize,
    ) -> Result<Vec<u8>, Error> {
        let (stdio, _, _) = self.process_parts(id, exec_id).await?;
        let stream = if stderr { &stdio.stderr } else { &stdio.stdout };
        let data = stream.lock().await.read(max).await;
        Ok(data)
    }

    pub async fn write_stdin(&self, id: &str, exec_id: &str, data: &[u8]) -> Result<usize, Error> {
        let (stdio, _, _) = self.process_parts(id, exec_id).await?;
        let mut stdin = stdio.stdin.lock().await;
        let Some(input) = stdin.as_mut() else {
            return Err(Error::WrongState { id: id.into(), state: "closed for input", action: "written to" });
        };
        input.write_all(data).await.map_err(|source| Error::Io {
            id: id.into(),
            action: "write the stdin of",
            source,
        })?;
        Ok(data.len())
    }

    /// Sets the window size of a process's terminal.
    pub async fn resize_terminal(&self, id: &str, exec_id: &str, rows: u16, cols: u16) -> Result<(), Error> {
        use std::os::fd::AsRawFd;
        let (stdio, _, _) = self.process_parts(id, exec_id).await?;
        let Some(master) = &stdio.terminal else {
            return Err(Error::WrongState { id: id.into(), state: "without a terminal", action: "resized" });
        };
        let size = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCSWINSZ reads one winsize through the pointer, which points at a live local;
        // the fd is the pty master this process owns.
        let ret = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        if ret < 0 {
            let source = std::io::Error::last_os_error();
            return Err(Error::Io { id: id.into(), action: "resize the terminal of", source });
        }
        Ok(())
    }

    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), Error> {
        let (stdio, _, _) = self.process_parts(id, exec_id).await?;
        stdio.stdin.lock().await.take();
        Ok(())
    }

    pub async fn signal(&self, id: &str, exec_id: &str, signal: u32) -> Result<(), Error> {
        let (_, _, pid) = self.process_parts(id, exec_id).await?;
        let pid = pid.ok_or_else(|| Error::WrongState {
            id: id.into(),
            state: "not started",
            action: "signalled",
        })?;
        let signal = to_signal(signal)?;
        nix::sys::signal::kill(Pid::from_raw(pid), signal)
            .map_err(|source| Error::Signal { id: id.into(), source })
    }

    /// Kills what still runs, waits for it, and removes the container, its cgroup, bundle and mounts.
    pub async fn remove(&self, id: &str, timeout: Duration) -> Result<(), Error> {
        let timeout = if timeout.is_zero() { DEFAULT_REMOVE_TIMEOUT } else { timeout };
        let (container, bundle, pid, mut exit) = {
            let entries = self.entries.lock().await;
            let entry = entries.get(id).ok_or_else(|| Error::NotFound(id.into()))?;
            (entry.container.clone(), entry.bundle.clone(), entry.init.pid, entry.init.exit.clone())
        };
        match pid {
            Some(pid) if exit.borrow().is_none() => {
                // The init process is PID 1 of the container's pid namespace: its exec processes go with it.
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
                let exited = tokio::time::timeout(timeout, exit.wait_for(|code| code.is_some())).await;
                if exited.is_err() {
                    return Err(Error::StopTimeout { id: id.into(), timeout });
                }
            }
            Some(_) => {}
            None => self.stop_unstarted_init(id, &container, timeout).await?,
        }
        let owned_id = id.to_string();
        blocking(id, move || {
            lock(&owned_id, &container)?.delete(true).map_err(libcontainer(
                &owned_id,
                "delete",
                String::new(),
            ))
        })
        .await??;
        let _ = std::fs::remove_dir_all(&bundle);
        if let Some(entry) = self.entries.lock().await.remove(id) {
            unmount_all(entry.mounts);
        }
        Ok(())
    }

    /// Kills the init process of a container created but never started (it waits for the start)
    /// and waits until it has exited: libcontainer's delete would kill it itself but then gives the
    /// cgroup about 100 ms to empty, which a loaded guest misses ("could not delete").
    async fn stop_unstarted_init(
        &self,
        id: &str,
        container: &Arc<std::sync::Mutex<Container>>,
        timeout: Duration,
    ) -> Result<(), Error> {
        let Some(pid) = lock(id, container)?.pid() else { return Ok(()) };
        // Subscribed before the kill: the exit cannot be missed.
        let mut exits = self.exits.subscribe();
        if nix::sys::signal::kill(pid, Signal::SIGKILL).is_err() {
            return Ok(()); // already gone, and reaped
        }
        let exited = tokio::time::timeout(timeout, exit_of(&mut exits, pid)).await;
        exited.map(drop).map_err(|_| Error::StopTimeout { id: id.into(), timeout })
    }

    /// Points each namespace of the spec that names a path at the sandbox container's namespace of
    /// that type. A path without a sandbox container is refused: it was written on the host.
    async fn join_sandbox_namespaces(&self, spec: &mut Spec, sandbox_container: &str) -> Result<(), Error> {
        let Some(mut linux) = spec.linux().clone() else { return Ok(()) };
        let Some(mut namespaces) = linux.namespaces().clone() else { return Ok(()) };
        if namespaces.iter().all(|ns| ns.path().is_none()) {
            return Ok(());
        }
        if sandbox_container.is_empty() {
            return Err(Error::InvalidSpec(
                "a namespace path in the spec needs sandbox_container: host paths mean nothing in the guest"
                    .into(),
            ));
        }
        let pid = {
            let entries = self.entries.lock().await;
            let entry =
                entries.get(sandbox_container).ok_or_else(|| Error::NotFound(sandbox_container.into()))?;
            match entry.init.pid {
                Some(pid) if !entry.init.has_exited() => pid,
                _ => {
                    return Err(Error::WrongState {
                        id: sandbox_container.into(),
                        state: "not running",
                        action: "joined",
                    })
                }
            }
        };
        for namespace in namespaces.iter_mut().filter(|ns| ns.path().is_some()) {
            let name = namespace_file(namespace.typ());
            namespace.set_path(Some(PathBuf::from(format!("/proc/{pid}/ns/{name}"))));
        }
        linux.set_namespaces(Some(namespaces));
        spec.set_linux(Some(linux));
        Ok(())
    }

    /// The guest pids of every process in the container's cgroup.
    pub async fn processes(&self, id: &str) -> Result<Vec<u32>, Error> {
        if !self.entries.lock().await.contains_key(id) {
            return Err(Error::NotFound(id.into()));
        }
        let manager = self.cgroup_manager(id)?;
        let pids = blocking(id, move || manager.get_all_pids()).await?.map_err(|source| Error::Cgroup {
            id: id.into(),
            action: "list the processes in",
            source,
        })?;
        Ok(pids.into_iter().filter_map(|pid| u32::try_from(pid.as_raw()).ok()).collect())
    }

    /// Sends `signal` to every process in the container's cgroup.
    pub async fn signal_all(&self, id: &str, signal: u32) -> Result<(), Error> {
        let signal = to_signal(signal)?;
        for pid in self.processes(id).await? {
            // A process that exited meanwhile is no failure.
            let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), signal);
        }
        Ok(())
    }

    /// Sets new cgroup limits on a container (the OCI `linux.resources` object).
    pub async fn update(&self, id: &str, resources_json: &str) -> Result<(), Error> {
        let resources: LinuxResources = serde_json::from_str(resources_json)
            .map_err(|e| Error::InvalidSpec(format!("linux.resources: {e}")))?;
        if !self.entries.lock().await.contains_key(id) {
            return Err(Error::NotFound(id.into()));
        }
        let manager = self.cgroup_manager(id)?;
        blocking(id, move || {
            let options = ControllerOpt {
                resources: &resources,
                disable_oom_killer: false,
                oom_score_adj: None,
                freezer_state: None,
            };
            manager.apply(&options)
        })
        .await?
        .map_err(|source| Error::Cgroup { id: id.into(), action: "apply new limits to", source })
    }

    fn cgroup_manager(&self, id: &str) -> Result<AnyCgroupManager, Error> {
        let config = CgroupConfig {
            cgroup_path: self.paths.cgroup(id),
            systemd_cgroup: false,
            container_name: id.to_string(),
        };
        libcgroups::common::create_cgroup_manager(config)
            .map_err(|source| Error::CgroupOpen { id: id.into(), source })
    }
}

/// The name of a namespace's file in /proc/PID/ns.
fn namespace_file(typ: LinuxNamespaceType) -> &'static str {
    match typ {
        LinuxNamespaceType::Mount => "mnt",
        LinuxNamespaceType::Cgroup => "cgroup",
        LinuxNamespaceType::Uts => "uts",
        LinuxNamespaceType::Ipc => "ipc",
        LinuxNamespaceType::User => "user",
        LinuxNamespaceType::Pid => "pid",
        LinuxNamespaceType::Network => "net",
        LinuxNamespaceType::Time => "time",
    }
}

/// Unmounts in reverse order of mounting: an overlay before the tmpfs under it.
fn unmount_all(mounts: Vec<Mounted>) {
    mounts.into_iter().rev().for_each(Mounted::unmount);
}

fn to_signal(signal: u32) -> Result<Signal, Error> {
    i32::try_from(signal)
        .ok()
        .and_then(|s| Signal::try_from(s).ok())
        .ok_or_else(|| Error::InvalidSpec(format!("{signal} is not a signal")))
}

/// A libcontainer failure with what the container's process said on stderr before it died, which
/// names the step that failed.
fn said(stderr: &OwnedFd) -> String {
    let said = drain_nonblocking(stderr);
    if said.is_empty() {
        said
    } else {
        format!("; the container said: {said}")
    }
}

/// What is waiting in a pipe now, without blocking (at most 4 KiB, as text).
fn drain_nonblocking(pipe: &OwnedFd) -> String {
    use std::os::fd::AsRawFd;
    let fd = pipe.as_raw_fd();
    let _ = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK));
    let mut buf = [0u8; 4096];
    let n = nix::unistd::read(fd, &mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).trim().to_string()
}

/// Container ids become directory names: letters, digits, `_ . -`, starting with a letter or digit.
fn validate_id(id: &str) -> Result<(), Error> {
    let invalid = |reason: &str| Err(Error::InvalidId { id: id.into(), reason: reason.into() });
    if id.is_empty() || id.len() > 128 {
        return invalid("must be 1 to 128 characters");
    }
    if !id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric()) {
        return invalid("must start with a letter or digit");
    }
    if !id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        return invalid("may hold only letters, digits, '_', '.' and '-'");
    }
    Ok(())
}

/// The spec as the host sent it, checked for what the agent needs before it prepares anything (a
/// process with arguments), with a cgroup namespace of the container's own added.
pub fn parse_spec(spec_json: &str) -> Result<Spec, Error> {
    let mut spec: Spec = serde_json::from_str(spec_json).map_err(|e| Error::InvalidSpec(e.to_string()))?;
    let args = spec.process().as_ref().and_then(|p| p.args().clone()).unwrap_or_default();
    if args.is_empty() {
        return Err(Error::InvalidSpec("process.args is empty".into()));
    }
    add_cgroup_namespace(&mut spec);
    Ok(spec)
}

/// The guest's cgroups are v2 whatever the host has: a container gets a cgroup namespace of its
/// own (as runc gives one on a v2 host), so that the cgroup file system mounted at /sys/fs/cgroup
/// shows its own cgroup (memory.max, pids.max) rather than the guest's root. The spec comes from a
/// host that may be v1, where containerd adds none.
fn add_cgroup_namespace(spec: &mut Spec) {
    let mut linux = spec.linux().clone().unwrap_or_default();
    let mut namespaces = linux.namespaces().clone().unwrap_or_default();
    if namespaces.iter().any(|ns| ns.typ() == LinuxNamespaceType::Cgroup) {
        return;
    }
    let mut cgroup = libcontainer::oci_spec::runtime::LinuxNamespace::default();
    cgroup.set_typ(LinuxNamespaceType::Cgroup);
    namespaces.push(cgroup);
    linux.set_namespaces(Some(namespaces));
    spec.set_linux(Some(linux));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_container_gets_a_cgroup_namespace_unless_the_spec_has_one() {
        let mut spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/proc/1/ns/net"}]}
        }))
        .unwrap();
        add_cgroup_namespace(&mut spec);
        add_cgroup_namespace(&mut spec);
        let namespaces = spec.linux().as_ref().unwrap().namespaces().clone().unwrap();
        let cgroups: Vec<_> = namespaces.iter().filter(|ns| ns.typ() == LinuxNamespaceType::Cgroup).collect();
        assert_eq!(cgroups.len(), 1);
        assert!(cgroups[0].path().is_none(), "a new namespace, not a path");
        assert_eq!(namespaces.len(), 3);
    }

    #[test]
    fn ids_that_could_escape_the_state_directory_are_refused() {
        for bad in ["", "../x", "a/b", ".hidden", "a b", &"x".repeat(129)] {
            assert!(matches!(validate_id(bad), Err(Error::InvalidId { .. })), "{bad:?}");
        }
        for good in ["c1", "pod-123_a.b"] {
            assert!(validate_id(good).is_ok(), "{good}");
        }
    }

    #[tokio::test]
    async fn reads_smaller_than_a_chunk_keep_the_rest_in_order() {
        let (tx, rx) = mpsc::channel(4);
        let mut output = Output::new(rx);
        tx.send(b"hello world".to_vec()).await.unwrap();
        drop(tx);
        assert_eq!(output.read(5).await, b"hello");
        assert_eq!(output.read(0).await, b" world");
        assert!(output.read(0).await.is_empty(), "end of stream");
    }

    #[tokio::test]
    async fn an_id_being_created_is_held_until_its_reservation_goes() {
        let dir = tempfile::tempdir().unwrap();
        let (exits, _) = broadcast::channel(4);
        let layout = Layout::Unified { root: dir.path().join("cgroup") };
        let containers =
            Containers::new(AgentPaths::new(dir.path(), Path::new("ironclad")), layout, exits, false);
        let first = containers.reserve("c1").await.unwrap();
        assert!(matches!(containers.reserve("c1").await, Err(Error::AlreadyExists(id)) if id == "c1"));
        let other = containers.reserve("c2").await.expect("another id is created alongside");
        drop(first);
        assert!(containers.reserve("c1").await.is_ok(), "a failed create frees its id");
        drop(other);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_blocking_call_that_changes_directory_leaves_the_agents_alone() {
        let before = std::env::current_dir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().to_path_buf();
        let moved = blocking("c1", move || {
            std::env::set_current_dir(&target).unwrap();
            std::env::current_dir().unwrap()
        })
        .await
        .unwrap();
        assert_eq!(moved, dir.path().canonicalize().unwrap(), "the call's own thread moved");
        assert_eq!(std::env::current_dir().unwrap(), before, "the agent's working directory moved");
    }

    #[test]
    fn signals_become_128_plus_the_signal() {
        let pid = Pid::from_raw(10);
        assert_eq!(exit_code(WaitStatus::Exited(pid, 3)), Some((pid, 3)));
        assert_eq!(exit_code(WaitStatus::Signaled(pid, Signal::SIGKILL, false)), Some((pid, 137)));
        assert_eq!(exit_code(WaitStatus::StillAlive), None);
    }
}
