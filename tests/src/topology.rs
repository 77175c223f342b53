//! The step-1 test bed: a client, a router, a load balancer and three backends, each
//! in its own namespace, wired like a small real network.
//!
//! ```text
//!  client 198.18.0.2/24 ── eth0 ═ <p>-cl 198.18.0.1 ┐ router (forwarding on)
//!                                                    │   198.18.100.0/24 via 198.18.1.10
//!                              <p>-br 198.18.1.1/24 ─┤
//!  lb   198.18.1.10 ── eth0 ═ <p>-lb  (XDP_PASS) ────┤ bridge ports
//!  be1  198.18.1.11 ── eth0 ═ <p>-be1 ───────────────┤   backends: VIP 198.18.100.1/32 on lo,
//!  be2  198.18.1.12 ── eth0 ═ <p>-be2 ───────────────┤   arp_ignore=1, arp_announce=2,
//!  be3  198.18.1.13 ── eth0 ═ <p>-be3 ───────────────┘   default via 198.18.1.1
//! ```
//!
//! Every link is a veth pair made inside the router namespace with its peer created
//! directly in the host's namespace: nothing passes through the root namespace. Per
//! DESIGN.md's measured pitfalls, every host-side veth has TX checksum offload off, and
//! the router-side peer of the LB's veth carries an XDP_PASS program in native mode (so
//! frames the LB sends with XDP_TX are not dropped). A bpffs is mounted at
//! `/run/<prefix>-bpf` for the agents' `--bpffs`. The LB keeps forwarding off.
//!
//! [`Topology::build`] makes the network; [`Topology::attach_decap`] runs
//! `lb-agent decap attach` on the backends; [`Topology::start_agent`] runs
//! `lb-agent run` on the LB and waits for its `agent ready` line. Dropping the
//! topology stops the agent, detaches decap, detaches the XDP_PASS program, then
//! removes the namespaces and the bpffs.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    process::ExitStatus,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf,
    programs::{Xdp, XdpMode},
};
use lb_agent::dataplane::loader::FLOORS_OBJECT;

use crate::{
    config::{BackendConfig, LbConfig, ServiceConfig},
    http::HttpServer,
    netns::{self, ChildGuard, NetnsGuard},
};

/// The client's address.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The router's address on the client link.
pub const ROUTER_CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The router's address on the server LAN (the bridge).
pub const ROUTER_LAN_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
/// The load balancer's address.
pub const LB_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
/// The backends' addresses (be1, be2, be3).
pub const BACKEND_ADDRS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(198, 18, 1, 11),
    Ipv4Addr::new(198, 18, 1, 12),
    Ipv4Addr::new(198, 18, 1, 13),
];
/// The service's virtual IP.
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
/// The service's port.
pub const VIP_PORT: u16 = 80;
/// The VIP network the router sends to the LB.
pub const VIP_NET: &str = "198.18.100.0/24";
/// Prefix length of the client link and the server LAN.
pub const PREFIX_LEN: u8 = 24;
/// Environment variable naming the `lb-agent` binary.
pub const AGENT_BIN_ENV: &str = "XDPLB_AGENT_BIN";
/// The line the agent logs once its XDP program is attached and its maps are filled.
pub const AGENT_READY: &str = "agent ready";

/// `VIP:VIP_PORT`.
pub fn vip_socket() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(VIP, VIP_PORT))
}

/// One host of the topology.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    /// `client`, `lb`, `be1`, ...
    pub role: String,
    /// Its namespace.
    pub ns: String,
    /// Its address on `eth0`.
    pub addr: Ipv4Addr,
    /// The router-side peer of its `eth0`.
    pub router_port: String,
}

/// Options of [`Topology::build_with`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopologyOptions {
    /// MTU of the server LAN (bridge, LB and backend links). Default 1500.
    pub lan_mtu: u32,
    /// Attach the XDP_PASS program on the LB's router-side peer. Default true.
    pub peer_xdp_pass: bool,
}

impl Default for TopologyOptions {
    fn default() -> Self {
        Self {
            lan_mtu: 1500,
            peer_xdp_pass: true,
        }
    }
}

/// Options of [`Topology::start_agent`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentOptions {
    /// `--xdp-mode` (auto | native | skb | off), if set.
    pub xdp_mode: Option<String>,
    /// Further arguments after `run`.
    pub extra_args: Vec<String>,
    /// How long to wait for the `agent ready` line.
    pub ready_timeout: Duration,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            xdp_mode: None,
            extra_args: Vec::new(),
            ready_timeout: Duration::from_secs(20),
        }
    }
}

/// The running test bed. Field order is drop order after [`Drop::drop`]: the guard,
/// which deletes the namespaces, goes last.
#[derive(Debug)]
pub struct Topology {
    agent: Option<ChildGuard>,
    agent_log: PathBuf,
    decap_attached: Vec<String>,
    /// An agent was started (its fast path may outlive it).
    agent_started: bool,
    peer_xdp: Option<Ebpf>,
    /// XDP_PASS programs on the router-side peers of hosts added by [`Topology::add_lan_host`].
    extra_peer_xdp: Vec<Ebpf>,
    /// The client.
    pub client: Host,
    /// The load balancer.
    pub lb: Host,
    /// The backends, be1..be3.
    pub backends: Vec<Host>,
    /// The router's namespace.
    pub router: String,
    /// The router's bridge (the server LAN).
    pub bridge: String,
    bpffs: PathBuf,
    guard: NetnsGuard,
}

impl Topology {
    /// Builds the network with default options.
    pub fn build() -> anyhow::Result<Self> {
        Self::build_with(&TopologyOptions::default())
    }

    /// Builds the network: namespaces, links, addresses, routes, sysctls, offloads,
    /// the bpffs and the XDP_PASS program. On error everything made so far is removed.
    pub fn build_with(opts: &TopologyOptions) -> anyhow::Result<Self> {
        let mut guard = NetnsGuard::new()?;
        let router = guard.create("router")?;
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
        let lb = host("lb", "lb", LB_ADDR)?;
        let backends = BACKEND_ADDRS
            .iter()
            .enumerate()
            .map(|(i, &a)| {
                let role = format!("be{}", i + 1);
                host(&role, &role, a)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;

        // `ip -n NS <cmd>`; no name or address here contains whitespace.
        let ip = |ns: &str, cmd: &str| -> anyhow::Result<()> {
            let args: Vec<&str> = ["ip", "-n", ns]
                .into_iter()
                .chain(cmd.split_whitespace())
                .collect();
            netns::run(&args).map(drop)
        };
        let mtu = opts.lan_mtu;

        // Router: forwarding, the bridge for the server LAN, the route to the VIPs.
        sysctl(&router, "net.ipv4.ip_forward", "1")?;
        ip(&router, &format!("link add {bridge} type bridge"))?;
        ip(&router, &format!("link set {bridge} mtu {mtu} up"))?;
        ip(
            &router,
            &format!("addr add {ROUTER_LAN_ADDR}/{PREFIX_LEN} dev {bridge}"),
        )?;

        // Every host: a veth made in the router namespace, its peer `eth0` in the host's.
        for h in std::iter::once(&client)
            .chain(std::iter::once(&lb))
            .chain(&backends)
        {
            let (port, ns, addr) = (&h.router_port, &h.ns, h.addr);
            let on_lan = h.role != "client";
            ip(
                &router,
                &format!("link add {port} type veth peer name eth0 netns {ns}"),
            )?;
            if on_lan {
                ip(
                    &router,
                    &format!("link set {port} mtu {mtu} master {bridge}"),
                )?;
                ip(ns, &format!("link set eth0 mtu {mtu}"))?;
            }
            ip(&router, &format!("link set {port} up"))?;
            ip(ns, &format!("addr add {addr}/{PREFIX_LEN} dev eth0"))?;
            ip(ns, "link set eth0 up")?;
            // Behave like a wire: full checksums on the host side (DESIGN.md, checksum pitfall).
            netns::exec(ns, &["ethtool", "-K", "eth0", "tx", "off"])?;
            let gateway = if on_lan {
                ROUTER_LAN_ADDR
            } else {
                ROUTER_CLIENT_ADDR
            };
            ip(ns, &format!("route add default via {gateway}"))?;
        }
        let client_port = &client.router_port;
        ip(
            &router,
            &format!("addr add {ROUTER_CLIENT_ADDR}/{PREFIX_LEN} dev {client_port}"),
        )?;
        ip(&router, &format!("route add {VIP_NET} via {LB_ADDR}"))?;

        // Backends: the VIP on lo, answered for only by the LB on the wire.
        for b in &backends {
            ip(&b.ns, &format!("addr add {VIP}/32 dev lo"))?;
            for scope in ["all", "eth0"] {
                sysctl(&b.ns, &format!("net.ipv4.conf.{scope}.arp_ignore"), "1")?;
                sysctl(&b.ns, &format!("net.ipv4.conf.{scope}.arp_announce"), "2")?;
            }
        }

        let bpffs = guard.mount_bpffs()?;
        let agent_log = guard.run_dir().join("agent.log");
        let peer_xdp = if opts.peer_xdp_pass {
            Some(attach_xdp_pass(&router, &lb.router_port)?)
        } else {
            None
        };
        Ok(Self {
            agent: None,
            agent_log,
            decap_attached: Vec::new(),
            agent_started: false,
            peer_xdp,
            extra_peer_xdp: Vec::new(),
            client,
            lb,
            backends,
            router,
            bridge,
            bpffs,
            guard,
        })
    }

    /// Adds a host `role` on the server LAN (a namespace of this run, `eth0` at `addr`
    /// on the bridge, TX checksum offload off, default route via the router), e.g. a
    /// second LB node or an etcd member. With `xdp_pass_peer`, its router-side peer
    /// carries an XDP_PASS program (needed for a host whose XDP program sends with
    /// XDP_TX). Removed with the topology.
    pub fn add_lan_host(
        &mut self,
        role: &str,
        addr: Ipv4Addr,
        xdp_pass_peer: bool,
    ) -> anyhow::Result<Host> {
        let ns = self.guard.create(role)?;
        let port = self.guard.name(role);
        let ip = |ns: &str, cmd: &str| -> anyhow::Result<()> {
            let args: Vec<&str> = ["ip", "-n", ns]
                .into_iter()
                .chain(cmd.split_whitespace())
                .collect();
            netns::run(&args).map(drop)
        };
        let (router, bridge) = (&self.router, &self.bridge);
        ip(
            router,
            &format!("link add {port} type veth peer name eth0 netns {ns}"),
        )?;
        ip(router, &format!("link set {port} master {bridge} up"))?;
        ip(&ns, &format!("addr add {addr}/{PREFIX_LEN} dev eth0"))?;
        ip(&ns, "link set eth0 up")?;
        ip(&ns, "link set lo up")?;
        netns::exec(&ns, &["ethtool", "-K", "eth0", "tx", "off"])?;
        ip(&ns, &format!("route add default via {ROUTER_LAN_ADDR}"))?;
        if xdp_pass_peer {
            self.extra_peer_xdp.push(attach_xdp_pass(router, &port)?);
        }
        Ok(Host {
            role: role.to_owned(),
            ns,
            addr,
            router_port: port,
        })
    }

    /// This run's prefix.
    pub fn prefix(&self) -> &str {
        self.guard.prefix()
    }

    /// Every namespace of the topology.
    pub fn namespaces(&self) -> Vec<String> {
        self.guard.namespaces().to_vec()
    }

    /// The bpffs for `--bpffs`.
    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    /// The run's scratch directory (config, agent log, state).
    pub fn run_dir(&self) -> &Path {
        self.guard.run_dir()
    }

    /// All hosts: client, lb, backends.
    pub fn hosts(&self) -> impl Iterator<Item = &Host> {
        std::iter::once(&self.client)
            .chain(std::iter::once(&self.lb))
            .chain(&self.backends)
    }

    /// The step-1 config: service `web` on the VIP, the three backends with default weights.
    pub fn default_config() -> LbConfig {
        let service = BACKEND_ADDRS
            .iter()
            .fold(ServiceConfig::new("web", vip_socket()), |s, &a| {
                s.backend(BackendConfig::new(a))
            });
        LbConfig::new("eth0")
            .source_ipv4(LB_ADDR)
            .sizes(65537, 65536)
            .service(service)
    }

    /// Starts an [`HttpServer`] on `0.0.0.0:80` in every backend, named after its role.
    pub fn start_http_servers(&self) -> anyhow::Result<Vec<HttpServer>> {
        self.backends
            .iter()
            .map(|b| HttpServer::start(&b.ns, SocketAddr::from(([0, 0, 0, 0], VIP_PORT)), &b.role))
            .collect()
    }

    /// Runs `lb-agent decap attach --iface eth0 --bpffs <bpffs>` in every backend.
    pub fn attach_decap(&mut self) -> anyhow::Result<()> {
        for b in &self.backends {
            decap_attach(&b.ns, &self.bpffs)
                .with_context(|| format!("attaching decap in {}", b.role))?;
            self.decap_attached.push(b.ns.clone());
        }
        Ok(())
    }

    /// Writes `config` (with `state_dir` in the run directory), runs
    /// `lb-agent run --config F --iface eth0 --bpffs B [--xdp-mode M]` in the LB namespace
    /// with its output in the agent log, and waits for the `agent ready` line.
    pub fn start_agent(&mut self, config: &LbConfig, opts: &AgentOptions) -> anyhow::Result<()> {
        if self.agent.is_some() {
            bail!("the agent is already running");
        }
        let state_dir = self.run_dir().join("state");
        fs::create_dir_all(&state_dir)?;
        let config_path = self.run_dir().join("lb.toml");
        fs::write(&config_path, config.to_toml(&state_dir))
            .with_context(|| format!("writing {}", config_path.display()))?;
        let args = self.agent_args(opts)?;
        // After a `stop_agent`, the log holds the previous agent's `agent ready`: wait for
        // a new one.
        let from = self.agent_log_len();
        // From here on there may be a fast path to remove at teardown.
        self.agent_started = true;
        self.agent = Some(spawn_agent(
            &self.lb.ns,
            &args,
            &self.agent_log,
            from,
            opts.ready_timeout,
        )?);
        Ok(())
    }

    /// The length of the agent log as [`spawn_agent`] counts it (colour codes removed).
    fn agent_log_len(&self) -> usize {
        fs::read(&self.agent_log)
            .map(|b| strip_ansi(&String::from_utf8_lossy(&b)).len())
            .unwrap_or(0)
    }

    /// `lb-agent run --config <run dir>/lb.toml --iface eth0 --bpffs B [--xdp-mode M] ...`.
    fn agent_args(&self, opts: &AgentOptions) -> anyhow::Result<Vec<String>> {
        let config_path = self.run_dir().join("lb.toml");
        let mut args: Vec<String> = vec![
            agent_binary()?.to_string_lossy().into_owned(),
            "run".into(),
            "--config".into(),
            config_path.to_string_lossy().into_owned(),
            "--iface".into(),
            "eth0".into(),
            "--bpffs".into(),
            self.bpffs.to_string_lossy().into_owned(),
        ];
        if let Some(mode) = &opts.xdp_mode {
            args.extend(["--xdp-mode".into(), mode.clone()]);
        }
        args.extend(opts.extra_args.iter().cloned());
        Ok(args)
    }

    /// Starts a new agent (the same command line as [`Topology::start_agent`], the
    /// config file as it is now) while one runs: the new one takes the running one's
    /// listening sockets over (`<state_dir>/handoff.sock`), the old one drains and exits
    /// by itself. Waits for the new agent's `agent ready` and then up to `exit_timeout`
    /// for the old one to exit; returns the old one's exit status.
    pub fn take_over_agent(
        &mut self,
        opts: &AgentOptions,
        exit_timeout: Duration,
    ) -> anyhow::Result<ExitStatus> {
        let from = self.agent_log_len();
        let mut old = self.agent.take().context("no agent is running")?;
        let args = self.agent_args(opts)?;
        let new = spawn_agent(
            &self.lb.ns,
            &args,
            &self.agent_log,
            from,
            opts.ready_timeout,
        );
        let new = match new {
            Ok(n) => n,
            Err(e) => {
                self.agent = Some(old);
                return Err(e);
            }
        };
        self.agent = Some(new);
        let deadline = Instant::now() + exit_timeout;
        loop {
            if let Some(status) = old.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let status = old.stop(Duration::from_secs(3))?;
                bail!(
                    "the old agent did not exit within {exit_timeout:?} after the take-over (stopped: {status})"
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the agent is running (started and not exited).
    pub fn agent_running(&mut self) -> bool {
        self.agent
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Stops the agent (SIGTERM, then SIGKILL after 5 s); `None` if none was running.
    pub fn stop_agent(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        self.agent
            .take()
            .map(|mut c| c.stop(Duration::from_secs(5)))
            .transpose()
    }

    /// The agent's log so far, terminal colour codes removed (empty before it starts).
    pub fn agent_log(&self) -> String {
        fs::read(&self.agent_log)
            .map(|b| strip_ansi(&String::from_utf8_lossy(&b)))
            .unwrap_or_default()
    }

    /// The last `lines` lines of the agent's log.
    pub fn agent_log_tail(&self, lines: usize) -> String {
        let log = self.agent_log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The topology as an ASCII diagram with this run's names.
    pub fn diagram(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "  [{}] {}/{} --- {} [{}] {}/{} (forwarding, {} via {})\n",
            self.client.ns,
            self.client.addr,
            PREFIX_LEN,
            self.client.router_port,
            self.router,
            ROUTER_CLIENT_ADDR,
            PREFIX_LEN,
            VIP_NET,
            LB_ADDR
        ));
        s.push_str(&format!("{:>w$}|\n", "", w = 40));
        s.push_str(&format!(
            "{:>w$}bridge {} {}/{}\n",
            "",
            self.bridge,
            ROUTER_LAN_ADDR,
            PREFIX_LEN,
            w = 40
        ));
        for h in std::iter::once(&self.lb).chain(&self.backends) {
            let what = if h.role == "lb" {
                "lb-agent (XDP), peer has XDP_PASS".to_owned()
            } else {
                format!("HTTP :80, VIP {VIP}/32 on lo, decap")
            };
            s.push_str(&format!(
                "{:>w$}+-- {:<12} {:<16} {:<12} {what}\n",
                "",
                h.router_port,
                format!("[{}]", h.ns),
                h.addr,
                w = 40
            ));
        }
        s
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = self.stop_agent();
        let lbs = if self.agent_started {
            vec![self.lb.ns.clone()]
        } else {
            Vec::new()
        };
        let decap: Vec<String> = self.decap_attached.drain(..).collect();
        detach_all(&lbs, &decap, &self.bpffs);
        // Detach inside the router namespace: should aya fall back to netlink, the
        // interface index must be looked up there, not in the caller's namespace.
        if let Some(ebpf) = self.peer_xdp.take() {
            let _ = netns::in_netns(&self.router, move || {
                drop(ebpf);
                Ok(())
            });
        }
        let extra = std::mem::take(&mut self.extra_peer_xdp);
        let _ = netns::in_netns(&self.router, move || {
            drop(extra);
            Ok(())
        });
    }
}

/// `lb-agent decap attach --iface eth0 --bpffs BPFFS` inside `ns`.
pub fn decap_attach(ns: &str, bpffs: &Path) -> anyhow::Result<()> {
    let bin = agent_binary()?;
    let (bin, bpffs) = (bin.to_string_lossy(), bpffs.to_string_lossy());
    let args = [
        bin.as_ref(),
        "decap",
        "attach",
        "--iface",
        "eth0",
        "--bpffs",
        bpffs.as_ref(),
    ];
    netns::exec(ns, &args).map(drop)
}

/// Teardown of what agents leave pinned (they keep their fast path when they stop:
/// hitless restart): `lb-agent detach` in every namespace of `lbs`, `lb-agent decap
/// detach` in every one of `decap`, the way an operator would. Failures are printed,
/// not returned (this runs while tearing down).
pub fn detach_all(lbs: &[String], decap: &[String], bpffs: &Path) {
    let Ok(bin) = agent_binary() else { return };
    let (bin, bpffs) = (bin.to_string_lossy(), bpffs.to_string_lossy());
    let runs = lbs
        .iter()
        .map(|ns| (ns, vec!["detach"]))
        .chain(decap.iter().map(|ns| (ns, vec!["decap", "detach"])));
    for (ns, what) in runs {
        let mut args = vec![bin.as_ref()];
        args.extend(what);
        args.extend(["--iface", "eth0", "--bpffs", bpffs.as_ref()]);
        if let Err(e) = netns::exec(ns, &args) {
            eprintln!("warning (ignored while tearing down): {e:#}");
        }
    }
}

/// Starts `args` (an `lb-agent run` command line) inside `ns` with its output appended
/// to `log`, and waits until the log has an `agent ready` line after its first `from`
/// bytes (colour codes removed). The child is stopped when it fails to get there
/// within `timeout`.
pub fn spawn_agent(
    ns: &str,
    args: &[String],
    log: &Path,
    from: usize,
    timeout: Duration,
) -> anyhow::Result<ChildGuard> {
    let read = || {
        fs::read(log)
            .map(|b| strip_ansi(&String::from_utf8_lossy(&b)))
            .unwrap_or_default()
    };
    let mut child = netns::spawn(ns, args, Some(log))?;
    let deadline = Instant::now() + timeout;
    loop {
        if read().get(from..).is_some_and(|l| l.contains(AGENT_READY)) {
            return Ok(child);
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "`{}` exited ({status}) before `{AGENT_READY}`; its log:\n{}",
                child.command(),
                read()
            );
        }
        if Instant::now() > deadline {
            let _ = child.stop(Duration::from_secs(3));
            bail!(
                "`{}` did not log `{AGENT_READY}` within {timeout:?}; its log:\n{}",
                child.command(),
                read()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// `s` without ANSI escape sequences (`ESC [ ... final`), as a log file may carry them.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if ('\u{40}'..='\u{7e}').contains(&c) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Writes a sysctl of namespace `ns` (through `/proc/sys` from a thread inside it).
pub fn sysctl(ns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
    let value = value.to_owned();
    netns::in_netns(ns, move || {
        fs::write(&path, &value).with_context(|| format!("writing {}", path.display()))
    })
    .with_context(|| format!("sysctl {key} in {ns}"))
}

/// The `lb-agent` binary: `$XDPLB_AGENT_BIN`, else `<workspace>/target/release/lb-agent`.
pub fn agent_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os(AGENT_BIN_ENV) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(anyhow!("{AGENT_BIN_ENV}={} is not a file", p.display()))
        };
    }
    let fallback = target_dir().join("release/lb-agent");
    if fallback.is_file() {
        return Ok(fallback);
    }
    bail!(
        "no lb-agent binary: set {AGENT_BIN_ENV} to it (for example after `cargo build --release -p lb-agent`); \
         {} does not exist",
        fallback.display()
    )
}

/// The workspace's target directory (`$CARGO_TARGET_DIR`, else `<workspace>/target`).
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
            manifest.parent().unwrap_or(manifest).join("target")
        })
}

/// Loads `floor_pass` from the agent's embedded benchmark-floors object and attaches it
/// in native mode to `iface` of namespace `ns`.
/// The program stays attached while the returned [`Ebpf`] lives.
pub fn attach_xdp_pass(ns: &str, iface: &str) -> anyhow::Result<Ebpf> {
    let name = iface.to_owned();
    netns::in_netns(ns, move || {
        let mut ebpf = Ebpf::load(FLOORS_OBJECT).context("loading the floors object")?;
        let prog: &mut Xdp = ebpf
            .program_mut("floor_pass")
            .ok_or_else(|| anyhow!("no program floor_pass in the floors object"))?
            .try_into()?;
        prog.load().context("loading floor_pass")?;
        prog.attach(&name, XdpMode::Driver)
            .with_context(|| format!("attaching floor_pass to {name} in native mode"))?;
        Ok(ebpf)
    })
    .with_context(|| format!("XDP_PASS on {ns}/{iface}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ansi_codes_are_stripped() {
        let colored = "\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m agent ready \u{1b}[3mservices\u{1b}[0m=1";
        assert_eq!(strip_ansi(colored), "2026  INFO agent ready services=1");
        assert_eq!(strip_ansi("plain"), "plain");
    }
}
