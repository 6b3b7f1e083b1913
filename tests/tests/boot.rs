#![allow(clippy::unwrap_used)] // test code: a failed step should stop the test right there

//! The real guest kernel + initrd under QEMU (TCG here): ready line, health check over hybrid vsock,
//! shutdown through the agent, and nothing left behind.

use std::time::Duration;

use ironclad_tests::{boot_guest, init_logging, GuestArtifacts, EXIT_TIMEOUT};

fn process_alive(pid: u32) -> bool {
    ironclad_shim::sandbox::process_alive(pid as i32)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_boots_to_the_agent_answers_and_shuts_down() {
    init_logging();
    let artifacts = GuestArtifacts::locate().expect("guest artifacts");
    let mut guest = boot_guest(&artifacts.vm_config()).await.expect("boot");
    eprintln!(
        "boot: ready line {} ms after the {} monitor's start, guest uptime {} ms, /init at {:?} ms",
        guest.ready.since_start.as_millis(),
        guest.backend,
        guest.ready.line.uptime_ms,
        guest.ready.line.init_ms
    );
    assert_eq!(guest.ready.line.version, env!("CARGO_PKG_VERSION"));
    assert!(guest.ready.line.uptime_ms > 0);
    // The agent says when it began: the kernel's part of the boot, then its own.
    let init_ms = guest.ready.line.init_ms.expect("the ready line carries init_ms");
    assert!(init_ms > 0 && init_ms <= guest.ready.line.uptime_ms, "/init began at {init_ms} ms");

    guest.agent.check().await.expect("health check");
    let version = guest.agent.version().await.expect("version");
    assert_eq!(version.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(version.api_version, ironclad_protocol::API_VERSION);
    assert!(version.uptime_ms >= guest.ready.line.uptime_ms, "uptime went backwards");

    // The console log is written as the guest prints.
    let console = std::fs::read_to_string(guest.paths.console_log()).expect("console log");
    let agent_lines: Vec<&str> = console.lines().filter(|l| l.contains("ironclad")).collect();
    assert_eq!(agent_lines.len(), 1, "the agent prints exactly its ready line: {agent_lines:?}");
    assert!(agent_lines[0].starts_with("ironclad-agent ready version="), "{console}");

    let pids = guest.vm.pids();
    let expected = if guest.backend == "qemu" { 2 } else { 1 };
    assert_eq!(pids.len(), expected, "the {} monitor (and vhost-device-vsock for QEMU)", guest.backend);
    guest.agent.destroy_sandbox().await.expect("destroy sandbox");
    let exited = guest.vm.wait_exit(EXIT_TIMEOUT).await.expect("wait");
    let status = exited.expect("QEMU must exit by itself after the agent resets the guest");
    assert!(status.success(), "QEMU exit status {status}");

    let sandbox_dir = guest.paths.dir().to_path_buf();
    guest.vm.stop(Duration::from_secs(5)).await.expect("stop");
    assert!(!sandbox_dir.exists(), "sandbox directory left behind");
    for pid in pids {
        assert!(!process_alive(pid), "process {pid} left running");
    }
}

#[tokio::test]
async fn a_missing_kernel_is_a_clear_error() {
    let artifacts = GuestArtifacts::locate().expect("guest artifacts");
    let mut config = artifacts.vm_config();
    config.kernel = "/nonexistent/vmlinux".into();
    let err = boot_guest(&config).await.err().expect("must fail");
    assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_whose_init_fails_ends_the_vm_with_the_reason() {
    let artifacts = GuestArtifacts::locate().expect("guest artifacts");
    let mut config = artifacts.vm_config();
    // No such init: the kernel panics, and panic=-1 turns that into a reset, not a hang.
    config.extra_kernel_params = "rdinit=/nonexistent init=/nonexistent".into();
    let err = boot_guest(&config).await.err().expect("must fail");
    let text = err.to_string();
    assert!(text.contains("exited") && text.contains("before the agent was ready"), "{text}");
    assert!(text.contains("Kernel panic"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_agent_error_resets_the_vm_with_the_reason_on_the_console() {
    use ironclad_shim::hypervisor::qemu::qemu_args;
    use ironclad_shim::hypervisor::HostVirtualization;
    use ironclad_shim::paths::SandboxPaths;
    let artifacts = GuestArtifacts::locate().expect("guest artifacts");
    let dir = tempfile::tempdir().unwrap();
    let paths = SandboxPaths::new(dir.path(), "sandbox");
    std::fs::create_dir(paths.dir()).unwrap();
    // The shim's own QEMU command line, less the vsock device: the agent cannot listen on its
    // port, which is fatal, and a fatal agent must reset the VM rather than leave it running.
    let use_kvm = HostVirtualization::detect().can_boot_linux_on_kvm();
    let args = qemu_args(&artifacts.vm_config(), &paths, use_kvm, true);
    let mut kept = Vec::new();
    let mut words = args.iter().peekable();
    while let Some(word) = words.next() {
        let next = words.peek().map(|w| w.as_str()).unwrap_or_default();
        let vsock = (word == "-chardev" && next.contains("id=vsock"))
            || (word == "-device" && next.starts_with("vhost-user-vsock-device"));
        if vsock {
            words.next();
        } else {
            kept.push(word.clone());
        }
    }
    assert_eq!(kept.len() + 4, args.len(), "the vsock device was not where the test expects it");
    let mut qemu = tokio::process::Command::new("qemu-system-x86_64")
        .args(&kept)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let console_log = dir.path().join("console.log");
    let mut stdout = qemu.stdout.take().unwrap();
    let copy = {
        let console_log = console_log.clone();
        tokio::spawn(async move {
            let mut file = tokio::fs::File::create(&console_log).await.unwrap();
            tokio::io::copy(&mut stdout, &mut file).await.unwrap();
        })
    };
    let Ok(status) = tokio::time::timeout(ironclad_tests::READY_TIMEOUT, qemu.wait()).await else {
        let _ = qemu.start_kill();
        panic!(
            "the VM did not end by itself; its console:\n{}",
            std::fs::read_to_string(&console_log).unwrap()
        );
    };
    copy.await.unwrap();
    let output = std::process::Output {
        status: status.unwrap(),
        stdout: std::fs::read(&console_log).unwrap(),
        stderr: Vec::new(),
    };
    let console = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "QEMU: {}\n{console}", output.status);
    assert!(!console.contains("ironclad-agent ready"), "{console}");
    let fatal =
        console.lines().find(|l| l.contains("ironclad-agent: fatal:")).unwrap_or_else(|| panic!("{console}"));
    assert!(fatal.contains("vsock"), "the reason is named: {fatal}");
}
