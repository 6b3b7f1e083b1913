//! One vsock stream connection between a guest port and a host Unix stream, with its credit.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::{CONN_BUF_ALLOC, MAX_PKT_DATA};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent to the guest, waiting for RESPONSE.
    AwaitingResponse,
    Established,
    /// The host side hung up: SHUTDOWN sent, waiting for the guest's RST.
    Closing,
}

/// Control packets a connection still owes the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Request,
    Response,
    CreditUpdate,
    Shutdown,
    Rst,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the guest sent more than the credit it was given")]
    CreditExceeded,
    #[error("the host stream failed")]
    Stream(#[source] std::io::Error),
}

pub struct Connection {
    pub stream: UnixStream,
    pub local_port: u32,
    pub peer_port: u32,
    state: State,
    /// When the connection entered its state, for the muxer's timeouts.
    since: Instant,
    /// Control packets owed to the guest, oldest first, at most one of each kind: a guest that
    /// repeats a request (CREDIT_REQUEST) cannot grow the queue.
    pending: VecDeque<Control>,
    /// Bytes from the guest the host stream has not taken yet.
    to_host: VecDeque<u8>,
    /// Bytes of guest data forwarded to the host stream (our fwd_cnt).
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    /// Bytes sent to the guest (our tx count against the guest's credit).
    sent_to_guest: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// The host stream reached end of file.
    pub host_eof: bool,
}

impl Connection {
    pub fn new(stream: UnixStream, local_port: u32, peer_port: u32, state: State) -> Self {
        Connection {
            stream,
            local_port,
            peer_port,
            state,
            since: Instant::now(),
            pending: VecDeque::new(),
            to_host: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            sent_to_guest: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            host_eof: false,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Queues a control packet for the guest unless one of its kind is already queued.
    pub fn owe(&mut self, control: Control) {
        if !self.pending.contains(&control) {
            self.pending.push_back(control);
        }
    }

    /// Drops whatever was owed: the connection ends with an RST and nothing else.
    pub fn owe_only_reset(&mut self) {
        self.pending.clear();
        self.pending.push_back(Control::Rst);
    }

    /// The next control packet owed to the guest.
    pub fn next_owed(&mut self) -> Option<Control> {
        self.pending.pop_front()
    }

    pub fn owes_control(&self) -> bool {
        !self.pending.is_empty()
    }

    pub fn set_state(&mut self, state: State) {
        self.state = state;
        self.since = Instant::now();
    }

    /// Stuck waiting for the guest past the state's timeout.
    pub fn expired(&self, now: Instant) -> bool {
        let waited = now.saturating_duration_since(self.since);
        match self.state {
            State::AwaitingResponse => waited > super::CONNECT_TIMEOUT,
            State::Closing => waited > super::SHUTDOWN_TIMEOUT,
            State::Established => false,
        }
    }

    /// Every packet from the guest carries its current credit.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
    }

    /// How many bytes the guest can take right now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.sent_to_guest - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    pub fn fwd_cnt(&self) -> u32 {
        self.fwd_cnt.0
    }

    pub fn mark_credit_sent(&mut self) {
        self.last_fwd_cnt_sent = self.fwd_cnt;
    }

    /// Whether the host stream should be read for the guest now.
    pub fn wants_to_send_data(&self) -> bool {
        self.state == State::Established && !self.host_eof && self.peer_credit() > 0
    }

    pub fn has_unflushed_data(&self) -> bool {
        !self.to_host.is_empty()
    }

    /// Takes guest data for the host stream: written now as far as the stream allows, the rest
    /// buffered, within the credit we announced.
    pub fn push_to_host(&mut self, data: &[u8]) -> Result<(), Error> {
        if self.to_host.len() + data.len() > CONN_BUF_ALLOC as usize {
            return Err(Error::CreditExceeded);
        }
        self.to_host.extend(data);
        self.flush_to_host()
    }

    /// Writes buffered guest data to the host stream; asks for a credit update once a good part
    /// of the guest's window has been consumed.
    pub fn flush_to_host(&mut self) -> Result<(), Error> {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(Error::Stream(ErrorKind::WriteZero.into())),
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt += Wrapping(u32::try_from(n).unwrap_or(u32::MAX));
                }
                Err(err) if err.kind() == ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                Err(err) => return Err(Error::Stream(err)),
            }
        }
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CONN_BUF_ALLOC / 4 {
            self.owe(Control::CreditUpdate);
        }
        Ok(())
    }

    /// Reads host data for the guest, at most `room` bytes and within the guest's credit.
    /// Ok(0) with `host_eof` set means the host hung up.
    pub fn read_for_guest(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let limit = buf.len().min(self.peer_credit() as usize).min(MAX_PKT_DATA as usize);
        if limit == 0 {
            return Ok(0);
        }
        loop {
            match self.stream.read(&mut buf[..limit]) {
                Ok(0) => {
                    self.host_eof = true;
                    return Ok(0);
                }
                Ok(n) => {
                    self.sent_to_guest += Wrapping(u32::try_from(n).unwrap_or(u32::MAX));
                    return Ok(n);
                }
                Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                Err(err) => return Err(err),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (Connection::new(a, FIRST, 1024, State::Established), b)
    }

    const FIRST: u32 = super::super::FIRST_LOCAL_PORT;

    #[test]
    fn credit_follows_what_the_guest_has_consumed() {
        let (mut conn, mut host) = pair();
        conn.update_peer_credit(100, 0);
        assert_eq!(conn.peer_credit(), 100);
        host.write_all(&[7u8; 150]).unwrap();
        let mut buf = [0u8; 200];
        assert_eq!(conn.read_for_guest(&mut buf).unwrap(), 100, "no more than the credit");
        assert_eq!(conn.peer_credit(), 0);
        assert!(!conn.wants_to_send_data());
        conn.update_peer_credit(100, 60);
        assert_eq!(conn.peer_credit(), 60);
    }

    #[test]
    fn guest_data_reaches_the_host_and_counts_forward() {
        let (mut conn, mut host) = pair();
        conn.push_to_host(b"hello").unwrap();
        let mut buf = [0u8; 5];
        host.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        assert_eq!(conn.fwd_cnt(), 5);
    }

    #[test]
    fn a_guest_overrunning_its_credit_is_refused() {
        let (mut conn, _host) = pair();
        // Nobody reads the host end: the socket buffer fills, then ours.
        let chunk = vec![0u8; 64 * 1024];
        let mut result = Ok(());
        for _ in 0..64 {
            result = conn.push_to_host(&chunk);
            if result.is_err() {
                break;
            }
        }
        assert!(matches!(result, Err(Error::CreditExceeded)));
    }

    #[test]
    fn at_most_one_control_packet_of_each_kind_is_owed() {
        let (mut conn, _host) = pair();
        for _ in 0..100_000 {
            conn.owe(Control::CreditUpdate);
        }
        conn.owe(Control::Shutdown);
        conn.owe(Control::CreditUpdate);
        assert_eq!(conn.pending.len(), 2);
        assert_eq!(conn.next_owed(), Some(Control::CreditUpdate));
        assert_eq!(conn.next_owed(), Some(Control::Shutdown));
        assert_eq!(conn.next_owed(), None);
        conn.owe(Control::Response);
        conn.owe_only_reset();
        assert_eq!(conn.next_owed(), Some(Control::Rst));
        assert!(!conn.owes_control());
    }

    #[test]
    fn host_hangup_is_seen_as_eof() {
        let (mut conn, host) = pair();
        conn.update_peer_credit(100, 0);
        drop(host);
        let mut buf = [0u8; 10];
        assert_eq!(conn.read_for_guest(&mut buf).unwrap(), 0);
        assert!(conn.host_eof);
    }
}
