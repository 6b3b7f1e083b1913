#![allow(clippy::unwrap_used)] // test code: a failed step should stop the test right there

//! containerd end to end: a private containerd runs busybox containers with the ironclad runtime
//! (the qemu backend here; ironclad-vmm where the CPU has vmx/svm), through `ctr` as a user would.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use ironclad_tests::containerd::{Artifacts, Containerd, BUSYBOX_IMAGE, BUSYBOX_USER_IMAGE, IRONCLAD_RUNTIME};
use ironclad_tests::GuestArtifacts;

/// Every ctr call gets this long before the test kills it and fails.
const CTR_TIMEOUT: Duration = Duration::from_secs(180);

fn shim_dir() -> PathBuf {
    // Tests run from target/<profile>/deps; the shim binary is built into target/<profile>.
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// Root, containerd and the built guest are needed; without them the test says so and stops.
fn start_containerd() -> Option<Containerd> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: containerd tests need root");
        return None;
    }
    let guest = match GuestArtifacts::locate() {
        Ok(guest) => guest,
        Err(err) => panic!("{err}"),
    };
    let shim_dir = shim_dir();
    assert!(shim_dir.join("containerd-shim-ironclad-v2").is_file(), "build the shim first (cargo build -p ironclad-shim)");
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
fn run(containerd: &Containerd, flags: &[&str], image: &str, id: &str, cmd: &[&str], stdin: Option<&str>) -> Output {
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
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > CTR_TIMEOUT {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "ctr {args:?} did not finish within {CTR_TIMEOUT:?}; stderr: {}\ncontainerd log:\n{}",
                String::from_utf8_lossy(&output.stderr),
                containerd.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
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

/// Nothing of the task is left: no task directory, no shim or VM process.
fn assert_nothing_left(containerd: &Containerd, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let dir_gone = !containerd.task_dir(id).exists();
        let processes = containerd.leftover_processes();
        if dir_gone && processes.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            panic!("left behind for {id}: task dir exists: {}; processes: {processes:?}", !dir_gone);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn echo_exit_codes_and_the_guest_kernel() {
    let Some(containerd) = start_containerd() else { return };
    let output = run(&containerd, &[], BUSYBOX_IMAGE, "echo1", &["sh", "-c", "echo hello from a microVM; uname -r"], None);
    let stdout = stdout_of(&containerd, &output);
    let host_kernel = nix::sys::utsname::uname().unwrap().release().to_string_lossy().into_owned();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"hello from a microVM"), "{stdout}");
    assert_ne!(lines.get(1), Some(&host_kernel.as_str()), "uname -r inside is the host's kernel");
    assert!(lines.get(1).is_some_and(|r| r.starts_with("6.12")), "{stdout}");
    assert_nothing_left(&containerd, "echo1");
}
