//! `certo serve`: the orchestrator's HTTP API, one module per resource.
//!
//! - [`hosts`]: a host (`certo agent --orchestrator URL`) registers, sends heartbeats and
//!   reads its own record with its own token; a heartbeat answers with the host's live VMs,
//!   so the agent reaps any other domain.
//! - [`guest`]: the harness inside a VM, with a token made for that VM alone: join
//!   (hostname and test plan), services, results, log, done, its view of the testbed.
//! - [`vms`]: a VM's record and results, for the host that runs it or the VM itself.
//! - [`testbed`]: the registry's health checks.
//!
//! Every route authenticates through an extractor of [`auth`] (so a handler cannot forget),
//! answers with view types (never database rows) and fails with [`error::ApiError`], which
//! hides internals. Reads for people (lists of hosts, the whole testbed) come with users
//! and roles.

pub mod admin;
pub mod auth;
pub mod error;
pub mod guest;
pub mod hosts;
pub mod metrics;
pub mod patches;
pub mod runs;
pub mod sweeps;
pub mod testbed;
pub mod vms;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;

use crate::store::Store;

pub use guest::hostname_for;
pub use testbed::check_health;

/// Largest body the API accepts (test output included).
const MAX_BODY: usize = 256 * 1024;

/// What every handler shares: the store, and for the people's API (`certo serve`) the
/// application context (the catalogue, the package repositories, starting runs).
#[derive(Debug, Clone)]
pub struct ApiState {
    pub store: Store,
    pub app: Option<crate::app::Context>,
    /// The dashboard's pages may be read without signing in (`--public-dashboard`).
    pub public_dashboard: bool,
}

impl ApiState {
    /// The guest and host protocols only (a worker's own guest API, `certo vm run`).
    pub fn protocols(store: Store) -> ApiState {
        ApiState {
            store,
            app: None,
            public_dashboard: false,
        }
    }

    /// Everything: the protocols and the people's API.
    pub fn full(app: crate::app::Context, store: Store) -> ApiState {
        ApiState {
            store,
            app: Some(app),
            public_dashboard: false,
        }
    }

    /// The application context, for the people's API.
    pub fn app(&self) -> Result<&crate::app::Context, error::JsonError> {
        self.app.as_ref().ok_or_else(|| {
            error::ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "not_found",
                "this server speaks only the guest and host protocols; the people's API is `certo serve`'s",
            )
            .into()
        })
    }
}

/// The OpenAPI document's frame: title, version, the three kinds of bearer token.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "Certo", description = "Certo's HTTP API: the people's API (certifiers and admins, with user tokens), the host protocol (host tokens) and the guest protocol (VM tokens and session keys)."),
    modifiers(&Tokens),
)]
struct ApiDoc;

struct Tokens;

impl utoipa::Modify for Tokens {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        for (name, what) in [
            ("token", "A user's token (`certo user add`)"),
            ("host_token", "A host's token (`certo host add`)"),
            (
                "vm_token",
                "A VM's token, or the session key its join returned (with X-Certo-VM)",
            ),
        ] {
            components.add_security_scheme(
                name,
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some(what))
                        .build(),
                ),
            );
        }
    }
}

/// Every route with its OpenAPI description: the router and the document are made from
/// the same handlers, so the document cannot leave a route out.
fn api() -> utoipa_axum::router::OpenApiRouter<Arc<ApiState>> {
    use utoipa::OpenApi;
    utoipa_axum::router::OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(hosts::routes())
        .merge(guest::routes())
        .merge(vms::routes())
        .merge(
            patches::routes()
                .layer(axum::middleware::from_fn(objects_only))
                .layer(axum::extract::DefaultBodyLimit::max(
                    crate::patch::limits::MAX_UPLOAD_BYTES,
                )),
        )
        .merge(runs::routes())
        .merge(sweeps::routes().layer(axum::middleware::from_fn(objects_only)))
        .merge(admin::routes().layer(axum::middleware::from_fn(objects_only)))
        .merge(metrics::routes())
        .routes(utoipa_axum::routes!(openapi_json))
}

/// Refuses a JSON body that is not an object: every body the people's API takes is one,
/// and serde would read an array as a struct's fields in order. The route's own body limit
/// still applies when its handler reads the body.
async fn objects_only(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let json = req
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let most = crate::patch::limits::MAX_UPLOAD_BYTES.max(MAX_BODY);
    let bytes = match axum::body::to_bytes(body, most).await {
        Ok(b) => b,
        Err(_) => {
            return error::JsonError::from(error::ApiError::new(
                axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                "bad_request",
                format!("the body: larger than the {most} bytes a body may be, or cut short"),
            ))
            .into_response();
        }
    };
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return error::JsonError::from(error::ApiError::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            "bad_request",
            "the body: a JSON object is wanted",
        ))
        .into_response();
    }
    next.run(axum::extract::Request::from_parts(
        parts,
        axum::body::Body::from(bytes),
    ))
    .await
}

/// This document. It needs no credential: it says what the API is, not what is stored.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object)),
    security(()))]
async fn openapi_json() -> axum::Json<utoipa::openapi::OpenApi> {
    static DOC: std::sync::OnceLock<utoipa::openapi::OpenApi> = std::sync::OnceLock::new();
    axum::Json(DOC.get_or_init(openapi).clone())
}

/// The OpenAPI document (`/api/v1/openapi.json`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = api().into_openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    common_errors(&mut doc);
    doc
}

/// The refusals every route can give before its handler runs, added to each operation
/// that does not describe them itself: 400 for a path or query that cannot be read, 401
/// for a missing, wrong or revoked credential, and for a body 413 (too large), 415 (not
/// JSON) and 422 (JSON, but not the route's shape). The people's API answers them as an
/// `ErrorBody`; the host and guest protocols as plain text.
fn common_errors(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
    for item in doc.paths.paths.values_mut() {
        for op in [
            &mut item.get,
            &mut item.post,
            &mut item.put,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            let protocol = op
                .tags
                .iter()
                .flatten()
                .any(|t| t == "guest" || t == "host protocol");
            let secured = op.security.iter().flatten().any(|r| {
                serde_json::to_value(r).is_ok_and(|v| v.as_object().is_some_and(|o| !o.is_empty()))
            });
            let takes_input = op.parameters.as_ref().is_some_and(|p| !p.is_empty());
            let body = op.request_body.is_some();
            let json_body = op
                .request_body
                .as_ref()
                .is_some_and(|b| b.content.contains_key("application/json"));
            let mut add = Vec::new();
            if takes_input || body {
                add.push((
                    "400",
                    "The path, query or body cannot be read (`bad_request`)",
                ));
            }
            if secured {
                add.push(("401", "No credential, or one that is wrong or revoked"));
            }
            if body {
                add.push(("413", "The body is larger than the route takes"));
            }
            if json_body {
                add.push((
                    "415",
                    "The body is not JSON (`Content-Type: application/json`)",
                ));
                add.push(("422", "The body is JSON, but not of the route's shape"));
            }
            for (status, what) in add {
                if op.responses.responses.contains_key(status) {
                    continue;
                }
                let content = if protocol {
                    ContentBuilder::new()
                        .schema(Some(utoipa::openapi::schema::Object::with_type(
                            utoipa::openapi::schema::Type::String,
                        )))
                        .build()
                } else {
                    ContentBuilder::new()
                        .schema(Some(RefOr::Ref(Ref::from_schema_name("ErrorBody"))))
                        .build()
                };
                let mime = if protocol {
                    "text/plain"
                } else {
                    "application/json"
                };
                op.responses.responses.insert(
                    status.to_owned(),
                    RefOr::T(
                        ResponseBuilder::new()
                            .description(what)
                            .content(mime, content)
                            .build(),
                    ),
                );
            }
        }
    }
}

/// SHA-256 of a token, hex (what the store keeps instead of the token).
pub fn token_digest(token: &str) -> String {
    certo_proto::token::digest(token)
}

/// Equal in time independent of where the strings differ (secrets).
fn same(a: &str, b: &str) -> bool {
    certo_proto::token::same(a.as_bytes(), b.as_bytes())
}

pub use certo_proto::token::new_token;

/// The API router.
pub fn router(state: ApiState) -> Router {
    router_of(Arc::new(state))
}

/// The API router over shared state (the dashboard merges its pages into it).
pub fn router_of(state: Arc<ApiState>) -> Router {
    let (routes, _) = api().split_for_parts();
    routes
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Serves until `shutdown` resolves; checks shared services' health every `health_every`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    health_every: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let store = state.store.clone();
    serve_router(listener, router(state), store, health_every, shutdown).await
}

/// Serves `app` (the API, or the API and the dashboard) until `shutdown` resolves, with the
/// API's background checks over `store`.
pub async fn serve_router(
    listener: tokio::net::TcpListener,
    app: Router,
    store: Store,
    health_every: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let checker = tokio::spawn(testbed::health_loop(store.clone(), health_every));
    let sweeper = tokio::spawn(guest::sweep_loop(store, health_every));
    // Bounded like the agent: connection and in-flight caps, header, idle and body deadlines.
    let result = certo_transfer::http::serve(
        listener,
        app,
        // A dashboard under a hundred connections queues on the store's pool rather than
        // being answered 503; the caps still bound what one server holds.
        certo_transfer::http::Limits {
            max_connections: 1024,
            max_in_flight: 256,
            ..certo_transfer::http::Limits::default()
        },
        shutdown,
    )
    .await;
    checker.abort();
    sweeper.abort();
    result
}
