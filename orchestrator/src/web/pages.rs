//! The pages: each gathers its data from the application layer and the store and renders
//! one template.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use serde_json::{Value, json};

use super::{Viewer, page_error, page_error_internal, render};
use crate::api::ApiState;

pub(super) fn base(title: &str, viewer: &Viewer, nav: &str) -> tera::Context {
    let mut ctx = tera::Context::new();
    ctx.insert("title", title);
    ctx.insert("nav", nav);
    ctx.insert("viewer", &viewer.name());
    ctx.insert(
        "csrf",
        &viewer
            .session
            .as_ref()
            .map(|s| s.csrf.as_str())
            .unwrap_or(""),
    );
    ctx
}

/// The colour class of a sweep class or a verdict.
pub(super) fn tone(class: &str) -> &'static str {
    match class {
        "newly failing" | "still failing" | "failing" | "rejected" | "failed" => "bad",
        "flaky" | "incomplete" | "cancelled" => "warn",
        "passing" | "fixed" | "certified" | "passed" => "good",
        "running" => "busy",
        _ => "none",
    }
}

pub(super) fn since(t: Option<&str>) -> String {
    let Some(t) = t.and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()) else {
        return String::new();
    };
    let s = (chrono::Utc::now() - t.with_timezone(&chrono::Utc))
        .num_seconds()
        .max(0);
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

/// The matrix: releases × (OS × arch), the node types of each cell with the latest sweep's
/// class, the trend of the nights before, and a link to the details.
pub async fn matrix(State(s): State<Arc<ApiState>>, viewer: Viewer) -> Response {
    if let Err(r) = viewer.may_read(&s) {
        return r.into_response();
    }
    let Ok(app) = s.app() else {
        return page_error(StatusCode::NOT_FOUND, "no dashboard here");
    };
    // The matrix is the same for every viewer: rendered once per state of the latest sweep.
    let version = match s
        .store
        .sweep_version(crate::app::sweeps::WORKFLOW, None)
        .await
    {
        Ok(v) => v.map_or_else(|| "none".to_owned(), |(id, v)| format!("{id}:{v}")),
        Err(e) => return page_error_internal(&e),
    };
    let key = format!("{}:matrix:{version}", s.store.instance());
    let body = match super::cached_body(&key) {
        Some(b) => b,
        None => {
            let m = match matrix_of(app, &s.store).await {
                Ok(m) => m,
                Err(e) => return page_error_internal(&e),
            };
            let mut ctx = tera::Context::new();
            ctx.insert("columns", &m.columns);
            ctx.insert("rows", &m.rows);
            ctx.insert("sweep", &m.sweep);
            match super::templates().render("matrix_body.html", &ctx) {
                Ok(b) => super::cache_body(&key, b),
                Err(e) => return page_error_internal(&e),
            }
        }
    };
    let mut ctx = base("Release matrix", &viewer, "matrix");
    ctx.insert("body", body.as_str());
    render("matrix.html", &ctx)
}

/// What the matrix shows: its columns (OS × arch), a row per release with each cell's node
/// types, and the sweep it is from with its whole view.
#[derive(Debug, Clone)]
pub struct Matrix {
    pub columns: Vec<Value>,
    pub rows: Vec<Value>,
    pub sweep: Option<Value>,
    pub view: Option<Arc<Value>>,
}

/// The matrix of the latest sweep.
pub async fn matrix_of(
    app: &crate::app::Context,
    store: &crate::store::Store,
) -> Result<Matrix, crate::app::OpError> {
    let s = store;
    let cat = app.catalogue();
    let sweep = match super::sweep_view(s, None).await {
        Ok(v) => Some(v),
        Err(crate::app::OpError::NotFound(_)) => None,
        Err(e) => return Err(e),
    };
    let mut by_cell: BTreeMap<String, &Value> = BTreeMap::new();
    if let Some(v) = &sweep {
        for c in v["cells"].as_array().into_iter().flatten() {
            if let Some(k) = c["cell"].as_str() {
                by_cell.insert(k.to_owned(), c);
            }
        }
    }
    // Columns: every OS × arch the catalogue has, in its order.
    let mut columns: Vec<(String, String)> = Vec::new();
    for p in &cat.platforms {
        if !columns.contains(&(p.os.clone(), p.arch.clone())) {
            columns.push((p.os.clone(), p.arch.clone()));
        }
    }
    let mut rows = Vec::new();
    for r in &cat.releases {
        let mut cells = Vec::new();
        for (os, arch) in &columns {
            let platform = cat
                .platforms
                .iter()
                .find(|p| &p.os == os && &p.arch == arch && r.platforms.contains(&p.label));
            let Some(p) = platform else {
                cells.push(json!({"offered": false}));
                continue;
            };
            let mut nodes = Vec::new();
            for n in &r.node_types {
                if !n.available_on(r, &p.label) {
                    continue;
                }
                let key = format!("{}/{}/{}", r.name, p.label, n.name);
                let c = by_cell.get(&key);
                let class = c.and_then(|c| c["class"].as_str()).unwrap_or("not swept");
                let trend = c
                    .map(|c| crate::app::sweeps::trend_marks(c))
                    .unwrap_or_default();
                let failing: Vec<String> = c
                    .and_then(|c| c["tests"].as_array())
                    .into_iter()
                    .flatten()
                    .filter(|t| t["class"] != "passing")
                    .map(|t| {
                        format!(
                            "{}/{} {}",
                            t["suite"].as_str().unwrap_or(""),
                            t["name"].as_str().unwrap_or(""),
                            t["class"].as_str().unwrap_or("")
                        )
                    })
                    .collect();
                nodes.push(json!({
                    "name": n.name, "cell": key, "anchor": anchor(&key), "class": class, "tone": tone(class),
                    "trend": trend, "failing": failing,
                    "reason": c.and_then(|c| c["reason"].as_str()),
                }));
            }
            cells.push(json!({"offered": true, "platform": p.label, "nodes": nodes}));
        }
        rows.push(json!({"release": r.label, "name": r.name, "cells": cells}));
    }
    Ok(Matrix {
        columns: columns
            .iter()
            .map(|(o, a)| json!({"os": o, "arch": a}))
            .collect(),
        rows,
        sweep: sweep.as_ref().map(|v| {
            json!({"id": v["sweep"], "state": v["state"], "summary": v["summary"],
                   "finished_at": v["finished_at"], "created_at": v["created_at"],
                   "fire_at": v["fire_at"]})
        }),
        view: sweep,
    })
}

/// The queue: every run in flight, the stage each target is in and for how long,
/// conflicts; the page reloads itself every 10 s.
pub async fn queue(State(s): State<Arc<ApiState>>, viewer: Viewer) -> Response {
    if let Err(r) = viewer.may_read(&s) {
        return r.into_response();
    }
    let runs = match s.store.runs(Some("running"), None, 500).await {
        Ok(r) => r,
        Err(e) => return page_error_internal(&e),
    };
    let mut out = Vec::new();
    for r in runs.iter().rev() {
        let steps = match s.store.run_timeline(r.id).await {
            Ok(t) => t,
            Err(e) => return page_error_internal(&e),
        };
        let title = match r.patch_id {
            Some(p) => s
                .store
                .get_patch(p as u64, r.revision.map(|v| v as u32))
                .await
                .ok()
                .flatten()
                .map(|row| row.record.title)
                .unwrap_or_default(),
            None => "nightly sweep".to_owned(),
        };
        let mut targets = Vec::new();
        for t in &r.targets {
            let mine: Vec<_> = steps.iter().filter(|st| st.target == *t).collect();
            let current = mine
                .iter()
                .find(|st| st.state == "running")
                .or_else(|| mine.iter().find(|st| st.state == "runnable"))
                .or_else(|| mine.iter().rev().find(|st| st.finished_at.is_some()));
            let (stage, state, started) = match current {
                Some(st) => (
                    st.name.clone(),
                    st.state.clone(),
                    st.started_at.map(|t| t.to_rfc3339()),
                ),
                None => ("queued".into(), "no step started yet".into(), None),
            };
            let done = mine
                .iter()
                .filter(|st| matches!(st.state.as_str(), "passed" | "failed" | "cancelled"))
                .count();
            targets.push(json!({
                "target": t, "stage": stage, "state": state,
                "for": since(started.as_deref()), "done": done, "steps": mine.len(),
                "host": current.and_then(|c| c.host.clone()),
            }));
        }
        let conflicts: Vec<String> = r
            .conflicts
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                format!(
                    "patch {} r{} (packages {}, node types {})",
                    c["patch"], c["revision"], c["packages"], c["node_types"]
                )
            })
            .collect();
        out.push(json!({
            "run": r.id, "patch": r.patch_id, "revision": r.revision,
            "workflow": r.workflow, "title": title, "targets": targets, "conflicts": conflicts,
            "age": since(Some(&r.created_at.to_rfc3339())),
        }));
    }
    let mut ctx = base("Queue", &viewer, "queue");
    ctx.insert("runs", &out);
    render("queue.html", &ctx)
}

/// A run's steps as an SVG timeline: one row per step, a bar from its start to its end.
fn timeline_svg(steps: &[crate::store::engine::StepDetail]) -> String {
    use std::fmt::Write as _;
    // Tenths without float formatting's slow exact path: `12.3`.
    fn tenths(out: &mut String, x: f64) {
        let t = (x * 10.0).round() as i64;
        let _ = write!(out, "{}.{}", t / 10, (t % 10).abs());
    }
    use crate::app::reports::xml_escape_into as escaped;
    let ms = |d: chrono::TimeDelta| d.num_milliseconds() as f64 / 1000.0;
    let rows: Vec<_> = steps
        .iter()
        .filter_map(|s| Some((s, s.started_at?)))
        .collect();
    let Some(t0) = rows.iter().map(|(_, t)| *t).min() else {
        return String::new();
    };
    let seconds = |s: &crate::store::engine::StepDetail| Some(ms(s.finished_at? - s.started_at?));
    let end = rows
        .iter()
        .map(|(s, t)| match s.finished_at {
            Some(f) => f.max(*t),
            None => *t,
        })
        .max()
        .unwrap_or(t0);
    let span = ms(end - t0).max(1.0);
    let (label_w, bar_w, row_h) = (300.0, 560.0, 16.0);
    let height = rows.len() as f64 * row_h + 24.0;
    let mut svg = String::with_capacity(256 + rows.len() * 320);
    let _ = write!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"timeline\" width=\"{}\" height=\"{height}\" role=\"img\" aria-label=\"timeline of the run's steps\">",
        label_w + bar_w + 70.0
    );
    for (i, (s, start)) in rows.iter().enumerate() {
        let offset = ms(*start - t0);
        let x = label_w + offset / span * bar_w;
        let secs = seconds(s);
        let w = (secs.unwrap_or(span - offset) / span * bar_w).max(2.0);
        // Rows are whole pixels apart: integers, not float formatting.
        let y = i as i64 * row_h as i64 + 4;
        let target = if s.target.is_empty() {
            "(run)"
        } else {
            &s.target
        };
        let _ = write!(svg, "<text x=\"0\" y=\"{}\" class=\"tl-label\">", y + 11);
        escaped(&mut svg, target);
        svg.push(' ');
        escaped(&mut svg, &s.name);
        svg.push_str("</text><rect x=\"");
        tenths(&mut svg, x);
        let _ = write!(svg, "\" y=\"{y}\" width=\"");
        tenths(&mut svg, w);
        let _ = write!(svg, "\" height=\"{}\" class=\"tl-", row_h as i64 - 4);
        escaped(&mut svg, &s.state);
        svg.push_str("\"><title>");
        escaped(&mut svg, target);
        svg.push(' ');
        escaped(&mut svg, &s.name);
        svg.push(' ');
        escaped(&mut svg, &s.state);
        svg.push(' ');
        if let Some(x) = secs {
            tenths(&mut svg, x);
            svg.push_str(" s");
        }
        svg.push_str("</title></rect><text x=\"");
        tenths(&mut svg, x + w + 4.0);
        let _ = write!(svg, "\" y=\"{}\" class=\"tl-secs\">", y + 11);
        if let Some(x) = secs {
            tenths(&mut svg, x);
            svg.push_str(" s");
        }
        svg.push_str("</text>");
    }
    let _ = write!(
        svg,
        "<text x=\"{label_w}\" y=\"{:.0}\" class=\"tl-secs\">0 s</text><text x=\"{:.0}\" y=\"{:.0}\" class=\"tl-secs\">{span:.0} s</text></svg>",
        height - 4.0,
        label_w + bar_w - 30.0,
        height - 4.0
    );
    svg
}

/// A patch: the verdict and its reason first; targets, steps and their timeline; test
/// results with their output; the logs; bugs and their evidence; rerun and cancel for
/// those allowed.
pub async fn patch(
    State(s): State<Arc<ApiState>>,
    viewer: Viewer,
    id: Result<Path<u64>, axum::extract::rejection::PathRejection>,
) -> Response {
    if let Err(r) = viewer.may_read(&s) {
        return r.into_response();
    }
    let Ok(Path(id)) = id else {
        return page_error(StatusCode::BAD_REQUEST, "a patch is named by its number");
    };
    // What the page is made of, read every time; a settled page is rendered once per stamp.
    let stamp = match s.store.patch_stamp(id).await {
        Ok(Some(st)) => st,
        Ok(None) => {
            return page_error(StatusCode::NOT_FOUND, &format!("patch {id} is not stored"));
        }
        Err(e) => return page_error_internal(&e),
    };
    let cache = super::page_cache::global();
    let kept = if stamp.settled {
        cache.get((s.store.instance(), id), &stamp.stamp)
    } else {
        None
    };
    let page = match kept {
        Some(p) => p,
        None => match patch_page(&s, id).await {
            Ok(p) if stamp.settled => cache.keep((s.store.instance(), id), stamp.stamp, p),
            Ok(p) => Arc::new(p),
            Err(r) => return r,
        },
    };
    let may_act = viewer
        .actor()
        .is_some_and(|a| a.may_act_as_owner(stamp.owner.as_deref()));
    let mut ctx = base(&format!("Patch {id}"), &viewer, "queue");
    ctx.insert("id", &id);
    ctx.insert("revision", &page.revision);
    ctx.insert("title_text", &page.title_text);
    ctx.insert("tone", page.tone);
    ctx.insert("verdict_line", &page.verdict_line);
    ctx.insert("running", &page.running);
    ctx.insert("may_act", &may_act);
    ctx.insert("body", page.body().as_ref());
    render("patch.html", &ctx)
}

/// The viewer-independent part of patch `id`'s page, rendered.
async fn patch_page(s: &ApiState, id: u64) -> Result<super::page_cache::PatchPage, Response> {
    let (v, run_row, steps) = match crate::app::show::patch_and_steps(&s.store, id, None).await {
        Ok(v) => v,
        Err(crate::app::OpError::NotFound(m)) => return Err(page_error(StatusCode::NOT_FOUND, &m)),
        Err(e) => return Err(page_error_internal(&e)),
    };
    let run = &v["run"];
    let verdict = run["verdict"].as_str().unwrap_or("not certified yet");
    // Each target's tests and logs, from the VM its boot step started; and how its tests
    // differ from the last good run of the same target.
    let known: Vec<String> = run["known_failures"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| k.as_str().map(str::to_owned))
        .collect();
    let evidence = match &run_row {
        Some(r) => match crate::app::evidence::of_run(&s.store, r, &steps, &known, 8192).await {
            Ok(e) => e,
            Err(e) => return Err(page_error_internal(&e)),
        },
        None => Vec::new(),
    };
    // The last good run of each target that has tests to compare, in one go.
    let tested: Vec<String> = evidence
        .iter()
        .filter(|e| !e.tests.is_empty())
        .map(|e| e.target.clone())
        .collect();
    let goods = match &run_row {
        Some(r) => match crate::app::evidence::last_good(&s.store, &tested, r.id).await {
            Ok(g) => g,
            Err(e) => return Err(page_error_internal(&e)),
        },
        None => Vec::new(),
    };
    let mut targets = Vec::new();
    let mut build_logs = Vec::new();
    for t in run["targets"].as_array().into_iter().flatten() {
        let key = format!(
            "{}/{}/{}",
            t["release"].as_str().unwrap_or(""),
            t["platform"].as_str().unwrap_or(""),
            t["node_type"].as_str().unwrap_or("")
        );
        let ev = evidence.iter().find(|e| e.target == key);
        let tests: Vec<Value> = ev
            .map(|e| e.tests.as_slice())
            .unwrap_or(&[])
            .iter()
            .map(|r| {
                let tone = if r.status == "pass" {
                    "good"
                } else if r.known {
                    "warn"
                } else {
                    "bad"
                };
                json!({
                    "suite": r.suite, "name": r.name, "status": r.status, "tone": tone,
                    "known": r.known, "seconds": format!("{:.1}", r.seconds), "output": r.output,
                })
            })
            .collect();
        if let Some(log) = ev.and_then(|e| e.build_log.clone()) {
            build_logs.push(json!({"target": key, "log": log}));
        }
        let mut against = None;
        if let Some(e) = ev
            && let Some((_, good, good_tests)) = goods.iter().find(|g| g.0 == key)
        {
            let changes: Vec<Value> = crate::app::evidence::diff(&e.tests, good_tests)
                .into_iter()
                .map(|(test, before, now)| {
                    let shown = |s: Option<String>| s.unwrap_or_else(|| "(absent)".into());
                    json!({"test": test, "before": shown(before), "now": shown(now)})
                })
                .collect();
            against = Some(json!({
                "run": good.run, "patch": good.patch_id, "revision": good.revision,
                "changes": changes,
            }));
        }
        targets.push(json!({
            "key": key, "outcome": t["outcome"], "tone": tone(t["outcome"].as_str().unwrap_or("")),
            "host": t["host"], "attempts": t["attempts"], "reason": t["reason"],
            "seconds": t["seconds"].as_f64().map(|x| format!("{x:.1}")),
            "tests": tests, "vm": ev.and_then(|e| e.vm.clone()),
            "harness_log": ev.map(|e| e.harness_log.clone()).unwrap_or_default(),
            "serial_log": ev.map(|e| e.serial_log.clone()).unwrap_or_default(),
            "against": against,
        }));
    }
    let record = &v["record"];
    let mut ctx = tera::Context::new();
    ctx.insert("record", record);
    ctx.insert("owner", &v["owner"]);
    ctx.insert("targets", &targets);
    ctx.insert("run_id", &v["run_id"]);
    ctx.insert("timeline", &v["timeline"]);
    let ordered = crate::app::runs::in_timeline_order(
        run_row
            .as_ref()
            .map(|r| r.targets.as_slice())
            .unwrap_or(&[]),
        steps,
    );
    ctx.insert("timeline_svg", &timeline_svg(&ordered));
    ctx.insert("bugs", &run["bugs"]);
    ctx.insert("build_logs", &build_logs);
    ctx.insert("revisions", &v["revisions"]);
    let body = super::templates()
        .render("patch_body.html", &ctx)
        .map_err(|e| page_error_internal(&e))?;
    Ok(super::page_cache::PatchPage::new(
        v["revision"].as_u64().unwrap_or(0) as u32,
        record["title"].clone(),
        tone(verdict),
        if run.is_object() {
            crate::app::runs::verdict_sentence(run)
        } else {
            "no certification run yet".to_owned()
        },
        v["run_state"] == "running",
        body,
    ))
}

#[derive(Debug, serde::Deserialize)]
pub struct ActForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    failed: Option<String>,
}

async fn act(
    s: &ApiState,
    viewer: &Viewer,
    id: u64,
    form: Result<axum::Form<ActForm>, axum::extract::rejection::FormRejection>,
    what: &str,
) -> Response {
    let form = match form {
        Ok(axum::Form(f)) => f,
        Err(_) => {
            return page_error(
                StatusCode::BAD_REQUEST,
                "the form is not one of this dashboard's",
            );
        }
    };
    if let Err(r) = viewer.check_csrf(&form.csrf) {
        return r.into_response();
    }
    let (Some(actor), Ok(app)) = (viewer.actor(), s.app()) else {
        return Redirect::to("/login").into_response();
    };
    let done = match what {
        "rerun" => crate::app::runs::rerun_for(app, &actor, id, form.failed.is_some())
            .await
            .map(|_| ()),
        _ => crate::app::runs::cancel_for(app, &actor, id)
            .await
            .map(|_| ()),
    };
    match done {
        Ok(()) => Redirect::to(&format!("/patches/{id}")).into_response(),
        Err(crate::app::OpError::Forbidden(m)) => page_error(StatusCode::FORBIDDEN, &m),
        Err(crate::app::OpError::Refused(m) | crate::app::OpError::NotFound(m)) => {
            page_error(StatusCode::UNPROCESSABLE_ENTITY, &m)
        }
        Err(e) => page_error_internal(&e),
    }
}

pub async fn rerun(
    State(s): State<Arc<ApiState>>,
    viewer: Viewer,
    Path(id): Path<u64>,
    form: Result<axum::Form<ActForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    act(&s, &viewer, id, form, "rerun").await
}

pub async fn cancel(
    State(s): State<Arc<ApiState>>,
    viewer: Viewer,
    Path(id): Path<u64>,
    form: Result<axum::Form<ActForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    act(&s, &viewer, id, form, "cancel").await
}

/// The hosts: capacity, slots in use, VMs running, quarantined hosts and why.
pub async fn hosts(State(s): State<Arc<ApiState>>, viewer: Viewer) -> Response {
    if let Err(r) = viewer.may_read(&s) {
        return r.into_response();
    }
    let (hosts, held) = match (s.store.list_hosts().await, s.store.held_slots().await) {
        (Ok(h), Ok(held)) => (h, held),
        (Err(e), _) | (_, Err(e)) => return page_error_internal(&e),
    };
    let mut out = Vec::new();
    for h in hosts {
        let live = s.store.live_vms(&h.name).await.unwrap_or_default();
        out.push(json!({
            "name": h.name, "agent": h.agent_url, "slots": h.slots,
            "held": held.get(&h.name).copied().unwrap_or(0),
            "memory_mib": h.memory_mib, "vcpus": h.vcpus,
            "heartbeat": since(h.last_heartbeat.map(|t| t.to_rfc3339()).as_deref()),
            "vms": live,
            "quarantined": h.quarantined_at.is_some(),
            "quarantine_reason": h.quarantine_reason,
            "quarantined_for": since(h.quarantined_at.map(|t| t.to_rfc3339()).as_deref()),
        }));
    }
    let mut ctx = base("Hosts", &viewer, "hosts");
    ctx.insert("hosts", &out);
    render("hosts.html", &ctx)
}

/// A sweep (the newest without an id): each cell's class, trend and the tests that are not
/// passing; what changed for a newly failing cell.
pub async fn sweep(
    State(s): State<Arc<ApiState>>,
    viewer: Viewer,
    id: Option<Path<i64>>,
) -> Response {
    if let Err(r) = viewer.may_read(&s) {
        return r.into_response();
    }
    let (key, v) = match super::sweep_view_keyed(&s.store, id.map(|Path(i)| i)).await {
        Ok(v) => v,
        Err(crate::app::OpError::NotFound(m)) => return page_error(StatusCode::NOT_FOUND, &m),
        Err(e) => return page_error_internal(&e),
    };
    let key = format!("{}:sweep:{key}", s.store.instance());
    let body = match super::cached_body(&key) {
        Some(b) => b,
        None => {
            let mut ctx = tera::Context::new();
            ctx.insert("sweep", v.as_ref());
            ctx.insert("cells", &cell_rows(&v));
            match super::templates().render("sweep_body.html", &ctx) {
                Ok(b) => super::cache_body(&key, b),
                Err(e) => return page_error_internal(&e),
            }
        }
    };
    let mut ctx = base(&format!("Sweep {}", v["sweep"]), &viewer, "matrix");
    ctx.insert("running", &(v["state"] == "running"));
    ctx.insert("body", body.as_str());
    render("sweep.html", &ctx)
}

/// A sweep's cells as its page and the report list them.
pub fn cell_rows(sweep: &Value) -> Vec<Value> {
    sweep["cells"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let class = c["class"].as_str().unwrap_or("");
            let failing: Vec<Value> = c["tests"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|t| t["class"] != "passing")
                .cloned()
                .collect();
            let changed = crate::app::sweeps::change_lines(&c["changed"]);
            json!({
                "cell": c["cell"], "anchor": anchor(c["cell"].as_str().unwrap_or("")),
                "class": class, "tone": tone(class), "trend": crate::app::sweeps::trend_marks(c),
                "reason": c["reason"], "failing": failing, "changed": changed,
            })
        })
        .collect()
}

/// A cell's name as an HTML id.
pub fn anchor(cell: &str) -> String {
    cell.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

/// What the layer cache and the delta transfers saved: per host and per day.
pub async fn savings(State(s): State<Arc<ApiState>>, viewer: Viewer) -> Response {
    if let Err(r) = viewer.may_read(&s) {
        return r.into_response();
    }
    let (sv, m) = match (s.store.savings(60).await, s.store.metrics().await) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return page_error_internal(&e),
    };
    let mib = |b: i64| format!("{:.1}", b as f64 / 1048576.0);
    let pct = |part: i64, whole: i64| {
        if whole > 0 {
            format!("{:.1} %", 100.0 * part as f64 / whole as f64)
        } else {
            "—".to_owned()
        }
    };
    let hosts: Vec<Value> = sv
        .by_host
        .iter()
        .map(|(h, n, sent, total)| {
            json!({"host": h, "transfers": n, "sent": mib(*sent), "total": mib(*total),
                   "saved": pct(total - sent, *total)})
        })
        .collect();
    let peak = sv.by_day.iter().map(|d| d.3).max().unwrap_or(0).max(1);
    let days: Vec<Value> = sv
        .by_day
        .iter()
        .map(|(day, n, sent, total, hits, misses)| {
            json!({"day": day, "transfers": n, "sent": mib(*sent), "total": mib(*total),
                   "saved": pct(total - sent, *total), "hits": hits, "misses": misses,
                   "hit_rate": pct(*hits, hits + misses),
                   "bar_total": 300 * total / peak, "bar_sent": 300 * sent / peak})
        })
        .collect();
    let mut ctx = base("Savings", &viewer, "savings");
    ctx.insert("hosts", &hosts);
    ctx.insert("days", &days);
    ctx.insert("hits", &m.layer_hits);
    ctx.insert("misses", &m.layer_misses);
    ctx.insert(
        "hit_rate",
        &pct(m.layer_hits, m.layer_hits + m.layer_misses),
    );
    ctx.insert("sent", &mib(m.bytes_sent));
    ctx.insert("total", &mib(m.bytes_total));
    ctx.insert("saved", &pct(m.bytes_total - m.bytes_sent, m.bytes_total));
    render("savings.html", &ctx)
}
