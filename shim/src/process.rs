//! A process of a container: its init process (exec id "") or one exec'd into it. Its stdio, its
//! status as containerd sees it, its pid, and its exit, recorded once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::types::task::Status;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::warn;

#[derive(Debug, Clone, PartialEq)]
pub struct Exit {
    pub status: u32,
    pub at: Timestamp,
}

/// Where containerd wants the process's stdio (FIFO paths or URIs).
#[derive(Debug, Clone, Default)]
pub struct StdioUris {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

pub struct Process {
    pub exec_id: String,
    pub stdio: StdioUris,
    /// The OCI process of an exec, as JSON; empty for the init process.
    pub exec_spec: String,
    pid: Mutex<u32>,
    status: Mutex<Status>,
    exit: watch::Sender<Option<Exit>>,
    /// Notified by CloseIO: the stdin relay passes on what is left and closes the process's stdin.
    pub close_stdin: Arc<Notify>,
    outputs: tokio::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl Process {
    pub fn new(exec_id: &str, stdio: StdioUris, exec_spec: String) -> Arc<Self> {
        Arc::new(Process {
            exec_id: exec_id.to_string(),
            stdio,
            exec_spec,
            pid: Mutex::new(0),
            status: Mutex::new(Status::CREATED),
            exit: watch::channel(None).0,
            close_stdin: Arc::new(Notify::new()),
            outputs: tokio::sync::Mutex::new(Vec::new()),
        })
    }

    pub fn is_init(&self) -> bool {
        self.exec_id.is_empty()
    }

    /// The pid in the guest (0 until started).
    pub fn pid(&self) -> u32 {
        self.pid.lock().map(|p| *p).unwrap_or_default()
    }

    pub fn set_pid(&self, pid: u32) {
        if let Ok(mut p) = self.pid.lock() {
            *p = pid;
        }
    }

    pub fn status(&self) -> Status {
        if self.exit.borrow().is_some() {
            return Status::STOPPED;
        }
        self.status.lock().map(|s| *s).unwrap_or(Status::UNKNOWN)
    }

    pub fn set_status(&self, status: Status) {
        if let Ok(mut s) = self.status.lock() {
            *s = status;
        }
    }

    pub fn is_running(&self) -> bool {
        matches!(self.status(), Status::RUNNING | Status::PAUSED)
    }

    pub fn exited(&self) -> Option<Exit> {
        self.exit.borrow().clone()
    }

    /// Records the exit unless one was recorded already; returns it if this call recorded it.
    pub fn record_exit(&self, status: u32) -> Option<Exit> {
        let exit = Exit { status, at: Timestamp::now() };
        let mut recorded = false;
        self.exit.send_if_modified(|slot| {
            if slot.is_some() {
                return false;
            }
            *slot = Some(exit.clone());
            recorded = true;
            true
        });
        recorded.then_some(exit)
    }

    /// Waits until the exit is recorded.
    pub async fn wait(&self) -> Exit {
        let mut exit = self.exit.subscribe();
        loop {
            if let Some(exit) = exit.borrow_and_update().clone() {
                return exit;
            }
            // The sender lives as long as the process: the channel cannot close while we wait.
            if exit.changed().await.is_err() {
                return Exit { status: crate::service::VM_GONE_EXIT_STATUS, at: Timestamp::now() };
            }
        }
    }

    pub async fn add_outputs(&self, relays: Vec<JoinHandle<()>>) {
        self.outputs.lock().await.extend(relays);
    }

    /// Lets the output relays pass on what the process printed before it exited, for at most
    /// `deadline`: a guest that never ends a stream cannot hold the exit back. Relays still
    /// running then are stopped.
    pub async fn drain_outputs(&self, deadline: Duration) {
        let relays: Vec<JoinHandle<()>> = self.outputs.lock().await.drain(..).collect();
        let aborts: Vec<_> = relays.iter().map(JoinHandle::abort_handle).collect();
        let all = async {
            for relay in relays {
                let _ = relay.await;
            }
        };
        if tokio::time::timeout(deadline, all).await.is_err() {
            warn!("output of process {:?} still flowing {deadline:?} after its exit: cut off", self.exec_id);
            for abort in aborts {
                abort.abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_exit_is_the_one_recorded() {
        let process = Process::new("", StdioUris::default(), String::new());
        process.set_status(Status::RUNNING);
        assert!(process.is_running());
        let waiter = {
            let process = process.clone();
            tokio::spawn(async move { process.wait().await })
        };
        assert_eq!(process.record_exit(3).map(|e| e.status), Some(3));
        assert_eq!(process.record_exit(137), None);
        assert_eq!(waiter.await.unwrap().status, 3);
        assert_eq!(process.status(), Status::STOPPED);
        assert_eq!(process.exited().unwrap().status, 3);
    }

    #[tokio::test]
    async fn output_that_never_ends_is_cut_off_at_the_deadline() {
        let process = Process::new("", StdioUris::default(), String::new());
        let endless = tokio::spawn(std::future::pending::<()>());
        let quick = tokio::spawn(async {});
        process.add_outputs(vec![endless, quick]).await;
        let started = std::time::Instant::now();
        process.drain_outputs(Duration::from_millis(200)).await;
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
