//! Patches for people: submit (the same diagnostics as the CLI), list, show, rerun, cancel.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ApiState;
use super::auth::UserAuth;
use super::error::{ApiError, ErrorBody, JsonError};
use crate::app::patches::PatchFilter;
use crate::app::submit::{SubmitAnswer, SubmitFailure, Upload};
use crate::app::{Page, PageAsk, patches, runs, show as shown, submit};
use crate::store::Submitter;

pub fn routes() -> OpenApiRouter<Arc<ApiState>> {
    OpenApiRouter::new()
        .routes(routes!(submit_records))
        .routes(routes!(list))
        .routes(routes!(show))
        .routes(routes!(rerun))
        .routes(routes!(cancel))
}

/// A submission: the files' contents, and whether to certify what is stored.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct SubmitBody {
    pub files: Vec<Upload>,
    /// Start (or find) the certification run of each stored revision that asks for it.
    #[serde(default)]
    pub certify: bool,
}

/// Validates and stores patch records in one transaction, or nothing; a certifier may add
/// revisions only to the patches they own.
#[utoipa::path(post, path = "/api/v1/submit", tag = "patches", request_body = SubmitBody,
    responses(
        (status = 200, description = "Stored", body = SubmitAnswer),
        (status = 422, description = "Invalid records or conflicts (`invalid_record`, `conflict`): nothing stored", body = ErrorBody),
        (status = 403, description = "Records of another user's patches (`not_yours`): nothing stored", body = ErrorBody),
        (status = 401, body = ErrorBody)),
    security(("token" = [])))]
pub async fn submit_records(
    State(s): State<Arc<ApiState>>,
    user: UserAuth,
    body: Result<Json<SubmitBody>, JsonRejection>,
) -> Result<Json<SubmitAnswer>, JsonError> {
    let Json(body) = body?;
    let ctx = s.app()?;
    let loaded = submit::load_uploads(&body.files, ctx.catalogue());
    let who = Submitter {
        user: user.actor.name(),
        admin: user.actor.is_admin(),
    };
    match submit::submit(ctx, &loaded, Some(who), body.certify).await {
        Ok(a) => Ok(Json(a)),
        Err(e) => Err(submit_error(e)),
    }
}

fn submit_error(e: SubmitFailure) -> JsonError {
    let (status, code) = match e {
        SubmitFailure::Op(op) => return op.into(),
        SubmitFailure::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_record"),
        SubmitFailure::Conflicts(_) => (StatusCode::UNPROCESSABLE_ENTITY, "conflict"),
        SubmitFailure::NotYours(_) => (StatusCode::FORBIDDEN, "not_yours"),
    };
    JsonError::with_diagnostics(
        ApiError::new(status, code, e.to_string()),
        e.diagnostics().to_vec(),
    )
}

/// Stored patch revisions, current ones unless the filter asks for more, by id.
#[utoipa::path(get, path = "/api/v1/patches", operation_id = "list_patches", tag = "patches", params(PatchFilter, PageAsk),
    responses((status = 200, body = Page), (status = 422, description = "An unknown release, or a cursor that is not this list's (`refused`)", body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("token" = [])))]
pub async fn list(
    State(s): State<Arc<ApiState>>,
    _user: UserAuth,
    filter: Result<Query<PatchFilter>, QueryRejection>,
    page: Result<Query<PageAsk>, QueryRejection>,
) -> Result<Json<Page>, JsonError> {
    let (Query(filter), Query(page)) = (filter?, page?);
    Ok(Json(
        patches::list(s.app()?, &filter, page.capped()?).await?,
    ))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RevisionQuery {
    /// The revision (default: the newest).
    pub revision: Option<u32>,
}

/// One patch: its record, revisions, history, its latest run's verdict and timeline.
#[utoipa::path(get, path = "/api/v1/patches/{id}", operation_id = "show_patch", tag = "patches",
    params(("id" = u64, Path, description = "The patch id"), RevisionQuery),
    responses((status = 200, body = Object), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("token" = [])))]
pub async fn show(
    State(s): State<Arc<ApiState>>,
    _user: UserAuth,
    id: Result<Path<u64>, PathRejection>,
    q: Result<Query<RevisionQuery>, QueryRejection>,
) -> Result<Json<Value>, JsonError> {
    let (Path(id), Query(q)) = (id?, q?);
    Ok(Json(shown::patch(&s.store, id, q.revision).await?))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct RerunBody {
    /// Only the targets that failed or were incomplete in the latest run.
    #[serde(default)]
    pub failed: bool,
}

/// Certifies a patch's current revision again (its owner or an admin).
#[utoipa::path(post, path = "/api/v1/patches/{id}/rerun", tag = "patches",
    params(("id" = u64, Path, description = "The patch id")), request_body = RerunBody,
    responses((status = 200, description = "`{\"run\": ID}`", body = Object),
        (status = 403, body = ErrorBody), (status = 422, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("token" = [])))]
pub async fn rerun(
    State(s): State<Arc<ApiState>>,
    user: UserAuth,
    id: Result<Path<u64>, PathRejection>,
    body: Result<Json<RerunBody>, JsonRejection>,
) -> Result<Json<Value>, JsonError> {
    let (Path(id), Json(body)) = (id?, body?);
    let run = runs::rerun_for(s.app()?, &user.actor, id, body.failed).await?;
    Ok(Json(json!({"run": run, "patch": id})))
}

/// Cancels a patch's running certification (its owner or an admin); its VMs are still
/// torn down.
#[utoipa::path(post, path = "/api/v1/patches/{id}/cancel", tag = "patches",
    params(("id" = u64, Path, description = "The patch id")),
    responses((status = 200, description = "`{\"cancelled\": [RUN...]}`", body = Object),
        (status = 403, body = ErrorBody), (status = 422, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("token" = [])))]
pub async fn cancel(
    State(s): State<Arc<ApiState>>,
    user: UserAuth,
    id: Result<Path<u64>, PathRejection>,
) -> Result<Json<Value>, JsonError> {
    let Path(id) = id?;
    let done = runs::cancel_for(s.app()?, &user.actor, id).await?;
    Ok(Json(json!({"cancelled": done, "patch": id})))
}
