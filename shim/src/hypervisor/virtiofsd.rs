//! virtiofsd, the vhost-user backend of a sandbox's shared directory, for both backends: QEMU's
//! `vhost-user-fs-device` and ironclad-vmm's virtio-fs connect to the socket it makes.

use std::path::{Path, PathBuf};

use std::ffi::OsString;

use tokio::process::Child;

use super::process::{start_daemon, Error, Launch};
use super::{find_executable, VmConfig};
use crate::jail::{self, Confinement, Jail};
use crate::paths::SandboxPaths;

/// virtiofsd's log level: its warnings reach the shim's log through its stderr.
const LOG_LEVEL: &str = "warn";

/// The Rust virtiofsd on PATH, if there is one.
pub fn locate() -> Option<PathBuf> {
    find_executable(Path::new("virtiofsd"))
}

/// What to start for `config`: nothing without a shared directory, else virtiofsd and the
/// directory; an error naming virtiofsd when it is needed and missing.
pub fn needed<'a>(
    config: &'a VmConfig,
    located: Option<&'a Path>,
) -> Result<Option<(&'a Path, &'a Path)>, Error> {
    match (config.shared_dir.as_deref(), located) {
        (None, _) => Ok(None),
        (Some(dir), Some(program)) => Ok(Some((program, dir))),
        (Some(_), None) => {
            Err(Error::MissingTool { tool: "virtiofsd", install: "cargo install --locked virtiofsd" })
        }
    }
}

/// virtiofsd serving `dir` on the sandbox's virtio-fs socket, in its own
/// namespaces (pivoted into the directory) with its seccomp filter killing on a syscall outside
/// its list.
/// Jailed, it stays root with a file server's capabilities (see `crate::jail`), sees the shared
/// and VM directories only, and its socket is given to the sandbox's uid for the monitor.
pub async fn start(
    program: &Path,
    dir: &Path,
    paths: &SandboxPaths,
    jail: Option<&Jail>,
) -> Result<Child, Error> {
    let mut args: Vec<OsString> =
        vec!["--socket-path".into(), paths.virtiofs_socket().into(), "--shared-dir".into(), dir.into()];
    args.extend(
        [
            "--sandbox",
            "namespace",
            "--seccomp",
            "kill",
            "--cache",
            "auto",
            "--announce-submounts",
            "--log-level",
            LOG_LEVEL,
        ]
        .map(OsString::from),
    );
    if jail.is_some() {
        // Its default is to raise the limit to the kernel's maximum, past the jail's.
        args.extend(["--rlimit-nofile".into(), jail::file_server_nofile().to_string().into()]);
    }
    let confinement = Confinement {
        writable: vec![paths.dir().to_path_buf(), dir.to_path_buf()],
        file_server: true,
        ..Default::default()
    };
    let mut child =
        start_daemon("virtiofsd", Launch::new(program, args, jail, confinement), paths.virtiofs_socket())
            .await?;
    if let Some(jail) = jail {
        if let Err(err) = jail.give(&paths.virtiofs_socket()) {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(err.into());
        }
    }
    Ok(child)
}
