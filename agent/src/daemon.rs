//! The agent as a daemon: opens the host's image repository, connects to libvirt, serves
//! the repository and VM routes, registers with the orchestrator and sends heartbeats
//! (reaping the domains of runs that are no longer live), until it is told to stop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use certo_proto::host::{HeartbeatReply, Registration};
use certo_transfer::{Repository, Token};

use crate::vms::Vms;

/// Everything the agent runs with: filled by `certo agent`'s flags, built by tests.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    pub listen: SocketAddr,
    /// The image repository directory (created if missing).
    pub repo: PathBuf,
    pub token: Token,
    /// This host's name (as `certo host add` made it).
    pub name: String,
    /// The libvirt connection VMs boot through.
    pub libvirt: String,
    pub slots: usize,
    pub memory_mib: u64,
    pub vcpus: u32,
    /// Where VM overlays, serial logs and boot assets live.
    pub vm_dir: PathBuf,
    /// The orchestrator to register with and send heartbeats to.
    pub orchestrator: Option<String>,
    /// The URL the orchestrator reaches this agent at (default: http://LISTEN-ADDRESS).
    pub advertise: Option<String>,
    pub heartbeat: Duration,
}

/// Why the agent could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("opening the image repository {path}: {source}")]
    Repository {
        path: PathBuf,
        source: certo_transfer::RepoError,
    },
    #[error("connecting to libvirt at {uri}: {source}")]
    Libvirt {
        uri: String,
        source: certo_hosts::hypervisor::HypervisorError,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("a background task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
    let what = what.into();
    move |source| AgentError::Io { what, source }
}

/// Runs the agent over libvirt at `settings.libvirt` until `shutdown` completes. `ready`
/// is called with the bound address once the repository and libvirt are ready, so whoever
/// waits for it never connects to an agent that is about to exit.
pub async fn run(
    settings: AgentSettings,
    ready: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let hv: Arc<dyn certo_hosts::hypervisor::Hypervisor> = {
        let uri = settings.libvirt.clone();
        Arc::new(
            tokio::task::spawn_blocking(move || {
                certo_hosts::hypervisor::LibvirtHypervisor::connect(&uri)
            })
            .await?
            .map_err(|source| AgentError::Libvirt {
                uri: settings.libvirt.clone(),
                source,
            })?,
        )
    };
    run_with(settings, hv, ready, shutdown).await
}

/// [`run`] over a given hypervisor (tests inject faults or simulated guests this way).
pub async fn run_with(
    settings: AgentSettings,
    hv: Arc<dyn certo_hosts::hypervisor::Hypervisor>,
    ready: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let repo_dir = settings.repo.clone();
    let (repo, report) = tokio::task::spawn_blocking(move || Repository::open(&repo_dir))
        .await?
        .map_err(|source| AgentError::Repository {
            path: settings.repo.clone(),
            source,
        })?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(io(format!("listening on {}", settings.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(io("reading the bound address"))?;
    tracing::info!(
        %addr,
        repo = %settings.repo.display(),
        blocks = report.blocks,
        images = report.images,
        "agent listening"
    );
    let repo = Arc::new(repo);
    std::fs::create_dir_all(&settings.vm_dir)
        .map_err(io(format!("creating {}", settings.vm_dir.display())))?;
    let vms = Arc::new(Vms::new(
        settings.name.clone(),
        hv,
        repo.clone(),
        settings.vm_dir.join("vms"),
        settings.vm_dir.join("boot"),
        settings.slots,
        settings.memory_mib,
        settings.vcpus,
        settings.token.secret().to_owned(),
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
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
    if let Some(orch) = settings.orchestrator.clone() {
        let advertise = settings
            .advertise
            .clone()
            .unwrap_or_else(|| format!("http://{addr}"));
        tokio::spawn(heartbeats(
            orch,
            settings.token.secret().to_owned(),
            Registration {
                agent_url: advertise,
                libvirt_uri: settings.libvirt.clone(),
                slots: i32::try_from(settings.slots).unwrap_or(i32::MAX),
                memory_mib: i64::try_from(settings.memory_mib).unwrap_or(i64::MAX),
                vcpus: i32::try_from(settings.vcpus).unwrap_or(i32::MAX),
            },
            vms.clone(),
            settings.heartbeat.max(Duration::from_millis(200)),
        ));
    }
    let router =
        certo_transfer::router(repo, settings.token.clone()).merge(crate::vms::router(vms));
    ready(addr);
    certo_transfer::server::serve(listener, router, async move {
        shutdown.await;
        tracing::info!("agent stopping");
    })
    .await
    .map_err(io("serving HTTP"))
}

/// Registers with the orchestrator (retrying), then sends heartbeats; each answer lists the
/// host's live VMs and every other domain of this agent is reaped.
async fn heartbeats(
    orchestrator: String,
    token: String,
    registration: Registration,
    vms: Arc<Vms>,
    every: Duration,
) {
    let http = reqwest::Client::new();
    let base = orchestrator.trim_end_matches('/').to_owned();
    let name = vms.name.clone();
    let mut registered = false;
    loop {
        if !registered {
            let body = serde_json::to_vec(&registration).unwrap_or_default();
            match http
                .post(format!("{base}/api/v1/hosts/{name}/register"))
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/json")
                .body(body)
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
                    match serde_json::from_slice::<HeartbeatReply>(&body) {
                        Ok(reply) => {
                            let v = vms.clone();
                            if let Ok(gone) =
                                tokio::task::spawn_blocking(move || v.reap(&reply.live_vms)).await
                                && !gone.is_empty()
                            {
                                tracing::info!(reaped = ?gone, "destroyed domains no live run owns");
                            }
                        }
                        Err(e) => {
                            tracing::warn!(host = %name, error = %e, "heartbeat answer unreadable: nothing reaped")
                        }
                    }
                }
                Ok(r) => tracing::warn!(host = %name, status = %r.status(), "heartbeat refused"),
                Err(e) => tracing::warn!(host = %name, error = %e, "heartbeat failed"),
            }
        }
        tokio::time::sleep(every).await;
    }
}
