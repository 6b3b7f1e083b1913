//! The `ironclad` backend: one ironclad-vmm process per sandbox, described by a JSON file in the
//! sandbox directory. Its hybrid vsock socket is the sandbox's agent socket.

use std::ffi::OsString;
use std::path::PathBuf;

use tracing::info;

use super::process::{create_sandbox_dir, require_guest_files, Error, GuestVm, SandboxDirGuard};
use super::Launch;
use super::{find_ironclad_program, virtiofsd, HostVirtualization, VmConfig};
use crate::jail::Jail;
use crate::paths::SandboxPaths;
use crate::resources::share_fs::SHARE_TAG;
use ironclad_vmm::config as vmm;

/// Each VM has its own vsock device and socket, so the guest CID need not be unique on the host.
const GUEST_CID: u64 = 3;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IroncladBackend {
    pub vmm: PathBuf,
    /// The Rust virtiofsd, for sandboxes with a shared directory.
    pub virtiofsd: Option<PathBuf>,
}

impl IroncladBackend {
    /// Finds ironclad-vmm next to the running binary (an installed set) or on PATH.
    pub fn locate(host: HostVirtualization) -> Result<Self, Error> {
        let vmm = find_ironclad_program("ironclad-vmm").ok_or(Error::MissingTool {
            tool: "ironclad-vmm",
            install: "make install (or cargo build --release)",
        })?;
        info!("ironclad backend: {} ({})", vmm.display(), host.explain());
        Ok(IroncladBackend { vmm, virtiofsd: virtiofsd::locate() })
    }

    pub async fn start(
        &self,
        config: &VmConfig,
        paths: SandboxPaths,
        jail: Option<&Jail>,
    ) -> Result<GuestVm, Error> {
        let virtiofsd = virtiofsd::needed(config, self.virtiofsd.as_deref())?;
        require_guest_files(&config.kernel, &config.initrd)?;
        create_sandbox_dir(paths.dir(), jail)?;
        let mut guard = SandboxDirGuard(Some(paths.dir().to_path_buf()));
        let mut helpers = Vec::new();
        if let Some((program, dir)) = virtiofsd {
            helpers.push(virtiofsd::start(program, dir, &paths, jail).await?);
        }
        let description = paths.dir().join("vm.json");
        let text = serde_json::to_string(&vm_description(config, &paths))
            .map_err(|source| Error::WriteConfig { path: description.clone(), source: source.into() })?;
        std::fs::write(&description, text)
            .map_err(|source| Error::WriteConfig { path: description.clone(), source })?;
        let args = vec![OsString::from("--config"), description.into_os_string()];
        let confinement = config.monitor_confinement(paths.dir(), true);
        let mut vm = GuestVm::spawn(
            "ironclad-vmm",
            Launch::new(&self.vmm, args, jail, confinement).inheriting(config.monitor_fds()),
            paths.console_log(),
            paths.agent_socket(),
            config.network.as_ref().map(|n| n.netns.as_path()),
            helpers,
        )
        .await?;
        vm.adopt_sandbox_dir(&mut guard);
        Ok(vm)
    }
}

/// The ironclad-vmm VM description for one sandbox, in the monitor's own types.
pub fn vm_description(config: &VmConfig, paths: &SandboxPaths) -> vmm::VmConfig {
    vmm::VmConfig {
        vcpus: config.vcpus,
        memory_mib: config.memory_mib,
        kernel: config.monitor_kernel(),
        initrd: Some(config.monitor_initrd()),
        cmdline: config.kernel_cmdline(),
        block: config
            .block_devices
            .iter()
            .map(|d| vmm::BlockConfig {
                path: d.path.clone(),
                read_only: d.read_only,
                serial: d.serial.clone(),
            })
            .collect(),
        net: config
            .network
            .iter()
            .flat_map(|network| &network.devices)
            .map(|nic| vmm::NetConfig { tap: nic.tap.clone(), mac: nic.mac.clone() })
            .collect(),
        vsock: Some(vmm::VsockConfig { guest_cid: GUEST_CID, uds_path: paths.agent_socket() }),
        fs: config
            .shared_dir
            .iter()
            .map(|_| vmm::FsConfig { socket: paths.virtiofs_socket(), tag: SHARE_TAG.into() })
            .collect(),
        free_page_reporting: config.free_page_reporting,
        serial: vmm::SerialOutput::Stdout,
        // Its counters, every second and at exit: the shim logs them when the VM ends.
        metrics: Some(paths.dir().join(super::process::MONITOR_METRICS_FILE)),
        // Off: it logs guest writes to a port, which only a benchmark wants.
        boot_timer: false,
        seccomp: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::OpenedGuest;
    use std::path::Path;

    #[test]
    fn the_description_points_vsock_at_the_sandbox_socket() {
        let config = VmConfig {
            kernel: "/k/bzImage".into(),
            initrd: "/k/initrd.img".into(),
            opened: None,
            vcpus: 1,
            memory_mib: 256,
            extra_kernel_params: "quiet".into(),
            block_devices: vec![],
            network: None,
            shared_dir: None,
            free_page_reporting: false,
        };
        let paths = SandboxPaths::new(Path::new("/run/ironclad"), "sb");
        let description = vm_description(&config, &paths);
        let vsock = description.vsock.as_ref().unwrap();
        assert_eq!(vsock.uds_path, Path::new("/run/ironclad/sb/vsock.sock"));
        assert_eq!(description.cmdline, "console=ttyS0 reboot=k panic=-1 no_timer_check quiet");
        assert_eq!(description.memory_mib, 256);
        assert!(!description.boot_timer, "the boot timer is for benchmarks only");
        assert!(description.seccomp);
        assert!(!description.free_page_reporting, "no balloon unless asked for");
        let reporting = VmConfig { free_page_reporting: true, ..config.clone() };
        assert!(vm_description(&reporting, &paths).free_page_reporting);
        assert!(description.net.is_empty(), "no network, no NIC");
        let mut with_nic = config.clone();
        with_nic.network = Some(crate::hypervisor::VmNetwork {
            netns: "/var/run/netns/cni-1".into(),
            devices: vec![crate::hypervisor::NetDevice {
                tap: "tap0_ic".into(),
                mac: "02:1c:00:00:00:01".into(),
            }],
        });
        let description = vm_description(&with_nic, &paths);
        let nic = vmm::NetConfig { tap: "tap0_ic".into(), mac: "02:1c:00:00:00:01".into() };
        assert_eq!(description.net, [nic]);
        assert!(description.fs.is_empty(), "no shared directory, no virtio-fs");
        assert_eq!(description.metrics.as_deref(), Some(Path::new("/run/ironclad/sb/metrics.json")));
        let shared = VmConfig { shared_dir: Some("/run/ironclad/sb-task/shared".into()), ..config.clone() };
        let description = vm_description(&shared, &paths);
        let fs = vmm::FsConfig { socket: "/run/ironclad/sb/virtiofs.sock".into(), tag: "ironclad".into() };
        assert_eq!(description.fs, [fs]);
        // What the shim writes is what ironclad-vmm reads.
        let text = serde_json::to_string(&description).unwrap();
        let read: vmm::VmConfig = serde_json::from_str(&text).unwrap();
        assert_eq!(read, description);
    }

    /// A one-vCPU guest whose kernel and initrd are a stand-in file in `dir`.
    fn stand_in_guest(dir: &Path) -> VmConfig {
        let kernel = dir.join("bzImage");
        std::fs::write(&kernel, b"not a kernel").unwrap();
        VmConfig {
            kernel: kernel.clone(),
            initrd: kernel,
            opened: None,
            vcpus: 1,
            memory_mib: 64,
            extra_kernel_params: String::new(),
            block_devices: vec![],
            network: None,
            shared_dir: None,
            free_page_reporting: false,
        }
    }

    /// A backend whose "ironclad-vmm" is the shell `script` (it gets `--config <vm.json>`).
    fn stand_in_vmm(dir: &Path, script: &str) -> IroncladBackend {
        let fake = dir.join("fake-vmm");
        std::fs::write(&fake, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        IroncladBackend { vmm: fake, virtiofsd: None }
    }

    #[tokio::test]
    async fn a_vmm_that_dies_at_once_is_reported_with_its_words() {
        let dir = tempfile::tempdir().unwrap();
        let config = stand_in_guest(dir.path());
        // A stand-in monitor that fails the way a VMM refusing its configuration does.
        let backend =
            stand_in_vmm(dir.path(), "echo 'ironclad-vmm: invalid configuration: kernel: bad' >&2\nexit 1");
        let paths = SandboxPaths::new(dir.path(), "sb");
        let mut vm = backend.start(&config, paths.clone(), None).await.unwrap();
        let err = vm.wait_ready(std::time::Duration::from_secs(10)).await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains("ironclad-vmm exited"), "{text}");
        assert!(text.contains("invalid configuration: kernel: bad"), "{text}");
        drop(vm);
        assert!(!paths.dir().exists(), "the sandbox directory goes with the VM");
    }

    #[tokio::test]
    async fn the_monitor_boots_the_kernel_the_shim_opened_not_one_swapped_in_later() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = stand_in_guest(dir.path());
        std::fs::write(&config.kernel, b"the checked kernel").unwrap();
        let pin = crate::resources::pinned::file_sha256(&config.kernel).unwrap();
        let open = |path: &Path| crate::resources::pinned::open_verified("kernel", path, Some(&pin)).unwrap();
        config.opened = Some(OpenedGuest { kernel: open(&config.kernel), initrd: open(&config.initrd) });
        let swapped = dir.path().join("swapped");
        std::fs::write(&swapped, b"someone else's kernel").unwrap();
        std::fs::rename(&swapped, &config.kernel).unwrap();
        // A stand-in monitor that reports the kernel it would load, as vm.json names it.
        let script = "k=$(sed 's/.*\"kernel\":\"\\([^\"]*\\)\".*/\\1/' \"$2\")\n\
                      echo \"loading $k: $(cat \"$k\")\" >&2\nexit 1";
        let backend = stand_in_vmm(dir.path(), script);
        let paths = SandboxPaths::new(dir.path(), "sb");
        let mut vm = backend.start(&config, paths, None).await.unwrap();
        let text = vm.wait_ready(std::time::Duration::from_secs(10)).await.unwrap_err().to_string();
        assert!(text.contains("loading /proc/self/fd/"), "{text}");
        assert!(text.contains(": the checked kernel"), "{text}");
    }

    #[tokio::test]
    async fn the_monitors_counters_are_read_from_its_sandbox_directory() {
        let dir = tempfile::tempdir().unwrap();
        let config = stand_in_guest(dir.path());
        // A stand-in monitor that writes its counters where vm.json says, then waits.
        let script = "d=$(dirname \"$2\")\necho '{\"exit\": \"running\", \"block\": []}' > \"$d/metrics.json\"\nexec sleep 600";
        let backend = stand_in_vmm(dir.path(), script);
        let paths = SandboxPaths::new(dir.path(), "sb");
        let vm = backend.start(&config, paths.clone(), None).await.unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while vm.monitor_counters().is_none() {
            assert!(std::time::Instant::now() < deadline, "no counters read");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(vm.monitor_counters().unwrap(), r#"{"block":[],"exit":"running"}"#);
        drop(vm);
    }
}
