//! The Markdown and JSON reports.

use std::fmt::Write as _;
use std::path::Path;

use crate::machine::Machine;
use crate::stats::Summary;
use crate::vmm::{Results, Settings};

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

const INTRO: &str =
    "# Benchmarks\n\nWritten by `ironclad-bench`; every figure below comes from the run that \
                     wrote its section, on the machine that section names. Reproduce with `make bench`.\n";

/// Puts `markdown` into the report as section `name`, replacing that section's earlier text and
/// keeping the other sections.
pub fn replace_section(report: &str, name: &str, markdown: &str) -> String {
    let (begin, end) = (format!("<!-- section:{name} -->"), format!("<!-- end:{name} -->"));
    let block = format!("{begin}\n{}\n{end}\n", markdown.trim_end());
    let body = if report.starts_with("# Benchmarks") { report.to_string() } else { format!("{INTRO}\n") };
    match (body.find(&begin), body.find(&end)) {
        (Some(start), Some(stop)) if stop > start => {
            let after =
                (stop + end.len()..body.len()).find(|&i| body.as_bytes()[i] != b'\n').unwrap_or(body.len());
            format!("{}{block}\n{}", &body[..start], &body[after..])
        }
        _ => format!("{}\n{block}", body.trim_end()),
    }
}

/// Writes the section into the report and the figures as JSON.
pub fn write_section(
    report: &Path,
    name: &str,
    markdown: &str,
    json: &Path,
    value: &serde_json::Value,
) -> std::io::Result<()> {
    let existing = std::fs::read_to_string(report).unwrap_or_default();
    std::fs::write(report, replace_section(&existing, name, markdown))?;
    std::fs::write(json, serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?)
}

pub fn write(
    report: &Path,
    json: &Path,
    markdown: &str,
    machine: &Machine,
    results: &Results,
) -> std::io::Result<()> {
    let value = serde_json::json!({ "machine": machine, "vmm": results });
    write_section(report, "vmm", markdown, json, &value)
}

/// The agent next to runc on the host, as Markdown.
pub fn agent_markdown(machine: &Machine, r: &crate::agent::Results) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "## The agent's container start vs runc, on the host (`make bench`)\n");
    let _ = writeln!(
        md,
        "Machine: {} ({} cores, {} GiB), Linux {}. The agent (release build) runs by hand in its own mount \
         namespace, driven over its Unix socket; runc runs `create` then `start`. Both take the same busybox \
         rootfs and the same spec (`runc spec`'s default running `true`), one after the other, {} runs each, \
         and both put the container into the host's cgroups ({}).\n",
        machine.cpu, machine.cores, machine.memory_gib, machine.kernel, r.runs, r.cgroups
    );
    let _ = writeln!(md, "| figure (ms) | agent p50 | p95 | min | runc p50 | p95 | min |");
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    for (name, figure) in
        [("create + start", &r.create_start_ms), ("create to removed", &r.create_to_removed_ms)]
    {
        let cells = |who: &str| match figure.get(who) {
            Some(s) => format!("{:.1} | {:.1} | {:.1}", s.median, s.p95, s.min),
            None => "– | – | –".to_string(),
        };
        let _ = writeln!(md, "| {name} | {} | {} |", cells("agent"), cells("runc"));
    }
    let _ = writeln!(
        md,
        "\nTwo containers created in one agent (CreateContainer only; each create runs libcontainer in \
         a helper process of its own, so two run side by side):\n"
    );
    let _ = writeln!(md, "| two creates (ms) | p50 | p95 | min |");
    let _ = writeln!(md, "|---|---|---|---|");
    for (name, s) in &r.two_creates_ms {
        let _ = writeln!(md, "| {name} | {:.1} | {:.1} | {:.1} |", s.median, s.p95, s.min);
    }
    md
}

/// The runtime comparison as Markdown: one table row per figure, both runtimes side by side.
/// One row per figure: each runtime's p50, p95 and min, and ironclad over runc.
fn figures_table(md: &mut String, figures: &[crate::runtimes::Figure]) {
    use crate::runtimes::Runtime;
    let _ =
        writeln!(md, "| figure | ironclad p50 | p95 | min | runc p50 | p95 | min | ironclad / runc (p50) |");
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
    for figure in figures {
        let cells = |runtime: Runtime| match figure.summaries.get(&runtime) {
            Some(s) => format!("{:.3} | {:.3} | {:.3}", s.median, s.p95, s.min),
            None => "– | – | –".to_string(),
        };
        let ratio = figure.ratio.map(|r| format!("{r:.1}×")).unwrap_or_else(|| "–".into());
        let _ = writeln!(
            md,
            "| {} ({}) | {} | {} | {ratio} |",
            figure.name,
            figure.unit,
            cells(Runtime::Ironclad),
            cells(Runtime::Runc)
        );
    }
    let _ = writeln!(md);
    for figure in figures {
        let _ = writeln!(md, "- **{}**: {}.", figure.name, figure.what);
    }
    let _ = writeln!(md);
}

fn chart_links(md: &mut String, charts: &[std::path::PathBuf], report_dir: &Path) {
    for chart in charts.iter().filter(|c| c.extension().is_some_and(|e| e == "svg")) {
        let relative = chart.strip_prefix(report_dir).unwrap_or(chart);
        let name = chart.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let _ = writeln!(md, "![{name}]({})", relative.display());
    }
}

pub fn pods_markdown(
    machine: &Machine,
    results: &crate::pods::Results,
    charts: &[std::path::PathBuf],
    report_dir: &Path,
) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "## Kubernetes pods through CRI, ironclad vs runc (`make bench`)\n");
    let _ = writeln!(
        md,
        "Machine: {} ({} cores, {} GiB), Linux {}, KVM {}. ironclad backend: {}; runc: Debian's runc through \
         containerd-shim-runc-v2. One private containerd's CRI plugin with both runtime handlers, driven by \
         a Rust CRI client as a kubelet would; each pod is the pause container and two busybox containers \
         (an `nc` listener and `sleep`), on a CNI bridge, then a third that serves the transfer; pods of \
         both runtimes interleaved, {} per runtime.\n",
        machine.cpu, machine.cores, machine.memory_gib, machine.kernel, machine.kvm, results.hypervisor, results.runs
    );
    figures_table(&mut md, &results.figures);
    chart_links(&mut md, charts, report_dir);
    md
}

pub fn runtimes_markdown(
    machine: &Machine,
    results: &crate::runtimes::Results,
    charts: &[std::path::PathBuf],
    report_dir: &Path,
) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "## ironclad vs runc through containerd (`make bench`)\n");
    let _ = writeln!(
        md,
        "Machine: {} ({} cores, {} GiB), Linux {}, KVM {}. ironclad backend: {}; runc: Debian's runc through containerd-shim-runc-v2. Both runtimes run the same \
         busybox image in one private containerd, their runs interleaved. {} runs per figure.\n",
        machine.cpu, machine.cores, machine.memory_gib, machine.kernel, machine.kvm, results.hypervisor, results.runs
    );
    figures_table(&mut md, &results.figures);
    start_timeline_table(&mut md, results);
    warm_timeline_table(&mut md, results);
    idle_memory_table(&mut md, results);
    goals(&mut md, results);
    why_under_emulation(&mut md, results);
    if !results.density.is_empty() {
        let _ = writeln!(md, "Density: N idle sandboxes (`sleep`) started at once with `ctr run -d`.\n");
        let _ = writeln!(
            md,
            "| runtime | N | time until all run (s) | PSS of all (MiB) | PSS per sandbox (MiB) |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|");
        for p in &results.density {
            let _ = writeln!(
                md,
                "| {} | {} | {:.2} | {:.1} | {:.1} |",
                p.runtime.name(),
                p.sandboxes,
                p.start_all_s,
                p.pss_mib,
                p.pss_mib / p.sandboxes.max(1) as f64
            );
        }
        let _ = writeln!(md);
    }
    if !results.density_skipped.is_empty() {
        let _ = writeln!(md, "Density sizes skipped for lack of memory: {:?}.\n", results.density_skipped);
    }
    let _ = writeln!(
        md,
        "Network throughput and connect latency are measured with pods (the CRI section). Writes to the \
         container's root file system land, for ironclad, in the guest's tmpfs overlay over the read-only image \
         disk, so their fsync is cheap; runc writes to the host's overlayfs snapshot.\n"
    );
    chart_links(&mut md, charts, report_dir);
    md
}

/// Where an ironclad cold start goes: each phase's median (shim/src/timeline.rs, against the
/// benchmark's own clock).
fn start_timeline_table(md: &mut String, results: &crate::runtimes::Results) {
    if results.timeline.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "Where an ironclad cold start goes, phase by phase: the shim marks each step on the host's clock \
         (the guest's kernel and /init placed from the agent's ready line, which says the guest's uptime and \
         when /init began) and logs them when the task is deleted; the benchmark adds when `ctr run` began and \
         returned. Medians of {} runs (a median each, so they add up to about the median cold start, not \
         exactly).\n",
        results.timeline_runs
    );
    phase_table(md, &results.timeline);
}

/// Where an ironclad warm start goes: the same, for runs that took a VM from ironclad-pool.
fn warm_timeline_table(md: &mut String, results: &crate::runtimes::Results) {
    if results.warm_timeline.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "Where an ironclad warm start goes (a VM taken from ironclad-pool, which kept one booted and \
         paused, and each run waited until it had one; docs/pool.md): the same marks, the agent counted ready \
         once the shim has taken the VM and connected. No kernel boots and nothing is hashed; what is left is \
         the container's creation inside the guest (the rootfs over virtio-fs, libcontainer's namespaces and \
         mounts, its init), the VM's teardown after the exit, and the process itself. Medians of {} runs.\n",
        results.warm_timeline_runs
    );
    phase_table(md, &results.warm_timeline);
}

/// Each phase's median and share of their sum, and the sum.
fn phase_table(md: &mut String, phases: &[crate::timeline::Phase]) {
    let sum: f64 = phases.iter().map(|p| p.median_ms).sum();
    let _ = writeln!(md, "| phase | median (ms) | share |");
    let _ = writeln!(md, "|---|---|---|");
    for phase in phases {
        let share = if sum > 0.0 { 100.0 * phase.median_ms / sum } else { 0.0 };
        let _ = writeln!(md, "| {} | {:.0} | {:.0} % |", phase.name, phase.median_ms, share);
    }
    let _ = writeln!(md, "| all phases | {sum:.0} | |\n");
}

/// Issue 14's goals for this machine, each against what this run measured, and for one missed the
/// largest phases of the timeline or parts of the memory: where the rest of the time or memory is.
fn goals(md: &mut String, results: &crate::runtimes::Results) {
    use crate::runtimes::{Runtime, COLD_START, FIRST_OUTPUT, IDLE_MEMORY, WARM_START};
    let p50 = |name: &str, runtime: Runtime| {
        results
            .figures
            .iter()
            .find(|f| f.name == name)
            .and_then(|f| f.summaries.get(&runtime))
            .map(|s| s.median)
    };
    let verdict = |value: f64, goal: f64| if value <= goal { "met" } else { "missed" };
    let mut phases: Vec<&crate::timeline::Phase> = results.timeline.iter().collect();
    phases.sort_by(|a, b| b.median_ms.total_cmp(&a.median_ms));
    let slowest: Vec<String> =
        phases.iter().take(3).map(|p| format!("{} ({:.0} ms)", p.name, p.median_ms)).collect();
    let _ = writeln!(md, "Issue 14's goals on this machine, against this run:\n");
    if let Some(cold) = p50(COLD_START, Runtime::Ironclad) {
        let _ = writeln!(
            md,
            "- cold `ctr run --rm` p50 ≤ 0.9 s: {cold:.2} s, {}; the largest phases: {}.",
            verdict(cold, 0.9),
            slowest.join(", ")
        );
    }
    if let Some(first) = p50(FIRST_OUTPUT, Runtime::Ironclad) {
        let _ = writeln!(md, "- first output p50 ≤ 0.6 s: {first:.2} s, {}.", verdict(first, 0.6));
    }
    if let Some(pss) = p50(IDLE_MEMORY, Runtime::Ironclad) {
        let largest: Vec<String> = results
            .idle_memory
            .iter()
            .take(3)
            .map(|(part, mib)| format!("{} ({mib:.0} MiB)", part.label()))
            .collect();
        let _ = writeln!(
            md,
            "- PSS per idle sandbox ≤ 64 MiB: {pss:.0} MiB, {}; the largest parts: {}.",
            verdict(pss, 64.0),
            largest.join(", ")
        );
    }
    match results.density.iter().filter(|p| p.runtime == Runtime::Ironclad).map(|p| p.sandboxes).max() {
        Some(n) => {
            let _ = writeln!(
                md,
                "- 25 sandboxes start and run: {n} at most in this run, {}.",
                verdict(25.0, n as f64)
            );
        }
        None => {
            let _ = writeln!(md, "- 25 sandboxes start and run: not measured in this run.");
        }
    }
    match (p50(WARM_START, Runtime::Ironclad), p50(WARM_START, Runtime::Runc)) {
        (Some(warm), Some(runc)) => {
            let mut warm_phases: Vec<&crate::timeline::Phase> = results.warm_timeline.iter().collect();
            warm_phases.sort_by(|a, b| b.median_ms.total_cmp(&a.median_ms));
            let largest: Vec<String> =
                warm_phases.iter().take(3).map(|p| format!("{} ({:.0} ms)", p.name, p.median_ms)).collect();
            let _ = writeln!(
                md,
                "- warm `ctr run --rm` p50 ≤ 2× runc's: {warm:.2} s against runc's {runc:.2} s ({:.1}×), {}; \
                 the largest phases: {}.\n",
                warm / runc,
                verdict(warm, 2.0 * runc),
                largest.join(", ")
            );
        }
        _ => {
            let _ = writeln!(md, "- warm `ctr run --rm` p50 ≤ 2× runc's: not measured in this run.\n");
        }
    }
}

/// The phases of a cold start that are the guest's own work.
const GUEST_PHASES: [&str; 4] =
    ["kernel until /init", "/init until the agent is ready", "connect and CreateContainer", "StartContainer"];

/// Where the backend is QEMU under TCG, what of the missed goals is emulation: the cold start's
/// guest phases, and the idle sandbox's memory that is QEMU's own.
fn why_under_emulation(md: &mut String, results: &crate::runtimes::Results) {
    use crate::memory::Part;
    if !results.hypervisor.contains("TCG") || results.timeline.is_empty() {
        return;
    }
    let total: f64 = results.timeline.iter().map(|p| p.median_ms).sum();
    let guest: f64 =
        results.timeline.iter().filter(|p| GUEST_PHASES.contains(&p.name)).map(|p| p.median_ms).sum();
    let _ = writeln!(
        md,
        "Why, on this machine: it has no vmx/svm, so QEMU runs the guest under TCG, instruction by \
         instruction. Of a cold start's {total:.0} ms, {guest:.0} ms ({:.0} %) are the guest's own work \
         (its kernel's boot, /init, the agent's CreateContainer and StartContainer); the agent's section \
         below measures the same create and start natively.",
        100.0 * guest / total.max(1.0)
    );
    let pss: f64 = results.idle_memory.iter().map(|(_, mib)| mib).sum();
    let qemu: f64 = results
        .idle_memory
        .iter()
        .filter(|(part, _)| matches!(part, Part::CodeBuffer | Part::MonitorFiles | Part::MonitorHeap))
        .map(|(_, mib)| mib)
        .sum();
    if pss > 0.0 {
        let _ = writeln!(
            md,
            "Of an idle sandbox's {pss:.0} MiB, {qemu:.0} MiB are QEMU's own (its translated code, binary, \
             libraries, heap and stacks) and {:.0} MiB the rest; the nested section measures ironclad-vmm's \
             resident memory outside guest RAM on KVM.\n",
            pss - qemu
        );
    }
}

/// Where an idle ironclad sandbox's host memory goes, part by part (bench/src/memory.rs), and the
/// same parts after the sandbox ran the jobs.
fn idle_memory_table(md: &mut String, results: &crate::runtimes::Results) {
    if results.idle_memory.is_empty() {
        return;
    }
    let sum: f64 = results.idle_memory.iter().map(|(_, mib)| mib).sum();
    let after_sum: f64 = results.memory_after_jobs.iter().map(|(_, mib)| mib).sum();
    let after = |part: &crate::memory::Part| {
        results.memory_after_jobs.iter().find(|(p, _)| p == part).map_or(0.0, |(_, mib)| *mib)
    };
    let _ = writeln!(
        md,
        "Where an idle ironclad sandbox's host memory goes: the PSS of every mapping of its processes (shim, \
         jailers, monitor, helpers), from /proc/PID/smaps, one idle sandbox read once, and again once it had \
         run the jobs above and sat for 20 s (the guest gives back what it freed through free page \
         reporting; docs/vmm.md). Guest memory is the memfd the monitor and the vhost-user helpers share, \
         counted once.\n"
    );
    let _ = writeln!(md, "| part | idle PSS (MiB) | share | after its jobs (MiB) |");
    let _ = writeln!(md, "|---|---|---|---|");
    for (part, mib) in &results.idle_memory {
        let share = if sum > 0.0 { 100.0 * mib / sum } else { 0.0 };
        let _ = writeln!(md, "| {} | {mib:.1} | {share:.0} % | {:.1} |", part.label(), after(part));
    }
    for (part, mib) in
        results.memory_after_jobs.iter().filter(|(p, _)| !results.idle_memory.iter().any(|(q, _)| q == p))
    {
        let _ = writeln!(md, "| {} | 0.0 | 0 % | {mib:.1} |", part.label());
    }
    let _ = writeln!(md, "| all parts | {sum:.1} | | {after_sum:.1} |\n");
    shim_footprint(md, results);
}

/// What of the shim is each sandbox's own, and what every shim shares.
fn shim_footprint(md: &mut String, results: &crate::runtimes::Results) {
    use crate::memory::Part;
    let idle =
        |wanted: Part| results.idle_memory.iter().find(|(part, _)| *part == wanted).map(|(_, mib)| *mib);
    if let (Some(own), Some(shared)) = (idle(Part::ShimHeap), idle(Part::ShimFiles)) {
        let _ = writeln!(
            md,
            "The shim's own memory is {own:.1} MiB per sandbox (two runtime workers whatever the host's core \
             count); its binary's {shared:.1} MiB are page cache that every sandbox's shim shares, so the \
             density figures below count them once for all.\n"
        );
    }
}

/// The nested comparison: ironclad-vmm against QEMU on the same KVM, ironclad against runc through
/// the same containerd, as ratios (absolute times under nested emulation say little).
pub fn nested_markdown(
    machine: &Machine,
    boots: &crate::boot::Results,
    cold_starts: &crate::runtimes::Results,
) -> String {
    use crate::runtimes::Runtime;
    let mut md = String::new();
    let _ = writeln!(md, "## ironclad-vmm vs QEMU on one KVM, nested (`make bench-nested`)\n");
    let _ = writeln!(
        md,
        "Machine: an L1 guest under QEMU TCG (`-cpu max`: emulated AMD SVM with nested paging) on this \
         development machine: {} ({} vCPU, {} GiB), Linux {} (Debian's), KVM {}. Everything runs emulated, the \
         guests under emulated SVM, so only the ratios mean something. Guest: our kernel and initrd, 1 vCPU, \
         {} MiB, booted by each monitor in turn ({} runs each, interleaved).\n",
        machine.cpu, machine.cores, machine.memory_gib, machine.kernel, machine.kvm, boots.memory_mib, boots.runs
    );
    let _ = writeln!(md, "| figure | monitor | p50 | p95 | min | ironclad-vmm / QEMU (p50) |");
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    let ours = boots.monitors.get("ironclad");
    let theirs = boots.monitors.get("qemu");
    type Pick = fn(&crate::boot::MonitorFigures) -> &crate::stats::Summary;
    let rows: [(&str, Pick); 3] = [
        ("monitor start → agent ready (ms)", |m| &m.ready_ms),
        ("guest kernel uptime at ready (ms)", |m| &m.guest_uptime_ms),
        ("monitor RSS outside guest RAM (KiB)", |m| &m.monitor_rss_kib),
    ];
    for (name, pick) in rows {
        let ratio = match (ours, theirs) {
            (Some(a), Some(b)) if pick(b).median > 0.0 => format!("{:.2}×", pick(a).median / pick(b).median),
            _ => "–".into(),
        };
        for (i, monitor) in [ours, theirs].into_iter().flatten().enumerate() {
            let s = pick(monitor);
            let ratio_cell = if i == 0 { ratio.as_str() } else { "" };
            let _ = writeln!(
                md,
                "| {name} | {} | {:.0} | {:.0} | {:.0} | {ratio_cell} |",
                monitor.monitor, s.median, s.p95, s.min
            );
        }
    }
    let _ = writeln!(
        md,
        "\n`ctr run --rm IMAGE ID echo ready` in the same L1, one private containerd, runs interleaved; ironclad \
         backend: {}.\n",
        cold_starts.hypervisor
    );
    let _ = writeln!(md, "| figure | ironclad p50 | runc p50 | ironclad / runc (p50) |");
    let _ = writeln!(md, "|---|---|---|---|");
    for figure in &cold_starts.figures {
        let p50 = |runtime: Runtime| {
            figure.summaries.get(&runtime).map(|s| format!("{:.2}", s.median)).unwrap_or("–".into())
        };
        let ratio = figure.ratio.map(|r| format!("{r:.1}×")).unwrap_or_else(|| "–".into());
        let _ = writeln!(
            md,
            "| {} ({}) | {} | {} | {ratio} |",
            figure.name,
            figure.unit,
            p50(Runtime::Ironclad),
            p50(Runtime::Runc)
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_replaced_in_place_and_others_kept() {
        let first = replace_section("", "vmm", "## vmm\nold");
        assert!(first.starts_with("# Benchmarks"));
        let both = replace_section(&first, "runtimes", "## runtimes\nfigures");
        let updated = replace_section(&both, "vmm", "## vmm\nnew");
        assert!(updated.contains("## vmm\nnew") && !updated.contains("old"), "{updated}");
        assert!(updated.contains("## runtimes\nfigures"));
        assert!(updated.find("## vmm").unwrap() < updated.find("## runtimes").unwrap(), "order kept");
        assert_eq!(replace_section(&updated, "vmm", "## vmm\nnew"), updated, "idempotent");
    }
}
