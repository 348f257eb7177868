//! The dashboard over real HTTP against a real PostgreSQL: signing in and out with the
//! session cookie (HttpOnly, SameSite=Strict, never replayable after sign-out), forms
//! guarded by the session's CSRF token, who may act on which patch, reading only when
//! signed in unless the dashboard is public; and the rendered pages against their snapshots
//! (`cli/tests/golden/pages/`; `CERTO_BLESS=1` rewrites them).

use crate::common;

use serde_json::json;

use certo_orchestrator::api;
use certo_orchestrator::app::users;
use certo_orchestrator::store::Role;

use common::{csrf_of, page, sign_in};

#[tokio::test(flavor = "multi_thread")]
async fn sessions_forms_and_roles_guard_the_dashboard() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let db = common::scratch().await;
    let srv = common::people_server(&db, false).await;
    let alice = users::add(&db.store, "alice", Role::Certifier)
        .await
        .expect("alice");
    let bob = users::add(&db.store, "bob", Role::Certifier)
        .await
        .expect("bob");
    // Bob's patch, in flight (no worker: it stays queued).
    let path = common::fixtures().join("valid/3213-lb-r1.txt");
    let loaded = certo_orchestrator::app::submit::load_uploads(
        &[certo_orchestrator::app::submit::Upload {
            name: "3213-lb-r1.txt".into(),
            content: std::fs::read_to_string(path).expect("fixture"),
        }],
        srv.ctx.catalogue(),
    );
    let answer = certo_orchestrator::app::submit::submit(
        &srv.ctx,
        &loaded,
        Some(certo_orchestrator::store::Submitter {
            user: "bob",
            admin: false,
        }),
        true,
    )
    .await
    .expect("bob submits");
    let run = answer.runs[0]["run"].as_i64().expect("run");
    let base = &srv.base;

    // Not signed in, not public: every page sends you to sign in.
    for p in ["/matrix", "/queue", "/hosts", "/patches/3213"] {
        let a = page("GET", &format!("{base}{p}"), None, None, None).await;
        assert_eq!(
            (a.status, a.location.as_deref()),
            (303, Some("/login")),
            "{p}"
        );
    }
    // A wrong or revoked token signs nobody in and sets no cookie.
    for bad in ["nope", &"0".repeat(64)] {
        let a = page(
            "POST",
            &format!("{base}/login"),
            None,
            Some(&[("token", bad)]),
            None,
        )
        .await;
        assert_eq!(a.status, 401, "{}", a.body);
        assert!(a.set_cookie.is_none());
        assert!(a.body.contains("unknown user token"), "{}", a.body);
    }
    // A sign-in form posted from another site is refused.
    let a = page(
        "POST",
        &format!("{base}/login"),
        None,
        Some(&[("token", &alice)]),
        Some("http://evil.example"),
    )
    .await;
    assert_eq!(a.status, 403);
    assert!(a.set_cookie.is_none());

    // Alice signs in: she reads Bob's patch but is offered no button, and a forged form
    // (right CSRF token, not her patch) is refused; so is a form without the token.
    let key = sign_in(base, &alice).await;
    let a = page(
        "GET",
        &format!("{base}/patches/3213"),
        Some(&key),
        None,
        None,
    )
    .await;
    assert_eq!(a.status, 200);
    assert!(
        a.body.contains("alice"),
        "the header names who is signed in"
    );
    assert!(!a.body.contains("/patches/3213/cancel"), "{}", a.body);
    let csrf = csrf_of(&a.body);
    let before = common::snapshot_but_last_seen(&db).await;
    let cancel = format!("{base}/patches/3213/cancel");
    let a = page("POST", &cancel, Some(&key), Some(&[("csrf", &csrf)]), None).await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(a.body.contains("belongs to bob"), "{}", a.body);
    let a = page(
        "POST",
        &cancel,
        Some(&key),
        Some(&[("csrf", "forged")]),
        None,
    )
    .await;
    assert_eq!(a.status, 403);
    assert!(a.body.contains("CSRF"), "{}", a.body);
    let r = db.store.run(run).await.expect("run").expect("run");
    assert_eq!(
        (r.state.as_str(), r.cancel_reason.as_deref()),
        ("running", None)
    );
    let after = common::snapshot_but_last_seen(&db).await;
    assert_eq!(before, after, "a refused form changed the store");

    // Alice signs out: her cookie is void from then on, for reading and for forms.
    let a = page(
        "POST",
        &format!("{base}/logout"),
        Some(&key),
        Some(&[("csrf", &csrf)]),
        None,
    )
    .await;
    assert_eq!((a.status, a.location.as_deref()), (303, Some("/login")));
    assert!(a.set_cookie.is_some_and(|c| c.contains("Max-Age=0")));
    let a = page("GET", &format!("{base}/matrix"), Some(&key), None, None).await;
    assert_eq!(
        (a.status, a.location.as_deref()),
        (303, Some("/login")),
        "replayed"
    );
    let a = page("POST", &cancel, Some(&key), Some(&[("csrf", &csrf)]), None).await;
    assert_eq!(
        (a.status, a.location.as_deref()),
        (303, Some("/login")),
        "replayed form"
    );

    // Bob cancels his own patch from its page.
    let key = sign_in(base, &bob).await;
    let a = page(
        "GET",
        &format!("{base}/patches/3213"),
        Some(&key),
        None,
        None,
    )
    .await;
    assert!(
        a.body.contains("action=\"/patches/3213/cancel\""),
        "{}",
        a.body
    );
    let csrf = csrf_of(&a.body);
    let a = page("POST", &cancel, Some(&key), Some(&[("csrf", &csrf)]), None).await;
    assert_eq!(
        (a.status, a.location.as_deref()),
        (303, Some("/patches/3213")),
        "{}",
        a.body
    );
    // Cancelled: the run ends once a worker has torn its VMs down.
    let r = db.store.run(run).await.expect("run").expect("run");
    assert_eq!(
        r.cancel_reason.as_deref(),
        Some("cancelled by bob"),
        "{r:?}"
    );
    // Revoking Bob ends his session too.
    users::revoke(&db.store, "bob").await.expect("revoke");
    let a = page("GET", &format!("{base}/queue"), Some(&key), None, None).await;
    assert_eq!(a.status, 303);
}

/// Compares a rendered page with `cli/tests/golden/pages/NAME.html`.
fn snapshot(name: &str, body: &str) {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/pages")
        .join(format!("{name}.html"));
    if std::env::var("CERTO_BLESS").is_ok_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().expect("dir")).expect("golden dir");
        std::fs::write(&path, body).expect("bless");
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run with CERTO_BLESS=1 to write it",
            path.display()
        )
    });
    if want != body {
        let diff: Vec<String> = want
            .lines()
            .zip(body.lines())
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .take(10)
            .map(|(i, (a, b))| format!("line {}:\n- {a}\n+ {b}", i + 1))
            .collect();
        panic!(
            "the page {name} differs from {} (if the change is meant, rerun with CERTO_BLESS=1 and review the diff):\n{}\n(lines: {} expected, {} rendered)",
            path.display(),
            diff.join("\n"),
            want.lines().count(),
            body.lines().count()
        );
    }
}

#[tokio::test]
async fn the_matrix_the_hosts_and_the_sign_in_page_render_as_their_snapshots() {
    let db = common::scratch().await;
    let srv = common::people_server(&db, true).await;
    // Two nights of one cell: it passed, then its regression test failed.
    let cell = "3.2/sl5_x86_64/glite-WN";
    for status in ["pass", "fail"] {
        night(&db, &[(cell, status)]).await;
    }
    db.store
        .add_host("h1", &api::token_digest(&"h".repeat(64)))
        .await
        .expect("host");
    db.store
        .quarantine("h1", "disk full")
        .await
        .expect("quarantine");
    let base = &srv.base;
    let a = page("GET", &format!("{base}/matrix"), None, None, None).await;
    assert_eq!(a.status, 200);
    // As a browser reads it (tera escapes `/` in text and attributes).
    let read = a.body.replace("&#x2F;", "/");
    // What a person checks: the red cell, and the others of the matrix.
    assert!(
        read.contains(&format!(
            "<a class=\"chip bad\" data-cell=\"{cell}\" data-class=\"newly failing\""
        )),
        "{read}"
    );
    snapshot("matrix", &a.body);
    // Its chip leads to the sweep's page, where the cell's row says what failed.
    let a = page("GET", &format!("{base}/sweeps/2"), None, None, None).await;
    assert_eq!(a.status, 200);
    let read = a.body.replace("&#x2F;", "/");
    let row = read
        .split("<tr id=\"3-2-sl5-x86-64-glite-WN\">")
        .nth(1)
        .unwrap_or_else(|| panic!("no row of the cell: {read}"));
    assert!(
        row.contains("newly failing") && row.contains("regression/wn-jobs"),
        "{row}"
    );
    assert!(row.contains("<td class=\"trend\">.</td>"), "{row}");
    let a = page("GET", &format!("{base}/sweeps/99"), None, None, None).await;
    assert_eq!(a.status, 404);
    let a = page("GET", &format!("{base}/savings"), None, None, None).await;
    assert_eq!(a.status, 200);
    assert!(a.body.contains("Layer cache"), "{}", a.body);
    let a = page("GET", &format!("{base}/login"), None, None, None).await;
    snapshot("login", &a.body);
    let a = page("GET", &format!("{base}/hosts"), None, None, None).await;
    assert!(a.body.contains("disk full"), "{}", a.body);
    // The time since the quarantine began is the one moving part.
    let hosts = a
        .body
        .split("quarantined for ")
        .enumerate()
        .map(|(i, part)| {
            if i == 0 {
                part.to_owned()
            } else {
                let rest = part.split_once(':').map_or("", |(_, r)| r);
                format!("quarantined for (time):{rest}")
            }
        })
        .collect::<String>();
    snapshot("hosts", &hosts);
    // The queue holds the two sweeps (their runs were never worked), and the error page
    // of an unknown patch says so.
    let a = page("GET", &format!("{base}/queue"), None, None, None).await;
    assert_eq!(a.body.matches("nightly sweep").count(), 2, "{}", a.body);
    let a = page("GET", &format!("{base}/patches/4242"), None, None, None).await;
    assert_eq!(a.status, 404);
    assert!(a.body.contains("patch 4242 is not stored"), "{}", a.body);
}

#[tokio::test]
async fn the_nightly_report_is_one_self_contained_file_with_new_failures_first() {
    let db = common::scratch().await;
    let out = common::certo(&db.url, &["report", "--json"]);
    assert_eq!(out.status.code(), Some(1), "no sweep yet");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no sweep yet"));
    let (bad_cell, good_cell) = ("3.2/sl5_x86_64/glite-WN", "3.1/sl4_i386/glite-CE");
    for status in ["pass", "fail"] {
        night(&db, &[(bad_cell, status), (good_cell, "pass")]).await;
    }
    let out = common::certo(&db.url, &["report", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["new_failures"].as_array().map(Vec::len), Some(1), "{v:#}");
    assert_eq!(v["new_failures"][0]["cell"], bad_cell);
    assert_eq!(v["cells"][0]["cell"], bad_cell, "worst first");
    let dir = tempfile::tempdir().expect("dir");
    let out = common::certo(
        &db.url,
        &["report", "--html", &dir.path().display().to_string()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let html = std::fs::read_to_string(dir.path().join("index.html")).expect("index.html");
    let read = html.replace("&#x2F;", "/");
    // New failures come before the matrix; the file asks for nothing from anywhere.
    let first_bad = read.find(&format!("<strong>{bad_cell}</strong> is newly failing"));
    let matrix = read.find("<h2>The matrix</h2>");
    assert!(
        first_bad.is_some() && first_bad < matrix,
        "new failures first: {read}"
    );
    assert!(read.contains("regression/wn-jobs: newly failing"), "{read}");
    for outside in ["src=", "<link", "<script", "http://", "https://", "url("] {
        assert!(
            !html.contains(outside),
            "the report refers outside itself ({outside})"
        );
    }
}

/// Records one night of a sweep: each cell ran, its one test `regression/wn-jobs` with the
/// status given.
async fn night(db: &certo_orchestrator::store::scratch::ScratchDb, cells: &[(&str, &str)]) {
    let nightly = certo_orchestrator::engine::workflow::Workflow::nightly();
    let names: Vec<String> = cells.iter().map(|(c, _)| (*c).to_owned()).collect();
    let run = db
        .store
        .create_run(&nightly, None, &names)
        .await
        .expect("run");
    for (cell, status) in cells {
        db.store
            .record_sweep_cell(
                &certo_orchestrator::store::sweeps::SweepCellRow {
                    run_id: run,
                    cell: (*cell).into(),
                    state: "ran".into(),
                    reason: None,
                    image_digest: Some("ab".repeat(32)),
                    layers: json!([]),
                    class: None,
                    results_pruned: false,
                },
                &[(
                    "regression".into(),
                    "wn-jobs".into(),
                    (*status).into(),
                    String::new(),
                )],
            )
            .await
            .expect("cell");
    }
}

/// Submits a fixture record; returns the run it started.
async fn submit_fixture(srv: &common::PeopleServer, name: &str) -> i64 {
    let path = common::fixtures().join("valid").join(name);
    let loaded = certo_orchestrator::app::submit::load_uploads(
        &[certo_orchestrator::app::submit::Upload {
            name: name.into(),
            content: std::fs::read_to_string(path).expect("fixture"),
        }],
        srv.ctx.catalogue(),
    );
    let answer = certo_orchestrator::app::submit::submit(&srv.ctx, &loaded, None, true)
        .await
        .expect("submit");
    answer.runs[0]["run"].as_i64().expect("run")
}

/// What patch `id`'s page is made of now.
async fn stamp_of(
    db: &certo_orchestrator::store::scratch::ScratchDb,
    id: u64,
) -> certo_orchestrator::store::PatchStamp {
    db.store
        .patch_stamp(id)
        .await
        .expect("stamp")
        .unwrap_or_else(|| panic!("patch {id} is stored"))
}

/// Ends `run`'s steps as if worked (`basic` failing when `reject`) and records its verdict.
async fn decide(db: &certo_orchestrator::store::scratch::ScratchDb, run: i64, reject: bool) {
    let every = if reject { 1 } else { i64::MAX };
    db.store
        .seed_worked_runs(&[run], every)
        .await
        .expect("worked");
    let row = db.store.run(run).await.expect("run").expect("run");
    let v = certo_orchestrator::app::runs::view(&db.store, &row)
        .await
        .expect("view");
    db.store
        .record_verdict(&certo_orchestrator::store::engine::VerdictRow {
            run_id: run,
            patch_id: row.patch_id,
            revision: row.revision,
            verdict: v["verdict"].as_str().expect("verdict").to_owned(),
            stage: v["stage"].as_str().map(str::to_owned),
            target: v["target"].as_str().map(str::to_owned),
            reason: v["reason"].as_str().map(str::to_owned),
            detail: v,
            decided_at: row.finished_at.unwrap_or(row.created_at),
        })
        .await
        .expect("verdict");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_settled_patch_page_is_made_once_per_stamp_and_shows_every_change_at_once() {
    let db = common::scratch().await;
    let srv = common::people_server(&db, true).await;
    let url = format!("{}/patches/3213", srv.base);
    let run = submit_fixture(&srv, "3213-lb-r1.txt").await;
    // In flight: made at every look, and the browser looks again.
    let a = page("GET", &url, None, None, None).await;
    assert!(a.body.contains("http-equiv=\"refresh\""), "{}", a.body);
    let first = stamp_of(&db, 3213).await;
    assert!(!first.settled, "{first:?}");
    // Decided: settled, under a new stamp, and shown at once.
    decide(&db, run, true).await;
    let decided = stamp_of(&db, 3213).await;
    assert!(
        decided.settled && decided.stamp != first.stamp,
        "{decided:?}"
    );
    let a = page("GET", &url, None, None, None).await;
    let verdict = a
        .body
        .split("id=\"verdict\">")
        .nth(1)
        .expect("verdict line");
    assert!(
        verdict.starts_with(&format!("patch 3213 r1 (run {run}): "))
            && verdict.contains("simulated fails with the patch"),
        "{verdict}"
    );
    assert!(!a.body.contains("http-equiv=\"refresh\""), "{}", a.body);
    // Made once for that stamp: what no stamp covers (nothing Certo changes; here a hand
    // edit of the stored steps) does not show while the stamp holds...
    sqlx::query("UPDATE engine_steps SET host = 'hand-edited' WHERE run_id = $1")
        .bind(run)
        .execute(db.store.pool())
        .await
        .expect("edit");
    let b = page("GET", &url, None, None, None).await;
    assert_eq!(b.body, a.body, "the page kept for its stamp");
    // ...and a certified verdict of another patch moves every stamp (the last good run of
    // a target may be the new one), so the page is made again and shows the edit.
    let other = submit_fixture(&srv, "3210-wms-sl4.txt").await;
    decide(&db, other, false).await;
    let moved = stamp_of(&db, 3213).await;
    assert_ne!(moved.stamp, decided.stamp);
    let c = page("GET", &url, None, None, None).await;
    assert!(c.body.contains("hand-edited"), "{}", c.body);
    // A rerun is in flight again at once, its run named.
    let again = certo_orchestrator::app::runs::rerun(&srv.ctx, 3213, false)
        .await
        .expect("rerun");
    let d = page("GET", &url, None, None, None).await;
    assert!(
        d.body.contains(&format!("Timeline of run {again}")),
        "{}",
        d.body
    );
    assert!(d.body.contains("http-equiv=\"refresh\""), "{}", d.body);
    // A new revision too.
    let _ = submit_fixture(&srv, "3213-lb-r2.yaml").await;
    let e = page("GET", &url, None, None, None).await;
    assert!(e.body.contains("Patch 3213 r2"), "{}", e.body);
}
