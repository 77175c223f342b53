//! Reading the per-CPU counters: the global counters and drop reasons, and the
//! per-service and per-backend traffic. Each per-CPU value is summed over CPUs.
//! [`Snapshot`] is all of it as the API and metrics show it.

use std::collections::BTreeMap;

use aya::maps::{MapData, MapError, PerCpuArray};
use lb_common::{
    stats::{Counter, DropReason},
    types::TrafficCounters,
};
use serde::Serialize;

use super::maps::Maps;

/// Traffic counters of the fast path, by service and backend.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Snapshot {
    /// Global counters and drop reasons, by label.
    pub counters: BTreeMap<&'static str, u64>,
    pub drops: BTreeMap<&'static str, u64>,
    pub services: BTreeMap<String, ServiceTraffic>,
    /// Packets dropped by each `[security]` rule: a deny prefix (as text), or
    /// [`NOT_ALLOWED_RULE`] for sources the allow list did not match.
    pub filter_drops: BTreeMap<String, u64>,
}

/// The `rule` label of drops by the allow list (a source it does not match).
pub const NOT_ALLOWED_RULE: &str = "not_allowed";

/// Packets dropped under filter rule id `rule_id`.
pub fn filter_drops(maps: &Maps, rule_id: u32) -> Result<u64, MapError> {
    sum_u64(&maps.filter_stats, rule_id)
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ServiceTraffic {
    pub packets: u64,
    pub bytes: u64,
    /// By "address:port".
    pub backends: BTreeMap<String, Traffic>,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
}

/// Global counters, by label.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub counters: Vec<(Counter, u64)>,
    pub drops: Vec<(DropReason, u64)>,
}

impl Counters {
    pub fn get(&self, c: Counter) -> u64 {
        self.counters
            .iter()
            .find(|(k, _)| *k == c)
            .map_or(0, |(_, v)| *v)
    }
    pub fn drop_count(&self, r: DropReason) -> u64 {
        self.drops
            .iter()
            .find(|(k, _)| *k == r)
            .map_or(0, |(_, v)| *v)
    }
}

fn sum_u64(map: &PerCpuArray<MapData, u64>, index: u32) -> Result<u64, MapError> {
    Ok(map.get(&index, 0)?.iter().sum())
}

/// Read the global counters.
pub fn counters(maps: &Maps) -> Result<Counters, MapError> {
    let mut out = Counters::default();
    for c in Counter::ALL {
        out.counters.push((c, sum_u64(&maps.counters, c.index())?));
    }
    for r in DropReason::ALL {
        out.drops.push((r, sum_u64(&maps.counters, r.index())?));
    }
    Ok(out)
}

fn traffic(
    map: &PerCpuArray<MapData, TrafficCounters>,
    index: u32,
) -> Result<TrafficCounters, MapError> {
    Ok(map
        .get(&index, 0)?
        .iter()
        .fold(TrafficCounters::default(), |acc, v| TrafficCounters {
            packets: acc.packets + v.packets,
            bytes: acc.bytes + v.bytes,
        }))
}

/// Packets and bytes forwarded for a service.
pub fn service_traffic(maps: &Maps, service_id: u32) -> Result<TrafficCounters, MapError> {
    traffic(&maps.service_stats, service_id)
}

/// Packets and bytes forwarded to a backend.
pub fn backend_traffic(maps: &Maps, backend_id: u32) -> Result<TrafficCounters, MapError> {
    traffic(&maps.backend_stats, backend_id)
}
