//! The virtio-mmio transport (version 2, "modern"): the register window through which the driver
//! discovers a device, negotiates features, sets up queues and drives the status machine.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};

use super::device::{ActiveState, VirtioDevice};
use super::VIRTIO_F_VERSION_1;
use crate::bus::BusDevice;
use crate::vstate::memory::GuestMemory;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0;

pub const REG_MAGIC: u64 = 0x000;
pub const REG_VERSION: u64 = 0x004;
pub const REG_DEVICE_ID: u64 = 0x008;
pub const REG_VENDOR_ID: u64 = 0x00c;
pub const REG_DEVICE_FEATURES: u64 = 0x010;
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub const REG_DRIVER_FEATURES: u64 = 0x020;
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub const REG_QUEUE_SEL: u64 = 0x030;
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub const REG_QUEUE_NUM: u64 = 0x038;
pub const REG_QUEUE_READY: u64 = 0x044;
/// Writes here are caught by KVM as ioeventfds (data = queue index) and never reach the VMM.
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
pub const REG_INTERRUPT_ACK: u64 = 0x064;
pub const REG_STATUS: u64 = 0x070;
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
pub const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
pub const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
pub const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub const REG_CONFIG_GENERATION: u64 = 0x0fc;
pub const CONFIG_SPACE: u64 = 0x100;

/// Device status bits (virtio 1.2, 2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_FAILED: u32 = 128;

pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    memory: GuestMemory,
    queues: Vec<Queue>,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    queue_select: u32,
    status: u32,
    /// Accesses the transport refused: wrong width, wrong time, unknown register.
    rejected: Arc<AtomicU64>,
}

impl MmioTransport {
    pub fn new(memory: GuestMemory, device: Arc<Mutex<dyn VirtioDevice>>) -> Self {
        let sizes: Vec<u16> = device.lock().map(|d| d.queue_max_sizes().to_vec()).unwrap_or_default();
        // Queue::new fails only for sizes that are not a power of two, which devices never declare.
        let queues = sizes.iter().filter_map(|size| Queue::new(*size).ok()).collect();
        MmioTransport {
            device,
            memory,
            queues,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            queue_select: 0,
            status: 0,
            rejected: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn rejected_accesses(&self) -> Arc<AtomicU64> {
        self.rejected.clone()
    }

    fn reject(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(usize::try_from(self.queue_select).ok()?)
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK.
    fn queue_setup_allowed(&self) -> bool {
        self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED) == STATUS_FEATURES_OK
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        let Ok(device) = self.device.lock() else { return 0 };
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_select {
                0 => device.available_features() as u32,
                1 => (device.available_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => {
                drop(device);
                self.selected_queue().map(|q| u32::from(q.max_size())).unwrap_or(0)
            }
            REG_QUEUE_READY => {
                drop(device);
                self.selected_queue().map(|q| u32::from(q.ready())).unwrap_or(0)
            }
            REG_INTERRUPT_STATUS => device.interrupt().status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => 0,
            _ => {
                drop(device);
                self.reject();
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_select = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            REG_DRIVER_FEATURES => self.write_driver_features(value),
            REG_QUEUE_SEL => self.queue_select = value,
            REG_QUEUE_NUM if self.queue_setup_allowed() => {
                let valid = u16::try_from(value).ok().filter(|v| v.is_power_of_two());
                match (valid, self.selected_queue()) {
                    (Some(size), Some(queue)) if size <= queue.max_size() => queue.set_size(size),
                    _ => self.reject(),
                }
            }
            REG_QUEUE_READY if self.queue_setup_allowed() => match self.selected_queue() {
                Some(queue) => queue.set_ready(value == 1),
                None => self.reject(),
            },
            REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH
                if self.queue_setup_allowed() =>
            {
                self.write_queue_address(offset, value)
            }
            REG_INTERRUPT_ACK => {
                if let Ok(device) = self.device.lock() {
                    device.interrupt().acknowledge(value);
                }
            }
            REG_STATUS => self.write_status(value),
            _ => self.reject(),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & (STATUS_DRIVER | STATUS_FEATURES_OK) != STATUS_DRIVER {
            return self.reject();
        }
        match self.driver_features_select {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32),
            _ => self.reject(),
        }
    }

    fn write_queue_address(&mut self, offset: u64, value: u32) {
        let Some(queue) = self.selected_queue() else {
            return self.reject();
        };
        match offset {
            REG_QUEUE_DESC_LOW => queue.set_desc_table_address(Some(value), None),
            REG_QUEUE_DESC_HIGH => queue.set_desc_table_address(None, Some(value)),
            REG_QUEUE_DRIVER_LOW => queue.set_avail_ring_address(Some(value), None),
            REG_QUEUE_DRIVER_HIGH => queue.set_avail_ring_address(None, Some(value)),
            REG_QUEUE_DEVICE_LOW => queue.set_used_ring_address(Some(value), None),
            REG_QUEUE_DEVICE_HIGH => queue.set_used_ring_address(None, Some(value)),
            _ => {}
        }
    }

    /// The status machine: ACKNOWLEDGE → DRIVER → FEATURES_OK → DRIVER_OK, each adding one bit;
    /// 0 resets. A step out of order is refused (the status does not change).
    fn write_status(&mut self, value: u32) {
        if value == 0 {
            return self.reset();
        }
        let added = value & !self.status;
        let keeps_old_bits = value & self.status == self.status;
        if !keeps_old_bits {
            return self.reject();
        }
        match added {
            STATUS_ACKNOWLEDGE if self.status == 0 => self.status = value,
            STATUS_DRIVER if self.status == STATUS_ACKNOWLEDGE => self.status = value,
            STATUS_FEATURES_OK if self.status == STATUS_ACKNOWLEDGE | STATUS_DRIVER => {
                self.accept_features(value)
            }
            STATUS_DRIVER_OK if self.status == STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK => {
                self.activate(value)
            }
            STATUS_FAILED => self.status = value,
            _ => self.reject(),
        }
    }

    /// Modern devices only: a driver that did not accept VERSION_1 does not get FEATURES_OK.
    fn accept_features(&mut self, value: u32) {
        if self.driver_features & VIRTIO_F_VERSION_1 == 0 {
            return self.reject();
        }
        if let Ok(mut device) = self.device.lock() {
            device.ack_features(self.driver_features);
        }
        self.status = value;
    }

    fn activate(&mut self, value: u32) {
        let memory = &self.memory;
        let all_valid = self.queues.iter().all(|q| q.ready() && q.is_valid(memory));
        let Ok(mut device) = self.device.lock() else {
            return;
        };
        if !all_valid {
            self.status |= STATUS_FAILED;
            self.rejected.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let event_idx = device.acked_features() & super::VIRTIO_RING_F_EVENT_IDX != 0;
        // The device gets its own copies: the transport keeps answering QueueReady and friends.
        let queues: Result<Vec<Queue>, _> = self
            .queues
            .iter()
            .map(|q| {
                Queue::try_from(q.state()).map(|mut q| {
                    q.set_event_idx(event_idx);
                    q
                })
            })
            .collect();
        let Ok(queues) = queues else {
            self.status |= STATUS_FAILED;
            self.rejected.fetch_add(1, Ordering::Relaxed);
            return;
        };
        match device.activate(ActiveState { memory: self.memory.clone(), queues }) {
            Ok(()) => self.status = value,
            Err(_) => {
                self.status |= STATUS_FAILED;
                self.rejected.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Back to the power-on state. An active device cannot be reset (its queues belong to the
    /// event loop): the driver is told the device failed.
    fn reset(&mut self) {
        let active = self.device.lock().map(|d| d.is_activated()).unwrap_or(true);
        if active {
            self.status |= STATUS_FAILED;
            return;
        }
        for queue in &mut self.queues {
            queue.reset();
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.queue_select = 0;
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            if let Ok(device) = self.device.lock() {
                device.read_config(offset - CONFIG_SPACE, data);
            }
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return self.reject();
        }
        let value = self.read_register(offset);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            if let Ok(mut device) = self.device.lock() {
                device.write_config(offset - CONFIG_SPACE, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return self.reject();
        };
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::device::VirtioBase;
    use crate::vstate::memory::create_guest_memory;
    use vmm_sys_util::eventfd::EventFd;

    struct Dummy {
        base: VirtioBase,
    }

    impl VirtioDevice for Dummy {
        fn base(&self) -> &VirtioBase {
            &self.base
        }
        fn base_mut(&mut self) -> &mut VirtioBase {
            &mut self.base
        }
        fn device_type(&self) -> u32 {
            42
        }
        fn available_features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 0x5
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            crate::devices::virtio::device::read_config_bytes(&[9, 8, 7, 6], offset, data)
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Dummy>>) {
        let base = VirtioBase::new(1, EventFd::new(libc::EFD_NONBLOCK).unwrap()).unwrap();
        let device = Arc::new(Mutex::new(Dummy { base }));
        (
            MmioTransport::new(
                create_guest_memory(16, crate::vstate::memory::Sharing::Private).unwrap(),
                device.clone(),
            ),
            device,
        )
    }

    fn read(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    fn set_up_queue(t: &mut MmioTransport) {
        write(t, REG_QUEUE_SEL, 0);
        write(t, REG_QUEUE_NUM, 16);
        write(t, REG_QUEUE_DESC_LOW, 0x10_0000);
        write(t, REG_QUEUE_DRIVER_LOW, 0x10_1000);
        write(t, REG_QUEUE_DEVICE_LOW, 0x10_2000);
        write(t, REG_QUEUE_READY, 1);
    }

    #[test]
    fn identifies_itself_as_a_modern_virtio_mmio_device() {
        let (mut t, _) = transport();
        assert_eq!(read(&mut t, REG_MAGIC), MAGIC_VALUE);
        assert_eq!(read(&mut t, REG_VERSION), 2);
        assert_eq!(read(&mut t, REG_DEVICE_ID), 42);
        write(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(read(&mut t, REG_DEVICE_FEATURES), 1);
        assert_eq!(read(&mut t, REG_QUEUE_NUM_MAX), 16);
        let mut config = [0u8; 2];
        t.read(CONFIG_SPACE + 1, &mut config);
        assert_eq!(config, [8, 7]);
    }

    #[test]
    fn the_full_handshake_activates_the_device_with_its_queues() {
        let (mut t, device) = transport();
        write(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE);
        write(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        write(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        write(&mut t, REG_DRIVER_FEATURES, 1);
        write(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        write(&mut t, REG_DRIVER_FEATURES, 0x4 | 0x100);
        write(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        assert_eq!(read(&mut t, REG_STATUS) & STATUS_FEATURES_OK, STATUS_FEATURES_OK);
        assert_eq!(
            device.lock().unwrap().acked_features(),
            VIRTIO_F_VERSION_1 | 0x4,
            "unoffered bits are dropped"
        );
        set_up_queue(&mut t);
        write(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert_eq!(read(&mut t, REG_STATUS) & STATUS_DRIVER_OK, STATUS_DRIVER_OK);
        assert!(device.lock().unwrap().is_activated());
    }

    #[test]
    fn a_legacy_driver_without_version_1_is_refused() {
        let (mut t, _) = transport();
        write(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE);
        write(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        write(&mut t, REG_DRIVER_FEATURES, 0x1);
        write(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        assert_eq!(read(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn out_of_order_and_malformed_accesses_change_nothing() {
        let (mut t, device) = transport();
        write(&mut t, REG_STATUS, STATUS_DRIVER_OK);
        assert_eq!(read(&mut t, REG_STATUS), 0);
        set_up_queue(&mut t);
        assert!(!t.queues[0].ready(), "queue setup before FEATURES_OK is ignored");
        t.write(REG_STATUS, &[1, 0]);
        write(&mut t, 0x0f0, 7);
        write(&mut t, REG_QUEUE_SEL, 99);
        let mut wide = [0u8; 8];
        t.read(REG_MAGIC, &mut wide);
        assert_eq!(wide, [0; 8]);
        assert!(t.rejected_accesses().load(Ordering::Relaxed) >= 4);
        assert!(!device.lock().unwrap().is_activated());
    }

    #[test]
    fn queues_outside_guest_memory_fail_activation() {
        let (mut t, device) = transport();
        write(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE);
        write(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        write(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        write(&mut t, REG_DRIVER_FEATURES, 1);
        write(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        set_up_queue(&mut t);
        write(&mut t, REG_QUEUE_DESC_HIGH, 0x10);
        write(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert_ne!(read(&mut t, REG_STATUS) & STATUS_FAILED, 0);
        assert!(!device.lock().unwrap().is_activated());
    }
}
