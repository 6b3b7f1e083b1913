//! The host side of hybrid vsock: the listening Unix socket, `CONNECT` handshakes, and the
//! connections, multiplexed onto the device's queues.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Instant;

use event_manager::{EventOps, Events};
use vmm_sys_util::epoll::EventSet;

use super::connection::{Connection, Control, State};
use super::{
    FIRST_LOCAL_PORT, HOST_CID, MAX_CONNECTIONS, MAX_CONNECT_LINE, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE,
    OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on the hybrid vsock socket {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// (host port, guest port).
pub type ConnKey = (u32, u32);

/// A packet's header fields, as the muxer needs them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

/// What to put in the next rx buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outgoing {
    /// A control packet (op, flags) for (host port, guest port).
    Control { key: ConnKey, op: u16, flags: u32, fwd_cnt: u32 },
    /// Host data for a connection: read it into the buffer.
    Data { key: ConnKey },
}

struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    since: Instant,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub host_connections: u64,
    pub guest_connections: u64,
    pub refused: u64,
    pub resets_sent: u64,
    /// Resets for unknown connections not sent because MAX_ORPHAN_RESETS were already queued.
    pub resets_dropped: u64,
    pub bad_handshakes: u64,
}

pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    handshakes: HashMap<RawFd, Handshake>,
    conns: HashMap<ConnKey, Connection>,
    by_fd: HashMap<RawFd, ConnKey>,
    /// Host streams known to have data (or EOF) waiting, so epoll need not be asked again.
    readable: HashMap<ConnKey, bool>,
    /// Resets for packets that matched no connection: (host port, guest port), at most
    /// MAX_ORPHAN_RESETS: a guest that posts no rx buffers cannot grow it.
    orphan_resets: VecDeque<ConnKey>,
    /// Whether an orphan reset goes before the connections' packets next time: the two take
    /// turns, so a guest flooding ports nobody listens on cannot hold back the host's connections
    /// (the agent's among them), nor they its resets.
    orphan_reset_turn: bool,
    /// Connections to drop at the next reconcile (a set: a guest repeating RST adds nothing).
    to_remove: Vec<ConnKey>,
    /// Streams to close once they are out of epoll: closing first would let a new fd with the
    /// same number inherit a stale registration.
    graveyard: Vec<UnixStream>,
    next_local_port: u32,
    /// Interest registered with the event loop, per fd.
    registered: HashMap<RawFd, EventSet>,
    /// The guest gave us no rx buffer last time: do not read host streams until it does.
    pub rx_starved: bool,
    /// Connections plus pending handshakes allowed at once.
    max_connections: usize,
    pub counts: Counts,
}

impl Muxer {
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, Error> {
        let listen_err = |source| Error::Listen { path: uds_path.into(), source };
        let listener = UnixListener::bind(uds_path).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        Ok(Muxer {
            guest_cid,
            uds_path: uds_path.into(),
            listener,
            handshakes: HashMap::new(),
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            readable: HashMap::new(),
            orphan_resets: VecDeque::new(),
            orphan_reset_turn: false,
            to_remove: Vec::new(),
            graveyard: Vec::new(),
            next_local_port: FIRST_LOCAL_PORT,
            registered: HashMap::new(),
            rx_starved: false,
            max_connections: MAX_CONNECTIONS,
            counts: Counts::default(),
        })
    }

    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Dispatches an event on one of the muxer's fds; false if the fd is not the muxer's.
    pub fn handle_event(&mut self, fd: RawFd, events: EventSet) -> bool {
        if fd == self.listener.as_raw_fd() {
            self.accept_all();
        } else if self.handshakes.contains_key(&fd) {
            self.advance_handshake(fd);
        } else if let Some(key) = self.by_fd.get(&fd).copied() {
            if events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR)
            {
                self.readable.insert(key, true);
            }
            if events.contains(EventSet::OUT) {
                self.flush(key);
            }
        } else {
            return false;
        }
        true
    }

    fn is_full(&self) -> bool {
        self.conns.len() + self.handshakes.len() >= self.max_connections
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) if self.is_full() => {
                    self.counts.refused += 1;
                    // Closed at once: the client sees EOF instead of an OK.
                    drop(stream);
                }
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_ok() {
                        self.handshakes.insert(
                            stream.as_raw_fd(),
                            Handshake { stream, line: Vec::new(), since: Instant::now() },
                        );
                    }
                }
                Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
        }
    }

    /// Reads the `CONNECT <port>\n` line a byte at a time: what follows it belongs to the guest.
    fn advance_handshake(&mut self, fd: RawFd) {
        let Some(handshake) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        let outcome = loop {
            match handshake.stream.read(&mut byte) {
                Ok(0) => break Err(()),
                Ok(_) => {
                    handshake.line.push(byte[0]);
                    if byte[0] == b'\n' {
                        break Ok(Some(handshake.line.clone()));
                    }
                    if handshake.line.len() >= MAX_CONNECT_LINE {
                        break Err(());
                    }
                }
                Err(err) if err.kind() == ErrorKind::WouldBlock => break Ok(None),
                Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break Err(()),
            }
        };
        match outcome {
            Ok(None) => {}
            Ok(Some(line)) => {
                let Some(handshake) = self.handshakes.remove(&fd) else {
                    return;
                };
                match parse_connect_line(&line) {
                    Some(port) => self.open_host_connection(handshake.stream, port),
                    None => {
                        self.counts.bad_handshakes += 1;
                        self.graveyard.push(handshake.stream);
                    }
                }
            }
            Err(()) => {
                if let Some(handshake) = self.handshakes.remove(&fd) {
                    self.graveyard.push(handshake.stream);
                }
                self.counts.bad_handshakes += 1;
            }
        }
    }

    fn allocate_local_port(&mut self) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self.next_local_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|(local, _)| *local == port) {
                return port;
            }
        }
    }

    fn open_host_connection(&mut self, stream: UnixStream, guest_port: u32) {
        let local = self.allocate_local_port();
        let mut conn = Connection::new(stream, local, guest_port, State::AwaitingResponse);
        conn.owe(Control::Request);
        self.insert(conn);
        self.counts.host_connections += 1;
    }

    fn insert(&mut self, conn: Connection) {
        let key = (conn.local_port, conn.peer_port);
        self.by_fd.insert(conn.stream.as_raw_fd(), key);
        self.conns.insert(key, conn);
    }

    /// A packet the guest sent on its tx queue.
    pub fn handle_guest_packet(&mut self, header: &Header, data: &[u8]) {
        if header.dst_cid != HOST_CID || header.src_cid != self.guest_cid || header.type_ != TYPE_STREAM {
            if header.op != OP_RST {
                self.queue_orphan_reset((header.dst_port, header.src_port));
            }
            return;
        }
        let key = (header.dst_port, header.src_port);
        if header.op == OP_REQUEST {
            return self.open_guest_connection(header);
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if header.op != OP_RST {
                self.queue_orphan_reset(key);
            }
            return;
        };
        conn.update_peer_credit(header.buf_alloc, header.fwd_cnt);
        match header.op {
            OP_RESPONSE if conn.state() == State::AwaitingResponse => {
                conn.set_state(State::Established);
                let ok = format!("OK {}\n", conn.local_port);
                if conn.push_to_host_unaccounted(ok.as_bytes()).is_err() {
                    self.reset(key);
                }
            }
            OP_RW if conn.state() == State::Established || conn.state() == State::Closing => {
                if conn.push_to_host(data).is_err() {
                    self.reset(key);
                }
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => conn.owe(Control::CreditUpdate),
            OP_SHUTDOWN => {
                if header.flags & SHUTDOWN_SEND != 0 {
                    let _ = conn.flush_to_host();
                    let _ = conn.stream.shutdown(std::net::Shutdown::Write);
                }
                if header.flags & (SHUTDOWN_SEND | SHUTDOWN_RCV) == SHUTDOWN_SEND | SHUTDOWN_RCV {
                    self.reset(key);
                }
            }
            OP_RST => self.remove_later(key),
            _ => self.reset(key),
        }
    }

    /// Queues an RST for a packet that matched no connection, unless the queue is full: then
    /// the guest never hears back, as when its packet is lost.
    fn queue_orphan_reset(&mut self, key: ConnKey) {
        if self.orphan_resets.len() >= super::MAX_ORPHAN_RESETS {
            self.counts.resets_dropped += 1;
        } else {
            self.orphan_resets.push_back(key);
        }
    }

    fn remove_later(&mut self, key: ConnKey) {
        if !self.to_remove.contains(&key) {
            self.to_remove.push(key);
        }
    }

    fn open_guest_connection(&mut self, header: &Header) {
        let key = (header.dst_port, header.src_port);
        if self.conns.contains_key(&key) || self.is_full() {
            self.counts.refused += 1;
            return self.queue_orphan_reset(key);
        }
        let path = PathBuf::from(format!("{}_{}", self.uds_path.display(), header.dst_port));
        let Ok(stream) = connect_nonblocking(&path) else {
            self.counts.refused += 1;
            return self.queue_orphan_reset(key);
        };
        let mut conn = Connection::new(stream, header.dst_port, header.src_port, State::Established);
        conn.update_peer_credit(header.buf_alloc, header.fwd_cnt);
        conn.owe(Control::Response);
        self.insert(conn);
        self.counts.guest_connections += 1;
    }

    /// Ends a connection: the guest gets an RST, the host stream is closed.
    fn reset(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.owe_only_reset();
        }
    }

    fn flush(&mut self, key: ConnKey) {
        let failed = self.conns.get_mut(&key).is_some_and(|c| c.flush_to_host().is_err());
        if failed {
            self.reset(key);
        }
    }

    /// Whether anything waits to go to the guest.
    pub fn has_outgoing(&self) -> bool {
        !self.orphan_resets.is_empty()
            || self.conns.iter().any(|(key, c)| c.owes_control() || self.data_ready(key, c))
    }

    fn data_ready(&self, key: &ConnKey, conn: &Connection) -> bool {
        self.readable.get(key).copied().unwrap_or(false) && conn.wants_to_send_data()
    }

    /// The next packet for the guest: orphan resets and the connections' packets (control before
    /// data) by turns while both wait.
    pub fn next_outgoing(&mut self) -> Option<Outgoing> {
        if self.orphan_reset_turn {
            if let Some(reset) = self.next_orphan_reset() {
                self.orphan_reset_turn = false;
                return Some(reset);
            }
        }
        if let Some(packet) = self.next_connection_packet() {
            self.orphan_reset_turn = true;
            return Some(packet);
        }
        self.next_orphan_reset()
    }

    fn next_orphan_reset(&mut self) -> Option<Outgoing> {
        let key = self.orphan_resets.pop_front()?;
        self.counts.resets_sent += 1;
        Some(Outgoing::Control { key, op: OP_RST, flags: 0, fwd_cnt: 0 })
    }

    fn next_connection_packet(&mut self) -> Option<Outgoing> {
        let with_control = self.conns.iter().find(|(_, c)| c.owes_control()).map(|(k, _)| *k);
        if let Some(key) = with_control {
            let conn = self.conns.get_mut(&key)?;
            let control = conn.next_owed()?;
            let (op, flags) = match control {
                Control::Request => (OP_REQUEST, 0),
                Control::Response => (OP_RESPONSE, 0),
                Control::CreditUpdate => (OP_CREDIT_UPDATE, 0),
                Control::Shutdown => (OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND),
                Control::Rst => (OP_RST, 0),
            };
            conn.mark_credit_sent();
            let fwd_cnt = conn.fwd_cnt();
            if control == Control::Rst {
                self.counts.resets_sent += 1;
                self.remove_later(key);
            }
            return Some(Outgoing::Control { key, op, flags, fwd_cnt });
        }
        let with_data = self.conns.iter().find(|(k, c)| self.data_ready(k, c)).map(|(k, _)| *k);
        with_data.map(|key| Outgoing::Data { key })
    }

    /// Reads host data of `key` for the guest. `Ok(Some(n))`: n bytes in `buf`; `Ok(None)`: nothing
    /// to send after all (the stream had nothing, or hung up, which queues a SHUTDOWN).
    pub fn read_data(&mut self, key: ConnKey, buf: &mut [u8]) -> Option<(usize, u32)> {
        let conn = self.conns.get_mut(&key)?;
        match conn.read_for_guest(buf) {
            Ok(0) if conn.host_eof => {
                self.readable.insert(key, false);
                conn.set_state(State::Closing);
                conn.owe(Control::Shutdown);
                None
            }
            Ok(0) => None,
            Ok(n) => {
                conn.mark_credit_sent();
                Some((n, conn.fwd_cnt()))
            }
            Err(err) if err.kind() == ErrorKind::WouldBlock => {
                self.readable.insert(key, false);
                None
            }
            Err(_) => {
                self.reset(key);
                None
            }
        }
    }

    /// Resets connections the guest left waiting past their timeout, and closes host clients that
    /// never sent their `CONNECT` line: neither may hold a host stream forever.
    pub fn expire(&mut self, now: Instant) {
        let expired: Vec<ConnKey> =
            self.conns.iter().filter(|(_, c)| c.expired(now)).map(|(k, _)| *k).collect();
        for key in expired {
            // The host stream goes now; the guest hears of it whenever it next offers a buffer.
            self.remove_later(key);
            self.queue_orphan_reset(key);
        }
        let stale: Vec<RawFd> = self
            .handshakes
            .iter()
            .filter(|(_, h)| now.saturating_duration_since(h.since) > super::HANDSHAKE_TIMEOUT)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in stale {
            if let Some(handshake) = self.handshakes.remove(&fd) {
                self.counts.bad_handshakes += 1;
                self.graveyard.push(handshake.stream);
            }
        }
    }

    /// Brings the event loop's interest in line with what each connection can do now, and drops
    /// the connections that are finished.
    pub fn reconcile(&mut self, ops: &mut EventOps) {
        for stream in std::mem::take(&mut self.graveyard) {
            let fd = stream.as_raw_fd();
            if self.registered.remove(&fd).is_some() {
                let _ = ops.remove(Events::empty_raw(fd));
            }
        }
        for key in std::mem::take(&mut self.to_remove) {
            if let Some(conn) = self.conns.remove(&key) {
                let fd = conn.stream.as_raw_fd();
                self.by_fd.remove(&fd);
                self.readable.remove(&key);
                if self.registered.remove(&fd).is_some() {
                    let _ = ops.remove(Events::empty_raw(fd));
                }
            }
        }
        let mut wanted: HashMap<RawFd, EventSet> = HashMap::new();
        wanted.insert(self.listener.as_raw_fd(), EventSet::IN);
        for fd in self.handshakes.keys() {
            wanted.insert(*fd, EventSet::IN);
        }
        for (key, conn) in &self.conns {
            let mut set = EventSet::empty();
            let known_readable = self.readable.get(key).copied().unwrap_or(false);
            if conn.state() == State::Established && !conn.host_eof && !known_readable && !self.rx_starved {
                set |= EventSet::IN;
            }
            if conn.has_unflushed_data() {
                set |= EventSet::OUT;
            }
            if !set.is_empty() {
                wanted.insert(conn.stream.as_raw_fd(), set);
            }
        }
        let stale: Vec<RawFd> =
            self.registered.keys().filter(|fd| !wanted.contains_key(fd)).copied().collect();
        for fd in stale {
            self.registered.remove(&fd);
            let _ = ops.remove(Events::empty_raw(fd));
        }
        for (fd, set) in wanted {
            match self.registered.get(&fd) {
                Some(current) if *current == set => {}
                Some(_) => {
                    if ops.modify(Events::with_data_raw(fd, 0, set)).is_ok() {
                        self.registered.insert(fd, set);
                    }
                }
                None => {
                    if ops.add(Events::with_data_raw(fd, 0, set)).is_ok() {
                        self.registered.insert(fd, set);
                    }
                }
            }
        }
    }

    #[cfg(test)]
    pub fn conns_stream_for_test(&self, key: ConnKey) -> &UnixStream {
        &self.conns[&key].stream
    }

    /// The header of a packet from the host side of `key`.
    pub fn header_for(&self, key: ConnKey, op: u16, flags: u32, fwd_cnt: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: super::CONN_BUF_ALLOC,
            fwd_cnt,
        }
    }
}

/// Connects to a host listener without blocking the event loop: a listener whose backlog is full
/// answers EAGAIN at once, which refuses the guest's connection instead of stalling every device.
fn connect_nonblocking(path: &Path) -> nix::Result<UnixStream> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(UnixStream::from(fd))
}

/// `CONNECT <port>\n` → port.
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    text.strip_prefix("CONNECT ")?.strip_suffix('\n')?.trim().parse().ok()
}

impl Connection {
    /// The `OK <port>\n` answer: written to the host stream but not counted as guest data.
    fn push_to_host_unaccounted(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines_parse_strictly() {
        assert_eq!(parse_connect_line(b"CONNECT 1024\n"), Some(1024));
        assert_eq!(parse_connect_line(b"CONNECT 1024"), None);
        assert_eq!(parse_connect_line(b"connect 1024\n"), None);
        assert_eq!(parse_connect_line(b"CONNECT -1\n"), None);
        assert_eq!(parse_connect_line(b"CONNECT 99999999999\n"), None);
        assert_eq!(parse_connect_line(&[0xff, b'\n']), None);
    }

    fn muxer() -> (Muxer, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let muxer = Muxer::new(3, &dir.path().join("v.sock")).unwrap();
        (muxer, dir)
    }

    /// A host client that connected and sent `line`, which the muxer has accepted and read.
    fn client_says(muxer: &mut Muxer, dir: &Path, line: &[u8]) -> UnixStream {
        let mut client = UnixStream::connect(dir.join("v.sock")).unwrap();
        client.write_all(line).unwrap();
        muxer.handle_event(muxer.listener.as_raw_fd(), EventSet::IN);
        let fd = *muxer.handshakes.keys().next().unwrap();
        muxer.handle_event(fd, EventSet::IN);
        client
    }

    fn guest_header(op: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 0,
        }
    }

    #[test]
    fn host_connect_becomes_a_request_then_ok_on_response() {
        let (mut muxer, dir) = muxer();
        let mut client = client_says(&mut muxer, dir.path(), b"CONNECT 1024\n");
        let Some(Outgoing::Control { key, op, .. }) = muxer.next_outgoing() else { panic!("no request") };
        assert_eq!((key, op), ((FIRST_LOCAL_PORT, 1024), OP_REQUEST));
        muxer.handle_guest_packet(&guest_header(OP_RESPONSE, 1024, FIRST_LOCAL_PORT), &[]);
        let mut answer = [0u8; 14];
        client.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, format!("OK {FIRST_LOCAL_PORT}\n").as_bytes());
        muxer.handle_guest_packet(&guest_header(OP_RW, 1024, FIRST_LOCAL_PORT), b"hi host");
        let mut data = [0u8; 7];
        client.read_exact(&mut data).unwrap();
        assert_eq!(&data, b"hi host");
    }

    #[test]
    fn guest_connections_reach_the_port_socket_or_are_reset() {
        let (mut muxer, dir) = muxer();
        let port_listener = UnixListener::bind(dir.path().join("v.sock_5000")).unwrap();
        muxer.handle_guest_packet(&guest_header(OP_REQUEST, 1234, 5000), &[]);
        assert!(port_listener.accept().is_ok());
        assert!(matches!(muxer.next_outgoing(), Some(Outgoing::Control { op: OP_RESPONSE, .. })));
        muxer.handle_guest_packet(&guest_header(OP_REQUEST, 1235, 6000), &[]);
        assert!(matches!(
            muxer.next_outgoing(),
            Some(Outgoing::Control { key: (6000, 1235), op: OP_RST, .. })
        ));
        assert_eq!(muxer.counts.refused, 1);
    }

    #[test]
    fn packets_for_nobody_get_a_reset_but_resets_do_not() {
        let (mut muxer, _dir) = muxer();
        muxer.handle_guest_packet(&guest_header(OP_RW, 1, 2), b"x");
        assert!(matches!(muxer.next_outgoing(), Some(Outgoing::Control { op: OP_RST, .. })));
        muxer.handle_guest_packet(&guest_header(OP_RST, 1, 2), &[]);
        let mut wrong_cid = guest_header(OP_RW, 1, 2);
        wrong_cid.src_cid = 99;
        muxer.handle_guest_packet(&wrong_cid, &[]);
        assert!(matches!(muxer.next_outgoing(), Some(Outgoing::Control { op: OP_RST, .. })));
        assert_eq!(muxer.next_outgoing(), None);
    }

    #[test]
    fn a_guest_cannot_open_more_connections_than_the_cap() {
        let (mut muxer, dir) = muxer();
        muxer.max_connections = 3;
        let _port_listener = UnixListener::bind(dir.path().join("v.sock_5000")).unwrap();
        for guest_port in 0..3 {
            muxer.handle_guest_packet(&guest_header(OP_REQUEST, 10_000 + guest_port, 5000), &[]);
        }
        assert_eq!(muxer.conns.len(), 3);
        muxer.handle_guest_packet(&guest_header(OP_REQUEST, 1, 5000), &[]);
        assert_eq!(muxer.conns.len(), 3, "over the cap");
        assert_eq!(muxer.counts.refused, 1);
        let answers: Vec<Outgoing> = std::iter::from_fn(|| muxer.next_outgoing()).collect();
        assert!(answers.contains(&Outgoing::Control { key: (5000, 1), op: OP_RST, flags: 0, fwd_cnt: 0 }));
    }

    #[test]
    fn host_clients_over_the_cap_are_closed_without_an_answer() {
        let (mut muxer, dir) = muxer();
        muxer.max_connections = 1;
        let _first = UnixStream::connect(dir.path().join("v.sock")).unwrap();
        let mut second = UnixStream::connect(dir.path().join("v.sock")).unwrap();
        muxer.handle_event(muxer.listener.as_raw_fd(), EventSet::IN);
        assert_eq!(muxer.handshakes.len(), 1);
        assert_eq!(muxer.counts.refused, 1);
        let mut buf = [0u8; 1];
        assert_eq!(second.read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn a_request_the_guest_never_answers_is_reset_after_the_timeout() {
        let (mut muxer, dir) = muxer();
        let _client = client_says(&mut muxer, dir.path(), b"CONNECT 1024\n");
        assert!(matches!(muxer.next_outgoing(), Some(Outgoing::Control { op: OP_REQUEST, .. })));
        muxer.expire(Instant::now());
        assert!(muxer.to_remove.is_empty(), "not yet");
        muxer.expire(Instant::now() + super::super::CONNECT_TIMEOUT * 2);
        assert_eq!(muxer.to_remove, vec![(FIRST_LOCAL_PORT, 1024)]);
        assert!(matches!(muxer.next_outgoing(), Some(Outgoing::Control { op: OP_RST, .. })));
    }

    #[test]
    fn a_silent_host_client_is_closed_after_the_timeout() {
        let (mut muxer, dir) = muxer();
        let _client = UnixStream::connect(dir.path().join("v.sock")).unwrap();
        muxer.handle_event(muxer.listener.as_raw_fd(), EventSet::IN);
        assert_eq!(muxer.handshakes.len(), 1);
        muxer.expire(Instant::now() + super::super::HANDSHAKE_TIMEOUT * 2);
        assert!(muxer.handshakes.is_empty());
        assert_eq!(muxer.graveyard.len(), 1);
        assert_eq!(muxer.counts.bad_handshakes, 1);
    }

    #[test]
    fn a_guest_that_takes_no_answers_cannot_grow_the_reset_queue() {
        let (mut muxer, _dir) = muxer();
        for port in 0..1_000_000u32 {
            muxer.handle_guest_packet(&guest_header(OP_RW, port, 7), b"x");
        }
        assert_eq!(muxer.orphan_resets.len(), super::super::MAX_ORPHAN_RESETS);
        assert_eq!(muxer.counts.resets_dropped, 1_000_000 - super::super::MAX_ORPHAN_RESETS as u64);
        let answers = std::iter::from_fn(|| muxer.next_outgoing()).count();
        assert_eq!(answers, super::super::MAX_ORPHAN_RESETS);
    }

    #[test]
    fn a_guest_flooding_ports_nobody_listens_on_cannot_hold_back_a_host_connection() {
        let (mut muxer, dir) = muxer();
        let flood = |muxer: &mut Muxer, round: u32| {
            for port in 0..super::super::MAX_ORPHAN_RESETS as u32 {
                muxer.handle_guest_packet(&guest_header(OP_REQUEST, round * 1000 + port, 40_000 + port), &[]);
            }
        };
        flood(&mut muxer, 0);
        let _client = client_says(&mut muxer, dir.path(), b"CONNECT 1024\n");
        // However fast the guest refills the resets, the host's request is among the next two.
        let mut sent = Vec::new();
        for round in 1..4 {
            flood(&mut muxer, round);
            sent.push(muxer.next_outgoing().unwrap());
            sent.push(muxer.next_outgoing().unwrap());
        }
        let requests: Vec<_> = sent
            .iter()
            .enumerate()
            .filter(|(_, packet)| matches!(packet, Outgoing::Control { op: OP_REQUEST, .. }))
            .map(|(index, _)| index)
            .collect();
        assert_eq!(requests.len(), 1, "{sent:?}");
        assert!(requests[0] < 2, "the request waited behind {} resets", requests[0]);
        let resets = sent.iter().filter(|p| matches!(p, Outgoing::Control { op: OP_RST, .. })).count();
        assert_eq!(resets, sent.len() - 1, "the resets stopped while the connection had nothing to send");
    }

    #[test]
    fn orphan_resets_and_connection_packets_take_turns() {
        let (mut muxer, dir) = muxer();
        let _port_listener = UnixListener::bind(dir.path().join("v.sock_5000")).unwrap();
        for port in 0..3 {
            muxer.handle_guest_packet(&guest_header(OP_RW, 100 + port, 7), b"x");
            muxer.handle_guest_packet(&guest_header(OP_REQUEST, 200 + port, 5000), &[]);
        }
        let ops: Vec<u16> = std::iter::from_fn(|| muxer.next_outgoing())
            .map(|packet| match packet {
                Outgoing::Control { op, .. } => op,
                Outgoing::Data { .. } => OP_RW,
            })
            .collect();
        assert_eq!(ops, [OP_RESPONSE, OP_RST, OP_RESPONSE, OP_RST, OP_RESPONSE, OP_RST]);
    }

    #[test]
    fn repeated_credit_requests_owe_one_update() {
        let (mut muxer, dir) = muxer();
        let _port_listener = UnixListener::bind(dir.path().join("v.sock_5000")).unwrap();
        muxer.handle_guest_packet(&guest_header(OP_REQUEST, 1234, 5000), &[]);
        assert!(matches!(muxer.next_outgoing(), Some(Outgoing::Control { op: OP_RESPONSE, .. })));
        for _ in 0..1_000_000 {
            muxer.handle_guest_packet(&guest_header(OP_CREDIT_REQUEST, 1234, 5000), &[]);
        }
        assert!(matches!(muxer.next_outgoing(), Some(Outgoing::Control { op: OP_CREDIT_UPDATE, .. })));
        assert_eq!(muxer.next_outgoing(), None);
    }

    #[test]
    fn repeated_resets_of_one_connection_remove_it_once() {
        let (mut muxer, dir) = muxer();
        let _port_listener = UnixListener::bind(dir.path().join("v.sock_5000")).unwrap();
        muxer.handle_guest_packet(&guest_header(OP_REQUEST, 1234, 5000), &[]);
        for _ in 0..1000 {
            muxer.handle_guest_packet(&guest_header(OP_RST, 1234, 5000), &[]);
        }
        assert_eq!(muxer.to_remove, vec![(5000, 1234)]);
    }

    #[test]
    fn a_host_listener_with_a_full_backlog_refuses_without_blocking() {
        let (mut muxer, dir) = muxer();
        let path = dir.path().join("v.sock_5000");
        // A listener that never accepts, with the smallest backlog, filled up by hand.
        let listener = nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::Stream,
            nix::sys::socket::SockFlag::empty(),
            None,
        )
        .unwrap();
        nix::sys::socket::bind(listener.as_raw_fd(), &nix::sys::socket::UnixAddr::new(&path).unwrap())
            .unwrap();
        nix::sys::socket::listen(&listener, nix::sys::socket::Backlog::new(0).unwrap()).unwrap();
        let mut queued = Vec::new();
        while let Ok(stream) = connect_nonblocking(&path) {
            queued.push(stream);
            assert!(queued.len() < 1000, "the backlog never filled");
        }
        let started = Instant::now();
        muxer.handle_guest_packet(&guest_header(OP_REQUEST, 1234, 5000), &[]);
        assert!(started.elapsed() < std::time::Duration::from_secs(1), "the event loop was blocked");
        assert!(matches!(
            muxer.next_outgoing(),
            Some(Outgoing::Control { key: (5000, 1234), op: OP_RST, .. })
        ));
        assert_eq!(muxer.counts.refused, 1);
    }

    #[test]
    fn a_bad_handshake_closes_the_client() {
        let (mut muxer, dir) = muxer();
        let mut client = client_says(&mut muxer, dir.path(), b"HELLO THERE\n");
        assert!(muxer.handshakes.is_empty());
        assert_eq!(muxer.counts.bad_handshakes, 1);
        muxer.graveyard.clear();
        let mut buf = [0u8; 1];
        assert_eq!(client.read(&mut buf).unwrap(), 0, "closed");
    }
}
