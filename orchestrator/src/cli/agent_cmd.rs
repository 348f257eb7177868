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
    // The first line on stdout tells scripts and tests where to connect.
    println!("listening on http://{addr}");
    let router = certo_transfer::router(Arc::new(repo), token);
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
