//! The `qemu` backend: QEMU's microvm machine, with vsock served by vhost-device-vsock.
//!
//! vhost-device-vsock exposes the same hybrid vsock Unix socket as ironclad-vmm (`CONNECT <port>\n`
//! → `OK <port>\n`), so the agent client does not know which backend it talks to. QEMU needs guest
//! memory it can share with that process: a memfd backend with `share=on`.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use super::{find_executable, parse_ready_line, HostVirtualization, ReadyLine, VmConfig};
use crate::paths::SandboxPaths;

/// Every VM has its own vhost-device-vsock, so the guest CID need not be unique on the host.
const GUEST_CID: u32 = 3;
const CONSOLE_TAIL_LINES: usize = 40;
const STDERR_LIMIT: usize = 16 * 1024;
const VSOCK_DAEMON_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long QEMU may take to exit once its console has closed.
const CONSOLE_CLOSE_TO_EXIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{tool} not found: install it with `{install}` (or run `make prereqs`)")]
    MissingTool {
        tool: &'static str,
        install: &'static str,
    },
    #[error("the guest {what} {path} does not exist (build it with `make guest`)")]
    MissingFile { what: &'static str, path: PathBuf },
    #[error("cannot prepare the sandbox directory {path}")]
    SandboxDir {
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
    #[error("vhost-device-vsock exited ({status}) before creating {socket}: {stderr}")]
    VsockDaemonExited {
        status: ExitStatus,
        socket: PathBuf,
        stderr: String,
    },
    #[error("vhost-device-vsock did not create {socket} within {waited:?}")]
    VsockDaemonTimeout { socket: PathBuf, waited: Duration },
    #[error("QEMU exited ({status}) before the agent was ready; stderr: {stderr}; console tail:\n{console}")]
    ExitedBeforeReady {
        status: ExitStatus,
        stderr: String,
        console: String,
    },
    #[error("the agent was not ready within {waited:?}; console tail:\n{console}")]
    ReadyTimeout { waited: Duration, console: String },
    #[error("cannot wait for {what}")]
    Wait {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Where the backend's programs are and how guests run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuBackend {
    pub qemu: PathBuf,
    pub vhost_device_vsock: PathBuf,
    /// KVM acceleration; only with hardware virtualization, else TCG (software emulation).
    pub use_kvm: bool,
}

impl QemuBackend {
    /// Finds the programs on PATH, naming whichever is missing and how to install it.
    pub fn locate(host: HostVirtualization) -> Result<Self, Error> {
        let qemu = find_executable(Path::new("qemu-system-x86_64")).ok_or(Error::MissingTool {
            tool: "qemu-system-x86_64",
            install: "apt-get install qemu-system-x86",
        })?;
        let vhost_device_vsock =
            find_executable(Path::new("vhost-device-vsock")).ok_or(Error::MissingTool {
                tool: "vhost-device-vsock",
                install: "cargo install --locked vhost-device-vsock",
            })?;
        let use_kvm = host.can_boot_linux_on_kvm();
        info!(
            "qemu backend: {} ({})",
            if use_kvm { "KVM" } else { "TCG software emulation" },
            host.explain()
        );
        Ok(QemuBackend {
            qemu,
            vhost_device_vsock,
            use_kvm,
        })
    }

    /// Starts vhost-device-vsock, then QEMU. The sandbox directory is created here and removed when
    /// the VM is stopped or dropped.
    pub async fn start(&self, config: &VmConfig, paths: SandboxPaths) -> Result<QemuVm, Error> {
        for (what, path) in [("kernel", &config.kernel), ("initrd", &config.initrd)] {
            if !path.is_file() {
                return Err(Error::MissingFile {
                    what,
                    path: path.clone(),
                });
            }
        }
        create_sandbox_dir(paths.dir())?;
        let mut guard = SandboxDirGuard(Some(paths.dir().to_path_buf()));
        let vhost = self.start_vsock_daemon(&paths).await?;
        let mut vm = self.start_qemu(config, &paths, vhost).await?;
        vm.sandbox_dir = guard.0.take();
        Ok(vm)
    }

    async fn start_vsock_daemon(&self, paths: &SandboxPaths) -> Result<Child, Error> {
        let socket = paths.vhost_vsock_socket();
        let mut child = Command::new(&self.vhost_device_vsock)
            .arg("--guest-cid")
            .arg(GUEST_CID.to_string())
            .arg("--socket")
            .arg(&socket)
            .arg("--uds-path")
            .arg(paths.agent_socket())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| Error::Spawn {
                program: self.vhost_device_vsock.clone(),
                source,
            })?;
        let started = Instant::now();
        while !socket.exists() {
            if let Some(status) = child.try_wait().map_err(|source| Error::Wait {
                what: "vhost-device-vsock",
                source,
            })? {
                let stderr = read_limited(child.stderr.take()).await;
                return Err(Error::VsockDaemonExited {
                    status,
                    socket,
                    stderr,
                });
            }
            if started.elapsed() > VSOCK_DAEMON_START_TIMEOUT {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(Error::VsockDaemonTimeout {
                    socket,
                    waited: started.elapsed(),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(child)
    }

    async fn start_qemu(
        &self,
        config: &VmConfig,
        paths: &SandboxPaths,
        mut vhost: Child,
    ) -> Result<QemuVm, Error> {
        let started = Instant::now();
        let spawned = Command::new(&self.qemu)
            .args(qemu_args(config, paths, self.use_kvm))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn();
        let mut qemu = match spawned {
            Ok(child) => child,
            Err(source) => {
                let _ = vhost.start_kill();
                let _ = vhost.wait().await;
                return Err(Error::Spawn {
                    program: self.qemu.clone(),
                    source,
                });
            }
        };
        debug!(
            "qemu pid {:?}, vhost-device-vsock pid {:?}",
            qemu.id(),
            vhost.id()
        );
        let console = Console::default();
        let (ready_tx, ready_rx) = oneshot::channel();
        let stdout = qemu.stdout.take();
        let log_path = paths.console_log();
        let console_for_task = console.clone();
        let console_task = tokio::spawn(async move {
            if let Some(stdout) = stdout {
                console_for_task.follow(stdout, &log_path, ready_tx).await;
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let stderr_task = {
            let sink = stderr.clone();
            let pipe = qemu.stderr.take();
            tokio::spawn(async move {
                let text = read_limited(pipe).await;
                if let Ok(mut s) = sink.lock() {
                    *s = text;
                }
            })
        };
        Ok(QemuVm {
            qemu,
            vhost,
            agent_socket: paths.agent_socket(),
            started,
            console,
            ready_rx: Some(ready_rx),
            ready: None,
            stderr,
            tasks: vec![console_task, stderr_task],
            sandbox_dir: None,
        })
    }
}

/// QEMU's command line for one sandbox.
pub fn qemu_args(config: &VmConfig, paths: &SandboxPaths, use_kvm: bool) -> Vec<String> {
    let memory = format!("{}M", config.memory_mib);
    let accel = if use_kvm { "kvm" } else { "tcg" };
    let cpu = if use_kvm { "host" } else { "max" };
    let mut args: Vec<String> = vec![
        "-M".into(),
        // Without ACPI, QEMU announces the virtio-mmio devices on the kernel command line itself.
        format!("microvm,accel={accel},acpi=off"),
        "-cpu".into(),
        cpu.into(),
        "-smp".into(),
        config.vcpus.to_string(),
        "-m".into(),
        memory.clone(),
        "-object".into(),
        format!("memory-backend-memfd,id=mem,size={memory},share=on"),
        "-numa".into(),
        "node,memdev=mem".into(),
        "-nographic".into(),
        "-nodefaults".into(),
        "-no-reboot".into(),
        // microvm has no keyboard controller: without one the guest's `reboot=k` reset falls back to a
        // BIOS restart, which boots the guest again instead of reaching -no-reboot.
        "-device".into(),
        "i8042".into(),
        "-serial".into(),
        "stdio".into(),
        "-chardev".into(),
        format!("socket,id=vsock,path={}", paths.vhost_vsock_socket().display()),
        "-device".into(),
        "vhost-user-vsock-device,chardev=vsock".into(),
    ];
    args.extend([
        "-kernel".into(),
        config.kernel.display().to_string(),
        "-initrd".into(),
        config.initrd.display().to_string(),
        "-append".into(),
        config.kernel_cmdline(),
    ]);
    args
}

fn create_sandbox_dir(dir: &Path) -> Result<(), Error> {
    let err = |source| Error::SandboxDir {
        path: dir.to_path_buf(),
        source,
    };
    if dir.exists() {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "a sandbox with this id already exists",
        )));
    }
    std::fs::create_dir_all(dir).map_err(err)
}

/// Removes the sandbox directory unless disarmed, so that a failed start leaves nothing behind.
struct SandboxDirGuard(Option<PathBuf>);

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

async fn read_limited<R: AsyncRead + Unpin>(pipe: Option<R>) -> String {
    let Some(pipe) = pipe else { return String::new() };
    let mut buf = Vec::new();
    let _ = pipe
        .take(u64::try_from(STDERR_LIMIT).unwrap_or(u64::MAX))
        .read_to_end(&mut buf)
        .await;
    String::from_utf8_lossy(&buf).trim().to_string()
}

/// The guest's serial console: logged to a file, its last lines kept for error messages.
#[derive(Clone, Default)]
struct Console {
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl Console {
    async fn follow<R: AsyncRead + Unpin>(
        &self,
        output: R,
        log_path: &Path,
        ready: oneshot::Sender<ReadyLine>,
    ) {
        let mut log = match tokio::fs::File::create(log_path).await {
            Ok(file) => Some(file),
            Err(err) => {
                warn!("cannot write the console log {}: {err}", log_path.display());
                None
            }
        };
        let mut ready = Some(ready);
        let mut lines = BufReader::new(output).split(b'\n');
        while let Ok(Some(raw)) = lines.next_segment().await {
            let line = String::from_utf8_lossy(&raw).trim_end_matches('\r').to_string();
            if let Some(file) = log.as_mut() {
                let _ = file.write_all(format!("{line}\n").as_bytes()).await;
            }
            if let Some(ready_line) = parse_ready_line(&line) {
                if let Some(tx) = ready.take() {
                    let _ = tx.send(ready_line);
                }
            }
            self.remember(line);
        }
        if let Some(file) = log.as_mut() {
            let _ = file.flush().await;
        }
    }

    fn remember(&self, line: String) {
        if let Ok(mut tail) = self.tail.lock() {
            if tail.len() == CONSOLE_TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }

    fn tail(&self) -> String {
        self.tail
            .lock()
            .map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }
}

/// The agent's ready line and how long after QEMU's start it came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    pub line: ReadyLine,
    pub since_start: Duration,
}

/// A running sandbox VM: QEMU plus its vhost-device-vsock.
pub struct QemuVm {
    qemu: Child,
    vhost: Child,
    agent_socket: PathBuf,
    started: Instant,
    console: Console,
    ready_rx: Option<oneshot::Receiver<ReadyLine>>,
    ready: Option<Ready>,
    stderr: Arc<Mutex<String>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    sandbox_dir: Option<PathBuf>,
}

impl QemuVm {
    /// The hybrid vsock socket to reach the agent through.
    pub fn agent_socket(&self) -> &Path {
        &self.agent_socket
    }

    /// The host processes making up this VM.
    pub fn pids(&self) -> Vec<u32> {
        [self.qemu.id(), self.vhost.id()].into_iter().flatten().collect()
    }

    /// The last lines the guest printed.
    pub fn console_tail(&self) -> String {
        self.console.tail()
    }

    /// Waits for the agent's ready line; QEMU exiting first or the time running out is an error that
    /// carries the console's last lines.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<Ready, Error> {
        if let Some(ready) = &self.ready {
            return Ok(ready.clone());
        }
        let Some(rx) = self.ready_rx.as_mut() else {
            return Err(Error::ReadyTimeout {
                waited: Duration::ZERO,
                console: self.console.tail(),
            });
        };
        let line = tokio::select! {
            line = rx => line.ok(),
            _ = tokio::time::sleep(timeout) => {
                return Err(Error::ReadyTimeout { waited: timeout, console: self.console.tail() });
            }
        };
        self.ready_rx = None;
        let Some(line) = line else {
            // The console closed without a ready line: QEMU is exiting or gone.
            return Err(self.exited_before_ready().await);
        };
        let ready = Ready {
            line,
            since_start: self.started.elapsed(),
        };
        self.ready = Some(ready.clone());
        Ok(ready)
    }

    async fn exited_before_ready(&mut self) -> Error {
        let status = match self.wait_exit(CONSOLE_CLOSE_TO_EXIT).await {
            Ok(Some(status)) => status,
            Ok(None) => {
                let _ = self.qemu.start_kill();
                match self.qemu.wait().await {
                    Ok(status) => status,
                    Err(source) => return Error::Wait { what: "QEMU", source },
                }
            }
            Err(err) => return err,
        };
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        let stderr = self.stderr.lock().map(|s| s.clone()).unwrap_or_default();
        Error::ExitedBeforeReady {
            status,
            stderr,
            console: self.console.tail(),
        }
    }

    /// Waits for QEMU to exit on its own (the guest reset or powered off) for up to `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, Error> {
        match tokio::time::timeout(timeout, self.qemu.wait()).await {
            Ok(status) => status
                .map(Some)
                .map_err(|source| Error::Wait { what: "QEMU", source }),
            Err(_) => Ok(None),
        }
    }

    /// Gives QEMU `grace` to exit by itself, kills it after that, then stops vhost-device-vsock and
    /// removes the sandbox directory. Returns QEMU's exit status.
    pub async fn stop(mut self, grace: Duration) -> Result<ExitStatus, Error> {
        let status = match self.wait_exit(grace).await? {
            Some(status) => status,
            None => {
                warn!("QEMU did not exit within {grace:?}; killing it");
                let _ = self.qemu.start_kill();
                self.qemu
                    .wait()
                    .await
                    .map_err(|source| Error::Wait { what: "QEMU", source })?
            }
        };
        let _ = self.vhost.start_kill();
        self.vhost.wait().await.map_err(|source| Error::Wait {
            what: "vhost-device-vsock",
            source,
        })?;
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        if let Some(dir) = self.sandbox_dir.take() {
            remove_sandbox_dir(&dir);
        }
        Ok(status)
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        // kill_on_drop sends SIGKILL to both children; the directory goes with them.
        let _ = self.qemu.start_kill();
        let _ = self.vhost.start_kill();
        if let Some(dir) = self.sandbox_dir.take() {
            remove_sandbox_dir(&dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig {
            kernel: "/k/bzImage".into(),
            initrd: "/k/initrd.img".into(),
            vcpus: 2,
            memory_mib: 256,
            extra_kernel_params: "quiet".into(),
        }
    }

    fn value_after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn args_describe_a_microvm_with_shared_memory_and_vhost_vsock() {
        let paths = SandboxPaths::new(Path::new("/run/ironclad"), "sb");
        let args = qemu_args(&config(), &paths, false);
        assert_eq!(value_after(&args, "-M"), ["microvm,accel=tcg,acpi=off"]);
        assert_eq!(value_after(&args, "-cpu"), ["max"]);
        assert_eq!(value_after(&args, "-smp"), ["2"]);
        assert_eq!(value_after(&args, "-m"), ["256M"]);
        assert_eq!(
            value_after(&args, "-object"),
            ["memory-backend-memfd,id=mem,size=256M,share=on"]
        );
        assert_eq!(
            value_after(&args, "-chardev"),
            ["socket,id=vsock,path=/run/ironclad/sb/vhost-vsock.sock"]
        );
        assert_eq!(
            value_after(&args, "-append"),
            ["console=ttyS0 reboot=k panic=-1 quiet"]
        );
        assert!(
            args.iter().any(|a| a == "-no-reboot"),
            "a guest reset must end QEMU"
        );
        assert!(
            value_after(&args, "-device").contains(&"i8042"),
            "the reset goes through an i8042"
        );
    }

    #[test]
    fn kvm_is_asked_for_only_when_usable() {
        let paths = SandboxPaths::new(Path::new("/r"), "sb");
        let args = qemu_args(&config(), &paths, true);
        assert_eq!(value_after(&args, "-M"), ["microvm,accel=kvm,acpi=off"]);
        assert_eq!(value_after(&args, "-cpu"), ["host"]);
    }

    #[tokio::test]
    async fn missing_kernel_is_named_and_leaves_no_directory() {
        let dir = tempfile::tempdir().unwrap();
        let backend = QemuBackend {
            qemu: "/bin/true".into(),
            vhost_device_vsock: "/bin/true".into(),
            use_kvm: false,
        };
        let paths = SandboxPaths::new(dir.path(), "sb");
        let err = backend.start(&config(), paths.clone()).await.err().unwrap();
        assert!(matches!(&err, Error::MissingFile { what: "kernel", .. }), "{err}");
        assert!(!paths.dir().exists());
    }

    #[tokio::test]
    async fn a_vsock_daemon_that_dies_is_reported_and_cleaned_up() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("kernel");
        std::fs::write(&kernel, b"k").unwrap();
        let cfg = VmConfig {
            kernel: kernel.clone(),
            initrd: kernel,
            ..config()
        };
        let backend = QemuBackend {
            qemu: "/bin/true".into(),
            vhost_device_vsock: "/bin/false".into(),
            use_kvm: false,
        };
        let paths = SandboxPaths::new(dir.path(), "sb");
        let err = backend.start(&cfg, paths.clone()).await.err().unwrap();
        assert!(matches!(&err, Error::VsockDaemonExited { .. }), "{err}");
        assert!(
            !paths.dir().exists(),
            "a failed start must remove the sandbox directory"
        );
    }
}
