//! IPv6 in the fast path as a fixture table (the IPv6 half of `xdp_fixtures`): input
//! frame + map state -> expected verdict, outcome counter and output frame, byte for
//! byte, through `BPF_PROG_TEST_RUN`. The namespace only gives `bpf_fib_lookup` its
//! answers: `lb0` with 198.18.1.10/24 and fd00:18:1::10/64, static neighbours for the
//! backends of both families, none for fd00:18:1::99.
//!
//! Rows: IPv6-in-IPv6 (TCP, UDP, tagged, traffic class copied, padding cut),
//! IPv4-in-IPv6 (an IPv4 VIP with IPv6 backends), IPv6-in-IPv4 (an IPv6 VIP with an
//! IPv4 backend), extension headers and fragments passed and counted, no neighbour,
//! L7, not a VIP, truncated, "packet too big" generated (and "fragmentation needed"
//! for 4in6 with the IPv6 outer header counted), ICMPv6 echo answered, ICMPv6 errors
//! about a VIP flow tunnelled to the flow's backend, ICMPv6 quoting garbage dropped;
//! and `xdp_decap` on 6in6, 4in6 and 6in4.
//!
//! The backend a packet must reach comes from `lb_common::hash` and the written ring
//! (the oracle), not from the program.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    process::Command,
    sync::Mutex,
};

use anyhow::{Context as _, ensure};
use aya::maps::HashMap;
use lb_agent::{
    config::{FlowLimitConfig, Protocol},
    dataplane::{
        desired::{DesiredBackend, DesiredFilters, DesiredService, DesiredState},
        forwarding::InterfaceForwarding,
        loader::{self, Capacities, DECAP_PROGRAM, LB_PROGRAM},
        stats,
        sync::addr_words,
    },
};
use lb_common::{
    hash::{gue_source_port, tunnel_entropy},
    maps as names,
    stats::{Counter, DropReason},
    types::{DecapKey, FAMILY_V4, FAMILY_V6, FlowKey, PROTO_TCP, PROTO_UDP},
};
use xdplb_tests::{
    netns::mac_of,
    packet::{ETH_P_IPV4, ETH_P_IPV6, IPPROTO_IPIP, PacketBuilder, internet_checksum, tcp_flags},
    packet6::{
        IPPROTO_ICMPV6, IPPROTO_IPV6, NEXTHDR_DEST, NEXTHDR_FRAGMENT, NEXTHDR_HOP, NEXTHDR_ROUTING,
        check_checksums6, eth, ext_header, fragment_header, gue6_udp, icmp6, ipv4_tunnel, ipv6,
        ipv6_header, tcp6, udp6,
    },
    require_privileges,
    xdp_bed::{LoadedLb, Net, XDP_PASS, XDP_TX, in_bed, test_run, verdict_name, xdp_md},
};

const RING: u32 = 1021;
const LB4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
const LB6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 1, 0, 0, 0, 0, 0x10);
const CLIENT_MAC: [u8; 6] = [0x02, 0xc1, 0, 0, 0, 0x02];
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 2);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// A router between backends and clients: sends ICMPv6 errors about replies to the VIP.
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 1);
const BE6: [Ipv6Addr; 3] = [
    Ipv6Addr::new(0xfd00, 0x18, 1, 0, 0, 0, 0, 0x11),
    Ipv6Addr::new(0xfd00, 0x18, 1, 0, 0, 0, 0, 0x12),
    Ipv6Addr::new(0xfd00, 0x18, 1, 0, 0, 0, 0, 0x13),
];
const BE6_MACS: [[u8; 6]; 3] = [
    [0x02, 0xbe, 0, 0, 6, 0x11],
    [0x02, 0xbe, 0, 0, 6, 0x12],
    [0x02, 0xbe, 0, 0, 6, 0x13],
];
const BE4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 11);
const BE4_MAC: [u8; 6] = [0x02, 0xbe, 0, 0, 0, 0x11];
/// On-link, never resolved.
const UNRESOLVED6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 1, 0, 0, 0, 0, 0x99);

fn vip6(last: u16, port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(
        Ipv6Addr::new(0xfd00, 0x18, 0x100, 0, 0, 0, 0, last),
        port,
        0,
        0,
    )
}
const VIP4_MIXED: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 100, 9), 80);
/// An IPv4 UDP VIP with IPv6 backends (the GUE rows).
const VIP4_UDP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 100, 10), 80);
const MTU: u32 = 1500;
/// `dataplane.gue_port` of the GUE rows.
const GUE_PORT: u16 = 6080;

static SERIAL: Mutex<()> = Mutex::new(());

/// Forwarded traffic of a service (backend None) or of one of its backends.
type TrafficRow = (String, Option<IpAddr>, (u64, u64));
/// A decap row: name, input frame, the frame after decapsulation (None: unchanged).
type DecapCase = (&'static str, Vec<u8>, Option<Vec<u8>>);

fn backend(address: IpAddr, port: u16) -> DesiredBackend {
    DesiredBackend {
        quic_id: None,
        address,
        port,
        weight: 100,
        active: true,
    }
}

fn service(
    name: &str,
    vip: SocketAddr,
    protocol: Protocol,
    backends: Vec<DesiredBackend>,
) -> DesiredService {
    DesiredService {
        quic: false,
        name: name.into(),
        vip,
        protocol,
        l7: false,
        source_hash: false,
        backends,
        filters: DesiredFilters::default(),
    }
}

fn desired() -> DesiredState {
    let web = BE6.iter().map(|&b| backend(b.into(), 80)).collect();
    let mixed = BE6[..2].iter().map(|&b| backend(b.into(), 80)).collect();
    let mut l7 = service(
        "l7v6",
        vip6(5, 80).into(),
        Protocol::Tcp,
        vec![backend(BE6[0].into(), 80)],
    );
    l7.l7 = true;
    DesiredState {
        gue_port: 6080,
        source_v4_prefix: None,
        source_v6_prefix: None,
        max_new_flows_per_cpu: 0,
        icmp_errors_per_cpu: 0,
        source_v4: Some(LB4),
        source_v6: Some(LB6),
        encap: 0,
        mtu: MTU,
        filters: DesiredFilters::default(),
        services: vec![
            service("web6", vip6(1, 80).into(), Protocol::Tcp, web),
            service(
                "dns6",
                vip6(2, 53).into(),
                Protocol::Udp,
                vec![backend(BE6[0].into(), 53)],
            ),
            service(
                "six4",
                vip6(3, 80).into(),
                Protocol::Tcp,
                vec![backend(BE4.into(), 80)],
            ),
            service("mixed", VIP4_MIXED.into(), Protocol::Tcp, mixed),
            service(
                "noneigh6",
                vip6(4, 80).into(),
                Protocol::Tcp,
                vec![backend(UNRESOLVED6.into(), 80)],
            ),
            l7,
        ],
    }
}

fn net() -> Net {
    Net {
        links: vec![("lb0", "198.18.1.10/24")],
        neighbours: vec![(BE4, BE4_MAC, "lb0")],
        routes: vec![],
    }
}

fn caps() -> Capacities {
    Capacities {
        max_services: 8,
        max_backends: 32,
        ring_size: RING,
        flow_table_size: 4096,
        max_filter_rules: 16,
        new_flow_table_size: 1024,
        flow_limit_sources: 1024,
    }
}

/// Runs `ip ARGS` in the calling thread's namespace.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The IPv6 half of the namespace (inside it): the LB's address without DAD, static
/// neighbours for the IPv6 backends.
fn net6() -> anyhow::Result<()> {
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
        let mac = m
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        ip(&[
            "-6",
            "neigh",
            "replace",
            &b.to_string(),
            "lladdr",
            &mac,
            "dev",
            "lb0",
            "nud",
            "permanent",
        ])?;
    }
    Ok(())
}

struct Fixture {
    lb: LoadedLb,
    /// The state loaded: whose services' traffic [`Fixture::traffic`] reads.
    state: DesiredState,
    ifindex: u32,
    lb_mac: [u8; 6],
    _forwarding: InterfaceForwarding,
}

/// What must happen to a row's frame.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Encapsulated to this backend of this service, back out of `lb0` (XDP_TX).
    Tx(&'static str, IpAddr),
    Pass(Counter),
    Drop(DropReason),
    /// Answered from XDP (XDP_TX), counted under this counter; nothing forwarded.
    Reply(Counter),
}

struct Row {
    name: String,
    input: Vec<u8>,
    expect: Expect,
    output: Vec<u8>,
}

impl Fixture {
    fn new() -> anyhow::Result<Self> {
        Self::with_state(&desired())
    }

    /// The fixture with another desired state.
    fn with_state(state: &DesiredState) -> anyhow::Result<Self> {
        net6()?;
        Ok(Fixture {
            lb: LoadedLb::load(&caps(), state, &[LB_PROGRAM, DECAP_PROGRAM])?,
            state: state.clone(),
            ifindex: loader::if_index("lb0")?,
            lb_mac: mac_of("lb0")?,
            _forwarding: InterfaceForwarding::enable("lb0")?,
        })
    }

    fn run(&self, program: &str, frame: &[u8]) -> anyhow::Result<(u32, Vec<u8>)> {
        let ctx = xdp_md(frame.len(), self.ifindex, 0);
        let run = test_run(self.lb.program(program)?, frame, &ctx, 1)?;
        Ok((run.verdict, run.out))
    }

    /// Oracle: which of `candidates` the ring of `service` gives `key`.
    fn pick(
        &self,
        service: &str,
        key: &FlowKey,
        candidates: &[IpAddr],
        port: u16,
    ) -> anyhow::Result<IpAddr> {
        let id = self.lb.ring_backend_id(service, key, false)?;
        candidates
            .iter()
            .copied()
            .find(|&c| self.lb.reconciler.backend_id(service, c, port) == Some(id))
            .with_context(|| format!("the ring of {service} holds id {id}, none of {candidates:?}"))
    }

    fn mac_of_backend(addr: IpAddr) -> [u8; 6] {
        match addr {
            IpAddr::V4(_) => BE4_MAC,
            IpAddr::V6(a) => BE6
                .iter()
                .position(|b| *b == a)
                .map_or([0; 6], |i| BE6_MACS[i]),
        }
    }

    /// The frame the balancer must send for the IP packet `inner` (IPv6 when
    /// `inner_v6`, traffic class / TOS `tos`) towards `backend`.
    fn tunnelled(&self, inner: &[u8], inner_v6: bool, tos: u8, backend: IpAddr) -> Vec<u8> {
        let mac = Self::mac_of_backend(backend);
        match backend {
            IpAddr::V6(b) => {
                let nh = if inner_v6 { IPPROTO_IPV6 } else { IPPROTO_IPIP };
                eth(
                    mac,
                    self.lb_mac,
                    None,
                    ETH_P_IPV6,
                    &ipv6(LB6, b, nh, tos, 64, inner),
                )
            }
            IpAddr::V4(b) => {
                let proto = if inner_v6 { IPPROTO_IPV6 } else { IPPROTO_IPIP };
                eth(
                    mac,
                    self.lb_mac,
                    None,
                    ETH_P_IPV4,
                    &ipv4_tunnel(LB4, b, proto, tos, inner),
                )
            }
        }
    }

    /// The frame the balancer must send for the IP packet `inner` of flow `key` in GUE
    /// over IPv6 towards `backend` (`encap = "gue"`): traffic class = the inner one,
    /// source port from the flow's entropy, the UDP checksum computed.
    fn gue6(&self, inner: &[u8], key: &FlowKey, backend: IpAddr) -> Vec<u8> {
        self.gue6_from(LB6, inner, key, backend)
    }

    /// [`Fixture::gue6`] from the outer source `src` (`source_ipv6_prefix`).
    fn gue6_from(&self, src: Ipv6Addr, inner: &[u8], key: &FlowKey, backend: IpAddr) -> Vec<u8> {
        let IpAddr::V6(b) = backend else {
            panic!("GUE over IPv6 towards an IPv4 backend {backend}");
        };
        let tos = if inner[0] >> 4 == 6 {
            (inner[0] << 4) | (inner[1] >> 4)
        } else {
            inner[1]
        };
        let sport = gue_source_port(tunnel_entropy(key));
        let udp = xdplb_tests::packet6::gue6_udp(src, b, sport, GUE_PORT, inner);
        eth(
            Self::mac_of_backend(backend),
            self.lb_mac,
            None,
            ETH_P_IPV6,
            &ipv6(src, b, PROTO_UDP, tos, 64, &udp),
        )
    }

    fn check(&self, row: &Row) -> anyhow::Result<()> {
        let name = &row.name;
        let before = self.lb.counters()?;
        let traffic_before = self.traffic()?;
        let (verdict, out) = self.run(LB_PROGRAM, &row.input)?;
        let after = self.lb.counters()?;
        let traffic_after = self.traffic()?;
        let (want_verdict, outcome) = match row.expect {
            Expect::Tx(..) => (XDP_TX, Counter::Tx.index()),
            Expect::Reply(c) => (XDP_TX, c.index()),
            Expect::Pass(c) => (XDP_PASS, c.index()),
            Expect::Drop(r) => (xdplb_tests::xdp_bed::XDP_DROP, r.index()),
        };
        ensure!(
            verdict == want_verdict,
            "{name}: verdict {}, want {}",
            verdict_name(verdict),
            verdict_name(want_verdict)
        );
        if out != row.output {
            let at = out.iter().zip(&row.output).position(|(a, b)| a != b);
            anyhow::bail!(
                "{name}: output differs at byte {at:?} (lengths {} / want {}):\n got  {:02x?}\n want {:02x?}",
                out.len(),
                row.output.len(),
                out,
                row.output
            );
        }
        if matches!(row.expect, Expect::Tx(..) | Expect::Reply(_)) {
            check_checksums6(&out).with_context(|| format!("{name}: checksums"))?;
        }
        ensure!(
            after.get(Counter::Rx) == before.get(Counter::Rx) + 1,
            "{name}: rx not counted"
        );
        let all = |c: &stats::Counters| -> Vec<(u32, &'static str, u64)> {
            c.counters
                .iter()
                .map(|(k, v)| (k.index(), k.label(), *v))
                .chain(c.drops.iter().map(|(k, v)| (k.index(), k.label(), *v)))
                .collect()
        };
        for ((index, label, b), (_, _, a)) in all(&before).into_iter().zip(all(&after)) {
            let bookkeeping = Counter::ALL
                .iter()
                .find(|c| c.index() == index)
                .is_some_and(|c| !c.is_outcome());
            if index == outcome {
                ensure!(a == b + 1, "{name}: counter {label} did not count it");
            } else if !bookkeeping {
                ensure!(
                    a == b,
                    "{name}: counter {label} counted it too ({b} -> {a})"
                );
            }
        }
        match row.expect {
            Expect::Tx(service, backend) => {
                let (_, l3) = xdplb_tests::packet6::l3_of(&row.input)?;
                let inner_len = if l3[0] >> 4 == 6 {
                    40 + u64::from(u16::from_be_bytes([l3[4], l3[5]]))
                } else {
                    u64::from(u16::from_be_bytes([l3[2], l3[3]]))
                };
                let delta: Vec<_> = traffic_after
                    .iter()
                    .zip(&traffic_before)
                    .filter(|(a, b)| a.2 != b.2)
                    .map(|(a, b)| (a.0.clone(), a.1, (a.2.0 - b.2.0, a.2.1 - b.2.1)))
                    .collect();
                let want = vec![
                    (service.to_owned(), None, (1, inner_len)),
                    (service.to_owned(), Some(backend), (1, inner_len)),
                ];
                ensure!(
                    delta == want,
                    "{name}: traffic changed by {delta:?}, want {want:?}"
                );
            }
            _ => ensure!(
                traffic_after == traffic_before,
                "{name}: counted as forwarded traffic but not forwarded"
            ),
        }
        Ok(())
    }

    /// (service, backend or None for the service's own, (packets, bytes)).
    fn traffic(&self) -> anyhow::Result<Vec<TrafficRow>> {
        let mut out = Vec::new();
        for svc in &self.state.services {
            let id = self.lb.reconciler.service_id(&svc.name).context("id")?;
            let s = stats::service_traffic(
                &self.lb.maps,
                id,
                self.lb.reconciler.service_backend_ids(&svc.name),
            )?;
            out.push((svc.name.clone(), None, (s.packets, s.bytes)));
            for b in &svc.backends {
                let id = self
                    .lb
                    .reconciler
                    .backend_id(&svc.name, b.address, b.port)
                    .context("backend id")?;
                let t = stats::backend_traffic(&self.lb.maps, id)?;
                out.push((svc.name.clone(), Some(b.address), (t.packets, t.bytes)));
            }
        }
        Ok(out)
    }
}

fn flow6(src: SocketAddrV6, dst: SocketAddrV6, proto: u8) -> FlowKey {
    FlowKey {
        src: addr_words(IpAddr::V6(*src.ip())).0,
        dst: addr_words(IpAddr::V6(*dst.ip())).0,
        sport: src.port().to_be(),
        dport: dst.port().to_be(),
        proto,
        family: FAMILY_V6,
        _pad: [0; 2],
    }
}

fn flow4(src: SocketAddrV4, dst: SocketAddrV4, proto: u8) -> FlowKey {
    FlowKey {
        src: addr_words(IpAddr::V4(*src.ip())).0,
        dst: addr_words(IpAddr::V4(*dst.ip())).0,
        sport: src.port().to_be(),
        dport: dst.port().to_be(),
        proto,
        family: FAMILY_V4,
        _pad: [0; 2],
    }
}

fn client(port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(CLIENT6, port, 0, 0)
}

/// A client's IPv6 TCP packet to `vip` with traffic class `tc` and `data`.
fn tcp_packet(port: u16, vip: SocketAddrV6, flags: u8, tc: u8, data: &[u8]) -> Vec<u8> {
    ipv6(
        CLIENT6,
        *vip.ip(),
        PROTO_TCP,
        tc,
        64,
        &tcp6(client(port), vip, flags, 1, data),
    )
}

fn frame(l3: &[u8]) -> Vec<u8> {
    eth([0x02, 0, 0, 0, 0, 0x10], CLIENT_MAC, None, ETH_P_IPV6, l3)
}

fn unchanged(name: &str, input: Vec<u8>, expect: Expect) -> Row {
    Row {
        name: name.into(),
        output: input.clone(),
        input,
        expect,
    }
}

fn rows(fx: &Fixture) -> anyhow::Result<Vec<Row>> {
    let web = vip6(1, 80);
    let web_backends: Vec<IpAddr> = BE6.iter().map(|&b| b.into()).collect();
    let mut rows = Vec::new();

    // 6in6: a SYN, an established-flow packet with data and a traffic class, UDP.
    for (name, port, flags, tc, data) in [
        ("6in6 tcp syn", 40001, tcp_flags::SYN, 0, &b""[..]),
        (
            "6in6 tcp data, traffic class copied",
            40002,
            tcp_flags::ACK | tcp_flags::PSH,
            0xb8,
            &b"hello over ipv6"[..],
        ),
    ] {
        let l3 = tcp_packet(port, web, flags, tc, data);
        let be = fx.pick(
            "web6",
            &flow6(client(port), web, PROTO_TCP),
            &web_backends,
            80,
        )?;
        rows.push(Row {
            name: name.into(),
            output: fx.tunnelled(&l3, true, tc, be),
            input: frame(&l3),
            expect: Expect::Tx("web6", be),
        });
    }
    let dns = vip6(2, 53);
    let l3 = ipv6(
        CLIENT6,
        *dns.ip(),
        PROTO_UDP,
        0,
        64,
        &udp6(client(5353), dns, b"query"),
    );
    rows.push(Row {
        name: "6in6 udp".into(),
        output: fx.tunnelled(&l3, true, 0, BE6[0].into()),
        input: frame(&l3),
        expect: Expect::Tx("dns6", BE6[0].into()),
    });
    // Tagged, with Ethernet padding past the IPv6 payload: untagged out, padding cut.
    let l3 = tcp_packet(40003, web, tcp_flags::ACK, 0x20, b"");
    let be = fx.pick(
        "web6",
        &flow6(client(40003), web, PROTO_TCP),
        &web_backends,
        80,
    )?;
    let mut input = eth(
        [0x02, 0, 0, 0, 0, 0x10],
        CLIENT_MAC,
        Some(7),
        ETH_P_IPV6,
        &l3,
    );
    input.extend_from_slice(&[0xee; 6]);
    rows.push(Row {
        name: "6in6 tagged frame with padding".into(),
        output: fx.tunnelled(&l3, true, 0x20, be),
        input,
        expect: Expect::Tx("web6", be),
    });

    // 4in6: an IPv4 VIP whose backends are IPv6.
    let src4 = SocketAddrV4::new(CLIENT4, 40010);
    let v4 = PacketBuilder::tcp(src4, VIP4_MIXED)
        .flags(tcp_flags::SYN)
        .tos(0x10)
        .macs(CLIENT_MAC, [0x02, 0, 0, 0, 0, 0x10])
        .build();
    let mixed_backends: Vec<IpAddr> = BE6[..2].iter().map(|&b| b.into()).collect();
    let be = fx.pick(
        "mixed",
        &flow4(src4, VIP4_MIXED, PROTO_TCP),
        &mixed_backends,
        80,
    )?;
    rows.push(Row {
        name: "4in6 (ipv4 vip, ipv6 backend)".into(),
        output: fx.tunnelled(
            &v4[14..14 + usize::from(u16::from_be_bytes([v4[16], v4[17]]))],
            false,
            0x10,
            be,
        ),
        input: v4,
        expect: Expect::Tx("mixed", be),
    });
    // 4in6 too big with DF: "fragmentation needed" giving 1500 - 40.
    let big4 = PacketBuilder::tcp(SocketAddrV4::new(CLIENT4, 40011), VIP4_MIXED)
        .flags(tcp_flags::ACK)
        .fragment(true, false, 0)
        .macs(CLIENT_MAC, [0x02, 0, 0, 0, 0, 0x10])
        .payload(&[0x5a; 1430])
        .build();
    rows.push(Row {
        name: "4in6 too big: fragmentation needed with mtu - 40".into(),
        output: frag_needed(&big4, 1460),
        input: big4,
        expect: Expect::Reply(Counter::IcmpFragNeeded),
    });

    // 6in4: an IPv6 VIP whose backend is IPv4.
    let six4 = vip6(3, 80);
    let l3 = tcp_packet(40020, six4, tcp_flags::SYN, 0, b"");
    rows.push(Row {
        name: "6in4 (ipv6 vip, ipv4 backend)".into(),
        output: fx.tunnelled(&l3, true, 0, BE4.into()),
        input: frame(&l3),
        expect: Expect::Tx("six4", BE4.into()),
    });

    // Extension headers and fragments: passed, counted, unchanged.
    let seg = tcp6(client(40030), web, tcp_flags::SYN, 1, b"");
    for (name, kind, counter) in [
        (
            "hop-by-hop header passed",
            NEXTHDR_HOP,
            Counter::PassIpv6Ext,
        ),
        (
            "routing header passed",
            NEXTHDR_ROUTING,
            Counter::PassIpv6Ext,
        ),
        (
            "destination options passed",
            NEXTHDR_DEST,
            Counter::PassIpv6Ext,
        ),
    ] {
        let mut payload = ext_header(PROTO_TCP);
        payload.extend_from_slice(&seg);
        let l3 = ipv6(CLIENT6, *web.ip(), kind, 0, 64, &payload);
        rows.push(unchanged(name, frame(&l3), Expect::Pass(counter)));
    }
    for (name, offset, more) in [
        ("first fragment passed", 0, true),
        ("later fragment passed", 8, false),
    ] {
        let mut payload = fragment_header(PROTO_TCP, offset, more, 7);
        payload.extend_from_slice(&seg);
        let l3 = ipv6(CLIENT6, *web.ip(), NEXTHDR_FRAGMENT, 0, 64, &payload);
        rows.push(unchanged(
            name,
            frame(&l3),
            Expect::Pass(Counter::PassFragment),
        ));
    }

    // Other outcomes.
    let l3 = tcp_packet(40040, vip6(4, 80), tcp_flags::SYN, 0, b"");
    rows.push(unchanged(
        "next hop not resolved",
        frame(&l3),
        Expect::Pass(Counter::PassNoNeighbour),
    ));
    let l3 = tcp_packet(40041, vip6(5, 80), tcp_flags::SYN, 0, b"");
    rows.push(unchanged(
        "l7 vip passed",
        frame(&l3),
        Expect::Pass(Counter::PassL7),
    ));
    let l3 = tcp_packet(40042, vip6(1, 81), tcp_flags::SYN, 0, b"");
    rows.push(unchanged(
        "vip address, other port",
        frame(&l3),
        Expect::Pass(Counter::PassNotVip),
    ));
    let l3 = tcp_packet(40043, vip6(9, 80), tcp_flags::SYN, 0, b"");
    rows.push(unchanged(
        "not a vip",
        frame(&l3),
        Expect::Pass(Counter::PassNotVip),
    ));
    let mut l3 = tcp_packet(40044, web, tcp_flags::SYN, 0, b"");
    l3[5] += 8; // payload length past the frame
    rows.push(unchanged(
        "payload length past the frame",
        frame(&l3),
        Expect::Pass(Counter::PassTruncated),
    ));
    let l3 = tcp_packet(40045, web, tcp_flags::SYN, 0, b"");
    rows.push(unchanged(
        "ipv6 header cut short",
        frame(&l3[..30]),
        Expect::Pass(Counter::PassTruncated),
    ));

    // Too big once encapsulated: "packet too big" with 1500 - 40.
    let l3 = tcp_packet(40050, web, tcp_flags::ACK, 0, &[0xa5; 1441]);
    let input = frame(&l3);
    rows.push(Row {
        name: "packet too big generated".into(),
        output: packet_too_big(&input, 1460),
        input,
        expect: Expect::Reply(Counter::Icmp6TooBig),
    });
    // Exactly at the limit: forwarded.
    let l3 = tcp_packet(40051, web, tcp_flags::ACK, 0, &[0xa5; 1400]);
    let be = fx.pick(
        "web6",
        &flow6(client(40051), web, PROTO_TCP),
        &web_backends,
        80,
    )?;
    rows.push(Row {
        name: "1460 bytes fit exactly".into(),
        output: fx.tunnelled(&l3, true, 0, be),
        input: frame(&l3),
        expect: Expect::Tx("web6", be),
    });

    // ICMPv6 echo to a VIP: answered.
    let echo = icmp6(
        CLIENT6,
        *web.ip(),
        128,
        0,
        [0x12, 0x34, 0, 1],
        b"ping6 payload",
    );
    let l3 = ipv6(CLIENT6, *web.ip(), IPPROTO_ICMPV6, 0, 55, &echo);
    let reply = icmp6(
        *web.ip(),
        CLIENT6,
        129,
        0,
        [0x12, 0x34, 0, 1],
        b"ping6 payload",
    );
    rows.push(Row {
        name: "icmpv6 echo answered".into(),
        input: frame(&l3),
        output: eth(
            CLIENT_MAC,
            [0x02, 0, 0, 0, 0, 0x10],
            None,
            ETH_P_IPV6,
            &ipv6(*web.ip(), CLIENT6, IPPROTO_ICMPV6, 0, 64, &reply),
        ),
        expect: Expect::Reply(Counter::IcmpEchoReply),
    });
    let l3 = ipv6(
        CLIENT6,
        *vip6(9, 0).ip(),
        IPPROTO_ICMPV6,
        0,
        64,
        &icmp6(CLIENT6, *vip6(9, 0).ip(), 128, 0, [0; 4], b""),
    );
    rows.push(unchanged(
        "icmpv6 echo to another address",
        frame(&l3),
        Expect::Pass(Counter::PassNotVip),
    ));
    let ns = icmp6(CLIENT6, *web.ip(), 135, 0, [0; 4], &[0; 16]);
    let l3 = ipv6(CLIENT6, *web.ip(), IPPROTO_ICMPV6, 0, 255, &ns);
    rows.push(unchanged(
        "other icmpv6 to a vip dropped",
        frame(&l3),
        Expect::Drop(DropReason::IcmpUnhandled),
    ));

    // ICMPv6 errors about a reply VIP -> client: to the flow's backend, whole.
    for (kind, rest, what) in [
        (2u8, 1280u32.to_be_bytes(), "packet too big"),
        (1, [0; 4], "destination unreachable"),
    ] {
        let port = 40060 + u16::from(kind);
        let reply = ipv6(
            *web.ip(),
            CLIENT6,
            PROTO_TCP,
            0,
            63,
            &tcp6(web, client(port), tcp_flags::ACK, 9, &[0x33; 64]),
        );
        let err = icmp6(ROUTER6, *web.ip(), kind, 0, rest, &reply);
        let l3 = ipv6(ROUTER6, *web.ip(), IPPROTO_ICMPV6, 0, 64, &err);
        let be = fx.pick(
            "web6",
            &flow6(client(port), web, PROTO_TCP),
            &web_backends,
            80,
        )?;
        rows.push(Row {
            name: format!("icmpv6 {what} about a vip flow forwarded"),
            output: fx.tunnelled(&l3, true, 0, be),
            input: frame(&l3),
            expect: Expect::Tx("web6", be),
        });
    }
    // Quoting garbage: cut short, another source, extension header, another port.
    let reply = ipv6(
        *web.ip(),
        CLIENT6,
        PROTO_TCP,
        0,
        63,
        &tcp6(web, client(40070), tcp_flags::ACK, 9, b""),
    );
    for (name, quote, expect) in [
        (
            "icmpv6 error quoting 20 bytes",
            reply[..20].to_vec(),
            Expect::Drop(DropReason::IcmpBadQuote),
        ),
        (
            "icmpv6 error quoting another source",
            {
                let mut q = reply.clone();
                q[23] ^= 1;
                q
            },
            Expect::Drop(DropReason::IcmpBadQuote),
        ),
        (
            "icmpv6 error quoting a fragment",
            {
                let mut payload = fragment_header(PROTO_TCP, 0, true, 1);
                payload.extend_from_slice(&reply[40..]);
                ipv6(*web.ip(), CLIENT6, NEXTHDR_FRAGMENT, 0, 63, &payload)
            },
            Expect::Drop(DropReason::IcmpUnhandled),
        ),
        (
            "icmpv6 error quoting a non-vip port",
            {
                ipv6(
                    *web.ip(),
                    CLIENT6,
                    PROTO_TCP,
                    0,
                    63,
                    &tcp6(vip6(1, 81), client(40071), tcp_flags::ACK, 9, b""),
                )
            },
            Expect::Drop(DropReason::IcmpUnhandled),
        ),
    ] {
        let err = icmp6(ROUTER6, *web.ip(), 1, 4, [0; 4], &quote);
        let l3 = ipv6(ROUTER6, *web.ip(), IPPROTO_ICMPV6, 0, 64, &err);
        rows.push(unchanged(name, frame(&l3), expect));
    }
    Ok(rows)
}

/// The ICMPv6 "packet too big" the balancer answers `input` (untagged) with.
fn packet_too_big(input: &[u8], mtu: u32) -> Vec<u8> {
    let l3 = &input[14..];
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&l3[8..24]).expect("16"));
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&l3[24..40]).expect("16"));
    // As much as fits in 1280 bytes (RFC 4443 2.4(c)): 1232.
    let ip_len = 40 + usize::from(u16::from_be_bytes([l3[4], l3[5]]));
    let msg = icmp6(dst, src, 2, 0, mtu.to_be_bytes(), &l3[..ip_len.min(1232)]);
    let mut hdr = ipv6_header(dst, src, IPPROTO_ICMPV6, msg.len() as u16, 0xc0, 64).to_vec();
    hdr.extend_from_slice(&msg);
    let mut dmac = [0u8; 6];
    dmac.copy_from_slice(&input[6..12]);
    let mut smac = [0u8; 6];
    smac.copy_from_slice(&input[0..6]);
    eth(dmac, smac, None, ETH_P_IPV6, &hdr)
}

/// The ICMP "fragmentation needed" the balancer answers the IPv4 `input` with.
fn frag_needed(input: &[u8], next_hop_mtu: u16) -> Vec<u8> {
    let l3 = &input[14..];
    let src = Ipv4Addr::new(l3[12], l3[13], l3[14], l3[15]);
    let dst = Ipv4Addr::new(l3[16], l3[17], l3[18], l3[19]);
    let mut msg = vec![3, 4, 0, 0, 0, 0];
    msg.extend_from_slice(&next_hop_mtu.to_be_bytes());
    // As much as fits in 576 bytes (RFC 1812 4.3.2.3): 548.
    let tot = usize::from(u16::from_be_bytes([l3[2], l3[3]]));
    msg.extend_from_slice(&l3[..tot.min(548)]);
    let c = internet_checksum(&msg);
    msg[2..4].copy_from_slice(&c.to_be_bytes());
    let mut dmac = [0u8; 6];
    dmac.copy_from_slice(&input[6..12]);
    let mut smac = [0u8; 6];
    smac.copy_from_slice(&input[0..6]);
    eth(
        dmac,
        smac,
        None,
        ETH_P_IPV4,
        &ipv4_tunnel(dst, src, 1, 0xc0, &msg),
    )
}

/// Every row checked; all failures named at once.
fn check_rows(fx: &Fixture, rows: &[Row]) -> anyhow::Result<()> {
    let mut failures = Vec::new();
    for row in rows {
        if let Err(e) = fx.check(row) {
            failures.push(format!("{e:#}"));
        }
    }
    ensure!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
    Ok(())
}

fn with_fixture<F>(test: &str, body: F) -> anyhow::Result<()>
where
    F: FnOnce(&mut Fixture) -> anyhow::Result<()> + Send + 'static,
{
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    in_bed("fx6", &net(), move || {
        let mut fx = Fixture::new()?;
        body(&mut fx)
    })
    .with_context(|| format!("fixture test {test}"))
}

#[test]
fn ipv6_fixture_table() -> anyhow::Result<()> {
    let test = require_privileges!();
    with_fixture(test, |fx| {
        let rows = rows(fx)?;
        check_rows(fx, &rows)?;
        println!("{} IPv6 rows passed", rows.len());
        Ok(())
    })
}

/// `encap = "gue"` with IPv6 (merge of s16-gue and s16-v6): an IPv6 VIP's packet to an
/// IPv4 backend goes in GUE over IPv4 (UDP to the GUE port, checksum 0, the source port
/// from the IPv6 flow's entropy, the inner IPv6 packet right after the UDP header),
/// and "packet too big" counts GUE's 28 bytes. IPv6 backends get GUE over IPv6 (issue
/// 11, session 17): IPv6 and IPv4 inner packets of every kind the balancer sends
/// (TCP, UDP with and without checksum, ICMPv6 and ICMP errors about flows), lengths
/// through every chunk size of the checksum sum, the exact fit at `mtu` and one byte
/// over it ("packet too big" / "fragmentation needed" with `mtu` - 48); every frame
/// exact, its outer UDP checksum verified (`check_checksums6`).
#[test]
fn gue_carries_ipv6_over_ipv4_and_both_families_over_ipv6() -> anyhow::Result<()> {
    let test = require_privileges!();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    in_bed("fxg6", &net(), move || {
        let mut state = desired();
        state.encap = lb_common::types::ENCAP_GUE;
        state.gue_port = GUE_PORT;
        let mixed_udp = BE6[..2].iter().map(|&b| backend(b.into(), 80)).collect();
        state.services.push(service(
            "mixedudp",
            VIP4_UDP.into(),
            Protocol::Udp,
            mixed_udp,
        ));
        let fx = Fixture::with_state(&state)?;
        let mut rows = Vec::new();

        // 6 over GUE/IPv4: the six4 service's IPv4 backend.
        let six4 = vip6(3, 80);
        let l3 = tcp_packet(41000, six4, tcp_flags::SYN, 0x28, b"");
        let key = flow6(client(41000), six4, PROTO_TCP);
        let sport = gue_source_port(tunnel_entropy(&key));
        let mut udp = sport.to_be_bytes().to_vec();
        udp.extend_from_slice(&GUE_PORT.to_be_bytes());
        udp.extend_from_slice(&u16::try_from(8 + l3.len())?.to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(&l3);
        rows.push(Row {
            name: "ipv6 in GUE over ipv4 (ipv6 vip, ipv4 backend)".into(),
            output: eth(
                BE4_MAC,
                fx.lb_mac,
                None,
                ETH_P_IPV4,
                &ipv4_tunnel(LB4, BE4, PROTO_UDP, 0x28, &udp),
            ),
            input: frame(&l3),
            expect: Expect::Tx("six4", BE4.into()),
        });
        // Too big with GUE's 28 bytes (it would fit IPIP's 20): mtu - 28.
        let l3 = tcp_packet(41001, six4, tcp_flags::ACK, 0, &[0xa5; 1415]);
        ensure!(l3.len() + 28 > MTU as usize && l3.len() + 20 <= MTU as usize);
        let input = frame(&l3);
        rows.push(Row {
            name: "packet too big with GUE: mtu - 28".into(),
            output: packet_too_big(&input, MTU - 28),
            input,
            expect: Expect::Reply(Counter::Icmp6TooBig),
        });

        // IPv6 backends get GUE over IPv6 (48 bytes: IPv6 + UDP with its checksum).
        let web = vip6(1, 80);
        let be6: Vec<IpAddr> = BE6.iter().map(|&b| b.into()).collect();
        let gue6_row = |name: &str,
                        service: &'static str,
                        l3: Vec<u8>,
                        key: FlowKey,
                        cands: &[IpAddr]|
         -> anyhow::Result<Row> {
            let be = fx.pick(service, &key, cands, u16::from_be(key.dport))?;
            Ok(Row {
                name: name.into(),
                output: fx.gue6(&l3, &key, be),
                input: if l3[0] >> 4 == 4 {
                    eth([0x02, 0, 0, 0, 0, 0x10], CLIENT_MAC, None, ETH_P_IPV4, &l3)
                } else {
                    frame(&l3)
                },
                expect: Expect::Tx(service, be),
            })
        };
        let l3 = tcp_packet(41002, web, tcp_flags::SYN, 0x28, b"");
        rows.push(gue6_row(
            "ipv6 in GUE over ipv6 (tcp syn)",
            "web6",
            l3,
            flow6(client(41002), web, PROTO_TCP),
            &be6,
        )?);
        // Payload lengths that take every chunk size of the sum (and an odd tail), and
        // the exact fit: 1452 + 48 = 1500.
        for (port, n) in [(41004u16, 1u16), (41005, 515), (41006, 1000), (41007, 1392)] {
            let l3 = tcp_packet(port, web, tcp_flags::ACK, 0, &vec![0x5a; usize::from(n)]);
            rows.push(gue6_row(
                &format!("ipv6 in GUE over ipv6, {n} bytes of tcp payload"),
                "web6",
                l3,
                flow6(client(port), web, PROTO_TCP),
                &be6,
            )?);
        }
        let fit = tcp_packet(41008, web, tcp_flags::ACK, 0, &[0xc3; 1392]);
        ensure!(fit.len() + 48 == MTU as usize, "{}", fit.len());
        // UDP over IPv6 (its checksum is complete).
        let dns = vip6(2, 53);
        let l3 = ipv6(
            CLIENT6,
            *dns.ip(),
            PROTO_UDP,
            0,
            64,
            &udp6(client(41009), dns, &[7; 333]),
        );
        rows.push(gue6_row(
            "ipv6 udp in GUE over ipv6",
            "dns6",
            l3,
            flow6(client(41009), dns, PROTO_UDP),
            &be6[..1],
        )?);
        // One byte too many for GUE over IPv6: packet too big with mtu - 48.
        let l3 = tcp_packet(41010, web, tcp_flags::ACK, 0, &[0xa5; 1393]);
        let input = frame(&l3);
        rows.push(Row {
            name: "packet too big with GUE over ipv6: mtu - 48".into(),
            output: packet_too_big(&input, MTU - 48),
            input,
            expect: Expect::Reply(Counter::Icmp6TooBig),
        });
        // IPv4 in GUE over IPv6, TCP.
        let src4 = SocketAddrV4::new(CLIENT4, 41003);
        let v4 = PacketBuilder::tcp(src4, VIP4_MIXED)
            .flags(tcp_flags::SYN)
            .tos(0x10)
            .build_ipv4();
        rows.push(gue6_row(
            "ipv4 in GUE over ipv6 (tcp syn)",
            "mixed",
            v4,
            flow4(src4, VIP4_MIXED, PROTO_TCP),
            &be6[..2],
        )?);
        // IPv4 UDP without a checksum (allowed over IPv4): the inner bytes are summed.
        let src4 = SocketAddrV4::new(CLIENT4, 41011);
        let v4 = PacketBuilder::udp(src4, VIP4_UDP)
            .payload(&[0x3c; 1001])
            .l4_checksum(0)
            .build_ipv4();
        rows.push(gue6_row(
            "ipv4 udp without checksum in GUE over ipv6 (summed)",
            "mixedudp",
            v4,
            flow4(src4, VIP4_UDP, PROTO_UDP),
            &be6[..2],
        )?);
        // DF over mtu - 48: fragmentation needed with 1452.
        let src4 = SocketAddrV4::new(CLIENT4, 41012);
        let big = PacketBuilder::tcp(src4, VIP4_MIXED)
            .flags(tcp_flags::ACK)
            .fragment(true, false, 0)
            .payload(&[1; 1413])
            .build();
        ensure!(big.len() - 14 + 48 == MTU as usize + 1);
        rows.push(Row {
            name: "fragmentation needed with GUE over ipv6: mtu - 48".into(),
            output: frag_needed(&big, (MTU - 48) as u16),
            input: big,
            expect: Expect::Reply(Counter::IcmpFragNeeded),
        });
        // ICMP errors about flows go to their backend in GUE over IPv6 as well: ICMPv6
        // (complete checksum) and ICMPv4 (no pseudo header: summed).
        let reply = ipv6(
            *web.ip(),
            CLIENT6,
            PROTO_TCP,
            0,
            63,
            &tcp6(web, client(41013), tcp_flags::ACK, 9, &[0x33; 64]),
        );
        let err = icmp6(ROUTER6, *web.ip(), 2, 0, 1280u32.to_be_bytes(), &reply);
        let l3 = ipv6(ROUTER6, *web.ip(), IPPROTO_ICMPV6, 0, 64, &err);
        let key = flow6(client(41013), web, PROTO_TCP);
        let be = fx.pick("web6", &key, &be6, 80)?;
        rows.push(Row {
            name: "icmpv6 packet too big about a flow in GUE over ipv6".into(),
            output: fx.gue6(&l3, &key, be),
            input: frame(&l3),
            expect: Expect::Tx("web6", be),
        });
        let client4 = SocketAddrV4::new(CLIENT4, 41014);
        let reply4 = PacketBuilder::tcp(VIP4_MIXED, client4)
            .flags(tcp_flags::ACK)
            .payload(&[9; 40])
            .build_ipv4();
        let mut msg = vec![3, 4, 0, 0, 0, 0, 0x05, 0x00];
        msg.extend_from_slice(&reply4[..28]);
        let c = internet_checksum(&msg);
        msg[2..4].copy_from_slice(&c.to_be_bytes());
        let l3 = ipv4_tunnel(Ipv4Addr::new(198, 18, 0, 1), *VIP4_MIXED.ip(), 1, 0, &msg);
        let key = flow4(client4, VIP4_MIXED, PROTO_TCP);
        let be = fx.pick("mixed", &key, &be6[..2], 80)?;
        let input = eth([0x02, 0, 0, 0, 0, 0x10], CLIENT_MAC, None, ETH_P_IPV4, &l3);
        rows.push(Row {
            name: "icmp fragmentation needed about a flow in GUE over ipv6".into(),
            output: fx.gue6(&l3, &key, be),
            input,
            expect: Expect::Tx("mixed", be),
        });

        check_rows(&fx, &rows)?;
        Ok(())
    })
    .with_context(|| format!("fixture test {test}"))
}

/// `dataplane.source_ipv6_prefix`: the outer IPv6 source of every tunnel towards an
/// IPv6 backend (6in6, 4in6, GUE over IPv6) is the prefix's address with the host bits
/// of its last word from the flow's entropy (`tunnel_source_v6_low`, the oracle): per
/// flow the same for its SYN and its next packet, inside the prefix, spread over many
/// addresses across flows; GUE's UDP checksum verifies over the per-flow source
/// (`check_checksums6` in `check`). The IPv4 tunnel (6in4) keeps `source_ipv4`.
#[test]
fn outer_ipv6_source_varies_within_the_prefix() -> anyhow::Result<()> {
    use lb_common::hash::tunnel_source_v6_low;
    let test = require_privileges!();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    in_bed("fxsp6", &net(), move || {
        let web = vip6(1, 80);
        let be6: Vec<IpAddr> = BE6.iter().map(|&b| b.into()).collect();
        let mut fx = Fixture::new()?;
        for (encap, prefix) in [
            (0, "fd00:18:4::/64"),
            (lb_common::types::ENCAP_GUE, "fd00:18:4::/64"),
            (0, "fd00:18:4::ff00/120"),
            (lb_common::types::ENCAP_GUE, "fd00:18:4::ff00/120"),
        ] {
            let label = if encap == 0 { "ipip" } else { "GUE" };
            let net: ipnet::Ipv6Net = prefix.parse()?;
            let mut state = desired();
            state.encap = encap;
            state.gue_port = GUE_PORT;
            // The prefix alone is the outer IPv6 source.
            state.source_v6 = None;
            state.source_v6_prefix = Some(net);
            fx.lb.apply(&state)?;
            fx.state = state;
            let fx = &fx;
            let base = addr_words(IpAddr::V6(net.network())).0;
            let mask = u128::from(net.hostmask()) as u32;
            let source_of = |key: &FlowKey| {
                let mut w = base;
                w[3] = tunnel_source_v6_low(base[3], mask, tunnel_entropy(key));
                let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_ne_bytes()).collect();
                Ipv6Addr::from(<[u8; 16]>::try_from(bytes.as_slice()).expect("16 bytes"))
            };
            let expect = |inner: &[u8], key: &FlowKey, src: Ipv6Addr, be: IpAddr| {
                if encap == 0 {
                    let IpAddr::V6(b) = be else { unreachable!() };
                    let (nh, tos) = if inner[0] >> 4 == 6 {
                        (IPPROTO_IPV6, (inner[0] << 4) | (inner[1] >> 4))
                    } else {
                        (IPPROTO_IPIP, inner[1])
                    };
                    eth(
                        Fixture::mac_of_backend(be),
                        fx.lb_mac,
                        None,
                        ETH_P_IPV6,
                        &ipv6(src, b, nh, tos, 64, inner),
                    )
                } else {
                    fx.gue6_from(src, inner, key, be)
                }
            };
            let mut rows = Vec::new();
            let mut sources = std::collections::BTreeSet::new();
            for port in 44000..44016u16 {
                let key = flow6(client(port), web, PROTO_TCP);
                let be = fx.pick("web6", &key, &be6, 80)?;
                let src = source_of(&key);
                ensure!(net.contains(&src), "{src} outside {prefix}");
                sources.insert(src);
                // The SYN, then the flow's next packet: the same source.
                for (flags, data) in [(tcp_flags::SYN, &b""[..]), (tcp_flags::ACK, b"more")] {
                    let l3 = tcp_packet(port, web, flags, 0x28, data);
                    rows.push(Row {
                        name: format!("{label} 6in6 from {src} ({prefix}), flags {flags:#x}"),
                        output: expect(&l3, &key, src, be),
                        input: frame(&l3),
                        expect: Expect::Tx("web6", be),
                    });
                }
                // IPv4 in IPv6 to the mixed service's IPv6 backends.
                let src4 = SocketAddrV4::new(CLIENT4, port);
                let key = flow4(src4, VIP4_MIXED, PROTO_TCP);
                let be = fx.pick("mixed", &key, &be6[..2], 80)?;
                let src = source_of(&key);
                ensure!(net.contains(&src), "{src} outside {prefix}");
                sources.insert(src);
                let l3 = PacketBuilder::tcp(src4, VIP4_MIXED)
                    .flags(tcp_flags::SYN)
                    .tos(0x10)
                    .build_ipv4();
                rows.push(Row {
                    name: format!("{label} 4in6 from {src} ({prefix})"),
                    output: expect(&l3, &key, src, be),
                    input: eth([0x02, 0, 0, 0, 0, 0x10], CLIENT_MAC, None, ETH_P_IPV4, &l3),
                    expect: Expect::Tx("mixed", be),
                });
            }
            // Towards the IPv4 backend of an IPv6 VIP the outer source stays source_ipv4
            // (IPIP: 6in4; GUE over IPv4).
            let six4 = vip6(3, 80);
            let l3 = tcp_packet(44100, six4, tcp_flags::SYN, 0, b"");
            let output = if encap == 0 {
                fx.tunnelled(&l3, true, 0, BE4.into())
            } else {
                let key = flow6(client(44100), six4, PROTO_TCP);
                let sport = gue_source_port(tunnel_entropy(&key));
                let mut udp = sport.to_be_bytes().to_vec();
                udp.extend_from_slice(&GUE_PORT.to_be_bytes());
                udp.extend_from_slice(&u16::try_from(8 + l3.len())?.to_be_bytes());
                udp.extend_from_slice(&[0, 0]);
                udp.extend_from_slice(&l3);
                eth(
                    BE4_MAC,
                    fx.lb_mac,
                    None,
                    ETH_P_IPV4,
                    &ipv4_tunnel(LB4, BE4, PROTO_UDP, 0, &udp),
                )
            };
            rows.push(Row {
                name: format!("{label} ipv6 to an ipv4 backend from source_ipv4 ({prefix})"),
                output,
                input: frame(&l3),
                expect: Expect::Tx("six4", BE4.into()),
            });
            check_rows(fx, &rows)?;
            // 32 flows over 2^32 (/64) or 2^8 (/120) addresses: nearly all distinct.
            ensure!(
                sources.len() > 24,
                "{label} {prefix}: 32 flows got only {} outer sources: {sources:?}",
                sources.len()
            );
        }
        Ok(())
    })
    .with_context(|| format!("fixture test {test}"))
}

/// QUIC connection-ID routing on an IPv6 VIP: a short header whose CID names a backend's
/// `quic_id` goes to that backend from every client port (the ring would spread them),
/// counted `quic_cid_routed`; a long header and an unknown id take the ring (the
/// unknown one counted `quic_cid_unknown`).
#[test]
fn quic_connection_ids_route_on_an_ipv6_vip() -> anyhow::Result<()> {
    let test = require_privileges!();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    in_bed("fxq6", &net(), move || {
        const IDS: [u32; 3] = [0x0101, 0x2345, 0x12_3456];
        let vip = vip6(6, 443);
        let mut state = desired();
        let mut quic = service(
            "quic6",
            vip.into(),
            Protocol::Udp,
            BE6.iter()
                .zip(IDS)
                .map(|(&b, id)| DesiredBackend {
                    quic_id: Some(id),
                    ..backend(b.into(), 443)
                })
                .collect(),
        );
        quic.quic = true;
        state.services.push(quic);
        let fx = Fixture::with_state(&state)?;
        let be6: Vec<IpAddr> = BE6.iter().map(|&b| b.into()).collect();
        // Version 1 CID (16-bit server id in bits 2..18) naming BE6[1].
        let id = IDS[1];
        let cid = [
            0x40 | (id >> 10) as u8,
            (id >> 2) as u8,
            ((id & 3) << 6) as u8 | 0x15,
            9,
            8,
            7,
            6,
            5,
        ];
        let datagram = |port: u16, first: u8, cid: &[u8]| {
            let mut body = vec![first];
            body.extend_from_slice(cid);
            body.extend_from_slice(&[0x5a; 40]);
            ipv6(
                CLIENT6,
                *vip.ip(),
                PROTO_UDP,
                0,
                64,
                &udp6(client(port), vip, &body),
            )
        };
        let routed = |fx: &Fixture| fx.lb.counters().map(|c| c.get(Counter::QuicCidRouted));
        let unknown = |fx: &Fixture| fx.lb.counters().map(|c| c.get(Counter::QuicCidUnknown));
        let mut ring_differs = false;
        for port in 42000..42008 {
            let l3 = datagram(port, 0x41, &cid);
            let ring = fx.pick("quic6", &flow6(client(port), vip, PROTO_UDP), &be6, 443)?;
            ring_differs |= ring != be6[1];
            let before = routed(&fx)?;
            fx.check(&Row {
                name: format!("short header from port {port} to its CID's backend"),
                output: fx.tunnelled(&l3, true, 0, be6[1]),
                input: frame(&l3),
                expect: Expect::Tx("quic6", be6[1]),
            })?;
            ensure!(
                routed(&fx)? == before + 1,
                "port {port}: quic_cid_routed not counted"
            );
        }
        ensure!(
            ring_differs,
            "the ring picks BE6[1] for every port: the rows prove nothing"
        );
        // A long header (Initial) takes the ring, routed by nothing.
        let l3 = datagram(42100, 0xc3, &cid);
        let ring = fx.pick("quic6", &flow6(client(42100), vip, PROTO_UDP), &be6, 443)?;
        let (r, u) = (routed(&fx)?, unknown(&fx)?);
        fx.check(&Row {
            name: "long header takes the ring".into(),
            output: fx.tunnelled(&l3, true, 0, ring),
            input: frame(&l3),
            expect: Expect::Tx("quic6", ring),
        })?;
        ensure!(
            routed(&fx)? == r && unknown(&fx)? == u,
            "a long header was counted as QUIC routing"
        );
        // An id no backend has (version 3): the ring, counted unknown.
        let stranger = [0xc0, 0, 0, 0x77, 0x77, 1, 2, 3];
        let l3 = datagram(42101, 0x41, &stranger);
        let ring = fx.pick("quic6", &flow6(client(42101), vip, PROTO_UDP), &be6, 443)?;
        fx.check(&Row {
            name: "unknown server id takes the ring".into(),
            output: fx.tunnelled(&l3, true, 0, ring),
            input: frame(&l3),
            expect: Expect::Tx("quic6", ring),
        })?;
        ensure!(unknown(&fx)? == u + 1, "quic_cid_unknown not counted");
        Ok(())
    })
    .with_context(|| format!("fixture test {test}"))
}

/// `xdp_decap`: 6in6 and 4in6 to the host's IPv6 address and 6in4 to its IPv4 address
/// lose their outer header (the tag of a tagged frame stays); others pass unchanged.
#[test]
fn ipv6_decap_fixture_table() -> anyhow::Result<()> {
    let test = require_privileges!();
    with_fixture(test, |fx| {
        {
            let mut dsts: HashMap<_, DecapKey, u32> =
                HashMap::try_from(fx.lb.ebpf.map_mut(names::DECAP_DSTS).context("decap map")?)?;
            for a in [IpAddr::V6(LB6), IpAddr::V4(LB4)] {
                let (addr, family) = addr_words(a);
                dsts.insert(
                    DecapKey {
                        addr,
                        family,
                        _pad: [0; 3],
                    },
                    1,
                    0,
                )?;
            }
        }
        let macs = ([0x02, 0xbe, 0, 0, 6, 0x11], [0x02, 0x1b, 0, 0, 0, 0x10]);
        let web = vip6(1, 80);
        let inner6 = tcp_packet(40100, web, tcp_flags::SYN, 0, b"x");
        let inner4 = PacketBuilder::tcp(SocketAddrV4::new(CLIENT4, 40101), VIP4_MIXED)
            .flags(tcp_flags::SYN)
            .build_ipv4();
        let other = Ipv6Addr::new(0xfd00, 0x18, 1, 0, 0, 0, 0, 0x77);
        // (name, input, the decapsulated frame or None: passed unchanged).
        let cases: Vec<DecapCase> = vec![
            (
                "6in6",
                eth(
                    macs.0,
                    macs.1,
                    None,
                    ETH_P_IPV6,
                    &ipv6(balancer6(), LB6, IPPROTO_IPV6, 0, 64, &inner6),
                ),
                Some(eth(macs.0, macs.1, None, ETH_P_IPV6, &inner6)),
            ),
            (
                "4in6",
                eth(
                    macs.0,
                    macs.1,
                    None,
                    ETH_P_IPV6,
                    &ipv6(balancer6(), LB6, IPPROTO_IPIP, 0, 64, &inner4),
                ),
                Some(eth(macs.0, macs.1, None, ETH_P_IPV4, &inner4)),
            ),
            (
                "6in4",
                eth(
                    macs.0,
                    macs.1,
                    None,
                    ETH_P_IPV4,
                    &ipv4_tunnel(Ipv4Addr::new(198, 18, 1, 1), LB4, IPPROTO_IPV6, 0, &inner6),
                ),
                Some(eth(macs.0, macs.1, None, ETH_P_IPV6, &inner6)),
            ),
            (
                "6in6 tagged",
                eth(
                    macs.0,
                    macs.1,
                    Some(5),
                    ETH_P_IPV6,
                    &ipv6(balancer6(), LB6, IPPROTO_IPV6, 0, 64, &inner6),
                ),
                Some(eth(macs.0, macs.1, Some(5), ETH_P_IPV6, &inner6)),
            ),
            (
                "6in6 to another address",
                eth(
                    macs.0,
                    macs.1,
                    None,
                    ETH_P_IPV6,
                    &ipv6(balancer6(), other, IPPROTO_IPV6, 0, 64, &inner6),
                ),
                None,
            ),
            (
                "6in6 whose inner packet is not ipv6",
                eth(
                    macs.0,
                    macs.1,
                    None,
                    ETH_P_IPV6,
                    &ipv6(balancer6(), LB6, IPPROTO_IPV6, 0, 64, &inner4),
                ),
                None,
            ),
            (
                "plain ipv6 to the host",
                eth(macs.0, macs.1, None, ETH_P_IPV6, &inner6),
                None,
            ),
        ];
        // GUE over IPv6: UDP to `gue_port` at a tunnel address, counted `decap_gue`; the
        // outer UDP checksum is not verified (README: the inner checksums are).
        let gue = |vlan: Option<u16>, dport: u16, dst: Ipv6Addr, inner: &[u8], zero_check: bool| {
            let mut udp = gue6_udp(balancer6(), dst, 50000, dport, inner);
            if zero_check {
                udp[6..8].copy_from_slice(&[0, 0]);
            }
            eth(
                macs.0,
                macs.1,
                vlan,
                ETH_P_IPV6,
                &ipv6(balancer6(), dst, PROTO_UDP, 0, 64, &udp),
            )
        };
        let gue_cases: Vec<DecapCase> = vec![
            (
                "ipv6 in GUE over ipv6",
                gue(None, GUE_PORT, LB6, &inner6, false),
                Some(eth(macs.0, macs.1, None, ETH_P_IPV6, &inner6)),
            ),
            (
                "ipv4 in GUE over ipv6",
                gue(None, GUE_PORT, LB6, &inner4, false),
                Some(eth(macs.0, macs.1, None, ETH_P_IPV4, &inner4)),
            ),
            (
                "ipv4 in GUE over ipv6, tagged",
                gue(Some(7), GUE_PORT, LB6, &inner4, false),
                Some(eth(macs.0, macs.1, Some(7), ETH_P_IPV4, &inner4)),
            ),
            (
                "GUE over ipv6 with a zero checksum",
                gue(None, GUE_PORT, LB6, &inner6, true),
                Some(eth(macs.0, macs.1, None, ETH_P_IPV6, &inner6)),
            ),
            (
                "udp over ipv6 to another port",
                gue(None, GUE_PORT + 1, LB6, &inner6, false),
                None,
            ),
            (
                "GUE over ipv6 to another address",
                gue(None, GUE_PORT, other, &inner6, false),
                None,
            ),
            (
                "udp over ipv6 to the GUE port carrying no ip packet",
                gue(None, GUE_PORT, LB6, &[0x01; 40], false),
                None,
            ),
        ];
        for (cases, counter) in [(cases, Counter::Decap), (gue_cases, Counter::DecapGue)] {
            for (name, input, want) in cases {
                let before = fx.lb.counters()?.get(counter);
                let (verdict, out) = fx.run(DECAP_PROGRAM, &input)?;
                let after = fx.lb.counters()?.get(counter);
                ensure!(
                    verdict == XDP_PASS,
                    "{name}: verdict {}",
                    verdict_name(verdict)
                );
                let decapped = want.is_some();
                let want = want.unwrap_or_else(|| input.clone());
                ensure!(
                    out == want,
                    "{name}: output\n got  {out:02x?}\n want {want:02x?}"
                );
                ensure!(
                    after == before + u64::from(decapped),
                    "{name}: decap counted {} times",
                    after - before
                );
            }
        }
        Ok(())
    })
}

/// The outer source of the decap rows: a balancer's tunnel source in another subnet.
fn balancer6() -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x18, 2, 0, 0, 0, 0, 0x10)
}

/// `[security]` for IPv6 sources on an IPv6 VIP: the deny list (a /48), the allow list
/// (a /32: other sources are refused), and `new_flows_per_source` per /64 (burst 2:
/// the third new flow of a /64 is dropped, another /64 of the same client network
/// is not).
#[test]
fn ipv6_sources_are_filtered_and_limited() -> anyhow::Result<()> {
    let test = require_privileges!();
    with_fixture(test, |fx| {
        let mut d = desired();
        d.filters = DesiredFilters {
            deny: vec!["fd00:18:bad::/48".parse()?],
            allow: vec!["fd00:18::/32".parse()?],
            new_flows: Some(FlowLimitConfig {
                rate: 1,
                burst: 2,
                prefix_v4: 32,
                prefix_v6: 64,
            }),
        };
        fx.lb.apply(&d)?;
        let web = vip6(1, 80);
        let web_backends: Vec<IpAddr> = BE6.iter().map(|&b| b.into()).collect();
        let syn_from = |src: Ipv6Addr, port: u16| {
            let from = SocketAddrV6::new(src, port, 0, 0);
            ipv6(
                src,
                *web.ip(),
                PROTO_TCP,
                0,
                64,
                &tcp6(from, web, tcp_flags::SYN, 1, b""),
            )
        };
        let mut rows = vec![
            unchanged(
                "deny: a source in fd00:18:bad::/48",
                frame(&syn_from("fd00:18:bad:1::7".parse()?, 41000)),
                Expect::Drop(DropReason::FilterDeny),
            ),
            unchanged(
                "allow: a source outside fd00:18::/32",
                frame(&syn_from("2001:db8::7".parse()?, 41001)),
                Expect::Drop(DropReason::FilterNotAllowed),
            ),
        ];
        // Two new flows from one /64 pass, the third is over its burst; another /64
        // has its own bucket.
        let limited: Ipv6Addr = "fd00:18:0:7::5".parse()?;
        let neighbour_net: Ipv6Addr = "fd00:18:0:8::5".parse()?;
        for (name, src, port, admitted) in [
            ("limit: first new flow of a /64", limited, 41010, true),
            (
                "limit: second new flow, another host of the /64",
                "fd00:18:0:7::6".parse()?,
                41011,
                true,
            ),
            (
                "limit: third new flow of the /64 dropped",
                limited,
                41012,
                false,
            ),
            (
                "limit: another /64 has its own bucket",
                neighbour_net,
                41013,
                true,
            ),
        ] {
            let l3 = syn_from(src, port);
            if admitted {
                let key = flow6(SocketAddrV6::new(src, port, 0, 0), web, PROTO_TCP);
                let be = fx.pick("web6", &key, &web_backends, 80)?;
                rows.push(Row {
                    name: name.into(),
                    output: fx.tunnelled(&l3, true, 0, be),
                    input: frame(&l3),
                    expect: Expect::Tx("web6", be),
                });
            } else {
                rows.push(unchanged(
                    name,
                    frame(&l3),
                    Expect::Drop(DropReason::NewFlowLimit),
                ));
            }
        }
        for row in &rows {
            fx.check(row)?;
        }
        Ok(())
    })
}

/// Issue 12 item 2, IPv6: an established IPv6 flow's packet finds its service through
/// its backend (`SERVICES_V6`), with no VIP lookup, and still follows what its VIP is
/// now: a deny list and a service allow list written by the agent stop it on its next
/// packet (the filter generation moved), emptied lists let it through to the same
/// backend, a VIP turned L7 passes it up, and a removed VIP, or another VIP on the
/// freed service and backend ids, no longer takes it.
#[test]
fn established_ipv6_flows_follow_what_their_vip_is_now() -> anyhow::Result<()> {
    use DropReason::{FilterDeny, FilterNotAllowed};
    let test = require_privileges!();
    with_fixture(test, |fx| {
        let web = vip6(1, 80);
        let candidates: Vec<IpAddr> = BE6.iter().map(|&b| b.into()).collect();
        let port = 42000;
        let key = flow6(client(port), web, PROTO_TCP);
        let be = fx.pick("web6", &key, &candidates, 80)?;
        let syn = tcp_packet(port, web, tcp_flags::SYN, 0, b"");
        let ack = tcp_packet(port, web, tcp_flags::ACK, 0, b"x");
        let tx = |fx: &Fixture, name: &str, l3: &[u8]| Row {
            name: name.into(),
            output: fx.tunnelled(l3, true, 0, be),
            input: frame(l3),
            expect: Expect::Tx("web6", be),
        };
        let apply = |fx: &mut Fixture, d: &DesiredState| -> anyhow::Result<()> {
            fx.lb.apply(d)?;
            fx.state = d.clone();
            Ok(())
        };
        fx.check(&tx(fx, "SYN", &syn))?;
        fx.check(&tx(fx, "first ACK: promoted", &ack))?;
        ensure!(
            fx.lb.flow_entry(&key, false).is_some(),
            "the flow is not in the flow table"
        );
        fx.check(&tx(fx, "established", &ack))?;

        let mut d = desired();
        d.filters.deny = vec!["fd00:18::/48".parse()?];
        apply(fx, &d)?;
        fx.check(&unchanged(
            "the deny list now holds the client",
            frame(&ack),
            Expect::Drop(FilterDeny),
        ))?;
        apply(fx, &desired())?;
        fx.check(&tx(fx, "deny list emptied", &ack))?;

        let mut d = desired();
        d.services[0].filters.allow = vec!["fd00:18:77::/48".parse()?];
        apply(fx, &d)?;
        fx.check(&unchanged(
            "the service's allow list does not hold the client",
            frame(&ack),
            Expect::Drop(FilterNotAllowed),
        ))?;
        apply(fx, &desired())?;
        fx.check(&tx(fx, "service list emptied", &ack))?;

        let mut d = desired();
        d.services[0].l7 = true;
        apply(fx, &d)?;
        fx.check(&unchanged(
            "VIP turned L7",
            frame(&ack),
            Expect::Pass(Counter::PassL7),
        ))?;
        apply(fx, &desired())?;
        fx.check(&tx(fx, "back to L4", &ack))?;

        let mut d = desired();
        d.services.remove(0);
        apply(fx, &d)?;
        fx.check(&unchanged(
            "VIP removed",
            frame(&ack),
            Expect::Pass(Counter::PassNotVip),
        ))?;
        d.services.push(service(
            "other6",
            vip6(9, 80).into(),
            Protocol::Tcp,
            BE6.iter().map(|&b| backend(b.into(), 80)).collect(),
        ));
        apply(fx, &d)?;
        fx.check(&unchanged(
            "another VIP on the old ids",
            frame(&ack),
            Expect::Pass(Counter::PassNotVip),
        ))?;
        Ok(())
    })
}
