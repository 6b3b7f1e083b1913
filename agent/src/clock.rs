//! Time as the guest counts it.

use std::sync::OnceLock;

use nix::time::{clock_gettime, ClockId};

/// The guest's uptime when the agent began, for the boot timeline (kernel to /init).
static AGENT_START_MS: OnceLock<u64> = OnceLock::new();

/// Records now as the agent's start: the first thing the agent's main does.
pub fn mark_agent_start() {
    let _ = AGENT_START_MS.set(uptime_ms());
}

/// The guest's uptime when the agent began, if [`mark_agent_start`] ran.
pub fn agent_start_ms() -> Option<u64> {
    AGENT_START_MS.get().copied()
}

/// Milliseconds since the kernel started (CLOCK_BOOTTIME, which also counts suspended time).
pub fn uptime_ms() -> u64 {
    clock_gettime(ClockId::CLOCK_BOOTTIME)
        .map(|t| {
            let secs = u64::try_from(t.tv_sec()).unwrap_or(0);
            let nanos = u64::try_from(t.tv_nsec()).unwrap_or(0);
            secs * 1000 + nanos / 1_000_000
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime_is_positive_and_monotonic() {
        let first = uptime_ms();
        let second = uptime_ms();
        assert!(first > 0);
        assert!(second >= first);
    }
}
