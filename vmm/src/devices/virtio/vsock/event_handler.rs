//! The vsock device on the event loop: queue kicks, the listener, handshakes and connections.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::device::Vsock;
use super::{RX_QUEUE, TX_QUEUE};

impl MutEventSubscriber for Vsock {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.activate_event.as_raw_fd() {
            let _ = self.activate_event.read();
            for queue_event in &self.queue_events {
                let _ = ops.add(Events::new(queue_event, EventSet::IN));
            }
        } else if fd == self.queue_events[RX_QUEUE].as_raw_fd() {
            let _ = self.queue_events[RX_QUEUE].read();
            self.muxer.rx_starved = false;
        } else if fd == self.queue_events[TX_QUEUE].as_raw_fd() {
            let _ = self.queue_events[TX_QUEUE].read();
        } else if self.queue_events.iter().any(|e| e.as_raw_fd() == fd) {
            // The event queue: the device never uses it; the kick is just cleared.
            let _ = self
                .queue_events
                .iter()
                .find(|e| e.as_raw_fd() == fd)
                .map(|e| e.read());
        } else {
            self.muxer.handle_event(fd, events.event_set());
        }
        // Whatever woke us, move everything that can move: guest packets first (they may open
        // connections or grant credit), then what the host side has for the guest.
        let tx = self.process_tx();
        let rx = self.process_rx();
        if tx || rx {
            self.notify_guest();
        }
        self.muxer.reconcile(ops);
        self.sync_metrics();
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.activate_event, EventSet::IN));
        self.muxer.reconcile(ops);
    }
}
