//! The network device on the event loop: queue kicks and the tap.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::device::Net;
use super::{RX_QUEUE, TX_QUEUE};

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
        if fd == self.activate_event.as_raw_fd() {
            let _ = self.activate_event.read();
            for queue_event in &self.queue_events {
                let _ = ops.add(Events::new(queue_event, EventSet::IN));
            }
            self.watch_tap(ops, true);
        } else if fd == self.queue_events[RX_QUEUE].as_raw_fd() {
            let _ = self.queue_events[RX_QUEUE].read();
            self.rx_starved = false;
        } else if fd == self.queue_events[TX_QUEUE].as_raw_fd() {
            let _ = self.queue_events[TX_QUEUE].read();
        }
        let tx = self.process_tx();
        let rx = self.process_rx();
        if tx || rx {
            self.notify_guest();
        }
        match (was_starved, self.rx_starved) {
            (false, true) => self.watch_tap(ops, false),
            (true, false) => self.watch_tap(ops, true),
            _ => {}
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.activate_event, EventSet::IN));
    }
}
