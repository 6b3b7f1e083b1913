//! The KVM-side state: guest memory, the VM (irqchip, PIT, memory slots) and the vCPUs.

pub mod memory;
pub mod vcpu;
pub mod vm;
