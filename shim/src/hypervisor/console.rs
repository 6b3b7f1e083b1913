//! The guest's serial console, as the VM monitor's stdout: read line by line for the agent's ready
//! line, kept as a short tail for error messages, written to a capped log file, and the agent's
//! own log lines passed into the shim's log (which containerd keeps after the sandbox is gone),
//! named with the task. The guest writes what it likes, so every part is bounded: lines are cut at
//! MAX_LINE bytes, the tail holds TAIL_LINES of them, the log file is rotated once it reaches
//! LOG_CAP (one old file is kept), and agent lines pass at most AGENT_LINE_BURST at once, then one
//! each AGENT_LINE_INTERVAL, escaped.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::sync::oneshot;
use tracing::warn;

use super::{parse_ready_line, ReadyLine};
use crate::events::RateLimit;
use crate::guest_text;

/// The longest console line kept; the rest of a longer line is dropped and counted.
pub const MAX_LINE: usize = 4096;
pub const TAIL_LINES: usize = 40;
/// The size at which the console log is rotated to `<log>.1`.
pub const LOG_CAP: u64 = 1 << 20;
/// How many agent log lines pass into the shim's log at once, and then how often one more.
pub const AGENT_LINE_BURST: u32 = 50;
pub const AGENT_LINE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);
/// The longest agent line passed on (escaped), in bytes.
const AGENT_LINE_MAX: usize = 1024;

/// The last lines the guest printed, shared with whoever reports the VM's failure.
#[derive(Clone, Default)]
pub struct Console {
    tail: Arc<Mutex<VecDeque<String>>>,
    /// Names the sandbox in the agent's lines passed into the shim's log.
    label: Arc<str>,
}

/// A level of the agent's log (tracing's fmt output: `LEVEL target: message`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentLevel {
    Error,
    Warn,
    Info,
    Debug,
}

/// The agent's log line `line` as its level and the rest (target and message); None for anything
/// else on the console (kernel messages, the ready line).
pub fn parse_agent_line(line: &str) -> Option<(AgentLevel, &str)> {
    let trimmed = line.trim_start();
    let (level, rest) = trimmed.split_once(' ')?;
    let level = match level {
        "ERROR" => AgentLevel::Error,
        "WARN" => AgentLevel::Warn,
        "INFO" => AgentLevel::Info,
        "DEBUG" | "TRACE" => AgentLevel::Debug,
        _ => return None,
    };
    rest.starts_with("ironclad_agent").then_some((level, rest))
}

/// Passes agent lines into the shim's log within a budget; says how many it dropped.
struct AgentLines {
    limit: RateLimit,
    dropped: u64,
}

impl AgentLines {
    fn new() -> Self {
        AgentLines {
            limit: RateLimit::new(AGENT_LINE_BURST, AGENT_LINE_INTERVAL, std::time::Instant::now()),
            dropped: 0,
        }
    }

    /// The agent line to log, escaped, if `line` is one and the budget allows it.
    fn admit(&mut self, line: &str, now: std::time::Instant) -> Option<(AgentLevel, String)> {
        let (level, text) = parse_agent_line(line)?;
        if !self.limit.allow(now) {
            self.dropped += 1;
            return None;
        }
        Some((level, guest_text::escape(text, AGENT_LINE_MAX)))
    }

    fn pass(&mut self, label: &str, line: &str) {
        let dropped_before = self.dropped;
        let Some((level, text)) = self.admit(line, std::time::Instant::now()) else {
            if self.dropped != dropped_before && self.dropped.is_power_of_two() {
                warn!("guest agent ({label}): {} lines dropped: more than the guest may log", self.dropped);
            }
            return;
        };
        match level {
            AgentLevel::Error => tracing::error!("guest agent ({label}): {text}"),
            AgentLevel::Warn => tracing::warn!("guest agent ({label}): {text}"),
            AgentLevel::Info => tracing::info!("guest agent ({label}): {text}"),
            AgentLevel::Debug => tracing::debug!("guest agent ({label}): {text}"),
        }
    }
}

impl Console {
    /// A console whose agent lines are passed on named `label` (the task id).
    pub fn labelled(label: &str) -> Self {
        Console { label: label.into(), ..Default::default() }
    }

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
        let mut agent_lines = AgentLines::new();
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
                agent_lines.pass(&self.label, &finished);
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

    #[test]
    fn agent_log_lines_are_told_from_the_rest_of_the_console() {
        let line = " WARN ironclad_agent::server: container c1: CreateContainer failed: no such disk";
        let (level, text) = parse_agent_line(line).unwrap();
        assert_eq!(level, AgentLevel::Warn);
        assert!(text.starts_with("ironclad_agent::server: container c1"), "{text}");
        assert_eq!(parse_agent_line("ERROR ironclad_agent: fatal").unwrap().0, AgentLevel::Error);
        for other in [
            "[    0.412345] virtio_blk virtio0: [vda] 8192 512-byte logical blocks",
            "ironclad-agent ready version=0.1.0 uptime_ms=812",
            " WARN libcontainer::process: not the agent",
            "WARNING ironclad_agent: not a level",
            "",
        ] {
            assert!(parse_agent_line(other).is_none(), "{other:?}");
        }
    }

    #[test]
    fn a_guest_flooding_its_log_gets_a_burst_through_and_its_words_escaped() {
        let mut lines = AgentLines::new();
        let now = std::time::Instant::now();
        let admitted = (0..1000)
            .filter_map(|i| lines.admit(&format!(" ERROR ironclad_agent: line {i}\x1b[2J"), now))
            .collect::<Vec<_>>();
        assert_eq!(admitted.len(), AGENT_LINE_BURST as usize);
        assert_eq!(lines.dropped, 1000 - u64::from(AGENT_LINE_BURST));
        assert!(!admitted[0].1.contains('\x1b'), "escape sequences reach no log: {:?}", admitted[0].1);
        let later = now + AGENT_LINE_INTERVAL;
        assert!(lines.admit(" INFO ironclad_agent: again", later).is_some(), "the budget refills");
    }
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
