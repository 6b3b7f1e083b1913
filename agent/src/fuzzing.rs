//! Entry points for the fuzz targets in `fuzz/` that reach the agent (cargo fuzz, nightly), and
//! the replay of their corpora in `cargo test` (stable). None may panic, and CopyFile may write
//! nowhere but below its directory.

use std::fs;
use std::path::{Component, Path};

use crate::container::parse_spec;
use crate::copy_file::copy_file;

/// An OCI spec as the shim sends it in CreateContainer: what the agent accepts, it writes to the
/// bundle for libcontainer, which must read back the same spec.
pub fn oci_spec(input: &[u8]) {
    let Ok(json) = std::str::from_utf8(input) else { return };
    let Ok(spec) = parse_spec(json) else { return };
    let written = serde_json::to_string(&spec).expect("an accepted spec serializes");
    let read_back = parse_spec(&written).expect("the spec written to the bundle parses again");
    assert_eq!(read_back, spec, "the spec changed on its way through the bundle");
}

/// A CopyFile request's path (the input), into a fresh shared directory that holds a symlink to
/// a directory outside it and a symlink to a file outside it.
pub fn copy_file_path(input: &[u8]) {
    let Ok(relative) = std::str::from_utf8(input) else { return };
    let Ok(scratch) = tempfile::Builder::new().prefix("ironclad-fuzz-copy-").tempdir() else { return };
    let (base, outside) = (scratch.path().join("shared"), scratch.path().join("outside"));
    let victim = outside.join("victim");
    let prepared = fs::create_dir_all(&base)
        .and_then(|()| fs::create_dir_all(&outside))
        .and_then(|()| fs::write(&victim, b"untouched"))
        .and_then(|()| std::os::unix::fs::symlink(&outside, base.join("link")))
        .and_then(|()| std::os::unix::fs::symlink(&victim, base.join("dest")));
    if prepared.is_err() {
        return;
    }
    if let Ok(written) = copy_file(&base, relative, b"data", 0o644, 0, 0) {
        assert!(stays_below(&base, &written), "{relative:?} was written at {written:?}");
        assert_eq!(fs::read(&written).ok().as_deref(), Some(&b"data"[..]));
    }
    assert_eq!(fs::read(&victim).ok().as_deref(), Some(&b"untouched"[..]), "{relative:?} wrote through");
    let outside_entries = fs::read_dir(&outside).map(|entries| entries.count()).unwrap_or(0);
    assert_eq!(outside_entries, 1, "{relative:?} wrote outside the shared directory");
}

/// `path` is `base` followed by plain names only.
fn stays_below(base: &Path, path: &Path) -> bool {
    path.strip_prefix(base).is_ok_and(|rest| rest.components().all(|c| matches!(c, Component::Normal(_))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ironclad_test_prereq::replay_fuzz_corpus as replay;

    #[test]
    fn the_oci_spec_corpus_replays() {
        replay("oci_spec", oci_spec);
    }

    #[test]
    fn the_copy_file_corpus_replays() {
        replay("copy_file_path", copy_file_path);
    }
}
