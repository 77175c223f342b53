//! Typed handles on the balancer's maps, taken from a freshly loaded object (and
//! optionally pinned) or opened from their pins. The agent never spells a map name:
//! they come from `lb_common::maps`.

use std::path::Path;

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray},
    pin::PinError,
};
use lb_common::{
    maps as names,
    types::{
        Backend, FilterAddr, FilterRule, FlowEntry, FlowKey, FlowKeyV4, FlowLimit, GlobalConfig,
        NextHopEntry, QuicKey, ServiceV6, TrafficCounters, VipAddrKey, VipKey, VipKeyV4, VipMeta,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("the eBPF object has no map {name}")]
    Missing { name: &'static str },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("pinning map {name} under {dir}: {source}")]
    Pin {
        name: &'static str,
        dir: String,
        #[source]
        source: PinError,
    },
}

/// Every map of the balancer the agent reads or writes.
pub struct Maps {
    pub vips: HashMap<MapData, VipKey, VipMeta>,
    pub rings: Array<MapData, u32>,
    pub backends: Array<MapData, Backend>,
    /// The LRU flow table (aya opens LRU hashes as `HashMap`).
    pub flows: HashMap<MapData, FlowKey, FlowEntry>,
    pub config: Array<MapData, GlobalConfig>,
    pub service_stats: PerCpuArray<MapData, TrafficCounters>,
    pub backend_stats: PerCpuArray<MapData, TrafficCounters>,
    pub counters: PerCpuArray<MapData, u64>,
    /// `[security] deny` and `allow` prefixes.
    pub deny: LpmTrie<MapData, FilterAddr, FilterRule>,
    pub allow: LpmTrie<MapData, FilterAddr, FilterRule>,
    /// Drops per filter rule id.
    pub filter_stats: PerCpuArray<MapData, u64>,
    /// Every service's own `deny` and `allow` prefixes (scope = service id).
    pub svc_deny: LpmTrie<MapData, FilterAddr, FilterRule>,
    pub svc_allow: LpmTrie<MapData, FilterAddr, FilterRule>,
    /// `new_flows_per_source`: index 0 global, `service_id + 1` per service.
    pub flow_limits: Array<MapData, FlowLimit>,
    /// The token buckets (LRU hash; aya opens it as `HashMap`).
    pub flow_buckets: HashMap<MapData, FilterAddr, u64>,
    /// Flows seen once, waiting for their second packet (LRU hash).
    pub flows_new: HashMap<MapData, FlowKey, FlowEntry>,
    /// VIP addresses and `VIP_ADDR_F_*` bits (ICMP to a VIP address).
    pub vip_addrs: HashMap<MapData, VipAddrKey, u32>,
    /// QUIC server ids per service -> backend id (connection-ID routing).
    pub quic_ids: HashMap<MapData, QuicKey, u32>,
    /// The backends' next hops by backend id (written by the next-hop keeper,
    /// `super::neigh`, through its own handle; here for tests and reading).
    pub next_hops: Array<MapData, NextHopEntry>,
    /// The IPv4 VIPs of `vips` again under their 8-byte key (the IPv4 path's lookup);
    /// written with `vips` by the reconciler only.
    pub vips_v4: HashMap<MapData, VipKeyV4, VipMeta>,
    /// IPv4 flows (`flows` holds the IPv6 ones), LRU hash.
    pub flows_v4: HashMap<MapData, FlowKeyV4, FlowEntry>,
    /// IPv4 flows seen once (`flows_new` holds the IPv6 ones), LRU hash.
    pub flows_new_v4: HashMap<MapData, FlowKeyV4, FlowEntry>,
    /// The filter generation (one slot), bumped by the reconciler after every pass
    /// that changed the source filters: established flows re-check their source then.
    pub filter_gen: Array<MapData, u32>,
    /// Each service's IPv6 VIP key and meta by service id (established IPv6 flows);
    /// written with `vips` by the reconciler only.
    pub services_v6: Array<MapData, ServiceV6>,
    /// `quic_ids` again, direct-mapped (`lb_common::hash::quic_slot`): the program reads
    /// a slot before it hashes into `quic_ids`; written with `quic_ids` (quic_ids.rs).
    pub quic_slots: Array<MapData, u64>,
}

/// Where maps come from.
enum Source<'a> {
    Object(&'a mut Ebpf, Option<&'a Path>),
    Pins(&'a Path),
}

fn take(source: &mut Source<'_>, name: &'static str) -> Result<Map, MapsError> {
    match source {
        Source::Object(ebpf, pin_dir) => {
            let map = ebpf.take_map(name).ok_or(MapsError::Missing { name })?;
            if let Some(dir) = pin_dir {
                map.pin(dir.join(name)).map_err(|source| MapsError::Pin {
                    name,
                    dir: dir.display().to_string(),
                    source,
                })?;
            }
            Ok(map)
        }
        Source::Pins(dir) => {
            let data = MapData::from_pin(dir.join(name))
                .map_err(|source| MapsError::Map { name, source })?;
            Map::from_map_data(data).map_err(|source| MapsError::Map { name, source })
        }
    }
}

macro_rules! typed {
    ($source:expr, $name:expr) => {{
        let name: &'static str = $name;
        take($source, name)?
            .try_into()
            .map_err(|source| MapsError::Map { name, source })?
    }};
}

impl Maps {
    fn from_source(mut source: Source<'_>) -> Result<Self, MapsError> {
        let s = &mut source;
        Ok(Maps {
            vips: typed!(s, names::VIPS),
            rings: typed!(s, names::RINGS),
            backends: typed!(s, names::BACKENDS),
            flows: typed!(s, names::FLOWS),
            config: typed!(s, names::CONFIG),
            service_stats: typed!(s, names::SERVICE_STATS),
            backend_stats: typed!(s, names::BACKEND_STATS),
            counters: typed!(s, names::COUNTERS),
            deny: typed!(s, names::DENY),
            allow: typed!(s, names::ALLOW),
            filter_stats: typed!(s, names::FILTER_STATS),
            svc_deny: typed!(s, names::SVC_DENY),
            svc_allow: typed!(s, names::SVC_ALLOW),
            flow_limits: typed!(s, names::FLOW_LIMITS),
            flow_buckets: typed!(s, names::FLOW_BUCKETS),
            flows_new: typed!(s, names::FLOWS_NEW),
            vip_addrs: typed!(s, names::VIP_ADDRS),
            quic_ids: typed!(s, names::QUIC_IDS),
            next_hops: typed!(s, names::NEXT_HOPS),
            vips_v4: typed!(s, names::VIPS_V4),
            flows_v4: typed!(s, names::FLOWS_V4),
            flows_new_v4: typed!(s, names::FLOWS_NEW_V4),
            filter_gen: typed!(s, names::FILTER_GEN),
            services_v6: typed!(s, names::SERVICES_V6),
            quic_slots: typed!(s, names::QUIC_SLOTS),
        })
    }

    /// Take the maps out of a loaded object, pinning each under `pin_dir` if given.
    pub fn take(ebpf: &mut Ebpf, pin_dir: Option<&Path>) -> Result<Self, MapsError> {
        Self::from_source(Source::Object(ebpf, pin_dir))
    }

    /// Open the maps pinned under `dir` by a running agent (read counters, adopt state).
    pub fn from_pins(dir: &Path) -> Result<Self, MapsError> {
        Self::from_source(Source::Pins(dir))
    }
}
