#![allow(clippy::unwrap_used)] // test code: a failed step should stop the test right there

//! containerd end to end: a private containerd runs busybox containers with the ironclad runtime
//! (the qemu backend here; ironclad-vmm where the CPU has vmx/svm), through `ctr` as a user would.

use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use ironclad_tests::containerd::{
    Artifacts, Containerd, Events, BUSYBOX_IMAGE, BUSYBOX_USER_IMAGE, IRONCLAD_RUNTIME,
};
use ironclad_tests::GuestArtifacts;

/// Every ctr call gets this long before the test kills it and fails.
const CTR_TIMEOUT: Duration = Duration::from_secs(180);

fn shim_dir() -> PathBuf {
    // Tests run from target/<profile>/deps; the shim binary is built into target/<profile>.
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// Root, containerd and the built guest are needed; without them the test fails naming them (or
/// skips where IRONCLAD_ALLOW_SKIP=1 says so).
fn start_containerd() -> Option<Containerd> {
    if !ironclad_test_prereq::needs().root().program("containerd").program("ctr").ready() {
        return None;
    }
    let guest = match GuestArtifacts::locate() {
        Ok(guest) => guest,
        Err(err) => panic!("{err}"),
    };
    let shim_dir = shim_dir();
    assert!(
        shim_dir.join("containerd-shim-ironclad-v2").is_file(),
        "build the shim first (cargo build -p ironclad-shim)"
    );
    let artifacts = Artifacts {
        kernel: guest.kernel,
        initrd: guest.initrd,
        shim_dir,
        hypervisor: std::env::var("IRONCLAD_HYPERVISOR").unwrap_or_else(|_| "auto".into()),
    };
    let containerd = Containerd::start(&artifacts).unwrap();
    containerd.import_busybox().unwrap();
    Some(containerd)
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
    let mut command = containerd.ctr_command(args);
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    command.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = command.spawn().unwrap();
    if let Some(text) = stdin {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    // Output is collected while ctr runs (a full pipe would stall it); a timeout kills it.
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let output = child.wait_with_output();
        let _ = done_tx.send(());
        output
    });
    if done_rx.recv_timeout(CTR_TIMEOUT).is_err() {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let output = waiter.join().unwrap().unwrap();
        panic!(
            "ctr {args:?} did not finish within {CTR_TIMEOUT:?}; stderr: {}\ncontainerd log:\n{}",
            String::from_utf8_lossy(&output.stderr),
            containerd.log_tail()
        );
    }
    waiter.join().unwrap().unwrap()
}

fn stdout_of(containerd: &Containerd, output: &Output) -> String {
    assert!(
        output.status.success(),
        "ctr failed ({}): {}\ncontainerd log:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
        containerd.log_tail()
    );
    String::from_utf8_lossy(&output.stdout).replace("\r\n", "\n")
}

/// Nothing of the task is left: no task directory (VM sockets, images of its own), no console log,
/// no shim or VM process, no mount of the shim's, no shim socket.
fn assert_nothing_left(containerd: &Containerd, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let shim_socket = containerd.shim_socket(id);
    loop {
        let dir_left = containerd.task_dir(id).exists() || containerd.console_log(id).exists();
        let processes = containerd.leftover_processes();
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let images = containerd.dir().join("images").display().to_string();
        let run_root = containerd.run_root.display().to_string();
        let mounts: Vec<&str> =
            mountinfo.lines().filter(|l| l.contains(&images) || l.contains(&run_root)).collect();
        let socket_left = shim_socket.exists();
        if !dir_left && processes.is_empty() && mounts.is_empty() && !socket_left {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "left behind for {id}: task dir: {dir_left}; processes: {processes:?}; mounts: {mounts:?}; \
                 shim socket {}: {socket_left}",
                shim_socket.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
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
    assert_nothing_left(&containerd, "echo1");
    // Where the run knows which backend `auto` must pick (the nested tier: ironclad-vmm).
    if let Some(expected) = ironclad_tests::expected_backend() {
        assert!(containerd.log().contains(&format!("{expected} VM ready")), "{}", containerd.log_tail());
    }

    // Output written just before the exit is all there: the shim drains it before TaskExit.
    let output = run(&containerd, &[], BUSYBOX_IMAGE, "burst1", &["seq", "1", "30000"], None);
    let lines = stdout_of(&containerd, &output).lines().count();
    assert_eq!(lines, 30000);
    assert_nothing_left(&containerd, "burst1");

    // A bind-mounted host file is copied into the guest.
    let dir = tempfile::tempdir().unwrap();
    let greeting = dir.path().join("greeting");
    std::fs::write(&greeting, "hello from the host\n").unwrap();
    let mount = format!("type=bind,src={},dst=/etc/greeting,options=rbind:ro", greeting.display());
    let output =
        run(&containerd, &["--mount", &mount], BUSYBOX_IMAGE, "file1", &["cat", "/etc/greeting"], None);
    assert_eq!(stdout_of(&containerd, &output), "hello from the host\n");
    assert_nothing_left(&containerd, "file1");

    for (id, script, code) in [("exit0", "true", 0), ("exit1", "exit 1", 1), ("exit3", "exit 3", 3)] {
        let output = run(&containerd, &[], BUSYBOX_IMAGE, id, &["sh", "-c", script], None);
        assert_eq!(output.status.code(), Some(code), "{id}: {}", String::from_utf8_lossy(&output.stderr));
        assert_nothing_left(&containerd, id);
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
        assert_nothing_left(&containerd, id);
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
    assert_nothing_left(&containerd, "run1");
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
    assert_nothing_left(&containerd, "run2");
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
    assert_nothing_left(&containerd, "mem1");

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
        assert_nothing_left(&containerd, id);
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
    assert_nothing_left(&containerd, "doomed1");
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
    assert_nothing_left(&containerd, "crash1");
}

#[test]
fn bad_requests_fail_clearly_and_leave_nothing() {
    let Some(containerd) = start_containerd() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mount = format!("type=bind,src={},dst=/data,options=rbind:ro", dir.path().display());
    let output = run(&containerd, &["--mount", &mount], BUSYBOX_IMAGE, "bind1", &["true"], None);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains(&dir.path().display().to_string()) && stderr.contains("not supported"),
        "{stderr}"
    );
    assert_nothing_left(&containerd, "bind1");
    assert_container_is_gone(&containerd, "bind1");

    let broken = containerd.dir().join("broken.toml");
    std::fs::write(&broken, "kernel = \"/nonexistent/bzImage\"\nhypervisor = \"qemu\"\n").unwrap();
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
    assert!(stderr.contains("/nonexistent/bzImage"), "{stderr}");
    assert_nothing_left(&containerd, "nokernel1");
    // That config keeps the default run root: the task's directory and its namespace's are gone.
    assert!(!std::path::Path::new("/run/ironclad").join(containerd.namespace()).exists());
    assert_container_is_gone(&containerd, "nokernel1");
}

/// `ctr run --rm` whose task could not be created removes the container too.
fn assert_container_is_gone(containerd: &Containerd, id: &str) {
    let list = containerd.ctr_ok(&["containers", "list", "-q"]).unwrap();
    assert!(!list.lines().any(|l| l == id), "container {id} is still there: {list}");
}
