//! The sandbox's network: the network namespace the CNI plugin set up (named in the spec) carried
//! into the guest with Kata's tc-filter model. In that namespace the shim makes a tap beside the
//! CNI interface and joins the two with an ingress qdisc and a mirred redirect on each, so every
//! frame the veth receives leaves through the tap to the guest and every frame the guest sends
//! leaves through the veth. The guest NIC takes the veth's MAC, addresses, MTU and routes (given
//! to the agent); the monitor runs in the namespace and opens the tap by name. Once the monitor is
//! gone, [`clean_up_blocking`] removes the tap and the qdiscs (the task directory records the
//! namespace, so this holds after a crash too), and CNI DEL finds the namespace as it left it.

use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use netlink_packet_route::link::{LinkAttribute, LinkFlag, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteProtocol};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionGeneric, TcActionMirror, TcActionMirrorOption, TcActionOption,
    TcActionType, TcFilterU32Option, TcHandle, TcMirror, TcMirrorActionType, TcU32Key, TcU32Selector,
    TcU32SelectorFlag,
};
use rtnetlink::{Handle, IpVersion};

use crate::hypervisor::{NetDevice, VmNetwork};

/// Our taps end in this, so that clean-up after a crash finds them and nothing else.
const TAP_SUFFIX: &str = "_ic";
/// `protocol all` of tc, in network byte order as the kernel reads it.
const ETH_P_ALL_BE: u16 = (libc::ETH_P_ALL as u16).to_be();
/// The denied destinations' filters come first (tc runs lower numbers first); the redirect after.
const DENY_PRIORITY: u16 = 1;
const FILTER_PRIORITY: u16 = 2;
/// `protocol ip` of tc, in network byte order.
const ETH_P_IP_BE: u16 = (libc::ETH_P_IP as u16).to_be();
/// Where an IPv4 header holds the destination address.
const IPV4_DESTINATION_OFFSET: i32 = 16;
/// Where denied packets go: a tap that is never up, to which mirred can only drop (and count)
/// them. A redirect to it drops on every kernel with mirred, where gact may not be built.
const SINK_TAP: &str = "sink0_ic";
/// How long clean-up waits for a monitor that was just killed to release its tap (the caller has
/// waited for it to exit already; containerd gives `delete` 5 s in all).
const TAP_RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
const TAP_RELEASE_POLL: std::time::Duration = std::time::Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot make a network namespace at {path}")]
    CreateNetns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot enter the network namespace {path}")]
    EnterNetns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open a netlink socket in {netns}")]
    Socket {
        netns: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("netlink refused to {action} in {netns}")]
    Netlink {
        action: String,
        netns: PathBuf,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("cannot open /dev/net/tun to make the sandbox's tap (is the tun module loaded?)")]
    NoTun(#[source] std::io::Error),
    #[error("cannot {action} tap {tap}")]
    Tap {
        action: &'static str,
        tap: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the network namespace {netns} has {count} interfaces besides lo ({names}) that appeared after \
         the VM booted: it has one NIC for them (a VM takes no NIC later; interfaces there at boot each \
         get one)"
    )]
    TooManyInterfaces { netns: PathBuf, count: usize, names: String },
    #[error("interface {name} in {netns} has no MAC address")]
    NoMac { name: String, netns: PathBuf },
    #[error("the network namespace thread panicked")]
    Thread,
}

/// An address with its prefix length.
pub type Cidr = (IpAddr, u8);
/// An IPv4 network: address and prefix length.
pub type Ipv4Network = (std::net::Ipv4Addr, u8);

/// What the guest NIC is to look like: the CNI interface it stands in for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceConfig {
    /// The CNI interface's name in its namespace (eth0).
    pub name: String,
    pub mac: [u8; 6],
    pub mtu: u32,
    pub addresses: Vec<Cidr>,
    pub routes: Vec<RouteConfig>,
    /// Static (permanent) neighbour entries through the interface: IP and MAC, which some CNI
    /// plugins set instead of letting ARP find the gateway.
    pub neighbors: Vec<(IpAddr, [u8; 6])>,
}

/// A route through the interface; `destination` None is the default route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    pub destination: Option<Cidr>,
    pub gateway: Option<IpAddr>,
}

/// What the spec's `linux.namespaces` entry of type `network` asks for.
pub fn requested(spec: &oci_spec::runtime::Spec) -> Requested {
    let network =
        spec.linux().as_ref().and_then(|linux| linux.namespaces().as_ref()).and_then(|namespaces| {
            namespaces.iter().find(|ns| ns.typ() == oci_spec::runtime::LinuxNamespaceType::Network)
        });
    match network {
        None => Requested::HostNetwork,
        Some(ns) => ns.path().clone().map_or(Requested::New, Requested::Path),
    }
}

/// A locally administered unicast MAC derived from the task id, for a NIC whose CNI interface is
/// not there yet (the guest takes the interface's MAC when it comes).
pub fn mac_for(id: &str) -> [u8; 6] {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(id.as_bytes());
    [0x02, 0x1c, digest[0], digest[1], digest[2], digest[3]]
}

/// The guest's view of the spec: the container shares the guest's network namespace, where the
/// NIC is, instead of a host path that means nothing there.
pub fn share_guest_network(spec: &mut oci_spec::runtime::Spec) {
    let Some(linux) = spec.linux_mut() else { return };
    if let Some(namespaces) = linux.namespaces_mut() {
        namespaces.retain(|ns| ns.typ() != oci_spec::runtime::LinuxNamespaceType::Network);
    }
}

/// `MAC` as the VMM and the agent write it.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// The tap standing in for interface number `index` of a sandbox.
pub fn tap_name(index: usize) -> String {
    format!("tap{index}{TAP_SUFFIX}")
}

/// What the spec asks of the sandbox's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requested {
    /// No network namespace: the host's. A VM cannot share the host's interfaces.
    HostNetwork,
    /// A new network namespace, which the shim makes.
    New,
    /// The namespace at this path (made and set up by the CNI plugin's caller).
    Path(PathBuf),
}

/// The sandbox's taps in its namespace, one per CNI interface, and the interfaces they stand in
/// for. The guest's NICs are in the taps' order, so the guest names them eth0, eth1, ... in the
/// order of the CNI interfaces' names.
#[derive(Debug)]
pub struct Attachment {
    pub netns: PathBuf,
    taps: Vec<Tap>,
    /// What the guest may not send to, dropped on each tap's ingress before the redirect.
    denied: Vec<Ipv4Network>,
    state: tokio::sync::Mutex<State>,
}

#[derive(Debug, Clone)]
struct Tap {
    name: String,
    /// The guest NIC's MAC at boot: the CNI interface's when it was there already.
    guest_mac: [u8; 6],
}

#[derive(Debug)]
enum State {
    /// No CNI interface in the namespace yet: one tap waits for the one that comes.
    Waiting,
    /// Joined to the taps; the guest NICs not configured yet.
    Connected(Vec<InterfaceConfig>),
    /// The guest NICs have the interfaces' configuration.
    Configured,
}

/// The guest's name of its NIC number `index`.
pub fn guest_nic(index: usize) -> String {
    format!("eth{index}")
}

impl Attachment {
    /// Makes a tap in `netns` for each CNI interface there and joins each pair; with none there
    /// yet, one tap (whose guest NIC gets `fallback_mac`) waits for the interface that comes. What
    /// fails half way is undone.
    /// The taps belong to `owner` (the sandbox's jailed uid) where given, so that its monitor,
    /// which holds no capabilities, can open them.
    pub async fn prepare(
        netns: &Path,
        fallback_mac: [u8; 6],
        denied: Vec<Ipv4Network>,
        owner: Option<u32>,
    ) -> Result<Attachment, Error> {
        let path = netns.to_path_buf();
        let deny = denied.clone();
        let connected = in_netns(path.clone(), move |handle| async move {
            let interfaces = cni_interfaces(&handle, &path).await?;
            if interfaces.is_empty() {
                create_tap(&tap_name(0), owner)?;
                return Ok(Vec::new());
            }
            let connected = connect_all(&handle, &path, &interfaces, &deny, owner).await;
            if connected.is_err() {
                undo_connect(&handle, &path, &interfaces).await;
            }
            connected
        })
        .await?;
        let (taps, state) = if connected.is_empty() {
            (vec![Tap { name: tap_name(0), guest_mac: fallback_mac }], State::Waiting)
        } else {
            let taps = connected
                .iter()
                .enumerate()
                .map(|(index, interface)| Tap { name: tap_name(index), guest_mac: interface.mac })
                .collect();
            (taps, State::Connected(connected))
        };
        Ok(Attachment { netns: netns.to_path_buf(), taps, denied, state: tokio::sync::Mutex::new(state) })
    }

    /// The network of a VM taken from ironclad-pool: made by [`Attachment::prepare`] in a namespace
    /// that had no CNI interface, so one tap, `tap`, waits for the interface that comes.
    pub fn waiting(netns: &Path, tap: &str, guest_mac: [u8; 6], denied: Vec<Ipv4Network>) -> Attachment {
        Attachment {
            netns: netns.to_path_buf(),
            taps: vec![Tap { name: tap.to_string(), guest_mac }],
            denied,
            state: tokio::sync::Mutex::new(State::Waiting),
        }
    }

    /// The taps' names, in the guest NICs' order.
    pub fn tap_names(&self) -> Vec<&str> {
        self.taps.iter().map(|t| t.name.as_str()).collect()
    }

    /// What the monitor needs: run in the namespace, a NIC on each tap.
    pub fn vm_network(&self) -> VmNetwork {
        VmNetwork {
            netns: self.netns.clone(),
            devices: self
                .taps
                .iter()
                .map(|tap| NetDevice { tap: tap.name.clone(), mac: format_mac(&tap.guest_mac) })
                .collect(),
        }
    }

    /// The interfaces the guest NICs are to be configured as (by NIC index), once: the waiting tap
    /// is connected now if its CNI interface has appeared since [`Attachment::prepare`]. Empty when
    /// there is nothing (more) to do.
    pub async fn take_unconfigured(&self) -> Result<Vec<InterfaceConfig>, Error> {
        let mut state = self.state.lock().await;
        match std::mem::replace(&mut *state, State::Configured) {
            State::Configured => Ok(Vec::new()),
            State::Connected(interfaces) => Ok(interfaces),
            State::Waiting => {
                let (netns, tap, deny) = (self.netns.clone(), tap_name(0), self.denied.clone());
                let connected = in_netns(netns.clone(), move |handle| async move {
                    let interfaces = cni_interfaces(&handle, &netns).await?;
                    match interfaces.as_slice() {
                        [] => Ok(Vec::new()),
                        [one] => Ok(vec![connect_pair(&handle, &netns, one, &tap, &deny).await?]),
                        many => Err(Error::TooManyInterfaces {
                            netns: netns.clone(),
                            count: many.len(),
                            names: many.iter().map(link_name).collect::<Vec<_>>().join(", "),
                        }),
                    }
                })
                .await;
                if !matches!(&connected, Ok(interfaces) if !interfaces.is_empty()) {
                    *state = State::Waiting;
                }
                connected
            }
        }
    }
}

/// Makes a new network namespace, kept by a bind mount at `path` (an empty file is made there):
/// it lives until that is unmounted, which the task directory's clean-up does.
pub fn create_netns(path: &Path) -> Result<(), Error> {
    let failed = |source| Error::CreateNetns { path: path.to_path_buf(), source };
    std::fs::File::create(path).map_err(failed)?;
    let target = path.to_path_buf();
    std::thread::spawn(move || -> Result<(), nix::Error> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
    })
    .join()
    .map_err(|_| Error::Thread)?
    .map_err(|errno| failed(std::io::Error::from(errno)))
}

/// Removes every tap of ours in `netns` and the ingress qdiscs (with their filters) of the
/// interfaces there, waiting at most 1 s for a monitor that was just killed to let go of its tap. A
/// namespace that is already gone has nothing left to remove. Blocks: it runs on a thread of its
/// own in that namespace, and clean-up must finish before the task directory goes.
pub fn clean_up_blocking(netns: &Path) -> Result<(), Error> {
    if !netns.exists() {
        return Ok(());
    }
    let path = netns.to_path_buf();
    std::thread::spawn(move || {
        let inside = path.clone();
        run_in_netns(&path, |handle| async move { clean_up_here(&handle, &inside).await })
    })
    .join()
    .map_err(|_| Error::Thread)?
}

async fn clean_up_here(handle: &Handle, netns: &Path) -> Result<(), Error> {
    for link in links(handle, netns).await? {
        let name = link_name(&link);
        if name.ends_with(TAP_SUFFIX) {
            remove_tap_when_free(&name).await?;
        } else if !is_loopback(&link) {
            remove_ingress(handle, netns, link.header.index).await?;
        }
    }
    Ok(())
}

/// A killed monitor holds its tap until the kernel has torn the process down.
async fn remove_tap_when_free(name: &str) -> Result<(), Error> {
    let mut waited = std::time::Duration::ZERO;
    loop {
        match remove_tap(name) {
            Err(Error::Tap { source, .. })
                if source.raw_os_error() == Some(libc::EBUSY) && waited < TAP_RELEASE_WAIT =>
            {
                tokio::time::sleep(TAP_RELEASE_POLL).await;
                waited += TAP_RELEASE_POLL;
            }
            other => return other,
        }
    }
}

/// Runs `work` on a thread of its own that has entered `netns` (setns changes only the calling
/// thread), with a netlink connection opened there.
async fn in_netns<T, F, Fut>(netns: PathBuf, work: F) -> Result<T, Error>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(run_in_netns(&netns, work));
    });
    rx.await.map_err(|_| Error::Thread)?
}

fn run_in_netns<T, F, Fut>(netns: &Path, work: F) -> Result<T, Error>
where
    F: FnOnce(Handle) -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let enter = |source| Error::EnterNetns { path: netns.to_path_buf(), source };
    let file = std::fs::File::open(netns).map_err(enter)?;
    // SAFETY: setns on this thread only, with a namespace file we hold open; the thread is ours and
    // ends after this work.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(enter(std::io::Error::last_os_error()));
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(enter)?;
    runtime.block_on(async {
        let (connection, handle, _) = rtnetlink::new_connection()
            .map_err(|source| Error::Socket { netns: netns.to_path_buf(), source })?;
        let connection = tokio::spawn(connection);
        let result = work(handle).await;
        connection.abort();
        result
    })
}

/// The CNI interfaces in the namespace (all but lo and our taps), by name.
async fn cni_interfaces(handle: &Handle, netns: &Path) -> Result<Vec<LinkMessage>, Error> {
    let mut interfaces: Vec<LinkMessage> = links(handle, netns)
        .await?
        .into_iter()
        .filter(|link| !is_loopback(link) && !link_name(link).ends_with(TAP_SUFFIX))
        .collect();
    interfaces.sort_by_key(link_name);
    Ok(interfaces)
}

/// Makes tap `i` for interface `i` and joins each pair.
async fn connect_all(
    handle: &Handle,
    netns: &Path,
    interfaces: &[LinkMessage],
    denied: &[Ipv4Network],
    owner: Option<u32>,
) -> Result<Vec<InterfaceConfig>, Error> {
    let mut connected = Vec::with_capacity(interfaces.len());
    for (index, veth) in interfaces.iter().enumerate() {
        let tap = tap_name(index);
        create_tap(&tap, owner)?;
        connected.push(connect_pair(handle, netns, veth, &tap, denied).await?);
    }
    Ok(connected)
}

/// Takes out what [`connect_all`] made: the taps, and the ingress qdiscs of the interfaces.
async fn undo_connect(handle: &Handle, netns: &Path, interfaces: &[LinkMessage]) {
    for (index, veth) in interfaces.iter().enumerate() {
        let _ = remove_ingress(handle, netns, veth.header.index).await;
        let _ = remove_tap(&tap_name(index));
    }
    let _ = remove_tap(SINK_TAP);
}

/// Joins CNI interface `veth` to `tap` (which exists) and says what the interface looks like.
async fn connect_pair(
    handle: &Handle,
    netns: &Path,
    veth: &LinkMessage,
    tap: &str,
    denied: &[Ipv4Network],
) -> Result<InterfaceConfig, Error> {
    let interface = describe(handle, netns, veth).await?;
    if let Err(err) = connect(handle, netns, veth.header.index, tap, interface.mtu, denied).await {
        let _ = remove_ingress(handle, netns, veth.header.index).await;
        if let Ok(tap_index) = link_by_name(handle, netns, tap).await {
            let _ = remove_ingress(handle, netns, tap_index).await;
        }
        return Err(err);
    }
    Ok(interface)
}

/// The interface's MAC, MTU, addresses (IPv6 link-local ones left to the guest) and routes (those
/// the kernel made for its addresses left out: the guest's kernel makes them too).
async fn describe(handle: &Handle, netns: &Path, link: &LinkMessage) -> Result<InterfaceConfig, Error> {
    let name = link_name(link);
    let index = link.header.index;
    let mut mac = None;
    let mut mtu = 1500;
    for attribute in &link.attributes {
        match attribute {
            LinkAttribute::Address(bytes) => mac = <[u8; 6]>::try_from(bytes.as_slice()).ok(),
            LinkAttribute::Mtu(value) => mtu = *value,
            _ => {}
        }
    }
    let mac = mac.ok_or_else(|| Error::NoMac { name: name.clone(), netns: netns.into() })?;
    let addresses: Vec<_> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(netlink(netns, format!("list the addresses of {name}")))?;
    let addresses = addresses
        .iter()
        .flat_map(|message| {
            message.attributes.iter().filter_map(move |attribute| match attribute {
                netlink_packet_route::address::AddressAttribute::Address(ip) => {
                    Some((*ip, message.header.prefix_len))
                }
                _ => None,
            })
        })
        .filter(|(ip, _)| !is_ipv6_link_local(ip))
        .collect();
    let mut routes = Vec::new();
    for version in [IpVersion::V4, IpVersion::V6] {
        let messages: Vec<_> = handle
            .route()
            .get(version)
            .execute()
            .try_collect()
            .await
            .map_err(netlink(netns, format!("list the routes of {name}")))?;
        routes.extend(messages.iter().filter_map(|route| route_through(route, index)));
    }
    let neighbours: Vec<_> = handle
        .neighbours()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink(netns, format!("list the neighbours of {name}")))?;
    let neighbors = neighbours.iter().filter_map(|entry| static_neighbor(entry, index)).collect();
    Ok(InterfaceConfig { name, mac, mtu, addresses, routes, neighbors })
}

/// A permanent neighbour entry on link `index`: its IP and MAC.
fn static_neighbor(
    entry: &netlink_packet_route::neighbour::NeighbourMessage,
    index: u32,
) -> Option<(IpAddr, [u8; 6])> {
    use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
    if entry.header.ifindex != index || entry.header.state != NeighbourState::Permanent {
        return None;
    }
    let mut ip = None;
    let mut mac = None;
    for attribute in &entry.attributes {
        match attribute {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => ip = Some(IpAddr::V4(*v4)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => ip = Some(IpAddr::V6(*v6)),
            NeighbourAttribute::LinkLocalAddress(bytes) => mac = <[u8; 6]>::try_from(bytes.as_slice()).ok(),
            _ => {}
        }
    }
    Some((ip?, mac?))
}

fn route_through(route: &netlink_packet_route::route::RouteMessage, index: u32) -> Option<RouteConfig> {
    if route.header.protocol == RouteProtocol::Kernel || route.header.table != libc::RT_TABLE_MAIN {
        return None;
    }
    let mut through = false;
    let mut destination = None;
    let mut gateway = None;
    for attribute in &route.attributes {
        match attribute {
            RouteAttribute::Oif(oif) => through = *oif == index,
            RouteAttribute::Destination(address) => destination = route_ip(address),
            RouteAttribute::Gateway(address) => gateway = route_ip(address),
            _ => {}
        }
    }
    let destination = destination.map(|ip| (ip, route.header.destination_prefix_length));
    if !through || destination.is_some_and(|(ip, _)| is_ipv6_link_local(&ip) || ip.is_multicast()) {
        return None;
    }
    Some(RouteConfig { destination, gateway })
}

fn route_ip(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

fn is_ipv6_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

/// The tap up with the veth's MTU, an ingress qdisc on each, and a redirect from each to the other.
async fn connect(
    handle: &Handle,
    netns: &Path,
    veth: u32,
    tap: &str,
    mtu: u32,
    denied: &[Ipv4Network],
) -> Result<(), Error> {
    let tap_index = link_by_name(handle, netns, tap).await?;
    handle
        .link()
        .set(tap_index)
        .mtu(mtu)
        .up()
        .execute()
        .await
        .map_err(netlink(netns, format!("bring {tap} up")))?;
    for (from, to) in [(veth, tap_index), (tap_index, veth)] {
        handle
            .qdisc()
            .add(index_i32(from))
            .ingress()
            .execute()
            .await
            .map_err(netlink(netns, format!("add an ingress qdisc to link {from}")))?;
        if from == tap_index && !denied.is_empty() {
            create_tap(SINK_TAP, None)?;
            let sink = link_by_name(handle, netns, SINK_TAP).await?;
            for network in denied {
                deny(handle, netns, tap_index, sink, *network).await?;
            }
        }
        handle
            .traffic_filter(index_i32(from))
            .add()
            .parent(TcHandle::INGRESS.into())
            .priority(FILTER_PRIORITY)
            .protocol(ETH_P_ALL_BE)
            .redirect(to)
            .map_err(netlink(netns, format!("build the redirect from link {from}")))?
            .execute()
            .await
            .map_err(netlink(netns, format!("redirect link {from} to link {to}")))?;
    }
    Ok(())
}

/// Removes the link's ingress qdisc, and so its filters; a link without one is left as it is.
/// Drops what arrives on `index` (the tap: what the guest sends) for IPv4 `network`: a u32 match on
/// the destination address, redirected to the sink (a tap that is down), ahead of the redirect to
/// the veth.
async fn deny(
    handle: &Handle,
    netns: &Path,
    index: u32,
    sink: u32,
    (ip, prefix): Ipv4Network,
) -> Result<(), Error> {
    handle
        .traffic_filter(index_i32(index))
        .add()
        .parent(TcHandle::INGRESS.into())
        .priority(DENY_PRIORITY)
        .protocol(ETH_P_IP_BE)
        .u32(&[
            TcFilterU32Option::Selector(destination_selector(ip, prefix)),
            TcFilterU32Option::Action(vec![redirect_action(sink)]),
        ])
        .map_err(netlink(netns, format!("build the filter denying {ip}/{prefix}")))?
        .execute()
        .await
        .map_err(netlink(netns, format!("deny {ip}/{prefix} on link {index}")))
}

/// Matches IPv4 packets whose destination is in `ip/prefix`. The kernel compares the key with the
/// packet's bytes as they are, so mask and value are laid out in network byte order.
fn destination_selector(ip: std::net::Ipv4Addr, prefix: u8) -> TcU32Selector {
    let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix.min(32))) };
    let mut key = TcU32Key::default();
    key.mask = u32::from_ne_bytes(mask.to_be_bytes());
    key.val = u32::from_ne_bytes((u32::from(ip) & mask).to_be_bytes());
    key.off = IPV4_DESTINATION_OFFSET;
    let mut selector = TcU32Selector::default();
    selector.flags = vec![TcU32SelectorFlag::Terminal];
    selector.nkeys = 1;
    selector.keys = vec![key];
    selector
}

/// `action mirred egress redirect dev <index>`, as rtnetlink's match-all redirect builds it.
fn redirect_action(index: u32) -> TcAction {
    let mut mirror = TcMirror::default();
    mirror.generic = TcActionGeneric::default();
    mirror.generic.action = TcActionType::Stolen;
    mirror.eaction = TcMirrorActionType::EgressRedir;
    mirror.ifindex = index;
    let mut action = TcAction::default();
    action.attributes = vec![
        TcActionAttribute::Kind(TcActionMirror::KIND.to_string()),
        TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(mirror))]),
    ];
    action
}

async fn remove_ingress(handle: &Handle, netns: &Path, index: u32) -> Result<(), Error> {
    let mut request = handle.qdisc().del(index_i32(index));
    request.message_mut().header.parent = TcHandle::INGRESS;
    request.message_mut().header.handle = TcHandle::from(0xffff_0000);
    match request.execute().await {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(message))
            if message.code.is_some_and(|c| -c.get() == libc::EINVAL || -c.get() == libc::ENOENT) =>
        {
            Ok(())
        }
        Err(source) => Err(Error::Netlink {
            action: format!("remove the ingress qdisc of link {index}"),
            netns: netns.into(),
            source: Box::new(source),
        }),
    }
}

async fn links(handle: &Handle, netns: &Path) -> Result<Vec<LinkMessage>, Error> {
    handle.link().get().execute().try_collect().await.map_err(netlink(netns, "list the links".into()))
}

async fn link_by_name(handle: &Handle, netns: &Path, name: &str) -> Result<u32, Error> {
    let mut found = handle.link().get().match_name(name.into()).execute();
    match found.try_next().await {
        Ok(Some(link)) => Ok(link.header.index),
        Ok(None) => Err(Error::Netlink {
            action: format!("find {name}"),
            netns: netns.into(),
            source: Box::new(rtnetlink::Error::RequestFailed),
        }),
        Err(source) => Err(Error::Netlink {
            action: format!("find {name}"),
            netns: netns.into(),
            source: Box::new(source),
        }),
    }
}

fn link_name(link: &LinkMessage) -> String {
    link.attributes
        .iter()
        .find_map(|a| if let LinkAttribute::IfName(name) = a { Some(name.clone()) } else { None })
        .unwrap_or_default()
}

fn is_loopback(link: &LinkMessage) -> bool {
    link.header.flags.contains(&LinkFlag::Loopback)
}

fn index_i32(index: u32) -> i32 {
    i32::try_from(index).unwrap_or(i32::MAX)
}

fn netlink(netns: &Path, action: String) -> impl FnOnce(rtnetlink::Error) -> Error {
    let netns = netns.to_path_buf();
    move |source| Error::Netlink { action, netns, source: Box::new(source) }
}

/// Makes a persistent tap (it outlives this fd, for the monitor to open by name) with the
/// virtio-net header, as both monitors use it.
fn create_tap(name: &str, owner: Option<u32>) -> Result<(), Error> {
    set_persist(name, true, owner, "create")
}

/// Makes the tap non-persistent; it goes when its last user (this fd) closes. EBUSY: a monitor
/// still holds it.
fn remove_tap(name: &str) -> Result<(), Error> {
    set_persist(name, false, None, "remove")
}

fn set_persist(name: &str, persist: bool, owner: Option<u32>, action: &'static str) -> Result<(), Error> {
    let failed = |source| Error::Tap { action, tap: name.into(), source };
    let tun =
        std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun").map_err(Error::NoTun)?;
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.is_empty() || name.len() >= request.ifr_name.len() {
        return Err(failed(std::io::Error::from_raw_os_error(libc::EINVAL)));
    }
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes the ifreq we own; the fd is /dev/net/tun.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut request) } != 0 {
        return Err(failed(std::io::Error::last_os_error()));
    }
    if let Some(uid) = owner {
        // SAFETY: TUNSETOWNER takes the owner's uid by value on the tun fd attached above.
        if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETOWNER, libc::c_ulong::from(uid)) } != 0 {
            return Err(failed(std::io::Error::last_os_error()));
        }
    }
    // SAFETY: TUNSETPERSIST takes an integer argument on the tun fd attached above.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, libc::c_ulong::from(persist)) } != 0 {
        return Err(failed(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> oci_spec::runtime::Spec {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn the_spec_asks_for_a_namespace_by_path_a_new_one_or_the_hosts() {
        let mut with = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": { "namespaces": [
                { "type": "pid" },
                { "type": "network", "path": "/var/run/netns/cni-1" }
            ]}
        }));
        assert_eq!(requested(&with), Requested::Path("/var/run/netns/cni-1".into()));
        share_guest_network(&mut with);
        let left = with.linux().as_ref().unwrap().namespaces().as_ref().unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].typ(), oci_spec::runtime::LinuxNamespaceType::Pid);

        let without = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": { "namespaces": [{ "type": "network" }] }
        }));
        assert_eq!(requested(&without), Requested::New);
        let host = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": { "namespaces": [{ "type": "pid" }] }
        }));
        assert_eq!(requested(&host), Requested::HostNetwork);
    }

    #[test]
    fn macs_and_tap_names_are_written_as_the_monitors_read_them() {
        assert_eq!(format_mac(&[0x02, 0, 0xab, 1, 2, 0xff]), "02:00:ab:01:02:ff");
        assert_eq!(tap_name(0), "tap0_ic");
        assert!(tap_name(0).len() < 16, "fits IFNAMSIZ");
        let mac = mac_for("task-1");
        assert_eq!(mac[0] & 0x03, 0x02, "locally administered, unicast");
        assert_eq!(mac, mac_for("task-1"));
        assert_ne!(mac, mac_for("task-2"));
    }

    #[test]
    fn a_denied_network_is_matched_on_the_destination_bytes_as_the_packet_has_them() {
        let selector = destination_selector("169.254.169.254".parse().unwrap(), 32);
        let key = &selector.keys[0];
        assert_eq!(key.val.to_ne_bytes(), [169, 254, 169, 254]);
        assert_eq!(key.mask.to_ne_bytes(), [255, 255, 255, 255]);
        assert_eq!(key.off, 16);
        let selector = destination_selector("10.1.2.3".parse().unwrap(), 8);
        assert_eq!(selector.keys[0].val.to_ne_bytes(), [10, 0, 0, 0]);
        assert_eq!(selector.keys[0].mask.to_ne_bytes(), [255, 0, 0, 0]);
        assert_eq!(destination_selector("10.1.2.3".parse().unwrap(), 0).keys[0].mask, 0);
    }

    #[test]
    fn link_local_addresses_are_left_to_the_guest() {
        assert!(is_ipv6_link_local(&"fe80::1".parse().unwrap()));
        assert!(!is_ipv6_link_local(&"fd00::1".parse().unwrap()));
        assert!(!is_ipv6_link_local(&"10.0.0.1".parse().unwrap()));
    }

    #[tokio::test]
    async fn a_missing_namespace_is_an_error_naming_it_and_clean_up_finds_nothing_to_do() {
        let missing = Path::new("/nonexistent/netns");
        let err = Attachment::prepare(missing, mac_for("t"), vec![], None).await.unwrap_err();
        assert!(matches!(&err, Error::EnterNetns { path, .. } if path == missing), "{err}");
        clean_up_blocking(missing).unwrap();
    }
}

/// The tc plumbing in a namespace of the test's own (root only).
#[cfg(test)]
mod netns_tests {
    use super::*;

    fn nsenter(netns: &Path, args: &[&str]) -> String {
        let output = std::process::Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .args(args)
            .output()
            .unwrap();
        assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    #[tokio::test]
    async fn a_veth_is_joined_to_the_tap_with_the_denied_networks_dropped_and_all_of_it_removed() {
        if !ironclad_test_prereq::needs().root().program("ip").program("tc").program("nsenter").ready() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (sandbox, peer) = (dir.path().join("sandbox"), dir.path().join("peer"));
        create_netns(&sandbox).unwrap();
        create_netns(&peer).unwrap();
        nsenter(&sandbox, &["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"]);
        let peer_file = std::fs::File::open(&peer).unwrap();
        let peer_pid_path = format!("/proc/{}/fd/{}", std::process::id(), peer_file.as_raw_fd());
        nsenter(&sandbox, &["ip", "link", "set", "eth0p", "netns", &peer_pid_path]);
        nsenter(&sandbox, &["ip", "addr", "add", "10.205.0.2/24", "dev", "eth0"]);
        nsenter(&sandbox, &["ip", "link", "set", "eth0", "up"]);
        nsenter(
            &sandbox,
            &[
                "ip",
                "neigh",
                "add",
                "10.205.0.9",
                "lladdr",
                "02:00:00:00:00:09",
                "dev",
                "eth0",
                "nud",
                "permanent",
            ],
        );

        let attachment =
            Attachment::prepare(&sandbox, mac_for("t"), vec![("169.254.169.254".parse().unwrap(), 32)], None)
                .await
                .unwrap();
        let interfaces = attachment.take_unconfigured().await.unwrap();
        let [interface] = interfaces.as_slice() else { panic!("one veth, one interface: {interfaces:?}") };
        assert_eq!(interface.name, "eth0");
        assert_eq!(interface.addresses, vec![("10.205.0.2".parse().unwrap(), 24)]);
        assert_eq!(attachment.vm_network().devices[0].mac, format_mac(&interface.mac));
        assert!(attachment.take_unconfigured().await.unwrap().is_empty(), "configured once");
        assert_eq!(interface.neighbors, vec![("10.205.0.9".parse().unwrap(), [2, 0, 0, 0, 0, 9])]);
        let filters = nsenter(&sandbox, &["tc", "filter", "show", "dev", "tap0_ic", "ingress"]);
        assert!(filters.contains("match a9fea9fe/ffffffff at 16"), "{filters}");
        assert!(filters.contains("Egress Redirect to device sink0_ic"), "{filters}");
        assert!(filters.contains("Egress Redirect to device eth0"), "{filters}");
        let filters = nsenter(&sandbox, &["tc", "filter", "show", "dev", "eth0", "ingress"]);
        assert!(filters.contains("Egress Redirect to device tap0_ic"), "{filters}");

        clean_up_blocking(&sandbox).unwrap();
        let links = nsenter(&sandbox, &["ip", "-o", "link", "show"]);
        assert!(!links.contains("_ic"), "{links}");
        let qdiscs = nsenter(&sandbox, &["tc", "qdisc", "show", "dev", "eth0"]);
        assert!(!qdiscs.contains("ingress"), "{qdiscs}");
        for netns in [&sandbox, &peer] {
            nix::mount::umount2(netns.as_path(), nix::mount::MntFlags::MNT_DETACH).unwrap();
        }
    }

    #[tokio::test]
    async fn each_interface_there_at_boot_gets_its_own_tap_in_name_order() {
        if !ironclad_test_prereq::needs().root().program("ip").program("nsenter").ready() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (sandbox, peers) = (dir.path().join("sandbox"), dir.path().join("peers"));
        create_netns(&sandbox).unwrap();
        create_netns(&peers).unwrap();
        let peers_file = std::fs::File::open(&peers).unwrap();
        let peers_path = format!("/proc/{}/fd/{}", std::process::id(), peers_file.as_raw_fd());
        for (name, peer, address) in [("net1", "net1p", "10.206.0.2/24"), ("eth0", "eth0p", "10.205.0.2/24")]
        {
            nsenter(&sandbox, &["ip", "link", "add", name, "type", "veth", "peer", "name", peer]);
            nsenter(&sandbox, &["ip", "link", "set", peer, "netns", &peers_path]);
            nsenter(&sandbox, &["ip", "addr", "add", address, "dev", name]);
            nsenter(&sandbox, &["ip", "link", "set", name, "up"]);
        }
        let attachment = Attachment::prepare(&sandbox, mac_for("t"), vec![], Some(900_123)).await.unwrap();
        assert_eq!(attachment.tap_names(), ["tap0_ic", "tap1_ic"]);
        // The jailed monitor, holding no capabilities, opens them as their owner.
        let details = nsenter(&sandbox, &["ip", "-d", "link", "show", "tap1_ic"]);
        assert!(details.contains("user 900123"), "{details}");
        let interfaces = attachment.take_unconfigured().await.unwrap();
        let names: Vec<&str> = interfaces.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["eth0", "net1"], "guest NIC i stands in for the i-th interface by name");
        assert_eq!(interfaces[1].addresses, vec![("10.206.0.2".parse().unwrap(), 24)]);
        let devices = attachment.vm_network().devices;
        assert_eq!(devices.len(), 2);
        assert_eq!(devices[1].mac, format_mac(&interfaces[1].mac));
        let filters = nsenter(&sandbox, &["tc", "filter", "show", "dev", "net1", "ingress"]);
        assert!(filters.contains("Egress Redirect to device tap1_ic"), "{filters}");
        clean_up_blocking(&sandbox).unwrap();
        let links = nsenter(&sandbox, &["ip", "-o", "link", "show"]);
        assert!(!links.contains("_ic"), "{links}");
        for netns in [&sandbox, &peers] {
            nix::mount::umount2(netns.as_path(), nix::mount::MntFlags::MNT_DETACH).unwrap();
        }
    }
}
