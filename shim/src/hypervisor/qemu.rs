//! The `qemu` backend: QEMU's microvm machine, with vsock served by vhost-device-vsock and the
//! sandbox's shared directory (if any) by virtiofsd, both over vhost-user.
//!
//! vhost-device-vsock exposes the same hybrid vsock Unix socket as ironclad-vmm (`CONNECT <port>\n`
//! → `OK <port>\n`), so the agent client does not know which backend it talks to. QEMU needs guest
//! memory it can share with those processes: a memfd backend with `share=on`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use tokio::process::Child;
use tracing::info;

use super::process::{
    create_sandbox_dir, require_guest_files, start_daemon, Error, GuestVm, SandboxDirGuard,
};
use super::Launch;
use super::{find_executable, virtiofsd, HostVirtualization, VmConfig};
use crate::jail::{Confinement, Jail};
use crate::paths::SandboxPaths;
use crate::resources::share_fs::SHARE_TAG;

/// Every VM has its own vhost-device-vsock, so the guest CID need not be unique on the host.
const GUEST_CID: u32 = 3;
/// vhost-device-vsock 0.3.0 (virtio-vsock 0.12) reads a packet's data from one descriptor; the
/// guest kernel (6.12.117) puts payloads over about 32 KiB in page fragments, one descriptor each,
/// and such a packet is dropped. Messages from the guest stay below that.
pub const GUEST_MESSAGE_LIMIT: u32 = 16 * 1024;

/// Where the backend's programs are and how guests run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuBackend {
    pub qemu: PathBuf,
    pub vhost_device_vsock: PathBuf,
    /// The Rust virtiofsd, for sandboxes with a shared directory; looked up when one needs it.
    pub virtiofsd: Option<PathBuf>,
    /// KVM acceleration; only with hardware virtualization, else TCG (software emulation).
    pub use_kvm: bool,
    /// QEMU's seccomp sandbox ([`QEMU_SANDBOX`]); on unless the config turns it off.
    pub sandbox: bool,
    /// What QEMU reads besides its libraries, for its jail: [`data_dirs`].
    pub data_dirs: Vec<PathBuf>,
}

/// Where QEMU finds its firmware and option ROMs (the microvm machine's qboot, PVH's loader) and
/// its modules (TCG itself is one in Debian's build), relative to its binary as QEMU looks them
/// up (`qemu-system-x86_64 -L help`); those that exist.
pub fn data_dirs(qemu: &Path) -> Vec<PathBuf> {
    let Some(prefix) =
        std::fs::canonicalize(qemu).ok().and_then(|q| Some(q.parent()?.parent()?.to_path_buf()))
    else {
        return Vec::new();
    };
    let multiarch = format!("lib/{}-linux-gnu/qemu", std::env::consts::ARCH);
    ["share/qemu", "share/seabios", "lib/ipxe/qemu", multiarch.as_str(), "lib/qemu"]
        .into_iter()
        .map(|dir| prefix.join(dir))
        .filter(|dir| dir.is_dir())
        .collect()
}

/// TCG's translated-code buffer (MiB). QEMU's default for system emulation is 1 GiB, filled as
/// the guest runs new code and never given back: measured here, a busy 256 MiB guest took QEMU to
/// 700 MiB anonymous memory, past the sandbox's cgroup limit (jail.rs). A full buffer is flushed
/// and refilled. A boot fills 48 MiB; `make bench`'s jobs then filled 256 MiB to 188 and 128 to
/// the brim, while 64 MiB ran them as fast and kept the sandbox at 185 MiB PSS after them instead
/// of 326 (docs/benchmarks.md).
pub const TCG_CODE_BUFFER_MIB: u32 = 64;
/// Kernel parameters for a guest under TCG, where every rewrite of kernel code and every timer
/// wait is emulated (measured on guest-kernel 6.12 here, docs/guest-kernel.md):
/// - `noapictimer`: TCG offers no TSC-deadline timer, so the guest measured its local APIC timer
///   against the PIT, a tenth of a second of guest time that emulation stretched to 235 ms (1 and 2
///   vCPUs). The ticks come from the PIT instead, broadcast to the other vCPUs.
/// - `noreplace-smp`: a 1-vCPU guest rewrote every LOCK prefix of the kernel into its uniprocessor
///   form, 90 ms of code patching, each patch invalidating translated code; the prefixes stay.
///
/// Under KVM neither costs anything worth saving (TSC deadline, native patching), and both stay.
pub const TCG_KERNEL_PARAMS: &str = "noapictimer noreplace-smp";
/// QEMU's seccomp filter: its default list, plus no obsolete system calls, no setuid and friends,
/// no fork or exec, and no scheduler or CPU-affinity changes. Nothing of these is needed once the
/// devices are set up: the taps are opened by name, the vhost-user helpers were started by the shim.
pub const QEMU_SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

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
        let virtiofsd = virtiofsd::locate();
        let use_kvm = host.can_boot_linux_on_kvm();
        info!(
            "qemu backend: {} ({})",
            if use_kvm { "KVM" } else { "TCG software emulation" },
            host.explain()
        );
        let data_dirs = data_dirs(&qemu);
        Ok(QemuBackend { qemu, vhost_device_vsock, virtiofsd, use_kvm, sandbox: true, data_dirs })
    }

    /// Starts vhost-device-vsock (and virtiofsd for a shared directory), then QEMU. The sandbox
    /// directory is created here and removed when the VM is stopped or dropped.
    pub async fn start(
        &self,
        config: &VmConfig,
        paths: SandboxPaths,
        jail: Option<&Jail>,
    ) -> Result<GuestVm, Error> {
        require_guest_files(&config.kernel, &config.initrd)?;
        let virtiofsd = virtiofsd::needed(config, self.virtiofsd.as_deref())?;
        create_sandbox_dir(paths.dir(), jail)?;
        let mut guard = SandboxDirGuard(Some(paths.dir().to_path_buf()));
        let mut helpers = vec![self.start_vsock_daemon(&paths, jail).await?];
        if let Some((program, dir)) = virtiofsd {
            helpers.push(virtiofsd::start(program, dir, &paths, jail).await?);
        }
        let args: Vec<OsString> =
            qemu_args(config, &paths, self.use_kvm, self.sandbox).into_iter().map(OsString::from).collect();
        let mut confinement = config.monitor_confinement(paths.dir(), self.use_kvm);
        confinement.read_only.extend(self.data_dirs.iter().cloned());
        let mut vm = GuestVm::spawn(
            "QEMU",
            Launch::new(&self.qemu, args, jail, confinement).inheriting(config.monitor_fds()),
            paths.console_log(),
            paths.agent_socket(),
            config.network.as_ref().map(|n| n.netns.as_path()),
            helpers,
        )
        .await?;
        vm.adopt_sandbox_dir(&mut guard);
        vm.limit_guest_messages(GUEST_MESSAGE_LIMIT);
        Ok(vm)
    }

    async fn start_vsock_daemon(&self, paths: &SandboxPaths, jail: Option<&Jail>) -> Result<Child, Error> {
        let args = vec![
            "--guest-cid".into(),
            GUEST_CID.to_string().into(),
            "--socket".into(),
            paths.vhost_vsock_socket().into(),
            "--uds-path".into(),
            paths.agent_socket().into(),
        ];
        let confinement = Confinement { writable: vec![paths.dir().to_path_buf()], ..Default::default() };
        let launch = Launch::new(&self.vhost_device_vsock, args, jail, confinement);
        start_daemon("vhost-device-vsock", launch, paths.vhost_vsock_socket()).await
    }
}

/// QEMU's command line for one sandbox.
pub fn qemu_args(config: &VmConfig, paths: &SandboxPaths, use_kvm: bool, sandbox: bool) -> Vec<String> {
    let memory = format!("{}M", config.memory_mib);
    let accel = if use_kvm { "kvm".to_string() } else { format!("tcg,tb-size={TCG_CODE_BUFFER_MIB}") };
    let cpu = if use_kvm { "host" } else { "max" };
    let mut args: Vec<String> = vec![
        "-M".into(),
        // Without ACPI, QEMU announces the virtio-mmio devices on the kernel command line itself.
        "microvm,acpi=off".into(),
        "-accel".into(),
        accel,
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
    if sandbox {
        args.extend(["-sandbox".into(), QEMU_SANDBOX.into()]);
    }
    for (index, disk) in config.block_devices.iter().enumerate() {
        let read_only = if disk.read_only { "on" } else { "off" };
        args.push("-drive".into());
        args.push(format!(
            "file={},if=none,id=disk{index},format=raw,readonly={read_only}",
            disk.path.display()
        ));
        args.push("-device".into());
        args.push(format!("virtio-blk-device,drive=disk{index},serial={}", disk.serial));
    }
    if config.shared_dir.is_some() {
        args.extend([
            "-chardev".into(),
            format!("socket,id=virtiofs,path={}", paths.virtiofs_socket().display()),
            "-device".into(),
            format!("vhost-user-fs-device,chardev=virtiofs,tag={SHARE_TAG}"),
        ]);
    }
    if config.free_page_reporting {
        args.extend(["-device".into(), "virtio-balloon-device,free-page-reporting=on".into()]);
    }
    let nics = config.network.iter().flat_map(|network| &network.devices);
    for (index, nic) in nics.enumerate() {
        args.push("-netdev".into());
        args.push(format!("tap,id=net{index},ifname={},script=no,downscript=no", nic.tap));
        args.push("-device".into());
        args.push(format!("virtio-net-device,netdev=net{index},mac={}", nic.mac));
    }
    args.extend([
        "-kernel".into(),
        config.monitor_kernel().display().to_string(),
        "-initrd".into(),
        config.monitor_initrd().display().to_string(),
        "-append".into(),
        if use_kvm {
            config.kernel_cmdline()
        } else {
            format!("{} {TCG_KERNEL_PARAMS}", config.kernel_cmdline())
        },
    ]);
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig {
            kernel: "/k/bzImage".into(),
            initrd: "/k/initrd.img".into(),
            opened: None,
            vcpus: 2,
            memory_mib: 256,
            extra_kernel_params: "quiet".into(),
            block_devices: vec![],
            network: None,
            shared_dir: None,
            free_page_reporting: false,
        }
    }

    /// QEMU that exits at once, `vsock` as vhost-device-vsock, no virtiofsd.
    fn stand_in_backend(vsock: &str) -> QemuBackend {
        QemuBackend {
            qemu: "/bin/true".into(),
            vhost_device_vsock: vsock.into(),
            virtiofsd: None,
            use_kvm: false,
            sandbox: true,
            data_dirs: vec![],
        }
    }

    fn value_after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2).filter(|w| w[0] == flag).map(|w| w[1].as_str()).collect()
    }

    #[test]
    fn qemu_confines_itself_unless_the_config_says_otherwise() {
        let paths = SandboxPaths::new(Path::new("/run/ironclad"), "sb");
        assert_eq!(value_after(&qemu_args(&config(), &paths, false, true), "-sandbox"), [QEMU_SANDBOX]);
        assert!(value_after(&qemu_args(&config(), &paths, false, false), "-sandbox").is_empty());
    }

    #[test]
    fn args_describe_a_microvm_with_shared_memory_and_vhost_vsock() {
        let paths = SandboxPaths::new(Path::new("/run/ironclad"), "sb");
        let args = qemu_args(&config(), &paths, false, true);
        assert_eq!(value_after(&args, "-M"), ["microvm,acpi=off"]);
        assert_eq!(value_after(&args, "-accel"), ["tcg,tb-size=64"]);
        assert_eq!(value_after(&args, "-cpu"), ["max"]);
        assert_eq!(value_after(&args, "-smp"), ["2"]);
        assert_eq!(value_after(&args, "-m"), ["256M"]);
        assert_eq!(value_after(&args, "-object"), ["memory-backend-memfd,id=mem,size=256M,share=on"]);
        assert_eq!(
            value_after(&args, "-chardev"),
            ["socket,id=vsock,path=/run/ironclad/sb/vhost-vsock.sock"]
        );
        assert_eq!(
            value_after(&args, "-append"),
            ["console=ttyS0 reboot=k panic=-1 no_timer_check quiet noapictimer noreplace-smp"]
        );
        let under_kvm = qemu_args(&config(), &paths, true, true);
        assert_eq!(
            value_after(&under_kvm, "-append"),
            ["console=ttyS0 reboot=k panic=-1 no_timer_check quiet"]
        );
        assert!(args.iter().any(|a| a == "-no-reboot"), "a guest reset must end QEMU");
        assert!(value_after(&args, "-device").contains(&"i8042"), "the reset goes through an i8042");
    }

    #[test]
    fn each_nic_is_a_virtio_net_device_on_its_tap_with_its_mac() {
        let paths = SandboxPaths::new(Path::new("/r"), "sb");
        let mut config = config();
        config.network = Some(crate::hypervisor::VmNetwork {
            netns: "/var/run/netns/cni-1".into(),
            devices: vec![crate::hypervisor::NetDevice {
                tap: "tap0_ic".into(),
                mac: "02:1c:00:00:00:01".into(),
            }],
        });
        let args = qemu_args(&config, &paths, false, true);
        assert_eq!(value_after(&args, "-netdev"), ["tap,id=net0,ifname=tap0_ic,script=no,downscript=no"]);
        assert!(
            value_after(&args, "-device").contains(&"virtio-net-device,netdev=net0,mac=02:1c:00:00:00:01")
        );
        assert!(value_after(&qemu_args(&super::tests::config(), &paths, false, true), "-netdev").is_empty());
    }

    #[test]
    fn free_page_reporting_is_a_balloon_that_reports() {
        let paths = SandboxPaths::new(Path::new("/r"), "sb");
        let balloon = "virtio-balloon-device,free-page-reporting=on";
        let without = qemu_args(&config(), &paths, false, true);
        assert!(!value_after(&without, "-device").contains(&balloon));
        let with = qemu_args(&VmConfig { free_page_reporting: true, ..config() }, &paths, false, true);
        assert!(value_after(&with, "-device").contains(&balloon));
    }

    #[test]
    fn a_shared_directory_is_a_vhost_user_fs_device_on_virtiofsds_socket() {
        let paths = SandboxPaths::new(Path::new("/r"), "sb");
        assert!(!qemu_args(&config(), &paths, false, true).iter().any(|a| a.contains("vhost-user-fs")));
        let cfg = VmConfig { shared_dir: Some("/r/shared".into()), ..config() };
        let args = qemu_args(&cfg, &paths, false, true);
        assert!(value_after(&args, "-chardev").contains(&"socket,id=virtiofs,path=/r/sb/virtiofs.sock"));
        assert!(value_after(&args, "-device").contains(&"vhost-user-fs-device,chardev=virtiofs,tag=ironclad"));
    }

    #[tokio::test]
    async fn a_shared_directory_without_virtiofsd_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("kernel");
        std::fs::write(&kernel, b"k").unwrap();
        let cfg = VmConfig {
            kernel: kernel.clone(),
            initrd: kernel,
            opened: None,
            shared_dir: Some(dir.path().into()),
            ..config()
        };
        let backend = stand_in_backend("/bin/true");
        let paths = SandboxPaths::new(dir.path(), "sb");
        let err = backend.start(&cfg, paths.clone(), None).await.err().unwrap();
        assert!(matches!(&err, Error::MissingTool { tool: "virtiofsd", .. }), "{err}");
        assert!(!paths.dir().exists());
    }

    #[test]
    fn disks_are_named_by_serial_and_keep_read_only() {
        let paths = SandboxPaths::new(Path::new("/r"), "sb");
        let mut cfg = config();
        cfg.block_devices = vec![super::super::BlockDevice {
            path: "/img/rootfs.ext4".into(),
            read_only: true,
            serial: "rootfs".into(),
        }];
        let args = qemu_args(&cfg, &paths, false, true);
        assert!(value_after(&args, "-drive")
            .contains(&"file=/img/rootfs.ext4,if=none,id=disk0,format=raw,readonly=on"));
        assert!(value_after(&args, "-device").contains(&"virtio-blk-device,drive=disk0,serial=rootfs"));
    }

    #[test]
    fn qemus_firmware_and_modules_are_found_beside_its_binary() {
        let qemu = Path::new("/usr/bin/qemu-system-x86_64");
        if !qemu.is_file() {
            return;
        }
        let dirs = data_dirs(qemu);
        // Debian's: qboot and PVH's loader, and the TCG accelerator module.
        assert!(dirs.iter().any(|d| d.join("pvh.bin").is_file()), "{dirs:?}");
        assert!(dirs.iter().any(|d| d.join("accel-tcg-x86_64.so").is_file()), "{dirs:?}");
        assert!(data_dirs(Path::new("/nonexistent/bin/qemu")).is_empty());
    }

    #[test]
    fn kvm_is_asked_for_only_when_usable() {
        let paths = SandboxPaths::new(Path::new("/r"), "sb");
        let args = qemu_args(&config(), &paths, true, true);
        assert_eq!(value_after(&args, "-accel"), ["kvm"]);
        assert_eq!(value_after(&args, "-cpu"), ["host"]);
    }

    #[tokio::test]
    async fn missing_kernel_is_named_and_leaves_no_directory() {
        let dir = tempfile::tempdir().unwrap();
        let backend = stand_in_backend("/bin/true");
        let paths = SandboxPaths::new(dir.path(), "sb");
        let err = backend.start(&config(), paths.clone(), None).await.err().unwrap();
        assert!(matches!(&err, Error::MissingFile { what: "kernel", .. }), "{err}");
        assert!(!paths.dir().exists());
    }

    #[tokio::test]
    async fn a_vsock_daemon_that_dies_is_reported_and_cleaned_up() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("kernel");
        std::fs::write(&kernel, b"k").unwrap();
        let cfg = VmConfig { kernel: kernel.clone(), initrd: kernel, ..config() };
        let backend = stand_in_backend("/bin/false");
        let paths = SandboxPaths::new(dir.path(), "sb");
        let err = backend.start(&cfg, paths.clone(), None).await.err().unwrap();
        assert!(matches!(&err, Error::DaemonExited { daemon: "vhost-device-vsock", .. }), "{err}");
        assert!(!paths.dir().exists(), "a failed start must remove the sandbox directory");
    }
}
