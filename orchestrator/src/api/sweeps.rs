//! The nightly sweeps for people: list, show one (classes, trends, what changed), a cell's
//! diff; admins start one.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ApiState;
use super::auth::UserAuth;
use super::error::{ApiError, ErrorBody, JsonError};
use crate::app::{AppError, OpError, Page, PageAsk, sweeps};

pub fn routes() -> OpenApiRouter<Arc<ApiState>> {
    OpenApiRouter::new()
        .routes(routes!(list, start))
        .routes(routes!(show))
        .routes(routes!(diff))
}

/// The sweeps, newest first, as summaries.
#[utoipa::path(get, path = "/api/v1/sweeps", operation_id = "list_sweeps", tag = "sweeps", params(PageAsk),
    responses((status = 200, body = Page), (status = 422, description = "A cursor that is not this list's (`refused`)", body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("token" = [])))]
pub async fn list(
    State(s): State<Arc<ApiState>>,
    _user: UserAuth,
    page: Result<Query<PageAsk>, QueryRejection>,
) -> Result<Json<Page>, JsonError> {
    let Query(page) = page?;
    Ok(Json(sweeps::list(&s.store, page.capped()?).await?))
}

/// One sweep (`latest` for the newest): each cell's class, trend and tests; what changed
/// for a newly failing cell; for a running one, how far it is.
#[utoipa::path(get, path = "/api/v1/sweeps/{id}", operation_id = "show_sweep", tag = "sweeps",
    params(("id" = String, Path, pattern = r"^([0-9]{1,19}|latest)$", description = "The sweep's run id, or `latest`")),
    responses((status = 200, body = Object), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("token" = [])))]
pub async fn show(
    State(s): State<Arc<ApiState>>,
    _user: UserAuth,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, JsonError> {
    let Path(id) = id?;
    let id = match id.as_str() {
        "latest" => None,
        n => Some(
            n.parse::<i64>()
                .ok()
                .filter(|_| n.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "sweep {:?}: give a run id or `latest`",
                        crate::patch::limits::shorten(n)
                    ))
                })?,
        ),
    };
    Ok(Json(sweeps::show(&s.store, id).await?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CellQuery {
    /// release/platform/node_type
    pub cell: String,
}

/// What changed for a cell between its last good sweep and its first bad one.
#[utoipa::path(get, path = "/api/v1/sweeps/diff", tag = "sweeps", params(CellQuery),
    responses((status = 200, body = Object), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("token" = [])))]
pub async fn diff(
    State(s): State<Arc<ApiState>>,
    _user: UserAuth,
    q: Result<Query<CellQuery>, QueryRejection>,
) -> Result<Json<Value>, JsonError> {
    let Query(q) = q?;
    match sweeps::diff(&s.store, &q.cell)
        .await
        .map_err(OpError::from)?
    {
        Some(d) => Ok(Json(d)),
        None => Err(OpError::NotFound(format!(
            "{} never went from good to bad in the sweeps kept",
            crate::patch::limits::shorten(&q.cell)
        ))
        .into()),
    }
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct StartBody {
    /// Only these cells: release/platform/node_type patterns, `*` for any part,
    /// comma-separated.
    pub cells: Option<String>,
}

/// Starts a sweep now (admins).
#[utoipa::path(post, path = "/api/v1/sweeps", tag = "sweeps", request_body = StartBody,
    responses((status = 200, description = "`{\"sweep\": ID}`", body = Object),
        (status = 403, body = ErrorBody), (status = 422, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("token" = [])))]
pub async fn start(
    State(s): State<Arc<ApiState>>,
    user: UserAuth,
    body: Result<Json<StartBody>, JsonRejection>,
) -> Result<Json<Value>, JsonError> {
    user.admin("starting a sweep")?;
    let Json(body) = body?;
    match sweeps::start(s.app()?, &s.store, body.cells.as_deref()).await {
        Ok(id) => {
            tracing::info!(sweep = id, user = user.actor.name(), "sweep started");
            Ok(Json(json!({"sweep": id})))
        }
        Err(AppError::NotFound(m)) => Err(OpError::Refused(format!("cells: {m}")).into()),
        Err(e) => Err(OpError::from(e).into()),
    }
}
