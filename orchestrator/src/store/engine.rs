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

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

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
    /// The run's workflow (its retry policies and timeouts apply).
    pub workflow: String,
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
    /// Not done and not failed: to be taken again after the delay without using an attempt
    /// (e.g. no host has a free slot yet).
    Defer {
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
        self.create_run_with_priority(workflow, patch, targets, 0)
            .await
    }

    /// Creates a run like [`Store::create_run`], with a claim priority (higher first).
    pub async fn create_run_with_priority(
        &self,
        workflow: &Workflow,
        patch: Option<(PatchId, i32)>,
        targets: &[String],
        priority: i32,
    ) -> Result<i64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let run = create_run_in(&mut tx, workflow, patch, targets, priority).await?;
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
        self.claim_steps_of(worker, n, lease, None).await
    }

    /// Claims like [`Store::claim_steps`], only steps of runs of the given workflows.
    pub async fn claim_steps_of(
        &self,
        worker: &str,
        n: i64,
        lease: Duration,
        workflows: Option<&[String]>,
    ) -> Result<Vec<Claim>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        claim_in(
            &mut conn,
            &ClaimAsk {
                worker,
                n,
                lease,
                workflows,
            },
        )
        .await
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
        let (done, _) = self.finish_and_claim(&[(claim.clone(), end)], None).await?;
        Ok(done[0])
    }

    /// Ends several claimed steps and then claims more, in one transaction (one commit for
    /// a worker's whole round): each step's write is fenced by its epoch as in
    /// [`Store::finish_step`] (`false` in its place when stale), successors are made
    /// runnable, runs with nothing left are ended, and `next` asks for new claims, which see
    /// the successors just woken. The transaction notifies idle workers only when it made
    /// runnable more steps than it claimed itself.
    pub async fn finish_and_claim(
        &self,
        ends: &[(Claim, StepEnd)],
        next: Option<ClaimAsk<'_>>,
    ) -> Result<(Vec<bool>, Vec<Claim>), StoreError> {
        // Lock waits between workers are ordered so as not to deadlock; should PostgreSQL
        // still find one (a cancel against a completion), the transaction is simply redone.
        let mut tries = 0;
        loop {
            match self.finish_and_claim_once(ends, next).await {
                Err(StoreError::Db(sqlx::Error::Database(e)))
                    if tries < 5 && matches!(e.code().as_deref(), Some("40P01" | "40001")) =>
                {
                    tries += 1;
                    tracing::debug!(error = %e, tries, "engine transaction redone");
                }
                other => return other,
            }
        }
    }

    async fn finish_and_claim_once(
        &self,
        ends: &[(Claim, StepEnd)],
        next: Option<ClaimAsk<'_>>,
    ) -> Result<(Vec<bool>, Vec<Claim>), StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut done = vec![false; ends.len()];
        let mut woke = 0u64;
        if !ends.is_empty() {
            let mut runs: Vec<i64> = ends.iter().map(|(c, _)| c.run).collect();
            runs.sort_unstable();
            runs.dedup();
            let mut ids = Vec::with_capacity(ends.len());
            let mut epochs = Vec::with_capacity(ends.len());
            let mut states = Vec::with_capacity(ends.len());
            let mut outcomes = Vec::with_capacity(ends.len());
            let mut afters = Vec::with_capacity(ends.len());
            let mut kinds = Vec::with_capacity(ends.len());
            let mut step_runs = Vec::with_capacity(ends.len());
            for (claim, end) in ends {
                let (state, outcome, after, kind) = match end {
                    StepEnd::Passed(o) => ("passed", o, 0.0, "passed"),
                    StepEnd::Failed(o) => ("failed", o, 0.0, "failed"),
                    StepEnd::Retry { after, why } => {
                        ("runnable", why, after.as_secs_f64(), "retry")
                    }
                    StepEnd::Defer { after, why } => {
                        ("runnable", why, after.as_secs_f64(), "defer")
                    }
                };
                ids.push(claim.step);
                epochs.push(claim.epoch);
                states.push(state);
                outcomes.push(outcome.clone());
                afters.push(after);
                kinds.push(kind);
                step_runs.push(claim.run);
            }
            // One statement: each step's own write and its event (nothing when stale), and
            // the locks that keep completions of one run from missing each other:
            // - a pass locks the successors still waiting for it (two passes a successor
            //   needs both of are serialised, and the later one sees the earlier one's);
            // - a failure, or a pass nothing needs, may end the run: it locks the run's row
            //   (taken first, in one order). Completions of other runs, and passes of
            //   separate chains of one run, do not wait for each other.
            let updated: Vec<Ended> = sqlx::query_as(
                "WITH i AS (SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::jsonb[],
                                                 $5::float8[], $6::text[], $7::bigint[])
                                       AS t(id, epoch, state, outcome, after, kind, run)),
                 l AS (SELECT r.id FROM engine_runs r
                        WHERE r.id IN (SELECT i.run FROM i
                                        WHERE i.kind = 'failed'
                                           OR (i.kind = 'passed' AND NOT EXISTS (
                                                 SELECT 1 FROM engine_steps w
                                                  WHERE w.run_id = i.run AND i.id = ANY(w.needs))))
                        ORDER BY r.id FOR UPDATE),
                 u AS (
                    UPDATE engine_steps s
                       SET state = i.state, outcome = i.outcome, worker = NULL, lease_until = NULL,
                           run_after = now() + make_interval(secs => i.after),
                           finished_at = CASE WHEN i.state = 'runnable' THEN NULL ELSE now() END,
                           attempt = s.attempt - CASE WHEN i.kind = 'defer' THEN 1 ELSE 0 END
                      FROM i
                     WHERE s.id = i.id AND s.epoch = i.epoch AND s.state = 'running'
                       AND (SELECT count(*) FROM l) >= 0
                 RETURNING s.id, s.run_id, i.kind, i.epoch, i.outcome),
                 e AS (
                    INSERT INTO engine_events (step_id, epoch, kind, detail)
                    SELECT id, epoch, kind, outcome FROM u WHERE kind <> 'defer'),
                 succ AS (
                    SELECT w.id, w.needs FROM engine_steps w
                     WHERE w.run_id = ANY($8) AND w.state = 'waiting'
                       AND w.needs && ARRAY(SELECT id FROM u WHERE kind = 'passed')
                     ORDER BY w.id FOR UPDATE)
                 SELECT u.id, u.run_id, u.kind,
                        (SELECT count(*) FROM succ WHERE u.id = ANY(succ.needs)),
                        (SELECT array_agg(id) FROM l) || ARRAY(SELECT count(*) FROM succ)
                   FROM u",
            )
            .bind(&ids)
            .bind(&epochs)
            .bind(&states)
            .bind(&outcomes)
            .bind(&afters)
            .bind(&kinds)
            .bind(&step_runs)
            .bind(&runs)
            .fetch_all(&mut *tx)
            .await?;
            for (i, (claim, _)) in ends.iter().enumerate() {
                done[i] = updated.iter().any(|(id, ..)| *id == claim.step);
                if !done[i] {
                    tracing::warn!(
                        step = claim.step,
                        epoch = claim.epoch,
                        "a stale claim's write refused"
                    );
                }
            }
            // The runs locked above (the last element is the successors' count, there only
            // to make the statement lock them all).
            let mut locked: Vec<i64> = updated
                .first()
                .and_then(|(.., l)| l.clone())
                .unwrap_or_default();
            locked.pop();
            // A pass whose successors all ended already (a cancel took them) may end the
            // run too: its row is locked now, late (a deadlock this way is redone above).
            let late: Vec<i64> = updated
                .iter()
                .filter(|(_, run, k, n, _)| k == "passed" && *n == 0 && !locked.contains(run))
                .map(|(_, run, ..)| *run)
                .collect();
            if !late.is_empty() {
                sqlx::query("SELECT id FROM engine_runs WHERE id = ANY($1) ORDER BY id FOR UPDATE")
                    .bind(&late)
                    .execute(&mut *tx)
                    .await?;
                locked.extend(late);
            }
            // A retry or a deferral changes nothing else, and nothing is due now to wake a
            // worker for (pollers find it when it is). A pass cancels nothing: only its
            // successors may become runnable. A failure may cancel what needs it.
            let passed: Vec<i64> = updated
                .iter()
                .filter(|(_, _, k, n, _)| k == "passed" && *n > 0)
                .map(|(id, ..)| *id)
                .collect();
            if !passed.is_empty() {
                woke += sqlx::query(
                    "UPDATE engine_steps s SET state = 'runnable', run_after = now()
                      WHERE s.run_id = ANY($1) AND s.state = 'waiting' AND s.needs && $2
                        AND NOT EXISTS (SELECT 1 FROM engine_steps d
                                         WHERE d.id = ANY(s.needs)
                                           AND (CASE WHEN s.always THEN d.state NOT IN ('passed', 'failed', 'cancelled')
                                                     ELSE d.state <> 'passed' END))",
                )
                .bind(&runs)
                .bind(&passed)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            }
            let mut failed_runs: Vec<i64> = updated
                .iter()
                .filter(|(_, _, k, ..)| k == "failed")
                .map(|(_, run, ..)| *run)
                .collect();
            failed_runs.sort_unstable();
            failed_runs.dedup();
            if !failed_runs.is_empty() {
                woke += advance(&mut tx, &failed_runs).await?;
            }
            if !locked.is_empty() {
                end_runs_if_done(&mut tx, &locked).await?;
            }
        }
        let claims = match next {
            Some(ask) if ask.n > 0 => claim_in(&mut tx, &ask).await?,
            _ => Vec::new(),
        };
        if woke > claims.len() as u64 {
            notify(&mut tx).await?;
        }
        tx.commit().await?;
        Ok((done, claims))
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

/// Creates a run's rows inside the caller's transaction (see [`Store::create_run`]).
pub(super) async fn create_run_in(
    conn: &mut sqlx::PgConnection,
    workflow: &Workflow,
    patch: Option<(PatchId, i32)>,
    targets: &[String],
    priority: i32,
) -> Result<i64, StoreError> {
    let (run,): (i64,) = sqlx::query_as(
        "INSERT INTO engine_runs (workflow, patch_id, revision, priority, targets)
         VALUES ($1, $2, $3, $4, $5) RETURNING id",
    )
    .bind(&workflow.name)
    .bind(patch.map(|(p, _)| p.0 as i64))
    .bind(patch.map(|(_, r)| r))
    .bind(priority)
    .bind(targets)
    .fetch_one(&mut *conn)
    .await?;
    // Steps come in an order where each follows what it needs (Workflow guarantees it).
    let mut ids: HashMap<(String, String), i64> = Default::default();
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
            .fetch_one(&mut *conn)
            .await?;
            ids.insert((target, step.name.clone()), id);
        }
    }
    Ok(run)
}

/// A step the completion statement ended: id, run, kind, how many of its successors it
/// locked, and the runs it locked (followed by the successors' count).
type Ended = (i64, i64, String, i64, Option<Vec<i64>>);

/// What a worker asks to claim: up to `n` steps, under a lease, of the given workflows
/// (all when `None`).
#[derive(Debug, Clone, Copy)]
pub struct ClaimAsk<'a> {
    pub worker: &'a str,
    pub n: i64,
    pub lease: Duration,
    pub workflows: Option<&'a [String]>,
}

/// The claim statement: runnable steps whose time has come, and running ones whose lease
/// expired; each claim raises the step's epoch and starts a new attempt. Higher-priority
/// runs first (certifiers' runs before sweeps), then the oldest runs.
async fn claim_in(
    conn: &mut sqlx::PgConnection,
    ask: &ClaimAsk<'_>,
) -> Result<Vec<Claim>, StoreError> {
    let rows: Vec<(i64, i64, String, String, i64, i32, String)> = sqlx::query_as(
        "UPDATE engine_steps s
                SET state = 'running', worker = $1, epoch = nextval('engine_epoch_seq'),
                    attempt = s.attempt + 1, started_at = now(), finished_at = NULL,
                    lease_until = now() + make_interval(secs => $3)
               FROM (SELECT st.id, r.workflow FROM engine_steps st JOIN engine_runs r ON r.id = st.run_id
                      WHERE ((st.state = 'runnable' AND st.run_after <= now())
                             OR (st.state = 'running' AND st.lease_until < now()))
                        AND ($4::text[] IS NULL OR r.workflow = ANY($4))
                      ORDER BY r.priority DESC, st.run_id, st.id
                      FOR UPDATE OF st SKIP LOCKED
                      LIMIT $2) c
              WHERE s.id = c.id
          RETURNING s.id, s.run_id, s.target, s.name, s.epoch, s.attempt, c.workflow",
    )
    .bind(ask.worker)
    .bind(ask.n)
    .bind(ask.lease.as_secs_f64())
    .bind(ask.workflows)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(step, run, target, name, epoch, attempt, workflow)| Claim {
                step,
                run,
                target,
                name,
                epoch,
                attempt,
                workflow,
            },
        )
        .collect())
}

/// After steps of `runs` failed: cancels waiting steps that can no longer run (a need failed or was
/// cancelled; always-steps excepted), repeatedly, then makes runnable every waiting step
/// whose needs are met (passed; for an always-step: ended, however). Returns how many
/// became runnable.
async fn advance(tx: &mut sqlx::PgConnection, runs: &[i64]) -> Result<u64, StoreError> {
    // The waiting steps are locked in the order completions lock successors in.
    sqlx::query("SELECT id FROM engine_steps WHERE run_id = ANY($1) AND state = 'waiting' ORDER BY id FOR UPDATE")
        .bind(runs)
        .execute(&mut *tx)
        .await?;
    loop {
        let r = sqlx::query(
            "UPDATE engine_steps s SET state = 'cancelled'
              WHERE s.run_id = ANY($1) AND s.state = 'waiting' AND NOT s.always
                AND EXISTS (SELECT 1 FROM engine_steps d
                             WHERE d.id = ANY(s.needs) AND d.state IN ('failed', 'cancelled'))",
        )
        .bind(runs)
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() == 0 {
            break;
        }
    }
    let woke = sqlx::query(
        "UPDATE engine_steps s SET state = 'runnable', run_after = now()
          WHERE s.run_id = ANY($1) AND s.state = 'waiting'
            AND NOT EXISTS (SELECT 1 FROM engine_steps d
                             WHERE d.id = ANY(s.needs)
                               AND (CASE WHEN s.always THEN d.state NOT IN ('passed', 'failed', 'cancelled')
                                         ELSE d.state <> 'passed' END))",
    )
    .bind(runs)
    .execute(&mut *tx)
    .await?;
    Ok(woke.rows_affected())
}

/// Ends those of `runs` none of whose steps is left to run: passed when every step passed.
async fn end_runs_if_done(tx: &mut sqlx::PgConnection, runs: &[i64]) -> Result<u64, StoreError> {
    let r = sqlx::query(
        "UPDATE engine_runs r
            SET state = CASE WHEN cancel_reason IS NOT NULL THEN 'cancelled'
                             WHEN EXISTS (SELECT 1 FROM engine_steps s WHERE s.run_id = r.id AND s.state <> 'passed')
                             THEN 'failed' ELSE 'passed' END,
                finished_at = now()
          WHERE r.id = ANY($1) AND r.state = 'running'
            AND NOT EXISTS (SELECT 1 FROM engine_steps s
                             WHERE s.run_id = r.id AND s.state IN ('waiting', 'runnable', 'running'))",
    )
    .bind(runs)
    .execute(&mut *tx)
    .await?;
    Ok(r.rows_affected())
}

pub(super) async fn notify(tx: &mut sqlx::PgConnection) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(NOTIFY_CHANNEL)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// A run as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct RunRow {
    pub id: i64,
    pub workflow: String,
    pub patch_id: Option<i64>,
    pub revision: Option<i32>,
    pub state: String,
    pub priority: i32,
    pub cancel_reason: Option<String>,
    pub targets: Vec<String>,
    pub conflicts: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// A step with what the timeline shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct StepDetail {
    pub id: i64,
    pub target: String,
    pub name: String,
    pub state: String,
    pub attempt: i32,
    pub epoch: i64,
    pub host: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub outcome: Option<serde_json::Value>,
}

/// A run's verdict as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct VerdictRow {
    pub run_id: i64,
    pub patch_id: Option<i64>,
    pub revision: Option<i32>,
    pub verdict: String,
    pub stage: Option<String>,
    pub target: Option<String>,
    pub reason: Option<String>,
    pub detail: serde_json::Value,
    pub decided_at: DateTime<Utc>,
}

/// Where a claim stands while its step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// Still this worker's, extended.
    Held,
    /// Another worker took the step over (or it ended): stop, write nothing.
    Lost,
    /// Still this worker's, but the run was cancelled: stop the step.
    Cancelled,
}

/// Consecutive infrastructure failures that quarantine a host.
pub const QUARANTINE_AFTER: i32 = 3;

impl Store {
    /// Records the patches in flight a run conflicts with (found at submission).
    pub async fn set_run_conflicts(
        &self,
        run: i64,
        conflicts: &serde_json::Value,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE engine_runs SET conflicts = $2 WHERE id = $1")
            .bind(run)
            .bind(conflicts)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Extends a claim's lease and says whether the worker may go on.
    pub async fn heartbeat_step(
        &self,
        claim: &Claim,
        lease: Duration,
    ) -> Result<Lease, StoreError> {
        let row: Option<(bool,)> = sqlx::query_as(
            "UPDATE engine_steps s SET lease_until = now() + make_interval(secs => $3)
               FROM engine_runs r
              WHERE s.id = $1 AND s.epoch = $2 AND s.state = 'running' AND r.id = s.run_id
          RETURNING r.cancel_reason IS NOT NULL AND NOT s.always",
        )
        .bind(claim.step)
        .bind(claim.epoch)
        .bind(lease.as_secs_f64())
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            None => Lease::Lost,
            Some((true,)) => Lease::Cancelled,
            Some((false,)) => Lease::Held,
        })
    }

    /// Gives a claimed step back unfinished (a worker shutting down): runnable again at once,
    /// the attempt not counted. `false` when the claim is stale.
    pub async fn release_step(&self, claim: &Claim) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let r = sqlx::query(
            "UPDATE engine_steps SET state = 'runnable', worker = NULL, lease_until = NULL,
                    run_after = now(), attempt = attempt - 1
              WHERE id = $1 AND epoch = $2 AND state = 'running'",
        )
        .bind(claim.step)
        .bind(claim.epoch)
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() != 1 {
            return Ok(false);
        }
        notify(&mut tx).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Records which host a claimed step acts on (the timeline shows it).
    pub async fn set_step_host(&self, claim: &Claim, host: &str) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE engine_steps SET host = $3 WHERE id = $1 AND epoch = $2 AND state = 'running'",
        )
        .bind(claim.step)
        .bind(claim.epoch)
        .bind(host)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// A run.
    pub async fn run(&self, run: i64) -> Result<Option<RunRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT id, workflow, patch_id, revision, state, priority, cancel_reason, targets,
                    conflicts, created_at, finished_at FROM engine_runs WHERE id = $1",
        )
        .bind(run)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Runs, newest first, optionally of one state (running, passed, failed, cancelled) or
    /// of one patch.
    pub async fn runs(
        &self,
        state: Option<&str>,
        patch: Option<u64>,
        limit: i64,
    ) -> Result<Vec<RunRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT id, workflow, patch_id, revision, state, priority, cancel_reason, targets,
                    conflicts, created_at, finished_at FROM engine_runs
              WHERE ($1::text IS NULL OR state = $1) AND ($2::bigint IS NULL OR patch_id = $2)
              ORDER BY id DESC LIMIT $3",
        )
        .bind(state)
        .bind(patch.map(|p| p as i64))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// One page of runs, newest first, and how many match in all.
    pub async fn runs_page(
        &self,
        state: Option<&str>,
        patch: Option<u64>,
        limit: i64,
        offset: i64,
        before: Option<i64>,
    ) -> Result<(Vec<RunRow>, i64), StoreError> {
        let rows = sqlx::query_as(
            "SELECT id, workflow, patch_id, revision, state, priority, cancel_reason, targets,
                    conflicts, created_at, finished_at FROM engine_runs
              WHERE ($1::text IS NULL OR state = $1) AND ($2::bigint IS NULL OR patch_id = $2)
                AND ($5::bigint IS NULL OR id < $5)
              ORDER BY id DESC LIMIT $3 OFFSET $4",
        )
        .bind(state)
        .bind(patch.map(|p| p as i64))
        .bind(limit)
        .bind(offset)
        .bind(before)
        .fetch_all(&self.pool)
        .await?;
        let total: (i64,) = sqlx::query_as(
            "SELECT count(*) FROM engine_runs
              WHERE ($1::text IS NULL OR state = $1) AND ($2::bigint IS NULL OR patch_id = $2)",
        )
        .bind(state)
        .bind(patch.map(|p| p as i64))
        .fetch_one(&self.pool)
        .await?;
        Ok((rows, total.0))
    }

    /// A run's steps with their timeline, in creation order.
    pub async fn run_timeline(&self, run: i64) -> Result<Vec<StepDetail>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT id, target, name, state, attempt, epoch, host, started_at, finished_at, outcome
               FROM engine_steps WHERE run_id = $1 ORDER BY id",
        )
        .bind(run)
        .fetch_all(&self.pool)
        .await?)
    }

    /// What a passed step of a run left for the steps after it (`None` when it did not pass).
    pub async fn step_output(
        &self,
        run: i64,
        target: &str,
        name: &str,
    ) -> Result<Option<serde_json::Value>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT outcome FROM engine_steps
              WHERE run_id = $1 AND target = $2 AND name = $3 AND state = 'passed'",
        )
        .bind(run)
        .bind(target)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?
        .flatten())
    }

    /// Cancels a running run: its steps not yet started are cancelled (teardown excepted:
    /// it still runs), running ones stop at their next heartbeat. `false` when the run had
    /// ended already.
    pub async fn cancel_run(&self, run: i64, reason: &str) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let r = sqlx::query(
            "UPDATE engine_runs SET cancel_reason = $2 WHERE id = $1 AND state = 'running'
                AND cancel_reason IS NULL",
        )
        .bind(run)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() != 1 {
            return Ok(false);
        }
        sqlx::query(
            "UPDATE engine_steps SET state = 'cancelled', finished_at = now(),
                    outcome = jsonb_build_object('cancelled', $2::text)
              WHERE run_id = $1 AND state IN ('waiting', 'runnable') AND NOT always",
        )
        .bind(run)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        advance(&mut tx, &[run]).await?;
        end_runs_if_done(&mut tx, &[run]).await?;
        notify(&mut tx).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Records the intent of a claimed step to act on the world under `key`, before it acts.
    /// `false` (nothing written) when the claim is stale.
    pub async fn record_intent(
        &self,
        claim: &Claim,
        key: &str,
        host: &str,
    ) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "INSERT INTO engine_intents (key, step_id, epoch, host)
             SELECT $3, id, epoch, $4 FROM engine_steps
              WHERE id = $1 AND epoch = $2 AND state = 'running'
             ON CONFLICT (key) DO NOTHING",
        )
        .bind(claim.step)
        .bind(claim.epoch)
        .bind(key)
        .bind(host)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// The intents recorded by earlier attempts of a step: (key, host), oldest first.
    pub async fn intents(&self, step: i64) -> Result<Vec<(String, String)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT key, host FROM engine_intents WHERE step_id = $1 ORDER BY created_at, key",
        )
        .bind(step)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The intents of every step of one target of a run.
    pub async fn target_intents(
        &self,
        run: i64,
        target: &str,
    ) -> Result<Vec<(String, String)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT i.key, i.host FROM engine_intents i JOIN engine_steps s ON s.id = i.step_id
              WHERE s.run_id = $1 AND s.target = $2 ORDER BY i.created_at, i.key",
        )
        .bind(run)
        .bind(target)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Holds a VM slot on `host` for a target of a run if the host has one free (counted
    /// against its registered slots, under a per-host lock); a target holding one already
    /// keeps it. Returns the host holding the target's slot, or `None`.
    pub async fn reserve_slot(
        &self,
        run: i64,
        target: &str,
        host: &str,
    ) -> Result<Option<String>, StoreError> {
        // The host's slots are counted and one taken under the host's lock (the count is a
        // statement after the lock, so it sees every placement committed before it).
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('certo-slots:' || $1))")
            .bind(host)
            .execute(&mut *tx)
            .await?;
        let taken: Option<String> = sqlx::query_scalar(
            "INSERT INTO engine_placements (run_id, target, host)
             SELECT $1, $2, h.name FROM hosts h
              WHERE h.name = $3
                AND (SELECT count(*) FROM engine_placements p
                      WHERE p.host = h.name AND p.released_at IS NULL) < coalesce(h.slots, 0)
             ON CONFLICT (run_id, target) WHERE released_at IS NULL DO NOTHING
             RETURNING host",
        )
        .bind(run)
        .bind(target)
        .bind(host)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        if taken.is_some() {
            return Ok(taken);
        }
        // Full, or the target holds a slot already (a recovering step): which one it holds.
        self.placement(run, target).await
    }

    /// The host holding a target's slot.
    pub async fn placement(&self, run: i64, target: &str) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT host FROM engine_placements WHERE run_id = $1 AND target = $2 AND released_at IS NULL",
        )
        .bind(run)
        .bind(target)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Gives a target's slot back (teardown; an infrastructure failure moving it elsewhere).
    pub async fn release_slot(&self, run: i64, target: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE engine_placements SET released_at = now()
              WHERE run_id = $1 AND target = $2 AND released_at IS NULL",
        )
        .bind(run)
        .bind(target)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Slots held per host.
    pub async fn held_slots(&self) -> Result<HashMap<String, i64>, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT host, count(*) FROM engine_placements WHERE released_at IS NULL GROUP BY host",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().collect())
    }

    /// Counts an infrastructure failure against a host; the [`QUARANTINE_AFTER`]th in a row
    /// quarantines it with `reason`. Returns whether the host is quarantined now.
    pub async fn host_failed(&self, host: &str, reason: &str) -> Result<bool, StoreError> {
        let q: Option<bool> = sqlx::query_scalar(
            "UPDATE hosts SET infra_failures = infra_failures + 1,
                    quarantined_at = CASE WHEN infra_failures + 1 >= $3 AND quarantined_at IS NULL
                                          THEN now() ELSE quarantined_at END,
                    quarantine_reason = CASE WHEN infra_failures + 1 >= $3 AND quarantined_at IS NULL
                                          THEN $2 ELSE quarantine_reason END
              WHERE name = $1 RETURNING quarantined_at IS NOT NULL",
        )
        .bind(host)
        .bind(format!(
            "{QUARANTINE_AFTER} infrastructure failures in a row, the last: {reason}"
        ))
        .bind(QUARANTINE_AFTER)
        .fetch_optional(&self.pool)
        .await?;
        Ok(q.unwrap_or(false))
    }

    /// A step passed on a host: its run of infrastructure failures ends.
    pub async fn host_worked(&self, host: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE hosts SET infra_failures = 0 WHERE name = $1 AND infra_failures <> 0")
            .bind(host)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The host the last retried attempt of a step failed on (its failure said so).
    pub async fn last_retry_host(&self, step: i64) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT detail->>'host' FROM engine_events WHERE step_id = $1 AND kind = 'retry'
              ORDER BY id DESC LIMIT 1",
        )
        .bind(step)
        .fetch_optional(&self.pool)
        .await?
        .flatten())
    }

    /// Quarantines a host by command, with the reason; `false` when there is no such host.
    pub async fn quarantine(&self, host: &str, reason: &str) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE hosts SET quarantined_at = now(), quarantine_reason = $2 WHERE name = $1",
        )
        .bind(host)
        .bind(reason)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Takes a host out of quarantine (by command, or after a passing health check).
    pub async fn unquarantine(&self, host: &str) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE hosts SET quarantined_at = NULL, quarantine_reason = NULL, infra_failures = 0
              WHERE name = $1",
        )
        .bind(host)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Records a run's verdict; `false` (nothing written) when the run has one already.
    pub async fn record_verdict(&self, v: &VerdictRow) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "INSERT INTO verdicts (run_id, patch_id, revision, verdict, stage, target, reason, detail)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (run_id) DO NOTHING",
        )
        .bind(v.run_id)
        .bind(v.patch_id)
        .bind(v.revision)
        .bind(&v.verdict)
        .bind(&v.stage)
        .bind(&v.target)
        .bind(&v.reason)
        .bind(&v.detail)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// A run's verdict.
    pub async fn verdict(&self, run: i64) -> Result<Option<VerdictRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT run_id, patch_id, revision, verdict, stage, target, reason, detail, decided_at
               FROM verdicts WHERE run_id = $1",
        )
        .bind(run)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// The baseline results known for an image digest: (suite, name) → status.
    pub async fn baseline_results(
        &self,
        digest: &str,
    ) -> Result<Vec<(String, String, String)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT suite, name, status FROM baseline_results WHERE image_digest = $1 ORDER BY suite, name",
        )
        .bind(digest)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Replaces the baseline results of an image digest with one VM run's, in one transaction.
    pub async fn record_baseline_results(
        &self,
        digest: &str,
        vm: &str,
        results: &[(String, String, String, String)],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM baseline_results WHERE image_digest = $1")
            .bind(digest)
            .execute(&mut *tx)
            .await?;
        for (suite, name, status, output) in results {
            sqlx::query(
                "INSERT INTO baseline_results (image_digest, suite, name, status, output, vm_name)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(digest)
            .bind(suite)
            .bind(name)
            .bind(status)
            .bind(output)
            .bind(vm)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

impl Store {
    /// Steps by state, and runs running: what `certo status` shows.
    pub async fn engine_counts(
        &self,
    ) -> Result<std::collections::BTreeMap<String, i64>, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT 'steps_' || state, count(*) FROM engine_steps
              WHERE state IN ('runnable', 'running', 'waiting') GROUP BY state
             UNION ALL SELECT 'runs_running', count(*) FROM engine_runs WHERE state = 'running'",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().collect())
    }
}

impl Store {
    /// The ports of a VM's services looked at from outside, with what they said: (service,
    /// port, evidence), for answered probes.
    pub async fn answered_probes(
        &self,
        vm_id: i64,
    ) -> Result<Vec<(String, u16, String)>, StoreError> {
        let rows: Vec<(String, i32, Option<String>)> = sqlx::query_as(
            "SELECT service, port, evidence FROM vm_service_probes
              WHERE vm_id = $1 AND outcome = 'answered' ORDER BY service",
        )
        .bind(vm_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(s, p, e)| Some((s, u16::try_from(p).ok()?, e.unwrap_or_default())))
            .collect())
    }
}

impl Store {
    /// For each of `targets`, the newest run of the certification workflow before `before`
    /// that was certified and had that target, with the VM its boot step started there:
    /// (target, run, patch, revision, VM), in one round trip. Targets without one are left
    /// out.
    pub async fn last_certified_with_targets(
        &self,
        targets: &[String],
        before: i64,
    ) -> Result<Vec<(String, i64, Option<i64>, Option<i32>, Option<String>)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT t.target, g.id, g.patch_id, g.revision, g.vm
               FROM unnest($1::text[]) AS t(target)
               CROSS JOIN LATERAL (
                 SELECT r.id, r.patch_id, r.revision,
                        (SELECT s.outcome->>'vm' FROM engine_steps s
                          WHERE s.run_id = r.id AND s.target = t.target AND s.name = 'boot'
                          ORDER BY s.id DESC LIMIT 1) AS vm
                   FROM verdicts v JOIN engine_runs r ON r.id = v.run_id
                  WHERE v.verdict = 'certified' AND v.run_id < $2 AND t.target = ANY(r.targets)
                    AND r.workflow = 'certify'
                  ORDER BY v.run_id DESC LIMIT 1) g",
        )
        .bind(targets)
        .bind(before)
        .fetch_all(&self.pool)
        .await?)
    }
}
