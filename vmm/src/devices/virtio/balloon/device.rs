//! The virtio-balloon device: its config space, and what each queue's chains do.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;
use vmm_sys_util::eventfd::EventFd;

use super::request::{self, Range};
use super::{
    DEFLATE_QUEUE, INFLATE_QUEUE, NUM_QUEUES, QUEUE_SIZE, REPORTING_QUEUE, VIRTIO_BALLOON_F_REPORTING,
};
use crate::devices::virtio::device::{drain_queue, read_config_bytes, VirtioBase, VirtioDevice};
use crate::devices::virtio::{TYPE_BALLOON, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use crate::logger::GuestErrorLog;
use crate::vstate::memory::{discard, GuestMemory};

/// `struct virtio_balloon_config` up to `actual`: the fields that exist without free page
/// hinting and page poisoning.
const CONFIG_LEN: usize = 8;
/// Where the driver writes how many pages it holds in the balloon.
const ACTUAL_OFFSET: u64 = 4;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create an eventfd for the balloon")]
    EventFd(#[source] std::io::Error),
}

/// Counters a test or an operator can read.
#[derive(Debug, Default, Serialize)]
pub struct BalloonMetrics {
    /// Free memory the guest reported and the host got back.
    pub reported_bytes: AtomicU64,
    pub reports: AtomicU64,
    /// Pages the guest gave up by inflating, and deflate requests acknowledged.
    pub inflated_pages: AtomicU64,
    pub deflate_requests: AtomicU64,
    /// What the driver last said the balloon holds (`actual`), in pages.
    pub actual_pages: AtomicU64,
    /// Chains refused because the guest got something wrong: nothing of them is discarded.
    pub invalid_requests: AtomicU64,
    /// Host-side failures to free memory.
    pub discard_errors: AtomicU64,
    pub queue_errors: AtomicU64,
}

impl BalloonMetrics {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

pub struct Balloon {
    pub(super) base: VirtioBase,
    pub(super) metrics: Arc<BalloonMetrics>,
    actual: u32,
    guest_errors: GuestErrorLog,
}

impl Balloon {
    pub fn new(irqfd: EventFd) -> Result<Self, Error> {
        Ok(Balloon {
            base: VirtioBase::new(NUM_QUEUES, irqfd).map_err(Error::EventFd)?,
            metrics: Arc::new(BalloonMetrics::default()),
            actual: 0,
            guest_errors: GuestErrorLog::default(),
        })
    }

    pub fn metrics(&self) -> Arc<BalloonMetrics> {
        self.metrics.clone()
    }

    /// Every chain the driver queued on queue `index`, then one interrupt if the driver wants it.
    pub fn process_queue(&mut self, index: usize) {
        let Some((memory, queue)) = self.base.active_queue(index) else {
            return;
        };
        let (metrics, guest_errors) = (&self.metrics, &self.guest_errors);
        let drained = drain_queue(queue, memory, |chain| {
            let descriptors: Vec<_> = chain.collect();
            match index {
                INFLATE_QUEUE => match request::inflated_pages(&descriptors, memory) {
                    Ok(pages) => {
                        BalloonMetrics::add(&metrics.inflated_pages, pages.len() as u64);
                        give_back(&pages, memory, metrics, guest_errors);
                    }
                    Err(err) => refuse("inflate", &err, metrics, guest_errors),
                },
                DEFLATE_QUEUE => BalloonMetrics::add(&metrics.deflate_requests, 1),
                REPORTING_QUEUE => match request::reported_blocks(&descriptors, memory) {
                    Ok(blocks) => {
                        let bytes = give_back(&blocks, memory, metrics, guest_errors);
                        BalloonMetrics::add(&metrics.reported_bytes, bytes);
                        BalloonMetrics::add(&metrics.reports, 1);
                    }
                    Err(err) => refuse("free page report", &err, metrics, guest_errors),
                },
                _ => {}
            }
            // Nothing is written into the guest's buffers.
            0
        });
        BalloonMetrics::add(&self.metrics.queue_errors, drained.ring_errors as u64);
        if drained.used > 0 {
            self.base.notify_guest();
        }
    }
}

/// Discards each range; returns the bytes the host got back.
fn give_back(
    ranges: &[Range],
    memory: &GuestMemory,
    metrics: &BalloonMetrics,
    guest_errors: &GuestErrorLog,
) -> u64 {
    let mut freed = 0;
    for range in ranges {
        match discard(memory, range.address, range.len) {
            Ok(()) => freed += range.len,
            Err(err) => {
                BalloonMetrics::add(&metrics.discard_errors, 1);
                guest_errors.warn(format_args!("balloon: {err}"));
            }
        }
    }
    freed
}

fn refuse(what: &str, err: &request::Error, metrics: &BalloonMetrics, guest_errors: &GuestErrorLog) {
    BalloonMetrics::add(&metrics.invalid_requests, 1);
    guest_errors.warn(format_args!("balloon: the guest sent a malformed {what}: {err}"));
}

impl VirtioDevice for Balloon {
    fn base(&self) -> &VirtioBase {
        &self.base
    }

    fn base_mut(&mut self) -> &mut VirtioBase {
        &mut self.base
    }

    fn device_type(&self) -> u32 {
        TYPE_BALLOON
    }

    fn available_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_BALLOON_F_REPORTING
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    /// `num_pages` is always 0: the host never asks for memory back.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_LEN];
        config[ACTUAL_OFFSET as usize..].copy_from_slice(&self.actual.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    /// The driver may write `actual` (whole, or byte by byte); everything else is the device's.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = self.actual.to_le_bytes();
        for (i, byte) in data.iter().enumerate() {
            let Some(field) = (offset + i as u64).checked_sub(ACTUAL_OFFSET) else {
                continue;
            };
            if let Some(slot) = bytes.get_mut(field as usize) {
                *slot = *byte;
            }
        }
        self.actual = u32::from_le_bytes(bytes);
        self.metrics.actual_pages.store(u64::from(self.actual), Ordering::Relaxed);
    }
}
