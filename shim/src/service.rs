//! The containerd Task API (v2): containerd calls these methods, the shim answers from its task
//! table and turns them into calls on the agent inside the guest. `IroncladShim` is the process
//! containerd starts (`start`, `delete`); `TaskService` serves the Task API in it.
//!
//! Errors stay typed until they become a ttrpc status here, mapped by variant.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse, DeleteRequest,
    DeleteResponse, Empty, ExecProcessRequest, KillRequest, PauseRequest, PidsRequest, PidsResponse,
    ResizePtyRequest, ResumeRequest, ShutdownRequest, StartRequest, StartResponse, StateRequest,
    StateResponse, StatsRequest, StatsResponse, UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim::protos::types::task::{ProcessInfo, Status};
use containerd_shim::protos::{topics, ttrpc};
use containerd_shim::{Config, Flags, StartOpts, TtrpcContext};
use ironclad_protocol::agent::{CreateContainerRequest, Storage};
use ironclad_protocol::runtimeoptions::Options as RuntimeOptions;
use tokio::sync::Mutex;
use tracing::{error, info, warn};

use crate::agent_client::{self, AgentClient};
use crate::config::{self, ShimConfig, DEFAULT_CONFIG_PATH};
use crate::events::{self, Events};
use crate::hypervisor::{error_chain, Backend, BlockDevice, HostVirtualization, OpenedGuest, VmConfig};
use crate::io::{self as stdio};
use crate::jail::{self, Jail};
use crate::metrics;
use crate::pool;
use crate::process::{Exit, Process, StdioUris};
use crate::resources::network::{self, Attachment, InterfaceConfig, Requested};
use crate::resources::pinned;
use crate::resources::rootfs::{self, MountSpec, ROOTFS_SERIAL};
use crate::resources::share_fs::{self, ShareFs, GUEST_SHARE_DIR, SHARE_TAG};
use crate::resources::volumes::{self, Volume, GUEST_POD_SHM, POD_SHM_OPTIONS};
use crate::sandbox::{self, clean_up_task_dir, Held, Sandbox};
use crate::spec::{self, PodRole};
use crate::task::{self, Container, TaskTable};
use crate::timeline::{Step, Timeline};

/// The runtime name containerd knows this shim by.
pub const RUNTIME_ID: &str = "io.containerd.ironclad.v2";
pub use crate::sandbox::VM_GONE_EXIT_STATUS;
const RUNTIME_OPTIONS_TYPE: &str = "runtimeoptions.v1.Options";
/// Names the task directory in the bundle, for `delete` after a crash whatever config was used.
const TASK_DIR_FILE: &str = "ironclad-task-dir";
/// Where the container's disk is mounted inside the guest.
const GUEST_ROOTFS_DIR: &str = "/run/ironclad/rootfs";
/// How long the guest gets to answer a signal request.
const SIGNAL_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the guest gets to report the exit of a process it was told to SIGKILL; after that the
/// host ends it: the whole VM for the container's init process, the process's record for an exec.
pub const KILL_GRACE: Duration = Duration::from_secs(5);
/// How long the output of an exited process may still flow before its exit is reported.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);
/// How long RemoveContainer may take at Delete before the VM is stopped regardless.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(15);
const SIGKILL: u32 = 9;

type TtrpcResult<T> = ttrpc::Result<T>;

/// What can go wrong in a Task API call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Task(#[from] task::Error),
    #[error(transparent)]
    Spec(#[from] spec::Error),
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error("cannot boot the sandbox's VM")]
    Pinned(#[from] pinned::Error),
    #[error("rootfs")]
    Rootfs(#[from] rootfs::Error),
    #[error("network")]
    Network(#[from] network::Error),
    #[error("volume")]
    Volumes(#[from] volumes::Error),
    #[error("shared directory")]
    Share(#[from] share_fs::Error),
    #[error(
        "the pod asks for hostNetwork, which ironclad cannot give: a VM cannot share the host's \
         network interfaces (run the pod with its own network namespace)"
    )]
    HostNetwork,
    #[error("cannot add container {container} to pod {sandbox}: its VM is gone")]
    SandboxGone { container: String, sandbox: String },
    #[error("cannot add container {container} to pod {sandbox}: its VM has no shared directory")]
    PodWithoutShare { container: String, sandbox: String },
    #[error("cannot jail the sandbox's helpers")]
    Jail(#[from] jail::Error),
    #[error("cannot start the sandbox VM")]
    Sandbox(#[from] sandbox::Error),
    #[error(transparent)]
    Agent(#[from] agent_client::Error),
    #[error(transparent)]
    Stdio(#[from] stdio::Error),
    #[error("cannot decode {RUNTIME_OPTIONS_TYPE}")]
    RuntimeOptions(#[source] containerd_shim::protos::protobuf::Error),
    #[error(
        "runtime options of type {0:?} are not ironclad's ({RUNTIME_OPTIONS_TYPE}: ConfigPath or ConfigBody)"
    )]
    RuntimeOptionsType(String),
    #[error("restoring a task from a checkpoint is not supported")]
    CheckpointRestore,
    #[error("checkpointing a task of a microVM is not supported by ironclad")]
    Checkpoint,
    #[error("{path} exists: task {id} is already running")]
    TaskDirExists { path: PathBuf, id: String },
    #[error("cannot {action} {path}")]
    TaskDir {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("process {0:?} was already started")]
    AlreadyStarted(String),
    #[error("process {0:?} already finished")]
    Finished(String),
    #[error("{0} is still running: kill it first")]
    StillRunning(String),
    #[error("task {0} is not running")]
    NotRunning(String),
    #[error("exec {0:?} has no process spec")]
    NoExecSpec(String),
    #[error("update without resources")]
    NoResources,
    #[error("resources are not JSON (LinuxResources)")]
    ResourcesNotJson,
    #[error("cannot encode the metrics")]
    Metrics(#[source] containerd_shim::protos::protobuf::Error),
    #[error("a preparation step stopped unexpectedly")]
    Join(#[source] tokio::task::JoinError),
    #[error("cannot take charge of the VM from ironclad-pool")]
    Pool(#[from] pool::Error),
    #[error("cannot identify the opened guest kernel or initrd")]
    Identity(#[source] std::io::Error),
}

/// A VM from ironclad-pool for this sandbox, or None (logged with the reason). The guest files are
/// opened, not hashed: the pool hashed these very files (by identity: device, inode, size and
/// change time, which any write moves) against the same pins, which the shape carries.
async fn take_warm_vm(
    config: &ShimConfig,
    backend: &Backend,
    settings: &config::SandboxSettings,
    extra_kernel_params: &str,
    task_dir: &Path,
) -> Result<Option<pool::Taken>, Error> {
    let Some(socket) = config.pool.socket() else {
        info!("warm start: off ([pool] socket is empty in {}); booting cold", config.source.display());
        return Ok(None);
    };
    let opened = OpenedGuest {
        kernel: pinned::open_verified("kernel", &config.kernel, None)?,
        initrd: pinned::open_verified("initrd", &config.initrd, None)?,
    };
    let pins = pool::Pins { kernel: config.kernel_sha256.clone(), initrd: config.initrd_sha256.clone() };
    let shape = pool::Shape::of(backend.name(), settings, &opened, extra_kernel_params, pins)
        .map_err(Error::Identity)?;
    Ok(pool::take_or_say_why(socket, shape, task_dir).await)
}

/// Where the container's rootfs reaches the guest from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum GuestRootfs {
    /// The image disk with serial [`ROOTFS_SERIAL`], booted with a cold VM.
    Disk,
    /// The snapshot mounted into the shared directory: this guest path (a pooled VM, which was
    /// booted before there was a container).
    Shared(PathBuf),
}

/// The task's one rootfs mount, which a rootfs through the shared directory must be.
fn single_rootfs_mount(
    req: &CreateTaskRequest,
) -> Result<&containerd_shim::protos::types::mount::Mount, Error> {
    match req.rootfs.as_slice() {
        [one] => Ok(one),
        [] => Err(rootfs::Error::NoMounts.into()),
        more => Err(rootfs::Error::TooManyMounts(more.len()).into()),
    }
}

/// Why a sandbox cannot start on a pooled VM; None when it can.
fn warm_start_refusal<T>(network: &Requested, rootfs: &[T]) -> Option<String> {
    match network {
        Requested::New => {}
        Requested::HostNetwork => return Some("the spec keeps the host's network namespace".into()),
        Requested::Path(path) => {
            return Some(format!(
                "the sandbox's network namespace is {}, and a pooled VM's NIC is in one of its own",
                path.display()
            ))
        }
    }
    (rootfs.len() != 1).then(|| {
        format!("a pooled VM takes a rootfs of one snapshot mount, and this one has {}", rootfs.len())
    })
}

/// The bind mount that keeps a network namespace the shim made, in the task directory.
const NEW_NETNS_FILE: &str = "net";

/// The sandbox's network: the spec's namespace, or a new one made in the task directory, with a
/// tap for the guest NIC (see `resources::network`). The namespace is recorded in the task
/// directory first, so that clean-up after any failure (or a crash) removes what was made there.
async fn attach_network(
    requested: &Requested,
    task_dir: &Path,
    id: &str,
    config: &ShimConfig,
    owner: Option<u32>,
) -> Result<Option<Arc<Attachment>>, Error> {
    let netns = match requested {
        Requested::HostNetwork => {
            info!("the spec keeps the host's network namespace, which a VM cannot share: no NIC");
            return Ok(None);
        }
        Requested::Path(path) => path.clone(),
        Requested::New => task_dir.join(NEW_NETNS_FILE),
    };
    let record = task_dir.join(sandbox::NETNS_FILE);
    std::fs::write(&record, netns.as_os_str().as_encoded_bytes()).map_err(|source| Error::TaskDir {
        action: "write",
        path: record,
        source,
    })?;
    if *requested == Requested::New {
        network::create_netns(&netns)?;
    }
    let attachment =
        Attachment::prepare(&netns, network::mac_for(id), config.denied_destinations.clone(), owner).await?;
    info!("network: {} in {} for the guest's NICs", attachment.tap_names().join(", "), netns.display());
    Ok(Some(Arc::new(attachment)))
}

/// Configures the guest NIC once the CNI interface it stands in for is there.
async fn configure_guest_network_if_ready(
    agent: &AgentClient,
    network: Option<&Attachment>,
) -> Result<(), Error> {
    let Some(network) = network else { return Ok(()) };
    for (index, interface) in network.take_unconfigured().await?.iter().enumerate() {
        let nic = network::guest_nic(index);
        info!("network: the guest's {nic} stands in for {}", interface.name);
        configure_guest_network(agent, &nic, interface).await?;
    }
    Ok(())
}

/// Gives guest NIC `nic` the CNI interface's MAC, MTU, addresses and routes.
async fn configure_guest_network(
    agent: &AgentClient,
    nic: &str,
    interface_config: &InterfaceConfig,
) -> Result<(), Error> {
    let mut interface = ironclad_protocol::agent::Interface::new();
    interface.name = nic.into();
    interface.hw_addr = network::format_mac(&interface_config.mac);
    interface.mtu = interface_config.mtu;
    interface.up = true;
    interface.addresses = interface_config
        .addresses
        .iter()
        .map(|(ip, prefix)| {
            let mut address = ironclad_protocol::agent::IPAddress::new();
            address.address = ip.to_string();
            address.prefix_len = u32::from(*prefix);
            address
        })
        .collect();
    agent.update_interface(interface).await?;
    let routes = interface_config
        .routes
        .iter()
        .map(|route| {
            let mut r = ironclad_protocol::agent::Route::new();
            r.destination = route
                .destination
                .map(|(ip, prefix)| format!("{ip}/{prefix}"))
                .unwrap_or_else(|| "default".into());
            r.gateway = route.gateway.map(|g| g.to_string()).unwrap_or_default();
            r.device = nic.into();
            r
        })
        .collect::<Vec<_>>();
    if !routes.is_empty() {
        agent.update_routes(routes).await?;
    }
    let neighbors: Vec<_> = interface_config
        .neighbors
        .iter()
        .map(|(ip, mac)| {
            let mut neighbor = ironclad_protocol::agent::ARPNeighbor::new();
            neighbor.ip_address = ip.to_string();
            neighbor.hw_addr = network::format_mac(mac);
            neighbor.device = nic.into();
            neighbor
        })
        .collect();
    if !neighbors.is_empty() {
        agent.add_arp_neighbors(neighbors).await?;
    }
    Ok(())
}

fn code_of(err: &Error) -> ttrpc::Code {
    use ttrpc::Code;
    match err {
        Error::Task(task::Error::NoTask(_) | task::Error::NoProcess { .. }) => Code::NOT_FOUND,
        Error::Task(task::Error::ExecExists(_)) => Code::ALREADY_EXISTS,
        Error::Task(task::Error::ShimBusy(_) | task::Error::NoSandbox(_)) => Code::FAILED_PRECONDITION,
        Error::Spec(spec::Error::Encode(_)) => Code::INTERNAL,
        Error::Spec(spec::Error::Read { .. } | spec::Error::ExecProcess(_)) => Code::INVALID_ARGUMENT,
        Error::Volumes(volumes::Error::NotFileOrDirectory { .. } | volumes::Error::BindSource { .. }) => {
            Code::INVALID_ARGUMENT
        }
        Error::Volumes(volumes::Error::NoSharedDirectory { .. }) => Code::FAILED_PRECONDITION,
        Error::Volumes(volumes::Error::Share { .. }) | Error::Share(_) => Code::INTERNAL,
        Error::HostNetwork => Code::UNIMPLEMENTED,
        Error::Pinned(pinned::Error::Changed { .. } | pinned::Error::Read { .. }) => {
            Code::FAILED_PRECONDITION
        }
        Error::PodWithoutShare { .. } => Code::FAILED_PRECONDITION,
        Error::SandboxGone { .. } => Code::FAILED_PRECONDITION,
        Error::Config(_) | Error::RuntimeOptions(_) | Error::RuntimeOptionsType(_) | Error::Stdio(_) => {
            Code::INVALID_ARGUMENT
        }
        Error::Rootfs(
            rootfs::Error::NoMounts
            | rootfs::Error::UnsupportedMount { .. }
            | rootfs::Error::TooManyMounts(_)
            | rootfs::Error::BadOverlay(_),
        ) => Code::INVALID_ARGUMENT,
        Error::Rootfs(
            rootfs::Error::Io { .. } | rootfs::Error::Mount { .. } | rootfs::Error::Mkfs { .. },
        ) => Code::INTERNAL,
        Error::Network(
            network::Error::EnterNetns { .. }
            | network::Error::TooManyInterfaces { .. }
            | network::Error::NoTun(_)
            | network::Error::NoMac { .. },
        ) => Code::FAILED_PRECONDITION,
        Error::Network(
            network::Error::CreateNetns { .. }
            | network::Error::Socket { .. }
            | network::Error::Netlink { .. }
            | network::Error::Tap { .. }
            | network::Error::Thread,
        ) => Code::INTERNAL,
        Error::Jail(
            jail::Error::NoJailer { .. }
            | jail::Error::JailerMissing { .. }
            | jail::Error::NoFreeUid { .. }
            | jail::Error::Cgroup { .. },
        ) => Code::FAILED_PRECONDITION,
        Error::Jail(
            jail::Error::UidLock { .. }
            | jail::Error::Admit { .. }
            | jail::Error::Go { .. }
            | jail::Error::Chown { .. }
            | jail::Error::Record { .. },
        ) => Code::INTERNAL,
        Error::Sandbox(_) => Code::FAILED_PRECONDITION,
        Error::Pool(_) | Error::Identity(_) => Code::INTERNAL,
        // The agent's own code (INVALID_ARGUMENT, NOT_FOUND...); a transport error means the VM is
        // unreachable.
        Error::Agent(agent_client::Error::Rpc { source: ttrpc::Error::RpcStatus(status), .. }) => {
            status.code()
        }
        Error::Agent(_) => Code::UNAVAILABLE,
        Error::CheckpointRestore | Error::Checkpoint => Code::UNIMPLEMENTED,
        Error::TaskDirExists { .. } => Code::ALREADY_EXISTS,
        Error::AlreadyStarted(_) | Error::StillRunning(_) | Error::NotRunning(_) => Code::FAILED_PRECONDITION,
        Error::Finished(_) => Code::NOT_FOUND,
        Error::NoExecSpec(_) | Error::NoResources | Error::ResourcesNotJson => Code::INVALID_ARGUMENT,
        Error::TaskDir { .. } | Error::Metrics(_) | Error::Join(_) => Code::INTERNAL,
    }
}

impl From<Error> for ttrpc::Error {
    fn from(err: Error) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(code_of(&err), error_chain(&err)))
    }
}

fn now() -> MessageField<Timestamp> {
    MessageField::some(Timestamp::now())
}

/// The shim process: `start` and `delete` subcommands, and the task service it serves.
pub struct IroncladShim {
    exit: Arc<ExitSignal>,
    namespace: String,
    id: String,
    /// `-bundle`, which containerd passes to `delete` (whose working directory may be elsewhere).
    bundle: PathBuf,
    /// `-socket`, the address this shim serves on (`unix:///run/containerd/s/…`).
    socket: String,
}

/// Removes the shim's socket file once the shim is told to go. containerd-shim removes it only
/// after its server has shut down, reading the address back from the bundle directory, which
/// containerd may already have removed by then (seen under load: the socket outlived the shim).
/// Only a socket is removed, never another kind of file at that path.
fn remove_socket_file(address: &str) {
    use std::os::unix::fs::FileTypeExt;
    let path = Path::new(address.strip_prefix("unix://").unwrap_or(address));
    if std::fs::symlink_metadata(path).is_ok_and(|meta| meta.file_type().is_socket()) {
        if let Err(err) = std::fs::remove_file(path) {
            warn!("cannot remove the shim socket {}: {err}", path.display());
        }
    }
}

#[async_trait]
impl Shim for IroncladShim {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, config: &mut Config) -> Self {
        // Serving (neither `start` nor `delete`): the log gets the task's id on every line. Should
        // that fail, containerd-shim sets up its own logger and reports what failed.
        if !matches!(args.action.as_str(), "start" | "delete") && !config.no_setup_logger {
            let ours = crate::logging::init(args.debug, &config.default_log_level, &args.namespace, &args.id);
            config.no_setup_logger = ours.is_ok();
        }
        IroncladShim {
            exit: Arc::new(ExitSignal::default()),
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            bundle: PathBuf::from(&args.bundle),
            socket: args.socket.clone(),
        }
    }

    /// One shim (and so one VM) per pod, else per task: a pod's container (by the CRI
    /// annotations in its bundle, the working directory) is served by its sandbox's shim.
    async fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        let grouping = match spec::read(Path::new(".")) {
            Ok(spec) => spec::shim_grouping(&spec, &opts.id),
            // Create reads it again and reports what is wrong with it.
            Err(_) => opts.id.clone(),
        };
        let address = spawn(opts, &grouping, Vec::new()).await?;
        containerd_shim::asynchronous::util::write_str_to_file("address", &address).await?;
        Ok(address)
    }

    /// containerd's clean-up after a shim that is gone: stops whatever the task left running.
    /// containerd also calls it when it lets go of one task of a pod whose shim still serves the
    /// others: that shim answers on its socket and keeps charge of everything.
    async fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        if let Some(socket) = shim_socket(&self.bundle.join("address")) {
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                info!("delete {}: its shim still serves {}, which keeps charge", self.id, socket.display());
                return Ok(DeleteResponse { exit_status: 137, exited_at: now(), ..Default::default() });
            }
        }
        // The bundle is `-bundle`, else the working directory.
        let recorded = std::fs::read_to_string(self.bundle.join(TASK_DIR_FILE)).ok().map(PathBuf::from);
        let dir = recorded.unwrap_or_else(|| {
            let config = ShimConfig::load(Path::new(DEFAULT_CONFIG_PATH)).unwrap_or_default();
            task_dir(&config, &self.namespace, &self.id)
        });
        clean_up_task_dir(&dir);
        remove_dead_shim_socket(&self.bundle.join("address"));
        Ok(DeleteResponse { exit_status: 137, exited_at: now(), ..Default::default() })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
        if !self.socket.is_empty() {
            remove_socket_file(&self.socket);
        }
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        let (events, queue) = Events::channel();
        tokio::spawn(events::forward(queue, publisher, self.namespace.clone()));
        TaskService {
            namespace: self.namespace.clone(),
            exit: self.exit.clone(),
            events,
            tasks: Arc::new(TaskTable::default()),
            creating: Arc::new(Mutex::new(())),
        }
    }
}

/// The socket the bundle's `address` file names.
fn shim_socket(address_file: &Path) -> Option<PathBuf> {
    let address = std::fs::read_to_string(address_file).ok()?;
    let address = address.trim();
    Some(PathBuf::from(address.strip_prefix("unix://").unwrap_or(address)))
}

/// The socket a crashed shim served on (named by the bundle's `address` file), which it could not
/// remove itself. Only a socket is removed, whatever the file says.
fn remove_dead_shim_socket(address_file: &Path) {
    use std::os::unix::fs::FileTypeExt;
    let Some(path) = shim_socket(address_file) else { return };
    if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

/// `<run root>/<namespace>/<task dir name>`: everything the shim makes for a task.
pub fn task_dir(config: &ShimConfig, namespace: &str, id: &str) -> PathBuf {
    config.run_root.join(namespace).join(crate::paths::task_dir_name(id))
}

/// `<log root>/<namespace>/<task id>.console.log`: the guest's console, on disk rather than on the
/// run root's tmpfs, capped and rotated (hypervisor::console).
pub fn console_log_path(config: &ShimConfig, namespace: &str, id: &str) -> PathBuf {
    config.log_root.join(namespace).join(format!("{id}.console.log"))
}

/// Creates `dir` (and its parents) readable by root alone.
fn create_private_dir(dir: &Path) -> Result<(), Error> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|source| Error::TaskDir {
        action: "create",
        path: dir.to_path_buf(),
        source,
    })
}

#[derive(Clone)]
pub struct TaskService {
    namespace: String,
    exit: Arc<ExitSignal>,
    events: Events,
    tasks: Arc<TaskTable>,
    /// One Create at a time: the table's room is checked and filled under it.
    creating: Arc<Mutex<()>>,
}

impl TaskService {
    /// The runtime options' config (a file, or a TOML body inline), else the default file.
    fn load_config(options: &MessageField<Any>) -> Result<ShimConfig, Error> {
        let Some(any) = options.as_ref().filter(|a| !a.type_url.is_empty()) else {
            return Ok(ShimConfig::load(Path::new(DEFAULT_CONFIG_PATH))?);
        };
        if !any.type_url.ends_with(RUNTIME_OPTIONS_TYPE) {
            return Err(Error::RuntimeOptionsType(any.type_url.clone()));
        }
        let options = RuntimeOptions::parse_from_bytes(&any.value).map_err(Error::RuntimeOptions)?;
        if !options.config_path.is_empty() {
            Ok(ShimConfig::load(Path::new(&options.config_path))?)
        } else if !options.config_body.is_empty() {
            Ok(ShimConfig::parse(&options.config_body, Path::new("(runtime options config_body)"))?)
        } else {
            Ok(ShimConfig::load(Path::new(DEFAULT_CONFIG_PATH))?)
        }
    }

    /// Reads everything Create needs, makes the task directory, boots the VM and creates the
    /// container in it. A failure at any step leaves nothing behind.
    async fn create_container(
        &self,
        req: &CreateTaskRequest,
        spec: oci_spec::runtime::Spec,
        role: PodRole,
    ) -> Result<Arc<Container>, Error> {
        let timeline = Timeline::begun();
        let config = Self::load_config(&req.options)?;
        let settings = config.sandbox_settings(&spec::annotations(&spec))?;
        let volumes = volumes::classify(&spec, &role)?;
        let mounts: Vec<MountSpec<'_>> = req
            .rootfs
            .iter()
            .map(|m| MountSpec { kind: &m.type_, source: &m.source, options: &m.options })
            .collect();
        let snapshot = rootfs::parse_snapshot(&mounts)?;
        let requested_network = network::requested(&spec);
        if role == PodRole::Sandbox && requested_network == Requested::HostNetwork {
            return Err(Error::HostNetwork);
        }
        let mut backend = Backend::select(config.hypervisor, HostVirtualization::detect())
            .map_err(|err| Error::Sandbox(err.into()))?;
        if let Backend::Qemu(qemu) = &mut backend {
            qemu.sandbox = config.qemu_sandbox;
        }
        let refusal = warm_start_refusal(&requested_network, &req.rootfs);
        // A pod's sandbox shares a directory for the containers that join it later.
        let with_share = role == PodRole::Sandbox || volumes::need_share(&volumes);
        let extra_kernel_params = config.kernel_params_for(&settings);

        let dir = task_dir(&config, &self.namespace, &req.id);
        if dir.exists() {
            return Err(Error::TaskDirExists { path: dir, id: req.id.clone() });
        }
        create_private_dir(&dir)?;
        let created = async {
            record_task_dir(&req.bundle, &dir)?;
            let console_log = console_log_path(&config, &self.namespace, &req.id);
            if let Some(parent) = console_log.parent() {
                create_private_dir(parent)?;
            }
            // Taken only now: from here on, whatever fails removes the task directory, and with
            // it the VM once the sandbox has recorded it.
            let warm = match refusal {
                Some(reason) => {
                    info!("warm start: {reason}; booting cold");
                    None
                }
                None => take_warm_vm(&config, &backend, &settings, &extra_kernel_params, &dir).await?,
            };
            let (sandbox, network, rootfs) = match warm {
                Some(taken) => {
                    Self::adopt_warm_vm(taken, backend.name(), req, &config, &dir, console_log, timeline)
                        .await?
                }
                None => {
                    // Checked before the monitor starts, through the descriptors it inherits.
                    let opened = OpenedGuest {
                        kernel: pinned::open_verified(
                            "kernel",
                            &config.kernel,
                            config.kernel_sha256.as_deref(),
                        )?,
                        initrd: pinned::open_verified(
                            "initrd",
                            &config.initrd,
                            config.initrd_sha256.as_deref(),
                        )?,
                    };
                    let jail = Jail::open(&config, &self.namespace, &dir, settings.memory_mib)?;
                    let image = prepare_rootfs(snapshot, &config, &dir).await?;
                    let owner = jail.as_ref().map(Jail::uid);
                    let network = attach_network(&requested_network, &dir, &req.id, &config, owner).await?;
                    let share = if with_share { Some(ShareFs::prepare(&dir)?) } else { None };
                    let vm_config = VmConfig {
                        kernel: config.kernel.clone(),
                        initrd: config.initrd.clone(),
                        opened: Some(opened),
                        vcpus: settings.vcpus,
                        memory_mib: settings.memory_mib,
                        extra_kernel_params,
                        block_devices: vec![BlockDevice {
                            path: image,
                            read_only: true,
                            serial: ROOTFS_SERIAL.into(),
                        }],
                        network: network.as_ref().map(|n| n.vm_network()),
                        shared_dir: share.as_ref().map(|s| s.dir().to_path_buf()),
                        free_page_reporting: settings.free_page_reporting,
                    };
                    let sandbox = Sandbox::boot(
                        &backend,
                        &config,
                        &vm_config,
                        &dir,
                        console_log,
                        Held { share, jail, timeline },
                    )
                    .await?;
                    (Arc::new(sandbox), network, GuestRootfs::Disk)
                }
            };
            let init = Process::new("", stdio_uris(req), String::new());
            let container =
                Arc::new(Container::new(&req.id, &req.bundle, sandbox, init).with_network(network));
            if let Err(err) = self.create_in_guest(&container, spec, &volumes, rootfs).await {
                container.sandbox.teardown().await;
                return Err(err);
            }
            container.sandbox.timeline.mark(Step::ContainerCreated);
            Ok(container)
        }
        .await;
        if created.is_err() {
            sandbox::clean_up_task_dir_off_the_runtime(&dir).await;
        }
        created
    }

    /// Makes a VM taken from ironclad-pool the sandbox's: it is recorded in the task directory
    /// (so that it goes with the sandbox whatever fails next), its agent connected, its network
    /// the one the pool made for it, and the container's rootfs mounted into its shared directory.
    async fn adopt_warm_vm(
        taken: pool::Taken,
        backend: &'static str,
        req: &CreateTaskRequest,
        config: &ShimConfig,
        dir: &Path,
        console_log: PathBuf,
        timeline: Timeline,
    ) -> Result<(Arc<Sandbox>, Option<Arc<Attachment>>, GuestRootfs), Error> {
        let (offer, adopted) = taken.into_adopted(&config.run_root)?;
        info!(
            "warm start: took {} from ironclad-pool (agent ready {} ms after its monitor started)",
            offer.id, offer.ready_after_ms
        );
        let share = ShareFs::of_task_dir(&offer.dir);
        let held = Held { share: Some(share.clone()), jail: None, timeline };
        let sandbox = Sandbox::adopt(adopted, &offer.dir, backend, dir, console_log, held).await?;
        let sandbox = Arc::new(sandbox);
        let network = Attachment::waiting(
            &offer.netns,
            &offer.tap,
            offer.guest_mac,
            config.denied_destinations.clone(),
        );
        let rootfs = single_rootfs_mount(req).and_then(|one| {
            Ok(share.mount_rootfs(&req.id, &one.type_, Path::new(&one.source), &one.options)?)
        });
        match rootfs {
            Ok(guest_path) => Ok((sandbox, Some(Arc::new(network)), GuestRootfs::Shared(guest_path))),
            Err(err) => {
                sandbox.teardown().await;
                Err(err)
            }
        }
    }

    /// Creates a pod's container in the VM its sandbox container booted: its rootfs and host
    /// paths are mounted into the sandbox's shared directory, and it joins the sandbox's
    /// namespaces in the guest. A failure leaves nothing of it behind.
    async fn create_in_pod(
        &self,
        req: &CreateTaskRequest,
        mut spec: oci_spec::runtime::Spec,
        pod: &Container,
    ) -> Result<Arc<Container>, Error> {
        let sandbox = pod.sandbox.clone();
        if sandbox.is_gone() {
            return Err(Error::SandboxGone { container: req.id.clone(), sandbox: pod.id.clone() });
        }
        let Some(share) = sandbox.share.clone() else {
            return Err(Error::PodWithoutShare { container: req.id.clone(), sandbox: pod.id.clone() });
        };
        let role = PodRole::Container { sandbox_id: pod.id.clone() };
        let volumes = volumes::classify(&spec, &role)?;
        let rootfs = single_rootfs_mount(req)?;
        let created = async {
            record_task_dir(&req.bundle, &share.container_dir(&req.id)?)?;
            let guest_rootfs =
                share.mount_rootfs(&req.id, &rootfs.type_, Path::new(&rootfs.source), &rootfs.options)?;
            volumes::attach(&mut spec, &volumes, Some(&share), &req.id)?;
            let mut request = CreateContainerRequest::new();
            request.container_id = req.id.clone();
            request.oci_spec_json = spec::to_json(&spec)?;
            request.rootfs = guest_rootfs.display().to_string();
            request.sandbox_container = pod.id.clone();
            sandbox.agent.create_container(&request).await?;
            let init = Process::new("", stdio_uris(req), String::new());
            let container =
                Arc::new(Container::new(&req.id, &req.bundle, sandbox.clone(), init).joining_pod());
            let init = container.init()?;
            if let Err(err) = self.connect_stdio(&container, &init).await {
                let _ = sandbox.agent.remove_container(&req.id).await;
                return Err(err);
            }
            Ok(container)
        }
        .await;
        if created.is_err() {
            share.release(&req.id);
        }
        created
    }

    /// Sets up the guest for the container and creates it there; opens its stdio.
    async fn create_in_guest(
        &self,
        container: &Arc<Container>,
        mut spec: oci_spec::runtime::Spec,
        volumes: &[Volume],
        rootfs: GuestRootfs,
    ) -> Result<(), Error> {
        let agent = &container.sandbox.agent;
        if let Err(err) = agent.sync_clock().await {
            warn!("cannot set the guest clock: {}", error_chain(&err));
        }
        configure_guest_network_if_ready(agent, container.network.as_deref()).await?;
        // The sandbox's network namespace is the guest's own, where the NIC standing in for its
        // CNI interface is: the container shares it (a host path would mean nothing there).
        network::share_guest_network(&mut spec);
        let hostname = spec::guest_hostname(&spec, &container.id);
        agent.create_sandbox(&container.id, &hostname).await?;
        let share = container.sandbox.share.as_ref();
        volumes::attach(&mut spec, volumes, share, &container.id)?;
        let (guest_rootfs, mut storages, rootfs_overlay) = match rootfs {
            GuestRootfs::Disk => {
                let guest_rootfs = format!("{GUEST_ROOTFS_DIR}/{}", container.id);
                let disk = Storage {
                    serial: ROOTFS_SERIAL.into(),
                    fstype: "ext4".into(),
                    mount_point: guest_rootfs.clone(),
                    read_only: true,
                    ..Default::default()
                };
                // The image is read-only and shared by every container of it: the agent puts a
                // writable layer over it.
                (guest_rootfs, vec![disk], true)
            }
            // containerd's snapshot is the container's own, writable.
            GuestRootfs::Shared(path) => (path.display().to_string(), vec![], false),
        };
        if share.is_some() {
            // Mounted first: the container's binds come from it. It stays for as long as this
            // container, which is the pod's last.
            storages.insert(
                0,
                Storage {
                    fstype: "virtiofs".into(),
                    source: SHARE_TAG.into(),
                    mount_point: GUEST_SHARE_DIR.into(),
                    ..Default::default()
                },
            );
        }
        if volumes::has_pod_shm(volumes) {
            storages.push(Storage {
                fstype: "tmpfs".into(),
                options: vec![POD_SHM_OPTIONS.into()],
                mount_point: GUEST_POD_SHM.into(),
                ..Default::default()
            });
        }
        let mut request = CreateContainerRequest::new();
        request.container_id = container.id.clone();
        request.oci_spec_json = spec::to_json(&spec)?;
        request.rootfs = guest_rootfs;
        request.storages = storages;
        request.rootfs_overlay = rootfs_overlay;
        agent.create_container(&request).await?;
        let init = container.init()?;
        self.connect_stdio(container, &init).await
    }

    /// Opens containerd's stdio for the process and starts the relays.
    async fn connect_stdio(&self, container: &Container, process: &Process) -> Result<(), Error> {
        let io = container.io(&process.exec_id);
        let mut outputs = Vec::new();
        if let stdio::Endpoint::Binary { path, args } =
            stdio::parse_endpoint("stdout", &process.stdio.stdout)?
        {
            // One logging binary takes both streams, as with containerd's own shims.
            let logger = stdio::start_binary_logger(&path, &args, &container.id, &self.namespace).await?;
            outputs.push(tokio::spawn(stdio::relay_output(io.clone(), false, logger.stdout)));
            outputs.push(tokio::spawn(stdio::relay_output(io.clone(), true, logger.stderr)));
            let mut child = logger.child;
            // It exits once both streams are closed; waiting for it reaps it.
            tokio::spawn(async move {
                let _ = child.wait().await;
            });
        } else {
            if let Some(sink) = stdio::open_output("stdout", &process.stdio.stdout).await? {
                outputs.push(tokio::spawn(stdio::relay_output(io.clone(), false, sink)));
            }
            if !process.stdio.terminal {
                if let Some(sink) = stdio::open_output("stderr", &process.stdio.stderr).await? {
                    outputs.push(tokio::spawn(stdio::relay_output(io.clone(), true, sink)));
                }
            }
        }
        if let Some(source) = stdio::open_input(&process.stdio.stdin)? {
            tokio::spawn(stdio::relay_input(io, source, process.close_stdin.clone()));
        }
        process.add_outputs(outputs).await;
        Ok(())
    }

    /// Waits for the process to exit (or its VM to go), lets its output drain for a bounded time,
    /// then records the exit and tells containerd. An exit the host recorded first (a SIGKILL the
    /// guest ignored) stands.
    fn watch_exit(&self, container: Arc<Container>, process: Arc<Process>) {
        let events = self.events.clone();
        tokio::spawn(async move {
            let sandbox = &container.sandbox;
            let mut gone = sandbox.gone();
            let status = tokio::select! {
                waited = sandbox.agent.wait_process(&container.id, &process.exec_id) => match waited {
                    Ok(code) => u32::try_from(code).unwrap_or(VM_GONE_EXIT_STATUS),
                    Err(err) => {
                        error!("waiting for {}/{}: {}", container.id, process.exec_id, error_chain(&err));
                        sandbox.gone_exit_status()
                    }
                },
                _ = gone.wait_for(|gone| *gone) => {
                    error!("task {} process {:?} ends: its VM is gone", container.id, process.exec_id);
                    sandbox.gone_exit_status()
                }
                _ = process.wait() => return,
            };
            if process.is_init() && container.owns_vm {
                sandbox.timeline.mark(Step::Exited);
            }
            process.drain_outputs(DRAIN_DEADLINE).await;
            // The OOM event travels apart from the exit (the agent's memory.events watch): a
            // container SIGKILLed by the OOM killer is said to be so before its exit, which is
            // when CRI decides between OOMKilled and Error.
            if status == sandbox::KILLED_EXIT_STATUS && process.is_init() && oom_killed(&container).await {
                let event = TaskOOM { container_id: container.id.clone(), ..Default::default() };
                events.send(topics::TASK_OOM_EVENT_TOPIC, Box::new(event));
            }
            if let Some(exit) = process.record_exit(status) {
                publish_exit(&events, &container, &process, &exit);
            }
        });
    }

    /// After a SIGKILL, the host makes sure: a process whose exit the guest has not reported within
    /// KILL_GRACE is ended by the host, the init process by stopping the whole VM.
    fn enforce_kill(&self, container: Arc<Container>, process: Arc<Process>) {
        let events = self.events.clone();
        tokio::spawn(async move {
            if tokio::time::timeout(KILL_GRACE, process.wait()).await.is_ok() {
                return;
            }
            if process.is_init() && container.owns_vm {
                container.sandbox.kill().await;
            } else if let Some(exit) = process.record_exit(sandbox::KILLED_EXIT_STATUS) {
                warn!(
                    "process {:?} of {} did not end after SIGKILL: reported as killed",
                    process.exec_id, container.id
                );
                publish_exit(&events, &container, &process, &exit);
            }
        });
    }

    async fn delete_init(&self, container: Arc<Container>) -> Result<DeleteResponse, Error> {
        let init = container.init()?;
        if init.is_running() {
            return Err(Error::StillRunning(format!("task {}", container.id)));
        }
        let sandbox = &container.sandbox;
        if !sandbox.is_gone() {
            match tokio::time::timeout(REMOVE_TIMEOUT, sandbox.agent.remove_container(&container.id)).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    warn!("removing container {} in the guest: {}", container.id, error_chain(&err))
                }
                Err(_) => {
                    warn!("removing container {} in the guest: no answer in {REMOVE_TIMEOUT:?}", container.id)
                }
            }
        }
        if container.owns_vm {
            sandbox.teardown().await;
            sandbox.timeline.mark(Step::TornDown);
            info!("{}", sandbox.timeline.line());
        } else if let Some(share) = &sandbox.share {
            share.release(&container.id);
        }
        self.tasks.remove(&container.id);
        let exit = init.exited().unwrap_or(Exit { status: 137, at: Timestamp::now() });
        let event = TaskDelete {
            container_id: container.id.clone(),
            id: container.id.clone(),
            pid: container.host_pid(),
            exit_status: exit.status,
            exited_at: MessageField::some(exit.at.clone()),
            ..Default::default()
        };
        self.events.send(topics::TASK_DELETE_EVENT_TOPIC, Box::new(event));
        if container.owns_vm {
            info!("task {} deleted; its VM is stopped", container.id);
        } else {
            info!("task {} deleted from its pod's VM", container.id);
        }
        Ok(DeleteResponse {
            pid: container.host_pid(),
            exit_status: exit.status,
            exited_at: MessageField::some(exit.at),
            ..Default::default()
        })
    }

    async fn create(&self, req: &CreateTaskRequest) -> Result<CreateTaskResponse, Error> {
        let _creating = self.creating.lock().await;
        if !req.checkpoint.is_empty() {
            return Err(Error::CheckpointRestore);
        }
        let spec = spec::read(Path::new(&req.bundle))?;
        let container = match spec::pod_role(&spec) {
            PodRole::Container { sandbox_id } => {
                let pod = self.tasks.sandbox(&sandbox_id)?;
                let container = self.create_in_pod(req, spec, &pod).await?;
                info!("task {} created in the VM of pod {sandbox_id}", container.id);
                self.tasks.insert(container.clone());
                container
            }
            role => {
                self.tasks.check_room()?;
                let container = self.create_container(req, spec, role).await?;
                info!(
                    "task {} created in a {} VM (pid {})",
                    container.id,
                    container.sandbox.backend,
                    container.host_pid()
                );
                self.tasks.insert(container.clone());
                self.forward_oom_events(&container);
                container
            }
        };
        let pid = container.host_pid();
        let event = TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            pid,
            ..Default::default()
        };
        self.events.send(topics::TASK_CREATE_EVENT_TOPIC, Box::new(event));
        Ok(CreateTaskResponse { pid, ..Default::default() })
    }

    /// One forwarder per VM: it reports the OOM kills of every container of the shim.
    fn forward_oom_events(&self, container: &Container) {
        let tasks = self.tasks.clone();
        let (agent, gone, events) =
            (container.sandbox.agent.clone(), container.sandbox.gone(), self.events.clone());
        tokio::spawn(async move {
            events::forward_oom_events(&agent, move |id| tasks.owns(id), events, gone).await;
        });
    }

    async fn start(&self, req: &StartRequest) -> Result<StartResponse, Error> {
        let container = self.tasks.get(&req.id)?;
        let process = container.process(&req.exec_id)?;
        if process.status() != Status::CREATED {
            return Err(Error::AlreadyStarted(req.exec_id.clone()));
        }
        let starts_sandbox = process.is_init() && container.owns_vm;
        if starts_sandbox {
            container.sandbox.timeline.mark(Step::StartReceived);
        }
        let agent = &container.sandbox.agent;
        let guest_pid = if starts_sandbox {
            // `ctr run --cni` adds the CNI interface to the monitor's namespace after Create.
            configure_guest_network_if_ready(agent, container.network.as_deref()).await?;
            agent.start_container(&container.id).await?
        } else if process.is_init() {
            agent.start_container(&container.id).await?
        } else {
            let pid = agent.exec_process(&container.id, &req.exec_id, &process.exec_spec).await?;
            self.connect_stdio(&container, &process).await?;
            pid
        };
        process.set_pid(guest_pid);
        process.set_status(Status::RUNNING);
        let pid = container.visible_pid(&process);
        // Sent before the exit can be watched for: TaskStart always precedes TaskExit.
        if process.is_init() {
            let event = TaskStart { container_id: container.id.clone(), pid, ..Default::default() };
            self.events.send(topics::TASK_START_EVENT_TOPIC, Box::new(event));
        } else {
            let event = TaskExecStarted {
                container_id: container.id.clone(),
                exec_id: req.exec_id.clone(),
                pid,
                ..Default::default()
            };
            self.events.send(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(event));
        }
        if starts_sandbox {
            container.sandbox.timeline.mark(Step::Started);
        }
        self.watch_exit(container, process);
        Ok(StartResponse { pid, ..Default::default() })
    }

    async fn kill(&self, req: &KillRequest) -> Result<(), Error> {
        let container = self.tasks.get(&req.id)?;
        let process = container.process(&req.exec_id)?;
        match process.status() {
            Status::STOPPED => return Err(Error::Finished(req.exec_id.clone())),
            Status::CREATED => {
                // Never started: nothing runs in the guest yet, so the signal ends it right here.
                process.record_exit(128 + req.signal);
                return Ok(());
            }
            _ => {}
        }
        let all = req.all && process.is_init();
        let agent = &container.sandbox.agent;
        let signalled = tokio::time::timeout(
            SIGNAL_CALL_TIMEOUT,
            agent.signal_process(&container.id, &req.exec_id, req.signal, all),
        )
        .await;
        if req.signal == SIGKILL {
            // Whatever the guest answers, the host sees the kill through.
            self.enforce_kill(container.clone(), process.clone());
            match signalled {
                Ok(Ok(())) => {}
                Ok(Err(err)) => warn!("SIGKILL of {}/{:?}: {}", container.id, req.exec_id, error_chain(&err)),
                Err(_) => warn!(
                    "SIGKILL of {}/{:?}: no answer in {SIGNAL_CALL_TIMEOUT:?}",
                    container.id, req.exec_id
                ),
            }
            return Ok(());
        }
        match signalled {
            Ok(result) => Ok(result?),
            Err(_) => Err(Error::Agent(agent_client::Error::NoAnswer {
                call: "Agent.SignalProcess",
                waited: SIGNAL_CALL_TIMEOUT,
            })),
        }
    }

    async fn delete(&self, req: &DeleteRequest) -> Result<DeleteResponse, Error> {
        let container = self.tasks.get(&req.id)?;
        if req.exec_id.is_empty() {
            return self.delete_init(container).await;
        }
        let process = container.process(&req.exec_id)?;
        if process.is_running() {
            return Err(Error::StillRunning(format!("exec {:?}", req.exec_id)));
        }
        container.remove_exec(&req.exec_id);
        let exit = process.exited().unwrap_or(Exit { status: 0, at: Timestamp::now() });
        Ok(DeleteResponse {
            pid: process.pid(),
            exit_status: exit.status,
            exited_at: MessageField::some(exit.at),
            ..Default::default()
        })
    }

    async fn exec(&self, req: &ExecProcessRequest) -> Result<(), Error> {
        let container = self.tasks.get(&req.id)?;
        if container.init()?.status() != Status::RUNNING {
            return Err(Error::NotRunning(container.id.clone()));
        }
        let json = req
            .spec
            .as_ref()
            .map(|s| s.value.as_slice())
            .ok_or_else(|| Error::NoExecSpec(req.exec_id.clone()))?;
        let exec_spec = spec::exec_process(json)?;
        let stdio = StdioUris {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        container.add_exec(Process::new(&req.exec_id, stdio, exec_spec))?;
        let event = TaskExecAdded {
            container_id: container.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        self.events.send(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(event));
        Ok(())
    }

    async fn set_paused(&self, id: &str, paused: bool) -> Result<(), Error> {
        let container = self.tasks.get(id)?;
        container.sandbox.agent.set_paused(&container.id, paused).await?;
        let init = container.init()?;
        if paused {
            init.set_status(Status::PAUSED);
            let event = TaskPaused { container_id: container.id.clone(), ..Default::default() };
            self.events.send(topics::TASK_PAUSED_EVENT_TOPIC, Box::new(event));
        } else {
            init.set_status(Status::RUNNING);
            let event = TaskResumed { container_id: container.id.clone(), ..Default::default() };
            self.events.send(topics::TASK_RESUMED_EVENT_TOPIC, Box::new(event));
        }
        Ok(())
    }
}

fn stdio_uris(req: &CreateTaskRequest) -> StdioUris {
    StdioUris {
        stdin: req.stdin.clone(),
        stdout: req.stdout.clone(),
        stderr: req.stderr.clone(),
        terminal: req.terminal,
    }
}

/// Whether the container's cgroup in the guest counts an OOM kill (bounded: a guest that does
/// not answer means no).
async fn oom_killed(container: &Container) -> bool {
    if container.sandbox.is_gone() {
        return false;
    }
    let stats =
        tokio::time::timeout(SIGNAL_CALL_TIMEOUT, container.sandbox.agent.stats_container(&container.id));
    match stats.await {
        Ok(Ok(stats)) => stats.memory_events.as_ref().is_some_and(|e| e.oom_kill > 0),
        Ok(Err(_)) | Err(_) => false,
    }
}

fn publish_exit(events: &Events, container: &Container, process: &Process, exit: &Exit) {
    let id = if process.is_init() { container.id.clone() } else { process.exec_id.clone() };
    let event = TaskExit {
        container_id: container.id.clone(),
        id,
        pid: container.visible_pid(process),
        exit_status: exit.status,
        exited_at: MessageField::some(exit.at.clone()),
        ..Default::default()
    };
    events.send(topics::TASK_EXIT_EVENT_TOPIC, Box::new(event));
}

/// The snapshot as a disk image, built (or found in the cache) off the async runtime.
async fn prepare_rootfs(
    snapshot: rootfs::Snapshot,
    config: &ShimConfig,
    dir: &Path,
) -> Result<PathBuf, Error> {
    let (cache, scratch) = (config.image_cache.clone(), dir.to_path_buf());
    let image = tokio::task::spawn_blocking(move || rootfs::prepare(&snapshot, &cache, &scratch))
        .await
        .map_err(Error::Join)??;
    Ok(image.path)
}

/// Records the task's directory in its bundle: `delete` after a crash finds it there, whatever
/// config was used.
fn record_task_dir(bundle: &str, dir: &Path) -> Result<(), Error> {
    let record = Path::new(bundle).join(TASK_DIR_FILE);
    std::fs::write(&record, dir.as_os_str().as_encoded_bytes()).map_err(|source| Error::TaskDir {
        action: "write",
        path: record,
        source,
    })
}

#[async_trait]
impl containerd_shim::Task for TaskService {
    async fn create(&self, _ctx: &TtrpcContext, req: CreateTaskRequest) -> TtrpcResult<CreateTaskResponse> {
        // The reason goes to containerd's log too, not only to the caller, which may not keep it
        // (a kubelet retrying, a CI runner's job log).
        let created = TaskService::create(self, &req).await;
        if let Err(err) = &created {
            error!("task {}: create failed: {}", req.id, error_chain(err));
        }
        Ok(created?)
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        Ok(TaskService::start(self, &req).await?)
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        let container = self.tasks.get(&req.id).map_err(Error::from)?;
        let process = container.process(&req.exec_id).map_err(Error::from)?;
        let exit = process.exited();
        Ok(StateResponse {
            id: req.id.clone(),
            bundle: container.bundle.clone(),
            pid: container.visible_pid(&process),
            status: process.status().into(),
            stdin: process.stdio.stdin.clone(),
            stdout: process.stdio.stdout.clone(),
            stderr: process.stdio.stderr.clone(),
            terminal: process.stdio.terminal,
            exit_status: exit.as_ref().map(|e| e.status).unwrap_or_default(),
            exited_at: exit.map(|e| MessageField::some(e.at)).unwrap_or_default(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let container = self.tasks.get(&req.id).map_err(Error::from)?;
        let process = container.process(&req.exec_id).map_err(Error::from)?;
        let exit = process.wait().await;
        Ok(WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(exit.at),
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        TaskService::kill(self, &req).await?;
        Ok(Empty::new())
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        Ok(TaskService::delete(self, &req).await?)
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        TaskService::exec(self, &req).await?;
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        let container = self.tasks.get(&req.id).map_err(Error::from)?;
        container.process(&req.exec_id).map_err(Error::from)?;
        container
            .sandbox
            .agent
            .resize_terminal(&container.id, &req.exec_id, req.height, req.width)
            .await
            .map_err(Error::from)?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        let container = self.tasks.get(&req.id).map_err(Error::from)?;
        let process = container.process(&req.exec_id).map_err(Error::from)?;
        if req.stdin {
            process.close_stdin.notify_one();
        }
        Ok(Empty::new())
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let container = self.tasks.get(&req.id).map_err(Error::from)?;
        let pids = container.sandbox.agent.list_processes(&container.id).await.map_err(Error::from)?;
        let processes = pids.into_iter().map(|pid| ProcessInfo { pid, ..Default::default() }).collect();
        Ok(PidsResponse { processes, ..Default::default() })
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        let container = self.tasks.get(&req.id).map_err(Error::from)?;
        let stats = container.sandbox.agent.stats_container(&container.id).await.map_err(Error::from)?;
        let value = metrics::from_agent_stats(&stats).write_to_bytes().map_err(Error::Metrics)?;
        let any = Any { type_url: metrics::METRICS_TYPE.into(), value, ..Default::default() };
        Ok(StatsResponse { stats: MessageField::some(any), ..Default::default() })
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        let container = self.tasks.get(&req.id).map_err(Error::from)?;
        let resources = req.resources.as_ref().ok_or(Error::NoResources)?;
        let json = std::str::from_utf8(&resources.value).map_err(|_| Error::ResourcesNotJson)?;
        container.sandbox.agent.update_container(&container.id, json).await.map_err(Error::from)?;
        Ok(Empty::new())
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        self.set_paused(&req.id, true).await?;
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        self.set_paused(&req.id, false).await?;
        Ok(Empty::new())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: containerd_shim::api::CheckpointTaskRequest,
    ) -> TtrpcResult<Empty> {
        Err(Error::Checkpoint.into())
    }

    async fn connect(&self, _ctx: &TtrpcContext, req: ConnectRequest) -> TtrpcResult<ConnectResponse> {
        let task_pid = self.tasks.get(&req.id).map(|c| c.host_pid()).unwrap_or(0);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        if self.tasks.is_empty() {
            self.exit.signal();
        }
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests;
