//! The dashboard: server-rendered pages (tera templates embedded in the binary), light,
//! usable without JavaScript, no front-end build step. The matrix, the queue (refreshing
//! itself), a patch's page, the hosts; signing in with a user token (an HttpOnly,
//! SameSite=Strict session cookie; forms carry the session's CSRF token).
//!
//! Reading without signing in is the `public` setting (`certo serve --public-dashboard`),
//! off by default; acting (rerun, cancel) always needs a session whose user may act.

mod images;
pub mod page_cache;
mod pages;
pub mod report;

use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};

use crate::api::ApiState;
use crate::store::SessionRow;

/// The session cookie's name.
pub const COOKIE: &str = "certo_session";
/// How long a session acts (seconds): 12 hours.
pub const SESSION_SECONDS: i64 = 12 * 3600;

/// The whole server `certo serve` runs: the API and the dashboard.
pub fn router(state: ApiState) -> Router {
    let state = Arc::new(state);
    crate::api::router_of(state.clone()).merge(
        Router::new()
            .route("/", get(|| async { Redirect::to("/matrix") }))
            .route("/matrix", get(pages::matrix))
            .route("/queue", get(pages::queue))
            .route("/patches/{id}", get(pages::patch))
            .route("/patches/{id}/rerun", post(pages::rerun))
            .route("/patches/{id}/cancel", post(pages::cancel))
            .route("/hosts", get(pages::hosts))
            .route("/sweeps", get(pages::sweep))
            .route("/sweeps/{id}", get(pages::sweep))
            .route("/savings", get(pages::savings))
            .route("/images", get(images::images))
            .route("/images/builds", post(images::build))
            .route("/images/builds/{id}", get(images::build_page))
            .route("/images/{digest}/{format}", get(images::download))
            .route("/login", get(login_form).post(login))
            .route("/logout", post(logout))
            .with_state(state),
    )
}

/// Who is looking: the session's user, if signed in.
#[derive(Debug, Clone)]
pub struct Viewer {
    pub session: Option<SessionRow>,
    key_digest: Option<String>,
}

impl Viewer {
    pub fn name(&self) -> Option<&str> {
        self.session.as_ref().map(|s| s.user.name.as_str())
    }

    pub fn actor(&self) -> Option<crate::app::Actor> {
        self.session.as_ref().map(|s| crate::app::Actor::User {
            name: s.user.name.clone(),
            role: s.user.role,
        })
    }

    /// Refuses a page to a viewer who may not read: not signed in on a dashboard that is
    /// not public.
    fn may_read(&self, state: &ApiState) -> Result<(), Refusal> {
        if self.session.is_some() || state.public_dashboard {
            Ok(())
        } else {
            Err(Refusal::SignIn)
        }
    }

    /// Checks a form's CSRF token against the session's.
    fn check_csrf(&self, presented: &str) -> Result<&SessionRow, Refusal> {
        match &self.session {
            Some(s) if certo_proto::token::same(s.csrf.as_bytes(), presented.as_bytes()) => Ok(s),
            Some(_) => Err(Refusal::StaleForm),
            None => Err(Refusal::SignIn),
        }
    }
}

/// Why a viewer is turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not signed in (where reading or acting needs it): to the sign-in page.
    SignIn,
    /// A form whose CSRF token is not the session's.
    StaleForm,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::SignIn => Redirect::to("/login").into_response(),
            Refusal::StaleForm => page_error(
                StatusCode::FORBIDDEN,
                "this form is stale or not from this dashboard (its CSRF token does not match): reload the page and try again",
            ),
        }
    }
}

/// The value of cookie `name` in a request's headers.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

impl FromRequestParts<Arc<ApiState>> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ApiState>,
    ) -> Result<Self, Response> {
        let Some(key) = cookie(&parts.headers, COOKIE) else {
            return Ok(Viewer {
                session: None,
                key_digest: None,
            });
        };
        let digest = certo_proto::token::digest(key);
        let session = state
            .store
            .session(&digest)
            .await
            .map_err(|e| page_error_internal(&e))?;
        Ok(Viewer {
            session,
            key_digest: Some(digest),
        })
    }
}

/// The one set of templates, parsed once.
pub(crate) fn templates() -> &'static tera::Tera {
    static T: std::sync::OnceLock<tera::Tera> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let mut t = tera::Tera::default();
        t.autoescape_on(vec![".html"]);
        let all = [
            ("style.html", include_str!("templates/style.html")),
            ("report.html", include_str!("templates/report.html")),
            ("base.html", include_str!("templates/base.html")),
            ("login.html", include_str!("templates/login.html")),
            ("matrix.html", include_str!("templates/matrix.html")),
            (
                "matrix_body.html",
                include_str!("templates/matrix_body.html"),
            ),
            ("queue.html", include_str!("templates/queue.html")),
            ("patch.html", include_str!("templates/patch.html")),
            ("patch_body.html", include_str!("templates/patch_body.html")),
            ("hosts.html", include_str!("templates/hosts.html")),
            ("sweep.html", include_str!("templates/sweep.html")),
            ("sweep_body.html", include_str!("templates/sweep_body.html")),
            ("savings.html", include_str!("templates/savings.html")),
            ("images.html", include_str!("templates/images.html")),
            (
                "image_build.html",
                include_str!("templates/image_build.html"),
            ),
            ("error.html", include_str!("templates/error.html")),
        ];
        if let Err(e) = t.add_raw_templates(all) {
            // The templates are part of the binary: a broken one is a bug caught by the
            // tests that render every page.
            tracing::error!(error = %e, "the dashboard's templates do not parse");
        }
        t
    })
}

/// Renders `name` with `ctx`, or a page saying what failed.
pub fn render(name: &str, ctx: &tera::Context) -> Response {
    match templates().render(name, ctx) {
        Ok(html) => Html(html).into_response(),
        Err(e) => {
            let mut cause = e.to_string();
            let mut src: Option<&dyn std::error::Error> = std::error::Error::source(&e);
            while let Some(s) = src {
                cause.push_str(&format!(": {s}"));
                src = s.source();
            }
            page_error_internal(&cause)
        }
    }
}

/// A page saying what went wrong.
pub fn page_error(status: StatusCode, message: &str) -> Response {
    let mut ctx = tera::Context::new();
    ctx.insert("title", "Error");
    ctx.insert("message", message);
    ctx.insert("viewer", &None::<String>);
    ctx.insert("nav", "");
    ctx.insert("csrf", "");
    let body = templates()
        .render("error.html", &ctx)
        .unwrap_or_else(|_| message.to_owned());
    (status, Html(body)).into_response()
}

fn page_error_internal(cause: &dyn std::fmt::Display) -> Response {
    tracing::error!(error = %cause, "a dashboard page failed");
    page_error(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
}

async fn login_form(viewer: Viewer) -> Response {
    let mut ctx = tera::Context::new();
    ctx.insert("title", "Sign in");
    ctx.insert("viewer", &viewer.name());
    ctx.insert("nav", "");
    ctx.insert(
        "csrf",
        viewer.session.as_ref().map_or("", |s| s.csrf.as_str()),
    );
    ctx.insert("error", &None::<String>);
    render("login.html", &ctx)
}

#[derive(Debug, serde::Deserialize)]
struct LoginForm {
    token: String,
}

/// Whether a form came from a page of this server: a browser sends `Origin` with a POST,
/// and it must name the host the request is for.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get("origin").and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    origin
        .split_once("://")
        .is_some_and(|(_, rest)| rest == host)
}

async fn login(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    form: Result<axum::Form<LoginForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let refuse = |status: StatusCode, why: &str| {
        let mut ctx = tera::Context::new();
        ctx.insert("title", "Sign in");
        ctx.insert("viewer", &None::<String>);
        ctx.insert("nav", "");
        ctx.insert("csrf", "");
        ctx.insert("error", &Some(why));
        let mut r = render("login.html", &ctx);
        *r.status_mut() = status;
        r
    };
    if !same_origin(&headers) {
        return refuse(
            StatusCode::FORBIDDEN,
            "this form was posted from another site",
        );
    }
    let Ok(axum::Form(form)) = form else {
        return refuse(StatusCode::BAD_REQUEST, "give your token");
    };
    let user = match crate::api::auth::user_for_token(&s, form.token.trim()).await {
        Ok(u) => u,
        Err(e) => return refuse(StatusCode::UNAUTHORIZED, &e.error.message),
    };
    let (Ok(key), Ok(csrf)) = (
        certo_proto::token::new_token(),
        certo_proto::token::new_token(),
    ) else {
        return page_error_internal(&"no randomness for a session key");
    };
    if let Err(e) = s
        .store
        .start_session(
            &certo_proto::token::digest(&key),
            user.actor.name(),
            &csrf,
            SESSION_SECONDS,
        )
        .await
    {
        return page_error_internal(&e);
    }
    tracing::info!(user = user.actor.name(), "signed in to the dashboard");
    let cookie =
        format!("{COOKIE}={key}; HttpOnly; SameSite=Strict; Path=/; Max-Age={SESSION_SECONDS}");
    (
        [(axum::http::header::SET_COOKIE, cookie)],
        Redirect::to("/matrix"),
    )
        .into_response()
}

#[derive(Debug, serde::Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn logout(
    State(s): State<Arc<ApiState>>,
    viewer: Viewer,
    form: Result<axum::Form<CsrfForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let csrf = form.map(|f| f.0.csrf).unwrap_or_default();
    if let Err(r) = viewer.check_csrf(&csrf) {
        return r.into_response();
    }
    if let Some(d) = &viewer.key_digest
        && let Err(e) = s.store.end_session(d).await
    {
        return page_error_internal(&e);
    }
    tracing::info!(user = viewer.name(), "signed out of the dashboard");
    (
        [(
            axum::http::header::SET_COOKIE,
            format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
        )],
        Redirect::to("/login"),
    )
        .into_response()
}

/// Sweep views by store and run id, with what each was computed from: a view is computed again only
/// when its sweep changed (a cell recorded, classes set, the run ended) or after a minute.
type SweepCache =
    std::collections::HashMap<(u64, i64), (String, std::time::Instant, Arc<serde_json::Value>)>;

fn sweep_cache() -> &'static std::sync::Mutex<SweepCache> {
    static C: std::sync::OnceLock<std::sync::Mutex<SweepCache>> = std::sync::OnceLock::new();
    C.get_or_init(Default::default)
}

/// The view of sweep `id` (the newest without), from the cache while its sweep is unchanged.
pub async fn sweep_view(
    store: &crate::store::Store,
    id: Option<i64>,
) -> Result<Arc<serde_json::Value>, crate::app::OpError> {
    Ok(sweep_view_keyed(store, id).await?.1)
}

/// [`sweep_view`], with a key naming the sweep and its state (equal keys, equal views).
pub async fn sweep_view_keyed(
    store: &crate::store::Store,
    id: Option<i64>,
) -> Result<(String, Arc<serde_json::Value>), crate::app::OpError> {
    let Some((run, version)) = store
        .sweep_version(crate::app::sweeps::WORKFLOW, id)
        .await?
    else {
        return Err(crate::app::OpError::NotFound(id.map_or_else(
            || "no sweep yet".to_owned(),
            |i| format!("no sweep {i}"),
        )));
    };
    let key = format!("{run}:{version}");
    if let Ok(c) = sweep_cache().lock()
        && let Some((v, at, view)) = c.get(&(store.instance(), run))
        && *v == version
        && at.elapsed() < std::time::Duration::from_secs(60)
    {
        return Ok((key, view.clone()));
    }
    let view = Arc::new(crate::app::sweeps::show(store, Some(run)).await?);
    if let Ok(mut c) = sweep_cache().lock() {
        if c.len() > 64 {
            c.clear();
        }
        c.insert(
            (store.instance(), run),
            (version, std::time::Instant::now(), view.clone()),
        );
    }
    Ok((key, view))
}

/// Rendered page bodies that are the same for every viewer, by what they show.
type BodyCache = std::collections::HashMap<String, (std::time::Instant, Arc<String>)>;

fn body_cache() -> &'static std::sync::Mutex<BodyCache> {
    static C: std::sync::OnceLock<std::sync::Mutex<BodyCache>> = std::sync::OnceLock::new();
    C.get_or_init(Default::default)
}

/// The body cached under `key`, if made less than a minute ago.
pub fn cached_body(key: &str) -> Option<Arc<String>> {
    let c = body_cache().lock().ok()?;
    let (at, body) = c.get(key)?;
    (at.elapsed() < std::time::Duration::from_secs(60)).then(|| body.clone())
}

/// Caches `body` under `key`; returns it shared.
pub fn cache_body(key: &str, body: String) -> Arc<String> {
    let body = Arc::new(body);
    if let Ok(mut c) = body_cache().lock() {
        if c.len() > 128 {
            c.clear();
        }
        c.insert(key.to_owned(), (std::time::Instant::now(), body.clone()));
    }
    body
}
