//! The typed model of the configuration file: one struct per table, one field per
//! key, the defaults of each table in its `Default` (or its field's `#[serde(default)]`).
//!
//! This is the single source of the keys: the file reader ([`super::read`]) takes the
//! known keys of each table, the defaults and the value types from these structs'
//! serde implementations, and the REST API reads its bodies into the same types. A new
//! key is one field here (plus its rule in [`super::rules`]).
//!
//! Two defaults depend on another key of the service and are filled in when a
//! [`ServiceConfig`] is deserialized: the scheduler (the mode's) and a backend's port
//! (the VIP's).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::LazyLock;

use serde::de::value::{MapAccessDeserializer, StringDeserializer};
use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::rules::{is_cookie_name, is_tchar};

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[agent]`: interface, API and state locations.
    #[serde(default)]
    pub agent: AgentConfig,
    /// `[dataplane]`: XDP fast path settings and map capacities.
    #[serde(default)]
    pub dataplane: DataplaneConfig,
    /// `[security]`: source prefixes denied or allowed, enforced in XDP.
    #[serde(default)]
    pub security: SecurityConfig,
    /// `[[service]]` tables, in file order.
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
    /// `[bgp]`: announce the VIPs through a local BIRD 2; absent: no announcements.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<BgpConfig>,
    /// `[cluster]`: services, backends and filters shared by several LB nodes through
    /// etcd; absent: this node's file and state file are the desired state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
}

/// `[cluster]`: the desired state lives under `prefix` in the etcd cluster `etcd`;
/// `node` names this node there (its health view, `GET /api/v1/cluster`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's name, unique in the cluster.
    pub node: String,
    /// The etcd members' client URLs (`http://host:port`).
    pub etcd: Vec<String>,
    /// Key prefix in etcd (`/xdplb` by default).
    #[serde(default = "default_cluster_prefix")]
    pub prefix: String,
}

fn default_cluster_prefix() -> String {
    "/xdplb".to_owned()
}

/// `[bgp]`: the agent writes the VIPs it announces into `include_file` (a BIRD static
/// protocol) and has the BIRD behind `bird_socket` read its config again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BgpConfig {
    /// BIRD's control socket (`bird -s`), used as `birdc -s SOCKET configure`.
    pub bird_socket: PathBuf,
    /// The file the agent writes (BIRD's config includes it).
    pub include_file: PathBuf,
    /// After a withdrawal (detach, node drain): seconds to wait before going on.
    pub drain_s: u64,
    /// Site preference: how many times this node's AS (`local_as`) is prepended to the
    /// AS path of its announcements (0: none). A standby site's nodes set it, so that
    /// routers prefer the primary site's nodes (shorter path) while any of them
    /// announces a VIP, and merge only equal paths into ECMP.
    pub site_prepend: u8,
    /// This node's AS number, as its BIRD's BGP protocols use it (`local ... as N`):
    /// what `site_prepend` prepends. Required when `site_prepend` > 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_as: Option<u32>,
}

impl Default for BgpConfig {
    fn default() -> Self {
        Self {
            bird_socket: PathBuf::from("/run/bird/bird.ctl"),
            include_file: PathBuf::from("/etc/bird/xdplb.conf"),
            drain_s: 5,
            site_prepend: 0,
            local_as: None,
        }
    }
}

/// `[agent]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Interface the XDP program attaches to; `--iface` may supply it instead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// REST API listen address; a non-loopback address requires `api_token_file`.
    pub api_listen: SocketAddr,
    /// File holding the bearer token of the REST API.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_token_file: Option<PathBuf>,
    /// Where accepted API changes are persisted.
    pub state_dir: PathBuf,
    /// bpffs mount under which maps and links are pinned.
    pub bpffs: PathBuf,
    /// The directory whose files a service given through the API may name in
    /// `tls = { cert, key }`; without it the API accepts no `tls`. Services of the
    /// config file may name any path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<PathBuf>,
    /// L7 worker threads, each a single-threaded runtime its connections live on
    /// (`crate::l7::workers`; the control plane runs on min(workers, 2) threads of its
    /// own); default: one per CPU the agent may run on ([`AgentConfig::worker_threads`]).
    /// Read at start (a reload does not change it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<u16>,
}

/// The most worker threads `agent.workers` may ask for.
pub const MAX_WORKERS: u16 = 1024;

impl AgentConfig {
    /// The runtime's worker threads: `workers`, else one per CPU this process may run on
    /// (its affinity mask and cgroup quota, as `std::thread::available_parallelism` reads
    /// them), at least one.
    #[must_use]
    pub fn worker_threads(&self) -> usize {
        self.workers.map_or_else(
            || std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            usize::from,
        )
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            interface: None,
            api_listen: DEFAULT_API_LISTEN,
            api_token_file: None,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            bpffs: PathBuf::from(DEFAULT_BPFFS),
            tls_dir: None,
            workers: None,
        }
    }
}

/// How the XDP program is attached (`dataplane.xdp_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum XdpMode {
    /// Native (driver) mode when the driver supports it, else generic (skb) mode.
    #[default]
    Auto,
    /// Driver mode only.
    Native,
    /// Generic (skb) mode.
    Skb,
    /// No fast path: only L7 services are served.
    Off,
}

/// Tunnel encapsulation towards the backends (`dataplane.encap`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Encap {
    /// IP-in-IP (IPv4) / IP6-in-IP6.
    #[default]
    Ipip,
    /// Generic UDP Encapsulation.
    Gue,
}

/// Default of `dataplane.gue_port` (Katran's GUE port).
pub const DEFAULT_GUE_PORT: u16 = 6080;

/// Default of `dataplane.icmp_errors_per_cpu`: what Linux allows its own ICMP errors
/// (`net.ipv4.icmp_msgs_per_sec`).
pub const DEFAULT_ICMP_ERRORS_PER_CPU: u32 = 1000;
/// Largest `dataplane.icmp_errors_per_cpu` (the fast path keeps it in 16 bits).
pub const MAX_ICMP_ERRORS_PER_CPU: u32 = u16::MAX as u32;

/// Default of `dataplane.mtu`: Ethernet's.
pub const DEFAULT_MTU: u32 = 1500;
/// Range of `dataplane.mtu`: IPv4's minimum datagram every host must accept (RFC 791),
/// up to the usual jumbo frame.
pub const MTU_RANGE: std::ops::RangeInclusive<u32> = 576..=9216;

/// `[dataplane]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataplaneConfig {
    /// XDP attach mode.
    pub xdp_mode: XdpMode,
    /// Encapsulation towards the backends.
    pub encap: Encap,
    /// Outer source address of IPv4 tunnelled packets; required by l4 IPv4 services.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_ipv4: Option<Ipv4Addr>,
    /// Outer source address of IPv6 tunnelled packets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_ipv6: Option<Ipv6Addr>,
    /// Maglev lookup table size per service: a prime.
    pub ring_size: u32,
    /// Capacity of the flow (connection tracking) LRU table.
    pub flow_table_size: u32,
    /// Capacity of the VIP map.
    pub max_services: u32,
    /// Capacity of the backend map, over all services.
    pub max_backends: u32,
    /// Capacity of each source filter trie (`[security] deny`, `allow`; and of all
    /// services' own `deny` lists together, and of their `allow` lists together).
    pub max_filter_rules: u32,
    /// Capacity of the new-flow table: flows seen once (a SYN, a first datagram) wait
    /// there for their second packet before they enter the flow table. Default: a
    /// quarter of `flow_table_size`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_flow_table_size: Option<u32>,
    /// Sources (masked as `new_flows_per_source` says) whose token buckets are kept,
    /// least recently used forgotten first.
    pub flow_limit_sources: u32,
    /// MTU towards the backends (bytes of IP packet, tunnel header included): a VIP
    /// packet that would exceed it once encapsulated gets ICMP "fragmentation needed"
    /// (DF set, next-hop MTU = `mtu` - 20, or - 28 with GUE) or is dropped as
    /// `too_big` (DF clear).
    pub mtu: u32,
    /// Outer UDP destination port of GUE tunnels (`encap = "gue"`): the port the
    /// backends decapsulate on (`lb-agent decap attach --gue-port`).
    pub gue_port: u16,
    /// An IPv4 prefix (`address/length`, /16 to /32, no host bits) the outer source
    /// of tunnelled IPv4 packets varies in, per flow (IPIP and GUE), so that ECMP and
    /// the backends' RSS spread flows by outer source too. Its address replaces
    /// `source_ipv4` as the outer source; the prefix must be routed to the LB (ICMP
    /// errors about the tunnel come back to it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_ipv4_prefix: Option<String>,
    /// The IPv6 twin of `source_ipv4_prefix` (`address/length`, /64 to /128, no host
    /// bits): the outer source of packets tunnelled to IPv6 backends (6in6, 4in6, GUE
    /// over IPv6) varies per flow within it, in the last 32 bits of the address (all
    /// host bits from /96 on; below /96 the host bits above the last 32 stay those of
    /// the prefix's address, zero). Its address replaces `source_ipv6` as the outer
    /// source; the prefix must be routed to the LB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_ipv6_prefix: Option<String>,
    /// Katran's admission rule: new flows per second and CPU above which the fast
    /// path sends a new flow by the ring without recording it in the new-flow table
    /// (counted `flow_not_inserted`); 0 (the default) = no cap, every new flow is
    /// recorded. Flows not recorded follow the ring, so they move when a backend change
    /// moves their ring slot (README, "Admission rule").
    pub max_new_flows_per_cpu: u32,
    /// ICMP errors the fast path sends itself ("fragmentation needed", ICMPv6 "packet
    /// too big", for packets too big for the tunnel) per second and CPU at most; a
    /// packet that calls for one above it is dropped unanswered (counted
    /// `icmp_error_limited`). 0 = no limit. Default 1000 (Linux's own ICMP errors:
    /// `net.ipv4.icmp_msgs_per_sec` = 1000).
    pub icmp_errors_per_cpu: u32,
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        Self {
            xdp_mode: XdpMode::default(),
            encap: Encap::default(),
            source_ipv4: None,
            source_ipv6: None,
            ring_size: DEFAULT_RING_SIZE,
            flow_table_size: DEFAULT_FLOW_TABLE_SIZE,
            max_services: DEFAULT_MAX_SERVICES,
            max_backends: DEFAULT_MAX_BACKENDS,
            max_filter_rules: DEFAULT_MAX_FILTER_RULES,
            new_flow_table_size: None,
            flow_limit_sources: lb_common::maps::DEFAULT_FLOW_LIMIT_SOURCES,
            mtu: DEFAULT_MTU,
            gue_port: DEFAULT_GUE_PORT,
            source_ipv4_prefix: None,
            source_ipv6_prefix: None,
            max_new_flows_per_cpu: 0,
            icmp_errors_per_cpu: DEFAULT_ICMP_ERRORS_PER_CPU,
        }
    }
}

impl DataplaneConfig {
    /// `new_flow_table_size`, or its default: a quarter of the flow table.
    #[must_use]
    pub fn new_flow_table_entries(&self) -> u32 {
        self.new_flow_table_size
            .unwrap_or((self.flow_table_size / lb_common::maps::NEW_FLOW_TABLE_SHARE).max(1))
    }
}

/// `[security]`: global source filters, enforced in XDP before anything else. Also
/// the body of `GET`/`PUT /api/v1/filters` (the table as JSON, replaced whole).
/// Prefixes are `address/length` with no host bits set, IPv4 or IPv6.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct SecurityConfig {
    /// Source prefixes whose packets are dropped (all of them, not only VIP traffic).
    #[schema(example = json!(["203.0.113.0/24", "2001:db8:bad::/48"]))]
    pub deny: Vec<String>,
    /// When non-empty, only sources in these prefixes reach VIPs; traffic to other
    /// addresses passes as before. Deny is checked first.
    #[schema(example = json!([]))]
    pub allow: Vec<String>,
    /// A limit on new flows per source (all VIPs); none when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_flows_per_source: Option<FlowLimitConfig>,
}

/// `new_flows_per_source = { rate, burst, prefix_v4, prefix_v6 }`: per source (an
/// address masked to `prefix_v4` / `prefix_v6` bits), at most `burst` new flows at
/// once and `rate` per second on average; packets that would open more are dropped
/// in XDP (`xdplb_drops_total{reason="new_flow_limit"}`). Established flows are never
/// limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FlowLimitConfig {
    /// New flows per second per source, 1 to 100,000,000.
    #[schema(example = 1000)]
    pub rate: u32,
    /// New flows a source may open at once (the bucket's size), at least 1.
    #[schema(example = 2000)]
    pub burst: u32,
    /// Bits of an IPv4 source that make one source (32: each address).
    #[serde(default = "FlowLimitConfig::default_prefix_v4")]
    #[schema(example = 32)]
    pub prefix_v4: u8,
    /// Bits of an IPv6 source that make one source (64: each /64, a host's usual share).
    #[serde(default = "FlowLimitConfig::default_prefix_v6")]
    #[schema(example = 64)]
    pub prefix_v6: u8,
}

impl FlowLimitConfig {
    const fn default_prefix_v4() -> u8 {
        32
    }
    const fn default_prefix_v6() -> u8 {
        64
    }
}

/// Transport protocol of a VIP.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// TCP.
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

/// Where a service is balanced.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// In the XDP fast path, DSR over a tunnel.
    #[default]
    L4,
    /// In the agent's HTTP proxy.
    L7,
}

/// Backend selection algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Scheduler {
    /// l4: Maglev consistent hashing of the 5-tuple.
    Maglev,
    /// l4: Maglev on the source address only (client affinity).
    SourceIp,
    /// l7: weighted round robin.
    RoundRobin,
    /// l7: fewest requests in flight.
    LeastRequest,
    /// l7: power of two random choices.
    P2c,
    /// l7: consistent hash of the request.
    Hash,
}

/// Health check type.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum HealthKind {
    /// No checks: backends are always up.
    #[default]
    None,
    /// A TCP connect to the backend.
    Tcp,
    /// An HTTP GET whose status must fall within `expect_status`.
    Http,
}

/// A service's `health = { ... }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Check type.
    pub kind: HealthKind,
    /// HTTP request path.
    pub path: String,
    /// HTTP `Host` header; the backend address when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Accepted HTTP status codes, inclusive (`expect_status = [200, 399]`).
    #[serde(deserialize_with = "status_range")]
    pub expect_status: (u16, u16),
    /// Time between two checks of one backend.
    pub interval_ms: u64,
    /// Time allowed for one check; at most `interval_ms`.
    pub timeout_ms: u64,
    /// Consecutive successes that bring a backend up.
    pub rise: u32,
    /// Consecutive failures that bring a backend down.
    pub fall: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            kind: HealthKind::default(),
            path: DEFAULT_HEALTH_PATH.to_owned(),
            host: None,
            expect_status: DEFAULT_EXPECT_STATUS,
            interval_ms: DEFAULT_INTERVAL_MS,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            rise: DEFAULT_RISE,
            fall: DEFAULT_FALL,
        }
    }
}

/// One entry of a service's `backend = [ ... ]`.
///
/// `port` may be left out: a [`ServiceConfig`] read from a file or the API fills in
/// its VIP's port; a backend read on its own (`POST .../backends`) gets it from
/// [`BackendConfig::with_default_port`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Backend address.
    #[schema(value_type = String, example = "198.18.2.11")]
    pub address: IpAddr,
    /// Backend port, 1 to 65535; in l4 mode it must equal the VIP's port. 0 only in
    /// a backend just read without a port, until the VIP's port is filled in.
    #[serde(default, deserialize_with = "given_port")]
    #[schema(required = false)]
    pub port: u16,
    /// Relative weight, 0 (drained) to 1 000 000.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Failover tier, 0 to 7: a tier serves only when all lower tiers have no healthy backend.
    #[serde(default)]
    pub tier: u8,
    /// The backend's QUIC server id, which its connection IDs carry (a `quic`
    /// service's backends; format in the README): 1 to 4294967295, unique in the
    /// service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quic_id: Option<u32>,
}

impl BackendConfig {
    /// The backend with the VIP's port where it was read without one.
    #[must_use]
    pub fn with_default_port(mut self, vip_port: u16) -> Self {
        if self.port == 0 {
            self.port = vip_port;
        }
        self
    }
}

/// A service's `sticky = { ... }` (l7 only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StickyConfig {
    /// Name of the cookie that pins a client to a backend.
    pub cookie: String,
    /// Cookie lifetime in seconds.
    pub ttl_s: u64,
}

/// A service's `cache = { ... }` (l7 only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Memory budget of the HTTP cache.
    pub max_bytes: u64,
    /// Largest response body stored (capped at `max_bytes`); larger ones pass through uncached.
    #[serde(default = "default_max_object_bytes")]
    pub max_object_bytes: u64,
    /// RFC 9213 targeted cache-control fields this cache obeys, in order of precedence
    /// (the first present with a valid value wins over `Cache-Control` and `Expires`);
    /// empty: `Cache-Control` only.
    #[serde(default = "default_cache_targets")]
    pub targets: Vec<String>,
    /// Serve a stale response for up to this many seconds past its freshness when the
    /// backend cannot be reached at all (RFC 9111 §4.2.4), unless the response forbids
    /// it; 0 (the default): only where `stale-if-error` allows.
    #[serde(default)]
    pub stale_if_unreachable_s: u64,
}

impl CacheConfig {
    /// The largest body stored: `max_object_bytes`, at most the whole budget.
    #[must_use]
    pub fn object_limit(&self) -> u64 {
        self.max_object_bytes.min(self.max_bytes)
    }
}

fn default_max_object_bytes() -> u64 {
    DEFAULT_MAX_OBJECT_BYTES
}

/// The default `cache.targets`: `CDN-Cache-Control` (RFC 9213).
#[must_use]
pub fn default_cache_targets() -> Vec<String> {
    vec!["CDN-Cache-Control".to_owned()]
}

/// A service's `on_all_down`: what the fast path does when no backend of any tier
/// is eligible.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum AllDown {
    /// Keep serving with the last known set (the health checker may be the one cut off).
    #[default]
    FailOpen,
    /// Serve nobody: the fast path drops the service's new flows (counted as `no_backend`).
    Drop,
}

/// What the `hash` scheduler (l7) hashes: `hash_on = "client" | "header:NAME" | "cookie:NAME"`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum HashOn {
    /// The client's address.
    #[default]
    Client,
    /// A request header (lower-case name); requests without it hash on the client.
    Header(String),
    /// A request cookie; requests without it hash on the client.
    Cookie(String),
}

impl fmt::Display for HashOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Client => f.write_str("client"),
            Self::Header(h) => write!(f, "header:{h}"),
            Self::Cookie(c) => write!(f, "cookie:{c}"),
        }
    }
}

impl std::str::FromStr for HashOn {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "client" {
            return Ok(Self::Client);
        }
        if let Some(h) = s.strip_prefix("header:") {
            if h.is_empty() || !h.bytes().all(is_tchar) {
                return Err(format!("\"{h}\" is not a valid header name"));
            }
            return Ok(Self::Header(h.to_ascii_lowercase()));
        }
        if let Some(c) = s.strip_prefix("cookie:") {
            if !is_cookie_name(c) {
                return Err(format!("\"{c}\" is not a valid cookie name"));
            }
            return Ok(Self::Cookie(c.to_owned()));
        }
        Err(format!(
            "unknown value \"{s}\", expected \"client\", \"header:NAME\" or \"cookie:NAME\""
        ))
    }
}

impl Serialize for HashOn {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        ser.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HashOn {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        let s = String::deserialize(de)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A service's `tls = { cert, key }` (l7 only): PEM files; ALPN offers h2 and http/1.1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain, PEM.
    #[schema(value_type = String)]
    pub cert: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1), PEM.
    #[schema(value_type = String)]
    pub key: PathBuf,
}

/// A service's `http = { ... }` (l7 only): timeouts, limits, retries and passive health.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Time to open a connection to a backend.
    pub connect_timeout_ms: u64,
    /// Time a client has to send a request's whole header (slowloris limit: 408).
    pub header_timeout_ms: u64,
    /// Time a kept-alive client connection may stay idle between requests.
    pub idle_timeout_ms: u64,
    /// Time a backend has to answer with a response header (504 after it).
    pub response_timeout_ms: u64,
    /// Largest request header block, bytes (431 above it).
    pub max_header_bytes: u32,
    /// Most request header fields (431 above it).
    pub max_headers: u32,
    /// Largest request body, bytes (413 above it).
    pub max_body_bytes: u64,
    /// Extra attempts of an idempotent request on another backend after a connect
    /// failure or a reset before any response byte.
    pub retries: u32,
    /// Consecutive connect errors or 5xx answers that eject a backend (0: never).
    pub eject_after: u32,
    /// First ejection time; each further ejection doubles it, up to `eject_max_ms`.
    pub eject_base_ms: u64,
    /// Longest ejection.
    pub eject_max_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            connect_timeout_ms: 1000,
            header_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            response_timeout_ms: 30_000,
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_body_bytes: 64 * 1024 * 1024,
            retries: 2,
            eject_after: 5,
            eject_base_ms: 1000,
            eject_max_ms: 30_000,
        }
    }
}

/// One `[[service]]`.
///
/// Deserializes with the same defaults as the TOML file: `protocol = "tcp"`,
/// `mode = "l4"`, the scheduler of the mode, `health = { kind = "none" }`, and a
/// backend's `port` equal to the VIP's.
///
/// Deserialize it through serde (`serde_json::from_str`, `toml::from_str`, or
/// `<ServiceConfig as Deserialize>::deserialize`): the inherent
/// `ServiceConfig::deserialize` that `remote = "Self"` generates is the bare derive,
/// without those two defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
// `remote = "Self"`: the derives become inherent functions that the trait impls below
// call, so that deserializing can fill in the defaults that depend on other keys.
#[serde(remote = "Self", deny_unknown_fields)]
pub struct ServiceConfig {
    /// Unique name: `[A-Za-z0-9_.-]`, 1 to 64 characters.
    pub name: String,
    /// Virtual address and port clients connect to.
    #[schema(value_type = String, example = "198.18.100.1:80")]
    pub vip: SocketAddr,
    /// Transport protocol.
    #[serde(default)]
    pub protocol: Protocol,
    /// l4 (XDP) or l7 (HTTP proxy).
    #[serde(default)]
    pub mode: Mode,
    /// Backend selection; default: the mode's ([`Mode::default_scheduler`]).
    #[serde(default = "Scheduler::placeholder")]
    pub scheduler: Scheduler,
    /// Health checking of the backends.
    #[serde(default)]
    pub health: HealthConfig,
    /// Backends, TOML key `backend`.
    // Left out when empty: a service as the API shows it carries `backends` (the live
    // view) instead of the config's `backend`.
    #[serde(default, rename = "backend", skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendConfig>,
    /// Sticky sessions (l7 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<StickyConfig>,
    /// Response cache (l7 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheConfig>,
    /// Seconds over which a backend that is added or comes back ramps up to its full
    /// weight (0: at once).
    #[serde(default)]
    pub slow_start_s: u64,
    /// What happens when every backend of every tier is down.
    #[serde(default)]
    pub on_all_down: AllDown,
    /// What the `hash` scheduler hashes (l7).
    #[serde(default)]
    #[schema(value_type = String, required = false, example = "header:x-user")]
    pub hash_on: HashOn,
    /// TLS on the VIP (l7 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// Timeouts, limits, retries and passive health of the HTTP proxy (l7).
    #[serde(default)]
    pub http: HttpConfig,
    /// Source prefixes dropped on their way to this service's VIP (after `[security]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(example = json!(["203.0.113.0/24"]))]
    pub deny: Vec<String>,
    /// When non-empty, the only sources that reach this service (after `[security]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(example = json!([]))]
    pub allow: Vec<String>,
    /// This service's limit on new flows per source (besides `[security]`'s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_flows_per_source: Option<FlowLimitConfig>,
    /// QUIC connection-ID routing (l4, udp): short-header packets go to the backend
    /// whose `quic_id` their connection ID carries.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub quic: bool,
    /// How the proxy speaks to the backends (l7): `http1` (default), `h2c` (HTTP/2
    /// over cleartext, prior knowledge), `h2` (HTTP/2 over TLS, ALPN `h2`) or `auto`
    /// (TLS, ALPN offers `h2` and `http/1.1`, the backend picks).
    #[serde(default, skip_serializing_if = "BackendProtocol::is_default")]
    pub backend_protocol: BackendProtocol,
    /// TLS towards the backends (l7): with it, `http1` is HTTP/1.1 over TLS; `h2` and
    /// `auto` use TLS with these settings' defaults when it is left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_tls: Option<BackendTlsConfig>,
}

/// A service's `backend_protocol` (l7): how requests reach its backends.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum BackendProtocol {
    /// HTTP/1.1 (over TLS when `backend_tls` is set).
    #[default]
    Http1,
    /// HTTP/2 over cleartext TCP, prior knowledge (RFC 9113 §3.3).
    H2c,
    /// HTTP/2 over TLS; the backend must select `h2` in ALPN.
    H2,
    /// TLS; ALPN offers `h2` and `http/1.1` and the backend's choice is used.
    Auto,
}

impl BackendProtocol {
    /// Whether this is the default (`http1`), left out when a service is written out.
    #[must_use]
    pub fn is_default(&self) -> bool {
        *self == Self::Http1
    }

    /// Whether this protocol always runs over TLS.
    #[must_use]
    pub const fn needs_tls(self) -> bool {
        matches!(self, Self::H2 | Self::Auto)
    }
}

/// A service's `backend_tls = { ca, server_name, verify }` (l7): TLS from the proxy to
/// its backends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct BackendTlsConfig {
    /// PEM file of the certificate authorities trusted for backend certificates;
    /// default: the system's bundle (`/etc/ssl/certs/ca-certificates.crt`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub ca: Option<PathBuf>,
    /// Name sent in SNI and checked against the backend's certificate (a DNS name or
    /// an IP address); default: each backend's IP address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// Check the backend's certificate (chain, validity, name). `false` accepts any
    /// certificate: the traffic is encrypted but not authenticated.
    pub verify: bool,
}

impl Default for BackendTlsConfig {
    fn default() -> Self {
        Self {
            ca: None,
            server_name: None,
            verify: true,
        }
    }
}

impl Mode {
    /// The scheduler a service of this mode gets when it names none.
    #[must_use]
    pub const fn default_scheduler(self) -> Scheduler {
        match self {
            Self::L4 => Scheduler::Maglev,
            Self::L7 => Scheduler::RoundRobin,
        }
    }
}

impl Scheduler {
    /// Stands in for an omitted scheduler until the mode's default replaces it.
    const fn placeholder() -> Self {
        Self::Maglev
    }

    /// Whether a service of `mode` may use this scheduler.
    #[must_use]
    pub const fn allowed_in(self, mode: Mode) -> bool {
        match self {
            Self::Maglev | Self::SourceIp => matches!(mode, Mode::L4),
            Self::RoundRobin | Self::LeastRequest | Self::P2c | Self::Hash => {
                matches!(mode, Mode::L7)
            }
        }
    }
}

/// The config spelling of the unit enums: `ALL`, `as_str` and `Display`.
macro_rules! named {
    ($ty:ty { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            /// Every value, in declaration order.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The spelling used in the config file and the API.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $name),+
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

named!(XdpMode { Auto => "auto", Native => "native", Skb => "skb", Off => "off" });
named!(Encap { Ipip => "ipip", Gue => "gue" });
named!(Protocol { Tcp => "tcp", Udp => "udp" });
named!(Mode { L4 => "l4", L7 => "l7" });
named!(Scheduler {
    Maglev => "maglev",
    SourceIp => "source-ip",
    RoundRobin => "round-robin",
    LeastRequest => "least-request",
    P2c => "p2c",
    Hash => "hash",
});
named!(HealthKind { None => "none", Tcp => "tcp", Http => "http" });
named!(AllDown { FailOpen => "fail-open", Drop => "drop" });
named!(BackendProtocol { Http1 => "http1", H2c => "h2c", H2 => "h2", Auto => "auto" });

// ---------------------------------------------------------------------------
// Defaults
// ---------------------------------------------------------------------------

const DEFAULT_API_LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9090));
const DEFAULT_STATE_DIR: &str = "/var/lib/lb-agent";
const DEFAULT_BPFFS: &str = "/sys/fs/bpf";
/// Default `dataplane.ring_size`.
pub(super) const DEFAULT_RING_SIZE: u32 = 65_537;
const DEFAULT_FLOW_TABLE_SIZE: u32 = 1_000_000;
const DEFAULT_MAX_SERVICES: u32 = 64;
const DEFAULT_MAX_BACKENDS: u32 = 4096;
const DEFAULT_MAX_FILTER_RULES: u32 = lb_common::maps::DEFAULT_MAX_FILTER_RULES;
const DEFAULT_HEALTH_PATH: &str = "/healthz";
const DEFAULT_EXPECT_STATUS: (u16, u16) = (200, 399);
const DEFAULT_INTERVAL_MS: u64 = 1000;
const DEFAULT_TIMEOUT_MS: u64 = 500;
const DEFAULT_RISE: u32 = 2;
const DEFAULT_FALL: u32 = 2;
const DEFAULT_WEIGHT: u32 = 100;
/// Default `cache.max_object_bytes`.
pub(super) const DEFAULT_MAX_OBJECT_BYTES: u64 = 8 * 1024 * 1024;

fn default_weight() -> u32 {
    DEFAULT_WEIGHT
}

// ---------------------------------------------------------------------------
// Serde plumbing
// ---------------------------------------------------------------------------

impl Serialize for ServiceConfig {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        // The inherent function derived with `remote = "Self"`.
        ServiceConfig::serialize(self, ser)
    }
}

impl<'de> Deserialize<'de> for ServiceConfig {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        /// The keys of a `[[service]]`, as the derive knows them.
        static FIELDS: LazyLock<&'static [&'static str]> =
            LazyLock::new(|| struct_fields(ServiceConfig::deserialize));

        struct ServiceVisitor;
        impl<'de> Visitor<'de> for ServiceVisitor {
            type Value = ServiceConfig;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table")
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ServiceConfig, A::Error> {
                let mut keys = Vec::new();
                let seen = KeysSeen {
                    map,
                    keys: &mut keys,
                };
                // The derived function, reading the same map.
                let mut svc = ServiceConfig::deserialize(MapAccessDeserializer::new(seen))?;
                if !keys.iter().any(|k| k == "scheduler") {
                    svc.scheduler = svc.mode.default_scheduler();
                }
                let vip_port = svc.vip.port();
                svc.backends = std::mem::take(&mut svc.backends)
                    .into_iter()
                    .map(|b| b.with_default_port(vip_port))
                    .collect();
                Ok(svc)
            }
        }

        de.deserialize_struct("ServiceConfig", &FIELDS, ServiceVisitor)
    }
}

/// A map that notes which keys it yields.
struct KeysSeen<'k, A> {
    map: A,
    keys: &'k mut Vec<String>,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for KeysSeen<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        let Some(key) = self.map.next_key::<String>()? else {
            return Ok(None);
        };
        self.keys.push(key.clone());
        let key: StringDeserializer<A::Error> = key.into_deserializer();
        seed.deserialize(key).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.map.next_value_seed(seed)
    }

    fn size_hint(&self) -> Option<usize> {
        self.map.size_hint()
    }
}

/// The field names a derived struct deserializer asks for, found by running it on a
/// deserializer that only answers with them.
fn struct_fields<T>(
    deserialize: impl FnOnce(FieldsProbe) -> Result<T, ProbeAnswer>,
) -> &'static [&'static str] {
    match deserialize(FieldsProbe) {
        Err(ProbeAnswer(fields)) => fields,
        Ok(_) => &[],
    }
}

struct FieldsProbe;

#[derive(Debug)]
struct ProbeAnswer(&'static [&'static str]);

impl fmt::Display for ProbeAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "fields {:?}", self.0)
    }
}

impl std::error::Error for ProbeAnswer {}

impl de::Error for ProbeAnswer {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Self(&[])
    }
}

impl<'de> Deserializer<'de> for FieldsProbe {
    type Error = ProbeAnswer;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, ProbeAnswer> {
        Err(ProbeAnswer(&[]))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, ProbeAnswer> {
        Err(ProbeAnswer(fields))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
        byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
        identifier ignored_any
    }
}

/// `port`: when given, 1 to 65535 (leaving it out takes the VIP's).
fn given_port<'de, D: Deserializer<'de>>(de: D) -> Result<u16, D::Error> {
    match u16::deserialize(de)? {
        0 => Err(de::Error::custom(
            "port 0 is not a port: give 1 to 65535, or leave port out to take the VIP's port",
        )),
        port => Ok(port),
    }
}

/// `expect_status = [low, high]`.
fn status_range<'de, D: Deserializer<'de>>(de: D) -> Result<(u16, u16), D::Error> {
    let codes = Vec::<u16>::deserialize(de)?;
    match codes[..] {
        [low, high] => Ok((low, high)),
        _ => Err(de::Error::invalid_length(
            codes.len(),
            &"two status codes [low, high]",
        )),
    }
}
