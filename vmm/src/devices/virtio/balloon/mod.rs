//! virtio-balloon for free page reporting: the guest's page allocator reports blocks it has had
//! free for a while on the reporting queue, and the VMM gives their host memory back
//! (`vstate::memory::discard`). The guest keeps the memory: touching it again faults in a zeroed
//! page, as after a deflate.
//!
//! The balloon's size target (`num_pages`) stays 0: ironclad does not take memory from a guest.
//! A guest that inflates anyway gives up those pages (they are discarded), and a deflate is
//! acknowledged; neither needs the host's permission (no VIRTIO_BALLOON_F_MUST_TELL_HOST).

pub mod device;
pub mod event_handler;
pub mod request;

pub use device::{Balloon, BalloonMetrics};

/// Linux's reporting needs at least 32 entries (PAGE_REPORTING_CAPACITY).
pub const QUEUE_SIZE: u16 = 256;

/// The queues, numbered as a driver numbers the ones that exist: no stats queue and no free page
/// hinting queue are offered, so the reporting queue follows the deflate queue.
pub const INFLATE_QUEUE: usize = 0;
pub const DEFLATE_QUEUE: usize = 1;
pub const REPORTING_QUEUE: usize = 2;
pub const NUM_QUEUES: usize = 3;

/// virtio 1.2, 5.5.3.
pub const VIRTIO_BALLOON_F_REPORTING: u64 = 1 << 5;

/// Inflate and deflate speak in 4 KiB page frame numbers whatever the guest's page size.
pub const VIRTIO_BALLOON_PFN_SHIFT: u32 = 12;

#[cfg(test)]
mod tests;
