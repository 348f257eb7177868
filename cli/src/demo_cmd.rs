//! `certo demo`: the main job on the embedded default. At this stage of the
//! project: start the store, submit the fixture patches, list them, and build
//! the VM images every fixture patch needs (real mmdebstrap / dnf builds, cached).

use certo_orchestrator::model::{TestStatus, VmState};
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
    /// Skip building the images the fixture patches need (and booting them).
    #[arg(long)]
    pub no_images: bool,
    /// Build the images but boot no VM.
    #[arg(long)]
    pub no_vms: bool,
    /// The libvirt connection the demo's host agent boots VMs through.
    #[arg(long, default_value = "qemu:///system")]
    pub libvirt: String,
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
        g,
        store,
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
    let ready = build_images(&ctx, &loaded.records).await?;
    if args.no_vms || ready.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    boot_images(g, &ctx, &ready, &args.libvirt).await
}

/// Boots every ready image on a host agent of this machine (two at a time), runs its
/// harness with all suites, and prints the results.
async fn boot_images(
    g: &Global,
    ctx: &certo_orchestrator::app::Context,
    ready: &[(String, certo_imager::ImageRecord)],
    libvirt: &str,
) -> anyhow::Result<ExitCode> {
    use std::io::BufRead;
    println!("== Booting the images under QEMU through a host agent on this machine ({libvirt})");
    let dir = g.data_dir().join("demo-host");
    std::fs::create_dir_all(&dir)?;
    let token = certo_orchestrator::api::new_token()?;
    let exe = std::env::current_exe()?;
    let mut agent = std::process::Command::new(&exe)
        .arg("--data-dir")
        .arg(g.data_dir())
        .args([
            "agent",
            "--listen",
            "127.0.0.1:0",
            "--name",
            "demo-host",
            "--slots",
            "2",
            "--libvirt",
            libvirt,
            "--repo",
        ])
        .arg(dir.join("repo"))
        .env("CERTO_TOKEN", &token)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting the demo's host agent")?;
    let mut line = String::new();
    if let Some(out) = agent.stdout.take() {
        std::io::BufReader::new(out).read_line(&mut line)?;
    }
    let Some(url) = line.trim().strip_prefix("listening on ").map(str::to_owned) else {
        let _ = agent.kill();
        anyhow::bail!("the demo's host agent did not start: {line:?}");
    };
    // A host token of its own: the demo's host is registered under it.
    ctx.store()
        .await?
        .set_host_token("demo-host", &certo_orchestrator::api::token_digest(&token))
        .await?;
    let started = std::time::Instant::now();
    let (mut done, mut other) = (0, 0);
    for pair in ready.chunks(2) {
        let mut tasks = Vec::new();
        for (label, image) in pair {
            let Some(path) = image.ext4().map(|a| a.path.clone()) else {
                continue;
            };
            let (ctx, url, token, label, node_type) = (
                ctx.clone(),
                url.clone(),
                token.clone(),
                label.clone(),
                image.node_type.clone(),
            );
            let patch = image
                .patch
                .map(|(id, rev)| (certo_orchestrator::model::PatchId(id), rev as i32));
            tasks.push(tokio::spawn(async move {
                let out = certo_orchestrator::app::vms::run(
                    &ctx,
                    &url,
                    &token,
                    &certo_orchestrator::vmrun::VmRequest {
                        image: &path,
                        node_type: &node_type,
                        patch,
                        suite: certo_orchestrator::model::Suite::All,
                        timeout: std::time::Duration::from_secs(240),
                        memory_mib: 384,
                        orchestrator: None,
                        fault: None,
                        index_cache: None,
                    },
                    &|_| {},
                )
                .await;
                (label, out)
            }));
        }
        for t in tasks {
            let (label, out) = t.await?;
            match out {
                Ok(o) => {
                    if o.vm.state == VmState::Done {
                        done += 1;
                    } else {
                        other += 1;
                    }
                    let passed = o
                        .tests
                        .iter()
                        .filter(|t| t.status == TestStatus::Pass)
                        .count();
                    let failed: Vec<String> = o
                        .tests
                        .iter()
                        .filter(|t| t.status != TestStatus::Pass)
                        .map(|t| format!("{}/{} {}", t.suite, t.name, t.status))
                        .collect();
                    println!(
                        "   {label:<40} {:<9} {passed}/{} tests pass{}{}",
                        o.vm.state,
                        o.tests.len(),
                        if failed.is_empty() {
                            String::new()
                        } else {
                            format!("; {}", failed.join(", "))
                        },
                        o.vm.reason.map(|r| format!(" ({r})")).unwrap_or_default()
                    );
                }
                Err(e) => {
                    other += 1;
                    println!("   {label:<40} ERROR {e:#}");
                }
            }
        }
    }
    let _ = agent.kill();
    let _ = agent.wait();
    println!(
        "   {done} VMs ran their suites to the end, {other} did not; {:.0} s. Results: certo's vm_results table; `certo testbed ls`, `certo host ls`.",
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// Builds the image of every (platform, node type) of the newest revision of each patch.
async fn build_images(
    ctx: &certo_orchestrator::app::Context,
    records: &[certo_orchestrator::patch::LoadedRecord],
) -> anyhow::Result<Vec<(String, certo_imager::ImageRecord)>> {
    use std::collections::BTreeMap;
    let mut newest: BTreeMap<u64, &certo_orchestrator::patch::PatchRecord> = BTreeMap::new();
    // Records the tracker has past certification, rejected or not yet ready are stored, not
    // certified: no images for them.
    let mut not_for_certification = Vec::new();
    for r in records {
        if !r.wants_certification() {
            not_for_certification.push(format!("{} ({})", r.record.id, r.record.status));
            continue;
        }
        let e = newest.entry(r.record.id).or_insert(&r.record);
        if r.record.revision > e.revision {
            *e = &r.record;
        }
    }
    println!("== Building the images the fixture patches need");
    if !not_for_certification.is_empty() {
        println!(
            "   not for certification (stored and shown only): {}",
            not_for_certification.join(", ")
        );
    }
    println!(
        "   package repositories: building the fixture world (rpmbuild, dpkg-deb, createrepo_c)"
    );
    let imager = ctx.imager()?;
    println!(
        "   image cache: {} (repositories: {})",
        imager.store().root().display(),
        imager.world().display()
    );
    let (mut ready, mut refused, mut skipped) = (0, 0, 0);
    let mut images_ready = Vec::new();
    let started = std::time::Instant::now();
    for record in newest.values() {
        for target in certo_orchestrator::app::patches::targets(ctx.catalogue(), record) {
            let (platform, node_type) = (&target.platform, &target.node_type);
            let label = format!("{} r{} {platform} {node_type}", record.id, record.revision);
            let req = match certo_orchestrator::app::images::request(
                ctx,
                &target.release,
                platform,
                node_type,
                Some(record),
            ) {
                Ok(r) => r,
                Err(e) => {
                    skipped += 1;
                    println!("   {label:<40} not a target: {e}");
                    continue;
                }
            };
            match super::image_cmd::build_one(ctx, &req, &[], true).await? {
                Ok(built) => {
                    ready += 1;
                    images_ready.push((label.clone(), built.image.clone()));
                    let how: Vec<&str> = built
                        .layers
                        .iter()
                        .map(|(_, o)| match o {
                            certo_imager::LayerOutcome::Cached => "cached",
                            _ => "built",
                        })
                        .collect();
                    println!(
                        "   {label:<40} ready   {}  {:>6.1} s  (layers: {})",
                        &built.image.digest[..16],
                        built.seconds,
                        how.join(", ")
                    );
                }
                Err(e) => {
                    refused += 1;
                    println!("   {label:<40} REFUSED {e}");
                }
            }
        }
    }
    let layers = imager.store().layers().map(|l| l.len()).unwrap_or(0);
    let images = imager.store().images().map(|l| l.len()).unwrap_or(0);
    println!(
        "   {ready} images ready, {refused} refused at image-build time, {skipped} combinations not offered; {layers} layers and {images} images in the cache; {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(images_ready)
}
