//! Reading the per-CPU counters: the global counters and drop reasons, and the
//! per-service and per-backend traffic. Each per-CPU value is summed over CPUs. A
//! service's traffic is summed from its backends' ([`service_traffic`]), with a carry
//! for the backends it had ([`retire_backend`]).
//! [`Snapshot`] is all of it as the API and metrics show it.

use std::collections::BTreeMap;

use aya::maps::{MapData, MapError, PerCpuArray, PerCpuValues};
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

/// Read the global counters. `rx` is not counted by the program: it is the sum of the
/// outcome counters ([`Counter::is_outcome`]) and drop reasons, each packet being
/// counted under exactly one of them.
pub fn counters(maps: &Maps) -> Result<Counters, MapError> {
    let mut out = Counters::default();
    for c in Counter::ALL {
        out.counters.push((c, sum_u64(&maps.counters, c.index())?));
    }
    for r in DropReason::ALL {
        out.drops.push((r, sum_u64(&maps.counters, r.index())?));
    }
    let rx = out
        .counters
        .iter()
        .filter(|(c, _)| c.is_outcome())
        .map(|(_, v)| v)
        .chain(out.drops.iter().map(|(_, v)| v))
        .fold(0u64, |a, v| a.wrapping_add(*v));
    for (c, v) in &mut out.counters {
        if *c == Counter::Rx {
            *v = rx;
        }
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

/// Packets and bytes forwarded for service `service_id` whose backends now hold the ids
/// `backend_ids`: what its gone backends forwarded (`SERVICE_STATS`, the carry
/// [`retire_backend`] keeps) plus what each of these forwarded (`BACKEND_STATS`). The
/// fast path counts a forwarded packet only to its backend (one counter update per
/// packet: issue 12, item 2).
pub fn service_traffic(
    maps: &Maps,
    service_id: u32,
    backend_ids: impl IntoIterator<Item = u32>,
) -> Result<TrafficCounters, MapError> {
    let mut total = traffic(&maps.service_stats, service_id)?;
    for id in backend_ids {
        let t = traffic(&maps.backend_stats, id)?;
        total.packets += t.packets;
        total.bytes += t.bytes;
    }
    Ok(total)
}

/// Packets and bytes forwarded to a backend.
pub fn backend_traffic(maps: &Maps, backend_id: u32) -> Result<TrafficCounters, MapError> {
    traffic(&maps.backend_stats, backend_id)
}

/// Backend id `backend_id` of service `service_id` is freed: its traffic moves into the
/// service's carry (`SERVICE_STATS`, added to the first CPU's slot) and its own
/// counters start again from zero for the id's next backend. The carry is written
/// first: an agent stopped between the two writes counts the backend twice rather than
/// not at all, and a service's totals never go down. Packets that passed the backend's
/// active test before its entry was written inactive and are counted after this are
/// the next holder's (a few packets, at most, of that instant).
pub fn retire_backend(maps: &mut Maps, backend_id: u32, service_id: u32) -> Result<(), MapError> {
    let own = traffic(&maps.backend_stats, backend_id)?;
    if own == TrafficCounters::default() {
        return Ok(());
    }
    let mut carry = maps.service_stats.get(&service_id, 0)?.to_vec();
    if let Some(first) = carry.first_mut() {
        first.packets += own.packets;
        first.bytes += own.bytes;
    }
    maps.service_stats
        .set(service_id, PerCpuValues::try_from(carry)?, 0)?;
    zero(&mut maps.backend_stats, backend_id)
}

/// A service id is taken by a new service: its carry starts from zero (what a removed
/// service that held the id forwarded is not the new one's).
pub fn clear_service(maps: &mut Maps, service_id: u32) -> Result<(), MapError> {
    zero(&mut maps.service_stats, service_id)
}

fn zero(map: &mut PerCpuArray<MapData, TrafficCounters>, index: u32) -> Result<(), MapError> {
    let cpus = map.get(&index, 0)?.len();
    map.set(
        index,
        PerCpuValues::try_from(vec![TrafficCounters::default(); cpus])?,
        0,
    )
}
