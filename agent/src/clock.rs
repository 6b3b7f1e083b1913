//! Time as the guest counts it.

use nix::time::{clock_gettime, ClockId};

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
