//! containerd-shim-ironclad-v2: containerd starts it per task (`start`), serves the Task API over
//! it, and runs it again (`delete`) to clean up after it.

use std::path::Path;

use ironclad_shim::config::{ShimConfig, DEFAULT_CONFIG_PATH};
use ironclad_shim::service::{IroncladShim, RUNTIME_ID};

#[tokio::main]
async fn main() {
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
