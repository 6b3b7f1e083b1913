//! ironclad-pool: `ironclad-pool [--config /etc/ironclad/config.toml]`. Runs until SIGTERM or
//! SIGINT, then stops the VMs it still holds and removes its socket and directory.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ironclad_pool::server::Server;
use ironclad_pool::Pool;
use ironclad_shim::config::{ShimConfig, DEFAULT_CONFIG_PATH};
use ironclad_shim::hypervisor::error_chain;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info};

#[derive(Parser)]
#[command(about = "Keeps ironclad VMs booted and paused, each handed to one shim for one sandbox")]
struct Args {
    /// The shim's configuration file, whose [pool] table sets the pool.
    #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            error!("{}", error_chain(err.as_ref()));
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let config = ShimConfig::load(&args.config)?;
    let Some(socket) = config.pool.socket().map(PathBuf::from) else {
        return Err(
            format!("[pool] socket is empty in {}: warm starts are off", args.config.display()).into()
        );
    };
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let pool = Pool::new(config)?;
    let server = Server::bind(&socket)?;
    info!(
        "ironclad-pool: {} VMs of {} vCPU(s), {} MiB on {}, at {}",
        pool.config().pool.size,
        pool.shape.vcpus,
        pool.shape.memory_mib,
        pool.shape.backend,
        socket.display()
    );
    let refill = tokio::spawn(pool.clone().refill());
    tokio::select! {
        _ = server.serve(pool.clone()) => {}
        _ = terminate.recv() => info!("SIGTERM: stopping"),
        _ = interrupt.recv() => info!("SIGINT: stopping"),
    }
    drop(server);
    pool.stop(refill).await;
    info!("ironclad-pool stopped");
    Ok(())
}
