//! The REST API (DESIGN.md "REST API"): an axum router over the [`Control`] that owns
//! the desired state, plus `/healthz` and `/metrics`.
//!
//! | route | does |
//! | --- | --- |
//! | `GET /api/v1/services` | `{"services": [service, ...]}` |
//! | `POST /api/v1/services` | create from a `[[service]]`-shaped body → 201 + service |
//! | `GET /api/v1/services/{name}` | service |
//! | `PUT /api/v1/services/{name}` | replace (body names the same service) → service |
//! | `DELETE /api/v1/services/{name}` | → 204 |
//! | `POST /api/v1/services/{name}/backends` | add `{"address", "port"?, "weight"?, "tier"?}` → 201 + backend |
//! | `PATCH /api/v1/services/{name}/backends/{address}` | `{"weight": N}` and/or `{"state": "drain"\|"enabled"\|"disabled"}` → backend |
//! | `DELETE /api/v1/services/{name}/backends/{address}` | → 204 |
//! | `GET /api/v1/stats` | fast-path traffic per service and backend, global counters, drops; `dataplane`: a map write pending retry |
//! | `POST /api/v1/services/{name}/cache/purge` | `{"path"?, "prefix"?}` or no body → `{"purged": N}` |
//! | `POST /api/v1/reload` | re-read the config file |
//! | `GET /api/v1/cluster` | with `[cluster]`: node, store, members, revision (404 without) |
//! | `GET /api/v1/services/{name}/ring` | the ring read back from the map, slots named by backend |
//! | `GET /api/v1/openapi.json` | this API as an OpenAPI 3.1 document |
//! | `GET /healthz` | liveness, `{"status": "ok"}` |
//! | `GET /metrics` | Prometheus (OpenMetrics) text |
//!
//! The bodies are the structs of [`types`] (request bodies that are config use the
//! config model: [`ServiceConfig`](crate::config::ServiceConfig)); `lb-agent ctl` and
//! the tests read the answers back through the same structs. A service is shown as its
//! config (TOML key names) plus the live view: `active_tier`, `fail_open`, `all_down`,
//! and `backends` (instead of the config's `backend`), each with `address`, `port`,
//! `tier`, `weight` (configured or overridden), `effective_weight` (in the ring now),
//! `slow_start` (while ramping), `state`, `healthy`, `serving`, `active` and `health`
//! (the checker's status of that backend, or null).
//!
//! The OpenAPI document is generated from those types and the handlers'
//! `#[utoipa::path]` attributes; [`utoipa_axum`] registers each handler and its entry
//! together, so the document names exactly the routes the router has (a test checks
//! each one answers, and that every DESIGN.md route is in it).
//!
//! Everything under `/api/v1` requires `Authorization: Bearer <token>` when a token is
//! configured (compared in constant time); `/healthz` and `/metrics` never do, so
//! load balancers and Prometheus can reach them. Errors are `{"error": "..."}` with
//! 400 (invalid change or body), 401, 404, 409, 500 (state file or maps), or 503 when
//! the control plane stays locked for [`crate::control::LOCK_TIMEOUT`]. A rejected
//! change changes nothing.

mod cluster;
mod error;
mod filters;
mod handlers;
#[cfg(test)]
mod tests;
pub mod types;

use std::{
    path::PathBuf,
    sync::{Arc, LazyLock},
};

use axum::{
    Router,
    extract::{Request, State},
    http::header,
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use tokio::sync::{Mutex, MutexGuard};
use utoipa::{
    Modify, OpenApi,
    openapi::security::{Http, HttpAuthScheme, SecurityScheme},
};
use utoipa_axum::{router::OpenApiRouter, routes};

pub use error::{ApiError, ApiJson};

use crate::{control::Control, l7::manager::L7Registry, metrics::Metrics};

/// What every handler shares.
#[derive(Clone)]
pub struct ApiState {
    /// The single owner of desired state.
    pub control: Arc<Mutex<Control>>,
    /// Bearer token required under `/api/v1`; None: no authentication.
    pub token: Option<String>,
    pub metrics: Arc<Metrics>,
    /// The config file `POST /api/v1/reload` re-reads.
    pub config_path: PathBuf,
    /// The running L7 services (cache purge, pool state).
    pub l7: L7Registry,
    /// The VIP announcer, with `[bgp]` (`/api/v1/node`).
    pub bgp: Option<Arc<crate::bgp::BgpNode>>,
}

impl ApiState {
    /// Lock the control plane, or 503 after [`crate::control::LOCK_TIMEOUT`].
    pub async fn lock(&self) -> Result<MutexGuard<'_, Control>, ApiError> {
        tokio::time::timeout(crate::control::LOCK_TIMEOUT, self.control.lock())
            .await
            .map_err(|_| ApiError::busy())
    }
}

/// The document's frame: title, version, the bearer token scheme (required
/// everywhere, except where a route says `security(())`).
#[derive(OpenApi)]
#[openapi(
    info(
        title = "xdplb agent API",
        description = "The REST API of lb-agent: services, backends, stats, reload. \
            Errors are `{\"error\": \"...\"}`; a rejected change changes nothing.",
        license(name = "Apache-2.0 OR MIT"),
    ),
    // Reached only through the `all_or_none` schemas of flattened fields, which utoipa
    // does not follow.
    components(schemas(types::BackendLive, types::HealthStatus, types::FastPathStats)),
    modifiers(&BearerToken),
    security(("bearer" = [])),
    tags(
        (name = "services", description = "services as config plus live view"),
        (name = "backends", description = "a service's backends"),
        (name = "stats", description = "traffic counters"),
        (name = "agent", description = "the agent itself"),
        (name = "node", description = "this LB node's VIP announcements (BGP through BIRD)"),
        (name = "filters", description = "source filters ([security] deny/allow)"),
        (name = "cluster", description = "the LB nodes sharing one desired state in etcd ([cluster])"),
    ),
)]
struct ApiDoc;

/// Adds the `bearer` security scheme (`Authorization: Bearer <token>`).
struct BearerToken;

impl Modify for BearerToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
            );
    }
}

/// The routes with their OpenAPI entries, registered together (without state, the
/// authentication layer and the fallbacks: see [`router`]).
fn routes(auth: Option<&ApiState>) -> (Router<ApiState>, utoipa::openapi::OpenApi) {
    let mut api = OpenApiRouter::<ApiState>::new()
        .routes(routes!(handlers::list_services, handlers::create_service))
        .routes(routes!(
            handlers::get_service,
            handlers::replace_service,
            handlers::delete_service
        ))
        .routes(routes!(handlers::add_backend))
        .routes(routes!(handlers::patch_backend, handlers::remove_backend))
        .routes(routes!(handlers::purge_cache))
        .routes(routes!(handlers::stats))
        .routes(routes!(handlers::reload))
        .routes(routes!(handlers::node))
        .routes(routes!(handlers::drain_node))
        .routes(routes!(handlers::undrain_node))
        .routes(routes!(filters::get_filters, filters::replace_filters))
        .routes(routes!(cluster::cluster_status))
        .routes(routes!(cluster::ring_slots))
        .routes(routes!(handlers::openapi_json));
    if let Some(state) = auth {
        api = api.route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    }
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .nest("/api/v1", api)
        .routes(routes!(handlers::healthz))
        .routes(routes!(handlers::metrics))
        .split_for_parts()
}

/// The API's OpenAPI document, generated from [`types`] and the handlers.
#[must_use]
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes(None).1
}

/// [`openapi`] as served by `GET /api/v1/openapi.json`.
static OPENAPI_JSON: LazyLock<String> = LazyLock::new(|| {
    openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serialises")
});

/// The whole API; see the [module docs](self).
pub fn router(state: ApiState) -> Router {
    routes(Some(&state))
        .0
        .fallback(handlers::no_route)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .with_state(state)
}

/// Require the bearer token, when one is configured.
async fn authenticate(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    if let Some(token) = &state.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

/// Compare without an early exit, so the time taken does not tell how much of a
/// guess was right (the length may show; it is not secret enough to matter).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for (i, y) in b.iter().enumerate() {
        let x = a.get(i).copied().unwrap_or(!*y);
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod auth_tests {
    use super::constant_time_eq;

    #[test]
    fn compares_whole_strings() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secreT", b"secret"));
        assert!(!constant_time_eq(b"secret1", b"secret"));
        assert!(!constant_time_eq(b"secre", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
        assert!(constant_time_eq(b"", b""));
    }
}
