//! Scheduled runs: each fire time of a schedule starts one run, across every worker.
//!
//! A worker looking at a schedule locks its row, lists the fire times due since the last one
//! recorded (or since the schedule became known), starts one run for the newest and records
//! the older ones as skipped, all in one transaction; the primary key of `sweep_fires`
//! (schedule, fire time) makes a second start of the same fire time impossible whatever
//! happens to the lock.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::engine::{create_run_in, notify};
use super::{Store, StoreError};
use crate::engine::workflow::Workflow;

/// What one look at a schedule started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Fired {
    pub run: i64,
    pub fire_at: DateTime<Utc>,
    /// Fire times missed while no worker ran, recorded as skipped (this run covers them).
    pub skipped: Vec<DateTime<Utc>>,
}

/// A fire time as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct FireRow {
    pub schedule: String,
    pub fire_at: DateTime<Utc>,
    pub state: String,
    pub run_id: Option<i64>,
    pub recorded_at: DateTime<Utc>,
}

impl Store {
    /// Starts the run of `workflow`'s newest fire time due at `now` over `targets`, unless
    /// it ran already; fire times between the last recorded one and it are recorded as
    /// skipped. `None` when nothing is due (or the workflow has no schedule).
    pub async fn fire_due(
        &self,
        workflow: &Workflow,
        targets: &[String],
        now: DateTime<Utc>,
    ) -> Result<Option<Fired>, StoreError> {
        let (Some(schedule), Some(sweep)) = (&workflow.schedule, &workflow.sweep) else {
            return Ok(None);
        };
        let mut tx = self.pool.begin().await?;
        // Known since the first look; a changed pattern or zone applies from now on.
        sqlx::query(
            "INSERT INTO sweep_schedules (name, cron, time_zone, since) VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO UPDATE
                SET cron = EXCLUDED.cron, time_zone = EXCLUDED.time_zone,
                    since = CASE WHEN (sweep_schedules.cron, sweep_schedules.time_zone)
                                      IS DISTINCT FROM (EXCLUDED.cron, EXCLUDED.time_zone)
                                 THEN EXCLUDED.since ELSE sweep_schedules.since END",
        )
        .bind(&workflow.name)
        .bind(&schedule.cron)
        .bind(&schedule.time_zone)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let (since, last): (DateTime<Utc>, Option<DateTime<Utc>>) = sqlx::query_as(
            "SELECT s.since, (SELECT max(fire_at) FROM sweep_fires f WHERE f.schedule = s.name)
               FROM sweep_schedules s WHERE s.name = $1 FOR UPDATE",
        )
        .bind(&workflow.name)
        .fetch_one(&mut *tx)
        .await?;
        let after = last.map_or(since, |l| l.max(since));
        let mut due = schedule.fires_between(after, now);
        let Some(fire_at) = due.pop() else {
            // The schedule is known from now on.
            tx.commit().await?;
            return Ok(None);
        };
        let run = create_run_in(&mut tx, workflow, None, targets, sweep.priority).await?;
        let inserted = sqlx::query(
            "INSERT INTO sweep_fires (schedule, fire_at, state, run_id) VALUES ($1, $2, 'fired', $3)
             ON CONFLICT DO NOTHING",
        )
        .bind(&workflow.name)
        .bind(fire_at)
        .bind(run)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            // Another worker started it: the run made here goes with the transaction.
            return Ok(None);
        }
        sqlx::query(
            "INSERT INTO sweep_fires (schedule, fire_at, state)
             SELECT $1, t, 'skipped' FROM unnest($2::timestamptz[]) AS t
             ON CONFLICT DO NOTHING",
        )
        .bind(&workflow.name)
        .bind(&due)
        .execute(&mut *tx)
        .await?;
        notify(&mut tx).await?;
        tx.commit().await?;
        tracing::info!(schedule = %workflow.name, %fire_at, run, skipped = due.len(), "scheduled run started");
        Ok(Some(Fired {
            run,
            fire_at,
            skipped: due,
        }))
    }

    /// The newest fire times of a schedule, newest first.
    pub async fn fires(&self, schedule: &str, limit: i64) -> Result<Vec<FireRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT schedule, fire_at, state, run_id, recorded_at FROM sweep_fires
              WHERE schedule = $1 ORDER BY fire_at DESC LIMIT $2",
        )
        .bind(schedule)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }
}

/// A cell of a sweep as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct SweepCellRow {
    pub run_id: i64,
    pub cell: String,
    pub state: String,
    pub reason: Option<String>,
    pub image_digest: Option<String>,
    pub layers: serde_json::Value,
    /// The class the sweep's report gave the cell.
    #[sqlx(default)]
    pub class: Option<String>,
    /// Its test results were pruned (the retention); the class stays.
    #[sqlx(default)]
    pub results_pruned: bool,
}

/// One test of a cell of a sweep.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct SweepResultRow {
    pub run_id: i64,
    pub cell: String,
    pub suite: String,
    pub name: String,
    pub status: String,
    pub output: String,
    /// The class the sweep's report gave the test.
    #[sqlx(default)]
    pub class: Option<String>,
}

impl Store {
    /// Records what a sweep found for one cell (replacing an earlier record of that cell in
    /// that sweep: a step retried writes it again), its results in the same transaction.
    pub async fn record_sweep_cell(
        &self,
        cell: &SweepCellRow,
        results: &[(String, String, String, String)],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM sweep_cells WHERE run_id = $1 AND cell = $2")
            .bind(cell.run_id)
            .bind(&cell.cell)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO sweep_cells (run_id, cell, state, reason, image_digest, layers)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(cell.run_id)
        .bind(&cell.cell)
        .bind(&cell.state)
        .bind(&cell.reason)
        .bind(&cell.image_digest)
        .bind(&cell.layers)
        .execute(&mut *tx)
        .await?;
        let (mut suites, mut names, mut statuses, mut outputs) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (suite, name, status, output) in results {
            suites.push(suite.as_str());
            names.push(name.as_str());
            statuses.push(status.as_str());
            outputs.push(output.as_str());
        }
        sqlx::query(
            "INSERT INTO sweep_results (run_id, cell, suite, name, status, output)
             SELECT $1, $2, s, n, st, o FROM unnest($3::text[], $4::text[], $5::text[], $6::text[])
                    AS t(s, n, st, o)
             ON CONFLICT DO NOTHING",
        )
        .bind(cell.run_id)
        .bind(&cell.cell)
        .bind(&suites)
        .bind(&names)
        .bind(&statuses)
        .bind(&outputs)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The cells a sweep recorded.
    pub async fn sweep_cells(&self, run: i64) -> Result<Vec<SweepCellRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT run_id, cell, state, reason, image_digest, layers, class, results_pruned
               FROM sweep_cells WHERE run_id = $1 ORDER BY cell",
        )
        .bind(run)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The test results a sweep recorded.
    pub async fn sweep_results(&self, run: i64) -> Result<Vec<SweepResultRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT run_id, cell, suite, name, status, output, class FROM sweep_results
              WHERE run_id = $1 ORDER BY cell, suite, name",
        )
        .bind(run)
        .fetch_all(&self.pool)
        .await?)
    }

    /// How many runs a workflow has had.
    pub async fn count_runs_of(&self, workflow: &str) -> Result<i64, StoreError> {
        let n: (i64,) = sqlx::query_as("SELECT count(*) FROM engine_runs WHERE workflow = $1")
            .bind(workflow)
            .fetch_one(&self.pool)
            .await?;
        Ok(n.0)
    }

    /// The runs of a workflow, newest first.
    pub async fn runs_of(
        &self,
        workflow: &str,
        limit: i64,
    ) -> Result<Vec<super::engine::RunRow>, StoreError> {
        self.runs_of_page(workflow, limit, 0, None).await
    }

    /// [`Store::runs_of`], skipping `offset` runs, or starting before run `before`.
    pub async fn runs_of_page(
        &self,
        workflow: &str,
        limit: i64,
        offset: i64,
        before: Option<i64>,
    ) -> Result<Vec<super::engine::RunRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT id, workflow, patch_id, revision, state, priority, cancel_reason, targets,
                    conflicts, created_at, finished_at
               FROM engine_runs WHERE workflow = $1 AND ($4::bigint IS NULL OR id < $4)
              ORDER BY id DESC LIMIT $2 OFFSET $3",
        )
        .bind(workflow)
        .bind(limit)
        .bind(offset)
        .bind(before)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The fire time a scheduled run was started for, and how many fire times before it
    /// (after the previous run's) were skipped.
    pub async fn fire_of_run(&self, run: i64) -> Result<Option<(DateTime<Utc>, i64)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT f.fire_at,
                    (SELECT count(*) FROM sweep_fires k
                      WHERE k.schedule = f.schedule AND k.state = 'skipped' AND k.fire_at < f.fire_at
                        AND k.fire_at > coalesce((SELECT max(p.fire_at) FROM sweep_fires p
                                                   WHERE p.schedule = f.schedule AND p.state = 'fired'
                                                     AND p.fire_at < f.fire_at), '-infinity'))
               FROM sweep_fires f WHERE f.run_id = $1",
        )
        .bind(run)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Records the classes a sweep's report gave its cells (cell, class) and tests (cell,
    /// suite, name, class), in one transaction.
    pub async fn set_sweep_classes(
        &self,
        run: i64,
        cells: &[(String, String)],
        tests: &[(String, String, String, String)],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let (names, classes): (Vec<&str>, Vec<&str>) =
            cells.iter().map(|(c, k)| (c.as_str(), k.as_str())).unzip();
        sqlx::query(
            "UPDATE sweep_cells c SET class = t.k
               FROM unnest($2::text[], $3::text[]) AS t(cell, k)
              WHERE c.run_id = $1 AND c.cell = t.cell",
        )
        .bind(run)
        .bind(&names)
        .bind(&classes)
        .execute(&mut *tx)
        .await?;
        let mut cols: [Vec<&str>; 4] = Default::default();
        for (c, su, n, k) in tests {
            cols[0].push(c);
            cols[1].push(su);
            cols[2].push(n);
            cols[3].push(k);
        }
        sqlx::query(
            "UPDATE sweep_results r SET class = t.k
               FROM unnest($2::text[], $3::text[], $4::text[], $5::text[]) AS t(cell, suite, name, k)
              WHERE r.run_id = $1 AND r.cell = t.cell AND r.suite = t.suite AND r.name = t.name",
        )
        .bind(run)
        .bind(&cols[0])
        .bind(&cols[1])
        .bind(&cols[2])
        .bind(&cols[3])
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Prunes the sweeps of `workflow` that ended before `before` down to their summaries:
    /// their test results go, each cell's state, reason, image and class stay. The last good
    /// sweep of each cell (it ran, and no test failed: passing, fixed or flaky) keeps its
    /// results. Returns how many cells' results were pruned.
    pub async fn prune_sweeps(
        &self,
        workflow: &str,
        before: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let pruned: Vec<(i64, String)> = sqlx::query_as(
            "WITH good AS (
                SELECT DISTINCT ON (c.cell) c.run_id, c.cell FROM sweep_cells c
                  JOIN engine_runs r ON r.id = c.run_id
                 WHERE r.workflow = $1 AND c.state = 'ran'
                   AND c.class IN ('passing', 'fixed', 'flaky')
                 ORDER BY c.cell, c.run_id DESC),
             old AS (
                SELECT c.run_id, c.cell FROM sweep_cells c JOIN engine_runs r ON r.id = c.run_id
                 WHERE r.workflow = $1 AND r.state <> 'running' AND r.finished_at < $2
                   AND NOT c.results_pruned
                   AND NOT EXISTS (SELECT 1 FROM good g WHERE g.run_id = c.run_id AND g.cell = c.cell)),
             d AS (
                DELETE FROM sweep_results s USING old
                 WHERE s.run_id = old.run_id AND s.cell = old.cell)
             UPDATE sweep_cells c SET results_pruned = true FROM old
              WHERE c.run_id = old.run_id AND c.cell = old.cell
             RETURNING c.run_id, c.cell",
        )
        .bind(workflow)
        .bind(before)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        if !pruned.is_empty() {
            tracing::info!(workflow, cells = pruned.len(), %before, "sweep results pruned");
        }
        Ok(pruned.len() as u64)
    }

    /// Layers by digest, as the image cache's mirror keeps them: digest, kind, inputs
    /// (repositories with their metadata digests, packages, configuration files) and every
    /// package installed once the layer is applied.
    pub async fn layers_by_digest(
        &self,
        digests: &[String],
    ) -> Result<Vec<(String, String, serde_json::Value, serde_json::Value)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT digest, kind, inputs, installed FROM image_layers WHERE digest = ANY($1)",
        )
        .bind(digests)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The sweeps of `workflow` in which `cell` ran, oldest first, each with the tests that
    /// failed in it (`suite/name`); `None` for a sweep whose results were pruned.
    pub async fn cell_history(
        &self,
        workflow: &str,
        cell: &str,
    ) -> Result<Vec<(SweepCellRow, Option<Vec<String>>)>, StoreError> {
        let rows: Vec<SweepCellRow> = sqlx::query_as(
            "SELECT c.run_id, c.cell, c.state, c.reason, c.image_digest, c.layers, c.class,
                    c.results_pruned
               FROM sweep_cells c JOIN engine_runs r ON r.id = c.run_id
              WHERE r.workflow = $1 AND c.cell = $2 AND c.state = 'ran' ORDER BY c.run_id",
        )
        .bind(workflow)
        .bind(cell)
        .fetch_all(&self.pool)
        .await?;
        let failing: Vec<(i64, String)> = sqlx::query_as(
            "SELECT run_id, suite || '/' || name FROM sweep_results
              WHERE cell = $1 AND status = 'fail' AND run_id = ANY($2)",
        )
        .bind(cell)
        .bind(rows.iter().map(|r| r.run_id).collect::<Vec<_>>())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let tests = (!r.results_pruned).then(|| {
                    failing
                        .iter()
                        .filter(|(id, _)| *id == r.run_id)
                        .map(|(_, t)| t.clone())
                        .collect()
                });
                (r, tests)
            })
            .collect())
    }

    /// VMs requested between two instants: all, and those not named after run `run` (a
    /// sweep's flakiness retries run under names of their own).
    pub async fn vms_requested_between(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        run: i64,
    ) -> Result<(i64, i64), StoreError> {
        Ok(sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE name NOT LIKE $3)
               FROM vm_runs WHERE requested_at BETWEEN $1 AND $2",
        )
        .bind(from)
        .bind(to)
        .bind(format!("certo-r{run}-%"))
        .fetch_one(&self.pool)
        .await?)
    }
}

impl Store {
    /// What a sweep's view depends on, cheaply: the run (the newest of `workflow` without
    /// `id`), its state and end, how many cells it recorded and when it last did. A view
    /// computed for the same answer is the same view.
    pub async fn sweep_version(
        &self,
        workflow: &str,
        id: Option<i64>,
    ) -> Result<Option<(i64, String)>, StoreError> {
        let row: Option<(i64, String)> = sqlx::query_as(
            "SELECT r.id, concat_ws('|', r.state, r.finished_at, c.n, c.last, c.classes)
               FROM engine_runs r,
                    LATERAL (SELECT count(*) AS n, max(recorded_at) AS last,
                                    count(class) AS classes
                               FROM sweep_cells WHERE run_id = r.id) c
              WHERE r.workflow = $1 AND ($2::bigint IS NULL OR r.id = $2)
              ORDER BY r.id DESC LIMIT 1",
        )
        .bind(workflow)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row)
    }
}
