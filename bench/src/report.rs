//! The Markdown and JSON reports.

use std::fmt::Write as _;
use std::path::Path;

use crate::machine::Machine;
use crate::stats::Summary;
use crate::vmm::{Results, Settings};

pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

fn row(name: &str, s: &Summary, unit: &str) -> String {
    format!("| {name} | {:.2} | {:.2} | {:.2} | {:.2} {unit} |\n", s.min, s.median, s.p95, s.max)
}

pub fn vmm_markdown(machine: &Machine, settings: &Settings, r: &Results) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "## ironclad-vmm (`make bench`)\n");
    let _ = writeln!(
        md,
        "Machine: {} ({} cores, {} GiB), Linux {}, KVM {}. Backend: ironclad-vmm (release build), 1 vCPU, {} MiB.\n",
        machine.cpu, machine.cores, machine.memory_gib, machine.kernel, machine.kvm, r.memory_mib
    );
    let _ = writeln!(
        md,
        "Guest: `vmm/test-guests/guests/bench_ready.c`, a freestanding ELF that writes the boot timer \
         (port 0x3f0) first, then `FCREADY` on the serial port, then resets through the i8042. Times \
         run from just before exec.\n"
    );
    let _ = writeln!(md, "| figure ({} runs) | min | median | p95 | max |", r.first_instruction_ms.runs);
    let _ = writeln!(md, "|---|---|---|---|---|");
    md.push_str(&row("exec → first guest instruction (ms)", &r.first_instruction_ms, "ms"));
    md.push_str(&row("exec → first serial byte (ms)", &r.first_serial_byte_ms, "ms"));
    md.push_str(&row("exec → exit after guest reset (ms)", &r.exit_ms, "ms"));
    md.push_str(&row("peak RSS, ru_maxrss (KiB)", &r.peak_rss_kib, "KiB"));
    let _ = writeln!(md);
    let m = &r.memory;
    let _ = writeln!(
        md,
        "Memory of a running VM (idle guest, from /proc/PID/smaps): VMM RSS excluding guest memory \
         **{} KiB** ({:.2} MiB; PSS {} KiB), guest memory touched {} KiB, total RSS {} KiB.\n",
        m.vmm_rss_kib,
        m.vmm_rss_kib as f64 / 1024.0,
        m.vmm_pss_kib,
        m.guest_memory_rss_kib,
        m.total_rss_kib
    );
    let _ = writeln!(
        md,
        "VM churn: **{:.1} VMs started and stopped per second** ({} back-to-back runs, one at a time).\n",
        r.vms_per_second, r.churn_runs
    );
    let _ = writeln!(
        md,
        "Settings: {} runs, {} churn runs, VMM `{}`.",
        settings.runs,
        settings.churn,
        settings.vmm.display()
    );
    md
}

pub fn write(
    report: &Path,
    json: &Path,
    markdown: &str,
    machine: &Machine,
    results: &Results,
) -> std::io::Result<()> {
    let intro = "# Benchmarks\n\nWritten by `ironclad-bench`; every figure below comes from the run that \
                 wrote this file, on the machine it names. Reproduce with `make bench`.\n\n";
    std::fs::write(report, format!("{intro}{markdown}"))?;
    let value = serde_json::json!({ "machine": machine, "vmm": results });
    std::fs::write(json, serde_json::to_vec_pretty(&value).map_err(std::io::Error::other)?)
}
