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
fn unsupported_requests_are_refused_with_the_reason() {
    let output = run_vmm(&["--kernel", ironclad_test_guests::SERIAL_HELLO, "--vcpus", "2"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("unsupported configuration: more than one vCPU"),
        "{stderr}"
    );
}

/// A disk image whose sector 0 carries a marker the guest prints.
fn disk_image(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("disk.img");
    let mut contents = vec![0u8; 8 * 512];
    let marker = b"IRONCLAD SECTOR ZERO: hello from the host";
    contents[..marker.len()].copy_from_slice(marker);
    std::fs::write(&path, contents).unwrap();
    path
}

fn metrics(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn virtio_blk_read_write_flush_and_get_id() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = disk_image(dir.path());
    let metrics_path = dir.path().join("metrics.json");
    let block = format!("path={},serial=ironclad-disk-7", disk.display());
    let output = run_vmm(&[
        "--kernel",
        ironclad_test_guests::VIRTIO_BLK,
        "--block",
        &block,
        "--metrics",
        metrics_path.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for line in [
        "capacity: 0x0000000000000008",
        "id: ironclad-disk-7",
        "sector 0 says: IRONCLAD SECTOR ZERO: hello from the hos",
        "write sector 1: ok",
        "flush: ok",
        "read back: same",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
    let contents = std::fs::read(&disk).unwrap();
    assert!(
        contents[512..].starts_with(b"written by the ironclad test guest"),
        "the write reached the file"
    );
    let counters = &metrics(&metrics_path)["block"][0][1];
    assert_eq!(counters["write_requests"], 1);
    assert_eq!(counters["invalid_requests"], 0);
}

#[test]
fn virtio_blk_read_only_disk_refuses_the_guest_write() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = disk_image(dir.path());
    let before = std::fs::read(&disk).unwrap();
    let block = format!("path={},serial=ro,ro", disk.display());
    let output = run_vmm(&["--kernel", ironclad_test_guests::VIRTIO_BLK, "--block", &block]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("write sector 1: error"), "{stdout}");
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        before,
        "a read-only disk is not written"
    );
}

#[test]
fn a_hostile_guest_gets_errors_and_cannot_crash_the_vmm() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = disk_image(dir.path());
    let metrics_path = dir.path().join("metrics.json");
    let block = format!("path={},serial=junk", disk.display());
    let output = run_vmm(&[
        "--kernel",
        ironclad_test_guests::VIRTIO_GARBAGE,
        "--block",
        &block,
        "--metrics",
        metrics_path.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the VMM must survive: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let ioerr = "0x0000000000000001";
    for (what, expected) in [
        ("status after abuse", "0x0000000000000000"),
        ("data outside guest memory", ioerr),
        ("data in the MMIO hole", ioerr),
        ("past the end of the disk", ioerr),
        ("unaligned length", ioerr),
        ("unknown request type", "0x0000000000000002"),
        ("writable header", ioerr),
        ("looping chain used length", "0x0000000000000000"),
        ("next past the queue used length", "0x0000000000000000"),
        ("honest read", "0x0000000000000000"),
    ] {
        assert!(
            stdout.contains(&format!("{what}: {expected}\n")),
            "{what}: expected {expected} in:\n{stdout}"
        );
    }
    assert!(stdout.contains("garbage done"), "{stdout}");
    let metrics = metrics(&metrics_path);
    let counters = &metrics["block"][0][1];
    assert!(counters["invalid_requests"].as_u64().unwrap() >= 8, "{counters}");
    assert!(
        counters["unanswerable_chains"].as_u64().unwrap() >= 2,
        "{counters}"
    );
    assert!(metrics["mmio_rejected"][0].as_u64().unwrap() >= 4, "{metrics}");
}
