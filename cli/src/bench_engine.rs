//! `certo bench engine`: the engine's own overhead. Runs of a workflow of no-op steps
//! (claim, heartbeat-free instant work, completion with successors made runnable, one
//! notify per transaction) are worked by 1, 2, 4, 8 workers — each with its own connection
//! pool, as separate processes would be — against a scratch database of the store's
//! server. Reported: step transitions per second (medians of the runs) and how they scale.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use serde_json::json;

use super::{Global, median, print_json};
use certo_orchestrator::engine::worker::{
    Handler, StepCtx, StepFuture, StepOutput, Worker, WorkerConfig,
};
use certo_orchestrator::engine::workflow::Workflow;
use certo_orchestrator::store::Store;
use certo_orchestrator::store::scratch::ScratchDb;

#[derive(Debug, Args)]
pub struct EngineBenchArgs {
    /// Worker counts to measure, comma-separated.
    #[arg(long, default_value = "1,2,4,8", value_delimiter = ',')]
    pub workers: Vec<usize>,
    /// Steps each worker runs at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Runs per measurement (each of 10 targets × 8 steps, plus 2 per-run steps).
    #[arg(long, default_value_t = 25)]
    pub runs: usize,
    /// Measurements per worker count (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    #[arg(long)]
    pub json: bool,
}

const NOOP: &str = "name: bench-noop\nsteps:\n  - {name: plan, per: run, timeout: 1m}\n  \
    - {name: s1, needs: [plan], timeout: 1m}\n  - {name: s2, needs: [s1], timeout: 1m}\n  \
    - {name: s3, needs: [s2], timeout: 1m}\n  - {name: s4, needs: [s3], timeout: 1m}\n  \
    - {name: s5, needs: [s4], timeout: 1m}\n  - {name: s6, needs: [s5], timeout: 1m}\n  \
    - {name: s7, needs: [s6], timeout: 1m}\n  \
    - {name: teardown, needs: [s7], always: true, timeout: 1m}\n  \
    - {name: verdict, per: run, needs: [teardown], always: true, timeout: 1m}\n";

const TARGETS: usize = 10;

struct Noop(Workflow);

impl Handler for Noop {
    fn workflows(&self) -> Vec<Workflow> {
        vec![self.0.clone()]
    }
    fn run(&self, _step: StepCtx) -> StepFuture {
        Box::pin(async { StepOutput::Passed(json!({})) })
    }
}

async fn measure(
    url: &str,
    workflow: &Workflow,
    workers: usize,
    a: &EngineBenchArgs,
) -> anyhow::Result<(f64, usize, f64)> {
    let setup = Store::connect(url).await?;
    sqlx::query("TRUNCATE engine_runs CASCADE")
        .execute(setup.pool())
        .await?;
    let targets: Vec<String> = (0..TARGETS).map(|t| format!("3.2/bench/t{t}")).collect();
    for _ in 0..a.runs {
        setup.create_run(workflow, None, &targets).await?;
    }
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM engine_steps")
        .fetch_one(setup.pool())
        .await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let store = Store::connect(url).await?;
        let mut config = WorkerConfig::new(format!("bench-w{w}"));
        config.concurrency = a.concurrency;
        config.poll = Duration::from_millis(200);
        let worker = Worker::new(store, config, Arc::new(Noop(workflow.clone())));
        let mut rx = stop_rx.clone();
        tasks.push(tokio::spawn(worker.run(async move {
            let _ = rx.wait_for(|s| *s).await;
        })));
    }
    // Done when every run has ended.
    loop {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM engine_runs WHERE state = 'running'")
                .fetch_one(setup.pool())
                .await?;
        if left == 0 {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("the no-op runs did not finish in 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let wall = started.elapsed().as_secs_f64();
    let _ = stop_tx.send(true);
    for t in tasks {
        t.await??;
    }
    let passed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM engine_steps WHERE state = 'passed'")
            .fetch_one(setup.pool())
            .await?;
    if passed != total {
        bail!("{passed} of {total} steps passed");
    }
    // Each step's claim and its completion are its transitions (runnable→running→passed).
    let p95_latency: Option<f64> = sqlx::query_scalar(
        "SELECT percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM s.started_at - r.created_at))::float8
           FROM engine_steps s JOIN engine_runs r ON r.id = s.run_id WHERE s.name = 'plan'",
    )
    .fetch_one(setup.pool())
    .await?;
    Ok((
        2.0 * total as f64 / wall,
        total as usize,
        p95_latency.unwrap_or(0.0),
    ))
}

pub async fn run(g: &Global, a: EngineBenchArgs) -> anyhow::Result<ExitCode> {
    if a.runs == 0 || a.repeat == 0 || a.workers.is_empty() || a.workers.contains(&0) {
        bail!("--runs, --repeat and every --workers count must be positive");
    }
    let workflow =
        Workflow::parse("bench-noop.yaml", NOOP).map_err(|e| anyhow::anyhow!("{}", e[0]))?;
    let scratch = ScratchDb::create(&g.location(), "certo_bench_engine")
        .await
        .context("cannot create a scratch database for the benchmark")?;
    let mut rows = Vec::new();
    for &w in &a.workers {
        let mut rates = Vec::new();
        let mut steps = 0;
        let mut lat = Vec::new();
        for _ in 0..a.repeat {
            let (rate, n, l) = measure(&scratch.url, &workflow, w, &a).await?;
            rates.push(rate);
            lat.push(l);
            steps = n;
        }
        let m = median(rates.clone());
        if !a.json {
            println!(
                "{w} worker(s) × {} steps at once: {m:.0} step transitions/s (median of {}: {}), {steps} steps per measurement, p95 submit→first step {:.3} s",
                a.concurrency,
                a.repeat,
                rates
                    .iter()
                    .map(|r| format!("{r:.0}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                median(lat.clone())
            );
        }
        rows.push(json!({"workers": w, "concurrency": a.concurrency, "median_transitions_per_second": m,
                         "transitions_per_second": rates, "steps": steps, "p95_first_step_seconds": median(lat)}));
    }
    scratch.drop_db().await?;
    if a.json {
        print_json(&json!({"engine": rows}))?;
    } else if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
        let r0 = first["median_transitions_per_second"]
            .as_f64()
            .unwrap_or(1.0);
        let r1 = last["median_transitions_per_second"]
            .as_f64()
            .unwrap_or(0.0);
        println!(
            "scaling: {} → {} workers: {:.2}×",
            first["workers"],
            last["workers"],
            r1 / r0.max(1e-9)
        );
    }
    Ok(ExitCode::SUCCESS)
}
