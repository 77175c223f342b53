//! XDP behaviour as a fixture table, run through `BPF_PROG_TEST_RUN` (aya's `test_run`):
//! input frame + map state -> expected verdict, counter and output frame. No traffic
//! crosses any link: the namespace only gives `bpf_fib_lookup` a routing table with
//! known neighbours (static entries), an unresolved next hop and an unreachable route.
//!
//! Each [`Row`] is data: a name, the input frame, what must happen ([`Expect`]: `Tx` /
//! `Redirect` to a backend, `Pass(Counter)` or `Drop(DropReason)`, the `lb_common::stats`
//! enums) and the output frame, byte for byte. One runner, [`check_row`], checks a row:
//! verdict, output frame, `rx` and the one outcome counter counted (and no other
//! outcome), and the per-service and per-backend traffic counters (one packet to the
//! backend when forwarded, nothing otherwise). Nothing in an expected frame is
//! predicted loosely: a passed or dropped frame must come out unchanged, and an
//! encapsulated one is built by [`ipip_frame`] (the outer identification is 0 and DF
//! clear by design, so the outer checksum is fixed as well).
//!
//! The backend a VIP packet must go to is predicted with `lb_common::hash` (the oracle)
//! and the ring the agent wrote, not by asking the program.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4},
    sync::Mutex,
    time::Instant,
};

use anyhow::{Context as _, ensure};
use aya::maps::HashMap;
use lb_agent::{
    config::{FlowLimitConfig, Protocol},
    dataplane::{
        desired::{DesiredBackend, DesiredFilters, DesiredService, DesiredState},
        filters::{Scope, filter_key},
        forwarding::InterfaceForwarding,
        loader::{self, Capacities, DECAP_PROGRAM, LB_PROGRAM},
        stats,
        sync::{Reconciler, addr_words},
    },
};
use lb_common::{
    hash::flow_hash,
    maps as names,
    stats::{Counter, DropReason},
    types::{
        DecapKey, FILTER_RULE_NOT_ALLOWED, NEXT_HOP_F_VALID, NextHopEntry, PROTO_TCP, PROTO_UDP,
    },
};
use xdplb_tests::{
    netns::mac_of,
    packet::{
        Frame, IPPROTO_ICMP, IPPROTO_IPIP, L4, PacketBuilder, check_checksums, internet_checksum,
        tcp_flags,
    },
    require_privileges,
    xdp_bed::{
        LoadedLb, Net, XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, first_difference,
        flow_key, flow_key_of, in_bed, ipip_frame, pin_to_current_cpu, test_run, verdict_name,
        xdp_md,
    },
};

const RING: u32 = 1021;
const LB_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
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
/// A router between backends and clients: sends ICMP errors about replies to the VIP.
const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Joins the web service in the flow-table test.
const JOINER: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 14);
const JOINER_MAC: [u8; 6] = [0x02, 0xbe, 0, 0, 0, 0x14];
/// Behind the second interface: redirect.
const FAR_BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 11);
const FAR_MAC: [u8; 6] = [0x02, 0xbe, 0, 0, 2, 0x11];
/// On-link, never resolved.
const UNRESOLVED: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 99);
/// Behind an unreachable route.
const UNREACHABLE: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 1);

const VIP_WEB: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 100, 1), 80);
const VIP_DNS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 100, 2), 53);
const VIP_NONEIGH: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 100, 3), 80);
const VIP_UNREACH: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 100, 4), 80);
const VIP_L7: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 100, 5), 80);
const VIP_EMPTY: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 100, 6), 80);
const VIP_STICKY: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 100, 7), 443);

/// MTU of `lb0` (the veth default): the limit `bpf_fib_lookup` checks the outer packet against.
const LB0_MTU: u16 = 1500;
/// Bytes of XDP metadata in front of a frame that leave less headroom than the 20 bytes
/// of the tunnel header: `test_run` puts the frame at 256 bytes from the buffer start,
/// the metadata just before it and the kernel's `struct xdp_frame` (40 bytes) at the
/// start, so with 200 bytes of metadata only 16 are free and growing the head fails.
const HEADROOM_EATING_METADATA: u32 = 200;

/// Namespace test beds are built one at a time per process.
static SERIAL: Mutex<()> = Mutex::new(());

fn backend(addr: Ipv4Addr, port: u16) -> DesiredBackend {
    DesiredBackend {
        quic_id: None,
        address: addr.into(),
        port,
        weight: 100,
        active: true,
    }
}

fn service(
    name: &str,
    vip: SocketAddrV4,
    protocol: Protocol,
    backends: Vec<DesiredBackend>,
) -> DesiredService {
    DesiredService {
        quic: false,
        name: name.into(),
        vip: vip.into(),
        protocol,
        l7: false,
        source_hash: false,
        backends,
        filters: DesiredFilters::default(),
    }
}

fn desired() -> DesiredState {
    let web = BACKENDS.iter().map(|&b| backend(b, 80)).collect();
    let mut l7 = service("l7", VIP_L7, Protocol::Tcp, vec![backend(BACKENDS[0], 80)]);
    l7.l7 = true;
    let mut sticky = service(
        "sticky",
        VIP_STICKY,
        Protocol::Tcp,
        BACKENDS.iter().map(|&b| backend(b, 443)).collect(),
    );
    sticky.source_hash = true;
    DesiredState {
        gue_port: 6080,
        source_v4_prefix: None,
        source_v6_prefix: None,
        max_new_flows_per_cpu: 0,
        icmp_errors_per_cpu: 0,
        source_v4: Some(LB_ADDR),
        source_v6: None,
        encap: 0,
        mtu: 1500,
        filters: Default::default(),
        services: vec![
            service("web", VIP_WEB, Protocol::Tcp, web),
            service(
                "dns",
                VIP_DNS,
                Protocol::Udp,
                vec![backend(FAR_BACKEND, 53)],
            ),
            service(
                "noneigh",
                VIP_NONEIGH,
                Protocol::Tcp,
                vec![backend(UNRESOLVED, 80)],
            ),
            service(
                "unreach",
                VIP_UNREACH,
                Protocol::Tcp,
                vec![backend(UNREACHABLE, 80)],
            ),
            l7,
            service("empty", VIP_EMPTY, Protocol::Tcp, vec![]),
            sticky,
        ],
    }
}

/// The routing fixture: `lb0` (198.18.1.0/24, static neighbours for the three backends
/// and the joiner, none for .99), `far0` (198.18.2.0/24, one static neighbour), an
/// unreachable route for 198.18.3.0/24, clients behind 198.18.1.1.
fn net() -> Net {
    let mut neighbours: Vec<_> = BACKENDS
        .iter()
        .zip(BACKEND_MACS)
        .map(|(&b, m)| (b, m, "lb0"))
        .collect();
    neighbours.push((FAR_BACKEND, FAR_MAC, "far0"));
    neighbours.push((JOINER, JOINER_MAC, "lb0"));
    Net {
        links: vec![("lb0", "198.18.1.10/24"), ("far0", "198.18.2.10/24")],
        neighbours,
        routes: vec![
            "unreachable 198.18.3.0/24",
            "198.18.0.0/24 via 198.18.1.1 dev lb0",
        ],
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

/// The loaded object and what the routing table looks like.
struct Fixture {
    lb: LoadedLb,
    ifindex: u32,
    lb_mac: [u8; 6],
    far_mac: [u8; 6],
    _forwarding: InterfaceForwarding,
}

impl Fixture {
    /// Must run on a thread inside the fixture namespace.
    fn new() -> anyhow::Result<Self> {
        Ok(Fixture {
            lb: LoadedLb::load(&caps(), &desired(), &[LB_PROGRAM, DECAP_PROGRAM])?,
            ifindex: loader::if_index("lb0")?,
            lb_mac: mac_of("lb0")?,
            far_mac: mac_of("far0")?,
            _forwarding: InterfaceForwarding::enable("lb0")?,
        })
    }

    /// Runs `program` once on `frame` received on `lb0`, after `meta_len` zero bytes
    /// of XDP metadata; the output has the metadata removed (checked unchanged).
    fn run_with_meta(
        &self,
        program: &str,
        frame: &[u8],
        meta_len: u32,
    ) -> anyhow::Result<(u32, Vec<u8>)> {
        let meta = vec![0u8; meta_len as usize];
        let data = [meta.as_slice(), frame].concat();
        let ctx = xdp_md(frame.len(), self.ifindex, meta_len);
        let mut run = test_run(self.lb.program(program)?, &data, &ctx, 1)?;
        ensure!(
            run.out.starts_with(&meta),
            "the XDP metadata came out changed"
        );
        run.out.drain(..meta.len());
        Ok((run.verdict, run.out))
    }

    fn run(&self, program: &str, frame: &[u8]) -> anyhow::Result<(u32, Vec<u8>)> {
        self.run_with_meta(program, frame, 0)
    }

    fn counters(&self) -> stats::Counters {
        self.lb.counters().expect("counters")
    }

    /// Oracle: the backend of `service` (among `candidates` on `port`) that its ring
    /// gives `frame`'s flow, hashed as the service says (5-tuple, or source address).
    fn ring_pick(
        &self,
        service: &str,
        frame: &[u8],
        candidates: &[Ipv4Addr],
        port: u16,
    ) -> anyhow::Result<Ipv4Addr> {
        let source_affinity = desired()
            .services
            .iter()
            .find(|s| s.name == service)
            .with_context(|| format!("no service {service}"))?
            .source_hash;
        self.lb.ring_pick(
            service,
            &flow_key_of(frame)?,
            source_affinity,
            candidates,
            port,
        )
    }

    /// The frame the balancer sends for `input` towards `backend` on `lb0`.
    fn encapsulated(&self, input: &[u8], backend: Ipv4Addr) -> anyhow::Result<Vec<u8>> {
        let mac = BACKENDS
            .iter()
            .chain([&JOINER])
            .zip(BACKEND_MACS.iter().chain([&JOINER_MAC]))
            .find(|(b, _)| **b == backend)
            .map(|(_, m)| *m)
            .with_context(|| format!("{backend} is no neighbour on lb0"))?;
        ipip_frame(input, LB_ADDR, backend, mac, self.lb_mac)
    }

    /// Drops per `[security]` rule as the agent reads them: each deny prefix written,
    /// and `not_allowed`.
    fn filter_drops(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        let mut out = BTreeMap::new();
        out.insert(
            stats::NOT_ALLOWED_RULE.to_owned(),
            stats::filter_drops(&self.lb.maps, FILTER_RULE_NOT_ALLOWED)?,
        );
        for (net, id) in self.lb.reconciler.deny_rules() {
            out.insert(net.to_string(), stats::filter_drops(&self.lb.maps, id)?);
        }
        for (rule, id) in self.lb.reconciler.service_filter_rules() {
            out.insert(rule, stats::filter_drops(&self.lb.maps, id)?);
        }
        Ok(out)
    }

    /// Packets and bytes forwarded, per service and per backend (by address and id).
    fn traffic(&self) -> anyhow::Result<Traffic> {
        let mut t = Traffic::default();
        for svc in &desired().services {
            let id = self.lb.reconciler.service_id(&svc.name).context("id")?;
            let s = stats::service_traffic(
                &self.lb.maps,
                id,
                self.lb.reconciler.service_backend_ids(&svc.name),
            )?;
            t.services.push((s.packets, s.bytes));
            for b in &svc.backends {
                let id = self
                    .lb
                    .reconciler
                    .backend_id(&svc.name, b.address, b.port)
                    .context("backend id")?;
                let b_t = stats::backend_traffic(&self.lb.maps, id)?;
                t.backends.push((b.address, (b_t.packets, b_t.bytes)));
            }
        }
        Ok(t)
    }
}

/// Forwarded traffic as counted by the program (`count_forwarded`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Traffic {
    /// `(packets, bytes)` per service of [`desired`], in order.
    services: Vec<(u64, u64)>,
    /// Backend address and `(packets, bytes)`, per backend of every service.
    backends: Vec<(IpAddr, (u64, u64))>,
}

/// What the program must do with a row's frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Encapsulated to `backend` and sent back out of `lb0` (XDP_TX, counted `tx`).
    Tx { backend: Ipv4Addr },
    /// Encapsulated to `backend` and redirected to another interface (XDP_REDIRECT,
    /// counted `redirect`).
    Redirect { backend: Ipv4Addr },
    /// Passed to the kernel (XDP_PASS), counted under this counter.
    Pass(Counter),
    /// Dropped (XDP_DROP), counted under this reason.
    Drop(DropReason),
    /// Answered from XDP (an ICMP echo reply or "fragmentation needed" back out of
    /// `lb0`, XDP_TX), counted under this counter; nothing is forwarded.
    Reply(Counter),
}

impl Expect {
    fn verdict(self) -> u32 {
        match self {
            Expect::Tx { .. } | Expect::Reply(_) => XDP_TX,
            Expect::Redirect { .. } => XDP_REDIRECT,
            Expect::Pass(_) => XDP_PASS,
            Expect::Drop(_) => XDP_DROP,
        }
    }

    /// The one outcome counter (global counter index) this packet must bump.
    fn outcome_index(self) -> u32 {
        match self {
            Expect::Tx { .. } => Counter::Tx.index(),
            Expect::Redirect { .. } => Counter::Redirect.index(),
            Expect::Pass(c) | Expect::Reply(c) => c.index(),
            Expect::Drop(r) => r.index(),
        }
    }

    fn forwarded_to(self) -> Option<Ipv4Addr> {
        match self {
            Expect::Tx { backend } | Expect::Redirect { backend } => Some(backend),
            Expect::Pass(_) | Expect::Drop(_) | Expect::Reply(_) => None,
        }
    }
}

/// The counters that say what happened to a packet: exactly one of them counts each
/// packet of the balancer ([`Counter::is_outcome`], or a drop reason; `rx` is their sum).
fn is_outcome(index: u32) -> bool {
    Counter::ALL
        .iter()
        .find(|c| c.index() == index)
        .is_none_or(|c| c.is_outcome())
}

/// All global counters by index (counters, then drop reasons).
fn by_index(c: &stats::Counters) -> Vec<(u32, &'static str, u64)> {
    c.counters
        .iter()
        .map(|(k, v)| (k.index(), k.label(), *v))
        .chain(c.drops.iter().map(|(k, v)| (k.index(), k.label(), *v)))
        .collect()
}

/// One row of the table: what goes in, what must come out.
struct Row {
    name: String,
    input: Vec<u8>,
    expect: Expect,
    /// The frame after the program, byte for byte.
    output: Vec<u8>,
    /// Bytes of XDP metadata in front of the frame (0: none).
    meta_len: u32,
    /// The `[security]` rule whose drop counter must count it (a deny prefix, or
    /// `not_allowed`); None: no filter counter moves.
    rule: Option<&'static str>,
}

/// A row whose frame must come out unchanged (passed or dropped).
fn unchanged(name: impl Into<String>, input: Vec<u8>, expect: Expect) -> Row {
    Row {
        name: name.into(),
        output: input.clone(),
        input,
        expect,
        meta_len: 0,
        rule: None,
    }
}

/// A row dropped by a `[security]` rule, its frame unchanged.
fn filtered(
    name: impl Into<String>,
    input: Vec<u8>,
    reason: DropReason,
    rule: &'static str,
) -> Row {
    Row {
        rule: Some(rule),
        ..unchanged(name, input, Expect::Drop(reason))
    }
}

/// A row whose frame must come out as `output`.
fn row(name: impl Into<String>, input: Vec<u8>, expect: Expect, output: Vec<u8>) -> Row {
    Row {
        name: name.into(),
        input,
        expect,
        output,
        meta_len: 0,
        rule: None,
    }
}

/// Runs `row` through `xdp_lb` and checks everything it says; see the module docs.
fn check_row(fx: &Fixture, row: &Row) -> anyhow::Result<()> {
    let name = &row.name;
    let before = fx.counters();
    let traffic_before = fx.traffic()?;
    let rules_before = fx.filter_drops()?;
    let (verdict, out) = fx.run_with_meta(LB_PROGRAM, &row.input, row.meta_len)?;
    let after = fx.counters();
    let traffic_after = fx.traffic()?;
    let rules_after = fx.filter_drops()?;
    let mut rules_want = rules_before.clone();
    if let Some(rule) = row.rule {
        *rules_want
            .get_mut(rule)
            .with_context(|| format!("{name}: no filter rule {rule} is written"))? += 1;
    }
    ensure!(
        rules_after == rules_want,
        "{name}: filter rule counters went {rules_before:?} -> {rules_after:?}, want {rules_want:?}"
    );

    let want = row.expect.verdict();
    ensure!(
        verdict == want,
        "{name}: verdict {}, want {}",
        verdict_name(verdict),
        verdict_name(want)
    );
    if let Some(diff) = first_difference(&row.output, &out) {
        anyhow::bail!("{name}: output frame differs from the expected one: {diff}");
    }
    if row.expect.forwarded_to().is_some() || matches!(row.expect, Expect::Reply(_)) {
        check_checksums(&out).with_context(|| format!("{name}: checksums"))?;
    }

    ensure!(
        after.get(Counter::Rx) == before.get(Counter::Rx) + 1,
        "{name}: rx not counted"
    );
    let outcome = row.expect.outcome_index();
    for ((index, label, b), (_, _, a)) in by_index(&before).into_iter().zip(by_index(&after)) {
        if index == outcome {
            ensure!(a == b + 1, "{name}: counter {label} did not count it");
        } else if is_outcome(index) {
            ensure!(
                a == b,
                "{name}: counter {label} counted it too ({b} -> {a})"
            );
        }
    }

    // Forwarded traffic: one packet of the inner packet's length, to the one service and
    // the one backend, only when it really left encapsulated.
    match row.expect.forwarded_to() {
        None => ensure!(
            traffic_after == traffic_before,
            "{name}: counted as forwarded traffic but not forwarded: {traffic_before:?} -> {traffic_after:?}"
        ),
        Some(backend) => {
            let inner_len = u64::from(Frame::parse(&row.input)?.ipv4()?.tot_len);
            let delta = |a: (u64, u64), b: (u64, u64)| (a.0 - b.0, a.1 - b.1);
            let services: Vec<_> = traffic_after
                .services
                .iter()
                .zip(&traffic_before.services)
                .map(|(a, b)| delta(*a, *b))
                .filter(|d| *d != (0, 0))
                .collect();
            ensure!(
                services == [(1, inner_len)],
                "{name}: service traffic changed by {services:?}, want one packet of {inner_len} bytes"
            );
            let backends: Vec<_> = traffic_after
                .backends
                .iter()
                .zip(&traffic_before.backends)
                .map(|(a, b)| (a.0, delta(a.1, b.1)))
                .filter(|(_, d)| *d != (0, 0))
                .collect();
            ensure!(
                backends == [(IpAddr::V4(backend), (1, inner_len))],
                "{name}: backend traffic changed by {backends:?}, want one packet of {inner_len} bytes to {backend}"
            );
        }
    }
    Ok(())
}

/// Build the fixture namespace and run `body` inside it with a loaded fixture.
fn with_fixture<F>(test: &str, body: F) -> anyhow::Result<()>
where
    F: FnOnce(&mut Fixture) -> anyhow::Result<()> + Send + 'static,
{
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    in_bed("fx", &net(), move || {
        let mut fx = Fixture::new()?;
        body(&mut fx)
    })
    .with_context(|| format!("fixture test {test}"))
}

fn syn(src: SocketAddrV4, dst: SocketAddrV4) -> PacketBuilder {
    PacketBuilder::tcp(src, dst).flags(tcp_flags::SYN)
}

#[test]
fn balancer_fixture_table() -> anyhow::Result<()> {
    let test = require_privileges!();
    with_fixture(test, |fx| {
        use Expect::{Drop, Pass, Redirect, Tx};
        let client = SocketAddrV4::new(CLIENT, 40000);
        let web = |sport| syn(SocketAddrV4::new(CLIENT, sport), VIP_WEB);

        // Frames whose expected output depends on the ring: built first, the backend
        // predicted by the oracle.
        let vip_hit = web(40010)
            .tos(0x28)
            .payload(b"GET / HTTP/1.1\r\n\r\n")
            .build();
        let vip_hit_to = fx.ring_pick("web", &vip_hit, &BACKENDS, 80)?;
        let tagged = web(40011).vlan(42).build();
        let tagged_to = fx.ring_pick("web", &tagged, &BACKENDS, 80)?;
        // Found by the property test (xdp_fuzz): bytes after the IP packet went into the
        // tunnel. A minimal frame padded to 60 bytes, as an Ethernet NIC delivers it,
        // and one with a 64-byte trailer of garbage.
        let mut padded = web(40014).build();
        padded.resize(60, 0);
        let padded_to = fx.ring_pick("web", &padded, &BACKENDS, 80)?;
        let mut trailer = web(40015).vlan(3).payload(b"data").build();
        trailer.extend((0..64u8).map(|b| b.wrapping_mul(37)));
        let trailer_to = fx.ring_pick("web", &trailer, &BACKENDS, 80)?;
        let dns = PacketBuilder::udp(SocketAddrV4::new(CLIENT, 5353), VIP_DNS)
            .payload(&[0; 12])
            .build();
        // Fits the MTU as it is, not once 20 bytes of tunnel header are added.
        let big = web(40012)
            .payload(&vec![0x5a; usize::from(LB0_MTU) - 40 - 10])
            .build();
        let mut no_headroom = unchanged(
            "no headroom left for the tunnel header (XDP metadata fills it)",
            web(40013).build(),
            Drop(DropReason::EncapFailed),
        );
        no_headroom.meta_len = HEADROOM_EATING_METADATA;

        let rows = vec![
            unchanged(
                "non-VIP address",
                syn(client, SocketAddrV4::new(LB_ADDR, 80)).build(),
                Pass(Counter::PassNotVip),
            ),
            unchanged(
                "VIP, other port",
                syn(client, SocketAddrV4::new(*VIP_WEB.ip(), 81)).build(),
                Pass(Counter::PassNotVip),
            ),
            unchanged(
                "VIP, other protocol (UDP to a TCP VIP)",
                PacketBuilder::udp(client, VIP_WEB).build(),
                Pass(Counter::PassNotVip),
            ),
            row(
                "ICMP echo request to the VIP: answered from XDP",
                echo(CLIENT, *VIP_WEB.ip(), 8, 0),
                Expect::Reply(Counter::IcmpEchoReply),
                echo_reply(CLIENT, *VIP_WEB.ip()),
            ),
            unchanged(
                "first fragment (MF)",
                web(40001).fragment(false, true, 0).build(),
                Pass(Counter::PassFragment),
            ),
            unchanged(
                "later fragment (offset)",
                PacketBuilder::new(
                    CLIENT,
                    *VIP_WEB.ip(),
                    L4::Raw {
                        protocol: PROTO_TCP,
                    },
                )
                .payload(&[0; 24])
                .fragment(false, false, 3)
                .build(),
                Pass(Counter::PassFragment),
            ),
            unchanged(
                "IPv4 options",
                web(40002).options(&[1, 1, 1, 1]).build(),
                Pass(Counter::PassIpOptions),
            ),
            unchanged(
                "tot_len beyond the frame",
                web(40003).tot_len(200).build(),
                Pass(Counter::PassTruncated),
            ),
            unchanged(
                "ARP",
                {
                    let mut f = web(40004).build();
                    f[12] = 0x08;
                    f[13] = 0x06;
                    f
                },
                Pass(Counter::PassNotIp),
            ),
            unchanged(
                "L7 VIP goes to the kernel",
                syn(client, VIP_L7).build(),
                Pass(Counter::PassL7),
            ),
            unchanged(
                "service without backends",
                syn(client, VIP_EMPTY).build(),
                Drop(DropReason::NoBackend),
            ),
            unchanged(
                "next hop not resolved yet",
                syn(client, VIP_NONEIGH).build(),
                Pass(Counter::PassNoNeighbour),
            ),
            unchanged(
                "backend behind an unreachable route",
                syn(client, VIP_UNREACH).build(),
                Drop(DropReason::NoRoute),
            ),
            row(
                "DF packet over the MTU once encapsulated: fragmentation needed",
                big.clone(),
                Expect::Reply(Counter::IcmpFragNeeded),
                frag_needed(&big, LB0_MTU)?,
            ),
            no_headroom,
            row(
                "VIP hit: encapsulated to the ring's backend, TOS copied",
                vip_hit.clone(),
                Tx {
                    backend: vip_hit_to,
                },
                fx.encapsulated(&vip_hit, vip_hit_to)?,
            ),
            row(
                "VLAN-tagged VIP hit: balanced, the outer frame untagged",
                tagged.clone(),
                Tx { backend: tagged_to },
                fx.encapsulated(&tagged, tagged_to)?,
            ),
            row(
                "Ethernet padding after the IP packet is not tunnelled",
                padded.clone(),
                Tx { backend: padded_to },
                fx.encapsulated(&padded, padded_to)?,
            ),
            row(
                "a trailer after the IP packet (VLAN-tagged) is not tunnelled",
                trailer.clone(),
                Tx {
                    backend: trailer_to,
                },
                fx.encapsulated(&trailer, trailer_to)?,
            ),
            row(
                "UDP VIP whose backend is behind the other interface: redirected there",
                dns.clone(),
                Redirect {
                    backend: FAR_BACKEND,
                },
                ipip_frame(&dns, LB_ADDR, FAR_BACKEND, FAR_MAC, fx.far_mac)?,
            ),
        ];
        for r in &rows {
            check_row(fx, r)?;
        }
        Ok(())
    })
}

/// An ICMP message (header and body) with its checksum computed from scratch (the
/// program updates echo checksums incrementally: this is the independent oracle).
fn icmp_message(kind: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut m = vec![kind, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(body);
    let c = internet_checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

const PING_BODY: &[u8] = b"xdplb ping 0123456789";

/// An echo request of `kind`/`code` (8/0: a real one) from `src` to `dst`.
fn echo(src: Ipv4Addr, dst: Ipv4Addr, kind: u8, code: u8) -> Vec<u8> {
    PacketBuilder::raw(src, dst, IPPROTO_ICMP)
        .id(0x4242)
        .ttl(57)
        .payload(&icmp_message(kind, code, [0x12, 0x34, 0, 7], PING_BODY))
        .build()
}

/// The reply to [`echo`]: MACs and addresses swapped, TTL 64, type 0, same id,
/// sequence and data.
fn echo_reply(client: Ipv4Addr, vip: Ipv4Addr) -> Vec<u8> {
    let probe = PacketBuilder::raw(client, vip, IPPROTO_ICMP);
    PacketBuilder::raw(vip, client, IPPROTO_ICMP)
        .macs(probe.dst_mac, probe.src_mac)
        .id(0x4242)
        .ttl(64)
        .payload(&icmp_message(0, 0, [0x12, 0x34, 0, 7], PING_BODY))
        .build()
}

/// The ICMP "fragmentation needed" the balancer must send for `input` with `mtu`
/// towards the backends: from the VIP to the client, MACs swapped (VLAN tag kept),
/// TOS 0xc0, id 0, DF clear, TTL 64, next-hop MTU `mtu` - 20, quoting as much of
/// the IP packet of `input` as fits in 576 bytes (548; RFC 1812 4.3.2.3).
fn frag_needed(input: &[u8], mtu: u16) -> anyhow::Result<Vec<u8>> {
    let f = Frame::parse(input)?;
    let ip = f.ipv4()?;
    let mut quote = ip.header.clone();
    quote.extend_from_slice(&ip.payload);
    quote.truncate(548);
    let [hi, lo] = (mtu - 20).to_be_bytes();
    let mut b = PacketBuilder::raw(ip.dst, ip.src, IPPROTO_ICMP)
        .macs(f.dst_mac, f.src_mac)
        .tos(0xc0)
        .id(0)
        .fragment(false, false, 0)
        .ttl(64)
        .payload(&icmp_message(3, 4, [0, 0, hi, lo], &quote));
    if let Some(v) = f.vlan {
        b = b.vlan(v);
    }
    Ok(b.build())
}

/// A router's ICMP destination unreachable (`code`, next-hop MTU `mtu`) to `to`,
/// quoting `quote` (normally the first 28 bytes of the packet it could not forward).
fn unreachable(to: Ipv4Addr, code: u8, mtu: u16, quote: &[u8]) -> Vec<u8> {
    let [hi, lo] = mtu.to_be_bytes();
    PacketBuilder::raw(ROUTER, to, IPPROTO_ICMP)
        .ttl(250)
        .payload(&icmp_message(3, code, [0, 0, hi, lo], quote))
        .build()
}

/// The first 28 bytes of a full-size reply `vip` -> `client` (what a router quotes).
fn reply_quote(vip: SocketAddrV4, client: SocketAddrV4) -> Vec<u8> {
    PacketBuilder::tcp(vip, client)
        .payload(&[0x33; 1400])
        .build_ipv4()[..28]
        .to_vec()
}

/// An Ethernet + IPv6 + UDP frame (the balancer has no IPv6 VIPs yet: only the deny
/// list applies to IPv6 sources).
fn ipv6_udp(src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x86, 0xdd]);
    f.extend_from_slice(&[0x60, 0, 0, 0, 0, 8, PROTO_UDP, 64]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&[0x9c, 0x40, 0, 53, 0, 8, 0, 0]);
    f
}

fn prefixes(list: &[&str]) -> Vec<ipnet::IpNet> {
    list.iter().map(|p| p.parse().expect("prefix")).collect()
}

#[test]
fn source_filters_drop_denied_and_unlisted_sources() -> anyhow::Result<()> {
    let test = require_privileges!();
    with_fixture(test, |fx| {
        use Expect::{Pass, Tx};
        use lb_common::stats::DropReason::{FilterDeny, FilterNotAllowed};
        let from = |a: u8, port: u16| SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, a), port);
        let v6_dst: Ipv6Addr = "fd00:18::10".parse()?;

        // Deny only. Overlapping prefixes: the longest one counts the drop.
        let mut d = desired();
        d.filters = DesiredFilters {
            deny: prefixes(&[
                "198.18.0.128/25",
                "198.18.0.192/26",
                "198.18.0.77/32",
                "2001:db8:bad::/48",
            ]),
            allow: vec![],
            new_flows: None,
        };
        fx.lb.apply(&d)?;
        let miss = syn(from(2, 43000), VIP_WEB).build();
        let miss_to = fx.ring_pick("web", &miss, &BACKENDS, 80)?;
        let rows = vec![
            filtered(
                "deny hit: SYN to a VIP",
                syn(from(130, 43001), VIP_WEB).build(),
                FilterDeny,
                "198.18.0.128/25",
            ),
            filtered(
                "deny hit on the longer of two prefixes",
                syn(from(200, 43002), VIP_WEB).build(),
                FilterDeny,
                "198.18.0.192/26",
            ),
            filtered(
                "deny hit on a /32",
                PacketBuilder::udp(from(77, 43003), VIP_DNS).build(),
                FilterDeny,
                "198.18.0.77/32",
            ),
            filtered(
                "deny applies to non-VIP traffic too",
                syn(from(130, 43004), SocketAddrV4::new(LB_ADDR, 22)).build(),
                FilterDeny,
                "198.18.0.128/25",
            ),
            filtered(
                "deny before the parser: a fragment",
                syn(from(130, 43005), VIP_WEB)
                    .fragment(false, true, 0)
                    .build(),
                FilterDeny,
                "198.18.0.128/25",
            ),
            filtered(
                "deny: VLAN-tagged",
                syn(from(131, 43006), VIP_WEB).vlan(5).build(),
                FilterDeny,
                "198.18.0.128/25",
            ),
            filtered(
                "deny hit: IPv6 source",
                ipv6_udp("2001:db8:bad:1::7".parse()?, v6_dst),
                FilterDeny,
                "2001:db8:bad::/48",
            ),
            unchanged(
                // IPv6 is parsed now (xdp_fixtures_v6): not for a VIP, passed.
                "deny miss: IPv6 source (not for a VIP: passed)",
                ipv6_udp("2001:db8:bae::7".parse()?, v6_dst),
                Pass(Counter::PassNotVip),
            ),
            unchanged(
                "deny miss: just below the /25",
                syn(from(127, 43007), SocketAddrV4::new(LB_ADDR, 22)).build(),
                Pass(Counter::PassNotVip),
            ),
            row(
                "deny miss: balanced as before",
                miss.clone(),
                Tx { backend: miss_to },
                fx.encapsulated(&miss, miss_to)?,
            ),
        ];
        for r in &rows {
            check_row(fx, r)?;
        }

        // Allow as well: only 198.18.0.0/30 reaches VIPs; deny still comes first.
        d.filters.allow = prefixes(&["198.18.0.0/30", "2001:db8::/32"]);
        d.filters.deny.push("198.18.0.3/32".parse()?);
        fx.lb.apply(&d)?;
        let hit = syn(from(2, 43010), VIP_WEB).build();
        let hit_to = fx.ring_pick("web", &hit, &BACKENDS, 80)?;
        let rows = vec![
            row(
                "allow hit: balanced",
                hit.clone(),
                Tx { backend: hit_to },
                fx.encapsulated(&hit, hit_to)?,
            ),
            filtered(
                "allow miss: SYN to a VIP",
                syn(from(9, 43011), VIP_WEB).build(),
                FilterNotAllowed,
                stats::NOT_ALLOWED_RULE,
            ),
            filtered(
                "allow miss: to an L7 VIP",
                syn(from(9, 43012), VIP_L7).build(),
                FilterNotAllowed,
                stats::NOT_ALLOWED_RULE,
            ),
            unchanged(
                "allow miss: non-VIP traffic passes",
                syn(from(9, 43013), SocketAddrV4::new(LB_ADDR, 22)).build(),
                Pass(Counter::PassNotVip),
            ),
            unchanged(
                "allow list: IPv6 to no VIP passes",
                ipv6_udp("2001:db9::1".parse()?, v6_dst),
                Pass(Counter::PassNotVip),
            ),
            filtered(
                "deny beats allow",
                syn(from(3, 43014), VIP_WEB).build(),
                FilterDeny,
                "198.18.0.3/32",
            ),
        ];
        for r in &rows {
            check_row(fx, r)?;
        }
        // Rule ids stay with their prefixes across applies: counts are not reset.
        let counts = fx.filter_drops()?;
        ensure!(counts["198.18.0.128/25"] == 4, "counts kept: {counts:?}");
        // A restarted agent reads the tries back: same prefixes, same rule ids.
        let adopted = Reconciler::adopt(&fx.lb.maps, &caps(), &d)?;
        let ids = |r: &Reconciler| r.deny_rules().collect::<Vec<_>>();
        ensure!(
            ids(&adopted) == ids(&fx.lb.reconciler),
            "adopted {:?}, written {:?}",
            ids(&adopted),
            ids(&fx.lb.reconciler)
        );

        // Filters removed: the tries are emptied and the sources served again.
        fx.lb.apply(&desired())?;
        ensure!(
            fx.lb.reconciler.deny_rules().next().is_none(),
            "deny rules left"
        );
        ensure!(fx.lb.maps.deny.keys().count() == 0, "deny trie not emptied");
        ensure!(
            fx.lb.maps.allow.keys().count() == 0,
            "allow trie not emptied"
        );
        for (name, src) in [
            ("once denied", from(130, 43020)),
            ("once not allowed", from(9, 43021)),
        ] {
            let f = syn(src, VIP_WEB).build();
            let to = fx.ring_pick("web", &f, &BACKENDS, 80)?;
            check_row(
                fx,
                &row(
                    format!("{name}: balanced"),
                    f.clone(),
                    Tx { backend: to },
                    fx.encapsulated(&f, to)?,
                ),
            )?;
        }
        Ok(())
    })
}

#[test]
fn service_filters_apply_to_their_own_vip() -> anyhow::Result<()> {
    let test = require_privileges!();
    with_fixture(test, |fx| {
        use Expect::{Pass, Redirect, Tx};
        use lb_common::stats::DropReason::{FilterDeny, FilterNotAllowed};
        let from = |a: u8, port: u16| SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, a), port);
        let dns_from = |a: u8, port: u16| {
            PacketBuilder::udp(from(a, port), VIP_DNS)
                .payload(&[0; 12])
                .build()
        };
        // web denies a /25 of its own (and an IPv6 prefix), dns allows only a /28, a
        // /26 inside web's /25 and 2001:db8::/32; the global list denies one address.
        let mut d = desired();
        d.filters.deny = prefixes(&["198.18.0.77/32"]);
        d.services[0].filters.deny = prefixes(&["198.18.0.128/25", "2001:db8:bad::/48"]);
        d.services[1].filters.allow =
            prefixes(&["198.18.0.0/28", "198.18.0.128/26", "2001:db8::/32"]);
        fx.lb.apply(&d)?;
        let web_ok = syn(from(20, 44000), VIP_WEB).build();
        let web_ok_to = fx.ring_pick("web", &web_ok, &BACKENDS, 80)?;
        let rows = vec![
            filtered(
                "service deny: its own VIP",
                syn(from(130, 44001), VIP_WEB).build(),
                FilterDeny,
                "web:198.18.0.128/25",
            ),
            filtered(
                "service deny: VLAN-tagged",
                syn(from(131, 44002), VIP_WEB).vlan(5).build(),
                FilterDeny,
                "web:198.18.0.128/25",
            ),
            row(
                "service deny: a source outside it reaches the VIP",
                web_ok.clone(),
                Tx { backend: web_ok_to },
                fx.encapsulated(&web_ok, web_ok_to)?,
            ),
            row(
                "another service's deny list does not apply (dns from web's denied /25)",
                dns_from(130, 5300),
                Redirect {
                    backend: FAR_BACKEND,
                },
                ipip_frame(
                    &dns_from(130, 5300),
                    LB_ADDR,
                    FAR_BACKEND,
                    FAR_MAC,
                    fx.far_mac,
                )?,
            ),
            row(
                "service allow hit",
                dns_from(9, 5301),
                Redirect {
                    backend: FAR_BACKEND,
                },
                ipip_frame(
                    &dns_from(9, 5301),
                    LB_ADDR,
                    FAR_BACKEND,
                    FAR_MAC,
                    fx.far_mac,
                )?,
            ),
            filtered(
                "service allow miss: counted under the service's not_allowed",
                dns_from(20, 5302),
                FilterNotAllowed,
                "dns:not_allowed",
            ),
            filtered(
                "global deny first, whatever the service lists",
                dns_from(77, 5303),
                FilterDeny,
                "198.18.0.77/32",
            ),
            unchanged(
                "service lists guard only the VIP: non-VIP traffic passes",
                syn(from(130, 44003), SocketAddrV4::new(LB_ADDR, 22)).build(),
                Pass(Counter::PassNotVip),
            ),
        ];
        for r in &rows {
            check_row(fx, r)?;
        }
        // IPv6 prefixes sit in the per-service tries under the service's scope.
        let web_id = fx.lb.reconciler.service_id("web").context("web id")?;
        let dns_id = fx.lb.reconciler.service_id("dns").context("dns id")?;
        let v6 = "2001:db8:bad::/48".parse()?;
        ensure!(
            fx.lb
                .maps
                .svc_deny
                .get(&filter_key(Scope::Service(web_id), v6), 0)
                .is_ok(),
            "web's IPv6 deny prefix is not in the per-service trie"
        );
        ensure!(
            fx.lb
                .maps
                .svc_deny
                .get(&filter_key(Scope::Service(dns_id), v6), 0)
                .is_err(),
            "web's prefix matches under dns's scope"
        );
        // dns: three prefixes and a catch-all per family; web: its two deny prefixes.
        ensure!(
            fx.lb.maps.svc_allow.keys().count() == 5,
            "svc allow entries"
        );
        ensure!(fx.lb.maps.svc_deny.keys().count() == 2, "svc deny entries");
        // A restarted agent reads the rules back with the same ids.
        let adopted = Reconciler::adopt(&fx.lb.maps, &caps(), &d)?;
        ensure!(
            adopted.service_filter_rules() == fx.lb.reconciler.service_filter_rules(),
            "adopted {:?}, written {:?}",
            adopted.service_filter_rules(),
            fx.lb.reconciler.service_filter_rules()
        );
        // Lists removed: the tries are emptied and the sources served again.
        fx.lb.apply(&desired())?;
        ensure!(fx.lb.maps.svc_deny.keys().count() == 0, "svc deny left");
        ensure!(fx.lb.maps.svc_allow.keys().count() == 0, "svc allow left");
        ensure!(
            fx.lb.reconciler.service_filter_rules().is_empty(),
            "service rules left"
        );
        let f = syn(from(130, 44010), VIP_WEB).build();
        let to = fx.ring_pick("web", &f, &BACKENDS, 80)?;
        check_row(
            fx,
            &row(
                "once denied by web: balanced",
                f.clone(),
                Tx { backend: to },
                fx.encapsulated(&f, to)?,
            ),
        )?;
        check_row(
            fx,
            &row(
                "once not allowed by dns: balanced",
                dns_from(20, 5310),
                Redirect {
                    backend: FAR_BACKEND,
                },
                ipip_frame(
                    &dns_from(20, 5310),
                    LB_ADDR,
                    FAR_BACKEND,
                    FAR_MAC,
                    fx.far_mac,
                )?,
            ),
        )
    })
}

/// A limit of `burst` new flows, then `rate` per second, per /`prefix_v4`.
fn limit(rate: u32, burst: u32, prefix_v4: u8) -> Option<FlowLimitConfig> {
    Some(FlowLimitConfig {
        rate,
        burst,
        prefix_v4,
        prefix_v6: 64,
    })
}

#[test]
fn new_flows_per_source_are_limited_established_flows_are_not() -> anyhow::Result<()> {
    let test = require_privileges!();
    with_fixture(test, |fx| {
        use Expect::{Redirect, Tx};
        use lb_common::stats::DropReason::NewFlowLimit;
        // Globally 2 new flows per /24 and then one a second (the rows run within
        // milliseconds: no token comes back); dns: 1 per address on top.
        let mut d = desired();
        d.filters.new_flows = limit(1, 2, 24);
        d.services[1].filters.new_flows = limit(1, 1, 32);
        fx.lb.apply(&d)?;
        let src = |c: u8, a: u8, port: u16| SocketAddrV4::new(Ipv4Addr::new(198, 18, c, a), port);
        let tx = |fx: &Fixture, name: &str, frame: Vec<u8>| -> anyhow::Result<Row> {
            let to = fx.ring_pick("web", &frame, &BACKENDS, 80)?;
            Ok(row(
                name,
                frame.clone(),
                Tx { backend: to },
                fx.encapsulated(&frame, to)?,
            ))
        };
        let dns = |from: SocketAddrV4| PacketBuilder::udp(from, VIP_DNS).payload(&[0; 12]).build();
        let to_dns = |fx: &Fixture, name: &str, frame: Vec<u8>| -> anyhow::Result<Row> {
            Ok(row(
                name,
                frame.clone(),
                Redirect {
                    backend: FAR_BACKEND,
                },
                ipip_frame(&frame, LB_ADDR, FAR_BACKEND, FAR_MAC, fx.far_mac)?,
            ))
        };
        let first = syn(src(0, 2, 45000), VIP_WEB).build();
        let first_ack = PacketBuilder::tcp(src(0, 2, 45000), VIP_WEB)
            .flags(tcp_flags::ACK)
            .build();
        let rows = vec![
            tx(fx, "first new flow of 198.18.0.0/24", first)?,
            tx(
                fx,
                "second, from another address of the /24",
                syn(src(0, 3, 45001), VIP_WEB).build(),
            )?,
            unchanged(
                "third new flow of the /24: over the burst",
                syn(src(0, 4, 45002), VIP_WEB).build(),
                Expect::Drop(NewFlowLimit),
            ),
            unchanged(
                "a SYN retransmission is a new flow too",
                syn(src(0, 2, 45000), VIP_WEB).build(),
                Expect::Drop(NewFlowLimit),
            ),
            tx(
                fx,
                "the first flow's ACK: established, not limited",
                first_ack.clone(),
            )?,
            tx(fx, "and its next packet", first_ack)?,
            tx(
                fx,
                "another /24 has its own bucket",
                syn(src(1, 4, 45003), VIP_WEB).build(),
            )?,
            to_dns(
                fx,
                "dns: first datagram of 198.18.2.1",
                dns(src(2, 1, 5400)),
            )?,
            to_dns(
                fx,
                "dns: its second datagram is the same flow (promoted)",
                dns(src(2, 1, 5400)),
            )?,
            unchanged(
                "dns: a second flow of 198.18.2.1, over the service's own limit",
                dns(src(2, 1, 5401)),
                Expect::Drop(NewFlowLimit),
            ),
            // The refused flow above cost the global /24 bucket nothing (both limits
            // are checked before either is charged): this is the /24's second flow.
            to_dns(
                fx,
                "dns: 198.18.2.2, a bucket of its own under the service's /32",
                dns(src(2, 2, 5402)),
            )?,
            unchanged(
                "dns: 198.18.2.3, the global /24 bucket is empty now",
                dns(src(2, 3, 5403)),
                Expect::Drop(NewFlowLimit),
            ),
        ];
        for r in &rows {
            check_row(fx, r)?;
        }
        // A fast limit refills between packets: burst 1 at 10^8 per second.
        d.filters.new_flows = limit(100_000_000, 1, 32);
        d.services[1].filters.new_flows = None;
        fx.lb.apply(&d)?;
        for port in 0..20 {
            let r = tx(
                fx,
                &format!("fast refill, flow {port}"),
                syn(src(3, 1, 46000 + port), VIP_WEB).build(),
            )?;
            check_row(fx, &r)?;
        }
        // Limits removed: the /24 that was over opens flows again.
        fx.lb.apply(&desired())?;
        check_row(
            fx,
            &tx(fx, "limit removed", syn(src(0, 4, 45010), VIP_WEB).build())?,
        )
    })
}

/// Established flows (`FLOWS`) survive a flood of spoofed SYNs from many sources,
/// more than the flow table holds: one-packet flows wait in the new-flow table and
/// only their second packet promotes them. Prints the figure; asserts every
/// established flow survived and keeps its backend.
#[test]
fn a_syn_flood_from_many_sources_does_not_evict_established_flows() -> anyhow::Result<()> {
    let test = require_privileges!();
    with_fixture(test, |fx| {
        const ESTABLISHED: u16 = 1000;
        // One CPU: established flows and the flood share its LRU lists (the flow
        // tables are per-CPU LRU), the case where a flood could evict them.
        let cpu = pin_to_current_cpu()?;
        let table = caps().flow_table_size;
        let flood = 5 * table;
        let mut established = Vec::new();
        for i in 0..ESTABLISHED {
            let from = SocketAddrV4::new(CLIENT, 20000 + i);
            let (v, out) = fx.run(LB_PROGRAM, &syn(from, VIP_WEB).build())?;
            ensure!(v == XDP_TX, "SYN {i}: {}", verdict_name(v));
            let ack = PacketBuilder::tcp(from, VIP_WEB)
                .flags(tcp_flags::ACK)
                .build();
            let (v, _) = fx.run(LB_PROGRAM, &ack)?;
            ensure!(v == XDP_TX, "ACK {i}: {}", verdict_name(v));
            established.push((from, ack, Frame::parse(&out)?.ipv4()?.dst));
        }
        let in_table = |fx: &Fixture, from: SocketAddrV4| {
            fx.lb
                .flow_entry(&flow_key(from, VIP_WEB, PROTO_TCP), false)
                .is_some()
        };
        ensure!(
            established.iter().all(|(f, _, _)| in_table(fx, *f)),
            "not every flow was established before the flood"
        );
        // Spoofed SYNs: every one from another address of 10.0.0.0/8.
        for i in 0..flood {
            let spoofed = Ipv4Addr::from(0x0a00_0000 + i);
            let frame = syn(
                SocketAddrV4::new(spoofed, 1024 + (i % 60000) as u16),
                VIP_WEB,
            )
            .build();
            let (v, _) = fx.run(LB_PROGRAM, &frame)?;
            ensure!(v == XDP_TX, "spoofed SYN {i}: {}", verdict_name(v));
        }
        let survived = established
            .iter()
            .filter(|(f, _, _)| in_table(fx, *f))
            .count();
        println!(
            "syn flood: {survived} of {ESTABLISHED} established flows survived {flood} spoofed \
             SYNs on CPU {cpu} (flow table {table} entries, new-flow table {} entries, {} possible \
             CPUs: per-CPU LRU lists of 1/CPUs of that each)",
            caps().new_flow_table_size,
            aya::util::nr_cpus().map_err(|(_, e)| e)?
        );
        ensure!(
            survived == usize::from(ESTABLISHED),
            "only {survived} of {ESTABLISHED} established flows survived the flood"
        );
        // And each still goes to its backend, as an established flow.
        let before = fx.counters();
        for (i, (_, ack, backend)) in established.iter().enumerate() {
            let (v, out) = fx.run(LB_PROGRAM, ack)?;
            ensure!(
                v == XDP_TX,
                "after the flood, flow {i}: {}",
                verdict_name(v)
            );
            ensure!(
                Frame::parse(&out)?.ipv4()?.dst == *backend,
                "after the flood, flow {i} moved"
            );
        }
        let after = fx.counters();
        ensure!(
            after.get(Counter::FlowNew) == before.get(Counter::FlowNew),
            "established flows were counted as new after the flood"
        );
        Ok(())
    })
}

#[test]
fn vip_hits_are_encapsulated_to_the_predicted_backend() -> anyhow::Result<()> {
    let test = require_privileges!();
    with_fixture(test, |fx| {
        let mut seen = [0u32; 3];
        for i in 0..300u16 {
            let src = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2 + (i % 7) as u8), 30000 + i);
            let frame = syn(src, VIP_WEB)
                .tos(0x28)
                .payload(b"GET / HTTP/1.1\r\n\r\n")
                .build();
            let want = fx.ring_pick("web", &frame, &BACKENDS, 80)?;
            seen[BACKENDS.iter().position(|&b| b == want).expect("web")] += 1;
            let before = fx.counters();
            let output = fx.encapsulated(&frame, want)?;
            check_row(
                fx,
                &row(
                    format!("flow {i}"),
                    frame,
                    Expect::Tx { backend: want },
                    output,
                ),
            )?;
            ensure!(
                fx.counters().get(Counter::FlowNew) == before.get(Counter::FlowNew) + 1,
                "flow {i}: new flow counted"
            );
        }
        // Every backend got flows, each near a third (300 flows: 100 +- 4 sigma).
        for (b, n) in BACKENDS.iter().zip(seen) {
            ensure!((60..=140).contains(&n), "backend {b} got {n} of 300 flows");
        }
        // Per-service and per-backend counters: every packet above was for "web".
        let web_id = fx.lb.reconciler.service_id("web").expect("web");
        ensure!(
            stats::service_traffic(
                &fx.lb.maps,
                web_id,
                fx.lb.reconciler.service_backend_ids("web")
            )?
            .packets
                == 300,
            "service packets"
        );
        let per_backend: u64 = BACKENDS
            .iter()
            .map(|&b| {
                stats::backend_traffic(
                    &fx.lb.maps,
                    fx.lb
                        .reconciler
                        .backend_id("web", b.into(), 80)
                        .expect("id"),
                )
                .map(|t| t.packets)
            })
            .sum::<Result<u64, _>>()?;
        ensure!(per_backend == 300, "backend packets sum to {per_backend}");

        // Source-IP affinity: every port of one client lands on the same backend.
        let first = fx.ring_pick(
            "sticky",
            &syn(SocketAddrV4::new(CLIENT, 1000), VIP_STICKY).build(),
            &BACKENDS,
            443,
        )?;
        for port in 1000..1050 {
            let frame = syn(SocketAddrV4::new(CLIENT, port), VIP_STICKY).build();
            let output = fx.encapsulated(&frame, first)?;
            check_row(
                fx,
                &row(
                    format!("affinity: port {port}"),
                    frame,
                    Expect::Tx { backend: first },
                    output,
                ),
            )?;
        }

        // No tunnel source configured: passed up, counted.
        let mut no_source = desired();
        no_source.source_v4 = None;
        fx.lb.apply(&no_source)?;
        check_row(
            fx,
            &unchanged(
                "no tunnel source",
                syn(SocketAddrV4::new(CLIENT, 46000), VIP_WEB).build(),
                Expect::Pass(Counter::PassNoSource),
            ),
        )
    })
}

#[test]
fn truncated_at_every_byte_goes_to_the_kernel() -> anyhow::Result<()> {
    let test = require_privileges!();
    with_fixture(test, |fx| {
        let tcp = syn(SocketAddrV4::new(CLIENT, 41000), VIP_WEB).build();
        let udp = PacketBuilder::udp(SocketAddrV4::new(CLIENT, 41001), VIP_DNS).build();
        let tagged = syn(SocketAddrV4::new(CLIENT, 41002), VIP_WEB)
            .vlan(7)
            .build();
        for (what, full) in [("tcp", tcp), ("udp", udp), ("vlan+tcp", tagged)] {
            // The kernel's test_run needs at least an Ethernet header.
            for len in 14..full.len() {
                check_row(
                    fx,
                    &unchanged(
                        format!("{what} cut at {len}"),
                        full[..len].to_vec(),
                        Expect::Pass(Counter::PassTruncated),
                    ),
                )?;
            }
            let (verdict, _) = fx.run(LB_PROGRAM, &full)?;
            ensure!(
                verdict == XDP_TX || verdict == XDP_REDIRECT,
                "{what} whole: verdict {}",
                verdict_name(verdict)
            );
        }
        Ok(())
    })
}

#[test]
fn established_flows_keep_their_backend_until_it_leaves() -> anyhow::Result<()> {
    let test = require_privileges!();
    with_fixture(test, |fx| {
        // Open 60 flows and remember where each went.
        let flows: Vec<SocketAddrV4> = (0..60)
            .map(|i| SocketAddrV4::new(CLIENT, 50000 + i))
            .collect();
        let mut first = Vec::new();
        for &src in &flows {
            let (v, out) = fx.run(LB_PROGRAM, &syn(src, VIP_WEB).build())?;
            ensure!(v == XDP_TX, "open: {}", verdict_name(v));
            first.push(Frame::parse(&out)?.ipv4()?.dst);
        }
        // Change the backend set: a fourth backend joins, one changes weight. The ring
        // changes, established flows must not.
        let mut d = desired();
        d.services[0].backends.push(backend(JOINER, 80));
        d.services[0].backends[1].weight = 300;
        fx.lb.apply(&d)?;
        let mut moved_if_new = 0;
        let web4 = [BACKENDS[0], BACKENDS[1], BACKENDS[2], JOINER];
        for (i, &src) in flows.iter().enumerate() {
            let ack = PacketBuilder::tcp(src, VIP_WEB)
                .flags(tcp_flags::ACK)
                .build();
            let (v, out) = fx.run(LB_PROGRAM, &ack)?;
            let dst = if v == XDP_TX {
                Frame::parse(&out)?.ipv4()?.dst
            } else {
                Ipv4Addr::UNSPECIFIED
            };
            ensure!(
                dst == first[i],
                "flow {i} moved from {} to {dst} after a ring change",
                first[i]
            );
            ensure!(
                out == fx.encapsulated(&ack, dst)?,
                "flow {i}: output frame is not the encapsulated input"
            );
            let fresh =
                fx.lb
                    .ring_pick("web", &flow_key(src, VIP_WEB, PROTO_TCP), false, &web4, 80)?;
            if fresh != first[i] {
                moved_if_new += 1;
            }
        }
        ensure!(
            moved_if_new > 0,
            "the ring change should have moved some slots, else this test proves nothing"
        );

        // Remove backend .11: its flows are re-hashed onto live backends, the others stay.
        let mut d2 = d.clone();
        d2.services[0]
            .backends
            .retain(|b| b.address != IpAddr::V4(BACKENDS[0]));
        fx.lb.apply(&d2)?;
        let before = fx.counters();
        let mut rehashed = 0;
        for (i, &src) in flows.iter().enumerate() {
            let ack = PacketBuilder::tcp(src, VIP_WEB)
                .flags(tcp_flags::ACK)
                .build();
            let (v, out) = fx.run(LB_PROGRAM, &ack)?;
            ensure!(v == XDP_TX, "after removal: verdict {}", verdict_name(v));
            let dst = Frame::parse(&out)?.ipv4()?.dst;
            ensure!(
                dst != BACKENDS[0],
                "flow {i} still sent to the removed backend"
            );
            ensure!(
                out == fx.encapsulated(&ack, dst)?,
                "flow {i}: output frame is not the encapsulated input"
            );
            if first[i] == BACKENDS[0] {
                rehashed += 1;
            } else {
                ensure!(dst == first[i], "flow {i} on a live backend moved");
            }
        }
        ensure!(rehashed > 0, "some flows were on the removed backend");
        ensure!(
            fx.counters().get(Counter::FlowRehash) == before.get(Counter::FlowRehash) + rehashed,
            "each flow of the removed backend re-hashed exactly once"
        );
        Ok(())
    })
}

/// What the decapsulating program must do with a row's frame (it always passes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DecapExpect {
    /// Tunnel header removed, counted `decap`.
    Decapsulated,
    /// Not for this host's decapsulation: untouched, nothing counted.
    Untouched,
}

#[test]
fn decap_fixture_table() -> anyhow::Result<()> {
    let test = require_privileges!();
    with_fixture(test, |fx| {
        use DecapExpect::{Decapsulated, Untouched};
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
        let tunnelled = |dst: Ipv4Addr, vlan: Option<u16>| {
            let mut b = PacketBuilder::raw(LB_ADDR, dst, IPPROTO_IPIP).payload(&inner_ip);
            if let Some(v) = vlan {
                b = b.vlan(v);
            }
            b.build()
        };
        // To us: outer header gone, Ethernet header (MACs, tag) kept, inner untouched;
        // the inner packet's own frame is exactly that.
        let delivered = |vlan: Option<u16>| {
            let mut b = inner.clone();
            if let Some(v) = vlan {
                b = b.vlan(v);
            }
            b.build()
        };
        let rows = [
            (
                "IPIP to us",
                tunnelled(BACKENDS[0], None),
                Decapsulated,
                delivered(None),
            ),
            (
                "IPIP to us, VLAN-tagged: tag kept",
                tunnelled(BACKENDS[0], Some(9)),
                Decapsulated,
                delivered(Some(9)),
            ),
            (
                "IPIP to another host",
                tunnelled(BACKENDS[1], None),
                Untouched,
                tunnelled(BACKENDS[1], None),
            ),
            (
                "plain TCP",
                syn(SocketAddrV4::new(CLIENT, 42001), VIP_WEB).build(),
                Untouched,
                syn(SocketAddrV4::new(CLIENT, 42001), VIP_WEB).build(),
            ),
            (
                "IPv6 inside",
                PacketBuilder::raw(LB_ADDR, BACKENDS[0], IPPROTO_IPIP)
                    .payload(&[0x60; 40])
                    .build(),
                Untouched,
                PacketBuilder::raw(LB_ADDR, BACKENDS[0], IPPROTO_IPIP)
                    .payload(&[0x60; 40])
                    .build(),
            ),
        ];
        for (name, input, expect, output) in rows {
            let before = fx.counters();
            let (v, out) = fx.run(DECAP_PROGRAM, &input)?;
            let after = fx.counters();
            ensure!(v == XDP_PASS, "{name}: verdict {}", verdict_name(v));
            if let Some(diff) = first_difference(&output, &out) {
                anyhow::bail!("{name}: output frame differs from the expected one: {diff}");
            }
            let decaps = after.get(Counter::Decap) - before.get(Counter::Decap);
            let want = u64::from(expect == Decapsulated);
            ensure!(
                decaps == want,
                "{name}: decap counted {decaps}, want {want}"
            );
            // Nothing else moves: the decap program counts only what it decapsulates.
            let mut others = after.clone();
            for (c, v) in &mut others.counters {
                if *c == Counter::Decap {
                    *v -= decaps;
                }
            }
            ensure!(others == before, "{name}: another counter moved");
        }
        ensure!(XDP_ABORTED != XDP_PASS);
        Ok(())
    })
}

#[test]
fn loaded_map_names_are_lb_common_names() -> anyhow::Result<()> {
    require_privileges!();
    let ebpf = loader::load(&Capacities::DECAP_ONLY)?;
    let mut loaded: Vec<&str> = ebpf.maps().map(|(name, _)| name).collect();
    loaded.sort_unstable();
    let mut want: Vec<&str> = names::ALL.to_vec();
    want.sort_unstable();
    ensure!(
        loaded == want,
        "object maps {loaded:?} != lb_common::maps::ALL {want:?}"
    );
    Ok(())
}

/// `dataplane.icmp_errors_per_cpu`: each CPU sends at most that many "fragmentation
/// needed" per one-second window; a packet that calls for one above it is dropped
/// unanswered as `icmp_error_limited`, leaving no trace in the flow tables. 0 = no limit.
#[test]
fn icmp_errors_are_limited_per_cpu_and_second() -> anyhow::Result<()> {
    let test = require_privileges!();
    with_fixture(test, |fx| {
        // One CPU: the limit and its window are per CPU.
        pin_to_current_cpu()?;
        const CAP: u16 = 3;
        const SENT: u64 = 20;
        let mut d = desired();
        d.icmp_errors_per_cpu = CAP;
        fx.lb.apply(&d)?;
        let over = |sport| {
            PacketBuilder::tcp(SocketAddrV4::new(CLIENT, sport), VIP_WEB)
                .payload(&[0x5a; 1441])
                .build()
        };
        let before = fx.counters();
        let started = Instant::now();
        let mut answered = 0u64;
        for i in 0..SENT {
            let frame = over(42000 + i as u16);
            let (v, out) = fx.run(LB_PROGRAM, &frame)?;
            match v {
                XDP_TX => {
                    ensure!(
                        out == frag_needed(&frame, LB0_MTU)?,
                        "packet {i}: answered, but not with fragmentation needed"
                    );
                    answered += 1;
                }
                XDP_DROP => ensure!(out == frame, "packet {i}: dropped, but changed"),
                v => anyhow::bail!("packet {i}: {}", verdict_name(v)),
            }
        }
        // The windows the loop spanned (each lets CAP through).
        let windows = started.elapsed().as_secs() + 1;
        let after = fx.counters();
        let delta = |c: Counter| after.get(c) - before.get(c);
        let limited = after.drop_count(DropReason::IcmpErrorLimited)
            - before.drop_count(DropReason::IcmpErrorLimited);
        ensure!(
            delta(Counter::IcmpFragNeeded) == answered && answered + limited == SENT,
            "{answered} answered (icmp_frag_needed {}) + {limited} icmp_error_limited != {SENT}",
            delta(Counter::IcmpFragNeeded)
        );
        ensure!(
            (u64::from(CAP)..=u64::from(CAP) * windows).contains(&answered),
            "{answered} of {SENT} answered in {windows} window(s) of {CAP}"
        );
        ensure!(
            delta(Counter::FlowNew) == 0,
            "an oversized packet created a flow"
        );

        // 0: no limit.
        d.icmp_errors_per_cpu = 0;
        fx.lb.apply(&d)?;
        for i in 0..SENT {
            let frame = over(43000 + i as u16);
            let (v, out) = fx.run(LB_PROGRAM, &frame)?;
            ensure!(
                v == XDP_TX && out == frag_needed(&frame, LB0_MTU)?,
                "no limit: packet {i} got {}",
                verdict_name(v)
            );
        }
        Ok(())
    })
}

#[test]
fn udp_and_tcp_share_flow_key_layout() {
    // The oracle's key for UDP differs only in the protocol.
    let a = flow_key(SocketAddrV4::new(CLIENT, 1), VIP_DNS, PROTO_UDP);
    let b = flow_key(SocketAddrV4::new(CLIENT, 1), VIP_DNS, PROTO_TCP);
    assert_ne!(flow_hash(&a), flow_hash(&b));
}

#[test]
fn icmp_and_path_mtu() -> anyhow::Result<()> {
    let test = require_privileges!();
    with_fixture(test, |fx| {
        use Expect::{Drop, Pass, Redirect, Reply, Tx};
        let vip = *VIP_WEB.ip();
        let client = |port| SocketAddrV4::new(CLIENT, port);
        let sized = |sport, tot_len: usize| {
            PacketBuilder::tcp(client(sport), VIP_WEB)
                .payload(&vec![0x5a; tot_len - 40])
                .build()
        };
        // Path MTU: the IP length plus 20 bytes of tunnel against `mtu` = 1500.
        let over = sized(41001, 1481);
        let over_tagged = PacketBuilder::tcp(client(41002), VIP_WEB)
            .vlan(7)
            .payload(&[0x5a; 1441])
            .build();
        let over_udp = PacketBuilder::udp(client(41003), VIP_DNS)
            .payload(&[0x11; 1453])
            .build();
        let fits = sized(41004, 1480);
        let fits_to = fx.ring_pick("web", &fits, &BACKENDS, 80)?;
        // The frame is longer than the MTU allows, the IP packet is not: what leaves
        // (the IP packet, trailer cut) fits.
        let mut padded = sized(41005, 1480);
        padded.extend([0xee; 60]);
        let padded_to = fx.ring_pick("web", &padded, &BACKENDS, 80)?;

        // An ICMP error about the reply of a flow no packet was seen of: the ring's pick
        // for the flow client -> VIP, as its first packet would get.
        let fresh = client(41010);
        let fresh_err = unreachable(vip, 4, 1400, &reply_quote(VIP_WEB, fresh));
        let fresh_to = fx.lb.ring_pick(
            "web",
            &flow_key(fresh, VIP_WEB, PROTO_TCP),
            false,
            &BACKENDS,
            80,
        )?;
        let dns_client = client(5353);
        let dns_err = unreachable(
            *VIP_DNS.ip(),
            3,
            0,
            &PacketBuilder::udp(VIP_DNS, dns_client)
                .payload(&[0; 12])
                .build_ipv4()[..28],
        );

        let quote = reply_quote(VIP_WEB, client(41011));
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut q = quote.clone();
            f(&mut q);
            // The quoted header's checksum is not checked (routers quote as received).
            q
        };
        let rows = vec![
            row(
                "DF over the MTU once encapsulated: fragmentation needed, MTU 1480",
                over.clone(),
                Reply(Counter::IcmpFragNeeded),
                frag_needed(&over, LB0_MTU)?,
            ),
            row(
                "DF over the MTU, VLAN-tagged: the answer keeps the tag",
                over_tagged.clone(),
                Reply(Counter::IcmpFragNeeded),
                frag_needed(&over_tagged, LB0_MTU)?,
            ),
            row(
                "DF UDP over the MTU: fragmentation needed",
                over_udp.clone(),
                Reply(Counter::IcmpFragNeeded),
                frag_needed(&over_udp, LB0_MTU)?,
            ),
            unchanged(
                "DF clear over the MTU: dropped (the tunnel cannot fragment)",
                PacketBuilder::tcp(client(41006), VIP_WEB)
                    .fragment(false, false, 0)
                    .payload(&[0x5a; 1441])
                    .build(),
                Drop(DropReason::TooBig),
            ),
            row(
                "exactly the MTU once encapsulated: forwarded",
                fits.clone(),
                Tx { backend: fits_to },
                fx.encapsulated(&fits, fits_to)?,
            ),
            row(
                "a frame over the MTU only by its trailer: forwarded without it",
                padded.clone(),
                Tx { backend: padded_to },
                fx.encapsulated(&padded, padded_to)?,
            ),
            row(
                "echo request to an L4 VIP: echo reply",
                echo(CLIENT, vip, 8, 0),
                Reply(Counter::IcmpEchoReply),
                echo_reply(CLIENT, vip),
            ),
            unchanged(
                "echo request with a nonzero code: not answered",
                echo(CLIENT, vip, 8, 1),
                Drop(DropReason::IcmpUnhandled),
            ),
            unchanged(
                "timestamp request to an L4 VIP: dropped",
                echo(CLIENT, vip, 13, 0),
                Drop(DropReason::IcmpUnhandled),
            ),
            unchanged(
                "echo request to an L7 VIP address: the kernel's",
                echo(CLIENT, *VIP_L7.ip(), 8, 0),
                Pass(Counter::PassL7),
            ),
            unchanged(
                "echo request to a non-VIP address",
                echo(CLIENT, LB_ADDR, 8, 0),
                Pass(Counter::PassNotVip),
            ),
            unchanged(
                "ICMP header cut short",
                PacketBuilder::raw(CLIENT, vip, IPPROTO_ICMP)
                    .payload(&[8, 0, 0, 0])
                    .build(),
                Pass(Counter::PassTruncated),
            ),
            row(
                "frag needed about a VIP reply: tunnelled to the flow's backend (ring)",
                fresh_err.clone(),
                Tx { backend: fresh_to },
                fx.encapsulated(&fresh_err, fresh_to)?,
            ),
            row(
                "port unreachable about a UDP VIP reply: to its backend (redirect)",
                dns_err.clone(),
                Redirect {
                    backend: FAR_BACKEND,
                },
                ipip_frame(&dns_err, LB_ADDR, FAR_BACKEND, FAR_MAC, fx.far_mac)?,
            ),
            unchanged(
                "frag needed about an L7 VIP's connection: the kernel's",
                unreachable(*VIP_L7.ip(), 4, 1400, &reply_quote(VIP_L7, client(41012))),
                Pass(Counter::PassL7),
            ),
            unchanged(
                "quote cut short (12 bytes)",
                unreachable(vip, 4, 1400, &quote[..12]),
                Drop(DropReason::IcmpBadQuote),
            ),
            unchanged(
                "quote of a header without the 8 bytes after it",
                unreachable(vip, 4, 1400, &quote[..24]),
                Drop(DropReason::IcmpBadQuote),
            ),
            unchanged(
                "quoted header with options (ihl 6)",
                unreachable(vip, 4, 1400, &with(&|q| q[0] = 0x46)),
                Drop(DropReason::IcmpBadQuote),
            ),
            unchanged(
                "quoted IPv6 garbage",
                unreachable(vip, 4, 1400, &with(&|q| q[0] = 0x60)),
                Drop(DropReason::IcmpBadQuote),
            ),
            unchanged(
                "quoted later fragment (no ports)",
                unreachable(vip, 4, 1400, &with(&|q| q[7] = 3)),
                Drop(DropReason::IcmpBadQuote),
            ),
            unchanged(
                "quoted total length shorter than the quote",
                unreachable(vip, 4, 1400, &with(&|q| q[2..4].copy_from_slice(&[0, 20]))),
                Drop(DropReason::IcmpBadQuote),
            ),
            unchanged(
                "quoted packet not from the address the error is sent to",
                unreachable(vip, 4, 1400, &reply_quote(VIP_DNS, client(41013))),
                Drop(DropReason::IcmpBadQuote),
            ),
            unchanged(
                "quoted reply of a port no service has",
                unreachable(
                    vip,
                    4,
                    1400,
                    &reply_quote(SocketAddrV4::new(vip, 22), client(41014)),
                ),
                Drop(DropReason::IcmpUnhandled),
            ),
            unchanged(
                "quoted ICMP (an echo reply of ours)",
                unreachable(vip, 1, 0, &echo_reply(CLIENT, vip)[14..42]),
                Drop(DropReason::IcmpUnhandled),
            ),
        ];
        for r in &rows {
            check_row(fx, r)?;
        }

        // The egress interface's MTU still counts when `mtu` is set above it: then
        // the packet is dropped as too big (the fib lookup says so).
        let mut d = desired();
        d.mtu = 9000;
        fx.lb.apply(&d)?;
        check_row(
            fx,
            &unchanged(
                "mtu above the interface's: over the interface MTU, dropped",
                sized(41007, 1481),
                Drop(DropReason::TooBig),
            ),
        )?;
        fx.lb.apply(&desired())?;
        Ok(())
    })
}

#[test]
fn icmp_errors_follow_the_flow_table() -> anyhow::Result<()> {
    let test = require_privileges!();
    with_fixture(test, |fx| {
        // 60 established flows (SYN, then ACK: promoted to the flow table) and one
        // seen once (in the new-flow table).
        let flows: Vec<SocketAddrV4> = (0..61)
            .map(|i| SocketAddrV4::new(CLIENT, 42000 + i))
            .collect();
        let mut owner = Vec::new();
        for (i, &src) in flows.iter().enumerate() {
            let (v, out) = fx.run(LB_PROGRAM, &syn(src, VIP_WEB).build())?;
            ensure!(v == XDP_TX, "open: {}", verdict_name(v));
            owner.push(Frame::parse(&out)?.ipv4()?.dst);
            if i < 60 {
                let ack = PacketBuilder::tcp(src, VIP_WEB).build();
                let (v, out) = fx.run(LB_PROGRAM, &ack)?;
                ensure!(v == XDP_TX && Frame::parse(&out)?.ipv4()?.dst == owner[i]);
            }
        }
        // A backend joins: the ring moves some of these flows, their entries keep them.
        let mut d = desired();
        d.services[0].backends.push(backend(JOINER, 80));
        fx.lb.apply(&d)?;
        let web4 = [BACKENDS[0], BACKENDS[1], BACKENDS[2], JOINER];
        let mut moved = 0;
        let before = fx.counters();
        for (i, &src) in flows.iter().enumerate() {
            let fresh =
                fx.lb
                    .ring_pick("web", &flow_key(src, VIP_WEB, PROTO_TCP), false, &web4, 80)?;
            if fresh != owner[i] {
                moved += 1;
            }
            let err = unreachable(*VIP_WEB.ip(), 4, 1400, &reply_quote(VIP_WEB, src));
            check_row(
                fx,
                &row(
                    format!("frag needed about flow {i}: to its backend {}", owner[i]),
                    err.clone(),
                    Expect::Tx { backend: owner[i] },
                    fx.encapsulated(&err, owner[i])?,
                ),
            )?;
        }
        ensure!(
            moved > 0,
            "the ring change moved none of the flows: this test proves nothing"
        );
        let after = fx.counters();
        let n = flows.len() as u64;
        ensure!(
            after.get(Counter::IcmpErrorForwarded) == before.get(Counter::IcmpErrorForwarded) + n,
            "icmp_error_forwarded did not count each error once"
        );
        for c in [
            Counter::FlowNew,
            Counter::FlowPromoted,
            Counter::FlowRehash,
            Counter::FlowInsertFailed,
        ] {
            ensure!(
                after.get(c) == before.get(c),
                "an ICMP error changed the flow tables ({} moved)",
                c.label()
            );
        }
        // The flow seen once is still waiting for its second packet: this promotes it.
        let ack = PacketBuilder::tcp(flows[60], VIP_WEB).build();
        let (v, out) = fx.run(LB_PROGRAM, &ack)?;
        ensure!(v == XDP_TX && Frame::parse(&out)?.ipv4()?.dst == owner[60]);
        ensure!(
            fx.counters().get(Counter::FlowPromoted) == after.get(Counter::FlowPromoted) + 1,
            "the once-seen flow was promoted by its ICMP error, not by its second packet"
        );
        Ok(())
    })
}

/// The admission rule (`dataplane.max_new_flows_per_cpu`).
mod admission;
/// GUE, the per-flow outer source, GUE decap and QUIC connection-ID routing.
mod gue;
/// A next hop as the agent writes it into `NEXT_HOPS` (`lb-agent/src/dataplane/nexthop.rs`).
fn next_hop_entry(
    backend: Ipv4Addr,
    ifindex: u32,
    mtu: u16,
    dmac: [u8; 6],
    smac: [u8; 6],
) -> NextHopEntry {
    let (addr, family) = addr_words(backend.into());
    NextHopEntry {
        addr,
        ifindex,
        mtu,
        family,
        flags: NEXT_HOP_F_VALID,
        dmac,
        smac,
    }
}

/// MACs no neighbour entry and no interface of the fixture has: a frame carrying them
/// was addressed from the map, not by `bpf_fib_lookup`.
fn map_mac(last: u8) -> [u8; 6] {
    [0x02, 0x4e, 0x48, 0, 0, last]
}
const MAP_SMAC: [u8; 6] = [0x02, 0x4e, 0x48, 0xff, 0xff, 0xff];

/// Issue 12, item 1: the program takes a backend's next hop from `NEXT_HOPS` (map hit:
/// the map's MACs and interface, even for a next hop the kernel has not resolved; the
/// map's MTU), and falls back to `bpf_fib_lookup` on a miss, an invalid entry, or an
/// entry written for another address or family (a reused backend id).
#[test]
fn next_hops_come_from_the_map_with_the_fib_as_fallback() -> anyhow::Result<()> {
    let test = require_privileges!();
    with_fixture(test, |fx| {
        let far_ifindex = loader::if_index("far0")?;
        let id = |svc: &str, b: Ipv4Addr, port: u16| {
            fx.lb
                .reconciler
                .backend_id(svc, b.into(), port)
                .with_context(|| format!("backend id of {b} in {svc}"))
        };
        let web_ids: Vec<u32> = BACKENDS
            .iter()
            .map(|&b| id("web", b, 80))
            .collect::<anyhow::Result<_>>()?;
        let dns_id = id("dns", FAR_BACKEND, 53)?;
        let noneigh_id = id("noneigh", UNRESOLVED, 80)?;
        let mut port = 41000u16;
        // A new web flow and the backend the ring gives it.
        fn next_web(fx: &Fixture, port: &mut u16) -> anyhow::Result<(Vec<u8>, Ipv4Addr)> {
            *port += 1;
            let frame = syn(SocketAddrV4::new(CLIENT, *port), VIP_WEB)
                .payload(b"next hop")
                .build();
            let to = fx.ring_pick("web", &frame, &BACKENDS, 80)?;
            Ok((frame, to))
        }

        // Miss: the map is empty (the agent has not written it yet): the FIB's MACs.
        let (frame, to) = next_web(fx, &mut port)?;
        check_row(
            fx,
            &row(
                "map miss: bpf_fib_lookup",
                frame.clone(),
                Expect::Tx { backend: to },
                fx.encapsulated(&frame, to)?,
            ),
        )?;

        // Hit: every web backend has an entry with MACs nobody else has.
        for (i, (&b, &bid)) in BACKENDS.iter().zip(&web_ids).enumerate() {
            let e = next_hop_entry(b, fx.ifindex, LB0_MTU, map_mac(i as u8), MAP_SMAC);
            fx.lb.maps.next_hops.set(bid, e, 0)?;
        }
        let mac_of_backend = |b: Ipv4Addr| {
            map_mac(BACKENDS.iter().position(|&x| x == b).expect("web backend") as u8)
        };
        for n in 0..6 {
            let (frame, to) = next_web(fx, &mut port)?;
            let output = ipip_frame(&frame, LB_ADDR, to, mac_of_backend(to), MAP_SMAC)?;
            check_row(
                fx,
                &row(
                    format!("map hit {n}: the map's MACs"),
                    frame,
                    Expect::Tx { backend: to },
                    output,
                ),
            )?;
        }

        // Hit on another interface: redirected there with the map's MACs.
        fx.lb.maps.next_hops.set(
            dns_id,
            next_hop_entry(FAR_BACKEND, far_ifindex, 1500, map_mac(0x53), MAP_SMAC),
            0,
        )?;
        let dns = PacketBuilder::udp(SocketAddrV4::new(CLIENT, 5354), VIP_DNS)
            .payload(&[7; 12])
            .build();
        check_row(
            fx,
            &row(
                "map hit: redirect to the map's interface",
                dns.clone(),
                Expect::Redirect {
                    backend: FAR_BACKEND,
                },
                ipip_frame(&dns, LB_ADDR, FAR_BACKEND, map_mac(0x53), MAP_SMAC)?,
            ),
        )?;

        // The kernel has no neighbour for .99 (bpf_fib_lookup: pass up); an entry from
        // the agent is used as it is.
        let noneigh = syn(SocketAddrV4::new(CLIENT, 41900), VIP_NONEIGH).build();
        check_row(
            fx,
            &unchanged(
                "no entry, no neighbour: passed up",
                noneigh.clone(),
                Expect::Pass(Counter::PassNoNeighbour),
            ),
        )?;
        fx.lb.maps.next_hops.set(
            noneigh_id,
            next_hop_entry(UNRESOLVED, fx.ifindex, LB0_MTU, map_mac(0x99), MAP_SMAC),
            0,
        )?;
        check_row(
            fx,
            &row(
                "map hit for a next hop the FIB cannot resolve",
                noneigh.clone(),
                Expect::Tx {
                    backend: UNRESOLVED,
                },
                ipip_frame(&noneigh, LB_ADDR, UNRESOLVED, map_mac(0x99), MAP_SMAC)?,
            ),
        )?;

        // The entry's MTU: an outer packet over it is dropped as bpf_fib_lookup's
        // "fragmentation needed" is (this one fits the 1500 of lb0 and dataplane.mtu).
        fx.lb.maps.next_hops.set(
            noneigh_id,
            next_hop_entry(UNRESOLVED, fx.ifindex, 100, map_mac(0x99), MAP_SMAC),
            0,
        )?;
        let long = syn(SocketAddrV4::new(CLIENT, 41901), VIP_NONEIGH)
            .payload(&[1; 100])
            .build();
        check_row(
            fx,
            &unchanged(
                "map hit, outer packet over the entry's MTU",
                long,
                Expect::Drop(DropReason::TooBig),
            ),
        )?;

        // Invalid (flag clear), written for another address (a reused backend id), or
        // for another family: the FIB again, whatever MACs the entry holds.
        let invalid = |b: Ipv4Addr, i: usize| NextHopEntry {
            flags: 0,
            ..next_hop_entry(b, fx.ifindex, LB0_MTU, map_mac(i as u8), MAP_SMAC)
        };
        let other_address =
            |i: usize| next_hop_entry(JOINER, fx.ifindex, LB0_MTU, map_mac(i as u8), MAP_SMAC);
        let other_family = |b: Ipv4Addr, i: usize| NextHopEntry {
            family: lb_common::types::FAMILY_V6,
            ..next_hop_entry(b, fx.ifindex, LB0_MTU, map_mac(i as u8), MAP_SMAC)
        };
        type MakeEntry<'a> = &'a dyn Fn(Ipv4Addr, usize) -> NextHopEntry;
        let cases: [(&str, MakeEntry); 3] = [
            ("invalid entry", &invalid),
            ("entry for another address", &|_, i| other_address(i)),
            ("entry for another family", &other_family),
        ];
        for (what, make) in cases {
            for (i, (&b, &bid)) in BACKENDS.iter().zip(&web_ids).enumerate() {
                fx.lb.maps.next_hops.set(bid, make(b, i), 0)?;
            }
            for n in 0..3 {
                let (frame, to) = next_web(fx, &mut port)?;
                check_row(
                    fx,
                    &row(
                        format!("{what} {n}: bpf_fib_lookup"),
                        frame.clone(),
                        Expect::Tx { backend: to },
                        fx.encapsulated(&frame, to)?,
                    ),
                )?;
            }
        }
        Ok(())
    })
}

/// Established IPv4 flows find their service in their backend's entry (its copy of the
/// service's VIP and meta, `Backend::service_v4`) instead of a VIP lookup (issue 12,
/// item 2): what that copy says must always be what the VIP is now. A flow table hit to a VIP that turned L7,
/// whose service got a deny list, that was removed, or whose service id another VIP
/// took is treated as a packet to that VIP is treated today, never as the old service.
#[test]
fn established_ipv4_flows_follow_what_their_vip_is_now() -> anyhow::Result<()> {
    let test = require_privileges!();
    const VIP_OTHER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 100, 9), 80);
    with_fixture(test, |fx| {
        let src = SocketAddrV4::new(CLIENT, 40000);
        let ack = PacketBuilder::tcp(src, VIP_WEB)
            .flags(tcp_flags::ACK)
            .build();
        let send =
            |fx: &Fixture, want: u32, counter: Counter, what: &str| -> anyhow::Result<Vec<u8>> {
                let before = fx.counters();
                let (v, out) = fx.run(LB_PROGRAM, &ack)?;
                ensure!(v == want, "{what}: verdict {}", verdict_name(v));
                ensure!(
                    fx.counters().get(counter) == before.get(counter) + 1,
                    "{what}: {counter:?} not counted"
                );
                Ok(out)
            };
        let (v, _) = fx.run(LB_PROGRAM, &syn(src, VIP_WEB).build())?;
        ensure!(v == XDP_TX, "SYN: {}", verdict_name(v));
        // The first ACK promotes the flow, the second is a flow-table hit.
        send(fx, XDP_TX, Counter::FlowPromoted, "first ACK")?;
        let out = send(fx, XDP_TX, Counter::Tx, "established")?;
        let dst = Frame::parse(&out)?.ipv4()?.dst;
        ensure!(
            fx.lb
                .flow_entry(&flow_key(src, VIP_WEB, PROTO_TCP), false)
                .is_some(),
            "the flow is not in the IPv4 flow table"
        );

        let mut d = desired();
        d.services[0].l7 = true;
        fx.lb.apply(&d)?;
        send(fx, XDP_PASS, Counter::PassL7, "VIP turned L7")?;

        let mut d = desired();
        d.services[0].filters.deny = prefixes(&["198.18.0.0/24"]);
        fx.lb.apply(&d)?;
        let before = fx.counters();
        let (v, _) = fx.run(LB_PROGRAM, &ack)?;
        ensure!(v == XDP_DROP, "service deny list: {}", verdict_name(v));
        ensure!(
            fx.counters().get(Counter::Tx) == before.get(Counter::Tx),
            "a denied established flow was forwarded"
        );

        fx.lb.apply(&desired())?;
        let out = send(fx, XDP_TX, Counter::Tx, "back to L4, no list")?;
        ensure!(
            Frame::parse(&out)?.ipv4()?.dst == dst,
            "the flow moved to another backend"
        );

        // The service goes; another VIP with the same backends comes (it may take the
        // freed service id and backend ids): the flow is not its traffic.
        let mut d = desired();
        d.services.remove(0);
        fx.lb.apply(&d)?;
        send(fx, XDP_PASS, Counter::PassNotVip, "VIP removed")?;
        d.services.push(service(
            "other",
            VIP_OTHER,
            Protocol::Tcp,
            BACKENDS.iter().map(|&b| backend(b, 80)).collect(),
        ));
        fx.lb.apply(&d)?;
        send(
            fx,
            XDP_PASS,
            Counter::PassNotVip,
            "another VIP on the old ids",
        )?;
        Ok(())
    })
}

/// Issue 12 item 2: an established flow skips the source filters' lookups while its
/// flow entry carries the current filter generation, and the agent bumps the
/// generation after every change of the lists, so a change reaches established flows
/// on their next packet: a deny prefix that holds the client drops it (counted under
/// that rule), an allow list that no longer holds it too (`not_allowed`), and an
/// emptied list lets it through to the same backend again. A deny entry written into
/// the trie behind the agent's back (no bump) stops a new flow of the client but not
/// the established one, until the generation moves: the lookup really is skipped. The
/// same with the service's own deny and allow lists (the VIP's list bits, no global
/// list). Since session 24 the IPv4 short path (`short.rs`) forwards such a flow itself
/// while its entry's generation is current, and hands it to the whole path otherwise:
/// every forwarded packet is checked whole (the IPIP frame to the flow's backend, `tx`
/// counted), every refused one dropped unchanged and counted under its rule.
#[test]
fn established_flows_see_filter_changes_through_the_filter_generation() -> anyhow::Result<()> {
    use lb_common::types::FilterRule;
    let test = require_privileges!();
    with_fixture(test, |fx| {
        let src = SocketAddrV4::new(CLIENT, 40100);
        let key = flow_key(src, VIP_WEB, PROTO_TCP);
        let ack = PacketBuilder::tcp(src, VIP_WEB)
            .flags(tcp_flags::ACK)
            .build();
        let (v, _) = fx.run(LB_PROGRAM, &syn(src, VIP_WEB).build())?;
        ensure!(v == XDP_TX, "SYN: {}", verdict_name(v));
        let (v, out) = fx.run(LB_PROGRAM, &ack)?;
        ensure!(v == XDP_TX, "first ACK: {}", verdict_name(v));
        let backend = Frame::parse(&out)?.ipv4()?.dst;
        let generation =
            |fx: &Fixture| -> anyhow::Result<u32> { Ok(fx.lb.maps.filter_gen.get(&0, 0)?) };
        let entry_gen = |fx: &Fixture| -> anyhow::Result<u32> {
            Ok(fx
                .lb
                .flow_entry(&key, false)
                .context("the flow is not in the flow table")?
                .filter_gen)
        };
        // Forwarded whole: the IPIP frame to the flow's backend, byte for byte (the
        // short path finishes such a packet when the entry's generation is current),
        // and counted as traffic of that backend.
        let forwarded = |fx: &Fixture, what: &str| -> anyhow::Result<()> {
            let before = fx.counters();
            let (v, out) = fx.run(LB_PROGRAM, &ack)?;
            ensure!(v == XDP_TX, "{what}: {}", verdict_name(v));
            let to = Frame::parse(&out)?.ipv4()?.dst;
            ensure!(
                to == backend,
                "{what}: the flow moved from {backend} to {to}"
            );
            ensure!(
                out == fx.encapsulated(&ack, backend)?,
                "{what}: the frame sent is not the flow's packet in IPIP to {backend}"
            );
            ensure!(
                fx.counters().get(Counter::Tx) == before.get(Counter::Tx) + 1,
                "{what}: tx not counted"
            );
            Ok(())
        };
        let dropped = |fx: &Fixture, what: &str, reason: DropReason, rule: &str| {
            let (before, rules) = (fx.counters(), fx.filter_drops()?);
            let (v, out) = fx.run(LB_PROGRAM, &ack)?;
            ensure!(v == XDP_DROP, "{what}: {}", verdict_name(v));
            ensure!(out == ack, "{what}: the dropped frame came out changed");
            ensure!(
                fx.counters().drop_count(reason) == before.drop_count(reason) + 1,
                "{what}: {reason:?} not counted"
            );
            let (was, now) = (rules.get(rule), fx.filter_drops()?.get(rule).copied());
            ensure!(
                now == was.map(|n| n + 1),
                "{what}: rule {rule} counted {was:?} -> {now:?}"
            );
            anyhow::Ok(())
        };
        forwarded(fx, "established, no lists")?;
        ensure!(
            entry_gen(fx)? == generation(fx)?,
            "a new entry without the current generation"
        );

        let g = generation(fx)?;
        let mut d = desired();
        d.filters.deny = prefixes(&["198.18.0.0/24"]);
        fx.lb.apply(&d)?;
        ensure!(
            generation(fx)? != g,
            "a deny list written without a new filter generation"
        );
        dropped(
            fx,
            "deny list now holds the client",
            DropReason::FilterDeny,
            "198.18.0.0/24",
        )?;
        dropped(
            fx,
            "and the next packet",
            DropReason::FilterDeny,
            "198.18.0.0/24",
        )?;

        fx.lb.apply(&desired())?;
        forwarded(fx, "deny list emptied")?;

        // The allow list: holding the client, then not.
        let mut d = desired();
        d.filters.allow = prefixes(&["198.18.0.0/24"]);
        fx.lb.apply(&d)?;
        ensure!(
            entry_gen(fx)? != generation(fx)?,
            "the allow list was written without a new filter generation"
        );
        forwarded(fx, "allow list holds the client")?;
        ensure!(
            entry_gen(fx)? == generation(fx)?,
            "the entry did not take the generation once its source passed"
        );
        d.filters.allow = prefixes(&["198.18.50.0/24"]);
        fx.lb.apply(&d)?;
        dropped(
            fx,
            "allow list no longer holds the client",
            DropReason::FilterNotAllowed,
            stats::NOT_ALLOWED_RULE,
        )?;

        // Both lists in use, neither refusing the client; its entry is current.
        d.filters.allow = prefixes(&["198.18.0.0/24"]);
        d.filters.deny = prefixes(&["203.0.113.0/24"]);
        fx.lb.apply(&d)?;
        forwarded(fx, "allow holds the client, deny does not")?;
        forwarded(fx, "again, on the entry's generation")?;
        // A deny entry for the client behind the agent's back (no bump): new flows see
        // it, the established flow does not look.
        let (_, rule_id) = fx
            .lb
            .reconciler
            .deny_rules()
            .next()
            .context("no deny rule written")?;
        let client: ipnet::IpNet = "198.18.0.2/32".parse()?;
        fx.lb.maps.deny.insert(
            &filter_key(Scope::Global, client),
            FilterRule { rule_id },
            0,
        )?;
        let other = syn(SocketAddrV4::new(CLIENT, 40101), VIP_WEB).build();
        let (v, _) = fx.run(LB_PROGRAM, &other)?;
        ensure!(
            v == XDP_DROP,
            "a new flow of the client: {}",
            verdict_name(v)
        );
        forwarded(
            fx,
            "established: its entry's generation is current, no lookup",
        )?;
        fx.lb
            .maps
            .filter_gen
            .set(0, generation(fx)?.wrapping_add(1), 0)?;
        dropped(
            fx,
            "after the bump",
            DropReason::FilterDeny,
            "203.0.113.0/24",
        )?;
        fx.lb.maps.deny.remove(&filter_key(Scope::Global, client))?;

        // The service's own lists, no global list: the VIP's list bits call for the
        // same generation check (on the short path as on the whole path).
        let mut d = desired();
        d.services[0].filters.deny = prefixes(&["203.0.113.0/24"]);
        fx.lb.apply(&d)?;
        ensure!(
            entry_gen(fx)? != generation(fx)?,
            "a service's deny list was written without a new filter generation"
        );
        forwarded(fx, "the service's deny list does not hold the client")?;
        ensure!(
            entry_gen(fx)? == generation(fx)?,
            "the entry did not take the generation once its source passed the service's list"
        );
        forwarded(fx, "again, on the entry's generation (service list)")?;
        // A service deny entry for the client behind the agent's back (no bump).
        let web = fx.lb.reconciler.service_id("web").context("web id")?;
        let (rule, rule_id) = fx
            .lb
            .reconciler
            .service_filter_rules()
            .into_iter()
            .find(|(rule, _)| rule == "web:203.0.113.0/24")
            .context("no service deny rule written")?;
        fx.lb.maps.svc_deny.insert(
            &filter_key(Scope::Service(web), client),
            FilterRule { rule_id },
            0,
        )?;
        let other = syn(SocketAddrV4::new(CLIENT, 40102), VIP_WEB).build();
        let (v, _) = fx.run(LB_PROGRAM, &other)?;
        ensure!(
            v == XDP_DROP,
            "a new flow of the client, service deny entry: {}",
            verdict_name(v)
        );
        forwarded(
            fx,
            "established, service list: its entry's generation is current, no lookup",
        )?;
        fx.lb
            .maps
            .filter_gen
            .set(0, generation(fx)?.wrapping_add(1), 0)?;
        dropped(
            fx,
            "after the bump (service deny list)",
            DropReason::FilterDeny,
            &rule,
        )?;
        fx.lb
            .maps
            .svc_deny
            .remove(&filter_key(Scope::Service(web), client))?;

        // The service's allow list: holding the client, then not.
        d.services[0].filters.deny = Vec::new();
        d.services[0].filters.allow = prefixes(&["198.18.0.0/24"]);
        fx.lb.apply(&d)?;
        forwarded(fx, "the service's allow list holds the client")?;
        forwarded(fx, "again, on the entry's generation (service allow)")?;
        d.services[0].filters.allow = prefixes(&["198.18.50.0/24"]);
        fx.lb.apply(&d)?;
        dropped(
            fx,
            "the service's allow list no longer holds the client",
            DropReason::FilterNotAllowed,
            "web:not_allowed",
        )?;
        fx.lb.apply(&desired())?;
        forwarded(fx, "no list at all")?;
        Ok(())
    })
}
