//! virtio-blk on a raw image file: read, write, flush and GET_ID (the configured serial), with
//! read-only enforced.

pub mod device;
pub mod event_handler;
pub mod request;

pub use device::{Block, BlockMetrics, Disk};

/// Disk sectors are 512 bytes whatever the file system says.
pub const SECTOR_SIZE: u64 = 512;
pub const QUEUE_SIZE: u16 = 256;
/// virtio-blk's GET_ID answer is 20 bytes.
pub const ID_BYTES: usize = 20;

pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

pub const STATUS_OK: u8 = 0;
pub const STATUS_IOERR: u8 = 1;
pub const STATUS_UNSUPP: u8 = 2;

#[cfg(test)]
mod tests;
