//! `certo bench ingest`: how many patch records per second Certo reads,
//! validates and stores, in batches, into a scratch database of the store's
//! server (created for each run, dropped after).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::json;

use super::{Global, median, print_json, progress};
use certo_orchestrator::patch::{self, SourceFormat};
use certo_orchestrator::store::scratch::ScratchDb;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Generate patch records in the tracker's text form; parse, validate and store them in batches.
    Ingest {
        /// Records per run.
        #[arg(long, default_value_t = 10_000)]
        records: usize,
        /// Records per transaction.
        #[arg(long, default_value_t = 500)]
        batch: usize,
        /// Runs (each into a fresh database); the median is reported.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Print the result as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Image builds: cached target, overlay staging, patch layer vs full build, rebuild identity.
    Image(super::bench_image::ImageBenchArgs),
    /// VM boots: boot requested → joined → tests done, one at a time and N at once.
    Vm(super::bench_vm::VmBenchArgs),
    /// The workflow engine's overhead: no-op steps through claim and completion, 1-8 workers.
    Engine(super::bench_engine::EngineBenchArgs),
    /// The nightly sweep over the fixture matrix on real VMs: warm, then with one cell's
    /// repository refreshed.
    Sweep(super::bench_sweep::SweepBenchArgs),
    /// The dashboard under load: 10,000 patches and 100 nights of sweeps stored, the matrix
    /// and patch pages loaded by wrk with 100 connections (p95 against the 50 ms goal).
    Dashboard(super::bench_dashboard::DashboardBenchArgs),
}

pub async fn run(g: &Global, args: BenchArgs) -> anyhow::Result<ExitCode> {
    let (records, batch, runs, json) = match args.command {
        BenchCommand::Ingest {
            records,
            batch,
            runs,
            json,
        } => (records, batch, runs, json),
        BenchCommand::Image(a) => return super::bench_image::run(g, a).await,
        BenchCommand::Vm(a) => return super::bench_vm::run(g, a).await,
        BenchCommand::Engine(a) => return super::bench_engine::run(g, a).await,
        BenchCommand::Sweep(a) => return super::bench_sweep::run(g, a).await,
        BenchCommand::Dashboard(a) => return super::bench_dashboard::run(g, a).await,
    };
    if records == 0 || batch == 0 || runs == 0 {
        bail!("--records, --batch and --runs must be positive");
    }
    let catalogue = g.catalogue()?;
    let texts = super::bench_records::generate_text_records(&catalogue, records, 1_000_000);
    let location = g.location();
    let mut totals = Vec::new();
    let mut parse_rates = Vec::new();
    let mut store_rates = Vec::new();
    for run in 1..=runs {
        let scratch = ScratchDb::create(&location, "certo_bench")
            .await
            .context("cannot create a scratch database for the benchmark")?;
        let bar = progress(records as u64, &format!("run {run}/{runs}"));
        let (mut parse_time, mut store_time) = (Duration::ZERO, Duration::ZERO);
        let started = Instant::now();
        for (b, chunk) in texts.chunks(batch).enumerate() {
            let t = Instant::now();
            let mut loaded = Vec::with_capacity(chunk.len());
            for (i, text) in chunk.iter().enumerate() {
                let name = format!("gen-{}.txt", b * batch + i);
                match patch::load(&name, text.as_bytes(), Some(SourceFormat::Text), &catalogue) {
                    Ok(mut recs) => loaded.append(&mut recs),
                    Err(errors) => bail!("a generated record is invalid: {}", errors[0]),
                }
            }
            parse_time += t.elapsed();
            let t = Instant::now();
            scratch
                .store
                .submit(&loaded)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            store_time += t.elapsed();
            bar.inc(chunk.len() as u64);
        }
        let total = started.elapsed();
        bar.finish_and_clear();
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM patches")
            .fetch_one(scratch.store.pool())
            .await?;
        if stored as usize != records {
            bail!("run {run}: {stored} records stored, expected {records}");
        }
        scratch.drop_db().await?;
        let rate = records as f64 / total.as_secs_f64();
        tracing::info!(
            run,
            records,
            seconds = total.as_secs_f64(),
            rate,
            "ingest run"
        );
        if !json {
            println!(
                "run {run}: {records} records in {:.2} s = {rate:.0} records/s (parse+validate {:.2} s, store {:.2} s)",
                total.as_secs_f64(),
                parse_time.as_secs_f64(),
                store_time.as_secs_f64()
            );
        }
        totals.push(rate);
        parse_rates.push(records as f64 / parse_time.as_secs_f64());
        store_rates.push(records as f64 / store_time.as_secs_f64());
    }
    let (total, parse, store) = (
        median(totals.clone()),
        median(parse_rates),
        median(store_rates),
    );
    if json {
        print_json(&json!({
            "records": records, "batch": batch, "runs": runs,
            "median_records_per_second": total,
            "median_parse_validate_records_per_second": parse,
            "median_store_records_per_second": store,
            "runs_records_per_second": totals,
        }))?;
    } else {
        println!(
            "median of {runs} runs: {total:.0} records/s end to end (parse+validate alone {parse:.0}/s, store alone {store:.0}/s), batches of {batch}"
        );
    }
    Ok(ExitCode::SUCCESS)
}
