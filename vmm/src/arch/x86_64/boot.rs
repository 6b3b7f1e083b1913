//! The Linux x86 boot protocol: kernel, initrd and command line placed by linux-loader, and the zero
//! page (`boot_params`) with its e820 map.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, Error as ElfError};
use linux_loader::loader::{load_cmdline, Cmdline, KernelLoader, KernelLoaderResult};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::layout::{CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_START, ZERO_PAGE_START};
use crate::config::MAX_CMDLINE_LEN;
use crate::vstate::memory::GuestMemory;

const E820_RAM: u32 = 1;
/// "HdrS": the setup header's magic.
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// Boot loader type "undefined" in the boot protocol's registry.
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// In a bzImage, the 64-bit entry point lies 0x200 bytes into the protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open {what} {path}")]
    Open {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load the kernel {path}: it is neither a loadable ELF vmlinux nor a bzImage")]
    LoadKernel {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("the initrd {path} ({size} bytes) does not fit in guest memory below {limit:#x}")]
    InitrdTooLarge { path: PathBuf, size: u64, limit: u64 },
    #[error("cannot copy the initrd {path} into guest memory")]
    LoadInitrd {
        path: PathBuf,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("cannot write the kernel command line into guest memory")]
    WriteCmdline(#[source] linux_loader::loader::Error),
    #[error("cannot write the zero page")]
    WriteBootParams(#[source] linux_loader::configurator::Error),
    #[error("more memory regions than the e820 table holds")]
    TooManyE820Entries,
}

/// Where the loaded kernel wants to be entered, and what its image said about itself.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    pub entry: GuestAddress,
    /// Present for a bzImage: its setup header seeds the zero page.
    pub setup_header: Option<setup_header>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedInitrd {
    pub address: GuestAddress,
    pub size: u64,
}

/// Loads an ELF vmlinux (entered at its ELF entry) or a bzImage (entered at its 64-bit entry).
pub fn load_kernel(memory: &GuestMemory, path: &Path) -> Result<LoadedKernel, Error> {
    let mut file =
        File::open(path).map_err(|source| Error::Open { what: "kernel", path: path.into(), source })?;
    let load_err = |source| Error::LoadKernel { path: path.into(), source };
    match Elf::load(memory, None, &mut file, Some(GuestAddress(HIMEM_START))) {
        Ok(result) => Ok(LoadedKernel { entry: result.kernel_load, setup_header: None }),
        Err(linux_loader::loader::Error::Elf(ElfError::InvalidElfMagicNumber)) => {
            file.seek(SeekFrom::Start(0)).map_err(|source| Error::Open {
                what: "kernel",
                path: path.into(),
                source,
            })?;
            let result: KernelLoaderResult =
                BzImage::load(memory, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(load_err)?;
            Ok(LoadedKernel {
                entry: result.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
                setup_header: result.setup_header,
            })
        }
        Err(source) => Err(load_err(source)),
    }
}

/// Puts the initrd as high as it can go in the low RAM region, page aligned, where the kernel's
/// early allocations will not collide with it.
pub fn load_initrd(memory: &GuestMemory, path: &Path) -> Result<LoadedInitrd, Error> {
    let open_err = |source| Error::Open { what: "initrd", path: path.into(), source };
    let mut file = File::open(path).map_err(open_err)?;
    let size = file.metadata().map_err(open_err)?.len();
    let low_ram_end =
        memory.iter().next().map(|r| r.start_addr().unchecked_add(r.len()).raw_value()).unwrap_or(0);
    let limit = low_ram_end.min(MMIO_GAP_START);
    let too_large = || Error::InitrdTooLarge { path: path.into(), size, limit };
    let address = limit.checked_sub(size).ok_or_else(too_large)? & !(PAGE_SIZE - 1);
    if address < HIMEM_START {
        return Err(too_large());
    }
    let len = usize::try_from(size).map_err(|_| too_large())?;
    memory
        .read_exact_volatile_from(GuestAddress(address), &mut file, len)
        .map_err(|source| Error::LoadInitrd { path: path.into(), source })?;
    Ok(LoadedInitrd { address: GuestAddress(address), size })
}

/// Writes the command line to its fixed address.
pub fn load_command_line(memory: &GuestMemory, text: &str) -> Result<(), Error> {
    let mut cmdline = Cmdline::new(MAX_CMDLINE_LEN).map_err(Error::Cmdline)?;
    cmdline.insert_str(text).map_err(Error::Cmdline)?;
    load_cmdline(memory, GuestAddress(CMDLINE_START), &cmdline).map_err(Error::WriteCmdline)
}

/// `boot_params` as bytes for linux-loader's configurator.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ZeroPage(boot_params);

// SAFETY: boot_params is a bindgen-generated plain-old-data struct of integers and arrays of integers;
// every bit pattern is a valid value and it has no padding that could leak uninitialised memory
// (it is packed).
unsafe impl ByteValued for ZeroPage {}

/// Fills in and writes the zero page: setup header, command line, initrd and e820 map.
pub fn write_zero_page(
    memory: &GuestMemory,
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<LoadedInitrd>,
) -> Result<(), Error> {
    let mut params = boot_params::default();
    if let Some(header) = kernel.setup_header {
        params.hdr = header;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = u32::try_from(cmdline_len + 1).unwrap_or(u32::MAX);
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = u32::try_from(initrd.address.raw_value()).unwrap_or(0);
        params.hdr.ramdisk_size = u32::try_from(initrd.size).unwrap_or(0);
    }
    let entries = e820_entries(memory);
    if entries.len() > params.e820_table.len() {
        return Err(Error::TooManyE820Entries);
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(&entries) {
        *slot = *entry;
    }
    params.e820_entries = u8::try_from(entries.len()).map_err(|_| Error::TooManyE820Entries)?;
    LinuxBootConfigurator::write_bootparams::<GuestMemory>(
        &BootParams::new(&ZeroPage(params), GuestAddress(ZERO_PAGE_START)),
        memory,
    )
    .map_err(Error::WriteBootParams)
}

/// RAM as the guest may use it: below the EBDA, then from 1 MiB to the end of each region.
pub fn e820_entries(memory: &GuestMemory) -> Vec<boot_e820_entry> {
    let ram = |addr: u64, size: u64| boot_e820_entry { addr, size, r#type: E820_RAM };
    let mut entries = vec![ram(0, EBDA_START)];
    for region in memory.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            entries.push(ram(start, end - start));
        }
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;

    #[test]
    fn e820_leaves_the_bios_hole_out() {
        let memory = create_guest_memory(64, crate::vstate::memory::Sharing::Private).unwrap();
        let entries: Vec<(u64, u64)> = e820_entries(&memory).iter().map(|e| (e.addr, e.size)).collect();
        assert_eq!(entries, vec![(0, EBDA_START), (HIMEM_START, (64 << 20) - HIMEM_START)]);
    }

    #[test]
    fn initrd_goes_page_aligned_at_the_top_of_low_ram() {
        let memory = create_guest_memory(32, crate::vstate::memory::Sharing::Private).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("initrd");
        std::fs::write(&path, vec![0xab; 5000]).unwrap();
        let initrd = load_initrd(&memory, &path).unwrap();
        assert_eq!(initrd.size, 5000);
        assert_eq!(initrd.address.raw_value() % PAGE_SIZE, 0);
        assert!(initrd.address.raw_value() + 5000 <= 32 << 20);
        let byte: u8 = memory.read_obj(initrd.address.unchecked_add(4999)).unwrap();
        assert_eq!(byte, 0xab);
    }

    #[test]
    fn an_initrd_larger_than_memory_is_refused() {
        let memory = create_guest_memory(16, crate::vstate::memory::Sharing::Private).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("initrd");
        std::fs::File::create(&path).unwrap().set_len(17 << 20).unwrap();
        assert!(matches!(load_initrd(&memory, &path), Err(Error::InitrdTooLarge { .. })));
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let memory = create_guest_memory(16, crate::vstate::memory::Sharing::Private).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kernel");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let err = load_kernel(&memory, &path).unwrap_err();
        assert!(matches!(err, Error::LoadKernel { .. }), "{err}");
    }

    #[test]
    fn zero_page_carries_cmdline_initrd_and_memory_map() {
        let memory = create_guest_memory(64, crate::vstate::memory::Sharing::Private).unwrap();
        load_command_line(&memory, "console=ttyS0").unwrap();
        let kernel = LoadedKernel { entry: GuestAddress(HIMEM_START), setup_header: None };
        let initrd = LoadedInitrd { address: GuestAddress(0x300_0000), size: 4096 };
        write_zero_page(&memory, &kernel, "console=ttyS0".len(), Some(initrd)).unwrap();
        let params: ZeroPage = memory.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let hdr = params.0.hdr;
        assert_eq!({ hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ params.0.e820_entries }, 2);
        let mut text = [0u8; 14];
        memory.read_slice(&mut text, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&text, b"console=ttyS0\0");
    }
}
