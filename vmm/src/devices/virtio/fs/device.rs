//! The vhost-user-fs device: its config space (tag, one request queue), the features the backend
//! offers, and the vhost-user messages that give the backend guest memory and the queues.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::{NUM_QUEUES, QUEUE_SIZE};
use crate::devices::virtio::device::{read_config_bytes, ActiveState, DeviceState, VirtioBase, VirtioDevice};
use crate::devices::virtio::TYPE_FS;
use crate::vstate::memory::GuestMemory;

/// The tag field of the config space.
const TAG_LEN: usize = 36;
/// Protocol features asked of the backend: several queues, and an answer to every message (so
/// that a refused memory table or vring is an error here, not a silent hang).
const WANTED_PROTOCOL_FEATURES: VhostUserProtocolFeatures =
    VhostUserProtocolFeatures::MQ.union(VhostUserProtocolFeatures::REPLY_ACK);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to the vhost-user socket {socket}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: vhost::Error,
    },
    #[error("vhost-user {step} failed")]
    Backend {
        step: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("guest memory is not shareable (a memfd is needed for a vhost-user backend)")]
    MemoryNotShared(#[source] vhost::Error),
    #[error("queue {queue}'s {ring} at {address:#x} is outside guest memory")]
    RingOutsideMemory { queue: usize, ring: &'static str, address: u64 },
    #[error("cannot create an eventfd for virtio-fs")]
    EventFd(#[source] std::io::Error),
}

fn step(step: &'static str) -> impl FnOnce(vhost::Error) -> Error {
    move |source| Error::Backend { step, source }
}

#[derive(Debug, Default, Serialize)]
pub struct FsMetrics {
    /// Calls from the backend passed on to the guest as an interrupt.
    pub interrupts: AtomicU64,
    /// Activations whose vring setup the backend refused (the device then stays silent).
    pub activate_fails: AtomicU64,
}

pub struct VhostUserFs {
    pub(super) base: VirtioBase,
    /// One eventfd per queue that the backend signals when it has used buffers.
    pub(super) calls: Vec<EventFd>,
    frontend: Frontend,
    tag: String,
    config: [u8; TAG_LEN + 4],
    /// What the backend offers, less the vhost-user-only bit.
    offered_features: u64,
    /// VHOST_USER_F_PROTOCOL_FEATURES was offered: it is acked, and the rings start disabled.
    protocol_features: bool,
    metrics: Arc<FsMetrics>,
}

impl VhostUserFs {
    /// Connects to the backend and gives it guest memory; the queues follow on activation.
    pub fn new(socket: &Path, tag: &str, memory: &GuestMemory, irqfd: EventFd) -> Result<Self, Error> {
        let mut frontend = Frontend::connect(socket, NUM_QUEUES as u64)
            .map_err(|source| Error::Connect { socket: socket.to_path_buf(), source })?;
        frontend.set_owner().map_err(step("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(step("GET_FEATURES"))?;
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let protocol_features = backend_features & protocol_bit != 0;
        if protocol_features {
            let theirs = frontend.get_protocol_features().map_err(step("GET_PROTOCOL_FEATURES"))?;
            frontend
                .set_protocol_features(theirs & WANTED_PROTOCOL_FEATURES)
                .map_err(step("SET_PROTOCOL_FEATURES"))?;
        }
        let regions = memory
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(Error::MemoryNotShared)?;
        frontend.set_mem_table(&regions).map_err(step("SET_MEM_TABLE"))?;
        let calls = (0..NUM_QUEUES)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(Error::EventFd)?;
        Ok(VhostUserFs {
            base: VirtioBase::new(NUM_QUEUES, irqfd).map_err(Error::EventFd)?,
            calls,
            frontend,
            tag: tag.to_string(),
            config: config_space(tag),
            offered_features: backend_features & !protocol_bit,
            protocol_features,
            metrics: Arc::new(FsMetrics::default()),
        })
    }

    pub fn metrics(&self) -> Arc<FsMetrics> {
        self.metrics.clone()
    }

    /// On activation: the driver's features and each queue to the backend. A refusal leaves the
    /// device silent (the guest's mount then fails) and is counted and said on stderr; the VM
    /// goes on.
    pub(super) fn start_backend(&mut self) -> bool {
        match self.set_up_vrings() {
            Ok(()) => true,
            Err(err) => {
                self.metrics.activate_fails.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "virtio-fs {}: the backend refused the queues: {}",
                    self.tag,
                    ironclad_protocol::error_chain(&err)
                );
                false
            }
        }
    }

    fn set_up_vrings(&mut self) -> Result<(), Error> {
        let DeviceState::Activated(ActiveState { memory, queues }) = &self.base.state else {
            return Ok(());
        };
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let features = self.base.acked_features | if self.protocol_features { protocol_bit } else { 0 };
        self.frontend.set_features(features).map_err(step("SET_FEATURES"))?;
        for (index, queue) in queues.iter().enumerate() {
            self.frontend.set_vring_num(index, queue.size()).map_err(step("SET_VRING_NUM"))?;
            let addresses = vring_addresses(memory, index, queue)?;
            self.frontend.set_vring_addr(index, &addresses).map_err(step("SET_VRING_ADDR"))?;
            self.frontend.set_vring_base(index, 0).map_err(step("SET_VRING_BASE"))?;
            self.frontend.set_vring_call(index, &self.calls[index]).map_err(step("SET_VRING_CALL"))?;
            let kick = &self.base.queue_events[index];
            self.frontend.set_vring_kick(index, kick).map_err(step("SET_VRING_KICK"))?;
            if self.protocol_features {
                self.frontend.set_vring_enable(index, true).map_err(step("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    /// The backend used buffers: the guest hears of it through the transport's interrupt.
    pub(super) fn forward_call(&self) {
        self.metrics.interrupts.fetch_add(1, Ordering::Relaxed);
        // A full irqfd counter cannot happen in practice; a lost interrupt is re-sent with the next.
        let _ = self.base.interrupt.signal_used_queue();
    }
}

/// The tag (NUL-padded) and the number of request queues, 1.
fn config_space(tag: &str) -> [u8; TAG_LEN + 4] {
    let mut config = [0u8; TAG_LEN + 4];
    let len = tag.len().min(TAG_LEN);
    config[..len].copy_from_slice(&tag.as_bytes()[..len]);
    config[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
    config
}

/// The host addresses of a queue's rings, which the backend finds in its mapping of guest memory.
fn vring_addresses(memory: &GuestMemory, index: usize, queue: &Queue) -> Result<VringConfigData, Error> {
    let host = |ring: &'static str, address: u64| {
        memory
            .get_host_address(GuestAddress(address))
            .map(|ptr| ptr as u64)
            .map_err(|_| Error::RingOutsideMemory { queue: index, ring, address })
    };
    Ok(VringConfigData {
        queue_max_size: queue.max_size(),
        queue_size: queue.size(),
        flags: 0,
        desc_table_addr: host("descriptor table", queue.desc_table())?,
        used_ring_addr: host("used ring", queue.used_ring())?,
        avail_ring_addr: host("available ring", queue.avail_ring())?,
        log_addr: None,
    })
}

impl VirtioDevice for VhostUserFs {
    fn base(&self) -> &VirtioBase {
        &self.base
    }

    fn base_mut(&mut self) -> &mut VirtioBase {
        &mut self.base
    }

    fn device_type(&self) -> u32 {
        TYPE_FS
    }

    fn available_features(&self) -> u64 {
        self.offered_features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    /// The config space is read-only.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_space_holds_the_padded_tag_and_one_request_queue() {
        let config = config_space("ironclad");
        assert_eq!(&config[..8], b"ironclad");
        assert!(config[8..TAG_LEN].iter().all(|b| *b == 0));
        assert_eq!(u32::from_le_bytes(config[TAG_LEN..].try_into().unwrap()), 1);
    }
}
