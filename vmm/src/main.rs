//! `ironclad-vmm`: runs one microVM described by a JSON file or by flags.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ironclad_protocol::error_chain;
use ironclad_vmm::builder::run_vm;
use ironclad_vmm::config::{BlockConfig, FsConfig, NetConfig, SerialOutput, VmConfig, VsockConfig};
use ironclad_vmm::vstate::vcpu::ExitReason;

#[derive(Parser, Debug)]
#[command(version, about = "The ironclad KVM microVM monitor")]
struct Args {
    /// A JSON VM description; the other flags are then not allowed.
    #[arg(long, conflicts_with_all = ["kernel", "initrd", "cmdline", "vcpus", "memory_mib", "block", "net", "vsock", "fs", "free_page_reporting", "serial", "metrics", "boot_timer", "no_seccomp"])]
    config: Option<PathBuf>,
    /// An ELF vmlinux or a bzImage.
    #[arg(long, required_unless_present = "config")]
    kernel: Option<PathBuf>,
    #[arg(long)]
    initrd: Option<PathBuf>,
    #[arg(long)]
    cmdline: Option<String>,
    #[arg(long)]
    vcpus: Option<u8>,
    #[arg(long)]
    memory_mib: Option<u32>,
    /// `path=FILE,serial=ID[,ro]`, repeatable.
    #[arg(long)]
    block: Vec<String>,
    /// `tap=NAME,mac=aa:bb:cc:dd:ee:ff`, repeatable.
    #[arg(long)]
    net: Vec<String>,
    /// `cid=N,uds=PATH`.
    #[arg(long)]
    vsock: Option<String>,
    /// `socket=PATH,tag=TAG` (a virtiofsd socket), repeatable.
    #[arg(long)]
    fs: Vec<String>,
    /// A virtio-balloon through which the guest gives back the memory it frees.
    #[arg(long)]
    free_page_reporting: bool,
    /// `stdout`, `none` or `file:PATH`.
    #[arg(long)]
    serial: Option<String>,
    /// Write the device counters here (JSON) when the VM stops.
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Log the guest's boot-timer signal (123 written to port 0x3f0) on stderr.
    #[arg(long)]
    boot_timer: bool,
    /// Run without seccomp filters (debugging only).
    #[arg(long)]
    no_seccomp: bool,
}

fn key_values(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.split(',').map(|part| part.split_once('=').unwrap_or((part, "")))
}

fn config_from_flags(args: Args) -> Result<VmConfig, String> {
    let kernel = args.kernel.ok_or("--kernel is required")?;
    let mut config: VmConfig = serde_json::from_value(serde_json::json!({ "kernel": kernel }))
        .map_err(|e| format!("cannot build the configuration: {e}"))?;
    config.initrd = args.initrd;
    config.metrics = args.metrics;
    config.boot_timer = args.boot_timer;
    config.free_page_reporting = args.free_page_reporting;
    config.seccomp = !args.no_seccomp;
    config.cmdline = args.cmdline.unwrap_or(config.cmdline);
    config.vcpus = args.vcpus.unwrap_or(config.vcpus);
    config.memory_mib = args.memory_mib.unwrap_or(config.memory_mib);
    for spec in &args.block {
        let mut block = BlockConfig { path: PathBuf::new(), read_only: false, serial: String::new() };
        for (key, value) in key_values(spec) {
            match key {
                "path" => block.path = value.into(),
                "serial" => block.serial = value.into(),
                "ro" => block.read_only = true,
                other => return Err(format!("--block: unknown key {other:?} in {spec:?}")),
            }
        }
        config.block.push(block);
    }
    for spec in &args.net {
        let mut net = NetConfig { tap: String::new(), mac: String::new() };
        for (key, value) in key_values(spec) {
            match key {
                "tap" => net.tap = value.into(),
                "mac" => net.mac = value.into(),
                other => return Err(format!("--net: unknown key {other:?} in {spec:?}")),
            }
        }
        config.net.push(net);
    }
    for spec in &args.fs {
        let mut fs = FsConfig { socket: PathBuf::new(), tag: String::new() };
        for (key, value) in key_values(spec) {
            match key {
                "socket" => fs.socket = value.into(),
                "tag" => fs.tag = value.into(),
                other => return Err(format!("--fs: unknown key {other:?} in {spec:?}")),
            }
        }
        config.fs.push(fs);
    }
    if let Some(spec) = &args.vsock {
        let mut vsock = VsockConfig { guest_cid: 0, uds_path: PathBuf::new() };
        for (key, value) in key_values(spec) {
            match key {
                "cid" => {
                    vsock.guest_cid = value.parse().map_err(|_| format!("--vsock: bad cid {value:?}"))?
                }
                "uds" => vsock.uds_path = value.into(),
                other => return Err(format!("--vsock: unknown key {other:?} in {spec:?}")),
            }
        }
        config.vsock = Some(vsock);
    }
    if let Some(serial) = &args.serial {
        config.serial = match serial.as_str() {
            "stdout" => SerialOutput::Stdout,
            "none" => SerialOutput::None,
            other => match other.strip_prefix("file:") {
                Some(path) => SerialOutput::File(path.into()),
                None => return Err(format!("--serial: expected stdout, none or file:PATH, got {other:?}")),
            },
        };
    }
    Ok(config)
}

fn main() -> ExitCode {
    ironclad_vmm::logger::init(ironclad_vmm::logger::level_from_env());
    let args = Args::parse();
    let config = match &args.config {
        Some(path) => VmConfig::from_json_file(path).map_err(|e| error_chain(&e)),
        None => config_from_flags(args),
    };
    let result = config.and_then(|config| run_vm(&config).map_err(|e| error_chain(&e)));
    match result {
        Ok(ExitReason::Error(reason)) => {
            say(&format!("ironclad-vmm: the VM failed: {reason}"));
            ExitCode::FAILURE
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(err) => {
            say(&format!("ironclad-vmm: {err}"));
            ExitCode::FAILURE
        }
    }
}

/// The last word on stderr. Whoever reads it may be gone (a closed pipe): the exit status still
/// says what happened, so a failed write is not another failure (eprintln! would panic).
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}
