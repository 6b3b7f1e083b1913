use std::sync::atomic::Ordering;

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::request::{
    RequestHeader, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use super::*;
use crate::devices::virtio::device::{ActiveState, VirtioDevice};
use crate::vstate::memory::{create_guest_memory, GuestMemory};

const W: u16 = VRING_DESC_F_WRITE as u16;
const N: u16 = VRING_DESC_F_NEXT as u16;
const HEADER: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;

struct Fixture {
    memory: GuestMemory,
    block: Block,
    disk: tempfile::NamedTempFile,
}

fn fixture(read_only: bool) -> Fixture {
    let memory = create_guest_memory(16, crate::vstate::memory::Sharing::Private).unwrap();
    let disk = tempfile::NamedTempFile::new().unwrap();
    let mut contents = vec![0u8; 8 * 512];
    contents[512..1024].fill(0x5a);
    std::fs::write(disk.path(), &contents).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let block = Block::new(Disk::open(disk.path(), read_only, "disk-serial-01").unwrap(), irq).unwrap();
    Fixture { memory, block, disk }
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

fn header(memory: &GuestMemory, request_type: u32, sector: u64) {
    memory.write_obj(RequestHeader { request_type, reserved: 0, sector }, GuestAddress(HEADER)).unwrap();
}

/// Activates the device on a mock queue holding `chains`, runs it, returns (status byte, used len).
fn run(f: &mut Fixture, chains: &[RawDescriptor]) -> (u8, u32) {
    let mock = MockSplitQueue::new(&f.memory, 16);
    mock.add_desc_chains(chains, 0).unwrap();
    let queue: Queue = mock.create_queue().unwrap();
    f.memory.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    f.block.activate(ActiveState { memory: f.memory.clone(), queues: vec![queue] }).unwrap();
    f.block.process_queue();
    let used = mock.used().ring().ref_at(0).unwrap().load();
    (f.memory.read_obj(GuestAddress(STATUS)).unwrap(), used.len())
}

fn three_part(data_len: u32, data_flags: u16) -> [RawDescriptor; 3] {
    [desc(HEADER, 16, N, 1), desc(DATA, data_len, data_flags | N, 2), desc(STATUS, 1, W, 0)]
}

#[test]
fn reads_a_sector_into_guest_memory() {
    let mut f = fixture(false);
    header(&f.memory, VIRTIO_BLK_T_IN, 1);
    assert_eq!(run(&mut f, &three_part(512, W)), (STATUS_OK, 513));
    let mut data = [0u8; 512];
    f.memory.read_slice(&mut data, GuestAddress(DATA)).unwrap();
    assert!(data.iter().all(|b| *b == 0x5a));
    assert_eq!(f.block.metrics.bytes_read.load(Ordering::Relaxed), 512);
    assert!(f.block.interrupt().status() != 0, "the driver is interrupted");
}

#[test]
fn writes_guest_data_to_the_file() {
    let mut f = fixture(false);
    header(&f.memory, VIRTIO_BLK_T_OUT, 3);
    f.memory.write_slice(&[0xc3; 1024], GuestAddress(DATA)).unwrap();
    assert_eq!(run(&mut f, &three_part(1024, 0)), (STATUS_OK, 1));
    let contents = std::fs::read(f.disk.path()).unwrap();
    assert!(contents[3 * 512..5 * 512].iter().all(|b| *b == 0xc3));
    assert!(contents[5 * 512..].iter().all(|b| *b == 0));
}

#[test]
fn a_read_only_disk_refuses_writes() {
    let mut f = fixture(true);
    assert_ne!(f.block.available_features() & VIRTIO_BLK_F_RO, 0);
    header(&f.memory, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(run(&mut f, &three_part(512, 0)).0, STATUS_IOERR);
    assert!(std::fs::read(f.disk.path()).unwrap()[..512].iter().all(|b| *b == 0));
}

#[test]
fn get_id_answers_the_serial_and_flush_succeeds() {
    let mut f = fixture(false);
    header(&f.memory, VIRTIO_BLK_T_GET_ID, 0);
    assert_eq!(run(&mut f, &three_part(20, W)), (STATUS_OK, 21));
    let mut id = [0u8; 20];
    f.memory.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..14], b"disk-serial-01");
    assert!(id[14..].iter().all(|b| *b == 0));

    let mut f = fixture(false);
    header(&f.memory, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(run(&mut f, &[desc(HEADER, 16, N, 1), desc(STATUS, 1, W, 0)]), (STATUS_OK, 1));
}

#[test]
fn malformed_requests_get_an_error_status_and_are_counted() {
    let mut f = fixture(false);
    header(&f.memory, VIRTIO_BLK_T_IN, 7);
    // Two sectors from sector 7 run past the 8-sector disk.
    assert_eq!(run(&mut f, &three_part(1024, W)), (STATUS_IOERR, 1));
    assert_eq!(f.block.metrics.invalid_requests.load(Ordering::Relaxed), 1);

    let mut f = fixture(false);
    header(&f.memory, 0xdead, 0);
    assert_eq!(run(&mut f, &[desc(HEADER, 16, N, 1), desc(STATUS, 1, W, 0)]).0, STATUS_UNSUPP);
}

#[test]
fn a_chain_without_a_status_byte_is_returned_unused() {
    let mut f = fixture(false);
    header(&f.memory, VIRTIO_BLK_T_IN, 0);
    // The last descriptor is device-readable: there is nowhere to put a status.
    let (status, used) = run(&mut f, &[desc(HEADER, 16, N, 1), desc(DATA, 512, 0, 0)]);
    assert_eq!((status, used), (0xee, 0));
    assert_eq!(f.block.metrics.unanswerable_chains.load(Ordering::Relaxed), 1);
}

#[test]
fn buffers_outside_guest_memory_are_refused() {
    let mut f = fixture(false);
    header(&f.memory, VIRTIO_BLK_T_IN, 0);
    let chain = [desc(HEADER, 16, N, 1), desc(0x4000_0000, 4096, W | N, 2), desc(STATUS, 1, W, 0)];
    assert_eq!(run(&mut f, &chain), (STATUS_IOERR, 1));
}

#[test]
fn a_chain_claiming_more_than_four_gib_is_returned_unused_without_allocating() {
    let mut f = fixture(false);
    header(&f.memory, VIRTIO_BLK_T_IN, 0);
    let chain = [desc(HEADER, 16, N, 1), desc(DATA, u32::MAX, W | N, 2), desc(STATUS, 1, W, 0)];
    assert_eq!(run(&mut f, &chain), (0xee, 0));
    assert_eq!(f.block.metrics.unanswerable_chains.load(Ordering::Relaxed), 1);
}

#[test]
fn a_looping_chain_ends() {
    let mut f = fixture(false);
    header(&f.memory, VIRTIO_BLK_T_IN, 0);
    // Descriptor 1 points back at descriptor 0: virtio-queue stops after the queue size.
    let chain = [desc(HEADER, 16, N, 1), desc(DATA, 512, W | N, 0)];
    let mock = MockSplitQueue::new(&f.memory, 16);
    mock.desc_table().store(0, chain[0]).unwrap();
    mock.desc_table().store(1, chain[1]).unwrap();
    mock.avail().ring().ref_at(0).unwrap().store(0);
    mock.avail().idx().store(1);
    let queue: Queue = mock.create_queue().unwrap();
    f.block.activate(ActiveState { memory: f.memory.clone(), queues: vec![queue] }).unwrap();
    f.block.process_queue();
    assert_eq!(mock.used().idx().load(), 1, "the chain was returned");
    assert_eq!(f.block.metrics.invalid_requests.load(Ordering::Relaxed), 1);
}

#[test]
fn a_corrupt_avail_index_is_counted_not_spun_on() {
    let mut f = fixture(false);
    let mock = MockSplitQueue::new(&f.memory, 16);
    mock.avail().idx().store(1000);
    let queue: Queue = mock.create_queue().unwrap();
    f.block.activate(ActiveState { memory: f.memory.clone(), queues: vec![queue] }).unwrap();
    f.block.process_queue();
    assert!(f.block.metrics.queue_errors.load(Ordering::Relaxed) >= 1);
    assert_eq!(mock.used().idx().load(), 0);
}
