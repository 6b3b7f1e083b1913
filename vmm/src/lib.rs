//! ironclad-vmm: one KVM microVM per sandbox.
//!
//! [`config::VmConfig`] describes the VM and is validated as a whole before any KVM call;
//! [`builder::build`] builds it (memory, irqchip, kernel, devices in a registry by id, vCPUs) into
//! a [`builder::Vmm`], which runs until the guest resets, powers off, or the VMM is told to stop.

pub mod arch;
pub mod builder;
pub mod bus;
pub mod config;
pub mod devices;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod logger;
pub mod seccomp;
pub mod vstate;
