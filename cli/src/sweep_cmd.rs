//! `certo sweep`: the nightly regression sweeps — start one now, list them, show one's
//! matrix with each cell's class and trend.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use serde_json::Value;

use super::{EXIT_INVALID, Global, print_json, printable};
use certo_orchestrator::app::{AppError, sweeps};

#[derive(Debug, Args)]
pub struct SweepArgs {
    #[command(subcommand)]
    pub command: SweepCommand,
}

#[derive(Debug, Subcommand)]
pub enum SweepCommand {
    /// Start a sweep now (the workers run it, after every certifier's steps).
    Run {
        /// Only these cells: release/platform/node_type patterns, `*` for any part,
        /// comma-separated (e.g. `3.2/sl5_x86_64/*`).
        #[arg(long, value_name = "FILTER")]
        cells: Option<String>,
        /// Wait until it has ended, showing progress, then print it as `sweep show` does.
        #[arg(long)]
        wait: bool,
        #[arg(long)]
        json: bool,
    },
    /// List the sweeps, newest first.
    Ls {
        #[arg(long, default_value_t = 20)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// What changed for a cell between its last good sweep and the first bad one: layers,
    /// repositories' metadata, package versions.
    Diff {
        /// release/platform/node_type
        cell: String,
        #[arg(long)]
        json: bool,
    },
    /// Prune sweeps that ended longer ago than the retention (nightly.yaml's `keep`, or
    /// --older-than) down to their summaries; the last good sweep of each cell keeps its results.
    Prune {
        /// e.g. 720h; default: the workflow's `keep`.
        #[arg(long, value_name = "DURATION")]
        older_than: Option<String>,
    },
    /// Show a sweep (the newest by default): each cell's class, its trend over the sweeps
    /// before, and the tests that are not passing.
    Show {
        id: Option<i64>,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(g: &Global, a: SweepArgs) -> anyhow::Result<ExitCode> {
    let ctx = g.context()?;
    let store = ctx.store().await?.clone();
    match a.command {
        SweepCommand::Run { cells, wait, json } => {
            let id = match sweeps::start(&ctx, &store, cells.as_deref()).await {
                Ok(id) => id,
                Err(AppError::NotFound(m)) => {
                    eprintln!("error: --cells: {m}");
                    return Ok(ExitCode::from(EXIT_INVALID));
                }
                Err(e) => return Err(e.into()),
            };
            if !wait {
                if json {
                    print_json(&serde_json::json!({"sweep": id}))?;
                } else {
                    println!("sweep {id} started; `certo sweep show {id}` once it has run");
                }
                return Ok(ExitCode::SUCCESS);
            }
            let run = store
                .run(id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("sweep {id} vanished"))?;
            let cells = run.targets.len() as u64;
            let bar = super::progress(cells, "cells");
            let started = Instant::now();
            loop {
                let run = store
                    .run(id)
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("sweep {id} vanished"))?;
                let steps = store.run_timeline(id).await?;
                let done = steps
                    .iter()
                    .filter(|s| {
                        s.name == "teardown"
                            && !["waiting", "runnable", "running"].contains(&s.state.as_str())
                    })
                    .count();
                bar.set_position(done as u64);
                if run.state != "running" {
                    break;
                }
                if started.elapsed() > Duration::from_secs(60)
                    && steps.iter().all(|s| s.attempt == 0)
                {
                    bar.suspend(|| eprintln!("note: no step has started in a minute: is a worker running (`certo up`, `certo worker`)?"));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            bar.finish_and_clear();
            show(&super::remote::Backend::Local(ctx.clone()), Some(id), json).await
        }
        SweepCommand::Ls { limit, json } => {
            let runs = store
                .runs_of(sweeps::WORKFLOW, limit.clamp(1, 1000))
                .await?;
            let mut rows = Vec::new();
            for r in &runs {
                let v = sweeps::view(&store, r).await?;
                rows.push(v);
            }
            if json {
                print_json(&serde_json::json!({"sweeps": rows
                    .iter()
                    .map(|v| serde_json::json!({"sweep": v["sweep"], "state": v["state"], "fire_at": v["fire_at"],
                        "created_at": v["created_at"], "finished_at": v["finished_at"], "summary": v["summary"]}))
                    .collect::<Vec<_>>()}))?;
            } else if rows.is_empty() {
                println!(
                    "no sweep yet: `certo sweep run`, or the workers start one at the schedule's time"
                );
            } else {
                for v in &rows {
                    println!(
                        "sweep {:<5} {:<9} {}  {}",
                        v["sweep"],
                        v["state"].as_str().unwrap_or(""),
                        v["fire_at"]
                            .as_str()
                            .map_or_else(|| "started by hand".to_owned(), |f| format!("fire {f}")),
                        summary_line(&v["summary"])
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        SweepCommand::Show { id, json } => show(&super::remote::Backend::of(g)?, id, json).await,
        SweepCommand::Diff { cell, json } => match sweeps::diff(&store, &cell).await? {
            None => {
                eprintln!(
                    "error: {cell} never went from good to bad in the sweeps kept (a cell is release/platform/node_type)"
                );
                Ok(ExitCode::from(EXIT_INVALID))
            }
            Some(d) => {
                if json {
                    print_json(&d)?;
                } else {
                    println!(
                        "{cell}: last good sweep {}, first bad sweep {}",
                        d["last_good"]["sweep"], d["first_bad"]["sweep"]
                    );
                    for line in sweeps::change_lines(&d) {
                        println!("  {}", printable(&line));
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
        },
        SweepCommand::Prune { older_than } => {
            let keep = match older_than.as_deref() {
                None => {
                    certo_orchestrator::engine::workflow::Workflow::nightly()
                        .sweep
                        .unwrap_or_default()
                        .keep
                }
                Some(d) => match certo_orchestrator::engine::workflow::parse_duration(d) {
                    Ok(d) => d,
                    Err(e) => {
                        eprintln!("error: --older-than {d:?}: {e}");
                        return Ok(ExitCode::from(EXIT_INVALID));
                    }
                },
            };
            let cutoff = chrono::Utc::now()
                - chrono::Duration::from_std(keep).unwrap_or(chrono::Duration::days(30));
            let n = store.prune_sweeps(sweeps::WORKFLOW, cutoff).await?;
            println!(
                "pruned the results of {n} cell(s) of sweeps that ended before {}",
                cutoff.format("%Y-%m-%d %H:%M UTC")
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn summary_line(s: &Value) -> String {
    let Some(m) = s.as_object() else {
        return String::new();
    };
    let order = [
        "newly failing",
        "still failing",
        "failing",
        "not run",
        "flaky",
        "fixed",
        "passing",
    ];
    order
        .iter()
        .filter_map(|k| m.get(*k).map(|n| format!("{n} {k}")))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn show(
    backend: &super::remote::Backend,
    id: Option<i64>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let v = backend.sweep_show(id).await?;
    if json {
        print_json(&v)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "sweep {} ({}): {}",
        v["sweep"],
        v["state"].as_str().unwrap_or(""),
        summary_line(&v["summary"])
    );
    if let Some(p) = v["progress"].as_object() {
        let running: Vec<&str> = p["running"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        println!(
            "  in progress: {} of {} cells done; now: {}",
            p["done"],
            p["cells"],
            if running.is_empty() {
                "waiting for a worker".to_owned()
            } else {
                running.join(", ")
            }
        );
    }
    for c in v["cells"].as_array().into_iter().flatten() {
        let trend = sweeps::trend_marks(c);
        println!(
            "  {:<36} {:<14} {:>14}  {}",
            c["cell"].as_str().unwrap_or(""),
            c["class"].as_str().unwrap_or(""),
            if trend.is_empty() {
                "(first)".to_owned()
            } else {
                trend
            },
            printable(c["reason"].as_str().unwrap_or(""))
        );
        if c["changed"].is_object() {
            for line in sweeps::change_lines(&c["changed"]) {
                println!("      changed: {}", printable(&line));
            }
        }
        for t in c["tests"].as_array().into_iter().flatten() {
            if t["class"] != "passing" {
                println!(
                    "      {}/{}: {}",
                    t["suite"].as_str().unwrap_or(""),
                    t["name"].as_str().unwrap_or(""),
                    t["class"].as_str().unwrap_or("")
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
