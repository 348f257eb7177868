//! What `/metrics` reports, read in a few aggregate queries (a scrape does not grow with
//! the number of runs kept, only the work of the database does).

use std::collections::BTreeMap;

use super::{Store, StoreError};

/// The upper bounds of the step-duration histogram's buckets (seconds).
pub const DURATION_BUCKETS: [f64; 11] = [
    0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];

/// One step name's durations: cumulative counts per bucket, count, sum.
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    pub buckets: Vec<i64>,
    pub count: i64,
    pub sum: f64,
}

/// Everything `/metrics` shows.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// Steps by state (runnable, running, waiting...) of runs in flight, and runs by state.
    pub steps_by_state: BTreeMap<String, i64>,
    pub runs_by_state: BTreeMap<String, i64>,
    /// Finished steps' durations, by step name.
    pub step_seconds: BTreeMap<String, Histogram>,
    /// Verdicts by kind (certified, rejected, incomplete, cancelled).
    pub verdicts: BTreeMap<String, i64>,
    /// Attempts beyond the first of every step (each one an infrastructure retry).
    pub retries: i64,
    pub hosts: i64,
    pub hosts_quarantined: i64,
    /// Layers taken from the cache and layers built, over every build step.
    pub layer_hits: i64,
    pub layer_misses: i64,
    /// Transfers: bytes sent on the wire, and bytes of the images they delivered.
    pub bytes_sent: i64,
    pub bytes_total: i64,
    pub users: i64,
}

impl Store {
    pub async fn metrics(&self) -> Result<Metrics, StoreError> {
        let mut m = Metrics::default();
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT s.state, count(*) FROM engine_steps s JOIN engine_runs r ON r.id = s.run_id
              WHERE r.state = 'running' GROUP BY s.state",
        )
        .fetch_all(&self.pool)
        .await?;
        m.steps_by_state = rows.into_iter().collect();
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, count(*) FROM engine_runs GROUP BY state")
                .fetch_all(&self.pool)
                .await?;
        m.runs_by_state = rows.into_iter().collect();
        let bounds: Vec<f64> = DURATION_BUCKETS.to_vec();
        let rows: Vec<(String, Vec<i64>, i64, f64)> = sqlx::query_as(
            "WITH d AS (SELECT name, extract(epoch FROM finished_at - started_at)::float8 AS s
                          FROM engine_steps WHERE finished_at IS NOT NULL AND started_at IS NOT NULL)
             SELECT name,
                    ARRAY(SELECT count(*) FILTER (WHERE d2.s <= b) FROM d d2, unnest($1::float8[]) WITH ORDINALITY AS u(b, i)
                           WHERE d2.name = d.name GROUP BY i ORDER BY i),
                    count(*), coalesce(sum(s), 0)::float8
               FROM d GROUP BY name ORDER BY name",
        )
        .bind(&bounds)
        .fetch_all(&self.pool)
        .await?;
        for (name, buckets, count, sum) in rows {
            m.step_seconds.insert(
                name,
                Histogram {
                    buckets,
                    count,
                    sum,
                },
            );
        }
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT verdict, count(*) FROM verdicts GROUP BY verdict")
                .fetch_all(&self.pool)
                .await?;
        m.verdicts = rows.into_iter().collect();
        let (retries, hosts, quarantined, users): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT coalesce(sum(greatest(attempt - 1, 0)), 0)::bigint FROM engine_steps),
                    (SELECT count(*) FROM hosts),
                    (SELECT count(*) FROM hosts WHERE quarantined_at IS NOT NULL),
                    (SELECT count(*) FROM users WHERE revoked_at IS NULL)",
        )
        .fetch_one(&self.pool)
        .await?;
        (m.retries, m.hosts, m.hosts_quarantined, m.users) = (retries, hosts, quarantined, users);
        let (hits, misses): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE l->>'outcome' = 'cached'), count(*) FILTER (WHERE l->>'outcome' = 'built')
               FROM engine_steps s, jsonb_each(s.outcome) e, jsonb_array_elements(
                      CASE WHEN jsonb_typeof(e.value->'layers') = 'array' THEN e.value->'layers' ELSE '[]'::jsonb END) l
              WHERE s.name = 'build' AND s.state = 'passed' AND jsonb_typeof(s.outcome) = 'object'",
        )
        .fetch_one(&self.pool)
        .await?;
        (m.layer_hits, m.layer_misses) = (hits, misses);
        let (sent, total): (i64, i64) = sqlx::query_as(
            "SELECT coalesce(sum((outcome->>'bytes_sent')::bigint), 0)::bigint,
                    coalesce(sum((outcome->>'bytes_total')::bigint), 0)::bigint
               FROM engine_steps WHERE name = 'transfer' AND state = 'passed'
                AND outcome ? 'bytes_total'",
        )
        .fetch_one(&self.pool)
        .await?;
        (m.bytes_sent, m.bytes_total) = (sent, total);
        Ok(m)
    }
}

/// Transfers and layer-cache use, per host and per day: what the layered images and the
/// delta transfers saved.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Savings {
    /// (host, transfers, bytes sent, bytes of the images delivered)
    pub by_host: Vec<(String, i64, i64, i64)>,
    /// (day, transfers, bytes sent, bytes delivered, layers cached, layers built)
    pub by_day: Vec<(String, i64, i64, i64, i64, i64)>,
}

impl Store {
    pub async fn savings(&self, days: i32) -> Result<Savings, StoreError> {
        let by_host: Vec<(String, i64, i64, i64)> = sqlx::query_as(
            "SELECT coalesce(outcome->>'host', host, '?'), count(*),
                    coalesce(sum((outcome->>'bytes_sent')::bigint), 0)::bigint,
                    coalesce(sum((outcome->>'bytes_total')::bigint), 0)::bigint
               FROM engine_steps WHERE name = 'transfer' AND state = 'passed' AND outcome ? 'bytes_total'
              GROUP BY 1 ORDER BY 1",
        )
        .fetch_all(&self.pool)
        .await?;
        let by_day: Vec<(String, i64, i64, i64, i64, i64)> = sqlx::query_as(
            "WITH t AS (
               SELECT date_trunc('day', finished_at) AS day, count(*) AS n,
                      coalesce(sum((outcome->>'bytes_sent')::bigint), 0)::bigint AS sent,
                      coalesce(sum((outcome->>'bytes_total')::bigint), 0)::bigint AS total
                 FROM engine_steps WHERE name = 'transfer' AND state = 'passed' AND outcome ? 'bytes_total'
                  AND finished_at > now() - make_interval(days => $1)
                GROUP BY 1),
             l AS (
               SELECT date_trunc('day', s.finished_at) AS day,
                      count(*) FILTER (WHERE l->>'outcome' = 'cached') AS hits,
                      count(*) FILTER (WHERE l->>'outcome' = 'built') AS misses
                 FROM engine_steps s, jsonb_each(s.outcome) e, jsonb_array_elements(
                        CASE WHEN jsonb_typeof(e.value->'layers') = 'array' THEN e.value->'layers' ELSE '[]'::jsonb END) l
                WHERE s.name = 'build' AND s.state = 'passed' AND jsonb_typeof(s.outcome) = 'object'
                  AND s.finished_at > now() - make_interval(days => $1)
                GROUP BY 1)
             SELECT to_char(coalesce(t.day, l.day), 'YYYY-MM-DD'), coalesce(t.n, 0), coalesce(t.sent, 0),
                    coalesce(t.total, 0), coalesce(l.hits, 0), coalesce(l.misses, 0)
               FROM t FULL JOIN l ON l.day = t.day ORDER BY 1",
        )
        .bind(days)
        .fetch_all(&self.pool)
        .await?;
        Ok(Savings { by_host, by_day })
    }
}
