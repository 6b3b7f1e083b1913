//! A private containerd for end-to-end runs: its own root, state and sockets in a temporary
//! directory, a namespace of its own, and a busybox image built locally (no registry). Dropping it
//! stops containerd, kills whatever shim or VM of its namespace is left, and removes the directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// The runtime name of the shim under test.
pub const IRONCLAD_RUNTIME: &str = "io.containerd.ironclad.v2";
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";
/// The CRI runtime handler (a RuntimeClass's `handler`) that runs pods with ironclad.
pub const CRI_HANDLER: &str = "ironclad";
/// The containerd namespace of the CRI plugin's pods and images.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// The locally built images: plain busybox, one whose config sets user, cwd and env, and a pause.
pub const BUSYBOX_IMAGE: &str = "docker.io/ironclad/busybox:latest";
pub const BUSYBOX_USER_IMAGE: &str = "docker.io/ironclad/busybox:user";
/// The CRI plugin's sandbox image (`sandbox_image`): busybox sleeping forever.
pub const PAUSE_IMAGE: &str = "docker.io/ironclad/pause:latest";
const BUSYBOX: &str = "/bin/busybox";
const CONTAINERD_START_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("containerd did not create {socket} within {waited:?}; its log:\n{log}")]
    NotReady { socket: PathBuf, waited: Duration, log: String },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command { command: String, status: String, stderr: String },
    #[error("{0} is missing: run `make prereqs`")]
    Missing(&'static str),
    #[error("`ctr events` showed no probe event within {waited:?}; it printed:\n{printed}")]
    NoEvents { waited: Duration, printed: String },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// A running private containerd.
/// The pool's socket in the containerd's directory.
const POOL_SOCKET: &str = "pool.sock";

pub struct Containerd {
    child: Child,
    dir: tempfile::TempDir,
    namespace: String,
    socket: PathBuf,
    /// The shim's config for this containerd's tasks (kernel, initrd, image cache, run root).
    pub shim_config: PathBuf,
    /// Where the shim keeps each task's VM directory: `<run root>/<namespace>/<task id>`.
    pub run_root: PathBuf,
    /// Where the shim keeps each task's console log: `<log root>/<namespace>/<task id>.console.log`.
    pub log_root: PathBuf,
    /// The network namespace containerd and every ctr run in (the network tests' own).
    netns: Option<PathBuf>,
}

/// Makes `command` run in the network namespace `netns`: containerd, the shims it starts and the
/// CNI plugins `ctr run --cni` calls then all live there.
fn enter_netns(command: &mut Command, netns: &Path) -> Result<(), Error> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let file = std::fs::File::open(netns).map_err(io_err(format!("open {}", netns.display())))?;
    // SAFETY: between fork and exec the child only calls setns, which is async-signal-safe; the
    // closure owns the namespace file, so its descriptor is open then.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    Ok(())
}

/// Where the guest kernel, the initrd and the shim binary are.
#[derive(Debug, Clone)]
pub struct Artifacts {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The directory holding `containerd-shim-ironclad-v2`.
    pub shim_dir: PathBuf,
    /// `auto`, `ironclad` or `qemu`.
    pub hypervisor: String,
}

impl Artifacts {
    /// What a test executable of this workspace runs: the guest `make guest` built (or
    /// $IRONCLAD_GUEST_DIR's), the shim cargo built next to the test (tests run from
    /// target/<profile>/deps, the shim is in target/<profile>), the backend $IRONCLAD_HYPERVISOR
    /// names (default auto).
    pub fn of_this_build() -> Result<Artifacts, String> {
        let guest = crate::GuestArtifacts::locate().map_err(|err| err.to_string())?;
        let exe = std::env::current_exe().map_err(|err| format!("where this test runs from: {err}"))?;
        let shim_dir = exe.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default();
        if !shim_dir.join("containerd-shim-ironclad-v2").is_file() {
            return Err(format!(
                "no containerd-shim-ironclad-v2 in {}: build the shim first (cargo build -p ironclad-shim)",
                shim_dir.display()
            ));
        }
        Ok(Artifacts {
            kernel: guest.kernel,
            initrd: guest.initrd,
            shim_dir,
            hypervisor: std::env::var("IRONCLAD_HYPERVISOR").unwrap_or_else(|_| "auto".into()),
        })
    }
}

impl Containerd {
    /// Starts containerd with the shim's directory first on its PATH and writes a shim config that
    /// boots `artifacts`.
    pub fn start(artifacts: &Artifacts) -> Result<Containerd, Error> {
        Self::start_in(artifacts, None)
    }

    /// As [`Containerd::start`], with containerd and every ctr in network namespace `netns`.
    pub fn start_in(artifacts: &Artifacts, netns: Option<&Path>) -> Result<Containerd, Error> {
        Self::start_with(artifacts, netns, None)
    }

    /// A containerd whose CRI plugin serves pods (namespace k8s.io) on its socket, with runtime
    /// handler [`CRI_HANDLER`] for the ironclad shim, in network namespace `netns` with the CNI
    /// configuration in `cni_conf_dir`; the images (pause included) are imported.
    pub fn start_cri(artifacts: &Artifacts, netns: &Path, cni_conf_dir: &Path) -> Result<Containerd, Error> {
        let containerd = Self::start_with(artifacts, Some(netns), Some(cni_conf_dir))?;
        containerd.import_busybox()?;
        Ok(containerd)
    }

    /// The socket the CRI plugin (and everything else) is served on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn start_with(
        artifacts: &Artifacts,
        netns: Option<&Path>,
        cri_cni_conf_dir: Option<&Path>,
    ) -> Result<Containerd, Error> {
        for (tool, name) in [("containerd", "containerd"), ("ctr", "ctr"), ("runc", "runc")] {
            if ironclad_shim::hypervisor::find_executable(Path::new(tool)).is_none() {
                return Err(Error::Missing(name));
            }
        }
        // Below /var/tmp, not /tmp: the overlay snapshotter needs a file system that takes overlay
        // upper directories, and a short path keeps socket names under 108 bytes.
        let dir =
            tempfile::Builder::new().prefix("icd-").tempdir_in("/var/tmp").map_err(io_err("temp dir"))?;
        let namespace =
            format!("ironclad-e2e-{}", dir.path().file_name().unwrap_or_default().to_string_lossy());
        let mut namespace = namespace.replace(['.', '_'], "-").to_lowercase();
        let socket = dir.path().join("containerd.sock");
        let config = dir.path().join("containerd.toml");
        let run_root = dir.path().join("run");
        let log_root = dir.path().join("logs");
        let shim_config = dir.path().join("ironclad.toml");
        let mut text = containerd_config(dir.path(), &socket, cri_cni_conf_dir.is_none());
        if let Some(cni_conf_dir) = cri_cni_conf_dir {
            // The CRI plugin keeps its pods in this namespace, whatever ctr uses.
            namespace = CRI_NAMESPACE.into();
            text.push_str(&cri_config(&shim_config, cni_conf_dir));
        }
        std::fs::write(&config, text).map_err(io_err("write containerd.toml"))?;
        std::fs::write(
            &shim_config,
            shim_config_text(artifacts, &run_root, &log_root, &dir.path().join("images")),
        )
        .map_err(io_err("write ironclad.toml"))?;
        let log =
            std::fs::File::create(dir.path().join("containerd.log")).map_err(io_err("containerd.log"))?;
        let path = format!("{}:{}", artifacts.shim_dir.display(), std::env::var("PATH").unwrap_or_default());
        let mut command = Command::new("containerd");
        if let Some(netns) = netns {
            enter_netns(&mut command, netns)?;
        }
        let child = command
            .arg("--config")
            .arg(&config)
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io_err("containerd.log"))?)
            .stderr(log)
            .spawn()
            .map_err(io_err("start containerd"))?;
        let containerd = Containerd {
            child,
            dir,
            namespace,
            socket,
            shim_config,
            run_root,
            log_root,
            netns: netns.map(Path::to_path_buf),
        };
        containerd.wait_for_socket()?;
        Ok(containerd)
    }

    fn wait_for_socket(&self) -> Result<(), Error> {
        let started = Instant::now();
        while started.elapsed() < CONTAINERD_START_TIMEOUT {
            if self.socket.exists() && self.ctr(&["version"]).map(|o| o.status.success()).unwrap_or(false) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(Error::NotReady { socket: self.socket.clone(), waited: started.elapsed(), log: self.log_tail() })
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// containerd's log, which carries the shims' logs too.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// The last lines of containerd's log.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// `ctr --address .. -n <namespace> <args>`.
    pub fn ctr_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("ctr");
        if let Some(netns) = &self.netns {
            // The namespace exists for as long as this containerd: it was entered at its start.
            if let Err(err) = enter_netns(&mut command, netns) {
                panic!("ctr cannot enter the test's network namespace: {err}");
            }
        }
        command.arg("--address").arg(&self.socket).args(["-n", &self.namespace]).args(args);
        command
    }

    pub fn ctr(&self, args: &[&str]) -> Result<Output, Error> {
        self.ctr_command(args).stdin(Stdio::null()).output().map_err(io_err("run ctr"))
    }

    /// Runs ctr and fails with its stderr unless it succeeds.
    pub fn ctr_ok(&self, args: &[&str]) -> Result<String, Error> {
        let output = self.ctr(args)?;
        if !output.status.success() {
            return Err(Error::Command {
                command: format!("ctr {}", args.join(" ")),
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Builds the busybox images from the host's busybox-static and imports them.
    pub fn import_busybox(&self) -> Result<(), Error> {
        let archive = self.dir.path().join("busybox-oci.tar");
        build_busybox_archive(&self.dir.path().join("image-build"), &archive)?;
        self.ctr_ok(&["images", "import", archive.to_str().unwrap_or_default()])?;
        Ok(())
    }

    /// The task directory the shim makes for task `id`.
    pub fn task_dir(&self, id: &str) -> PathBuf {
        self.run_root.join(&self.namespace).join(ironclad_shim::paths::task_dir_name(id))
    }

    /// The guest console log the shim keeps for task `id` while it runs.
    pub fn console_log(&self, id: &str) -> PathBuf {
        self.log_root.join(&self.namespace).join(format!("{id}.console.log"))
    }

    /// The Unix socket containerd-shim 0.11 serves task `id` on: /run/containerd/s/<sha256 of
    /// containerd's address, namespace and id>.
    pub fn shim_socket(&self, id: &str) -> PathBuf {
        let joined = Path::new(&self.socket).join(&self.namespace).join(id);
        Path::new("/run/containerd/s").join(sha256_hex(joined.as_os_str().as_encoded_bytes()))
    }

    /// Starts recording containerd's events (`ctr events`) from now on: returns once the
    /// subscription is seen to work, when a probe event published after the start has arrived.
    pub fn events(&self) -> Result<Events, Error> {
        let n = EVENT_LOGS.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.path().join(format!("events-{n}.log"));
        let file = std::fs::File::create(&path).map_err(io_err("events log"))?;
        let child = self
            .ctr_command(&["events"])
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .map_err(io_err("ctr events"))?;
        let events = Events { child, path };
        // Labelling the namespace publishes /namespaces/update; ctr may subscribe a moment after it
        // starts, so the probe is repeated until one arrives.
        let probe = format!("ironclad.probe.{n}");
        let deadline = Instant::now() + CONTAINERD_START_TIMEOUT;
        for attempt in 0.. {
            self.ctr_ok(&["namespaces", "label", &self.namespace, &format!("{probe}={attempt}")])?;
            if events.wait_for(&["/namespaces/update", &probe], Duration::from_millis(200)).is_some() {
                self.ctr_ok(&["namespaces", "label", &self.namespace, &format!("{probe}=")])?;
                return Ok(events);
            }
            if Instant::now() > deadline {
                break;
            }
        }
        Err(Error::NoEvents { waited: CONTAINERD_START_TIMEOUT, printed: events.all() })
    }

    /// Runs ctr with `args` (and `stdin`, if any), collecting its output while it runs (a full pipe
    /// would stall it); one that has not finished within `timeout` is killed and fails the test,
    /// with what each of this containerd's shims and VMs was doing.
    pub fn ctr_within(&self, args: &[&str], stdin: Option<&str>, timeout: Duration) -> Output {
        let mut command = self.ctr_command(args);
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        command.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
        let mut child = command.spawn().unwrap_or_else(|err| panic!("cannot run ctr: {err}"));
        if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
            use std::io::Write;
            if let Err(err) = input.write_all(text.as_bytes()) {
                panic!("cannot write ctr's stdin: {err}");
            }
        }
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let output = child.wait_with_output();
            let _ = done_tx.send(());
            output
        });
        let finished = done_rx.recv_timeout(timeout).is_ok();
        let states = if finished { String::new() } else { self.process_states() };
        if !finished {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        let output = match waiter.join() {
            Ok(Ok(output)) => output,
            Ok(Err(err)) => panic!("waiting for ctr {args:?}: {err}"),
            Err(_) => panic!("the thread waiting for ctr {args:?} panicked"),
        };
        if !finished {
            panic!(
                "ctr {args:?} did not finish within {timeout:?}; stderr: {}\nshims and VMs: {states}\n\
                 containerd's lines about this task:\n{}\ncontainerd log:\n{}",
                String::from_utf8_lossy(&output.stderr),
                self.task_lines(args),
                self.log_tail()
            );
        }
        output
    }

    /// The lines of containerd's log about a task named in `args`: containerd's own (`id=<task>`)
    /// and its shim's (`id="<task>"`).
    fn task_lines(&self, args: &[&str]) -> String {
        let log = self.log();
        let about = |line: &str| {
            args.iter().any(|arg| {
                line.contains(&format!("id=\"{arg}\""))
                    || line.contains(&format!("id={arg} "))
                    || line.ends_with(&format!("id={arg}"))
            })
        };
        log.lines().filter(|line| about(line)).collect::<Vec<_>>().join("\n")
    }

    /// Each of this containerd's shims and VMs: its command line, state and the kernel function
    /// it waits in.
    fn process_states(&self) -> String {
        self.leftover_processes()
            .iter()
            .map(|(pid, cmdline)| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let state = stat.rsplit(')').next().unwrap_or("").split_whitespace().next().unwrap_or("?");
                let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
                let stack = std::fs::read_to_string(format!("/proc/{pid}/stack")).unwrap_or_default();
                format!("\n  {pid} [{state}, in {wchan:?}]: {cmdline}\n{stack}")
            })
            .collect()
    }

    /// Nothing of the task is left: no task directory (VM sockets, images of its own), no console log,
    /// no shim or VM process, no mount of the shim's, no shim socket.
    pub fn assert_nothing_left(&self, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let shim_socket = self.shim_socket(id);
        loop {
            let dir_left = self.task_dir(id).exists() || self.console_log(id).exists();
            let processes = self.leftover_processes();
            let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            let images = self.dir().join("images").display().to_string();
            let run_root = self.run_root.display().to_string();
            let mounts: Vec<&str> =
                mountinfo.lines().filter(|l| l.contains(&images) || l.contains(&run_root)).collect();
            let socket_left = shim_socket.exists();
            let cgroups = self.sandbox_cgroups(id);
            if !dir_left && processes.is_empty() && mounts.is_empty() && !socket_left && cgroups.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "left behind for {id}: task dir: {dir_left}; processes: {}; mounts: {mounts:?}; shim \
                     socket {}: {socket_left}; cgroups: {cgroups:?}",
                    self.process_states(),
                    shim_socket.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A private containerd with the busybox image for a test: root, containerd, ctr and the built
    /// guest are needed, and without them the test fails naming them (or, where
    /// IRONCLAD_ALLOW_SKIP=1 says so, gets None and skips).
    pub fn for_test() -> Option<Containerd> {
        if !ironclad_test_prereq::needs().root().program("containerd").program("ctr").ready() {
            return None;
        }
        let artifacts = Artifacts::of_this_build().unwrap_or_else(|err| panic!("{err}"));
        let containerd = Containerd::start(&artifacts).unwrap_or_else(|err| panic!("{err}"));
        containerd.import_busybox().unwrap_or_else(|err| panic!("{err}"));
        Some(containerd)
    }

    /// A ctr call's stdout (CRLF as LF); a failed call fails the test with ctr's stderr and the
    /// end of containerd's log.
    pub fn stdout_of(&self, output: &Output) -> String {
        assert!(
            output.status.success(),
            "ctr failed ({}): {}\ncontainerd log:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            self.log_tail()
        );
        String::from_utf8_lossy(&output.stdout).replace("\r\n", "\n")
    }

    /// Where this containerd's shims ask for a pooled VM.
    pub fn pool_socket(&self) -> PathBuf {
        self.dir.path().join(POOL_SOCKET)
    }

    /// The host cgroups the shim's jail made for sandbox `id` (one per hierarchy) that exist.
    pub fn sandbox_cgroups(&self, id: &str) -> Vec<PathBuf> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let relative =
            Path::new("ironclad").join(&self.namespace).join(ironclad_shim::paths::task_dir_name(id));
        crate::cgroups::mount_points(&mountinfo)
            .into_iter()
            .map(|mount_point| mount_point.join(&relative))
            .filter(|dir| dir.is_dir())
            .collect()
    }

    /// The processes of sandbox `id`'s VM other than the jailers that started them (QEMU or
    /// ironclad-vmm, vhost-device-vsock, virtiofsd), each with its /proc status.
    pub fn sandbox_helpers(&self, id: &str) -> Vec<HelperProcess> {
        let marker = self.task_dir(id).display().to_string();
        processes_matching(&[marker], self.child.id())
            .into_iter()
            .filter_map(|(pid, cmdline)| {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?.trim().to_string();
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
                let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
                (comm != "ironclad-jailer").then_some(HelperProcess { pid, comm, cmdline, status, cgroup })
            })
            .collect()
    }

    /// Processes whose command line mentions this containerd's namespace or directory: its shims
    /// and their VMs.
    pub fn leftover_processes(&self) -> Vec<(i32, String)> {
        let mut markers = vec![self.dir.path().display().to_string()];
        if self.namespace != CRI_NAMESPACE {
            markers.push(format!("-namespace {} ", self.namespace));
        }
        processes_matching(&markers, self.child.id())
    }
}

static EVENT_LOGS: AtomicUsize = AtomicUsize::new(0);

/// containerd's events as `ctr events` prints them: one line per event with its topic and JSON.
pub struct Events {
    child: Child,
    path: PathBuf,
}

impl Events {
    /// The first event line containing every one of `needles`, waiting up to `timeout` for it.
    pub fn wait_for(&self, needles: &[&str], timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = std::fs::read_to_string(&self.path).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return Some(line.to_string());
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn all(&self) -> String {
        std::fs::read_to_string(&self.path).unwrap_or_default()
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn processes_matching(markers: &[String], except: u32) -> Vec<(i32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let me = std::process::id();
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid as u32 != me && pid as u32 != except)
        .filter_map(|pid| {
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
            // The test's own ctr clients (`ctr events`) are not leftovers of a task.
            if cmdline.starts_with("ctr ") {
                return None;
            }
            markers.iter().any(|m| cmdline.contains(m.as_str())).then_some((pid, cmdline))
        })
        .collect()
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Tasks the test left behind go first, through containerd, so their shims clean up.
        if let Ok(list) = self.ctr_ok(&["tasks", "list", "-q"]) {
            for id in list.lines().filter(|l| !l.is_empty()) {
                let _ = self.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
                let _ = self.ctr(&["tasks", "delete", "-f", id]);
            }
        }
        if let Ok(list) = self.ctr_ok(&["containers", "list", "-q"]) {
            for id in list.lines().filter(|l| !l.is_empty()) {
                let _ = self.ctr(&["containers", "delete", id]);
            }
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(keep) = std::env::var_os("IRONCLAD_KEEP_LOGS") {
            let kept = Path::new(&keep).join(format!("{}.log", self.namespace));
            let _ = std::fs::create_dir_all(&keep);
            let _ = std::fs::copy(self.dir.path().join("containerd.log"), kept);
        }
        for (pid, _) in self.leftover_processes() {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        // runc tasks live in cgroups under /<namespace>, which containerd never removes.
        remove_namespace_cgroups(&self.namespace);
        // Snapshots and the shims' sockets are mounted or bound below the directory.
        ironclad_shim::sandbox::unmount_below(self.dir.path());
    }
}

/// One process of a sandbox's VM, as /proc shows it.
#[derive(Debug, Clone)]
pub struct HelperProcess {
    pub pid: i32,
    pub comm: String,
    pub cmdline: String,
    pub status: String,
    pub cgroup: String,
}

impl HelperProcess {
    /// A field of /proc/PID/status (`Uid`, `CapEff`, `NSpid`...), as written there.
    pub fn field(&self, name: &str) -> &str {
        self.status
            .lines()
            .find_map(|line| line.strip_prefix(name).and_then(|rest| rest.strip_prefix(':')))
            .map(str::trim)
            .unwrap_or("")
    }
}

/// Removes `<cgroup mount>/<namespace>` from every cgroup (v1 and v2) mount of the host, once empty.
fn remove_namespace_cgroups(namespace: &str) {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for mount_point in crate::cgroups::mount_points(&mountinfo) {
        let _ = std::fs::remove_dir(mount_point.join(namespace));
    }
}

/// How long containerd gives a dead shim's `delete`: its own 5 s, unless
/// `IRONCLAD_SHIM_CLEANUP_TIMEOUT` says otherwise (the nested tier, where everything runs emulated
/// and a process takes seconds to start, gives 30 s).
fn shim_cleanup_timeout() -> String {
    std::env::var("IRONCLAD_SHIM_CLEANUP_TIMEOUT")
        .ok()
        .filter(|t| !t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric()))
        .unwrap_or_else(|| "5s".into())
}

fn containerd_config(dir: &Path, socket: &Path, without_cri: bool) -> String {
    let disabled = if without_cri { r#"["io.containerd.grpc.v1.cri"]"# } else { "[]" };
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = {disabled}

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  level = "info"

[timeouts]
  "io.containerd.timeout.shim.cleanup" = "{cleanup}"
"#,
        cleanup = shim_cleanup_timeout(),
        root = dir.join("root").display(),
        state = dir.join("state").display(),
        socket = socket.display(),
    )
}

/// The CRI plugin as a kubelet's node has it, for this machine: the locally built pause image,
/// no lowering of oom_score_adj (refused here), CNI from the test's directory, and the ironclad
/// runtime handler passing the allowed `io.ironclad.*` pod annotations to the shim.
fn cri_config(shim_config: &Path, cni_conf_dir: &Path) -> String {
    format!(
        r#"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  # The pods' network namespaces live in this containerd's state directory, not /var/run/netns:
  # whatever a failed test leaves goes with the directory.
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{conf_dir}"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "{RUNC_RUNTIME}"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{CRI_HANDLER}]
      runtime_type = "{IRONCLAD_RUNTIME}"
      pod_annotations = ["io.ironclad.*"]
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{CRI_HANDLER}.options]
        ConfigPath = "{shim_config}"
"#,
        conf_dir = cni_conf_dir.display(),
        shim_config = shim_config.display(),
    )
}

fn shim_config_text(artifacts: &Artifacts, run_root: &Path, log_root: &Path, images: &Path) -> String {
    // The shim runs in the task's bundle directory: relative paths would point nowhere.
    let absolute = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let (kernel, initrd) = (absolute(&artifacts.kernel), absolute(&artifacts.initrd));
    // Pinned as `make install` pins them: every boot of the suites checks both files.
    let pin = |path: &Path| std::fs::read(path).map(|data| sha256_hex(&data)).unwrap_or_default();
    let pins = match (pin(&kernel), pin(&initrd)) {
        (k, i) if !k.is_empty() && !i.is_empty() => {
            format!("kernel_sha256 = \"{k}\"\ninitrd_sha256 = \"{i}\"\n")
        }
        _ => String::new(),
    };
    format!(
        r#"hypervisor = "{hypervisor}"
kernel = "{kernel}"
initrd = "{initrd}"
{pins}run_root = "{run_root}"
log_root = "{log_root}"
image_cache = "{images}"
log_level = "debug"
allowed_annotations = ["io.ironclad.memory_mib", "io.ironclad.agent_log"]
# This containerd's own ironclad-pool, which the pool tests start (the others never do). Inline, so
# that keys tests append stay top-level.
pool = {{ socket = "{pool_socket}" }}
"#,
        pool_socket = run_root.with_file_name(POOL_SOCKET).display(),
        hypervisor = artifacts.hypervisor,
        kernel = kernel.display(),
        initrd = initrd.display(),
        run_root = run_root.display(),
        log_root = log_root.display(),
        images = images.display(),
    )
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes a blob into the OCI layout and returns its descriptor fields (digest, size).
fn put_blob(layout: &Path, data: &[u8]) -> Result<(String, usize), Error> {
    let digest = sha256_hex(data);
    std::fs::write(layout.join("blobs/sha256").join(&digest), data).map_err(io_err("write blob"))?;
    Ok((format!("sha256:{digest}"), data.len()))
}

/// A busybox root file system at `rootfs`: the host's busybox-static with a link per applet, a
/// root user and a `builder` (1000:1000) whose home is /work.
pub fn busybox_rootfs(rootfs: &Path) -> Result<(), Error> {
    if !Path::new(BUSYBOX).is_file() {
        return Err(Error::Missing("busybox-static"));
    }
    for dir in ["bin", "etc", "tmp", "proc", "sys", "dev", "work"] {
        std::fs::create_dir_all(rootfs.join(dir)).map_err(io_err("image rootfs"))?;
    }
    std::fs::copy(BUSYBOX, rootfs.join("bin/busybox")).map_err(io_err("copy busybox"))?;
    let list = Command::new(BUSYBOX).arg("--list").output().map_err(io_err("busybox --list"))?;
    for applet in String::from_utf8_lossy(&list.stdout).lines().filter(|a| *a != "busybox" && !a.is_empty()) {
        let _ = std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet));
    }
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/:/bin/sh\nbuilder:x:1000:1000::/work:/bin/sh\n",
    )
    .map_err(io_err("passwd"))?;
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\nbuilder:x:1000:\n").map_err(io_err("group"))
}

/// An OCI image archive holding the busybox images: one layer (busybox and its applet links) and
/// two configs.
pub fn build_busybox_archive(work: &Path, archive: &Path) -> Result<(), Error> {
    let rootfs = work.join("rootfs");
    let layout = work.join("layout");
    let _ = std::fs::remove_dir_all(work);
    busybox_rootfs(&rootfs)?;
    std::fs::create_dir_all(layout.join("blobs/sha256")).map_err(io_err("image layout"))?;
    let layer_tar = work.join("layer.tar");
    // Reproducible: owners, order and times fixed.
    tar_directory(
        &rootfs,
        &layer_tar,
        &["--numeric-owner", "--owner=0", "--group=0", "--sort=name", "--mtime=@0"],
    )?;
    let layer = std::fs::read(&layer_tar).map_err(io_err("read layer"))?;
    let (layer_digest, layer_size) = put_blob(&layout, &layer)?;

    let mut manifests = Vec::new();
    for (name, user, cwd, cmd) in [
        (BUSYBOX_IMAGE, "", "/", vec!["sh"]),
        (BUSYBOX_USER_IMAGE, "1000:1000", "/work", vec!["sh"]),
        // A pod's sandbox container does nothing but hold the pod's namespaces.
        (PAUSE_IMAGE, "", "/", vec!["sleep", "2147483647"]),
    ] {
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/bin", "FROM_IMAGE=yes"], "Cmd": cmd, "WorkingDir": cwd, "User": user},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        });
        let (config_digest, config_size) = put_blob(&layout, config.to_string().as_bytes())?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer_size}],
        });
        let (manifest_digest, manifest_size) = put_blob(&layout, manifest.to_string().as_bytes())?;
        manifests.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": name},
        }));
    }
    let index = serde_json::json!({"schemaVersion": 2, "manifests": manifests});
    std::fs::write(layout.join("index.json"), index.to_string()).map_err(io_err("index.json"))?;
    std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)
        .map_err(io_err("oci-layout"))?;
    tar_directory(&layout, archive, &[])
}

/// `tar -cf archive -C dir .` with `options` first; fails with tar's words.
fn tar_directory(dir: &Path, archive: &Path, options: &[&str]) -> Result<(), Error> {
    let tar = Command::new("tar")
        .args(options)
        .arg("-C")
        .arg(dir)
        .arg("-cf")
        .arg(archive)
        .arg(".")
        .output()
        .map_err(io_err("tar"))?;
    if !tar.status.success() {
        return Err(Error::Command {
            command: format!("tar -cf {} -C {} .", archive.display(), dir.display()),
            status: tar.status.to_string(),
            stderr: String::from_utf8_lossy(&tar.stderr).into_owned(),
        });
    }
    Ok(())
}
