//! The shim's side of the agent API: a ttrpc client over hybrid vsock.
//!
//! Hybrid vsock is Firecracker's scheme, which vhost-device-vsock and ironclad-vmm both offer: the
//! host connects to a Unix socket, writes `CONNECT <port>\n`, and once the answer `OK <host port>\n`
//! has arrived the stream is a plain byte pipe to the guest's vsock port.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ironclad_protocol::agent::health_check_response::ServingStatus;
use ironclad_protocol::agent::{
    CheckRequest, ContainerRequest, CopyFileRequest, CreateContainerRequest, CreateSandboxRequest,
    DestroySandboxRequest, ExecProcessRequest, Interface, ProcessRef, ReadStreamRequest,
    RemoveContainerRequest, SetGuestDateTimeRequest, SignalProcessRequest, StartContainerRequest,
    TtyWinResizeRequest, UpdateContainerRequest, UpdateInterfaceRequest, UpdateRoutesRequest,
    VersionCheckResponse, WriteStreamRequest,
};
use ironclad_protocol::agent_ttrpc::{AgentClient as AgentRpc, HealthClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use ttrpc::asynchronous::transport::Socket;
use ttrpc::context;

/// The vsock port the agent serves on inside the guest.
pub use ironclad_protocol::AGENT_VSOCK_PORT as AGENT_PORT;

/// The longest handshake answer we accept: `OK ` and a u32 port and a newline fit easily.
const MAX_HANDSHAKE_LINE: usize = 32;
const RETRY_INTERVAL: Duration = Duration::from_millis(50);
/// How long one handshake may take: a peer that accepts and never answers is given up on.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// Setting the clock is a moment's work, and a failure only a warning: a guest that does not answer
/// it does not hold up the start for a whole call deadline.
const CLOCK_CALL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to the hybrid vsock socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("hybrid vsock handshake for port {port} failed")]
    Handshake {
        port: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("hybrid vsock peer refused port {port}: answered {answer:?}")]
    Refused { port: u32, answer: String },
    #[error("the agent on {path} port {port} did not answer within {waited:?}; last error: {last}")]
    Timeout { path: PathBuf, port: u32, waited: Duration, last: String },
    #[error("agent call {call} failed")]
    Rpc {
        call: &'static str,
        #[source]
        source: ttrpc::Error,
    },
    #[error("the agent reports {status:?}")]
    NotServing { status: ServingStatus },
    #[error("agent call {call} got no answer within {waited:?}")]
    NoAnswer { call: &'static str, waited: Duration },
    #[error("hybrid vsock handshake for port {port} got no answer within {waited:?}")]
    HandshakeTimeout { port: u32, waited: Duration },
}

/// Opens a stream to guest vsock `port` through the hybrid vsock Unix socket at `path`, within
/// HANDSHAKE_TIMEOUT.
pub async fn connect_hybrid_vsock(path: &Path, port: u32) -> Result<UnixStream, Error> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(path, port))
        .await
        .map_err(|_| Error::HandshakeTimeout { port, waited: HANDSHAKE_TIMEOUT })?
}

async fn handshake(path: &Path, port: u32) -> Result<UnixStream, Error> {
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(|source| Error::Connect { path: path.to_path_buf(), source })?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|source| Error::Handshake { port, source })?;
    let answer =
        read_handshake_line(&mut stream).await.map_err(|source| Error::Handshake { port, source })?;
    parse_handshake_answer(&answer).ok_or(Error::Refused { port, answer })?;
    Ok(stream)
}

/// Reads up to and including the first newline, one byte at a time: anything after it already
/// belongs to the guest's stream and must stay in the socket.
async fn read_handshake_line(stream: &mut UnixStream) -> std::io::Result<String> {
    let mut line = Vec::with_capacity(MAX_HANDSHAKE_LINE);
    while line.len() < MAX_HANDSHAKE_LINE {
        let byte = stream.read_u8().await?;
        line.push(byte);
        if byte == b'\n' {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// `OK <host port>\n` gives the host-side port number; anything else is a refusal.
pub fn parse_handshake_answer(answer: &str) -> Option<u32> {
    answer.strip_prefix("OK ")?.strip_suffix('\n')?.parse().ok()
}

/// A call context whose deadline is `timeout` from now.
fn within(timeout: Duration) -> ttrpc::context::Context {
    context::with_timeout(i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX))
}

/// A connected agent: one ttrpc connection carrying every service.
#[derive(Clone)]
pub struct AgentClient {
    health: HealthClient,
    agent: AgentRpc,
    timeout: Duration,
    /// The most bytes of output one read asks the agent for (0: the agent's chunk size).
    output_chunk: u32,
}

impl AgentClient {
    /// Connects, retrying until `wait` has passed: a guest that is still booting resets the connection.
    pub async fn connect(path: &Path, port: u32, wait: Duration) -> Result<Self, Error> {
        let started = Instant::now();
        loop {
            let last = match connect_hybrid_vsock(path, port).await {
                Ok(stream) => return Ok(Self::over(stream)),
                Err(err) => crate::hypervisor::error_chain(&err),
            };
            if started.elapsed() >= wait {
                return Err(Error::Timeout {
                    path: path.to_path_buf(),
                    port,
                    waited: started.elapsed(),
                    last,
                });
            }
            tokio::time::sleep(RETRY_INTERVAL).await;
        }
    }

    /// Speaks ttrpc over an already connected stream.
    pub fn over(stream: UnixStream) -> Self {
        let client = ttrpc::r#async::Client::new(Socket::new(stream));
        AgentClient {
            health: HealthClient::new(client.clone()),
            agent: AgentRpc::new(client),
            timeout: Duration::from_secs(30),
            output_chunk: 0,
        }
    }

    /// Asks for at most `max` bytes of output per read: the answer must fit what the VM's vsock
    /// device carries in one piece (see `GuestVm::guest_message_limit`).
    pub fn with_output_chunk(mut self, max: u32) -> Self {
        self.output_chunk = max;
        self
    }

    fn ctx(&self) -> ttrpc::context::Context {
        within(self.timeout)
    }

    /// Succeeds only when the agent says it is serving.
    pub async fn check(&self) -> Result<(), Error> {
        let resp = self
            .health
            .check(self.ctx(), &CheckRequest::new())
            .await
            .map_err(|source| Error::Rpc { call: "Health.Check", source })?;
        match resp.status.enum_value_or_default() {
            ServingStatus::SERVING => Ok(()),
            status => Err(Error::NotServing { status }),
        }
    }

    pub async fn version(&self) -> Result<VersionCheckResponse, Error> {
        self.health
            .version(self.ctx(), &CheckRequest::new())
            .await
            .map_err(|source| Error::Rpc { call: "Health.Version", source })
    }

    pub async fn create_container(&self, request: &CreateContainerRequest) -> Result<(), Error> {
        self.agent
            .create_container(self.ctx(), request)
            .await
            .map(|_| ())
            .map_err(|source| Error::Rpc { call: "Agent.CreateContainer", source })
    }

    /// Starts a created container; returns its init process's pid in the guest.
    pub async fn start_container(&self, container_id: &str) -> Result<u32, Error> {
        let mut request = StartContainerRequest::new();
        request.container_id = container_id.into();
        self.agent
            .start_container(self.ctx(), &request)
            .await
            .map(|r| r.pid)
            .map_err(|source| Error::Rpc { call: "Agent.StartContainer", source })
    }

    /// The exit status of a container's process (128 + signal when killed).
    pub async fn wait_process(&self, container_id: &str, exec_id: &str) -> Result<i32, Error> {
        self.agent
            .wait_process(self.ctx_without_timeout(), &process_ref(container_id, exec_id))
            .await
            .map(|r| r.exit_status)
            .map_err(|source| Error::Rpc { call: "Agent.WaitProcess", source })
    }

    /// The next chunk of a process's stdout (or stderr); empty once it has ended.
    pub async fn read_output(
        &self,
        container_id: &str,
        exec_id: &str,
        stderr: bool,
    ) -> Result<Vec<u8>, Error> {
        let mut request = ReadStreamRequest::new();
        request.process = Some(process_ref(container_id, exec_id)).into();
        request.max_bytes = self.output_chunk;
        let ctx = self.ctx_without_timeout();
        let response = if stderr {
            self.agent
                .read_stderr(ctx, &request)
                .await
                .map_err(|source| Error::Rpc { call: "Agent.ReadStderr", source })
        } else {
            self.agent
                .read_stdout(ctx, &request)
                .await
                .map_err(|source| Error::Rpc { call: "Agent.ReadStdout", source })
        };
        response.map(|r| r.data)
    }

    /// The next chunk of a process's stdout; empty once it has ended.
    pub async fn read_stdout(&self, container_id: &str, exec_id: &str) -> Result<Vec<u8>, Error> {
        self.read_output(container_id, exec_id, false).await
    }

    /// Writes all of `data` to the process's stdin (the agent may take it in parts).
    pub async fn write_stdin(&self, container_id: &str, exec_id: &str, mut data: &[u8]) -> Result<(), Error> {
        while !data.is_empty() {
            let mut request = WriteStreamRequest::new();
            request.process = Some(process_ref(container_id, exec_id)).into();
            request.data = data.to_vec();
            let written = self
                .agent
                .write_stdin(self.ctx_without_timeout(), &request)
                .await
                .map_err(|source| Error::Rpc { call: "Agent.WriteStdin", source })?
                .written as usize;
            data = &data[written.clamp(1, data.len())..];
        }
        Ok(())
    }

    pub async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), Error> {
        self.agent
            .close_stdin(self.ctx(), &process_ref(container_id, exec_id))
            .await
            .map(|_| ())
            .map_err(|source| Error::Rpc { call: "Agent.CloseStdin", source })
    }

    /// Starts `process_json` (an OCI process object) in the running container; returns its guest pid.
    pub async fn exec_process(
        &self,
        container_id: &str,
        exec_id: &str,
        process_json: &str,
    ) -> Result<u32, Error> {
        let mut request = ExecProcessRequest::new();
        request.container_id = container_id.into();
        request.exec_id = exec_id.into();
        request.process_json = process_json.into();
        self.agent
            .exec_process(self.ctx(), &request)
            .await
            .map(|r| r.pid)
            .map_err(|source| Error::Rpc { call: "Agent.ExecProcess", source })
    }

    /// Signals one process, or with `all` every process of the container.
    pub async fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), Error> {
        let mut request = SignalProcessRequest::new();
        request.process = Some(process_ref(container_id, exec_id)).into();
        request.signal = signal;
        request.all = all;
        self.agent
            .signal_process(self.ctx(), &request)
            .await
            .map(|_| ())
            .map_err(|source| Error::Rpc { call: "Agent.SignalProcess", source })
    }

    pub async fn resize_terminal(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), Error> {
        let mut request = TtyWinResizeRequest::new();
        request.process = Some(process_ref(container_id, exec_id)).into();
        request.rows = rows;
        request.cols = cols;
        self.agent
            .tty_win_resize(self.ctx(), &request)
            .await
            .map(|_| ())
            .map_err(|source| Error::Rpc { call: "Agent.TtyWinResize", source })
    }

    /// Freezes (or thaws) the container.
    pub async fn set_paused(&self, container_id: &str, paused: bool) -> Result<(), Error> {
        let request = container_request(container_id);
        if paused {
            self.agent
                .pause_container(self.ctx(), &request)
                .await
                .map_err(|source| Error::Rpc { call: "Agent.PauseContainer", source })?;
        } else {
            self.agent
                .resume_container(self.ctx(), &request)
                .await
                .map_err(|source| Error::Rpc { call: "Agent.ResumeContainer", source })?;
        }
        Ok(())
    }

    pub async fn list_processes(&self, container_id: &str) -> Result<Vec<u32>, Error> {
        self.agent
            .list_processes(self.ctx(), &container_request(container_id))
            .await
            .map(|r| r.pids)
            .map_err(|source| Error::Rpc { call: "Agent.ListProcesses", source })
    }

    /// New cgroup limits: `resources_json` is an OCI `linux.resources` object.
    pub async fn update_container(&self, container_id: &str, resources_json: &str) -> Result<(), Error> {
        let mut request = UpdateContainerRequest::new();
        request.container_id = container_id.into();
        request.resources_json = resources_json.into();
        self.agent
            .update_container(self.ctx(), &request)
            .await
            .map(|_| ())
            .map_err(|source| Error::Rpc { call: "Agent.UpdateContainer", source })
    }

    /// Writes a file into the guest's shared directory; returns its path in the guest.
    pub async fn copy_file(&self, request: &CopyFileRequest) -> Result<String, Error> {
        self.agent
            .copy_file(self.ctx(), request)
            .await
            .map(|r| r.guest_path)
            .map_err(|source| Error::Rpc { call: "Agent.CopyFile", source })
    }

    /// Names the guest (the hostname containers without a UTS namespace of their own see).
    pub async fn create_sandbox(&self, sandbox_id: &str, hostname: &str) -> Result<(), Error> {
        let mut request = CreateSandboxRequest::new();
        request.sandbox_id = sandbox_id.into();
        request.hostname = hostname.into();
        self.agent
            .create_sandbox(self.ctx(), &request)
            .await
            .map(|_| ())
            .map_err(|source| Error::Rpc { call: "Agent.CreateSandbox", source })
    }

    /// Sets the guest's wall clock to the host's: the guest has no battery-backed clock.
    pub async fn sync_clock(&self) -> Result<(), Error> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let mut request = SetGuestDateTimeRequest::new();
        request.sec = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        request.usec = i64::from(now.subsec_micros());
        self.agent
            .set_guest_date_time(within(CLOCK_CALL_TIMEOUT.min(self.timeout)), &request)
            .await
            .map(|_| ())
            .map_err(|source| Error::Rpc { call: "Agent.SetGuestDateTime", source })
    }

    /// Sets a guest interface's addresses (replacing others), MTU, MAC and state.
    pub async fn update_interface(&self, interface: Interface) -> Result<(), Error> {
        let mut request = UpdateInterfaceRequest::new();
        request.interface = Some(interface).into();
        self.agent
            .update_interface(self.ctx(), &request)
            .await
            .map(|_| ())
            .map_err(|source| Error::Rpc { call: "Agent.UpdateInterface", source })
    }

    /// Adds routes in the guest, each replacing any route to the same destination.
    pub async fn update_routes(&self, routes: Vec<ironclad_protocol::agent::Route>) -> Result<(), Error> {
        let mut request = UpdateRoutesRequest::new();
        request.routes = routes;
        self.agent
            .update_routes(self.ctx(), &request)
            .await
            .map(|_| ())
            .map_err(|source| Error::Rpc { call: "Agent.UpdateRoutes", source })
    }

    /// Adds static neighbour (ARP/NDP) entries in the guest.
    pub async fn add_arp_neighbors(
        &self,
        neighbors: Vec<ironclad_protocol::agent::ARPNeighbor>,
    ) -> Result<(), Error> {
        let mut request = ironclad_protocol::agent::AddARPNeighborsRequest::new();
        request.neighbors = neighbors;
        self.agent
            .add_arp_neighbors(self.ctx(), &request)
            .await
            .map(|_| ())
            .map_err(|source| Error::Rpc { call: "Agent.AddARPNeighbors", source })
    }

    pub async fn remove_container(&self, container_id: &str) -> Result<(), Error> {
        let mut request = RemoveContainerRequest::new();
        request.container_id = container_id.into();
        self.agent
            .remove_container(self.ctx(), &request)
            .await
            .map(|_| ())
            .map_err(|source| Error::Rpc { call: "Agent.RemoveContainer", source })
    }

    /// The container's cgroup v2 figures (containerd's cgroups v2 Metrics, field for field).
    pub async fn stats_container(
        &self,
        container_id: &str,
    ) -> Result<ironclad_protocol::agent::StatsContainerResponse, Error> {
        self.agent
            .stats_container(self.ctx(), &container_request(container_id))
            .await
            .map_err(|source| Error::Rpc { call: "Agent.StatsContainer", source })
    }

    /// Waits for the next OOM kill in any container of the sandbox; names the container.
    pub async fn get_oom_event(&self) -> Result<String, Error> {
        self.agent
            .get_oom_event(self.ctx_without_timeout(), &ironclad_protocol::agent::Empty::new())
            .await
            .map(|e| e.container_id)
            .map_err(|source| Error::Rpc { call: "Agent.GetOOMEvent", source })
    }

    /// The generated client, for calls this type does not wrap yet.
    pub fn agent_rpc(&self) -> &AgentRpc {
        &self.agent
    }

    /// For calls that last as long as the process does.
    fn ctx_without_timeout(&self) -> ttrpc::context::Context {
        context::Context::default()
    }

    /// Asks the agent to end the sandbox; the VM resets and its monitor exits afterwards. The
    /// connection closing before the answer arrives is that same end, reached first (the caller
    /// sees the VM's exit either way); only an answer saying no is an error.
    pub async fn destroy_sandbox(&self) -> Result<(), Error> {
        match self.agent.destroy_sandbox(self.ctx(), &DestroySandboxRequest::new()).await {
            Ok(_) => Ok(()),
            Err(ttrpc::Error::Socket(_) | ttrpc::Error::RemoteClosed | ttrpc::Error::Eof) => {
                tracing::debug!(
                    "the agent's connection closed before its DestroySandbox answer: the VM is going"
                );
                Ok(())
            }
            Err(source) => Err(Error::Rpc { call: "Agent.DestroySandbox", source }),
        }
    }
}

fn process_ref(container_id: &str, exec_id: &str) -> ProcessRef {
    let mut process = ProcessRef::new();
    process.container_id = container_id.into();
    process.exec_id = exec_id.into();
    process
}

fn container_request(container_id: &str) -> ContainerRequest {
    let mut request = ContainerRequest::new();
    request.container_id = container_id.into();
    request
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    #[test]
    fn parses_the_ok_answer_and_nothing_else() {
        assert_eq!(parse_handshake_answer("OK 1073741824\n"), Some(1_073_741_824));
        assert_eq!(parse_handshake_answer("OK 1024"), None);
        assert_eq!(parse_handshake_answer("ERR 1024\n"), None);
        assert_eq!(parse_handshake_answer("OK x\n"), None);
        assert_eq!(parse_handshake_answer(""), None);
    }

    /// A stand-in for the hybrid vsock muxer: answers the handshake, then echoes bytes.
    async fn fake_muxer(listener: UnixListener, answer: &'static str) -> Vec<u8> {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        while !request.ends_with(b"\n") {
            request.push(stream.read_u8().await.unwrap());
        }
        // The answer and the first payload bytes arrive together: the client must not eat the payload.
        stream.write_all(format!("{answer}payload").as_bytes()).await.unwrap();
        request
    }

    #[tokio::test]
    async fn handshake_sends_connect_and_leaves_payload_in_the_stream() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(fake_muxer(listener, "OK 52\n"));
        let mut stream = connect_hybrid_vsock(&path, 1024).await.unwrap();
        let mut payload = [0u8; 7];
        stream.read_exact(&mut payload).await.unwrap();
        assert_eq!(&payload, b"payload");
        assert_eq!(server.await.unwrap(), b"CONNECT 1024\n");
    }

    #[tokio::test]
    async fn refusal_is_reported_with_the_answer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(fake_muxer(listener, "NO\n"));
        let err = connect_hybrid_vsock(&path, 7).await.unwrap_err();
        assert!(matches!(&err, Error::Refused { port: 7, answer } if answer == "NO\n"), "{err}");
    }

    /// A guest that accepts the connection, takes one request and goes away without answering, as
    /// a VM resetting under its agent does.
    async fn vanishing_guest(listener: UnixListener) {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            while stream.read_u8().await.is_ok_and(|b| b != b'\n') {}
            stream.write_all(b"OK 1\n").await.unwrap();
            let mut request = [0u8; 16];
            let _ = stream.read(&mut request).await;
        }
    }

    #[tokio::test]
    async fn a_sandbox_that_goes_before_answering_destroy_is_destroyed_but_other_calls_fail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(vanishing_guest(listener));
        let client = AgentClient::connect(&path, 1024, Duration::from_secs(5)).await.unwrap();
        client.destroy_sandbox().await.unwrap();
        let client = AgentClient::connect(&path, 1024, Duration::from_secs(5)).await.unwrap();
        assert!(matches!(client.check().await, Err(Error::Rpc { call: "Health.Check", .. })));
    }

    #[tokio::test]
    async fn a_peer_that_accepts_and_never_answers_does_not_hold_the_connect() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        // Accepts every connection and keeps it, silent.
        let silent = tokio::spawn(async move {
            let mut kept = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                kept.push(stream);
            }
        });
        let started = Instant::now();
        let attempt = tokio::time::timeout(
            Duration::from_secs(20),
            AgentClient::connect(&path, 1024, Duration::from_secs(3)),
        )
        .await
        .expect("connect must give up by itself");
        let err = attempt.err().unwrap();
        assert!(matches!(&err, Error::Timeout { last, .. } if last.contains("no answer")), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(3) + HANDSHAKE_TIMEOUT * 2,
            "{:?}",
            started.elapsed()
        );
        silent.abort();
    }

    #[tokio::test]
    async fn connect_gives_up_after_the_wait_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.sock");
        let err = AgentClient::connect(&path, 1024, Duration::from_millis(200)).await.err().unwrap();
        assert!(matches!(&err, Error::Timeout { last, .. } if last.contains("absent.sock")), "{err}");
    }
}
