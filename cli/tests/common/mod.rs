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

/// `certo serve` in-process over a test's database: the API and the dashboard, on a
/// loopback port of its own; stopped when dropped.
pub struct PeopleServer {
    pub base: String,
    pub ctx: certo_orchestrator::app::Context,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _data: tempfile::TempDir,
}

impl Drop for PeopleServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Starts a [`PeopleServer`]; `public`: the dashboard may be read without signing in.
pub async fn people_server(db: &ScratchDb, public: bool) -> PeopleServer {
    people_server_with(db, public, None, None).await
}

/// [`people_server`] with its data directory (the image cache) and the package
/// repositories its imager builds from.
pub async fn people_server_with(
    db: &ScratchDb,
    public: bool,
    data_dir: Option<PathBuf>,
    repos: Option<PathBuf>,
) -> PeopleServer {
    let data = tempfile::tempdir().expect("tempdir");
    let ctx = certo_orchestrator::app::Context::new(certo_orchestrator::app::Settings {
        data_dir: data_dir.unwrap_or_else(|| data.path().to_owned()),
        database_url: Some(db.url.clone()),
        catalogue: None,
        repos,
    })
    .expect("context");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let mut state = certo_orchestrator::api::ApiState::full(ctx.clone(), db.store.clone());
    state.public_dashboard = public;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(certo_orchestrator::api::serve_router(
        listener,
        certo_orchestrator::web::router(state),
        db.store.clone(),
        std::time::Duration::from_secs(3600),
        async move {
            let _ = rx.await;
        },
    ));
    PeopleServer {
        base,
        ctx,
        stop: Some(tx),
        _data: data,
    }
}

/// [`snapshot`] but for the users' last-seen times, which any authenticated call may set.
pub async fn snapshot_but_last_seen(db: &ScratchDb) -> Vec<(String, i64, String)> {
    let mut s = snapshot(db).await;
    s.retain(|t| t.0 != "users");
    s
}

/// A page's answer, redirects not followed.
pub struct Answer {
    pub status: u16,
    pub location: Option<String>,
    pub set_cookie: Option<String>,
    pub body: String,
}

/// One request to the dashboard, as a browser without JavaScript sends it (a form
/// urlencoded, the session cookie), not following redirects.
pub async fn page(
    method: &str,
    url: &str,
    cookie: Option<&str>,
    form: Option<&[(&str, &str)]>,
    origin: Option<&str>,
) -> Answer {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let mut req = if method == "GET" {
        client.get(url)
    } else {
        client.post(url)
    };
    if let Some(c) = cookie {
        req = req.header("cookie", format!("certo_session={c}"));
    }
    if let Some(o) = origin {
        req = req.header("origin", o);
    }
    if let Some(f) = form {
        let body: Vec<String> = f
            .iter()
            .map(|(k, v)| {
                format!(
                    "{k}={}",
                    v.bytes()
                        .map(|b| if b.is_ascii_alphanumeric() {
                            (b as char).to_string()
                        } else {
                            format!("%{b:02X}")
                        })
                        .collect::<String>()
                )
            })
            .collect();
        req = req
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body.join("&"));
    }
    let resp = req.send().await.expect("request");
    let header = |h: &str| {
        resp.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    Answer {
        status: resp.status().as_u16(),
        location: header("location"),
        set_cookie: header("set-cookie"),
        body: resp.text().await.unwrap_or_default(),
    }
}

/// Signs in with `token`; returns the session key the cookie holds.
pub async fn sign_in(base: &str, token: &str) -> String {
    let a = page(
        "POST",
        &format!("{base}/login"),
        None,
        Some(&[("token", token)]),
        None,
    )
    .await;
    assert_eq!(a.status, 303, "{}", a.body);
    let cookie = a.set_cookie.expect("a session cookie");
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Strict"), "{cookie}");
    cookie
        .split(';')
        .next()
        .and_then(|kv| kv.strip_prefix("certo_session="))
        .expect("certo_session=KEY")
        .to_owned()
}

/// The CSRF token a page's forms carry.
pub fn csrf_of(body: &str) -> String {
    body.split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or_else(|| panic!("no CSRF token in the page:\n{body}"))
        .to_owned()
}
