//! `certo agent`: serves a host's image repository over HTTP (the host side of transfers).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use certo_transfer::{Repository, Token};
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
    let repo_dir = args.repo.clone();
    let (repo, report) = tokio::task::spawn_blocking(move || Repository::open(&repo_dir))
        .await?
        .with_context(|| format!("opening the image repository {}", args.repo.display()))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(
        %addr,
        repo = %args.repo.display(),
        blocks = report.blocks,
        images = report.images,
        "agent listening"
    );
    let repo = Arc::new(repo);
    let name = match &args.name {
        Some(n) => n.clone(),
        None => std::fs::read_to_string("/etc/hostname")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "host".to_owned()),
    };
    let hv: Arc<dyn certo_hosts::hypervisor::Hypervisor> = {
        let uri = args.libvirt.clone();
        Arc::new(
            tokio::task::spawn_blocking(move || {
                certo_hosts::hypervisor::LibvirtHypervisor::connect(&uri)
            })
            .await?
            .with_context(|| format!("connecting to libvirt at {}", args.libvirt))?,
        )
    };
    let vm_dir = args.vm_dir.clone().unwrap_or_else(|| {
        let base = args
            .repo
            .parent()
            .map(|p| p.to_path_buf())
            .unwrap_or_default();
        base.join(format!("{name}-vms"))
    });
    std::fs::create_dir_all(&vm_dir).with_context(|| format!("creating {}", vm_dir.display()))?;
    let vms = Arc::new(crate::agent_vms::Vms::new(
        name.clone(),
        hv,
        repo.clone(),
        vm_dir.join("vms"),
        vm_dir.join("boot"),
        args.slots,
        args.memory_mib,
        args.vcpus,
        token.secret().to_owned(),
    ));
    {
        let v = vms.clone();
        tokio::task::spawn_blocking(move || v.adopt_running()).await?;
    }
    // Watch VMs: mark ended ones, destroy overdue ones.
    {
        let v = vms.clone();
        tokio::spawn(async move {
            loop {
                let v2 = v.clone();
                let _ = tokio::task::spawn_blocking(move || v2.watch_once()).await;
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        });
    }
    if let Some(orch) = args.orchestrator.clone() {
        let advertise = args
            .advertise
            .clone()
            .unwrap_or_else(|| format!("http://{addr}"));
        tokio::spawn(heartbeats(
            orch,
            name.clone(),
            token.secret().to_owned(),
            advertise,
            args.libvirt.clone(),
            vms.clone(),
            std::time::Duration::from_secs_f64(args.heartbeat.max(0.2)),
        ));
    }
    let router = certo_transfer::router(repo, token).merge(crate::agent_vms::router(vms));
    // The first line on stdout tells scripts and tests where to connect; it is printed only
    // once everything the agent needs (repository, libvirt) is ready, so a waiting script
    // never connects to an agent that is about to exit.
    println!("listening on http://{addr}");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("agent stopping");
    };
    certo_transfer::server::serve(listener, router, shutdown)
        .await
        .context("serving HTTP")?;
    Ok(ExitCode::SUCCESS)
}

/// Registers with the orchestrator (retrying), then sends heartbeats; each answer lists the
/// host's live VMs and every other Certo domain is reaped.
async fn heartbeats(
    orchestrator: String,
    name: String,
    token: String,
    advertise: String,
    libvirt: String,
    vms: Arc<crate::agent_vms::Vms>,
    every: std::time::Duration,
) {
    let http = reqwest::Client::new();
    let base = orchestrator.trim_end_matches('/').to_owned();
    let mut registered = false;
    loop {
        if !registered {
            let body = serde_json::json!({
                "agent_url": advertise, "libvirt_uri": libvirt, "slots": vms.slots,
                "memory_mib": vms.memory_mib, "vcpus": vms.vcpus,
            });
            match http
                .post(format!("{base}/api/v1/hosts/{name}/register"))
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => {
                    registered = true;
                    tracing::info!(host = %name, orchestrator = %base, "registered");
                }
                Ok(r) => tracing::warn!(host = %name, status = %r.status(), "registration refused"),
                Err(e) => tracing::warn!(host = %name, error = %e, "orchestrator unreachable"),
            }
        }
        if registered {
            let answer = http
                .post(format!("{base}/api/v1/hosts/{name}/heartbeat"))
                .header("authorization", format!("Bearer {token}"))
                .send()
                .await;
            match answer {
                Ok(r) if r.status().is_success() => {
                    let body = r.bytes().await.unwrap_or_default();
                    let live: Vec<String> = serde_json::from_slice::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| serde_json::from_value(v["live_vms"].clone()).ok())
                        .unwrap_or_default();
                    let v = vms.clone();
                    if let Ok(gone) = tokio::task::spawn_blocking(move || v.reap(&live)).await
                        && !gone.is_empty()
                    {
                        tracing::info!(reaped = ?gone, "destroyed domains no live run owns");
                    }
                }
                Ok(r) => tracing::warn!(host = %name, status = %r.status(), "heartbeat refused"),
                Err(e) => tracing::warn!(host = %name, error = %e, "heartbeat failed"),
            }
        }
        tokio::time::sleep(every).await;
    }
}
