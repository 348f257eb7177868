//! `certo demo`: the main job on the embedded default. Starts this machine's stack (`certo
//! up`: the embedded store, `certo serve`, a host agent over libvirt, workers), checks the
//! malformed fixture records are refused, certifies 3213 revision 1 alone (its bug is
//! claimed, not fixed), then every fixture patch, on real VMs, and prints one verdict line
//! per patch revision and a summary. Warm caches (image layers, baseline results, blocks
//! on the host) make a second run fast.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use super::{EXIT_INVALID, Global, default_fixtures_dir, patch_cmd};
use certo_orchestrator::ingest;
use certo_orchestrator::store::SubmitOutcome;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// The fixture folder (holds patches/valid and patches/invalid).
    #[arg(long, env = "CERTO_FIXTURES", value_name = "DIR", default_value_os_t = default_fixtures_dir())]
    pub fixtures: PathBuf,
    /// Store and list the fixture patches only (no images, no VMs, no verdicts).
    #[arg(long)]
    pub no_images: bool,
    /// The libvirt connection the demo's host agent boots VMs through.
    #[arg(long, default_value = "qemu:///system")]
    pub libvirt: String,
    /// VMs at once on the demo's host.
    #[arg(long, default_value_t = 2)]
    pub slots: usize,
    /// Leave the stack running at the end (`certo status`, `certo down`).
    #[arg(long)]
    pub keep_up: bool,
    /// Print the verdicts as JSON (`{"runs": [...]}`) at the end.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(g: &Global, args: DemoArgs) -> anyhow::Result<ExitCode> {
    let ctx = g.context()?;
    let catalogue = ctx.catalogue();
    let valid_dir = args.fixtures.join("patches/valid");
    let invalid_dir = args.fixtures.join("patches/invalid");

    println!(
        "== Store: {}",
        match g.location() {
            certo_orchestrator::store::Location::Url(u) => format!(
                "external database {}",
                certo_orchestrator::store::redact(&u)
            ),
            certo_orchestrator::store::Location::Embedded(d) =>
                format!("embedded PostgreSQL cluster under {}", d.display()),
        }
    );
    let store = ctx.store().await.context("cannot open the store")?;

    println!("== Validating the malformed fixture records (each must be refused)");
    let invalid = ingest::load_files(std::slice::from_ref(&invalid_dir), catalogue, || {});
    let refused = invalid.files.iter().filter(|f| f.2 > 0).count();
    println!(
        "   {refused} of {} malformed files refused, {} errors in all",
        invalid.files.len(),
        invalid.errors.len()
    );
    if let Some(e) = invalid.errors.first() {
        println!("   for example: {e}");
    }
    if refused != invalid.files.len() {
        eprintln!("error: a malformed fixture was accepted");
        return Ok(ExitCode::from(EXIT_INVALID));
    }

    println!(
        "== Submitting the fixture patches from {}",
        valid_dir.display()
    );
    let loaded = ingest::load_files(std::slice::from_ref(&valid_dir), catalogue, || {});
    if !loaded.errors.is_empty() {
        for e in &loaded.errors {
            eprintln!("{e}");
        }
        return Ok(ExitCode::from(EXIT_INVALID));
    }
    let reports = store
        .submit(&loaded.records)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let stored = reports
        .iter()
        .filter(|r| matches!(r.outcome, SubmitOutcome::Stored { .. }))
        .count();
    println!(
        "   {} records from {} files: {stored} stored, {} already stored unchanged",
        reports.len(),
        loaded.files.len(),
        reports.len() - stored
    );

    println!("== Patches in the store");
    let listed = patch_cmd::list(
        &super::remote::Backend::Local(ctx.clone()),
        patch_cmd::PatchesArgs {
            state: None,
            release: None,
            all_revisions: true,
            json: false,
        },
    )
    .await?;
    if args.no_images {
        return Ok(listed);
    }
    certify(g, &ctx, &args, &loaded.records).await
}

/// Certifies the fixture patches through the stack: 3213 r1 alone first, then the rest.
async fn certify(
    g: &Global,
    ctx: &certo_orchestrator::app::Context,
    args: &DemoArgs,
    records: &[certo_orchestrator::patch::LoadedRecord],
) -> anyhow::Result<ExitCode> {
    use certo_orchestrator::app::runs;
    println!(
        "== Starting the stack (certo up): the store, certo serve, a host agent over {} with {} VM slots, a worker",
        args.libvirt, args.slots
    );
    let up = super::stack_cmd::up(
        g,
        super::stack_cmd::UpArgs {
            workers: 1,
            concurrency: 8,
            slots: args.slots,
            libvirt: args.libvirt.clone(),
            listen: "127.0.0.1:0".into(),
            host: "local".into(),
            memory_mib: 4096,
            // The demo's stack lives for the demo: no nightly sweep starts in it.
            no_schedules: true,
        },
    )
    .await?;
    if up != ExitCode::SUCCESS {
        return Ok(up);
    }
    let store = ctx.store().await?;
    let started = std::time::Instant::now();
    // 3213 r1 alone: a later revision would cancel its run.
    let mut order: Vec<&certo_orchestrator::patch::PatchRecord> = Vec::new();
    let alone: Vec<_> = records
        .iter()
        .filter(|r| r.record.id == 3213 && r.record.revision == 1)
        .map(|r| &r.record)
        .collect();
    let rest: Vec<_> = records
        .iter()
        .filter(|r| !(r.record.id == 3213 && r.record.revision == 1))
        .filter(|r| r.wants_certification())
        .map(|r| &r.record)
        .collect();
    let mut views = Vec::new();
    for (title, batch) in [
        ("3213 revision 1 alone (a bug claimed, not fixed)", alone),
        ("every other fixture patch", rest),
    ] {
        if batch.is_empty() {
            continue;
        }
        println!(
            "== Certifying {title}: {} revision(s), on real VMs",
            batch.len()
        );
        let mut ids = Vec::new();
        for record in batch {
            // A new run each time: a second demo re-certifies, from warm caches.
            let id = runs::start(ctx, record).await?;
            if let Some(run) = store.run(id).await? {
                for c in run.conflicts.as_array().into_iter().flatten() {
                    println!(
                        "   patch {} r{} conflicts with patch {} r{} in flight (packages {}, node types {})",
                        record.id,
                        record.revision,
                        c["patch"],
                        c["revision"],
                        c["packages"],
                        c["node_types"]
                    );
                }
            }
            order.push(record);
            ids.push(id);
        }
        let _ = super::run_cmd::wait_and_print(
            &super::remote::Backend::Local(ctx.clone()),
            &ids,
            true,
            false,
        )
        .await?;
        for id in ids {
            if let Some(v) = store.verdict(id).await? {
                views.push(v.detail);
            }
        }
    }
    let count = |v: &str| views.iter().filter(|r| r["verdict"] == v).count();
    let mut stages: std::collections::BTreeMap<String, usize> = Default::default();
    for v in views.iter().filter(|r| r["verdict"] == "rejected") {
        *stages
            .entry(v["stage"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
    }
    let fixed: usize = views
        .iter()
        .map(|v| {
            v["bugs"]
                .as_array()
                .map_or(0, |b| b.iter().filter(|b| b["fixed"] == true).count())
        })
        .sum();
    println!(
        "== Summary: {} patch revisions: {} certified, {} rejected ({}), {} incomplete, {} cancelled; {fixed} bug(s) verified fixed; {:.0} s",
        views.len(),
        count("certified"),
        count("rejected"),
        stages
            .iter()
            .map(|(s, n)| format!("{n} at {s}"))
            .collect::<Vec<_>>()
            .join(", "),
        count("incomplete"),
        count("cancelled"),
        started.elapsed().as_secs_f64()
    );
    println!(
        "   `certo show PATCH` prints a verdict with its timeline; `certo runs` lists the runs"
    );
    if args.json {
        super::print_json(&serde_json::json!({ "runs": views }))?;
    }
    if !args.keep_up {
        super::stack_cmd::down(g, super::stack_cmd::DownArgs { keep_store: true }).await?;
    }
    Ok(ExitCode::SUCCESS)
}
