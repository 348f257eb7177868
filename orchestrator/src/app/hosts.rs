//! Host operations beyond registration: the health check that can take a quarantined host
//! back into placement.
//!
//! A host is quarantined after repeated infrastructure failures (`Store::host_failed`) or by
//! command, and is healthy again only by command (`certo host release`) or after a passing
//! health check: the agent tries for real what a boot needs (its hypervisor answers, its
//! directories take files, its boot assets are there, a domain starts and is destroyed).
//! `certo serve` checks every quarantined host with a fresh heartbeat periodically;
//! `certo host check NAME` checks one now.

use std::time::Duration;

use certo_proto::agent::HealthReport;

use super::{AppError, Context};
use crate::store::Store;
use crate::vmrun::Agent;

/// What a health check of one host found and did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Checked {
    pub host: String,
    /// The agent's report; `None` when the agent could not be asked.
    pub report: Option<HealthReport>,
    /// Why the agent could not be asked.
    pub error: Option<String>,
    pub was_quarantined: bool,
    /// Taken out of quarantine by this check.
    pub released: bool,
}

impl Checked {
    pub fn healthy(&self) -> bool {
        self.report.as_ref().is_some_and(|r| r.healthy)
    }

    /// One line: the outcome and, when unhealthy, the first failing check.
    pub fn line(&self) -> String {
        let why = match (&self.report, &self.error) {
            (_, Some(e)) => e.clone(),
            (Some(r), None) => r
                .checks
                .iter()
                .find(|c| !c.ok)
                .map(|c| format!("{}: {}", c.check, c.detail))
                .unwrap_or_default(),
            (None, None) => String::new(),
        };
        match (self.healthy(), self.released, self.was_quarantined) {
            (true, true, _) => format!("{}: healthy; taken out of quarantine", self.host),
            (true, false, _) => format!("{}: healthy", self.host),
            (false, _, true) => format!("{}: unhealthy, stays quarantined ({why})", self.host),
            (false, _, false) => format!("{}: unhealthy ({why})", self.host),
        }
    }
}

/// Checks host `name`; a quarantined host that passes is taken out of quarantine.
pub async fn check(ctx: &Context, store: &Store, name: &str) -> Result<Checked, AppError> {
    let row = store
        .list_hosts()
        .await?
        .into_iter()
        .find(|h| h.name == name)
        .ok_or_else(|| AppError::NotFound(format!("host {name:?} is not registered")))?;
    let was_quarantined = row.quarantined_at.is_some();
    let asked = match (&row.agent_url, ctx.host_token(name)) {
        (None, _) => Err(format!(
            "host {name} has no agent URL (it never registered)"
        )),
        (Some(_), Err(e)) => Err(e.to_string()),
        (Some(url), Ok(token)) => match Agent::new(url, &token) {
            Ok(agent) => agent.health().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        },
    };
    let (report, error) = match asked {
        Ok(r) => (Some(r), None),
        Err(e) => (None, Some(e)),
    };
    let healthy = report.as_ref().is_some_and(|r| r.healthy);
    let released = healthy && was_quarantined && store.unquarantine(name).await?;
    if released {
        tracing::info!(
            host = name,
            "a passing health check took the host out of quarantine"
        );
    }
    Ok(Checked {
        host: name.to_owned(),
        report,
        error,
        was_quarantined,
        released,
    })
}

/// Checks every quarantined host whose agent still sends heartbeats (a silent one has nothing
/// to answer with).
pub async fn check_quarantined(ctx: &Context, store: &Store) -> Result<Vec<Checked>, AppError> {
    let fresh = chrono::Utc::now() - chrono::Duration::seconds(30);
    let mut out = Vec::new();
    for h in store.list_hosts().await? {
        if h.quarantined_at.is_some() && h.last_heartbeat.is_some_and(|t| t > fresh) {
            out.push(check(ctx, store, &h.name).await?);
        }
    }
    Ok(out)
}

/// [`check_quarantined`] every `every`, for ever (`certo serve` runs it).
pub async fn recheck_loop(ctx: Context, store: Store, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        match check_quarantined(&ctx, &store).await {
            Ok(checked) => {
                for c in checked.iter().filter(|c| !c.healthy()) {
                    tracing::info!(host = %c.host, outcome = %c.line(), "quarantined host checked");
                }
            }
            Err(e) => tracing::warn!(error = %e, "checking quarantined hosts failed"),
        }
    }
}
