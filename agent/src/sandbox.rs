//! Sandbox-wide settings of the guest: hostname, DNS, wall clock. They change the whole machine
//! the agent runs on, so the agent only applies them as PID 1 of a guest, never on a host.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use nix::time::{clock_settime, ClockId};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the agent is not PID 1 of a guest: refusing to change this machine's {0}")]
    NotInGuest(&'static str),
    #[error("hostname {0:?} is not a valid host name")]
    BadHostname(String),
    #[error("{0:?} is not an IP address of a name server")]
    BadDnsServer(String),
    #[error("search domain {0:?} is not a valid domain name")]
    BadSearchDomain(String),
    #[error("time {sec}.{usec:06} is out of range")]
    BadTime { sec: i64, usec: i64 },
    #[error("cannot {what}")]
    System {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Letters, digits, '-' and '.', at most 253 bytes, labels of 1 to 63: what resolvers accept.
fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
        })
}

/// The resolv.conf for the servers and search domains, refusing anything that could inject lines.
pub fn resolv_conf(servers: &[String], search: &[String]) -> Result<String, Error> {
    let mut text = String::new();
    for server in servers {
        let address: IpAddr = server.parse().map_err(|_| Error::BadDnsServer(server.clone()))?;
        text.push_str(&format!("nameserver {address}\n"));
    }
    if !search.is_empty() {
        if let Some(bad) = search.iter().find(|d| !is_host_name(d)) {
            return Err(Error::BadSearchDomain(bad.clone()));
        }
        text.push_str(&format!("search {}\n", search.join(" ")));
    }
    Ok(text)
}

/// Applies the hostname and writes `<shared>/sandbox/resolv.conf`; returns its path.
pub fn create(
    in_guest: bool,
    shared: &Path,
    hostname: &str,
    servers: &[String],
    search: &[String],
) -> Result<PathBuf, Error> {
    if !hostname.is_empty() && !is_host_name(hostname) {
        return Err(Error::BadHostname(hostname.into()));
    }
    let resolv = resolv_conf(servers, search)?;
    if !in_guest {
        return Err(Error::NotInGuest("hostname and DNS"));
    }
    if !hostname.is_empty() {
        nix::unistd::sethostname(hostname)
            .map_err(|e| Error::System { what: "set the hostname", source: e.into() })?;
    }
    let dir = shared.join("sandbox");
    let io = |what| move |source| Error::System { what, source };
    std::fs::create_dir_all(&dir).map_err(io("create the sandbox directory"))?;
    let path = dir.join("resolv.conf");
    let temporary = dir.join(".resolv.conf.tmp");
    std::fs::write(&temporary, resolv).map_err(io("write resolv.conf"))?;
    std::fs::rename(&temporary, &path).map_err(io("write resolv.conf"))?;
    Ok(path)
}

pub fn set_date_time(in_guest: bool, sec: i64, usec: i64) -> Result<(), Error> {
    if sec < 0 || !(0..1_000_000).contains(&usec) {
        return Err(Error::BadTime { sec, usec });
    }
    if !in_guest {
        return Err(Error::NotInGuest("clock"));
    }
    let time = nix::sys::time::TimeSpec::new(sec, usec * 1000);
    clock_settime(ClockId::CLOCK_REALTIME, time)
        .map_err(|e| Error::System { what: "set the clock", source: e.into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_lists_servers_and_search_domains() {
        let text =
            resolv_conf(&["10.0.0.53".into(), "fd00::53".into()], &["svc.local".into(), "local".into()])
                .unwrap();
        assert_eq!(text, "nameserver 10.0.0.53\nnameserver fd00::53\nsearch svc.local local\n");
    }

    #[test]
    fn nothing_can_inject_lines_into_resolv_conf() {
        assert!(matches!(resolv_conf(&["10.0.0.1\noptions x".into()], &[]), Err(Error::BadDnsServer(_))));
        assert!(matches!(resolv_conf(&[], &["a b".into()]), Err(Error::BadSearchDomain(_))));
        assert!(matches!(
            resolv_conf(&[], &["x\nnameserver 1.2.3.4".into()]),
            Err(Error::BadSearchDomain(_))
        ));
    }

    #[test]
    fn host_names_follow_the_rules() {
        for good in ["pod1", "a-b.example", "x"] {
            assert!(is_host_name(good), "{good}");
        }
        for bad in ["", "-x", "a..b", "a_b", &"a".repeat(64), "a b"] {
            assert!(!is_host_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn outside_a_guest_nothing_is_changed() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(create(false, dir.path(), "pod1", &[], &[]), Err(Error::NotInGuest(_))));
        assert!(!dir.path().join("sandbox").exists());
        assert!(matches!(set_date_time(false, 1_900_000_000, 0), Err(Error::NotInGuest(_))));
        assert!(matches!(set_date_time(true, -1, 0), Err(Error::BadTime { .. })));
        assert!(matches!(set_date_time(true, 0, 1_000_000), Err(Error::BadTime { .. })));
    }
}
