//! Users: add one (its token made here, returned once, only its digest stored), list,
//! revoke. `certo user` and the admins' API call these.

use super::OpError;
use crate::store::{Role, Store, UserRow, valid_user_name};

/// Adds user `name` with `role`; returns the token, which is not kept anywhere.
pub async fn add(store: &Store, name: &str, role: Role) -> Result<String, OpError> {
    if !valid_user_name(name) {
        return Err(OpError::Refused(format!(
            "user name {:?}: use a lowercase letter, then up to 31 lowercase letters, digits, '.', '_' or '-'",
            crate::patch::limits::shorten(name)
        )));
    }
    let token = certo_proto::token::new_token().map_err(|source| super::AppError::Io {
        what: "reading /dev/urandom for a token".into(),
        source,
    })?;
    if !store
        .add_user(name, role, &certo_proto::token::digest(&token))
        .await?
    {
        return Err(OpError::Refused(format!(
            "user {name} exists already (a revoked user keeps their name)"
        )));
    }
    tracing::info!(user = name, %role, "user added");
    Ok(token)
}

/// Every user, by name.
pub async fn list(store: &Store) -> Result<Vec<UserRow>, OpError> {
    Ok(store.users().await?)
}

/// Revokes user `name`'s token: it acts for nothing any more.
pub async fn revoke(store: &Store, name: &str) -> Result<(), OpError> {
    if store.revoke_user(name).await? {
        tracing::info!(user = name, "user revoked");
        return Ok(());
    }
    if store.users().await?.iter().any(|u| u.name == name) {
        Err(OpError::Refused(format!("user {name} is revoked already")))
    } else {
        Err(OpError::NotFound(format!(
            "no user {}",
            crate::patch::limits::shorten(name)
        )))
    }
}
