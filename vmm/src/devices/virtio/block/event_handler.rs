//! The block device on the event loop: it watches its activation event, then its queue's ioeventfd.

use event_manager::{EventOps, Events, MutEventSubscriber};

use super::device::Block;

impl MutEventSubscriber for Block {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        // On activation the driver may already have queued requests: process them too.
        if !self.base.handle_activation(fd, ops) {
            self.base.take_queue_kick(fd);
        }
        self.process_queue();
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.base.register_activation(ops);
    }
}
