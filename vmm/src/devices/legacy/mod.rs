//! The two legacy devices a microVM keeps: the 8250 UART console and the i8042, whose only job is
//! the reset line.

pub mod boot_timer;
pub mod i8042;
pub mod serial;
