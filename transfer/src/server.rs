//! The host side of the protocol: an axum [`Router`] over a [`Repository`].
//!
//! | method and path                   | auth | body → answer                                          |
//! |-----------------------------------|------|--------------------------------------------------------|
//! | `GET /v1/health`                  | no   | → `{"service":"certo-agent","protocol":1}`            |
//! | `POST /v1/blocks/missing?width=`  | yes  | hashes (32) or prefixes (8) → bitmap, set = lacking    |
//! | `POST /v1/blocks`                 | yes  | zstd batch (see [`crate::wire`]) → `{stored, present}` |
//! | `PUT /v1/images/{name}?assemble=&form=` | yes | index (full, or compact+zstd) → manifest; 409 if blocks are missing |
//! | `GET /v1/images`                  | yes  | → manifests of complete images                         |
//! | `GET /v1/images/{name}`           | yes  | → one manifest                                         |
//!
//! Authentication is `Authorization: Bearer TOKEN`, compared in constant time. Errors are
//! `{"error": "..."}` with a status that tells the client whether retrying can help:
//! 400/401/404/409/413 (the request is wrong), 422 (a body failed to parse or verify: the
//! bytes may have been damaged on the way, so clients retry), 500 (internal, details
//! only in the agent's log), 507 (the repository's disk is full).

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::Deserialize;
use serde_json::json;

use crate::block_index::PREFIX_LEN;
use crate::repository::{RepoError, Repository};
use crate::wire::{self, Batch, MAX_BATCH_BODY, MAX_INDEX_BODY, MAX_QUERY_HASHES, WireError};

/// Protocol version announced by `/v1/health`.
pub const PROTOCOL_VERSION: u32 = 1;

/// A secret shared by a host's agent and the orchestrator. Never printed.
#[derive(Clone)]
pub struct Token(Arc<str>);

impl Token {
    /// Wraps a token; refuses an empty one or one with whitespace or control characters.
    pub fn new(token: &str) -> Result<Self, &'static str> {
        let token = token.trim_end_matches(['\n', '\r']);
        if token.is_empty() {
            return Err("the token is empty");
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("the token contains whitespace or control characters");
        }
        Ok(Self(token.into()))
    }

    /// The secret itself, for the `Authorization` header.
    pub fn secret(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

#[derive(Clone)]
struct AppState {
    repo: Arc<Repository>,
    token: Token,
}

/// The agent's HTTP routes over `repo`, every route but `/v1/health` behind `token`.
pub fn router(repo: Arc<Repository>, token: Token) -> Router {
    let state = AppState { repo, token };
    let authed = Router::new()
        .route(
            "/v1/blocks/missing",
            post(missing).layer(DefaultBodyLimit::max(MAX_QUERY_HASHES * 32)),
        )
        .route(
            "/v1/blocks",
            post(store_blocks).layer(DefaultBodyLimit::max(MAX_BATCH_BODY)),
        )
        .route("/v1/images", get(list_images))
        .route(
            "/v1/images/{name}",
            put(commit_image)
                .layer(DefaultBodyLimit::max(MAX_INDEX_BODY))
                .get(get_image),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route("/v1/health", get(health))
        .merge(authed)
        .with_state(state)
}

/// An error answer: a status and a message for the client.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(json!({ "error": self.message }))).into_response()
    }
}

impl From<WireError> for ApiError {
    fn from(e: WireError) -> Self {
        // A body that does not parse or verify may have been damaged on the way: 422, which
        // clients retry. A bad name is the caller's mistake: 400.
        let status = match e {
            WireError::BadName { .. } => StatusCode::BAD_REQUEST,
            WireError::BatchTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::UNPROCESSABLE_ENTITY,
        };
        Self::new(status, e.to_string())
    }
}

impl From<RepoError> for ApiError {
    fn from(e: RepoError) -> Self {
        match &e {
            RepoError::Name(_) => Self::new(StatusCode::BAD_REQUEST, e.to_string()),
            RepoError::Index(_)
            | RepoError::HashMismatch { .. }
            | RepoError::BlockTooLong { .. } => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
            }
            RepoError::Incomplete { .. } => Self::new(StatusCode::CONFLICT, e.to_string()),
            RepoError::NotFound { .. } => Self::new(StatusCode::NOT_FOUND, e.to_string()),
            _ if e.is_disk_full() => {
                tracing::error!(error = %e, "repository disk full");
                Self::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "the host's image repository is out of disk space; nothing partial was kept",
                )
            }
            _ => {
                tracing::error!(error = %e, "repository operation failed");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the host's image repository failed (details in the agent's log)",
                )
            }
        }
    }
}

async fn authenticate(
    State(state): State<AppState>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(t) if wire::token_matches(t.as_bytes(), state.token.secret().as_bytes()) => {
            next.run(request).await
        }
        Some(_) => {
            tracing::warn!(path = %request.uri().path(), "refused a request with a wrong token");
            ApiError::new(StatusCode::UNAUTHORIZED, "wrong token").into_response()
        }
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing Authorization: Bearer token (set --token or CERTO_TOKEN)",
        )
        .into_response(),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        tracing::error!(error = %e, "repository task failed");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    })?
}

async fn health() -> impl IntoResponse {
    axum::Json(json!({ "service": "certo-agent", "protocol": PROTOCOL_VERSION }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MissingQuery {
    #[serde(default = "full_width")]
    width: usize,
}

fn full_width() -> usize {
    32
}

async fn missing(
    State(state): State<AppState>,
    Query(query): Query<MissingQuery>,
    body: Bytes,
) -> Result<Vec<u8>, ApiError> {
    let repo = state.repo.clone();
    let bits = match query.width {
        32 => {
            let hashes = wire::decode_query::<32>(&body)?;
            blocking(move || Ok(repo.missing(&hashes))).await?
        }
        PREFIX_LEN => {
            let prefixes = wire::decode_query::<PREFIX_LEN>(&body)?;
            blocking(move || Ok(repo.missing_prefixes(&prefixes))).await?
        }
        other => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("width={other} is not supported (32 or {PREFIX_LEN})"),
            ));
        }
    };
    Ok(wire::encode_bitmap(&bits))
}

async fn store_blocks(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let repo = state.repo.clone();
    let body_len = body.len();
    blocking(move || {
        let started = Instant::now();
        let batch = Batch::decode(&body).inspect_err(|e| {
            tracing::warn!(body_bytes = body_len, error = %e, "refused a block batch");
        })?;
        let outcome = repo.store_batch(&batch)?;
        tracing::debug!(
            body_bytes = body_len,
            stored = outcome.stored,
            present = outcome.present,
            ms = started.elapsed().as_millis() as u64,
            "stored a block batch"
        );
        Ok(axum::Json(json!(outcome)))
    })
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommitQuery {
    #[serde(default)]
    assemble: bool,
    #[serde(default)]
    form: CommitForm,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum CommitForm {
    #[default]
    Full,
    Compact,
}

async fn commit_image(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<CommitQuery>,
    body: Bytes,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    wire::validate_name(&name)?;
    let repo = state.repo.clone();
    blocking(move || {
        let manifest = match query.form {
            CommitForm::Full => repo.commit(&name, &body)?,
            CommitForm::Compact => {
                let raw = wire::decompress_limited(&body, MAX_INDEX_BODY)?;
                repo.commit_compact(&name, &raw)?
            }
        };
        let assembled = if query.assemble {
            Some(repo.assemble(&name)?)
        } else {
            None
        };
        Ok(axum::Json(json!({
            "manifest": manifest,
            "assemble_seconds": assembled.as_ref().map(|a| a.seconds),
        })))
    })
    .await
}

async fn list_images(
    State(state): State<AppState>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let repo = state.repo.clone();
    blocking(move || Ok(axum::Json(json!(repo.images()?)))).await
}

async fn get_image(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    wire::validate_name(&name)?;
    let repo = state.repo.clone();
    blocking(move || Ok(axum::Json(json!(repo.manifest(&name)?)))).await
}

/// Serves `router` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}
