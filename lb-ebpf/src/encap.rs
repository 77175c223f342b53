//! IPv4-in-IPv4 encapsulation towards a backend, its reverse on the backend, and the
//! next-hop lookup that gives the Ethernet addresses of the outgoing frame.

use core::mem::{size_of, transmute};

use aya_ebpf::{
    EbpfContext as _,
    bindings::xdp_action::XDP_TX,
    bindings::{
        BPF_FIB_LKUP_RET_BLACKHOLE, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_PROHIBIT, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LKUP_RET_UNREACHABLE,
        bpf_fib_lookup as FibParams,
    },
    helpers::generated::{bpf_fib_lookup, bpf_redirect, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::stats::{Counter, DropReason};

use crate::{
    csum,
    parsing::{
        ETH_HLEN, ETH_P_IP, EthHdr, IPPROTO_IPIP, IPV4_HLEN, Ipv4Hdr, VLAN_HLEN, VlanHdr, ptr_at,
    },
    stats::count,
};

const AF_INET: u8 = 2;
/// TTL of the outer header.
pub const OUTER_TTL: u8 = 64;

/// Why a packet leaves the fast path: passed up unchanged (and why), or dropped.
#[derive(Clone, Copy)]
pub enum Exit {
    Pass(Counter),
    Drop(DropReason),
}

/// Where an encapsulated frame goes.
pub struct NextHop {
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

/// Route the outer packet `src -> dst` of `tot_len` bytes from the receiving interface.
/// "No neighbour" (the kernel has not resolved the next hop yet) and other
/// non-forwarding answers pass the packet up unchanged with their own counter;
/// unreachable routes and packets over the MTU are dropped.
///
/// The kernel answers `FWD_DISABLED` (counted as `pass_fib_failed`) unless IPv4
/// forwarding is enabled on the receiving interface, whatever the flags (measured on
/// 6.18); the agent enables it on the interface it attaches to.
#[inline(always)]
pub fn next_hop_v4(ctx: &XdpContext, src: u32, dst: u32, tot_len: u16) -> Result<NextHop, Exit> {
    let mut params = core::mem::MaybeUninit::<FibParams>::uninit();
    let p = zeroed_fib_params(&mut params);
    p.family = AF_INET;
    p.l4_protocol = IPPROTO_IPIP;
    p.__bindgen_anon_1.tot_len = tot_len;
    p.ifindex = ctx.ingress_ifindex() as u32;
    p.__bindgen_anon_3.ipv4_src = src;
    p.__bindgen_anon_4.ipv4_dst = dst;
    // SAFETY: p is a valid, writable bpf_fib_lookup of the size passed.
    let rc = unsafe { bpf_fib_lookup(ctx.as_ptr(), p, size_of::<FibParams>() as i32, 0) };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => Ok(NextHop {
            ifindex: p.ifindex,
            smac: p.smac,
            dmac: p.dmac,
        }),
        BPF_FIB_LKUP_RET_NO_NEIGH => Err(Exit::Pass(Counter::PassNoNeighbour)),
        BPF_FIB_LKUP_RET_BLACKHOLE | BPF_FIB_LKUP_RET_UNREACHABLE | BPF_FIB_LKUP_RET_PROHIBIT => {
            Err(Exit::Drop(DropReason::NoRoute))
        }
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Err(Exit::Drop(DropReason::TooBig)),
        _ => Err(Exit::Pass(Counter::PassFibFailed)),
    }
}

const FIB_WORDS: usize = size_of::<FibParams>() / 4;
const _: () = assert!(size_of::<FibParams>() == FIB_WORDS * 4);

/// `params` cleared with word stores, in place: `mem::zeroed()` compiles to a call to
/// a byte-by-byte `memset` (~390 instructions, ~34 ns per packet measured by
/// `cargo xtask bench xdp`); volatile stores keep LLVM from turning them back into
/// one. In place, because returning the cleared struct by value let LLVM copy it and
/// re-zero the copy with a `memset` call again (issue 12).
#[inline(always)]
pub fn zeroed_fib_params(params: &mut core::mem::MaybeUninit<FibParams>) -> &mut FibParams {
    let words = params.as_mut_ptr().cast::<u32>();
    for i in 0..FIB_WORDS {
        // SAFETY: i < FIB_WORDS, so every store is inside the struct, which is 4-aligned.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
    // SAFETY: every byte was written; all-zero is a valid bpf_fib_lookup (plain integers
    // and unions of them).
    unsafe { params.assume_init_mut() }
}

/// The outer IPv4 header, checksum filled in.
#[inline(always)]
pub fn outer_ipv4(src: u32, dst: u32, inner_len: u16, tos: u8) -> Ipv4Hdr {
    outer_ipv4_proto(src, dst, inner_len, tos, IPPROTO_IPIP)
}

/// An outer IPv4 header carrying `payload_len` bytes of protocol `protocol` (IPIP, or
/// UDP for GUE), checksum filled in.
#[inline(always)]
pub fn outer_ipv4_proto(src: u32, dst: u32, payload_len: u16, tos: u8, protocol: u8) -> Ipv4Hdr {
    let mut hdr = Ipv4Hdr {
        version_ihl: 0x45,
        tos,
        tot_len: (payload_len + IPV4_HLEN as u16).to_be(),
        id: 0,
        frag_off: 0,
        ttl: OUTER_TTL,
        protocol,
        check: 0,
        saddr: src,
        daddr: dst,
    };
    // SAFETY: Ipv4Hdr is 20 bytes of plain integers with no padding.
    let words: [u16; 10] = unsafe { transmute(hdr) };
    hdr.check = csum::ipv4_header(&words);
    hdr
}

/// Cut the frame to `end` bytes: bytes after the IP packet (Ethernet padding of a short
/// frame, a trailer) must not go into the tunnel, where the backend would take them
/// for part of the inner packet's frame and the MTU check would not have counted them.
/// A frame with nothing past `end` (the usual case) costs one comparison.
#[inline(always)]
pub fn trim_to(ctx: &XdpContext, end: usize) -> Result<(), DropReason> {
    let len = ctx.data_end() - ctx.data();
    if len > end {
        let cut = (len - end) as i32;
        // SAFETY: ctx.ctx is the program's xdp_md; the kernel checks the new length.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, -cut) } != 0 {
            return Err(DropReason::EncapFailed);
        }
    }
    Ok(())
}

/// Replace the L2 header ending at `l3_off` with Ethernet + the given outer IPv4 header.
/// The inner packet (from `l3_off` on) is not touched: replies go straight from the
/// backend to the client.
#[inline(always)]
pub fn encap_ipv4(
    ctx: &XdpContext,
    l3_off: usize,
    outer: &Ipv4Hdr,
    hop: &NextHop,
) -> Result<(), DropReason> {
    push_outer(ctx, l3_off, ETH_P_IP, outer, hop)
}

/// Replace the L2 header ending at `l3_off` with Ethernet (`ethertype`, the hop's MACs)
/// + `outer`, the outer IP header of either family; the inner packet is not touched.
#[inline(always)]
pub fn push_outer<H: Copy>(
    ctx: &XdpContext,
    l3_off: usize,
    ethertype: u16,
    outer: &H,
    hop: &NextHop,
) -> Result<(), DropReason> {
    let grow = (ETH_HLEN + size_of::<H>()) as i32 - l3_off as i32;
    // SAFETY: ctx.ctx is the program's xdp_md.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -grow) } != 0 {
        return Err(DropReason::EncapFailed);
    }
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(DropReason::EncapFailed)?;
    let ip = ptr_at::<H>(ctx, ETH_HLEN).ok_or(DropReason::EncapFailed)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        *eth = EthHdr {
            dst: hop.dmac,
            src: hop.smac,
            proto: ethertype,
        };
        *ip = *outer;
    }
    Ok(())
}

/// Tunnel the IPv4 packet at `l3_off` (`tot_len` bytes, type of service `tos`) from
/// `source` to `backend` (backend id `backend_id`): next hop, bytes past the IP packet
/// cut, outer header in front. The caller accounts the traffic and then sends it with
/// [`transmit`].
#[inline(always)]
pub fn tunnel_v4(
    ctx: &XdpContext,
    l3_off: usize,
    tot_len: u16,
    tos: u8,
    source: u32,
    backend: u32,
    backend_id: u32,
) -> Result<u32, Exit> {
    let hop = crate::nexthop::next_hop_for_v4(
        ctx,
        backend_id,
        source,
        backend,
        tot_len + IPV4_HLEN as u16,
    )?;
    let outer = outer_ipv4(source, backend, tot_len, tos);
    trim_to(ctx, l3_off + usize::from(tot_len)).map_err(Exit::Drop)?;
    encap_ipv4(ctx, l3_off, &outer, &hop).map_err(Exit::Drop)?;
    Ok(hop.ifindex)
}

/// Send a tunnelled frame towards `ifindex`: back out (XDP_TX) or redirected, counted.
#[inline(always)]
pub fn transmit(ctx: &XdpContext, ifindex: u32) -> u32 {
    if ifindex == ctx.ingress_ifindex() as u32 {
        count(Counter::Tx);
        XDP_TX
    } else {
        count(Counter::Redirect);
        // SAFETY: plain helper call; the kernel validates the ifindex.
        unsafe { bpf_redirect(ifindex, 0) as u32 }
    }
}

/// The frame could not be shrunk or re-read after decapsulation.
pub struct DecapFailed;

/// Remove the outer IPv4 header at `l3_off` (20 bytes, checked by the caller), moving
/// the Ethernet header (and its VLAN tag, if any) forward so the inner packet follows it.
#[inline(always)]
pub fn decap_ipv4(ctx: &XdpContext, l3_off: usize) -> Result<(), DecapFailed> {
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(DecapFailed)?;
    // SAFETY: bounds checked by ptr_at.
    let mut eth_copy = unsafe { *eth };
    eth_copy.proto = ETH_P_IP;
    let vlan_copy = if l3_off == ETH_HLEN + VLAN_HLEN {
        let vlan = ptr_at::<VlanHdr>(ctx, ETH_HLEN).ok_or(DecapFailed)?;
        // SAFETY: bounds checked by ptr_at.
        let mut v = unsafe { *vlan };
        v.proto = ETH_P_IP;
        // The outer tag keeps its own EtherType.
        // SAFETY: bounds checked by ptr_at.
        eth_copy.proto = unsafe { (*eth).proto };
        Some(v)
    } else {
        None
    };
    // SAFETY: ctx.ctx is the program's xdp_md.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, IPV4_HLEN as i32) } != 0 {
        return Err(DecapFailed);
    }
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(DecapFailed)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { *eth = eth_copy };
    if let Some(v) = vlan_copy {
        let vlan = ptr_at::<VlanHdr>(ctx, ETH_HLEN).ok_or(DecapFailed)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe { *vlan = v };
    }
    Ok(())
}
