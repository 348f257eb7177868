//! Submission semantics against a real PostgreSQL database, through the
//! library and through the `certo` binary.

use crate::common;

use certo_orchestrator::catalogue::Catalogue;
use certo_orchestrator::patch::{self, LoadedRecord};
use certo_orchestrator::store::{PatchState, SubmitError, SubmitOutcome};

fn record(name: &str, text: &str) -> LoadedRecord {
    let mut recs = patch::load(name, text.as_bytes(), None, &Catalogue::builtin()).expect(name);
    recs.remove(0)
}

fn text_record(id: u64, revision: u32, package: &str) -> String {
    format!(
        "Patch: {id}\nRevision: {revision}\nTitle: test patch {id}\nRelease: gLite 3.2\nPlatforms: sl5_x86_64\nNode types: glite-UI\nRPMs:\n  {package}\nSubmitter: tester\n"
    )
}

#[tokio::test]
async fn fixtures_are_stored_and_listed() {
    let db = common::scratch().await;
    let records = common::load_valid();
    let reports = db.store.submit(&records).await.expect("submit");
    assert_eq!(reports.len(), records.len());
    // Patch 3213 comes in two revisions: r2 supersedes r1 within the batch.
    let all = db.store.list_patches(None, None).await.expect("list");
    assert_eq!(all.len(), records.len());
    let r1 = all
        .iter()
        .find(|r| r.patch_id == 3213 && r.revision == 1)
        .expect("3213 r1");
    assert_eq!(r1.state, PatchState::Superseded);
    assert_eq!(r1.superseded_by, Some(2));
    let current = db
        .store
        .list_patches(Some(PatchState::Submitted), None)
        .await
        .expect("list");
    // Two records the tracker has past or out of certification (3522 Certified, 3523
    // Rejected) are stored and shown, not queued.
    let recorded = db
        .store
        .list_patches(Some(PatchState::Recorded), None)
        .await
        .expect("list");
    let recorded: Vec<(u64, &str)> = recorded
        .iter()
        .map(|r| (r.patch_id, r.record.status.as_str()))
        .collect();
    assert_eq!(recorded, [(3522, "Certified"), (3523, "Rejected")]);
    assert_eq!(current.len(), records.len() - 1 - recorded.len());
    let only_31 = db
        .store
        .list_patches(None, Some("3.1"))
        .await
        .expect("list");
    assert!(only_31.iter().all(|r| r.record.release == "3.1") && !only_31.is_empty());
    // Packages and bugs are queryable on their own.
    let (packages, bugs): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM patch_packages), (SELECT count(*) FROM patch_bugs)",
    )
    .fetch_one(db.store.pool())
    .await
    .expect("count");
    let expected_packages: usize = records.iter().map(|r| r.record.packages.len()).sum();
    let expected_bugs: usize = records.iter().map(|r| r.record.bugs.len()).sum();
    assert_eq!(
        (packages as usize, bugs as usize),
        (expected_packages, expected_bugs)
    );
    // The stored record reads back identical.
    let shown = db
        .store
        .get_patch(3456, None)
        .await
        .expect("get")
        .expect("3456");
    let original = records.iter().find(|r| r.record.id == 3456).expect("3456");
    assert_eq!(shown.record, original.record);
    assert_eq!(shown.content_sha256, original.digest);
    db.drop_db().await.expect("drop");
}

#[tokio::test]
async fn resubmitting_the_same_content_is_a_no_op() {
    let db = common::scratch().await;
    let a = record("a.txt", &text_record(100, 1, "a-1.0-1.noarch.rpm"));
    let first = db
        .store
        .submit(std::slice::from_ref(&a))
        .await
        .expect("first");
    assert_eq!(first[0].outcome, SubmitOutcome::Stored { supersedes: None });
    let before = common::snapshot(&db).await;
    // The same content written as YAML is the same record.
    let yaml = record(
        "a.yaml",
        "id: 100\nrevision: 1\ntitle: test patch 100\nrelease: '3.2'\nplatforms: [sl5_x86_64]\nnode_types: [glite-UI]\npackages: [a-1.0-1.noarch.rpm]\nsubmitter: tester\n",
    );
    let again = db.store.submit(&[a, yaml]).await.expect("again");
    assert!(again.iter().all(|r| r.outcome == SubmitOutcome::Unchanged));
    assert_eq!(common::snapshot(&db).await, before);
    db.drop_db().await.expect("drop");
}

#[tokio::test]
async fn same_revision_with_other_content_is_refused_and_changes_nothing() {
    let db = common::scratch().await;
    db.store
        .submit(&[record("a.txt", &text_record(101, 1, "a-1.0-1.noarch.rpm"))])
        .await
        .expect("first");
    let before = common::snapshot(&db).await;
    let other = record("b.txt", &text_record(101, 1, "a-1.0-2.noarch.rpm"));
    let fresh = record("c.txt", &text_record(102, 1, "c-1.0-1.noarch.rpm"));
    match db.store.submit(&[fresh, other]).await {
        Err(SubmitError::Conflicts(errors)) => {
            assert_eq!(errors.len(), 1);
            assert_eq!(
                errors[0].to_string(),
                "b.txt:1:1: revision: patch 101 revision 1 is already submitted with different content (in the store); submit the change as revision 2"
            );
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    // The batch's other, valid record was not stored either.
    assert_eq!(common::snapshot(&db).await, before);
    assert!(db.store.get_patch(102, None).await.expect("get").is_none());
    db.drop_db().await.expect("drop");
}

#[tokio::test]
async fn one_revision_twice_in_a_batch_with_other_content_is_refused() {
    let db = common::scratch().await;
    let a = record("a.txt", &text_record(105, 1, "a-1.0-1.noarch.rpm"));
    let b = record("b.txt", &text_record(105, 1, "a-1.0-9.noarch.rpm"));
    match db.store.submit(&[a.clone(), b]).await {
        Err(SubmitError::Conflicts(errors)) => assert_eq!(
            errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "b.txt:1:1: revision: patch 105 revision 1 is already submitted with different content (in a.txt:1); submit the change as revision 2"
            ]
        ),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert!(db.store.get_patch(105, None).await.expect("get").is_none());
    // The same content twice in one batch is stored once.
    let reports = db.store.submit(&[a.clone(), a]).await.expect("same twice");
    assert_eq!(
        reports
            .iter()
            .map(|r| r.outcome.clone())
            .collect::<Vec<_>>(),
        [
            SubmitOutcome::Stored { supersedes: None },
            SubmitOutcome::Unchanged
        ]
    );
    db.drop_db().await.expect("drop");
}

#[tokio::test]
async fn a_higher_revision_supersedes_and_an_older_one_is_refused() {
    let db = common::scratch().await;
    db.store
        .submit(&[record("r1.txt", &text_record(103, 1, "a-1.0-1.noarch.rpm"))])
        .await
        .expect("r1");
    let r3 = db
        .store
        .submit(&[record("r3.txt", &text_record(103, 3, "a-1.0-3.noarch.rpm"))])
        .await
        .expect("r3");
    assert_eq!(
        r3[0].outcome,
        SubmitOutcome::Stored {
            supersedes: Some(1)
        }
    );
    let revisions = db.store.revisions(103).await.expect("revisions");
    assert_eq!(
        revisions,
        [(1, PatchState::Superseded), (3, PatchState::Submitted)]
    );
    let newest = db
        .store
        .get_patch(103, None)
        .await
        .expect("get")
        .expect("103");
    assert_eq!(newest.revision, 3);
    let events: Vec<String> = db
        .store
        .events(103)
        .await
        .expect("events")
        .into_iter()
        .map(|e| format!("r{} {}", e.revision, e.kind))
        .collect();
    assert_eq!(events, ["r1 submitted", "r1 superseded", "r3 submitted"]);

    let before = common::snapshot(&db).await;
    match db
        .store
        .submit(&[record("r2.txt", &text_record(103, 2, "a-1.0-2.noarch.rpm"))])
        .await
    {
        Err(SubmitError::Conflicts(errors)) => assert!(
            errors[0]
                .message
                .contains("revision 2 is older than its stored revision 3"),
            "{}",
            errors[0]
        ),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(common::snapshot(&db).await, before);
    db.drop_db().await.expect("drop");
}

#[tokio::test]
async fn concurrent_submissions_of_one_record_store_it_once() {
    let db = common::scratch().await;
    let a = record("a.txt", &text_record(104, 1, "a-1.0-1.noarch.rpm"));
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let store = db.store.clone();
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            store.submit(&[a]).await.map(|r| r[0].outcome.clone())
        }));
    }
    let mut stored = 0;
    for t in tasks {
        match t.await.expect("join").expect("submit") {
            SubmitOutcome::Stored { .. } => stored += 1,
            SubmitOutcome::Unchanged => {}
        }
    }
    assert_eq!(stored, 1);
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM patches WHERE patch_id = 104")
        .fetch_one(db.store.pool())
        .await
        .expect("count");
    assert_eq!(count, 1);
    db.drop_db().await.expect("drop");
}

#[tokio::test]
async fn the_cli_refuses_every_malformed_fixture_and_the_store_stays_as_it_was() {
    let db = common::scratch().await;
    let valid = common::fixtures().join("valid");
    let out = common::certo(&db.url, &["submit", valid.to_str().expect("utf-8")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = common::snapshot(&db).await;
    let patches = before
        .iter()
        .find(|t| t.0 == "patches")
        .expect("patches table");
    assert!(patches.1 >= 12, "{before:?}");

    let expected =
        std::fs::read_to_string(common::fixtures().join("invalid-expected.txt")).expect("expected");
    let files =
        certo_orchestrator::ingest::expand(&[common::fixtures().join("invalid")]).expect("list");
    for file in &files {
        let out = common::certo(&db.url, &["submit", file.to_str().expect("utf-8")]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {stderr}", file.display());
        let name = file.file_name().and_then(|n| n.to_str()).expect("name");
        // Each expected line appears, with the path as given on the command line.
        for line in expected
            .lines()
            .filter(|l| l.starts_with(&format!("{name}:")))
        {
            let with_path = format!("{}{}", file.display(), &line[name.len()..]);
            assert!(
                stderr.contains(&with_path),
                "{name}: missing `{with_path}` in:\n{stderr}"
            );
        }
        assert!(stderr.contains("nothing was stored"), "{stderr}");
        assert_eq!(
            common::snapshot(&db).await,
            before,
            "{name} changed the store"
        );
    }

    // A batch mixing a new valid record with a malformed one stores nothing.
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("good.txt");
    std::fs::write(&good, text_record(4999, 1, "good-1.0-1.noarch.rpm")).expect("write");
    let out = common::certo(
        &db.url,
        &[
            "submit",
            good.to_str().expect("utf-8"),
            files[0].to_str().expect("utf-8"),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(common::snapshot(&db).await, before);
    db.drop_db().await.expect("drop");
}

#[tokio::test]
async fn the_cli_lists_and_shows_patches_as_json() {
    let db = common::scratch().await;
    let valid = common::fixtures().join("valid");
    let out = common::certo(
        &db.url,
        &["submit", "--json", valid.to_str().expect("utf-8")],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let submitted: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(submitted["stored"], true);

    // Submitting again says so, and changes nothing.
    let out = common::certo(&db.url, &["submit", valid.to_str().expect("utf-8")]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        stdout.lines().all(|l| l.starts_with("unchanged")),
        "{stdout}"
    );

    let out = common::certo(&db.url, &["patches", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("json");
    assert!(
        list.iter()
            .all(|p| p["state"] == "submitted" || p["state"] == "recorded"),
        "{list:?}"
    );
    assert_eq!(
        list.iter().filter(|p| p["state"] == "recorded").count(),
        2,
        "{list:?}"
    );
    assert!(
        list.iter()
            .any(|p| p["patch_id"] == 3456 && p["revision"] == 2)
    );
    assert!(
        !list
            .iter()
            .any(|p| p["patch_id"] == 3213 && p["revision"] == 1)
    );

    let out = common::certo(&db.url, &["patches", "--state", "superseded", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(list.len(), 1);
    assert_eq!(
        (
            list[0]["patch_id"].as_u64(),
            list[0]["superseded_by"].as_u64()
        ),
        (Some(3213), Some(2))
    );

    let out = common::certo(&db.url, &["show", "3213", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(shown["revision"], 2);
    assert_eq!(
        shown["record"]["bugs"][0]["regression_test"],
        "glite-LB/bug40410"
    );
    assert_eq!(shown["revisions"].as_array().map(Vec::len), Some(2));

    let out = common::certo(&db.url, &["show", "3213@1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Patch 3213 revision 1") && text.contains("superseded (by revision 2)"),
        "{text}"
    );

    let out = common::certo(&db.url, &["show", "999999"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("patch 999999 is not stored"));

    let out = common::certo(&db.url, &["patches", "--state", "bogus"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown state `bogus`"));
    db.drop_db().await.expect("drop");
}

/// The same patch written with the tracker's labels and spellings and with Certo's keys is
/// one record to the store (the second submit is a no-op) and `show` prints it alike.
#[tokio::test]
async fn a_tracker_spelled_record_stores_and_shows_like_certos_own() {
    let db = common::scratch().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let certo_form = dir.path().join("certo.yaml");
    std::fs::write(
        &certo_form,
        "id: 3620\nrevision: 1\ntitle: CREAM 1.12 for SL5\nstatus: In Certification\nrelease: \"3.2\"\n\
         platforms: [sl5_x86_64]\nnode_types: [glite-CE]\nbugs: [50001]\n\
         packages: [glite-ce-cream-1.12.0-3.sl5.x86_64.rpm]\nsubmitter: asmith\n",
    )
    .expect("write");
    let tracker_form = dir.path().join("tracker.txt");
    std::fs::write(
        &tracker_form,
        "Patch: 3620\nRevision: 1\nSummary: CREAM 1.12 for SL5\nStatus: in certification\nRelease: 3.2.0\n\
         Platform: SL5 x86_64\nAffected metapackages: glite-CREAM\nAssociated bugs: 50001\n\
         RPM names: glite-ce-cream-1.12.0-3.sl5.x86_64.rpm\nSubmitted by: asmith\n",
    )
    .expect("write");
    let out = common::certo(&db.url, &["submit", certo_form.to_str().expect("utf-8")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown_before = common::certo(&db.url, &["show", "3620", "--json"]);
    let out = common::certo(&db.url, &["submit", tracker_form.to_str().expect("utf-8")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("unchanged  patch 3620 r1 (already stored with the same content)"),
        "{stdout}"
    );
    let shown_after = common::certo(&db.url, &["show", "3620", "--json"]);
    assert_eq!(
        String::from_utf8_lossy(&shown_before.stdout),
        String::from_utf8_lossy(&shown_after.stdout)
    );
    let shown: serde_json::Value = serde_json::from_slice(&shown_after.stdout).expect("json");
    let text = shown.to_string();
    assert!(
        text.contains("\"glite-CE\"") && text.contains("\"sl5_x86_64\""),
        "{text}"
    );
    db.drop_db().await.expect("drop");
}
