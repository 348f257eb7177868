//! The host agent's VM side: boot a VM from a repository image on the orchestrator's request,
//! watch it until it ends or its deadline passes, tear it down, and reap domains that no
//! live run owns. Routes (all behind the host's token):
//!
//! - `GET /v1/info`: the host's name, hypervisor and capacity
//! - `POST /v1/vms`: boot (JSON: name, image, memory_mib, vcpus, deadline_seconds, guest{url,vm,token})
//! - `GET /v1/vms/{name}`: state (`running`, `ended`, `timed_out`, `gone`) and serial tail
//! - `DELETE /v1/vms/{name}`: destroy (the serial log stays)
//! - `POST /v1/vms/{name}/probe`: look at one of the guest's TCP ports from outside (JSON
//!   `{port}`; answers `answered` with what the service said first, `silent`, or
//!   `unverifiable` where this host cannot reach the guest's ports)

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use certo_hosts::boot::{BootAssets, BootInputs};
use certo_hosts::domain_name::DomainName;
use certo_hosts::guest::GuestConfig;
use certo_hosts::hypervisor::{DomainSpec, Hypervisor, HypervisorKind, Network, Persistence};
use certo_proto::agent::{BootRequest, HealthCheck, HealthReport, HostInfo, HostVmState, VmStatus};
use certo_transfer::Repository;

/// What the agent knows of one VM it booted.
#[derive(Debug, Clone)]
struct Entry {
    serial_log: PathBuf,
    overlay: PathBuf,
    deadline: Instant,
    state: HostVmState,
}

/// The VM manager of one agent.
#[derive(Debug)]
pub struct Vms {
    pub name: String,
    pub slots: usize,
    pub memory_mib: u64,
    pub vcpus: u32,
    hv: Arc<dyn Hypervisor>,
    repo: Arc<Repository>,
    dir: PathBuf,
    assets_dir: PathBuf,
    assets: Mutex<Option<BootAssets>>,
    vms: Mutex<HashMap<String, Entry>>,
    /// Names being booted: they hold a slot until they run (then `vms` has them) or fail.
    /// Locked after `vms` when both are needed.
    starting: Mutex<HashSet<String>>,
    token: String,
    /// The newest engine epoch seen per run and target (a VM's every attempt): a request
    /// with an older one comes from a worker that lost its step, and is refused.
    epochs: Mutex<HashMap<(u64, String), u64>>,
    /// Boots per domain name.
    boots: Mutex<HashMap<String, u32>>,
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (status, body.into()).into_response()
}

fn tail(path: &std::path::Path, max: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let start = bytes.len().saturating_sub(max);
            String::from_utf8_lossy(&bytes[start..]).into_owned()
        }
        Err(_) => String::new(),
    }
}

/// A slot and a name held for a boot in progress; released when dropped (by then a
/// started VM has its entry in `vms`).
struct Reservation<'a> {
    vms: &'a Vms,
    name: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        // Hand over to the entry (if the VM started) under the same lock order.
        let _vms = self.vms.vms.lock();
        if let Ok(mut starting) = self.vms.starting.lock() {
            starting.remove(&self.name);
        }
    }
}

impl Vms {
    /// A manager over `hv`, booting images of `repo`; VM files live under `dir`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        hv: Arc<dyn Hypervisor>,
        repo: Arc<Repository>,
        dir: PathBuf,
        assets_dir: PathBuf,
        slots: usize,
        memory_mib: u64,
        vcpus: u32,
        token: String,
    ) -> Self {
        Self {
            name,
            slots,
            memory_mib,
            vcpus,
            hv,
            repo,
            dir,
            assets_dir,
            assets: Mutex::new(None),
            vms: Mutex::new(HashMap::new()),
            starting: Mutex::new(HashSet::new()),
            token,
            epochs: Mutex::new(HashMap::new()),
            boots: Mutex::new(HashMap::new()),
        }
    }

    /// The hypervisor.
    pub fn hypervisor(&self) -> &Arc<dyn Hypervisor> {
        &self.hv
    }

    fn boot_assets(&self) -> Result<(PathBuf, PathBuf), String> {
        if self.hv.kind() == HypervisorKind::Test {
            // libvirt's test driver boots nothing: it needs names, not a kernel.
            return Ok((
                self.dir.join("test-vmlinux"),
                self.dir.join("test-initramfs"),
            ));
        }
        let mut cached = self
            .assets
            .lock()
            .map_err(|_| "boot assets lock poisoned".to_owned())?;
        if cached.is_none() {
            let inputs = BootInputs::host().map_err(|e| e.to_string())?;
            *cached =
                Some(BootAssets::prepare(&self.assets_dir, &inputs).map_err(|e| e.to_string())?);
        }
        let a = cached.as_ref().ok_or_else(|| "no boot assets".to_owned())?;
        Ok((a.vmlinux.clone(), a.initramfs.clone()))
    }

    /// The health check: each thing a boot needs, tried for real. The domain started is a
    /// transient one of its own (`certo-health-…`, the guest kernel over a blank disk, no
    /// network), destroyed at once; it takes no slot (a host being checked runs no work).
    pub fn health(&self) -> HealthReport {
        let mut checks = Vec::new();
        let mut check = |name: &str, r: Result<String, String>| {
            let ok = r.is_ok();
            checks.push(HealthCheck {
                check: name.to_owned(),
                ok,
                detail: r.unwrap_or_else(|e| e),
            });
            ok
        };
        let listed = self
            .hv
            .list()
            .map(|d| format!("{} answers ({} domains)", self.hv.kind().as_str(), d.len()))
            .map_err(|e| format!("listing domains: {e}"));
        let hv_ok = check("hypervisor", listed);
        let probe_dir = self.dir.join(format!(".health-{}", std::process::id()));
        let storage = (|| {
            for dir in [self.repo.root(), self.dir.as_path()] {
                let f = dir.join(format!(".health-probe-{}", std::process::id()));
                std::fs::create_dir_all(dir)
                    .and_then(|()| std::fs::write(&f, b"certo health check\n"))
                    .and_then(|()| std::fs::File::open(&f)?.sync_all())
                    .map_err(|e| format!("writing {}: {e}", f.display()))?;
                let _ = std::fs::remove_file(&f);
            }
            Ok(format!(
                "{} and {} take files",
                self.repo.root().display(),
                self.dir.display()
            ))
        })();
        let storage_ok = check("storage", storage);
        let assets = self.boot_assets();
        let assets_ok = check(
            "boot assets",
            assets
                .as_ref()
                .map(|(k, i)| format!("{} and {}", k.display(), i.display()))
                .map_err(|e| e.clone()),
        );
        let start = if !(hv_ok && storage_ok && assets_ok) {
            Err("not tried: an earlier check failed".to_owned())
        } else {
            let (kernel, initramfs) = assets.unwrap_or_default();
            self.start_probe(&probe_dir, kernel, initramfs)
        };
        let _ = std::fs::remove_dir_all(&probe_dir);
        let start_ok = check("domain start", start);
        HealthReport {
            host: self.name.clone(),
            healthy: hv_ok && storage_ok && assets_ok && start_ok,
            checks,
        }
    }

    fn start_probe(
        &self,
        dir: &std::path::Path,
        kernel: PathBuf,
        initramfs: PathBuf,
    ) -> Result<String, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let base = dir.join("blank.img");
        let blank = std::fs::File::create(&base).and_then(|f| f.set_len(1 << 20));
        blank.map_err(|e| format!("creating {}: {e}", base.display()))?;
        let disk = dir.join("disk.qcow2");
        certo_hosts::overlay::create_overlay(&base, &disk).map_err(|e| e.to_string())?;
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let name = format!("certo-health-{}-{millis}", self.name);
        let spec = DomainSpec {
            name: name.clone(),
            memory_mib: 64,
            vcpus: 1,
            kernel,
            initramfs,
            cmdline: "console=ttyS0 panic=-1 certo.health=1".into(),
            root_disk: disk,
            base_image: Some(base),
            owner: Some(self.name.clone()),
            secret_file: None,
            serial_log: dir.join("serial.log"),
            network: Network::None,
        };
        let started = Instant::now();
        self.hv
            .start(&spec, Persistence::Transient)
            .map_err(|e| format!("starting {name}: {e}"))?;
        let took = started.elapsed();
        match self.hv.destroy(&name) {
            Ok(_) => Ok(format!(
                "{name} started in {:.0} ms and was destroyed",
                took.as_secs_f64() * 1000.0
            )),
            Err(e) => Err(format!("{name} started but could not be destroyed: {e}")),
        }
    }

    /// Reserves a slot and the name for a boot, atomically: counted against the slots
    /// with the running VMs, and refused if the name runs or is being started.
    fn reserve(&self, name: &str) -> Result<Reservation<'_>, (StatusCode, String)> {
        fn poisoned<T>(_: T) -> (StatusCode, String) {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "lock poisoned".to_owned(),
            )
        }
        let vms = self.vms.lock().map_err(poisoned)?;
        let mut starting = self.starting.lock().map_err(poisoned)?;
        let running = vms
            .values()
            .filter(|e| e.state == HostVmState::Running)
            .count();
        if starting.contains(name)
            || vms
                .get(name)
                .is_some_and(|e| e.state == HostVmState::Running)
        {
            return Err((StatusCode::CONFLICT, format!("{name} runs already")));
        }
        if running + starting.len() >= self.slots {
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                format!("all {} VM slots of {} are in use", self.slots, self.name),
            ));
        }
        starting.insert(name.to_owned());
        Ok(Reservation {
            vms: self,
            name: name.to_owned(),
        })
    }

    fn boot(&self, req: BootRequest) -> Result<VmStatus, (StatusCode, String)> {
        let bad = |m: String| (StatusCode::BAD_REQUEST, m);
        let parsed = DomainName::parse(&req.name)
            .ok_or_else(|| bad(format!("{:?} is not a Certo domain name", req.name)))?;
        if req.guest.vm != req.name {
            return Err(bad("guest.vm must be the domain name".into()));
        }
        if !(1.0..=86_400.0).contains(&req.deadline_seconds) {
            return Err(bad("deadline_seconds must be between 1 and 86400".into()));
        }
        if req.memory_mib < 64
            || req.memory_mib > self.memory_mib.max(64)
            || req.vcpus == 0
            || req.vcpus > self.vcpus.max(1)
        {
            return Err(bad(format!(
                "{} MiB and {} vCPUs do not fit this host ({} MiB, {} vCPUs)",
                req.memory_mib, req.vcpus, self.memory_mib, self.vcpus
            )));
        }
        self.fence(&parsed, req.epoch)?;
        // The slot and the name are taken in one step; the reservation is given back if
        // the boot fails, and becomes the VM's entry if it starts.
        let _reservation = self.reserve(&req.name)?;
        // The repository copy stays pristine: the VM writes to a qcow2 overlay of it.
        let image = self
            .repo
            .image_path(&req.image)
            .map_err(|e| bad(format!("image {:?}: {e}", req.image)))?;
        if !image.is_file() {
            self.repo.assemble(&req.image).map_err(|e| {
                (
                    StatusCode::NOT_FOUND,
                    format!("image {:?} is not in this repository: {e}", req.image),
                )
            })?;
        }
        let vm_dir = self.dir.join(&req.name);
        std::fs::create_dir_all(&vm_dir)
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let overlay = vm_dir.join("disk.qcow2");
        let serial = vm_dir.join("serial.log");
        let _ = std::fs::remove_file(&overlay);
        certo_hosts::overlay::create_overlay(&image, &overlay)
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let (kernel, initramfs) = self.boot_assets().map_err(|e| {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("boot assets: {e}"),
            )
        })?;
        let mut guest = GuestConfig::user_network(&req.guest.url, &req.guest.vm, &req.guest.token);
        // QEMU gets the token as a fw_cfg file, so it is on no command line and in no log.
        let secret_file = if matches!(self.hv.kind(), HypervisorKind::Qemu | HypervisorKind::Kvm) {
            let f = vm_dir.join("token");
            write_secret(&f, &req.guest.token).map_err(|e| {
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("writing the VM's token: {e}"),
                )
            })?;
            guest.token_in_fwcfg = true;
            Some(f)
        } else {
            None
        };
        guest.hang = req.guest.hang;
        guest.panic = req.guest.panic;
        guest.crash = req.guest.crash;
        let cmdline = guest.cmdline(self.hv.kind()).map_err(bad)?;
        let spec = DomainSpec {
            name: req.name.clone(),
            memory_mib: req.memory_mib,
            vcpus: req.vcpus,
            kernel,
            initramfs,
            cmdline,
            root_disk: overlay.clone(),
            base_image: Some(image.clone()),
            owner: Some(self.name.clone()),
            secret_file,
            serial_log: serial.clone(),
            network: if self.hv.kind() == HypervisorKind::Xen {
                Network::None
            } else {
                Network::User
            },
        };
        self.hv
            .start(&spec, Persistence::Transient)
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        tracing::info!(vm = %req.name, run = parsed.run, image = %req.image, "VM started");
        let entry = Entry {
            serial_log: serial.clone(),
            overlay,
            deadline: Instant::now() + Duration::from_secs_f64(req.deadline_seconds),
            state: HostVmState::Running,
        };
        if let Ok(mut vms) = self.vms.lock() {
            vms.insert(req.name.clone(), entry);
        }
        let boots = match self.boots.lock() {
            Ok(mut b) => {
                let n = b.entry(req.name.clone()).or_insert(0);
                *n += 1;
                *n
            }
            Err(_) => 0,
        };
        Ok(VmStatus {
            name: req.name,
            state: HostVmState::Running,
            serial_log: Some(serial.display().to_string()),
            serial_tail: String::new(),
            destroyed: None,
            boots,
        })
    }

    /// One watch round: ended domains are marked, overdue ones destroyed.
    pub fn watch_once(&self) {
        let names: Vec<(String, Instant)> = match self.vms.lock() {
            Ok(vms) => vms
                .iter()
                .filter(|(_, e)| e.state == HostVmState::Running)
                .map(|(n, e)| (n.clone(), e.deadline))
                .collect(),
            Err(_) => return,
        };
        for (name, deadline) in names {
            let state = self.hv.state(&name);
            let new_state = match state {
                Ok(None) => Some(HostVmState::Ended),
                Ok(Some(s)) if s.is_ended() => Some(HostVmState::Ended),
                Ok(Some(_)) if Instant::now() >= deadline => {
                    let _ = self.hv.destroy(&name);
                    tracing::warn!(vm = %name, "deadline passed: VM destroyed, serial log kept");
                    Some(HostVmState::TimedOut)
                }
                _ => None,
            };
            if let Some(s) = new_state
                && let Ok(mut vms) = self.vms.lock()
                && let Some(e) = vms.get_mut(&name)
            {
                e.state = s;
                let _ = std::fs::remove_file(&e.overlay);
                if let Some(dir) = e.overlay.parent() {
                    let _ = std::fs::remove_file(dir.join("token"));
                }
            }
        }
    }

    /// Refuses a request from an older epoch than the newest seen for the VM's run and
    /// target; remembers a newer one. Epoch 0 (no engine step) is not fenced.
    fn fence(&self, name: &DomainName, epoch: u64) -> Result<(), (StatusCode, String)> {
        if epoch == 0 {
            return Ok(());
        }
        let mut epochs = self.epochs.lock().map_err(|_| {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "epochs lock poisoned".to_owned(),
            )
        })?;
        let seen = epochs.entry((name.run, name.target.clone())).or_insert(0);
        if epoch < *seen {
            return Err((
                StatusCode::CONFLICT,
                format!(
                    "stale epoch {epoch} for run {} target {}: epoch {} acts for it now",
                    name.run, name.target, *seen
                ),
            ));
        }
        *seen = epoch;
        Ok(())
    }

    fn boots_of(&self, name: &str) -> u32 {
        self.boots
            .lock()
            .ok()
            .and_then(|b| b.get(name).copied())
            .unwrap_or(0)
    }

    fn status(&self, name: &str) -> VmStatus {
        let entry = self.vms.lock().ok().and_then(|v| v.get(name).cloned());
        let boots = self.boots_of(name);
        match entry {
            Some(e) => VmStatus {
                name: name.to_owned(),
                state: e.state,
                serial_log: Some(e.serial_log.display().to_string()),
                serial_tail: tail(&e.serial_log, 8192),
                destroyed: None,
                boots,
            },
            None => VmStatus {
                name: name.to_owned(),
                state: HostVmState::Gone,
                serial_log: None,
                serial_tail: String::new(),
                destroyed: None,
                boots,
            },
        }
    }

    fn destroy(&self, name: &str) -> Result<VmStatus, (StatusCode, String)> {
        let destroyed = match self.hv.destroy(name) {
            Ok(d) => d,
            // It ended between the lookup and the destroy: nothing left to tear down.
            Err(_) if matches!(self.hv.state(name), Ok(None)) => false,
            Err(e) => return Err((StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
        };
        if let Ok(mut vms) = self.vms.lock()
            && let Some(e) = vms.get_mut(name)
        {
            if e.state == HostVmState::Running {
                e.state = HostVmState::Ended;
            }
            let _ = std::fs::remove_file(&e.overlay);
            if let Some(dir) = e.overlay.parent() {
                let _ = std::fs::remove_file(dir.join("token"));
            }
        }
        tracing::info!(vm = name, destroyed, "VM torn down");
        Ok(VmStatus {
            destroyed: Some(destroyed),
            ..self.status(name)
        })
    }

    /// Whether a domain is this agent's: it booted it (its metadata names this agent).
    /// Several agents may share one hypervisor; each reaps only its own domains.
    fn owns(&self, d: &certo_hosts::hypervisor::DomainStatus) -> bool {
        DomainName::parse(&d.name).is_some() && d.owner.as_deref() == Some(self.name.as_str())
    }

    /// Destroys every domain of this agent whose run is not live (names from the
    /// orchestrator's heartbeat answer), through `certo_hosts::domain_name::reap_owned`.
    pub fn reap(&self, live: &[String]) -> Vec<String> {
        let runs: HashSet<u64> = live
            .iter()
            .filter_map(|n| DomainName::parse(n).map(|d| d.run))
            .collect();
        let gone = match certo_hosts::domain_name::reap_owned(self.hv.as_ref(), &self.name, &runs) {
            Ok(gone) => gone,
            Err(e) => {
                tracing::warn!(error = %e, "reaping domains no live run owns failed");
                return Vec::new();
            }
        };
        if let Ok(mut vms) = self.vms.lock() {
            for n in &gone {
                if let Some(e) = vms.get_mut(n) {
                    e.state = HostVmState::Ended;
                }
            }
        }
        gone
    }

    /// Adopts the running Certo domains after a restart (so their status can be asked).
    pub fn adopt_running(&self) {
        let Ok(list) = self.hv.list() else { return };
        for d in list.into_iter().filter(|d| self.owns(d)) {
            let serial = self
                .hv
                .serial_log(&d.name)
                .ok()
                .flatten()
                .unwrap_or_else(|| self.dir.join(&d.name).join("serial.log"));
            if let Ok(mut vms) = self.vms.lock() {
                vms.entry(d.name.clone()).or_insert(Entry {
                    serial_log: serial,
                    overlay: self.dir.join(&d.name).join("disk.qcow2"),
                    deadline: Instant::now() + Duration::from_secs(3600),
                    state: if d.state.is_ended() {
                        HostVmState::Ended
                    } else {
                        HostVmState::Running
                    },
                });
            }
        }
    }
}

/// The orchestrator, authenticated by this host's token. Every VM route takes one, so a
/// route cannot forget to authenticate, and it is checked before any body is read.
#[derive(Debug)]
struct HostCaller;

impl axum::extract::FromRequestParts<Arc<Vms>> for HostCaller {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        vms: &Arc<Vms>,
    ) -> Result<Self, Response> {
        let got = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(certo_proto::token::bearer)
            .unwrap_or("");
        if certo_proto::token::same(got.as_bytes(), vms.token.as_bytes()) {
            Ok(HostCaller)
        } else {
            Err(text(
                StatusCode::UNAUTHORIZED,
                "a valid host token is required\n",
            ))
        }
    }
}

/// The VM routes, to merge with the repository's.
pub fn router(vms: Arc<Vms>) -> Router {
    Router::new()
        .route("/v1/info", get(info))
        .route("/v1/health", axum::routing::post(health))
        .route("/v1/vms", axum::routing::post(boot))
        .route("/v1/vms/{name}", get(status).delete(destroy))
        .route("/v1/vms/{name}/probe", axum::routing::post(probe))
        .with_state(vms)
}

/// Runs a blocking VM operation and answers with its result.
async fn answer(
    ok: StatusCode,
    op: impl FnOnce() -> Result<VmStatus, (StatusCode, String)> + Send + 'static,
) -> Response {
    match tokio::task::spawn_blocking(op).await {
        Ok(Ok(status)) => (ok, axum::Json(status)).into_response(),
        Ok(Err((s, m))) => text(s, format!("{m}\n")),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

async fn info(State(v): State<Arc<Vms>>, _: HostCaller) -> Response {
    axum::Json(HostInfo {
        name: v.name.clone(),
        hypervisor: v.hv.kind().as_str().to_owned(),
        slots: v.slots,
        memory_mib: v.memory_mib,
        vcpus: v.vcpus,
    })
    .into_response()
}

async fn health(State(v): State<Arc<Vms>>, _: HostCaller) -> Response {
    match tokio::task::spawn_blocking(move || v.health()).await {
        Ok(report) => axum::Json(report).into_response(),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

async fn boot(State(v): State<Arc<Vms>>, _: HostCaller, body: axum::body::Bytes) -> Response {
    let req: BootRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("boot request: {e}\n")),
    };
    answer(StatusCode::CREATED, move || v.boot(req)).await
}

async fn status(State(v): State<Arc<Vms>>, _: HostCaller, Path(name): Path<String>) -> Response {
    let v2 = v.clone();
    let _ = tokio::task::spawn_blocking(move || v2.watch_once()).await;
    axum::Json(v.status(&name)).into_response()
}

async fn destroy(
    State(v): State<Arc<Vms>>,
    _: HostCaller,
    Path(name): Path<String>,
    axum::extract::Query(q): axum::extract::Query<HashMap<String, String>>,
) -> Response {
    let epoch = match q.get("epoch").map(|e| e.parse::<u64>()) {
        None => 0,
        Some(Ok(e)) => e,
        Some(Err(_)) => {
            return text(StatusCode::BAD_REQUEST, "epoch: not a number\n");
        }
    };
    let Some(parsed) = DomainName::parse(&name) else {
        return text(
            StatusCode::BAD_REQUEST,
            format!("{name:?} is not a Certo domain name\n"),
        );
    };
    if let Err((code, why)) = v.fence(&parsed, epoch) {
        return text(code, format!("{why}\n"));
    }
    answer(StatusCode::OK, move || v.destroy(&name)).await
}

/// How long a probe waits for a guest's service to speak.
const PROBE_WAIT: Duration = Duration::from_secs(3);

/// Looks at one of a running VM's ports from outside the guest: the evidence that a service
/// the guest reported is there, which no code inside the guest can forge.
async fn probe(
    State(v): State<Arc<Vms>>,
    _: HostCaller,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let req: certo_proto::agent::ProbeRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("probe request: {e}\n")),
    };
    if DomainName::parse(&name).is_none() {
        return text(
            StatusCode::BAD_REQUEST,
            format!("{name:?} is not a Certo domain name\n"),
        );
    }
    if req.port == 0 {
        return text(StatusCode::BAD_REQUEST, "port 0 is not a port\n");
    }
    if v.status(&name).state != HostVmState::Running {
        return text(
            StatusCode::CONFLICT,
            format!("{name} is not running on this host\n"),
        );
    }
    let hv = v.hv.clone();
    let probed = tokio::task::spawn_blocking(move || {
        hv.probe_tcp(
            &name,
            req.port,
            certo_proto::agent::PROBE_MAX_BYTES,
            PROBE_WAIT,
        )
    })
    .await;
    use certo_hosts::hypervisor::{HypervisorError, ProbeAnswer};
    use certo_proto::agent::ProbeOutcome;
    let outcome = match probed {
        Ok(Ok(ProbeAnswer::Answered { said })) => ProbeOutcome::Answered {
            said: String::from_utf8_lossy(&said).into_owned(),
        },
        Ok(Ok(ProbeAnswer::Silent { why })) => ProbeOutcome::Silent { why },
        Ok(Err(HypervisorError::Unsupported { message, .. })) => {
            ProbeOutcome::Unverifiable { why: message }
        }
        Ok(Err(e)) => return text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    };
    axum::Json(outcome).into_response()
}

/// Writes a VM's token readable by QEMU alone (mode 0400, owned by libvirt's QEMU user when
/// the host has one).
fn write_secret(path: &std::path::Path, token: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .open(path)?;
    f.write_all(token.as_bytes())?;
    if let Some((uid, gid)) = qemu_user() {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    }
    Ok(())
}

/// The uid and gid of libvirt's QEMU user (Debian: libvirt-qemu), from /etc/passwd.
fn qemu_user() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&"libvirt-qemu"))
            .then(|| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))?
    })
}
