//! `GET /api/v1/filters` and `PUT /api/v1/filters`: the `[security]` table as JSON
//! (same keys), replaced whole. A PUT is validated with the config file's rules, kept
//! in the state file (it then stands in for the file's table, across reloads and
//! restarts) and in the maps within a second.

use axum::{Json, extract::State};

use super::{ApiError, ApiJson, ApiState, types::ErrorBody};
use crate::config::SecurityConfig;

#[utoipa::path(get, path = "/filters", tag = "filters",
    summary = "The source filters in force (`[security]`: deny, allow)",
    responses(
        (status = 200, description = "the filters", body = SecurityConfig),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 503, description = "the control plane is busy", body = ErrorBody),
    ))]
pub async fn get_filters(State(state): State<ApiState>) -> Result<Json<SecurityConfig>, ApiError> {
    let control = state.lock().await?;
    Ok(Json(control.filters().clone()))
}

#[utoipa::path(put, path = "/filters", tag = "filters",
    summary = "Replace the source filters whole (keys left out are empty lists)",
    request_body = SecurityConfig,
    responses(
        (status = 200, description = "the filters as replaced", body = SecurityConfig),
        (status = 400, description = "a prefix that does not parse, has host bits set, is listed twice, or too many", body = ErrorBody),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 500, description = "the state file or the maps could not be written", body = ErrorBody),
        (status = 409, description = "with [cluster]: another node changed it first; nothing changed", body = ErrorBody),
        (status = 503, description = "the control plane is busy, or (with [cluster]) etcd is unreachable: nothing changed", body = ErrorBody),
    ))]
pub async fn replace_filters(
    State(state): State<ApiState>,
    ApiJson(sec): ApiJson<SecurityConfig>,
) -> Result<Json<SecurityConfig>, ApiError> {
    let mut control = state.lock().await?;
    control.replace_filters(sec).await?;
    tracing::info!(filters = ?control.filters(), "source filters replaced through the API");
    Ok(Json(control.filters().clone()))
}
