//! A kubelet's side of CRI for the tests and the benchmarks: a Rust CRI client (k8s-cri over
//! tonic) on a private containerd whose CRI plugin runs in a network namespace of its own, with a
//! CNI bridge configured in a directory of its own.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
pub use k8s_cri::v1 as api;
use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::containerd::{self, Artifacts, Containerd, BUSYBOX_IMAGE};
use crate::netns::TestNetns;

/// Every CRI call gets this long (a VM boots under emulation here).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(180);
/// The pods' network: only ever inside the namespace the kubelet makes.
pub const POD_SUBNET: &str = "10.204.0.0/24";
pub const POD_GATEWAY: &str = "10.204.0.1";
/// The CRI runtime handler for runc.
pub const RUNC_HANDLER: &str = "runc";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Containerd(#[from] containerd::Error),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to the CRI socket {socket}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("{call} failed: {}", status.message())]
    Call { call: &'static str, status: tonic::Status },
    #[error("{call}: no answer in {waited:?}")]
    Timeout { call: &'static str, waited: Duration },
    #[error("{call} answered without the {field} it must carry")]
    Missing { call: &'static str, field: &'static str },
    #[error("container {id} did not exit within {waited:?}")]
    NotExited { id: String, waited: Duration },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// A kubelet's view: a CRI client on a private containerd in a network namespace of its own.
pub struct Kubelet {
    runtime: tokio::runtime::Runtime,
    client: RuntimeServiceClient<Channel>,
    pub containerd: Containerd,
    /// Pod log directories and whatever the caller keeps there (host volumes).
    work: tempfile::TempDir,
    _cni: tempfile::TempDir,
    netns: TestNetns,
}

impl Kubelet {
    /// Starts containerd with its CRI plugin (namespace `<prefix>-<pid>`) and connects to it.
    pub fn start(artifacts: &Artifacts, prefix: &str) -> Result<Kubelet, Error> {
        let netns = TestNetns::new(prefix);
        let cni = tempfile::tempdir().map_err(io_err("CNI directory"))?;
        write_cni_config(cni.path())?;
        let containerd = Containerd::start_cri(artifacts, &netns.path, &cni.path().join("net.d"))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(io_err("tokio runtime"))?;
        let socket = containerd.socket().to_path_buf();
        let connector_socket = socket.clone();
        let connector = tower::service_fn(move |_: Uri| {
            let socket = connector_socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(socket).await?)) }
        });
        // The URI is unused: the connector always dials the socket.
        let endpoint = Endpoint::from_static("http://[::]");
        let channel = runtime
            .block_on(async move { endpoint.connect_with_connector(connector).await })
            .map_err(|source| Error::Connect { socket, source })?;
        let client = RuntimeServiceClient::new(channel);
        let work =
            tempfile::Builder::new().prefix("icri-").tempdir_in("/var/tmp").map_err(io_err("work dir"))?;
        Ok(Kubelet { runtime, client, containerd, work, _cni: cni, netns })
    }

    /// Runs `work` on a thread in the kubelet's network namespace, where the pods' bridge is.
    pub fn in_network<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        self.netns.run(work)
    }

    /// Where pod logs and the caller's files go; removed with the kubelet.
    pub fn work_dir(&self) -> &Path {
        self.work.path()
    }

    /// Runs one CRI call with a deadline.
    pub fn call<T, F>(
        &self,
        call: &'static str,
        request: impl FnOnce(RuntimeServiceClient<Channel>) -> F,
    ) -> Result<T, Error>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = self.client.clone();
        let answer =
            self.runtime.block_on(async move { tokio::time::timeout(CALL_TIMEOUT, request(client)).await });
        match answer {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(Error::Call { call, status }),
            Err(_) => Err(Error::Timeout { call, waited: CALL_TIMEOUT }),
        }
    }

    /// A pod named `name` with its own log directory, DNS settings and the given network mode.
    pub fn pod_config(
        &self,
        name: &str,
        network: cri::NamespaceMode,
    ) -> Result<cri::PodSandboxConfig, Error> {
        let log_directory = self.work.path().join("logs").join(name);
        std::fs::create_dir_all(&log_directory).map_err(io_err("pod log directory"))?;
        Ok(cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}"),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: format!("{name}-host"),
            log_directory: log_directory.display().to_string(),
            dns_config: Some(cri::DnsConfig {
                servers: vec!["10.204.0.53".into()],
                searches: vec!["pods.ironclad.test".into()],
                options: vec![],
            }),
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: network as i32,
                        pid: cri::NamespaceMode::Container as i32,
                        ipc: cri::NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    pub fn run_pod(&self, config: &cri::PodSandboxConfig, handler: &str) -> Result<String, Error> {
        let request =
            cri::RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: handler.into() };
        self.call("RunPodSandbox", |mut c| async move { c.run_pod_sandbox(request).await })
            .map(|r| r.pod_sandbox_id)
    }

    pub fn create_container(
        &self,
        pod: &str,
        pod_config: &cri::PodSandboxConfig,
        config: cri::ContainerConfig,
    ) -> Result<String, Error> {
        let request = cri::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config: Some(pod_config.clone()),
        };
        self.call("CreateContainer", |mut c| async move { c.create_container(request).await })
            .map(|r| r.container_id)
    }

    pub fn start_container(&self, id: &str) -> Result<(), Error> {
        let request = cri::StartContainerRequest { container_id: id.into() };
        self.call("StartContainer", |mut c| async move { c.start_container(request).await }).map(|_| ())
    }

    pub fn exec(&self, id: &str, cmd: &[&str]) -> Result<cri::ExecSyncResponse, Error> {
        let request = cri::ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 60,
        };
        self.call("ExecSync", |mut c| async move { c.exec_sync(request).await })
    }

    pub fn container_status(&self, id: &str) -> Result<cri::ContainerStatus, Error> {
        let request = cri::ContainerStatusRequest { container_id: id.into(), verbose: false };
        self.call("ContainerStatus", |mut c| async move { c.container_status(request).await })?
            .status
            .ok_or(Error::Missing { call: "ContainerStatus", field: "status" })
    }

    /// Waits until the container has exited; its status then.
    pub fn wait_exited(&self, id: &str) -> Result<cri::ContainerStatus, Error> {
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            let status = self.container_status(id)?;
            if status.state == cri::ContainerState::ContainerExited as i32 {
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(Error::NotExited { id: id.into(), waited: CALL_TIMEOUT });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn pod_status(&self, id: &str) -> Result<cri::PodSandboxStatus, Error> {
        let request = cri::PodSandboxStatusRequest { pod_sandbox_id: id.into(), verbose: false };
        self.call("PodSandboxStatus", |mut c| async move { c.pod_sandbox_status(request).await })?
            .status
            .ok_or(Error::Missing { call: "PodSandboxStatus", field: "status" })
    }

    pub fn stop_container(&self, id: &str) -> Result<(), Error> {
        let request = cri::StopContainerRequest { container_id: id.into(), timeout: 2 };
        self.call("StopContainer", |mut c| async move { c.stop_container(request).await }).map(|_| ())
    }

    pub fn remove_container(&self, id: &str) -> Result<(), Error> {
        let request = cri::RemoveContainerRequest { container_id: id.into() };
        self.call("RemoveContainer", |mut c| async move { c.remove_container(request).await }).map(|_| ())
    }

    pub fn stop_and_remove_pod(&self, id: &str) -> Result<(), Error> {
        let request = cri::StopPodSandboxRequest { pod_sandbox_id: id.into() };
        self.call("StopPodSandbox", |mut c| async move { c.stop_pod_sandbox(request).await })?;
        let request = cri::RemovePodSandboxRequest { pod_sandbox_id: id.into() };
        self.call("RemovePodSandbox", |mut c| async move { c.remove_pod_sandbox(request).await }).map(|_| ())
    }

    pub fn pod_ids(&self) -> Result<Vec<String>, Error> {
        let request = cri::ListPodSandboxRequest { filter: None };
        let listed = self.call("ListPodSandbox", |mut c| async move { c.list_pod_sandbox(request).await })?;
        Ok(listed.items.into_iter().map(|p| p.id).collect())
    }
}

impl Drop for Kubelet {
    /// Pods a failed test left go through CRI (their CNI teardown included) before containerd does.
    fn drop(&mut self) {
        if let Ok(pods) = self.pod_ids() {
            for pod in pods {
                let _ = self.stop_and_remove_pod(&pod);
            }
        }
    }
}

/// A bridge with host-local addresses, in `dir/net.d` (the CRI plugin's `conf_dir`); the plugins
/// are Debian's.
fn write_cni_config(dir: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(dir.join("net.d")).map_err(io_err("CNI conf_dir"))?;
    let conf = serde_json::json!({
        "cniVersion": "0.4.0",
        "name": "ironclad-cri",
        "plugins": [{
            "type": "bridge",
            "bridge": "icribr0",
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": POD_SUBNET, "gateway": POD_GATEWAY }]],
                "routes": [{ "dst": "0.0.0.0/0" }],
                "dataDir": dir.join("ipam"),
            }
        }, { "type": "loopback" }]
    });
    std::fs::write(dir.join("net.d/10-ironclad.conflist"), conf.to_string()).map_err(io_err("CNI conflist"))
}

/// A busybox container running `command`, logging to `<name>.log` in its pod's log directory.
pub fn container(name: &str, command: &[&str], mounts: Vec<cri::Mount>) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata { name: name.into(), attempt: 0 }),
        image: Some(cri::ImageSpec { image: BUSYBOX_IMAGE.into(), ..Default::default() }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        mounts,
        ..Default::default()
    }
}

pub fn mount(container_path: &str, host_path: &Path, readonly: bool) -> cri::Mount {
    cri::Mount {
        container_path: container_path.into(),
        host_path: host_path.display().to_string(),
        readonly,
        ..Default::default()
    }
}
