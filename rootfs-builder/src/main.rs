//! `ironclad-rootfs`: writes the guest initrd and its manifest, and prints the image's sha256.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ironclad_rootfs_builder::{build_image, image_nodes, ImageSpec};

#[derive(Parser, Debug)]
#[command(version, about = "Write the ironclad guest initrd (uncompressed newc cpio, reproducible)")]
struct Args {
    /// The statically linked ironclad-agent, installed as /init.
    #[arg(long)]
    agent: PathBuf,
    /// Where to write the image.
    #[arg(long, short)]
    output: PathBuf,
    /// Where to write the manifest (default: OUTPUT.manifest.json).
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// Add busybox as /bin/busybox and /bin/sh, for debugging (boot with rdinit=/bin/sh).
    #[arg(long)]
    debug_shell: bool,
    /// The statically linked busybox used by --debug-shell (Debian's busybox-static).
    #[arg(long, default_value = "/bin/busybox")]
    busybox: PathBuf,
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error(transparent)]
    Build(#[from] ironclad_rootfs_builder::Error),
    #[error("cannot write {path}")]
    Output {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encode the manifest")]
    Manifest(#[from] serde_json::Error),
}

fn run(args: Args) -> Result<(), Error> {
    let spec = ImageSpec { agent: args.agent, debug_shell: args.debug_shell.then_some(args.busybox) };
    let image = build_image(&image_nodes(&spec)?)?;
    let manifest_path = args.manifest.unwrap_or_else(|| {
        let mut name = args.output.clone().into_os_string();
        name.push(".manifest.json");
        PathBuf::from(name)
    });
    let write = |path: &PathBuf, data: &[u8]| {
        std::fs::write(path, data).map_err(|source| Error::Output { path: path.clone(), source })
    };
    write(&args.output, &image.bytes)?;
    let mut manifest = serde_json::to_vec_pretty(&image.manifest)?;
    manifest.push(b'\n');
    write(&manifest_path, &manifest)?;
    println!("{}  {}", image.manifest.sha256, args.output.display());
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let mut message = err.to_string();
            let mut source = std::error::Error::source(&err);
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            eprintln!("ironclad-rootfs: {message}");
            ExitCode::FAILURE
        }
    }
}
