//! The boot vCPU's state on entry: 64-bit long mode with identity-mapped paging, as the Linux 64-bit
//! boot protocol expects (RSI pointing at the zero page).

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Address, Bytes, GuestAddress};

use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, IDENTITY_MAPPED_GIB, PDPT_START, PD_START,
    PML4_START, ZERO_PAGE_START,
};
use crate::vstate::memory::GuestMemory;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Page table entry bits: present, writable, and (in a directory entry) a 2 MiB page.
const PTE_PRESENT_RW: u64 = 0b11;
const PDE_PAGE_SIZE: u64 = 1 << 7;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot write the boot {what} into guest memory")]
    WriteMemory {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("KVM refused the vCPU's {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM accepted only {set} of {wanted} boot MSRs")]
    PartialMsrs { set: usize, wanted: usize },
}

fn refused(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

/// A GDT descriptor from its flags, base and limit, in the processor's scattered layout.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The null descriptor, 64-bit code, data, and a TSS: what entering long mode needs.
const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// The hidden part of a segment register, as a descriptor would load it.
fn segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let bit = |shift: u32| ((entry >> shift) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: {
            let raw = ((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)) as u32;
            if bit(55) == 1 {
                (raw << 12) | 0xfff
            } else {
                raw
            }
        },
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: if bit(47) == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// Writes the GDT, an empty IDT and identity page tables, and returns the special registers for
/// 64-bit long mode with paging on.
pub fn setup_long_mode(memory: &GuestMemory, sregs: &mut kvm_sregs) -> Result<(), Error> {
    for (index, entry) in BOOT_GDT.iter().enumerate() {
        let address = GuestAddress(BOOT_GDT_START + (index as u64) * 8);
        memory.write_obj(*entry, address).map_err(|source| Error::WriteMemory { what: "GDT", source })?;
    }
    memory
        .write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|source| Error::WriteMemory { what: "IDT", source })?;
    write_identity_page_tables(memory)?;

    let code = segment_from_gdt(BOOT_GDT[1], 1);
    let data = segment_from_gdt(BOOT_GDT[2], 2);
    let tss = segment_from_gdt(BOOT_GDT[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    Ok(())
}

/// PML4[0] → PDPT; PDPT[0..4] → four page directories of 2 MiB pages: the first 4 GiB, identity.
fn write_identity_page_tables(memory: &GuestMemory) -> Result<(), Error> {
    let write = |value: u64, address: u64| {
        memory
            .write_obj(value, GuestAddress(address))
            .map_err(|source| Error::WriteMemory { what: "page tables", source })
    };
    write(PDPT_START | PTE_PRESENT_RW, PML4_START)?;
    for gib in 0..IDENTITY_MAPPED_GIB {
        let directory = PD_START + gib * 0x1000;
        write(directory | PTE_PRESENT_RW, PDPT_START + gib * 8)?;
        for entry in 0..512u64 {
            let page = (gib << 30) | (entry << 21);
            write(page | PTE_PRESENT_RW | PDE_PAGE_SIZE, directory + entry * 8)?;
        }
    }
    Ok(())
}

/// Sets every piece of boot state on the boot vCPU.
pub fn configure_boot_vcpu(vcpu: &VcpuFd, memory: &GuestMemory, entry: GuestAddress) -> Result<(), Error> {
    set_boot_msrs(vcpu)?;
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry.raw_value(),
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(refused("general registers"))?;
    let mut sregs = vcpu.get_sregs().map_err(refused("special registers (get)"))?;
    setup_long_mode(memory, &mut sregs)?;
    vcpu.set_sregs(&sregs).map_err(refused("special registers"))?;
    set_fpu(vcpu)
}

/// x87 control word and MXCSR at their reset values, as a fresh CPU has them.
pub fn set_fpu(vcpu: &VcpuFd) -> Result<(), Error> {
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(refused("FPU state"))
}

fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    let entry = |index, data| kvm_msr_entry { index, data, ..Default::default() };
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
}

/// Every vCPU starts with these MSRs.
pub fn set_boot_msrs(vcpu: &VcpuFd) -> Result<(), Error> {
    let entries = boot_msr_entries();
    let msrs =
        Msrs::from_entries(&entries).map_err(|_| Error::PartialMsrs { set: 0, wanted: entries.len() })?;
    let set = vcpu.set_msrs(&msrs).map_err(refused("MSRs"))?;
    if set != entries.len() {
        return Err(Error::PartialMsrs { set, wanted: entries.len() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;

    #[test]
    fn gdt_entries_decode_to_flat_64bit_segments() {
        let code = segment_from_gdt(BOOT_GDT[1], 1);
        assert_eq!(
            (code.base, code.limit, code.l, code.present, code.type_, code.selector),
            (0, 0xffff_ffff, 1, 1, 0xb, 8)
        );
        let data = segment_from_gdt(BOOT_GDT[2], 2);
        assert_eq!((data.db, data.l, data.type_, data.selector), (1, 0, 0x3, 16));
        assert_eq!(segment_from_gdt(BOOT_GDT[0], 0).unusable, 1);
    }

    #[test]
    fn page_tables_identity_map_the_first_four_gib() {
        let memory = create_guest_memory(16, crate::vstate::memory::Sharing::Private).unwrap();
        let mut sregs = kvm_sregs::default();
        setup_long_mode(&memory, &mut sregs).unwrap();
        assert_eq!(sregs.cr3, PML4_START);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        let pml4: u64 = memory.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPT_START);
        // The virtio-mmio window at 0xd000_0000: PDPT[3], PD entry 128.
        let pdpt3: u64 = memory.read_obj(GuestAddress(PDPT_START + 3 * 8)).unwrap();
        let pde: u64 = memory.read_obj(GuestAddress((pdpt3 & !0xfff) + 128 * 8)).unwrap();
        assert_eq!(pde & !0xfff, 0xd000_0000);
        assert_ne!(pde & PDE_PAGE_SIZE, 0);
    }
}
