//! The virtio-blk device: the disk file, its config space, and request execution.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::request::{self, Request, RequestType};
use super::{
    ID_BYTES, QUEUE_SIZE, SECTOR_SIZE, STATUS_IOERR, STATUS_OK, STATUS_UNSUPP, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
};
use crate::devices::virtio::device::{drain_queue, VirtioBase, VirtioDevice};
use crate::devices::virtio::{TYPE_BLOCK, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use crate::logger::GuestErrorLog;
use crate::vstate::memory::GuestMemory;

/// Bounce buffer size: host memory used per request stays this small whatever the guest asks for.
const IO_CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the disk image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create an eventfd for the disk")]
    EventFd(#[source] std::io::Error),
}

/// Counters a test or an operator can read: what the guest asked for and what was refused.
#[derive(Debug, Default, Serialize)]
pub struct BlockMetrics {
    pub read_requests: AtomicU64,
    pub write_requests: AtomicU64,
    pub flush_requests: AtomicU64,
    pub get_id_requests: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Requests answered with IOERR or UNSUPP because the guest got something wrong.
    pub invalid_requests: AtomicU64,
    /// Chains without a usable status byte: returned unused.
    pub unanswerable_chains: AtomicU64,
    /// Host-side I/O failures.
    pub io_errors: AtomicU64,
    /// Rings the guest corrupted (an avail index out of range, a used ring outside memory).
    pub queue_errors: AtomicU64,
}

impl BlockMetrics {
    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The image file and what the guest is told about it.
pub struct Disk {
    file: File,
    read_only: bool,
    capacity_sectors: u64,
    serial: [u8; ID_BYTES],
}

impl Disk {
    /// The serial the disk answers GET_ID with, as text.
    pub fn id(&self) -> String {
        let end = self.serial.iter().position(|b| *b == 0).unwrap_or(self.serial.len());
        String::from_utf8_lossy(&self.serial[..end]).into_owned()
    }

    pub fn open(path: &Path, read_only: bool, serial: &str) -> Result<Self, Error> {
        let open_err = |source| Error::Open { path: path.into(), source };
        let file = OpenOptions::new().read(true).write(!read_only).open(path).map_err(open_err)?;
        let size = file.metadata().map_err(open_err)?.len();
        let mut id = [0u8; ID_BYTES];
        let len = serial.len().min(ID_BYTES);
        id[..len].copy_from_slice(&serial.as_bytes()[..len]);
        Ok(Disk { file, read_only, capacity_sectors: size / SECTOR_SIZE, serial: id })
    }

    /// Runs a parsed request; returns the status byte and how many bytes went into guest buffers.
    fn execute(&self, request: &Request, memory: &GuestMemory, metrics: &BlockMetrics) -> (u8, u32) {
        let result = match request.kind {
            RequestType::In => {
                BlockMetrics::count(&metrics.read_requests);
                self.read_into_guest(request, memory).inspect(|n| {
                    metrics.bytes_read.fetch_add(*n, Ordering::Relaxed);
                })
            }
            RequestType::Out if self.read_only => {
                BlockMetrics::count(&metrics.invalid_requests);
                return (STATUS_IOERR, 0);
            }
            RequestType::Out => {
                BlockMetrics::count(&metrics.write_requests);
                self.write_from_guest(request, memory).map(|n| {
                    metrics.bytes_written.fetch_add(n, Ordering::Relaxed);
                    0
                })
            }
            RequestType::Flush => {
                BlockMetrics::count(&metrics.flush_requests);
                if self.read_only {
                    Ok(0)
                } else {
                    self.file.sync_all().map(|_| 0)
                }
            }
            RequestType::GetId => {
                BlockMetrics::count(&metrics.get_id_requests);
                self.write_id(request, memory)
            }
            RequestType::Unsupported(_) => {
                BlockMetrics::count(&metrics.invalid_requests);
                return (STATUS_UNSUPP, 0);
            }
        };
        match result {
            Ok(written) => (STATUS_OK, u32::try_from(written).unwrap_or(u32::MAX)),
            Err(_) => {
                BlockMetrics::count(&metrics.io_errors);
                (STATUS_IOERR, 0)
            }
        }
    }

    fn read_into_guest(&self, request: &Request, memory: &GuestMemory) -> std::io::Result<u64> {
        let mut chunk = vec![0u8; IO_CHUNK];
        for_each_chunk(request, |address, offset, len| {
            self.file.read_exact_at(&mut chunk[..len], offset)?;
            memory.write_slice(&chunk[..len], address).map_err(std::io::Error::other)
        })?;
        Ok(request.data_len)
    }

    fn write_from_guest(&self, request: &Request, memory: &GuestMemory) -> std::io::Result<u64> {
        let mut chunk = vec![0u8; IO_CHUNK];
        for_each_chunk(request, |address, offset, len| {
            memory.read_slice(&mut chunk[..len], address).map_err(std::io::Error::other)?;
            self.file.write_all_at(&chunk[..len], offset)
        })?;
        Ok(request.data_len)
    }

    fn write_id(&self, request: &Request, memory: &GuestMemory) -> std::io::Result<u64> {
        let (address, len) = request.data[0];
        let n = (len as usize).min(ID_BYTES);
        memory.write_slice(&self.serial[..n], address).map_err(std::io::Error::other)?;
        Ok(n as u64)
    }
}

/// Walks a request's guest buffers in pieces of at most IO_CHUNK bytes: (guest address, disk
/// offset, length) for each, in order.
fn for_each_chunk(
    request: &Request,
    mut copy: impl FnMut(GuestAddress, u64, usize) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut offset = request.sector * SECTOR_SIZE;
    for &(address, len) in &request.data {
        let mut done = 0u64;
        while done < u64::from(len) {
            let n = (u64::from(len) - done).min(IO_CHUNK as u64);
            copy(GuestAddress(address.0 + done), offset, n as usize)?;
            done += n;
            offset += n;
        }
    }
    Ok(())
}

pub struct Block {
    pub(super) disk: Disk,
    config: [u8; 8],
    pub(super) base: VirtioBase,
    pub(super) metrics: Arc<BlockMetrics>,
    /// What the guest got wrong, logged within a budget.
    guest_errors: GuestErrorLog,
}

impl Block {
    pub fn new(disk: Disk, irqfd: EventFd) -> Result<Self, Error> {
        Ok(Block {
            config: disk.capacity_sectors.to_le_bytes(),
            disk,
            base: VirtioBase::new(1, irqfd).map_err(Error::EventFd)?,
            metrics: Arc::new(BlockMetrics::default()),
            guest_errors: GuestErrorLog::default(),
        })
    }

    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.metrics.clone()
    }

    /// Every request the driver queued, then one interrupt if the driver wants it.
    pub fn process_queue(&mut self) {
        let Some((memory, queue)) = self.base.active_queue(0) else {
            return;
        };
        let (disk, metrics, guest_errors) = (&self.disk, &self.metrics, &self.guest_errors);
        let drained =
            drain_queue(queue, memory, |chain| handle_chain(disk, chain, memory, metrics, guest_errors));
        self.metrics.queue_errors.fetch_add(drained.ring_errors as u64, Ordering::Relaxed);
        if drained.used > 0 {
            self.base.notify_guest();
        }
    }
}

/// Parses and runs one request; returns the number of bytes written into the guest's buffers.
fn handle_chain(
    disk: &Disk,
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
    memory: &GuestMemory,
    metrics: &BlockMetrics,
    guest_errors: &GuestErrorLog,
) -> u32 {
    let descriptors = request::collect(chain);
    let (status, written, status_address) = match request::parse(&descriptors, memory, disk.capacity_sectors)
    {
        Ok(request) => {
            let (status, written) = disk.execute(&request, memory, metrics);
            (status, written, Some(request.status))
        }
        Err(err) => {
            BlockMetrics::count(&metrics.invalid_requests);
            guest_errors.warn(format_args!("disk {}: the guest sent a malformed request: {err}", disk.id()));
            (STATUS_IOERR, 0, request::status_address(&descriptors, memory))
        }
    };
    match status_address {
        Some(address) if memory.write_obj(status, address).is_ok() => written.saturating_add(1),
        _ => {
            BlockMetrics::count(&metrics.unanswerable_chains);
            0
        }
    }
}

impl VirtioDevice for Block {
    fn base(&self) -> &VirtioBase {
        &self.base
    }

    fn base_mut(&mut self) -> &mut VirtioBase {
        &mut self.base
    }

    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn available_features(&self) -> u64 {
        let ro = if self.disk.read_only { VIRTIO_BLK_F_RO } else { 0 };
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_BLK_F_FLUSH | ro
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::devices::virtio::device::read_config_bytes(&self.config, offset, data);
    }

    /// The block config space is read-only for the driver.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
}
