//! What the helper may do once inside: its own host name, resource limits, the sandbox's uid and
//! gid with no supplementary groups, no capabilities beyond those kept (root only), and
//! no_new_privs, so that nothing it executes regains any.

use caps::{CapSet, Capability, CapsHashSet};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};

use crate::spec::JailSpec;

/// The jail's UTS name: the host's name is none of the helper's business.
pub const HOSTNAME: &str = "ironclad-jail";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot set the host name")]
    Hostname(#[source] nix::Error),
    #[error("cannot set the limit {resource}")]
    Limit {
        resource: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("cannot {action} capabilities")]
    Capabilities {
        action: &'static str,
        #[source]
        source: caps::errors::CapsError,
    },
    #[error("cannot become uid {uid}, gid {gid}")]
    Identity {
        uid: u32,
        gid: u32,
        #[source]
        source: nix::Error,
    },
    #[error("uid {uid} still holds capabilities {held:?} after the switch")]
    CapabilitiesLeft { uid: u32, held: Vec<Capability> },
    #[error("cannot set no_new_privs")]
    NoNewPrivs(#[source] nix::Error),
}

/// The host name and the resource limits: set while the jailer is still the host's root (the UTS
/// namespace belongs to the host's user namespace).
pub fn set_host_name_and_limits(spec: &JailSpec) -> Result<(), Error> {
    nix::unistd::sethostname(HOSTNAME).map_err(Error::Hostname)?;
    set_limits(spec)
}

/// Drops the rest of what the helper must not have; the current process then only executes it.
pub fn drop_all(spec: &JailSpec) -> Result<(), Error> {
    let kept: CapsHashSet = spec.keep_caps.iter().copied().collect();
    shrink_bounding_set(&kept)?;
    become_sandbox_identity(spec, &kept)?;
    nix::sys::prctl::set_no_new_privs().map_err(Error::NoNewPrivs)
}

/// Each limit at most the jailer's own hard one, which raising would need CAP_SYS_RESOURCE for
/// (not every host grants it, even to root).
fn set_limits(spec: &JailSpec) -> Result<(), Error> {
    let limit = |resource: &'static str, which, value: u64| {
        let (_, hard) = getrlimit(which).map_err(|source| Error::Limit { resource, source })?;
        let value = value.min(hard);
        setrlimit(which, value, value).map_err(|source| Error::Limit { resource, source })
    };
    limit("RLIMIT_NOFILE", Resource::RLIMIT_NOFILE, spec.limits.nofile)?;
    limit("RLIMIT_CORE", Resource::RLIMIT_CORE, 0)?;
    // Counted per real uid across the host: for root that would be every root process.
    if spec.uid != 0 {
        limit("RLIMIT_NPROC", Resource::RLIMIT_NPROC, spec.limits.nproc)?;
    }
    Ok(())
}

/// Every capability not kept leaves the bounding set, so no execution can gain it again.
fn shrink_bounding_set(kept: &CapsHashSet) -> Result<(), Error> {
    let err = |source| Error::Capabilities { action: "drop bounding", source };
    for cap in caps::all().difference(kept) {
        if caps::has_cap(None, CapSet::Bounding, *cap).map_err(err)? {
            caps::drop(None, CapSet::Bounding, *cap).map_err(err)?;
        }
    }
    Ok(())
}

/// Switches to the sandbox's ids: as they are seen where the helper runs, so 0 in a user
/// namespace of its own (the sandbox's ids on the host). A switch away from root clears the
/// permitted and effective sets (no keep-caps); the inheritable and ambient sets are cleared here
/// either way.
fn become_sandbox_identity(spec: &JailSpec, kept: &CapsHashSet) -> Result<(), Error> {
    let (inside_uid, inside_gid) = if spec.user_namespace { (0, 0) } else { (spec.uid, spec.gid) };
    let (uid, gid) = (Uid::from_raw(inside_uid), Gid::from_raw(inside_gid));
    let identity = |source| Error::Identity { uid: spec.uid, gid: spec.gid, source };
    let caps_err = |action| move |source| Error::Capabilities { action, source };
    caps::clear(None, CapSet::Ambient).map_err(caps_err("clear ambient"))?;
    caps::clear(None, CapSet::Inheritable).map_err(caps_err("clear inheritable"))?;
    setgroups(&[gid]).map_err(identity)?;
    setresgid(gid, gid, gid).map_err(identity)?;
    if inside_uid == 0 {
        // In its user namespace the jailer is the host root's stand-in until here.
        setresuid(uid, uid, uid).map_err(identity)?;
        caps::set(None, CapSet::Effective, kept).map_err(caps_err("set effective"))?;
        return caps::set(None, CapSet::Permitted, kept).map_err(caps_err("set permitted"));
    }
    setresuid(uid, uid, uid).map_err(identity)?;
    let held = caps::read(None, CapSet::Permitted).map_err(caps_err("read permitted"))?;
    if held.is_empty() {
        Ok(())
    } else {
        Err(Error::CapabilitiesLeft { uid: spec.uid, held: held.into_iter().collect() })
    }
}
