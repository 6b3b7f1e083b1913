//! The end-to-end harness: boots the real guest (kernel + initrd built by `make guest`) through the
//! shim's own hypervisor backend and agent client, so tests exercise exactly what the shim runs.

pub mod cgroups;
pub mod containerd;
pub mod cri;
pub mod netns;
pub mod pool;

use std::path::{Path, PathBuf};
use std::time::Duration;

use ironclad_shim::agent_client::{self, AgentClient, AGENT_PORT};
use ironclad_shim::hypervisor::{
    self, Backend, GuestVm, HostVirtualization, HypervisorKind, Ready, VmConfig,
};
use ironclad_shim::paths::SandboxPaths;

/// Under TCG the guest boots in a few seconds; leave room for a loaded CI machine.
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);
pub const AGENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("guest artifact {path} is missing: run `make guest` first (or set IRONCLAD_GUEST_DIR)")]
    MissingArtifact { path: PathBuf },
    #[error("cannot create a run directory")]
    RunDir(#[source] std::io::Error),
    #[error("{0}")]
    BadHypervisor(String),
    #[error(transparent)]
    Hypervisor(#[from] hypervisor::Error),
    #[error(transparent)]
    Agent(#[from] agent_client::Error),
    #[error("the {got} backend was chosen where {expected} was expected ({why})")]
    UnexpectedBackend { expected: String, got: &'static str, why: &'static str },
}

/// Set where a test run knows which backend `auto` must pick (the nested tier: ironclad).
pub const EXPECT_BACKEND: &str = "IRONCLAD_EXPECT_BACKEND";

/// The backend `$IRONCLAD_EXPECT_BACKEND` names, if set.
pub fn expected_backend() -> Option<String> {
    std::env::var(EXPECT_BACKEND).ok().filter(|b| !b.is_empty())
}

/// The guest kernel and initrd the harness boots.
#[derive(Debug, Clone)]
pub struct GuestArtifacts {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl GuestArtifacts {
    /// `$IRONCLAD_GUEST_DIR`, else `target/guest` of this workspace, where `make guest` puts them.
    pub fn locate() -> Result<Self, Error> {
        let dir = std::env::var_os("IRONCLAD_GUEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest"));
        let artifacts = GuestArtifacts { kernel: dir.join("vmlinux"), initrd: dir.join("initrd.img") };
        for path in [&artifacts.kernel, &artifacts.initrd] {
            if !path.is_file() {
                return Err(Error::MissingArtifact { path: path.clone() });
            }
        }
        Ok(artifacts)
    }

    /// The initrd whose agent lies (tests/hostile-agent), which `make guest` writes beside the
    /// real one.
    pub fn hostile_initrd(&self) -> Result<PathBuf, Error> {
        let path = self.initrd.with_file_name("hostile-initrd.img");
        if !path.is_file() {
            return Err(Error::MissingArtifact { path });
        }
        Ok(path)
    }

    pub fn vm_config(&self) -> VmConfig {
        VmConfig {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            opened: None,
            vcpus: 1,
            memory_mib: 256,
            // For debugging, e.g. IRONCLAD_KERNEL_PARAMS=IRONCLAD_AGENT_LOG=debug.
            extra_kernel_params: std::env::var("IRONCLAD_KERNEL_PARAMS").unwrap_or_default(),
            block_devices: vec![],
            network: None,
            shared_dir: None,
            // As the shim's default config has it.
            free_page_reporting: true,
        }
    }
}

/// A booted guest whose agent answered: the VM, a connected client, and the ready line's timing.
pub struct BootedGuest {
    pub vm: GuestVm,
    /// "ironclad" or "qemu".
    pub backend: &'static str,
    pub agent: AgentClient,
    pub ready: Ready,
    pub paths: SandboxPaths,
    _run_root: tempfile::TempDir,
}

/// `$IRONCLAD_HYPERVISOR` (auto, ironclad or qemu), auto when unset.
pub fn hypervisor_from_env() -> Result<HypervisorKind, Error> {
    std::env::var("IRONCLAD_HYPERVISOR")
        .unwrap_or_else(|_| "auto".into())
        .parse()
        .map_err(Error::BadHypervisor)
}

/// Boots the guest in a private run directory, with the backend `$IRONCLAD_HYPERVISOR` names.
pub async fn boot_guest(config: &VmConfig) -> Result<BootedGuest, Error> {
    boot_guest_with(hypervisor_from_env()?, config).await
}

/// Boots the guest in a private run directory and connects to its agent.
pub async fn boot_guest_with(kind: HypervisorKind, config: &VmConfig) -> Result<BootedGuest, Error> {
    let run_root = tempfile::Builder::new().prefix("ironclad-e2e-").tempdir().map_err(Error::RunDir)?;
    let paths = SandboxPaths::new(run_root.path(), "sandbox");
    let host = HostVirtualization::detect();
    let backend = Backend::select(kind, host)?;
    if let Some(expected) = expected_backend().filter(|e| e != backend.name()) {
        return Err(Error::UnexpectedBackend { expected, got: backend.name(), why: host.explain() });
    }
    // The guest as the backend boots it; the jail is the shim's, tested through containerd.
    let mut vm = backend.start(config, paths.clone(), None).await?;
    let ready = vm.wait_ready(READY_TIMEOUT).await?;
    let agent = AgentClient::connect(vm.agent_socket(), AGENT_PORT, AGENT_CONNECT_TIMEOUT)
        .await?
        .with_output_chunk(vm.guest_message_limit());
    Ok(BootedGuest { vm, backend: backend.name(), agent, ready, paths, _run_root: run_root })
}

/// The OCI spec every busybox test container starts from: `args` with `PATH=/bin`, cwd `/`, no
/// terminal, on the bundle's `rootfs`, read-only or not; the rest is the spec's defaults.
pub fn busybox_spec(args: &[&str], readonly_root: bool) -> oci_spec::runtime::Spec {
    let mut spec = oci_spec::runtime::Spec::default();
    let mut process = spec.process().clone().unwrap_or_default();
    process.set_terminal(Some(false));
    process.set_args(Some(args.iter().map(|a| a.to_string()).collect()));
    process.set_env(Some(vec!["PATH=/bin".to_string()]));
    process.set_cwd("/".into());
    spec.set_process(Some(process));
    let mut root = oci_spec::runtime::Root::default();
    root.set_path("rootfs".into());
    root.set_readonly(Some(readonly_root));
    spec.set_root(Some(root));
    spec
}

/// Logs to stderr for tests and the demo, quiet unless RUST_LOG says otherwise.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
