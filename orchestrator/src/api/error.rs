//! The API's one error type: a status, a stable code and a message for the caller; the
//! cause of an internal error is logged once, here, and never sent.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::app::OpError;
use crate::patch::Diagnostic;
use crate::store::StoreError;

/// What a request is refused or failed with.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// A stable machine-readable code (`unauthorized`, `bad_request`, ...).
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// An internal failure: logged with its cause, answered without it.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        refused_text(&e).unwrap_or_else(|| ApiError::internal(e))
    }
}

/// A text PostgreSQL cannot hold (a NUL byte: SQLSTATE 22021), anywhere in `e`'s causes:
/// the caller's input, so a 400 that says so rather than an internal error.
fn refused_text(e: &(dyn std::error::Error + 'static)) -> Option<ApiError> {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(sqlx::Error::Database(db)) = c.downcast_ref::<sqlx::Error>()
            && db.code().as_deref() == Some("22021")
        {
            return Some(ApiError::bad_request(
                "the request holds a NUL byte (\\0, %00), which no name or text Certo keeps may hold",
            ));
        }
        cause = c.source();
    }
    None
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // Plain text: the guest harness is a busybox shell. The code travels in a header.
        (
            self.status,
            [
                ("content-type", "text/plain; charset=utf-8"),
                ("x-certo-error", self.code),
            ],
            format!("{}\n", self.message),
        )
            .into_response()
    }
}

/// A plain-text answer (the guest protocol).
pub fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (
        status,
        [("content-type", "text/plain; charset=utf-8")],
        body.into(),
    )
        .into_response()
}

/// An error of the people's API (`/api/v1/` outside the guest and host protocols), as
/// JSON: `{"error": {"code", "message", "diagnostics"}}`. The code is stable; a refused
/// submission carries the same `FILE:LINE:COL` diagnostics as the CLI prints.
#[derive(Debug)]
pub struct JsonError {
    pub error: ApiError,
    pub diagnostics: Vec<Diagnostic>,
}

/// The body of every error of the people's API.
#[derive(Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable: `bad_request`, `unauthorized`, `forbidden`, `not_found`, `refused`,
    /// `invalid_record`, `conflict`, `not_yours`, `internal`.
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub diagnostics: Vec<Diagnostic>,
}

impl JsonError {
    pub fn with_diagnostics(error: ApiError, diagnostics: Vec<Diagnostic>) -> Self {
        JsonError { error, diagnostics }
    }
}

impl From<ApiError> for JsonError {
    fn from(error: ApiError) -> Self {
        JsonError {
            error,
            diagnostics: Vec::new(),
        }
    }
}

impl From<StoreError> for JsonError {
    fn from(e: StoreError) -> Self {
        ApiError::from(e).into()
    }
}

impl From<OpError> for JsonError {
    fn from(e: OpError) -> Self {
        match e {
            OpError::Refused(m) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "refused", m),
            OpError::NotFound(m) => ApiError::not_found(m),
            OpError::Forbidden(m) => ApiError::forbidden(m),
            OpError::App(crate::app::AppError::NotFound(m)) => ApiError::not_found(m),
            OpError::App(e) => refused_text(&e).unwrap_or_else(|| ApiError::internal(e)),
        }
        .into()
    }
}

impl From<axum::extract::rejection::QueryRejection> for JsonError {
    fn from(e: axum::extract::rejection::QueryRejection) -> Self {
        ApiError::bad_request(format!("the query string: {}", e.body_text())).into()
    }
}

impl From<axum::extract::rejection::JsonRejection> for JsonError {
    fn from(e: axum::extract::rejection::JsonRejection) -> Self {
        ApiError::new(
            e.status(),
            "bad_request",
            format!("the body: {}", e.body_text()),
        )
        .into()
    }
}

impl From<axum::extract::rejection::PathRejection> for JsonError {
    fn from(e: axum::extract::rejection::PathRejection) -> Self {
        ApiError::bad_request(format!("the path: {}", e.body_text())).into()
    }
}

impl IntoResponse for JsonError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.error.code.to_owned(),
                message: self.error.message,
                diagnostics: self.diagnostics,
            },
        };
        (self.error.status, axum::Json(body)).into_response()
    }
}
