//! Certification runs as operations see them: start one for a stored patch revision (a
//! newer revision cancels the older one's run), find a patch's runs, show one as the
//! scripts' contract has it (decided, or as far as it got), cancel, rerun.

use serde_json::{Value, json};

use super::{Context, OpError};
use crate::engine::verdict;
use crate::engine::workflow::Workflow;
use crate::model::PatchId;
use crate::patch::PatchRecord;
use crate::store::engine::RunRow;
use crate::store::{Store, StoreError};

/// Starts the certification of a stored revision over the targets the record and the
/// catalogue give; runs of older revisions of the patch still running are cancelled.
/// Refused when the record offers no target.
pub async fn start(ctx: &Context, record: &PatchRecord) -> Result<i64, OpError> {
    start_targets(ctx, record, None).await
}

async fn start_targets(
    ctx: &Context,
    record: &PatchRecord,
    only: Option<&[String]>,
) -> Result<i64, OpError> {
    let store = ctx.store().await?;
    let mut targets: Vec<String> = super::patches::targets(ctx.catalogue(), record)
        .into_iter()
        .map(|t| super::patches::target_key(&t.release, &t.platform, &t.node_type))
        .collect();
    if let Some(only) = only {
        targets.retain(|t| only.contains(t));
    }
    if targets.is_empty() {
        return Err(OpError::Refused(format!(
            "patch {} r{}: no target to certify (no platform of the record offers one of its node types)",
            record.id, record.revision
        )));
    }
    for old in store.runs(Some("running"), Some(record.id), 100).await? {
        if old.revision.is_some_and(|r| (r as u32) < record.revision) {
            store
                .cancel_run(
                    old.id,
                    &format!("superseded by revision {}", record.revision),
                )
                .await?;
        }
    }
    let conflicts = conflicts_in_flight(store, record).await?;
    let run = store
        .create_run_with_priority(
            &Workflow::certify(),
            Some((PatchId(record.id), record.revision as i32)),
            &targets,
            10,
        )
        .await?;
    if !conflicts.is_empty() {
        store.set_run_conflicts(run, &json!(conflicts)).await?;
    }
    tracing::info!(
        run,
        patch = record.id,
        revision = record.revision,
        targets = targets.len(),
        "certification run started"
    );
    Ok(run)
}

/// The newest run of a patch revision.
pub async fn latest(
    store: &Store,
    patch: u64,
    revision: Option<u32>,
) -> Result<Option<RunRow>, StoreError> {
    Ok(store
        .runs(None, Some(patch), 50)
        .await?
        .into_iter()
        .find(|r| revision.is_none_or(|rev| r.revision == Some(rev as i32))))
}

/// A run as the contract prints it: its verdict when decided; else `"verdict": "running"`
/// with the targets as far as they got.
pub async fn view(store: &Store, run: &RunRow) -> Result<Value, StoreError> {
    if let Some(v) = store.verdict(run.id).await? {
        return Ok(v.detail);
    }
    let steps = store.run_timeline(run.id).await?;
    let mut d = verdict::decide(run, &steps);
    if run.state == "running" {
        d.verdict = "running".into();
    }
    Ok(d.to_json(run))
}

/// The timeline of a run: each step with its target, state, attempt, host and duration.
pub async fn timeline(store: &Store, run: i64) -> Result<Vec<Value>, StoreError> {
    let targets = store.run(run).await?.map(|r| r.targets).unwrap_or_default();
    let mut steps = store.run_timeline(run).await?;
    // Grouped: the run's first steps, each target's in order, the run's last.
    steps.sort_by_key(|s| {
        let t = targets.iter().position(|t| *t == s.target);
        match (s.target.is_empty(), t) {
            (true, _) if s.name == "plan" => (0, 0, s.id),
            (true, _) => (2, 0, s.id),
            (false, t) => (1, t.unwrap_or(usize::MAX), s.id),
        }
    });
    Ok(steps
        .into_iter()
        .map(|s| {
            let seconds = match (s.started_at, s.finished_at) {
                (Some(a), Some(b)) => Some((b - a).num_milliseconds() as f64 / 1000.0),
                _ => None,
            };
            json!({
                "target": s.target, "step": s.name, "state": s.state, "attempt": s.attempt,
                "host": s.host, "started_at": s.started_at, "seconds": seconds,
                "reason": s.outcome.as_ref().and_then(|o| o.get("reason")).cloned(),
            })
        })
        .collect())
}

/// Cancels the running runs of a patch; returns their ids.
pub async fn cancel(store: &Store, patch: u64, why: &str) -> Result<Vec<i64>, StoreError> {
    let mut done = Vec::new();
    for r in store.runs(Some("running"), Some(patch), 100).await? {
        if store.cancel_run(r.id, why).await? {
            done.push(r.id);
        }
    }
    Ok(done)
}

/// Starts a new run of the patch's current revision: of every target, or with `failed_only`
/// of those that failed or were incomplete in its latest decided run (cached layers make
/// the rest cheap either way).
pub async fn rerun(ctx: &Context, patch: u64, failed_only: bool) -> Result<i64, OpError> {
    let store = ctx.store().await?;
    let Some(row) = store.get_patch(patch, None).await? else {
        return Err(OpError::Refused(format!("patch {patch} is not stored")));
    };
    if !failed_only {
        return start(ctx, &row.record).await;
    }
    let Some(last) = latest(store, patch, Some(row.revision)).await? else {
        return Err(OpError::Refused(format!(
            "patch {patch} r{} has no run to rerun the failed targets of",
            row.revision
        )));
    };
    let v = view(store, &last).await?;
    let failed: Vec<String> = v["targets"]
        .as_array()
        .map(|ts| {
            ts.iter()
                .filter(|t| t["outcome"] != "passed")
                .map(|t| {
                    format!(
                        "{}/{}/{}",
                        t["release"].as_str().unwrap_or(""),
                        t["platform"].as_str().unwrap_or(""),
                        t["node_type"].as_str().unwrap_or("")
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    if failed.is_empty() {
        return Err(OpError::Refused(format!(
            "patch {patch} r{}: every target of run {} passed; nothing to rerun",
            row.revision, last.id
        )));
    }
    start_targets(ctx, &row.record, Some(&failed)).await
}

/// What two records both touch on the same release: the platforms they share, and there
/// the package names and node types they share. `None` when they touch nothing in common.
pub fn overlap(a: &PatchRecord, b: &PatchRecord) -> Option<Value> {
    if a.release != b.release {
        return None;
    }
    let platforms: Vec<&String> = a
        .platforms
        .iter()
        .filter(|p| b.platforms.contains(p))
        .collect();
    if platforms.is_empty() {
        return None;
    }
    let mut packages: Vec<&str> = a
        .packages
        .iter()
        .map(|p| p.name.as_str())
        .filter(|n| b.packages.iter().any(|q| q.name == *n))
        .collect();
    packages.sort_unstable();
    packages.dedup();
    let node_types: Vec<&String> = a
        .node_types
        .iter()
        .filter(|n| b.node_types.contains(n))
        .collect();
    if packages.is_empty() && node_types.is_empty() {
        return None;
    }
    Some(json!({"platforms": platforms, "packages": packages, "node_types": node_types}))
}

/// The runs in flight (running) of other patches that overlap `record`, oldest first.
pub async fn conflicts_in_flight(
    store: &Store,
    record: &PatchRecord,
) -> Result<Vec<Value>, StoreError> {
    let mut out = Vec::new();
    for (run, other) in store.patches_in_flight().await? {
        if other.patch_id == record.id {
            continue;
        }
        if let Some(mut o) = overlap(record, &other.record) {
            o["patch"] = json!(other.patch_id);
            o["revision"] = json!(other.revision);
            o["run"] = json!(run);
            out.push(o);
        }
    }
    Ok(out)
}
