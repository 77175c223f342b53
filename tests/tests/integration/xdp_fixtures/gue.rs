//! Fixture rows of GUE (`encap = "gue"`), the per-flow outer source
//! (`source_ipv4_prefix`), GUE decapsulation and QUIC connection-ID routing, on the
//! fixture bed of the parent module. Each row: input frame, verdict, the output frame
//! byte for byte, and the counters that must move by one.
//!
//! Expected GUE frames are built here from the wire format the README documents
//! (Ethernet, outer IPv4 with protocol 17, UDP to the GUE port with checksum 0, the
//! inner IP packet); the UDP source port and the varied outer source are predicted
//! with `lb_common::hash` (the oracle), not read from the program.

use lb_common::{
    hash::{gue_source_port, tunnel_entropy, tunnel_source_v4},
    types::ENCAP_GUE,
};
use xdplb_tests::packet::IPPROTO_UDP;

use super::*;

const GUE_PORT: u16 = 6080;
/// A `quic` UDP service on the three lb0 backends.
const VIP_QUIC: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 100, 8), 443);
/// The backends' `quic_id`s: one a version-1 CID can carry (16 bits), one only
/// versions 2 and 3 can (24 bits), and a small one.
const QUIC_IDS: [u32; 3] = [0x0101, 0x2345, 0x12_3456];

/// The fixture's desired state with `encap`, a source prefix, and the `quic` service.
fn state(encap: u32, prefix: Option<&str>, quic_backends: Vec<DesiredBackend>) -> DesiredState {
    let mut d = desired();
    d.encap = encap;
    d.gue_port = GUE_PORT;
    d.source_v4_prefix = prefix.map(|p| p.parse().expect("prefix"));
    let mut quic = service("quic", VIP_QUIC, Protocol::Udp, quic_backends);
    quic.quic = true;
    d.services.push(quic);
    d
}

fn quic_backends() -> Vec<DesiredBackend> {
    BACKENDS
        .iter()
        .zip(QUIC_IDS)
        .map(|(&b, id)| DesiredBackend {
            quic_id: Some(id),
            ..backend(b, 443)
        })
        .collect()
}

/// The GUE frame the balancer sends for `input` to `backend` (next hop `dst_mac`):
/// outer source `source` (LB_ADDR, or the flow's address in the prefix).
fn gue_frame(
    input: &[u8],
    source: Ipv4Addr,
    backend: Ipv4Addr,
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
) -> anyhow::Result<Vec<u8>> {
    gue_frame_of_flow(
        input,
        &flow_key_of(input)?,
        source,
        backend,
        dst_mac,
        src_mac,
    )
}

/// [`gue_frame`] for a packet about the flow `key` (an ICMP error quoting one of its
/// packets): the source port is the flow's.
fn gue_frame_of_flow(
    input: &[u8],
    key: &lb_common::types::FlowKey,
    source: Ipv4Addr,
    backend: Ipv4Addr,
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
) -> anyhow::Result<Vec<u8>> {
    let inner = Frame::parse(input)?.ipv4()?;
    let mut bytes = inner.header.clone();
    bytes.extend_from_slice(&inner.payload);
    let sport = gue_source_port(tunnel_entropy(key));
    Ok(PacketBuilder::udp(
        SocketAddrV4::new(source, sport),
        SocketAddrV4::new(backend, GUE_PORT),
    )
    .macs(src_mac, dst_mac)
    .tos(inner.tos)
    .id(0)
    .fragment(false, false, 0)
    .ttl(64)
    .l4_checksum(0)
    .payload(&bytes)
    .build())
}

fn mac_on_lb0(backend: Ipv4Addr) -> anyhow::Result<[u8; 6]> {
    BACKENDS
        .iter()
        .zip(BACKEND_MACS)
        .find(|(b, _)| **b == backend)
        .map(|(_, m)| m)
        .with_context(|| format!("{backend} is no neighbour on lb0"))
}

/// A decap row: name, (input, expected output), counters that must count it.
type DecapRow<'a> = (&'a str, (Vec<u8>, Vec<u8>), &'a [Counter]);

/// Runs `input` through `program` and checks the verdict, the output frame and that
/// each counter in `counted` moved by exactly one (and each in `quiet` did not move).
#[expect(
    clippy::too_many_arguments,
    reason = "the fields of one fixture row, each named where the row is written"
)]
fn check(
    fx: &Fixture,
    program: &str,
    name: &str,
    input: &[u8],
    verdict: u32,
    output: &[u8],
    counted: &[Counter],
    quiet: &[Counter],
) -> anyhow::Result<()> {
    let before = fx.counters();
    let (v, out) = fx.run(program, input)?;
    let after = fx.counters();
    ensure!(
        v == verdict,
        "{name}: verdict {}, want {}",
        verdict_name(v),
        verdict_name(verdict)
    );
    if let Some(diff) = first_difference(output, &out) {
        anyhow::bail!("{name}: output frame differs from the expected one: {diff}");
    }
    for &c in counted {
        ensure!(
            after.get(c) == before.get(c) + 1,
            "{name}: {} went {} -> {}, want one more",
            c.label(),
            before.get(c),
            after.get(c)
        );
    }
    for &c in quiet {
        ensure!(
            after.get(c) == before.get(c),
            "{name}: {} moved ({} -> {})",
            c.label(),
            before.get(c),
            after.get(c)
        );
    }
    Ok(())
}

#[test]
fn gue_encapsulation_and_path_mtu() -> anyhow::Result<()> {
    let test = require_privileges!();
    with_fixture(test, |fx| {
        fx.lb.apply(&state(ENCAP_GUE, None, quic_backends()))?;
        let web = |sport| syn(SocketAddrV4::new(CLIENT, sport), VIP_WEB);
        let lb_mac = fx.lb_mac;
        let gue_to = |fx: &Fixture, input: &[u8]| -> anyhow::Result<(Ipv4Addr, Vec<u8>)> {
            let to = fx.ring_pick("web", input, &BACKENDS, 80)?;
            Ok((to, gue_frame(input, LB_ADDR, to, mac_on_lb0(to)?, lb_mac)?))
        };

        // A VIP packet: GUE to the ring's backend, TOS copied, checksums right.
        let hit = web(41000)
            .tos(0x28)
            .payload(b"GET / HTTP/1.1\r\n\r\n")
            .build();
        let (_, want) = gue_to(fx, &hit)?;
        check(
            fx,
            LB_PROGRAM,
            "GUE: VIP hit",
            &hit,
            XDP_TX,
            &want,
            &[Counter::Tx],
            &[],
        )?;
        check_checksums(&want)?;
        // The inner packet after the UDP header is the client's, checksums intact.
        let outer = Frame::parse(&want)?.ipv4()?;
        let udp = outer.udp()?;
        ensure!(udp.dport == GUE_PORT && udp.sport >= 0xc000, "{udp:?}");
        check_checksums(&[&want[..14], &udp.payload[..]].concat())?;

        // Flows of one client spread over source ports (RSS on the backend).
        let ports: std::collections::BTreeSet<u16> = (0..64u16)
            .map(|i| {
                let f = web(42000 + i).build();
                Ok(gue_source_port(tunnel_entropy(&flow_key_of(&f)?)))
            })
            .collect::<anyhow::Result<_>>()?;
        ensure!(
            ports.len() > 48,
            "64 flows got only {} source ports",
            ports.len()
        );
        for sport in [42001u16, 42002, 42003] {
            let f = web(sport).build();
            let (_, want) = gue_to(fx, &f)?;
            check(
                fx,
                LB_PROGRAM,
                "GUE: per-flow source port",
                &f,
                XDP_TX,
                &want,
                &[Counter::Tx],
                &[],
            )?;
        }

        // VLAN-tagged in, untagged GUE out; padding after the IP packet not tunnelled.
        let tagged = web(41001).vlan(42).build();
        let (_, want) = gue_to(fx, &tagged)?;
        check(
            fx,
            LB_PROGRAM,
            "GUE: tagged",
            &tagged,
            XDP_TX,
            &want,
            &[Counter::Tx],
            &[],
        )?;
        let mut padded = web(41002).build();
        padded.resize(60, 0);
        let (_, want) = gue_to(fx, &padded)?;
        check(
            fx,
            LB_PROGRAM,
            "GUE: Ethernet padding",
            &padded,
            XDP_TX,
            &want,
            &[Counter::Tx],
            &[],
        )?;

        // UDP to the other interface's backend: redirected.
        let dns = PacketBuilder::udp(SocketAddrV4::new(CLIENT, 5353), VIP_DNS)
            .payload(&[7; 12])
            .build();
        let want = gue_frame(&dns, LB_ADDR, FAR_BACKEND, FAR_MAC, fx.far_mac)?;
        check(
            fx,
            LB_PROGRAM,
            "GUE: redirected",
            &dns,
            XDP_REDIRECT,
            &want,
            &[Counter::Redirect],
            &[],
        )?;

        // Path MTU: 28 bytes of tunnel. 1472 bytes fit 1500; 1473 with DF get
        // fragmentation needed saying 1472; without DF, dropped as too big.
        let fits = web(41003).payload(&vec![0x5a; 1472 - 40]).build();
        let (_, want) = gue_to(fx, &fits)?;
        check(
            fx,
            LB_PROGRAM,
            "GUE: exactly the MTU",
            &fits,
            XDP_TX,
            &want,
            &[Counter::Tx],
            &[],
        )?;
        let over = web(41004).payload(&vec![0x5a; 1473 - 40]).build();
        // frag_needed says `mtu` - 20: the tunnel's 28 bytes leave 1472 of 1500.
        let want = frag_needed(&over, LB0_MTU - 8)?;
        check(
            fx,
            LB_PROGRAM,
            "GUE: DF over the MTU by the UDP header: fragmentation needed, MTU 1472",
            &over,
            XDP_TX,
            &want,
            &[Counter::IcmpFragNeeded],
            &[Counter::Tx],
        )?;
        let no_df = web(41005)
            .fragment(false, false, 0)
            .payload(&vec![0x5a; 1473 - 40])
            .build();
        let too_big = fx.counters().drop_count(DropReason::TooBig);
        check(
            fx,
            LB_PROGRAM,
            "GUE: over the MTU, DF clear: dropped",
            &no_df,
            XDP_DROP,
            &no_df,
            &[],
            &[Counter::Tx, Counter::IcmpFragNeeded],
        )?;
        ensure!(
            fx.counters().drop_count(DropReason::TooBig) == too_big + 1,
            "GUE, DF clear: too_big not counted"
        );

        // An ICMP error about a flow goes to its backend through the same tunnel.
        let client = SocketAddrV4::new(CLIENT, 41006);
        let err = unreachable(*VIP_WEB.ip(), 4, 1400, &reply_quote(VIP_WEB, client));
        let to = fx.ring_pick("web", &syn(client, VIP_WEB).build(), &BACKENDS, 80)?;
        let key = flow_key(client, VIP_WEB, PROTO_TCP);
        let want = gue_frame_of_flow(&err, &key, LB_ADDR, to, mac_on_lb0(to)?, lb_mac)?;
        check(
            fx,
            LB_PROGRAM,
            "GUE: ICMP error about a flow, to its backend",
            &err,
            XDP_TX,
            &want,
            &[Counter::Tx, Counter::IcmpErrorForwarded],
            &[],
        )?;
        Ok(())
    })
}

#[test]
fn outer_source_varies_within_the_prefix() -> anyhow::Result<()> {
    let test = require_privileges!();
    with_fixture(test, |fx| {
        let prefix = "198.18.4.0/24";
        let base = u32::from_ne_bytes([198, 18, 4, 0]);
        let web = |sport| syn(SocketAddrV4::new(CLIENT, sport), VIP_WEB);
        let lb_mac = fx.lb_mac;
        let mut sources = std::collections::BTreeSet::new();
        for (encap, label) in [(ENCAP_GUE, "GUE"), (0, "IPIP")] {
            fx.lb.apply(&state(encap, Some(prefix), quic_backends()))?;
            for sport in 43000..43016u16 {
                let f = web(sport).build();
                let to = fx.ring_pick("web", &f, &BACKENDS, 80)?;
                let e = tunnel_entropy(&flow_key_of(&f)?);
                let source = Ipv4Addr::from(tunnel_source_v4(base, 0xff, e).to_ne_bytes());
                sources.insert(source);
                let want = if encap == ENCAP_GUE {
                    gue_frame(&f, source, to, mac_on_lb0(to)?, lb_mac)?
                } else {
                    ipip_frame(&f, source, to, mac_on_lb0(to)?, lb_mac)?
                };
                check(
                    fx,
                    LB_PROGRAM,
                    &format!("{label}: outer source {source} in {prefix}"),
                    &f,
                    XDP_TX,
                    &want,
                    &[Counter::Tx],
                    &[],
                )?;
            }
        }
        ensure!(
            sources.len() > 8,
            "16 flows got only {} outer sources: {sources:?}",
            sources.len()
        );
        Ok(())
    })
}

#[test]
fn gue_decap_fixture_table() -> anyhow::Result<()> {
    let test = require_privileges!();
    with_fixture(test, |fx| {
        let mut dsts: HashMap<_, DecapKey, u32> =
            HashMap::try_from(fx.lb.ebpf.map_mut(names::DECAP_DSTS).context("decap map")?)?;
        let (addr, family) = addr_words(IpAddr::V4(BACKENDS[0]));
        dsts.insert(
            DecapKey {
                addr,
                family,
                _pad: [0; 3],
            },
            1,
            0,
        )?;
        let inner = syn(SocketAddrV4::new(CLIENT, 42000), VIP_WEB).payload(b"hello");
        let inner_ip = inner.build_ipv4();
        let gue = |dst: Ipv4Addr, port: u16, payload: &[u8], vlan: Option<u16>| {
            let mut b = PacketBuilder::udp(
                SocketAddrV4::new(LB_ADDR, 50123),
                SocketAddrV4::new(dst, port),
            )
            .l4_checksum(0)
            .payload(payload);
            if let Some(v) = vlan {
                b = b.vlan(v);
            }
            b.build()
        };
        let delivered = |vlan: Option<u16>| {
            let mut b = inner.clone();
            if let Some(v) = vlan {
                b = b.vlan(v);
            }
            b.build()
        };
        // An IPv6 packet inside: its own frame is the Ethernet header with 0x86dd.
        let inner6 = ipv6_udp("fd00:18::2".parse()?, "fd00:18:100::1".parse()?);
        let inner6_ip = &inner6[14..];
        let mut delivered6 = gue(BACKENDS[0], GUE_PORT, inner6_ip, None)[..14].to_vec();
        delivered6[12..14].copy_from_slice(&[0x86, 0xdd]);
        delivered6.extend_from_slice(inner6_ip);

        let yes = [Counter::DecapGue];
        let no: [Counter; 0] = [];
        let untouched = |f: Vec<u8>| (f.clone(), f);
        let rows: Vec<DecapRow<'_>> = vec![
            (
                "GUE to us",
                (gue(BACKENDS[0], GUE_PORT, &inner_ip, None), delivered(None)),
                &yes,
            ),
            (
                "GUE to us, VLAN-tagged: tag kept",
                (
                    gue(BACKENDS[0], GUE_PORT, &inner_ip, Some(9)),
                    delivered(Some(9)),
                ),
                &yes,
            ),
            (
                "GUE with IPv6 inside",
                (gue(BACKENDS[0], GUE_PORT, inner6_ip, None), delivered6),
                &yes,
            ),
            (
                "UDP to another port",
                untouched(gue(BACKENDS[0], GUE_PORT + 1, &inner_ip, None)),
                &no,
            ),
            (
                "GUE to another host",
                untouched(gue(BACKENDS[1], GUE_PORT, &inner_ip, None)),
                &no,
            ),
            (
                "GUE port, not an IP packet inside (a GUE header, variant 0)",
                untouched(gue(
                    BACKENDS[0],
                    GUE_PORT,
                    &[0x00, 0x00, 0x00, 0x00, 0x45, 0],
                    None,
                )),
                &no,
            ),
            (
                "GUE port, empty",
                untouched(gue(BACKENDS[0], GUE_PORT, &[], None)),
                &no,
            ),
            (
                "GUE port, an IPv4 header cut short",
                untouched(gue(BACKENDS[0], GUE_PORT, &inner_ip[..12], None)),
                &no,
            ),
            (
                "GUE port, a later fragment of the outer packet",
                untouched(
                    PacketBuilder::raw(LB_ADDR, BACKENDS[0], IPPROTO_UDP)
                        .fragment(false, false, 8)
                        .payload(&inner_ip)
                        .build(),
                ),
                &no,
            ),
        ];
        for (name, (input, output), counted) in &rows {
            let quiet: &[Counter] = if counted.is_empty() {
                &yes
            } else {
                &[Counter::Decap]
            };
            check(
                fx,
                DECAP_PROGRAM,
                name,
                input,
                XDP_PASS,
                output,
                counted,
                quiet,
            )?;
        }
        // The port comes from the config: moved, the old one is plain UDP.
        let mut moved = state(0, None, quic_backends());
        moved.gue_port = 7000;
        fx.lb.apply(&moved)?;
        let old = gue(BACKENDS[0], GUE_PORT, &inner_ip, None);
        check(
            fx,
            DECAP_PROGRAM,
            "old GUE port after a change",
            &old,
            XDP_PASS,
            &old,
            &[],
            &yes,
        )?;
        let new = gue(BACKENDS[0], 7000, &inner_ip, None);
        check(
            fx,
            DECAP_PROGRAM,
            "new GUE port",
            &new,
            XDP_PASS,
            &delivered(None),
            &yes,
            &[],
        )?;
        Ok(())
    })
}

/// A QUIC short-header datagram (first byte 0x40: short header, fixed bit) whose
/// destination connection ID is `cid` followed by `tail` (packet number and payload).
fn short_header(cid: [u8; 8], tail: &[u8]) -> Vec<u8> {
    let mut p = vec![0x40];
    p.extend_from_slice(&cid);
    p.extend_from_slice(tail);
    p
}

/// Connection IDs of Katran's versions naming `id`, the server's own bytes after it.
fn cid_v1(id: u32) -> [u8; 8] {
    assert!(id <= 0xffff);
    [
        0x40 | (id >> 10) as u8,
        (id >> 2) as u8,
        ((id & 3) << 6) as u8 | 0x15,
        0xa1,
        0xa2,
        0xa3,
        0xa4,
        0xa5,
    ]
}

fn cid_v2(id: u32) -> [u8; 8] {
    assert!(id <= 0xff_ffff);
    let [_, a, b, c] = id.to_be_bytes();
    [0x80 | 0x2a, a, b, c, 0xb1, 0xb2, 0xb3, 0xb4]
}

fn cid_v3(id: u32) -> [u8; 8] {
    let [a, b, c, d] = id.to_be_bytes();
    [0xc0 | 0x01, a, b, c, d, 0xc2, 0xc3, 0xc4]
}

#[test]
fn quic_connection_ids_route_to_their_backend() -> anyhow::Result<()> {
    let test = require_privileges!();
    with_fixture(test, |fx| {
        fx.lb.apply(&state(0, None, quic_backends()))?;
        let routed = [Counter::Tx, Counter::QuicCidRouted];
        let datagram = |client: SocketAddrV4, payload: &[u8]| {
            PacketBuilder::udp(client, VIP_QUIC)
                .payload(payload)
                .build()
        };
        let ring_to = |fx: &Fixture, f: &[u8]| {
            fx.lb
                .ring_pick("quic", &flow_key_of(f)?, false, &BACKENDS, 443)
        };
        // A client whose ring backend is not `not`: where a hit cannot be luck.
        let client_not_on =
            |fx: &Fixture, not: Ipv4Addr, host: u8| -> anyhow::Result<SocketAddrV4> {
                for port in 20000..20100 {
                    let c = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, host), port);
                    if ring_to(fx, &datagram(c, &[0; 20]))? != not {
                        return Ok(c);
                    }
                }
                anyhow::bail!("every port of 198.18.0.{host} hashes to {not}")
            };

        for (i, (&backend, &id)) in BACKENDS.iter().zip(&QUIC_IDS).enumerate() {
            let cids: Vec<(&str, [u8; 8])> = if id <= 0xffff {
                vec![("v1", cid_v1(id)), ("v2", cid_v2(id)), ("v3", cid_v3(id))]
            } else {
                vec![("v2", cid_v2(id)), ("v3", cid_v3(id))]
            };
            for (version, cid) in cids {
                let payload = short_header(cid, &[0x11; 30]);
                // The client, then the same connection from a new address and port
                // (NAT rebinding): both to the backend the CID names, not the ring's.
                for (what, host) in [("client", 2), ("after NAT rebinding", 77)] {
                    let client = client_not_on(fx, backend, host)?;
                    let f = datagram(client, &payload);
                    let want = fx.encapsulated(&f, backend)?;
                    check(
                        fx,
                        LB_PROGRAM,
                        &format!("QUIC CID {version} naming backend {i} ({id:#x}), {what}"),
                        &f,
                        XDP_TX,
                        &want,
                        &routed,
                        &[Counter::FlowNew, Counter::QuicCidUnknown],
                    )?;
                }
            }
        }

        // Balanced by the ring instead: unknown ids, CIDs of version 00, long headers,
        // datagrams too short for a short header.
        let client = SocketAddrV4::new(CLIENT, 20500);
        let by_ring =
            |fx: &Fixture, name: &str, payload: &[u8], counted: &[Counter], quiet: &[Counter]| {
                let f = datagram(client, payload);
                let to = ring_to(fx, &f)?;
                let want = fx.encapsulated(&f, to)?;
                check(fx, LB_PROGRAM, name, &f, XDP_TX, &want, counted, quiet)
            };
        by_ring(
            fx,
            "QUIC CID naming no backend of the service",
            &short_header(cid_v1(999), &[0; 20]),
            &[Counter::Tx, Counter::QuicCidUnknown],
            &[Counter::QuicCidRouted],
        )?;
        by_ring(
            fx,
            "QUIC CID version 00 (no server id)",
            &short_header([0x3f, 1, 2, 3, 4, 5, 6, 7], &[0; 20]),
            &[Counter::Tx, Counter::QuicCidUnknown],
            &[Counter::QuicCidRouted],
        )?;
        let mut long = vec![0xc3, 0, 0, 0, 1, 8];
        long.extend_from_slice(&cid_v1(QUIC_IDS[1]));
        long.extend_from_slice(&[0; 40]);
        by_ring(
            fx,
            "QUIC long header (handshake) takes the ring",
            &long,
            &[Counter::Tx],
            &[Counter::QuicCidRouted, Counter::QuicCidUnknown],
        )?;
        by_ring(
            fx,
            "a datagram too short for a short header",
            &[0x40, 0x40, 0x40, 0x40],
            &[Counter::Tx],
            &[Counter::QuicCidRouted, Counter::QuicCidUnknown],
        )?;

        // A draining backend (out of the ring, still active) keeps its connections; a
        // backend that is down (inactive) does not: its CIDs take the ring.
        let mut backends = quic_backends();
        backends[1].weight = 0;
        fx.lb.apply(&state(0, None, backends.clone()))?;
        let payload = short_header(cid_v2(QUIC_IDS[1]), &[0x22; 30]);
        let f = datagram(client_not_on(fx, BACKENDS[1], 3)?, &payload);
        let want = fx.encapsulated(&f, BACKENDS[1])?;
        check(
            fx,
            LB_PROGRAM,
            "QUIC CID of a draining backend",
            &f,
            XDP_TX,
            &want,
            &routed,
            &[],
        )?;
        backends[1].active = false;
        fx.lb.apply(&state(0, None, backends))?;
        by_ring(
            fx,
            "QUIC CID of a backend that is down",
            &payload,
            &[Counter::Tx, Counter::QuicCidUnknown],
            &[Counter::QuicCidRouted],
        )?;
        // Without `quic`, a CID means nothing.
        let mut plain = state(0, None, quic_backends());
        plain.services.last_mut().context("quic service")?.quic = false;
        fx.lb.apply(&plain)?;
        by_ring(
            fx,
            "a service without quic ignores connection IDs",
            &short_header(cid_v1(QUIC_IDS[0]), &[0; 20]),
            &[Counter::Tx],
            &[Counter::QuicCidRouted, Counter::QuicCidUnknown],
        )?;
        Ok(())
    })
}

#[test]
fn udp_flows_keep_their_backend_when_the_ring_changes() -> anyhow::Result<()> {
    let test = require_privileges!();
    with_fixture(test, |fx| {
        // A plain UDP service (no quic): its flows live in the flow tables.
        let plain = |backends: Vec<DesiredBackend>| {
            let mut d = state(0, None, backends);
            d.services.last_mut().expect("quic service").quic = false;
            d
        };
        fx.lb.apply(&plain(quic_backends()))?;
        let all = [BACKENDS[0], BACKENDS[1], BACKENDS[2], JOINER];
        let datagram = |port: u16| {
            PacketBuilder::udp(SocketAddrV4::new(CLIENT, port), VIP_QUIC)
                .payload(&[0x5u8; 40])
                .build()
        };
        let mut first = Vec::new();
        for port in 30000..30060u16 {
            let f = datagram(port);
            let to = fx
                .lb
                .ring_pick("quic", &flow_key_of(&f)?, false, &all, 443)?;
            let want = fx.encapsulated(&f, to)?;
            check(
                fx,
                LB_PROGRAM,
                "UDP: first datagram",
                &f,
                XDP_TX,
                &want,
                &[Counter::Tx, Counter::FlowNew],
                &[],
            )?;
            first.push((port, to));
        }
        // A fourth backend joins: the ring changes under the 60 flows.
        let mut backends = quic_backends();
        backends.push(backend(JOINER, 443));
        fx.lb.apply(&plain(backends))?;
        let mut moved_by_ring = 0;
        for &(port, to) in &first {
            let f = datagram(port);
            if fx
                .lb
                .ring_pick("quic", &flow_key_of(&f)?, false, &all, 443)?
                != to
            {
                moved_by_ring += 1;
            }
            let want = fx.encapsulated(&f, to)?;
            check(
                fx,
                LB_PROGRAM,
                &format!("UDP: a later datagram of flow {port} stays on {to}"),
                &f,
                XDP_TX,
                &want,
                &[Counter::Tx, Counter::FlowPromoted],
                &[Counter::FlowNew, Counter::FlowRehash],
            )?;
        }
        ensure!(
            moved_by_ring > 0,
            "the new ring moved none of the 60 flows: the test proves nothing"
        );
        Ok(())
    })
}

/// A second `quic` service, for the rows of keys that share a `QUIC_SLOTS` slot.
const VIP_QUIC2: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 100, 9), 443);

/// `QUIC_SLOTS` is a direct-mapped copy of `QUIC_IDS` (lb-common maps.rs): a key whose
/// slot a key before it holds is found in `QUIC_IDS`, and a slot holding another
/// service's key of the same server id routes nothing for this one. The server ids are
/// found by search (`lb_common::hash::quic_slot` is the oracle): quic2's id `y` falls
/// into the slot of quic's first id (one of the two routes through the hash map), and
/// quic's backend 1 gets an id `x` whose slot is the same for both services (a packet
/// to quic2 naming `x` meets a slot with its server id and quic's backend). And a
/// connection whose long headers put its 5-tuple in the flow table: its short headers
/// go by CID all the same (the flow only names the VIP).
#[test]
fn quic_ids_that_share_a_slot_route_through_the_hash_map() -> anyhow::Result<()> {
    use lb_common::hash::{quic_slot, quic_slot_value};
    let test = require_privileges!();
    with_fixture(test, |fx| {
        let with = |quic: Vec<DesiredBackend>, quic2: Vec<DesiredBackend>| {
            let mut d = state(0, None, quic);
            // The fixture's map holds 8 services: quic2 takes the empty one's place.
            d.services.retain(|s| s.name != "empty");
            let mut q2 = service("quic2", VIP_QUIC2, Protocol::Udp, quic2);
            q2.quic = true;
            d.services.push(q2);
            d
        };
        // First without the empty service (the reconciler adds before it removes).
        let mut first = state(0, None, quic_backends());
        first.services.retain(|s| s.name != "empty");
        fx.lb.apply(&first)?;
        fx.lb
            .apply(&with(quic_backends(), vec![backend(BACKENDS[2], 443)]))?;
        let id = |fx: &Fixture, name: &str| fx.lb.reconciler.service_id(name).context("service id");
        let (s1, s2) = (id(fx, "quic")?, id(fx, "quic2")?);
        let shared = quic_slot(s1, QUIC_IDS[0]);
        let y = (1..=0xff_ffffu32)
            .find(|&y| quic_slot(s2, y) == shared)
            .context("no quic2 id in the slot of quic's first id")?;
        let x = (1..=0xff_ffffu32)
            .find(|&x| quic_slot(s1, x) == quic_slot(s2, x) && quic_slot(s1, x) != shared)
            .context("no id of the same slot in both services")?;
        let mut quic = quic_backends();
        quic[1].quic_id = Some(x);
        let quic2 = vec![DesiredBackend {
            quic_id: Some(y),
            ..backend(BACKENDS[2], 443)
        }];
        fx.lb.apply(&with(quic, quic2))?;

        // The map as the program sees it: one of the two keys of the shared slot holds
        // it, quic's `x` holds its own.
        let bid = |fx: &Fixture, name: &str, b: Ipv4Addr| {
            fx.lb
                .reconciler
                .backend_id(name, b.into(), 443)
                .context("backend id")
        };
        let slot = |fx: &Fixture, s: u32| fx.lb.maps.quic_slots.get(&s, 0);
        let holders = [
            quic_slot_value(QUIC_IDS[0], bid(fx, "quic", BACKENDS[0])?),
            quic_slot_value(y, bid(fx, "quic2", BACKENDS[2])?),
        ];
        let held = slot(fx, shared)?;
        ensure!(
            holders.contains(&held),
            "the shared slot holds {held:#x}, neither key"
        );
        ensure!(
            slot(fx, quic_slot(s1, x))? == quic_slot_value(x, bid(fx, "quic", BACKENDS[1])?),
            "quic's id {x:#x} is not in its slot"
        );

        let routed = [Counter::Tx, Counter::QuicCidRouted];
        let datagram = |vip: SocketAddrV4, cid: [u8; 8]| {
            PacketBuilder::udp(SocketAddrV4::new(CLIENT, 20700), vip)
                .payload(&short_header(cid, &[0x33; 30]))
                .build()
        };
        // Both keys of the shared slot go where their ids say: one through the slot,
        // the other through QUIC_IDS.
        for (name, vip, cid, to) in [
            (
                "quic's first id",
                VIP_QUIC,
                cid_v3(QUIC_IDS[0]),
                BACKENDS[0],
            ),
            (
                "quic2's id of the same slot",
                VIP_QUIC2,
                cid_v3(y),
                BACKENDS[2],
            ),
            ("quic's id x", VIP_QUIC, cid_v3(x), BACKENDS[1]),
        ] {
            let f = datagram(vip, cid);
            let want = fx.encapsulated(&f, to)?;
            check(
                fx,
                LB_PROGRAM,
                name,
                &f,
                XDP_TX,
                &want,
                &routed,
                &[Counter::QuicCidUnknown, Counter::FlowNew],
            )?;
        }
        // A connection whose handshake (long headers) put its 5-tuple in the flow table:
        // its flow names the VIP (no VIP lookup, gate::resolve), its short headers still
        // go where their CID says, its long headers where the flow is.
        let c = SocketAddrV4::new(CLIENT, 20701);
        let mut long = vec![0xc3, 0, 0, 0, 1, 8];
        long.extend_from_slice(&[0x55; 8]);
        long.extend_from_slice(&[0; 20]);
        let lf = PacketBuilder::udp(c, VIP_QUIC).payload(&long).build();
        let ring = fx
            .lb
            .ring_pick("quic", &flow_key_of(&lf)?, false, &BACKENDS, 443)?;
        let want_long = fx.encapsulated(&lf, ring)?;
        let quiet_cid = [Counter::QuicCidRouted, Counter::QuicCidUnknown];
        for n in ["first", "second"] {
            let name = format!("QUIC long header, {n} of the connection");
            check(
                fx,
                LB_PROGRAM,
                &name,
                &lf,
                XDP_TX,
                &want_long,
                &[Counter::Tx],
                &quiet_cid,
            )?;
        }
        let ids = [QUIC_IDS[0], x, QUIC_IDS[2]];
        let i = (0..3)
            .find(|&i| BACKENDS[i] != ring)
            .context("every backend is the ring's")?;
        let sf = PacketBuilder::udp(c, VIP_QUIC)
            .payload(&short_header(cid_v3(ids[i]), &[0x44; 30]))
            .build();
        let want = fx.encapsulated(&sf, BACKENDS[i])?;
        check(
            fx,
            LB_PROGRAM,
            "QUIC short header of a connection in the flow table",
            &sf,
            XDP_TX,
            &want,
            &routed,
            &[Counter::QuicCidUnknown, Counter::FlowNew],
        )?;
        check(
            fx,
            LB_PROGRAM,
            "QUIC long header of that connection again",
            &lf,
            XDP_TX,
            &want_long,
            &[Counter::Tx],
            &[
                Counter::QuicCidRouted,
                Counter::QuicCidUnknown,
                Counter::FlowNew,
            ],
        )?;
        // quic2 has no id x: its slot holds quic's x, whose backend is not quic2's.
        let f = datagram(VIP_QUIC2, cid_v3(x));
        let to = fx
            .lb
            .ring_pick("quic2", &flow_key_of(&f)?, false, &[BACKENDS[2]], 443)?;
        let want = fx.encapsulated(&f, to)?;
        check(
            fx,
            LB_PROGRAM,
            "quic2 naming quic's id x (another service's key in its slot)",
            &f,
            XDP_TX,
            &want,
            &[Counter::Tx, Counter::QuicCidUnknown],
            &[Counter::QuicCidRouted],
        )?;
        // Removed keys leave their slots: quic2 without ids, then its id x routes nothing
        // and y neither.
        fx.lb
            .apply(&with(quic_backends(), vec![backend(BACKENDS[2], 443)]))?;
        ensure!(
            slot(fx, quic_slot(s1, x))? == 0,
            "the slot of a removed id is not empty"
        );
        let f = datagram(VIP_QUIC2, cid_v3(y));
        let want = fx.encapsulated(&f, BACKENDS[2])?;
        check(
            fx,
            LB_PROGRAM,
            "quic2's removed id",
            &f,
            XDP_TX,
            &want,
            &[Counter::Tx, Counter::QuicCidUnknown],
            &[Counter::QuicCidRouted],
        )?;
        Ok(())
    })
}
