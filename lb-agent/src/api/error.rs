//! The API's errors: every failure is JSON `{"error": "..."}` with a status that says
//! whose fault it is (DESIGN.md "REST API"), including bodies that do not parse.

use axum::{
    Json,
    body::Bytes,
    extract::{FromRequest, Request},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::de::DeserializeOwned;

use crate::control::ControlError;

/// A failed request: a status and a message for `{"error": message}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token (send \"Authorization: Bearer <token>\")",
        )
    }

    pub fn busy() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the control plane is busy; try again",
        )
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        let status = match &e {
            ControlError::Invalid(_) => StatusCode::BAD_REQUEST,
            ControlError::NotFound(_) => StatusCode::NOT_FOUND,
            ControlError::Conflict(_) => StatusCode::CONFLICT,
            ControlError::State { .. } | ControlError::Apply(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            ControlError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        if status.is_server_error() {
            tracing::error!(error = %e, "API request failed");
        } else if matches!(e, ControlError::Invalid(_) | ControlError::Conflict(_)) {
            // A refused change changes nothing; the log says what was refused and why.
            tracing::info!(status = status.as_u16(), error = %e, "API change refused");
        }
        Self::new(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(super::types::ErrorBody {
            error: self.message,
        });
        if self.status == StatusCode::UNAUTHORIZED {
            (self.status, [(header::WWW_AUTHENTICATE, "Bearer")], body).into_response()
        } else {
            (self.status, body).into_response()
        }
    }
}

/// A JSON request body whose rejection is an [`ApiError`] (400, naming the problem and
/// where it is, such as `backend[0].weight: invalid type`), not axum's plain text.
/// The `Content-Type` is not required: `curl -d` users forget it.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::bad_request("the request needs a JSON body"));
        }
        let Json(value) = Json::<T>::from_bytes(&bytes).map_err(|e| {
            let text = e.body_text();
            // axum's prefix says nothing the status does not.
            let text = text
                .strip_prefix("Failed to deserialize the JSON body into the target type: ")
                .or_else(|| text.strip_prefix("Failed to parse the request body as JSON: "))
                .unwrap_or(&text);
            ApiError::bad_request(format!("invalid JSON body: {text}"))
        })?;
        Ok(Self(value))
    }
}
