//! The nightly regression sweep (`workflows/nightly.yaml`): the regression suites again over
//! the release matrix, on each cell's baseline image, each night.
//!
//! - **Cells**: the catalogue's valid (release, platform, node type) combinations that the
//!   sweep's `cells` patterns cover.
//! - **Firing**: every worker looks at the schedule (`schedule_loop`); `Store::fire_due` runs
//!   each fire time once, and records fires missed while no worker ran as skipped, made up by
//!   one catch-up run.
//! - **Steps** (the certification handler's, over the baseline image): plan → build → place →
//!   transfer → boot → tests → teardown per cell, report per run. `tests` waits for the VM's
//!   results; a failing test is run again on a fresh VM up to `flaky_retries` times, and one
//!   that passes then is `flaky`. The results are recorded per cell (`sweep_cells`,
//!   `sweep_results`) and refresh the baseline results verdicts compare against.
//! - **Classes** (`view`), per test against the cell's previous sweep that ran: newly failing,
//!   fixed, still failing, flaky, passing, and `failing` when no sweep before ran it; a cell
//!   is its worst test's class, or `not run` with the reason.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use serde_json::{Value, json};

use super::certify::{Certify, Result, StepError, infra, str_of};
use super::{AppError, Context};
use crate::engine::worker::{StepCtx, StepOutput};
use crate::engine::workflow::{FailureClass, SweepSettings, Workflow};
use crate::model::TestStatus;
use crate::store::Store;
use crate::store::engine::RunRow;
use crate::store::sweeps::{SweepCellRow, SweepResultRow};
use crate::vmrun::{self, Until};

/// The sweep workflow's name.
pub const WORKFLOW: &str = "nightly";

/// The cells of the catalogue the sweep covers, in catalogue order.
pub fn cells(ctx: &Context, sweep: &SweepSettings) -> Vec<String> {
    let cat = ctx.catalogue();
    let mut out = Vec::new();
    for release in &cat.releases {
        for platform in &release.platforms {
            for nt in &release.node_types {
                let cell = format!("{}/{platform}/{}", release.name, nt.name);
                if nt.available_on(release, platform) && sweep.covers(&cell) {
                    out.push(cell);
                }
            }
        }
    }
    out
}

/// The sweep's targets: each cell, and after it the image of every patch in flight (a
/// certification running) that targets the cell, as `CELL#IDrREV`.
pub async fn targets(
    ctx: &Context,
    store: &Store,
    cells: &[String],
) -> Result<Vec<String>, AppError> {
    let mut patches: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (_, row) in store.patches_in_flight().await? {
        for t in super::patches::targets(ctx.catalogue(), &row.record) {
            let key = super::patches::target_key(&t.release, &t.platform, &t.node_type);
            let tag = format!("{key}#{}r{}", row.patch_id, row.revision);
            let list = patches.entry(key).or_default();
            if !list.contains(&tag) {
                list.push(tag);
            }
        }
    }
    let mut out = Vec::new();
    for c in cells {
        out.push(c.clone());
        out.extend(patches.remove(c).unwrap_or_default());
    }
    Ok(out)
}

/// Starts a sweep now over the cells `filter` (a `release/platform/node_type` pattern, `*`
/// for any part) picks among the workflow's; the run's id.
pub async fn start(ctx: &Context, store: &Store, filter: Option<&str>) -> Result<i64, AppError> {
    let workflow = Workflow::nightly();
    let mut sweep = workflow.sweep.clone().unwrap_or_default();
    let mut targets = cells(ctx, &sweep);
    if let Some(f) = filter {
        sweep.cells = f.split(',').map(|s| s.trim().to_owned()).collect();
        targets.retain(|c| sweep.covers(c));
    }
    let targets = self::targets(ctx, store, &targets).await?;
    if targets.is_empty() {
        return Err(AppError::NotFound(format!(
            "no cell of the catalogue matches {:?} (cells are release/platform/node_type, `*` for any part)",
            filter.unwrap_or("*/*/*")
        )));
    }
    let priority = workflow.sweep.as_ref().map_or(0, |s| s.priority);
    Ok(store
        .create_run_with_priority(&workflow, None, &targets, priority)
        .await?)
}

/// Looks at the nightly schedule at least every minute and at each fire time; the run of a
/// due fire time is started by exactly one worker (`certo worker` runs this).
pub async fn schedule_loop(ctx: Context, store: Store) {
    let workflow = Workflow::nightly();
    let (Some(schedule), Some(sweep)) = (&workflow.schedule, &workflow.sweep) else {
        return;
    };
    let cells = cells(&ctx, sweep);
    loop {
        let now = Utc::now();
        let fired = match targets(&ctx, &store, &cells).await {
            Ok(t) => store
                .fire_due(&workflow, &t, now)
                .await
                .map_err(AppError::from),
            Err(e) => Err(e),
        };
        match fired {
            Ok(Some(f)) => {
                tracing::info!(run = f.run, fire_at = %f.fire_at, skipped = f.skipped.len(), "nightly sweep started")
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "looking at the nightly schedule failed"),
        }
        let next = schedule
            .next_after(Utc::now())
            .and_then(|t| (t - Utc::now()).to_std().ok())
            .unwrap_or(Duration::from_secs(60));
        tokio::time::sleep(next.min(Duration::from_secs(60)) + Duration::from_millis(200)).await;
    }
}

impl Certify {
    /// One step of a sweep run.
    pub(super) async fn sweep_step(&self, s: &StepCtx, run: &RunRow) -> Result<StepOutput> {
        let target = &s.claim.target;
        match s.claim.name.as_str() {
            "plan" => Ok(StepOutput::Passed(json!({"cells": run.targets}))),
            "build" => {
                let record = self.sweep_record(s, target).await?;
                self.build(target, record.as_ref()).await
            }
            "place" => self.place(s, target).await,
            "transfer" => self.transfer(s, target).await,
            "boot" => {
                let record = self.sweep_record(s, target).await?;
                self.boot(s, target, record.as_ref()).await
            }
            "tests" => self.sweep_tests(s, target).await,
            "teardown" => self.teardown(s, target).await,
            "report" => self.sweep_report(s, run).await,
            other => Ok(infra(format!("the nightly workflow has no step {other}"))),
        }
    }

    /// The record of the patch a sweep's target names (none for a cell's baseline).
    async fn sweep_record(
        &self,
        s: &StepCtx,
        target: &str,
    ) -> Result<Option<crate::patch::PatchRecord>> {
        let Some((id, rev)) = super::patches::target_patch(target) else {
            return Ok(None);
        };
        match s.store.get_patch(id, Some(rev)).await? {
            Some(row) => Ok(Some(row.record)),
            None => Err(StepError::Other(format!("patch {id} r{rev} is not stored"))),
        }
    }

    async fn sweep_tests(&self, s: &StepCtx, cell: &str) -> Result<StepOutput> {
        let sweep = self.nightly.sweep.clone().unwrap_or_default();
        let boot = self.output(s, cell, "boot").await?;
        let build = self.output(s, cell, "build").await?;
        let (host, agent) = self.agent_of(s, cell).await?;
        s.store.set_step_host(&s.claim, &host).await?;
        let name = str_of(&boot, "vm");
        let row = vmrun::watch(&s.store, &agent, &name, &Until::Ended).await?;
        let results: Vec<_> = s
            .store
            .vm_results(row.id)
            .await?
            .into_iter()
            .filter(|r| sweep.suites.contains(&r.suite))
            .collect();
        if results.is_empty() {
            return Ok(StepOutput::Failed {
                class: FailureClass::Infrastructure,
                detail: json!({"reason": format!("{name} ended {} without reporting a test: {}",
                    row.state, row.reason.clone().unwrap_or_default()), "host": host}),
            });
        }
        // Failing tests again on fresh VMs: passing then is flaky.
        let mut status: BTreeMap<(String, String), (String, String)> = results
            .iter()
            .map(|r| {
                let st = if r.status == TestStatus::Pass {
                    "pass"
                } else {
                    "fail"
                };
                (
                    (r.suite.clone(), r.name.clone()),
                    (st.to_owned(), r.output.clone()),
                )
            })
            .collect();
        let image = std::path::PathBuf::from(str_of(&build["image"], "path"));
        let (_, _, node_type) = super::patches::split_target(cell);
        for attempt in 0..sweep.flaky_retries {
            if !status.values().any(|(st, _)| st == "fail") {
                break;
            }
            let again = match self.run_self_contained(s, &host, &image, node_type).await {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(cell, attempt, error = %e, "a flakiness retry could not run");
                    break;
                }
            };
            for t in &again.tests {
                if t.status == TestStatus::Pass
                    && let Some((st, _)) = status.get_mut(&(t.suite.clone(), t.name.clone()))
                    && st == "fail"
                {
                    *st = "flaky".to_owned();
                }
            }
        }
        let digest = str_of(&build["image"], "digest");
        let rows: Vec<(String, String, String, String)> = status
            .iter()
            .map(|((suite, n), (st, out))| (suite.clone(), n.clone(), st.clone(), out.clone()))
            .collect();
        s.store
            .record_sweep_cell(
                &SweepCellRow {
                    run_id: s.claim.run,
                    cell: cell.to_owned(),
                    state: "ran".into(),
                    reason: None,
                    image_digest: Some(digest.clone()),
                    layers: build["image"]["layers"].clone(),
                    class: None,
                    results_pruned: false,
                },
                &rows,
            )
            .await?;
        // The baseline results verdicts compare against (a cell's, not a patch's image): a
        // flaky test counts as failing there (a patch failing it is not rejected for it).
        if super::patches::target_patch(cell).is_none() {
            let baseline: Vec<(String, String, String, String)> = rows
                .iter()
                .map(|(su, n, st, out)| {
                    let st = if st == "pass" { "pass" } else { "fail" };
                    (su.clone(), n.clone(), st.to_owned(), out.clone())
                })
                .collect();
            s.store
                .record_baseline_results(&digest, &name, &baseline)
                .await?;
        }
        let count = |w: &str| rows.iter().filter(|r| r.2 == w).count();
        Ok(StepOutput::Passed(json!({
            "vm": name, "tests": rows.len(), "passed": count("pass"),
            "failed": count("fail"), "flaky": count("flaky"),
        })))
    }

    async fn sweep_report(&self, s: &StepCtx, run: &RunRow) -> Result<StepOutput> {
        // Cells whose tests did not run: recorded with the reason their step gave.
        let recorded: Vec<String> = s
            .store
            .sweep_cells(run.id)
            .await?
            .into_iter()
            .map(|c| c.cell)
            .collect();
        let timeline = s.store.run_timeline(run.id).await?;
        for cell in run.targets.iter().filter(|c| !recorded.contains(c)) {
            let reason = timeline
                .iter()
                .filter(|st| &st.target == cell && st.state != "passed")
                .find_map(|st| {
                    st.outcome
                        .as_ref()
                        .and_then(|o| o["reason"].as_str())
                        .map(|r| format!("{}: {r}", st.name))
                        .or_else(|| {
                            (st.state == "cancelled").then(|| format!("{}: cancelled", st.name))
                        })
                })
                .unwrap_or_else(|| "its steps did not reach the tests".into());
            s.store
                .record_sweep_cell(
                    &SweepCellRow {
                        run_id: run.id,
                        cell: cell.clone(),
                        state: "not run".into(),
                        reason: Some(reason),
                        image_digest: None,
                        layers: json!([]),
                        class: None,
                        results_pruned: false,
                    },
                    &[],
                )
                .await?;
        }
        let v = view(&s.store, run)
            .await
            .map_err(|e| StepError::Other(e.to_string()))?;
        // Each cell's class outlives its results; sweeps past the retention keep only that.
        let cells = v["cells"].as_array().cloned().unwrap_or_default();
        let classes: Vec<(String, String)> = cells
            .iter()
            .map(|c| (str_of(c, "cell"), str_of(c, "class")))
            .collect();
        let tests: Vec<(String, String, String, String)> = cells
            .iter()
            .flat_map(|c| {
                let cell = str_of(c, "cell");
                c["tests"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .map(move |t| {
                        (
                            cell.clone(),
                            str_of(&t, "suite"),
                            str_of(&t, "name"),
                            str_of(&t, "class"),
                        )
                    })
            })
            .collect();
        s.store.set_sweep_classes(run.id, &classes, &tests).await?;
        let keep = self.nightly.sweep.clone().unwrap_or_default().keep;
        let cutoff =
            Utc::now() - chrono::Duration::from_std(keep).unwrap_or(chrono::Duration::days(30));
        let pruned = s.store.prune_sweeps(&run.workflow, cutoff).await?;
        let mut summary = v["summary"].clone();
        summary["pruned_cells"] = json!(pruned);
        Ok(StepOutput::Passed(summary))
    }
}

/// A test's class against the cell's previous sweep that ran.
fn class_of(now: &str, before: Option<&str>) -> &'static str {
    match (now, before) {
        ("flaky", _) => "flaky",
        ("fail", Some("fail")) => "still failing",
        // No sweep before ran the test: nothing says it is new.
        ("fail", None) => "failing",
        ("fail", _) => "newly failing",
        (_, Some("fail")) => "fixed",
        _ => "passing",
    }
}

/// A class by name (as stored), as one of the classes; anything else is `passing`.
fn known_class(k: Option<&str>) -> &'static str {
    const CLASSES: [&str; 6] = [
        "newly failing",
        "still failing",
        "failing",
        "not run",
        "flaky",
        "fixed",
    ];
    k.and_then(|k| CLASSES.into_iter().find(|c| *c == k))
        .unwrap_or("passing")
}

/// How bad a class is, for a cell's class (its worst test's).
fn rank(class: &str) -> u8 {
    match class {
        "newly failing" => 5,
        "still failing" | "failing" => 4,
        "not run" => 3,
        "flaky" => 2,
        "fixed" => 1,
        _ => 0,
    }
}

/// A sweep with each cell and test classified against the cell's previous sweep that ran,
/// each cell's trend over the sweeps before (newest last), and a summary.
pub async fn view(store: &Store, run: &RunRow) -> Result<Value, AppError> {
    let cells = store.sweep_cells(run.id).await?;
    let results = store.sweep_results(run.id).await?;
    // The earlier sweeps, newest first.
    let earlier: Vec<RunRow> = store
        .runs_of(&run.workflow, 60)
        .await?
        .into_iter()
        .filter(|r| r.id < run.id)
        .collect();
    let mut earlier_cells = Vec::new();
    for r in earlier.iter().take(14) {
        earlier_cells.push((r.id, store.sweep_cells(r.id).await?));
    }
    // Each earlier sweep's results, read once whatever the number of cells.
    let mut earlier_results: std::collections::HashMap<i64, Vec<SweepResultRow>> =
        std::collections::HashMap::new();
    let mut out_cells = Vec::new();
    let mut summary: BTreeMap<&str, usize> = BTreeMap::new();
    for c in &cells {
        // The previous sweep in which this cell ran.
        let mut before: BTreeMap<(String, String), String> = BTreeMap::new();
        let mut trend = Vec::new();
        let mut found_prev = false;
        let mut prev_cell: Option<SweepCellRow> = None;
        for (rid, ecs) in &earlier_cells {
            if let Some(ec) = ecs.iter().find(|e| e.cell == c.cell) {
                if ec.state == "ran" && ec.results_pruned {
                    // Only its summary is left.
                    let failing = ec.class.as_deref().is_some_and(|k| k.ends_with("failing"));
                    trend.push(if failing { "fail" } else { "pass" });
                    found_prev = true;
                } else if ec.state == "ran" {
                    if !earlier_results.contains_key(rid) {
                        earlier_results.insert(*rid, store.sweep_results(*rid).await?);
                    }
                    let rs = earlier_results.get(rid).map(Vec::as_slice).unwrap_or(&[]);
                    let failing = rs.iter().any(|r| r.cell == c.cell && r.status == "fail");
                    trend.push(if failing { "fail" } else { "pass" });
                    if !found_prev {
                        found_prev = true;
                        prev_cell = Some(ec.clone());
                        before = rs
                            .iter()
                            .filter(|r| r.cell == c.cell)
                            .map(|r| ((r.suite.clone(), r.name.clone()), r.status.clone()))
                            .collect();
                    }
                } else {
                    trend.push("not run");
                }
            }
        }
        trend.reverse();
        let tests: Vec<Value> = results
            .iter()
            .filter(|r| r.cell == c.cell)
            .map(|r| {
                let prev = before
                    .get(&(r.suite.clone(), r.name.clone()))
                    .map(String::as_str);
                // The report's class stands (the sweep it compared with may be pruned since).
                let class = r
                    .class
                    .as_deref()
                    .unwrap_or_else(|| class_of(&r.status, prev));
                json!({"suite": r.suite, "name": r.name, "status": r.status,
                       "class": class, "before": prev,
                       "output": r.output})
            })
            .collect();
        let class = if c.state != "ran" {
            "not run"
        } else if c.results_pruned || c.class.is_some() {
            // The report's class stands.
            known_class(c.class.as_deref())
        } else {
            tests
                .iter()
                .filter_map(|t| t["class"].as_str())
                .max_by_key(|k| rank(k))
                .map_or("passing", |k| known_class(Some(k)))
        };
        *summary.entry(class).or_default() += 1;
        // A cell that went from good to bad leads with what changed since the sweep it was
        // compared with.
        let changed = match (class, &prev_cell) {
            ("newly failing", Some(p)) => Some(changes(store, p, c).await?),
            _ => None,
        };
        out_cells.push(json!({
            "cell": c.cell, "state": c.state, "reason": c.reason, "class": class,
            "image_digest": c.image_digest, "trend": trend, "tests": tests,
            "results_pruned": c.results_pruned,
            "changed": changed,
        }));
    }
    // Worst first.
    out_cells.sort_by_key(|c| std::cmp::Reverse(rank(c["class"].as_str().unwrap_or(""))));
    let fire = store.fire_of_run(run.id).await?;
    Ok(json!({
        "sweep": run.id, "state": run.state, "created_at": run.created_at,
        "finished_at": run.finished_at,
        "fire_at": fire.map(|f| f.0), "skipped_before": fire.map(|f| f.1),
        "cells": out_cells,
        "summary": summary,
    }))
}

/// What changed for `cell` between its last good sweep and the first bad one after it: the
/// newest sweep in which a test failed that had passed in the sweep before (known failures
/// failing on both do not count), against that sweep. `None` when no test of the cell ever
/// went from passing to failing in the sweeps kept.
pub async fn diff(store: &Store, cell: &str) -> Result<Option<Value>, AppError> {
    let history = store.cell_history(WORKFLOW, cell).await?;
    let newly = |i: usize| match (&history[i - 1].1, &history[i].1) {
        (Some(before), Some(now)) => now.iter().any(|t| !before.contains(t)),
        _ => false,
    };
    let Some(i) = (1..history.len()).rev().find(|&i| newly(i)) else {
        return Ok(None);
    };
    let (good, bad) = (&history[i - 1].0, &history[i].0);
    Ok(Some(changes(store, good, bad).await?))
}

/// The difference between two sweeps' images of one cell.
pub async fn changes(
    store: &Store,
    good: &SweepCellRow,
    bad: &SweepCellRow,
) -> Result<Value, AppError> {
    let digests = |c: &SweepCellRow| -> Vec<String> {
        c.layers
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["digest"].as_str().map(str::to_owned))
            .collect()
    };
    let (before, after) = (digests(good), digests(bad));
    let mut all = before.clone();
    all.extend(after.iter().cloned());
    let rows = store.layers_by_digest(&all).await?;
    let layer = |d: &str| rows.iter().find(|r| r.0 == d);
    let mut layers = Vec::new();
    let mut repositories = Vec::new();
    for (k, (b, a)) in before.iter().zip(after.iter()).enumerate() {
        if b == a {
            continue;
        }
        let kind = layer(a)
            .or(layer(b))
            .map_or(format!("layer {k}"), |l| l.1.clone());
        layers.push(json!({"layer": kind, "before": b, "after": a}));
        let repos = |d: &str| -> BTreeMap<String, String> {
            layer(d)
                .and_then(|l| l.2["repositories"].as_array().cloned())
                .into_iter()
                .flatten()
                .filter_map(|p| Some((p[0].as_str()?.to_owned(), p[1].as_str()?.to_owned())))
                .collect()
        };
        let (rb, ra) = (repos(b), repos(a));
        for (id, sha) in &ra {
            if rb.get(id) != Some(sha) {
                repositories.push(json!({"layer": kind, "repository": id,
                    "before": rb.get(id), "after": sha}));
            }
        }
    }
    // Package versions: the top layers' lists are every package of each image.
    let installed = |d: Option<&String>| -> BTreeMap<String, String> {
        d.and_then(|d| layer(d))
            .and_then(|l| l.3.as_array().cloned())
            .into_iter()
            .flatten()
            .filter_map(|p| {
                Some((
                    format!("{}.{}", p[0].as_str()?, p[2].as_str().unwrap_or("")),
                    p[1].as_str()?.to_owned(),
                ))
            })
            .collect()
    };
    let (pb, pa) = (installed(before.last()), installed(after.last()));
    let mut packages = Vec::new();
    for (name, v) in &pa {
        if pb.get(name) != Some(v) {
            packages.push(json!({"package": name, "before": pb.get(name), "after": v}));
        }
    }
    for (name, v) in &pb {
        if !pa.contains_key(name) {
            packages.push(json!({"package": name, "before": v, "after": null}));
        }
    }
    Ok(json!({
        "cell": bad.cell,
        "last_good": {"sweep": good.run_id, "image_digest": good.image_digest},
        "first_bad": {"sweep": bad.run_id, "image_digest": bad.image_digest},
        "same_image": good.image_digest == bad.image_digest,
        "layers": layers, "repositories": repositories, "packages": packages,
    }))
}

/// A sweep (the newest when `id` is `None`) as [`view`] shows it; a running one also
/// says how far it is (`progress`: cells done, cells, what runs now).
pub async fn show(store: &Store, id: Option<i64>) -> std::result::Result<Value, super::OpError> {
    let run = match id {
        Some(id) => store.run(id).await?.filter(|r| r.workflow == WORKFLOW),
        None => store.runs_of(WORKFLOW, 1).await?.into_iter().next(),
    };
    let Some(run) = run else {
        return Err(super::OpError::NotFound(id.map_or_else(
            || "no sweep yet".to_owned(),
            |i| format!("no sweep {i}"),
        )));
    };
    let mut v = view(store, &run).await?;
    if run.state == "running" {
        let steps = store.run_timeline(run.id).await?;
        let done = steps
            .iter()
            .filter(|s| {
                s.name == "teardown"
                    && !["waiting", "runnable", "running"].contains(&s.state.as_str())
            })
            .count();
        let running: Vec<String> = steps
            .iter()
            .filter(|s| s.state == "running" && !s.target.is_empty())
            .map(|s| format!("{} {}", s.target, s.name))
            .collect();
        v["progress"] = serde_json::json!({
            "done": done, "cells": run.targets.len(), "running": running,
        });
    }
    Ok(v)
}

/// One page of sweeps, newest first, as summaries (id, state, fire time, summary).
pub async fn list(
    store: &Store,
    page: super::PageAsk,
) -> std::result::Result<super::Page, super::OpError> {
    let (limit, offset) = page.bounds();
    // A cursor is the run id of the last sweep seen (newest first).
    let before = page.after_key("sweeps", |a| a.parse::<i64>().ok())?;
    let mut runs = store
        .runs_of_page(WORKFLOW, limit.saturating_add(1), offset, before)
        .await?;
    let more = runs.len() as i64 > limit;
    runs.truncate(limit as usize);
    let last = runs.last().map(|r| r.id.to_string());
    let total = store.count_runs_of(WORKFLOW).await?;
    let mut items = Vec::new();
    for r in &runs {
        let v = view(store, r).await?;
        items.push(serde_json::json!({
            "sweep": v["sweep"], "state": v["state"], "fire_at": v["fire_at"],
            "created_at": v["created_at"], "finished_at": v["finished_at"], "summary": v["summary"],
        }));
    }
    Ok(super::Page::keyed(
        items,
        total,
        limit,
        offset,
        more,
        last,
        before.is_some(),
    ))
}

/// A cell's trend as marks, oldest first: `.` a night it passed, `x` one it failed, `-`
/// one it did not run.
pub fn trend_marks(cell: &Value) -> String {
    cell["trend"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| match t.as_str() {
            Some("pass") => '.',
            Some("fail") => 'x',
            _ => '-',
        })
        .collect()
}

/// What changed, one line each: layers, repositories, packages; or that nothing did
/// (`sweep show`, `sweep diff`, the dashboard, the report). Empty for `null`.
pub fn change_lines(d: &Value) -> Vec<String> {
    if !d.is_object() {
        return Vec::new();
    }
    let list = |k: &str| d[k].as_array().cloned().unwrap_or_default();
    let short = |v: &Value| {
        v.as_str()
            .map_or("-".to_owned(), |s| s.chars().take(12).collect())
    };
    let mut out = Vec::new();
    for l in list("layers") {
        out.push(format!(
            "layer {}: {} -> {}",
            l["layer"].as_str().unwrap_or(""),
            short(&l["before"]),
            short(&l["after"])
        ));
    }
    for r in list("repositories") {
        out.push(format!(
            "repository {} ({} layer): metadata {} -> {}",
            r["repository"].as_str().unwrap_or(""),
            r["layer"].as_str().unwrap_or(""),
            short(&r["before"]),
            short(&r["after"])
        ));
    }
    for p in list("packages") {
        let v = |x: &Value| x.as_str().unwrap_or("(none)").to_owned();
        out.push(format!(
            "package {}: {} -> {}",
            p["package"].as_str().unwrap_or(""),
            v(&p["before"]),
            v(&p["after"])
        ));
    }
    if out.is_empty() {
        out.push(if d["same_image"] == true {
            "the same image both nights: no input changed (look at the test or the hosts)"
                .to_owned()
        } else {
            "the images differ, but no layer input or package version does".to_owned()
        });
    }
    out
}
