//! What one jail is: the command line the shim writes, read into a checked [`JailSpec`].

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

use caps::Capability;
use clap::Parser;

use crate::libraries::Library;

/// Top-level names that merged-/usr systems make links into /usr; kept as the same links inside
/// (the loader's path in every binary names one).
pub const SYSTEM_LINKS: &[&str] = &["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"];
/// The loader's cache of library paths: without it the loader searches its default directories.
pub const LOADER_CACHE: &str = "/etc/ld.so.cache";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{flag} {path}: not an absolute path of plain components")]
    NotAbsolute { flag: &'static str, path: PathBuf },
    #[error("--keep-cap {0}: not a capability name")]
    UnknownCapability(String),
    #[error("--keep-cap needs --uid 0 or --user-namespace: an unprivileged helper holds no capabilities")]
    CapabilitiesWithoutRoot,
    #[error("--user-namespace needs a --uid and --gid other than 0: they stand for the host's root there")]
    UserNamespaceAsRoot,
    #[error("--rlimit-nofile and --rlimit-nproc must be at least 1")]
    ZeroLimit,
    #[error("cannot tell what the helper loads")]
    Libraries(#[from] crate::libraries::Error),
}

/// `ironclad-jailer [options] -- PROGRAM [ARGS...]`. Started as root by the shim, with the
/// helper's network namespace already entered; it reads its standard input to its end and starts
/// only on `go` (the shim first puts it into the sandbox's cgroup).
#[derive(Debug, Clone, PartialEq, Eq, Parser)]
#[command(name = "ironclad-jailer", version, about)]
pub struct Args {
    /// The helper's user id (0 only for a helper that must act as the owners of the files it serves).
    #[arg(long)]
    pub uid: u32,
    #[arg(long)]
    pub gid: u32,
    /// An empty directory on the host: the jail's root is a tmpfs mounted there, seen only inside.
    #[arg(long)]
    pub root: PathBuf,
    /// The sandbox's uid lock file (the shim's): held shared for as long as the jailer lives, so
    /// that the uid is not handed to another sandbox while this helper runs.
    #[arg(long = "uid-lock")]
    pub uid_lock: Option<PathBuf>,
    /// A host path (file or directory) the helper may read, at the same path inside.
    #[arg(long = "bind-ro")]
    pub bind_ro: Vec<PathBuf>,
    /// A host path the helper may write, at the same path inside (never executable there).
    #[arg(long = "bind-rw")]
    pub bind_rw: Vec<PathBuf>,
    /// /dev/kvm inside, owned by the helper.
    #[arg(long)]
    pub kvm: bool,
    /// /dev/net/tun inside, owned by the helper.
    #[arg(long)]
    pub tun: bool,
    /// The helper runs as root of a user namespace of its own, in which --uid and --gid stand for
    /// the host's root and every other id for itself: on the host it is --uid, inside it keeps
    /// --keep-cap over files of any owner (a file server acting as the guest's users).
    #[arg(long = "user-namespace")]
    pub user_namespace: bool,
    /// A capability the helper keeps (uid 0 or --user-namespace only), e.g. CAP_CHOWN; every other
    /// one is dropped from the bounding set.
    #[arg(long = "keep-cap")]
    pub keep_cap: Vec<String>,
    #[arg(long = "rlimit-nofile", default_value_t = DEFAULT_NOFILE)]
    pub rlimit_nofile: u64,
    /// Processes and threads of the helper's uid (not applied to uid 0, which the host shares).
    #[arg(long = "rlimit-nproc", default_value_t = DEFAULT_NPROC)]
    pub rlimit_nproc: u64,
    /// The helper and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<OsString>,
}

pub const DEFAULT_NOFILE: u64 = 4096;
pub const DEFAULT_NPROC: u64 = 1024;

impl Args {
    /// The command line that parses back into these arguments: how the shim starts a jailer.
    pub fn to_command_line(&self) -> Vec<OsString> {
        let mut line: Vec<OsString> = vec![
            "--uid".into(),
            self.uid.to_string().into(),
            "--gid".into(),
            self.gid.to_string().into(),
            "--root".into(),
            self.root.clone().into(),
        ];
        if let Some(lock) = &self.uid_lock {
            line.extend(["--uid-lock".into(), lock.clone().into()]);
        }
        for path in &self.bind_ro {
            line.extend(["--bind-ro".into(), path.clone().into()]);
        }
        for path in &self.bind_rw {
            line.extend(["--bind-rw".into(), path.clone().into()]);
        }
        line.extend(self.kvm.then(|| "--kvm".into()));
        line.extend(self.tun.then(|| "--tun".into()));
        line.extend(self.user_namespace.then(|| "--user-namespace".into()));
        for cap in &self.keep_cap {
            line.extend(["--keep-cap".into(), cap.into()]);
        }
        line.extend([
            "--rlimit-nofile".into(),
            self.rlimit_nofile.to_string().into(),
            "--rlimit-nproc".into(),
            self.rlimit_nproc.to_string().into(),
            "--".into(),
        ]);
        line.extend(self.command.iter().cloned());
        line
    }
}

/// A host path seen at the same path inside the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub path: PathBuf,
    pub writable: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Kvm,
    Tun,
}

impl Device {
    /// Where the node is on the host and inside the jail.
    pub fn path(self) -> &'static str {
        match self {
            Device::Kvm => "/dev/kvm",
            Device::Tun => "/dev/net/tun",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub nofile: u64,
    pub nproc: u64,
}

/// One jail, checked: every path absolute, capabilities only for root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailSpec {
    pub uid: u32,
    pub gid: u32,
    pub root: PathBuf,
    pub uid_lock: Option<PathBuf>,
    /// In mount order; none lies inside an earlier one. The program's libraries come last.
    pub binds: Vec<Bind>,
    /// The program's libraries that lie in no other bind, each bound alone (see `libraries`).
    pub libraries: Vec<Library>,
    pub devices: Vec<Device>,
    pub keep_caps: Vec<Capability>,
    /// Root of a user namespace of its own ([`Args::user_namespace`]).
    pub user_namespace: bool,
    pub limits: Limits,
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

impl JailSpec {
    /// `system_binds` are the host's read-only system paths (see [`system_binds`]); the program
    /// itself is bound read-only too, and what `libraries_of` says it loads.
    pub fn from_args(
        args: Args,
        system_binds: Vec<Bind>,
        libraries_of: impl FnOnce(&Path) -> Result<Vec<Library>, crate::libraries::Error>,
    ) -> Result<Self, Error> {
        let mut command = args.command.into_iter();
        let program = PathBuf::from(command.next().unwrap_or_default());
        absolute("--", &program)?;
        absolute("--root", &args.root)?;
        let mut requested = system_binds;
        requested.push(Bind { path: program.clone(), writable: false });
        for path in args.bind_ro {
            absolute("--bind-ro", &path)?;
            requested.push(Bind { path, writable: false });
        }
        for path in args.bind_rw {
            absolute("--bind-rw", &path)?;
            requested.push(Bind { path, writable: true });
        }
        let keep_caps =
            args.keep_cap.iter().map(|name| parse_capability(name)).collect::<Result<Vec<_>, _>>()?;
        if args.user_namespace && (args.uid == 0 || args.gid == 0) {
            return Err(Error::UserNamespaceAsRoot);
        }
        if !keep_caps.is_empty() && args.uid != 0 && !args.user_namespace {
            return Err(Error::CapabilitiesWithoutRoot);
        }
        if args.rlimit_nofile == 0 || args.rlimit_nproc == 0 {
            return Err(Error::ZeroLimit);
        }
        let binds = plan_binds(requested);
        let mut libraries: Vec<Library> = Vec::new();
        for library in libraries_of(&program)? {
            let bound = binds.iter().any(|bind| library.file.starts_with(&bind.path));
            if !bound && !libraries.iter().any(|earlier| earlier.file == library.file) {
                libraries.push(library);
            }
        }
        let devices = [(args.kvm, Device::Kvm), (args.tun, Device::Tun)]
            .into_iter()
            .filter_map(|(wanted, device)| wanted.then_some(device))
            .collect();
        Ok(JailSpec {
            uid: args.uid,
            gid: args.gid,
            root: args.root,
            uid_lock: args.uid_lock,
            binds,
            libraries,
            devices,
            keep_caps,
            user_namespace: args.user_namespace,
            limits: Limits { nofile: args.rlimit_nofile, nproc: args.rlimit_nproc },
            program,
            args: command.collect(),
        })
    }
}

/// The binds in order, without any that an earlier one already contains, by its path or by where
/// its links lead (/bin/sh is /usr/bin/dash, there once /usr is; a bind onto the read-only copy
/// would fail).
pub fn plan_binds(requested: Vec<Bind>) -> Vec<Bind> {
    plan_binds_resolved(requested, |path| std::fs::canonicalize(path).ok())
}

fn plan_binds_resolved(requested: Vec<Bind>, resolve: impl Fn(&Path) -> Option<PathBuf>) -> Vec<Bind> {
    let mut planned: Vec<Bind> = Vec::with_capacity(requested.len());
    for bind in requested {
        let resolved = resolve(&bind.path);
        let contained = |earlier: &Bind| {
            bind.path.starts_with(&earlier.path)
                || resolved.as_ref().is_some_and(|r| r.starts_with(&earlier.path))
        };
        if !planned.iter().any(contained) {
            planned.push(bind);
        }
    }
    planned
}

/// The system paths every helper gets read-only: the loader's cache (its libraries are bound one
/// by one, see `libraries`).
pub fn system_binds() -> Vec<Bind> {
    Some(LOADER_CACHE)
        .filter(|cache| Path::new(cache).is_file())
        .map(|path| Bind { path: PathBuf::from(path), writable: false })
        .into_iter()
        .collect()
}

/// The uid_map (or gid_map) of a helper's user namespace for sandbox id `id` (not 0): `id` and 0
/// swapped, every other id itself, up to the largest valid one. The helper, root inside, is `id`
/// on the host; files of the host's root are owned by `id` inside.
pub fn swapped_with_root(id: u32) -> String {
    let below = id - 1;
    let above = u32::MAX - (id + 1);
    [(0, id, 1), (1, 1, below), (id, 0, 1), (id + 1, id + 1, above)]
        .into_iter()
        .filter(|(_, _, count)| *count > 0)
        .map(|(inside, outside, count)| format!("{inside} {outside} {count}\n"))
        .collect()
}

fn absolute(flag: &'static str, path: &Path) -> Result<(), Error> {
    let plain = path.is_absolute() && path.components().skip(1).all(|c| matches!(c, Component::Normal(_)));
    if plain {
        Ok(())
    } else {
        Err(Error::NotAbsolute { flag, path: path.to_path_buf() })
    }
}

fn parse_capability(name: &str) -> Result<Capability, Error> {
    caps::to_canonical(name).parse().map_err(|_| Error::UnknownCapability(name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut argv = vec!["ironclad-jailer", "--uid", "900001", "--gid", "900001", "--root", "/run/j"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap()
    }

    fn usr() -> Vec<Bind> {
        vec![Bind { path: "/usr".into(), writable: false }]
    }

    fn no_libraries(_: &Path) -> Result<Vec<Library>, crate::libraries::Error> {
        Ok(Vec::new())
    }

    #[test]
    fn a_command_line_written_for_a_jail_parses_back_into_it() {
        let written = Args {
            uid: 0,
            gid: 0,
            root: "/run/ironclad/jail-root".into(),
            uid_lock: Some("/run/ironclad/jail-uids/900001".into()),
            bind_ro: vec!["/k/bzImage".into(), "/k/initrd.img".into()],
            bind_rw: vec!["/run/s/vm".into()],
            kvm: true,
            tun: true,
            user_namespace: true,
            keep_cap: vec!["CAP_CHOWN".into(), "CAP_SETPCAP".into()],
            rlimit_nofile: 65_536,
            rlimit_nproc: 7,
            command: vec!["/usr/bin/virtiofsd".into(), "--tag".into(), "--kvm".into()],
        };
        let line = written.to_command_line();
        let parsed =
            Args::try_parse_from(std::iter::once(OsString::from("ironclad-jailer")).chain(line)).unwrap();
        assert_eq!(parsed, written);
        let bare = Args {
            uid_lock: None,
            kvm: false,
            tun: false,
            user_namespace: false,
            keep_cap: Vec::new(),
            ..written
        };
        let parsed = Args::try_parse_from(
            std::iter::once(OsString::from("ironclad-jailer")).chain(bare.to_command_line()),
        )
        .unwrap();
        assert_eq!(parsed, bare);
    }

    #[test]
    fn the_program_and_the_requested_paths_are_bound_once_each() {
        let libraries = |program: &Path| {
            assert_eq!(program, Path::new("/usr/bin/qemu"));
            let library = |path: &str| Library { path: path.into(), file: path.into() };
            Ok(vec![library("/usr/lib/libz.so.1"), library("/opt/lib/libq.so")])
        };
        let spec = JailSpec::from_args(
            args(&["--bind-ro", "/k/bzImage", "--bind-rw", "/run/s/vm", "--", "/usr/bin/qemu", "-m", "256M"]),
            usr(),
            libraries,
        )
        .unwrap();
        // A library in a bound directory is there already.
        assert_eq!(
            spec.libraries,
            [Library { path: "/opt/lib/libq.so".into(), file: "/opt/lib/libq.so".into() }]
        );
        let paths: Vec<(&str, bool)> =
            spec.binds.iter().map(|b| (b.path.to_str().unwrap(), b.writable)).collect();
        // The program lies under /usr: no second bind for it.
        assert_eq!(paths, [("/usr", false), ("/k/bzImage", false), ("/run/s/vm", true)]);
        assert_eq!(spec.program, Path::new("/usr/bin/qemu"));
        assert_eq!(spec.args, [OsString::from("-m"), OsString::from("256M")]);
        assert!(spec.devices.is_empty() && spec.keep_caps.is_empty());
    }

    #[test]
    fn a_path_whose_links_lead_into_an_earlier_bind_is_not_bound_again() {
        let requested = vec![
            Bind { path: "/usr".into(), writable: false },
            Bind { path: "/bin/sh".into(), writable: false },
            Bind { path: "/opt/vmm".into(), writable: false },
        ];
        let planned = plan_binds_resolved(requested, |path| {
            (path == Path::new("/bin/sh")).then(|| PathBuf::from("/usr/bin/dash"))
        });
        let paths: Vec<&Path> = planned.iter().map(|b| b.path.as_path()).collect();
        assert_eq!(paths, [Path::new("/usr"), Path::new("/opt/vmm")]);
    }

    #[test]
    fn relative_or_dotted_paths_are_refused() {
        for bad in [
            &["--bind-ro", "k/bzImage", "--", "/bin/true"][..],
            &["--bind-rw", "/run/../etc", "--", "/bin/true"],
        ] {
            let err = JailSpec::from_args(args(bad), usr(), no_libraries).unwrap_err();
            assert!(matches!(err, Error::NotAbsolute { .. }), "{err}");
        }
        let err = JailSpec::from_args(args(&["--", "true"]), usr(), no_libraries).unwrap_err();
        assert!(matches!(err, Error::NotAbsolute { flag: "--", .. }), "{err}");
    }

    #[test]
    fn capabilities_are_kept_only_by_root_and_only_known_ones() {
        let err =
            JailSpec::from_args(args(&["--keep-cap", "CAP_CHOWN", "--", "/bin/true"]), usr(), no_libraries)
                .unwrap_err();
        assert!(matches!(err, Error::CapabilitiesWithoutRoot), "{err}");
        let root = |cap: &str| {
            let argv =
                ["j", "--uid", "0", "--gid", "0", "--root", "/r", "--keep-cap", cap, "--", "/bin/true"];
            JailSpec::from_args(Args::try_parse_from(argv).unwrap(), usr(), no_libraries)
        };
        assert_eq!(root("cap_chown").unwrap().keep_caps, [Capability::CAP_CHOWN]);
        assert!(matches!(root("CAP_TIME_TRAVEL").unwrap_err(), Error::UnknownCapability(_)));
    }

    #[test]
    fn a_user_namespace_keeps_capabilities_for_a_sandbox_uid_and_never_stands_for_root() {
        let argv = ["--user-namespace", "--keep-cap", "CAP_CHOWN", "--", "/bin/true"];
        let spec = JailSpec::from_args(args(&argv), usr(), no_libraries).unwrap();
        assert!(spec.user_namespace);
        assert_eq!((spec.uid, spec.keep_caps.as_slice()), (900_001, &[Capability::CAP_CHOWN][..]));
        let as_root =
            ["j", "--uid", "0", "--gid", "0", "--root", "/r", "--user-namespace", "--", "/bin/true"];
        let err =
            JailSpec::from_args(Args::try_parse_from(as_root).unwrap(), usr(), no_libraries).unwrap_err();
        assert!(matches!(err, Error::UserNamespaceAsRoot), "{err}");
    }

    #[test]
    fn the_user_namespace_swaps_the_sandbox_id_with_root_and_maps_every_other_id_to_itself() {
        assert_eq!(
            swapped_with_root(900_001),
            "0 900001 1\n1 1 900000\n900001 0 1\n900002 900002 4294067293\n"
        );
        // Every id up to 4294967294 (the largest valid one), each inside and outside once.
        let lines: Vec<(u64, u64, u64)> = swapped_with_root(900_001)
            .lines()
            .map(|line| {
                let n: Vec<u64> = line.split(' ').map(|f| f.parse().unwrap()).collect();
                (n[0], n[1], n[2])
            })
            .collect();
        assert_eq!(lines.iter().map(|l| l.2).sum::<u64>(), u64::from(u32::MAX));
        assert_eq!(swapped_with_root(1), "0 1 1\n1 0 1\n2 2 4294967293\n", "no empty range");
    }

    #[test]
    fn devices_and_limits_come_from_their_flags() {
        let spec = JailSpec::from_args(
            args(&["--kvm", "--tun", "--rlimit-nofile", "64", "--", "/bin/true"]),
            usr(),
            no_libraries,
        )
        .unwrap();
        assert_eq!(spec.devices, [Device::Kvm, Device::Tun]);
        assert_eq!(spec.limits, Limits { nofile: 64, nproc: 1024 });
        let err = JailSpec::from_args(args(&["--rlimit-nproc", "0", "--", "/bin/true"]), usr(), no_libraries)
            .unwrap_err();
        assert!(matches!(err, Error::ZeroLimit));
    }

    #[test]
    fn a_command_is_required() {
        assert!(Args::try_parse_from(["j", "--uid", "1", "--gid", "1", "--root", "/r"]).is_err());
    }
}
