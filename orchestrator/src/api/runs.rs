//! Certification runs for people: list, one run's status (for waiting), its timeline.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use serde_json::Value;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ApiState;
use super::auth::UserAuth;
use super::error::{ErrorBody, JsonError};
use crate::app::runs::{RunFilter, RunStatus};
use crate::app::{Page, PageAsk, runs};

pub fn routes() -> OpenApiRouter<Arc<ApiState>> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(status))
        .routes(routes!(timeline))
        .routes(routes!(junit))
        .routes(routes!(tests))
        .routes(routes!(logs))
}

/// A run's evidence per target (the verdict's known failures marked).
async fn evidence_of(
    s: &ApiState,
    id: i64,
    log_bytes: usize,
) -> Result<Vec<crate::app::evidence::TargetEvidence>, JsonError> {
    let Some(run) = s.store.run(id).await? else {
        return Err(crate::app::OpError::NotFound(format!("run {id} does not exist")).into());
    };
    let steps = s.store.run_timeline(id).await?;
    let view = runs::view(&s.store, &run).await?;
    let known: Vec<String> = view["known_failures"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| k.as_str().map(str::to_owned))
        .collect();
    Ok(crate::app::evidence::of_run(&s.store, &run, &steps, &known, log_bytes).await?)
}

/// Each target's test results, with their output: the VM that ran them and its host.
#[utoipa::path(get, path = "/api/v1/runs/{id}/tests", tag = "runs",
    params(("id" = i64, Path, description = "The run id")),
    responses((status = 200, body = Vec<TargetTests>), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("token" = [])))]
pub async fn tests(
    State(s): State<Arc<ApiState>>,
    _user: UserAuth,
    id: Result<Path<i64>, PathRejection>,
) -> Result<Json<Vec<TargetTests>>, JsonError> {
    let Path(id) = id?;
    let ev = evidence_of(&s, id, 64 * 1024).await?;
    Ok(Json(
        ev.into_iter()
            .map(|e| TargetTests {
                target: e.target,
                vm: e.vm,
                host: e.host,
                tests: e.tests,
            })
            .collect(),
    ))
}

/// One target's test results (its logs are `/api/v1/runs/{id}/logs`).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct TargetTests {
    pub target: String,
    /// The VM (domain) that ran its tests, and its host.
    pub vm: Option<String>,
    pub host: Option<String>,
    pub tests: Vec<crate::app::evidence::TestEvidence>,
}

/// Each target's logs: the harness's, the serial console's, a failed build's (their last
/// 256 KiB).
#[utoipa::path(get, path = "/api/v1/runs/{id}/logs", tag = "runs",
    params(("id" = i64, Path, description = "The run id")),
    responses((status = 200, body = Vec<Object>), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("token" = [])))]
pub async fn logs(
    State(s): State<Arc<ApiState>>,
    _user: UserAuth,
    id: Result<Path<i64>, PathRejection>,
) -> Result<Json<Value>, JsonError> {
    let Path(id) = id?;
    let ev = evidence_of(&s, id, 256 * 1024).await?;
    Ok(Json(serde_json::json!(
        ev.iter()
            .map(|e| serde_json::json!({
                "target": e.target, "vm": e.vm, "harness_log": e.harness_log,
                "serial_log": e.serial_log, "build_log": e.build_log,
            }))
            .collect::<Vec<_>>()
    )))
}

/// A run's tests as JUnit XML: a suite per target, a failure per regression, known
/// baseline failures skipped.
#[utoipa::path(get, path = "/api/v1/runs/{id}/junit", tag = "runs",
    params(("id" = i64, Path, description = "The run id")),
    responses((status = 200, body = String, content_type = "application/xml"), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("token" = [])))]
pub async fn junit(
    State(s): State<Arc<ApiState>>,
    _user: UserAuth,
    id: Result<Path<i64>, PathRejection>,
) -> Result<axum::response::Response, JsonError> {
    use axum::response::IntoResponse;
    let Path(id) = id?;
    let xml = crate::app::reports::junit(&s.store, id).await?;
    Ok(([("content-type", "application/xml; charset=utf-8")], xml).into_response())
}

/// Runs, newest first, each with its verdict (or `running` and how far it got).
#[utoipa::path(get, path = "/api/v1/runs", operation_id = "list_runs", tag = "runs", params(RunFilter, PageAsk),
    responses((status = 200, body = Page), (status = 422, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("token" = [])))]
pub async fn list(
    State(s): State<Arc<ApiState>>,
    _user: UserAuth,
    filter: Result<Query<RunFilter>, QueryRejection>,
    page: Result<Query<PageAsk>, QueryRejection>,
) -> Result<Json<Page>, JsonError> {
    let (Query(filter), Query(page)) = (filter?, page?);
    Ok(Json(runs::list(&s.store, &filter, page.capped()?).await?))
}

/// Where a run is: its verdict once decided, else the steps running now.
#[utoipa::path(get, path = "/api/v1/runs/{id}", tag = "runs",
    params(("id" = i64, Path, description = "The run id")),
    responses((status = 200, body = RunStatus), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("token" = [])))]
pub async fn status(
    State(s): State<Arc<ApiState>>,
    _user: UserAuth,
    id: Result<Path<i64>, PathRejection>,
) -> Result<Json<RunStatus>, JsonError> {
    let Path(id) = id?;
    Ok(Json(runs::status(&s.store, id).await?))
}

/// A run's steps: target, step, state, attempt, host, start and duration, reason.
#[utoipa::path(get, path = "/api/v1/runs/{id}/timeline", tag = "runs",
    params(("id" = i64, Path, description = "The run id")),
    responses((status = 200, body = Vec<Object>), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("token" = [])))]
pub async fn timeline(
    State(s): State<Arc<ApiState>>,
    _user: UserAuth,
    id: Result<Path<i64>, PathRejection>,
) -> Result<Json<Vec<Value>>, JsonError> {
    let Path(id) = id?;
    if s.store.run(id).await?.is_none() {
        return Err(crate::app::OpError::NotFound(format!("run {id} does not exist")).into());
    }
    Ok(Json(runs::timeline(&s.store, id).await?))
}
