//! What every backend's VM is on the host: a monitor process (plus helpers) whose stdout is the
//! guest's serial console, a sandbox directory, and the agent's ready line.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::console::Console;
use super::ReadyLine;
use crate::jail::{Confinement, Jail};

/// The most of a helper's stderr kept for error messages (its last bytes).
const STDERR_LIMIT: usize = 16 * 1024;
/// The monitor's counters in the sandbox directory (ironclad-vmm's `metrics`).
pub const MONITOR_METRICS_FILE: &str = "metrics.json";
/// The most of it that is read.
const MAX_METRICS_BYTES: u64 = 64 * 1024;
/// How long the monitor may take to exit once its console has closed.
const CONSOLE_CLOSE_TO_EXIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{tool} not found: install it with `{install}` (or run `make prereqs`)")]
    MissingTool { tool: &'static str, install: &'static str },
    #[error("cannot write the VM description {path}")]
    WriteConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the guest {what} {path} does not exist (build it with `make guest`)")]
    MissingFile { what: &'static str, path: PathBuf },
    #[error("cannot prepare the sandbox directory {path}")]
    SandboxDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the network namespace {path}")]
    OpenNetns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start {program}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{daemon} exited ({status}) before creating {socket}: {stderr}")]
    DaemonExited { daemon: &'static str, status: ExitStatus, socket: PathBuf, stderr: String },
    #[error("{daemon} did not listen on {socket} within {waited:?}")]
    DaemonTimeout { daemon: &'static str, socket: PathBuf, waited: Duration },
    #[error("{backend} cannot boot this sandbox: {reason}")]
    Unsupported { backend: &'static str, reason: &'static str },
    #[error(
        "{monitor} exited ({status}) before the agent was ready; stderr: {stderr}; console tail:\n{console}"
    )]
    ExitedBeforeReady { monitor: String, status: Exit, stderr: String, console: String },
    #[error("the agent was not ready within {waited:?}; console tail:\n{console}")]
    ReadyTimeout { waited: Duration, console: String },
    #[error(transparent)]
    Jail(#[from] crate::jail::Error),
    #[error("cannot wait for {what}")]
    Wait {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Fails unless the kernel and initrd exist.
pub fn require_guest_files(kernel: &Path, initrd: &Path) -> Result<(), Error> {
    for (what, path) in [("kernel", kernel), ("initrd", initrd)] {
        if !path.is_file() {
            return Err(Error::MissingFile { what, path: path.to_path_buf() });
        }
    }
    Ok(())
}

/// Creates the sandbox directory, readable by root alone (and by the sandbox's jailed helpers,
/// whose uid owns it): the VM description and the sockets in it are nobody else's business.
pub fn create_sandbox_dir(dir: &Path, jail: Option<&Jail>) -> Result<(), Error> {
    use std::os::unix::fs::DirBuilderExt;
    let err = |source| Error::SandboxDir { path: dir.to_path_buf(), source };
    if dir.exists() {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "a sandbox with this id already exists",
        )));
    }
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    std::fs::DirBuilder::new().mode(0o700).create(dir).map_err(err)?;
    if let Some(jail) = jail {
        if let Err(failed) = jail.give(dir) {
            remove_sandbox_dir(dir);
            return Err(failed.into());
        }
    }
    Ok(())
}

/// Removes the sandbox directory unless disarmed, so that a failed start leaves nothing behind.
pub struct SandboxDirGuard(pub Option<PathBuf>);

impl Drop for SandboxDirGuard {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            remove_sandbox_dir(&dir);
        }
    }
}

fn remove_sandbox_dir(dir: &Path) {
    if let Err(err) = std::fs::remove_dir_all(dir) {
        if err.kind() != std::io::ErrorKind::NotFound {
            warn!("cannot remove sandbox directory {}: {err}", dir.display());
        }
    }
}

/// Reads a helper's stderr to its end, keeping the last STDERR_LIMIT bytes. Reading on past the
/// limit matters: a pipe closed early makes the helper's next write fail, and a monitor that
/// dies of that would be killed by its own guest's chatter.
pub async fn drain_stderr<R: AsyncRead + Unpin>(pipe: Option<R>) -> String {
    let Some(mut pipe) = pipe else { return String::new() };
    let mut kept: VecDeque<u8> = VecDeque::with_capacity(STDERR_LIMIT);
    let mut buf = [0u8; 4096];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.extend(&buf[..n]);
                let excess = kept.len().saturating_sub(STDERR_LIMIT);
                kept.drain(..excess);
            }
        }
    }
    String::from_utf8_lossy(kept.make_contiguous()).trim().to_string()
}

/// The agent's ready line and how long after the monitor's start it came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    pub line: ReadyLine,
    pub since_start: Duration,
}

/// The read end of a pipe from the monitor (its stdout, the console, or its stderr).
type Pipe = Box<dyn AsyncRead + Send + Unpin>;

/// How a VM process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The status of a process the shim started.
    Status(ExitStatus),
    /// A process handed over by ironclad-pool ended: its status is the pool's, its parent, to reap.
    NotOurChild,
}

impl Exit {
    pub fn success(&self) -> bool {
        matches!(self, Exit::Status(status) if status.success())
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Status(status) => write!(f, "{status}"),
            Exit::NotOurChild => f.write_str("status unknown: ironclad-pool's child"),
        }
    }
}

/// A process of the VM on the host: one the shim started, or one ironclad-pool started and handed
/// over, known by its pidfd.
pub enum HostProcess {
    Child(Child),
    Adopted(PidFd),
    /// Given away with the rest of its VM ([`GuestVm::hand_over`]): nothing of it is ours.
    HandedOver,
}

/// A process that is not ours to reap, watched and signalled through its pidfd (which, unlike a
/// pid, never names another process).
pub struct PidFd {
    pid: u32,
    fd: AsyncFd<OwnedFd>,
}

impl PidFd {
    /// Takes charge of `fd`, a pidfd of process `pid`.
    pub fn new(pid: u32, fd: OwnedFd) -> std::io::Result<PidFd> {
        // SAFETY: the OwnedFd moves into the AsyncFd, which keeps it open for as long as it lives.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(std::io::Error::from)?;
        Ok(PidFd { pid, fd })
    }

    /// Sends `signal`; a process that has exited already is no error.
    pub fn signal(&self, signal: libc::c_int) -> std::io::Result<()> {
        pidfd_send_signal(self.fd.get_ref().as_fd(), signal)
    }

    /// Returns once the process has exited.
    pub async fn exited(&self) {
        let _ = self.fd.readable().await;
    }

    /// A second pidfd of the same process.
    pub fn try_clone(&self) -> std::io::Result<OwnedFd> {
        self.fd.get_ref().try_clone()
    }
}

impl HostProcess {
    pub fn id(&self) -> Option<u32> {
        match self {
            HostProcess::Child(child) => child.id(),
            HostProcess::Adopted(process) => Some(process.pid),
            HostProcess::HandedOver => None,
        }
    }

    /// SIGKILL, without waiting.
    pub fn start_kill(&mut self) {
        match self {
            HostProcess::Child(child) => {
                let _ = child.start_kill();
            }
            HostProcess::Adopted(process) => {
                let _ = process.signal(libc::SIGKILL);
            }
            HostProcess::HandedOver => {}
        }
    }

    pub async fn wait(&mut self) -> std::io::Result<Exit> {
        match self {
            HostProcess::Child(child) => child.wait().await.map(Exit::Status),
            HostProcess::Adopted(process) => {
                process.exited().await;
                Ok(Exit::NotOurChild)
            }
            HostProcess::HandedOver => Ok(Exit::NotOurChild),
        }
    }

    /// A pidfd of the process, which becomes readable when it exits.
    pub fn exit_fd(&self) -> std::io::Result<OwnedFd> {
        match self {
            HostProcess::Child(child) => {
                pidfd_open(child.id().ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))?)
            }
            HostProcess::Adopted(process) => process.try_clone(),
            HostProcess::HandedOver => Err(std::io::Error::from(std::io::ErrorKind::NotFound)),
        }
    }
}

/// Sends `signal` to the process `pidfd` names; one that has exited already is no error.
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, signal: libc::c_int) -> std::io::Result<()> {
    // SAFETY: pidfd_send_signal takes the pidfd, a signal number, no siginfo and no flags by
    // value; no memory is shared with the kernel.
    let sent = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    match sent {
        0 => Ok(()),
        _ => match std::io::Error::last_os_error() {
            err if err.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            err => Err(err),
        },
    }
}

/// A pidfd of process `pid`.
pub fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: pidfd_open takes a pid and flags by value and returns a new descriptor or -1; no
    // memory is shared with the kernel.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))?;
    // SAFETY: the descriptor was just returned by pidfd_open and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// What ironclad-pool hands over of a VM it booted: its processes (the monitor first) by pidfd,
/// the read ends of the monitor's console and stderr, and what the shim would have learnt at boot.
pub struct AdoptedVm {
    pub monitor_name: String,
    pub processes: Vec<PidFd>,
    pub console: OwnedFd,
    pub stderr: OwnedFd,
    pub agent_socket: PathBuf,
    pub ready: Ready,
    pub guest_message_limit: u32,
}

/// What a VM is made of once it is handed over: its children (the monitor first), which the pool
/// keeps reaping, and the rest for the shim (see [`AdoptedVm`]).
pub struct HandedOver {
    pub children: Vec<Child>,
    pub console: OwnedFd,
    pub stderr: OwnedFd,
    pub agent_socket: PathBuf,
    pub ready: Ready,
    pub guest_message_limit: u32,
}

/// A running sandbox VM: its monitor process (QEMU, ironclad-vmm), whose stdout is the guest's
/// serial console, and the helper processes it needs (vhost-device-vsock for QEMU).
pub struct GuestVm {
    monitor_name: String,
    monitor: HostProcess,
    helpers: Vec<HostProcess>,
    agent_socket: PathBuf,
    started: Instant,
    console: Console,
    ready_rx: Option<oneshot::Receiver<ReadyLine>>,
    ready: Option<Ready>,
    stderr: Arc<Mutex<String>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    sandbox_dir: Option<PathBuf>,
    guest_message_limit: u32,
    /// Second read ends of the console and of the monitor's stderr, kept so that the VM can be
    /// handed over (the first ones are its readers').
    pipes: Option<(OwnedFd, OwnedFd)>,
}

impl GuestVm {
    /// Starts the monitor with its stdout as the console. The helpers are killed if that fails;
    /// from then on they live and die with the VM.
    pub async fn spawn(
        monitor_name: &str,
        launch: Launch<'_>,
        console_log: PathBuf,
        agent_socket: PathBuf,
        netns: Option<&Path>,
        mut helpers: Vec<Child>,
    ) -> Result<GuestVm, Error> {
        let started = Instant::now();
        let spawned = match netns.map(|path| (path, std::fs::File::open(path))) {
            Some((path, Err(source))) => Err(Error::OpenNetns { path: path.to_path_buf(), source }),
            Some((_, Ok(netns))) => spawn_monitor(&launch, Some(&netns)),
            None => spawn_monitor(&launch, None),
        };
        let spawned = match spawned {
            Ok(mut child) => launch.admit(monitor_name, &mut child).await.map(|()| child),
            Err(err) => Err(err),
        };
        let mut monitor = match spawned {
            Ok(child) => child,
            Err(err) => {
                for helper in &mut helpers {
                    let _ = helper.start_kill();
                    let _ = helper.wait().await;
                }
                return Err(err);
            }
        };
        let pipes = match (monitor.stdout.as_ref(), monitor.stderr.as_ref()) {
            (Some(stdout), Some(stderr)) => stdout
                .as_fd()
                .try_clone_to_owned()
                .and_then(|console| Ok((console, stderr.as_fd().try_clone_to_owned()?)))
                .ok(),
            _ => None,
        };
        let stdout = monitor.stdout.take().map(|pipe| Box::new(pipe) as Pipe);
        let stderr = monitor.stderr.take().map(|pipe| Box::new(pipe) as Pipe);
        let mut vm = GuestVm::following(
            monitor_name,
            HostProcess::Child(monitor),
            helpers.into_iter().map(HostProcess::Child).collect(),
            agent_socket,
            console_log,
            (stdout, stderr),
        );
        vm.started = started;
        vm.pipes = pipes;
        Ok(vm)
    }

    /// A VM ironclad-pool booted and handed over: its console and stderr are read from here on,
    /// its ready line is the one the pool saw.
    pub fn adopt(adopted: AdoptedVm, console_log: PathBuf) -> std::io::Result<GuestVm> {
        let console = tokio::net::unix::pipe::Receiver::from_owned_fd(adopted.console)?;
        let stderr = tokio::net::unix::pipe::Receiver::from_owned_fd(adopted.stderr)?;
        let mut processes = adopted.processes.into_iter().map(HostProcess::Adopted);
        let monitor = processes.next().ok_or_else(|| std::io::Error::other("no monitor process"))?;
        let mut vm = GuestVm::following(
            &adopted.monitor_name,
            monitor,
            processes.collect(),
            adopted.agent_socket,
            console_log,
            (Some(Box::new(console)), Some(Box::new(stderr))),
        );
        vm.ready_rx = None;
        vm.ready = Some(adopted.ready);
        vm.guest_message_limit = adopted.guest_message_limit;
        Ok(vm)
    }

    /// The VM with readers on its console (the log, the ready line, the tail) and on its
    /// monitor's stderr.
    fn following(
        monitor_name: &str,
        monitor: HostProcess,
        helpers: Vec<HostProcess>,
        agent_socket: PathBuf,
        console_log: PathBuf,
        (stdout, stderr): (Option<Pipe>, Option<Pipe>),
    ) -> GuestVm {
        // The console log is `<task id>.console.log`: the task names the agent's lines.
        let label = console_log
            .file_name()
            .and_then(|n| n.to_str())
            .map(|n| n.trim_end_matches(".log").trim_end_matches(".console").to_string())
            .unwrap_or_default();
        let console = Console::labelled(&label);
        let (ready_tx, ready_rx) = oneshot::channel();
        let console_for_task = console.clone();
        let console_task = tokio::spawn(async move {
            if let Some(stdout) = stdout {
                console_for_task.follow(stdout, &console_log, ready_tx).await;
            }
        });
        let stderr_text = Arc::new(Mutex::new(String::new()));
        let stderr_task = {
            let sink = stderr_text.clone();
            tokio::spawn(async move {
                let text = drain_stderr(stderr).await;
                if let Ok(mut s) = sink.lock() {
                    *s = text;
                }
            })
        };
        GuestVm {
            monitor_name: monitor_name.to_string(),
            monitor,
            helpers,
            agent_socket,
            started: Instant::now(),
            console,
            ready_rx: Some(ready_rx),
            ready: None,
            stderr: stderr_text,
            tasks: vec![console_task, stderr_task],
            sandbox_dir: None,
            guest_message_limit: 0,
            pipes: None,
        }
    }

    /// Gives the VM away whole (ironclad-pool to a shim): its readers stop, its processes stay.
    /// None for a VM that cannot be: one adopted itself, or whose pipes could not be kept.
    pub fn hand_over(mut self) -> Option<HandedOver> {
        let ours = |process: &HostProcess| matches!(process, HostProcess::Child(_));
        if !ours(&self.monitor) || !self.helpers.iter().all(ours) {
            return None;
        }
        let ready = self.ready.clone()?;
        let (console, stderr) = self.pipes.take()?;
        // The directory goes with the VM, to be removed by its new owner.
        self.sandbox_dir = None;
        for task in self.tasks.drain(..) {
            task.abort();
        }
        let monitor = std::mem::replace(&mut self.monitor, HostProcess::HandedOver);
        let children = std::iter::once(monitor)
            .chain(std::mem::take(&mut self.helpers))
            .filter_map(|process| match process {
                HostProcess::Child(child) => Some(child),
                HostProcess::Adopted(_) | HostProcess::HandedOver => None,
            })
            .collect();
        Some(HandedOver {
            children,
            console,
            stderr,
            agent_socket: self.agent_socket.clone(),
            ready,
            guest_message_limit: self.guest_message_limit,
        })
    }

    /// The largest message the guest may send the host in one write (0: no limit of the
    /// device's own). A backend whose vsock device takes a packet's data from one descriptor only
    /// sets one: Linux sends payloads over about 32 KiB in page fragments, one descriptor each.
    pub fn guest_message_limit(&self) -> u32 {
        self.guest_message_limit
    }

    pub fn limit_guest_messages(&mut self, max: u32) {
        self.guest_message_limit = max;
    }

    /// The VM owns the sandbox directory from now on and removes it when it goes.
    pub fn adopt_sandbox_dir(&mut self, guard: &mut SandboxDirGuard) {
        self.sandbox_dir = guard.0.take();
    }
    /// QEMU's or ironclad-vmm's name, for messages.
    pub fn monitor_name(&self) -> &str {
        &self.monitor_name
    }

    /// The hybrid vsock socket to reach the agent through.
    pub fn agent_socket(&self) -> &Path {
        &self.agent_socket
    }

    /// The host processes making up this VM.
    pub fn pids(&self) -> Vec<u32> {
        std::iter::once(&self.monitor).chain(&self.helpers).filter_map(|c| c.id()).collect()
    }

    /// The last lines the guest printed (as it printed them: escape before logging).
    pub fn console_tail(&self) -> String {
        self.console.tail()
    }

    /// SIGKILL to the monitor, without waiting: the VM ends now.
    pub fn kill_monitor(&mut self) {
        self.monitor.start_kill();
    }

    /// A pidfd of the monitor, readable once it has exited.
    pub fn monitor_exit_fd(&self) -> std::io::Result<OwnedFd> {
        self.monitor.exit_fd()
    }

    /// Waits for the agent's ready line; the monitor exiting first or the time running out is an error that
    /// carries the console's last lines.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<Ready, Error> {
        if let Some(ready) = &self.ready {
            return Ok(ready.clone());
        }
        let Some(rx) = self.ready_rx.as_mut() else {
            return Err(Error::ReadyTimeout { waited: Duration::ZERO, console: self.console.tail() });
        };
        let line = tokio::select! {
            line = rx => line.ok(),
            _ = tokio::time::sleep(timeout) => {
                return Err(Error::ReadyTimeout { waited: timeout, console: self.console.tail() });
            }
        };
        self.ready_rx = None;
        let Some(line) = line else {
            // The console closed without a ready line: the monitor is exiting or gone.
            return Err(self.exited_before_ready().await);
        };
        let ready = Ready { line, since_start: self.started.elapsed() };
        self.ready = Some(ready.clone());
        Ok(ready)
    }

    async fn exited_before_ready(&mut self) -> Error {
        let status = match self.wait_exit(CONSOLE_CLOSE_TO_EXIT).await {
            Ok(Some(status)) => status,
            Ok(None) => {
                self.monitor.start_kill();
                match self.monitor.wait().await {
                    Ok(status) => status,
                    Err(source) => return Error::Wait { what: "the VM monitor", source },
                }
            }
            Err(err) => return err,
        };
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        let stderr = self.stderr.lock().map(|s| s.clone()).unwrap_or_default();
        Error::ExitedBeforeReady {
            monitor: self.monitor_name.clone(),
            status,
            stderr,
            console: self.console.tail(),
        }
    }

    /// Waits for the monitor to exit on its own (the guest reset or powered off) for up to `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<Option<Exit>, Error> {
        match tokio::time::timeout(timeout, self.monitor.wait()).await {
            Ok(status) => status.map(Some).map_err(|source| Error::Wait { what: "the VM monitor", source }),
            Err(_) => Ok(None),
        }
    }

    /// Gives the monitor `grace` to exit by itself, kills it after that, then stops the helpers and
    /// removes the sandbox directory. Returns the monitor's exit status.
    pub async fn stop(mut self, grace: Duration) -> Result<Exit, Error> {
        let status = match self.wait_exit(grace).await? {
            Some(status) => status,
            None => {
                warn!(
                    "{} did not exit within {grace:?}; killing it. Console tail: {}",
                    self.monitor_name,
                    crate::guest_text::clean(&self.console.tail())
                );
                self.monitor.start_kill();
                self.monitor.wait().await.map_err(|source| Error::Wait { what: "the VM monitor", source })?
            }
        };
        for helper in &mut self.helpers {
            helper.start_kill();
            helper.wait().await.map_err(|source| Error::Wait { what: "a helper process", source })?;
        }
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        if let Some(counters) = self.monitor_counters() {
            info!("{} counters at exit: {counters}", self.monitor_name);
        }
        if let Some(dir) = self.sandbox_dir.take() {
            remove_sandbox_dir(&dir);
        }
        Ok(status)
    }

    /// What the monitor's metrics file (`metrics.json` in the sandbox directory, which
    /// ironclad-vmm writes every second and at exit) says, as one line; None without one.
    pub fn monitor_counters(&self) -> Option<String> {
        let path = self.sandbox_dir.as_ref()?.join(MONITOR_METRICS_FILE);
        let file = std::fs::File::open(path).ok()?;
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::Read::take(file, MAX_METRICS_BYTES), &mut text).ok()?;
        let value: serde_json::Value = serde_json::from_str(&text).ok()?;
        Some(value.to_string())
    }
}

impl Drop for GuestVm {
    fn drop(&mut self) {
        // kill_on_drop sends SIGKILL to every child; the directory goes with them.
        self.monitor.start_kill();
        for helper in &mut self.helpers {
            helper.start_kill();
        }
        if let Some(dir) = self.sandbox_dir.take() {
            remove_sandbox_dir(&dir);
        }
    }
}

/// A monitor or helper to start: as it is, or through the sandbox's jail with what it may reach.
pub struct Launch<'a> {
    program: &'a Path,
    args: Vec<OsString>,
    jail: Option<(&'a Jail, Confinement)>,
    /// Descriptors the program inherits (through its jailer), at the same numbers.
    inherited: Vec<BorrowedFd<'a>>,
}

impl<'a> Launch<'a> {
    pub fn new(
        program: &'a Path,
        args: Vec<OsString>,
        jail: Option<&'a Jail>,
        confinement: Confinement,
    ) -> Self {
        Launch { program, args, jail: jail.map(|jail| (jail, confinement)), inherited: vec![] }
    }

    /// The program keeps these descriptors open across its exec, at the same numbers.
    pub fn inheriting(mut self, fds: Vec<BorrowedFd<'a>>) -> Self {
        self.inherited = fds;
        self
    }

    /// Without a jail (the tests' stand-ins).
    pub fn plain(program: &'a Path, args: Vec<OsString>) -> Self {
        Launch { program, args, jail: None, inherited: vec![] }
    }

    /// Its command: standard input is /dev/null, or the jailer's go-ahead pipe.
    fn command(&self) -> Command {
        let mut command = match &self.jail {
            Some((jail, confinement)) => jail.command(self.program, &self.args, confinement),
            None => {
                let mut command = Command::new(self.program);
                command.args(&self.args).stdin(Stdio::null());
                command
            }
        };
        if !self.inherited.is_empty() {
            let fds: Vec<RawFd> = self.inherited.iter().map(AsRawFd::as_raw_fd).collect();
            // SAFETY: between fork and exec the child only calls fcntl, which is async-signal-safe,
            // on descriptors `self` borrows, so open until spawn returns; it touches no memory but
            // the vector moved into the closure. Only the child's copies lose close-on-exec.
            unsafe {
                command.pre_exec(move || {
                    for fd in &fds {
                        if libc::fcntl(*fd, libc::F_SETFD, 0) == -1 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        command
    }

    /// Lets a jailed start go on once it is in the sandbox's cgroup.
    async fn admit(&self, name: &str, child: &mut Child) -> Result<(), Error> {
        match &self.jail {
            Some((jail, _)) => Ok(jail.admit(name, child).await?),
            None => Ok(()),
        }
    }
}

/// Starts the monitor, in `netns` when given (where the sandbox's taps are).
fn spawn_monitor(launch: &Launch<'_>, netns: Option<&std::fs::File>) -> Result<Child, Error> {
    let mut command = launch.command();
    command.stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    if let Some(netns) = netns {
        let fd = std::os::fd::AsRawFd::as_raw_fd(netns);
        // SAFETY: between fork and exec the child only calls setns, which is async-signal-safe and
        // changes the child's own network namespace; `fd` stays open until spawn returns.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    command.spawn().map_err(|source| Error::Spawn { program: launch.program.to_path_buf(), source })
}

/// How long a vhost-user daemon gets to create its socket.
const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts a vhost-user daemon and waits until it listens on its socket. One that dies first is
/// reported with its stderr; one that takes too long is killed.
pub async fn start_daemon(
    daemon: &'static str,
    launch: Launch<'_>,
    socket: PathBuf,
) -> Result<tokio::process::Child, Error> {
    let mut child = launch
        .command()
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| Error::Spawn { program: launch.program.to_path_buf(), source })?;
    launch.admit(daemon, &mut child).await?;
    let started = Instant::now();
    while !is_listening(&socket) {
        if let Some(status) = child.try_wait().map_err(|source| Error::Wait { what: daemon, source })? {
            let stderr = drain_stderr(child.stderr.take()).await;
            return Err(Error::DaemonExited { daemon, status, socket, stderr });
        }
        if started.elapsed() > DAEMON_START_TIMEOUT {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(Error::DaemonTimeout { daemon, socket, waited: started.elapsed() });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Read for as long as it runs: a full pipe would stall it, and with it the guest's device.
    tokio::spawn(drain_stderr(child.stderr.take()));
    Ok(child)
}

/// Whether a Unix socket bound at `socket` listens. Its file appears at bind(), a moment before
/// listen(): a client connecting in between is refused (QEMU then exits). The daemons stay in the
/// shim's network namespace, so the shim's own socket table shows theirs.
fn is_listening(socket: &Path) -> bool {
    std::fs::read_to_string("/proc/self/net/unix").is_ok_and(|table| listens_in_unix_table(&table, socket))
}

/// `__SO_ACCEPTCON` in /proc/net/unix's Flags column: the socket listens.
const UNIX_SOCKET_LISTENS: u32 = 0x0001_0000;

/// Whether /proc/net/unix (`Num RefCount Protocol Flags Type St Inode Path`) shows a listening
/// socket bound at `socket`.
fn listens_in_unix_table(table: &str, socket: &Path) -> bool {
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let flags = fields.get(3).and_then(|flags| u32::from_str_radix(flags, 16).ok());
        flags.is_some_and(|flags| flags & UNIX_SOCKET_LISTENS != 0)
            && fields.get(7).copied() == socket.to_str()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_listening_socket_at_that_path_counts() {
        let table = "Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 4242 /run/sb/vhost-vsock.sock
0000000000000000: 00000002 00000000 00000000 0001 01 4243 /run/other/vhost-vsock.sock
0000000000000000: 00000003 00000000 00000000 0001 03 4244
";
        assert!(listens_in_unix_table(table, Path::new("/run/sb/vhost-vsock.sock")));
        assert!(
            !listens_in_unix_table(table, Path::new("/run/other/vhost-vsock.sock")),
            "bound, not listening"
        );
        assert!(!listens_in_unix_table(table, Path::new("/run/sb")));
        assert!(!listens_in_unix_table("", Path::new("/run/sb/vhost-vsock.sock")));
    }

    #[test]
    fn a_daemon_counts_as_started_once_it_listens_not_when_its_socket_file_appears() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("d.sock");
        let bound = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        assert!(is_listening(&socket), "std's bind listens at once");
        drop(bound);
        // A bound socket that does not listen yet: the file is there, a connect is refused.
        std::fs::remove_file(&socket).unwrap();
        let fd = bound_unix_socket(&socket);
        assert!(socket.exists());
        assert!(!is_listening(&socket));
        // SAFETY: `fd` is a socket this test owns.
        assert_eq!(unsafe { libc::listen(fd.as_raw_fd(), 1) }, 0);
        assert!(is_listening(&socket));
    }

    /// socket() and bind() without listen(), which std's UnixListener cannot stop between.
    fn bound_unix_socket(path: &Path) -> std::os::fd::OwnedFd {
        use std::os::fd::{AsRawFd, FromRawFd};
        use std::os::unix::ffi::OsStrExt;
        // SAFETY: plain socket creation; the descriptor is owned by the OwnedFd from here on.
        let fd =
            unsafe { std::os::fd::OwnedFd::from_raw_fd(libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0)) };
        // SAFETY: sockaddr_un is plain data, all zeroes is a valid empty address.
        let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        address.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (slot, byte) in address.sun_path.iter_mut().zip(path.as_os_str().as_bytes()) {
            *slot = *byte as libc::c_char;
        }
        let length = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        // SAFETY: `address` is an initialised sockaddr_un of `length` bytes, NUL-terminated (the
        // temporary path is far shorter than sun_path).
        let bound = unsafe { libc::bind(fd.as_raw_fd(), std::ptr::addr_of!(address).cast(), length) };
        assert_eq!(bound, 0, "{}", std::io::Error::last_os_error());
        fd
    }

    #[tokio::test]
    async fn a_monitor_chatty_on_stderr_is_read_to_the_end_and_its_last_words_kept() {
        let dir = tempfile::tempdir().unwrap();
        // 3000 lines (about 60 KiB): a reader that stopped at 16 KiB would make `echo` fail.
        let script = "i=0; while [ $i -lt 3000 ]; do echo \"stderr line $i\" >&2 || exit 9; i=$((i+1)); done";
        let mut vm = GuestVm::spawn(
            "chatty",
            Launch::plain(Path::new("sh"), vec!["-c".into(), script.into()]),
            dir.path().join("console.log"),
            dir.path().join("agent.sock"),
            None,
            vec![],
        )
        .await
        .unwrap();
        let status = vm.wait_exit(Duration::from_secs(30)).await.unwrap().unwrap();
        assert!(status.success(), "the monitor's stderr writes failed: {status}");
        for task in vm.tasks.drain(..) {
            task.await.unwrap();
        }
        let kept = vm.stderr.lock().unwrap().clone();
        assert!(kept.len() <= STDERR_LIMIT);
        assert!(kept.ends_with("stderr line 2999"), "{}", &kept[kept.len().saturating_sub(40)..]);
    }

    #[test]
    fn the_sandbox_directory_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let sandbox = dir.path().join("ns/sb");
        create_sandbox_dir(&sandbox, None).unwrap();
        assert_eq!(std::fs::metadata(&sandbox).unwrap().permissions().mode() & 0o777, 0o700);
        assert!(matches!(create_sandbox_dir(&sandbox, None), Err(Error::SandboxDir { .. })));
    }
}
