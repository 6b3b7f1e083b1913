//! Where an idle sandbox's host memory goes: every mapping of every process of the sandbox, from
//! /proc/PID/smaps, its PSS put under the part of the sandbox it belongs to. PSS divides a page
//! shared by several processes among them, so the guest's memory mapped by the monitor and by the
//! vhost-user helpers is counted once, and the parts add up to the sandbox's PSS.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

/// A part of a sandbox's host memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Part {
    /// The guest's RAM as far as it has touched it (a memfd, mapped by the monitor and its
    /// vhost-user helpers).
    GuestMemory,
    /// QEMU TCG's translated code: the monitor's anonymous executable mapping.
    CodeBuffer,
    /// The monitor's other anonymous memory: heap, stacks, device state.
    MonitorHeap,
    /// The guest's kernel and initrd files as the monitor keeps them mapped (for a reset): page
    /// cache, shared by every sandbox booting the same files.
    GuestImages,
    /// The monitor's binary and shared libraries, as far as they are resident.
    MonitorFiles,
    /// vhost-device-vsock and virtiofsd, less the guest memory they map.
    Helpers,
    /// The ironclad-jailer supervisors, one per helper.
    Jailers,
    /// The shim's binary and libraries as far as they are resident: page cache, which every
    /// sandbox's shim shares (its PSS falls as 1/N with N sandboxes).
    ShimFiles,
    /// The shim's own memory: heap, stacks, the relocated part of its binary.
    ShimHeap,
    /// Anything else of the sandbox (runc's container processes, for one).
    Other,
}

impl Part {
    pub fn label(self) -> &'static str {
        match self {
            Part::GuestMemory => "guest memory touched",
            Part::CodeBuffer => "emulator's translated code",
            Part::MonitorHeap => "monitor's heap and stacks",
            Part::GuestImages => "guest kernel and initrd files (shared)",
            Part::MonitorFiles => "monitor's binary and libraries",
            Part::Helpers => "vsock and file-server helpers",
            Part::Jailers => "jailer supervisors",
            Part::ShimFiles => "shim's binary and libraries (shared)",
            Part::ShimHeap => "shim's heap and stacks",
            Part::Other => "other",
        }
    }
}

/// What a process of the sandbox is, from its program's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessKind {
    Monitor,
    Helper,
    Jailer,
    Shim,
    Other,
}

impl ProcessKind {
    /// From argv[0] (the command line's first word).
    pub fn of_program(argv0: &str) -> ProcessKind {
        let name = argv0.rsplit('/').next().unwrap_or(argv0);
        match name {
            n if n.starts_with("qemu-system") || n == "ironclad-vmm" => ProcessKind::Monitor,
            "vhost-device-vsock" | "virtiofsd" => ProcessKind::Helper,
            "ironclad-jailer" => ProcessKind::Jailer,
            n if n.starts_with("containerd-shim") => ProcessKind::Shim,
            _ => ProcessKind::Other,
        }
    }
}

/// One mapping of /proc/PID/smaps: its header's permissions and path (empty for anonymous memory),
/// its PSS, and how much of it is anonymous (a file mapping's pages written since, such as a
/// binary's relocated data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub perms: String,
    pub path: String,
    pub pss_kib: u64,
    pub anonymous_kib: u64,
}

/// The mappings of one smaps text. A header line is `start-end perms offset dev inode [path]`; the
/// lines after it are `Field: value [kB]` until the next header.
pub fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut mappings: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        if let Some(mapping) = header(line) {
            mappings.push(mapping);
        } else if let Some(last) = mappings.last_mut() {
            if let Some(kib) = pss_field(line) {
                last.pss_kib = kib;
            } else if let Some(kib) = kib_field(line, "Anonymous:") {
                last.anonymous_kib = kib;
            }
        }
    }
    mappings
}

/// A process's whole PSS in KiB, from /proc/PID/smaps_rollup (0 for a process that is gone).
pub fn rollup_pss_kib(pid: i32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    text.lines().find_map(pss_field).unwrap_or(0)
}

/// The KiB of a `Pss:   123 kB` line of smaps or smaps_rollup.
fn pss_field(line: &str) -> Option<u64> {
    kib_field(line, "Pss:")
}

/// The KiB of a `<name>   123 kB` line.
fn kib_field(line: &str, name: &str) -> Option<u64> {
    line.strip_prefix(name)?.split_whitespace().next()?.parse().ok()
}

fn header(line: &str) -> Option<Mapping> {
    let mut fields = line.split_whitespace();
    let range = fields.next()?;
    let (start, end) = range.split_once('-')?;
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex(start) || !hex(end) {
        return None;
    }
    let perms = fields.next()?.to_string();
    // offset, device and inode come next; the path is the rest (" (deleted)" included).
    Some(Mapping { perms, path: after_fields(line, 5).to_string(), pss_kib: 0, anonymous_kib: 0 })
}

/// What follows the first `n` whitespace-separated fields of `line`, trimmed.
fn after_fields(line: &str, n: usize) -> &str {
    let mut rest = line;
    for _ in 0..n {
        rest = rest.trim_start();
        rest = &rest[rest.find(char::is_whitespace).unwrap_or(rest.len())..];
    }
    rest.trim()
}

/// The part a mapping of a process of `kind` belongs to; `guest_images` are the kernel's and the
/// initrd's paths.
pub fn part_of(kind: ProcessKind, mapping: &Mapping, guest_images: &[String]) -> Part {
    let anonymous = mapping.path.is_empty() || mapping.path.starts_with('[');
    if mapping.path.starts_with("/memfd:") {
        // QEMU names its split-W^X code buffer's memfd "tcg-jit"; everything else shared through
        // a memfd is the guest's RAM.
        return if mapping.path.contains("tcg-jit") { Part::CodeBuffer } else { Part::GuestMemory };
    }
    if guest_images.contains(&mapping.path) {
        return Part::GuestImages;
    }
    match kind {
        ProcessKind::Monitor if anonymous && mapping.perms.contains('x') => Part::CodeBuffer,
        ProcessKind::Monitor if anonymous => Part::MonitorHeap,
        ProcessKind::Monitor => Part::MonitorFiles,
        ProcessKind::Helper => Part::Helpers,
        ProcessKind::Jailer => Part::Jailers,
        ProcessKind::Shim if anonymous => Part::ShimHeap,
        ProcessKind::Shim => Part::ShimFiles,
        ProcessKind::Other => Part::Other,
    }
}

/// A mapping's PSS by part: all of it under [`part_of`]'s part, except that the pages of the
/// shim's binary it has written (its relocated data, anonymous now and its own) are its heap's.
fn shares(kind: ProcessKind, mapping: &Mapping, guest_images: &[String]) -> Vec<(Part, u64)> {
    let part = part_of(kind, mapping, guest_images);
    if part != Part::ShimFiles {
        return vec![(part, mapping.pss_kib)];
    }
    let own = mapping.anonymous_kib.min(mapping.pss_kib);
    vec![(Part::ShimHeap, own), (Part::ShimFiles, mapping.pss_kib - own)]
}

/// The PSS of each part over the processes `pids`, in MiB, largest first; parts with nothing are
/// left out. `guest_images`: the kernel and initrd the sandboxes boot.
pub fn breakdown(pids: &[i32], guest_images: &[&Path]) -> Vec<(Part, f64)> {
    // As the shim hands them to the monitor: links and `..` resolved.
    let guest_images: Vec<String> = guest_images
        .iter()
        .map(|path| std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()).display().to_string())
        .collect();
    let mut kib = BTreeMap::<Part, u64>::new();
    for &pid in pids {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let argv0 =
            String::from_utf8_lossy(cmdline.split(|&b| b == 0).next().unwrap_or_default()).into_owned();
        let kind = ProcessKind::of_program(&argv0);
        let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
        for mapping in parse_smaps(&smaps) {
            for (part, share) in shares(kind, &mapping, &guest_images) {
                *kib.entry(part).or_default() += share;
            }
        }
    }
    let mut parts: Vec<(Part, f64)> =
        kib.into_iter().filter(|(_, k)| *k > 0).map(|(part, k)| (part, k as f64 / 1024.0)).collect();
    parts.sort_by(|a, b| b.1.total_cmp(&a.1));
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0a00000-55d0c1200000 r-xp 00200000 fd:01 1234                       /usr/bin/qemu-system-x86_64
Size:               8192 kB
Rss:                4096 kB
Pss:                4000 kB
VmFlags: rd ex mr mw me dw
7f0000000000-7f0010000000 rw-s 00000000 00:01 77                         /memfd:mem (deleted)
Size:             262144 kB
Pss:               30000 kB
7f1000000000-7f1010000000 rwxp 00000000 00:00 0 
Size:             262144 kB
Pss:               12000 kB
Anonymous:         12000 kB
7f2000000000-7f2000100000 rw-p 00000000 00:00 0                          [heap]
Pss:                 900 kB
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]
Pss:                  36 kB
7f3000000000-7f3001000000 r--p 00000000 fd:01 99                         /usr/local/share/ironclad/vmlinux
Pss:                6000 kB
";
    const IMAGES: &[&str] = &["/usr/local/share/ironclad/vmlinux", "/usr/local/share/ironclad/initrd.img"];

    fn images() -> Vec<String> {
        IMAGES.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn smaps_mappings_keep_their_path_permissions_and_pss() {
        let mappings = parse_smaps(SMAPS);
        assert_eq!(mappings.len(), 6);
        assert_eq!(mappings[0].path, "/usr/bin/qemu-system-x86_64");
        assert_eq!(mappings[0].pss_kib, 4000);
        assert_eq!(mappings[1].path, "/memfd:mem (deleted)");
        assert_eq!(
            mappings[2],
            Mapping { perms: "rwxp".into(), path: String::new(), pss_kib: 12000, anonymous_kib: 12000 }
        );
        assert_eq!(mappings[3].path, "[heap]");
        // Field lines are not headers, even those that start with hex-like words.
        assert!(parse_smaps("Size: 4 kB\nPss: 4 kB\n").is_empty());
    }

    #[test]
    fn a_monitors_mappings_fall_into_guest_memory_code_buffer_heap_and_files() {
        let parts: Vec<Part> =
            parse_smaps(SMAPS).iter().map(|m| part_of(ProcessKind::Monitor, m, &images())).collect();
        assert_eq!(
            parts,
            [
                Part::MonitorFiles,
                Part::GuestMemory,
                Part::CodeBuffer,
                Part::MonitorHeap,
                Part::MonitorHeap,
                Part::GuestImages
            ]
        );
        // A helper's view of the same guest memory is guest memory too; its own heap is its own.
        let helper: Vec<Part> =
            parse_smaps(SMAPS).iter().map(|m| part_of(ProcessKind::Helper, m, &images())).collect();
        assert_eq!(helper[1], Part::GuestMemory);
        assert_eq!(helper[3], Part::Helpers);
    }

    #[test]
    fn a_shims_binary_is_shared_but_what_it_relocated_and_its_heap_are_its_own() {
        let smaps = "\
5653504ff000-565350490000 r-xp 00000000 fd:01 7 /usr/local/bin/containerd-shim-ironclad-v2
Pss:                4864 kB
Anonymous:             0 kB
565350490000-5653504ff000 r--p 00000000 fd:01 7 /usr/local/bin/containerd-shim-ironclad-v2
Pss:                 444 kB
Anonymous:           440 kB
565367026000-565367047000 rw-p 00000000 00:00 0 [heap]
Pss:                  80 kB
Anonymous:            80 kB
";
        let mut parts = BTreeMap::<Part, u64>::new();
        for mapping in parse_smaps(smaps) {
            for (part, kib) in shares(ProcessKind::Shim, &mapping, &[]) {
                *parts.entry(part).or_default() += kib;
            }
        }
        assert_eq!(parts, BTreeMap::from([(Part::ShimFiles, 4868), (Part::ShimHeap, 520)]));
        // Other processes' file mappings stay whole.
        let monitor = parse_smaps(SMAPS);
        assert_eq!(shares(ProcessKind::Monitor, &monitor[0], &images()), vec![(Part::MonitorFiles, 4000)]);
    }

    #[test]
    fn processes_are_told_apart_by_their_program() {
        assert_eq!(ProcessKind::of_program("/usr/bin/qemu-system-x86_64"), ProcessKind::Monitor);
        assert_eq!(ProcessKind::of_program("/usr/local/bin/ironclad-vmm"), ProcessKind::Monitor);
        assert_eq!(ProcessKind::of_program("/root/.cargo/bin/virtiofsd"), ProcessKind::Helper);
        assert_eq!(ProcessKind::of_program("ironclad-jailer"), ProcessKind::Jailer);
        assert_eq!(ProcessKind::of_program("/usr/local/bin/containerd-shim-ironclad-v2"), ProcessKind::Shim);
        assert_eq!(ProcessKind::of_program("sleep"), ProcessKind::Other);
    }

    #[test]
    fn this_process_breaks_down_into_parts_that_add_up_to_its_pss() {
        let me = i32::try_from(std::process::id()).unwrap();
        let parts = breakdown(&[me], &[]);
        let total: f64 = parts.iter().map(|(_, mib)| mib).sum();
        let pss_kib = rollup_pss_kib(me) as f64;
        assert!(pss_kib > 0.0);
        // The two reads are moments apart; a test process's memory moves a little in between.
        assert!((total * 1024.0 - pss_kib).abs() < pss_kib * 0.1 + 512.0, "{total} MiB vs {pss_kib} KiB");
        assert!(parts.iter().all(|(part, _)| *part == Part::Other), "{parts:?}");
    }
}
