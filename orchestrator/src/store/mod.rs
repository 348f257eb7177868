//! The store: PostgreSQL through sqlx. `DATABASE_URL` selects an existing
//! server; without it Certo starts its own private cluster ([`cluster`]).
//! The schema lives in `migrations/` and is applied on every open.

pub mod cluster;
pub mod engine;
pub mod hooks;
mod hosts;
mod image_builds;
mod images;
pub mod metrics;
mod patches;
pub mod scratch;
pub mod sweeps;
mod users;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

pub use cluster::{Cluster, ClusterError, ClusterStatus};
pub use hosts::{
    HostRow, NewVm, ProbeOutcomeKind, RegisterError, ResultRow, ServiceRow, VmEvidence, VmRow,
};
pub use image_builds::{HEARTBEAT_STALE_SECONDS, ImageBuildRow};
pub use images::{ImageRow, LayerDetail, LayerRow};
pub use patches::{
    PatchEvent, PatchRow, PatchStamp, PatchState, PatchWhole, SubmitError, SubmitOutcome,
    SubmitReport, Submitter,
};
pub use users::{Role, SessionRow, UserRow, valid_user_name};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("invalid database URL: {0}")]
    Url(sqlx::Error),
    #[error("cannot connect to the database at {target}: {source}")]
    Connect { target: String, source: sqlx::Error },
    #[error("cannot apply the schema migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("stored data is inconsistent: {0}")]
    Corrupt(String),
}

/// Where the store is.
#[derive(Debug, Clone)]
pub enum Location {
    /// An existing server, by URL (from `--database-url` or `DATABASE_URL`).
    Url(String),
    /// Certo's own cluster under this data directory.
    Embedded(PathBuf),
}

/// The default data directory: `CERTO_DATA_DIR` is read by the CLI; this is
/// the fallback, `/var/lib/certo` for root, else `$XDG_DATA_HOME/certo` or
/// `~/.local/share/certo`.
pub fn default_data_dir() -> PathBuf {
    if cluster::effective_uid() == Some(0) {
        return PathBuf::from("/var/lib/certo");
    }
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("certo");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/share/certo"),
        None => PathBuf::from(".certo"),
    }
}

/// A handle on the store.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    /// Which connection this is ([`Store::instance`]).
    instance: u64,
}

/// Connects to the embedded cluster of `data_dir`, starting it if needed,
/// and makes sure Certo's database exists. Returns its URL.
pub async fn ensure_embedded(data_dir: &Path) -> Result<String, StoreError> {
    let cluster = Cluster::new(data_dir)?;
    let started = {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || cluster.start())
            .await
            .map_err(|e| StoreError::Corrupt(format!("cluster start task failed: {e}")))??
    };
    if started {
        tracing::debug!("embedded cluster started by this process");
    }
    create_database_if_missing(&cluster.url("postgres"), cluster::DATABASE).await?;
    Ok(cluster.url(cluster::DATABASE))
}

/// Keeps a long-running process's store usable: every `every` it asks the server for a
/// row; when that fails and the store is the embedded cluster, the cluster is started
/// again (a `kill -9` of the postmaster, an out-of-memory kill), and the pool reconnects
/// on its next use. Says so in the log either way. Runs until dropped.
pub async fn supervise(store: Store, location: Location, every: Duration) {
    let mut down_since: Option<std::time::Instant> = None;
    loop {
        tokio::time::sleep(every).await;
        let alive = tokio::time::timeout(
            Duration::from_secs(2),
            sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&store.pool),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        if alive {
            if let Some(t) = down_since.take() {
                tracing::info!(
                    down_for_ms = t.elapsed().as_millis() as u64,
                    "the store answers again"
                );
            }
            continue;
        }
        down_since.get_or_insert_with(std::time::Instant::now);
        match &location {
            Location::Embedded(dir) => match ensure_embedded(dir).await {
                Ok(_) => tracing::warn!(
                    data_dir = %dir.display(),
                    "the embedded PostgreSQL cluster was down: started it again"
                ),
                Err(e) => {
                    tracing::error!(error = %e, "the embedded PostgreSQL cluster is down and does not start")
                }
            },
            Location::Url(url) => tracing::warn!(
                server = %redact(url),
                "the store does not answer; the pool reconnects when it is back"
            ),
        }
    }
}

/// Creates a database on the server of `admin_url` unless it exists.
pub async fn create_database_if_missing(admin_url: &str, name: &str) -> Result<(), StoreError> {
    let opts = PgConnectOptions::from_str(admin_url).map_err(StoreError::Url)?;
    let mut conn = opts.connect().await.map_err(|source| StoreError::Connect {
        target: redact(admin_url),
        source,
    })?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&mut conn)
            .await?;
    if !exists {
        let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        match sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut conn)
            .await
        {
            Ok(_) => {}
            // Another process created it in between.
            Err(sqlx::Error::Database(e))
                if matches!(e.code().as_deref(), Some("42P04") | Some("23505")) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

impl Store {
    /// Opens the store at `location` and applies the migrations.
    pub async fn open(location: &Location) -> Result<Store, StoreError> {
        let url = match location {
            Location::Url(url) => url.clone(),
            Location::Embedded(dir) => ensure_embedded(dir).await?,
        };
        Store::connect(&url).await
    }

    /// Connects to a database by URL and applies the migrations.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        Store::connect_sized(url, 8).await
    }

    /// Connects like [`Store::connect`] with a pool of up to `connections` (a worker running
    /// many steps at once needs more than the default 8).
    pub async fn connect_sized(url: &str, connections: u32) -> Result<Store, StoreError> {
        let opts = PgConnectOptions::from_str(url).map_err(StoreError::Url)?;
        let pool = PgPoolOptions::new()
            .max_connections(connections.max(1))
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts)
            .await
            .map_err(|source| StoreError::Connect {
                target: redact(url),
                source,
            })?;
        MIGRATOR.run(&pool).await?;
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Ok(Store {
            pool,
            instance: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// Which connection to a database this handle is: its clones share the number, every
    /// connection made in this process has its own (what a cache of what was read through
    /// it is keyed by, so that two databases served by one process never mix).
    pub fn instance(&self) -> u64 {
        self.instance
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// A URL fit for messages: any password replaced by `***`.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact("postgres://certo:s3cret@db.example/certo"),
            "postgres://certo:***@db.example/certo"
        );
        assert_eq!(
            redact("postgres://certo@localhost/certo"),
            "postgres://certo@localhost/certo"
        );
    }
}
