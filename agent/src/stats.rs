//! A container's cgroup v2 figures, read from its cgroup directory. A file a controller would
//! provide is simply absent when that controller is not enabled: its figures are then zero.

use std::collections::HashMap;
use std::path::Path;

use ironclad_protocol::agent::{
    CPUStat, IOEntry, MemoryEvents, MemoryStat, PidsStat, StatsContainerResponse,
};

/// `key value` lines (cpu.stat, memory.stat, memory.events).
fn flat_keyed(dir: &Path, file: &str) -> HashMap<String, u64> {
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(' ')?;
            Some((key.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

/// A single number, "max" meaning no limit (u64::MAX); 0 when the file is absent.
fn single(dir: &Path, file: &str) -> u64 {
    let text = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
    match text.trim() {
        "max" => u64::MAX,
        value => value.parse().unwrap_or(0),
    }
}

/// io.stat: `MAJ:MIN rbytes=.. wbytes=.. rios=.. wios=.. dbytes=.. dios=..` per device.
fn io_entries(dir: &Path) -> Vec<IOEntry> {
    let text = std::fs::read_to_string(dir.join("io.stat")).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (major, minor) = fields.next()?.split_once(':')?;
            let mut entry = IOEntry::new();
            entry.major = major.parse().ok()?;
            entry.minor = minor.parse().ok()?;
            for field in fields {
                let Some((key, value)) = field.split_once('=') else {
                    continue;
                };
                let value = value.parse().unwrap_or(0);
                match key {
                    "rbytes" => entry.rbytes = value,
                    "wbytes" => entry.wbytes = value,
                    "rios" => entry.rios = value,
                    "wios" => entry.wios = value,
                    _ => {}
                }
            }
            Some(entry)
        })
        .collect()
}

pub fn read(cgroup_dir: &Path) -> StatsContainerResponse {
    let get = |map: &HashMap<String, u64>, key: &str| map.get(key).copied().unwrap_or(0);
    let mut pids = PidsStat::new();
    pids.current = single(cgroup_dir, "pids.current");
    pids.limit = single(cgroup_dir, "pids.max");

    let cpu_stat = flat_keyed(cgroup_dir, "cpu.stat");
    let mut cpu = CPUStat::new();
    cpu.usage_usec = get(&cpu_stat, "usage_usec");
    cpu.user_usec = get(&cpu_stat, "user_usec");
    cpu.system_usec = get(&cpu_stat, "system_usec");
    cpu.nr_periods = get(&cpu_stat, "nr_periods");
    cpu.nr_throttled = get(&cpu_stat, "nr_throttled");
    cpu.throttled_usec = get(&cpu_stat, "throttled_usec");

    let memory_stat = flat_keyed(cgroup_dir, "memory.stat");
    let mut memory = MemoryStat::new();
    memory.usage = single(cgroup_dir, "memory.current");
    memory.usage_limit = single(cgroup_dir, "memory.max");
    memory.anon = get(&memory_stat, "anon");
    memory.file = get(&memory_stat, "file");
    memory.kernel_stack = get(&memory_stat, "kernel_stack");
    memory.slab = get(&memory_stat, "slab");
    memory.sock = get(&memory_stat, "sock");
    memory.shmem = get(&memory_stat, "shmem");
    memory.file_mapped = get(&memory_stat, "file_mapped");
    memory.file_dirty = get(&memory_stat, "file_dirty");
    memory.file_writeback = get(&memory_stat, "file_writeback");
    memory.pgfault = get(&memory_stat, "pgfault");
    memory.pgmajfault = get(&memory_stat, "pgmajfault");

    let events = flat_keyed(cgroup_dir, "memory.events");
    let mut memory_events = MemoryEvents::new();
    memory_events.low = get(&events, "low");
    memory_events.high = get(&events, "high");
    memory_events.max = get(&events, "max");
    memory_events.oom = get(&events, "oom");
    memory_events.oom_kill = get(&events, "oom_kill");

    let mut stats = StatsContainerResponse::new();
    stats.pids = Some(pids).into();
    stats.cpu = Some(cpu).into();
    stats.memory = Some(memory).into();
    stats.io = io_entries(cgroup_dir);
    stats.memory_events = Some(memory_events).into();
    stats
}

/// cgroup v1's "no limit" for memory: the largest page-aligned i64, or anything above it.
const V1_NO_MEMORY_LIMIT: u64 = 0x7FFF_FFFF_FFFF_F000;

/// The figures libcgroups read from a container's cgroup v1 hierarchies, shaped as cgroup v2's so
/// that the shim needs to know one kind. v1 counts CPU time in ns (user and system in clock ticks)
/// and calls anonymous memory `rss` and page cache `cache`; what v1 does not count (slab, sock,
/// kernel stacks, the low/high/oom events) stays zero.
pub fn from_v1(v1: &libcgroups::stats::Stats, oom_kills: u64) -> StatsContainerResponse {
    let mut pids = PidsStat::new();
    pids.current = v1.pids.current;
    // libcgroups leaves the limit at 0 for "max".
    pids.limit = if v1.pids.limit == 0 { u64::MAX } else { v1.pids.limit };

    let usec_per_tick = 1_000_000 / clock_ticks_per_second();
    let mut cpu = CPUStat::new();
    cpu.usage_usec = v1.cpu.usage.usage_total / 1000;
    cpu.user_usec = v1.cpu.usage.usage_user * usec_per_tick;
    cpu.system_usec = v1.cpu.usage.usage_kernel * usec_per_tick;
    cpu.nr_periods = v1.cpu.throttling.periods;
    cpu.nr_throttled = v1.cpu.throttling.throttled_periods;
    cpu.throttled_usec = v1.cpu.throttling.throttled_time / 1000;

    let stat = |key: &str| v1.memory.stats.get(key).copied().unwrap_or(0);
    let mut memory = MemoryStat::new();
    memory.usage = v1.memory.memory.usage;
    memory.usage_limit = match v1.memory.memory.limit {
        limit if limit >= V1_NO_MEMORY_LIMIT => u64::MAX,
        limit => limit,
    };
    memory.anon = stat("rss");
    memory.file = stat("cache");
    memory.shmem = stat("shmem");
    memory.file_mapped = stat("mapped_file");
    memory.file_dirty = stat("dirty");
    memory.file_writeback = stat("writeback");
    memory.pgfault = stat("pgfault");
    memory.pgmajfault = stat("pgmajfault");

    let mut memory_events = MemoryEvents::new();
    // v1 counts how often usage hit the limit, which is what v2's `max` counts.
    memory_events.max = v1.memory.memory.fail_count;
    memory_events.oom_kill = oom_kills;

    let mut stats = StatsContainerResponse::new();
    stats.pids = Some(pids).into();
    stats.cpu = Some(cpu).into();
    stats.memory = Some(memory).into();
    stats.io = v1_io_entries(&v1.blkio);
    stats.memory_events = Some(memory_events).into();
    stats
}

fn clock_ticks_per_second() -> u64 {
    use nix::unistd::{sysconf, SysconfVar};
    match sysconf(SysconfVar::CLK_TCK) {
        Ok(Some(ticks)) if ticks > 0 => ticks as u64,
        _ => 100,
    }
}

/// blkio's per-device `Read`/`Write` lines, one entry per device.
fn v1_io_entries(blkio: &libcgroups::stats::BlkioStats) -> Vec<IOEntry> {
    let mut devices: std::collections::BTreeMap<(u64, u64), IOEntry> = Default::default();
    let mut add = |stats: &[libcgroups::stats::BlkioDeviceStat], bytes: bool| {
        for stat in stats {
            let entry = devices.entry((stat.major, stat.minor)).or_insert_with(|| {
                let mut entry = IOEntry::new();
                (entry.major, entry.minor) = (stat.major, stat.minor);
                entry
            });
            match (stat.op_type.as_deref(), bytes) {
                (Some("Read"), true) => entry.rbytes = stat.value,
                (Some("Write"), true) => entry.wbytes = stat.value,
                (Some("Read"), false) => entry.rios = stat.value,
                (Some("Write"), false) => entry.wios = stat.value,
                _ => {}
            }
        }
    };
    add(&blkio.service_bytes, true);
    add(&blkio.serviced, false);
    devices.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_cgroup_v2_files() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write("pids.current", "3\n");
        write("pids.max", "max\n");
        write("cpu.stat", "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 0\n");
        write("memory.current", "4096000\n");
        write("memory.max", "16777216\n");
        write("memory.stat", "anon 1024\nfile 2048\npgfault 77\n");
        write("memory.events", "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n");
        write("io.stat", "254:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n");
        let stats = read(dir.path());
        assert_eq!((stats.pids.current, stats.pids.limit), (3, u64::MAX));
        assert_eq!((stats.cpu.usage_usec, stats.cpu.user_usec, stats.cpu.system_usec), (1500, 1000, 500));
        assert_eq!((stats.memory.usage, stats.memory.usage_limit), (4_096_000, 16_777_216));
        assert_eq!((stats.memory.anon, stats.memory.file, stats.memory.pgfault), (1024, 2048, 77));
        assert_eq!((stats.memory_events.max, stats.memory_events.oom_kill), (4, 1));
        assert_eq!(stats.io.len(), 1);
        assert_eq!(
            (stats.io[0].major, stats.io[0].minor, stats.io[0].wbytes, stats.io[0].wios),
            (254, 0, 8192, 2)
        );
    }

    #[test]
    fn cgroup_v1_figures_are_shaped_as_v2() {
        use libcgroups::stats::{BlkioDeviceStat, Stats};
        let mut v1 = Stats::default();
        v1.pids.current = 2;
        v1.cpu.usage.usage_total = 3_000_000;
        v1.cpu.usage.usage_user = 1;
        v1.cpu.throttling.throttled_time = 5000;
        v1.memory.memory.usage = 4096;
        v1.memory.memory.limit = 9_223_372_036_854_771_712;
        v1.memory.memory.fail_count = 9;
        v1.memory.stats.insert("rss".into(), 1024);
        v1.memory.stats.insert("cache".into(), 2048);
        let device =
            |op: &str, value| BlkioDeviceStat { major: 8, minor: 0, op_type: Some(op.into()), value };
        v1.blkio.service_bytes = vec![device("Read", 4096), device("Write", 8192), device("Total", 12288)];
        v1.blkio.serviced = vec![device("Read", 1), device("Write", 2)];
        let stats = from_v1(&v1, 3);
        assert_eq!((stats.pids.current, stats.pids.limit), (2, u64::MAX));
        assert_eq!(stats.cpu.usage_usec, 3000);
        assert_eq!(stats.cpu.user_usec, 1_000_000 / clock_ticks_per_second());
        assert_eq!(stats.cpu.throttled_usec, 5);
        assert_eq!((stats.memory.usage, stats.memory.usage_limit), (4096, u64::MAX));
        assert_eq!((stats.memory.anon, stats.memory.file), (1024, 2048));
        assert_eq!((stats.memory_events.max, stats.memory_events.oom_kill), (9, 3));
        assert_eq!(stats.io.len(), 1);
        let io = &stats.io[0];
        assert_eq!((io.major, io.rbytes, io.wbytes, io.rios, io.wios), (8, 4096, 8192, 1, 2));

        v1.pids.limit = 20;
        v1.memory.memory.limit = 32 << 20;
        let limited = from_v1(&v1, 0);
        assert_eq!((limited.pids.limit, limited.memory.usage_limit), (20, 32 << 20));
    }

    #[test]
    fn missing_controllers_read_as_zero() {
        let dir = tempfile::tempdir().unwrap();
        let stats = read(dir.path());
        assert_eq!(stats.memory.usage, 0);
        assert!(stats.io.is_empty());
    }
}
