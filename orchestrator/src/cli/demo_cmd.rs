//! `certo demo`: the main job on the embedded default. At this stage of the
//! project: start the store, submit the fixture patches, list them.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use super::{EXIT_INVALID, Global, default_fixtures_dir, patch_cmd};
use crate::ingest;
use crate::store::SubmitOutcome;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// The fixture folder (holds patches/valid and patches/invalid).
    #[arg(long, env = "CERTO_FIXTURES", value_name = "DIR", default_value_os_t = default_fixtures_dir())]
    pub fixtures: PathBuf,
}

pub async fn run(g: &Global, args: DemoArgs) -> anyhow::Result<ExitCode> {
    let catalogue = g.catalogue()?;
    let valid_dir = args.fixtures.join("patches/valid");
    let invalid_dir = args.fixtures.join("patches/invalid");

    println!(
        "== Store: {}",
        match g.location() {
            crate::store::Location::Url(u) =>
                format!("external database {}", crate::store::redact(&u)),
            crate::store::Location::Embedded(d) =>
                format!("embedded PostgreSQL cluster under {}", d.display()),
        }
    );
    let store = g.store().await.context("cannot open the store")?;

    println!("== Validating the malformed fixture records (each must be refused)");
    let invalid = ingest::load_files(std::slice::from_ref(&invalid_dir), &catalogue, || {});
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
    let loaded = ingest::load_files(std::slice::from_ref(&valid_dir), &catalogue, || {});
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
    patch_cmd::list(
        g,
        &store,
        patch_cmd::PatchesArgs {
            state: None,
            release: None,
            all_revisions: true,
            json: false,
        },
    )
    .await
}
