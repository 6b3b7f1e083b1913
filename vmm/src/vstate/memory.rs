//! Guest RAM laid around the 32-bit MMIO gap: anonymous mappings, or one memfd mapped shared when
//! a vhost-user backend (virtiofsd) has to map it too.

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

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
        let memory = create_guest_memory(16, Sharing::Private).unwrap();
        assert_eq!(memory.num_regions(), 1);
        assert_eq!(memory.iter().map(|r| r.len()).sum::<u64>(), 16 << 20);
    }

    #[test]
    fn shared_memory_is_one_memfd_mapped_in_order_around_the_gap() {
        use std::os::fd::AsRawFd;
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
        let start = memory.iter().next().unwrap().as_ptr() as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let header = format!("{start:x}-");
        let mapping = smaps.split_inclusive('\n').skip_while(|l| !l.starts_with(&header)).collect::<String>();
        let flags = mapping.lines().find(|l| l.starts_with("VmFlags:")).unwrap();
        assert!(flags.split_whitespace().any(|f| f == "dd"), "{flags}");
    }
}
