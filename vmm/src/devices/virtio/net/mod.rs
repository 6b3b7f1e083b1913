//! virtio-net on a tap device: frames go between the guest's queues and the tap unchanged, with
//! the 12-byte virtio-net header, which the tap speaks too (IFF_VNET_HDR).

pub mod device;
pub mod event_handler;
pub mod tap;

pub use device::{Net, NetMetrics};

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const QUEUE_SIZE: u16 = 256;
/// `struct virtio_net_hdr_v1`: what precedes every frame, both ways (virtio 1.x).
pub const VNET_HDR_LEN: usize = 12;
/// The largest frame with its header: 64 KiB of payload plus Ethernet and the header.
pub const MAX_FRAME_LEN: usize = 65562;

pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;
