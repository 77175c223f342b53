//! The desired state of the fast path and the one door it goes through: [`Sink`].
//!
//! Data flows downhill: config and API changes, with health, become a [`DesiredState`]
//! (derived by `crate::state`, owned by `crate::control::Control`), which is handed to
//! a [`Sink`]: the fast path's maps ([`super::fast_path::MapsSink`], whose
//! [`super::sync::Reconciler`] writes only the differences) or nothing at all
//! ([`NoFastPath`], `--xdp-mode off`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use lb_common::types::{ENCAP_GUE, ENCAP_IPIP};

use super::stats::Snapshot;
use crate::config::{
    DataplaneConfig, Encap, FlowLimitConfig, Protocol, SecurityConfig, ServiceConfig, parse_prefix,
};

/// A service as the fast path should see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredService {
    pub name: String,
    pub vip: SocketAddr,
    pub protocol: Protocol,
    /// Passed to the kernel (the L7 proxy serves it).
    pub l7: bool,
    /// Hash the client address only (source-IP affinity).
    pub source_hash: bool,
    pub backends: Vec<DesiredBackend>,
    /// The service's own `deny`, `allow` and `new_flows_per_source` (checked after the
    /// global ones, for packets to this VIP).
    pub filters: DesiredFilters,
    /// QUIC connection-ID routing (`quic = true`).
    pub quic: bool,
}

/// A backend as the fast path should see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredBackend {
    pub address: IpAddr,
    pub port: u16,
    /// Ring weight: its share of new flows. 0 = no new flows.
    pub weight: u32,
    /// Flows already pinned to it may continue (set while in the ring or draining).
    pub active: bool,
    /// QUIC server id its connection IDs carry (`quic_id`; used when the service has
    /// `quic`).
    pub quic_id: Option<u32>,
}

/// Everything the reconciler writes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub source_v4: Option<Ipv4Addr>,
    pub source_v6: Option<Ipv6Addr>,
    pub encap: u32,
    /// `dataplane.mtu`; 0: no check beyond the egress interface's MTU.
    pub mtu: u32,
    /// `dataplane.gue_port` (host order).
    pub gue_port: u16,
    /// `dataplane.source_ipv4_prefix`: outer IPv4 sources vary per flow within it.
    pub source_v4_prefix: Option<ipnet::Ipv4Net>,
    /// `dataplane.source_ipv6_prefix`: outer IPv6 sources vary per flow within it
    /// (the last 32 bits of the address at most).
    pub source_v6_prefix: Option<ipnet::Ipv6Net>,
    /// `dataplane.max_new_flows_per_cpu` (0: every new flow is recorded).
    pub max_new_flows_per_cpu: u32,
    /// `dataplane.icmp_errors_per_cpu` (0: no limit).
    pub icmp_errors_per_cpu: u16,
    pub services: Vec<DesiredService>,
    /// `[security]` source filters.
    pub filters: DesiredFilters,
}

/// Source prefixes the fast path drops (`deny`) or, when `allow` is non-empty, the
/// only ones it lets reach a VIP (globally, or the VIP of one service); and the
/// limit on new flows per source.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredFilters {
    pub deny: Vec<ipnet::IpNet>,
    pub allow: Vec<ipnet::IpNet>,
    pub new_flows: Option<FlowLimitConfig>,
}

impl DesiredFilters {
    /// The prefixes of a validated `[security]` table (an invalid entry, which
    /// validation refuses before this point, is left out).
    pub fn new(sec: &SecurityConfig) -> Self {
        Self::of(&sec.deny, &sec.allow, sec.new_flows_per_source)
    }

    /// A validated service's own lists and limit.
    pub fn of_service(svc: &ServiceConfig) -> Self {
        Self::of(&svc.deny, &svc.allow, svc.new_flows_per_source)
    }

    fn of(deny: &[String], allow: &[String], new_flows: Option<FlowLimitConfig>) -> Self {
        let parse = |list: &[String]| list.iter().filter_map(|p| parse_prefix(p).ok()).collect();
        DesiredFilters {
            deny: parse(deny),
            allow: parse(allow),
            new_flows,
        }
    }
}

impl DesiredState {
    /// The global settings of `dataplane` with the given services (as derived by
    /// `crate::state` from config, overrides and health).
    pub fn new(dataplane: &DataplaneConfig, services: Vec<DesiredService>) -> Self {
        DesiredState {
            source_v4: dataplane.source_ipv4,
            source_v6: dataplane.source_ipv6,
            encap: match dataplane.encap {
                Encap::Ipip => ENCAP_IPIP,
                Encap::Gue => ENCAP_GUE,
            },
            mtu: dataplane.mtu,
            gue_port: dataplane.gue_port,
            source_v4_prefix: dataplane
                .source_ipv4_prefix
                .as_deref()
                .and_then(|p| p.parse().ok()),
            source_v6_prefix: dataplane
                .source_ipv6_prefix
                .as_deref()
                .and_then(|p| p.parse().ok()),
            max_new_flows_per_cpu: dataplane.max_new_flows_per_cpu,
            // Validated: at most MAX_ICMP_ERRORS_PER_CPU (u16::MAX).
            icmp_errors_per_cpu: u16::try_from(dataplane.icmp_errors_per_cpu).unwrap_or(u16::MAX),
            services,
            filters: DesiredFilters::default(),
        }
    }

    /// The same state with the source filters of `sec`.
    #[must_use]
    pub fn with_filters(mut self, sec: &SecurityConfig) -> Self {
        self.filters = DesiredFilters::new(sec);
        self
    }
}

/// Where the desired state goes: the fast path, or nowhere (`--xdp-mode off`).
///
/// `apply` may fail part-way (a map write refused by the kernel); the caller keeps the
/// desired state and calls `apply` again later (see [`super::retry::WriteRetry`]), so
/// an implementation must make a repeated `apply` of the same or a newer state correct.
pub trait Sink: Send {
    fn apply(&mut self, desired: &DesiredState) -> anyhow::Result<()>;
    /// The fast path's counters, if there is a fast path.
    fn snapshot(&self, services: &[ServiceConfig]) -> Option<Snapshot>;
    /// The digest of `service`'s ring as written to the fast path (`ring_digest` in the
    /// API); None without a fast path or a ring.
    fn ring_digest(&self, _service: &str) -> Option<String> {
        None
    }
    /// `service`'s ring read back from the fast path's map, each slot named by its
    /// backend (`address:port`, `?` for an id that is no backend of the service), for
    /// comparing the rings of two nodes slot by slot (`GET /api/v1/services/{name}/ring`).
    /// None without a fast path or a ring.
    fn ring_slots(&self, _service: &str) -> Option<anyhow::Result<Vec<String>>> {
        None
    }
}

/// No fast path: nothing to write (L7 services are served by the proxy).
pub struct NoFastPath;

impl Sink for NoFastPath {
    fn apply(&mut self, _desired: &DesiredState) -> anyhow::Result<()> {
        Ok(())
    }
    fn snapshot(&self, _services: &[ServiceConfig]) -> Option<Snapshot> {
        None
    }
}
