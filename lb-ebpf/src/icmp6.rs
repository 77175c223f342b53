//! ICMPv6 for IPv6 VIP addresses, and the ICMPv6 "packet too big" the balancer sends:
//! `icmp.rs`'s counterpart, with the same rules.
//!
//! What arrives for a VIP address (`VIP_ADDRS`, family 6, any port):
//! - an echo request (type 128) to an address with an L4 service: answered from XDP
//!   (echo reply, type 129; addresses and MACs swapped, hop limit 64, checksum
//!   updated incrementally: the pseudo-header's sum does not change when source and
//!   destination swap), `icmp_echo_reply`;
//! - a destination unreachable (type 1) or packet too big (type 2) whose quoted packet
//!   is a reply VIP:port -> client of an L4 service's flow (a 40-byte IPv6 header
//!   followed directly by TCP or UDP, sent from the VIP): tunnelled whole to the
//!   backend that owns the flow (`icmp_error_forwarded`), whose stack learns the path
//!   MTU towards the client;
//! - anything else: dropped as `icmp_unhandled` (an L4 VIP address is not the
//!   kernel's), or passed up (`pass_l7`) on an address that also carries an L7
//!   service. A quote that is cut short, carries extension headers before its
//!   transport header, or was not sent from the VIP: `icmp_bad_quote` /
//!   `icmp_unhandled`, never guessed at.
//!
//! What the balancer sends itself: a VIP packet that would exceed `dataplane.mtu`
//! once encapsulated gets ICMPv6 "packet too big" (type 2, code 0, RFC 4443 3.2) from
//! the VIP, MTU = `mtu` less the outer header, quoting the offending packet's IPv6
//! header and the 8 bytes after it (the ports and, for TCP, the sequence number: what
//! the client's stack needs to find the connection; RFC 4443 asks for as much as fits
//! in 1280 bytes as a SHOULD, which would cost a checksum over up to 1232 bytes in
//! XDP). IPv6 routers never fragment, so there is no DF bit: every such packet is
//! answered, within `dataplane.icmp_errors_per_cpu` per CPU and second (shared with
//! IPv4's errors, `icmp::error_allowed`; above it: dropped as `icmp_error_limited`).

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
        FAMILY_V6, FILTER_F_ALLOW, FilterAddr, FlowKey, PROTO_TCP, PROTO_UDP, VIP_ADDR_F_L4,
        VIP_ADDR_F_LOCAL, VIP_F_L7, VipKey,
    },
};

use crate::{
    csum,
    encap::{Exit, OUTER_TTL},
    filter,
    gate::{NEXT_SEND, finish},
    gue, hashing,
    ipv6::{Forward, IPPROTO_ICMPV6, IPV6_HLEN, Ipv6Hdr, outer_len},
    maps::{CONFIG, VIP_ADDRS, VIPS},
    parsing::{ETH_HLEN, ETH_P_IPV6, EthHdr, L2, Ports, VLAN_HLEN, VlanHdr, ptr_at},
    stats::count,
};

pub const ICMP6_DEST_UNREACH: u8 = 1;
pub const ICMP6_PACKET_TOO_BIG: u8 = 2;
pub const ICMP6_ECHO_REQUEST: u8 = 128;
pub const ICMP6_ECHO_REPLY: u8 = 129;
pub const ICMP6_HLEN: usize = 8;
/// The least a "packet too big" from the balancer quotes: the IPv6 header and 8 bytes.
pub const QUOTE6_LEN: usize = IPV6_HLEN + 8;
/// The most of the invoking packet "packet too big" quotes: what fits in the minimum
/// IPv6 MTU, 1280, with the new IPv6 and ICMPv6 headers (RFC 4443 2.4(c)).
pub const MAX_QUOTE6_LEN: usize = 1280 - IPV6_HLEN - ICMP6_HLEN;
/// Traffic class of the errors the balancer sends (as `icmp.rs`'s TOS: network control).
const ERROR_TC: u8 = 0xc0;

/// The first 8 bytes of every ICMPv6 message.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Icmp6Hdr {
    pub kind: u8,
    pub code: u8,
    pub check: u16,
    /// Identifier and sequence (echo), MTU (packet too big), network order.
    pub rest: [u16; 2],
}

/// [`handle_v6`] as a BPF subprogram (`gate::NEXT_ICMP6`, a sibling of the IPv6 path):
/// the verdict, its counter counted, or `NEXT_SEND` with `fwd` written. The global deny
/// list was applied by the path; the allow list is applied here.
#[inline(never)]
pub fn handle(ctx: *mut xdp_md, l3_off: usize, fwd: &mut MaybeUninit<Forward>) -> u32 {
    let ctx = XdpContext::new(ctx);
    let filter_flags = CONFIG.get(0).map_or(0, |c| c.filter_flags);
    let src = if filter_flags & FILTER_F_ALLOW != 0 {
        let l2 = L2 {
            l3_off,
            proto: ETH_P_IPV6,
        };
        filter::source(&ctx, &l2)
    } else {
        None
    };
    finish(handle_v6(&ctx, l3_off, filter_flags, src.as_ref(), fwd))
}

/// [`too_big_v6`] as a BPF subprogram: the verdict, its counter counted.
#[inline(never)]
pub fn too_big(ctx: *mut xdp_md, l3_off: usize, mtu: u32) -> u32 {
    finish(too_big_v6(&XdpContext::new(ctx), l3_off, mtu))
}

/// An IPv6 packet that is not TCP/UDP (its length checked by `parse_ipv6`): ICMPv6 to
/// a VIP address is ours; anything else returns `pass_not_vip` as before.
#[inline(always)]
pub fn handle_v6(
    ctx: &XdpContext,
    l3_off: usize,
    filter_flags: u32,
    src: Option<&Key<FilterAddr>>,
    fwd: &mut MaybeUninit<Forward>,
) -> Result<u32, Exit> {
    let ip_ptr = ptr_at::<Ipv6Hdr>(ctx, l3_off).ok_or(Exit::Pass(Counter::PassTruncated))?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { *ip_ptr };
    if ip.nexthdr != IPPROTO_ICMPV6 {
        return Err(Exit::Pass(Counter::PassNotVip));
    }
    let key = crate::keys::vip_addr_key(ip.daddr, FAMILY_V6);
    // SAFETY: VIP_ADDRS is preallocated; values are plain u32 written whole.
    let flags = *unsafe { VIP_ADDRS.get(key) }.ok_or(Exit::Pass(Counter::PassNotVip))?;
    if let Some(src) = src {
        if filter_flags & FILTER_F_ALLOW != 0 {
            filter::check_allow(src)?;
        }
    }
    let local = flags & VIP_ADDR_F_LOCAL != 0;
    if flags & VIP_ADDR_F_L4 == 0 {
        return Err(Exit::Pass(Counter::PassL7));
    }
    let payload = usize::from(u16::from_be(ip.payload_len));
    let icmp_ptr =
        ptr_at::<Icmp6Hdr>(ctx, l3_off + IPV6_HLEN).ok_or(Exit::Pass(Counter::PassTruncated))?;
    if payload < ICMP6_HLEN {
        return Err(Exit::Pass(Counter::PassTruncated));
    }
    // SAFETY: bounds checked by ptr_at.
    let icmp = unsafe { *icmp_ptr };
    match icmp.kind {
        ICMP6_DEST_UNREACH | ICMP6_PACKET_TOO_BIG => {
            match forward_error_v6(ctx, l3_off, &ip, payload, fwd) {
                Err(Exit::Drop(DropReason::IcmpBadQuote | DropReason::IcmpUnhandled)) if local => {
                    Err(Exit::Pass(Counter::PassL7))
                }
                other => other,
            }
        }
        ICMP6_ECHO_REQUEST if icmp.code == 0 && !local => {
            echo_reply_v6(ctx, ip_ptr, &ip, icmp_ptr, &icmp)
        }
        _ if local => Err(Exit::Pass(Counter::PassL7)),
        _ => Err(Exit::Drop(DropReason::IcmpUnhandled)),
    }
}

/// Turn the echo request in place into its reply and send it back out.
#[inline(always)]
fn echo_reply_v6(
    ctx: &XdpContext,
    ip_ptr: *mut Ipv6Hdr,
    ip: &Ipv6Hdr,
    icmp_ptr: *mut Icmp6Hdr,
    icmp: &Icmp6Hdr,
) -> Result<u32, Exit> {
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(Exit::Pass(Counter::PassTruncated))?;
    let old = u16::from_ne_bytes([ICMP6_ECHO_REQUEST, icmp.code]);
    let new = u16::from_ne_bytes([ICMP6_ECHO_REPLY, icmp.code]);
    // SAFETY: all three pointers were bounds checked by ptr_at.
    unsafe {
        let e = *eth;
        (*eth).dst = e.src;
        (*eth).src = e.dst;
        (*ip_ptr).saddr = ip.daddr;
        (*ip_ptr).daddr = ip.saddr;
        (*ip_ptr).hop_limit = OUTER_TTL;
        (*icmp_ptr).kind = ICMP6_ECHO_REPLY;
        (*icmp_ptr).check = csum::replace16_nonzero(icmp.check, old, new);
    }
    count(Counter::IcmpEchoReply);
    Ok(XDP_TX)
}

/// A destination unreachable or packet too big to a VIP address: tunnelled to the
/// backend of the flow it quotes, if the quote is a well-formed reply of an L4 flow
/// (`NEXT_SEND` with `fwd` written).
#[inline(always)]
fn forward_error_v6(
    ctx: &XdpContext,
    l3_off: usize,
    ip: &Ipv6Hdr,
    payload: usize,
    fwd: &mut MaybeUninit<Forward>,
) -> Result<u32, Exit> {
    let bad = Exit::Drop(DropReason::IcmpBadQuote);
    let q_off = l3_off + IPV6_HLEN + ICMP6_HLEN;
    if payload < ICMP6_HLEN + QUOTE6_LEN {
        return Err(bad);
    }
    let q = ptr_at::<Ipv6Hdr>(ctx, q_off).ok_or(bad)?;
    let ports = ptr_at::<Ports>(ctx, q_off + IPV6_HLEN).ok_or(bad)?;
    // SAFETY: bounds checked by ptr_at.
    let (q, ports) = unsafe { (*q, *ports) };
    if q.version() != 6 || q.saddr != ip.daddr {
        return Err(bad);
    }
    // Extension headers in the quote (a fragment header included) are not walked.
    if q.nexthdr != PROTO_TCP && q.nexthdr != PROTO_UDP {
        return Err(Exit::Drop(DropReason::IcmpUnhandled));
    }
    let vip_key = VipKey {
        addr: q.saddr,
        port: ports.source,
        proto: q.nexthdr,
        family: FAMILY_V6,
    };
    // SAFETY: VIPS is preallocated; values are written whole by the agent.
    let vip = *unsafe { VIPS.get(vip_key) }.ok_or(Exit::Drop(DropReason::IcmpUnhandled))?;
    if vip.flags & VIP_F_L7 != 0 {
        return Err(Exit::Pass(Counter::PassL7));
    }
    let cfg = CONFIG.get(0).ok_or(Exit::Pass(Counter::PassNoSource))?;
    let mtu = cfg.mtu;
    // The flow as its packets arrive here: client -> VIP.
    let key = FlowKey {
        src: q.daddr,
        dst: q.saddr,
        sport: ports.dest,
        dport: ports.source,
        proto: q.nexthdr,
        family: FAMILY_V6,
        _pad: [0; 2],
    };
    let choice = hashing::owner::<hashing::V6>(&key, &key, &vip).map_err(Exit::Drop)?;
    let len = IPV6_HLEN + payload;
    // No ICMP error about an ICMP error (RFC 4443 2.4 (e)).
    if mtu != 0 && len as u32 + outer_len(&choice.backend, cfg) > mtu {
        return Err(Exit::Drop(DropReason::TooBig));
    }
    let entropy = gue::entropy(cfg, &choice.backend, &key);
    let tc = ip.traffic_class();
    Forward::fill(fwd, &choice, len as u16, tc, true, true, entropy);
    Ok(NEXT_SEND)
}

/// The IPv6 VIP packet at `l3_off` (TCP or UDP: at least 8 bytes after its header,
/// checked by `parse_ipv6`) does not fit once encapsulated: answer its source with
/// ICMPv6 "packet too big" giving `mtu`, from the VIP, in place, back out of the
/// receiving interface.
#[inline(always)]
pub fn too_big_v6(ctx: &XdpContext, l3_off: usize, mtu: u32) -> Result<u32, Exit> {
    let failed = Exit::Drop(DropReason::EncapFailed);
    let ip = ptr_at::<Ipv6Hdr>(ctx, l3_off).ok_or(failed)?;
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(failed)?;
    // SAFETY: bounds checked by ptr_at.
    let (ip, eth) = unsafe { (*ip, *eth) };
    crate::icmp::error_allowed()?;
    // As much of the packet as fits in the minimum IPv6 MTU (RFC 4443 2.4(c)), at
    // least its header and 8 bytes (checked by parse_ipv6 for TCP/UDP).
    let quote = (IPV6_HLEN + usize::from(u16::from_be(ip.payload_len))).min(MAX_QUOTE6_LEN);
    if quote < QUOTE6_LEN {
        return Err(failed);
    }
    let vlan = if l3_off == ETH_HLEN + VLAN_HLEN {
        let v = ptr_at::<VlanHdr>(ctx, ETH_HLEN).ok_or(failed)?;
        // SAFETY: bounds checked by ptr_at.
        Some(unsafe { *v })
    } else {
        None
    };
    // Keep the L2 header and the quote, then make room for the new IPv6 and ICMPv6
    // headers in front of the quote: the quoted bytes never move.
    let keep = l3_off + quote;
    let len = ctx.data_end() - ctx.data();
    if len > keep {
        // SAFETY: ctx.ctx is the program's xdp_md; the kernel checks the new length.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((len - keep) as i32)) } != 0 {
            return Err(failed);
        }
    }
    // The quote's sum, in place (csum::sum_packet: up to 1232 bytes).
    let quoted = match csum::sum_packet(ctx.ctx, l3_off, quote) {
        u64::MAX => return Err(failed),
        s => s,
    };
    // SAFETY: as above.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -((IPV6_HLEN + ICMP6_HLEN) as i32)) } != 0 {
        return Err(failed);
    }
    let icmp_len = (ICMP6_HLEN + quote) as u16;
    let reply = Ipv6Hdr {
        vtc_flow: Ipv6Hdr::vtc(ERROR_TC),
        payload_len: icmp_len.to_be(),
        nexthdr: IPPROTO_ICMPV6,
        hop_limit: OUTER_TTL,
        saddr: ip.daddr,
        daddr: ip.saddr,
    };
    let mtu_be = mtu.to_be();
    let mut icmp = Icmp6Hdr {
        kind: ICMP6_PACKET_TOO_BIG,
        code: 0,
        check: 0,
        // SAFETY: a u32 as two u16 in memory order.
        rest: unsafe { transmute::<u32, [u16; 2]>(mtu_be) },
    };
    // Checksum over the pseudo-header (source, destination, upper-layer length, next
    // header), the ICMPv6 header and the quote; all words in memory order.
    // SAFETY: plain integers with no padding.
    let head = unsafe { transmute::<Icmp6Hdr, [u16; 4]>(icmp) };
    let mut sum = quoted + csum::pseudo6(&reply.saddr, &reply.daddr, icmp_len, IPPROTO_ICMPV6);
    for w in head {
        sum += u64::from(w);
    }
    icmp.check = !csum::fold64(sum);
    let new_eth = ptr_at::<EthHdr>(ctx, 0).ok_or(failed)?;
    let new_ip = ptr_at::<Ipv6Hdr>(ctx, l3_off).ok_or(failed)?;
    let new_icmp = ptr_at::<Icmp6Hdr>(ctx, l3_off + IPV6_HLEN).ok_or(failed)?;
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
    count(Counter::Icmp6TooBig);
    Ok(XDP_TX)
}
