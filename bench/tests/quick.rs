#![allow(clippy::unwrap_used)] // test code: a failed step should stop the test right there

//! The VMM benchmark in its quickest mode, so it cannot rot: the report's structure and that every
//! figure is a number, not how fast it is.

use std::process::Command;

/// Runs ironclad-bench with `args`, writing its report and JSON where given; fails with its stderr.
fn run_bench(args: &[&str], report: &std::path::Path, json: &std::path::Path) {
    let output = Command::new(env!("CARGO_BIN_EXE_ironclad-bench"))
        .args(args)
        .arg("--report")
        .arg(report)
        .arg("--json")
        .arg(json)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

#[test]
fn vmm_benchmark_writes_a_report_with_every_figure() {
    if !ironclad_test_prereq::needs().kvm().ready() {
        return;
    }
    let vmm = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/ironclad-vmm");
    assert!(vmm.exists(), "build the workspace first (cargo test --workspace builds {})", vmm.display());
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("benchmarks.md");
    let json = dir.path().join("benchmarks.json");
    run_bench(&["vmm", "--runs", "2", "--churn", "2", "--vmm", vmm.to_str().unwrap()], &report, &json);
    let markdown = std::fs::read_to_string(&report).unwrap();
    for heading in [
        "exec → first guest instruction",
        "exec → first serial byte",
        "peak RSS",
        "VMs started and stopped per second",
        "Machine:",
    ] {
        assert!(markdown.contains(heading), "{heading} missing from:\n{markdown}");
    }
    let value: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let vmm = &value["vmm"];
    for figure in ["first_instruction_ms", "first_serial_byte_ms", "exit_ms", "peak_rss_kib"] {
        assert_eq!(vmm[figure]["runs"], 2, "{figure}");
        assert!(vmm[figure]["median"].as_f64().unwrap() > 0.0, "{figure}");
    }
    assert!(vmm["memory"]["vmm_rss_kib"].as_u64().unwrap() > 0);
    assert!(vmm["vms_per_second"].as_f64().unwrap() > 0.0);
    assert!(!value["machine"]["kvm"].as_str().unwrap().is_empty());
}

/// The runtime comparison in its quickest mode: both runtimes produce every figure, the report
/// has the table and both charts exist in both formats.
#[test]
fn runtimes_benchmark_puts_ironclad_and_runc_side_by_side() {
    /// Read from one idle sandbox per runtime, whatever the number of runs.
    const MEASURED_ONCE: [&str; 2] =
        ["host memory per idle sandbox", "host memory per sandbox after its jobs"];
    let guest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest");
    if !ironclad_test_prereq::needs()
        .root()
        .program("containerd")
        .program("runc")
        .file(&guest.join("vmlinux"), "make guest")
        .ready()
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("benchmarks.md");
    std::fs::write(&report, "# Benchmarks\n\n<!-- section:vmm -->\nkept\n<!-- end:vmm -->\n").unwrap();
    let json = dir.path().join("runtimes.json");
    let charts = dir.path().join("charts");
    let args =
        ["runtimes", "--runs", "2", "--density", "1", "--guest-dir", guest.to_str().unwrap(), "--charts"];
    run_bench(&[&args[..], &[charts.to_str().unwrap()]].concat(), &report, &json);
    let markdown = std::fs::read_to_string(&report).unwrap();
    assert!(markdown.contains("<!-- section:vmm -->\nkept"), "the VMM section was lost:\n{markdown}");
    for text in [
        "ironclad vs runc",
        "| cold start (s) |",
        "| exec latency (s) |",
        "| host memory per sandbox after its jobs (MiB) |",
        "| part | idle PSS (MiB) | share | after its jobs (MiB) |",
        "Machine:",
        "charts/start-latency.svg",
    ] {
        assert!(markdown.contains(text), "{text} missing from:\n{markdown}");
    }
    let value: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let figures = value["runtimes"]["figures"].as_array().unwrap();
    assert!(figures.len() >= 8);
    for figure in figures {
        for runtime in ["ironclad", "runc"] {
            let summary = &figure["summaries"][runtime];
            assert_eq!(
                summary["runs"],
                if MEASURED_ONCE.contains(&figure["name"].as_str().unwrap()) { 1 } else { 2 },
                "{figure}"
            );
            assert!(summary["median"].as_f64().unwrap() > 0.0, "{runtime}: {figure}");
        }
    }
    let density = value["runtimes"]["density"].as_array().unwrap();
    assert_eq!(density.len(), 2, "one point per runtime");
    for chart in ["start-latency.png", "start-latency.svg", "density.png", "density.svg"] {
        assert!(std::fs::metadata(charts.join(chart)).unwrap().len() > 0, "{chart}");
    }
}

/// The pod comparison through CRI, quickest mode: both runtimes produce every figure, the report
/// has the table and the chart exists.
#[test]
fn pods_benchmark_puts_ironclad_and_runc_pods_side_by_side() {
    let guest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest");
    if !ironclad_test_prereq::needs()
        .root()
        .program("containerd")
        .program("runc")
        .program("ip")
        .file(std::path::Path::new("/usr/lib/cni/bridge"), "apt-get install containernetworking-plugins")
        .file(&guest.join("vmlinux"), "make guest")
        .ready()
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("benchmarks.md");
    let json = dir.path().join("pods.json");
    let charts = dir.path().join("charts");
    let args = ["pods", "--runs", "1", "--guest-dir", guest.to_str().unwrap(), "--charts"];
    run_bench(&[&args[..], &[charts.to_str().unwrap()]].concat(), &report, &json);
    let markdown = std::fs::read_to_string(&report).unwrap();
    for text in [
        "| pod start (s) |",
        "| second container start (s) |",
        "| idle two-container pod (MiB) |",
        "charts/pod-start.svg",
    ] {
        assert!(markdown.contains(text), "{text} missing from:\n{markdown}");
    }
    let value: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let figures = value["pods"]["figures"].as_array().unwrap();
    assert_eq!(figures.len(), 5);
    for figure in figures {
        for runtime in ["ironclad", "runc"] {
            let summary = &figure["summaries"][runtime];
            assert_eq!(summary["runs"], 1, "{figure}");
            assert!(summary["median"].as_f64().unwrap() > 0.0, "{runtime}: {figure}");
        }
    }
    for chart in ["pod-start.png", "pod-start.svg", "network-throughput.svg", "network-connect.svg"] {
        assert!(std::fs::metadata(charts.join(chart)).unwrap().len() > 0, "{chart}");
    }
}

/// The agent's start next to runc's, quickest mode: both produce numbers and the report says so.
#[test]
fn agent_benchmark_puts_the_agent_next_to_runc() {
    let agent = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/ironclad-agent");
    if !ironclad_test_prereq::needs()
        .root()
        .program("runc")
        .file(std::path::Path::new("/bin/busybox"), "apt-get install busybox-static")
        .ready()
    {
        return;
    }
    assert!(agent.exists(), "build the workspace first ({})", agent.display());
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("benchmarks.md");
    let json = dir.path().join("agent.json");
    run_bench(&["agent", "--runs", "2", "--agent", agent.to_str().unwrap()], &report, &json);
    let markdown = std::fs::read_to_string(&report).unwrap();
    assert!(markdown.contains("| create + start |"), "{markdown}");
    let value: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    for figure in ["create_start_ms", "create_to_removed_ms"] {
        for who in ["agent", "runc"] {
            assert_eq!(value["agent"][figure][who]["runs"], 2, "{figure} {who}");
            assert!(value["agent"][figure][who]["median"].as_f64().unwrap() > 0.0, "{figure} {who}");
        }
    }
}
