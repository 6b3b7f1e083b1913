//! The network device on the event loop: queue kicks and the tap.

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::device::Net;
use super::RX_QUEUE;

impl Net {
    /// The tap is watched only while the guest has rx buffers, so a readable tap cannot spin the
    /// level-triggered loop.
    fn watch_tap(&mut self, ops: &mut EventOps, watched: bool) {
        let tap = Events::new(&self.tap, EventSet::IN);
        if watched {
            let _ = ops.add(tap);
        } else {
            let _ = ops.remove(tap);
        }
    }
}

impl MutEventSubscriber for Net {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        let was_starved = self.rx_starved;
        if self.base.handle_activation(fd, ops) {
            self.watch_tap(ops, true);
        } else if self.base.take_queue_kick(fd) == Some(RX_QUEUE) {
            self.rx_starved = false;
        }
        let tx = self.process_tx();
        let rx = self.process_rx();
        if tx || rx {
            self.base.notify_guest();
        }
        match (was_starved, self.rx_starved) {
            (false, true) => self.watch_tap(ops, false),
            (true, false) => self.watch_tap(ops, true),
            _ => {}
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.base.register_activation(ops);
    }
}
