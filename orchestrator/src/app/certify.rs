//! The steps of the certification workflow (`workflows/certify.yaml`), as a worker runs
//! them: the application's operations (images, VM runs, verdicts) as the engine's handler. Each step reads what the steps before it left (their outputs in the store), acts,
//! and says how it ended; the worker's retry policy and the store's fencing do the rest.
//!
//! - `plan`: the run's targets (made at submission) and the patches in flight it conflicts
//!   with.
//! - `build`: the target's image with the patch, and the same image without it (the
//!   baseline), from the layer cache where their inputs are unchanged. A package that does
//!   not install or configure rejects the target at `install` / `configure`.
//! - `baseline`: the baseline image's test results, cached per image digest; measured on a
//!   VM when the cache has none.
//! - `place`: a host with a free slot, preferring the one that holds most of the image's
//!   blocks; the slot is held until teardown.
//! - `transfer`: the blocks the host lacks.
//! - `boot`: the VM, under an intent recorded first (the domain name: run, target,
//!   attempt); a recovering worker asks the agent about the intent before booting again.
//!   Waits for the guest to join: a guest silent before joining is the infrastructure's.
//! - `join`: the guest's reported services, looked at from outside.
//! - `basic`, `regression`: each test against the baseline's result: failing with the patch
//!   where it passes without it rejects; failing on both is a known baseline failure.
//! - `bugs`: an attached bug's regression test must fail on the baseline and pass with the
//!   patch.
//! - `teardown`: every domain of the target destroyed, its slot given back (always runs).
//! - `verdict`: one verdict row for the run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::patches::split_target;
use super::{AppError, Context};
use crate::engine::verdict;
use crate::engine::worker::{Handler, StepCtx, StepFuture, StepOutput};
use crate::engine::workflow::{FailureClass, Workflow};
use crate::model::{PatchId, Suite, TestStatus, VmState};
use crate::patch::PatchRecord;
use crate::store::engine::VerdictRow;
use crate::store::{ResultRow, Store, StoreError};
use crate::vmrun::{self, Agent, Boot, Until, VmRequest, VmRunError};

/// How long a host's last heartbeat may be old for the host to get work.
pub const HOST_FRESH: Duration = Duration::from_secs(30);

/// The certification steps' settings.
#[derive(Debug, Clone)]
pub struct CertifySettings {
    /// The orchestrator URL guests call (`certo serve`), as the worker reaches it.
    pub orchestrator: String,
    /// Memory per VM.
    pub memory_mib: u32,
    /// How long a VM may take from boot to the harness's done.
    pub vm_timeout: Duration,
}

/// The certification workflow's step handler.
#[derive(Debug, Clone)]
pub struct Certify {
    pub(super) ctx: Context,
    pub(super) settings: CertifySettings,
    workflow: Workflow,
    pub(super) nightly: Workflow,
}

/// A failure the patch caused: rejects the target at `stage`.
fn product(stage: &str, reason: impl Into<String>) -> StepOutput {
    StepOutput::Failed {
        class: FailureClass::Product,
        detail: json!({"stage": stage, "reason": reason.into()}),
    }
}

pub(super) fn infra(reason: impl Into<String>) -> StepOutput {
    StepOutput::failed(FailureClass::Infrastructure, reason)
}

/// An infrastructure failure on `host` (the retry goes elsewhere when it can).
pub(super) fn infra_on(host: &str, reason: impl Into<String>) -> StepOutput {
    StepOutput::Failed {
        class: FailureClass::Infrastructure,
        detail: json!({"reason": reason.into(), "host": host}),
    }
}

/// A placement candidate: (blocks held, free slots, spread), host, agent URL, detail.
type Candidate = ((i64, i64, u64), String, String, Value);

/// Certo's own failure while running a step (the store, a file): retried as infrastructure.
#[derive(Debug, thiserror::Error)]
pub(super) enum StepError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    App(#[from] AppError),
    #[error(transparent)]
    Vm(#[from] VmRunError),
    #[error("{0}")]
    Other(String),
}

pub(super) type Result<T, E = StepError> = std::result::Result<T, E>;

impl Certify {
    pub fn new(ctx: Context, settings: CertifySettings) -> Certify {
        Certify {
            ctx,
            settings,
            workflow: Workflow::certify(),
            nightly: Workflow::nightly(),
        }
    }

    async fn step(&self, s: &StepCtx) -> Result<StepOutput> {
        let store = &s.store;
        let run = store
            .run(s.claim.run)
            .await?
            .ok_or_else(|| StepError::Other(format!("run {} vanished", s.claim.run)))?;
        let record = match (run.patch_id, run.revision) {
            (Some(id), Some(rev)) => store
                .get_patch(id as u64, Some(rev as u32))
                .await?
                .map(|p| p.record),
            _ => None,
        };
        if run.workflow == self.nightly.name {
            return self.sweep_step(s, &run).await;
        }
        let Some(record) = record else {
            return Ok(infra(format!("run {} has no stored patch record", run.id)));
        };
        let target = &s.claim.target;
        match s.claim.name.as_str() {
            "plan" => Ok(StepOutput::Passed(json!({
                "targets": run.targets,
                "conflicts": [],
            }))),
            "build" => self.build(target, Some(&record)).await,
            "baseline" => self.baseline(s, target, &record).await,
            "place" => self.place(s, target).await,
            "transfer" => self.transfer(s, target).await,
            "boot" => self.boot(s, target, Some(&record)).await,
            "join" => self.join(s, target).await,
            "basic" => self.suite(s, target, "basic").await,
            "regression" => self.suite(s, target, "regression").await,
            "bugs" => self.bugs(s, target, &record).await,
            "teardown" => self.teardown(s, target).await,
            "combined" => self.combined(s, target, &record, &run).await,
            "verdict" => self.verdict(s).await,
            other => Ok(infra(format!("the certify workflow has no step {other}"))),
        }
    }

    fn agent(&self, host: &str, url: &str) -> Result<Agent> {
        let token = self.ctx.host_token(host)?;
        Ok(Agent::new(url, &token)?)
    }

    pub(super) async fn output(&self, s: &StepCtx, target: &str, name: &str) -> Result<Value> {
        s.store
            .step_output(s.claim.run, target, name)
            .await?
            .ok_or_else(|| StepError::Other(format!("step {name} of {target} left no output")))
    }

    /// The host holding the target's slot (placement, or where a retry moved it) and a
    /// client of its agent.
    pub(super) async fn agent_of(&self, s: &StepCtx, target: &str) -> Result<(String, Agent)> {
        let host = match s.store.placement(s.claim.run, target).await? {
            Some(h) => h,
            None => str_of(&self.output(s, target, "place").await?, "host"),
        };
        let url = host_url(&s.store, &host).await?;
        let agent = self.agent(&host, &url)?;
        Ok((host, agent))
    }

    /// After an infrastructure failure on `host`, the next attempt goes to another host when
    /// one has a free slot: the slot moves and the image is pushed there. Returns the host
    /// and the repository image name to use.
    async fn move_after_failure(
        &self,
        s: &StepCtx,
        target: &str,
        host: &str,
        image_name: String,
    ) -> Result<Result<(String, Agent, String), StepOutput>> {
        let failed_here = s
            .store
            .last_retry_host(s.claim.step)
            .await?
            .is_some_and(|h| h == host);
        let agent = self.agent(host, &host_url(&s.store, host).await?)?;
        if !failed_here {
            return Ok(Ok((host.to_owned(), agent, image_name)));
        }
        let build = self.output(s, target, "build").await?;
        let image = PathBuf::from(str_of(&build["image"], "path"));
        let picked = match self
            .pick_host(&s.store, &image, &[host.to_owned()], s.claim.step)
            .await
        {
            Ok(Some(p)) => p,
            // No other host can take it now: try again where it is.
            _ => return Ok(Ok((host.to_owned(), agent, image_name))),
        };
        let (other, url, _) = picked;
        s.store.release_slot(s.claim.run, target).await?;
        if s.store
            .reserve_slot(s.claim.run, target, &other)
            .await?
            .as_deref()
            != Some(other.as_str())
        {
            // Raced for the slot: keep the old host (its slot is taken back).
            s.store.reserve_slot(s.claim.run, target, host).await?;
            return Ok(Ok((host.to_owned(), agent, image_name)));
        }
        let moved = self.agent(&other, &url)?;
        tracing::info!(run = s.claim.run, %target, from = %host, to = %other, "retrying on another host");
        match moved.push(&image, Some(&self.index_cache())).await {
            Ok((name, _)) => Ok(Ok((other, moved, name))),
            Err(e) => {
                let _ = s.store.host_failed(&other, &e.to_string()).await?;
                Ok(Err(StepOutput::Failed {
                    class: FailureClass::Infrastructure,
                    detail: json!({"reason": format!("pushing the image to {other}: {e}"), "host": other}),
                }))
            }
        }
    }

    /// The target's patch image and its baseline; without a record (a sweep), the baseline
    /// alone, as both.
    pub(super) async fn build(
        &self,
        target: &str,
        record: Option<&PatchRecord>,
    ) -> Result<StepOutput> {
        let (release, platform, node_type) = split_target(target);
        // The first use builds the package repositories of the fixture world: not on the
        // async threads.
        let ctx = self.ctx.clone();
        tokio::task::spawn_blocking(move || ctx.imager())
            .await
            .map_err(|e| StepError::Other(e.to_string()))??;
        let started = Instant::now();
        let mut out = json!({});
        for (key, patch) in [("image", record), ("baseline", None)] {
            if key == "image" && patch.is_none() {
                continue;
            }
            let req = match super::images::request(&self.ctx, release, platform, node_type, patch) {
                Ok(r) => r,
                Err(e) => return Ok(product("install", e.to_string())),
            };
            let built =
                super::images::build(&self.ctx, &req, &[certo_imager::Format::Ext4], |_| {})
                    .await?;
            match built {
                Ok(b) => {
                    let path = b
                        .image
                        .ext4()
                        .map(|a| a.path.display().to_string())
                        .unwrap_or_default();
                    out[key] = json!({
                        "digest": b.image.digest,
                        "path": path,
                        "cached": b.image_cached,
                        "layers": b.layers.iter().map(|(l, o)| json!({
                            "digest": l.digest,
                            "outcome": match o { certo_imager::LayerOutcome::Cached => "cached", _ => "built" },
                        })).collect::<Vec<_>>(),
                    });
                }
                Err(e) => {
                    use certo_imager::Phase;
                    let in_patch = e.layer == Some(certo_imager::LayerKind::Patch);
                    let stage = match e.phase {
                        Phase::Configure => "configure",
                        Phase::Testbed => "testbed",
                        _ => "install",
                    };
                    // Fetch: the record names where its packages are; if Certo cannot take
                    // them from there, the patch cannot be installed as written.
                    let product_phase = matches!(
                        e.phase,
                        Phase::Fetch
                            | Phase::Resolve
                            | Phase::Unpack
                            | Phase::Script
                            | Phase::Install
                            | Phase::Configure
                            | Phase::Testbed
                    );
                    if patch.is_some() && in_patch && product_phase {
                        return Ok(StepOutput::Failed {
                            class: FailureClass::Product,
                            detail: json!({"stage": stage, "reason": e.to_string(),
                                           "package": e.package, "log_tail": e.log_tail}),
                        });
                    }
                    return Ok(StepOutput::Failed {
                        class: FailureClass::Infrastructure,
                        detail: json!({"reason": format!("the {} image: {e}", if patch.is_some() { "patch" } else { "baseline" }),
                                       "log_tail": e.log_tail}),
                    });
                }
            }
        }
        if record.is_none() {
            out["image"] = out["baseline"].clone();
        }
        out["seconds"] = json!(started.elapsed().as_secs_f64());
        Ok(StepOutput::Passed(out))
    }

    /// Picks a host for `image`: fresh, not quarantined, with a free slot, holding most of
    /// the image's blocks (ties: most free slots, then a choice spread by `spread_key`, the
    /// step). `Ok(None)`: every live host is full.
    async fn pick_host(
        &self,
        store: &Store,
        image: &Path,
        avoid: &[String],
        spread_key: i64,
    ) -> Result<Option<(String, String, Value)>, StepOutput> {
        let hosts = store.list_hosts().await.map_err(|e| infra(e.to_string()))?;
        let held = store.held_slots().await.map_err(|e| infra(e.to_string()))?;
        let now = chrono::Utc::now();
        let live: Vec<_> = hosts
            .into_iter()
            .filter(|h| h.agent_url.is_some() && h.quarantined_at.is_none())
            .filter(|h| {
                h.last_heartbeat
                    .is_some_and(|t| (now - t).to_std().unwrap_or_default() < HOST_FRESH)
            })
            .filter(|h| !avoid.contains(&h.name))
            .collect();
        if live.is_empty() {
            return Err(infra(
                "no host is up: no registered agent sent a heartbeat in the last 30 s (or every one is quarantined)",
            ));
        }
        // Every candidate's transfer plan at once (each asks its agent which blocks it holds).
        let mut plans = tokio::task::JoinSet::new();
        for h in &live {
            let free = i64::from(h.slots.unwrap_or(0)) - held.get(&h.name).copied().unwrap_or(0);
            if free <= 0 {
                continue;
            }
            let url = h.agent_url.clone().unwrap_or_default();
            let Ok(agent) = self.agent(&h.name, &url) else {
                continue;
            };
            let (name, image, cache) = (h.name.clone(), image.to_owned(), self.index_cache());
            plans.spawn(async move {
                let plan = agent.plan(&image, Some(&cache)).await;
                (name, url, free, plan)
            });
        }
        // Most blocks held first, then most free slots; among equals, a choice that differs
        // from target to target (placements made at once do not all fall on one host).
        let mut best: Option<Candidate> = None;
        while let Some(joined) = plans.join_next().await {
            let Ok((name, url, free, plan)) = joined else {
                continue;
            };
            let (reused, distinct) = match plan {
                Ok(p) => (p.blocks_reused as i64, p.blocks_distinct as i64),
                Err(e) => {
                    tracing::warn!(host = %name, error = %e, "cannot plan a transfer to the host");
                    continue;
                }
            };
            let spread = {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                (spread_key, &name).hash(&mut h);
                h.finish()
            };
            let key = (reused, free, spread);
            if best.as_ref().is_none_or(|b| key > b.0) {
                best = Some((
                    key,
                    name,
                    url,
                    json!({"blocks_held": reused, "blocks": distinct, "free_slots": free}),
                ));
            }
        }
        Ok(best.map(|(_, name, url, v)| (name, url, v)))
    }

    fn index_cache(&self) -> PathBuf {
        self.ctx.data_dir().join("index-cache")
    }

    pub(super) async fn place(&self, s: &StepCtx, target: &str) -> Result<StepOutput> {
        let build = self.output(s, target, "build").await?;
        let image = PathBuf::from(str_of(&build["image"], "path"));
        if let Some(host) = s.store.placement(s.claim.run, target).await? {
            // A recovering worker: the slot is held already.
            let url = host_url(&s.store, &host).await?;
            return Ok(StepOutput::Passed(json!({"host": host, "agent": url})));
        }
        let picked = match self.pick_host(&s.store, &image, &[], s.claim.step).await {
            Ok(p) => p,
            Err(out) => return Ok(out),
        };
        let Some((host, url, mut detail)) = picked else {
            return Ok(StepOutput::Defer {
                after: Duration::from_secs(2),
                why: json!({"reason": "every host's slots are in use"}),
            });
        };
        match s.store.reserve_slot(s.claim.run, target, &host).await? {
            Some(h) if h == host => {
                s.store.set_step_host(&s.claim, &host).await?;
                detail["host"] = json!(host);
                detail["agent"] = json!(url);
                Ok(StepOutput::Passed(detail))
            }
            _ => Ok(StepOutput::Defer {
                after: Duration::from_millis(500),
                why: json!({"reason": format!("host {host}'s last slot went to another target")}),
            }),
        }
    }

    pub(super) async fn transfer(&self, s: &StepCtx, target: &str) -> Result<StepOutput> {
        let build = self.output(s, target, "build").await?;
        let image = PathBuf::from(str_of(&build["image"], "path"));
        let (host, agent) = self.agent_of(s, target).await?;
        s.store.set_step_host(&s.claim, &host).await?;
        let started = Instant::now();
        match agent.push(&image, Some(&self.index_cache())).await {
            Ok((name, pushed)) => {
                s.store.host_worked(&host).await?;
                Ok(StepOutput::Passed(json!({
                    "host": host, "image": name, "bytes_sent": pushed.bytes_sent,
                    "bytes_total": pushed.bytes_total,
                    "blocks_reused": pushed.blocks_reused,
                    "seconds": started.elapsed().as_secs_f64(),
                })))
            }
            Err(e) => {
                let q = s.store.host_failed(&host, &e.to_string()).await?;
                Ok(infra(format!(
                    "pushing the image to {host}: {e}{}",
                    if q { " (host quarantined)" } else { "" }
                )))
            }
        }
    }

    pub(super) async fn boot(
        &self,
        s: &StepCtx,
        target: &str,
        record: Option<&PatchRecord>,
    ) -> Result<StepOutput> {
        let (host, _) = self.agent_of(s, target).await?;
        let transfer = self.output(s, target, "transfer").await?;
        let (host, agent, image) = match self
            .move_after_failure(s, target, &host, str_of(&transfer, "image"))
            .await?
        {
            Ok(moved) => moved,
            Err(out) => return Ok(out),
        };
        s.store.set_step_host(&s.claim, &host).await?;
        // Recovery: an earlier attempt of this step recorded an intent. A domain that still
        // runs with a live run is adopted; anything else is destroyed before booting anew.
        for (key, on) in s.store.intents(s.claim.step).await? {
            let row = s.store.vm(&key).await?;
            let status = agent.status(&key).await.ok();
            let running = status
                .as_ref()
                .is_some_and(|st| st.state == crate::model::HostVmState::Running);
            if on == host
                && running
                && let Some(row) = row.as_ref().filter(|r| r.state.is_live())
            {
                tracing::info!(vm = %key, "recovering the boot step: the VM runs, adopting it");
                let row = vmrun::watch(&s.store, &agent, &row.name, &Until::Joined).await?;
                return Ok(self.joined_or_not(&row, &host));
            }
            if let Ok(a) = self.agent(&on, &host_url(&s.store, &on).await?) {
                let _ = a.destroy_at(&key, s.claim.epoch).await;
            }
            if let Some(r) = row.filter(|r| r.state.is_live()) {
                s.store
                    .finish_vm(
                        r.id,
                        VmState::Lost,
                        Some(crate::model::Fault::Infrastructure),
                        Some("its boot step was taken over by another worker"),
                        None,
                    )
                    .await?;
            }
        }
        let name = vmrun::vm_name(s.claim.run, target, s.claim.attempt.max(1) as u32);
        if !s.store.record_intent(&s.claim, &name, &host).await? {
            return Ok(infra("the step's claim is stale (another worker holds it)"));
        }
        let (_, _, node_type) = split_target(target);
        let callback = vmrun::guest_callback(&self.settings.orchestrator)?;
        let booted = vmrun::boot(
            &s.store,
            &agent,
            &Boot {
                name: &name,
                host: &host,
                image: &image,
                node_type,
                patch: record.map(|r| (PatchId(r.id), r.revision as i32)),
                attempt: s.claim.attempt.max(1) as u32,
                suite: Suite::All,
                timeout: self.settings.vm_timeout,
                memory_mib: self.settings.memory_mib,
                callback: &callback,
                epoch: s.claim.epoch,
            },
        )
        .await;
        if let Err(e) = booted {
            let q = s.store.host_failed(&host, &e.to_string()).await?;
            return Ok(StepOutput::Failed {
                class: FailureClass::Infrastructure,
                detail: json!({
                    "reason": format!("{host} could not boot {name}: {e}{}", if q { " (host quarantined)" } else { "" }),
                    "host": host,
                }),
            });
        }
        let row = vmrun::watch(&s.store, &agent, &name, &Until::Joined).await?;
        if row.joined_at.is_none() {
            // A guest silent before joining: the host's fault as far as we can tell.
            s.store.host_failed(&host, "a guest did not join").await?;
        } else {
            s.store.host_worked(&host).await?;
        }
        Ok(self.joined_or_not(&row, &host))
    }

    fn joined_or_not(&self, row: &crate::store::VmRow, host: &str) -> StepOutput {
        if row.joined_at.is_some() {
            StepOutput::Passed(json!({
                "vm": row.name, "host": host, "hostname": row.hostname,
                "seconds_to_join": row.joined_at.map(|j| (j - row.requested_at).num_milliseconds() as f64 / 1000.0),
            }))
        } else {
            StepOutput::Failed {
                class: FailureClass::Infrastructure,
                detail: json!({
                    "reason": format!(
                        "{} did not join the testbed: {}",
                        row.name,
                        row.reason.clone().unwrap_or_else(|| row.state.to_string())
                    ),
                    "host": host,
                }),
            }
        }
    }

    /// Whether the VM's slice tried to take over a shared testbed service: a registration
    /// the guest API refused, or a service that announces a shared one's identity when looked
    /// at from outside — at join, and again now (a patch's service may take a port over after
    /// the first look). `Some(output)`: rejected at `testbed`, naming the service.
    async fn testbed_check(
        &self,
        s: &StepCtx,
        agent: &Agent,
        row: &crate::store::VmRow,
    ) -> Result<Option<StepOutput>> {
        if let Some(line) = row
            .reason
            .as_deref()
            .and_then(crate::testbed::refused_registration)
        {
            return Ok(Some(product("testbed", format!("{}: {line}", row.name))));
        }
        let shared: Vec<_> = s
            .store
            .services(None)
            .await?
            .into_iter()
            .filter(|sv| sv.slice.is_none())
            .collect();
        if shared.is_empty() {
            return Ok(None);
        }
        for (service, port, evidence) in s.store.answered_probes(row.id).await? {
            let mut said = vec![evidence];
            if row.state.is_live()
                && let Ok(certo_proto::agent::ProbeOutcome::Answered { said: now }) =
                    agent.probe(&row.name, port).await
            {
                said.push(now);
            }
            for e in &said {
                if let Some(line) = crate::testbed::takeover(&service, port, e, &shared) {
                    return Ok(Some(product("testbed", format!("{}: {line}", row.name))));
                }
            }
        }
        Ok(None)
    }

    async fn join(&self, s: &StepCtx, target: &str) -> Result<StepOutput> {
        let boot = self.output(s, target, "boot").await?;
        let (host, agent) = self.agent_of(s, target).await?;
        s.store.set_step_host(&s.claim, &host).await?;
        let name = str_of(&boot, "vm");
        // The harness reports its services, then runs the tests: the first result (or the
        // end) means the services are reported and looked at.
        let row = vmrun::watch(&s.store, &agent, &name, &Until::SuiteDone(String::new())).await?;
        if let Some(out) = self.testbed_check(s, &agent, &row).await? {
            return Ok(out);
        }
        let services = s.store.services(None).await?;
        let mine: Vec<Value> = services
            .iter()
            .filter(|sv| sv.owner_vm == Some(row.id))
            .map(|sv| json!({"name": sv.name, "endpoint": sv.endpoint}))
            .collect();
        if !row.state.is_live() && row.state != VmState::Done {
            let reason = row.reason.clone().unwrap_or_default();
            if reason.contains("cannot report: service") {
                return Ok(product(
                    "join",
                    format!("{name}: a service the harness reported is not there: {reason}"),
                ));
            }
            if row.fault == Some(crate::model::Fault::Product) {
                return Ok(product("join", format!("{name}: {reason}")));
            }
            return Ok(infra(format!("{name} ended while joining: {reason}")));
        }
        Ok(StepOutput::Passed(json!({"vm": name, "services": mine})))
    }

    pub(super) async fn baseline_of(
        &self,
        store: &Store,
        digest: &str,
    ) -> Result<BTreeMap<String, String>> {
        Ok(store
            .baseline_results(digest)
            .await?
            .into_iter()
            .map(|(suite, name, status)| (format!("{suite}/{name}"), status))
            .collect())
    }

    async fn baseline(
        &self,
        s: &StepCtx,
        target: &str,
        record: &PatchRecord,
    ) -> Result<StepOutput> {
        let _ = record;
        let build = self.output(s, target, "build").await?;
        let digest = str_of(&build["baseline"], "digest");
        let known = self.baseline_of(&s.store, &digest).await?;
        if !known.is_empty() {
            return Ok(StepOutput::Passed(
                json!({"digest": digest, "cached": true, "tests": known.len()}),
            ));
        }
        // Measure it: a VM of the baseline image, on a slot of its own.
        let image = PathBuf::from(str_of(&build["baseline"], "path"));
        let key = format!("{target}#baseline");
        let host = match self.slot_for(s, &key, &image).await? {
            Ok(h) => h,
            Err(out) => return Ok(out),
        };
        let (_, _, node_type) = split_target(target);
        let out = self.run_self_contained(s, &host, &image, node_type).await;
        s.store.release_slot(s.claim.run, &key).await?;
        let out = match out {
            Ok(o) => o,
            Err(e) => return Ok(infra_on(&host, format!("the baseline VM on {host}: {e}"))),
        };
        if out.vm.state != VmState::Done || out.tests.is_empty() {
            if out.vm.fault == Some(crate::model::Fault::Infrastructure) {
                s.store.host_failed(&host, "a baseline VM failed").await?;
            }
            return Ok(infra_on(
                &host,
                format!(
                    "the baseline VM {} ended {} before reporting its tests: {}",
                    out.vm.name,
                    out.vm.state,
                    out.vm.reason.unwrap_or_default()
                ),
            ));
        }
        let rows: Vec<(String, String, String, String)> = out
            .tests
            .iter()
            .map(|t| {
                (
                    t.suite.clone(),
                    t.name.clone(),
                    t.status.to_string(),
                    t.output.clone(),
                )
            })
            .collect();
        s.store
            .record_baseline_results(&digest, &out.vm.name, &rows)
            .await?;
        Ok(StepOutput::Passed(json!({
            "digest": digest, "cached": false, "tests": rows.len(), "vm": out.vm.name,
        })))
    }

    async fn suite(&self, s: &StepCtx, target: &str, suite: &str) -> Result<StepOutput> {
        let boot = self.output(s, target, "boot").await?;
        let build = self.output(s, target, "build").await?;
        let (host, agent) = self.agent_of(s, target).await?;
        s.store.set_step_host(&s.claim, &host).await?;
        let name = str_of(&boot, "vm");
        let until = if suite == "basic" {
            Until::SuiteDone("basic".into())
        } else {
            Until::Ended
        };
        let row = vmrun::watch(&s.store, &agent, &name, &until).await?;
        // A takeover of the testbed explains failing tests: it comes first.
        if let Some(out) = self.testbed_check(s, &agent, &row).await? {
            return Ok(out);
        }
        let results = s.store.vm_results(row.id).await?;
        let baseline = self
            .baseline_of(&s.store, &str_of(&build["baseline"], "digest"))
            .await?;
        let mine: Vec<&ResultRow> = results.iter().filter(|r| r.suite == suite).collect();
        let mut known = Vec::new();
        let mut regressions = Vec::new();
        for r in &mine {
            if r.status == TestStatus::Pass {
                continue;
            }
            let key = format!("{}/{}", r.suite, r.name);
            if baseline.get(&key).is_some_and(|b| b != "pass") {
                known.push(key);
            } else {
                regressions.push((key, first_line(&r.output)));
            }
        }
        let tests: Vec<Value> = mine
            .iter()
            .map(|r| json!({"name": r.name, "status": r.status.to_string(), "seconds": r.seconds}))
            .collect();
        if let Some((key, line)) = regressions.first() {
            return Ok(StepOutput::Failed {
                class: FailureClass::Product,
                detail: json!({
                    "stage": suite,
                    "reason": format!("{key} fails with the patch and passes on the baseline: {line}"),
                    "tests": tests, "known_failures": known,
                    "regressions": regressions.iter().map(|(k, _)| k).collect::<Vec<_>>(),
                }),
            });
        }
        let ended_badly = !row.state.is_live() && row.state != VmState::Done;
        let suite_ran = !mine.is_empty();
        if ended_badly && (suite == "regression" || !suite_ran) {
            let reason = row.reason.clone().unwrap_or_default();
            if row.fault == Some(crate::model::Fault::Product) {
                return Ok(product(suite, format!("{name}: {reason}")));
            }
            return Ok(infra(format!(
                "{name} ended during the {suite} suite: {reason}"
            )));
        }
        // A node type may have no test in a suite (the UI has no regression test): the
        // harness said so and finished; that is not a failure.
        Ok(StepOutput::Passed(json!({
            "vm": name, "tests": tests, "known_failures": known,
            "note": (!suite_ran).then(|| format!("{target} has no {suite} test")),
        })))
    }

    async fn bugs(&self, s: &StepCtx, target: &str, record: &PatchRecord) -> Result<StepOutput> {
        let boot = self.output(s, target, "boot").await?;
        let build = self.output(s, target, "build").await?;
        let name = str_of(&boot, "vm");
        let row = s
            .store
            .vm(&name)
            .await?
            .ok_or_else(|| StepError::Other(format!("VM {name} vanished")))?;
        let results = s.store.vm_results(row.id).await?;
        let baseline = self
            .baseline_of(&s.store, &str_of(&build["baseline"], "digest"))
            .await?;
        let mut bugs = Vec::new();
        let mut not_fixed = None;
        for bug in &record.bugs {
            let test = bug
                .regression_test
                .clone()
                .unwrap_or_else(|| format!("bug{}", bug.id));
            // Named as the record likes: `bug40410`, `regression/bug40410`,
            // `glite-LB/bug40410`, `bug40410.sh`: the test is the last part.
            let test = test
                .rsplit('/')
                .next()
                .unwrap_or(&test)
                .trim_end_matches(".sh")
                .to_owned();
            let key = format!("regression/{test}");
            let with = results
                .iter()
                .find(|r| r.suite == "regression" && r.name == test)
                .map(|r| r.status.to_string());
            let without = baseline.get(&key).cloned();
            let (fixed, evidence) = match (without.as_deref(), with.as_deref()) {
                (None, None) => (
                    Value::Null,
                    format!("not verified: {target} has no regression test {test}"),
                ),
                (Some(b), Some("pass")) if b != "pass" => (
                    json!(true),
                    format!("{key}: fail on baseline, pass with the patch"),
                ),
                (_, Some(w)) if w != "pass" => {
                    not_fixed.get_or_insert(format!(
                        "bug {} is not fixed: {key} fails with the patch{}",
                        bug.id,
                        if without.as_deref().is_some_and(|b| b != "pass") {
                            " as on the baseline"
                        } else {
                            ""
                        }
                    ));
                    (
                        json!(false),
                        format!(
                            "{key}: {} on baseline, {w} with the patch",
                            without.as_deref().unwrap_or("not run")
                        ),
                    )
                }
                (b, w) => (
                    Value::Null,
                    format!(
                        "not verified: {key} {} on the baseline and {} with the patch",
                        b.unwrap_or("did not run"),
                        w.unwrap_or("did not run")
                    ),
                ),
            };
            bugs.push(
                json!({"id": bug.id, "fixed": fixed, "evidence": evidence, "target": target}),
            );
        }
        if let Some(reason) = not_fixed {
            return Ok(StepOutput::Failed {
                class: FailureClass::Product,
                detail: json!({"stage": "bug", "reason": reason, "bugs": bugs}),
            });
        }
        Ok(StepOutput::Passed(json!({"bugs": bugs})))
    }

    /// The patch on top of the earlier patches in flight it conflicts with on this target:
    /// the combination must install and pass the tests this patch passes alone. Patches
    /// that fail alone on the target are left out (their own runs say why).
    async fn combined(
        &self,
        s: &StepCtx,
        target: &str,
        record: &PatchRecord,
        run: &crate::store::engine::RunRow,
    ) -> Result<StepOutput> {
        let (release, platform, node_type) = split_target(target);
        let mut earlier = Vec::new();
        let mut skipped = Vec::new();
        for c in run.conflicts.as_array().into_iter().flatten() {
            let on_target = c["platforms"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| p == platform));
            if !on_target {
                continue;
            }
            let (Some(pid), Some(rev)) = (c["patch"].as_u64(), c["revision"].as_u64()) else {
                continue;
            };
            let Some(row) = s.store.get_patch(pid, Some(rev as u32)).await? else {
                continue;
            };
            // An earlier patch that fails alone here is not this patch's conflict.
            if let Some(other) = super::runs::latest(&s.store, pid, Some(rev as u32)).await? {
                let v = super::runs::view(&s.store, &other).await?;
                let failed_alone = v["targets"].as_array().into_iter().flatten().any(|t| {
                    t["platform"] == platform
                        && t["node_type"] == node_type
                        && t["outcome"] == "failed"
                });
                if failed_alone {
                    skipped.push(format!("{pid} r{rev} (fails alone)"));
                    continue;
                }
            }
            earlier.push(row.record);
        }
        if earlier.is_empty() {
            return Ok(StepOutput::Passed(
                json!({"checked": false, "skipped": skipped}),
            ));
        }
        let names: Vec<String> = earlier
            .iter()
            .map(|r| format!("{} r{}", r.id, r.revision))
            .collect();
        let with = names.join(", ");
        // Earlier patches first, this one on top: a file named twice is one file; the same
        // package in two versions cannot be both.
        let mut merged = record.clone();
        merged.packages.clear();
        merged.config_changes.clear();
        for r in earlier.iter().chain(std::iter::once(record)) {
            for p in &r.packages {
                if !merged.packages.iter().any(|q| q.file == p.file) {
                    merged.packages.push(p.clone());
                }
            }
            for c in &r.config_changes {
                merged
                    .config_changes
                    .retain(|d| !(d.file == c.file && d.key == c.key));
                merged.config_changes.push(c.clone());
            }
        }
        let req =
            match super::images::request(&self.ctx, release, platform, node_type, Some(&merged)) {
                Ok(r) => r,
                Err(e) => {
                    return Ok(product(
                        "conflict",
                        format!(
                            "conflicts with patch {with}: the combined image cannot be made: {e}"
                        ),
                    ));
                }
            };
        // Of the packages that install on this platform, one name in two files is two
        // versions of one package: they cannot both be installed.
        let mut seen = BTreeMap::new();
        for p in req.patch.iter().flat_map(|l| l.packages.iter()) {
            if let Some(other) = seen.insert(p.name.clone(), p.file.clone()) {
                return Ok(product(
                    "conflict",
                    format!(
                        "conflicts with patch {with}: the combined image fails at install: {} and {} are two versions of {} and cannot be installed together",
                        other, p.file, p.name
                    ),
                ));
            }
        }
        let built =
            super::images::build(&self.ctx, &req, &[certo_imager::Format::Ext4], |_| {}).await?;
        let image = match built {
            Ok(b) => b.image.ext4().map(|a| a.path.clone()).unwrap_or_default(),
            Err(e) if e.layer == Some(certo_imager::LayerKind::Patch) => {
                return Ok(product(
                    "conflict",
                    format!(
                        "conflicts with patch {with}: the combined image fails at {}: {e}",
                        e.phase.as_str()
                    ),
                ));
            }
            Err(e) => return Ok(infra(format!("the combined image: {e}"))),
        };
        // Its tests, against this patch's own.
        let boot = self.output(s, target, "boot").await?;
        let alone = match s.store.vm(&str_of(&boot, "vm")).await? {
            Some(row) => s.store.vm_results(row.id).await?,
            None => Vec::new(),
        };
        let key = format!("{target}#combined");
        let host = match self.slot_for(s, &key, &image).await? {
            Ok(h) => h,
            Err(out) => return Ok(out),
        };
        let out = self.run_self_contained(s, &host, &image, node_type).await;
        s.store.release_slot(s.claim.run, &key).await?;
        let out = match out {
            Ok(o) => o,
            Err(e) => return Ok(infra_on(&host, format!("the combined VM on {host}: {e}"))),
        };
        for t in &out.tests {
            let passed_alone = alone
                .iter()
                .any(|a| a.suite == t.suite && a.name == t.name && a.status == TestStatus::Pass);
            if t.status != TestStatus::Pass && passed_alone {
                return Ok(product(
                    "conflict",
                    format!(
                        "conflicts with patch {with}: {}/{} fails on the combination and passes with this patch alone: {}",
                        t.suite,
                        t.name,
                        first_line(&t.output)
                    ),
                ));
            }
        }
        if out.vm.state != VmState::Done {
            return Ok(infra(format!(
                "the combined VM {} ended {}: {}",
                out.vm.name,
                out.vm.state,
                out.vm.reason.clone().unwrap_or_default()
            )));
        }
        Ok(StepOutput::Passed(
            json!({"checked": true, "with": names, "skipped": skipped, "vm": out.vm.name}),
        ))
    }

    /// A slot for a self-contained VM of a step (baseline, combination): the one it holds,
    /// or a new one; `Err(output)` to defer or fail the step.
    async fn slot_for(
        &self,
        s: &StepCtx,
        key: &str,
        image: &Path,
    ) -> Result<Result<String, StepOutput>> {
        if let Some(h) = s.store.placement(s.claim.run, key).await? {
            return Ok(Ok(h));
        }
        // After an infrastructure failure on a host, another host if one is free.
        let avoid: Vec<String> = s
            .store
            .last_retry_host(s.claim.step)
            .await?
            .into_iter()
            .collect();
        let picked = match self.pick_host(&s.store, image, &avoid, s.claim.step).await {
            Ok(None) if !avoid.is_empty() => {
                self.pick_host(&s.store, image, &[], s.claim.step).await
            }
            other => other,
        };
        let picked = match picked {
            Ok(p) => p,
            Err(out) => return Ok(Err(out)),
        };
        let Some((host, _, _)) = picked else {
            return Ok(Err(StepOutput::Defer {
                after: Duration::from_secs(2),
                why: json!({"reason": "every host's slots are in use"}),
            }));
        };
        Ok(match s.store.reserve_slot(s.claim.run, key, &host).await? {
            Some(h) => {
                s.store.set_step_host(&s.claim, &h).await?;
                Ok(h)
            }
            None => Err(StepOutput::Defer {
                after: Duration::from_millis(500),
                why: json!({"reason": "the slot went to another target"}),
            }),
        })
    }

    /// One VM through its whole life (push, boot, tests, teardown) on `host`.
    pub(super) async fn run_self_contained(
        &self,
        s: &StepCtx,
        host: &str,
        image: &Path,
        node_type: &str,
    ) -> Result<vmrun::VmOutcome, VmRunError> {
        let url = host_url(&s.store, host)
            .await
            .map_err(|e| VmRunError::Refused(e.to_string()))?;
        let token = self
            .ctx
            .host_token(host)
            .map_err(|e| VmRunError::Refused(e.to_string()))?;
        let cache = self.index_cache();
        vmrun::run(
            &s.store,
            &url,
            &token,
            &VmRequest {
                image,
                node_type,
                patch: None,
                suite: Suite::All,
                timeout: self.settings.vm_timeout,
                memory_mib: self.settings.memory_mib,
                orchestrator: Some(&self.settings.orchestrator),
                fault: None,
                index_cache: Some(&cache),
            },
            &|_| {},
        )
        .await
    }

    pub(super) async fn teardown(&self, s: &StepCtx, target: &str) -> Result<StepOutput> {
        let mut destroyed = Vec::new();
        for (key, host) in s.store.target_intents(s.claim.run, target).await? {
            let url = host_url(&s.store, &host).await?;
            let agent = self.agent(&host, &url)?;
            match agent.destroy_at(&key, s.claim.epoch).await {
                Ok(st) => {
                    destroyed.push(json!({"vm": key, "host": host, "destroyed": st.destroyed}))
                }
                Err(e) => return Ok(infra(format!("destroying {key} on {host}: {e}"))),
            }
            if let Some(r) = s.store.vm(&key).await?.filter(|r| r.state.is_live()) {
                s.store
                    .finish_vm(
                        r.id,
                        VmState::Failed,
                        None,
                        Some("torn down before its harness said done (the run ended or was cancelled)"),
                        None,
                    )
                    .await?;
            }
        }
        s.store.release_slot(s.claim.run, target).await?;
        Ok(StepOutput::Passed(json!({"destroyed": destroyed})))
    }

    async fn verdict(&self, s: &StepCtx) -> Result<StepOutput> {
        let run = s
            .store
            .run(s.claim.run)
            .await?
            .ok_or_else(|| StepError::Other("run vanished".into()))?;
        let steps = s.store.run_timeline(run.id).await?;
        let d = verdict::decide(&run, &steps);
        let detail = d.to_json(&run);
        s.store
            .record_verdict(&VerdictRow {
                run_id: run.id,
                patch_id: run.patch_id,
                revision: run.revision,
                verdict: d.verdict.clone(),
                stage: d.stage.clone(),
                target: d.target.clone(),
                reason: d.reason.clone(),
                detail: detail.clone(),
                decided_at: chrono::Utc::now(),
            })
            .await?;
        tracing::info!(run = run.id, patch = ?run.patch_id, verdict = %d.verdict, "run decided");
        Ok(StepOutput::Passed(
            json!({"verdict": d.verdict, "line": d.line()}),
        ))
    }
}

impl Handler for Certify {
    fn workflows(&self) -> Vec<Workflow> {
        vec![self.workflow.clone(), self.nightly.clone()]
    }

    fn run(&self, step: StepCtx) -> StepFuture {
        let this = self.clone();
        Box::pin(async move {
            match this.step(&step).await {
                Ok(out) => out,
                Err(e) => infra(format!("{}: {e}", step.claim.name)),
            }
        })
    }
}

pub(super) async fn host_url(store: &Store, host: &str) -> Result<String> {
    store
        .list_hosts()
        .await?
        .into_iter()
        .find(|h| h.name == host)
        .and_then(|h| h.agent_url)
        .ok_or_else(|| StepError::Other(format!("host {host} has no agent URL")))
}

pub(super) fn str_of(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

pub(super) fn first_line(s: &str) -> String {
    s.lines()
        .find(|l| l.starts_with("FAIL") || l.starts_with("ERROR"))
        .or_else(|| s.lines().find(|l| !l.trim().is_empty()))
        .unwrap_or("")
        .trim()
        .chars()
        .take(300)
        .collect()
}
