//! x86_64: the guest physical layout, the Linux boot protocol, and the vCPU's boot state.

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
