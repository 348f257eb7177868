//! `certo workflow check`: workflow files validated with every error positioned.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::json;

use super::{EXIT_INVALID, print_json};
use certo_orchestrator::engine::workflow::{
    CERTIFY, CERTIFY_PATH, NIGHTLY, NIGHTLY_PATH, Scope, Workflow,
};

#[derive(Debug, Args)]
pub struct WorkflowArgs {
    #[command(subcommand)]
    pub command: WorkflowCommand,
}

#[derive(Debug, Subcommand)]
pub enum WorkflowCommand {
    /// Validate workflow files (default: the built-in ones, workflows/certify.yaml and
    /// workflows/nightly.yaml); every error as FILE:LINE:COL: field: message.
    Check(CheckArgs),
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Workflow files (YAML).
    pub files: Vec<PathBuf>,
    /// Print the result as JSON on stdout (the workflows' steps when valid).
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: WorkflowArgs) -> anyhow::Result<ExitCode> {
    let WorkflowCommand::Check(args) = args.command;
    let mut sources = Vec::new();
    if args.files.is_empty() {
        sources.push((CERTIFY_PATH.to_owned(), CERTIFY.to_owned()));
        sources.push((NIGHTLY_PATH.to_owned(), NIGHTLY.to_owned()));
    }
    for f in &args.files {
        let meta = std::fs::metadata(f).with_context(|| format!("cannot read {}", f.display()))?;
        if !meta.is_file() {
            anyhow::bail!("{} is not a regular file", f.display());
        }
        if meta.len() > 1 << 20 {
            anyhow::bail!("{} is larger than 1 MiB", f.display());
        }
        let text =
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
        sources.push((f.display().to_string(), text));
    }
    let mut all_errors = Vec::new();
    let mut valid = Vec::new();
    for (file, text) in &sources {
        match Workflow::parse(file, text) {
            Ok(w) => valid.push((file.clone(), w)),
            Err(errors) => all_errors.extend(errors),
        }
    }
    for e in &all_errors {
        eprintln!("{e}");
    }
    if args.json {
        let workflows: Vec<_> = valid
            .iter()
            .map(|(file, w)| json!({"file": file, "workflow": w}))
            .collect();
        print_json(&json!({
            "valid": all_errors.is_empty(),
            "workflows": workflows,
            "errors": all_errors,
        }))?;
    } else {
        for (file, w) in &valid {
            let per_run = w.steps.iter().filter(|s| s.scope == Scope::Run).count();
            println!(
                "{file}: workflow {}, {} steps ({per_run} per run, {} per target): valid",
                w.name,
                w.steps.len(),
                w.steps.len() - per_run
            );
            if let Some(sch) = &w.schedule {
                println!(
                    "  schedule `{}` in {}: next fire {}",
                    sch.cron,
                    sch.time_zone,
                    sch.next_after(chrono::Utc::now()).map_or_else(
                        || "never".to_owned(),
                        |t| t.format("%Y-%m-%d %H:%M UTC").to_string()
                    )
                );
            }
        }
        if !all_errors.is_empty() {
            eprintln!("{} error(s)", all_errors.len());
        }
    }
    Ok(if all_errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_INVALID)
    })
}
