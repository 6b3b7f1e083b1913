//! The virtio-net device: tx chains become tap writes, tap reads fill rx chains.

use std::io::ErrorKind;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;
use virtio_queue::QueueT;
use vm_memory::Bytes;
use vmm_sys_util::eventfd::EventFd;

use super::tap::{self, Tap};
use super::{
    MAX_FRAME_LEN, QUEUE_SIZE, RX_QUEUE, TX_QUEUE, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP, VNET_HDR_LEN,
};
use crate::devices::virtio::device::{VirtioBase, VirtioDevice};
use crate::devices::virtio::{TYPE_NET, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use crate::logger::GuestErrorLog;
use crate::vstate::memory::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Tap(#[from] tap::Error),
    #[error("cannot create an eventfd for the network device")]
    EventFd(#[source] std::io::Error),
}

#[derive(Debug, Default, Serialize)]
pub struct NetMetrics {
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// tx chains that were not a frame (writable descriptors, too short, too long, outside memory).
    pub tx_malformed: AtomicU64,
    /// Frames the tap would not take.
    pub tx_dropped: AtomicU64,
    /// Frames larger than the rx buffer the guest offered, or buffers that were not writable.
    pub rx_dropped: AtomicU64,
    pub tap_errors: AtomicU64,
}

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

pub struct Net {
    pub(super) tap: Tap,
    config: [u8; 8],
    pub(super) base: VirtioBase,
    pub(super) metrics: Arc<NetMetrics>,
    /// A frame read from the tap that waits for an rx buffer.
    rx_frame: Vec<u8>,
    rx_pending: Option<usize>,
    /// The guest offered no rx buffer: the tap is not read until it does.
    pub(super) rx_starved: bool,
    tx_frame: Vec<u8>,
    tap_name: String,
    /// What the guest got wrong, logged within a budget.
    guest_errors: GuestErrorLog,
}

impl Net {
    pub fn new(tap_name: &str, mac: [u8; 6], irqfd: EventFd) -> Result<Self, Error> {
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&mac);
        config[6..].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        Ok(Net {
            tap: Tap::open(tap_name)?,
            config,
            base: VirtioBase::new(2, irqfd).map_err(Error::EventFd)?,
            metrics: Arc::new(NetMetrics::default()),
            rx_frame: vec![0; MAX_FRAME_LEN],
            rx_pending: None,
            rx_starved: false,
            tx_frame: Vec::with_capacity(MAX_FRAME_LEN),
            tap_name: tap_name.to_string(),
            guest_errors: GuestErrorLog::default(),
        })
    }

    pub fn metrics(&self) -> Arc<NetMetrics> {
        self.metrics.clone()
    }

    /// Sends every frame the guest queued; returns whether any chain was used.
    pub fn process_tx(&mut self) -> bool {
        let Some((memory, queue)) = self.base.active_queue(TX_QUEUE) else {
            return false;
        };
        let mut used_any = false;
        while let Some(chain) = queue.pop_descriptor_chain(memory) {
            let head = chain.head_index();
            self.tx_frame.clear();
            let mut well_formed = true;
            for desc in chain {
                let len = desc.len() as usize;
                if desc.is_write_only() || self.tx_frame.len() + len > MAX_FRAME_LEN {
                    well_formed = false;
                    break;
                }
                let start = self.tx_frame.len();
                self.tx_frame.resize(start + len, 0);
                if memory.read_slice(&mut self.tx_frame[start..], desc.addr()).is_err() {
                    well_formed = false;
                    break;
                }
            }
            if !well_formed || self.tx_frame.len() < VNET_HDR_LEN || asks_for_offloads(&self.tx_frame) {
                count(&self.metrics.tx_malformed);
                self.guest_errors.warn(format_args!(
                    "net {}: the guest sent a malformed frame (bad chain, too short, or offloads asked for)",
                    self.tap_name
                ));
            } else {
                match self.tap.write_frame(&self.tx_frame) {
                    Ok(_) => {
                        count(&self.metrics.tx_frames);
                        self.metrics
                            .tx_bytes
                            .fetch_add((self.tx_frame.len() - VNET_HDR_LEN) as u64, Ordering::Relaxed);
                    }
                    Err(_) => count(&self.metrics.tx_dropped),
                }
            }
            let _ = queue.add_used(memory, head, 0);
            used_any = true;
        }
        used_any
    }

    /// Moves frames from the tap into the guest's rx buffers until one side runs dry.
    pub fn process_rx(&mut self) -> bool {
        let Some((memory, queue)) = self.base.active_queue(RX_QUEUE) else {
            return false;
        };
        let mut used_any = false;
        loop {
            let len = match self.rx_pending {
                Some(len) => len,
                None => match self.tap.read_frame(&mut self.rx_frame) {
                    Ok(len) if len >= VNET_HDR_LEN => len,
                    Ok(_) => continue,
                    Err(err) if err.kind() == ErrorKind::WouldBlock => break,
                    Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => {
                        count(&self.metrics.tap_errors);
                        break;
                    }
                },
            };
            // Without VIRTIO_NET_F_MRG_RXBUF every frame fits one chain: num_buffers is 1.
            self.rx_frame[10..12].copy_from_slice(&1u16.to_le_bytes());
            let Some(chain) = queue.pop_descriptor_chain(memory) else {
                self.rx_pending = Some(len);
                self.rx_starved = true;
                break;
            };
            self.rx_pending = None;
            let head = chain.head_index();
            let written = write_frame_to_chain(&self.rx_frame[..len], chain, memory);
            if written == 0 {
                count(&self.metrics.rx_dropped);
            } else {
                count(&self.metrics.rx_frames);
                self.metrics.rx_bytes.fetch_add((len - VNET_HDR_LEN) as u64, Ordering::Relaxed);
            }
            let _ = queue.add_used(memory, head, written);
            used_any = true;
        }
        used_any
    }
}

/// Whether a tx frame's virtio-net header asks for a checksum or segmentation offload (its flags or
/// GSO type set). None was negotiated, so such a frame is refused rather than handed to the tap,
/// which would act on the guest's request.
pub fn asks_for_offloads(frame: &[u8]) -> bool {
    const FLAGS: usize = 0;
    const GSO_TYPE: usize = 1;
    frame.get(FLAGS).is_some_and(|f| *f != 0) || frame.get(GSO_TYPE).is_some_and(|g| *g != 0)
}

/// Copies a frame across the chain's device-writable buffers; 0 if it does not fit or a buffer is
/// unusable (the frame is dropped, the buffer returned empty).
fn write_frame_to_chain(
    frame: &[u8],
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
    memory: &GuestMemory,
) -> u32 {
    let mut offset = 0usize;
    for desc in chain {
        if offset == frame.len() {
            break;
        }
        if !desc.is_write_only() {
            return 0;
        }
        let n = (desc.len() as usize).min(frame.len() - offset);
        if memory.write_slice(&frame[offset..offset + n], desc.addr()).is_err() {
            return 0;
        }
        offset += n;
    }
    if offset < frame.len() {
        return 0;
    }
    u32::try_from(offset).unwrap_or(0)
}

impl VirtioDevice for Net {
    fn base(&self) -> &VirtioBase {
        &self.base
    }

    fn base_mut(&mut self) -> &mut VirtioBase {
        &mut self.base
    }

    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn available_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 2]
    }

    /// mac[6], then the link status.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::devices::virtio::device::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_asking_for_offloads_are_refused() {
        let mut header = [0u8; VNET_HDR_LEN];
        assert!(!asks_for_offloads(&header));
        // VIRTIO_NET_HDR_F_NEEDS_CSUM with a checksum start and offset.
        header[0] = 1;
        header[6..10].copy_from_slice(&[14, 0, 16, 0]);
        assert!(asks_for_offloads(&header));
        // VIRTIO_NET_HDR_GSO_TCPV4 with a segment size.
        header = [0u8; VNET_HDR_LEN];
        header[1] = 1;
        header[4..6].copy_from_slice(&1448u16.to_le_bytes());
        assert!(asks_for_offloads(&header));
        // ECN alone (0x80) is a GSO type bit too.
        header = [0u8; VNET_HDR_LEN];
        header[1] = 0x80;
        assert!(asks_for_offloads(&header));
    }
}
