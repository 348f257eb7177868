//! `certo serve`: the orchestrator's HTTP API, one module per resource.
//!
//! - [`hosts`]: a host (`certo agent --orchestrator URL`) registers, sends heartbeats and
//!   reads its own record with its own token; a heartbeat answers with the host's live VMs,
//!   so the agent reaps any other domain.
//! - [`guest`]: the harness inside a VM, with a token made for that VM alone: join
//!   (hostname and test plan), services, results, log, done, its view of the testbed.
//! - [`vms`]: a VM's record and results, for the host that runs it or the VM itself.
//! - [`testbed`]: the registry's health checks.
//!
//! Every route authenticates through an extractor of [`auth`] (so a handler cannot forget),
//! answers with view types (never database rows) and fails with [`error::ApiError`], which
//! hides internals. Reads for people (lists of hosts, the whole testbed) come with users
//! and roles.

pub mod auth;
pub mod error;
pub mod guest;
pub mod hosts;
pub mod testbed;
pub mod vms;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;

use crate::store::Store;

pub use guest::hostname_for;
pub use testbed::check_health;

/// Largest body the API accepts (test output included).
const MAX_BODY: usize = 256 * 1024;

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct ApiState {
    pub store: Store,
}

/// SHA-256 of a token, hex (what the store keeps instead of the token).
pub fn token_digest(token: &str) -> String {
    certo_proto::token::digest(token)
}

/// Equal in time independent of where the strings differ (secrets).
fn same(a: &str, b: &str) -> bool {
    certo_proto::token::same(a.as_bytes(), b.as_bytes())
}

/// A new random token: 32 bytes from the kernel, hex.
pub fn new_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(hex::encode(bytes))
}

/// The API router.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .merge(hosts::routes())
        .merge(guest::routes())
        .merge(vms::routes())
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(Arc::new(state))
}

/// Serves until `shutdown` resolves; checks shared services' health every `health_every`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    health_every: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let checker = tokio::spawn(testbed::health_loop(state.store.clone(), health_every));
    let sweeper = tokio::spawn(guest::sweep_loop(state.store.clone(), health_every));
    let app = router(state);
    // Bounded like the agent: connection and in-flight caps, header, idle and body deadlines.
    let result = certo_transfer::http::serve(
        listener,
        app,
        certo_transfer::http::Limits::default(),
        shutdown,
    )
    .await;
    checker.abort();
    sweeper.abort();
    result
}
