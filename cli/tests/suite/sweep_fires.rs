//! Scheduled sweeps on a real PostgreSQL: each fire time of the nightly schedule starts one
//! run whatever the number of workers looking, and fires missed while no worker ran are
//! recorded as skipped and made up by one catch-up run.

use chrono::{TimeZone, Utc};

use certo_orchestrator::engine::workflow::Workflow;

/// A schedule firing every hour on the hour, in UTC.
fn hourly() -> Workflow {
    Workflow::parse(
        "hourly.yaml",
        "name: hourly-sweep\nschedule: {cron: \"0 * * * *\", time_zone: UTC}\nsweep: {}\n\
         steps:\n  - {name: plan, per: run, timeout: 1m}\n  - {name: tests, needs: [plan], timeout: 1m}\n",
    )
    .expect("workflow")
}

fn cells() -> Vec<String> {
    vec![
        "3.2/sl5_x86_64/glite-WN".into(),
        "3.1/sl4_i386/glite-CE".into(),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn two_workers_at_one_fire_time_start_one_sweep() {
    let db = certo_testkit::scratch_db().await;
    let w = hourly();
    let t0 = Utc.with_ymd_and_hms(2026, 12, 1, 9, 59, 30).unwrap();
    // First look: the schedule becomes known; nothing before it was ever due.
    assert_eq!(
        db.store.fire_due(&w, &cells(), t0).await.expect("look"),
        None
    );
    // 10:00 has come: two workers (each its own pool) look at the same instant, many times.
    let other = certo_orchestrator::store::Store::connect(&db.url)
        .await
        .expect("second store");
    let at = Utc.with_ymd_and_hms(2026, 12, 1, 10, 0, 5).unwrap();
    let mut looks = Vec::new();
    for i in 0..8 {
        let store = if i % 2 == 0 {
            db.store.clone()
        } else {
            other.clone()
        };
        let (w, c) = (w.clone(), cells());
        looks.push(tokio::spawn(
            async move { store.fire_due(&w, &c, at).await },
        ));
    }
    let mut started = Vec::new();
    for l in looks {
        if let Some(f) = l.await.expect("task").expect("look") {
            started.push(f);
        }
    }
    assert_eq!(started.len(), 1, "{started:?}");
    assert_eq!(
        started[0].fire_at,
        Utc.with_ymd_and_hms(2026, 12, 1, 10, 0, 0).unwrap()
    );
    assert!(started[0].skipped.is_empty());
    let runs = db.store.runs_of("hourly-sweep", 10).await.expect("runs");
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0].targets, cells());
    assert_eq!(runs[0].priority, 0);
    // Later in the same hour: nothing more.
    let later = Utc.with_ymd_and_hms(2026, 12, 1, 10, 40, 0).unwrap();
    assert_eq!(
        db.store.fire_due(&w, &cells(), later).await.expect("look"),
        None
    );
    let fires = db.store.fires("hourly-sweep", 10).await.expect("fires");
    assert_eq!(fires.len(), 1, "{fires:?}");
    assert_eq!(
        (fires[0].state.as_str(), fires[0].run_id),
        ("fired", Some(runs[0].id))
    );
    db.drop_db().await.expect("drop");
}

#[tokio::test(flavor = "multi_thread")]
async fn fires_missed_while_no_worker_ran_are_skipped_and_made_up_by_one_sweep() {
    let db = certo_testkit::scratch_db().await;
    let w = hourly();
    let t0 = Utc.with_ymd_and_hms(2026, 12, 1, 7, 30, 0).unwrap();
    assert_eq!(
        db.store.fire_due(&w, &cells(), t0).await.expect("look"),
        None
    );
    let first = db
        .store
        .fire_due(
            &w,
            &cells(),
            Utc.with_ymd_and_hms(2026, 12, 1, 8, 0, 1).unwrap(),
        )
        .await
        .expect("look")
        .expect("08:00 fires");
    // No worker from 08:00 to 13:20: 09:00 … 12:00 were missed; one catch-up run at 13:00.
    let back = Utc.with_ymd_and_hms(2026, 12, 1, 13, 20, 0).unwrap();
    let catch_up = db
        .store
        .fire_due(&w, &cells(), back)
        .await
        .expect("look")
        .expect("a catch-up run");
    assert_eq!(
        catch_up.fire_at,
        Utc.with_ymd_and_hms(2026, 12, 1, 13, 0, 0).unwrap()
    );
    let missed: Vec<u32> = catch_up
        .skipped
        .iter()
        .map(chrono::Timelike::hour)
        .collect();
    assert_eq!(missed, vec![9, 10, 11, 12]);
    let fires = db.store.fires("hourly-sweep", 20).await.expect("fires");
    let states: Vec<(u32, &str)> = fires
        .iter()
        .map(|f| (chrono::Timelike::hour(&f.fire_at), f.state.as_str()))
        .collect();
    assert_eq!(
        states,
        vec![
            (13, "fired"),
            (12, "skipped"),
            (11, "skipped"),
            (10, "skipped"),
            (9, "skipped"),
            (8, "fired")
        ]
    );
    let runs = db.store.runs_of("hourly-sweep", 10).await.expect("runs");
    assert_eq!(
        runs.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![catch_up.run, first.run]
    );
    // The sweep knows which fire time it ran for and how many it made up for.
    assert_eq!(
        db.store.fire_of_run(catch_up.run).await.expect("fire"),
        Some((catch_up.fire_at, 4))
    );
    db.drop_db().await.expect("drop");
}

fn layer(
    byte: u8,
    parent: Option<u8>,
    kind: certo_imager::LayerKind,
    repo_sha: &str,
    installed: &[(&str, &str, &str)],
) -> certo_imager::LayerRecord {
    certo_imager::LayerRecord {
        digest: certo_imager::LayerDigest::from_bytes([byte; 32]),
        parent: parent.map(|p| certo_imager::LayerDigest::from_bytes([p; 32])),
        kind,
        backend: "dnf".into(),
        repositories: vec![("sl5-production".into(), repo_sha.into())],
        packages: Vec::new(),
        config_files: Vec::new(),
        installed: installed
            .iter()
            .map(|(n, v, a)| ((*n).to_owned(), (*v).to_owned(), (*a).to_owned()))
            .collect(),
        size_bytes: 1,
        build_seconds: 1.0,
        built_at: 1_796_000_000,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn what_changed_from_the_last_good_night_names_layers_repositories_and_package_versions() {
    use certo_imager::LayerKind::{Core, NodeType};
    let db = certo_testkit::scratch_db().await;
    let core = layer(1, None, Core, "aaaa", &[("bash", "3.2-24", "x86_64")]);
    let good = layer(
        2,
        Some(1),
        NodeType,
        "aaaa",
        &[
            ("bash", "3.2-24", "x86_64"),
            ("glite-wn", "3.2.0-1", "noarch"),
        ],
    );
    // The repository was refreshed: a new glite-wn, and a new dependency with it.
    let bad = layer(
        3,
        Some(1),
        NodeType,
        "bbbb",
        &[
            ("bash", "3.2-24", "x86_64"),
            ("glite-wn", "3.2.1-1", "noarch"),
            ("lcg-tags", "0.4-1", "noarch"),
        ],
    );
    db.store
        .record_layers(&[core.clone(), good.clone(), bad.clone()])
        .await
        .expect("layers");
    let cell = "3.2/sl5_x86_64/glite-WN";
    let nightly = Workflow::nightly();
    let night = |top: &certo_imager::LayerRecord, status: &'static str| {
        let (store, nightly, top) = (db.store.clone(), nightly.clone(), top.clone());
        let core = core.digest.to_hex();
        async move {
            let run = store
                .create_run(&nightly, None, &[cell.to_owned()])
                .await
                .expect("run");
            store
                .record_sweep_cell(
                    &certo_orchestrator::store::sweeps::SweepCellRow {
                        run_id: run,
                        cell: cell.into(),
                        state: "ran".into(),
                        reason: None,
                        image_digest: Some(top.digest.to_hex()),
                        layers: serde_json::json!([{"digest": core}, {"digest": top.digest.to_hex()}]),
                        class: None,
                        results_pruned: false,
                    },
                    &[("regression".into(), "wn-jobs".into(), status.into(), String::new())],
                )
                .await
                .expect("cell");
            run
        }
    };
    let first = night(&good, "pass").await;
    let second = night(&bad, "fail").await;
    let d = certo_orchestrator::app::sweeps::diff(&db.store, cell)
        .await
        .expect("diff")
        .expect("a change from good to bad");
    assert_eq!(d["last_good"]["sweep"], first, "{d:#}");
    assert_eq!(d["first_bad"]["sweep"], second, "{d:#}");
    assert_eq!(
        d["layers"],
        serde_json::json!([{"layer": "node_type", "before": good.digest.to_hex(), "after": bad.digest.to_hex()}]),
        "{d:#}"
    );
    assert_eq!(
        d["repositories"],
        serde_json::json!([{"layer": "node_type", "repository": "sl5-production", "before": "aaaa", "after": "bbbb"}]),
        "{d:#}"
    );
    assert_eq!(
        d["packages"],
        serde_json::json!([
            {"package": "glite-wn.noarch", "before": "3.2.0-1", "after": "3.2.1-1"},
            {"package": "lcg-tags.noarch", "before": null, "after": "0.4-1"},
        ]),
        "{d:#}"
    );
    // A cell that never went from good to bad has no such difference.
    assert_eq!(
        certo_orchestrator::app::sweeps::diff(&db.store, "3.1/sl4_i386/glite-CE")
            .await
            .expect("diff"),
        None
    );
    db.drop_db().await.expect("drop");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sweep_never_starves_certification_its_steps_are_claimed_after_certifiers() {
    let db = certo_testkit::scratch_db().await;
    let nightly = Workflow::nightly();
    let certify = Workflow::certify();
    // A whole-matrix sweep queued first, then a certifier's run (priority 10, as `runs::start`).
    let cells: Vec<String> = (0..40).map(|i| format!("3.2/sl5_x86_64/cell{i}")).collect();
    let sweep = db
        .store
        .create_run_with_priority(&nightly, None, &cells, 0)
        .await
        .expect("sweep");
    let cert = db
        .store
        .create_run_with_priority(&certify, None, &["3.2/sl5_x86_64/glite-WN".into()], 10)
        .await
        .expect("certification");
    // Both have a runnable first step (plan); a worker with one free slot takes the
    // certifier's, and only then the sweep's.
    let lease = std::time::Duration::from_secs(30);
    let first = db.store.claim_steps("w", 1, lease).await.expect("claim");
    assert_eq!(first.iter().map(|c| c.run).collect::<Vec<_>>(), vec![cert]);
    let next = db.store.claim_steps("w", 1, lease).await.expect("claim");
    assert_eq!(next.iter().map(|c| c.run).collect::<Vec<_>>(), vec![sweep]);
    db.drop_db().await.expect("drop");
}
