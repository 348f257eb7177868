//! Certification runs as operations see them: start one for a stored patch revision (a
//! newer revision cancels the older one's run), find a patch's runs, show one as the
//! scripts' contract has it (decided, or as far as it got), cancel, rerun.

use serde_json::{Value, json};

use super::{Actor, Context, OpError, Page, PageAsk};
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
    Ok(view_of(run, None, &steps))
}

/// [`view`] of a run whose verdict's detail (`None` while undecided) and steps are read.
pub fn view_of(
    run: &RunRow,
    verdict: Option<Value>,
    steps: &[crate::store::engine::StepDetail],
) -> Value {
    if let Some(v) = verdict {
        return v;
    }
    let mut d = verdict::decide(run, steps);
    if run.state == "running" {
        d.verdict = "running".into();
    }
    d.to_json(run)
}

/// The timeline of a run: each step with its target, state, attempt, host and duration.
pub async fn timeline(store: &Store, run: i64) -> Result<Vec<Value>, StoreError> {
    let targets = store.run(run).await?.map(|r| r.targets).unwrap_or_default();
    Ok(timeline_of(&targets, store.run_timeline(run).await?))
}

/// [`timeline`] of a run's steps already read, for a run of `targets`.
pub fn timeline_of(targets: &[String], steps: Vec<crate::store::engine::StepDetail>) -> Vec<Value> {
    in_timeline_order(targets, steps)
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
        .collect()
}

/// A run's steps in the timeline's order: the run's first steps, each target's in order,
/// the run's last.
pub fn in_timeline_order(
    targets: &[String],
    mut steps: Vec<crate::store::engine::StepDetail>,
) -> Vec<crate::store::engine::StepDetail> {
    steps.sort_by_key(|s| {
        let t = targets.iter().position(|t| *t == s.target);
        match (s.target.is_empty(), t) {
            (true, _) if s.name == "plan" => (0, 0, s.id),
            (true, _) => (2, 0, s.id),
            (false, t) => (1, t.unwrap_or(usize::MAX), s.id),
        }
    });
    steps
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

/// Which runs a list shows.
#[derive(Debug, Clone, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RunFilter {
    /// Only runs in this state: running, passed, failed, cancelled.
    pub state: Option<String>,
    /// Only runs of this patch.
    pub patch: Option<u64>,
}

/// One page of runs, newest first, each as [`view`] shows it.
pub async fn list(store: &Store, filter: &RunFilter, page: PageAsk) -> Result<Page, OpError> {
    if let Some(p) = filter.patch.filter(|p| i64::try_from(*p).is_err()) {
        return Err(OpError::Refused(format!(
            "patch={p}: no patch id is that large"
        )));
    }
    if let Some(s) = &filter.state
        && !["running", "passed", "failed", "cancelled"].contains(&s.as_str())
    {
        return Err(OpError::Refused(format!(
            "state {s:?}: use running, passed, failed or cancelled"
        )));
    }
    let (limit, offset) = page.bounds();
    // A cursor is the id of the last run seen (newest first: the next are older).
    let before = page.after_key("runs", |a| a.parse::<i64>().ok())?;
    let (mut rows, total) = store
        .runs_page(
            filter.state.as_deref(),
            filter.patch,
            limit + 1,
            offset,
            before,
        )
        .await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let last = rows.last().map(|r| r.id.to_string());
    let mut items = Vec::with_capacity(rows.len());
    for r in &rows {
        let mut v = view(store, r).await?;
        v["run_state"] = json!(r.state);
        v["created_at"] = json!(r.created_at);
        v["target_count"] = json!(r.targets.len());
        items.push(v);
    }
    Ok(Page::keyed(
        items,
        total,
        limit,
        offset,
        more,
        last,
        before.is_some(),
    ))
}

/// Where a run is, for someone waiting on it: its verdict once decided, else the steps
/// running now and whether any step has started at all.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct RunStatus {
    pub run: i64,
    pub state: String,
    /// The verdict, once the run has one.
    #[schema(value_type = Option<Object>)]
    pub verdict: Option<Value>,
    /// `step target` (or `step` for the run's own) of every running step.
    pub running: Vec<String>,
    /// Whether any step has been taken by a worker.
    pub started: bool,
}

/// The status of run `id`.
pub async fn status(store: &Store, id: i64) -> Result<RunStatus, OpError> {
    let Some(run) = store.run(id).await? else {
        return Err(OpError::NotFound(format!("run {id} does not exist")));
    };
    let verdict = store.verdict(id).await?.map(|v| v.detail);
    let steps = store.run_timeline(id).await?;
    Ok(RunStatus {
        run: id,
        state: run.state,
        verdict,
        running: steps
            .iter()
            .filter(|s| s.state == "running")
            .map(|s| {
                if s.target.is_empty() {
                    s.name.clone()
                } else {
                    format!("{} {}", s.name, s.target)
                }
            })
            .collect(),
        started: steps.iter().any(|s| s.started_at.is_some()),
    })
}

/// Cancels the running certification of a patch for `actor` (who must own it, or be an
/// admin or the operator); returns the runs cancelled.
pub async fn cancel_for(ctx: &Context, actor: &Actor, patch: u64) -> Result<Vec<i64>, OpError> {
    let store = ctx.store().await?;
    actor.may_act_on(store, patch).await?;
    let done = cancel(store, patch, &format!("cancelled by {}", actor.name())).await?;
    if done.is_empty() {
        return Err(OpError::Refused(format!(
            "patch {patch} has no running certification"
        )));
    }
    tracing::info!(patch, actor = actor.name(), runs = ?done, "cancelled");
    Ok(done)
}

/// Reruns a patch for `actor` (who must own it, or be an admin or the operator).
pub async fn rerun_for(
    ctx: &Context,
    actor: &Actor,
    patch: u64,
    failed_only: bool,
) -> Result<i64, OpError> {
    actor.may_act_on(ctx.store().await?, patch).await?;
    let run = rerun(ctx, patch, failed_only).await?;
    tracing::info!(patch, actor = actor.name(), run, "rerun started");
    Ok(run)
}

/// One line a person reads of a run's verdict: `patch 3456 r2 (run 17): certified on 2
/// targets`, or `... rejected at STAGE on TARGET: REASON`.
pub fn verdict_sentence(v: &Value) -> String {
    let verdict = v["verdict"].as_str().unwrap_or("?");
    let detail = match verdict {
        "rejected" => format!(
            "rejected at {} on {}: {}",
            v["stage"].as_str().unwrap_or("?"),
            v["target"].as_str().unwrap_or("?"),
            v["reason"].as_str().unwrap_or("")
        ),
        "certified" => {
            let n = v["targets"].as_array().map_or(0, Vec::len);
            // A bug is checked on each target; say it once.
            let mut fixed: Vec<String> = v["bugs"]
                .as_array()
                .map(|b| {
                    b.iter()
                        .filter(|b| b["fixed"] == true)
                        .map(|b| format!("bug {} fixed", b["id"]))
                        .collect()
                })
                .unwrap_or_default();
            fixed.dedup();
            let mut s = format!("certified on {n} target{}", if n == 1 { "" } else { "s" });
            if !fixed.is_empty() {
                s.push_str(&format!(" ({})", fixed.join(", ")));
            }
            if let Some(k) = v["known_failures"].as_array().filter(|k| !k.is_empty()) {
                let k: Vec<&str> = k.iter().filter_map(Value::as_str).collect();
                s.push_str(&format!("; known baseline failures: {}", k.join(", ")));
            }
            s
        }
        other => format!("{other}: {}", v["reason"].as_str().unwrap_or("")),
    };
    format!(
        "patch {} r{} (run {}): {detail}",
        v["patch"], v["revision"], v["run"]
    )
}
