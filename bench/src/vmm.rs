//! ironclad-vmm on its own: start time, memory overhead, VM churn, with the benchmark test guest.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use serde::Serialize;

use crate::stats::{summarize, Summary};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot run {vmm}")]
    Spawn {
        vmm: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the benchmark guest misbehaved: {0}")]
    Guest(String),
    #[error("cannot read /proc/{pid}/smaps")]
    Smaps {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("I/O with the VMM failed")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub vmm: PathBuf,
    pub runs: usize,
    pub churn: usize,
    pub memory_mib: u32,
}

/// One boot of the benchmark guest, times from just before exec.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Run {
    pub first_instruction_ms: f64,
    pub first_serial_byte_ms: f64,
    pub exit_ms: f64,
    pub peak_rss_kib: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    pub total_rss_kib: u64,
    pub guest_memory_rss_kib: u64,
    /// What the VMM itself costs: everything but the guest's RAM mapping.
    pub vmm_rss_kib: u64,
    pub vmm_pss_kib: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub first_instruction_ms: Summary,
    pub first_serial_byte_ms: Summary,
    pub exit_ms: Summary,
    pub peak_rss_kib: Summary,
    pub memory: Memory,
    pub vms_per_second: f64,
    pub churn_runs: usize,
    pub memory_mib: u32,
}

fn monotonic_ns() -> u128 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u128 * 1_000_000_000 + t.tv_nsec() as u128)
        .unwrap_or(0)
}

fn vmm_command(settings: &Settings, guest: &str) -> Command {
    let mut command = Command::new(&settings.vmm);
    command.args(["--kernel", guest, "--memory-mib", &settings.memory_mib.to_string()]);
    command
}

/// Waits for `pid` and returns its peak RSS in KiB (ru_maxrss).
fn wait_with_peak_rss(pid: u32) -> Result<(i32, u64), Error> {
    let mut status = 0;
    // SAFETY: rusage is plain data, valid when zeroed; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = i32::try_from(pid).map_err(|_| Error::Guest("pid out of range".into()))?;
    // SAFETY: waits for a child of this process; status and usage point at live locals.
    let ret = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if ret != pid {
        return Err(Error::Io(std::io::Error::last_os_error()));
    }
    Ok((status, u64::try_from(usage.ru_maxrss).unwrap_or(0)))
}

fn one_boot(settings: &Settings) -> Result<Run, Error> {
    let t0_ns = monotonic_ns();
    let start = Instant::now();
    let mut child = vmm_command(settings, ironclad_test_guests::BENCH_READY)
        .arg("--boot-timer")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Spawn { vmm: settings.vmm.clone(), source })?;
    let mut stdout = child.stdout.take().ok_or_else(|| Error::Guest("no stdout".into()))?;
    let mut first = [0u8; 1];
    stdout.read_exact(&mut first)?;
    let first_serial = start.elapsed();
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest)?;
    let mut stderr = String::new();
    child.stderr.take().ok_or_else(|| Error::Guest("no stderr".into()))?.read_to_string(&mut stderr)?;
    let (status, peak_rss_kib) = wait_with_peak_rss(child.id())?;
    let exit = start.elapsed();
    if status != 0 || first[0] != b'F' || rest != b"CREADY\n" {
        return Err(Error::Guest(format!("status {status}, output {:?}, stderr {stderr:?}", rest)));
    }
    let signal_ns: u128 = stderr
        .lines()
        .find_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("monotonic_ns=")))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error::Guest(format!("no boot-timer line in {stderr:?}")))?;
    Ok(Run {
        first_instruction_ms: signal_ns.saturating_sub(t0_ns) as f64 / 1e6,
        first_serial_byte_ms: first_serial.as_secs_f64() * 1e3,
        exit_ms: exit.as_secs_f64() * 1e3,
        peak_rss_kib,
    })
}

/// RSS of a running VMM, split into its guest RAM mapping and everything else.
fn idle_memory(settings: &Settings) -> Result<Memory, Error> {
    let mut child = vmm_command(settings, ironclad_test_guests::SPIN_FOREVER)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| Error::Spawn { vmm: settings.vmm.clone(), source })?;
    let mut line = [0u8; 9];
    let ready = child.stdout.as_mut().map(|s| s.read_exact(&mut line));
    let measured = match ready {
        Some(Ok(())) if &line == b"spinning\n" => read_smaps(child.id(), settings.memory_mib),
        _ => Err(Error::Guest("the idle guest did not start".into())),
    };
    let _ = child.kill();
    let _ = child.wait();
    measured
}

fn read_smaps(pid: u32, memory_mib: u32) -> Result<Memory, Error> {
    let path = format!("/proc/{pid}/smaps");
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Smaps { pid, source })?;
    Ok(split_smaps(&text, u64::from(memory_mib) * 1024))
}

/// Sums Rss and Pss over all mappings, and the Rss of the one mapping of exactly the guest's size.
pub fn split_smaps(text: &str, guest_kib: u64) -> Memory {
    let field = |line: &str, name: &str| -> Option<u64> {
        line.strip_prefix(name)?.split_whitespace().next()?.parse().ok()
    };
    let (mut total_rss, mut total_pss, mut guest_rss) = (0u64, 0u64, 0u64);
    let mut current_size = 0u64;
    for line in text.lines() {
        if let Some(size) = field(line, "Size:") {
            current_size = size;
        } else if let Some(rss) = field(line, "Rss:") {
            total_rss += rss;
            if current_size == guest_kib {
                guest_rss += rss;
            }
        } else if let Some(pss) = field(line, "Pss:") {
            if current_size != guest_kib {
                total_pss += pss;
            }
        }
    }
    Memory {
        total_rss_kib: total_rss,
        guest_memory_rss_kib: guest_rss,
        vmm_rss_kib: total_rss - guest_rss,
        vmm_pss_kib: total_pss,
    }
}

fn churn(settings: &Settings) -> Result<f64, Error> {
    let start = Instant::now();
    for _ in 0..settings.churn {
        let status = vmm_command(settings, ironclad_test_guests::BENCH_READY)
            .stdout(Stdio::null())
            .status()
            .map_err(|source| Error::Spawn { vmm: settings.vmm.clone(), source })?;
        if !status.success() {
            return Err(Error::Guest(format!("a churn run ended with {status}")));
        }
    }
    Ok(settings.churn as f64 / start.elapsed().as_secs_f64())
}

pub fn measure(settings: &Settings, progress: impl Fn(&str)) -> Result<Results, Error> {
    let mut runs = Vec::with_capacity(settings.runs);
    for i in 0..settings.runs {
        runs.push(one_boot(settings)?);
        progress(&format!("boot {}/{}", i + 1, settings.runs));
    }
    let pick = |f: fn(&Run) -> f64| summarize(&runs.iter().map(f).collect::<Vec<_>>());
    let none = || Error::Guest("no runs".into());
    progress("memory of an idle VM");
    let memory = idle_memory(settings)?;
    progress(&format!("{} VMs started and stopped back to back", settings.churn));
    let vms_per_second = churn(settings)?;
    Ok(Results {
        first_instruction_ms: pick(|r| r.first_instruction_ms).ok_or_else(none)?,
        first_serial_byte_ms: pick(|r| r.first_serial_byte_ms).ok_or_else(none)?,
        exit_ms: pick(|r| r.exit_ms).ok_or_else(none)?,
        peak_rss_kib: pick(|r| r.peak_rss_kib as f64).ok_or_else(none)?,
        memory,
        vms_per_second,
        churn_runs: settings.churn,
        memory_mib: settings.memory_mib,
    })
}

pub fn vmm_binary_default() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/ironclad-vmm")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_split_separates_the_guest_mapping() {
        let smaps = "7f00-7f08 rw-p 00000000 00:00 0\nSize:             131072 kB\nRss:                 512 kB\nPss:                 512 kB\n\
                     5500-5600 r-xp 00000000 08:01 42 /usr/bin/ironclad-vmm\nSize:               1024 kB\nRss:                 800 kB\nPss:                 700 kB\n";
        let memory = split_smaps(smaps, 131072);
        assert_eq!(memory.total_rss_kib, 1312);
        assert_eq!(memory.guest_memory_rss_kib, 512);
        assert_eq!(memory.vmm_rss_kib, 800);
        assert_eq!(memory.vmm_pss_kib, 700);
    }
}
