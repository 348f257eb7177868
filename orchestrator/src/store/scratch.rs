//! Scratch databases: a fresh, migrated database on the same server, for tests
//! and benchmarks, dropped afterwards. Databases left behind by a process that
//! died (a panicking test) are dropped by the next one that creates a scratch
//! database.

use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

use super::{Location, Store, StoreError, cluster::Cluster, create_database_if_missing};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A migrated database that exists for one test or one benchmark run.
#[derive(Debug)]
pub struct ScratchDb {
    pub store: Store,
    pub url: String,
    admin_url: String,
    name: String,
}

/// The URL of the server's maintenance database, and a function giving the
/// URL of any database on that server.
type UrlOf = Box<dyn Fn(&str) -> String>;

fn server_urls(location: &Location) -> Result<(String, UrlOf), StoreError> {
    match location {
        Location::Embedded(dir) => {
            let cluster = Cluster::new(dir)?;
            Ok((
                cluster.url("postgres"),
                Box::new(move |db: &str| cluster.url(db)),
            ))
        }
        Location::Url(url) => {
            let base = url.clone();
            PgConnectOptions::from_str(url).map_err(StoreError::Url)?;
            let with_db = move |db: &str| replace_database(&base, db);
            Ok((with_db("postgres"), Box::new(with_db)))
        }
    }
}

/// Replaces the database part of a `postgres://` URL.
fn replace_database(url: &str, db: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    let after_scheme = head.find("://").map_or(0, |i| i + 3);
    let base = match head[after_scheme..].find('/') {
        Some(i) => &head[..after_scheme + i],
        None => head,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

impl ScratchDb {
    /// Creates `<prefix>_<pid>_<n>` on the server of `location` and migrates it.
    pub async fn create(location: &Location, prefix: &str) -> Result<ScratchDb, StoreError> {
        if let Location::Embedded(dir) = location {
            super::ensure_embedded(dir).await?;
        }
        let (admin_url, url_of) = server_urls(location)?;
        drop_orphans(&admin_url, prefix).await?;
        let template = ensure_template(&admin_url, &url_of, prefix).await?;
        let name = format!(
            "{prefix}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let mut conn = admin(&admin_url).await?;
        let sql = format!("CREATE DATABASE \"{name}\" TEMPLATE \"{template}\"");
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut conn)
            .await?;
        conn.close().await?;
        let url = url_of(&name);
        let store = Store::connect(&url).await?;
        Ok(ScratchDb {
            store,
            url,
            admin_url,
            name,
        })
    }

    /// Closes the pool and drops the database.
    pub async fn drop_db(self) -> Result<(), StoreError> {
        self.store.pool().close().await;
        let mut conn = PgConnectOptions::from_str(&self.admin_url)
            .map_err(StoreError::Url)?
            .connect()
            .await?;
        drop_database(&mut conn, &self.name).await?;
        conn.close().await?;
        Ok(())
    }
}

/// Drops database `name` (closing its connections).
async fn drop_database(conn: &mut sqlx::PgConnection, name: &str) -> Result<(), StoreError> {
    let sql = format!(
        "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
        name.replace('"', "")
    );
    sqlx::query(sqlx::AssertSqlSafe(sql)).execute(conn).await?;
    Ok(())
}

async fn admin(admin_url: &str) -> Result<sqlx::PgConnection, StoreError> {
    PgConnectOptions::from_str(admin_url)
        .map_err(StoreError::Url)?
        .connect()
        .await
        .map_err(|source| StoreError::Connect {
            target: super::redact(admin_url),
            source,
        })
}

/// A digest of the migrations (versions and checksums): a template is good for exactly
/// the schema it was migrated to.
fn migrations_digest() -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for m in super::MIGRATOR.iter() {
        h.update(m.version.to_le_bytes());
        h.update(&m.checksum);
    }
    hex::encode(h.finalize())[..16].to_owned()
}

/// The migrated template scratch databases are cloned from (`CREATE DATABASE ... TEMPLATE`,
/// a file copy, instead of running every migration per test), made once per schema under
/// an advisory lock, so concurrent test processes make it once; templates of older schemas
/// are dropped.
async fn ensure_template(
    admin_url: &str,
    url_of: &UrlOf,
    prefix: &str,
) -> Result<String, StoreError> {
    let template = format!("{prefix}_tmpl_{}", migrations_digest());
    let mut conn = admin(admin_url).await?;
    sqlx::query("SELECT pg_advisory_lock(hashtext($1))")
        .bind(&template)
        .execute(&mut conn)
        .await?;
    let result = async {
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(&template)
                .fetch_one(&mut conn)
                .await?;
        if exists {
            return Ok(());
        }
        let stale: Vec<String> = sqlx::query_scalar(
            "SELECT datname FROM pg_database WHERE starts_with(datname, $1) AND datname <> $2",
        )
        .bind(format!("{prefix}_tmpl_"))
        .bind(&template)
        .fetch_all(&mut conn)
        .await?;
        for old in stale {
            drop_database(&mut conn, &old).await?;
        }
        // Built under another name and renamed when migrated: a template is never half made.
        let building = format!("{template}_building");
        drop_database(&mut conn, &building).await?;
        create_database_if_missing(admin_url, &building).await?;
        let store = Store::connect(&url_of(&building)).await?;
        store.pool().close().await;
        let sql = format!("ALTER DATABASE \"{building}\" RENAME TO \"{template}\"");
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut conn)
            .await?;
        Ok::<(), StoreError>(())
    }
    .await;
    let _ = sqlx::query("SELECT pg_advisory_unlock(hashtext($1))")
        .bind(&template)
        .execute(&mut conn)
        .await;
    let _ = conn.close().await;
    result.map(|()| template)
}

/// Drops scratch databases whose creating process no longer runs.
async fn drop_orphans(admin_url: &str, prefix: &str) -> Result<(), StoreError> {
    let mut conn = PgConnectOptions::from_str(admin_url)
        .map_err(StoreError::Url)?
        .connect()
        .await
        .map_err(|source| StoreError::Connect {
            target: super::redact(admin_url),
            source,
        })?;
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE starts_with(datname, $1)")
            .bind(format!("{prefix}_"))
            .fetch_all(&mut conn)
            .await?;
    for name in names {
        let pid = name[prefix.len() + 1..]
            .split('_')
            .next()
            .and_then(|p| p.parse::<u32>().ok());
        let alive = pid.is_none_or(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            drop_database(&mut conn, &name).await?;
        }
    }
    conn.close().await?;
    Ok(())
}

/// A cell of a seeded night: its name and its tests (suite, name, status).
pub type NightCell = (String, Vec<(String, String, String)>);

/// History for benchmarks that read it (`certo bench dashboard`): runs ended as if worked,
/// nights of sweeps recorded in bulk. Never used on a real store.
impl Store {
    /// Ends every step of `runs` as if worked (one attempt, two seconds apart, each taking
    /// one and a half); in every run whose id is a multiple of `reject_every` the `basic`
    /// steps fail (a product failure) and what needed them is cancelled. The runs' states
    /// follow.
    pub async fn seed_worked_runs(
        &self,
        runs: &[i64],
        reject_every: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "WITH s AS (
               SELECT s.id, s.run_id, s.name, r.created_at,
                      row_number() OVER (PARTITION BY s.run_id ORDER BY s.id) AS k
                 FROM engine_steps s JOIN engine_runs r ON r.id = s.run_id WHERE s.run_id = ANY($1))
             UPDATE engine_steps e SET attempt = 1,
                    started_at = s.created_at + make_interval(secs => 2 * s.k),
                    finished_at = s.created_at + make_interval(secs => 2 * s.k + 1.5),
                    state = CASE WHEN e.run_id % $2 = 0 AND e.name = 'basic' THEN 'failed' ELSE 'passed' END,
                    outcome = CASE WHEN e.run_id % $2 = 0 AND e.name = 'basic'
                                   THEN jsonb_build_object('stage', 'basic', 'reason',
                                        'basic/simulated fails with the patch and passes on the baseline: generated')
                                   ELSE '{}'::jsonb END
               FROM s WHERE s.id = e.id",
        )
        .bind(runs)
        .bind(reject_every.max(1))
        .execute(&self.pool)
        .await?;
        sqlx::query(
            "UPDATE engine_runs SET state = CASE WHEN id % $2 = 0 THEN 'failed' ELSE 'passed' END,
                    finished_at = created_at + interval '1 minute' WHERE id = ANY($1)",
        )
        .bind(runs)
        .bind(reject_every.max(1))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records a whole night of a sweep at once: each cell ran, with its tests' statuses, and
    /// the sweep's run ended at `at`.
    pub async fn seed_sweep_night(
        &self,
        run: i64,
        at: chrono::DateTime<chrono::Utc>,
        cells: &[NightCell],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let names: Vec<&str> = cells.iter().map(|c| c.0.as_str()).collect();
        sqlx::query(
            "INSERT INTO sweep_cells (run_id, cell, state, image_digest, recorded_at)
             SELECT $1, c, 'ran', md5(c), $3 FROM unnest($2::text[]) AS c",
        )
        .bind(run)
        .bind(&names)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        let (mut cell, mut suite, mut name, mut status) = (vec![], vec![], vec![], vec![]);
        for (c, tests) in cells {
            for (s, n, st) in tests {
                cell.push(c.as_str());
                suite.push(s.as_str());
                name.push(n.as_str());
                status.push(st.as_str());
            }
        }
        sqlx::query(
            "INSERT INTO sweep_results (run_id, cell, suite, name, status, output)
             SELECT $1, c, s, n, st, CASE WHEN st = 'pass' THEN '' ELSE 'generated failure' END
               FROM unnest($2::text[], $3::text[], $4::text[], $5::text[]) AS t(c, s, n, st)",
        )
        .bind(run)
        .bind(&cell)
        .bind(&suite)
        .bind(&name)
        .bind(&status)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE engine_steps SET state = 'passed', attempt = 1, started_at = $2, finished_at = $2
              WHERE run_id = $1",
        )
        .bind(run)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE engine_runs SET state = 'passed', created_at = $2 - interval '1 hour', finished_at = $2
              WHERE id = $1",
        )
        .bind(run)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::replace_database;

    #[test]
    fn database_part_of_a_url_is_replaced() {
        assert_eq!(
            replace_database("postgres://u:p@h:5432/certo?sslmode=disable", "x"),
            "postgres://u:p@h:5432/x?sslmode=disable"
        );
        assert_eq!(replace_database("postgres://u@h", "x"), "postgres://u@h/x");
        assert_eq!(
            replace_database("postgres://certo@localhost/certo?host=/tmp/s", "postgres"),
            "postgres://certo@localhost/postgres?host=/tmp/s"
        );
    }
}
