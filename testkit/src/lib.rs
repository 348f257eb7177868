//! Certo's test kit, a dev-dependency only: what the integration tests of every crate share
//! instead of copying it.
//!
//! - [`scratch_db`]: a fresh database per test, cloned from one migrated template;
//! - [`process::Listening`]: a `certo` process (agent, serve) started and waited for until
//!   it prints `listening on URL`, killed when dropped;
//! - [`world`]: the fixture world's repositories, built once per test process;
//! - [`ensure_libvirtd`]: virtlogd and libvirtd, started when they do not run;
//! - [`agent::SimulatedHost`]: the host agent's real code in process, over a private libvirt
//!   test-driver instance with simulated guests;
//! - [`hypervisor`]: [`hypervisor::SimulatedGuests`] (a harness stand-in over libvirt's test
//!   driver, which boots nothing) and [`hypervisor::Faulty`] (injected failures).

pub mod agent;
pub mod hypervisor;
pub mod process;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use certo_orchestrator::store::Location;
use certo_orchestrator::store::scratch::ScratchDb;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// The target directory's `tmp/` (where cargo puts `CARGO_TARGET_TMPDIR` too), created.
pub fn target_tmp() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    let dir = target.join("tmp");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// Where the tests' store is: `DATABASE_URL` (scripts/test starts a private cluster), or
/// Certo's embedded cluster under the target directory.
pub fn location() -> Location {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => Location::Url(url),
        _ => Location::Embedded(target_tmp().join("certo-test-store")),
    }
}

/// A fresh database for one test, cloned from the migrated template of the current
/// migrations (`CREATE DATABASE ... TEMPLATE`): no migration runs per test.
pub async fn scratch_db() -> ScratchDb {
    ScratchDb::create(&location(), "certo_test")
        .await
        .unwrap_or_else(|e| {
            panic!(
                "a scratch database ({e}); PostgreSQL must be installed \
                 (/usr/lib/postgresql/15/bin) or DATABASE_URL set"
            )
        })
}

/// The fixture world's package repositories, built once per test process under the target
/// directory (the build script skips an up-to-date world and serialises builders).
pub fn world() -> PathBuf {
    static WORLD: OnceLock<PathBuf> = OnceLock::new();
    WORLD
        .get_or_init(|| {
            let dir = target_tmp().join("imager-world");
            certo_orchestrator::world::build(&dir)
                .unwrap_or_else(|e| panic!("the fixture world does not build: {e}"));
            dir
        })
        .clone()
}

/// Starts virtlogd and libvirtd if they do not run (scripts/lib.sh `certo_start_libvirtd`),
/// once per process.
pub fn ensure_libvirtd() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(". scripts/lib.sh && certo_start_libvirtd")
            .current_dir(workspace())
            .output()
            .unwrap_or_else(|e| panic!("running bash: {e}"));
        assert!(
            out.status.success(),
            "libvirtd could not be started: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// `certo serve`'s API over `store`, in this process on 127.0.0.1; stops when dropped.
#[derive(Debug)]
pub struct ApiServer {
    /// `http://127.0.0.1:PORT`
    pub base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Serves the API over `store` (health checks every `health_every`).
pub async fn api_server(
    store: &certo_orchestrator::store::Store,
    health_every: std::time::Duration,
) -> ApiServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("binding 127.0.0.1:0: {e}"));
    let base = format!(
        "http://{}",
        listener.local_addr().unwrap_or_else(|e| panic!("{e}"))
    );
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(certo_orchestrator::api::serve(
        listener,
        certo_orchestrator::api::ApiState::protocols(store.clone()),
        health_every,
        async move {
            let _ = rx.await;
        },
    ));
    ApiServer {
        base,
        stop: Some(tx),
    }
}
