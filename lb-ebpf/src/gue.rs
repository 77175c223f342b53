//! GUE (`dataplane.encap = "gue"`): IPv4 packets tunnelled in UDP towards a backend,
//! the backend side that removes the outer headers again, and the per-flow outer
//! source address (`dataplane.source_ipv4_prefix`, for IPIP and GUE alike).
//!
//! Wire format: Katran's "GUE variant 1" (draft-ietf-intarea-gue, section 4): Ethernet,
//! an outer IPv4 header (protocol 17, TTL 64, the inner TOS, checksum computed, no
//! fragment bits), an 8-byte UDP header to `gue_port`, then the inner IP packet as the
//! client sent it, with no GUE header. The first two bits after the UDP header tell
//! variant 1 apart: they are the start of the inner IP version (0100 for IPv4, 0110
//! for IPv6). Overhead: 28 bytes over IPv4, counted in the `mtu` check.
//!
//! - UDP source port: 49152 + 14 bits of the flow's entropy
//!   ([`lb_common::hash::gue_source_port`]), so the backends' NICs spread flows over
//!   their receive queues (RSS hashes the outer 4-tuple) and a flow stays on one.
//! - UDP checksum 0 over IPv4: allowed (RFC 768; RFC 8086 section 3.2 for tunnels);
//!   the inner packet keeps its own checksums, which the backend's stack verifies.
//!   Over IPv6 it is computed (below).
//! - Outer source: `source_ipv4`, or with `source_ipv4_prefix` the prefix's address
//!   with its host bits from the flow's entropy ([`lb_common::hash::tunnel_source_v4`]),
//!   as Katran varies its IPIP source within a /16. Towards IPv6 backends (6in6,
//!   4in6, GUE over IPv6) likewise `source_ipv6`, or with `source_ipv6_prefix` the
//!   prefix's address with the host bits of its last 32 bits from the flow's entropy
//!   ([`lb_common::hash::tunnel_source_v6_low`]), as Katran's IPv6 IPIP source varies.
//!
//! Where it is built: [`tunnel_to_v4`], the tunnel towards an IPv4 backend (GUE or
//! IPIP, from `source_ipv4` or the flow's address in the prefix). `xdp_lb`'s IPv4 path
//! calls it itself for its IPv4 backends (issue 12: handing an established GUE flow to
//! the `ipv6::send` subprogram through an `ipv6::Forward` cost it the hand-over, the
//! copies of the `Forward` and the config, and a second config lookup); `ipv6::send` (a
//! sibling subprogram, whose frame holds the fib lookup and the outer headers) calls it
//! for the IPv6 path (IPv6 inner packets over IPv4 GUE, version nibble 0110) and
//! forwarded ICMP errors.
//!
//! GUE over IPv6 (IPv6 backends): Ethernet, an outer IPv6 header (next header 17, hop
//! limit 64, the inner traffic class, flow label 0, `source_ipv6`), the 8-byte UDP
//! header with the same source port rule, the inner packet. Overhead 48 bytes. Over
//! IPv6 the UDP checksum is required (RFC 8200 8.1; RFC 6935/6936 zero checksums are
//! for receivers that opt in, and Linux's fou6 does not by default), so it is computed
//! ([`udp6_header`]): from the inner packet's headers when its transport checksum is
//! complete (TCP, UDP with a checksum, ICMPv6: Linux's `lco_csum`, Katran's
//! `gue_csum_v6`), else by summing the inner bytes ([`csum::sum_packet`]).
//! [`decap_v6`] takes GUE over IPv6 on the backends.

use aya_ebpf::{
    bindings::xdp_action::{XDP_ABORTED, XDP_PASS},
    programs::XdpContext,
};
use lb_common::{
    hash::{gue_source_port, tunnel_entropy, tunnel_source_v4},
    stats::{Counter, DropReason},
    types::{
        Backend, DecapKey, ENCAP_GUE, FAMILY_V4, FAMILY_V6, FlowKey, GlobalConfig, PROTO_TCP,
        PROTO_UDP,
    },
};

use crate::{
    csum,
    encap::{Exit, outer_ipv4_proto, push_outer, trim_to, tunnel_v4},
    ipv6::{IPPROTO_ICMPV6, IPV6_HLEN, Ipv6Hdr},
    nexthop::next_hop_for_v4,
    parsing::{ETH_P_IP, ETH_P_IPV6, IPV4_HLEN, Ipv4Hdr, ptr_at},
    stats::count,
};

/// Length of a UDP header.
pub const UDP_HLEN: usize = 8;
/// What GUE adds beyond IPIP's 20-byte outer header: the UDP header.
pub const GUE_EXTRA: u32 = UDP_HLEN as u32;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct UdpHdr {
    /// Network order.
    pub source: u16,
    /// Network order.
    pub dest: u16,
    /// Network order: header and payload.
    pub len: u16,
    pub check: u16,
}
const _: () = assert!(core::mem::size_of::<UdpHdr>() == UDP_HLEN);

/// Bytes the configured tunnel adds beyond IPIP's outer header: 8 for GUE, else 0.
/// The `mtu` check and the next-hop MTU of "fragmentation needed" subtract it.
#[inline(always)]
pub fn extra_overhead(cfg: &GlobalConfig) -> u32 {
    if cfg.encap == ENCAP_GUE { GUE_EXTRA } else { 0 }
}

/// A GUE UDP header for `payload_len` bytes of inner packet, ports in network order,
/// checksum 0 (IPv4; see the module docs).
#[inline(always)]
pub fn udp_header(source: u16, dest: u16, payload_len: u16) -> UdpHdr {
    UdpHdr {
        source,
        dest,
        len: (payload_len + UDP_HLEN as u16).to_be(),
        check: 0,
    }
}

/// Does `cfg`'s tunnel towards IPv4 backends use the flow's [`entropy`] (GUE's source
/// port, a `source_ipv4_prefix`)? Otherwise (IPIP from one source) nothing is computed.
#[inline(always)]
pub fn needs_entropy(cfg: &GlobalConfig) -> bool {
    cfg.encap == ENCAP_GUE || cfg.source_v4_host_mask != 0
}

/// Tunnel the IP packet at `l3_off` (`inner_len` bytes, TOS / traffic class `tos`; an
/// IPv6 one only with GUE) to the IPv4 backend `backend` (backend id `backend_id`) as
/// `cfg` says: GUE ([`encap_v4`]) or IPIP (`encap::tunnel_v4`), from `source_ipv4` or
/// the flow's address in `source_ipv4_prefix` (`entropy`: the flow's
/// `tunnel_entropy` when [`needs_entropy`], else unused). The interface to send it on.
/// No `mtu` check here, nor of `cfg.source_v4`: the callers pass up a packet without
/// an IPv4 source (`pass_no_source`) before (issue 12, item 2: it was checked twice on
/// the IPv4 path).
#[expect(
    clippy::too_many_arguments,
    reason = "inlined into lb_v4 and ipv6::tunnel; no struct to copy"
)]
#[inline(always)]
pub fn tunnel_to_v4(
    ctx: &XdpContext,
    l3_off: usize,
    inner_len: u16,
    tos: u8,
    cfg: &GlobalConfig,
    backend: u32,
    backend_id: u32,
    entropy: u32,
) -> Result<u32, Exit> {
    let source = tunnel_source_v4(cfg.source_v4, cfg.source_v4_host_mask, entropy);
    if cfg.encap == ENCAP_GUE {
        let sport = gue_source_port(entropy).to_be();
        return encap_v4(
            ctx,
            l3_off,
            inner_len,
            tos,
            source,
            backend,
            backend_id,
            sport,
            cfg.gue_port,
        );
    }
    tunnel_v4(ctx, l3_off, inner_len, tos, source, backend, backend_id)
}

/// The flow's tunnel entropy when the tunnel towards `backend` uses it (GUE, or a
/// source prefix of the backend's family), else 0 (nothing computed).
#[inline(always)]
pub fn entropy(cfg: &GlobalConfig, backend: &Backend, key: &FlowKey) -> u32 {
    if (backend.family == FAMILY_V4 && needs_entropy(cfg))
        || (backend.family == FAMILY_V6 && (cfg.encap == ENCAP_GUE || cfg.source_v6_host_mask != 0))
    {
        tunnel_entropy(key)
    } else {
        0
    }
}

/// Encapsulate the IP packet at `l3_off` (`inner_len` bytes, TOS / traffic class
/// `tos`, IPv4 or IPv6: variant 1 tells them apart by the version nibble) in outer
/// IPv4 `source -> backend` (backend id `backend_id`, for its next hop) + UDP `sport -> dport` (network order); the interface to
/// send it on. No `mtu` check here.
#[expect(
    clippy::too_many_arguments,
    reason = "inlined into ipv6::tunnel; no struct to copy"
)]
#[inline(always)]
pub fn encap_v4(
    ctx: &XdpContext,
    l3_off: usize,
    inner_len: u16,
    tos: u8,
    source: u32,
    backend: u32,
    backend_id: u32,
    sport: u16,
    dport: u16,
) -> Result<u32, Exit> {
    // The agent's next hop for the backend (`NEXT_HOPS`), else bpf_fib_lookup.
    let hop = next_hop_for_v4(
        ctx,
        backend_id,
        source,
        backend,
        inner_len + (IPV4_HLEN + UDP_HLEN) as u16,
    )?;
    let outer = Gue4Hdr {
        ip: outer_ipv4_proto(source, backend, inner_len + UDP_HLEN as u16, tos, PROTO_UDP),
        udp: udp_header(sport, dport, inner_len),
    };
    trim_to(ctx, l3_off + usize::from(inner_len)).map_err(Exit::Drop)?;
    push_outer(ctx, l3_off, ETH_P_IP, &outer, &hop).map_err(Exit::Drop)?;
    Ok(hop.ifindex)
}

/// GUE's outer headers over IPv4: IPv4 + UDP, written by `encap::push_outer` in one go.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Gue4Hdr {
    pub ip: Ipv4Hdr,
    pub udp: UdpHdr,
}
const _: () = assert!(core::mem::size_of::<Gue4Hdr>() == IPV4_HLEN + UDP_HLEN);

/// GUE's outer headers over IPv6: IPv6 + UDP (48 bytes).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Gue6Hdr {
    pub ip: Ipv6Hdr,
    pub udp: UdpHdr,
}
const _: () = assert!(core::mem::size_of::<Gue6Hdr>() == IPV6_HLEN + UDP_HLEN);

/// The GUE UDP header over IPv6 for the inner packet at `l3_off` (`inner_len` bytes,
/// IPv6 when `inner_v6`), ports in network order, from `src` to `dst`: its checksum
/// is required over IPv6 (RFC 8200 8.1; RFC 6935/6936 zero checksums only for
/// receivers that opt in, and Linux's fou6 does not by default), so it is computed
/// here: the pseudo header, the UDP header and the inner packet.
///
/// The inner packet's sum comes from its headers alone when its own transport
/// checksum is complete (Linux's local checksum offload, `lco_csum`, and Katran's
/// `gue_csum_v6`): a TCP segment, a UDP datagram with a checksum, or an ICMPv6
/// message sums, with its pseudo header, to zero, so the segment's sum is the
/// negated sum of the pseudo header; add the inner IP header (20 or 40 bytes, summed
/// from the packet). Otherwise (ICMPv4, UDP over IPv4 without checksum, IPv4 with
/// options) the bytes are summed ([`csum::sum_packet`]). A client packet whose inner
/// checksum is wrong gets a wrong outer checksum too: the backend's stack drops it at
/// the outer UDP header instead of at the inner TCP one.
#[expect(
    clippy::too_many_arguments,
    reason = "inlined into ipv6::tunnel; no struct to copy"
)]
#[inline(always)]
pub fn udp6_header(
    ctx: &XdpContext,
    l3_off: usize,
    inner_len: u16,
    inner_v6: bool,
    src: &[u32; 4],
    dst: &[u32; 4],
    sport: u16,
    dport: u16,
) -> Result<UdpHdr, Exit> {
    let inner = inner_sum(ctx, l3_off, inner_len, inner_v6)?;
    let udp_len = inner_len + UDP_HLEN as u16;
    let sum = csum::pseudo6(src, dst, udp_len, PROTO_UDP)
        + u64::from(sport)
        + u64::from(dport)
        + u64::from(udp_len.to_be())
        + inner;
    // A computed 0 goes out as 0xffff (RFC 768): 0 would mean "no checksum".
    let check = match !csum::fold64(sum) {
        0 => 0xffff,
        c => c,
    };
    Ok(UdpHdr {
        source: sport,
        dest: dport,
        len: udp_len.to_be(),
        check,
    })
}

/// The ones' complement sum (not folded) of the IP packet at `l3_off` (`len` bytes):
/// see [`udp6_header`].
#[inline(always)]
fn inner_sum(ctx: &XdpContext, l3_off: usize, len: u16, v6: bool) -> Result<u64, Exit> {
    let failed = Exit::Drop(DropReason::EncapFailed);
    let whole = || match csum::sum_packet(ctx.ctx, l3_off, usize::from(len)) {
        u64::MAX => Err(failed),
        s => Ok(s),
    };
    if v6 {
        let ip = ptr_at::<Ipv6Hdr>(ctx, l3_off).ok_or(failed)?;
        if usize::from(len) < IPV6_HLEN {
            return Err(failed);
        }
        let l4_len = len - IPV6_HLEN as u16;
        // SAFETY: bounds checked by ptr_at.
        let next = unsafe { (*ip).nexthdr };
        if !complete(ctx, l3_off + IPV6_HLEN, next, true) {
            return whole();
        }
        // SAFETY: bounds checked by ptr_at; the addresses are read in place.
        let pseudo = unsafe { csum::pseudo6(&(*ip).saddr, &(*ip).daddr, l4_len, next) };
        return Ok(csum::csum_diff(ip.cast(), IPV6_HLEN as u32) + u64::from(!csum::fold64(pseudo)));
    }
    let ip = ptr_at::<Ipv4Hdr>(ctx, l3_off).ok_or(failed)?;
    // SAFETY: bounds checked by ptr_at.
    let (vihl, proto, saddr, daddr) =
        unsafe { ((*ip).version_ihl, (*ip).protocol, (*ip).saddr, (*ip).daddr) };
    if vihl != 0x45
        || usize::from(len) < IPV4_HLEN
        || !complete(ctx, l3_off + IPV4_HLEN, proto, false)
    {
        return whole();
    }
    let pseudo = csum::pseudo4(saddr, daddr, len - IPV4_HLEN as u16, proto);
    Ok(csum::csum_diff(ip.cast(), IPV4_HLEN as u32) + u64::from(!csum::fold64(pseudo)))
}

/// Does the transport header at `l4_off` (protocol `proto`) carry a complete checksum
/// that covers a pseudo header? TCP, UDP with a non-zero checksum, ICMPv6.
#[inline(always)]
fn complete(ctx: &XdpContext, l4_off: usize, proto: u8, v6: bool) -> bool {
    match proto {
        PROTO_TCP => true,
        PROTO_UDP => ptr_at::<UdpHdr>(ctx, l4_off)
            // SAFETY: bounds checked by ptr_at.
            .is_some_and(|u| unsafe { (*u).check } != 0),
        IPPROTO_ICMPV6 => v6,
        _ => false,
    }
}

/// `xdp_decap`'s GUE branch, for an outer IPv4 header at `l3_off` (20 bytes, no
/// fragment bits, protocol UDP, checked by the caller) addressed to `daddr`: a UDP
/// packet to `gue_port` at a tunnel address (`DECAP_DSTS`) whose payload starts with
/// an IPv4 or IPv6 header loses its outer IP and UDP headers and goes to the stack
/// as that inner packet. Anything else (another port, another address, a payload
/// that is no IP packet) passes untouched: it is the host's own UDP.
#[inline(always)]
pub fn decap_v4(ctx: &XdpContext, l3_off: usize, daddr: u32) -> Result<u32, u32> {
    decap(
        ctx,
        l3_off,
        IPV4_HLEN,
        crate::keys::decap_key([daddr, 0, 0, 0], FAMILY_V4),
    )
}

/// `xdp_decap`'s GUE branch over IPv6: the outer IPv6 header at `l3_off` (40 bytes,
/// next header UDP, checked by the caller) addressed to `daddr`; as [`decap_v4`]
/// otherwise. The outer UDP checksum is not verified here: the inner packet's own
/// checksums (TCP, UDP, ICMPv6 with its pseudo header; IPv4's header checksum) are
/// verified by the backend's stack after decapsulation and cover everything it
/// delivers; what only the outer checksum covers (the outer addresses and ports)
/// decided nothing but that this host decapsulates. A zero checksum is accepted too.
#[inline(always)]
pub fn decap_v6(ctx: &XdpContext, l3_off: usize, daddr: &[u32; 4]) -> Result<u32, u32> {
    decap(
        ctx,
        l3_off,
        IPV6_HLEN,
        crate::keys::decap_key(*daddr, FAMILY_V6),
    )
}

/// Both families of [`decap_v4`] / [`decap_v6`]: the outer IP header (`outer_len` bytes
/// at `l3_off`) is followed by UDP; `key` is the outer destination's `DECAP_DSTS` key.
#[inline(always)]
fn decap(ctx: &XdpContext, l3_off: usize, outer_len: usize, key: DecapKey) -> Result<u32, u32> {
    let udp = ptr_at::<UdpHdr>(ctx, l3_off + outer_len).ok_or(XDP_PASS)?;
    let port = crate::maps::CONFIG.get(0).map_or(0, |c| c.gue_port);
    // SAFETY: bounds checked by ptr_at.
    if port == 0 || unsafe { (*udp).dest } != port {
        return Err(XDP_PASS);
    }
    // SAFETY: DECAP_DSTS is preallocated; the value is not read.
    if unsafe { crate::maps::DECAP_DSTS.get(key) }.is_none() {
        return Err(XDP_PASS);
    }
    let inner_off = l3_off + outer_len + UDP_HLEN;
    let first = ptr_at::<u8>(ctx, inner_off).ok_or(XDP_PASS)?;
    // SAFETY: bounds checked by ptr_at.
    let inner_proto = match unsafe { *first } >> 4 {
        4 if ptr_at::<Ipv4Hdr>(ctx, inner_off).is_some() => ETH_P_IP,
        6 if ptr_at::<Ipv6Hdr>(ctx, inner_off).is_some() => ETH_P_IPV6,
        _ => return Err(XDP_PASS),
    };
    crate::ipv6::strip_outer(ctx, l3_off, (outer_len + UDP_HLEN) as i32, inner_proto)
        .map_err(|()| XDP_ABORTED)?;
    count(Counter::DecapGue);
    Ok(XDP_PASS)
}
