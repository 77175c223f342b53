//! IPv6 in the balancer: the IPv6 header and its parser, the IPv6 outer header
//! (IPv6-in-IPv6, next header 41, and IPv4-in-IPv6, next header 4), IPv6-in-IPv4
//! (protocol 41), the choice of tunnel by the backend's family, `next_hop_v6`, and the
//! decapsulation of the IPv6 tunnel kinds.
//!
//! Which tunnel a packet takes depends only on the backend's address family, so every
//! combination works: an IPv6 VIP to IPv6 backends (6in6) or IPv4 backends (6in4), an
//! IPv4 VIP to IPv4 backends (IPIP, `encap.rs`) or IPv6 backends (4in6, as Katran
//! does). The outer header's source is `dataplane.source_ipv6` / `source_ipv4`, its
//! hop limit / TTL 64, its traffic class / TOS the inner one, its flow label 0, and its
//! length the inner packet's (bytes past the inner IP length are cut first).
//!
//! IPv6 extension headers are not walked: a packet whose next header after the fixed
//! 40 bytes is not TCP, UDP or ICMPv6 is passed to the kernel untouched, counted as
//! `pass_fragment` (fragment header) or `pass_ipv6_ext` (any other extension header),
//! or `pass_not_vip` (anything else). A VIP flow's packets carry no extension headers
//! in practice (clients do not send hop-by-hop or routing headers to a service), and
//! the kernel handles whatever does.

use core::mem::{MaybeUninit, size_of};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_FIB_LKUP_RET_BLACKHOLE, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_PROHIBIT, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LKUP_RET_UNREACHABLE,
        bpf_fib_lookup as FibParams, xdp_action::XDP_PASS, xdp_md,
    },
    helpers::generated::{bpf_fib_lookup, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use lb_common::{
    hash::{gue_source_port, tunnel_source_v4, tunnel_source_v6_low},
    stats::{Counter, DropReason},
    types::{
        Backend, ENCAP_GUE, FAMILY_V6, FILTER_F_FLOW_LIMIT, FlowKey, GlobalConfig, PROTO_TCP,
        PROTO_UDP, VIP_F_FLOW_LIMIT, VipKey,
    },
};

use crate::{
    csum,
    encap::{
        Exit, NextHop, OUTER_TTL, encap_ipv4, outer_ipv4, push_outer, transmit, trim_to,
        zeroed_fib_params,
    },
    gate::{self, NEXT_ICMP6, NEXT_SEND, NEXT_TOO_BIG6, finish, with_mtu},
    gue,
    hashing::{Choice, Limits, Probe, V6, choose_backend},
    maps::{CONFIG, DECAP_DSTS},
    nexthop,
    parsing::{
        ETH_HLEN, ETH_P_IP, ETH_P_IPV6, EthHdr, IPPROTO_IPIP, IPV4_HLEN, Ipv4Hdr, L2, Ports,
        VLAN_HLEN, VlanHdr, ptr_at,
    },
    quic,
    stats::{count, count_forwarded},
};

pub const IPV6_HLEN: usize = 40;
/// IPv6 encapsulated in IPv6 or IPv4 (RFC 2473, RFC 4213).
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_ICMPV6: u8 = 58;

/// Extension headers (RFC 8200 4, and the IANA list of them): a packet starting with
/// one is passed up.
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
const NEXTHDR_MOBILITY: u8 = 135;
const NEXTHDR_HIP: u8 = 139;
const NEXTHDR_SHIM6: u8 = 140;

const AF_INET6: u8 = 10;
const TCP_MIN_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// The fixed IPv6 header (RFC 8200 3).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Hdr {
    /// Version (4 bits), traffic class (8), flow label (20), as on the wire.
    pub vtc_flow: [u8; 4],
    /// Network order: bytes after this header.
    pub payload_len: u16,
    pub nexthdr: u8,
    pub hop_limit: u8,
    /// Network order.
    pub saddr: [u32; 4],
    /// Network order.
    pub daddr: [u32; 4],
}
const _: () = assert!(size_of::<Ipv6Hdr>() == IPV6_HLEN);

impl Ipv6Hdr {
    #[inline(always)]
    pub fn version(&self) -> u8 {
        self.vtc_flow[0] >> 4
    }

    #[inline(always)]
    pub fn traffic_class(&self) -> u8 {
        (self.vtc_flow[0] << 4) | (self.vtc_flow[1] >> 4)
    }

    /// Version 6, traffic class `tc`, flow label 0.
    #[inline(always)]
    pub fn vtc(tc: u8) -> [u8; 4] {
        [0x60 | (tc >> 4), tc << 4, 0, 0]
    }
}

/// A parsed IPv6 TCP/UDP packet the balancer may forward.
pub struct Ipv6Flow {
    /// The flow as it arrived (client source, VIP destination).
    pub key: FlowKey,
    /// Header and payload: 40 + payload length, host order.
    pub len: u16,
    pub tc: u8,
    /// A TCP SYN without ACK.
    pub tcp_syn: bool,
}

/// Parse the IPv6 header at `l3_off` and the ports after it; the error is the counter
/// saying why the packet goes to the kernel (`pass_not_vip` also for ICMPv6, which
/// the caller looks at next).
#[inline(always)]
pub fn parse_ipv6(ctx: &XdpContext, l3_off: usize) -> Result<Ipv6Flow, Counter> {
    let ip = ptr_at::<Ipv6Hdr>(ctx, l3_off).ok_or(Counter::PassTruncated)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { *ip };
    if ip.version() != 6 {
        return Err(Counter::PassNotIp);
    }
    let payload = usize::from(u16::from_be(ip.payload_len));
    if l3_off + IPV6_HLEN + payload > ctx.data_end() - ctx.data() {
        return Err(Counter::PassTruncated);
    }
    let l4_min = match ip.nexthdr {
        PROTO_TCP => TCP_MIN_HLEN,
        PROTO_UDP => UDP_HLEN,
        NEXTHDR_FRAGMENT => return Err(Counter::PassFragment),
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH | NEXTHDR_MOBILITY
        | NEXTHDR_HIP | NEXTHDR_SHIM6 => return Err(Counter::PassIpv6Ext),
        _ => return Err(Counter::PassNotVip),
    };
    let l4_off = l3_off + IPV6_HLEN;
    if payload < l4_min || ctx.data() + l4_off + l4_min > ctx.data_end() {
        return Err(Counter::PassTruncated);
    }
    let ports = ptr_at::<Ports>(ctx, l4_off).ok_or(Counter::PassTruncated)?;
    // SAFETY: bounds checked by ptr_at.
    let ports = unsafe { *ports };
    let tcp_syn = if ip.nexthdr == PROTO_TCP {
        let off_flags = ptr_at::<[u8; 2]>(ctx, l4_off + 12).ok_or(Counter::PassTruncated)?;
        // SAFETY: bounds checked by ptr_at.
        let flags = unsafe { (*off_flags)[1] };
        flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    } else {
        false
    };
    let hdr = ptr_at::<Ipv6Hdr>(ctx, l3_off).ok_or(Counter::PassTruncated)?;
    Ok(Ipv6Flow {
        // SAFETY: `hdr` is a whole IPv6 header inside the packet (ptr_at checked it).
        key: unsafe { crate::keys::flow_key_v6(hdr, ports.source, ports.dest, ip.nexthdr) },
        len: (IPV6_HLEN + payload) as u16,
        tc: ip.traffic_class(),
        tcp_syn,
    })
}

/// The balancer's IPv6 path, after the Ethernet header: the counterpart of the IPv4
/// path in `main.rs` (filters, VIP, flow table or ring, tunnel, ICMPv6).
///
/// The ICMPv6 handling, "packet too big" and the tunnel are BPF subprograms of their
/// own that `xdp_lb` calls next when this path returns their continuation
/// (`gate::NEXT_*`; the tunnel's parameters in `fwd`), so that their frames never add
/// up with this one's. `probe`: what the IPv6 short path (`short::established_v6`)
/// found of the packet's flow or VIP (`short::Handoff`), so neither is looked up twice.
#[inline(always)]
pub fn try_lb_v6(
    ctx: &XdpContext,
    l3_off: usize,
    fwd: &mut MaybeUninit<Forward>,
    probe: Probe,
) -> Result<u32, Exit> {
    let l2 = L2 {
        l3_off,
        proto: ETH_P_IPV6,
    };
    // The config, read once for the whole path (as `lb_v4`).
    let config = CONFIG.get(0);
    let filter_flags = config.map_or(0, |c| c.filter_flags);
    let pkt = match parse_ipv6(ctx, l3_off) {
        Ok(pkt) => pkt,
        Err(counter) => {
            // The deny list applies to every IPv6 packet (extension headers, ICMPv6).
            gate::deny(gate::source(ctx, &l2, filter_flags).as_ref(), filter_flags)?;
            return match counter {
                Counter::PassNotVip => Ok(NEXT_ICMP6),
                counter => Err(Exit::Pass(counter)),
            };
        }
    };
    let vip_key = VipKey {
        addr: pkt.key.dst,
        port: pkt.key.dport,
        proto: pkt.key.proto,
        family: FAMILY_V6,
    };
    // As on the IPv4 path (gate::resolve): an established flow's packet finds its VIP
    // through its flow (SERVICES_V6), with no VIP lookup.
    let (vip, established, filter_gen) = gate::resolve::<V6>(
        ctx,
        &l2,
        filter_flags,
        pkt.tcp_syn,
        probe,
        &pkt.key,
        &vip_key,
    )?;
    let cfg = config.ok_or(Exit::Pass(Counter::PassNoSource))?;
    let mtu = cfg.mtu;
    let limits = Limits {
        global: filter_flags & FILTER_F_FLOW_LIMIT != 0,
        service: vip.flags & VIP_F_FLOW_LIMIT != 0,
        max_new_flows: cfg.max_new_flows_per_cpu,
        filter_gen,
    };
    // QUIC short headers naming a live backend go there (quic.rs), as on the IPv4 path.
    let end = l3_off + usize::from(pkt.len);
    let choice = match established {
        Some(choice) => choice,
        None => match quic::backend_at(ctx, &vip, pkt.key.proto, l3_off + IPV6_HLEN, end) {
            Some(id) => quic::choice(id).ok_or(Exit::Drop(DropReason::NoBackend))?,
            None => choose_backend::<V6>(&pkt.key, &pkt.key, &vip, pkt.tcp_syn, limits)
                .map_err(Exit::Drop)?,
        },
    };
    // The tunnel's header length depends on the backend's family, so the MTU check
    // comes after the choice (a packet answered here may have entered the flow table).
    let outer = outer_len(&choice.backend, cfg);
    if mtu != 0 && u32::from(pkt.len) + outer > mtu {
        return Ok(with_mtu(NEXT_TOO_BIG6, mtu - outer));
    }
    let entropy = gue::entropy(cfg, &choice.backend, &pkt.key);
    Forward::fill(fwd, &choice, pkt.len, pkt.tc, true, false, entropy);
    Ok(NEXT_SEND)
}

/// The IPv6 outer header without GUE (6in6, next header 41, or 4in6, next header 4:
/// `inner_v6`) from `source` to the backend at `addr` (backend id `backend_id`) in
/// front of the IP packet at `l3_off` (`inner_len` bytes, traffic class `tc`): the next
/// hop (the agent's entry, else `bpf_fib_lookup`), bytes past the inner packet cut. The
/// interface to send it on. No `mtu` check here. [`tunnel`]'s IPv6 tunnel without GUE,
/// and the IPv6 short path's (`short::established_v6`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn tunnel_in_v6(
    ctx: &XdpContext,
    l3_off: usize,
    inner_len: u16,
    tc: u8,
    inner_v6: bool,
    source: &[u32; 4],
    addr: &[u32; 4],
    backend_id: u32,
) -> Result<u32, Exit> {
    let hop = hop_v6(
        ctx,
        l3_off,
        inner_len,
        inner_len + IPV6_HLEN as u16,
        source,
        addr,
        backend_id,
    )?;
    let outer = Ipv6Hdr {
        vtc_flow: Ipv6Hdr::vtc(tc),
        payload_len: inner_len.to_be(),
        nexthdr: if inner_v6 { IPPROTO_IPV6 } else { IPPROTO_IPIP },
        hop_limit: OUTER_TTL,
        saddr: *source,
        daddr: *addr,
    };
    push_outer(ctx, l3_off, ETH_P_IPV6, &outer, &hop).map_err(Exit::Drop)?;
    Ok(hop.ifindex)
}

/// The next hop towards the IPv6 backend at `addr` (backend id `backend_id`) for an
/// outer packet of `outer_len` bytes from `source` (the agent's entry, else
/// `bpf_fib_lookup`), then the bytes past the inner packet (`inner_len` at `l3_off`)
/// cut: the start of every IPv6 outer header, with or without GUE.
#[inline(always)]
fn hop_v6(
    ctx: &XdpContext,
    l3_off: usize,
    inner_len: u16,
    outer_len: u16,
    source: &[u32; 4],
    addr: &[u32; 4],
    backend_id: u32,
) -> Result<NextHop, Exit> {
    let hop = match nexthop::cached(backend_id, FAMILY_V6, addr, outer_len) {
        Some(hop) => hop?,
        None => next_hop_v6(ctx, source, addr, outer_len)?,
    };
    trim_to(ctx, l3_off + usize::from(inner_len)).map_err(Exit::Drop)?;
    Ok(hop)
}

/// Length of the outer headers towards `backend` as `cfg` tunnels to it: 40 for an
/// IPv6 backend (4in6 / 6in6), 20 for an IPv4 one (IPIP / 6in4); GUE adds 8 (48, 28).
#[inline(always)]
pub fn outer_len(backend: &Backend, cfg: &GlobalConfig) -> u32 {
    if backend.family == FAMILY_V6 {
        IPV6_HLEN as u32 + gue::extra_overhead(cfg)
    } else {
        IPV4_HLEN as u32 + gue::extra_overhead(cfg)
    }
}

/// What [`send`] needs to tunnel a packet and account it, passed by reference (a BPF
/// subprogram takes at most five arguments). 32 bytes: `xdp_lb` holds it in its frame.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Forward {
    /// The backend's address (network order; IPv4 in word 0): the outer destination.
    pub addr: [u32; 4],
    pub backend_id: u32,
    /// The flow's [`lb_common::hash::tunnel_entropy`] when the tunnel uses it (GUE's
    /// source port, `source_ipv4_prefix`'s and `source_ipv6_prefix`'s host bits), else
    /// 0 ([`gue::entropy`]).
    pub entropy: u32,
    /// The inner IP packet's length, host order.
    pub inner_len: u16,
    /// Its TOS / traffic class.
    pub tos: u8,
    /// 1: the inner packet is IPv6.
    pub inner_v6: u8,
    /// 1: an ICMP error about a VIP flow (also counted `icmp_error_forwarded`).
    pub icmp_error: u8,
    /// The backend's family (`FAMILY_*`).
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<Forward>() == 32);

impl Forward {
    /// Write the fields straight into `fwd` (the caller's frame), with no temporary copy
    /// on the writer's stack: in `lb_v4` that copy cost 32 of its bytes. The byte fields
    /// and the padding go in as two 4-byte words: LLVM turned the separate stores of the
    /// 3-byte padding (and its neighbours) into calls of the `memset` subprogram.
    #[inline(always)]
    pub fn fill(
        fwd: &mut MaybeUninit<Forward>,
        choice: &Choice,
        inner_len: u16,
        tos: u8,
        inner_v6: bool,
        icmp_error: bool,
        entropy: u32,
    ) {
        let p = fwd.as_mut_ptr();
        let len = inner_len.to_ne_bytes();
        // SAFETY: `p` points to a Forward-sized, Forward-aligned place (align 4);
        // `inner_len` is at offset 24 and `icmp_error` at 28 (asserted below), so each
        // word store covers exactly its four bytes (`icmp_error`, `family`, padding); with the four field writes before
        // them the whole value is initialised.
        unsafe {
            (&raw mut (*p).addr).write(choice.backend.addr);
            (&raw mut (*p).backend_id).write(choice.backend_id);
            (&raw mut (*p).entropy).write(entropy);
            (&raw mut (*p).inner_len)
                .cast::<u32>()
                .write(u32::from_ne_bytes([
                    len[0],
                    len[1],
                    tos,
                    u8::from(inner_v6),
                ]));
            (&raw mut (*p).icmp_error)
                .cast::<u32>()
                .write(u32::from_ne_bytes([
                    u8::from(icmp_error),
                    choice.backend.family,
                    0,
                    0,
                ]));
        }
    }
}
const _: () = assert!(core::mem::offset_of!(Forward, inner_len) == 24);
const _: () = assert!(core::mem::offset_of!(Forward, tos) == 26);
const _: () = assert!(core::mem::offset_of!(Forward, inner_v6) == 27);
const _: () = assert!(core::mem::offset_of!(Forward, icmp_error) == 28);
const _: () = assert!(core::mem::offset_of!(Forward, family) == 29);

/// Tunnel the IP packet at `l3_off` as `f` says, account it and send it: the verdict,
/// its counter counted. A BPF subprogram (the fib lookup's parameters and the outer
/// header live in its own frame); no `mtu` check here, the caller made it.
#[inline(never)]
pub fn send(ctx: *mut xdp_md, l3_off: usize, f: &Forward) -> u32 {
    let ctx = XdpContext::new(ctx);
    let f = *f;
    let Some(cfg) = CONFIG.get(0) else {
        return finish(Err(Exit::Pass(Counter::PassNoSource)));
    };
    let cfg = *cfg;
    let sent = tunnel(&ctx, l3_off, &f, &cfg).map(|ifindex| {
        // Only now is the packet forwarded: a failed encapsulation is not traffic.
        count_forwarded(f.backend_id, u64::from(f.inner_len));
        if f.icmp_error != 0 {
            count(Counter::IcmpErrorForwarded);
        }
        transmit(&ctx, ifindex)
    });
    finish(sent)
}

/// Encapsulate the IP packet at `l3_off` as `f` says: towards an IPv6 backend in an
/// IPv6 outer header (4in6 / 6in6, whatever `encap` says), towards an IPv4 backend in
/// GUE (`encap = "gue"`, `gue.rs`: IPv4 or IPv6 inner) or IPIP / 6in4, from
/// `source_ipv4` or the flow's address in `source_ipv4_prefix` (IPv6 outer headers:
/// `source_ipv6` or the flow's address in `source_ipv6_prefix`). The interface to send
/// it on. No `mtu` check here.
#[inline(always)]
pub fn tunnel(
    ctx: &XdpContext,
    l3_off: usize,
    f: &Forward,
    cfg: &GlobalConfig,
) -> Result<u32, Exit> {
    let (inner_len, tos, inner_v6) = (f.inner_len, f.tos, f.inner_v6 != 0);
    let backend_id = f.backend_id;
    if f.family == FAMILY_V6 {
        if cfg.source_v6 == [0; 4] {
            return Err(Exit::Pass(Counter::PassNoSource));
        }
        // The flow's outer source: `source_v6`, with `source_ipv6_prefix` the host bits
        // of its last word from the flow's entropy (0 host bits: `source_v6` itself).
        let source = [
            cfg.source_v6[0],
            cfg.source_v6[1],
            cfg.source_v6[2],
            tunnel_source_v6_low(cfg.source_v6[3], cfg.source_v6_host_mask, f.entropy),
        ];
        if cfg.encap != ENCAP_GUE {
            return tunnel_in_v6(
                ctx, l3_off, inner_len, tos, inner_v6, &source, &f.addr, backend_id,
            );
        }
        // GUE over IPv6 (gue.rs): the UDP checksum is computed.
        let extra = gue::UDP_HLEN as u16;
        let outer_len = inner_len + IPV6_HLEN as u16 + extra;
        let hop = hop_v6(
            ctx, l3_off, inner_len, outer_len, &source, &f.addr, backend_id,
        )?;
        let sport = gue_source_port(f.entropy).to_be();
        let udp = gue::udp6_header(
            ctx,
            l3_off,
            inner_len,
            inner_v6,
            &source,
            &f.addr,
            sport,
            cfg.gue_port,
        )?;
        let outer = gue::Gue6Hdr {
            ip: Ipv6Hdr {
                vtc_flow: Ipv6Hdr::vtc(tos),
                payload_len: (inner_len + extra).to_be(),
                nexthdr: PROTO_UDP,
                hop_limit: OUTER_TTL,
                saddr: source,
                daddr: f.addr,
            },
            udp,
        };
        push_outer(ctx, l3_off, ETH_P_IPV6, &outer, &hop).map_err(Exit::Drop)?;
        return Ok(hop.ifindex);
    }
    // Every tunnel towards an IPv4 backend needs the IPv4 source (gue::tunnel_to_v4
    // leaves this check to its callers).
    if cfg.source_v4 == 0 {
        return Err(Exit::Pass(Counter::PassNoSource));
    }
    // GUE (either inner family) and IPIP: as the IPv4 path does it itself (gue.rs).
    if !inner_v6 || cfg.encap == ENCAP_GUE {
        return gue::tunnel_to_v4(
            ctx, l3_off, inner_len, tos, cfg, f.addr[0], backend_id, f.entropy,
        );
    }
    let source = tunnel_source_v4(cfg.source_v4, cfg.source_v4_host_mask, f.entropy);
    // IPv6 in IPv4: the IPIP header with protocol 41.
    let hop = nexthop::next_hop_for_v4(
        ctx,
        backend_id,
        source,
        f.addr[0],
        inner_len + IPV4_HLEN as u16,
    )?;
    let mut outer = outer_ipv4(source, f.addr[0], inner_len, tos);
    let old = u16::from_ne_bytes([outer.ttl, outer.protocol]);
    outer.protocol = IPPROTO_IPV6;
    let new = u16::from_ne_bytes([outer.ttl, outer.protocol]);
    outer.check = csum::replace16(outer.check, old, new);
    trim_to(ctx, l3_off + usize::from(inner_len)).map_err(Exit::Drop)?;
    encap_ipv4(ctx, l3_off, &outer, &hop).map_err(Exit::Drop)?;
    Ok(hop.ifindex)
}

/// `next_hop_v4`'s sibling for IPv6 outer headers: route `src -> dst` (`tot_len`
/// bytes) from the receiving interface, with the same answers and counters.
///
/// The kernel answers `FWD_DISABLED` unless IPv6 forwarding is enabled on the
/// receiving interface (`net.ipv6.conf.<iface>.forwarding`); the agent enables it
/// beside the IPv4 one.
#[inline(always)]
pub fn next_hop_v6(
    ctx: &XdpContext,
    src: &[u32; 4],
    dst: &[u32; 4],
    tot_len: u16,
) -> Result<NextHop, Exit> {
    let mut params = core::mem::MaybeUninit::<FibParams>::uninit();
    let p = zeroed_fib_params(&mut params);
    p.family = AF_INET6;
    p.l4_protocol = IPPROTO_IPV6;
    p.__bindgen_anon_1.tot_len = tot_len;
    p.ifindex = ctx.ingress_ifindex() as u32;
    p.__bindgen_anon_3.ipv6_src = *src;
    p.__bindgen_anon_4.ipv6_dst = *dst;
    // SAFETY: p is a valid, writable bpf_fib_lookup of the size passed.
    let rc = unsafe { bpf_fib_lookup(ctx.as_ptr(), p, size_of::<FibParams>() as i32, 0) };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => Ok(NextHop {
            ifindex: p.ifindex,
            smac: p.smac,
            dmac: p.dmac,
        }),
        BPF_FIB_LKUP_RET_NO_NEIGH => Err(Exit::Pass(Counter::PassNoNeighbour)),
        BPF_FIB_LKUP_RET_BLACKHOLE | BPF_FIB_LKUP_RET_UNREACHABLE | BPF_FIB_LKUP_RET_PROHIBIT => {
            Err(Exit::Drop(DropReason::NoRoute))
        }
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Err(Exit::Drop(DropReason::TooBig)),
        _ => Err(Exit::Pass(Counter::PassFibFailed)),
    }
}

/// `xdp_decap` for what arrives over IPv6: IPv6-in-IPv6 and IPv4-in-IPv6 to a local
/// tunnel address (`DECAP_DSTS`, family 6) lose their outer header; everything else
/// passes untouched.
#[inline(always)]
pub fn decap_v6(ctx: &XdpContext, l2: &L2) -> Result<u32, u32> {
    let ip = ptr_at::<Ipv6Hdr>(ctx, l2.l3_off).ok_or(XDP_PASS)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { *ip };
    if ip.version() != 6 {
        return Err(XDP_PASS);
    }
    let (inner_version, ethertype) = match ip.nexthdr {
        IPPROTO_IPV6 => (6, ETH_P_IPV6),
        IPPROTO_IPIP => (4, ETH_P_IP),
        // GUE over IPv6 (gue.rs).
        PROTO_UDP => return gue::decap_v6(ctx, l2.l3_off, &ip.daddr),
        _ => return Err(XDP_PASS),
    };
    let key = crate::keys::decap_key(ip.daddr, FAMILY_V6);
    // SAFETY: DECAP_DSTS is preallocated; the value is not read.
    if unsafe { DECAP_DSTS.get(key) }.is_none() {
        return Err(XDP_PASS);
    }
    let inner_off = l2.l3_off + IPV6_HLEN;
    let first = ptr_at::<u8>(ctx, inner_off).ok_or(XDP_PASS)?;
    // SAFETY: bounds checked by ptr_at.
    if unsafe { *first } >> 4 != inner_version {
        return Err(XDP_PASS);
    }
    // A whole inner header, as for IPIP and GUE (a stub is not ours to hand up).
    let whole = if inner_version == 6 {
        ptr_at::<Ipv6Hdr>(ctx, inner_off).is_some()
    } else {
        ptr_at::<Ipv4Hdr>(ctx, inner_off).is_some()
    };
    if !whole {
        return Err(XDP_PASS);
    }
    strip_outer(ctx, l2.l3_off, IPV6_HLEN as i32, ethertype)
        .map_err(|()| aya_ebpf::bindings::xdp_action::XDP_ABORTED)?;
    count(Counter::Decap);
    Ok(XDP_PASS)
}

/// `xdp_decap` for IPv6 in IPv4 (protocol 41; the outer header checked by the caller:
/// 20 bytes, not a fragment, to a local tunnel address).
#[inline(always)]
pub fn decap_6in4(ctx: &XdpContext, l2: &L2) -> Result<u32, u32> {
    // A whole inner IPv6 header, as for IPIP and GUE.
    let inner = ptr_at::<Ipv6Hdr>(ctx, l2.l3_off + IPV4_HLEN).ok_or(XDP_PASS)?;
    // SAFETY: bounds checked by ptr_at.
    if unsafe { (*inner).version() } != 6 {
        return Err(XDP_PASS);
    }
    strip_outer(ctx, l2.l3_off, IPV4_HLEN as i32, ETH_P_IPV6)
        .map_err(|()| aya_ebpf::bindings::xdp_action::XDP_ABORTED)?;
    count(Counter::Decap);
    Ok(XDP_PASS)
}

/// Remove `len` bytes of outer header at `l3_off`, moving the Ethernet header (and its
/// VLAN tag) forward; what follows is of EtherType `ethertype` (network order). Also
/// GUE's decapsulation (`gue.rs`).
#[inline(always)]
pub(crate) fn strip_outer(
    ctx: &XdpContext,
    l3_off: usize,
    len: i32,
    ethertype: u16,
) -> Result<(), ()> {
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(())?;
    // SAFETY: bounds checked by ptr_at.
    let mut eth_copy = unsafe { *eth };
    let vlan_copy = if l3_off == ETH_HLEN + VLAN_HLEN {
        let vlan = ptr_at::<VlanHdr>(ctx, ETH_HLEN).ok_or(())?;
        // SAFETY: bounds checked by ptr_at.
        let mut v = unsafe { *vlan };
        v.proto = ethertype;
        Some(v)
    } else {
        eth_copy.proto = ethertype;
        None
    };
    // SAFETY: ctx.ctx is the program's xdp_md.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, len) } != 0 {
        return Err(());
    }
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(())?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { *eth = eth_copy };
    if let Some(v) = vlan_copy {
        let vlan = ptr_at::<VlanHdr>(ctx, ETH_HLEN).ok_or(())?;
        // SAFETY: bounds checked by ptr_at.
        unsafe { *vlan = v };
    }
    Ok(())
}

/// Is the IPv4 header at `l3_off` (read by the caller) a plain 20-byte, unfragmented
/// IPv6-in-IPv4 header? (For `xdp_decap`.)
#[inline(always)]
pub fn is_6in4(ip: &Ipv4Hdr) -> bool {
    ip.version_ihl == 0x45 && ip.protocol == IPPROTO_IPV6 && ip.frag_off & 0x3fffu16.to_be() == 0
}
