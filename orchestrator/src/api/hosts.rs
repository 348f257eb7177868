//! Hosts: registration, heartbeat and a host's own record, each with the host's own token.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use certo_proto::host::{HeartbeatReply, Registered, Registration};
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ApiState;
use super::auth::HostAuth;
use super::error::ApiError;
use crate::store::HostRow;

pub fn routes() -> OpenApiRouter<Arc<ApiState>> {
    OpenApiRouter::new()
        .routes(routes!(show))
        .routes(routes!(register))
        .routes(routes!(heartbeat))
}

/// A host as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct HostView {
    pub name: String,
    pub agent_url: Option<String>,
    pub libvirt_uri: Option<String>,
    pub slots: Option<i32>,
    pub memory_mib: Option<i64>,
    pub vcpus: Option<i32>,
    pub registered_at: Option<DateTime<Utc>>,
    pub last_heartbeat: Option<DateTime<Utc>>,
}

impl From<HostRow> for HostView {
    fn from(h: HostRow) -> Self {
        HostView {
            name: h.name,
            agent_url: h.agent_url,
            libvirt_uri: h.libvirt_uri,
            slots: h.slots,
            memory_mib: h.memory_mib,
            vcpus: h.vcpus,
            registered_at: h.registered_at,
            last_heartbeat: h.last_heartbeat,
        }
    }
}

/// A host's own record (its own token).
#[utoipa::path(get, path = "/api/v1/hosts/{name}", operation_id = "show_host", tag = "host protocol", params(("name" = String, Path, description = "The host")),
    responses((status = 200, body = HostView), (status = 403, body = String, content_type = "text/plain")), security(("host_token" = [])))]
async fn show(State(s): State<Arc<ApiState>>, host: HostAuth) -> Result<Json<HostView>, ApiError> {
    let row = s
        .store
        .list_hosts()
        .await?
        .into_iter()
        .find(|h| h.name == host.name)
        .ok_or_else(|| ApiError::not_found(format!("no host {}", host.name)))?;
    Ok(Json(row.into()))
}

/// A host's agent registers: its URL, hypervisor and capacity (its own token).
#[utoipa::path(post, path = "/api/v1/hosts/{name}/register", tag = "host protocol", params(("name" = String, Path, description = "The host")),
    request_body(content = Object, description = "Registration: agent_url, libvirt_uri, slots, memory_mib, vcpus"),
    responses((status = 200, body = Object), (status = 403, body = String, content_type = "text/plain")), security(("host_token" = [])))]
async fn register(
    State(s): State<Arc<ApiState>>,
    host: HostAuth,
    body: axum::body::Bytes,
) -> Result<Json<Registered>, ApiError> {
    let reg: Registration = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("registration: {e}")))?;
    if reg.slots < 0 || reg.memory_mib < 0 || reg.vcpus < 0 {
        return Err(ApiError::bad_request("registration: negative capacity"));
    }
    check_field("agent_url", &reg.agent_url, 2048)?;
    check_field("libvirt_uri", &reg.libvirt_uri, 512)?;
    if !(reg.agent_url.starts_with("http://") || reg.agent_url.starts_with("https://")) {
        return Err(ApiError::bad_request(
            "registration: agent_url must be an http:// or https:// URL",
        ));
    }
    s.store
        .register_host(
            &host.name,
            &reg.agent_url,
            &reg.libvirt_uri,
            reg.slots,
            reg.memory_mib,
            reg.vcpus,
        )
        .await?;
    tracing::info!(host = %host.name, agent = %reg.agent_url, slots = reg.slots, "host registered");
    Ok(Json(Registered {
        registered: host.name,
    }))
}

/// A registration field: bounded, and no control characters (a newline would forge a log
/// line; a NUL cannot be stored).
fn check_field(name: &str, value: &str, max: usize) -> Result<(), ApiError> {
    if value.is_empty() || value.len() > max {
        return Err(ApiError::bad_request(format!(
            "registration: {name} must be 1 to {max} bytes"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::bad_request(format!(
            "registration: {name} contains a control character"
        )));
    }
    Ok(())
}

/// A host's heartbeat; answered with its live VMs, so the agent reaps any other domain.
#[utoipa::path(post, path = "/api/v1/hosts/{name}/heartbeat", tag = "host protocol", params(("name" = String, Path, description = "The host")),
    responses((status = 200, body = Object), (status = 403, body = String, content_type = "text/plain")), security(("host_token" = [])))]
async fn heartbeat(
    State(s): State<Arc<ApiState>>,
    host: HostAuth,
) -> Result<Json<HeartbeatReply>, ApiError> {
    let live_vms = s.store.heartbeat(&host.name).await?;
    Ok(Json(HeartbeatReply { live_vms }))
}
