//! Next hops of tunnelled packets from the agent's `NEXT_HOPS` map (issue 12, item 1),
//! with `bpf_fib_lookup` as the fallback.
//!
//! The agent writes each backend's egress interface, MACs and path MTU into
//! `NEXT_HOPS[backend id]` (`lb-agent/src/dataplane/nexthop.rs`) and keeps them current
//! from netlink events. [`cached`] reads that entry: one array lookup instead of a FIB
//! walk and a neighbour lookup per packet. The entry is used only while it is valid and
//! was written for the backend's own address and family, so a backend id the agent
//! reused before rewriting its next hop never sends a packet to the old backend's
//! neighbour. Anything else goes to [`fib_v4`], `bpf_fib_lookup` as before, in a
//! subprogram of its own so its 64-byte parameter block stays out of `xdp_lb`'s frame.
//!
//! An entry the agent rewrites while a packet reads it can be seen half old, half new
//! (array values are copied in place, as Katran's next-hop array is): only the packets
//! of that instant, and only when a next hop changes.
//!
//! For the IPv6 path: `cached(backend_id, FAMILY_V6, &backend.addr, outer_len)` gives
//! the hop (or None: fall back to its own fib lookup).

use aya_ebpf::programs::XdpContext;
use core::mem::transmute;

use lb_common::{
    stats::{Counter, DropReason},
    types::{FAMILY_V4, NEXT_HOP_F_VALID},
};

use crate::{
    encap::{Exit, NextHop, next_hop_v4},
    maps::NEXT_HOPS,
};

/// The next hop the agent wrote for `backend_id`, if that entry is valid for the
/// backend at `addr` (`family`); Err(too_big) when `outer_len` (the whole outer packet)
/// exceeds the entry's MTU, as `bpf_fib_lookup` answers "fragmentation needed".
#[inline(always)]
pub fn cached(
    backend_id: u32,
    family: u8,
    addr: &[u32; 4],
    outer_len: u16,
) -> Option<Result<NextHop, Exit>> {
    let e = NEXT_HOPS.get(backend_id)?;
    if e.flags & NEXT_HOP_F_VALID == 0
        || e.family != family
        || e.addr[0] != addr[0]
        || e.addr[1] != addr[1]
        || e.addr[2] != addr[2]
        || e.addr[3] != addr[3]
    {
        return None;
    }
    if outer_len > e.mtu {
        return Some(Err(Exit::Drop(DropReason::TooBig)));
    }
    Some(Ok(NextHop {
        ifindex: e.ifindex,
        smac: e.smac,
        dmac: e.dmac,
    }))
}

/// The next hop of an IPv4 tunnel packet `src -> backend` of `outer_len` bytes to
/// backend `backend_id`: the agent's entry, else `bpf_fib_lookup`.
#[inline(always)]
pub fn next_hop_for_v4(
    ctx: &XdpContext,
    backend_id: u32,
    src: u32,
    backend: u32,
    outer_len: u16,
) -> Result<NextHop, Exit> {
    if let Some(hop) = cached(backend_id, FAMILY_V4, &[backend, 0, 0, 0], outer_len) {
        return hop;
    }
    let mut hop = core::mem::MaybeUninit::<NextHop>::uninit();
    let answer = fib_v4(ctx, src, backend, outer_len, hop.as_mut_ptr());
    match answer >> 32 {
        // SAFETY: fib_v4 wrote the hop (all 16 bytes: no padding).
        0 => Ok(unsafe { hop.assume_init() }),
        // SAFETY: the low word is a Counter (resp. DropReason) fib_v4 turned into a
        // number: both are #[repr(u32)].
        PASS => Err(Exit::Pass(unsafe {
            transmute::<u32, Counter>(answer as u32)
        })),
        _ => Err(Exit::Drop(unsafe {
            transmute::<u32, DropReason>(answer as u32)
        })),
    }
}

/// `fib_v4`'s answer for [`Exit::Pass`] (high word; the low word is the counter).
const PASS: u64 = 1;
/// `fib_v4`'s answer for [`Exit::Drop`] (high word; the low word is the reason).
const DROP: u64 = 2;

/// [`next_hop_v4`] (`bpf_fib_lookup`) in a subprogram: entered only on a miss, and its
/// parameter block lives in this frame, not in `xdp_lb`'s. BPF functions return one
/// register: 0 with the hop written to `hop`, else the exit as `PASS`/`DROP` << 32 |
/// its code (an enum written through a pointer would carry undefined padding, which
/// the verifier refuses to read).
#[inline(never)]
fn fib_v4(ctx: &XdpContext, src: u32, dst: u32, tot_len: u16, hop: *mut NextHop) -> u64 {
    match next_hop_v4(ctx, src, dst, tot_len) {
        Ok(h) => {
            // SAFETY: `hop` points to the caller's MaybeUninit<NextHop>.
            unsafe { hop.write(h) };
            0
        }
        Err(Exit::Pass(c)) => PASS << 32 | c as u64,
        Err(Exit::Drop(r)) => DROP << 32 | r as u64,
    }
}
