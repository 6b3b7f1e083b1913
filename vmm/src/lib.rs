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
pub mod logger;
pub mod seccomp;
pub mod vstate;

/// "outer: inner: innermost", for the one line the VMM says on stderr.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
