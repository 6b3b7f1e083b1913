//! What a sandbox attaches to its VM, one module per kind of resource, as Kata's runtime-rs does:
//! `rootfs` turns containerd's snapshot into a disk for the guest; `network` carries the CNI
//! network namespace into the guest (a tap joined to the CNI interface by tc). Host directories
//! shared with the guest and volumes join here, each as its own module with the same shape:
//! prepared on the host before (or while) the VM runs, described to the agent, and released by the
//! sandbox's one teardown path.

pub mod network;
pub mod rootfs;
