//! The scale simulation: many patches over many host agents, toward a real grid's size.
//!
//! `cargo run -p certo-testkit --example scale -- [--patches 1000] [--agents 20] [--slots 4]
//! [--workers 4] [--concurrency 32] [--json]`
//!
//! What is real: the store (a scratch database of the tests' PostgreSQL), the engine (that many
//! workers, each with its own connection pool, claiming the steps of `workflows/certify.yaml`),
//! the certification handler for every step but `build` (planning, baseline lookup, placement
//! by free slots and held blocks, transfer, boot with intents and epochs, join, the suites, bug
//! checks, teardown, conflicts, the verdict), `certo serve`'s API over HTTP (registration,
//! heartbeats, the guests' calls), and that many host agents over HTTP, each over a libvirt
//! test-driver instance of its own whose domains run the simulated harness (it joins, reports
//! one passing result per planned suite, and powers off at once).
//!
//! What is not: no image is built. `build` hands every target the same small image (4 MiB, the
//! transfer pushes it to each host once and then finds it there), and its baseline's results
//! are recorded beforehand, so `baseline` finds them cached. The records are configuration-only
//! and are queued directly (no conflict detection at submission: 1,000 patches on a few
//! targets would all overlap). So the figures are the engine's, the placement's and the
//! agents' costs at this size, with guests that take no time at all: the worst case for the
//! engine's overhead.
//!
//! Reported: wall time, step transitions per second (a claim and its completion are two),
//! queue latency (run created → its first step started: median, p95, max), and placement
//! balance (the busiest host's share of the targets against an even share).

use std::sync::Arc;
use std::time::{Duration, Instant};

use certo_orchestrator::app::certify::{Certify, CertifySettings};
use certo_orchestrator::app::{Context, Settings};
use certo_orchestrator::engine::worker::{
    Handler, StepCtx, StepFuture, StepOutput, Worker, WorkerConfig,
};
use certo_orchestrator::engine::workflow::Workflow;
use certo_orchestrator::model::PatchId;
use certo_orchestrator::store::Store;
use serde_json::{Value, json};

struct Args {
    patches: usize,
    agents: usize,
    slots: usize,
    workers: usize,
    concurrency: usize,
    pool: u32,
    json: bool,
}

fn args() -> Args {
    let mut a = Args {
        patches: 1000,
        agents: 20,
        slots: 4,
        workers: 4,
        concurrency: 32,
        pool: 16,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut num = |name: &str| -> usize {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} needs a number"))
        };
        match k.as_str() {
            "--patches" => a.patches = num("--patches"),
            "--agents" => a.agents = num("--agents"),
            "--slots" => a.slots = num("--slots"),
            "--workers" => a.workers = num("--workers"),
            "--concurrency" => a.concurrency = num("--concurrency"),
            "--pool" => a.pool = num("--pool") as u32,
            "--json" => a.json = true,
            other => panic!(
                "unknown argument {other:?}: --patches N --agents N --slots N --workers N --concurrency N --json"
            ),
        }
    }
    a
}

/// The certification handler with `build` replaced by the shared small image.
struct Simulated {
    certify: Certify,
    build: Value,
}

impl Handler for Simulated {
    fn workflows(&self) -> Vec<Workflow> {
        self.certify.workflows()
    }
    fn run(&self, step: StepCtx) -> StepFuture {
        if step.claim.name == "build" {
            let out = self.build.clone();
            return Box::pin(async move { StepOutput::Passed(out) });
        }
        self.certify.run(step)
    }
}

/// The targets the records cycle through.
const TARGETS: [(&str, &str, &str); 4] = [
    ("3.2", "sl5_x86_64", "glite-WN"),
    ("3.2", "sl5_i386", "glite-WN"),
    ("3.1", "sl4_i386", "glite-CE"),
    ("3.1", "sl4_x86_64", "glite-WN"),
];

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let a = args();
    certo_testkit::ensure_libvirtd();
    let db = certo_testkit::scratch_db().await;
    let store = db.store.clone();
    let data = certo_testkit::target_tmp().join(format!("scale-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).expect("data dir");
    let ctx = Context::new(Settings {
        data_dir: data.clone(),
        database_url: Some(db.url.clone()),
        catalogue: None,
        repos: None,
    })
    .expect("context");
    let api = certo_testkit::api_server(&store, Duration::from_secs(10)).await;

    // The hosts: registered with the API, heartbeating every second.
    let mut hosts = Vec::new();
    for h in 0..a.agents {
        let name = format!("sim{h:02}");
        let token = certo_orchestrator::api::new_token().expect("token");
        store
            .add_host(&name, &certo_orchestrator::api::token_digest(&token))
            .await
            .expect("add host");
        ctx.save_host_token(&name, &token).expect("token file");
        hosts.push(
            certo_testkit::agent::SimulatedHost::start_registered(
                &name,
                &token,
                a.slots,
                Some(api.base.clone()),
                |hv| hv,
            )
            .await,
        );
    }
    let started = Instant::now();
    loop {
        let live = store
            .list_hosts()
            .await
            .expect("hosts")
            .iter()
            .filter(|h| h.last_heartbeat.is_some())
            .count();
        if live == a.agents {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{live} of {} hosts registered",
            a.agents
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The shared image and its baseline's results.
    let image = data.join("sim.img");
    let mut bytes = vec![0u8; 4 << 20];
    for (i, b) in bytes.iter_mut().enumerate().take(1 << 20) {
        *b = (i * 7 % 251) as u8;
    }
    std::fs::write(&image, bytes).expect("image");
    // A digest of its own shape (64 hex digits) that no built image has.
    let baseline = "5".repeat(64);
    let baseline = baseline.as_str();
    store
        .record_baseline_results(
            baseline,
            "sim-baseline",
            &[
                (
                    "basic".into(),
                    "simulated".into(),
                    "pass".into(),
                    String::new(),
                ),
                (
                    "regression".into(),
                    "simulated".into(),
                    "pass".into(),
                    String::new(),
                ),
            ],
        )
        .await
        .expect("baseline results");
    let build = json!({
        "image": {"digest": "sim-image", "path": image.display().to_string(), "cached": true, "layers": []},
        "baseline": {"digest": baseline, "path": image.display().to_string(), "cached": true, "layers": []},
        "seconds": 0.0,
    });

    // The records: configuration-only, one target each.
    let mut yaml = String::new();
    for i in 0..a.patches {
        let (release, platform, node_type) = TARGETS[i % TARGETS.len()];
        yaml.push_str(&format!(
            "---\nid: {}\nrevision: 1\ntitle: simulated patch {i}\nrelease: \"{release}\"\n\
             platforms: [{platform}]\nnode_types: [{node_type}]\n\
             config_changes:\n  - {{file: site-info.def, key: SIM_{i}, value: \"on\"}}\nsubmitter: scale\n",
            100_000 + i
        ));
    }
    let records =
        certo_orchestrator::patch::load("scale.yaml", yaml.as_bytes(), None, ctx.catalogue())
            .unwrap_or_else(|e| panic!("the simulated records do not validate: {e:?}"));
    for chunk in records.chunks(200) {
        store.submit(chunk).await.expect("submit");
    }

    let certify = Certify::new(
        ctx.clone(),
        CertifySettings {
            orchestrator: api.base.clone(),
            memory_mib: 512,
            vm_timeout: Duration::from_secs(120),
        },
    );
    let handler: Arc<dyn Handler> = Arc::new(Simulated { certify, build });
    let workflow = Workflow::certify();

    // Queue every run, then start the workers.
    let t0 = Instant::now();
    for (i, r) in records.iter().enumerate() {
        let (release, platform, node_type) = TARGETS[i % TARGETS.len()];
        store
            .create_run_with_priority(
                &workflow,
                Some((PatchId(r.record.id), 1)),
                &[format!("{release}/{platform}/{node_type}")],
                10,
            )
            .await
            .expect("run");
    }
    let queued = t0.elapsed();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut workers = Vec::new();
    for w in 0..a.workers {
        let s = Store::connect_sized(&db.url, a.pool)
            .await
            .expect("worker store");
        let mut config = WorkerConfig::new(format!("scale-w{w}"));
        config.concurrency = a.concurrency;
        config.poll = Duration::from_millis(500);
        let mut rx = stop_rx.clone();
        workers.push(tokio::spawn(Worker::new(s, config, handler.clone()).run(
            async move {
                let _ = rx.wait_for(|s| *s).await;
            },
        )));
    }
    let bar = indicatif::ProgressBar::new(a.patches as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} verdicts {msg}",
        )
        .expect("style"),
    );
    loop {
        let decided: i64 = sqlx::query_scalar("SELECT count(*) FROM verdicts")
            .fetch_one(store.pool())
            .await
            .expect("count");
        bar.set_position(decided as u64);
        if decided as usize >= a.patches {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(3 * 3600),
            "not done in 3 hours"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let wall = t0.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let _ = stop_tx.send(true);
    for w in workers {
        w.await.expect("worker task").expect("worker");
    }

    let verdicts: Vec<(String, i64)> =
        sqlx::query_as("SELECT verdict, count(*) FROM verdicts GROUP BY verdict ORDER BY verdict")
            .fetch_all(store.pool())
            .await
            .expect("verdicts");
    let claims: i64 = sqlx::query_scalar("SELECT last_value FROM engine_epoch_seq")
        .fetch_one(store.pool())
        .await
        .expect("claims");
    let steps: i64 = sqlx::query_scalar("SELECT count(*) FROM engine_steps")
        .fetch_one(store.pool())
        .await
        .expect("steps");
    let mut latency: Vec<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM min(s.started_at) - r.created_at)::float8
           FROM engine_runs r JOIN engine_steps s ON s.run_id = r.id GROUP BY r.id",
    )
    .fetch_all(store.pool())
    .await
    .expect("latency");
    latency.sort_by(f64::total_cmp);
    let per_host: Vec<(String, i64)> = sqlx::query_as(
        "SELECT host, count(*) FROM engine_placements GROUP BY host ORDER BY count(*) DESC",
    )
    .fetch_all(store.pool())
    .await
    .expect("placements");
    let placed: i64 = per_host.iter().map(|(_, n)| n).sum();
    let busiest = per_host.first().map_or(0, |(_, n)| *n);
    let busiest_share = busiest as f64 / placed.max(1) as f64;
    let even_share = 1.0 / a.agents as f64;
    let boots: i64 = sqlx::query_scalar("SELECT count(*) FROM vm_runs")
        .fetch_one(store.pool())
        .await
        .expect("vms");
    // Where the time goes: each step's median duration (its last attempt) and its claims.
    let per_step: Vec<(String, f64, f64, i64)> = sqlx::query_as(
        "SELECT name,
                percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at))::float8,
                percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at))::float8,
                sum(attempt)::int8
           FROM engine_steps GROUP BY name ORDER BY min(id)",
    )
    .fetch_all(store.pool())
    .await
    .expect("per step");
    let defers: i64 = claims - per_step.iter().map(|(.., n)| n).sum::<i64>();
    let result = json!({
        "patches": a.patches, "agents": a.agents, "slots_per_agent": a.slots,
        "workers": a.workers, "concurrency": a.concurrency,
        "queued_seconds": queued.as_secs_f64(),
        "wall_seconds": wall,
        "verdicts": verdicts.iter().map(|(v, n)| json!({"verdict": v, "count": n})).collect::<Vec<_>>(),
        "steps": steps, "claims": claims,
        "transitions_per_second": 2.0 * claims as f64 / wall,
        "queue_latency_seconds": {"median": percentile(&latency, 0.5), "p95": percentile(&latency, 0.95),
                                   "max": latency.last().copied().unwrap_or(0.0)},
        "vms": boots,
        "deferrals": defers,
        "steps_by_name": per_step.iter().map(|(n, m, p, c)| json!({"step": n, "median_seconds": m, "p95_seconds": p, "attempts": c})).collect::<Vec<_>>(),
        "placements": placed,
        "hosts_used": per_host.len(),
        "busiest_host": per_host.first().map(|(h, n)| json!({"host": h, "targets": n})),
        "busiest_share": busiest_share, "even_share": even_share,
        "balance": busiest_share / even_share,
    });
    if a.json {
        println!("{result:#}");
    } else {
        println!(
            "{} patches over {} agents ({} slots each), {} workers × {}: {:.1} s wall, \
             {} steps, {} claims, {:.0} step transitions/s",
            a.patches,
            a.agents,
            a.slots,
            a.workers,
            a.concurrency,
            wall,
            steps,
            claims,
            2.0 * claims as f64 / wall
        );
        println!(
            "verdicts: {}",
            verdicts
                .iter()
                .map(|(v, n)| format!("{n} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!(
            "queue latency (run created → first step): median {:.2} s, p95 {:.2} s, max {:.2} s",
            percentile(&latency, 0.5),
            percentile(&latency, 0.95),
            latency.last().copied().unwrap_or(0.0)
        );
        println!(
            "placement: {placed} targets on {} hosts; busiest {} with {busiest} ({:.1} % against an even {:.1} %: {:.2}×)",
            per_host.len(),
            per_host.first().map_or("-", |(h, _)| h.as_str()),
            100.0 * busiest_share,
            100.0 * even_share,
            busiest_share / even_share
        );
    }
    let odd: Vec<(String, Option<String>, Option<String>, i64)> = sqlx::query_as(
        "SELECT verdict, stage, reason, count(*) FROM verdicts WHERE verdict <> 'certified'
          GROUP BY 1, 2, 3 ORDER BY 4 DESC LIMIT 5",
    )
    .fetch_all(store.pool())
    .await
    .expect("other verdicts");
    for (v, stage, reason, n) in &odd {
        eprintln!(
            "{n} {v} at {}: {}",
            stage.as_deref().unwrap_or("-"),
            reason.as_deref().unwrap_or("-")
        );
    }
    if !a.json {
        println!(
            "{defers} deferrals (placement found every slot in use); per step, median / p95 seconds:"
        );
        for (n, m, p, _) in &per_step {
            println!("  {n:<11} {m:>7.3} {p:>7.3}");
        }
    }
    drop(hosts);
    drop(api);
    let _ = std::fs::remove_dir_all(&data);
    db.drop_db().await.expect("drop");
}
