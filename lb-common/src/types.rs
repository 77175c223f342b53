//! Key and value layouts of the maps, shared by kernel and user space.
//!
//! Rules (see DESIGN.md): `#[repr(C)]`, explicit padding, no `bool`/`Option`/data
//! enums (u8/u32 codes instead), and a size assert per type. Addresses are always
//! 16 bytes with a family byte, so IPv6 needs no new layout: an IPv4 address sits in
//! word 0 and words 1..4 are zero. Fields marked "network order" hold the bytes as
//! they are on the wire (a `u32` read straight from the packet); the agent converts in
//! one place, `lb-agent/src/dataplane/sync.rs`.

/// Address family codes used in keys and values.
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// IP protocol numbers the fast path balances.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
/// ICMP and ICMPv6: answered or tunnelled for VIP addresses (see `lb-ebpf/src/icmp.rs`).
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

/// Key of [`crate::maps::VIPS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct VipKey {
    /// Network order; IPv4 in word 0, other words zero.
    pub addr: [u32; 4],
    /// Network order.
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<VipKey>() == 20);

/// The VIP's packets go up to the kernel (an L7 service served by the agent's proxy).
pub const VIP_F_L7: u32 = 1 << 0;
/// Hash only the client's address, not its port (`scheduler = "source-ip"`).
pub const VIP_F_SOURCE_HASH: u32 = 1 << 1;
/// The service has its own deny list: its entries in [`crate::maps::SVC_DENY`]
/// (scope = service id) are checked for packets to this VIP.
pub const VIP_F_DENY: u32 = 1 << 2;
/// The service has its own allow list in [`crate::maps::SVC_ALLOW`] (scope = service
/// id, with a catch-all entry per family that counts the sources it does not allow).
pub const VIP_F_ALLOW: u32 = 1 << 3;
/// The service limits new flows per source: `FLOW_LIMITS[service_id + 1]`.
pub const VIP_F_FLOW_LIMIT: u32 = 1 << 4;
/// QUIC connection-ID routing (`quic = true`, UDP): a short-header packet whose
/// destination connection ID names a server id in [`crate::maps::QUIC_IDS`] goes to
/// that backend (see `lb-ebpf/src/quic.rs` for the CID format).
pub const VIP_F_QUIC: u32 = 1 << 5;

/// Value of [`crate::maps::VIPS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipMeta {
    /// Index of the service: its ring is `RINGS[service_id * ring_size ..][.. ring_size]`,
    /// its counters `SERVICE_STATS[service_id]`.
    pub service_id: u32,
    /// Slots of this service's ring (a prime); 0 means "no ring yet": packets are dropped
    /// and counted as `no_backend`.
    pub ring_size: u32,
    /// `VIP_F_*` bits.
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<VipMeta>() == 16);

/// The backend may receive packets of flows already pinned to it. Set for every
/// backend in a ring, and for draining backends (no new flows, existing ones stay).
/// A flow whose backend lost this bit is re-hashed onto the ring.
pub const BACKEND_F_ACTIVE: u8 = 1 << 0;

/// Value of [`crate::maps::BACKENDS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    /// Network order; IPv4 in word 0, other words zero. The tunnel's outer destination.
    pub addr: [u32; 4],
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// `BACKEND_F_*` bits.
    pub flags: u8,
    pub _pad: [u8; 2],
    /// The service this backend id currently belongs to. A flow entry is honoured only
    /// while this equals the VIP's service id, so a reused id never carries a flow over
    /// to another service.
    pub service_id: u32,
    /// The service's IPv4 VIP and meta as in [`crate::maps::VIPS_V4`] (all zero for an
    /// IPv6 VIP, or while the agent has not written the service's VIP yet): an
    /// established IPv4 flow's packet takes its VIP's meta from here, used only when
    /// `service_v4.key` is the packet's VIP and `service_v4.meta.service_id` is
    /// `service_id`, so it needs no VIP lookup and no array read by service id (issue
    /// 12, item 2; the `XDPLB_SVC_V4` array until session 22). The agent rewrites it in
    /// every entry of the service when the service's VIP or meta changes, and zeroes it
    /// before the service's VIP is removed.
    pub service_v4: ServiceV4,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 48);

/// Key of [`crate::maps::FLOWS`]: the 5-tuple of a client flow as it arrived.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    /// Client address, network order.
    pub src: [u32; 4],
    /// VIP address, network order.
    pub dst: [u32; 4],
    /// Network order.
    pub sport: u16,
    /// Network order.
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

/// Value of [`crate::maps::FLOWS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowEntry {
    /// Index into [`crate::maps::BACKENDS`].
    pub backend_id: u32,
    /// The filter generation ([`crate::maps::FILTER_GEN`]) under which this flow's
    /// source last passed the source filters (the global and its service's deny and
    /// allow lists). While it equals the current generation, an established packet of
    /// the flow skips the filter lookups: the agent bumps the generation after every
    /// change of a list (README, "Filter verdicts of established flows"). Was padding.
    pub filter_gen: u32,
}
const _: () = assert!(core::mem::size_of::<FlowEntry>() == 8);

/// Encapsulation codes of [`GlobalConfig::encap`].
pub const ENCAP_IPIP: u32 = 0;
pub const ENCAP_GUE: u32 = 1;

/// The one entry of [`crate::maps::CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct GlobalConfig {
    /// Outer source address of IPv4 tunnels, network order; 0 = not configured
    /// (IPv4 VIP packets are then passed up and counted as `pass_no_source`).
    pub source_v4: u32,
    /// Outer source address of IPv6 tunnels, network order.
    pub source_v6: [u32; 4],
    /// `ENCAP_*`.
    pub encap: u32,
    /// `FILTER_F_*` bits: which source filter lists are in use, so that the program
    /// looks a packet up in a list only when that list has entries.
    pub filter_flags: u32,
    /// `dataplane.mtu`: the largest packet (outer IP header included) sent towards a
    /// backend. A VIP packet that would exceed it once encapsulated gets ICMP
    /// "fragmentation needed" (DF set) or is dropped as `too_big`. 0 = no check
    /// beyond the egress interface's MTU.
    pub mtu: u32,
    /// `dataplane.gue_port`, network order: the outer UDP destination port of GUE
    /// tunnels (`xdp_lb`) and the port `xdp_decap` takes GUE packets on.
    pub gue_port: u16,
    /// `dataplane.icmp_errors_per_cpu`: ICMP errors ("fragmentation needed", "packet
    /// too big") each CPU sends per second at most; a packet that calls for one above
    /// it is dropped as `icmp_error_limited`. 0 = no limit. Counted per CPU in
    /// [`crate::maps::ICMP_RATE`]. (Was padding: an older agent's pinned entry reads 0.)
    pub icmp_errors_per_cpu: u16,
    /// Host order: the host bits of `dataplane.source_ipv4_prefix` (0: one fixed outer
    /// source). When set, [`GlobalConfig::source_v4`] holds the prefix's address and
    /// each flow's outer source is that address with these bits taken from the flow's
    /// [`crate::hash::tunnel_entropy`] (see `lb-ebpf/src/gue.rs`).
    pub source_v4_host_mask: u32,
    /// Host order: the host bits of `dataplane.source_ipv6_prefix` within the last 32
    /// bits of the address (0: one fixed outer IPv6 source). When set,
    /// [`GlobalConfig::source_v6`] holds the prefix's address and each flow's outer
    /// IPv6 source is that address with these bits of its last word taken from the
    /// flow's [`crate::hash::tunnel_entropy`] ([`crate::hash::tunnel_source_v6_low`]).
    pub source_v6_host_mask: u32,
    /// `dataplane.max_new_flows_per_cpu`: new flows per second and CPU above which a
    /// new flow is sent by the ring without being recorded in the new-flow table
    /// (Katran's admission rule; counted `flow_not_inserted`). 0 = no cap: every new
    /// flow is recorded. The rate is kept per CPU in [`crate::maps::NEW_FLOW_RATE`].
    pub max_new_flows_per_cpu: u32,
}
const _: () = assert!(core::mem::size_of::<GlobalConfig>() == 48);

/// [`GlobalConfig::filter_flags`]: [`crate::maps::DENY`] has entries.
pub const FILTER_F_DENY: u32 = 1 << 0;
/// [`GlobalConfig::filter_flags`]: [`crate::maps::ALLOW`] has entries; sources it does
/// not match are dropped on their way to a VIP.
pub const FILTER_F_ALLOW: u32 = 1 << 1;
/// [`GlobalConfig::filter_flags`]: `[security] new_flows_per_source` is set: packets
/// that would create a flow are limited per source by `FLOW_LIMITS[0]`.
pub const FILTER_F_FLOW_LIMIT: u32 = 1 << 2;

/// Data part of the LPM trie keys of [`crate::maps::DENY`], [`crate::maps::ALLOW`],
/// [`crate::maps::SVC_DENY`] and [`crate::maps::SVC_ALLOW`] (the trie key is
/// `{ prefix_len: u32, data: FilterAddr }`), and the key of the per-source token
/// buckets ([`crate::maps::FLOW_BUCKETS`], a masked source address).
///
/// The family and the scope are matched as the first 32 bits, so a trie key's
/// `prefix_len` is [`FILTER_PREFIX_BASE`] plus the prefix length of the address: one
/// trie holds both families without an IPv4 prefix ever matching an IPv6 source, and
/// the per-service tries hold every service's rules, a lookup matching only the
/// rules of the scope it carries.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct FilterAddr {
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Big-endian 24-bit scope: 0 in the global tries; the service id in the
    /// per-service tries; 0 (global) or service id + 1 in the token bucket keys.
    pub scope: [u8; 3],
    /// Network order; IPv4 in word 0, other words zero.
    pub addr: [u32; 4],
}

/// The scope bytes of [`FilterAddr`] for `scope` (below 2^24).
#[inline(always)]
pub const fn filter_scope(scope: u32) -> [u8; 3] {
    [(scope >> 16) as u8, (scope >> 8) as u8, scope as u8]
}

/// Largest scope a [`FilterAddr`] can carry (service ids stay below it).
pub const MAX_FILTER_SCOPE: u32 = (1 << 24) - 1;
const _: () = assert!(core::mem::size_of::<FilterAddr>() == 20);

/// Bits of [`FilterAddr`] before the address: an LPM key's `prefix_len` is this plus
/// the prefix length of the address.
pub const FILTER_PREFIX_BASE: u32 = 32;

/// Value of [`crate::maps::DENY`] and [`crate::maps::ALLOW`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FilterRule {
    /// Index into [`crate::maps::FILTER_STATS`] where drops by this rule are counted.
    /// Index [`FILTER_RULE_NOT_ALLOWED`] counts sources no allow rule matched.
    pub rule_id: u32,
}
const _: () = assert!(core::mem::size_of::<FilterRule>() == 4);

/// Slot of [`crate::maps::FILTER_STATS`] counting packets to a VIP dropped because the
/// allow list is in use and no rule of it matched their source. Rule ids start at 1.
pub const FILTER_RULE_NOT_ALLOWED: u32 = 0;

/// Value of [`crate::maps::FLOW_LIMITS`]: a limit on new flows per source
/// (`new_flows_per_source`), at index 0 the global one, at `service_id + 1` a service's.
///
/// A token bucket of `burst` tokens refilled at `rate` per second, kept per masked
/// source as its theoretical arrival time (GCRA, RFC 2697's single-rate bucket in
/// virtual-scheduling form: the same admissions as a bucket of tokens, in one u64 per
/// source and with no division in XDP): a new flow is admitted when the source's time
/// is at most `tolerance_ns` ahead of now, and moves it `interval_ns` further.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowLimit {
    /// 10^9 / rate: nanoseconds one token takes to come back.
    pub interval_ns: u64,
    /// (burst - 1) x 10^9 / rate: how far ahead of now a source may run.
    pub tolerance_ns: u64,
    /// Network order: the mask of `prefix_v4` for an IPv4 source (word 0).
    pub mask_v4: u32,
    pub _pad: u32,
    /// Network order: the mask of `prefix_v6` for an IPv6 source.
    pub mask_v6: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<FlowLimit>() == 40);

/// Value of the per-service and per-backend counter arrays (per CPU; the agent sums).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TrafficCounters {
    pub packets: u64,
    /// Bytes of the packets as received (before encapsulation).
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<TrafficCounters>() == 16);

/// Key of [`crate::maps::VIP_ADDRS`]: an address some service has its VIP on.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct VipAddrKey {
    /// Network order; IPv4 in word 0, other words zero.
    pub addr: [u32; 4],
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<VipAddrKey>() == 20);

/// [`crate::maps::VIP_ADDRS`] value bit: an L4 service has its VIP on the address
/// (ICMP echo requests to it are answered from XDP, other ICMP dropped).
pub const VIP_ADDR_F_L4: u32 = 1 << 0;
/// [`crate::maps::VIP_ADDRS`] value bit: an L7 service has its VIP on the address, so
/// the address is local to the LB host: ICMP other than errors about an L4 flow is the
/// kernel's (passed up).
pub const VIP_ADDR_F_LOCAL: u32 = 1 << 1;

/// Key of [`crate::maps::DECAP_DSTS`]: a local address tunnelled packets may be sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct DecapKey {
    /// Network order; IPv4 in word 0.
    pub addr: [u32; 4],
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<DecapKey>() == 20);

/// Key of [`crate::maps::QUIC_IDS`]: a server id (`quic_id` of a backend) within a
/// service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct QuicKey {
    /// The service (index of its VIP's `service_id`).
    pub service_id: u32,
    /// Host order: the server id read from the connection ID.
    pub server_id: u32,
}
const _: () = assert!(core::mem::size_of::<QuicKey>() == 8);
/// [`NextHopEntry::flags`]: the entry holds a resolved next hop.
pub const NEXT_HOP_F_VALID: u8 = 1 << 0;

/// Value of [`crate::maps::NEXT_HOPS`], indexed by backend id: where the tunnel packets
/// to that backend go, as the kernel resolved it (route, neighbour, egress link). The
/// program uses an entry only while it has [`NEXT_HOP_F_VALID`] and its `addr` and
/// `family` are those of the backend it sends to (an entry written for the previous
/// holder of a reused backend id is never used); otherwise it asks `bpf_fib_lookup`.
/// All zero = invalid.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NextHopEntry {
    /// The backend's address the entry was resolved for; network order, IPv4 in word 0.
    pub addr: [u32; 4],
    /// Egress interface (XDP_TX when it is the receiving one, else XDP_REDIRECT).
    pub ifindex: u32,
    /// Largest outer packet the path takes (the route's MTU, else the link's): a
    /// larger one is dropped as `too_big`, as `bpf_fib_lookup` answers it.
    pub mtu: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`] (of `addr`).
    pub family: u8,
    /// `NEXT_HOP_F_*` bits.
    pub flags: u8,
    /// Destination MAC: the next hop's (gateway's, or the backend's when on-link).
    pub dmac: [u8; 6],
    /// Source MAC: the egress interface's.
    pub smac: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<NextHopEntry>() == 36);

/// Key of [`crate::maps::VIPS_V4`]: an IPv4 VIP in 8 bytes, hashed and compared in a
/// quarter of [`VipKey`]'s work on every IPv4 packet (issue 12, item 2). The agent
/// writes every IPv4 VIP there as well as into [`crate::maps::VIPS`] (the record it
/// reads back on adoption), with the same [`VipMeta`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct VipKeyV4 {
    /// Network order.
    pub addr: u32,
    /// Network order.
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<VipKeyV4>() == 8);

impl VipKeyV4 {
    /// The short key of an IPv4 [`VipKey`]; None for another family.
    pub const fn of(key: &VipKey) -> Option<Self> {
        if key.family != FAMILY_V4 {
            return None;
        }
        Some(VipKeyV4 {
            addr: key.addr[0],
            port: key.port,
            proto: key.proto,
            _pad: 0,
        })
    }
}

/// A service's IPv4 VIP and its [`VipMeta`] as in [`crate::maps::VIPS_V4`], as each of
/// its backend entries carries it ([`Backend::service_v4`]): an established IPv4 flow's
/// packet finds its VIP's meta there instead of hashing its VIP key; the copy counts only
/// when `key` is the packet's VIP. All zero for an IPv6 VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceV4 {
    pub key: VipKeyV4,
    pub meta: VipMeta,
}
const _: () = assert!(core::mem::size_of::<ServiceV4>() == 24);

/// Value of [`crate::maps::SERVICES_V6`], indexed by service id: the service's IPv6 VIP
/// and its [`VipMeta`] as in [`crate::maps::VIPS`], for established IPv6 flows (as
/// [`Backend::service_v4`] for IPv4): the entry counts only when `key` is the packet's VIP. All
/// zero for a free id or an IPv4 VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceV6 {
    pub key: VipKey,
    pub meta: VipMeta,
}
const _: () = assert!(core::mem::size_of::<ServiceV6>() == 36);

/// Key of [`crate::maps::FLOWS_V4`] and [`crate::maps::FLOWS_NEW_V4`]: an IPv4 flow in
/// 16 bytes instead of [`FlowKey`]'s 40 (the kernel hashes and compares the whole key
/// on every lookup).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKeyV4 {
    /// Client address, network order.
    pub src: u32,
    /// VIP address, network order.
    pub dst: u32,
    /// Network order.
    pub sport: u16,
    /// Network order.
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<FlowKeyV4>() == 16);

impl FlowKeyV4 {
    /// The short key of an IPv4 [`FlowKey`] (its words 1..4 are zero and not kept).
    pub const fn of(key: &FlowKey) -> Self {
        FlowKeyV4 {
            src: key.src[0],
            dst: key.dst[0],
            sport: key.sport,
            dport: key.dport,
            proto: key.proto,
            _pad: [0; 3],
        }
    }
}

/// Value of [`crate::maps::NEW_FLOW_RATE`] (per CPU, one entry): the new flows this
/// CPU has seen in the current one-second window, for
/// [`GlobalConfig::max_new_flows_per_cpu`]; and of [`crate::maps::ICMP_RATE`]: the
/// ICMP errors this CPU has sent in its current window, for
/// [`GlobalConfig::icmp_errors_per_cpu`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NewFlowRate {
    /// `bpf_ktime_get_ns` when the window began.
    pub window_start_ns: u64,
    /// Events (new flows, ICMP errors) counted since then (this one included).
    pub count: u64,
}
const _: () = assert!(core::mem::size_of::<NewFlowRate>() == 16);

/// Length of a [`NewFlowRate`] window: the cap is per second.
pub const NEW_FLOW_RATE_WINDOW_NS: u64 = 1_000_000_000;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: every type is #[repr(C)], made only of integers, with all padding explicit,
    // so any bit pattern is valid and there are no uninitialised bytes.
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipMeta {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowEntry {}
    unsafe impl aya::Pod for GlobalConfig {}
    unsafe impl aya::Pod for TrafficCounters {}
    unsafe impl aya::Pod for DecapKey {}
    unsafe impl aya::Pod for FilterAddr {}
    unsafe impl aya::Pod for FilterRule {}
    unsafe impl aya::Pod for FlowLimit {}
    unsafe impl aya::Pod for VipAddrKey {}
    unsafe impl aya::Pod for QuicKey {}
    unsafe impl aya::Pod for NextHopEntry {}
    unsafe impl aya::Pod for VipKeyV4 {}
    unsafe impl aya::Pod for FlowKeyV4 {}
    unsafe impl aya::Pod for ServiceV4 {}
    unsafe impl aya::Pod for NewFlowRate {}
    unsafe impl aya::Pod for ServiceV6 {}
}
