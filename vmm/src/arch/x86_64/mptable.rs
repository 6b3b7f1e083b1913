//! The Intel MultiProcessor table (MP spec 1.4): how a guest without ACPI learns its CPUs, the
//! I/O APIC and the ISA interrupt routing. Placed at the start of the EBDA, where Linux looks.

use vm_memory::{Bytes, GuestAddress};

use super::layout::EBDA_START;
use crate::vstate::memory::GuestMemory;

pub const MPTABLE_START: u64 = EBDA_START;
/// The space the table may use: the first KiB of the EBDA.
const MPTABLE_LIMIT: usize = 1024;
const LAPIC_ADDRESS: u32 = 0xfee0_0000;
const IOAPIC_ADDRESS: u32 = 0xfec0_0000;
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const MP_SPEC_REVISION: u8 = 4;
/// IRQ lines of the I/O APIC routed from the ISA bus (0..=23).
const IOAPIC_PINS: u8 = 24;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;
/// Family 6 and the FPU + APIC feature flags, as a generic x86-64 processor.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("an MP table for {0} vCPUs does not fit the 1 KiB it may use")]
    TooLarge(u8),
    #[error("cannot write the MP table into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)).wrapping_neg()
}

/// The floating pointer and the configuration table that follows it, as bytes.
pub fn build(vcpus: u8) -> Result<Vec<u8>, Error> {
    let ioapic_id = vcpus;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, LAPIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDRESS.to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        // type, interrupt type, flags (conforming), source bus 0, source IRQ, I/O APIC, its pin.
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    // ExtINT to LINT0 of the boot CPU, NMI to LINT1 of every CPU.
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    const HEADER_LEN: usize = 44;
    let table_len = HEADER_LEN + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&u16::try_from(table_len).map_err(|_| Error::TooLarge(vcpus))?.to_le_bytes());
    table.extend_from_slice(&[MP_SPEC_REVISION, 0]);
    table.extend_from_slice(b"IRONCLAD");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&[0; 4]); // OEM table pointer
    table.extend_from_slice(&[0; 2]); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDRESS.to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length and checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    const FLOATING_LEN: usize = 16;
    let table_address =
        u32::try_from(MPTABLE_START).map_err(|_| Error::TooLarge(vcpus))? + FLOATING_LEN as u32;
    let mut floating = Vec::with_capacity(FLOATING_LEN);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&table_address.to_le_bytes());
    floating.extend_from_slice(&[1, MP_SPEC_REVISION, 0, 0, 0, 0, 0, 0]);
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&table);
    if floating.len() > MPTABLE_LIMIT {
        return Err(Error::TooLarge(vcpus));
    }
    Ok(floating)
}

pub fn write(memory: &GuestMemory, vcpus: u8) -> Result<(), Error> {
    memory.write_slice(&build(vcpus)?, GuestAddress(MPTABLE_START)).map_err(Error::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn both_structures_checksum_to_zero() {
        let bytes = build(4).unwrap();
        assert_eq!(&bytes[..4], b"_MP_");
        assert_eq!(sum(&bytes[..16]), 0);
        let table_len = usize::from(u16::from_le_bytes([bytes[16 + 4], bytes[16 + 5]]));
        assert_eq!(&bytes[16..20], b"PCMP");
        assert_eq!(16 + table_len, bytes.len());
        assert_eq!(sum(&bytes[16..]), 0);
    }

    #[test]
    fn one_processor_entry_per_vcpu_and_only_the_first_boots() {
        let bytes = build(3).unwrap();
        let entries = &bytes[16 + 44..];
        let processors: Vec<&[u8]> = entries.chunks(20).take(3).collect();
        assert!(processors.iter().all(|p| p[0] == ENTRY_PROCESSOR));
        assert_eq!(processors.iter().map(|p| p[1]).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(processors[0][3], CPU_ENABLED | CPU_BOOT_PROCESSOR);
        assert_eq!(processors[1][3], CPU_ENABLED);
        let count = u16::from_le_bytes([bytes[16 + 34], bytes[16 + 35]]);
        assert_eq!(count, 3 + 1 + 1 + 24 + 2);
    }

    #[test]
    fn the_largest_configuration_fits_its_space() {
        assert!(build(crate::config::MAX_VCPUS).unwrap().len() <= MPTABLE_LIMIT);
    }
}
