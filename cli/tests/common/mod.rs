//! Shared set-up for the integration tests: a real PostgreSQL database per
//! test. `DATABASE_URL` selects a server; without it the tests start Certo's
//! embedded cluster under the target directory (the same code users run).
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

use certo_orchestrator::catalogue::Catalogue;
use certo_orchestrator::ingest;
use certo_orchestrator::store::scratch::ScratchDb;

#[allow(unused_imports)]
pub use certo_testkit::world;

/// A fresh database for one test, cloned from the migrated template.
pub async fn scratch() -> ScratchDb {
    certo_testkit::scratch_db().await
}

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/patches")
}

pub fn load_valid() -> Vec<certo_orchestrator::patch::LoadedRecord> {
    let loaded = ingest::load_files(&[fixtures().join("valid")], &Catalogue::builtin(), || {});
    assert!(
        loaded.errors.is_empty(),
        "valid fixtures have errors: {:?}",
        loaded.errors
    );
    loaded.records
}

/// Runs the `certo` binary against a database.
pub fn certo(db_url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_certo"))
        .args(args)
        .env("DATABASE_URL", db_url)
        .env_remove("CERTO_CATALOGUE")
        .output()
        .expect("run certo")
}

/// A digest of everything stored: every row of every table of the schema.
pub async fn snapshot(db: &ScratchDb) -> Vec<(String, i64, String)> {
    let mut out = Vec::new();
    let tables: Vec<(String,)> = sqlx::query_as(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = current_schema()
         AND tablename <> '_sqlx_migrations' ORDER BY tablename",
    )
    .fetch_all(db.store.pool())
    .await
    .expect("list tables");
    for (table,) in tables {
        let sql = format!(
            "SELECT count(*), coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM {table} t"
        );
        let (count, digest): (i64, String) = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .fetch_one(db.store.pool())
            .await
            .expect("snapshot query");
        out.push((table, count, digest));
    }
    out
}

/// A small deterministic image file of 4 MiB (its first MiB patterned by `seed`).
pub fn small_image(path: &std::path::Path, seed: usize) -> PathBuf {
    let mut data = vec![0u8; 4 << 20];
    for (i, b) in data.iter_mut().enumerate().take(1 << 20) {
        *b = ((i + seed) * 7 % 251) as u8;
    }
    std::fs::write(path, data).expect("image");
    path.to_path_buf()
}

/// `certo vm run --json` of a small glite-WN image on the in-process agent `agent` (host
/// token `token`), with `extra` arguments: its exit status and JSON.
pub fn vm_run(
    db: &str,
    agent: &certo_testkit::agent::SimulatedHost,
    token: &str,
    extra: &[&str],
) -> (i32, serde_json::Value) {
    let img = small_image(&agent.dir.join("small.img"), 0);
    let out = Command::new(env!("CARGO_BIN_EXE_certo"))
        .arg("--data-dir")
        .arg(&agent.dir)
        .args([
            "vm",
            "run",
            "--json",
            "--node-type",
            "glite-WN",
            "--agent",
            &agent.url,
            "--image",
        ])
        .arg(&img)
        .args(extra)
        .env("DATABASE_URL", db)
        .env("CERTO_TOKEN", token)
        .output()
        .expect("vm run");
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), v)
}
