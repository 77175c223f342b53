//! GUE end to end (issue 11, item 2): the step-1 namespaces with `encap = "gue"` on a
//! port other than the default (`gue_port = 7080`), the backends running
//! `lb-agent decap attach --gue-port 7080`. At least 300 real TCP connections (HTTP
//! GETs) through the LB all succeed, every backend serves its share, replies go
//! straight to the client, and every backend's decapsulator counted GUE packets and no
//! IPIP ones: the tunnel really was UDP.
//!
//! And QUIC connection-ID routing over GUE (issue 11, item 6): UDP datagrams with QUIC
//! short headers naming a backend's `quic_id` reach that backend from two client
//! sockets (a NAT rebinding changes the client's port), while long headers from many
//! ports spread over the backends by the ring.
//!
//! Needs root (see `netns::require_privileges`) and the agent binary
//! (`XDPLB_AGENT_BIN`, else `target/release/lb-agent`).

use std::{
    net::{SocketAddr, SocketAddrV4, UdpSocket},
    os::unix::fs::MetadataExt as _,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use aya::maps::{Map, MapData, PerCpuArray};
use lb_common::{maps as names, stats::Counter};
use xdplb_tests::{
    config::{BackendConfig, ServiceConfig},
    netns, require_privileges,
    scenario::{self, BedOptions, L4Bed, LoadOptions},
    topology::{BACKEND_ADDRS, Topology, VIP, agent_binary},
};

const GUE_PORT: u16 = 7080;

/// `counter` of the decapsulator pinned for `eth0` of the namespace `ns` (summed over
/// CPUs), read from its pins: `<bpffs>/xdplb/<netns inode>/eth0/decap/` (the layout the
/// README gives; the inode is that of the namespace's `/run/netns` entry).
fn decap_counter(ns: &str, bpffs: &Path, counter: Counter) -> anyhow::Result<u64> {
    let inode = std::fs::metadata(Path::new("/run/netns").join(ns))
        .with_context(|| format!("namespace {ns}"))?
        .ino();
    let dir = bpffs
        .join("xdplb")
        .join(inode.to_string())
        .join("eth0")
        .join("decap");
    let data = MapData::from_pin(dir.join(names::COUNTERS))
        .with_context(|| format!("opening the decap counters under {}", dir.display()))?;
    let counters: PerCpuArray<_, u64> = Map::PerCpuArray(data).try_into()?;
    Ok(counters.get(&counter.index(), 0)?.iter().sum())
}

/// `lb-agent decap attach --gue-port 7080` on every backend (replacing what is there).
fn attach_decap_gue(t: &Topology) -> anyhow::Result<()> {
    let bin = agent_binary()?;
    for b in &t.backends {
        let out = netns::exec(
            &b.ns,
            &[
                bin.to_string_lossy().as_ref(),
                "decap",
                "attach",
                "--iface",
                "eth0",
                "--bpffs",
                t.bpffs().to_string_lossy().as_ref(),
                "--gue-port",
                &GUE_PORT.to_string(),
            ],
        )
        .with_context(|| format!("decap attach --gue-port in {}", b.role))?;
        ensure!(
            out.contains(&format!("GUE on UDP port {GUE_PORT}")),
            "decap attach did not say it takes GUE on {GUE_PORT}: {out}"
        );
    }
    Ok(())
}

/// GUE with both outer families (issue 11, session 17): the IPv6 bed of `e2e_ipv6`
/// with `encap = "gue"` on port 7080. Real HTTP connections: from the IPv6 client to
/// an IPv6 VIP with IPv6 backends (IPv6 in GUE over IPv6), from the IPv4 client to an
/// IPv4 VIP with an IPv6 backend (IPv4 in GUE over IPv6), from the IPv6 client to an
/// IPv6 VIP with an IPv4 backend (IPv6 in GUE over IPv4). All answered (the backends'
/// stacks took the inner packets after `xdp_decap`), and every backend's decapsulator
/// counted GUE only: the outer UDP checksum of GUE over IPv6 is computed by the
/// balancer (the backends' kernels would drop a wrong inner one) and no IPv6 backend
/// got 6in6 or 4in6.
#[test]
fn gue_over_ipv6_and_ipv4_to_backends_of_both_families() -> anyhow::Result<()> {
    use crate::e2e_ipv6::{BACKENDS6, LB6, VIP6_SIX4, VIP6_WEB, add_ipv6};
    use std::net::Ipv6Addr;
    use xdplb_tests::{
        config::LbConfig,
        http::{self, HttpServer},
        topology::{AgentOptions, LB_ADDR},
    };
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
    topo.attach_decap()?;
    attach_decap_gue(&topo)?;
    let web6 = SocketAddr::from((VIP6_WEB, 80));
    let six4 = SocketAddr::from((VIP6_SIX4, 80));
    let mixed = SocketAddr::from((VIP, 80));
    let config = LbConfig::new("eth0")
        .api_listen("127.0.0.1:9090")
        .source_ipv4(LB_ADDR)
        .dataplane("source_ipv6", LB6.to_string())
        .dataplane("encap", "gue")
        .dataplane("gue_port", GUE_PORT)
        .sizes(65537, 65536)
        .service(
            ServiceConfig::new("web6", web6)
                .backend(BackendConfig::new(BACKENDS6[0]))
                .backend(BackendConfig::new(BACKENDS6[1])),
        )
        .service(ServiceConfig::new("six4", six4).backend(BackendConfig::new(BACKEND_ADDRS[2])))
        .service(ServiceConfig::new("mixed", mixed).backend(BackendConfig::new(BACKENDS6[2])));
    topo.start_agent(&config, &AgentOptions::default())?;
    let deadline = Duration::from_secs(60);
    let checks: [(&str, SocketAddr, usize, &[&str]); 3] = [
        ("6 in GUE/6", web6, 200, &["be1", "be2"]),
        ("4 in GUE/6", mixed, 100, &["be3"]),
        ("6 in GUE/4", six4, 50, &["be3"]),
    ];
    for (what, target, n, want) in checks {
        let load = http::run_load(&topo.client.ns, target, n, 4, deadline)
            .with_context(|| format!("{what}: load to {target}"))?;
        eprintln!("{what} to {target}: {load:?}");
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
    }
    for b in &topo.backends {
        let gue = decap_counter(&b.ns, topo.bpffs(), Counter::DecapGue)?;
        let other = decap_counter(&b.ns, topo.bpffs(), Counter::Decap)?;
        eprintln!(
            "{}: decap_gue {gue}, decap (IPIP, 6in6, 4in6, 6in4) {other}",
            b.role
        );
        ensure!(
            gue > 0 && other == 0,
            "{}: {gue} GUE and {other} other tunnelled packets; want GUE only",
            b.role
        );
    }
    Ok(())
}

#[test]
fn gue_end_to_end_300_connections() -> anyhow::Result<()> {
    require_privileges!();
    let opts = BedOptions {
        config: Topology::default_config()
            .dataplane("encap", "gue")
            .dataplane("gue_port", GUE_PORT),
        ..BedOptions::default()
    };
    let expected = scenario::expected_shares(&opts.config, "web");
    let bed = L4Bed::start(&opts)?;
    let t = &bed.topo;
    // The bed attached the decapsulators with the default port; attach them again the
    // way an operator of a GUE balancer on port 7080 would (this replaces them).
    attach_decap_gue(t)?;
    let outcome = bed.measure(&LoadOptions::default())?;
    eprintln!("outcome: {outcome:#?}");
    let problems = outcome.problems(&expected);
    ensure!(
        problems.is_empty(),
        "GUE end to end failed:\n  - {}\nagent log (tail):\n{}",
        problems.join("\n  - "),
        t.agent_log_tail(40)
    );
    ensure!(outcome.load.requested >= 300);
    for b in &t.backends {
        let gue = decap_counter(&b.ns, t.bpffs(), Counter::DecapGue)?;
        let ipip = decap_counter(&b.ns, t.bpffs(), Counter::Decap)?;
        eprintln!("{}: decap_gue {gue}, decap (IPIP) {ipip}", b.role);
        ensure!(
            gue > 0 && ipip == 0,
            "{}: {gue} GUE and {ipip} IPIP packets decapsulated; want GUE only",
            b.role
        );
    }
    Ok(())
}

/// The QUIC service's port and its backends' server ids (`quic_id`).
const QUIC_PORT: u16 = 4433;
const QUIC_IDS: [u32; 3] = [11, 22, 33];
/// Datagrams per phase.
const BURST: u32 = 50;

/// A UDP receiver on `QUIC_PORT` in a backend: collects the first payload byte after
/// the 9-byte short header (the phase tag) of every datagram until `stop`.
fn receiver(ns: &str, stop: Arc<AtomicBool>) -> anyhow::Result<JoinHandle<Vec<u8>>> {
    let socket = netns::in_netns(ns, || {
        let s = UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], QUIC_PORT)))?;
        s.set_read_timeout(Some(Duration::from_millis(50)))?;
        Ok(s)
    })
    .with_context(|| format!("binding UDP {QUIC_PORT} in {ns}"))?;
    Ok(thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            if let Ok(n) = socket.recv(&mut buf) {
                if n > 9 {
                    got.push(buf[9]);
                }
            }
        }
        got
    }))
}

/// A version-1 connection ID naming server id `id` (16 bits), the rest the server's.
fn cid_v1(id: u32) -> [u8; 8] {
    [
        0x40 | (id >> 10) as u8,
        (id >> 2) as u8,
        ((id & 3) << 6) as u8,
        9,
        8,
        7,
        6,
        5,
    ]
}

#[test]
fn quic_connection_ids_survive_nat_rebinding_over_gue() -> anyhow::Result<()> {
    require_privileges!();
    let quic = BACKEND_ADDRS.iter().zip(QUIC_IDS).fold(
        ServiceConfig::new("h3", SocketAddrV4::new(VIP, QUIC_PORT).into())
            .protocol("udp")
            .set("quic", true),
        |s, (&a, id)| s.backend(BackendConfig::new(a).set("quic_id", id)),
    );
    let opts = BedOptions {
        config: Topology::default_config()
            .dataplane("encap", "gue")
            .service(quic),
        ..BedOptions::default()
    };
    // The bed's decapsulators take GUE on the default port, the config's too.
    let bed = L4Bed::start(&opts)?;
    let t = &bed.topo;
    let stop = Arc::new(AtomicBool::new(false));
    let receivers = t
        .backends
        .iter()
        .map(|b| receiver(&b.ns, stop.clone()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let target = SocketAddr::from(SocketAddrV4::new(VIP, QUIC_PORT));
    // Phase 1 and 2: the same connection (CID naming backend 1) from two sockets;
    // phase 3: long headers (handshakes) from 30 sockets.
    let sent = netns::in_netns(&t.client.ns, move || {
        let cid = cid_v1(QUIC_IDS[1]);
        for phase in [1u8, 2] {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            for _ in 0..BURST {
                let mut d = vec![0x40];
                d.extend_from_slice(&cid);
                d.extend_from_slice(&[phase; 24]);
                s.send_to(&d, target)?;
                thread::sleep(Duration::from_millis(1));
            }
        }
        for _ in 0..30 {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            let mut d = vec![0xc3, 0, 0, 0, 1, 8, 3, 3, 3];
            d[5] = 3;
            d.extend_from_slice(&[3u8; 24]);
            s.send_to(&d, target)?;
        }
        Ok(())
    });
    thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let got: Vec<Vec<u8>> = receivers
        .into_iter()
        .map(|h| h.join().map_err(|_| anyhow::anyhow!("a receiver panicked")))
        .collect::<anyhow::Result<_>>()?;
    sent.context("sending the datagrams")?;
    let count = |b: usize, phase: u8| got[b].iter().filter(|&&p| p == phase).count();
    for (i, b) in t.backends.iter().enumerate() {
        eprintln!(
            "{}: phase 1 {}, phase 2 {}, long headers {}",
            b.role,
            count(i, 1),
            count(i, 2),
            count(i, 3)
        );
    }
    let burst = BURST as usize;
    ensure!(
        count(1, 1) == burst && count(1, 2) == burst,
        "the connection's datagrams did not all reach backend 1 (quic_id {}) from both \
         client sockets: {got:?}\nagent log (tail):\n{}",
        QUIC_IDS[1],
        t.agent_log_tail(30)
    );
    ensure!(
        [0, 2].iter().all(|&b| count(b, 1) + count(b, 2) == 0),
        "short headers reached another backend"
    );
    let spread = (0..3).filter(|&b| count(b, 3) > 0).count();
    ensure!(
        (0..3).map(|b| count(b, 3)).sum::<usize>() == 30 && spread >= 2,
        "30 long headers from 30 sockets should reach at least two backends by the ring: {got:?}"
    );
    Ok(())
}
