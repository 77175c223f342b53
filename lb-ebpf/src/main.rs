//! Entry points of the xdplb object embedded in `lb-agent`:
//! - `xdp_lb`: the balancer, attached to the LB node's interface.
//! - `xdp_decap`: the backend side, removing the tunnel header of packets sent to it.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action::{XDP_ABORTED, XDP_DROP, XDP_PASS},
    macros::xdp,
    programs::XdpContext,
};
use lb_common::{
    stats::Counter,
    types::{
        FAMILY_V4, FILTER_F_ALLOW, FILTER_F_DENY, FILTER_F_FLOW_LIMIT, VIP_F_ALLOW, VIP_F_DENY,
        VIP_F_FLOW_LIMIT, VIP_F_L7, VipKey,
    },
};
use lb_ebpf::{
    encap::{Exit, decap_ipv4, transmit, tunnel_v4},
    filter,
    hashing::{Limits, choose_backend},
    icmp,
    maps::{CONFIG, DECAP_DSTS, VIPS},
    parsing::{ETH_P_IP, IPPROTO_IPIP, IPV4_HLEN, Ipv4Hdr, parse_ipv4, parse_l2, ptr_at},
    stats::{count, count_drop, count_forwarded},
};

#[xdp]
pub fn xdp_lb(ctx: XdpContext) -> u32 {
    count(Counter::Rx);
    match try_lb(&ctx) {
        Ok(action) => action,
        Err(Exit::Pass(counter)) => {
            count(counter);
            XDP_PASS
        }
        Err(Exit::Drop(reason)) => {
            count_drop(reason);
            XDP_DROP
        }
    }
}

#[inline(always)]
fn try_lb(ctx: &XdpContext) -> Result<u32, Exit> {
    let l2 = parse_l2(ctx).map_err(Exit::Pass)?;
    // Source filters come first; with no list in use they cost nothing but this read.
    let filter_flags = CONFIG.get(0).map_or(0, |c| c.filter_flags);
    let src = if filter_flags & (FILTER_F_DENY | FILTER_F_ALLOW) != 0 {
        filter::source(ctx, &l2)
    } else {
        None
    };
    if let Some(src) = &src {
        if filter_flags & FILTER_F_DENY != 0 {
            filter::check_deny(src)?;
        }
    }
    if l2.proto != ETH_P_IP {
        return Err(Exit::Pass(Counter::PassNotIp));
    }
    let pkt = match parse_ipv4(ctx, l2.l3_off) {
        Ok(pkt) => pkt,
        // Neither TCP nor UDP: ICMP to a VIP address is ours (icmp.rs), the rest passes.
        Err(Counter::PassNotVip) => {
            return icmp::handle_v4(ctx, l2.l3_off, filter_flags, src.as_ref());
        }
        Err(counter) => return Err(Exit::Pass(counter)),
    };
    let vip_key = VipKey {
        addr: pkt.key.dst,
        port: pkt.key.dport,
        proto: pkt.key.proto,
        family: FAMILY_V4,
    };
    // SAFETY: VIPS is preallocated; values are written whole by the agent.
    let vip = *unsafe { VIPS.get(vip_key) }.ok_or(Exit::Pass(Counter::PassNotVip))?;
    // The allow list guards VIPs only (L7 ones included); other traffic passes as before.
    if let Some(src) = &src {
        if filter_flags & FILTER_F_ALLOW != 0 {
            filter::check_allow(src)?;
        }
    }
    // The service's own lists, after the global ones (a VIP without them pays nothing).
    if vip.flags & (VIP_F_DENY | VIP_F_ALLOW) != 0 {
        let own = match &src {
            Some(src) => Some(filter::scoped(src, vip.service_id)),
            None => filter::source(ctx, &l2).map(|s| filter::scoped(&s, vip.service_id)),
        };
        if let Some(own) = &own {
            if vip.flags & VIP_F_DENY != 0 {
                filter::check_service_deny(own)?;
            }
            if vip.flags & VIP_F_ALLOW != 0 {
                filter::check_service_allow(own)?;
            }
        }
    }
    if vip.flags & VIP_F_L7 != 0 {
        return Err(Exit::Pass(Counter::PassL7));
    }
    let (source, mtu) = CONFIG.get(0).map_or((0, 0), |c| (c.source_v4, c.mtu));
    if source == 0 {
        return Err(Exit::Pass(Counter::PassNoSource));
    }
    // The IP length is what leaves (bytes past it are cut before encapsulation).
    if mtu != 0 && u32::from(pkt.tot_len) + IPV4_HLEN as u32 > mtu {
        return icmp::too_big_v4(ctx, pkt.l3_off, mtu);
    }
    let limits = Limits {
        global: filter_flags & FILTER_F_FLOW_LIMIT != 0,
        service: vip.flags & VIP_F_FLOW_LIMIT != 0,
    };
    let choice = choose_backend(&pkt.key, &vip, pkt.tcp_syn, limits).map_err(Exit::Drop)?;
    let ifindex = tunnel_v4(
        ctx,
        pkt.l3_off,
        pkt.tot_len,
        pkt.tos,
        source,
        choice.backend.addr[0],
        choice.backend_id,
    )?;
    // Only now is the packet forwarded: a failed encapsulation is a drop, not traffic.
    count_forwarded(vip.service_id, choice.backend_id, pkt.tot_len as u64);
    Ok(transmit(ctx, ifindex))
}

#[xdp]
pub fn xdp_decap(ctx: XdpContext) -> u32 {
    match try_decap(&ctx) {
        Ok(action) | Err(action) => action,
    }
}

/// Decapsulate IPIP packets whose outer destination is one of this host's tunnel
/// addresses (`DECAP_DSTS`); everything else passes untouched.
#[inline(always)]
fn try_decap(ctx: &XdpContext) -> Result<u32, u32> {
    let l2 = parse_l2(ctx).map_err(|_| XDP_PASS)?;
    if l2.proto != ETH_P_IP {
        return Err(XDP_PASS);
    }
    let ip = ptr_at::<Ipv4Hdr>(ctx, l2.l3_off).ok_or(XDP_PASS)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { *ip };
    // Only plain 20-byte, unfragmented IPIP headers: anything else is the kernel's.
    if ip.version_ihl != 0x45 || ip.protocol != IPPROTO_IPIP || ip.frag_off & 0x3fffu16.to_be() != 0
    {
        return Err(XDP_PASS);
    }
    let key = lb_ebpf::keys::decap_key([ip.daddr, 0, 0, 0], FAMILY_V4);
    // SAFETY: DECAP_DSTS is preallocated; the value is not read.
    if unsafe { DECAP_DSTS.get(key) }.is_none() {
        return Err(XDP_PASS);
    }
    let inner = ptr_at::<Ipv4Hdr>(ctx, l2.l3_off + IPV4_HLEN).ok_or(XDP_PASS)?;
    // SAFETY: bounds checked by ptr_at.
    if unsafe { (*inner).version_ihl } >> 4 != 4 {
        return Err(XDP_PASS);
    }
    decap_ipv4(ctx, l2.l3_off).map_err(|_| XDP_ABORTED)?;
    count(Counter::Decap);
    Ok(XDP_PASS)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
