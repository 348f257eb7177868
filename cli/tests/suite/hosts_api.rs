//! The orchestrator's host and guest API over real HTTP against a real PostgreSQL:
//! per-host and per-VM authentication, the guest protocol, the testbed registry and its
//! health checks.

use crate::common;

use std::time::Duration;

use certo_orchestrator::api::{self, ApiState};
use certo_orchestrator::store::NewVm;

struct Api {
    base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Api {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn api(store: &certo_orchestrator::store::Store, health: Duration) -> Api {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(api::serve(
        listener,
        ApiState::protocols(store.clone()),
        health,
        async move {
            let _ = rx.await;
        },
    ));
    Api {
        base,
        stop: Some(tx),
    }
}

async fn post(
    url: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut req = reqwest::Client::new().post(url).body(body.to_owned());
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

/// The session key a join answered with (its `session KEY` line).
fn session_of(plan: &str) -> String {
    plan.lines()
        .find_map(|l| l.strip_prefix("session "))
        .unwrap_or_else(|| panic!("no session line in {plan:?}"))
        .to_owned()
}

/// Stands in for a run's driver and its host's agent: every pending probe of `vms` is
/// answered with `outcome`, as `vm run` records what the agent saw on the port. Stops when
/// dropped.
fn host_looks(
    store: certo_orchestrator::store::Store,
    vms: Vec<i64>,
    outcome: certo_orchestrator::store::ProbeOutcomeKind,
) -> AbortOnDrop {
    AbortOnDrop(tokio::spawn(async move {
        loop {
            for &vm in &vms {
                for (service, port) in store.pending_probes(vm).await.expect("probes") {
                    store
                        .record_probe(vm, &service, port, outcome, "test banner 1.0")
                        .await
                        .expect("record");
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }))
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn new_vm(
    store: &certo_orchestrator::store::Store,
    name: &str,
    node_type: &str,
    patch: Option<(u64, i32)>,
) -> (i64, String) {
    store
        .add_host("h1", &api::token_digest("host-one-token"))
        .await
        .expect("host");
    let token = api::new_token().expect("token");
    let vm = store
        .create_vm(&NewVm {
            name,
            host: "h1",
            image: "img",
            node_type,
            patch: patch.map(|(id, rev)| (certo_orchestrator::model::PatchId(id), rev)),
            attempt: 1,
            suite: certo_orchestrator::model::Suite::All,
            token_sha256: &api::token_digest(&token),
            deadline: chrono::Utc::now() + chrono::Duration::minutes(5),
        })
        .await
        .expect("vm");
    (vm.id, token)
}

#[tokio::test(flavor = "multi_thread")]
async fn hosts_act_only_for_themselves() {
    let db = common::scratch().await;
    let api = api(&db.store, Duration::from_secs(60)).await;
    db.store
        .add_host("alpha", &api::token_digest("alpha-secret"))
        .await
        .expect("add");
    db.store
        .add_host("beta", &api::token_digest("beta-secret"))
        .await
        .expect("add");
    let reg = r#"{"agent_url":"http://10.0.0.2:7310","libvirt_uri":"qemu:///system","slots":2,"memory_mib":4096,"vcpus":2}"#;
    let url = |h: &str, what: &str| format!("{}/api/v1/hosts/{h}/{what}", api.base);
    assert_eq!(post(&url("alpha", "register"), None, &[], reg).await.0, 401);
    assert_eq!(
        post(&url("alpha", "register"), Some("beta-secret"), &[], reg)
            .await
            .0,
        403
    );
    assert_eq!(
        post(&url("beta", "heartbeat"), Some("alpha-secret"), &[], "")
            .await
            .0,
        403
    );
    let (status, body) = post(&url("alpha", "register"), Some("alpha-secret"), &[], reg).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = post(
        &url("alpha", "register"),
        Some("alpha-secret"),
        &[],
        "{\"slots\": -1}",
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = post(&url("alpha", "heartbeat"), Some("alpha-secret"), &[], "").await;
    assert_eq!(status, 200);
    assert_eq!(body, r#"{"live_vms":[]}"#);
    let hosts = db.store.list_hosts().await.expect("hosts");
    let alpha = hosts.iter().find(|h| h.name == "alpha").expect("alpha");
    assert_eq!(alpha.slots, Some(2));
    assert!(alpha.last_heartbeat.is_some());
    assert!(
        hosts
            .iter()
            .find(|h| h.name == "beta")
            .expect("beta")
            .registered_at
            .is_none()
    );
    drop(api);
    db.drop_db().await.expect("drop");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_guest_protocol_records_a_run_and_its_token_is_good_once_and_for_one_vm() {
    let db = common::scratch().await;
    let api = api(&db.store, Duration::from_secs(60)).await;
    let (id, token) = new_vm(
        &db.store,
        "certo-r1-glite-wn-a1",
        "glite-WN",
        Some((3456, 2)),
    )
    .await;
    let (_, other) = new_vm(&db.store, "certo-r2-glite-ui-a1", "glite-UI", None).await;
    let u = |what: &str| format!("{}/api/v1/guest/{what}", api.base);
    // The harness names its VM in every call (X-Certo-VM).
    let wn = [("x-certo-vm", "certo-r1-glite-wn-a1")];

    // No token, an unknown one, or one presented with another VM's name: refused.
    assert_eq!(post(&u("join"), None, &[], "").await.0, 401);
    assert_eq!(post(&u("join"), Some("not-a-token"), &[], "").await.0, 401);
    let (status, body) = post(
        &u("join"),
        Some(&token),
        &[("x-certo-vm", "certo-r2-glite-ui-a1")],
        "",
    )
    .await;
    assert_eq!(status, 403, "{body}");

    // Join: a hostname and the test plan.
    let (status, plan) = post(
        &u("join"),
        Some(&token),
        &[("x-certo-vm", "certo-r1-glite-wn-a1")],
        "",
    )
    .await;
    assert_eq!(status, 200, "{plan}");
    let session = session_of(&plan);
    assert_ne!(session, token);
    assert!(
        plan.contains(&format!("\nhostname wn-{id}.certo\nnode_type glite-WN\n")),
        "{plan}"
    );
    assert!(
        plan.contains("test basic /usr/share/glite-tests/glite-WN/basic/*.sh\n"),
        "{plan}"
    );
    assert!(
        plan.contains("test regression /usr/share/glite-tests/glite-WN/regression/*.sh\n"),
        "{plan}"
    );
    // A second join with the same token (a replayed boot) is refused.
    assert_eq!(post(&u("join"), Some(&token), &wn, "").await.0, 409);

    // After join the VM token acts for nothing: a patch's code that found it cannot report.
    for (what, body) in [
        ("service", "forged 2812 up"),
        ("result", "basic forged pass 0.1\n"),
        ("log", "forged\n"),
        ("done", "ok"),
    ] {
        let (status, text) = post(&u(what), Some(&token), &wn, body).await;
        assert_eq!(status, 401, "{what}: {text}");
        assert!(text.contains("only the session key"), "{what}: {text}");
    }
    // Nor does the session key for another VM.
    let (status, text) = post(
        &u("result"),
        Some(&session),
        &[("x-certo-vm", "certo-r2-glite-ui-a1")],
        "basic forged pass 0.1\n",
    )
    .await;
    assert_eq!(status, 403, "{text}");
    // The host looks at each reported service from outside before it joins the testbed.
    let _looking = host_looks(
        db.store.clone(),
        vec![id],
        certo_orchestrator::store::ProbeOutcomeKind::Answered,
    );

    // Services join the patch's slice.
    let (status, body) = post(&u("service"), Some(&session), &wn, "glite-wn-info 2811 up").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("answered from outside: test banner 1.0"),
        "{body}"
    );
    // A service that does not answer on its port from outside is not taken on the guest's word.
    drop(_looking);
    let _looking = host_looks(
        db.store.clone(),
        vec![id],
        certo_orchestrator::store::ProbeOutcomeKind::Silent,
    );
    let (status, body) = post(&u("service"), Some(&session), &wn, "glite-wn-dead 2999 up").await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body.contains("nothing answered there from outside the guest"),
        "{body}"
    );
    assert_eq!(
        post(&u("service"), Some(&session), &wn, "x notaport up")
            .await
            .0,
        400
    );
    assert_eq!(
        post(&u("service"), Some(&session), &wn, "../etc 1 up")
            .await
            .0,
        400
    );

    // Results: validated first line, output kept.
    let (status, body) = post(
        &u("result"),
        Some(&session),
        &wn,
        "basic 10-yaim-check pass 0.4\nall fine\n",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    post(
        &u("result"),
        Some(&session),
        &wn,
        "regression bug45678 fail 1.5\nWN_LIST empty\n",
    )
    .await;
    assert_eq!(
        post(&u("result"), Some(&session), &wn, "basic x maybe 1\n")
            .await
            .0,
        400
    );
    assert_eq!(
        post(&u("result"), Some(&session), &wn, "basic ../x pass 1\n")
            .await
            .0,
        400
    );

    let services = db
        .store
        .services(Some("patch-3456"))
        .await
        .expect("services");
    assert_eq!(services.len(), 1);
    assert_eq!(services[0].endpoint, format!("wn-{id}.certo:2811"));

    // Done: the run is recorded, the slice's services leave the testbed, the token is used up.
    let (status, _) = post(&u("done"), Some(&session), &wn, "ok").await;
    assert_eq!(status, 200);
    let vm = db
        .store
        .vm("certo-r1-glite-wn-a1")
        .await
        .expect("vm")
        .expect("row");
    assert_eq!(vm.state, certo_orchestrator::model::VmState::Done);
    assert!(vm.finished_at.is_some());
    let results = db.store.vm_results(vm.id).await.expect("results");
    let got: Vec<(&str, &str, &str)> = results
        .iter()
        .map(|r| (r.suite.as_str(), r.name.as_str(), r.status.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("basic", "10-yaim-check", "pass"),
            ("regression", "bug45678", "fail")
        ]
    );
    assert_eq!(results[0].output, "all fine\n");
    assert!(
        db.store
            .services(Some("patch-3456"))
            .await
            .expect("s")
            .is_empty()
    );
    let (status, body) = post(&u("result"), Some(&session), &wn, "basic late pass 1\n").await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("used up"), "{body}");

    // The other VM's token still works for that VM alone.
    let (status, plan) = post(
        &u("join"),
        Some(&other),
        &[("x-certo-vm", "certo-r2-glite-ui-a1")],
        "",
    )
    .await;
    assert_eq!(status, 200);
    let other_session = session_of(&plan);
    let (status, _) = post(
        &u("done"),
        Some(&other_session),
        &[("x-certo-vm", "certo-r2-glite-ui-a1")],
        "error the services did not start",
    )
    .await;
    assert_eq!(status, 200);
    let vm = db
        .store
        .vm("certo-r2-glite-ui-a1")
        .await
        .expect("vm")
        .expect("row");
    assert_eq!(vm.state, certo_orchestrator::model::VmState::Failed);
    assert_eq!(
        vm.reason.as_deref(),
        Some("the harness reported: the services did not start")
    );
    drop(api);
    db.drop_db().await.expect("drop");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slice_cannot_replace_a_shared_service_and_dead_services_turn_unhealthy() {
    let db = common::scratch().await;
    // A shared top BDII, really listening.
    let bdii = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = bdii.local_addr().expect("addr").to_string();
    let data = std::env::temp_dir().join(format!("certo-testbed-{}", std::process::id()));
    let out = common::certo(
        &db.url,
        &[
            "--data-dir",
            data.to_str().expect("utf-8"),
            "testbed",
            "add",
            "top-bdii",
            "--node-type",
            "glite-BDII",
            "--endpoint",
            &endpoint,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let api = api(&db.store, Duration::from_millis(200)).await;
    let (bdii_id, token) = new_vm(
        &db.store,
        "certo-r9-glite-bdii-a1",
        "glite-BDII",
        Some((3506, 1)),
    )
    .await;
    let u = |what: &str| format!("{}/api/v1/guest/{what}", api.base);
    let bdii_vm = [("x-certo-vm", "certo-r9-glite-bdii-a1")];
    let wn = [("x-certo-vm", "certo-r10-glite-wn-a1")];
    let (status, plan) = post(&u("join"), Some(&token), &bdii_vm, "").await;
    assert_eq!(status, 200, "{plan}");
    let token = session_of(&plan);
    let _looking = host_looks(
        db.store.clone(),
        vec![bdii_id],
        certo_orchestrator::store::ProbeOutcomeKind::Answered,
    );
    // Patch 3506's service claims the shared service's name: refused, the shared one stays.
    let (status, body) = post(&u("service"), Some(&token), &bdii_vm, "top-bdii 2170 up").await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body.contains("cannot take over a service other patches use"),
        "{body}"
    );
    let shared = db.store.services(None).await.expect("services");
    assert_eq!(shared.len(), 1);
    assert_eq!(shared[0].endpoint, endpoint);

    // A slice sees the shared services and its own, not another patch's.
    let (other_id, other) = new_vm(
        &db.store,
        "certo-r10-glite-wn-a1",
        "glite-WN",
        Some((3456, 2)),
    )
    .await;
    let (status, plan) = post(&u("join"), Some(&other), &wn, "").await;
    assert_eq!(status, 200, "{plan}");
    let other = session_of(&plan);
    let _looking_too = host_looks(
        db.store.clone(),
        vec![other_id],
        certo_orchestrator::store::ProbeOutcomeKind::Answered,
    );
    assert_eq!(
        post(&u("service"), Some(&other), &wn, "wn-info 2811 up")
            .await
            .0,
        200
    );
    let (status, own) = post(&u("service"), Some(&token), &bdii_vm, "bdii-top 2171 up").await;
    assert_eq!(status, 200, "{own}");
    let seen = reqwest::Client::new()
        .get(u("testbed"))
        .header("authorization", format!("Bearer {token}"))
        .header("x-certo-vm", "certo-r9-glite-bdii-a1")
        .send()
        .await
        .expect("testbed")
        .text()
        .await
        .expect("text");
    let names: Vec<&str> = seen.lines().filter_map(|l| l.split(' ').next()).collect();
    assert_eq!(names, ["top-bdii", "bdii-top"], "{seen}");
    assert!(
        seen.lines()
            .next()
            .is_some_and(|l| l.ends_with(" shared healthy")),
        "{seen}"
    );

    // The health checker sees it answer (its own record of a check, not the column's
    // default), then stop answering.
    let mut answered = None;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let s = db.store.services(None).await.expect("s").remove(0);
        if s.last_check.is_some() && s.health_detail.as_deref() == Some("answers") {
            answered = Some(s);
            break;
        }
    }
    let answered = answered.expect("the health checker never recorded the live service answering");
    assert!(answered.healthy, "{answered:?}");
    drop(bdii);
    let mut unhealthy = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let s = &db.store.services(None).await.expect("s")[0];
        if !s.healthy {
            unhealthy = true;
            assert!(
                s.health_detail.as_deref().unwrap_or("").contains("connect"),
                "{s:?}"
            );
            break;
        }
    }
    assert!(
        unhealthy,
        "a dead shared service was never marked unhealthy"
    );
    let out = common::certo(
        &db.url,
        &["--data-dir", data.to_str().expect("utf-8"), "testbed", "ls"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains("UNHEALTHY"), "{listing}");
    drop(api);
    let _ = std::fs::remove_dir_all(&data);
    db.drop_db().await.expect("drop");
}

/// Every route of `certo serve` refuses a request without a valid credential (none, an
/// unknown one, another party's) and changes nothing; a VM's record is read only by the
/// host that runs it or by the VM itself.
#[tokio::test(flavor = "multi_thread")]
async fn every_api_route_refuses_a_request_without_a_valid_credential() {
    let db = common::scratch().await;
    let api = api(&db.store, Duration::from_secs(60)).await;
    let (_, vm_token) = new_vm(&db.store, "certo-r7-glite-wn-a1", "glite-WN", None).await;
    db.store
        .add_host("other", &api::token_digest("other-secret"))
        .await
        .expect("add");
    let before = common::snapshot(&db).await;
    let http = reqwest::Client::new();
    let routes: &[(&str, &str)] = &[
        ("GET", "/api/v1/hosts/h1"),
        ("POST", "/api/v1/hosts/h1/register"),
        ("POST", "/api/v1/hosts/h1/heartbeat"),
        ("POST", "/api/v1/guest/join"),
        ("POST", "/api/v1/guest/service"),
        ("POST", "/api/v1/guest/result"),
        ("POST", "/api/v1/guest/done"),
        ("POST", "/api/v1/guest/log"),
        ("GET", "/api/v1/guest/testbed"),
        ("GET", "/api/v1/vms/certo-r7-glite-wn-a1"),
    ];
    for (method, path) in routes {
        for token in [None, Some("not-a-token"), Some("other-secret")] {
            let mut req = http
                .request(
                    method.parse().expect("method"),
                    format!("{}{path}", api.base),
                )
                .body("svc 1 up");
            if let Some(t) = token {
                req = req.header("authorization", format!("Bearer {t}"));
            }
            let status = req.send().await.expect("request").status().as_u16();
            assert!(
                status == 401 || status == 403,
                "{method} {path} with {token:?} answered {status}"
            );
        }
    }
    // A guest token does not act for a host.
    let r = http
        .post(format!("{}/api/v1/hosts/h1/heartbeat", api.base))
        .header("authorization", format!("Bearer {vm_token}"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 403);
    assert_eq!(
        common::snapshot(&db).await,
        before,
        "a refused request changed the store"
    );
    // The VM's host and the VM itself read its record; the view carries no token state.
    for token in ["host-one-token", vm_token.as_str()] {
        let r = http
            .get(format!("{}/api/v1/vms/certo-r7-glite-wn-a1", api.base))
            .header("authorization", format!("Bearer {token}"))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 200);
        let v: serde_json::Value =
            serde_json::from_slice(&r.bytes().await.expect("body")).expect("json");
        assert_eq!(v["vm"]["state"], "booting", "{v}");
        assert!(v["vm"].get("token_used_up").is_none(), "{v}");
        assert!(v["vm"].get("id").is_none(), "{v}");
    }
    // A host reads its own record, not another's.
    let own = http
        .get(format!("{}/api/v1/hosts/h1", api.base))
        .header("authorization", "Bearer host-one-token")
        .send()
        .await
        .expect("request");
    assert_eq!(own.status(), 200);
    let other = http
        .get(format!("{}/api/v1/hosts/other", api.base))
        .header("authorization", "Bearer host-one-token")
        .send()
        .await
        .expect("request");
    assert_eq!(other.status(), 403);
    drop(api);
    db.drop_db().await.expect("drop");
}
