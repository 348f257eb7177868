//! Authentication as extractors: a handler that acts for a host takes a [`HostAuth`], one
//! that acts for a guest VM a [`GuestAuth`]; forgetting to authenticate is a compile error.
//! Extractors of request parts run before the body is read, so an unauthenticated request
//! never has its body read.

use std::sync::Arc;

use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;

use super::ApiState;
use super::error::ApiError;
use crate::model::VmState;
use crate::store::VmRow;

/// The bearer token of a request, if any (`Authorization: Bearer TOKEN`, any case).
pub fn bearer(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()
        .and_then(certo_proto::token::bearer)
}

/// The one name in the request's path (`{name}`).
async fn path_name(parts: &mut Parts, state: &Arc<ApiState>) -> Result<String, ApiError> {
    let Path(name) = Path::<String>::from_request_parts(parts, state)
        .await
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(name)
}

/// A host authenticated by its own token, for the host named in the path
/// (`/api/v1/hosts/{name}/...`): a host acts only for itself.
#[derive(Debug, Clone)]
pub struct HostAuth {
    pub name: String,
}

impl FromRequestParts<Arc<ApiState>> for HostAuth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ApiState>,
    ) -> Result<Self, ApiError> {
        let name = path_name(parts, state).await?;
        let token =
            bearer(parts).ok_or_else(|| ApiError::unauthorized("a host token is required"))?;
        authenticate_host(state, &name, token).await?;
        Ok(HostAuth { name })
    }
}

/// Checks that `token` is host `name`'s.
pub async fn authenticate_host(state: &ApiState, name: &str, token: &str) -> Result<(), ApiError> {
    match state.store.host_token(name).await? {
        Some(stored) if super::same(&stored, &super::token_digest(token)) => Ok(()),
        _ => Err(ApiError::forbidden(format!(
            "this token does not belong to host {name}"
        ))),
    }
}

/// How a guest proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestCredential {
    /// The VM token made for this boot: good for `join` (and, before join, for reporting that
    /// the harness could not start), nothing else.
    VmToken,
    /// The session key `join` handed the harness, which no file, variable or device in the
    /// guest holds: every call after join carries it.
    Session,
}

/// A guest VM authenticated by the token made for it alone, or by the session key its
/// harness got at join; refused when the run is over, its deadline passed, or it is
/// presented with another VM's name (`X-Certo-VM`).
#[derive(Debug, Clone)]
pub struct GuestAuth {
    pub vm: VmRow,
    pub credential: GuestCredential,
}

impl GuestAuth {
    /// Calls after join (services, results, logs, done, the testbed) come from the harness
    /// that joined, with its session key: the VM token, which a patch's code may have found,
    /// no longer acts for the VM.
    pub fn require_session(&self, what: &str) -> Result<(), ApiError> {
        match self.credential {
            GuestCredential::Session => Ok(()),
            GuestCredential::VmToken if self.vm.state == VmState::Booting => Err(
                ApiError::conflict(format!("{what} before join: {} is booting", self.vm.name)),
            ),
            GuestCredential::VmToken => {
                tracing::warn!(vm = %self.vm.name, what, "the VM token presented after join");
                Err(ApiError::unauthorized(format!(
                    "{} has joined: after join only the session key join returned acts for it, not the VM token",
                    self.vm.name
                )))
            }
        }
    }
}

impl FromRequestParts<Arc<ApiState>> for GuestAuth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ApiState>,
    ) -> Result<Self, ApiError> {
        let token =
            bearer(parts).ok_or_else(|| ApiError::unauthorized("a VM token is required"))?;
        let digest = super::token_digest(token);
        let (vm, credential) = match state.store.vm_by_token(&digest).await? {
            Some(vm) => (vm, GuestCredential::VmToken),
            None => (
                state
                    .store
                    .vm_by_session(&digest)
                    .await?
                    .ok_or_else(|| ApiError::unauthorized("unknown VM token"))?,
                GuestCredential::Session,
            ),
        };
        // The harness names its VM in every call: a token alone is not enough.
        let Some(claimed) = parts
            .headers
            .get("x-certo-vm")
            .and_then(|v| v.to_str().ok())
        else {
            return Err(ApiError::bad_request(
                "the X-Certo-VM header (the VM's name) is required with a VM token",
            ));
        };
        if claimed != vm.name {
            tracing::warn!(vm = %vm.name, claimed, "a VM token presented for another VM");
            return Err(ApiError::forbidden("this token belongs to another VM"));
        }
        if vm.deadline < chrono::Utc::now() {
            return Err(ApiError::unauthorized(format!(
                "the deadline of {} passed at {}: its token is void",
                vm.name,
                vm.deadline.format("%Y-%m-%d %H:%M:%S UTC")
            )));
        }
        if vm.token_used_up {
            return Err(ApiError::unauthorized(format!(
                "the token of {} is used up (the run ended: {})",
                vm.name, vm.state
            )));
        }
        Ok(GuestAuth { vm, credential })
    }
}

/// Whoever may read a VM's record: the host that runs it (its host token) or the VM
/// itself (its own token, while the run is live).
#[derive(Debug, Clone)]
pub struct VmReader {
    pub vm: VmRow,
}

impl FromRequestParts<Arc<ApiState>> for VmReader {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ApiState>,
    ) -> Result<Self, ApiError> {
        let name = path_name(parts, state).await?;
        if certo_proto::domain::DomainName::parse(&name).is_none() {
            return Err(ApiError::bad_request(format!(
                "{:?} is not a Certo domain name",
                name.chars().take(140).collect::<String>()
            )));
        }
        let token = bearer(parts)
            .ok_or_else(|| ApiError::unauthorized("a host or VM token is required"))?
            .to_owned();
        let digest = super::token_digest(&token);
        if let Some(vm) = state.store.vm_by_token(&digest).await?
            && vm.name == name
            && !vm.token_used_up
            && vm.state == VmState::Booting
        {
            return Ok(VmReader { vm });
        }
        if let Some(vm) = state.store.vm_by_session(&digest).await?
            && vm.name == name
            && !vm.token_used_up
        {
            return Ok(VmReader { vm });
        }
        let vm = state.store.vm(&name).await?;
        match vm {
            Some(vm) => {
                authenticate_host(state, &vm.host, &token).await?;
                Ok(VmReader { vm })
            }
            // Say nothing about which VMs exist to a caller who is not a host of ours.
            None => Err(ApiError::forbidden(format!(
                "this token may not read VM {name}"
            ))),
        }
    }
}

/// A person using the API: a user's token (`Authorization: Bearer`), not revoked. Their
/// role decides what they may do ([`crate::app::Actor`]).
#[derive(Debug, Clone)]
pub struct UserAuth {
    pub actor: crate::app::Actor,
}

impl UserAuth {
    /// Refuses unless the user is an admin.
    pub fn admin(&self, what: &str) -> Result<(), super::error::JsonError> {
        Ok(self.actor.require_admin(what)?)
    }
}

impl FromRequestParts<Arc<ApiState>> for UserAuth {
    type Rejection = super::error::JsonError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ApiState>,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(parts).ok_or_else(|| {
            ApiError::unauthorized(
                "a user token is required (Authorization: Bearer TOKEN; `certo user add` makes one)",
            )
        })?;
        user_for_token(state, token).await
    }
}

/// The user whose token this is, refused when unknown or revoked.
pub async fn user_for_token(
    state: &ApiState,
    token: &str,
) -> Result<UserAuth, super::error::JsonError> {
    let digest = super::token_digest(token);
    match state.store.user_by_token(&digest).await? {
        Some(u) if u.revoked_at.is_some() => {
            tracing::warn!(user = %u.name, "a revoked user token was presented");
            Err(ApiError::unauthorized(format!(
                "the token of user {} was revoked at {}",
                u.name,
                u.revoked_at
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                    .unwrap_or_default()
            ))
            .into())
        }
        Some(u) => Ok(UserAuth {
            actor: crate::app::Actor::User {
                name: u.name,
                role: u.role,
            },
        }),
        None => Err(ApiError::unauthorized("unknown user token").into()),
    }
}
