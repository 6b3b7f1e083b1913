//! The i8042 keyboard controller (vm-superio), kept for its reset line: the guest's `reboot=k`
//! writes 0xfe to port 0x64, which ends the VM with [`ExitReason::Reset`], a clean exit.

use std::convert::Infallible;

use vm_superio::{I8042Device, Trigger};

use crate::bus::BusDevice;
use crate::vstate::vcpu::{ExitReason, VmExit};

/// The reset line: records the reset on the VM exit, which wakes the event loop.
pub struct ResetLine(VmExit);

impl Trigger for ResetLine {
    type E = Infallible;

    fn trigger(&self) -> Result<(), Infallible> {
        self.0.record(ExitReason::Reset);
        Ok(())
    }
}

pub struct I8042 {
    inner: I8042Device<ResetLine>,
}

impl I8042 {
    pub fn new(exit: VmExit) -> Self {
        I8042 { inner: I8042Device::new(ResetLine(exit)) }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => *byte = self.inner.read(offset),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            let Ok(()) = self.inner.write(offset, *byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_stops_the_vm_cleanly() {
        let exit = VmExit::new().unwrap();
        let mut i8042 = I8042::new(exit.clone());
        i8042.write(4, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
        assert_eq!(exit.event().read().unwrap(), 1);
    }

    #[test]
    fn other_commands_do_not_reset() {
        let exit = VmExit::new().unwrap();
        let mut i8042 = I8042::new(exit.clone());
        i8042.write(4, &[0x20]);
        i8042.write(0, &[0x00]);
        let mut status = [0u8];
        i8042.read(4, &mut status);
        assert_eq!(exit.reason(), None);
    }
}
