//! The containerd Task API (v2) over one microVM per task: containerd calls these methods, the
//! shim turns them into calls on the agent inside the guest and publishes the task events.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
use containerd_shim::protos::protobuf::{CodedInputStream, MessageDyn, MessageField};
use containerd_shim::protos::types::task::{ProcessInfo, Status};
use containerd_shim::protos::{topics, ttrpc};
use containerd_shim::{Config, Flags, StartOpts, TtrpcContext};
use ironclad_protocol::agent::{CopyFileRequest, CreateContainerRequest, Storage};
use tokio::sync::{watch, Mutex, Notify};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::agent_client::{self, AgentClient};
use crate::config::{ShimConfig, DEFAULT_CONFIG_PATH};
use crate::hypervisor::{error_chain, BlockDevice, VmConfig};
use crate::io::{self as stdio, ProcessIo};
use crate::rootfs::{self, MountSpec, ROOTFS_SERIAL};
use crate::sandbox::{clean_up_task_dir, Sandbox};

/// The runtime name containerd knows this shim by.
pub const RUNTIME_ID: &str = "io.containerd.ironclad.v2";
/// The exit status of every process of a VM that went away under it (like Kata's).
pub const VM_GONE_EXIT_STATUS: u32 = 255;
const RUNTIME_OPTIONS_TYPE: &str = "runtimeoptions.v1.Options";
const METRICS_TYPE: &str = "io.containerd.cgroups.v2.Metrics";
/// Names the task directory in the bundle, for `delete` after a crash whatever config was used.
const TASK_DIR_FILE: &str = "ironclad-task-dir";
/// Where the container's disk is mounted inside the guest.
const GUEST_ROOTFS_DIR: &str = "/run/ironclad/rootfs";

type TtrpcResult<T> = ttrpc::Result<T>;

fn status(code: ttrpc::Code, message: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message.into()))
}

/// An agent error keeps the agent's code (INVALID_ARGUMENT, NOT_FOUND, ...); a transport error
/// means the VM is unreachable.
fn agent_status(err: &agent_client::Error) -> ttrpc::Error {
    let code = match err {
        agent_client::Error::Rpc { source: ttrpc::Error::RpcStatus(s), .. } => s.code(),
        _ => ttrpc::Code::UNAVAILABLE,
    };
    status(code, error_chain(err))
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
}

#[async_trait]
impl Shim for IroncladShim {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        IroncladShim {
            exit: Arc::new(ExitSignal::default()),
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            bundle: PathBuf::from(&args.bundle),
        }
    }

    /// One shim (and so one VM) per task.
    async fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        let grouping = opts.id.clone();
        let address = spawn(opts, &grouping, Vec::new()).await?;
        containerd_shim::asynchronous::util::write_str_to_file("address", &address).await?;
        Ok(address)
    }

    /// containerd's clean-up after a shim that is gone: stops whatever the task left running.
    async fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
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
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        TaskService {
            namespace: self.namespace.clone(),
            exit: self.exit.clone(),
            publisher: Arc::new(publisher),
            task: Arc::new(Mutex::new(None)),
        }
    }
}

/// The socket a crashed shim served on (named by the bundle's `address` file), which it could not
/// remove itself. Only a socket is removed, whatever the file says.
fn remove_dead_shim_socket(address_file: &Path) {
    use std::os::unix::fs::FileTypeExt;
    let Ok(address) = std::fs::read_to_string(address_file) else { return };
    let path = Path::new(address.trim().strip_prefix("unix://").unwrap_or(address.trim()));
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

/// `<run root>/<namespace>/<task id>`: everything the shim makes for a task.
pub fn task_dir(config: &ShimConfig, namespace: &str, id: &str) -> PathBuf {
    config.run_root.join(namespace).join(id)
}

#[derive(Debug, Clone, PartialEq)]
struct Exit {
    status: u32,
    at: Timestamp,
}

#[derive(Debug, Clone, Default)]
struct StdioUris {
    stdin: String,
    stdout: String,
    stderr: String,
    terminal: bool,
}

/// The container's init process (exec_id "") or one exec'd into it.
struct Process {
    exec_id: String,
    stdio: StdioUris,
    /// The OCI process of an exec, as JSON.
    exec_spec: String,
    pid: std::sync::Mutex<u32>,
    status: std::sync::Mutex<Status>,
    exit: watch::Sender<Option<Exit>>,
    close_stdin: Arc<Notify>,
    outputs: Mutex<Vec<JoinHandle<()>>>,
}

impl Process {
    fn new(exec_id: &str, stdio: StdioUris, exec_spec: String) -> Arc<Self> {
        Arc::new(Process {
            exec_id: exec_id.to_string(),
            stdio,
            exec_spec,
            pid: std::sync::Mutex::new(0),
            status: std::sync::Mutex::new(Status::CREATED),
            exit: watch::channel(None).0,
            close_stdin: Arc::new(Notify::new()),
            outputs: Mutex::new(Vec::new()),
        })
    }

    fn pid(&self) -> u32 {
        self.pid.lock().map(|p| *p).unwrap_or_default()
    }

    fn status(&self) -> Status {
        if self.exit.borrow().is_some() {
            return Status::STOPPED;
        }
        self.status.lock().map(|s| *s).unwrap_or(Status::UNKNOWN)
    }

    fn set_status(&self, status: Status) {
        if let Ok(mut s) = self.status.lock() {
            *s = status;
        }
    }

    fn exited(&self) -> Option<Exit> {
        self.exit.borrow().clone()
    }
}

/// A task: its VM and the processes in its container.
struct Task {
    id: String,
    bundle: String,
    dir: PathBuf,
    sandbox: Sandbox,
    processes: std::sync::Mutex<HashMap<String, Arc<Process>>>,
}

impl Task {
    fn process(&self, exec_id: &str) -> TtrpcResult<Arc<Process>> {
        let processes =
            self.processes.lock().map_err(|_| status(ttrpc::Code::INTERNAL, "process table poisoned"))?;
        processes.get(exec_id).cloned().ok_or_else(|| {
            status(ttrpc::Code::NOT_FOUND, format!("task {} has no exec process {exec_id:?}", self.id))
        })
    }

    fn io(&self, exec_id: &str) -> ProcessIo {
        ProcessIo {
            agent: self.sandbox.agent.clone(),
            container_id: self.id.clone(),
            exec_id: exec_id.to_string(),
            vm_gone: self.sandbox.gone(),
        }
    }

    /// The task's pid on the host, as Kata reports it: the VM monitor's.
    fn host_pid(&self) -> u32 {
        self.sandbox.monitor_pid
    }

    /// The pid containerd sees: the VM's for the init process, the guest's for an exec.
    fn visible_pid(&self, process: &Process) -> u32 {
        if process.exec_id.is_empty() {
            self.host_pid()
        } else {
            process.pid()
        }
    }
}

#[derive(Clone)]
pub struct TaskService {
    namespace: String,
    exit: Arc<ExitSignal>,
    publisher: Arc<RemotePublisher>,
    task: Arc<Mutex<Option<Arc<Task>>>>,
}

impl TaskService {
    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let ctx = ttrpc::context::Context::default();
        if let Err(err) = self.publisher.publish(ctx, topic, &self.namespace, event).await {
            warn!("cannot publish {topic}: {err}");
        }
    }

    async fn task(&self, id: &str) -> TtrpcResult<Arc<Task>> {
        match self.task.lock().await.as_ref() {
            Some(task) if task.id == id => Ok(task.clone()),
            _ => Err(status(ttrpc::Code::NOT_FOUND, format!("no task {id:?} in this shim"))),
        }
    }

    /// The runtime options' config file, else the default one.
    fn load_config(options: &MessageField<Any>) -> TtrpcResult<ShimConfig> {
        let mut path = PathBuf::from(DEFAULT_CONFIG_PATH);
        if let Some(any) = options.as_ref().filter(|a| a.type_url.ends_with(RUNTIME_OPTIONS_TYPE)) {
            let config_path = runtime_options_config_path(&any.value).map_err(|err| {
                status(ttrpc::Code::INVALID_ARGUMENT, format!("cannot decode {RUNTIME_OPTIONS_TYPE}: {err}"))
            })?;
            if !config_path.is_empty() {
                path = PathBuf::from(config_path);
            }
        }
        ShimConfig::load(&path).map_err(|err| status(ttrpc::Code::INVALID_ARGUMENT, error_chain(&err)))
    }

    async fn create_task(&self, req: &CreateTaskRequest) -> TtrpcResult<Arc<Task>> {
        if !req.checkpoint.is_empty() {
            return Err(status(
                ttrpc::Code::UNIMPLEMENTED,
                "restoring a task from a checkpoint is not supported",
            ));
        }
        let config = Self::load_config(&req.options)?;
        let spec = read_spec(Path::new(&req.bundle))?;
        let annotations = spec_annotations(&spec);
        let (vcpus, memory_mib) = config
            .vm_size(&annotations)
            .map_err(|err| status(ttrpc::Code::INVALID_ARGUMENT, err.to_string()))?;
        let file_mounts = host_file_mounts(&spec)?;
        let mounts: Vec<MountSpec<'_>> = req
            .rootfs
            .iter()
            .map(|m| MountSpec { kind: &m.type_, source: &m.source, options: &m.options })
            .collect();
        let snapshot = rootfs::parse_snapshot(&mounts)
            .map_err(|err| status(ttrpc::Code::INVALID_ARGUMENT, err.to_string()))?;

        let dir = task_dir(&config, &self.namespace, &req.id);
        if dir.exists() {
            return Err(status(
                ttrpc::Code::ALREADY_EXISTS,
                format!("{} exists: task {} is already running", dir.display(), req.id),
            ));
        }
        std::fs::create_dir_all(&dir).map_err(|err| {
            status(ttrpc::Code::INTERNAL, format!("cannot create {}: {err}", dir.display()))
        })?;
        // `delete` after a crash finds the task directory through the bundle, whatever config was used.
        let record = Path::new(&req.bundle).join(TASK_DIR_FILE);
        if let Err(err) = std::fs::write(&record, dir.as_os_str().as_encoded_bytes()) {
            clean_up_task_dir(&dir);
            return Err(status(ttrpc::Code::INTERNAL, format!("cannot write {}: {err}", record.display())));
        }
        let created =
            self.boot_and_create(req, &config, spec, file_mounts, snapshot, (vcpus, memory_mib), &dir).await;
        if created.is_err() {
            clean_up_task_dir(&dir);
        }
        created
    }

    #[allow(clippy::too_many_arguments)]
    async fn boot_and_create(
        &self,
        req: &CreateTaskRequest,
        config: &ShimConfig,
        mut spec: serde_json::Value,
        file_mounts: Vec<usize>,
        snapshot: rootfs::Snapshot,
        (vcpus, memory_mib): (u8, u32),
        dir: &Path,
    ) -> TtrpcResult<Arc<Task>> {
        let (cache, scratch) = (config.image_cache.clone(), dir.to_path_buf());
        let image = tokio::task::spawn_blocking(move || rootfs::prepare(&snapshot, &cache, &scratch))
            .await
            .map_err(|err| status(ttrpc::Code::INTERNAL, err.to_string()))?
            .map_err(|err| status(ttrpc::Code::INTERNAL, format!("rootfs: {}", error_chain(&err))))?;
        let vm_config = VmConfig {
            kernel: config.kernel.clone(),
            initrd: config.initrd.clone(),
            vcpus,
            memory_mib,
            extra_kernel_params: config.kernel_params.clone(),
            block_devices: vec![BlockDevice {
                path: image.path,
                read_only: true,
                serial: ROOTFS_SERIAL.into(),
            }],
        };
        let sandbox = Sandbox::boot(config, &vm_config, dir).await.map_err(|err| {
            status(
                ttrpc::Code::FAILED_PRECONDITION,
                format!("cannot start the sandbox VM: {}", error_chain(&err)),
            )
        })?;
        let task = Arc::new(Task {
            id: req.id.clone(),
            bundle: req.bundle.clone(),
            dir: dir.to_path_buf(),
            sandbox,
            processes: std::sync::Mutex::new(HashMap::new()),
        });
        let made = self.create_container(&task, req, &mut spec, &file_mounts).await;
        if let Err(err) = made {
            task.sandbox.stop().await;
            return Err(err);
        }
        Ok(task)
    }

    async fn create_container(
        &self,
        task: &Arc<Task>,
        req: &CreateTaskRequest,
        spec: &mut serde_json::Value,
        file_mounts: &[usize],
    ) -> TtrpcResult<()> {
        let agent = &task.sandbox.agent;
        if let Err(err) = agent.sync_clock().await {
            warn!("cannot set the guest clock: {}", error_chain(&err));
        }
        let hostname = guest_hostname(spec, &req.id);
        agent.create_sandbox(&req.id, &hostname).await.map_err(|err| agent_status(&err))?;
        copy_file_mounts(agent, &req.id, spec, file_mounts).await?;
        let guest_rootfs = format!("{GUEST_ROOTFS_DIR}/{}", req.id);
        let mut storage = Storage::new();
        storage.serial = ROOTFS_SERIAL.into();
        storage.fstype = "ext4".into();
        storage.mount_point = guest_rootfs.clone();
        storage.read_only = true;
        let mut request = CreateContainerRequest::new();
        request.container_id = req.id.clone();
        request.oci_spec_json = spec.to_string();
        request.rootfs = guest_rootfs;
        request.storages = vec![storage];
        request.rootfs_overlay = true;
        agent.create_container(&request).await.map_err(|err| agent_status(&err))?;

        let stdio = StdioUris {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let init = Process::new("", stdio, String::new());
        self.connect_stdio(task, &init).await?;
        if let Ok(mut processes) = task.processes.lock() {
            processes.insert(String::new(), init);
        }
        tokio::spawn(forward_oom_events(self.clone(), task.sandbox.agent.clone(), task.sandbox.gone()));
        Ok(())
    }

    /// Opens containerd's stdio for the process and starts the relays.
    async fn connect_stdio(&self, task: &Task, process: &Process) -> TtrpcResult<()> {
        let io_err = |err: stdio::Error| status(ttrpc::Code::INVALID_ARGUMENT, error_chain(&err));
        let io = task.io(&process.exec_id);
        let mut outputs = Vec::new();
        if let stdio::Endpoint::Binary { path, args } =
            stdio::parse_endpoint("stdout", &process.stdio.stdout).map_err(io_err)?
        {
            // One logging binary takes both streams, as with containerd's own shims.
            let logger =
                stdio::start_binary_logger(&path, &args, &task.id, &self.namespace).await.map_err(io_err)?;
            outputs.push(tokio::spawn(stdio::relay_output(io.clone(), false, logger.stdout)));
            outputs.push(tokio::spawn(stdio::relay_output(io.clone(), true, logger.stderr)));
            let mut child = logger.child;
            // It exits once both streams are closed; waiting for it reaps it.
            tokio::spawn(async move {
                let _ = child.wait().await;
            });
        } else {
            if let Some(sink) = stdio::open_output("stdout", &process.stdio.stdout).await.map_err(io_err)? {
                outputs.push(tokio::spawn(stdio::relay_output(io.clone(), false, sink)));
            }
            if !process.stdio.terminal {
                if let Some(sink) =
                    stdio::open_output("stderr", &process.stdio.stderr).await.map_err(io_err)?
                {
                    outputs.push(tokio::spawn(stdio::relay_output(io.clone(), true, sink)));
                }
            }
        }
        if let Some(source) = stdio::open_input(&process.stdio.stdin).map_err(io_err)? {
            tokio::spawn(stdio::relay_input(io, source, process.close_stdin.clone()));
        }
        process.outputs.lock().await.extend(outputs);
        Ok(())
    }

    /// Waits for the process to exit (or its VM to go), lets its output drain, then records the
    /// exit and tells containerd.
    fn watch_exit(&self, task: Arc<Task>, process: Arc<Process>) {
        let service = self.clone();
        tokio::spawn(async move {
            let mut gone = task.sandbox.gone();
            let exit_status = tokio::select! {
                waited = task.sandbox.agent.wait_process(&task.id, &process.exec_id) => match waited {
                    Ok(code) => u32::try_from(code).unwrap_or(VM_GONE_EXIT_STATUS),
                    Err(err) => {
                        error!("waiting for {}/{}: {}", task.id, process.exec_id, error_chain(&err));
                        VM_GONE_EXIT_STATUS
                    }
                },
                _ = gone.wait_for(|gone| *gone) => {
                    error!("task {} process {:?} ends: its VM is gone", task.id, process.exec_id);
                    VM_GONE_EXIT_STATUS
                }
            };
            let outputs: Vec<_> = process.outputs.lock().await.drain(..).collect();
            for output in outputs {
                let _ = output.await;
            }
            let exit = Exit { status: exit_status, at: Timestamp::now() };
            process.exit.send_replace(Some(exit.clone()));
            let id = if process.exec_id.is_empty() { task.id.clone() } else { process.exec_id.clone() };
            let event = TaskExit {
                container_id: task.id.clone(),
                id,
                pid: task.visible_pid(&process),
                exit_status,
                exited_at: MessageField::some(exit.at),
                ..Default::default()
            };
            service.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(event)).await;
        });
    }

    async fn delete_init(&self, task: Arc<Task>) -> TtrpcResult<DeleteResponse> {
        let init = task.process("")?;
        if matches!(init.status(), Status::RUNNING | Status::PAUSED) {
            return Err(status(
                ttrpc::Code::FAILED_PRECONDITION,
                format!("task {} is still running: kill it first", task.id),
            ));
        }
        if !task.sandbox.is_gone() {
            if let Err(err) = task.sandbox.agent.remove_container(&task.id).await {
                warn!("removing container {} in the guest: {}", task.id, error_chain(&err));
            }
        }
        task.sandbox.stop().await;
        clean_up_task_dir(&task.dir);
        *self.task.lock().await = None;
        let exit = init.exited().unwrap_or(Exit { status: 137, at: Timestamp::now() });
        let event = TaskDelete {
            container_id: task.id.clone(),
            id: task.id.clone(),
            pid: task.host_pid(),
            exit_status: exit.status,
            exited_at: MessageField::some(exit.at.clone()),
            ..Default::default()
        };
        self.publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(event)).await;
        info!("task {} deleted; its VM is stopped", task.id);
        Ok(DeleteResponse {
            pid: task.host_pid(),
            exit_status: exit.status,
            exited_at: MessageField::some(exit.at),
            ..Default::default()
        })
    }
}

/// Passes the guest's OOM kills on as TaskOOM until the VM goes.
async fn forward_oom_events(service: TaskService, agent: AgentClient, mut gone: watch::Receiver<bool>) {
    loop {
        let container_id = tokio::select! {
            event = agent.get_oom_event() => match event {
                Ok(id) => id,
                Err(_) => return,
            },
            _ = gone.wait_for(|gone| *gone) => return,
        };
        service
            .publish(topics::TASK_OOM_EVENT_TOPIC, Box::new(TaskOOM { container_id, ..Default::default() }))
            .await;
    }
}

/// `config_path` (field 2) of a runtimeoptions.v1.Options message, which containerd-shim-protos
/// does not carry.
pub fn runtime_options_config_path(bytes: &[u8]) -> Result<String, containerd_shim::protos::protobuf::Error> {
    use containerd_shim::protos::protobuf::rt::WireType;
    let mut input = CodedInputStream::from_bytes(bytes);
    let mut config_path = String::new();
    while let Some(tag) = input.read_raw_tag_or_eof()? {
        let wire_type = WireType::new(tag & 7).ok_or_else(|| {
            containerd_shim::protos::protobuf::Error::from(std::io::Error::other(format!(
                "bad wire type in tag {tag}"
            )))
        })?;
        if tag >> 3 == 2 && wire_type == WireType::LengthDelimited {
            config_path = input.read_string()?;
        } else {
            input.skip_field(wire_type)?;
        }
    }
    Ok(config_path)
}

fn read_spec(bundle: &Path) -> TtrpcResult<serde_json::Value> {
    let path = bundle.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|err| {
        status(ttrpc::Code::INVALID_ARGUMENT, format!("cannot read {}: {err}", path.display()))
    })?;
    let spec: serde_json::Value = serde_json::from_str(&text).map_err(|err| {
        status(ttrpc::Code::INVALID_ARGUMENT, format!("{} is not valid JSON: {err}", path.display()))
    })?;
    if !spec.is_object() {
        return Err(status(
            ttrpc::Code::INVALID_ARGUMENT,
            format!("{} is not an OCI spec object", path.display()),
        ));
    }
    Ok(spec)
}

/// The spec's hostname, else the task id where that is a valid host name (as Docker names
/// containers), else "ironclad".
fn guest_hostname(spec: &serde_json::Value, id: &str) -> String {
    if let Some(hostname) = spec.get("hostname").and_then(|h| h.as_str()).filter(|h| !h.is_empty()) {
        return hostname.to_string();
    }
    let valid = !id.is_empty()
        && id.len() <= 63
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !id.starts_with('-')
        && !id.ends_with('-');
    if valid {
        id.to_string()
    } else {
        "ironclad".to_string()
    }
}

fn spec_annotations(spec: &serde_json::Value) -> HashMap<String, String> {
    spec.get("annotations")
        .and_then(|a| a.as_object())
        .map(|a| a.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default()
}

/// The indexes of the spec's bind mounts of host files, which are copied into the guest. A bind
/// mount of a host directory cannot be honoured (there is no shared file system yet).
fn host_file_mounts(spec: &serde_json::Value) -> TtrpcResult<Vec<usize>> {
    let Some(mounts) = spec.get("mounts").and_then(|m| m.as_array()) else { return Ok(Vec::new()) };
    let mut files = Vec::new();
    for (index, mount) in mounts.iter().enumerate() {
        let is_bind = mount.get("type").and_then(|t| t.as_str()) == Some("bind")
            || mount
                .get("options")
                .and_then(|o| o.as_array())
                .is_some_and(|o| o.iter().any(|v| v == "bind" || v == "rbind"));
        if !is_bind {
            continue;
        }
        let source = mount.get("source").and_then(|s| s.as_str()).unwrap_or_default();
        let destination = mount.get("destination").and_then(|s| s.as_str()).unwrap_or_default();
        match std::fs::metadata(source) {
            Ok(meta) if meta.is_file() => files.push(index),
            Ok(meta) if meta.is_dir() => {
                return Err(status(
                    ttrpc::Code::INVALID_ARGUMENT,
                    format!(
                        "bind mount of host directory {source} on {destination} is not supported: \
                         ironclad has no shared file system between host and guest"
                    ),
                ))
            }
            Ok(_) => {
                return Err(status(
                    ttrpc::Code::INVALID_ARGUMENT,
                    format!("bind mount source {source} on {destination} is neither a file nor a directory"),
                ))
            }
            Err(err) => {
                return Err(status(
                    ttrpc::Code::INVALID_ARGUMENT,
                    format!("bind mount source {source}: {err}"),
                ))
            }
        }
    }
    Ok(files)
}

/// Copies each bind-mounted host file into the guest and points its mount there.
async fn copy_file_mounts(
    agent: &AgentClient,
    container_id: &str,
    spec: &mut serde_json::Value,
    indexes: &[usize],
) -> TtrpcResult<()> {
    use std::os::unix::fs::MetadataExt;
    let Some(mounts) = spec.get_mut("mounts").and_then(|m| m.as_array_mut()) else { return Ok(()) };
    for &index in indexes {
        let Some(mount) = mounts.get_mut(index) else { continue };
        let source = mount.get("source").and_then(|s| s.as_str()).unwrap_or_default().to_string();
        let read = std::fs::read(&source).and_then(|data| Ok((data, std::fs::metadata(&source)?)));
        let (data, meta) = read
            .map_err(|err| status(ttrpc::Code::INVALID_ARGUMENT, format!("cannot read {source}: {err}")))?;
        let name =
            Path::new(&source).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let mut request = CopyFileRequest::new();
        request.path = format!("{container_id}/{index}-{name}");
        request.data = data;
        request.mode = meta.mode() & 0o7777;
        request.uid = meta.uid();
        request.gid = meta.gid();
        let guest_path = agent.copy_file(&request).await.map_err(|err| agent_status(&err))?;
        mount["source"] = serde_json::Value::String(guest_path);
    }
    Ok(())
}

fn stats_to_metrics(
    stats: &ironclad_protocol::agent::StatsContainerResponse,
) -> containerd_shim::protos::cgroups_v2::metrics::Metrics {
    use containerd_shim::protos::cgroups_v2::metrics::{
        CPUStat, IOEntry, IOStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
    };
    let mut metrics = Metrics::new();
    if let Some(p) = stats.pids.as_ref() {
        metrics.pids =
            MessageField::some(PidsStat { current: p.current, limit: p.limit, ..Default::default() });
    }
    if let Some(c) = stats.cpu.as_ref() {
        metrics.cpu = MessageField::some(CPUStat {
            usage_usec: c.usage_usec,
            user_usec: c.user_usec,
            system_usec: c.system_usec,
            nr_periods: c.nr_periods,
            nr_throttled: c.nr_throttled,
            throttled_usec: c.throttled_usec,
            ..Default::default()
        });
    }
    if let Some(m) = stats.memory.as_ref() {
        metrics.memory = MessageField::some(MemoryStat {
            usage: m.usage,
            usage_limit: m.usage_limit,
            anon: m.anon,
            file: m.file,
            kernel_stack: m.kernel_stack,
            slab: m.slab,
            sock: m.sock,
            shmem: m.shmem,
            file_mapped: m.file_mapped,
            file_dirty: m.file_dirty,
            file_writeback: m.file_writeback,
            pgfault: m.pgfault,
            pgmajfault: m.pgmajfault,
            ..Default::default()
        });
    }
    if let Some(e) = stats.memory_events.as_ref() {
        metrics.memory_events = MessageField::some(MemoryEvents {
            low: e.low,
            high: e.high,
            max: e.max,
            oom: e.oom,
            oom_kill: e.oom_kill,
            ..Default::default()
        });
    }
    let usage = stats
        .io
        .iter()
        .map(|e| IOEntry {
            major: e.major,
            minor: e.minor,
            rbytes: e.rbytes,
            wbytes: e.wbytes,
            rios: e.rios,
            wios: e.wios,
            ..Default::default()
        })
        .collect();
    metrics.io = MessageField::some(IOStat { usage, ..Default::default() });
    metrics
}

#[async_trait]
impl containerd_shim::Task for TaskService {
    async fn create(&self, _ctx: &TtrpcContext, req: CreateTaskRequest) -> TtrpcResult<CreateTaskResponse> {
        let mut slot = self.task.lock().await;
        if let Some(existing) = slot.as_ref() {
            return Err(status(
                ttrpc::Code::FAILED_PRECONDITION,
                format!("this shim already runs task {}: ironclad runs one task per microVM", existing.id),
            ));
        }
        let task = self.create_task(&req).await?;
        info!("task {} created in a {} VM (pid {})", task.id, task.sandbox.backend, task.host_pid());
        let pid = task.host_pid();
        *slot = Some(task);
        drop(slot);
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
        self.publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(event)).await;
        Ok(CreateTaskResponse { pid, ..Default::default() })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        let task = self.task(&req.id).await?;
        let process = task.process(&req.exec_id)?;
        if process.status() != Status::CREATED {
            return Err(status(
                ttrpc::Code::FAILED_PRECONDITION,
                format!("process {:?} was already started", req.exec_id),
            ));
        }
        let agent = &task.sandbox.agent;
        let guest_pid = if req.exec_id.is_empty() {
            agent.start_container(&task.id).await.map_err(|err| agent_status(&err))?
        } else {
            let pid = agent
                .exec_process(&task.id, &req.exec_id, &process.exec_spec)
                .await
                .map_err(|err| agent_status(&err))?;
            self.connect_stdio(&task, &process).await?;
            pid
        };
        if let Ok(mut p) = process.pid.lock() {
            *p = guest_pid;
        }
        process.set_status(Status::RUNNING);
        self.watch_exit(task.clone(), process.clone());
        let pid = task.visible_pid(&process);
        if req.exec_id.is_empty() {
            let event = TaskStart { container_id: task.id.clone(), pid, ..Default::default() };
            self.publish(topics::TASK_START_EVENT_TOPIC, Box::new(event)).await;
        } else {
            let event = TaskExecStarted {
                container_id: task.id.clone(),
                exec_id: req.exec_id.clone(),
                pid,
                ..Default::default()
            };
            self.publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(event)).await;
        }
        Ok(StartResponse { pid, ..Default::default() })
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        let task = self.task(&req.id).await?;
        let process = task.process(&req.exec_id)?;
        let exit = process.exited();
        Ok(StateResponse {
            id: req.id.clone(),
            bundle: task.bundle.clone(),
            pid: task.visible_pid(&process),
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
        let task = self.task(&req.id).await?;
        let process = task.process(&req.exec_id)?;
        let mut exit = process.exit.subscribe();
        let exit = exit
            .wait_for(|e| e.is_some())
            .await
            .map(|e| e.clone())
            .map_err(|_| status(ttrpc::Code::INTERNAL, "the process's exit was lost"))?
            .ok_or_else(|| status(ttrpc::Code::INTERNAL, "the process's exit was lost"))?;
        Ok(WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(exit.at),
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        let task = self.task(&req.id).await?;
        let process = task.process(&req.exec_id)?;
        match process.status() {
            Status::STOPPED => {
                return Err(status(
                    ttrpc::Code::NOT_FOUND,
                    format!("process {:?} already finished", req.exec_id),
                ))
            }
            Status::CREATED => {
                // Never started: nothing runs in the guest yet, so the signal ends it right here.
                process.exit.send_replace(Some(Exit { status: 128 + req.signal, at: Timestamp::now() }));
                return Ok(Empty::new());
            }
            _ => {}
        }
        let all = req.all && req.exec_id.is_empty();
        task.sandbox
            .agent
            .signal_process(&task.id, &req.exec_id, req.signal, all)
            .await
            .map_err(|err| agent_status(&err))?;
        Ok(Empty::new())
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        let task = self.task(&req.id).await?;
        if req.exec_id.is_empty() {
            return self.delete_init(task).await;
        }
        let process = task.process(&req.exec_id)?;
        if matches!(process.status(), Status::RUNNING | Status::PAUSED) {
            return Err(status(
                ttrpc::Code::FAILED_PRECONDITION,
                format!("exec {:?} is still running", req.exec_id),
            ));
        }
        if let Ok(mut processes) = task.processes.lock() {
            processes.remove(&req.exec_id);
        }
        let exit = process.exited().unwrap_or(Exit { status: 0, at: Timestamp::now() });
        Ok(DeleteResponse {
            pid: process.pid(),
            exit_status: exit.status,
            exited_at: MessageField::some(exit.at),
            ..Default::default()
        })
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        let task = self.task(&req.id).await?;
        if task.process("")?.status() != Status::RUNNING {
            return Err(status(ttrpc::Code::FAILED_PRECONDITION, format!("task {} is not running", task.id)));
        }
        let spec = req.spec.as_ref().map(|s| s.value.clone()).unwrap_or_default();
        let spec = String::from_utf8(spec)
            .map_err(|_| status(ttrpc::Code::INVALID_ARGUMENT, "the exec process spec is not UTF-8 JSON"))?;
        let stdio = StdioUris {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        {
            let mut processes =
                task.processes.lock().map_err(|_| status(ttrpc::Code::INTERNAL, "process table poisoned"))?;
            if processes.contains_key(&req.exec_id) {
                return Err(status(
                    ttrpc::Code::ALREADY_EXISTS,
                    format!("exec {:?} already exists", req.exec_id),
                ));
            }
            processes.insert(req.exec_id.clone(), Process::new(&req.exec_id, stdio, spec));
        }
        let event = TaskExecAdded {
            container_id: task.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        self.publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(event)).await;
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        let task = self.task(&req.id).await?;
        task.process(&req.exec_id)?;
        task.sandbox
            .agent
            .resize_terminal(&task.id, &req.exec_id, req.height, req.width)
            .await
            .map_err(|err| agent_status(&err))?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        let task = self.task(&req.id).await?;
        let process = task.process(&req.exec_id)?;
        if req.stdin {
            process.close_stdin.notify_one();
        }
        Ok(Empty::new())
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let task = self.task(&req.id).await?;
        let pids = task.sandbox.agent.list_processes(&task.id).await.map_err(|err| agent_status(&err))?;
        let processes = pids.into_iter().map(|pid| ProcessInfo { pid, ..Default::default() }).collect();
        Ok(PidsResponse { processes, ..Default::default() })
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        let task = self.task(&req.id).await?;
        let stats = task.sandbox.agent.stats_container(&task.id).await.map_err(|err| agent_status(&err))?;
        let value = containerd_shim::protos::protobuf::Message::write_to_bytes(&stats_to_metrics(&stats))
            .map_err(|err| status(ttrpc::Code::INTERNAL, err.to_string()))?;
        let any = Any { type_url: METRICS_TYPE.into(), value, ..Default::default() };
        Ok(StatsResponse { stats: MessageField::some(any), ..Default::default() })
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        let task = self.task(&req.id).await?;
        let resources = req
            .resources
            .as_ref()
            .ok_or_else(|| status(ttrpc::Code::INVALID_ARGUMENT, "update without resources"))?;
        let json = std::str::from_utf8(&resources.value)
            .map_err(|_| status(ttrpc::Code::INVALID_ARGUMENT, "resources are not JSON (LinuxResources)"))?;
        task.sandbox.agent.update_container(&task.id, json).await.map_err(|err| agent_status(&err))?;
        Ok(Empty::new())
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        let task = self.task(&req.id).await?;
        task.sandbox.agent.set_paused(&task.id, true).await.map_err(|err| agent_status(&err))?;
        task.process("")?.set_status(Status::PAUSED);
        self.publish(
            topics::TASK_PAUSED_EVENT_TOPIC,
            Box::new(TaskPaused { container_id: task.id.clone(), ..Default::default() }),
        )
        .await;
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        let task = self.task(&req.id).await?;
        task.sandbox.agent.set_paused(&task.id, false).await.map_err(|err| agent_status(&err))?;
        task.process("")?.set_status(Status::RUNNING);
        self.publish(
            topics::TASK_RESUMED_EVENT_TOPIC,
            Box::new(TaskResumed { container_id: task.id.clone(), ..Default::default() }),
        )
        .await;
        Ok(Empty::new())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: containerd_shim::api::CheckpointTaskRequest,
    ) -> TtrpcResult<Empty> {
        Err(status(
            ttrpc::Code::UNIMPLEMENTED,
            "checkpointing a task of a microVM is not supported by ironclad",
        ))
    }

    async fn connect(&self, _ctx: &TtrpcContext, req: ConnectRequest) -> TtrpcResult<ConnectResponse> {
        let task_pid = match self.task.lock().await.as_ref() {
            Some(task) if task.id == req.id => task.host_pid(),
            _ => 0,
        };
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        if self.task.lock().await.is_none() {
            self.exit.signal();
        }
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_options_give_their_config_path() {
        // runtimeoptions.v1.Options{type_url = "x", config_path = "/etc/ironclad/alt.toml"}
        let mut bytes = vec![0x0a, 1, b'x', 0x12, 22];
        bytes.extend_from_slice(b"/etc/ironclad/alt.toml");
        assert_eq!(runtime_options_config_path(&bytes).unwrap(), "/etc/ironclad/alt.toml");
        assert_eq!(runtime_options_config_path(&[]).unwrap(), "");
        assert!(runtime_options_config_path(&[0x12, 50, b'a']).is_err());
    }

    #[test]
    fn host_files_are_copied_and_host_directories_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("resolv.conf");
        std::fs::write(&file, "nameserver 10.0.0.1\n").unwrap();
        let spec = serde_json::json!({"mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/resolv.conf", "type": "bind", "source": file, "options": ["rbind", "ro"]},
        ]});
        assert_eq!(host_file_mounts(&spec).unwrap(), vec![1]);
        let spec = serde_json::json!({"mounts": [
            {"destination": "/data", "type": "bind", "source": dir.path(), "options": ["rbind"]},
        ]});
        let err = host_file_mounts(&spec).unwrap_err().to_string();
        assert!(err.contains(&dir.path().display().to_string()) && err.contains("/data"), "{err}");
    }

    #[test]
    fn the_guest_is_named_by_the_spec_else_by_a_usable_task_id() {
        assert_eq!(guest_hostname(&serde_json::json!({"hostname": "web"}), "t1"), "web");
        assert_eq!(guest_hostname(&serde_json::json!({}), "t1"), "t1");
        assert_eq!(guest_hostname(&serde_json::json!({"hostname": ""}), "a_b"), "ironclad");
        assert_eq!(guest_hostname(&serde_json::json!({}), &"x".repeat(64)), "ironclad");
    }

    #[test]
    fn metrics_carry_the_agents_figures() {
        let mut stats = ironclad_protocol::agent::StatsContainerResponse::new();
        stats.memory = MessageField::some(ironclad_protocol::agent::MemoryStat {
            usage: 7,
            usage_limit: 32 << 20,
            ..Default::default()
        });
        stats.pids = MessageField::some(ironclad_protocol::agent::PidsStat {
            current: 3,
            limit: 10,
            ..Default::default()
        });
        let metrics = stats_to_metrics(&stats);
        assert_eq!(metrics.memory.usage_limit, 32 << 20);
        assert_eq!((metrics.pids.current, metrics.pids.limit), (3, 10));
    }
}
