//! `certo validate`, `submit`, `patches`, `show`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use serde_json::json;

use super::{EXIT_INVALID, Global, print_json, progress};
use certo_orchestrator::ingest::{self, Loaded};
use certo_orchestrator::patch::{PackageSource, PatchRecord};
use certo_orchestrator::store::{PatchRow, PatchState, Store, SubmitError, SubmitOutcome};

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Patch record files (.yaml/.yml, .json, .txt; other names are recognised by content), or folders of them.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// Patch record files or folders of them; stored in one transaction, or not at all.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Certify the submitted revisions and wait for their verdicts (exit status 0: all
    /// certified, 1: any rejected, 3: any incomplete).
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Args)]
pub struct PatchesArgs {
    /// Only patches in this state (submitted, superseded).
    #[arg(long, value_name = "STATE")]
    pub state: Option<PatchState>,
    /// Only patches of this release (3.1, 3.2, "gLite 3.2").
    #[arg(long, value_name = "RELEASE")]
    pub release: Option<String>,
    /// List every revision, superseded ones included.
    #[arg(long)]
    pub all_revisions: bool,
    /// Print the list as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The patch id (e.g. 3456), optionally with a revision (3456@2).
    #[arg(value_name = "PATCH")]
    pub patch: String,
    /// The revision to show (default: the newest).
    #[arg(long, short)]
    pub revision: Option<u32>,
    /// Print the patch as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

fn load(g: &Global, files: &[PathBuf]) -> anyhow::Result<Loaded> {
    let catalogue = g.catalogue()?;
    let count = ingest::expand(files).map(|f| f.len()).unwrap_or(0);
    let bar = progress(count as u64, "validating");
    let loaded = ingest::load_files(files, &catalogue, || bar.inc(1));
    bar.finish_and_clear();
    Ok(loaded)
}

/// Warnings and lifecycle notes of valid records, `FILE:LINE:COL: warning|note: …`.
fn print_remarks(loaded: &Loaded) {
    for r in &loaded.records {
        for w in &r.warnings {
            eprintln!(
                "{}:{}:{}: warning: {}: {}",
                w.file, w.line, w.col, w.field, w.message
            );
        }
        if let Some(note) = r.note() {
            eprintln!("{}:{}:{}: note: {note}", r.file, r.pos.line, r.pos.col);
        }
    }
}

/// Warnings and notes for `--json`.
fn remarks_json(
    loaded: &Loaded,
) -> (
    Vec<&certo_orchestrator::patch::Diagnostic>,
    Vec<serde_json::Value>,
) {
    let warnings = loaded.records.iter().flat_map(|r| &r.warnings).collect();
    let notes = loaded
        .records
        .iter()
        .filter_map(|r| {
            r.note().map(|n| {
                json!({"file": r.file, "line": r.pos.line, "col": r.pos.col, "patch": r.record.id, "note": n})
            })
        })
        .collect();
    (warnings, notes)
}

pub fn validate(g: &Global, args: ValidateArgs) -> anyhow::Result<ExitCode> {
    let loaded = load(g, &args.files)?;
    for e in &loaded.errors {
        eprintln!("{e}");
    }
    if loaded.errors.is_empty() {
        print_remarks(&loaded);
    }
    let bad_files = loaded.files.iter().filter(|f| f.2 > 0).count();
    if args.json {
        let files: Vec<_> = loaded
            .files
            .iter()
            .map(|(file, records, errors)| json!({"file": file, "records": records, "errors": errors}))
            .collect();
        let mut out = json!({
            "valid": loaded.errors.is_empty(),
            "records": loaded.records.len(),
            "files": files,
            "errors": loaded.errors,
        });
        let (warnings, notes) = remarks_json(&loaded);
        if !warnings.is_empty() {
            out["warnings"] = json!(warnings);
        }
        if !notes.is_empty() {
            out["notes"] = json!(notes);
        }
        print_json(&out)?;
    } else if loaded.errors.is_empty() {
        println!(
            "{} record(s) in {} file(s): all valid",
            loaded.records.len(),
            loaded.files.len()
        );
    } else {
        eprintln!(
            "{} error(s) in {bad_files} of {} file(s)",
            loaded.errors.len(),
            loaded.files.len().max(1)
        );
    }
    Ok(if loaded.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_INVALID)
    })
}

pub async fn submit(g: &Global, args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let loaded = load(g, &args.files)?;
    if !loaded.errors.is_empty() {
        for e in &loaded.errors {
            eprintln!("{e}");
        }
        eprintln!("{} error(s); nothing was stored", loaded.errors.len());
        if args.json {
            print_json(&json!({"stored": false, "errors": loaded.errors}))?;
        }
        return Ok(ExitCode::from(EXIT_INVALID));
    }
    print_remarks(&loaded);
    let store = g.store().await?;
    match store.submit(&loaded.records).await {
        Ok(reports) if args.wait => {
            let ctx = g.context()?;
            let mut ids = Vec::new();
            for r in &reports {
                let Some(row) = store.get_patch(r.patch_id, Some(r.revision)).await? else {
                    continue;
                };
                if !row.record.wants_certification_status() {
                    eprintln!(
                        "patch {} r{}: tracker status {:?} is not for certification; stored only",
                        r.patch_id, r.revision, row.record.status
                    );
                    continue;
                }
                let existing =
                    certo_orchestrator::app::runs::latest(&store, r.patch_id, Some(r.revision))
                        .await?;
                let id = match existing {
                    Some(run) if run.cancel_reason.is_none() => run.id,
                    _ => certo_orchestrator::app::runs::start(&ctx, &row.record).await?,
                };
                if !args.json {
                    eprintln!(
                        "patch {} r{}: run {id} ({})",
                        r.patch_id,
                        r.revision,
                        match r.outcome {
                            SubmitOutcome::Unchanged => "already stored",
                            _ => "stored",
                        }
                    );
                }
                ids.push(id);
            }
            super::run_cmd::wait_and_print(&store, &ids, !args.json, args.json).await
        }
        Ok(reports) => {
            if args.json {
                print_json(&json!({"stored": true, "records": reports}))?;
            } else {
                for r in &reports {
                    match r.outcome {
                        SubmitOutcome::Stored {
                            supersedes: Some(old),
                        } => println!(
                            "stored     patch {} r{} (supersedes r{old})  {}",
                            r.patch_id, r.revision, r.file
                        ),
                        SubmitOutcome::Stored { supersedes: None } => {
                            println!(
                                "stored     patch {} r{}  {}",
                                r.patch_id, r.revision, r.file
                            )
                        }
                        SubmitOutcome::Unchanged => println!(
                            "unchanged  patch {} r{} (already stored with the same content)  {}",
                            r.patch_id, r.revision, r.file
                        ),
                    }
                }
            }
            tracing::info!(records = reports.len(), "submitted");
            Ok(ExitCode::SUCCESS)
        }
        Err(SubmitError::Conflicts(conflicts)) => {
            for e in &conflicts {
                eprintln!("{e}");
            }
            eprintln!("{} conflict(s); nothing was stored", conflicts.len());
            if args.json {
                print_json(&json!({"stored": false, "errors": conflicts}))?;
            }
            Ok(ExitCode::from(EXIT_INVALID))
        }
        Err(SubmitError::Store(e)) => Err(e).context("cannot store the records"),
    }
}

fn summary(row: &PatchRow) -> serde_json::Value {
    json!({
        "patch_id": row.patch_id,
        "revision": row.revision,
        "state": row.state,
        "title": row.record.title,
        "release": row.record.release,
        "platforms": row.record.platforms,
        "node_types": row.record.node_types,
        "submitter": row.record.submitter,
        "tracker_status": row.record.status,
        "submitted_at": row.submitted_at,
        "superseded_by": row.superseded_by,
        "content_sha256": row.content_sha256,
    })
}

pub async fn patches(g: &Global, args: PatchesArgs) -> anyhow::Result<ExitCode> {
    let store = g.store().await?;
    list(g, &store, args).await
}

/// Lists patches from an open store (the demo reuses its own).
pub async fn list(g: &Global, store: &Store, args: PatchesArgs) -> anyhow::Result<ExitCode> {
    let release = match &args.release {
        Some(r) => Some(
            g.catalogue()?
                .release(r)
                .map(|r| r.name.clone())
                .with_context(|| format!("unknown release `{r}`"))?,
        ),
        None => None,
    };
    let mut rows = store.list_patches(args.state, release.as_deref()).await?;
    if args.state.is_none() && !args.all_revisions {
        rows.retain(|r| r.state != PatchState::Superseded);
    }
    if args.json {
        let list: Vec<_> = rows.iter().map(summary).collect();
        return print_json(&list).map(|()| ExitCode::SUCCESS);
    }
    if rows.is_empty() {
        println!("no patches");
        return Ok(ExitCode::SUCCESS);
    }
    let table: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.patch_id.to_string(),
                r.revision.to_string(),
                r.state.to_string(),
                format!("gLite {}", r.record.release_shown()),
                r.record.platforms.join(","),
                r.record.node_types.join(","),
                r.record.title.clone(),
            ]
        })
        .collect();
    let header = [
        "PATCH",
        "REV",
        "STATE",
        "RELEASE",
        "PLATFORMS",
        "NODE TYPES",
        "TITLE",
    ];
    let mut widths = header.map(str::len);
    for row in &table {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out
    };
    println!("{}", line(&header.map(String::from)));
    for row in &table {
        println!("{}", line(row));
    }
    println!("{} patch revision(s)", rows.len());
    Ok(ExitCode::SUCCESS)
}

fn parse_patch_arg(s: &str) -> anyhow::Result<(u64, Option<u32>)> {
    let (id, rev) = match s.split_once('@') {
        Some((id, rev)) => (id, Some(rev)),
        None => (s, None),
    };
    let id = id.trim().parse().with_context(|| {
        format!("`{s}` is not a patch id (expected digits, optionally @REVISION)")
    })?;
    let rev = rev
        .map(|r| r.trim().trim_start_matches(['r', 'R']).parse())
        .transpose()
        .with_context(|| format!("`{s}` has no valid revision after `@`"))?;
    Ok((id, rev))
}

pub async fn show(g: &Global, args: ShowArgs) -> anyhow::Result<ExitCode> {
    let (id, at_rev) = parse_patch_arg(&args.patch)?;
    let revision = args.revision.or(at_rev);
    let store = g.store().await?;
    let Some(row) = store.get_patch(id, revision).await? else {
        match revision {
            Some(r) => eprintln!("error: patch {id} revision {r} is not stored"),
            None => eprintln!("error: patch {id} is not stored"),
        }
        return Ok(ExitCode::from(EXIT_INVALID));
    };
    let revisions = store.revisions(id).await?;
    let events = store.events(id).await?;
    let run = certo_orchestrator::app::runs::latest(&store, id, Some(row.revision)).await?;
    let run_view = match &run {
        Some(r) => Some(certo_orchestrator::app::runs::view(&store, r).await?),
        None => None,
    };
    let timeline = match &run {
        Some(r) => certo_orchestrator::app::runs::timeline(&store, r.id).await?,
        None => Vec::new(),
    };
    if args.json {
        let revs: Vec<_> = revisions
            .iter()
            .map(|(r, s)| json!({"revision": r, "state": s}))
            .collect();
        print_json(&json!({
            "patch_id": row.patch_id,
            "revision": row.revision,
            "state": row.state,
            "content_sha256": row.content_sha256,
            "submitted_at": row.submitted_at,
            "superseded_by": row.superseded_by,
            "source_file": row.source_file,
            "source_format": row.source_format,
            "record": row.record,
            "revisions": revs,
            "events": events,
            "run": run_view,
            "timeline": timeline,
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    print_record(&row.record);
    println!();
    println!(
        "Certo state:   {}{}",
        row.state,
        row.superseded_by
            .map(|r| format!(" (by revision {r})"))
            .unwrap_or_default()
    );
    println!(
        "Submitted:     {} from {} ({})",
        row.submitted_at.format("%Y-%m-%d %H:%M:%S UTC"),
        row.source_file,
        row.source_format
    );
    println!("Content:       sha256:{}", row.content_sha256);
    let revs: Vec<String> = revisions.iter().map(|(r, s)| format!("r{r} {s}")).collect();
    println!("Revisions:     {}", revs.join(", "));
    println!("History:");
    for e in &events {
        println!(
            "  {}  r{}  {}  {}",
            e.at.format("%Y-%m-%d %H:%M:%S"),
            e.revision,
            e.kind,
            e.detail
        );
    }
    if let (Some(r), Some(v)) = (&run, &run_view) {
        println!();
        println!("Verdict:       {}", super::run_cmd::verdict_line(v));
        for t in v["targets"].as_array().into_iter().flatten() {
            println!(
                "  {}/{}/{:<16} {:<10} host {:<12} attempts {}  {:>6.1} s{}",
                t["release"].as_str().unwrap_or(""),
                t["platform"].as_str().unwrap_or(""),
                t["node_type"].as_str().unwrap_or(""),
                t["outcome"].as_str().unwrap_or(""),
                t["host"].as_str().unwrap_or("-"),
                t["attempts"],
                t["seconds"].as_f64().unwrap_or(0.0),
                t["reason"]
                    .as_str()
                    .map(|r| format!("  {}", super::printable(r)))
                    .unwrap_or_default()
            );
        }
        println!("Timeline (run {}, {}):", r.id, r.state);
        for s in &timeline {
            println!(
                "  {:<34} {:<10} {:<9} attempt {}  {:<12} {}",
                if s["target"] == "" {
                    "(run)"
                } else {
                    s["target"].as_str().unwrap_or("")
                },
                s["step"].as_str().unwrap_or(""),
                s["state"].as_str().unwrap_or(""),
                s["attempt"],
                s["host"].as_str().unwrap_or("-"),
                s["seconds"]
                    .as_f64()
                    .map(|x| format!("{x:.1} s"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_record(r: &PatchRecord) {
    println!("Patch {} revision {}: {}", r.id, r.revision, r.title);
    println!("Status:        {}", r.status);
    println!("Release:       gLite {}", r.release_shown());
    println!("Platforms:     {}", r.platforms.join(", "));
    println!("Node types:    {}", r.node_types.join(", "));
    println!("Submitter:     {}", r.submitter);
    if let Some(a) = &r.assigned_to {
        println!("Assigned to:   {a}");
    }
    if let Some(p) = &r.priority {
        println!("Priority:      {p}");
    }
    if let Some(p) = &r.release_path {
        println!("Release path:  {p:?}");
    }
    if !r.bugs.is_empty() {
        println!("Bugs:");
        for b in &r.bugs {
            let title = b
                .title
                .as_deref()
                .map(|t| format!(" ({t})"))
                .unwrap_or_default();
            let test = b
                .regression_test
                .as_deref()
                .map(|t| format!(" [test: {t}]"))
                .unwrap_or_default();
            println!("  {}{title}{test}", b.id);
        }
    }
    if !r.packages.is_empty() {
        println!("Packages:");
        for p in &r.packages {
            let source = match &p.source {
                PackageSource::Release => String::new(),
                PackageSource::Repository(path) => format!(" from repository {path}"),
                PackageSource::Url(url) => format!(" from {url}"),
            };
            let sha = p
                .sha256
                .as_deref()
                .map(|s| format!(" sha256:{}…", &s[..12]))
                .unwrap_or_default();
            let external = if p.external { " (external)" } else { "" };
            println!("  {}{external}{sha}{source}", p.file);
        }
    }
    if !r.metapackage_changes.is_empty() {
        println!("Metapackage changes:");
        for m in &r.metapackage_changes {
            println!("  {}: {}", m.node_type, m.file);
        }
    }
    if !r.config_changes.is_empty() {
        println!("Configuration changes:");
        for c in &r.config_changes {
            println!("  {}: {}={}", c.file, c.key, c.value);
        }
    }
    for (label, text) in [
        ("Description", &r.description),
        ("Release notes", &r.release_notes),
        ("Installation & configuration", &r.installation),
        ("Certification report", &r.certification_report),
    ] {
        if !text.is_empty() {
            println!("{label}:");
            for line in text.lines() {
                println!("  {line}");
            }
        }
    }
}
