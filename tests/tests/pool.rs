#![allow(clippy::unwrap_used)] // test code: a failed step should stop the test right there

//! Warm starts end to end: ironclad-pool keeps booted, paused VMs and a private containerd's
//! shims take them through `ctr run`. A VM is handed over once and never again, the shim boots
//! cold (saying why) without a pool or with an empty one, a pooled VM that died is dropped and
//! replaced, a shim that dies right after a take leaves no VM, and stopping the pool leaves none
//! of its VMs, its socket or its processes (a VM it handed over stays its sandbox's).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use ironclad_tests::containerd::{Artifacts, Containerd, BUSYBOX_IMAGE, IRONCLAD_RUNTIME};
use ironclad_tests::pool::PoolDaemon;

const CTR_TIMEOUT: Duration = Duration::from_secs(180);

fn artifacts() -> Artifacts {
    Artifacts::of_this_build().unwrap_or_else(|err| panic!("{err}"))
}

fn start_containerd() -> Option<Containerd> {
    // What the shim's clean-up, run here as a dead shim's `delete` would, warns about shows.
    ironclad_tests::init_logging();
    Containerd::for_test()
}

fn start_pool(containerd: &Containerd, size: u32) -> PoolDaemon {
    PoolDaemon::start(&artifacts().shim_dir.join("ironclad-pool"), containerd, size).unwrap()
}

/// A pool of one VM, once that VM waits: the pool, the VM's id and its recorded processes.
fn pool_of_one_waiting_vm(containerd: &Containerd) -> (PoolDaemon, String, Vec<i32>) {
    let pool = start_pool(containerd, 1);
    let id = pool.wait_ready(1).unwrap()[0].clone();
    let pids = vm_pids(&pool, &id);
    assert!(!pids.is_empty(), "no processes recorded for {id}");
    (pool, id, pids)
}

/// The processes of pooled VM `id` the pool recorded.
fn vm_pids(pool: &PoolDaemon, id: &str) -> Vec<i32> {
    std::fs::read_to_string(pool.dir.join(id).join("vm.pids"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect()
}

/// The state (/proc/PID/stat) of each monitor process (QEMU or ironclad-vmm, not its jailer) of
/// pooled VM `id`.
fn monitor_states(pool: &PoolDaemon, id: &str) -> Vec<(i32, String)> {
    let marker = pool.dir.join(id).display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let cmdline =
                String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).ok()?).into_owned();
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            let monitor = comm.starts_with("qemu-system") || comm.trim() == "ironclad-vmm";
            (monitor && cmdline.contains(&marker)).then_some(pid)
        })
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let state = stat.rsplit(')').next()?.split_whitespace().next()?.to_string();
            Some((pid, state))
        })
        .collect()
}

fn run(containerd: &Containerd, flags: &[&str], id: &str, cmd: &[&str]) -> Output {
    let config = containerd.shim_config.display().to_string();
    let mut args = vec!["run", "--runtime", IRONCLAD_RUNTIME, "--runtime-config-path", &config];
    args.extend_from_slice(flags);
    args.push(BUSYBOX_IMAGE);
    args.push(id);
    args.extend_from_slice(cmd);
    containerd.ctr_within(&args, None, CTR_TIMEOUT)
}

fn stdout_of(containerd: &Containerd, output: &Output) -> String {
    containerd.stdout_of(output)
}

/// The warm-start lines the shims logged (`took <id>` or why they booted cold).
fn warm_lines(containerd: &Containerd) -> Vec<String> {
    containerd.log().lines().filter(|l| l.contains("warm start:")).map(str::to_string).collect()
}

fn taken_ids(containerd: &Containerd) -> Vec<String> {
    ironclad_tests::pool::taken_ids(&containerd.log())
}

fn process_alive(pid: i32) -> bool {
    ironclad_shim::sandbox::process_alive(pid)
}

/// Nothing of the pool's is left: no VM process, no VM directory, no mount or cgroup of one, no
/// socket.
fn assert_pool_left_nothing(
    containerd: &Containerd,
    pool_dir: &Path,
    socket: &Path,
    pids: &[i32],
    pool_pid: u32,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let alive: Vec<i32> = pids.iter().copied().filter(|&pid| process_alive(pid)).collect();
        let dirs: Vec<PathBuf> = std::fs::read_dir(pool_dir)
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let marker = pool_dir.display().to_string();
        let mounts: Vec<&str> = mountinfo.lines().filter(|l| l.contains(&marker)).collect();
        let cgroups = pool_cgroups(pool_pid);
        if alive.is_empty() && dirs.is_empty() && mounts.is_empty() && !socket.exists() && cgroups.is_empty()
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "left behind by the pool: processes {alive:?}, dirs {dirs:?}, mounts {mounts:?}, socket {}: {}, \
             cgroups {cgroups:?}; the shims on cgroups: {:?}",
            socket.display(),
            socket.exists(),
            containerd.log().lines().filter(|l| l.contains("cgroup")).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Stops the pool, which must exit 0 and leave nothing of its own or of `pids`.
fn stop_leaving_nothing(containerd: &Containerd, pool: PoolDaemon, pids: &[i32]) {
    let (socket, pool_dir, pool_pid) = (pool.socket.clone(), pool.dir.clone(), pool.child.id());
    assert!(pool.stop().unwrap().success());
    assert_pool_left_nothing(containerd, &pool_dir, &socket, pids, pool_pid);
}

/// The cgroups of pool `pool_pid`'s VMs (`ironclad/ironclad-pool/vm-<pool pid>-<n>`) that exist.
fn pool_cgroups(pool_pid: u32) -> Vec<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = format!("vm-{pool_pid}-");
    ironclad_tests::cgroups::mount_points(&mountinfo)
        .into_iter()
        .map(|mount_point| mount_point.join("ironclad/ironclad-pool"))
        .flat_map(|dir| {
            std::fs::read_dir(dir)
                .map(|e| e.flatten().map(|e| e.path()).collect::<Vec<_>>())
                .unwrap_or_default()
        })
        .filter(|path| {
            path.is_dir() && path.file_name().is_some_and(|name| name.to_string_lossy().starts_with(&prefix))
        })
        .collect()
}

#[test]
fn a_pooled_vm_is_handed_over_once_and_never_again() {
    let Some(containerd) = start_containerd() else { return };
    let pool = start_pool(&containerd, 1);
    let first = pool.wait_ready(1).unwrap()[0].clone();
    let monitors = monitor_states(&pool, &first);
    assert!(!monitors.is_empty(), "no monitor process of {first}");
    assert!(monitors.iter().all(|(_, state)| state == "T"), "a waiting VM's monitor runs: {monitors:?}");
    let mut taken = Vec::new();
    for round in 0..3 {
        let ready = pool.wait_ready(round + 1).unwrap();
        let id = format!("warm-{round}");
        let output = run(&containerd, &["--rm"], &id, &["echo", "warm", &id]);
        assert_eq!(stdout_of(&containerd, &output).trim(), format!("warm {id}"));
        taken = taken_ids(&containerd);
        assert_eq!(taken.len(), round + 1, "every run was warm: {:?}", warm_lines(&containerd));
        assert_eq!(taken[round], ready[round], "the run took the VM that was waiting");
        assert!(!pool.dir.join(&ready[round]).exists(), "the taken VM's directory went with its sandbox");
    }
    let mut unique = taken.clone();
    unique.dedup();
    assert_eq!(unique, taken, "a VM was handed over twice");
    let pids = pool.wait_ready(4).unwrap().last().map(|id| vm_pids(&pool, id)).unwrap_or_default();
    stop_leaving_nothing(&containerd, pool, &pids);
    for round in 0..3 {
        containerd.assert_nothing_left(&format!("warm-{round}"));
    }
}

#[test]
fn without_a_pool_or_with_an_empty_one_the_shim_boots_cold_and_says_why() {
    let Some(containerd) = start_containerd() else { return };
    let output = run(&containerd, &["--rm"], "cold-no-pool", &["echo", "cold"]);
    assert_eq!(stdout_of(&containerd, &output).trim(), "cold");
    let lines = warm_lines(&containerd);
    assert!(
        lines.iter().any(|l| l.contains("no ironclad-pool listens at") && l.contains("booting cold")),
        "{lines:?}"
    );

    let empty = start_pool(&containerd, 0);
    let output = run(&containerd, &["--rm"], "cold-empty-pool", &["echo", "cold"]);
    assert_eq!(stdout_of(&containerd, &output).trim(), "cold");
    let lines = warm_lines(&containerd);
    assert!(lines.iter().any(|l| l.contains("none of its 0 VMs is booted yet")), "{lines:?}");
    assert!(empty.stop().unwrap().success());

    // A sandbox of another shape than the pool's is not given one of its VMs.
    let pool = start_pool(&containerd, 1);
    pool.wait_ready(1).unwrap();
    let output = run(
        &containerd,
        &["--rm", "--annotation", "io.ironclad.memory_mib=320"],
        "cold-other-shape",
        &["echo", "cold"],
    );
    assert_eq!(stdout_of(&containerd, &output).trim(), "cold");
    let lines = warm_lines(&containerd);
    assert!(lines.iter().any(|l| l.contains("the sandbox needs 1 and 320")), "{lines:?}");
    assert!(taken_ids(&containerd).is_empty());
    assert!(pool.stop().unwrap().success());

    // A stopped pool is no pool.
    let output = run(&containerd, &["--rm"], "cold-stopped-pool", &["echo", "cold"]);
    assert_eq!(stdout_of(&containerd, &output).trim(), "cold");
    let no_pool =
        warm_lines(&containerd).iter().filter(|l| l.contains("no ironclad-pool listens at")).count();
    assert_eq!(no_pool, 2, "{:?}", warm_lines(&containerd));
    for id in ["cold-no-pool", "cold-empty-pool", "cold-other-shape", "cold-stopped-pool"] {
        containerd.assert_nothing_left(id);
    }
}

#[test]
fn a_pooled_vm_that_died_is_dropped_and_replaced() {
    let Some(containerd) = start_containerd() else { return };
    let (pool, first, pids) = pool_of_one_waiting_vm(&containerd);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pids[0]), nix::sys::signal::Signal::SIGKILL).unwrap();
    pool.wait_for(
        |log| log.contains(&format!("pooled VM {first} died while it waited")),
        "to notice the death",
    )
    .unwrap();
    let second = pool.wait_ready(2).unwrap()[1].clone();
    assert_ne!(first, second);
    assert!(!pool.dir.join(&first).exists(), "the dead VM's directory was kept");
    assert!(pids.iter().all(|&pid| !process_alive(pid)), "the dead VM's helpers were kept");

    let output = run(&containerd, &["--rm"], "after-death", &["echo", "replaced"]);
    assert_eq!(stdout_of(&containerd, &output).trim(), "replaced");
    assert_eq!(taken_ids(&containerd), vec![second]);
    stop_leaving_nothing(&containerd, pool, &pids);
    containerd.assert_nothing_left("after-death");
}

/// A shim that dies as soon as the pool has replied (its descriptors closed, nothing of its own
/// written) leaves no VM: the pool recorded the VM in the shim's task directory first, and the
/// clean-up containerd's `delete` runs for a dead shim follows that record.
#[test]
fn a_shim_that_dies_once_the_vm_is_its_own_leaves_no_vm() {
    let Some(containerd) = start_containerd() else { return };
    let (pool, ready, pids) = pool_of_one_waiting_vm(&containerd);
    let config = ironclad_shim::config::ShimConfig::load(&containerd.shim_config).unwrap();
    let backend = ironclad_shim::hypervisor::Backend::select(
        config.hypervisor,
        ironclad_shim::hypervisor::HostVirtualization::detect(),
    )
    .unwrap();
    let (_, shape) = ironclad_shim::pool::Template::for_config(&config, backend.name()).unwrap();
    let task_dir = containerd.run_root.join("dying-shims").join("dies-after-take");
    std::fs::create_dir_all(&task_dir).unwrap();

    let taken = ironclad_shim::pool::take(&pool.socket, &shape, &task_dir).unwrap();
    assert_eq!(taken.offer.id, ready);
    drop(taken);
    assert!(pids.iter().all(|&pid| process_alive(pid)), "the VM ended with its taker's descriptors");

    ironclad_shim::sandbox::clean_up_task_dir(&task_dir);
    assert!(!task_dir.exists(), "the dead shim's task directory was kept");
    assert!(!pool.dir.join(&ready).exists(), "the VM's directory outlived its dead taker");
    stop_leaving_nothing(&containerd, pool, &pids);
}

#[test]
fn stopping_the_pool_leaves_no_vm_socket_or_process_and_spares_a_vm_it_handed_over() {
    let Some(containerd) = start_containerd() else { return };
    let pool = start_pool(&containerd, 2);
    let ready = pool.wait_ready(2).unwrap();
    // One VM becomes a running sandbox's.
    stdout_of(&containerd, &run(&containerd, &["-d"], "handed", &["sleep", "600"]));
    assert_eq!(taken_ids(&containerd), vec![ready[0].clone()]);
    // The refill boots a third; then the pool stops with two waiting.
    let ready = pool.wait_ready(3).unwrap();
    let waiting: Vec<i32> = ready[1..].iter().flat_map(|id| vm_pids(&pool, id)).collect();
    assert!(!waiting.is_empty());
    let (socket, pool_dir, pool_pid) = (pool.socket.clone(), pool.dir.clone(), pool.child.id());
    let handed_dir = pool_dir.join(&ready[0]);
    let handed: Vec<i32> = std::fs::read_to_string(handed_dir.join("vm.pids"))
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert!(pool.stop().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while waiting.iter().any(|&pid| process_alive(pid)) {
        assert!(Instant::now() < deadline, "a waiting VM outlived the pool");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!socket.exists(), "the pool's socket was left");
    assert!(handed.iter().all(|&pid| process_alive(pid)), "the pool's stop killed a sandbox's VM");
    let exec = containerd.ctr_within(
        &["task", "exec", "--exec-id", "after-stop", "handed", "echo", "still here"],
        None,
        CTR_TIMEOUT,
    );
    assert_eq!(stdout_of(&containerd, &exec).trim(), "still here");
    containerd.ctr_within(&["task", "kill", "-s", "SIGKILL", "handed"], None, CTR_TIMEOUT);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let output = containerd.ctr_within(&["task", "delete", "handed"], None, CTR_TIMEOUT);
        if output.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "{}", String::from_utf8_lossy(&output.stderr));
        std::thread::sleep(Duration::from_millis(200));
    }
    containerd.ctr_within(&["container", "delete", "handed"], None, CTR_TIMEOUT);
    let all: Vec<i32> = waiting.iter().chain(&handed).copied().collect();
    assert_pool_left_nothing(&containerd, &pool_dir, &socket, &all, pool_pid);
    containerd.assert_nothing_left("handed");
}
