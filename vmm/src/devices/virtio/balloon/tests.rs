//! The balloon on mock queues in guest memory, anonymous and memfd-backed: what the guest reports
//! or inflates reads back as zeros and leaves the host's memory; malformed chains free nothing.

use std::sync::atomic::Ordering;

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::devices::virtio::device::{ActiveState, VirtioDevice};
use crate::vstate::memory::{create_guest_memory, GuestMemory, Sharing};

const W: u16 = VRING_DESC_F_WRITE as u16;
const N: u16 = VRING_DESC_F_NEXT as u16;
/// Where the tests' guest data lives: far from the rings at 1..4 MiB.
const DATA: u64 = 0x80_0000;
const PFNS: u64 = 0x70_0000;

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

struct Fixture<'a> {
    memory: &'a GuestMemory,
    balloon: Balloon,
    queues: Vec<MockSplitQueue<'a, GuestMemory>>,
}

fn fixture(memory: &GuestMemory) -> Fixture<'_> {
    let queues: Vec<_> = (0..NUM_QUEUES as u64)
        .map(|i| MockSplitQueue::create(memory, GuestAddress((i + 1) << 20), 16))
        .collect();
    let mut balloon = Balloon::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()).unwrap();
    let active = queues.iter().map(|q| q.create_queue().unwrap()).collect();
    balloon.activate(ActiveState { memory: memory.clone(), queues: active }).unwrap();
    Fixture { memory, balloon, queues }
}

impl Fixture<'_> {
    /// Queues `chain` on queue `index`, runs the device, returns how many chains it used.
    fn run(&mut self, index: usize, chain: &[RawDescriptor]) -> u16 {
        self.queues[index].add_desc_chains(chain, 0).unwrap();
        self.balloon.process_queue(index);
        self.queues[index].used().idx().load()
    }

    fn filled(&self, address: u64, len: usize) -> bool {
        let mut data = vec![0u8; len];
        self.memory.read_slice(&mut data, GuestAddress(address)).unwrap();
        data.iter().all(|b| *b == 0xa5)
    }

    fn zeroed(&self, address: u64, len: usize) -> bool {
        let mut data = vec![0xffu8; len];
        self.memory.read_slice(&mut data, GuestAddress(address)).unwrap();
        data.iter().all(|b| *b == 0)
    }
}

fn memory(sharing: Sharing) -> GuestMemory {
    let memory = create_guest_memory(16, sharing).unwrap();
    memory.write_slice(&[0xa5; 4 << 20], GuestAddress(DATA)).unwrap();
    memory
}

fn reported_blocks_read_back_as_zeros(sharing: Sharing) {
    let memory = memory(sharing);
    let mut f = fixture(&memory);
    let chain = [desc(DATA, 1 << 20, W | N, 1), desc(DATA + (2 << 20), 1 << 20, W, 0)];
    assert_eq!(f.run(REPORTING_QUEUE, &chain), 1);
    assert!(f.zeroed(DATA, 1 << 20) && f.zeroed(DATA + (2 << 20), 1 << 20), "{sharing:?}");
    assert!(
        f.filled(DATA + (1 << 20), 1 << 20) && f.filled(DATA + (3 << 20), 1 << 20),
        "only what was reported"
    );
    let metrics = f.balloon.metrics();
    assert_eq!(metrics.reported_bytes.load(Ordering::Relaxed), 2 << 20);
    assert_eq!(metrics.reports.load(Ordering::Relaxed), 1);
    assert_ne!(f.balloon.interrupt().status(), 0, "the driver hears the report was taken");
}

#[test]
fn reported_blocks_leave_anonymous_memory() {
    reported_blocks_read_back_as_zeros(Sharing::Private);
}

#[test]
fn reported_blocks_leave_the_shared_memfd() {
    reported_blocks_read_back_as_zeros(Sharing::Shared);
}

#[test]
fn a_malformed_report_frees_nothing_and_the_next_one_works() {
    let memory = memory(Sharing::Private);
    let mut f = fixture(&memory);
    // Its first block is fine, its second reaches past guest memory: the whole chain is refused.
    let bad = [desc(DATA, 4096, W | N, 1), desc(0xff_f000, 8192, W, 0)];
    assert_eq!(f.run(REPORTING_QUEUE, &bad), 1, "the chain is returned all the same");
    assert!(f.filled(DATA, 4096));
    let metrics = f.balloon.metrics();
    assert_eq!(metrics.invalid_requests.load(Ordering::Relaxed), 1);
    assert_eq!(metrics.reported_bytes.load(Ordering::Relaxed), 0);
    assert_eq!(f.run(REPORTING_QUEUE, &[desc(DATA, 4096, W, 0)]), 2);
    assert!(f.zeroed(DATA, 4096));
}

#[test]
fn inflated_pages_are_given_back_and_deflate_is_acknowledged() {
    let memory = memory(Sharing::Private);
    let mut f = fixture(&memory);
    let pfns: Vec<u8> =
        [DATA >> 12, (DATA >> 12) + 2].iter().flat_map(|p| (*p as u32).to_le_bytes()).collect();
    memory.write_slice(&pfns, GuestAddress(PFNS)).unwrap();
    assert_eq!(f.run(INFLATE_QUEUE, &[desc(PFNS, 8, 0, 0)]), 1);
    assert!(f.zeroed(DATA, 4096) && f.zeroed(DATA + 8192, 4096));
    assert!(f.filled(DATA + 4096, 4096));
    assert_eq!(f.run(DEFLATE_QUEUE, &[desc(PFNS, 8, 0, 0)]), 1);
    let metrics = f.balloon.metrics();
    assert_eq!(metrics.inflated_pages.load(Ordering::Relaxed), 2);
    assert_eq!(metrics.deflate_requests.load(Ordering::Relaxed), 1);
}

#[test]
fn the_host_never_asks_for_pages_and_the_driver_may_say_what_it_holds() {
    let memory = memory(Sharing::Private);
    let mut balloon = fixture(&memory).balloon;
    let mut config = [0xffu8; 8];
    balloon.read_config(0, &mut config);
    assert_eq!(config, [0; 8], "num_pages and actual start at 0");
    balloon.write_config(0, &7u32.to_le_bytes());
    balloon.write_config(4, &5u32.to_le_bytes());
    balloon.read_config(0, &mut config);
    assert_eq!(config, [0, 0, 0, 0, 5, 0, 0, 0], "num_pages stays the device's");
    assert_eq!(balloon.metrics().actual_pages.load(Ordering::Relaxed), 5);
    assert_ne!(balloon.available_features() & VIRTIO_BALLOON_F_REPORTING, 0);
}
