//! The host side of ironclad: hypervisor backends that boot the guest, and the client that talks to
//! the agent inside it over hybrid vsock. The containerd Task API service builds on these.

pub mod agent_client;
pub mod hypervisor;
pub mod paths;
