//! The guest's serial console, as the VM monitor's stdout: read line by line for the agent's ready
//! line, kept as a short tail for error messages, and written to a capped log file. The guest
//! writes what it likes, so every part is bounded: lines are cut at MAX_LINE bytes, the tail holds
//! TAIL_LINES of them, and the log file is rotated once it reaches LOG_CAP (one old file is kept).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::sync::oneshot;
use tracing::warn;

use super::{parse_ready_line, ReadyLine};

/// The longest console line kept; the rest of a longer line is dropped and counted.
pub const MAX_LINE: usize = 4096;
pub const TAIL_LINES: usize = 40;
/// The size at which the console log is rotated to `<log>.1`.
pub const LOG_CAP: u64 = 1 << 20;

/// The last lines the guest printed, shared with whoever reports the VM's failure.
#[derive(Clone, Default)]
pub struct Console {
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl Console {
    /// Reads the console until it closes. The first ready line goes to `ready`.
    pub async fn follow<R: AsyncRead + Unpin>(
        &self,
        output: R,
        log_path: &Path,
        ready: oneshot::Sender<ReadyLine>,
    ) {
        let mut log = ConsoleLog::create(log_path).await;
        let mut ready = Some(ready);
        let mut reader = BufReader::new(output);
        let mut line = LineCutter::default();
        loop {
            let buf = match reader.fill_buf().await {
                Ok([]) | Err(_) => break,
                Ok(buf) => buf,
            };
            let taken = buf.len();
            for finished in line.feed(buf) {
                if let Some(log) = log.as_mut() {
                    log.write_line(&finished).await;
                }
                if let Some(ready_line) = parse_ready_line(&finished) {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(ready_line);
                    }
                }
                self.remember(finished);
            }
            reader.consume(taken);
        }
        if let Some(last) = line.finish() {
            if let Some(log) = log.as_mut() {
                log.write_line(&last).await;
            }
            self.remember(last);
        }
        if let Some(log) = log.as_mut() {
            log.flush().await;
        }
    }

    fn remember(&self, line: String) {
        if let Ok(mut tail) = self.tail.lock() {
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }

    /// The last lines, as the guest wrote them (cut, not escaped: escape before logging).
    pub fn tail(&self) -> String {
        self.tail.lock().map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n")).unwrap_or_default()
    }
}

/// Splits a byte stream into lines of at most MAX_LINE bytes; the excess of a longer line is
/// dropped and noted at its end.
#[derive(Default)]
struct LineCutter {
    line: Vec<u8>,
    dropped: usize,
}

impl LineCutter {
    fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut finished = Vec::new();
        for piece in bytes.split_inclusive(|b| *b == b'\n') {
            let (text, ends_line) = match piece.strip_suffix(b"\n") {
                Some(text) => (text, true),
                None => (piece, false),
            };
            let room = MAX_LINE.saturating_sub(self.line.len());
            let kept = text.len().min(room);
            self.line.extend_from_slice(&text[..kept]);
            self.dropped += text.len() - kept;
            if ends_line {
                finished.push(self.take());
            }
        }
        finished
    }

    fn take(&mut self) -> String {
        let mut text = String::from_utf8_lossy(&self.line).trim_end_matches('\r').to_string();
        if self.dropped > 0 {
            text.push_str(&format!("…({} more bytes cut)", self.dropped));
        }
        self.line.clear();
        self.dropped = 0;
        text
    }

    /// What is left when the console closes in the middle of a line.
    fn finish(&mut self) -> Option<String> {
        (!self.line.is_empty() || self.dropped > 0).then(|| self.take())
    }
}

/// The console log file: private to root, rotated at LOG_CAP so a guest cannot fill the disk.
struct ConsoleLog {
    path: PathBuf,
    file: tokio::fs::File,
    written: u64,
}

impl ConsoleLog {
    async fn create(path: &Path) -> Option<Self> {
        match open_private(path).await {
            Ok(file) => Some(ConsoleLog { path: path.to_path_buf(), file, written: 0 }),
            Err(err) => {
                warn!("cannot write the console log {}: {err}", path.display());
                None
            }
        }
    }

    async fn write_line(&mut self, line: &str) {
        let bytes = line.len() as u64 + 1;
        if self.written + bytes > LOG_CAP && self.written > 0 {
            self.rotate().await;
        }
        let mut record = Vec::with_capacity(line.len() + 1);
        record.extend_from_slice(line.as_bytes());
        record.push(b'\n');
        if self.file.write_all(&record).await.is_ok() {
            self.written += bytes;
        }
    }

    async fn rotate(&mut self) {
        let _ = self.file.flush().await;
        let old = rotated_path(&self.path);
        if let Err(err) = tokio::fs::rename(&self.path, &old).await {
            warn!("cannot rotate the console log {}: {err}", self.path.display());
        }
        match open_private(&self.path).await {
            Ok(file) => self.file = file,
            Err(err) => warn!("cannot reopen the console log {}: {err}", self.path.display()),
        }
        self.written = 0;
    }

    async fn flush(&mut self) {
        let _ = self.file.flush().await;
    }
}

/// Where the console log goes when it is rotated.
pub fn rotated_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

async fn open_private(path: &Path) -> std::io::Result<tokio::fs::File> {
    tokio::fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(path).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn lines_are_cut_and_the_cut_is_noted() {
        let mut cutter = LineCutter::default();
        assert_eq!(cutter.feed(b"hello\r\nwor"), vec!["hello".to_string()]);
        assert_eq!(cutter.feed(b"ld\n"), vec!["world".to_string()]);
        let long = vec![b'x'; MAX_LINE + 10];
        assert!(cutter.feed(&long).is_empty());
        let lines = cutter.feed(b"yy\nrest");
        assert_eq!(lines.len(), 1);
        assert!(lines[0].starts_with(&"x".repeat(MAX_LINE)));
        assert!(lines[0].ends_with("…(12 more bytes cut)"), "{}", &lines[0][MAX_LINE..]);
        assert_eq!(cutter.finish(), Some("rest".to_string()));
        assert_eq!(cutter.finish(), None);
    }

    #[tokio::test]
    async fn a_guest_writing_64_mib_without_a_newline_costs_neither_memory_nor_disk() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let console = Console::default();
        let (ready_tx, _ready_rx) = oneshot::channel();
        let flood = tokio::io::repeat(b'A').take(64 << 20);
        console.follow(flood, &log, ready_tx).await;
        let tail = console.tail();
        assert!(tail.len() <= MAX_LINE + 64, "the tail holds {} bytes", tail.len());
        assert!(std::fs::metadata(&log).unwrap().len() <= LOG_CAP);
    }

    #[tokio::test]
    async fn a_guest_writing_many_lines_fills_at_most_two_log_files() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let console = Console::default();
        let (ready_tx, ready_rx) = oneshot::channel();
        let mut text = "a short line of console output\n".repeat(200_000).into_bytes();
        text.extend_from_slice(b"ironclad-agent ready version=0.1.0 uptime_ms=5\nlast words\n");
        console.follow(&text[..], &log, ready_tx).await;
        assert_eq!(ready_rx.await.unwrap().uptime_ms, 5);
        let current = std::fs::read_to_string(&log).unwrap();
        assert!(current.ends_with("last words\n"));
        assert!(current.len() as u64 <= LOG_CAP);
        assert!(std::fs::metadata(rotated_path(&log)).unwrap().len() <= LOG_CAP);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&log).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(console.tail().lines().count(), TAIL_LINES);
    }
}
