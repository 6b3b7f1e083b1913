//! What every virtio device is to the transport, and the state it moves through.

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::vstate::memory::GuestMemory;

/// Bits of the interrupt status register.
pub const INTERRUPT_USED_RING: u32 = 1;
pub const INTERRUPT_CONFIG_CHANGE: u32 = 2;

/// A device's interrupt: the status the driver reads and acknowledges, and the irqfd that raises
/// its line without a VMM exit.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    pub fn signal_used_queue(&self) -> std::io::Result<()> {
        self.status.fetch_or(INTERRUPT_USED_RING, Ordering::SeqCst);
        self.irqfd.write(1)
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the device expects {expected} queues, the driver set up {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("cannot signal the event loop")]
    Notify(#[source] std::io::Error),
    #[error("the device is already active")]
    AlreadyActive,
}

/// What a device works with once the driver is done setting it up.
pub struct ActiveState {
    pub memory: GuestMemory,
    pub queues: Vec<Queue>,
}

/// A device starts inactive and becomes active when the driver sets DRIVER_OK.
pub enum DeviceState {
    Inactive,
    Activated(ActiveState),
}

impl DeviceState {
    pub fn is_activated(&self) -> bool {
        matches!(self, DeviceState::Activated(_))
    }
}

pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// The features the device offers.
    fn available_features(&self) -> u64;
    fn acked_features(&self) -> u64;
    /// Called with what the driver accepted; bits the device did not offer are dropped.
    fn ack_features(&mut self, features: u64);
    /// Largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// One eventfd per queue, signalled by KVM when the driver kicks that queue.
    fn queue_events(&self) -> &[EventFd];
    fn interrupt(&self) -> &Interrupt;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Called from a vCPU thread on DRIVER_OK; the device hands the queues to its event handler.
    fn activate(&mut self, state: ActiveState) -> Result<(), ActivateError>;
    fn is_activated(&self) -> bool;
}

/// Reads `data.len()` bytes at `offset` of a config space given as bytes; what lies outside reads
/// as zero, as the spec allows for fields a device does not have.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(offset) = usize::try_from(offset) else {
        return;
    };
    if let Some(available) = config.get(offset..) {
        let len = available.len().min(data.len());
        data[..len].copy_from_slice(&available[..len]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_past_the_end_are_zero() {
        let config = [1u8, 2, 3, 4];
        let mut data = [0xffu8; 4];
        read_config_bytes(&config, 2, &mut data);
        assert_eq!(data, [3, 4, 0, 0]);
        read_config_bytes(&config, 100, &mut data);
        assert_eq!(data, [0; 4]);
    }

    #[test]
    fn interrupt_status_is_set_on_signal_and_cleared_on_ack() {
        let interrupt = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        interrupt.signal_used_queue().unwrap();
        assert_eq!(interrupt.status(), INTERRUPT_USED_RING);
        assert_eq!(interrupt.irqfd().read().unwrap(), 1);
        interrupt.acknowledge(INTERRUPT_USED_RING);
        assert_eq!(interrupt.status(), 0);
    }
}
