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
    #[error("{stream} URI {uri:?} is not supported: ironclad takes FIFO paths and file:// URIs")]
    UnsupportedUri { stream: &'static str, uri: String },
}

/// Where containerd wants a stream to go (or come from).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    None,
    Fifo(PathBuf),
    File(PathBuf),
}

pub fn parse_endpoint(stream: &'static str, uri: &str) -> Result<Endpoint, Error> {
    if uri.is_empty() {
        return Ok(Endpoint::None);
    }
    if let Some(path) = uri.strip_prefix("file://") {
        return Ok(Endpoint::File(PathBuf::from(path)));
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
    }
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
        Endpoint::File(_) => Err(Error::UnsupportedUri { stream: "stdin", uri: uri.to_string() }),
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
    // What containerd wrote before CloseIO is already in the FIFO.
    while let Ok(n) = source.try_read(&mut buf) {
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
        let err = parse_endpoint("stdout", "binary:///usr/bin/logger?x=1").unwrap_err();
        assert!(err.to_string().contains("binary:///usr/bin/logger"), "{err}");
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
