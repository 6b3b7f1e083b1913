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
use crate::devices::virtio::device::{drain_queue, VirtioBase, VirtioDevice};
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
        let (frame, tap, metrics, guest_errors) =
            (&mut self.tx_frame, &mut self.tap, &self.metrics, &mut self.guest_errors);
        let drained = drain_queue(queue, memory, |chain| {
            send_frame(chain, memory, frame, tap, metrics, guest_errors, &self.tap_name);
            0
        });
        drained.used > 0
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
            let chain = match queue.pop_descriptor_chain(memory) {
                Some(chain) => chain,
                None => {
                    self.rx_pending = Some(len);
                    // Ask the driver to kick when it adds buffers (EVENT_IDX); some may have come
                    // while asking, then go round once more before calling the queue starved.
                    match queue.enable_notification(memory) {
                        Ok(true) => match queue.pop_descriptor_chain(memory) {
                            Some(chain) => chain,
                            None => {
                                self.rx_starved = true;
                                break;
                            }
                        },
                        Ok(false) | Err(_) => {
                            self.rx_starved = true;
                            break;
                        }
                    }
                }
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

/// Copies one tx chain into `frame` and writes it to the tap, counting what happened; a malformed
/// chain is counted and logged within the guest-error budget, never sent.
fn send_frame(
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
    memory: &GuestMemory,
    frame: &mut Vec<u8>,
    tap: &mut Tap,
    metrics: &NetMetrics,
    guest_errors: &mut GuestErrorLog,
    tap_name: &str,
) {
    if !read_tx_frame(chain, memory, frame) {
        count(&metrics.tx_malformed);
        guest_errors.warn(format_args!(
            "net {tap_name}: the guest sent a malformed frame (bad chain, too short, or offloads asked for)"
        ));
        return;
    }
    match tap.write_frame(frame) {
        Ok(_) => {
            count(&metrics.tx_frames);
            metrics.tx_bytes.fetch_add((frame.len() - VNET_HDR_LEN) as u64, Ordering::Relaxed);
        }
        Err(_) => count(&metrics.tx_dropped),
    }
}

/// Copies one tx chain (virtio-net header, then the frame) into `frame`; false when the chain is
/// malformed (a device-writable buffer, more than a frame, memory the guest does not have), too
/// short for the header, or asks for an offload.
pub(crate) fn read_tx_frame(
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
    memory: &GuestMemory,
    frame: &mut Vec<u8>,
) -> bool {
    frame.clear();
    for desc in chain {
        let len = desc.len() as usize;
        if desc.is_write_only() || frame.len() + len > MAX_FRAME_LEN {
            return false;
        }
        let start = frame.len();
        frame.resize(start + len, 0);
        if memory.read_slice(&mut frame[start..], desc.addr()).is_err() {
            return false;
        }
    }
    frame.len() >= VNET_HDR_LEN && !asks_for_offloads(frame)
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
pub(crate) fn write_frame_to_chain(
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
    use crate::devices::virtio::device::ActiveState;
    use crate::vstate::memory::{create_guest_memory, Sharing};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::GuestAddress;

    /// Runs `test` on a thread in a network namespace of its own: the tap it makes goes with it.
    fn in_own_netns(test: impl FnOnce() + Send + 'static) {
        let tun = std::path::Path::new("/dev/net/tun");
        if !ironclad_test_prereq::needs().root().file(tun, "modprobe tun").ready() {
            return;
        }
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            test();
        })
        .join()
        .unwrap();
    }

    /// Where the device writes avail_event: after the used ring's elements.
    fn avail_event(memory: &GuestMemory, mock: &MockSplitQueue<GuestMemory>) -> u16 {
        let size = 16u64;
        memory.read_obj(GuestAddress(mock.used_addr().0 + 4 + 8 * size)).unwrap()
    }

    #[test]
    fn with_event_idx_the_device_asks_for_the_next_tx_kick_after_draining() {
        in_own_netns(|| {
            let memory = create_guest_memory(16, Sharing::Private).unwrap();
            let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let mut net = Net::new("ictest0", [2, 0, 0, 0, 0, 1], irq).unwrap();
            let rx = MockSplitQueue::create(&memory, GuestAddress(0x1_0000), 16);
            let tx = MockSplitQueue::create(&memory, GuestAddress(0x2_0000), 16);
            let frame = GuestAddress(0x10_0000);
            memory.write_slice(&[0u8; VNET_HDR_LEN + 60], frame).unwrap();
            let chain =
                |_| RawDescriptor::from(SplitDescriptor::new(frame.0, (VNET_HDR_LEN + 60) as u32, 0, 0));
            tx.add_desc_chains(&(0..3).map(chain).collect::<Vec<_>>(), 0).unwrap();
            let queues: Vec<Queue> = [&rx, &tx]
                .iter()
                .map(|mock| {
                    let mut queue: Queue = mock.create_queue().unwrap();
                    queue.set_event_idx(true);
                    queue
                })
                .collect();
            net.activate(ActiveState { memory: memory.clone(), queues }).unwrap();

            assert!(net.process_tx());
            // Three frames sent, so the next kick is wanted when the driver fills slot 3: without
            // this the driver, which kicks only at the index the device asked for, stops kicking.
            assert_eq!(avail_event(&memory, &tx), 3);
            // Handed to the tap, which, never brought up, drops them: none was refused as malformed.
            let handed = net.metrics.tx_frames.load(Ordering::Relaxed)
                + net.metrics.tx_dropped.load(Ordering::Relaxed);
            assert_eq!((handed, net.metrics.tx_malformed.load(Ordering::Relaxed)), (3, 0));
            assert_eq!(tx.used().idx().load(), 3);
            assert!(!net.process_tx(), "nothing more to send");
        });
    }

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
