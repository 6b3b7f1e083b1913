//! Emulated devices. Interrupts leave through eventfds registered with KVM as irqfds.

pub mod legacy;
pub mod registry;
pub mod virtio;

use vmm_sys_util::eventfd::EventFd;

/// Raises an interrupt (or any other event) by writing to an eventfd.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

impl EventFdTrigger {
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(EventFdTrigger(self.0.try_clone()?))
    }
}
