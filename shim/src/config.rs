//! `/etc/ironclad/config.toml`: what the shim boots and how. Every key has a default that works
//! after `make install`; a bad key or value is an error naming it and its line.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

use crate::hypervisor::HypervisorKind;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/ironclad/config.toml";
/// Where `make install` puts the guest kernel and initrd.
pub const DEFAULT_SHARE_DIR: &str = "/usr/local/share/ironclad";
/// Read-only root file system images, kept across containers of the same image.
pub const DEFAULT_IMAGE_CACHE: &str = "/var/lib/ironclad/images";
/// Guest console logs, on disk rather than on the run root's tmpfs.
pub const DEFAULT_LOG_ROOT: &str = "/var/log/ironclad";

/// The link-local address clouds serve instance metadata (and credentials) on.
pub const METADATA_ADDRESS: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 169, 254);

/// Per-container annotations that may change the VM's size, when the config allows them.
pub const ANNOTATION_VCPUS: &str = "io.ironclad.vcpus";
pub const ANNOTATION_MEMORY_MIB: &str = "io.ironclad.memory_mib";
/// The agent's log filter for this sandbox (its `IRONCLAD_AGENT_LOG`), e.g. `debug` or
/// `warn,ironclad_agent=debug`.
pub const ANNOTATION_AGENT_LOG: &str = "io.ironclad.agent_log";
/// The longest agent log filter an annotation may set.
const MAX_AGENT_LOG_LEN: usize = 128;

/// Free blocks of 128 KiB and up are reported, not only Linux's default 2 MiB ones: of what a
/// container's jobs made the sandbox grow, the host got more back, sooner (docs/vmm.md,
/// "virtio-balloon").
const PAGE_REPORTING_ORDER_PARAM: &str = "page_reporting.page_reporting_order=5";

const VCPU_RANGE: std::ops::RangeInclusive<u8> = 1..=32;
/// Never root's, nor the range where distributions put their users; at most 2^31 - 1 with the count.
const JAIL_FIRST_UID_RANGE: std::ops::RangeInclusive<u32> = 65_536..=2_000_000_000;
const JAIL_UID_COUNT_RANGE: std::ops::RangeInclusive<u32> = 1..=100_000_000;
/// Below 64 MiB QEMU itself does not fit; above 64 GiB the limit means nothing.
const JAIL_OVERHEAD_RANGE_MIB: std::ops::RangeInclusive<u32> = 64..=65_536;
const MEMORY_RANGE_MIB: std::ops::RangeInclusive<u32> = 64..=65536;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("annotation {key} is not allowed: list it in allowed_annotations of {config}")]
    AnnotationNotAllowed { key: String, config: PathBuf },
    #[error("annotation {key}={value:?}: {reason}")]
    BadAnnotation { key: String, value: String, reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShimConfig {
    /// `auto`, `ironclad` or `qemu`.
    #[serde(deserialize_with = "hypervisor_kind")]
    pub hypervisor: HypervisorKind,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The kernel's and the initrd's sha256, checked before every boot (`make install` writes them).
    #[serde(deserialize_with = "sha256_pin")]
    pub kernel_sha256: Option<String>,
    #[serde(deserialize_with = "sha256_pin")]
    pub initrd_sha256: Option<String>,
    #[serde(deserialize_with = "vcpus")]
    pub vcpus: u8,
    #[serde(deserialize_with = "memory_mib")]
    pub memory_mib: u32,
    /// Appended to the guest kernel command line.
    pub kernel_params: String,
    /// The shim's log level: error, warn, info, debug or trace.
    #[serde(deserialize_with = "log_level")]
    pub log_level: String,
    /// Which of the `io.ironclad.*` annotations containers may set.
    pub allowed_annotations: Vec<String>,
    /// How long the guest may take from start to the agent's ready line.
    pub boot_timeout_secs: u64,
    /// Where sandboxes keep their sockets and VM files (a tmpfs, usually).
    pub run_root: PathBuf,
    pub image_cache: PathBuf,
    /// Where each sandbox's guest console log goes while it runs (capped at 1 MiB, rotated once).
    pub log_root: PathBuf,
    /// IPv4 networks the guest may not send to, dropped on the host side of its tap (the cloud
    /// metadata address by default).
    #[serde(deserialize_with = "ipv4_networks")]
    pub denied_destinations: Vec<(std::net::Ipv4Addr, u8)>,
    /// QEMU's own seccomp sandbox (`-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,
    /// resourcecontrol=deny`); off only for debugging.
    pub qemu_sandbox: bool,
    /// Every helper the shim starts (QEMU, ironclad-vmm, vhost-device-vsock, virtiofsd) runs
    /// through ironclad-jailer: the sandbox's own uid, new namespaces, a root with only what it
    /// needs, no capabilities. Off only for debugging.
    pub jail: bool,
    /// ironclad-jailer; unset: the one beside the shim, else the one on PATH.
    pub jailer: Option<PathBuf>,
    /// The uids (and equal gids) handed to sandboxes, one each while it runs: the first and how many.
    #[serde(deserialize_with = "jail_first_uid")]
    pub jail_first_uid: u32,
    #[serde(deserialize_with = "jail_uid_count")]
    pub jail_uid_count: u32,
    /// A host cgroup per sandbox holding its helpers, with a memory limit of the VM's memory plus
    /// `jail_memory_overhead_mib`. Off only for debugging (or where no cgroup can be made).
    pub jail_cgroup: bool,
    #[serde(deserialize_with = "jail_memory_overhead_mib")]
    pub jail_memory_overhead_mib: u32,
    /// A virtio-balloon through which the guest gives the host back the memory it frees (free
    /// page reporting); the balloon is never inflated. Off: freed guest memory stays resident.
    pub free_page_reporting: bool,
    /// Warm starts from ironclad-pool (`[pool]`).
    pub pool: PoolConfig,
    /// Where this configuration came from, for error messages.
    #[serde(skip)]
    pub source: PathBuf,
}

impl Default for ShimConfig {
    fn default() -> Self {
        ShimConfig {
            hypervisor: HypervisorKind::Auto,
            kernel: Path::new(DEFAULT_SHARE_DIR).join("vmlinux"),
            initrd: Path::new(DEFAULT_SHARE_DIR).join("initrd.img"),
            kernel_sha256: None,
            initrd_sha256: None,
            vcpus: 1,
            memory_mib: 256,
            kernel_params: String::new(),
            log_level: "info".into(),
            allowed_annotations: Vec::new(),
            boot_timeout_secs: 120,
            run_root: crate::paths::DEFAULT_RUN_ROOT.into(),
            image_cache: DEFAULT_IMAGE_CACHE.into(),
            log_root: DEFAULT_LOG_ROOT.into(),
            denied_destinations: vec![(METADATA_ADDRESS, 32)],
            qemu_sandbox: true,
            free_page_reporting: true,
            jail: true,
            jailer: None,
            jail_first_uid: 900_000,
            jail_uid_count: 65_536,
            jail_cgroup: true,
            jail_memory_overhead_mib: 512,
            pool: PoolConfig::default(),
            source: PathBuf::from("(defaults)"),
        }
    }
}

impl ShimConfig {
    /// Reads `path`; a missing file at the default path means the defaults, anywhere else an error.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(err)
                if err.kind() == std::io::ErrorKind::NotFound && path == Path::new(DEFAULT_CONFIG_PATH) =>
            {
                return Ok(ShimConfig::default());
            }
            Err(source) => return Err(Error::Read { path: path.to_path_buf(), source }),
        };
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, Error> {
        let mut config: ShimConfig = toml::from_str(text).map_err(|err| Error::Parse {
            path: path.to_path_buf(),
            message: err.to_string().trim().to_string(),
        })?;
        config.source = path.to_path_buf();
        Ok(config)
    }

    /// What the sandbox's annotations set (each must be allowed by the config), over the
    /// config's defaults.
    pub fn sandbox_settings(&self, annotations: &HashMap<String, String>) -> Result<SandboxSettings, Error> {
        let mut settings = SandboxSettings {
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            agent_log: None,
            free_page_reporting: self.free_page_reporting,
        };
        for (key, value) in annotations.iter().filter(|(k, _)| k.starts_with("io.ironclad.")) {
            if !self.allowed_annotations.iter().any(|allowed| allowed == key) {
                return Err(Error::AnnotationNotAllowed { key: key.clone(), config: self.source.clone() });
            }
            let bad =
                |reason: String| Error::BadAnnotation { key: key.clone(), value: value.clone(), reason };
            match key.as_str() {
                ANNOTATION_VCPUS => settings.vcpus = parse_in_range(value, &VCPU_RANGE).map_err(bad)?,
                ANNOTATION_MEMORY_MIB => {
                    settings.memory_mib = parse_in_range(value, &MEMORY_RANGE_MIB).map_err(bad)?
                }
                ANNOTATION_AGENT_LOG => settings.agent_log = Some(log_filter(value).map_err(bad)?),
                _ => return Err(bad("not an annotation ironclad knows".into())),
            }
        }
        Ok(settings)
    }
}

impl ShimConfig {
    /// What a sandbox of `settings` appends to the guest kernel's command line: the reporting
    /// order with free page reporting, the config's parameters (which may set it otherwise), then
    /// the sandbox's own.
    pub fn kernel_params_for(&self, settings: &SandboxSettings) -> String {
        let reporting = if settings.free_page_reporting { PAGE_REPORTING_ORDER_PARAM } else { "" };
        format!("{reporting} {} {}", self.kernel_params, settings.kernel_params())
    }
}

/// ironclad-pool's settings, and where shims find it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Where ironclad-pool listens and shims ask it for a VM; empty: shims never ask.
    pub socket: PathBuf,
    /// How many booted, paused VMs the pool keeps.
    #[serde(deserialize_with = "pool_size")]
    pub size: u32,
    /// The refill's CPU budget, in percent of one CPU: after a boot that took t, the next waits
    /// t * (100 / percent - 1).
    #[serde(deserialize_with = "refill_cpu_percent")]
    pub refill_cpu_percent: u32,
}

const POOL_SIZE_RANGE: std::ops::RangeInclusive<u32> = 0..=256;
const REFILL_CPU_PERCENT_RANGE: std::ops::RangeInclusive<u32> = 1..=100;

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig { socket: crate::pool::DEFAULT_SOCKET.into(), size: 2, refill_cpu_percent: 50 }
    }
}

impl PoolConfig {
    /// The socket shims ask, unless warm starts are off.
    pub fn socket(&self) -> Option<&Path> {
        (!self.socket.as_os_str().is_empty()).then_some(self.socket.as_path())
    }

    /// How long the refill rests after a boot that took `boot`.
    pub fn refill_pause(&self, boot: std::time::Duration) -> std::time::Duration {
        let percent = self.refill_cpu_percent.clamp(1, 100);
        boot * (100 - percent) / percent
    }
}

/// What a sandbox's annotations may set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxSettings {
    pub vcpus: u8,
    pub memory_mib: u32,
    /// The agent's log filter, for the guest kernel's command line (`IRONCLAD_AGENT_LOG=...`).
    pub agent_log: Option<String>,
    /// The config's `free_page_reporting`; no annotation changes it.
    pub free_page_reporting: bool,
}

impl SandboxSettings {
    /// The kernel parameters these settings add to the config's.
    pub fn kernel_params(&self) -> String {
        self.agent_log.as_ref().map(|filter| format!("IRONCLAD_AGENT_LOG={filter}")).unwrap_or_default()
    }
}

/// A tracing filter (`warn`, `info,ironclad_agent=debug`): letters, digits and `_:=,.` only, so it
/// cannot add other kernel parameters.
fn log_filter(text: &str) -> Result<String, String> {
    let ok = !text.is_empty()
        && text.len() <= MAX_AGENT_LOG_LEN
        && text.bytes().all(|b| b.is_ascii_alphanumeric() || b"_:=,.".contains(&b));
    if ok {
        Ok(text.to_string())
    } else {
        Err(format!("a log filter of at most {MAX_AGENT_LOG_LEN} letters, digits and _:=,. (like info or warn,ironclad_agent=debug)"))
    }
}

fn parse_in_range<T>(text: &str, range: &std::ops::RangeInclusive<T>) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display,
{
    let value: T = text
        .trim()
        .parse()
        .map_err(|_| format!("expected a number from {} to {}", range.start(), range.end()))?;
    within(value, range)
}

/// The value if the range holds it, else the range's words.
fn within<T: PartialOrd + std::fmt::Display>(
    value: T,
    range: &std::ops::RangeInclusive<T>,
) -> Result<T, String> {
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(format!("must be from {} to {}", range.start(), range.end()))
    }
}

fn in_range<'de, D, T>(deserializer: D, range: &std::ops::RangeInclusive<T>) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + PartialOrd + std::fmt::Display,
{
    let value = T::deserialize(deserializer)?;
    let shown = value.to_string();
    within(value, range)
        .map_err(|reason| serde::de::Error::custom(format!("{shown} is out of range: {reason}")))
}

fn vcpus<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u8, D::Error> {
    in_range(deserializer, &VCPU_RANGE)
}

fn memory_mib<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    in_range(deserializer, &MEMORY_RANGE_MIB)
}

fn jail_first_uid<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    in_range(deserializer, &JAIL_FIRST_UID_RANGE)
}

fn jail_uid_count<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    in_range(deserializer, &JAIL_UID_COUNT_RANGE)
}

fn jail_memory_overhead_mib<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    in_range(deserializer, &JAIL_OVERHEAD_RANGE_MIB)
}

fn pool_size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    in_range(deserializer, &POOL_SIZE_RANGE)
}

fn refill_cpu_percent<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    in_range(deserializer, &REFILL_CPU_PERCENT_RANGE)
}

fn hypervisor_kind<'de, D: Deserializer<'de>>(deserializer: D) -> Result<HypervisorKind, D::Error> {
    String::deserialize(deserializer)?.parse().map_err(serde::de::Error::custom)
}

fn log_level<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let level = String::deserialize(deserializer)?;
    match level.as_str() {
        "error" | "warn" | "info" | "debug" | "trace" => Ok(level),
        other => Err(serde::de::Error::custom(format!(
            "unknown log level {other:?}: expected error, warn, info, debug or trace"
        ))),
    }
}

/// A sha256 in hex, as `sha256sum` prints it.
fn sha256_pin<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    let digest = String::deserialize(deserializer)?;
    if crate::resources::pinned::is_sha256(&digest) {
        Ok(Some(digest.to_ascii_lowercase()))
    } else {
        Err(serde::de::Error::custom(format!("{digest:?} is not a sha256 (64 hex digits)")))
    }
}

/// "169.254.169.254/32" or "10.0.0.0/8" (a bare address is /32).
fn ipv4_networks<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<(std::net::Ipv4Addr, u8)>, D::Error> {
    Vec::<String>::deserialize(deserializer)?
        .iter()
        .map(|text| {
            let (ip, prefix) = text.split_once('/').unwrap_or((text, "32"));
            let ip = ip.parse::<std::net::Ipv4Addr>();
            let prefix = prefix.parse::<u8>().ok().filter(|p| *p <= 32);
            match (ip, prefix) {
                (Ok(ip), Some(prefix)) => Ok((ip, prefix)),
                _ => Err(serde::de::Error::custom(format!(
                    "{text:?} is not an IPv4 address or network (169.254.169.254/32)"
                ))),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ShimConfig, Error> {
        ShimConfig::parse(text, Path::new("/etc/ironclad/config.toml"))
    }

    #[test]
    fn an_empty_file_means_the_defaults() {
        let config = parse("").unwrap();
        assert_eq!(config.vcpus, 1);
        assert_eq!(config.hypervisor, HypervisorKind::Auto);
        assert_eq!(config.kernel, Path::new("/usr/local/share/ironclad/vmlinux"));
    }

    #[test]
    fn keys_are_read() {
        let config =
            parse("hypervisor = \"qemu\"\nvcpus = 2\nmemory_mib = 512\nkernel_params = \"quiet\"\n").unwrap();
        assert_eq!((config.hypervisor, config.vcpus, config.memory_mib), (HypervisorKind::Qemu, 2, 512));
        assert_eq!(config.kernel_params, "quiet");
    }

    #[test]
    fn errors_name_the_key_and_the_line() {
        for (text, key, line) in [
            ("vcpus = 1\nmemory_mib = 1\n", "memory_mib", "line 2"),
            ("\n\nhypervisor = \"firecracker\"\n", "hypervisor", "line 3"),
            ("vcpus = 1\nvcpu = 2\n", "vcpu", "line 2"),
            ("log_level = \"loud\"\n", "log_level", "line 1"),
            ("vcpus = \"two\"\n", "vcpus", "line 1"),
        ] {
            let message = parse(text).unwrap_err().to_string();
            assert!(message.contains(key) && message.contains(line), "{text:?}: {message}");
        }
    }

    #[test]
    fn annotations_size_the_vm_only_when_allowed() {
        let annotations: HashMap<String, String> =
            [(ANNOTATION_VCPUS.to_string(), "2".to_string()), ("other".to_string(), "x".to_string())].into();
        let refused = ShimConfig::default().sandbox_settings(&annotations).unwrap_err();
        assert!(refused.to_string().contains(ANNOTATION_VCPUS), "{refused}");
        let config = ShimConfig { allowed_annotations: vec![ANNOTATION_VCPUS.into()], ..Default::default() };
        let settings = config.sandbox_settings(&annotations).unwrap();
        assert_eq!((settings.vcpus, settings.memory_mib), (2, 256));
        let too_many: HashMap<String, String> = [(ANNOTATION_VCPUS.to_string(), "99".to_string())].into();
        assert!(config.sandbox_settings(&too_many).unwrap_err().to_string().contains("from 1 to 32"));
    }

    #[test]
    fn the_installed_config_file_says_what_the_defaults_are() {
        let text = include_str!("../config.toml");
        let config = parse(text).unwrap();
        assert_eq!(config, ShimConfig { source: config.source.clone(), ..ShimConfig::default() });
    }

    #[test]
    fn free_page_reporting_sets_its_order_before_the_configs_parameters() {
        let config = ShimConfig {
            kernel_params: "page_reporting.page_reporting_order=9".into(),
            ..Default::default()
        };
        let settings = config.sandbox_settings(&HashMap::new()).unwrap();
        assert!(settings.free_page_reporting, "on by default");
        let params = config.kernel_params_for(&settings);
        assert_eq!(
            params.split_whitespace().collect::<Vec<_>>(),
            [PAGE_REPORTING_ORDER_PARAM, &config.kernel_params]
        );
        let off = ShimConfig { free_page_reporting: false, ..config.clone() };
        let params = off.kernel_params_for(&off.sandbox_settings(&HashMap::new()).unwrap());
        assert!(!params.contains(PAGE_REPORTING_ORDER_PARAM), "{params}");
    }

    #[test]
    fn the_agent_log_level_is_set_per_sandbox_by_an_allowed_annotation() {
        let config =
            ShimConfig { allowed_annotations: vec![ANNOTATION_AGENT_LOG.into()], ..Default::default() };
        let asked: HashMap<String, String> =
            [(ANNOTATION_AGENT_LOG.to_string(), "info,ironclad_agent=debug".to_string())].into();
        let settings = config.sandbox_settings(&asked).unwrap();
        assert_eq!(settings.kernel_params(), "IRONCLAD_AGENT_LOG=info,ironclad_agent=debug");
        assert_eq!(config.sandbox_settings(&HashMap::new()).unwrap().kernel_params(), "");
        for bad in ["", "debug init=/bin/sh", "debug\nx", &"d".repeat(129)] {
            let asked: HashMap<String, String> = [(ANNOTATION_AGENT_LOG.to_string(), bad.to_string())].into();
            let err = config.sandbox_settings(&asked).unwrap_err();
            assert!(matches!(err, Error::BadAnnotation { .. }), "{bad:?}: {err}");
        }
        let not_allowed = ShimConfig::default().sandbox_settings(&asked).unwrap_err();
        assert!(matches!(not_allowed, Error::AnnotationNotAllowed { .. }));
    }

    #[test]
    fn denied_destinations_are_ipv4_networks_and_may_be_none() {
        assert_eq!(ShimConfig::default().denied_destinations, vec![(METADATA_ADDRESS, 32)]);
        let config = parse("denied_destinations = [\"10.0.0.0/8\", \"192.0.2.1\"]").unwrap();
        assert_eq!(
            config.denied_destinations,
            vec![("10.0.0.0".parse().unwrap(), 8), ("192.0.2.1".parse().unwrap(), 32)]
        );
        assert!(parse("denied_destinations = []").unwrap().denied_destinations.is_empty());
        for bad in ["\"fd00::1\"", "\"10.0.0.0/33\"", "\"metadata\""] {
            let err = parse(&format!("denied_destinations = [{bad}]")).unwrap_err().to_string();
            assert!(err.contains("denied_destinations") && err.contains("IPv4"), "{err}");
        }
    }

    #[test]
    fn the_jail_is_on_by_default_and_its_numbers_are_checked() {
        let config = ShimConfig::default();
        assert!(config.jail && config.jail_cgroup);
        let config = parse("[pool]\nsize = 3\nrefill_cpu_percent = 25\nsocket = \"\"\n").unwrap();
        assert_eq!((config.pool.size, config.pool.socket(), config.pool.refill_cpu_percent), (3, None, 25));
        assert_eq!(
            config.pool.refill_pause(std::time::Duration::from_secs(1)),
            std::time::Duration::from_secs(3)
        );
        assert!(parse("[pool]\nrefill_cpu_percent = 0\n").is_err());
        assert!(parse("[pool]\nsize = 100000\n").is_err());
        assert!(parse("[pool]\nwarm = true\n").is_err());
        assert_eq!(ShimConfig::default().pool.socket(), Some(Path::new(crate::pool::DEFAULT_SOCKET)));
        let config = parse("jail = false\njail_first_uid = 100000\njail_uid_count = 10\n").unwrap();
        assert_eq!((config.jail, config.jail_first_uid, config.jail_uid_count), (false, 100_000, 10));
        for (text, key) in [
            ("jail_first_uid = 0", "jail_first_uid"),
            ("jail_uid_count = 0", "jail_uid_count"),
            ("jail_memory_overhead_mib = 1", "jail_memory_overhead_mib"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains("out of range"), "{err}");
        }
    }

    #[test]
    fn a_missing_file_is_an_error_unless_it_is_the_default_one() {
        assert!(matches!(ShimConfig::load(Path::new("/nonexistent/ironclad.toml")), Err(Error::Read { .. })));
    }
}
