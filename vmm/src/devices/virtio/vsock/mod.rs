//! virtio-vsock with Firecracker's hybrid vsock: the guest's vsock connections to the host are Unix
//! socket connections on the host, so no host vsock support (vhost) is needed.
//!
//! - Host → guest: a client connects to `uds_path`, writes `CONNECT <port>\n`, and once the guest
//!   accepted gets `OK <host port>\n`; from then on the stream is the connection.
//! - Guest → host port P: the VMM connects to `<uds_path>_P`.
//!
//! The wire format is exactly Firecracker's, so its clients and agents work unchanged.

pub mod connection;
pub mod device;
pub mod event_handler;
pub mod muxer;
pub mod packet;

pub use device::{Vsock, VsockMetrics};

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;
pub const QUEUE_SIZE: u16 = 256;
/// Guest packets handled per turn of the event loop: a queue's worth, then the listener, the
/// host's streams and the rx queue get theirs.
pub const TX_BUDGET: usize = QUEUE_SIZE as usize;

/// The host's CID, as seen from the guest.
pub const HOST_CID: u64 = 2;
/// Largest payload of one packet; larger guest buffers are only partly filled.
pub const MAX_PKT_DATA: u32 = 64 * 1024;
/// How much the host side buffers per connection, announced to the guest as buf_alloc.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Host-initiated connections get local ports from here up, as in Firecracker.
pub const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Connections (and pending handshakes) one VM may hold, as in Firecracker: a guest cannot exhaust
/// the VMM's file descriptors by opening connections.
pub const MAX_CONNECTIONS: usize = 1023;
/// A REQUEST the guest has not answered, or a SHUTDOWN it has not acknowledged, after this long
/// resets the connection (Firecracker's timeouts).
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
pub const SHUTDOWN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// A host client that has not sent its `CONNECT` line after this long is closed.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How often the muxer looks for connections past their time.
pub const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);
/// Resets owed for packets that matched no connection, at most (Firecracker keeps 256): a guest
/// that sends such packets without posting rx buffers cannot grow the queue.
pub const MAX_ORPHAN_RESETS: usize = 256;
/// The longest `CONNECT <port>\n` line accepted.
pub const MAX_CONNECT_LINE: usize = 32;

pub const TYPE_STREAM: u16 = 1;
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

#[cfg(test)]
mod tests;
