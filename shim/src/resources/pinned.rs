//! Pinned artifacts: the guest kernel and initrd the config names by digest (`kernel_sha256`,
//! `initrd_sha256`, written by `make install`) are checked before every boot, and a changed file is
//! refused, naming it. The cached rootfs images are checked the same way (see `rootfs`).

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the guest {what} {path} to check its sha256")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the guest {what} {path} has changed: its sha256 is {actual}, the config pins {expected} \
         ({what}_sha256)"
    )]
    Changed { what: &'static str, path: PathBuf, expected: String, actual: String },
}

/// The sha256 of a file, in lower-case hex.
pub fn file_sha256(path: &Path) -> std::io::Result<String> {
    read_sha256(&mut std::fs::File::open(path)?)
}

/// The sha256 of what is left to read in `file`, in lower-case hex.
fn read_sha256(file: &mut std::fs::File) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex_digest(hasher))
}

/// A finished sha256, in lower-case hex.
pub fn hex_digest(hasher: Sha256) -> String {
    hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A guest kernel or initrd the shim opened, and checked when the config pins it. The monitor
/// reads this very file through [`GuestFile::monitor_path`] rather than the configured path: a file
/// renamed or bound over that path after the check is never booted.
#[derive(Debug, Clone)]
pub struct GuestFile {
    file: Arc<std::fs::File>,
}

impl GuestFile {
    /// Where the monitor, which inherits the descriptor, opens the same file again: its own
    /// /proc/self/fd (the jail mounts a /proc of its own).
    pub fn monitor_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }

    /// The opened file, by identity (which the pool's VMs are matched on).
    pub fn identity(&self) -> std::io::Result<crate::pool::FileIdentity> {
        crate::pool::FileIdentity::of(&self.file)
    }

    /// The descriptor the monitor must inherit.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Opens `path` and checks it against the digest the config pins for it (nothing pinned, nothing
/// checked), reading the opened file itself.
pub fn open_verified(what: &'static str, path: &Path, expected: Option<&str>) -> Result<GuestFile, Error> {
    let read = |source| Error::Read { what, path: path.to_path_buf(), source };
    let mut file = std::fs::File::open(path).map_err(read)?;
    if let Some(expected) = expected {
        let actual = read_sha256(&mut file).map_err(read)?;
        if !actual.eq_ignore_ascii_case(expected) {
            return Err(Error::Changed {
                what,
                path: path.to_path_buf(),
                expected: expected.to_string(),
                actual,
            });
        }
    }
    Ok(GuestFile { file: Arc::new(file) })
}

/// Whether `text` is a sha256 digest in hex: what the config accepts for a pin.
pub fn is_sha256(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_changed_by_one_byte_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("bzImage");
        std::fs::write(&kernel, b"a kernel").unwrap();
        let pin = file_sha256(&kernel).unwrap();
        assert!(is_sha256(&pin), "{pin}");
        open_verified("kernel", &kernel, Some(&pin)).unwrap();
        open_verified("kernel", &kernel, Some(&pin.to_uppercase())).unwrap();
        std::fs::write(&kernel, b"a kernel!").unwrap();
        let err = open_verified("kernel", &kernel, Some(&pin)).unwrap_err();
        assert!(matches!(&err, Error::Changed { what: "kernel", path, .. } if path == &kernel), "{err}");
        assert!(err.to_string().contains(&kernel.display().to_string()), "{err}");
        open_verified("kernel", &kernel, None).unwrap();
        let missing = dir.path().join("missing");
        let err = open_verified("initrd", &missing, None).unwrap_err();
        assert!(matches!(&err, Error::Read { what: "initrd", .. }), "{err}");
    }

    #[test]
    fn a_file_swapped_in_after_the_check_is_not_what_the_monitor_reads() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, b"the checked kernel").unwrap();
        let pin = file_sha256(&kernel).unwrap();
        let opened = open_verified("kernel", &kernel, Some(&pin)).unwrap();
        let evil = dir.path().join("evil");
        std::fs::write(&evil, b"a kernel of someone else's").unwrap();
        std::fs::rename(&evil, &kernel).unwrap();
        assert_eq!(std::fs::read(opened.monitor_path()).unwrap(), b"the checked kernel");
    }

    #[test]
    fn the_digest_is_sha256_of_the_contents() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("empty");
        std::fs::write(&file, b"").unwrap();
        assert_eq!(
            file_sha256(&file).unwrap(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!(is_sha256("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"));
        assert!(!is_sha256("e3b0c4"));
        assert!(!is_sha256(&"g".repeat(64)));
    }
}
