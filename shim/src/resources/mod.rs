//! What a sandbox attaches to its VM, one module per kind of resource, as Kata's runtime-rs does:
//! `rootfs` turns containerd's snapshot into a disk for the guest. Host directories shared with the
//! guest, volumes and network interfaces join here, each as its own module with the same shape:
//! prepared on the host before (or while) the VM runs, described to the agent, and released by the
//! sandbox's one teardown path.

pub mod rootfs;
