//! `GET /api/v1/cluster` (with `[cluster]`: the node, the store, the live members, the
//! revision) and `GET /api/v1/services/{name}/ring` (a ring read back from the fast
//! path, slots named by backend: what two nodes compare slot by slot).

use axum::{
    Json,
    extract::{Path, State},
};

use super::{
    ApiError, ApiState,
    types::{ClusterMember, ClusterStatus, ErrorBody, RingSlots},
};

#[utoipa::path(get, path = "/cluster", tag = "cluster",
    summary = "This node's view of the cluster: the store's state, the live members, the revision",
    responses(
        (status = 200, description = "with [cluster]", body = ClusterStatus),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no [cluster] in the config", body = ErrorBody),
        (status = 503, description = "the control plane is busy", body = ErrorBody),
    ))]
pub async fn cluster_status(
    State(state): State<ApiState>,
) -> Result<Json<ClusterStatus>, ApiError> {
    let control = state.lock().await?;
    let facts = control.cluster_facts().ok_or_else(|| {
        ApiError::not_found("no [cluster] in the config: this node shares no state")
    })?;
    Ok(Json(ClusterStatus {
        node: facts.node,
        store: if facts.connected {
            "connected"
        } else {
            "unreachable"
        }
        .to_owned(),
        error: facts.error.filter(|_| !facts.connected),
        members: facts
            .members
            .into_iter()
            .map(|(node, view)| ClusterMember {
                node,
                published_ms: view.published_ms,
                down: view
                    .down
                    .iter()
                    .flat_map(|(svc, set)| set.iter().map(move |b| format!("{svc}/{b}")))
                    .collect(),
            })
            .collect(),
        revision: facts.revision,
    }))
}

#[utoipa::path(get, path = "/services/{name}/ring", tag = "services",
    summary = "The service's ring read back from the fast path, each slot named by its backend",
    params(("name" = String, Path, description = "the service's name")),
    responses(
        (status = 200, description = "the ring", body = RingSlots),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no such service, or it has no ring in the fast path (l7, no fast path, nobody serving)", body = ErrorBody),
        (status = 500, description = "the map could not be read", body = ErrorBody),
        (status = 503, description = "the control plane is busy", body = ErrorBody),
    ))]
pub async fn ring_slots(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<RingSlots>, ApiError> {
    let control = state.lock().await?;
    if control.service(&name).is_none() {
        return Err(ApiError::not_found(format!("service {name} not found")));
    }
    let slots = control
        .ring_slots(&name)
        .ok_or_else(|| ApiError::not_found(format!("service {name} has no ring in the fast path")))?
        .map_err(|e| {
            ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                format!("{e:#}"),
            )
        })?;
    Ok(Json(RingSlots {
        digest: control.ring_digest(&name),
        service: name,
        slots,
    }))
}
