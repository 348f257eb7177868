//! `certo worker`, `certo runs`, `certo cancel`, `certo rerun`, and waiting for verdicts
//! (`certo submit --wait`).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use serde_json::{Value, json};

use super::{EXIT_FAILURE, EXIT_INVALID, Global, print_json};
use certo_orchestrator::app::certify::{Certify, CertifySettings};
use certo_orchestrator::app::runs;
use certo_orchestrator::engine::worker::{Worker, WorkerConfig};
use certo_orchestrator::store::Store;

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Steps this worker runs at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// The orchestrator guests call (`certo serve`); default: this worker serves the guest
    /// API itself on the loopback (guests of agents on this machine reach it).
    #[arg(long, env = "CERTO_ORCHESTRATOR", value_name = "URL")]
    pub orchestrator: Option<String>,
    /// Seconds a claimed step is held without a heartbeat.
    #[arg(long, default_value_t = 30.0)]
    pub lease: f64,
    /// Longest sleep between looks for work when no notification comes (seconds).
    #[arg(long, default_value_t = 2.0)]
    pub poll: f64,
    /// Memory of each VM (MiB).
    #[arg(long, default_value_t = 384)]
    pub memory_mib: u32,
    /// Seconds a VM may take from boot to its harness's done.
    #[arg(long, default_value_t = 300.0)]
    pub vm_timeout: f64,
    /// The worker's name (default: HOSTNAME-PID).
    #[arg(long)]
    pub name: Option<String>,
    /// Start no scheduled run (the nightly sweep): another worker does, or none should.
    #[arg(long)]
    pub no_schedules: bool,
}

pub async fn worker(g: &Global, a: WorkerArgs) -> anyhow::Result<ExitCode> {
    let ctx = g.context()?;
    let store = ctx.store().await?.clone();
    let name = a.name.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "worker".into());
        format!("{host}-{}", std::process::id())
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // The guest API: the given orchestrator's, or served here.
    let (orchestrator, guest_api) = match &a.orchestrator {
        Some(u) => (u.clone(), None),
        None => {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .context("listening for the guest API")?;
            let url = format!("http://{}", listener.local_addr()?);
            let srv = tokio::spawn(certo_orchestrator::api::serve(
                listener,
                certo_orchestrator::api::ApiState {
                    store: store.clone(),
                },
                Duration::from_secs(10),
                stopped(stop_rx.clone()),
            ));
            (url, Some(srv))
        }
    };
    let handler = Certify::new(
        ctx.clone(),
        CertifySettings {
            orchestrator: orchestrator.clone(),
            memory_mib: a.memory_mib,
            vm_timeout: Duration::from_secs_f64(a.vm_timeout.max(10.0)),
        },
    );
    let config = WorkerConfig {
        name: name.clone(),
        concurrency: a.concurrency.max(1),
        lease: Duration::from_secs_f64(a.lease.max(0.5)),
        poll: Duration::from_secs_f64(a.poll.max(0.05)),
    };
    println!(
        "worker {name}: {} steps at once, guests call {orchestrator}",
        config.concurrency
    );
    tracing::info!(worker = %name, concurrency = config.concurrency, %orchestrator, "worker started");
    // Every worker looks at the nightly schedule; each fire time runs once.
    let scheduler = (!a.no_schedules).then(|| {
        tokio::spawn(certo_orchestrator::app::sweeps::schedule_loop(
            ctx.clone(),
            store.clone(),
        ))
    });
    Worker::new(store, config, std::sync::Arc::new(handler))
        .run(stopped(stop_rx))
        .await?;
    if let Some(s) = scheduler {
        s.abort();
    }
    if let Some(srv) = guest_api {
        let _ = srv.await;
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct RunsArgs {
    /// Only runs in this state: running, passed, failed, cancelled.
    #[arg(long, value_name = "STATE")]
    pub state: Option<String>,
    /// Only runs of this patch.
    #[arg(long, value_name = "ID")]
    pub patch: Option<u64>,
    /// At most this many (newest first).
    #[arg(long, default_value_t = 50)]
    pub limit: i64,
    #[arg(long)]
    pub json: bool,
}

pub async fn list(g: &Global, a: RunsArgs) -> anyhow::Result<ExitCode> {
    if let Some(s) = &a.state
        && !["running", "passed", "failed", "cancelled"].contains(&s.as_str())
    {
        eprintln!("error: --state {s:?}: use running, passed, failed or cancelled");
        return Ok(ExitCode::from(EXIT_INVALID));
    }
    let store = g.store().await?;
    let rows = store.runs(a.state.as_deref(), a.patch, a.limit).await?;
    let mut out = Vec::new();
    for r in &rows {
        out.push(runs::view(&store, r).await?);
    }
    if a.json {
        print_json(&json!({ "runs": out }))?;
        return Ok(ExitCode::SUCCESS);
    }
    for (r, v) in rows.iter().zip(&out) {
        println!(
            "run {:<5} patch {:>6} r{:<2} {:<10} {:<9} {} targets  {}",
            r.id,
            r.patch_id.unwrap_or(0),
            r.revision.unwrap_or(0),
            r.state,
            v["verdict"].as_str().unwrap_or("?"),
            r.targets.len(),
            r.created_at.format("%Y-%m-%d %H:%M:%S")
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The patch whose running certification to cancel.
    pub patch: u64,
}

pub async fn cancel(g: &Global, a: CancelArgs) -> anyhow::Result<ExitCode> {
    let store = g.store().await?;
    let who = std::env::var("USER").unwrap_or_else(|_| "someone".into());
    let done = runs::cancel(&store, a.patch, &format!("cancelled by {who}")).await?;
    if done.is_empty() {
        eprintln!("error: patch {} has no running certification", a.patch);
        return Ok(ExitCode::from(EXIT_INVALID));
    }
    for id in done {
        println!(
            "run {id} of patch {} cancelled (teardown still runs)",
            a.patch
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct RerunArgs {
    /// The patch to certify again (its current revision).
    pub patch: u64,
    /// Only the targets that failed or were incomplete in its latest run.
    #[arg(long)]
    pub failed: bool,
    /// Wait for the verdict.
    #[arg(long)]
    pub wait: bool,
    #[arg(long)]
    pub json: bool,
}

pub async fn rerun(g: &Global, a: RerunArgs) -> anyhow::Result<ExitCode> {
    let ctx = g.context()?;
    let run = runs::rerun(&ctx, a.patch, a.failed).await?;
    if !a.wait {
        if a.json {
            print_json(&json!({"run": run}))?;
        } else {
            println!("run {run} of patch {} started", a.patch);
        }
        return Ok(ExitCode::SUCCESS);
    }
    wait_and_print(ctx.store().await?, &[run], !a.json, a.json).await
}

/// Waits for every run's verdict, showing progress on a terminal; prints one line per run
/// (or `{"runs": [...]}`), and returns 0 when all are certified, 1 when any is rejected, 3
/// when any is incomplete or cancelled.
pub async fn wait_and_print(
    store: &Store,
    ids: &[i64],
    lines: bool,
    json_out: bool,
) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let bar = super::progress(ids.len() as u64, "verdicts");
    let mut views: Vec<Option<Value>> = vec![None; ids.len()];
    let mut said_no_worker = false;
    loop {
        let mut active = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            if views[i].is_some() {
                continue;
            }
            if let Some(v) = store.verdict(*id).await? {
                bar.inc(1);
                if lines {
                    bar.suspend(|| println!("   {}", verdict_line(&v.detail)));
                }
                views[i] = Some(v.detail);
            } else {
                active.push(*id);
            }
        }
        if active.is_empty() {
            break;
        }
        if let Some(first) = active.first() {
            let steps = store.run_timeline(*first).await?;
            let running: Vec<String> = steps
                .iter()
                .filter(|s| s.state == "running")
                .map(|s| {
                    if s.target.is_empty() {
                        s.name.clone()
                    } else {
                        format!("{} {}", s.name, s.target)
                    }
                })
                .collect();
            bar.set_message(format!("run {first}: {}", running.join(", ")));
            if !said_no_worker
                && started.elapsed() > Duration::from_secs(30)
                && steps.iter().all(|s| s.started_at.is_none())
            {
                said_no_worker = true;
                bar.suspend(|| {
                    eprintln!(
                        "note: no worker has taken a step of run {first} in 30 s: start one with `certo worker` or the stack with `certo up`"
                    )
                });
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bar.finish_and_clear();
    let views: Vec<Value> = views.into_iter().flatten().collect();
    if json_out {
        print_json(&json!({ "runs": views }))?;
    }
    Ok(exit_for(&views))
}

/// 0 when every run is certified, 1 when any is rejected, 3 when any is incomplete or
/// cancelled.
pub fn exit_for(views: &[Value]) -> ExitCode {
    let any = |v: &str| views.iter().any(|r| r["verdict"] == v);
    if any("rejected") {
        ExitCode::from(EXIT_INVALID)
    } else if any("incomplete") || any("cancelled") || any("running") {
        ExitCode::from(EXIT_FAILURE)
    } else {
        ExitCode::SUCCESS
    }
}

/// `patch 3456 r2 (run 17): certified on 2 targets`.
pub fn verdict_line(v: &Value) -> String {
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
