//! Floor programs for `cargo xtask bench xdp`: what the balancer is measured against,
//! built in the same run with the same compiler. Not used by the agent.
//! - `floor_pass`: XDP_PASS and nothing else.
//! - `floor_drop`: XDP_DROP and nothing else (`bench wire`'s backend side: the veth
//!   counts what arrives, `xdp_drops`, and nothing else is spent on it).
//! - `wire_gen`: `bench wire`'s generator, run by `test_run` in live-frames mode: writes
//!   the frame's first 48 bytes from `WIRE_HEAD` and returns the verdict in `WIRE_VERDICT`
//!   (XDP_TX: out of the ingress veth as an XDP frame; XDP_PASS: into its stack). The
//!   live-frames page pool recycles pages with whatever the path after the generator
//!   wrote into them (the balancer's encapsulation, the stack's MAC rewrite, DNAT), so
//!   the header is written anew on every frame.
//! - `floor_tx`: parse Ethernet/IPv4/ports, swap MACs, XDP_TX.
//! - `floor_ipip`: parse, one hash lookup (VIP address -> backend address), IPIP
//!   encapsulation, XDP_TX.
//! - `floor_6in6` and `floor_gue`: the same job for the other tunnels the balancer
//!   writes, so that each feature row is compared with the floor of its own
//!   encapsulation: parse IPv6 (`ipv6::parse_ipv6`, the balancer's parser), one hash
//!   lookup (16-byte VIP address -> IPv6 backend), a 40-byte IPv6 outer header (next
//!   header 41), XDP_TX; and parse IPv4, the lookup of `floor_ipip`, an IPv4 + UDP outer
//!   header to [`BENCH_GUE_PORT`] (GUE variant 1, UDP checksum 0 as over IPv4 the
//!   balancer writes, source port from the flow's `tunnel_entropy` as GUE asks), XDP_TX.
//!   Both write their outer header with the balancer's `encap::push_outer`.
//! - `bench_wrap`: the harness for `test_run` with `repeat`: the kernel does not reset
//!   the packet between repeats, so this undoes the previous iteration's IPIP
//!   encapsulation (restoring the original Ethernet header from `BENCH_ETH`), optionally
//!   gives every iteration a new source port (new-flow benchmark), and tail-calls the
//!   program under test in `BENCH_PROGS[0]`. Its own cost is measured with `floor_pass`
//!   as the target and subtracted.
//! - `bench_wrap6` and `bench_wrap_gue`: the same for the other outer headers the
//!   balancer writes: a 40-byte IPv6 header (6in6 / 4in6: EtherType IPv6, next header 41
//!   or 4) and a 28-byte IPv4 + UDP header to the GUE port [`BENCH_GUE_PORT`]. One
//!   wrapper per kind, so `bench_wrap` (IPIP) stays instruction for instruction what
//!   it was; each kind's own cost is measured with `floor_pass` behind it, on a frame
//!   of that kind, and subtracted from that kind's rows. No new-port mode.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action::{XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX},
    helpers::generated::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{Array, HashMap, PerCpuArray, ProgramArray},
    programs::XdpContext,
};
use lb_common::hash::{gue_source_port, tunnel_entropy};
use lb_ebpf::{
    encap::{NextHop, outer_ipv4, outer_ipv4_proto, push_outer},
    gue::{Gue4Hdr, udp_header},
    ipv6::{Ipv6Hdr, parse_ipv6},
    parsing::{
        ETH_HLEN, ETH_P_IP, ETH_P_IPV6, EthHdr, IPPROTO_IPIP, IPV4_HLEN, Ipv4Hdr, Ports,
        parse_ipv4, parse_l2, ptr_at,
    },
};

/// floor_ipip's one lookup: VIP address (network order) -> backend address.
#[map(name = "FLOOR_BACKENDS")]
static FLOOR_BACKENDS: HashMap<u32, u32> = HashMap::with_max_entries(64, 0);

/// floor_6in6's one lookup: IPv6 VIP address -> IPv6 backend address (network order
/// words, as the packet holds them).
#[map(name = "FLOOR_BACKEND6")]
static FLOOR_BACKENDS6: HashMap<[u32; 4], [u32; 4]> = HashMap::with_max_entries(64, 0);

#[map(name = "BENCH_PROGS")]
static BENCH_PROGS: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// `[0]`: the original 14-byte Ethernet header of the benchmark packet, padded.
#[map(name = "BENCH_ETH")]
static BENCH_ETH: Array<[u8; 16]> = Array::with_max_entries(1, 0);

/// `[0]`: 1 = give every iteration a new source port.
#[map(name = "BENCH_MODE")]
static BENCH_MODE: Array<u32> = Array::with_max_entries(1, 0);

#[map(name = "BENCH_SPORT")]
static BENCH_SPORT: PerCpuArray<u16> = PerCpuArray::with_max_entries(1, 0);

/// Outer source of floor_ipip's tunnel.
const FLOOR_SOURCE: u32 = u32::from_ne_bytes([198, 18, 1, 10]);
/// Outer source of floor_6in6's tunnel: fd00:18:1::10, network order words.
const FLOOR_SOURCE6: [u32; 4] = [
    u32::from_ne_bytes([0xfd, 0x00, 0x00, 0x18]),
    u32::from_ne_bytes([0x00, 0x01, 0x00, 0x00]),
    0,
    u32::from_ne_bytes([0x00, 0x00, 0x00, 0x10]),
];

#[xdp]
pub fn floor_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

#[xdp]
pub fn floor_drop(_ctx: XdpContext) -> u32 {
    XDP_DROP
}

/// `[0]`: `wire_gen`'s header: Ethernet + IPv4 + UDP (42 bytes) and 6 payload bytes.
#[map(name = "WIRE_HEAD")]
static WIRE_HEAD: Array<[u64; 6]> = Array::with_max_entries(1, 0);

/// `[0]`: `wire_gen`'s verdict (XDP_TX or XDP_PASS).
#[map(name = "WIRE_VERDICT")]
static WIRE_VERDICT: Array<u32> = Array::with_max_entries(1, 0);

#[xdp]
pub fn wire_gen(ctx: XdpContext) -> u32 {
    let (Some(head), Some(verdict)) = (WIRE_HEAD.get(0), WIRE_VERDICT.get(0)) else {
        return XDP_ABORTED;
    };
    let Some(dst) = ptr_at::<[u64; 6]>(&ctx, 0) else {
        return XDP_ABORTED;
    };
    // SAFETY: bounds checked by ptr_at; unaligned stores into the packet.
    unsafe {
        let dst = dst as *mut u64;
        for (i, w) in head.iter().enumerate() {
            dst.add(i).write_unaligned(*w);
        }
    }
    *verdict
}

#[xdp]
pub fn floor_tx(ctx: XdpContext) -> u32 {
    match try_floor_tx(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

#[inline(always)]
fn try_floor_tx(ctx: &XdpContext) -> Result<u32, u32> {
    let l2 = parse_l2(ctx).map_err(|_| XDP_PASS)?;
    if l2.proto != ETH_P_IP {
        return Err(XDP_PASS);
    }
    parse_ipv4(ctx, l2.l3_off).map_err(|_| XDP_PASS)?;
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(XDP_PASS)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        let e = *eth;
        (*eth).dst = e.src;
        (*eth).src = e.dst;
    }
    Ok(XDP_TX)
}

#[xdp]
pub fn floor_ipip(ctx: XdpContext) -> u32 {
    match try_floor_ipip(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

#[inline(always)]
fn try_floor_ipip(ctx: &XdpContext) -> Result<u32, u32> {
    let l2 = parse_l2(ctx).map_err(|_| XDP_PASS)?;
    if l2.proto != ETH_P_IP {
        return Err(XDP_PASS);
    }
    let pkt = parse_ipv4(ctx, l2.l3_off).map_err(|_| XDP_PASS)?;
    // SAFETY: preallocated hash map, read-only here.
    let backend = *unsafe { FLOOR_BACKENDS.get(pkt.key.dst[0]) }.ok_or(XDP_PASS)?;
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(XDP_PASS)?;
    // SAFETY: bounds checked by ptr_at.
    let e = unsafe { *eth };
    let outer = outer_ipv4(FLOOR_SOURCE, backend, pkt.tot_len, pkt.tos);
    let grow = (ETH_HLEN + IPV4_HLEN) as i32 - pkt.l3_off as i32;
    // SAFETY: ctx.ctx is the program's xdp_md.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -grow) } != 0 {
        return Err(XDP_ABORTED);
    }
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(XDP_ABORTED)?;
    let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN).ok_or(XDP_ABORTED)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        *eth = EthHdr {
            dst: e.src,
            src: e.dst,
            proto: ETH_P_IP,
        };
        *ip = outer;
    }
    Ok(XDP_TX)
}

#[xdp]
pub fn floor_6in6(ctx: XdpContext) -> u32 {
    match try_floor_6in6(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

#[inline(always)]
fn try_floor_6in6(ctx: &XdpContext) -> Result<u32, u32> {
    let l2 = parse_l2(ctx).map_err(|_| XDP_PASS)?;
    if l2.proto != ETH_P_IPV6 {
        return Err(XDP_PASS);
    }
    let pkt = parse_ipv6(ctx, l2.l3_off).map_err(|_| XDP_PASS)?;
    // SAFETY: preallocated hash map, read-only here.
    let backend = *unsafe { FLOOR_BACKENDS6.get(pkt.key.dst) }.ok_or(XDP_PASS)?;
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(XDP_PASS)?;
    // SAFETY: bounds checked by ptr_at.
    let e = unsafe { *eth };
    let outer = Ipv6Hdr {
        vtc_flow: Ipv6Hdr::vtc(pkt.tc),
        payload_len: pkt.len.to_be(),
        nexthdr: IPPROTO_IPV6,
        hop_limit: 64,
        saddr: FLOOR_SOURCE6,
        daddr: backend,
    };
    let hop = NextHop {
        ifindex: 0,
        smac: e.dst,
        dmac: e.src,
    };
    push_outer(ctx, l2.l3_off, ETH_P_IPV6, &outer, &hop).map_err(|_| XDP_ABORTED)?;
    Ok(XDP_TX)
}

#[xdp]
pub fn floor_gue(ctx: XdpContext) -> u32 {
    match try_floor_gue(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

#[inline(always)]
fn try_floor_gue(ctx: &XdpContext) -> Result<u32, u32> {
    let l2 = parse_l2(ctx).map_err(|_| XDP_PASS)?;
    if l2.proto != ETH_P_IP {
        return Err(XDP_PASS);
    }
    let pkt = parse_ipv4(ctx, l2.l3_off).map_err(|_| XDP_PASS)?;
    // SAFETY: preallocated hash map, read-only here.
    let backend = *unsafe { FLOOR_BACKENDS.get(pkt.key.dst[0]) }.ok_or(XDP_PASS)?;
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(XDP_PASS)?;
    // SAFETY: bounds checked by ptr_at.
    let e = unsafe { *eth };
    let sport = gue_source_port(tunnel_entropy(&pkt.key)).to_be();
    let outer = Gue4Hdr {
        ip: outer_ipv4_proto(
            FLOOR_SOURCE,
            backend,
            pkt.tot_len + UDP_HLEN as u16,
            pkt.tos,
            IPPROTO_UDP,
        ),
        udp: udp_header(sport, BENCH_GUE_PORT.to_be(), pkt.tot_len),
    };
    let hop = NextHop {
        ifindex: 0,
        smac: e.dst,
        dmac: e.src,
    };
    push_outer(ctx, pkt.l3_off, ETH_P_IP, &outer, &hop).map_err(|_| XDP_ABORTED)?;
    Ok(XDP_TX)
}

#[xdp]
pub fn bench_wrap(ctx: XdpContext) -> u32 {
    match try_wrap(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

#[inline(always)]
fn try_wrap(ctx: &XdpContext) -> Result<u32, u32> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN).ok_or(XDP_ABORTED)?;
    // SAFETY: bounds checked by ptr_at.
    if unsafe { (*ip).protocol } == IPPROTO_IPIP {
        // SAFETY: ctx.ctx is the program's xdp_md.
        if unsafe { bpf_xdp_adjust_head(ctx.ctx, IPV4_HLEN as i32) } != 0 {
            return Err(XDP_ABORTED);
        }
    }
    // Restore the original Ethernet header (every program under test rewrites it).
    let orig = BENCH_ETH.get(0).ok_or(XDP_ABORTED)?;
    let eth = ptr_at::<[u8; ETH_HLEN]>(ctx, 0).ok_or(XDP_ABORTED)?;
    // SAFETY: bounds checked by ptr_at; orig is at least ETH_HLEN bytes.
    unsafe { *eth = *(orig.as_ptr() as *const [u8; ETH_HLEN]) };
    if BENCH_MODE.get(0).is_some_and(|m| *m == 1) {
        let counter = BENCH_SPORT.get_ptr_mut(0).ok_or(XDP_ABORTED)?;
        let ports = ptr_at::<Ports>(ctx, ETH_HLEN + IPV4_HLEN).ok_or(XDP_ABORTED)?;
        // SAFETY: per-CPU slot and bounds-checked packet pointer.
        unsafe {
            *counter = (*counter).wrapping_add(1);
            (*ports).source = *counter;
        }
    }
    // SAFETY: tail call with the program's own context; returns only on failure.
    unsafe { BENCH_PROGS.tail_call(ctx, 0) };
    Err(XDP_ABORTED)
}

/// The GUE port of the benchmark's balancer (`gue_port`): `bench_wrap_gue` strips a
/// UDP datagram to it.
pub const BENCH_GUE_PORT: u16 = 6080;
const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();
const IPV6_HLEN: usize = 40;
const IPPROTO_IPV6: u8 = 41;
const IPPROTO_UDP: u8 = 17;
const UDP_HLEN: usize = 8;

#[xdp]
pub fn bench_wrap6(ctx: XdpContext) -> u32 {
    match try_wrap6(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

#[inline(always)]
fn try_wrap6(ctx: &XdpContext) -> Result<u32, u32> {
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(XDP_ABORTED)?;
    // The next header of the 40-byte IPv6 header after Ethernet.
    let next = ptr_at::<u8>(ctx, ETH_HLEN + 6).ok_or(XDP_ABORTED)?;
    // SAFETY: bounds checked by ptr_at.
    let (proto, next) = unsafe { ((*eth).proto, *next) };
    if proto == ETH_P_IPV6_BE && (next == IPPROTO_IPV6 || next == IPPROTO_IPIP) {
        // SAFETY: ctx.ctx is the program's xdp_md.
        if unsafe { bpf_xdp_adjust_head(ctx.ctx, IPV6_HLEN as i32) } != 0 {
            return Err(XDP_ABORTED);
        }
    }
    restore_and_call(ctx)
}

#[xdp]
pub fn bench_wrap_gue(ctx: XdpContext) -> u32 {
    match try_wrap_gue(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

#[inline(always)]
fn try_wrap_gue(ctx: &XdpContext) -> Result<u32, u32> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN).ok_or(XDP_ABORTED)?;
    let ports = ptr_at::<Ports>(ctx, ETH_HLEN + IPV4_HLEN).ok_or(XDP_ABORTED)?;
    // SAFETY: bounds checked by ptr_at.
    let (protocol, dport) = unsafe { ((*ip).protocol, (*ports).dest) };
    if protocol == IPPROTO_UDP && dport == BENCH_GUE_PORT.to_be() {
        // SAFETY: ctx.ctx is the program's xdp_md.
        if unsafe { bpf_xdp_adjust_head(ctx.ctx, (IPV4_HLEN + UDP_HLEN) as i32) } != 0 {
            return Err(XDP_ABORTED);
        }
    }
    restore_and_call(ctx)
}

/// The common tail of `bench_wrap6` and `bench_wrap_gue`: restore the original Ethernet
/// header and tail-call the program under test.
#[inline(always)]
fn restore_and_call(ctx: &XdpContext) -> Result<u32, u32> {
    let orig = BENCH_ETH.get(0).ok_or(XDP_ABORTED)?;
    let eth = ptr_at::<[u8; ETH_HLEN]>(ctx, 0).ok_or(XDP_ABORTED)?;
    // SAFETY: bounds checked by ptr_at; orig is at least ETH_HLEN bytes.
    unsafe { *eth = *(orig.as_ptr() as *const [u8; ETH_HLEN]) };
    // SAFETY: tail call with the program's own context; returns only on failure.
    unsafe { BENCH_PROGS.tail_call(ctx, 0) };
    Err(XDP_ABORTED)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
