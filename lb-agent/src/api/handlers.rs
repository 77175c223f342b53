//! The API's handlers: parse the request, lock the [`Control`], call it, and show the
//! result as one of the [`types`](super::types) (see the [module docs](super) for the
//! routes). Each handler's `#[utoipa::path]` is its entry in the OpenAPI document; the
//! router registers the handler and that entry together.

use std::{collections::BTreeMap, net::IpAddr};

use axum::{
    Json,
    extract::{Path, State},
    http::{Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};

use super::{
    ApiError, ApiJson, ApiState,
    types::{
        Backend, BackendPatch, CacheUsage, ErrorBody, FastPathStats, Healthz, L7Backend, L7Stats,
        NodeStatus, PurgeRequest, PurgeResponse, ReloadRequest, ReloadResponse, Service,
        ServiceList, Stats,
    },
};
use crate::{
    config::{BackendConfig, ServiceConfig},
    control::Control,
    health::Status,
    state::{BackendOverride, BackendView},
};

type ApiResult<T = Response> = Result<T, ApiError>;

/// Health status of every target, by (service, address, port).
type HealthIndex = BTreeMap<(String, IpAddr, u16), Status>;

fn health_index(control: &Control) -> HealthIndex {
    control
        .health_status()
        .into_iter()
        .map(|(k, s)| ((k.service, k.address, k.port), s))
        .collect()
}

fn backend_of(service: &str, b: &BackendView, health: &HealthIndex) -> Backend {
    let status = health
        .get(&(service.to_owned(), b.address, b.port))
        .cloned();
    Backend::live(b, status)
}

/// A service's config (TOML key names) plus its live view.
fn service_of(control: &Control, svc: &ServiceConfig, health: &HealthIndex) -> Service {
    let view = control.view(&svc.name);
    let backends = match view {
        Some(view) => view
            .backends
            .iter()
            .map(|b| backend_of(&svc.name, b, health))
            .collect(),
        None => svc.backends.iter().map(Backend::configured).collect(),
    };
    Service {
        // The live list replaces the config's `backend` (an empty one is not shown).
        config: ServiceConfig {
            backends: Vec::new(),
            ..svc.clone()
        },
        active_tier: view.and_then(|v| v.active_tier),
        fail_open: view.is_some_and(|v| v.fail_open),
        all_down: view.is_some_and(|v| v.all_down),
        backends,
        ring_digest: control.ring_digest(&svc.name),
    }
}

fn one_service(control: &Control, name: &str) -> ApiResult<Service> {
    let svc = control
        .service(name)
        .ok_or_else(|| ApiError::not_found(format!("service {name} not found")))?;
    Ok(service_of(control, svc, &health_index(control)))
}

/// The live view of a backend; None (`null`) when the service has no view of it.
fn one_backend(
    control: &Control,
    name: &str,
    address: IpAddr,
    port: Option<u16>,
) -> Option<Backend> {
    control
        .view(name)?
        .backends
        .iter()
        .find(|b| b.address == address && port.is_none_or(|p| b.port == p))
        .map(|b| backend_of(name, b, &health_index(control)))
}

fn parse_address(text: &str) -> ApiResult<IpAddr> {
    let bare = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    bare.parse().map_err(|_| {
        ApiError::bad_request(format!(
            "{text:?} in the path is not an IP address (give the backend's address without port)"
        ))
    })
}

/// A JSON body that may be left out (empty or only whitespace: the defaults).
fn optional_json<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> ApiResult<T> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// The `{name}` path parameter.
const NAME: &str = "the service's name";
/// The `{address}` path parameter.
const ADDRESS: &str = "the backend's address, without port (IPv6 with or without brackets)";

#[utoipa::path(get, path = "/services", tag = "services",
    summary = "Every service, with its backends, their health and weights",
    responses(
        (status = 200, description = "every service", body = ServiceList),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 503, description = "the control plane is busy", body = ErrorBody),
    ))]
pub async fn list_services(State(state): State<ApiState>) -> ApiResult<Json<ServiceList>> {
    let control = state.lock().await?;
    let health = health_index(&control);
    let services = control
        .config()
        .services
        .iter()
        .map(|s| service_of(&control, s, &health))
        .collect();
    Ok(Json(ServiceList { services }))
}

#[utoipa::path(get, path = "/services/{name}", tag = "services",
    summary = "One service",
    params(("name" = String, Path, description = NAME)),
    responses(
        (status = 200, description = "the service", body = Service),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no such service", body = ErrorBody),
        (status = 503, description = "the control plane is busy", body = ErrorBody),
    ))]
pub async fn get_service(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Service>> {
    let control = state.lock().await?;
    Ok(Json(one_service(&control, &name)?))
}

#[utoipa::path(post, path = "/services", tag = "services",
    summary = "Create a service (the fields of a `[[service]]` table, same defaults)",
    request_body = ServiceConfig,
    responses(
        (status = 201, description = "created; `Location` names it", body = Service),
        (status = 400, description = "invalid service or body", body = ErrorBody),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 409, description = "a service of that name exists already", body = ErrorBody),
        (status = 500, description = "the state file or the maps could not be written", body = ErrorBody),
        (status = 503, description = "the control plane is busy, or (with [cluster]) etcd is unreachable: nothing changed", body = ErrorBody),
    ))]
pub async fn create_service(
    State(state): State<ApiState>,
    ApiJson(svc): ApiJson<ServiceConfig>,
) -> ApiResult {
    let mut control = state.lock().await?;
    let name = svc.name.clone();
    control.create_service(svc).await?;
    tracing::info!(service = %name, "service created through the API");
    let body = one_service(&control, &name)?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/api/v1/services/{name}"))],
        Json(body),
    )
        .into_response())
}

#[utoipa::path(put, path = "/services/{name}", tag = "services",
    summary = "Replace a service (the body names the same service)",
    params(("name" = String, Path, description = NAME)),
    request_body = ServiceConfig,
    responses(
        (status = 200, description = "the service as replaced", body = Service),
        (status = 400, description = "invalid service or body, or another name", body = ErrorBody),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no such service", body = ErrorBody),
        (status = 500, description = "the state file or the maps could not be written", body = ErrorBody),
        (status = 409, description = "with [cluster]: another node changed it first; nothing changed", body = ErrorBody),
        (status = 503, description = "the control plane is busy, or (with [cluster]) etcd is unreachable: nothing changed", body = ErrorBody),
    ))]
pub async fn replace_service(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    ApiJson(svc): ApiJson<ServiceConfig>,
) -> ApiResult<Json<Service>> {
    let mut control = state.lock().await?;
    control.replace_service(&name, svc).await?;
    tracing::info!(service = %name, "service replaced through the API");
    Ok(Json(one_service(&control, &name)?))
}

#[utoipa::path(delete, path = "/services/{name}", tag = "services",
    summary = "Delete a service",
    params(("name" = String, Path, description = NAME)),
    responses(
        (status = 204, description = "deleted"),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no such service", body = ErrorBody),
        (status = 500, description = "the state file or the maps could not be written", body = ErrorBody),
        (status = 409, description = "with [cluster]: another node changed it first; nothing changed", body = ErrorBody),
        (status = 503, description = "the control plane is busy, or (with [cluster]) etcd is unreachable: nothing changed", body = ErrorBody),
    ))]
pub async fn delete_service(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let mut control = state.lock().await?;
    control.delete_service(&name).await?;
    tracing::info!(service = %name, "service deleted through the API");
    Ok(StatusCode::NO_CONTENT)
}

/// `POST .../backends`: a `backend` entry of `[[service]]`, with the same defaults.
#[utoipa::path(post, path = "/services/{name}/backends", tag = "backends",
    summary = "Add a backend (a `backend` entry of `[[service]]`, same defaults)",
    params(("name" = String, Path, description = NAME)),
    request_body = BackendConfig,
    responses(
        (status = 201, description = "added; its live view (null if the service has none yet)", body = Option<Backend>),
        (status = 400, description = "invalid backend or body", body = ErrorBody),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no such service", body = ErrorBody),
        (status = 409, description = "the service has this backend already", body = ErrorBody),
        (status = 500, description = "the state file or the maps could not be written", body = ErrorBody),
        (status = 503, description = "the control plane is busy, or (with [cluster]) etcd is unreachable: nothing changed", body = ErrorBody),
    ))]
pub async fn add_backend(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    ApiJson(backend): ApiJson<BackendConfig>,
) -> ApiResult {
    let mut control = state.lock().await?;
    let vip_port = control
        .service(&name)
        .ok_or_else(|| ApiError::not_found(format!("service {name} not found")))?
        .vip
        .port();
    let backend = backend.with_default_port(vip_port);
    let (address, port) = (backend.address, backend.port);
    control.add_backend(&name, backend).await?;
    tracing::info!(service = %name, backend = %address, port, "backend added through the API");
    let body = one_backend(&control, &name, address, Some(port));
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

#[utoipa::path(patch, path = "/services/{name}/backends/{address}", tag = "backends",
    summary = "Set a backend's weight and/or state (drain, enabled, disabled)",
    params(
        ("name" = String, Path, description = NAME),
        ("address" = String, Path, description = ADDRESS),
    ),
    request_body = BackendPatch,
    responses(
        (status = 200, description = "its live view (null if the service has none yet)", body = Option<Backend>),
        (status = 400, description = "invalid change, body or address", body = ErrorBody),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no such service or backend", body = ErrorBody),
        (status = 500, description = "the state file or the maps could not be written", body = ErrorBody),
        (status = 409, description = "with [cluster]: another node changed it first; nothing changed", body = ErrorBody),
        (status = 503, description = "the control plane is busy, or (with [cluster]) etcd is unreachable: nothing changed", body = ErrorBody),
    ))]
pub async fn patch_backend(
    State(state): State<ApiState>,
    Path((name, address)): Path<(String, String)>,
    ApiJson(patch): ApiJson<BackendPatch>,
) -> ApiResult<Json<Option<Backend>>> {
    let address = parse_address(&address)?;
    let mut control = state.lock().await?;
    control
        .patch_backend(
            &name,
            address,
            BackendOverride {
                state: patch.state,
                weight: patch.weight,
            },
        )
        .await?;
    tracing::info!(service = %name, backend = %address, state = ?patch.state, weight = ?patch.weight, "backend changed through the API");
    Ok(Json(one_backend(&control, &name, address, None)))
}

#[utoipa::path(delete, path = "/services/{name}/backends/{address}", tag = "backends",
    summary = "Remove a backend",
    params(
        ("name" = String, Path, description = NAME),
        ("address" = String, Path, description = ADDRESS),
    ),
    responses(
        (status = 204, description = "removed"),
        (status = 400, description = "not an address", body = ErrorBody),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no such service or backend", body = ErrorBody),
        (status = 500, description = "the state file or the maps could not be written", body = ErrorBody),
        (status = 409, description = "with [cluster]: another node changed it first; nothing changed", body = ErrorBody),
        (status = 503, description = "the control plane is busy, or (with [cluster]) etcd is unreachable: nothing changed", body = ErrorBody),
    ))]
pub async fn remove_backend(
    State(state): State<ApiState>,
    Path((name, address)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let address = parse_address(&address)?;
    let mut control = state.lock().await?;
    control.remove_backend(&name, address).await?;
    tracing::info!(service = %name, backend = %address, "backend removed through the API");
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /api/v1/stats`: the fast path's counters when there is one; nothing made up
/// when there is not (`"fast_path": false`).
#[utoipa::path(get, path = "/stats", tag = "stats",
    summary = "Fast-path traffic per service and backend, counters, drops; L7 requests and cache",
    responses(
        (status = 200, description = "the counters", body = Stats),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 503, description = "the control plane is busy", body = ErrorBody),
    ))]
pub async fn stats(State(state): State<ApiState>) -> ApiResult<Json<Stats>> {
    let control = state.lock().await?;
    let snapshot = control.snapshot();
    // The L7 services: requests, cache hits, and each backend's state in the pool.
    let l7 = control
        .config()
        .services
        .iter()
        .filter(|s| s.mode == crate::config::Mode::L7)
        .map(|svc| {
            let totals = state.metrics.http.service_totals(&svc.name);
            let running = state.l7.get(&svc.name);
            let stats = L7Stats {
                serving: running.is_some(),
                http_requests: totals.requests,
                cache_hits: totals.cache_hits,
                cache: running
                    .as_ref()
                    .and_then(|r| r.cache_usage())
                    .map(|(entries, bytes)| CacheUsage { entries, bytes }),
                backends: running
                    .as_ref()
                    .map(|r| r.pool_snapshot().iter().map(L7Backend::from).collect())
                    .unwrap_or_default(),
            };
            (svc.name.clone(), stats)
        })
        .collect();
    // Whether the last accepted change is in the fast path's maps (a failed write is
    // retried): shown where there is a fast path, or once a write has failed.
    let sync = control.dataplane_status();
    let dataplane = (snapshot.is_some() || sync.failures_total > 0).then_some(sync);
    Ok(Json(Stats {
        fast_path: snapshot.is_some(),
        traffic: snapshot.map(FastPathStats::from),
        l7,
        dataplane,
    }))
}

/// `POST /api/v1/services/{name}/cache/purge` with an optional body
/// `{"path": "/p", "prefix": true}`: drop the service's cached responses (all of them
/// without a path).
#[utoipa::path(post, path = "/services/{name}/cache/purge", tag = "services",
    summary = "Drop cached responses of an L7 service: one path, a prefix, or (no body) all",
    params(("name" = String, Path, description = NAME)),
    request_body(content = Option<PurgeRequest>, description = "optional: without a body, everything"),
    responses(
        (status = 200, description = "how many cached responses were dropped", body = PurgeResponse),
        (status = 400, description = "invalid body or path", body = ErrorBody),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no such service", body = ErrorBody),
        (status = 409, description = "the service has no cache or is not running", body = ErrorBody),
        (status = 503, description = "the control plane is busy", body = ErrorBody),
    ))]
pub async fn purge_cache(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<PurgeResponse>> {
    let req: PurgeRequest = optional_json(&body)?;
    let control = state.lock().await?;
    let svc = control
        .service(&name)
        .ok_or_else(|| ApiError::not_found(format!("service {name} not found")))?;
    if svc.cache.is_none() {
        return Err(ApiError::conflict(format!(
            "service {name} has no cache (set cache = {{ max_bytes = ... }})"
        )));
    }
    if let Some(p) = &req.path {
        if !p.starts_with('/') {
            return Err(ApiError::bad_request(format!(
                "path must start with '/', found {p:?}"
            )));
        }
    }
    drop(control);
    let running = state
        .l7
        .get(&name)
        .ok_or_else(|| ApiError::conflict(format!("service {name} is not running")))?;
    let purged = running
        .purge_cache(req.path.as_deref(), req.prefix)
        .unwrap_or(0);
    tracing::info!(service = %name, path = ?req.path, prefix = req.prefix, purged, "cache purged through the API");
    Ok(Json(PurgeResponse { purged }))
}

#[utoipa::path(post, path = "/reload", tag = "agent",
    summary = "Re-read the config file (API changes stay on top of it)",
    request_body(content = Option<ReloadRequest>, description = "optional: `{\"allow_empty\": true}` accepts a file that leaves no service"),
    responses(
        (status = 200, description = "the reloaded config is in force; what it added, removed, changed, and which file edits the API's changes shadow", body = ReloadResponse),
        (status = 400, description = "the file or the body is invalid: nothing changed", body = ErrorBody),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 409, description = "the file would remove every service and allow_empty is not set: nothing changed", body = ErrorBody),
        (status = 500, description = "the maps could not be written", body = ErrorBody),
        (status = 503, description = "the control plane is busy, or (with [cluster]) etcd is unreachable: nothing changed", body = ErrorBody),
    ))]
pub async fn reload(
    State(state): State<ApiState>,
    body: axum::body::Bytes,
) -> ApiResult<Json<ReloadResponse>> {
    let req: ReloadRequest = optional_json(&body)?;
    let mut control = state.lock().await?;
    let report = control.reload(&state.config_path, req.allow_empty).await?;
    tracing::info!(config = %state.config_path.display(), "reload asked through the API");
    Ok(Json(ReloadResponse {
        status: "reloaded".to_owned(),
        services: control.config().services.len(),
        added: report.added,
        removed: report.removed,
        changed: report.changed,
        shadowed: report.shadowed,
    }))
}

#[utoipa::path(get, path = "/node", tag = "node",
    summary = "This node's VIP announcements: drained or not, what BIRD took, its last error",
    responses(
        (status = 200, description = "the announcements (`bgp` null without a [bgp] table)", body = NodeStatus),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
    ))]
pub async fn node(State(state): State<ApiState>) -> Json<NodeStatus> {
    Json(NodeStatus {
        bgp: state.bgp.as_ref().map(|node| node.status()),
    })
}

/// The announcer, or 409 without `[bgp]`.
fn bgp_node(state: &ApiState) -> ApiResult<&std::sync::Arc<crate::bgp::BgpNode>> {
    state.bgp.as_ref().ok_or_else(|| {
        ApiError::conflict("this node has no [bgp] table: it announces nothing to drain")
    })
}

/// BIRD did not take the change: 503 with its words.
fn bird_failed(what: &str, e: &str) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("{what} did not reach BIRD (it is tried again every few seconds): {e}"),
    )
}

#[utoipa::path(post, path = "/node/drain", tag = "node",
    summary = "Withdraw every VIP of this node, wait [bgp] drain_s, then answer",
    responses(
        (status = 200, description = "withdrawn, and drain_s has passed", body = NodeStatus),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 409, description = "no [bgp] table", body = ErrorBody),
        (status = 503, description = "BIRD did not take the withdrawal (the node stays drained; retried)", body = ErrorBody),
    ))]
pub async fn drain_node(State(state): State<ApiState>) -> ApiResult<Json<NodeStatus>> {
    let node = bgp_node(&state)?;
    let status = node
        .drain()
        .await
        .map_err(|e| bird_failed("the withdrawal", &e))?;
    Ok(Json(NodeStatus { bgp: Some(status) }))
}

#[utoipa::path(post, path = "/node/undrain", tag = "node",
    summary = "Announce this node's VIPs again after a drain",
    responses(
        (status = 200, description = "announced again", body = NodeStatus),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 409, description = "no [bgp] table", body = ErrorBody),
        (status = 503, description = "BIRD did not take the announcement (retried)", body = ErrorBody),
    ))]
pub async fn undrain_node(State(state): State<ApiState>) -> ApiResult<Json<NodeStatus>> {
    let node = bgp_node(&state)?;
    let status = node
        .undrain()
        .await
        .map_err(|e| bird_failed("the announcement", &e))?;
    Ok(Json(NodeStatus { bgp: Some(status) }))
}

#[utoipa::path(get, path = "/openapi.json", tag = "agent",
    summary = "This document: the API in OpenAPI 3.1",
    responses(
        (status = 200, description = "the OpenAPI document", body = Object),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
    ))]
pub async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        super::OPENAPI_JSON.as_str(),
    )
        .into_response()
}

#[utoipa::path(get, path = "/healthz", tag = "agent", security(()),
    summary = "Liveness of the agent (no token needed)",
    responses((status = 200, description = "the agent is alive", body = Healthz)))]
pub async fn healthz() -> Json<Healthz> {
    Json(Healthz {
        status: "ok".to_owned(),
    })
}

#[utoipa::path(get, path = "/metrics", tag = "agent", security(()),
    summary = "Prometheus metrics, OpenMetrics text (no token needed)",
    responses(
        (status = 200, description = "the metrics", content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8", body = String),
        (status = 503, description = "the control plane is busy", body = ErrorBody),
    ))]
pub async fn metrics(State(state): State<ApiState>) -> ApiResult {
    let control = state.lock().await?;
    let text = state.metrics.render(&control);
    Ok(([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}

pub async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("no such route: {method} {}", uri.path()))
}

pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
}
