#![allow(clippy::unwrap_used)] // test code: a failed step should stop the test right there

//! Kubernetes pods end to end: the kubelet's CRI calls (k8s-cri over gRPC) to a private
//! containerd's CRI plugin with the `ironclad` runtime handler. containerd, the CNI bridge and the
//! pods' network namespaces all live in a network namespace the test makes.

use std::path::Path;
use std::time::{Duration, Instant};

use ironclad_tests::containerd::{Artifacts, CRI_HANDLER};
use ironclad_tests::cri::{container, mount, Kubelet};
use k8s_cri::v1 as cri;

fn artifacts() -> Artifacts {
    Artifacts::of_this_build().unwrap_or_else(|err| panic!("{err}"))
}

/// Root, containerd, `ip` and the CNI plugins are needed; without them the test fails naming them
/// (or skips where IRONCLAD_ALLOW_SKIP=1 says so).
fn start_kubelet(prefix: &str) -> Option<Pods> {
    if !ironclad_test_prereq::needs()
        .root()
        .program("containerd")
        .program("ip")
        .file(Path::new("/usr/lib/cni/bridge"), "apt-get install containernetworking-plugins")
        .ready()
    {
        return None;
    }
    Some(Pods(Kubelet::start(&artifacts(), prefix).unwrap()))
}

/// The kubelet, with every call checked: a failure stops the test with containerd's log.
struct Pods(Kubelet);

impl Pods {
    fn check<T>(&self, result: Result<T, ironclad_tests::cri::Error>) -> T {
        result.unwrap_or_else(|err| {
            panic!(
                "{err}
containerd log:
{}",
                self.0.containerd.log_tail()
            )
        })
    }

    fn run_pod(&self, config: &cri::PodSandboxConfig) -> String {
        self.check(self.0.run_pod(config, CRI_HANDLER))
    }

    fn pod_config(&self, name: &str, network: cri::NamespaceMode) -> cri::PodSandboxConfig {
        self.check(self.0.pod_config(name, network))
    }

    fn create_container(
        &self,
        pod: &str,
        pod_config: &cri::PodSandboxConfig,
        config: cri::ContainerConfig,
    ) -> String {
        self.check(self.0.create_container(pod, pod_config, config))
    }

    fn start_container(&self, id: &str) {
        self.check(self.0.start_container(id))
    }

    fn exec(&self, id: &str, cmd: &[&str]) -> cri::ExecSyncResponse {
        self.check(self.0.exec(id, cmd))
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

    fn wait_exited(&self, id: &str) -> cri::ContainerStatus {
        self.check(self.0.wait_exited(id))
    }

    fn stop_and_remove_container(&self, id: &str) {
        self.check(self.0.stop_container(id));
        self.check(self.0.remove_container(id));
    }

    fn stop_and_remove_pod(&self, id: &str) {
        self.check(self.0.stop_and_remove_pod(id))
    }

    /// The shim's helper processes (VM monitor, vhost-device-vsock, virtiofsd) for this containerd.
    fn vm_processes(&self) -> Vec<(i32, String)> {
        self.0
            .containerd
            .leftover_processes()
            .into_iter()
            .filter(|(_, cmdline)| !cmdline.contains("containerd-shim-ironclad-v2"))
            .collect()
    }

    fn monitors(&self) -> Vec<i32> {
        self.vm_processes()
            .into_iter()
            // The monitor itself, not the jailer that started it (whose arguments name it).
            .filter(|(_, c)| {
                let program = c.split(' ').next().unwrap_or("");
                program.contains("qemu-system") || program.ends_with("ironclad-vmm")
            })
            .map(|(pid, _)| pid)
            .collect()
    }

    fn shim_processes(&self) -> Vec<(i32, String)> {
        self.0
            .containerd
            .leftover_processes()
            .into_iter()
            .filter(|(_, cmdline)| cmdline.contains("containerd-shim-ironclad-v2"))
            .collect()
    }

    /// No shim, VM or helper process, no mount below the shim's run root and no task directory.
    fn assert_nothing_left(&self) {
        let containerd = &self.0.containerd;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let processes = containerd.leftover_processes();
            let run_root = containerd.run_root.display().to_string();
            let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
            let ours = containerd.dir().display().to_string();
            // The shim's mounts, and the pods' network namespaces (nsfs mounts in the state dir).
            let mounts: Vec<&str> = mountinfo
                .lines()
                .filter(|l| l.contains(&run_root) || (l.contains(&ours) && l.contains(" nsfs ")))
                .collect();
            let dirs = std::fs::read_dir(containerd.run_root.join(containerd.namespace()))
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

fn host_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap()
}

/// One pod, one VM: the pause container and two containers share the guest (its boot id and
/// kernel), a host directory (written by one, read by the other and by the host, changed by the
/// host later), a read-only directory and a single file; ExecSync, exit codes, logs, memory
/// limits and OOM kills come back through CRI; the pod's teardown leaves nothing.
#[test]
fn a_pod_runs_in_one_vm_with_shared_host_directories() {
    let Some(kubelet) = start_kubelet("icripod") else { return };
    let pod_config = kubelet.pod_config("web", cri::NamespaceMode::Pod);
    let pod = kubelet.run_pod(&pod_config);
    let status = kubelet.check(kubelet.0.pod_status(&pod));
    assert_eq!(status.state, cri::PodSandboxState::SandboxReady as i32);
    let ip = status.network.map(|n| n.ip).unwrap_or_default();
    assert!(ip.starts_with("10.204.0."), "the pod has no CNI address: {ip:?}");

    let volumes = kubelet.0.work_dir().join("volumes");
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
    let monitors = kubelet.monitors();
    assert_eq!(monitors.len(), 1, "{:?}", kubelet.vm_processes());
    let boot_id = kubelet.exec_ok(&first, &["cat", "/proc/sys/kernel/random/boot_id"]);
    assert_eq!(kubelet.exec_ok(&second, &["cat", "/proc/sys/kernel/random/boot_id"]), boot_id);
    assert_ne!(boot_id, host_boot_id(), "the container runs on the host's kernel");
    assert!(kubelet.exec_ok(&second, &["uname", "-r"]).starts_with("6.12"));
    // The address PodSandboxStatus reports is the one the containers have.
    let shown = kubelet.exec_ok(&second, &["ip", "-o", "-4", "addr", "show", "eth0"]);
    assert!(shown.contains(&format!("inet {ip}/")), "{shown}");

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
    assert!(kubelet.check(kubelet.0.pod_ids()).is_empty());
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
    let Some(kubelet) = start_kubelet("icrikill") else { return };
    let host_network = kubelet.pod_config("hostnet", cri::NamespaceMode::Node);
    let refused = kubelet.0.run_pod(&host_network, CRI_HANDLER).expect_err("a hostNetwork pod was accepted");
    assert!(refused.to_string().contains("hostNetwork"), "{refused}");
    kubelet.assert_nothing_left();

    let pod_config = kubelet.pod_config("doomed", cri::NamespaceMode::Pod);
    let pod = kubelet.run_pod(&pod_config);
    let ids: Vec<String> = ["one", "two"]
        .iter()
        .map(|name| {
            let id = kubelet.create_container(&pod, &pod_config, container(name, &["sleep", "3600"], vec![]));
            kubelet.start_container(&id);
            id
        })
        .collect();
    let monitors = kubelet.monitors();
    assert_eq!(monitors.len(), 1, "{:?}", kubelet.vm_processes());
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(monitors[0]), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    for id in &ids {
        let status = kubelet.wait_exited(id);
        assert_ne!(status.exit_code, 0, "{status:?}");
        assert!(!status.reason.is_empty(), "no reason given: {status:?}");
    }
    for id in &ids {
        kubelet.check(kubelet.0.remove_container(id));
    }
    kubelet.stop_and_remove_pod(&pod);
    kubelet.assert_nothing_left();
}

/// The masked and read-only paths the kubelet sends for every container (its default proc mount);
/// containerd adds none of its own to a pod's containers.
const KUBELET_MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
];
const KUBELET_READONLY_PATHS: &[&str] =
    &["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"];

/// A container with a seccomp profile of type `profile` and the kubelet's masked and read-only paths.
fn confined(name: &str, profile: cri::security_profile::ProfileType) -> cri::ContainerConfig {
    let mut config = container(name, &["sleep", "3600"], vec![]);
    let paths = |list: &[&str]| list.iter().map(|p| p.to_string()).collect();
    config.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            seccomp: Some(cri::SecurityProfile {
                profile_type: profile as i32,
                localhost_ref: String::new(),
            }),
            masked_paths: paths(KUBELET_MASKED_PATHS),
            readonly_paths: paths(KUBELET_READONLY_PATHS),
            ..Default::default()
        }),
        ..Default::default()
    });
    config
}

/// Inside the guest, the spec's confinement holds as the kubelet asked for it: CRI's RuntimeDefault
/// seccomp profile refuses a call it blocks (`syslog`, which the same container unconfined may
/// make: the guest kernel does not restrict dmesg), and in both containers the masked paths read
/// as nothing and the read-only paths refuse writes.
#[test]
fn runtime_default_seccomp_masked_and_read_only_paths_hold_in_the_guest() {
    let Some(kubelet) = start_kubelet("icrisec") else { return };
    let pod_config = kubelet.pod_config("confined", cri::NamespaceMode::Pod);
    let pod = kubelet.run_pod(&pod_config);
    use cri::security_profile::ProfileType;
    let guarded =
        kubelet.create_container(&pod, &pod_config, confined("guarded", ProfileType::RuntimeDefault));
    kubelet.start_container(&guarded);
    let open = kubelet.create_container(&pod, &pod_config, confined("open", ProfileType::Unconfined));
    kubelet.start_container(&open);

    let seccomp_mode = |id: &str| kubelet.exec_ok(id, &["grep", "^Seccomp:", "/proc/self/status"]);
    assert_eq!(seccomp_mode(&guarded).split_whitespace().nth(1), Some("2"), "no seccomp filter");
    assert_eq!(
        seccomp_mode(&open).split_whitespace().nth(1),
        Some("0"),
        "a filter on an unconfined container"
    );
    let blocked = kubelet.exec(&guarded, &["dmesg"]);
    assert_ne!(blocked.exit_code, 0, "RuntimeDefault let syslog through");
    assert!(String::from_utf8_lossy(&blocked.stderr).contains("Operation not permitted"), "{blocked:?}");
    let allowed = kubelet.exec_ok(&open, &["dmesg"]);
    assert!(allowed.contains("Linux version"), "unconfined, dmesg read no kernel log: {allowed:?}");

    for id in [&guarded, &open] {
        // Masked: a file reads as nothing, a directory takes no file.
        assert_eq!(kubelet.exec_ok(id, &["sh", "-c", "wc -c < /proc/timer_list"]).trim(), "0");
        assert_ne!(kubelet.exec_ok(id, &["sh", "-c", "wc -c < /proc/uptime"]).trim(), "0");
        let masked_dir = kubelet.exec(id, &["touch", "/sys/firmware/planted"]);
        assert_ne!(masked_dir.exit_code, 0, "a masked directory took a file");
        // Read-only: /proc/sys refuses writes even to root in the container.
        let read_only = kubelet.exec(id, &["sh", "-c", "echo planted > /proc/sys/kernel/domainname"]);
        assert_ne!(read_only.exit_code, 0, "a read-only path took a write");
        assert!(
            String::from_utf8_lossy(&read_only.stderr).contains("Read-only file system"),
            "{read_only:?}"
        );
        assert_ne!(kubelet.exec_ok(id, &["cat", "/proc/sys/kernel/domainname"]).trim(), "planted");
    }

    for id in [&guarded, &open] {
        kubelet.stop_and_remove_container(id);
    }
    kubelet.stop_and_remove_pod(&pod);
    kubelet.assert_nothing_left();
}
