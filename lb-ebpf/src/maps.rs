//! The maps of the `lb-ebpf` object. Each static carries the name of its
//! `lb_common::maps` constant (the `#[map]` attribute takes only a literal); the
//! agent's loader test checks the two agree. Sizes here are placeholders the loader
//! replaces with `set_max_entries` from the config.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use lb_common::{
    maps::{
        DEFAULT_FLOW_LIMIT_SOURCES, DEFAULT_FLOW_TABLE_SIZE, DEFAULT_MAX_BACKENDS,
        DEFAULT_MAX_FILTER_RULES, DEFAULT_MAX_SERVICES, DEFAULT_RING_SIZE, MAX_DECAP_DSTS,
        QUIC_SLOTS_LEN,
    },
    stats::COUNTERS_LEN,
    types::{
        Backend, DecapKey, FilterAddr, FilterRule, FlowEntry, FlowKey, FlowKeyV4, FlowLimit,
        GlobalConfig, NewFlowRate, NextHopEntry, QuicKey, ServiceV6, TrafficCounters, VipAddrKey,
        VipKey, VipKeyV4, VipMeta,
    },
};

/// `BPF_F_NO_COMMON_LRU`: each CPU keeps its own LRU list, so new flows on one CPU
/// never contend for a global lock (Katran uses per-CPU LRUs for the same reason),
/// while lookups still see every CPU's entries.
const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;

#[map(name = "XDPLB_VIPS")]
pub static VIPS: HashMap<VipKey, VipMeta> = HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

#[map(name = "XDPLB_RINGS")]
pub static RINGS: Array<u32> = Array::with_max_entries(DEFAULT_MAX_SERVICES * DEFAULT_RING_SIZE, 0);

#[map(name = "XDPLB_BACKENDS")]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

#[map(name = "XDPLB_FLOWS")]
pub static FLOWS: LruHashMap<FlowKey, FlowEntry> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE, BPF_F_NO_COMMON_LRU);

#[map(name = "XDPLB_CONFIG")]
pub static CONFIG: Array<GlobalConfig> = Array::with_max_entries(1, 0);

#[map(name = "XDPLB_SVC_STATS")]
pub static SERVICE_STATS: PerCpuArray<TrafficCounters> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_SERVICES, 0);

#[map(name = "XDPLB_BE_STATS")]
pub static BACKEND_STATS: PerCpuArray<TrafficCounters> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

#[map(name = "XDPLB_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS_LEN, 0);

#[map(name = "XDPLB_DECAP_DST")]
pub static DECAP_DSTS: HashMap<DecapKey, u32> = HashMap::with_max_entries(MAX_DECAP_DSTS, 0);

#[map(name = "XDPLB_DENY")]
pub static DENY: LpmTrie<FilterAddr, FilterRule> =
    LpmTrie::with_max_entries(DEFAULT_MAX_FILTER_RULES, 0);

#[map(name = "XDPLB_ALLOW")]
pub static ALLOW: LpmTrie<FilterAddr, FilterRule> =
    LpmTrie::with_max_entries(DEFAULT_MAX_FILTER_RULES, 0);

#[map(name = "XDPLB_FILT_STATS")]
pub static FILTER_STATS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_FILTER_RULES + 1, 0);

#[map(name = "XDPLB_SVC_DENY")]
pub static SVC_DENY: LpmTrie<FilterAddr, FilterRule> =
    LpmTrie::with_max_entries(DEFAULT_MAX_FILTER_RULES, 0);

#[map(name = "XDPLB_SVC_ALLOW")]
pub static SVC_ALLOW: LpmTrie<FilterAddr, FilterRule> =
    LpmTrie::with_max_entries(DEFAULT_MAX_FILTER_RULES, 0);

#[map(name = "XDPLB_FLOW_LIM")]
pub static FLOW_LIMITS: Array<FlowLimit> = Array::with_max_entries(DEFAULT_MAX_SERVICES + 1, 0);

/// Per-CPU LRU lists, as the flow table: a flood of new sources on one CPU evicts only
/// that CPU's least recently used buckets.
#[map(name = "XDPLB_FLOW_BKT")]
pub static FLOW_BUCKETS: LruHashMap<FilterAddr, u64> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_LIMIT_SOURCES, BPF_F_NO_COMMON_LRU);

#[map(name = "XDPLB_FLOWS_NEW")]
pub static FLOWS_NEW: LruHashMap<FlowKey, FlowEntry> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE / 4, BPF_F_NO_COMMON_LRU);

/// VIP addresses (any port) and what lives on them: for ICMP to a VIP address.
#[map(name = "XDPLB_VIP_ADDRS")]
pub static VIP_ADDRS: HashMap<VipAddrKey, u32> = HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

/// QUIC server ids per service -> backend id (connection-ID routing, `quic.rs`).
#[map(name = "XDPLB_QUIC_IDS")]
pub static QUIC_IDS: HashMap<QuicKey, u32> = HashMap::with_max_entries(DEFAULT_MAX_BACKENDS, 0);
/// Each backend's next hop by backend id, written by the agent (`nexthop.rs`).
#[map(name = "XDPLB_NEXT_HOPS")]
pub static NEXT_HOPS: Array<NextHopEntry> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// The IPv4 VIPs under an 8-byte key: the IPv4 path's VIP lookup.
#[map(name = "XDPLB_VIPS_V4")]
pub static VIPS_V4: HashMap<VipKeyV4, VipMeta> = HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

/// IPv4 flows (16-byte keys); `FLOWS` keeps the IPv6 ones. Per-CPU LRU as `FLOWS`.
#[map(name = "XDPLB_FLOWS_V4")]
pub static FLOWS_V4: LruHashMap<FlowKeyV4, FlowEntry> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE, BPF_F_NO_COMMON_LRU);

/// IPv4 flows seen once (16-byte keys); `FLOWS_NEW` keeps the IPv6 ones.
#[map(name = "XDPLB_FLOWS_NV4")]
pub static FLOWS_NEW_V4: LruHashMap<FlowKeyV4, FlowEntry> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE / 4, BPF_F_NO_COMMON_LRU);

/// A per-CPU buffer for summing packet bytes (`csum::sum_packet`: 512 bytes at a time
/// and 4 of padding).
#[map(name = "XDPLB_SCRATCH")]
pub static SCRATCH: PerCpuArray<[u8; crate::csum::SCRATCH_LEN]> =
    PerCpuArray::with_max_entries(1, 0);

/// Each CPU's new flows in the current second (`hashing::over_new_flow_cap`), for
/// `dataplane.max_new_flows_per_cpu`.
#[map(name = "XDPLB_NEW_RATE")]
pub static NEW_FLOW_RATE: PerCpuArray<NewFlowRate> = PerCpuArray::with_max_entries(1, 0);

/// Each CPU's ICMP errors sent in the current second (`limit::over_per_cpu_cap`, from
/// `icmp::too_big_v4` and `icmp6::too_big_v6`), for `dataplane.icmp_errors_per_cpu`.
#[map(name = "XDPLB_ICMP_RATE")]
pub static ICMP_RATE: PerCpuArray<NewFlowRate> = PerCpuArray::with_max_entries(1, 0);

/// The filter generation (`hashing::filter_gen`): an established flow whose entry
/// carries it skips the source filters' lookups.
#[map(name = "XDPLB_FILT_GEN")]
pub static FILTER_GEN: Array<u32> = Array::with_max_entries(1, 0);

/// Each service's IPv6 VIP and meta by service id (established IPv6 flows).
#[map(name = "XDPLB_SVC_V6")]
pub static SERVICES_V6: Array<ServiceV6> = Array::with_max_entries(DEFAULT_MAX_SERVICES, 0);

/// `QUIC_IDS` again, direct-mapped by `lb_common::hash::quic_slot` (quic.rs): one array
/// read routes a short header; keys that share a slot are found in `QUIC_IDS`.
#[map(name = "XDPLB_QUIC_SLOT")]
pub static QUIC_SLOTS: Array<u64> = Array::with_max_entries(QUIC_SLOTS_LEN, 0);
