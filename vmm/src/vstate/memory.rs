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
    #[error("cannot keep guest memory out of core dumps")]
    DontDump(#[source] std::io::Error),
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
    let memory =
        GuestMemoryMmap::from_ranges(&ranges).map_err(|source| Error::Map { mib: u64::from(mib), source })?;
    exclude_from_core_dumps(&memory)?;
    Ok(memory)
}

/// A crashing VMM must not write the guest's RAM (a tenant's data) into a core file.
fn exclude_from_core_dumps(memory: &GuestMemory) -> Result<(), Error> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for region in memory.iter() {
        let len = usize::try_from(region.len()).map_err(|_| Error::TooLarge(region.len()))?;
        // SAFETY: the range is exactly one mapping the region owns and keeps alive; MADV_DONTDUMP
        // only changes how a core dump treats it.
        let ret = unsafe { libc::madvise(region.as_ptr().cast(), len, libc::MADV_DONTDUMP) };
        if ret != 0 {
            return Err(Error::DontDump(std::io::Error::last_os_error()));
        }
    }
    Ok(())
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

    #[test]
    fn guest_memory_is_left_out_of_core_dumps() {
        let memory = create_guest_memory(16).unwrap();
        let start = memory.iter().next().unwrap().as_ptr() as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let header = format!("{start:x}-");
        let mapping = smaps.split_inclusive('\n').skip_while(|l| !l.starts_with(&header)).collect::<String>();
        let flags = mapping.lines().find(|l| l.starts_with("VmFlags:")).unwrap();
        assert!(flags.split_whitespace().any(|f| f == "dd"), "{flags}");
    }
}
