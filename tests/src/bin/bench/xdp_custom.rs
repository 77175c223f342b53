//! The balancers of `xdplb-bench xdp`'s per-feature and scale rows: `xdp_lb` loaded with
//! a desired state of its own (filters, flood limits, a QUIC service, an IPv6 VIP, GUE,
//! many services or backends), its maps filled by the agent's reconciler
//! ([`LoadedLb::load`]), next hops written into `NEXT_HOPS` as the agent writes them, the
//! frame a row sends, the wrapper that undoes that row's tunnel, and the check of what
//! comes out.

use std::{
    collections::HashMap as StdHashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
};

use anyhow::{Context as _, bail, ensure};
use lb_agent::{
    config::{FlowLimitConfig, Protocol},
    dataplane::{
        desired::{DesiredBackend, DesiredFilters, DesiredService, DesiredState},
        loader::{Capacities, LB_PROGRAM},
        stats::Counters,
    },
};
use lb_common::{
    stats::Counter,
    types::{ENCAP_GUE, ENCAP_IPIP, NEXT_HOP_F_VALID, NextHopEntry},
};
use xdplb_tests::{
    packet::{ETH_HLEN, Frame, IPV4_HLEN, PacketBuilder, tcp_flags},
    packet6::{self, IPPROTO_IPV6, IPV6_HLEN},
    xdp_bed::{LoadedLb, Run, XDP_TX, flow_key_of, verdict_name},
};

/// The wrappers of the floors object, by the tunnel they undo (IPIP: `bench_wrap`).
pub(crate) const WRAP_IPV6: &str = "bench_wrap6";
pub(crate) const WRAP_GUE: &str = "bench_wrap_gue";
/// `gue_port` of the GUE balancer: the port `bench_wrap_gue` strips (floors.rs).
pub(crate) const GUE_PORT: u16 = 6080;

/// The outer header the balancer must write.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Outer {
    /// 20-byte IPv4, protocol 4.
    Ipip,
    /// 40-byte IPv6, next header 41 (6in6).
    Ip6ip6,
    /// 20-byte IPv4 + 8-byte UDP to the GUE port.
    Gue,
}

/// One balancer of the per-feature or scale rows.
pub(crate) struct Custom {
    pub(crate) lb: LoadedLb,
    /// The service the rows' packets are for.
    service: String,
    vip: SocketAddr,
    /// Its backends.
    backends: Vec<IpAddr>,
    /// The next-hop MAC of every backend of every service (as written to `NEXT_HOPS`).
    macs: StdHashMap<IpAddr, [u8; 6]>,
    pub(crate) outer: Outer,
    /// QUIC rows: the backend (index into `backends`) the connection ID names.
    quic_backend: Option<usize>,
    /// The outer source the balancer writes.
    source: IpAddr,
    /// lb0's MAC: the source of every frame sent.
    lb_mac: [u8; 6],
}

/// The bench's fixed addresses, passed in by `xdp.rs`.
pub(crate) struct Env {
    pub(crate) lb_addr: Ipv4Addr,
    pub(crate) lb_addr6: Ipv6Addr,
    pub(crate) lb_mac: [u8; 6],
    pub(crate) ifindex: u32,
}

/// Capacities of a balancer with `services` services of `backends` backends and a flow
/// table (and new-flow table) of the given sizes.
pub(crate) fn caps(services: u32, backends: u32, flows: u32, new_flows: u32) -> Capacities {
    Capacities {
        max_services: services + 2,
        max_backends: services * backends + 16,
        ring_size: 65537,
        flow_table_size: flows,
        max_filter_rules: 4096,
        new_flow_table_size: new_flows,
        flow_limit_sources: 1024,
    }
}

/// Backend `j` of service `i` (IPv4, in 198.18.128.0/17; `i` < 1000, `j` < 1000 for
/// `i` = 0, else < 16) and its made-up next-hop MAC.
fn backend_v4(i: u32, j: u32) -> (Ipv4Addr, [u8; 6]) {
    debug_assert!(i < 1000 && j < if i == 0 { 1000 } else { 16 });
    let n = if i == 0 { j } else { 1000 + i * 16 + j };
    let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 128, 0)) + n + 1);
    let o = addr.octets();
    (addr, [0x02, 0xbe, 0x01, o[1], o[2], o[3]])
}

fn tcp_service(name: String, vip: SocketAddr, backends: &[IpAddr]) -> DesiredService {
    DesiredService {
        quic: false,
        name,
        vip,
        protocol: Protocol::Tcp,
        l7: false,
        source_hash: false,
        backends: backends
            .iter()
            .map(|&b| DesiredBackend {
                quic_id: None,
                address: b,
                port: vip.port(),
                weight: 100,
                active: true,
            })
            .collect(),
        filters: DesiredFilters::default(),
    }
}

/// The VIP of service `i` of the scale rows (port 80).
pub(crate) fn scale_vip(i: u32) -> SocketAddrV4 {
    let v = u32::from(Ipv4Addr::new(198, 19, 0, 1)) + i;
    SocketAddrV4::new(Ipv4Addr::from(v), 80)
}

impl Custom {
    /// Loads the balancer for `desired` (service `service` measured), writes every
    /// backend's next hop. `object`: another build of the balancer object
    /// (`XDPLB_BENCH_LB_OBJECTS`), None: the agent's own.
    #[allow(clippy::too_many_arguments)]
    fn load(
        caps: &Capacities,
        desired: &DesiredState,
        service: &str,
        outer: Outer,
        macs: StdHashMap<IpAddr, [u8; 6]>,
        env: &Env,
        object: Option<&[u8]>,
    ) -> anyhow::Result<Self> {
        let lb = LoadedLb::load_object(caps, desired, &[LB_PROGRAM], object)?;
        let svc = desired
            .services
            .iter()
            .find(|s| s.name == service)
            .context("no such service")?;
        let mut c = Custom {
            lb,
            service: service.to_owned(),
            vip: svc.vip,
            backends: svc.backends.iter().map(|b| b.address).collect(),
            macs,
            outer,
            quic_backend: None,
            lb_mac: env.lb_mac,
            source: if svc.backends.first().is_some_and(|b| b.address.is_ipv6()) {
                env.lb_addr6.into()
            } else {
                env.lb_addr.into()
            },
        };
        // NEXT_HOPS, as the agent writes it: the entry of every backend of every service.
        for s in &desired.services {
            for b in &s.backends {
                let id =
                    c.lb.reconciler
                        .backend_id(&s.name, b.address, b.port)
                        .context("backend id")?;
                let (addr, family) = lb_agent::dataplane::sync::addr_words(b.address);
                let entry = NextHopEntry {
                    addr,
                    ifindex: env.ifindex,
                    mtu: 1500,
                    family,
                    flags: NEXT_HOP_F_VALID,
                    dmac: c.macs[&b.address],
                    smac: env.lb_mac,
                };
                c.lb.maps.next_hops.set(id, entry, 0)?;
            }
        }
        Ok(c)
    }

    /// `services` TCP services of `backends` backends each (scale rows), the first one
    /// measured; flow table `flows` entries, new-flow table `new_flows`.
    pub(crate) fn scale(
        services: u32,
        backends: u32,
        flows: u32,
        new_flows: u32,
        env: &Env,
    ) -> anyhow::Result<Self> {
        let mut macs = StdHashMap::new();
        let mut list = Vec::new();
        for i in 0..services {
            let addrs: Vec<IpAddr> = (0..backends)
                .map(|j| {
                    let (a, m) = backend_v4(i, j);
                    macs.insert(IpAddr::V4(a), m);
                    IpAddr::V4(a)
                })
                .collect();
            list.push(tcp_service(format!("s{i}"), scale_vip(i).into(), &addrs));
        }
        let desired = base_state(env, list);
        Self::load(
            &caps(services, backends, flows, new_flows),
            &desired,
            "s0",
            Outer::Ipip,
            macs,
            env,
            None,
        )
    }

    /// One TCP service (VIP `vip`, 4 IPv4 backends) with `tweak` applied to the state.
    pub(crate) fn feature(
        env: &Env,
        vip: SocketAddrV4,
        flows: u32,
        tweak: impl FnOnce(&mut DesiredState),
    ) -> anyhow::Result<Self> {
        Self::feature_object(env, vip, flows, None, tweak)
    }

    /// [`Custom::feature`] on another build of the balancer object (None: the agent's).
    pub(crate) fn feature_object(
        env: &Env,
        vip: SocketAddrV4,
        flows: u32,
        object: Option<&[u8]>,
        tweak: impl FnOnce(&mut DesiredState),
    ) -> anyhow::Result<Self> {
        let (services, mut macs) = four_backends(vip);
        let mut desired = base_state(env, services);
        tweak(&mut desired);
        // Backends the tweak added (another service's) get a next-hop MAC of their own.
        for (i, s) in desired.services.iter().enumerate() {
            for (j, b) in s.backends.iter().enumerate() {
                macs.entry(b.address)
                    .or_insert([0x02, 0xbe, 0x0f, 0, i as u8, j as u8]);
            }
        }
        let outer = if desired.encap == ENCAP_GUE {
            Outer::Gue
        } else {
            Outer::Ipip
        };
        Self::load(
            &caps(4, 8, flows, flows),
            &desired,
            "web",
            outer,
            macs,
            env,
            object,
        )
    }

    /// An IPv6 VIP with 4 IPv6 backends (6in6); `object` as in [`Custom::feature_object`].
    pub(crate) fn ipv6(
        env: &Env,
        vip: SocketAddrV6,
        flows: u32,
        object: Option<&[u8]>,
    ) -> anyhow::Result<Self> {
        let mut macs = StdHashMap::new();
        let backends: Vec<IpAddr> = (0..4u16)
            .map(|j| {
                let a = Ipv6Addr::new(0xfd00, 0x18, 1, 0, 0, 0, 0, 0x11 + j);
                macs.insert(IpAddr::V6(a), [0x02, 0xbe, 0x06, 0, 0, 0x11 + j as u8]);
                IpAddr::V6(a)
            })
            .collect();
        let desired = base_state(env, vec![tcp_service("web".into(), vip.into(), &backends)]);
        Self::load(
            &caps(4, 8, flows, flows),
            &desired,
            "web",
            Outer::Ip6ip6,
            macs,
            env,
            object,
        )
    }

    /// A QUIC service (UDP, `quic = true`, IDs `0x0101 + j` per backend) beside the TCP
    /// one; packets to it name backend 1's ID in a version-1 connection ID.
    pub(crate) fn quic(
        env: &Env,
        vip: SocketAddrV4,
        quic_vip: SocketAddrV4,
        flows: u32,
    ) -> anyhow::Result<Self> {
        let mut c = Self::feature(env, vip, flows, |d| add_quic(d, quic_vip))?;
        c.service = "quic".into();
        c.vip = quic_vip.into();
        c.quic_backend = Some(1);
        Ok(c)
    }

    /// Counters of the balancer, summed over CPUs.
    pub(crate) fn counters(&self) -> anyhow::Result<Counters> {
        self.lb.counters()
    }

    /// Checks verdict and output of one run on `input` (`new_port`: the wrapper wrote a
    /// new TCP source port every iteration) and the counters over it (`established`:
    /// no new flow); returns the new flows counted.
    pub(crate) fn check(
        &self,
        input: &[u8],
        sample: &Run,
        repeat: u32,
        before: &Counters,
        established: bool,
        new_port: bool,
    ) -> anyhow::Result<u64> {
        ensure!(
            sample.verdict == XDP_TX,
            "last iteration returned {}, want XDP_TX",
            verdict_name(sample.verdict)
        );
        let out = &sample.out;
        let (outer_len, outer_dst) = match self.outer {
            Outer::Ipip | Outer::Gue => {
                ensure!(
                    out.get(12..14) == Some(&[8, 0][..]),
                    "EtherType is not IPv4"
                );
                let ip = Frame::parse(out)?.ipv4()?;
                let want_proto = if self.outer == Outer::Ipip { 4 } else { 17 };
                ensure!(
                    ip.protocol == want_proto,
                    "outer protocol {}, want {want_proto}",
                    ip.protocol
                );
                ensure!(ip.ttl == 64, "outer TTL {}", ip.ttl);
                ensure!(
                    ip.header_checksum_ok(),
                    "outer IPv4 header checksum is wrong"
                );
                ensure!(
                    IpAddr::V4(ip.src) == self.source,
                    "outer source {}, want {}",
                    ip.src,
                    self.source
                );
                if self.outer == Outer::Gue {
                    let udp = &out[ETH_HLEN + IPV4_HLEN..ETH_HLEN + IPV4_HLEN + 8];
                    ensure!(
                        u16::from_be_bytes([udp[2], udp[3]]) == GUE_PORT,
                        "outer UDP destination is not the GUE port"
                    );
                    ensure!(
                        usize::from(u16::from_be_bytes([udp[4], udp[5]]))
                            == out.len() - ETH_HLEN - IPV4_HLEN,
                        "outer UDP length"
                    );
                    (IPV4_HLEN + 8, IpAddr::V4(ip.dst))
                } else {
                    (IPV4_HLEN, IpAddr::V4(ip.dst))
                }
            }
            Outer::Ip6ip6 => {
                ensure!(
                    out.get(12..14) == Some(&[0x86, 0xdd][..]),
                    "EtherType is not IPv6"
                );
                let h = out
                    .get(ETH_HLEN..ETH_HLEN + IPV6_HLEN)
                    .context("no outer IPv6 header")?;
                ensure!(h[0] >> 4 == 6, "outer version {}", h[0] >> 4);
                ensure!(h[6] == IPPROTO_IPV6, "outer next header {}, want 41", h[6]);
                ensure!(h[7] == 64, "outer hop limit {}", h[7]);
                ensure!(
                    usize::from(u16::from_be_bytes([h[4], h[5]]))
                        == out.len() - ETH_HLEN - IPV6_HLEN,
                    "outer payload length"
                );
                let src = Ipv6Addr::from(<[u8; 16]>::try_from(&h[8..24])?);
                ensure!(
                    IpAddr::V6(src) == self.source,
                    "outer source {src}, want {}",
                    self.source
                );
                let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&h[24..40])?);
                (IPV6_HLEN, IpAddr::V6(dst))
            }
        };
        ensure!(
            out.len() == input.len() + outer_len,
            "{} bytes out for {} in",
            out.len(),
            input.len()
        );
        // The inner packet, byte for byte (bar the source port the wrapper wrote).
        let mut inner_want = input[ETH_HLEN..].to_vec();
        let inner_got = &out[ETH_HLEN + outer_len..];
        if new_port {
            inner_want[IPV4_HLEN..IPV4_HLEN + 2]
                .copy_from_slice(&inner_got[IPV4_HLEN..IPV4_HLEN + 2]);
        }
        if inner_want != inner_got {
            bail!("the inner packet changed");
        }
        // To the right backend, via its next hop.
        ensure!(
            self.backends.contains(&outer_dst),
            "sent to {outer_dst}, not a backend of {}",
            self.service
        );
        if let Some(i) = self.quic_backend {
            ensure!(
                outer_dst == self.backends[i],
                "sent to {outer_dst}, the connection ID names {}",
                self.backends[i]
            );
        } else if self.outer != Outer::Ip6ip6 {
            // The ring oracle (IPv4 flows): lb_common::hash and the ring written.
            let inner_frame = [&input[..ETH_HLEN], inner_got].concat();
            let key = flow_key_of(&inner_frame)?;
            let id = self.lb.ring_backend_id(&self.service, &key, false)?;
            let want = self
                .backends
                .iter()
                .copied()
                .find(|&b| {
                    self.lb
                        .reconciler
                        .backend_id(&self.service, b, self.vip.port())
                        == Some(id)
                })
                .context("the ring names no backend")?;
            ensure!(
                outer_dst == want,
                "sent to {outer_dst}, the ring names {want}"
            );
        }
        let f = Frame::parse(out)?;
        ensure!(
            f.dst_mac == self.macs[&outer_dst],
            "Ethernet destination is not {outer_dst}'s next hop"
        );
        ensure!(f.src_mac == self.lb_mac, "Ethernet source is not lb0's MAC");
        // Counters: every iteration counted and sent.
        let after = self.counters()?;
        let delta = |c: Counter| after.get(c) - before.get(c);
        let n = u64::from(repeat);
        ensure!(
            delta(Counter::Rx) == n,
            "rx counted {} of {n}",
            delta(Counter::Rx)
        );
        ensure!(
            delta(Counter::Tx) == n,
            "tx counted {} of {n}",
            delta(Counter::Tx)
        );
        if self.quic_backend.is_some() {
            ensure!(
                delta(Counter::QuicCidRouted) == n,
                "quic_cid_routed counted {} of {n}",
                delta(Counter::QuicCidRouted)
            );
        } else if established {
            ensure!(
                delta(Counter::FlowNew) == 0,
                "{} new flows on the established flow",
                delta(Counter::FlowNew)
            );
        }
        Ok(delta(Counter::FlowNew))
    }
}

/// The bench's four IPv4 backends (198.18.1.11-14, as `xdp.rs`'s) behind `vip` as
/// service "web", and their MACs.
fn four_backends(vip: SocketAddrV4) -> (Vec<DesiredService>, StdHashMap<IpAddr, [u8; 6]>) {
    let mut macs = StdHashMap::new();
    let addrs: Vec<IpAddr> = (0..4u8)
        .map(|j| {
            let a = Ipv4Addr::new(198, 18, 1, 11 + j);
            macs.insert(IpAddr::V4(a), [0x02, 0xbe, 0, 0, 0, 0x11 + j]);
            IpAddr::V4(a)
        })
        .collect();
    (vec![tcp_service("web".into(), vip.into(), &addrs)], macs)
}

fn base_state(env: &Env, services: Vec<DesiredService>) -> DesiredState {
    DesiredState {
        gue_port: GUE_PORT,
        source_v4_prefix: None,
        source_v6_prefix: None,
        max_new_flows_per_cpu: 0,
        icmp_errors_per_cpu: 0,
        source_v4: Some(env.lb_addr),
        source_v6: Some(env.lb_addr6),
        encap: ENCAP_IPIP,
        mtu: 1500,
        filters: DesiredFilters::default(),
        services,
    }
}

/// Adds the QUIC service "quic" on `vip` with the four backends, IDs `0x0101 + j`.
pub(crate) fn add_quic(d: &mut DesiredState, vip: SocketAddrV4) {
    let (mut s, _) = four_backends(vip);
    let mut q = s.remove(0);
    q.name = "quic".into();
    q.protocol = Protocol::Udp;
    q.quic = true;
    for (j, b) in q.backends.iter_mut().enumerate() {
        b.quic_id = Some(0x0101 + j as u32);
    }
    d.services.push(q);
}

/// Adds the IPv6 TCP service "web6" on `vip` with four IPv6 backends: present beside
/// the IPv4 service, not used by its packets.
pub(crate) fn add_ipv6(d: &mut DesiredState, vip: SocketAddrV6) {
    let backends: Vec<IpAddr> = (0..4u16)
        .map(|j| IpAddr::V6(Ipv6Addr::new(0xfd00, 0x18, 1, 0, 0, 0, 0, 0x11 + j)))
        .collect();
    d.services
        .push(tcp_service("web6".into(), vip.into(), &backends));
}

/// `n` source prefixes that do not contain the bench's clients (/24s in 203.0.0.0/8
/// and beyond).
pub(crate) fn prefixes(n: u32, base: Ipv4Addr) -> Vec<ipnet::IpNet> {
    (0..n)
        .map(|i| {
            let a = Ipv4Addr::from(u32::from(base) + (i << 8));
            ipnet::IpNet::V4(ipnet::Ipv4Net::new(a, 24).expect("prefix"))
        })
        .collect()
}

/// A flood limit that the measured flows never reach.
pub(crate) fn flood_limit() -> FlowLimitConfig {
    FlowLimitConfig {
        rate: 1000,
        burst: 2000,
        prefix_v4: 32,
        prefix_v6: 64,
    }
}

/// The established TCP frame of the IPv6 rows.
pub(crate) fn frame6(client: SocketAddrV6, vip: SocketAddrV6) -> Vec<u8> {
    packet6::eth(
        xdplb_tests::packet::DEFAULT_DST_MAC,
        xdplb_tests::packet::DEFAULT_SRC_MAC,
        None,
        0x86dd,
        &packet6::ipv6(
            *client.ip(),
            *vip.ip(),
            6,
            0,
            64,
            &packet6::tcp6(client, vip, tcp_flags::ACK, 1, &[]),
        ),
    )
}

/// A QUIC short-header datagram to `vip` whose version-1 connection ID names `id`.
pub(crate) fn quic_frame(client: SocketAddrV4, vip: SocketAddrV4, id: u32) -> Vec<u8> {
    let cid = [
        0x40 | (id >> 10) as u8,
        (id >> 2) as u8,
        ((id & 3) << 6) as u8 | 0x15,
        0xa1,
        0xa2,
        0xa3,
        0xa4,
        0xa5,
    ];
    let mut p = vec![0x40];
    p.extend_from_slice(&cid);
    p.extend_from_slice(&[0x11; 20]);
    PacketBuilder::udp(client, vip).payload(&p).build()
}

/// A QUIC long-header datagram (a handshake packet) from `client` to `vip`: balanced
/// by the flow tables and the ring like any datagram, so two of them put the flow in
/// the flow table.
pub(crate) fn quic_long_frame(client: SocketAddrV4, vip: SocketAddrV4) -> Vec<u8> {
    let mut p = vec![0xc3, 0, 0, 0, 1, 8];
    p.extend_from_slice(&[0x55; 8]);
    p.extend_from_slice(&[0; 20]);
    PacketBuilder::udp(client, vip).payload(&p).build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_prefixes_miss_the_clients_and_scale_addresses_are_distinct() {
        let client: IpAddr = Ipv4Addr::new(198, 18, 0, 2).into();
        for base in [Ipv4Addr::new(203, 0, 0, 0), Ipv4Addr::new(100, 64, 0, 0)] {
            let p = prefixes(1000, base);
            assert_eq!(p.len(), 1000);
            assert!(p.iter().all(|n| !n.contains(&client)));
        }
        let mut seen = std::collections::HashSet::new();
        for i in 0..1000 {
            assert!(seen.insert(*scale_vip(i).ip()));
            for j in 0..if i == 0 { 1000 } else { 16 } {
                let a = backend_v4(i, j).0;
                assert!(seen.insert(a), "{a} twice");
                assert!(a.octets()[..3] >= [198, 18, 128][..] && a.octets()[1] == 18);
            }
        }
    }
}
