#![allow(clippy::unwrap_used)] // test code: a failed step should stop the test right there

//! Containers through the agent on the host: the agent runs by hand in its own mount namespace
//! (with cgroup2 mounted there, as in the guest, or with the host's own cgroups for the limit
//! tests) and is driven with the generated ttrpc client.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ironclad_protocol::agent::{
    CreateContainerRequest, ProcessRef, ReadStreamRequest, RemoveContainerRequest, StartContainerRequest,
    WriteStreamRequest,
};
use ironclad_protocol::agent_ttrpc::AgentClient;
use ironclad_tests::cgroups;
use libcontainer::oci_spec::runtime::{ProcessBuilder, RootBuilder, Spec, UserBuilder};

const BUSYBOX: &str = "/bin/busybox";
const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "true", "false", "id", "pwd", "hostname", "touch", "tty", "stty", "grep",
    "mkdir",
];

struct Agent {
    child: Child,
    client: AgentClient,
    state_dir: PathBuf,
    cgroup_parent: String,
    dir: tempfile::TempDir,
    /// The test ended the agent with [`Agent::finish`], which checked what it left.
    finished: bool,
}

impl Agent {
    /// The directories of a container's cgroup that still exist, in every cgroup file system the
    /// agent sees.
    fn cgroups_left(&self, id: &str) -> Vec<PathBuf> {
        let cgroup = format!("{}/{id}", self.cgroup_parent);
        cgroups::dirs_seen_by(self.child.id(), &cgroup).into_iter().filter(|d| d.exists()).collect()
    }

    /// Ends the agent as the shim does (DestroySandbox) and checks that the agent itself removed
    /// every cgroup it made: no container's cgroup is left once its containers are removed, and
    /// the parent goes when the agent exits. (The fixture's clean-up only runs after a failure.)
    async fn finish(mut self) {
        let containers_left: Vec<PathBuf> = cgroups::dirs_seen_by(self.child.id(), &self.cgroup_parent)
            .iter()
            .flat_map(|dir| std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()))
            .filter(|path| path.is_dir())
            .collect();
        assert_eq!(containers_left, Vec::<PathBuf>::new(), "the agent left container cgroups behind");
        self.client
            .destroy_sandbox(ctx(), &ironclad_protocol::agent::DestroySandboxRequest::new())
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "the agent did not exit after DestroySandbox");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(status.success(), "the agent exited with {status}");
        // Its mount namespace went with it: the cgroups are looked for where the host sees them.
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let parent = self.cgroup_parent.trim_start_matches('/');
        let parents_left: Vec<PathBuf> = cgroups::mount_points(&mountinfo)
            .into_iter()
            .map(|mount| mount.join(parent))
            .filter(|dir| dir.exists())
            .collect();
        assert_eq!(parents_left, Vec::<PathBuf>::new(), "the agent left its parent cgroup behind");
        self.finished = true;
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // After a failing test, whatever still runs in its cgroups is killed here and they are
        // removed, seen through the agent's mount namespace (the host may have no cgroup2 mount).
        cgroups::clear_away(self.child.id(), &self.cgroup_parent);
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            panic!("a test must end its agent with finish(), which checks what the agent left behind");
        }
    }
}

/// Which cgroups the agent's containers get.
#[derive(Clone, Copy, PartialEq)]
enum Cgroups {
    /// A cgroup2 mount in the agent's mount namespace, as in the guest. Where the host keeps its
    /// controllers on cgroup v1, that tree has none: no limits.
    V2Mount,
    /// The host's, as the agent finds them: cgroup v2 with its controllers, or the v1 hierarchies.
    Host,
}

/// Root and busybox-static are needed; without them the test fails naming them (or skips where
/// IRONCLAD_ALLOW_SKIP=1 says so).
fn can_run() -> bool {
    ironclad_test_prereq::needs().root().file(Path::new(BUSYBOX), "apt-get install busybox-static").ready()
}

fn busybox_rootfs(dir: &Path) -> PathBuf {
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    for d in ["proc", "dev", "sys", "tmp", "etc"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::copy(BUSYBOX, rootfs.join("bin/busybox")).unwrap();
    for applet in APPLETS {
        symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    rootfs
}

async fn start_agent() -> Agent {
    start_agent_in(&[], Cgroups::V2Mount).await
}

/// The agent in namespaces of its own: a mount namespace always, plus `extra` (e.g. `--net`).
async fn start_agent_in(extra: &[&str], cgroups: Cgroups) -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let state_dir = dir.path().join("state");
    let address = format!("unix://{}", socket.display());
    // The cgroup v2 hierarchy is the host's: each agent gets its own parent cgroup, named after its
    // private directory and directly below the root, so that agents running at the same time share
    // neither a container's cgroup nor a parent they would race to create.
    let name = dir.path().file_name().unwrap().to_string_lossy().into_owned();
    let cgroup_parent = format!("/ironclad-test-{}", name.trim_start_matches('.'));
    let child = Command::new("unshare")
        .args(["--mount", "--propagation", "private"])
        .args(extra)
        .args(["sh", "-c"])
        .arg(r#"$5 && exec "$0" --listen "$1" --state-dir "$2" --cgroup-parent "$3" $4"#)
        .arg(env!("CARGO_BIN_EXE_ironclad-agent"))
        .arg(&address)
        .arg(&state_dir)
        .arg(&cgroup_parent)
        .arg(if extra.contains(&"--net") { "--own-network-namespace" } else { "" })
        .arg(if cgroups == Cgroups::V2Mount { "mount -t cgroup2 none /sys/fs/cgroup" } else { "true" })
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Until the Agent exists to kill it on drop, a failing step must not leave the agent running.
    let mut child = KillOnDrop(Some(child));
    wait_until("a socket from the agent", || socket.exists());
    let client = AgentClient::new(ttrpc::r#async::Client::connect(&address).await.unwrap());
    let child = child.take().unwrap();
    Agent { child, client, state_dir, cgroup_parent, dir, finished: false }
}

/// A child that is killed and reaped if dropped while still held: `take` it once it has an owner.
struct KillOnDrop(Option<Child>);

impl KillOnDrop {
    fn take(&mut self) -> Option<Child> {
        self.0.take()
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(30_000_000_000)
}

fn spec(args: &[&str]) -> String {
    serde_json::to_string(&spec_with(args, |_| {})).unwrap()
}

/// The default OCI spec running `args` on a writable root, then whatever `adjust` changes.
fn spec_with(args: &[&str], adjust: impl FnOnce(&mut Spec)) -> Spec {
    let mut spec = ironclad_tests::busybox_spec(args, false);
    adjust(&mut spec);
    spec
}

fn process(id: &str) -> ProcessRef {
    let mut p = ProcessRef::new();
    p.container_id = id.into();
    p
}

async fn create(agent: &Agent, id: &str, args: &[&str]) -> ttrpc::Result<()> {
    create_with_spec(agent, id, &spec(args)).await
}

async fn create_with_spec(agent: &Agent, id: &str, spec_json: &str) -> ttrpc::Result<()> {
    let mut req = CreateContainerRequest::new();
    req.container_id = id.into();
    req.oci_spec_json = spec_json.into();
    req.rootfs = busybox_rootfs(&agent.dir.path().join(id)).display().to_string();
    agent.client.create_container(ctx(), &req).await.map(|_| ())
}

async fn start(agent: &Agent, id: &str) -> u32 {
    let mut req = StartContainerRequest::new();
    req.container_id = id.into();
    agent.client.start_container(ctx(), &req).await.unwrap().pid
}

async fn read_all_stdout(agent: &Agent, id: &str) -> String {
    read_all(agent, process(id)).await
}

/// The next chunk of a process's stdout; empty at its end.
async fn read_chunk(agent: &Agent, process: ProcessRef) -> String {
    let mut req = ReadStreamRequest::new();
    req.process = Some(process).into();
    String::from_utf8(agent.client.read_stdout(ctx(), &req).await.unwrap().data).unwrap()
}

async fn read_all(agent: &Agent, process: ProcessRef) -> String {
    let mut out = String::new();
    loop {
        let chunk = read_chunk(agent, process.clone()).await;
        if chunk.is_empty() {
            return out;
        }
        out.push_str(&chunk);
    }
}

async fn remove(agent: &Agent, id: &str) -> ttrpc::Result<()> {
    let mut req = RemoveContainerRequest::new();
    req.container_id = id.into();
    agent.client.remove_container(ctx(), &req).await.map(|_| ())
}

fn code_of(result: ttrpc::Result<impl Sized>) -> ttrpc::Code {
    match result {
        Err(ttrpc::Error::RpcStatus(status)) => status.code(),
        Err(other) => panic!("not a status: {other:?}"),
        Ok(_) => panic!("expected an error"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_runs_prints_exits_and_is_removed_without_a_trace() {
    if !can_run() {
        return;
    }
    let agent = start_agent().await;
    create(&agent, "c1", &["sh", "-c", "echo hello from a container; exit 3"]).await.unwrap();
    let pid = start(&agent, "c1").await;
    assert!(pid > 0);
    assert_eq!(read_all_stdout(&agent, "c1").await, "hello from a container\n");
    let status = agent.client.wait_process(ctx(), &process("c1")).await.unwrap();
    assert_eq!(status.exit_status, 3);
    remove(&agent, "c1").await.unwrap();
    assert!(!agent.state_dir.join("bundles/c1").exists(), "bundle left behind");
    assert!(!agent.state_dir.join("libcontainer/c1").exists(), "libcontainer state left behind");
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "process left behind");
    assert_eq!(agent.cgroups_left("c1"), Vec::<PathBuf>::new(), "cgroup left behind");
    assert_eq!(code_of(remove(&agent, "c1").await), ttrpc::Code::NOT_FOUND);
    agent.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_created_at_once_all_exist_and_one_id_is_created_once() {
    if !can_run() {
        return;
    }
    let agent = start_agent().await;
    let (first, second) =
        tokio::join!(create(&agent, "par1", &["echo", "one"]), create(&agent, "par2", &["echo", "two"]));
    first.unwrap();
    second.unwrap();
    // Both are started before either's output is read: each init holds copies of the agent's ends
    // of the pipes that were open when it was forked until it execs its process.
    start(&agent, "par1").await;
    start(&agent, "par2").await;
    for (id, said) in [("par1", "one\n"), ("par2", "two\n")] {
        assert_eq!(read_all_stdout(&agent, id).await, said);
        remove(&agent, id).await.unwrap();
    }

    // The same id twice at once: the table is not locked across the create, yet one wins and the
    // other is told the id exists.
    let mut req = CreateContainerRequest::new();
    req.container_id = "same".into();
    req.oci_spec_json = spec(&["true"]);
    req.rootfs = busybox_rootfs(&agent.dir.path().join("same")).display().to_string();
    let (a, b) =
        tokio::join!(agent.client.create_container(ctx(), &req), agent.client.create_container(ctx(), &req));
    let (created, refused): (Vec<_>, Vec<_>) =
        [a.map(drop), b.map(drop)].into_iter().partition(Result::is_ok);
    assert_eq!((created.len(), refused.len()), (1, 1));
    assert_eq!(code_of(refused.into_iter().next().unwrap()), ttrpc::Code::ALREADY_EXISTS);
    remove(&agent, "same").await.unwrap();
    assert_eq!(agent.cgroups_left("same"), Vec::<PathBuf>::new(), "cgroup left behind");

    // Creates at once and removals after them, round after round: with libcontainer's forks at
    // once, one create waited for good (round 16 in a CI run); with its working directory shared,
    // one was left in a removed state directory and the next create failed ("failed to get cwd").
    for round in 0..50 {
        let (a, b) = (format!("round{round}a"), format!("round{round}b"));
        let (first, second) = tokio::join!(create(&agent, &a, &["true"]), create(&agent, &b, &["true"]));
        first.unwrap_or_else(|err| panic!("round {round}: {err:?}"));
        second.unwrap_or_else(|err| panic!("round {round}: {err:?}"));
        let (first, second) = tokio::join!(remove(&agent, &a), remove(&agent, &b));
        first.unwrap();
        second.unwrap();
    }
    agent.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_reaches_the_process_and_close_ends_it() {
    if !can_run() {
        return;
    }
    let agent = start_agent().await;
    create(&agent, "c2", &["sh", "-c", "read line; echo got $line; cat"]).await.unwrap();
    start(&agent, "c2").await;
    let mut req = WriteStreamRequest::new();
    req.process = Some(process("c2")).into();
    req.data = b"hi\nrest of input\n".to_vec();
    assert_eq!(agent.client.write_stdin(ctx(), &req).await.unwrap().written, 17);
    agent.client.close_stdin(ctx(), &process("c2")).await.unwrap();
    assert_eq!(read_all_stdout(&agent, "c2").await, "got hi\nrest of input\n");
    assert_eq!(agent.client.wait_process(ctx(), &process("c2")).await.unwrap().exit_status, 0);
    remove(&agent, "c2").await.unwrap();
    agent.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_container_exits_with_137_and_a_running_one_can_be_removed() {
    if !can_run() {
        return;
    }
    let agent = start_agent().await;
    create(&agent, "c3", &["sleep", "1000"]).await.unwrap();
    let pid = start(&agent, "c3").await;
    let mut req = ironclad_protocol::agent::SignalProcessRequest::new();
    req.process = Some(process("c3")).into();
    req.signal = 9;
    agent.client.signal_process(ctx(), &req).await.unwrap();
    assert_eq!(agent.client.wait_process(ctx(), &process("c3")).await.unwrap().exit_status, 137);
    remove(&agent, "c3").await.unwrap();

    create(&agent, "c4", &["sleep", "1000"]).await.unwrap();
    let running = start(&agent, "c4").await;
    remove(&agent, "c4").await.unwrap();
    assert!(!Path::new(&format!("/proc/{running}")).exists() && !Path::new(&format!("/proc/{pid}")).exists());
    agent.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_with_the_reason() {
    if !can_run() {
        return;
    }
    let agent = start_agent().await;
    let mut req = CreateContainerRequest::new();
    req.container_id = "c5".into();
    req.oci_spec_json = spec(&["true"]);
    req.rootfs = "/nonexistent/rootfs".into();
    let err = agent.client.create_container(ctx(), &req).await;
    assert_eq!(code_of(err), ttrpc::Code::INVALID_ARGUMENT);

    req.rootfs = busybox_rootfs(&agent.dir.path().join("c5")).display().to_string();
    req.oci_spec_json = "{not json".into();
    assert_eq!(code_of(agent.client.create_container(ctx(), &req).await), ttrpc::Code::INVALID_ARGUMENT);

    req.oci_spec_json = spec(&["true"]);
    req.container_id = "../escape".into();
    assert_eq!(code_of(agent.client.create_container(ctx(), &req).await), ttrpc::Code::INVALID_ARGUMENT);

    let mut start_req = StartContainerRequest::new();
    start_req.container_id = "nobody".into();
    assert_eq!(code_of(agent.client.start_container(ctx(), &start_req).await), ttrpc::Code::NOT_FOUND);

    let mut exec = process("nobody");
    exec.exec_id = "e1".into();
    assert_eq!(code_of(agent.client.wait_process(ctx(), &exec).await), ttrpc::Code::NOT_FOUND);
    agent.finish().await;
}

/// Runs a container to its end and returns (stdout, exit status).
async fn run_to_end(agent: &Agent, id: &str, spec: &Spec) -> (String, i32) {
    create_with_spec(agent, id, &serde_json::to_string(spec).unwrap()).await.unwrap();
    start(agent, id).await;
    let output = read_all_stdout(agent, id).await;
    let status = agent.client.wait_process(ctx(), &process(id)).await.unwrap().exit_status;
    remove(agent, id).await.unwrap();
    (output, status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spec_sets_env_cwd_user_and_hostname_and_the_process_is_pid_1() {
    if !can_run() {
        return;
    }
    let agent = start_agent().await;
    let script = "echo $GREETING; pwd; id -u; id -g; id -G; hostname; echo $$";
    let spec = spec_with(&["sh", "-c", script], |spec| {
        let mut process = spec.process().clone().unwrap();
        process.set_env(Some(vec!["PATH=/bin".into(), "GREETING=hello".into()]));
        process.set_cwd("/tmp".into());
        let user =
            UserBuilder::default().uid(1000u32).gid(1000u32).additional_gids(vec![2000u32]).build().unwrap();
        process.set_user(user);
        spec.set_process(Some(process));
        spec.set_hostname(Some("box1".into()));
    });
    let (output, status) = run_to_end(&agent, "spec1", &spec).await;
    assert_eq!(status, 0, "{output}");
    assert_eq!(output, "hello\n/tmp\n1000\n1000\n1000 2000\nbox1\n1\n");
    agent.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_rootfs_cannot_be_written() {
    if !can_run() {
        return;
    }
    let agent = start_agent().await;
    let script = "touch /written 2>/dev/null && echo wrote || echo read-only";
    let read_only = spec_with(&["sh", "-c", script], |spec| {
        spec.set_root(Some(RootBuilder::default().path("rootfs").readonly(true).build().unwrap()));
    });
    assert_eq!(run_to_end(&agent, "ro1", &read_only).await.0, "read-only\n");
    let writable = spec_with(&["sh", "-c", script], |_| {});
    assert_eq!(run_to_end(&agent, "rw1", &writable).await.0, "wrote\n");
    agent.finish().await;
}

fn exec_request(id: &str, exec_id: &str, args: &[&str]) -> ironclad_protocol::agent::ExecProcessRequest {
    let process = ProcessBuilder::default()
        .terminal(false)
        .args(args.iter().map(|a| a.to_string()).collect::<Vec<_>>())
        .env(vec!["PATH=/bin".to_string(), "WHO=exec".to_string()])
        .cwd("/tmp")
        .build()
        .unwrap();
    let mut req = ironclad_protocol::agent::ExecProcessRequest::new();
    req.container_id = id.into();
    req.exec_id = exec_id.into();
    req.process_json = serde_json::to_string(&process).unwrap();
    req
}

fn exec_ref(id: &str, exec_id: &str) -> ProcessRef {
    let mut p = process(id);
    p.exec_id = exec_id.into();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_in_the_running_container_with_its_own_stdio_and_status() {
    if !can_run() {
        return;
    }
    let agent = start_agent().await;
    create_with_spec(
        &agent,
        "x1",
        &serde_json::to_string(&spec_with(&["sleep", "1000"], |spec| {
            spec.set_hostname(Some("execbox".into()));
        }))
        .unwrap(),
    )
    .await
    .unwrap();
    start(&agent, "x1").await;
    let req = exec_request("x1", "e1", &["sh", "-c", "echo $WHO in $(hostname) at $(pwd); exit 5"]);
    assert!(agent.client.exec_process(ctx(), &req).await.unwrap().pid > 0);
    let out = read_all(&agent, exec_ref("x1", "e1")).await;
    assert_eq!(out, "exec in execbox at /tmp\n", "the container's uts namespace");
    assert_eq!(agent.client.wait_process(ctx(), &exec_ref("x1", "e1")).await.unwrap().exit_status, 5);

    assert_eq!(code_of(agent.client.exec_process(ctx(), &req).await), ttrpc::Code::ALREADY_EXISTS);
    // The same new exec id twice at once: the id is reserved before the helper runs (the table
    // is not locked across it), so exactly one of the two starts.
    let twice = exec_request("x1", "e3", &["true"]);
    let (first, second) =
        tokio::join!(agent.client.exec_process(ctx(), &twice), agent.client.exec_process(ctx(), &twice));
    let refused = match (first, second) {
        (Ok(_), refused) | (refused, Ok(_)) => code_of(refused),
        (first, second) => panic!("neither exec started: {first:?}, {second:?}"),
    };
    assert_eq!(refused, ttrpc::Code::ALREADY_EXISTS);
    assert_eq!(agent.client.wait_process(ctx(), &exec_ref("x1", "e3")).await.unwrap().exit_status, 0);
    let bad_id = exec_request("x1", "../e", &["true"]);
    assert_eq!(code_of(agent.client.exec_process(ctx(), &bad_id).await), ttrpc::Code::INVALID_ARGUMENT);
    let nobody = exec_request("nobody", "e1", &["true"]);
    assert_eq!(code_of(agent.client.exec_process(ctx(), &nobody).await), ttrpc::Code::NOT_FOUND);
    let mut no_args = exec_request("x1", "e2", &["true"]);
    no_args.process_json = r#"{"cwd": "/"}"#.into();
    assert_eq!(code_of(agent.client.exec_process(ctx(), &no_args).await), ttrpc::Code::INVALID_ARGUMENT);
    remove(&agent, "x1").await.unwrap();
    agent.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_file_writes_below_the_shared_directory_only() {
    if !can_run() {
        return;
    }
    let agent = start_agent().await;
    let mut req = ironclad_protocol::agent::CopyFileRequest::new();
    req.path = "c1/etc/hosts".into();
    req.data = b"127.0.0.1 localhost\n".to_vec();
    req.mode = 0o644;
    let written = agent.client.copy_file(ctx(), &req).await.unwrap().guest_path;
    assert_eq!(Path::new(&written), agent.state_dir.join("shared/c1/etc/hosts"));
    assert_eq!(std::fs::read(&written).unwrap(), b"127.0.0.1 localhost\n");
    req.path = "../../etc/passwd".into();
    assert_eq!(code_of(agent.client.copy_file(ctx(), &req).await), ttrpc::Code::INVALID_ARGUMENT);
    agent.finish().await;
}

fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "never {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether the container's cgroup says it is frozen: `frozen 1` in cgroup.events (v2), or
/// FROZEN in the v1 freezer hierarchy's freezer.state.
fn frozen(agent: &Agent, id: &str) -> bool {
    agent.cgroups_left(id).iter().any(|dir| {
        let read = |file| std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        read("cgroup.events").lines().any(|l| l == "frozen 1") || read("freezer.state").trim() == "FROZEN"
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_freezes_the_container_and_resume_thaws_it() {
    if !can_run() {
        return;
    }
    // The guest's cgroup v2 freezer, and the host's own (v1's freezer hierarchy here).
    for cgroups in [Cgroups::V2Mount, Cgroups::Host] {
        let agent = start_agent_in(&[], cgroups).await;
        create(&agent, "p1", &["sleep", "1000"]).await.unwrap();
        let mut req = ironclad_protocol::agent::ContainerRequest::new();
        req.container_id = "p1".into();
        assert_eq!(
            code_of(agent.client.pause_container(ctx(), &req).await),
            ttrpc::Code::FAILED_PRECONDITION
        );
        start(&agent, "p1").await;
        assert!(!frozen(&agent, "p1"));
        agent.client.pause_container(ctx(), &req).await.unwrap();
        wait_until("frozen", || frozen(&agent, "p1"));
        agent.client.resume_container(ctx(), &req).await.unwrap();
        wait_until("thawed", || !frozen(&agent, "p1"));
        remove(&agent, "p1").await.unwrap();
        agent.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_container_gets_a_pty_with_the_size_it_was_given() {
    if !can_run() {
        return;
    }
    let agent = start_agent().await;
    let spec = spec_with(&["sh", "-c", "tty; stty size"], |spec| {
        let mut process = spec.process().clone().unwrap();
        process.set_terminal(Some(true));
        spec.set_process(Some(process));
    });
    create_with_spec(&agent, "t1", &serde_json::to_string(&spec).unwrap()).await.unwrap();
    let mut resize = ironclad_protocol::agent::TtyWinResizeRequest::new();
    resize.process = Some(process("t1")).into();
    resize.rows = 40;
    resize.cols = 100;
    agent.client.tty_win_resize(ctx(), &resize).await.unwrap();
    start(&agent, "t1").await;
    // A terminal turns each newline into CR LF.
    assert_eq!(read_all_stdout(&agent, "t1").await, "/dev/pts/0\r\n40 100\r\n");
    assert_eq!(agent.client.wait_process(ctx(), &process("t1")).await.unwrap().exit_status, 0);
    remove(&agent, "t1").await.unwrap();

    create(&agent, "t2", &["true"]).await.unwrap();
    resize.process = Some(process("t2")).into();
    assert_eq!(code_of(agent.client.tty_win_resize(ctx(), &resize).await), ttrpc::Code::FAILED_PRECONDITION);
    remove(&agent, "t2").await.unwrap();
    agent.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_run_by_hand_never_changes_the_hosts_name_dns_or_clock() {
    if !can_run() {
        return;
    }
    let agent = start_agent().await;
    let hostname_before = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let mut sandbox = ironclad_protocol::agent::CreateSandboxRequest::new();
    sandbox.hostname = "not-this-host".into();
    sandbox.dns_servers = vec!["10.0.0.53".into()];
    assert_eq!(code_of(agent.client.create_sandbox(ctx(), &sandbox).await), ttrpc::Code::FAILED_PRECONDITION);
    let mut time = ironclad_protocol::agent::SetGuestDateTimeRequest::new();
    time.sec = 1_893_456_000;
    assert_eq!(
        code_of(agent.client.set_guest_date_time(ctx(), &time).await),
        ttrpc::Code::FAILED_PRECONDITION
    );
    assert_eq!(std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap(), hostname_before);
    sandbox.hostname = "bad name".into();
    assert_eq!(code_of(agent.client.create_sandbox(ctx(), &sandbox).await), ttrpc::Code::INVALID_ARGUMENT);
    agent.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_read_only_rootfs_gets_a_private_writable_layer_that_goes_with_it() {
    if !can_run() {
        return;
    }
    let agent = start_agent().await;
    let lower = busybox_rootfs(&agent.dir.path().join("image"));
    let mut req = CreateContainerRequest::new();
    req.container_id = "ov1".into();
    req.oci_spec_json = spec(&["sh", "-c", "echo hi > /bin/new && cat /bin/new"]);
    req.rootfs = lower.display().to_string();
    req.rootfs_overlay = true;
    agent.client.create_container(ctx(), &req).await.unwrap();
    start(&agent, "ov1").await;
    assert_eq!(read_all_stdout(&agent, "ov1").await, "hi\n");
    assert!(!lower.join("bin/new").exists(), "the write reached the shared image");
    let mountinfo = format!("/proc/{}/mountinfo", agent.child.id());
    assert!(std::fs::read_to_string(&mountinfo).unwrap().contains("/overlay/ov1"));
    remove(&agent, "ov1").await.unwrap();
    assert!(!std::fs::read_to_string(&mountinfo).unwrap().contains("/overlay/ov1"), "overlay left mounted");
    assert!(!agent.state_dir.join("overlay/ov1").exists());
    agent.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_process_of_a_container_is_listed_and_signalled_at_once() {
    if !can_run() {
        return;
    }
    let agent = start_agent().await;
    create(&agent, "all1", &["sh", "-c", "sleep 1000 & sleep 1000 & wait"]).await.unwrap();
    start(&agent, "all1").await;
    let mut req = ironclad_protocol::agent::ContainerRequest::new();
    req.container_id = "all1".into();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut pids = Vec::new();
    while pids.len() < 3 && Instant::now() < deadline {
        pids = agent.client.list_processes(ctx(), &req).await.unwrap().pids;
    }
    assert_eq!(pids.len(), 3, "{pids:?}");
    let mut kill = ironclad_protocol::agent::SignalProcessRequest::new();
    kill.process = Some(process("all1")).into();
    kill.signal = 9;
    kill.all = true;
    agent.client.signal_process(ctx(), &kill).await.unwrap();
    assert_eq!(agent.client.wait_process(ctx(), &process("all1")).await.unwrap().exit_status, 137);
    let mut bad = ironclad_protocol::agent::UpdateContainerRequest::new();
    bad.container_id = "all1".into();
    bad.resources_json = "{\"memory\": 5}".into();
    assert_eq!(code_of(agent.client.update_container(ctx(), &bad).await), ttrpc::Code::INVALID_ARGUMENT);
    bad.container_id = "nope".into();
    bad.resources_json = "{}".into();
    assert_eq!(code_of(agent.client.update_container(ctx(), &bad).await), ttrpc::Code::NOT_FOUND);
    remove(&agent, "all1").await.unwrap();
    agent.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_joins_the_sandbox_containers_namespaces() {
    use libcontainer::oci_spec::runtime::{LinuxNamespaceBuilder, LinuxNamespaceType};
    if !can_run() {
        return;
    }
    let agent = start_agent().await;
    let pause = spec_with(&["sleep", "1000"], |spec| {
        spec.set_hostname(Some("pod-a".into()));
    });
    create_with_spec(&agent, "pause1", &serde_json::to_string(&pause).unwrap()).await.unwrap();
    start(&agent, "pause1").await;
    // As a pod's spec says it on the host: paths into the pause container's namespaces.
    let member = spec_with(&["sh", "-c", "hostname; cat /proc/1/comm"], |spec| {
        let mut linux = spec.linux().clone().unwrap();
        let namespaces = [LinuxNamespaceType::Pid, LinuxNamespaceType::Uts, LinuxNamespaceType::Ipc]
            .into_iter()
            .map(|typ| LinuxNamespaceBuilder::default().typ(typ).path("/proc/4242/ns/x").build().unwrap())
            .chain(std::iter::once(
                LinuxNamespaceBuilder::default().typ(LinuxNamespaceType::Mount).build().unwrap(),
            ))
            .collect::<Vec<_>>();
        linux.set_namespaces(Some(namespaces));
        spec.set_linux(Some(linux));
    });
    let member_json = serde_json::to_string(&member).unwrap();
    // Without a sandbox container, a host path is refused.
    assert_eq!(
        code_of(create_with_spec(&agent, "member0", &member_json).await),
        ttrpc::Code::INVALID_ARGUMENT
    );
    let mut req = CreateContainerRequest::new();
    req.container_id = "member1".into();
    req.oci_spec_json = member_json;
    req.rootfs = busybox_rootfs(&agent.dir.path().join("member1")).display().to_string();
    req.sandbox_container = "pause1".into();
    agent.client.create_container(ctx(), &req).await.unwrap();
    start(&agent, "member1").await;
    assert_eq!(
        read_all_stdout(&agent, "member1").await,
        "pod-a\nsleep\n",
        "the pause container's uts and pid namespaces"
    );
    remove(&agent, "member1").await.unwrap();
    remove(&agent, "pause1").await.unwrap();
    agent.finish().await;
}

/// `ip ARGS` in the agent's network namespace.
fn ip_in(agent: &Agent, args: &[&str]) -> String {
    let output = Command::new("nsenter")
        .args(["-t", &agent.child.id().to_string(), "-n", "ip"])
        .args(args)
        .output()
        .unwrap();
    assert!(output.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interfaces_routes_and_neighbours_are_set_in_the_agents_network_namespace() {
    use ironclad_protocol::agent::{
        ARPNeighbor, AddARPNeighborsRequest, IPAddress, Interface, Route, UpdateInterfaceRequest,
        UpdateRoutesRequest,
    };
    if !can_run() {
        return;
    }
    let agent = start_agent_in(&["--net"], Cgroups::V2Mount).await;
    ip_in(&agent, &["link", "add", "eth0", "type", "veth", "peer", "name", "eth0-peer"]);
    ip_in(&agent, &["link", "set", "eth0-peer", "up"]);
    let mut interface = Interface::new();
    interface.name = "eth0".into();
    interface.addresses =
        vec![IPAddress { address: "10.20.0.2".into(), prefix_len: 24, ..Default::default() }];
    interface.mtu = 1400;
    interface.hw_addr = "02:00:00:00:00:0a".into();
    interface.up = true;
    let mut request = UpdateInterfaceRequest::new();
    request.interface = Some(interface.clone()).into();
    agent.client.update_interface(ctx(), &request).await.unwrap();
    let link = ip_in(&agent, &["-o", "link", "show", "eth0"]);
    assert!(link.contains("mtu 1400") && link.contains("link/ether 02:00:00:00:00:0a"), "{link}");
    assert!(ip_in(&agent, &["-o", "addr", "show", "eth0"]).contains("inet 10.20.0.2/24"));

    let route = |destination: &str| Route {
        destination: destination.into(),
        gateway: "10.20.0.1".into(),
        device: "eth0".into(),
        ..Default::default()
    };
    let mut routes = UpdateRoutesRequest::new();
    routes.routes = vec![route("10.30.0.0/16"), route("default")];
    agent.client.update_routes(ctx(), &routes).await.unwrap();
    let table = ip_in(&agent, &["route"]);
    assert!(table.contains("default via 10.20.0.1 dev eth0"), "{table}");
    assert!(table.contains("10.30.0.0/16 via 10.20.0.1 dev eth0"), "{table}");

    let mut neighbors = AddARPNeighborsRequest::new();
    neighbors.neighbors = vec![ARPNeighbor {
        ip_address: "10.20.0.9".into(),
        hw_addr: "02:00:00:00:00:09".into(),
        device: "eth0".into(),
        ..Default::default()
    }];
    agent.client.add_arp_neighbors(ctx(), &neighbors).await.unwrap();
    let neighbours = ip_in(&agent, &["neigh", "show", "dev", "eth0"]);
    assert!(neighbours.contains("10.20.0.9 lladdr 02:00:00:00:00:09 PERMANENT"), "{neighbours}");

    interface.name = "nope0".into();
    request.interface = Some(interface.clone()).into();
    assert_eq!(code_of(agent.client.update_interface(ctx(), &request).await), ttrpc::Code::NOT_FOUND);
    routes.routes = vec![route("10.30.0.0")];
    assert_eq!(code_of(agent.client.update_routes(ctx(), &routes).await), ttrpc::Code::INVALID_ARGUMENT);

    // An agent in the host's network namespace never touches the host's network.
    let shared = start_agent().await;
    routes.routes = vec![route("10.30.0.0/16")];
    assert_eq!(code_of(shared.client.update_routes(ctx(), &routes).await), ttrpc::Code::FAILED_PRECONDITION);
    shared.finish().await;
    agent.finish().await;
}

/// `args` under the spec's defaults with `resources` as its cgroup limits.
fn limited_spec(args: &[&str], resources: libcontainer::oci_spec::runtime::LinuxResources) -> String {
    serde_json::to_string(&spec_with(args, |spec| {
        let mut linux = spec.linux().clone().unwrap_or_default();
        linux.set_resources(Some(resources));
        spec.set_linux(Some(linux));
    }))
    .unwrap()
}

async fn stats_of(agent: &Agent, id: &str) -> ironclad_protocol::agent::StatsContainerResponse {
    let mut req = ironclad_protocol::agent::ContainerRequest::new();
    req.container_id = id.into();
    agent.client.stats_container(ctx(), &req).await.unwrap()
}

/// Limits need controllers, so here the agent uses the host's cgroups: cgroup v2 where the host
/// has its controllers there, else its v1 hierarchies (the same code path as the guest's v2 for
/// everything but where the files are).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_limit_oom_kills_an_allocation_loop_and_the_oom_event_names_the_container() {
    use libcontainer::oci_spec::runtime::{LinuxMemoryBuilder, LinuxResourcesBuilder};
    if !can_run() {
        return;
    }
    let agent = start_agent_in(&[], Cgroups::Host).await;
    const LIMIT: i64 = 32 << 20;
    // Swap as large as the limit means none: the loop cannot escape to swap space.
    let memory = LinuxMemoryBuilder::default().limit(LIMIT).swap(LIMIT).build().unwrap();
    let resources = LinuxResourcesBuilder::default().memory(memory).build().unwrap();
    // Doubles a shell string until the kernel's OOM killer ends it.
    let grow = r#"s=x; while true; do s="$s$s"; done"#;
    create_with_spec(&agent, "oom1", &limited_spec(&["sh", "-c", grow], resources)).await.unwrap();
    let oom = {
        let client = agent.client.clone();
        tokio::spawn(
            async move { client.get_oom_event(ctx(), &ironclad_protocol::agent::Empty::new()).await },
        )
    };
    start(&agent, "oom1").await;
    let status = agent.client.wait_process(ctx(), &process("oom1")).await.unwrap();
    assert_eq!(status.exit_status, 137, "the allocation loop was OOM-killed");
    let event = tokio::time::timeout(Duration::from_secs(10), oom).await.expect("an OOM event in time");
    assert_eq!(event.unwrap().unwrap().container_id, "oom1");
    let stats = stats_of(&agent, "oom1").await;
    assert_eq!(stats.memory.usage_limit, LIMIT as u64, "{stats:?}");
    assert!(stats.memory_events.oom_kill >= 1, "{stats:?}");
    assert!(stats.cpu.usage_usec > 0, "{stats:?}");
    assert!(!agent.cgroups_left("oom1").is_empty(), "the test looks where the cgroup is");
    remove(&agent, "oom1").await.unwrap();
    assert_eq!(agent.cgroups_left("oom1"), Vec::<PathBuf>::new(), "cgroup left behind");
    agent.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pids_limit_stops_forks_beyond_it() {
    use libcontainer::oci_spec::runtime::{LinuxPidsBuilder, LinuxResourcesBuilder};
    if !can_run() {
        return;
    }
    let agent = start_agent_in(&[], Cgroups::Host).await;
    let pids = LinuxPidsBuilder::default().limit(5).build().unwrap();
    let resources = LinuxResourcesBuilder::default().pids(pids).build().unwrap();
    // A subshell asks for ten children and gets three (it and the shell count too) before a fork is
    // refused and it gives up; the shell reports that and becomes a fourth sleeper.
    let script =
        "exec 2>&1; (for i in 1 2 3 4 5 6 7 8 9 10; do sleep 1000 </dev/null >/dev/null 2>&1 & done); \
                  echo refused; exec sleep 1000 >/dev/null 2>&1";
    create_with_spec(&agent, "pids1", &limited_spec(&["sh", "-c", script], resources)).await.unwrap();
    start(&agent, "pids1").await;
    let output = read_all_stdout(&agent, "pids1").await;
    assert_eq!(output, "sh: can't fork: Resource temporarily unavailable\nrefused\n");
    let mut req = ironclad_protocol::agent::ContainerRequest::new();
    req.container_id = "pids1".into();
    let listed = agent.client.list_processes(ctx(), &req).await.unwrap().pids;
    assert_eq!(listed.len(), 4, "{listed:?}");
    let stats = stats_of(&agent, "pids1").await;
    assert_eq!((stats.pids.current, stats.pids.limit), (4, 5), "{stats:?}");
    remove(&agent, "pids1").await.unwrap();
    assert!(listed.iter().all(|pid| !Path::new(&format!("/proc/{pid}")).exists()), "process left behind");
    assert_eq!(agent.cgroups_left("pids1"), Vec::<PathBuf>::new(), "cgroup left behind");
    agent.finish().await;
}

/// The agent's resident memory, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_whose_output_nobody_reads_blocks_instead_of_filling_the_agents_memory() {
    if !can_run() {
        return;
    }
    let agent = start_agent().await;
    // 64 MiB of output, then a mark in the container's root file system once all of it is out.
    let script = "dd if=/dev/zero bs=1048576 count=64 2>/dev/null; touch /all-written";
    create(&agent, "bp1", &["sh", "-c", script]).await.unwrap();
    let rss_before = rss_kib(agent.child.id());
    start(&agent, "bp1").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mark = agent.dir.path().join("bp1/rootfs/all-written");
    assert!(!mark.exists(), "the writer was not held back by the unread output");
    let grown = rss_kib(agent.child.id()).saturating_sub(rss_before);
    assert!(grown < 8 * 1024, "the agent buffered {grown} KiB of unread output");
    // Read now: every byte arrives, and the writer finishes.
    let mut total = 0usize;
    loop {
        let mut req = ReadStreamRequest::new();
        req.process = Some(process("bp1")).into();
        let chunk = agent.client.read_stdout(ctx(), &req).await.unwrap().data;
        if chunk.is_empty() {
            break;
        }
        assert!(chunk.iter().all(|b| *b == 0));
        total += chunk.len();
    }
    assert_eq!(total, 64 << 20);
    assert_eq!(agent.client.wait_process(ctx(), &process("bp1")).await.unwrap().exit_status, 0);
    assert!(mark.exists());
    remove(&agent, "bp1").await.unwrap();
    agent.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_sandbox_ends_the_agent_promptly_despite_calls_that_never_finish() {
    if !can_run() {
        return;
    }
    let agent = start_agent().await;
    // GetOOMEvent waits for an OOM kill that never comes: three such calls are in flight.
    let polls: Vec<_> = (0..3)
        .map(|_| {
            let client = agent.client.clone();
            tokio::spawn(
                async move { client.get_oom_event(ctx(), &ironclad_protocol::agent::Empty::new()).await },
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(polls.iter().all(|p| !p.is_finished()));
    let started = Instant::now();
    agent.finish().await;
    assert!(started.elapsed() < Duration::from_secs(3), "the shutdown took {:?}", started.elapsed());
    for poll in polls {
        // Ended by the destroy itself, with the reason, not cut off by the server going down (which
        // waited out its whole grace for them first).
        match poll.await.unwrap() {
            Err(ttrpc::Error::RpcStatus(status)) => {
                assert_eq!(status.code(), ttrpc::Code::UNAVAILABLE, "{status:?}");
                assert_eq!(status.message(), "the sandbox is being destroyed");
            }
            other => panic!("a long poll ended with {other:?}, not the destroy's reason"),
        }
    }
}

/// The spec's seccomp profile holds in the container, for its init process and an exec'd one (a
/// call it refuses fails with its errno, and the process shows a filter; libcontainer 0.7.0 left
/// exec'd processes unconfined, third_party/README.md), and the exec sees the masked and
/// read-only paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_specs_seccomp_profile_holds_for_the_init_and_an_exec() {
    if !can_run() {
        return;
    }
    let agent = start_agent().await;
    let probe = "grep Seccomp: /proc/self/status; mkdir /tmp/made 2>/dev/null && echo made || echo refused";
    let mut spec =
        serde_json::to_value(spec_with(&["sh", "-c", &format!("{probe}; sleep 1000")], |_| {})).unwrap();
    spec["linux"]["seccomp"] = serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    spec["linux"]["maskedPaths"] = serde_json::json!(["/proc/timer_list", "/sys/firmware"]);
    spec["linux"]["readonlyPaths"] = serde_json::json!(["/proc/sys"]);
    create_with_spec(&agent, "c1", &spec.to_string()).await.unwrap();
    start(&agent, "c1").await;
    let req = exec_request("c1", "e1", &["sh", "-c", probe]);
    agent.client.exec_process(ctx(), &req).await.unwrap();
    let exec_out = read_all(&agent, exec_ref("c1", "e1")).await;
    assert_eq!(exec_out, "Seccomp:\t2\nrefused\n", "the exec'd process");
    let mut init_out = String::new();
    while !init_out.ends_with("refused\n") && init_out.lines().count() < 2 {
        init_out.push_str(&read_chunk(&agent, process("c1")).await);
    }
    assert_eq!(init_out, "Seccomp:\t2\nrefused\n", "the init process");
    let req = exec_request("c1", "e2", &["cat", "/proc/self/mountinfo"]);
    agent.client.exec_process(ctx(), &req).await.unwrap();
    let mounts = read_all(&agent, exec_ref("c1", "e2")).await;
    assert!(mounts.contains(" /proc/timer_list "), "no masked path in the exec's view:\n{mounts}");
    assert!(mounts.contains(" /proc/sys ro,"), "no read-only path in the exec's view:\n{mounts}");
    remove(&agent, "c1").await.unwrap();
    agent.finish().await;
}
