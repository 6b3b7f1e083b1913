//! Warm starts: ironclad-pool (pool/) keeps VMs booted and paused, with nothing tenant-specific in
//! them, and hands each to one shim over a Unix socket. This is both sides' part of that socket:
//! one `SOCK_SEQPACKET` connection per take, one JSON request, one JSON reply whose descriptors
//! (the VM's pidfds and console) travel as SCM_RIGHTS.
//!
//! A pooled VM fits a sandbox only if it is the sandbox's cold VM in all but its tenant: the same
//! monitor, kernel and initrd (the same open files), vCPUs, memory and command line. What makes it
//! the tenant's comes after the take, through the agent and the shared directory.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{
    self, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};
use serde::{Deserialize, Serialize};

/// Where the pool listens unless the config says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/ironclad/pool.sock";
/// The largest message either side accepts.
const MAX_MESSAGE: usize = 64 * 1024;
/// The most descriptors one reply carries: console, stderr and a pidfd per process.
pub const MAX_FDS: usize = 8;
/// How long a take may take, end to end, before the shim boots cold instead.
pub const TAKE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no ironclad-pool listens at {socket}")]
    NoPool {
        socket: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot {action} on the pool's socket")]
    Socket {
        action: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("the pool's message is not valid")]
    Decode(#[source] serde_json::Error),
    #[error("the message cannot be encoded")]
    Encode(#[source] serde_json::Error),
    #[error("the message was cut: more than {MAX_MESSAGE} bytes or {MAX_FDS} descriptors")]
    Truncated,
    #[error("the connection closed before a message came")]
    Closed,
    #[error("the pool has no VM for this sandbox: {0}")]
    Empty(String),
    #[error("the pool's reply carries {got} descriptors where its VM needs {wanted}")]
    Descriptors { got: usize, wanted: usize },
    #[error("cannot take charge of the pooled VM's descriptors")]
    Adopt(#[source] std::io::Error),
    #[error("the pool's VM directory {0} is not below the run root's pool directory")]
    ForeignDir(PathBuf),
    #[error(transparent)]
    Pinned(#[from] crate::resources::pinned::Error),
    #[error(transparent)]
    Settings(#[from] crate::config::Error),
    #[error("cannot identify the opened guest kernel or initrd")]
    Identity(#[source] std::io::Error),
}

/// What every pooled VM is booted from: the default sandbox of a config, its guest files opened
/// and checked against their pins.
pub struct Template {
    pub settings: crate::config::SandboxSettings,
    pub kernel_params: String,
    pub opened: crate::hypervisor::OpenedGuest,
}

impl Template {
    /// The template of `config`'s pool on `backend`, and the shape of its VMs: what a shim of
    /// the same config asks for when it takes one for a sandbox without annotations.
    pub fn for_config(config: &crate::config::ShimConfig, backend: &str) -> Result<(Template, Shape), Error> {
        use crate::resources::pinned::open_verified;
        let opened = crate::hypervisor::OpenedGuest {
            kernel: open_verified("kernel", &config.kernel, config.kernel_sha256.as_deref())?,
            initrd: open_verified("initrd", &config.initrd, config.initrd_sha256.as_deref())?,
        };
        let settings = config.sandbox_settings(&Default::default())?;
        let kernel_params = config.kernel_params_for(&settings);
        let pins = Pins { kernel: config.kernel_sha256.clone(), initrd: config.initrd_sha256.clone() };
        let shape = Shape::of(backend, &settings, &opened, &kernel_params, pins).map_err(Error::Identity)?;
        Ok((Template { settings, kernel_params, opened }, shape))
    }
}

/// A file by identity: the same device, inode, size and change time is the same open file's
/// contents (the pool and the shim each open, and check, the configured kernel and initrd).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub ctime_ns: i128,
}

impl FileIdentity {
    pub fn of(file: &std::fs::File) -> std::io::Result<FileIdentity> {
        let meta = file.metadata()?;
        Ok(FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        })
    }
}

/// The sha256 digests a config pins the guest files to (`kernel_sha256`, `initrd_sha256`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Pins {
    pub kernel: Option<String>,
    pub initrd: Option<String>,
}

impl Pins {
    fn normalized(&self) -> (Option<String>, Option<String>) {
        (
            self.kernel.as_ref().map(|pin| pin.to_ascii_lowercase()),
            self.initrd.as_ref().map(|pin| pin.to_ascii_lowercase()),
        )
    }
}

/// What a sandbox's VM is, apart from its tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    /// "qemu" or "ironclad".
    pub backend: String,
    pub vcpus: u8,
    pub memory_mib: u32,
    pub free_page_reporting: bool,
    pub kernel_cmdline: String,
    pub kernel: FileIdentity,
    pub initrd: FileIdentity,
    /// What the files were checked against: the pool hashed them when it opened them; a shim
    /// whose config pins the same digests takes the pool's check for its own.
    pub pins: Pins,
}

impl Shape {
    /// The shape of a sandbox of `settings` booted by `backend` from the `opened` guest files.
    pub fn of(
        backend: &str,
        settings: &crate::config::SandboxSettings,
        opened: &crate::hypervisor::OpenedGuest,
        extra_kernel_params: &str,
        pins: Pins,
    ) -> std::io::Result<Shape> {
        let vm = crate::hypervisor::VmConfig {
            kernel: PathBuf::new(),
            initrd: PathBuf::new(),
            opened: None,
            vcpus: settings.vcpus,
            memory_mib: settings.memory_mib,
            extra_kernel_params: extra_kernel_params.to_string(),
            block_devices: vec![],
            network: None,
            shared_dir: None,
            free_page_reporting: settings.free_page_reporting,
        };
        Ok(Shape {
            backend: backend.into(),
            vcpus: settings.vcpus,
            memory_mib: settings.memory_mib,
            free_page_reporting: settings.free_page_reporting,
            kernel_cmdline: vm.kernel_cmdline(),
            kernel: opened.kernel.identity()?,
            initrd: opened.initrd.identity()?,
            pins,
        })
    }

    /// Why a VM of shape `self` cannot serve a sandbox that needs `wanted`; None when it can.
    pub fn mismatch(&self, wanted: &Shape) -> Option<String> {
        if self.backend != wanted.backend {
            Some(format!("the pool boots {}, the sandbox needs {}", self.backend, wanted.backend))
        } else if (self.vcpus, self.memory_mib) != (wanted.vcpus, wanted.memory_mib) {
            Some(format!(
                "the pool's VMs have {} vCPUs and {} MiB, the sandbox needs {} and {}",
                self.vcpus, self.memory_mib, wanted.vcpus, wanted.memory_mib
            ))
        } else if self.free_page_reporting != wanted.free_page_reporting {
            Some(format!(
                "the pool's VMs have free page reporting {}, the sandbox's config turns it {}",
                on_off(self.free_page_reporting),
                on_off(wanted.free_page_reporting)
            ))
        } else if self.kernel_cmdline != wanted.kernel_cmdline {
            Some(format!(
                "the pool's kernel command line is {:?}, the sandbox's {:?}",
                self.kernel_cmdline, wanted.kernel_cmdline
            ))
        } else if (self.kernel, self.initrd) != (wanted.kernel, wanted.initrd) {
            Some("the pool booted another kernel or initrd file than the one the shim opened".into())
        } else if self.pins.normalized() != wanted.pins.normalized() {
            Some("the pool's config pins other kernel or initrd digests than the sandbox's".into())
        } else {
            None
        }
    }
}

fn on_off(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

/// A shim's request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// One VM of this shape, for one sandbox, never to be handed out again. The pool records the
    /// VM in the sandbox's task directory before it replies.
    Take { shape: Shape, task_dir: PathBuf },
}

/// The pool's reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// The VM; its descriptors come with the message: console, stderr, then a pidfd per process
    /// in `pids`' order (the monitor first). Running again (the pool resumed it).
    Vm(Box<Offer>),
    /// No VM for this request, and why.
    Empty(String),
}

/// A pooled VM as its new owner needs to know it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    pub id: String,
    /// Its directory, laid out like a task directory (`vm/`, `shared/`, `net`, the records
    /// clean-up reads): the shim's from now on, removed with the sandbox.
    pub dir: PathBuf,
    pub monitor_name: String,
    pub pids: Vec<u32>,
    pub agent_socket: PathBuf,
    pub guest_message_limit: u32,
    /// The agent's ready line as the pool saw it, and how long after the monitor's start.
    pub agent_version: String,
    pub uptime_ms: u64,
    pub init_ms: Option<u64>,
    pub ready_after_ms: u64,
    /// The network namespace the monitor runs in, made for the VM, with one tap whose guest NIC
    /// has `guest_mac` and waits for a CNI interface, as a cold sandbox's does.
    pub netns: PathBuf,
    pub tap: String,
    pub guest_mac: [u8; 6],
    /// The jailed helpers' uid, when they are jailed.
    pub uid: Option<u32>,
}

/// The pool's directory below the run root: where its VMs live until they are taken.
pub fn pool_dir(run_root: &Path) -> PathBuf {
    // A containerd namespace cannot begin with a dot, so no task directory is ever here.
    run_root.join(".pool")
}

/// Why the pool will not record a VM in `task_dir`; None when it is a task directory,
/// `<run root>/<namespace>/<task>`, that exists as a directory of its own (not a link, not the
/// pool's directory).
pub fn taker_dir_refusal(run_root: &Path, task_dir: &Path) -> Option<String> {
    let refusal = |why: &str| Some(format!("{} is not a task directory: {why}", task_dir.display()));
    let Ok(below) = task_dir.strip_prefix(run_root) else {
        return refusal(&format!("it is not below the run root {}", run_root.display()));
    };
    let names: Vec<_> = below.components().collect();
    let plain = names.iter().all(|name| matches!(name, std::path::Component::Normal(_)));
    if names.len() != 2 || !plain {
        return refusal("a task directory is <run root>/<namespace>/<task>");
    }
    if task_dir.starts_with(pool_dir(run_root)) {
        return refusal("it is the pool's own");
    }
    match std::fs::symlink_metadata(task_dir) {
        Ok(metadata) if metadata.is_dir() => None,
        Ok(_) => refusal("it is not a directory"),
        Err(err) => refusal(&err.to_string()),
    }
}

/// Sends `message` with `fds` as one datagram.
pub fn send<T: Serialize>(socket: BorrowedFd<'_>, message: &T, fds: &[BorrowedFd<'_>]) -> Result<(), Error> {
    let bytes = serde_json::to_vec(message).map_err(Error::Encode)?;
    if bytes.len() > MAX_MESSAGE || fds.len() > MAX_FDS {
        return Err(Error::Truncated);
    }
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let control: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
    socket::sendmsg::<()>(socket.as_raw_fd(), &[IoSlice::new(&bytes)], control, MsgFlags::empty(), None)
        .map_err(|source| Error::Socket { action: "send", source })?;
    Ok(())
}

/// Receives one datagram: the message and the descriptors that came with it (close-on-exec).
pub fn receive<T: for<'de> Deserialize<'de>>(socket: BorrowedFd<'_>) -> Result<(T, Vec<OwnedFd>), Error> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let received =
        socket::recvmsg::<()>(socket.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
            .map_err(|source| Error::Socket { action: "receive", source })?;
    let mut fds = Vec::new();
    for message in received.cmsgs().map_err(|source| Error::Socket { action: "receive", source })? {
        if let ControlMessageOwned::ScmRights(raw) = message {
            // SAFETY: the kernel just installed these descriptors in this process for this
            // message; nothing else owns them.
            fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    let truncated = received.flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
    let length = received.bytes;
    if truncated {
        return Err(Error::Truncated);
    }
    if length == 0 {
        return Err(Error::Closed);
    }
    let message = serde_json::from_slice(&buf[..length]).map_err(Error::Decode)?;
    Ok((message, fds))
}

/// Both directions of `socket` give up after `timeout`.
pub fn set_timeouts(socket: BorrowedFd<'_>, timeout: Duration) -> Result<(), Error> {
    let time = nix::sys::time::TimeVal::new(
        libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        libc::suseconds_t::from(timeout.subsec_micros()),
    );
    let failed = |source| Error::Socket { action: "set a timeout", source };
    socket::setsockopt(&socket, socket::sockopt::ReceiveTimeout, &time).map_err(failed)?;
    socket::setsockopt(&socket, socket::sockopt::SendTimeout, &time).map_err(failed)
}

/// A new `SOCK_SEQPACKET` Unix socket.
pub fn seqpacket_socket() -> Result<OwnedFd, Error> {
    socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|source| Error::Socket { action: "create", source })
}

/// A VM taken from the pool, with its descriptors.
pub struct Taken {
    pub offer: Offer,
    pub console: OwnedFd,
    pub stderr: OwnedFd,
    pub pidfds: Vec<OwnedFd>,
}

/// Asks the pool at `socket` for a VM of `shape`. Blocks (at most [`TAKE_TIMEOUT`] per step): run
/// it off the async runtime.
pub fn take(socket_path: &Path, shape: &Shape, task_dir: &Path) -> Result<Taken, Error> {
    let socket = seqpacket_socket()?;
    let address = UnixAddr::new(socket_path)
        .map_err(|source| Error::NoPool { socket: socket_path.to_path_buf(), source })?;
    socket::connect(socket.as_raw_fd(), &address)
        .map_err(|source| Error::NoPool { socket: socket_path.to_path_buf(), source })?;
    set_timeouts(socket.as_fd(), TAKE_TIMEOUT)?;
    send(socket.as_fd(), &Request::Take { shape: shape.clone(), task_dir: task_dir.to_path_buf() }, &[])?;
    let (reply, fds) = receive::<Reply>(socket.as_fd())?;
    let offer = match reply {
        Reply::Vm(offer) => *offer,
        Reply::Empty(reason) => return Err(Error::Empty(reason)),
    };
    let wanted = offer.pids.len() + 2;
    if fds.len() != wanted || offer.pids.is_empty() {
        return Err(Error::Descriptors { got: fds.len(), wanted });
    }
    let mut fds = fds.into_iter();
    let (Some(console), Some(stderr)) = (fds.next(), fds.next()) else {
        return Err(Error::Descriptors { got: 0, wanted });
    };
    Ok(Taken { offer, console, stderr, pidfds: fds.collect() })
}

/// A VM of `shape` from the pool at `socket`, or None (logged with the reason): there is no pool,
/// it has no VM of this shape, or it failed to hand one over.
pub async fn take_or_say_why(socket: &Path, shape: Shape, task_dir: &Path) -> Option<Taken> {
    let (socket, task_dir) = (socket.to_path_buf(), task_dir.to_path_buf());
    let taken = tokio::task::spawn_blocking(move || take(&socket, &shape, &task_dir)).await;
    match taken {
        Ok(Ok(taken)) => Some(taken),
        Ok(Err(err @ (Error::NoPool { .. } | Error::Empty(_)))) => {
            tracing::info!("warm start: {}; booting cold", crate::hypervisor::error_chain(&err));
            None
        }
        Ok(Err(err)) => {
            tracing::warn!(
                "warm start: ironclad-pool failed: {}; booting cold",
                crate::hypervisor::error_chain(&err)
            );
            None
        }
        Err(err) => {
            tracing::warn!("warm start: the request stopped: {err}; booting cold");
            None
        }
    }
}

impl Taken {
    /// The VM for [`crate::hypervisor::GuestVm::adopt`]; its directory must be the pool's own.
    pub fn into_adopted(
        self,
        run_root: &Path,
    ) -> Result<(Offer, crate::hypervisor::process::AdoptedVm), Error> {
        let Taken { offer, console, stderr, pidfds } = self;
        let pool = pool_dir(run_root);
        let plain_child = offer.dir.parent() == Some(pool.as_path())
            && offer.dir.file_name().is_some_and(|name| !name.is_empty() && name != "..");
        if !plain_child || !offer.agent_socket.starts_with(&offer.dir) {
            // Not a VM to run, nor a directory to remove on the pool's word: its processes end.
            for pidfd in &pidfds {
                let _ = crate::hypervisor::process::pidfd_send_signal(pidfd.as_fd(), libc::SIGKILL);
            }
            return Err(Error::ForeignDir(offer.dir.clone()));
        }
        let processes = offer
            .pids
            .iter()
            .zip(pidfds)
            .map(|(pid, fd)| crate::hypervisor::process::PidFd::new(*pid, fd))
            .collect::<Result<Vec<_>, _>>()
            .map_err(Error::Adopt)?;
        let ready = crate::hypervisor::Ready {
            line: crate::hypervisor::ReadyLine {
                version: offer.agent_version.clone(),
                uptime_ms: offer.uptime_ms,
                init_ms: offer.init_ms,
            },
            since_start: Duration::from_millis(offer.ready_after_ms),
        };
        let adopted = crate::hypervisor::process::AdoptedVm {
            monitor_name: offer.monitor_name.clone(),
            processes,
            console,
            stderr,
            agent_socket: offer.agent_socket.clone(),
            ready,
            guest_message_limit: offer.guest_message_limit,
        };
        Ok((offer, adopted))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(ino: u64) -> FileIdentity {
        FileIdentity { dev: 1, ino, size: 10, ctime_ns: 5 }
    }

    fn shape() -> Shape {
        Shape {
            backend: "qemu".into(),
            vcpus: 1,
            memory_mib: 256,
            free_page_reporting: true,
            kernel_cmdline: "console=ttyS0".into(),
            kernel: identity(1),
            initrd: identity(2),
            pins: Pins { kernel: Some("AB".into()), initrd: None },
        }
    }

    #[test]
    fn the_pool_records_a_vm_only_in_a_task_directory() {
        let run_root = tempfile::tempdir().unwrap();
        let root = run_root.path();
        let task = root.join("default").join("task-1");
        std::fs::create_dir_all(&task).unwrap();
        assert_eq!(taker_dir_refusal(root, &task), None);
        std::fs::create_dir_all(pool_dir(root).join("vm-1")).unwrap();
        std::os::unix::fs::symlink(&task, root.join("default").join("link")).unwrap();
        std::fs::write(root.join("default").join("file"), b"").unwrap();
        let refused = [
            (pool_dir(root).join("vm-1"), "the pool's own"),
            (root.join("default").join("link"), "not a directory"),
            (root.join("default").join("file"), "not a directory"),
            (root.join("default").join("missing"), "No such file"),
            (root.join("default"), "<run root>/<namespace>/<task>"),
            (task.join("vm"), "<run root>/<namespace>/<task>"),
            (root.join("default").join("..").join("default"), "<run root>/<namespace>/<task>"),
            (PathBuf::from("/etc/ironclad"), "not below the run root"),
        ];
        for (dir, why) in refused {
            let refusal =
                taker_dir_refusal(root, &dir).unwrap_or_else(|| panic!("{} was taken", dir.display()));
            assert!(refusal.contains(why), "{}: {refusal}", dir.display());
        }
    }

    #[test]
    fn a_vm_fits_only_a_sandbox_of_its_own_shape_and_says_why_not() {
        assert_eq!(shape().mismatch(&shape()), None);
        let mut other = shape();
        other.memory_mib = 512;
        assert!(shape().mismatch(&other).unwrap().contains("512"));
        let mut other = shape();
        other.free_page_reporting = false;
        assert!(shape().mismatch(&other).unwrap().contains("free page reporting on"));
        let mut other = shape();
        other.backend = "ironclad".into();
        assert!(shape().mismatch(&other).unwrap().contains("ironclad"));
        let mut other = shape();
        other.kernel_cmdline.push_str(" quiet");
        assert!(shape().mismatch(&other).unwrap().contains("quiet"));
        let mut other = shape();
        other.initrd = identity(3);
        assert!(shape().mismatch(&other).unwrap().contains("initrd"));
        let mut other = shape();
        other.pins.kernel = Some("ab".into());
        assert_eq!(shape().mismatch(&other), None, "a digest is a digest in either case");
        other.pins.initrd = Some("cd".into());
        assert!(shape().mismatch(&other).unwrap().contains("pins"));
    }

    #[test]
    fn a_message_and_its_descriptors_arrive_together() {
        let (a, b) =
            socket::socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
                .unwrap();
        let file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut &file, b"passed").unwrap();
        send(a.as_fd(), &Reply::Empty("because".into()), &[file.as_fd()]).unwrap();
        let (reply, fds) = receive::<Reply>(b.as_fd()).unwrap();
        assert_eq!(reply, Reply::Empty("because".into()));
        assert_eq!(fds.len(), 1);
        let mut passed = std::fs::File::from(fds.into_iter().next().unwrap());
        std::io::Seek::rewind(&mut passed).unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut passed, &mut text).unwrap();
        assert_eq!(text, "passed");
    }

    #[test]
    fn garbage_and_a_closed_peer_are_errors() {
        let (a, b) =
            socket::socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
                .unwrap();
        socket::send(a.as_raw_fd(), b"{not json", MsgFlags::empty()).unwrap();
        assert!(matches!(receive::<Reply>(b.as_fd()), Err(Error::Decode(_))));
        drop(a);
        assert!(matches!(receive::<Reply>(b.as_fd()), Err(Error::Closed)));
    }

    #[test]
    fn no_pool_is_its_own_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = take(&dir.path().join("pool.sock"), &shape(), dir.path()).err().unwrap();
        assert!(matches!(err, Error::NoPool { .. }), "{err}");
    }

    #[test]
    fn an_offer_outside_the_pool_directory_is_refused() {
        let offer = Offer {
            id: "vm-1".into(),
            dir: "/run/ironclad/default/victim".into(),
            monitor_name: "qemu".into(),
            pids: vec![1],
            agent_socket: "/run/ironclad/default/victim/vm/vsock.sock".into(),
            guest_message_limit: 0,
            agent_version: "0.1.0".into(),
            uptime_ms: 1,
            init_ms: None,
            ready_after_ms: 1,
            netns: "/run/ironclad/.pool/vm-1/net".into(),
            tap: "tap0".into(),
            guest_mac: [2, 0, 0, 0, 0, 1],
            uid: None,
        };
        let (console, stderr) = (tempfile::tempfile().unwrap().into(), tempfile::tempfile().unwrap().into());
        let taken = Taken { offer, console, stderr, pidfds: vec![] };
        assert!(matches!(taken.into_adopted(Path::new("/run/ironclad")), Err(Error::ForeignDir(_))));
    }
}
