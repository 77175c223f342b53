//! Map keys that carry padding bytes, built word by word.
//!
//! A key written field by field (`_pad: [0; 3]`, `addr: [0; 4]` then one word set)
//! leaves LLVM zeroing a run of bytes it lowers to a call of the `memset` subprogram,
//! a byte loop, on every packet that builds the key (issue 12: the object must call no
//! `memset`; `tests/tests/integration/ebpf_object.rs` checks it). Built from whole
//! 32-bit words (family and padding in one word) there is no such run.

use core::{mem::transmute, ptr::read_volatile};

use lb_common::types::{DecapKey, FilterAddr, FlowKey, FlowKeyV4, VipAddrKey, VipKey, VipKeyV4};

/// A little word holding `b0` in its first byte and `b1..b3` after it, in memory order.
#[inline(always)]
const fn word(b0: u8, b1: u8, b2: u8, b3: u8) -> u32 {
    u32::from_ne_bytes([b0, b1, b2, b3])
}

/// `DecapKey { addr, family, _pad: [0; 3] }`.
#[inline(always)]
pub fn decap_key(addr: [u32; 4], family: u8) -> DecapKey {
    // SAFETY: DecapKey is #[repr(C)] { [u32; 4], u8, [u8; 3] }: 20 bytes of plain
    // integers, the family byte first in the last word (transmute checks the size).
    unsafe {
        transmute::<[u32; 5], DecapKey>([addr[0], addr[1], addr[2], addr[3], word(family, 0, 0, 0)])
    }
}

/// `VipAddrKey { addr, family, _pad: [0; 3] }`.
#[inline(always)]
pub fn vip_addr_key(addr: [u32; 4], family: u8) -> VipAddrKey {
    // SAFETY: as for DecapKey, same layout.
    unsafe {
        transmute::<[u32; 5], VipAddrKey>([
            addr[0],
            addr[1],
            addr[2],
            addr[3],
            word(family, 0, 0, 0),
        ])
    }
}

/// `FilterAddr { family, scope, addr }`.
#[inline(always)]
pub fn filter_addr(family: u8, scope: [u8; 3], addr: [u32; 4]) -> FilterAddr {
    // SAFETY: FilterAddr is #[repr(C)] { u8, [u8; 3], [u32; 4] }: 20 bytes of plain
    // integers, family and scope in the first word.
    unsafe {
        transmute::<[u32; 5], FilterAddr>([
            word(family, scope[0], scope[1], scope[2]),
            addr[0],
            addr[1],
            addr[2],
            addr[3],
        ])
    }
}

/// `VipKeyV4 { addr, port, proto, _pad: 0 }`.
#[inline(always)]
pub fn vip_key_v4(addr: u32, port: u16, proto: u8) -> VipKeyV4 {
    let p = port.to_ne_bytes();
    // SAFETY: VipKeyV4 is #[repr(C)] { u32, u16, u8, u8 }: 8 bytes of plain integers,
    // port, protocol and padding in the second word, in memory order.
    unsafe { transmute::<[u32; 2], VipKeyV4>([addr, word(p[0], p[1], proto, 0)]) }
}

/// `FlowKeyV4::of(key)`, padding written as part of a word.
#[inline(always)]
pub fn flow_key_v4(key: &FlowKey) -> FlowKeyV4 {
    let s = key.sport.to_ne_bytes();
    let d = key.dport.to_ne_bytes();
    // SAFETY: FlowKeyV4 is #[repr(C)] { u32, u32, u16, u16, u8, [u8; 3] }: 16 bytes of
    // plain integers, the ports in the third word, protocol and padding in the fourth.
    unsafe {
        transmute::<[u32; 4], FlowKeyV4>([
            key.src[0],
            key.dst[0],
            word(s[0], s[1], d[0], d[1]),
            word(key.proto, 0, 0, 0),
        ])
    }
}

/// `a == b`, field by field: the derived comparison of the address arrays may be
/// lowered to a `memcmp`/`bcmp` call, which the object must not make (see above).
#[inline(always)]
pub fn vip_key_eq(a: &VipKey, b: &VipKey) -> bool {
    a.addr[0] == b.addr[0]
        && a.addr[1] == b.addr[1]
        && a.addr[2] == b.addr[2]
        && a.addr[3] == b.addr[3]
        && a.port == b.port
        && a.proto == b.proto
        && a.family == b.family
}

/// The [`FlowKey`] of an IPv6 packet: addresses read from its header `ip` word by word,
/// `sport`/`dport` as on the wire, family [`lb_common::types::FAMILY_V6`]. Volatile
/// reads: copied as arrays, the addresses became a `memmove` call (LLVM could not tell
/// the packet from the stack).
///
/// # Safety
///
/// `ip` must point to a whole IPv6 header inside the packet (bounds checked).
#[inline(always)]
pub unsafe fn flow_key_v6(
    ip: *const crate::ipv6::Ipv6Hdr,
    sport: u16,
    dport: u16,
    proto: u8,
) -> FlowKey {
    let s = sport.to_ne_bytes();
    let d = dport.to_ne_bytes();
    // SAFETY: `ip` points to a whole IPv6 header inside the packet (the caller's
    // contract); FlowKey is #[repr(C)] { [u32; 4], [u32; 4], u16, u16, u8, u8, [u8; 2] }:
    // 40 bytes of plain integers, the ports in word 8, protocol, family and padding in
    // word 9.
    unsafe {
        let w = |p: *const u32| read_volatile(p);
        let sa = (&raw const (*ip).saddr).cast::<u32>();
        let da = (&raw const (*ip).daddr).cast::<u32>();
        transmute::<[u32; 10], FlowKey>([
            w(sa),
            w(sa.add(1)),
            w(sa.add(2)),
            w(sa.add(3)),
            w(da),
            w(da.add(1)),
            w(da.add(2)),
            w(da.add(3)),
            word(s[0], s[1], d[0], d[1]),
            word(proto, lb_common::types::FAMILY_V6, 0, 0),
        ])
    }
}
