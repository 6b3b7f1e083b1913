#![allow(clippy::unwrap_used)] // test code: a failed step should stop the test right there

//! A probe run through the shim's jail, exactly as the sandbox's helpers are (`Jail::command`,
//! `Jail::admit`): what it can see, what it holds, and how much memory it may take.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};

use ironclad_shim::config::ShimConfig;
use ironclad_shim::jail::{self, Confinement, Jail};

/// The probe's VM memory: with the overhead below, a 128 MiB cgroup.
const PROBE_MEMORY_MIB: u32 = 64;
const PROBE_OVERHEAD_MIB: u32 = 64;

/// ironclad-jailer, built beside this test (target/<profile>/deps/..).
fn jailer() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let jailer = exe.parent().and_then(Path::parent).unwrap().join("ironclad-jailer");
    assert!(jailer.is_file(), "build the jailer first: cargo build -p ironclad-jailer");
    jailer
}

/// A static shell with its tools built in (busybox): the jail binds a program and the libraries
/// it loads, and nothing else of the host's /usr.
const BUSYBOX: &str = "/usr/bin/busybox";

/// The jailer's command for `script`, run by the static shell in the jail.
fn shell(jail: &Jail, script: &str, confinement: &Confinement) -> tokio::process::Command {
    assert!(Path::new(BUSYBOX).is_file(), "apt-get install busybox-static");
    jail.command(Path::new(BUSYBOX), &["sh".into(), "-c".into(), script.into()], confinement)
}

struct Probe {
    _dir: tempfile::TempDir,
    task_dir: PathBuf,
    vm_dir: PathBuf,
    jail: Option<Jail>,
}

impl Probe {
    fn new(name: &str) -> Probe {
        let dir = tempfile::Builder::new().prefix("ironclad-jail-").tempdir().unwrap();
        let task_dir = dir.path().join(name);
        let vm_dir = task_dir.join("vm");
        std::fs::create_dir_all(&vm_dir).unwrap();
        let config = ShimConfig {
            jailer: Some(jailer()),
            jail_memory_overhead_mib: PROBE_OVERHEAD_MIB,
            source: "(the probe test)".into(),
            ..ShimConfig::default()
        };
        let jail = Jail::open(&config, "probe-test", &task_dir, PROBE_MEMORY_MIB).unwrap().unwrap();
        jail.give(&vm_dir).unwrap();
        Probe { _dir: dir, task_dir, vm_dir, jail: Some(jail) }
    }

    /// Runs `script` in the jail with the VM directory writable; its status and output.
    async fn run(&self, script: &str) -> (std::process::ExitStatus, String, String) {
        self.run_confined(script, false).await
    }

    /// The same, as the file server (virtiofsd) when `file_server`.
    async fn run_confined(
        &self,
        script: &str,
        file_server: bool,
    ) -> (std::process::ExitStatus, String, String) {
        let jail = self.jail.as_ref().unwrap();
        let confinement =
            Confinement { writable: vec![self.vm_dir.clone()], file_server, ..Default::default() };
        let mut command = shell(jail, script, &confinement);
        command.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        let mut child = command.spawn().unwrap();
        jail.admit("probe", &mut child).await.unwrap();
        let output = tokio::time::timeout(std::time::Duration::from_secs(60), child.wait_with_output())
            .await
            .expect("the probe ends")
            .unwrap();
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        (output.status, text(&output.stdout), text(&output.stderr))
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.jail.take();
        jail::remove_cgroup(&self.task_dir);
    }
}

/// The sandbox's cgroup directories, in whichever hierarchies hold it.
fn cgroup_dirs(task_dir: &Path) -> Vec<PathBuf> {
    let name = task_dir.file_name().unwrap();
    let mut dirs = vec![Path::new("/sys/fs/cgroup/ironclad/probe-test").join(name)];
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        dirs.push(hierarchy.path().join("ironclad/probe-test").join(name));
    }
    dirs.into_iter().filter(|dir| dir.is_dir()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_in_the_jail_sees_only_its_own_files_and_processes_and_holds_nothing() {
    let probe = Probe::new("probe1");
    let other = Probe::new("probe2");
    std::fs::write(other.vm_dir.join("secret"), "another sandbox's\n").unwrap();
    let uid = probe.jail.as_ref().unwrap().uid();
    assert_ne!(uid, other.jail.as_ref().unwrap().uid(), "each sandbox has its own uid");
    let other_secret = other.vm_dir.join("secret");
    let script = format!(
        "echo uid=$(id -u) gid=$(id -g) groups=$(id -G); \
         echo root: $(ls -A /); echo etc: $(ls -A /etc); \
         echo processes: $(cat /proc/[0-9]*/comm); echo pid1: $(cat /proc/1/comm); \
         grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs)' /proc/self/status; \
         cat {other} 2>/dev/null && echo other-sandbox-readable || echo other-sandbox-hidden; \
         ls /home /root /var /run/containerd 2>/dev/null && echo host-dirs-visible || echo host-dirs-hidden; \
         touch /usr/probe 2>/dev/null && echo usr-writable || echo usr-read-only; \
         echo usr: $(ls -A /usr) bin: $(ls -A /usr/bin); \
         echo from-the-jail > {vm}/written && echo vm-dir-writable; \
         echo hostname=$(cat /proc/sys/kernel/hostname)",
        other = other_secret.display(),
        vm = probe.vm_dir.display(),
    );
    let (status, stdout, stderr) = probe.run(&script).await;
    assert!(status.success(), "{status}: {stdout}{stderr}");
    let line = |key: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("no {key} in {stdout}"))
            .to_string()
    };
    assert_eq!(line("uid="), format!("uid={uid} gid={uid} groups={uid}"));
    // Only the system's read-only files, the devices, the jail's /proc and the VM directory's path.
    let top = probe.vm_dir.components().nth(1).unwrap().as_os_str().to_string_lossy().into_owned();
    let root_line = line("root:");
    let mut root: Vec<&str> = root_line.split_whitespace().skip(1).collect();
    root.sort();
    let mut expected = vec!["bin", "dev", "etc", "lib", "lib64", "proc", "sbin", "usr", top.as_str()];
    expected.sort();
    expected.dedup();
    assert_eq!(root, expected, "{stdout}");
    assert_eq!(line("etc:"), "etc: ld.so.cache", "the loader's cache alone of /etc");
    // Of the host's /usr only the program (a static one, so no library either).
    assert_eq!(line("usr:"), "usr: bin bin: busybox", "{stdout}");
    // Its own PID namespace: the probe's shell and what it runs, nothing of the host's.
    let processes = line("processes:");
    let others: Vec<&str> = processes
        .split_whitespace()
        .skip(1)
        .filter(|comm| !["busybox", "sh", "cat", "exe"].contains(comm))
        .collect();
    assert!(others.is_empty(), "host processes seen: {others:?}");
    assert_eq!(line("pid1:"), "pid1: busybox");
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert!(line(set).ends_with("0000000000000000"), "{stdout}");
    }
    assert!(line("NoNewPrivs").ends_with('1'), "{stdout}");
    for verdict in ["other-sandbox-hidden", "host-dirs-hidden", "usr-read-only", "vm-dir-writable"] {
        assert!(stdout.lines().any(|l| l == verdict), "{verdict}: {stdout}");
    }
    assert_eq!(line("hostname="), "hostname=ironclad-jail");
    assert_eq!(std::fs::read_to_string(probe.vm_dir.join("written")).unwrap(), "from-the-jail\n");
    // Its cgroup is there while the sandbox is; then gone.
    assert!(!cgroup_dirs(&probe.task_dir).is_empty(), "the sandbox's cgroup");
    let task_dir = probe.task_dir.clone();
    drop(probe);
    assert!(cgroup_dirs(&task_dir).is_empty(), "the cgroup is removed: {:?}", cgroup_dirs(&task_dir));
}

/// The file server's jail: root of a user namespace of its own, the sandbox's uid on the host, its
/// capabilities reaching the files of any owner there but no device it could make.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_server_probe_is_the_sandboxs_uid_on_the_host_and_root_only_in_its_namespace() {
    let probe = Probe::new("fileserver1");
    let uid = probe.jail.as_ref().unwrap().uid();
    let roots = probe.vm_dir.join("roots");
    std::fs::write(&roots, "the host root's\n").unwrap();
    std::fs::set_permissions(&roots, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let script = format!(
        "echo inside=$(id -u):$(id -g); echo map: $(cat /proc/self/uid_map); \
         grep -E '^(CapEff|NoNewPrivs)' /proc/self/status; \
         echo owner=$(stat -c %u:%g {roots}); cat {roots}; \
         echo made > {vm}/made; chown 1234:5678 {vm}/made && echo chowned; \
         mknod {vm}/mem c 1 1 2>/dev/null && echo device-made || echo no-device",
        roots = roots.display(),
        vm = probe.vm_dir.display(),
    );
    let (status, stdout, stderr) = probe.run_confined(&script, true).await;
    assert!(status.success(), "{status}: {stdout}{stderr}");
    let has = |line: &str| stdout.lines().any(|l| l == line);
    assert!(has("inside=0:0"), "{stdout}");
    assert!(
        has(&format!(
            "map: 0 {uid} 1 1 1 {} {uid} 0 1 {} {} {}",
            uid - 1,
            uid + 1,
            uid + 1,
            u32::MAX - uid - 1
        )),
        "{stdout}"
    );
    assert!(!has("CapEff:\t0000000000000000") && has("NoNewPrivs:\t1"), "{stdout}");
    // The host's root is the sandbox's uid there, and its 0600 file is served.
    assert!(has(&format!("owner={uid}:{uid}")) && has("the host root's"), "{stdout}");
    assert!(has("chowned") && has("no-device"), "{stdout}");
    let made = std::fs::metadata(probe.vm_dir.join("made")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (made.uid(), made.gid()),
        (1234, 5678),
        "ids other than root's and the sandbox's are themselves"
    );
    std::fs::remove_file(probe.vm_dir.join("made")).unwrap();
    // A file it makes as itself is the sandbox uid's on the host.
    let (status, _, stderr) =
        probe.run_confined(&format!("echo x > {}/own", probe.vm_dir.display()), true).await;
    assert!(status.success(), "{stderr}");
    let own = std::fs::metadata(probe.vm_dir.join("own")).unwrap();
    assert_eq!((own.uid(), own.gid()), (uid, uid), "virtiofsd is the sandbox's uid on the host");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_cannot_grow_past_its_sandboxs_memory_limit() {
    let probe = Probe::new("probe3");
    // 300 MB in one shell variable, against a 128 MiB limit (no swap here to page it out).
    let (status, stdout, stderr) =
        probe.run("x=$(head -c 300000000 /dev/zero | tr '\\0' a); echo grew to ${#x} bytes").await;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "the memory limit killed it: {status} {stdout}{stderr}");
    assert!(!stdout.contains("grew"), "{stdout}");
    // Within the limit, it runs.
    let (status, stdout, _) = probe.run("x=$(head -c 20000000 /dev/zero | tr '\\0' a); echo ${#x}").await;
    assert!(status.success(), "{status}");
    assert_eq!(stdout.trim(), "20000000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jailer_that_is_never_let_go_starts_nothing() {
    let probe = Probe::new("probe4");
    let jail = probe.jail.as_ref().unwrap();
    let marker = probe.vm_dir.join("ran");
    let script = format!("touch {}", marker.display());
    let mut command = shell(jail, &script, &Confinement::default());
    command.stderr(std::process::Stdio::piped());
    let mut child = command.spawn().unwrap();
    // The shim gives up before the go-ahead: the pipe closes without it.
    drop(child.stdin.take());
    let output = child.wait_with_output().await.unwrap();
    assert_eq!(output.status.code(), Some(125));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("without the go-ahead"), "{stderr}");
    assert!(!marker.exists());
}

/// The pids of `pid`'s children.
fn children(pid: u32) -> Vec<u32> {
    let path = format!("/proc/{pid}/task/{pid}/children");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn alive(pid: u32) -> bool {
    ironclad_shim::sandbox::process_alive(pid as i32)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_helper_dies_with_its_jailer_and_gets_the_signals_passed_on() {
    let probe = Probe::new("probe5");
    let jail = probe.jail.as_ref().unwrap();
    let spawn = |script: &str| {
        let mut command = shell(jail, script, &Confinement::default());
        command.stdout(std::process::Stdio::piped());
        command.spawn().unwrap()
    };
    // SIGKILL to the jailer (what the shim's kill-on-drop sends) takes the helper down, though it
    // runs as another uid than the one the jailer began as.
    let mut child = spawn("sleep 1000 & wait");
    jail.admit("probe", &mut child).await.unwrap();
    let jailer = child.id().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    // The helper (the shell, once the jailer's child has executed it) and the sleep it starts.
    let (helper, sleeper) = loop {
        if let [helper] = children(jailer)[..] {
            if let [sleeper] = children(helper)[..] {
                break (helper, sleeper);
            }
        }
        assert!(std::time::Instant::now() < deadline, "the helper never started");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    // The helper is PID 1 of its namespace: what it started goes with it.
    while alive(helper) || alive(sleeper) {
        assert!(
            std::time::Instant::now() < deadline,
            "the helper {helper} or its child {sleeper} outlived its jailer"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // SIGTERM to the jailer reaches a helper that handles it, whose exit status the jailer takes.
    let mut child = spawn("trap 'exit 42' TERM; echo ready; while :; do sleep 0.05; done");
    jail.admit("probe", &mut child).await.unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut ready = [0u8; 6];
    tokio::io::AsyncReadExt::read_exact(&mut stdout, &mut ready).await.unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status =
        tokio::time::timeout(std::time::Duration::from_secs(10), child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(42));
}
