//! A sandbox's start, step by step, on the host's wall clock: the shim marks each step it sees
//! (and the guest's boot, from its ready line) and logs them as one line when the sandbox's task is
//! deleted. `make bench` reads that line next to its own clock and breaks a cold start down
//! (bench/src/runtimes.rs).

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How the logged line begins.
pub const LINE_PREFIX: &str = "start timeline:";

/// The steps, in the order a start goes through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    /// The serving shim's process began.
    ShimStarted,
    CreateReceived,
    /// QEMU or ironclad-vmm was started (after the rootfs, the network, the jail and the helpers).
    MonitorStarted,
    /// The guest kernel began: the ready line's arrival less the guest's uptime.
    KernelEntered,
    /// /init (the agent) began: the kernel's start plus the ready line's `init_ms`.
    InitStarted,
    /// The agent's ready line reached the shim.
    AgentReady,
    /// The container exists in the guest; Create returns.
    ContainerCreated,
    StartReceived,
    /// The container's process runs; Start returns.
    Started,
    /// The shim learnt the container's process exited.
    Exited,
    /// The VM and everything the sandbox had on the host are gone.
    TornDown,
}

impl Step {
    pub const ALL: [Step; 11] = [
        Step::ShimStarted,
        Step::CreateReceived,
        Step::MonitorStarted,
        Step::KernelEntered,
        Step::InitStarted,
        Step::AgentReady,
        Step::ContainerCreated,
        Step::StartReceived,
        Step::Started,
        Step::Exited,
        Step::TornDown,
    ];

    /// Its name in the logged line.
    pub fn key(self) -> &'static str {
        match self {
            Step::ShimStarted => "shim_started",
            Step::CreateReceived => "create",
            Step::MonitorStarted => "monitor",
            Step::KernelEntered => "kernel",
            Step::InitStarted => "init",
            Step::AgentReady => "agent_ready",
            Step::ContainerCreated => "created",
            Step::StartReceived => "start",
            Step::Started => "started",
            Step::Exited => "exited",
            Step::TornDown => "torn_down",
        }
    }

    pub fn from_key(key: &str) -> Option<Step> {
        Step::ALL.into_iter().find(|step| step.key() == key)
    }
}

static PROCESS_STARTED_MS: OnceLock<u64> = OnceLock::new();

/// Called first thing in the shim's main: when this process began.
pub fn mark_process_start() {
    let _ = PROCESS_STARTED_MS.set(now_ms());
}

/// Milliseconds since the epoch (0 with a clock before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The steps one sandbox's start went through, each at most once (a later mark replaces one).
#[derive(Debug, Default)]
pub struct Timeline {
    marks: Mutex<Vec<(Step, u64)>>,
}

impl Timeline {
    /// A start whose Create just arrived, with the shim's own start where it was marked.
    pub fn begun() -> Timeline {
        let timeline = Timeline::default();
        if let Some(&started) = PROCESS_STARTED_MS.get() {
            timeline.mark_at(Step::ShimStarted, started);
        }
        timeline.mark(Step::CreateReceived);
        timeline
    }

    pub fn mark(&self, step: Step) {
        self.mark_at(step, now_ms());
    }

    pub fn mark_at(&self, step: Step, at_ms: u64) {
        if let Ok(mut marks) = self.marks.lock() {
            marks.retain(|(marked, _)| *marked != step);
            marks.push((step, at_ms));
        }
    }

    /// The guest's part, from its ready line seen now: the monitor started `since_monitor` ago,
    /// the guest's kernel `uptime_ms` ago, /init `init_ms` after the kernel (on the guest's clock).
    pub fn mark_guest_boot(&self, since_monitor: Duration, uptime_ms: u64, init_ms: Option<u64>) {
        let ready = now_ms();
        let kernel = ready.saturating_sub(uptime_ms);
        self.mark_at(Step::MonitorStarted, ready.saturating_sub(since_monitor.as_millis() as u64));
        self.mark_at(Step::KernelEntered, kernel);
        if let Some(init_ms) = init_ms {
            self.mark_at(Step::InitStarted, kernel + init_ms);
        }
        self.mark_at(Step::AgentReady, ready);
    }

    /// `start timeline: shim_started=<ms> create=<ms> ...`, in the steps' order.
    pub fn line(&self) -> String {
        let mut marks = self.marks.lock().map(|marks| marks.clone()).unwrap_or_default();
        marks.sort();
        let fields: Vec<String> = marks.iter().map(|(step, at)| format!("{}={at}", step.key())).collect();
        format!("{LINE_PREFIX} {}", fields.join(" "))
    }
}

/// The marks of a logged timeline line (found anywhere in `text`, e.g. in containerd's log, up to
/// the end of its quoted message); None without one.
pub fn parse_line(text: &str) -> Option<Vec<(Step, u64)>> {
    let rest = &text[text.find(LINE_PREFIX)? + LINE_PREFIX.len()..];
    let message = rest.split(['"', '\\']).next().unwrap_or(rest);
    let mut marks = Vec::new();
    // Up to the first field that is no step (what a logger may add after the message).
    for field in message.split_whitespace() {
        let Some((step, value)) =
            field.split_once('=').and_then(|(key, value)| Some((Step::from_key(key)?, value)))
        else {
            break;
        };
        marks.push((step, value.parse().ok()?));
    }
    (!marks.is_empty()).then_some(marks)
}

/// The timeline the shim logged for task `id`, in a log holding many tasks' lines (containerd's):
/// the shim's lines carry the task as a field of their own (`id="<task>"`, see crate::logging).
pub fn find_task_line(log: &str, id: &str) -> Option<Vec<(Step, u64)>> {
    let field = format!("id=\"{id}\"");
    log.lines().filter(|line| line.contains(&field)).find_map(parse_line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeline_is_logged_in_step_order_and_read_back() {
        let timeline = Timeline::default();
        timeline.mark_at(Step::Started, 1_900);
        timeline.mark_at(Step::CreateReceived, 1_000);
        timeline.mark_at(Step::CreateReceived, 1_010);
        let line = timeline.line();
        assert_eq!(line, "start timeline: create=1010 started=1900");
        // As containerd logs it: inside the quoted message, the shim's task id after it.
        let logged =
            format!("time=\"2026-12-01T03:00:00Z\" level=info msg=\"{line} id=\\\"t1\\\"\" runtime=x");
        assert_eq!(parse_line(&logged), Some(vec![(Step::CreateReceived, 1_010), (Step::Started, 1_900)]));
    }

    #[test]
    fn the_guest_boot_is_placed_from_the_ready_line() {
        let timeline = Timeline::default();
        timeline.mark_guest_boot(Duration::from_millis(900), 700, Some(650));
        let marks = parse_line(&timeline.line()).unwrap();
        let at = |step| marks.iter().find(|(s, _)| *s == step).map(|(_, at)| *at).unwrap();
        assert_eq!(at(Step::AgentReady) - at(Step::MonitorStarted), 900);
        assert_eq!(at(Step::AgentReady) - at(Step::KernelEntered), 700);
        assert_eq!(at(Step::InitStarted) - at(Step::KernelEntered), 650);
    }

    #[test]
    fn the_timeline_of_a_task_is_found_among_other_tasks_lines() {
        let log = "time=\"t\" level=info msg=\"start timeline: create=5 started=9\" id=\"a\" runtime=r\n\
                   time=\"t\" level=info msg=\"start timeline: create=7\" id=\"b\" runtime=r\n";
        assert_eq!(find_task_line(log, "b"), Some(vec![(Step::CreateReceived, 7)]));
        assert_eq!(find_task_line(log, "c"), None);
    }

    #[test]
    fn a_line_that_is_not_a_timeline_is_none() {
        assert_eq!(parse_line("VM ready: agent 0.1.0"), None);
        assert_eq!(parse_line("start timeline: create=soon"), None);
        assert_eq!(parse_line("start timeline: launch=5"), None);
        assert_eq!(parse_line("start timeline:"), None);
        for step in Step::ALL {
            assert_eq!(Step::from_key(step.key()), Some(step));
        }
    }
}
