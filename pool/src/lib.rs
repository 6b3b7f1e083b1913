//! ironclad-pool: keeps `[pool] size` VMs booted and paused for warm starts, and hands each to
//! one shim for one sandbox (`ironclad_shim::pool` is the socket's protocol).
//!
//! - `vm`: one pooled VM: boot, pause, hand over, discard.
//! - `server`: the socket: one take per connection, root's only.
//! - here: the pool itself: the refill (one boot at a time, within a CPU budget), dead VMs dropped
//!   and replaced, and the stop that leaves nothing behind.

pub mod server;
pub mod vm;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ironclad_shim::config::ShimConfig;
use ironclad_shim::hypervisor::{self, error_chain, Backend, HostVirtualization};
use ironclad_shim::pool::{pool_dir, Shape, Template};
use ironclad_shim::sandbox::{clean_up_task_dir, clean_up_task_dir_off_the_runtime};
use tokio::sync::{Mutex, Notify};
use tracing::{error, info, warn};

pub use vm::PooledVm;

/// How often the refill looks for dead VMs when the pool is full.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);
/// How long the refill rests after a boot that failed.
const FAILED_BOOT_PAUSE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Hypervisor(#[from] hypervisor::Error),
    #[error("cannot make the pool's template")]
    Template(#[from] ironclad_shim::pool::Error),
    #[error("cannot make the pool's directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Server(#[from] server::Error),
}

/// The pool: its VMs and what it boots them from.
pub struct Pool {
    config: ShimConfig,
    backend: Backend,
    /// What every VM is booted from: the shape's own settings, parameters and guest files.
    template: Template,
    /// What its VMs are; a take for another shape is refused.
    pub shape: Shape,
    dir: PathBuf,
    ready: Mutex<VecDeque<PooledVm>>,
    /// Wakes the refill after a take or at stop.
    wake: Notify,
    stopping: std::sync::atomic::AtomicBool,
    booted: AtomicU64,
}

impl Pool {
    /// The pool for `config`: its backend found, its guest files opened and checked, and whatever
    /// an earlier pool left (VMs never handed over) removed.
    pub fn new(config: ShimConfig) -> Result<Arc<Pool>, Error> {
        let mut backend = Backend::select(config.hypervisor, HostVirtualization::detect())?;
        if let Backend::Qemu(qemu) = &mut backend {
            qemu.sandbox = config.qemu_sandbox;
        }
        let (template, shape) = Template::for_config(&config, backend.name())?;
        let dir = pool_dir(&config.run_root);
        remove_leftovers(&dir);
        create_private_dir(&dir)?;
        Ok(Arc::new(Pool {
            config,
            backend,
            template,
            shape,
            dir,
            ready: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            stopping: std::sync::atomic::AtomicBool::new(false),
            booted: AtomicU64::new(0),
        }))
    }

    pub fn config(&self) -> &ShimConfig {
        &self.config
    }

    /// How many VMs wait now.
    pub async fn waiting(&self) -> usize {
        self.ready.lock().await.len()
    }

    /// A waiting VM that still runs, taken out of the pool for good; dead ones are discarded first.
    pub async fn take(&self) -> Option<PooledVm> {
        self.drop_dead().await;
        let taken = self.ready.lock().await.pop_front();
        self.wake.notify_one();
        taken
    }

    /// Keeps the pool full until it stops: one boot at a time, each followed by a rest that keeps
    /// the refill within `refill_cpu_percent` of a CPU; dead VMs are dropped (and so replaced).
    pub async fn refill(self: Arc<Self>) {
        while !self.is_stopping() {
            self.drop_dead().await;
            if self.waiting().await >= self.config.pool.size as usize {
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(WATCH_INTERVAL) => {}
                }
                continue;
            }
            let pause = self.boot_one().await;
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.stopped() => {}
            }
        }
    }

    /// Boots one VM into the pool; returns how long the refill rests before the next.
    async fn boot_one(&self) -> Duration {
        let id = format!("vm-{}-{}", std::process::id(), self.booted.fetch_add(1, Ordering::SeqCst));
        let dir = self.dir.join(&id);
        let boot = PooledVm::boot(&self.config, &self.backend, &self.template, dir.clone(), id.clone());
        // A stop during the boot ends it: its VM is killed with the future and its directory removed.
        let booted = tokio::select! {
            booted = boot => booted,
            _ = self.stopped() => {
                clean_up_task_dir_off_the_runtime(&dir).await;
                return Duration::ZERO;
            }
        };
        match booted {
            Ok(vm) => {
                let pause = self.config.pool.refill_pause(vm.booted_in);
                info!("pooled VM {id} ready after {:?}, paused", vm.booted_in);
                let mut ready = self.ready.lock().await;
                if self.is_stopping() {
                    drop(ready);
                    vm.discard().await;
                } else {
                    ready.push_back(vm);
                }
                pause
            }
            Err(err) => {
                error!("cannot boot a pooled VM: {}", error_chain(&err));
                FAILED_BOOT_PAUSE
            }
        }
    }

    async fn drop_dead(&self) {
        let dead: Vec<PooledVm> = {
            let mut ready = self.ready.lock().await;
            let (alive, dead): (VecDeque<PooledVm>, VecDeque<PooledVm>) =
                ready.drain(..).partition(PooledVm::is_alive);
            *ready = alive;
            dead.into()
        };
        for vm in dead {
            warn!(
                "pooled VM {} died while it waited: dropped, to be replaced; console tail: {}",
                vm.id,
                vm.console_tail()
            );
            vm.discard().await;
        }
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    async fn stopped(&self) {
        while !self.is_stopping() {
            tokio::time::sleep(WATCH_INTERVAL / 5).await;
        }
    }

    /// Stops the refill (a boot it cuts short is cleaned up, one that just finished discarded),
    /// then every VM still in the pool, and removes the pool's directory: after this, nothing of
    /// the pool is left but the VMs it handed over, which are their shims'.
    pub async fn stop(&self, refill: tokio::task::JoinHandle<()>) {
        self.stopping.store(true, Ordering::SeqCst);
        self.wake.notify_one();
        let _ = refill.await;
        let vms: Vec<PooledVm> = self.ready.lock().await.drain(..).collect();
        for vm in vms {
            info!("stopping pooled VM {}", vm.id);
            vm.discard().await;
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Removes what a pool that did not stop cleanly left in `dir`: every VM directory it had not
/// handed over (a handed-over one is a shim's).
fn remove_leftovers(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.join(vm::HANDED_OVER_FILE).exists() {
            continue;
        }
        warn!("removing {}, left by an earlier ironclad-pool", path.display());
        clean_up_task_dir(&path);
    }
}

fn create_private_dir(dir: &Path) -> Result<(), Error> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let failed = |source| Error::Dir { path: dir.to_path_buf(), source };
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(failed)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(failed)
}
