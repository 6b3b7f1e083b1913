//! `ironclad-boot`: boots the guest once, as `make demo` shows it: prints the agent's ready line and
//! the boot time, checks the agent's health over hybrid vsock, asks it to end the sandbox and waits
//! for the VM to exit.

use std::process::ExitCode;
use std::time::Instant;

use ironclad_shim::hypervisor::HypervisorKind;
use ironclad_tests::{boot_guest_with, hypervisor_from_env, init_logging, GuestArtifacts, EXIT_TIMEOUT};

/// `--hypervisor auto|ironclad|qemu` (default: $IRONCLAD_HYPERVISOR, else auto).
fn hypervisor_from_args() -> Result<HypervisorKind, Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => Ok(hypervisor_from_env()?),
        [flag, kind] if flag == "--hypervisor" => Ok(kind.parse()?),
        _ => Err("usage: ironclad-boot [--hypervisor auto|ironclad|qemu]".into()),
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let kind = hypervisor_from_args()?;
    let artifacts = GuestArtifacts::locate()?;
    let started = Instant::now();
    let guest = boot_guest_with(kind, &artifacts.vm_config()).await?;
    let ready = &guest.ready;
    println!("backend: {}", guest.backend);
    println!("ironclad-agent ready version={} uptime_ms={}", ready.line.version, ready.line.uptime_ms);
    println!(
        "boot time: {} ms from the monitor's start to the ready line ({} ms of guest uptime)",
        ready.since_start.as_millis(),
        ready.line.uptime_ms
    );
    guest.agent.check().await?;
    let version = guest.agent.version().await?;
    println!(
        "health check over hybrid vsock: SERVING (agent {} API v{}), {} ms after start",
        version.agent_version,
        version.api_version,
        started.elapsed().as_millis()
    );
    guest.agent.destroy_sandbox().await?;
    let status = guest.vm.stop(EXIT_TIMEOUT).await?;
    println!("VM exited ({status}) {} ms after start", started.elapsed().as_millis());
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    init_logging();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ironclad-boot: {}", ironclad_shim::hypervisor::error_chain(err.as_ref()));
            ExitCode::FAILURE
        }
    }
}
