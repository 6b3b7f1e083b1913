//! Guest RAM: anonymous mappings laid around the 32-bit MMIO gap.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::layout::{MMIO_GAP_END, MMIO_GAP_START};

pub type GuestMemory = GuestMemoryMmap;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot map {mib} MiB of guest memory")]
    Map {
        mib: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("{0} bytes of guest memory do not fit the host's address space")]
    TooLarge(u64),
}

/// RAM below the gap first, the rest from 4 GiB up.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![(GuestAddress(0), MMIO_GAP_START), (GuestAddress(MMIO_GAP_END), size - MMIO_GAP_START)]
    }
}

pub fn create_guest_memory(mib: u32) -> Result<GuestMemory, Error> {
    let size = u64::from(mib) << 20;
    let ranges = ram_ranges(size)
        .into_iter()
        .map(|(addr, len)| usize::try_from(len).map(|len| (addr, len)).map_err(|_| Error::TooLarge(size)))
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| Error::Map { mib: u64::from(mib), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn small_memory_is_one_region_from_zero() {
        assert_eq!(ram_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
    }

    #[test]
    fn memory_above_three_gib_skips_the_mmio_gap() {
        let ranges = ram_ranges(4 << 30);
        assert_eq!(ranges, vec![(GuestAddress(0), 3 << 30), (GuestAddress(4 << 30), 1 << 30)]);
    }

    #[test]
    fn creates_the_mapping() {
        let memory = create_guest_memory(16).unwrap();
        assert_eq!(memory.num_regions(), 1);
        assert_eq!(memory.iter().map(|r| r.len()).sum::<u64>(), 16 << 20);
    }
}
