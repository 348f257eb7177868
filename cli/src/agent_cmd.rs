//! `certo agent`: the host daemon (`certo-agent`): the host's image repository and VM
//! routes, registration and heartbeats.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use certo_agent::AgentSettings;
use certo_transfer::Token;
use clap::Args;

use super::Global;

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7310")]
    pub listen: SocketAddr,
    /// The image repository directory (created if missing).
    #[arg(long, value_name = "DIR")]
    pub repo: PathBuf,
    /// File holding this host's token (first line). Default: the CERTO_TOKEN variable.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// This host's name (as `certo host add` made it). Default: the machine's hostname.
    #[arg(long)]
    pub name: Option<String>,
    /// The libvirt connection VMs boot through (test:///default boots nothing: for tests).
    #[arg(long, default_value = "qemu:///system", value_name = "URI")]
    pub libvirt: String,
    /// VMs this host runs at once.
    #[arg(long, default_value_t = 2)]
    pub slots: usize,
    /// Memory (MiB) and vCPUs the host offers its VMs.
    #[arg(long, default_value_t = 4096)]
    pub memory_mib: u64,
    #[arg(long, default_value_t = 2)]
    pub vcpus: u32,
    /// Where VM overlays, serial logs and boot assets live (default: REPO/../NAME-vms).
    #[arg(long, value_name = "DIR")]
    pub vm_dir: Option<PathBuf>,
    /// The orchestrator to register with and send heartbeats to (`certo serve`).
    #[arg(long, value_name = "URL")]
    pub orchestrator: Option<String>,
    /// The URL the orchestrator reaches this agent at (default: http://LISTEN-ADDRESS).
    #[arg(long, value_name = "URL")]
    pub advertise: Option<String>,
    /// Seconds between heartbeats (and reaps of domains no live run owns).
    #[arg(long, default_value_t = 5.0)]
    pub heartbeat: f64,
}

pub async fn run(_g: &Global, args: AgentArgs) -> anyhow::Result<ExitCode> {
    let token = match &args.token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the token file {}", path.display()))?;
            let line = text.lines().next().unwrap_or("");
            Token::new(line)
                .map_err(|why| anyhow::anyhow!("token file {}: {why}", path.display()))?
        }
        None => match std::env::var("CERTO_TOKEN") {
            Ok(t) => Token::new(&t).map_err(|why| anyhow::anyhow!("CERTO_TOKEN: {why}"))?,
            Err(_) => bail!(
                "the agent needs a token: pass --token-file FILE or set CERTO_TOKEN \
                 (every request that changes the repository must present it)"
            ),
        },
    };
    let name = match &args.name {
        Some(n) => n.clone(),
        None => std::fs::read_to_string("/etc/hostname")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "host".to_owned()),
    };
    let vm_dir = args.vm_dir.clone().unwrap_or_else(|| {
        let base = args
            .repo
            .parent()
            .map(|p| p.to_path_buf())
            .unwrap_or_default();
        base.join(format!("{name}-vms"))
    });
    let settings = AgentSettings {
        listen: args.listen,
        repo: args.repo,
        token,
        name,
        libvirt: args.libvirt,
        slots: args.slots,
        memory_mib: args.memory_mib,
        vcpus: args.vcpus,
        vm_dir,
        orchestrator: args.orchestrator,
        advertise: args.advertise,
        heartbeat: std::time::Duration::from_secs_f64(args.heartbeat.max(0.2)),
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    // The first line on stdout tells scripts and tests where to connect.
    certo_agent::run(
        settings,
        |addr| println!("listening on http://{addr}"),
        shutdown,
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}
