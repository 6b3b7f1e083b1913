//! What the guest hands the balloon, parsed from descriptor chains it wrote, trusting nothing:
//! page frame numbers to give up (inflate) and free blocks it reports (reporting queue).

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

use super::VIRTIO_BALLOON_PFN_SHIFT;
use crate::vstate::memory::{check_discardable, DiscardError, GuestMemory, PAGE_SIZE};

/// A run of guest memory to give back to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub address: GuestAddress,
    pub len: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("an inflate buffer is device-writable: page numbers are the driver's to write")]
    WritablePfnBuffer,
    #[error("an inflate buffer of {0} bytes is not a whole number of 32-bit page numbers")]
    PfnBufferLength(u32),
    #[error("an inflate buffer lies outside guest memory")]
    PfnBufferOutside,
    #[error("the inflated page {0:#x} is not guest memory")]
    PfnOutside(u32, #[source] DiscardError),
    #[error("a reported block is device-readable: reported blocks are device-writable buffers")]
    ReadableReport,
    #[error("a reported block is not whole pages of guest memory")]
    BadReport(#[source] DiscardError),
}

/// The pages an inflate chain gives up, one page each, in the order given.
pub fn inflated_pages(descriptors: &[Descriptor], memory: &GuestMemory) -> Result<Vec<Range>, Error> {
    let mut pages = Vec::new();
    for desc in descriptors {
        if desc.is_write_only() {
            return Err(Error::WritablePfnBuffer);
        }
        if desc.len() % 4 != 0 {
            return Err(Error::PfnBufferLength(desc.len()));
        }
        let mut raw = vec![0u8; desc.len() as usize];
        memory.read_slice(&mut raw, desc.addr()).map_err(|_| Error::PfnBufferOutside)?;
        for pfn in raw.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])) {
            let address = GuestAddress(u64::from(pfn) << VIRTIO_BALLOON_PFN_SHIFT);
            check_discardable(memory, address, PAGE_SIZE).map_err(|e| Error::PfnOutside(pfn, e))?;
            pages.push(Range { address, len: PAGE_SIZE });
        }
    }
    Ok(pages)
}

/// The free blocks a reporting chain names: each descriptor is one block.
pub fn reported_blocks(descriptors: &[Descriptor], memory: &GuestMemory) -> Result<Vec<Range>, Error> {
    descriptors
        .iter()
        .map(|desc| {
            if !desc.is_write_only() {
                return Err(Error::ReadableReport);
            }
            let len = u64::from(desc.len());
            check_discardable(memory, desc.addr(), len).map_err(Error::BadReport)?;
            Ok(Range { address: desc.addr(), len })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::{create_guest_memory, Sharing};
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;

    const W: u16 = VRING_DESC_F_WRITE as u16;

    fn desc(addr: u64, len: u32, flags: u16) -> Descriptor {
        Descriptor::new(addr, len, flags, 0)
    }

    fn memory() -> GuestMemory {
        create_guest_memory(16, Sharing::Private).unwrap()
    }

    #[test]
    fn inflate_buffers_name_pages_by_number() {
        let memory = memory();
        memory.write_slice(&[0x10, 0, 0, 0, 0xff, 0x0f, 0, 0], GuestAddress(0x2000)).unwrap();
        let pages = inflated_pages(&[desc(0x2000, 8, 0)], &memory).unwrap();
        assert_eq!(
            pages,
            vec![
                Range { address: GuestAddress(0x10_000), len: 4096 },
                Range { address: GuestAddress(0xfff_000), len: 4096 }
            ]
        );
    }

    #[test]
    fn bad_inflate_buffers_are_named() {
        let memory = memory();
        memory.write_slice(&0x1000u32.to_le_bytes(), GuestAddress(0x2000)).unwrap();
        let cases = [
            (desc(0x2000, 4, W), "device-writable"),
            (desc(0x2000, 6, 0), "not a whole number"),
            (desc(0xfff_ffe, 4, 0), "outside guest memory"),
            (desc(0x2000, 4, 0), "0x1000 is not guest memory"),
        ];
        for (chain, expected) in cases {
            let err = inflated_pages(&[chain], &memory).unwrap_err().to_string();
            assert!(err.contains(expected), "{chain:?}: {err}");
        }
    }

    #[test]
    fn reported_blocks_are_whole_pages_of_guest_memory() {
        let memory = memory();
        let blocks =
            reported_blocks(&[desc(0x20_0000, 0x20_0000, W), desc(0x60_0000, 4096, W)], &memory).unwrap();
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[0], Range { address: GuestAddress(0x20_0000), len: 0x20_0000 });
        let refused = [
            desc(0x20_0000, 4096, 0),
            desc(0x20_0800, 4096, W),
            desc(0x20_0000, 100, W),
            desc(0x20_0000, 0, W),
            desc(0xff_f000, 8192, W),
            desc(0x1000_0000, 4096, W),
            desc(u64::MAX - 4095, 4096, W),
        ];
        for block in refused {
            assert!(reported_blocks(&[desc(0x1000, 4096, W), block], &memory).is_err(), "{block:?}");
        }
    }
}
