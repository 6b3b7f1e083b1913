//! The jail every helper of a sandbox runs in (QEMU, ironclad-vmm, vhost-device-vsock, virtiofsd),
//! decided in this one place and made by `ironclad-jailer` (jailer/), after Firecracker's jailer.
//!
//! A sandbox gets a uid (and the equal gid) of its own from the configured range, held through a
//! lock file for as long as the shim or any of its jailers lives; a host cgroup whose memory limit
//! is the VM's memory plus an overhead; and for each helper a jailer command line naming what that
//! helper may see: the guest's files read-only, the VM's directory (its sockets) writable, and
//! /dev/kvm or /dev/net/tun where it needs them.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use libcgroups::common::{AnyCgroupManager, CgroupConfig, CgroupManager, ControllerOpt};
use nix::fcntl::{Flock, FlockArg};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};
use tracing::{info, warn};

use crate::config::ShimConfig;

type UidLock = Flock<std::fs::File>;

/// Where the uid locks live: one host-wide set, whatever the run root.
const UID_LOCK_DIR: &str = "/run/ironclad/jail-uids";
/// Each jail's root is a tmpfs mounted here inside its own mount namespace; on the host it stays an
/// empty directory.
const JAIL_ROOT_MOUNT_POINT: &str = "/run/ironclad/jail-root";
/// Taken by whoever makes a sandbox's cgroup or removes the empty parents of one: host-wide.
const HIERARCHY_LOCK: &str = "/run/ironclad/cgroups.lock";
/// The cgroup's path, recorded in the task directory for clean-up after a crash.
const CGROUP_FILE: &str = "cgroup";
/// Where the cgroup hierarchies are mounted (one unified, or one per v1 controller).
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// How long removal waits for the cgroup's processes to be gone while one of them would not leave
/// on its own ([`leaves_on_its_own`]). containerd gives a dead shim's `delete` 5 s in all.
const CGROUP_EMPTY_WAIT: Duration = Duration::from_secs(3);
/// How long it waits while every process left leaves on its own: a killed monitor gives back its
/// guest memory and its VM before it leaves the cgroup, which took more than 3 s in a loaded L1
/// of the nested tier; rmdir would fail until then and nothing would remove the cgroup later.
const CGROUP_EXITING_WAIT: Duration = Duration::from_secs(30);
/// Below each hierarchy's root.
const CGROUP_PARENT: &str = "ironclad";
/// The capabilities virtiofsd keeps, as root of its user namespace (the sandbox's uid on the
/// host): a file server that creates files as the guest's users and keeps their owners and modes
/// (Kata's list), SYS_ADMIN for its own sandbox (a mount namespace pivoted into the shared
/// directory) and SETPCAP, with which it shrinks its own bounding set further to the first list
/// (it fails to start without). They count for the files its namespace maps, none for the host:
/// MKNOD, for one, makes no device node there.
const FILE_SERVER_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_MKNOD",
    "CAP_SETFCAP",
    "CAP_SYS_ADMIN",
    "CAP_SETPCAP",
];
/// Open files: enough for a monitor's devices and a daemon's connections.
const HELPER_NOFILE: u64 = ironclad_jailer::spec::DEFAULT_NOFILE;
/// virtiofsd keeps a descriptor per inode the guest looked up.
const FILE_SERVER_NOFILE: u64 = 65_536;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "ironclad-jailer not found beside the shim or on PATH (make install; or jail = false in {config})"
    )]
    NoJailer { config: PathBuf },
    #[error("jailer = {path} in {config}: no such file")]
    JailerMissing { path: PathBuf, config: PathBuf },
    #[error("cannot {action} the uid lock {path}")]
    UidLock {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("every uid from {first} ({count} of them) is taken by a running sandbox: widen jail_uid_count")]
    NoFreeUid { first: u32, count: u32 },
    #[error("cannot make the sandbox's cgroup {path} (or set jail_cgroup = false)")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot put {helper} (pid {pid}) into the sandbox's cgroup")]
    Admit {
        helper: String,
        pid: u32,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot let {helper} start")]
    Go {
        helper: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot give {path} to the sandbox's uid")]
    Chown {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot record the sandbox's cgroup in {path}")]
    Record {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What one helper may reach inside its jail.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Confinement {
    pub read_only: Vec<PathBuf>,
    pub writable: Vec<PathBuf>,
    pub kvm: bool,
    pub tun: bool,
    /// virtiofsd: root of a user namespace of its own with [`FILE_SERVER_CAPS`], as it must act as
    /// the owners of the files it serves; the sandbox's uid on the host.
    pub file_server: bool,
}

/// One sandbox's jail: its uid, its cgroup and the jailer that makes the rest.
#[derive(Debug)]
pub struct Jail {
    jailer: PathBuf,
    uid: u32,
    lock_path: PathBuf,
    /// Holds the uid (a shared flock, taken too by every jailer of the sandbox).
    _lock: UidLock,
    cgroup: Option<SandboxCgroup>,
}

struct SandboxCgroup {
    path: PathBuf,
    manager: AnyCgroupManager,
    limit_bytes: i64,
}

impl SandboxCgroup {
    /// `ironclad/<namespace>/<task directory's name>`, recorded in the task directory; made when
    /// the first helper is admitted.
    fn plan(config: &ShimConfig, namespace: &str, task_dir: &Path, memory_mib: u32) -> Result<Self, Error> {
        let name = task_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let path = Path::new("/").join(CGROUP_PARENT).join(namespace).join(name);
        let record = task_dir.join(CGROUP_FILE);
        std::fs::write(&record, path.as_os_str().as_encoded_bytes())
            .map_err(|source| Error::Record { path: record, source })?;
        let limit_mib = i64::from(memory_mib) + i64::from(config.jail_memory_overhead_mib);
        Ok(SandboxCgroup { manager: cgroup_manager(&path)?, path, limit_bytes: limit_mib << 20 })
    }
}

impl std::fmt::Debug for SandboxCgroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxCgroup")
            .field("path", &self.path)
            .field("limit_bytes", &self.limit_bytes)
            .finish()
    }
}

impl Jail {
    /// The jail of a new sandbox, or None where the config turns it off. `task_dir` records the
    /// cgroup so that clean-up after a crash finds it.
    pub fn open(
        config: &ShimConfig,
        namespace: &str,
        task_dir: &Path,
        memory_mib: u32,
    ) -> Result<Option<Jail>, Error> {
        if !config.jail {
            warn!(
                "jail = false in {}: the sandbox's helpers run as root in the host's namespaces",
                config.source.display()
            );
            return Ok(None);
        }
        let jailer = jailer_program(config)?;
        let (uid, lock_path, lock) = take_uid(config.jail_first_uid, config.jail_uid_count)?;
        let cgroup = if config.jail_cgroup {
            Some(SandboxCgroup::plan(config, namespace, task_dir, memory_mib)?)
        } else {
            warn!(
                "jail_cgroup = false in {}: the sandbox's memory is not limited on the host",
                config.source.display()
            );
            None
        };
        info!(
            "sandbox jail: uid {uid}{}",
            cgroup
                .as_ref()
                .map(|c| format!(", cgroup {} ({} MiB)", c.path.display(), c.limit_bytes >> 20))
                .unwrap_or_default()
        );
        Ok(Some(Jail { jailer, uid, lock_path, _lock: lock, cgroup }))
    }

    /// The sandbox's uid, which is also its gid.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// Makes `path` the sandbox's, so its helpers can make their sockets there.
    pub fn give(&self, path: &Path) -> Result<(), Error> {
        let id = Some(nix::unistd::Uid::from_raw(self.uid));
        nix::unistd::chown(path, id, Some(nix::unistd::Gid::from_raw(self.uid)))
            .map_err(|source| Error::Chown { path: path.to_path_buf(), source })
    }

    /// The jailer's command line for `program`: it waits on its standard input for [`Jail::admit`].
    pub fn command(&self, program: &Path, args: &[OsString], confinement: &Confinement) -> Command {
        let mut command = Command::new(&self.jailer);
        command.args(self.jailer_args(program, args, confinement)).stdin(Stdio::piped());
        command
    }

    fn jailer_args(&self, program: &Path, args: &[OsString], confinement: &Confinement) -> Vec<OsString> {
        let keep_cap = if confinement.file_server {
            FILE_SERVER_CAPS.iter().map(|cap| (*cap).to_string()).collect()
        } else {
            Vec::new()
        };
        ironclad_jailer::Args {
            uid: self.uid,
            gid: self.uid,
            root: JAIL_ROOT_MOUNT_POINT.into(),
            uid_lock: Some(self.lock_path.clone()),
            bind_ro: confinement.read_only.clone(),
            bind_rw: confinement.writable.clone(),
            kvm: confinement.kvm,
            tun: confinement.tun,
            user_namespace: confinement.file_server,
            keep_cap,
            rlimit_nofile: if confinement.file_server { file_server_nofile() } else { HELPER_NOFILE },
            rlimit_nproc: ironclad_jailer::spec::DEFAULT_NPROC,
            command: std::iter::once(program.as_os_str().to_owned()).chain(args.iter().cloned()).collect(),
        }
        .to_command_line()
    }

    /// Puts a just-started jailer into the sandbox's cgroup, then lets it go on. A jailer that
    /// cannot be admitted is killed.
    pub async fn admit(&self, helper: &str, child: &mut Child) -> Result<(), Error> {
        let stdin = child.stdin.take();
        let result = match self.admit_to_cgroup(helper, child) {
            Ok(()) => say_go(stdin).await.map_err(|source| Error::Go { helper: helper.to_string(), source }),
            Err(err) => Err(err),
        };
        if result.is_err() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        result
    }

    fn admit_to_cgroup(&self, helper: &str, child: &Child) -> Result<(), Error> {
        let Some(cgroup) = &self.cgroup else { return Ok(()) };
        let pid = child.id().unwrap_or_default();
        cgroup.add(pid).map_err(|source| Error::Admit { helper: helper.to_string(), pid, source })
    }
}

impl SandboxCgroup {
    /// Puts `pid` into the cgroup, made on first use, and sets its memory limit.
    fn add(&self, pid: u32) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let raw = i32::try_from(pid)?;
        let hierarchy = lock_hierarchy()?;
        self.manager.add_task(nix::unistd::Pid::from_raw(raw))?;
        drop(hierarchy);
        let memory = oci_spec::runtime::LinuxMemoryBuilder::default().limit(self.limit_bytes).build()?;
        let resources = oci_spec::runtime::LinuxResourcesBuilder::default().memory(memory).build()?;
        let options = ControllerOpt {
            resources: &resources,
            freezer_state: None,
            oom_score_adj: None,
            disable_oom_killer: false,
        };
        Ok(self.manager.apply(&options)?)
    }
}

async fn say_go(stdin: Option<tokio::process::ChildStdin>) -> std::io::Result<()> {
    let mut stdin = stdin.ok_or_else(|| std::io::Error::other("no pipe to its standard input"))?;
    stdin.write_all(ironclad_jailer::GO).await?;
    stdin.shutdown().await
}

/// virtiofsd's open-file limit: [`FILE_SERVER_NOFILE`], or the shim's own hard limit where that is
/// lower (the jailer cannot raise it, and virtiofsd is told the same number to set).
pub fn file_server_nofile() -> u64 {
    let hard =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map(|(_, hard)| hard);
    hard.map_or(FILE_SERVER_NOFILE, |hard| hard.min(FILE_SERVER_NOFILE))
}

/// Kills whatever is left in the sandbox's cgroup (recorded in `task_dir`) and removes it.
pub fn remove_cgroup(task_dir: &Path) {
    let Ok(recorded) = std::fs::read(task_dir.join(CGROUP_FILE)) else { return };
    let path = PathBuf::from(OsString::from(String::from_utf8_lossy(&recorded).into_owned()));
    let removed = cgroup_manager(&path).and_then(|manager| {
        empty_cgroup(&manager);
        manager.remove().map_err(|source| Error::Cgroup { path: path.clone(), source: source.into() })
    });
    if let Err(err) = removed {
        warn!("cannot remove the sandbox's cgroup: {}", crate::hypervisor::error_chain(&err));
    }
    remove_empty_parents(&path);
}

/// Kills what is in the cgroup until it is empty: a helper killed through its jailer (the
/// parent-death signal) may still be exiting, and a monitor letting go of its guest memory takes a
/// while on a loaded host; removal retries only briefly. It waits [`CGROUP_EMPTY_WAIT`] for a
/// process that would not leave on its own, [`CGROUP_EXITING_WAIT`] for those that do.
fn empty_cgroup(manager: &AnyCgroupManager) {
    let started = Instant::now();
    loop {
        let pids = manager.get_all_pids().unwrap_or_default();
        let waited = started.elapsed();
        if pids.is_empty() {
            if waited > CGROUP_EMPTY_WAIT {
                info!("the sandbox's cgroup emptied after {waited:?}: its processes were still exiting");
            }
            return;
        }
        let all_leaving = pids.iter().all(|&pid| leaves_on_its_own(pid));
        if waited > CGROUP_EXITING_WAIT || (waited > CGROUP_EMPTY_WAIT && !all_leaving) {
            warn!(
                "the sandbox's cgroup still holds {} after {waited:?} (all leaving on their own: {all_leaving})",
                states_of(&pids)
            );
            return;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `pid` leaves the cgroup without more from us: it is on its way out (the kernel's
/// PF_EXITING, a zombie that still shows in the cgroup, or SIGKILL pending: a process in
/// uninterruptible sleep takes it when it wakes), or it is a kernel thread, which no signal ends:
/// up to Linux 6.12 KVM starts a worker thread per VM (`kvm-nx-lpage-recovery`) in the monitor's
/// cgroups and stops it only once the VM is destroyed, after the killed monitor has given back its
/// memory. One already gone counts too.
fn leaves_on_its_own(pid: nix::unistd::Pid) -> bool {
    use procfs::process::{ProcState, StatFlags};
    let Ok(process) = procfs::process::Process::new(pid.as_raw()) else { return true };
    let Ok(stat) = process.stat() else { return true };
    stat.flags().is_ok_and(|flags| flags.intersects(StatFlags::PF_EXITING | StatFlags::PF_KTHREAD))
        || matches!(stat.state(), Ok(ProcState::Zombie | ProcState::Dead))
        || process.status().is_ok_and(|status| sigkill_pending(status.sigpnd, status.shdpnd))
}

/// Whether SIGKILL is among a process's pending signals (`SigPnd` and `ShdPnd` in its status, one
/// bit per signal, signal N at bit N - 1).
fn sigkill_pending(thread_pending: u64, process_pending: u64) -> bool {
    let sigkill = 1u64 << (nix::sys::signal::Signal::SIGKILL as u32 - 1);
    (thread_pending | process_pending) & sigkill != 0
}

/// Each of `pids` with its state as /proc shows it (`R`, `S`, `D`, ...; `gone`), for a warning.
fn states_of(pids: &[nix::unistd::Pid]) -> String {
    let state = |pid: &nix::unistd::Pid| {
        procfs::process::Process::new(pid.as_raw())
            .and_then(|process| process.stat())
            .map(|stat| stat.state.to_string())
            .unwrap_or_else(|_| "gone".into())
    };
    pids.iter().map(|pid| format!("{pid} ({})", state(pid))).collect::<Vec<_>>().join(", ")
}

/// The namespace's and ironclad's cgroups go with their last sandbox (rmdir fails on a cgroup
/// that still has children, which is left as it is).
fn remove_empty_parents(path: &Path) {
    let Ok(relative) = path.strip_prefix("/") else { return };
    let _hierarchy = match lock_hierarchy() {
        Ok(lock) => lock,
        Err(err) => {
            return warn!("cannot lock {HIERARCHY_LOCK} to remove the sandbox's empty parent cgroups: {err}")
        }
    };
    let mut roots = vec![PathBuf::from(CGROUP_ROOT)];
    roots.extend(std::fs::read_dir(CGROUP_ROOT).into_iter().flatten().flatten().map(|entry| entry.path()));
    for root in roots {
        for parent in relative.ancestors().skip(1).filter(|p| !p.as_os_str().is_empty()) {
            let _ = std::fs::remove_dir(root.join(parent));
        }
    }
}

/// Serialises making a sandbox's cgroup with removing another's empty parents: libcgroups checks
/// for each level before it makes it, so two sandboxes starting at once, or a parent removed in
/// between, failed the start (EEXIST, ENOENT). Held for the few syscalls either takes.
fn lock_hierarchy() -> std::io::Result<Flock<std::fs::File>> {
    let path = Path::new(HIERARCHY_LOCK);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path)?;
    Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| errno.into())
}

fn cgroup_manager(path: &Path) -> Result<AnyCgroupManager, Error> {
    let config = CgroupConfig {
        cgroup_path: path.to_path_buf(),
        systemd_cgroup: false,
        container_name: String::new(),
    };
    libcgroups::common::create_cgroup_manager(config)
        .map_err(|source| Error::Cgroup { path: path.to_path_buf(), source: source.into() })
}

/// The config's jailer, else the one beside the shim or on PATH.
fn jailer_program(config: &ShimConfig) -> Result<PathBuf, Error> {
    match &config.jailer {
        Some(path) if path.is_file() => Ok(path.clone()),
        Some(path) => Err(Error::JailerMissing { path: path.clone(), config: config.source.clone() }),
        None => crate::hypervisor::find_ironclad_program("ironclad-jailer")
            .ok_or_else(|| Error::NoJailer { config: config.source.clone() }),
    }
}

/// The lowest free uid of the range: its lock file taken exclusively (nobody else holds it), then
/// held shared, as the sandbox's jailers will hold it too, so that it stays taken until the shim
/// and every helper it started are gone.
fn take_uid(first: u32, count: u32) -> Result<(u32, PathBuf, UidLock), Error> {
    let dir = Path::new(UID_LOCK_DIR);
    std::fs::create_dir_all(dir).map_err(|source| Error::UidLock {
        action: "create the directory of",
        path: dir.to_path_buf(),
        source,
    })?;
    for uid in (first..).take(count as usize) {
        let path = dir.join(uid.to_string());
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| Error::UidLock { action: "open", path: path.clone(), source })?;
        let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else { continue };
        // The switch from exclusive to shared is not atomic: someone may take it in between, and
        // then this uid is theirs.
        if lock.relock(FlockArg::LockSharedNonblock).is_ok() {
            return Ok((uid, path, lock));
        }
    }
    Err(Error::NoFreeUid { first, count })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jail(uid: u32) -> Jail {
        let lock = Flock::lock(tempfile::tempfile().unwrap(), FlockArg::LockShared).unwrap();
        Jail { jailer: "/j".into(), uid, lock_path: "/l/900000".into(), _lock: lock, cgroup: None }
    }

    fn strings(args: Vec<OsString>) -> Vec<String> {
        args.into_iter().map(|a| a.into_string().unwrap()).collect()
    }

    #[test]
    fn a_monitor_runs_as_the_sandbox_with_what_it_was_given() {
        let confinement = Confinement {
            read_only: vec!["/k/bzImage".into()],
            writable: vec!["/run/s/vm".into()],
            kvm: true,
            tun: false,
            file_server: false,
        };
        let line =
            strings(jail(900_007).jailer_args(Path::new("/usr/bin/qemu"), &["-m".into()], &confinement));
        let expected = "--uid 900007 --gid 900007 --root /run/ironclad/jail-root --uid-lock /l/900000 \
                        --bind-ro /k/bzImage --bind-rw /run/s/vm --kvm --rlimit-nofile 4096 --rlimit-nproc 1024 \
                        -- /usr/bin/qemu -m";
        assert_eq!(line.join(" "), expected);
    }

    #[test]
    fn the_file_server_alone_is_root_of_a_user_namespace_with_a_file_servers_capabilities() {
        let confinement = Confinement { file_server: true, ..Default::default() };
        let line = strings(jail(900_007).jailer_args(Path::new("/v"), &[], &confinement));
        assert_eq!(&line[..4], ["--uid", "900007", "--gid", "900007"]);
        assert!(line.iter().any(|a| a == "--user-namespace"));
        let monitor = strings(jail(900_007).jailer_args(Path::new("/q"), &[], &Confinement::default()));
        assert!(!monitor.iter().any(|a| a == "--user-namespace" || a == "--keep-cap"));
        let kept: Vec<&String> = line.windows(2).filter(|w| w[0] == "--keep-cap").map(|w| &w[1]).collect();
        assert_eq!(kept.len(), FILE_SERVER_CAPS.len());
        assert!(!line.iter().any(|a| a == "CAP_SYS_PTRACE" || a == "CAP_NET_ADMIN"));
    }

    #[test]
    fn the_jail_is_off_only_where_the_config_says_so_and_a_missing_jailer_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let off = ShimConfig { jail: false, ..ShimConfig::default() };
        assert!(Jail::open(&off, "ns", dir.path(), 256).unwrap().is_none());
        let missing =
            ShimConfig { jailer: Some("/nonexistent/ironclad-jailer".into()), ..ShimConfig::default() };
        let err = Jail::open(&missing, "ns", dir.path(), 256).unwrap_err();
        assert!(matches!(err, Error::JailerMissing { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/ironclad-jailer"), "{err}");
        // Nothing was recorded for a jail that was not made.
        assert!(!dir.path().join(CGROUP_FILE).exists());
    }

    #[test]
    fn a_killed_process_and_a_kernel_thread_leave_on_their_own_and_a_running_one_does_not() {
        let mut child = std::process::Command::new("sleep").arg("60").spawn().unwrap();
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
        assert!(!leaves_on_its_own(pid), "a sleeping process counted as exiting");
        child.kill().unwrap();
        // Not reaped yet: a zombie, which a cgroup may still list.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !leaves_on_its_own(pid) {
            assert!(Instant::now() < deadline, "a killed process never counted as exiting");
            std::thread::sleep(Duration::from_millis(5));
        }
        child.wait().unwrap();
        assert!(leaves_on_its_own(pid), "a process that is gone counts as exiting");
        // kthreadd, a kernel thread: no signal ends one; it leaves with what it serves.
        assert!(leaves_on_its_own(nix::unistd::Pid::from_raw(2)), "a kernel thread counted as one to kill");
    }

    #[test]
    fn sigkill_pending_is_read_from_either_mask() {
        assert!(sigkill_pending(0x100, 0));
        assert!(sigkill_pending(0, 0x100));
        // SIGTERM (15) and SIGSTOP (19) pending, not SIGKILL.
        assert!(!sigkill_pending(1 << 14, 1 << 18));
        assert!(!sigkill_pending(0, 0));
    }

    #[test]
    fn the_warning_names_each_process_state_and_a_gone_one() {
        let mut child = std::process::Command::new("sleep").arg("60").spawn().unwrap();
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while states_of(&[pid]) != format!("{pid} (T)") {
            assert!(Instant::now() < deadline, "never seen stopped: {}", states_of(&[pid]));
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!leaves_on_its_own(pid), "a stopped process counted as exiting");
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(states_of(&[pid]), format!("{pid} (gone)"));
    }

    #[test]
    fn a_uid_is_taken_by_one_sandbox_at_a_time_and_freed_with_it() {
        // A range of its own (per test process), far from the default one.
        let first = 1_500_000_000 + std::process::id() % 1_000_000 * 4;
        let (a, _, held) = take_uid(first, 3).unwrap();
        let (b, _, _held_b) = take_uid(first, 3).unwrap();
        assert_eq!((a, b), (first, first + 1));
        drop(held);
        let (c, path, _held_c) = take_uid(first, 3).unwrap();
        assert_eq!(c, first);
        let (_, _, _held_d) = take_uid(first, 3).unwrap();
        assert!(matches!(take_uid(first, 3), Err(Error::NoFreeUid { count: 3, .. })));
        // A jailer's shared hold keeps it taken after the shim's is gone.
        let _jailer_hold =
            Flock::lock(std::fs::File::open(&path).unwrap(), FlockArg::LockSharedNonblock).unwrap();
        drop(_held_c);
        assert!(matches!(take_uid(first, 1), Err(Error::NoFreeUid { .. })));
        for uid in first..first + 3 {
            let _ = std::fs::remove_file(Path::new(UID_LOCK_DIR).join(uid.to_string()));
        }
    }

    /// Sandboxes of one namespace starting and ending at once: each start makes the namespace's
    /// cgroup if it is missing, each end removes it if it is empty. Unserialised, a start failed
    /// with EEXIST or ENOENT (seen in the nested tier: two `ctr run`s at once).
    #[test]
    fn sandboxes_starting_and_ending_at_once_all_get_their_cgroup() {
        let namespace = format!("cgroup-race-{}", std::process::id());
        let config = ShimConfig::default();
        std::thread::scope(|scope| {
            for worker in 0..4 {
                let (namespace, config) = (&namespace, &config);
                scope.spawn(move || {
                    for round in 0..15 {
                        let task_dir = tempfile::Builder::new()
                            .prefix(&format!("w{worker}r{round}-"))
                            .tempdir()
                            .unwrap();
                        let cgroup = SandboxCgroup::plan(config, namespace, task_dir.path(), 64).unwrap();
                        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
                        let added = cgroup.add(child.id());
                        let _ = child.kill();
                        let _ = child.wait();
                        remove_cgroup(task_dir.path());
                        added.unwrap_or_else(|err| panic!("worker {worker}, round {round}: {err}"));
                    }
                });
            }
        });
        let left = Path::new(CGROUP_ROOT).join("memory").join(CGROUP_PARENT).join(&namespace);
        let unified = Path::new(CGROUP_ROOT).join(CGROUP_PARENT).join(&namespace);
        assert!(!left.exists() && !unified.exists(), "the namespace's cgroup outlived its sandboxes");
    }
}
