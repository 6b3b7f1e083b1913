//! The CPUID a vCPU shows: KVM's supported set, filtered so that the guest sees a VM with our
//! topology and nothing the VMM does not back.

use kvm_bindings::CpuId;

/// Leaf 1 ECX bit 31: "running under a hypervisor".
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX bit 28: more than one logical processor per package.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 1 ECX bit 24: the local APIC timer has TSC-deadline mode. KVM emulates it in its in-kernel
/// APIC but leaves the bit to the VMM. Without it Linux calibrates the APIC timer against 100 ms
/// of PIT ticks at boot, a spin that waits on interrupts the host must inject.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 6 ECX bit 3: energy-performance bias, which needs MSRs we do not emulate.
const LEAF6_ECX_EPB: u32 = 1 << 3;
/// Leaf 7 subleaf 0 EBX bit 22: the PCOMMIT instruction (deprecated; KVM does not back it).
const LEAF7_EBX_PCOMMIT: u32 = 1 << 22;

/// What the host's KVM can back beyond its supported CPUID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostCaps {
    /// KVM_CAP_TSC_DEADLINE_TIMER.
    pub tsc_deadline_timer: bool,
}

/// Adjusts KVM's supported CPUID for vCPU `id` of `count`.
pub fn filter_cpuid(cpuid: &mut CpuId, id: u8, count: u8, host: HostCaps) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            0x1 => {
                entry.ecx |= LEAF1_ECX_HYPERVISOR;
                if host.tsc_deadline_timer {
                    entry.ecx |= LEAF1_ECX_TSC_DEADLINE;
                }
                // EBX: initial APIC id in 31:24, logical processor count in 23:16, CLFLUSH size 15:8.
                entry.ebx = (u32::from(id) << 24) | (u32::from(count) << 16) | (8 << 8);
                if count > 1 {
                    entry.edx |= LEAF1_EDX_HTT;
                } else {
                    entry.edx &= !LEAF1_EDX_HTT;
                }
            }
            0x4 => {
                // Cores per package in EAX 31:26 (minus one); clear the cache-sharing count 25:14.
                entry.eax &= 0x3fff;
                entry.eax |= u32::from(count.saturating_sub(1)) << 26;
            }
            0x6 => entry.ecx &= !LEAF6_ECX_EPB,
            0x7 if entry.index == 0 => entry.ebx &= !LEAF7_EBX_PCOMMIT,
            0xb => {
                // Extended topology: every vCPU is its own core on one package.
                entry.edx = u32::from(id);
                match entry.index {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = 1 << 8;
                    }
                    1 => {
                        entry.eax = 8;
                        entry.ebx = u32::from(count);
                        entry.ecx = (2 << 8) | 1;
                    }
                    n => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = n;
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn cpuid_of(entries: &[(u32, u32)]) -> CpuId {
        let entries: Vec<kvm_cpuid_entry2> = entries
            .iter()
            .map(|&(function, index)| kvm_cpuid_entry2 { function, index, ..Default::default() })
            .collect();
        CpuId::from_entries(&entries).unwrap()
    }

    #[test]
    fn leaf1_says_hypervisor_and_carries_the_apic_id() {
        let mut cpuid = cpuid_of(&[(0x1, 0)]);
        filter_cpuid(&mut cpuid, 2, 4, HostCaps { tsc_deadline_timer: false });
        let leaf = cpuid.as_slice()[0];
        assert_ne!(leaf.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(leaf.ecx & LEAF1_ECX_TSC_DEADLINE, 0, "not where KVM lacks it");
        assert_eq!(leaf.ebx >> 24, 2);
        assert_eq!((leaf.ebx >> 16) & 0xff, 4);
        assert_ne!(leaf.edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn the_apic_timer_offers_tsc_deadline_mode_where_kvm_backs_it() {
        let mut cpuid = cpuid_of(&[(0x1, 0)]);
        filter_cpuid(&mut cpuid, 0, 1, HostCaps { tsc_deadline_timer: true });
        assert_ne!(cpuid.as_slice()[0].ecx & LEAF1_ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn extended_topology_names_the_vcpu() {
        let mut cpuid = cpuid_of(&[(0xb, 0), (0xb, 1), (0xb, 2)]);
        filter_cpuid(&mut cpuid, 1, 2, HostCaps { tsc_deadline_timer: true });
        let leaves = cpuid.as_slice();
        assert!(leaves.iter().all(|l| l.edx == 1));
        assert_eq!(leaves[1].ebx, 2);
        assert_eq!(leaves[2].ecx, 2, "levels past the core level are invalid");
    }
}
