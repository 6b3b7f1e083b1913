//! The VM description: what to boot, with how much, and which devices. Read from JSON (or built from
//! flags) and validated as a whole before any KVM call, so a bad request fails with the field named
//! and leaves nothing behind.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Linux/x86's COMMAND_LINE_SIZE, terminating NUL included.
pub const MAX_CMDLINE_LEN: usize = 2048;
pub const MAX_VCPUS: u8 = 32;
pub const MIN_MEMORY_MIB: u32 = 16;
pub const MAX_MEMORY_MIB: u32 = 256 * 1024;
/// virtio-blk's GET_ID answer is at most 20 bytes.
pub const MAX_BLOCK_SERIAL_LEN: usize = 20;
/// IFNAMSIZ less the terminating NUL.
pub const MAX_TAP_NAME_LEN: usize = 15;
/// sun_path is 108 bytes; guest-initiated connections use `<uds_path>_<port>`, up to 11 more.
pub const MAX_VSOCK_UDS_PATH_LEN: usize = 108 - 1 - 11;
/// The virtio-fs tag lives in a 36-byte config field.
pub const MAX_FS_TAG_LEN: usize = 36;
/// sun_path is 108 bytes, its terminating NUL included.
pub const MAX_SOCKET_PATH_LEN: usize = 107;
/// CIDs 0-2 are the hypervisor, loopback and host; u32::MAX is VMADDR_CID_ANY.
pub const MIN_GUEST_CID: u64 = 3;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the configuration file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the configuration is not valid JSON for a VM description")]
    Parse(#[source] serde_json::Error),
    #[error("invalid configuration: {field}: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::Invalid { field: field.into(), reason: reason.into() }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u32,
    /// An ELF vmlinux or a bzImage.
    pub kernel: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    #[serde(default)]
    pub block: Vec<BlockConfig>,
    #[serde(default)]
    pub net: Vec<NetConfig>,
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// Shared directories: virtio-fs devices whose backend is a vhost-user daemon (virtiofsd).
    /// With one, guest memory is a memfd the daemon maps too.
    #[serde(default)]
    pub fs: Vec<FsConfig>,
    /// A virtio-balloon whose only use is free page reporting: memory the guest frees goes back
    /// to the host.
    #[serde(default)]
    pub free_page_reporting: bool,
    #[serde(default)]
    pub serial: SerialOutput,
    /// Where to write the device counters (JSON) when the VM stops.
    #[serde(default)]
    pub metrics: Option<PathBuf>,
    /// Log guest writes of 123 to port 0x3f0 with a timestamp (Firecracker's boot timer).
    #[serde(default)]
    pub boot_timer: bool,
    /// Seccomp filters on every thread; turning them off is for debugging only.
    #[serde(default = "default_seccomp")]
    pub seccomp: bool,
}

fn default_seccomp() -> bool {
    true
}

fn default_vcpus() -> u8 {
    1
}

fn default_memory_mib() -> u32 {
    128
}

fn default_cmdline() -> String {
    "console=ttyS0 reboot=k panic=-1 no_timer_check".to_string()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockConfig {
    /// A raw disk image.
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// What GET_ID answers: the guest finds the disk by it in /sys/block/vdX/serial.
    pub serial: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    pub tap: String,
    /// `aa:bb:cc:dd:ee:ff`, unicast.
    pub mac: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    pub guest_cid: u64,
    /// The hybrid vsock socket host clients connect to.
    pub uds_path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// The vhost-user socket virtiofsd listens on.
    pub socket: PathBuf,
    /// The name the guest mounts it by (`mount -t virtiofs TAG DIR`).
    pub tag: String,
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SerialOutput {
    #[default]
    Stdout,
    None,
    File(PathBuf),
}

impl VmConfig {
    /// Reads and validates a JSON description.
    pub fn from_json_file(path: &Path) -> Result<Self, Error> {
        let text =
            std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.into(), source })?;
        Self::from_json(&text)
    }

    pub fn from_json(text: &str) -> Result<Self, Error> {
        let config: VmConfig = serde_json::from_str(text).map_err(Error::Parse)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every field; the first problem found is returned with the field's name.
    pub fn validate(&self) -> Result<(), Error> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(invalid("vcpus", format!("{} is outside 1..={MAX_VCPUS}", self.vcpus)));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(invalid(
                "memory_mib",
                format!("{} is outside {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB}", self.memory_mib),
            ));
        }
        require_file("kernel", &self.kernel)?;
        if let Some(initrd) = &self.initrd {
            require_file("initrd", initrd)?;
        }
        if self.cmdline.len() >= MAX_CMDLINE_LEN {
            return Err(invalid(
                "cmdline",
                format!("{} bytes, the limit is {}", self.cmdline.len(), MAX_CMDLINE_LEN - 1),
            ));
        }
        if self.cmdline.bytes().any(|b| b == 0 || !b.is_ascii()) {
            return Err(invalid("cmdline", "must be printable ASCII without NUL"));
        }
        self.validate_block()?;
        self.validate_net()?;
        self.validate_fs()?;
        if let Some(vsock) = &self.vsock {
            validate_vsock(vsock)?;
        }
        if let SerialOutput::File(path) = &self.serial {
            require_parent_dir("serial.file", path)?;
        }
        if let Some(path) = &self.metrics {
            require_parent_dir("metrics", path)?;
        }
        Ok(())
    }

    fn validate_block(&self) -> Result<(), Error> {
        let mut serials = HashSet::new();
        for (i, block) in self.block.iter().enumerate() {
            require_file(&format!("block[{i}].path"), &block.path)?;
            let field = format!("block[{i}].serial");
            if block.serial.is_empty() || block.serial.len() > MAX_BLOCK_SERIAL_LEN {
                return Err(invalid(field, format!("must be 1 to {MAX_BLOCK_SERIAL_LEN} bytes")));
            }
            if !block.serial.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(invalid(field, "must be printable ASCII without spaces"));
            }
            if !serials.insert(&block.serial) {
                return Err(invalid(field, format!("{:?} is used by another disk", block.serial)));
            }
        }
        Ok(())
    }

    fn validate_net(&self) -> Result<(), Error> {
        let mut macs = HashSet::new();
        let mut taps = HashSet::new();
        for (i, net) in self.net.iter().enumerate() {
            let tap_field = format!("net[{i}].tap");
            if net.tap.is_empty() || net.tap.len() > MAX_TAP_NAME_LEN {
                return Err(invalid(tap_field, format!("must be 1 to {MAX_TAP_NAME_LEN} bytes")));
            }
            if net.tap.contains('/') || net.tap.bytes().any(|b| !b.is_ascii_graphic()) {
                return Err(invalid(tap_field, "is not a valid interface name"));
            }
            if !taps.insert(&net.tap) {
                return Err(invalid(tap_field, format!("{:?} is used by another device", net.tap)));
            }
            let mac = parse_mac(&net.mac).map_err(|reason| invalid(format!("net[{i}].mac"), reason))?;
            if !macs.insert(mac) {
                return Err(invalid(
                    format!("net[{i}].mac"),
                    format!("{} is used by another device", net.mac),
                ));
            }
        }
        Ok(())
    }
}

impl VmConfig {
    fn validate_fs(&self) -> Result<(), Error> {
        let mut tags = HashSet::new();
        for (i, fs) in self.fs.iter().enumerate() {
            let tag_field = format!("fs[{i}].tag");
            if fs.tag.is_empty() || fs.tag.len() > MAX_FS_TAG_LEN {
                return Err(invalid(tag_field, format!("must be 1 to {MAX_FS_TAG_LEN} bytes")));
            }
            if !fs.tag.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(invalid(tag_field, "must be printable ASCII without spaces"));
            }
            if !tags.insert(&fs.tag) {
                return Err(invalid(tag_field, format!("{:?} is used by another device", fs.tag)));
            }
            let len = fs.socket.as_os_str().len();
            if len == 0 || len > MAX_SOCKET_PATH_LEN {
                return Err(invalid(
                    format!("fs[{i}].socket"),
                    format!("must be 1 to {MAX_SOCKET_PATH_LEN} bytes"),
                ));
            }
        }
        Ok(())
    }
}

fn validate_vsock(vsock: &VsockConfig) -> Result<(), Error> {
    if vsock.guest_cid < MIN_GUEST_CID || vsock.guest_cid >= u64::from(u32::MAX) {
        return Err(invalid("vsock.guest_cid", format!("{} is outside 3..{}", vsock.guest_cid, u32::MAX)));
    }
    let len = vsock.uds_path.as_os_str().len();
    if len == 0 || len > MAX_VSOCK_UDS_PATH_LEN {
        return Err(invalid("vsock.uds_path", format!("must be 1 to {MAX_VSOCK_UDS_PATH_LEN} bytes")));
    }
    require_parent_dir("vsock.uds_path", &vsock.uds_path)
}

fn require_file(field: &str, path: &Path) -> Result<(), Error> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(invalid(field, format!("{} is not a regular file", path.display()))),
        Err(err) => Err(invalid(field, format!("{}: {err}", path.display()))),
    }
}

fn require_parent_dir(field: &str, path: &Path) -> Result<(), Error> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if parent.is_dir() {
        Ok(())
    } else {
        Err(invalid(field, format!("directory {} does not exist", parent.display())))
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`; multicast addresses cannot be a NIC's own.
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in mac.iter_mut() {
        let part = parts.next().ok_or_else(|| format!("{text:?} has fewer than 6 bytes"))?;
        if part.len() != 2 {
            return Err(format!("{text:?} is not of the form aa:bb:cc:dd:ee:ff"));
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| format!("{text:?} has a non-hex byte {part:?}"))?;
    }
    if parts.next().is_some() {
        return Err(format!("{text:?} has more than 6 bytes"));
    }
    if mac[0] & 1 == 1 {
        return Err(format!("{text:?} is a multicast address"));
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            for name in ["vmlinux", "initrd", "disk.img", "disk2.img"] {
                std::fs::write(dir.path().join(name), b"x").unwrap();
            }
            Files { dir }
        }

        fn path(&self, name: &str) -> String {
            self.dir.path().join(name).display().to_string()
        }

        fn json(&self, extra: &str) -> String {
            format!(r#"{{{extra} "kernel": "{}"}}"#, self.path("vmlinux"))
        }
    }

    fn field_of(err: Error) -> String {
        match err {
            Error::Invalid { field, .. } => field,
            other => panic!("expected an invalid field, got {other}"),
        }
    }

    #[test]
    fn a_full_description_parses_with_defaults_filled_in() {
        let files = Files::new();
        let config = VmConfig::from_json(&format!(
            r#"{{"vcpus": 2, "memory_mib": 256, "kernel": "{}", "initrd": "{}",
                "block": [{{"path": "{}", "read_only": true, "serial": "rootfs"}}],
                "net": [{{"tap": "tap0", "mac": "02:00:00:00:00:01"}}],
                "vsock": {{"guest_cid": 3, "uds_path": "{}"}},
                "serial": {{"file": "{}"}}}}"#,
            files.path("vmlinux"),
            files.path("initrd"),
            files.path("disk.img"),
            files.path("v.sock"),
            files.path("console.log"),
        ))
        .unwrap();
        assert_eq!(config.vcpus, 2);
        assert_eq!(config.cmdline, "console=ttyS0 reboot=k panic=-1 no_timer_check");
        assert!(config.block[0].read_only);
        assert_eq!(config.serial, SerialOutput::File(files.path("console.log").into()));
        let minimal = VmConfig::from_json(&files.json("")).unwrap();
        assert_eq!((minimal.memory_mib, minimal.serial), (128, SerialOutput::Stdout));
    }

    #[test]
    fn each_bad_field_is_named() {
        let files = Files::new();
        let cases = [
            (r#""vcpus": 0,"#.to_string(), "vcpus"),
            (r#""memory_mib": 8,"#.to_string(), "memory_mib"),
            (r#""initrd": "/nonexistent/initrd","#.to_string(), "initrd"),
            (format!(r#""cmdline": "{}","#, "a".repeat(MAX_CMDLINE_LEN)), "cmdline"),
            (r#""block": [{"path": "/nonexistent", "serial": "a"}],"#.to_string(), "block[0].path"),
            (
                format!(
                    r#""block": [{{"path": "{}", "serial": "{}"}}],"#,
                    files.path("disk.img"),
                    "s".repeat(21)
                ),
                "block[0].serial",
            ),
            (
                format!(
                    r#""block": [{{"path": "{}", "serial": "a"}}, {{"path": "{}", "serial": "a"}}],"#,
                    files.path("disk.img"),
                    files.path("disk2.img")
                ),
                "block[1].serial",
            ),
            (
                r#""net": [{"tap": "a-very-long-tap-name", "mac": "02:00:00:00:00:01"}],"#.to_string(),
                "net[0].tap",
            ),
            (r#""net": [{"tap": "tap0", "mac": "01:00:00:00:00:01"}],"#.to_string(), "net[0].mac"),
            (r#""net": [{"tap": "tap0", "mac": "02:00:00:00:01"}],"#.to_string(), "net[0].mac"),
            (r#""vsock": {"guest_cid": 2, "uds_path": "/tmp/v.sock"},"#.to_string(), "vsock.guest_cid"),
            (
                r#""vsock": {"guest_cid": 3, "uds_path": "/nonexistent/v.sock"},"#.to_string(),
                "vsock.uds_path",
            ),
            (r#""serial": {"file": "/nonexistent/dir/log"},"#.to_string(), "serial.file"),
            (r#""fs": [{"socket": "/run/fs.sock", "tag": ""}],"#.to_string(), "fs[0].tag"),
            (format!(r#""fs": [{{"socket": "/run/fs.sock", "tag": "{}"}}],"#, "t".repeat(37)), "fs[0].tag"),
            (r#""fs": [{"socket": "/run/fs.sock", "tag": "a b"}],"#.to_string(), "fs[0].tag"),
            (
                r#""fs": [{"socket": "/a.sock", "tag": "x"}, {"socket": "/b.sock", "tag": "x"}],"#
                    .to_string(),
                "fs[1].tag",
            ),
            (format!(r#""fs": [{{"socket": "/{}", "tag": "x"}}],"#, "s".repeat(120)), "fs[0].socket"),
        ];
        for (extra, field) in cases {
            let err = VmConfig::from_json(&files.json(&extra)).unwrap_err();
            assert_eq!(field_of(err), field, "for {extra}");
        }
        let missing_kernel = VmConfig::from_json(r#"{"kernel": "/nonexistent/vmlinux"}"#).unwrap_err();
        assert!(missing_kernel.to_string().contains("kernel: /nonexistent/vmlinux"), "{missing_kernel}");
    }

    #[test]
    fn unknown_fields_and_bad_json_are_rejected() {
        let files = Files::new();
        let err = VmConfig::from_json(&files.json(r#""vcpu_count": 2,"#)).unwrap_err();
        assert!(matches!(&err, Error::Parse(e) if e.to_string().contains("vcpu_count")), "{err}");
        assert!(matches!(VmConfig::from_json("{"), Err(Error::Parse(_))));
    }

    #[test]
    fn mac_addresses_parse_strictly() {
        assert_eq!(parse_mac("02:aB:00:ff:10:01"), Ok([2, 0xab, 0, 0xff, 0x10, 1]));
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:00:00",
            "02:00:00:00:00:zz",
            "2:0:0:0:0:1",
            "ff:ff:ff:ff:ff:ff",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }
}
