//! containerd-shim-ironclad-v2: the containerd Task API over one microVM per task. Hypervisor
//! backends boot the guest; the agent client talks to the agent inside it over hybrid vsock.

pub mod agent_client;
pub mod config;
pub mod hypervisor;
pub mod io;
pub mod paths;
pub mod rootfs;
pub mod sandbox;
pub mod service;
