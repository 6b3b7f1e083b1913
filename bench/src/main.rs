//! `ironclad-bench`: measures ironclad and writes the results, with the machine named, to
//! docs/benchmarks.md and a JSON file.

mod agent;
mod boot;
mod charts;
mod machine;
mod memory;
mod pods;
mod report;
mod runtimes;
mod stats;
mod timeline;
mod vmm;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "Measure ironclad")]
struct Args {
    #[command(subcommand)]
    command: Benchmark,
}

#[derive(Subcommand)]
enum Benchmark {
    /// ironclad-vmm alone: time to the first guest instruction and serial byte, memory, VMs/s.
    Vmm {
        /// The ironclad-vmm binary (a release build).
        #[arg(long, default_value_os_t = vmm::vmm_binary_default())]
        vmm: PathBuf,
        #[arg(long, default_value_t = 30)]
        runs: usize,
        /// VMs started and stopped back to back for the churn figure.
        #[arg(long, default_value_t = 50)]
        churn: usize,
        #[arg(long, default_value_t = 128)]
        memory_mib: u32,
        /// The Markdown report.
        #[arg(long, default_value = "docs/benchmarks.md")]
        report: PathBuf,
        /// The same figures as JSON.
        #[arg(long, default_value = "docs/benchmarks-vmm.json")]
        json: PathBuf,
    },
    /// The agent's container create + start next to runc's, on this host, same rootfs and spec.
    Agent {
        /// The ironclad-agent binary (default: next to this binary).
        #[arg(long, default_value_os_t = default_agent())]
        agent: PathBuf,
        #[arg(long, default_value_t = 20)]
        runs: usize,
        #[arg(long, default_value = "docs/benchmarks.md")]
        report: PathBuf,
        #[arg(long, default_value = "docs/benchmarks-agent.json")]
        json: PathBuf,
    },
    /// ironclad next to runc through a private containerd: start, exec, jobs, memory, density.
    Runtimes {
        /// Runs per figure (each runtime).
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// Sandbox counts for the density curve, comma-separated (skipped where memory is short).
        #[arg(long, value_delimiter = ',', default_value = "1,10,50")]
        density: Vec<usize>,
        #[command(flatten)]
        setup: ContainerdSetup,
        #[arg(long, default_value = "docs/benchmarks-runtimes.json")]
        json: PathBuf,
    },
    /// Kubernetes pods through containerd's CRI plugin, ironclad next to runc: pod start, a
    /// second container's start, PSS of an idle two-container pod.
    Pods {
        /// Pods per runtime.
        #[arg(long, default_value_t = 10)]
        runs: usize,
        #[command(flatten)]
        setup: ContainerdSetup,
        #[arg(long, default_value = "docs/benchmarks-pods.json")]
        json: PathBuf,
    },
    /// Where KVM can boot Linux (the nested tier's L1): the guest booted by ironclad-vmm and by
    /// QEMU, interleaved, then `ctr run --rm` with ironclad against runc. Ratios, not times.
    Nested {
        /// Boots per monitor.
        #[arg(long, default_value_t = 5)]
        boot_runs: usize,
        /// Cold starts per runtime.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        #[arg(long, default_value = "target/guest")]
        guest_dir: PathBuf,
        /// The directory holding containerd-shim-ironclad-v2 (default: next to this binary).
        #[arg(long)]
        shim_dir: Option<PathBuf>,
        #[arg(long, default_value = "docs/benchmarks.md")]
        report: PathBuf,
        #[arg(long, default_value = "docs/benchmarks-nested.json")]
        json: PathBuf,
    },
}

/// What the benchmarks through containerd share: the guest, the shim, the backend, the outputs.
#[derive(clap::Args)]
struct ContainerdSetup {
    /// The guest kernel and initrd (built by `make guest`).
    #[arg(long, default_value = "target/guest")]
    guest_dir: PathBuf,
    /// The directory holding containerd-shim-ironclad-v2 (default: next to this binary).
    #[arg(long)]
    shim_dir: Option<PathBuf>,
    /// auto, ironclad or qemu.
    #[arg(long, default_value = "auto")]
    hypervisor: String,
    #[arg(long, default_value = "docs/benchmarks.md")]
    report: PathBuf,
    /// Where the charts (PNG and SVG) go.
    #[arg(long, default_value = "docs/charts")]
    charts: PathBuf,
}

impl ContainerdSetup {
    fn artifacts(&self) -> ironclad_tests::containerd::Artifacts {
        ironclad_tests::containerd::Artifacts {
            kernel: self.guest_dir.join("vmlinux"),
            initrd: self.guest_dir.join("initrd.img"),
            shim_dir: self.shim_dir.clone().unwrap_or_else(binary_dir),
            hypervisor: self.hypervisor.clone(),
        }
    }

    fn outputs(self, json: PathBuf) -> RuntimeOutputs {
        RuntimeOutputs { report: self.report, json, charts: self.charts }
    }
}

fn binary_dir() -> PathBuf {
    std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)).unwrap_or_default()
}

struct NestedSettings {
    boot: boot::Settings,
    runtimes: runtimes::Settings,
    report: PathBuf,
    json: PathBuf,
}

fn run_nested(settings: NestedSettings) -> Result<(), Box<dyn std::error::Error>> {
    let machine = machine::Machine::describe();
    let async_runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let boots =
        async_runtime.block_on(boot::measure(&settings.boot, |step| eprintln!("ironclad-bench: {step}")))?;
    drop(async_runtime);
    let cold_starts = runtimes::measure(&settings.runtimes, Arc::new(AtomicBool::new(false)))?;
    let markdown = report::nested_markdown(&machine, &boots, &cold_starts);
    print!("{markdown}");
    let value = serde_json::json!({ "machine": machine, "boot": boots, "runtimes": cold_starts });
    report::write_section(&settings.report, "nested", &markdown, &settings.json, &value)?;
    eprintln!("ironclad-bench: wrote {} and {}", settings.report.display(), settings.json.display());
    Ok(())
}

fn default_agent() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("ironclad-agent")))
        .unwrap_or_default()
}

fn run_agent(
    agent: &Path,
    runs: usize,
    report: &Path,
    json: &Path,
) -> Result<(), Box<dyn std::error::Error>> {
    let machine = machine::Machine::describe();
    let results = agent::measure(agent, runs)?;
    let markdown = report::agent_markdown(&machine, &results);
    print!("{markdown}");
    let value = serde_json::json!({ "machine": machine, "agent": results });
    report::write_section(report, "agent", &markdown, json, &value)?;
    eprintln!("ironclad-bench: wrote {} and {}", report.display(), json.display());
    Ok(())
}

/// A flag Ctrl-C sets (saying `message`): the benchmark stops at the next step and cleans up.
fn stop_on_ctrl_c(message: &'static str) -> Result<Arc<AtomicBool>, ctrlc::Error> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        eprintln!("\nironclad-bench: {message}");
        flag.store(true, Ordering::SeqCst);
    })?;
    Ok(stop)
}

struct RuntimeOutputs {
    report: PathBuf,
    json: PathBuf,
    charts: PathBuf,
}

fn run_runtimes(
    settings: runtimes::Settings,
    outputs: RuntimeOutputs,
) -> Result<(), Box<dyn std::error::Error>> {
    let stop = stop_on_ctrl_c("stopping; removing every container it made")?;
    let machine = machine::Machine::describe();
    let results = runtimes::measure(&settings, stop)?;
    std::fs::create_dir_all(&outputs.charts)?;
    charts::load_font()?;
    let mut drawn = charts::start_latency(&results, &outputs.charts)?;
    if !results.density.is_empty() {
        drawn.extend(charts::density(&results, &outputs.charts)?);
    }
    if !results.timeline.is_empty() {
        drawn.extend(charts::start_timeline(&results.timeline, &outputs.charts)?);
    }
    if !results.idle_memory.is_empty() {
        drawn.extend(charts::idle_memory(&results.idle_memory, &outputs.charts)?);
    }
    let report_dir = outputs.report.parent().map(Path::to_path_buf).unwrap_or_default();
    let markdown = report::runtimes_markdown(&machine, &results, &drawn, &report_dir);
    print!("{markdown}");
    let value = serde_json::json!({ "machine": machine, "runtimes": results });
    report::write_section(&outputs.report, "runtimes", &markdown, &outputs.json, &value)?;
    eprintln!(
        "ironclad-bench: wrote {}, {} and the charts in {}",
        outputs.report.display(),
        outputs.json.display(),
        outputs.charts.display()
    );
    Ok(())
}

fn run_pods(settings: pods::Settings, outputs: RuntimeOutputs) -> Result<(), Box<dyn std::error::Error>> {
    let stop = stop_on_ctrl_c("stopping after this pod; removing every pod it made")?;
    let machine = machine::Machine::describe();
    let results = pods::measure(&settings, stop)?;
    std::fs::create_dir_all(&outputs.charts)?;
    charts::load_font()?;
    let mut drawn = charts::pod_start(&results, &outputs.charts)?;
    drawn.extend(charts::pod_network(&results, &outputs.charts)?);
    let report_dir = outputs.report.parent().map(Path::to_path_buf).unwrap_or_default();
    let markdown = report::pods_markdown(&machine, &results, &drawn, &report_dir);
    print!("{markdown}");
    let value = serde_json::json!({ "machine": machine, "pods": results });
    report::write_section(&outputs.report, "pods", &markdown, &outputs.json, &value)?;
    eprintln!("ironclad-bench: wrote {} and {}", outputs.report.display(), outputs.json.display());
    Ok(())
}

fn main() -> ExitCode {
    match Args::parse().command {
        Benchmark::Vmm { vmm, runs, churn, memory_mib, report, json } => {
            let settings = vmm::Settings { vmm, runs: runs.max(1), churn: churn.max(1), memory_mib };
            let machine = machine::Machine::describe();
            let results = match vmm::measure(&settings, |step| eprintln!("ironclad-bench: {step}")) {
                Ok(results) => results,
                Err(err) => {
                    eprintln!("ironclad-bench: {}", ironclad_protocol::error_chain(&err));
                    return ExitCode::FAILURE;
                }
            };
            let markdown = report::vmm_markdown(&machine, &settings, &results);
            print!("{markdown}");
            if let Err(err) = report::write(&report, &json, &markdown, &machine, &results) {
                eprintln!("ironclad-bench: {err}");
                return ExitCode::FAILURE;
            }
            eprintln!("ironclad-bench: wrote {} and {}", report.display(), json.display());
            ExitCode::SUCCESS
        }
        Benchmark::Agent { agent, runs, report, json } => {
            match run_agent(&agent, runs.max(1), &report, &json) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("ironclad-bench: {}", ironclad_protocol::error_chain(err.as_ref()));
                    ExitCode::FAILURE
                }
            }
        }
        Benchmark::Runtimes { runs, density, setup, json } => {
            let artifacts = setup.artifacts();
            let settings = runtimes::Settings {
                backend: runtimes::describe_backend(&artifacts.hypervisor),
                runs: runs.max(1),
                density,
                kernel: artifacts.kernel,
                initrd: artifacts.initrd,
                shim_dir: artifacts.shim_dir,
                hypervisor: artifacts.hypervisor,
                vm_memory_mib: 256,
                cold_start_only: false,
            };
            match run_runtimes(settings, setup.outputs(json)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("ironclad-bench: {}", ironclad_protocol::error_chain(err.as_ref()));
                    ExitCode::FAILURE
                }
            }
        }
        Benchmark::Pods { runs, setup, json } => {
            let artifacts = setup.artifacts();
            let settings = pods::Settings {
                backend: runtimes::describe_backend(&artifacts.hypervisor),
                runs: runs.max(1),
                artifacts,
            };
            match run_pods(settings, setup.outputs(json)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("ironclad-bench: {}", ironclad_protocol::error_chain(err.as_ref()));
                    ExitCode::FAILURE
                }
            }
        }
        Benchmark::Nested { boot_runs, runs, guest_dir, shim_dir, report, json } => {
            let (kernel, initrd) = (guest_dir.join("vmlinux"), guest_dir.join("initrd.img"));
            let settings = NestedSettings {
                boot: boot::Settings {
                    kernel: kernel.clone(),
                    initrd: initrd.clone(),
                    memory_mib: 256,
                    runs: boot_runs.max(1),
                },
                runtimes: runtimes::Settings {
                    backend: runtimes::describe_backend("auto"),
                    runs: runs.max(1),
                    density: Vec::new(),
                    kernel,
                    initrd,
                    shim_dir: shim_dir.unwrap_or_else(binary_dir),
                    hypervisor: "auto".into(),
                    vm_memory_mib: 256,
                    cold_start_only: true,
                },
                report,
                json,
            };
            match run_nested(settings) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("ironclad-bench: {}", ironclad_protocol::error_chain(err.as_ref()));
                    ExitCode::FAILURE
                }
            }
        }
    }
}
