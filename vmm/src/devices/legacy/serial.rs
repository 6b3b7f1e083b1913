//! The 8250 UART at 0x3f8 (vm-superio), the guest's console.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use crate::bus::BusDevice;
use crate::devices::EventFdTrigger;

pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
    /// Output the host could not take (a closed stdout, a full disk): counted, never fatal.
    failed_writes: AtomicU64,
}

impl SerialDevice {
    pub fn new(interrupt: EventFdTrigger, output: Box<dyn Write + Send>) -> Self {
        SerialDevice { serial: Serial::new(interrupt, output), failed_writes: AtomicU64::new(0) }
    }

    pub fn failed_writes(&self) -> u64 {
        self.failed_writes.load(Ordering::Relaxed)
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => *byte = self.serial.read(offset),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            if self.serial.write(offset, *byte).is_err() {
                self.failed_writes.fetch_add(1, Ordering::Relaxed);
            }
            if offset == 0 {
                let _ = self.serial.writer_mut().flush();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_written_to_the_data_register_reach_the_output() {
        let out = Shared::default();
        let irq = EventFdTrigger(EventFd::new(EFD_NONBLOCK).unwrap());
        let mut serial = SerialDevice::new(irq, Box::new(out.clone()));
        for byte in b"hi\n" {
            serial.write(0, &[*byte]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
        // Line status: transmitter empty.
        let mut lsr = [0u8];
        serial.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }

    #[test]
    fn wide_accesses_are_ignored() {
        let out = Shared::default();
        let irq = EventFdTrigger(EventFd::new(EFD_NONBLOCK).unwrap());
        let mut serial = SerialDevice::new(irq, Box::new(out.clone()));
        serial.write(0, b"ab");
        let mut data = [0u8; 2];
        serial.read(0, &mut data);
        assert_eq!(data, [0xff, 0xff]);
        assert!(out.0.lock().unwrap().is_empty());
    }
}
