//! What every virtio device is to the transport, and the state it moves through.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};

use event_manager::{EventOps, Events};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::vstate::memory::GuestMemory;

/// What one drain of a queue did: the chains used, and the ring errors met (a ring the device
/// could not read or write, or an avail index that moved with nothing to pop: a corrupt ring).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    pub used: usize,
    pub ring_errors: usize,
}

/// Runs every chain the driver queued through `handle` (which returns the bytes it wrote into the
/// chain's buffers) in virtio-queue's loop: notifications off, drain, notifications back on, and
/// once more if the driver added chains meanwhile. With VIRTIO_RING_F_EVENT_IDX the driver kicks
/// only when it passes the avail index the device asked for, which enabling notifications writes:
/// a device that skipped it would hear nothing more. A corrupt ring ends the drain instead of
/// spinning on it.
pub fn drain_queue(
    queue: &mut Queue,
    memory: &GuestMemory,
    mut handle: impl FnMut(virtio_queue::DescriptorChain<&GuestMemory>) -> u32,
) -> Drained {
    let mut drained = Drained::default();
    loop {
        if queue.disable_notification(memory).is_err() {
            drained.ring_errors += 1;
            return drained;
        }
        let mut popped = 0usize;
        while let Some(chain) = queue.pop_descriptor_chain(memory) {
            popped += 1;
            let head = chain.head_index();
            let written = handle(chain);
            if queue.add_used(memory, head, written).is_err() {
                drained.ring_errors += 1;
            }
        }
        drained.used += popped;
        match queue.enable_notification(memory) {
            Ok(true) if popped > 0 => continue,
            Ok(false) => return drained,
            Ok(true) | Err(_) => {
                drained.ring_errors += 1;
                return drained;
            }
        }
    }
}

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
        Interrupt { status: AtomicU32::new(0), irqfd }
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

/// What every device keeps the same way: accepted features, state, interrupt, queue kicks and the
/// activation event.
pub struct VirtioBase {
    pub acked_features: u64,
    pub state: DeviceState,
    pub interrupt: Interrupt,
    /// One eventfd per queue, signalled by KVM when the driver kicks that queue.
    pub queue_events: Vec<EventFd>,
    /// Tells the event loop that the device became active, so it starts watching the queues.
    pub activate_event: EventFd,
}

impl VirtioBase {
    pub fn new(queues: usize, irqfd: EventFd) -> std::io::Result<Self> {
        let eventfd = || EventFd::new(libc::EFD_NONBLOCK);
        Ok(VirtioBase {
            acked_features: 0,
            state: DeviceState::Inactive,
            interrupt: Interrupt::new(irqfd),
            queue_events: (0..queues).map(|_| eventfd()).collect::<Result<_, _>>()?,
            activate_event: eventfd()?,
        })
    }

    /// Takes the queues on DRIVER_OK (from a vCPU thread) and wakes the event loop.
    pub fn activate(&mut self, state: ActiveState) -> Result<(), ActivateError> {
        if self.state.is_activated() {
            return Err(ActivateError::AlreadyActive);
        }
        if state.queues.len() != self.queue_events.len() {
            return Err(ActivateError::QueueCount {
                expected: self.queue_events.len(),
                got: state.queues.len(),
            });
        }
        self.state = DeviceState::Activated(state);
        self.activate_event.write(1).map_err(ActivateError::Notify)
    }

    /// On the event loop: if `fd` is the activation event, start watching the queue kicks.
    pub fn handle_activation(&self, fd: RawFd, ops: &mut EventOps) -> bool {
        if fd != self.activate_event.as_raw_fd() {
            return false;
        }
        let _ = self.activate_event.read();
        for queue_event in &self.queue_events {
            // Valid for the device's life: adding it can only fail if it was added already.
            let _ = ops.add(Events::new(queue_event, EventSet::IN));
        }
        true
    }

    /// If `fd` is a queue's kick, clears it and says which queue.
    pub fn take_queue_kick(&self, fd: RawFd) -> Option<usize> {
        let index = self.queue_events.iter().position(|e| e.as_raw_fd() == fd)?;
        let _ = self.queue_events[index].read();
        Some(index)
    }

    /// Kicks queue `index` from the device's side: the event loop comes back to it after what
    /// else is ready, as when a handler stops at its budget with work left.
    pub fn kick_again(&self, index: usize) {
        if let Some(queue_event) = self.queue_events.get(index) {
            // A full eventfd counter already means a pending kick.
            let _ = queue_event.write(1);
        }
    }

    /// The activation event joins the loop when the device does.
    pub fn register_activation(&self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.activate_event, EventSet::IN));
    }

    /// The guest memory and queue `index`, once the device is active.
    pub fn active_queue(&mut self, index: usize) -> Option<(&GuestMemory, &mut Queue)> {
        match &mut self.state {
            DeviceState::Activated(ActiveState { memory, queues }) => {
                Some((&*memory, queues.get_mut(index)?))
            }
            DeviceState::Inactive => None,
        }
    }

    /// One interrupt, if any queue's driver wants to hear about what was used.
    pub fn notify_guest(&mut self) {
        let DeviceState::Activated(ActiveState { memory, queues }) = &mut self.state else {
            return;
        };
        if queues.iter_mut().any(|q| q.needs_notification(&*memory).unwrap_or(true)) {
            // A full irqfd counter cannot happen in practice; a lost interrupt is re-sent with the next one.
            let _ = self.interrupt.signal_used_queue();
        }
    }
}

pub trait VirtioDevice: Send {
    fn base(&self) -> &VirtioBase;
    fn base_mut(&mut self) -> &mut VirtioBase;
    fn device_type(&self) -> u32;
    /// The features the device offers.
    fn available_features(&self) -> u64;
    /// Largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);

    fn acked_features(&self) -> u64 {
        self.base().acked_features
    }

    /// Called with what the driver accepted; bits the device did not offer are dropped.
    fn ack_features(&mut self, features: u64) {
        let offered = self.available_features();
        self.base_mut().acked_features = features & offered;
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.base().queue_events
    }

    fn interrupt(&self) -> &Interrupt {
        &self.base().interrupt
    }

    /// Called from a vCPU thread on DRIVER_OK; the device hands the queues to its event handler.
    fn activate(&mut self, state: ActiveState) -> Result<(), ActivateError> {
        self.base_mut().activate(state)
    }

    fn is_activated(&self) -> bool {
        self.base().state.is_activated()
    }
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
