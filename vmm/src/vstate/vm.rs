//! The KVM VM: guest memory slots, the in-kernel irqchip and PIT, and irqfds.

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::KVM_TSS_ADDRESS;
use crate::vstate::memory::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM lacks the {0:?} capability, which ironclad-vmm needs")]
    MissingCapability(Cap),
    #[error("KVM refused to {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn refused(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

const REQUIRED_CAPABILITIES: &[Cap] =
    &[Cap::Irqchip, Cap::Ioeventfd, Cap::Irqfd, Cap::UserMemory, Cap::SetTssAddr, Cap::Pit2, Cap::ExtCpuid];

pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
}

impl Vm {
    /// Creates the VM with its irqchip and PIT and maps `memory` into it.
    pub fn new(memory: &GuestMemory) -> Result<Self, Error> {
        let kvm = Kvm::new().map_err(Error::OpenKvm)?;
        for cap in REQUIRED_CAPABILITIES {
            if !kvm.check_extension(*cap) {
                return Err(Error::MissingCapability(*cap));
            }
        }
        let fd = kvm.create_vm().map_err(refused("create a VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize).map_err(refused("set the TSS address"))?;
        fd.create_irq_chip().map_err(refused("create the in-kernel irqchip"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit).map_err(refused("create the in-kernel PIT"))?;
        let vm = Vm { kvm, fd };
        vm.map_memory(memory)?;
        Ok(vm)
    }

    fn map_memory(&self, memory: &GuestMemory) -> Result<(), Error> {
        for (slot, region) in memory.iter().enumerate() {
            let host = memory.get_host_address(region.start_addr()).map_err(|_| Error::Kvm {
                what: "find a region's host address",
                source: kvm_ioctls::Error::new(libc::EFAULT),
            })?;
            let region = kvm_userspace_memory_region {
                slot: u32::try_from(slot).unwrap_or(u32::MAX),
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the host range [userspace_addr, +memory_size) is a live mapping owned by
            // `memory`, which the caller keeps alive for as long as this VM (the VMM holds both until
            // the process exits), and no two slots overlap because the regions of a GuestMemoryMmap
            // do not.
            unsafe { self.fd.set_user_memory_region(region) }.map_err(refused("map guest memory"))?;
        }
        Ok(())
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Interrupts raised by writing to `event` arrive at the guest on `gsi`, without a VMM exit.
    pub fn register_irqfd(&self, event: &EventFd, gsi: u32) -> Result<(), Error> {
        self.fd.register_irqfd(event, gsi).map_err(refused("register an irqfd"))
    }

    /// A 4-byte guest write of `datamatch` to the MMIO `address` signals `event` inside KVM: the
    /// vCPU does not exit, and the event loop picks the kick up.
    pub fn register_ioevent(&self, event: &EventFd, address: u64, datamatch: u32) -> Result<(), Error> {
        self.fd
            .register_ioevent(event, &IoEventAddress::Mmio(address), datamatch)
            .map_err(refused("register an ioeventfd"))
    }

    pub fn create_vcpu(&self, id: u8) -> Result<VcpuFd, Error> {
        self.fd.create_vcpu(u64::from(id)).map_err(refused("create a vCPU"))
    }

    /// What KVM backs beyond its supported CPUID.
    pub fn host_caps(&self) -> crate::arch::x86_64::cpuid::HostCaps {
        crate::arch::x86_64::cpuid::HostCaps {
            tsc_deadline_timer: self.kvm.check_extension(Cap::TscDeadlineTimer),
        }
    }

    pub fn supported_cpuid(&self) -> Result<CpuId, Error> {
        self.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(refused("report its supported CPUID"))
    }
}
