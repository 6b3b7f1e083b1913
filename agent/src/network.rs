//! Guest networking through rtnetlink: interface addresses, MTU, MAC and state; routes; permanent
//! ARP entries. The host side (the shim) decides them; the agent applies them as told.

use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::neighbour::NeighbourState;
use rtnetlink::Handle;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("refusing to change {0}: this agent shares the host's network namespace")]
    NotIsolated(&'static str),
    #[error("{field} {value:?} is not {expected}")]
    Invalid { field: &'static str, value: String, expected: &'static str },
    #[error("no network interface {0:?}")]
    NoSuchInterface(String),
    #[error("cannot open a netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("netlink refused to {action}")]
    Netlink {
        action: String,
        #[source]
        source: Box<rtnetlink::Error>,
    },
}

/// What UpdateInterface asks for, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceSpec {
    pub name: String,
    pub addresses: Vec<(IpAddr, u8)>,
    pub mtu: Option<u32>,
    pub hw_addr: Option<[u8; 6]>,
    pub up: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    /// None for the default route.
    pub destination: Option<(IpAddr, u8)>,
    pub gateway: Option<IpAddr>,
    pub device: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighborSpec {
    pub ip: IpAddr,
    pub hw_addr: [u8; 6],
    pub device: String,
}

pub fn parse_ip(field: &'static str, text: &str) -> Result<IpAddr, Error> {
    text.parse().map_err(|_| Error::Invalid { field, value: text.into(), expected: "an IP address" })
}

pub fn parse_prefix(field: &'static str, ip: &IpAddr, prefix: u32) -> Result<u8, Error> {
    let max = if ip.is_ipv4() { 32 } else { 128 };
    u8::try_from(prefix).ok().filter(|p| u32::from(*p) <= max).ok_or(Error::Invalid {
        field,
        value: prefix.to_string(),
        expected: "a prefix length that fits the address",
    })
}

pub fn parse_cidr(field: &'static str, text: &str) -> Result<(IpAddr, u8), Error> {
    let invalid =
        || Error::Invalid { field, value: text.into(), expected: "a network in CIDR form (10.0.0.0/24)" };
    let (ip, prefix) = text.split_once('/').ok_or_else(invalid)?;
    let ip = parse_ip(field, ip)?;
    let prefix = prefix.parse::<u32>().map_err(|_| invalid())?;
    Ok((ip, parse_prefix(field, &ip, prefix)?))
}

pub fn parse_mac(field: &'static str, text: &str) -> Result<[u8; 6], Error> {
    let invalid =
        || Error::Invalid { field, value: text.into(), expected: "a MAC address (02:00:00:00:00:01)" };
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).map_err(|_| invalid()))
        .collect::<Result<_, _>>()?;
    bytes.try_into().map_err(|_| invalid())
}

/// Network changes are allowed in the guest, and on a host only when the agent was told it runs
/// in a network namespace of its own (as its tests run it), never in the host's.
pub fn check_allowed(allowed: bool, what: &'static str) -> Result<(), Error> {
    if allowed {
        Ok(())
    } else {
        Err(Error::NotIsolated(what))
    }
}

/// Whether this process is visibly in PID 1's network namespace. PID 1's namespace is often not
/// readable from another namespace; then the `--own-network-namespace` flag is taken at its word.
pub fn shares_init_network_namespace() -> bool {
    let namespace = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/net")).ok();
    matches!((namespace("self"), namespace("1")), (Some(own), Some(init)) if own == init)
}

fn connect() -> Result<Handle, Error> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(Error::Socket)?;
    tokio::spawn(connection);
    Ok(handle)
}

fn netlink(action: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Error {
    let action = action.into();
    move |source| Error::Netlink { action, source: Box::new(source) }
}

async fn link_index(handle: &Handle, name: &str) -> Result<u32, Error> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(link.header.index),
        Ok(None) | Err(_) => Err(Error::NoSuchInterface(name.into())),
    }
}

/// Sets the interface's addresses (removing others), MTU, MAC and state.
pub async fn update_interface(spec: &InterfaceSpec) -> Result<(), Error> {
    let handle = connect()?;
    let index = link_index(&handle, &spec.name).await?;
    let mut set = handle.link().set(index);
    if let Some(mtu) = spec.mtu {
        set = set.mtu(mtu);
    }
    if let Some(mac) = spec.hw_addr {
        set = set.address(mac.to_vec());
    }
    set = if spec.up { set.up() } else { set.down() };
    set.execute().await.map_err(netlink(format!("set up {}", spec.name)))?;

    let existing: Vec<_> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(netlink(format!("list the addresses of {}", spec.name)))?;
    for address in existing {
        handle.address().del(address).execute().await.map_err(netlink(format!("clear {}", spec.name)))?;
    }
    for (ip, prefix) in &spec.addresses {
        handle
            .address()
            .add(index, *ip, *prefix)
            .execute()
            .await
            .map_err(netlink(format!("add {ip}/{prefix} to {}", spec.name)))?;
    }
    Ok(())
}

pub async fn update_routes(routes: &[RouteSpec]) -> Result<(), Error> {
    let handle = connect()?;
    for route in routes {
        let device = match &route.device {
            Some(name) => Some(link_index(&handle, name).await?),
            None => None,
        };
        let action = format!("add the route to {:?} via {:?}", route.destination, route.gateway);
        let family_v4 = route
            .destination
            .map(|(ip, _)| ip.is_ipv4())
            .or(route.gateway.map(|g| g.is_ipv4()))
            .unwrap_or(true);
        let mut request = handle.route().add();
        if let Some(index) = device {
            request = request.output_interface(index);
        }
        if family_v4 {
            let mut v4 = request.v4().replace();
            if let Some((IpAddr::V4(ip), prefix)) = route.destination {
                v4 = v4.destination_prefix(ip, prefix);
            }
            if let Some(IpAddr::V4(gateway)) = route.gateway {
                v4 = v4.gateway(gateway);
            }
            v4.execute().await.map_err(netlink(action))?;
        } else {
            let mut v6 = request.v6().replace();
            if let Some((IpAddr::V6(ip), prefix)) = route.destination {
                v6 = v6.destination_prefix(ip, prefix);
            }
            if let Some(IpAddr::V6(gateway)) = route.gateway {
                v6 = v6.gateway(gateway);
            }
            v6.execute().await.map_err(netlink(action))?;
        }
    }
    Ok(())
}

pub async fn add_neighbors(neighbors: &[NeighborSpec]) -> Result<(), Error> {
    let handle = connect()?;
    for neighbor in neighbors {
        let index = link_index(&handle, &neighbor.device).await?;
        handle
            .neighbours()
            .add(index, neighbor.ip)
            .link_local_address(&neighbor.hw_addr)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(netlink(format!("add the neighbour {} on {}", neighbor.ip, neighbor.device)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_networks_and_macs_are_checked() {
        assert_eq!(parse_cidr("destination", "10.1.0.0/16").unwrap(), ("10.1.0.0".parse().unwrap(), 16));
        assert_eq!(parse_cidr("destination", "fd00::/64").unwrap().1, 64);
        for bad in ["10.1.0.0", "10.1.0.0/33", "x/8", "fd00::/129"] {
            assert!(parse_cidr("destination", bad).is_err(), "{bad}");
        }
        assert_eq!(parse_mac("hw_addr", "02:00:00:00:00:0a").unwrap(), [2, 0, 0, 0, 0, 10]);
        for bad in ["02:00:00:00:00", "02:00:00:00:00:zz", "02-00-00-00-00-01"] {
            assert!(parse_mac("hw_addr", bad).is_err(), "{bad}");
        }
        let err = parse_ip("gateway", "10.0.0").unwrap_err().to_string();
        assert!(err.contains("gateway") && err.contains("10.0.0"), "{err}");
    }
}
