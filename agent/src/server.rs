//! The agent's ttrpc server: health and sandbox services over vsock (or a Unix socket in tests).

use std::sync::Arc;

use crate::network;
use async_trait::async_trait;
use ironclad_protocol::agent::{
    health_check_response::ServingStatus, CheckRequest, ContainerRequest, CopyFileRequest, CopyFileResponse,
    CreateContainerRequest, CreateSandboxRequest, CreateSandboxResponse, DestroySandboxRequest, Empty,
    ExecProcessRequest, ExecProcessResponse, HealthCheckResponse, ListProcessesResponse, OomEvent,
    ProcessRef, ReadStreamRequest, ReadStreamResponse, RemoveContainerRequest, SetGuestDateTimeRequest,
    SignalProcessRequest, StartContainerRequest, StartContainerResponse, StatsContainerResponse,
    TtyWinResizeRequest, UpdateContainerRequest, VersionCheckResponse, WaitProcessResponse,
    WriteStreamRequest, WriteStreamResponse,
};
use ironclad_protocol::agent::{
    AddARPNeighborsRequest, Interface, Route, UpdateInterfaceRequest, UpdateRoutesRequest,
};
use ironclad_protocol::{agent_ttrpc, API_VERSION};
use libcontainer::error::LibcontainerError;
use tokio::sync::watch;
use tracing::{info, warn};
use ttrpc::r#async::{Server, TtrpcContext};

use crate::clock::uptime_ms;
use crate::container::{self, Containers};
use crate::copy_file;
use crate::fork_helper::{self, ErrorKind};
use crate::sandbox;
use crate::storage::{self, StorageRequest};

pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {address}")]
    Listen {
        address: String,
        #[source]
        source: ttrpc::Error,
    },
    #[error("ttrpc server failed to start")]
    Start(#[source] ttrpc::Error),
    #[error("cannot install the SIGCHLD handler")]
    Signal(#[source] std::io::Error),
}

struct HealthService;

#[async_trait]
impl agent_ttrpc::Health for HealthService {
    async fn check(&self, _ctx: &TtrpcContext, _req: CheckRequest) -> ttrpc::Result<HealthCheckResponse> {
        let mut resp = HealthCheckResponse::new();
        resp.status = ServingStatus::SERVING.into();
        Ok(resp)
    }

    async fn version(&self, _ctx: &TtrpcContext, _req: CheckRequest) -> ttrpc::Result<VersionCheckResponse> {
        let mut resp = VersionCheckResponse::new();
        resp.agent_version = AGENT_VERSION.to_string();
        resp.api_version = API_VERSION;
        resp.uptime_ms = uptime_ms();
        Ok(resp)
    }
}

struct AgentService {
    /// Turns true when DestroySandbox is called: the server stops, and long polls end at once.
    destroyed: watch::Sender<bool>,
    containers: Arc<Containers>,
    /// PID 1 of a guest: only then may sandbox-wide settings change the machine.
    in_guest: bool,
    /// Whether guest networking may be changed (in a guest, or an agent in its own network namespace).
    network_allowed: bool,
}

fn sandbox_status(err: sandbox::Error) -> ttrpc::Error {
    use sandbox::Error as E;
    let code = match &err {
        E::NotInGuest(_) => ttrpc::Code::FAILED_PRECONDITION,
        E::BadHostname(_) | E::BadDnsServer(_) | E::BadSearchDomain(_) | E::BadTime { .. } => {
            ttrpc::Code::INVALID_ARGUMENT
        }
        E::System { .. } => ttrpc::Code::INTERNAL,
    };
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, ironclad_protocol::error_chain(&err)))
}

/// A failed call that makes or starts a container or process is also said on the console (the
/// shim passes the agent's lines into containerd's log, which outlives the sandbox), with the
/// container's id; then it becomes the call's status.
fn logged_status(call: &str, container_id: &str, err: container::Error) -> ttrpc::Error {
    warn!("container {container_id}: {call} failed: {}", ironclad_protocol::error_chain(&err));
    status(err)
}

/// The ttrpc status for a container error: the code says what kind, the message says why.
fn status(err: container::Error) -> ttrpc::Error {
    use container::Error as E;
    use ttrpc::Code;
    let code = match &err {
        E::InvalidId { .. } | E::InvalidSpec(_) | E::BadRootfs(_) => Code::INVALID_ARGUMENT,
        E::AlreadyExists(_) => Code::ALREADY_EXISTS,
        E::NotFound(_) => Code::NOT_FOUND,
        E::ExecNotFound { .. } => Code::NOT_FOUND,
        E::ExecExists { .. } => Code::ALREADY_EXISTS,
        E::WrongState { .. } => Code::FAILED_PRECONDITION,
        E::StopTimeout { .. } => Code::DEADLINE_EXCEEDED,
        E::Libcontainer { source, .. } => libcontainer_code(source),
        E::Helper { source, .. } => helper_code(source),
        E::Bundle { .. }
        | E::Pipes(_)
        | E::CgroupParent { .. }
        | E::CgroupOpen { .. }
        | E::Cgroup { .. }
        | E::Io { .. }
        | E::Signal { .. }
        | E::Stdio { .. }
        | E::NoPid { .. }
        | E::Blocking { .. }
        | E::Poisoned(_)
        | E::OwnDirectory { .. } => Code::INTERNAL,
        E::Storage(
            storage::Error::BadMountPoint(_) | storage::Error::BadSerial(_) | storage::Error::BadTag(_),
        ) => Code::INVALID_ARGUMENT,
        E::Storage(storage::Error::NoSuchDisk(_)) => Code::NOT_FOUND,
        E::Storage(_) => Code::INTERNAL,
    };
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, ironclad_protocol::error_chain(&err)))
}

fn libcontainer_code(err: &LibcontainerError) -> ttrpc::Code {
    kind_code(ErrorKind::of(err))
}

fn helper_code(err: &fork_helper::Error) -> ttrpc::Code {
    use fork_helper::Error as H;
    match err {
        H::Failed { kind, .. } => kind_code(*kind),
        H::Encode(_)
        | H::Pipe(_)
        | H::Spawn(_)
        | H::Read(_)
        | H::NoReply
        | H::BadReply(_)
        | H::Timeout(_)
        | H::NoPid => ttrpc::Code::INTERNAL,
    }
}

fn kind_code(kind: ErrorKind) -> ttrpc::Code {
    match kind {
        ErrorKind::InvalidArgument => ttrpc::Code::INVALID_ARGUMENT,
        ErrorKind::FailedPrecondition => ttrpc::Code::FAILED_PRECONDITION,
        ErrorKind::AlreadyExists => ttrpc::Code::ALREADY_EXISTS,
        ErrorKind::NotFound => ttrpc::Code::NOT_FOUND,
        ErrorKind::Internal => ttrpc::Code::INTERNAL,
    }
}

fn network_status(err: network::Error) -> ttrpc::Error {
    let code = match &err {
        network::Error::Invalid { .. } => ttrpc::Code::INVALID_ARGUMENT,
        network::Error::NoSuchInterface(_) => ttrpc::Code::NOT_FOUND,
        network::Error::NotIsolated(_) => ttrpc::Code::FAILED_PRECONDITION,
        network::Error::Socket(_) | network::Error::Netlink { .. } => ttrpc::Code::INTERNAL,
    };
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, ironclad_protocol::error_chain(&err)))
}

fn interface_spec(interface: &Interface) -> Result<network::InterfaceSpec, network::Error> {
    let addresses = interface
        .addresses
        .iter()
        .map(|a| {
            let ip = network::parse_ip("address", &a.address)?;
            Ok((ip, network::parse_prefix("prefix_len", &ip, a.prefix_len)?))
        })
        .collect::<Result<Vec<_>, network::Error>>()?;
    let hw_addr = (!interface.hw_addr.is_empty())
        .then(|| network::parse_mac("hw_addr", &interface.hw_addr))
        .transpose()?;
    Ok(network::InterfaceSpec {
        name: interface.name.clone(),
        addresses,
        mtu: (interface.mtu != 0).then_some(interface.mtu),
        hw_addr,
        up: interface.up,
    })
}

fn route_spec(route: &Route) -> Result<network::RouteSpec, network::Error> {
    let destination = match route.destination.as_str() {
        "default" | "" => None,
        cidr => Some(network::parse_cidr("destination", cidr)?),
    };
    let gateway =
        (!route.gateway.is_empty()).then(|| network::parse_ip("gateway", &route.gateway)).transpose()?;
    let device = (!route.device.is_empty()).then(|| route.device.clone());
    Ok(network::RouteSpec { destination, gateway, device })
}

fn process_of(process: &protobuf::MessageField<ProcessRef>) -> (String, String) {
    process.as_ref().map(|p| (p.container_id.clone(), p.exec_id.clone())).unwrap_or_default()
}

#[async_trait]
impl agent_ttrpc::Agent for AgentService {
    async fn create_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: CreateSandboxRequest,
    ) -> ttrpc::Result<CreateSandboxResponse> {
        let shared = self.containers.shared_dir();
        let resolv =
            sandbox::create(self.in_guest, &shared, &req.hostname, &req.dns_servers, &req.dns_search)
                .map_err(sandbox_status)?;
        info!("sandbox {} created", req.sandbox_id);
        let mut resp = CreateSandboxResponse::new();
        resp.resolv_conf = resolv.display().to_string();
        Ok(resp)
    }

    async fn set_guest_date_time(
        &self,
        _ctx: &TtrpcContext,
        req: SetGuestDateTimeRequest,
    ) -> ttrpc::Result<Empty> {
        sandbox::set_date_time(self.in_guest, req.sec, req.usec).map_err(sandbox_status)?;
        Ok(Empty::new())
    }

    async fn destroy_sandbox(
        &self,
        _ctx: &TtrpcContext,
        _req: DestroySandboxRequest,
    ) -> ttrpc::Result<Empty> {
        info!("sandbox destroy requested");
        // A second call finds it true already, which is what that caller wants.
        self.destroyed.send_replace(true);
        Ok(Empty::new())
    }

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        let rootfs = std::path::PathBuf::from(&req.rootfs);
        let storages: Vec<StorageRequest> = req
            .storages
            .iter()
            .map(|s| StorageRequest {
                serial: s.serial.clone(),
                source: s.source.clone(),
                fstype: s.fstype.clone(),
                options: s.options.clone(),
                mount_point: s.mount_point.clone(),
                read_only: s.read_only,
            })
            .collect();
        self.containers
            .create(
                &req.container_id,
                &req.oci_spec_json,
                &rootfs,
                &storages,
                req.rootfs_overlay,
                &req.sandbox_container,
            )
            .await
            .map_err(|err| logged_status("CreateContainer", &req.container_id, err))?;
        info!("container {} created", req.container_id);
        Ok(Empty::new())
    }

    async fn start_container(
        &self,
        _ctx: &TtrpcContext,
        req: StartContainerRequest,
    ) -> ttrpc::Result<StartContainerResponse> {
        let pid = self
            .containers
            .start(&req.container_id)
            .await
            .map_err(|err| logged_status("StartContainer", &req.container_id, err))?;
        let mut resp = StartContainerResponse::new();
        resp.pid = pid;
        Ok(resp)
    }

    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<ExecProcessResponse> {
        let pid = self
            .containers
            .exec(&req.container_id, &req.exec_id, &req.process_json)
            .await
            .map_err(|err| logged_status("ExecProcess", &req.container_id, err))?;
        let mut resp = ExecProcessResponse::new();
        resp.pid = pid;
        Ok(resp)
    }

    async fn wait_process(&self, _ctx: &TtrpcContext, req: ProcessRef) -> ttrpc::Result<WaitProcessResponse> {
        let waited = self.containers.wait(&req.container_id, &req.exec_id);
        let code = self.unless_destroyed(async { waited.await.map_err(status) }).await?;
        let mut resp = WaitProcessResponse::new();
        resp.exit_status = code;
        Ok(resp)
    }

    async fn read_stdout(
        &self,
        _ctx: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> ttrpc::Result<ReadStreamResponse> {
        self.unless_destroyed(self.read_stream(req, false)).await
    }

    async fn read_stderr(
        &self,
        _ctx: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> ttrpc::Result<ReadStreamResponse> {
        self.unless_destroyed(self.read_stream(req, true)).await
    }

    async fn write_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: WriteStreamRequest,
    ) -> ttrpc::Result<WriteStreamResponse> {
        let (id, exec_id) = process_of(&req.process);
        let written = self.containers.write_stdin(&id, &exec_id, &req.data).await.map_err(status)?;
        let mut resp = WriteStreamResponse::new();
        resp.written = u32::try_from(written).unwrap_or(u32::MAX);
        Ok(resp)
    }

    async fn close_stdin(&self, _ctx: &TtrpcContext, req: ProcessRef) -> ttrpc::Result<Empty> {
        self.containers.close_stdin(&req.container_id, &req.exec_id).await.map_err(status)?;
        Ok(Empty::new())
    }

    async fn tty_win_resize(&self, _ctx: &TtrpcContext, req: TtyWinResizeRequest) -> ttrpc::Result<Empty> {
        let (id, exec_id) = process_of(&req.process);
        let (Ok(rows), Ok(cols)) = (u16::try_from(req.rows), u16::try_from(req.cols)) else {
            let reason = format!("window size {}x{} does not fit a terminal", req.rows, req.cols);
            return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(ttrpc::Code::INVALID_ARGUMENT, reason)));
        };
        self.containers.resize_terminal(&id, &exec_id, rows, cols).await.map_err(status)?;
        Ok(Empty::new())
    }

    async fn signal_process(&self, _ctx: &TtrpcContext, req: SignalProcessRequest) -> ttrpc::Result<Empty> {
        let (id, exec_id) = process_of(&req.process);
        if req.all {
            self.containers.signal_all(&id, req.signal).await.map_err(status)?;
        } else {
            self.containers.signal(&id, &exec_id, req.signal).await.map_err(status)?;
        }
        Ok(Empty::new())
    }

    async fn list_processes(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<ListProcessesResponse> {
        let pids = self.containers.processes(&req.container_id).await.map_err(status)?;
        Ok(ListProcessesResponse { pids, ..Default::default() })
    }

    async fn update_interface(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateInterfaceRequest,
    ) -> ttrpc::Result<Interface> {
        let interface = req.interface.clone().unwrap_or_default();
        let spec = interface_spec(&interface).map_err(network_status)?;
        network::check_allowed(self.network_allowed, "network interfaces").map_err(network_status)?;
        network::update_interface(&spec).await.map_err(network_status)?;
        info!("interface {} updated", spec.name);
        Ok(interface)
    }

    async fn update_routes(&self, _ctx: &TtrpcContext, req: UpdateRoutesRequest) -> ttrpc::Result<Empty> {
        let routes =
            req.routes.iter().map(route_spec).collect::<Result<Vec<_>, _>>().map_err(network_status)?;
        network::check_allowed(self.network_allowed, "routes").map_err(network_status)?;
        network::update_routes(&routes).await.map_err(network_status)?;
        Ok(Empty::new())
    }

    async fn add_arp_neighbors(
        &self,
        _ctx: &TtrpcContext,
        req: AddARPNeighborsRequest,
    ) -> ttrpc::Result<Empty> {
        let neighbors = req
            .neighbors
            .iter()
            .map(|n| {
                Ok(network::NeighborSpec {
                    ip: network::parse_ip("ip_address", &n.ip_address)?,
                    hw_addr: network::parse_mac("hw_addr", &n.hw_addr)?,
                    device: n.device.clone(),
                })
            })
            .collect::<Result<Vec<_>, network::Error>>()
            .map_err(network_status)?;
        network::check_allowed(self.network_allowed, "ARP neighbours").map_err(network_status)?;
        network::add_neighbors(&neighbors).await.map_err(network_status)?;
        Ok(Empty::new())
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers.update(&req.container_id, &req.resources_json).await.map_err(status)?;
        Ok(Empty::new())
    }

    async fn pause_container(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<Empty> {
        self.containers.set_paused(&req.container_id, true).await.map_err(status)?;
        Ok(Empty::new())
    }

    async fn resume_container(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<Empty> {
        self.containers.set_paused(&req.container_id, false).await.map_err(status)?;
        Ok(Empty::new())
    }

    async fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<StatsContainerResponse> {
        self.containers.stats(&req.container_id).await.map_err(status)
    }

    async fn copy_file(&self, _ctx: &TtrpcContext, req: CopyFileRequest) -> ttrpc::Result<CopyFileResponse> {
        let base = self.containers.shared_dir();
        let written =
            copy_file::copy_file(&base, &req.path, &req.data, req.mode, req.uid, req.gid).map_err(|err| {
                let code = match err {
                    copy_file::Error::Io { .. } => ttrpc::Code::INTERNAL,
                    _ => ttrpc::Code::INVALID_ARGUMENT,
                };
                ttrpc::Error::RpcStatus(ttrpc::get_status(code, ironclad_protocol::error_chain(&err)))
            })?;
        let mut resp = CopyFileResponse::new();
        resp.guest_path = written.display().to_string();
        Ok(resp)
    }

    async fn get_oom_event(&self, _ctx: &TtrpcContext, _req: Empty) -> ttrpc::Result<OomEvent> {
        let next = async {
            self.containers.next_oom_event().await.ok_or_else(|| shutting_down("the agent is shutting down"))
        };
        let id = self.unless_destroyed(next).await?;
        let mut event = OomEvent::new();
        event.container_id = id;
        Ok(event)
    }

    async fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: RemoveContainerRequest,
    ) -> ttrpc::Result<Empty> {
        let timeout = std::time::Duration::from_millis(u64::from(req.timeout_ms));
        self.containers.remove(&req.container_id, timeout).await.map_err(status)?;
        info!("container {} removed", req.container_id);
        Ok(Empty::new())
    }
}

fn shutting_down(why: &str) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(ttrpc::Code::UNAVAILABLE, why))
}

impl AgentService {
    /// Ends a long poll (a wait, an output read, the next OOM event) when the sandbox is destroyed:
    /// none ends by itself, and the server's shutdown waits for every call in flight, so one left
    /// open held the VM's end back by the whole shutdown grace.
    async fn unless_destroyed<T>(
        &self,
        call: impl std::future::Future<Output = ttrpc::Result<T>>,
    ) -> ttrpc::Result<T> {
        let mut destroyed = self.destroyed.subscribe();
        tokio::select! {
            result = call => result,
            _ = destroyed.wait_for(|destroyed| *destroyed) => Err(shutting_down("the sandbox is being destroyed")),
        }
    }

    async fn read_stream(&self, req: ReadStreamRequest, stderr: bool) -> ttrpc::Result<ReadStreamResponse> {
        let (id, exec_id) = process_of(&req.process);
        let max = usize::try_from(req.max_bytes).unwrap_or(container::CHUNK_SIZE);
        let data = self.containers.read_output(&id, &exec_id, stderr, max).await.map_err(status)?;
        let mut resp = ReadStreamResponse::new();
        resp.data = data;
        Ok(resp)
    }
}

/// Serves until DestroySandbox is called, then stops the server (letting the reply go out first).
/// How long in-flight calls get to finish once the sandbox is destroyed.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_millis(500);
/// How long DestroySandbox's answer has to reach the connection's writer before the shutdown.
const DESTROY_ANSWER_HEADSTART: std::time::Duration = std::time::Duration::from_millis(20);

pub async fn serve(
    address: &str,
    containers: Arc<Containers>,
    in_guest: bool,
    network_allowed: bool,
) -> Result<(), Error> {
    let (destroyed, mut destroy_requested) = watch::channel(false);
    let health: Arc<dyn agent_ttrpc::Health + Send + Sync> = Arc::new(HealthService);
    let agent: Arc<dyn agent_ttrpc::Agent + Send + Sync> =
        Arc::new(AgentService { destroyed, containers, in_guest, network_allowed });
    let mut server = Server::new()
        .bind(address)
        .map_err(|source| Error::Listen { address: address.to_string(), source })?
        .register_service(agent_ttrpc::create_health(health))
        .register_service(agent_ttrpc::create_agent(agent));
    server.start().await.map_err(Error::Start)?;
    let init_ms = crate::clock::agent_start_ms();
    println!("{}", ironclad_protocol::ready_line(AGENT_VERSION, uptime_ms(), init_ms));
    info!("serving the agent API on {address}");
    // An error means the service, and with it the sender, is gone: nothing is left to serve.
    let _ = destroy_requested.wait_for(|destroyed| *destroyed).await;
    // The shutdown drops handlers that have not queued their answer yet, and the VM resets right
    // after it: DestroySandbox's own answer gets a head start.
    tokio::time::sleep(DESTROY_ANSWER_HEADSTART).await;
    // Graceful: in-flight replies, the DestroySandbox answer among them, are written before we return
    // (long polls have ended with the destroy). Bounded: a call stuck in the guest does not hold
    // the VM up.
    if tokio::time::timeout(SHUTDOWN_GRACE, server.shutdown()).await.is_err() {
        info!("calls were still open after {SHUTDOWN_GRACE:?}; going down anyway");
    }
    info!("agent server stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libcontainer_errors_keep_their_kind() {
        use libcontainer::container::ContainerStatus;
        use libcontainer::error::{ErrInvalidID, MissingSpecError};
        let code = |err| {
            status(container::Error::Libcontainer {
                id: "c1".into(),
                action: "create",
                said: String::new(),
                source: Box::new(err),
            })
        };
        let code_of = |err| match code(err) {
            ttrpc::Error::RpcStatus(status) => status.code(),
            other => panic!("not a status: {other:?}"),
        };
        assert_eq!(code_of(LibcontainerError::InvalidID(ErrInvalidID::Empty)), ttrpc::Code::INVALID_ARGUMENT);
        assert_eq!(
            code_of(LibcontainerError::MissingSpec(MissingSpecError::Args)),
            ttrpc::Code::INVALID_ARGUMENT
        );
        assert_eq!(
            code_of(LibcontainerError::IncorrectStatus(ContainerStatus::Stopped)),
            ttrpc::Code::FAILED_PRECONDITION
        );
        assert_eq!(code_of(LibcontainerError::NoDirectory), ttrpc::Code::NOT_FOUND);
        assert_eq!(code_of(LibcontainerError::Exist), ttrpc::Code::ALREADY_EXISTS);
        assert_eq!(code_of(LibcontainerError::Other("fork failed".into())), ttrpc::Code::INTERNAL);
        let ttrpc::Error::RpcStatus(status) = code(LibcontainerError::MissingSpec(MissingSpecError::Args))
        else {
            panic!("not a status")
        };
        assert_eq!(
            status.message(),
            "libcontainer failed to create container \"c1\": missing args in the process spec"
        );
    }

    #[test]
    fn a_helpers_failure_keeps_libcontainers_kind() {
        let status_of = |source| match status(container::Error::Helper {
            id: "c1".into(),
            action: "create",
            said: String::new(),
            source,
        }) {
            ttrpc::Error::RpcStatus(status) => status,
            other => panic!("not a status: {other:?}"),
        };
        let failed =
            |kind| fork_helper::Error::Failed { kind, message: "missing args in the process spec".into() };
        let invalid = status_of(failed(ErrorKind::InvalidArgument));
        assert_eq!(invalid.code(), ttrpc::Code::INVALID_ARGUMENT);
        assert_eq!(invalid.message(), "cannot create container \"c1\": missing args in the process spec");
        assert_eq!(status_of(failed(ErrorKind::NotFound)).code(), ttrpc::Code::NOT_FOUND);
        assert_eq!(status_of(failed(ErrorKind::FailedPrecondition)).code(), ttrpc::Code::FAILED_PRECONDITION);
        let timeout = fork_helper::Error::Timeout(std::time::Duration::from_secs(30));
        assert_eq!(status_of(timeout).code(), ttrpc::Code::INTERNAL);
    }
}
