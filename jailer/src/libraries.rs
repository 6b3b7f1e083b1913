//! What a dynamically linked helper loads, as the host's `ldd` lists it: the jail binds these
//! files, each read-only at its own path, instead of the host's whole /usr.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot run ldd on {program}")]
    Run {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("ldd {program} failed: {stderr}")]
    Failed { program: PathBuf, stderr: String },
    #[error("{program} needs {library}, which the loader does not find")]
    NotFound { program: PathBuf, library: String },
    #[error("ldd {program} printed a line it never prints: {line:?}")]
    Unexpected { program: PathBuf, line: String },
    #[error("cannot resolve {path}, which {program} loads")]
    Resolve {
        program: PathBuf,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One library: where the loader looks it up (through the host's links, such as
/// /lib64/ld-linux-x86-64.so.2) and the file that is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Library {
    pub path: PathBuf,
    pub file: PathBuf,
}

impl Library {
    /// Where the loader's path leads once the directories' links are followed, if the last
    /// component is a link of its own: the jail puts a link to [`Library::file`] there.
    pub fn link(&self) -> Option<PathBuf> {
        let parent = self.path.parent()?;
        let looked_up = std::fs::canonicalize(parent).ok()?.join(self.path.file_name()?);
        (looked_up != self.file).then_some(looked_up)
    }
}

/// What `program` loads, none for a static one.
pub fn of_program(program: &Path) -> Result<Vec<Library>, Error> {
    let output = std::process::Command::new("ldd")
        .arg(program)
        .output()
        .map_err(|source| Error::Run { program: program.to_path_buf(), source })?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        if stderr.contains("not a dynamic executable") {
            return Ok(Vec::new());
        }
        return Err(Error::Failed { program: program.to_path_buf(), stderr: stderr.trim().to_string() });
    }
    let paths = parse_ldd(&String::from_utf8_lossy(&output.stdout)).map_err(|line| match line {
        LddLine::NotFound(library) => Error::NotFound { program: program.to_path_buf(), library },
        LddLine::Unexpected(line) => Error::Unexpected { program: program.to_path_buf(), line },
    })?;
    paths
        .into_iter()
        .map(|path| {
            let file = std::fs::canonicalize(&path).map_err(|source| Error::Resolve {
                program: program.to_path_buf(),
                path: path.clone(),
                source,
            })?;
            Ok(Library { path, file })
        })
        .collect()
}

/// A line of ldd's output that names no library file.
#[derive(Debug, PartialEq, Eq)]
pub enum LddLine {
    NotFound(String),
    Unexpected(String),
}

/// The library paths in ldd's output: `name => /path (0x…)`, `/path (0x…)` (the loader) and
/// `statically linked`; the kernel's vDSO (`linux-vdso.so.1 (0x…)`) is no file.
pub fn parse_ldd(output: &str) -> Result<Vec<PathBuf>, LddLine> {
    let mut paths = Vec::new();
    for line in output.lines().map(str::trim).filter(|line| !line.is_empty()) {
        if line == "statically linked" {
            continue;
        }
        let (name, found) = match line.split_once(" => ") {
            Some((name, found)) => (name, found),
            None => (line, line),
        };
        if found.starts_with("not found") {
            return Err(LddLine::NotFound(name.to_string()));
        }
        let path = found.strip_suffix(')').and_then(|rest| rest.rsplit_once(" (0x")).map(|(path, _)| path);
        match path {
            Some(path) if path.starts_with('/') => paths.push(PathBuf::from(path)),
            Some(vdso) if !vdso.contains('/') && found == line => {}
            _ => return Err(LddLine::Unexpected(line.to_string())),
        }
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_lines_name_the_libraries_and_the_loader_but_not_the_vdso() {
        let output = "\tlinux-vdso.so.1 (0x00007ffd1b5f2000)\n\
                      \tlibseccomp.so.2 => /lib/x86_64-linux-gnu/libseccomp.so.2 (0x00007f44a640e000)\n\
                      \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f44a5e1e000)\n\
                      \t/lib64/ld-linux-x86-64.so.2 (0x00007f44a6441000)\n";
        let paths = parse_ldd(output).unwrap();
        assert_eq!(
            paths,
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libseccomp.so.2"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert_eq!(parse_ldd("\tstatically linked\n").unwrap(), Vec::<PathBuf>::new());
    }

    #[test]
    fn a_missing_library_or_a_line_ldd_never_prints_is_refused() {
        let missing = "\tlibfoo.so.1 => not found\n";
        assert_eq!(parse_ldd(missing), Err(LddLine::NotFound("libfoo.so.1".into())));
        assert!(matches!(
            parse_ldd("\tlibc.so.6 => relative/libc.so.6 (0x1)\n"),
            Err(LddLine::Unexpected(_))
        ));
        assert!(matches!(parse_ldd("garbage\n"), Err(LddLine::Unexpected(_))));
    }

    #[test]
    fn a_program_of_this_host_lists_its_loader_and_libc_as_files() {
        let libraries = of_program(Path::new("/bin/sh")).unwrap();
        assert!(libraries.iter().any(|l| l.path.to_string_lossy().contains("libc.so")), "{libraries:?}");
        for library in &libraries {
            assert!(library.file.is_file() && library.file.is_absolute(), "{library:?}");
        }
        let static_program = Path::new("/usr/bin/busybox");
        if static_program.is_file() {
            assert!(of_program(static_program).unwrap().is_empty());
        }
    }

    #[test]
    fn a_library_reached_through_a_link_gets_that_link() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("libx.so.1.2");
        std::fs::write(&file, b"").unwrap();
        std::os::unix::fs::symlink("libx.so.1.2", dir.path().join("libx.so.1")).unwrap();
        let file = std::fs::canonicalize(&file).unwrap();
        let linked = Library { path: dir.path().join("libx.so.1"), file: file.clone() };
        assert_eq!(linked.link(), Some(std::fs::canonicalize(dir.path()).unwrap().join("libx.so.1")));
        assert_eq!(Library { path: file.clone(), file }.link(), None);
    }
}
