//! `certo worker`, `certo runs`, `certo cancel`, `certo rerun`, and waiting for verdicts
//! (`certo submit --wait`).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use serde_json::{Value, json};

use super::remote::Backend;
use super::{EXIT_FAILURE, EXIT_INVALID, Global, print_json};
use certo_orchestrator::app::certify::{Certify, CertifySettings};
use certo_orchestrator::app::runs::RunFilter;
use certo_orchestrator::engine::worker::{Worker, WorkerConfig};

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
                certo_orchestrator::api::ApiState::protocols(store.clone()),
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
    let filter = RunFilter {
        state: a.state.clone(),
        patch: a.patch,
    };
    let out = Backend::of(g)?.runs(&filter, a.limit.max(1)).await?;
    if a.json {
        print_json(&json!({ "runs": out }))?;
        return Ok(ExitCode::SUCCESS);
    }
    for v in &out {
        let created = v["created_at"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| {
                t.with_timezone(&chrono::Utc)
                    .format("%Y-%m-%d %H:%M:%S")
                    .to_string()
            })
            .unwrap_or_default();
        println!(
            "run {:<5} patch {:>6} r{:<2} {:<10} {:<9} {} targets  {created}",
            v["run"].as_i64().unwrap_or(0),
            v["patch"].as_u64().unwrap_or(0),
            v["revision"].as_u64().unwrap_or(0),
            v["run_state"].as_str().unwrap_or(""),
            v["verdict"].as_str().unwrap_or("?"),
            v["target_count"].as_u64().unwrap_or(0),
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
    let done = Backend::of(g)?.cancel(a.patch).await?;
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
    let backend = Backend::of(g)?;
    let run = backend.rerun(a.patch, a.failed).await?;
    if !a.wait {
        if a.json {
            print_json(&json!({"run": run}))?;
        } else {
            println!("run {run} of patch {} started", a.patch);
        }
        return Ok(ExitCode::SUCCESS);
    }
    wait_and_print(&backend, &[run], !a.json, a.json).await
}

/// Waits for every run's verdict, showing progress on a terminal; prints one line per run
/// (or `{"runs": [...]}`), and returns 0 when all are certified, 1 when any is rejected, 3
/// when any is incomplete or cancelled.
pub async fn wait_and_print(
    backend: &Backend,
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
            let status = backend.run_status(*id).await?;
            if let Some(v) = status.verdict {
                bar.inc(1);
                if lines {
                    bar.suspend(|| println!("   {}", verdict_line(&v)));
                }
                views[i] = Some(v);
            } else {
                active.push(status);
            }
        }
        if active.is_empty() {
            break;
        }
        if let Some(status) = active.first() {
            let first = status.run;
            bar.set_message(format!("run {first}: {}", status.running.join(", ")));
            if !said_no_worker && started.elapsed() > Duration::from_secs(30) && !status.started {
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

/// `patch 3456 r2 (run 17): certified on 2 targets` (the dashboard says it the same way).
pub fn verdict_line(v: &Value) -> String {
    certo_orchestrator::app::runs::verdict_sentence(v)
}
