#![allow(clippy::unwrap_used)] // test code: a failed step should stop the test right there

//! Containers inside the real guest (QEMU here): the rootfs is an ext4 image on a virtio-blk disk
//! that the agent finds by its serial, and the container sees the guest's kernel and its own cgroup.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;

use ironclad_protocol::agent::{CreateContainerRequest, Storage};
use ironclad_shim::agent_client::{AgentClient, AGENT_PORT};
use ironclad_shim::hypervisor::BlockDevice;
use ironclad_tests::{boot_guest, init_logging, GuestArtifacts, EXIT_TIMEOUT};
use oci_spec::runtime::{LinuxNamespaceType, RootBuilder, Spec};

const BUSYBOX: &str = "/bin/busybox";
/// How long one read of a container's output may wait (the guest runs emulated here).
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// An ext4 image of a busybox root file system, made with mkfs.ext4 -d.
fn busybox_image(dir: &Path) -> std::path::PathBuf {
    let rootfs = busybox_tree(dir);
    let image = dir.join("rootfs.ext4");
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "rootfs", "-d"])
        .arg(&rootfs)
        .arg(&image)
        .arg("16M")
        .status()
        .unwrap();
    assert!(status.success(), "mkfs.ext4 -d failed");
    image
}

/// A busybox root file system in `dir/rootfs`.
fn busybox_tree(dir: &Path) -> std::path::PathBuf {
    assert!(Path::new(BUSYBOX).exists(), "{BUSYBOX} is needed (apt-get install busybox-static)");
    let rootfs = dir.join("rootfs");
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "run"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::copy(BUSYBOX, rootfs.join("bin/busybox")).unwrap();
    for applet in ["sh", "uname", "cat", "echo", "dd", "hostname", "date"] {
        symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    // Bind-mount targets must exist in a read-only root.
    std::fs::write(rootfs.join("etc/resolv.conf"), b"").unwrap();
    rootfs
}

/// A busybox container without a cgroup namespace of its own in the spec (the agent gives it one
/// anyway: the guest's cgroups are v2).
fn base_spec(args: &[&str]) -> Spec {
    let mut spec = ironclad_tests::busybox_spec(args, true);
    let mut linux = spec.linux().clone().unwrap();
    let namespaces = linux.namespaces().clone().unwrap_or_default();
    let kept = namespaces.into_iter().filter(|n| n.typ() != LinuxNamespaceType::Cgroup).collect::<Vec<_>>();
    linux.set_namespaces(Some(kept));
    spec.set_linux(Some(linux));
    spec
}

fn rootfs_storage(mount_point: &str) -> Storage {
    let mut storage = Storage::new();
    storage.serial = "rootfs".into();
    storage.fstype = "ext4".into();
    storage.mount_point = mount_point.into();
    storage.read_only = true;
    storage
}

async fn boot_with_rootfs_disk(dir: &Path) -> ironclad_tests::BootedGuest {
    let image = busybox_image(dir);
    let mut config = GuestArtifacts::locate().unwrap().vm_config();
    config.block_devices = vec![BlockDevice { path: image, read_only: true, serial: "rootfs".into() }];
    boot_guest(&config).await.expect("boot")
}

/// A failed call, with what the guest printed: libcontainer and the kernel say why there.
fn explain(guest: &ironclad_tests::BootedGuest, err: &dyn std::error::Error) -> String {
    let chain = ironclad_shim::hypervisor::error_chain(err);
    format!("{chain}\nguest console:\n{}", guest.vm.console_tail())
}

/// Creates container `id` from `spec`, its root the disk with serial "rootfs", mounted for it.
async fn create_on_rootfs_disk(guest: &ironclad_tests::BootedGuest, id: &str, spec: &Spec) {
    let mount_point = format!("/run/ironclad/rootfs/{id}");
    let mut request = CreateContainerRequest::new();
    request.container_id = id.into();
    request.oci_spec_json = serde_json::to_string(spec).unwrap();
    request.rootfs = mount_point.clone();
    request.storages = vec![rootfs_storage(&mount_point)];
    guest
        .agent
        .create_container(&request)
        .await
        .unwrap_or_else(|e| panic!("create {id}: {}", explain(guest, &e)));
}

async fn start(guest: &ironclad_tests::BootedGuest, id: &str) {
    guest.agent.start_container(id).await.unwrap_or_else(|e| panic!("start {id}: {}", explain(guest, &e)));
}

/// A container's whole output; a stream that stalls fails the test with the guest's console.
async fn read_stdout_to_end(guest: &ironclad_tests::BootedGuest, id: &str) -> String {
    let mut output = Vec::new();
    loop {
        let read = tokio::time::timeout(READ_TIMEOUT, guest.agent.read_stdout(id, ""));
        let Ok(chunk) = read.await else {
            panic!("{id}'s output stalled after {:?}; guest console:\n{}", output, guest.vm.console_tail());
        };
        let chunk = chunk.unwrap();
        if chunk.is_empty() {
            return String::from_utf8(output).unwrap();
        }
        output.extend(chunk);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_in_the_guest_sees_the_guest_kernel_and_its_own_cgroup() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let guest = boot_with_rootfs_disk(dir.path()).await;
    create_on_rootfs_disk(&guest, "c1", &base_spec(&["sh", "-c", "uname -r; cat /proc/1/cgroup"])).await;
    start(&guest, "c1").await;
    let output = read_stdout_to_end(&guest, "c1").await;
    assert_eq!(guest.agent.wait_process("c1", "").await.unwrap(), 0);
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(lines.len(), 2, "{output}");
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert!(lines[0].starts_with("6.12."), "the guest kernel runs the container: {output}");
    assert_ne!(lines[0], host_release.trim(), "not the host kernel");
    // Its own cgroup namespace, rooted at its own cgroup, which the agent reads its stats from.
    assert_eq!(lines[1], "0::/", "the container's own cgroup namespace: {output}");
    let stats = guest.agent.stats_container("c1").await.expect("the container's cgroup");
    assert!(stats.memory.is_some() && stats.pids.is_some(), "{stats:?}");
    guest.agent.remove_container("c1").await.expect("remove");

    guest.agent.destroy_sandbox().await.unwrap();
    let status = guest.vm.stop(EXIT_TIMEOUT).await.unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_from_the_spec_hold_and_the_oom_killer_is_reported() {
    use oci_spec::runtime::{LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResourcesBuilder};
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let guest = boot_with_rootfs_disk(dir.path()).await;
    let script =
        "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max; dd if=/dev/zero of=/dev/null bs=64M count=1";
    let mut spec = base_spec(&["sh", "-c", script]);
    let mut linux = spec.linux().clone().unwrap();
    // The container gets its own cgroup namespace here, so its cgroup is /sys/fs/cgroup inside.
    let mut namespaces = linux.namespaces().clone().unwrap_or_default();
    namespaces.push(
        oci_spec::runtime::LinuxNamespaceBuilder::default().typ(LinuxNamespaceType::Cgroup).build().unwrap(),
    );
    linux.set_namespaces(Some(namespaces));
    let resources = LinuxResourcesBuilder::default()
        .memory(LinuxMemoryBuilder::default().limit(16 * 1024 * 1024).build().unwrap())
        .pids(LinuxPidsBuilder::default().limit(8).build().unwrap())
        .build()
        .unwrap();
    linux.set_resources(Some(resources));
    spec.set_linux(Some(linux));

    create_on_rootfs_disk(&guest, "c2", &spec).await;
    let oom = {
        let agent = guest.agent.clone();
        tokio::spawn(async move { agent.get_oom_event().await })
    };
    start(&guest, "c2").await;
    let output = read_stdout_to_end(&guest, "c2").await;
    assert_eq!(output, "16777216\n8\n", "the limits are the container's");
    assert_eq!(guest.agent.wait_process("c2", "").await.unwrap(), 137, "dd was OOM-killed");
    let event = tokio::time::timeout(std::time::Duration::from_secs(30), oom).await.expect("an OOM event");
    assert_eq!(event.unwrap().unwrap(), "c2");
    let stats = guest.agent.stats_container("c2").await.unwrap();
    assert_eq!(stats.memory.usage_limit, 16 * 1024 * 1024);
    assert_eq!(stats.pids.limit, 8);
    assert!(stats.memory_events.oom_kill >= 1, "{stats:?}");
    assert!(stats.cpu.usage_usec > 0, "{stats:?}");
    guest.agent.remove_container("c2").await.unwrap();
    guest.agent.destroy_sandbox().await.unwrap();
    assert!(guest.vm.stop(EXIT_TIMEOUT).await.unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erofs_rootfs_gets_a_writable_layer_in_the_guest() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let rootfs = busybox_tree(dir.path());
    let image = dir.path().join("rootfs.erofs");
    // Root owns the files whoever builds the image: the container's root lacks CAP_DAC_OVERRIDE.
    let built = Command::new("mkfs.erofs").args(["--quiet", "--all-root"]).arg(&image).arg(&rootfs).status();
    assert!(built.is_ok_and(|s| s.success()), "mkfs.erofs failed (apt-get install erofs-utils)");
    let mut config = GuestArtifacts::locate().unwrap().vm_config();
    config.block_devices = vec![BlockDevice { path: image, read_only: true, serial: "erofs-root".into() }];
    let guest = boot_guest(&config).await.expect("boot");
    let mount_point = "/run/ironclad/rootfs/e1";
    let mut storage = rootfs_storage(mount_point);
    storage.serial = "erofs-root".into();
    storage.fstype = "erofs".into();
    let mut spec = base_spec(&["sh", "-c", "exec 2>&1; echo written > /tmp/note; cat /tmp/note; uname -r"]);
    spec.set_root(Some(RootBuilder::default().path("rootfs").readonly(false).build().unwrap()));
    let mut request = CreateContainerRequest::new();
    request.container_id = "e1".into();
    request.oci_spec_json = serde_json::to_string(&spec).unwrap();
    request.rootfs = mount_point.into();
    request.storages = vec![storage];
    request.rootfs_overlay = true;
    guest
        .agent
        .create_container(&request)
        .await
        .unwrap_or_else(|e| panic!("create e1: {}", explain(&guest, &e)));
    start(&guest, "e1").await;
    let output = read_stdout_to_end(&guest, "e1").await;
    assert!(output.starts_with("written\n6.12"), "{output}\nguest console:\n{}", guest.vm.console_tail());
    assert_eq!(guest.agent.wait_process("e1", "").await.unwrap(), 0);
    guest.agent.remove_container("e1").await.unwrap();
    guest.agent.destroy_sandbox().await.unwrap();
    assert!(guest.vm.stop(EXIT_TIMEOUT).await.unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_container_gets_new_limits() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let guest = boot_with_rootfs_disk(dir.path()).await;
    create_on_rootfs_disk(&guest, "u1", &base_spec(&["sh", "-c", "read line"])).await;
    start(&guest, "u1").await;
    let before = guest.agent.stats_container("u1").await.unwrap();
    assert_eq!(before.pids.limit, u64::MAX, "no pids limit yet");
    let resources = r#"{"memory": {"limit": 33554432}, "pids": {"limit": 5}}"#;
    guest.agent.update_container("u1", resources).await.unwrap();
    let after = guest.agent.stats_container("u1").await.unwrap();
    assert_eq!((after.memory.usage_limit, after.pids.limit), (32 << 20, 5));
    let refused = guest.agent.update_container("u1", r#"{"pids": "many"}"#).await.unwrap_err();
    assert!(ironclad_shim::hypervisor::error_chain(&refused).contains("linux.resources"), "{refused}");
    guest.agent.remove_container("u1").await.unwrap();
    guest.agent.destroy_sandbox().await.unwrap();
    assert!(guest.vm.stop(EXIT_TIMEOUT).await.unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_hostname_dns_and_clock_reach_the_containers() {
    use ironclad_protocol::agent::{CreateSandboxRequest, SetGuestDateTimeRequest};
    use oci_spec::runtime::MountBuilder;
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let guest = boot_with_rootfs_disk(dir.path()).await;
    let mut sandbox = CreateSandboxRequest::new();
    sandbox.sandbox_id = "pod1".into();
    sandbox.hostname = "pod1".into();
    sandbox.dns_servers = vec!["10.0.0.53".into()];
    sandbox.dns_search = vec!["svc.local".into()];
    let resolv_conf = guest.agent.agent_rpc().create_sandbox(ctx(), &sandbox).await.unwrap().resolv_conf;
    // The guest kernel takes netlink changes: the loopback interface gets a second address and a route.
    {
        use ironclad_protocol::agent::{
            IPAddress, Interface, Route, UpdateInterfaceRequest, UpdateRoutesRequest,
        };
        let mut interface = Interface::new();
        interface.name = "lo".into();
        interface.up = true;
        interface.addresses = ["127.0.0.1/8", "10.99.0.1/32"]
            .iter()
            .map(|a| {
                let (address, prefix) = a.split_once('/').unwrap();
                IPAddress {
                    address: address.into(),
                    prefix_len: prefix.parse().unwrap(),
                    ..Default::default()
                }
            })
            .collect();
        let mut request = UpdateInterfaceRequest::new();
        request.interface = Some(interface).into();
        guest.agent.agent_rpc().update_interface(ctx(), &request).await.unwrap();
        let mut routes = UpdateRoutesRequest::new();
        routes.routes =
            vec![Route { destination: "10.98.0.0/16".into(), device: "lo".into(), ..Default::default() }];
        guest.agent.agent_rpc().update_routes(ctx(), &routes).await.unwrap();
    }
    let mut time = SetGuestDateTimeRequest::new();
    time.sec = 1_893_456_000; // 2030-01-01
    guest.agent.agent_rpc().set_guest_date_time(ctx(), &time).await.unwrap();

    // Without UTS and network namespaces of its own, the container shares the sandbox's hostname
    // and the guest's network, where the agent's changes are read back.
    let script =
        "hostname; cat /etc/resolv.conf; date -u +%Y; ip -o -4 addr show lo; ip route show 10.98.0.0/16";
    let mut spec = base_spec(&["sh", "-c", script]);
    let mut linux = spec.linux().clone().unwrap();
    let namespaces = linux.namespaces().clone().unwrap_or_default();
    linux.set_namespaces(Some(
        namespaces
            .into_iter()
            .filter(|n| n.typ() != LinuxNamespaceType::Uts && n.typ() != LinuxNamespaceType::Network)
            .collect(),
    ));
    spec.set_linux(Some(linux));
    spec.set_hostname(None);
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    mounts.push(
        MountBuilder::default()
            .destination("/etc/resolv.conf")
            .typ("bind")
            .source(resolv_conf)
            .options(vec!["rbind".to_string(), "ro".to_string()])
            .build()
            .unwrap(),
    );
    spec.set_mounts(Some(mounts));

    create_on_rootfs_disk(&guest, "c3", &spec).await;
    start(&guest, "c3").await;
    let output = read_stdout_to_end(&guest, "c3").await;
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(lines[..4], ["pod1", "nameserver 10.0.0.53", "search svc.local", "2030"], "{output}");
    assert!(lines.iter().any(|l| l.contains("lo") && l.contains("inet 127.0.0.1/8")), "{output}");
    assert!(lines.iter().any(|l| l.contains("lo") && l.contains("inet 10.99.0.1/32")), "{output}");
    assert!(lines.iter().any(|l| l.starts_with("10.98.0.0/16 dev lo")), "{output}");
    guest.agent.remove_container("c3").await.unwrap();
    guest.agent.destroy_sandbox().await.unwrap();
    assert!(guest.vm.stop(EXIT_TIMEOUT).await.unwrap().success());
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(30_000_000_000)
}

/// Output in 64 KiB writes: the guest sends it in large vsock packets, which Linux puts in page
/// fragments, one descriptor each. Every byte must arrive, on every backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_printing_megabytes_is_read_whole() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let guest = boot_with_rootfs_disk(dir.path()).await;
    // The image's busybox binary (about 2 MiB), which the host has too, to compare byte for byte.
    let spec = base_spec(&["dd", "if=/bin/busybox", "bs=65536"]);
    create_on_rootfs_disk(&guest, "big", &spec).await;
    start(&guest, "big").await;
    let mut output = Vec::new();
    loop {
        let read =
            tokio::time::timeout(std::time::Duration::from_secs(60), guest.agent.read_stdout("big", ""));
        let chunk =
            read.await.unwrap_or_else(|_| panic!("output stalled after {} bytes", output.len())).unwrap();
        if chunk.is_empty() {
            break;
        }
        output.extend(chunk);
    }
    let expected = std::fs::read(BUSYBOX).unwrap();
    assert_eq!(output.len(), expected.len());
    assert!(output == expected, "the output arrived changed");
    guest.agent.remove_container("big").await.unwrap();
    guest.agent.destroy_sandbox().await.unwrap();
    assert!(guest.vm.stop(EXIT_TIMEOUT).await.unwrap().success());
}

/// Two vCPUs brought up by the guest kernel (the monitor's MP table, one KVM vCPU thread each), and
/// many agent connections open at once over vsock, each answered, while a container prints on
/// both CPUs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_vcpus_come_up_and_many_agent_connections_are_served_at_once() {
    const CONNECTIONS: usize = 32;
    const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let image = busybox_image(dir.path());
    let mut config = GuestArtifacts::locate().unwrap().vm_config();
    config.vcpus = 2;
    config.block_devices = vec![BlockDevice { path: image, read_only: true, serial: "rootfs".into() }];
    let guest = boot_guest(&config).await.expect("boot with two vCPUs");
    let script = "cat /sys/devices/system/cpu/online; for cpu in 0 1; do taskset -c $cpu sh -c 'echo on $(cut -d\" \" -f39 /proc/self/stat)' & done; wait";
    create_on_rootfs_disk(&guest, "smp", &base_spec(&["sh", "-c", script])).await;
    start(&guest, "smp").await;

    // Every connection is opened before any is used, so all of them are open in the guest at once.
    let socket = guest.vm.agent_socket().to_path_buf();
    let mut connecting = tokio::task::JoinSet::new();
    for _ in 0..CONNECTIONS {
        let socket = socket.clone();
        connecting.spawn(async move { AgentClient::connect(&socket, AGENT_PORT, CONNECT_TIMEOUT).await });
    }
    let mut clients = Vec::new();
    while let Some(connected) = connecting.join_next().await {
        clients.push(connected.unwrap().unwrap_or_else(|e| panic!("a connection: {}", explain(&guest, &e))));
    }
    let mut checking = tokio::task::JoinSet::new();
    for client in clients {
        checking.spawn(async move { client.check().await.map(|()| client) });
    }
    let mut clients = Vec::new();
    while let Some(checked) = checking.join_next().await {
        clients.push(checked.unwrap().unwrap_or_else(|e| panic!("a health check: {}", explain(&guest, &e))));
    }
    assert_eq!(clients.len(), CONNECTIONS);
    drop(clients);

    let output = read_stdout_to_end(&guest, "smp").await;
    assert_eq!(guest.agent.wait_process("smp", "").await.unwrap(), 0);
    let mut lines: Vec<&str> = output.lines().collect();
    assert_eq!(lines.first(), Some(&"0-1"), "both CPUs online: {output}");
    lines.remove(0);
    lines.sort_unstable();
    assert_eq!(lines, ["on 0", "on 1"], "a process ran on each CPU: {output}");
    guest.agent.remove_container("smp").await.unwrap();
    guest.agent.destroy_sandbox().await.unwrap();
    assert!(guest.vm.stop(EXIT_TIMEOUT).await.unwrap().success());
}
