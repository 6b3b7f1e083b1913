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

/// virtiofsd's translation of the guest's ids for the user namespace the jail gives it, where the
/// sandbox's id and 0 are swapped (`ironclad_jailer::spec::swapped_with_root`): it swaps them
/// back, so that every guest id is the same id on the host (the guest's root creates files of the
/// host's root, as an unjailed virtiofsd would).
fn guest_ids_as_host_ids(sandbox_id: u32) -> Vec<OsString> {
    ["--translate-uid", "--translate-gid"]
        .into_iter()
        .flat_map(|flag| [(flag, format!("map:0:{sandbox_id}:1")), (flag, format!("map:{sandbox_id}:0:1"))])
        .flat_map(|(flag, rule)| [OsString::from(flag), OsString::from(rule)])
        .collect()
}

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
/// Jailed, it runs as the sandbox's uid, root of a user namespace of its own with a file server's
/// capabilities there (see `crate::jail`), sees the shared and VM directories only, and its socket
/// is given to the sandbox's uid for the monitor.
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
    if let Some(jail) = jail {
        // Its default is to raise the limit to the kernel's maximum, past the jail's.
        args.extend(["--rlimit-nofile".into(), jail::file_server_nofile().to_string().into()]);
        args.extend(guest_ids_as_host_ids(jail.uid()));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guests_root_and_the_sandbox_id_are_swapped_back_for_uids_and_gids() {
        let args: Vec<String> =
            guest_ids_as_host_ids(900_003).into_iter().map(|a| a.into_string().unwrap()).collect();
        assert_eq!(
            args.join(" "),
            "--translate-uid map:0:900003:1 --translate-uid map:900003:0:1 \
             --translate-gid map:0:900003:1 --translate-gid map:900003:0:1"
        );
        // The jail's namespace is the same swap: guest 0 -> namespace 900003 -> host 0.
        let map = ironclad_jailer::spec::swapped_with_root(900_003);
        assert!(map.starts_with("0 900003 1\n") && map.contains("\n900003 0 1\n"), "{map}");
    }
}
