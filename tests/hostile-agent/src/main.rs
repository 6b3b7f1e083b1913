//! `ironclad-hostile-agent`: PID 1 of a test initrd whose agent lies on purpose, so that the tests
//! in tests/tests/hostile.rs can check the shim contains a hostile guest (issue 13, point 2).
//!
//! It announces itself with the real agent's ready line, then misbehaves on the agent's vsock port
//! in the way `ironclad_hostile=MODE` on the kernel command line names (the kernel hands unknown
//! `key=value` words to init as environment variables):
//! - `silent`: accepts every connection, reads every request and never answers;
//! - `garbage`: answers every connection with a frame header claiming a 4 GiB message, then noise;
//! - `wrong-ids`: answers each request with a well-formed response for a stream that was never
//!   opened;
//! - `endless-output`: serves the agent API, but its container's output never ends, it ignores
//!   every signal, and it reports OOM kills of containers that do not exist, as fast as asked;
//! - `flood`: serves the agent API (its container ends on the first signal); once its container
//!   starts, it opens connections to the host's vsock ports as fast as it can, keeping as many
//!   open as it may, as a container's workload would.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use async_trait::async_trait;
use ironclad_protocol::agent::{
    health_check_response::ServingStatus, CheckRequest, ContainerRequest, CreateContainerRequest,
    CreateSandboxRequest, CreateSandboxResponse, DestroySandboxRequest, Empty, HealthCheckResponse, OomEvent,
    ProcessRef, ReadStreamRequest, ReadStreamResponse, RemoveContainerRequest, SetGuestDateTimeRequest,
    SignalProcessRequest, StartContainerRequest, StartContainerResponse, StatsContainerResponse,
    VersionCheckResponse, WaitProcessResponse, WriteStreamRequest, WriteStreamResponse,
};
use ironclad_protocol::{agent_ttrpc, AGENT_VSOCK_PORT};
use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, VsockAddr};
use tokio::sync::watch;
use ttrpc::r#async::TtrpcContext;

/// The host's vsock context id.
const HOST_CID: u32 = 2;
/// The version the ready line and Health.Version give: the shim checks only its form.
const VERSION: &str = "0.1.0";
/// What an endless read hands out when the request names no size.
const DEFAULT_CHUNK: usize = 64 * 1024;
/// The most an endless read hands out at once, whatever the request asks for.
const MAX_CHUNK: usize = 1024 * 1024;
/// The ttrpc frame header: length, stream id (both big-endian u32), type, flags.
const FRAME_HEADER: usize = 10;
const FRAME_RESPONSE: u8 = 2;
/// Requests larger than this end the connection (ttrpc's own limit is 4 MiB).
const MAX_REQUEST: usize = 4 << 20;
/// How many flood connections stay open at once: more than a shim could afford a task each.
const FLOOD_OPEN: usize = 4000;
const FLOOD_REPORT: usize = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Silent,
    Garbage,
    WrongIds,
    EndlessOutput,
    Flood,
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("ironclad_hostile={0:?} names no mode (silent, garbage, wrong-ids, endless-output, flood)")]
    UnknownMode(String),
    #[error("ironclad_hostile is not set on the kernel command line")]
    NoMode,
    #[error("cannot listen on vsock port {AGENT_VSOCK_PORT}")]
    Listen(#[source] nix::Error),
    #[error("cannot serve ttrpc on vsock port {AGENT_VSOCK_PORT}")]
    Serve(#[source] ttrpc::Error),
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
}

impl Mode {
    fn parse(word: &str) -> Result<Mode, Error> {
        match word {
            "silent" => Ok(Mode::Silent),
            "garbage" => Ok(Mode::Garbage),
            "wrong-ids" => Ok(Mode::WrongIds),
            "endless-output" => Ok(Mode::EndlessOutput),
            "flood" => Ok(Mode::Flood),
            other => Err(Error::UnknownMode(other.to_string())),
        }
    }

    fn serves_ttrpc(self) -> bool {
        matches!(self, Mode::EndlessOutput | Mode::Flood)
    }
}

fn main() {
    if let Err(err) = run() {
        println!("ironclad-hostile-agent: {}", ironclad_protocol::error_chain(&err));
    }
    // PID 1 must not return (the kernel would panic): a failed start ends the VM instead.
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
}

fn run() -> Result<(), Error> {
    let mode = Mode::parse(&std::env::var("ironclad_hostile").map_err(|_| Error::NoMode)?)?;
    if mode.serves_ttrpc() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(Error::Runtime)?;
        return runtime.block_on(serve_ttrpc(mode));
    }
    let listener = listen_vsock().map_err(Error::Listen)?;
    announce_ready();
    loop {
        let Ok(fd) = socket::accept(listener.as_raw_fd()) else { continue };
        // SAFETY: accept returned a new descriptor that nothing else owns.
        let stream = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        std::thread::spawn(move || match mode {
            Mode::Silent => swallow(stream),
            Mode::Garbage => answer_with_noise(stream),
            Mode::WrongIds => answer_other_streams(stream),
            Mode::EndlessOutput | Mode::Flood => {}
        });
    }
}

/// The real agent's ready line, which is all the shim waits for on the console.
fn announce_ready() {
    let uptime = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| u64::try_from(t.tv_sec() * 1000 + t.tv_nsec() / 1_000_000).unwrap_or(0))
        .unwrap_or(0);
    println!("{}", ironclad_protocol::ready_line(VERSION, uptime, None));
}

fn listen_vsock() -> Result<OwnedFd, nix::Error> {
    let fd = socket::socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    socket::bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, AGENT_VSOCK_PORT))?;
    socket::listen(&fd, Backlog::new(128)?)?;
    Ok(fd)
}

/// Reads whatever comes and never answers.
fn swallow(mut stream: std::fs::File) {
    let mut buf = vec![0u8; 64 * 1024];
    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
}

/// A response header claiming a message near 4 GiB, then pseudo-random bytes until the host hangs
/// up.
fn answer_with_noise(mut stream: std::fs::File) {
    let mut header = [0u8; FRAME_HEADER];
    header[..4].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
    header[4..8].copy_from_slice(&1u32.to_be_bytes());
    header[8] = FRAME_RESPONSE;
    if stream.write_all(&header).is_err() {
        return;
    }
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut noise = vec![0u8; 64 * 1024];
    loop {
        for chunk in noise.chunks_mut(8) {
            // xorshift64: cheap noise, no dependency.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
        if stream.write_all(&noise).is_err() {
            return;
        }
    }
}

/// Reads each request frame and answers it with an empty, well-formed response on a stream id the
/// host never opened.
fn answer_other_streams(mut stream: std::fs::File) {
    let mut header = [0u8; FRAME_HEADER];
    let mut body = Vec::new();
    while stream.read_exact(&mut header).is_ok() {
        let length = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let stream_id = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        if length > MAX_REQUEST {
            return;
        }
        body.resize(length, 0);
        if stream.read_exact(&mut body).is_err() {
            return;
        }
        let mut answer = [0u8; FRAME_HEADER];
        answer[4..8].copy_from_slice(&stream_id.wrapping_add(1000).to_be_bytes());
        answer[8] = FRAME_RESPONSE;
        if stream.write_all(&answer).is_err() {
            return;
        }
    }
}

async fn serve_ttrpc(mode: Mode) -> Result<(), Error> {
    let (signalled, _) = watch::channel(None);
    let health: Arc<dyn agent_ttrpc::Health + Send + Sync> = Arc::new(Health);
    let agent: Arc<dyn agent_ttrpc::Agent + Send + Sync> =
        Arc::new(Liar { mode, signalled, flooding: Default::default() });
    let mut server = ttrpc::r#async::Server::new()
        .bind(&format!("vsock://-1:{AGENT_VSOCK_PORT}"))
        .map_err(Error::Serve)?
        .register_service(agent_ttrpc::create_health(health))
        .register_service(agent_ttrpc::create_agent(agent));
    server.start().await.map_err(Error::Serve)?;
    announce_ready();
    std::future::pending::<()>().await;
    Ok(())
}

/// Connects to the host's vsock ports, one after another, forever, without waiting for answers:
/// up to FLOOD_OPEN connections, being made or made, are kept open at once, the oldest closed to
/// make room. Every FLOOD_REPORT attempts it says so on the console, where the test reads that the
/// flood is on.
fn flood_host_ports() {
    raise_open_file_limit();
    let mut open = std::collections::VecDeque::with_capacity(FLOOD_OPEN);
    for (attempt, port) in (1..=u32::MAX).cycle().enumerate() {
        if attempt % FLOOD_REPORT == 0 {
            println!("ironclad-hostile-agent: flood: {attempt} connection attempts");
        }
        let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
        let Ok(fd) = socket::socket(AddressFamily::Vsock, SockType::Stream, flags, None) else {
            open.pop_front();
            continue;
        };
        match socket::connect(fd.as_raw_fd(), &VsockAddr::new(HOST_CID, port)) {
            Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => {
                if open.len() == FLOOD_OPEN {
                    open.pop_front();
                }
                open.push_back(fd);
            }
            Err(_) => {}
        }
    }
}

fn raise_open_file_limit() {
    use nix::sys::resource::{setrlimit, Resource};
    let _ = setrlimit(Resource::RLIMIT_NOFILE, 8192, 8192);
}

struct Health;

#[async_trait]
impl agent_ttrpc::Health for Health {
    async fn check(&self, _ctx: &TtrpcContext, _req: CheckRequest) -> ttrpc::Result<HealthCheckResponse> {
        let mut response = HealthCheckResponse::new();
        response.status = ServingStatus::SERVING.into();
        Ok(response)
    }

    async fn version(&self, _ctx: &TtrpcContext, _req: CheckRequest) -> ttrpc::Result<VersionCheckResponse> {
        let mut response = VersionCheckResponse::new();
        response.agent_version = VERSION.into();
        Ok(response)
    }
}

/// The agent API as a liar serves it: every setup call succeeds and nothing is done.
struct Liar {
    mode: Mode,
    /// The first signal sent to the container (flood mode ends it with that signal).
    signalled: watch::Sender<Option<u32>>,
    /// Flood mode: the container started and the flood with it.
    flooding: std::sync::atomic::AtomicBool,
}

impl Liar {
    fn endless_chunk(request: &ReadStreamRequest) -> ReadStreamResponse {
        let size = match request.max_bytes as usize {
            0 => DEFAULT_CHUNK,
            asked => asked.min(MAX_CHUNK),
        };
        ReadStreamResponse { data: b"y\n".repeat(size / 2), ..Default::default() }
    }
}

#[async_trait]
impl agent_ttrpc::Agent for Liar {
    async fn create_sandbox(
        &self,
        _ctx: &TtrpcContext,
        _req: CreateSandboxRequest,
    ) -> ttrpc::Result<CreateSandboxResponse> {
        Ok(CreateSandboxResponse::new())
    }

    /// Says yes and stays up: the shim has to stop the VM itself.
    async fn destroy_sandbox(
        &self,
        _ctx: &TtrpcContext,
        _req: DestroySandboxRequest,
    ) -> ttrpc::Result<Empty> {
        Ok(Empty::new())
    }

    async fn set_guest_date_time(
        &self,
        _ctx: &TtrpcContext,
        _req: SetGuestDateTimeRequest,
    ) -> ttrpc::Result<Empty> {
        Ok(Empty::new())
    }

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        _req: CreateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        Ok(Empty::new())
    }

    async fn start_container(
        &self,
        _ctx: &TtrpcContext,
        _req: StartContainerRequest,
    ) -> ttrpc::Result<StartContainerResponse> {
        if self.mode == Mode::Flood && !self.flooding.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::thread::spawn(flood_host_ports);
        }
        Ok(StartContainerResponse { pid: 1, ..Default::default() })
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        _req: ProcessRef,
    ) -> ttrpc::Result<WaitProcessResponse> {
        if self.mode == Mode::EndlessOutput {
            std::future::pending::<()>().await;
        }
        let mut signalled = self.signalled.subscribe();
        let signal = signalled.wait_for(Option::is_some).await.map(|signal| signal.unwrap_or_default());
        let Ok(signal) = signal else { return std::future::pending().await };
        Ok(WaitProcessResponse { exit_status: 128 + signal as i32, ..Default::default() })
    }

    async fn read_stdout(
        &self,
        _ctx: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> ttrpc::Result<ReadStreamResponse> {
        match self.mode {
            Mode::EndlessOutput => Ok(Self::endless_chunk(&req)),
            _ => Ok(ReadStreamResponse::new()),
        }
    }

    async fn read_stderr(
        &self,
        _ctx: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> ttrpc::Result<ReadStreamResponse> {
        self.read_stdout(_ctx, req).await
    }

    async fn write_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: WriteStreamRequest,
    ) -> ttrpc::Result<WriteStreamResponse> {
        Ok(WriteStreamResponse { written: req.data.len() as u32, ..Default::default() })
    }

    async fn close_stdin(&self, _ctx: &TtrpcContext, _req: ProcessRef) -> ttrpc::Result<Empty> {
        Ok(Empty::new())
    }

    async fn signal_process(&self, _ctx: &TtrpcContext, req: SignalProcessRequest) -> ttrpc::Result<Empty> {
        if self.mode == Mode::Flood {
            self.signalled.send_if_modified(|first| first.replace(req.signal).is_none());
        }
        Ok(Empty::new())
    }

    async fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        _req: RemoveContainerRequest,
    ) -> ttrpc::Result<Empty> {
        Ok(Empty::new())
    }

    /// Endless output: an OOM kill of a container that never existed, at every ask.
    async fn get_oom_event(&self, _ctx: &TtrpcContext, _req: Empty) -> ttrpc::Result<OomEvent> {
        if self.mode != Mode::EndlessOutput {
            std::future::pending::<()>().await;
        }
        Ok(OomEvent { container_id: "no-such-container".into(), ..Default::default() })
    }

    async fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        _req: ContainerRequest,
    ) -> ttrpc::Result<StatsContainerResponse> {
        Ok(StatsContainerResponse::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_has_its_word_and_nothing_else_does() {
        for (word, mode) in [
            ("silent", Mode::Silent),
            ("garbage", Mode::Garbage),
            ("wrong-ids", Mode::WrongIds),
            ("endless-output", Mode::EndlessOutput),
            ("flood", Mode::Flood),
        ] {
            assert_eq!(Mode::parse(word).unwrap(), mode);
        }
        assert!(matches!(Mode::parse("polite"), Err(Error::UnknownMode(w)) if w == "polite"));
    }

    fn unix_pair() -> (std::fs::File, std::os::unix::net::UnixStream) {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        (std::fs::File::from(OwnedFd::from(theirs)), ours)
    }

    #[test]
    fn each_request_is_answered_on_a_stream_never_opened() {
        let (agent_side, mut host) = unix_pair();
        let agent = std::thread::spawn(move || answer_other_streams(agent_side));
        for stream_id in [1u32, 3, 5] {
            let body = b"request";
            let mut frame = Vec::from((body.len() as u32).to_be_bytes());
            frame.extend_from_slice(&stream_id.to_be_bytes());
            frame.extend_from_slice(&[1, 0]);
            frame.extend_from_slice(body);
            host.write_all(&frame).unwrap();
            let mut answer = [0u8; FRAME_HEADER];
            host.read_exact(&mut answer).unwrap();
            assert_eq!(answer[..4], 0u32.to_be_bytes(), "an empty response");
            assert_eq!(answer[4..8], (stream_id + 1000).to_be_bytes());
            assert_eq!(answer[8], FRAME_RESPONSE);
        }
        drop(host);
        agent.join().unwrap();
    }

    #[test]
    fn noise_starts_with_a_frame_claiming_almost_4_gib() {
        let (agent_side, mut host) = unix_pair();
        let agent = std::thread::spawn(move || answer_with_noise(agent_side));
        let mut header = [0u8; FRAME_HEADER];
        host.read_exact(&mut header).unwrap();
        assert_eq!(u32::from_be_bytes(header[..4].try_into().unwrap()), 0xffff_fff0);
        assert_eq!(header[8], FRAME_RESPONSE);
        let mut noise = vec![0u8; 1 << 20];
        host.read_exact(&mut noise).unwrap();
        assert!(noise.iter().filter(|&&b| b == 0).count() < noise.len() / 100, "noise, not zeros");
        drop(host);
        agent.join().unwrap();
    }

    #[test]
    fn an_endless_read_gives_what_was_asked_up_to_its_cap() {
        let ask = |max_bytes| {
            Liar::endless_chunk(&ReadStreamRequest { max_bytes, ..Default::default() }).data.len()
        };
        assert_eq!(ask(0), DEFAULT_CHUNK);
        assert_eq!(ask(4096), 4096);
        assert_eq!(ask(u32::MAX), MAX_CHUNK);
    }
}
