//! The workflow engine's storage: runs and their steps as rows, claimed by workers.
//!
//! The protocol (docs/ARCHITECTURE.md, the engine):
//! - **Claim**: one statement takes up to `n` runnable steps (or running ones whose lease has
//!   expired: their worker is gone) with `FOR UPDATE SKIP LOCKED`, so two workers never take
//!   the same step, marks them running under a lease counted by the database's clock, and
//!   raises each one's **epoch**.
//! - **Fencing**: every later write of a step names the epoch its worker holds; a write from
//!   an older epoch (a worker that lost its lease and was replaced) matches no row and
//!   changes nothing.
//! - **Completion** and the successors it makes runnable are one transaction, which ends with
//!   one `NOTIFY certo_engine` (no payload) to wake idle workers.

use std::time::Duration;

use super::{Store, StoreError};
use crate::engine::workflow::{Scope, Workflow};
use crate::model::PatchId;

/// The channel idle workers listen on.
pub const NOTIFY_CHANNEL: &str = "certo_engine";

/// A step a worker has claimed: it may act for it while it holds `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub step: i64,
    pub run: i64,
    /// `""` for a per-run step, else the target.
    pub target: String,
    pub name: String,
    pub epoch: i64,
    pub attempt: i32,
}

/// How a claimed step ended.
#[derive(Debug, Clone, PartialEq)]
pub enum StepEnd {
    Passed(serde_json::Value),
    Failed(serde_json::Value),
    /// Failed, to be tried again after the delay (the workflow's retry policy said so).
    Retry {
        after: Duration,
        why: serde_json::Value,
    },
}

/// A step's state as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StepRow {
    pub id: i64,
    pub target: String,
    pub name: String,
    pub state: String,
    pub attempt: i32,
    pub epoch: i64,
}

impl Store {
    /// Creates a run of `workflow` over `targets`: every step of the run at once (per-target
    /// steps once per target), in one transaction; steps that need nothing are runnable.
    pub async fn create_run(
        &self,
        workflow: &Workflow,
        patch: Option<(PatchId, i32)>,
        targets: &[String],
    ) -> Result<i64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let (run,): (i64,) = sqlx::query_as(
            "INSERT INTO engine_runs (workflow, patch_id, revision) VALUES ($1, $2, $3) RETURNING id",
        )
        .bind(&workflow.name)
        .bind(patch.map(|(p, _)| p.0 as i64))
        .bind(patch.map(|(_, r)| r))
        .fetch_one(&mut *tx)
        .await?;
        // Steps come in an order where each follows what it needs (Workflow guarantees it).
        let mut ids: std::collections::HashMap<(String, String), i64> = Default::default();
        for step in &workflow.steps {
            let instances: Vec<String> = match step.scope {
                Scope::Run => vec![String::new()],
                Scope::Target => targets.to_vec(),
            };
            for target in instances {
                let mut needs: Vec<i64> = Vec::new();
                for need in &step.needs {
                    let scope = workflow.step(need).map_or(Scope::Run, |s| s.scope);
                    match (scope, step.scope) {
                        (Scope::Run, _) => needs.extend(ids.get(&(String::new(), need.clone()))),
                        (Scope::Target, Scope::Target) => {
                            needs.extend(ids.get(&(target.clone(), need.clone())));
                        }
                        // A per-run step after a per-target one waits for every target's.
                        (Scope::Target, Scope::Run) => {
                            needs.extend(
                                targets
                                    .iter()
                                    .filter_map(|t| ids.get(&(t.clone(), need.clone()))),
                            );
                        }
                    }
                }
                let (id,): (i64,) = sqlx::query_as(
                    "INSERT INTO engine_steps (run_id, target, name, state, needs, always)
                     VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
                )
                .bind(run)
                .bind(&target)
                .bind(&step.name)
                .bind(if needs.is_empty() {
                    "runnable"
                } else {
                    "waiting"
                })
                .bind(&needs)
                .bind(step.always)
                .fetch_one(&mut *tx)
                .await?;
                ids.insert((target, step.name.clone()), id);
            }
        }
        notify(&mut tx).await?;
        tx.commit().await?;
        Ok(run)
    }

    /// Claims up to `n` steps for `worker`: runnable ones whose time has come, and running ones
    /// whose lease expired. Each claim raises the step's epoch and starts a new attempt.
    pub async fn claim_steps(
        &self,
        worker: &str,
        n: i64,
        lease: Duration,
    ) -> Result<Vec<Claim>, StoreError> {
        let rows: Vec<(i64, i64, String, String, i64, i32)> = sqlx::query_as(
            "UPDATE engine_steps s
                SET state = 'running', worker = $1, epoch = s.epoch + 1, attempt = s.attempt + 1,
                    lease_until = now() + make_interval(secs => $3)
               FROM (SELECT id FROM engine_steps
                      WHERE (state = 'runnable' AND run_after <= now())
                         OR (state = 'running' AND lease_until < now())
                      ORDER BY run_after, id
                      FOR UPDATE SKIP LOCKED
                      LIMIT $2) c
              WHERE s.id = c.id
          RETURNING s.id, s.run_id, s.target, s.name, s.epoch, s.attempt",
        )
        .bind(worker)
        .bind(n)
        .bind(lease.as_secs_f64())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(step, run, target, name, epoch, attempt)| Claim {
                step,
                run,
                target,
                name,
                epoch,
                attempt,
            })
            .collect())
    }

    /// Extends a claim's lease; `false` when the claim is stale (another worker holds the step).
    pub async fn extend_lease(&self, claim: &Claim, lease: Duration) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE engine_steps SET lease_until = now() + make_interval(secs => $3)
              WHERE id = $1 AND epoch = $2 AND state = 'running'",
        )
        .bind(claim.step)
        .bind(claim.epoch)
        .bind(lease.as_secs_f64())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Ends a claimed step and, in the same transaction, makes its successors runnable (or
    /// cancels those that can no longer run), ends the run when nothing is left, and notifies
    /// idle workers. `false`, and nothing changed, when the claim is stale.
    pub async fn finish_step(&self, claim: &Claim, end: StepEnd) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let (state, outcome, after) = match &end {
            StepEnd::Passed(o) => ("passed", o, 0.0),
            StepEnd::Failed(o) => ("failed", o, 0.0),
            StepEnd::Retry { after, why } => ("runnable", why, after.as_secs_f64()),
        };
        let r = sqlx::query(
            "UPDATE engine_steps
                SET state = $3, outcome = $4, worker = NULL, lease_until = NULL,
                    run_after = now() + make_interval(secs => $5)
              WHERE id = $1 AND epoch = $2 AND state = 'running'",
        )
        .bind(claim.step)
        .bind(claim.epoch)
        .bind(state)
        .bind(outcome)
        .bind(after)
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() != 1 {
            tracing::warn!(
                step = claim.step,
                epoch = claim.epoch,
                "a stale claim's write refused"
            );
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO engine_events (step_id, epoch, kind, detail) VALUES ($1, $2, $3, $4)",
        )
        .bind(claim.step)
        .bind(claim.epoch)
        .bind(if matches!(end, StepEnd::Retry { .. }) {
            "retry"
        } else {
            state
        })
        .bind(outcome)
        .execute(&mut *tx)
        .await?;
        advance(&mut tx, claim.run).await?;
        notify(&mut tx).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// The steps of a run, in creation order.
    pub async fn run_steps(&self, run: i64) -> Result<Vec<StepRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT id, target, name, state, attempt, epoch FROM engine_steps WHERE run_id = $1 ORDER BY id",
        )
        .bind(run)
        .fetch_all(&self.pool)
        .await?)
    }

    /// A run's state: running, passed, failed, cancelled.
    pub async fn run_state(&self, run: i64) -> Result<Option<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT state FROM engine_runs WHERE id = $1")
                .bind(run)
                .fetch_optional(&self.pool)
                .await?,
        )
    }
}

/// After a step ended: cancels waiting steps that can no longer run (a need failed or was
/// cancelled; always-steps excepted), repeatedly, then makes runnable every waiting step
/// whose needs are met (passed; for an always-step: ended, however), and ends the run when
/// no step is left to run.
async fn advance(tx: &mut sqlx::PgConnection, run: i64) -> Result<(), StoreError> {
    loop {
        let r = sqlx::query(
            "UPDATE engine_steps s SET state = 'cancelled'
              WHERE s.run_id = $1 AND s.state = 'waiting' AND NOT s.always
                AND EXISTS (SELECT 1 FROM engine_steps d
                             WHERE d.id = ANY(s.needs) AND d.state IN ('failed', 'cancelled'))",
        )
        .bind(run)
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() == 0 {
            break;
        }
    }
    sqlx::query(
        "UPDATE engine_steps s SET state = 'runnable', run_after = now()
          WHERE s.run_id = $1 AND s.state = 'waiting'
            AND NOT EXISTS (SELECT 1 FROM engine_steps d
                             WHERE d.id = ANY(s.needs)
                               AND (CASE WHEN s.always THEN d.state NOT IN ('passed', 'failed', 'cancelled')
                                         ELSE d.state <> 'passed' END))",
    )
    .bind(run)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE engine_runs r
            SET state = CASE WHEN EXISTS (SELECT 1 FROM engine_steps s WHERE s.run_id = r.id AND s.state <> 'passed')
                             THEN 'failed' ELSE 'passed' END,
                finished_at = now()
          WHERE r.id = $1 AND r.state = 'running'
            AND NOT EXISTS (SELECT 1 FROM engine_steps s
                             WHERE s.run_id = r.id AND s.state IN ('waiting', 'runnable', 'running'))",
    )
    .bind(run)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

async fn notify(tx: &mut sqlx::PgConnection) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(NOTIFY_CHANNEL)
        .execute(&mut *tx)
        .await?;
    Ok(())
}
