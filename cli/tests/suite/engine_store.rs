//! The engine's storage on a real PostgreSQL: runs created from a workflow, steps claimed
//! with SKIP LOCKED, fencing epochs, completion and successors in one transaction.

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use certo_orchestrator::engine::workflow::Workflow;
use certo_orchestrator::store::engine::{Claim, StepEnd};
use serde_json::json;

const WORKFLOW: &str = "name: w\nsteps:\n  - {name: plan, per: run, timeout: 1m}\n  \
    - {name: build, needs: [plan], timeout: 1m}\n  - {name: boot, needs: [build], timeout: 1m}\n  \
    - {name: test, needs: [boot], timeout: 1m}\n  - {name: teardown, needs: [boot], always: true, timeout: 1m}\n  \
    - {name: verdict, per: run, needs: [test, teardown], timeout: 1m}\n";

fn workflow() -> Workflow {
    Workflow::parse("w.yaml", WORKFLOW).expect("workflow")
}

fn targets() -> Vec<String> {
    vec![
        "3.2/sl5_x86_64/glite-WN".into(),
        "3.2/sl5_i386/glite-WN".into(),
    ]
}

/// Claims up to `n` steps for `worker` under a 30 s lease.
async fn claim(store: &certo_orchestrator::store::Store, worker: &str, n: i64) -> Vec<Claim> {
    store
        .claim_steps(worker, n, Duration::from_secs(30))
        .await
        .expect("claim")
}

/// Claims and ends steps until none is left, ending each with `end(claim)`; returns the
/// claims in the order they were made.
async fn drain(
    store: &certo_orchestrator::store::Store,
    end: impl Fn(&Claim) -> StepEnd,
) -> Vec<Claim> {
    let mut order = Vec::new();
    for _ in 0..100 {
        let claims = claim(store, "w1", 10).await;
        if claims.is_empty() {
            break;
        }
        for c in claims {
            assert!(store.finish_step(&c, end(&c)).await.expect("finish"));
            order.push(c);
        }
    }
    order
}

#[tokio::test]
async fn a_run_goes_through_its_steps_in_order_each_once() {
    let db = common::scratch().await;
    let run = db
        .store
        .create_run(&workflow(), None, &targets())
        .await
        .expect("create");
    let steps = db.store.run_steps(run).await.expect("steps");
    // 2 per-run steps + 4 per-target steps × 2 targets.
    assert_eq!(steps.len(), 10);
    let order = drain(&db.store, |_| StepEnd::Passed(json!({}))).await;
    assert_eq!(order.len(), 10, "{order:?}");
    let at: HashMap<(String, String), usize> = order
        .iter()
        .enumerate()
        .map(|(i, c)| ((c.target.clone(), c.name.clone()), i))
        .collect();
    for t in targets() {
        let pos = |n: &str| at[&(t.clone(), n.to_owned())];
        assert!(at[&(String::new(), "plan".to_owned())] < pos("build"));
        assert!(pos("build") < pos("boot") && pos("boot") < pos("test"));
        assert!(pos("boot") < pos("teardown"));
        assert!(pos("test") < at[&(String::new(), "verdict".to_owned())]);
        assert!(pos("teardown") < at[&(String::new(), "verdict".to_owned())]);
    }
    assert!(order.iter().all(|c| c.attempt == 1));
    // Epochs come from one sequence: every claim holds a higher one than every claim before.
    assert!(order.windows(2).all(|w| w[0].epoch < w[1].epoch));
    assert_eq!(
        db.store.run_state(run).await.expect("state").as_deref(),
        Some("passed")
    );
    db.drop_db().await.expect("drop");
}

#[tokio::test]
async fn a_failed_step_cancels_what_needs_it_but_teardown_still_runs() {
    let db = common::scratch().await;
    let run = db
        .store
        .create_run(&workflow(), None, &targets())
        .await
        .expect("create");
    let order = drain(&db.store, |c| {
        if c.name == "test" && c.target.contains("i386") {
            StepEnd::Failed(json!({"reason": "bug45678 fails"}))
        } else {
            StepEnd::Passed(json!({}))
        }
    })
    .await;
    let steps = db.store.run_steps(run).await.expect("steps");
    let state = |t: &str, n: &str| {
        steps
            .iter()
            .find(|s| s.target.contains(t) && s.name == n)
            .map(|s| s.state.clone())
            .expect("step")
    };
    assert_eq!(state("i386", "test"), "failed");
    assert_eq!(
        state("i386", "teardown"),
        "passed",
        "teardown runs after a failure"
    );
    assert_eq!(state("x86_64", "test"), "passed");
    assert_eq!(state("", "verdict"), "cancelled");
    assert!(order.iter().all(|c| c.name != "verdict"));
    assert_eq!(
        db.store.run_state(run).await.expect("state").as_deref(),
        Some("failed")
    );
    db.drop_db().await.expect("drop");
}

#[tokio::test]
async fn a_stale_worker_cannot_write_after_its_lease_was_taken_over() {
    let db = common::scratch().await;
    let run = db
        .store
        .create_run(&workflow(), None, &targets())
        .await
        .expect("create");
    let first = db
        .store
        .claim_steps("slow", 1, Duration::from_millis(200))
        .await
        .expect("claim");
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].name, "plan");
    // Within the lease nobody else gets it.
    assert!(claim(&db.store, "other", 10).await.is_empty());
    tokio::time::sleep(Duration::from_millis(400)).await;
    // The lease expired (by the database's clock): another worker takes the step over.
    let second = claim(&db.store, "fast", 1).await;
    assert_eq!(second.len(), 1);
    assert_eq!((second[0].step, second[0].attempt), (first[0].step, 2));
    assert!(second[0].epoch > first[0].epoch);
    // The first worker comes back: its writes are refused and change nothing.
    assert!(
        !db.store
            .extend_lease(&first[0], Duration::from_secs(30))
            .await
            .expect("extend")
    );
    assert!(
        !db.store
            .finish_step(&first[0], StepEnd::Failed(json!({"late": true})))
            .await
            .expect("finish")
    );
    let plan = db.store.run_steps(run).await.expect("steps").remove(0);
    assert_eq!(
        (plan.state.as_str(), plan.epoch),
        ("running", second[0].epoch)
    );
    assert!(
        db.store
            .finish_step(&second[0], StepEnd::Passed(json!({})))
            .await
            .expect("finish")
    );
    db.drop_db().await.expect("drop");
}

#[tokio::test]
async fn a_retried_step_waits_its_delay_and_runs_again_with_a_new_epoch() {
    let db = common::scratch().await;
    db.store
        .create_run(&workflow(), None, &targets())
        .await
        .expect("create");
    let c = claim(&db.store, "w", 1).await.remove(0);
    assert!(
        db.store
            .finish_step(
                &c,
                StepEnd::Retry {
                    after: Duration::from_millis(300),
                    why: json!({"host": "lost"})
                }
            )
            .await
            .expect("finish")
    );
    assert!(claim(&db.store, "w", 5).await.is_empty());
    tokio::time::sleep(Duration::from_millis(450)).await;
    let again = claim(&db.store, "w", 5).await;
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].step, again[0].attempt), (c.step, 2));
    assert!(again[0].epoch > c.epoch);
    db.drop_db().await.expect("drop");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_workers_never_claim_one_step_twice() {
    let db = common::scratch().await;
    let wide = Workflow::parse(
        "wide.yaml",
        "name: wide\nsteps:\n  - {name: a, timeout: 1m}\n  - {name: b, timeout: 1m}\n",
    )
    .expect("workflow");
    let targets: Vec<String> = (0..100).map(|i| format!("t{i}")).collect();
    db.store
        .create_run(&wide, None, &targets)
        .await
        .expect("create");
    let mut tasks = Vec::new();
    for w in 0..4 {
        let store = db.store.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let claims = claim(&store, &format!("w{w}"), 7).await;
                if claims.is_empty() {
                    break got;
                }
                for c in claims {
                    assert!(
                        store
                            .finish_step(&c, StepEnd::Passed(json!({})))
                            .await
                            .expect("finish")
                    );
                    got.push(c.step);
                }
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    let n = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!(
        (n, all.len()),
        (200, 200),
        "every step claimed exactly once"
    );
    db.drop_db().await.expect("drop");
}
