//! Pinned artifacts: the guest kernel and initrd the config names by digest (`kernel_sha256`,
//! `initrd_sha256`, written by `make install`) are checked before every boot, and a changed file is
//! refused, naming it. The cached rootfs images are checked the same way (see `rootfs`).

use std::io::Read;
use std::path::{Path, PathBuf};

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
    let mut file = std::fs::File::open(path)?;
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

/// Checks `path` against the digest the config pins for it; nothing pinned, nothing checked.
pub fn verify(what: &'static str, path: &Path, expected: Option<&str>) -> Result<(), Error> {
    let Some(expected) = expected else { return Ok(()) };
    let actual =
        file_sha256(path).map_err(|source| Error::Read { what, path: path.to_path_buf(), source })?;
    if !actual.eq_ignore_ascii_case(expected) {
        return Err(Error::Changed {
            what,
            path: path.to_path_buf(),
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(())
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
        verify("kernel", &kernel, Some(&pin)).unwrap();
        verify("kernel", &kernel, Some(&pin.to_uppercase())).unwrap();
        std::fs::write(&kernel, b"a kernel!").unwrap();
        let err = verify("kernel", &kernel, Some(&pin)).unwrap_err();
        assert!(matches!(&err, Error::Changed { what: "kernel", path, .. } if path == &kernel), "{err}");
        assert!(err.to_string().contains(&kernel.display().to_string()), "{err}");
        verify("kernel", &kernel, None).unwrap();
        let missing = dir.path().join("missing");
        assert!(matches!(verify("initrd", &missing, Some(&pin)), Err(Error::Read { what: "initrd", .. })));
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
