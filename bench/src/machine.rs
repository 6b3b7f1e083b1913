//! What the figures were measured on.

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: u64,
    pub kernel: String,
    /// "hardware (vmx)" / "hardware (svm)", or "emulated (no vmx/svm)" where KVM runs guest kernel
    /// code through its instruction emulator.
    pub kvm: String,
}

impl Machine {
    pub fn describe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .and_then(|r| r.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let flags = cpuinfo.lines().find(|l| l.starts_with("flags")).unwrap_or("");
        let has = |flag: &str| flags.split_whitespace().any(|f| f == flag);
        let kvm_opens = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
        let kvm = match (kvm_opens, has("vmx"), has("svm")) {
            (false, _, _) => "unavailable".to_string(),
            (true, true, _) => "hardware (vmx)".to_string(),
            (true, _, true) => "hardware (svm)".to_string(),
            (true, false, false) => {
                "emulated (no vmx/svm: guest kernel code runs in KVM's instruction emulator)".to_string()
            }
        };
        let memory_gib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .next()
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<u64>().ok())
            })
            .map(|kb| kb / 1024 / 1024)
            .unwrap_or(0);
        let kernel =
            std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            memory_gib,
            kernel,
            kvm,
        }
    }
}
