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
//! | `POST /api/v1/reload` | re-read the config file |
//! | `GET /healthz` | liveness, `{"status": "ok"}` |
//! | `GET /metrics` | Prometheus (OpenMetrics) text |
//!
//! A service is shown as its config (TOML key names) plus the live view:
//! `active_tier`, `fail_open`, and `backends` (instead of the config's `backend`), each
//! with `address`, `port`, `weight` (effective), `tier`, `state`, `healthy`, `serving`,
//! `active` and `health` (the checker's status of that backend).
//!
//! Everything under `/api/v1` requires `Authorization: Bearer <token>` when a token is
//! configured (compared in constant time); `/healthz` and `/metrics` never do, so
//! load balancers and Prometheus can reach them. Errors are `{"error": "..."}` with
//! 400 (invalid change or body), 401, 404, 409, 500 (state file or maps), or 503 when
//! the control plane stays locked for [`crate::control::LOCK_TIMEOUT`]. A rejected
//! change changes nothing.

mod error;
mod handlers;
#[cfg(test)]
mod tests;

use std::{path::PathBuf, sync::Arc};

use axum::{
    Router,
    extract::{Request, State},
    http::header,
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, patch, post},
};
use tokio::sync::{Mutex, MutexGuard};

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
}

impl ApiState {
    /// Lock the control plane, or 503 after [`crate::control::LOCK_TIMEOUT`].
    pub async fn lock(&self) -> Result<MutexGuard<'_, Control>, ApiError> {
        tokio::time::timeout(crate::control::LOCK_TIMEOUT, self.control.lock())
            .await
            .map_err(|_| ApiError::busy())
    }
}

/// The whole API; see the [module docs](self).
pub fn router(state: ApiState) -> Router {
    let api = Router::new()
        .route(
            "/services",
            get(handlers::list_services).post(handlers::create_service),
        )
        .route(
            "/services/{name}",
            get(handlers::get_service)
                .put(handlers::replace_service)
                .delete(handlers::delete_service),
        )
        .route("/services/{name}/backends", post(handlers::add_backend))
        .route(
            "/services/{name}/backends/{address}",
            patch(handlers::patch_backend).delete(handlers::remove_backend),
        )
        .route("/services/{name}/cache/purge", post(handlers::purge_cache))
        .route("/stats", get(handlers::stats))
        .route("/reload", post(handlers::reload))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .nest("/api/v1", api)
        .route("/healthz", get(handlers::healthz))
        .route("/metrics", get(handlers::metrics))
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
