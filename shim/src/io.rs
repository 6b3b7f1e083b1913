//! A process's stdio between containerd and the agent: containerd names FIFOs (or `file://` log
//! URIs); the shim copies their bytes to and from the agent's stdio calls.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{watch, Notify};
use tracing::{debug, warn};

use crate::agent_client::AgentClient;

const STDIN_CHUNK: usize = 32 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open {path} for the process's {stream}")]
    Open {
        stream: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{stream} URI {uri:?} is not supported: ironclad takes FIFO paths, file:// and binary:// URIs")]
    UnsupportedUri { stream: &'static str, uri: String },
    #[error("cannot start the logging binary {path}")]
    Logger {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the logging binary {path} did not signal ready within {waited:?}")]
    LoggerNotReady { path: PathBuf, waited: std::time::Duration },
}

/// Where containerd wants a stream to go (or come from).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    None,
    Fifo(PathBuf),
    File(PathBuf),
    /// containerd's logging binary: `binary:///path?key=value&flag`, run with stdout on fd 3,
    /// stderr on fd 4 and a readiness pipe on fd 5, as containerd's own shims do.
    Binary {
        path: PathBuf,
        args: Vec<String>,
    },
}

pub fn parse_endpoint(stream: &'static str, uri: &str) -> Result<Endpoint, Error> {
    if uri.is_empty() {
        return Ok(Endpoint::None);
    }
    if let Some(path) = uri.strip_prefix("file://") {
        return Ok(Endpoint::File(PathBuf::from(path)));
    }
    if let Some(rest) = uri.strip_prefix("binary://") {
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        // Each query parameter becomes the argument `key`, then `value` if it has one.
        let args = query
            .split('&')
            .filter(|p| !p.is_empty())
            .flat_map(|pair| match pair.split_once('=') {
                Some((key, value)) => vec![key.to_string(), value.to_string()],
                None => vec![pair.to_string()],
            })
            .collect();
        return Ok(Endpoint::Binary { path: PathBuf::from(path), args });
    }
    if let Some(path) = uri.strip_prefix("fifo://") {
        return Ok(Endpoint::Fifo(PathBuf::from(path)));
    }
    if uri.starts_with('/') {
        return Ok(Endpoint::Fifo(PathBuf::from(uri)));
    }
    Err(Error::UnsupportedUri { stream, uri: uri.to_string() })
}

type Sink = Box<dyn AsyncWrite + Send + Unpin>;

/// Opens an output endpoint. A FIFO is opened read-write so that the open never fails or blocks
/// for want of a reader (containerd's reader may come a moment later).
pub async fn open_output(stream: &'static str, uri: &str) -> Result<Option<Sink>, Error> {
    let open_err = |path: &PathBuf| {
        let path = path.clone();
        move |source| Error::Open { stream, path, source }
    };
    match parse_endpoint(stream, uri)? {
        Endpoint::None => Ok(None),
        Endpoint::Fifo(path) => {
            let sender =
                pipe::OpenOptions::new().read_write(true).open_sender(&path).map_err(open_err(&path))?;
            Ok(Some(Box::new(sender)))
        }
        Endpoint::File(path) => {
            if let Some(dir) = path.parent() {
                tokio::fs::create_dir_all(dir).await.map_err(open_err(&path))?;
            }
            let file = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .await
                .map_err(open_err(&path))?;
            Ok(Some(Box::new(file)))
        }
        Endpoint::Binary { .. } => Err(Error::UnsupportedUri { stream, uri: uri.to_string() }),
    }
}

/// How long a logging binary may take to close its readiness pipe.
const LOGGER_READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A started logging binary: where the process's stdout and stderr go, and the binary itself, which
/// exits once both are closed.
pub struct BinaryLogger {
    pub stdout: Sink,
    pub stderr: Sink,
    pub child: tokio::process::Child,
}

/// Starts containerd's logging binary for a process of container `id` in `namespace`.
pub async fn start_binary_logger(
    path: &std::path::Path,
    args: &[String],
    id: &str,
    namespace: &str,
) -> Result<BinaryLogger, Error> {
    use std::os::fd::{AsRawFd, OwnedFd};
    let err = |source| Error::Logger { path: path.to_path_buf(), source };
    let pipe = || -> std::io::Result<(OwnedFd, OwnedFd)> {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)
    };
    let (out_r, out_w) = pipe().map_err(err)?;
    let (err_r, err_w) = pipe().map_err(err)?;
    let (ready_r, ready_w) = pipe().map_err(err)?;
    let child_fds = [out_r.as_raw_fd(), err_r.as_raw_fd(), ready_w.as_raw_fd()];
    let mut command = tokio::process::Command::new(path);
    command
        .args(args)
        .env("CONTAINER_ID", id)
        .env("CONTAINER_NAMESPACE", namespace)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(false);
    // SAFETY: the closure runs in the forked child before exec and only calls fcntl and dup2,
    // which are async-signal-safe; the descriptors it copies are open in the parent until spawn
    // returns.
    unsafe {
        command.pre_exec(move || {
            // Copied out of the way first: a source may itself be 3, 4 or 5, which a direct dup2
            // would overwrite (or leave close-on-exec).
            let mut high = [0; 3];
            for (slot, fd) in high.iter_mut().zip(child_fds) {
                *slot = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
                if *slot < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (target, fd) in (3..).zip(high) {
                if libc::dup2(fd, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = command.spawn().map_err(err)?;
    drop((out_r, err_r, ready_w));
    let mut ready = pipe::Receiver::from_owned_fd(ready_r).map_err(err)?;
    let mut sink = Vec::new();
    match tokio::time::timeout(LOGGER_READY_TIMEOUT, ready.read_to_end(&mut sink)).await {
        Ok(Ok(_)) => {}
        Ok(Err(source)) => return Err(err(source)),
        Err(_) => {
            return Err(Error::LoggerNotReady { path: path.to_path_buf(), waited: LOGGER_READY_TIMEOUT })
        }
    }
    Ok(BinaryLogger {
        stdout: Box::new(pipe::Sender::from_owned_fd(out_w).map_err(err)?),
        stderr: Box::new(pipe::Sender::from_owned_fd(err_w).map_err(err)?),
        child,
    })
}

/// Opens the stdin FIFO read-write: it then never reports end-of-file by itself; containerd ends
/// stdin with CloseIO.
pub fn open_input(uri: &str) -> Result<Option<pipe::Receiver>, Error> {
    match parse_endpoint("stdin", uri)? {
        Endpoint::None => Ok(None),
        Endpoint::Fifo(path) => pipe::OpenOptions::new()
            .read_write(true)
            .open_receiver(&path)
            .map(Some)
            .map_err(|source| Error::Open { stream: "stdin", path, source }),
        Endpoint::File(_) | Endpoint::Binary { .. } => {
            Err(Error::UnsupportedUri { stream: "stdin", uri: uri.to_string() })
        }
    }
}

/// Which process of which container a relay serves.
#[derive(Clone)]
pub struct ProcessIo {
    pub agent: AgentClient,
    pub container_id: String,
    pub exec_id: String,
    /// Becomes true when the VM is gone: every relay stops then.
    pub vm_gone: watch::Receiver<bool>,
}

async fn vm_gone(mut gone: watch::Receiver<bool>) {
    let _ = gone.wait_for(|gone| *gone).await;
}

/// Copies the process's stdout (or stderr) to `sink` until the stream ends or the VM is gone.
pub async fn relay_output(io: ProcessIo, stderr: bool, mut sink: Sink) {
    let name = if stderr { "stderr" } else { "stdout" };
    loop {
        let chunk = tokio::select! {
            chunk = io.agent.read_output(&io.container_id, &io.exec_id, stderr) => chunk,
            _ = vm_gone(io.vm_gone.clone()) => break,
        };
        match chunk {
            Ok(data) if data.is_empty() => break,
            Ok(data) => {
                if let Err(err) = sink.write_all(&data).await {
                    warn!("{name} of {}/{}: cannot write to containerd: {err}", io.container_id, io.exec_id);
                    break;
                }
            }
            Err(err) => {
                debug!(
                    "{name} of {}/{}: {}",
                    io.container_id,
                    io.exec_id,
                    crate::hypervisor::error_chain(&err)
                );
                break;
            }
        }
    }
    let _ = sink.flush().await;
}

/// Copies containerd's stdin to the process until `close` is notified (CloseIO), then passes on
/// what was already written and closes the process's stdin.
pub async fn relay_input(io: ProcessIo, mut source: pipe::Receiver, close: Arc<Notify>) {
    let mut buf = vec![0u8; STDIN_CHUNK];
    loop {
        let read = tokio::select! {
            read = source.read(&mut buf) => read,
            _ = close.notified() => break,
            _ = vm_gone(io.vm_gone.clone()) => return,
        };
        match read {
            Ok(0) => break,
            Ok(n) => {
                if io.agent.write_stdin(&io.container_id, &io.exec_id, &buf[..n]).await.is_err() {
                    return;
                }
            }
            Err(err) => {
                warn!("stdin of {}/{}: {err}", io.container_id, io.exec_id);
                break;
            }
        }
    }
    // What containerd wrote before CloseIO is already in the FIFO, though the reactor may not have
    // seen it yet (tokio's try_read answers from what the reactor saw): read the pipe itself.
    while let Ok(n) = read_now(&source, &mut buf) {
        if n == 0 || io.agent.write_stdin(&io.container_id, &io.exec_id, &buf[..n]).await.is_err() {
            break;
        }
    }
    if let Err(err) = io.agent.close_stdin(&io.container_id, &io.exec_id).await {
        debug!(
            "closing stdin of {}/{}: {}",
            io.container_id,
            io.exec_id,
            crate::hypervisor::error_chain(&err)
        );
    }
}

/// One read(2) on the (non-blocking) FIFO: what is in it now, 0 at its end, WouldBlock when empty.
fn read_now(source: &pipe::Receiver, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    nix::unistd::read(source.as_raw_fd(), buf).map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_fifos_files_or_nothing() {
        assert_eq!(parse_endpoint("stdout", "").unwrap(), Endpoint::None);
        assert_eq!(
            parse_endpoint("stdout", "/run/fifo/1-stdout").unwrap(),
            Endpoint::Fifo("/run/fifo/1-stdout".into())
        );
        assert_eq!(
            parse_endpoint("stdout", "file:///var/log/c.log").unwrap(),
            Endpoint::File("/var/log/c.log".into())
        );
        assert_eq!(
            parse_endpoint("stdout", "binary:///usr/bin/logger?--tag=web&-v").unwrap(),
            Endpoint::Binary {
                path: "/usr/bin/logger".into(),
                args: vec!["--tag".into(), "web".into(), "-v".into()]
            }
        );
        let err = parse_endpoint("stdout", "syslog://x").unwrap_err();
        assert!(err.to_string().contains("syslog://x"), "{err}");
    }

    #[tokio::test]
    async fn a_logging_binary_gets_both_streams_and_the_container_id() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("log");
        // A logger in sh: signal ready by closing fd 5, then copy fds 3 and 4 to a file.
        let script = format!(
            "exec 5>&-; echo \"$CONTAINER_ID/$CONTAINER_NAMESPACE $1\" > {0}; cat <&3 >> {0}; cat <&4 >> {0}",
            out.display()
        );
        let logger = dir.path().join("logger.sh");
        std::fs::write(&logger, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&logger, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let mut started = start_binary_logger(&logger, &["tag".into()], "c1", "ns1").await.unwrap();
        started.stdout.write_all(b"out\n").await.unwrap();
        started.stderr.write_all(b"err\n").await.unwrap();
        drop((started.stdout, started.stderr));
        assert!(started.child.wait().await.unwrap().success());
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "c1/ns1 tag\nout\nerr\n");
    }

    /// What is in the FIFO when CloseIO comes is read even if the reactor has not seen it yet.
    #[tokio::test]
    async fn stdin_written_just_before_close_is_read_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("stdin");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let source = open_input(fifo.to_str().unwrap()).unwrap().unwrap();
        let mut writer = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
        std::io::Write::write_all(&mut writer, b"piped in\n").unwrap();
        let mut buf = [0u8; 64];
        // No await in between: the reactor has had no chance to see the write.
        let n = read_now(&source, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"piped in\n");
        let empty = read_now(&source, &mut buf).unwrap_err();
        assert_eq!(empty.kind(), std::io::ErrorKind::WouldBlock);
    }

    #[tokio::test]
    async fn a_file_uri_is_appended_to() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/c.log");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "old\n").unwrap();
        let mut sink = open_output("stdout", &format!("file://{}", path.display())).await.unwrap().unwrap();
        sink.write_all(b"new\n").await.unwrap();
        sink.flush().await.unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old\nnew\n");
    }

    #[tokio::test]
    async fn a_fifo_opens_before_its_reader_and_delivers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let mut sink = open_output("stdout", path.to_str().unwrap()).await.unwrap().unwrap();
        let mut reader = pipe::OpenOptions::new().open_receiver(&path).unwrap();
        sink.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        reader.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
    }
}
