//! The established IPv4 flow's short path, tried by `xdp_lb` before `lb_v4` (issue 12, item 2).
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
//! checks of the whole path), no source list in use (global or the service's), no L7
//! or QUIC service, IPIP from the one `source_ipv4` (no GUE, no source prefix) and
//! within `mtu`. It then does what `lb_v4` does for such a packet: the next hop
//! (`NEXT_HOPS`, else `bpf_fib_lookup`), the bytes past the IP packet cut, the outer
//! header, the backend's traffic counter, XDP_TX or a redirect, every exit counted by
//! `gate::finish` as there. With no global source list, a TCP/UDP packet to no VIP (no
//! usable flow entry, and the VIP lookup `gate::resolve` would make finds nothing) it
//! passes up and counts `pass_not_vip`, as `lb_v4` does, rather than paying `lb_v4`'s
//! call and a second parse (README, "The non-VIP packet, fixed"). Anything else is handed to `lb_v4`
//! untouched (packet and counters), with what the probe found ([`Handoff`]: the flow's
//! entry, or the VIP's), so neither the flow nor the VIP is looked up twice.
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
        FAMILY_V4, FILTER_F_ALLOW, FILTER_F_DENY, FlowEntry, VIP_F_ALLOW, VIP_F_DENY, VIP_F_L7,
        VIP_F_QUIC, VipMeta,
    },
};

use crate::{
    encap::{Exit, transmit, tunnel_v4},
    gate::finish,
    gue::needs_entropy,
    hashing::{Probe, V4, established_entry, flow_entry},
    keys,
    maps::{CONFIG, VIPS_V4},
    parsing::{IPV4_HLEN, parse_ipv4},
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
/// (`pass_not_vip`, as the whole path passes it): Ok(the XDP action), counted.
/// Err: not finished, nothing written or counted; the whole path takes it with the
/// [`Handoff`].
#[inline(always)]
pub fn established_v4(ctx: &XdpContext, l3_off: usize) -> Result<u32, Handoff> {
    let cfg = CONFIG.get(0).ok_or(Handoff::TODO)?;
    // A source list in use may end any packet before its VIP is looked up (the global
    // deny list): the whole path's order then.
    if cfg.filter_flags & (FILTER_F_DENY | FILTER_F_ALLOW) != 0 {
        return Err(Handoff::TODO);
    }
    // Parsed as the whole path parses: fragments, options, ICMP and the like go on.
    let pkt = parse_ipv4(ctx, l3_off).map_err(|_| Handoff::TODO)?;
    let vip_key = keys::vip_key_v4(pkt.key.dst[0], pkt.key.dport, pkt.key.proto);
    if !pkt.tcp_syn {
        if let Some(entry) = flow_entry::<V4>(&keys::flow_key_v4(&pkt.key)) {
            let hand = Handoff {
                probe: PROBE_HIT,
                value: (&raw mut *entry).cast::<u8>(),
            };
            if let Some(hit) = established_entry::<V4>(entry, &vip_key) {
                if hit.vip.flags & (VIP_F_DENY | VIP_F_ALLOW | VIP_F_L7 | VIP_F_QUIC) != 0
                    || hit.choice.backend.family != FAMILY_V4
                    || needs_entropy(cfg)
                    || cfg.source_v4 == 0
                    || (cfg.mtu != 0 && u32::from(pkt.tot_len) + IPV4_HLEN as u32 > cfg.mtu)
                {
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
    // No usable entry, or a new connection: the VIP, as `gate::resolve` looks it up
    // then. None: passed up and counted as there (no list in use: nothing else could
    // end it first); else the whole path takes the VIP found.
    match VIPS_V4.get_ptr(vip_key) {
        None => Ok(finish(Err(Exit::Pass(Counter::PassNotVip)))),
        Some(meta) => Err(Handoff {
            probe: PROBE_VIP,
            value: meta.cast_mut().cast::<u8>(),
        }),
    }
}
