//! virtiofsd, the vhost-user backend of a sandbox's shared directory, for both backends: QEMU's
//! `vhost-user-fs-device` and ironclad-vmm's virtio-fs connect to the socket it makes.

use std::path::{Path, PathBuf};

use tokio::process::{Child, Command};

use super::process::{start_daemon, Error};
use super::{find_executable, VmConfig};
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
pub async fn start(program: &Path, dir: &Path, paths: &SandboxPaths) -> Result<Child, Error> {
    let mut command = Command::new(program);
    command
        .arg("--socket-path")
        .arg(paths.virtiofs_socket())
        .arg("--shared-dir")
        .arg(dir)
        .args(["--sandbox", "namespace", "--seccomp", "kill", "--cache", "auto", "--announce-submounts"])
        .args(["--log-level", LOG_LEVEL]);
    start_daemon("virtiofsd", program, command, paths.virtiofs_socket()).await
}
