//! Images people asked the dashboard for, and how each build went (see the migration
//! `…12_image_builds.sql`).

use chrono::{DateTime, Utc};
use sqlx::types::Json;

use super::{Store, StoreError};

/// How long a running build may go without a heartbeat before it counts as interrupted
/// (its server stopped).
pub const HEARTBEAT_STALE_SECONDS: i64 = 30;

/// One asked-for image build.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImageBuildRow {
    pub id: i64,
    pub requested_by: String,
    pub release: String,
    pub platform: String,
    pub top: String,
    pub packages: Vec<String>,
    pub formats: Vec<String>,
    /// `running`, `built`, `failed`; a running build without a recent heartbeat is shown
    /// as `interrupted` ([`ImageBuildRow::shown_state`]).
    pub state: String,
    /// The build's events, each `{"at": RFC 3339, "text": ...}`, in order.
    pub events: serde_json::Value,
    pub image_digest: Option<String>,
    pub error: Option<String>,
    pub requested_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl ImageBuildRow {
    /// The state as a person should read it: a running build whose server has not beaten
    /// for [`HEARTBEAT_STALE_SECONDS`] is `interrupted`.
    pub fn shown_state(&self) -> &str {
        if self.state == "running"
            && (Utc::now() - self.heartbeat_at).num_seconds() > HEARTBEAT_STALE_SECONDS
        {
            "interrupted"
        } else {
            &self.state
        }
    }
}

type Row = (
    i64,
    String,
    String,
    String,
    String,
    Vec<String>,
    Vec<String>,
    String,
    Json<serde_json::Value>,
    Option<String>,
    Option<String>,
    DateTime<Utc>,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
);

const COLUMNS: &str = "id, requested_by, release, platform, top, packages, formats, state, events,
     image_digest, error, requested_at, heartbeat_at, finished_at";

fn of(r: Row) -> ImageBuildRow {
    ImageBuildRow {
        id: r.0,
        requested_by: r.1,
        release: r.2,
        platform: r.3,
        top: r.4,
        packages: r.5,
        formats: r.6,
        state: r.7,
        events: r.8.0,
        image_digest: r.9,
        error: r.10,
        requested_at: r.11,
        heartbeat_at: r.12,
        finished_at: r.13,
    }
}

impl Store {
    /// Records that `user` asked for an image build; returns its id.
    pub async fn start_image_build(
        &self,
        user: &str,
        release: &str,
        platform: &str,
        top: &str,
        packages: &[String],
        formats: &[String],
    ) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "INSERT INTO image_builds (requested_by, release, platform, top, packages, formats)
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        )
        .bind(user)
        .bind(release)
        .bind(platform)
        .bind(top)
        .bind(packages)
        .bind(formats)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Appends events to a running build (and beats its heartbeat).
    pub async fn image_build_events(&self, id: i64, texts: &[String]) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE image_builds
                SET events = events || (SELECT coalesce(jsonb_agg(jsonb_build_object(
                                 'at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
                                 'text', t) ORDER BY n), '[]'::jsonb)
                                 FROM unnest($2::text[]) WITH ORDINALITY AS x(t, n)),
                    heartbeat_at = now()
              WHERE id = $1 AND state = 'running'",
        )
        .bind(id)
        .bind(texts)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Ends a build: built (with its image) or failed (with why).
    pub async fn finish_image_build(
        &self,
        id: i64,
        image: Option<&str>,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE image_builds SET state = CASE WHEN $3::text IS NULL THEN 'built' ELSE 'failed' END,
                    image_digest = $2, error = $3, finished_at = now(), heartbeat_at = now()
              WHERE id = $1 AND state = 'running'",
        )
        .bind(id)
        .bind(image)
        .bind(error)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// One build.
    pub async fn image_build(&self, id: i64) -> Result<Option<ImageBuildRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM image_builds WHERE id = $1");
        let r: Option<Row> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(r.map(of))
    }

    /// The newest builds, newest first.
    pub async fn recent_image_builds(&self, limit: i64) -> Result<Vec<ImageBuildRow>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM image_builds ORDER BY requested_at DESC, id DESC LIMIT $1"
        );
        let r: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        Ok(r.into_iter().map(of).collect())
    }
}
