//! Hypervisor backends: what boots the guest and how the shim reaches its agent.
//!
//! `qemu` boots the guest under QEMU's microvm machine (with software emulation where the CPU has no
//! hardware virtualization); the `ironclad` backend (ironclad-vmm) joins it behind one trait in the
//! shim issue.

pub mod console;
pub mod ironclad;
pub mod process;
pub mod qemu;
pub mod virtiofsd;

use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};

pub use process::{Error, GuestVm, Launch, Ready};

use crate::jail::{Confinement, Jail};
use crate::resources::pinned::GuestFile;
use tracing::info;

/// What every backend needs to boot a sandbox VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The kernel and initrd as the shim opened (and checked) them: the monitor inherits these
    /// and reads them rather than the paths above. None in tests and benchmarks that start a
    /// monitor on paths alone.
    pub opened: Option<OpenedGuest>,
    pub vcpus: u8,
    pub memory_mib: u32,
    /// Appended to the base command line (console, reset, panic behaviour).
    pub extra_kernel_params: String,
    /// Disks for the guest, which finds each by its serial.
    pub block_devices: Vec<BlockDevice>,
    /// The sandbox's network, if it has one: the monitor runs in that network namespace, where
    /// its taps are.
    pub network: Option<VmNetwork>,
    /// A host directory served to the guest through virtio-fs (virtiofsd, vhost-user) under the
    /// tag `resources::share_fs::SHARE_TAG`.
    pub shared_dir: Option<PathBuf>,
    /// A virtio-balloon for free page reporting (never inflated).
    pub free_page_reporting: bool,
}

/// Where the monitor runs and the NICs it gives the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmNetwork {
    /// The network namespace (a path such as /var/run/netns/cni-…).
    pub netns: PathBuf,
    pub devices: Vec<NetDevice>,
}

/// A virtio-net NIC backed by a tap that exists in the sandbox's network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetDevice {
    pub tap: String,
    /// "02:00:00:00:00:01": the guest NIC takes the MAC of the interface it stands in for.
    pub mac: String,
}

/// A raw disk image given to the guest as virtio-blk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDevice {
    pub path: PathBuf,
    pub read_only: bool,
    /// What the guest reads in /sys/block/vdX/serial (at most 20 bytes).
    pub serial: String,
}

/// The guest kernel and initrd, open in the shim.
#[derive(Debug, Clone)]
pub struct OpenedGuest {
    pub kernel: GuestFile,
    pub initrd: GuestFile,
}

impl VmConfig {
    /// The kernel as the monitor opens it.
    pub fn monitor_kernel(&self) -> PathBuf {
        self.opened.as_ref().map_or_else(|| self.kernel.clone(), |opened| opened.kernel.monitor_path())
    }

    /// The initrd as the monitor opens it.
    pub fn monitor_initrd(&self) -> PathBuf {
        self.opened.as_ref().map_or_else(|| self.initrd.clone(), |opened| opened.initrd.monitor_path())
    }

    /// The descriptors the monitor inherits: the opened kernel and initrd.
    pub fn monitor_fds(&self) -> Vec<BorrowedFd<'_>> {
        self.opened.iter().flat_map(|opened| [opened.kernel.fd(), opened.initrd.fd()]).collect()
    }

    /// What the monitor reads and may write on the host, for its jail: the kernel and the initrd
    /// unless it inherits them, and the disks, each by its access; the VM's directory (sockets,
    /// description, counters) is the backend's to add.
    pub fn monitor_confinement(&self, vm_dir: &Path, kvm: bool) -> Confinement {
        let (writable, read_only): (Vec<&BlockDevice>, Vec<&BlockDevice>) =
            self.block_devices.iter().partition(|disk| !disk.read_only);
        let guest_files = match self.opened {
            Some(_) => vec![],
            None => vec![self.kernel.clone(), self.initrd.clone()],
        };
        Confinement {
            read_only: guest_files
                .into_iter()
                .chain(read_only.into_iter().map(|disk| disk.path.clone()))
                .collect(),
            writable: std::iter::once(vm_dir.to_path_buf())
                .chain(writable.into_iter().map(|disk| disk.path.clone()))
                .collect(),
            kvm,
            tun: self.network.as_ref().is_some_and(|network| !network.devices.is_empty()),
            file_server: false,
        }
    }

    /// The guest kernel command line. `reboot=k` resets through the i8042, which both backends turn
    /// into an exit; `panic=-1` makes a kernel panic reset (and so exit) instead of hanging;
    /// `no_timer_check` skips the boot-time check that the timer interrupt arrives within a few
    /// jiffies, which an emulated guest on a loaded host can miss, panicking with "IO-APIC + timer
    /// doesn't work!" (seen here under TCG: one boot in some hundreds; Kata passes it too).
    pub fn kernel_cmdline(&self) -> String {
        let base = "console=ttyS0 reboot=k panic=-1 no_timer_check";
        if self.extra_kernel_params.trim().is_empty() {
            base.to_string()
        } else {
            format!("{base} {}", self.extra_kernel_params.trim())
        }
    }
}

/// The agent's ready line on the console: `ironclad-agent ready version=<semver> uptime_ms=<ms>`,
/// and `init_ms=<ms>` (the uptime at which the agent began) where the agent says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyLine {
    pub version: String,
    pub uptime_ms: u64,
    pub init_ms: Option<u64>,
}

/// The longest agent version accepted on the ready line.
const MAX_VERSION_LEN: usize = 64;

/// The ready line's fields. The guest wrote it: a version that is not a plain semver-like word
/// (letters, digits, `.`, `+`, `-`; at most 64 bytes) makes it no ready line at all.
pub fn parse_ready_line(line: &str) -> Option<ReadyLine> {
    let rest = line.trim_end().strip_prefix(ironclad_protocol::READY_PREFIX)?;
    let mut version = None;
    let mut uptime_ms = None;
    let mut init_ms = None;
    for field in rest.split_whitespace() {
        match field.split_once('=') {
            Some(("version", v)) if is_plain_version(v) => version = Some(v.to_string()),
            Some(("uptime_ms", v)) => uptime_ms = v.parse().ok(),
            Some(("init_ms", v)) => init_ms = v.parse().ok(),
            _ => {}
        }
    }
    let uptime_ms = uptime_ms?;
    // A start after the ready line is a lie: dropped, not believed.
    Some(ReadyLine { version: version?, uptime_ms, init_ms: init_ms.filter(|&init| init <= uptime_ms) })
}

fn is_plain_version(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= MAX_VERSION_LEN
        && text.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'-'))
}

/// What the host offers for running guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostVirtualization {
    /// /dev/kvm opens read-write.
    pub kvm_opens: bool,
    /// The CPU flags show vmx or svm: KVM runs guests on hardware, not through its instruction emulator.
    pub hardware_virtualization: bool,
}

impl HostVirtualization {
    pub fn detect() -> Self {
        let kvm_opens = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        HostVirtualization { kvm_opens, hardware_virtualization: cpu_flags_show_virtualization(&cpuinfo) }
    }

    /// Whether a Linux guest can run on KVM here. Without vmx/svm, KVM emulates guest kernel code and
    /// cannot boot Linux (see docs/testing.md), so only hardware virtualization counts.
    pub fn can_boot_linux_on_kvm(&self) -> bool {
        self.kvm_opens && self.hardware_virtualization
    }

    /// A sentence saying why KVM will or will not be used, for the logs.
    pub fn explain(&self) -> &'static str {
        match (self.kvm_opens, self.hardware_virtualization) {
            (true, true) => "/dev/kvm opens and the CPU has vmx/svm",
            (true, false) => {
                "/dev/kvm opens but the CPU flags show no vmx/svm, so KVM cannot boot Linux here"
            }
            (false, true) => "the CPU has vmx/svm but /dev/kvm does not open",
            (false, false) => "/dev/kvm does not open and the CPU has no vmx/svm",
        }
    }
}

fn cpu_flags_show_virtualization(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|line| line.starts_with("flags"))
        .any(|line| line.split_whitespace().any(|flag| flag == "vmx" || flag == "svm"))
}

/// Finds an executable by name on PATH (or takes a path as it is).
pub fn find_executable(name: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let is_executable = |p: &Path| {
        std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
    };
    if name.components().count() > 1 {
        return is_executable(name).then(|| name.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| is_executable(p))
}

/// One of ironclad's own programs: beside the running shim (an installed set, or cargo's target
/// directory), else on PATH.
pub fn find_ironclad_program(name: &str) -> Option<PathBuf> {
    let beside_us = std::env::current_exe().ok().and_then(|exe| exe.parent().map(|dir| dir.join(name)));
    beside_us.filter(|path| path.is_file()).or_else(|| find_executable(Path::new(name)))
}

/// Which monitor runs the sandbox VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HypervisorKind {
    /// ironclad-vmm where it can boot Linux (KVM with vmx/svm), else QEMU.
    Auto,
    Ironclad,
    Qemu,
}

impl HypervisorKind {
    /// `auto` made concrete for this host: ironclad-vmm where KVM can boot Linux, else QEMU.
    pub fn resolve(self, host: HostVirtualization) -> HypervisorKind {
        match self {
            HypervisorKind::Auto if host.can_boot_linux_on_kvm() => HypervisorKind::Ironclad,
            HypervisorKind::Auto => HypervisorKind::Qemu,
            explicit => explicit,
        }
    }
}

impl std::str::FromStr for HypervisorKind {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(HypervisorKind::Auto),
            "ironclad" => Ok(HypervisorKind::Ironclad),
            "qemu" => Ok(HypervisorKind::Qemu),
            other => Err(format!("unknown hypervisor {other:?}: expected auto, ironclad or qemu")),
        }
    }
}

/// A located backend, ready to start VMs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Ironclad(ironclad::IroncladBackend),
    Qemu(qemu::QemuBackend),
}

impl Backend {
    /// Resolves `auto` from what the host offers, logging why, and finds the backend's programs.
    pub fn select(kind: HypervisorKind, host: HostVirtualization) -> Result<Self, Error> {
        let resolved = kind.resolve(host);
        if kind == HypervisorKind::Auto {
            let name = if resolved == HypervisorKind::Ironclad { "ironclad-vmm" } else { "qemu" };
            info!("hypervisor auto: {name}, because {}", host.explain());
        }
        match resolved {
            HypervisorKind::Ironclad => Ok(Backend::Ironclad(ironclad::IroncladBackend::locate(host)?)),
            _ => Ok(Backend::Qemu(qemu::QemuBackend::locate(host)?)),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Backend::Ironclad(_) => "ironclad",
            Backend::Qemu(_) => "qemu",
        }
    }

    pub async fn start(
        &self,
        config: &VmConfig,
        paths: crate::paths::SandboxPaths,
        jail: Option<&Jail>,
    ) -> Result<GuestVm, Error> {
        match self {
            Backend::Ironclad(backend) => backend.start(config, paths, jail).await,
            Backend::Qemu(backend) => backend.start(config, paths, jail).await,
        }
    }
}

/// "outer: inner: innermost", escaped and cut (see [`crate::guest_text`]): errors carry what the
/// guest said (agent messages, console lines), and this is where they become text for a log line
/// or for containerd.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    crate::guest_text::escape(&ironclad_protocol::error_chain(err), 4 * crate::guest_text::MAX_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypervisor_names_parse() {
        assert_eq!("auto".parse(), Ok(HypervisorKind::Auto));
        assert_eq!("ironclad".parse(), Ok(HypervisorKind::Ironclad));
        assert_eq!("qemu".parse(), Ok(HypervisorKind::Qemu));
        assert!("firecracker".parse::<HypervisorKind>().is_err());
    }

    #[test]
    fn parses_the_ready_line_and_rejects_others() {
        assert_eq!(
            parse_ready_line("ironclad-agent ready version=0.1.0 uptime_ms=1873\r\n"),
            Some(ReadyLine { version: "0.1.0".into(), uptime_ms: 1873, init_ms: None })
        );
        assert_eq!(
            parse_ready_line("ironclad-agent ready version=0.1.0 uptime_ms=1873 init_ms=912\n"),
            Some(ReadyLine { version: "0.1.0".into(), uptime_ms: 1873, init_ms: Some(912) })
        );
        assert_eq!(
            parse_ready_line("ironclad-agent ready version=0.1.0 uptime_ms=1873 init_ms=5000")
                .unwrap()
                .init_ms,
            None,
            "the agent cannot have begun after it was ready"
        );
        assert_eq!(parse_ready_line("ironclad-agent ready version=0.1.0"), None);
        assert_eq!(parse_ready_line("[    0.1] ironclad-agent ready version=1 uptime_ms=2"), None);
        assert_eq!(parse_ready_line("ironclad-agent ready version=1 uptime_ms=x"), None);
    }

    #[test]
    fn a_ready_line_with_a_forged_version_is_no_ready_line() {
        for version in ["\"0.1.0\"", "0.1.0\u{1b}[2J", &"9".repeat(65), "a=b", ""] {
            let line = format!("ironclad-agent ready version={version} uptime_ms=5");
            assert_eq!(parse_ready_line(&line), None, "{version:?}");
        }
        assert!(parse_ready_line("ironclad-agent ready version=1.2.3-rc.1+build.5 uptime_ms=5").is_some());
    }

    #[test]
    fn error_chains_are_escaped_and_cut() {
        let forged =
            std::io::Error::other(format!("denied\nlevel=info msg=\"forged\"{}", "x".repeat(100_000)));
        let text = error_chain(&forged);
        assert!(!text.contains('\n'));
        assert!(text.starts_with(r#"denied\nlevel=info msg=\"forged\""#), "{}", &text[..40]);
        assert!(text.len() < 4 * crate::guest_text::MAX_LEN + 64);
    }

    #[test]
    fn detects_vmx_or_svm_in_the_flags_line_only() {
        assert!(cpu_flags_show_virtualization("processor: 0\nflags\t\t: fpu vme vmx sse\n"));
        assert!(cpu_flags_show_virtualization("flags\t: fpu svm\n"));
        assert!(!cpu_flags_show_virtualization("flags\t: fpu vme sse\nmodel name: vmx-like\n"));
        assert!(!cpu_flags_show_virtualization("flags\t: fpu vmxnet\n"));
    }

    #[test]
    fn kvm_is_used_for_linux_only_with_hardware_virtualization() {
        let emulated = HostVirtualization { kvm_opens: true, hardware_virtualization: false };
        assert!(!emulated.can_boot_linux_on_kvm());
        assert!(emulated.explain().contains("no vmx/svm"));
        assert!(HostVirtualization { kvm_opens: true, hardware_virtualization: true }.can_boot_linux_on_kvm());
    }

    #[test]
    fn auto_resolves_by_the_host_and_explicit_kinds_stay() {
        let emulated = HostVirtualization { kvm_opens: true, hardware_virtualization: false };
        let hardware = HostVirtualization { kvm_opens: true, hardware_virtualization: true };
        assert_eq!(HypervisorKind::Auto.resolve(emulated), HypervisorKind::Qemu);
        assert_eq!(HypervisorKind::Auto.resolve(hardware), HypervisorKind::Ironclad);
        assert_eq!(HypervisorKind::Ironclad.resolve(emulated), HypervisorKind::Ironclad);
        assert_eq!(HypervisorKind::Qemu.resolve(hardware), HypervisorKind::Qemu);
    }

    #[test]
    fn command_line_appends_extra_parameters() {
        let mut config = VmConfig {
            kernel: "k".into(),
            initrd: "i".into(),
            opened: None,
            vcpus: 1,
            memory_mib: 128,
            extra_kernel_params: String::new(),
            block_devices: vec![],
            network: None,
            shared_dir: None,
            free_page_reporting: false,
        };
        assert_eq!(config.kernel_cmdline(), "console=ttyS0 reboot=k panic=-1 no_timer_check");
        config.extra_kernel_params = " quiet ".into();
        assert_eq!(config.kernel_cmdline(), "console=ttyS0 reboot=k panic=-1 no_timer_check quiet");
    }

    #[test]
    fn finds_executables_on_path_and_rejects_missing_ones() {
        assert!(find_executable(Path::new("sh")).is_some());
        assert!(find_executable(Path::new("definitely-not-a-binary-ironclad")).is_none());
        assert!(find_executable(Path::new("/nonexistent/qemu")).is_none());
    }
}
