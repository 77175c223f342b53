//! Entry points of the xdplb object embedded in `lb-agent`:
//! - `xdp_lb`: the balancer, attached to the LB node's interface.
//! - `xdp_decap`: the backend side, removing the tunnel header of packets sent to it.
#![no_std]
#![no_main]

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{
        xdp_action::{XDP_ABORTED, XDP_PASS},
        xdp_md,
    },
    macros::xdp,
    programs::XdpContext,
};
use lb_common::{
    hash::tunnel_entropy,
    stats::{Counter, DropReason},
    types::{FAMILY_V4, FAMILY_V6, FILTER_F_FLOW_LIMIT, PROTO_UDP, VIP_F_FLOW_LIMIT},
};
use lb_ebpf::{
    encap::{Exit, decap_ipv4, transmit},
    gate::{
        self, NEXT_ICMP4, NEXT_ICMP6, NEXT_SEND, NEXT_TOO_BIG4, NEXT_TOO_BIG6, finish, with_mtu,
    },
    gue,
    hashing::{Limits, Probe, V4, choose_backend},
    icmp, icmp6,
    ipv6::{self, Forward},
    keys,
    maps::{CONFIG, DECAP_DSTS},
    parsing::{
        ETH_P_IP, ETH_P_IPV6, IPPROTO_IPIP, IPV4_HLEN, Ipv4Hdr, L2, parse_ipv4, parse_l2, ptr_at,
    },
    quic, short,
    stats::{count, count_forwarded},
};

#[xdp]
pub fn xdp_lb(ctx: XdpContext) -> u32 {
    // No `rx` count: every packet ends under one outcome counter, and the agent reads
    // `rx` as their sum (lb_common::stats::Counter::Rx).
    let l2 = match parse_l2(&ctx) {
        Ok(l2) => l2,
        Err(counter) => return finish(Err(Exit::Pass(counter))),
    };
    // Each family's path is a BPF subprogram of its own, and what a path hands on (ICMP,
    // an ICMP answer, an IPv6 or mixed-family tunnel) is another, called from here as a
    // continuation (`gate::NEXT_*`): BPF's 512-byte stack limit counts the frames along
    // a call chain, and siblings do not add up. An established IPv4 flow to an IPv4
    // backend takes one call (`lb_v4` tunnels IPIP or GUE itself, `gue::tunnel_to_v4`;
    // IPv6 backends go to `ipv6::send`); see README, "IPv6 VIPs and backends" and "GUE".
    let mut fwd = MaybeUninit::<Forward>::uninit();
    // The established flow's short path first (short.rs, each family's); what it does
    // not finish takes the whole path, with the flow-table entry or VIP it found (a
    // packet to no VIP it passes up itself).
    let mut value: *mut u8 = core::ptr::null_mut();
    let mut action = if l2.proto == ETH_P_IP {
        let short = short_v4(ctx.ctx, l2.l3_off, &mut value);
        if short & SHORT_NOT_DONE == 0 {
            return short;
        }
        lb_v4(ctx.ctx, l2.l3_off, &mut fwd, short & !SHORT_NOT_DONE, value)
    } else if l2.proto == ETH_P_IPV6 {
        let short = short_v6(ctx.ctx, l2.l3_off, &mut value);
        if short & SHORT_NOT_DONE == 0 {
            return short;
        }
        lb_v6(ctx.ctx, l2.l3_off, &mut fwd, short & !SHORT_NOT_DONE, value)
    } else {
        return finish(Err(Exit::Pass(Counter::PassNotIp)));
    };
    if action == NEXT_ICMP4 {
        action = icmp::handle(ctx.ctx, l2.l3_off, &mut fwd);
    } else if action == NEXT_ICMP6 {
        action = icmp6::handle(ctx.ctx, l2.l3_off, &mut fwd);
    }
    match action & 0xffff {
        NEXT_SEND => {
            // SAFETY: every path that returns NEXT_SEND wrote `fwd` first.
            ipv6::send(ctx.ctx, l2.l3_off, unsafe { fwd.assume_init_ref() })
        }
        NEXT_TOO_BIG4 => icmp::too_big(ctx.ctx, l2.l3_off, action >> 16),
        NEXT_TOO_BIG6 => icmp6::too_big(ctx.ctx, l2.l3_off, action >> 16),
        _ => action,
    }
}

/// `short_v4`'s answer for a packet it did not finish (bits 0..8: its `short::PROBE_*`).
const SHORT_NOT_DONE: u32 = 0x100;

/// The established IPv4 flow's short path (`short::established_v4`), a sibling
/// subprogram of [`lb_v4`] (its frame is not on `lb_v4`'s call chain): the XDP action
/// of a packet it finished, else `SHORT_NOT_DONE` | its `short::PROBE_*`, with the
/// map value it found written to `value` (`short::Handoff`).
#[inline(never)]
fn short_v4(ctx: *mut xdp_md, l3_off: usize, value: &mut *mut u8) -> u32 {
    match short::established_v4(&XdpContext::new(ctx), l3_off) {
        Ok(action) => action,
        Err(hand) => {
            *value = hand.value;
            SHORT_NOT_DONE | hand.probe
        }
    }
}

/// The established IPv6 flow's short path (`short::established_v6`), as [`short_v4`]: a
/// sibling subprogram of [`lb_v6`].
#[inline(never)]
fn short_v6(ctx: *mut xdp_md, l3_off: usize, value: &mut *mut u8) -> u32 {
    match short::established_v6(&XdpContext::new(ctx), l3_off) {
        Ok(action) => action,
        Err(hand) => {
            *value = hand.value;
            SHORT_NOT_DONE | hand.probe
        }
    }
}

/// The IPv4 path (a subprogram: see `xdp_lb`) for every IPv4 packet the short path
/// (`short::established_v4`) did not finish, with what its probe of the flow table
/// found (`probe`, `value`: a `short::Handoff`). Takes the raw context so that the
/// callee's first argument is the context pointer the helpers need.
#[inline(never)]
fn lb_v4(
    ctx: *mut xdp_md,
    l3_off: usize,
    fwd: &mut MaybeUninit<Forward>,
    probe: u32,
    value: *mut u8,
) -> u32 {
    // SAFETY: `xdp_lb` passes what `short_v4` wrote in this run.
    let probe = unsafe { short::Handoff::probe(probe, value) };
    finish(try_lb_v4(&XdpContext::new(ctx), l3_off, fwd, probe))
}

/// The IPv6 path (`lb_ebpf::ipv6`), a sibling subprogram of [`lb_v4`], for every IPv6
/// packet the short path (`short::established_v6`) did not finish, with what it found
/// (`probe`, `value`, as [`lb_v4`]'s).
#[inline(never)]
fn lb_v6(
    ctx: *mut xdp_md,
    l3_off: usize,
    fwd: &mut MaybeUninit<Forward>,
    probe: u32,
    value: *mut u8,
) -> u32 {
    // SAFETY: `xdp_lb` passes what `short_v6` wrote in this run.
    let probe = unsafe { short::Handoff::probe(probe, value) };
    finish(ipv6::try_lb_v6(&XdpContext::new(ctx), l3_off, fwd, probe))
}

#[inline(always)]
fn try_lb_v4(
    ctx: &XdpContext,
    l3_off: usize,
    fwd: &mut MaybeUninit<Forward>,
    probe: Probe,
) -> Result<u32, Exit> {
    let l2 = L2 {
        l3_off,
        proto: ETH_P_IP,
    };
    // The config, read once for the whole path (issue 12, item 2: the second read was
    // a second map lookup on every packet). Source filters: with no list in use they
    // cost nothing but the flags' test.
    let config = CONFIG.get(0);
    let filter_flags = config.map_or(0, |c| c.filter_flags);
    let pkt = match parse_ipv4(ctx, l2.l3_off) {
        Ok(pkt) => pkt,
        Err(counter) => {
            // The deny list applies to every IPv4 packet (fragments, options, ICMP).
            gate::deny(gate::source(ctx, &l2, filter_flags).as_ref(), filter_flags)?;
            return match counter {
                // Neither TCP nor UDP: ICMP to a VIP address is ours (icmp.rs).
                Counter::PassNotVip => Ok(NEXT_ICMP4),
                counter => Err(Exit::Pass(counter)),
            };
        }
    };
    // IPv4 VIPs and flows have short keys of their own (VIPS_V4, FLOWS_V4): the kernel
    // hashes and compares whole keys on every lookup (issue 12, item 2). An established
    // flow's packet finds its VIP through its flow (gate::resolve, as on the IPv6 path).
    let vip_key = keys::vip_key_v4(pkt.key.dst[0], pkt.key.dport, pkt.key.proto);
    let fkey = keys::flow_key_v4(&pkt.key);
    let (vip, established, filter_gen) =
        gate::resolve::<V4>(ctx, &l2, filter_flags, pkt.tcp_syn, probe, &fkey, &vip_key)?;
    let cfg = config.ok_or(Exit::Pass(Counter::PassNoSource))?;
    let (source, mtu) = (cfg.source_v4, cfg.mtu);
    if source == 0 {
        return Err(Exit::Pass(Counter::PassNoSource));
    }
    // GUE's UDP header counts too; "fragmentation needed" then says `mtu` - 28.
    let extra = gue::extra_overhead(cfg);
    // The IP length is what leaves (bytes past it are cut before encapsulation).
    if mtu != 0 && u32::from(pkt.tot_len) + IPV4_HLEN as u32 + extra > mtu {
        // too_big_v4 announces its argument less 20.
        return Ok(with_mtu(NEXT_TOO_BIG4, mtu - extra));
    }
    let limits = Limits {
        global: filter_flags & FILTER_F_FLOW_LIMIT != 0,
        service: vip.flags & VIP_F_FLOW_LIMIT != 0,
        max_new_flows: cfg.max_new_flows_per_cpu,
        filter_gen,
    };
    // QUIC short headers naming a live backend go there (quic.rs); the rest as ever.
    let choice = match established {
        Some(choice) => choice,
        None => match quic::backend(ctx, &pkt, &vip) {
            Some(id) => quic::choice(id).ok_or(Exit::Drop(DropReason::NoBackend))?,
            None => choose_backend::<V4>(&pkt.key, &fkey, &vip, pkt.tcp_syn, limits)
                .map_err(Exit::Drop)?,
        },
    };
    let to_v6 = choice.backend.family == FAMILY_V6;
    if to_v6 {
        // IPv4 in IPv6 (ipv6.rs): a 40-byte outer header, checked against `mtu` again.
        // With GUE, 48 (ipv6::outer_len).
        let outer = ipv6::outer_len(&choice.backend, cfg);
        if mtu != 0 && u32::from(pkt.tot_len) + outer > mtu {
            // too_big_v4 announces its argument less 20: mtu - 40 (48).
            let arg = mtu - outer + IPV4_HLEN as u32;
            return Ok(with_mtu(NEXT_TOO_BIG4, arg));
        }
    }
    if to_v6 {
        // An IPv6 backend (4in6, GUE over IPv6): built by `ipv6::send`, a sibling
        // subprogram.
        let entropy = gue::entropy(cfg, &choice.backend, &pkt.key);
        let (len, tos) = (pkt.tot_len, pkt.tos);
        Forward::fill(fwd, &choice, len, tos, false, false, entropy);
        return Ok(NEXT_SEND);
    }
    // An IPv4 backend: IPIP or GUE, from one source or the flow's in the prefix, built
    // here (gue::tunnel_to_v4); the flow's entropy only when the tunnel uses it.
    let entropy = if gue::needs_entropy(cfg) {
        tunnel_entropy(&pkt.key)
    } else {
        0
    };
    let ifindex = gue::tunnel_to_v4(
        ctx,
        pkt.l3_off,
        pkt.tot_len,
        pkt.tos,
        cfg,
        choice.backend.addr[0],
        choice.backend_id,
        entropy,
    )?;
    // Only now is the packet forwarded: a failed encapsulation is a drop, not traffic.
    count_forwarded(choice.backend_id, pkt.tot_len as u64);
    Ok(transmit(ctx, ifindex))
}

#[xdp]
pub fn xdp_decap(ctx: XdpContext) -> u32 {
    match try_decap(&ctx) {
        Ok(action) | Err(action) => action,
    }
}

/// Decapsulate IPIP, GUE (`gue.rs`), IPv6-in-IPv4, IPv6-in-IPv6 and IPv4-in-IPv6 packets whose outer
/// destination is one of this host's tunnel addresses (`DECAP_DSTS`, both families;
/// the IPv6 kinds in `ipv6.rs`); everything else passes untouched.
#[inline(always)]
fn try_decap(ctx: &XdpContext) -> Result<u32, u32> {
    let l2 = parse_l2(ctx).map_err(|_| XDP_PASS)?;
    if l2.proto == ETH_P_IPV6 {
        return ipv6::decap_v6(ctx, &l2);
    }
    if l2.proto != ETH_P_IP {
        return Err(XDP_PASS);
    }
    let ip = ptr_at::<Ipv4Hdr>(ctx, l2.l3_off).ok_or(XDP_PASS)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { *ip };
    // GUE: UDP to `gue_port` at a tunnel address (gue.rs).
    if ip.version_ihl == 0x45 && ip.protocol == PROTO_UDP && ip.frag_off & 0x3fffu16.to_be() == 0 {
        return gue::decap_v4(ctx, l2.l3_off, ip.daddr);
    }
    let six_in_four = ipv6::is_6in4(&ip);
    // Only plain 20-byte, unfragmented IPIP headers: anything else is the kernel's.
    if !six_in_four
        && (ip.version_ihl != 0x45
            || ip.protocol != IPPROTO_IPIP
            || ip.frag_off & 0x3fffu16.to_be() != 0)
    {
        return Err(XDP_PASS);
    }
    let key = lb_ebpf::keys::decap_key([ip.daddr, 0, 0, 0], FAMILY_V4);
    // SAFETY: DECAP_DSTS is preallocated; the value is not read.
    if unsafe { DECAP_DSTS.get(key) }.is_none() {
        return Err(XDP_PASS);
    }
    if six_in_four {
        return ipv6::decap_6in4(ctx, &l2);
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
