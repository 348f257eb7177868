//! Verdict hooks and their deliveries (an outbox derived from the verdicts: a delivery is
//! owed for every verdict decided after its hook was added).

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{Store, StoreError};

/// A hook as listed (never its secret).
#[derive(Debug, Clone, Serialize)]
pub struct HookRow {
    pub id: i64,
    pub url: String,
    pub created_at: DateTime<Utc>,
    pub removed_at: Option<DateTime<Utc>>,
    pub delivered: i64,
    pub pending: i64,
    pub failed: i64,
}

/// A delivery as recorded.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct DeliveryRow {
    pub hook_id: i64,
    pub run_id: i64,
    pub state: String,
    pub attempts: i32,
    pub next_at: DateTime<Utc>,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
}

/// A delivery taken to be sent now: where, with which secret, and the verdict.
#[derive(Debug, Clone)]
pub struct DueDelivery {
    pub hook_id: i64,
    pub run_id: i64,
    pub url: String,
    pub secret: String,
    pub attempts: i32,
    pub verdict: super::engine::VerdictRow,
}

type HookTuple = (
    i64,
    String,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    i64,
    i64,
    i64,
);

impl Store {
    pub async fn add_hook(&self, url: &str, secret: &str) -> Result<i64, StoreError> {
        let (id,): (i64,) =
            sqlx::query_as("INSERT INTO hooks (url, secret) VALUES ($1, $2) RETURNING id")
                .bind(url)
                .bind(secret)
                .fetch_one(&self.pool)
                .await?;
        Ok(id)
    }

    /// Removes a hook (nothing more is sent to it); `false` when there is no such live hook.
    pub async fn remove_hook(&self, id: i64) -> Result<bool, StoreError> {
        let r =
            sqlx::query("UPDATE hooks SET removed_at = now() WHERE id = $1 AND removed_at IS NULL")
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn hooks(&self) -> Result<Vec<HookRow>, StoreError> {
        let rows: Vec<HookTuple> = sqlx::query_as(
            "SELECT h.id, h.url, h.created_at, h.removed_at,
                    count(*) FILTER (WHERE d.state = 'delivered'),
                    count(*) FILTER (WHERE d.state = 'pending'),
                    count(*) FILTER (WHERE d.state = 'failed')
               FROM hooks h LEFT JOIN hook_deliveries d ON d.hook_id = h.id
              GROUP BY h.id ORDER BY h.id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| HookRow {
                id: r.0,
                url: r.1,
                created_at: r.2,
                removed_at: r.3,
                delivered: r.4,
                pending: r.5,
                failed: r.6,
            })
            .collect())
    }

    /// The deliveries, newest first (of one hook with `hook`).
    pub async fn deliveries(
        &self,
        hook: Option<i64>,
        limit: i64,
    ) -> Result<Vec<DeliveryRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT hook_id, run_id, state, attempts, next_at, last_status, last_error, created_at, delivered_at
               FROM hook_deliveries WHERE ($1::bigint IS NULL OR hook_id = $1)
              ORDER BY created_at DESC, run_id DESC LIMIT $2",
        )
        .bind(hook)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Owes a delivery to every live hook for every verdict decided since it was added, then
    /// takes up to `limit` due ones, leasing each for `lease_seconds` (so that another
    /// server does not send it at the same time).
    pub async fn take_due_deliveries(
        &self,
        limit: i64,
        lease_seconds: f64,
    ) -> Result<Vec<DueDelivery>, StoreError> {
        sqlx::query(
            "INSERT INTO hook_deliveries (hook_id, run_id)
             SELECT h.id, v.run_id FROM hooks h JOIN verdicts v ON v.decided_at >= h.created_at
              WHERE h.removed_at IS NULL
                AND NOT EXISTS (SELECT 1 FROM hook_deliveries d WHERE d.hook_id = h.id AND d.run_id = v.run_id)
             ON CONFLICT DO NOTHING",
        )
        .execute(&self.pool)
        .await?;
        let rows: Vec<(i64, i64, i32, String, String)> = sqlx::query_as(
            "UPDATE hook_deliveries d SET next_at = now() + make_interval(secs => $2)
               FROM hooks h
              WHERE h.id = d.hook_id AND (d.hook_id, d.run_id) IN (
                    SELECT hook_id, run_id FROM hook_deliveries
                     WHERE state = 'pending' AND next_at <= now()
                     ORDER BY next_at LIMIT $1 FOR UPDATE SKIP LOCKED)
                AND h.removed_at IS NULL
             RETURNING d.hook_id, d.run_id, d.attempts, h.url, h.secret",
        )
        .bind(limit)
        .bind(lease_seconds)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (hook_id, run_id, attempts, url, secret) in rows {
            if let Some(verdict) = self.verdict(run_id).await? {
                out.push(DueDelivery {
                    hook_id,
                    run_id,
                    url,
                    secret,
                    attempts,
                    verdict,
                });
            }
        }
        Ok(out)
    }

    /// Records an attempt: delivered, or tried again at `retry_at` (`None`: given up).
    pub async fn record_delivery(
        &self,
        hook: i64,
        run: i64,
        status: Option<u16>,
        error: Option<&str>,
        delivered: bool,
        retry_in_seconds: Option<f64>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE hook_deliveries SET attempts = attempts + 1, last_status = $3, last_error = $4,
                    state = CASE WHEN $5 THEN 'delivered' WHEN $6::float8 IS NULL THEN 'failed' ELSE 'pending' END,
                    delivered_at = CASE WHEN $5 THEN now() END,
                    next_at = CASE WHEN $6::float8 IS NULL THEN next_at ELSE now() + make_interval(secs => $6) END
              WHERE hook_id = $1 AND run_id = $2",
        )
        .bind(hook)
        .bind(run)
        .bind(status.map(i32::from))
        .bind(error)
        .bind(delivered)
        .bind(retry_in_seconds)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
