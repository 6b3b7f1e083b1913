//! The real guest booted by each monitor, runs interleaved: from the monitor's start to the agent's
//! ready line, the guest kernel's own uptime at that line, and the monitor's memory outside the
//! guest's RAM. Run where both monitors use KVM (the nested tier's L1, a host with vmx/svm).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use ironclad_shim::hypervisor::{Backend, HostVirtualization, HypervisorKind, VmConfig};
use ironclad_shim::paths::SandboxPaths;
use serde::Serialize;

use crate::stats::{summarize, Summary};

const READY_TIMEOUT: Duration = Duration::from_secs(180);
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{backend}: {source}")]
    Hypervisor {
        backend: &'static str,
        #[source]
        source: ironclad_shim::hypervisor::Error,
    },
    #[error("{backend}: the agent did not answer")]
    Agent {
        backend: &'static str,
        #[source]
        source: ironclad_shim::agent_client::Error,
    },
    #[error("cannot make a run directory")]
    RunDir(#[source] std::io::Error),
    #[error("the guest is not built: {0} is missing (make guest)")]
    Guest(PathBuf),
}

pub struct Settings {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub memory_mib: u32,
    pub runs: usize,
}

/// One monitor's figures.
#[derive(Debug, Clone, Serialize)]
pub struct MonitorFigures {
    /// How the backend ran: the monitor and its acceleration.
    pub monitor: String,
    /// Monitor start (exec) to the agent's ready line on the console, ms.
    pub ready_ms: Summary,
    /// The guest kernel's uptime when the agent printed the line, ms.
    pub guest_uptime_ms: Summary,
    /// Resident memory of the monitor process outside the guest's RAM, KiB, once the agent is ready.
    pub monitor_rss_kib: Summary,
}

#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub runs: usize,
    pub memory_mib: u32,
    pub monitors: BTreeMap<&'static str, MonitorFigures>,
}

#[derive(Default)]
struct Samples {
    ready_ms: Vec<f64>,
    uptime_ms: Vec<f64>,
    rss_kib: Vec<f64>,
}

pub async fn measure(settings: &Settings, progress: impl Fn(String)) -> Result<Results, Error> {
    for path in [&settings.kernel, &settings.initrd] {
        if !path.is_file() {
            return Err(Error::Guest(path.clone()));
        }
    }
    let host = HostVirtualization::detect();
    let backends = [
        Backend::select(HypervisorKind::Ironclad, host)
            .map_err(|source| Error::Hypervisor { backend: "ironclad", source })?,
        Backend::select(HypervisorKind::Qemu, host)
            .map_err(|source| Error::Hypervisor { backend: "qemu", source })?,
    ];
    let config = VmConfig {
        kernel: settings.kernel.clone(),
        initrd: settings.initrd.clone(),
        opened: None,
        vcpus: 1,
        memory_mib: settings.memory_mib,
        extra_kernel_params: String::new(),
        block_devices: vec![],
        network: None,
        shared_dir: None,
        free_page_reporting: true,
    };
    let mut samples: BTreeMap<&'static str, Samples> = BTreeMap::new();
    for run in 0..settings.runs {
        for backend in &backends {
            progress(format!("boot {}/{} ({})", run + 1, settings.runs, backend.name()));
            let (ready_ms, uptime_ms, rss_kib) = boot_once(backend, &config, settings.memory_mib).await?;
            let s = samples.entry(backend.name()).or_default();
            s.ready_ms.push(ready_ms);
            s.uptime_ms.push(uptime_ms);
            s.rss_kib.push(rss_kib);
        }
    }
    let monitors = backends
        .iter()
        .filter_map(|backend| {
            let s = samples.get(backend.name())?;
            Some((
                backend.name(),
                MonitorFigures {
                    monitor: describe(backend, host),
                    ready_ms: summarize(&s.ready_ms)?,
                    guest_uptime_ms: summarize(&s.uptime_ms)?,
                    monitor_rss_kib: summarize(&s.rss_kib)?,
                },
            ))
        })
        .collect();
    Ok(Results { runs: settings.runs, memory_mib: settings.memory_mib, monitors })
}

fn describe(backend: &Backend, host: HostVirtualization) -> String {
    match backend {
        Backend::Ironclad(_) => "ironclad-vmm (KVM)".to_string(),
        Backend::Qemu(_) if host.can_boot_linux_on_kvm() => "QEMU -M microvm -enable-kvm".to_string(),
        Backend::Qemu(_) => "QEMU -M microvm, TCG".to_string(),
    }
}

/// Boots once: (ready ms, guest uptime ms, monitor RSS outside guest RAM in KiB).
async fn boot_once(backend: &Backend, config: &VmConfig, memory_mib: u32) -> Result<(f64, f64, f64), Error> {
    let name = backend.name();
    let run_root =
        tempfile::Builder::new().prefix("ironclad-bench-boot-").tempdir().map_err(Error::RunDir)?;
    let paths = SandboxPaths::new(run_root.path(), "sandbox");
    let hypervisor = |source| Error::Hypervisor { backend: name, source };
    let mut vm = backend.start(config, paths, None).await.map_err(hypervisor)?;
    let ready = vm.wait_ready(READY_TIMEOUT).await.map_err(hypervisor)?;
    let monitor = vm.pids().first().copied().unwrap_or_default();
    let rss = rss_outside_guest_ram_kib(monitor, u64::from(memory_mib) * 1024);
    let agent = ironclad_shim::agent_client::AgentClient::connect(
        vm.agent_socket(),
        ironclad_shim::agent_client::AGENT_PORT,
        Duration::from_secs(30),
    )
    .await
    .map_err(|source| Error::Agent { backend: name, source })?;
    agent.destroy_sandbox().await.map_err(|source| Error::Agent { backend: name, source })?;
    vm.stop(EXIT_TIMEOUT).await.map_err(hypervisor)?;
    Ok((ready.since_start.as_secs_f64() * 1000.0, ready.line.uptime_ms as f64, rss))
}

/// The process's resident memory from its smaps, less the guest's RAM: the mappings of exactly the
/// guest's size (anonymous for ironclad-vmm, the memfd for QEMU).
pub fn rss_outside_guest_ram_kib(pid: u32, guest_kib: u64) -> f64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    rss_outside_mappings_of_size(&smaps, guest_kib) as f64
}

fn rss_outside_mappings_of_size(smaps: &str, size_kib: u64) -> u64 {
    let field = |block: &str, name: &str| -> u64 {
        block
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    // Each mapping starts with its address range; its fields follow until the next one.
    let mut total = 0;
    let mut block = String::new();
    let mut flush = |block: &str| {
        if !block.is_empty() && field(block, "Size:") != size_kib {
            total += field(block, "Rss:");
        }
    };
    for line in smaps.lines() {
        let starts_mapping =
            line.split_whitespace().next().is_some_and(|w| w.contains('-') && !w.ends_with(':'));
        if starts_mapping {
            flush(&block);
            block.clear();
        }
        block.push_str(line);
        block.push('\n');
    }
    flush(&block);
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_ram_mapping_is_left_out() {
        let smaps = "\
55d0a0000000-55d0a0100000 r-xp 00000000 08:01 123 /usr/bin/qemu-system-x86_64
Size:               1024 kB
Rss:                 800 kB
VmFlags: rd ex
7f0000000000-7f0010000000 rw-s 00000000 00:01 5 /memfd:mem (deleted)
Size:             262144 kB
Rss:               49152 kB
VmFlags: rd wr sh
7f0020000000-7f0020200000 rw-p 00000000 00:00 0
Size:               2048 kB
Rss:                 300 kB
VmFlags: rd wr
";
        assert_eq!(rss_outside_mappings_of_size(smaps, 262144), 1100);
    }
}
