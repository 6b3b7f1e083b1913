//! `ironclad-bench`: measures ironclad and writes the results, with the machine named, to
//! docs/benchmarks.md and a JSON file.

mod machine;
mod report;
mod stats;
mod vmm;

use std::path::PathBuf;
use std::process::ExitCode;

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
}

fn main() -> ExitCode {
    match Args::parse().command {
        Benchmark::Vmm { vmm, runs, churn, memory_mib, report, json } => {
            let settings = vmm::Settings { vmm, runs: runs.max(1), churn: churn.max(1), memory_mib };
            let machine = machine::Machine::describe();
            let results = match vmm::measure(&settings, |step| eprintln!("ironclad-bench: {step}")) {
                Ok(results) => results,
                Err(err) => {
                    eprintln!("ironclad-bench: {}", report::error_chain(&err));
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
    }
}
