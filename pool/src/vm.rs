//! One pooled VM: booted the way a shim boots a cold sandbox (the same backend, jail, guest files,
//! size and command line), but with nothing of a tenant: no rootfs disk, an empty shared directory,
//! and a network namespace of its own whose one tap waits for a CNI interface. Once its agent is
//! ready it is paused (SIGSTOP to the monitor) until a shim takes it.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ironclad_shim::config::ShimConfig;
use ironclad_shim::hypervisor::process::{pidfd_open, HandedOver};
use ironclad_shim::hypervisor::{self, error_chain, Backend, GuestVm, VmConfig};
use ironclad_shim::jail::{self, Jail};
use ironclad_shim::paths::SandboxPaths;
use ironclad_shim::pool::{Offer, Template};
use ironclad_shim::resources::network::{self, Attachment};
use ironclad_shim::resources::share_fs::{self, ShareFs};
use ironclad_shim::sandbox::{self, clean_up_task_dir_off_the_runtime, process_alive};
use tracing::warn;

/// The cgroup namespace of pooled VMs' jails (`ironclad/ironclad-pool/<vm id>`).
const CGROUP_NAMESPACE: &str = "ironclad-pool";
/// Marks a VM directory handed to a shim: a restarted pool leaves it to that shim.
pub const HANDED_OVER_FILE: &str = "handed-over";
/// The network namespace's bind mount in the VM's directory.
const NETNS_FILE: &str = "net";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot make the VM's directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Jail(#[from] jail::Error),
    #[error(transparent)]
    Network(#[from] network::Error),
    #[error(transparent)]
    Share(#[from] share_fs::Error),
    #[error(transparent)]
    Hypervisor(#[from] hypervisor::Error),
    #[error(transparent)]
    Record(#[from] sandbox::Error),
    #[error("cannot {action} the VM's monitor")]
    Signal {
        action: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("cannot open a pidfd of process {pid}")]
    PidFd {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM cannot be handed over: it was not started here, or its console was not kept")]
    NotHandable,
    #[error("cannot mark {path} handed over")]
    Mark {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A booted, paused VM waiting for a shim.
pub struct PooledVm {
    pub id: String,
    pub dir: PathBuf,
    vm: GuestVm,
    /// Its network namespace, with one tap waiting for a CNI interface.
    network: Attachment,
    /// Holds the uid until the VM is handed over (its jailed helpers hold it too).
    jail: Option<Jail>,
    pub booted_in: Duration,
}

/// What a take gives the shim: the offer, and the descriptors that go with it in the reply's
/// order (console, stderr, a pidfd per process). The pool keeps the children, to reap them.
pub struct Handover {
    pub offer: Offer,
    pub fds: Vec<OwnedFd>,
    pub children: Vec<tokio::process::Child>,
}

impl PooledVm {
    /// Boots VM `id` in `<pool dir>/<id>`; whatever fails removes all it made.
    pub async fn boot(
        config: &ShimConfig,
        backend: &Backend,
        template: &Template,
        dir: PathBuf,
        id: String,
    ) -> Result<PooledVm, Error> {
        use std::os::unix::fs::DirBuilderExt;
        // The pool's directory too, which goes whenever its last VM does.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| Error::Dir { path: dir.clone(), source })?;
        let started = Instant::now();
        match Self::boot_in(config, backend, template, &dir, &id).await {
            Ok((vm, network, jail)) => {
                Ok(PooledVm { id, dir, vm, network, jail, booted_in: started.elapsed() })
            }
            Err(err) => {
                clean_up_task_dir_off_the_runtime(&dir).await;
                Err(err)
            }
        }
    }

    async fn boot_in(
        config: &ShimConfig,
        backend: &Backend,
        template: &Template,
        dir: &Path,
        id: &str,
    ) -> Result<(GuestVm, Attachment, Option<Jail>), Error> {
        let settings = &template.settings;
        let jail = Jail::open(config, CGROUP_NAMESPACE, dir, settings.memory_mib)?;
        let owner = jail.as_ref().map(Jail::uid);
        let netns = dir.join(NETNS_FILE);
        network::create_netns(&netns)?;
        let network =
            Attachment::prepare(&netns, network::mac_for(id), config.denied_destinations.clone(), owner)
                .await?;
        let share = ShareFs::prepare(dir)?;
        let vm_config = VmConfig {
            kernel: config.kernel.clone(),
            initrd: config.initrd.clone(),
            opened: Some(template.opened.clone()),
            vcpus: settings.vcpus,
            memory_mib: settings.memory_mib,
            extra_kernel_params: template.kernel_params.clone(),
            block_devices: vec![],
            network: Some(network.vm_network()),
            shared_dir: Some(share.dir().to_path_buf()),
            free_page_reporting: settings.free_page_reporting,
        };
        let console_log = dir.join("console.log");
        sandbox::record_console_log(dir, &console_log)?;
        let paths = SandboxPaths::new(dir, "vm").with_console_log(console_log);
        let mut vm = backend.start(&vm_config, paths, jail.as_ref()).await?;
        sandbox::record_pids(dir, &vm)?;
        vm.wait_ready(Duration::from_secs(config.boot_timeout_secs)).await?;
        signal(&vm, nix::sys::signal::Signal::SIGSTOP, "pause")?;
        Ok((vm, network, jail))
    }

    /// Whether its monitor still runs (a dead child of ours is a zombie until reaped).
    pub fn is_alive(&self) -> bool {
        let monitor = self.vm.pids().first().copied().unwrap_or_default();
        i32::try_from(monitor).is_ok_and(process_alive)
    }

    /// The console's last lines, for the log of a VM that died.
    pub fn console_tail(&self) -> String {
        ironclad_shim::guest_text::clean(&self.vm.console_tail())
    }

    /// Resumes the VM and gives it away: from here on it is the shim's, never the pool's again.
    /// On failure its processes are killed; its directory is the caller's to remove.
    pub fn hand_over(self) -> Result<Handover, Error> {
        let marker = self.dir.join(HANDED_OVER_FILE);
        std::fs::write(&marker, b"").map_err(|source| Error::Mark { path: marker, source })?;
        signal(&self.vm, nix::sys::signal::Signal::SIGCONT, "resume")?;
        let pids = self.vm.pids();
        let pidfds = pids
            .iter()
            .map(|&pid| pidfd_open(pid).map_err(|source| Error::PidFd { pid, source }))
            .collect::<Result<Vec<_>, _>>()?;
        let monitor_name = self.vm.monitor_name().to_string();
        let HandedOver { children, console, stderr, agent_socket, ready, guest_message_limit, .. } =
            self.vm.hand_over().ok_or(Error::NotHandable)?;
        let tap = self.network.tap_names().first().map(|tap| tap.to_string()).unwrap_or_default();
        let offer = Offer {
            guest_mac: network::mac_for(&self.id),
            id: self.id,
            dir: self.dir,
            monitor_name,
            pids,
            agent_socket,
            guest_message_limit,
            agent_version: ready.line.version,
            uptime_ms: ready.line.uptime_ms,
            init_ms: ready.line.init_ms,
            ready_after_ms: u64::try_from(ready.since_start.as_millis()).unwrap_or(u64::MAX),
            netns: self.network.netns.clone(),
            tap,
            uid: self.jail.as_ref().map(Jail::uid),
        };
        let fds = [console, stderr].into_iter().chain(pidfds).collect();
        Ok(Handover { offer, fds, children })
    }

    /// Stops the VM and removes everything it had.
    pub async fn discard(self) {
        let dir = self.dir.clone();
        if let Err(err) = self.vm.stop(Duration::ZERO).await {
            warn!("stopping pooled VM {}: {}", self.id, error_chain(&err));
        }
        clean_up_task_dir_off_the_runtime(&dir).await;
    }
}

/// Sends `signal` to the monitor and every process below it: the recorded pid is its jailer's
/// supervisor, the monitor itself a child of that (SIGSTOP is not passed on, as no signal that
/// cannot be caught is).
fn signal(vm: &GuestVm, signal: nix::sys::signal::Signal, action: &'static str) -> Result<(), Error> {
    let monitor = vm.pids().first().copied().unwrap_or_default();
    let root = i32::try_from(monitor).map_err(|_| Error::Signal { action, source: nix::Error::ESRCH })?;
    for pid in process_tree(root) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
            .map_err(|source| Error::Signal { action, source })?;
    }
    Ok(())
}

/// `root` and its descendants, parents first, from /proc/PID/task/TID/children.
pub fn process_tree(root: i32) -> Vec<i32> {
    let mut tree = vec![root];
    let mut next = 0;
    while next < tree.len() {
        let pid = tree[next];
        next += 1;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { continue };
        for task in tasks.flatten() {
            let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            tree.extend(children.split_whitespace().filter_map(|child| child.parse::<i32>().ok()));
        }
    }
    tree
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tree_holds_a_process_and_its_descendants() {
        let mut shell =
            std::process::Command::new("sh").args(["-c", "sleep 30 & sleep 30 & wait"]).spawn().unwrap();
        let root = i32::try_from(shell.id()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while process_tree(root).len() < 3 {
            assert!(Instant::now() < deadline, "{:?}", process_tree(root));
            std::thread::sleep(Duration::from_millis(10));
        }
        let tree = process_tree(root);
        assert_eq!(tree[0], root);
        assert_eq!(tree.len(), 3, "{tree:?}");
        for pid in &tree[1..] {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::Signal::SIGKILL)
                .unwrap();
        }
        shell.wait().unwrap();
        assert_eq!(process_tree(i32::MAX), vec![i32::MAX], "a process that does not exist is its own tree");
    }
}
