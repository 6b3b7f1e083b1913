#![allow(clippy::unwrap_used)] // test code: a failed step should stop the test right there

//! ironclad-vmm on this machine's KVM with the freestanding test guests, through the real binary.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const VMM: &str = env!("CARGO_BIN_EXE_ironclad-vmm");

/// Tests that need KVM say so loudly where it is missing, instead of passing quietly.
fn kvm_available() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        eprintln!("SKIPPED: /dev/kvm cannot be opened on this host");
    }
    ok
}

fn run_vmm(args: &[&str]) -> Output {
    let mut child = Command::new(VMM)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("ironclad-vmm did not exit within 60 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn serial_output_and_reset_exit() {
    if !kvm_available() {
        return;
    }
    let output = run_vmm(&[
        "--kernel",
        ironclad_test_guests::SERIAL_HELLO,
        "--cmdline",
        "console=ttyS0 marker=42",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "status {:?}, stderr {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        stdout,
        "ironclad test guest: hello\ncmdline: console=ttyS0 marker=42\n"
    );
}

#[test]
fn serial_output_to_a_file() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("console.log");
    let serial = format!("file:{}", log.display());
    let output = run_vmm(&[
        "--kernel",
        ironclad_test_guests::SERIAL_HELLO,
        "--serial",
        &serial,
    ]);
    assert!(output.status.success());
    assert!(output.stdout.is_empty());
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .starts_with("ironclad test guest: hello\n"));
}

#[test]
fn sigterm_stops_a_running_guest_cleanly() {
    if !kvm_available() {
        return;
    }
    let mut child = Command::new(VMM)
        .args(["--kernel", ironclad_test_guests::SPIN_FOREVER])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "spinning\n");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("ironclad-vmm ignored SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(status.success(), "{status}");
}

#[test]
fn a_bad_configuration_names_the_field_and_touches_no_kvm() {
    let output = run_vmm(&["--kernel", "/nonexistent/vmlinux"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("invalid configuration: kernel: /nonexistent/vmlinux"),
        "{stderr}"
    );

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("vm.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"kernel": "{}", "vcpus": 0}}"#,
            ironclad_test_guests::SERIAL_HELLO
        ),
    )
    .unwrap();
    let output = run_vmm(&["--config", config.to_str().unwrap()]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("invalid configuration: vcpus"));
}

#[test]
fn a_kernel_that_is_not_one_is_refused() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("garbage");
    std::fs::write(&kernel, vec![0x42u8; 64 * 1024]).unwrap();
    let output = run_vmm(&["--kernel", kernel.to_str().unwrap()]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("neither a loadable ELF vmlinux nor a bzImage"),
        "{stderr}"
    );
}

#[test]
fn unsupported_devices_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let block = format!("path={},serial=disk0", disk.display());
    let output = run_vmm(&["--kernel", ironclad_test_guests::SERIAL_HELLO, "--block", &block]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("unsupported configuration: virtio devices"),
        "{stderr}"
    );
}
