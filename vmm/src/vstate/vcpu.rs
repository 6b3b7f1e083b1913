//! A vCPU: its boot configuration, its thread, and the one exit match that sends port I/O and MMIO
//! to the buses.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kvm_bindings::{kvm_lapic_state, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::{cpuid, regs};
use crate::bus::Bus;
use crate::vstate::memory::GuestMemory;
use crate::vstate::vm::Vm;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Vm(#[from] crate::vstate::vm::Error),
    #[error(transparent)]
    Regs(#[from] regs::Error),
    #[error("KVM refused the vCPU's {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot start the thread of vCPU {id}")]
    Thread {
        id: u8,
        #[source]
        source: std::io::Error,
    },
}

/// Why the VM stopped. The first reason recorded wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine (i8042, triple fault, or a KVM reset event): a normal end.
    Reset,
    /// The guest powered off.
    PowerOff,
    /// The VMM was told to stop (SIGTERM, SIGINT).
    Signal(i32),
    /// Something broke; the text says what.
    Error(String),
}

impl ExitReason {
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::Reset | ExitReason::PowerOff | ExitReason::Signal(_) => 0,
            ExitReason::Error(_) => 1,
        }
    }
}

/// Where vCPUs and devices report that the VM must stop; the event loop waits on `event`.
#[derive(Clone)]
pub struct VmExit {
    reason: Arc<Mutex<Option<ExitReason>>>,
    event: Arc<EventFd>,
}

impl VmExit {
    pub fn new() -> std::io::Result<Self> {
        Ok(VmExit { reason: Arc::new(Mutex::new(None)), event: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?) })
    }

    pub fn record(&self, reason: ExitReason) {
        if let Ok(mut slot) = self.reason.lock() {
            slot.get_or_insert(reason);
        }
        let _ = self.event.write(1);
    }

    pub fn reason(&self) -> Option<ExitReason> {
        self.reason.lock().ok().and_then(|r| r.clone())
    }

    pub fn event(&self) -> &EventFd {
        &self.event
    }

    /// Clears the wake-up, once the waiter has looked at the reason.
    pub fn consume_event(&self) {
        let _ = self.event.read();
    }
}

pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: VmExit,
}

/// What one exit means for the run loop.
#[derive(Debug, PartialEq, Eq)]
enum Emulation {
    Handled,
    Stopped(ExitReason),
}

impl Vcpu {
    pub fn new(vm: &Vm, id: u8, pio: Arc<Bus>, mmio: Arc<Bus>, exit: VmExit) -> Result<Self, Error> {
        Ok(Vcpu { id, fd: vm.create_vcpu(id)?, pio, mmio, exit })
    }

    /// CPUID, MSRs, FPU and LAPIC for every vCPU; registers for long mode on the boot vCPU.
    pub fn configure(
        &self,
        vm: &Vm,
        memory: &GuestMemory,
        entry: GuestAddress,
        count: u8,
    ) -> Result<(), Error> {
        let mut cpuid = vm.supported_cpuid()?;
        cpuid::filter_cpuid(&mut cpuid, self.id, count, vm.host_caps());
        self.fd.set_cpuid2(&cpuid).map_err(|source| Error::Kvm { what: "CPUID", source })?;
        if self.id == 0 {
            regs::configure_boot_vcpu(&self.fd, memory, entry)?;
        } else {
            regs::set_boot_msrs(&self.fd)?;
            regs::set_fpu(&self.fd)?;
        }
        self.configure_lapic()
    }

    /// LINT0 delivers the PIC's interrupts (ExtINT), LINT1 NMIs, as on a PC.
    fn configure_lapic(&self) -> Result<(), Error> {
        let mut lapic = self.fd.get_lapic().map_err(|source| Error::Kvm { what: "LAPIC (get)", source })?;
        set_lvt_delivery_mode(&mut lapic, APIC_LVT0, APIC_MODE_EXTINT);
        set_lvt_delivery_mode(&mut lapic, APIC_LVT1, APIC_MODE_NMI);
        self.fd.set_lapic(&lapic).map_err(|source| Error::Kvm { what: "LAPIC", source })
    }

    /// Runs the vCPU on its own thread until the VM stops; the reason goes to the VM exit. With a
    /// filter, the thread installs it before anything else.
    pub fn start(mut self, filter: Option<seccompiler::BpfProgram>) -> Result<JoinHandle<()>, Error> {
        let id = self.id;
        std::thread::Builder::new()
            .name(format!("ironclad_vcpu{id}"))
            .spawn(move || {
                let reason = match &filter {
                    Some(program) => match crate::seccomp::apply(crate::seccomp::ThreadKind::Vcpu, program) {
                        Ok(()) => self.run(),
                        Err(err) => ExitReason::Error(format!("vCPU {id}: {err}")),
                    },
                    None => self.run(),
                };
                self.exit.record(reason);
                // The main thread ends the process. Returning would drop the vCPU fd (close), which
                // the filter does not allow, and nothing is gained by it.
                loop {
                    std::thread::park();
                }
            })
            .map_err(|source| Error::Thread { id, source })
    }

    fn run(&mut self) -> ExitReason {
        loop {
            match self.run_once() {
                Emulation::Handled => {}
                Emulation::Stopped(reason) => return reason,
            }
        }
    }

    fn run_once(&mut self) -> Emulation {
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                self.pio.read(u64::from(port), data);
                Emulation::Handled
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                self.pio.write(u64::from(port), data);
                Emulation::Handled
            }
            Ok(VcpuExit::MmioRead(address, data)) => {
                self.mmio.read(address, data);
                Emulation::Handled
            }
            Ok(VcpuExit::MmioWrite(address, data)) => {
                self.mmio.write(address, data);
                Emulation::Handled
            }
            // With the in-kernel LAPIC, KVM only returns HLT when the guest halts with interrupts
            // off: it will never run again.
            Ok(VcpuExit::Hlt) => Emulation::Stopped(ExitReason::PowerOff),
            Ok(VcpuExit::Shutdown) => Emulation::Stopped(ExitReason::Reset),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_RESET => Emulation::Stopped(ExitReason::Reset),
                KVM_SYSTEM_EVENT_SHUTDOWN => Emulation::Stopped(ExitReason::PowerOff),
                other => Emulation::Stopped(ExitReason::Error(format!("vCPU {}: unknown system event {other}", self.id))),
            },
            Ok(VcpuExit::FailEntry(reason, cpu)) => Emulation::Stopped(ExitReason::Error(format!(
                "vCPU {}: KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})",
                self.id
            ))),
            Ok(VcpuExit::InternalError) => Emulation::Stopped(ExitReason::Error(format!(
                "vCPU {}: KVM internal error (the instruction emulator could not handle the guest's instruction)",
                self.id
            ))),
            Ok(other) => Emulation::Stopped(ExitReason::Error(format!("vCPU {}: unexpected exit {other:?}", self.id))),
            Err(err) if err.errno() == libc::EINTR || err.errno() == libc::EAGAIN => Emulation::Handled,
            Err(err) => Emulation::Stopped(ExitReason::Error(format!("vCPU {}: KVM_RUN failed: {err}", self.id))),
        }
    }
}

fn set_lvt_delivery_mode(lapic: &mut kvm_lapic_state, register: usize, mode: u32) {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[register + i] as u8);
    let value = u32::from_le_bytes(bytes);
    // Delivery mode is bits 10:8.
    let value = (value & !0x700) | (mode << 8);
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[register + i] = *byte as _;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvt_delivery_mode_keeps_the_other_bits() {
        let mut lapic = kvm_lapic_state::default();
        lapic.regs[APIC_LVT0] = 0x35u8 as _;
        lapic.regs[APIC_LVT0 + 2] = 0x01;
        set_lvt_delivery_mode(&mut lapic, APIC_LVT0, APIC_MODE_EXTINT);
        assert_eq!(lapic.regs[APIC_LVT0] as u8, 0x35);
        assert_eq!(lapic.regs[APIC_LVT0 + 1] as u8, 0x07);
        assert_eq!(lapic.regs[APIC_LVT0 + 2] as u8, 0x01);
    }

    #[test]
    fn the_first_exit_reason_wins() {
        let exit = VmExit::new().unwrap();
        exit.record(ExitReason::Reset);
        exit.record(ExitReason::Error("later".into()));
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
        assert_eq!(exit.event().read().unwrap(), 2);
    }

    #[test]
    fn only_errors_give_a_nonzero_exit_code() {
        assert_eq!(ExitReason::Reset.exit_code(), 0);
        assert_eq!(ExitReason::Signal(libc::SIGTERM).exit_code(), 0);
        assert_eq!(ExitReason::Error("x".into()).exit_code(), 1);
    }
}
