//! A property test of `xdp_lb`: at least 100,000 random and mutated frames through
//! `BPF_PROG_TEST_RUN` on the real object, each output checked against what the
//! design allows.
//!
//! Frames are drawn from a seeded generator: valid TCP/UDP packets to the VIPs and to
//! other addresses, IPv6 packets with extension header chains, ICMP errors quoting
//! garbage or a VIP packet, ARP, behind 0 to 3 VLAN tags (802.1Q, 802.1ad and the old
//! 0x9100 QinQ EtherType); then mutated: cut at a random offset (and, for one frame
//! of each kind, at every offset), random IHL, total length, TTL, checksums, flags,
//! random bytes flipped, trailing bytes added. The balancer has global and
//! per-service source filters and new-flow limits in force, so those paths run too.
//!
//! What must hold for every frame (see [`check`]):
//! - the verdict is XDP_PASS, XDP_DROP, XDP_TX or XDP_REDIRECT, never XDP_ABORTED;
//! - a passed or dropped frame comes out unchanged;
//! - a sent frame (TX/REDIRECT) came in as an IPv4 TCP/UDP packet to an L4 VIP and
//!   goes out (TX for backends on the receiving interface, REDIRECT for the one behind
//!   the other) as Ethernet + an outer IPv4 header (version 4, IHL 5, correct checksum,
//!   TTL 64, protocol IPIP, not a fragment, from the LB's tunnel source to a backend
//!   of that service) whose total length is the inner packet's plus 20 and equal to
//!   what the frame carries (no trailing bytes), within the MTU, the inner packet
//!   exactly the one that came in;
//!   A tunnelled ICMP error quotes a reply of an L4 VIP's flow and goes to a backend of
//!   that service;
//! - an answer from XDP (XDP_TX back to the sender: MACs swapped, tags kept) is an echo
//!   reply to an echo request to an L4 VIP address (the same message, type 0, checksum
//!   as right as it came) or an ICMP "fragmentation needed" (MTU 1480, checksums
//!   right, quoting as much of the packet as fits in 576 bytes) for a DF packet to an L4 VIP that
//!   is over the MTU once encapsulated;
//! - every packet is counted once under one outcome (`rx` and, for a drop, a reason):
//!   checked per frame for one frame in [`COUNTER_SAMPLE`], and over the whole run.
//!
//! Two backends take their next hop from the agent's `NEXT_HOPS` map (issue 12), the
//! others from `bpf_fib_lookup`, so both paths run.
//!
//! `XDPLB_FUZZ_SEED=N` replays a run; the seed is printed at the start and in every
//! failure (with the frame in hex). `XDPLB_FUZZ_FRAMES=N` changes the count.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
};

use anyhow::{Context as _, bail, ensure};
use lb_agent::{
    config::{FlowLimitConfig, Protocol},
    dataplane::{
        desired::{DesiredBackend, DesiredFilters, DesiredService, DesiredState},
        forwarding::InterfaceForwarding,
        loader::{self, Capacities, LB_PROGRAM},
        stats::Counters,
    },
};
use lb_common::stats::{Counter, DropReason};
use rand::{Rng, RngCore, SeedableRng, rngs::StdRng};
use xdplb_tests::{
    packet::{Frame, L4, PacketBuilder, internet_checksum, tcp_flags},
    packet6::{checksum6, icmp6, ipv6, tcp6, udp6},
    require_privileges,
    xdp_bed::{
        LoadedLb, Net, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, in_bed, test_run, verdict_name,
        xdp_md,
    },
};

const LB_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(198, 18, 1, 11),
    Ipv4Addr::new(198, 18, 1, 12),
    Ipv4Addr::new(198, 18, 1, 13),
];
const BACKEND_MACS: [[u8; 6]; 3] = [
    [0x02, 0xbe, 0, 0, 0, 0x11],
    [0x02, 0xbe, 0, 0, 0, 0x12],
    [0x02, 0xbe, 0, 0, 0, 0x13],
];
/// Behind the second interface (`far0`): its packets are redirected there.
const FAR_BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 11);
const FAR_MAC: [u8; 6] = [0x02, 0xbe, 0, 0, 2, 0x11];
const VIP_WEB: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 100, 1), 80);
const VIP_DNS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 100, 2), 53);
const VIP_L7: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 100, 5), 80);
/// A `quic` UDP service on the three lb0 backends, their `quic_id`s in [`QUIC_IDS`].
const VIP_QUIC: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 100, 8), 443);
const QUIC_IDS: [u32; 3] = [1, 0x2345, 0x12_3456];
/// The port `xdp_decap` takes GUE on (the config's `gue_port`).
const GUE_PORT: u16 = 6080;
const MTU: usize = 1500;
/// The IPv6 side: the LB's tunnel source, two IPv6 backends on `lb0`, an IPv6 TCP VIP
/// to them (6in6), an IPv6 UDP VIP to an IPv4 backend (6in4), an IPv4 VIP to the IPv6
/// backends (4in6).
const LB6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 1, 0, 0, 0, 0, 0x10);
const BE6: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0xfd00, 0x18, 1, 0, 0, 0, 0, 0x21),
    Ipv6Addr::new(0xfd00, 0x18, 1, 0, 0, 0, 0, 0x22),
];
const BE6_MACS: [[u8; 6]; 2] = [[0x02, 0xbe, 0, 0, 6, 0x21], [0x02, 0xbe, 0, 0, 6, 0x22]];
const VIP6_WEB: SocketAddrV6 =
    SocketAddrV6::new(Ipv6Addr::new(0xfd00, 0x18, 0x100, 0, 0, 0, 0, 1), 80, 0, 0);
const VIP6_DNS: SocketAddrV6 =
    SocketAddrV6::new(Ipv6Addr::new(0xfd00, 0x18, 0x100, 0, 0, 0, 0, 2), 53, 0, 0);
const VIP_MIXED: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 100, 9), 80);
/// Frames whose counters are checked one by one: one in this many.
const COUNTER_SAMPLE: u64 = 50;
const DEFAULT_FRAMES: u64 = 100_000;

fn backend(addr: impl Into<IpAddr>, port: u16) -> DesiredBackend {
    DesiredBackend {
        quic_id: None,
        address: addr.into(),
        port,
        weight: 100,
        active: true,
    }
}

fn prefixes(list: &[&str]) -> Vec<ipnet::IpNet> {
    list.iter().map(|p| p.parse().expect("prefix")).collect()
}

/// web (TCP, three backends, its own deny list), dns (UDP, a backend behind the other
/// interface, an allow list and a new-flow limit), an l7 VIP; global deny list and
/// new-flow limit.
fn desired() -> DesiredState {
    let service =
        |name: &str, vip: std::net::SocketAddr, protocol, backends, filters| DesiredService {
            quic: false,
            name: name.into(),
            vip,
            protocol,
            l7: false,
            source_hash: false,
            backends,
            filters,
        };
    let mut l7 = service(
        "l7",
        VIP_L7.into(),
        Protocol::Tcp,
        vec![backend(BACKENDS[0], 80)],
        DesiredFilters::default(),
    );
    l7.l7 = true;
    DesiredState {
        gue_port: 6080,
        source_v4_prefix: None,
        source_v6_prefix: None,
        max_new_flows_per_cpu: 0,
        icmp_errors_per_cpu: 0,
        source_v4: Some(LB_ADDR),
        source_v6: Some(LB6),
        encap: 0,
        mtu: 1500,
        filters: DesiredFilters {
            deny: prefixes(&["198.18.0.64/26", "2001:db8:bad::/48"]),
            allow: vec![],
            new_flows: Some(FlowLimitConfig {
                rate: 1_000_000,
                burst: 1000,
                prefix_v4: 24,
                prefix_v6: 64,
            }),
        },
        services: vec![
            service(
                "web",
                VIP_WEB.into(),
                Protocol::Tcp,
                BACKENDS.iter().map(|&b| backend(b, 80)).collect(),
                DesiredFilters {
                    deny: prefixes(&["198.18.0.32/27"]),
                    ..Default::default()
                },
            ),
            service(
                "dns",
                VIP_DNS.into(),
                Protocol::Udp,
                vec![backend(FAR_BACKEND, 53)],
                DesiredFilters {
                    allow: prefixes(&["198.18.0.0/25", "10.0.0.0/8"]),
                    new_flows: Some(FlowLimitConfig {
                        rate: 1000,
                        burst: 50,
                        prefix_v4: 32,
                        prefix_v6: 64,
                    }),
                    ..Default::default()
                },
            ),
            l7,
            DesiredService {
                quic: true,
                ..service(
                    "quic",
                    VIP_QUIC.into(),
                    Protocol::Udp,
                    BACKENDS
                        .iter()
                        .zip(QUIC_IDS)
                        .map(|(&b, id)| DesiredBackend {
                            quic_id: Some(id),
                            ..backend(b, 443)
                        })
                        .collect(),
                    DesiredFilters::default(),
                )
            },
            service(
                "web6",
                VIP6_WEB.into(),
                Protocol::Tcp,
                BE6.iter().map(|&b| backend(b, 80)).collect(),
                DesiredFilters::default(),
            ),
            service(
                "dns6",
                VIP6_DNS.into(),
                Protocol::Udp,
                vec![backend(BACKENDS[0], 53)],
                DesiredFilters::default(),
            ),
            service(
                "mixed",
                VIP_MIXED.into(),
                Protocol::Tcp,
                BE6.iter().map(|&b| backend(b, 80)).collect(),
                DesiredFilters::default(),
            ),
        ],
    }
}

/// The IPv6 half of the bed (run inside its namespace): the LB's address without
/// DAD, static neighbours for the IPv6 backends.
fn net6() -> anyhow::Result<()> {
    let ip = |args: &[&str]| -> anyhow::Result<()> {
        let out = std::process::Command::new("ip").args(args).output()?;
        ensure!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    ip(&[
        "-6",
        "addr",
        "add",
        "fd00:18:1::10/64",
        "dev",
        "lb0",
        "nodad",
    ])?;
    for (b, m) in BE6.iter().zip(BE6_MACS) {
        let mac: Vec<String> = m.iter().map(|x| format!("{x:02x}")).collect();
        ip(&[
            "-6",
            "neigh",
            "replace",
            &b.to_string(),
            "lladdr",
            &mac.join(":"),
            "dev",
            "lb0",
            "nud",
            "permanent",
        ])?;
    }
    Ok(())
}

fn net() -> Net {
    let mut neighbours: Vec<_> = BACKENDS
        .iter()
        .zip(BACKEND_MACS)
        .map(|(&b, m)| (b, m, "lb0"))
        .collect();
    neighbours.push((FAR_BACKEND, FAR_MAC, "far0"));
    Net {
        links: vec![("lb0", "198.18.1.10/24"), ("far0", "198.18.2.10/24")],
        neighbours,
        routes: vec!["198.18.0.0/24 via 198.18.1.1 dev lb0"],
    }
}

fn caps() -> Capacities {
    Capacities {
        max_services: 8,
        max_backends: 32,
        ring_size: 1021,
        flow_table_size: 4096,
        max_filter_rules: 16,
        new_flow_table_size: 1024,
        flow_limit_sources: 1024,
    }
}

// --- frames ------------------------------------------------------------------------

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;
const VLAN_TPIDS: [u16; 3] = [0x8100, 0x88a8, 0x9100];

/// A client address: mostly 198.18.0.0/24 (some denied, some limited), sometimes
/// anywhere.
fn client(rng: &mut StdRng) -> Ipv4Addr {
    if rng.random_bool(0.8) {
        Ipv4Addr::new(198, 18, 0, rng.random())
    } else {
        Ipv4Addr::from(rng.next_u32())
    }
}

fn destination(rng: &mut StdRng) -> (SocketAddrV4, bool) {
    match rng.random_range(0..7) {
        6 => (VIP_MIXED, true),
        0 | 1 => (VIP_WEB, true),
        2 => (VIP_DNS, false),
        3 => (VIP_L7, true),
        4 => (SocketAddrV4::new(*VIP_WEB.ip(), rng.random()), rng.random()),
        _ => (SocketAddrV4::new(LB_ADDR, rng.random()), rng.random()),
    }
}

fn payload(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let len = if rng.random_bool(0.05) {
        rng.random_range(0..=max)
    } else {
        rng.random_range(0..=64.min(max))
    };
    let mut p = vec![0u8; len];
    rng.fill_bytes(&mut p);
    p
}

/// An IPv4 TCP or UDP packet (with its Ethernet header), valid.
fn ipv4_l4(rng: &mut StdRng) -> PacketBuilder {
    let (dst, tcp) = destination(rng);
    let src = SocketAddrV4::new(client(rng), rng.random());
    let body = payload(rng, 1400);
    if tcp {
        let flags = *[
            tcp_flags::SYN,
            tcp_flags::ACK,
            tcp_flags::ACK | tcp_flags::PSH,
            tcp_flags::SYN | tcp_flags::ACK,
            tcp_flags::FIN | tcp_flags::ACK,
            tcp_flags::RST,
            rng.random(),
        ]
        .get(rng.random_range(0..7))
        .unwrap_or(&tcp_flags::ACK);
        PacketBuilder::tcp(src, dst).flags(flags).payload(&body)
    } else {
        PacketBuilder::udp(src, dst).payload(&body)
    }
}

/// An ICMP error (destination unreachable / time exceeded / fragmentation needed)
/// quoting a VIP packet's head (client -> VIP), a VIP reply's head (VIP -> client: what
/// the balancer tunnels to the flow's backend), or garbage; or an echo request.
fn icmp_error(rng: &mut StdRng) -> PacketBuilder {
    if rng.random_bool(0.15) {
        let (dst, _) = destination(rng);
        let mut echo = vec![8, if rng.random_bool(0.9) { 0 } else { 1 }, 0, 0];
        echo.extend_from_slice(&payload(rng, 1400));
        let c = internet_checksum(&echo);
        echo[2..4].copy_from_slice(&c.to_be_bytes());
        return PacketBuilder::raw(client(rng), *dst.ip(), 1).payload(&echo);
    }
    let quoted = match rng.random_range(0..3) {
        0 => {
            let mut q = ipv4_l4(rng).build_ipv4();
            q.truncate(rng.random_range(0..=q.len().min(68)));
            q
        }
        1 => {
            // The reply of a flow: swap addresses and ports of a packet to a VIP.
            let p = ipv4_l4(rng);
            let mut r = p.clone();
            (r.src, r.dst) = (p.dst, p.src);
            r.l4 = match p.l4 {
                L4::Tcp {
                    sport,
                    dport,
                    seq,
                    ack,
                    flags,
                    window,
                } => L4::Tcp {
                    sport: dport,
                    dport: sport,
                    seq,
                    ack,
                    flags,
                    window,
                },
                L4::Udp { sport, dport } => L4::Udp {
                    sport: dport,
                    dport: sport,
                },
                raw => raw,
            };
            let mut q = r.build_ipv4();
            let keep = if rng.random_bool(0.8) {
                28
            } else {
                rng.random_range(0..=68)
            };
            q.truncate(keep.min(q.len()));
            q
        }
        _ => payload(rng, 200),
    };
    let (kind, code) = *[
        (3u8, 4u8),
        (3, 1),
        (11, 0),
        (12, 0),
        (rng.random(), rng.random()),
    ]
    .get(rng.random_range(0..5))
    .unwrap_or(&(3, 4));
    let mut icmp = vec![kind, code, 0, 0, 0, 0, 0x05, 0xdc];
    icmp.extend_from_slice(&quoted);
    let c = internet_checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let (dst, _) = destination(rng);
    PacketBuilder::raw(client(rng), *dst.ip(), 1).payload(&icmp)
}

/// An IPv6 packet with a chain of extension headers, then TCP/UDP/garbage, as the
/// L3 bytes of a frame.
fn ipv6_packet(rng: &mut StdRng) -> Vec<u8> {
    let mut ext = Vec::new();
    let mut next_of_prev: Option<usize> = None;
    let mut first_next = 0u8;
    for _ in 0..rng.random_range(0..5) {
        let kind = *[0u8, 43, 44, 60, 51, 135, rng.random()]
            .get(rng.random_range(0..7))
            .unwrap_or(&0);
        match next_of_prev {
            Some(at) => ext[at] = kind,
            None => first_next = kind,
        }
        let at = ext.len();
        let len_units: u8 = if kind == 44 {
            0
        } else {
            rng.random_range(0..4)
        };
        ext.push(0);
        ext.push(len_units);
        let mut body = vec![0u8; 6 + usize::from(len_units) * 8];
        rng.fill_bytes(&mut body);
        ext.extend_from_slice(&body);
        next_of_prev = Some(at);
    }
    let last = *[6u8, 17, 58, 59, rng.random()]
        .get(rng.random_range(0..5))
        .unwrap_or(&6);
    match next_of_prev {
        Some(at) => ext[at] = last,
        None => first_next = last,
    }
    let mut l4 = payload(rng, 200);
    if l4.len() >= 4 && rng.random_bool(0.5) {
        l4[2..4].copy_from_slice(&80u16.to_be_bytes());
    }
    ext.extend_from_slice(&l4);
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&u16::try_from(ext.len()).unwrap_or(0).to_be_bytes());
    p.push(first_next);
    p.push(rng.random());
    let src: [u8; 16] = if rng.random_bool(0.3) {
        [
            0x20, 0x01, 0x0d, 0xb8, 0x0b, 0xad, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
        ]
    } else {
        rng.random()
    };
    p.extend_from_slice(&src);
    let dst: [u8; 16] = rng.random();
    p.extend_from_slice(&dst);
    p.extend_from_slice(&ext);
    p
}

/// Ethernet header with 0 to 3 VLAN tags (random TPIDs) around `l3` of EtherType `proto`.
fn ethernet(rng: &mut StdRng, proto: u16, l3: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x10, 0x02, 0, 0, 0, 0, 0x02];
    let tags = *[0usize, 0, 0, 1, 1, 2, 3]
        .get(rng.random_range(0..7))
        .unwrap_or(&0);
    for _ in 0..tags {
        let tpid = VLAN_TPIDS[rng.random_range(0..VLAN_TPIDS.len())];
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&rng.random_range(0u16..4096).to_be_bytes());
    }
    f.extend_from_slice(&proto.to_be_bytes());
    f.extend_from_slice(l3);
    f
}

/// An IPv6 frame's L3 bytes for the IPv6 VIPs: TCP/UDP to them (some around the MTU)
/// or elsewhere, ICMPv6 echo requests, ICMPv6 errors quoting a VIP reply's head, a
/// client's packet or garbage.
fn ipv6_vip(rng: &mut StdRng) -> Vec<u8> {
    let client = match rng.random_range(0..10) {
        0 => Ipv6Addr::new(0x2001, 0xdb8, 0xbad, 0, 0, 0, 0, rng.random()),
        1 => Ipv6Addr::from(rng.random::<u128>()),
        _ => Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, rng.random()),
    };
    let (vip, tcp) = match rng.random_range(0..5) {
        0 | 1 => (VIP6_WEB, true),
        2 => (VIP6_DNS, false),
        3 => (
            SocketAddrV6::new(*VIP6_WEB.ip(), rng.random(), 0, 0),
            rng.random(),
        ),
        _ => (
            SocketAddrV6::new(Ipv6Addr::from(rng.random::<u128>()), 80, 0, 0),
            true,
        ),
    };
    let src = SocketAddrV6::new(client, rng.random(), 0, 0);
    let l4 = |rng: &mut StdRng, from: SocketAddrV6, to: SocketAddrV6, tcp: bool| -> Vec<u8> {
        let body = if rng.random_bool(0.15) {
            // Around the MTU once encapsulated (40 or 20 bytes of outer header).
            vec![0x5a; rng.random_range(1380..=1460)]
        } else {
            payload(rng, 200)
        };
        if tcp {
            let flags = *[
                tcp_flags::SYN,
                tcp_flags::ACK,
                tcp_flags::ACK | tcp_flags::PSH,
                rng.random(),
            ]
            .get(rng.random_range(0..4))
            .unwrap_or(&tcp_flags::ACK);
            tcp6(from, to, flags, rng.random(), &body)
        } else {
            udp6(from, to, &body)
        }
    };
    match rng.random_range(0..10) {
        0..=5 => {
            let seg = l4(rng, src, vip, tcp);
            ipv6(
                client,
                *vip.ip(),
                if tcp { 6 } else { 17 },
                rng.random(),
                64,
                &seg,
            )
        }
        6 => {
            let code = if rng.random_bool(0.9) { 0 } else { 1 };
            let echo = icmp6(
                client,
                *vip.ip(),
                128,
                code,
                rng.random(),
                &payload(rng, 300),
            );
            ipv6(client, *vip.ip(), 58, 0, 64, &echo)
        }
        _ => {
            let quote = match rng.random_range(0..3) {
                0 => {
                    // A reply VIP -> client: what the balancer tunnels to the backend.
                    let seg = l4(rng, vip, src, tcp);
                    let mut q = ipv6(*vip.ip(), client, if tcp { 6 } else { 17 }, 0, 64, &seg);
                    let keep = if rng.random_bool(0.8) {
                        48
                    } else {
                        rng.random_range(0..=120)
                    };
                    q.truncate(keep.min(q.len()));
                    q
                }
                1 => {
                    let seg = l4(rng, src, vip, tcp);
                    ipv6(client, *vip.ip(), 6, 0, 64, &seg)[..48].to_vec()
                }
                _ => payload(rng, 200),
            };
            let kind = *[1u8, 2, 3, 4, rng.random()]
                .get(rng.random_range(0..5))
                .unwrap_or(&1);
            let router = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 1);
            let err = icmp6(
                router,
                *vip.ip(),
                kind,
                rng.random_range(0..5),
                1280u32.to_be_bytes(),
                &quote,
            );
            ipv6(router, *vip.ip(), 58, 0, 64, &err)
        }
    }
}

/// The frame kinds; one of each is also cut at every offset.
const KINDS: usize = 8;

fn frame_of_kind(rng: &mut StdRng, kind: usize) -> Vec<u8> {
    match kind {
        0 | 1 => {
            let b = ipv4_l4(rng);
            ethernet(rng, ETH_P_IP, &b.build_ipv4())
        }
        2 => {
            let b = icmp_error(rng);
            ethernet(rng, ETH_P_IP, &b.build_ipv4())
        }
        3 => {
            let p = ipv6_packet(rng);
            ethernet(rng, ETH_P_IPV6, &p)
        }
        6 => {
            let p = ipv6_vip(rng);
            ethernet(rng, ETH_P_IPV6, &p)
        }
        7 => {
            let b = quic_datagram(rng);
            ethernet(rng, ETH_P_IP, &b.build_ipv4())
        }
        5 => {
            // Around the MTU once encapsulated (1480 bytes of IP fit), DF set or not.
            let mut b = ipv4_l4(rng);
            let l4_len = if matches!(b.l4, L4::Tcp { .. }) {
                20
            } else {
                8
            };
            let target = rng.random_range(MTU - 40..=MTU);
            b.payload = vec![0x5a; target - 20 - l4_len];
            b.dont_fragment = rng.random_bool(0.7);
            ethernet(rng, ETH_P_IP, &b.build_ipv4())
        }
        _ => {
            let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
            arp.extend_from_slice(&payload(rng, 20));
            ethernet(rng, ETH_P_ARP, &arp)
        }
    }
}

/// Where the IPv4 header of a frame built by [`ethernet`] starts (after its tags).
fn l3_offset(frame: &[u8]) -> Option<usize> {
    let mut off = 12;
    loop {
        let proto = u16::from_be_bytes([*frame.get(off)?, *frame.get(off + 1)?]);
        if VLAN_TPIDS.contains(&proto) {
            off += 4;
        } else {
            return Some(off + 2);
        }
    }
}

/// Mutates `frame` in one or more of the ways the module docs list.
fn mutate(rng: &mut StdRng, frame: &mut Vec<u8>) {
    let l3 = l3_offset(frame).unwrap_or(14);
    for _ in 0..rng.random_range(1..=3) {
        match rng.random_range(0..10) {
            0 => {
                // Cut anywhere (test_run needs an Ethernet header).
                let len = rng.random_range(14..=frame.len().max(14));
                frame.truncate(len);
            }
            1 => {
                if let Some(b) = frame.get_mut(l3) {
                    *b = (*b & 0xf0) | rng.random_range(0..16);
                }
            }
            2 => {
                if frame.len() > l3 + 4 {
                    let v: u16 = if rng.random_bool(0.5) {
                        rng.random()
                    } else {
                        let real = frame.len() - l3;
                        let delta: i32 = rng.random_range(-8..8);
                        u16::try_from((real as i32 + delta).max(0)).unwrap_or(0)
                    };
                    frame[l3 + 2..l3 + 4].copy_from_slice(&v.to_be_bytes());
                }
            }
            3 => {
                // TTL 0 or 1, or anything.
                if let Some(b) = frame.get_mut(l3 + 8) {
                    *b = *[0u8, 1, rng.random()]
                        .get(rng.random_range(0..3))
                        .unwrap_or(&0);
                }
            }
            4 => {
                // A bogus IPv4 header checksum.
                if frame.len() > l3 + 12 {
                    let v: u16 = rng.random();
                    frame[l3 + 10..l3 + 12].copy_from_slice(&v.to_be_bytes());
                }
            }
            5 => {
                // Fragment bits and offset.
                if frame.len() > l3 + 8 {
                    let v: u16 = rng.random();
                    frame[l3 + 6..l3 + 8].copy_from_slice(&v.to_be_bytes());
                }
            }
            6 => {
                // Trailing bytes: Ethernet padding or a trailer.
                let mut tail = vec![0u8; rng.random_range(1..=64)];
                if rng.random_bool(0.5) {
                    rng.fill_bytes(&mut tail);
                }
                frame.extend_from_slice(&tail);
            }
            7 => {
                // TCP flags / data offset bytes, or UDP length.
                let at = l3 + 20 + rng.random_range(4..14);
                if let Some(b) = frame.get_mut(at) {
                    *b = rng.random();
                }
            }
            8 => {
                // The protocol byte (IPv4), or the next header (IPv6).
                let ipv6 = frame.get(l3 - 2..l3) == Some(&ETH_P_IPV6.to_be_bytes()[..]);
                let at = if ipv6 { l3 + 6 } else { l3 + 9 };
                if let Some(b) = frame.get_mut(at) {
                    *b = *[1u8, 4, 6, 17, 41, 47, 0, 43, 44, 58, 60, rng.random()]
                        .get(rng.random_range(0..12))
                        .unwrap_or(&6);
                }
            }
            _ => {
                // Random bytes anywhere.
                for _ in 0..rng.random_range(1..4) {
                    if frame.is_empty() {
                        break;
                    }
                    let at = rng.random_range(0..frame.len());
                    frame[at] = rng.random();
                }
            }
        }
    }
    if frame.len() < 14 {
        frame.resize(14, 0);
    }
}

// --- checks --------------------------------------------------------------------------

/// What one frame did, for the totals.
#[derive(Default)]
struct Totals {
    frames: u64,
    by_verdict: BTreeMap<u32, u64>,
    /// Tunnelled frames by (inner, outer) family: 6in6, 4in6, 6in4 (IPIP not counted).
    tunnels6: BTreeMap<&'static str, u64>,
}

/// The L4 VIPs: (address, port, protocol) -> backends that may receive it.
fn l4_vips() -> Vec<(SocketAddrV4, u8, Vec<Ipv4Addr>)> {
    vec![
        (VIP_WEB, 6, BACKENDS.to_vec()),
        (VIP_DNS, 17, vec![FAR_BACKEND]),
        (VIP_QUIC, 17, BACKENDS.to_vec()),
        // Its backends are IPv6: never sent in an IPv4 tunnel.
        (VIP_MIXED, 6, vec![]),
    ]
}

/// Every L4 VIP of either family: (address, port, protocol) -> its backends.
fn l4_vips_any() -> Vec<(IpAddr, u16, u8, Vec<IpAddr>)> {
    let be6: Vec<IpAddr> = BE6.iter().map(|&b| b.into()).collect();
    let mut v: Vec<(IpAddr, u16, u8, Vec<IpAddr>)> = l4_vips()
        .into_iter()
        .filter(|(vip, _, _)| *vip != VIP_MIXED)
        .map(|(vip, p, b)| {
            (
                (*vip.ip()).into(),
                vip.port(),
                p,
                b.into_iter().map(IpAddr::from).collect(),
            )
        })
        .collect();
    v.push(((*VIP_MIXED.ip()).into(), 80, 6, be6.clone()));
    v.push(((*VIP6_WEB.ip()).into(), 80, 6, be6));
    v.push(((*VIP6_DNS.ip()).into(), 53, 17, vec![BACKENDS[0].into()]));
    v
}

/// A UDP datagram to the `quic` VIP: a short header whose connection ID names one of
/// the backends' ids in one of the three formats, or a random id, or has version 00;
/// or a long header; or a few random bytes.
fn quic_datagram(rng: &mut StdRng) -> PacketBuilder {
    let src = SocketAddrV4::new(client(rng), rng.random());
    let mut cid = [0u8; 8];
    rng.fill_bytes(&mut cid);
    let id = if rng.random_bool(0.7) {
        QUIC_IDS[rng.random_range(0..QUIC_IDS.len())]
    } else {
        rng.random()
    };
    match rng.random_range(0..3) {
        0 if id <= 0xffff => {
            cid[0] = 0x40 | (id >> 10) as u8;
            cid[1] = (id >> 2) as u8;
            cid[2] = (cid[2] & 0x3f) | ((id & 3) << 6) as u8;
        }
        1 if id <= 0xff_ffff => {
            cid[0] = 0x80 | (cid[0] & 0x3f);
            cid[1..4].copy_from_slice(&id.to_be_bytes()[1..]);
        }
        _ => {
            cid[0] |= 0xc0;
            cid[1..5].copy_from_slice(&id.to_be_bytes());
        }
    }
    if rng.random_bool(0.1) {
        cid[0] &= 0x3f;
    }
    let mut body = match rng.random_range(0..10) {
        0 => payload(rng, 12),
        1 => vec![0xc0 | rng.random::<u8>(), 0, 0, 0, 1, 8],
        _ => vec![0x40 | (rng.random::<u8>() & 0x3f)],
    };
    if body.len() <= 6 {
        body.extend_from_slice(&cid);
    }
    body.extend_from_slice(&payload(rng, 200));
    PacketBuilder::udp(src, VIP_QUIC).payload(&body)
}

/// The backend a QUIC short header in the IPv4 packet `ip` (20-byte header, UDP) to
/// the `quic` VIP names, decoded here from the CID format (the oracle), if any.
fn quic_named(ip: &[u8], inner_len: usize) -> Option<Ipv4Addr> {
    if ip[9] != 17
        || ip[16..20] != VIP_QUIC.ip().octets()
        || u16::from_be_bytes([ip[22], ip[23]]) != VIP_QUIC.port()
        || inner_len < 28 + 9
    {
        return None;
    }
    let h = &ip[28..];
    if h[0] & 0x80 != 0 {
        return None;
    }
    let c = &h[1..6];
    let id = match c[0] >> 6 {
        1 => (u32::from(c[0] & 0x3f) << 10) | (u32::from(c[1]) << 2) | u32::from(c[2] >> 6),
        2 => u32::from_be_bytes([0, c[1], c[2], c[3]]),
        3 => u32::from_be_bytes([c[1], c[2], c[3], c[4]]),
        _ => return None,
    };
    QUIC_IDS.iter().position(|&q| q == id).map(|i| BACKENDS[i])
}

/// Checks one frame's result against the design (module docs).
fn check(input: &[u8], verdict: u32, out: &[u8], macs: &Macs) -> anyhow::Result<()> {
    match verdict {
        XDP_PASS | XDP_DROP => {
            ensure!(out == input, "{} changed the frame", verdict_name(verdict));
            Ok(())
        }
        XDP_TX if is_answer(input, out) && is_ipv6(input) => check_answer6(input, out),
        XDP_TX if is_answer(input, out) => check_answer(input, out),
        XDP_TX | XDP_REDIRECT if GUE.get() => {
            let mac = if verdict == XDP_TX {
                macs.lb0
            } else {
                macs.far0
            };
            check_sent_gue(input, out, mac).map(drop)
        }
        XDP_TX if is_ipv6(input) || is_ipv6(out) => check_sent6(input, out, macs.lb0),
        XDP_TX => check_sent(input, out, macs.lb0, false),
        XDP_REDIRECT => check_sent(input, out, macs.far0, true),
        v => bail!("verdict {}", verdict_name(v)),
    }
}

thread_local! {
    /// The bed of this thread tunnels with `encap = "gue"` (set by the GUE run).
    static GUE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The bytes GUE adds to the outer header (its UDP header) in a GUE run, else 0.
fn gue_extra() -> usize {
    if GUE.get() { 8 } else { 0 }
}

/// Whether the balancer derives the sum of the inner packet `ip` (IPv4 or IPv6) from
/// its headers, and if so whether its transport checksum verifies: Some(ok) for TCP,
/// UDP with a checksum and ICMPv6, None when it sums the bytes (ICMP, UDP without
/// checksum, IPv4 with options). The outer UDP checksum of GUE over IPv6 must verify
/// exactly when this is None or Some(true).
fn inner_checksum_state(ip: &[u8], v6: bool) -> Option<bool> {
    if v6 {
        let (src, dst) = (v6_at(&ip[8..]), v6_at(&ip[24..]));
        let seg = &ip[40..];
        return match ip[6] {
            17 if seg.len() >= 8 && seg[6..8] == [0, 0] => None,
            nh @ (6 | 17 | 58) => Some(checksum6(src, dst, nh, seg) == 0),
            _ => None,
        };
    }
    if ip[0] != 0x45 {
        return None;
    }
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let seg = &ip[20..];
    match ip[9] {
        17 if seg.len() >= 8 && seg[6..8] == [0, 0] => None,
        proto @ (6 | 17) => {
            let c = xdplb_tests::packet::l4_checksum(src, dst, proto, seg);
            Some(c == 0 || (proto == 17 && c == 0xffff))
        }
        _ => None,
    }
}

/// A frame tunnelled in GUE (`encap = "gue"`), over IPv4 (IPv4 backends) or IPv6
/// (IPv6 backends): the inner packet is a VIP packet (or an ICMP error about a VIP
/// flow) exactly as it came in, right after the UDP header; the outer header is the
/// backend's family (protocol / next header UDP, TTL / hop limit 64, the inner class,
/// the tunnel source, lengths = inner + 8 (+ 20)), UDP from a port in 49152..=65535 to
/// the GUE port; over IPv4 the UDP checksum is 0, over IPv6 it is set and verifies
/// exactly when the inner transport checksum does (or when the inner bytes are summed:
/// [`inner_checksum_state`]); within the MTU; sent to that backend's MAC from
/// `src_mac`. Returns the kind: "gue4", "gue6 inner4", "gue6 inner6".
fn check_sent_gue(input: &[u8], out: &[u8], src_mac: [u8; 6]) -> anyhow::Result<&'static str> {
    let l3 = l3_offset(input).context("input has no L3")?;
    ensure!(l3 <= 18, "sent a frame with {} VLAN tags", (l3 - 14) / 4);
    let inner_v6 = is_ipv6(input);
    ensure!(
        inner_v6 || input[l3 - 2..l3] == ETH_P_IP.to_be_bytes(),
        "sent a frame that is not IP"
    );
    let ip_in = &input[l3..];
    let (vip, port, proto, inner_len) = flow_of(ip_in, inner_v6)?;
    let backends = l4_vips_any()
        .into_iter()
        .find(|(v, p, pr, _)| *v == vip && *p == port && *pr == proto)
        .map(|(_, _, _, b)| b)
        .with_context(|| format!("sent a packet to {vip}:{port}/{proto}, no L4 VIP"))?;
    ensure!(
        out.len() >= 42 && out[6..12] == src_mac,
        "Ethernet source is not the egress interface's"
    );
    let tc = if inner_v6 {
        (ip_in[0] << 4) | (ip_in[1] >> 4)
    } else {
        ip_in[1]
    };
    let (backend, hlen, kind) = match u16::from_be_bytes([out[12], out[13]]) {
        ETH_P_IPV6 => {
            ensure!(out.len() >= 62, "sent frame of {} bytes", out.len());
            let o = &out[14..54];
            ensure!(
                o[0..4] == [0x60 | (tc >> 4), tc << 4, 0, 0],
                "outer version/class/flow label {:02x?}, inner class {tc:#x}",
                &o[0..4]
            );
            ensure!(
                o[6] == 17 && o[7] == 64,
                "outer next header {} / hop limit {}",
                o[6],
                o[7]
            );
            ensure!(o[8..24] == LB6.octets(), "outer source");
            let payload = usize::from(u16::from_be_bytes([o[4], o[5]]));
            ensure!(
                payload == inner_len + 8,
                "outer payload length {payload}, inner {inner_len}"
            );
            let kind = if inner_v6 {
                "gue6 inner6"
            } else {
                "gue6 inner4"
            };
            (IpAddr::from(v6_at(&o[24..])), 40, kind)
        }
        ETH_P_IP => {
            let o = &out[14..34];
            ensure!(
                o[0] == 0x45 && internet_checksum(o) == 0,
                "outer IPv4 header"
            );
            ensure!(o[1] == tc, "outer TOS {:#x}, inner class {tc:#x}", o[1]);
            ensure!(
                o[8] == 64 && o[9] == 17,
                "outer TTL {} / protocol {}",
                o[8],
                o[9]
            );
            ensure!(
                u16::from_be_bytes([o[6], o[7]]) & 0x3fff == 0,
                "outer fragment"
            );
            ensure!(o[12..16] == LB_ADDR.octets(), "outer source");
            let tot = usize::from(u16::from_be_bytes([o[2], o[3]]));
            ensure!(
                tot == inner_len + 28,
                "outer total length {tot}, inner {inner_len}"
            );
            (
                IpAddr::from(Ipv4Addr::new(o[16], o[17], o[18], o[19])),
                20,
                "gue4",
            )
        }
        t => bail!("outer EtherType {t:#06x}"),
    };
    ensure!(
        backends.contains(&backend),
        "sent to {backend}, not a backend of {vip}:{port}"
    );
    let mac = match backend {
        IpAddr::V6(b) => BE6.iter().position(|x| *x == b).map(|i| BE6_MACS[i]),
        IpAddr::V4(b) if b == FAR_BACKEND => Some(FAR_MAC),
        IpAddr::V4(b) => BACKENDS
            .iter()
            .position(|x| *x == b)
            .map(|i| BACKEND_MACS[i]),
    };
    ensure!(
        Some(&out[0..6]) == mac.as_ref().map(|m| &m[..]),
        "Ethernet destination is not {backend}'s"
    );
    let udp = &out[14 + hlen..];
    ensure!(udp.len() == 8 + inner_len, "trailing bytes tunnelled");
    ensure!(14 + hlen + 8 + inner_len <= 14 + MTU, "over the MTU");
    ensure!(
        u16::from_be_bytes([udp[0], udp[1]]) >= 0xc000,
        "GUE source port {}",
        u16::from_be_bytes([udp[0], udp[1]])
    );
    ensure!(u16::from_be_bytes([udp[2], udp[3]]) == GUE_PORT, "GUE port");
    ensure!(
        usize::from(u16::from_be_bytes([udp[4], udp[5]])) == 8 + inner_len,
        "UDP length"
    );
    ensure!(udp[8..] == ip_in[..inner_len], "the inner packet changed");
    match backend {
        IpAddr::V6(b) => {
            ensure!(udp[6..8] != [0, 0], "GUE over IPv6 without a UDP checksum");
            let verifies = checksum6(LB6, b, 17, udp) == 0;
            let want = inner_checksum_state(&ip_in[..inner_len], inner_v6).unwrap_or(true);
            ensure!(
                verifies == want,
                "outer UDP checksum verifies: {verifies}, inner transport checksum verifies (or is summed): {want}"
            );
        }
        IpAddr::V4(_) => ensure!(udp[6..8] == [0, 0], "GUE over IPv4 with a UDP checksum"),
    }
    Ok(kind)
}

/// The interfaces' own MACs (the source of what leaves through them).
struct Macs {
    lb0: [u8; 6],
    far0: [u8; 6],
}

/// Whether `out` is the balancer's own answer to `input` (an echo reply or a
/// "fragmentation needed"), not a tunnelled packet: it goes back to the sender.
fn is_answer(input: &[u8], out: &[u8]) -> bool {
    out.len() >= 12 && input.len() >= 12 && out[0..6] == input[6..12]
}

/// An answer from XDP: MACs swapped, the same VLAN tags, IPv4 from the VIP back to
/// the sender, correct checksums; an echo reply of an echo request to an L4 VIP
/// address, or a "fragmentation needed" (MTU 1480, quoting as much as fits in 576 bytes)
/// for a DF TCP/UDP packet to an L4 VIP over the MTU once encapsulated.
fn check_answer(input: &[u8], out: &[u8]) -> anyhow::Result<()> {
    let l3 = l3_offset(input).context("input has no L3")?;
    ensure!(
        l3 <= 18,
        "answered a frame with {} VLAN tags",
        (l3 - 14) / 4
    );
    ensure!(out.len() >= l3 + 28, "answer of {} bytes", out.len());
    ensure!(out[6..12] == input[0..6], "answer's MACs are not swapped");
    ensure!(
        out[12..l3] == input[12..l3],
        "answer's tags/EtherType changed"
    );
    let (ip_in, ip_out) = (&input[l3..], &out[l3..]);
    ensure!(
        ip_in.len() >= 28 && ip_in[0] == 0x45,
        "answered a bad IPv4 header"
    );
    ensure!(ip_out[0] == 0x45, "answer's version/IHL {:#x}", ip_out[0]);
    ensure!(
        internet_checksum(&ip_out[..20]) == 0,
        "answer's IP checksum"
    );
    ensure!(ip_out[8] == 64, "answer's TTL {}", ip_out[8]);
    ensure!(ip_out[9] == 1, "answer's protocol {}", ip_out[9]);
    ensure!(
        ip_out[12..16] == ip_in[16..20] && ip_out[16..20] == ip_in[12..16],
        "answer's addresses are not the request's swapped"
    );
    let vip = Ipv4Addr::new(ip_in[16], ip_in[17], ip_in[18], ip_in[19]);
    let in_len = usize::from(u16::from_be_bytes([ip_in[2], ip_in[3]]));
    let out_len = usize::from(u16::from_be_bytes([ip_out[2], ip_out[3]]));
    ensure!(
        out_len <= ip_out.len(),
        "answer's total length past its frame"
    );
    if ip_in[9] == 1 {
        // Echo request -> reply: the same message but for the type (and checksum, which
        // stays right, or as wrong as it came).
        ensure!(
            l4_vips().iter().any(|(v, _, _)| *v.ip() == vip),
            "echo reply from {vip}, no L4 VIP address"
        );
        ensure!(
            ip_in[20..22] == [8, 0],
            "answered ICMP {:?}",
            &ip_in[20..22]
        );
        ensure!(
            out.len() == input.len() && out_len == in_len,
            "echo reply length"
        );
        ensure!(ip_out[20] == 0 && ip_out[21] == 0, "echo reply type/code");
        ensure!(ip_out[24..] == ip_in[24..], "echo reply data changed");
        ensure!(
            internet_checksum(&ip_out[20..out_len]) == internet_checksum(&ip_in[20..in_len]),
            "echo reply checksum not updated"
        );
        return Ok(());
    }
    let proto = ip_in[9];
    let dport = u16::from_be_bytes([ip_in[22], ip_in[23]]);
    ensure!(
        l4_vips()
            .iter()
            .any(|(v, p, _)| *v.ip() == vip && v.port() == dport && *p == proto),
        "fragmentation needed for {vip}:{dport}/{proto}, no L4 VIP"
    );
    ensure!(
        ip_in[6] & 0x40 != 0,
        "fragmentation needed for a DF-clear packet"
    );
    // The tunnel header: 20 bytes, checked before the backend is chosen; then 40 bytes
    // towards IPv6 backends (4in6), checked after: a packet over MTU - 20 hears
    // MTU - 20 first, one between MTU - 40 and MTU - 20 to VIP_MIXED hears MTU - 40.
    // With GUE both grow by 8 (its UDP header).
    let outer = if vip == *VIP_MIXED.ip() && in_len + 20 + gue_extra() <= MTU {
        40 + gue_extra()
    } else {
        20 + gue_extra()
    };
    ensure!(
        in_len + outer > MTU,
        "fragmentation needed for {in_len} bytes"
    );
    // The quote: as much of the packet as fits in 576 bytes (RFC 1812 4.3.2.3).
    let quote = in_len.min(548);
    ensure!(
        out_len == 28 + quote && out.len() == l3 + 28 + quote,
        "fragmentation needed of {out_len} bytes in a {}-byte frame for {in_len} bytes",
        out.len()
    );
    ensure!(ip_out[20..22] == [3, 4], "type/code {:?}", &ip_out[20..22]);
    ensure!(
        internet_checksum(&ip_out[20..out_len]) == 0,
        "ICMP checksum"
    );
    ensure!(
        u16::from_be_bytes([ip_out[26], ip_out[27]]) as usize == MTU - outer,
        "next-hop MTU"
    );
    ensure!(
        ip_out[28..out_len] == ip_in[..quote],
        "quote is not the packet's head"
    );
    Ok(())
}

/// `redirected`: sent through `far0` (XDP_REDIRECT), else back out of `lb0` (XDP_TX).
fn check_sent(input: &[u8], out: &[u8], src_mac: [u8; 6], redirected: bool) -> anyhow::Result<()> {
    // What came in: IPv4 (after at most one tag), TCP/UDP to an L4 VIP.
    let l3 = l3_offset(input).context("input has no L3")?;
    ensure!(l3 <= 18, "sent a frame with {} VLAN tags", (l3 - 14) / 4);
    ensure!(
        input[l3 - 2..l3] == ETH_P_IP.to_be_bytes(),
        "sent a frame that is not IPv4"
    );
    let ip_in = &input[l3..];
    ensure!(
        ip_in.len() >= 20 && ip_in[0] == 0x45,
        "sent a packet with IHL/version {:#x}",
        ip_in.first().copied().unwrap_or(0)
    );
    let inner_len = usize::from(u16::from_be_bytes([ip_in[2], ip_in[3]]));
    ensure!(
        inner_len <= ip_in.len(),
        "sent a packet whose total length {inner_len} is past the frame ({})",
        ip_in.len()
    );
    ensure!(
        u16::from_be_bytes([ip_in[6], ip_in[7]]) & 0x3fff == 0,
        "sent a fragment"
    );
    let mut proto = ip_in[9];
    let mut dst = Ipv4Addr::new(ip_in[16], ip_in[17], ip_in[18], ip_in[19]);
    let mut dport = u16::from_be_bytes([ip_in[22], ip_in[23]]);
    if proto == 1 {
        // An ICMP error to a VIP address is sent to the backend of the flow it quotes:
        // a reply VIP -> client (20-byte header, from the address the error went to).
        ensure!(ip_in[20] == 3, "tunnelled ICMP type {}", ip_in[20]);
        let q = &ip_in[28..inner_len];
        ensure!(
            q.len() >= 28 && q[0] == 0x45,
            "tunnelled an error with a bad quote"
        );
        ensure!(
            q[12..16] == ip_in[16..20],
            "tunnelled an error quoting another source"
        );
        ensure!(
            u16::from_be_bytes([q[6], q[7]]) & 0x1fff == 0,
            "tunnelled an error quoting a later fragment"
        );
        proto = q[9];
        dst = Ipv4Addr::new(q[12], q[13], q[14], q[15]);
        dport = u16::from_be_bytes([q[20], q[21]]);
    }
    let backends = l4_vips()
        .into_iter()
        .find(|(vip, p, _)| *vip.ip() == dst && vip.port() == dport && *p == proto)
        .map(|(_, _, b)| b)
        .with_context(|| format!("sent a packet to {dst}:{dport}/{proto}, no L4 VIP"))?;

    // What went out: Ethernet + outer IPv4 + exactly the inner packet.
    ensure!(out.len() >= 34, "sent frame of {} bytes", out.len());
    ensure!(
        out[6..12] == src_mac,
        "Ethernet source is not the sending interface's"
    );
    ensure!(
        out[12..14] == ETH_P_IP.to_be_bytes(),
        "outer EtherType {:02x?}",
        &out[12..14]
    );
    let outer = &out[14..34];
    ensure!(outer[0] == 0x45, "outer version/IHL {:#x}", outer[0]);
    ensure!(
        internet_checksum(outer) == 0,
        "outer header checksum is wrong"
    );
    ensure!(outer[8] == 64, "outer TTL {}", outer[8]);
    ensure!(outer[9] == 4, "outer protocol {}", outer[9]);
    ensure!(
        u16::from_be_bytes([outer[6], outer[7]]) & 0x3fff == 0,
        "outer header is a fragment"
    );
    ensure!(
        outer[12..16] == LB_ADDR.octets(),
        "outer source {:?}",
        &outer[12..16]
    );
    let backend = Ipv4Addr::new(outer[16], outer[17], outer[18], outer[19]);
    ensure!(
        backends.contains(&backend),
        "sent to {backend}, not a backend of {dst}:{dport}"
    );
    if let Some(named) = quic_named(ip_in, inner_len) {
        ensure!(
            backend == named,
            "a QUIC connection ID names {named}, sent to {backend}"
        );
    }
    let (mac, far) = match BACKENDS.iter().position(|&b| b == backend) {
        Some(i) => (BACKEND_MACS[i], false),
        None => (FAR_MAC, true),
    };
    ensure!(out[0..6] == mac, "Ethernet destination is not {backend}'s");
    ensure!(
        far == redirected,
        "{backend} sent with the wrong verdict (redirected: {redirected})"
    );
    let outer_len = usize::from(u16::from_be_bytes([outer[2], outer[3]]));
    ensure!(
        outer_len == inner_len + 20,
        "outer total length {outer_len}, inner {inner_len} + 20"
    );
    ensure!(
        out.len() == 14 + outer_len,
        "the frame carries {} bytes after the outer header's {outer_len} (trailing bytes tunnelled)",
        out.len() - 14
    );
    ensure!(
        outer_len <= MTU,
        "outer packet of {outer_len} bytes, over the MTU"
    );
    ensure!(
        out[34..] == ip_in[..inner_len],
        "the inner packet is not the one that came in"
    );
    Ok(())
}

/// Whether the frame (after its tags) carries IPv6.
fn is_ipv6(frame: &[u8]) -> bool {
    l3_offset(frame).is_some_and(|l3| frame.get(l3 - 2..l3) == Some(&ETH_P_IPV6.to_be_bytes()[..]))
}

fn v6_at(b: &[u8]) -> Ipv6Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[..16]);
    Ipv6Addr::from(a)
}

/// The VIP flow an IPv4 or IPv6 packet (or the ICMP error about one) belongs to, as
/// (VIP address, port, protocol), and the packet's IP length; an error when the
/// balancer had no business sending it.
fn flow_of(ip: &[u8], v6: bool) -> anyhow::Result<(IpAddr, u16, u8, usize)> {
    if !v6 {
        ensure!(
            ip.len() >= 28 && ip[0] == 0x45,
            "sent an IPv4 packet with a bad header"
        );
        let len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        ensure!(
            (28..=ip.len()).contains(&len),
            "sent an IPv4 packet of length {len}"
        );
        ensure!(
            u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff == 0,
            "sent a fragment"
        );
        if ip[9] == 1 {
            ensure!(ip[20] == 3, "tunnelled ICMP type {}", ip[20]);
            let q = &ip[28..len];
            ensure!(
                q.len() >= 28 && q[0] == 0x45 && q[12..16] == ip[16..20],
                "bad quote tunnelled"
            );
            let vip = Ipv4Addr::new(q[12], q[13], q[14], q[15]);
            return Ok((vip.into(), u16::from_be_bytes([q[20], q[21]]), q[9], len));
        }
        let vip = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
        return Ok((vip.into(), u16::from_be_bytes([ip[22], ip[23]]), ip[9], len));
    }
    ensure!(
        ip.len() >= 48 && ip[0] >> 4 == 6,
        "sent an IPv6 packet with a bad header"
    );
    let len = 40 + usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    ensure!(
        len <= ip.len(),
        "sent an IPv6 packet whose payload length is past the frame"
    );
    if ip[6] == 58 {
        ensure!(matches!(ip[40], 1 | 2), "tunnelled ICMPv6 type {}", ip[40]);
        let q = &ip[48..len];
        ensure!(
            q.len() >= 48 && q[0] >> 4 == 6 && q[8..24] == ip[24..40],
            "bad quote tunnelled"
        );
        ensure!(
            matches!(q[6], 6 | 17),
            "tunnelled an error quoting next header {}",
            q[6]
        );
        return Ok((
            v6_at(&q[8..]).into(),
            u16::from_be_bytes([q[40], q[41]]),
            q[6],
            len,
        ));
    }
    ensure!(matches!(ip[6], 6 | 17), "sent IPv6 next header {}", ip[6]);
    Ok((
        v6_at(&ip[24..]).into(),
        u16::from_be_bytes([ip[42], ip[43]]),
        ip[6],
        len,
    ))
}

/// A tunnelled frame where either side is IPv6 (6in6, 4in6, 6in4): the inner packet
/// is a VIP packet (or an ICMP error about a VIP flow) exactly as it came in, the
/// outer header is the backend's family with the right protocol, lengths, hop limit
/// or TTL, the tunnel source, and a backend of that VIP; within the MTU; sent to the
/// backend's MAC from `lb0`'s (every IPv6 path's backend is on `lb0`).
fn check_sent6(input: &[u8], out: &[u8], src_mac: [u8; 6]) -> anyhow::Result<()> {
    let l3 = l3_offset(input).context("input has no L3")?;
    ensure!(l3 <= 18, "sent a frame with {} VLAN tags", (l3 - 14) / 4);
    let inner_v6 = is_ipv6(input);
    ensure!(
        inner_v6 || input[l3 - 2..l3] == ETH_P_IP.to_be_bytes(),
        "sent a frame that is not IP"
    );
    let ip_in = &input[l3..];
    let (vip, port, proto, inner_len) = flow_of(ip_in, inner_v6)?;
    let backends = l4_vips_any()
        .into_iter()
        .find(|(v, p, pr, _)| *v == vip && *p == port && *pr == proto)
        .map(|(_, _, _, b)| b)
        .with_context(|| format!("sent a packet to {vip}:{port}/{proto}, no L4 VIP"))?;
    ensure!(
        out.len() >= 34 && out[6..12] == src_mac,
        "Ethernet source is not lb0's"
    );
    let inner_proto = if inner_v6 { 41 } else { 4 };
    // The inner traffic class / TOS, copied to the outer header.
    let tc = if inner_v6 {
        (ip_in[0] << 4) | (ip_in[1] >> 4)
    } else {
        ip_in[1]
    };
    let (backend, outer_len) = match u16::from_be_bytes([out[12], out[13]]) {
        ETH_P_IPV6 => {
            ensure!(out.len() >= 54, "sent frame of {} bytes", out.len());
            let o = &out[14..54];
            ensure!(
                o[0..4] == [0x60 | (tc >> 4), tc << 4, 0, 0],
                "outer version/class/flow label {:02x?}, inner class {tc:#x}",
                &o[0..4]
            );
            ensure!(o[6] == inner_proto, "outer next header {}", o[6]);
            ensure!(o[7] == 64, "outer hop limit {}", o[7]);
            ensure!(o[8..24] == LB6.octets(), "outer source");
            let payload = usize::from(u16::from_be_bytes([o[4], o[5]]));
            ensure!(
                payload == inner_len,
                "outer payload length {payload}, inner {inner_len}"
            );
            (IpAddr::from(v6_at(&o[24..])), 40 + payload)
        }
        ETH_P_IP => {
            let o = &out[14..34];
            ensure!(
                o[0] == 0x45 && internet_checksum(o) == 0,
                "outer IPv4 header"
            );
            ensure!(o[1] == tc, "outer TOS {:#x}, inner class {tc:#x}", o[1]);
            ensure!(
                o[8] == 64 && o[9] == inner_proto,
                "outer TTL {} / protocol {}",
                o[8],
                o[9]
            );
            ensure!(
                u16::from_be_bytes([o[6], o[7]]) & 0x3fff == 0,
                "outer fragment"
            );
            ensure!(o[12..16] == LB_ADDR.octets(), "outer source");
            let tot = usize::from(u16::from_be_bytes([o[2], o[3]]));
            ensure!(
                tot == inner_len + 20,
                "outer total length {tot}, inner {inner_len}"
            );
            (IpAddr::from(Ipv4Addr::new(o[16], o[17], o[18], o[19])), tot)
        }
        t => bail!("outer EtherType {t:#06x}"),
    };
    ensure!(
        backends.contains(&backend),
        "sent to {backend}, not a backend of {vip}:{port}"
    );
    let mac = match backend {
        IpAddr::V6(b) => BE6.iter().position(|x| *x == b).map(|i| BE6_MACS[i]),
        IpAddr::V4(b) => BACKENDS
            .iter()
            .position(|x| *x == b)
            .map(|i| BACKEND_MACS[i]),
    };
    ensure!(
        Some(&out[0..6]) == mac.as_ref().map(|m| &m[..]),
        "Ethernet destination is not {backend}'s"
    );
    ensure!(out.len() == 14 + outer_len, "trailing bytes tunnelled");
    ensure!(
        outer_len <= MTU,
        "outer packet of {outer_len} bytes, over the MTU"
    );
    ensure!(
        out[14 + outer_len - inner_len..] == ip_in[..inner_len],
        "the inner packet changed"
    );
    Ok(())
}

/// An answer from XDP to an IPv6 frame: MACs swapped, the same tags, IPv6 from the VIP
/// back to the sender, hop limit 64; an echo reply (type 129, the request's data, its
/// checksum as right as it came) to an echo request to an L4 VIP address, or a
/// "packet too big" (MTU = 1500 less the tunnel header, quoting as much as fits in 1280 bytes, checksum
/// right) for a TCP/UDP packet to an L4 VIP over the MTU once encapsulated.
fn check_answer6(input: &[u8], out: &[u8]) -> anyhow::Result<()> {
    let l3 = l3_offset(input).context("input has no L3")?;
    ensure!(
        l3 <= 18,
        "answered a frame with {} VLAN tags",
        (l3 - 14) / 4
    );
    ensure!(out.len() >= l3 + 48, "answer of {} bytes", out.len());
    ensure!(
        out[6..12] == input[0..6] && out[0..6] == input[6..12],
        "MACs not swapped"
    );
    ensure!(
        out[12..l3] == input[12..l3],
        "answer's tags/EtherType changed"
    );
    let (ip_in, ip_out) = (&input[l3..], &out[l3..]);
    ensure!(
        ip_in.len() >= 48 && ip_in[0] >> 4 == 6,
        "answered a bad IPv6 header"
    );
    ensure!(
        ip_out[0] >> 4 == 6 && ip_out[6] == 58 && ip_out[7] == 64,
        "answer's header"
    );
    ensure!(
        ip_out[8..24] == ip_in[24..40] && ip_out[24..40] == ip_in[8..24],
        "addresses not swapped"
    );
    let vip = IpAddr::from(v6_at(&ip_in[24..]));
    let out_len = 40 + usize::from(u16::from_be_bytes([ip_out[4], ip_out[5]]));
    ensure!(
        out_len <= ip_out.len(),
        "answer's payload length past its frame"
    );
    let (src, dst) = (v6_at(&ip_out[8..]), v6_at(&ip_out[24..]));
    if ip_in[6] == 58 {
        ensure!(
            l4_vips_any().iter().any(|(v, ..)| *v == vip),
            "echo reply from {vip}, no L4 VIP"
        );
        ensure!(
            ip_in[40..42] == [128, 0],
            "answered ICMPv6 {:?}",
            &ip_in[40..42]
        );
        ensure!(
            out.len() == input.len() && ip_out[4..6] == ip_in[4..6],
            "echo reply length"
        );
        ensure!(ip_out[40..42] == [129, 0], "echo reply type/code");
        ensure!(ip_out[44..] == ip_in[44..], "echo reply data changed");
        let in_len = out_len;
        ensure!(
            checksum6(src, dst, 58, &ip_out[40..out_len])
                == checksum6(dst, src, 58, &ip_in[40..in_len]),
            "echo reply checksum not updated"
        );
        return Ok(());
    }
    let (proto, dport) = (ip_in[6], u16::from_be_bytes([ip_in[42], ip_in[43]]));
    let (_, _, _, backends) = l4_vips_any()
        .into_iter()
        .find(|(v, p, pr, _)| *v == vip && *p == dport && *pr == proto)
        .with_context(|| format!("packet too big for {vip}:{dport}/{proto}, no L4 VIP"))?;
    let outer = if backends.iter().all(IpAddr::is_ipv6) {
        40 + gue_extra()
    } else {
        20 + gue_extra()
    };
    let in_len = 40 + usize::from(u16::from_be_bytes([ip_in[4], ip_in[5]]));
    ensure!(in_len + outer > MTU, "packet too big for {in_len} bytes");
    // The quote: as much of the packet as fits in 1280 bytes (RFC 4443 2.4(c)).
    let quote = in_len.min(1232);
    ensure!(
        out_len == 48 + quote && out.len() == l3 + 48 + quote,
        "packet too big of {out_len} bytes for {in_len} bytes"
    );
    ensure!(ip_out[40..42] == [2, 0], "type/code {:?}", &ip_out[40..42]);
    ensure!(
        checksum6(src, dst, 58, &ip_out[40..out_len]) == 0,
        "ICMPv6 checksum"
    );
    let mtu = u32::from_be_bytes([ip_out[44], ip_out[45], ip_out[46], ip_out[47]]);
    ensure!(mtu as usize == MTU - outer, "MTU {mtu}");
    ensure!(
        ip_out[48..out_len] == ip_in[..quote],
        "quote is not the packet's head"
    );
    Ok(())
}

/// The outcome counters ([`Counter::is_outcome`]: everything but `rx` and bookkeeping) by label.
fn outcomes(c: &Counters) -> BTreeMap<&'static str, u64> {
    c.counters
        .iter()
        .filter(|(k, _)| k.is_outcome())
        .map(|(k, v)| (k.label(), *v))
        .chain(c.drops.iter().map(|(k, v)| (k.label(), *v)))
        .collect()
}

/// The counters one verdict may move.
fn allowed_outcomes(verdict: u32) -> Vec<&'static str> {
    match verdict {
        XDP_TX => vec![
            Counter::Tx.label(),
            Counter::IcmpEchoReply.label(),
            Counter::IcmpFragNeeded.label(),
            Counter::Icmp6TooBig.label(),
        ],
        XDP_REDIRECT => vec![Counter::Redirect.label()],
        XDP_DROP => DropReason::ALL.iter().map(|r| r.label()).collect(),
        _ => Counter::ALL
            .iter()
            .filter(|c| c.label().starts_with("pass_"))
            .map(|c| c.label())
            .collect(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Next hops as the agent writes them into `NEXT_HOPS` (issue 12) for the first
/// backend and the one behind `far0`, with the MACs the neighbour table gives: those
/// backends' packets take the map's next hop, the others `bpf_fib_lookup`'s, and
/// [`check`] holds for both.
impl Bed {
    fn write_some_next_hops(&mut self) -> anyhow::Result<()> {
        let far0 = loader::if_index("far0")?;
        for (id, addr) in self.lb.reconciler.backend_addresses() {
            let (ifindex, dmac, smac) = if addr == BACKENDS[0] {
                (self.ifindex, BACKEND_MACS[0], self.macs.lb0)
            } else if addr == FAR_BACKEND {
                (far0, FAR_MAC, self.macs.far0)
            } else {
                continue;
            };
            let (words, family) = lb_agent::dataplane::sync::addr_words(addr);
            let entry = lb_common::types::NextHopEntry {
                addr: words,
                ifindex,
                mtu: 1500,
                family,
                flags: lb_common::types::NEXT_HOP_F_VALID,
                dmac,
                smac,
            };
            self.lb.maps.next_hops.set(id, entry, 0)?;
        }
        Ok(())
    }
}

struct Bed {
    lb: LoadedLb,
    ifindex: u32,
    macs: Macs,
    _forwarding: InterfaceForwarding,
}

impl Bed {
    fn run(&self, frame: &[u8]) -> anyhow::Result<(u32, Vec<u8>)> {
        let ctx = xdp_md(frame.len(), self.ifindex, 0);
        let run = test_run(self.lb.program(LB_PROGRAM)?, frame, &ctx, 1)?;
        Ok((run.verdict, run.out))
    }

    /// Runs and checks one frame; `sample` also checks its counters one by one.
    fn one(&self, frame: &[u8], sample: bool, totals: &mut Totals) -> anyhow::Result<()> {
        let before = if sample {
            Some(self.lb.counters()?)
        } else {
            None
        };
        let (verdict, out) = self.run(frame)?;
        check(frame, verdict, &out, &self.macs)?;
        if GUE.get() && matches!(verdict, XDP_TX | XDP_REDIRECT) && !is_answer(frame, &out) {
            let kind = check_sent_gue(
                frame,
                &out,
                if verdict == XDP_TX {
                    self.macs.lb0
                } else {
                    self.macs.far0
                },
            )?;
            *totals.tunnels6.entry(kind).or_default() += 1;
        } else if verdict == XDP_TX && !is_answer(frame, &out) && (is_ipv6(frame) || is_ipv6(&out))
        {
            let kind = match (is_ipv6(frame), is_ipv6(&out)) {
                (true, true) => "6in6",
                (false, true) => "4in6",
                _ => "6in4",
            };
            *totals.tunnels6.entry(kind).or_default() += 1;
        }
        totals.frames += 1;
        *totals.by_verdict.entry(verdict).or_default() += 1;
        if let Some(before) = before {
            let after = self.lb.counters()?;
            ensure!(
                after.get(Counter::Rx) == before.get(Counter::Rx) + 1,
                "rx not counted once"
            );
            let (b, a) = (outcomes(&before), outcomes(&after));
            let moved: Vec<&str> = a
                .iter()
                .filter(|(k, v)| b.get(*k) != Some(*v))
                .map(|(k, _)| *k)
                .collect();
            ensure!(
                moved.len() == 1
                    && a[moved[0]] == b[moved[0]] + 1
                    && allowed_outcomes(verdict).contains(&moved[0]),
                "{} counted under {moved:?}",
                verdict_name(verdict)
            );
        }
        Ok(())
    }
}

#[test]
fn random_and_mutated_frames_get_only_allowed_verdicts_and_well_formed_output() -> anyhow::Result<()>
{
    let test = require_privileges!();
    let seed = match std::env::var("XDPLB_FUZZ_SEED") {
        Ok(s) => s.parse().context("XDPLB_FUZZ_SEED must be a u64")?,
        Err(_) => rand::rng().next_u64(),
    };
    let frames: u64 = match std::env::var("XDPLB_FUZZ_FRAMES") {
        Ok(s) => s.parse().context("XDPLB_FUZZ_FRAMES must be a number")?,
        Err(_) => DEFAULT_FRAMES,
    };
    println!("{test}: seed {seed} (replay with XDPLB_FUZZ_SEED={seed}), {frames} frames");
    let result = in_bed("fz", &net(), move || {
        net6()?;
        let mut bed = Bed {
            lb: LoadedLb::load(&caps(), &desired(), &[LB_PROGRAM])?,
            ifindex: loader::if_index("lb0")?,
            macs: Macs {
                lb0: xdplb_tests::netns::mac_of("lb0")?,
                far0: xdplb_tests::netns::mac_of("far0")?,
            },
            _forwarding: InterfaceForwarding::enable("lb0")?,
        };
        bed.write_some_next_hops()?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut totals = Totals::default();
        let start = bed.lb.counters()?;
        // One frame of each kind, cut at every offset.
        for kind in 0..KINDS {
            let whole = frame_of_kind(&mut rng, kind);
            for len in 14..=whole.len() {
                let frame = &whole[..len];
                bed.one(frame, false, &mut totals)
                    .with_context(|| format!("kind {kind} cut at {len}: frame {}", hex(frame)))?;
            }
        }
        let mut i = 0u64;
        while totals.frames < frames {
            let kind = rng.random_range(0..KINDS);
            let mut frame = frame_of_kind(&mut rng, kind);
            if rng.random_bool(0.7) {
                mutate(&mut rng, &mut frame);
            }
            bed.one(&frame, i.is_multiple_of(COUNTER_SAMPLE), &mut totals)
                .with_context(|| format!("frame {i} (kind {kind}): {}", hex(&frame)))?;
            i += 1;
        }
        // Over the whole run: every frame counted once, under an outcome of its verdict.
        let end = bed.lb.counters()?;
        let delta = |c: Counter| end.get(c) - start.get(c);
        ensure!(delta(Counter::Rx) == totals.frames, "rx over the run");
        let (s, e) = (outcomes(&start), outcomes(&end));
        let sum = |labels: Vec<&str>| -> u64 { labels.iter().map(|l| e[l] - s[l]).sum() };
        for verdict in [XDP_PASS, XDP_DROP, XDP_TX, XDP_REDIRECT] {
            let seen = totals.by_verdict.get(&verdict).copied().unwrap_or(0);
            let counted = sum(allowed_outcomes(verdict));
            ensure!(
                seen == counted,
                "{} verdicts: {seen}, counted under its outcomes: {counted}",
                verdict_name(verdict)
            );
        }
        let named: Vec<String> = totals
            .by_verdict
            .iter()
            .map(|(v, n)| format!("{} {n}", verdict_name(*v)))
            .collect();
        println!("{} frames: {}", totals.frames, named.join(", "));
        // The ICMP paths ran (each is thousands of frames at the default count).
        let icmp = [
            (
                Counter::IcmpEchoReply.label(),
                delta(Counter::IcmpEchoReply),
            ),
            (
                Counter::IcmpFragNeeded.label(),
                delta(Counter::IcmpFragNeeded),
            ),
            (Counter::Icmp6TooBig.label(), delta(Counter::Icmp6TooBig)),
            (
                Counter::IcmpErrorForwarded.label(),
                delta(Counter::IcmpErrorForwarded),
            ),
            (
                DropReason::IcmpBadQuote.label(),
                end.drop_count(DropReason::IcmpBadQuote)
                    - start.drop_count(DropReason::IcmpBadQuote),
            ),
        ];
        println!("ICMP: {icmp:?}");
        let quic = [
            (
                Counter::QuicCidRouted.label(),
                delta(Counter::QuicCidRouted),
            ),
            (
                Counter::QuicCidUnknown.label(),
                delta(Counter::QuicCidUnknown),
            ),
        ];
        println!("QUIC: {quic:?}");
        println!("IPv6 tunnels: {:?}", totals.tunnels6);
        if totals.frames >= DEFAULT_FRAMES {
            for kind in ["6in6", "4in6", "6in4"] {
                ensure!(
                    totals.tunnels6.get(kind).copied().unwrap_or(0) > 0,
                    "no frame was sent {kind}: the generator misses a path"
                );
            }
        }
        if totals.frames >= DEFAULT_FRAMES {
            for (label, n) in icmp.into_iter().chain(quic) {
                ensure!(
                    n > 0,
                    "no frame reached {label}: the generator misses a path"
                );
            }
        }
        Ok(())
    });
    result.with_context(|| format!("seed {seed} (replay with XDPLB_FUZZ_SEED={seed})"))
}

/// Frames of the GUE run ([`random_frames_with_gue_to_both_backend_families`]).
const GUE_FRAMES: u64 = 30_000;

/// The same generator and oracle with `encap = "gue"` (issue 11, session 17): IPv4
/// backends get GUE over IPv4, IPv6 backends GUE over IPv6, and every tunnelled frame
/// is checked by [`check_sent_gue`] (the outer UDP checksum of GUE over IPv6 verifies
/// exactly when the inner transport checksum does, mutated ones included), every
/// answer with the MTU less GUE's 48 / 28 bytes. A default run must send all three
/// kinds (GUE over IPv4, IPv4 and IPv6 in GUE over IPv6). `XDPLB_FUZZ_SEED` replays,
/// `XDPLB_FUZZ_GUE_FRAMES` changes the count.
#[test]
fn random_frames_with_gue_to_both_backend_families() -> anyhow::Result<()> {
    let test = require_privileges!();
    let seed = match std::env::var("XDPLB_FUZZ_SEED") {
        Ok(s) => s.parse().context("XDPLB_FUZZ_SEED must be a u64")?,
        Err(_) => rand::rng().next_u64(),
    };
    let frames: u64 = match std::env::var("XDPLB_FUZZ_GUE_FRAMES") {
        Ok(s) => s
            .parse()
            .context("XDPLB_FUZZ_GUE_FRAMES must be a number")?,
        Err(_) => GUE_FRAMES,
    };
    println!("{test}: seed {seed} (replay with XDPLB_FUZZ_SEED={seed}), {frames} frames");
    let result = in_bed("fzg", &net(), move || {
        net6()?;
        GUE.set(true);
        let mut state = desired();
        state.encap = lb_common::types::ENCAP_GUE;
        state.gue_port = GUE_PORT;
        let mut bed = Bed {
            lb: LoadedLb::load(&caps(), &state, &[LB_PROGRAM])?,
            ifindex: loader::if_index("lb0")?,
            macs: Macs {
                lb0: xdplb_tests::netns::mac_of("lb0")?,
                far0: xdplb_tests::netns::mac_of("far0")?,
            },
            _forwarding: InterfaceForwarding::enable("lb0")?,
        };
        bed.write_some_next_hops()?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut totals = Totals::default();
        let mut i = 0u64;
        while totals.frames < frames {
            let kind = rng.random_range(0..KINDS);
            let mut frame = frame_of_kind(&mut rng, kind);
            if rng.random_bool(0.7) {
                mutate(&mut rng, &mut frame);
            }
            bed.one(&frame, i.is_multiple_of(COUNTER_SAMPLE), &mut totals)
                .with_context(|| format!("frame {i} (kind {kind}): {}", hex(&frame)))?;
            i += 1;
        }
        let named: Vec<String> = totals
            .by_verdict
            .iter()
            .map(|(v, n)| format!("{} {n}", verdict_name(*v)))
            .collect();
        println!("{} frames: {}", totals.frames, named.join(", "));
        println!("GUE tunnels: {:?}", totals.tunnels6);
        if totals.frames >= GUE_FRAMES {
            for kind in ["gue4", "gue6 inner4", "gue6 inner6"] {
                ensure!(
                    totals.tunnels6.get(kind).copied().unwrap_or(0) > 0,
                    "no frame was sent as {kind}: the generator misses a path"
                );
            }
        }
        Ok(())
    });
    result.with_context(|| format!("seed {seed} (replay with XDPLB_FUZZ_SEED={seed})"))
}

#[test]
fn the_generator_is_reproducible() {
    let a: Vec<Vec<u8>> = {
        let mut rng = StdRng::seed_from_u64(7);
        (0..50)
            .map(|i| frame_of_kind(&mut rng, i % KINDS))
            .collect()
    };
    let b: Vec<Vec<u8>> = {
        let mut rng = StdRng::seed_from_u64(7);
        (0..50)
            .map(|i| frame_of_kind(&mut rng, i % KINDS))
            .collect()
    };
    assert_eq!(a, b);
    // The checker refuses what the design does not allow.
    let f = PacketBuilder::tcp(SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 1), VIP_WEB).build();
    let macs = Macs {
        lb0: [0; 6],
        far0: [0; 6],
    };
    assert!(check(&f, 0, &f, &macs).is_err(), "XDP_ABORTED accepted");
    assert!(
        check(&f, XDP_PASS, &f[1..], &macs).is_err(),
        "changed pass accepted"
    );
    assert!(
        check(&f, XDP_TX, &f, &macs).is_err(),
        "unencapsulated TX accepted"
    );
    assert!(Frame::parse(&f).is_ok());
}

// --- the decapsulator ------------------------------------------------------------------

/// The tunnel address `xdp_decap` accepts in [`random_frames_through_the_decapsulator`].
const DECAP_ADDR: Ipv4Addr = BACKENDS[0];
const DECAP_FRAMES: u64 = 30_000;

/// A frame a backend may see: IPIP or GUE (UDP to [`GUE_PORT`], or near it) to the
/// tunnel address or elsewhere, with an IPv4 or IPv6 packet, garbage or nothing inside;
/// or plain UDP/TCP; behind 0 to 3 VLAN tags.
fn decap_frame(rng: &mut StdRng) -> Vec<u8> {
    let dst = if rng.random_bool(0.8) {
        DECAP_ADDR
    } else {
        BACKENDS[rng.random_range(1..3)]
    };
    let inner = match rng.random_range(0..4) {
        0 => ipv4_l4(rng).build_ipv4(),
        1 => ipv6_packet(rng),
        2 => icmp_error(rng).build_ipv4(),
        _ => payload(rng, 64),
    };
    let ip = match rng.random_range(0..5) {
        0 | 1 => {
            let port = if rng.random_bool(0.8) {
                GUE_PORT
            } else {
                GUE_PORT
                    .wrapping_add(rng.random_range(0..3))
                    .wrapping_sub(1)
            };
            PacketBuilder::udp(
                SocketAddrV4::new(LB_ADDR, rng.random()),
                SocketAddrV4::new(dst, port),
            )
            .l4_checksum(0)
            .fragment(false, false, 0)
            .payload(&inner)
            .build_ipv4()
        }
        // IPIP, or (main's IPv6 tunnels) IPv6 in IPv4, protocol 41, mostly with an
        // IPv6 packet inside.
        2 | 3 => PacketBuilder::raw(
            LB_ADDR,
            dst,
            if inner.first().map(|b| b >> 4) == Some(6) && rng.random_bool(0.7) {
                41
            } else {
                4
            },
        )
        .fragment(false, false, 0)
        .payload(&inner)
        .build_ipv4(),
        _ => ipv4_l4(rng).build_ipv4(),
    };
    ethernet(rng, ETH_P_IP, &ip)
}

/// What `xdp_decap` may do with `input`: pass it unchanged, or, for an IPIP, 6in4 or
/// GUE packet to the tunnel address (20-byte outer header, not a fragment, an IPv4
/// (IPIP, GUE) or IPv6 (6in4, GUE) header inside), pass the inner packet behind the same Ethernet header
/// and tags with the inner EtherType.
fn check_decap(input: &[u8], verdict: u32, out: &[u8]) -> anyhow::Result<()> {
    ensure!(verdict == XDP_PASS, "verdict {}", verdict_name(verdict));
    if out == input {
        return Ok(());
    }
    let l3 = l3_offset(input).context("decapsulated a frame without L3")?;
    ensure!(l3 <= 18, "decapsulated a frame with {} tags", (l3 - 14) / 4);
    ensure!(
        input[l3 - 2..l3] == ETH_P_IP.to_be_bytes(),
        "decapsulated a frame that is not IPv4"
    );
    let ip = &input[l3..];
    ensure!(
        ip.len() >= 20 && ip[0] == 0x45,
        "decapsulated IHL/version {:#x}",
        ip[0]
    );
    ensure!(
        u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff == 0,
        "decapsulated a fragment"
    );
    ensure!(
        ip[16..20] == DECAP_ADDR.octets(),
        "decapsulated a packet to another host"
    );
    // (outer header length, inner versions allowed)
    let (strip, versions): (usize, &[u8]) = match ip[9] {
        4 => (20, &[4]),
        41 => (20, &[6]),
        17 => {
            ensure!(
                ip.len() >= 28 && u16::from_be_bytes([ip[22], ip[23]]) == GUE_PORT,
                "decapsulated UDP that is not to the GUE port"
            );
            (28, &[4, 6])
        }
        p => bail!("decapsulated protocol {p}"),
    };
    let inner = &ip[strip..];
    let version = inner.first().map(|b| b >> 4);
    let ethertype = match version {
        Some(4) if versions.contains(&4) && inner.len() >= 20 => ETH_P_IP,
        Some(6) if versions.contains(&6) && inner.len() >= 40 => ETH_P_IPV6,
        v => bail!(
            "decapsulated an inner packet of version {v:?} ({} bytes)",
            inner.len()
        ),
    };
    let mut want = input[..l3].to_vec();
    want[l3 - 2..l3].copy_from_slice(&ethertype.to_be_bytes());
    want.extend_from_slice(inner);
    ensure!(
        out == want,
        "the decapsulated frame is not the inner packet behind the same L2"
    );
    Ok(())
}

#[test]
fn random_frames_through_the_decapsulator() -> anyhow::Result<()> {
    let test = require_privileges!();
    let seed = match std::env::var("XDPLB_FUZZ_SEED") {
        Ok(s) => s.parse().context("XDPLB_FUZZ_SEED must be a u64")?,
        Err(_) => rand::rng().next_u64(),
    };
    println!("{test}: seed {seed} (replay with XDPLB_FUZZ_SEED={seed}), {DECAP_FRAMES} frames");
    let result = in_bed("fd", &net(), move || {
        use lb_common::types::DecapKey;
        let mut lb = LoadedLb::load(&caps(), &desired(), &[loader::DECAP_PROGRAM])?;
        let mut dsts: aya::maps::HashMap<_, DecapKey, u32> = aya::maps::HashMap::try_from(
            lb.ebpf
                .map_mut(lb_common::maps::DECAP_DSTS)
                .context("decap map")?,
        )?;
        let key = DecapKey {
            addr: [u32::from_ne_bytes(DECAP_ADDR.octets()), 0, 0, 0],
            family: lb_common::types::FAMILY_V4,
            _pad: [0; 3],
        };
        dsts.insert(key, 1, 0)?;
        let ifindex = loader::if_index("lb0")?;
        let mut rng = StdRng::seed_from_u64(seed);
        let start = lb.counters()?;
        let mut changed = 0u64;
        for i in 0..DECAP_FRAMES {
            let mut frame = decap_frame(&mut rng);
            if rng.random_bool(0.5) {
                mutate(&mut rng, &mut frame);
            }
            let ctx = xdp_md(frame.len(), ifindex, 0);
            let run = test_run(lb.program(loader::DECAP_PROGRAM)?, &frame, &ctx, 1)?;
            check_decap(&frame, run.verdict, &run.out)
                .with_context(|| format!("frame {i}: {}", hex(&frame)))?;
            changed += u64::from(run.out != frame);
        }
        let end = lb.counters()?;
        let decaps = (end.get(Counter::Decap) - start.get(Counter::Decap))
            + (end.get(Counter::DecapGue) - start.get(Counter::DecapGue));
        println!(
            "decap: {changed} of {DECAP_FRAMES} decapsulated (GUE {})",
            end.get(Counter::DecapGue) - start.get(Counter::DecapGue)
        );
        ensure!(
            decaps == changed,
            "{changed} frames changed, {decaps} counted as decapsulated"
        );
        ensure!(
            end.get(Counter::DecapGue) > start.get(Counter::DecapGue)
                && end.get(Counter::Decap) > start.get(Counter::Decap),
            "the generator missed GUE or IPIP decapsulation (both must happen)"
        );
        Ok(())
    });
    result.with_context(|| format!("seed {seed} (replay with XDPLB_FUZZ_SEED={seed})"))
}
