//! The virtio-fs device on the event loop: activation (the vhost-user vring setup) and the
//! backend's calls, passed on as the transport's interrupt.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::device::VhostUserFs;

impl MutEventSubscriber for VhostUserFs {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.base.activate_event.as_raw_fd() {
            let _ = self.base.activate_event.read();
            // The kicks are the backend's to read: only the calls join this loop.
            if self.start_backend() {
                for call in &self.calls {
                    let _ = ops.add(Events::new(call, EventSet::IN));
                }
            }
        } else if let Some(call) = self.calls.iter().find(|c| c.as_raw_fd() == fd) {
            let _ = call.read();
            self.forward_call();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.base.register_activation(ops);
    }
}
