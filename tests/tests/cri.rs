#![allow(clippy::unwrap_used)] // test code: a failed step should stop the test right there

//! Kubernetes pods end to end: the kubelet's CRI calls (k8s-cri over gRPC) to a private
//! containerd's CRI plugin with the `ironclad` runtime handler. containerd, the CNI bridge and the
//! pods' network namespaces all live in a network namespace the test makes.

use std::path::Path;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use ironclad_tests::containerd::{Artifacts, Containerd, BUSYBOX_IMAGE, CRI_HANDLER};
use ironclad_tests::netns::TestNetns;
use ironclad_tests::GuestArtifacts;
use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

/// Every CRI call gets this long (a VM boots under emulation here).
const CALL_TIMEOUT: Duration = Duration::from_secs(180);
/// The pods' network: only ever inside the test's namespace.
const POD_SUBNET: &str = "10.204.0.0/24";
const POD_GATEWAY: &str = "10.204.0.1";

fn artifacts() -> Artifacts {
    let guest = GuestArtifacts::locate().unwrap_or_else(|err| panic!("{err}"));
    let shim_dir = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().to_path_buf();
    assert!(
        shim_dir.join("containerd-shim-ironclad-v2").is_file(),
        "build the shim first (cargo build -p ironclad-shim)"
    );
    Artifacts {
        kernel: guest.kernel,
        initrd: guest.initrd,
        shim_dir,
        hypervisor: std::env::var("IRONCLAD_HYPERVISOR").unwrap_or_else(|_| "auto".into()),
    }
}

/// A kubelet's view: a CRI client on a private containerd in the test's own network namespace.
struct Kubelet {
    runtime: tokio::runtime::Runtime,
    client: RuntimeServiceClient<Channel>,
    containerd: Containerd,
    /// Pod log directories and host volumes.
    work: tempfile::TempDir,
    _cni: tempfile::TempDir,
    _netns: TestNetns,
}

impl Kubelet {
    fn start(prefix: &str) -> Option<Kubelet> {
        if !ironclad_test_prereq::needs()
            .root()
            .program("containerd")
            .program("ip")
            .file(Path::new("/usr/lib/cni/bridge"), "apt-get install containernetworking-plugins")
            .ready()
        {
            return None;
        }
        let netns = TestNetns::new(prefix);
        let cni = tempfile::tempdir().unwrap();
        write_cni_config(cni.path());
        let containerd = Containerd::start_cri(&artifacts(), &netns.path, &cni.path().join("net.d")).unwrap();
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let socket = containerd.socket().to_path_buf();
        let channel = runtime
            .block_on(Endpoint::try_from("http://[::]").unwrap().connect_with_connector(tower::service_fn(
                move |_: Uri| {
                    let socket = socket.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(socket).await?))
                    }
                },
            )))
            .unwrap();
        let client = RuntimeServiceClient::new(channel);
        let work = tempfile::Builder::new().prefix("icri-").tempdir_in("/var/tmp").unwrap();
        Some(Kubelet { runtime, client, containerd, work, _cni: cni, _netns: netns })
    }

    /// Runs one CRI call with a deadline; a failure says what containerd logged.
    fn call<T, F>(
        &self,
        what: &str,
        call: impl FnOnce(RuntimeServiceClient<Channel>) -> F,
    ) -> Result<T, tonic::Status>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = self.client.clone();
        match self.runtime.block_on(async move { tokio::time::timeout(CALL_TIMEOUT, call(client)).await }) {
            Ok(result) => result.map(tonic::Response::into_inner),
            Err(_) => panic!("{what}: no answer in {CALL_TIMEOUT:?}\n{}", self.containerd.log_tail()),
        }
    }

    fn ok<T, F>(&self, what: &str, call: impl FnOnce(RuntimeServiceClient<Channel>) -> F) -> T
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call(what, call).unwrap_or_else(|status| {
            panic!("{what} failed: {status}\ncontainerd log:\n{}", self.containerd.log_tail())
        })
    }

    fn pod_config(&self, name: &str, network: cri::NamespaceMode) -> cri::PodSandboxConfig {
        let log_directory = self.work.path().join("logs").join(name);
        std::fs::create_dir_all(&log_directory).unwrap();
        cri::PodSandboxConfig {
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
        }
    }

    fn run_pod(&self, config: &cri::PodSandboxConfig) -> Result<String, tonic::Status> {
        let request =
            cri::RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: CRI_HANDLER.into() };
        self.call("RunPodSandbox", |mut c| async move { c.run_pod_sandbox(request).await })
            .map(|r| r.pod_sandbox_id)
    }

    fn create_container(
        &self,
        pod: &str,
        pod_config: &cri::PodSandboxConfig,
        config: cri::ContainerConfig,
    ) -> String {
        let request = cri::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config: Some(pod_config.clone()),
        };
        self.ok("CreateContainer", |mut c| async move { c.create_container(request).await }).container_id
    }

    fn start_container(&self, id: &str) {
        let request = cri::StartContainerRequest { container_id: id.into() };
        self.ok("StartContainer", |mut c| async move { c.start_container(request).await });
    }

    fn exec(&self, id: &str, cmd: &[&str]) -> cri::ExecSyncResponse {
        let request = cri::ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 60,
        };
        self.ok("ExecSync", |mut c| async move { c.exec_sync(request).await })
    }

    /// ExecSync whose command must succeed; its stdout.
    fn exec_ok(&self, id: &str, cmd: &[&str]) -> String {
        let response = self.exec(id, cmd);
        assert_eq!(
            response.exit_code,
            0,
            "{cmd:?} in {id}: stderr {}",
            String::from_utf8_lossy(&response.stderr)
        );
        String::from_utf8_lossy(&response.stdout).into_owned()
    }

    fn container_status(&self, id: &str) -> cri::ContainerStatus {
        let request = cri::ContainerStatusRequest { container_id: id.into(), verbose: false };
        self.ok("ContainerStatus", |mut c| async move { c.container_status(request).await }).status.unwrap()
    }

    /// Waits until the container has exited; its status then.
    fn wait_exited(&self, id: &str) -> cri::ContainerStatus {
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            let status = self.container_status(id);
            if status.state == cri::ContainerState::ContainerExited as i32 {
                return status;
            }
            assert!(Instant::now() < deadline, "{id} did not exit: {status:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn pod_status(&self, id: &str) -> cri::PodSandboxStatus {
        let request = cri::PodSandboxStatusRequest { pod_sandbox_id: id.into(), verbose: false };
        self.ok("PodSandboxStatus", |mut c| async move { c.pod_sandbox_status(request).await })
            .status
            .unwrap()
    }

    fn stop_and_remove_container(&self, id: &str) {
        let request = cri::StopContainerRequest { container_id: id.into(), timeout: 2 };
        self.ok("StopContainer", |mut c| async move { c.stop_container(request).await });
        let request = cri::RemoveContainerRequest { container_id: id.into() };
        self.ok("RemoveContainer", |mut c| async move { c.remove_container(request).await });
    }

    fn stop_and_remove_pod(&self, id: &str) {
        let request = cri::StopPodSandboxRequest { pod_sandbox_id: id.into() };
        self.ok("StopPodSandbox", |mut c| async move { c.stop_pod_sandbox(request).await });
        let request = cri::RemovePodSandboxRequest { pod_sandbox_id: id.into() };
        self.ok("RemovePodSandbox", |mut c| async move { c.remove_pod_sandbox(request).await });
    }

    fn pod_ids(&self) -> Vec<String> {
        let request = cri::ListPodSandboxRequest { filter: None };
        let listed = self.ok("ListPodSandbox", |mut c| async move { c.list_pod_sandbox(request).await });
        listed.items.into_iter().map(|p| p.id).collect()
    }

    /// The VM monitors (QEMU or ironclad-vmm) and helpers running for this containerd's pods.
    fn vm_processes(&self) -> Vec<(i32, String)> {
        self.containerd
            .leftover_processes()
            .into_iter()
            .filter(|(_, cmdline)| !cmdline.contains("containerd-shim-ironclad-v2"))
            .collect()
    }

    fn shim_processes(&self) -> Vec<(i32, String)> {
        self.containerd
            .leftover_processes()
            .into_iter()
            .filter(|(_, cmdline)| cmdline.contains("containerd-shim-ironclad-v2"))
            .collect()
    }

    /// No shim, VM or helper process, no mount below the shim's run root and no task directory.
    fn assert_nothing_left(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let processes = self.containerd.leftover_processes();
            let run_root = self.containerd.run_root.display().to_string();
            let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
            let mounts: Vec<&str> = mountinfo.lines().filter(|l| l.contains(&run_root)).collect();
            let dirs = std::fs::read_dir(self.containerd.run_root.join(self.containerd.namespace()))
                .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
                .unwrap_or_default();
            if processes.is_empty() && mounts.is_empty() && dirs.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "left behind: processes {processes:?}; mounts {mounts:?}; task directories {dirs:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A bridge with host-local addresses, in the test's own CNI directory (the CRI plugin's
/// `conf_dir`); the plugins are Debian's.
fn write_cni_config(dir: &Path) {
    std::fs::create_dir_all(dir.join("net.d")).unwrap();
    let conf = serde_json::json!({
        "cniVersion": "0.4.0",
        "name": "ironclad-cri-test",
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
    std::fs::write(dir.join("net.d/10-ironclad.conflist"), conf.to_string()).unwrap();
}

fn container(name: &str, command: &[&str], mounts: Vec<cri::Mount>) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata { name: name.into(), attempt: 0 }),
        image: Some(cri::ImageSpec { image: BUSYBOX_IMAGE.into(), ..Default::default() }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        mounts,
        ..Default::default()
    }
}

fn mount(container_path: &str, host_path: &Path, readonly: bool) -> cri::Mount {
    cri::Mount {
        container_path: container_path.into(),
        host_path: host_path.display().to_string(),
        readonly,
        ..Default::default()
    }
}

fn host_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap()
}

/// One pod, one VM: the pause container and two containers share the guest (its boot id and
/// kernel), a host directory (written by one, read by the other and by the host, changed by the
/// host later), a read-only directory and a single file; ExecSync, exit codes, logs, memory
/// limits and OOM kills come back through CRI; the pod's teardown leaves nothing.
#[test]
fn a_pod_runs_in_one_vm_with_shared_host_directories() {
    let Some(kubelet) = Kubelet::start("icripod") else { return };
    let pod_config = kubelet.pod_config("web", cri::NamespaceMode::Pod);
    let pod = kubelet
        .run_pod(&pod_config)
        .unwrap_or_else(|status| panic!("RunPodSandbox failed: {status}\n{}", kubelet.containerd.log_tail()));
    let status = kubelet.pod_status(&pod);
    assert_eq!(status.state, cri::PodSandboxState::SandboxReady as i32);
    let ip = status.network.map(|n| n.ip).unwrap_or_default();
    assert!(ip.starts_with("10.204.0."), "the pod has no CNI address: {ip:?}");

    let volumes = kubelet.work.path().join("volumes");
    let (data, config_dir) = (volumes.join("data"), volumes.join("config"));
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::write(config_dir.join("setting"), "from a configMap\n").unwrap();
    let single = volumes.join("motd");
    std::fs::write(&single, "a single host file\n").unwrap();
    let mounts = || {
        vec![
            mount("/data", &data, false),
            mount("/config", &config_dir, true),
            mount("/etc/motd", &single, true),
        ]
    };
    let sleeper = ["sleep", "3600"];
    let first = kubelet.create_container(&pod, &pod_config, container("first", &sleeper, mounts()));
    kubelet.start_container(&first);
    let second = kubelet.create_container(&pod, &pod_config, container("second", &sleeper, mounts()));
    kubelet.start_container(&second);

    // One VM and one shim serve the pod.
    assert_eq!(kubelet.shim_processes().len(), 1, "{:?}", kubelet.shim_processes());
    let monitors: Vec<_> = kubelet
        .vm_processes()
        .into_iter()
        .filter(|(_, c)| c.contains("qemu-system") || c.contains("ironclad-vmm"))
        .collect();
    assert_eq!(monitors.len(), 1, "{monitors:?}");
    let boot_id = kubelet.exec_ok(&first, &["cat", "/proc/sys/kernel/random/boot_id"]);
    assert_eq!(kubelet.exec_ok(&second, &["cat", "/proc/sys/kernel/random/boot_id"]), boot_id);
    assert_ne!(boot_id, host_boot_id(), "the container runs on the host's kernel");
    assert!(kubelet.exec_ok(&second, &["uname", "-r"]).starts_with("6.12"));

    // The host directory: one container writes, the other reads, the host sees it, and a file the
    // host writes later shows in the guest.
    kubelet.exec_ok(&first, &["sh", "-c", "echo from-first > /data/note"]);
    assert_eq!(kubelet.exec_ok(&second, &["cat", "/data/note"]), "from-first\n");
    assert_eq!(std::fs::read_to_string(data.join("note")).unwrap(), "from-first\n");
    std::fs::write(data.join("later"), "written on the host\n").unwrap();
    assert_eq!(kubelet.exec_ok(&second, &["cat", "/data/later"]), "written on the host\n");
    assert_eq!(kubelet.exec_ok(&first, &["cat", "/config/setting"]), "from a configMap\n");
    let refused = kubelet.exec(&first, &["sh", "-c", "echo x > /config/new"]);
    assert_ne!(refused.exit_code, 0, "a read-only volume took a write");
    assert!(!config_dir.join("new").exists());
    assert_eq!(kubelet.exec_ok(&second, &["cat", "/etc/motd"]), "a single host file\n");

    // Hostname and DNS are the pod's.
    assert_eq!(kubelet.exec_ok(&first, &["hostname"]).trim(), "web-host");
    let resolv = kubelet.exec_ok(&first, &["cat", "/etc/resolv.conf"]);
    assert!(
        resolv.contains("nameserver 10.204.0.53") && resolv.contains("search pods.ironclad.test"),
        "{resolv}"
    );
    // /dev/shm is one tmpfs of the guest for the whole pod.
    kubelet.exec_ok(&first, &["sh", "-c", "echo shm > /dev/shm/token"]);
    assert_eq!(kubelet.exec_ok(&second, &["cat", "/dev/shm/token"]), "shm\n");

    // ExecSync: stdout, stderr and the exit code.
    let response = kubelet.exec(&first, &["sh", "-c", "echo out; echo err >&2; exit 7"]);
    assert_eq!(
        (response.stdout.as_slice(), response.stderr.as_slice(), response.exit_code),
        (&b"out\n"[..], &b"err\n"[..], 7)
    );

    // A container that exits: its code through ContainerStatus, its output in the CRI log.
    let exiting = kubelet.create_container(
        &pod,
        &pod_config,
        container("exits", &["sh", "-c", "echo bye; exit 3"], vec![]),
    );
    kubelet.start_container(&exiting);
    let status = kubelet.wait_exited(&exiting);
    assert_eq!(status.exit_code, 3, "{status:?}");
    let log =
        std::fs::read_to_string(Path::new(&pod_config.log_directory).join("exits.log")).unwrap_or_default();
    assert!(log.lines().any(|l| l.ends_with(" stdout F bye")), "CRI log: {log:?}");

    // A CRI memory limit is the container's cgroup limit in the guest; going over it is an OOM kill.
    let mut limited = container("limited", &sleeper, vec![]);
    limited.linux = limited_resources(32 << 20);
    let limited = kubelet.create_container(&pod, &pod_config, limited);
    kubelet.start_container(&limited);
    assert_eq!(kubelet.exec_ok(&limited, &["cat", "/sys/fs/cgroup/memory.max"]).trim(), "33554432");
    let mut hog = container("hog", &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"], vec![]);
    hog.linux = limited_resources(32 << 20);
    let hog = kubelet.create_container(&pod, &pod_config, hog);
    kubelet.start_container(&hog);
    let status = kubelet.wait_exited(&hog);
    assert_eq!((status.exit_code, status.reason.as_str()), (137, "OOMKilled"), "{status:?}");

    for id in [&first, &second, &exiting, &limited, &hog] {
        kubelet.stop_and_remove_container(id);
    }
    kubelet.stop_and_remove_pod(&pod);
    assert!(kubelet.pod_ids().is_empty());
    kubelet.assert_nothing_left();
    // The host's volumes are as the pod left them.
    assert_eq!(std::fs::read_to_string(data.join("note")).unwrap(), "from-first\n");
}

fn limited_resources(bytes: i64) -> Option<cri::LinuxContainerConfig> {
    Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources { memory_limit_in_bytes: bytes, ..Default::default() }),
        ..Default::default()
    })
}

/// A pod with hostNetwork is refused at RunPodSandbox, by name, and leaves nothing; a VM killed
/// from outside ends every container of its pod with a reason.
#[test]
fn host_network_is_refused_and_a_killed_vm_ends_the_whole_pod() {
    let Some(kubelet) = Kubelet::start("icrikill") else { return };
    let host_network = kubelet.pod_config("hostnet", cri::NamespaceMode::Node);
    let refused = kubelet.run_pod(&host_network).expect_err("a hostNetwork pod was accepted");
    assert!(refused.message().contains("hostNetwork"), "{refused}");
    kubelet.assert_nothing_left();

    let pod_config = kubelet.pod_config("doomed", cri::NamespaceMode::Pod);
    let pod = kubelet.run_pod(&pod_config).unwrap();
    let ids: Vec<String> = ["one", "two"]
        .iter()
        .map(|name| {
            let id = kubelet.create_container(&pod, &pod_config, container(name, &["sleep", "3600"], vec![]));
            kubelet.start_container(&id);
            id
        })
        .collect();
    let monitors: Vec<i32> = kubelet
        .vm_processes()
        .into_iter()
        .filter(|(_, c)| c.contains("qemu-system") || c.contains("ironclad-vmm"))
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(monitors.len(), 1, "{monitors:?}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(monitors[0]), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    for id in &ids {
        let status = kubelet.wait_exited(id);
        assert_ne!(status.exit_code, 0, "{status:?}");
        assert!(!status.reason.is_empty(), "no reason given: {status:?}");
    }
    for id in &ids {
        let request = cri::RemoveContainerRequest { container_id: id.clone() };
        kubelet.ok("RemoveContainer", |mut c| async move { c.remove_container(request).await });
    }
    kubelet.stop_and_remove_pod(&pod);
    kubelet.assert_nothing_left();
}
