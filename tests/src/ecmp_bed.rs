//! The several-node test bed (issue 10, item 4): LB nodes behind a router that spreads
//! flows over them by ECMP, routes learnt over BGP with BFD from each node's own BIRD 2,
//! which announces what the node's agent writes into its include file.
//!
//! ```text
//!  client 198.18.0.2/24 ── eth0 ═ <p>-cl 198.18.0.1 ┐ router: forwarding, 5-tuple ECMP hash,
//!   (net.core.txrehash=0)                            │ BIRD 2 AS 65000, BGP + BFD (100 ms x 3)
//!                                                    │ to every LB node, kernel: merge paths on
//!                              <p>-br 198.18.1.1/24 ─┤
//!  lb1  198.18.1.21 ── eth0 ═ <p>-lb1 (XDP_PASS) ────┤ LB nodes: lb-agent (XDP) + BIRD 2
//!  lb2  198.18.1.22 ── eth0 ═ <p>-lb2 (XDP_PASS) ────┤   AS 65001, its own control socket
//!  ...                                               │
//!  be1  198.18.1.11 ── eth0 ═ <p>-be1 ───────────────┤ backends: decap, VIP on lo,
//!  be2  198.18.1.12 ── eth0 ═ <p>-be2 ───────────────┤   echo server on :80
//!  be3  198.18.1.13 ── eth0 ═ <p>-be3 ───────────────┘
//!                             <p>-sbr 198.18.9.254/24 ── st1 198.18.9.1, st2 .2, ...
//!                                                        (the store network, see below)
//! ```
//!
//! The LB nodes' bridge ports do not flood unknown unicast (`flood off`): a real NIC
//! drops frames for other MACs before XDP sees them, a veth does not, so without it a
//! dead node's frames (its MAC no longer in the bridge's FDB) would reach the other
//! nodes' XDP and be served before the router withdrew anything (measured here).
//!
//! The server LAN has an MTU of [`LAN_MTU`] (1600): encapsulation adds 20 bytes to
//! the client's full-size packets. The agents' `dataplane.mtu` says so; at 1500 they
//! would answer full-size DF packets with ICMP "fragmentation needed" (the client then
//! sends 1480-byte packets: tests/tests/integration/e2e_pmtu.rs shows that path).
//!
//! The router's ECMP hash is a true 5-tuple hash (`fib_multipath_hash_policy = 3`,
//! fields `0x37`), and the client keeps its sockets' hash (`net.core.txrehash = 0`), so
//! a flow stays on one LB node while the set of nodes does not change (DESIGN.md, ECMP
//! pitfall). The router's kernel routes are what its BIRD exports (`merge paths on`:
//! one multipath route per VIP); [`EcmpBed::nexthops`] reads them.
//!
//! Every node runs the same services (the same backends in the same order), so their
//! Maglev rings are equal and a flow that moves between nodes lands on the same backend.
//! [`EcmpBed::node_config`] is that config plus the node's own `source_ipv4` and `[bgp]`.
//!
//! **The store network** (a hook for the shared state, issue 10 item 2): with
//! [`EcmpOptions::store_hosts`] = N the bed also makes namespaces `st1..stN` on a second
//! bridge of the router, `198.18.9.<i>/24` (the addresses DESIGN.md's `[cluster] etcd`
//! example uses), default route via the router's `198.18.9.254`, so every LB node
//! reaches them through the router. [`EcmpBed::start_etcd`] runs a three-member etcd
//! cluster on `st1..st3` ([`crate::etcd::EtcdCluster`], data under [`EcmpBed::run_dir`]);
//! from then on [`EcmpBed::node_config`] gives every node `[cluster]` pointing at it
//! (node = its name, prefix [`CLUSTER_PREFIX`]), so the nodes share one desired state.
//!
//! Teardown (drop, also while a panic unwinds): agents stopped, every fast path and
//! decap detached, BIRDs, echo servers and etcd members stopped, the router ports' XDP_PASS detached,
//! then the namespaces, the bpffs and the scratch directory removed.

use std::{
    collections::BTreeSet,
    fs,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, ensure};
use aya::Ebpf;
use lb_agent::api::types::{ServiceList, Stats};
use serde::de::DeserializeOwned;

use crate::{
    bird::{self, Bird},
    cluster_bed::{ClusterSection, Node},
    config::{BackendConfig, LbConfig, ServiceConfig},
    etcd::EtcdCluster,
    http,
    netns::{self, ChildGuard, NetnsGuard},
    stream::{EchoServer, ProbeResult, Probes, StreamOptions, StreamReport, Streams},
    topology::{
        BACKEND_ADDRS, CLIENT_ADDR, Host, PREFIX_LEN, ROUTER_CLIENT_ADDR, ROUTER_LAN_ADDR, VIP,
        VIP_PORT, agent_binary, attach_xdp_pass, decap_attach, detach_all, spawn_agent, strip_ansi,
        sysctl,
    },
};

/// LB node `i`'s address (i from 0): 198.18.1.21, .22, ...
pub fn node_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1, 21 + u8::try_from(i).expect("few nodes"))
}
/// The router's AS.
pub const ROUTER_AS: u32 = 65000;
/// The LB nodes' AS (one AS, so that their routes merge into one ECMP route).
pub const NODE_AS: u32 = 65001;
/// The store network (DESIGN.md's `[cluster] etcd` addresses are in it).
pub const STORE_NET: &str = "198.18.9.0/24";
/// The router's address on the store network.
pub const ROUTER_STORE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 9, 254);
/// The agents' API address, inside each LB node's namespace.
pub const API_LISTEN: &str = crate::cluster_bed::API;
/// MTU of the server LAN (bridge, LB nodes, backends): room for the IPIP header on
/// top of a full 1500-byte packet from the client, as a real LB-to-backend network
/// provides (jumbo frames). With 1500 here, a moved flow's retransmissions (full-size
/// segments after a stall) no longer fit once encapsulated and are dropped as
/// `too_big` (measured here: the connections hung).
pub const LAN_MTU: u32 = 1600;
/// `[cluster] prefix` of the nodes once [`EcmpBed::start_etcd`] ran.
pub const CLUSTER_PREFIX: &str = "/xdplb";
/// Most LB nodes a bed makes.
pub const MAX_NODES: usize = 8;
/// BFD on every session: 100 ms x 3 (a dead node is noticed in about 0.3 s).
const BFD: &str = "interval 100 ms; multiplier 3;";
/// BGP timers for a bed that kills and revives nodes: reconnect within seconds
/// (BIRD's defaults wait 5 s before the first connect and up to 300 s after an error).
const BGP_TIMERS: &str = "connect delay time 1; connect retry time 2; error wait time 1, 3; \
                          hold time 9; keepalive time 3;";
/// How long BGP sessions may take to come up.
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(30);

/// `VIP:VIP_PORT`.
pub fn vip_socket() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(VIP, VIP_PORT))
}

/// The next hops of the kernel route to the VIP in namespace `router` (empty without
/// one): `ip route show VIP/32`, a single `via` or one `nexthop via` per path.
pub fn router_nexthops(router: &str) -> anyhow::Result<BTreeSet<Ipv4Addr>> {
    let out = netns::run(&["ip", "-n", router, "route", "show", &format!("{VIP}/32")])?;
    let words: Vec<&str> = out.split_whitespace().collect();
    Ok(words
        .windows(2)
        .filter(|w| w[0] == "via")
        .filter_map(|w| w[1].parse().ok())
        .collect())
}

/// Options of [`EcmpBed::build`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EcmpOptions {
    /// LB nodes (2 or 3 in the tests).
    pub nodes: usize,
    /// Namespaces on the store network (0: none).
    pub store_hosts: usize,
}

impl Default for EcmpOptions {
    fn default() -> Self {
        Self {
            nodes: 2,
            store_hosts: 0,
        }
    }
}

/// One LB node: its namespace, BIRD and agent.
#[derive(Debug)]
pub struct LbNode {
    /// `lb1`, `lb2`, ...
    pub name: String,
    /// Its namespace.
    pub ns: String,
    /// Its address on `eth0`.
    pub addr: Ipv4Addr,
    /// The router-side peer of its `eth0`.
    pub router_port: String,
    /// Its BIRD.
    pub bird: Bird,
    /// The file its agent writes and its BIRD includes.
    pub include_file: PathBuf,
    agent: Option<ChildGuard>,
    agent_log: PathBuf,
    agent_started: bool,
    config_path: PathBuf,
    state_dir: PathBuf,
}

impl LbNode {
    /// The agent's log so far, colour codes removed.
    pub fn agent_log(&self) -> String {
        fs::read(&self.agent_log)
            .map(|b| strip_ansi(&String::from_utf8_lossy(&b)))
            .unwrap_or_default()
    }

    /// Whether its agent runs.
    pub fn agent_running(&mut self) -> bool {
        self.agent
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

/// The running bed; see the [module docs](self). Field order is drop order after
/// [`Drop::drop`]: the guard, which deletes the namespaces, goes last.
#[derive(Debug)]
pub struct EcmpBed {
    /// The LB nodes.
    pub nodes: Vec<LbNode>,
    servers: Vec<EchoServer>,
    /// The router's BIRD.
    pub router_bird: Bird,
    decap_attached: Vec<String>,
    peer_xdp: Vec<Ebpf>,
    /// The client.
    pub client: Host,
    /// The backends.
    pub backends: Vec<Host>,
    /// The store network's hosts (empty unless asked for).
    pub store_hosts: Vec<Host>,
    /// The etcd cluster on the store hosts, once [`EcmpBed::start_etcd`] ran.
    pub etcd: Option<EtcdCluster>,
    /// The router's namespace.
    pub router: String,
    /// The router's bridge (the server LAN).
    pub bridge: String,
    bpffs: PathBuf,
    guard: NetnsGuard,
}

/// `ip -n NS <cmd>` (no name or address here contains whitespace).
fn ip(ns: &str, cmd: &str) -> anyhow::Result<()> {
    let args: Vec<&str> = ["ip", "-n", ns]
        .into_iter()
        .chain(cmd.split_whitespace())
        .collect();
    netns::run(&args).map(drop)
}

/// A veth from the router namespace to `eth0` of `host`, addressed, up, TX checksum
/// offload off on the host side, default route via `gateway`; on `bridge` if given.
fn wire(
    router: &str,
    host: &Host,
    bridge: Option<(&str, u32)>,
    gateway: Ipv4Addr,
) -> anyhow::Result<()> {
    let (port, ns, addr) = (&host.router_port, &host.ns, host.addr);
    ip(
        router,
        &format!("link add {port} type veth peer name eth0 netns {ns}"),
    )?;
    if let Some((br, mtu)) = bridge {
        ip(router, &format!("link set {port} mtu {mtu} master {br}"))?;
        ip(ns, &format!("link set eth0 mtu {mtu}"))?;
    }
    ip(router, &format!("link set {port} up"))?;
    ip(ns, &format!("addr add {addr}/{PREFIX_LEN} dev eth0"))?;
    ip(ns, "link set eth0 up")?;
    // Behave like a wire: full checksums on the host side (DESIGN.md, checksum pitfall).
    netns::exec(ns, &["ethtool", "-K", "eth0", "tx", "off"])?;
    ip(ns, &format!("route add default via {gateway}"))?;
    Ok(())
}

impl EcmpBed {
    /// Builds the bed: namespaces, links, sysctls, the router's BIRD, every node's BIRD
    /// (announcing nothing yet), decap and an echo server on every backend; waits until
    /// every BGP session is established. Agents are started by [`EcmpBed::start_agent`].
    /// On error everything made so far is removed.
    pub fn build(opts: &EcmpOptions) -> anyhow::Result<Self> {
        ensure!(
            (1..=MAX_NODES).contains(&opts.nodes) && opts.store_hosts < 200,
            "1..={MAX_NODES} nodes"
        );
        bird::require()?;
        let mut guard = NetnsGuard::new()?;
        let router = guard.create("rtr")?;
        let bridge = guard.name("br");
        let mut host = |role: &str, port: &str, addr: Ipv4Addr| -> anyhow::Result<Host> {
            Ok(Host {
                role: role.to_owned(),
                ns: guard.create(role)?,
                addr,
                router_port: guard.name(port),
            })
        };
        let client = host("client", "cl", CLIENT_ADDR)?;
        let lb_hosts = (0..opts.nodes)
            .map(|i| {
                let role = format!("lb{}", i + 1);
                host(&role, &role, node_addr(i))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let backends = BACKEND_ADDRS
            .iter()
            .enumerate()
            .map(|(i, &a)| {
                let role = format!("be{}", i + 1);
                host(&role, &role, a)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let store_hosts = (0..opts.store_hosts)
            .map(|i| {
                let role = format!("st{}", i + 1);
                host(&role, &role, Ipv4Addr::new(198, 18, 9, 1 + i as u8))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;

        // The router: forwarding, a true 5-tuple ECMP hash, no redirects.
        sysctl(&router, "net.ipv4.ip_forward", "1")?;
        sysctl(&router, "net.ipv4.fib_multipath_hash_policy", "3")?;
        sysctl(&router, "net.ipv4.fib_multipath_hash_fields", "0x0037")?;
        for scope in ["all", "default"] {
            sysctl(
                &router,
                &format!("net.ipv4.conf.{scope}.send_redirects"),
                "0",
            )?;
        }
        // The client keeps a flow's hash (DESIGN.md, ECMP pitfall).
        sysctl(&client.ns, "net.core.txrehash", "0")?;
        ip(&router, &format!("link add {bridge} type bridge"))?;
        ip(&router, &format!("link set {bridge} mtu {LAN_MTU} up"))?;
        ip(
            &router,
            &format!("addr add {ROUTER_LAN_ADDR}/{PREFIX_LEN} dev {bridge}"),
        )?;
        wire(&router, &client, None, ROUTER_CLIENT_ADDR)?;
        ip(
            &router,
            &format!(
                "addr add {ROUTER_CLIENT_ADDR}/{PREFIX_LEN} dev {}",
                client.router_port
            ),
        )?;
        for h in lb_hosts.iter().chain(&backends) {
            wire(&router, h, Some((&bridge, LAN_MTU)), ROUTER_LAN_ADDR)?;
        }
        if !store_hosts.is_empty() {
            let sbr = guard.name("sbr");
            ip(&router, &format!("link add {sbr} type bridge"))?;
            ip(&router, &format!("link set {sbr} up"))?;
            ip(
                &router,
                &format!("addr add {ROUTER_STORE_ADDR}/24 dev {sbr}"),
            )?;
            for h in &store_hosts {
                wire(&router, h, Some((&sbr, 1500)), ROUTER_STORE_ADDR)?;
            }
        }
        // Backends: the VIP on lo, answered for only by the LB nodes on the wire.
        for b in &backends {
            ip(&b.ns, &format!("addr add {VIP}/32 dev lo"))?;
            for scope in ["all", "eth0"] {
                sysctl(&b.ns, &format!("net.ipv4.conf.{scope}.arp_ignore"), "1")?;
                sysctl(&b.ns, &format!("net.ipv4.conf.{scope}.arp_announce"), "2")?;
            }
        }
        let bpffs = guard.mount_bpffs()?;
        let dir = guard.run_dir().to_path_buf();

        // From here on, `bed` owns what is made: an error drops it (teardown).
        let router_bird = Bird::start(
            &router,
            &dir,
            "rtr",
            &router_bird_config(&bridge, opts.nodes),
        )?;
        let mut bed = Self {
            nodes: Vec::new(),
            servers: Vec::new(),
            router_bird,
            decap_attached: Vec::new(),
            peer_xdp: Vec::new(),
            client,
            backends,
            store_hosts,
            etcd: None,
            router,
            bridge,
            bpffs,
            guard,
        };
        for h in &lb_hosts {
            // Frames the LB sends with XDP_TX need an XDP program on the peer; with it,
            // GRO there would merge segments beyond the MTU (DESIGN.md, pitfalls).
            bed.peer_xdp
                .push(attach_xdp_pass(&bed.router, &h.router_port)?);
            netns::exec(
                &bed.router,
                &["ethtool", "-K", &h.router_port, "gro", "off"],
            )?;
            // A NIC drops unicast frames for other MACs before XDP runs; a veth hands
            // them to XDP. Without this, the bridge floods frames for a dead node's MAC
            // (its port down, its FDB entry gone) to the other nodes, whose XDP would
            // serve them: the router's withdrawal would never matter.
            ip(
                &bed.router,
                &format!("link set dev {} type bridge_slave flood off", h.router_port),
            )?;
        }
        for (i, h) in lb_hosts.into_iter().enumerate() {
            let include_file = dir.join(format!("{}-vips.conf", h.role));
            // `include` of a missing file is a config error: the empty announcement first.
            fs::write(&include_file, lb_agent::bgp::render(&BTreeSet::new()))?;
            let bird = Bird::start(&h.ns, &dir, &h.role, &node_bird_config(i, &include_file))?;
            let state_dir = dir.join(format!("{}-state", h.role));
            fs::create_dir_all(&state_dir)?;
            bed.nodes.push(LbNode {
                name: h.role.clone(),
                agent_log: dir.join(format!("{}-agent.log", h.role)),
                config_path: dir.join(format!("{}.toml", h.role)),
                ns: h.ns,
                addr: h.addr,
                router_port: h.router_port,
                bird,
                include_file,
                agent: None,
                agent_started: false,
                state_dir,
            });
        }
        bed.attach_decap()?;
        for b in &bed.backends {
            bed.servers.push(EchoServer::start(
                &b.ns,
                SocketAddr::from(([0, 0, 0, 0], VIP_PORT)),
                &b.role,
            )?);
        }
        for i in 0..bed.nodes.len() {
            bed.wait_session(i, SESSION_TIMEOUT)?;
        }
        Ok(bed)
    }

    fn attach_decap(&mut self) -> anyhow::Result<()> {
        for b in &self.backends {
            decap_attach(&b.ns, &self.bpffs)
                .with_context(|| format!("attaching decap in {}", b.role))?;
            self.decap_attached.push(b.ns.clone());
        }
        Ok(())
    }

    /// Waits until the router's BGP session with node `i` is established and its BFD
    /// session up.
    pub fn wait_session(&self, i: usize, limit: Duration) -> anyhow::Result<Duration> {
        let name = self.nodes[i].name.clone();
        let addr = self.nodes[i].addr.to_string();
        crate::load::wait_for(
            &format!("BGP and BFD with {name}"),
            limit,
            Duration::from_millis(50),
            || {
                Ok(self.router_bird.established(&name)?
                    && self
                        .router_bird
                        .birdc(&["show", "bfd", "sessions"])?
                        .lines()
                        .any(|l| l.starts_with(&addr) && l.contains(" Up ")))
            },
        )
    }

    /// This run's prefix.
    pub fn prefix(&self) -> &str {
        self.guard.prefix()
    }

    /// Every namespace of the bed.
    pub fn namespaces(&self) -> Vec<String> {
        self.guard.namespaces().to_vec()
    }

    /// The run's scratch directory (configs, logs, states, BIRD sockets).
    pub fn run_dir(&self) -> &Path {
        self.guard.run_dir()
    }

    /// The echo servers, one per backend.
    pub fn servers(&self) -> &[EchoServer] {
        &self.servers
    }

    /// The config every node shares: service `web` on the VIP, the three backends; plus
    /// node `i`'s own `source_ipv4`, API address and `[bgp]` (its BIRD's socket, its
    /// include file, `drain_s = 1`).
    pub fn node_config(&self, i: usize) -> LbConfig {
        let node = &self.nodes[i];
        let service = BACKEND_ADDRS
            .iter()
            .fold(ServiceConfig::new("web", vip_socket()), |s, &a| {
                s.backend(BackendConfig::new(a))
            });
        let config = LbConfig::new("eth0")
            .api_listen(API_LISTEN)
            .source_ipv4(node.addr)
            .sizes(65537, 65536)
            .dataplane("mtu", LAN_MTU)
            .table("bgp", "bird_socket", &node.bird.socket)
            .table("bgp", "include_file", &node.include_file)
            .table("bgp", "drain_s", 1)
            .service(service);
        match &self.etcd {
            Some(etcd) => config.section(
                "cluster",
                ClusterSection {
                    node: node.name.clone(),
                    etcd: etcd.endpoints(),
                    prefix: CLUSTER_PREFIX.to_owned(),
                },
            ),
            None => config,
        }
    }

    /// Starts a three-member etcd cluster on the first three store hosts (the bed must
    /// have been built with `store_hosts >= 3`) and waits until every member is healthy;
    /// returns how long that took. Agents started afterwards get `[cluster]`.
    pub fn start_etcd(&mut self) -> anyhow::Result<Duration> {
        ensure!(
            self.store_hosts.len() >= 3,
            "etcd needs three store hosts, the bed has {}",
            self.store_hosts.len()
        );
        ensure!(self.etcd.is_none(), "etcd already started");
        let t = Instant::now();
        let hosts: Vec<(String, Ipv4Addr)> = self.store_hosts[..3]
            .iter()
            .map(|h| (h.ns.clone(), h.addr))
            .collect();
        let etcd = EtcdCluster::start(&hosts, self.guard.run_dir(), self.guard.prefix())?;
        self.etcd = Some(etcd);
        Ok(t.elapsed())
    }

    /// The etcd cluster ([`EcmpBed::start_etcd`]).
    ///
    /// # Panics
    ///
    /// etcd was not started: a bug in the test.
    pub fn etcd_mut(&mut self) -> &mut EtcdCluster {
        self.etcd.as_mut().expect("EcmpBed::start_etcd first")
    }

    /// Node `i`'s API as a [`Node`] of the cluster helpers.
    pub fn node_api(&self, i: usize) -> Node {
        Node {
            name: self.nodes[i].name.clone(),
            ns: self.nodes[i].ns.clone(),
        }
    }

    /// Writes `config` (state in the node's own directory), runs `lb-agent run` in
    /// node `i`'s namespace and waits for its `agent ready` line. A node whose agent ran
    /// before adopts its pinned fast path (hitless restart).
    pub fn start_agent(&mut self, i: usize, config: &LbConfig) -> anyhow::Result<()> {
        let bin = agent_binary()?;
        let bpffs = self.bpffs.to_string_lossy().into_owned();
        let node = &mut self.nodes[i];
        ensure!(node.agent.is_none(), "{}: agent already running", node.name);
        fs::write(&node.config_path, config.to_toml(&node.state_dir))?;
        let args: Vec<String> = vec![
            bin.to_string_lossy().into_owned(),
            "run".into(),
            "--config".into(),
            node.config_path.to_string_lossy().into_owned(),
            "--iface".into(),
            "eth0".into(),
            "--bpffs".into(),
            bpffs,
        ];
        node.agent_started = true;
        // A revived node's log holds the `agent ready` of its earlier run.
        let from = node.agent_log().len();
        node.agent = Some(spawn_agent(
            &node.ns,
            &args,
            &node.agent_log,
            from,
            Duration::from_secs(20),
        )?);
        Ok(())
    }

    /// Starts every node's agent with [`EcmpBed::node_config`], then waits until the
    /// router has a route to the VIP through every node.
    pub fn start_all(&mut self) -> anyhow::Result<Duration> {
        for i in 0..self.nodes.len() {
            let config = self.node_config(i);
            self.start_agent(i, &config)?;
        }
        let all: BTreeSet<Ipv4Addr> = self.nodes.iter().map(|n| n.addr).collect();
        self.wait_nexthops(&all, SESSION_TIMEOUT)
    }

    /// Node `i` dies: its link goes down (returned: that moment), then its BIRD and its
    /// agent are killed (SIGKILL: no goodbye to the router, no withdrawal). Its fast path
    /// stays pinned, as after a crash.
    pub fn kill_node(&mut self, i: usize) -> anyhow::Result<Instant> {
        let node = &mut self.nodes[i];
        ip(&node.ns, "link set eth0 down")?;
        let t = Instant::now();
        node.bird.kill();
        if let Some(mut a) = node.agent.take() {
            a.kill();
        }
        Ok(t)
    }

    /// Node `i` comes back after [`EcmpBed::kill_node`]: link up (the default route
    /// again), its BIRD restarted, its agent started with `config` (it adopts its pinned
    /// fast path); waits until its BGP session is up again.
    pub fn revive_node(&mut self, i: usize, config: &LbConfig) -> anyhow::Result<()> {
        {
            let node = &mut self.nodes[i];
            ip(&node.ns, "link set eth0 up")?;
            let _ = ip(
                &node.ns,
                &format!("route replace default via {ROUTER_LAN_ADDR}"),
            );
            node.bird.restart()?;
        }
        self.start_agent(i, config)?;
        self.wait_session(i, SESSION_TIMEOUT)?;
        Ok(())
    }

    /// The next hops of the router's kernel route to the VIP (empty without one).
    pub fn nexthops(&self) -> anyhow::Result<BTreeSet<Ipv4Addr>> {
        router_nexthops(&self.router)
    }

    /// Waits until the router's next hops to the VIP are exactly `want`; returns how
    /// long that took (polled every 5 ms).
    pub fn wait_nexthops(
        &self,
        want: &BTreeSet<Ipv4Addr>,
        limit: Duration,
    ) -> anyhow::Result<Duration> {
        crate::load::wait_for(
            &format!("the router's next hops to {VIP} to be {want:?}"),
            limit,
            Duration::from_millis(5),
            || Ok(&self.nexthops()? == want),
        )
        .with_context(|| format!("last seen: {:?}", self.nexthops().unwrap_or_default()))
    }

    /// One call to node `i`'s API: (status, body).
    pub fn api(
        &self,
        i: usize,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> anyhow::Result<(u16, String)> {
        let addr: SocketAddr = API_LISTEN.parse()?;
        let node = &self.nodes[i];
        http::json_call_in(&node.ns, addr, method, path, body, Duration::from_secs(10))
            .with_context(|| format!("{method} {path} on {}'s API", node.name))
    }

    /// A successful answer of node `i`'s API, read as `T`.
    pub fn api_json<T: DeserializeOwned>(
        &self,
        i: usize,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> anyhow::Result<T> {
        let (status, text) = self.api(i, method, path, body)?;
        ensure!(
            (200..300).contains(&status),
            "{method} {path} on {}: status {status}: {text}",
            self.nodes[i].name
        );
        serde_json::from_str(&text).with_context(|| format!("{method} {path}: body {text:?}"))
    }

    /// `ring_digest` of service `web` on node `i`.
    pub fn ring_digest(&self, i: usize) -> anyhow::Result<String> {
        let list: ServiceList = self.api_json(i, "GET", "/api/v1/services", None)?;
        list.services
            .iter()
            .find(|s| s.config.name == "web")
            .and_then(|s| s.ring_digest.clone())
            .ok_or_else(|| anyhow!("{}: service web has no ring_digest", self.nodes[i].name))
    }

    /// Packets of service `web` through node `i`'s fast path so far.
    pub fn vip_packets(&self, i: usize) -> anyhow::Result<u64> {
        let stats: Stats = self.api_json(i, "GET", "/api/v1/stats", None)?;
        Ok(stats
            .traffic
            .and_then(|t| t.services.get("web").map(|s| s.packets))
            .unwrap_or(0))
    }

    /// The bed as an ASCII diagram with this run's names.
    pub fn diagram(&self) -> String {
        let mut s = format!(
            "  [{}] {CLIENT_ADDR} --- [{}] {ROUTER_CLIENT_ADDR} (BIRD AS {ROUTER_AS}, ECMP 5-tuple, BFD)\n",
            self.client.ns, self.router
        );
        s.push_str(&format!(
            "{:>40}bridge {} {ROUTER_LAN_ADDR}/{PREFIX_LEN}\n",
            "", self.bridge
        ));
        for n in &self.nodes {
            s.push_str(&format!(
                "{:>40}+-- [{}] {:<12} lb-agent (XDP) + BIRD AS {NODE_AS}\n",
                "", n.ns, n.addr
            ));
        }
        for b in &self.backends {
            s.push_str(&format!(
                "{:>40}+-- [{}] {:<12} echo :80, VIP {VIP} on lo, decap\n",
                "", b.ns, b.addr
            ));
        }
        s
    }
}

impl Drop for EcmpBed {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut a) = n.agent.take() {
                let _ = a.stop(Duration::from_secs(5));
            }
        }
        let lbs: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.agent_started)
            .map(|n| n.ns.clone())
            .collect();
        let decap: Vec<String> = self.decap_attached.drain(..).collect();
        detach_all(&lbs, &decap, &self.bpffs);
        for n in &mut self.nodes {
            let _ = n.bird.stop();
        }
        let _ = self.router_bird.stop();
        self.servers.clear();
        let progs: Vec<Ebpf> = self.peer_xdp.drain(..).collect();
        let _ = netns::in_netns(&self.router, move || {
            drop(progs);
            Ok(())
        });
    }
}

/// The router's BIRD: BGP with BFD to every node, ECMP into the kernel.
fn router_bird_config(bridge: &str, nodes: usize) -> String {
    let mut s = format!(
        "router id {ROUTER_LAN_ADDR};\n\
         protocol device {{ scan time 1; }}\n\
         protocol kernel {{\n  ipv4 {{ import none; export where source = RTS_BGP; }};\n  merge paths on;\n}}\n\
         protocol bfd {{\n  interface \"{bridge}\" {{ {BFD} }};\n}}\n\
         template bgp lbnode {{\n  local {ROUTER_LAN_ADDR} as {ROUTER_AS};\n  bfd on;\n  {BGP_TIMERS}\n  \
           ipv4 {{ import all; export none; }};\n}}\n"
    );
    for i in 0..nodes {
        s.push_str(&format!(
            "protocol bgp lb{} from lbnode {{ neighbor {} as {NODE_AS}; }}\n",
            i + 1,
            node_addr(i)
        ));
    }
    s
}

/// Node `i`'s BIRD: the agent's include file, BGP with BFD to the router exporting it.
/// What an operator writes (README, "Several LB nodes").
fn node_bird_config(i: usize, include: &Path) -> String {
    let addr = node_addr(i);
    format!(
        "router id {addr};\n\
         protocol device {{ scan time 1; }}\n\
         include \"{}\";\n\
         protocol bfd {{\n  interface \"eth0\" {{ {BFD} }};\n}}\n\
         protocol bgp upstream {{\n  local {addr} as {NODE_AS};\n  neighbor {ROUTER_LAN_ADDR} as {ROUTER_AS};\n  \
           bfd on;\n  {BGP_TIMERS}\n  ipv4 {{ import none; export where proto = \"xdplb_vips\"; }};\n}}\n",
        include.display()
    )
}

// --- the failover scenario (the 5(a) test and `xdplb-demo --cluster`) ---------------

/// Options of [`node_failover`].
#[derive(Clone, Debug)]
pub struct FailoverOptions {
    /// The streams (their `duration` covers the whole scenario).
    pub streams: StreamOptions,
    /// Streaming before the node dies.
    pub before: Duration,
    /// The node that dies.
    pub victim: usize,
    /// Pause between two new-connection probes.
    pub probe_every: Duration,
}

impl Default for FailoverOptions {
    fn default() -> Self {
        Self {
            streams: StreamOptions::default(),
            before: Duration::from_millis(2500),
            victim: 0,
            probe_every: Duration::from_millis(50),
        }
    }
}

/// What [`node_failover`] saw.
#[derive(Clone, Debug)]
pub struct FailoverOutcome {
    /// `ring_digest` of `web` per node, before.
    pub digests: Vec<String>,
    /// VIP packets per node while every node was up (the `before` window).
    pub packets_before: Vec<u64>,
    /// VIP packets per surviving node after the death (the victim: `None`).
    pub packets_after: Vec<Option<u64>>,
    /// From the victim's link going down until the router's route lost it.
    pub withdrawn_after: Duration,
    /// The long-lived connections.
    pub streams: StreamReport,
    /// The new connections made meanwhile.
    pub probes: Vec<ProbeResult>,
    /// Connections whose longest stall began after the death (they went through the
    /// victim and moved).
    pub moved: usize,
}

impl FailoverOutcome {
    /// Everything that contradicts "no connection lost": empty when it held.
    pub fn problems(&self, victim: usize) -> Vec<String> {
        let mut p = Vec::new();
        if self.digests.windows(2).any(|w| w[0] != w[1]) {
            p.push(format!(
                "ring digests differ between nodes: {:?}",
                self.digests
            ));
        }
        for (i, n) in self.packets_before.iter().enumerate() {
            if *n == 0 {
                p.push(format!(
                    "node {} carried no VIP packets before the death",
                    i + 1
                ));
            }
        }
        for (i, n) in self.packets_after.iter().enumerate() {
            if i != victim && *n == Some(0) {
                p.push(format!(
                    "surviving node {} carried nothing after the death",
                    i + 1
                ));
            }
        }
        for r in self.streams.failed() {
            p.push(format!(
                "connection {} (port {:?}, {:?}) failed: {}",
                r.conn,
                r.local_port,
                r.server,
                r.error.as_deref().unwrap_or("")
            ));
        }
        let failed: Vec<&ProbeResult> = self.probes.iter().filter(|r| r.outcome.is_err()).collect();
        if !failed.is_empty() {
            p.push(format!(
                "{} of {} new connections failed, first: {:?}",
                failed.len(),
                self.probes.len(),
                failed[0].outcome
            ));
        }
        if self.probes.is_empty() {
            p.push("no new connection was tried".into());
        }
        if self.moved == 0 {
            p.push("no connection moved: none went through the node that died".into());
        }
        p
    }

    /// The figures, one per line.
    pub fn figures(&self) -> Vec<String> {
        let longest = self.streams.longest_stall();
        let probes_ok = self.probes.iter().filter(|r| r.outcome.is_ok()).count();
        let slowest = self.probes.iter().map(|r| r.took).max().unwrap_or_default();
        vec![
            format!(
                "router withdrew the dead node after {:.0} ms (link down -> kernel route without it)",
                ms(self.withdrawn_after)
            ),
            format!(
                "long-lived connections: {}; {} moved to a surviving node",
                self.streams.summary(),
                self.moved
            ),
            format!(
                "longest stall: {:.0} ms (connection {:?})",
                longest.map_or(0.0, |r| ms(r.longest_stall)),
                longest.map(|r| r.conn)
            ),
            format!(
                "new connections during and after: {probes_ok} of {} succeeded, slowest {:.0} ms",
                self.probes.len(),
                ms(slowest)
            ),
            format!(
                "VIP packets per node before {:?}, after {:?}",
                self.packets_before, self.packets_after
            ),
        ]
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Streams from the client through every node, then node `victim` dies
/// ([`EcmpBed::kill_node`]) while new connections are probed; waits for the streams to
/// end. Every agent must be running and announcing.
pub fn node_failover(bed: &mut EcmpBed, opts: &FailoverOptions) -> anyhow::Result<FailoverOutcome> {
    let n = bed.nodes.len();
    ensure!(
        opts.victim < n && n >= 2,
        "a victim among two or more nodes"
    );
    ensure!(
        opts.streams.duration > opts.before + Duration::from_secs(3),
        "the streams must outlive the death by a few seconds"
    );
    let digests = (0..n)
        .map(|i| bed.ring_digest(i))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let p0 = (0..n)
        .map(|i| bed.vip_packets(i))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let streams = Streams::start(&bed.client.ns, vip_socket(), &opts.streams)?;
    let probes = Probes::start(
        &bed.client.ns,
        vip_socket(),
        opts.probe_every,
        Duration::from_secs(5),
    )?;
    thread::sleep(opts.before);
    let p1 = (0..n)
        .map(|i| bed.vip_packets(i))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let survivors: BTreeSet<Ipv4Addr> = bed
        .nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != opts.victim)
        .map(|(_, nd)| nd.addr)
        .collect();
    let died = bed.kill_node(opts.victim)?;
    let withdrawn = bed.wait_nexthops(&survivors, Duration::from_secs(10));
    let withdrawn_after = match withdrawn {
        Ok(_) => died.elapsed(),
        Err(e) => {
            let _ = probes.finish();
            let _ = streams.finish();
            return Err(e);
        }
    };
    let streams = streams.finish()?;
    let probes = probes.finish()?;
    let packets_after = (0..n)
        .map(|i| {
            if i == opts.victim {
                Ok(None)
            } else {
                Ok(Some(bed.vip_packets(i)?.saturating_sub(p1[i])))
            }
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let moved = streams
        .results
        .iter()
        .filter(|r| {
            r.stall_began
                .is_some_and(|t| t + Duration::from_millis(100) >= died)
                && r.longest_stall > Duration::from_millis(150)
        })
        .count();
    Ok(FailoverOutcome {
        digests,
        packets_before: p1.iter().zip(&p0).map(|(a, b)| a - b).collect(),
        packets_after,
        withdrawn_after,
        streams,
        probes,
        moved,
    })
}
