//! The Task API against guests that do not cooperate: a stand-in agent served over a Unix socket
//! with the real protocol (ttrpc), and a stand-in VM monitor process.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ironclad_protocol::agent::{
    Empty as AgentEmpty, ProcessRef, ReadStreamRequest, ReadStreamResponse, SignalProcessRequest,
    WaitProcessResponse,
};
use ironclad_protocol::agent_ttrpc;
use ttrpc::r#async::TtrpcContext as AgentContext;

use super::*;
use crate::hypervisor::GuestVm;
use crate::hypervisor::Launch;

/// How a stand-in agent misbehaves.
#[derive(Clone, Copy)]
enum Guest {
    /// Says yes to every signal and carries none out: its processes never exit.
    IgnoresSignals,
    /// Its process exits at once, but its output never ends.
    EndlessOutput,
    /// Its process is killed by the OOM killer (exit 137, memory.events counts it); no output.
    OomKilled,
}

struct FakeAgent(Guest);

#[async_trait]
impl agent_ttrpc::Agent for FakeAgent {
    async fn signal_process(
        &self,
        _ctx: &AgentContext,
        _req: SignalProcessRequest,
    ) -> ttrpc::Result<AgentEmpty> {
        Ok(AgentEmpty::new())
    }

    async fn wait_process(
        &self,
        _ctx: &AgentContext,
        _req: ProcessRef,
    ) -> ttrpc::Result<WaitProcessResponse> {
        match self.0 {
            Guest::IgnoresSignals => std::future::pending().await,
            Guest::EndlessOutput => Ok(WaitProcessResponse { exit_status: 0, ..Default::default() }),
            Guest::OomKilled => Ok(WaitProcessResponse { exit_status: 137, ..Default::default() }),
        }
    }

    async fn stats_container(
        &self,
        _ctx: &AgentContext,
        _req: ironclad_protocol::agent::ContainerRequest,
    ) -> ttrpc::Result<ironclad_protocol::agent::StatsContainerResponse> {
        let mut events = ironclad_protocol::agent::MemoryEvents::new();
        events.oom_kill = u64::from(matches!(self.0, Guest::OomKilled));
        let mut stats = ironclad_protocol::agent::StatsContainerResponse::new();
        stats.memory_events = MessageField::some(events);
        Ok(stats)
    }

    async fn read_stdout(
        &self,
        _ctx: &AgentContext,
        _req: ReadStreamRequest,
    ) -> ttrpc::Result<ReadStreamResponse> {
        match self.0 {
            Guest::IgnoresSignals => std::future::pending().await,
            Guest::EndlessOutput => {
                Ok(ReadStreamResponse { data: b"more output\n".to_vec(), ..Default::default() })
            }
            Guest::OomKilled => Ok(ReadStreamResponse::default()),
        }
    }

    async fn get_oom_event(
        &self,
        _ctx: &AgentContext,
        _req: AgentEmpty,
    ) -> ttrpc::Result<ironclad_protocol::agent::OomEvent> {
        std::future::pending().await
    }
}

/// A running container whose "VM" is a sleeping process and whose agent is `guest`, in a
/// service whose events land in the returned receiver.
struct Rig {
    service: TaskService,
    container: Arc<Container>,
    events: tokio::sync::mpsc::UnboundedReceiver<(
        &'static str,
        Box<dyn containerd_shim::protos::protobuf::MessageDyn>,
    )>,
    _server: ttrpc::r#async::Server,
    dir: tempfile::TempDir,
}

async fn rig(guest: Guest, stdout: &str) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let agent: Arc<dyn agent_ttrpc::Agent + Send + Sync> = Arc::new(FakeAgent(guest));
    let mut server = ttrpc::r#async::Server::new()
        .bind(&format!("unix://{}", socket.display()))
        .unwrap()
        .register_service(agent_ttrpc::create_agent(agent));
    server.start().await.unwrap();
    let client = AgentClient::over(tokio::net::UnixStream::connect(&socket).await.unwrap());
    let task_dir = dir.path().join("task");
    std::fs::create_dir(&task_dir).unwrap();
    let vm = GuestVm::spawn(
        "stand-in VM",
        Launch::plain(Path::new("sleep"), vec!["600".into()]),
        dir.path().join("console.log"),
        socket.clone(),
        None,
        vec![],
    )
    .await
    .unwrap();
    let sandbox = Arc::new(Sandbox::run(vm, client, "stand-in", task_dir, None).unwrap());
    let uris = StdioUris { stdout: stdout.to_string(), ..Default::default() };
    let init = Process::new("", uris, String::new());
    let container = Arc::new(Container::new("c1", "/nonexistent/bundle", sandbox, init));
    let (events, rx) = Events::channel();
    let service = TaskService {
        namespace: "test".into(),
        exit: Arc::new(ExitSignal::default()),
        events,
        tasks: Arc::new(TaskTable::default()),
        creating: Arc::new(Mutex::new(())),
    };
    service.tasks.insert(container.clone());
    Rig { service, container, events: rx, _server: server, dir }
}

/// Starts the init process as Start would after the agent said so.
async fn start_init(rig: &Rig) -> Arc<Process> {
    let init = rig.container.init().unwrap();
    rig.service.connect_stdio(&rig.container, &init).await.unwrap();
    init.set_status(Status::RUNNING);
    rig.service.watch_exit(rig.container.clone(), init.clone());
    init
}

fn published_exit(events: &mut Rig) -> Option<u32> {
    while let Ok((topic, event)) = events.events.try_recv() {
        if topic == topics::TASK_EXIT_EVENT_TOPIC {
            return Some(event.downcast_box::<TaskExit>().unwrap().exit_status);
        }
    }
    None
}

#[tokio::test]
async fn a_guest_that_ignores_sigkill_loses_its_vm_and_the_task_ends_killed() {
    let mut rig = rig(Guest::IgnoresSignals, "").await;
    let init = start_init(&rig).await;
    let monitor = rig.container.host_pid();
    let kill = KillRequest { id: "c1".into(), signal: SIGKILL, ..Default::default() };
    rig.service.kill(&kill).await.unwrap();
    let started = Instant::now();
    let exit = tokio::time::timeout(KILL_GRACE + Duration::from_secs(10), init.wait())
        .await
        .expect("the task stayed running after SIGKILL");
    assert_eq!(exit.status, 137);
    assert!(started.elapsed() >= KILL_GRACE - Duration::from_millis(100), "the guest got its chance first");
    assert!(rig.container.sandbox.is_gone() || !Path::new(&format!("/proc/{monitor}")).exists());
    assert_eq!(published_exit(&mut rig), Some(137));
    // Now Delete works, and the sandbox's directory goes with it.
    let delete = DeleteRequest { id: "c1".into(), ..Default::default() };
    let deleted = rig.service.delete(&delete).await.unwrap();
    assert_eq!(deleted.exit_status, 137);
    assert!(!rig.dir.path().join("task").exists());
}

#[tokio::test]
async fn output_that_never_ends_does_not_hold_back_the_exit() {
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut rig = rig(Guest::EndlessOutput, &format!("file://{}", out.path().display())).await;
    let init = start_init(&rig).await;
    let exit = tokio::time::timeout(DRAIN_DEADLINE + Duration::from_secs(10), init.wait())
        .await
        .expect("the exit was held back by output that never ends");
    assert_eq!(exit.status, 0);
    assert_eq!(published_exit(&mut rig), Some(0));
    let written = std::fs::read_to_string(out.path()).unwrap();
    assert!(written.starts_with("more output\n"), "the output was relayed until the deadline");
    rig.container.sandbox.kill().await;
}

#[tokio::test]
async fn an_oom_kill_is_told_before_the_exit() {
    let mut rig = rig(Guest::OomKilled, "").await;
    let init = start_init(&rig).await;
    let exit = tokio::time::timeout(Duration::from_secs(10), init.wait()).await.expect("no exit");
    assert_eq!(exit.status, 137);
    let mut topics_seen = Vec::new();
    while let Ok((topic, _)) = rig.events.try_recv() {
        topics_seen.push(topic);
    }
    let oom = topics_seen.iter().position(|t| *t == topics::TASK_OOM_EVENT_TOPIC);
    let exit = topics_seen.iter().position(|t| *t == topics::TASK_EXIT_EVENT_TOPIC);
    assert!(matches!((oom, exit), (Some(o), Some(e)) if o < e), "{topics_seen:?}");
    rig.container.sandbox.kill().await;
}

fn options(value: Vec<u8>) -> MessageField<Any> {
    MessageField::some(Any {
        type_url: format!("containerd.{RUNTIME_OPTIONS_TYPE}"),
        value,
        ..Default::default()
    })
}

#[test]
fn runtime_options_are_decoded_by_their_generated_type_and_bad_ones_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ironclad.toml");
    std::fs::write(&path, "memory_mib = 384\n").unwrap();
    let mut good = RuntimeOptions::new();
    good.config_path = path.display().to_string();
    let config = TaskService::load_config(&options(good.write_to_bytes().unwrap())).unwrap();
    assert_eq!(config.memory_mib, 384);
    let mut inline = RuntimeOptions::new();
    inline.config_body = "memory_mib = 512\n".into();
    assert_eq!(TaskService::load_config(&options(inline.write_to_bytes().unwrap())).unwrap().memory_mib, 512);
    // Cut short in the middle of config_path, and options of another type (runc's): both refused.
    let encoded = good.write_to_bytes().unwrap();
    let truncated = TaskService::load_config(&options(encoded[..encoded.len() / 2].to_vec())).unwrap_err();
    assert!(matches!(truncated, Error::RuntimeOptions(_)), "{truncated}");
    assert!(truncated.to_string().contains(RUNTIME_OPTIONS_TYPE), "{truncated}");
    let runc = MessageField::some(Any {
        type_url: "containerd.runc.v1.Options".into(),
        value: vec![0x08, 0x01],
        ..Default::default()
    });
    let wrong_type = TaskService::load_config(&runc).unwrap_err();
    assert!(matches!(wrong_type, Error::RuntimeOptionsType(_)), "{wrong_type}");
    assert!(wrong_type.to_string().contains("containerd.runc.v1.Options"), "{wrong_type}");
    assert_eq!(code_of(&wrong_type), ttrpc::Code::INVALID_ARGUMENT);
}

#[test]
fn the_shim_socket_is_removed_when_the_shim_goes_and_nothing_else_is() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("shim.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    remove_socket_file(&format!("unix://{}", socket.display()));
    assert!(!socket.exists(), "the socket outlived the shim");
    drop(listener);
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, "x").unwrap();
    remove_socket_file(&format!("unix://{}", file.display()));
    assert!(file.exists(), "a file that is no socket was removed");
    remove_socket_file(&format!("unix://{}", dir.path().join("missing").display()));
}
