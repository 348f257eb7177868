//! `certo bench dashboard`: the dashboard's pages under load. A scratch database of the
//! store's server gets 10,000 patches (each with a run worked to its verdict) and 100 nights
//! of sweeps over the whole matrix; `certo serve`'s router serves it on the loopback, and
//! `wrk` (Debian's) loads the matrix and random patch pages with 100 connections, signed in.
//! Reported per page: latency percentiles (p95 against the 50 ms goal), requests/s, errors.

use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use serde_json::{Value, json};

use super::{Global, print_json, progress};
use certo_orchestrator::app::{self, Context};
use certo_orchestrator::engine::workflow::Workflow;
use certo_orchestrator::model::PatchId;
use certo_orchestrator::patch::{self, SourceFormat};
use certo_orchestrator::store::engine::VerdictRow;
use certo_orchestrator::store::scratch::ScratchDb;

#[derive(Debug, Args)]
pub struct DashboardBenchArgs {
    /// Patches stored (each with one run worked to its verdict).
    #[arg(long, default_value_t = 10_000)]
    pub patches: usize,
    /// Nights of sweeps over the whole matrix.
    #[arg(long, default_value_t = 100)]
    pub nights: usize,
    /// wrk's connections.
    #[arg(long, default_value_t = 100)]
    pub connections: usize,
    /// Seconds of load per page.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// Measurements per page (the median of each figure is reported).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Load only the pages whose name contains this (`matrix`, `patch`, `sweep`, `api`).
    #[arg(long)]
    pub only: Option<String>,
    #[arg(long)]
    pub json: bool,
}

/// wrk's report, through its Lua `done` hook: the percentiles wrk keeps exactly.
const REPORT_LUA: &str = r#"
local first, last = tonumber(os.getenv("CERTO_FIRST") or "0"), tonumber(os.getenv("CERTO_LAST") or "0")
request = function()
  if last > 0 then
    return wrk.format(nil, "/patches/" .. math.random(first, last))
  end
  return wrk.format(nil, wrk.path)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("CERTO %d %d %d %d %d %d %d %d %d\n",
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max,
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status, 0))
end
"#;

async fn seed(
    g: &Global,
    a: &DashboardBenchArgs,
    scratch: &ScratchDb,
) -> anyhow::Result<(Context, u64, u64)> {
    let settings = app::Settings {
        database_url: Some(scratch.url.clone()),
        ..g.settings()
    };
    let ctx = Context::new(settings)?;
    let store = ctx.store().await?.clone();
    let catalogue = ctx.catalogue().clone();
    let first = 200_000u64;
    let texts = super::bench_records::generate_text_records(&catalogue, a.patches, first);
    let bar = progress(a.patches as u64, "patches");
    let mut records = Vec::new();
    for (b, chunk) in texts.chunks(500).enumerate() {
        let mut loaded = Vec::new();
        for (i, t) in chunk.iter().enumerate() {
            let name = format!("gen-{}.txt", b * 500 + i);
            match patch::load(&name, t.as_bytes(), Some(SourceFormat::Text), &catalogue) {
                Ok(mut r) => loaded.append(&mut r),
                Err(e) => bail!("a generated record is invalid: {}", e[0]),
            }
        }
        store
            .submit(&loaded)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        records.extend(loaded.into_iter().map(|l| l.record));
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    // A run per patch, worked: every fifth rejected at `basic`.
    let certify = Workflow::certify();
    let bar = progress(records.len() as u64, "runs");
    let sem = Arc::new(tokio::sync::Semaphore::new(8));
    let mut set = tokio::task::JoinSet::new();
    for r in &records {
        let targets: Vec<String> = app::patches::targets(&catalogue, r)
            .into_iter()
            .map(|t| app::patches::target_key(&t.release, &t.platform, &t.node_type))
            .collect();
        let (store, certify, sem, id) = (store.clone(), certify.clone(), sem.clone(), r.id);
        set.spawn(async move {
            let _permit = sem.acquire().await;
            store
                .create_run_with_priority(&certify, Some((PatchId(id), 1)), &targets, 10)
                .await
        });
    }
    let mut runs = Vec::new();
    while let Some(r) = set.join_next().await {
        runs.push(r??);
        bar.inc(1);
    }
    bar.finish_and_clear();
    for chunk in runs.chunks(1000) {
        store.seed_worked_runs(chunk, 5).await?;
    }
    let bar = progress(runs.len() as u64, "verdicts");
    let mut set = tokio::task::JoinSet::new();
    for run in runs {
        let (store, sem) = (store.clone(), sem.clone());
        set.spawn(async move {
            let _permit = sem.acquire().await;
            let Some(row) = store.run(run).await? else {
                return Ok::<(), anyhow::Error>(());
            };
            let v = app::runs::view(&store, &row).await?;
            store
                .record_verdict(&VerdictRow {
                    run_id: run,
                    patch_id: row.patch_id,
                    revision: row.revision,
                    verdict: v["verdict"].as_str().unwrap_or("incomplete").to_owned(),
                    stage: v["stage"].as_str().map(str::to_owned),
                    target: v["target"].as_str().map(str::to_owned),
                    reason: v["reason"].as_str().map(str::to_owned),
                    detail: v,
                    decided_at: row.finished_at.unwrap_or(row.created_at),
                })
                .await?;
            Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
        bar.inc(1);
    }
    bar.finish_and_clear();
    // The nights: every cell of the matrix, five tests each; a few failing, changing nightly.
    let nightly = Workflow::nightly();
    let cells = app::sweeps::cells(&ctx, &nightly.sweep.clone().unwrap_or_default());
    let bar = progress(a.nights as u64, "nights");
    let now = chrono::Utc::now();
    for n in 0..a.nights {
        let run = store.create_run(&nightly, None, &cells).await?;
        let night: Vec<certo_orchestrator::store::scratch::NightCell> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let tests = (0..5)
                    .map(|t| {
                        let fails = (i * 7 + t * 3 + n) % 41 == 0;
                        let suite = if t == 0 { "basic" } else { "regression" };
                        (
                            suite.to_owned(),
                            format!("test{t}"),
                            if fails { "fail" } else { "pass" }.to_owned(),
                        )
                    })
                    .collect();
                (c.clone(), tests)
            })
            .collect();
        let at = now - chrono::Duration::days((a.nights - n) as i64);
        store.seed_sweep_night(run, at, &night).await?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok((ctx, first, first + a.patches as u64 - 1))
}

/// One wrk measurement: (p50, p95, p99, max) in ms, requests/s, socket errors, non-2xx.
fn wrk(
    url: &str,
    cookie: &str,
    token: &str,
    a: &DashboardBenchArgs,
    range: Option<(u64, u64)>,
    lua: &std::path::Path,
) -> anyhow::Result<Value> {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t", "2", "-c"])
        .arg(a.connections.to_string())
        .arg("-d")
        .arg(format!("{}s", a.seconds))
        .arg("--timeout")
        .arg("10s")
        .arg("-s")
        .arg(lua)
        .arg("-H")
        .arg(format!("Cookie: certo_session={cookie}"))
        .arg("-H")
        .arg(format!("Authorization: Bearer {token}"))
        .arg(url);
    if let Some((first, last)) = range {
        cmd.env("CERTO_FIRST", first.to_string())
            .env("CERTO_LAST", last.to_string());
    }
    let out = cmd
        .output()
        .context("running wrk (Debian's `wrk`; scripts/lib.sh installs it)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(line) = text.lines().find_map(|l| l.strip_prefix("CERTO ")) else {
        bail!(
            "wrk said nothing Certo reads: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let n: Vec<f64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    if n.len() < 8 {
        bail!("wrk's report is short: {line}");
    }
    Ok(json!({
        "p50_ms": n[0] / 1000.0, "p95_ms": n[1] / 1000.0, "p99_ms": n[2] / 1000.0, "max_ms": n[3] / 1000.0,
        "requests": n[4], "requests_per_second": n[4] / (n[5] / 1e6),
        "socket_errors": n[6], "non_2xx": n[7],
    }))
}

pub async fn run(g: &Global, a: DashboardBenchArgs) -> anyhow::Result<ExitCode> {
    if a.patches == 0 || a.nights == 0 || a.connections == 0 || a.repeat == 0 {
        bail!("--patches, --nights, --connections and --repeat must be positive");
    }
    let scratch = ScratchDb::create(&g.location(), "certo_bench_web")
        .await
        .context("cannot create a scratch database for the benchmark")?;
    let started = Instant::now();
    let (ctx, first, last) = seed(g, &a, &scratch).await?;
    let seeded = started.elapsed();
    if !a.json {
        println!(
            "seeded {} patches with their runs and verdicts and {} nights of {} cells in {:.0} s",
            a.patches,
            a.nights,
            app::sweeps::cells(&ctx, &Workflow::nightly().sweep.unwrap_or_default()).len(),
            seeded.as_secs_f64()
        );
    }
    let store = ctx.store().await?.clone();
    let token = app::users::add(&store, "bench", certo_orchestrator::store::Role::Admin).await?;
    let key = certo_orchestrator::api::new_token()?;
    store
        .start_session(
            &certo_orchestrator::api::token_digest(&key),
            "bench",
            "bench-csrf",
            3600,
        )
        .await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let srv = tokio::spawn(certo_orchestrator::api::serve_router(
        listener,
        certo_orchestrator::web::router(certo_orchestrator::api::ApiState::full(
            ctx.clone(),
            store.clone(),
        )),
        store.clone(),
        Duration::from_secs(3600),
        async move {
            let _ = stop_rx.await;
        },
    ));
    let lua = tempfile_path("certo-bench-wrk.lua");
    std::fs::write(&lua, REPORT_LUA)?;
    let pages = [
        ("matrix", format!("{base}/matrix"), None),
        // Each look makes its page (the page cache off)...
        (
            "patch (made, random)",
            format!("{base}/patches/{first}"),
            Some((first, last)),
        ),
        // ...and every page looked at once before, so each look finds it kept.
        (
            "patch (kept, random)",
            format!("{base}/patches/{first}"),
            Some((first, last)),
        ),
        ("sweep", format!("{base}/sweeps"), None::<(u64, u64)>),
        (
            "api patches (offset)",
            format!("{base}/api/v1/patches?limit=50&offset=5000"),
            None,
        ),
        // The same page by its cursor: the 5000th patch's key.
        (
            "api patches (after)",
            format!(
                "{base}/api/v1/patches?limit=50&after={}.1",
                (first + 4999).min(last)
            ),
            None,
        ),
    ];
    let mut results = Vec::new();
    for (name, url, range) in &pages {
        if a.only.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        // Each page answers before it is loaded (a broken page would measure error pages).
        let probe = reqwest::Client::new()
            .get(url.replace(&format!("/patches/{first}"), &format!("/patches/{last}")))
            .header("cookie", format!("certo_session={key}"))
            .bearer_auth(&token)
            .send()
            .await?;
        if !probe.status().is_success() {
            bail!("{name}: {url} answered {}", probe.status());
        }
        let cache = certo_orchestrator::web::page_cache::global();
        cache.set_enabled(!name.contains("made"));
        if name.contains("kept") {
            warm(&base, &key, first, last).await?;
        }
        let mut runs = Vec::new();
        for _ in 0..a.repeat {
            let (u, a2, r, l) = (url.clone(), &a, *range, lua.clone());
            let cookie = key.clone();
            runs.push(tokio::task::block_in_place(|| {
                wrk(&u, &cookie, &token, a2, r, &l)
            })?);
        }
        let med = |k: &str| super::median(runs.iter().filter_map(|r| r[k].as_f64()).collect());
        let p95 = med("p95_ms");
        let row = json!({
            "page": name, "url": url, "connections": a.connections, "seconds": a.seconds,
            "p50_ms": med("p50_ms"), "p95_ms": p95, "p99_ms": med("p99_ms"),
            "requests_per_second": med("requests_per_second"),
            "non_2xx": runs.iter().filter_map(|r| r["non_2xx"].as_f64()).sum::<f64>(),
            "socket_errors": runs.iter().filter_map(|r| r["socket_errors"].as_f64()).sum::<f64>(),
            "p95_vs_goal_50ms": p95 / 50.0,
            "runs": runs,
        });
        // How the patch pages were served: made, or kept from an earlier look.
        let cache = cache.stats();
        let row = if range.is_some() {
            let mut row = row;
            row["page_cache"] = json!({
                "pages": cache.pages, "bytes": cache.bytes, "limit": cache.limit,
                "hits": cache.hits, "misses": cache.misses,
            });
            row
        } else {
            row
        };
        if !a.json {
            if name.contains("kept") {
                println!(
                    "{:<24} {} pages kept in {:.1} of {:.0} MiB; {} looks found their page, {} made it",
                    "  page cache",
                    cache.pages,
                    cache.bytes as f64 / 1048576.0,
                    cache.limit as f64 / 1048576.0,
                    cache.hits,
                    cache.misses
                );
            }
            println!(
                "{name:<24} p50 {:>6.1} ms  p95 {:>6.1} ms  p99 {:>6.1} ms  {:>7.0} req/s  p95/goal {:.2}  errors {} non-2xx {}",
                row["p50_ms"].as_f64().unwrap_or(0.0),
                p95,
                row["p99_ms"].as_f64().unwrap_or(0.0),
                row["requests_per_second"].as_f64().unwrap_or(0.0),
                p95 / 50.0,
                row["socket_errors"],
                row["non_2xx"]
            );
        }
        results.push(row);
    }
    let _ = stop_tx.send(());
    let _ = srv.await;
    let _ = std::fs::remove_file(&lua);
    drop(ctx);
    drop(store);
    scratch.drop_db().await?;
    if a.json {
        print_json(&json!({
            "patches": a.patches, "nights": a.nights, "seed_seconds": seeded.as_secs_f64(),
            "pages": results,
        }))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Looks at every patch page once, 16 at a time (what a page cache keeps then).
async fn warm(base: &str, key: &str, first: u64, last: u64) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let bar = progress(last - first + 1, "first looks");
    let mut ids = first..=last;
    let mut set = tokio::task::JoinSet::new();
    loop {
        while set.len() < 16
            && let Some(id) = ids.next()
        {
            let req = client
                .get(format!("{base}/patches/{id}"))
                .header("cookie", format!("certo_session={key}"));
            set.spawn(async move { req.send().await?.error_for_status().map(|_| ()) });
        }
        let Some(done) = set.join_next().await else {
            break;
        };
        done??;
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(())
}

fn tempfile_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("{}-{name}", std::process::id()))
}
