//! The agent API shared by `containerd-shim-ironclad-v2` (client) and `ironclad-agent` (server):
//! protobuf messages and async ttrpc services generated from `protos/agent.proto` at build time.

/// The API version this crate describes. Bumped whenever an RPC or a field is added.
pub const API_VERSION: u32 = 4;

/// "outer: inner: innermost": an error and every cause below it, on one line. The workspace's one
/// way of turning an error into text for a log line, a ttrpc status or a fatal message.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// How the agent's ready line on the console begins; the shim waits for it.
pub const READY_PREFIX: &str = "ironclad-agent ready ";

/// The one line the host waits for on the console, part of the harness contract:
/// `ironclad-agent ready version=<semver> uptime_ms=<ms>`, then `init_ms=<ms>` (the uptime at
/// which the agent, /init, began) when known, which splits the guest's boot into the kernel's part
/// and the agent's.
pub fn ready_line(version: &str, uptime_ms: u64, init_ms: Option<u64>) -> String {
    let line = format!("{READY_PREFIX}version={version} uptime_ms={uptime_ms}");
    match init_ms {
        Some(init_ms) => format!("{line} init_ms={init_ms}"),
        None => line,
    }
}

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

#[cfg(test)]
mod tests {
    #[test]
    fn the_ready_line_carries_version_uptime_and_when_known_the_agents_start() {
        assert_eq!(super::ready_line("0.1.0", 42, None), "ironclad-agent ready version=0.1.0 uptime_ms=42");
        assert_eq!(
            super::ready_line("0.1.0", 42, Some(30)),
            "ironclad-agent ready version=0.1.0 uptime_ms=42 init_ms=30"
        );
    }

    #[derive(Debug, thiserror::Error)]
    #[error("cannot start the VM")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn error_chain_names_every_cause() {
        let err = Outer(std::io::Error::new(std::io::ErrorKind::NotFound, "no kernel"));
        assert_eq!(super::error_chain(&err), "cannot start the VM: no kernel");
        assert_eq!(super::error_chain(&std::io::Error::other("alone")), "alone");
    }
}
