//! containerd-shim-ironclad-v2: the containerd Task API over one microVM per task, shaped like
//! containerd's runc shim and Kata's runtime-rs:
//!
//! - `service`: the Task API, and nothing else; `task`: the containers by id; `process`: a
//!   process's stdio, status and exit; `spec`: the typed OCI spec; `metrics`; `events`: one
//!   channel, one forwarder.
//! - `sandbox`: the VM, its agent client and its one teardown path; `resources/`: what a sandbox
//!   attaches to its VM (`rootfs`); `hypervisor/`: the backends that boot it (ironclad-vmm, QEMU).
//! - `agent_client`: ttrpc to the agent over hybrid vsock; `io`: stdio relays; `config`;
//!   `paths`; `guest_text`: what the guest says, escaped and cut before it is logged.

pub mod agent_client;
pub mod config;
pub mod events;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod guest_text;
pub mod hypervisor;
pub mod io;
pub mod jail;
pub mod logging;
pub mod metrics;
pub mod paths;
pub mod pool;
pub mod process;
pub mod resources;
pub mod sandbox;
pub mod service;
pub mod spec;
pub mod task;
pub mod timeline;
