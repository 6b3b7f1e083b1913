//! `make demo`: a private containerd (own root, state and socket in a temporary directory) runs
//! `uname -a; echo hello from a microVM` in a locally built busybox image, once with the ironclad
//! runtime and once with runc, and prints both outputs and wall times.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use ironclad_tests::containerd::{Artifacts, Containerd, BUSYBOX_IMAGE, IRONCLAD_RUNTIME, RUNC_RUNTIME};
use ironclad_tests::GuestArtifacts;

const SCRIPT: &str = "uname -a; echo hello from a microVM";

fn run_once(
    containerd: &Containerd,
    runtime: &str,
    id: &str,
) -> Result<(String, f64), Box<dyn std::error::Error>> {
    let config = containerd.shim_config.display().to_string();
    let mut args = vec!["run", "--rm", "--runtime", runtime];
    if runtime == IRONCLAD_RUNTIME {
        args.extend_from_slice(&["--runtime-config-path", &config]);
    }
    args.extend_from_slice(&[BUSYBOX_IMAGE, id, "sh", "-c", SCRIPT]);
    let started = Instant::now();
    let output = containerd.ctr_ok(&args)?;
    Ok((output, started.elapsed().as_secs_f64()))
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let guest = GuestArtifacts::locate()?;
    let exe = std::env::current_exe()?;
    let shim_dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    let hypervisor = std::env::var("IRONCLAD_HYPERVISOR").unwrap_or_else(|_| "auto".into());
    let artifacts = Artifacts { kernel: guest.kernel, initrd: guest.initrd, shim_dir, hypervisor };
    println!(
        "starting a private containerd and importing a busybox image built from this host's busybox-static"
    );
    let containerd = Containerd::start(&artifacts)?;
    containerd.import_busybox()?;
    // The first ironclad run also builds the image's rootfs disk, which later runs find cached.
    let (_, first_secs) = run_once(&containerd, IRONCLAD_RUNTIME, "demo-ironclad-first")?;
    let (ironclad_output, ironclad_secs) = run_once(&containerd, IRONCLAD_RUNTIME, "demo-ironclad")?;
    let (runc_output, runc_secs) = run_once(&containerd, RUNC_RUNTIME, "demo-runc")?;
    println!("\n$ ctr run --rm --runtime {IRONCLAD_RUNTIME} {BUSYBOX_IMAGE} demo sh -c '{SCRIPT}'");
    print!("{ironclad_output}");
    println!("\n$ ctr run --rm --runtime {RUNC_RUNTIME} {BUSYBOX_IMAGE} demo sh -c '{SCRIPT}'");
    print!("{runc_output}");
    println!(
        "\nwall time, ctr run --rm to exit: ironclad {ironclad_secs:.2} s (first run, building the image's disk: \
         {first_secs:.2} s), runc {runc_secs:.2} s"
    );
    println!(
        "(hypervisor backend: {}; see the shim's log lines in containerd's log for why)",
        artifacts.hypervisor
    );
    Ok(())
}

/// `ironclad-demo --write-image FILE`: only writes the busybox OCI archive, for `ctr images import`.
fn write_image(path: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let work = tempfile::tempdir()?;
    ironclad_tests::containerd::build_busybox_archive(work.path(), path)?;
    println!(
        "wrote {} ({BUSYBOX_IMAGE} and {}): `ctr images import {}`",
        path.display(),
        ironclad_tests::containerd::BUSYBOX_USER_IMAGE,
        path.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.as_slice() {
        [] => run(),
        [flag, path] if flag == "--write-image" => write_image(std::path::Path::new(path)),
        _ => Err("usage: ironclad-demo [--write-image FILE]".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ironclad-demo: {err}");
            ExitCode::FAILURE
        }
    }
}
