//! Entry points for the fuzz targets in `fuzz/` (cargo fuzz, nightly) and for the replay of their
//! corpora in `cargo test` (stable). Each takes the fuzzer's bytes as a hostile guest would write
//! them: guest memory (descriptor tables, rings, buffers, packet headers) and, for the transport,
//! register accesses. None may panic, hang or touch anything but its own scratch files.
//!
//! Input layout for the devices: the first byte holds flags (bit 0: VIRTIO_RING_F_EVENT_IDX
//! negotiated, bit 1: a read-only disk), the rest is guest memory from address 0. Queue `i` has its
//! descriptor table at `i * 0x400`, its avail ring 0x100 further and its used ring 0x200 further,
//! so a few hundred bytes drive a device; descriptors may point anywhere, in memory or not.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::devices::virtio::block::{Block, Disk};
use crate::devices::virtio::device::{ActiveState, VirtioDevice};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::device::{asks_for_offloads, read_tx_frame, write_frame_to_chain};
use crate::devices::virtio::net::{MAX_FRAME_LEN, VNET_HDR_LEN};
use crate::devices::virtio::vsock::device::Vsock;
use crate::devices::virtio::vsock::muxer::parse_connect_line;
use crate::vstate::memory::{create_guest_memory, GuestMemory, Sharing};

/// The size every fuzzed queue has (a power of two, at most every device's maximum).
pub const QUEUE_SIZE: u16 = 16;
const QUEUE_STRIDE: u64 = 0x400;
const AVAIL_OFFSET: u64 = 0x100;
const USED_OFFSET: u64 = 0x200;
const MEMORY_MIB: u32 = 1;
const FLAG_EVENT_IDX: u8 = 1;
const FLAG_READ_ONLY: u8 = 2;
const DISK_SECTORS: usize = 16;
/// Register accesses in one MMIO input: kind, offset (2 bytes), value (8 bytes).
const MMIO_OP_LEN: usize = 11;
const MAX_MMIO_OPS: usize = 64;

/// A virtio-blk device over a scratch disk: every request the guest queued. Returns the guest's
/// memory afterwards, for tests to look at.
pub fn virtio_block(input: &[u8]) -> Option<GuestMemory> {
    let (&flags, image) = input.split_first()?;
    let mut block = block_device(flags & FLAG_READ_ONLY != 0)?;
    let memory = guest_memory(image);
    let queues = ready_queues(1, flags & FLAG_EVENT_IDX != 0);
    block.activate(ActiveState { memory: memory.clone(), queues }).ok()?;
    block.process_queue();
    Some(memory)
}

/// A vsock device: every packet the guest queued on tx (to the muxer), then whatever the host
/// side has for the guest's rx buffers (resets, responses), then tx once more. Returns the guest's
/// memory afterwards.
pub fn virtio_vsock(input: &[u8]) -> Option<GuestMemory> {
    let (&flags, image) = input.split_first()?;
    let socket = fresh_socket_path()?;
    let irq = EventFd::new(libc::EFD_NONBLOCK).ok()?;
    let served = Vsock::new(3, &socket, irq).ok().and_then(|mut vsock| {
        let memory = guest_memory(image);
        let queues = ready_queues(3, flags & FLAG_EVENT_IDX != 0);
        vsock.activate(ActiveState { memory: memory.clone(), queues }).ok()?;
        vsock.process_tx();
        vsock.process_rx();
        vsock.process_tx();
        Some(memory)
    });
    let _ = std::fs::remove_file(&socket);
    served
}

/// The net device's guest-facing halves without a tap: each tx chain read as a frame, and a frame
/// (the input's first bytes) written into each rx chain.
pub fn virtio_net(input: &[u8]) {
    let Some((&flags, image)) = input.split_first() else { return };
    let memory = guest_memory(image);
    let mut queues = ready_queues(2, flags & FLAG_EVENT_IDX != 0);
    let mut frame = Vec::new();
    let (tx, rx) = queues.split_at_mut(1);
    while let Some(chain) = tx[0].pop_descriptor_chain(&memory) {
        if read_tx_frame(chain, &memory, &mut frame) {
            assert!(frame.len() >= VNET_HDR_LEN && frame.len() <= MAX_FRAME_LEN);
            assert!(!asks_for_offloads(&frame), "a frame asking for offloads was accepted");
        }
    }
    let incoming = &image[..image.len().min(VNET_HDR_LEN + 1514)];
    while let Some(chain) = rx[0].pop_descriptor_chain(&memory) {
        let written = write_frame_to_chain(incoming, chain, &memory);
        assert!(written == 0 || written as usize == incoming.len(), "a frame was written in part");
    }
}

/// The virtio-mmio transport in front of a block device: up to 64 register reads and writes as
/// the driver would make them (any offset, any width, any order), the queues processed whenever
/// the device is active. Input: the number of accesses, the accesses, then guest memory. Returns
/// the guest's memory afterwards.
pub fn virtio_mmio(input: &[u8]) -> Option<GuestMemory> {
    let (&count, rest) = input.split_first()?;
    let ops_len = (usize::from(count) % (MAX_MMIO_OPS + 1)) * MMIO_OP_LEN;
    let (ops, image) = rest.split_at(ops_len.min(rest.len()));
    let block = Arc::new(Mutex::new(block_device(false)?));
    let memory = guest_memory(image);
    let mut transport = MmioTransport::new(memory.clone(), block.clone());
    for op in ops.chunks_exact(MMIO_OP_LEN) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]) & 0x1ff);
        let width = [1usize, 2, 4, 8][usize::from(op[0] >> 1) & 3];
        if op[0] & 1 == 0 {
            let mut data = [0u8; 8];
            transport.read(offset, &mut data[..width]);
        } else {
            transport.write(offset, &op[3..3 + width]);
        }
        if let Ok(mut block) = block.lock() {
            if block.is_activated() {
                block.process_queue();
            }
        }
    }
    Some(memory)
}

/// The host's `CONNECT <port>\n` line of the hybrid-vsock handshake.
pub fn hybrid_vsock_connect(input: &[u8]) {
    if parse_connect_line(input).is_some() {
        assert!(input.starts_with(b"CONNECT ") && input.ends_with(b"\n"));
    }
}

/// Guest memory with `image` from address 0 (what does not fit is cut).
fn guest_memory(image: &[u8]) -> GuestMemory {
    // Creating 1 MiB of anonymous memory fails only when the process is out of memory, which a
    // fuzz target cannot go on from.
    let memory = create_guest_memory(MEMORY_MIB, Sharing::Private).expect("1 MiB of guest memory");
    let fits = image.len().min(usize::try_from(u64::from(MEMORY_MIB) << 20).unwrap_or(0));
    let _ = memory.write_slice(&image[..fits], GuestAddress(0));
    memory
}

/// `count` ready queues at the fixed places of the module's layout.
fn ready_queues(count: usize, event_idx: bool) -> Vec<Queue> {
    (0..count as u64)
        .filter_map(|i| {
            let base = i * QUEUE_STRIDE;
            let mut queue = Queue::new(QUEUE_SIZE).ok()?;
            queue.set_desc_table_address(Some(base as u32), Some(0));
            queue.set_avail_ring_address(Some((base + AVAIL_OFFSET) as u32), Some(0));
            queue.set_used_ring_address(Some((base + USED_OFFSET) as u32), Some(0));
            queue.set_event_idx(event_idx);
            queue.set_ready(true);
            Some(queue)
        })
        .collect()
}

/// A block device over the scratch disk.
fn block_device(read_only: bool) -> Option<Block> {
    let disk = Disk::open(scratch_disk()?, read_only, "fuzz-disk").ok()?;
    Block::new(disk, EventFd::new(libc::EFD_NONBLOCK).ok()?).ok()
}

/// Scratch files for this process, removed when it exits normally.
fn scratch_dir() -> Option<&'static Path> {
    static DIR: OnceLock<Option<tempfile::TempDir>> = OnceLock::new();
    DIR.get_or_init(|| tempfile::Builder::new().prefix("ironclad-fuzz-").tempdir().ok())
        .as_ref()
        .map(|dir| dir.path())
}

/// A disk of a few sectors, shared by every input (what one wrote, the next may read).
fn scratch_disk() -> Option<&'static Path> {
    static DISK: OnceLock<Option<PathBuf>> = OnceLock::new();
    DISK.get_or_init(|| {
        let path = scratch_dir()?.join("disk.img");
        std::fs::write(&path, vec![0u8; DISK_SECTORS * 512]).ok()?;
        Some(path)
    })
    .as_deref()
}

/// A socket path no muxer listens on yet.
fn fresh_socket_path() -> Option<PathBuf> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let path = scratch_dir()?.join(format!("vsock-{}.sock", NEXT.fetch_add(1, Ordering::Relaxed)));
    let _ = std::fs::remove_file(&path);
    Some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    use ironclad_test_prereq::replay_fuzz_corpus as replay;

    #[test]
    fn the_block_corpus_replays() {
        replay("virtio_block", |input| drop(virtio_block(input)));
    }

    #[test]
    fn the_vsock_corpus_replays() {
        replay("virtio_vsock", |input| drop(virtio_vsock(input)));
    }

    #[test]
    fn the_net_corpus_replays() {
        replay("virtio_net", virtio_net);
    }

    #[test]
    fn the_mmio_corpus_replays() {
        replay("virtio_mmio", |input| drop(virtio_mmio(input)));
    }

    #[test]
    fn the_hybrid_vsock_corpus_replays() {
        replay("hybrid_vsock_connect", hybrid_vsock_connect);
    }

    fn seed(target: &str, name: &str) -> Vec<u8> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds").join(target).join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn used_index(memory: &GuestMemory, queue: u64) -> u16 {
        memory.read_obj(GuestAddress(queue * QUEUE_STRIDE + USED_OFFSET + 2)).unwrap()
    }

    // The seeds reach the devices' work, not only their checks: the layout the fuzzer starts from
    // is the one the module documents.
    #[test]
    fn a_block_read_seed_is_served() {
        for name in ["read-0", "read-1"] {
            let memory = virtio_block(&seed("virtio_block", name)).unwrap();
            assert_eq!(used_index(&memory, 0), 1, "{name}: the request was not used");
            let status: u8 = memory.read_obj(GuestAddress(0x310)).unwrap();
            assert_eq!(status, crate::devices::virtio::block::STATUS_OK, "{name}");
        }
    }

    #[test]
    fn a_vsock_request_seed_gets_an_answer_in_an_rx_buffer() {
        let memory = virtio_vsock(&seed("virtio_vsock", "request-0")).unwrap();
        assert_eq!(used_index(&memory, 1), 1, "the tx packet was not used");
        assert_eq!(used_index(&memory, 0), 1, "no answer (a reset: nobody listens) reached rx");
    }

    #[test]
    fn the_mmio_seed_brings_the_device_up_and_serves_a_read() {
        let memory = virtio_mmio(&seed("virtio_mmio", "bring_up_and_read")).unwrap();
        assert_eq!(used_index(&memory, 0), 1, "the driver's bring-up did not activate the device");
    }

    #[test]
    fn a_chain_looping_on_itself_ends() {
        // One descriptor whose NEXT points at itself, made available once.
        let mut image = vec![0u8; 0x400];
        image[0..8].copy_from_slice(&0x1000u64.to_le_bytes());
        image[8..12].copy_from_slice(&16u32.to_le_bytes());
        image[12..14].copy_from_slice(&1u16.to_le_bytes()); // VRING_DESC_F_NEXT
        image[0x102..0x104].copy_from_slice(&1u16.to_le_bytes()); // avail idx
        let mut input = vec![0u8];
        input.extend(image);
        virtio_block(&input);
        virtio_vsock(&input);
        virtio_net(&input);
    }
}
