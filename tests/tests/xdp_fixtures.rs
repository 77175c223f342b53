//! XDP behaviour as a fixture table, run through `BPF_PROG_TEST_RUN` (aya's `test_run`):
//! input frame + map state -> expected verdict, counter and output frame. No traffic
//! crosses any link: the namespace only gives `bpf_fib_lookup` a routing table with
//! known neighbours (static entries), an unresolved next hop and an unreachable route.
//!
//! The backend a VIP packet must go to is predicted with `lb_common::hash` (the oracle)
//! and the ring the agent wrote, not by asking the program.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    sync::Mutex,
};

use anyhow::{Context as _, ensure};
use aya::{Ebpf, TestRun, TestRunOptions, maps::HashMap, programs::Xdp};
use lb_agent::{
    config::Protocol,
    dataplane::{
        desired::{DesiredBackend, DesiredService, DesiredState},
        forwarding::InterfaceForwarding,
        loader::{self, Capacities, DECAP_PROGRAM, LB_PROGRAM},
        maps::Maps,
        stats,
        sync::{Reconciler, addr_words},
    },
};
use lb_common::{
    hash::{flow_hash, ring_index, ring_slot, source_hash},
    maps as names,
    stats::{Counter, DropReason},
    types::{DecapKey, FAMILY_V4, FlowKey, PROTO_TCP, PROTO_UDP},
};
use xdplb_tests::{
    netns::{self, NetnsGuard, exec, in_netns, mac_of, static_neighbour},
    packet::{Frame, IPPROTO_IPIP, L4, PacketBuilder, tcp_flags},
};

const XDP_ABORTED: u32 = 0;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

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
/// Joins the web service in the flow-table test.
const JOINER: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 14);
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

/// Namespace test beds are built one at a time per process.
static SERIAL: Mutex<()> = Mutex::new(());

fn backend(addr: Ipv4Addr, port: u16) -> DesiredBackend {
    DesiredBackend {
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
        name: name.into(),
        vip: vip.into(),
        protocol,
        l7: false,
        source_hash: false,
        backends,
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
        source_v4: Some(LB_ADDR),
        source_v6: None,
        encap: 0,
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

/// The loaded object, its maps and what the routing table looks like.
struct Fixture {
    ebpf: Ebpf,
    maps: Maps,
    reconciler: Reconciler,
    ifindex: u32,
    far_ifindex: u32,
    lb_mac: [u8; 6],
    _forwarding: InterfaceForwarding,
}

/// Build the routing fixture in `ns`: `lb0` (198.18.1.0/24, static neighbours for the
/// three backends, none for .99), `far0` (198.18.2.0/24, one static neighbour), an
/// unreachable route for 198.18.3.0/24.
fn net_fixture(ns: &str) -> anyhow::Result<()> {
    let cmds: Vec<Vec<String>> = [
        "ip link set lo up",
        "ip link add lb0 type veth peer name lb0p",
        "ip link add far0 type veth peer name far0p",
        "ip addr add 198.18.1.10/24 dev lb0",
        "ip addr add 198.18.2.10/24 dev far0",
        "ip link set lb0 up",
        "ip link set lb0p up",
        "ip link set far0 up",
        "ip link set far0p up",
        "ip route add unreachable 198.18.3.0/24",
        "ip route add 198.18.0.0/24 via 198.18.1.1 dev lb0",
    ]
    .iter()
    .map(|c| c.split(' ').map(String::from).collect())
    .collect();
    for c in cmds {
        exec(ns, &c)?;
    }
    let neigh =
        |addr: Ipv4Addr, mac: [u8; 6], dev: &str| static_neighbour(ns, addr.into(), mac, dev);
    for (b, m) in BACKENDS.iter().zip(BACKEND_MACS) {
        neigh(*b, m, "lb0")?;
    }
    neigh(FAR_BACKEND, FAR_MAC, "far0")?;
    neigh(JOINER, [0x02, 0xbe, 0, 0, 0, 0x14], "lb0")?;
    Ok(())
}

impl Fixture {
    /// Must run on a thread inside the fixture namespace.
    fn new() -> anyhow::Result<Self> {
        let caps = Capacities {
            max_services: 8,
            max_backends: 32,
            ring_size: RING,
            flow_table_size: 4096,
        };
        let mut ebpf = loader::load(&caps)?;
        let mut maps = Maps::take(&mut ebpf, None)?;
        let mut reconciler = Reconciler::new(&caps);
        reconciler.apply(&mut maps, &desired())?;
        loader::load_program(&mut ebpf, LB_PROGRAM)?;
        loader::load_program(&mut ebpf, DECAP_PROGRAM)?;
        Ok(Fixture {
            ebpf,
            maps,
            reconciler,
            ifindex: loader::if_index("lb0")?,
            far_ifindex: loader::if_index("far0")?,
            lb_mac: mac_of("lb0")?,
            _forwarding: InterfaceForwarding::enable("lb0")?,
        })
    }

    fn run(&self, program: &str, frame: &[u8]) -> anyhow::Result<(u32, Vec<u8>)> {
        let prog: &Xdp = self.ebpf.program(program).context("program")?.try_into()?;
        let mut out = vec![0u8; frame.len() + 256];
        // struct xdp_md { data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex }
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&self.ifindex.to_ne_bytes());
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            repeat: 1,
            ..Default::default()
        };
        let res = prog.test_run(opts).context("test_run")?;
        out.truncate(res.data_size_out as usize);
        Ok((res.return_value, out))
    }

    fn counters(&self) -> stats::Counters {
        stats::counters(&self.maps).expect("counters")
    }
}

/// Oracle: slot from lb_common's hash, backend id from the ring the agent wrote, address
/// from the backend id the reconciler gave.
fn predicted(
    fx: &Fixture,
    service: &str,
    key: &FlowKey,
    source_affinity: bool,
    candidates: &[Ipv4Addr],
    port: u16,
) -> Ipv4Addr {
    let id = fx.reconciler.service_id(service).expect("service id");
    let hash = if source_affinity {
        source_hash(&key.src)
    } else {
        flow_hash(key)
    };
    let slot = ring_slot(hash, RING).expect("ring");
    let backend_id = fx
        .maps
        .rings
        .get(&ring_index(id, RING, slot), 0)
        .expect("ring slot");
    *candidates
        .iter()
        .find(|&&c| fx.reconciler.backend_id(service, c.into(), port) == Some(backend_id))
        .expect("ring slot points at a backend of the service")
}

fn flow_key(src: SocketAddrV4, dst: SocketAddrV4, proto: u8) -> FlowKey {
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

/// Build the fixture namespace and run `body` inside it with a loaded fixture.
fn with_fixture<F>(test: &str, body: F) -> anyhow::Result<()>
where
    F: FnOnce(&mut Fixture) -> anyhow::Result<()> + Send + 'static,
{
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut guard = NetnsGuard::new()?;
    let ns = guard.create("fx")?;
    net_fixture(&ns)?;
    let result = in_netns(&ns, move || {
        let mut fx = Fixture::new()?;
        body(&mut fx)
    });
    drop(guard);
    result.with_context(|| format!("fixture test {test}"))
}

fn syn(src: SocketAddrV4, dst: SocketAddrV4) -> PacketBuilder {
    PacketBuilder::tcp(src, dst).flags(tcp_flags::SYN)
}

/// Check an encapsulated frame: Ethernet to the next hop, outer IPv4 header fields and
/// checksum, inner packet byte for byte.
fn check_encapsulated(
    fx: &Fixture,
    input: &[u8],
    output: &[u8],
    backend: Ipv4Addr,
    next_hop_mac: [u8; 6],
    src_mac: [u8; 6],
) -> anyhow::Result<()> {
    let in_frame = Frame::parse(input)?;
    let inner_in = in_frame.payload.clone();
    let out = Frame::parse(output)?;
    ensure!(out.vlan.is_none(), "outer frame must be untagged");
    ensure!(
        out.dst_mac == next_hop_mac,
        "eth dst {:02x?}, want next hop {:02x?}",
        out.dst_mac,
        next_hop_mac
    );
    ensure!(
        out.src_mac == src_mac,
        "eth src {:02x?}, want {:02x?}",
        out.src_mac,
        src_mac
    );
    let outer = out.ipv4()?;
    ensure!(outer.header_len == 20, "outer header has options");
    ensure!(outer.src == LB_ADDR, "outer src {}", outer.src);
    ensure!(
        outer.dst == backend,
        "outer dst {}, want {backend}",
        outer.dst
    );
    ensure!(
        outer.protocol == IPPROTO_IPIP,
        "outer protocol {}",
        outer.protocol
    );
    ensure!(outer.ttl == 64, "outer TTL {}", outer.ttl);
    ensure!(
        outer.header_checksum_ok(),
        "outer header checksum wrong: {:#06x}",
        outer.checksum
    );
    let inner_len = usize::from(u16::from_be_bytes([inner_in[2], inner_in[3]]));
    ensure!(
        usize::from(outer.tot_len) == inner_len + 20,
        "outer tot_len {} for inner {inner_len}",
        outer.tot_len
    );
    ensure!(
        outer.payload == inner_in[..inner_len],
        "inner packet changed"
    );
    ensure!(
        outer.tos == inner_in[1],
        "outer TOS not copied from the inner packet"
    );
    let _ = fx;
    Ok(())
}

/// One row of the table: what goes in, what must come out.
struct Case {
    name: &'static str,
    frame: Vec<u8>,
    verdict: u32,
    counter: Option<Counter>,
    drop: Option<DropReason>,
}

#[test]
fn balancer_fixture_table() -> anyhow::Result<()> {
    if !netns::require_privileges("balancer_fixture_table") {
        return Ok(());
    }
    with_fixture("balancer_fixture_table", |fx| {
        let client = SocketAddrV4::new(CLIENT, 40000);
        let web = |sport| syn(SocketAddrV4::new(CLIENT, sport), VIP_WEB);
        let cases = vec![
            Case {
                name: "non-VIP address",
                frame: syn(client, SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 10), 80)).build(),
                verdict: XDP_PASS,
                counter: Some(Counter::PassNotVip),
                drop: None,
            },
            Case {
                name: "VIP, other port",
                frame: syn(client, SocketAddrV4::new(*VIP_WEB.ip(), 81)).build(),
                verdict: XDP_PASS,
                counter: Some(Counter::PassNotVip),
                drop: None,
            },
            Case {
                name: "VIP, other protocol (UDP to a TCP VIP)",
                frame: PacketBuilder::udp(client, VIP_WEB).build(),
                verdict: XDP_PASS,
                counter: Some(Counter::PassNotVip),
                drop: None,
            },
            Case {
                name: "ICMP to the VIP",
                frame: PacketBuilder::raw(CLIENT, *VIP_WEB.ip(), 1)
                    .payload(&[8, 0, 0, 0, 0, 0, 0, 0])
                    .build(),
                verdict: XDP_PASS,
                counter: Some(Counter::PassNotVip),
                drop: None,
            },
            Case {
                name: "first fragment (MF)",
                frame: web(40001).fragment(false, true, 0).build(),
                verdict: XDP_PASS,
                counter: Some(Counter::PassFragment),
                drop: None,
            },
            Case {
                name: "later fragment (offset)",
                frame: PacketBuilder::new(
                    CLIENT,
                    *VIP_WEB.ip(),
                    L4::Raw {
                        protocol: PROTO_TCP,
                    },
                )
                .payload(&[0; 24])
                .fragment(false, false, 3)
                .build(),
                verdict: XDP_PASS,
                counter: Some(Counter::PassFragment),
                drop: None,
            },
            Case {
                name: "IPv4 options",
                frame: web(40002).options(&[1, 1, 1, 1]).build(),
                verdict: XDP_PASS,
                counter: Some(Counter::PassIpOptions),
                drop: None,
            },
            Case {
                name: "tot_len beyond the frame",
                frame: web(40003).tot_len(200).build(),
                verdict: XDP_PASS,
                counter: Some(Counter::PassTruncated),
                drop: None,
            },
            Case {
                name: "ARP",
                frame: {
                    let mut f = web(40004).build();
                    f[12] = 0x08;
                    f[13] = 0x06;
                    f
                },
                verdict: XDP_PASS,
                counter: Some(Counter::PassNotIp),
                drop: None,
            },
            Case {
                name: "L7 VIP goes to the kernel",
                frame: syn(client, VIP_L7).build(),
                verdict: XDP_PASS,
                counter: Some(Counter::PassL7),
                drop: None,
            },
            Case {
                name: "service without backends",
                frame: syn(client, VIP_EMPTY).build(),
                verdict: XDP_DROP,
                counter: None,
                drop: Some(DropReason::NoBackend),
            },
            Case {
                name: "next hop not resolved yet",
                frame: syn(client, VIP_NONEIGH).build(),
                verdict: XDP_PASS,
                counter: Some(Counter::PassNoNeighbour),
                drop: None,
            },
            Case {
                name: "backend behind an unreachable route",
                frame: syn(client, VIP_UNREACH).build(),
                verdict: XDP_DROP,
                counter: None,
                drop: Some(DropReason::NoRoute),
            },
        ];
        for case in cases {
            let before = fx.counters();
            let (verdict, out) = fx.run(LB_PROGRAM, &case.frame)?;
            let after = fx.counters();
            ensure!(
                verdict == case.verdict,
                "{}: verdict {verdict}, want {}",
                case.name,
                case.verdict
            );
            if verdict == XDP_PASS {
                ensure!(
                    out == case.frame,
                    "{}: a passed packet must be untouched",
                    case.name
                );
            }
            if let Some(c) = case.counter {
                ensure!(
                    after.get(c) == before.get(c) + 1,
                    "{}: counter {} did not count it",
                    case.name,
                    c.label()
                );
            }
            if let Some(r) = case.drop {
                ensure!(
                    after.drop_count(r) == before.drop_count(r) + 1,
                    "{}: drop reason {} did not count it",
                    case.name,
                    r.label()
                );
            }
            ensure!(
                after.get(Counter::Rx) == before.get(Counter::Rx) + 1,
                "{}: rx not counted",
                case.name
            );
        }
        Ok(())
    })
}

#[test]
fn vip_hits_are_encapsulated_to_the_predicted_backend() -> anyhow::Result<()> {
    if !netns::require_privileges("vip_hits_are_encapsulated_to_the_predicted_backend") {
        return Ok(());
    }
    with_fixture("vip_hits_are_encapsulated_to_the_predicted_backend", |fx| {
        let mut seen = [0u32; 3];
        for i in 0..300u16 {
            let src = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2 + (i % 7) as u8), 30000 + i);
            let frame = syn(src, VIP_WEB)
                .tos(0x28)
                .payload(b"GET / HTTP/1.1\r\n\r\n")
                .build();
            let before = fx.counters();
            let (verdict, out) = fx.run(LB_PROGRAM, &frame)?;
            ensure!(
                verdict == XDP_TX,
                "flow {i}: verdict {verdict}, want XDP_TX"
            );
            let want = predicted(
                fx,
                "web",
                &flow_key(src, VIP_WEB, PROTO_TCP),
                false,
                &BACKENDS,
                80,
            );
            let idx = BACKENDS
                .iter()
                .position(|&b| b == want)
                .expect("a web backend");
            seen[idx] += 1;
            check_encapsulated(fx, &frame, &out, want, BACKEND_MACS[idx], fx.lb_mac)
                .with_context(|| format!("flow {i}"))?;
            let after = fx.counters();
            ensure!(
                after.get(Counter::Tx) == before.get(Counter::Tx) + 1,
                "tx counted"
            );
            ensure!(
                after.get(Counter::FlowNew) == before.get(Counter::FlowNew) + 1,
                "new flow counted"
            );
        }
        // Every backend got flows, each near a third (300 flows: 100 +- 4 sigma).
        for (b, n) in BACKENDS.iter().zip(seen) {
            ensure!((60..=140).contains(&n), "backend {b} got {n} of 300 flows");
        }
        // Per-service and per-backend counters: every packet above was for "web".
        let web_id = fx.reconciler.service_id("web").expect("web");
        ensure!(
            stats::service_traffic(&fx.maps, web_id)?.packets == 300,
            "service packets"
        );
        let per_backend: u64 = BACKENDS
            .iter()
            .map(|&b| {
                stats::backend_traffic(
                    &fx.maps,
                    fx.reconciler.backend_id("web", b.into(), 80).expect("id"),
                )
                .map(|t| t.packets)
            })
            .sum::<Result<u64, _>>()?;
        ensure!(per_backend == 300, "backend packets sum to {per_backend}");

        // A VLAN-tagged frame is balanced too; the outer frame is untagged.
        let src = SocketAddrV4::new(CLIENT, 45000);
        let frame = syn(src, VIP_WEB).vlan(42).build();
        let (verdict, out) = fx.run(LB_PROGRAM, &frame)?;
        ensure!(verdict == XDP_TX, "VLAN: verdict {verdict}");
        let want = predicted(
            fx,
            "web",
            &flow_key(src, VIP_WEB, PROTO_TCP),
            false,
            &BACKENDS,
            80,
        );
        let idx = BACKENDS
            .iter()
            .position(|&b| b == want)
            .expect("a web backend");
        check_encapsulated(fx, &frame, &out, want, BACKEND_MACS[idx], fx.lb_mac).context("VLAN")?;

        // UDP VIP whose backend is behind the other interface: XDP_REDIRECT there.
        let frame = PacketBuilder::udp(SocketAddrV4::new(CLIENT, 5353), VIP_DNS)
            .payload(&[0; 12])
            .build();
        let (verdict, out) = fx.run(LB_PROGRAM, &frame)?;
        ensure!(
            verdict == XDP_REDIRECT,
            "UDP to far backend: verdict {verdict}, want XDP_REDIRECT"
        );
        check_encapsulated(fx, &frame, &out, FAR_BACKEND, FAR_MAC, mac_of("far0")?)
            .context("redirect")?;
        let _ = fx.far_ifindex;

        // Source-IP affinity: every port of one client lands on the same backend.
        let first = {
            let src = SocketAddrV4::new(CLIENT, 1000);
            predicted(
                fx,
                "sticky",
                &flow_key(src, VIP_STICKY, PROTO_TCP),
                true,
                &BACKENDS,
                443,
            )
        };
        for port in 1000..1050 {
            let src = SocketAddrV4::new(CLIENT, port);
            let (verdict, out) = fx.run(LB_PROGRAM, &syn(src, VIP_STICKY).build())?;
            ensure!(verdict == XDP_TX, "affinity: verdict {verdict}");
            ensure!(
                Frame::parse(&out)?.ipv4()?.dst == first,
                "affinity: port {port} moved"
            );
        }

        // No tunnel source configured: passed up, counted.
        let mut no_source = desired();
        no_source.source_v4 = None;
        fx.reconciler.apply(&mut fx.maps, &no_source)?;
        let before = fx.counters();
        let frame = syn(SocketAddrV4::new(CLIENT, 46000), VIP_WEB).build();
        let (verdict, out) = fx.run(LB_PROGRAM, &frame)?;
        ensure!(
            verdict == XDP_PASS && out == frame,
            "no source: must pass untouched"
        );
        ensure!(
            fx.counters().get(Counter::PassNoSource) == before.get(Counter::PassNoSource) + 1,
            "pass_no_source"
        );
        Ok(())
    })
}

#[test]
fn truncated_at_every_byte_goes_to_the_kernel() -> anyhow::Result<()> {
    if !netns::require_privileges("truncated_at_every_byte_goes_to_the_kernel") {
        return Ok(());
    }
    with_fixture("truncated_at_every_byte_goes_to_the_kernel", |fx| {
        let tcp = syn(SocketAddrV4::new(CLIENT, 41000), VIP_WEB).build();
        let udp = PacketBuilder::udp(SocketAddrV4::new(CLIENT, 41001), VIP_DNS).build();
        let tagged = syn(SocketAddrV4::new(CLIENT, 41002), VIP_WEB)
            .vlan(7)
            .build();
        for (what, full) in [("tcp", tcp), ("udp", udp), ("vlan+tcp", tagged)] {
            // The kernel's test_run needs at least an Ethernet header.
            for len in 14..full.len() {
                let cut = &full[..len];
                let before = fx.counters();
                let (verdict, out) = fx.run(LB_PROGRAM, cut)?;
                ensure!(
                    verdict == XDP_PASS,
                    "{what} cut at {len}: verdict {verdict}"
                );
                ensure!(out == cut, "{what} cut at {len}: changed");
                ensure!(
                    fx.counters().get(Counter::PassTruncated)
                        == before.get(Counter::PassTruncated) + 1,
                    "{what} cut at {len}: not counted as truncated"
                );
            }
            let (verdict, _) = fx.run(LB_PROGRAM, &full)?;
            ensure!(
                verdict == XDP_TX || verdict == XDP_REDIRECT,
                "{what} whole: verdict {verdict}"
            );
        }
        Ok(())
    })
}

#[test]
fn established_flows_keep_their_backend_until_it_leaves() -> anyhow::Result<()> {
    if !netns::require_privileges("established_flows_keep_their_backend_until_it_leaves") {
        return Ok(());
    }
    with_fixture(
        "established_flows_keep_their_backend_until_it_leaves",
        |fx| {
            // Open 60 flows and remember where each went.
            let flows: Vec<SocketAddrV4> = (0..60)
                .map(|i| SocketAddrV4::new(CLIENT, 50000 + i))
                .collect();
            let mut first = Vec::new();
            for &src in &flows {
                let (v, out) = fx.run(LB_PROGRAM, &syn(src, VIP_WEB).build())?;
                ensure!(v == XDP_TX, "open: {v}");
                first.push(Frame::parse(&out)?.ipv4()?.dst);
            }
            // Change the backend set: a fourth backend joins, one changes weight. The ring
            // changes, established flows must not.
            let mut d = desired();
            d.services[0].backends.push(backend(JOINER, 80));
            d.services[0].backends[1].weight = 300;
            fx.reconciler.apply(&mut fx.maps, &d)?;
            let mut moved_if_new = 0;
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
                let fresh = predicted(
                    fx,
                    "web",
                    &flow_key(src, VIP_WEB, PROTO_TCP),
                    false,
                    &[BACKENDS[0], BACKENDS[1], BACKENDS[2], JOINER],
                    80,
                );
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
            fx.reconciler.apply(&mut fx.maps, &d2)?;
            let before = fx.counters();
            let mut rehashed = 0;
            for (i, &src) in flows.iter().enumerate() {
                let ack = PacketBuilder::tcp(src, VIP_WEB)
                    .flags(tcp_flags::ACK)
                    .build();
                let (v, out) = fx.run(LB_PROGRAM, &ack)?;
                ensure!(v == XDP_TX, "after removal: verdict {v}");
                let dst = Frame::parse(&out)?.ipv4()?.dst;
                ensure!(
                    dst != BACKENDS[0],
                    "flow {i} still sent to the removed backend"
                );
                if first[i] == BACKENDS[0] {
                    rehashed += 1;
                } else {
                    ensure!(dst == first[i], "flow {i} on a live backend moved");
                }
            }
            ensure!(rehashed > 0, "some flows were on the removed backend");
            ensure!(
                fx.counters().get(Counter::FlowRehash)
                    == before.get(Counter::FlowRehash) + rehashed,
                "each flow of the removed backend re-hashed exactly once"
            );
            Ok(())
        },
    )
}

#[test]
fn decap_fixture_table() -> anyhow::Result<()> {
    if !netns::require_privileges("decap_fixture_table") {
        return Ok(());
    }
    with_fixture("decap_fixture_table", |fx| {
        let mut dsts: HashMap<_, DecapKey, u32> =
            HashMap::try_from(fx.ebpf.map_mut(names::DECAP_DSTS).context("decap map")?)?;
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
        let inner = syn(SocketAddrV4::new(CLIENT, 42000), VIP_WEB)
            .payload(b"hello")
            .build_ipv4();
        let tunnelled = |dst: Ipv4Addr, vlan: Option<u16>| {
            let mut b = PacketBuilder::raw(LB_ADDR, dst, IPPROTO_IPIP).payload(&inner);
            if let Some(v) = vlan {
                b = b.vlan(v);
            }
            b.build()
        };
        // To us: outer header gone, Ethernet header (and tag) kept, inner untouched.
        for vlan in [None, Some(9)] {
            let frame = tunnelled(BACKENDS[0], vlan);
            let before = fx.counters();
            let (v, out) = fx.run(DECAP_PROGRAM, &frame)?;
            ensure!(v == XDP_PASS, "decap verdict {v}");
            let f_in = Frame::parse(&frame)?;
            let f_out = Frame::parse(&out)?;
            ensure!(
                f_out.dst_mac == f_in.dst_mac && f_out.src_mac == f_in.src_mac,
                "MACs kept"
            );
            ensure!(f_out.vlan == vlan, "VLAN tag kept");
            ensure!(f_out.ethertype == 0x0800, "EtherType IPv4");
            ensure!(
                f_out.payload[..inner.len()] == inner[..],
                "inner packet delivered unchanged"
            );
            ensure!(
                fx.counters().get(Counter::Decap) == before.get(Counter::Decap) + 1,
                "decap counted"
            );
        }
        // Not to us, not IPIP, or not IPv4 inside: untouched.
        let other = tunnelled(BACKENDS[1], None);
        let plain = syn(SocketAddrV4::new(CLIENT, 42001), VIP_WEB).build();
        let not_v4_inside = PacketBuilder::raw(LB_ADDR, BACKENDS[0], IPPROTO_IPIP)
            .payload(&[0x60; 40])
            .build();
        for (what, frame) in [
            ("other host", other),
            ("plain TCP", plain),
            ("IPv6 inside", not_v4_inside),
        ] {
            let (v, out) = fx.run(DECAP_PROGRAM, &frame)?;
            ensure!(
                v == XDP_PASS && out == frame,
                "{what}: must pass untouched (verdict {v})"
            );
        }
        ensure!(XDP_ABORTED != XDP_PASS);
        Ok(())
    })
}

#[test]
fn loaded_map_names_are_lb_common_names() -> anyhow::Result<()> {
    if !netns::require_privileges("loaded_map_names_are_lb_common_names") {
        return Ok(());
    }
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

#[test]
fn udp_and_tcp_share_flow_key_layout() {
    // The oracle's key for UDP differs only in the protocol.
    let a = flow_key(SocketAddrV4::new(CLIENT, 1), VIP_DNS, PROTO_UDP);
    let b = flow_key(SocketAddrV4::new(CLIENT, 1), VIP_DNS, PROTO_TCP);
    assert_ne!(flow_hash(&a), flow_hash(&b));
}
