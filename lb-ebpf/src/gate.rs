//! The source filters as both address families' paths apply them: the global deny list
//! before anything else, then, once the packet is known to be for a VIP, the global
//! allow list, the service's own lists, and the L7 hand-off (see `filter.rs` for the
//! lists themselves); and [`finish`], the end of every path.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    maps::lpm_trie::Key,
    programs::XdpContext,
};
use lb_common::{
    stats::Counter,
    types::{
        FILTER_F_ALLOW, FILTER_F_DENY, FilterAddr, FlowEntry, VIP_F_ALLOW, VIP_F_DENY, VIP_F_L7,
        VIP_F_QUIC, VipMeta,
    },
};

use crate::{
    encap::Exit,
    filter,
    hashing::{self, Choice, FlowTables, Probe},
    parsing::L2,
    stats::{count, count_drop},
};

/// What a path may return besides an XDP action (0..=4): a continuation for `xdp_lb`,
/// which calls the named BPF subprogram next. Each such subprogram is then a sibling of
/// the path that asked for it, not its callee, so their stack frames never add up: only
/// `xdp_lb` + one path (+ `limit::admit`) and `xdp_lb` + one continuation are call
/// chains against BPF's 512 bytes.
///
/// Tunnel the packet as the `Forward` the path wrote says (`ipv6::send`).
pub const NEXT_SEND: u32 = 0x10;
/// ICMP to a VIP address (`icmp::handle`).
pub const NEXT_ICMP4: u32 = 0x11;
/// ICMPv6 to a VIP address (`icmp6::handle`).
pub const NEXT_ICMP6: u32 = 0x12;
/// "Fragmentation needed" (`icmp::too_big`); bits 16.. carry its MTU argument.
pub const NEXT_TOO_BIG4: u32 = 0x13;
/// "Packet too big" (`icmp6::too_big`); bits 16.. carry the MTU to announce.
pub const NEXT_TOO_BIG6: u32 = 0x14;

/// A continuation with an MTU argument.
#[inline(always)]
pub const fn with_mtu(next: u32, mtu: u32) -> u32 {
    next | (mtu << 16)
}

/// The verdict of a path's result, its counter counted: what every BPF subprogram of
/// the balancer that ends a packet's path returns (the caller counts nothing more).
#[inline(always)]
pub fn finish(result: Result<u32, Exit>) -> u32 {
    match result {
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

/// The source's trie key when a global list is in use (None otherwise: no list costs
/// nothing but the flags read).
///
/// Kept apart from [`deny`] on purpose: returned inside a `Result`, the undefined
/// payload of a `None` was copied through registers the verifier had never seen written
/// ("R3 !read_ok").
#[inline(always)]
pub fn source(ctx: &XdpContext, l2: &L2, filter_flags: u32) -> Option<Key<FilterAddr>> {
    if filter_flags & (FILTER_F_DENY | FILTER_F_ALLOW) != 0 {
        filter::source(ctx, l2)
    } else {
        None
    }
}

/// The global deny list, for every IP packet whose source [`source`] gave.
#[inline(always)]
pub fn deny(src: Option<&Key<FilterAddr>>, filter_flags: u32) -> Result<(), Exit> {
    if let Some(src) = src {
        if filter_flags & FILTER_F_DENY != 0 {
            filter::check_deny(src)?;
        }
    }
    Ok(())
}

/// For a packet to `vip`: the global allow list (L7 VIPs included), the service's own
/// deny and allow lists (a VIP without them pays nothing), then L7 VIPs go up.
#[inline(always)]
pub fn vip(
    ctx: &XdpContext,
    l2: &L2,
    filter_flags: u32,
    src: Option<&Key<FilterAddr>>,
    vip: &VipMeta,
) -> Result<(), Exit> {
    if let Some(src) = src {
        if filter_flags & FILTER_F_ALLOW != 0 {
            filter::check_allow(src)?;
        }
    }
    if vip.flags & (VIP_F_DENY | VIP_F_ALLOW) != 0 {
        let own = match src {
            Some(src) => Some(filter::scoped(src, vip.service_id)),
            None => filter::source(ctx, l2).map(|s| filter::scoped(&s, vip.service_id)),
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
    Ok(())
}

/// Whether a source list applies to packets to a VIP with `vip_flags`: a global one, or
/// the service's own.
#[inline(always)]
pub fn lists_apply(filter_flags: u32, vip_flags: u32) -> bool {
    filter_flags & (FILTER_F_DENY | FILTER_F_ALLOW) != 0
        || vip_flags & (VIP_F_DENY | VIP_F_ALLOW) != 0
}

/// Whether the established flow's `entry` to `vip` needs no list lookup: no list applies,
/// or its source passed them as they are now (its `filter_gen` is the current
/// generation; see [`established`]). The short paths (short.rs) ask this; the whole
/// path runs the lists when it says no.
#[inline(always)]
pub fn verdict_current(filter_flags: u32, vip: &VipMeta, entry: &FlowEntry) -> bool {
    !lists_apply(filter_flags, vip.flags) || entry.filter_gen == hashing::filter_gen()
}

/// For a packet of an established flow (a flow-table hit on the short path, before any
/// filter ran) to `vip`: the source filters, unless the flow's entry says its source
/// passed them as they are now, then the L7 hand-off as [`vip`].
///
/// The entry's `filter_gen` equal to the current generation ([`hashing::filter_gen`])
/// means the flow's source passed every list in use since the agent's last change of
/// them (the agent bumps the generation after each pass that wrote a trie or the flags
/// that enable one): the global deny and allow lists and the service's own depend only
/// on the source and the service, both fixed for the flow. Otherwise the lists are
/// looked up as for any packet, and once they pass the entry takes the generation read
/// before them (a list written while they ran leaves the entry behind the bump: its
/// next packet looks again). With no list in use the generation is not even read.
#[inline(always)]
pub fn established(
    ctx: &XdpContext,
    l2: &L2,
    filter_flags: u32,
    vip: &VipMeta,
    entry: &mut FlowEntry,
) -> Result<(), Exit> {
    // `lists_apply`, spelled out: called here, LLVM laid `lb_v4` and `lb_v6` out 31
    // and 34 instructions longer (llvm-objdump), for the same test.
    if filter_flags & (FILTER_F_DENY | FILTER_F_ALLOW) != 0
        || vip.flags & (VIP_F_DENY | VIP_F_ALLOW) != 0
    {
        let generation = hashing::filter_gen();
        if entry.filter_gen != generation {
            let src = source(ctx, l2, filter_flags);
            deny(src.as_ref(), filter_flags)?;
            self::vip(ctx, l2, filter_flags, src.as_ref(), vip)?;
            // Were the entry evicted and reused by another flow since the lookup (the
            // LRU recycles entries at once), that flow, admitted a moment before, takes
            // this generation: it matters only if a list changed in between, and only
            // until the next bump (README, "Filter verdicts of established flows").
            entry.filter_gen = generation;
            return Ok(());
        }
    }
    if vip.flags & VIP_F_L7 != 0 {
        return Err(Exit::Pass(Counter::PassL7));
    }
    Ok(())
}

/// The start of both families' paths after parsing: the packet's VIP (its meta), the
/// backend of its established flow when the short path found one, and the filter
/// generation to store in the flow entries the packet writes (0 on the short path,
/// which writes none).
///
/// An established flow's packet (not a SYN: `new_connection`) looks its flow up first
/// (`fkey` in the family's table `T`; `probe`: unless the IPv4 short path did, and maybe
/// looked the VIP up too, see [`Probe`]): a hit gives the backend, whose service's entry
/// gives the VIP's meta, with no VIP lookup ([`hashing::established`]), and its entry
/// says whether its source already passed the filters as they are now ([`established`]).
/// Otherwise: the generation read before the lists, the global deny list, the VIP
/// `vip_key` looked up (none: passed up as `pass_not_vip`), then the allow lists, the
/// service's own lists and the L7 hand-off ([`vip`]).
#[inline(always)]
pub fn resolve<T: FlowTables>(
    ctx: &XdpContext,
    l2: &L2,
    filter_flags: u32,
    new_connection: bool,
    probe: Probe,
    fkey: &T::Key,
    vip_key: &T::VipKey,
) -> Result<(VipMeta, Option<Choice>, u32), Exit> {
    // The VIP the short path already looked up, if it did.
    let mut found = None;
    let hit = match probe {
        Probe::Vip(meta) => {
            found = Some(meta);
            None
        }
        _ if new_connection => None,
        Probe::Todo => hashing::established::<T>(fkey, vip_key),
        Probe::Hit(entry) => hashing::established_entry::<T>(entry, vip_key),
    };
    if let Some(hit) = hit {
        if hit.vip.flags & VIP_F_QUIC != 0 {
            // A QUIC service's flow: its VIP found without the VIP lookup, but the
            // connection ID decides first (quic.rs), then the flow tables as on the
            // whole path, which may write an entry: the generation is read before the
            // lists, as there.
            let filter_gen = hashing::filter_gen();
            established(ctx, l2, filter_flags, &hit.vip, hit.entry)?;
            return Ok((hit.vip, None, filter_gen));
        }
        established(ctx, l2, filter_flags, &hit.vip, hit.entry)?;
        return Ok((hit.vip, Some(hit.choice), 0));
    }
    // Read before the lists: stored in the flow entries this packet writes.
    let filter_gen = hashing::filter_gen();
    let src = source(ctx, l2, filter_flags);
    deny(src.as_ref(), filter_flags)?;
    // The short path's lookup of the same key (made before any list: the lists this
    // run reads, the deny list above and the rest below, apply as to any packet).
    let meta = match found {
        Some(meta) => *meta,
        // SAFETY: a preallocated VIP map's value, written whole by the agent.
        None => unsafe { *T::vip(*vip_key).ok_or(Exit::Pass(Counter::PassNotVip))? },
    };
    // The allow list (L7 VIPs included), the service's own lists, then L7 goes up.
    vip(ctx, l2, filter_flags, src.as_ref(), &meta)?;
    Ok((meta, None, filter_gen))
}
