//! `certo bench vm`: time from "boot requested" to "joined" and to "tests done" for VMs
//! under this host's hypervisor, one at a time and N at once, through the real agent,
//! transfer, libvirt, guest harness and PostgreSQL.

use certo_orchestrator::model::VmState;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::json;

use super::median;
use super::{Global, print_json};
use certo_orchestrator::vmrun::VmRequest;

#[derive(Debug, clap::Args)]
pub struct VmBenchArgs {
    /// The agent to boot on.
    #[arg(long)]
    pub agent: String,
    /// The image file (ext4) to boot.
    #[arg(long)]
    pub image: PathBuf,
    /// Its node type.
    #[arg(long, default_value = "glite-WN")]
    pub node_type: String,
    /// Runs per concurrency level (medians are reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Concurrency levels to measure, e.g. 1,2,3,4.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4")]
    pub parallel: Vec<usize>,
    /// The host's token (default: CERTO_TOKEN).
    #[arg(long, env = "CERTO_TOKEN", hide_env_values = true)]
    pub token: String,
    #[arg(long)]
    pub json: bool,
}

pub async fn run(g: &Global, a: VmBenchArgs) -> anyhow::Result<ExitCode> {
    let ctx = g.context()?;
    ctx.store().await?;
    let mut levels = Vec::new();
    let mut baseline_done = None;
    for &n in &a.parallel {
        let mut joined = Vec::new();
        let mut done = Vec::new();
        let mut failures = 0;
        for _ in 0..a.runs {
            let mut tasks = Vec::new();
            for _ in 0..n {
                let ctx = ctx.clone();
                let (agent, token, image, nt) = (
                    a.agent.clone(),
                    a.token.clone(),
                    a.image.clone(),
                    a.node_type.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    certo_orchestrator::app::vms::run(
                        &ctx,
                        &agent,
                        &token,
                        &VmRequest {
                            image: &image,
                            node_type: &nt,
                            patch: None,
                            suite: certo_orchestrator::model::Suite::Basic,
                            timeout: Duration::from_secs(600),
                            memory_mib: 384,
                            orchestrator: None,
                            fault: None,
                            index_cache: None,
                        },
                        &|_| {},
                    )
                    .await
                }));
            }
            for t in tasks {
                match t.await? {
                    Ok(o) if o.vm.state == VmState::Done => {
                        joined.extend(o.seconds_to_joined);
                        done.push(o.seconds_to_done);
                    }
                    Ok(o) => {
                        failures += 1;
                        tracing::warn!(vm = %o.vm.name, state = %o.vm.state, reason = ?o.vm.reason, "bench run did not finish");
                    }
                    Err(e) => {
                        failures += 1;
                        tracing::warn!(error = %e, "bench run failed");
                    }
                }
            }
        }
        let (mj, md) = (median(joined.clone()), median(done.clone()));
        let base = *baseline_done.get_or_insert(md);
        if !a.json {
            eprintln!(
                "{n} at once: boot→joined median {mj:.1} s, boot→tests done median {md:.1} s ({:.2}× one VM), {failures} failed",
                md / base
            );
        }
        levels.push(json!({
            "parallel": n, "runs": a.runs, "failures": failures,
            "joined_seconds": {"median": mj, "all": joined},
            "done_seconds": {"median": md, "all": done},
            "slowdown_vs_one": md / base,
        }));
    }
    let report = json!({"agent": a.agent, "image": a.image, "levels": levels});
    if a.json {
        print_json(&report)?;
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(ExitCode::SUCCESS)
}
