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

const fn v6(net: u16, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x18, net, 0, 0, 0, 0, host)
}
const CLIENT6: Ipv6Addr = v6(0, 2);
const ROUTER_CLIENT6: Ipv6Addr = v6(0, 1);
const ROUTER_LAN6: Ipv6Addr = v6(1, 1);
const LB6: Ipv6Addr = v6(1, 0x10);
const BACKENDS6: [Ipv6Addr; 3] = [v6(1, 0x11), v6(1, 0x12), v6(1, 0x13)];
/// VIP of `web6` (IPv6 backends be1, be2) and of `six4` (IPv4 backend be3).
const VIP6_WEB: Ipv6Addr = v6(0x100, 1);
const VIP6_SIX4: Ipv6Addr = v6(0x100, 2);
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
fn add_ipv6(topo: &Topology) -> anyhow::Result<()> {
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
    ip(r, &format!("-6 route add {VIP6_NET} via {LB6}"))?;
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
