//! The virtio-vsock device: three queues (rx, tx, event) between the guest and the muxer.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;
use virtio_queue::{QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::Bytes;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::muxer::{self, Header, Muxer, Outgoing};
use super::packet;
use super::{MAX_PKT_DATA, OP_RW, QUEUE_SIZE, RX_QUEUE, SWEEP_INTERVAL, TX_BUDGET, TX_QUEUE};
use crate::devices::virtio::device::{VirtioBase, VirtioDevice};
use crate::devices::virtio::{TYPE_VSOCK, VIRTIO_F_VERSION_1};
use crate::logger::GuestErrorLog;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Muxer(#[from] muxer::Error),
    #[error("cannot create an eventfd for vsock")]
    EventFd(#[source] std::io::Error),
    #[error("cannot create the vsock connection timer")]
    Timer(#[source] std::io::Error),
}

#[derive(Debug, Default, Serialize)]
pub struct VsockMetrics {
    pub tx_packets: AtomicU64,
    pub rx_packets: AtomicU64,
    /// tx chains that were not a valid packet (wrong direction, too short, outside memory).
    pub bad_tx_packets: AtomicU64,
    /// rx chains the guest offered that cannot hold a packet.
    pub bad_rx_buffers: AtomicU64,
    pub host_connections: AtomicU64,
    pub guest_connections: AtomicU64,
    pub refused_connections: AtomicU64,
    pub resets_sent: AtomicU64,
    /// Resets for unknown connections dropped because the guest took none of the queued ones.
    pub resets_dropped: AtomicU64,
    pub bad_handshakes: AtomicU64,
}

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

pub struct Vsock {
    guest_cid: u64,
    pub(super) base: VirtioBase,
    pub(super) muxer: Muxer,
    pub(super) metrics: Arc<VsockMetrics>,
    /// Wakes the event loop to expire connections left waiting.
    pub(super) sweep_timer: TimerFd,
    /// The tx packet being read: header and data, at most one packet's worth.
    tx_packet: Vec<u8>,
    /// Guest packets handled per turn of the event loop ([`TX_BUDGET`]).
    pub(super) tx_budget: usize,
    /// What the guest got wrong, logged within a budget.
    guest_errors: GuestErrorLog,
}

impl Vsock {
    pub fn new(guest_cid: u64, uds_path: &Path, irqfd: EventFd) -> Result<Self, Error> {
        Ok(Vsock {
            guest_cid,
            base: VirtioBase::new(3, irqfd).map_err(Error::EventFd)?,
            muxer: Muxer::new(guest_cid, uds_path)?,
            metrics: Arc::new(VsockMetrics::default()),
            sweep_timer: sweep_timer()?,
            tx_packet: Vec::with_capacity(packet::HEADER_LEN + MAX_PKT_DATA as usize),
            tx_budget: TX_BUDGET,
            guest_errors: GuestErrorLog::default(),
        })
    }

    pub fn metrics(&self) -> Arc<VsockMetrics> {
        self.metrics.clone()
    }

    /// Takes every packet the guest sent.
    pub fn process_tx(&mut self) -> bool {
        let Some((memory, queue)) = self.base.active_queue(TX_QUEUE) else {
            return false;
        };
        let mut used_any = false;
        for _ in 0..self.tx_budget {
            let Some(chain) = queue.pop_descriptor_chain(memory) else {
                return used_any;
            };
            let head = chain.head_index();
            let descriptors: Vec<_> = chain.collect();
            match packet::read_tx(&descriptors, memory, &mut self.tx_packet) {
                Ok((header, len)) => {
                    count(&self.metrics.tx_packets);
                    let data =
                        if header.op == OP_RW { &self.tx_packet[packet::HEADER_LEN..][..len] } else { &[] };
                    self.muxer.handle_guest_packet(&header, data);
                }
                Err(err) => {
                    count(&self.metrics.bad_tx_packets);
                    self.guest_errors.warn(format_args!("vsock: the guest sent a malformed packet: {err}"));
                }
            }
            if queue.add_used(memory, head, 0).is_err() {
                count(&self.metrics.bad_tx_packets);
            }
            used_any = true;
        }
        // A guest refilling its tx queue as fast as it is drained would keep the loop here; the
        // rest waits for the next turn, after the host's connections.
        self.base.kick_again(TX_QUEUE);
        used_any
    }

    /// Fills the guest's rx buffers with whatever the host side has for it.
    pub fn process_rx(&mut self) -> bool {
        let Some((memory, queue)) = self.base.active_queue(RX_QUEUE) else {
            return false;
        };
        let mut used_any = false;
        let mut data = vec![0u8; MAX_PKT_DATA as usize];
        while self.muxer.has_outgoing() {
            let Some(mut chain) = queue.pop_descriptor_chain(memory) else {
                self.muxer.rx_starved = true;
                break;
            };
            let head = chain.head_index();
            let mut packet = match VsockPacket::from_rx_virtq_chain(memory, &mut chain, MAX_PKT_DATA) {
                Ok(packet) => packet,
                Err(_) => {
                    count(&self.metrics.bad_rx_buffers);
                    let _ = queue.add_used(memory, head, 0);
                    used_any = true;
                    continue;
                }
            };
            let room = packet.data_slice().map(|s| s.len()).unwrap_or(0).min(data.len());
            if room == 0 {
                // A buffer with no room for data would stall data forever; Linux never posts one.
                count(&self.metrics.bad_rx_buffers);
                let _ = queue.add_used(memory, head, 0);
                used_any = true;
                continue;
            }
            let written = match self.muxer.next_outgoing() {
                Some(Outgoing::Control { key, op, flags, fwd_cnt }) => {
                    write_header(&mut packet, &self.muxer.header_for(key, op, flags, fwd_cnt), 0);
                    Some(0)
                }
                Some(Outgoing::Data { key }) => match self.muxer.read_data(key, &mut data[..room]) {
                    Some((n, fwd_cnt)) => {
                        let header = self.muxer.header_for(key, OP_RW, 0, fwd_cnt);
                        write_header(&mut packet, &header, n);
                        let copied = packet.data_slice().map(|s| s.write_slice(&data[..n], 0).is_ok());
                        copied.unwrap_or(false).then_some(n)
                    }
                    None => None,
                },
                None => None,
            };
            match written {
                Some(n) => {
                    count(&self.metrics.rx_packets);
                    let len = (packet.header_slice().len() + n) as u32;
                    let _ = queue.add_used(memory, head, len);
                    used_any = true;
                }
                // Nothing to send after all: give the buffer back untouched.
                None => queue.go_to_previous_position(),
            }
        }
        used_any
    }

    pub fn sync_metrics(&self) {
        let counts = self.muxer.counts;
        self.metrics.host_connections.store(counts.host_connections, Ordering::Relaxed);
        self.metrics.guest_connections.store(counts.guest_connections, Ordering::Relaxed);
        self.metrics.refused_connections.store(counts.refused, Ordering::Relaxed);
        self.metrics.resets_sent.store(counts.resets_sent, Ordering::Relaxed);
        self.metrics.resets_dropped.store(counts.resets_dropped, Ordering::Relaxed);
        self.metrics.bad_handshakes.store(counts.bad_handshakes, Ordering::Relaxed);
    }
}

fn sweep_timer() -> Result<TimerFd, Error> {
    let timer_err =
        |e: vmm_sys_util::errno::Error| Error::Timer(std::io::Error::from_raw_os_error(e.errno()));
    let mut timer = TimerFd::new().map_err(timer_err)?;
    timer.reset(SWEEP_INTERVAL, Some(SWEEP_INTERVAL)).map_err(timer_err)?;
    Ok(timer)
}

fn write_header<B: vm_memory::bitmap::BitmapSlice>(
    packet: &mut VsockPacket<'_, B>,
    header: &Header,
    len: usize,
) {
    packet
        .set_src_cid(header.src_cid)
        .set_dst_cid(header.dst_cid)
        .set_src_port(header.src_port)
        .set_dst_port(header.dst_port)
        .set_type(header.type_)
        .set_op(header.op)
        .set_flags(header.flags)
        .set_buf_alloc(header.buf_alloc)
        .set_fwd_cnt(header.fwd_cnt)
        .set_len(u32::try_from(len).unwrap_or(0));
}

impl VirtioDevice for Vsock {
    fn base(&self) -> &VirtioBase {
        &self.base
    }

    fn base_mut(&mut self) -> &mut VirtioBase {
        &mut self.base
    }

    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn available_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    /// The config space is the guest's CID (u64).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::devices::virtio::device::read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
}
