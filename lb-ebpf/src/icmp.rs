//! ICMP for VIP addresses, and the ICMP "fragmentation needed" the balancer sends.
//!
//! What arrives for a VIP address (`VIP_ADDRS`, any port):
//! - an echo request to an address with an L4 service: answered from XDP (echo reply,
//!   addresses and MACs swapped, checksum updated incrementally), `icmp_echo_reply`;
//! - a destination unreachable (any code; "fragmentation needed" is the one that
//!   matters) whose quoted packet is a reply of a flow of an L4 service, VIP:port ->
//!   client: with direct server return the backend sent that reply from the VIP, so a
//!   router between the backend and the client addresses its error to the VIP, which
//!   routes to this node. The error is tunnelled whole to the backend that owns the
//!   flow (found as a packet of the flow would find it: the embedded header swapped to
//!   client -> VIP), whose stack then learns the path MTU towards the client
//!   (`icmp_error_forwarded`, with `tx` / `redirect`). This is Katran's handling.
//!   Errors about the other directions are not addressed to a VIP: client -> VIP
//!   errors go to the client, and errors on the tunnel to the backend go to the
//!   tunnel source address (the kernel's), which [`too_big_v4`] makes rare anyway.
//! - anything else: dropped (`icmp_unhandled`), because an L4 VIP address is not the
//!   kernel's (passed up, it would be routed back out); on an address that also
//!   carries an L7 service (the address is local) it is passed up (`pass_l7`), and
//!   errors about the L7 service's connections go up as well.
//!   A quoted packet that is cut short or malformed is dropped (`icmp_bad_quote`):
//!   never guessed at.
//!
//! What the balancer sends itself: a VIP packet with DF set that would exceed
//! `dataplane.mtu` once encapsulated is answered with ICMP destination unreachable,
//! "fragmentation needed" (type 3, code 4, RFC 792 / RFC 1191), from the VIP, with
//! next-hop MTU = `mtu` - 20 (the tunnel header; `mtu` - 28 with GUE) and the
//! offending packet's IP header and first 8 bytes; DF clear, it is dropped as `too_big` (the tunnel cannot
//! fragment: there is no IPIP device here, and the kernel does not own an L4 VIP).
//! Each CPU sends at most `dataplane.icmp_errors_per_cpu` of these per second (both
//! families together, [`error_allowed`]); above it the packet is dropped unanswered
//! as `icmp_error_limited`.
//!
//! ICMPv6 is `icmp6.rs`, function for function. An error about the flow of a VIP whose
//! backend is IPv6 goes to it in IPv4-in-IPv6 (`ipv6::send`).

use core::mem::{MaybeUninit, transmute};

use aya_ebpf::{
    bindings::{xdp_action::XDP_TX, xdp_md},
    helpers::generated::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    maps::lpm_trie::Key,
    programs::XdpContext,
};
use lb_common::{
    stats::{Counter, DropReason},
    types::{
        FAMILY_V4, FILTER_F_ALLOW, FilterAddr, FlowKey, PROTO_ICMP, PROTO_TCP, PROTO_UDP,
        VIP_ADDR_F_L4, VIP_ADDR_F_LOCAL, VIP_F_L7,
    },
};

use crate::{
    csum,
    encap::{Exit, OUTER_TTL},
    filter,
    gate::{NEXT_SEND, finish},
    gue, hashing, ipv6, limit,
    maps::{CONFIG, ICMP_RATE, VIP_ADDRS, VIPS_V4},
    parsing::{
        ETH_HLEN, ETH_P_IP, EthHdr, IPV4_HLEN, Ipv4Hdr, L2, Ports, VLAN_HLEN, VlanHdr, ptr_at,
    },
    stats::count,
};

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
/// Code of [`ICMP_DEST_UNREACH`]: fragmentation needed and DF set.
pub const ICMP_FRAG_NEEDED: u8 = 4;
pub const ICMP_ECHO: u8 = 8;
pub const ICMP_HLEN: usize = 8;
/// The least an ICMPv4 error about a flow quotes of the offending packet: its 20-byte header and the
/// first 8 bytes after it (the ports).
pub const QUOTE_LEN: usize = IPV4_HLEN + 8;
/// The most of the invoking packet "fragmentation needed" quotes: what fits in 576
/// bytes with the new IP and ICMP headers (RFC 1812 4.3.2.3).
pub const MAX_QUOTE_LEN: usize = 576 - IPV4_HLEN - ICMP_HLEN;
/// Type of service of the errors the balancer sends: precedence "internetwork
/// control", as Linux sends its own.
const ERROR_TOS: u8 = 0xc0;
/// Don't-fragment bit and fragment offset mask of `frag_off`, network order.
const IP_DF: u16 = 0x4000u16.to_be();
const IP_OFFSET: u16 = 0x1fffu16.to_be();

/// The first 8 bytes of every ICMP message.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IcmpHdr {
    pub kind: u8,
    pub code: u8,
    pub check: u16,
    /// Identifier and sequence (echo), unused and next-hop MTU (fragmentation
    /// needed), network order.
    pub rest: [u16; 2],
}

/// [`handle_v4`] as a BPF subprogram (`gate::NEXT_ICMP4`, a sibling of the IPv4 path):
/// the verdict, its counter counted, or `NEXT_SEND` with `fwd` written. The global deny
/// list was applied by the path; the allow list is applied here.
#[inline(never)]
pub fn handle(ctx: *mut xdp_md, l3_off: usize, fwd: &mut MaybeUninit<ipv6::Forward>) -> u32 {
    let ctx = XdpContext::new(ctx);
    let filter_flags = CONFIG.get(0).map_or(0, |c| c.filter_flags);
    let src = if filter_flags & FILTER_F_ALLOW != 0 {
        let l2 = L2 {
            l3_off,
            proto: ETH_P_IP,
        };
        filter::source(&ctx, &l2)
    } else {
        None
    };
    finish(handle_v4(&ctx, l3_off, filter_flags, src.as_ref(), fwd))
}

/// [`too_big_v4`] as a BPF subprogram (`gate::NEXT_TOO_BIG4`): the verdict, counted.
#[inline(never)]
pub fn too_big(ctx: *mut xdp_md, l3_off: usize, mtu: u32) -> u32 {
    finish(too_big_v4(&XdpContext::new(ctx), l3_off, mtu))
}

/// An ICMP packet (20-byte header, not a fragment: checked by `parse_ipv4` before it
/// said "not TCP/UDP") to a VIP address; anything else returns `pass_not_vip` as before.
/// `src` is the source's filter key when a source filter is in use: the global allow
/// list guards VIP addresses for ICMP as for TCP and UDP (a service's own lists are
/// not consulted: an error comes from a router, not from the service's clients).
#[inline(always)]
pub fn handle_v4(
    ctx: &XdpContext,
    l3_off: usize,
    filter_flags: u32,
    src: Option<&Key<FilterAddr>>,
    fwd: &mut MaybeUninit<ipv6::Forward>,
) -> Result<u32, Exit> {
    let ip_ptr = ptr_at::<Ipv4Hdr>(ctx, l3_off).ok_or(Exit::Pass(Counter::PassTruncated))?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { *ip_ptr };
    if ip.protocol != PROTO_ICMP || ip.version_ihl != 0x45 {
        return Err(Exit::Pass(Counter::PassNotVip));
    }
    let key = crate::keys::vip_addr_key([ip.daddr, 0, 0, 0], FAMILY_V4);
    // SAFETY: VIP_ADDRS is preallocated; values are plain u32 written whole.
    let flags = *unsafe { VIP_ADDRS.get(key) }.ok_or(Exit::Pass(Counter::PassNotVip))?;
    if let Some(src) = src {
        if filter_flags & FILTER_F_ALLOW != 0 {
            filter::check_allow(src)?;
        }
    }
    let local = flags & VIP_ADDR_F_LOCAL != 0;
    if flags & VIP_ADDR_F_L4 == 0 {
        // Only L7 services here: the address is the kernel's, and so is its ICMP.
        return Err(Exit::Pass(Counter::PassL7));
    }
    let tot_len = usize::from(u16::from_be(ip.tot_len));
    let icmp_off = l3_off + IPV4_HLEN;
    let icmp_ptr = ptr_at::<IcmpHdr>(ctx, icmp_off).ok_or(Exit::Pass(Counter::PassTruncated))?;
    if tot_len < IPV4_HLEN + ICMP_HLEN {
        return Err(Exit::Pass(Counter::PassTruncated));
    }
    // SAFETY: bounds checked by ptr_at.
    let icmp = unsafe { *icmp_ptr };
    match icmp.kind {
        ICMP_DEST_UNREACH => match forward_error_v4(ctx, l3_off, &ip, tot_len, fwd) {
            Err(Exit::Drop(DropReason::IcmpBadQuote | DropReason::IcmpUnhandled)) if local => {
                Err(Exit::Pass(Counter::PassL7))
            }
            other => other,
        },
        ICMP_ECHO if icmp.code == 0 && !local => echo_reply_v4(ctx, ip_ptr, &ip, icmp_ptr, &icmp),
        _ if local => Err(Exit::Pass(Counter::PassL7)),
        _ => Err(Exit::Drop(DropReason::IcmpUnhandled)),
    }
}

/// Turn the echo request in place into its reply and send it back out.
#[inline(always)]
fn echo_reply_v4(
    ctx: &XdpContext,
    ip_ptr: *mut Ipv4Hdr,
    ip: &Ipv4Hdr,
    icmp_ptr: *mut IcmpHdr,
    icmp: &IcmpHdr,
) -> Result<u32, Exit> {
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(Exit::Pass(Counter::PassTruncated))?;
    let mut out = *ip;
    out.saddr = ip.daddr;
    out.daddr = ip.saddr;
    out.ttl = OUTER_TTL;
    out.check = 0;
    out.check = ipv4_checksum(out);
    let old = u16::from_ne_bytes([ICMP_ECHO, icmp.code]);
    let new = u16::from_ne_bytes([ICMP_ECHO_REPLY, icmp.code]);
    // SAFETY: all three pointers were bounds checked by ptr_at.
    unsafe {
        let e = *eth;
        (*eth).dst = e.src;
        (*eth).src = e.dst;
        *ip_ptr = out;
        (*icmp_ptr).kind = ICMP_ECHO_REPLY;
        (*icmp_ptr).check = csum::replace16_nonzero(icmp.check, old, new);
    }
    count(Counter::IcmpEchoReply);
    Ok(XDP_TX)
}

/// A destination unreachable to a VIP address: tunnelled to the backend of the flow it
/// quotes, if the quote is a well-formed reply of an L4 service's flow.
#[inline(always)]
fn forward_error_v4(
    ctx: &XdpContext,
    l3_off: usize,
    ip: &Ipv4Hdr,
    tot_len: usize,
    fwd: &mut MaybeUninit<ipv6::Forward>,
) -> Result<u32, Exit> {
    let bad = Exit::Drop(DropReason::IcmpBadQuote);
    let q_off = l3_off + IPV4_HLEN + ICMP_HLEN;
    if tot_len < IPV4_HLEN + ICMP_HLEN + QUOTE_LEN {
        return Err(bad);
    }
    let q = ptr_at::<Ipv4Hdr>(ctx, q_off).ok_or(bad)?;
    let ports = ptr_at::<Ports>(ctx, q_off + IPV4_HLEN).ok_or(bad)?;
    // SAFETY: bounds checked by ptr_at.
    let (q, ports) = unsafe { (*q, *ports) };
    // A 20-byte header (options would move the ports), a first fragment (others carry
    // no ports), a length that holds what is quoted, sent from the address the error
    // is addressed to.
    if q.version_ihl != 0x45
        || q.frag_off & IP_OFFSET != 0
        || usize::from(u16::from_be(q.tot_len)) < QUOTE_LEN
        || q.saddr != ip.daddr
    {
        return Err(bad);
    }
    if q.protocol != PROTO_TCP && q.protocol != PROTO_UDP {
        return Err(Exit::Drop(DropReason::IcmpUnhandled));
    }
    let vip_key = crate::keys::vip_key_v4(q.saddr, ports.source, q.protocol);
    // SAFETY: VIPS_V4 is preallocated; values are written whole by the agent.
    let vip = *unsafe { VIPS_V4.get(vip_key) }.ok_or(Exit::Drop(DropReason::IcmpUnhandled))?;
    if vip.flags & VIP_F_L7 != 0 {
        return Err(Exit::Pass(Counter::PassL7));
    }
    let cfg = CONFIG.get(0).ok_or(Exit::Pass(Counter::PassNoSource))?;
    let (source, mtu) = (cfg.source_v4, cfg.mtu);
    if source == 0 {
        return Err(Exit::Pass(Counter::PassNoSource));
    }
    // The flow as its packets arrive here: client -> VIP.
    let key = FlowKey {
        src: [q.daddr, 0, 0, 0],
        dst: [q.saddr, 0, 0, 0],
        sport: ports.dest,
        dport: ports.source,
        proto: q.protocol,
        family: FAMILY_V4,
        _pad: [0; 2],
    };
    let choice = hashing::owner::<hashing::V4>(&key, &crate::keys::flow_key_v4(&key), &vip)
        .map_err(Exit::Drop)?;
    // No ICMP error about an ICMP error (RFC 1122 3.2.2).
    if mtu != 0 && tot_len + ipv6::outer_len(&choice.backend, cfg) as usize > mtu as usize {
        return Err(Exit::Drop(DropReason::TooBig));
    }
    // The flow's own tunnel (IPIP, GUE, 4in6), built by `ipv6::send`, which `xdp_lb`
    // calls next: its frame never adds up with this one's.
    let entropy = gue::entropy(cfg, &choice.backend, &key);
    let (len, tos) = (tot_len as u16, ip.tos);
    ipv6::Forward::fill(fwd, &choice, len, tos, false, true, entropy);
    Ok(NEXT_SEND)
}

/// The VIP packet at `l3_off` does not fit `mtu` once encapsulated: with DF set,
/// answer its source with ICMP "fragmentation needed" (next-hop MTU `mtu` - 20) from
/// the VIP, in place, back out of the receiving interface; DF clear, drop it.
#[inline(always)]
pub fn too_big_v4(ctx: &XdpContext, l3_off: usize, mtu: u32) -> Result<u32, Exit> {
    let too_big = Exit::Drop(DropReason::TooBig);
    let ip = ptr_at::<Ipv4Hdr>(ctx, l3_off).ok_or(too_big)?;
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(too_big)?;
    // SAFETY: bounds checked by ptr_at.
    let (ip, eth) = unsafe { (*ip, *eth) };
    if ip.frag_off & IP_DF == 0 {
        return Err(too_big);
    }
    error_allowed()?;
    let vlan = if l3_off == ETH_HLEN + VLAN_HLEN {
        let v = ptr_at::<VlanHdr>(ctx, ETH_HLEN).ok_or(too_big)?;
        // SAFETY: bounds checked by ptr_at.
        Some(unsafe { *v })
    } else {
        None
    };
    let failed = Exit::Drop(DropReason::EncapFailed);
    // As much of the packet as fits in 576 bytes (RFC 1812 4.3.2.3), at least its
    // header and 8 bytes (checked by parse_ipv4 for TCP/UDP).
    let quote = usize::from(u16::from_be(ip.tot_len)).min(MAX_QUOTE_LEN);
    if quote < QUOTE_LEN {
        return Err(failed);
    }
    // Keep the L2 header and the quote, then make room for the new IP and ICMP headers
    // in front of the quote: the quoted bytes never move.
    let keep = l3_off + quote;
    let len = ctx.data_end() - ctx.data();
    if len > keep {
        // SAFETY: ctx.ctx is the program's xdp_md; the kernel checks the new length.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((len - keep) as i32)) } != 0 {
            return Err(failed);
        }
    }
    // The quote's sum, in place (csum::sum_packet: up to 548 bytes).
    let quoted = match csum::sum_packet(ctx.ctx, l3_off, quote) {
        u64::MAX => return Err(failed),
        s => s,
    };
    // SAFETY: as above.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -((IPV4_HLEN + ICMP_HLEN) as i32)) } != 0 {
        return Err(failed);
    }
    let mut reply = Ipv4Hdr {
        version_ihl: 0x45,
        tos: ERROR_TOS,
        tot_len: ((IPV4_HLEN + ICMP_HLEN + quote) as u16).to_be(),
        id: 0,
        frag_off: 0,
        ttl: OUTER_TTL,
        protocol: PROTO_ICMP,
        check: 0,
        saddr: ip.daddr,
        daddr: ip.saddr,
    };
    reply.check = ipv4_checksum(reply);
    let mut icmp = IcmpHdr {
        kind: ICMP_DEST_UNREACH,
        code: ICMP_FRAG_NEEDED,
        check: 0,
        rest: [0, ((mtu - IPV4_HLEN as u32) as u16).to_be()],
    };
    // SAFETY: IcmpHdr is plain integers with no padding.
    let head = unsafe { transmute::<IcmpHdr, [u16; 4]>(icmp) };
    let mut sum = quoted;
    for w in head {
        sum += u64::from(w);
    }
    icmp.check = !csum::fold64(sum);
    let new_eth = ptr_at::<EthHdr>(ctx, 0).ok_or(failed)?;
    let new_ip = ptr_at::<Ipv4Hdr>(ctx, l3_off).ok_or(failed)?;
    let new_icmp = ptr_at::<IcmpHdr>(ctx, l3_off + IPV4_HLEN).ok_or(failed)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        *new_eth = EthHdr {
            dst: eth.src,
            src: eth.dst,
            proto: eth.proto,
        };
        *new_ip = reply;
        *new_icmp = icmp;
    }
    if let Some(v) = vlan {
        let new_vlan = ptr_at::<VlanHdr>(ctx, ETH_HLEN).ok_or(failed)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe { *new_vlan = v };
    }
    count(Counter::IcmpFragNeeded);
    Ok(XDP_TX)
}

/// Count one ICMP error this CPU is about to send, or say it may not: this second's
/// `dataplane.icmp_errors_per_cpu` is used up (the packet is then dropped as
/// `icmp_error_limited`, unanswered). The errors are the balancer's own answers to
/// packets anyone can send; unlimited, a flood of oversized packets would have it
/// send an error for each, from the VIP, to whatever source they claim.
#[inline(always)]
pub fn error_allowed() -> Result<(), Exit> {
    let cap = CONFIG.get(0).map_or(0, |c| c.icmp_errors_per_cpu);
    if limit::over_per_cpu_cap(&ICMP_RATE, u32::from(cap)) {
        return Err(Exit::Drop(DropReason::IcmpErrorLimited));
    }
    Ok(())
}

#[inline(always)]
fn ipv4_checksum(hdr: Ipv4Hdr) -> u16 {
    // SAFETY: Ipv4Hdr is 20 bytes of plain integers with no padding.
    let words: [u16; 10] = unsafe { transmute(hdr) };
    csum::ipv4_header(&words)
}
