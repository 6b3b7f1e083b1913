//! A private ironclad-pool beside a private containerd (`containerd::Containerd`): the pool
//! tests' and the warm-start benchmark's. It reads the containerd's shim config (the same guest,
//! run root and socket its shims use) with its own size.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::containerd::Containerd;

/// How long a pooled VM may take to boot (QEMU TCG here, a second or two; far more under load).
pub const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the pool gets to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot {action}")]
    Io {
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("ironclad-pool did not come {what} within {waited:?}; its log:\n{log}")]
    Timeout { what: String, waited: Duration, log: String },
}

/// A running ironclad-pool; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct PoolDaemon {
    pub child: Child,
    log: PathBuf,
    /// `<run root>/.pool`, where its VMs live.
    pub dir: PathBuf,
    pub socket: PathBuf,
}

impl PoolDaemon {
    /// Starts `ironclad-pool` from `program` for `containerd`'s shims, keeping `size` VMs and
    /// refilling without a CPU budget; returns once it listens.
    pub fn start(program: &std::path::Path, containerd: &Containerd, size: u32) -> Result<PoolDaemon, Error> {
        static STARTS: AtomicUsize = AtomicUsize::new(0);
        let start = STARTS.fetch_add(1, Ordering::SeqCst);
        let io = |action| move |source| Error::Io { action, source };
        let config = containerd.dir().join(format!("pool-{start}.toml"));
        let shim_config =
            std::fs::read_to_string(&containerd.shim_config).map_err(io("read the shim config"))?;
        let socket = containerd.pool_socket();
        let table = format!("pool = {{ socket = \"{}\" }}", socket.display());
        let sized = format!(
            "pool = {{ socket = \"{}\", size = {size}, refill_cpu_percent = 100 }}",
            socket.display()
        );
        if !shim_config.contains(&table) {
            return Err(Error::Io {
                action: "find the harness's pool table in the shim config",
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        std::fs::write(&config, shim_config.replace(&table, &sized))
            .map_err(io("write the pool's config"))?;
        let log = containerd.dir().join(format!("pool-{start}.log"));
        let child = Command::new(program)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).map_err(io("create the pool's log"))?)
            .spawn()
            .map_err(io("start ironclad-pool"))?;
        let pool = PoolDaemon { child, log, dir: containerd.run_root.join(".pool"), socket };
        pool.wait_for(|log| log.contains("ironclad-pool:"), "to listen")?;
        Ok(pool)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the pool's log satisfies `done`.
    pub fn wait_for(&self, done: impl Fn(&str) -> bool, what: &str) -> Result<(), Error> {
        let started = Instant::now();
        while !done(&self.log()) {
            if started.elapsed() > READY_TIMEOUT {
                return Err(Error::Timeout { what: what.into(), waited: started.elapsed(), log: self.log() });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Waits until `count` VMs have been ready in all; returns their ids in order.
    pub fn wait_ready(&self, count: usize) -> Result<Vec<String>, Error> {
        self.wait_for(|log| ready_ids(log).len() >= count, &format!("to have had {count} VMs ready"))?;
        Ok(ready_ids(&self.log()))
    }

    /// SIGTERM, then its exit status (SIGKILL after STOP_TIMEOUT).
    pub fn stop(mut self) -> Result<std::process::ExitStatus, Error> {
        self.terminate()
    }

    fn terminate(&mut self) -> Result<std::process::ExitStatus, Error> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let started = Instant::now();
        loop {
            if let Some(status) =
                self.child.try_wait().map_err(|source| Error::Io { action: "wait", source })?
            {
                return Ok(status);
            }
            if started.elapsed() > STOP_TIMEOUT {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(Error::Timeout {
                    what: "to stop".into(),
                    waited: started.elapsed(),
                    log: self.log(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PoolDaemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.terminate();
        }
    }
}

/// The ids of the VMs the pool's log says became ready, in order.
pub fn ready_ids(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|line| line.split("pooled VM ").nth(1))
        .filter(|rest| rest.contains(" ready after "))
        .filter_map(|rest| rest.split_whitespace().next().map(str::to_string))
        .collect()
}

/// The VM ids the shims of `containerd` logged taking (`warm start: took <id>`), in order.
pub fn taken_ids(containerd_log: &str) -> Vec<String> {
    containerd_log
        .lines()
        .filter(|line| line.contains("warm start: took "))
        .filter_map(|line| line.split("warm start: took ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next().map(str::to_string))
        .collect()
}
