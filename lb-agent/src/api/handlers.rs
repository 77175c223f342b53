//! The API's handlers: parse the request, lock the [`Control`], call it, and show the
//! result (see the [module docs](super) for the routes and shapes).

use std::{collections::BTreeMap, net::IpAddr};

use axum::{
    Json,
    extract::{Path, State},
    http::{Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiJson, ApiState};
use crate::{
    config::{BackendConfig, ServiceConfig},
    control::Control,
    health::Status,
    state::{AdminState, BackendOverride, BackendView, ServiceView},
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

fn backend_json(service: &str, b: &BackendView, health: &HealthIndex) -> Value {
    let mut v = serde_json::to_value(b).expect("a view serialises");
    let status = health
        .get(&(service.to_owned(), b.address, b.port))
        .map_or(Value::Null, |s| {
            serde_json::to_value(s).expect("a status serialises")
        });
    v["health"] = status;
    v
}

/// A service's config (TOML key names) plus its live view.
fn service_json(control: &Control, svc: &ServiceConfig, health: &HealthIndex) -> Value {
    let mut v = serde_json::to_value(svc).expect("a service serialises");
    let obj = v.as_object_mut().expect("a service is an object");
    obj.remove("backend");
    let view = control.view(&svc.name);
    let backends: Vec<Value> = match view {
        Some(view) => view
            .backends
            .iter()
            .map(|b| backend_json(&svc.name, b, health))
            .collect(),
        None => svc
            .backends
            .iter()
            .map(|b| serde_json::to_value(b).expect("a backend serialises"))
            .collect(),
    };
    obj.insert(
        "active_tier".into(),
        json!(view.and_then(|v| v.active_tier)),
    );
    obj.insert("fail_open".into(), json!(view.is_some_and(|v| v.fail_open)));
    obj.insert("all_down".into(), json!(view.is_some_and(|v| v.all_down)));
    obj.insert("backends".into(), Value::Array(backends));
    v
}

fn one_service(control: &Control, name: &str) -> ApiResult<Value> {
    let svc = control
        .service(name)
        .ok_or_else(|| ApiError::not_found(format!("service {name} not found")))?;
    Ok(service_json(control, svc, &health_index(control)))
}

fn one_backend(control: &Control, name: &str, address: IpAddr, port: Option<u16>) -> Value {
    let view: Option<&ServiceView> = control.view(name);
    view.and_then(|v| {
        v.backends
            .iter()
            .find(|b| b.address == address && port.is_none_or(|p| b.port == p))
    })
    .map_or(Value::Null, |b| {
        backend_json(name, b, &health_index(control))
    })
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

pub async fn list_services(State(state): State<ApiState>) -> ApiResult<Json<Value>> {
    let control = state.lock().await?;
    let health = health_index(&control);
    let services: Vec<Value> = control
        .config()
        .services
        .iter()
        .map(|s| service_json(&control, s, &health))
        .collect();
    Ok(Json(json!({ "services": services })))
}

pub async fn get_service(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let control = state.lock().await?;
    Ok(Json(one_service(&control, &name)?))
}

pub async fn create_service(
    State(state): State<ApiState>,
    ApiJson(svc): ApiJson<ServiceConfig>,
) -> ApiResult {
    let mut control = state.lock().await?;
    let name = svc.name.clone();
    control.create_service(svc)?;
    tracing::info!(service = %name, "service created through the API");
    let body = one_service(&control, &name)?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/api/v1/services/{name}"))],
        Json(body),
    )
        .into_response())
}

pub async fn replace_service(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    ApiJson(svc): ApiJson<ServiceConfig>,
) -> ApiResult<Json<Value>> {
    let mut control = state.lock().await?;
    control.replace_service(&name, svc)?;
    tracing::info!(service = %name, "service replaced through the API");
    Ok(Json(one_service(&control, &name)?))
}

pub async fn delete_service(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let mut control = state.lock().await?;
    control.delete_service(&name)?;
    tracing::info!(service = %name, "service deleted through the API");
    Ok(StatusCode::NO_CONTENT)
}

/// `POST .../backends`: a `backend` entry of `[[service]]`, with the same defaults.
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
    control.add_backend(&name, backend)?;
    tracing::info!(service = %name, backend = %address, port, "backend added through the API");
    let body = one_backend(&control, &name, address, Some(port));
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// `PATCH .../backends/{address}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendPatch {
    pub weight: Option<u32>,
    pub state: Option<AdminState>,
}

pub async fn patch_backend(
    State(state): State<ApiState>,
    Path((name, address)): Path<(String, String)>,
    ApiJson(patch): ApiJson<BackendPatch>,
) -> ApiResult<Json<Value>> {
    let address = parse_address(&address)?;
    let mut control = state.lock().await?;
    control.patch_backend(
        &name,
        address,
        BackendOverride {
            state: patch.state,
            weight: patch.weight,
        },
    )?;
    tracing::info!(service = %name, backend = %address, state = ?patch.state, weight = ?patch.weight, "backend changed through the API");
    Ok(Json(one_backend(&control, &name, address, None)))
}

pub async fn remove_backend(
    State(state): State<ApiState>,
    Path((name, address)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let address = parse_address(&address)?;
    let mut control = state.lock().await?;
    control.remove_backend(&name, address)?;
    tracing::info!(service = %name, backend = %address, "backend removed through the API");
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /api/v1/stats`: the fast path's counters when there is one; nothing made up
/// when there is not (`"fast_path": false`).
pub async fn stats(State(state): State<ApiState>) -> ApiResult<Json<Value>> {
    let control = state.lock().await?;
    let mut body = match control.snapshot() {
        Some(snapshot) => {
            let mut v = serde_json::to_value(&snapshot).expect("a snapshot serialises");
            v["fast_path"] = json!(true);
            v
        }
        None => json!({ "fast_path": false }),
    };
    // The L7 services: requests, cache hits, and each backend's state in the pool.
    let mut l7 = serde_json::Map::new();
    for svc in control
        .config()
        .services
        .iter()
        .filter(|s| s.mode == crate::config::Mode::L7)
    {
        let totals = state.metrics.http.service_totals(&svc.name);
        let running = state.l7.get(&svc.name);
        let backends: Vec<Value> = running
            .as_ref()
            .map(|r| {
                r.pool_snapshot()
                    .iter()
                    .map(|b| {
                        json!({
                            "backend": b.addr.to_string(),
                            "weight": b.weight,
                            "in_flight": b.in_flight,
                            "ejected": b.ejected,
                            "consecutive_failures": b.consecutive_failures,
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let cache = running.as_ref().and_then(|r| r.cache_usage());
        l7.insert(
            svc.name.clone(),
            json!({
                "serving": running.is_some(),
                "http_requests": totals.requests,
                "cache_hits": totals.cache_hits,
                "cache": cache.map(|(entries, bytes)| json!({"entries": entries, "bytes": bytes})),
                "backends": backends,
            }),
        );
    }
    if !l7.is_empty() {
        body["l7"] = Value::Object(l7);
    }
    // Whether the last accepted change is in the fast path's maps (a failed write is
    // retried): shown where there is a fast path, or once a write has failed.
    let sync = control.dataplane_status();
    if body["fast_path"] == true || sync.failures_total > 0 {
        body["dataplane"] = serde_json::to_value(sync).expect("a sync status serialises");
    }
    Ok(Json(body))
}

/// `POST /api/v1/services/{name}/cache/purge` with an optional body
/// `{"path": "/p", "prefix": true}`: drop the service's cached responses (all of them
/// without a path).
pub async fn purge_cache(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    let req: PurgeRequest = if body.iter().all(u8::is_ascii_whitespace) {
        PurgeRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?
    };
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
    Ok(Json(json!({ "purged": purged })))
}

/// Body of [`purge_cache`].
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurgeRequest {
    /// Only responses for this path (without query); all when absent.
    #[serde(default)]
    pub path: Option<String>,
    /// Every path starting with `path`.
    #[serde(default)]
    pub prefix: bool,
}

pub async fn reload(State(state): State<ApiState>) -> ApiResult<Json<Value>> {
    let mut control = state.lock().await?;
    control.reload(&state.config_path)?;
    tracing::info!(config = %state.config_path.display(), "config reloaded through the API");
    Ok(Json(json!({
        "status": "reloaded",
        "services": control.config().services.len(),
    })))
}

pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

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
