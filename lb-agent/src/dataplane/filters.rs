//! The `[security]` source filters in the maps: the deny and allow LPM tries and the
//! per-rule drop counters, written by [`super::sync::Reconciler`] in its filter steps.
//!
//! Deny rules get ids `1..=max_filter_rules` (lowest free first): a rule's drops are
//! counted in `FILTER_STATS[id]`, whose slot is zeroed when the id is given to a new
//! prefix, and a prefix keeps its id across applies as long as it stays listed.
//! Allow entries carry id 0 ([`FILTER_RULE_NOT_ALLOWED`]): a hit on the allow list is
//! not a drop, a miss is counted in slot 0.
//!
//! Order (see the sync module docs): new entries are inserted before the global
//! config's `FILTER_F_*` bits are written, stale ones removed after, so turning an
//! allow list on, changing it or turning it off never drops a source that is allowed
//! both before and after.

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::{MapError, PerCpuValues, lpm_trie::Key};
use ipnet::IpNet;
use lb_common::{
    maps as names,
    types::{
        FAMILY_V4, FAMILY_V6, FILTER_F_ALLOW, FILTER_F_DENY, FILTER_PREFIX_BASE,
        FILTER_RULE_NOT_ALLOWED, FilterAddr, FilterRule,
    },
};

use super::{
    desired::DesiredFilters,
    maps::Maps,
    sync::{MapKey, SyncError, addr_words},
};

/// The trie key of a prefix.
pub fn filter_key(net: IpNet) -> Key<FilterAddr> {
    let (addr, family) = addr_words(net.network());
    Key::new(
        FILTER_PREFIX_BASE + u32::from(net.prefix_len()),
        FilterAddr {
            family,
            _pad: [0; 3],
            addr,
        },
    )
}

/// The prefix of a trie key (None for a key this agent never writes).
fn key_prefix(key: &Key<FilterAddr>) -> Option<IpNet> {
    let data = key.data();
    let len = u8::try_from(key.prefix_len().checked_sub(FILTER_PREFIX_BASE)?).ok()?;
    let bytes: Vec<u8> = data.addr.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let addr: std::net::IpAddr = match data.family {
        FAMILY_V4 => std::net::Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).into(),
        FAMILY_V6 => std::net::Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?).into(),
        _ => return None,
    };
    IpNet::new(addr, len).ok()
}

/// The filters as written to the maps.
#[derive(Debug)]
pub struct FilterTable {
    max: u32,
    /// Deny prefix -> rule id.
    deny: BTreeMap<IpNet, u32>,
    allow: BTreeSet<IpNet>,
}

impl FilterTable {
    pub fn new(max: u32) -> Self {
        FilterTable {
            max,
            deny: BTreeMap::new(),
            allow: BTreeSet::new(),
        }
    }

    /// Read back the tries a previous agent filled (hitless restart). Deny rules keep
    /// their ids and so their counts.
    pub fn adopt(maps: &Maps, max: u32) -> Result<Self, SyncError> {
        let mut t = FilterTable::new(max);
        for entry in maps.deny.iter() {
            let (key, rule) = entry.map_err(|source| SyncError::Read {
                map: names::DENY,
                key: MapKey::All,
                source,
            })?;
            match key_prefix(&key) {
                Some(net) => {
                    t.deny.insert(net, rule.rule_id);
                }
                None => tracing::warn!("ignoring an unreadable entry of {}", names::DENY),
            }
        }
        for entry in maps.allow.iter() {
            let (key, _) = entry.map_err(|source| SyncError::Read {
                map: names::ALLOW,
                key: MapKey::All,
                source,
            })?;
            if let Some(net) = key_prefix(&key) {
                t.allow.insert(net);
            }
        }
        Ok(t)
    }

    /// The `FILTER_F_*` bits for `desired` (valid once [`Self::insert_new`] succeeded).
    pub fn flags(desired: &DesiredFilters) -> u32 {
        let mut flags = 0;
        if !desired.deny.is_empty() {
            flags |= FILTER_F_DENY;
        }
        if !desired.allow.is_empty() {
            flags |= FILTER_F_ALLOW;
        }
        flags
    }

    fn free_id(&self) -> Option<u32> {
        let used: BTreeSet<u32> = self.deny.values().copied().collect();
        (1..=self.max).find(|id| !used.contains(id))
    }

    /// Insert the desired entries not yet written. A new deny rule's counter starts at 0.
    pub fn insert_new(
        &mut self,
        maps: &mut Maps,
        desired: &DesiredFilters,
    ) -> Result<(), SyncError> {
        let write = |source: MapError| SyncError::Write {
            what: "a source filter",
            source,
        };
        for &net in &desired.deny {
            if self.deny.contains_key(&net) {
                continue;
            }
            let id = self
                .free_id()
                .ok_or(SyncError::FiltersFull { max: self.max })?;
            let cpus = aya::util::nr_cpus().map_err(|(_, e)| SyncError::Cpus(e))?;
            let zero = PerCpuValues::try_from(vec![0u64; cpus]).map_err(SyncError::Cpus)?;
            maps.filter_stats.set(id, zero, 0).map_err(write)?;
            maps.deny
                .insert(&filter_key(net), FilterRule { rule_id: id }, 0)
                .map_err(write)?;
            self.deny.insert(net, id);
        }
        for &net in &desired.allow {
            if self.allow.contains(&net) {
                continue;
            }
            maps.allow
                .insert(
                    &filter_key(net),
                    FilterRule {
                        rule_id: FILTER_RULE_NOT_ALLOWED,
                    },
                    0,
                )
                .map_err(write)?;
            self.allow.insert(net);
        }
        Ok(())
    }

    /// Remove the written entries `desired` no longer lists (after the flags are written).
    pub fn remove_stale(
        &mut self,
        maps: &mut Maps,
        desired: &DesiredFilters,
    ) -> Result<(), SyncError> {
        let write = |source: MapError| SyncError::Write {
            what: "removing a source filter",
            source,
        };
        let gone: Vec<IpNet> = self
            .deny
            .keys()
            .filter(|n| !desired.deny.contains(n))
            .copied()
            .collect();
        for net in gone {
            match maps.deny.remove(&filter_key(net)) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(write(e)),
            }
            self.deny.remove(&net);
        }
        let gone: Vec<IpNet> = self
            .allow
            .iter()
            .filter(|n| !desired.allow.contains(n))
            .copied()
            .collect();
        for net in gone {
            match maps.allow.remove(&filter_key(net)) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(write(e)),
            }
            self.allow.remove(&net);
        }
        Ok(())
    }

    /// The deny rules as written, with their counter slots.
    pub fn deny_rules(&self) -> impl Iterator<Item = (IpNet, u32)> + '_ {
        self.deny.iter().map(|(n, id)| (*n, *id))
    }
}
