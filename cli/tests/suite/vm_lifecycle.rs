//! A VM's whole life — the host agent's code over libvirt's test driver (which boots
//! nothing: the test kit's simulated guest speaks the harness protocol) and the real
//! `certo vm run` process with PostgreSQL: push, boot, join, results, done, teardown;
//! a hung guest destroyed at its deadline; a kernel panic; bad requests refused.

use crate::common;

use std::sync::Arc;

use certo_hosts::hypervisor::Hypervisor;
use certo_testkit::hypervisor::Faulty;

use serde_json::Value;

/// A host agent for one test: the agent's own code in this process over a private
/// test-driver instance with simulated guests (the test kit's).
type Agent = certo_testkit::agent::SimulatedHost;

const TOKEN: &str = "lifecycle-host-token-0123456789";

async fn agent(name: &str) -> Agent {
    agent_over(name, 2, |hv| hv).await
}

/// [`agent`] over a hypervisor made from the simulated one (e.g. with faults injected).
async fn agent_over(
    name: &str,
    slots: usize,
    wrap: impl FnOnce(Arc<dyn Hypervisor>) -> Arc<dyn Hypervisor>,
) -> Agent {
    Agent::start(name, TOKEN, slots, wrap).await
}

fn vm_run(db: &str, agent: &Agent, extra: &[&str]) -> (i32, Value) {
    common::vm_run(db, agent, TOKEN, extra)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vm_runs_from_boot_to_results_and_is_torn_down() {
    let db = common::scratch().await;
    let a = agent("life1").await;
    let (code, v) = vm_run(&db.url, &a, &["--suite", "all", "--timeout", "60"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["state"], "done", "{v}");
    assert_eq!(
        v["fault"],
        Value::Null,
        "a passing run is nobody's fault: {v}"
    );
    let tests: Vec<(String, String)> = v["tests"]
        .as_array()
        .expect("tests")
        .iter()
        .map(|t| {
            (
                format!(
                    "{}/{}",
                    t["suite"].as_str().unwrap_or(""),
                    t["name"].as_str().unwrap_or("")
                ),
                t["status"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        tests,
        [
            ("basic/simulated".to_owned(), "pass".to_owned()),
            ("regression/simulated".to_owned(), "pass".to_owned())
        ]
    );
    let name = v["vm"].as_str().expect("vm");
    let row = db.store.vm(name).await.expect("vm").expect("row");
    assert_eq!(row.state, certo_orchestrator::model::VmState::Done);
    assert!(row.joined_at.is_some() && row.finished_at.is_some());
    assert!(row.token_used_up);
    assert_eq!(db.store.vm_results(row.id).await.expect("results").len(), 2);
    assert!(
        v["log"].as_str().expect("log").contains("all suites run"),
        "{v}"
    );
    // The agent tore it down.
    let body = reqwest::Client::new()
        .get(format!("{}/v1/vms/{name}", a.url))
        .header("authorization", format!("Bearer {TOKEN}"))
        .send()
        .await
        .expect("status")
        .bytes()
        .await
        .expect("body");
    let status: Value = serde_json::from_slice(&body).expect("json");
    assert_ne!(status["state"], "running", "{status}");
    db.drop_db().await.expect("drop");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_guest_is_destroyed_at_its_deadline_and_a_panic_is_explained() {
    let db = common::scratch().await;
    let a = agent("life2").await;
    let (code, v) = vm_run(&db.url, &a, &["--timeout", "3", "--fault", "hang"]);
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["state"], "timed_out", "{v}");
    assert_eq!(v["fault"], "infrastructure", "it never joined: {v}");
    assert!(
        v["reason"].as_str().expect("reason").contains("deadline"),
        "{v}"
    );
    // The serial log is kept.
    let log = v["serial_log"].as_str().expect("serial log");
    let path = log.split_once(':').map(|(_, p)| p).expect("host:path");
    let text = std::fs::read_to_string(path).expect("serial log kept");
    assert!(text.contains("hanging"), "{text}");

    let (code, v) = vm_run(&db.url, &a, &["--timeout", "30", "--fault", "panic"]);
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["state"], "crashed", "{v}");
    assert_eq!(
        v["fault"], "infrastructure",
        "it panicked before joining: {v}"
    );
    assert!(
        v["reason"].as_str().expect("reason").contains("panicked"),
        "{v}"
    );
    db.drop_db().await.expect("drop");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_refuses_what_it_should() {
    let a = agent("life3").await;
    let http = reqwest::Client::new();
    let boot = |body: &'static str, token: &'static str| {
        http.post(format!("{}/v1/vms", a.url))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let ok_body = r#"{"name":"certo-r1-x-a1","image":"nope","deadline_seconds":10,"guest":{"url":"http://10.0.2.2:1","vm":"certo-r1-x-a1","token":"t"}}"#;
    assert_eq!(boot(ok_body, "wrong-token").await.expect("r").status(), 401);
    assert_eq!(boot(ok_body, TOKEN).await.expect("r").status(), 404);
    let bad_name = r#"{"name":"../../etc","image":"nope","deadline_seconds":10,"guest":{"url":"u","vm":"../../etc","token":"t"}}"#;
    assert_eq!(boot(bad_name, TOKEN).await.expect("r").status(), 400);
    let bad_image = r#"{"name":"certo-r1-x-a1","image":"../x","deadline_seconds":10,"guest":{"url":"u","vm":"certo-r1-x-a1","token":"t"}}"#;
    assert_eq!(boot(bad_image, TOKEN).await.expect("r").status(), 400);
    let r = http
        .delete(format!("{}/v1/vms/..%2Fetc", a.url))
        .header("authorization", format!("Bearer {TOKEN}"))
        .send()
        .await
        .expect("r");
    assert_eq!(r.status(), 400);
}

/// Every route of `certo agent` but the liveness probe (which reads no state) refuses a
/// request without the host's token, and one with a wrong token, before it reads a body.
#[tokio::test(flavor = "multi_thread")]
async fn every_agent_route_refuses_a_request_without_a_valid_credential() {
    let a = agent("life-auth").await;
    let http = reqwest::Client::new();
    let routes: &[(&str, &str)] = &[
        ("GET", "/v1/info"),
        ("POST", "/v1/vms"),
        ("GET", "/v1/vms/certo-r1-x-a1"),
        ("DELETE", "/v1/vms/certo-r1-x-a1"),
        ("POST", "/v1/vms/certo-r1-x-a1/probe"),
        ("POST", "/v1/blocks/missing"),
        ("POST", "/v1/blocks"),
        ("GET", "/v1/images"),
        ("GET", "/v1/images/small.img"),
        ("PUT", "/v1/images/small.img"),
    ];
    for (method, path) in routes {
        for token in [None, Some("wrong-token"), Some("")] {
            let mut req = http
                .request(method.parse().expect("method"), format!("{}{path}", a.url))
                .body("{}");
            if let Some(t) = token {
                req = req.header("authorization", format!("Bearer {t}"));
            }
            let status = req.send().await.expect("request").status();
            assert_eq!(status, 401, "{method} {path} with token {token:?}");
        }
    }
    // The probe answers, and says nothing about the repository.
    let health = http
        .get(format!("{}/v1/health", a.url))
        .send()
        .await
        .expect("health");
    assert_eq!(health.status(), 200);
    let body = health.text().await.expect("body");
    assert!(
        !body.contains("images") && !body.contains("blocks"),
        "{body}"
    );
    // The scheme is case-insensitive: a lowercase `bearer` with the right token passes.
    let ok = http
        .get(format!("{}/v1/info", a.url))
        .header("authorization", format!("bearer {TOKEN}"))
        .send()
        .await
        .expect("info");
    assert_eq!(ok.status(), 200);
}

/// A host whose hypervisor cannot create the domain: the run ends `failed`, and it is the
/// infrastructure's fault, not the patch's.
#[tokio::test(flavor = "multi_thread")]
async fn a_boot_that_fails_on_the_host_is_the_infrastructures_fault() {
    let db = common::scratch().await;
    let a = agent_over("life-faulty", 2, |hv| {
        let faulty = Faulty::new(hv);
        faulty
            .fail_start
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Arc::new(faulty)
    })
    .await;
    let (code, v) = vm_run(&db.url, &a, &["--timeout", "30"]);
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["state"], "failed", "{v}");
    assert_eq!(v["fault"], "infrastructure", "{v}");
    let reason = v["reason"].as_str().expect("reason");
    assert!(
        reason.contains("could not boot") && reason.contains("injected failure"),
        "{v}"
    );
    db.drop_db().await.expect("drop");
}

/// With one slot, simultaneous boots get one slot between them; simultaneous boots of one
/// name start it once: the slot and the name are reserved in one step.
#[tokio::test(flavor = "multi_thread")]
async fn slots_and_names_are_reserved_in_one_step() {
    let a = agent_over("life-slots", 1, |hv| hv).await;
    let img = common::small_image(&a.dir.join("small.img"), 0);
    certo_transfer::Client::new(
        &a.url,
        certo_transfer::Token::new(TOKEN).expect("token"),
        certo_transfer::RetryPolicy::default(),
    )
    .expect("client")
    .push(&img, certo_transfer::PushOptions::new("small".to_owned()))
    .await
    .expect("push");
    let http = reqwest::Client::new();
    let boot = |name: String| {
        let http = http.clone();
        let url = format!("{}/v1/vms", a.url);
        async move {
            // A hung guest: it holds its slot until the test destroys it.
            let body = format!(
                r#"{{"name":"{name}","image":"small","deadline_seconds":60,"guest":{{"url":"http://10.0.2.2:1","vm":"{name}","token":"t","hang":true}}}}"#
            );
            http.post(url)
                .header("authorization", format!("Bearer {TOKEN}"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .expect("boot")
                .status()
                .as_u16()
        }
    };
    let statuses = futures_join((1..=8).map(|i| boot(format!("certo-r{i}-slot-a1")))).await;
    let started = statuses.iter().filter(|s| **s == 201).count();
    assert_eq!(started, 1, "8 boots at once on 1 slot: {statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 201 || *s == 503),
        "{statuses:?}"
    );
    for i in 1..=8 {
        let _ = http
            .delete(format!("{}/v1/vms/certo-r{i}-slot-a1", a.url))
            .header("authorization", format!("Bearer {TOKEN}"))
            .send()
            .await;
    }
    let statuses = futures_join((0..4).map(|_| boot("certo-r99-same-a1".to_owned()))).await;
    let started = statuses.iter().filter(|s| **s == 201).count();
    assert_eq!(started, 1, "one name 4 times at once: {statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 201 || *s == 409),
        "{statuses:?}"
    );
}

/// Runs the futures at once and collects their outputs in order.
async fn futures_join<F: Future<Output = u16> + Send + 'static>(
    futs: impl Iterator<Item = F>,
) -> Vec<u16> {
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}
