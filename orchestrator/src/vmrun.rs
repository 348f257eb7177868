//! One VM through its whole life, from the orchestrator's side: push the image to the
//! host's repository, boot it through the host's agent with a token made for this VM alone,
//! wait for the guest harness (join, results, done), the deadline, or the VM's end, record
//! the outcome with its reason, and always tear the VM down.

use crate::model::{Fault, HostVmState, PatchId, Suite, VmState};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use certo_proto::agent::{BootRequest, GuestSpec};
use chrono::Utc;
use serde::Serialize;

use crate::store::{NewVm, ProbeOutcomeKind, ResultRow, Store, StoreError, VmRow};

/// How long the agent may stay silent before a run is declared lost.
pub const AGENT_SILENCE: Duration = Duration::from_secs(8);

/// What the agent says about a VM (the agent protocol's message).
pub type AgentVm = certo_proto::agent::VmStatus;

/// A client of one agent's VM API (the host token authenticates).
#[derive(Debug, Clone)]
pub struct Agent {
    http: reqwest::Client,
    base: String,
    token: String,
}

/// Why a VM run could not be carried out (as opposed to how the VM ended, which is its
/// [`VmOutcome`]). [`VmRunError::is_refusal`] tells the caller's mistakes from Certo's and
/// the infrastructure's failures.
#[derive(Debug, thiserror::Error)]
pub enum VmRunError {
    /// The host's agent could not be reached, or refused or failed a request.
    #[error("agent {what}: {message}")]
    Agent { what: String, message: String },
    /// The agent presents a token the store holds another digest for.
    #[error("host {0} is registered with another token")]
    HostToken(String),
    /// The request itself cannot be carried out (an image file name, a URL).
    #[error("{0}")]
    Refused(String),
    #[error("pushing the image: {0}")]
    Transfer(#[from] certo_transfer::ClientError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("VM {0} vanished from the store")]
    Vanished(String),
}

impl VmRunError {
    /// Whether the caller's input was refused (retrying the same request will not help);
    /// otherwise the infrastructure or Certo itself failed.
    pub fn is_refusal(&self) -> bool {
        matches!(self, VmRunError::Refused(_) | VmRunError::HostToken(_))
    }
}

impl From<sqlx::Error> for VmRunError {
    fn from(e: sqlx::Error) -> Self {
        VmRunError::Store(StoreError::Db(e))
    }
}

fn agent_err(what: &str, e: impl std::fmt::Display) -> VmRunError {
    VmRunError::Agent {
        what: what.to_owned(),
        message: e.to_string(),
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmRunError {
    let what = what.into();
    move |source| VmRunError::Io { what, source }
}

type Result<T, E = VmRunError> = std::result::Result<T, E>;

impl Agent {
    pub fn new(base: &str, token: &str) -> Result<Self> {
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .map_err(|e| agent_err("client", e))?,
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
        })
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("authorization", format!("Bearer {}", self.token));
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let resp = req.send().await.map_err(|e| agent_err(path, e))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| agent_err(path, e))?;
        if !status.is_success() {
            return Err(agent_err(
                path,
                format!("{status}: {}", String::from_utf8_lossy(&bytes).trim()),
            ));
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| agent_err(path, format!("unreadable answer: {e}")))
    }

    /// The agent's name and capacity.
    pub async fn info(&self) -> Result<certo_proto::agent::HostInfo> {
        self.call(reqwest::Method::GET, "/v1/info", None).await
    }

    /// Runs the host's health check (it starts and destroys a domain of its own).
    pub async fn health(&self) -> Result<certo_proto::agent::HealthReport> {
        self.call(reqwest::Method::POST, "/v1/health", None).await
    }

    /// Boots a VM from a repository image.
    pub async fn boot(&self, spec: &BootRequest) -> Result<AgentVm> {
        self.call(
            reqwest::Method::POST,
            "/v1/vms",
            Some(serde_json::to_vec(spec).map_err(|e| agent_err("/v1/vms", e))?),
        )
        .await
    }

    /// The VM's state and the tail of its serial console.
    pub async fn status(&self, name: &str) -> Result<AgentVm> {
        self.call(reqwest::Method::GET, &format!("/v1/vms/{name}"), None)
            .await
    }

    /// Looks at one of the VM's TCP ports from outside the guest.
    pub async fn probe(&self, name: &str, port: u16) -> Result<certo_proto::agent::ProbeOutcome> {
        let path = format!("/v1/vms/{name}/probe");
        let body = serde_json::to_vec(&certo_proto::agent::ProbeRequest { port })
            .map_err(|e| agent_err(&path, e))?;
        self.call(reqwest::Method::POST, &path, Some(body)).await
    }

    /// Destroys the VM (its serial log stays).
    pub async fn destroy(&self, name: &str) -> Result<AgentVm> {
        self.call(reqwest::Method::DELETE, &format!("/v1/vms/{name}"), None)
            .await
    }

    /// Destroys the VM for a step holding `epoch`: the agent refuses it when it has seen a
    /// newer epoch for the VM's run and target.
    pub async fn destroy_at(&self, name: &str, epoch: i64) -> Result<AgentVm> {
        self.call(
            reqwest::Method::DELETE,
            &format!("/v1/vms/{name}?epoch={epoch}"),
            None,
        )
        .await
    }

    /// Pushes an image file to the host's repository (only the blocks it lacks).
    pub async fn push(
        &self,
        image: &Path,
        index_cache: Option<&Path>,
    ) -> Result<(String, certo_transfer::client::PushSummary)> {
        let name = image_name(image)?;
        let client = self.transfer_client(index_cache)?;
        let pushed = client
            .push(
                image,
                certo_transfer::client::PushOptions::new(name.clone()),
            )
            .await?;
        Ok((name, pushed))
    }

    /// What pushing the image would send: how many of its blocks the host holds.
    pub async fn plan(
        &self,
        image: &Path,
        index_cache: Option<&Path>,
    ) -> Result<certo_transfer::client::PlanSummary> {
        let client = self.transfer_client(index_cache)?;
        Ok(client
            .plan(image, certo_transfer::Chunking::default())
            .await?)
    }

    fn transfer_client(
        &self,
        index_cache: Option<&Path>,
    ) -> Result<certo_transfer::client::Client> {
        let mut client = certo_transfer::client::Client::new(
            &self.base,
            certo_transfer::Token::new(&self.token)
                .map_err(|e| VmRunError::Refused(format!("the host token: {e}")))?,
            certo_transfer::client::RetryPolicy::default(),
        )?;
        if let Some(dir) = index_cache {
            client = client.with_index_cache(certo_transfer::IndexCache::new(dir));
        }
        Ok(client)
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct VmRequest<'a> {
    pub image: &'a Path,
    pub node_type: &'a str,
    pub patch: Option<(PatchId, i32)>,
    pub suite: Suite,
    pub timeout: Duration,
    pub memory_mib: u32,
    /// An orchestrator already serving the guest API (`certo serve`); else one is served
    /// in-process for this run.
    pub orchestrator: Option<&'a str>,
    /// Fault injection for tests: `hang` or `panic`.
    pub fault: Option<&'a str>,
    /// The sender's index cache (an image pushed again is not hashed again).
    pub index_cache: Option<&'a Path>,
}

/// How a VM run ended.
#[derive(Debug, Clone, Serialize)]
pub struct VmOutcome {
    pub vm: VmRow,
    pub tests: Vec<ResultRow>,
    /// The harness's own log, as it streamed it.
    pub log: String,
    pub serial_tail: String,
    pub seconds_to_joined: Option<f64>,
    pub seconds_to_done: f64,
}

/// The address the guest should call back: 10.0.2.2 (QEMU's user network) when the agent
/// is on this machine's loopback, else this machine's address on the route to the agent.
pub fn callback_bind(agent_url: &str) -> Result<(SocketAddr, String)> {
    let url = reqwest::Url::parse(agent_url)
        .map_err(|e| VmRunError::Refused(format!("agent URL {agent_url:?}: {e}")))?;
    let host = url.host_str().unwrap_or("127.0.0.1").to_owned();
    let port = url.port_or_known_default().unwrap_or(80);
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").map_err(io("opening a UDP socket"))?;
    probe
        .connect((host.as_str(), port))
        .map_err(io(format!("finding the route to {host}:{port}")))?;
    let local = probe
        .local_addr()
        .map_err(io("reading the local address"))?
        .ip();
    if local.is_loopback() {
        Ok((SocketAddr::new(local, 0), "10.0.2.2".to_owned()))
    } else {
        Ok((SocketAddr::new(local, 0), local.to_string()))
    }
}

/// The URL a guest calls for the orchestrator at `orch`: loopback means the agent's
/// machine, which QEMU's user network shows the guest as 10.0.2.2.
pub fn guest_callback(orch: &str) -> Result<String> {
    let mut url = reqwest::Url::parse(orch)
        .map_err(|e| VmRunError::Refused(format!("orchestrator URL {orch:?}: {e}")))?;
    if url.host_str().is_some_and(|h| {
        h == "localhost"
            || h.parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }) {
        url.set_host(Some("10.0.2.2"))
            .map_err(|e| VmRunError::Refused(format!("orchestrator URL {orch:?}: {e}")))?;
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// Runs one VM to its end; the guest reports to `req.orchestrator` (the caller serves the
/// guest API there when it is its own: `certo vm run` without --orchestrator).
pub async fn run(
    store: &Store,
    agent_url: &str,
    token: &str,
    req: &VmRequest<'_>,
    say: &(dyn Fn(&str) + Sync),
) -> Result<VmOutcome> {
    let agent = Agent::new(agent_url, token)?;
    let info = agent.info().await?;
    let host = info.name;
    // The host's credential is the token the agent was started with.
    match store.host_token(&host).await? {
        None => {
            store
                .add_host(&host, &certo_proto::token::digest(token))
                .await?;
        }
        Some(stored) if stored == certo_proto::token::digest(token) => {}
        Some(_) => return Err(VmRunError::HostToken(host)),
    }
    let Some(orch) = req.orchestrator else {
        return Err(VmRunError::Refused(
            "no orchestrator for the guest to report to".into(),
        ));
    };
    let callback = guest_callback(orch)?;
    run_inner(store, &agent, &host, &callback, req, say).await
}

async fn run_inner(
    store: &Store,
    agent: &Agent,
    host: &str,
    callback: &str,
    req: &VmRequest<'_>,
    say: &(dyn Fn(&str) + Sync),
) -> Result<VmOutcome> {
    // 1. The image, into the host's repository (only the blocks it lacks).
    let image_name = image_name(req.image)?;
    say(&format!("pushing {} to {host}", req.image.display()));
    let mut client = certo_transfer::client::Client::new(
        agent_url_of(agent),
        certo_transfer::Token::new(&agent.token)
            .map_err(|e| VmRunError::Refused(format!("the host token: {e}")))?,
        certo_transfer::client::RetryPolicy::default(),
    )?;
    if let Some(dir) = req.index_cache {
        client = client.with_index_cache(certo_transfer::IndexCache::new(dir));
    }
    let pushed = client
        .push(
            req.image,
            certo_transfer::client::PushOptions::new(image_name.clone()),
        )
        .await?;
    say(&format!(
        "pushed: {} bytes sent, {} blocks reused",
        pushed.bytes_sent, pushed.blocks_reused
    ));
    // 2. The run, its name and its one-time token.
    let (next,): (i64,) = sqlx::query_as("SELECT nextval('vm_runs_id_seq')")
        .fetch_one(store.pool())
        .await?;
    let name = vm_name(next, req.node_type, 1);
    let token = certo_proto::token::new_token().map_err(io("making the VM's token"))?;
    let started = Instant::now();
    let deadline = Utc::now() + chrono::Duration::milliseconds(req.timeout.as_millis() as i64);
    let vm = store
        .create_vm(&NewVm {
            name: &name,
            host,
            image: &image_name,
            node_type: req.node_type,
            patch: req.patch,
            attempt: 1,
            suite: req.suite,
            token_sha256: &certo_proto::token::digest(&token),
            deadline,
        })
        .await?;
    let spec = BootRequest {
        name: name.clone(),
        image: image_name.clone(),
        memory_mib: u64::from(req.memory_mib),
        vcpus: 1,
        // The host's own deadline is a backstop a little after the orchestrator's.
        deadline_seconds: req.timeout.as_secs_f64() + 5.0,
        epoch: 0,
        guest: GuestSpec {
            url: callback.to_string(),
            vm: name.clone(),
            token: token.clone(),
            hang: req.fault == Some("hang"),
            panic: req.fault == Some("panic"),
            crash: req.fault == Some("crash"),
        },
    };
    say(&format!("booting {name} on {host}"));
    let booted = agent.boot(&spec).await;
    let booted = match booted {
        Ok(b) => b,
        Err(e) => {
            store
                .finish_vm(
                    vm.id,
                    VmState::Failed,
                    Some(Fault::Infrastructure),
                    Some(&format!("the host could not boot it: {e}")),
                    None,
                )
                .await?;
            return outcome(store, &name, String::new(), None, started).await;
        }
    };
    if let Some(log) = &booted.serial_log {
        store
            .set_serial_log(vm.id, &format!("{host}:{log}"))
            .await?;
    }
    // 3. Wait for the harness, the VM's end, or the deadline.
    let mut joined_at = None;
    let mut serial_tail = String::new();
    let mut agent_silent_since: Option<Instant> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let row = store
            .vm(&name)
            .await?
            .ok_or_else(|| VmRunError::Vanished(name.to_string()))?;
        if joined_at.is_none() && row.joined_at.is_some() {
            joined_at = Some(started.elapsed().as_secs_f64());
            say(&format!(
                "{name} joined as {}",
                row.hostname.clone().unwrap_or_default()
            ));
        }
        if !row.state.is_live() {
            break;
        }
        if row.state == VmState::Joined {
            look_at_services(store, agent, &row).await?;
        }
        let status = agent.status(&name).await.ok();
        if let Some(s) = &status {
            serial_tail = s.serial_tail.clone();
            agent_silent_since = None;
        } else {
            let since = *agent_silent_since.get_or_insert_with(Instant::now);
            if since.elapsed() > AGENT_SILENCE {
                // The host's agent is gone: the run is lost; a restarted agent reaps the
                // domain, since no live run owns it any more.
                let reason = format!(
                    "the host's agent stopped answering for {:.0} s{}",
                    AGENT_SILENCE.as_secs_f64(),
                    if row.state == VmState::Joined {
                        " after the guest joined"
                    } else {
                        ""
                    }
                );
                store
                    .finish_vm(
                        vm.id,
                        VmState::Lost,
                        Some(Fault::Infrastructure),
                        Some(&reason),
                        None,
                    )
                    .await?;
                break;
            }
        }
        let ended = status
            .as_ref()
            .is_some_and(|s| s.state != HostVmState::Running);
        let agent_timed_out = status
            .as_ref()
            .is_some_and(|s| s.state == HostVmState::TimedOut);
        if ended && !agent_timed_out {
            // The guest is gone without saying done: explain from its console.
            let (state, fault, reason) = explain_end(&row, &serial_tail);
            store
                .finish_vm(vm.id, state, Some(fault), Some(&reason), None)
                .await?;
            break;
        }
        if Utc::now() > deadline || agent_timed_out {
            let _ = agent.destroy(&name).await;
            let reason = format!(
                "no result by the deadline ({:.0} s): destroyed{}",
                req.timeout.as_secs_f64(),
                if row.state == VmState::Joined {
                    " after it joined"
                } else {
                    " before it joined"
                }
            );
            store
                .finish_vm(
                    vm.id,
                    VmState::TimedOut,
                    // A guest that never joined hung in boot; one that joined, in its tests.
                    Some(if row.state == VmState::Joined {
                        Fault::Product
                    } else {
                        Fault::Infrastructure
                    }),
                    Some(&reason),
                    None,
                )
                .await?;
            break;
        }
    }
    // 4. Teardown, always.
    match agent.destroy(&name).await {
        Ok(s) => {
            if !s.serial_tail.is_empty() {
                serial_tail = s.serial_tail;
            }
        }
        Err(e) => tracing::warn!(vm = %name, error = %e, "teardown request failed"),
    }
    outcome(store, &name, serial_tail, joined_at, started).await
}

/// The services the guest reported up, looked at from outside through the host's agent: the
/// guest's word is not evidence (a patch's code could say anything), what answers on the
/// port is. The guest's report waits for this (api::guest, `service`).
async fn look_at_services(store: &Store, agent: &Agent, vm: &VmRow) -> Result<()> {
    use certo_proto::agent::ProbeOutcome;
    for (service, port) in store.pending_probes(vm.id).await? {
        let mut probed = agent.probe(&vm.name, port).await;
        // A service that said nothing within the agent's wait may be one that waits to be
        // spoken to, or one in a guest too loaded to answer in time: look once more before
        // taking silence for its word.
        if matches!(&probed, Ok(ProbeOutcome::Answered { said }) if said.trim().is_empty()) {
            probed = agent.probe(&vm.name, port).await;
        }
        let (kind, evidence) = match probed {
            Ok(ProbeOutcome::Answered { said }) => (ProbeOutcomeKind::Answered, said),
            Ok(ProbeOutcome::Silent { why }) => (ProbeOutcomeKind::Silent, why),
            Ok(ProbeOutcome::Unverifiable { why }) => (ProbeOutcomeKind::Unverifiable, why),
            // The agent failed to look (not: looked and found nothing): no evidence.
            Err(e) => (ProbeOutcomeKind::Unverifiable, e.to_string()),
        };
        let evidence: String = evidence.replace('\0', "").chars().take(1024).collect();
        tracing::info!(vm = %vm.name, %service, port, outcome = kind.as_str(), "looked at a reported service from outside");
        store
            .record_probe(vm.id, &service, port, kind, &evidence)
            .await?;
    }
    Ok(())
}

/// Why a VM ended without its harness saying done, and whose fault it is: before the
/// guest joined, the infrastructure's (it did not come up); after, the product's (the
/// patch's code took the VM down).
pub fn explain_end(row: &VmRow, serial: &str) -> (VmState, Fault, String) {
    let fault = if row.state == VmState::Joined {
        Fault::Product
    } else {
        Fault::Infrastructure
    };
    let reason = if serial.contains("Kernel panic") {
        let line = serial
            .lines()
            .find(|l| l.contains("Kernel panic"))
            .unwrap_or("Kernel panic")
            .trim();
        format!("the guest kernel panicked: {line}")
    } else if row.state == VmState::Joined {
        "the harness stopped without reporting done (the VM powered off after joining)".to_owned()
    } else {
        "the VM ended before its harness joined the testbed".to_owned()
    };
    (VmState::Crashed, fault, reason)
}

async fn outcome(
    store: &Store,
    name: &str,
    serial_tail: String,
    joined: Option<f64>,
    started: Instant,
) -> Result<VmOutcome> {
    let vm = store
        .vm(name)
        .await?
        .ok_or_else(|| VmRunError::Vanished(name.to_string()))?;
    let tests = store.vm_results(vm.id).await?;
    let log = store.vm_log(vm.id).await?;
    Ok(VmOutcome {
        vm,
        tests,
        log,
        serial_tail,
        seconds_to_joined: joined,
        seconds_to_done: started.elapsed().as_secs_f64(),
    })
}

fn agent_url_of(agent: &Agent) -> &str {
    &agent.base
}

/// A repository image name from a file name: `[A-Za-z0-9._-]`, at most 128 characters.
fn image_name(path: &Path) -> Result<String> {
    let stem = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let parent = path
        .parent()
        .and_then(|p| p.file_name())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Imager artefacts are images/<id>/rootfs.ext4: name them by the id.
    let raw = if stem == "rootfs.ext4" && parent.len() == 64 {
        format!("img-{}", &parent[..32])
    } else {
        stem.trim_end_matches(".img").to_owned()
    };
    let name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(128)
        .collect();
    let name = name.trim_start_matches('.').to_owned();
    if name.is_empty() {
        return Err(VmRunError::Refused(format!(
            "cannot name an image after {}",
            path.display()
        )));
    }
    Ok(name)
}

/// `certo-r<RUN>-<target>-a<ATTEMPT>`: unique per run and attempt, so a retry never
/// collides and a restarted agent recognises its own domains.
pub fn vm_name(run: i64, target: &str, attempt: u32) -> String {
    certo_proto::domain::DomainName::new(run.max(0) as u64, target, attempt).to_string()
}

/// What a watching engine step waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Until {
    /// The guest harness joined the testbed.
    Joined,
    /// The harness moved past a suite (a result of another suite, or its end).
    SuiteDone(String),
    /// The harness said done, or the VM ended.
    Ended,
}

/// What one booted VM is asked for (an engine step's boot).
#[derive(Debug, Clone)]
pub struct Boot<'a> {
    pub name: &'a str,
    pub host: &'a str,
    pub image: &'a str,
    pub node_type: &'a str,
    pub patch: Option<(PatchId, i32)>,
    pub attempt: u32,
    pub suite: Suite,
    pub timeout: Duration,
    pub memory_mib: u32,
    /// The guest's URL for the orchestrator (see [`guest_callback`]).
    pub callback: &'a str,
    /// The fencing epoch of the step that boots (the agent refuses older ones).
    pub epoch: i64,
}

/// Boots a VM through its host's agent with a token made for it alone, recording the run;
/// the VM row ends failed (infrastructure) when the host cannot boot it.
pub async fn boot(store: &Store, agent: &Agent, b: &Boot<'_>) -> Result<VmRow> {
    let token = certo_proto::token::new_token().map_err(io("making the VM's token"))?;
    let deadline = Utc::now() + chrono::Duration::milliseconds(b.timeout.as_millis() as i64);
    let vm = store
        .create_vm(&NewVm {
            name: b.name,
            host: b.host,
            image: b.image,
            node_type: b.node_type,
            patch: b.patch,
            attempt: i32::try_from(b.attempt).unwrap_or(i32::MAX),
            suite: b.suite,
            token_sha256: &certo_proto::token::digest(&token),
            deadline,
        })
        .await?;
    let spec = BootRequest {
        name: b.name.to_owned(),
        image: b.image.to_owned(),
        memory_mib: u64::from(b.memory_mib),
        vcpus: 1,
        deadline_seconds: b.timeout.as_secs_f64() + 5.0,
        epoch: u64::try_from(b.epoch).unwrap_or(0),
        guest: GuestSpec {
            url: b.callback.to_owned(),
            vm: b.name.to_owned(),
            token,
            hang: false,
            panic: false,
            crash: false,
        },
    };
    match agent.boot(&spec).await {
        Ok(booted) => {
            if let Some(log) = &booted.serial_log {
                store
                    .set_serial_log(vm.id, &format!("{}:{log}", b.host))
                    .await?;
            }
            Ok(vm)
        }
        Err(e) => {
            store
                .finish_vm(
                    vm.id,
                    VmState::Failed,
                    Some(Fault::Infrastructure),
                    Some(&format!("the host could not boot it: {e}")),
                    None,
                )
                .await?;
            Err(e)
        }
    }
}

/// Watches a booted VM until `until` holds or the VM ends, doing what the one-shot run does
/// meanwhile: looking at reported services from outside, explaining a VM that ended without
/// its harness saying done, destroying it at its deadline, declaring it lost when its agent
/// stays silent. Returns the VM's row as it stands then.
pub async fn watch(store: &Store, agent: &Agent, name: &str, until: &Until) -> Result<VmRow> {
    let mut agent_silent_since: Option<Instant> = None;
    loop {
        let row = store
            .vm(name)
            .await?
            .ok_or_else(|| VmRunError::Vanished(name.to_string()))?;
        if !row.state.is_live() {
            return Ok(row);
        }
        match until {
            Until::Joined if row.joined_at.is_some() => return Ok(row),
            Until::SuiteDone(suite) => {
                let results = store.vm_results(row.id).await?;
                if results.iter().any(|r| &r.suite != suite) {
                    return Ok(row);
                }
            }
            _ => {}
        }
        if row.state == VmState::Joined {
            look_at_services(store, agent, &row).await?;
        }
        let status = agent.status(name).await.ok();
        match &status {
            Some(_) => agent_silent_since = None,
            None => {
                let since = *agent_silent_since.get_or_insert_with(Instant::now);
                if since.elapsed() > AGENT_SILENCE {
                    let reason = format!(
                        "the host's agent stopped answering for {:.0} s",
                        AGENT_SILENCE.as_secs_f64()
                    );
                    store
                        .finish_vm(
                            row.id,
                            VmState::Lost,
                            Some(Fault::Infrastructure),
                            Some(&reason),
                            None,
                        )
                        .await?;
                    continue;
                }
            }
        }
        let agent_timed_out = status
            .as_ref()
            .is_some_and(|s| s.state == HostVmState::TimedOut);
        if let Some(s) = &status
            && s.state != HostVmState::Running
            && !agent_timed_out
        {
            // Read the row again: the harness may have said done just before the VM ended.
            let again = store
                .vm(name)
                .await?
                .ok_or_else(|| VmRunError::Vanished(name.to_string()))?;
            if again.state.is_live() {
                let (state, fault, reason) = explain_end(&again, &s.serial_tail);
                store
                    .finish_vm(again.id, state, Some(fault), Some(&reason), None)
                    .await?;
            }
            continue;
        }
        if Utc::now() > row.deadline || agent_timed_out {
            let _ = agent.destroy(name).await;
            let reason = format!(
                "no result by the deadline: destroyed {}",
                if row.state == VmState::Joined {
                    "after it joined"
                } else {
                    "before it joined"
                }
            );
            store
                .finish_vm(
                    row.id,
                    VmState::TimedOut,
                    Some(if row.state == VmState::Joined {
                        Fault::Product
                    } else {
                        Fault::Infrastructure
                    }),
                    Some(&reason),
                    None,
                )
                .await?;
            continue;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
