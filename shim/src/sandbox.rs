//! One sandbox VM per pod (or per task outside a pod): booted at the first Create, reached through
//! its agent, stopped when that task is deleted, or from the host when the guest does not carry out
//! a SIGKILL. Its processes are
//! recorded in the task directory so that `delete` after a crashed shim can still stop them.

use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Mutex};
use tracing::{error, info, warn};

use crate::agent_client::{self, AgentClient, AGENT_PORT};
use crate::config::ShimConfig;
use crate::guest_text;
use crate::hypervisor::process::PidFd;
use crate::hypervisor::{self, error_chain, Backend, GuestVm, VmConfig};
use crate::jail::{self, Jail};
use crate::paths::SandboxPaths;
use crate::resources::share_fs::ShareFs;
use crate::timeline::Timeline;

const AGENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the guest gets to reset by itself after DestroySandbox before its monitor is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long the agent gets to answer DestroySandbox.
const DESTROY_TIMEOUT: Duration = Duration::from_secs(5);
const PIDS_FILE: &str = "vm.pids";
/// Names the network namespace the sandbox's taps and qdiscs are in, so that clean-up finds them.
pub const NETNS_FILE: &str = "netns";
/// Names the console log (kept outside the task directory) so that clean-up finds it.
const CONSOLE_LOG_FILE: &str = "console-log";
/// Names the directory of a VM taken from ironclad-pool, which goes with the sandbox.
const POOLED_VM_FILE: &str = "pooled-vm";
/// The exit status of every process of a VM that the host stopped because the guest did not
/// carry out a SIGKILL (128 + SIGKILL, what the guest should have reported).
pub const KILLED_EXIT_STATUS: u32 = 137;
/// The exit status of every process of a VM that went away under it (like Kata's).
pub const VM_GONE_EXIT_STATUS: u32 = 255;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Hypervisor(#[from] hypervisor::Error),
    #[error(transparent)]
    Agent(#[from] agent_client::Error),
    #[error("cannot record the VM's processes in {path}")]
    RecordPids {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot watch the VM monitor (pid {pid})")]
    Watch {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot record the console log's place in {path}")]
    RecordConsoleLog {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot record the pooled VM's directory in {path}")]
    RecordPooledVm {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot take charge of the pooled VM's console")]
    AdoptConsole(#[source] std::io::Error),
}

pub struct Sandbox {
    pub agent: AgentClient,
    pub backend: &'static str,
    /// The VM monitor's host pid (QEMU or ironclad-vmm).
    pub monitor_pid: u32,
    vm: Arc<Mutex<Option<GuestVm>>>,
    gone: watch::Receiver<bool>,
    stopping: Arc<AtomicBool>,
    /// The host stopped the VM because the guest did not carry out a SIGKILL.
    killed: Arc<AtomicBool>,
    /// Everything the sandbox has on the host, removed by [`Sandbox::teardown`].
    task_dir: PathBuf,
    /// The directory shared with the guest through virtio-fs, if the VM has one.
    pub share: Option<ShareFs>,
    /// Holds the sandbox's uid while it lives (its cgroup goes with the task directory).
    jail: Option<Jail>,
    /// Its start, step by step, logged when its task is deleted.
    pub timeline: Timeline,
}

/// What a sandbox holds on the host besides its VM, handed to it at boot.
pub struct Held {
    pub share: Option<ShareFs>,
    pub jail: Option<Jail>,
    pub timeline: Timeline,
}

impl Sandbox {
    /// Starts the VM in `task_dir/vm` (its console log at `console_log`), waits for its agent and
    /// connects to it. Whatever fails stops what was started.
    pub async fn boot(
        backend: &Backend,
        config: &ShimConfig,
        vm_config: &VmConfig,
        task_dir: &Path,
        console_log: PathBuf,
        held: Held,
    ) -> Result<Sandbox, Error> {
        let Held { share, jail, timeline } = held;
        record_console_log(task_dir, &console_log)?;
        let paths = SandboxPaths::new(task_dir, "vm").with_console_log(console_log);
        let mut vm = backend.start(vm_config, paths, jail.as_ref()).await?;
        let prepared = async {
            record_pids(task_dir, &vm)?;
            let ready = vm.wait_ready(Duration::from_secs(config.boot_timeout_secs)).await?;
            timeline.mark_guest_boot(ready.since_start, ready.line.uptime_ms, ready.line.init_ms);
            // The guest's part of the boot, from its own clock: the kernel up to /init, then the
            // agent up to its ready line.
            let guest_boot = match ready.line.init_ms {
                Some(init_ms) => format!(
                    "guest uptime {} ms: kernel {init_ms} ms, agent {} ms",
                    ready.line.uptime_ms,
                    ready.line.uptime_ms - init_ms
                ),
                None => format!("guest uptime {} ms", ready.line.uptime_ms),
            };
            info!(
                "{} VM ready: agent {} after {:?} ({guest_boot})",
                backend.name(),
                ready.line.version,
                ready.since_start,
            );
            let agent = AgentClient::connect(vm.agent_socket(), AGENT_PORT, AGENT_CONNECT_TIMEOUT).await?;
            Ok::<_, Error>(agent.with_output_chunk(vm.guest_message_limit()))
        }
        .await;
        match prepared {
            Ok(agent) => Self::run(vm, agent, backend.name(), task_dir.to_path_buf(), share)
                .map(|sandbox| sandbox.holding(jail, timeline)),
            Err(err) => {
                let _ = vm.stop(Duration::ZERO).await;
                Err(err)
            }
        }
    }

    /// Takes charge of a VM ironclad-pool booted (`pooled_dir` is its directory): recorded in
    /// `task_dir` first, so that the sandbox's clean-up removes it whatever happens next, then
    /// its agent connected.
    pub async fn adopt(
        adopted: crate::hypervisor::process::AdoptedVm,
        pooled_dir: &Path,
        backend: &'static str,
        task_dir: &Path,
        console_log: PathBuf,
        held: Held,
    ) -> Result<Sandbox, Error> {
        record_pooled_vm(task_dir, pooled_dir)?;
        record_console_log(task_dir, &console_log)?;
        let Held { share, jail, timeline } = held;
        let vm = GuestVm::adopt(adopted, console_log).map_err(Error::AdoptConsole)?;
        let connected = async {
            record_pids(task_dir, &vm)?;
            let agent = AgentClient::connect(vm.agent_socket(), AGENT_PORT, AGENT_CONNECT_TIMEOUT).await?;
            // The VM was booted before this start: its agent counts as ready once connected.
            timeline.mark(crate::timeline::Step::AgentReady);
            Ok::<_, Error>(agent.with_output_chunk(vm.guest_message_limit()))
        }
        .await;
        match connected {
            Ok(agent) => Self::run(vm, agent, backend, task_dir.to_path_buf(), share)
                .map(|sandbox| sandbox.holding(jail, timeline)),
            Err(err) => {
                let _ = vm.stop(Duration::ZERO).await;
                Err(err)
            }
        }
    }

    /// Takes charge of a started VM whose agent is connected: from now on its monitor's exit is
    /// watched. A VM that cannot be watched is stopped.
    pub fn run(
        vm: GuestVm,
        agent: AgentClient,
        backend: &'static str,
        task_dir: PathBuf,
        share: Option<ShareFs>,
    ) -> Result<Sandbox, Error> {
        let monitor = vm.pids().first().copied().unwrap_or_default();
        let exited = match vm.monitor_exit_fd().and_then(|fd| PidFd::new(monitor, fd)) {
            Ok(exited) => exited,
            Err(source) => {
                drop(vm);
                return Err(Error::Watch { pid: monitor, source });
            }
        };
        let vm = Arc::new(Mutex::new(Some(vm)));
        let stopping = Arc::new(AtomicBool::new(false));
        let killed = Arc::new(AtomicBool::new(false));
        let (gone_tx, gone) = watch::channel(false);
        tokio::spawn(watch_monitor(exited, vm.clone(), stopping.clone(), killed.clone(), gone_tx));
        Ok(Sandbox {
            agent,
            backend,
            monitor_pid: monitor,
            vm,
            gone,
            stopping,
            killed,
            task_dir,
            share,
            jail: None,
            timeline: Timeline::default(),
        })
    }

    fn holding(mut self, jail: Option<Jail>, timeline: Timeline) -> Self {
        self.jail = jail;
        self.timeline = timeline;
        self
    }

    /// The uid its helpers run as, when they are jailed.
    pub fn jail_uid(&self) -> Option<u32> {
        self.jail.as_ref().map(Jail::uid)
    }

    /// Becomes true when the VM has gone, expectedly or not.
    pub fn gone(&self) -> watch::Receiver<bool> {
        self.gone.clone()
    }

    pub fn is_gone(&self) -> bool {
        *self.gone.borrow()
    }

    /// The exit status of a process whose VM is gone: SIGKILL's when the host stopped it for not
    /// carrying one out, else the VM's failure.
    pub fn gone_exit_status(&self) -> u32 {
        if self.killed.load(Ordering::SeqCst) {
            KILLED_EXIT_STATUS
        } else {
            VM_GONE_EXIT_STATUS
        }
    }

    /// Stops the VM from the host at once (SIGKILL to its monitor): the guest did not carry out a
    /// SIGKILL in time. Every process of the sandbox then exits with KILLED_EXIT_STATUS.
    pub async fn kill(&self) {
        if self.is_gone() {
            return;
        }
        self.killed.store(true, Ordering::SeqCst);
        if let Some(vm) = self.vm.lock().await.as_mut() {
            warn!("the guest did not carry out SIGKILL in time: stopping its VM from the host");
            vm.kill_monitor();
        }
    }

    /// The one way a sandbox ends: the VM stopped (see [`Sandbox::stop`]), then everything it had on
    /// the host removed. Safe to call twice.
    pub async fn teardown(&self) {
        self.stop().await;
        clean_up_task_dir_off_the_runtime(&self.task_dir).await;
    }

    /// Asks the agent to end the guest, then stops the monitor and its helpers and removes the
    /// VM's directory. Safe to call twice.
    pub async fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        if !self.is_gone() {
            match tokio::time::timeout(DESTROY_TIMEOUT, self.agent.destroy_sandbox()).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => warn!("DestroySandbox failed, the VM will be killed: {}", error_chain(&err)),
                Err(_) => warn!("DestroySandbox: no answer in {DESTROY_TIMEOUT:?}, the VM will be killed"),
            }
        }
        let Some(vm) = self.vm.lock().await.take() else { return };
        match vm.stop(STOP_GRACE).await {
            Ok(status) => info!("sandbox VM stopped ({status})"),
            Err(err) => warn!("stopping the sandbox VM: {}", error_chain(&err)),
        }
    }
}

/// Records in `task_dir` that the pooled VM in `pooled_dir` is its sandbox's, for clean-up.
/// ironclad-pool writes it before it replies (a shim that dies before its own write then leaves
/// no VM: containerd's `delete` finds it), the shim again when it adopts the VM.
pub fn record_pooled_vm(task_dir: &Path, pooled_dir: &Path) -> Result<(), Error> {
    let record = task_dir.join(POOLED_VM_FILE);
    std::fs::write(&record, pooled_dir.as_os_str().as_encoded_bytes())
        .map_err(|source| Error::RecordPooledVm { path: record, source })
}

/// Takes back [`record_pooled_vm`]'s record: the VM was not handed over after all (the pool
/// removed it itself), and a later VM must not be mistaken for it.
pub fn withdraw_pooled_vm_record(task_dir: &Path) {
    let _ = std::fs::remove_file(task_dir.join(POOLED_VM_FILE));
}

/// Records where the console log is, for clean-up.
pub fn record_console_log(task_dir: &Path, console_log: &Path) -> Result<(), Error> {
    let record = task_dir.join(CONSOLE_LOG_FILE);
    std::fs::write(&record, console_log.as_os_str().as_encoded_bytes())
        .map_err(|source| Error::RecordConsoleLog { path: record, source })
}

/// Records the VM's host processes, for clean-up after a crash.
pub fn record_pids(task_dir: &Path, vm: &GuestVm) -> Result<(), Error> {
    let record = task_dir.join(PIDS_FILE);
    let pids: String = vm.pids().iter().map(|pid| format!("{pid}\n")).collect();
    std::fs::write(&record, pids).map_err(|source| Error::RecordPids { path: record, source })
}

/// Marks the sandbox gone when the monitor exits, and says why when nobody asked it to.
async fn watch_monitor(
    exited: PidFd,
    vm: Arc<Mutex<Option<GuestVm>>>,
    stopping: Arc<AtomicBool>,
    killed: Arc<AtomicBool>,
    gone: watch::Sender<bool>,
) {
    exited.exited().await;
    if !stopping.load(Ordering::SeqCst) && !killed.load(Ordering::SeqCst) {
        let mut vm = vm.lock().await;
        if let Some(vm) = vm.as_mut() {
            let status = vm.wait_exit(Duration::from_secs(1)).await.ok().flatten();
            let status = status.map(|s| s.to_string()).unwrap_or_else(|| "status unknown".into());
            let counters = vm.monitor_counters().unwrap_or_else(|| "none".into());
            error!(
                "the sandbox VM exited unexpectedly ({status}); every task ends now. Monitor counters: \
                 {counters}. Console tail: {}",
                guest_text::clean(&vm.console_tail())
            );
        }
    }
    let _ = gone.send(true);
}

/// Detaches every mount at or below `dir`, deepest first (mount points as /proc/self/mountinfo
/// lists them).
pub fn unmount_below(dir: &Path) {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<&Path> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(Path::new)
        .filter(|m| m.starts_with(dir))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
    for mount_point in mounts {
        let _ = nix::mount::umount2(mount_point, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// How long clean-up waits for killed VM processes to be gone. containerd gives `delete` 5 s in all.
const KILLED_EXIT_WAIT: Duration = Duration::from_secs(3);

/// Whether process `pid` exists and is not a zombie (whose parent has yet to reap it).
pub fn process_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
        .unwrap_or(false)
}

/// Waits (bounded) until none of `pids` exists any more (a zombie of ours counts as gone).
fn wait_until_gone(pids: &[i32], wait: Duration) {
    let started = std::time::Instant::now();
    while pids.iter().any(|&pid| process_alive(pid)) && started.elapsed() < wait {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// [`clean_up_task_dir`] on one of the runtime's blocking threads: it waits for killed processes
/// to exit (tens of seconds at worst), which must not hold up a worker that serves other tasks.
pub async fn clean_up_task_dir_off_the_runtime(task_dir: &Path) {
    let task_dir = task_dir.to_path_buf();
    if let Err(err) = tokio::task::spawn_blocking(move || clean_up_task_dir(&task_dir)).await {
        warn!("the clean-up of a task directory stopped: {err}");
    }
}

/// After a crashed shim: kills the VM processes recorded in `task_dir` (only those whose command
/// line still names the directory, so a reused pid is left alone), unmounts what is mounted below
/// it and removes it. Doing it twice is harmless.
pub fn clean_up_task_dir(task_dir: &Path) {
    if let Ok(pooled) = std::fs::read(task_dir.join(POOLED_VM_FILE)) {
        // The VM taken from ironclad-pool: its processes name its own directory, not this one.
        clean_up_task_dir(&PathBuf::from(std::ffi::OsString::from_vec(pooled)));
    }
    if let Ok(console_log) = std::fs::read(task_dir.join(CONSOLE_LOG_FILE)) {
        let console_log = PathBuf::from(std::ffi::OsString::from_vec(console_log));
        for log in [crate::hypervisor::console::rotated_path(&console_log), console_log.clone()] {
            let _ = std::fs::remove_file(log);
        }
        // The namespace's log directory goes with its last task (remove_dir fails while others remain).
        if let Some(namespace_dir) = console_log.parent() {
            let _ = std::fs::remove_dir(namespace_dir);
        }
    }
    let marker = task_dir.to_string_lossy().into_owned();
    let recorded = std::fs::read_to_string(task_dir.join(PIDS_FILE)).unwrap_or_default();
    let mut killed = Vec::new();
    for pid in recorded.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&marker) {
            warn!("killing leftover VM process {pid}");
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            killed.push(pid);
        }
    }
    // A killed monitor holds its tap until the kernel has torn it down.
    wait_until_gone(&killed, KILLED_EXIT_WAIT);
    // Whatever of the sandbox's jailed helpers is left dies with its cgroup.
    jail::remove_cgroup(task_dir);
    if let Ok(netns) = std::fs::read(task_dir.join(NETNS_FILE)) {
        let netns = PathBuf::from(std::ffi::OsString::from_vec(netns));
        // A namespace the shim made goes, with its tap, when it is unmounted below; only one that
        // is someone else's (CRI's) needs the tap and qdiscs taken out.
        if !netns.starts_with(task_dir) {
            if let Err(err) = crate::resources::network::clean_up_blocking(&netns) {
                warn!("cannot remove the sandbox's taps and qdiscs: {}", error_chain(&err));
            }
        }
    }
    unmount_below(task_dir);
    if let Err(err) = std::fs::remove_dir_all(task_dir) {
        if err.kind() != std::io::ErrorKind::NotFound {
            warn!("cannot remove {}: {err}", task_dir.display());
        }
    }
    // The namespace's directory goes with its last task (remove_dir fails while others remain).
    if let Some(namespace_dir) = task_dir.parent() {
        let _ = std::fs::remove_dir(namespace_dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_exit_descriptor_fires_when_the_process_ends() {
        let mut child = tokio::process::Command::new("sleep").arg("0.2").spawn().unwrap();
        let pid = child.id().unwrap();
        let exited = PidFd::new(pid, crate::hypervisor::process::pidfd_open(pid).unwrap()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), exited.exited()).await.unwrap();
        child.wait().await.unwrap();
    }

    #[test]
    fn cleanup_kills_only_processes_that_name_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let task_dir = dir.path().join("task");
        std::fs::create_dir(&task_dir).unwrap();
        let mut ours = std::process::Command::new("sh")
            .args(["-c", "sleep 60; true", task_dir.to_str().unwrap()])
            .spawn()
            .unwrap();
        let mut other = std::process::Command::new("sleep").arg("60").spawn().unwrap();
        std::fs::write(task_dir.join(PIDS_FILE), format!("{}\n{}\n", ours.id(), other.id())).unwrap();
        // spawn() returns once exec has begun, before the kernel has set the new argv that
        // /proc/PID/cmdline shows (seen empty under load): wait for it, as a VM process has long
        // had it when its sandbox is cleaned up.
        let marker = task_dir.to_string_lossy().into_owned();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !String::from_utf8_lossy(
            &std::fs::read(format!("/proc/{}/cmdline", ours.id())).unwrap_or_default(),
        )
        .contains(&marker)
        {
            assert!(std::time::Instant::now() < deadline, "the shell never showed its arguments");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        clean_up_task_dir(&task_dir);
        assert!(ours.wait().unwrap().code().is_none(), "our process was not killed");
        assert!(!dir.path().exists(), "the emptied parent directory was kept");
        assert!(other.try_wait().unwrap().is_none(), "a foreign process was killed");
        assert!(!task_dir.exists());
        other.kill().unwrap();
        other.wait().unwrap();
        clean_up_task_dir(&task_dir);
    }
}
