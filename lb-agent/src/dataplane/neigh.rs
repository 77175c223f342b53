//! Keeping the next hops towards backends resolved.
//!
//! `bpf_fib_lookup` answers "no neighbour" until the kernel has an ARP/ND entry for the
//! next hop, and the kernel only makes one when it sends there itself, which an L4
//! balancer host never does. As Cilium's agent does, we install *managed* neighbour
//! entries (`NTF_EXT_MANAGED`, Linux 5.16+) for the next hop of every backend: the kernel
//! resolves them at once and keeps them resolved by probing. Only entries this agent
//! added are removed again.
//!
//! [`NextHopKeeper`] is a task of its own that owns its netlink sockets (the `rtnetlink`
//! crate: typed messages, no `ip` processes, no parsing of their output). Callers hand
//! it the wanted set of backend addresses through a [`tokio::sync::watch`] channel and
//! never wait for it. It asks the kernel for each backend's route (`RTM_GETROUTE`, as
//! `ip route get` does), reads the neighbour table, and creates or removes entries. It
//! listens to the kernel's neighbour and route notifications (`RTNLGRP_NEIGH`,
//! `RTNLGRP_IPV4_ROUTE`, `RTNLGRP_IPV6_ROUTE`) instead of polling: a route change, or
//! the deletion or replacement of an entry a backend needs, brings a new pass within
//! [`SETTLE`]. A rare safety pass ([`SAFETY_RECHECK`]) covers lost notifications.
//!
//! With the fast path's `NEXT_HOPS` map ([`super::nexthop`]) handed to it, the keeper
//! also writes each backend's resolved next hop (egress interface, MACs, MTU) there, by
//! backend id: a pass reads routes, neighbours and links; a neighbour or link
//! notification about a next hop in use rewrites the entries it touches at once (no
//! settle, no netlink request), a route notification after [`SETTLE`].
//!
//! The entries it makes carry the neighbour protocol [`PROTOCOL`], so an agent that
//! takes over a running fast path (hitless restart) recognises the entries its
//! predecessor made and removes them on detach; entries others made (static ones,
//! another daemon's managed ones) are left alone.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    time::Duration,
};

use futures_util::{StreamExt as _, stream::BoxStream};
use rtnetlink::{
    Handle, MulticastGroup, RouteMessageBuilder,
    packet_core::{NetlinkMessage, NetlinkPayload},
    packet_route::{
        AddressFamily, RouteNetlinkMessage,
        link::{LinkAttribute, LinkFlags, LinkMessage},
        neighbour::{
            NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourFlags,
            NeighbourMessage, NeighbourState,
        },
        route::{
            RouteAddress, RouteAttribute, RouteMessage, RouteMetric, RouteProtocol, RouteType,
            RouteVia,
        },
    },
};
use tokio::{
    sync::{oneshot, watch},
    task::JoinHandle,
    time::Instant,
};

use super::nexthop::{self, NextHopTable};

/// The neighbour protocol (`NDA_PROTOCOL`) that marks entries this agent made. Not in
/// iproute2's `rt_protos`; `ip neigh show proto 176` lists them.
pub const PROTOCOL: u8 = 176;

/// How long a burst of notifications may last before the pass it calls for runs.
pub const SETTLE: Duration = Duration::from_millis(20);

/// How often the keeper checks everything even without a notification (lost ones:
/// a full socket buffer is reported, but a closed monitor socket is not).
pub const SAFETY_RECHECK: Duration = Duration::from_secs(60);

/// The multicast groups the keeper listens to.
const GROUPS: [MulticastGroup; 4] = [
    MulticastGroup::Neigh,
    MulticastGroup::Ipv4Route,
    MulticastGroup::Ipv6Route,
    MulticastGroup::Link,
];

#[derive(Debug, thiserror::Error)]
pub enum NeighError {
    #[error("opening a netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("asking the kernel for the route to {dst}: {source}")]
    Route {
        dst: IpAddr,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("the kernel has no route to {dst}")]
    NoRoute { dst: IpAddr },
    #[error("the route to {dst} is of kind {kind:?}, not a unicast route")]
    NotUnicast { dst: IpAddr, kind: RouteType },
    #[error("the route to {dst} names no output interface")]
    NoInterface { dst: IpAddr },
    #[error("reading the neighbour table: {0}")]
    Dump(#[source] rtnetlink::Error),
    #[error("reading the links: {0}")]
    Links(#[source] rtnetlink::Error),
    #[error("adding a managed neighbour entry for {hop}: {source}")]
    Add {
        hop: NextHop,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("removing the managed neighbour entry for {hop}: {source}")]
    Del {
        hop: NextHop,
        #[source]
        source: rtnetlink::Error,
    },
}

/// The next hop of a destination: the gateway, or the destination itself when on-link,
/// and the interface it is reached through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NextHop {
    pub address: IpAddr,
    pub ifindex: u32,
}

impl fmt::Display for NextHop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} dev {}", self.address, ifname(self.ifindex))
    }
}

/// The name of interface `index` (for logs), or `if<index>` when it has none.
fn ifname(index: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` holds IF_NAMESIZE bytes, as if_indextoname requires; on success it
    // holds a NUL-terminated name.
    let name = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if name.is_null() {
        return format!("if{index}");
    }
    // SAFETY: if_indextoname succeeded, so `buf` holds a NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

fn ip_of_route_address(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// The next hop towards `dst` in the kernel's answer to `RTM_GETROUTE` for it.
pub fn next_hop_of(dst: IpAddr, route: &RouteMessage) -> Result<NextHop, NeighError> {
    route_of(dst, route).map(|r| r.hop)
}

/// The next hop towards `dst` and the route's MTU metric, from the kernel's answer to
/// `RTM_GETROUTE` for it.
pub fn route_of(dst: IpAddr, route: &RouteMessage) -> Result<nexthop::Route, NeighError> {
    if route.header.kind != RouteType::Unicast {
        return Err(NeighError::NotUnicast {
            dst,
            kind: route.header.kind,
        });
    }
    let mut ifindex = None;
    let mut gateway = None;
    let mut mtu = None;
    for attr in &route.attributes {
        match attr {
            RouteAttribute::Oif(i) => ifindex = Some(*i),
            RouteAttribute::Metrics(metrics) => {
                for m in metrics {
                    if let RouteMetric::Mtu(m) = m {
                        mtu = Some(*m);
                    }
                }
            }
            RouteAttribute::Gateway(a) => gateway = ip_of_route_address(a),
            // An IPv4 route through an IPv6 gateway (RFC 5549).
            RouteAttribute::Via(RouteVia::Inet6(v6)) => gateway = Some(IpAddr::V6(*v6)),
            RouteAttribute::Via(RouteVia::Inet(v4)) => gateway = Some(IpAddr::V4(*v4)),
            _ => {}
        }
    }
    let ifindex = ifindex.ok_or(NeighError::NoInterface { dst })?;
    Ok(nexthop::Route {
        hop: NextHop {
            address: gateway.unwrap_or(dst),
            ifindex,
        },
        mtu,
    })
}

/// A neighbour table entry, as far as the keeper cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub hop: NextHop,
    /// `NTF_EXT_MANAGED`: the kernel keeps it resolved.
    pub managed: bool,
    /// Made by an xdplb agent ([`PROTOCOL`]).
    pub ours: bool,
    /// Permanent or no-ARP: resolved without the kernel's help.
    pub fixed: bool,
    /// Its link-layer address while the entry is `NUD_VALID` (the states in which
    /// `bpf_fib_lookup` answers with it), if it is an Ethernet address.
    pub mac: Option<[u8; 6]>,
}

impl Entry {
    /// Whether the entry keeps `bpf_fib_lookup` answering without our help.
    #[must_use]
    pub fn usable(&self) -> bool {
        self.managed || self.fixed
    }
}

/// The entry a neighbour message describes (None for other families or without a
/// destination).
#[must_use]
pub fn entry_of(msg: &NeighbourMessage) -> Option<Entry> {
    let mut address = None;
    let mut managed = false;
    let mut ours = false;
    let mut lladdr = None;
    for attr in &msg.attributes {
        match attr {
            NeighbourAttribute::LinkLayerAddress(a) => lladdr = nexthop::mac_of(a),
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                address = Some(IpAddr::V4(*v4));
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                address = Some(IpAddr::V6(*v6));
            }
            NeighbourAttribute::ExtFlags(f) => managed = f.contains(NeighbourExtFlags::Managed),
            NeighbourAttribute::Protocol(p) => ours = u8::from(*p) == PROTOCOL,
            _ => {}
        }
    }
    Some(Entry {
        hop: NextHop {
            address: address?,
            ifindex: msg.header.ifindex,
        },
        managed,
        ours,
        fixed: matches!(
            msg.header.state,
            NeighbourState::Permanent | NeighbourState::Noarp
        ),
        mac: lladdr.filter(|_| {
            matches!(
                msg.header.state,
                NeighbourState::Permanent
                    | NeighbourState::Noarp
                    | NeighbourState::Reachable
                    | NeighbourState::Probe
                    | NeighbourState::Stale
                    | NeighbourState::Delay
            )
        }),
    })
}

/// The link a link message describes.
#[must_use]
pub fn link_of(msg: &LinkMessage) -> nexthop::Link {
    let mut mac = None;
    let mut mtu = 0;
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::Address(a) => mac = nexthop::mac_of(a),
            LinkAttribute::Mtu(m) => mtu = *m,
            _ => {}
        }
    }
    nexthop::Link {
        mac,
        mtu,
        up: msg.header.flags.contains(LinkFlags::Up),
    }
}

/// The entry the keeper makes for `hop`: what `ip neigh replace ADDR dev DEV managed
/// extern_learn proto 176` sends (state none, so the kernel resolves it).
#[must_use]
pub fn managed_entry(hop: NextHop) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = family(hop.address);
    msg.header.ifindex = hop.ifindex;
    msg.header.state = NeighbourState::None;
    msg.header.flags = NeighbourFlags::ExtLearned;
    msg.attributes = vec![
        NeighbourAttribute::Destination(neighbour_address(hop.address)),
        NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed),
        NeighbourAttribute::Protocol(RouteProtocol::from(PROTOCOL)),
    ];
    msg
}

/// The message that deletes the entry for `hop`.
#[must_use]
pub fn entry_key(hop: NextHop) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = family(hop.address);
    msg.header.ifindex = hop.ifindex;
    msg.attributes = vec![NeighbourAttribute::Destination(neighbour_address(
        hop.address,
    ))];
    msg
}

fn family(a: IpAddr) -> AddressFamily {
    match a {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn neighbour_address(a: IpAddr) -> NeighbourAddress {
    match a {
        IpAddr::V4(a) => NeighbourAddress::Inet(a),
        IpAddr::V6(a) => NeighbourAddress::Inet6(a),
    }
}

/// What one pass changes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Next hops without a usable entry: make a managed one (replacing what is there).
    pub create: Vec<NextHop>,
    /// Managed entries an earlier agent made for next hops we need: ours from now on.
    pub adopt: Vec<NextHop>,
    /// Entries we made that no backend needs any more.
    pub remove: Vec<NextHop>,
    /// Entries we made that are gone or that someone else has replaced: not ours to
    /// remove any more.
    pub forget: Vec<NextHop>,
}

/// Decide what to do, given the next hops the backends need, the neighbour table and
/// the entries this keeper made.
#[must_use]
pub fn plan(
    wanted: &BTreeSet<NextHop>,
    table: &BTreeMap<NextHop, Entry>,
    added: &BTreeSet<NextHop>,
) -> Plan {
    let mut p = Plan::default();
    for hop in wanted {
        match table.get(hop) {
            None => p.create.push(*hop),
            Some(e) if !e.usable() => p.create.push(*hop),
            Some(e) if e.managed && e.ours => {
                if !added.contains(hop) {
                    p.adopt.push(*hop);
                }
            }
            // Someone else's managed or static entry: it does the job and is theirs.
            Some(_) => {
                if added.contains(hop) {
                    p.forget.push(*hop);
                }
            }
        }
    }
    for hop in added.difference(wanted) {
        match table.get(hop) {
            Some(e) if e.managed && e.ours => p.remove.push(*hop),
            _ => p.forget.push(*hop),
        }
    }
    p
}

/// Whether a notification may change what the keeper should do for `hops` (the next
/// hops its backends need now).
#[must_use]
pub fn calls_for_pass(msg: &NetlinkMessage<RouteNetlinkMessage>, hops: &BTreeSet<NextHop>) -> bool {
    match &msg.payload {
        // Notifications were lost: look at everything again.
        NetlinkPayload::Overrun(_) => true,
        NetlinkPayload::InnerMessage(m) => match m {
            // Any route may now be the best one towards some backend.
            RouteNetlinkMessage::NewRoute(_) | RouteNetlinkMessage::DelRoute(_) => true,
            RouteNetlinkMessage::DelNeighbour(n) => {
                entry_of(n).is_some_and(|e| hops.contains(&e.hop))
            }
            RouteNetlinkMessage::NewNeighbour(n) => {
                entry_of(n).is_some_and(|e| hops.contains(&e.hop) && !e.usable())
            }
            _ => false,
        },
        _ => false,
    }
}

/// Keeps managed neighbour entries for the next hops of a set of backends: a handle to
/// the task that does it (see the [module docs](self)).
#[derive(Debug)]
pub struct NextHopKeeper {
    stop: oneshot::Sender<Stop>,
    task: JoinHandle<()>,
    /// The backend addresses (of the ids in the fast path's map) whose next hop is not
    /// written yet: `None` until the keeper's first write.
    unresolved: watch::Receiver<Option<BTreeSet<IpAddr>>>,
}

/// The fast path's next-hop map and the backend ids (id -> address, every entry of the
/// backend map) whose next hops it holds.
pub struct HopsMap {
    pub table: NextHopTable,
    pub ids: watch::Receiver<BTreeMap<u32, IpAddr>>,
}

/// How the keeper task ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// Leave the entries for the next agent (hitless restart).
    Leave,
    /// Remove the entries this keeper made or adopted.
    Clear,
}

impl NextHopKeeper {
    /// Start the keeper for the backend addresses `backends` publishes (it follows every
    /// change), writing their next hops into `hops` when given. Must be called within a
    /// tokio runtime. Dropping the handle ends the task and leaves the entries.
    pub fn spawn(
        backends: watch::Receiver<BTreeSet<IpAddr>>,
        hops: Option<HopsMap>,
    ) -> Result<Self, NeighError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NeighError::Socket)?;
        let connection = tokio::spawn(conn);
        let monitor = Monitor::open().map_err(NeighError::Socket)?;
        let (stop, stop_rx) = oneshot::channel();
        let (unresolved_tx, unresolved) = watch::channel(None);
        let (map, ids) = match hops {
            Some(h) => (Some(h.table), Some(h.ids)),
            None => (None, None),
        };
        let keeper = Keeper {
            handle,
            connection,
            added: BTreeSet::new(),
            hops: BTreeSet::new(),
            failing: BTreeMap::new(),
            map,
            ids: BTreeMap::new(),
            routes: BTreeMap::new(),
            neighbours: BTreeMap::new(),
            links: BTreeMap::new(),
            unresolved: unresolved_tx,
        };
        let task = tokio::spawn(keeper.run(backends, ids, monitor, stop_rx));
        Ok(Self {
            stop,
            task,
            unresolved,
        })
    }

    /// Wait, at most `within`, until every backend in the fast path's map has its next hop
    /// written there (the kernel resolved the neighbours the keeper asked for). `Err` holds
    /// the backends still without one. Until then their packets go up to the kernel, so the
    /// agent says it is ready (and the operator's traffic arrives) only after this.
    pub async fn resolved(&self, within: Duration) -> Result<(), BTreeSet<IpAddr>> {
        let mut rx = self.unresolved.clone();
        let resolved = tokio::time::timeout(
            within,
            rx.wait_for(|u| u.as_ref().is_some_and(BTreeSet::is_empty)),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        if resolved {
            return Ok(());
        }
        // Timed out, or the keeper ended: report what is known.
        Err(self.unresolved.borrow().clone().unwrap_or_default())
    }

    /// Remove every entry this keeper made (detach) and end the task.
    pub async fn clear(self) {
        self.end(Stop::Clear).await;
    }

    /// End the task and leave the entries in place for the next agent.
    pub async fn stop(self) {
        self.end(Stop::Leave).await;
    }

    async fn end(self, how: Stop) {
        // The task may have ended already (it only does so on a panic).
        let _ = self.stop.send(how);
        if let Err(e) = self.task.await {
            tracing::warn!(error = %e, "the next-hop keeper task failed");
        }
    }
}

/// One notification, with the address it came from.
type Notification = (
    NetlinkMessage<RouteNetlinkMessage>,
    rtnetlink::sys::SocketAddr,
);

/// The notification socket and the task that reads it.
struct Monitor {
    connection: JoinHandle<()>,
    messages: BoxStream<'static, Notification>,
}

impl Monitor {
    fn open() -> std::io::Result<Self> {
        let (conn, _handle, messages) = rtnetlink::new_multicast_connection(&GROUPS)?;
        Ok(Self {
            connection: tokio::spawn(conn),
            messages: messages.boxed(),
        })
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

/// The task's state.
struct Keeper {
    handle: Handle,
    connection: JoinHandle<()>,
    /// Entries this keeper made or adopted (removed again when no backend needs them).
    added: BTreeSet<NextHop>,
    /// The next hops the backends needed at the last pass (notifications about other
    /// neighbours are ignored).
    hops: BTreeSet<NextHop>,
    /// What is wrong per backend or next hop, as last reported (reported again only
    /// when it changes).
    failing: BTreeMap<IpAddr, String>,
    /// The fast path's next-hop map, when there is one, and what its entries are made
    /// of: the backend ids, their routes (from the last pass), the resolved next hops
    /// and the links (from the last pass and every notification since).
    map: Option<NextHopTable>,
    ids: BTreeMap<u32, IpAddr>,
    routes: BTreeMap<IpAddr, nexthop::Route>,
    neighbours: BTreeMap<NextHop, [u8; 6]>,
    links: BTreeMap<u32, nexthop::Link>,
    /// Published after every write: the backends whose next hop is not in the map.
    unresolved: watch::Sender<Option<BTreeSet<IpAddr>>>,
}

impl Keeper {
    async fn run(
        mut self,
        mut backends: watch::Receiver<BTreeSet<IpAddr>>,
        mut ids: Option<watch::Receiver<BTreeMap<u32, IpAddr>>>,
        monitor: Monitor,
        mut stop: oneshot::Receiver<Stop>,
    ) {
        let mut monitor = Some(monitor);
        let mut wanted = backends.borrow_and_update().clone();
        if let Some(rx) = &mut ids {
            self.ids = rx.borrow_and_update().clone();
        }
        let mut publisher = true;
        let mut due = Some(Instant::now());
        let mut safety = tokio::time::interval(SAFETY_RECHECK);
        safety.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        safety.tick().await;
        let how = loop {
            tokio::select! {
                how = &mut stop => break how.unwrap_or(Stop::Leave),
                changed = backends.changed(), if publisher => {
                    if changed.is_err() {
                        // The publisher is gone: keep what we have until told to stop.
                        publisher = false;
                        continue;
                    }
                    wanted = backends.borrow_and_update().clone();
                    due = Some(Instant::now());
                }
                changed = ids_changed(&mut ids) => {
                    match (changed, &mut ids) {
                        (true, Some(rx)) => {
                            self.ids = rx.borrow_and_update().clone();
                            // Known addresses need no netlink request: write at once.
                            if self.ids.values().all(|a| self.routes.contains_key(a)) {
                                self.write_hops();
                            } else {
                                due = Some(Instant::now());
                            }
                        }
                        _ => ids = None,
                    }
                }
                msg = next_message(&mut monitor) => match msg {
                    Some((msg, _)) => {
                        if self.note(&msg) {
                            self.write_hops();
                        }
                        if due.is_none() && calls_for_pass(&msg, &self.hops) {
                            due = Some(Instant::now() + SETTLE);
                        }
                    }
                    None => {
                        tracing::warn!("the netlink notification socket closed; next hops are checked every {}s until it reopens", SAFETY_RECHECK.as_secs());
                        monitor = None;
                    }
                },
                () = sleep_until(due), if due.is_some() => {
                    due = None;
                    self.pass(&wanted).await;
                }
                _ = safety.tick() => {
                    if monitor.is_none() {
                        match Monitor::open() {
                            Ok(m) => monitor = Some(m),
                            Err(e) => tracing::warn!(error = %e, "reopening the netlink notification socket"),
                        }
                    }
                    self.pass(&wanted).await;
                }
            }
        };
        drop(monitor);
        if how == Stop::Clear {
            self.clear().await;
        }
        self.connection.abort();
    }

    /// Resolve every backend's next hop, make the neighbour table match, and write the
    /// next hops of the backend ids into the fast path.
    async fn pass(&mut self, backends: &BTreeSet<IpAddr>) {
        let mut errors: BTreeMap<IpAddr, NeighError> = BTreeMap::new();
        let mut wanted = BTreeSet::new();
        let mut routes = BTreeMap::new();
        let all: BTreeSet<IpAddr> = backends.iter().chain(self.ids.values()).copied().collect();
        for b in all {
            match self.route(b).await {
                Ok(route) => {
                    wanted.insert(route.hop);
                    routes.insert(b, route);
                }
                Err(e) => {
                    errors.insert(b, e);
                }
            }
        }
        self.hops.clone_from(&wanted);
        self.routes = routes;
        if self.map.is_some() {
            match self.links().await {
                Ok(links) => self.links = links,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the links; next hops in the fast path may lag until the next change")
                }
            }
        }
        let table = match self.table().await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "cannot keep next hops resolved; trying again at the next change");
                self.write_hops();
                return;
            }
        };
        self.neighbours = table
            .values()
            .filter(|e| wanted.contains(&e.hop))
            .filter_map(|e| Some((e.hop, e.mac?)))
            .collect();
        let p = plan(&wanted, &table, &self.added);
        for hop in p.create {
            match self.create(hop).await {
                Ok(()) => {
                    tracing::info!(next_hop = %hop.address, dev = %ifname(hop.ifindex), "keeping next hop resolved (managed neighbour)");
                    self.added.insert(hop);
                }
                Err(e) => {
                    errors.insert(hop.address, e);
                }
            }
        }
        // After the neighbours to resolve are asked for: the first write after a start
        // reads every slot of the map, which must not delay them.
        self.write_hops();
        for hop in p.adopt {
            tracing::info!(next_hop = %hop.address, dev = %ifname(hop.ifindex), "keeping next hop resolved (managed neighbour left by an earlier agent)");
            self.added.insert(hop);
        }
        for hop in p.forget {
            self.added.remove(&hop);
        }
        for hop in p.remove {
            self.remove(hop).await;
        }
        self.report(errors);
    }

    /// Log what newly fails or changed, and what recovered.
    fn report(&mut self, errors: BTreeMap<IpAddr, NeighError>) {
        let now: BTreeMap<IpAddr, String> =
            errors.iter().map(|(a, e)| (*a, e.to_string())).collect();
        for (addr, e) in &now {
            if self.failing.get(addr) != Some(e) {
                tracing::warn!(backend = %addr, error = %e, "cannot keep the next hop resolved; its packets go up to the kernel until it resolves");
            }
        }
        for addr in self.failing.keys() {
            if !now.contains_key(addr) {
                tracing::info!(backend = %addr, "next hop resolved again");
            }
        }
        self.failing = now;
    }

    /// Take in a notification about a neighbour or link a next hop uses; true when
    /// that changed what the fast path's entries are made of.
    fn note(&mut self, msg: &NetlinkMessage<RouteNetlinkMessage>) -> bool {
        if self.map.is_none() {
            return false;
        }
        let NetlinkPayload::InnerMessage(m) = &msg.payload else {
            return false;
        };
        match m {
            RouteNetlinkMessage::NewNeighbour(n) => match entry_of(n) {
                Some(e) if self.hops.contains(&e.hop) => {
                    let old = match e.mac {
                        Some(mac) => self.neighbours.insert(e.hop, mac),
                        None => self.neighbours.remove(&e.hop),
                    };
                    old != e.mac
                }
                _ => false,
            },
            RouteNetlinkMessage::DelNeighbour(n) => {
                entry_of(n).is_some_and(|e| self.neighbours.remove(&e.hop).is_some())
            }
            RouteNetlinkMessage::NewLink(l) => {
                let index = l.header.index;
                if !self.hops.iter().any(|h| h.ifindex == index) {
                    return false;
                }
                let link = link_of(l);
                self.links.insert(index, link) != Some(link)
            }
            RouteNetlinkMessage::DelLink(l) => self.links.remove(&l.header.index).is_some(),
            _ => false,
        }
    }

    /// Write the backend ids' next hops, as now known, into the fast path's map.
    fn write_hops(&mut self) {
        let Some(table) = &mut self.map else {
            return;
        };
        let want = nexthop::desired(&self.ids, &self.routes, &self.neighbours, &self.links);
        let unresolved: BTreeSet<IpAddr> = self
            .ids
            .iter()
            .filter(|(id, _)| !want.contains_key(id))
            .map(|(_, addr)| *addr)
            .collect();
        self.unresolved.send_if_modified(|u| {
            let changed = u.as_ref() != Some(&unresolved);
            *u = Some(unresolved);
            changed
        });
        match table.sync(&want) {
            Ok(0) => {}
            Ok(n) => {
                tracing::debug!(
                    written = n,
                    valid = want.len(),
                    backends = self.ids.len(),
                    "next hops written to the fast path"
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "writing next hops to the fast path (packets use the kernel's FIB lookup meanwhile)");
            }
        }
    }

    async fn links(&self) -> Result<BTreeMap<u32, nexthop::Link>, NeighError> {
        let mut dump = self.handle.link().get().execute();
        let mut links = BTreeMap::new();
        while let Some(msg) = dump.next().await {
            let msg = msg.map_err(NeighError::Links)?;
            links.insert(msg.header.index, link_of(&msg));
        }
        Ok(links)
    }

    async fn route(&self, dst: IpAddr) -> Result<nexthop::Route, NeighError> {
        let len = if dst.is_ipv4() { 32 } else { 128 };
        let msg = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst, len)
            .map_err(|_| NeighError::NoRoute { dst })?
            .build();
        let mut answers = self.handle.route().get(msg).execute();
        match answers.next().await {
            Some(Ok(route)) => route_of(dst, &route),
            Some(Err(source)) => Err(NeighError::Route { dst, source }),
            None => Err(NeighError::NoRoute { dst }),
        }
    }

    async fn table(&self) -> Result<BTreeMap<NextHop, Entry>, NeighError> {
        let mut dump = self.handle.neighbours().get().execute();
        let mut table = BTreeMap::new();
        while let Some(msg) = dump.next().await {
            let msg = msg.map_err(NeighError::Dump)?;
            if let Some(e) = entry_of(&msg) {
                table.insert(e.hop, e);
            }
        }
        Ok(table)
    }

    async fn create(&self, hop: NextHop) -> Result<(), NeighError> {
        let mut req = self
            .handle
            .neighbours()
            .add(hop.ifindex, hop.address)
            .replace();
        *req.message_mut() = managed_entry(hop);
        req.execute()
            .await
            .map_err(|source| NeighError::Add { hop, source })
    }

    async fn remove(&mut self, hop: NextHop) {
        match self.handle.neighbours().del(entry_key(hop)).execute().await {
            Ok(()) => {
                tracing::info!(next_hop = %hop.address, dev = %ifname(hop.ifindex), "removed the managed neighbour (no backend needs it)");
            }
            Err(source) => {
                let e = NeighError::Del { hop, source };
                tracing::warn!(error = %e, "removing a managed neighbour");
            }
        }
        self.added.remove(&hop);
    }

    /// Remove every entry this keeper made that is still ours.
    async fn clear(&mut self) {
        let table = match self.table().await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "cannot remove the managed neighbours");
                return;
            }
        };
        let p = plan(&BTreeSet::new(), &table, &self.added);
        for hop in p.remove {
            self.remove(hop).await;
        }
        self.added.clear();
    }
}

async fn next_message(monitor: &mut Option<Monitor>) -> Option<Notification> {
    match monitor {
        Some(m) => m.messages.next().await,
        None => std::future::pending().await,
    }
}

/// Whether the backend ids changed (false: their publisher is gone); pending forever
/// without a next-hop map.
async fn ids_changed(ids: &mut Option<watch::Receiver<BTreeMap<u32, IpAddr>>>) -> bool {
    match ids {
        Some(rx) => rx.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use rtnetlink::{
        packet_core::{Emitable as _, NetlinkHeader},
        packet_route::route::RouteHeader,
    };

    use super::*;

    fn v4(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn hop(a: &str, ifindex: u32) -> NextHop {
        NextHop {
            address: v4(a),
            ifindex,
        }
    }

    fn route(kind: RouteType, attributes: Vec<RouteAttribute>) -> RouteMessage {
        let mut r = RouteMessage::default();
        r.header.kind = kind;
        r.header.address_family = AddressFamily::Inet;
        r.header.table = RouteHeader::RT_TABLE_MAIN;
        r.attributes = attributes;
        r
    }

    #[test]
    fn an_on_link_destination_is_its_own_next_hop() {
        let dst = v4("198.18.1.11");
        let r = route(
            RouteType::Unicast,
            vec![
                RouteAttribute::Destination(RouteAddress::Inet(Ipv4Addr::new(198, 18, 1, 11))),
                RouteAttribute::Oif(3),
            ],
        );
        assert_eq!(next_hop_of(dst, &r).unwrap(), hop("198.18.1.11", 3));
    }

    #[test]
    fn a_routed_destination_goes_through_its_gateway() {
        let r = route(
            RouteType::Unicast,
            vec![
                RouteAttribute::Oif(4),
                RouteAttribute::Gateway(RouteAddress::Inet(Ipv4Addr::new(198, 18, 1, 1))),
            ],
        );
        assert_eq!(
            next_hop_of(v4("198.18.2.11"), &r).unwrap(),
            hop("198.18.1.1", 4)
        );
        // An IPv4 route through an IPv6 gateway (RFC 5549): the neighbour is IPv6.
        let gw = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
        let r = route(
            RouteType::Unicast,
            vec![
                RouteAttribute::Via(RouteVia::Inet6(gw)),
                RouteAttribute::Oif(4),
            ],
        );
        assert_eq!(
            next_hop_of(v4("198.18.2.11"), &r).unwrap(),
            NextHop {
                address: IpAddr::V6(gw),
                ifindex: 4
            }
        );
    }

    #[test]
    fn local_unreachable_and_interfaceless_routes_are_errors() {
        let dst = v4("198.18.1.10");
        let local = route(RouteType::Local, vec![RouteAttribute::Oif(1)]);
        assert!(matches!(
            next_hop_of(dst, &local),
            Err(NeighError::NotUnicast {
                kind: RouteType::Local,
                ..
            })
        ));
        let unreachable = route(RouteType::Unreachable, vec![]);
        assert!(matches!(
            next_hop_of(dst, &unreachable),
            Err(NeighError::NotUnicast { .. })
        ));
        let no_oif = route(RouteType::Unicast, vec![]);
        assert!(matches!(
            next_hop_of(dst, &no_oif),
            Err(NeighError::NoInterface { .. })
        ));
    }

    /// The bytes `strace ip neigh replace 198.18.77.2 dev v0 managed extern_learn` showed
    /// iproute2 6.1 sending (ifindex 3 here), followed by our protocol tag.
    #[test]
    fn a_managed_entry_is_what_iproute2_sends_plus_our_protocol() {
        let msg = managed_entry(hop("198.18.77.2", 3));
        let mut buf = vec![0; msg.buffer_len()];
        msg.emit(&mut buf);
        #[rustfmt::skip]
        let expected = [
            2, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0x10, 0,   // ndmsg: AF_INET, ifindex, NUD_NONE, NTF_EXT_LEARNED
            8, 0, 1, 0, 198, 18, 77, 2,               // NDA_DST
            8, 0, 15, 0, 1, 0, 0, 0,                  // NDA_FLAGS_EXT = NTF_EXT_MANAGED
            5, 0, 12, 0, PROTOCOL, 0, 0, 0,           // NDA_PROTOCOL
        ];
        assert_eq!(buf, expected);
        // And we read back what we write.
        let e = entry_of(&msg).unwrap();
        assert!(e.managed && e.ours && !e.fixed && e.usable());
    }

    #[test]
    fn entries_tell_managed_ours_and_fixed_apart() {
        let mut learnt = entry_key(hop("198.18.1.11", 3));
        learnt.header.state = NeighbourState::Reachable;
        let e = entry_of(&learnt).unwrap();
        assert_eq!(e.hop, hop("198.18.1.11", 3));
        assert!(!e.managed && !e.ours && !e.fixed && !e.usable());

        let mut fixed = entry_key(hop("198.18.1.12", 3));
        fixed.header.state = NeighbourState::Permanent;
        let e = entry_of(&fixed).unwrap();
        assert!(e.fixed && e.usable() && !e.ours);

        let mut theirs = managed_entry(hop("198.18.1.13", 3));
        theirs
            .attributes
            .retain(|a| !matches!(a, NeighbourAttribute::Protocol(_)));
        let e = entry_of(&theirs).unwrap();
        assert!(e.managed && !e.ours && e.usable());

        // A bridge FDB entry has no IP destination.
        let mut fdb = NeighbourMessage::default();
        fdb.header.family = AddressFamily::Bridge;
        fdb.attributes = vec![NeighbourAttribute::LinkLayerAddress(vec![0; 6])];
        assert_eq!(entry_of(&fdb), None);
    }

    /// What the fast path's next-hop entries are made of: the MAC of a neighbour entry
    /// only while it is NUD_VALID, a route's MTU metric, a link's MAC, MTU and state.
    #[test]
    fn resolved_entries_carry_their_mac_routes_their_mtu_links_theirs() {
        let mac = vec![2, 0, 0, 0, 0, 0x11];
        let mut m = entry_key(hop("198.18.1.11", 3));
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.clone()));
        for (state, resolved) in [
            (NeighbourState::Reachable, true),
            (NeighbourState::Stale, true),
            (NeighbourState::Delay, true),
            (NeighbourState::Probe, true),
            (NeighbourState::Permanent, true),
            (NeighbourState::Noarp, true),
            (NeighbourState::Incomplete, false),
            (NeighbourState::Failed, false),
            (NeighbourState::None, false),
        ] {
            m.header.state = state;
            assert_eq!(
                entry_of(&m).unwrap().mac,
                resolved.then_some([2, 0, 0, 0, 0, 0x11]),
                "{state:?}"
            );
        }
        let r = route(
            RouteType::Unicast,
            vec![
                RouteAttribute::Oif(4),
                RouteAttribute::Metrics(vec![RouteMetric::Mtu(1400)]),
            ],
        );
        let got = route_of(v4("198.18.2.11"), &r).unwrap();
        assert_eq!((got.hop, got.mtu), (hop("198.18.2.11", 4), Some(1400)));
        let mut l = LinkMessage::default();
        l.header.index = 4;
        l.header.flags = LinkFlags::Up;
        l.attributes = vec![LinkAttribute::Address(mac), LinkAttribute::Mtu(9000)];
        assert_eq!(
            link_of(&l),
            nexthop::Link {
                mac: Some([2, 0, 0, 0, 0, 0x11]),
                mtu: 9000,
                up: true
            }
        );
        l.header.flags = LinkFlags::empty();
        assert!(!link_of(&l).up);
    }

    fn table(entries: &[NeighbourMessage]) -> BTreeMap<NextHop, Entry> {
        entries
            .iter()
            .filter_map(entry_of)
            .map(|e| (e.hop, e))
            .collect()
    }

    fn set(hops: &[NextHop]) -> BTreeSet<NextHop> {
        hops.iter().copied().collect()
    }

    #[test]
    fn missing_and_unusable_entries_are_created() {
        let a = hop("198.18.1.11", 3);
        let b = hop("198.18.1.12", 3);
        let mut learnt = entry_key(b);
        learnt.header.state = NeighbourState::Stale;
        let p = plan(&set(&[a, b]), &table(&[learnt]), &BTreeSet::new());
        assert_eq!(
            p,
            Plan {
                create: vec![a, b],
                ..Plan::default()
            }
        );
    }

    #[test]
    fn our_entries_are_kept_adopted_or_removed_and_others_are_left_alone() {
        let kept = hop("198.18.1.11", 3);
        let left_by_earlier_agent = hop("198.18.1.12", 3);
        let stale = hop("198.18.1.13", 3);
        let static_one = hop("198.18.1.14", 3);
        let taken_over = hop("198.18.1.15", 3);
        let vanished = hop("198.18.1.16", 3);
        let mut permanent = entry_key(static_one);
        permanent.header.state = NeighbourState::Permanent;
        let mut replaced = entry_key(taken_over);
        replaced.header.state = NeighbourState::Permanent;
        let t = table(&[
            managed_entry(kept),
            managed_entry(left_by_earlier_agent),
            managed_entry(stale),
            permanent,
            replaced,
        ]);
        let added = set(&[kept, stale, taken_over, vanished]);
        let wanted = set(&[kept, left_by_earlier_agent, static_one, taken_over]);
        let p = plan(&wanted, &t, &added);
        assert_eq!(
            p,
            Plan {
                create: vec![],
                adopt: vec![left_by_earlier_agent],
                remove: vec![stale],
                forget: vec![taken_over, vanished],
            }
        );
        // Clearing removes only what is still ours.
        let p = plan(&BTreeSet::new(), &t, &added);
        assert_eq!(p.remove, vec![kept, stale]);
        assert_eq!(p.forget, vec![taken_over, vanished]);
    }

    fn note(m: RouteNetlinkMessage) -> NetlinkMessage<RouteNetlinkMessage> {
        NetlinkMessage::from(m)
    }

    #[test]
    fn route_changes_and_lost_or_spoilt_entries_call_for_a_pass() {
        let ours = hop("198.18.1.11", 3);
        let other = hop("198.18.1.99", 3);
        let hops = set(&[ours]);
        assert!(calls_for_pass(
            &note(RouteNetlinkMessage::NewRoute(RouteMessage::default())),
            &hops
        ));
        assert!(calls_for_pass(
            &note(RouteNetlinkMessage::DelRoute(RouteMessage::default())),
            &hops
        ));
        assert!(calls_for_pass(
            &note(RouteNetlinkMessage::DelNeighbour(entry_key(ours))),
            &hops
        ));
        assert!(!calls_for_pass(
            &note(RouteNetlinkMessage::DelNeighbour(entry_key(other))),
            &hops
        ));
        // Our own entry changing state (probing, resolved) is no news.
        let mut resolved = managed_entry(ours);
        resolved.header.state = NeighbourState::Reachable;
        assert!(!calls_for_pass(
            &note(RouteNetlinkMessage::NewNeighbour(resolved)),
            &hops
        ));
        // Someone replaced it with an ordinary entry the kernel may let go.
        let mut plain = entry_key(ours);
        plain.header.state = NeighbourState::Reachable;
        assert!(calls_for_pass(
            &note(RouteNetlinkMessage::NewNeighbour(plain)),
            &hops
        ));
        let overrun =
            NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::Overrun(vec![]));
        assert!(calls_for_pass(&overrun, &hops));
    }
}
