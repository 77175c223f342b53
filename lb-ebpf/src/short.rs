//! The established flow's short paths, tried by `xdp_lb` before `lb_v4` (IPv4,
//! [`established_v4`]) and `lb_v6` (IPv6, [`established_v6`], the same idea: see its
//! docs) (issue 12, item 2).
//!
//! Measured (README, "The established-flow budget, session 23"): of the established
//! flow's ~55 ns above the IPIP floor, ~10 ns were the BPF-to-BPF call into `lb_v4` (on
//! this AMD host every `ret` goes through the kernel's return thunk, "Safe RET") and
//! ~30 ns `lb_v4`'s own instructions around the same few map reads the floor makes
//! (the 40-byte flow key built before the probe, the spills of a 336-byte frame, the
//! tests of every feature). A build doing only what an established IPIP packet needs,
//! inline, measured 1.08x the floor with the same maps.
//!
//! [`established_v4`] does that for the common case and nothing else: an IPv4 TCP/UDP
//! packet that is not a SYN, whose flow is in `FLOWS_V4` with an active IPv4 backend of
//! the service that owns the packet's VIP now (`hashing::established_entry`, the
//! checks of the whole path), no L7 or QUIC service, IPIP from the one `source_ipv4`
//! (no GUE, no source prefix) and within `mtu`; with source lists in use (global or
//! the service's own), only when the flow's entry says its source passed them as they
//! are now (its `filter_gen` is the current generation, what `gate::established`
//! checks: such a packet needs no list lookup; README, "Source lists on the short
//! path, session 24"). It then does what `lb_v4` does for such a packet: the next hop
//! (`NEXT_HOPS`, else `bpf_fib_lookup`), the bytes past the IP packet cut, the outer
//! header, the backend's traffic counter, XDP_TX or a redirect, every exit counted by
//! `gate::finish` as there. A TCP/UDP packet to no VIP (no usable flow entry, and the
//! VIP lookup `gate::resolve` would make finds nothing) it passes up and counts
//! `pass_not_vip`, as `lb_v4` does, rather than paying `lb_v4`'s call and a second
//! parse (README, "The non-VIP packet, fixed"); with a global deny list in use, only
//! once that list let its source through (else dropped and counted as there: the
//! whole path's verdict, deny before anything else). Anything else is handed to
//! `lb_v4` untouched (packet and counters), with what the probe found ([`Handoff`]: the
//! flow's entry, which the whole path checks against the lists and refreshes when its
//! generation is behind, or the VIP's, to which it applies the deny list first), so
//! neither the flow nor the VIP is looked up twice.
//!
//! It runs as `short_v4` in `lb-ebpf/src/main.rs`, a BPF subprogram beside `lb_v4`, so
//! its frame is not on the deepest call chain (`xdp_lb` + `lb_v4` + `limit::admit`, which
//! must stay within BPF's 512 bytes; README gives the sizes). Inline in `xdp_lb` it
//! would save the call (10-20 ns here) but grew `xdp_lb`'s frame past what that chain
//! leaves it (README, session 23).

use aya_ebpf::programs::XdpContext;
use lb_common::{
    stats::Counter,
    types::{
        ENCAP_GUE, FAMILY_V4, FAMILY_V6, FILTER_F_DENY, FlowEntry, VIP_F_L7, VIP_F_QUIC, VipKey,
        VipMeta,
    },
};

use crate::{
    encap::{Exit, transmit, tunnel_v4},
    gate::{deny, finish, source, verdict_current},
    gue::needs_entropy,
    hashing::{FlowTables, Probe, V4, V6, established_entry, flow_entry},
    ipv6::{IPV6_HLEN, parse_ipv6, tunnel_in_v6},
    keys,
    maps::CONFIG,
    parsing::{ETH_P_IP, ETH_P_IPV6, IPV4_HLEN, L2, parse_ipv4},
    stats::count_forwarded,
};

/// `Handoff::probe`: the short path did not look the flow up.
pub const PROBE_TODO: u32 = 0;
/// `Handoff::probe`: no usable entry (or a new connection, not probed) and the packet's
/// VIP found, its `VIPS_V4` value in `Handoff::value` ([`Probe::Vip`]).
pub const PROBE_VIP: u32 = 1;
/// `Handoff::probe`: a usable entry, in `Handoff::value` ([`Probe::Hit`]).
pub const PROBE_HIT: u32 = 2;

/// What [`established_v4`] hands to the whole path with a packet it did not finish: two
/// plain values (not a [`Probe`]) because they cross the call into `lb_v4`, a BPF
/// subprogram, in two registers; [`Handoff::probe`] turns them back.
#[derive(Clone, Copy)]
pub struct Handoff {
    /// `PROBE_*`.
    pub probe: u32,
    /// The map value the short path found: the flow's `FlowEntry` with `PROBE_HIT`, the
    /// VIP's `VipMeta` with `PROBE_VIP`, else null.
    pub value: *mut u8,
}

impl Handoff {
    pub const TODO: Self = Handoff {
        probe: PROBE_TODO,
        value: core::ptr::null_mut(),
    };

    /// The [`Probe`] these values stand for.
    ///
    /// # Safety
    ///
    /// With `PROBE_HIT` or `PROBE_VIP`, `value` must be what [`established_v4`] handed
    /// over with it in this run of the program (a map's value, valid for the run).
    #[inline(always)]
    pub unsafe fn probe(probe: u32, value: *mut u8) -> Probe {
        if value.is_null() {
            Probe::Todo
        } else if probe == PROBE_HIT {
            // SAFETY: the caller's contract: a `FLOWS_V4` value.
            Probe::Hit(unsafe { &mut *value.cast::<FlowEntry>() })
        } else if probe == PROBE_VIP {
            // SAFETY: the caller's contract: a `VIPS_V4` value.
            Probe::Vip(unsafe { &*value.cast::<VipMeta>() })
        } else {
            Probe::Todo
        }
    }
}

/// Finish the established IPv4 packet at `l3_off` (an IPv4 frame: EtherType checked by
/// the caller) when it is the common case (module docs), and a TCP/UDP packet to no VIP
/// (`pass_not_vip`, or `filter_deny` by the global deny list, as the whole path ends
/// it): Ok(the XDP action), counted.
/// Err: not finished, nothing written or counted; the whole path takes it with the
/// [`Handoff`].
#[inline(always)]
pub fn established_v4(ctx: &XdpContext, l3_off: usize) -> Result<u32, Handoff> {
    let cfg = CONFIG.get(0).ok_or(Handoff::TODO)?;
    // Parsed as the whole path parses: fragments, options, ICMP and the like go on
    // (there the deny list applies to them too).
    let pkt = parse_ipv4(ctx, l3_off).map_err(|_| Handoff::TODO)?;
    let vip_key = keys::vip_key_v4(pkt.key.dst[0], pkt.key.dport, pkt.key.proto);
    if !pkt.tcp_syn {
        if let Some(entry) = flow_entry::<V4>(&keys::flow_key_v4(&pkt.key)) {
            let hand = Handoff {
                probe: PROBE_HIT,
                value: (&raw mut *entry).cast::<u8>(),
            };
            if let Some(hit) = established_entry::<V4>(entry, &vip_key) {
                if hit.vip.flags & (VIP_F_L7 | VIP_F_QUIC) != 0
                    || hit.choice.backend.family != FAMILY_V4
                    || needs_entropy(cfg)
                    || cfg.source_v4 == 0
                    || (cfg.mtu != 0 && u32::from(pkt.tot_len) + IPV4_HLEN as u32 > cfg.mtu)
                {
                    return Err(hand);
                }
                // Source lists in use (global, or the service's own): the flow's entry
                // must say its source passed them as they are now, as
                // `gate::established` checks; else the whole path runs them and
                // refreshes the entry.
                if !verdict_current(cfg.filter_flags, &hit.vip, hit.entry) {
                    return Err(hand);
                }
                let backend_id = hit.choice.backend_id;
                return Ok(finish(
                    tunnel_v4(
                        ctx,
                        pkt.l3_off,
                        pkt.tot_len,
                        pkt.tos,
                        cfg.source_v4,
                        hit.choice.backend.addr[0],
                        backend_id,
                    )
                    .map(|ifindex| {
                        // Only now is the packet forwarded (as in `lb_v4`).
                        count_forwarded(backend_id, u64::from(pkt.tot_len));
                        transmit(ctx, ifindex)
                    }),
                ));
            }
        }
    }
    to_vip::<V4>(ctx, l3_off, ETH_P_IP, cfg.filter_flags, vip_key)
}

/// [`established_v4`] for IPv6 (`short_v6`, before `lb_v6`): an IPv6 TCP/UDP packet that
/// is not a SYN, its flow in `FLOWS` with an active IPv6 backend of the service that
/// owns the packet's VIP now (`SERVICES_V6`), no L7 or QUIC service, 6in6 from the one
/// `source_ipv6` (no GUE, no `source_ipv6_prefix`) within `mtu`, source lists as there:
/// the next hop, the outer IPv6 header (`ipv6::tunnel_in_v6`, what `ipv6::send` does
/// for it), the backend's traffic counter, XDP_TX or a redirect. A packet to no VIP as
/// there; anything else (IPv4 backends: 6in4, GUE, ICMPv6, extension headers) goes to
/// `lb_v6` with the [`Handoff`]. It saves `lb_v6`'s call and `ipv6::send`'s (a
/// continuation called from `xdp_lb`) for the established 6in6 flow.
#[inline(always)]
pub fn established_v6(ctx: &XdpContext, l3_off: usize) -> Result<u32, Handoff> {
    let cfg = CONFIG.get(0).ok_or(Handoff::TODO)?;
    // Parsed as the whole path parses: extension headers, ICMPv6 and the like go on.
    let pkt = parse_ipv6(ctx, l3_off).map_err(|_| Handoff::TODO)?;
    let vip_key = VipKey {
        addr: pkt.key.dst,
        port: pkt.key.dport,
        proto: pkt.key.proto,
        family: FAMILY_V6,
    };
    if !pkt.tcp_syn {
        if let Some(entry) = flow_entry::<V6>(&pkt.key) {
            let hand = Handoff {
                probe: PROBE_HIT,
                value: (&raw mut *entry).cast::<u8>(),
            };
            if let Some(hit) = established_entry::<V6>(entry, &vip_key) {
                if hit.vip.flags & (VIP_F_L7 | VIP_F_QUIC) != 0
                    || hit.choice.backend.family != FAMILY_V6
                    || cfg.encap == ENCAP_GUE
                    || cfg.source_v6_host_mask != 0
                    || cfg.source_v6 == [0; 4]
                    || (cfg.mtu != 0 && u32::from(pkt.len) + IPV6_HLEN as u32 > cfg.mtu)
                {
                    return Err(hand);
                }
                // Source lists: as on the IPv4 short path.
                if !verdict_current(cfg.filter_flags, &hit.vip, hit.entry) {
                    return Err(hand);
                }
                let backend_id = hit.choice.backend_id;
                return Ok(finish(
                    tunnel_in_v6(
                        ctx,
                        l3_off,
                        pkt.len,
                        pkt.tc,
                        true,
                        &cfg.source_v6,
                        &hit.choice.backend.addr,
                        backend_id,
                    )
                    .map(|ifindex| {
                        // Only now is the packet forwarded (as in `ipv6::send`).
                        count_forwarded(backend_id, u64::from(pkt.len));
                        transmit(ctx, ifindex)
                    }),
                ));
            }
        }
    }
    to_vip::<V6>(ctx, l3_off, ETH_P_IPV6, cfg.filter_flags, vip_key)
}

/// The end of both short paths for a packet without a usable flow entry (none, stale, or
/// a new connection): its VIP `vip_key`, as `gate::resolve` looks it up then. Found: the
/// whole path takes it (and applies the global deny list first, as to any packet
/// without a usable entry). None: passed up and counted `pass_not_vip`, as there, once
/// the global deny list (in use) let the source through (else dropped under its rule):
/// the whole path's verdict and counters for such a packet (deny first; the allow lists
/// apply only to packets to a VIP).
#[inline(always)]
fn to_vip<T: FlowTables>(
    ctx: &XdpContext,
    l3_off: usize,
    proto: u16,
    filter_flags: u32,
    vip_key: T::VipKey,
) -> Result<u32, Handoff> {
    if let Some(meta) = T::vip(vip_key) {
        return Err(Handoff {
            probe: PROBE_VIP,
            value: meta.cast_mut().cast::<u8>(),
        });
    }
    if filter_flags & FILTER_F_DENY != 0 {
        let l2 = L2 { l3_off, proto };
        if let Err(exit) = deny(source(ctx, &l2, filter_flags).as_ref(), filter_flags) {
            return Ok(finish(Err(exit)));
        }
    }
    Ok(finish(Err(Exit::Pass(Counter::PassNotVip))))
}
