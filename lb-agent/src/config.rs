//! Agent configuration: the typed model of the TOML file (`[agent]`, `[dataplane]`,
//! `[[service]]`), its defaults, loading, and validation.
//!
//! [`Config::load`] and [`Config::parse`] read the document with spans kept
//! ([`toml::de::DeTable`]) and convert it to the model by a manual walk rather than
//! one serde pass, so that *every* mistake is reported at once: a syntax error, an
//! unknown key (with a "did you mean" hint), a wrong type, a value out of range, or
//! an inconsistency between keys. Each [`ConfigError`] carries the file, line,
//! column, key path (`service[0].backend[2].weight`) and the reason.
//!
//! The model also derives serde with the same field names as the TOML keys, so the
//! REST API accepts a service as JSON exactly like a `[[service]]` table (omitted
//! keys take the same defaults), and [`validate_service`] applies the same rules to
//! it, with key paths relative to the service and no line numbers.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

// ---------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------

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
    /// `[[service]]` tables, in file order.
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
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
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            interface: None,
            api_listen: DEFAULT_API_LISTEN,
            api_token_file: None,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            bpffs: PathBuf::from(DEFAULT_BPFFS),
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
        }
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
/// Standalone deserialization requires `port`; within a service it defaults to the
/// VIP's port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Backend address.
    #[schema(value_type = String, example = "198.18.2.11")]
    pub address: IpAddr,
    /// Backend port; in l4 mode it must equal the VIP's port.
    #[schema(required = false)]
    pub port: u16,
    /// Relative weight, 0 (drained) to 1 000 000.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Failover tier, 0 to 7: a tier serves only when all lower tiers have no healthy backend.
    #[serde(default)]
    pub tier: u8,
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(from = "ServiceSpec")]
pub struct ServiceConfig {
    /// Unique name: `[A-Za-z0-9_.-]`, 1 to 64 characters.
    pub name: String,
    /// Virtual address and port clients connect to.
    #[schema(value_type = String, example = "198.18.100.1:80")]
    pub vip: SocketAddr,
    /// Transport protocol.
    #[schema(required = false)]
    pub protocol: Protocol,
    /// l4 (XDP) or l7 (HTTP proxy).
    #[schema(required = false)]
    pub mode: Mode,
    /// Backend selection.
    #[schema(required = false)]
    pub scheduler: Scheduler,
    /// Health checking of the backends.
    #[schema(required = false)]
    pub health: HealthConfig,
    /// Backends, TOML key `backend`.
    #[serde(rename = "backend")]
    #[schema(required = false)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendConfig>,
    /// Sticky sessions (l7 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sticky: Option<StickyConfig>,
    /// Response cache (l7 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheConfig>,
    /// Seconds over which a backend that is added or comes back ramps up to its full
    /// weight (0: at once).
    #[schema(required = false)]
    pub slow_start_s: u64,
    /// What happens when every backend of every tier is down.
    #[schema(required = false)]
    pub on_all_down: AllDown,
    /// What the `hash` scheduler hashes (l7).
    #[schema(value_type = String, required = false, example = "header:x-user")]
    pub hash_on: HashOn,
    /// TLS on the VIP (l7 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// Timeouts, limits, retries and passive health of the HTTP proxy (l7).
    #[schema(required = false)]
    pub http: HttpConfig,
}

/// The accepted input form of a [`ServiceConfig`], with the defaults not yet applied.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceSpec {
    name: String,
    vip: SocketAddr,
    #[serde(default)]
    protocol: Protocol,
    #[serde(default)]
    mode: Mode,
    scheduler: Option<Scheduler>,
    #[serde(default)]
    health: HealthConfig,
    #[serde(default, rename = "backend")]
    backends: Vec<BackendSpec>,
    sticky: Option<StickyConfig>,
    cache: Option<CacheConfig>,
    #[serde(default)]
    slow_start_s: u64,
    #[serde(default)]
    on_all_down: AllDown,
    #[serde(default)]
    hash_on: HashOn,
    tls: Option<TlsConfig>,
    #[serde(default)]
    http: HttpConfig,
}

/// A backend within a [`ServiceSpec`]: `port` may be omitted.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendSpec {
    address: IpAddr,
    port: Option<u16>,
    #[serde(default = "default_weight")]
    weight: u32,
    #[serde(default)]
    tier: u8,
}

impl From<ServiceSpec> for ServiceConfig {
    fn from(spec: ServiceSpec) -> Self {
        let vip_port = spec.vip.port();
        Self {
            name: spec.name,
            vip: spec.vip,
            protocol: spec.protocol,
            mode: spec.mode,
            scheduler: spec.scheduler.unwrap_or(spec.mode.default_scheduler()),
            health: spec.health,
            backends: spec
                .backends
                .into_iter()
                .map(|b| BackendConfig {
                    address: b.address,
                    port: b.port.unwrap_or(vip_port),
                    weight: b.weight,
                    tier: b.tier,
                })
                .collect(),
            sticky: spec.sticky,
            cache: spec.cache,
            slow_start_s: spec.slow_start_s,
            on_all_down: spec.on_all_down,
            hash_on: spec.hash_on,
            tls: spec.tls,
            http: spec.http,
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
trait Named: Copy + 'static {
    const ALL: &'static [Self];
    fn name(self) -> &'static str;
}

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

        impl Named for $ty {
            const ALL: &'static [Self] = <$ty>::ALL;
            fn name(self) -> &'static str {
                self.as_str()
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

// ---------------------------------------------------------------------------
// Defaults and limits
// ---------------------------------------------------------------------------

const DEFAULT_API_LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9090));
const DEFAULT_STATE_DIR: &str = "/var/lib/lb-agent";
const DEFAULT_BPFFS: &str = "/sys/fs/bpf";
const DEFAULT_RING_SIZE: u32 = 65_537;
const DEFAULT_FLOW_TABLE_SIZE: u32 = 1_000_000;
const DEFAULT_MAX_SERVICES: u32 = 64;
const DEFAULT_MAX_BACKENDS: u32 = 4096;
const DEFAULT_HEALTH_PATH: &str = "/healthz";
const DEFAULT_EXPECT_STATUS: (u16, u16) = (200, 399);
const DEFAULT_INTERVAL_MS: u64 = 1000;
const DEFAULT_TIMEOUT_MS: u64 = 500;
const DEFAULT_RISE: u32 = 2;
const DEFAULT_FALL: u32 = 2;
const DEFAULT_WEIGHT: u32 = 100;
const DEFAULT_MAX_OBJECT_BYTES: u64 = 8 * 1024 * 1024;
/// Longest slow start accepted (one day).
const MAX_SLOW_START_S: u64 = 86_400;

const RING_SIZE_MIN: u32 = 13;
const RING_SIZE_MAX: u32 = 16_777_213;
const MAX_SERVICES_LIMIT: u32 = 4096;
const MAX_NAME_LEN: usize = 64;
/// Largest backend weight accepted.
pub const MAX_WEIGHT: u32 = 1_000_000;
const MAX_TIER: u8 = 7;
const MIN_INTERVAL_MS: u64 = 50;
const MAX_RISE_FALL: u32 = 100;
/// `IFNAMSIZ` - 1.
const MAX_IFNAME_LEN: usize = 15;

fn default_weight() -> u32 {
    DEFAULT_WEIGHT
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// One problem found in a configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// File (or other origin) the error is in; empty for a service given through the API.
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column (in characters), when known.
    pub column: Option<usize>,
    /// Key path such as `service[0].backend[2].weight`; empty for syntax errors.
    pub key: String,
    /// What is wrong, and where useful, what to do.
    pub message: String,
}

impl ConfigError {
    /// An error with neither file nor position: a key path and a reason.
    pub fn at_key(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            file: String::new(),
            line: None,
            column: None,
            key: key.into(),
            message: message.into(),
        }
    }
}

/// `FILE:LINE:COL: KEY: MESSAGE`, leaving out the parts that are unknown or empty.
impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut located = !self.file.is_empty();
        f.write_str(&self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
            located = true;
        }
        if located {
            f.write_str(": ")?;
        }
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in a configuration, in file order. Displays one line per error.
#[derive(Debug, thiserror::Error)]
#[error("{}", display_lines(.0))]
pub struct ConfigErrors(pub Vec<ConfigError>);

fn display_lines(errors: &[ConfigError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------

impl Config {
    /// Read and validate; errors name the file.
    ///
    /// # Errors
    ///
    /// The file cannot be read, or [`Config::parse`] rejects it.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let origin = path.display().to_string();
        let text = fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: origin.clone(),
                line: None,
                column: None,
                key: String::new(),
                message: format!("cannot read the configuration: {e}"),
            }])
        })?;
        Self::parse(&text, &origin)
    }

    /// Parse and validate text; `origin` is the name used in error messages.
    ///
    /// # Errors
    ///
    /// Every problem found: a TOML syntax error alone, or else all unknown keys,
    /// wrong types and rule violations, in file order.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigErrors> {
        let root = DeTable::parse(text).map_err(|e| {
            let (line, column) = e.span().map(|span| position(text, span.start)).unzip();
            ConfigErrors(vec![ConfigError {
                file: origin.to_owned(),
                line,
                column,
                key: String::new(),
                message: format!("TOML syntax error: {}", e.message().trim_end()),
            }])
        })?;

        let mut walker = Walker::new(text, origin);
        let (config, ids) = walker.document(&root);
        let mut errors = walker.errors;
        for mut error in validate_model(&config, &ids) {
            origin.clone_into(&mut error.file);
            if let Some(span) = find_span(&walker.spans, &error.key) {
                let (line, column) = position(text, span.start);
                error.line = Some(line);
                error.column = Some(column);
            }
            errors.push(error);
        }
        if errors.is_empty() {
            Ok(config)
        } else {
            errors.sort_by_key(|e| (e.line.is_none(), e.line, e.column));
            Err(ConfigErrors(errors))
        }
    }

    /// Validate a model built in code or changed after loading (for example by
    /// command-line overrides). The errors carry key paths but no file or position.
    #[must_use]
    pub fn validate(&self) -> Vec<ConfigError> {
        let ids: Vec<ServiceIds> = self
            .services
            .iter()
            .enumerate()
            .map(|(index, svc)| ServiceIds {
                index,
                backends: (0..svc.backends.len()).collect(),
            })
            .collect();
        validate_model(self, &ids)
    }
}

/// Where a model service (and each of its backends) came from in the file: entries
/// that failed to convert are left out of the model, so indices can differ.
struct ServiceIds {
    index: usize,
    backends: Vec<usize>,
}

// ---------------------------------------------------------------------------
// Validation of the model
// ---------------------------------------------------------------------------

/// Validate one service on its own (REST API) and against the others (name/VIP
/// clashes, capacities); key paths like `backend[2].weight`, line None.
///
/// `others` are the services it must coexist with: when replacing a service, leave
/// the one being replaced out.
#[must_use]
pub fn validate_service(
    svc: &ServiceConfig,
    others: &[ServiceConfig],
    dp: &DataplaneConfig,
) -> Vec<ConfigError> {
    let keys = Keys {
        prefix: String::new(),
        backends: None,
    };
    let mut errors = check_service(svc, others, dp, &keys);
    if (1..=MAX_SERVICES_LIMIT).contains(&dp.max_services)
        && others.len() >= dp.max_services as usize
    {
        errors.push(ConfigError::at_key(
            "name",
            format!(
                "{} services exist already, the most dataplane.max_services = {} allows",
                others.len(),
                dp.max_services
            ),
        ));
    }
    let others_backends: usize = others.iter().map(|o| o.backends.len()).sum();
    let total = others_backends + svc.backends.len();
    if dp.max_backends >= 1 && total > dp.max_backends as usize {
        errors.push(ConfigError::at_key(
            "backend",
            format!(
                "{} backends here and {others_backends} in other services make {total}, \
                 more than dataplane.max_backends = {}",
                svc.backends.len(),
                dp.max_backends
            ),
        ));
    }
    errors
}

/// Everything that can be checked on the model; `ids` maps model services to the
/// indices used in key paths.
fn validate_model(cfg: &Config, ids: &[ServiceIds]) -> Vec<ConfigError> {
    let mut errors = check_agent(&cfg.agent);
    errors.extend(check_dataplane(&cfg.dataplane));
    for (i, (svc, id)) in cfg.services.iter().zip(ids).enumerate() {
        let keys = Keys {
            prefix: format!("service[{}].", id.index),
            backends: Some(&id.backends),
        };
        errors.extend(check_service(
            svc,
            &cfg.services[..i],
            &cfg.dataplane,
            &keys,
        ));
    }
    errors.extend(check_capacity(cfg, ids));
    errors
}

/// Builds key paths for a service's errors: relative (API) or `service[N].` (file).
struct Keys<'a> {
    prefix: String,
    /// File index of each model backend; `None` when they are the same.
    backends: Option<&'a [usize]>,
}

impl Keys<'_> {
    fn field(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn backend_id(&self, i: usize) -> usize {
        self.backends.map_or(i, |ids| ids[i])
    }

    fn backend(&self, i: usize, field: &str) -> String {
        format!("{}backend[{}].{field}", self.prefix, self.backend_id(i))
    }
}

fn check_agent(agent: &AgentConfig) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    if let Some(interface) = &agent.interface {
        if let Some(why) = interface_name_problem(interface) {
            errors.push(ConfigError::at_key("agent.interface", why));
        }
    }
    let listen = agent.api_listen.ip().to_canonical();
    if !listen.is_loopback() && agent.api_token_file.is_none() {
        errors.push(ConfigError::at_key(
            "agent.api_listen",
            format!(
                "{} is not a loopback address: set agent.api_token_file so the API \
                 is not open to anyone who can reach it",
                agent.api_listen
            ),
        ));
    }
    if agent
        .api_token_file
        .as_ref()
        .is_some_and(|p| p.as_os_str().is_empty())
    {
        errors.push(ConfigError::at_key(
            "agent.api_token_file",
            "must not be empty",
        ));
    }
    for (key, path) in [
        ("agent.state_dir", &agent.state_dir),
        ("agent.bpffs", &agent.bpffs),
    ] {
        if path.as_os_str().is_empty() {
            errors.push(ConfigError::at_key(key, "must not be empty"));
        }
    }
    errors
}

fn check_dataplane(dp: &DataplaneConfig) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    let mut push = |key: &str, message: String| errors.push(ConfigError::at_key(key, message));
    if !(RING_SIZE_MIN..=RING_SIZE_MAX).contains(&dp.ring_size) {
        push(
            "dataplane.ring_size",
            format!(
                "{} is out of range: the Maglev table size must be a prime between \
                 {RING_SIZE_MIN} and {RING_SIZE_MAX} (default {DEFAULT_RING_SIZE})",
                dp.ring_size
            ),
        );
    } else if !is_prime(dp.ring_size) {
        let hint = next_prime(dp.ring_size)
            .filter(|p| *p <= RING_SIZE_MAX)
            .map(|p| format!(", for example {p}"))
            .unwrap_or_default();
        push(
            "dataplane.ring_size",
            format!(
                "{} is not a prime: the Maglev table size must be prime{hint}",
                dp.ring_size
            ),
        );
    }
    if dp.flow_table_size == 0 {
        push("dataplane.flow_table_size", "must be at least 1".to_owned());
    }
    if !(1..=MAX_SERVICES_LIMIT).contains(&dp.max_services) {
        push(
            "dataplane.max_services",
            format!(
                "{} is out of range: must be between 1 and {MAX_SERVICES_LIMIT}",
                dp.max_services
            ),
        );
    }
    if dp.max_backends == 0 {
        push("dataplane.max_backends", "must be at least 1".to_owned());
    }
    if let Some(ip) = dp.source_ipv4 {
        if let Some(kind) = non_unicast(IpAddr::V4(ip)) {
            push(
                "dataplane.source_ipv4",
                format!("{ip} is {kind} address; the tunnel source must be a unicast address"),
            );
        }
    }
    if let Some(ip) = dp.source_ipv6 {
        if let Some(kind) = non_unicast(IpAddr::V6(ip)) {
            push(
                "dataplane.source_ipv6",
                format!("{ip} is {kind} address; the tunnel source must be a unicast address"),
            );
        }
    }
    errors
}

/// Service and backend counts against the map capacities, reported once at the
/// first entry over the limit.
fn check_capacity(cfg: &Config, ids: &[ServiceIds]) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    let dp = &cfg.dataplane;
    let max_services = dp.max_services as usize;
    if (1..=MAX_SERVICES_LIMIT).contains(&dp.max_services) && cfg.services.len() > max_services {
        errors.push(ConfigError::at_key(
            format!("service[{}]", ids[max_services].index),
            format!(
                "{} services are configured, more than dataplane.max_services = {}",
                cfg.services.len(),
                dp.max_services
            ),
        ));
    }
    let total: usize = cfg.services.iter().map(|s| s.backends.len()).sum();
    let max_backends = dp.max_backends as usize;
    if max_backends >= 1 && total > max_backends {
        let mut seen = 0;
        for (svc, id) in cfg.services.iter().zip(ids) {
            if seen + svc.backends.len() > max_backends {
                errors.push(ConfigError::at_key(
                    format!(
                        "service[{}].backend[{}]",
                        id.index,
                        id.backends[max_backends - seen]
                    ),
                    format!(
                        "{total} backends are configured in all, more than \
                         dataplane.max_backends = {max_backends}; this is the first one over"
                    ),
                ));
                break;
            }
            seen += svc.backends.len();
        }
    }
    errors
}

/// Collects the errors of one service, with key paths from [`Keys`].
struct Report<'k, 'a> {
    keys: &'k Keys<'a>,
    errors: Vec<ConfigError>,
}

impl Report<'_, '_> {
    fn field(&mut self, name: &str, message: impl Into<String>) {
        let key = self.keys.field(name);
        self.errors.push(ConfigError::at_key(key, message));
    }

    fn backend(&mut self, i: usize, field: &str, message: impl Into<String>) {
        let key = self.keys.backend(i, field);
        self.errors.push(ConfigError::at_key(key, message));
    }
}

fn check_service(
    svc: &ServiceConfig,
    others: &[ServiceConfig],
    dp: &DataplaneConfig,
    keys: &Keys<'_>,
) -> Vec<ConfigError> {
    let mut report = Report {
        keys,
        errors: Vec::new(),
    };
    check_identity(svc, others, &mut report);
    check_mode(svc, dp, &mut report);
    check_backends(svc, &mut report);
    check_health(&svc.health, &mut report);
    check_l7_extras(svc, &mut report);
    report.errors
}

/// Name and VIP, alone and against the other services.
fn check_identity(svc: &ServiceConfig, others: &[ServiceConfig], report: &mut Report<'_, '_>) {
    if let Some(why) = service_name_problem(&svc.name) {
        report.field("name", why);
    } else if others.iter().any(|o| o.name == svc.name) {
        report.field(
            "name",
            format!(
                "service name \"{}\" is already used by another service",
                svc.name
            ),
        );
    }
    let vip = svc.vip;
    if vip.port() == 0 {
        report.field("vip", format!("{vip}: the VIP port must not be 0"));
    }
    if let Some(kind) = non_unicast(vip.ip()) {
        report.field(
            "vip",
            format!(
                "{} is {kind} address; a VIP must be a unicast address",
                vip.ip()
            ),
        );
    }
    let clash = others.iter().find(|o| {
        o.vip.ip() == vip.ip() && o.vip.port() == vip.port() && o.protocol == svc.protocol
    });
    if let Some(other) = clash {
        report.field(
            "vip",
            format!(
                "VIP {vip}/{} is already used by service \"{}\"",
                svc.protocol, other.name
            ),
        );
    }
}

/// What the mode allows: scheduler, address family, protocol, l7-only features, and
/// the dataplane settings an l4 service relies on.
fn check_mode(svc: &ServiceConfig, dp: &DataplaneConfig, report: &mut Report<'_, '_>) {
    if !svc.scheduler.allowed_in(svc.mode) {
        let allowed: Vec<&str> = Scheduler::ALL
            .iter()
            .filter(|s| s.allowed_in(svc.mode))
            .map(|s| s.as_str())
            .collect();
        report.field(
            "scheduler",
            format!(
                "scheduler \"{}\" is not available with mode = \"{}\"; use one of: {}",
                svc.scheduler,
                svc.mode,
                allowed.join(", ")
            ),
        );
    }
    match svc.mode {
        Mode::L4 => {
            if svc.vip.is_ipv6() {
                report.field("vip", "IPv6 L4 services are not supported yet");
            }
            if svc.sticky.is_some() {
                report.field("sticky", "sticky sessions are only for mode = \"l7\"");
            }
            if svc.cache.is_some() {
                report.field("cache", "caching is only for mode = \"l7\"");
            }
            if svc.tls.is_some() {
                report.field("tls", "TLS termination is only for mode = \"l7\"");
            }
            if svc.http != HttpConfig::default() {
                report.field("http", "http settings are only for mode = \"l7\"");
            }
            if svc.vip.is_ipv4() && dp.xdp_mode != XdpMode::Off && dp.source_ipv4.is_none() {
                report.field(
                    "vip",
                    "an l4 IPv4 service needs dataplane.source_ipv4 (the outer source address \
                     of tunnelled packets) unless dataplane.xdp_mode = \"off\"",
                );
            }
        }
        Mode::L7 => {
            if svc.protocol != Protocol::Tcp {
                report.field(
                    "protocol",
                    format!(
                        "protocol \"{}\" cannot be used with mode = \"l7\": the HTTP proxy \
                         needs protocol = \"tcp\"",
                        svc.protocol
                    ),
                );
            }
        }
    }
}

fn check_backends(svc: &ServiceConfig, report: &mut Report<'_, '_>) {
    let vip_port = svc.vip.port();
    let mut seen: HashMap<(IpAddr, u16), usize> = HashMap::new();
    for (i, b) in svc.backends.iter().enumerate() {
        if let Some(kind) = non_unicast(b.address) {
            report.backend(
                i,
                "address",
                format!(
                    "{} is {kind} address; a backend needs a unicast address",
                    b.address
                ),
            );
        }
        if let Some(&first) = seen.get(&(b.address, b.port)) {
            let first = report.keys.backend_id(first);
            report.backend(
                i,
                "address",
                format!(
                    "duplicate backend {}: already listed as backend[{first}]",
                    SocketAddr::new(b.address, b.port)
                ),
            );
        } else {
            seen.insert((b.address, b.port), i);
        }
        if b.weight > MAX_WEIGHT {
            report.backend(
                i,
                "weight",
                format!(
                    "{} is out of range: must be between 0 (drain) and {MAX_WEIGHT}",
                    b.weight
                ),
            );
        }
        if b.tier > MAX_TIER {
            report.backend(
                i,
                "tier",
                format!(
                    "{} is out of range: must be between 0 and {MAX_TIER}",
                    b.tier
                ),
            );
        }
        if svc.mode == Mode::L4 {
            if b.port != vip_port {
                report.backend(
                    i,
                    "port",
                    format!(
                        "port {} differs from the VIP port {vip_port}: l4 mode (DSR over IPIP) \
                         does not rewrite ports, so a backend must listen on the VIP port (or \
                         use mode = \"l7\")",
                        b.port
                    ),
                );
            }
            if b.address.is_ipv6() {
                report.backend(
                    i,
                    "address",
                    "IPv6 L4 services are not supported yet: an l4 backend must be IPv4",
                );
            }
        }
    }
}

fn check_health(h: &HealthConfig, report: &mut Report<'_, '_>) {
    if h.interval_ms < MIN_INTERVAL_MS {
        report.field(
            "health.interval_ms",
            format!(
                "{} is too small: must be at least {MIN_INTERVAL_MS}",
                h.interval_ms
            ),
        );
    }
    if h.timeout_ms == 0 {
        report.field("health.timeout_ms", "must be at least 1");
    } else if h.timeout_ms > h.interval_ms {
        report.field(
            "health.timeout_ms",
            format!(
                "{} is longer than health.interval_ms = {}: the timeout must not exceed the \
                 interval",
                h.timeout_ms, h.interval_ms
            ),
        );
    }
    for (key, value) in [("health.rise", h.rise), ("health.fall", h.fall)] {
        if !(1..=MAX_RISE_FALL).contains(&value) {
            report.field(
                key,
                format!("{value} is out of range: must be between 1 and {MAX_RISE_FALL}"),
            );
        }
    }
    if !h.path.starts_with('/') {
        report.field("health.path", format!("\"{}\" must start with '/'", h.path));
    }
    if h.host
        .as_deref()
        .is_some_and(|host| host.is_empty() || host.contains(char::is_whitespace))
    {
        report.field(
            "health.host",
            "must be a non-empty host name without spaces",
        );
    }
    let (lo, hi) = h.expect_status;
    if !(100..=599).contains(&lo) || !(100..=599).contains(&hi) {
        report.field(
            "health.expect_status",
            format!("[{lo}, {hi}]: HTTP status codes must be between 100 and 599"),
        );
    } else if lo > hi {
        report.field(
            "health.expect_status",
            format!("[{lo}, {hi}]: the first code must not be greater than the second"),
        );
    }
}

/// The values of `sticky` and `cache` (their presence in l4 mode is [`check_mode`]'s).
fn check_l7_extras(svc: &ServiceConfig, report: &mut Report<'_, '_>) {
    if let Some(sticky) = &svc.sticky {
        if !is_cookie_name(&sticky.cookie) {
            report.field(
                "sticky.cookie",
                format!(
                    "\"{}\" is not a valid cookie name (RFC 6265 token: printable ASCII \
                     without spaces or ()<>@,;:\\\"/[]?={{}})",
                    sticky.cookie
                ),
            );
        }
        if sticky.ttl_s == 0 {
            report.field("sticky.ttl_s", "must be at least 1");
        }
    }
    if let Some(cache) = &svc.cache {
        if cache.max_bytes == 0 {
            report.field("cache.max_bytes", "must be at least 1");
        }
        if cache.max_object_bytes == 0 {
            report.field("cache.max_object_bytes", "must be at least 1");
        }
    }
    if let Some(tls) = &svc.tls {
        for (key, path) in [("tls.cert", &tls.cert), ("tls.key", &tls.key)] {
            if let Err(e) = fs::metadata(path) {
                report.field(key, format!("cannot read {}: {e}", path.display()));
            }
        }
    }
    let h = &svc.http;
    for (key, v) in [
        ("http.connect_timeout_ms", h.connect_timeout_ms),
        ("http.header_timeout_ms", h.header_timeout_ms),
        ("http.idle_timeout_ms", h.idle_timeout_ms),
        ("http.response_timeout_ms", h.response_timeout_ms),
        ("http.eject_base_ms", h.eject_base_ms),
    ] {
        if v == 0 {
            report.field(key, "must be at least 1");
        }
    }
    if h.max_header_bytes < 1024 {
        report.field(
            "http.max_header_bytes",
            format!("must be at least 1024, found {}", h.max_header_bytes),
        );
    }
    if h.max_headers == 0 {
        report.field("http.max_headers", "must be at least 1");
    }
    if h.retries > 10 {
        report.field(
            "http.retries",
            format!("must be at most 10, found {}", h.retries),
        );
    }
    if h.eject_max_ms < h.eject_base_ms {
        report.field(
            "http.eject_max_ms",
            format!(
                "must be at least http.eject_base_ms ({}), found {}",
                h.eject_base_ms, h.eject_max_ms
            ),
        );
    }
    if svc.hash_on != HashOn::Client && svc.scheduler != Scheduler::Hash {
        report.field(
            "hash_on",
            format!(
                "hash_on is used only by scheduler = \"hash\" (this service uses \"{}\")",
                svc.scheduler
            ),
        );
    }
    if svc.slow_start_s > MAX_SLOW_START_S {
        report.field(
            "slow_start_s",
            format!(
                "must be at most {MAX_SLOW_START_S} (one day), found {}",
                svc.slow_start_s
            ),
        );
    }
}

fn service_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        Some("a service name must not be empty".to_owned())
    } else if name.chars().count() > MAX_NAME_LEN {
        Some(format!(
            "service name is {} characters long, the most allowed is {MAX_NAME_LEN}",
            name.chars().count()
        ))
    } else if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        Some(format!(
            "service name \"{name}\" may only contain letters, digits, '_', '.' and '-'"
        ))
    } else {
        None
    }
}

/// Linux accepts an interface name of 1 to 15 bytes without '/', ':' or white space.
fn interface_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        Some("must not be empty (leave it out to take --iface)".to_owned())
    } else if name.len() > MAX_IFNAME_LEN {
        Some(format!(
            "\"{name}\" is longer than {MAX_IFNAME_LEN} bytes, the limit for interface names"
        ))
    } else if name == "."
        || name == ".."
        || name.contains(['/', ':'])
        || name.contains(char::is_whitespace)
    {
        Some(format!("\"{name}\" is not a valid interface name"))
    } else {
        None
    }
}

/// `Some("a multicast")` and the like when `ip` cannot be a unicast endpoint.
fn non_unicast(ip: IpAddr) -> Option<&'static str> {
    if ip.is_unspecified() {
        Some("the unspecified")
    } else if ip.is_multicast() {
        Some("a multicast")
    } else if matches!(ip, IpAddr::V4(v4) if v4.is_broadcast()) {
        Some("the broadcast")
    } else {
        None
    }
}

/// RFC 6265 `cookie-name` = RFC 2616 `token`: one or more printable ASCII characters
/// other than separators.
/// An RFC 9110 token character (header field names).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_cookie_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
}

fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) {
        return false;
    }
    let n = u64::from(n);
    let mut d = 3u64;
    while d * d <= n {
        if n % d == 0 {
            return false;
        }
        d += 2;
    }
    true
}

fn next_prime(n: u32) -> Option<u32> {
    (n..=u32::MAX).find(|&c| is_prime(c))
}

// ---------------------------------------------------------------------------
// The walk from the spanned TOML document to the model
// ---------------------------------------------------------------------------

type Span = Range<usize>;
type Value<'i> = Spanned<DeValue<'i>>;

const TOP_KEYS: &[&str] = &["agent", "dataplane", "service"];
const AGENT_KEYS: &[&str] = &[
    "interface",
    "api_listen",
    "api_token_file",
    "state_dir",
    "bpffs",
];
const DATAPLANE_KEYS: &[&str] = &[
    "xdp_mode",
    "encap",
    "source_ipv4",
    "source_ipv6",
    "ring_size",
    "flow_table_size",
    "max_services",
    "max_backends",
];
const SERVICE_KEYS: &[&str] = &[
    "name",
    "vip",
    "protocol",
    "mode",
    "scheduler",
    "health",
    "backend",
    "sticky",
    "cache",
    "slow_start_s",
    "on_all_down",
    "hash_on",
    "tls",
    "http",
];
const HEALTH_KEYS: &[&str] = &[
    "kind",
    "path",
    "host",
    "expect_status",
    "interval_ms",
    "timeout_ms",
    "rise",
    "fall",
];
const BACKEND_KEYS: &[&str] = &["address", "port", "weight", "tier"];
const STICKY_KEYS: &[&str] = &["cookie", "ttl_s"];
const CACHE_KEYS: &[&str] = &["max_bytes", "max_object_bytes"];
const TLS_KEYS: &[&str] = &["cert", "key"];
const HTTP_KEYS: &[&str] = &[
    "connect_timeout_ms",
    "header_timeout_ms",
    "idle_timeout_ms",
    "response_timeout_ms",
    "max_header_bytes",
    "max_headers",
    "max_body_bytes",
    "retries",
    "eject_after",
    "eject_base_ms",
    "eject_max_ms",
];

const VIP_FORMAT: &str = "an address:port such as \"198.18.100.1:80\" or \"[fd00:18::1]:80\"";

/// Converts the spanned document to the model, collecting every error on the way.
struct Walker<'s> {
    text: &'s str,
    origin: &'s str,
    errors: Vec<ConfigError>,
    /// Span of every key path met (the key, or an array element's table), to place
    /// the errors found later on the model.
    spans: HashMap<String, Span>,
}

/// A table being read: its entries, where it is, and its key path.
struct Fields<'v, 'i> {
    table: &'v DeTable<'i>,
    span: Span,
    path: String,
}

impl<'v, 'i> Fields<'v, 'i> {
    fn get(&self, key: &str) -> Option<(String, &'v Value<'i>)> {
        self.table.get(key).map(|v| (join(&self.path, key), v))
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// Unsigned integer types a config value may convert to.
trait Unsigned: TryFrom<i128> {
    const MAX: u64;
}

macro_rules! unsigned {
    ($($t:ty),+) => { $(impl Unsigned for $t { const MAX: u64 = <$t>::MAX as u64; })+ };
}
unsigned!(u8, u16, u32, u64);

impl<'s> Walker<'s> {
    fn new(text: &'s str, origin: &'s str) -> Self {
        Self {
            text,
            origin,
            errors: Vec::new(),
            spans: HashMap::new(),
        }
    }

    fn error(&mut self, span: &Span, key: &str, message: String) {
        let (line, column) = position(self.text, span.start);
        self.errors.push(ConfigError {
            file: self.origin.to_owned(),
            line: Some(line),
            column: Some(column),
            key: key.to_owned(),
            message,
        });
    }

    fn wrong_type(&mut self, path: &str, value: &Value<'_>, expected: &str) {
        let found = value.get_ref().type_str();
        let article = if found.starts_with(['a', 'e', 'i', 'o', 'u']) {
            "an"
        } else {
            "a"
        };
        self.error(
            &value.span(),
            path,
            format!("expected {expected}, found {article} {found}"),
        );
    }

    /// Start reading a table: records the span of each key and reports unknown keys.
    fn fields<'v, 'i>(
        &mut self,
        table: &'v DeTable<'i>,
        span: Span,
        path: &str,
        known: &[&str],
    ) -> Fields<'v, 'i> {
        for key in table.keys() {
            let name: &str = key.get_ref();
            let key_path = join(path, name);
            self.spans.insert(key_path.clone(), key.span());
            if !known.contains(&name) {
                let message = match suggest(name, known.iter().copied()) {
                    Some(near) => format!("unknown key `{name}`; did you mean `{near}`?"),
                    None => format!(
                        "unknown key `{name}`; expected one of: {}",
                        known.join(", ")
                    ),
                };
                self.error(&key.span(), &key_path, message);
            }
        }
        Fields {
            table,
            span,
            path: path.to_owned(),
        }
    }

    fn table<'v, 'i>(
        &mut self,
        path: &str,
        value: &'v Value<'i>,
        known: &[&str],
    ) -> Option<Fields<'v, 'i>> {
        if let DeValue::Table(table) = value.get_ref() {
            Some(self.fields(table, value.span(), path, known))
        } else {
            self.wrong_type(path, value, "a table");
            None
        }
    }

    /// The elements of an array, each with its key path `path[i]` (span recorded).
    fn array<'v, 'i>(
        &mut self,
        path: &str,
        value: &'v Value<'i>,
    ) -> Option<Vec<(String, &'v Value<'i>)>> {
        let DeValue::Array(array) = value.get_ref() else {
            self.wrong_type(path, value, "an array");
            return None;
        };
        Some(
            array
                .iter()
                .enumerate()
                .map(|(i, element)| {
                    let element_path = format!("{path}[{i}]");
                    self.spans.insert(element_path.clone(), element.span());
                    (element_path, element)
                })
                .collect(),
        )
    }

    /// Read `key` of `t` with `read` when present.
    fn optional<'v, 'i, T>(
        &mut self,
        t: &Fields<'v, 'i>,
        key: &str,
        read: impl FnOnce(&mut Self, &str, &'v Value<'i>) -> Option<T>,
    ) -> Option<T> {
        let (path, value) = t.get(key)?;
        read(self, &path, value)
    }

    /// Read `key` of `t` with `read`, reporting its absence.
    fn required<'v, 'i, T>(
        &mut self,
        t: &Fields<'v, 'i>,
        key: &str,
        read: impl FnOnce(&mut Self, &str, &'v Value<'i>) -> Option<T>,
    ) -> Option<T> {
        if t.table.get(key).is_none() {
            self.error(
                &t.span,
                &join(&t.path, key),
                "required key is missing".to_owned(),
            );
            return None;
        }
        self.optional(t, key, read)
    }

    fn str<'v>(&mut self, path: &str, value: &'v Value<'_>) -> Option<&'v str> {
        let s = value.get_ref().as_str();
        if s.is_none() {
            self.wrong_type(path, value, "a string");
        }
        s
    }

    fn string(&mut self, path: &str, value: &Value<'_>) -> Option<String> {
        self.str(path, value).map(str::to_owned)
    }

    fn path_buf(&mut self, path: &str, value: &Value<'_>) -> Option<PathBuf> {
        self.str(path, value).map(PathBuf::from)
    }

    /// A string parsed with `FromStr`; `what` describes the expected form.
    fn parsed<T: std::str::FromStr>(
        &mut self,
        path: &str,
        value: &Value<'_>,
        what: &str,
    ) -> Option<T> {
        let s = self.str(path, value)?;
        let parsed = s.parse().ok();
        if parsed.is_none() {
            self.error(
                &value.span(),
                path,
                format!("expected {what}, found \"{s}\""),
            );
        }
        parsed
    }

    fn ip(&mut self, path: &str, value: &Value<'_>) -> Option<IpAddr> {
        self.parsed(path, value, "an IP address")
    }

    fn ipv4(&mut self, path: &str, value: &Value<'_>) -> Option<Ipv4Addr> {
        self.parsed(path, value, "an IPv4 address")
    }

    fn ipv6(&mut self, path: &str, value: &Value<'_>) -> Option<Ipv6Addr> {
        self.parsed(path, value, "an IPv6 address")
    }

    fn socket_addr(&mut self, path: &str, value: &Value<'_>) -> Option<SocketAddr> {
        self.parsed(path, value, VIP_FORMAT)
    }

    fn uint<T: Unsigned>(&mut self, path: &str, value: &Value<'_>) -> Option<T> {
        let DeValue::Integer(int) = value.get_ref() else {
            self.wrong_type(path, value, "an integer");
            return None;
        };
        let n = i128::from_str_radix(int.as_str(), int.radix());
        if let Some(v) = n.as_ref().ok().and_then(|n| T::try_from(*n).ok()) {
            return Some(v);
        }
        let found = n.map_or_else(|_| int.to_string(), |n| n.to_string());
        self.error(
            &value.span(),
            path,
            format!(
                "expected an integer between 0 and {}, found {found}",
                T::MAX
            ),
        );
        None
    }

    fn choice<T: Named>(&mut self, path: &str, value: &Value<'_>) -> Option<T> {
        let s = self.str(path, value)?;
        let found = T::ALL.iter().copied().find(|v| v.name() == s);
        if found.is_none() {
            let names = T::ALL.iter().map(|v| v.name());
            let mut message = format!(
                "unknown value \"{s}\", expected one of: {}",
                names.clone().collect::<Vec<_>>().join(", ")
            );
            if let Some(near) = suggest(s, names) {
                message = format!("{message}; did you mean \"{near}\"?");
            }
            self.error(&value.span(), path, message);
        }
        found
    }

    /// `[low, high]`.
    fn status_range(&mut self, path: &str, value: &Value<'_>) -> Option<(u16, u16)> {
        let items = self.array(path, value)?;
        if items.len() != 2 {
            self.error(
                &value.span(),
                path,
                format!(
                    "expected two status codes [low, high], found {} values",
                    items.len()
                ),
            );
            return None;
        }
        let lo = self.uint(&items[0].0, items[0].1);
        let hi = self.uint(&items[1].0, items[1].1);
        Some((lo?, hi?))
    }

    fn document(&mut self, root: &Spanned<DeTable<'_>>) -> (Config, Vec<ServiceIds>) {
        let top = self.fields(root.get_ref(), root.span(), "", TOP_KEYS);
        let agent = self
            .optional(&top, "agent", Self::agent)
            .unwrap_or_default();
        let dataplane = self
            .optional(&top, "dataplane", Self::dataplane)
            .unwrap_or_default();
        let (services, ids) = self
            .optional(&top, "service", Self::services)
            .unwrap_or_default();
        (
            Config {
                agent,
                dataplane,
                services,
            },
            ids,
        )
    }

    fn agent(&mut self, path: &str, value: &Value<'_>) -> Option<AgentConfig> {
        let t = self.table(path, value, AGENT_KEYS)?;
        let d = AgentConfig::default();
        Some(AgentConfig {
            interface: self.optional(&t, "interface", Self::string),
            api_listen: self
                .optional(&t, "api_listen", |w, p, v| {
                    w.parsed(p, v, "an address:port such as \"127.0.0.1:9090\"")
                })
                .unwrap_or(d.api_listen),
            api_token_file: self.optional(&t, "api_token_file", Self::path_buf),
            state_dir: self
                .optional(&t, "state_dir", Self::path_buf)
                .unwrap_or(d.state_dir),
            bpffs: self
                .optional(&t, "bpffs", Self::path_buf)
                .unwrap_or(d.bpffs),
        })
    }

    fn dataplane(&mut self, path: &str, value: &Value<'_>) -> Option<DataplaneConfig> {
        let t = self.table(path, value, DATAPLANE_KEYS)?;
        let d = DataplaneConfig::default();
        Some(DataplaneConfig {
            xdp_mode: self
                .optional(&t, "xdp_mode", Self::choice)
                .unwrap_or(d.xdp_mode),
            encap: self.optional(&t, "encap", Self::choice).unwrap_or(d.encap),
            source_ipv4: self.optional(&t, "source_ipv4", Self::ipv4),
            source_ipv6: self.optional(&t, "source_ipv6", Self::ipv6),
            ring_size: self
                .optional(&t, "ring_size", Self::uint)
                .unwrap_or(d.ring_size),
            flow_table_size: self
                .optional(&t, "flow_table_size", Self::uint)
                .unwrap_or(d.flow_table_size),
            max_services: self
                .optional(&t, "max_services", Self::uint)
                .unwrap_or(d.max_services),
            max_backends: self
                .optional(&t, "max_backends", Self::uint)
                .unwrap_or(d.max_backends),
        })
    }

    fn services(
        &mut self,
        path: &str,
        value: &Value<'_>,
    ) -> Option<(Vec<ServiceConfig>, Vec<ServiceIds>)> {
        let items = self.array(path, value)?;
        let mut services = Vec::new();
        let mut ids = Vec::new();
        for (index, (item_path, item)) in items.into_iter().enumerate() {
            if let Some((svc, backends)) = self.service(&item_path, item) {
                services.push(svc);
                ids.push(ServiceIds { index, backends });
            }
        }
        Some((services, ids))
    }

    /// A service, or `None` when its name, VIP, protocol, mode or scheduler is
    /// missing or unreadable (the rules on the model depend on them). Backends that
    /// fail to convert are left out; the returned indices say which remain.
    fn service(&mut self, path: &str, value: &Value<'_>) -> Option<(ServiceConfig, Vec<usize>)> {
        let t = self.table(path, value, SERVICE_KEYS)?;
        let before = self.errors.len();
        let name = self.required(&t, "name", Self::string);
        let vip = self.required(&t, "vip", Self::socket_addr);
        let protocol = self
            .optional(&t, "protocol", Self::choice)
            .unwrap_or_default();
        let mode: Mode = self.optional(&t, "mode", Self::choice).unwrap_or_default();
        let scheduler = self
            .optional(&t, "scheduler", Self::choice)
            .unwrap_or(mode.default_scheduler());
        let identity_ok = self.errors.len() == before;

        let health = self
            .optional(&t, "health", Self::health)
            .unwrap_or_default();
        let vip_port = vip.map_or(0, |v| v.port());
        let (backends, backend_ids) = self
            .optional(&t, "backend", |w, p, v| w.backends(p, v, vip_port))
            .unwrap_or_default();
        let sticky = self.optional(&t, "sticky", Self::sticky);
        let cache = self.optional(&t, "cache", Self::cache);
        let slow_start_s = self.optional(&t, "slow_start_s", Self::uint).unwrap_or(0);
        let on_all_down = self
            .optional(&t, "on_all_down", Self::choice)
            .unwrap_or_default();
        let hash_on = self
            .optional(&t, "hash_on", Self::hash_on)
            .unwrap_or_default();
        let tls = self.optional(&t, "tls", Self::tls);
        let http = self.optional(&t, "http", Self::http).unwrap_or_default();

        let (Some(name), Some(vip), true) = (name, vip, identity_ok) else {
            return None;
        };
        Some((
            ServiceConfig {
                name,
                vip,
                protocol,
                mode,
                scheduler,
                health,
                backends,
                sticky,
                cache,
                slow_start_s,
                on_all_down,
                hash_on,
                tls,
                http,
            },
            backend_ids,
        ))
    }

    fn health(&mut self, path: &str, value: &Value<'_>) -> Option<HealthConfig> {
        let t = self.table(path, value, HEALTH_KEYS)?;
        let d = HealthConfig::default();
        Some(HealthConfig {
            kind: self.optional(&t, "kind", Self::choice).unwrap_or(d.kind),
            path: self.optional(&t, "path", Self::string).unwrap_or(d.path),
            host: self.optional(&t, "host", Self::string),
            expect_status: self
                .optional(&t, "expect_status", Self::status_range)
                .unwrap_or(d.expect_status),
            interval_ms: self
                .optional(&t, "interval_ms", Self::uint)
                .unwrap_or(d.interval_ms),
            timeout_ms: self
                .optional(&t, "timeout_ms", Self::uint)
                .unwrap_or(d.timeout_ms),
            rise: self.optional(&t, "rise", Self::uint).unwrap_or(d.rise),
            fall: self.optional(&t, "fall", Self::uint).unwrap_or(d.fall),
        })
    }

    fn backends(
        &mut self,
        path: &str,
        value: &Value<'_>,
        vip_port: u16,
    ) -> Option<(Vec<BackendConfig>, Vec<usize>)> {
        let items = self.array(path, value)?;
        let mut backends = Vec::new();
        let mut ids = Vec::new();
        for (index, (item_path, item)) in items.into_iter().enumerate() {
            let before = self.errors.len();
            let backend = self.backend(&item_path, item, vip_port);
            if let (Some(backend), true) = (backend, self.errors.len() == before) {
                backends.push(backend);
                ids.push(index);
            }
        }
        Some((backends, ids))
    }

    fn backend(&mut self, path: &str, value: &Value<'_>, vip_port: u16) -> Option<BackendConfig> {
        let t = self.table(path, value, BACKEND_KEYS)?;
        let address = self.required(&t, "address", Self::ip);
        let port = self.optional(&t, "port", Self::uint).unwrap_or(vip_port);
        let weight = self
            .optional(&t, "weight", Self::uint)
            .unwrap_or(DEFAULT_WEIGHT);
        let tier = self.optional(&t, "tier", Self::uint).unwrap_or(0);
        Some(BackendConfig {
            address: address?,
            port,
            weight,
            tier,
        })
    }

    fn sticky(&mut self, path: &str, value: &Value<'_>) -> Option<StickyConfig> {
        let t = self.table(path, value, STICKY_KEYS)?;
        let cookie = self.required(&t, "cookie", Self::string);
        let ttl_s = self.required(&t, "ttl_s", Self::uint);
        Some(StickyConfig {
            cookie: cookie?,
            ttl_s: ttl_s?,
        })
    }

    fn cache(&mut self, path: &str, value: &Value<'_>) -> Option<CacheConfig> {
        let t = self.table(path, value, CACHE_KEYS)?;
        let max_bytes = self.required(&t, "max_bytes", Self::uint);
        let max_object_bytes = self
            .optional(&t, "max_object_bytes", Self::uint)
            .unwrap_or(DEFAULT_MAX_OBJECT_BYTES);
        Some(CacheConfig {
            max_bytes: max_bytes?,
            max_object_bytes,
        })
    }

    fn hash_on(&mut self, path: &str, value: &Value<'_>) -> Option<HashOn> {
        let s = self.str(path, value)?;
        match s.parse() {
            Ok(h) => Some(h),
            Err(message) => {
                self.error(&value.span(), path, message);
                None
            }
        }
    }

    fn tls(&mut self, path: &str, value: &Value<'_>) -> Option<TlsConfig> {
        let t = self.table(path, value, TLS_KEYS)?;
        let cert = self.required(&t, "cert", Self::path_buf);
        let key = self.required(&t, "key", Self::path_buf);
        Some(TlsConfig {
            cert: cert?,
            key: key?,
        })
    }

    fn http(&mut self, path: &str, value: &Value<'_>) -> Option<HttpConfig> {
        let t = self.table(path, value, HTTP_KEYS)?;
        let d = HttpConfig::default();
        Some(HttpConfig {
            connect_timeout_ms: self
                .optional(&t, "connect_timeout_ms", Self::uint)
                .unwrap_or(d.connect_timeout_ms),
            header_timeout_ms: self
                .optional(&t, "header_timeout_ms", Self::uint)
                .unwrap_or(d.header_timeout_ms),
            idle_timeout_ms: self
                .optional(&t, "idle_timeout_ms", Self::uint)
                .unwrap_or(d.idle_timeout_ms),
            response_timeout_ms: self
                .optional(&t, "response_timeout_ms", Self::uint)
                .unwrap_or(d.response_timeout_ms),
            max_header_bytes: self
                .optional(&t, "max_header_bytes", Self::uint)
                .unwrap_or(d.max_header_bytes),
            max_headers: self
                .optional(&t, "max_headers", Self::uint)
                .unwrap_or(d.max_headers),
            max_body_bytes: self
                .optional(&t, "max_body_bytes", Self::uint)
                .unwrap_or(d.max_body_bytes),
            retries: self
                .optional(&t, "retries", Self::uint)
                .unwrap_or(d.retries),
            eject_after: self
                .optional(&t, "eject_after", Self::uint)
                .unwrap_or(d.eject_after),
            eject_base_ms: self
                .optional(&t, "eject_base_ms", Self::uint)
                .unwrap_or(d.eject_base_ms),
            eject_max_ms: self
                .optional(&t, "eject_max_ms", Self::uint)
                .unwrap_or(d.eject_max_ms),
        })
    }
}

/// The closest of `candidates` to `word`, if close enough to be a likely typo.
fn suggest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(1);
    candidates
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Edit distance counting an insertion, deletion, substitution or swap of two
/// neighbours as one (optimal string alignment), with `-` and `_` taken as equal.
fn edit_distance(a: &str, b: &str) -> usize {
    let norm = |c: char| {
        if c == '-' {
            '_'
        } else {
            c.to_ascii_lowercase()
        }
    };
    let a: Vec<char> = a.chars().map(norm).collect();
    let b: Vec<char> = b.chars().map(norm).collect();
    // d[i][j]: distance between the first i characters of a and the first j of b.
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

/// The recorded span of `key`, or of its nearest recorded ancestor (a value left
/// to its default points at the table that omits it).
fn find_span<'a>(spans: &'a HashMap<String, Span>, mut key: &str) -> Option<&'a Span> {
    loop {
        if let Some(span) = spans.get(key) {
            return Some(span);
        }
        key = &key[..key.rfind(['.', '['])?];
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    (line, before[line_start..].chars().count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of DESIGN.md, verbatim.
    const DESIGN_EXAMPLE: &str = r#"[agent]
interface = "eth0"
api_listen = "127.0.0.1:9090"      # a non-loopback address requires api_token_file
api_token_file = "/etc/lb/token"   # optional on loopback
state_dir = "/var/lib/lb-agent"
bpffs = "/sys/fs/bpf"              # pins under <bpffs>/xdplb/<netns id>/<interface>/: hosts in different namespaces can share one bpffs

[dataplane]
xdp_mode = "auto"
encap = "ipip"                     # ipip | gue
source_ipv4 = "198.18.1.10"        # outer source address of tunnelled packets
source_ipv6 = "fd00:18::10"
ring_size = 65537                  # Maglev table size per service (prime)
flow_table_size = 1000000

[[service]]
name = "web"
vip = "198.18.100.1:80"            # [v6]:port accepted too
protocol = "tcp"                   # tcp | udp
mode = "l4"                        # l4 (XDP) | l7 (HTTP proxy)
scheduler = "maglev"               # maglev | source-ip (affinity) ; l7: round-robin | least-request | p2c | hash
health = { kind = "http", path = "/healthz", interval_ms = 500, timeout_ms = 300, rise = 2, fall = 2 }
backend = [
  { address = "198.18.2.11", port = 80, weight = 100, tier = 0 },
  { address = "198.18.2.12", port = 80, weight = 100, tier = 1 },   # tier 1 serves only when tier 0 has none healthy
]
# l7 only:
sticky = { cookie = "LBSTICKY", ttl_s = 3600 }
cache = { max_bytes = 268435456 }
"#;

    const L7_EXTRAS: &str =
        "sticky = { cookie = \"LBSTICKY\", ttl_s = 3600 }\ncache = { max_bytes = 268435456 }\n";

    /// A dataplane section that satisfies l4 IPv4 services.
    const DP: &str = "[dataplane]\nsource_ipv4 = \"198.18.1.10\"\n";

    fn errors(text: &str) -> Vec<ConfigError> {
        match Config::parse(text, "test.toml") {
            Ok(cfg) => panic!("expected errors, parsed {cfg:#?}"),
            Err(ConfigErrors(errors)) => errors,
        }
    }

    fn parse_ok(text: &str) -> Config {
        Config::parse(text, "test.toml").unwrap_or_else(|e| panic!("unexpected errors:\n{e}"))
    }

    /// `(line, key)` of each error.
    fn places(errors: &[ConfigError]) -> Vec<(usize, &str)> {
        errors
            .iter()
            .map(|e| (e.line.unwrap_or(0), e.key.as_str()))
            .collect()
    }

    /// Asserts that `text` is rejected with exactly one error, at `key`, whose
    /// message contains `needle`.
    fn assert_single(text: &str, key: &str, needle: &str) -> ConfigError {
        let errors = errors(text);
        assert_eq!(
            errors.len(),
            1,
            "expected one error, got:\n{}",
            ConfigErrors(errors.clone())
        );
        let error = errors.into_iter().next().expect("one error");
        assert_eq!(error.key, key, "{error}");
        assert!(error.message.contains(needle), "{error:?} lacks {needle:?}");
        assert!(error.line.is_some(), "{error:?} has no line");
        error
    }

    /// An l4 IPv4 service `web` on 198.18.100.1:80 with extra lines, after [`DP`].
    fn l4(body: &str) -> String {
        format!("{DP}[[service]]\nname = \"web\"\nvip = \"198.18.100.1:80\"\n{body}\n")
    }

    /// An l7 service `web` on 198.18.100.1:80 with extra lines.
    fn l7(body: &str) -> String {
        format!("[[service]]\nname = \"web\"\nvip = \"198.18.100.1:80\"\nmode = \"l7\"\n{body}\n")
    }

    fn backend(address: &str, port: u16, weight: u32, tier: u8) -> BackendConfig {
        BackendConfig {
            address: address.parse().expect("address"),
            port,
            weight,
            tier,
        }
    }

    fn service(name: &str, vip: &str) -> ServiceConfig {
        ServiceConfig {
            name: name.to_owned(),
            vip: vip.parse().expect("vip"),
            protocol: Protocol::Tcp,
            mode: Mode::L4,
            scheduler: Scheduler::Maglev,
            health: HealthConfig::default(),
            backends: vec![backend("198.18.2.11", 80, 100, 0)],
            sticky: None,
            cache: None,
            slow_start_s: 0,
            on_all_down: AllDown::FailOpen,
            hash_on: HashOn::Client,
            tls: None,
            http: HttpConfig::default(),
        }
    }

    fn dp() -> DataplaneConfig {
        DataplaneConfig {
            source_ipv4: Some(Ipv4Addr::new(198, 18, 1, 10)),
            ..DataplaneConfig::default()
        }
    }

    // --- whole documents -------------------------------------------------------

    #[test]
    fn l7_and_control_keys_are_checked() {
        let text = l7(concat!(
            "hash_on = \"header:x user\"\n",
            "tls = { cert = \"/nonexistent.pem\", key = \"/nonexistent.key\" }\n",
            "http = { retries = 99, eject_max_ms = 5, max_header_bytes = 10 }\n",
            "on_all_down = \"dorp\"\n",
            "slow_start_s = 100000\n",
        ));
        let errs = errors(&text);
        assert_eq!(
            places(&errs),
            [
                (5, "service[0].hash_on"),
                (6, "service[0].tls.cert"),
                (6, "service[0].tls.key"),
                (7, "service[0].http.retries"),
                (7, "service[0].http.eject_max_ms"),
                (7, "service[0].http.max_header_bytes"),
                (8, "service[0].on_all_down"),
                (9, "service[0].slow_start_s"),
            ],
            "{errs:?}"
        );
        assert!(errs[6].message.contains("did you mean \"drop\""));
        // hash_on needs the hash scheduler; tls and http only in l7.
        let errs = errors(&l7("hash_on = \"cookie:s\""));
        assert_eq!(places(&errs), [(5, "service[0].hash_on")], "{errs:?}");
        let errs = errors(&l4("http = { retries = 1 }"));
        assert!(
            errs.iter()
                .any(|e| e.key == "service[0].http" && e.message.contains("only for mode")),
            "{errs:?}"
        );
        // Good values parse.
        let cfg = parse_ok(&l7(concat!(
            "scheduler = \"hash\"\nhash_on = \"cookie:session\"\n",
            "on_all_down = \"drop\"\nslow_start_s = 30\n",
            "http = { retries = 0, eject_after = 0 }\n",
        )));
        let svc = &cfg.services[0];
        assert_eq!(svc.hash_on, HashOn::Cookie("session".into()));
        assert_eq!(svc.on_all_down, AllDown::Drop);
        assert_eq!(svc.slow_start_s, 30);
        assert_eq!((svc.http.retries, svc.http.eject_after), (0, 0));
        assert_eq!(
            svc.http.connect_timeout_ms,
            HttpConfig::default().connect_timeout_ms
        );
    }

    #[test]
    fn design_example_rejects_only_the_l7_extras_in_its_l4_service() {
        let errors = errors(DESIGN_EXAMPLE);
        assert_eq!(
            places(&errors),
            [(28, "service[0].sticky"), (29, "service[0].cache")],
            "{}",
            ConfigErrors(errors.clone())
        );
        assert!(
            errors
                .iter()
                .all(|e| e.message.contains("only for mode = \"l7\""))
        );
    }

    #[test]
    fn design_example_parses_with_defaults_filled() {
        let text = DESIGN_EXAMPLE.replace(L7_EXTRAS, "")
            + "\n[[service]]\nname = \"shop\"\nvip = \"198.18.100.2:80\"\nmode = \"l7\"\n"
            + L7_EXTRAS;
        let expected = Config {
            agent: AgentConfig {
                interface: Some("eth0".to_owned()),
                api_listen: "127.0.0.1:9090".parse().expect("addr"),
                api_token_file: Some(PathBuf::from("/etc/lb/token")),
                state_dir: PathBuf::from("/var/lib/lb-agent"),
                bpffs: PathBuf::from("/sys/fs/bpf"),
            },
            dataplane: DataplaneConfig {
                xdp_mode: XdpMode::Auto,
                encap: Encap::Ipip,
                source_ipv4: Some(Ipv4Addr::new(198, 18, 1, 10)),
                source_ipv6: Some("fd00:18::10".parse().expect("v6")),
                ring_size: 65537,
                flow_table_size: 1_000_000,
                max_services: 64,
                max_backends: 4096,
            },
            services: vec![
                ServiceConfig {
                    name: "web".to_owned(),
                    vip: "198.18.100.1:80".parse().expect("vip"),
                    protocol: Protocol::Tcp,
                    mode: Mode::L4,
                    scheduler: Scheduler::Maglev,
                    health: HealthConfig {
                        kind: HealthKind::Http,
                        path: "/healthz".to_owned(),
                        host: None,
                        expect_status: (200, 399),
                        interval_ms: 500,
                        timeout_ms: 300,
                        rise: 2,
                        fall: 2,
                    },
                    backends: vec![
                        backend("198.18.2.11", 80, 100, 0),
                        backend("198.18.2.12", 80, 100, 1),
                    ],
                    sticky: None,
                    cache: None,
                    slow_start_s: 0,
                    on_all_down: AllDown::FailOpen,
                    hash_on: HashOn::Client,
                    tls: None,
                    http: HttpConfig::default(),
                },
                ServiceConfig {
                    name: "shop".to_owned(),
                    vip: "198.18.100.2:80".parse().expect("vip"),
                    protocol: Protocol::Tcp,
                    mode: Mode::L7,
                    scheduler: Scheduler::RoundRobin,
                    health: HealthConfig::default(),
                    backends: Vec::new(),
                    sticky: Some(StickyConfig {
                        cookie: "LBSTICKY".to_owned(),
                        ttl_s: 3600,
                    }),
                    cache: Some(CacheConfig {
                        max_bytes: 268_435_456,
                        max_object_bytes: DEFAULT_MAX_OBJECT_BYTES,
                    }),
                    slow_start_s: 0,
                    on_all_down: AllDown::FailOpen,
                    hash_on: HashOn::Client,
                    tls: None,
                    http: HttpConfig::default(),
                },
            ],
        };
        let cfg = parse_ok(&text);
        assert_eq!(cfg, expected);
        // The serde derive agrees with the manual walk.
        assert_eq!(toml::from_str::<Config>(&text).expect("serde"), expected);
    }

    #[test]
    fn empty_document_is_all_defaults() {
        let cfg = parse_ok("");
        assert_eq!(cfg, Config::default());
        assert_eq!(
            cfg.agent.api_listen,
            "127.0.0.1:9090".parse().expect("addr")
        );
        assert_eq!(cfg.agent.state_dir, Path::new("/var/lib/lb-agent"));
        assert_eq!(cfg.agent.bpffs, Path::new("/sys/fs/bpf"));
        assert_eq!(cfg.agent.interface, None, "interface may come from --iface");
        assert_eq!(cfg.dataplane.ring_size, 65537);
        assert_eq!(cfg.dataplane.flow_table_size, 1_000_000);
        assert_eq!(cfg.dataplane.max_services, 64);
        assert_eq!(cfg.dataplane.max_backends, 4096);
        assert!(cfg.services.is_empty());
    }

    #[test]
    fn minimal_config_takes_defaults() {
        let cfg = parse_ok(&l4("backend = [{ address = \"198.18.2.11\" }]"));
        let svc = &cfg.services[0];
        assert_eq!(svc.protocol, Protocol::Tcp);
        assert_eq!(svc.mode, Mode::L4);
        assert_eq!(svc.scheduler, Scheduler::Maglev);
        assert_eq!(svc.health, HealthConfig::default());
        assert_eq!(svc.health.kind, HealthKind::None);
        assert_eq!(
            svc.backends,
            [backend("198.18.2.11", 80, 100, 0)],
            "port from the VIP"
        );
        assert_eq!(svc.sticky, None);

        let cfg = parse_ok(&l7("backend = [{ address = \"fd00:18::2\", port = 8080 }]"));
        assert_eq!(cfg.services[0].scheduler, Scheduler::RoundRobin);
        assert_eq!(
            cfg.services[0].backends,
            [backend("fd00:18::2", 8080, 100, 0)]
        );
    }

    #[test]
    fn array_of_tables_backends_and_ipv6_vip() {
        let cfg = parse_ok(
            "[[service]]\nname = \"v6\"\nvip = \"[fd00:18::1]:443\"\nmode = \"l7\"\n\
             [[service.backend]]\naddress = \"fd00:18::11\"\n\
             [[service.backend]]\naddress = \"198.18.2.12\"\nweight = 0\n\
             [service.health]\nkind = \"tcp\"\n",
        );
        let svc = &cfg.services[0];
        assert_eq!(svc.vip, "[fd00:18::1]:443".parse().expect("vip"));
        assert_eq!(
            svc.backends,
            [
                backend("fd00:18::11", 443, 100, 0),
                backend("198.18.2.12", 443, 0, 0)
            ]
        );
        assert_eq!(svc.health.kind, HealthKind::Tcp);
    }

    #[test]
    fn many_mistakes_are_all_reported_in_file_order() {
        let text = r#"[agent]
api_listen = "0.0.0.0:9090"

[dataplane]
source_ipv4 = "198.18.1.10"
ring_size = 65536
flow_tabel_size = 10

[[service]]
name = "web"
vip = "198.18.100.1:80"
scheduler = "round-robin"
health = { kind = "http", interval_ms = "fast" }
backend = [
  { address = "198.18.2.11", port = 8080 },
  { address = "198.18.2.12", weight = 2000000 },
  { address = "198.18.2.12" },
]

[[service]]
name = "web"
vip = "198.18.100.1:80"
mode = "l7"
sticky = { cookie = "bad cookie", ttl_s = 0 }
"#;
        let errors = errors(text);
        assert_eq!(
            places(&errors),
            [
                (2, "agent.api_listen"),
                (6, "dataplane.ring_size"),
                (7, "dataplane.flow_tabel_size"),
                (12, "service[0].scheduler"),
                (13, "service[0].health.interval_ms"),
                (15, "service[0].backend[0].port"),
                (16, "service[0].backend[1].weight"),
                (17, "service[0].backend[2].address"),
                (21, "service[1].name"),
                (22, "service[1].vip"),
                (24, "service[1].sticky.cookie"),
                (24, "service[1].sticky.ttl_s"),
            ],
            "{}",
            ConfigErrors(errors.clone())
        );
        let message = |key: &str| {
            &errors
                .iter()
                .find(|e| e.key == key)
                .expect("error present")
                .message
        };
        assert!(message("dataplane.ring_size").contains("not a prime"));
        assert!(message("dataplane.flow_tabel_size").contains("did you mean `flow_table_size`"));
        assert_eq!(
            message("service[0].health.interval_ms"),
            "expected an integer, found a string"
        );
        assert!(message("service[0].backend[2].address").contains("backend[1]"));
        assert!(message("service[1].vip").contains("already used by service \"web\""));
        // Columns: the key for rules on the model, the value for type errors.
        let column = |key: &str| errors.iter().find(|e| e.key == key).and_then(|e| e.column);
        assert_eq!(column("service[0].scheduler"), Some(1));
        assert_eq!(column("service[0].health.interval_ms"), Some(41));
        assert_eq!(column("service[1].sticky.ttl_s"), Some(35));

        let shown = ConfigErrors(errors).to_string();
        assert_eq!(shown.lines().count(), 12);
        assert!(
            shown.starts_with("test.toml:2:1: agent.api_listen: 0.0.0.0:9090 is not a loopback")
        );
    }

    #[test]
    fn syntax_error_reports_its_line() {
        let errors = errors("[agent]\ninterface = \"eth0\"\napi_listen = \n");
        assert_eq!(errors.len(), 1);
        let error = &errors[0];
        assert_eq!(error.line, Some(3), "{error}");
        assert!(error.column.is_some());
        assert!(error.key.is_empty());
        assert!(error.message.starts_with("TOML syntax error"), "{error}");
        assert!(error.to_string().starts_with("test.toml:3:"), "{error}");
    }

    #[test]
    fn duplicate_key_is_a_syntax_error() {
        let errors = errors("[agent]\ninterface = \"a\"\ninterface = \"b\"\n");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].line, Some(3), "{}", errors[0]);
    }

    #[test]
    fn unknown_keys_are_reported_everywhere() {
        let error = assert_single("[agnet]\n", "agnet", "did you mean `agent`");
        assert_eq!((error.line, error.column), (Some(1), Some(2)));
        assert_single(
            "[agent]\nfoo = 1\n",
            "agent.foo",
            "expected one of: interface, api_listen",
        );
        assert_single(
            &l4("backend = [{ address = \"198.18.2.11\", wieght = 5 }]"),
            "service[0].backend[0].wieght",
            "did you mean `weight`",
        );
        assert_single(
            &l4("health = { kind = \"tcp\", interval = 5 }"),
            "service[0].health.interval",
            "unknown key",
        );
        assert_single(
            &l4("backends = []"),
            "service[0].backends",
            "did you mean `backend`",
        );
        assert_single(
            "[dataplane]\nring-size = 13\n",
            "dataplane.ring-size",
            "did you mean `ring_size`",
        );
    }

    #[test]
    fn wrong_types_are_reported() {
        assert_single(
            "[dataplane]\nring_size = \"big\"\n",
            "dataplane.ring_size",
            "expected an integer, found a string",
        );
        assert_single(
            "[dataplane]\nring_size = 1.5\n",
            "dataplane.ring_size",
            "expected an integer, found a float",
        );
        assert_single("agent = 3\n", "agent", "expected a table, found an integer");
        assert_single(
            "[agent]\ninterface = true\n",
            "agent.interface",
            "expected a string, found a boolean",
        );
        assert_single(
            &l4("backend = { address = \"198.18.2.11\" }"),
            "service[0].backend",
            "expected an array, found a table",
        );
        assert_single(
            &l4("backend = [{ address = \"198.18.2.11\", port = 70000 }]"),
            "service[0].backend[0].port",
            "between 0 and 65535, found 70000",
        );
        assert_single(
            &l4("backend = [{ address = \"198.18.2.11\", weight = -1 }]"),
            "service[0].backend[0].weight",
            "found -1",
        );
        assert_single(
            &l4("health = { expect_status = [200] }"),
            "service[0].health.expect_status",
            "two status codes",
        );
        assert_single(
            &l4("health = { expect_status = [200, \"x\"] }"),
            "service[0].health.expect_status[1]",
            "expected an integer",
        );
        assert_single(
            "[[service]]\nname = \"web\"\nvip = \"198.18.100.1\"\nmode = \"l7\"\n",
            "service[0].vip",
            "expected an address:port",
        );
        assert_single(
            &l4("backend = [{ address = \"host.example\" }]"),
            "service[0].backend[0].address",
            "expected an IP address",
        );
        assert_single(
            "[dataplane]\nxdp_mode = \"native\"\nencap = \"gre\"\n",
            "dataplane.encap",
            "expected one of: ipip, gue; did you mean \"gue\"?",
        );
        assert_single(
            &l4("scheduler = \"source_ip\""),
            "service[0].scheduler",
            "did you mean \"source-ip\"",
        );
        assert_single(
            "[dataplane]\nsource_ipv4 = \"fd00:18::10\"\n",
            "dataplane.source_ipv4",
            "expected an IPv4 address",
        );
    }

    #[test]
    fn missing_required_keys_are_reported() {
        let error = assert_single(
            "[[service]]\nname = \"web\"\nmode = \"l7\"\n",
            "service[0].vip",
            "required key is missing",
        );
        assert_eq!(error.line, Some(1), "points at the [[service]] header");
        assert_single(
            &l4("backend = [{ port = 80 }]"),
            "service[0].backend[0].address",
            "missing",
        );
        assert_single(
            &l7("sticky = { cookie = \"S\" }"),
            "service[0].sticky.ttl_s",
            "missing",
        );
        assert_single(&l7("cache = {}"), "service[0].cache.max_bytes", "missing");
    }

    #[test]
    fn an_unreadable_backend_keeps_the_others_checked_under_their_own_index() {
        let errors = errors(&l4(
            "backend = [{ address = \"nope\" }, { address = \"198.18.2.12\", tier = 9 }]",
        ));
        assert_eq!(
            places(&errors),
            [
                (6, "service[0].backend[0].address"),
                (6, "service[0].backend[1].tier")
            ]
        );
    }

    #[test]
    fn an_unreadable_service_keeps_the_others_checked_under_their_own_index() {
        let text = format!(
            "{DP}[[service]]\nname = \"a\"\nvip = \"bad\"\n\
             [[service]]\nname = \"b\"\nvip = \"198.18.100.1:80\"\nscheduler = \"p2c\"\n"
        );
        let errors = errors(&text);
        assert_eq!(
            places(&errors),
            [(5, "service[0].vip"), (9, "service[1].scheduler")]
        );
    }

    // --- rules: service identity ----------------------------------------------

    #[test]
    fn service_name_rules() {
        let named =
            |name: &str| format!("{DP}[[service]]\nname = \"{name}\"\nvip = \"198.18.100.1:80\"\n");
        assert_single(&named(""), "service[0].name", "must not be empty");
        assert_single(&named("web site"), "service[0].name", "may only contain");
        assert_single(
            &named(&"a".repeat(65)),
            "service[0].name",
            "the most allowed is 64",
        );
        parse_ok(&named(&"a".repeat(64)));
        parse_ok(&named("Web_1.example-2"));
        let dup = format!(
            "{}[[service]]\nname = \"web\"\nvip = \"198.18.100.2:80\"\n",
            named("web")
        );
        let error = assert_single(&dup, "service[1].name", "already used");
        assert_eq!(error.line, Some(7));
    }

    #[test]
    fn vip_rules() {
        let error = assert_single(
            &format!("{DP}[[service]]\nname = \"web\"\nvip = \"198.18.100.1:0\"\n"),
            "service[0].vip",
            "port must not be 0",
        );
        assert_eq!((error.line, error.column), (Some(5), Some(1)));
        assert_single(
            &format!("{DP}[[service]]\nname = \"web\"\nvip = \"0.0.0.0:80\"\n"),
            "service[0].vip",
            "unicast",
        );
        let two = |second: &str| {
            format!(
                "{DP}[[service]]\nname = \"a\"\nvip = \"198.18.100.1:53\"\n\
                 [[service]]\nname = \"b\"\nvip = \"198.18.100.1:53\"\n{second}\n"
            )
        };
        assert_single(
            &two(""),
            "service[1].vip",
            "VIP 198.18.100.1:53/tcp is already used by service \"a\"",
        );
        parse_ok(&two("protocol = \"udp\""));
    }

    // --- rules: dataplane -------------------------------------------------------

    #[test]
    fn ring_size_must_be_a_prime_in_range() {
        let ring = |n: u64| format!("[dataplane]\nring_size = {n}\n");
        assert!(
            assert_single(&ring(65536), "dataplane.ring_size", "not a prime")
                .message
                .contains("65537")
        );
        assert_single(&ring(11), "dataplane.ring_size", "between 13 and 16777213");
        assert_single(
            &ring(16_777_259),
            "dataplane.ring_size",
            "between 13 and 16777213",
        );
        assert_single(&ring(15), "dataplane.ring_size", "not a prime");
        for prime in [13, 65537, 16_777_213] {
            assert_eq!(parse_ok(&ring(u64::from(prime))).dataplane.ring_size, prime);
        }
    }

    #[test]
    fn is_prime_is_right() {
        let small: Vec<u32> = (0..50).filter(|&n| is_prime(n)).collect();
        assert_eq!(
            small,
            [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47]
        );
        assert!(is_prime(65537));
        assert!(is_prime(16_777_213));
        assert!(!is_prime(16_777_215));
        assert!(is_prime(4_294_967_291));
        assert!(!is_prime(u32::MAX));
        assert_eq!(next_prime(65536), Some(65537));
    }

    #[test]
    fn capacity_rules() {
        assert_single(
            "[dataplane]\nflow_table_size = 0\n",
            "dataplane.flow_table_size",
            "at least 1",
        );
        assert_single(
            "[dataplane]\nmax_services = 0\n",
            "dataplane.max_services",
            "between 1 and 4096",
        );
        assert_single(
            "[dataplane]\nmax_services = 4097\n",
            "dataplane.max_services",
            "between 1 and 4096",
        );
        assert_single(
            "[dataplane]\nmax_backends = 0\n",
            "dataplane.max_backends",
            "at least 1",
        );

        let services = format!(
            "{DP}max_services = 1\nmax_backends = 2\n\
             [[service]]\nname = \"a\"\nvip = \"198.18.100.1:80\"\n\
             backend = [{{ address = \"198.18.2.11\" }}, {{ address = \"198.18.2.12\" }}]\n\
             [[service]]\nname = \"b\"\nvip = \"198.18.100.2:80\"\n\
             backend = [{{ address = \"198.18.2.13\" }}]\n"
        );
        let errors = errors(&services);
        assert_eq!(
            places(&errors),
            [(9, "service[1]"), (12, "service[1].backend[0]")],
            "{}",
            ConfigErrors(errors.clone())
        );
        assert!(errors[0].message.contains("max_services = 1"));
        assert!(errors[1].message.contains("3 backends"));
    }

    #[test]
    fn source_addresses_must_be_unicast() {
        assert_single(
            "[dataplane]\nsource_ipv4 = \"224.0.0.1\"\n",
            "dataplane.source_ipv4",
            "multicast",
        );
        assert_single(
            "[dataplane]\nsource_ipv6 = \"::\"\n",
            "dataplane.source_ipv6",
            "unspecified",
        );
    }

    // --- rules: l4 ---------------------------------------------------------------

    #[test]
    fn l4_scheduler_must_be_maglev_or_source_ip() {
        assert_single(
            &l4("scheduler = \"hash\""),
            "service[0].scheduler",
            "use one of: maglev, source-ip",
        );
        assert_eq!(
            parse_ok(&l4("scheduler = \"source-ip\"")).services[0].scheduler,
            Scheduler::SourceIp
        );
    }

    #[test]
    fn l4_backend_port_must_be_the_vip_port() {
        let error = assert_single(
            &l4("backend = [{ address = \"198.18.2.11\", port = 8080 }]"),
            "service[0].backend[0].port",
            "does not rewrite ports",
        );
        assert!(
            error
                .message
                .contains("port 8080 differs from the VIP port 80")
        );
    }

    #[test]
    fn l4_is_ipv4_only_for_now() {
        let v6 = format!("{DP}[[service]]\nname = \"web\"\nvip = \"[fd00:18::1]:80\"\n");
        assert_single(
            &v6,
            "service[0].vip",
            "IPv6 L4 services are not supported yet",
        );
        assert_single(
            &l4("backend = [{ address = \"fd00:18::11\" }]"),
            "service[0].backend[0].address",
            "IPv6 L4 services are not supported yet",
        );
    }

    #[test]
    fn l4_rejects_sticky_and_cache() {
        assert_single(
            &l4("sticky = { cookie = \"S\", ttl_s = 60 }"),
            "service[0].sticky",
            "only for mode = \"l7\"",
        );
        assert_single(
            &l4("cache = { max_bytes = 1024 }"),
            "service[0].cache",
            "only for mode = \"l7\"",
        );
    }

    #[test]
    fn l4_ipv4_needs_source_ipv4_unless_xdp_is_off() {
        let service = "[[service]]\nname = \"web\"\nvip = \"198.18.100.1:80\"\n";
        let error = assert_single(service, "service[0].vip", "dataplane.source_ipv4");
        assert_eq!(error.line, Some(3));
        parse_ok(&format!("[dataplane]\nxdp_mode = \"off\"\n{service}"));
        parse_ok(&format!("{service}mode = \"l7\"\n"));
        parse_ok("[dataplane]\nxdp_mode = \"native\"\n");
    }

    // --- rules: l7 ---------------------------------------------------------------

    #[test]
    fn l7_needs_tcp() {
        assert_single(
            &l7("protocol = \"udp\""),
            "service[0].protocol",
            "protocol = \"tcp\"",
        );
    }

    #[test]
    fn l7_scheduler_rules() {
        assert_single(
            &l7("scheduler = \"maglev\""),
            "service[0].scheduler",
            "round-robin, least-request, p2c, hash",
        );
        for scheduler in ["round-robin", "least-request", "p2c", "hash"] {
            let cfg = parse_ok(&l7(&format!("scheduler = \"{scheduler}\"")));
            assert_eq!(cfg.services[0].scheduler.as_str(), scheduler);
        }
    }

    #[test]
    fn l7_allows_ipv6_and_other_ports() {
        let cfg = parse_ok(&l7(
            "backend = [{ address = \"fd00:18::11\", port = 8080 }, { address = \"198.18.2.11\", port = 8081 }]",
        ));
        assert_eq!(cfg.services[0].backends.len(), 2);
    }

    // --- rules: backends ------------------------------------------------------------

    #[test]
    fn a_service_may_start_without_backends() {
        assert!(parse_ok(&l4("")).services[0].backends.is_empty());
        assert!(
            parse_ok(&l4("backend = []")).services[0]
                .backends
                .is_empty()
        );
    }

    #[test]
    fn backend_rules() {
        assert_single(
            &l4(
                "backend = [{ address = \"198.18.2.11\" }, { address = \"198.18.2.11\", port = 80 }]",
            ),
            "service[0].backend[1].address",
            "duplicate backend 198.18.2.11:80: already listed as backend[0]",
        );
        assert_single(
            &l4("backend = [{ address = \"198.18.2.11\", weight = 1000001 }]"),
            "service[0].backend[0].weight",
            "between 0 (drain) and 1000000",
        );
        let cfg = parse_ok(&l4(
            "backend = [{ address = \"198.18.2.11\", weight = 0 }, { address = \"198.18.2.12\", weight = 1000000, tier = 7 }]",
        ));
        assert_eq!(cfg.services[0].backends[0].weight, 0);
        assert_single(
            &l4("backend = [{ address = \"198.18.2.11\", tier = 8 }]"),
            "service[0].backend[0].tier",
            "between 0 and 7",
        );
        assert_single(
            &l4("backend = [{ address = \"0.0.0.0\" }]"),
            "service[0].backend[0].address",
            "unspecified",
        );
        assert_single(
            &l4("backend = [{ address = \"239.1.1.1\" }]"),
            "service[0].backend[0].address",
            "multicast",
        );
        assert_single(
            &l7("backend = [{ address = \"ff02::1\" }]"),
            "service[0].backend[0].address",
            "multicast",
        );
        assert_single(
            &l4("backend = [{ address = \"255.255.255.255\" }]"),
            "service[0].backend[0].address",
            "broadcast",
        );
    }

    // --- rules: health ---------------------------------------------------------------

    #[test]
    fn health_rules() {
        let health = |h: &str| l4(&format!("health = {{ kind = \"http\", {h} }}"));
        assert_single(
            &health("interval_ms = 49, timeout_ms = 10"),
            "service[0].health.interval_ms",
            "at least 50",
        );
        assert_single(
            &health("timeout_ms = 0"),
            "service[0].health.timeout_ms",
            "at least 1",
        );
        assert_single(
            &health("interval_ms = 100, timeout_ms = 101"),
            "service[0].health.timeout_ms",
            "must not exceed the interval",
        );
        parse_ok(&health("interval_ms = 100, timeout_ms = 100"));
        assert_single(
            &health("rise = 0"),
            "service[0].health.rise",
            "between 1 and 100",
        );
        assert_single(
            &health("fall = 101"),
            "service[0].health.fall",
            "between 1 and 100",
        );
        assert_single(
            &health("path = \"healthz\""),
            "service[0].health.path",
            "must start with '/'",
        );
        assert_single(
            &health("host = \"\""),
            "service[0].health.host",
            "non-empty",
        );
        assert_single(
            &health("expect_status = [200, 600]"),
            "service[0].health.expect_status",
            "between 100 and 599",
        );
        assert_single(
            &health("expect_status = [99, 200]"),
            "service[0].health.expect_status",
            "between 100 and 599",
        );
        assert_single(
            &health("expect_status = [300, 200]"),
            "service[0].health.expect_status",
            "not be greater",
        );
        let cfg = parse_ok(&health(
            "expect_status = [200, 200], host = \"web.example\", rise = 100",
        ));
        assert_eq!(cfg.services[0].health.expect_status, (200, 200));
    }

    #[test]
    fn a_defaulted_key_is_placed_at_its_table() {
        // timeout_ms defaults to 500, more than this interval: the error names the
        // defaulted key and points at the health table that omits it.
        let error = assert_single(
            &l4("\nhealth = { interval_ms = 100 }"),
            "service[0].health.timeout_ms",
            "interval",
        );
        assert_eq!((error.line, error.column), (Some(7), Some(1)));
    }

    // --- rules: sticky and cache -------------------------------------------------------

    #[test]
    fn sticky_and_cache_rules() {
        for bad in ["", "a b", "a;b", "a=b", "é", "a\\u0001"] {
            assert_single(
                &l7(&format!("sticky = {{ cookie = \"{bad}\", ttl_s = 1 }}")),
                "service[0].sticky.cookie",
                "cookie name",
            );
        }
        parse_ok(&l7(
            "sticky = { cookie = \"__Host-lb_sticky.1\", ttl_s = 1 }",
        ));
        assert_single(
            &l7("sticky = { cookie = \"S\", ttl_s = 0 }"),
            "service[0].sticky.ttl_s",
            "at least 1",
        );
        assert_single(
            &l7("cache = { max_bytes = 0 }"),
            "service[0].cache.max_bytes",
            "at least 1",
        );
    }

    // --- rules: agent ---------------------------------------------------------------------

    #[test]
    fn non_loopback_api_needs_a_token_file() {
        let error = assert_single(
            "[agent]\n\napi_listen = \"198.18.1.10:9090\"\n",
            "agent.api_listen",
            "api_token_file",
        );
        assert_eq!(error.line, Some(3));
        assert_single(
            "[agent]\napi_listen = \"[::]:9090\"\n",
            "agent.api_listen",
            "api_token_file",
        );
        parse_ok("[agent]\napi_listen = \"0.0.0.0:9090\"\napi_token_file = \"/etc/lb/token\"\n");
        parse_ok("[agent]\napi_listen = \"[::1]:9090\"\n");
        parse_ok("[agent]\napi_listen = \"127.0.0.2:9090\"\n");
    }

    #[test]
    fn interface_is_optional_but_must_be_a_valid_name() {
        assert_eq!(parse_ok("[agent]\n").agent.interface, None);
        assert_single(
            "[agent]\ninterface = \"a-very-long-interface\"\n",
            "agent.interface",
            "15 bytes",
        );
        assert_single(
            "[agent]\ninterface = \"eth 0\"\n",
            "agent.interface",
            "not a valid",
        );
        assert_single("[agent]\ninterface = \"\"\n", "agent.interface", "--iface");
    }

    // --- API side ---------------------------------------------------------------------------

    #[test]
    fn service_json_round_trip() {
        let mut svc = service("web", "198.18.100.1:80");
        svc.mode = Mode::L7;
        svc.scheduler = Scheduler::LeastRequest;
        svc.health.host = Some("web.example".to_owned());
        svc.sticky = Some(StickyConfig {
            cookie: "S".to_owned(),
            ttl_s: 60,
        });
        svc.cache = Some(CacheConfig {
            max_bytes: 1 << 20,
            max_object_bytes: 1 << 16,
        });
        svc.backends.push(backend("fd00:18::11", 8080, 0, 3));
        let json = serde_json::to_string(&svc).expect("serialize");
        assert!(json.contains("\"backend\":["), "{json}");
        assert!(json.contains("\"scheduler\":\"least-request\""), "{json}");
        assert!(json.contains("\"vip\":\"198.18.100.1:80\""), "{json}");
        assert_eq!(
            serde_json::from_str::<ServiceConfig>(&json).expect("deserialize"),
            svc
        );
    }

    #[test]
    fn service_json_takes_the_toml_defaults() {
        let svc: ServiceConfig = serde_json::from_str(
            r#"{"name": "web", "vip": "198.18.100.1:80", "backend": [{"address": "198.18.2.11"}]}"#,
        )
        .expect("deserialize");
        assert_eq!(svc, service("web", "198.18.100.1:80"));
        let l7: ServiceConfig =
            serde_json::from_str(r#"{"name": "s", "vip": "[fd00:18::1]:80", "mode": "l7"}"#)
                .expect("l7");
        assert_eq!(l7.scheduler, Scheduler::RoundRobin);
        let typo = serde_json::from_str::<ServiceConfig>(
            r#"{"name": "s", "vip": "198.18.100.1:80", "wieght": 1}"#,
        );
        assert!(
            typo.expect_err("unknown field")
                .to_string()
                .contains("wieght")
        );
    }

    #[test]
    fn validate_service_catches_a_duplicate_vip() {
        let others = [service("web", "198.18.100.1:80")];
        let mut new = service("web2", "198.18.100.1:80");
        new.backends.push(backend("198.18.2.12", 80, 2_000_000, 0));
        let errors = validate_service(&new, &others, &dp());
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["vip", "backend[1].weight"], "{errors:?}");
        assert!(
            errors[0]
                .message
                .contains("already used by service \"web\"")
        );
        assert!(errors.iter().all(|e| e.line.is_none() && e.file.is_empty()));
        assert_eq!(errors[0].to_string(), format!("vip: {}", errors[0].message));

        new.protocol = Protocol::Udp;
        new.backends.pop();
        assert!(validate_service(&new, &others, &dp()).is_empty());
    }

    #[test]
    fn validate_service_checks_names_and_capacities() {
        let others = [service("web", "198.18.100.1:80")];
        let keys = |svc: &ServiceConfig, dp: &DataplaneConfig| -> Vec<String> {
            validate_service(svc, &others, dp)
                .into_iter()
                .map(|e| e.key)
                .collect()
        };
        assert_eq!(keys(&service("web", "198.18.100.2:80"), &dp()), ["name"]);
        let full = DataplaneConfig {
            max_services: 1,
            max_backends: 1,
            ..dp()
        };
        assert_eq!(
            keys(&service("b", "198.18.100.2:80"), &full),
            ["name", "backend"]
        );
        let bare = DataplaneConfig::default();
        assert_eq!(keys(&service("b", "198.18.100.2:80"), &bare), ["vip"]);
    }

    #[test]
    fn validate_on_the_model_matches_parse() {
        let mut cfg = parse_ok(&l4(""));
        assert!(cfg.validate().is_empty());
        cfg.dataplane.source_ipv4 = None;
        let errors = cfg.validate();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].key, "service[0].vip");
        cfg.dataplane.xdp_mode = XdpMode::Off;
        assert!(cfg.validate().is_empty());
    }

    // --- consistency and plumbing -----------------------------------------------------------

    #[test]
    fn enum_names_match_serde() {
        fn check<T: Named + Serialize>() {
            for v in T::ALL {
                assert_eq!(serde_json::to_value(v).expect("json"), v.name());
            }
        }
        check::<XdpMode>();
        check::<Encap>();
        check::<Protocol>();
        check::<Mode>();
        check::<Scheduler>();
        check::<HealthKind>();
    }

    #[test]
    fn toml_serialization_reads_back_unchanged() {
        // Every field serde writes is a key the walk knows and reads.
        let mut cfg = parse_ok(
            &(DESIGN_EXAMPLE.replace(L7_EXTRAS, "")
                + "[[service]]\nname = \"shop\"\nvip = \"198.18.100.2:80\"\nmode = \"l7\"\n"
                + L7_EXTRAS),
        );
        cfg.dataplane.max_services = 10;
        cfg.dataplane.encap = Encap::Gue;
        cfg.services[1].health.host = Some("shop.example".to_owned());
        let text = toml::to_string(&cfg).expect("to toml");
        assert_eq!(parse_ok(&text), cfg, "{text}");
    }

    #[test]
    fn display_formats() {
        let mut error = ConfigError {
            file: "lb.toml".to_owned(),
            line: Some(3),
            column: Some(7),
            key: "agent.api_listen".to_owned(),
            message: "why".to_owned(),
        };
        assert_eq!(error.to_string(), "lb.toml:3:7: agent.api_listen: why");
        error.column = None;
        assert_eq!(error.to_string(), "lb.toml:3: agent.api_listen: why");
        error.line = None;
        assert_eq!(error.to_string(), "lb.toml: agent.api_listen: why");
        error.key.clear();
        assert_eq!(error.to_string(), "lb.toml: why");
        let both = ConfigErrors(vec![error.clone(), error]);
        assert_eq!(both.to_string(), "lb.toml: why\nlb.toml: why");
    }

    #[test]
    fn load_names_the_file() {
        let dir = std::env::temp_dir().join(format!("lb-agent-config-test-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("lb.toml");
        fs::write(&path, "[dataplane]\nring_size = 12\n").expect("write");
        let ConfigErrors(errors) = Config::load(&path).expect_err("invalid");
        assert_eq!(errors[0].file, path.display().to_string());
        assert_eq!(errors[0].line, Some(2));
        fs::write(&path, l4("")).expect("write");
        assert_eq!(Config::load(&path).expect("valid").services[0].name, "web");
        fs::remove_dir_all(&dir).expect("cleanup");

        let missing = dir.join("missing.toml");
        let ConfigErrors(errors) = Config::load(&missing).expect_err("missing");
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0]
                .to_string()
                .starts_with(&format!("{}: cannot read", missing.display()))
        );
    }

    #[test]
    fn positions_count_characters() {
        assert_eq!(position("", 0), (1, 1));
        assert_eq!(position("ab\ncd", 4), (2, 2));
        assert_eq!(position("é = 1\nx", 2), (1, 2));
        assert_eq!(position("a\n", 99), (2, 1));
    }
}
