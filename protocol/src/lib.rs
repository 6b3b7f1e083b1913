//! The agent API shared by `containerd-shim-ironclad-v2` (client) and `ironclad-agent` (server):
//! protobuf messages and async ttrpc services generated from `protos/agent.proto` at build time.

/// The API version this crate describes. Bumped whenever an RPC or a field is added.
pub const API_VERSION: u32 = 4;

/// The vsock port on which the agent serves inside the guest.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Generated protobuf messages of `agent.proto`.
#[allow(
    clippy::all,
    clippy::unwrap_used,
    clippy::undocumented_unsafe_blocks,
    nonstandard_style,
    unused_mut,
    missing_docs
)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

/// Generated ttrpc clients and service traits of `agent.proto`.
#[allow(
    clippy::all,
    clippy::unwrap_used,
    clippy::undocumented_unsafe_blocks,
    nonstandard_style,
    unused_mut,
    missing_docs
)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

/// containerd's runtime options for shims (`runtimeoptions.v1.Options`), which
/// containerd-shim-protos does not carry.
#[allow(
    clippy::all,
    clippy::unwrap_used,
    clippy::undocumented_unsafe_blocks,
    nonstandard_style,
    unused_mut,
    missing_docs
)]
pub mod runtimeoptions {
    include!(concat!(env!("OUT_DIR"), "/runtimeoptions.rs"));
}
