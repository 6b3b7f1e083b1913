//! The balloon on the event loop: its activation event, then its three queues' ioeventfds.

use event_manager::{EventOps, Events, MutEventSubscriber};

use super::device::Balloon;
use super::NUM_QUEUES;

impl MutEventSubscriber for Balloon {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if self.base.handle_activation(fd, ops) {
            // The driver may have queued chains before the loop heard of the activation.
            (0..NUM_QUEUES).for_each(|index| self.process_queue(index));
        } else if let Some(index) = self.base.take_queue_kick(fd) {
            self.process_queue(index);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.base.register_activation(ops);
    }
}
