//! `certo vm run`: boot one VM from an image on one host, run its harness, print the
//! results, tear it down — how a certifier tries one target by hand.

use certo_orchestrator::model::{TestStatus, VmState};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::json;

use super::{EXIT_INVALID, Global, print_json, printable};
use certo_orchestrator::vmrun::VmRequest;

#[derive(Debug, Args)]
pub struct VmArgs {
    #[command(subcommand)]
    pub command: VmCommand,
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Boot one VM from an image, run its harness and print the results, then tear it down.
    Run(RunArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// An ext4 image file, or the digest (or a unique prefix) of an image Certo built.
    #[arg(long, value_name = "FILE|DIGEST")]
    pub image: String,
    /// The host's agent, e.g. http://10.0.0.2:7310.
    #[arg(long, value_name = "URL")]
    pub agent: String,
    /// Which tests the harness runs: basic, regression or all.
    #[arg(long, default_value = "basic")]
    pub suite: certo_orchestrator::model::Suite,
    /// The node type of the image (default: from the image's record when Certo built it).
    #[arg(long)]
    pub node_type: Option<String>,
    /// Seconds before the VM is destroyed if its harness has not finished.
    #[arg(long, default_value_t = 300.0)]
    pub timeout: f64,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 384)]
    pub memory: u32,
    /// The host's token. Prefer CERTO_TOKEN or --token-file: a value on the command line
    /// is visible to every user through `ps`.
    #[arg(long, env = "CERTO_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A file whose first line is the host's token.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// An orchestrator (`certo serve`) the guest reports to; default: one served by this
    /// command for the run.
    #[arg(long, value_name = "URL")]
    pub orchestrator: Option<String>,
    /// Fault injection (tests): the guest hangs, its kernel panics, or its harness crashes.
    #[arg(long, value_parser = ["hang", "panic", "crash"], hide = true)]
    pub fault: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(g: &Global, a: VmArgs) -> anyhow::Result<ExitCode> {
    let VmCommand::Run(a) = a.command;
    let ctx = g.context()?;
    // The image: a file, or an image of the cache by digest.
    let (path, record) = certo_orchestrator::app::vms::find_image(&ctx, &a.image)?;
    let node_type = match (a.node_type.clone(), &record) {
        (Some(n), _) => n,
        (None, Some(r)) => r.node_type.clone(),
        (None, None) => {
            eprintln!("error: --node-type is needed for an image file Certo did not build");
            return Ok(ExitCode::from(EXIT_INVALID));
        }
    };
    let patch = record
        .as_ref()
        .and_then(|r| r.patch)
        .map(|(id, rev)| (certo_orchestrator::model::PatchId(id), rev as i32));
    let json_out = a.json;
    let say = move |s: &str| {
        if !json_out {
            eprintln!("{s}");
        }
        tracing::info!(step = s, "vm run");
    };
    // Without --orchestrator, the guest API is served here, on an address the guest reaches.
    let mut own_api = None;
    let orchestrator = match &a.orchestrator {
        Some(o) => o.clone(),
        None => {
            let (bind, guest_host) = certo_orchestrator::vmrun::callback_bind(&a.agent)?;
            let listener = tokio::net::TcpListener::bind(bind)
                .await
                .with_context(|| format!("listening on {bind} for the guest"))?;
            let port = listener.local_addr()?.port();
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let srv = tokio::spawn(certo_orchestrator::api::serve(
                listener,
                certo_orchestrator::api::ApiState::protocols(ctx.store().await?.clone()),
                Duration::from_secs(10),
                async move {
                    let _ = stop_rx.await;
                },
            ));
            own_api = Some((stop_tx, srv));
            format!("http://{guest_host}:{port}")
        }
    };
    let out = certo_orchestrator::app::vms::run(
        &ctx,
        &a.agent,
        &super::secret(a.token.as_deref(), a.token_file.as_deref(), "host token")?,
        &VmRequest {
            image: &path,
            node_type: &node_type,
            patch,
            suite: a.suite,
            timeout: Duration::from_secs_f64(a.timeout.max(1.0)),
            memory_mib: a.memory,
            orchestrator: Some(&orchestrator),
            fault: a.fault.as_deref(),
            index_cache: None,
        },
        &say,
    )
    .await;
    if let Some((stop, srv)) = own_api {
        let _ = stop.send(());
        let _ = srv.await;
    }
    // A run that could not be carried out: the one mapping (main) gives its exit status.
    let out = out?;
    let all_pass = !out.tests.is_empty() && out.tests.iter().all(|t| t.status == TestStatus::Pass);
    if a.json {
        print_json(&json!({
            "vm": out.vm.name,
            "host": out.vm.host,
            "state": out.vm.state,
            "fault": out.vm.fault,
            "reason": out.vm.reason,
            "hostname": out.vm.hostname,
            "seconds_to_joined": out.seconds_to_joined,
            "seconds_to_done": out.seconds_to_done,
            "serial_log": out.vm.serial_log,
            "log": out.log,
            "tests": out.tests.iter().map(|t| json!({
                "suite": t.suite, "name": t.name, "status": t.status, "seconds": t.seconds,
                "output": t.output,
            })).collect::<Vec<_>>(),
        }))?;
    } else {
        println!(
            "{}: {}{}{}",
            out.vm.name,
            out.vm.state,
            out.vm
                .reason
                .as_ref()
                .map(|r| format!(" ({})", printable(r)))
                .unwrap_or_default(),
            out.vm
                .fault
                .map(|f| format!(" [{f}'s fault]"))
                .unwrap_or_default()
        );
        for t in &out.tests {
            println!(
                "  {:<4} {}/{}  {:.1} s",
                t.status, t.suite, t.name, t.seconds
            );
        }
        if out.vm.state != VmState::Done && !out.serial_tail.is_empty() {
            println!("  serial console (last lines):");
            for l in out
                .serial_tail
                .lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
            {
                println!("    {}", printable(l));
            }
        }
    }
    Ok(if out.vm.state == VmState::Done && all_pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_INVALID)
    })
}
