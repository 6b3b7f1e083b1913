//! `ironclad-agent`: PID 1 inside the ironclad guest.
//!
//! As PID 1 it prepares the guest (mounts, cgroup v2 controllers), reaps orphans, announces itself on
//! the console with one ready line, and serves the agent API over vsock until the shim asks it to
//! end the sandbox. Run by hand (not as PID 1) it skips the guest setup and serves on the address
//! given with `--listen`, which is how the host-side tests drive it.

use std::process::ExitCode;

use std::sync::Arc;

use ironclad_agent::container::{self, Containers};
use ironclad_agent::{cgroups, fork_helper, init, network, paths, reaper, server};
use ironclad_protocol::AGENT_VSOCK_PORT;
use tracing::error;

/// What the agent was asked to do, from its command line.
#[derive(Debug, PartialEq, Eq)]
struct Options {
    /// A ttrpc address: `vsock://CID:PORT` or `unix:///path`.
    listen: String,
    /// Where bundles and libcontainer's state live.
    state_dir: std::path::PathBuf,
    /// The cgroup below which containers get theirs.
    cgroup_parent: std::path::PathBuf,
    /// The agent runs in a network namespace of its own (tests), so UpdateInterface and friends may
    /// change it. In a guest they always may.
    own_network_namespace: bool,
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("bad arguments: {0} (usage: ironclad-agent [--listen vsock://-1:1024 | unix:///path] [--state-dir DIR] [--cgroup-parent /CGROUP] [--own-network-namespace])")]
    Usage(String),
    #[error("guest setup failed")]
    Init(#[from] init::Error),
    #[error("agent server failed")]
    Server(#[from] server::Error),
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot become the child subreaper, which container processes need")]
    Subreaper(#[source] nix::Error),
    #[error("cannot find where container cgroups go")]
    Cgroups(#[from] cgroups::Error),
}

fn default_listen_address() -> String {
    format!("vsock://-1:{AGENT_VSOCK_PORT}")
}

fn default_options() -> Options {
    Options {
        listen: default_listen_address(),
        state_dir: paths::DEFAULT_STATE_ROOT.into(),
        cgroup_parent: paths::DEFAULT_CGROUP_PARENT.into(),
        own_network_namespace: false,
    }
}

/// Parses `--listen ADDR`, `--state-dir DIR` and `--cgroup-parent /CGROUP`. The kernel hands PID 1 whatever command-line
/// words it did not understand, so PID 1 ignores its arguments and always serves on the vsock port.
fn parse_options(args: &[String]) -> Result<Options, Error> {
    let mut options = default_options();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let mut value = || rest.next().cloned().ok_or_else(|| Error::Usage(format!("{arg} needs a value")));
        match arg.as_str() {
            "--listen" => options.listen = value()?,
            "--state-dir" => options.state_dir = value()?.into(),
            "--cgroup-parent" => options.cgroup_parent = value()?.into(),
            "--own-network-namespace" => options.own_network_namespace = true,
            other => return Err(Error::Usage(format!("unknown argument {other:?}"))),
        }
    }
    if !options.cgroup_parent.is_absolute() {
        return Err(Error::Usage(format!("--cgroup-parent {:?} must be absolute", options.cgroup_parent)));
    }
    if options.own_network_namespace && network::shares_init_network_namespace() {
        return Err(Error::Usage(
            "--own-network-namespace, but the agent shares PID 1's network namespace".into(),
        ));
    }
    if !(options.listen.starts_with("vsock://") || options.listen.starts_with("unix://")) {
        return Err(Error::Usage(format!("{:?} is neither vsock:// nor unix://", options.listen)));
    }
    Ok(options)
}

fn run(is_init: bool) -> Result<(), Error> {
    let options = if is_init {
        default_options()
    } else {
        let args: Vec<String> = std::env::args().skip(1).collect();
        parse_options(&args)?
    };
    if is_init {
        init::prepare_guest()?;
        init::require_vsock_device()?;
    }
    let layout = cgroups::Layout::detect()?;
    tracing::info!("container cgroups go into {layout:?}");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    if !is_init {
        // Run by hand, the agent must still be the one that reaps its containers' processes.
        nix::sys::prctl::set_child_subreaper(true).map_err(Error::Subreaper)?;
    }
    runtime.block_on(async {
        let reaper = reaper::spawn()?;
        let state = paths::AgentPaths::new(&options.state_dir, &options.cgroup_parent);
        let containers =
            Arc::new(Containers::new(state, layout, reaper.exits(), container::root_is_initramfs()));
        let network_allowed = is_init || options.own_network_namespace;
        let result = server::serve(&options.listen, containers.clone(), is_init, network_allowed).await;
        containers.remove_cgroup_parent();
        drop(reaper);
        result
    })?;
    Ok(())
}

fn main() -> ExitCode {
    ironclad_agent::clock::mark_agent_start();
    let is_init = std::process::id() == 1;
    // PID 1 takes whatever words the kernel command line left over: never a helper's.
    let args: Vec<String> = std::env::args().collect();
    if let [_, mode, request] = args.as_slice() {
        if mode == fork_helper::HELPER_ARG && !is_init {
            return fork_helper::serve(request);
        }
    }
    init::setup_logging();
    let result = run(is_init);
    if let Err(err) = &result {
        error!("{}", ironclad_protocol::error_chain(err));
        eprintln!("ironclad-agent: fatal: {}", ironclad_protocol::error_chain(err));
    }
    if is_init {
        // PID 1 must never return: end the VM, cleanly or not, so the host sees the sandbox go.
        init::end_vm();
    }
    if result.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn defaults_to_the_agent_vsock_port() {
        assert_eq!(parse_options(&[]).unwrap().listen, "vsock://-1:1024");
    }

    #[test]
    fn accepts_a_unix_listen_address_and_a_state_dir() {
        let options =
            parse_options(&args(&["--listen", "unix:///tmp/a.sock", "--state-dir", "/tmp/s"])).unwrap();
        assert_eq!(options.listen, "unix:///tmp/a.sock");
        assert_eq!(options.state_dir, std::path::Path::new("/tmp/s"));
    }

    #[test]
    fn rejects_unknown_arguments_and_schemes() {
        assert!(matches!(parse_options(&args(&["--bogus"])), Err(Error::Usage(_))));
        assert!(matches!(parse_options(&args(&["--listen"])), Err(Error::Usage(_))));
        assert!(matches!(parse_options(&args(&["--listen", "tcp://1.2.3.4:5"])), Err(Error::Usage(_))));
    }
}
