//! The REST API's request and response bodies: the one place that says what goes over
//! the wire. The handlers build these, `lb-agent ctl` and the end-to-end tests read them
//! back (`lb_agent::api::types`), and the OpenAPI document
//! (`GET /api/v1/openapi.json`) is generated from them.
//!
//! Request bodies that are config use the config model itself: `POST` and `PUT
//! /api/v1/services` take a [`ServiceConfig`] (the keys of a `[[service]]` table, with
//! the same defaults). A service is shown as that config plus its live view
//! ([`Service`]).
//!
//! Field names and shapes are part of the contract (DESIGN.md "REST API"): outside
//! tests and users read them. Add fields; do not rename or remove them.

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};
use utoipa::{
    ToSchema,
    openapi::{
        Ref,
        schema::{AnyOfBuilder, ObjectBuilder, Schema},
    },
};

pub use crate::bgp::{BgpStatus, BirdState};
pub use crate::control::ShadowedEdit;
pub use crate::dataplane::retry::SyncStatus;
pub use crate::{config::ServiceConfig, health::Status as HealthStatus, state::AdminState};
use crate::{dataplane::stats::Snapshot, l7::balancer::BackendState, state::BackendView};

/// `GET /api/v1/services`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ServiceList {
    /// In config order, then the services created through the API.
    pub services: Vec<Service>,
}

/// A service: its config (TOML key names) plus the live view. The config's `backend`
/// list is not shown (`config.backends` is empty here): `backends` shows every backend
/// with its live state instead.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Service {
    #[serde(flatten)]
    pub config: ServiceConfig,
    /// The tier whose backends take new flows; null when none is eligible.
    pub active_tier: Option<u8>,
    /// No backend is eligible: the last known set keeps serving.
    pub fail_open: bool,
    /// No backend of any tier is eligible (fail open, or dropping with
    /// `on_all_down = "drop"`).
    pub all_down: bool,
    /// The backends, with their live state.
    pub backends: Vec<Backend>,
    /// Hex SHA-256 of the ring as written to the fast path, each slot named by its
    /// backend (`address:port`): equal on two nodes means the same ring. Null without
    /// a ring in the fast path (l7, no fast path, no backend takes new flows).
    #[serde(default)]
    pub ring_digest: Option<String>,
}

/// A backend of a service: its config and, once the control plane has computed the
/// service (always, unless the last change could not be applied), its live state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Backend {
    #[schema(value_type = String, example = "198.18.2.11")]
    pub address: IpAddr,
    pub port: u16,
    /// Failover tier.
    pub tier: u8,
    /// The configured weight, or the operator's override.
    pub weight: u32,
    /// QUIC server id (`quic_id`) a `quic` service's connection IDs name this backend
    /// by; absent when not configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quic_id: Option<u32>,
    /// The live state; absent (no field at all) before the service was computed.
    #[serde(flatten)]
    #[schema(schema_with = live_or_none)]
    pub live: Option<BackendLive>,
}

/// The live fields of a [`Backend`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BackendLive {
    /// The weight in the ring now: lower than `weight` while slow start ramps it.
    pub effective_weight: u32,
    /// Slow start progress (0 to 1) while ramping; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_start: Option<f64>,
    /// What an operator set.
    pub state: AdminState,
    pub healthy: bool,
    /// Takes new flows (in the ring).
    pub serving: bool,
    /// Keeps its established flows.
    pub active: bool,
    /// The health checker's status of this backend; null when it has none.
    pub health: Option<HealthStatus>,
    /// With `[cluster]`: this node's own checks find the backend down while the
    /// cluster's majority does not, so it stays in every ring (`healthy` is the
    /// cluster's verdict). Absent when false (always, without `[cluster]`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub local_down: bool,
}

impl Backend {
    /// A backend as its service's view shows it, with the checker's status.
    #[must_use]
    pub fn live(view: &BackendView, health: Option<HealthStatus>) -> Self {
        Self {
            address: view.address,
            port: view.port,
            tier: view.tier,
            weight: view.weight,
            quic_id: view.quic_id,
            live: Some(BackendLive {
                effective_weight: view.effective_weight,
                slow_start: view.slow_start,
                state: view.state,
                healthy: view.healthy,
                serving: view.serving,
                active: view.active,
                health,
                local_down: view.local_down,
            }),
        }
    }

    /// A backend known only from the config (its service has no view yet).
    #[must_use]
    pub fn configured(b: &crate::config::BackendConfig) -> Self {
        Self {
            address: b.address,
            port: b.port,
            tier: b.tier,
            weight: b.weight,
            quic_id: b.quic_id,
            live: None,
        }
    }
}

/// The schema of a flattened `Option<T>`: all of `T`'s fields, or none of them
/// (utoipa's own rendering, "null or T", would demand `T`'s fields inside an object).
fn all_or_none<T: ToSchema>(none: &str) -> Schema {
    Schema::AnyOf(
        AnyOfBuilder::new()
            .item(Ref::from_schema_name(T::name()))
            .item(ObjectBuilder::new().description(Some(none)))
            .build(),
    )
}

fn live_or_none() -> Schema {
    all_or_none::<BackendLive>("no live fields: the service has not been computed yet")
}

fn traffic_or_none() -> Schema {
    all_or_none::<FastPathStats>("no counters: there is no fast path")
}

/// `PATCH /api/v1/services/{name}/backends/{address}`: at least one of the two.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackendPatch {
    /// 0 (drained) to 1 000 000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<AdminState>,
}

/// `GET /api/v1/stats`: the fast path's counters when there is one (nothing made up
/// when there is not: `"fast_path": false` and no counters), and the L7 services.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Stats {
    /// Whether a fast path is attached (false with `--xdp-mode off`).
    pub fast_path: bool,
    /// The fast path's counters (`counters`, `drops`, `services`); absent without one.
    #[serde(flatten)]
    #[schema(schema_with = traffic_or_none)]
    pub traffic: Option<FastPathStats>,
    /// The L7 services by name; absent when there are none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub l7: BTreeMap<String, L7Stats>,
    /// Whether the last accepted change is in the fast path's maps (a failed map write
    /// is retried with backoff until it succeeds); present where there is a fast path,
    /// or once a write has failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataplane: Option<SyncStatus>,
}

/// The fast path's counters.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FastPathStats {
    /// Global counters by label (`rx`, `tx`, `pass`, ...), packets.
    pub counters: BTreeMap<String, u64>,
    /// Dropped packets by reason.
    pub drops: BTreeMap<String, u64>,
    /// Traffic per service, by name.
    pub services: BTreeMap<String, ServiceTraffic>,
    /// Packets dropped per `[security]` rule: the deny prefix, or `not_allowed`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub filter_drops: BTreeMap<String, u64>,
}

/// One service's fast-path traffic.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ServiceTraffic {
    pub packets: u64,
    pub bytes: u64,
    /// By `"address:port"`.
    pub backends: BTreeMap<String, Traffic>,
}

/// Packets and bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
}

impl From<Snapshot> for FastPathStats {
    fn from(s: Snapshot) -> Self {
        let labels = |m: BTreeMap<&'static str, u64>| {
            m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
        };
        Self {
            counters: labels(s.counters),
            drops: labels(s.drops),
            filter_drops: s.filter_drops,
            services: s
                .services
                .into_iter()
                .map(|(name, t)| {
                    let backends = t
                        .backends
                        .into_iter()
                        .map(|(b, t)| {
                            (
                                b,
                                Traffic {
                                    packets: t.packets,
                                    bytes: t.bytes,
                                },
                            )
                        })
                        .collect();
                    (
                        name,
                        ServiceTraffic {
                            packets: t.packets,
                            bytes: t.bytes,
                            backends,
                        },
                    )
                })
                .collect(),
        }
    }
}

/// One L7 service: requests, cache hits, and each backend's state in the pool.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct L7Stats {
    /// Whether the proxy serves it now.
    pub serving: bool,
    pub http_requests: u64,
    pub cache_hits: u64,
    /// The cache's contents; null without a cache (or while not serving).
    pub cache: Option<CacheUsage>,
    /// The pool's view of each backend; empty while not serving.
    pub backends: Vec<L7Backend>,
}

/// What an L7 service's cache holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CacheUsage {
    pub entries: u64,
    pub bytes: u64,
}

/// A backend in an L7 service's pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct L7Backend {
    /// `"address:port"`.
    #[schema(example = "198.18.2.21:8080")]
    pub backend: String,
    /// Current weight.
    pub weight: u32,
    /// Requests in flight.
    pub in_flight: u32,
    /// Whether passive health has ejected it.
    pub ejected: bool,
    /// Failures since the last success (or the last ejection).
    pub consecutive_failures: u32,
}

impl From<&BackendState> for L7Backend {
    fn from(b: &BackendState) -> Self {
        Self {
            backend: b.addr.to_string(),
            weight: b.weight,
            in_flight: b.in_flight,
            ejected: b.ejected,
            consecutive_failures: b.consecutive_failures,
        }
    }
}

/// `POST /api/v1/services/{name}/cache/purge`: all of the service's cached responses
/// without a body (or with `{}`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PurgeRequest {
    /// Only responses for this path (without query, starting with `/`); all when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Every path starting with `path`.
    #[serde(default)]
    pub prefix: bool,
}

/// Answer to a cache purge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PurgeResponse {
    /// Responses dropped.
    pub purged: u64,
}

/// Optional body of `POST /api/v1/reload`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReloadRequest {
    /// Accept a file that leaves no service (refused otherwise: 409). SIGHUP never
    /// allows it.
    #[serde(default)]
    pub allow_empty: bool,
}

/// Answer to `POST /api/v1/reload`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReloadResponse {
    /// `"reloaded"`.
    pub status: String,
    /// Services now configured.
    pub services: usize,
    /// Services the reload added.
    #[serde(default)]
    pub added: Vec<String>,
    /// Services the reload removed.
    #[serde(default)]
    pub removed: Vec<String>,
    /// Services the reload changed.
    #[serde(default)]
    pub changed: Vec<String>,
    /// Edits of the file that do not take effect because the service was changed or
    /// deleted through the API (the API's version stays in force).
    #[serde(default)]
    pub shadowed: Vec<ShadowedEdit>,
}

/// Answer to `GET /healthz`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Healthz {
    /// `"ok"`.
    pub status: String,
}

/// Every failed request's body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for a human.
    pub error: String,
}

/// `GET /api/v1/node`, and the answer of `POST /api/v1/node/drain` and `/undrain`: this
/// LB node's VIP announcements.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NodeStatus {
    /// The announcements through BIRD; null without a `[bgp]` table (nothing is
    /// announced).
    pub bgp: Option<BgpStatus>,
}

/// `GET /api/v1/cluster` (with `[cluster]`): this node, the store's state, the live
/// members with their last health publication, and the revision of the shared state
/// this node applied.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterStatus {
    /// This node's name (`cluster.node`).
    pub node: String,
    /// `"connected"` while etcd answers, `"unreachable"` while this node serves its last
    /// shared state (API changes answer 503).
    pub store: String,
    /// Why the store is unreachable (the last error); absent while connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The live members (a health view under a live lease; this node always), by name.
    pub members: Vec<ClusterMember>,
    /// The etcd revision of the shared state this node applied (0: not read yet).
    pub revision: i64,
}

/// A live member of the cluster and its last health publication.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterMember {
    pub node: String,
    /// When it last published its health view (milliseconds since the Unix epoch).
    pub published_ms: u64,
    /// The backends it finds down, as `service/address:port`.
    pub down: Vec<String>,
}

/// `GET /api/v1/services/{name}/ring`: the ring read back from the fast path's map,
/// each slot named by its backend (`address:port`), so two nodes' rings can be
/// compared slot by slot (their backend ids differ).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RingSlots {
    pub service: String,
    /// `ring_digest` of the same ring.
    pub digest: Option<String>,
    /// One entry per slot, in slot order (`dataplane.ring_size` entries).
    pub slots: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shapes as the API sends them (an example of each), read back into the types
    /// and written again unchanged.
    #[test]
    fn the_types_read_and_write_the_api_shapes() {
        let text = r#"{"name":"web","vip":"198.18.100.1:80","protocol":"tcp","mode":"l4",
            "scheduler":"maglev","health":{"kind":"none","path":"/healthz",
            "expect_status":[200,399],"interval_ms":1000,"timeout_ms":500,"rise":2,"fall":2},
            "slow_start_s":0,"on_all_down":"fail-open","hash_on":"client",
            "http":{"connect_timeout_ms":1000,"header_timeout_ms":10000,"idle_timeout_ms":60000,
            "response_timeout_ms":30000,"max_header_bytes":65536,"max_headers":100,
            "max_body_bytes":67108864,"retries":2,"eject_after":5,"eject_base_ms":1000,
            "eject_max_ms":30000},
            "active_tier":0,"fail_open":false,"all_down":false,
            "ring_digest":"9afc5d0a1c846c64be9906594de6f24562ca69c01b81c52a163d358603e93b38","backends":[
            {"address":"198.18.1.11","port":80,"tier":0,"weight":100,"effective_weight":10,
             "slow_start":0.5,"state":"drain","healthy":true,"serving":false,"active":true,
             "health":null},
            {"address":"fd00:18::12","port":80,"tier":1,"weight":7}]}"#;
        let svc: Service = serde_json::from_str(text).expect("a service");
        assert_eq!(svc.config.name, "web");
        assert_eq!(svc.active_tier, Some(0));
        assert_eq!(svc.ring_digest.as_ref().map(String::len), Some(64));
        assert!(svc.config.backends.is_empty());
        let live = svc.backends[0].live.as_ref().expect("live fields");
        assert_eq!(live.state, AdminState::Drain);
        assert!(live.healthy);
        assert_eq!(live.health, None);
        assert_eq!(live.slow_start, Some(0.5));
        assert_eq!(svc.backends[1].live, None, "a backend without a view");
        assert_eq!(svc.backends[1].address.to_string(), "fd00:18::12");
        let again: serde_json::Value = serde_json::to_value(&svc).expect("writes");
        let text: serde_json::Value = serde_json::from_str(text).expect("json");
        assert_eq!(again, text);
        assert!(serde_json::from_str::<Service>("{\"a\":}").is_err());

        for text in [
            r#"{"fast_path":false}"#,
            r#"{"fast_path":true,"counters":{"rx":5},"drops":{"no_backend":1},
                "services":{"web":{"packets":4,"bytes":400,
                "backends":{"198.18.2.11:80":{"packets":4,"bytes":400}}}}}"#,
            r#"{"fast_path":true,"counters":{"rx":2},"drops":{"filter_deny":1},
                "filter_drops":{"203.0.113.0/24":1,"not_allowed":0},"services":{}}"#,
            r#"{"fast_path":false,"l7":{"shop":{"serving":true,"http_requests":3,
                "cache_hits":1,"cache":{"entries":1,"bytes":10},"backends":[{"backend":
                "198.18.2.21:8080","weight":100,"in_flight":0,"ejected":false,
                "consecutive_failures":0}]},"idle":{"serving":false,"http_requests":0,
                "cache_hits":0,"cache":null,"backends":[]}}}"#,
        ] {
            let stats: Stats = serde_json::from_str(text).expect(text);
            let text: serde_json::Value = serde_json::from_str(text).expect("json");
            assert_eq!(serde_json::to_value(&stats).expect("writes"), text);
        }
    }
}
