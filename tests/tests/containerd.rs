#![allow(clippy::unwrap_used)] // test code: a failed step should stop the test right there

//! containerd end to end: a private containerd runs busybox containers with the ironclad runtime
//! (the qemu backend here; ironclad-vmm where the CPU has vmx/svm), through `ctr` as a user would.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use ironclad_tests::containerd::{
    Artifacts, Containerd, Events, HelperProcess, BUSYBOX_IMAGE, BUSYBOX_USER_IMAGE, IRONCLAD_RUNTIME,
};
use ironclad_tests::netns::TestNetns;

/// Every ctr call gets this long before the test kills it and fails.
const CTR_TIMEOUT: Duration = Duration::from_secs(180);

/// The built guest and shim, and the backend `$IRONCLAD_HYPERVISOR` names.
fn artifacts() -> Artifacts {
    Artifacts::of_this_build().unwrap_or_else(|err| panic!("{err}"))
}

/// Root, containerd and the built guest are needed; without them the test fails naming them (or
/// skips where IRONCLAD_ALLOW_SKIP=1 says so).
fn start_containerd() -> Option<Containerd> {
    Containerd::for_test()
}

/// `ctr run --rm` with the ironclad runtime and this containerd's shim config.
fn run(
    containerd: &Containerd,
    flags: &[&str],
    image: &str,
    id: &str,
    cmd: &[&str],
    stdin: Option<&str>,
) -> Output {
    let config = containerd.shim_config.display().to_string();
    let mut args = vec!["run", "--rm", "--runtime", IRONCLAD_RUNTIME, "--runtime-config-path", &config];
    args.extend_from_slice(flags);
    args.push(image);
    args.push(id);
    args.extend_from_slice(cmd);
    run_ctr(containerd, &args, stdin)
}

fn run_ctr(containerd: &Containerd, args: &[&str], stdin: Option<&str>) -> Output {
    containerd.ctr_within(args, stdin, CTR_TIMEOUT)
}

fn stdout_of(containerd: &Containerd, output: &Output) -> String {
    containerd.stdout_of(output)
}

fn ironclad_run_args<'a>(containerd_config: &'a str, flags: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["run", "--runtime", IRONCLAD_RUNTIME, "--runtime-config-path", containerd_config];
    args.extend_from_slice(flags);
    args
}

/// Starts a detached task running `cmd` and waits until its status is RUNNING.
fn run_detached(containerd: &Containerd, id: &str, cmd: &[&str]) {
    let config = containerd.shim_config.display().to_string();
    let mut args = ironclad_run_args(&config, &["-d"]);
    args.push(BUSYBOX_IMAGE);
    args.push(id);
    args.extend_from_slice(cmd);
    stdout_of(containerd, &run_ctr(containerd, &args, None));
    wait_for_status(containerd, id, "RUNNING");
}

fn task_status(containerd: &Containerd, id: &str) -> String {
    let list = containerd.ctr_ok(&["tasks", "list"]).unwrap();
    list.lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or("GONE")
        .to_string()
}

fn wait_for_status(containerd: &Containerd, id: &str, status: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = task_status(containerd, id);
        if now == status {
            return;
        }
        assert!(Instant::now() < deadline, "task {id} is {now}, never {status}\n{}", containerd.log_tail());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for the task's exit event and returns its status.
fn exit_status(events: &Events, id: &str) -> u32 {
    let line = events
        .wait_for(&["/tasks/exit", &format!("\"id\":\"{id}\"")], Duration::from_secs(60))
        .unwrap_or_else(|| panic!("no exit event for {id}: {}", events.all()));
    let json = &line[line.find('{').unwrap()..];
    let event: serde_json::Value = serde_json::from_str(json).unwrap();
    event["exit_status"].as_u64().unwrap_or(0) as u32
}

/// Deletes a stopped task and its container, checking containerd saw the delete event.
fn remove_task(containerd: &Containerd, events: &Events, id: &str) {
    containerd.ctr_ok(&["tasks", "delete", id]).unwrap();
    containerd.ctr_ok(&["containers", "delete", id]).unwrap();
    let delete =
        events.wait_for(&["/tasks/delete", &format!("\"container_id\":\"{id}\"")], Duration::from_secs(30));
    assert!(delete.is_some(), "no delete event for {id}: {}", events.all());
}

#[test]
fn echo_exit_codes_and_the_guest_kernel() {
    let Some(containerd) = start_containerd() else { return };
    let output = run(
        &containerd,
        &[],
        BUSYBOX_IMAGE,
        "echo1",
        &["sh", "-c", "echo hello from a microVM; uname -r"],
        None,
    );
    let stdout = stdout_of(&containerd, &output);
    let host_kernel = nix::sys::utsname::uname().unwrap().release().to_string_lossy().into_owned();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"hello from a microVM"), "{stdout}");
    assert_ne!(lines.get(1), Some(&host_kernel.as_str()), "uname -r inside is the host's kernel");
    assert!(lines.get(1).is_some_and(|r| r.starts_with("6.12")), "{stdout}");
    containerd.assert_nothing_left("echo1");
    // Where the run knows which backend `auto` must pick (the nested tier: ironclad-vmm).
    if let Some(expected) = ironclad_tests::expected_backend() {
        assert!(containerd.log().contains(&format!("{expected} VM ready")), "{}", containerd.log_tail());
    }

    // Output written just before the exit is all there: the shim drains it before TaskExit.
    let output = run(&containerd, &[], BUSYBOX_IMAGE, "burst1", &["seq", "1", "30000"], None);
    let lines = stdout_of(&containerd, &output).lines().count();
    assert_eq!(lines, 30000);
    containerd.assert_nothing_left("burst1");

    for (id, script, code) in [("exit0", "true", 0), ("exit1", "exit 1", 1), ("exit3", "exit 3", 3)] {
        let output = run(&containerd, &[], BUSYBOX_IMAGE, id, &["sh", "-c", script], None);
        assert_eq!(output.status.code(), Some(code), "{id}: {}", String::from_utf8_lossy(&output.stderr));
        containerd.assert_nothing_left(id);
    }
    // Six runs of one image built its rootfs image once.
    let images: Vec<_> = std::fs::read_dir(containerd.dir().join("images"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "ext4"))
        .collect();
    assert_eq!(images.len(), 1, "{images:?}");
    // Each VM ended by itself when its task was deleted; none had to be killed.
    assert!(!containerd.log().contains("did not exit within"), "{}", containerd.log_tail());
}

/// How many short tasks the event-order check runs: 200, fewer where each boot is slow (the
/// nested tier sets IRONCLAD_EVENT_TASKS).
fn event_tasks() -> usize {
    std::env::var("IRONCLAD_EVENT_TASKS").ok().and_then(|n| n.parse().ok()).unwrap_or(200)
}

/// The line number of the first event line of `topic` for container `id`.
fn event_line(log: &str, topic: &str, id: &str) -> Option<usize> {
    let container = format!("\"container_id\":\"{id}\"");
    log.lines().position(|line| line.contains(topic) && line.contains(&container))
}

/// Every event of a shim leaves through one forwarder: over many short tasks, two at a time,
/// containerd sees each task's TaskStart before its TaskExit.
#[test]
fn every_task_start_reaches_containerd_before_its_exit() {
    let Some(containerd) = start_containerd() else { return };
    let events = containerd.events().unwrap();
    let tasks = event_tasks();
    std::thread::scope(|scope| {
        for lane in 0..2 {
            let containerd = &containerd;
            scope.spawn(move || {
                for n in (lane..tasks).step_by(2) {
                    let id = format!("order{n}");
                    let output = run(containerd, &[], BUSYBOX_IMAGE, &id, &["true"], None);
                    assert!(output.status.success(), "{id}: {}", String::from_utf8_lossy(&output.stderr));
                }
            });
        }
    });
    for n in 0..tasks {
        let id = format!("order{n}");
        let exited =
            events.wait_for(&["/tasks/exit", &format!("\"container_id\":\"{id}\"")], Duration::from_secs(30));
        assert!(exited.is_some(), "no TaskExit for {id}");
    }
    let log = events.all();
    for n in 0..tasks {
        let id = format!("order{n}");
        let start = event_line(&log, "/tasks/start", &id).unwrap_or_else(|| panic!("no TaskStart for {id}"));
        let exit = event_line(&log, "/tasks/exit", &id).unwrap_or_else(|| panic!("no TaskExit for {id}"));
        assert!(start < exit, "{id}: TaskExit (line {exit}) came before TaskStart (line {start})");
    }
    containerd.assert_nothing_left(&format!("order{}", tasks - 1));
}

#[test]
fn host_directories_and_files_reach_the_guest_through_the_shared_directory() {
    let Some(containerd) = start_containerd() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (rw, ro) = (dir.path().join("rw"), dir.path().join("ro"));
    std::fs::create_dir_all(&rw).unwrap();
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::write(ro.join("config"), "from the host\n").unwrap();
    let greeting = dir.path().join("greeting");
    std::fs::write(&greeting, "hello from the host\n").unwrap();
    let mounts = [
        format!("type=bind,src={},dst=/etc/greeting,options=rbind:ro", greeting.display()),
        format!("type=bind,src={},dst=/rw,options=rbind:rw", rw.display()),
        format!("type=bind,src={},dst=/ro,options=rbind:ro", ro.display()),
    ];
    let flags: Vec<&str> = mounts.iter().flat_map(|m| ["--mount", m.as_str()]).collect();
    // Each side writes its file under another name and renames it into place: the other side,
    // which polls for the name, never reads it half written (nor caches it empty).
    // Owners cross unchanged both ways (virtiofsd runs as the sandbox's uid in a user namespace
    // of its own, the guest's ids translated back): the host's root is the guest's, and a file
    // the guest gives to 1234:5678 is theirs on the host.
    let script = "cat /etc/greeting; cat /ro/config; stat -c %u:%g /ro/config; \
                  touch /rw/owned && chown 1234:5678 /rw/owned; \
                  echo written > /rw/.from-guest && mv /rw/.from-guest /rw/from-guest && echo rw-ok; \
                  if echo x > /ro/refused 2>/dev/null; then echo ro-writable; else echo ro-refused; fi; \
                  while [ ! -e /rw/from-host-later ]; do sleep 0.1; done; cat /rw/from-host-later";
    // The host writes its file once the guest has shown its own write: a change made while the
    // container runs reaches the guest.
    let later = rw.join("from-host-later");
    let writer = std::thread::spawn(move || {
        let from_guest = rw.join("from-guest");
        let deadline = Instant::now() + CTR_TIMEOUT;
        while !from_guest.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let staged = later.with_file_name(".from-host-later");
        std::fs::write(&staged, "changed on the host\n").unwrap();
        std::fs::rename(&staged, &later).unwrap();
        std::fs::read_to_string(from_guest).unwrap_or_default()
    });
    let output = run(&containerd, &flags, BUSYBOX_IMAGE, "share1", &["sh", "-c", script], None);
    let stdout = stdout_of(&containerd, &output);
    assert_eq!(
        stdout,
        "hello from the host\nfrom the host\n0:0\nrw-ok\nro-refused\nchanged on the host\n",
        "{}",
        containerd.log_tail()
    );
    assert_eq!(writer.join().unwrap(), "written\n", "the guest's write is on the host");
    let owner = |path: &Path| {
        let meta = std::fs::metadata(path).unwrap();
        (std::os::unix::fs::MetadataExt::uid(&meta), std::os::unix::fs::MetadataExt::gid(&meta))
    };
    assert_eq!(owner(&dir.path().join("rw/from-guest")), (0, 0), "the guest's root wrote as the host's");
    assert_eq!(owner(&dir.path().join("rw/owned")), (1234, 5678));
    assert!(!ro.join("refused").exists());
    containerd.assert_nothing_left("share1");
    // The host's directories and files are still there, as they were.
    assert_eq!(std::fs::read_to_string(ro.join("config")).unwrap(), "from the host\n");
    assert_eq!(std::fs::read_to_string(&greeting).unwrap(), "hello from the host\n");
}

/// Starts a detached `sleep` with a host directory mounted (so the sandbox has a shared directory:
/// virtiofsd runs, and guest memory is the memfd it maps too) and returns the directory, which
/// must outlive the task, and the sandbox's monitor process.
fn run_detached_with_host_directory(containerd: &Containerd, id: &str) -> (tempfile::TempDir, HelperProcess) {
    let shared = tempfile::tempdir().unwrap();
    let mount = format!("type=bind,src={},dst=/shared,options=rbind:ro", shared.path().display());
    let config = containerd.shim_config.display().to_string();
    let mut args = ironclad_run_args(&config, &["-d", "--mount", &mount]);
    args.extend([BUSYBOX_IMAGE, id, "sleep", "1000"]);
    stdout_of(containerd, &run_ctr(containerd, &args, None));
    wait_for_status(containerd, id, "RUNNING");
    let helpers = containerd.sandbox_helpers(id);
    let comms: Vec<&str> = helpers.iter().map(|h| h.comm.as_str()).collect();
    let monitor = helpers
        .iter()
        .find(|h| h.comm == "ironclad-vmm" || h.comm.starts_with("qemu-system"))
        .unwrap_or_else(|| panic!("no monitor among {comms:?}"))
        .clone();
    (shared, monitor)
}

/// SIGKILL, then the task and its container deleted, and nothing of it left.
fn kill_and_remove(containerd: &Containerd, id: &str) {
    containerd.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", id]).unwrap();
    wait_for_status(containerd, id, "STOPPED");
    containerd.ctr_ok(&["tasks", "delete", id]).unwrap();
    containerd.ctr_ok(&["containers", "delete", id]).unwrap();
    containerd.assert_nothing_left(id);
}

/// The most virtiofsd may hold, in its own user namespace: CHOWN, DAC_OVERRIDE, FOWNER, FSETID,
/// SETGID, SETUID, SETPCAP, SYS_ADMIN, MKNOD and SETFCAP (the shim's FILE_SERVER_CAPS); virtiofsd
/// shrinks it further itself.
const FILE_SERVER_CAPS: u64 = 0x8820_01db;

#[test]
fn the_sandboxs_helpers_run_jailed_as_its_own_uid_in_its_cgroup() {
    let Some(containerd) = start_containerd() else { return };
    // A host directory: virtiofsd runs beside the monitor (and, for QEMU, vhost-device-vsock).
    let (_shared, monitor) = run_detached_with_host_directory(&containerd, "jail1");
    let helpers = containerd.sandbox_helpers("jail1");
    let comms: Vec<&str> = helpers.iter().map(|h| h.comm.as_str()).collect();
    assert!(comms.contains(&"virtiofsd"), "{comms:?}");
    let uid = monitor.field("Uid").split_whitespace().next().unwrap().to_string();
    assert!(uid.parse::<u32>().unwrap() >= 900_000, "the monitor runs as the sandbox's uid, not {uid}");
    let task_dir = containerd.task_dir("jail1");
    for helper in &helpers {
        let what = format!("{} ({}): {}", helper.comm, helper.pid, helper.status);
        let file_server = helper.comm == "virtiofsd";
        // Every helper runs as the sandbox's uid; virtiofsd keeps its capabilities in a user
        // namespace of its own, where they reach only the files of the ids it maps.
        let allowed_caps = if file_server { FILE_SERVER_CAPS } else { 0 };
        assert_eq!(helper.field("Uid"), [uid.as_str(); 4].join("\t"), "{what}");
        assert_eq!(helper.field("Gid"), [uid.as_str(); 4].join("\t"), "{what}");
        let user_namespace = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/user")).unwrap();
        let own_user_namespace = user_namespace(&helper.pid.to_string()) != user_namespace("self");
        assert_eq!(own_user_namespace, file_server, "{what}");
        for set in ["CapInh", "CapPrm", "CapEff", "CapAmb", "CapBnd"] {
            let held = u64::from_str_radix(helper.field(set), 16).unwrap();
            assert_eq!(held & !allowed_caps, 0, "{set} of {what}");
        }
        assert_eq!(helper.field("NoNewPrivs"), "1", "{what}");
        // PID 1 of a PID namespace of its own (virtiofsd's sandbox adds one more level).
        let nspid: Vec<&str> = helper.field("NSpid").split_whitespace().collect();
        assert!(nspid.len() >= 2, "{what}");
        // Its root is the jail's (virtiofsd pivots on into the shared directory): the host's files
        // are not there, its sandbox's directory is.
        let root = PathBuf::from(format!("/proc/{}/root", helper.pid));
        assert!(!root.join("etc/passwd").exists() && !root.join("home").exists(), "{what}");
        if !file_server {
            assert!(root.join(task_dir.join("vm").strip_prefix("/").unwrap()).is_dir(), "{what}");
        }
        let memory_cgroup = format!("/ironclad/{}/jail1", containerd.namespace());
        assert!(helper.cgroup.lines().any(|l| l.ends_with(&memory_cgroup)), "{what}\n{}", helper.cgroup);
    }
    if monitor.comm.starts_with("qemu-system") {
        assert_eq!(monitor.field("Seccomp"), "2", "QEMU's own filter too");
    }
    // The cgroup's memory limit: the VM's 256 MiB and the 512 MiB overhead.
    let cgroups = containerd.sandbox_cgroups("jail1");
    let limit = cgroups
        .iter()
        .find_map(|dir| {
            std::fs::read_to_string(dir.join("memory.limit_in_bytes"))
                .or_else(|_| std::fs::read_to_string(dir.join("memory.max")))
                .ok()
        })
        .unwrap_or_else(|| panic!("no memory limit in {cgroups:?}"));
    assert_eq!(limit.trim(), ((256u64 + 512) << 20).to_string());
    kill_and_remove(&containerd, "jail1");
}

/// Guest memory the monitor holds resident (its anonymous and shared pages), in MiB.
fn guest_memory_resident_mib(monitor: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{monitor}/status")).unwrap();
    let kib = |field: &str| -> u64 {
        let line =
            status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("{field}: {status}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    (kib("RssAnon:") + kib("RssShmem:")) / 1024
}

#[test]
fn memory_the_guest_frees_goes_back_to_the_host() {
    let Some(containerd) = start_containerd() else { return };
    // With a host directory guest memory is the memfd virtiofsd maps too, on either backend: the
    // memory must leave that file, not only the monitor's view of it.
    let (_shared, monitor) = run_detached_with_host_directory(&containerd, "freed1");
    let monitor = monitor.pid;

    // 48 MiB of tmpfs in the guest (/dev/shm holds 64): the host holds it too.
    let exec = |exec_id: &str, script: &str| {
        let args = ["tasks", "exec", "--exec-id", exec_id, "freed1", "sh", "-c", script];
        stdout_of(&containerd, &run_ctr(&containerd, &args, None))
    };
    let before = guest_memory_resident_mib(monitor);
    assert_eq!(
        exec("fill", "dd if=/dev/zero of=/dev/shm/fill bs=1M count=48 2>/dev/null && echo filled"),
        "filled\n"
    );
    let filled = guest_memory_resident_mib(monitor);
    assert!(filled >= before + 40, "filling the guest's tmpfs: {before} -> {filled} MiB resident");

    // Freed in the guest: its page allocator reports the blocks, the monitor discards them.
    assert_eq!(exec("free", "rm /dev/shm/fill && echo freed"), "freed\n");
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut now = guest_memory_resident_mib(monitor);
    while now + 32 > filled && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        now = guest_memory_resident_mib(monitor);
    }
    assert!(
        now + 32 <= filled,
        "the guest freed 48 MiB, the host still holds {now} of {filled} MiB (before the fill: {before})\n{}",
        containerd.log_tail()
    );
    kill_and_remove(&containerd, "freed1");
}

#[test]
fn a_cold_start_logs_its_timeline_step_by_step() {
    use ironclad_shim::timeline::{find_task_line, Step};
    let Some(containerd) = start_containerd() else { return };
    let output = run(&containerd, &[], BUSYBOX_IMAGE, "timeline1", &["echo", "hi"], None);
    assert_eq!(stdout_of(&containerd, &output), "hi\n");
    // Logged when the task is deleted; it reaches containerd's log through the shim's log pipe.
    let log = containerd.dir().join("containerd.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    let marks = loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if let Some(marks) = find_task_line(&text, "timeline1") {
            break marks;
        }
        assert!(Instant::now() < deadline, "no start timeline for timeline1 in {}", log.display());
        std::thread::sleep(Duration::from_millis(100));
    };
    let steps: Vec<Step> = marks.iter().map(|(step, _)| *step).collect();
    assert_eq!(steps, Step::ALL, "every step, in order: {marks:?}");
    // What the shim saw itself happens in this order (the guest's steps are placed from its clock).
    let at = |step: Step| marks.iter().find(|(s, _)| *s == step).map(|(_, at)| *at).unwrap();
    let seen = [
        Step::ShimStarted,
        Step::CreateReceived,
        Step::AgentReady,
        Step::ContainerCreated,
        Step::StartReceived,
        Step::Started,
        Step::Exited,
        Step::TornDown,
    ];
    for pair in seen.windows(2) {
        assert!(at(pair[0]) <= at(pair[1]), "{:?} after {:?}: {marks:?}", pair[0], pair[1]);
    }
    containerd.assert_nothing_left("timeline1");
}

#[test]
fn stdin_tty_env_cwd_and_user() {
    let Some(containerd) = start_containerd() else { return };
    let output = run(
        &containerd,
        &[],
        BUSYBOX_IMAGE,
        "stdin1",
        &["sh", "-c", "head -n 1 | tr a-z A-Z"],
        Some("piped in\n"),
    );
    assert_eq!(stdout_of(&containerd, &output), "PIPED IN\n");

    let script = "id -u; id -g; pwd; echo $FROM_IMAGE $FOO";
    let output = run(&containerd, &[], BUSYBOX_USER_IMAGE, "user1", &["sh", "-c", script], None);
    assert_eq!(stdout_of(&containerd, &output), "1000\n1000\n/work\nyes\n", "the image's user, cwd and env");
    let flags = ["--env", "FOO=from-ctr", "--cwd", "/tmp"];
    let output = run(&containerd, &flags, BUSYBOX_IMAGE, "flags1", &["sh", "-c", script], None);
    assert_eq!(stdout_of(&containerd, &output), "0\n0\n/tmp\nyes from-ctr\n", "ctr's env and cwd");

    // A terminal needs one on ctr's side too: `script` gives it a pty.
    let config = containerd.shim_config.display().to_string();
    let ctr = format!(
        "ctr --address {} -n {} run --rm -t --runtime {IRONCLAD_RUNTIME} --runtime-config-path {config} {BUSYBOX_IMAGE} tty1 sh -c 'tty; stty size'",
        containerd.dir().join("containerd.sock").display(),
        containerd.namespace()
    );
    let output = std::process::Command::new("script")
        .args(["-q", "-e", "-c", &format!("stty rows 33 cols 101; {ctr}"), "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = stdout_of(&containerd, &output);
    assert!(stdout.contains("/dev/pts/0"), "{stdout}");
    assert!(stdout.contains("33 101"), "the terminal has ctr's size: {stdout}");
    // A logging binary (containerd's binary:// log URI) gets stdout on fd 3, stderr on fd 4.
    let logs = tempfile::tempdir().unwrap();
    let logged = logs.path().join("logged");
    let logger = logs.path().join("logger.sh");
    let script = format!(
        "#!/bin/sh\nexec 5>&-\necho \"$CONTAINER_ID\" > {0}\ncat <&3 >> {0}\ncat <&4 >> {0}\n",
        logged.display()
    );
    std::fs::write(&logger, script).unwrap();
    std::fs::set_permissions(&logger, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let uri = format!("binary://{}", logger.display());
    let output = run(
        &containerd,
        &["--log-uri", &uri],
        BUSYBOX_IMAGE,
        "log1",
        &["sh", "-c", "echo out; echo err >&2"],
        None,
    );
    stdout_of(&containerd, &output);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(&logged).unwrap_or_default().lines().count() < 3
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(std::fs::read_to_string(&logged).unwrap(), "log1\nout\nerr\n");
    for id in ["stdin1", "user1", "flags1", "tty1", "log1"] {
        containerd.assert_nothing_left(id);
    }
}

#[test]
fn a_running_task_execs_lists_reports_pauses_and_stops_on_signals() {
    let Some(containerd) = start_containerd() else { return };
    let events = containerd.events().unwrap();
    // Two processes for as long as it runs: the shell and its sleep.
    run_detached(&containerd, "run1", &["sh", "-c", "trap 'exit 42' TERM; sleep 1000 & wait"]);
    assert!(containerd.shim_socket("run1").exists(), "the leftover check looks for the wrong socket");
    let exec = containerd.ctr_ok(&[
        "tasks",
        "exec",
        "--exec-id",
        "e1",
        "run1",
        "sh",
        "-c",
        "echo from exec; exit 0",
    ]);
    assert_eq!(exec.unwrap(), "from exec\n");
    let exec = containerd.ctr(&["tasks", "exec", "--exec-id", "e2", "run1", "sh", "-c", "exit 7"]).unwrap();
    assert_eq!(exec.status.code(), Some(7));
    // `ctr task exec` ends piped stdin with CloseIO: the process sees end of file.
    let counted =
        run_ctr(&containerd, &["tasks", "exec", "--exec-id", "e3", "run1", "wc", "-l"], Some("a\nb\nc\n"));
    assert_eq!(stdout_of(&containerd, &counted).trim(), "3", "stdin reached its end");

    let ps = containerd.ctr_ok(&["tasks", "ps", "run1"]).unwrap();
    let mut lines = ps.lines();
    assert!(lines.next().is_some_and(|header| header.starts_with("PID")), "{ps}");
    let mut pids: Vec<u32> = lines.map(|l| l.split_whitespace().next().unwrap().parse().unwrap()).collect();
    pids.dedup();
    assert_eq!(pids.len(), 2, "the shell and its sleep, each once: {ps}");
    assert!(pids.iter().all(|pid| *pid > 1), "guest pids of the container's processes: {ps}");
    let metrics = containerd.ctr_ok(&["tasks", "metrics", "run1"]).unwrap();
    let figure = |name: &str| -> u64 {
        let line = metrics.lines().find(|l| l.split_whitespace().next() == Some(name));
        line.and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name}: {metrics}"))
    };
    assert_eq!(figure("pids.current"), 2, "{metrics}");
    let usage = figure("memory.usage");
    assert!(
        usage > 0 && usage < 256 << 20,
        "a shell and a sleep use some memory, less than the VM: {metrics}"
    );
    assert!(figure("cpu.usage_usec") > 0, "{metrics}");

    containerd.ctr_ok(&["tasks", "pause", "run1"]).unwrap();
    wait_for_status(&containerd, "run1", "PAUSED");
    containerd.ctr_ok(&["tasks", "resume", "run1"]).unwrap();
    wait_for_status(&containerd, "run1", "RUNNING");

    containerd.ctr_ok(&["tasks", "kill", "-s", "SIGTERM", "run1"]).unwrap();
    assert_eq!(exit_status(&events, "run1"), 42, "SIGTERM ran the trap");
    wait_for_status(&containerd, "run1", "STOPPED");
    remove_task(&containerd, &events, "run1");
    containerd.assert_nothing_left("run1");
    for topic in [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/paused",
        "/tasks/resumed",
    ] {
        assert!(
            events.wait_for(&[topic, "run1"], Duration::from_secs(5)).is_some(),
            "no {topic}: {}",
            events.all()
        );
    }

    run_detached(&containerd, "run2", &["sh", "-c", "sleep 1000 & sleep 1000"]);
    let checkpoint = containerd.ctr(&["tasks", "checkpoint", "run2"]).unwrap();
    assert!(String::from_utf8_lossy(&checkpoint.stderr).contains("not supported"), "{checkpoint:?}");
    containerd.ctr_ok(&["tasks", "kill", "--all", "-s", "SIGKILL", "run2"]).unwrap();
    assert_eq!(exit_status(&events, "run2"), 137);
    remove_task(&containerd, &events, "run2");
    containerd.assert_nothing_left("run2");
}

#[test]
fn memory_limits_hold_and_two_tasks_run_at_once() {
    let Some(containerd) = start_containerd() else { return };
    let events = containerd.events().unwrap();
    let config = containerd.shim_config.display().to_string();
    let mut args = ironclad_run_args(&config, &["-d", "--memory-limit", "33554432"]);
    args.extend_from_slice(&[BUSYBOX_IMAGE, "mem1", "sleep", "1000"]);
    stdout_of(&containerd, &run_ctr(&containerd, &args, None));
    wait_for_status(&containerd, "mem1", "RUNNING");
    let metrics = containerd.ctr_ok(&["tasks", "metrics", "mem1"]).unwrap();
    let limit = metrics.lines().find(|l| l.starts_with("memory.usage_limit")).unwrap_or_default().to_string();
    assert!(limit.trim_end().ends_with(" 33554432"), "{metrics}");
    let dd = [
        "tasks",
        "exec",
        "--exec-id",
        "dd",
        "mem1",
        "dd",
        "if=/dev/zero",
        "of=/dev/null",
        "bs=64M",
        "count=1",
    ];
    assert_eq!(containerd.ctr(&dd).unwrap().status.code(), Some(137), "the 64 MiB buffer was OOM-killed");
    assert!(
        events.wait_for(&["/tasks/oom", "mem1"], Duration::from_secs(30)).is_some(),
        "no OOM event: {}",
        events.all()
    );
    containerd.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", "mem1"]).unwrap();
    assert_eq!(exit_status(&events, "mem1"), 137);
    remove_task(&containerd, &events, "mem1");
    containerd.assert_nothing_left("mem1");

    let ids = ["twin1", "twin2"];
    let outputs = std::thread::scope(|scope| {
        let handles: Vec<_> = ids
            .iter()
            .map(|id| {
                let containerd = &containerd;
                scope.spawn(move || run(containerd, &[], BUSYBOX_IMAGE, id, &["hostname"], None))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
    });
    for (id, output) in ids.iter().zip(&outputs) {
        assert_eq!(stdout_of(&containerd, output), format!("{id}\n"));
        containerd.assert_nothing_left(id);
    }
}

#[test]
fn a_vm_killed_from_outside_ends_its_task_with_a_reason() {
    let Some(containerd) = start_containerd() else { return };
    let events = containerd.events().unwrap();
    run_detached(&containerd, "doomed1", &["sleep", "1000"]);
    let pids = std::fs::read_to_string(containerd.task_dir("doomed1").join("vm.pids")).unwrap();
    let monitor: i32 = pids.lines().next().unwrap().parse().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(monitor), nix::sys::signal::Signal::SIGKILL).unwrap();
    assert_eq!(exit_status(&events, "doomed1"), 255);
    wait_for_status(&containerd, "doomed1", "STOPPED");
    assert!(containerd.log_tail().contains("exited unexpectedly"), "{}", containerd.log_tail());
    remove_task(&containerd, &events, "doomed1");
    containerd.assert_nothing_left("doomed1");
}

#[test]
fn a_crashed_shim_is_cleaned_up_by_delete() {
    let Some(containerd) = start_containerd() else { return };
    run_detached(&containerd, "crash1", &["sleep", "1000"]);
    let shim = containerd
        .leftover_processes()
        .into_iter()
        .find(|(_, cmdline)| {
            cmdline.contains("containerd-shim-ironclad-v2") && cmdline.contains("-id crash1 ")
        })
        .map(|(pid, _)| pid)
        .expect("the task's shim");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(shim), nix::sys::signal::Signal::SIGKILL).unwrap();
    // containerd sees the shim go and runs `containerd-shim-ironclad-v2 delete`, which stops the VM
    // the dead shim left and removes the task's directory.
    wait_for_status(&containerd, "crash1", "GONE");
    // containerd already deleted the task with the shim: nothing to delete any more.
    let again = containerd.ctr(&["tasks", "delete", "crash1"]).unwrap();
    assert!(
        !again.status.success() && String::from_utf8_lossy(&again.stderr).contains("not found"),
        "{again:?}"
    );
    containerd.ctr_ok(&["containers", "delete", "crash1"]).unwrap();
    containerd.assert_nothing_left("crash1");
}

#[test]
fn bad_requests_fail_clearly_and_leave_nothing() {
    let Some(containerd) = start_containerd() else { return };
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    let mount = format!("type=bind,src={},dst=/data,options=rbind:ro", missing.display());
    let output = run(&containerd, &["--mount", &mount], BUSYBOX_IMAGE, "bind1", &["true"], None);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains(&missing.display().to_string()) && stderr.contains("/data"), "{stderr}");
    containerd.assert_nothing_left("bind1");
    assert_container_is_gone(&containerd, "bind1");

    // A container that fails inside the guest: once the task is gone, containerd's log still has
    // the agent's own line, with the reason and the container's id.
    let output = run(&containerd, &[], BUSYBOX_IMAGE, "noexec1", &["/bin/does-not-exist"], None);
    assert!(!output.status.success());
    containerd.assert_nothing_left("noexec1");
    let log = containerd.log();
    let agent_line =
        log.lines().find(|l| l.contains("guest agent (noexec1)") && l.contains("container noexec1"));
    let agent_line = agent_line.unwrap_or_else(|| {
        panic!("no agent line for noexec1 in containerd's log:\n{}", containerd.log_tail())
    });
    assert!(agent_line.contains("failed"), "{agent_line}");
    assert!(agent_line.contains("does-not-exist"), "the reason: {agent_line}");
    // The kind of a failure reaches containerd with the reason: a spec the runtime cannot read is
    // an invalid argument (here an rlimit Go takes and the OCI spec does not know), an exec id the
    // task does not have is not found.
    let spec = containerd.ctr_ok(&["oci", "spec"]).unwrap();
    let mut spec: serde_json::Value = serde_json::from_str(&spec).unwrap();
    spec["process"]["rlimits"][0]["type"] = "RLIMIT_BOGUS".into();
    spec["process"]["args"] = serde_json::json!(["true"]);
    let spec_path = containerd.dir().join("bogus-spec.json");
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    let (spec_arg, config) = (spec_path.display().to_string(), containerd.shim_config.display().to_string());
    let mut args = ironclad_run_args(&config, &["--rm", "--config", &spec_arg]);
    args.push("badspec1");
    let output = run_ctr(&containerd, &args, None);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("RLIMIT_BOGUS") && stderr.contains("invalid argument"), "{stderr}");
    containerd.assert_nothing_left("badspec1");
    run_detached(&containerd, "execs1", &["sleep", "1000"]);
    let killed = containerd.ctr(&["tasks", "kill", "--exec-id", "nope", "execs1"]).unwrap();
    let stderr = String::from_utf8_lossy(&killed.stderr);
    assert!(!killed.status.success());
    assert!(
        stderr.contains("no exec process") && stderr.contains("nope") && stderr.contains("not found"),
        "{stderr}"
    );
    kill_and_remove(&containerd, "execs1");

    // The agent's log level per sandbox: with `info` its routine lines come through too.
    let annotation = "io.ironclad.agent_log=info";
    let output = run(&containerd, &["--annotation", annotation], BUSYBOX_IMAGE, "chatty1", &["true"], None);
    stdout_of(&containerd, &output);
    assert!(
        containerd.log().contains("guest agent (chatty1): ironclad_agent::server: container chatty1 created"),
        "{}",
        containerd.log_tail()
    );

    let broken = containerd.dir().join("broken.toml");
    std::fs::write(&broken, "kernel = \"/nonexistent/vmlinux\"\nhypervisor = \"qemu\"\n").unwrap();
    let config = broken.display().to_string();
    let args = [
        "run",
        "--rm",
        "--runtime",
        IRONCLAD_RUNTIME,
        "--runtime-config-path",
        &config,
        BUSYBOX_IMAGE,
        "nokernel1",
        "true",
    ];
    let output = run_ctr(&containerd, &args, None);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("/nonexistent/vmlinux"), "{stderr}");
    containerd.assert_nothing_left("nokernel1");
    // That config keeps the default run root: the task's directory and its namespace's are gone.
    assert!(!std::path::Path::new("/run/ironclad").join(containerd.namespace()).exists());
    assert_container_is_gone(&containerd, "nokernel1");

    // A kernel changed by one byte, under the pin of the real one (every other run of this suite
    // boots with both files pinned): refused before boot, naming the file.
    let pinned_config = std::fs::read_to_string(&containerd.shim_config).unwrap();
    let kernel_line = pinned_config.lines().find(|l| l.starts_with("kernel = ")).unwrap();
    let kernel = PathBuf::from(kernel_line.trim_start_matches("kernel = ").trim_matches('"'));
    let mut bytes = std::fs::read(&kernel).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    let changed = containerd.dir().join("changed-vmlinux");
    std::fs::write(&changed, bytes).unwrap();
    let changed_config = containerd.dir().join("changed.toml");
    let text = pinned_config.replace(kernel_line, &format!("kernel = \"{}\"", changed.display()));
    std::fs::write(&changed_config, text).unwrap();
    let config = changed_config.display().to_string();
    let mut args = ironclad_run_args(&config, &["--rm"]);
    args.extend([BUSYBOX_IMAGE, "changed1", "true"]);
    let output = run_ctr(&containerd, &args, None);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains(&format!("the guest kernel {} has changed", changed.display()))
            && stderr.contains("kernel_sha256"),
        "{stderr}"
    );
    containerd.assert_nothing_left("changed1");
    assert_container_is_gone(&containerd, "changed1");
}

/// `ctr run --rm` whose task could not be created removes the container too.
fn assert_container_is_gone(containerd: &Containerd, id: &str) {
    let list = containerd.ctr_ok(&["containers", "list", "-q"]).unwrap();
    assert!(!list.lines().any(|l| l == id), "container {id} is still there: {list}");
}

/// The tests that write /etc/cni (which `ctr run --cni` reads) take turns.
static CNI_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

const CNI_CONF_DIR: &str = "/etc/cni/net.d";
const CNI_BIN_DIR: &str = "/opt/cni/bin";
const CNI_CONF: &str = "/etc/cni/net.d/05-ironclad-test.conflist";
/// The test network: only ever inside the test's namespace.
const CNI_SUBNET_PREFIX: &str = "10.203.0.";
const CNI_GATEWAY: &str = "10.203.0.1";

/// The CNI configuration `ctr run --cni` reads (it knows only /etc/cni/net.d and /opt/cni/bin):
/// a bridge with host-local addresses kept in the test's directory. Whatever it adds there is
/// removed on drop; what was there before is left alone.
struct CniConfig {
    added: Vec<PathBuf>,
}

impl CniConfig {
    fn install(ipam_dir: &std::path::Path) -> CniConfig {
        let mut added = Vec::new();
        for dir in [CNI_CONF_DIR, CNI_BIN_DIR] {
            let mut missing = Vec::new();
            let mut d = std::path::Path::new(dir);
            while !d.exists() {
                missing.push(d.to_path_buf());
                d = d.parent().unwrap();
            }
            std::fs::create_dir_all(dir).unwrap();
            added.extend(missing.into_iter().rev());
        }
        for plugin in ["bridge", "host-local", "loopback"] {
            let link = std::path::Path::new(CNI_BIN_DIR).join(plugin);
            if !link.exists() {
                std::os::unix::fs::symlink(format!("/usr/lib/cni/{plugin}"), &link).unwrap();
                added.push(link);
            }
        }
        let conf = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": "ironclad-test",
            "plugins": [{
                "type": "bridge",
                "bridge": "icbr0",
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": format!("{CNI_SUBNET_PREFIX}0/24"), "gateway": CNI_GATEWAY }]],
                    "routes": [{ "dst": "0.0.0.0/0" }],
                    "dataDir": ipam_dir,
                }
            }]
        });
        std::fs::write(CNI_CONF, conf.to_string()).unwrap();
        added.push(CNI_CONF.into());
        CniConfig { added }
    }
}

impl Drop for CniConfig {
    fn drop(&mut self) {
        for path in self.added.iter().rev() {
            let _ = std::fs::remove_file(path).or_else(|_| std::fs::remove_dir(path));
        }
    }
}

/// One line of `text` that starts with `prefix`, the rest of it.
fn field<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    text.lines().find_map(|l| l.trim().strip_prefix(prefix))
}

/// `ctr run --rm --cni`: the container's eth0 has the CNI address and the bridge's gateway as its
/// default route; it reaches a server in the test's namespace but not the metadata address (denied
/// by default), serves 32 MiB that arrive there with the same sha256, and after it nothing of ours
/// is left in the namespace, so the next run works; with an empty deny list the metadata address
/// answers.
#[test]
fn ctr_run_cni_carries_the_cni_network_into_the_guest() {
    let Some(setup) = CniSetup::new("icnet") else { return };
    let (netns, containerd) = (&setup.netns, &setup.containerd);

    // The metadata address, on the test namespace's lo: reachable from the guest unless denied.
    netns.ip(&["addr", "add", "169.254.169.254/32", "dev", "lo"]);
    let metadata = netns.run(|| std::net::TcpListener::bind("169.254.169.254:0").unwrap()).join().unwrap();
    let metadata_port = metadata.local_addr().unwrap().port();
    std::thread::spawn(move || {
        use std::io::{BufRead, Write};
        for stream in metadata.incoming().map_while(Result::ok) {
            let mut line = String::new();
            std::io::BufReader::new(&stream).read_line(&mut line).unwrap();
            (&stream).write_all(format!("metadata says {line}").as_bytes()).unwrap();
        }
    });
    // A server in the test's namespace, on every address there (the bridge's gateway among them).
    let listener = netns.run(|| std::net::TcpListener::bind("0.0.0.0:0").unwrap()).join().unwrap();
    let port = listener.local_addr().unwrap().port();
    // Not joined: if the container never connects, the assertions below say so.
    std::thread::spawn(move || {
        use std::io::{BufRead, Write};
        let (stream, _) = listener.accept().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(&stream).read_line(&mut line).unwrap();
        (&stream).write_all(format!("hello from the test namespace, {line}").as_bytes()).unwrap();
    });

    let config = containerd.shim_config.display().to_string();
    let blob_mib = network_blob_mib();
    let script = format!(
        "ip -4 addr show eth0; ip route; echo container | nc {CNI_GATEWAY} {port}; \
         echo probe | nc -w 5 169.254.169.254 {metadata_port}; \
         dd if=/dev/urandom of=/tmp/blob bs=1M count={blob_mib} 2>/dev/null; \
         echo sha256 $(sha256sum /tmp/blob); echo serving; nc -l -p 8080 -e cat /tmp/blob; echo served"
    );
    let mut args = ironclad_run_args(&config, &["--rm", "--cni"]);
    args.extend([BUSYBOX_IMAGE, "cni1", "sh", "-c", &script]);
    let mut ctr = containerd.ctr_command(&args);
    let mut child = ctr.stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(Stdio::null()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut seen = String::new();
    while !seen.contains("serving\n") {
        match lines_rx.recv_timeout(CTR_TIMEOUT) {
            Ok(line) => seen.push_str(&format!("{line}\n")),
            Err(_) => {
                let _ = child.kill();
                let output = child.wait_with_output().unwrap();
                panic!(
                    "the container printed only:\n{seen}\nctr: {}\ncontainerd log:\n{}",
                    String::from_utf8_lossy(&output.stderr),
                    containerd.log_tail()
                );
            }
        }
    }
    let inet = field(&seen, "inet ").unwrap_or_else(|| panic!("no IPv4 address on eth0:\n{seen}"));
    let address = inet.split(['/', ' ']).next().unwrap().to_string();
    assert!(address.starts_with(CNI_SUBNET_PREFIX), "eth0 has {address}, not in the CNI subnet:\n{seen}");
    assert!(seen.contains(&format!("default via {CNI_GATEWAY} dev eth0")), "{seen}");
    assert!(seen.contains("hello from the test namespace, container"), "{seen}");
    assert!(!seen.contains("metadata says"), "the metadata address is denied by default:\n{seen}");
    let expected = field(&seen, "sha256 ").unwrap().split_whitespace().next().unwrap().to_string();

    // The container's server, reached from the test's namespace at the container's address.
    let pulled = netns
        .run(move || {
            use std::io::Read;
            // "serving" comes just before nc listens: a refused connection is tried again.
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut stream = loop {
                match std::net::TcpStream::connect((address.as_str(), 8080)) {
                    Ok(stream) => break stream,
                    Err(err) if Instant::now() < deadline => {
                        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    Err(err) => panic!("the container's server did not answer: {err}"),
                }
            };
            let mut data = Vec::new();
            stream.read_to_end(&mut data).unwrap();
            data
        })
        .join()
        .unwrap();
    assert_eq!(pulled.len(), blob_mib << 20, "the whole blob arrived");
    assert_eq!(format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(&pulled)), expected);
    let status = child.wait().unwrap();
    assert!(status.success(), "ctr run: {status}");
    assert!(lines_rx.iter().any(|l| l == "served"));
    containerd.assert_nothing_left("cni1");
    netns.assert_no_veth_left();

    // The same interface names again: nothing of the first run is in the way. With no denied
    // destinations in the config, the metadata address answers.
    let open_config = containerd.dir().join("open.toml");
    let mut text = std::fs::read_to_string(&containerd.shim_config).unwrap();
    text.push_str("\ndenied_destinations = []\n");
    std::fs::write(&open_config, text).unwrap();
    let open_config = open_config.display().to_string();
    let script = format!("ip -4 addr show eth0; echo open | nc -w 5 169.254.169.254 {metadata_port}");
    let mut args = ironclad_run_args(&open_config, &["--rm", "--cni"]);
    args.extend([BUSYBOX_IMAGE, "cni2", "sh", "-c", &script]);
    let text = stdout_of(containerd, &run_ctr(containerd, &args, None));
    assert!(text.contains(&format!("inet {CNI_SUBNET_PREFIX}")), "{text}");
    assert!(text.contains("metadata says open"), "{text}");
    containerd.assert_nothing_left("cni2");
    netns.assert_no_veth_left();
}

/// The CRI way: the spec names a network namespace that is set up already (here by hand, as a CNI
/// plugin would: a veth with an address and a default route). The guest's eth0 takes its
/// configuration and reaches the peer; afterwards the namespace is as it was: its interface
/// there, no tap, no qdisc.
#[test]
fn a_prepared_network_namespace_is_carried_into_the_guest_and_left_as_it_was() {
    if !ironclad_test_prereq::needs()
        .root()
        .program("containerd")
        .program("ctr")
        .program("ip")
        .program("tc")
        .ready()
    {
        return;
    }
    let outer = TestNetns::new("icouter");
    let sandbox = TestNetns::new("icsb");
    outer.ip(&["link", "add", "icv0", "type", "veth", "peer", "name", "eth0", "netns", &sandbox.name]);
    outer.ip(&["addr", "add", "10.204.0.1/24", "dev", "icv0"]);
    outer.ip(&["link", "set", "icv0", "up"]);
    sandbox.ip(&["link", "set", "eth0", "mtu", "1400"]);
    sandbox.ip(&["addr", "add", "10.204.0.2/24", "dev", "eth0"]);
    sandbox.ip(&["link", "set", "eth0", "up"]);
    sandbox.ip(&["route", "add", "default", "via", "10.204.0.1"]);
    // A static neighbour entry, as some CNI plugins set for their gateway: the guest gets it.
    sandbox.ip(&[
        "neigh",
        "add",
        "10.204.0.9",
        "lladdr",
        "02:00:00:00:00:09",
        "dev",
        "eth0",
        "nud",
        "permanent",
    ]);
    // A second interface (as a second CNI network would add): the guest gets a NIC for it too.
    outer.ip(&["link", "add", "icv1", "type", "veth", "peer", "name", "net1", "netns", &sandbox.name]);
    outer.ip(&["addr", "add", "10.207.0.1/24", "dev", "icv1"]);
    outer.ip(&["link", "set", "icv1", "up"]);
    sandbox.ip(&["addr", "add", "10.207.0.2/24", "dev", "net1"]);
    sandbox.ip(&["link", "set", "net1", "up"]);
    let links_before = sandbox.link_names();

    let containerd = start_containerd_in(&outer);
    let peer = |address: &'static str, greeting: &'static str| {
        let listener = outer.run(move || std::net::TcpListener::bind(address).unwrap()).join().unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            use std::io::{BufRead, Write};
            let (stream, _) = listener.accept().unwrap();
            let mut line = String::new();
            std::io::BufReader::new(&stream).read_line(&mut line).unwrap();
            (&stream).write_all(format!("{greeting}, {line}").as_bytes()).unwrap();
        });
        port
    };
    let port = peer("10.204.0.1:0", "hello from the peer");
    let port1 = peer("10.207.0.1:0", "hello from the second network");

    let with_ns = format!("network:{}", sandbox.path.display());
    let script = format!(
        "ip addr show eth0; ip addr show eth1; ip route; ip neigh show 10.204.0.9; echo guest | nc 10.204.0.1 {port}; \
         echo guest | nc 10.207.0.1 {port1}"
    );
    let output =
        run(&containerd, &["--with-ns", &with_ns], BUSYBOX_IMAGE, "prepared", &["sh", "-c", &script], None);
    let text = stdout_of(&containerd, &output);
    assert!(text.contains("inet 10.204.0.2/24"), "{text}");
    assert!(text.contains("mtu 1400"), "the interface's MTU: {text}");
    assert!(text.contains("default via 10.204.0.1 dev eth0"), "{text}");
    assert!(text.contains("hello from the peer, guest"), "{text}");
    assert!(text.contains("inet 10.207.0.2/24"), "the second interface's address on eth1: {text}");
    assert!(text.contains("10.204.0.9 dev eth0 lladdr 02:00:00:00:00:09"), "the static neighbour: {text}");
    assert!(text.contains("hello from the second network, guest"), "{text}");
    containerd.assert_nothing_left("prepared");
    assert_eq!(sandbox.link_names(), links_before, "no tap of ours left");
    for device in ["eth0", "net1"] {
        let qdiscs = std::process::Command::new("tc")
            .args(["-n", &sandbox.name, "qdisc", "show", "dev", device])
            .output()
            .unwrap();
        let qdiscs = String::from_utf8_lossy(&qdiscs.stdout);
        assert!(!qdiscs.contains("ingress"), "no qdisc of ours left on {device}: {qdiscs}");
    }
}

/// A private containerd (and every ctr) in the test's network namespace.
fn start_containerd_in(netns: &TestNetns) -> Containerd {
    let containerd = Containerd::start_in(&artifacts(), Some(&netns.path)).unwrap();
    containerd.import_busybox().unwrap();
    containerd
}

/// What a `ctr run --cni` test runs in: its turn at /etc/cni, a network namespace of its own, the
/// CNI configuration and a private containerd in that namespace. None where the test cannot run
/// (it then failed or was recorded as skipped). Dropped in reverse order: containerd first.
struct CniSetup {
    containerd: Containerd,
    _cni: CniConfig,
    _ipam: tempfile::TempDir,
    netns: TestNetns,
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl CniSetup {
    fn new(prefix: &str) -> Option<CniSetup> {
        if !ironclad_test_prereq::needs()
            .root()
            .program("containerd")
            .program("ctr")
            .program("ip")
            .file(std::path::Path::new("/usr/lib/cni/bridge"), "apt-get install containernetworking-plugins")
            .ready()
        {
            return None;
        }
        let turn = CNI_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let netns = TestNetns::new(prefix);
        let ipam = tempfile::tempdir().unwrap();
        let cni = CniConfig::install(ipam.path());
        let containerd = start_containerd_in(&netns);
        Some(CniSetup { containerd, _cni: cni, _ipam: ipam, netns, _turn: turn })
    }
}

/// How much the container serves in the transfer check: 32 MiB, less where every frame crosses
/// emulated SVM (the nested tier sets IRONCLAD_NETWORK_BLOB_MIB).
fn network_blob_mib() -> usize {
    std::env::var("IRONCLAD_NETWORK_BLOB_MIB").ok().and_then(|n| n.parse().ok()).unwrap_or(32)
}

/// How many `ctr run --rm --cni` in a row the leak check makes: 50, fewer where each boot is
/// slow (the nested tier sets IRONCLAD_NETWORK_RUNS).
fn network_runs() -> usize {
    std::env::var("IRONCLAD_NETWORK_RUNS").ok().and_then(|n| n.parse().ok()).unwrap_or(50)
}

/// Two sandboxes on one CNI bridge at once get their own addresses and reach each other; then
/// many short runs in a row leave no veth, mount, task directory or process behind.
#[test]
fn two_sandboxes_reach_each_other_and_many_runs_leave_nothing() {
    let Some(setup) = CniSetup::new("icpair") else { return };
    let (netns, containerd) = (&setup.netns, &setup.containerd);
    let config = containerd.shim_config.display().to_string();

    let mut args = ironclad_run_args(&config, &["-d", "--cni"]);
    args.extend([
        BUSYBOX_IMAGE,
        "first",
        "sh",
        "-c",
        "while true; do nc -l -p 7000 -e echo from-first; done",
    ]);
    stdout_of(containerd, &run_ctr(containerd, &args, None));
    wait_for_status(containerd, "first", "RUNNING");
    let shown = containerd.ctr_ok(&[
        "tasks",
        "exec",
        "--exec-id",
        "addr",
        "first",
        "ip",
        "-4",
        "addr",
        "show",
        "eth0",
    ]);
    let shown = shown.unwrap();
    let first = field(&shown, "inet ").unwrap_or_else(|| panic!("no address: {shown}"));
    let first = first.split('/').next().unwrap().to_string();
    assert!(first.starts_with(CNI_SUBNET_PREFIX), "{shown}");

    let script = format!("ip -4 addr show eth0; nc {first} 7000");
    let output = run(containerd, &["--cni"], BUSYBOX_IMAGE, "second", &["sh", "-c", &script], None);
    let text = stdout_of(containerd, &output);
    let second = field(&text, "inet ").unwrap_or_else(|| panic!("no address: {text}"));
    assert!(second.starts_with(CNI_SUBNET_PREFIX) && !second.starts_with(&format!("{first}/")), "{text}");
    assert!(text.contains("from-first"), "the second sandbox reached the first: {text}");

    kill_and_remove(containerd, "first");
    containerd.assert_nothing_left("second");

    let runs = network_runs();
    for run_number in 0..runs {
        let id = format!("many{run_number}");
        let output = run(containerd, &["--cni"], BUSYBOX_IMAGE, &id, &["true"], None);
        stdout_of(containerd, &output);
        containerd.assert_nothing_left(&id);
    }
    netns.assert_no_veth_left();
    let output =
        run(containerd, &["--cni"], BUSYBOX_IMAGE, "after", &["ip", "-4", "addr", "show", "eth0"], None);
    let text = stdout_of(containerd, &output);
    assert!(text.contains(&format!("inet {CNI_SUBNET_PREFIX}")), "after {runs} runs: {text}");
    containerd.assert_nothing_left("after");
    netns.assert_no_veth_left();
}
