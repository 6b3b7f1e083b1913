//! One bus for each address space (port I/O and MMIO): an ordered map of address ranges to devices,
//! consulted by the vCPU exit match.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A device reachable on a bus. Offsets are relative to the start of the device's range.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("the range {base:#x}+{len:#x} overlaps a device already on the bus")]
    Overlap { base: u64, len: u64 },
    #[error("a device needs a non-empty range that does not wrap around (base {base:#x}, len {len:#x})")]
    BadRange { base: u64, len: u64 },
}

struct Entry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

#[derive(Default)]
pub struct Bus {
    devices: BTreeMap<u64, Entry>,
    /// Accesses no device claimed: guests probe for hardware that is not there, which is not an error.
    unclaimed: AtomicU64,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, base: u64, len: u64, device: Arc<Mutex<dyn BusDevice>>) -> Result<(), Error> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(Error::BadRange { base, len })?;
        let overlaps_before = self.devices.range(..=base).next_back().is_some_and(|(b, e)| b + e.len > base);
        let overlaps_after = self.devices.range(base..end).next().is_some();
        if overlaps_before || overlaps_after {
            return Err(Error::Overlap { base, len });
        }
        self.devices.insert(base, Entry { len, device });
        Ok(())
    }

    /// The device whose range holds the whole access, and the access's offset in it.
    fn resolve(&self, address: u64, size: usize) -> Option<(&Entry, u64)> {
        let (base, entry) = self.devices.range(..=address).next_back()?;
        let offset = address - base;
        let size = u64::try_from(size).ok()?;
        (offset.checked_add(size)? <= entry.len).then_some((entry, offset))
    }

    /// Returns false when no device claims the address; the data is then all ones, as on real buses.
    pub fn read(&self, address: u64, data: &mut [u8]) -> bool {
        match self.resolve(address, data.len()) {
            Some((entry, offset)) => {
                if let Ok(mut device) = entry.device.lock() {
                    device.read(offset, data);
                }
                true
            }
            None => {
                data.fill(0xff);
                self.unclaimed.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    pub fn write(&self, address: u64, data: &[u8]) -> bool {
        match self.resolve(address, data.len()) {
            Some((entry, offset)) => {
                if let Ok(mut device) = entry.device.lock() {
                    device.write(offset, data);
                }
                true
            }
            None => {
                self.unclaimed.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    pub fn unclaimed_accesses(&self) -> u64 {
        self.unclaimed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_relative_offsets() {
        let mut bus = Bus::new();
        let device = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x3f8, 8, device.clone()).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);
        assert!(bus.write(0x3f8, b"A"));
        assert_eq!(device.lock().unwrap().writes, vec![(0, b"A".to_vec())]);
    }

    #[test]
    fn unclaimed_and_straddling_accesses_are_counted_not_dispatched() {
        let mut bus = Bus::new();
        bus.insert(0x1000, 0x10, Arc::new(Mutex::new(Recorder::default()))).unwrap();
        let mut data = [0u8; 4];
        assert!(!bus.read(0x2000, &mut data));
        assert_eq!(data, [0xff; 4]);
        assert!(!bus.read(0x100e, &mut data), "an access running past the device's end");
        assert!(!bus.write(0xfff, &[1, 2]));
        assert_eq!(bus.unclaimed_accesses(), 3);
    }

    #[test]
    fn overlapping_and_empty_ranges_are_refused() {
        let mut bus = Bus::new();
        let dev = || Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x100, 0x100, dev()).unwrap();
        assert_eq!(bus.insert(0x1ff, 1, dev()), Err(Error::Overlap { base: 0x1ff, len: 1 }));
        assert_eq!(bus.insert(0x80, 0x81, dev()), Err(Error::Overlap { base: 0x80, len: 0x81 }));
        assert_eq!(bus.insert(0x300, 0, dev()), Err(Error::BadRange { base: 0x300, len: 0 }));
        assert_eq!(bus.insert(u64::MAX, 2, dev()), Err(Error::BadRange { base: u64::MAX, len: 2 }));
        bus.insert(0x200, 0x10, dev()).unwrap();
        bus.insert(0x80, 0x80, dev()).unwrap();
    }
}
