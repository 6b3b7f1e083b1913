//! The block device on the event loop: it watches its activation event, then its queue's ioeventfd.

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::device::Block;

impl MutEventSubscriber for Block {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        use std::os::fd::AsRawFd;
        if events.fd() == self.activate_event.as_raw_fd() {
            let _ = self.activate_event.read();
            if let Some(queue_event) = self.queue_events_for_loop() {
                // The queue's eventfd is valid for the device's life; adding it cannot fail twice.
                let _ = ops.add(Events::new(queue_event, EventSet::IN));
            }
            // Requests the driver queued before the loop was watching.
            self.process_queue();
        } else {
            if let Some(queue_event) = self.queue_events_for_loop() {
                let _ = queue_event.read();
            }
            self.process_queue();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.activate_event, EventSet::IN));
    }
}

impl Block {
    fn queue_events_for_loop(&self) -> Option<&vmm_sys_util::eventfd::EventFd> {
        use crate::devices::virtio::device::VirtioDevice;
        self.queue_events().first()
    }
}
