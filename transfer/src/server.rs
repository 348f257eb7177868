//! The host side of the protocol: an axum [`Router`] over a [`Repository`].
//!
//! | method and path                   | auth | body → answer                                          |
//! |-----------------------------------|------|--------------------------------------------------------|
//! | `GET /v1/health`                  | no   | → `{"service":"certo-agent","protocol":1}`            |
//! | `POST /v1/blocks/missing?width=&session=&start=` | yes | hashes (32) or prefixes (8) → bitmap, set = lacking; with a session the prefixes are kept, numbered from `start` |
//! | `POST /v1/blocks`                 | yes  | zstd batch (see [`crate::wire`]) → `{stored, present}` |
//! | `PUT /v1/images/{name}?assemble=&form=&session=` | yes | index (full, compact+zstd, or session+zstd) → manifest; 409 if blocks are missing, 410 if the session is unknown |
//! | `GET /v1/images`                  | yes  | → manifests of complete images                         |
//! | `GET /v1/images/{name}`           | yes  | → one manifest                                         |
//!
//! Authentication is `Authorization: Bearer TOKEN`, compared in constant time. Errors are
//! `{"error": "..."}` with a status that tells the client whether retrying can help:
//! 400/401/404/409/413 (the request is wrong), 422 (a body failed to parse or verify: the
//! bytes may have been damaged on the way, so clients retry), 500 (internal, details
//! only in the agent's log), 507 (the repository's disk is full).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// Protocol version announced by `/v1/health` (2: batch v2, push sessions).
pub const PROTOCOL_VERSION: u32 = 2;

/// A push session unused this long is forgotten.
const SESSION_IDLE: Duration = Duration::from_secs(3600);
/// Prefixes kept across all sessions (8 bytes each: 64 MiB).
const SESSION_ENTRIES: usize = 1 << 23;
/// Sessions kept at once, whatever they hold (an empty one costs its map entry: 60,000 of
/// them once made every request 6 times slower). The least recently used go first.
const MAX_SESSIONS: usize = 256;

/// The prefixes each push asked about, in order, so that its commit can refer to them
/// by number ([`crate::BlockIndex::to_session_bytes`]) instead of sending them again.
#[derive(Default)]
struct Sessions(Mutex<HashMap<String, Session>>);

struct Session {
    /// Shared with the commits reading it, which therefore do not copy it (a push asking
    /// again while its commit runs gets a copy of its own).
    asked: Arc<Vec<[u8; PREFIX_LEN]>>,
    touched: Instant,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `prefixes` as numbers `start..`. A gap (the agent restarted during the push)
    /// drops the session: its commit then gets 410 and the sender falls back.
    fn record(&self, id: &str, start: usize, prefixes: &[[u8; PREFIX_LEN]]) {
        let mut map = self.lock();
        map.retain(|_, s| s.touched.elapsed() < SESSION_IDLE);
        let session = map.entry(id.to_owned()).or_insert_with(|| Session {
            asked: Arc::default(),
            touched: Instant::now(),
        });
        if start > session.asked.len() {
            tracing::info!(
                session = id,
                start,
                kept = session.asked.len(),
                "push session has a gap; dropping it"
            );
            map.remove(id);
            return;
        }
        let asked = Arc::make_mut(&mut session.asked);
        asked.truncate(start);
        asked.extend_from_slice(prefixes);
        session.touched = Instant::now();
        // Bounded memory and count: the least recently used sessions go first (this one
        // last).
        while map.len() > MAX_SESSIONS
            || map.values().map(|s| s.asked.len()).sum::<usize>() > SESSION_ENTRIES
        {
            let oldest = map
                .iter()
                .min_by_key(|(k, s)| (k.as_str() == id, s.touched))
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => map.remove(&k),
                None => break,
            };
        }
    }

    fn get(&self, id: &str) -> Option<Arc<Vec<[u8; PREFIX_LEN]>>> {
        self.lock().get(id).map(|s| s.asked.clone())
    }

    fn remove(&self, id: &str) {
        self.lock().remove(id);
    }
}

/// A session id from outside: 16 to 64 lowercase hex digits.
fn valid_session(id: &str) -> Result<&str, ApiError> {
    if (16..=64).contains(&id.len()) && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(id)
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "session must be 16 to 64 lowercase hex digits",
        ))
    }
}

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
    sessions: Arc<Sessions>,
    /// The memory that batches and commits being decoded may take, in KiB.
    budget: Arc<tokio::sync::Semaphore>,
}

/// What batches and index commits being decoded may hold at once (512 MiB): a request
/// reserves its body and the most its decoding can take before its body is read, and waits
/// for room; one that could never fit is refused.
pub const MEMORY_BUDGET: usize = 512 << 20;
/// The most memory one commit of a full index takes beyond its body: the decoded index of
/// an image of MAX_IMAGE_BLOCKS blocks (40 bytes a block: 80 MiB) and the set of its missing
/// hashes.
const COMMIT_MEMORY: usize = 160 << 20;
/// The same for a compact or session index, decoded as the zstd decoder gives it: the
/// decoded index (80 MiB at most), the decoder's window (at most 8 MiB,
/// [`wire::MAX_INDEX_WINDOW_LOG`]) and read buffer. Its prefixes are resolved in place, to
/// blocks the store holds (so none is missing), and the index is written to its file as it
/// is; a session's prefixes are shared, not copied.
const STREAMED_COMMIT_MEMORY: usize = 96 << 20;
// It does cover them (a decoded block is 40 bytes), with 1 MiB to spare.
const _: () = assert!(
    size_of::<crate::BlockEntry>() * crate::block_index::MAX_IMAGE_BLOCKS as usize
        + (1 << wire::MAX_INDEX_WINDOW_LOG)
        + wire::INDEX_READ_BUFFER
        + (1 << 20)
        <= STREAMED_COMMIT_MEMORY
);

/// Reserves room in the budget for a request of `parts` whose body may have up to `max_body`
/// bytes and whose decoding takes up to `extra` more, then reads its body.
async fn reserve_and_read(
    state: &AppState,
    request: Request,
    max_body: usize,
    extra: usize,
) -> Result<(tokio::sync::OwnedSemaphorePermit, Bytes), ApiError> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > max_body) {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body may have at most {max_body} bytes"),
        ));
    }
    let need_kib = (declared.unwrap_or(max_body) + extra).div_ceil(1024);
    let need = u32::try_from(need_kib.min(MEMORY_BUDGET / 1024)).unwrap_or(u32::MAX);
    let permit = state
        .budget
        .clone()
        .acquire_many_owned(need)
        .await
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the agent is stopping"))?;
    let body = axum::body::to_bytes(request.into_body(), max_body)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("reading the body (at most {max_body} bytes): {e}"),
            )
        })?;
    Ok((permit, body))
}

/// The agent's HTTP routes over `repo`, every route but `/v1/health` behind `token`.
pub fn router(repo: Arc<Repository>, token: Token) -> Router {
    let state = AppState {
        repo,
        token,
        sessions: Arc::default(),
        budget: Arc::new(tokio::sync::Semaphore::new(MEMORY_BUDGET / 1024)),
    };
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
            WireError::BatchTooLarge | WireError::IndexTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::UNPROCESSABLE_ENTITY,
        };
        Self::new(status, e.to_string())
    }
}

impl From<RepoError> for ApiError {
    fn from(e: RepoError) -> Self {
        match &e {
            RepoError::Name(_) => Self::new(StatusCode::BAD_REQUEST, e.to_string()),
            RepoError::Index(crate::block_index::IndexError::TooManyBlocks { .. }) => {
                Self::new(StatusCode::PAYLOAD_TOO_LARGE, e.to_string())
            }
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
        .and_then(certo_proto::token::bearer);
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
    session: Option<String>,
    start: Option<usize>,
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
            if let Some(id) = &query.session {
                let start = query.start.ok_or_else(|| {
                    ApiError::new(StatusCode::BAD_REQUEST, "session= needs start=")
                })?;
                state.sessions.record(valid_session(id)?, start, &prefixes);
            }
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
    request: Request,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let (permit, body) =
        reserve_and_read(&state, request, MAX_BATCH_BODY, wire::MAX_BATCH_RAW).await?;
    let repo = state.repo.clone();
    let body_len = body.len();
    blocking(move || {
        let _permit = permit;
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
    session: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum CommitForm {
    #[default]
    Full,
    Compact,
    Session,
}

async fn commit_image(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<CommitQuery>,
    request: Request,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    wire::validate_name(&name)?;
    let repo = state.repo.clone();
    let session = match &query.session {
        Some(id) => Some(valid_session(id)?.to_owned()),
        None => None,
    };
    let asked = match (&query.form, &session) {
        (CommitForm::Session, None) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "form=session needs session=",
            ));
        }
        (CommitForm::Session, Some(id)) => Some(state.sessions.get(id).ok_or_else(|| {
            ApiError::new(
                StatusCode::GONE,
                format!(
                    "push session {id} is unknown here (the agent restarted or the session \
                     expired): commit the compact or full index"
                ),
            )
        })?),
        _ => None,
    };
    let decoding = match query.form {
        CommitForm::Full => COMMIT_MEMORY,
        CommitForm::Compact | CommitForm::Session => STREAMED_COMMIT_MEMORY,
    };
    let (permit, body) = reserve_and_read(&state, request, MAX_INDEX_BODY, decoding).await?;
    let sessions = state.sessions.clone();
    blocking(move || {
        let _permit = permit;
        let manifest = match query.form {
            CommitForm::Full => repo.commit(&name, &body)?,
            // Both decoded as they are decompressed: what the commit holds is the index.
            // Each read twice: first keeping none of its blocks, each resolved as it comes
            // and fed into the digest, so that an index refused (its digest, its blocks
            // missing, its structure) has cost what reading it costs, whatever it expands
            // to; then, to be committed, keeping them.
            CommitForm::Compact => {
                let checked = wire::check_compact_index(&body, |run| repo.resolve_run(run))?
                    .map_err(RepoError::Index)?;
                repo.check_prefixes(&name, checked)?;
                let index = wire::read_compact_index(&body)?.map_err(RepoError::Index)?;
                repo.commit_prefixes(&name, index)?
            }
            CommitForm::Session => {
                let asked = asked.as_deref().map_or(&[][..], Vec::as_slice);
                // Not damage on the way (the zstd frame's checksum held): the session and
                // the index disagree, and only a repair round (the full index) can help.
                let misfit = |e: crate::block_index::IndexError| {
                    ApiError::new(
                        StatusCode::CONFLICT,
                        format!("the session index does not fit the push session: {e}"),
                    )
                };
                let checked = wire::check_session_index(&body, asked, |run| repo.resolve_run(run))?
                    .map_err(misfit)?;
                repo.check_prefixes(&name, checked)?;
                let index = wire::read_session_index(&body, asked)?.map_err(misfit)?;
                repo.commit_prefixes(&name, index)?
            }
        };
        if let Some(id) = &session {
            sessions.remove(id);
        }
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
    crate::http::serve(listener, router, crate::http::Limits::default(), shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_shares_its_session_and_a_later_question_does_not_change_it() {
        let sessions = Sessions::default();
        let id = "00112233445566778899aabbccddeeff";
        sessions.record(id, 0, &[[1; PREFIX_LEN], [2; PREFIX_LEN]]);
        let held = sessions.get(id).expect("kept");
        assert!(Arc::ptr_eq(&held, &sessions.get(id).expect("kept")));
        sessions.record(id, 2, &[[3; PREFIX_LEN]]);
        assert_eq!(held.len(), 2, "what a commit read stays as it was");
        assert_eq!(sessions.get(id).expect("kept").len(), 3);
    }

    #[test]
    fn empty_push_sessions_are_evicted_too() {
        let sessions = Sessions::default();
        for i in 0..10_000u32 {
            sessions.record(&format!("{i:016x}"), 0, &[]);
        }
        assert!(sessions.lock().len() <= MAX_SESSIONS);
        assert!(
            sessions.get(&format!("{:016x}", 9_999)).is_some(),
            "the newest stays"
        );
        assert!(
            sessions.get(&format!("{:016x}", 0)).is_none(),
            "the oldest went"
        );
    }
}
