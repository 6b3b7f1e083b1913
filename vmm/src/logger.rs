//! The VMM's log: the `log` crate, one line per record on stderr (which the shim keeps), as
//! `ironclad-vmm: LEVEL message`. What a guest can make happen goes through a [`GuestErrorLog`],
//! so that a guest cannot fill the log: a few lines at once, then one a second, the rest counted.

use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use log::{LevelFilter, Log, Metadata, Record};

/// Guest-triggered lines a device may log at once, and how often one more.
pub const GUEST_ERROR_BURST: u32 = 5;
pub const GUEST_ERROR_INTERVAL: Duration = Duration::from_secs(1);

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if self.enabled(record.metadata()) {
            // A closed stderr must not end the VMM: the line is lost, the VM goes on.
            let _ = writeln!(std::io::stderr(), "ironclad-vmm: {} {}", record.level(), record.args());
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// Sends the `log` macros to stderr at `level` and above (once per process).
pub fn init(level: LevelFilter) {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}

/// The level `IRONCLAD_VMM_LOG` names (error, warn, info, debug, trace, off), else info.
pub fn level_from_env() -> LevelFilter {
    std::env::var("IRONCLAD_VMM_LOG").ok().and_then(|text| text.parse().ok()).unwrap_or(LevelFilter::Info)
}

/// A token bucket for one device's guest-triggered warnings.
#[derive(Debug)]
pub struct GuestErrorLog {
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: u32,
    last_refill: Instant,
    suppressed: u64,
}

impl Default for GuestErrorLog {
    fn default() -> Self {
        GuestErrorLog {
            state: Mutex::new(Bucket {
                tokens: GUEST_ERROR_BURST,
                last_refill: Instant::now(),
                suppressed: 0,
            }),
        }
    }
}

impl GuestErrorLog {
    /// Logs `message` as a warning if the budget allows; a line that follows suppressed ones says
    /// how many were left out. Returns whether it was logged.
    pub fn warn(&self, message: std::fmt::Arguments<'_>) -> bool {
        self.admit(Instant::now())
            .map(|suppressed| {
                if suppressed > 0 {
                    log::warn!("{message} ({suppressed} more like it were not logged)");
                } else {
                    log::warn!("{message}");
                }
            })
            .is_some()
    }

    /// Takes a token: Some(lines suppressed since the last logged one), or None over budget.
    fn admit(&self, now: Instant) -> Option<u64> {
        let mut bucket = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let earned =
            now.saturating_duration_since(bucket.last_refill).as_nanos() / GUEST_ERROR_INTERVAL.as_nanos();
        if earned > 0 {
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            bucket.tokens = bucket.tokens.saturating_add(earned).min(GUEST_ERROR_BURST);
            bucket.last_refill = now;
        }
        if bucket.tokens == 0 {
            bucket.suppressed += 1;
            return None;
        }
        bucket.tokens -= 1;
        Some(std::mem::take(&mut bucket.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_gets_a_burst_then_one_line_a_second_which_counts_the_rest() {
        let log = GuestErrorLog::default();
        let start = Instant::now();
        let admitted = (0..100).filter(|_| log.admit(start).is_some()).count();
        assert_eq!(admitted, GUEST_ERROR_BURST as usize);
        assert_eq!(log.admit(start + GUEST_ERROR_INTERVAL), Some(100 - u64::from(GUEST_ERROR_BURST)));
        assert_eq!(log.admit(start + GUEST_ERROR_INTERVAL), None);
    }
}
