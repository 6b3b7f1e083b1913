//! The guest initrd: an uncompressed newc cpio archive holding `ironclad-agent` as `/init` and the
//! directory skeleton it mounts onto. Uncompressed because the guest's gunzip of it ran under
//! emulation on every cold start (150 ms of the kernel's boot under QEMU TCG, measured with the
//! 12 MiB agent); the monitor copies the larger image in from the host's page cache.
//!
//! Reproducible by construction: entries are sorted by path, inode numbers follow that order, and
//! every entry is owned by root with mtime 0. Same inputs, byte-identical output.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {what} {path}")]
    ReadInput {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a regular executable file")]
    NotExecutable { path: PathBuf },
    #[error("{path} is {size} bytes, more than a newc cpio entry can hold")]
    TooLarge { path: PathBuf, size: usize },
    #[error("cannot write the archive")]
    Write(#[source] io::Error),
}

/// What goes into the image.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// The statically linked agent, installed as `/init`.
    pub agent: PathBuf,
    /// A statically linked busybox, installed as `/bin/busybox` with `/bin/sh`, for debugging only
    /// (boot with `rdinit=/bin/sh`). The default image holds the agent alone.
    pub debug_shell: Option<PathBuf>,
}

/// One archive member. Paths are absolute inside the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir { mode: u32 },
    File { mode: u32, contents: Vec<u8> },
    Symlink { target: String },
    CharDevice { mode: u32, major: u32, minor: u32 },
}

/// Directories PID 1 mounts onto or writes into before anything else exists.
const SKELETON_DIRS: &[(&str, u32)] = &[
    ("/dev", 0o755),
    ("/etc", 0o755),
    ("/proc", 0o555),
    ("/root", 0o700),
    ("/run", 0o755),
    ("/sys", 0o555),
    ("/tmp", 0o1777),
];

/// The kernel opens /dev/console for PID 1's stdio before devtmpfs is mounted.
const CONSOLE_MAJOR: u32 = 5;
const CONSOLE_MINOR: u32 = 1;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// The image's members by path; a BTreeMap keeps them in the sorted order the archive uses.
pub fn image_nodes(spec: &ImageSpec) -> Result<BTreeMap<String, Node>, Error> {
    let mut nodes = BTreeMap::new();
    for (path, mode) in SKELETON_DIRS {
        nodes.insert((*path).to_string(), Node::Dir { mode: *mode });
    }
    nodes.insert(
        "/dev/console".to_string(),
        Node::CharDevice { mode: 0o600, major: CONSOLE_MAJOR, minor: CONSOLE_MINOR },
    );
    nodes.insert("/init".to_string(), read_executable(&spec.agent, "agent binary")?);
    if let Some(busybox) = &spec.debug_shell {
        nodes.insert("/bin".to_string(), Node::Dir { mode: 0o755 });
        nodes.insert("/bin/busybox".to_string(), read_executable(busybox, "busybox binary")?);
        nodes.insert("/bin/sh".to_string(), Node::Symlink { target: "busybox".to_string() });
    }
    Ok(nodes)
}

fn read_executable(path: &Path, what: &'static str) -> Result<Node, Error> {
    use std::os::unix::fs::PermissionsExt;
    let read_err = |source| Error::ReadInput { what, path: path.to_path_buf(), source };
    let metadata = fs::metadata(path).map_err(read_err)?;
    if !metadata.is_file() || metadata.permissions().mode() & 0o111 == 0 {
        return Err(Error::NotExecutable { path: path.to_path_buf() });
    }
    let contents = fs::read(path).map_err(read_err)?;
    Ok(Node::File { mode: 0o755, contents })
}

/// One line of the manifest: what the image holds, so a reader can check it without unpacking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ManifestEntry {
    pub path: String,
    pub kind: &'static str,
    pub mode: String,
    pub size: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Manifest {
    /// sha256 of the compressed image file.
    pub sha256: String,
    pub size: usize,
    pub entries: Vec<ManifestEntry>,
}

/// The compressed image and its manifest.
pub struct Image {
    pub bytes: Vec<u8>,
    pub manifest: Manifest,
}

pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// Builds the newc archive of `nodes`.
pub fn build_image(nodes: &BTreeMap<String, Node>) -> Result<Image, Error> {
    let mut writer = Vec::new();
    for (index, (path, node)) in nodes.iter().enumerate() {
        let ino = u32::try_from(index + 1).map_err(|_| Error::TooLarge { path: path.into(), size: index })?;
        writer = write_member(writer, path, node, ino)?;
    }
    let bytes = cpio::newc::trailer(writer).map_err(Error::Write)?;
    let manifest = Manifest {
        sha256: sha256_hex(&bytes),
        size: bytes.len(),
        entries: nodes.iter().map(|(path, node)| manifest_entry(path, node)).collect(),
    };
    Ok(Image { bytes, manifest })
}

fn write_member<W: Write>(writer: W, path: &str, node: &Node, ino: u32) -> Result<W, Error> {
    // newc names are relative to the root the kernel unpacks into.
    let name = path.trim_start_matches('/');
    let header = cpio::newc::Builder::new(name).ino(ino).uid(0).gid(0).mtime(0);
    let (header, data): (_, &[u8]) = match node {
        Node::Dir { mode } => (header.mode(S_IFDIR | mode).nlink(2), &[]),
        Node::File { mode, contents } => (header.mode(S_IFREG | mode).nlink(1), contents),
        Node::Symlink { target } => (header.mode(S_IFLNK | 0o777).nlink(1), target.as_bytes()),
        Node::CharDevice { mode, major, minor } => {
            (header.mode(S_IFCHR | mode).nlink(1).rdev_major(*major).rdev_minor(*minor), &[])
        }
    };
    let size =
        u32::try_from(data.len()).map_err(|_| Error::TooLarge { path: path.into(), size: data.len() })?;
    let mut member = header.write(writer, size);
    member.write_all(data).map_err(Error::Write)?;
    member.finish().map_err(Error::Write)
}

fn manifest_entry(path: &str, node: &Node) -> ManifestEntry {
    let entry = |kind, mode: u32, size| ManifestEntry {
        path: path.to_string(),
        kind,
        mode: format!("{mode:04o}"),
        size,
        sha256: None,
        target: None,
    };
    match node {
        Node::Dir { mode } => entry("dir", *mode, 0),
        Node::File { mode, contents } => {
            ManifestEntry { sha256: Some(sha256_hex(contents)), ..entry("file", *mode, contents.len()) }
        }
        Node::Symlink { target } => {
            ManifestEntry { target: Some(target.clone()), ..entry("symlink", 0o777, target.len()) }
        }
        Node::CharDevice { mode, major, minor } => {
            ManifestEntry { target: Some(format!("{major}:{minor}")), ..entry("chardev", *mode, 0) }
        }
    }
}
