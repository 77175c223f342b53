//! The source filters and flood limits in the maps: the global deny and allow LPM
//! tries (`[security]`), the per-service tries (a `[[service]]`'s own `deny`/`allow`),
//! the per-rule drop counters, and the `new_flows_per_source` limits; written by
//! [`super::sync::Reconciler`] in its filter steps.
//!
//! Layout (see `lb_common::maps`): the global lists are in `DENY`/`ALLOW` (scope 0);
//! every service's lists are in `SVC_DENY`/`SVC_ALLOW`, their keys scoped by the
//! service id. One trie for all services keeps the cost of a packet at one lookup per
//! list whatever the number of services (a map of maps would cost the same lookup plus
//! one, and a fixed-size inner trie per service, created at run time, wasting what a
//! service does not use); the services share `dataplane.max_filter_rules` prefixes of
//! each kind, validated in `config/rules.rs`.
//!
//! Rule ids (slots of `FILTER_STATS`): deny rules get ids `1..` (lowest free first),
//! a service with an allow list one more id for what it refuses (its catch-all `/0`
//! entries carry it); a slot is zeroed when its id is given out, and a prefix keeps its
//! id across applies as long as it stays listed. Global allow entries and a service's
//! own allow entries carry id 0 ([`FILTER_RULE_NOT_ALLOWED`]): a hit is not a drop; a
//! miss of the global list is counted in slot 0.
//!
//! Order (see the sync module docs): new entries are inserted before the flags that
//! enable them are written (the global config's `FILTER_F_*` bits, a VIP's
//! `VIP_F_*`), stale ones removed after, so turning an allow list on, changing it or
//! turning it off never drops a source that is allowed both before and after.

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::{LpmTrie, MapData, MapError, PerCpuValues, lpm_trie::Key};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use lb_common::{
    maps as names,
    types::{
        FAMILY_V4, FAMILY_V6, FILTER_F_ALLOW, FILTER_F_DENY, FILTER_F_FLOW_LIMIT,
        FILTER_PREFIX_BASE, FILTER_RULE_NOT_ALLOWED, FilterAddr, FilterRule, FlowLimit,
        filter_scope,
    },
};

use super::{
    desired::DesiredFilters,
    loader::Capacities,
    maps::Maps,
    sync::{MapKey, SyncError, addr_words},
};
use crate::config::FlowLimitConfig;

/// Whose rules: the global `[security]` lists, or a service's (by service id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    Global,
    Service(u32),
}

impl Scope {
    fn bytes(self) -> [u8; 3] {
        match self {
            Scope::Global => [0; 3],
            Scope::Service(id) => filter_scope(id),
        }
    }
}

/// The trie key of a prefix in `scope`.
pub fn filter_key(scope: Scope, net: IpNet) -> Key<FilterAddr> {
    let (addr, family) = addr_words(net.network());
    Key::new(
        FILTER_PREFIX_BASE + u32::from(net.prefix_len()),
        FilterAddr {
            family,
            scope: scope.bytes(),
            addr,
        },
    )
}

/// The scope id and prefix of a trie key (None for a key this agent never writes).
fn key_prefix(key: &Key<FilterAddr>) -> Option<(u32, IpNet)> {
    let data = key.data();
    let len = u8::try_from(key.prefix_len().checked_sub(FILTER_PREFIX_BASE)?).ok()?;
    let bytes: Vec<u8> = data.addr.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let addr: std::net::IpAddr = match data.family {
        FAMILY_V4 => std::net::Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).into(),
        FAMILY_V6 => std::net::Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?).into(),
        _ => return None,
    };
    let [a, b, c] = data.scope;
    let scope = u32::from_be_bytes([0, a, b, c]);
    Some((scope, IpNet::new(addr, len).ok()?))
}

/// The whole address space of each family: a service's allow list gets one catch-all
/// entry per family it does not allow whole.
fn everything() -> [IpNet; 2] {
    [IpNet::V4(Ipv4Net::default()), IpNet::V6(Ipv6Net::default())]
}

/// The `FLOW_LIMITS` value of a validated limit.
pub fn flow_limit(cfg: &FlowLimitConfig) -> FlowLimit {
    const NS: u64 = 1_000_000_000;
    let rate = u64::from(cfg.rate.max(1));
    let v4 = u32::MAX
        .checked_shl(32 - u32::from(cfg.prefix_v4.min(32)))
        .unwrap_or(0);
    let v6 = u128::MAX
        .checked_shl(128 - u32::from(cfg.prefix_v6.min(128)))
        .unwrap_or(0)
        .to_be_bytes();
    let word = |i: usize| u32::from_ne_bytes([v6[i], v6[i + 1], v6[i + 2], v6[i + 3]]);
    FlowLimit {
        interval_ns: NS / rate,
        tolerance_ns: u64::from(cfg.burst.max(1) - 1) * NS / rate,
        mask_v4: u32::from_ne_bytes(v4.to_be_bytes()),
        _pad: 0,
        mask_v6: [word(0), word(4), word(8), word(12)],
    }
}

/// A rule whose drops are counted, as [`FilterTable::rules`] lists them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// A deny prefix.
    Deny(IpNet),
    /// A service's allow list refusing a source.
    NotAllowed,
}

/// The filters as written to the maps.
#[derive(Debug)]
pub struct FilterTable {
    /// Rule ids are `1..slots`.
    slots: u32,
    /// (scope, deny prefix) -> rule id.
    deny: BTreeMap<(Scope, IpNet), u32>,
    /// (scope, allow prefix) -> the entry's rule id: 0, or for a catch-all the
    /// service's `not_allowed` id.
    allow: BTreeMap<(Scope, IpNet), u32>,
    /// Service id -> the rule id counting what its allow list refuses.
    not_allowed: BTreeMap<u32, u32>,
    /// `FLOW_LIMITS` entries as written, by index.
    limits: BTreeMap<u32, FlowLimit>,
    /// Writes to the four tries attempted so far (successful or not): the reconciler
    /// bumps the filter generation after a pass that made any (`Reconciler::apply`).
    trie_writes: u64,
}

impl FilterTable {
    pub fn new(caps: &Capacities) -> Self {
        FilterTable {
            slots: caps.filter_stats_slots(),
            deny: BTreeMap::new(),
            allow: BTreeMap::new(),
            not_allowed: BTreeMap::new(),
            limits: BTreeMap::new(),
            trie_writes: 0,
        }
    }

    /// Writes to the tries attempted so far (see the field).
    pub fn trie_writes(&self) -> u64 {
        self.trie_writes
    }

    /// Read back the tries a previous agent filled (hitless restart). Rules keep
    /// their ids and so their counts.
    pub fn adopt(maps: &Maps, caps: &Capacities) -> Result<Self, SyncError> {
        let mut t = FilterTable::new(caps);
        let read = |map: &'static str| {
            move |source| SyncError::Read {
                map,
                key: MapKey::All,
                source,
            }
        };
        let tries: [(
            &LpmTrie<MapData, FilterAddr, FilterRule>,
            &'static str,
            bool,
        ); 4] = [
            (&maps.deny, names::DENY, true),
            (&maps.allow, names::ALLOW, false),
            (&maps.svc_deny, names::SVC_DENY, true),
            (&maps.svc_allow, names::SVC_ALLOW, false),
        ];
        for (i, (trie, name, deny)) in tries.into_iter().enumerate() {
            for entry in trie.iter() {
                let (key, rule) = entry.map_err(read(name))?;
                let Some((scope, net)) = key_prefix(&key) else {
                    tracing::warn!("ignoring an unreadable entry of {name}");
                    continue;
                };
                let scope = if i < 2 {
                    Scope::Global
                } else {
                    Scope::Service(scope)
                };
                if deny {
                    t.deny.insert((scope, net), rule.rule_id);
                } else {
                    t.allow.insert((scope, net), rule.rule_id);
                    if let (Scope::Service(s), id) = (scope, rule.rule_id)
                        && id != FILTER_RULE_NOT_ALLOWED
                    {
                        t.not_allowed.insert(s, id);
                    }
                }
            }
        }
        Ok(t)
    }

    /// The `FILTER_F_*` bits for the global `desired` (valid once
    /// [`Self::insert_new`] succeeded).
    pub fn flags(desired: &DesiredFilters) -> u32 {
        let mut flags = 0;
        if !desired.deny.is_empty() {
            flags |= FILTER_F_DENY;
        }
        if !desired.allow.is_empty() {
            flags |= FILTER_F_ALLOW;
        }
        if desired.new_flows.is_some() {
            flags |= FILTER_F_FLOW_LIMIT;
        }
        flags
    }

    fn free_id(&self) -> Option<u32> {
        let used: BTreeSet<u32> = self
            .deny
            .values()
            .chain(self.not_allowed.values())
            .copied()
            .collect();
        (1..self.slots).find(|id| !used.contains(id))
    }

    /// A new rule id with its counter at 0.
    fn new_id(&self, maps: &mut Maps) -> Result<u32, SyncError> {
        let id = self.free_id().ok_or(SyncError::FiltersFull {
            max: self.slots.saturating_sub(1),
        })?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| SyncError::Cpus(e))?;
        let zero = PerCpuValues::try_from(vec![0u64; cpus]).map_err(SyncError::Cpus)?;
        maps.filter_stats
            .set(id, zero, 0)
            .map_err(|source| SyncError::Write {
                what: "a filter rule counter",
                source,
            })?;
        Ok(id)
    }

    /// The allow entries `desired` makes in `scope`: its prefixes (id 0) and, for a
    /// service, a catch-all per family it does not allow whole (the service's
    /// `not_allowed` id, allocated here when it has none yet).
    fn allow_entries(
        &mut self,
        maps: &mut Maps,
        scope: Scope,
        desired: &DesiredFilters,
    ) -> Result<BTreeMap<IpNet, u32>, SyncError> {
        let mut entries: BTreeMap<IpNet, u32> = desired
            .allow
            .iter()
            .map(|&n| (n, FILTER_RULE_NOT_ALLOWED))
            .collect();
        if let Scope::Service(s) = scope
            && !desired.allow.is_empty()
        {
            let id = match self.not_allowed.get(&s) {
                Some(&id) => id,
                None => {
                    let id = self.new_id(maps)?;
                    self.not_allowed.insert(s, id);
                    id
                }
            };
            for all in everything() {
                entries.entry(all).or_insert(id);
            }
        }
        Ok(entries)
    }

    fn tries(
        maps: &mut Maps,
        scope: Scope,
    ) -> (
        &mut LpmTrie<MapData, FilterAddr, FilterRule>,
        &mut LpmTrie<MapData, FilterAddr, FilterRule>,
    ) {
        match scope {
            Scope::Global => (&mut maps.deny, &mut maps.allow),
            Scope::Service(_) => (&mut maps.svc_deny, &mut maps.svc_allow),
        }
    }

    /// Insert the entries of `scope` that `desired` has and the maps have not (and a
    /// changed flood limit). A new deny rule's counter starts at 0.
    pub fn insert_new(
        &mut self,
        maps: &mut Maps,
        scope: Scope,
        desired: &DesiredFilters,
    ) -> Result<(), SyncError> {
        let write = |source: MapError| SyncError::Write {
            what: "a source filter",
            source,
        };
        for &net in &desired.deny {
            if self.deny.contains_key(&(scope, net)) {
                continue;
            }
            let id = self.new_id(maps)?;
            self.trie_writes += 1;
            Self::tries(maps, scope)
                .0
                .insert(&filter_key(scope, net), FilterRule { rule_id: id }, 0)
                .map_err(write)?;
            self.deny.insert((scope, net), id);
        }
        for (net, id) in self.allow_entries(maps, scope, desired)? {
            if self.allow.get(&(scope, net)) == Some(&id) {
                continue;
            }
            self.trie_writes += 1;
            Self::tries(maps, scope)
                .1
                .insert(&filter_key(scope, net), FilterRule { rule_id: id }, 0)
                .map_err(write)?;
            self.allow.insert((scope, net), id);
        }
        if let Some(cfg) = &desired.new_flows {
            let index = match scope {
                Scope::Global => 0,
                Scope::Service(s) => s + 1,
            };
            let value = flow_limit(cfg);
            if self.limits.get(&index) != Some(&value) {
                maps.flow_limits
                    .set(index, value, 0)
                    .map_err(|source| SyncError::Write {
                        what: "a new-flow limit",
                        source,
                    })?;
                self.limits.insert(index, value);
            }
        }
        Ok(())
    }

    /// Remove the written entries of `scope` that `desired` no longer has (after the
    /// flags are written); with `None`, all of them (a removed service).
    pub fn remove_stale(
        &mut self,
        maps: &mut Maps,
        scope: Scope,
        desired: Option<&DesiredFilters>,
    ) -> Result<(), SyncError> {
        let write = |source: MapError| SyncError::Write {
            what: "removing a source filter",
            source,
        };
        let none = DesiredFilters::default();
        let desired = desired.unwrap_or(&none);
        let gone: Vec<IpNet> = self
            .deny
            .keys()
            .filter(|(s, n)| *s == scope && !desired.deny.contains(n))
            .map(|(_, n)| *n)
            .collect();
        for net in gone {
            self.trie_writes += 1;
            match Self::tries(maps, scope).0.remove(&filter_key(scope, net)) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(write(e)),
            }
            self.deny.remove(&(scope, net));
        }
        let keep: BTreeSet<IpNet> = desired
            .allow
            .iter()
            .copied()
            .chain(if desired.allow.is_empty() || scope == Scope::Global {
                Vec::new()
            } else {
                everything().to_vec()
            })
            .collect();
        let gone: Vec<IpNet> = self
            .allow
            .keys()
            .filter(|(s, n)| *s == scope && !keep.contains(n))
            .map(|(_, n)| *n)
            .collect();
        for net in gone {
            self.trie_writes += 1;
            match Self::tries(maps, scope).1.remove(&filter_key(scope, net)) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(write(e)),
            }
            self.allow.remove(&(scope, net));
        }
        if let Scope::Service(s) = scope
            && desired.allow.is_empty()
        {
            self.not_allowed.remove(&s);
        }
        Ok(())
    }

    /// The global deny rules as written, with their counter slots.
    pub fn deny_rules(&self) -> impl Iterator<Item = (IpNet, u32)> + '_ {
        self.deny
            .iter()
            .filter(|((s, _), _)| *s == Scope::Global)
            .map(|((_, n), id)| (*n, *id))
    }

    /// Every counted rule of the services (deny prefixes and `not_allowed`), by
    /// service id, with its counter slot.
    pub fn service_rules(&self) -> impl Iterator<Item = (u32, Rule, u32)> + '_ {
        let deny = self.deny.iter().filter_map(|((s, n), id)| match s {
            Scope::Service(s) => Some((*s, Rule::Deny(*n), *id)),
            Scope::Global => None,
        });
        let refused = self
            .not_allowed
            .iter()
            .map(|(s, id)| (*s, Rule::NotAllowed, *id));
        deny.chain(refused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_limits_are_intervals_and_network_order_masks() {
        let l = flow_limit(&FlowLimitConfig {
            rate: 1000,
            burst: 2000,
            prefix_v4: 24,
            prefix_v6: 64,
        });
        assert_eq!(l.interval_ns, 1_000_000);
        assert_eq!(l.tolerance_ns, 1999 * 1_000_000);
        assert_eq!(l.mask_v4.to_ne_bytes(), [255, 255, 255, 0]);
        assert_eq!(l.mask_v6[0..2], [u32::MAX, u32::MAX]);
        assert_eq!(l.mask_v6[2..4], [0, 0]);
        let l = flow_limit(&FlowLimitConfig {
            rate: 3,
            burst: 1,
            prefix_v4: 0,
            prefix_v6: 128,
        });
        assert_eq!((l.interval_ns, l.tolerance_ns), (333_333_333, 0));
        assert_eq!(l.mask_v4, 0);
        assert_eq!(l.mask_v6, [u32::MAX; 4]);
        let l = flow_limit(&FlowLimitConfig {
            rate: 1,
            burst: 1,
            prefix_v4: 32,
            prefix_v6: 60,
        });
        assert_eq!(l.mask_v4, u32::MAX);
        assert_eq!(l.mask_v6[1].to_ne_bytes(), [255, 255, 255, 0xf0]);
    }

    #[test]
    fn keys_carry_their_scope() {
        let net: IpNet = "203.0.113.0/24".parse().unwrap();
        let k = filter_key(Scope::Service(0x01_0203), net);
        assert_eq!(k.data().scope, [1, 2, 3]);
        assert_eq!(k.prefix_len(), FILTER_PREFIX_BASE + 24);
        assert_eq!(key_prefix(&k), Some((0x01_0203, net)));
        let g = filter_key(Scope::Global, net);
        assert_eq!(key_prefix(&g), Some((0, net)));
    }
}
