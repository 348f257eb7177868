//! A worker: claims runnable steps from the store, runs each with its [`Handler`] under
//! the step's timeout while a heartbeat keeps its lease, and ends it: passed, failed, or
//! to be retried after the delay the workflow's retry policy gives for its failure class.
//!
//! Idle workers sleep until a `NOTIFY certo_engine` (sent by every transaction that makes a
//! step runnable) or the poll interval, whichever comes first: the notification is an
//! optimisation, polling the guarantee. A worker killed at any instant loses nothing: its
//! claims' leases expire and other workers take the steps over with a higher epoch, and
//! whatever the killed worker still writes is refused by its stale epoch.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::task::JoinSet;

use super::workflow::{FailureClass, Workflow};
use crate::store::engine::{Claim, ClaimAsk, Lease, NOTIFY_CHANNEL, StepEnd};
use crate::store::{Store, StoreError};

/// What a step handler returns.
pub type StepFuture = Pin<Box<dyn Future<Output = StepOutput> + Send>>;

/// How a step's work ended.
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutput {
    /// Done; the value is what later steps (and the timeline) read.
    Passed(Value),
    /// Failed, of a class the step's retry policy may retry.
    Failed { class: FailureClass, detail: Value },
    /// Neither: to be taken again after `after` without using an attempt.
    Defer { after: Duration, why: Value },
}

impl StepOutput {
    /// A failure with a reason line.
    pub fn failed(class: FailureClass, reason: impl Into<String>) -> StepOutput {
        StepOutput::Failed {
            class,
            detail: json!({ "reason": reason.into() }),
        }
    }
}

/// What a handler is given: the claim it acts for (its epoch fences every write) and the
/// store.
#[derive(Debug, Clone)]
pub struct StepCtx {
    pub claim: Claim,
    pub store: Store,
    pub worker: String,
}

/// Runs the steps of the workflows a worker serves.
pub trait Handler: Send + Sync + 'static {
    /// The workflows whose steps this handler runs.
    fn workflows(&self) -> Vec<Workflow>;
    /// Runs one claimed step.
    fn run(&self, step: StepCtx) -> StepFuture;
}

/// How a worker works.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The worker's name in the store (host name and pid by default).
    pub name: String,
    /// Steps run at once.
    pub concurrency: usize,
    /// How long a claim holds without a heartbeat (heartbeats every third of it).
    pub lease: Duration,
    /// The longest an idle worker sleeps without a notification.
    pub poll: Duration,
}

impl WorkerConfig {
    pub fn new(name: impl Into<String>) -> WorkerConfig {
        WorkerConfig {
            name: name.into(),
            concurrency: 4,
            lease: Duration::from_secs(30),
            poll: Duration::from_secs(2),
        }
    }
}

/// Counters a worker keeps (benchmarks, `certo status`).
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub claimed: AtomicU64,
    pub finished: AtomicU64,
    pub stale: AtomicU64,
}

/// A worker over a store and a handler.
pub struct Worker {
    shared: Arc<Shared>,
}

struct Shared {
    store: Store,
    config: WorkerConfig,
    handler: Arc<dyn Handler>,
    workflows: HashMap<String, Workflow>,
    stats: Arc<WorkerStats>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("config", &self.shared.config)
            .field(
                "workflows",
                &self.shared.workflows.keys().collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

enum Ended {
    Output(StepOutput),
    /// The lease went to another worker: write nothing.
    Lost,
    Cancelled,
}

impl Worker {
    pub fn new(store: Store, config: WorkerConfig, handler: Arc<dyn Handler>) -> Worker {
        let workflows = handler
            .workflows()
            .into_iter()
            .map(|w| (w.name.clone(), w))
            .collect();
        Worker {
            shared: Arc::new(Shared {
                store,
                config,
                handler,
                workflows,
                stats: Arc::new(WorkerStats::default()),
            }),
        }
    }

    pub fn stats(&self) -> Arc<WorkerStats> {
        self.shared.stats.clone()
    }

    /// Works until `shutdown` resolves; then gives back the steps it holds unfinished (they
    /// are runnable again at once, their attempt not counted).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), StoreError> {
        let me = self.shared;
        let names: Vec<String> = me.workflows.keys().cloned().collect();
        let mut listener = match sqlx::postgres::PgListener::connect_with(me.store.pool()).await {
            Ok(mut l) => match l.listen(NOTIFY_CHANNEL).await {
                Ok(()) => Some(l),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot LISTEN: polling only");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot open a listening connection: polling only");
                None
            }
        };
        tokio::pin!(shutdown);
        let mut running: JoinSet<Ended> = JoinSet::new();
        let mut held: HashMap<tokio::task::Id, Claim> = HashMap::new();
        // Steps that ended since the last round: written together with the next claim.
        let mut ended: Vec<(Claim, Ended)> = Vec::new();
        loop {
            let free = me.config.concurrency.saturating_sub(running.len());
            let ends: Vec<(Claim, StepEnd)> = ended
                .drain(..)
                .filter_map(|(claim, e)| me.end_of(&claim, e).map(|end| (claim, end)))
                .collect();
            if !ends.is_empty() || free > 0 {
                // One transaction: the ends, their successors, and new claims (which may
                // be those very successors).
                let ask = ClaimAsk {
                    worker: &me.config.name,
                    n: free as i64,
                    lease: me.config.lease,
                    workflows: Some(&names),
                };
                let (done, claims) = me
                    .store
                    .finish_and_claim(&ends, (free > 0).then_some(ask))
                    .await?;
                for ok in done {
                    let counter = if ok {
                        &me.stats.finished
                    } else {
                        &me.stats.stale
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                for claim in claims {
                    me.stats.claimed.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(run = claim.run, target = %claim.target, step = %claim.name,
                        attempt = claim.attempt, epoch = claim.epoch, worker = %me.config.name, "step claimed");
                    let id = running.spawn(me.run_one(claim.clone())).id();
                    held.insert(id, claim);
                }
            }
            let free = me.config.concurrency.saturating_sub(running.len());
            // Full: wait for a step to end. Else: for a step to end, a notification, or
            // the poll interval.
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                Some(first) = running.join_next_with_id() => {
                    // Every step that has ended by now goes into the same round.
                    let mut next = Some(first);
                    while let Some(done) = next {
                        match done {
                            Ok((id, e)) => {
                                if let Some(claim) = held.remove(&id) {
                                    ended.push((claim, e));
                                }
                            }
                            Err(e) => {
                                let why = if e.is_panic() { "the step's code panicked" } else { "the step's task was cancelled" };
                                if let Some(claim) = held.remove(&e.id()) {
                                    ended.push((claim, Ended::Output(StepOutput::failed(FailureClass::Infrastructure, why))));
                                }
                            }
                        }
                        next = running.try_join_next_with_id();
                    }
                },
                _ = wait_notified(&mut listener), if free > 0 => {}
                _ = tokio::time::sleep(me.config.poll), if free > 0 => {}
            }
        }
        running.abort_all();
        while running.join_next().await.is_some() {}
        // Steps that ended are written; those still held are given back.
        let ends: Vec<(Claim, StepEnd)> = ended
            .drain(..)
            .filter_map(|(claim, e)| me.end_of(&claim, e).map(|end| (claim, end)))
            .collect();
        for (claim, _) in &ends {
            held.retain(|_, c| c.step != claim.step);
        }
        if !ends.is_empty() {
            me.store.finish_and_claim(&ends, None).await?;
        }
        for claim in held.values() {
            if me.store.release_step(claim).await? {
                tracing::info!(run = claim.run, step = %claim.name, target = %claim.target, "step given back at shutdown");
            }
        }
        Ok(())
    }
}

impl Shared {
    fn run_one(&self, claim: Claim) -> impl Future<Output = Ended> + Send + 'static {
        let store = self.store.clone();
        let lease = self.config.lease;
        let timeout = self
            .workflows
            .get(&claim.workflow)
            .and_then(|w| w.step(&claim.name))
            .map_or(Duration::from_secs(3600), |s| s.timeout);
        let fut = self.handler.run(StepCtx {
            claim: claim.clone(),
            store: store.clone(),
            worker: self.config.name.clone(),
        });
        async move {
            // The step's work runs as a task of its own, so that work that blocks its thread
            // (a build's synchronous parts) never stops the heartbeat here; it is aborted
            // with this future (timeout, lost lease, cancel, shutdown).
            let mut work = AbortOnDrop(tokio::spawn(fut));
            let mut beat = tokio::time::interval(lease / 3);
            beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            beat.tick().await;
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    out = &mut work.0 => return Ended::Output(out.unwrap_or_else(|e| {
                        StepOutput::failed(
                            FailureClass::Infrastructure,
                            if e.is_panic() { "the step's code panicked" } else { "the step's task was cancelled" },
                        )
                    })),
                    _ = &mut deadline => {
                        return Ended::Output(StepOutput::failed(
                            FailureClass::Timeout,
                            format!("{} did not end within its timeout of {}", claim.name, human(timeout)),
                        ));
                    }
                    _ = beat.tick() => match store.heartbeat_step(&claim, lease).await {
                        Ok(Lease::Held) => {}
                        Ok(Lease::Lost) => return Ended::Lost,
                        Ok(Lease::Cancelled) => return Ended::Cancelled,
                        Err(e) => tracing::warn!(error = %e, step = claim.step, "heartbeat failed; the lease runs on"),
                    }
                }
            }
        }
    }

    /// What to write for a step that ended: `None` when its lease went to another worker.
    fn end_of(&self, claim: &Claim, ended: Ended) -> Option<StepEnd> {
        let end = match ended {
            Ended::Lost => {
                self.stats.stale.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(run = claim.run, step = %claim.name, epoch = claim.epoch, "lease lost: another worker holds the step");
                return None;
            }
            Ended::Cancelled => {
                StepEnd::Failed(json!({"cancelled": true, "reason": "the run was cancelled"}))
            }
            Ended::Output(StepOutput::Passed(v)) => StepEnd::Passed(v),
            Ended::Output(StepOutput::Defer { after, why }) => StepEnd::Defer { after, why },
            Ended::Output(StepOutput::Failed { class, mut detail }) => {
                if let Value::Object(m) = &mut detail {
                    m.insert("class".into(), json!(class));
                    m.insert("attempt".into(), json!(claim.attempt));
                }
                let retry = self
                    .workflows
                    .get(&claim.workflow)
                    .and_then(|w| w.step(&claim.name))
                    .and_then(|s| s.retry.delay_before(claim.attempt as u32 + 1, class));
                match retry {
                    Some(after) => StepEnd::Retry { after, why: detail },
                    None => StepEnd::Failed(detail),
                }
            }
        };
        tracing::info!(run = claim.run, target = %claim.target, step = %claim.name, attempt = claim.attempt,
            end = match &end { StepEnd::Passed(_) => "passed", StepEnd::Failed(_) => "failed", StepEnd::Retry{..} => "retry", StepEnd::Defer{..} => "defer" },
            "step ended");
        Some(end)
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn wait_notified(listener: &mut Option<sqlx::postgres::PgListener>) {
    match listener {
        Some(l) => {
            if let Err(e) = l.recv().await {
                tracing::warn!(error = %e, "the notification connection failed; polling");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            // One claim answers every notification that came meanwhile.
            while l.next_buffered().is_some() {}
        }
        None => std::future::pending().await,
    }
}

/// `90 s`, `5 min`, `1 h`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 && s.is_multiple_of(3600) {
        format!("{} h", s / 3600)
    } else if s >= 60 && s.is_multiple_of(60) {
        format!("{} min", s / 60)
    } else {
        format!("{:.0} s", d.as_secs_f64())
    }
}
