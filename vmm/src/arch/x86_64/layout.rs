//! Where things sit in guest physical memory and in the I/O spaces. The boot-time addresses follow
//! the Linux x86 boot protocol and match what Firecracker uses, so the same guests boot unchanged.

/// Global descriptor table used while entering long mode.
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty interrupt descriptor table.
pub const BOOT_IDT_START: u64 = 0x520;
/// The "zero page": Linux's `struct boot_params`, whose address is handed over in RSI.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables: one PML4, one PDPT and four page directories of 2 MiB pages, mapping the
/// first 4 GiB (RAM below the MMIO gap and the device window, so freestanding guests reach devices).
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
pub const IDENTITY_MAPPED_GIB: u64 = 4;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Start of the Extended BIOS Data Area: RAM below it is usable, above it (to 1 MiB) is reserved.
pub const EBDA_START: u64 = 0x9fc00;
/// Kernels are loaded at 1 MiB and above.
pub const HIMEM_START: u64 = 0x10_0000;
/// The 32-bit MMIO hole, where no RAM is placed: [3 GiB, 4 GiB).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio devices, one 4 KiB window each, starting here.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The first IRQ line for virtio devices; serial is on 4, the i8042 on 1.
pub const VIRTIO_IRQ_BASE: u32 = 5;
pub const VIRTIO_IRQ_MAX: u32 = 23;

pub const SERIAL_PORT: u16 = 0x3f8;
pub const SERIAL_PORT_LEN: u16 = 8;
pub const SERIAL_IRQ: u32 = 4;
pub const I8042_PORT: u16 = 0x60;
/// 0x60 (data) through 0x64 (command).
pub const I8042_PORT_LEN: u16 = 5;

/// Where the TSS pages KVM needs on Intel go: just below the 4 GiB mark, inside the MMIO gap.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
