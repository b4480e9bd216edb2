//! The one error shape every endpoint answers with: an HTTP status and a JSON body
//! `{"error": message, "error_type": kind}`, as text-embeddings-inference does. Bad input is
//! always a 4xx; a 5xx means the server itself failed.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// An API error: status, a stable machine-readable kind, and a message for people.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
        }
    }

    /// 400: the body is not JSON, or not base64 where base64 is expected.
    pub fn malformed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "malformed_request", message)
    }

    /// 422: well-formed, but not what the endpoint takes (wrong types, empty lists, limits).
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "validation", message)
    }

    /// 422: an image that cannot be decoded, or too large to decode.
    pub fn image(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_image", message)
    }

    /// 404: an endpoint this model kind does not serve.
    pub fn unsupported(what: &str, kind: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "unsupported",
            format!("{what} is not served for a {kind} model"),
        )
    }

    /// 429: the queue is full.
    pub fn overloaded(capacity: usize) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "overloaded",
            format!("the queue is full ({capacity} jobs); retry later"),
        )
    }

    /// 503: the model is not loaded yet, or the server is stopping.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// 500: the model failed on input that passed validation.
    pub fn backend(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "backend", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": self.message, "error_type": self.kind});
        (self.status, Json(body)).into_response()
    }
}

/// Library errors met while serving: input errors (a bad image, a text the tokenizer refuses)
/// are the client's; the rest are the server's.
impl From<crate::error::Error> for ApiError {
    fn from(e: crate::error::Error) -> Self {
        use crate::error::Error as E;
        match e {
            E::Image { .. } => ApiError::image(e.to_string()),
            E::Input(_) | E::Tokenizer { .. } => ApiError::invalid(e.to_string()),
            other => ApiError::backend(other.to_string()),
        }
    }
}

impl From<candle_core::Error> for ApiError {
    fn from(e: candle_core::Error) -> Self {
        ApiError::from(crate::error::Error::from(e))
    }
}
