//! The vsock device on mock queues: packets in guest memory, no KVM.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::devices::virtio::device::{ActiveState, VirtioDevice};
use crate::vstate::memory::{create_guest_memory, GuestMemory};

const HEADER_LEN: usize = 44;
const TX_PACKET: u64 = 0x40_0000;
const RX_BUFFERS: u64 = 0x50_0000;
const RX_BUFFER_LEN: u32 = 4096;

/// The guest side: three mock queues in guest memory, the rx queue full of empty buffers.
struct Guest<'a> {
    memory: &'a GuestMemory,
    rx: MockSplitQueue<'a, GuestMemory>,
    tx: MockSplitQueue<'a, GuestMemory>,
    tx_sent: u16,
}

fn header(op: u16, src_port: u32, dst_port: u32, len: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(&3u64.to_le_bytes()); // src_cid: the guest
    h.extend_from_slice(&HOST_CID.to_le_bytes());
    h.extend_from_slice(&src_port.to_le_bytes());
    h.extend_from_slice(&dst_port.to_le_bytes());
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(&TYPE_STREAM.to_le_bytes());
    h.extend_from_slice(&op.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes()); // flags
    h.extend_from_slice(&4096u32.to_le_bytes()); // buf_alloc
    h.extend_from_slice(&0u32.to_le_bytes()); // fwd_cnt
    h
}

impl<'a> Guest<'a> {
    fn new(memory: &'a GuestMemory) -> (Self, Vec<Queue>) {
        let rx = MockSplitQueue::create(memory, GuestAddress(0x10_0000), 16);
        let tx = MockSplitQueue::create(memory, GuestAddress(0x20_0000), 16);
        let event = MockSplitQueue::create(memory, GuestAddress(0x30_0000), 16);
        let buffers: Vec<RawDescriptor> = (0u64..8)
            .map(|i| {
                let address = RX_BUFFERS + i * u64::from(RX_BUFFER_LEN);
                RawDescriptor::from(SplitDescriptor::new(
                    address,
                    RX_BUFFER_LEN,
                    VRING_DESC_F_WRITE as u16,
                    0,
                ))
            })
            .collect();
        rx.add_desc_chains(&buffers, 0).unwrap();
        let queues =
            vec![rx.create_queue().unwrap(), tx.create_queue().unwrap(), event.create_queue().unwrap()];
        (Guest { memory, rx, tx, tx_sent: 0 }, queues)
    }

    /// Puts one packet on the tx queue.
    fn send(&mut self, op: u16, src_port: u32, dst_port: u32, data: &[u8]) {
        let address = TX_PACKET + u64::from(self.tx_sent) * 0x1000;
        let mut packet = header(op, src_port, dst_port, u32::try_from(data.len()).unwrap());
        packet.extend_from_slice(data);
        self.memory.write_slice(&packet, GuestAddress(address)).unwrap();
        let desc =
            RawDescriptor::from(SplitDescriptor::new(address, u32::try_from(packet.len()).unwrap(), 0, 0));
        self.tx.add_desc_chains(&[desc], self.tx_sent).unwrap();
        self.tx_sent += 1;
    }

    /// (op, src_port, dst_port, data) of every packet the device has put in rx buffers.
    fn received(&self) -> Vec<(u16, u32, u32, Vec<u8>)> {
        let used = self.rx.used().idx().load();
        (0..used)
            .map(|i| {
                let element = self.rx.used().ring().ref_at(usize::from(i)).unwrap().load();
                let address = RX_BUFFERS + u64::from(element.id()) * u64::from(RX_BUFFER_LEN);
                let mut bytes = vec![0u8; element.len() as usize];
                self.memory.read_slice(&mut bytes, GuestAddress(address)).unwrap();
                let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
                let op = u16::from_le_bytes(bytes[30..32].try_into().unwrap());
                (op, u32_at(16), u32_at(20), bytes[HEADER_LEN..].to_vec())
            })
            .collect()
    }
}

fn vsock(dir: &std::path::Path) -> Vsock {
    Vsock::new(3, &dir.join("v.sock"), EventFd::new(libc::EFD_NONBLOCK).unwrap()).unwrap()
}

#[test]
fn a_guest_connection_is_answered_and_its_data_reaches_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let listener = UnixListener::bind(dir.path().join("v.sock_5000")).unwrap();
    let memory = create_guest_memory(16, crate::vstate::memory::Sharing::Private).unwrap();
    let (mut guest, queues) = Guest::new(&memory);
    let mut device = vsock(dir.path());
    device.activate(ActiveState { memory: memory.clone(), queues }).unwrap();

    guest.send(OP_REQUEST, 1234, 5000, &[]);
    guest.send(OP_RW, 1234, 5000, b"hello host");
    assert!(device.process_tx());
    assert!(device.process_rx());
    let (mut host, _) = listener.accept().unwrap();
    let mut data = [0u8; 10];
    host.read_exact(&mut data).unwrap();
    assert_eq!(&data, b"hello host");
    assert_eq!(guest.received(), vec![(OP_RESPONSE, 5000, 1234, vec![])]);

    // The host answers: readable data becomes an RW packet for the guest.
    host.write_all(b"hi guest").unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(device.muxer.conns_stream_for_test((5000, 1234)));
    device.muxer.handle_event(fd, vmm_sys_util::epoll::EventSet::IN);
    assert!(device.process_rx());
    assert_eq!(guest.received()[1], (OP_RW, 5000, 1234, b"hi guest".to_vec()));
}

#[test]
fn malformed_tx_chains_are_counted_and_returned() {
    let dir = tempfile::tempdir().unwrap();
    let memory = create_guest_memory(16, crate::vstate::memory::Sharing::Private).unwrap();
    let (guest, queues) = Guest::new(&memory);
    let mut device = vsock(dir.path());
    device.activate(ActiveState { memory: memory.clone(), queues }).unwrap();
    // A header claiming more data than the packet size limit, and a device-writable tx buffer.
    let mut huge = header(OP_RW, 1, 2, MAX_PKT_DATA + 1);
    huge.extend_from_slice(&[0; 16]);
    memory.write_slice(&huge, GuestAddress(TX_PACKET)).unwrap();
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(TX_PACKET, 60, 0, 0)),
        RawDescriptor::from(SplitDescriptor::new(TX_PACKET, 60, VRING_DESC_F_WRITE as u16, 0)),
    ];
    guest.tx.add_desc_chains(&descs, 0).unwrap();
    assert!(device.process_tx());
    assert_eq!(device.metrics.bad_tx_packets.load(std::sync::atomic::Ordering::Relaxed), 2);
    assert_eq!(guest.tx.used().idx().load(), 2, "both chains handed back");
}

#[test]
fn a_request_to_a_port_nobody_serves_is_reset() {
    let dir = tempfile::tempdir().unwrap();
    let memory = create_guest_memory(16, crate::vstate::memory::Sharing::Private).unwrap();
    let (mut guest, queues) = Guest::new(&memory);
    let mut device = vsock(dir.path());
    device.activate(ActiveState { memory: memory.clone(), queues }).unwrap();
    guest.send(OP_REQUEST, 1234, 7777, &[]);
    device.process_tx();
    device.process_rx();
    assert_eq!(guest.received(), vec![(OP_RST, 7777, 1234, vec![])]);
}

#[test]
fn a_guest_refilling_its_tx_queue_gets_a_budget_per_turn_and_the_rest_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let memory = create_guest_memory(16, crate::vstate::memory::Sharing::Private).unwrap();
    let (mut guest, queues) = Guest::new(&memory);
    let mut device = vsock(dir.path());
    device.tx_budget = 4;
    device.activate(ActiveState { memory: memory.clone(), queues }).unwrap();
    for port in 0..6 {
        guest.send(OP_REQUEST, 1000 + port, 7000 + port, &[]);
    }
    assert!(device.queue_events()[TX_QUEUE].read().is_err(), "no kick yet");
    assert!(device.process_tx());
    assert_eq!(guest.tx.used().idx().load(), 4, "one budget's worth");
    assert_eq!(device.queue_events()[TX_QUEUE].read().unwrap(), 1, "the rest waits for a kick of its own");
    assert!(device.process_tx());
    assert_eq!(guest.tx.used().idx().load(), 6);
    assert!(device.queue_events()[TX_QUEUE].read().is_err(), "nothing left, no kick");
}
