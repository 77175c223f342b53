//! Map names and default capacities.
//!
//! The eBPF side declares each map with `#[map(name = "...")]`, which only takes a
//! literal, so it spells the same string; a test checks the loaded object's map names
//! equal [`ALL`]. The agent only ever uses these constants. Names stay under the
//! kernel's 15-character limit for object names.

/// `HashMap<VipKey, VipMeta>`: the virtual IPs this node balances (every VIP: the
/// record the agent reads back; the IPv4 path looks its VIPs up in [`VIPS_V4`]).
pub const VIPS: &str = "XDPLB_VIPS";
/// `Array<u32>` of `max_services * ring_size` backend ids: service `s` owns the slots
/// `s * ring_size .. (s + 1) * ring_size`; each slot holds a backend id.
pub const RINGS: &str = "XDPLB_RINGS";
/// `Array<Backend>` indexed by backend id.
pub const BACKENDS: &str = "XDPLB_BACKENDS";
/// `LruHashMap<FlowKey, FlowEntry>`: the backend each established flow was given
/// (IPv6 flows; IPv4 flows are in [`FLOWS_V4`]).
pub const FLOWS: &str = "XDPLB_FLOWS";
/// `Array<GlobalConfig>` with one entry.
pub const CONFIG: &str = "XDPLB_CONFIG";
/// `PerCpuArray<TrafficCounters>` indexed by service id: the traffic of the service's
/// backends that are gone (their [`BACKEND_STATS`] totals, added by the agent when it
/// frees a backend id). Only the agent writes it; a service's totals are this plus its
/// current backends' [`BACKEND_STATS`] (`lb-agent/src/dataplane/stats.rs`), so a
/// forwarded packet updates one traffic counter (issue 12, item 2).
pub const SERVICE_STATS: &str = "XDPLB_SVC_STATS";
/// `PerCpuArray<TrafficCounters>` indexed by backend id: what the fast path forwarded
/// to each backend (zeroed by the agent when it frees the id).
pub const BACKEND_STATS: &str = "XDPLB_BE_STATS";
/// `PerCpuArray<u64>` indexed by [`crate::stats::Counter`].
pub const COUNTERS: &str = "XDPLB_COUNTERS";
/// `HashMap<DecapKey, u32>`: outer destination addresses the decap program accepts.
pub const DECAP_DSTS: &str = "XDPLB_DECAP_DST";
/// `LpmTrie<FilterAddr, FilterRule>`: source prefixes whose packets are dropped.
pub const DENY: &str = "XDPLB_DENY";
/// `LpmTrie<FilterAddr, FilterRule>`: when it has entries, the only sources whose
/// packets reach a VIP.
pub const ALLOW: &str = "XDPLB_ALLOW";
/// `PerCpuArray<u64>` indexed by `FilterRule::rule_id`: packets dropped by each rule.
pub const FILTER_STATS: &str = "XDPLB_FILT_STATS";
/// `LpmTrie<FilterAddr, FilterRule>`: every service's own deny prefixes, scope = the
/// service id (one trie for all services: one lookup whatever their number).
pub const SVC_DENY: &str = "XDPLB_SVC_DENY";
/// `LpmTrie<FilterAddr, FilterRule>`: every service's own allow prefixes (rule id 0)
/// and, per service and family it does not allow whole, a catch-all `/0` whose rule id
/// counts the sources it refuses.
pub const SVC_ALLOW: &str = "XDPLB_SVC_ALLOW";
/// `Array<FlowLimit>`: index 0 the global `new_flows_per_source`, `service_id + 1` a
/// service's.
pub const FLOW_LIMITS: &str = "XDPLB_FLOW_LIM";
/// `LruHashMap<FilterAddr, u64>`: per masked source and scope, its token bucket (the
/// theoretical arrival time in ns of `bpf_ktime_get_ns`).
pub const FLOW_BUCKETS: &str = "XDPLB_FLOW_BKT";
/// `LruHashMap<FlowKey, FlowEntry>`: flows seen once (a SYN, a first datagram), waiting
/// for their second packet to be promoted into [`FLOWS`] (IPv6 flows; IPv4 flows wait
/// in [`FLOWS_NEW_V4`]). A flood of one-packet flows
/// (spoofed SYNs) churns this table, never the established flows in [`FLOWS`].
pub const FLOWS_NEW: &str = "XDPLB_FLOWS_NEW";
/// `HashMap<VipAddrKey, u32>`: every VIP address with `VIP_ADDR_F_*` bits (does an L4
/// service live there, is it local for an L7 one), for ICMP to VIP addresses.
/// Capacity: one per service.
pub const VIP_ADDRS: &str = "XDPLB_VIP_ADDRS";
/// `HashMap<QuicKey, u32>`: per service, each QUIC server id (a backend's `quic_id`)
/// and the backend id it names, for connection-ID routing. Capacity: `max_backends`.
pub const QUIC_IDS: &str = "XDPLB_QUIC_IDS";

/// `Array<NextHopEntry>` indexed by backend id: each backend's resolved next hop
/// (egress interface, MACs, MTU), written by the agent from netlink; the program falls
/// back to `bpf_fib_lookup` when an entry is invalid or for another address.
pub const NEXT_HOPS: &str = "XDPLB_NEXT_HOPS";

/// `HashMap<VipKeyV4, VipMeta>`: the IPv4 VIPs of [`VIPS`] again, under an 8-byte key:
/// the IPv4 path looks VIPs up here (issue 12, item 2). Written with [`VIPS`], in one
/// place (`lb-agent/src/dataplane/sync.rs`); capacity: `max_services`.
pub const VIPS_V4: &str = "XDPLB_VIPS_V4";
/// `LruHashMap<FlowKeyV4, FlowEntry>`: [`FLOWS`] for IPv4 flows, under a 16-byte key
/// ([`FLOWS`] keeps the IPv6 ones). Capacity: `flow_table_size`.
pub const FLOWS_V4: &str = "XDPLB_FLOWS_V4";
/// `LruHashMap<FlowKeyV4, FlowEntry>`: [`FLOWS_NEW`] for IPv4 flows. Capacity:
/// `new_flow_table_size`.
pub const FLOWS_NEW_V4: &str = "XDPLB_FLOWS_NV4";

/// `PerCpuArray<[u8; 516]>` with one entry: scratch space of the program (packet bytes
/// copied there to be summed for a checksum). Holds nothing between packets.
pub const SCRATCH: &str = "XDPLB_SCRATCH";
/// `PerCpuArray<NewFlowRate>` with one entry: each CPU's new flows in the current
/// second, for `GlobalConfig::max_new_flows_per_cpu` (written only by the program).
pub const NEW_FLOW_RATE: &str = "XDPLB_NEW_RATE";
/// `PerCpuArray<NewFlowRate>` with one entry: the ICMP errors each CPU has sent in the
/// current second, for `GlobalConfig::icmp_errors_per_cpu` (written only by the program).
pub const ICMP_RATE: &str = "XDPLB_ICMP_RATE";

/// `Array<u32>` with one entry: the filter generation, bumped by the agent after every
/// pass that wrote the deny/allow tries or the flags that enable them
/// (`lb-agent/src/dataplane/sync.rs`). A flow entry's `FlowEntry::filter_gen` equal to
/// it means the flow's source passed the lists as they are now.
pub const FILTER_GEN: &str = "XDPLB_FILT_GEN";

/// `Array<ServiceV6>` indexed by service id: each service's IPv6 VIP key and meta (zero
/// for IPv4 VIPs and free ids), for established IPv6 flows, as each backend entry's
/// copy (`Backend::service_v4`) for IPv4. Written with [`VIPS`]; capacity: `max_services`.
pub const SERVICES_V6: &str = "XDPLB_SVC_V6";

/// `Array<u64>` of [`QUIC_SLOTS_LEN`] slots: a direct-mapped copy of [`QUIC_IDS`], so
/// that a QUIC short header is routed by an array read instead of a hash lookup, as
/// Katran indexes its `server_id_map` by server id. A (service, server id) key lives
/// in slot [`crate::hash::quic_slot`] as [`crate::hash::quic_slot_value`] (server id
/// in the high word, backend id + 1 in the low one; 0 = empty). Two keys of one slot:
/// the first in key order has it, the other is found in [`QUIC_IDS`], which keeps
/// every key; so does a packet whose slot holds another key. Written by the agent
/// after [`QUIC_IDS`] (`lb-agent/src/dataplane/quic_ids.rs`).
pub const QUIC_SLOTS: &str = "XDPLB_QUIC_SLOT";
/// Slots of [`QUIC_SLOTS`] (a power of two, fixed: 512 KiB): with the default 4096
/// backends at most 6% of them are taken, so two keys rarely share one.
pub const QUIC_SLOTS_LEN: u32 = 1 << 16;

/// Every map of the `lb-ebpf` object, for the loader and the name test.
pub const ALL: &[&str] = &[
    VIPS,
    RINGS,
    BACKENDS,
    FLOWS,
    CONFIG,
    SERVICE_STATS,
    BACKEND_STATS,
    COUNTERS,
    DECAP_DSTS,
    DENY,
    ALLOW,
    FILTER_STATS,
    SVC_DENY,
    SVC_ALLOW,
    FLOW_LIMITS,
    FLOW_BUCKETS,
    FLOWS_NEW,
    VIP_ADDRS,
    QUIC_IDS,
    NEXT_HOPS,
    VIPS_V4,
    FLOWS_V4,
    FLOWS_NEW_V4,
    SCRATCH,
    NEW_FLOW_RATE,
    ICMP_RATE,
    FILTER_GEN,
    SERVICES_V6,
    QUIC_SLOTS,
];

/// Default capacity of [`VIPS`] and the number of rings in [`RINGS`]; the loader
/// overrides the compiled-in sizes with `set_max_entries`.
pub const DEFAULT_MAX_SERVICES: u32 = 64;
/// Default capacity of [`BACKENDS`] and [`BACKEND_STATS`].
pub const DEFAULT_MAX_BACKENDS: u32 = 4096;
/// Default Maglev ring size (a prime).
pub const DEFAULT_RING_SIZE: u32 = 65537;
/// Default capacity of [`FLOWS`].
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 1_000_000;
/// Capacity of [`DECAP_DSTS`].
pub const MAX_DECAP_DSTS: u32 = 256;
/// Default capacity of [`DENY`] and of [`ALLOW`] (`dataplane.max_filter_rules`);
/// [`FILTER_STATS`] has one slot more (rule ids start at 1).
pub const DEFAULT_MAX_FILTER_RULES: u32 = 1024;
/// Default capacity of [`FLOW_BUCKETS`] (`dataplane.flow_limit_sources`).
pub const DEFAULT_FLOW_LIMIT_SOURCES: u32 = 65536;
/// Default capacity of [`FLOWS_NEW`] when `dataplane.new_flow_table_size` is not set:
/// this share of the flow table (at least 1 entry).
pub const NEW_FLOW_TABLE_SHARE: u32 = 4;
