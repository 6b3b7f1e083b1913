//! virtio-fs with a vhost-user backend (virtiofsd): the guest mounts a host directory by its tag.
//!
//! The VMM runs no part of the file system. It connects to the backend's socket, gives it the
//! guest memory (a memfd, `vstate::memory::Sharing::Shared`) and, once the driver has set the
//! queues up, their addresses with the queues' kick eventfds (KVM's ioeventfds, which the backend
//! then waits on itself) and a call eventfd per queue. The backend processes FUSE requests straight
//! from guest memory; the VMM only turns its calls into the transport's interrupt, since a
//! virtio-mmio driver reads the interrupt status register before it looks at the queues.

pub mod device;
pub mod event_handler;

pub use device::{FsMetrics, VhostUserFs};

/// hiprio (FORGET requests) and one request queue.
pub const NUM_QUEUES: usize = 2;
pub const QUEUE_SIZE: u16 = 256;
