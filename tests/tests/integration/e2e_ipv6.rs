//! IPv6 end to end, in namespaces (issue 11, item 8): the step-1 bed (client, router,
//! LB, three backends) gets IPv6 addresses from fd00:18::/32 beside its IPv4 ones, and
//! real TCP connections (HTTP GETs) from an IPv6 client go through the XDP fast path:
//! - to an IPv6 VIP with IPv6 backends (IPv6-in-IPv6), spread over both;
//! - to an IPv6 VIP with an IPv4 backend (IPv6-in-IPv4);
//! - from the IPv4 client to an IPv4 VIP with an IPv6 backend (IPv4-in-IPv6).
//!
//! Each backend decapsulates with `lb-agent decap attach` (which registers the host's
//! IPv6 addresses itself) and answers the client directly (DSR) from the VIP on its
//! `lo`. The agent's stats must name each IPv6 backend, and its HTTP health
//! checks over IPv6 must find the IPv6 backends up (`xdplb_backend_up ... 1`).
//!
//! IPv6 in namespaces (DESIGN.md): addresses are added with `nodad` (no 2 s of
//! "tentative"); the router forwards IPv6 and routes the VIP prefix to the LB.
//!
//! Needs root and the release agent (`XDPLB_AGENT_BIN`, else `target/release/lb-agent`).

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use anyhow::{Context as _, ensure};
use xdplb_tests::{
    config::{BackendConfig, LbConfig, ServiceConfig},
    http::{self, HttpServer},
    netns, require_privileges,
    topology::{AgentOptions, BACKEND_ADDRS, LB_ADDR, Topology, VIP, sysctl},
};

pub(crate) const fn v6(net: u16, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x18, net, 0, 0, 0, 0, host)
}
const CLIENT6: Ipv6Addr = v6(0, 2);
const ROUTER_CLIENT6: Ipv6Addr = v6(0, 1);
const ROUTER_LAN6: Ipv6Addr = v6(1, 1);
pub(crate) const LB6: Ipv6Addr = v6(1, 0x10);
pub(crate) const BACKENDS6: [Ipv6Addr; 3] = [v6(1, 0x11), v6(1, 0x12), v6(1, 0x13)];
/// VIP of `web6` (IPv6 backends be1, be2) and of `six4` (IPv4 backend be3).
pub(crate) const VIP6_WEB: Ipv6Addr = v6(0x100, 1);
pub(crate) const VIP6_SIX4: Ipv6Addr = v6(0x100, 2);
const VIP6_NET: &str = "fd00:18:100::/64";
const API: &str = "127.0.0.1:9090";

fn ip(ns: &str, cmd: &str) -> anyhow::Result<()> {
    let args: Vec<&str> = ["ip", "-n", ns]
        .into_iter()
        .chain(cmd.split_whitespace())
        .collect();
    netns::run(&args).map(drop)
}

/// IPv6 on the step-1 bed: addresses on every `eth0` and the router's ports, default
/// routes, forwarding on the router and the VIP prefix routed to the LB, the IPv6 VIPs
/// on the backends' `lo`.
pub(crate) fn add_ipv6(topo: &Topology) -> anyhow::Result<()> {
    add_ipv6_with(topo, true)
}

/// [`add_ipv6`]; with `vip_route` false the router gets no static route to the VIP
/// prefix (BGP brings one, see [`an_ipv6_vip_is_announced_through_bird_and_withdrawn`]).
fn add_ipv6_with(topo: &Topology, vip_route: bool) -> anyhow::Result<()> {
    let r = &topo.router;
    sysctl(r, "net.ipv6.conf.all.forwarding", "1")?;
    ip(
        r,
        &format!("-6 addr add {ROUTER_LAN6}/64 dev {} nodad", topo.bridge),
    )?;
    ip(
        r,
        &format!(
            "-6 addr add {ROUTER_CLIENT6}/64 dev {} nodad",
            topo.client.router_port
        ),
    )?;
    if vip_route {
        ip(r, &format!("-6 route add {VIP6_NET} via {LB6}"))?;
    }
    ip(
        &topo.client.ns,
        &format!("-6 addr add {CLIENT6}/64 dev eth0 nodad"),
    )?;
    ip(
        &topo.client.ns,
        &format!("-6 route add default via {ROUTER_CLIENT6}"),
    )?;
    ip(&topo.lb.ns, &format!("-6 addr add {LB6}/64 dev eth0 nodad"))?;
    ip(
        &topo.lb.ns,
        &format!("-6 route add default via {ROUTER_LAN6}"),
    )?;
    for (b, a) in topo.backends.iter().zip(BACKENDS6) {
        ip(&b.ns, &format!("-6 addr add {a}/64 dev eth0 nodad"))?;
        ip(&b.ns, &format!("-6 route add default via {ROUTER_LAN6}"))?;
        for vip in [VIP6_WEB, VIP6_SIX4] {
            ip(&b.ns, &format!("-6 addr add {vip}/128 dev lo nodad"))?;
        }
    }
    Ok(())
}

#[test]
fn ipv6_clients_through_the_lb_to_ipv6_and_ipv4_tunnelled_backends() -> anyhow::Result<()> {
    require_privileges!();
    let mut topo = Topology::build()?;
    add_ipv6(&topo)?;
    // Dual-stack servers ([::]:80 takes IPv4 too), named after their backend.
    let _servers: Vec<HttpServer> = topo
        .backends
        .iter()
        .map(|b| {
            HttpServer::start(
                &b.ns,
                SocketAddr::from((Ipv6Addr::UNSPECIFIED, 80)),
                &b.role,
            )
        })
        .collect::<anyhow::Result<_>>()?;
    topo.attach_decap()?;
    let web6 = SocketAddr::from((VIP6_WEB, 80));
    let six4 = SocketAddr::from((VIP6_SIX4, 80));
    let mixed = SocketAddr::from((VIP, 80));
    let config = LbConfig::new("eth0")
        .api_listen(API)
        .source_ipv4(LB_ADDR)
        .dataplane("source_ipv6", LB6.to_string())
        .sizes(65537, 65536)
        .service(
            ServiceConfig::new("web6", web6)
                .health(
                    r#"{ kind = "http", path = "/healthz", interval_ms = 200, timeout_ms = 150 }"#,
                )
                .backend(BackendConfig::new(BACKENDS6[0]))
                .backend(BackendConfig::new(BACKENDS6[1])),
        )
        .service(ServiceConfig::new("six4", six4).backend(BackendConfig::new(BACKEND_ADDRS[2])))
        .service(ServiceConfig::new("mixed", mixed).backend(BackendConfig::new(BACKENDS6[2])));
    topo.start_agent(&config, &AgentOptions::default())?;

    let deadline = Duration::from_secs(60);
    let mut report = String::new();
    let checks: [(&str, SocketAddr, usize, &[&str]); 3] = [
        ("6in6", web6, 200, &["be1", "be2"]),
        ("6in4", six4, 50, &["be3"]),
        ("4in6", mixed, 50, &["be3"]),
    ];
    for (what, target, n, want) in checks {
        let load = http::run_load(&topo.client.ns, target, n, 4, deadline)
            .with_context(|| format!("{what}: load to {target}"))?;
        report.push_str(&format!("{what} to {target}: {load:?}\n"));
        ensure!(
            load.all_ok(),
            "{what}: {} of {n} GETs to {target} failed: {:?}\nagent log:\n{}",
            load.failed,
            load.failures,
            topo.agent_log_tail(40)
        );
        let served: Vec<&str> = load.per_backend.keys().map(String::as_str).collect();
        ensure!(
            served == want,
            "{what}: served by {served:?}, want {want:?}"
        );
        // Shares of 100 each within wide binomial bounds (p = 1/2, n = 200: ±5 sigma).
        for count in load.per_backend.values() {
            ensure!(
                *count >= n / want.len() * 3 / 4,
                "{what}: uneven spread {:?}",
                load.per_backend
            );
        }
    }
    println!("{report}");

    // An ICMPv6 echo request to the IPv6 VIP is answered by the LB's XDP program (the
    // address is no host's: only the fast path can answer it).
    let rtt = netns::in_netns(&topo.client.ns, || ping6(VIP6_WEB, Duration::from_secs(3)))
        .context("ping6 to the VIP")?;
    println!("echo reply from {VIP6_WEB} in {rtt:?}");

    // The agent saw it: packets forwarded to each IPv6 backend, by its stats API.
    let api: SocketAddr = API.parse()?;
    let (status, body) = http::json_call_in(
        &topo.lb.ns,
        api,
        "GET",
        "/api/v1/stats",
        None,
        Duration::from_secs(5),
    )?;
    ensure!(status == 200, "stats: {status} {body}");
    for b in [BACKENDS6[0], BACKENDS6[1], BACKENDS6[2]] {
        let label = SocketAddr::from((IpAddr::V6(b), 80)).to_string();
        ensure!(
            body.contains(&label),
            "stats name no backend {label}: {body}"
        );
    }
    println!("stats: {body}");
    ensure!(
        !body.contains(r#""icmp_echo_reply":0"#),
        "the echo reply was not counted by the fast path: {body}"
    );
    // Health checks over IPv6 found both IPv6 backends up; metrics label them [v6]:port.
    let (status, metrics) = http::json_call_in(
        &topo.lb.ns,
        api,
        "GET",
        "/metrics",
        None,
        Duration::from_secs(5),
    )?;
    ensure!(status == 200, "metrics: {status}");
    for b in [BACKENDS6[0], BACKENDS6[1]] {
        let line = format!(
            "xdplb_backend_up{{service=\"web6\",backend=\"{}\"}} 1",
            SocketAddr::from((IpAddr::V6(b), 80))
        );
        ensure!(
            metrics.contains(&line),
            "no `{line}` in /metrics:\n{metrics}"
        );
    }
    Ok(())
}

/// One ICMPv6 echo request to `target` from the calling thread's namespace (a raw
/// socket: the kernel fills in the checksum); the time until its reply.
fn ping6(target: Ipv6Addr, timeout: Duration) -> anyhow::Result<Duration> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    // SAFETY: plain syscalls on a socket this function owns, with buffers and addresses
    // of the sizes passed.
    unsafe {
        let fd = libc::socket(
            libc::AF_INET6,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMPV6,
        );
        ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let sock = OwnedFd::from_raw_fd(fd);
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
        let mut sa: libc::sockaddr_in6 = std::mem::zeroed();
        sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        sa.sin6_addr.s6_addr = target.octets();
        let request = [
            128u8, 0, 0, 0, 0x76, 0x36, 0, 1, b'x', b'd', b'p', b'l', b'b',
        ];
        let start = std::time::Instant::now();
        let sent = libc::sendto(
            sock.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            0,
            (&raw const sa).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        );
        ensure!(sent >= 0, "sendto: {}", std::io::Error::last_os_error());
        let mut buf = [0u8; 1500];
        while start.elapsed() < timeout {
            let n = libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0);
            // Other ICMPv6 (neighbour discovery) arrives here too.
            if n >= request.len() as isize
                && buf[0] == 129
                && buf[4..8] == request[4..8]
                && buf[8..request.len()] == request[8..]
            {
                return Ok(start.elapsed());
            }
        }
        anyhow::bail!("no echo reply from {target} within {timeout:?}")
    }
}

/// VIP of the L7 service `shop6` (issue 11 item 1: "L7 ... work with IPv6 addresses").
const VIP6_L7: Ipv6Addr = v6(0x100, 3);
const COOKIE: &str = "LBSTICKY";
const TIMEOUT: Duration = Duration::from_secs(3);

/// One request to `target` from namespace `ns` (`Connection: close`).
fn request_in(
    ns: &str,
    target: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<http::Response> {
    let (m, p) = (method.to_owned(), path.to_owned());
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect();
    netns::in_netns(ns, move || {
        let h: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        http::request(target, &m, &p, &h, None, TIMEOUT)
    })
}

/// The `name=value` of our sticky Set-Cookie, if the response sets it.
fn sticky_cookie(r: &http::Response) -> Option<String> {
    r.headers
        .iter()
        .filter(|(n, _)| n == "set-cookie")
        .find_map(|(_, v)| {
            let pair = v.split(';').next()?.trim();
            pair.starts_with(&format!("{COOKIE}="))
                .then(|| pair.to_owned())
        })
}

/// The addresses of `lo` in namespace `ns` (`ip -6 addr show dev lo`).
fn lo_addrs6(ns: &str) -> anyhow::Result<String> {
    netns::run(&["ip", "-n", ns, "-6", "addr", "show", "dev", "lo"])
}

/// Polls `cond` every 50 ms for up to `limit`.
fn poll(
    what: &str,
    limit: Duration,
    cond: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<Duration> {
    xdplb_tests::load::wait_for(what, limit, Duration::from_millis(50), cond)
}

/// An L7 service on an IPv6 VIP, end to end (issue 11 item 1): the agent adds the VIP
/// to the LB's `lo` (the fast path passes its packets up), a real HTTP client reaches
/// it over IPv6 through the router, the proxy spreads requests round robin over two
/// IPv6 backends and an IPv4 one (HTTP health checks over both families), a sticky
/// cookie pins the client, `xdplb_http_requests_total` and `xdplb_backend_up` label
/// the IPv6 backends `[addr]:port`, and deleting the service through the API removes
/// the VIP from `lo` again.
#[test]
fn an_l7_service_on_an_ipv6_vip_serves_ipv6_clients_over_both_backend_families()
-> anyhow::Result<()> {
    require_privileges!();
    let mut topo = Topology::build()?;
    add_ipv6(&topo)?;
    let _servers: Vec<HttpServer> = topo
        .backends
        .iter()
        .map(|b| {
            HttpServer::start(
                &b.ns,
                SocketAddr::from((Ipv6Addr::UNSPECIFIED, 80)),
                &b.role,
            )
        })
        .collect::<anyhow::Result<_>>()?;
    let vip = SocketAddr::from((VIP6_L7, 80));
    let backends = [
        IpAddr::V6(BACKENDS6[0]),
        IpAddr::V6(BACKENDS6[1]),
        IpAddr::V4(BACKEND_ADDRS[2]),
    ];
    let shop = backends.iter().fold(
        ServiceConfig::new("shop6", vip)
            .mode("l7")
            .scheduler("round-robin")
            .health(
                r#"{ kind = "http", path = "/healthz", interval_ms = 200, timeout_ms = 150, rise = 2, fall = 2 }"#,
            )
            .extra(&format!(r#"sticky = {{ cookie = "{COOKIE}", ttl_s = 600 }}"#)),
        |s, &a| s.backend(BackendConfig::new(a)),
    );
    let config = LbConfig::new("eth0")
        .api_listen(API)
        .source_ipv4(LB_ADDR)
        .dataplane("source_ipv6", LB6.to_string())
        .sizes(65537, 65536)
        .service(shop);
    ensure!(
        !lo_addrs6(&topo.lb.ns)?.contains(&format!("{VIP6_L7}/128")),
        "the VIP is on lo before the agent runs"
    );
    topo.start_agent(&config, &AgentOptions::default())?;
    let api: SocketAddr = API.parse()?;
    let lb_ns = topo.lb.ns.clone();
    let metrics = || -> anyhow::Result<String> {
        let (status, body) =
            http::json_call_in(&lb_ns, api, "GET", "/metrics", None, Duration::from_secs(5))?;
        ensure!(status == 200, "metrics: {status}");
        Ok(body)
    };
    let labels: Vec<String> = backends
        .iter()
        .map(|&a| SocketAddr::from((a, 80)).to_string())
        .collect();
    // Health checks over IPv6 and IPv4 find all three up.
    poll("all three backends up", Duration::from_secs(10), || {
        let m = metrics()?;
        Ok(labels.iter().all(|l| {
            m.contains(&format!(
                "xdplb_backend_up{{service=\"shop6\",backend=\"{l}\"}} 1"
            ))
        }))
    })
    .with_context(|| topo.agent_log_tail(30))?;
    ensure!(
        lo_addrs6(&topo.lb.ns)?.contains(&format!("{VIP6_L7}/128")),
        "the agent did not add {VIP6_L7} to lo: {}",
        lo_addrs6(&topo.lb.ns)?
    );

    // The proxy listens once the VIP is on lo; the first answer within a few seconds.
    let client = topo.client.ns.clone();
    let t = poll(
        "the first answer on the IPv6 L7 VIP",
        Duration::from_secs(10),
        || Ok(request_in(&client, vip, "GET", "/first", &[]).is_ok_and(|r| r.status == 200)),
    )
    .with_context(|| topo.agent_log_tail(40))?;
    println!("l7 over IPv6: first answer {t:?} after all backends were up");
    for line in topo
        .agent_log()
        .lines()
        .filter(|l| l.contains("shop6") || l.contains("L7 VIP"))
    {
        println!("agent: {line}");
    }
    // Round robin over the three, a sticky cookie on every first response.
    let mut per_backend = std::collections::BTreeMap::<String, usize>::new();
    let mut first = None;
    for _ in 0..30 {
        let r =
            request_in(&client, vip, "GET", "/rr", &[]).with_context(|| topo.agent_log_tail(40))?;
        ensure!(r.status == 200, "GET /rr on {vip}: {r:?}");
        ensure!(
            r.local.is_ipv6(),
            "the client did not speak IPv6: {}",
            r.local
        );
        let cookie = sticky_cookie(&r).context("no sticky cookie on a first response")?;
        first.get_or_insert((cookie, r.backend().to_owned()));
        *per_backend.entry(r.backend().to_owned()).or_default() += 1;
    }
    println!("l7 over IPv6: 30 requests, round robin: {per_backend:?}");
    ensure!(
        per_backend.len() == 3 && per_backend.values().all(|&n| n == 10),
        "round robin over 3 equal backends should give 10 each: {per_backend:?}"
    );
    let (cookie, pinned) = first.context("no cookie")?;
    for _ in 0..10 {
        let r = request_in(&client, vip, "GET", "/sticky", &[("Cookie", &cookie)])?;
        ensure!(
            r.status == 200 && r.backend() == pinned,
            "with {cookie} the request went to {} instead of {pinned}",
            r.backend()
        );
        ensure!(sticky_cookie(&r).is_none(), "a valid cookie was reissued");
    }

    // The request counter names every backend of either family, IPv6 ones in brackets.
    let m = metrics()?;
    for l in &labels {
        let needle =
            format!("xdplb_http_requests_total{{service=\"shop6\",backend=\"{l}\",code=\"200\"}}");
        ensure!(m.contains(&needle), "no `{needle}` in /metrics:\n{m}");
    }

    // Deleting the service removes the VIP the agent added from lo; it stops answering.
    let (status, body) = http::json_call_in(
        &topo.lb.ns,
        api,
        "DELETE",
        "/api/v1/services/shop6",
        None,
        Duration::from_secs(5),
    )?;
    ensure!(
        status == 200 || status == 204,
        "DELETE shop6: {status} {body}"
    );
    let lb = topo.lb.ns.clone();
    poll("the VIP removed from lo", Duration::from_secs(5), || {
        Ok(!lo_addrs6(&lb)?.contains(&format!("{VIP6_L7}/128")))
    })?;
    ensure!(
        request_in(&client, vip, "GET", "/gone", &[]).is_err(),
        "the deleted L7 VIP still answers"
    );
    Ok(())
}

/// An IPv6 VIP announced through BIRD 2 (issue 11 item 1, DESIGN.md "A VIP is
/// announced ..."): the LB namespace runs a BIRD that includes the agent's file and
/// exports `proto "xdplb_vips6"` over an IPv6 BGP session to the router's BIRD, which
/// puts BGP routes into the router's kernel table. The router has no static route to
/// the VIP prefix here, so clients reach the VIP only through the announced /128.
/// - fast path attached, backends healthy: the /128 is at the router (BIRD and kernel)
///   and HTTP clients are served through it;
/// - `POST /api/v1/node/drain` withdraws it (and `xdplb_vip_announced` says 0),
///   `POST /api/v1/node/undrain` brings it back;
/// - a stopping agent (SIGTERM) leaves it (hitless restart); `lb-agent detach --config`
///   withdraws it.
#[test]
fn an_ipv6_vip_is_announced_through_bird_and_withdrawn() -> anyhow::Result<()> {
    use xdplb_tests::bird::{self, Bird};
    require_privileges!();
    bird::require()?;
    let mut topo = Topology::build()?;
    add_ipv6_with(&topo, false)?;
    let _servers: Vec<HttpServer> = topo.backends[..2]
        .iter()
        .map(|b| {
            HttpServer::start(
                &b.ns,
                SocketAddr::from((Ipv6Addr::UNSPECIFIED, 80)),
                &b.role,
            )
        })
        .collect::<anyhow::Result<_>>()?;
    topo.attach_decap()?;
    let dir = topo.run_dir().to_path_buf();
    let include = dir.join("xdplb.conf");
    std::fs::write(
        &include,
        lb_agent::bgp::render(&std::collections::BTreeSet::new()),
    )?;
    // BGP over IPv6 between the LB and the router; what an operator writes for IPv6
    // (README): export `proto "xdplb_vips6"` in an ipv6 channel.
    let lb_bird = Bird::start(
        &topo.lb.ns,
        &dir,
        "lb",
        &format!(
            "router id {LB_ADDR};\nprotocol device {{}}\ninclude \"{}\";\n\
             protocol bgp upstream {{\n  local {LB6} as 65001;\n  neighbor {ROUTER_LAN6} as 65000;\n\
               ipv6 {{ import none; export where proto = \"xdplb_vips6\"; }};\n}}\n",
            include.display()
        ),
    )?;
    let rtr_bird = Bird::start(
        &topo.router,
        &dir,
        "rtr",
        &format!(
            "router id 198.18.1.1;\nprotocol device {{}}\n\
             protocol kernel {{\n  ipv6 {{ import none; export where source = RTS_BGP; }};\n}}\n\
             protocol bgp lbnode {{\n  local {ROUTER_LAN6} as 65000;\n  neighbor {LB6} as 65001;\n\
               ipv6 {{ import all; export none; }};\n}}\n"
        ),
    )?;
    let up = poll("the BGP session", Duration::from_secs(30), || {
        rtr_bird.established("lbnode")
    })?;
    println!("BGP session (IPv6) established after {up:?}");

    let web6 = SocketAddr::from((VIP6_WEB, 80));
    let config = LbConfig::new("eth0")
        .api_listen(API)
        .source_ipv4(LB_ADDR)
        .dataplane("source_ipv6", LB6.to_string())
        .sizes(65537, 65536)
        .service(
            ServiceConfig::new("web6", web6)
                .health(
                    r#"{ kind = "http", path = "/healthz", interval_ms = 200, timeout_ms = 150 }"#,
                )
                .backend(BackendConfig::new(BACKENDS6[0]))
                .backend(BackendConfig::new(BACKENDS6[1])),
        )
        .table("bgp", "bird_socket", lb_bird.socket.display().to_string())
        .table("bgp", "include_file", include.display().to_string())
        .table("bgp", "drain_s", 0);
    let prefix = format!("{VIP6_WEB}/128");
    ensure!(
        !bird::has_route(&rtr_bird.socket, &prefix, "lbnode")?,
        "announced before the agent runs"
    );
    topo.start_agent(&config, &AgentOptions::default())?;
    let rtr_sock = rtr_bird.socket.clone();
    let router = topo.router.clone();
    let kernel_has = |router: &str| -> anyhow::Result<bool> {
        let out = netns::run(&["ip", "-n", router, "-6", "route", "show", &prefix])?;
        Ok(out.contains("proto bird") && out.contains(&LB6.to_string()))
    };
    let announced = |yes: bool| -> anyhow::Result<bool> {
        Ok(bird::has_route(&rtr_sock, &prefix, "lbnode")? == yes && kernel_has(&router)? == yes)
    };
    let t = poll(
        "the IPv6 VIP at the router",
        Duration::from_secs(20),
        || announced(true),
    )
    .with_context(|| topo.agent_log_tail(30))?;
    println!("{prefix} in the router's BIRD and kernel table {t:?} after the agent started");
    let text = std::fs::read_to_string(&include)?;
    ensure!(
        text.contains("protocol static xdplb_vips6") && text.contains(&prefix),
        "include file: {text}"
    );
    let route = rtr_bird.birdc(&["show", "route", &prefix, "all"])?;
    ensure!(route.contains("BGP.as_path: 65001"), "{route}");

    let client = topo.client.ns.clone();
    let load = http::run_load(&client, web6, 40, 4, Duration::from_secs(30))?;
    ensure!(
        load.all_ok(),
        "GETs to {web6} through the announced route: {load:?}"
    );
    let api: SocketAddr = API.parse()?;
    let lb_ns = topo.lb.ns.clone();
    let call = |method: &str, path: &str| -> anyhow::Result<String> {
        let (status, body) =
            http::json_call_in(&lb_ns, api, method, path, None, Duration::from_secs(5))?;
        ensure!(status == 200, "{method} {path}: {status} {body}");
        Ok(body)
    };
    let gauge = |v: u8| format!("xdplb_vip_announced{{vip=\"{VIP6_WEB}\"}} {v}");
    let metrics = call("GET", "/metrics")?;
    ensure!(metrics.contains(&gauge(1)), "no `{}`:\n{metrics}", gauge(1));

    // Node drain: withdrawn from BIRD and the router's kernel; no route, no service.
    call("POST", "/api/v1/node/drain")?;
    let t = poll("the drained VIP withdrawn", Duration::from_secs(10), || {
        announced(false)
    })?;
    println!("drain: withdrawn at the router after {t:?}");
    let metrics = call("GET", "/metrics")?;
    ensure!(metrics.contains(&gauge(0)), "no `{}`:\n{metrics}", gauge(0));
    ensure!(
        request_in(&client, web6, "GET", "/", &[]).is_err(),
        "{web6} answers with its route withdrawn"
    );
    call("POST", "/api/v1/node/undrain")?;
    poll(
        "the VIP back after undrain",
        Duration::from_secs(10),
        || announced(true),
    )?;
    let r = request_in(&client, web6, "GET", "/", &[])?;
    ensure!(r.status == 200, "after undrain: {r:?}");

    // SIGTERM: the route stays (hitless restart); `lb-agent detach --config` withdraws.
    topo.stop_agent()?;
    std::thread::sleep(Duration::from_secs(1));
    ensure!(announced(true)?, "a stopping agent withdrew the VIP");
    let bin = xdplb_tests::topology::agent_binary()?;
    let config_path = topo.run_dir().join("lb.toml");
    let bpffs = topo.bpffs().display().to_string();
    netns::exec(
        &topo.lb.ns,
        &[
            &bin.to_string_lossy(),
            "detach",
            "--iface",
            "eth0",
            "--bpffs",
            &bpffs,
            "--config",
            &config_path.to_string_lossy(),
        ],
    )?;
    let t = poll(
        "the VIP withdrawn by detach",
        Duration::from_secs(10),
        || announced(false),
    )?;
    println!("detach: withdrawn at the router after {t:?}");
    Ok(())
}
