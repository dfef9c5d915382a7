//! One error type for the HTTP edge, rendered in the caller's dialect:
//! Ollama's `{"error": "..."}` or OpenAI's `{"error": {"message", "type", ...}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::head::queue::QueueError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub dialect: Dialect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Ollama,
    OpenAi,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), dialect: Dialect::Ollama }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn in_dialect(mut self, d: Dialect) -> Self {
        self.dialect = d;
        // OpenAI clients retry on 429; Ollama answers an overloaded server with 503.
        if self.status == StatusCode::SERVICE_UNAVAILABLE && d == Dialect::OpenAi {
            self.status = StatusCode::TOO_MANY_REQUESTS;
        }
        self
    }

    fn openai_type(&self) -> &'static str {
        match self.status {
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_client_error() => "invalid_request_error",
            _ => "api_error",
        }
    }

    /// The JSON body, also used for errors inside a stream.
    pub fn body(&self) -> serde_json::Value {
        match self.dialect {
            Dialect::Ollama => json!({ "error": self.message }),
            Dialect::OpenAi => {
                json!({ "error": { "message": self.message, "type": self.openai_type(), "param": null, "code": null } })
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

impl From<crate::Error> for ApiError {
    fn from(e: crate::Error) -> Self {
        use crate::net::message::ErrorCode;
        use crate::Error as E;
        let status = match &e {
            E::UnknownModel(_) => StatusCode::NOT_FOUND,
            E::ContextOverflow { .. } | E::InvalidRequest(_) | E::Template(_) | E::Tokenizer(_) => StatusCode::BAD_REQUEST,
            E::Fetch { .. } => StatusCode::NOT_FOUND,
            // A node at its limit: the client may retry (503, or 429 for OpenAI clients).
            E::Net(n) if n.code() == Some(ErrorCode::Capacity) => StatusCode::SERVICE_UNAVAILABLE,
            E::Net(n) if n.code() == Some(ErrorCode::Invalid) => StatusCode::BAD_REQUEST,
            // The nodes failed to answer: the fault is past this server.
            E::Net(_) => StatusCode::BAD_GATEWAY,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> Self {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    }
}
