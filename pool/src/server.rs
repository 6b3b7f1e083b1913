//! The pool's socket: `SOCK_SEQPACKET`, mode 0600, root's only (checked again by the peer's
//! credentials); one take per connection (`ironclad_shim::pool`).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ironclad_shim::hypervisor::error_chain;
use ironclad_shim::pool::{self, Reply, Request};
use ironclad_shim::sandbox::{self, clean_up_task_dir_off_the_runtime};
use nix::sys::socket::{self, SockFlag, UnixAddr};
use tokio::io::unix::AsyncFd;
use tracing::{info, warn};

use crate::{vm, Pool};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("another ironclad-pool listens at {0}")]
    AlreadyRunning(PathBuf),
    #[error("cannot {action} the pool's socket {path}")]
    Socket {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Protocol(#[from] pool::Error),
}

/// The listening socket; its file goes when it is dropped.
pub struct Server {
    listener: AsyncFd<OwnedFd>,
    path: PathBuf,
}

impl Server {
    /// Listens at `path`. A file left there by a pool that died is replaced; a live pool's is not.
    pub fn bind(path: &Path) -> Result<Server, Error> {
        let failed = |action| {
            let path = path.to_path_buf();
            move |source: std::io::Error| Error::Socket { action, path, source }
        };
        if path.exists() {
            let probe = pool::seqpacket_socket()?;
            let address = UnixAddr::new(path).map_err(|errno| failed("name")(errno.into()))?;
            if socket::connect(probe.as_raw_fd(), &address).is_ok() {
                return Err(Error::AlreadyRunning(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(failed("remove the stale"))?;
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(failed("make the directory of"))?;
        }
        let listener = socket::socket(
            socket::AddressFamily::Unix,
            socket::SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(|errno| failed("create")(errno.into()))?;
        let address = UnixAddr::new(path).map_err(|errno| failed("name")(errno.into()))?;
        socket::bind(listener.as_raw_fd(), &address).map_err(|errno| failed("bind")(errno.into()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(failed("restrict"))?;
        socket::listen(&listener, socket::Backlog::new(16).unwrap_or(socket::Backlog::MAXCONN))
            .map_err(|errno| failed("listen on")(errno.into()))?;
        // Registered only once it listens: a socket that does not yet reads as hung up, which
        // would stay readable for good.
        let server = Server {
            // SAFETY: the OwnedFd moves into the AsyncFd, which keeps it open while it is registered.
            listener: unsafe { AsyncFd::register_with_interest(listener, tokio::io::Interest::READABLE) }
                .map_err(|err| failed("register")(std::io::Error::from(err)))?,
            path: path.to_path_buf(),
        };
        Ok(server)
    }

    /// Answers takes until the task is dropped.
    pub async fn serve(&self, pool: Arc<Pool>) {
        loop {
            let Ok(mut ready) = self.listener.readable().await else { return };
            match socket::accept4(self.listener.get_ref().as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                Ok(fd) => {
                    // SAFETY: accept4 just returned this descriptor; nothing else owns it.
                    let connection = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
                    tokio::spawn(answer(pool.clone(), connection));
                }
                Err(nix::Error::EAGAIN) => ready.clear_ready(),
                Err(err) => warn!("accept on the pool's socket: {err}"),
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Answers one connection: a take from root gets a VM, or the reason it gets none.
async fn answer(pool: Arc<Pool>, connection: OwnedFd) {
    let peer = socket::getsockopt(&connection, socket::sockopt::PeerCredentials);
    match peer {
        Ok(credentials) if credentials.uid() == 0 => {}
        Ok(credentials) => {
            warn!("refused a take from uid {} (pid {}): root's only", credentials.uid(), credentials.pid());
            return;
        }
        Err(err) => {
            warn!("refused a take whose peer is unknown: {err}");
            return;
        }
    }
    let received = tokio::task::spawn_blocking(move || {
        pool::set_timeouts(connection.as_fd(), pool::TAKE_TIMEOUT)?;
        let (request, _) = pool::receive::<Request>(connection.as_fd())?;
        Ok::<_, pool::Error>((connection, request))
    })
    .await;
    let (connection, Request::Take { shape, task_dir }) = match received {
        Ok(Ok(received)) => received,
        Ok(Err(err)) => return warn!("a take's request: {}", error_chain(&err)),
        Err(err) => return warn!("a take's request: {err}"),
    };
    if let Some(reason) = pool.shape.mismatch(&shape) {
        return reply_empty(connection, reason).await;
    }
    if let Some(reason) = pool::taker_dir_refusal(&pool.config().run_root, &task_dir) {
        return reply_empty(connection, reason).await;
    }
    let Some(vm) = pool.take().await else {
        let reason = format!("none of its {} VMs is booted yet", pool.config().pool.size);
        return reply_empty(connection, reason).await;
    };
    let dir = vm.dir.clone();
    // Recorded before the reply: a shim that dies once the VM is its own leaves a record that its
    // clean-up (containerd's `delete`) follows.
    if let Err(err) = sandbox::record_pooled_vm(&task_dir, &dir) {
        warn!("cannot record pooled VM {} for its taker: {}", vm.id, error_chain(&err));
        vm.discard().await;
        return reply_empty(connection, format!("recording the VM failed: {}", error_chain(&err))).await;
    }
    let handover = match vm.hand_over() {
        Ok(handover) => handover,
        Err(err) => {
            warn!("cannot hand over a pooled VM: {}", error_chain(&err));
            take_back(&dir, &task_dir).await;
            return reply_empty(connection, format!("handing over failed: {}", error_chain(&err))).await;
        }
    };
    let id = handover.offer.id.clone();
    let sent = tokio::task::spawn_blocking(move || {
        let vm::Handover { offer, fds, children } = handover;
        let fds: Vec<_> = fds.iter().map(AsFd::as_fd).collect();
        (pool::send(connection.as_fd(), &Reply::Vm(Box::new(offer)), &fds), children)
    })
    .await;
    match sent {
        Ok((Ok(()), children)) => {
            info!("handed {id} over");
            reap_elsewhere(children);
        }
        Ok((Err(err), mut children)) => {
            warn!("handing {id} over failed, it is stopped: {}", error_chain(&err));
            for child in &mut children {
                let _ = child.start_kill();
            }
            reap_elsewhere(children);
            take_back(&dir, &task_dir).await;
        }
        Err(err) => {
            warn!("handing {id} over stopped: {err}; its directory is removed");
            take_back(&dir, &task_dir).await;
        }
    }
}

/// Undoes a take that failed after the VM was recorded in its taker's directory: the VM's
/// directory is cleaned up (its processes, mounts and cgroup go with it), then the record.
async fn take_back(vm_dir: &Path, task_dir: &Path) {
    clean_up_task_dir_off_the_runtime(vm_dir).await;
    sandbox::withdraw_pooled_vm_record(task_dir);
}

async fn reply_empty(connection: OwnedFd, reason: String) {
    info!("no VM for a take: {reason}");
    let sent =
        tokio::task::spawn_blocking(move || pool::send(connection.as_fd(), &Reply::Empty(reason), &[])).await;
    if let Ok(Err(err)) = sent {
        warn!("cannot answer a take: {}", error_chain(&err));
    }
}

/// Reaps the handed-over VM's processes when they exit, on threads of their own: they are a
/// shim's now, and must survive this pool (a tokio child dropped at exit would be killed).
fn reap_elsewhere(children: Vec<tokio::process::Child>) {
    for child in children {
        let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) else { continue };
        std::mem::forget(child);
        std::thread::spawn(move || {
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
        });
    }
}
