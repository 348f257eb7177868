//! `certo validate`, `submit`, `patches`, `show`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use serde_json::json;

use super::remote::Backend;
use super::{EXIT_INVALID, Global, print_json};
use certo_orchestrator::app::patches::PatchFilter;
use certo_orchestrator::ingest::Loaded;
use certo_orchestrator::patch::{PackageSource, PatchRecord};
use certo_orchestrator::store::{PatchEvent, PatchState, SubmitOutcome};

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
    /// Print the tests of its latest run as JUnit XML (the format CI systems read).
    #[arg(long, conflicts_with_all = ["json", "tracker"])]
    pub junit: bool,
    /// Print the record in the tracker's text form with its new status (Certified, or
    /// Rejected and why), ready to paste back into the tracker.
    #[arg(long, conflicts_with = "json")]
    pub tracker: bool,
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
    let notes = certo_orchestrator::app::submit::notes(loaded);
    (warnings, notes)
}

pub fn validate(g: &Global, args: ValidateArgs) -> anyhow::Result<ExitCode> {
    let loaded = super::remote::load(g, &args.files)?;
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
    let backend = Backend::of(g)?;
    let answer = match backend.submit_files(g, &args.files, args.wait).await? {
        Ok(a) => a,
        Err(failure) => {
            for e in failure.diagnostics() {
                eprintln!("{e}");
            }
            eprintln!("{failure}");
            if args.json {
                print_json(&json!({"stored": false, "errors": failure.diagnostics()}))?;
            }
            return Ok(ExitCode::from(EXIT_INVALID));
        }
    };
    for w in &answer.warnings {
        eprintln!(
            "{}:{}:{}: warning: {}: {}",
            w.file, w.line, w.col, w.field, w.message
        );
    }
    for n in &answer.notes {
        eprintln!(
            "{}:{}:{}: note: {}",
            n["file"].as_str().unwrap_or(""),
            n["line"],
            n["col"],
            n["note"].as_str().unwrap_or("")
        );
    }
    if args.wait {
        for s in &answer.skipped {
            eprintln!("{s}");
        }
        let mut ids = Vec::new();
        for r in &answer.runs {
            let id = r["run"].as_i64().unwrap_or(0);
            if !args.json {
                eprintln!(
                    "patch {} r{}: run {id} ({})",
                    r["patch"],
                    r["revision"],
                    if r["already_stored"] == true {
                        "already stored"
                    } else {
                        "stored"
                    }
                );
            }
            ids.push(id);
        }
        return super::run_cmd::wait_and_print(&backend, &ids, !args.json, args.json).await;
    }
    if args.json {
        print_json(&json!({"stored": true, "records": answer.records}))?;
    } else {
        for r in &answer.records {
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
    Ok(ExitCode::SUCCESS)
}

pub async fn patches(g: &Global, args: PatchesArgs) -> anyhow::Result<ExitCode> {
    list(&Backend::of(g)?, args).await
}

/// Lists patches (the demo lists its own).
pub async fn list(backend: &Backend, args: PatchesArgs) -> anyhow::Result<ExitCode> {
    let filter = PatchFilter {
        state: args.state,
        release: args.release.clone(),
        all_revisions: args.all_revisions,
    };
    let rows = backend.patches(&filter).await?;
    if args.json {
        return print_json(&rows).map(|()| ExitCode::SUCCESS);
    }
    if rows.is_empty() {
        println!("no patches");
        return Ok(ExitCode::SUCCESS);
    }
    let joined = |v: &serde_json::Value| -> String {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str())
            .collect::<Vec<_>>()
            .join(",")
    };
    let table: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r["patch_id"].to_string(),
                r["revision"].to_string(),
                r["state"].as_str().unwrap_or("").to_owned(),
                format!("gLite {}", r["release_shown"].as_str().unwrap_or("")),
                joined(&r["platforms"]),
                joined(&r["node_types"]),
                r["title"].as_str().unwrap_or("").to_owned(),
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
    let backend = Backend::of(g)?;
    let v = backend.show(id, revision).await?;
    if args.junit {
        let Some(run) = v["run_id"].as_i64() else {
            return Err(certo_orchestrator::app::OpError::Refused(format!(
                "patch {id} r{} has no run yet: nothing to report",
                v["revision"]
            ))
            .into());
        };
        print!("{}", backend.junit(run).await?);
        return Ok(ExitCode::SUCCESS);
    }
    if args.json {
        print_json(&v)?;
        return Ok(ExitCode::SUCCESS);
    }
    let record: PatchRecord = serde_json::from_value(v["record"].clone())
        .context("the patch's record is not one Certo reads")?;
    if args.tracker {
        let status = match v["run"]["verdict"].as_str() {
            Some("certified") => "Certified",
            Some("rejected") => "Rejected",
            other => {
                return Err(certo_orchestrator::app::OpError::Refused(format!(
                    "patch {id} r{} is not decided ({}): nothing to post back to the tracker yet",
                    v["revision"],
                    other.map_or_else(|| "no run".to_owned(), |o| format!("its run is {o}"))
                ))
                .into());
            }
        };
        let line = super::run_cmd::verdict_line(&v["run"]);
        print!(
            "{}",
            certo_orchestrator::patch::write::with_status(&record, status, Some(&line))
        );
        return Ok(ExitCode::SUCCESS);
    }
    let events: Vec<PatchEvent> = serde_json::from_value(v["events"].clone())
        .context("the patch's history is not one Certo reads")?;
    let text = |k: &str| v[k].as_str().unwrap_or("").to_owned();
    let submitted_at = v["submitted_at"]
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| {
            t.with_timezone(&chrono::Utc)
                .format("%Y-%m-%d %H:%M:%S UTC")
                .to_string()
        })
        .unwrap_or_default();
    print_record(&record);
    println!();
    println!(
        "Certo state:   {}{}",
        text("state"),
        v["superseded_by"]
            .as_u64()
            .map(|r| format!(" (by revision {r})"))
            .unwrap_or_default()
    );
    println!(
        "Submitted:     {submitted_at} from {} ({})",
        text("source_file"),
        text("source_format")
    );
    if let Some(owner) = v["owner"].as_str() {
        println!("Owner:         {owner}");
    }
    println!("Content:       sha256:{}", text("content_sha256"));
    let revs: Vec<String> = v["revisions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| format!("r{} {}", r["revision"], r["state"].as_str().unwrap_or("")))
        .collect();
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
    let timeline = v["timeline"].as_array().cloned().unwrap_or_default();
    if let (Some(run_id), Some(rv)) = (v["run_id"].as_i64(), v["run"].as_object()) {
        let rv = serde_json::Value::Object(rv.clone());
        println!();
        println!("Verdict:       {}", super::run_cmd::verdict_line(&rv));
        for t in rv["targets"].as_array().into_iter().flatten() {
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
        println!(
            "Timeline (run {run_id}, {}):",
            v["run_state"].as_str().unwrap_or("")
        );
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
