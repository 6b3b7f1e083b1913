//! Guest RAM laid around the 32-bit MMIO gap: anonymous mappings, or one memfd mapped shared when
//! a vhost-user backend (virtiofsd) has to map it too.

use std::os::fd::AsRawFd;

use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress,
};

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
    #[error("cannot create the memfd for {mib} MiB of shareable guest memory")]
    Memfd {
        mib: u64,
        #[source]
        source: std::io::Error,
    },
}

/// Who may map guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// The VMM alone (anonymous memory).
    Private,
    /// vhost-user backends too: a memfd whose descriptor they receive.
    Shared,
}

/// RAM below the gap first, the rest from 4 GiB up.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![(GuestAddress(0), MMIO_GAP_START), (GuestAddress(MMIO_GAP_END), size - MMIO_GAP_START)]
    }
}

pub fn create_guest_memory(mib: u32, sharing: Sharing) -> Result<GuestMemory, Error> {
    let size = u64::from(mib) << 20;
    let ranges = ram_ranges(size)
        .into_iter()
        .map(|(addr, len)| usize::try_from(len).map(|len| (addr, len)).map_err(|_| Error::TooLarge(size)))
        .collect::<Result<Vec<_>, _>>()?;
    let file = match sharing {
        Sharing::Private => None,
        Sharing::Shared => Some(memfd(size).map_err(|source| Error::Memfd { mib: u64::from(mib), source })?),
    };
    // Each range maps its own part of the memfd, in order.
    let mut offset = 0u64;
    let with_files: Vec<(GuestAddress, usize, Option<FileOffset>)> = ranges
        .iter()
        .map(|&(addr, len)| {
            let file_offset = file.as_ref().map(|f| FileOffset::from_arc(f.clone(), offset));
            offset += len as u64;
            (addr, len, file_offset)
        })
        .collect();
    let memory = GuestMemoryMmap::from_ranges_with_files(&with_files)
        .map_err(|source| Error::Map { mib: u64::from(mib), source })?;
    exclude_from_core_dumps(&memory)?;
    Ok(memory)
}

/// A sealed-size memfd of `size` bytes.
fn memfd(size: u64) -> std::io::Result<std::sync::Arc<std::fs::File>> {
    use std::os::fd::FromRawFd;
    let name = c"ironclad-guest-ram";
    // SAFETY: memfd_create takes a NUL-terminated name and flags, and returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just returned by memfd_create and nothing else owns it.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(size)?;
    // The backend maps what it is sent: the size cannot change under it.
    // SAFETY: fcntl on a descriptor this function owns, with integer arguments only.
    let sealed = unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW) };
    if sealed != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(std::sync::Arc::new(file))
}

/// Why a range of guest memory could not be given back to the host.
#[derive(Debug, thiserror::Error)]
pub enum DiscardError {
    #[error("{len:#x} bytes at {address:#x} are not whole 4 KiB pages")]
    Unaligned { address: u64, len: u64 },
    #[error("{len:#x} bytes at {address:#x} do not lie within one region of guest memory")]
    Outside { address: u64, len: u64 },
    #[error("the host refused to free {len:#x} bytes of guest memory at {address:#x}")]
    Host {
        address: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
}

/// The guest page size the balloon protocol speaks in, and the host's.
pub const PAGE_SIZE: u64 = 4096;

/// Checks that `len` bytes at `address` are whole pages inside one region: what [`discard`] needs.
pub fn check_discardable(memory: &GuestMemory, address: GuestAddress, len: u64) -> Result<(), DiscardError> {
    discardable_region(memory, address, len).map(|_| ())
}

/// The region holding `len` bytes at `address` and where in it they start, if they are whole
/// pages inside it.
fn discardable_region(
    memory: &GuestMemory,
    address: GuestAddress,
    len: u64,
) -> Result<(&GuestRegionMmap, MemoryRegionAddress), DiscardError> {
    if len == 0 || !address.0.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
        return Err(DiscardError::Unaligned { address: address.0, len });
    }
    let outside = || DiscardError::Outside { address: address.0, len };
    let (region, offset) = memory.to_region_addr(address).ok_or_else(outside)?;
    let end = offset.0.checked_add(len).ok_or_else(outside)?;
    if end > region.len() {
        return Err(outside());
    }
    Ok((region, offset))
}

/// Gives `len` bytes of guest memory at `address` back to the host: the guest reads zeros there
/// afterwards and the host's pages are freed. Anonymous memory is dropped with MADV_DONTNEED; the
/// memfd a vhost-user backend maps too has a hole punched in it, which frees the pages for every
/// process that maps them (MADV_DONTNEED would only drop this process's view of the file).
pub fn discard(memory: &GuestMemory, address: GuestAddress, len: u64) -> Result<(), DiscardError> {
    let (region, offset) = discardable_region(memory, address, len)?;
    let host_err = |source| DiscardError::Host { address: address.0, len, source };
    let outside = || DiscardError::Outside { address: address.0, len };
    let length = usize::try_from(len).map_err(|_| outside())?;
    let ret = match region.file_offset() {
        Some(file) => {
            let start = file.start().checked_add(offset.0).ok_or_else(outside)?;
            let start = libc::off_t::try_from(start).map_err(|_| outside())?;
            let length = libc::off_t::try_from(len).map_err(|_| outside())?;
            // SAFETY: fallocate on the memfd the region maps, over a range checked to lie inside
            // the region's part of it; a punched hole reads back as zeros.
            unsafe {
                libc::fallocate(
                    file.file().as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    start,
                    length,
                )
            }
        }
        None => {
            let host = region.get_host_address(offset).map_err(|_| outside())?;
            // SAFETY: the range is whole pages inside one anonymous mapping the region owns and
            // keeps alive (checked above); MADV_DONTNEED makes it read back as zeros, which the
            // guest expects of memory it gave away, and touches nothing outside it.
            unsafe { libc::madvise(host.cast(), length, libc::MADV_DONTNEED) }
        }
    };
    if ret != 0 {
        return Err(host_err(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// A crashing VMM must not write the guest's RAM (a tenant's data) into a core file.
fn exclude_from_core_dumps(memory: &GuestMemory) -> Result<(), Error> {
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
        let memory = create_guest_memory(16, Sharing::Private).unwrap();
        assert_eq!(memory.num_regions(), 1);
        assert_eq!(memory.iter().map(|r| r.len()).sum::<u64>(), 16 << 20);
    }

    #[test]
    fn shared_memory_is_one_memfd_mapped_in_order_around_the_gap() {
        let memory = create_guest_memory(16, Sharing::Shared).unwrap();
        let region = memory.iter().next().unwrap();
        let file_offset = region.file_offset().expect("a shared region is backed by the memfd");
        assert_eq!(file_offset.start(), 0);
        let link = std::fs::read_link(format!("/proc/self/fd/{}", file_offset.file().as_raw_fd())).unwrap();
        assert!(link.to_string_lossy().starts_with("/memfd:ironclad-guest-ram"), "{link:?}");
        assert_eq!(file_offset.file().metadata().unwrap().len(), 16 << 20);
        // What the guest writes is in the file, where the backend reads it.
        use vm_memory::Bytes;
        memory.write_slice(b"shared", GuestAddress(0x1000)).unwrap();
        let mut seen = [0u8; 6];
        std::os::unix::fs::FileExt::read_exact_at(file_offset.file(), &mut seen, 0x1000).unwrap();
        assert_eq!(&seen, b"shared");
    }

    #[test]
    fn guest_memory_is_left_out_of_core_dumps() {
        let memory = create_guest_memory(16, Sharing::Private).unwrap();
        let flags = first_region_smaps_field(&memory, "VmFlags:");
        assert!(flags.split_whitespace().any(|f| f == "dd"), "{flags}");
    }

    /// A field of the first region's mapping in /proc/self/smaps (its first line from there on
    /// that starts with `name`), as written after the name.
    fn first_region_smaps_field(memory: &GuestMemory, name: &str) -> String {
        let start = memory.iter().next().unwrap().as_ptr() as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let header = format!("{start:x}-");
        let mut mapping = smaps.lines().skip_while(|l| !l.starts_with(&header));
        mapping.find_map(|l| l.strip_prefix(name)).unwrap().trim().to_string()
    }

    fn resident_bytes(memory: &GuestMemory) -> u64 {
        let rss = first_region_smaps_field(memory, "Rss:");
        rss.split_whitespace().next().unwrap().parse::<u64>().unwrap() * 1024
    }

    fn discards_and_reads_back_zeros(sharing: Sharing) {
        use vm_memory::Bytes;
        let memory = create_guest_memory(16, sharing).unwrap();
        memory.write_slice(&[0xa5; 4 << 20], GuestAddress(0x40_0000)).unwrap();
        let before = resident_bytes(&memory);
        discard(&memory, GuestAddress(0x40_0000), 4 << 20).unwrap();
        let after = resident_bytes(&memory);
        assert!(before - after >= 4 << 20, "{sharing:?}: resident {before} -> {after}");
        let mut back = vec![0xffu8; 4 << 20];
        memory.read_slice(&mut back, GuestAddress(0x40_0000)).unwrap();
        assert!(back.iter().all(|b| *b == 0), "{sharing:?}: a discarded range reads as zeros");
        if let Some(file) = memory.iter().next().unwrap().file_offset() {
            let mut seen = [0xffu8; 16];
            std::os::unix::fs::FileExt::read_exact_at(file.file(), &mut seen, 0x40_0000).unwrap();
            assert_eq!(seen, [0; 16], "the memfd has a hole where the range was");
            assert_eq!(file.file().metadata().unwrap().len(), 16 << 20, "the memfd keeps its size");
        };
    }

    #[test]
    fn discarding_frees_anonymous_memory() {
        discards_and_reads_back_zeros(Sharing::Private);
    }

    #[test]
    fn discarding_punches_a_hole_in_shared_memory() {
        discards_and_reads_back_zeros(Sharing::Shared);
    }

    #[test]
    fn only_whole_pages_inside_guest_memory_are_discarded() {
        use vm_memory::Bytes;
        let memory = create_guest_memory(16, Sharing::Private).unwrap();
        memory.write_slice(&[0x5a; 8192], GuestAddress(0x1000)).unwrap();
        let refused = [
            (0x1000, 0),
            (0x1001, 4096),
            (0x1000, 100),
            (16 << 20, 4096),
            ((16 << 20) - 4096, 8192),
            (0x1000, u64::MAX - 4095),
            (u64::MAX - 4095, 4096),
        ];
        for (address, len) in refused {
            assert!(discard(&memory, GuestAddress(address), len).is_err(), "{address:#x}+{len:#x}");
        }
        let mut back = [0u8; 8192];
        memory.read_slice(&mut back, GuestAddress(0x1000)).unwrap();
        assert!(back.iter().all(|b| *b == 0x5a), "a refused range is left alone");
    }
}
