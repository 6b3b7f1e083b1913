#![allow(clippy::unwrap_used)] // test code: a failed step should stop the test right there

//! A hostile guest, contained (issue 13, point 2): the shim boots a test initrd whose agent
//! (tests/hostile-agent) lies in one way per test, through a private containerd as a user would.
//! Each time the shim stays up and small, every call fails within its deadline, the task ends with
//! a reason in containerd's log, and nothing is left behind.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ironclad_tests::containerd::{Artifacts, Containerd, BUSYBOX_IMAGE, IRONCLAD_RUNTIME};
use ironclad_tests::GuestArtifacts;

/// The shim's own agent call deadline; the clock call gets 5 s of it (shim/src/agent_client.rs).
const CALL_DEADLINE: Duration = Duration::from_secs(30);
const CLOCK_CALL_DEADLINE: Duration = Duration::from_secs(5);
/// A start the guest never answers fails within the clock call's deadline and one call's, after
/// a boot (seconds under TCG) and the teardown of a VM that will not stop by itself (DestroySandbox
/// unanswered for 5 s, then the monitor is stopped).
const FAILED_START_BOUND: Duration = Duration::from_secs(30 + 5 + 45);
/// The most the shim's resident set may ever reach while its guest misbehaves (its peak, VmHWM).
/// A quiet shim of a debug build sits near 20 MiB; what a guest could make it buffer (a 4 GiB
/// frame, endless output, an OOM report per microsecond) would be far more.
const SHIM_PEAK_BOUND_KIB: u64 = 64 * 1024;
/// The same for vhost-device-vsock, which takes the guest's connection flood first.
const VSOCK_HELPER_PEAK_BOUND_KIB: u64 = 64 * 1024;
/// How much endless output the test reads before it kills the task.
const ENDLESS_OUTPUT_READ: usize = 16 << 20;
/// ctr calls that must finish quickly while a guest floods its vsock device.
const RESPONSIVE_CALL: Duration = Duration::from_secs(10);
/// A SIGKILL the guest does not carry out ends the task anyway: the shim's signal call (5 s),
/// then its grace (5 s), then the VM is stopped from the host.
const KILL_SEEN_THROUGH: Duration = Duration::from_secs(5 + 5 + 10);

/// Root, containerd and the built guests (the hostile initrd among them) are needed; without them
/// the test fails naming them (or skips where IRONCLAD_ALLOW_SKIP=1 says so).
fn start_containerd() -> Option<(Containerd, PathBuf)> {
    if !ironclad_test_prereq::needs().root().program("containerd").program("ctr").ready() {
        return None;
    }
    let hostile =
        GuestArtifacts::locate().and_then(|guest| guest.hostile_initrd()).unwrap_or_else(|e| panic!("{e}"));
    let artifacts = Artifacts::of_this_build().unwrap_or_else(|err| panic!("{err}"));
    let containerd = Containerd::start(&artifacts).unwrap();
    containerd.import_busybox().unwrap();
    Some((containerd, hostile))
}

/// This containerd's shim config with the hostile initrd booted in `mode` (unpinned: it is not the
/// installed guest).
fn hostile_config(containerd: &Containerd, hostile: &std::path::Path, mode: &str) -> PathBuf {
    let base = std::fs::read_to_string(&containerd.shim_config).unwrap();
    let mut config: String = base
        .lines()
        .filter(|line| !line.starts_with("initrd_sha256"))
        .map(|line| {
            if line.starts_with("initrd =") {
                format!("initrd = \"{}\"\n", hostile.display())
            } else {
                format!("{line}\n")
            }
        })
        .collect();
    config.push_str(&format!("kernel_params = \"ironclad_hostile={mode}\"\n"));
    let path = containerd.dir().join(format!("hostile-{mode}.toml"));
    std::fs::write(&path, config).unwrap();
    path
}

fn ironclad_run<'a>(config: &'a str, flags: &[&'a str], id: &'a str, cmd: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["run", "--runtime", IRONCLAD_RUNTIME, "--runtime-config-path", config];
    args.extend_from_slice(flags);
    args.extend_from_slice(&[BUSYBOX_IMAGE, id]);
    args.extend_from_slice(cmd);
    args
}

/// The peaks (VmHWM, KiB) of task `id`'s shim and of its vsock helper, sampled while `work` runs.
#[derive(Debug, Default, Clone, Copy)]
struct Peaks {
    shim_kib: u64,
    vsock_helper_kib: u64,
}

fn peak_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Sets its flag when dropped, a panic's unwinding included: the sampler stops whatever `work` did.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn peaks_while<T>(containerd: &Containerd, id: &str, work: impl FnOnce() -> T) -> (T, Peaks) {
    let done = AtomicBool::new(false);
    let shim_marker = format!("-id {id} ");
    std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut peaks = Peaks::default();
            while !done.load(Ordering::SeqCst) {
                for (pid, cmdline) in containerd.leftover_processes() {
                    let Some(kib) = peak_kib(pid) else { continue };
                    if cmdline.contains("containerd-shim-ironclad-v2") && cmdline.contains(&shim_marker) {
                        peaks.shim_kib = peaks.shim_kib.max(kib);
                    } else if cmdline.contains("vhost-device-vsock") && cmdline.contains(id) {
                        peaks.vsock_helper_kib = peaks.vsock_helper_kib.max(kib);
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            peaks
        });
        let stop = SetOnDrop(&done);
        let result = work();
        drop(stop);
        (result, sampler.join().unwrap())
    })
}

/// The shim stayed up: small, and never panicked (its panic message would be in containerd's log).
fn assert_small(peaks: Peaks, log: &str) {
    eprintln!("peaks: {peaks:?}");
    assert!(!log.contains("panicked at"), "the shim panicked:\n{log}");
    assert!(peaks.shim_kib > 0, "the shim was never seen running");
    assert!(
        peaks.shim_kib <= SHIM_PEAK_BOUND_KIB,
        "the shim's resident set peaked at {} KiB, over {SHIM_PEAK_BOUND_KIB} KiB\n{log}",
        peaks.shim_kib
    );
    assert!(
        peaks.vsock_helper_kib <= VSOCK_HELPER_PEAK_BOUND_KIB,
        "vhost-device-vsock's resident set peaked at {} KiB, over {VSOCK_HELPER_PEAK_BOUND_KIB} KiB",
        peaks.vsock_helper_kib
    );
}

/// `ctr run --rm` of a task whose guest does not answer as an agent must: the start fails within
/// `bound`, naming `call`, and leaves nothing.
fn assert_start_fails(mode: &str, id: &str, call: &str, bound: Duration) -> Duration {
    let Some((containerd, hostile)) = start_containerd() else { return Duration::ZERO };
    let config = hostile_config(&containerd, &hostile, mode);
    let config = config.display().to_string();
    let args = ironclad_run(&config, &["--rm"], id, &["true"]);
    let started = Instant::now();
    let (output, peaks) =
        peaks_while(&containerd, id, || containerd.ctr_within(&args, None, FAILED_START_BOUND * 2));
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let log = containerd.log();
    assert!(!output.status.success(), "a {mode} guest's task started: {stderr}");
    assert!(took < bound, "the failed start took {took:?}, more than {bound:?}: {stderr}");
    assert!(stderr.contains(call), "ctr's error does not name {call}: {stderr}\n{}", containerd.log_tail());
    assert!(log.contains(call), "containerd's log does not name {call}:\n{}", containerd.log_tail());
    assert_small(peaks, &containerd.log());
    containerd.assert_nothing_left(id);
    let _ = containerd.ctr(&["containers", "delete", id]);
    took
}

#[test]
fn an_agent_that_never_answers_fails_the_start_within_the_call_deadlines() {
    let took = assert_start_fails("silent", "silent1", "Agent.CreateSandbox", FAILED_START_BOUND);
    // The clock call and CreateSandbox each waited out their deadline, no less.
    assert!(took.is_zero() || took >= CALL_DEADLINE + CLOCK_CALL_DEADLINE, "gave up after {took:?}");
}

#[test]
fn an_agent_that_answers_with_a_4_gib_frame_of_noise_fails_the_start_and_the_shim_stays_small() {
    assert_start_fails("garbage", "garbage1", "Agent.CreateSandbox", FAILED_START_BOUND);
}

#[test]
fn answers_for_streams_never_opened_are_dropped_and_the_calls_time_out() {
    let took = assert_start_fails("wrong-ids", "wrongids1", "Agent.CreateSandbox", FAILED_START_BOUND);
    assert!(took.is_zero() || took >= CALL_DEADLINE + CLOCK_CALL_DEADLINE, "gave up after {took:?}");
}

/// Output that never ends and an OOM report about a stranger at every ask: the shim passes the
/// output on at the reader's pace with bounded memory, drops the reports with a bounded number of
/// log lines, and a SIGKILL the guest ignores ends the task by stopping its VM.
#[test]
fn endless_output_and_forged_oom_reports_stay_bounded_and_a_kill_ends_the_sandbox() {
    let Some((containerd, hostile)) = start_containerd() else { return };
    let events = containerd.events().unwrap();
    let config = hostile_config(&containerd, &hostile, "endless-output");
    let config = config.display().to_string();
    let id = "endless1";
    let args = ironclad_run(&config, &["--rm"], id, &["true"]);
    let ((status, read), peaks) = peaks_while(&containerd, id, || {
        // Its stderr is endless too: unread, it would fill a pipe and stall ctr.
        let mut child =
            containerd.ctr_command(&args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        // The reader keeps draining after the kill, so that ctr never blocks on a full pipe.
        let (enough_tx, enough_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = vec![0u8; 1 << 16];
            let mut total = 0usize;
            let mut told = false;
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                total += n;
                if !told && total >= ENDLESS_OUTPUT_READ {
                    told = true;
                    let _ = enough_tx.send(());
                }
            }
            total
        });
        let enough = enough_rx.recv_timeout(Duration::from_secs(180)).is_ok();
        let killed = containerd.ctr_within(&["tasks", "kill", "-s", "SIGKILL", id], None, RESPONSIVE_CALL);
        let status = wait_child(&mut child, Duration::from_secs(60));
        let read = reader.join().unwrap();
        assert!(enough, "only {read} bytes of endless output arrived in 180 s");
        assert!(killed.status.success(), "{}", String::from_utf8_lossy(&killed.stderr));
        (status, read)
    });
    assert!(read >= ENDLESS_OUTPUT_READ);
    // The guest ignored the signal: the host stopped the VM, and the task reports SIGKILL's status.
    assert_eq!(status.and_then(|s| s.code()), Some(137), "{}", containerd.log_tail());
    let log = containerd.log();
    assert!(log.contains("did not carry out SIGKILL in time"), "{}", containerd.log_tail());
    let forged = log.lines().filter(|l| l.contains("which is not a container of this sandbox")).count();
    assert!((1..=24).contains(&forged), "{forged} log lines about forged OOM reports");
    assert!(
        events.wait_for(&["/tasks/oom"], Duration::from_secs(1)).is_none(),
        "a forged OOM reached containerd"
    );
    assert_small(peaks, &containerd.log());
    containerd.assert_nothing_left(id);
}

/// Once its container starts, the guest opens connections to every vsock port of the host as fast
/// as it can: the shim keeps answering, neither it nor the vsock helper grows, and the task ends
/// as asked.
#[test]
fn a_flood_of_vsock_connections_from_the_guest_leaves_the_shim_serving() {
    let Some((containerd, hostile)) = start_containerd() else { return };
    let config = hostile_config(&containerd, &hostile, "flood");
    let config = config.display().to_string();
    let id = "flood1";
    let (_, peaks) = peaks_while(&containerd, id, || {
        let started =
            containerd.ctr_within(&ironclad_run(&config, &["-d"], id, &["true"]), None, FAILED_START_BOUND);
        assert!(started.status.success(), "{}", String::from_utf8_lossy(&started.stderr));
        assert_vm_process_filtered(&containerd, id);
        // Ten seconds of flood, the shim asked for the task's state every second. A guest may
        // bring its own sandbox down with its flood (its kernel's queues are its own business):
        // the shim must then still answer, say why the task ended, and clean up.
        let mut ended_after = None;
        for second in 0..10 {
            let asked = Instant::now();
            let state = containerd.ctr_within(&["tasks", "ls"], None, RESPONSIVE_CALL);
            let state = String::from_utf8_lossy(&state.stdout).into_owned();
            assert!(state.contains(id), "{state}\n{}", containerd.log_tail());
            if state.contains("STOPPED") {
                ended_after = Some(second);
                break;
            }
            assert!(state.contains("RUNNING"), "{state}\n{}", containerd.log_tail());
            std::thread::sleep(Duration::from_secs(1).saturating_sub(asked.elapsed()));
        }
        // The guest says on its console how far its flood has gone.
        let console = std::fs::read_to_string(containerd.console_log(id)).unwrap_or_default();
        let attempts = console
            .lines()
            .filter_map(|line| line.split("flood: ").nth(1)?.split(' ').next()?.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        assert!(attempts >= 1000, "the guest made {attempts} connection attempts:\n{console}");
        match ended_after {
            Some(second) => {
                let log = containerd.log();
                let last_words: Vec<&str> = console.lines().rev().take(15).collect();
                eprintln!(
                    "flood: the guest's sandbox ended after {second} s and {attempts} connection attempts; its \
                     console's last lines, newest first: {last_words:#?}"
                );
                assert!(!log.contains("SIGSYS"), "QEMU's seccomp filter killed it:\n{log}");
                let reason = log.contains("its VM is gone") || log.contains(&format!("waiting for {id}/"));
                assert!(reason, "the task ended without a reason in the log:\n{log}");
            }
            None => {
                eprintln!("flood: {attempts} connection attempts from the guest in 10 s");
                // SIGKILL, which the host sees through: the guest's answers queue behind its own
                // flood inside its kernel, as slowly as the monitor drains them.
                let killed =
                    containerd.ctr_within(&["tasks", "kill", "-s", "SIGKILL", id], None, RESPONSIVE_CALL);
                assert!(killed.status.success(), "{}", String::from_utf8_lossy(&killed.stderr));
                let deadline = Instant::now() + KILL_SEEN_THROUGH;
                loop {
                    let state = containerd.ctr_within(&["tasks", "ls"], None, RESPONSIVE_CALL);
                    if String::from_utf8_lossy(&state.stdout).contains("STOPPED") {
                        break;
                    }
                    assert!(Instant::now() < deadline, "the task did not stop on SIGKILL");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        let deleted = containerd.ctr_within(&["tasks", "delete", id], None, Duration::from_secs(60));
        assert!(deleted.status.success(), "{}", String::from_utf8_lossy(&deleted.stderr));
    });
    assert_small(peaks, &containerd.log());
    containerd.assert_nothing_left(id);
    let _ = containerd.ctr(&["containers", "delete", id]);
}

/// The task's VM process runs under a seccomp filter: QEMU's own `-sandbox` (every thread), or
/// ironclad-vmm's per-thread filters.
fn assert_vm_process_filtered(containerd: &Containerd, id: &str) {
    // The monitor itself, not the jailer that started it (whose command line names it too).
    let vm = containerd
        .sandbox_helpers(id)
        .into_iter()
        .find(|helper| helper.comm.starts_with("qemu-system") || helper.comm == "ironclad-vmm");
    let Some(ironclad_tests::containerd::HelperProcess { pid, cmdline, .. }) = vm else {
        panic!("no VM process for {id}")
    };
    let filtered = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten().any(|task| {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        status.lines().any(|line| line.split_whitespace().collect::<Vec<_>>() == ["Seccomp:", "2"])
    });
    assert!(filtered, "no thread of the VM process runs under a seccomp filter: {cmdline}");
}

fn wait_child(child: &mut std::process::Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}
