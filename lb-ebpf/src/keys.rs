//! Map keys that carry padding bytes, built word by word.
//!
//! A key written field by field (`_pad: [0; 3]`, `addr: [0; 4]` then one word set)
//! leaves LLVM zeroing a run of bytes it lowers to a call of the `memset` subprogram,
//! a byte loop, on every packet that builds the key (issue 12: the object must call no
//! `memset`; `tests/tests/integration/ebpf_object.rs` checks it). Built from whole
//! 32-bit words (family and padding in one word) there is no such run.

use core::mem::transmute;

use lb_common::types::{DecapKey, FilterAddr, VipAddrKey};

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
