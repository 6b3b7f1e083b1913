//! The ironclad guest agent's parts: the binary (`main.rs`) is PID 1 of the guest and serves the
//! agent API; this library also gives the fuzz targets (`fuzz/`) the parsers that face the host.

pub mod cgroups;
pub mod clock;
pub mod container;
pub mod copy_file;
pub mod fork_helper;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod init;
pub mod network;
pub mod paths;
pub mod reaper;
pub mod sandbox;
pub mod server;
pub mod stats;
pub mod storage;
