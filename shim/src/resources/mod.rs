//! What a sandbox attaches to its VM, one module per kind of resource, as Kata's runtime-rs does:
//! `rootfs` turns containerd's snapshot into a disk for the guest; `network` carries the CNI
//! network namespace into the guest (a tap joined to the CNI interface by tc); `share_fs` is the
//! sandbox's shared directory (virtio-fs), into which `volumes` binds the spec's host directories
//! and files and `rootfs` a pod container's snapshot. A new kind of resource gets its own module of
//! the same shape: prepared on the host before (or while) the VM runs, described to the agent, and
//! released by the sandbox's one teardown path.

pub mod network;
pub mod pinned;
pub mod rootfs;
pub mod share_fs;
pub mod volumes;
