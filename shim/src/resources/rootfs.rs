//! containerd's rootfs mounts (a snapshot) become a disk for the guest: an ext4 image of the
//! image's read-only layers, built once and cached by the snapshot's parent chain. The container's
//! writable layer lives inside the guest (an overlay on tmpfs), so the image is shared as it is.

use std::path::{Path, PathBuf};
use std::process::Command;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::pinned;

/// The virtio-blk serial of the rootfs disk, which the agent finds it by.
pub const ROOTFS_SERIAL: &str = "rootfs";
/// Room for metadata and the file system's own structures on top of the files' sizes.
const IMAGE_SLACK_BYTES: u64 = 32 << 20;
const BLOCK: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the task has no rootfs mount (containerd passed none)")]
    NoMounts,
    #[error("rootfs mounts of type {kind:?} are not supported: ironclad takes overlay or bind snapshots")]
    UnsupportedMount { kind: String },
    #[error("rootfs has {0} mounts; ironclad takes exactly one")]
    TooManyMounts(usize),
    #[error("overlay rootfs mount without lowerdir or upperdir: options {0:?}")]
    BadOverlay(Vec<String>),
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot mount the snapshot layers on {path}")]
    Mount {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("mkfs.ext4 failed to build {image}: {stderr}")]
    Mkfs { image: PathBuf, stderr: String },
}

/// What the snapshot is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Snapshot {
    /// overlay: read-only layers (top first) and the container's upper directory.
    Overlay { lowers: Vec<PathBuf>, upper: Option<PathBuf> },
    /// A plain directory (a snapshot without parents, or the native snapshotter).
    Directory(PathBuf),
}

/// One rootfs mount from containerd, as type, source and options.
pub struct MountSpec<'a> {
    pub kind: &'a str,
    pub source: &'a str,
    pub options: &'a [String],
}

pub fn parse_snapshot(mounts: &[MountSpec<'_>]) -> Result<Snapshot, Error> {
    let mount = match mounts {
        [] => return Err(Error::NoMounts),
        [one] => one,
        more => return Err(Error::TooManyMounts(more.len())),
    };
    match mount.kind {
        "overlay" => {
            let option = |name: &str| mount.options.iter().find_map(|o| o.strip_prefix(name));
            let lowers: Vec<PathBuf> =
                option("lowerdir=").map(|l| l.split(':').map(PathBuf::from).collect()).unwrap_or_default();
            let upper = option("upperdir=").map(PathBuf::from);
            if lowers.is_empty() && upper.is_none() {
                return Err(Error::BadOverlay(mount.options.to_vec()));
            }
            Ok(Snapshot::Overlay { lowers, upper })
        }
        "bind" | "rbind" => Ok(Snapshot::Directory(PathBuf::from(mount.source))),
        other => Err(Error::UnsupportedMount { kind: other.to_string() }),
    }
}

/// A disk image for the guest and whether it is shared (cached) or the sandbox's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsImage {
    pub path: PathBuf,
    pub cached: bool,
}

fn dir_is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).map(|mut entries| entries.next().is_none()).unwrap_or(true)
}

/// The cache key of a set of read-only layers: their paths, which containerd never reuses for
/// different content (a committed snapshot is immutable and its directory is named by its id).
pub fn cache_key(lowers: &[PathBuf]) -> String {
    let mut hasher = Sha256::new();
    for lower in lowers {
        hasher.update(lower.as_os_str().as_encoded_bytes());
        hasher.update([0]);
    }
    pinned::hex_digest(hasher)
}

/// Turns the snapshot into a disk image: the layers' cached image when the container has written
/// nothing yet, else an image of its own in `scratch` (which goes with the sandbox).
pub fn prepare(snapshot: &Snapshot, cache_dir: &Path, scratch: &Path) -> Result<RootfsImage, Error> {
    match snapshot {
        Snapshot::Overlay { lowers, upper }
            if upper.as_deref().is_none_or(dir_is_empty) && !lowers.is_empty() =>
        {
            cached_image(lowers, cache_dir)
        }
        Snapshot::Overlay { lowers, upper } => {
            let image = scratch.join("rootfs.ext4");
            with_layers_mounted(lowers, upper.as_deref(), &scratch.join("layers"), |tree| {
                build_image(tree, &image)
            })?;
            Ok(RootfsImage { path: image, cached: false })
        }
        Snapshot::Directory(dir) => {
            let image = scratch.join("rootfs.ext4");
            build_image(dir, &image)?;
            Ok(RootfsImage { path: image, cached: false })
        }
    }
}

fn cached_image(lowers: &[PathBuf], cache_dir: &Path) -> Result<RootfsImage, Error> {
    let io = |action, path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { action, path, source }
    };
    std::fs::create_dir_all(cache_dir).map_err(io("create the image cache", cache_dir))?;
    let key = cache_key(lowers);
    let image = cache_dir.join(format!("{key}.ext4"));
    let digest_file = cache_dir.join(format!("{key}.sha256"));
    if image.is_file() {
        if cached_image_is_intact(&image, &digest_file) {
            info!("rootfs image cache hit: {}", image.display());
            return Ok(RootfsImage { path: image, cached: true });
        }
        warn!(
            "the cached rootfs image {} does not match its recorded sha256: rebuilding it",
            image.display()
        );
        let _ = std::fs::remove_file(&image);
    }
    // Only when the cache grows: a hit never scans the cache.
    forget_images_of_removed_snapshots(cache_dir);
    // Built under a private name and renamed, so that shims building the same image at once
    // never see each other's half-written file.
    let partial = cache_dir.join(format!("{key}.ext4.partial-{}", std::process::id()));
    let scratch = cache_dir.join(format!("{key}.layers-{}", std::process::id()));
    let built = with_layers_mounted(lowers, None, &scratch, |tree| build_image(tree, &partial));
    if let Err(err) = built {
        let _ = std::fs::remove_file(&partial);
        return Err(err);
    }
    let lowers_text: String = lowers.iter().map(|l| format!("{}\n", l.display())).collect();
    std::fs::write(cache_dir.join(format!("{key}.layers")), lowers_text)
        .map_err(io("record the layers of", &image))?;
    let digest = pinned::file_sha256(&partial).map_err(io("record the sha256 of", &partial))?;
    std::fs::write(&digest_file, format!("{digest}\n")).map_err(io("record the sha256 of", &image))?;
    std::fs::rename(&partial, &image).map_err(io("move the built image to", &image))?;
    info!("rootfs image built: {}", image.display());
    Ok(RootfsImage { path: image, cached: true })
}

/// Whether a cached image still has the digest recorded when it was built: a changed image is
/// rebuilt, never booted (an image without a record, from an older shim, is rebuilt too).
fn cached_image_is_intact(image: &Path, digest_file: &Path) -> bool {
    let recorded = std::fs::read_to_string(digest_file).unwrap_or_default();
    let recorded = recorded.trim();
    pinned::is_sha256(recorded) && pinned::file_sha256(image).is_ok_and(|actual| actual == recorded)
}

/// Drops cached images whose layers containerd has removed (the image was deleted).
fn forget_images_of_removed_snapshots(cache_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(cache_dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "layers") {
            continue;
        }
        let layers = std::fs::read_to_string(&path).unwrap_or_default();
        if layers.lines().all(|layer| Path::new(layer).is_dir()) {
            continue;
        }
        info!("removing the cached rootfs image of deleted layers: {}", path.display());
        let _ = std::fs::remove_file(path.with_extension("ext4"));
        let _ = std::fs::remove_file(path.with_extension("sha256"));
        let _ = std::fs::remove_file(&path);
    }
}

/// Calls `build` with a directory showing the layers merged (read-only), unmounting afterwards.
fn with_layers_mounted<T>(
    lowers: &[PathBuf],
    upper: Option<&Path>,
    target: &Path,
    build: impl FnOnce(&Path) -> Result<T, Error>,
) -> Result<T, Error> {
    let mut layers: Vec<&Path> = upper.into_iter().chain(lowers.iter().map(PathBuf::as_path)).collect();
    if layers.len() == 1 {
        return build(layers.remove(0));
    }
    std::fs::create_dir_all(target).map_err(|source| Error::Io {
        action: "create",
        path: target.to_path_buf(),
        source,
    })?;
    // Only lower layers and no upper: overlayfs mounts that read-only.
    let lowerdir: Vec<String> = layers.iter().map(|l| l.display().to_string()).collect();
    let options = format!("lowerdir={}", lowerdir.join(":"));
    let mounted = mount(Some("overlay"), target, Some("overlay"), MsFlags::MS_RDONLY, Some(options.as_str()));
    if let Err(source) = mounted {
        let _ = std::fs::remove_dir(target);
        return Err(Error::Mount { path: target.to_path_buf(), source });
    }
    let result = build(target);
    if let Err(err) = umount2(target, MntFlags::MNT_DETACH) {
        warn!("cannot unmount {}: {err}", target.display());
    }
    let _ = std::fs::remove_dir(target);
    result
}

/// Bytes the tree needs on disk, rounded up to blocks per file, and how many inodes.
fn tree_usage(dir: &Path) -> (u64, u64) {
    let (mut bytes, mut inodes) = (0u64, 1u64);
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else { continue };
            inodes += 1;
            bytes += meta.len().div_ceil(BLOCK) * BLOCK;
            if meta.is_dir() {
                pending.push(entry.path());
            }
        }
    }
    (bytes, inodes)
}

/// An ext4 image of `tree` (ownership and modes kept), sized to its contents, without a journal:
/// the guest mounts it read-only.
pub fn build_image(tree: &Path, image: &Path) -> Result<(), Error> {
    let (bytes, inodes) = tree_usage(tree);
    let size = (bytes + bytes / 5 + inodes * 256 + IMAGE_SLACK_BYTES).div_ceil(BLOCK) * BLOCK;
    let io = |action| {
        let path = image.to_path_buf();
        move |source| Error::Io { action, path, source }
    };
    let file = std::fs::File::create(image).map_err(io("create"))?;
    file.set_len(size).map_err(io("size"))?;
    drop(file);
    let output = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-O", "^has_journal", "-b", "4096", "-N"])
        .arg((inodes + 1024).to_string())
        .arg("-d")
        .arg(tree)
        .arg(image)
        .output()
        .map_err(io("run mkfs.ext4 for"))?;
    if !output.status.success() {
        let _ = std::fs::remove_file(image);
        return Err(Error::Mkfs {
            image: image.to_path_buf(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec<'a>(kind: &'a str, source: &'a str, options: &'a [String]) -> MountSpec<'a> {
        MountSpec { kind, source, options }
    }

    #[test]
    fn overlay_mounts_give_layers_top_first_and_the_upper_dir() {
        let options = vec![
            "index=off".to_string(),
            "workdir=/s/3/work".into(),
            "upperdir=/s/3/fs".into(),
            "lowerdir=/s/2/fs:/s/1/fs".into(),
        ];
        assert_eq!(
            parse_snapshot(&[spec("overlay", "overlay", &options)]).unwrap(),
            Snapshot::Overlay {
                lowers: vec!["/s/2/fs".into(), "/s/1/fs".into()],
                upper: Some("/s/3/fs".into())
            }
        );
        let bind = vec!["rbind".to_string(), "rw".into()];
        assert_eq!(
            parse_snapshot(&[spec("bind", "/s/1/fs", &bind)]).unwrap(),
            Snapshot::Directory("/s/1/fs".into())
        );
    }

    #[test]
    fn other_mounts_are_refused_with_the_reason() {
        assert!(matches!(parse_snapshot(&[]), Err(Error::NoMounts)));
        let err = parse_snapshot(&[spec("ext4", "/dev/dm-3", &[])]).unwrap_err();
        assert!(err.to_string().contains("\"ext4\""), "{err}");
        assert!(matches!(
            parse_snapshot(&[spec("overlay", "overlay", &["ro".to_string()])]),
            Err(Error::BadOverlay(_))
        ));
    }

    #[test]
    fn the_cache_key_follows_the_layer_chain() {
        let a = cache_key(&["/s/2/fs".into(), "/s/1/fs".into()]);
        assert_eq!(a, cache_key(&["/s/2/fs".into(), "/s/1/fs".into()]));
        assert_ne!(a, cache_key(&["/s/1/fs".into(), "/s/2/fs".into()]));
        assert_ne!(cache_key(&["/a".into(), "b".into()]), cache_key(&["/a/b".into()]));
    }

    #[test]
    fn a_single_layer_is_built_once_then_found_in_the_cache_and_forgotten_with_the_layer() {
        if !ironclad_test_prereq::needs().program("mkfs.ext4").program("debugfs").ready() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let layer = dir.path().join("layer");
        std::fs::create_dir_all(layer.join("etc")).unwrap();
        std::fs::write(layer.join("etc/hostname"), "image\n").unwrap();
        let upper = dir.path().join("upper");
        std::fs::create_dir(&upper).unwrap();
        let snapshot = Snapshot::Overlay { lowers: vec![layer.clone()], upper: Some(upper) };
        let cache = dir.path().join("cache");
        let first = prepare(&snapshot, &cache, dir.path()).unwrap();
        assert!(first.cached && first.path.starts_with(&cache));
        let built_at = std::fs::metadata(&first.path).unwrap().modified().unwrap();
        let second = prepare(&snapshot, &cache, dir.path()).unwrap();
        assert_eq!(second, first);
        assert_eq!(std::fs::metadata(&second.path).unwrap().modified().unwrap(), built_at);
        // The image holds the layer's file (debugfs reads it without mounting).
        let cat =
            Command::new("debugfs").args(["-R", "cat /etc/hostname"]).arg(&first.path).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&cat.stdout), "image\n");

        // One byte of the cached image changed: it is rebuilt, and what boots is the layer again.
        let mut bytes = std::fs::read(&first.path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        std::fs::write(&first.path, &bytes).unwrap();
        let rebuilt = prepare(&snapshot, &cache, dir.path()).unwrap();
        assert_eq!(rebuilt.path, first.path);
        assert_ne!(std::fs::read(&rebuilt.path).unwrap(), bytes, "the changed image was used");
        let cat =
            Command::new("debugfs").args(["-R", "cat /etc/hostname"]).arg(&rebuilt.path).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&cat.stdout), "image\n");
        std::fs::remove_dir_all(&layer).unwrap();
        forget_images_of_removed_snapshots(&cache);
        assert!(!first.path.exists(), "image of a removed layer kept");
        assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 0);
    }
}
