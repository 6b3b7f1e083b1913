//! The vsock device on the event loop: queue kicks, the listener, handshakes and connections.

use std::os::fd::AsRawFd;
use std::time::Instant;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::device::Vsock;
use super::RX_QUEUE;

impl MutEventSubscriber for Vsock {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.sweep_timer.as_raw_fd() {
            let _ = self.sweep_timer.wait();
            self.muxer.expire(Instant::now());
        } else if !self.base.handle_activation(fd, ops) {
            match self.base.take_queue_kick(fd) {
                Some(RX_QUEUE) => self.muxer.rx_starved = false,
                // tx is drained below; the event queue is never used by this device.
                Some(_) => {}
                None => {
                    self.muxer.handle_event(fd, events.event_set());
                }
            }
        }
        // Whatever woke us, move everything that can move: guest packets first (they may open
        // connections or grant credit), then what the host side has for the guest.
        let tx = self.process_tx();
        let rx = self.process_rx();
        if tx || rx {
            self.base.notify_guest();
        }
        self.muxer.reconcile(ops);
        self.sync_metrics();
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.base.register_activation(ops);
        let _ = ops.add(Events::new(&self.sweep_timer, EventSet::IN));
        self.muxer.reconcile(ops);
    }
}
