//! containerd-shim-ironclad-v2: containerd starts it per task (`start`), serves the Task API over
//! it, and runs it again (`delete`) to clean up after it.

use std::path::Path;

use ironclad_shim::config::{ShimConfig, DEFAULT_CONFIG_PATH};
use ironclad_shim::service::{IroncladShim, RUNTIME_ID};

/// The runtime's worker threads, whatever the host's core count: a shim serves one sandbox, and
/// tokio's default (one per core) gave each shim on a 64-core host 66 threads and 1 MiB more
/// private memory (measured with TOKIO_WORKER_THREADS=64: 2.6 MiB against 1.6), for nothing.
const WORKER_THREADS: usize = 2;

fn main() {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(WORKER_THREADS).enable_all().build();
    match runtime {
        Ok(runtime) => runtime.block_on(serve()),
        Err(err) => {
            eprintln!("containerd-shim-ironclad-v2: cannot start the async runtime: {err}");
            std::process::exit(1);
        }
    }
}

async fn serve() {
    ironclad_shim::timeline::mark_process_start();
    ironclad_shim::logging::log_panics();
    // The log level is needed before containerd's Create names another config file.
    let log_level = ShimConfig::load(Path::new(DEFAULT_CONFIG_PATH))
        .map(|c| c.log_level)
        .unwrap_or_else(|_| "info".into());
    let config = containerd_shim::Config {
        default_log_level: log_level,
        // The shim's children are the VM processes, which tokio waits for itself: a reaper calling
        // waitpid(-1) would take their exit statuses away.
        no_reaper: true,
        ..Default::default()
    };
    containerd_shim::asynchronous::run::<IroncladShim>(RUNTIME_ID, Some(config)).await;
}
