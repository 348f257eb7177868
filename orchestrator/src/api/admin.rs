//! Who am I; users (admins); hosts and quarantine (everyone reads, admins change); images.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ApiState;
use super::auth::UserAuth;
use super::error::{ApiError, ErrorBody, JsonError};
use crate::app::{Actor, OpError, users};
use crate::store::Role;

pub fn routes() -> OpenApiRouter<Arc<ApiState>> {
    OpenApiRouter::new()
        .routes(routes!(me))
        .routes(routes!(list_users, add_user))
        .routes(routes!(revoke_user))
        .routes(routes!(list_hosts))
        .routes(routes!(quarantine))
        .routes(routes!(release))
        .routes(routes!(list_images))
        .routes(routes!(download))
}

/// Where an image's artefact of `format` is, from the store; refused for a digest that is
/// not one, a format Certo does not make, or an artefact not exported.
pub async fn artefact_path(
    store: &crate::store::Store,
    digest: &str,
    format: &str,
) -> Result<(std::path::PathBuf, crate::store::ImageRow), OpError> {
    if digest.len() != 64
        || !digest
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return Err(OpError::Refused(format!(
            "{:?} is not an image digest (64 lowercase hex digits)",
            crate::patch::limits::shorten(digest)
        )));
    }
    if !matches!(format, "ext4" | "qcow2" | "tar.gz") {
        return Err(OpError::Refused(format!(
            "format {:?}: images come as ext4, qcow2 or tar.gz",
            crate::patch::limits::shorten(format)
        )));
    }
    let Some(image) = store.image_row(digest).await? else {
        return Err(OpError::NotFound(format!("no image {digest}")));
    };
    let path = image
        .artefacts
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["format"] == format)
        .and_then(|a| a["path"].as_str())
        .map(std::path::PathBuf::from)
        .ok_or_else(|| {
            OpError::NotFound(format!(
                "image {} has no {format} artefact: build it with `certo image build ... --export {format}`",
                &digest[..12]
            ))
        })?;
    Ok((path, image))
}

/// An artefact as a download (streamed from its file, never read whole).
pub async fn artefact_response(
    store: &crate::store::Store,
    digest: &str,
    format: &str,
) -> Result<axum::response::Response, OpError> {
    use axum::response::IntoResponse;
    let (path, image) = artefact_path(store, digest, format).await?;
    let file = tokio::fs::File::open(&path).await.map_err(|source| {
        OpError::App(crate::app::AppError::Io {
            what: format!("opening {}", path.display()),
            source,
        })
    })?;
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let name = format!(
        "certo-{}-{}-{}-{}.{}",
        image.release,
        image.platform,
        image.node_type,
        &digest[..12],
        if format == "tar.gz" { "tar.gz" } else { format }
    )
    .replace(
        |c: char| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')),
        "_",
    );
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok((
        [
            ("content-type", "application/octet-stream".to_owned()),
            ("content-length", len.to_string()),
            (
                "content-disposition",
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        body,
    )
        .into_response())
}

/// An image's artefact (ext4, qcow2 or tar.gz), as a download.
#[utoipa::path(get, path = "/api/v1/images/{digest}/{format}", tag = "images",
    params(("digest" = String, Path, pattern = r"^[0-9a-f]{64}$", description = "The image's digest"),
           ("format" = String, Path, pattern = r"^(ext4|qcow2|tar\.gz)$", description = "ext4, qcow2 or tar.gz")),
    responses((status = 200, body = Vec<u8>, content_type = "application/octet-stream"),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("token" = [])))]
pub async fn download(
    State(s): State<Arc<ApiState>>,
    _user: UserAuth,
    p: Result<Path<(String, String)>, PathRejection>,
) -> Result<axum::response::Response, JsonError> {
    let Path((digest, format)) = p?;
    Ok(artefact_response(&s.store, &digest, &format).await?)
}

/// The user a token belongs to, and their role.
#[utoipa::path(get, path = "/api/v1/me", tag = "users",
    responses((status = 200, description = "`{\"name\", \"role\"}`", body = Object), (status = 401, body = ErrorBody)),
    security(("token" = [])))]
pub async fn me(user: UserAuth) -> Json<Value> {
    let role = match &user.actor {
        Actor::User { role, .. } => role.as_str(),
        Actor::Operator(_) => "admin",
    };
    Json(json!({"name": user.actor.name(), "role": role}))
}

/// Every user: name, role, created, revoked, last seen (admins).
#[utoipa::path(get, path = "/api/v1/users", tag = "users",
    responses((status = 200, body = Vec<Object>), (status = 403, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("token" = [])))]
pub async fn list_users(
    State(s): State<Arc<ApiState>>,
    user: UserAuth,
) -> Result<Json<Value>, JsonError> {
    user.admin("listing users")?;
    Ok(Json(json!(users::list(&s.store).await?)))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct NewUser {
    #[schema(pattern = r"^[a-z][a-z0-9._-]{0,31}$")]
    pub name: String,
    /// `certifier` or `admin`.
    #[schema(schema_with = role_schema)]
    pub role: Role,
}

fn role_schema() -> utoipa::openapi::schema::Object {
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(["certifier", "admin"]))
        .build()
}

/// Adds a user (admins); the answer holds the token, once: only its digest is kept.
#[utoipa::path(post, path = "/api/v1/users", tag = "users", request_body = NewUser,
    responses((status = 200, description = "`{\"name\", \"role\", \"token\"}`", body = Object),
        (status = 403, body = ErrorBody), (status = 422, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("token" = [])))]
pub async fn add_user(
    State(s): State<Arc<ApiState>>,
    user: UserAuth,
    body: Result<Json<NewUser>, JsonRejection>,
) -> Result<Json<Value>, JsonError> {
    user.admin("adding users")?;
    let Json(body) = body?;
    let token = users::add(&s.store, &body.name, body.role).await?;
    tracing::info!(user = %body.name, by = user.actor.name(), "user added through the API");
    Ok(Json(
        json!({"name": body.name, "role": body.role, "token": token}),
    ))
}

/// Revokes a user's token (admins).
#[utoipa::path(post, path = "/api/v1/users/{name}/revoke", tag = "users",
    params(("name" = String, Path, description = "The user")),
    responses((status = 200, body = Object), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("token" = [])))]
pub async fn revoke_user(
    State(s): State<Arc<ApiState>>,
    user: UserAuth,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, JsonError> {
    user.admin("revoking users")?;
    let Path(name) = name?;
    users::revoke(&s.store, &name).await?;
    Ok(Json(json!({"revoked": name})))
}

/// The hosts: capacity, last heartbeat, quarantine and why.
#[utoipa::path(get, path = "/api/v1/hosts", tag = "hosts",
    responses((status = 200, body = Vec<Object>), (status = 401, body = ErrorBody)),
    security(("token" = [])))]
pub async fn list_hosts(
    State(s): State<Arc<ApiState>>,
    _user: UserAuth,
) -> Result<Json<Value>, JsonError> {
    Ok(Json(json!(s.store.list_hosts().await?)))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct QuarantineBody {
    /// Why, for the people who read the hosts page.
    #[schema(
        min_length = 1,
        max_length = 500,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"
    )]
    pub reason: String,
}

/// Takes a host out of placement, with the reason (admins).
#[utoipa::path(post, path = "/api/v1/hosts/{name}/quarantine", tag = "hosts",
    params(("name" = String, Path, description = "The host")), request_body = QuarantineBody,
    responses((status = 200, body = Object), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("token" = [])))]
pub async fn quarantine(
    State(s): State<Arc<ApiState>>,
    user: UserAuth,
    name: Result<Path<String>, PathRejection>,
    body: Result<Json<QuarantineBody>, JsonRejection>,
) -> Result<Json<Value>, JsonError> {
    user.admin("quarantining hosts")?;
    let (Path(name), Json(body)) = (name?, body?);
    if body.reason.trim().is_empty()
        || body.reason.chars().count() > 500
        || body.reason.chars().any(char::is_control)
    {
        return Err(ApiError::bad_request("reason: 1 to 500 printable characters").into());
    }
    let reason = format!("{} (by {})", body.reason.trim(), user.actor.name());
    if !s.store.quarantine(&name, &reason).await? {
        return Err(
            OpError::NotFound(format!("no host {}", crate::patch::limits::shorten(&name))).into(),
        );
    }
    tracing::info!(host = %name, by = user.actor.name(), "host quarantined");
    Ok(Json(json!({"quarantined": name, "reason": reason})))
}

/// Gives a quarantined host work again (admins).
#[utoipa::path(post, path = "/api/v1/hosts/{name}/release", tag = "hosts",
    params(("name" = String, Path, description = "The host")),
    responses((status = 200, body = Object), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("token" = [])))]
pub async fn release(
    State(s): State<Arc<ApiState>>,
    user: UserAuth,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, JsonError> {
    user.admin("releasing hosts")?;
    let Path(name) = name?;
    if !s.store.unquarantine(&name).await? {
        return Err(
            OpError::NotFound(format!("no host {}", crate::patch::limits::shorten(&name))).into(),
        );
    }
    tracing::info!(host = %name, by = user.actor.name(), "host released");
    Ok(Json(json!({"released": name})))
}

/// The images built: digest, target, layers, artefacts, size, built and last used.
#[utoipa::path(get, path = "/api/v1/images", tag = "images",
    responses((status = 200, body = Vec<Object>), (status = 401, body = ErrorBody)),
    security(("token" = [])))]
pub async fn list_images(
    State(s): State<Arc<ApiState>>,
    _user: UserAuth,
) -> Result<Json<Value>, JsonError> {
    Ok(Json(json!(s.store.list_images().await?)))
}
