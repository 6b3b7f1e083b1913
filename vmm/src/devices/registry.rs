//! The VM's virtio devices by id (`block:<serial>`, `net:<tap>`, `vsock`, `fs:<tag>`), as the
//! builder attached them: where each sits (MMIO window, IRQ line), the device itself and what its
//! transport refused. Devices are found and counted by id here, as Firecracker's device manager
//! does. (A device the driver activated is not reset from the host: its queues belong to the
//! event loop, and the transport answers a driver's reset of an active device with FAILED.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::virtio::device::VirtioDevice;
use crate::arch::x86_64::layout::{VIRTIO_IRQ_BASE, VIRTIO_IRQ_MAX, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("more virtio devices than IRQ lines ({VIRTIO_IRQ_BASE}..={VIRTIO_IRQ_MAX})")]
    TooManyDevices,
    #[error("two devices are both named {0:?}")]
    DuplicateId(String),
}

/// Where a device sits: the base of its MMIO window and its IRQ line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Slot {
    pub mmio_base: u64,
    pub irq: u32,
}

pub struct DeviceEntry {
    pub id: String,
    pub slot: Slot,
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    /// Accesses the device's transport refused.
    rejected: Arc<AtomicU64>,
}

/// What the metrics file says of each device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceCounters {
    pub id: String,
    pub mmio_base: u64,
    pub irq: u32,
    /// The driver set DRIVER_OK and the device took its queues.
    pub activated: bool,
    pub rejected_accesses: u64,
}

#[derive(Default)]
pub struct DeviceRegistry {
    entries: Vec<DeviceEntry>,
}

impl DeviceRegistry {
    /// The slot the next device gets: windows one after another from VIRTIO_MMIO_START, one IRQ
    /// line each.
    pub fn next_slot(&self) -> Result<Slot, Error> {
        let index = u32::try_from(self.entries.len()).map_err(|_| Error::TooManyDevices)?;
        let irq = VIRTIO_IRQ_BASE
            .checked_add(index)
            .filter(|irq| *irq <= VIRTIO_IRQ_MAX)
            .ok_or(Error::TooManyDevices)?;
        Ok(Slot { mmio_base: VIRTIO_MMIO_START + u64::from(index) * VIRTIO_MMIO_SIZE, irq })
    }

    /// Records a device in the slot [`DeviceRegistry::next_slot`] gave.
    pub fn register(
        &mut self,
        id: String,
        slot: Slot,
        device: Arc<Mutex<dyn VirtioDevice>>,
        rejected: Arc<AtomicU64>,
    ) -> Result<(), Error> {
        if self.get(&id).is_some() {
            return Err(Error::DuplicateId(id));
        }
        self.entries.push(DeviceEntry { id, slot, device, rejected });
        Ok(())
    }

    pub fn get(&self, id: &str) -> Option<&DeviceEntry> {
        self.entries.iter().find(|e| e.id == id)
    }

    /// Ids in attach order (the guest's probe order).
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.id.as_str())
    }

    pub fn counters(&self) -> Vec<DeviceCounters> {
        self.entries
            .iter()
            .map(|e| DeviceCounters {
                id: e.id.clone(),
                mmio_base: e.slot.mmio_base,
                irq: e.slot.irq,
                activated: e.device.lock().map(|d| d.is_activated()).unwrap_or(false),
                rejected_accesses: e.rejected.load(Ordering::Relaxed),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::{Block, Disk};
    use vmm_sys_util::eventfd::EventFd;

    fn a_device(dir: &std::path::Path, serial: &str) -> Arc<Mutex<dyn VirtioDevice>> {
        let path = dir.join(serial);
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let disk = Disk::open(&path, true, serial).unwrap();
        Arc::new(Mutex::new(Block::new(disk, EventFd::new(libc::EFD_NONBLOCK).unwrap()).unwrap()))
    }

    #[test]
    fn devices_get_consecutive_slots_and_are_found_by_a_unique_id() {
        let dir = tempfile::tempdir().unwrap();
        let mut registry = DeviceRegistry::default();
        for serial in ["rootfs", "scratch"] {
            let slot = registry.next_slot().unwrap();
            let rejected = Arc::new(AtomicU64::new(0));
            registry
                .register(format!("block:{serial}"), slot, a_device(dir.path(), serial), rejected)
                .unwrap();
        }
        let second = registry.get("block:scratch").unwrap().slot;
        assert_eq!(
            second,
            Slot { mmio_base: VIRTIO_MMIO_START + VIRTIO_MMIO_SIZE, irq: VIRTIO_IRQ_BASE + 1 }
        );
        assert_eq!(registry.ids().collect::<Vec<_>>(), ["block:rootfs", "block:scratch"]);
        assert!(registry.get("net:tap0").is_none());
        let slot = registry.next_slot().unwrap();
        let duplicate = registry.register(
            "block:rootfs".into(),
            slot,
            a_device(dir.path(), "again"),
            Arc::new(AtomicU64::new(0)),
        );
        assert!(matches!(duplicate, Err(Error::DuplicateId(id)) if id == "block:rootfs"));
        let counters = registry.counters();
        assert_eq!(counters.len(), 2);
        assert!(!counters[0].activated);
        assert_eq!(counters[1].irq, VIRTIO_IRQ_BASE + 1);
    }

    #[test]
    fn the_irq_lines_bound_the_number_of_devices() {
        let dir = tempfile::tempdir().unwrap();
        let mut registry = DeviceRegistry::default();
        for n in 0..=(VIRTIO_IRQ_MAX - VIRTIO_IRQ_BASE) {
            let slot = registry.next_slot().unwrap();
            let serial = format!("d{n}");
            registry.register(serial.clone(), slot, a_device(dir.path(), &serial), Arc::default()).unwrap();
        }
        assert!(matches!(registry.next_slot(), Err(Error::TooManyDevices)));
    }
}
