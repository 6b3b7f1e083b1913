//! What a test needs from the machine (root, /dev/kvm, a program, a file), checked in one place.
//!
//! A test that cannot run fails and names what is missing: a test that returns early would be
//! counted as passed. Only with `IRONCLAD_ALLOW_SKIP=1` does it return early instead; the skip is
//! then printed and appended to `$IRONCLAD_SKIP_LOG` (one line per test), which `make test`
//! summarises at the end.
//!
//! ```no_run
//! if !ironclad_test_prereq::needs().root().kvm().program("qemu-system-x86_64").ready() {
//!     return;
//! }
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};

/// Set to 1 to let tests that cannot run here skip instead of failing.
pub const ALLOW_SKIP: &str = "IRONCLAD_ALLOW_SKIP";
/// Where skips are recorded, one line each: `<test>: <what is missing>`.
pub const SKIP_LOG: &str = "IRONCLAD_SKIP_LOG";

/// The requirements of the calling test; see [`Needs::ready`].
#[derive(Debug, Default)]
#[must_use = "call .ready() and return when it is false"]
pub struct Needs {
    missing: Vec<String>,
}

pub fn needs() -> Needs {
    Needs::default()
}

impl Needs {
    /// `what` is needed and `available` says whether the machine has it.
    pub fn that(mut self, available: bool, what: impl Into<String>) -> Self {
        if !available {
            self.missing.push(what.into());
        }
        self
    }

    pub fn root(self) -> Self {
        // SAFETY: geteuid has no arguments and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        self.that(root, "root")
    }

    /// /dev/kvm that opens read-write.
    pub fn kvm(self) -> Self {
        let opens = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
        self.that(opens, "/dev/kvm (it does not open read-write)")
    }

    /// An executable on PATH.
    pub fn program(self, name: &str) -> Self {
        let found = on_path(name);
        self.that(found, format!("{name} on PATH"))
    }

    /// A file, with the command that makes it.
    pub fn file(self, path: &Path, made_by: &str) -> Self {
        let exists = path.exists();
        self.that(exists, format!("{} ({made_by})", path.display()))
    }

    /// True when everything is there. Otherwise the test fails naming what is missing, or, with
    /// IRONCLAD_ALLOW_SKIP=1, the skip is recorded and false is returned.
    #[track_caller]
    pub fn ready(self) -> bool {
        let allow_skip = std::env::var(ALLOW_SKIP).as_deref() == Ok("1");
        self.settle(allow_skip, std::env::var_os(SKIP_LOG).as_deref().map(Path::new))
    }

    #[track_caller]
    fn settle(self, allow_skip: bool, skip_log: Option<&Path>) -> bool {
        if self.missing.is_empty() {
            return true;
        }
        let test = std::thread::current().name().unwrap_or("a test").to_string();
        let reason = self.missing.join(", ");
        if !allow_skip {
            panic!("{test} cannot run here: it needs {reason} (set {ALLOW_SKIP}=1 to skip such tests)");
        }
        record_skip(&test, &reason, skip_log);
        false
    }
}

fn record_skip(test: &str, reason: &str, log: Option<&Path>) {
    let line = format!("{test}: needs {reason}\n");
    let _ = std::io::stderr().write_all(format!("SKIPPED {line}").as_bytes());
    if let Some(log) = log {
        // One short write per line with O_APPEND: lines from tests running at once do not mix.
        let file = std::fs::OpenOptions::new().create(true).append(true).open(log);
        if let Ok(mut file) = file {
            let _ = file.write_all(line.as_bytes());
        }
    }
}

fn on_path(name: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let executable =
        |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if name.contains('/') {
        return executable(Path::new(name));
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| executable(&dir.join(name))))
}

/// Runs every input of a fuzz target's seeds (`fuzz/seeds/<target>`, made by fuzz/seeds.py), corpus
/// (`fuzz/corpus/<target>`, found and kept small by `make fuzz`) and regressions
/// (`fuzz/regressions/<target>`, inputs that once crashed) through `run`, in name order, naming
/// each on stderr: the crates' tests replay them on stable. No input at all fails.
pub fn replay_fuzz_corpus(target: &str, run: impl Fn(&[u8])) {
    let inputs = fuzz_inputs(target);
    assert!(!inputs.is_empty(), "no corpus for the fuzz target {target}: `make fuzz` writes one");
    for (path, input) in inputs {
        eprintln!("{target}: {}", path.display());
        run(&input);
    }
}

fn fuzz_inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut inputs = Vec::new();
    for kind in ["seeds", "corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz.join(kind).join(target)) else { continue };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            if let Ok(input) = std::fs::read(&path) {
                inputs.push((path, input));
            }
        }
    }
    inputs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_missing_is_ready() {
        assert!(needs().that(true, "x").program("sh").ready());
    }

    #[test]
    fn a_missing_need_fails_the_test_with_its_name() {
        let result = std::panic::catch_unwind(|| needs().that(false, "a flux capacitor").settle(false, None));
        let message = result.unwrap_err().downcast::<String>().unwrap();
        assert!(message.contains("a flux capacitor"), "{message}");
        assert!(message.contains("a_missing_need_fails_the_test_with_its_name"), "{message}");
        assert!(!needs().program("definitely-not-a-program-ironclad").missing.is_empty());
    }

    #[test]
    fn an_allowed_skip_is_recorded_with_the_reasons() {
        let dir = std::env::temp_dir().join(format!("ironclad-prereq-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("skips.log");
        let needs = needs().that(false, "a flux capacitor").that(true, "fine").that(false, "1.21 GW");
        assert!(!needs.settle(true, Some(&log)));
        let recorded = std::fs::read_to_string(&log).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            recorded,
            "tests::an_allowed_skip_is_recorded_with_the_reasons: needs a flux capacitor, 1.21 GW\n"
        );
    }
}
