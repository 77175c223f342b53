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
//! - UDP checksum 0: allowed over IPv4 (RFC 768; RFC 8086 section 3.2 for tunnels);
//!   the inner packet keeps its own checksums, which the backend's stack verifies.
//!   Over IPv6 a tunnel checksum is required unless the receiver opts in (RFC 6935):
//!   an IPv6 outer header must compute it.
//! - Outer source: `source_ipv4`, or with `source_ipv4_prefix` the prefix's address
//!   with its host bits from the flow's entropy ([`lb_common::hash::tunnel_source_v4`]),
//!   as Katran varies its IPIP source within a /16.
//!
//! Where it is built: `xdp_lb`'s IPv4 path tunnels plain IPIP from one source itself
//! (the established flow's cheap case); with GUE or a source prefix it fills an
//! `ipv6::Forward` with the flow's entropy and returns `gate::NEXT_SEND`, and
//! `ipv6::send` (a sibling subprogram, whose frame holds the fib lookup and the outer
//! headers) calls [`encap_v4`]. So do the IPv6 path (IPv6 inner packets over IPv4 GUE,
//! version nibble 0110) and forwarded ICMP errors.
//!
//! Not done: GUE with an outer IPv6 header. Over IPv6 the UDP checksum is required
//! (RFC 6935/6936 allow a zero one only to receivers that opt in), which means summing
//! the whole inner packet in XDP; IPv6 backends keep their IPv6 outer header (4in6,
//! 6in6) whatever `encap` says, and their decapsulator takes those. [`decap_v4`]
//! already hands inner IPv6 packets to the stack.

use aya_ebpf::{
    bindings::xdp_action::{XDP_ABORTED, XDP_PASS},
    helpers::generated::bpf_xdp_adjust_head,
    programs::XdpContext,
};
use lb_common::{
    hash::tunnel_entropy,
    stats::{Counter, DropReason},
    types::{Backend, ENCAP_GUE, FAMILY_V4, FlowKey, GlobalConfig, PROTO_UDP},
};

use crate::{
    encap::{Exit, outer_ipv4_proto, trim_to},
    nexthop::next_hop_for_v4,
    parsing::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, EthHdr, IPV4_HLEN, Ipv4Hdr, ptr_at},
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

/// Does `cfg` tunnel towards IPv4 backends other than by plain IPIP from one source
/// (GUE, or a `source_ipv4_prefix`)? Then the path hands the packet to `ipv6::send`
/// with the flow's [`entropy`]; otherwise it tunnels IPIP itself, computing nothing.
#[inline(always)]
pub fn needs_send(cfg: &GlobalConfig) -> bool {
    cfg.encap == ENCAP_GUE || cfg.source_v4_host_mask != 0
}

/// The flow's tunnel entropy when the tunnel towards `backend` uses it (an IPv4
/// backend, GUE or a source prefix), else 0 (nothing computed).
#[inline(always)]
pub fn entropy(cfg: &GlobalConfig, backend: &Backend, key: &FlowKey) -> u32 {
    if backend.family == FAMILY_V4 && needs_send(cfg) {
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
    let outer = outer_ipv4_proto(source, backend, inner_len + UDP_HLEN as u16, tos, PROTO_UDP);
    trim_to(ctx, l3_off + usize::from(inner_len)).map_err(Exit::Drop)?;
    let failed = Exit::Drop(DropReason::EncapFailed);
    let grow = (ETH_HLEN + IPV4_HLEN + UDP_HLEN) as i32 - l3_off as i32;
    // SAFETY: ctx.ctx is the program's xdp_md.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -grow) } != 0 {
        return Err(failed);
    }
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(failed)?;
    let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN).ok_or(failed)?;
    let uh = ptr_at::<UdpHdr>(ctx, ETH_HLEN + IPV4_HLEN).ok_or(failed)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        *eth = EthHdr {
            dst: hop.dmac,
            src: hop.smac,
            proto: ETH_P_IP,
        };
        *ip = outer;
        *uh = udp_header(sport, dport, inner_len);
    }
    Ok(hop.ifindex)
}

/// `xdp_decap`'s GUE branch, for an outer IPv4 header at `l3_off` (20 bytes, no
/// fragment bits, protocol UDP, checked by the caller) addressed to `daddr`: a UDP
/// packet to `gue_port` at a tunnel address (`DECAP_DSTS`) whose payload starts with
/// an IPv4 or IPv6 header loses its outer IP and UDP headers and goes to the stack
/// as that inner packet. Anything else (another port, another address, a payload
/// that is no IP packet) passes untouched: it is the host's own UDP.
#[inline(always)]
pub fn decap_v4(ctx: &XdpContext, l3_off: usize, daddr: u32) -> Result<u32, u32> {
    let udp = ptr_at::<UdpHdr>(ctx, l3_off + IPV4_HLEN).ok_or(XDP_PASS)?;
    let port = crate::maps::CONFIG.get(0).map_or(0, |c| c.gue_port);
    // SAFETY: bounds checked by ptr_at.
    if port == 0 || unsafe { (*udp).dest } != port {
        return Err(XDP_PASS);
    }
    let key = crate::keys::decap_key([daddr, 0, 0, 0], FAMILY_V4);
    // SAFETY: DECAP_DSTS is preallocated; the value is not read.
    if unsafe { crate::maps::DECAP_DSTS.get(key) }.is_none() {
        return Err(XDP_PASS);
    }
    let inner_off = l3_off + IPV4_HLEN + UDP_HLEN;
    let first = ptr_at::<u8>(ctx, inner_off).ok_or(XDP_PASS)?;
    // SAFETY: bounds checked by ptr_at.
    let inner_proto = match unsafe { *first } >> 4 {
        4 if ptr_at::<Ipv4Hdr>(ctx, inner_off).is_some() => ETH_P_IP,
        6 if ptr_at::<[u8; 40]>(ctx, inner_off).is_some() => ETH_P_IPV6,
        _ => return Err(XDP_PASS),
    };
    crate::ipv6::strip_outer(ctx, l3_off, (IPV4_HLEN + UDP_HLEN) as i32, inner_proto)
        .map_err(|()| XDP_ABORTED)?;
    count(Counter::DecapGue);
    Ok(XDP_PASS)
}
