//! The agent's own container start next to runc's, on the host, the same busybox rootfs and the
//! same OCI spec (`runc spec`'s default running `true`): create + start, and create to exit. The
//! agent runs by hand in a mount namespace of its own and, like runc, puts its containers into the
//! host's cgroups (cgroup v2, or the v1 hierarchies where the host keeps its controllers there).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ironclad_protocol::agent::{
    CreateContainerRequest, ProcessRef, RemoveContainerRequest, StartContainerRequest,
};
use ironclad_protocol::agent_ttrpc::AgentClient;
use serde::Serialize;

use crate::stats::{summarize, Summary};

const AGENT_START_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Rootfs(#[from] ironclad_tests::containerd::Error),
    #[error("{0}")]
    Step(String),
    #[error("agent call {call} failed: {source}")]
    Rpc {
        call: &'static str,
        #[source]
        source: ttrpc::Error,
    },
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub runs: usize,
    /// The host's cgroup setup, which both runtimes use.
    pub cgroups: &'static str,
    /// "agent" and "runc": create + start, in ms.
    pub create_start_ms: BTreeMap<&'static str, Summary>,
    /// From create to the exit of `true` and the container's removal, in ms.
    pub create_to_removed_ms: BTreeMap<&'static str, Summary>,
    /// CreateContainer of two containers in one agent, "one after the other" and "at once", next to
    /// "one container alone", in ms: the agent locks its table only around its entries, so the two
    /// creates overlap.
    pub two_creates_ms: BTreeMap<&'static str, Summary>,
}

/// The agent, run by hand; killed (with its cgroup parent removed) when dropped.
struct HandRunAgent {
    child: Child,
    cgroup_parent: String,
}

impl Drop for HandRunAgent {
    fn drop(&mut self) {
        ironclad_tests::cgroups::clear_away(self.child.id(), &self.cgroup_parent);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn busybox_bundle(dir: &Path) -> Result<(PathBuf, serde_json::Value), Error> {
    let rootfs = dir.join("rootfs");
    ironclad_tests::containerd::busybox_rootfs(&rootfs)?;
    let output =
        Command::new("runc").args(["spec", "--bundle"]).arg(dir).output().map_err(io("runc spec"))?;
    if !output.status.success() {
        return Err(Error::Step(format!("runc spec: {}", String::from_utf8_lossy(&output.stderr))));
    }
    let text = std::fs::read_to_string(dir.join("config.json")).map_err(io("read config.json"))?;
    let mut spec: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Step(e.to_string()))?;
    spec["process"]["args"] = serde_json::json!(["true"]);
    spec["process"]["terminal"] = serde_json::json!(false);
    spec["root"]["readonly"] = serde_json::json!(false);
    std::fs::write(dir.join("config.json"), spec.to_string()).map_err(io("write config.json"))?;
    Ok((rootfs, spec))
}

fn start_agent(agent: &Path, dir: &Path) -> Result<(HandRunAgent, String), Error> {
    let socket = dir.join("agent.sock");
    let address = format!("unix://{}", socket.display());
    let cgroup_parent = format!("/ironclad-bench-{}", std::process::id());
    let child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"exec "$0" --listen "$1" --state-dir "$2" --cgroup-parent "$3""#)
        .arg(agent)
        .arg(&address)
        .arg(dir.join("state"))
        .arg(&cgroup_parent)
        .stdout(Stdio::null())
        .spawn()
        .map_err(io("start the agent"))?;
    let agent = HandRunAgent { child, cgroup_parent };
    let started = Instant::now();
    while !socket.exists() {
        if started.elapsed() > AGENT_START_TIMEOUT {
            return Err(Error::Step(format!("the agent did not create {}", socket.display())));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok((agent, address))
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(30_000_000_000)
}

/// One container through the agent: (create + start, create to removed) in ms.
async fn agent_run(client: &AgentClient, id: &str, spec: &str, rootfs: &Path) -> Result<(f64, f64), Error> {
    let rpc = |call| move |source| Error::Rpc { call, source };
    let started = Instant::now();
    let mut create = CreateContainerRequest::new();
    create.container_id = id.into();
    create.oci_spec_json = spec.into();
    create.rootfs = rootfs.display().to_string();
    client.create_container(ctx(), &create).await.map_err(rpc("CreateContainer"))?;
    let mut start = StartContainerRequest::new();
    start.container_id = id.into();
    client.start_container(ctx(), &start).await.map_err(rpc("StartContainer"))?;
    let create_start = started.elapsed().as_secs_f64() * 1000.0;
    let mut process = ProcessRef::new();
    process.container_id = id.into();
    let status = client.wait_process(ctx(), &process).await.map_err(rpc("WaitProcess"))?.exit_status;
    let mut remove = RemoveContainerRequest::new();
    remove.container_id = id.into();
    client.remove_container(ctx(), &remove).await.map_err(rpc("RemoveContainer"))?;
    if status != 0 {
        return Err(Error::Step(format!("`true` exited {status} in the agent")));
    }
    Ok((create_start, started.elapsed().as_secs_f64() * 1000.0))
}

async fn agent_create(client: &AgentClient, id: String, spec: &str, rootfs: &Path) -> Result<(), Error> {
    let mut create = CreateContainerRequest::new();
    create.container_id = id;
    create.oci_spec_json = spec.into();
    create.rootfs = rootfs.display().to_string();
    client
        .create_container(ctx(), &create)
        .await
        .map(drop)
        .map_err(|source| Error::Rpc { call: "CreateContainer", source })
}

async fn agent_remove(client: &AgentClient, id: String) -> Result<(), Error> {
    let mut remove = RemoveContainerRequest::new();
    remove.container_id = id;
    client
        .remove_container(ctx(), &remove)
        .await
        .map(drop)
        .map_err(|source| Error::Rpc { call: "RemoveContainer", source })
}

/// Creates two containers in the agent, one after the other or both at once, and removes them:
/// the time of the two creates, in ms.
async fn two_creates(
    client: &AgentClient,
    run: usize,
    at_once: bool,
    spec: &str,
    rootfs: &Path,
) -> Result<f64, Error> {
    let (a, b) = (format!("pair{run}a"), format!("pair{run}b"));
    let started = Instant::now();
    if at_once {
        let (first, second) = tokio::join!(
            agent_create(client, a.clone(), spec, rootfs),
            agent_create(client, b.clone(), spec, rootfs)
        );
        first.and(second)?;
    } else {
        agent_create(client, a.clone(), spec, rootfs).await?;
        agent_create(client, b.clone(), spec, rootfs).await?;
    }
    let elapsed = started.elapsed().as_secs_f64() * 1000.0;
    let (first, second) = tokio::join!(agent_remove(client, a), agent_remove(client, b));
    first.and(second)?;
    Ok(elapsed)
}

/// Runs runc. Its stderr goes to a file: `runc create` hands its stdio to the container, and a pipe
/// would stay open until the container exits.
fn runc(root: &Path, args: &[&str]) -> Result<(), Error> {
    let stderr_path = root.with_extension("stderr");
    let stderr = std::fs::File::create(&stderr_path).map_err(io("create runc's stderr file"))?;
    let status = Command::new("runc")
        .arg("--root")
        .arg(root)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .status()
        .map_err(io("run runc"))?;
    if status.success() {
        Ok(())
    } else {
        let said = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        Err(Error::Step(format!("runc {} ({status}): {}", args.join(" "), said.trim())))
    }
}

/// Force-deletes whatever runc still holds in its state directory when dropped, so that an error
/// half way leaves no container behind.
struct RuncRoot(PathBuf);

impl Drop for RuncRoot {
    fn drop(&mut self) {
        let listed = Command::new("runc").arg("--root").arg(&self.0).args(["list", "-q"]).output();
        let ids = listed.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        for id in ids.lines().filter(|l| !l.is_empty()) {
            let _ = runc(&self.0, &["delete", "--force", id]);
        }
    }
}

/// One container through runc: (create + start, create to deleted) in ms.
fn runc_run(root: &Path, bundle: &Path, id: &str) -> Result<(f64, f64), Error> {
    let bundle = bundle.display().to_string();
    let started = Instant::now();
    runc(root, &["create", "--bundle", &bundle, id])?;
    runc(root, &["start", id])?;
    let create_start = started.elapsed().as_secs_f64() * 1000.0;
    // `true` exits at once; delete waits for nothing else.
    let deadline = Instant::now() + Duration::from_secs(10);
    while runc(root, &["delete", id]).is_err() {
        if Instant::now() > deadline {
            runc(root, &["delete", "--force", id])?;
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok((create_start, started.elapsed().as_secs_f64() * 1000.0))
}

pub fn measure(agent: &Path, runs: usize) -> Result<Results, Error> {
    let dir = tempfile::Builder::new().prefix("ironclad-bench-agent-").tempdir().map_err(io("temp dir"))?;
    let (rootfs, spec) = busybox_bundle(dir.path())?;
    let runc_root = RuncRoot(dir.path().join("runc-state"));
    let (_agent, address) = start_agent(agent, dir.path())?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(io("tokio"))?;
    let client = runtime.block_on(async {
        ttrpc::r#async::Client::connect(&address)
            .await
            .map(AgentClient::new)
            .map_err(|source| Error::Rpc { call: "connect", source })
    })?;
    let spec = spec.to_string();
    let mut create_start: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    let mut total: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    for run in 0..runs {
        let id = format!("bench{run}");
        let (cs, t) = runtime.block_on(agent_run(&client, &id, &spec, &rootfs))?;
        create_start.entry("agent").or_default().push(cs);
        total.entry("agent").or_default().push(t);
        let (cs, t) = runc_run(&runc_root.0, dir.path(), &id)?;
        create_start.entry("runc").or_default().push(cs);
        total.entry("runc").or_default().push(t);
    }
    let mut pairs: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    for run in 0..runs {
        let alone = runtime.block_on(async {
            let id = format!("alone{run}");
            let started = Instant::now();
            agent_create(&client, id.clone(), &spec, &rootfs).await?;
            let elapsed = started.elapsed().as_secs_f64() * 1000.0;
            agent_remove(&client, id).await.map(|()| elapsed)
        })?;
        pairs.entry("one container alone").or_default().push(alone);
        let serial = runtime.block_on(two_creates(&client, run, false, &spec, &rootfs))?;
        pairs.entry("one after the other").or_default().push(serial);
        let parallel = runtime.block_on(two_creates(&client, run, true, &spec, &rootfs))?;
        pairs.entry("at once").or_default().push(parallel);
    }
    let summarize_all = |samples: BTreeMap<&'static str, Vec<f64>>| {
        samples.into_iter().filter_map(|(k, v)| Some((k, summarize(&v)?))).collect()
    };
    Ok(Results {
        runs,
        cgroups: host_cgroup_setup(),
        create_start_ms: summarize_all(create_start),
        create_to_removed_ms: summarize_all(total),
        two_creates_ms: summarize_all(pairs),
    })
}

/// How the host mounts its cgroups, as the agent's cgroup library sees it: one v2 tree, or v1
/// hierarchies (hybrid: with an empty v2 tree beside them).
fn host_cgroup_setup() -> &'static str {
    use libcgroups::common::CgroupSetup;
    match libcgroups::common::get_cgroup_setup() {
        Ok(CgroupSetup::Unified) => "cgroup v2",
        Ok(CgroupSetup::Hybrid) => "cgroup v1 controllers, hybrid",
        Ok(CgroupSetup::Legacy) => "cgroup v1",
        Err(_) => "cgroup setup not recognised",
    }
}
