//! The agent's cgroup figures as containerd's `io.containerd.cgroups.v2.Metrics` (`ctr task metrics`).

use containerd_shim::protos::cgroups_v2::metrics::{
    CPUStat, IOEntry, IOStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use containerd_shim::protos::protobuf::MessageField;
use ironclad_protocol::agent::StatsContainerResponse;

/// The type URL containerd decodes the metrics by.
pub const METRICS_TYPE: &str = "io.containerd.cgroups.v2.Metrics";

/// Field for field: the agent names its figures as containerd does.
pub fn from_agent_stats(stats: &StatsContainerResponse) -> Metrics {
    let mut metrics = Metrics::new();
    if let Some(p) = stats.pids.as_ref() {
        metrics.pids =
            MessageField::some(PidsStat { current: p.current, limit: p.limit, ..Default::default() });
    }
    if let Some(c) = stats.cpu.as_ref() {
        metrics.cpu = MessageField::some(CPUStat {
            usage_usec: c.usage_usec,
            user_usec: c.user_usec,
            system_usec: c.system_usec,
            nr_periods: c.nr_periods,
            nr_throttled: c.nr_throttled,
            throttled_usec: c.throttled_usec,
            ..Default::default()
        });
    }
    if let Some(m) = stats.memory.as_ref() {
        metrics.memory = MessageField::some(MemoryStat {
            usage: m.usage,
            usage_limit: m.usage_limit,
            anon: m.anon,
            file: m.file,
            kernel_stack: m.kernel_stack,
            slab: m.slab,
            sock: m.sock,
            shmem: m.shmem,
            file_mapped: m.file_mapped,
            file_dirty: m.file_dirty,
            file_writeback: m.file_writeback,
            pgfault: m.pgfault,
            pgmajfault: m.pgmajfault,
            ..Default::default()
        });
    }
    if let Some(e) = stats.memory_events.as_ref() {
        metrics.memory_events = MessageField::some(MemoryEvents {
            low: e.low,
            high: e.high,
            max: e.max,
            oom: e.oom,
            oom_kill: e.oom_kill,
            ..Default::default()
        });
    }
    let usage = stats
        .io
        .iter()
        .map(|e| IOEntry {
            major: e.major,
            minor: e.minor,
            rbytes: e.rbytes,
            wbytes: e.wbytes,
            rios: e.rios,
            wios: e.wios,
            ..Default::default()
        })
        .collect();
    metrics.io = MessageField::some(IOStat { usage, ..Default::default() });
    metrics
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_carry_the_agents_figures() {
        let mut stats = StatsContainerResponse::new();
        stats.memory = MessageField::some(ironclad_protocol::agent::MemoryStat {
            usage: 7,
            usage_limit: 32 << 20,
            ..Default::default()
        });
        stats.pids = MessageField::some(ironclad_protocol::agent::PidsStat {
            current: 3,
            limit: 10,
            ..Default::default()
        });
        stats.cpu =
            MessageField::some(ironclad_protocol::agent::CPUStat { usage_usec: 42, ..Default::default() });
        let metrics = from_agent_stats(&stats);
        assert_eq!(metrics.memory.usage_limit, 32 << 20);
        assert_eq!(metrics.memory.usage, 7);
        assert_eq!((metrics.pids.current, metrics.pids.limit), (3, 10));
        assert_eq!(metrics.cpu.usage_usec, 42);
    }
}
