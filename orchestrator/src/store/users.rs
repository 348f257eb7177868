//! Users of the API (certifiers and admins) and whose patch a patch is.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{Store, StoreError};

/// What a user may do. An admin may do everything a certifier may, on every patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Submits patches, and reruns and cancels the patches they own; reads everything.
    Certifier,
    /// Also manages hosts, quarantine, sweeps and users, and acts on every patch.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Certifier => "certifier",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "certifier" => Ok(Role::Certifier),
            "admin" => Ok(Role::Admin),
            other => Err(format!("unknown role {other:?}: use certifier or admin")),
        }
    }
}

/// One user as listed (never the token, nor its digest).
#[derive(Debug, Clone, Serialize)]
pub struct UserRow {
    pub name: String,
    pub role: Role,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_seen_at: Option<DateTime<Utc>>,
}

/// Whether a user name is one Certo accepts: `[a-z][a-z0-9._-]{0,31}` (the schema checks
/// it too).
pub fn valid_user_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
        && name.len() <= 32
        && chars
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
}

type UserTuple = (
    String,
    String,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
);

fn user_row(t: UserTuple) -> Result<UserRow, StoreError> {
    Ok(UserRow {
        role: t.1.parse().map_err(StoreError::Corrupt)?,
        name: t.0,
        created_at: t.2,
        revoked_at: t.3,
        last_seen_at: t.4,
    })
}

impl Store {
    /// Adds a user with the digest of their token; `false` when the name is taken (revoked
    /// users keep their names).
    pub async fn add_user(
        &self,
        name: &str,
        role: Role,
        token_digest: &str,
    ) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "INSERT INTO users (name, role, token_digest) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(role.as_str())
        .bind(token_digest)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Every user, by name.
    pub async fn users(&self) -> Result<Vec<UserRow>, StoreError> {
        let rows: Vec<UserTuple> = sqlx::query_as(
            "SELECT name, role, created_at, revoked_at, last_seen_at FROM users ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(user_row).collect()
    }

    /// Revokes a user's token; `false` when there is no such user or it was revoked already.
    pub async fn revoke_user(&self, name: &str) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE users SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL",
        )
        .bind(name)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// The user a token digest belongs to, revoked or not (the caller refuses revoked ones
    /// with that reason). Marks the user seen, at most once a minute.
    pub async fn user_by_token(&self, digest: &str) -> Result<Option<UserRow>, StoreError> {
        let row: Option<UserTuple> = sqlx::query_as(
            "SELECT name, role, created_at, revoked_at, last_seen_at FROM users WHERE token_digest = $1",
        )
        .bind(digest)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let user = user_row(row)?;
        if user.revoked_at.is_none()
            && user
                .last_seen_at
                .is_none_or(|t| Utc::now() - t > chrono::Duration::seconds(60))
        {
            sqlx::query("UPDATE users SET last_seen_at = now() WHERE name = $1")
                .bind(&user.name)
                .execute(&self.pool)
                .await?;
        }
        Ok(Some(user))
    }

    /// Who owns a patch (`None`: stored on the orchestrator's machine, or not stored).
    pub async fn patch_owner(&self, patch: u64) -> Result<Option<String>, StoreError> {
        let row: Option<(String,)> =
            sqlx::query_as("SELECT owner FROM patch_owners WHERE patch_id = $1")
                .bind(patch as i64)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|r| r.0))
    }
}

/// A dashboard session that still acts: its user and the CSRF token its forms carry.
#[derive(Debug, Clone)]
pub struct SessionRow {
    pub user: UserRow,
    pub csrf: String,
}

type SessionTuple = (
    String,
    String,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    String,
);

impl Store {
    /// Starts a session of `user` for `seconds`.
    pub async fn start_session(
        &self,
        key_digest: &str,
        user: &str,
        csrf: &str,
        seconds: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO web_sessions (key_digest, user_name, csrf, expires_at)
             VALUES ($1, $2, $3, now() + make_interval(secs => $4))",
        )
        .bind(key_digest)
        .bind(user)
        .bind(csrf)
        .bind(seconds as f64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The session a key's digest names, if it still acts (not ended, not expired, its user
    /// not revoked).
    pub async fn session(&self, key_digest: &str) -> Result<Option<SessionRow>, StoreError> {
        let row: Option<SessionTuple> = sqlx::query_as(
            "SELECT u.name, u.role, u.created_at, u.revoked_at, u.last_seen_at, s.csrf
                   FROM web_sessions s JOIN users u ON u.name = s.user_name
                  WHERE s.key_digest = $1 AND s.ended_at IS NULL AND s.expires_at > now()
                    AND u.revoked_at IS NULL",
        )
        .bind(key_digest)
        .fetch_optional(&self.pool)
        .await?;
        let Some((name, role, created, revoked, seen, csrf)) = row else {
            return Ok(None);
        };
        Ok(Some(SessionRow {
            user: user_row((name, role, created, revoked, seen))?,
            csrf,
        }))
    }

    /// Ends a session: its cookie acts for nothing any more.
    pub async fn end_session(&self, key_digest: &str) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE web_sessions SET ended_at = now() WHERE key_digest = $1 AND ended_at IS NULL",
        )
        .bind(key_digest)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }
}
