//! A tap device opened through /dev/net/tun, speaking the virtio-net header.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};
use vmm_sys_util::ioctl_iow_nr;

use super::VNET_HDR_LEN;

const TUNTAP: u32 = b'T' as u32;
ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, libc::c_int);
ioctl_iow_nr!(TUNSETOFFLOAD, TUNTAP, 208, libc::c_uint);
ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, libc::c_int);

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const IFNAMSIZ: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] std::io::Error),
    #[error("interface name {0:?} is empty or longer than 15 bytes")]
    BadName(String),
    #[error("cannot attach to tap {name} (it must exist or the VMM must be allowed to create it)")]
    Attach {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot configure tap {name}: {what}")]
    Configure {
        name: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: i16,
    _rest: [u8; 22],
}

pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to (or creates) tap `name`, non-blocking, with the virtio-net header and no offloads.
    pub fn open(name: &str) -> Result<Self, Error> {
        if name.is_empty() || name.len() >= IFNAMSIZ {
            return Err(Error::BadName(name.into()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(Error::OpenTun)?;
        let mut request =
            IfReq { name: [0; IFNAMSIZ], flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, _rest: [0; 22] };
        request.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, of which IfReq has the layout and the
        // full size (40 bytes); the fd is a /dev/net/tun file we own.
        let ret = unsafe { ioctl_with_mut_ref(&file, TUNSETIFF(), &mut request) };
        if ret < 0 {
            return Err(Error::Attach { name: name.into(), source: std::io::Error::last_os_error() });
        }
        let header_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which points at a live c_int.
        let ret = unsafe { ioctl_with_ref(&file, TUNSETVNETHDRSZ(), &header_len) };
        if ret < 0 {
            let source = std::io::Error::last_os_error();
            return Err(Error::Configure { name: name.into(), what: "virtio-net header size", source });
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value; 0 turns every offload off, so frames
        // arrive whole and with checksums, which the guest is not told it may skip.
        let ret = unsafe { ioctl_with_val(&file, TUNSETOFFLOAD(), 0) };
        if ret < 0 {
            let source = std::io::Error::last_os_error();
            return Err(Error::Configure { name: name.into(), what: "offloads", source });
        }
        Ok(Tap { file, name: name.into() })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// One frame (with its virtio-net header) or WouldBlock.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    pub fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        self.file.write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_cannot_be_interfaces_are_refused_before_any_syscall() {
        assert!(matches!(Tap::open(""), Err(Error::BadName(_))));
        assert!(matches!(Tap::open("a-name-that-is-too-long"), Err(Error::BadName(_))));
    }

    #[test]
    fn ifreq_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        assert_eq!(std::mem::offset_of!(IfReq, flags), 16);
    }
}
