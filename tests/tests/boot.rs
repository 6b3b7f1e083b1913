#![allow(clippy::unwrap_used)] // test code: a failed step should stop the test right there

//! The real guest kernel + initrd under QEMU (TCG here): ready line, health check over hybrid vsock,
//! shutdown through the agent, and nothing left behind.

use std::time::Duration;

use ironclad_tests::{boot_guest, init_logging, GuestArtifacts, EXIT_TIMEOUT};

fn process_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_boots_to_the_agent_answers_and_shuts_down() {
    init_logging();
    let artifacts = GuestArtifacts::locate().expect("guest artifacts");
    let mut guest = boot_guest(&artifacts.vm_config()).await.expect("boot");
    eprintln!(
        "boot: ready line {} ms after QEMU start, guest uptime {} ms",
        guest.ready.since_start.as_millis(),
        guest.ready.line.uptime_ms
    );
    assert_eq!(guest.ready.line.version, env!("CARGO_PKG_VERSION"));
    assert!(guest.ready.line.uptime_ms > 0);

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
    assert_eq!(pids.len(), 2, "QEMU and vhost-device-vsock");
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
    config.kernel = "/nonexistent/bzImage".into();
    let err = boot_guest(&config).await.err().expect("must fail");
    assert!(err.to_string().contains("/nonexistent/bzImage"), "{err}");
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
