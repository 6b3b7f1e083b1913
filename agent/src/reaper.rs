//! Zombie reaping for PID 1: every orphan in the guest is re-parented to the agent.

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tracing::debug;

/// Reaps children on SIGCHLD and publishes each exit, so that the code which started a process can
/// learn its status even though the reaper collected it.
pub struct Reaper {
    task: JoinHandle<()>,
    exits: broadcast::Sender<WaitStatus>,
}

impl Reaper {
    /// Exits reaped from now on.
    #[cfg(test)]
    pub fn subscribe(&self) -> broadcast::Receiver<WaitStatus> {
        self.exits.subscribe()
    }

    /// The channel exits are published on, for those that subscribe later.
    pub fn exits(&self) -> broadcast::Sender<WaitStatus> {
        self.exits.clone()
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn spawn() -> Result<Reaper, crate::server::Error> {
    let mut sigchld = signal(SignalKind::child()).map_err(crate::server::Error::Signal)?;
    let (exits, _) = broadcast::channel(256);
    let publisher = exits.clone();
    let task = tokio::spawn(async move {
        // Reap once before waiting: children may have exited before the handler was installed.
        loop {
            reap_all(&publisher);
            if sigchld.recv().await.is_none() {
                break;
            }
        }
    });
    Ok(Reaper { task, exits })
}

fn reap_all(publisher: &broadcast::Sender<WaitStatus>) {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
            Ok(status) => {
                debug!("reaped {status:?}");
                // Nobody listening is normal for orphans.
                let _ = publisher.send(status);
            }
            Err(Errno::EINTR) => continue,
            Err(err) => {
                debug!("waitpid failed: {err}");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    #[allow(clippy::zombie_processes)] // reaping it is the reaper's job, which this test checks
    async fn reaps_an_exited_child_and_publishes_its_status() {
        let reaper = spawn().unwrap();
        let mut exits = reaper.subscribe();
        let child = std::process::Command::new("sh").args(["-c", "exit 7"]).spawn().unwrap();
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap());
        let status = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                match exits.recv().await.unwrap() {
                    status @ WaitStatus::Exited(p, _) if p == pid => return status,
                    _ => continue,
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(status, WaitStatus::Exited(pid, 7));
    }
}
