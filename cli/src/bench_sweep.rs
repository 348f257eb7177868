//! `certo bench sweep`: the nightly sweep over the whole fixture matrix on this machine, on
//! real VMs through `certo up`'s stack (a host agent over qemu:///system).
//!
//! Three sweeps over a copy of the repositories (the fixture world, so that one can be
//! refreshed): the first warms the caches (it builds what is missing), the second is the
//! warm figure, and before the third one cell's baseline repository is refreshed (a new
//! glite-wn-info in the 3.2 SL5 i386 repository, the fixture world's `rpm/refresh/`) to
//! show how much is rebuilt. Reported per sweep: cells, VMs (and of them the flakiness
//! retries), wall time, the seconds of build, place and transfer, boot, tests and teardown
//! (summed over cells: two run at once), and the layers built against those taken from the
//! cache.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use serde_json::{Value, json};

use super::{Global, print_json};
use certo_orchestrator::app::sweeps;
use certo_orchestrator::store::Store;

#[derive(Debug, Args)]
pub struct SweepBenchArgs {
    /// VM slots of the host agent.
    #[arg(long, default_value_t = 2)]
    pub slots: usize,
    /// Only these cells (release/platform/node_type patterns); default: the whole matrix.
    #[arg(long, value_name = "FILTER")]
    pub cells: Option<String>,
    #[arg(long)]
    pub json: bool,
}

/// The refreshed repository and the package that refreshes it.
const REFRESHED: &str = "rpm/glite/3.2/sl5/i386";
const REFRESH_WITH: &str = "rpm/refresh/3.2/sl5/i386/broken";

pub async fn run(g: &Global, a: SweepBenchArgs) -> anyhow::Result<ExitCode> {
    let ctx = g.context()?;
    let world = ctx.world()?;
    let dir = g.data_dir().join("bench-sweep");
    let repos = dir.join("world");
    let _ = std::fs::remove_dir_all(&repos);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    copy_tree(&world, &repos)?;
    let here = Global {
        data_dir: Some(g.data_dir()),
        database_url: g.database_url.clone(),
        catalogue: g.catalogue.clone(),
        repos: Some(repos.clone()),
        verbose: g.verbose,
        server: None,
        user_token_file: None,
    };
    let up = super::stack_cmd::up(
        &here,
        super::stack_cmd::UpArgs {
            workers: 1,
            concurrency: 8,
            slots: a.slots,
            libvirt: "qemu:///system".into(),
            listen: "127.0.0.1:0".into(),
            host: "bench".into(),
            memory_mib: 4096,
            no_schedules: true,
        },
    )
    .await?;
    if up != ExitCode::SUCCESS {
        return Ok(up);
    }
    let result = measure(&here, &repos, &a).await;
    let _ = super::stack_cmd::down(&here, super::stack_cmd::DownArgs { keep_store: true }).await;
    let rows = result?;
    if a.json {
        print_json(&json!({"sweeps": rows}))?;
    } else {
        for r in &rows {
            println!(
                "{:<22} {:>3} cells, {:>3} VMs ({} retries), {:>6.1} s wall; build {:.0} s, place+transfer {:.0} s, boot {:.0} s, tests {:.0} s, teardown {:.0} s; layers {} built, {} cached; {}",
                r["sweep"].as_str().unwrap_or(""),
                r["cells"],
                r["vms"],
                r["retry_vms"],
                r["wall_seconds"].as_f64().unwrap_or(0.0),
                r["seconds"]["build"].as_f64().unwrap_or(0.0),
                r["seconds"]["place_transfer"].as_f64().unwrap_or(0.0),
                r["seconds"]["boot"].as_f64().unwrap_or(0.0),
                r["seconds"]["tests"].as_f64().unwrap_or(0.0),
                r["seconds"]["teardown"].as_f64().unwrap_or(0.0),
                r["layers_built"],
                r["layers_cached"],
                r["summary"],
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn measure(g: &Global, repos: &Path, a: &SweepBenchArgs) -> anyhow::Result<Vec<Value>> {
    let ctx = g.context()?;
    let store = ctx.store().await?.clone();
    let mut rows = Vec::new();
    for label in ["warming", "warm", "one repo refreshed"] {
        if label == "one repo refreshed" {
            refresh(repos)?;
        }
        let started = Instant::now();
        let id = sweeps::start(&ctx, &store, a.cells.as_deref()).await?;
        let bar = super::progress(0, label);
        loop {
            let run = store.run(id).await?.context("the sweep vanished")?;
            if run.state != "running" {
                break;
            }
            if started.elapsed() > Duration::from_secs(4 * 3600) {
                bail!("sweep {id} did not end in 4 hours");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        bar.finish_and_clear();
        let wall = started.elapsed().as_secs_f64();
        rows.push(figures(&store, id, label, wall).await?);
        eprintln!("{label}: sweep {id} in {wall:.0} s");
    }
    Ok(rows)
}

async fn figures(store: &Store, id: i64, label: &str, wall: f64) -> anyhow::Result<Value> {
    let run = store.run(id).await?.context("the sweep vanished")?;
    let steps = store.run_timeline(id).await?;
    let secs = |names: &[&str]| -> f64 {
        steps
            .iter()
            .filter(|s| names.contains(&s.name.as_str()))
            .filter_map(|s| Some((s.finished_at? - s.started_at?).as_seconds_f64()))
            .sum()
    };
    let (mut built, mut cached) = (0, 0);
    for s in steps.iter().filter(|s| s.name == "build") {
        let layers = s
            .outcome
            .as_ref()
            .and_then(|o| o["image"]["layers"].as_array().cloned())
            .unwrap_or_default();
        for l in layers {
            if l["outcome"] == "built" {
                built += 1;
            } else {
                cached += 1;
            }
        }
    }
    let (vms, retries) = store
        .vms_requested_between(
            run.created_at,
            run.finished_at.unwrap_or(run.created_at),
            id,
        )
        .await?;
    let view = sweeps::view(store, &run).await?;
    Ok(json!({
        "sweep": label, "id": id, "cells": run.targets.len(), "vms": vms, "retry_vms": retries,
        "wall_seconds": wall,
        "seconds": {"build": secs(&["build"]), "place_transfer": secs(&["place", "transfer"]),
                    "boot": secs(&["boot"]), "tests": secs(&["tests"]), "teardown": secs(&["teardown"])},
        "layers_built": built, "layers_cached": cached,
        "summary": view["summary"],
    }))
}

/// The refresh: the new package into the repository, and its metadata made again.
fn refresh(repos: &Path) -> anyhow::Result<()> {
    let repo = repos.join(REFRESHED);
    for e in std::fs::read_dir(repos.join(REFRESH_WITH))? {
        let e = e?;
        if e.path().extension().is_some_and(|x| x == "rpm") {
            std::fs::copy(e.path(), repo.join(e.file_name()))?;
        }
    }
    let st = std::process::Command::new("createrepo_c")
        .args(["--quiet", "--no-database", "--simple-md-filenames"])
        .arg(&repo)
        .status()
        .context("running createrepo_c")?;
    if !st.success() {
        bail!("createrepo_c {} failed: {st}", repo.display());
    }
    Ok(())
}

/// Copies a tree of regular files and directories (the repositories).
fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let e = e?;
        let (src, dst): (PathBuf, PathBuf) = (e.path(), to.join(e.file_name()));
        let t = e.file_type()?;
        if t.is_dir() {
            copy_tree(&src, &dst)?;
        } else if t.is_file() {
            std::fs::copy(&src, &dst)
                .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
        }
    }
    Ok(())
}
