//! `certo serve`, `certo host`, `certo testbed`: the orchestrator's API server and the
//! registries it keeps.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::{EXIT_INVALID, Global, print_json};
use certo_orchestrator::api::{self, ApiState};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks one; the address is printed).
    #[arg(long, default_value = "127.0.0.1:7300")]
    pub listen: SocketAddr,
    /// Seconds between health checks of the shared testbed services.
    #[arg(long, default_value_t = 10.0)]
    pub health_interval: f64,
    /// Seconds between health checks of quarantined hosts (a host that passes gets work
    /// again).
    #[arg(long, default_value_t = 60.0)]
    pub host_check_interval: f64,
    /// Seconds between looks for verdicts to deliver to the hooks (`certo hook`).
    #[arg(long, default_value_t = 2.0)]
    pub hook_interval: f64,
    /// Let anyone who reaches the server read the dashboard's pages without signing in
    /// (acting on a patch still needs a user's session).
    #[arg(long)]
    pub public_dashboard: bool,
}

pub async fn serve(g: &Global, a: ServeArgs) -> anyhow::Result<ExitCode> {
    let store = g.store().await?;
    // A long-running process: the embedded cluster is restarted if it dies under us.
    let supervisor = tokio::spawn(certo_orchestrator::store::supervise(
        store.clone(),
        g.location(),
        Duration::from_secs(1),
    ));
    let rechecks = tokio::spawn(certo_orchestrator::app::hosts::recheck_loop(
        g.context()?,
        store.clone(),
        Duration::from_secs_f64(a.host_check_interval.max(1.0)),
    ));
    let hooks = tokio::spawn(certo_orchestrator::app::hooks::deliver_loop(
        store.clone(),
        certo_orchestrator::app::hooks::DeliverySettings::default(),
        Duration::from_secs_f64(a.hook_interval.max(0.1)),
    ));
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("listening on {}", a.listen))?;
    let addr = listener.local_addr()?;
    println!("listening on http://{addr}");
    // One line on stdout, the address (scripts read it and may close the pipe); the rest
    // goes to stderr.
    eprintln!("dashboard: http://{addr}/matrix (sign in with a token from `certo user add`)");
    tracing::info!(%addr, "orchestrator API listening");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    let mut state = ApiState::full(g.context()?, store.clone());
    state.public_dashboard = a.public_dashboard;
    api::serve_router(
        listener,
        certo_orchestrator::web::router(state),
        store,
        Duration::from_secs_f64(a.health_interval.max(0.1)),
        shutdown,
    )
    .await?;
    supervisor.abort();
    rechecks.abort();
    hooks.abort();
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct HostArgs {
    #[command(subcommand)]
    pub command: HostCommand,
}

#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// Add a host and make its token (printed once; only its SHA-256 is stored).
    Add {
        /// Host name ([A-Za-z0-9][A-Za-z0-9._-]*, at most 63 characters).
        name: String,
        /// Write the token to this file (mode 0600) instead of printing it.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
    },
    /// List the hosts: registration, capacity, last heartbeat, quarantine.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Take a host out of placement, with the reason (it keeps its running VMs).
    Quarantine {
        name: String,
        #[arg(long)]
        reason: String,
    },
    /// Give a quarantined host work again.
    Release { name: String },
    /// Run the host's health check now (its agent starts and destroys a domain); a quarantined
    /// host that passes gets work again. Exit 0 healthy, 1 unhealthy.
    Check {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

fn valid_host_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphanumeric())
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

pub async fn host(g: &Global, a: HostArgs) -> anyhow::Result<ExitCode> {
    match a.command {
        HostCommand::Add { name, token_file } => {
            if !valid_host_name(&name) {
                eprintln!(
                    "error: host name {name:?}: use letters, digits, '.', '_' and '-', starting with a letter or digit, at most 63 characters"
                );
                return Ok(ExitCode::from(EXIT_INVALID));
            }
            let store = g.store().await?;
            let token = api::new_token()?;
            if !store.add_host(&name, &api::token_digest(&token)).await? {
                eprintln!("error: host {name} exists already");
                return Ok(ExitCode::from(EXIT_INVALID));
            }
            // The workers of this orchestrator call the host's agent with it.
            let kept = g.context()?.save_host_token(&name, &token)?;
            tracing::info!(host = %name, file = %kept.display(), "host token kept for the workers");
            match token_file {
                Some(path) => {
                    use std::io::Write;
                    use std::os::unix::fs::OpenOptionsExt;
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&path)
                        .with_context(|| format!("creating {}", path.display()))?;
                    writeln!(f, "{token}")?;
                    println!("host {name} added; its token is in {}", path.display());
                }
                None => println!("{token}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        HostCommand::Ls { json } => {
            let store = g.store().await?;
            let hosts = store.list_hosts().await?;
            if json {
                print_json(&hosts)?;
            } else {
                for h in hosts {
                    println!(
                        "{:<16} {:<28} slots {:>2}  {:>6} MiB  {:>2} vCPU  heartbeat {}",
                        h.name,
                        h.agent_url.unwrap_or_else(|| "(not registered)".into()),
                        h.slots.unwrap_or(0),
                        h.memory_mib.unwrap_or(0),
                        h.vcpus.unwrap_or(0),
                        h.last_heartbeat
                            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                            .unwrap_or_else(|| "never".into())
                    );
                    if let Some(why) = &h.quarantine_reason {
                        println!("{:<16} QUARANTINED: {}", "", super::printable(why));
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        HostCommand::Quarantine { name, reason } => {
            let store = g.store().await?;
            if !store.quarantine(&name, &reason).await? {
                eprintln!("error: no host {name}");
                return Ok(ExitCode::from(EXIT_INVALID));
            }
            println!("host {name} quarantined: no new work goes to it");
            Ok(ExitCode::SUCCESS)
        }
        HostCommand::Release { name } => {
            let store = g.store().await?;
            if !store.unquarantine(&name).await? {
                eprintln!("error: no host {name}");
                return Ok(ExitCode::from(EXIT_INVALID));
            }
            println!("host {name} gets work again");
            Ok(ExitCode::SUCCESS)
        }
        HostCommand::Check { name, json } => {
            let ctx = g.context()?;
            let store = ctx.store().await?;
            let checked = match certo_orchestrator::app::hosts::check(&ctx, store, &name).await {
                Ok(c) => c,
                Err(certo_orchestrator::app::AppError::NotFound(m)) => {
                    eprintln!("error: {m}");
                    return Ok(ExitCode::from(EXIT_INVALID));
                }
                Err(e) => return Err(e.into()),
            };
            if json {
                print_json(&checked)?;
            } else {
                println!("{}", super::printable(&checked.line()));
                for c in checked.report.iter().flat_map(|r| &r.checks) {
                    println!(
                        "  {} {:<13} {}",
                        if c.ok { "ok  " } else { "FAIL" },
                        c.check,
                        super::printable(&c.detail)
                    );
                }
            }
            Ok(if checked.healthy() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

#[derive(Debug, Args)]
pub struct TestbedArgs {
    #[command(subcommand)]
    pub command: TestbedCommand,
}

#[derive(Debug, Subcommand)]
pub enum TestbedCommand {
    /// List the testbed's services: shared ones and each patch slice's, with their health.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Add a shared long-running service (e.g. the top BDII every patch uses).
    Add {
        name: String,
        #[arg(long)]
        node_type: String,
        /// HOST:PORT the service answers on.
        #[arg(long)]
        endpoint: String,
    },
    /// Run one health-check round now.
    Check,
    /// Serve a shared top BDII (banner `dn: mds-vo-name=NAME,o=grid`, `GlueServiceUniqueID:
    /// NAME:PORT`) and register it as a shared service if it is not; the first stdout line
    /// is `listening on ADDR`, then one line per client line heard (nothing changes).
    ServeBdii {
        /// The top BDII's name, which the slices must not take over.
        #[arg(long, default_value = "testbed-bdii.certo")]
        name: String,
        /// Address to listen on (port 0 picks one; the address is printed).
        #[arg(long, default_value = "127.0.0.1:2170")]
        listen: SocketAddr,
        /// The endpoint to register (default: the address listened on).
        #[arg(long)]
        endpoint: Option<String>,
        /// The node type to register it as.
        #[arg(long, default_value = "glite-BDII")]
        node_type: String,
    },
}

pub async fn testbed(g: &Global, a: TestbedArgs) -> anyhow::Result<ExitCode> {
    let store = g.store().await?;
    match a.command {
        TestbedCommand::Ls { json } => {
            let services = store.services(None).await?;
            if json {
                print_json(&services)?;
            } else {
                for s in services {
                    println!(
                        "{:<20} {:<14} {:<28} {:<14} {}",
                        s.name,
                        s.node_type,
                        s.endpoint,
                        s.slice.unwrap_or_else(|| "shared".into()),
                        if s.healthy {
                            "healthy".to_owned()
                        } else {
                            format!("UNHEALTHY ({})", s.health_detail.unwrap_or_default())
                        }
                    );
                }
            }
        }
        TestbedCommand::Add {
            name,
            node_type,
            endpoint,
        } => {
            if endpoint.parse::<SocketAddr>().is_err() && !endpoint.contains(':') {
                eprintln!("error: endpoint {endpoint:?} is not HOST:PORT");
                return Ok(ExitCode::from(EXIT_INVALID));
            }
            match store
                .register_service(&name, &node_type, &endpoint, None, None)
                .await
            {
                Ok(id) => println!("shared service {name} ({node_type}) at {endpoint}: id {id}"),
                Err(e) => {
                    eprintln!("error: {e}");
                    return Ok(ExitCode::from(EXIT_INVALID));
                }
            }
        }
        TestbedCommand::ServeBdii {
            name,
            listen,
            endpoint,
            node_type,
        } => return serve_bdii(&store, &name, listen, endpoint, &node_type).await,
        TestbedCommand::Check => {
            api::check_health(&store).await?;
            for s in store.services(None).await? {
                println!(
                    "{:<20} {:<28} {}",
                    s.name,
                    s.endpoint,
                    if s.healthy { "healthy" } else { "UNHEALTHY" }
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `certo testbed serve-bdii`: serves the shared top BDII until SIGINT or SIGTERM.
async fn serve_bdii(
    store: &certo_orchestrator::store::Store,
    name: &str,
    listen: SocketAddr,
    endpoint: Option<String>,
    node_type: &str,
) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        eprintln!("error: name {name:?}: use letters, digits, '.', '_' and '-'");
        return Ok(ExitCode::from(EXIT_INVALID));
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let addr = listener.local_addr()?;
    let endpoint = endpoint.unwrap_or_else(|| addr.to_string());
    let shared = store.services(None).await?;
    match shared
        .iter()
        .find(|s| s.slice.is_none() && (s.name == name || s.endpoint == endpoint))
    {
        Some(s) if s.name == name && s.endpoint == endpoint => {}
        Some(s) if s.name == name => {
            store.set_service_endpoint(s.id, &endpoint).await?;
            tracing::info!(service = name, from = %s.endpoint, to = %endpoint, "shared service moved");
        }
        Some(s) => {
            eprintln!(
                "error: the shared service {} is registered at {endpoint} already; give another --endpoint",
                s.name
            );
            return Ok(ExitCode::from(EXIT_INVALID));
        }
        None => {
            store
                .register_service(name, node_type, &endpoint, None, None)
                .await?;
        }
    }
    println!("listening on {addr}");
    println!("shared service {name} ({node_type}) at {endpoint}");
    std::io::stdout().flush()?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    certo_orchestrator::testbed::shared::serve_top_bdii_with(
        listener,
        name,
        shutdown,
        |peer, line| {
            println!("heard {peer}: {line} (nothing changed)");
            let _ = std::io::stdout().flush();
        },
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}
