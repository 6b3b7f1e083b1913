//! Firecracker's boot timer: a guest write of 123 to port 0x3f0 is logged with the host's
//! CLOCK_MONOTONIC, so a benchmark can tell when the guest reached a point of its choosing.

use std::io::Write;
use std::time::Instant;

use nix::time::{clock_gettime, ClockId};

use crate::bus::BusDevice;

pub const BOOT_TIMER_PORT: u16 = 0x3f0;
pub const BOOT_TIMER_MAGIC: u8 = 123;

/// Lines logged at most: a guest writing the port in a loop must not flood the VMM's stderr.
pub const MAX_BOOT_TIMER_LINES: u32 = 8;

pub struct BootTimer {
    vmm_start: Instant,
    logged: u32,
}

impl BootTimer {
    pub fn new(vmm_start: Instant) -> Self {
        BootTimer { vmm_start, logged: 0 }
    }
}

/// `ironclad-vmm: boot-timer monotonic_ns=<ns> since_vmm_start_us=<µs>`, the line benchmarks parse.
pub fn boot_timer_line(monotonic_ns: u128, since_start_us: u128) -> String {
    format!("ironclad-vmm: boot-timer monotonic_ns={monotonic_ns} since_vmm_start_us={since_start_us}")
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data != [BOOT_TIMER_MAGIC] || self.logged >= MAX_BOOT_TIMER_LINES {
            return;
        }
        self.logged += 1;
        let now = clock_gettime(ClockId::CLOCK_MONOTONIC)
            .map(|t| t.tv_sec() as u128 * 1_000_000_000 + t.tv_nsec() as u128)
            .unwrap_or(0);
        let line = boot_timer_line(now, self.vmm_start.elapsed().as_micros());
        let _ = writeln!(std::io::stderr(), "{line}");
    }
}
