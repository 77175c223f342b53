//! Source filtering (`[security] deny` / `allow`), the first thing the balancer does
//! with an IP packet.
//!
//! The agent sets a `FILTER_F_*` bit in the global config only while the matching
//! trie has entries, so with no filters configured a packet costs no trie lookup, and
//! with one list in use it costs one. Deny applies to every IPv4 and IPv6 packet from
//! a matching source (fragments and packets with options included: only the source
//! address is read); allow applies only to packets on their way to a VIP (see
//! `main.rs`): other traffic passes as before.
//!
//! A service's own lists (`deny`/`allow` in a `[[service]]`) live in two more tries,
//! [`SVC_DENY`] and [`SVC_ALLOW`], shared by every service: the key carries the service
//! id as its scope (matched as part of the first 32 bits), so a lookup costs the same
//! whatever the number of services and rules, and each service's capacity is simply
//! what the others leave. `VIP_F_DENY` / `VIP_F_ALLOW` on the VIP entry say whether
//! the service has such a list, so other services pay no lookup. A service's allow
//! list carries a catch-all `/0` per family whose rule id counts what it refuses; a
//! global allow list has none (a miss is counted in slot 0).

use aya_ebpf::{
    maps::{LpmTrie, lpm_trie::Key},
    programs::XdpContext,
};
use lb_common::{
    stats::DropReason,
    types::{
        FAMILY_V4, FAMILY_V6, FILTER_PREFIX_BASE, FILTER_RULE_NOT_ALLOWED, FilterAddr, FilterRule,
        filter_scope,
    },
};

use crate::{
    encap::Exit,
    maps::{ALLOW, DENY, FILTER_STATS, SVC_ALLOW, SVC_DENY},
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

#[inline(always)]
fn deny_in(trie: &LpmTrie<FilterAddr, FilterRule>, src: &Key<FilterAddr>) -> Result<(), Exit> {
    if let Some(rule) = trie.get(src) {
        count_rule(rule.rule_id);
        return Err(Exit::Drop(DropReason::FilterDeny));
    }
    Ok(())
}

/// A miss, or a hit on a catch-all entry (rule id other than 0), is a drop counted
/// under that id.
#[inline(always)]
fn allow_in(trie: &LpmTrie<FilterAddr, FilterRule>, src: &Key<FilterAddr>) -> Result<(), Exit> {
    let refused = match trie.get(src) {
        None => FILTER_RULE_NOT_ALLOWED,
        Some(rule) if rule.rule_id != FILTER_RULE_NOT_ALLOWED => rule.rule_id,
        Some(_) => return Ok(()),
    };
    count_rule(refused);
    Err(Exit::Drop(DropReason::FilterNotAllowed))
}

/// Drop a source the global deny list matches, counted under the matching rule.
#[inline(always)]
pub fn check_deny(src: &Key<FilterAddr>) -> Result<(), Exit> {
    deny_in(&DENY, src)
}

/// Drop a source the global allow list (in use) does not match.
#[inline(always)]
pub fn check_allow(src: &Key<FilterAddr>) -> Result<(), Exit> {
    allow_in(&ALLOW, src)
}

/// The lookup key of `src` in the per-service tries of service `service_id`.
#[inline(always)]
pub fn scoped(src: &Key<FilterAddr>, service_id: u32) -> Key<FilterAddr> {
    let mut data = src.data;
    data.scope = filter_scope(service_id);
    Key::new(LOOKUP_BITS, data)
}

/// Drop a source the service's own deny list matches (`src` scoped by [`scoped`]).
#[inline(always)]
pub fn check_service_deny(src: &Key<FilterAddr>) -> Result<(), Exit> {
    deny_in(&SVC_DENY, src)
}

/// Drop a source the service's own allow list does not match.
#[inline(always)]
pub fn check_service_allow(src: &Key<FilterAddr>) -> Result<(), Exit> {
    allow_in(&SVC_ALLOW, src)
}
