//! Source filtering (`[security] deny` / `allow`), the first thing the balancer does
//! with an IP packet.
//!
//! The agent sets a `FILTER_F_*` bit in the global config only while the matching
//! trie has entries, so with no filters configured a packet costs no trie lookup, and
//! with one list in use it costs one. Deny applies to every IPv4 and IPv6 packet from
//! a matching source (fragments and packets with options included: only the source
//! address is read); allow applies only to packets on their way to a VIP (see
//! `main.rs`): other traffic passes as before.

use aya_ebpf::{maps::lpm_trie::Key, programs::XdpContext};
use lb_common::{
    stats::DropReason,
    types::{FAMILY_V4, FAMILY_V6, FILTER_PREFIX_BASE, FILTER_RULE_NOT_ALLOWED, FilterAddr},
};

use crate::{
    encap::Exit,
    maps::{ALLOW, DENY, FILTER_STATS},
    parsing::{ETH_P_IP, ETH_P_IPV6, L2, ptr_at},
};

/// Offset of the source address in the IPv4 and IPv6 headers.
const IPV4_SADDR_OFF: usize = 12;
const IPV6_SADDR_OFF: usize = 8;

/// Bits of a lookup key: the family word and a whole 16-byte address.
const LOOKUP_BITS: u32 = FILTER_PREFIX_BASE + 128;

/// The source address of an IPv4 or IPv6 packet as a trie key, or None for other
/// EtherTypes and headers cut short (the parser passes those).
#[inline(always)]
pub fn source(ctx: &XdpContext, l2: &L2) -> Option<Key<FilterAddr>> {
    let mut data = FilterAddr::default();
    if l2.proto == ETH_P_IP {
        let s = ptr_at::<u32>(ctx, l2.l3_off + IPV4_SADDR_OFF)?;
        data.family = FAMILY_V4;
        // SAFETY: bounds checked by ptr_at; the header may be unaligned.
        data.addr[0] = unsafe { s.read_unaligned() };
    } else if l2.proto == ETH_P_IPV6 {
        let s = ptr_at::<[u32; 4]>(ctx, l2.l3_off + IPV6_SADDR_OFF)?;
        data.family = FAMILY_V6;
        // SAFETY: as above.
        data.addr = unsafe { s.read_unaligned() };
    } else {
        return None;
    }
    Some(Key::new(LOOKUP_BITS, data))
}

#[inline(always)]
fn count_rule(rule_id: u32) {
    if let Some(slot) = FILTER_STATS.get_ptr_mut(rule_id) {
        // SAFETY: a per-CPU array slot, valid for the program's run on this CPU.
        unsafe { *slot += 1 };
    }
}

/// Drop a source the deny list matches, counted under the matching rule.
#[inline(always)]
pub fn check_deny(src: &Key<FilterAddr>) -> Result<(), Exit> {
    if let Some(rule) = DENY.get(src) {
        count_rule(rule.rule_id);
        return Err(Exit::Drop(DropReason::FilterDeny));
    }
    Ok(())
}

/// Drop a source the allow list (in use) does not match.
#[inline(always)]
pub fn check_allow(src: &Key<FilterAddr>) -> Result<(), Exit> {
    if ALLOW.get(src).is_none() {
        count_rule(FILTER_RULE_NOT_ALLOWED);
        return Err(Exit::Drop(DropReason::FilterNotAllowed));
    }
    Ok(())
}
