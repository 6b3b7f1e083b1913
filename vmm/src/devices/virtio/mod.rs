//! virtio 1.x devices over the MMIO transport (modern only).
//!
//! Every device implements [`device::VirtioDevice`]; the transport ([`mmio::MmioTransport`]) sits on
//! the MMIO bus. Queue kicks arrive as ioeventfds that KVM signals when the guest writes the notify
//! register, and are handled on the event-loop thread; interrupts leave as irqfds.

pub mod balloon;
pub mod block;
pub mod device;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod vsock;

/// Feature bits every device offers.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Device types (virtio 1.2, 5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_BALLOON: u32 = 5;
pub const TYPE_VSOCK: u32 = 19;
pub const TYPE_FS: u32 = 26;
